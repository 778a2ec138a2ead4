//! The web admin portal in a real headless Chromium against a live `oxvirt up` (the real
//! binary: engine, one node, local storage, TCG): log in, create a VM, make a template, create
//! a VM from it, start it and watch it turn up, read its console, snapshot it, power it off.
//!
//! The browser is Debian's `chromium`; Playwright's `playwright-core` (pinned by
//! crates/oxvirt/tests/browser/package-lock.json) is installed by `npm ci` into
//! target/browser-test/ on the first run. Screenshots land in target/browser-test/screens/.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::up::{free_port, Up};
use oxvirt_testkit::{repo_root, require_tool, TestGuest};

const PASSWORD: &str = "portal-browser-test";

/// The browser: `OXVIRT_CHROMIUM` or Debian's `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    let p = std::env::var_os("OXVIRT_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        p.is_file(),
        "this test needs the tool `chromium` ({} is missing): run scripts/deps.sh",
        p.display()
    );
    p
}

/// `npm ci` of the pinned playwright-core into `dir`, skipped when the lock file is unchanged.
fn install_playwright(dir: &Path) {
    let src = repo_root().join("crates/oxvirt/tests/browser");
    std::fs::create_dir_all(dir).unwrap();
    let lock = std::fs::read(src.join("package-lock.json")).expect("read package-lock.json");
    let stamp = dir.join("node_modules/.oxvirt-lock");
    if std::fs::read(&stamp).ok().as_deref() == Some(&lock[..])
        && dir.join("node_modules/playwright-core/package.json").is_file()
    {
        return;
    }
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let npm = require_tool("npm");
    let out = Command::new(npm)
        .args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .current_dir(dir)
        .output()
        .expect("run npm ci");
    assert!(
        out.status.success(),
        "npm ci (playwright-core) failed in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(stamp, lock).unwrap();
}

#[test]
fn portal_in_chromium_drives_a_vm_from_a_template() {
    let browser = chromium();
    let node = require_tool("node");
    let guest = TestGuest::get();
    let work = repo_root().join("target/browser-test");
    let t = Instant::now();
    install_playwright(&work);
    eprintln!("playwright-core ready in {:.1} s", t.elapsed().as_secs_f64());
    let screens = work.join("screens");
    let _ = std::fs::remove_dir_all(&screens);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let t = Instant::now();
    let data = tempfile::Builder::new()
        .prefix("oxvirt-portal-")
        .tempdir()
        .unwrap();
    let mut up = Up::start(data.path(), &listen, free_port(), 1, Some(PASSWORD));
    up.wait_for("oxvirt is up", Duration::from_secs(150));
    eprintln!("oxvirt up ready in {:.1} s", t.elapsed().as_secs_f64());

    // ES modules resolve packages next to the script, so it runs from the install directory.
    let script = work.join("portal.mjs");
    std::fs::copy(
        repo_root().join("crates/oxvirt/tests/browser/portal.mjs"),
        &script,
    )
    .unwrap();
    let t = Instant::now();
    let mut child = Command::new(node)
        .arg(&script)
        .env("OXVIRT_PORTAL", format!("https://{listen}"))
        .env("OXVIRT_PASSWORD", PASSWORD)
        .env("OXVIRT_KERNEL", &guest.kernel)
        .env("OXVIRT_INITRD", &guest.initrd)
        .env("OXVIRT_CMDLINE", TestGuest::append(&["oxvirt.marker=portal"]))
        .env("OXVIRT_SCREENS", &screens)
        .env("OXVIRT_CHROMIUM", &browser)
        .current_dir(&work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let read = |r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || std::io::read_to_string(r).unwrap_or_default())
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let limit = Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let report = format!(
        "{}\n--- stderr ---\n{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    eprintln!("browser script ({:.1} s):\n{report}", t.elapsed().as_secs_f64());
    let ok = status.is_some_and(|s| s.success());
    if !ok {
        panic!(
            "the browser script failed ({status:?}; screenshots in {}):\n{report}\n--- oxvirt up ---\n{}\n{}",
            screens.display(),
            up.drain(),
            up.node_log()
        );
    }
    for s in [
        "login.png",
        "dashboard.png",
        "vm-up.png",
        "vm-snapshot.png",
        "confirm.png",
        "vm-down.png",
    ] {
        let p = screens.join(s);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(
            len > 10_000,
            "screenshot {} is missing or empty ({len} bytes)",
            p.display()
        );
    }
}
