//! VM runtime benchmark (issue 6), each figure against the bare tool in the same run:
//!
//! 1. VM start: `VmManager::create` until the guest's marker is on the console, versus the very
//!    same QEMU command line (read back from the manager's QEMU) spawned by hand.
//! 2. Live migration between two managers on loopback: QEMU's reported downtime and total time.
//! 3. Thin extend round trip on the local-SPM path (threshold event → extend → loop refresh →
//!    threshold re-armed), versus `truncate` + `losetup -c` by hand.
//! 4. Disk hot plug and unplug on a running guest, virtio-blk and virtio-scsi (`VmManager::hotplug_disk` /
//!    `hotunplug_disk`), versus the same QMP commands sent by hand to the same QEMU command line.
//!
//! Run: `cargo run --release -p oxvirt-node --example vm_bench` (needs the test guest:
//! `scripts/test-guest.sh`). Prints a Markdown table.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oxvirt_node::vm::thin::ThinPolicy;
use oxvirt_node::vm::{
    ImageRef, MigrateParams, ThinDisk, VmCreate, VmDisk, VmManager, VmManagerConfig, VmStatus,
};
use oxvirt_qemu::{Accel, BlockProtocol, Boot, DiskBus, ImageFormat, LayerSpec, WriteErrorPolicy};
use oxvirt_testkit::{require_tool, wait_for_text, TestGuest};
use oxvirt_types::VmId;

const ROUNDS: usize = 5;
const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) {
    let st = Command::new(require_tool("qemu-img"))
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img {args:?}");
}

fn vm(name: &str, disk: &Path, args: &[&str]) -> VmCreate {
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
        disks: vec![VmDisk::new(vec![LayerSpec {
            path: disk.to_path_buf(),
            format: ImageFormat::Qcow2,
            protocol: BlockProtocol::File,
        }])],
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

fn wait_marker(log: &Path) {
    wait_for_text(log, "OXVIRT-MARKER bench", Duration::from_secs(120)).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "32M"]);
    let run_a = tmp.path().join("a");
    let run_b = tmp.path().join("b");
    let a = VmManager::open(VmManagerConfig::new(&run_a)).await.unwrap();
    let b = VmManager::open(VmManagerConfig::new(&run_b)).await.unwrap();

    // 1. Start: alternate manager and bare so drift hits both alike.
    let (mut managed, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let req = vm("bench", &disk, &["oxvirt.marker=bench"]);
        let id = req.id;
        let t = Instant::now();
        let info = a.create(req).await.unwrap();
        let log = a.console_log(id);
        tokio::task::spawn_blocking(move || wait_marker(&log))
            .await
            .unwrap();
        managed.push(t.elapsed().as_secs_f64());
        let argv = cmdline(info.pid);
        let vm_dir = a.vm_dir(id);
        a.destroy(id).await.unwrap();

        // The same command by hand, in a directory of its own.
        let bare_dir = tmp.path().join(format!("bare-{id}"));
        let log = bare_dir.join("serial.log");
        let t = Instant::now();
        let mut child = spawn_bare(&argv, &vm_dir, &bare_dir);
        tokio::task::spawn_blocking(move || wait_marker(&log))
            .await
            .unwrap();
        bare.push(t.elapsed().as_secs_f64());
        child.kill().unwrap();
        child.wait().unwrap();
    }
    eprintln!("start samples (s): oxvirt {managed:.2?}, bare {bare:.2?}");
    let (m, b0) = (median(managed), median(bare));

    // 2. Migration A → B → A ..., guest running its writer.
    let req = vm("mig", &disk, &["oxvirt.writer=8", "oxvirt.marker=bench"]);
    let id = req.id;
    a.create(req.clone()).await.unwrap();
    let log = a.console_log(id);
    tokio::task::spawn_blocking(move || wait_marker(&log))
        .await
        .unwrap();
    let (mut down, mut total) = (Vec::new(), Vec::new());
    let mut here = (&a, &b);
    for _ in 0..4 {
        let (src, dst) = here;
        let inc = dst.prepare_incoming(req.clone(), false, false).await.unwrap();
        let rep = src
            .migrate(
                id,
                MigrateParams {
                    uri: inc.uri,
                    downtime_limit_ms: 300,
                    max_bandwidth: 1 << 30,
                    timeout_ms: 120_000,
                    encrypted: false,
                },
            )
            .await
            .unwrap();
        dst.wait_for(id, Duration::from_secs(30), |s| *s == VmStatus::Up)
            .await
            .unwrap();
        src.destroy(id).await.unwrap();
        down.push(rep.downtime_ms as f64);
        total.push(rep.total_ms as f64);
        here = (dst, src);
    }
    here.0.destroy(id).await.unwrap();

    // 3. Thin extends on the local-SPM path: no pause wanted, so generous margins.
    let vol = tmp.path().join("thin-vol");
    qemu_img(&["create", "-q", "-f", "qcow2", vol.to_str().unwrap(), "96M"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vol)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let mut req = vm("thin", &vol, &["oxvirt.write_mib=64", "oxvirt.marker=bench"]);
    req.disks[0].thin = Some(ThinDisk {
        volume: None,
        policy: ThinPolicy {
            chunk_bytes: 16 * MIB,
            free_margin_bytes: 8 * MIB,
            max_bytes: 120 * MIB,
        },
    });
    let id = req.id;
    a.create(req).await.unwrap();
    let log = a.console_log(id);
    tokio::task::spawn_blocking(move || wait_marker(&log))
        .await
        .unwrap();
    let st = a.stats(id).await.unwrap();
    a.destroy(id).await.unwrap();
    let extend_ms = st.thin_extend_total_ms as f64 / st.thin_extends.max(1) as f64;
    let bare_extend_ms = bare_extend(tmp.path());

    // 4. Disk hot plug and unplug, each plug followed at once by its unplug.
    let hot_file = tmp.path().join("hot.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", hot_file.to_str().unwrap(), "16M"]);
    let image = ImageRef {
        sd: oxvirt_types::SdUuid::new_random(),
        img: oxvirt_types::ImgUuid::new_random(),
    };
    let mut hot = vm("hot", &disk, &[]).disks.remove(0);
    hot.layers[0].path = hot_file.clone();
    hot.image = Some(image);
    let req = vm("hot", &disk, &["oxvirt.marker=bench"]);
    let id = req.id;
    let info = a.create(req).await.unwrap();
    let log = a.console_log(id);
    tokio::task::spawn_blocking(move || wait_marker(&log))
        .await
        .unwrap();
    // Per bus: (plug, unplug) samples through the VM manager.
    let mut ours = Vec::new();
    for bus in [DiskBus::VirtioBlk, DiskBus::VirtioScsi] {
        let disk = VmDisk { bus, ..hot.clone() };
        let (mut plug, mut unplug) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            a.hotplug_disk(id, disk.clone()).await.unwrap();
            plug.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            a.hotunplug_disk(id, image, Duration::from_secs(30))
                .await
                .unwrap();
            unplug.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ours.push((bus, plug, unplug));
    }
    let argv = cmdline(info.pid);
    let vm_dir = a.vm_dir(id);
    a.destroy(id).await.unwrap();
    let bare = bare_hotplug(tmp.path(), &argv, &vm_dir, &hot_file).await;

    println!("| figure | oxvirt | bare | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| VM start → guest marker (median of {ROUNDS}) | {:.2} s | {:.2} s | {:.2} |",
        m,
        b0,
        m / b0
    );
    println!(
        "| live migration downtime (median of {}) | {:.0} ms | | |",
        down.len(),
        median(down)
    );
    println!(
        "| live migration total time (median of {}) | {:.0} ms | | |",
        total.len(),
        median(total)
    );
    println!(
        "| thin extend round trip, local SPM (mean of {}; {} ENOSPC pauses) | {:.1} ms | {:.1} ms | {:.1} |",
        st.thin_extends,
        st.enospc_pauses,
        extend_ms,
        bare_extend_ms,
        extend_ms / bare_extend_ms
    );
    for ((bus, plug, unplug), (bare_plug, bare_unplug)) in ours.into_iter().zip(bare) {
        let (p, bp, u, bu) = (
            median(plug),
            median(bare_plug),
            median(unplug),
            median(bare_unplug),
        );
        let name = match bus {
            DiskBus::VirtioBlk => "virtio-blk",
            DiskBus::VirtioScsi => "virtio-scsi",
            DiskBus::Sata => unreachable!("SATA disks are not hot plugged"),
        };
        println!(
            "| {name} disk hot plug (median of {ROUNDS}) | {p:.1} ms | {bp:.1} ms | {:.1} |",
            p / bp
        );
        println!(
            "| {name} disk hot unplug, guest release included (median of {ROUNDS}) | {u:.1} ms | {bu:.1} ms | {:.2} |",
            u / bu
        );
    }
}

/// QEMU started by hand from `argv`, a managed VM's command line with its run directory
/// `vm_dir` replaced by `bare_dir` (created here).
fn spawn_bare(argv: &[String], vm_dir: &Path, bare_dir: &Path) -> std::process::Child {
    std::fs::create_dir(bare_dir).unwrap();
    let (from, to) = (vm_dir.to_str().unwrap(), bare_dir.to_str().unwrap());
    Command::new(&argv[0])
        .args(argv[1..].iter().map(|s| s.replace(from, to)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The hot plug and unplug QMP commands by hand (`blockdev-add` ×2 + `device_add`;
/// `device_del`, `DEVICE_DELETED`, `blockdev-del` ×2) on QEMU started from `argv` (a managed
/// VM's, its run directory `vm_dir` moved): plug and unplug times in ms, for a virtio-blk
/// disk, then a virtio-scsi one.
async fn bare_hotplug(dir: &Path, argv: &[String], vm_dir: &Path, file: &Path) -> Vec<(Vec<f64>, Vec<f64>)> {
    use oxvirt_qemu::cmdline::{disk_blockdevs, disk_device_json};
    use oxvirt_qemu::qmp::{Event, Qmp};
    let bare_dir = dir.join("bare-hot");
    let mut child = spawn_bare(argv, vm_dir, &bare_dir);
    let log = bare_dir.join("serial.log");
    tokio::task::spawn_blocking(move || wait_marker(&log))
        .await
        .unwrap();
    let (q, mut events) = Qmp::connect(&bare_dir.join("qmp.sock")).await.unwrap();
    let mut out = Vec::new();
    for bus in [DiskBus::VirtioBlk, DiskBus::VirtioScsi] {
        let spec = oxvirt_qemu::DiskSpec {
            layers: vec![LayerSpec {
                path: file.to_path_buf(),
                format: ImageFormat::Qcow2,
                protocol: BlockProtocol::File,
            }],
            serial: None,
            read_only: false,
            direct_io: false,
            write_error: WriteErrorPolicy::StopOnEnospc,
            slot: Some(1),
            bus,
        };
        let (nodes, top) = disk_blockdevs(1, &spec);
        let (mut plug, mut unplug) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for n in &nodes {
                q.execute_raw("blockdev-add", n.clone()).await.unwrap();
            }
            q.execute_raw("device_add", disk_device_json(1, &spec, &top, true))
                .await
                .unwrap();
            plug.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            q.execute_raw("device_del", serde_json::json!({ "id": "disk1" }))
                .await
                .unwrap();
            loop {
                match events.recv().await.expect("QMP events ended") {
                    Event::Other { name, data } if name == "DEVICE_DELETED" && data["device"] == "disk1" => {
                        break
                    }
                    _ => {}
                }
            }
            for n in nodes.iter().rev() {
                q.execute_raw("blockdev-del", serde_json::json!({ "node-name": n["node-name"] }))
                    .await
                    .unwrap();
            }
            unplug.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        out.push((plug, unplug));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    out
}

/// `truncate -s +16M file && losetup -c dev` by hand, mean of 10.
fn bare_extend(dir: &Path) -> f64 {
    let f: PathBuf = dir.join("bare-vol");
    std::fs::write(&f, vec![0u8; MIB as usize]).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&f)
        .output()
        .unwrap();
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let t = Instant::now();
    for _ in 0..10 {
        assert!(Command::new("truncate")
            .args(["-s", "+16M"])
            .arg(&f)
            .status()
            .unwrap()
            .success());
        assert!(Command::new("losetup")
            .args(["-c", &dev])
            .status()
            .unwrap()
            .success());
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0 / 10.0;
    Command::new("losetup").args(["-d", &dev]).status().unwrap();
    ms
}
