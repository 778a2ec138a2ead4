//! `oxvirt lease`, the admin tool in the spirit of `sanlock direct`, against the real sanlock:
//! what it initialises, `sanlock direct dump` lists; a host id and a resource it acquires and
//! releases, `sanlock direct read_leader` reads back byte for byte as `oxvirt lease
//! read-leader` prints it; a bad path is a clear error that creates nothing.

use std::path::Path;
use std::process::Command;

use oxvirt_testkit::require_tool;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn oxvirt(args: &[&str]) -> (bool, String) {
    run(Command::new(env!("CARGO_BIN_EXE_oxvirt"))
        .args(args)
        .env("OXVIRT_LOG", "warn")
        .env("RUST_BACKTRACE", "0"))
}

fn sanlock(args: &[&str]) -> (bool, String) {
    run(Command::new(require_tool("sanlock"))
        .args(args)
        .env("SANLOCK_PRIVILEGED", "0"))
}

/// The `key value` lines of a leader record, as both tools print them.
fn leader_fields(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with("read_leader done") && l.split_whitespace().count() == 2)
        .map(str::to_string)
        .collect()
}

#[test]
fn lease_tool_initialises_acquires_and_reads_what_sanlock_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("leases");
    std::fs::File::create(&f).unwrap().set_len(2 << 20).unwrap();
    let p = f.display().to_string();
    let (ok, out) = oxvirt(&["lease", "init-lockspace", "-s", &format!("LS:0:{p}:0"), "-o", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = oxvirt(&["lease", "init-resource", "-r", &format!("LS:SDM:{p}:1M")]);
    assert!(ok, "{out}");

    // Both tools list the resource at 1 MiB, free.
    let (ok, ours) = oxvirt(&["lease", "dump", &p]);
    assert!(ok, "{ours}");
    let (ok, theirs) = sanlock(&["direct", "dump", &p]);
    assert!(ok, "{theirs}");
    let row = |t: &str| {
        t.lines()
            .find(|l| l.contains("SDM"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        row(&ours),
        Some("01048576 LS SDM 0000000000 0000 0000 0".into()),
        "{ours}"
    );
    assert_eq!(row(&ours), row(&theirs), "ours:\n{ours}\nsanlock:\n{theirs}");

    // Host id 3 takes the resource, holds it a second, gives both back.
    let (ok, out) = oxvirt(&[
        "lease",
        "acquire",
        "-s",
        &format!("LS:3:{p}:0"),
        "-r",
        &format!("LS:SDM:{p}:1M"),
        "-o",
        "1",
        "--fence-margin",
        "2",
        "--host-name",
        "h3",
        "--for",
        "1",
    ]);
    assert!(ok, "{out}");
    for want in [
        "acquired host id 3 generation 1",
        "acquired SDM Exclusive lver 1",
        "released SDM",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let (ok, ours) = oxvirt(&["lease", "read-leader", "-r", &format!("LS:SDM:{p}:1M")]);
    assert!(ok, "{ours}");
    let (ok, theirs) = sanlock(&["direct", "read_leader", "-r", &format!("LS:SDM:{p}:1048576")]);
    assert!(ok, "{theirs}");
    let fields = leader_fields(&ours);
    for want in [
        "owner_id 3",
        "owner_generation 1",
        "lver 1",
        "timestamp 0",
        "resource_name SDM",
    ] {
        assert!(fields.iter().any(|l| l == want), "{want}: {ours}");
    }
    assert_eq!(
        fields,
        leader_fields(&theirs),
        "ours:\n{ours}\nsanlock:\n{theirs}"
    );

    // A path that does not exist: a clear error, nothing created.
    let missing = tmp.path().join("no/such/file");
    let (ok, out) = oxvirt(&[
        "lease",
        "init-lockspace",
        "-s",
        &format!("LS:0:{}:0", missing.display()),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("cannot open lease file"), "{out}");
    assert!(!Path::new(&missing).exists());
}
