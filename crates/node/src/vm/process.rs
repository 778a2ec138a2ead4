//! QEMU processes that outlive the node.
//!
//! QEMU is spawned in its own session (`setsid`), with stdin on `/dev/null` and stdout/stderr
//! appended to a log file in the VM's run directory, so nothing ties it to the node: a node
//! killed with SIGKILL leaves its VMs running. Exit is watched through a pidfd, which works
//! whether or not the watcher is QEMU's parent — the node that spawned QEMU reaps it and learns
//! its exit status; a node that recovered it after a restart only learns that it is gone.
//!
//! Architecture invariant: a pid is only trusted through a pidfd opened on it and only after
//! `/proc/<pid>/cmdline` shows it is the QEMU of that VM (pids are reused).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;

use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch process {pid}")]
    Pidfd {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} is not the QEMU of this VM (its command line lacks {marker})")]
    NotOurs { pid: u32, marker: String },
}

/// A process watched through a pidfd.
pub struct Process {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
    /// Present when this node spawned the process: needed to reap it and read its status.
    child: Mutex<Option<Child>>,
}

/// How a watched process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// This node was the parent and reaped it.
    Status(String),
    /// Recovered after a node restart: gone, status unknown.
    Unknown,
}

impl Process {
    /// Spawns `binary args` detached from the node.
    pub fn spawn_detached(binary: &Path, args: &[String], log: &Path) -> Result<Process, ProcessError> {
        Process::spawn_detached_in(binary, args, log, None)
    }

    /// Spawns `binary args` detached from the node, inside network namespace `netns` (an open
    /// namespace file) when given: the host network the node manages, where the VM's taps are.
    pub fn spawn_detached_in(
        binary: &Path,
        args: &[String],
        log: &Path,
        netns: Option<std::os::fd::RawFd>,
    ) -> Result<Process, ProcessError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Log {
                path: log.to_path_buf(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| ProcessError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        let mut cmd = Command::new(binary);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = netns {
                    crate::net::netns::enter(fd)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id();
        let fd = pidfd_open(pid).map_err(|source| ProcessError::Pidfd { pid, source })?;
        Ok(Process {
            pid,
            fd,
            child: Mutex::new(Some(child)),
        })
    }

    /// Re-attaches to a running process after a node restart. `marker` must appear in its
    /// command line (the VM's QMP socket path is unique to it).
    pub fn attach(pid: u32, marker: &str) -> Result<Process, ProcessError> {
        let fd = pidfd_open(pid).map_err(|source| ProcessError::Pidfd { pid, source })?;
        // Checked after opening the pidfd: if the pid was reused before the open, the command
        // line tells; if the process exits after the check, the pidfd tells.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let found = cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(marker));
        if !found {
            return Err(ProcessError::NotOurs {
                pid,
                marker: marker.to_string(),
            });
        }
        Ok(Process {
            pid,
            fd,
            child: Mutex::new(None),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & libc::POLLIN != 0
    }

    /// Waits until the process exits; reaps it when we are its parent.
    pub async fn wait(&self) -> Exit {
        loop {
            match self.fd.readable().await {
                Ok(mut guard) => {
                    if self.has_exited() {
                        break;
                    }
                    guard.clear_ready();
                }
                Err(e) => {
                    // Cannot happen for a valid pidfd; fall back to polling.
                    tracing::warn!(pid = self.pid, error = %e, "pidfd readiness failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if self.has_exited() {
                        break;
                    }
                }
            }
        }
        let mut child = self.child.lock().unwrap();
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(st))) => Exit::Status(describe(st)),
            _ => Exit::Unknown,
        }
    }

    /// Sends `signal` through the pidfd (never to a reused pid).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ESRCH: already gone, which is what the caller wanted.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

fn pidfd_open(pid: u32) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd keeps the pidfd open and unchanged until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(io::Error::from)
}

/// Reads QEMU's `-pidfile`.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last `n` lines of a log file, for "why did QEMU die".
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return String::new();
    };
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = String::new();
    let _ = f.read_to_string(&mut buf);
    let lines: Vec<&str> = buf.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detached_process_is_watched_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let p = Process::spawn_detached(
            Path::new("/bin/sh"),
            &["-c".into(), "echo hello; echo oops >&2; exit 3".into()],
            &log,
        )
        .unwrap();
        // Its own session: not the test's process group.
        assert_eq!(p.wait().await, Exit::Status("exit code 3".into()));
        assert!(p.has_exited());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello") && text.contains("oops"), "{text}");
        assert_eq!(log_tail(&log, 1), "oops");
    }

    #[tokio::test]
    async fn attach_checks_the_command_line_and_signals_via_pidfd() {
        let dir = tempfile::tempdir().unwrap();
        let p = Process::spawn_detached(Path::new("/bin/sleep"), &["30".into()], &dir.path().join("log"))
            .unwrap();
        let sid = unsafe { libc::getsid(p.pid() as libc::pid_t) };
        assert_eq!(sid, p.pid() as libc::pid_t, "QEMU leads its own session");
        assert!(matches!(
            Process::attach(p.pid(), "not-in-cmdline"),
            Err(ProcessError::NotOurs { .. })
        ));
        let other = Process::attach(p.pid(), "30").unwrap();
        assert!(!other.has_exited());
        other.signal(libc::SIGKILL).unwrap();
        assert_eq!(other.wait().await, Exit::Unknown, "not our child");
        assert_eq!(
            p.wait().await,
            Exit::Status("killed by signal 9".into()),
            "the parent reaps it"
        );
        // Signalling a process that is gone is not an error.
        other.signal(libc::SIGKILL).unwrap();
    }
}
