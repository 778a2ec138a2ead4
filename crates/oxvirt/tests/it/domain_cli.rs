//! `oxvirt domain ...` end to end: the admin tool on a real domain directory.

use std::process::Command;

fn oxvirt(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_oxvirt"))
        .args(args)
        .env("OXVIRT_LOG", "warn")
        .output()
        .expect("run oxvirt");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn create_inspect_snapshot_merge_and_check_a_domain() {
    oxvirt_testkit::require_tool("qemu-img");
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path().to_str().unwrap();
    let (ok, out, err) = oxvirt(&["domain", "create", "--mount", m, "--description", "cli"]);
    assert!(ok, "{err}");
    let dom = out.trim().to_string();
    assert!(dom.starts_with(m));
    let (img, base, top) = (
        "0b0b0b0b-0000-4000-8000-000000000001",
        "0b0b0b0b-0000-4000-8000-000000000002",
        "0b0b0b0b-0000-4000-8000-000000000003",
    );
    let run = |args: &[&str]| {
        let (ok, out, err) = oxvirt(args);
        assert!(ok, "oxvirt {args:?}: {err}");
        out
    };
    run(&[
        "domain",
        "create-volume",
        &dom,
        "--image",
        img,
        "--volume",
        base,
        "--size",
        "64M",
    ]);
    run(&["domain", "snapshot", &dom, "--image", img, "--volume", top]);
    let chains = run(&["domain", "dump-chains", &dom]);
    assert!(chains.contains(base) && chains.contains(top), "{chains}");
    assert!(chains.contains("voltype: INTERNAL") && chains.contains("voltype: LEAF"));
    let check = run(&["domain", "check", "--deep", &dom]);
    assert!(check.contains("0 problems"), "{check}");
    run(&[
        "domain", "merge", &dom, "--image", img, "--base", base, "--top", top,
    ]);
    let images = run(&["domain", "list-images", &dom]);
    assert_eq!(images.trim(), img);
    let info = run(&["domain", "info", "--json", &dom]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["stats"]["volumes"], 1);
    assert_eq!(v["health"]["valid"], true);

    // Paths are not ids; a broken seal is reported.
    let (ok, _, err) = oxvirt(&["domain", "snapshot", &dom, "--image", "../x", "--volume", top]);
    assert!(!ok && err.contains("invalid image id"), "{err}");
    let md = format!("{dom}/dom_md/metadata");
    let text = std::fs::read_to_string(&md).unwrap();
    std::fs::write(&md, text.replace("DESCRIPTION=cli", "DESCRIPTION=clj")).unwrap();
    let (ok, _, err) = oxvirt(&["domain", "check", &dom]);
    assert!(!ok && err.contains("metadata"), "{err}");
}
