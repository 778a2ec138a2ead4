//! Shared by the VM tests: disks made with real qemu-img, the test guest, console waits, and a
//! reaper of QEMUs a failed test leaves behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use oxvirt_node::vm::{VmCreate, VmDisk};
use oxvirt_qemu::{Accel, BlockProtocol, Boot, ImageFormat, LayerSpec};
use oxvirt_testkit::{require_tool, TestGuest};
use oxvirt_types::VmId;
use serde_json::Value;

pub const MIB: u64 = 1 << 20;
/// Blocks the guest's writer keeps rewriting (`oxvirt.writer=`).
pub const WRITER_BLOCKS: u64 = 12;

pub fn qemu_img(args: &[&str]) {
    let out = Command::new(require_tool("qemu-img"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 volume; an overlay names its backing file by bare name (VDSM-style, same directory).
pub fn create_qcow2(path: &Path, size_mib: u64, backing: Option<&Path>) {
    let size = format!("{size_mib}M");
    let p = path.to_str().unwrap();
    match backing {
        None => qemu_img(&["create", "-q", "-f", "qcow2", p, &size]),
        Some(b) => {
            let name = b.file_name().unwrap().to_str().unwrap();
            qemu_img(&["create", "-q", "-f", "qcow2", "-b", name, "-F", "qcow2", p, &size])
        }
    }
}

pub fn qcow2_layer(path: &Path) -> LayerSpec {
    LayerSpec {
        path: path.to_path_buf(),
        format: ImageFormat::Qcow2,
        protocol: BlockProtocol::File,
    }
}

/// The test guest with one disk, 256 MiB, TCG, balloon and agent channel.
pub fn guest_vm(name: &str, disks: Vec<VmDisk>, args: &[&str]) -> VmCreate {
    let g = TestGuest::get();
    VmCreate {
        id: VmId::new_random(),
        name: name.into(),
        cpus: 1,
        memory_mib: 256,
        accel: Accel::Tcg,
        boot: Boot::Kernel {
            kernel: g.kernel,
            initrd: Some(g.initrd),
            append: TestGuest::append(args),
        },
        disks,
        nics: vec![],
        balloon: true,
        guest_agent: true,
        vnc: false,
        lease_domains: vec![],
        vm_lease: None,
        cdrom: None,
        boot_order: vec![],
        max_cpus: None,
        cpu_devices: vec![],
        cpus_unplugged: false,
        max_memory_mib: None,
        dimms: vec![],
        resume_behavior: Default::default(),
    }
}

pub fn writer_arg() -> String {
    format!("oxvirt.writer={WRITER_BLOCKS}")
}

pub fn passes(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("OXVIRT-GUEST pass ")
        .count()
}

/// Waits until the guest's writer has completed `n` more passes than `from`.
pub fn wait_passes(log: &Path, from: usize, n: usize, timeout: Duration) -> usize {
    let start = Instant::now();
    loop {
        let now = passes(log);
        if now >= from + n {
            return now;
        }
        assert!(
            start.elapsed() < timeout,
            "the guest completed {} of {n} passes within {timeout:?}; console:\n{}",
            now - from,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every block the writer covers holds its byte ('A' + i) when read through `image`'s chain.
pub fn verify_writer_data(image: &Path) {
    let mut cmd = Command::new(require_tool("qemu-io"));
    cmd.args(["-r", "-f", "qcow2"]);
    for i in 0..WRITER_BLOCKS {
        cmd.arg("-c")
            .arg(format!("read -P 0x{:02x} {}M 1M", 0x41 + i % 26, i));
    }
    let out = cmd.arg(image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "data in {} is not what the guest wrote: {text}{}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An executable hook at `<dir>/<point>/10_log` appending "<point> <vm name>" to `log`.
pub fn logging_hook(dir: &Path, point: &str, log: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let d = dir.join(point);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("10_log");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho \"$OXVIRT_HOOK $OXVIRT_VM_NAME\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn console_has(log: &Path, needle: &str, timeout: Duration) -> String {
    oxvirt_testkit::wait_for_text(log, needle, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Kills any QEMU still running from a test's run directory when the test ends (pass or
/// fail) and detaches its loop devices, so a failed test leaves no VM behind.
pub struct QemuReaper(pub Vec<PathBuf>);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for run_dir in &self.0 {
            let Ok(rd) = std::fs::read_dir(run_dir.join("vms")) else {
                continue;
            };
            for e in rd.filter_map(Result::ok) {
                // Thin disks' loop devices too (the kernel frees them once QEMU is gone).
                if let Ok(rec) = std::fs::read_to_string(e.path().join("vm.json")) {
                    let rec: Value = serde_json::from_str(&rec).unwrap_or_default();
                    for lp in rec["loops"].as_array().into_iter().flatten() {
                        if let Some(dev) = lp["device"].as_str() {
                            let _ = Command::new("losetup").args(["-d", dev]).status();
                        }
                    }
                }
                if let Ok(pid) = std::fs::read_to_string(e.path().join("qemu.pid")) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        let marker = e.path().join("qmp.sock");
                        if String::from_utf8_lossy(&cmdline).contains(marker.to_str().unwrap_or("-")) {
                            // SAFETY: kill(2) on a pid whose command line we just checked.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
    }
}

/// Waits until the guest's last `OXVIRT-GUEST <what> VALUE` line in `log` has a value `done`
/// accepts, and returns it; fails with the console after `timeout`.
pub async fn wait_guest_report(
    log: &Path,
    what: &str,
    done: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    let prefix = format!("OXVIRT-GUEST {what} ");
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let last = text
            .lines()
            .rev()
            .find_map(|l| l.split(prefix.as_str()).nth(1))
            .map(str::trim);
        if let Some(v) = last.filter(|v| done(v)) {
            return v.to_string();
        }
        assert!(
            start.elapsed() < timeout,
            "the guest never reported the {what} awaited (last: {last:?}); console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's record of VM `id` (`vm.json` in its run directory), what a restarted node
/// recovers the VM from.
pub fn vm_record(mgr: &oxvirt_node::vm::VmManager, id: oxvirt_types::VmId) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(mgr.vm_dir(id).join("vm.json")).unwrap()).unwrap()
}
