//! CD-ROMs end to end, with real processes: an in-process engine, two `oxvirt node` processes,
//! a local storage domain. ISOs go up with `oxvirt disk upload` (recognised as ISOs), a VM with
//! an empty disk is started once from a bootable ISO as an installer would be (the guest on the
//! CD writes the disk), the CD of the running VM is changed and survives a live migration, an
//! ISO in a CD-ROM cannot be removed, and the configuration's CD is apart from the running
//! VM's. On the way, `vm stats` and `host stats` read the running VM's and its host's
//! statistics, a vCPU is hot plugged (`vm update --cpus`), and the installed VM is cloned
//! with its data and from a snapshot.

use crate::common;
use crate::transfers::{engine_cfg, login_with_dc1_and_cl1, oxvirt};

use std::path::Path;
use std::time::{Duration, Instant};

use common::free_port;
use oxvirt_engine::daemon::Engine;
use oxvirt_engine::model::{BootDevice, DiskContentType, VmId};
use oxvirt_testkit::{make_iso, TestGuest};

/// Waits until the last CD the guest reports in `log` is `want`.
async fn guest_reads(log: &Path, want: &str) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let last = text
            .lines()
            .rev()
            .find_map(|l| l.split("OXVIRT-GUEST cd ").nth(1))
            .map(str::trim);
        if last == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the guest never read {want:?} from its CD (last: {last:?}); console {}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_from_an_iso_change_the_cd_live_and_across_a_migration() {
    let engine_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let nodes = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // Declared after the directories, so it drops (killing the guests) before they go.
    let _reaper = common::QemuReaper(nodes.iter().map(|d| d.path().join("run")).collect());
    let w = work.path();
    let engine = Engine::start(engine_cfg(engine_dir.path()), Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let addrs = [free_port(), free_port()];
    let _procs: Vec<_> = nodes
        .iter()
        .zip(addrs)
        .enumerate()
        .map(|(i, (d, a))| {
            common::spawn_node(
                &format!("node{}", i + 1),
                d.path(),
                a,
                &[
                    "--engine",
                    &engine.addr.to_string(),
                    "--ca-fingerprint",
                    &engine.ca_fingerprint(),
                ],
            )
        })
        .collect();
    login_with_dc1_and_cl1(w, engine_dir.path(), &engine).await;
    for (i, a) in addrs.iter().enumerate() {
        let (name, a) = (format!("node{}", i + 1), a.to_string());
        oxvirt(
            w,
            &["host", "create", &name, "--address", &a, "--cluster", "cl1"],
            true,
        )
        .await;
    }
    let sp = storage.path().to_str().unwrap();
    oxvirt(
        w,
        &[
            "sd", "create", "data1", "--host", "node1", "--path", sp, "--dc", "dc1",
        ],
        true,
    )
    .await;

    // The installer: a bootable ISO whose guest reports what its CD holds every 200 ms (the
    // file `id` on whatever disc is in) and writes its disk.
    let script = "mkdir -p /cd; ( last=; while true; do \
        if mount -t iso9660 -o ro /dev/sr0 /cd 2>/dev/null; then v=$(cat /cd/id); umount /cd; else v=none; fi; \
        [ \"$v\" != \"$last\" ] && echo \"OXVIRT-GUEST cd $v\"; last=$v; usleep 200000; done ) &";
    let install = w.join("install.iso");
    make_iso(
        &install,
        &[("id", b"install\n")],
        Some(&[
            "oxvirt.write_mib=2",
            "oxvirt.marker=installed",
            &TestGuest::run_arg(script),
        ]),
    );
    let drivers = w.join("drivers.iso");
    make_iso(&drivers, &[("id", b"drivers\n")], None);
    for iso in [&install, &drivers] {
        oxvirt(
            w,
            &["disk", "upload", iso.to_str().unwrap(), "--sd", "data1"],
            true,
        )
        .await;
    }
    let db = &engine.cmds.app.db;
    let disk_id = |name: &'static str| async move {
        let all = db.disk_list(&Default::default()).await.unwrap();
        let d = all
            .into_iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no disk {name}"));
        (d.id, d.content_type)
    };
    let (install_id, ct) = disk_id("install").await;
    assert_eq!(ct, DiskContentType::Iso, "an ISO 9660 file uploads as an ISO");
    let (drivers_id, _) = disk_id("drivers").await;
    let (out, _) = oxvirt(w, &["disk", "list"], true).await;
    let row = out
        .lines()
        .find(|l| l.starts_with("install "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(" iso "), "the content type shows: {out}");

    oxvirt(
        w,
        &[
            "vm",
            "create",
            "inst",
            "--cluster",
            "cl1",
            "--memory",
            "256M",
            "--disk-size",
            "64M",
            "--sd",
            "data1",
        ],
        true,
    )
    .await;
    let (out, _) = oxvirt(w, &["vm", "show", "inst", "-o", "json"], true).await;
    let vm: VmId = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (stdout, stderr) = oxvirt(w, &["vm", "cdrom", "inst", "--iso", "inst-disk"], false).await;
    assert!(
        format!("{stdout}{stderr}").contains("is no ISO"),
        "{stdout}{stderr}"
    );

    // Run once from the installer CD: the empty disk cannot boot, the CD does.
    oxvirt(
        w,
        &[
            "vm", "start", "inst", "--host", "node1", "--cdrom", "install", "--boot", "cdrom,hd",
        ],
        true,
    )
    .await;
    let log1 = nodes[0]
        .path()
        .join("run/vms")
        .join(vm.to_string())
        .join("serial.log");
    oxvirt_testkit::wait_for_text(&log1, "OXVIRT-MARKER installed", Duration::from_secs(90)).unwrap();
    guest_reads(&log1, "install").await;
    let v = db.vm_get(vm).await.unwrap().unwrap();
    assert_eq!(v.run_cdrom, Some(install_id));
    assert_eq!(v.cdrom, None, "a run once leaves the configuration alone");
    assert_eq!(v.os.boot_devices, vec![BootDevice::Hd]);

    // Its statistics and its host's, as tables and as JSON.
    let (out, _) = oxvirt(w, &["vm", "stats", "inst"], true).await;
    assert!(
        out.contains("memory.installed") && out.contains("256 MiB"),
        "{out}"
    );
    assert!(out.contains("cpu.current.total"), "{out}");
    let (out, _) = oxvirt(w, &["vm", "stats", "inst", "-o", "json"], true).await;
    let stats: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(stats.len(), 7, "{out}");
    let (out, _) = oxvirt(w, &["host", "stats", "node1"], true).await;
    assert!(
        out.contains("memory.total") && out.contains("cpu.load.avg.5m"),
        "{out}"
    );

    // The running VM's CD changes now.
    oxvirt(w, &["vm", "cdrom", "inst", "--iso", "drivers", "--current"], true).await;
    guest_reads(&log1, "drivers").await;
    let (stdout, stderr) = oxvirt(w, &["disk", "remove", "drivers"], false).await;
    assert!(format!("{stdout}{stderr}").contains("CD-ROM"), "{stdout}{stderr}");

    // Migrated, the VM keeps the disc in its drive (the guest, still reading it, sees no
    // change), and its CD changes where it runs now.
    oxvirt(w, &["vm", "migrate", "inst", "--host", "node2"], true).await;
    let log2 = nodes[1]
        .path()
        .join("run/vms")
        .join(vm.to_string())
        .join("serial.log");
    oxvirt_testkit::wait_for_text(&log2, "OXVIRT", Duration::from_secs(30)).ok();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        !after.contains("OXVIRT-GUEST cd "),
        "the disc changed in the migration:\n{after}"
    );
    oxvirt(w, &["vm", "cdrom", "inst", "--eject", "--current"], true).await;
    guest_reads(&log2, "none").await;
    oxvirt(w, &["vm", "cdrom", "inst", "--iso", "install", "--current"], true).await;
    guest_reads(&log2, "install").await;
    assert_eq!(db.vm_get(vm).await.unwrap().unwrap().run_cdrom, Some(install_id));
    // Not in use any more: it goes.
    oxvirt(w, &["disk", "remove", "drivers"], true).await;

    // A vCPU more for the running VM: hot plugged at once; with --next-run only recorded.
    let cpu_devices = || {
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                nodes[1]
                    .path()
                    .join("run/vms")
                    .join(vm.to_string())
                    .join("vm.json"),
            )
            .unwrap(),
        )
        .unwrap();
        rec["create"]["cpu_devices"].as_array().map_or(0, Vec::len)
    };
    oxvirt(w, &["vm", "update", "inst", "--cpus", "2"], true).await;
    assert_eq!(cpu_devices(), 1);
    oxvirt(w, &["vm", "update", "inst", "--cpus", "3", "--next-run"], true).await;
    assert_eq!(cpu_devices(), 1);
    assert_eq!(db.vm_get(vm).await.unwrap().unwrap().cpu.vcpus(), 3);
    oxvirt(w, &["vm", "update", "inst", "--cpus", "1", "--next-run"], true).await;

    oxvirt(w, &["vm", "stop", "inst"], true).await;
    // The configuration's CD, for the next start; an ISO there cannot be removed either.
    oxvirt(w, &["vm", "cdrom", "inst", "--iso", "install"], true).await;
    assert_eq!(db.vm_get(vm).await.unwrap().unwrap().cdrom, Some(install_id));
    oxvirt(w, &["disk", "remove", "install"], false).await;
    oxvirt(w, &["vm", "cdrom", "inst", "--eject"], true).await;
    oxvirt(w, &["disk", "remove", "install"], true).await;

    // A clone of the installed VM: a disk of its own with the same data.
    oxvirt(w, &["vm", "clone", "inst", "inst2"], true).await;
    let (stdout, stderr) = oxvirt(w, &["vm", "clone", "inst", "inst2"], false).await;
    assert!(format!("{stdout}{stderr}").contains("exists"), "{stdout}{stderr}");
    let clone_out = w.join("inst2.raw");
    oxvirt(
        w,
        &[
            "disk",
            "download",
            "inst2_inst-disk",
            clone_out.to_str().unwrap(),
            "--format",
            "raw",
        ],
        true,
    )
    .await;
    let data = std::fs::read(&clone_out).unwrap();
    assert!(
        data[..2 << 20].iter().all(|b| *b == b'Z'),
        "the clone has the installed data"
    );
    oxvirt(w, &["vm", "remove", "inst2"], true).await;
    assert!(db.disk_get(install_id).await.unwrap().is_none());
    assert!(db.disk_get(drivers_id).await.unwrap().is_none());

    // The installer wrote the VM's disk.
    let out = w.join("inst.raw");
    oxvirt(
        w,
        &[
            "disk",
            "download",
            "inst-disk",
            out.to_str().unwrap(),
            "--format",
            "raw",
        ],
        true,
    )
    .await;
    let data = std::fs::read(&out).unwrap();
    assert!(
        data[..2 << 20].iter().all(|b| *b == b'Z'),
        "the installer's writes are on the disk"
    );

    // A VM as a snapshot of the installed VM was: the data then, not what was written after.
    oxvirt(
        w,
        &["snapshot", "create", "--vm", "inst", "--description", "installed"],
        true,
    )
    .await;
    let (disk, _) = disk_id("inst-disk").await;
    let leaf = db.volume_chain(disk).await.unwrap().pop().unwrap();
    let leaf_path = storage
        .path()
        .join(leaf.storage_domain_id.to_string())
        .join("images")
        .join(disk.to_string())
        .join(leaf.id.to_string());
    let qemu_io = oxvirt_testkit::require_tool("qemu-io");
    let wrote = std::process::Command::new(qemu_io)
        .args(["-f", "qcow2", "-c", "write -P 0x41 0 1M"])
        .arg(&leaf_path)
        .output()
        .unwrap();
    assert!(wrote.status.success(), "{wrote:?}");
    oxvirt(
        w,
        &["vm", "clone", "inst", "inst3", "--snapshot", "installed"],
        true,
    )
    .await;
    let snap_out = w.join("inst3.raw");
    let args = [
        "disk",
        "download",
        "inst3_inst-disk",
        snap_out.to_str().unwrap(),
        "--format",
        "raw",
    ];
    oxvirt(w, &args, true).await;
    let data = std::fs::read(&snap_out).unwrap();
    assert!(
        data[..2 << 20].iter().all(|b| *b == b'Z'),
        "the snapshot's clone has the data as of the snapshot"
    );
    let (stdout, stderr) = oxvirt(
        w,
        &["vm", "clone", "inst", "inst4", "--snapshot", "nosuch"],
        false,
    )
    .await;
    assert!(
        format!("{stdout}{stderr}").contains("no snapshot"),
        "{stdout}{stderr}"
    );
    engine.shutdown().await;
}
