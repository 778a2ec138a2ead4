//! The `oxvirt` client subcommands (login, list/show/create/remove, actions, completion) run as
//! the real binary against an in-process engine serving the REST API on its real HTTPS
//! listener; the VM test adds a real `oxvirt node` and boots the test guest under TCG.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::free_port;
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_testkit::TestGuest;
use serde_json::Value;

const PASSWORD: &str = "cli-test password";

struct Live {
    engine: Arc<Engine>,
    engine_dir: PathBuf,
    /// The session file the CLI keeps.
    session: PathBuf,
    work: tempfile::TempDir,
    _engine_tmp: tempfile::TempDir,
}

async fn start() -> Live {
    let engine_tmp = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        data_dir: engine_tmp.path().to_path_buf(),
        db_url: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_password: Some(PASSWORD.into()),
        settings: common::fast_engine_settings(),
    };
    let engine = Engine::start(cfg, Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    Live {
        engine,
        engine_dir: engine_tmp.path().to_path_buf(),
        session: work.path().join("config/oxvirt/cli.json"),
        work,
        _engine_tmp: engine_tmp,
    }
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Live {
    fn url(&self) -> String {
        format!("https://{}", self.engine.addr)
    }

    /// Runs `oxvirt ARGS` with this test's session file and HOME.
    async fn run(&self, args: &[&str]) -> Run {
        let started = Instant::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oxvirt"))
            .args(args)
            .env("OXVIRT_CLI_CONFIG", &self.session)
            .env("HOME", self.work.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("OXVIRT_URL")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(240), out)
            .await
            .unwrap_or_else(|_| panic!("oxvirt {args:?} did not finish within 240 s"))
            .unwrap();
        let r = Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "oxvirt {} ({:.1} s, exit {:?})",
            args.join(" "),
            started.elapsed().as_secs_f64(),
            r.code
        );
        r
    }

    async fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args).await;
        assert!(r.ok, "oxvirt {args:?} failed: {r}");
        r
    }

    async fn fails(&self, args: &[&str]) -> Run {
        let r = self.run(args).await;
        assert!(
            !r.ok && r.code.is_some_and(|c| c != 0),
            "oxvirt {args:?} should fail: {r}"
        );
        r
    }

    fn password_file(&self, pw: &str) -> PathBuf {
        let p = self.work.path().join(format!("pw-{}", pw.len()));
        std::fs::write(&p, format!("{pw}\n")).unwrap();
        p
    }

    async fn login(&self, extra: &[&str]) -> Run {
        let pw = self.password_file(PASSWORD);
        let url = self.url();
        let mut args = vec!["login", "--url", &url, "--user", "admin@internal"];
        args.extend(["--password-file", pw.to_str().unwrap()]);
        args.extend(extra);
        self.ok(&args).await
    }
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {list}"))
        .iter()
        .map(|o| o["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The table line whose first cell is `first`.
fn row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_objects_output_and_completion() {
    let started = Instant::now();
    let live = start().await;
    let url = live.url();
    let ca = live.engine_dir.join("pki/ca.pem");
    let ca = ca.to_str().unwrap();
    let fp = live.engine.ca_fingerprint();

    // Not logged in: a clear error.
    let r = live.fails(&["datacenter", "list"]).await;
    assert!(r.stderr.contains("not logged in"), "{r}");

    // A wrong password: refused with the engine's reason, nothing stored.
    let bad = live.password_file("wrong");
    let r = live
        .fails(&[
            "login",
            "--url",
            &url,
            "--password-file",
            bad.to_str().unwrap(),
            "--ca-file",
            ca,
        ])
        .await;
    assert!(
        r.stderr.contains("refused") && r.stderr.contains("incorrect"),
        "{r}"
    );
    assert!(!live.session.exists(), "a failed login stored a session");
    // No way to check the engine given: refused before any password is read.
    let r = live.fails(&["login", "--url", &url]).await;
    assert!(r.stderr.contains("--ca-file"), "{r}");
    // A CA fingerprint that does not match: refused.
    let pw = live.password_file(PASSWORD);
    let r = live
        .fails(&[
            "login",
            "--url",
            &url,
            "--password-file",
            pw.to_str().unwrap(),
            "--ca-fingerprint",
            &"00".repeat(32),
        ])
        .await;
    assert!(r.stderr.contains("refusing to trust"), "{r}");
    assert!(!live.session.exists());
    // No terminal and no password file: a clear error.
    let r = live.fails(&["login", "--url", &url, "--insecure"]).await;
    assert!(r.stderr.contains("--password-file"), "{r}");

    // The right password with the engine's CA (pinned by fingerprint).
    let r = live.login(&["--ca-fingerprint", &fp]).await;
    assert!(r.stdout.contains("logged in to"), "{r}");
    let meta = std::fs::metadata(&live.session).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let stored = std::fs::read_to_string(&live.session).unwrap();
    assert!(!stored.contains(PASSWORD), "the password was stored");
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert!(stored["ca_pem"].as_str().unwrap().contains("BEGIN CERTIFICATE"));

    // Data center: create, list (table and JSON), show by name and id, duplicate refused.
    let r = live
        .ok(&["datacenter", "create", "cli-dc", "--description", "from the CLI"])
        .await;
    assert!(r.stdout.contains("uninitialized"), "{r}");
    let r = live.ok(&["dc", "list", "-o", "json"]).await;
    let list = r.json();
    assert!(names(&list).contains(&"cli-dc".to_string()), "{r}");
    let dc_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "cli-dc")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = live.ok(&["dc", "list"]).await;
    assert!(r.stdout.starts_with("NAME "), "{r}");
    let line = row(&r.stdout, "cli-dc");
    assert!(
        line.contains(&dc_id) && line.contains("uninitialized") && line.contains("from the CLI"),
        "{line}"
    );
    let r = live.ok(&["dc", "show", "cli-dc", "-o", "json"]).await;
    assert_eq!(r.json()["id"], dc_id.as_str());
    let r = live.ok(&["dc", "show", &dc_id]).await;
    assert!(row(&r.stdout, "name").contains("cli-dc"), "{r}");
    let r = live.fails(&["dc", "create", "cli-dc"]).await;
    assert!(r.stderr.contains("409"), "{r}");
    let r = live
        .ok(&["dc", "list", "--search", "name=cli-*", "-o", "json"])
        .await;
    assert_eq!(names(&r.json()), ["cli-dc"]);

    // Cluster in it: the table names the data center.
    live.ok(&[
        "cluster",
        "create",
        "cli-cl",
        "--datacenter",
        "cli-dc",
        "--cpu-type",
        "qemu64",
    ])
    .await;
    let r = live.ok(&["cluster", "list"]).await;
    let line = row(&r.stdout, "cli-cl");
    assert!(line.contains("cli-dc") && line.contains("qemu64"), "{line}");
    let r = live
        .fails(&["cluster", "create", "x", "--datacenter", "no-such-dc"])
        .await;
    assert!(r.stderr.contains("no data center named \"no-such-dc\""), "{r}");
    let r = live.ok(&["cluster", "list", "-o", "json"]).await;
    assert!(!names(&r.json()).contains(&"x".to_string()));

    // Unknown objects and bad searches are errors naming what failed.
    let r = live.fails(&["vm", "show", "nosuch"]).await;
    assert!(r.stderr.contains("no VM named \"nosuch\""), "{r}");
    let r = live.fails(&["vm", "list", "--search", "colour=blue"]).await;
    assert!(r.stderr.contains("colour") && r.stderr.contains("400"), "{r}");
    let r = live
        .fails(&["vm", "create", "v", "--cluster", "cli-cl", "--memory", "12Q"])
        .await;
    assert!(r.stderr.contains("unknown unit"), "{r}");
    let r = live.ok(&["vm", "list", "-o", "json"]).await;
    assert_eq!(r.json(), serde_json::json!([]));

    // Templates, jobs and events read in both formats.
    let r = live.ok(&["template", "list"]).await;
    assert!(
        row(&r.stdout, "Blank").contains("00000000-0000-0000-0000-000000000000"),
        "{r}"
    );
    let r = live.ok(&["event", "list", "-o", "json", "--max", "5"]).await;
    assert!(r.json().as_array().is_some(), "{r}");
    let r = live.ok(&["job", "list"]).await;
    assert!(r.stdout.starts_with("ID "), "{r}");
    let r = live
        .fails(&["job", "retry", "8d1c3a52-0c8e-4f55-9a53-1f0e8b6c2d11"])
        .await;
    assert!(
        r.stderr
            .contains("retry job 8d1c3a52-0c8e-4f55-9a53-1f0e8b6c2d11 failed")
            && r.stderr.contains("not found"),
        "{r}"
    );

    // Tags: a tree, on the Blank template, found by search, removed with their subtree.
    live.ok(&["tag", "create", "cli-web", "--description", "front ends"])
        .await;
    live.ok(&["tag", "create", "cli-prod", "--parent", "cli-web"])
        .await;
    let r = live.ok(&["tag", "list"]).await;
    assert!(
        row(&r.stdout, "cli-prod").contains("cli-web"),
        "the parent by name: {r}"
    );
    assert!(
        row(&r.stdout, "root").contains("00000000-0000-0000-0000-000000000000"),
        "{r}"
    );
    let r = live
        .fails(&["tag", "create", "cli-x", "--parent", "nosuch"])
        .await;
    assert!(r.stderr.contains("no tag named \"nosuch\""), "{r}");
    let r = live.fails(&["tag", "assign", "cli-prod"]).await;
    assert!(
        r.stderr.contains("--vm") && r.stderr.contains("--template"),
        "one target: {r}"
    );
    live.ok(&["tag", "assign", "cli-prod", "--template", "Blank"])
        .await;
    let r = live
        .fails(&["tag", "assign", "cli-prod", "--template", "Blank"])
        .await;
    assert!(r.stderr.contains("on it already"), "{r}");
    let r = live.ok(&["tag", "of", "--template", "Blank", "-o", "json"]).await;
    assert_eq!(names(&r.json()), ["cli-prod"], "{r}");
    let r = live
        .fails(&["tag", "update", "cli-web", "--parent", "cli-prod"])
        .await;
    assert!(r.stderr.contains("cannot move under itself"), "{r}");
    live.ok(&["tag", "rm", "cli-web"]).await;
    let r = live.ok(&["tag", "of", "--template", "Blank", "-o", "json"]).await;
    assert_eq!(r.json(), serde_json::json!([]), "the subtree came off: {r}");
    let r = live.ok(&["tag", "list", "-o", "json"]).await;
    assert_eq!(names(&r.json()), ["root"], "{r}");

    // Removal: the cluster, then the data center.
    let r = live.ok(&["cluster", "remove", "cli-cl"]).await;
    assert!(r.stdout.contains("cluster cli-cl removed"), "{r}");
    live.ok(&["dc", "rm", "cli-dc"]).await;
    let r = live.fails(&["dc", "show", "cli-dc"]).await;
    assert!(r.stderr.contains("no data center named"), "{r}");
    assert!(live
        .engine
        .app()
        .db
        .dc_get_by_name("cli-dc")
        .await
        .unwrap()
        .is_none());

    // Completion scripts for three shells.
    for (shell, marker) in [
        ("bash", "complete"),
        ("zsh", "#compdef oxvirt"),
        ("fish", "complete -c oxvirt"),
    ] {
        let r = live.ok(&["completion", shell]).await;
        assert!(
            r.stdout.contains(marker),
            "{shell}: {}",
            &r.stdout[..r.stdout.len().min(300)]
        );
        assert!(
            r.stdout.contains("storagedomain") && r.stdout.contains("snapshot"),
            "{shell} completion lacks subcommands"
        );
    }

    // A revoked token: the next command says to log in again.
    let token = stored["token"].as_str().unwrap().to_string();
    live.engine.app().db.token_revoke(&token).await.unwrap();
    let r = live.fails(&["host", "list"]).await;
    assert!(
        r.stderr.contains("log in again") && r.stderr.contains("oxvirt login"),
        "{r}"
    );

    // Log in again (insecure this time), log out: the session is gone and revoked.
    live.login(&["--insecure"]).await;
    let token = serde_json::from_str::<Value>(&std::fs::read_to_string(&live.session).unwrap()).unwrap()
        ["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = live.ok(&["logout"]).await;
    assert!(r.stdout.contains("logged out"), "{r}");
    assert!(!live.session.exists());
    assert!(live
        .engine
        .app()
        .db
        .token_validate(&token)
        .await
        .unwrap()
        .is_none());

    live.engine.shutdown().await;
    eprintln!("test took {:.1} s", started.elapsed().as_secs_f64());
}

fn console_has(node_dir: &Path, vm_id: &str, text: &str) -> bool {
    std::fs::read_to_string(node_dir.join("run/vms").join(vm_id).join("serial.log"))
        .is_ok_and(|s| s.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vm_lifecycle_with_progress() {
    let started = Instant::now();
    let guest = TestGuest::get();
    let live = start().await;
    let node_dir = tempfile::tempdir().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let node_addr = free_port();
    let _node = common::spawn_node(
        "node1",
        node_dir.path(),
        node_addr,
        &[
            "--engine",
            &live.engine.addr.to_string(),
            "--ca-fingerprint",
            &live.engine.ca_fingerprint(),
            "--accel",
            "tcg",
        ],
    );
    live.login(&["--ca-file", live.engine_dir.join("pki/ca.pem").to_str().unwrap()])
        .await;

    live.ok(&["dc", "create", "dc1"]).await;
    live.ok(&["cluster", "create", "cl1", "--dc", "dc1"]).await;
    // The host joins when its node enrolls; the command waits until it is up.
    let r = live
        .ok(&[
            "host",
            "create",
            "node1",
            "--address",
            &node_addr.to_string(),
            "--cluster",
            "cl1",
        ])
        .await;
    assert!(r.stderr.contains("status up"), "no progress shown: {r}");
    assert!(row(&r.stdout, "status").contains("up"), "{r}");

    // A storage domain, attached and activated in one command.
    let r = live
        .ok(&[
            "sd",
            "create",
            "data1",
            "--host",
            "node1",
            "--path",
            storage.path().to_str().unwrap(),
            "--dc",
            "dc1",
        ])
        .await;
    assert!(r.stderr.contains("status active"), "{r}");
    let r = live.ok(&["sd", "list"]).await;
    let line = row(&r.stdout, "data1");
    assert!(line.contains("active") && line.contains("dc1"), "{line}");
    // Selecting the SPM it already is: a no-op that says so.
    let r = live.ok(&["host", "select-spm", "node1"]).await;
    assert!(r.stdout.contains("host node1 is the SPM"), "{r}");
    let r = live.ok(&["host", "show", "node1", "-o", "json"]).await;
    assert_eq!(r.json()["spm"]["status"], "spm", "{r}");

    // A VM with a boot disk, booting the test guest.
    let cmdline = TestGuest::append(&[]);
    let r = live
        .ok(&[
            "vm",
            "create",
            "vm1",
            "--cluster",
            "cl1",
            "--memory",
            "256M",
            "--cpus",
            "1",
            "--disk-size",
            "64M",
            "--sd",
            "data1",
            "--kernel",
            guest.kernel.to_str().unwrap(),
            "--initrd",
            guest.initrd.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "-o",
            "json",
        ])
        .await;
    let vm = r.json();
    let vm_id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["status"], "down");
    let r = live.ok(&["disk", "list", "-o", "json"]).await;
    assert_eq!(names(&r.json()), ["vm1-disk"], "{r}");

    // Storage QoS through a disk profile: the running VM gets it below.
    let r = live
        .fails(&[
            "qos",
            "create",
            "both",
            "--dc",
            "dc1",
            "--max-throughput",
            "10",
            "--max-read-throughput",
            "5",
        ])
        .await;
    assert!(r.stderr.contains("total throughput"), "{r}");
    live.ok(&[
        "qos",
        "create",
        "slow",
        "--dc",
        "dc1",
        "--max-write-throughput",
        "8",
    ])
    .await;
    let r = live.ok(&["qos", "list", "--dc", "dc1"]).await;
    assert!(row(&r.stdout, "slow").split_whitespace().any(|c| c == "8"), "{r}");
    live.ok(&[
        "diskprofile",
        "create",
        "slowprof",
        "--sd",
        "data1",
        "--qos",
        "slow",
        "--dc",
        "dc1",
    ])
    .await;
    let r = live
        .ok(&[
            "diskprofile",
            "set",
            "--disk",
            "vm1-disk",
            "--profile",
            "slowprof",
            "-o",
            "json",
        ])
        .await;
    assert!(r.json()["disk_profile"]["id"].is_string(), "{r}");

    // Start: progress on stderr, the VM up on node1 in the table.
    let r = live.ok(&["vm", "start", "vm1"]).await;
    assert!(r.stdout.contains("VM vm1 is up"), "{r}");
    assert!(
        r.stderr.contains("start VM vm1") && r.stderr.contains("status up"),
        "{r}"
    );
    let r = live.ok(&["vm", "list"]).await;
    let line = row(&r.stdout, "vm1");
    assert!(
        line.contains(" up ") && line.contains("node1") && line.contains("256 MiB"),
        "{line}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !console_has(node_dir.path(), &vm_id, "OXVIRT-GUEST") {
        assert!(Instant::now() < deadline, "the guest did not boot");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Its disk runs under the profile's QoS; a change reaches the running VM.
    let write_limit = || {
        let rec =
            std::fs::read_to_string(node_dir.path().join("run/vms").join(&vm_id).join("vm.json")).unwrap();
        let rec: Value = serde_json::from_str(&rec).unwrap();
        rec["create"]["disks"][0]["io_tune"]["write_bytes_sec"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!(write_limit(), 8 << 20);
    live.ok(&[
        "qos",
        "update",
        "slow",
        "--dc",
        "dc1",
        "--max-write-throughput",
        "16",
    ])
    .await;
    assert_eq!(write_limit(), 16 << 20);
    let r = live.fails(&["diskprofile", "rm", "slowprof"]).await;
    assert!(r.stderr.contains("used by disk vm1-disk"), "{r}");
    live.ok(&["diskprofile", "set", "--disk", "vm1-disk", "--none"])
        .await;
    assert_eq!(write_limit(), 0, "unlimited");
    live.ok(&["diskprofile", "rm", "slowprof"]).await;
    live.ok(&["qos", "rm", "slow", "--dc", "dc1"]).await;
    // Its console: a remote-viewer file with a password good for the time asked; the VNC
    // server behind it asks for VNC authentication and nothing else.
    let r = live.ok(&["vm", "console", "vm1", "--expiry", "60"]).await;
    assert!(r.stdout.starts_with("[virt-viewer]\ntype=vnc\n"), "{r}");
    assert!(r.stdout.contains("# Password is valid for 60 seconds."), "{r}");
    let field = |k: &str| {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {r}"))
            .to_string()
    };
    assert_eq!(field("password").len(), 12, "{r}");
    let mut vnc =
        std::net::TcpStream::connect((field("host").as_str(), field("port").parse::<u16>().unwrap()))
            .unwrap();
    let mut greeting = [0u8; 12];
    std::io::Read::read_exact(&mut vnc, &mut greeting).unwrap();
    assert_eq!(&greeting, b"RFB 003.008\n");
    std::io::Write::write_all(&mut vnc, b"RFB 003.008\n").unwrap();
    let mut offered = [0u8; 2];
    std::io::Read::read_exact(&mut vnc, &mut offered).unwrap();
    assert_eq!(offered, [1, 2], "one security type, VNC authentication");
    drop(vnc);
    let r = live.fails(&["vm", "console", "nope"]).await;
    assert!(r.stderr.contains("nope"), "{r}");
    // Starting it again is refused with the engine's reason.
    let r = live.fails(&["vm", "start", "vm1"]).await;
    assert!(r.stderr.contains("409"), "{r}");

    // Rebooted, the guest boots again where it runs; with no migration, none is cancelled.
    let boots = || {
        std::fs::read_to_string(node_dir.path().join("run/vms").join(&vm_id).join("serial.log"))
            .unwrap_or_default()
            .matches("OXVIRT-GUEST ready")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while boots() == 0 {
        assert!(Instant::now() < deadline, "the guest never said it was ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = live.ok(&["vm", "reboot", "vm1"]).await;
    assert!(r.stdout.contains("VM vm1 is rebooting"), "{r}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while boots() < 2 {
        assert!(Instant::now() < deadline, "the guest did not boot again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = live.ok(&["vm", "show", "vm1", "-o", "json"]).await;
        if r.json()["status"] == "up" {
            break;
        }
        assert!(Instant::now() < deadline, "not up again after the reboot: {r}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = live.fails(&["vm", "cancel-migration", "vm1"]).await;
    assert!(r.stderr.contains("not migrating"), "{r}");

    // A live snapshot, then stop.
    let r = live
        .ok(&[
            "snapshot",
            "create",
            "--vm",
            "vm1",
            "--description",
            "before",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(r.json()["snapshot_status"], "ok", "{r}");
    let r = live.ok(&["snapshot", "list", "--vm", "vm1"]).await;
    assert!(r.stdout.contains("before") && r.stdout.contains("active"), "{r}");

    // A disk attached to the running VM is hot plugged (the node's record of the VM has it,
    // on the bus asked for); deactivated it is unplugged, detached it stays as a floating
    // disk. A SATA disk is not plugged into a running VM.
    let node_buses = || {
        let rec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(node_dir.path().join("run/vms").join(&vm_id).join("vm.json")).unwrap(),
        )
        .unwrap();
        rec["create"]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["bus"].as_str().unwrap_or("virtio_blk").to_string())
            .collect::<Vec<_>>()
    };
    let node_disks = || node_buses().len();
    assert_eq!(node_disks(), 1);
    live.ok(&["disk", "create", "hot1", "--size", "16M", "--sd", "data1"])
        .await;
    let r = live
        .fails(&["disk", "attach", "hot1", "--vm", "vm1", "--interface", "sata"])
        .await;
    assert!(r.stderr.contains("cannot be plugged"), "{r}");
    let r = live
        .ok(&[
            "disk",
            "attach",
            "hot1",
            "--vm",
            "vm1",
            "--interface",
            "virtio_scsi",
        ])
        .await;
    assert!(r.stdout.contains("disk hot1 attached to VM vm1"), "{r}");
    assert_eq!(
        node_buses(),
        ["virtio_blk", "virtio_scsi"],
        "the running VM did not get the disk"
    );
    let r = live.ok(&["disk", "deactivate", "hot1", "--vm", "vm1"]).await;
    assert!(r.stdout.contains("deactivated"), "{r}");
    assert_eq!(node_disks(), 1, "the deactivated disk is still plugged");
    live.ok(&["disk", "detach", "hot1", "--vm", "vm1"]).await;
    live.ok(&["disk", "remove", "hot1"]).await;
    let r = live.ok(&["vm", "stop", "vm1"]).await;
    assert!(r.stdout.contains("VM vm1 is down"), "{r}");
    let r = live.ok(&["vm", "show", "vm1", "-o", "json"]).await;
    assert_eq!(r.json()["status"], "down");

    // Restore to the snapshot, remove it, remove the VM with its disk.
    live.ok(&["snapshot", "restore", "--vm", "vm1", "before"]).await;
    live.ok(&["vm", "remove", "vm1"]).await;
    let r = live.ok(&["vm", "list", "-o", "json"]).await;
    assert_eq!(r.json(), serde_json::json!([]));
    let r = live.ok(&["disk", "list", "-o", "json"]).await;
    assert_eq!(r.json(), serde_json::json!([]));

    // Storage maintenance as in oVirt: the master domain hands its role to another active data
    // domain; the last one takes the data center to maintenance, and activating it brings the
    // data center back with an SPM.
    let storage2 = tempfile::tempdir().unwrap();
    live.ok(&[
        "sd",
        "create",
        "data2",
        "--host",
        "node1",
        "--path",
        storage2.path().to_str().unwrap(),
        "--dc",
        "dc1",
    ])
    .await;
    let r = live.ok(&["sd", "deactivate", "data1"]).await;
    assert!(r.stdout.contains("maintenance"), "{r}");
    let master = |r: &Run| {
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["master"] == true || d["master"] == "true")
            .map(|d| d["name"].as_str().unwrap().to_string())
    };
    let r = live.ok(&["sd", "list", "-o", "json"]).await;
    assert_eq!(master(&r).as_deref(), Some("data2"), "{r}");
    let r = live.ok(&["sd", "deactivate", "data2"]).await;
    assert!(r.stdout.contains("maintenance"), "{r}");
    let r = live.ok(&["dc", "show", "dc1", "-o", "json"]).await;
    assert_eq!(r.json()["status"], "maintenance", "{r}");
    live.ok(&["sd", "activate", "data2"]).await;
    let r = live.ok(&["dc", "show", "dc1", "-o", "json"]).await;
    assert_eq!(r.json()["status"], "up", "{r}");
    live.ok(&["sd", "activate", "data1"]).await;
    let r = live.ok(&["sd", "list", "-o", "json"]).await;
    for d in r.json().as_array().unwrap() {
        assert_eq!(d["status"], "active", "{r}");
    }

    // Detach and remove. A domain that a VM spans with another stays (what lives on it alone
    // would leave with it); an active one is deactivated first and the master never goes; a
    // detached one leaves the pool on storage too, and removed with --destroy its storage is
    // formatted.
    live.ok(&["disk", "create", "scratch", "--size", "16M", "--sd", "data1"])
        .await;
    live.ok(&[
        "vm",
        "create",
        "spanvm",
        "--cluster",
        "cl1",
        "--disk-size",
        "16M",
        "--sd",
        "data2",
    ])
    .await;
    live.ok(&["disk", "attach", "scratch", "--vm", "spanvm"]).await;
    live.ok(&["sd", "deactivate", "data1"]).await;
    let r = live.fails(&["sd", "detach", "data1"]).await;
    assert!(r.stderr.contains("VM spanvm has disks on storage domain"), "{r}");
    live.ok(&["disk", "detach", "scratch", "--vm", "spanvm"]).await;
    live.ok(&["vm", "rm", "spanvm"]).await;
    live.ok(&["sd", "activate", "data1"]).await;
    // Moved to data2 instead, with what it holds: data1 keeps nothing of it.
    let sd_id = |name: &str| {
        let db = live.engine.app().db.clone();
        let name = name.to_string();
        async move { db.sd_get_by_name(&name).await.unwrap().unwrap().id.to_string() }
    };
    let (d1, d2) = (sd_id("data1").await, sd_id("data2").await);
    let r = live.ok(&["disk", "show", "scratch", "-o", "json"]).await;
    let disk_id = r.json()["id"].as_str().unwrap().to_string();
    let volume_in = |root: &std::path::Path| -> Option<std::path::PathBuf> {
        let dir = root.join("images").join(&disk_id);
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_none())
    };
    let qemu_io = |path: &std::path::Path, cmd: &str| {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(path)
            .output()
            .expect("qemu-io (Debian package qemu-utils)");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let src = volume_in(&storage.path().join(&d1)).expect("the disk's volume on data1");
    assert!(qemu_io(&src, "write -P 0x5a 0 1M").contains("wrote 1048576/1048576"));
    let r = live.fails(&["disk", "move", "scratch", "--sd", "data1"]).await;
    assert!(r.stderr.contains("already"), "{r}");
    live.ok(&["disk", "move", "scratch", "--sd", "data2"]).await;
    assert!(
        volume_in(&storage.path().join(&d1)).is_none(),
        "the source image stays"
    );
    let moved = volume_in(&storage2.path().join(&d2)).expect("the disk's volume on data2");
    assert!(qemu_io(&moved, "read -P 0x5a 0 1M").contains("read 1048576/1048576"));
    let r = live.ok(&["disk", "show", "scratch", "-o", "json"]).await;
    assert_eq!(
        r.json()["storage_domains"]["storage_domain"][0]["id"],
        d2.as_str(),
        "{r}"
    );
    // A copy is a new disk of its own (named as oVirt names it) with the same data.
    let r = live
        .ok(&["disk", "copy", "scratch", "--sd", "data2", "-o", "json"])
        .await;
    let copy = r.json();
    assert_eq!(copy["alias"], "scratch_Copy", "{r}");
    let copy_id = copy["id"].as_str().unwrap().to_string();
    assert_ne!(copy_id, disk_id);
    let copied = std::fs::read_dir(storage2.path().join(&d2).join("images").join(&copy_id))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_none())
        .expect("the copy's volume on data2");
    assert!(qemu_io(&copied, "read -P 0x5a 0 1M").contains("read 1048576/1048576"));
    assert!(moved.exists(), "the source stays");
    let r = live.fails(&["disk", "copy", "scratch", "--sd", "nosuch"]).await;
    assert!(r.stderr.contains("nosuch"), "{r}");
    live.ok(&["disk", "rm", "scratch_Copy"]).await;
    // Extended, the volume grows and keeps its data; a disk does not shrink.
    let r = live
        .ok(&["disk", "extend", "scratch", "--size", "32M", "-o", "json"])
        .await;
    assert_eq!(r.json()["provisioned_size"], "33554432", "{r}");
    assert!(qemu_io(&moved, "read -P 0x5a 0 1M").contains("read 1048576/1048576"));
    assert!(qemu_io(&moved, "read -P 0 31M 1M").contains("read 1048576/1048576"));
    let r = live.fails(&["disk", "extend", "scratch", "--size", "8M"]).await;
    assert!(r.stderr.contains("cannot shrink"), "{r}");
    let r = live.fails(&["sd", "detach", "data1"]).await;
    assert!(r.stderr.contains("deactivate it first"), "{r}");
    let r = live.fails(&["sd", "remove", "data1"]).await;
    assert!(r.stderr.contains("detach it first"), "{r}");
    let r = live.fails(&["sd", "detach", "data2"]).await;
    assert!(r.stderr.contains("master domain cannot be detached"), "{r}");
    live.ok(&["sd", "deactivate", "data1"]).await;
    let r = live.ok(&["sd", "show", "data1", "-o", "json"]).await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    let root = storage.path().join(&id);
    let pool_line = |root: &std::path::Path| {
        std::fs::read_to_string(root.join("dom_md/metadata"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("POOL_UUID="))
            .map(str::to_string)
    };
    assert_ne!(
        pool_line(&root).as_deref(),
        Some("POOL_UUID="),
        "attached on storage"
    );
    live.ok(&["sd", "detach", "data1"]).await;
    let r = live.ok(&["sd", "show", "data1", "-o", "json"]).await;
    assert_eq!(r.json()["status"], "unattached", "{r}");
    assert_eq!(
        pool_line(&root).as_deref(),
        Some("POOL_UUID="),
        "detached on storage"
    );
    live.ok(&["sd", "remove", "data1", "--destroy"]).await;
    assert!(!root.exists(), "the removed domain's storage is formatted");
    let r = live.ok(&["sd", "list", "-o", "json"]).await;
    let names: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["data2"], "{r}");
    let jobs = live.engine.app().db.job_list(&Default::default()).await.unwrap();
    for what in [
        "Deactivating storage domain",
        "Detaching storage domain",
        "Removing storage domain",
    ] {
        assert!(
            jobs.iter()
                .any(|j| j.description.starts_with(what)
                    && j.status == oxvirt_engine::model::JobStatus::Finished),
            "no finished job {what:?}"
        );
    }

    live.engine.shutdown().await;
    eprintln!("test took {:.1} s", started.elapsed().as_secs_f64());
}

/// Scheduling policies, a cluster's policy and overcommit, affinity groups and a host's fence
/// agent (a real script) through the CLI; no node or QEMU involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_affinity_and_fencing() {
    let started = Instant::now();
    let live = start().await;
    live.login(&["--insecure"]).await;
    let db = &live.engine.app().db;

    // The built-in policies.
    let r = live.ok(&["schedulingpolicy", "list"]).await;
    assert!(
        row(&r.stdout, "none").contains("b4ed2332-a7ac-4d5f-9596-99a439cb2812"),
        "{r}"
    );
    let r = live.ok(&["policy", "show", "power_saving", "-o", "json"]).await;
    assert_eq!(r.json()["id"], "5a2b0939-7d46-4b73-a469-e9c2c7fc6a53");

    // A cluster with a policy and an overcommit, then another policy set.
    live.ok(&["dc", "create", "sdc"]).await;
    live.ok(&[
        "cluster",
        "create",
        "scl",
        "--dc",
        "sdc",
        "--scheduling-policy",
        "power_saving",
        "--overcommit",
        "150",
    ])
    .await;
    let r = live.ok(&["cluster", "list"]).await;
    let line = row(&r.stdout, "scl");
    assert!(line.contains("power_saving") && line.contains("150"), "{line}");
    let r = live
        .ok(&[
            "cluster",
            "update",
            "scl",
            "--scheduling-policy",
            "evenly_distributed",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(r.json()["scheduling_policy"]["name"], "evenly_distributed");
    // Refused: the reason is printed and nothing changes.
    let r = live
        .fails(&[
            "cluster",
            "update",
            "scl",
            "--scheduling-policy",
            "fastest",
            "--overcommit",
            "200",
        ])
        .await;
    assert!(
        r.stderr.contains("\"fastest\" does not exist") && r.stderr.contains("400"),
        "{r}"
    );
    let r = live
        .fails(&["cluster", "update", "scl", "--overcommit", "20"])
        .await;
    assert!(r.stderr.contains("20% is outside 100..=1000"), "{r}");
    let cl = db.cluster_get_by_name("scl").await.unwrap().unwrap();
    assert_eq!(
        (cl.scheduling_policy.as_str(), cl.memory_overcommit_percent),
        ("evenly_distributed", 150)
    );
    // Migration bandwidth: a limit in Mbps, refused nonsense, back to no limit.
    live.ok(&["cluster", "update", "scl", "--migration-bandwidth", "400"])
        .await;
    let cl = db.cluster_get_by_name("scl").await.unwrap().unwrap();
    assert_eq!(cl.migration_bandwidth_mbps, Some(400));
    let r = live
        .fails(&["cluster", "update", "scl", "--migration-bandwidth", "fast"])
        .await;
    assert!(r.stderr.contains("neither a number of Mbps nor auto"), "{r}");
    live.ok(&["cluster", "update", "scl", "--migration-bandwidth", "auto"])
        .await;
    let cl = db.cluster_get_by_name("scl").await.unwrap().unwrap();
    assert_eq!(cl.migration_bandwidth_mbps, None);
    // The cluster's own policy properties: set, shown, refused when unknown, back to defaults.
    let r = live
        .ok(&[
            "cluster",
            "update",
            "scl",
            "--policy-property",
            "HighUtilization=60",
            "--policy-property",
            "CpuOverCommitDurationMinutes=1",
            "-o",
            "json",
        ])
        .await;
    let props = &r.json()["custom_scheduling_policy_properties"]["property"];
    assert_eq!(
        props,
        &serde_json::json!([
            { "name": "CpuOverCommitDurationMinutes", "value": "1" },
            { "name": "HighUtilization", "value": "60" },
        ]),
        "{r}"
    );
    let r = live
        .fails(&["cluster", "update", "scl", "--policy-property", "Fast=1"])
        .await;
    assert!(
        r.stderr.contains("Fast") && r.stderr.contains("HighVmCount"),
        "{r}"
    );
    let r = live
        .fails(&["cluster", "update", "scl", "--policy-property", "HighUtilization"])
        .await;
    assert!(r.stderr.contains("not NAME=VALUE"), "{r}");
    let cl = db.cluster_get_by_name("scl").await.unwrap().unwrap();
    assert_eq!(cl.scheduling_properties.len(), 2, "refusals changed nothing");
    live.ok(&["cluster", "update", "scl", "--default-policy-properties"])
        .await;
    let cl = db.cluster_get_by_name("scl").await.unwrap().unwrap();
    assert!(cl.scheduling_properties.is_empty(), "{cl:?}");

    // Affinity groups: create with a member, list, add and remove VMs; another cluster's VM
    // is refused.
    live.ok(&["cluster", "create", "other", "--dc", "sdc"]).await;
    for (vm, cluster) in [("w1", "scl"), ("w2", "scl"), ("x1", "other")] {
        live.ok(&["vm", "create", vm, "--cluster", cluster]).await;
    }

    // High availability from the CLI: on at creation with a priority, off again; a lease
    // domain that does not exist is refused and changes nothing.
    live.ok(&["vm", "create", "hav", "--cluster", "scl", "--ha-priority", "7"])
        .await;
    let ha = async || db.vm_get_by_name("hav").await.unwrap().unwrap().ha;
    assert_eq!((ha().await.enabled, ha().await.priority), (true, 7));
    let r = live
        .fails(&["vm", "update", "hav", "--lease-sd", "nosuch", "--no-ha"])
        .await;
    assert!(r.stderr.contains("nosuch"), "{r}");
    assert!(ha().await.enabled, "a refused update changed the VM");
    let r = live.fails(&["vm", "update", "hav"]).await;
    assert!(r.stderr.contains("nothing to change"), "{r}");
    let r = live.ok(&["vm", "update", "hav", "--no-ha", "-o", "json"]).await;
    assert_eq!(r.json()["high_availability"]["enabled"], "false", "{r}");
    assert!(!ha().await.enabled);
    let r = live
        .ok(&[
            "affinitygroup",
            "create",
            "web",
            "--cluster",
            "scl",
            "--negative",
            "--enforcing",
            "--vm",
            "w1",
            "-o",
            "json",
        ])
        .await;
    let g = r.json();
    assert_eq!(g["vms_rule"]["positive"], "false");
    assert_eq!(g["vms_rule"]["enforcing"], "true");
    let r = live.ok(&["ag", "list", "--cluster", "scl"]).await;
    let line = row(&r.stdout, "web");
    assert!(
        line.contains("scl") && line.contains("false") && line.contains("true"),
        "{line}"
    );
    live.ok(&["ag", "add-vm", "--cluster", "scl", "web", "w2"]).await;
    let r = live
        .fails(&["ag", "add-vm", "--cluster", "scl", "web", "x1"])
        .await;
    assert!(r.stderr.contains("VM x1 is in cluster other"), "{r}");
    let r = live.fails(&["ag", "create", "web", "--cluster", "scl"]).await;
    assert!(r.stderr.contains("409"), "{r}");
    live.ok(&["ag", "remove-vm", "--cluster", "scl", "web", "w1"])
        .await;
    let r = live
        .ok(&["ag", "show", "--cluster", "scl", "web", "-o", "json"])
        .await;
    let shown = r.json();
    let members: Vec<&str> = shown["vms"]["vm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    let w2 = db.vm_get_by_name("w2").await.unwrap().unwrap().id.to_string();
    assert_eq!(members, [w2.as_str()]);
    live.ok(&["ag", "rm", "--cluster", "scl", "web"]).await;
    let r = live.ok(&["ag", "list", "--cluster", "scl", "-o", "json"]).await;
    assert_eq!(r.json(), serde_json::json!([]));

    // A host's fence agent (a script recording its arguments) and the fence status.
    live.ok(&[
        "host",
        "create",
        "fh",
        "--address",
        "127.0.0.1:9",
        "--cluster",
        "scl",
        "--no-wait",
    ])
    .await;
    let agent = live.work.path().join("agent.sh");
    let log = live.work.path().join("agent.log");
    std::fs::write(
        &agent,
        format!("#!/bin/sh\necho \"$*\" >> {}\nexit 0\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pw = live.password_file("agent secret");
    let command = format!("command={}", agent.display());
    live.ok(&[
        "fenceagent",
        "create",
        "--host",
        "fh",
        "--type",
        "script",
        "--option",
        &command,
        "--address",
        "10.0.0.9",
        "--username",
        "admin",
        "--password-file",
        pw.to_str().unwrap(),
        "--port",
        "623",
    ])
    .await;
    let r = live.ok(&["fenceagent", "list", "--host", "fh"]).await;
    let line = row(&r.stdout, "fh");
    assert!(
        line.contains("script") && line.contains("10.0.0.9") && line.contains("623"),
        "{line}"
    );
    assert!(!r.stdout.contains("agent secret"));
    let r = live.ok(&["host", "fence", "fh", "--type", "status"]).await;
    assert!(r.stdout.contains("host fh is powered on"), "{r}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "--ip=10.0.0.9 --username=admin --password=agent secret --ipport=623 status\n"
    );
    let r = live.fails(&["host", "fence", "fh", "--type", "manual"]).await;
    assert!(
        r.stderr
            .contains("confirming a reboot is only for a host that does not respond"),
        "{r}"
    );
    live.ok(&["fenceagent", "rm", "--host", "fh"]).await;
    let r = live.fails(&["host", "fence", "fh", "--type", "status"]).await;
    assert!(r.stderr.contains("host fh has no fence agent"), "{r}");

    live.engine.shutdown().await;
    eprintln!("test took {:.1} s", started.elapsed().as_secs_f64());
}

/// A JSON leaf as text, whether the API wrote it as a string or a number.
fn leaf(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

/// Networks from the CLI: a VLAN network in a data center, attached to a cluster as optional,
/// updated and listed; a VM NIC on a VM network takes its MAC from the cluster's pool, whose
/// ranges are replaced; what is in use is not removed; a host that is not up does not carry a
/// network, and bad input is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_nics_and_mac_pools() {
    let live = start().await;
    live.login(&["--insecure"]).await;
    live.ok(&["dc", "create", "ndc"]).await;
    live.ok(&["cluster", "create", "ncl", "--dc", "ndc"]).await;

    let r = live
        .ok(&[
            "network", "create", "storage", "--dc", "ndc", "--vlan", "42", "--mtu", "9000", "--no-vm", "-o",
            "json",
        ])
        .await;
    assert_eq!(leaf(&r.json()["vlan"]["id"]), "42", "{r}");
    assert_eq!(leaf(&r.json()["mtu"]), "9000", "{r}");
    live.ok(&["net", "create", "vmnet", "--dc", "ndc", "--vlan", "10"])
        .await;
    let r = live.ok(&["net", "list"]).await;
    let line = row(&r.stdout, "vmnet");
    assert!(
        line.contains("ndc") && line.contains(" 10 ") && line.contains("vm"),
        "{line}"
    );
    assert!(!row(&r.stdout, "storage").contains("vm"), "{r}");
    let r = live
        .ok(&[
            "net",
            "update",
            "vmnet",
            "--mtu",
            "1400",
            "--no-vlan",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(leaf(&r.json()["mtu"]), "1400", "{r}");
    assert!(r.json().get("vlan").is_none(), "{r}");
    let r = live.fails(&["net", "update", "vmnet"]).await;
    assert!(r.stderr.contains("nothing to change"), "{r}");

    live.ok(&["net", "attach-cluster", "vmnet", "--cluster", "ncl", "--optional"])
        .await;
    let r = live.ok(&["net", "cluster-list", "--cluster", "ncl"]).await;
    assert!(row(&r.stdout, "vmnet").contains("false"), "{r}");
    let r = live.ok(&["vnicprofile", "list"]).await;
    assert_eq!(row(&r.stdout, "vmnet").matches("vmnet").count(), 2, "{r}");

    // A NIC on the VM network, its MAC from the pool; a network for no VMs is refused.
    live.ok(&["vm", "create", "nv", "--cluster", "ncl"]).await;
    let r = live
        .ok(&[
            "nic",
            "create",
            "--vm",
            "nv",
            "nic1",
            "--network",
            "vmnet",
            "-o",
            "json",
        ])
        .await;
    let mac = r.json()["mac"]["address"].as_str().unwrap().to_string();
    let r = live
        .fails(&["nic", "create", "--vm", "nv", "nic2", "--network", "storage"])
        .await;
    assert!(r.stderr.contains("not a VM network"), "{r}");
    let r = live.ok(&["nic", "ls", "--vm", "nv"]).await;
    let line = row(&r.stdout, "nic1");
    assert!(line.contains(&mac) && line.contains("vmnet"), "{line}");

    // The cluster's MAC pool gets one small range: the next NIC's MAC is from it.
    let range = "56:6f:00:00:01:00-56:6f:00:00:01:0f";
    live.ok(&["macpool", "update", "ncl", "--range", range]).await;
    let r = live.ok(&["macpool", "list"]).await;
    assert!(row(&r.stdout, "ncl").contains(range), "{r}");
    let r = live
        .ok(&["nic", "create", "--vm", "nv", "nic2", "-o", "json"])
        .await;
    let mac2 = r.json()["mac"]["address"].as_str().unwrap().to_string();
    assert!(mac2.starts_with("56:6f:00:00:01:0"), "{mac2}");
    let r = live
        .fails(&["macpool", "update", "ncl", "--range", "56:6f:00:00:01:00"])
        .await;
    assert!(r.stderr.contains("FROM-TO"), "{r}");

    // In use by a NIC: not removed. Freed: removed.
    let r = live.fails(&["net", "rm", "vmnet"]).await;
    assert!(r.stderr.contains("vmnet") || r.stderr.contains("409"), "{r}");
    assert!(live.ok(&["net", "list"]).await.stdout.contains("vmnet"));
    live.ok(&["nic", "rm", "--vm", "nv", "nic1"]).await;
    live.ok(&["net", "detach-cluster", "vmnet", "--cluster", "ncl"])
        .await;
    live.ok(&["net", "rm", "vmnet"]).await;
    assert!(!live.ok(&["net", "list"]).await.stdout.contains("vmnet"));

    // A host that is not up does not carry a network; a bad address never reaches the engine.
    live.ok(&[
        "host",
        "create",
        "nh",
        "--address",
        "127.0.0.1:9",
        "--cluster",
        "ncl",
        "--no-wait",
    ])
    .await;
    let r = live
        .fails(&[
            "net",
            "attach-host",
            "storage",
            "--host",
            "nh",
            "--nic",
            "eth0",
            "--ip",
            "10.0.0.1/24",
        ])
        .await;
    assert!(r.stderr.contains("nh"), "{r}");
    let r = live
        .fails(&[
            "net",
            "attach-host",
            "storage",
            "--host",
            "nh",
            "--nic",
            "eth0",
            "--ip",
            "bogus",
        ])
        .await;
    assert!(r.stderr.contains("ADDRESS/PREFIX"), "{r}");
    let r = live.ok(&["net", "host-list", "--host", "nh", "-o", "json"]).await;
    assert_eq!(r.json(), serde_json::json!([]), "{r}");
}
