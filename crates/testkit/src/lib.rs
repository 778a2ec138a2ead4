//! Test support shared by the crates' integration tests.
//!
//! Architecture invariant: nothing here fakes the data path. These helpers find real tools and
//! the real test guest, and fail loudly — naming what is missing and how to get it — instead of
//! letting a test skip.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod faultfs;
pub mod netns;

/// The repository's root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("repo root")
        .to_path_buf()
}

/// Whether process `pid` is alive (exists and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

/// Full path of a required command, or a panic that names it.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Root's tools (dnsmasq, sanlock) live in sbin, which a CI's PATH may leave out.
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("this test needs the tool `{name}`, which is not on PATH: run scripts/deps.sh")
        })
}

/// The test guest built by `scripts/test-guest.sh`.
#[derive(Debug, Clone)]
pub struct TestGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl TestGuest {
    /// Locates the guest (`OXVIRT_TEST_GUEST_DIR` or `<repo>/target/test-guest`).
    pub fn get() -> TestGuest {
        let dir = std::env::var_os("OXVIRT_TEST_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/test-guest"));
        let g = TestGuest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
        };
        if !g.kernel.is_file() || !g.initrd.is_file() {
            panic!(
                "the test guest is missing from {}: run scripts/test-guest.sh",
                dir.display()
            );
        }
        g
    }

    /// A kernel command line for the guest's init (see scripts/test-guest.sh):
    /// `args` are `oxvirt.*` words such as `oxvirt.write_mib=4`.
    pub fn append(args: &[&str]) -> String {
        let mut s = String::from("console=ttyS0 quiet panic=-1");
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// `oxvirt.run=` carrying a shell script (base64, since the kernel command line splits on spaces).
    pub fn run_arg(script: &str) -> String {
        format!("oxvirt.run={}", base64(script.as_bytes()))
    }
}

/// Makes an ISO 9660 image at `iso` (volume id `OXVIRT`) holding `files` (name, contents) with
/// xorriso. `boot_args`: make it bootable with isolinux, booting the test guest with these
/// `oxvirt.*` words, as an installer CD boots its kernel.
pub fn make_iso(iso: &Path, files: &[(&str, &[u8])], boot_args: Option<&[&str]>) {
    let root = iso.with_extension("root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    for (name, data) in files {
        std::fs::write(root.join(name), data).unwrap();
    }
    let mut cmd = std::process::Command::new(require_tool("xorriso"));
    cmd.args(["-as", "mkisofs", "-quiet", "-V", "OXVIRT", "-o"])
        .arg(iso);
    if let Some(args) = boot_args {
        let g = TestGuest::get();
        let boot = root.join("isolinux");
        std::fs::create_dir_all(&boot).unwrap();
        for (src, pkg) in [
            ("/usr/lib/ISOLINUX/isolinux.bin", "isolinux"),
            ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common"),
        ] {
            let src = Path::new(src);
            assert!(
                src.is_file(),
                "this test needs {} from the Debian package `{pkg}`: run scripts/deps.sh",
                src.display()
            );
            std::fs::copy(src, boot.join(src.file_name().unwrap())).unwrap();
        }
        std::fs::copy(&g.kernel, root.join("vmlinuz")).unwrap();
        std::fs::copy(&g.initrd, root.join("initrd.gz")).unwrap();
        let cfg = format!(
            "DEFAULT guest\nPROMPT 0\nTIMEOUT 1\nLABEL guest\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  APPEND {}\n",
            TestGuest::append(args)
        );
        std::fs::write(boot.join("isolinux.cfg"), cfg).unwrap();
        cmd.args([
            "-b",
            "isolinux/isolinux.bin",
            "-c",
            "isolinux/boot.cat",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
        ]);
    }
    let out = cmd.arg(&root).output().unwrap();
    assert!(
        out.status.success(),
        "xorriso failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Polls `path` until it contains `needle` or `timeout` passes; returns the file's text.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "{needle:?} did not appear in {} within {timeout:?}; it holds:\n{text}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"echo hi; sync"), "ZWNobyBoaTsgc3luYw==");
    }

    #[test]
    fn append_keeps_console_first() {
        let s = TestGuest::append(&["oxvirt.marker=x"]);
        assert!(s.starts_with("console=ttyS0"));
        assert!(s.ends_with(" oxvirt.marker=x"));
    }
}
