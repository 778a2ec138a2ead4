//! A VM description and the QEMU command line that runs it.
//!
//! [`VmSpec`] is what the node knows about a VM it runs; [`VmSpec::to_args`] is a pure function
//! from it to `qemu-system-x86_64` arguments, so the exact command line is unit-tested and shows
//! up verbatim in logs. Disks are given as volume chains and opened with `-blockdev`: one
//! protocol node and one format node per layer, each format node naming its backing node
//! explicitly, so QEMU never follows a backing-file string on its own.
//!
//! Node names are derived from the disk index and the layer's position so they are stable across
//! node restarts (recovery finds them again by name) and fit QEMU's 31-character limit.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::accel::Accel;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    /// SMBIOS UUID the guest sees; the engine's VM id.
    pub uuid: String,
    pub cpus: u16,
    pub memory_mib: u64,
    /// Must be resolved (`Kvm` or `Tcg`) before building the command line.
    pub accel: Accel,
    pub boot: Boot,
    pub disks: Vec<DiskSpec>,
    /// QMP control socket.
    pub qmp_socket: PathBuf,
    /// Serial console written to this file.
    pub serial_log: Option<PathBuf>,
    /// VNC display on a local UNIX socket.
    pub vnc_socket: Option<PathBuf>,
    pub balloon: bool,
    /// QEMU writes its pid here; recovery uses it.
    pub pid_file: Option<PathBuf>,
    /// `-incoming` URI for a migration destination (e.g. `tcp:127.0.0.1:49152`, `defer`).
    pub incoming: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// Boot from the first disk through the firmware.
    Disk,
    /// Direct kernel boot (the test guest, appliance images).
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

/// One virtual disk: the chain of layers, base first, the active (writable) layer last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub layers: Vec<LayerSpec>,
    /// Guest-visible serial (oVirt uses the image id's first 20 characters).
    pub serial: Option<String>,
    pub read_only: bool,
    /// Open with O_DIRECT (cache=none). Callers set it from a probe of the file system.
    pub direct_io: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub protocol: BlockProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn driver(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// How QEMU reaches a layer's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockProtocol {
    /// A regular file.
    File,
    /// A block device (a logical volume, or a loop device standing in for one).
    HostDevice,
}

impl BlockProtocol {
    pub fn driver(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::HostDevice => "host_device",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("VM {vm:?}: accelerator must be resolved to kvm or tcg before building a command line")]
    UnresolvedAccel { vm: String },
    #[error("VM {vm:?}: disk {disk} has no layers")]
    EmptyDisk { vm: String, disk: usize },
    #[error("VM {vm:?}: a raw layer can only be the base of disk {disk}")]
    RawOverlay { vm: String, disk: usize },
    #[error("VM {vm:?}: {what} must be at least 1")]
    Zero { vm: String, what: &'static str },
    #[error("VM {vm:?}: name may contain only letters, digits, '-', '_' and '.'")]
    BadName { vm: String },
}

/// QEMU node name of a layer's format node: `d<disk>l<layer>`.
pub fn format_node_name(disk: usize, layer: usize) -> String {
    format!("d{disk}l{layer}")
}

/// QEMU node name of a layer's protocol node.
pub fn protocol_node_name(disk: usize, layer: usize) -> String {
    format!("d{disk}l{layer}-file")
}

/// QEMU device id of a disk.
pub fn disk_device_id(disk: usize) -> String {
    format!("disk{disk}")
}

impl VmSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let vm = || self.name.clone();
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(SpecError::BadName { vm: vm() });
        }
        if self.accel == Accel::Auto {
            return Err(SpecError::UnresolvedAccel { vm: vm() });
        }
        if self.cpus == 0 {
            return Err(SpecError::Zero {
                vm: vm(),
                what: "cpus",
            });
        }
        if self.memory_mib == 0 {
            return Err(SpecError::Zero {
                vm: vm(),
                what: "memory",
            });
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.layers.is_empty() {
                return Err(SpecError::EmptyDisk { vm: vm(), disk: i });
            }
            if d.layers.iter().skip(1).any(|l| l.format == ImageFormat::Raw) {
                return Err(SpecError::RawOverlay { vm: vm(), disk: i });
            }
        }
        Ok(())
    }

    /// The arguments after the binary name.
    pub fn to_args(&self) -> Result<Vec<String>, SpecError> {
        self.validate()?;
        let mut a: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into()];
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("-name", format!("{},debug-threads=on", self.name));
        push("-uuid", self.uuid.clone());
        push("-machine", "q35".into());
        push("-accel", self.accel.qemu_name().into());
        if self.accel == Accel::Kvm {
            push("-cpu", "host".into());
        }
        push("-smp", self.cpus.to_string());
        push("-m", format!("{}M", self.memory_mib));
        // Deny what a guest-facing process never needs; `spawn=deny` also stops QEMU from running
        // helpers, so networking helpers must be set up by the node beforehand.
        push(
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        );
        push("-display", "none".into());
        push(
            "-chardev",
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                self.qmp_socket.display()
            ),
        );
        push("-mon", "chardev=qmp,mode=control".into());
        match &self.serial_log {
            Some(p) => push("-serial", format!("file:{}", p.display())),
            None => push("-serial", "none".into()),
        }
        if let Some(p) = &self.vnc_socket {
            push("-vnc", format!("unix:{}", p.display()));
        }
        if let Some(p) = &self.pid_file {
            push("-pidfile", p.display().to_string());
        }
        match &self.boot {
            Boot::Disk => {}
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => {
                push("-kernel", kernel.display().to_string());
                if let Some(i) = initrd {
                    push("-initrd", i.display().to_string());
                }
                push("-append", append.clone());
            }
        }
        for (di, disk) in self.disks.iter().enumerate() {
            for (li, layer) in disk.layers.iter().enumerate() {
                let top = li + 1 == disk.layers.len();
                let ro = disk.read_only || !top;
                let file = serde_json::json!({
                    "driver": layer.protocol.driver(),
                    "node-name": protocol_node_name(di, li),
                    "filename": layer.path,
                    "read-only": ro,
                    "cache": { "direct": disk.direct_io, "no-flush": false },
                    "auto-read-only": false,
                    "discard": "unmap",
                });
                push("-blockdev", file.to_string());
                let mut fmt = serde_json::json!({
                    "driver": layer.format.driver(),
                    "node-name": format_node_name(di, li),
                    "file": protocol_node_name(di, li),
                    "read-only": ro,
                    "cache": { "direct": disk.direct_io, "no-flush": false },
                    "discard": "unmap",
                });
                if layer.format == ImageFormat::Qcow2 {
                    fmt["backing"] = match li {
                        0 => serde_json::Value::Null,
                        _ => format_node_name(di, li - 1).into(),
                    };
                }
                push("-blockdev", fmt.to_string());
            }
            let top = format_node_name(di, disk.layers.len() - 1);
            let mut dev = format!("virtio-blk-pci,drive={top},id={}", disk_device_id(di));
            if let Some(s) = &disk.serial {
                dev.push_str(&format!(",serial={s}"));
            }
            if di == 0 && self.boot == Boot::Disk {
                dev.push_str(",bootindex=1");
            }
            push("-device", dev);
        }
        if self.balloon {
            push("-device", "virtio-balloon-pci,id=balloon0".into());
        }
        if let Some(uri) = &self.incoming {
            push("-incoming", uri.clone());
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            uuid: "4f1c9a0e-2b3d-4c5e-8f70-0123456789ab".into(),
            cpus: 2,
            memory_mib: 256,
            accel: Accel::Tcg,
            boot: Boot::Disk,
            disks: vec![DiskSpec {
                layers: vec![
                    LayerSpec {
                        path: "/sd/img/base".into(),
                        format: ImageFormat::Raw,
                        protocol: BlockProtocol::File,
                    },
                    LayerSpec {
                        path: "/sd/img/top".into(),
                        format: ImageFormat::Qcow2,
                        protocol: BlockProtocol::File,
                    },
                ],
                serial: Some("abc".into()),
                read_only: false,
                direct_io: true,
            }],
            qmp_socket: "/run/vm1.qmp".into(),
            serial_log: Some("/run/vm1.log".into()),
            vnc_socket: Some("/run/vm1.vnc".into()),
            balloon: true,
            pid_file: None,
            incoming: None,
        }
    }

    fn arg_after<'a>(args: &'a [String], key: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == key)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn chain_is_opened_with_explicit_backing_nodes() {
        let args = spec().to_args().unwrap();
        let bd: Vec<serde_json::Value> = arg_after(&args, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(bd.len(), 4);
        assert_eq!(bd[0]["driver"], "file");
        assert_eq!(bd[0]["read-only"], true, "base layer is read-only");
        assert_eq!(bd[1]["driver"], "raw");
        assert_eq!(bd[3]["driver"], "qcow2");
        assert_eq!(bd[3]["backing"], "d0l0");
        assert_eq!(bd[3]["read-only"], false, "active layer is writable");
        assert_eq!(bd[2]["cache"]["direct"], true);
        assert_eq!(
            arg_after(&args, "-device")[0],
            "virtio-blk-pci,drive=d0l1,id=disk0,serial=abc,bootindex=1"
        );
        assert!(arg_after(&args, "-device").contains(&"virtio-balloon-pci,id=balloon0"));
        assert_eq!(arg_after(&args, "-accel"), ["tcg"]);
        assert_eq!(arg_after(&args, "-vnc"), ["unix:/run/vm1.vnc"]);
        assert!(arg_after(&args, "-sandbox")[0].starts_with("on,"));
    }

    #[test]
    fn single_qcow2_layer_has_null_backing() {
        let mut s = spec();
        s.disks[0].layers.remove(0);
        let args = s.to_args().unwrap();
        let fmt: serde_json::Value = serde_json::from_str(arg_after(&args, "-blockdev")[1]).unwrap();
        assert!(
            fmt["backing"].is_null(),
            "QEMU must not open a backing file on its own"
        );
    }

    #[test]
    fn invalid_specs_are_refused() {
        let mut s = spec();
        s.accel = Accel::Auto;
        assert!(matches!(s.to_args(), Err(SpecError::UnresolvedAccel { .. })));
        let mut s = spec();
        s.disks[0].layers[1].format = ImageFormat::Raw;
        assert!(matches!(s.to_args(), Err(SpecError::RawOverlay { disk: 0, .. })));
        let mut s = spec();
        s.name = "a,b".into();
        assert!(matches!(s.to_args(), Err(SpecError::BadName { .. })));
        let mut s = spec();
        s.disks[0].layers.clear();
        assert!(matches!(s.to_args(), Err(SpecError::EmptyDisk { disk: 0, .. })));
        let mut s = spec();
        s.cpus = 0;
        assert!(matches!(s.to_args(), Err(SpecError::Zero { what: "cpus", .. })));
    }
}
