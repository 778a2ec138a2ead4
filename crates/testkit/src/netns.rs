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
        let (m1, m2) = (nic_mac(), nic_mac());
        self.exec(&[
            "ip", "link", "add", nic, "address", &m1, "type", "veth", "peer", "name", peer, "address", &m2,
        ]);
        self.exec(&["ip", "link", "set", nic, "up"]);
        self.exec(&["ip", "link", "set", peer, "up"]);
    }

    /// A veth pair cabling `nic` here to `other_nic` in `other`, both up.
    pub fn cable(&self, nic: &str, other: &TestNs, other_nic: &str) {
        let (m1, m2) = (nic_mac(), nic_mac());
        ip(&[
            "link",
            "add",
            nic,
            "address",
            &m1,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            other_nic,
            "address",
            &m2,
            "netns",
            &other.name,
        ]);
        self.exec(&["ip", "link", "set", nic, "up"]);
        other.exec(&["ip", "link", "set", other_nic, "up"]);
    }
}

/// A MAC for a new test NIC: `02:` (locally administered, below the `fe:` of VM taps, as a
/// vendor's NIC is), this process's id and a count, so no two test NICs share one. A random veth
/// MAC could start with `fe` and sort above a tap's, making the bridge's MAC change with the VMs
/// on it.
fn nic_mac() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    let pid = std::process::id().to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        pid[1], pid[2], pid[3], n[2], n[3]
    )
}

impl Drop for TestNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its links once the last process in it (a QEMU) is gone.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// dnsmasq serving DHCP only (no DNS) on `nic` inside `ns` (which must have an address in the
/// range's /24), handing out `first..=last` with `router` as the default gateway and as the DNS
/// server (which the clients under test must ignore). Killed, its lease file removed, when
/// dropped.
pub struct DhcpServer {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl DhcpServer {
    pub fn start(ns: &TestNs, nic: &str, first: &str, last: &str, router: &str) -> DhcpServer {
        let dnsmasq = crate::require_tool("dnsmasq");
        let dir = std::env::temp_dir().join(format!("{}-dhcp", ns.name));
        std::fs::create_dir_all(&dir).expect("dnsmasq's directory");
        let child = Command::new(crate::require_tool("ip"))
            .args(["netns", "exec", &ns.name])
            .arg(dnsmasq)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--user=root",
                "--bind-interfaces",
                &format!("--interface={nic}"),
                &format!("--dhcp-range={first},{last},255.255.255.0,2m"),
                &format!("--dhcp-option=option:router,{router}"),
                &format!("--dhcp-option=option:dns-server,{router}"),
                "--dhcp-authoritative",
                "--pid-file",
            ])
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        DhcpServer { child, dir }
    }

    /// The lease file's lines (expiry, MAC, address, hostname, client id).
    pub fn leases(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("leases"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
