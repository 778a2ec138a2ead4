//! VMs across real `oxvirt node` processes driven over the JSON-RPC API (mutual TLS), the test
//! playing the engine: live migration between two nodes on one machine sharing a storage
//! directory (and back encrypted, with a failed and a cancelled attempt in between and a TLS
//! stream a plain destination refuses, hooks at every migration point); a node killed with SIGKILL, or stopped with SIGTERM, whose VM keeps
//! running and is found again by the next node process; a thin disk on a host that is not the SPM growing through the
//! pool's mailbox; KSM reported and tuned through `Host.getStats`/`Host.setKsmTune`.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{engine_client, free_port, kill_qemus, start_engine, Engine};
use oxvirt_rpc::RpcClient;
use oxvirt_storage::{Allocation, FileStorageDomain, VolFormat, VolumeSpec};
use oxvirt_testkit::{require_tool, TestGuest};
use oxvirt_types::{ImgUuid, SdUuid, VmId, VolUuid};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(90);
/// Blocks the guest's writer keeps rewriting (`oxvirt.writer=`).
const WRITER_BLOCKS: u64 = 12;

/// One `oxvirt node` process on its own data directory and port. QEMUs it started outlive it
/// (by design); dropping it kills them too, so a failed test leaves no VM behind.
struct Node {
    name: String,
    data: PathBuf,
    addr: SocketAddr,
    child: Child,
    c: RpcClient,
    log: PathBuf,
}

impl Node {
    async fn start(
        engine: &Engine,
        name: &str,
        data: &Path,
        hooks: Option<&Path>,
        addr: Option<SocketAddr>,
    ) -> Node {
        Self::start_with_env(engine, name, data, hooks, addr, &[]).await
    }

    async fn start_with_env(
        engine: &Engine,
        name: &str,
        data: &Path,
        hooks: Option<&Path>,
        addr: Option<SocketAddr>,
        env: &[(&str, &str)],
    ) -> Node {
        std::fs::create_dir_all(data).unwrap();
        let addr = addr.unwrap_or_else(free_port);
        let log = data.join("node.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oxvirt"));
        cmd.args(["node", "--name", name, "--listen", &addr.to_string(), "--data"])
            .arg(data)
            .args(["--accel", "tcg"]);
        if !data.join("pki/cert.pem").exists() && !data.join("pki/key.pem").exists() {
            let token = engine.enrollment.issue_token(Duration::from_secs(300));
            cmd.args(["--engine", &engine.addr.to_string(), "--token", &token]);
        }
        if let Some(h) = hooks {
            cmd.arg("--hooks").arg(h);
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .env("OXVIRT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let c = engine_client(engine, addr).with_timeout(Duration::from_secs(60));
        let mut node = Node {
            name: name.into(),
            data: data.to_path_buf(),
            addr,
            child,
            c,
            log,
        };
        let start = Instant::now();
        while node.c.call("Host.ping", json!({})).await.is_err() {
            if let Some(st) = node.child.try_wait().unwrap() {
                panic!("node {name} exited with {st}: {}", node.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "node {name} did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn call(&self, m: &str, p: Value) -> Value {
        self.c
            .call(m, p.clone())
            .await
            .unwrap_or_else(|e| panic!("{} {m}({p}): {e}\n{}", self.name, tail(&self.log_text())))
    }

    fn vm_dir(&self, id: VmId) -> PathBuf {
        self.data.join("run/vms").join(id.to_string())
    }

    fn console_log(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join("serial.log")
    }

    /// Waits until VM `id`'s console shows `line`; on timeout, shows the console's and the
    /// node's last lines (what the guest saw, and what the node did, such as device events).
    async fn wait_console(&self, id: VmId, line: &str, timeout: Duration) {
        let log = self.console_log(id);
        let start = Instant::now();
        while !std::fs::read_to_string(&log).unwrap_or_default().contains(line) {
            assert!(
                start.elapsed() < timeout,
                "no {line:?} on the console within {timeout:?}: {}\n--- node {} ---\n{}",
                tail(&std::fs::read_to_string(&log).unwrap_or_default()),
                self.name,
                tail(&self.log_text())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn state(&self, id: VmId) -> Value {
        self.call("VM.getInfo", json!({ "vmID": id })).await["status"].clone()
    }

    async fn wait_state(&self, id: VmId, state: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let st = self.state(id).await;
            if st["state"] == state {
                return st;
            }
            assert!(
                start.elapsed() < timeout,
                "{}: VM {id} not {state} within {timeout:?}: {st}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a job's end: `Ok(result)` or `Err(error message)`.
    async fn wait_job(&self, job: &Value, timeout: Duration) -> Result<Value, String> {
        let start = Instant::now();
        loop {
            let jobs = self.call("Host.getJobs", json!({})).await;
            let rec = jobs
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["id"] == *job)
                .unwrap_or_else(|| panic!("{}: no job {job} in {jobs}", self.name))
                .clone();
            match rec["status"].as_str().unwrap() {
                "done" => return Ok(rec["result"].clone()),
                "failed" => return Err(rec["error"]["message"].as_str().unwrap_or_default().to_string()),
                _ => {}
            }
            assert!(
                start.elapsed() < timeout,
                "{}: job {job} still running: {rec}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Stops the node process with SIGTERM; its QEMUs live on. Returns how it exited.
    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st
    }

    /// Waits, at most `limit`, for the node process to die by itself (a crash hook kills it);
    /// its QEMUs live on. `what` says where it was to die, for the failure message.
    async fn died(mut self, what: &str, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < limit,
                "the node did not die {what}: {}",
                tail(&self.log_text())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        std::mem::forget(self);
        st
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_qemus(&self.data.join("run"));
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Whether `pid` runs: exists and is not a zombie (a QEMU orphaned by the killed node is
/// reaped by init, not by us, so it may linger as a zombie after it exits).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

fn passes(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("OXVIRT-GUEST pass ")
        .count()
}

/// Waits until the guest's writer has completed `n` more passes than `from`.
async fn wait_passes(log: &Path, from: usize, n: usize, timeout: Duration) -> usize {
    let start = Instant::now();
    loop {
        let now = passes(log);
        if now >= from + n {
            return now;
        }
        assert!(
            start.elapsed() < timeout,
            "the guest completed {} of {n} passes within {timeout:?}; console:\n{}",
            now.saturating_sub(from),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every block the writer covers holds its byte ('A' + i) when read through `image`'s chain.
fn verify_writer_data(image: &Path) {
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
fn logging_hook(dir: &Path, point: &str, log: &Path) {
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

/// Connects directory `shared` as the node's storage connection "shared".
async fn connect_shared(n: &Node, shared: &Path) {
    let r = n
        .call(
            "StoragePool.connectStorageServer",
            json!({ "connectionParams": [{ "id": "shared", "kind": "localfs", "path": shared }] }),
        )
        .await;
    assert_eq!(r["statuslist"][0]["status"], 0, "{r}");
}

/// A new sparse volume of `size` bytes in a new image of `dom`.
fn new_volume(dom: &FileStorageDomain, size: u64, format: VolFormat) -> (ImgUuid, VolUuid) {
    let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
    dom.create_volume(img, vol, &VolumeSpec::new(size, format, Allocation::Sparse))
        .unwrap();
    (img, vol)
}

/// Connects `shared` as storage on every node; the first creates a domain there with one
/// 32 MiB qcow2 image. Returns the domain, image and the volume's path.
async fn shared_disk(nodes: &[&Node], shared: &Path) -> (SdUuid, ImgUuid, PathBuf) {
    for n in nodes {
        connect_shared(n, shared).await;
    }
    let sd = SdUuid::new_random();
    nodes[0]
        .call(
            "StorageDomain.create",
            json!({ "sdUUID": sd, "connectionID": "shared", "description": "data", "storageType": "localfs" }),
        )
        .await;
    let dom = FileStorageDomain::find(shared, sd).unwrap();
    let (img, vol) = new_volume(&dom, 32 << 20, VolFormat::Cow);
    (sd, img, dom.volume_path(img, vol))
}

fn vm_params(id: VmId, name: &str, sd: SdUuid, img: ImgUuid) -> Value {
    let g = TestGuest::get();
    json!({
        "vmID": id, "vmName": name, "smp": 1, "memSize": 256, "guestAgent": true, "vnc": false,
        "boot": { "kernel": g.kernel, "initrd": g.initrd,
                  "cmdline": TestGuest::append(&[&format!("oxvirt.writer={WRITER_BLOCKS}")]) },
        "drives": [{ "domainID": sd, "imageID": img }],
    })
}

/// Migrates `id` from `src` to `dst` with the VDSM verbs: `VM.migrationCreate` on the
/// destination, `VM.migrate` on the source; returns the migration job's outcome.
async fn migrate(
    src: &Node,
    dst: &Node,
    id: VmId,
    params: &Value,
    bandwidth_mib: u64,
) -> Result<Value, String> {
    let inc = dst.call("VM.migrationCreate", params.clone()).await;
    let uri = inc["uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("tcp:127.0.0.1:"), "{uri}");
    let job = src
        .call(
            "VM.migrate",
            json!({ "vmID": id, "dstUri": uri, "maxDowntimeMs": 300, "maxBandwidth": bandwidth_mib, "timeoutSecs": 90 }),
        )
        .await["jobID"]
        .clone();
    src.wait_job(&job, Duration::from_secs(120)).await
}

/// A TCP proxy for one connection to `127.0.0.1:port` that hands over the first four bytes the
/// client sent: the URI to give the source instead, and those bytes.
async fn sniffing_proxy(port: u16) -> (String, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = format!("tcp:127.0.0.1:{}", l.local_addr().unwrap().port());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut inbound, _) = l.accept().await.unwrap();
        let mut outbound = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut head = [0u8; 4];
        inbound.read_exact(&mut head).await.unwrap();
        let _ = tx.send(head.to_vec());
        outbound.write_all(&head).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    (via, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_there_and_back_with_failure_and_cancel() {
    let engine = start_engine().await;
    let tmp = tempfile::tempdir().unwrap();
    let hooks = tmp.path().join("hooks");
    let hook_log = tmp.path().join("hooks.log");
    for point in [
        "before_vm_migrate_source",
        "after_vm_migrate_source",
        "before_vm_migrate_destination",
        "after_vm_migrate_destination",
    ] {
        logging_hook(&hooks, point, &hook_log);
    }
    let a = Node::start(&engine, "host-a", &tmp.path().join("a"), Some(&hooks), None).await;
    let b = Node::start(&engine, "host-b", &tmp.path().join("b"), Some(&hooks), None).await;
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let (sd, img, volume) = shared_disk(&[&a, &b], &shared).await;
    let id = VmId::new_random();
    let mut params = vm_params(id, "mig", sd, img);
    // The guest fills the first 4 MiB of a hot plugged second disk and 2 MiB of a third, a
    // SCSI one, then reports their unplugs.
    let script = "while [ ! -b /dev/vdb ]; do usleep 100000; done; \
        tr '\\000' H < /dev/zero | dd of=/dev/vdb bs=1M count=4 iflag=fullblock oflag=direct \
        2>/dev/null && echo OXVIRT-GUEST vdb written; \
        while [ ! -b /dev/sda ]; do usleep 100000; done; \
        tr '\\000' S < /dev/zero | dd of=/dev/sda bs=1M count=2 iflag=fullblock oflag=direct \
        2>/dev/null && echo OXVIRT-GUEST sda written; \
        while [ -b /dev/sda ]; do usleep 100000; done; echo OXVIRT-GUEST sda unplugged; \
        while [ -b /dev/vdb ]; do usleep 100000; done; echo OXVIRT-GUEST vdb unplugged";
    params["boot"]["cmdline"] = TestGuest::append(&[
        &format!("oxvirt.writer={WRITER_BLOCKS}"),
        &TestGuest::run_arg(script),
    ])
    .into();
    let info = a.call("VM.create", params.clone()).await;
    assert_eq!(info["status"]["state"], "up", "{info}");
    let p = wait_passes(&a.console_log(id), 0, 1, BOOT).await;

    // 1. A destination that is not there: the migration fails, the VM runs on.
    let job = a
        .call(
            "VM.migrate",
            json!({ "vmID": id, "dstUri": "tcp:127.0.0.1:1", "timeoutSecs": 90 }),
        )
        .await["jobID"]
        .clone();
    let err = a.wait_job(&job, Duration::from_secs(60)).await.unwrap_err();
    assert!(err.contains("migration failed"), "{err}");
    assert_eq!(a.state(id).await["state"], "up");
    let p = wait_passes(&a.console_log(id), p, 1, BOOT).await;

    // 2. Cancelled half-way (slowed to 2 MiB/s so there is a half-way). Progress comes as
    // events and in the stats while it runs.
    let mut events = a.c.events().await.unwrap();
    let inc = b.call("VM.migrationCreate", params.clone()).await;
    let job = a
        .call(
            "VM.migrate",
            json!({ "vmID": id, "dstUri": inc["uri"], "maxBandwidth": 2, "timeoutSecs": 90 }),
        )
        .await["jobID"]
        .clone();
    a.wait_state(id, "migration_source", Duration::from_secs(20))
        .await;
    let progress = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no migration progress event within 10 s")
            .expect("event stream ended");
        if ev["method"] == format!("|virt|VM_migration_progress|{id}") {
            break ev["params"]["body"].clone();
        }
    };
    let total = progress["totalBytes"].as_u64().unwrap();
    assert!(
        total >= 256 << 20 && progress["remainingBytes"].as_u64().unwrap() <= total,
        "{progress}"
    );
    assert!(progress["progress"].as_u64().unwrap() <= 100, "{progress}");
    let stats = a.call("VM.getStats", json!({ "vmID": id })).await;
    assert!(stats["migration_progress"].is_u64(), "{stats}");
    a.call("VM.migrateCancel", json!({ "vmID": id })).await;
    let err = a.wait_job(&job, Duration::from_secs(60)).await.unwrap_err();
    assert!(err.contains("migration failed"), "{err}");
    assert_eq!(
        a.state(id).await["state"],
        "up",
        "cancel leaves the VM on the source"
    );
    let stats = a.call("VM.getStats", json!({ "vmID": id })).await;
    assert!(stats["migration_progress"].is_null(), "{stats}");
    // The destination's QEMU gave up and is reported down; removing it is the caller's job.
    b.wait_state(id, "down", Duration::from_secs(30)).await;
    b.call("VM.destroy", json!({ "vmID": id })).await;
    wait_passes(&a.console_log(id), p, 1, BOOT).await;

    // A disk hot plugged into the running guest, which writes to it; plugging it again
    // changes nothing. It gets the next slot, and keeps it through the migrations (the
    // destinations list it first: the layout follows the slots, not the order).
    let dom = FileStorageDomain::find(&shared, sd).unwrap();
    let (img2, vol2) = new_volume(&dom, 16 << 20, VolFormat::Raw);
    let drive2 = json!({ "domainID": sd, "imageID": img2 });
    let plugged = a
        .call("VM.hotplugDisk", json!({ "vmID": id, "drive": drive2 }))
        .await;
    let slots = |info: &Value| -> Vec<(String, u64)> {
        info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["image"]["img"].as_str().unwrap().to_string(),
                    d["slot"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let expected = vec![(img.to_string(), 0), (img2.to_string(), 1)];
    assert_eq!(slots(&plugged), expected, "{plugged}");
    a.wait_console(id, "OXVIRT-GUEST vdb written", BOOT).await;
    let again = a
        .call("VM.hotplugDisk", json!({ "vmID": id, "drive": drive2 }))
        .await;
    assert_eq!(slots(&again), expected, "{again}");
    // A third on the virtio-scsi controller (the guest's /dev/sda); a SATA one cannot be
    // plugged into a running VM, as in oVirt, and nothing changes.
    let (img3, vol3) = new_volume(&dom, 8 << 20, VolFormat::Raw);
    let drive3 = json!({ "domainID": sd, "imageID": img3, "iface": "scsi" });
    let sata = json!({ "domainID": sd, "imageID": img3, "iface": "sata" });
    let err =
        a.c.call("VM.hotplugDisk", json!({ "vmID": id, "drive": sata }))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("SATA disk cannot be plugged"), "{err}");
    let plugged = a
        .call("VM.hotplugDisk", json!({ "vmID": id, "drive": drive3 }))
        .await;
    let expected = vec![(img.to_string(), 0), (img2.to_string(), 1), (img3.to_string(), 2)];
    assert_eq!(slots(&plugged), expected, "{plugged}");
    assert_eq!(plugged["disks"][2]["bus"], "virtio_scsi", "{plugged}");
    a.wait_console(id, "OXVIRT-GUEST sda written", BOOT).await;
    let mut params = params.clone();
    params["drives"] = json!([
        { "domainID": sd, "imageID": img3, "slot": 2, "iface": "scsi" },
        { "domainID": sd, "imageID": img2, "slot": 1 },
        { "domainID": sd, "imageID": img, "slot": 0 },
    ]);

    // 3. A → B for real.
    let rep = migrate(&a, &b, id, &params, 0).await.unwrap();
    let (total, downtime) = (
        rep["total_ms"].as_u64().unwrap(),
        rep["downtime_ms"].as_u64().unwrap(),
    );
    eprintln!("migration A→B over the node API: total {total} ms, downtime {downtime} ms");
    assert!(total > 0 && downtime <= total, "{rep}");
    let st = a.state(id).await;
    assert_eq!(st["state"], "down", "{st}");
    assert_eq!(st["reason"]["kind"], "migrated", "{st}");
    b.wait_state(id, "up", Duration::from_secs(30)).await;
    a.call("VM.destroy", json!({ "vmID": id })).await;
    // The guest goes on writing on B (its console is B's now).
    wait_passes(&b.console_log(id), 0, 1, BOOT).await;
    let all = b.call("Host.getAllVmStats", json!({})).await;
    assert_eq!(all[0]["vmID"], json!(id), "{all}");

    // 4. Encrypted to a destination that expects a plain stream: the TLS handshake fails,
    // the VM runs on where it was.
    let inc = a.call("VM.migrationCreate", params.clone()).await;
    let job = b
        .call(
            "VM.migrate",
            json!({ "vmID": id, "dstUri": inc["uri"], "timeoutSecs": 60, "encrypted": true }),
        )
        .await["jobID"]
        .clone();
    let err = b.wait_job(&job, Duration::from_secs(60)).await.unwrap_err();
    assert!(err.contains("migration failed"), "{err}");
    assert_eq!(b.state(id).await["state"], "up");
    a.wait_state(id, "down", Duration::from_secs(30)).await;
    a.call("VM.destroy", json!({ "vmID": id })).await;

    // 5. And back B → A, encrypted (TLS with both nodes' certificates): a proxy between them
    // sees a TLS handshake go by, not QEMU's "QEVM" stream header.
    let mut enc = params.clone();
    enc["encrypted"] = json!(true);
    let inc = a.call("VM.migrationCreate", enc).await;
    let port: u16 = inc["uri"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (via, first_bytes) = sniffing_proxy(port).await;
    let job = b
        .call(
            "VM.migrate",
            json!({ "vmID": id, "dstUri": via, "maxDowntimeMs": 300, "timeoutSecs": 90, "encrypted": true }),
        )
        .await["jobID"]
        .clone();
    let rep = b.wait_job(&job, Duration::from_secs(120)).await.unwrap();
    let head = first_bytes.await.unwrap();
    assert_eq!(head[0], 0x16, "not a TLS handshake record: {head:02x?}");
    assert_ne!(&head[..], b"QEVM", "the stream went in the clear");
    eprintln!(
        "encrypted migration B→A over the node API: total {} ms, downtime {} ms",
        rep["total_ms"], rep["downtime_ms"]
    );
    a.wait_state(id, "up", Duration::from_secs(30)).await;
    b.call("VM.destroy", json!({ "vmID": id })).await;
    wait_passes(&a.console_log(id), 0, 1, BOOT).await;
    let back = a.call("VM.getInfo", json!({ "vmID": id })).await;
    let mut moved = slots(&back);
    moved.sort_by_key(|(_, slot)| *slot);
    assert_eq!(moved, expected, "{back}");
    let buses: Vec<&Value> = back["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["bus"])
        .collect();
    assert_eq!(buses, ["virtio_scsi", "virtio_blk", "virtio_blk"], "{back}");

    // The SCSI disk goes at once (QEMU needs no word from the guest) with what the guest
    // wrote on it.
    let t0 = Instant::now();
    let unplugged = a
        .call("VM.hotunplugDisk", json!({ "vmID": id, "drive": drive3 }))
        .await;
    eprintln!("SCSI disk hot unplug: {:?}", t0.elapsed());
    let mut left = slots(&unplugged);
    left.sort_by_key(|(_, slot)| *slot);
    assert_eq!(left, expected[..2], "{unplugged}");
    a.wait_console(id, "OXVIRT-GUEST sda unplugged", BOOT).await;
    let data = std::fs::read(dom.volume_path(img3, vol3)).unwrap();
    assert!(
        data[..2 << 20].iter().all(|b| *b == b'S'),
        "the guest's writes to the SCSI disk are lost"
    );

    // A paused guest cannot release the disk: the unplug times out and the disk stays in the
    // record; once the guest runs it lets the device go, and the unplug asked again finds it
    // gone and finishes. The guest sees it go, and the data it wrote is on the volume. An
    // image the VM does not have is refused.
    a.call("VM.pause", json!({ "vmID": id })).await;
    let err =
        a.c.call(
            "VM.hotunplugDisk",
            json!({ "vmID": id, "drive": drive2, "timeout": 1 }),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("releasing the unplugged disk"), "{err}");
    let paused = a.call("VM.getInfo", json!({ "vmID": id })).await;
    assert_eq!(slots(&paused).len(), 2, "{paused}");
    a.call("VM.cont", json!({ "vmID": id })).await;
    a.wait_console(id, "OXVIRT-GUEST vdb unplugged", BOOT).await;
    let t0 = Instant::now();
    let unplugged = a
        .call("VM.hotunplugDisk", json!({ "vmID": id, "drive": drive2 }))
        .await;
    eprintln!("disk hot unplug after the guest let it go: {:?}", t0.elapsed());
    assert_eq!(slots(&unplugged), [(img.to_string(), 0)], "{unplugged}");
    let err =
        a.c.call("VM.hotunplugDisk", json!({ "vmID": id, "drive": drive2 }))
            .await
            .unwrap_err();
    assert!(err.to_string().contains(&img2.to_string()), "{err}");
    let data = std::fs::read(dom.volume_path(img2, vol2)).unwrap();
    assert!(
        data[..4 << 20].iter().all(|b| *b == b'H'),
        "the guest's writes to the plugged disk are lost"
    );
    assert!(data[4 << 20..].iter().all(|b| *b == 0));
    wait_passes(&a.console_log(id), 0, 1, BOOT).await;
    a.call("VM.destroy", json!({ "vmID": id })).await;
    verify_writer_data(&volume);
    // Hooks ran at each migration point: 5 attempts left the source (the first failed at
    // once, one was cancelled, one refused its TLS), 4 destinations were prepared, 2 received
    // the guest.
    let hooks_ran = std::fs::read_to_string(&hook_log).unwrap();
    let count = |p: &str| hooks_ran.matches(&format!("{p} mig")).count();
    assert_eq!(count("before_vm_migrate_source"), 5, "{hooks_ran}");
    assert_eq!(count("after_vm_migrate_source"), 2, "{hooks_ran}");
    assert_eq!(count("before_vm_migrate_destination"), 4, "{hooks_ran}");
    assert_eq!(count("after_vm_migrate_destination"), 2, "{hooks_ran}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_its_vm_running_and_the_next_one_recovers_it() {
    let engine = start_engine().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("n");
    let mut node = Node::start(&engine, "phoenix-host", &data, None, None).await;
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let (sd, img, base) = shared_disk(&[&node], &shared).await;
    let id = VmId::new_random();
    // A second disk on the chipset's SATA controller (the test kernel has no AHCI driver, so
    // only QEMU and the node see it): it comes up, and is found again with its bus.
    let dom = FileStorageDomain::find(&shared, sd).unwrap();
    let (sata_img, _) = new_volume(&dom, 8 << 20, VolFormat::Raw);
    let mut params = vm_params(id, "phoenix", sd, img);
    params["drives"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "domainID": sd, "imageID": sata_img, "iface": "sata" }));
    let disk_buses = |info: &Value| -> Vec<(String, String)> {
        info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let img = d["image"]["img"].as_str().unwrap().to_string();
                (img, d["bus"].as_str().unwrap().to_string())
            })
            .collect()
    };
    let expected_buses = vec![
        (img.to_string(), "virtio_blk".to_string()),
        (sata_img.to_string(), "sata".to_string()),
    ];
    let info = node.call("VM.create", params).await;
    assert_eq!(disk_buses(&info), expected_buses, "{info}");
    let qemu_pid = info["pid"].as_i64().unwrap() as i32;
    let cmdline = std::fs::read(format!("/proc/{qemu_pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(r#""driver":"ide-hd""#) && cmdline.contains(r#""bus":"ide.0""#),
        "no SATA disk on QEMU's command line: {cmdline}"
    );
    let log = node.console_log(id);
    let p = wait_passes(&log, 0, 1, BOOT).await;
    node.call("VM.setBalloonTarget", json!({ "vmID": id, "target": 200 }))
        .await;

    node.kill9();
    // QEMU is in its own session: the node's death does not touch it.
    assert!(running(qemu_pid), "QEMU died with the node");
    let p = wait_passes(&log, p, 1, BOOT).await;

    // Same data directory and address; the identity on disk is reused (no enrollment).
    let addr = node.addr;
    std::mem::forget(node);
    let node = Node::start(&engine, "phoenix-host", &data, None, Some(addr)).await;
    let all = node.call("Host.getAllVmStats", json!({})).await;
    let vms = all.as_array().unwrap();
    assert_eq!(vms.len(), 1, "{all}");
    assert_eq!(vms[0]["vmID"], json!(id));
    assert_eq!(vms[0]["status"]["state"], "up", "{all}");
    assert_eq!(vms[0]["pid"].as_i64().unwrap() as i32, qemu_pid);
    let info = node.call("VM.getInfo", json!({ "vmID": id })).await;
    assert_eq!(disk_buses(&info), expected_buses, "{info}");
    let st = node.call("VM.getStats", json!({ "vmID": id })).await;
    assert_eq!(
        st["balloon_target_mib"], 200,
        "the balloon target was forgotten: {st}"
    );
    // The recovered VM is fully controllable: QMP reconnected, status events flow.
    let mut events = node.c.events().await.unwrap();
    let mut next_status = async || -> String {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no status event after recovery"
            );
            if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
                if ev["method"].as_str().is_some_and(|m| m.contains("VM_status")) {
                    return ev["params"]["body"]["status"]["state"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                }
            }
        }
    };
    // Back to back: a pause undone milliseconds later is still seen, in order (an event says
    // what the status is now, so one may repeat; a change is never missed).
    let st = node.call("VM.pause", json!({ "vmID": id })).await;
    assert_eq!(st["status"]["state"], "paused", "{st}");
    let st = node.call("VM.cont", json!({ "vmID": id })).await;
    assert_eq!(st["status"]["state"], "up", "{st}");
    // (A leading "up" is the restarted node announcing the VM it found.)
    let mut seen: Vec<String> = Vec::new();
    while !(seen.contains(&"paused".to_string()) && seen.last().map(String::as_str) == Some("up")) {
        assert!(seen.len() < 10, "{seen:?}");
        let s = next_status().await;
        if seen.last() != Some(&s) {
            seen.push(s);
        }
    }
    if seen[0] == "up" {
        seen.remove(0);
    }
    assert_eq!(seen, ["paused", "up"]);
    let p = wait_passes(&log, p, 1, BOOT).await;

    // A graceful stop (SIGTERM) leaves the VM running too; the next process finds it again.
    let st = node.stop();
    assert!(st.success(), "SIGTERM exits cleanly, got {st}");
    assert!(running(qemu_pid), "a graceful node stop took its VM down");
    let node = Node::start(&engine, "phoenix-host", &data, None, Some(addr)).await;
    let all = node.call("Host.getAllVmStats", json!({})).await;
    assert_eq!(all[0]["status"]["state"], "up", "{all}");
    assert_eq!(all[0]["pid"].as_i64().unwrap() as i32, qemu_pid);
    let p = wait_passes(&log, p, 1, BOOT).await;

    // The node dies right after a live snapshot switched the disk, before recording it: the
    // next one asks QEMU and takes the overlay as the disk's leaf; the guest writes on.
    node.stop();
    let crash = [("OXVIRT_TEST_NODE_CRASH_AT", "snapshot-switched")];
    let node = Node::start_with_env(&engine, "phoenix-host", &data, None, Some(addr), &crash).await;
    connect_shared(&node, &shared).await;
    let overlay = VolUuid::new_random();
    dom.create_snapshot(img, overlay, None, "live").unwrap();
    let drive = json!({ "domainID": sd, "imageID": img, "volumeID": overlay });
    let r = node
        .c
        .call("VM.snapshot", json!({ "vmID": id, "snapDrives": [drive] }))
        .await;
    let st = node
        .died(&format!("mid-snapshot ({r:?})"), Duration::from_secs(30))
        .await;
    assert!(!st.success(), "the node was to die mid-snapshot: {st}");
    assert!(running(qemu_pid), "QEMU died with the node");
    let node = Node::start(&engine, "phoenix-host", &data, None, Some(addr)).await;
    let info = node.call("VM.getInfo", json!({ "vmID": id })).await;
    let chain = info["chains"][0].as_array().unwrap();
    let top = dom.volume_path(img, overlay);
    assert_eq!(chain.len(), 2, "{info}");
    assert_eq!(chain[1], json!(top), "the switch was lost: {info}");
    let p = wait_passes(&log, p, 1, BOOT).await;

    // The node dies right after a live merge of the overlay back into the base ended, before
    // recording it: the next one reads the chain QEMU has open and drops the merged layer;
    // asked again (the answer was lost), the merge is done.
    node.stop();
    let crash = [("OXVIRT_TEST_NODE_CRASH_AT", "merge-completed")];
    let node = Node::start_with_env(&engine, "phoenix-host", &data, None, Some(addr), &crash).await;
    connect_shared(&node, &shared).await;
    let base_vol = base.file_name().unwrap().to_str().unwrap().to_string();
    let merge =
        json!({ "vmID": id, "domainID": sd, "imageID": img, "baseVolUUID": base_vol, "topVolUUID": overlay });
    let r = node.c.call("VM.merge", merge.clone()).await;
    node.died(&format!("after the merge ({r:?})"), Duration::from_secs(60))
        .await;
    assert!(running(qemu_pid), "QEMU died with the node");
    let node = Node::start(&engine, "phoenix-host", &data, None, Some(addr)).await;
    connect_shared(&node, &shared).await;
    let start = Instant::now();
    loop {
        let info = node.call("VM.getInfo", json!({ "vmID": id })).await;
        if info["chains"][0] == json!([base]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the merge was not settled: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = node.call("VM.merge", merge).await["jobID"].clone();
    node.wait_job(&job, Duration::from_secs(30)).await.unwrap();
    wait_passes(&log, p, 1, BOOT).await;

    // And around a disk hot plug: dead after recording it but before QEMU had it, the next
    // node finds no device and drops the disk; dead right after QEMU took it, the next node
    // finds the device and keeps it. Plugging it again then changes nothing.
    let (img2, _) = new_volume(&dom, 8 << 20, VolFormat::Raw);
    let plug = json!({ "vmID": id, "drive": { "domainID": sd, "imageID": img2 } });
    let mut node = node;
    // (Counting the SATA disk.)
    for (point, disks) in [("disk-plug-recorded", 2), ("disk-plugged", 3)] {
        node.stop();
        let crash = [("OXVIRT_TEST_NODE_CRASH_AT", point)];
        let dying = Node::start_with_env(&engine, "phoenix-host", &data, None, Some(addr), &crash).await;
        connect_shared(&dying, &shared).await;
        let r = dying.c.call("VM.hotplugDisk", plug.clone()).await;
        dying
            .died(&format!("at {point} ({r:?})"), Duration::from_secs(30))
            .await;
        assert!(running(qemu_pid), "QEMU died with the node");
        node = Node::start(&engine, "phoenix-host", &data, None, Some(addr)).await;
        connect_shared(&node, &shared).await;
        let info = node.call("VM.getInfo", json!({ "vmID": id })).await;
        assert_eq!(info["disks"].as_array().unwrap().len(), disks, "{point}: {info}");
    }
    let info = node.call("VM.getInfo", json!({ "vmID": id })).await;
    let again = node.call("VM.hotplugDisk", plug).await;
    assert_eq!(again["disks"], info["disks"], "{again}");

    // The disk is copied to another domain under the writing guest (a live storage migration's
    // node half; the SPM's structure clone done here with the storage library) and the node
    // dies once the mirror job ended, before recording the switch: the next one, asked to
    // finish again, reads from QEMU that the disk runs on the copy and records it.
    let sd2 = SdUuid::new_random();
    node.call(
        "StorageDomain.create",
        json!({ "sdUUID": sd2, "connectionID": "shared", "description": "data2", "storageType": "localfs" }),
    )
    .await;
    let dom2 = FileStorageDomain::find(&shared, sd2).unwrap();
    dom.copy_image(img, &dom2, img, oxvirt_storage::CopyMode::Structure, &mut |_| {})
        .unwrap();
    // (The storage chain still has the merged overlay on top: the replica names its leaf.)
    let src = json!({ "domainID": sd, "imageID": img, "volumeID": base_vol });
    let dst = json!({ "domainID": sd2, "imageID": img, "volumeID": base_vol });
    let start = json!({ "vmID": id, "srcDisk": src, "dstDisk": dst });
    node.call("VM.diskReplicateStart", start.clone()).await;
    // Asked again: the same replica runs.
    node.call("VM.diskReplicateStart", start.clone()).await;
    let err = node
        .c
        .call(
            "VM.diskSizeExtend",
            json!({ "vmID": id, "driveSpecs": { "domainID": sd, "imageID": img }, "newSize": 64 << 20 }),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("being copied"), "{err}");
    node.stop();
    let crash = [("OXVIRT_TEST_NODE_CRASH_AT", "replica-ended")];
    let dying = Node::start_with_env(&engine, "phoenix-host", &data, None, Some(addr), &crash).await;
    connect_shared(&dying, &shared).await;
    let r = dying.c.call("VM.diskReplicateFinish", start.clone()).await;
    dying
        .died(&format!("at replica-ended ({r:?})"), Duration::from_secs(60))
        .await;
    assert!(running(qemu_pid), "QEMU died with the node");
    let node = Node::start(&engine, "phoenix-host", &data, None, Some(addr)).await;
    connect_shared(&node, &shared).await;
    let job = node.call("VM.diskReplicateFinish", start.clone()).await["jobID"].clone();
    let done = node.wait_job(&job, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done["pivoted"], true, "{done}");
    let info = node.call("VM.getInfo", json!({ "vmID": id })).await;
    let moved = vec![dom2.volume_path(img, base_vol.parse().unwrap())];
    assert_eq!(info["chains"][0], json!(moved), "{info}");
    assert_eq!(info["disks"][0]["image"]["sd"], json!(sd2), "{info}");
    // Asked once more (an answer lost): done.
    let job = node.call("VM.diskReplicateFinish", start).await["jobID"].clone();
    let again = node.wait_job(&job, Duration::from_secs(30)).await.unwrap();
    assert_eq!(again["pivoted"], true, "{again}");
    wait_passes(&log, p, 1, BOOT).await;
    node.call("VM.destroy", json!({ "vmID": id })).await;
    assert!(!running(qemu_pid), "QEMU survived VM.destroy");
    verify_writer_data(moved.last().unwrap());
}

/// KSM through the node verbs, read back from sysfs; restored afterwards. A kernel without
/// KSM must give a clear error instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ksm_is_reported_and_tuned_through_the_node_api() {
    const SYSFS: &str = "/sys/kernel/mm/ksm";
    let engine = start_engine().await;
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&engine, "ksm-host", &tmp.path().join("n"), None, None).await;
    let sys = |k: &str| -> u64 {
        std::fs::read_to_string(Path::new(SYSFS).join(k))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let tune = json!({ "tuningParams": { "run": 1, "pages_to_scan": 123, "sleep_millisecs": 45 } });
    if !Path::new(SYSFS).join("run").exists() {
        let stats = node.call("Host.getStats", json!({})).await;
        assert!(stats["ksm"].is_null(), "{stats}");
        assert!(
            stats["ksmError"].as_str().unwrap().contains("CONFIG_KSM"),
            "{stats}"
        );
        let err = node.c.call("Host.setKsmTune", tune).await.unwrap_err();
        assert!(err.to_string().contains("not available"), "{err}");
        return;
    }
    let before = (sys("run"), sys("pages_to_scan"), sys("sleep_millisecs"));
    // Restores the host's KSM settings however the test ends.
    struct Restore((u64, u64, u64));
    impl Drop for Restore {
        fn drop(&mut self) {
            let (run, pages, sleep) = self.0;
            for (k, v) in [("pages_to_scan", pages), ("sleep_millisecs", sleep), ("run", run)] {
                let _ = std::fs::write(Path::new(SYSFS).join(k), v.to_string());
            }
        }
    }
    let _restore = Restore(before);
    let stats = node.call("Host.getStats", json!({})).await;
    assert_eq!(stats["ksm"]["run"], before.0, "{stats}");
    assert_eq!(stats["ksm"]["pages_to_scan"], before.1, "{stats}");
    assert_eq!(stats["ksm"]["ksmState"], before.0 == 1, "{stats}");

    let st = node.call("Host.setKsmTune", tune.clone()).await;
    assert_eq!(
        (st["run"].as_u64(), st["pages_to_scan"].as_u64()),
        (Some(1), Some(123)),
        "{st}"
    );
    assert_eq!(
        (sys("run"), sys("pages_to_scan"), sys("sleep_millisecs")),
        (1, 123, 45)
    );
    let stats = node.call("Host.getStats", json!({})).await;
    assert_eq!(stats["ksm"]["ksmState"], true, "{stats}");
    assert_eq!(stats["ksmRunning"], true, "{stats}");
    assert_eq!(stats["ksm"]["ksmPages"], 123, "{stats}");
    // Bad input is refused and changes nothing.
    for bad in [
        json!({ "tuningParams": { "run": 0, "pages_to_scan": 0 } }),
        json!({ "tuningParams": { "run": 7 } }),
        json!({ "tuningParams": { "sleep_millisecs": 45, "npages": 1 } }),
    ] {
        let err = node.c.call("Host.setKsmTune", bad.clone()).await.unwrap_err();
        assert!(
            matches!(err, oxvirt_rpc::ClientError::Rpc(ref e) if e.code == 1000 || e.code == -32602),
            "{bad}: {err}"
        );
    }
    assert_eq!(
        (sys("run"), sys("pages_to_scan"), sys("sleep_millisecs")),
        (1, 123, 45)
    );
    let st = node
        .call("Host.setKsmTune", json!({ "tuningParams": { "run": 0 } }))
        .await;
    assert_eq!(st["ksmState"], false, "{st}");
    assert_eq!(sys("run"), 0);
    // Back to what the host had, through the API.
    node.call(
        "Host.setKsmTune",
        json!({ "tuningParams": { "run": before.0, "pages_to_scan": before.1, "sleep_millisecs": before.2 } }),
    )
    .await;
    assert_eq!((sys("run"), sys("pages_to_scan"), sys("sleep_millisecs")), before);
}

/// Issue 6's thin-disk path across real nodes: host 1 is the SPM, host 2 runs a VM whose disk is
/// a sparse qcow2 volume created with an 8 MiB allocation (`initialSize`, as a fresh LV) and
/// capped at its file's length by a loop device. The guest writes 40 MiB: each write-threshold
/// event on host 2 becomes a mailbox request that host 1 serves; host 2 refreshes its device,
/// re-arms the threshold, and resumes the guest if it stopped on ENOSPC. The guest never sees a
/// write error, and every byte it wrote is on storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_disk_on_a_host_that_is_not_spm_grows_through_the_mailbox() {
    const MIB: u64 = 1 << 20;
    let engine = start_engine().await;
    let tmp = tempfile::tempdir().unwrap();
    let spm = Node::start(&engine, "spm-host", &tmp.path().join("a"), None, None).await;
    let hsm = Node::start(&engine, "hsm-host", &tmp.path().join("b"), None, None).await;
    let shared = tmp.path().join("shared");
    let (pool, sd) = pool_of(&spm, &hsm, &shared).await;

    // The HSM may not create volumes; the SPM creates the thin one.
    let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
    let create = json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "size": 64 * MIB,
                         "volFormat": "COW", "preallocate": "SPARSE", "volUUID": vol,
                         "initialSize": 8 * MIB });
    let e = hsm.c.call("Volume.create", create.clone()).await.unwrap_err();
    assert!(e.to_string().contains("not the SPM"), "{e}");
    let task = spm.call("Volume.create", create).await;
    wait_task(&spm, &task, Duration::from_secs(30)).await;
    let path = shared
        .join(sd.to_string())
        .join("images")
        .join(img.to_string())
        .join(vol.to_string());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);

    let g = TestGuest::get();
    let id = VmId::new_random();
    let params = json!({
        "vmID": id, "vmName": "thin", "smp": 1, "memSize": 256, "vnc": false,
        "boot": { "kernel": g.kernel, "initrd": g.initrd,
                  "cmdline": TestGuest::append(&["oxvirt.write_mib=40", "oxvirt.marker=done"]) },
        "drives": [{ "domainID": sd, "imageID": img,
                     "thin": { "chunk_bytes": 16 * MIB, "free_margin_bytes": 6 * MIB,
                               "max_bytes": 80 * MIB } }],
    });
    hsm.call("VM.create", params.clone()).await;
    let log = hsm.console_log(id);
    let text = tokio::task::spawn_blocking(move || {
        oxvirt_testkit::wait_for_text(&log, "OXVIRT-MARKER done", Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await
    .unwrap();
    assert!(text.contains("OXVIRT-GUEST wrote 40 MiB"), "console:\n{text}");
    assert!(!text.contains("write failed"), "console:\n{text}");

    let stats = hsm.call("VM.getStats", json!({ "vmID": id })).await;
    assert_eq!(stats["status"]["state"], "up", "{stats}");
    let extends = stats["thin_extends"].as_u64().unwrap();
    assert!(extends >= 2, "40 MiB through 16 MiB chunks from 8 MiB: {stats}");
    // The HSM did not grow the file itself: the SPM's mailbox served every extend.
    let info = spm.call("StoragePool.getInfo", json!({ "spUUID": pool })).await;
    let served = info["mailbox"]["requests"].as_u64().unwrap();
    assert!(
        served >= extends,
        "SPM served {served} requests for {extends} extends: {info}"
    );
    let size = std::fs::metadata(&path).unwrap().len();
    assert!((40 * MIB..=80 * MIB).contains(&size), "volume file {size} bytes");

    // Migrated to the SPM's host. The source may grow the volume while the stream runs; the
    // destination's loop device, sized when it was prepared, would not see it (reads past its
    // end are zeros). Here the volume grows, as the SPM grows it for the source, between the
    // destination's preparation and the stream: the destination refreshes before it runs.
    let inc = spm.call("VM.migrationCreate", params.clone()).await;
    let grown = size + 16 * MIB;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(grown)
        .unwrap();
    let job = hsm
        .call(
            "VM.migrate",
            json!({ "vmID": id, "dstUri": inc["uri"], "maxDowntimeMs": 300, "timeoutSecs": 90 }),
        )
        .await["jobID"]
        .clone();
    hsm.wait_job(&job, Duration::from_secs(120)).await.unwrap();
    spm.wait_state(id, "up", Duration::from_secs(30)).await;
    let rec: Value =
        serde_json::from_str(&std::fs::read_to_string(spm.vm_dir(id).join("vm.json")).unwrap()).unwrap();
    let dev = rec["loops"][0]["device"].as_str().unwrap().to_string();
    assert_eq!(
        oxvirt_node::vm::thin::device_size(Path::new(&dev)).unwrap(),
        grown,
        "the destination's device kept the size it had when prepared"
    );

    spm.call("VM.destroy", json!({ "vmID": id })).await;
    let out = Command::new(require_tool("qemu-io"))
        .args(["-r", "-f", "qcow2", "-c", "read -P 0x5a 0 40M"])
        .arg(&path)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !t.contains("Pattern verification failed"),
        "{t}"
    );
}

/// A pool on `shared` (created here) with one domain: `spm` is host 1 and the SPM, `other`
/// host 2; both connected with io_timeout 1 s and fence margin 2 s.
async fn pool_of(spm: &Node, other: &Node, shared: &Path) -> (oxvirt_types::PoolUuid, SdUuid) {
    std::fs::create_dir(shared).unwrap();
    for n in [spm, other] {
        connect_shared(n, shared).await;
    }
    let (pool, sd) = (oxvirt_types::PoolUuid::new_random(), SdUuid::new_random());
    spm.call(
        "StorageDomain.create",
        json!({ "sdUUID": sd, "connectionID": "shared", "description": "data", "storageType": "localfs" }),
    )
    .await;
    spm.call(
        "StoragePool.create",
        json!({ "spUUID": pool, "poolName": "dc1", "masterDom": sd, "masterVersion": 1 }),
    )
    .await;
    // Together: each waits out its host id's acquisition delay.
    let (a, b) = tokio::join!(
        spm.c.call("StoragePool.connect", pool_connect(pool, sd, 1)),
        other.c.call("StoragePool.connect", pool_connect(pool, sd, 2))
    );
    a.unwrap();
    b.unwrap();
    let task = spm
        .call(
            "StoragePool.spmStart",
            json!({ "spUUID": pool, "prevID": -1, "prevLver": -1 }),
        )
        .await;
    wait_task(spm, &task, Duration::from_secs(30)).await;
    let st = other
        .call("StoragePool.getSpmStatus", json!({ "spUUID": pool }))
        .await;
    assert_eq!(st["spm_st"]["spmId"], 1, "{st}");
    (pool, sd)
}

fn pool_connect(pool: oxvirt_types::PoolUuid, sd: SdUuid, host_id: u64) -> Value {
    json!({ "spUUID": pool, "hostID": host_id, "msdUUID": sd, "masterVersion": 1,
            "ioTimeout": 1, "fenceMargin": 2, "maxHostID": 8 })
}

/// Polls an SPM task until it succeeds (a failure fails the test with its message).
async fn wait_task(n: &Node, task: &Value, limit: Duration) {
    let start = Instant::now();
    loop {
        let st = n.call("Task.getStatus", json!({ "taskID": task })).await["taskStatus"].clone();
        match st["taskState"].as_str() {
            Some("running") => {}
            _ => {
                assert_eq!(st["taskResult"], "success", "{}: task {task}: {st}", n.name);
                return;
            }
        }
        assert!(
            start.elapsed() < limit,
            "{}: task {task} still running: {st}",
            n.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The generation of host `host_id`'s delta lease in domain `sd`'s lockspace.
fn host_generation(shared: &Path, sd: SdUuid, host_id: u64) -> u64 {
    let ids = shared.join(sd.to_string()).join("dom_md/ids");
    let all = oxvirt_lease::direct::read_lockspace(&ids, 0).unwrap();
    all[host_id as usize - 1]
        .record
        .as_ref()
        .unwrap()
        .owner_generation
}

/// A node holding an HA VM's lease is killed with SIGKILL and restarted within its host id's
/// validity: it resumes the host id with the same generation (a new one would tell every
/// other host the lease's owner is gone), takes the lease back for the VM that kept running,
/// and meanwhile the other host's attempts to start the same VM fail on the lease. After 8N + M
/// the VM still runs (the fence watchdog saw the new process renew); destroying it frees the
/// lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_leased_vm_and_nobody_can_start_it_twice() {
    let engine = start_engine().await;
    let tmp = tempfile::tempdir().unwrap();
    let spm = Node::start(&engine, "spm-host", &tmp.path().join("a"), None, None).await;
    let data = tmp.path().join("b");
    let mut runner = Node::start(&engine, "runner-host", &data, None, None).await;
    let shared = tmp.path().join("shared");
    let (pool, sd) = pool_of(&spm, &runner, &shared).await;
    let (img, leaf) = (ImgUuid::new_random(), VolUuid::new_random());
    let task = spm
        .call(
            "Volume.create",
            json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "size": 32 << 20, "volFormat": "COW",
                    "preallocate": "SPARSE", "volUUID": leaf }),
        )
        .await;
    wait_task(&spm, &task, Duration::from_secs(30)).await;
    let id = VmId::new_random();
    spm.call("Lease.create", json!({ "sdUUID": sd, "leaseID": id }))
        .await;
    let mut params = vm_params(id, "ha", sd, img);
    params["lease"] = json!({ "sdUUID": sd });
    let info = runner.call("VM.create", params.clone()).await;
    let qemu_pid = info["pid"].as_i64().unwrap() as i32;
    let log = runner.console_log(id);
    let p = wait_passes(&log, 0, 1, BOOT).await;
    let lease = async || {
        spm.call("Lease.info", json!({ "sdUUID": sd, "leaseID": id }))
            .await
    };
    assert_eq!(lease().await["owner"], 2);
    // The running VM also holds the lease of the volume it writes.
    let vref = json!({ "sdUUID": sd, "imgUUID": img, "volUUID": leaf });
    let vol_owner = async || spm.call("Volume.getLeaseStatus", vref.clone()).await["owner"].clone();
    assert_eq!(vol_owner().await, 2);
    let e = spm.c.call("Volume.acquireLease", vref.clone()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("volume {leaf} is locked by host 2")),
        "{e}"
    );
    let e = runner
        .c
        .call("Volume.releaseLease", vref.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&format!("belongs to VM {id}")), "{e}");
    // Nor does the SPM delete the volume, or its image, under the running guest.
    let mut del = vref.clone();
    del["spUUID"] = json!(pool);
    let e = spm.c.call("Volume.delete", del.clone()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("volume {leaf} is in use: its lease is held by host 2")),
        "{e}"
    );
    del.as_object_mut().unwrap().remove("volUUID");
    let e = spm.c.call("Image.delete", del).await.unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    assert_eq!(vol_owner().await, 2, "the refused deletes changed nothing");
    let generation = host_generation(&shared, sd, 2);

    // The other host may not start the VM while host 2 holds its lease.
    let try_twice = async |why: &str| {
        let e = spm.c.call("VM.create", params.clone()).await.unwrap_err();
        assert!(e.to_string().contains("owned by host 2"), "{why}: {e}");
        let all = spm.call("Host.getAllVmStats", json!({})).await;
        assert!(
            all.as_array().unwrap().is_empty(),
            "{why}: a second copy runs: {all}"
        );
    };
    try_twice("while the runner is up").await;

    runner.kill9();
    assert!(running(qemu_pid), "QEMU died with the node");
    try_twice("with the runner dead").await;
    let addr = runner.addr;
    std::mem::forget(runner);
    let t0 = Instant::now();
    let runner = Node::start(&engine, "runner-host", &data, None, Some(addr)).await;
    // With the engine away, the VM that outlived the old process makes the new one reconnect
    // the storage and the pool it had by itself, and take its leases back, before it serves.
    let took = t0.elapsed();
    if let Err(e) = runner
        .c
        .call("StoragePool.getInfo", json!({ "spUUID": pool }))
        .await
    {
        panic!("the restarted node did not reconnect its pool by itself: {e}");
    }
    assert!(took < Duration::from_secs(6), "resuming took {took:?}");
    assert_eq!(
        host_generation(&shared, sd, 2),
        generation,
        "the restarted node resumed its host id"
    );
    eprintln!("a restarted node reconnected its pool by itself in {took:?}");
    // When the engine comes and tells it again, its requests find everything connected.
    connect_shared(&runner, &shared).await;
    runner
        .call("StoragePool.connect", pool_connect(pool, sd, 2))
        .await;
    assert_eq!(host_generation(&shared, sd, 2), generation);
    try_twice("after the restart").await;

    // Past 8N + M from the kill: the VM still runs and writes, its lease still host 2's.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(t0.elapsed())).await;
    assert!(
        running(qemu_pid),
        "the fence watchdog killed a VM whose node came back"
    );
    wait_passes(&log, p, 1, BOOT).await;
    assert_eq!(lease().await["owner"], 2);
    assert_eq!(vol_owner().await, 2);
    try_twice("after 8N + M").await;

    // Migration hands the leases over: the destination QEMU waits paused (-S) after the
    // stream until the source has given them up and it holds them, then the guest runs.
    let rep = migrate(&runner, &spm, id, &params, 0).await.unwrap();
    spm.wait_state(id, "up", Duration::from_secs(30)).await;
    let waited = spm.call("VM.getStats", json!({ "vmID": id })).await["lease_wait_ms"].clone();
    eprintln!(
        "leased VM migration host 2 -> host 1: total {} ms, downtime {} ms + lease handover {waited} ms",
        rep["total_ms"], rep["downtime_ms"]
    );
    assert!(
        waited.as_u64().is_some(),
        "the destination did not wait for the leases"
    );
    let dst_pid = spm.call("VM.getInfo", json!({ "vmID": id })).await["pid"]
        .as_u64()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{dst_pid}/cmdline")).unwrap();
    assert!(
        cmdline.split(|b| *b == 0).any(|a| a == b"-S"),
        "the destination of a leased VM must start paused"
    );
    assert_eq!(lease().await["owner"], 1);
    assert_eq!(vol_owner().await, 1);
    runner.call("VM.destroy", json!({ "vmID": id })).await;
    wait_passes(&spm.console_log(id), 0, 1, BOOT).await;

    // Destroyed and at once started again on the same host: the leases are back before the
    // destroy answers, and the first instance's late "down" never takes the second's.
    spm.call("VM.destroy", json!({ "vmID": id })).await;
    assert!(
        lease().await["owner"].is_null() && vol_owner().await.is_null(),
        "a destroyed VM's leases are given back before the answer"
    );
    spm.call("VM.create", params.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lease().await["owner"], 1, "the restarted VM lost its VM lease");
    assert_eq!(vol_owner().await, 1, "the restarted VM lost its volume lease");

    spm.call("VM.destroy", json!({ "vmID": id })).await;
    let start = Instant::now();
    while !lease().await["owner"].is_null() || !vol_owner().await.is_null() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the leases were not released with the VM: {} / {}",
            lease().await,
            vol_owner().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(runner);
}

/// Hibernation: `VM.hibernate` pauses the guest, saves its whole state to a volume and ends
/// QEMU (down, `saved`); `VM.create` with `restoreState` brings the same guest back where it was
/// — its writer goes on counting passes, nothing boots again — and the data it wrote is intact.
/// A state volume that does not hold a state is refused and leaves nothing running. The
/// hibernate and dehibernate hooks run around each, never the migration ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_vm_comes_back_where_it_was() {
    let engine = start_engine().await;
    let tmp = tempfile::tempdir().unwrap();
    let hooks = tmp.path().join("hooks");
    let hook_log = tmp.path().join("hooks.log");
    for point in [
        "before_vm_start",
        "before_vm_hibernate",
        "after_vm_hibernate",
        "before_vm_dehibernate",
        "after_vm_dehibernate",
        "before_vm_migrate_destination",
        "after_vm_migrate_destination",
    ] {
        logging_hook(&hooks, point, &hook_log);
    }
    let node = Node::start(&engine, "sleepy-host", &tmp.path().join("n"), Some(&hooks), None).await;
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let (sd, img, volume) = shared_disk(&[&node], &shared).await;
    let dom = FileStorageDomain::find(&shared, sd).unwrap();
    let (simg, svol) = new_volume(&dom, 512 << 20, VolFormat::Raw);
    let state = json!({ "sdUUID": sd, "imgUUID": simg, "volUUID": svol });

    let id = VmId::new_random();
    let mut params = vm_params(id, "sleepy", sd, img);
    // Two user-mode NICs; the first is unplugged before the save, so the second sits where
    // a fresh start would not put it, and the restore must put it back there.
    let (mac1, mac2) = ("56:6f:00:00:21:01", "56:6f:00:00:21:02");
    params["nics"] = json!([{ "mac": mac1 }, { "mac": mac2 }]);
    let t0 = Instant::now();
    let info = node.call("VM.create", params.clone()).await;
    // The same call as the restore's below, from the same node: the baseline for its figure.
    eprintln!("plain start: up after {:?}", t0.elapsed());
    let qemu_pid = info["pid"].as_i64().unwrap() as i32;
    let log = node.console_log(id);
    let before = wait_passes(&log, 0, 2, BOOT).await;
    let booted = std::fs::read_to_string(&log).unwrap();
    assert!(booted.contains("OXVIRT-GUEST ready"), "{booted}");
    node.call("VM.hotunplugNic", json!({ "vmID": id, "mac": mac1 }))
        .await;
    params["nics"] = json!([{ "mac": mac2 }]);
    // A disk hot plugged before the save takes slot 1; the restore lists it first (a fresh
    // start would give it slot 0): the state puts it back where it was.
    let (img2, _) = new_volume(&dom, 8 << 20, VolFormat::Raw);
    node.call(
        "VM.hotplugDisk",
        json!({ "vmID": id, "drive": { "domainID": sd, "imageID": img2 } }),
    )
    .await;
    params["drives"] = json!([{ "domainID": sd, "imageID": img2 }, { "domainID": sd, "imageID": img }]);

    // A full disk under the state volume: the save fails and the guest runs on.
    let state_path = dom.volume_path(simg, svol);
    let kept = state_path.with_extension("kept");
    std::fs::rename(&state_path, &kept).unwrap();
    std::os::unix::fs::symlink("/dev/full", &state_path).unwrap();
    let job = node
        .call("VM.hibernate", json!({ "vmID": id, "hibernationVolume": state }))
        .await["jobID"]
        .clone();
    let err = node.wait_job(&job, Duration::from_secs(120)).await.unwrap_err();
    assert!(err.contains(&state_path.display().to_string()), "{err}");
    assert_eq!(
        node.state(id).await["state"],
        "up",
        "a failed save stopped the guest"
    );
    let before = wait_passes(&log, before, 1, BOOT).await;
    std::fs::remove_file(&state_path).unwrap();
    std::fs::rename(&kept, &state_path).unwrap();

    let t0 = Instant::now();
    let job = node
        .call("VM.hibernate", json!({ "vmID": id, "hibernationVolume": state }))
        .await["jobID"]
        .clone();
    let saved = node.wait_job(&job, Duration::from_secs(120)).await.unwrap();
    let took = t0.elapsed();
    let st = node.state(id).await;
    assert_eq!(
        (st["state"].as_str(), st["reason"]["kind"].as_str()),
        (Some("down"), Some("saved")),
        "{st}"
    );
    assert!(!running(qemu_pid), "QEMU still runs after hibernation");
    let bytes = saved["bytes"].as_u64().unwrap();
    assert!(bytes > 1 << 20, "{saved}");
    assert_eq!(
        std::fs::metadata(dom.volume_path(simg, svol)).unwrap().len(),
        bytes
    );
    eprintln!("hibernate: {bytes} bytes of state in {took:?} ({saved})");
    node.call("VM.destroy", json!({ "vmID": id })).await;

    // A volume without a state: refused, nothing left behind.
    let (eimg, evol) = new_volume(&dom, 1 << 20, VolFormat::Raw);
    let mut bad = params.clone();
    bad["restoreState"] = json!({ "sdUUID": sd, "imgUUID": eimg, "volUUID": evol });
    assert!(node.c.call("VM.create", bad).await.is_err());
    let all = node.call("Host.getAllVmStats", json!({})).await;
    assert!(all.as_array().unwrap().is_empty(), "{all}");

    // Other NICs than the saved guest's: refused before QEMU starts.
    let mut other = params.clone();
    other["nics"] = json!([{ "mac": mac1 }, { "mac": mac2 }]);
    other["restoreState"] = state.clone();
    let e = node.c.call("VM.create", other).await.unwrap_err().to_string();
    assert!(e.contains("saved with NICs"), "{e}");
    let mut other = params.clone();
    other["drives"] = json!([{ "domainID": sd, "imageID": img }]);
    other["restoreState"] = state.clone();
    let e = node.c.call("VM.create", other).await.unwrap_err().to_string();
    assert!(e.contains("saved with the disks"), "{e}");
    let all = node.call("Host.getAllVmStats", json!({})).await;
    assert!(all.as_array().unwrap().is_empty(), "{all}");

    let t0 = Instant::now();
    let mut restore = params.clone();
    restore["restoreState"] = state;
    let info = node.call("VM.create", restore).await;
    assert_eq!(info["status"]["state"], "up", "{info}");
    eprintln!("restore: up after {:?}", t0.elapsed());
    let slot_of = |img: ImgUuid| {
        info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["image"]["img"] == json!(img))
            .map(|d| d["slot"].clone())
    };
    assert_eq!(
        (slot_of(img), slot_of(img2)),
        (Some(json!(0)), Some(json!(1))),
        "the disks came back on other slots: {info}"
    );
    // The same guest: its writer continues from its last pass; no kernel boots.
    let after = wait_passes(&log, 0, 1, BOOT).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("OXVIRT-GUEST ready"),
        "the guest booted again:\n{text}"
    );
    let first: usize = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("OXVIRT-GUEST pass ")?.trim().parse().ok())
        .unwrap();
    assert!(
        first >= before,
        "pass {first} after {before} passes before: the writer restarted"
    );
    assert!(after >= 1);
    node.call("VM.destroy", json!({ "vmID": id })).await;
    verify_writer_data(&volume);
    // Start; a failed save and a good one; a refused restore and a good one.
    let ran = std::fs::read_to_string(&hook_log).unwrap();
    assert_eq!(
        ran.lines().collect::<Vec<_>>(),
        [
            "before_vm_start sleepy",
            "before_vm_hibernate sleepy",
            "before_vm_hibernate sleepy",
            "after_vm_hibernate sleepy",
            "before_vm_dehibernate sleepy",
            "before_vm_dehibernate sleepy",
            "after_vm_dehibernate sleepy",
        ],
        "{ran}"
    );
}
