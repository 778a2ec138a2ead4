//! Network namespaces standing in for hosts: each [`TestNs`] is a namespace of its own with a
//! unique name, holding the veth pairs a test gives it, and deleted (with everything in it) when
//! dropped, also when the test fails. Only namespaces created here are touched; addresses are
//! only ever assigned inside them.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs `ip args...` in the caller's namespace; panics with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let ip = crate::require_tool("ip");
    let out = Command::new(ip).args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace created for one test.
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    /// `tag` (a few letters) helps telling namespaces apart in `ip netns list`.
    pub fn new(tag: &str) -> TestNs {
        let name = format!(
            "oxt{tag}{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = TestNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; panics with its stderr on failure.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a command inside the namespace; whether it succeeded.
    pub fn try_exec(&self, args: &[&str]) -> bool {
        Command::new(crate::require_tool("ip"))
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A veth pair with both ends in this namespace, up: `nic` plays a host NIC, `peer` the
    /// switch port it is cabled to.
    pub fn veth(&self, nic: &str, peer: &str) {
        self.exec(&["ip", "link", "add", nic, "type", "veth", "peer", "name", peer]);
        self.exec(&["ip", "link", "set", nic, "up"]);
        self.exec(&["ip", "link", "set", peer, "up"]);
    }

    /// A veth pair cabling `nic` here to `other_nic` in `other`, both up.
    pub fn cable(&self, nic: &str, other: &TestNs, other_nic: &str) {
        ip(&[
            "link",
            "add",
            nic,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            other_nic,
            "netns",
            &other.name,
        ]);
        self.exec(&["ip", "link", "set", nic, "up"]);
        other.exec(&["ip", "link", "set", other_nic, "up"]);
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its links once the last process in it (a QEMU) is gone.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
