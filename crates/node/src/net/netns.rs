//! The network namespace the node manages as "the host's network".
//!
//! Normally that is the node's own namespace. A node given a named namespace (`ip netns add`,
//! `/run/netns/<name>`) wires everything there instead: netlink sockets are opened inside it,
//! taps are created inside it, and QEMU is started inside it, while the node's API socket stays
//! where the node runs. That is how several nodes on one machine each get a host network of
//! their own (tests, `oxvirt up --nodes N`).
//!
//! Invariant: the node's own threads never change namespace; work inside a foreign one runs on a
//! short-lived thread that enters it, and sockets opened there stay bound to it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

/// Where named namespaces live (iproute2's convention).
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, Clone, Default)]
pub struct NetNs {
    name: Option<String>,
    file: Option<Arc<File>>,
}

impl NetNs {
    /// The node's own namespace.
    pub fn current() -> NetNs {
        NetNs::default()
    }

    /// A namespace created with `ip netns add <name>`.
    pub fn named(name: &str) -> io::Result<NetNs> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a namespace name"),
            ));
        }
        let file = File::open(PathBuf::from(NETNS_RUN_DIR).join(name))?;
        Ok(NetNs {
            name: Some(name.to_string()),
            file: Some(Arc::new(file)),
        })
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The namespace's file descriptor, for `setns` in a child before `exec`.
    pub fn fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    /// Runs `f` inside the namespace (on a thread of its own when the namespace is foreign).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let Some(fd) = self.fd() else {
            return f();
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(fd)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace worker panicked")))
        })
    }

    /// A netlink route socket bound to this namespace.
    pub fn netlink_socket(&self) -> io::Result<OwnedFd> {
        self.run(|| {
            // SAFETY: plain socket(2) call; the result is checked before use.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    libc::NETLINK_ROUTE,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor we own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
    }
}

/// `setns(fd, CLONE_NEWNET)` for the calling thread. Async-signal-safe: usable in `pre_exec`.
pub fn enter(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns only reads its arguments.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
