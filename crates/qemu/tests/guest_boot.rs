//! Boots the test guest with real QEMU under TCG from a command line built by `VmSpec`, lets it
//! write to its disk and power off, then checks the marker on the serial console and the bytes
//! on the disk with `qemu-io`.

use std::process::Command;
use std::time::{Duration, Instant};

use oxvirt_qemu::{
    Accel, BlockProtocol, Boot, DiskSpec, ImageFormat, LayerSpec, QemuTool, VmSpec, WriteErrorPolicy,
};
use oxvirt_testkit::{require_tool, TestGuest};

#[test]
fn test_guest_boots_writes_and_powers_off_under_tcg() {
    let guest = TestGuest::get();
    let qemu = QemuTool::SystemX86_64.locate().unwrap_or_else(|e| panic!("{e}"));
    let qemu_img = require_tool("qemu-img");
    let qemu_io = require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let st = Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());

    let serial = dir.path().join("serial.log");
    let spec = VmSpec {
        name: "guest-boot".into(),
        uuid: "00000000-0000-4000-8000-000000000001".into(),
        cpus: 1,
        memory_mib: 256,
        accel: Accel::Tcg,
        boot: Boot::Kernel {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            append: TestGuest::append(&[
                "oxvirt.write_mib=4",
                "oxvirt.marker=booted-42",
                "oxvirt.poweroff=1",
            ]),
        },
        disks: vec![DiskSpec {
            layers: vec![LayerSpec {
                path: disk.clone(),
                format: ImageFormat::Qcow2,
                protocol: BlockProtocol::File,
            }],
            serial: None,
            read_only: false,
            direct_io: false,
            write_error: WriteErrorPolicy::Report,
            slot: None,
        }],
        qmp_socket: dir.path().join("qmp.sock"),
        serial_log: Some(serial.clone()),
        vnc_socket: None,
        balloon: true,
        pid_file: None,
        incoming: None,
        start_paused: false,
        nics: vec![],
        nic_ports: 0,
        disk_ports: 0,
        guest_agent_socket: None,
    };

    let start = Instant::now();
    let mut child = Command::new(qemu).args(spec.to_args().unwrap()).spawn().unwrap();
    let deadline = Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "guest did not power off within {deadline:?}; console:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(status.success(), "qemu exited with {status}; console:\n{console}");
    assert!(
        console.contains("OXVIRT-GUEST wrote 4 MiB"),
        "console:\n{console}"
    );
    assert!(console.contains("OXVIRT-MARKER booted-42"), "console:\n{console}");
    // 3–4 s on an idle machine. nextest runs QEMU tests one at a time (.config/nextest.toml,
    // test group `qemu`), so the 10 s budget holds on a 2-core CI machine.
    assert!(
        elapsed < Duration::from_secs(10),
        "boot to power-off took {elapsed:?}, the budget is 10 s"
    );

    // Every byte the guest wrote is 'Z' (0x5a); the rest of the disk is still zero.
    let out = Command::new(qemu_io)
        .args(["-f", "qcow2", "-c", "read -P 0x5a 0 4M", "-c", "read -P 0 4M 1M"])
        .arg(&disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "qemu-io: {text}"
    );
    eprintln!("guest boot to power-off: {elapsed:?}");
}
