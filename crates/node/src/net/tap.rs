//! Persistent tap devices for VM NICs, created through `/dev/net/tun`.
//!
//! QEMU runs with `-sandbox spawn=deny` and no helper scripts, so the node creates each tap
//! beforehand (`IFF_TAP | IFF_NO_PI`, `TUNSETPERSIST`) in the host network namespace and QEMU
//! attaches to it by name. Names derive from the VM and the NIC's slot, so a restarted node
//! finds them again and the same VM never gets two taps for one NIC.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use oxvirt_types::VmId;

use super::netns::NetNs;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const ARPHRD_ETHER: u16 = 1;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest is padding).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct ifreq` as SIOCSIFHWADDR reads it: the name, then a `struct sockaddr`.
#[repr(C)]
struct IfReqHwAddr {
    name: [u8; 16],
    family: u16,
    data: [u8; 14],
    _pad: [u8; 8],
}

/// The MAC a tap itself carries: `fe:` and five bytes derived from its name. A Linux bridge
/// without an address of its own takes the lowest MAC among its ports, so a tap with a random
/// MAC could become the bridge's address while its VM runs there and take it away when the VM
/// leaves or migrates: the host's address on that network would change its MAC under every
/// peer's ARP cache (the guests' included) until those entries expire, tens of seconds. With
/// `fe:` first, the uplink NIC keeps the bridge's MAC, as on libvirt's hosts.
pub fn tap_mac(name: &str) -> [u8; 6] {
    // FNV-1a: distinct taps get distinct MACs without a registry.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0xfe, b[3], b[4], b[5], b[6], b[7]]
}

/// The tap of NIC `slot` of VM `vm`: `ox` + 11 hex digits of the VM id + the slot (≤ 15 bytes).
pub fn tap_name(vm: VmId, slot: u8) -> String {
    let hex: String = vm.to_string().chars().filter(|c| *c != '-').take(11).collect();
    format!("ox{hex}{slot}")
}

/// Creates the persistent tap `name` in `ns` (down, no bridge yet).
pub fn create_tap(ns: &NetNs, name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > 15 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must have 1 to 15 bytes"),
        ));
    }
    let name = name.to_string();
    ns.run(move || {
        let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back the name into) the ifreq we own.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut hw = IfReqHwAddr {
            name: req.name,
            family: ARPHRD_ETHER,
            data: [0; 14],
            _pad: [0; 8],
        };
        hw.data[..6].copy_from_slice(&tap_mac(&name));
        // SAFETY: the tun device reads the ifreq we own (SIOCSIFHWADDR on its own fd).
        if unsafe { libc::ioctl(tun.as_raw_fd(), SIOCSIFHWADDR, &mut hw as *mut IfReqHwAddr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_macs_sort_above_nic_macs_and_differ_per_tap() {
        let vm: VmId = "4f1c9a0e-2b3d-4c5e-8f70-0123456789ab".parse().unwrap();
        let (a, b) = (tap_mac(&tap_name(vm, 0)), tap_mac(&tap_name(vm, 1)));
        assert_eq!(a[0], 0xfe);
        assert_ne!(a, b);
        assert_eq!(
            a,
            tap_mac(&tap_name(vm, 0)),
            "a tap's MAC is the same after a node restart"
        );
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_differ_per_slot() {
        let vm: VmId = "4f1c9a0e-2b3d-4c5e-8f70-0123456789ab".parse().unwrap();
        assert_eq!(tap_name(vm, 0), "ox4f1c9a0e2b30");
        assert_eq!(tap_name(vm, 7), "ox4f1c9a0e2b37");
        assert!(tap_name(vm, 7).len() <= 15);
    }
}
