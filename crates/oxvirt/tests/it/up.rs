//! `oxvirt up`, the README's main command, as an administrator runs it: two nodes, the
//! credentials it prints, everything up through the CLI, Ctrl-C stopping it cleanly (engine and
//! nodes gone, exit status 0), and a second run on the same directory finding the same data
//! center, hosts, storage domain and password instead of making new ones.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::up::{free_port, free_ports, processes_mentioning, Up};

/// `oxvirt ARGS` with its own CLI session file under `home`; stdout parsed as JSON when asked.
fn cli(home: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_oxvirt"))
        .args(args)
        .env("OXVIRT_CLI_CONFIG", home.join("cli.json"))
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("OXVIRT_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oxvirt {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(home: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let s = cli(home, &a);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// (name, id, status) of every object of a list.
fn rows(list: &Value) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|o| {
            let s = |k: &str| o[k].as_str().unwrap_or_default().to_string();
            (s("name"), s("id"), s("status"))
        })
        .collect();
    v.sort();
    v
}

/// Hosts, storage domains and data centers once every host is up.
fn world(home: &Path) -> [Vec<(String, String, String)>; 3] {
    let start = Instant::now();
    loop {
        let hosts = rows(&json(home, &["host", "list"]));
        if hosts.iter().all(|h| h.2 == "up") || start.elapsed() > Duration::from_secs(60) {
            return [
                hosts,
                rows(&json(home, &["sd", "list"])),
                rows(&json(home, &["dc", "list"])),
            ];
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn up_with_two_nodes_stops_on_ctrl_c_and_a_second_run_reuses_its_directory() {
    let data = tempfile::Builder::new().prefix("oxvirt-up-").tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let node_port = free_ports(2);

    // First run: no password given, so the engine makes one up and shows it once.
    let t = Instant::now();
    let mut up = Up::start(data.path(), &listen, node_port, 2, None);
    let access = up.wait_for("admin@internal:", Duration::from_secs(150));
    let password = access
        .split_whitespace()
        .skip_while(|w| *w != "password")
        .nth(1)
        .unwrap_or_else(|| panic!("no password in {access:?}"))
        .to_string();
    assert!(access.contains("generated now"), "{access}");
    up.wait_for("oxvirt is up", Duration::from_secs(150));
    eprintln!("oxvirt up --nodes 2 ready in {:.1} s", t.elapsed().as_secs_f64());
    let out = up.drain();
    assert!(
        out.contains(&format!("engine API:       https://{listen}/ovirt-engine/api")),
        "{out}"
    );

    let pw = home.path().join("pw");
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    let url = format!("https://{listen}");
    let login = ["login", "--url", &url, "--user", "admin@internal", "--insecure"];
    let mut args = login.to_vec();
    args.extend(["--password-file", pw.to_str().unwrap()]);
    cli(home.path(), &args);
    let first = world(home.path());
    let [hosts, sds, dcs] = &first;
    assert_eq!(
        hosts
            .iter()
            .map(|h| (h.0.as_str(), h.2.as_str()))
            .collect::<Vec<_>>(),
        [("node1", "up"), ("node2", "up")],
        "{hosts:?}"
    );
    assert_eq!(sds.len(), 1, "{sds:?}");
    assert_eq!(
        (sds[0].0.as_str(), sds[0].2.as_str()),
        ("data", "active"),
        "{sds:?}"
    );
    assert!(dcs.iter().any(|d| d.0 == "Default" && d.2 == "up"), "{dcs:?}");
    let nodes_dir = data.path().join("nodes");
    let cmdline = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ")
    };
    let pids = processes_mentioning(&nodes_dir);
    let procs: Vec<String> = pids.iter().map(cmdline).collect();
    // A node's child between fork and exec (it runs mount, losetup, its watchdog…) shows the
    // node's command line for a moment: a process whose parent has its command line is that.
    let ppid = |pid: &i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let nodes = pids
        .iter()
        .filter(|p| cmdline(p).contains(" node --name "))
        .filter(|p| ppid(p).is_none_or(|pp| cmdline(&pp) != cmdline(p)))
        .count();
    assert_eq!(
        nodes, 2,
        "two node processes (each with its fence watchdog): {procs:#?}"
    );

    // Ctrl-C: the engine and both nodes stop; exit status 0.
    let st = up.interrupt(Duration::from_secs(60));
    assert!(st.success(), "oxvirt up exited {st}:\n{}", up.drain());
    assert!(up.drain().contains("stopped"));
    // The watchdogs go once their node's socket closes.
    let start = Instant::now();
    while !processes_mentioning(&nodes_dir).is_empty() {
        let left: Vec<String> = processes_mentioning(&nodes_dir).iter().map(cmdline).collect();
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "outlived oxvirt up: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(up);

    // Second run on the same directory (the password as it was, none given): the same
    // objects, nothing added, every host up again.
    let mut up = Up::start(data.path(), &listen, node_port, 2, None);
    let access = up.wait_for("admin@internal:", Duration::from_secs(150));
    assert!(access.contains("password unchanged"), "{access}");
    up.wait_for("oxvirt is up", Duration::from_secs(150));
    cli(home.path(), &args);
    let second = world(home.path());
    assert_eq!(second, first, "a second run reuses what the first made");
    let st = up.interrupt(Duration::from_secs(60));
    assert!(st.success(), "oxvirt up exited {st}:\n{}", up.drain());
}
