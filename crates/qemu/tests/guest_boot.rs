//! Boots the test guest with real QEMU under TCG from a command line built by `VmSpec`, lets it
//! write to its disks and power off, then checks the marker on the serial console and the bytes
//! on the disks. Its disks sit on each bus a disk can have: virtio-blk (`/dev/vda`),
//! virtio-scsi (`/dev/sda`) and SATA (the chipset's AHCI, which QEMU shows and this guest's
//! kernel has no driver for).

use std::process::Command;
use std::time::{Duration, Instant};

use oxvirt_qemu::qmp::Qmp;
use oxvirt_qemu::{
    Accel, BlockProtocol, Boot, BootDevice, CdromBus, CdromSpec, DiskBus, DiskSpec, ImageFormat, LayerSpec,
    QemuTool, VmSpec, WriteErrorPolicy,
};
use oxvirt_testkit::{require_tool, TestGuest};

/// QEMU's exit status once the guest powered off, at most 60 s after `start` (then QEMU is
/// killed and the test fails with the console).
fn wait_power_off(
    child: &mut std::process::Child,
    start: Instant,
    serial: &std::path::Path,
) -> std::process::ExitStatus {
    let deadline = Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "guest did not power off within {deadline:?}; console:\n{}",
                std::fs::read_to_string(serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

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

    let raw_disk = |name: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        p
    };
    let (scsi, sata) = (raw_disk("scsi.raw"), raw_disk("sata.raw"));
    let raw_spec = |path: &std::path::Path, bus: DiskBus, slot: u8| DiskSpec {
        layers: vec![LayerSpec {
            path: path.to_path_buf(),
            format: ImageFormat::Raw,
            protocol: BlockProtocol::File,
        }],
        serial: None,
        read_only: false,
        direct_io: false,
        write_error: WriteErrorPolicy::Report,
        slot: Some(slot),
        bus,
    };
    // The SCSI disk gets 2 MiB of 'S'; the guest lists its block devices.
    let script = "tr '\\000' S < /dev/zero | dd of=/dev/sda bs=1M count=2 iflag=fullblock oflag=direct \
        2>/dev/null && echo OXVIRT-GUEST sda written; echo OXVIRT-GUEST disks $(ls /sys/block | tr '\\n' ' ')";

    let serial = dir.path().join("serial.log");
    let spec = VmSpec {
        name: "guest-boot".into(),
        uuid: "00000000-0000-4000-8000-000000000001".into(),
        cpus: 1,
        max_cpus: None,
        cpu_devices: Vec::new(),
        memory_mib: 256,
        max_memory_mib: None,
        dimms: Vec::new(),
        accel: Accel::Tcg,
        boot: Boot::Kernel {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            append: TestGuest::append(&[
                "oxvirt.write_mib=4",
                &TestGuest::run_arg(script),
                "oxvirt.marker=booted-42",
                "oxvirt.poweroff=1",
            ]),
        },
        disks: vec![
            DiskSpec {
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
                bus: Default::default(),
            },
            raw_spec(&scsi, DiskBus::VirtioScsi, 1),
            raw_spec(&sata, DiskBus::Sata, 2),
        ],
        qmp_socket: dir.path().join("qmp.sock"),
        serial_log: Some(serial.clone()),
        vnc_socket: None,
        vnc_remote: None,
        balloon: true,
        pid_file: None,
        incoming: None,
        start_paused: false,
        nics: vec![],
        nic_ports: 0,
        disk_ports: 0,
        guest_agent_socket: None,
        cdrom: None,
        boot_order: Vec::new(),
    };

    let start = Instant::now();
    let mut child = Command::new(qemu).args(spec.to_args().unwrap()).spawn().unwrap();
    // QEMU made each disk's device on its bus (asked while the guest boots).
    let qmp_socket = spec.qmp_socket.clone();
    let types = tokio::runtime::Runtime::new().unwrap().block_on(async move {
        let q = loop {
            match Qmp::connect(&qmp_socket).await {
                Ok((q, _events)) => break q,
                Err(e) if start.elapsed() > Duration::from_secs(20) => panic!("QMP: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let mut types = Vec::new();
        for d in ["disk0", "disk1", "disk2"] {
            let path = format!("/machine/peripheral/{d}");
            let t = q
                .execute_raw("qom-get", serde_json::json!({ "path": path, "property": "type" }))
                .await
                .unwrap();
            types.push(t.as_str().unwrap().to_string());
        }
        types
    });
    assert_eq!(types, ["virtio-blk-pci", "scsi-hd", "ide-hd"]);
    let status = wait_power_off(&mut child, start, &serial);
    let elapsed = start.elapsed();
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(status.success(), "qemu exited with {status}; console:\n{console}");
    assert!(
        console.contains("OXVIRT-GUEST wrote 4 MiB"),
        "console:\n{console}"
    );
    assert!(console.contains("OXVIRT-MARKER booted-42"), "console:\n{console}");
    assert!(
        console.contains("OXVIRT-GUEST sda written"),
        "console:\n{console}"
    );
    let listed = console
        .lines()
        .find_map(|l| l.split("OXVIRT-GUEST disks ").nth(1))
        .unwrap_or_else(|| panic!("no block device list; console:\n{console}"));
    let mut listed: Vec<&str> = listed.split_whitespace().collect();
    listed.sort();
    assert_eq!(
        listed,
        ["sda", "vda"],
        "virtio-blk and virtio-scsi disks; no AHCI driver"
    );
    let written = std::fs::read(&scsi).unwrap();
    assert!(
        written[..2 << 20].iter().all(|b| *b == b'S'),
        "the SCSI disk's writes are lost"
    );
    assert!(written[2 << 20..].iter().all(|b| *b == 0));
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

/// An installer's path: a VM with an empty disk and a bootable ISO in its CD-ROM, CD first in
/// the boot order, boots through the firmware (SeaBIOS, El Torito, isolinux) into the guest on
/// the CD, which reads a file off the CD and writes its disk.
#[test]
fn guest_boots_from_its_cdrom_before_its_empty_disk() {
    let qemu = QemuTool::SystemX86_64.locate().unwrap_or_else(|e| panic!("{e}"));
    let qemu_img = require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let st = Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let iso = dir.path().join("install.iso");
    let script = "mkdir -p /cd && mount -t iso9660 -o ro /dev/sr0 /cd && echo OXVIRT-GUEST cd says $(cat /cd/hello.txt)";
    oxvirt_testkit::make_iso(
        &iso,
        &[("hello.txt", b"from-the-iso\n")],
        Some(&[
            "oxvirt.write_mib=2",
            &TestGuest::run_arg(script),
            "oxvirt.marker=booted-from-cd",
            "oxvirt.poweroff=1",
        ]),
    );
    let serial = dir.path().join("serial.log");
    let spec = VmSpec {
        name: "cd-boot".into(),
        uuid: "00000000-0000-4000-8000-000000000002".into(),
        cpus: 1,
        max_cpus: None,
        cpu_devices: Vec::new(),
        memory_mib: 256,
        max_memory_mib: None,
        dimms: Vec::new(),
        accel: Accel::Tcg,
        boot: Boot::Disk,
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
            bus: Default::default(),
        }],
        qmp_socket: dir.path().join("qmp.sock"),
        serial_log: Some(serial.clone()),
        vnc_socket: None,
        vnc_remote: None,
        balloon: false,
        pid_file: None,
        incoming: None,
        start_paused: false,
        nics: vec![],
        nic_ports: 0,
        disk_ports: 0,
        guest_agent_socket: None,
        cdrom: Some(CdromSpec {
            bus: CdromBus::Scsi,
            media: Some(iso),
            generation: 0,
        }),
        boot_order: vec![BootDevice::Cdrom, BootDevice::Hd],
    };
    let start = Instant::now();
    let mut child = Command::new(qemu).args(spec.to_args().unwrap()).spawn().unwrap();
    let status = wait_power_off(&mut child, start, &serial);
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(status.success(), "qemu exited with {status}; console:\n{console}");
    assert!(
        console.contains("OXVIRT-MARKER booted-from-cd"),
        "console:\n{console}"
    );
    assert!(
        console.contains("OXVIRT-GUEST cd says from-the-iso"),
        "console:\n{console}"
    );
    assert!(
        console.contains("OXVIRT-GUEST wrote 2 MiB"),
        "console:\n{console}"
    );
    let out = Command::new(require_tool("qemu-io"))
        .args(["-f", "qcow2", "-c", "read -P 0x5a 0 2M"])
        .arg(&disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "qemu-io: {text}"
    );
    eprintln!("boot from CD to power-off: {:?}", start.elapsed());
}
