//! The fence watchdog: a process apart from the node that kills the node's lease-holding QEMUs
//! when the node stops renewing their leases (sanlock's `wdmd`, in userspace).
//!
//! Why: leases are renewed by the node process, but QEMU processes outlive it on purpose (a
//! restarted node finds its VMs again). A node killed with `kill -9` or frozen with `SIGSTOP`
//! therefore leaves QEMUs running while its host id expires, and another host could then start
//! the same VM. The node's own fence timer cannot help (it is dead or frozen with the node);
//! the watchdog can, because it is a separate process in its own session.
//!
//! Protocol: the node connects to the watchdog's unix socket (`<run_dir>/watchdog.sock`, the
//! watchdog started by the node with `oxvirt fence-watchdog` if none answers) and every
//! [`PET_INTERVAL`] writes one JSON line ([`Pet`]): its run directory and, per lockspace
//! (storage domain), the `CLOCK_BOOTTIME` instant at which its host id expires unless renewed
//! (the lease's `valid_until`: last successful renewal + 8N). Nothing else: the watchdog finds
//! the QEMUs holding leases in a lockspace itself, from the VM records in the run directory
//! (`vms/<id>/vm.json` lists the VM's lease domains, `qemu.pid` its process, checked against
//! the QMP socket on its command line), so a VM started just before the node died is covered.
//!
//! # Timeline (N = io_timeout, M = fence margin; t0 = the node's last successful renewal)
//!
//! ```text
//! t0            node's last renewal; the node pets valid_until = t0 + 8N
//! t0 + δ        node killed / frozen (δ < 2N + PET_INTERVAL after the last pet)
//! t0 + 8N       watchdog: deadline passed, SIGKILL every QEMU holding a lease in the
//!               lockspace, confirm each has exited (gone or zombie), keep scanning while expired
//! t0 + 8N + ε   holders gone (ε: a tick, ≤ TICK, plus the kill, milliseconds)
//! ≥ t0 + 8N + M another host may take the host id's resources (VM lease, SPM lease)
//! ```
//!
//! So the margin M must cover ε (with M = 2 s and TICK = 50 ms it does by far); the watchdog
//! fires at the very deadline the node's own fence uses, never earlier, so a node that restarts
//! and pets a new deadline before `t0 + 8N` keeps its VMs (the new node's deadlines replace the
//! old ones). A lockspace the node stops mentioning keeps its last deadline: a restarted node
//! that has not reconnected its pool yet must not disarm the watchdog.
//!
//! What it does not cover: a frozen or dead watchdog (the machine's hardware watchdog would be
//! the next layer, as in sanlock) and a whole-machine freeze (then QEMU is frozen too and the
//! node fences on resume, see the lease crate).
//!
//! The watchdog exits when its socket disappears (the run directory was removed) or when no
//! node has connected for [`IDLE_EXIT`] and no lockspace it guards has live holders.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxvirt_lease::{Clock, SystemClock};
use serde::{Deserialize, Serialize};

/// How often the node pets.
pub const PET_INTERVAL: Duration = Duration::from_millis(200);
/// How often the watchdog checks deadlines.
pub const TICK: Duration = Duration::from_millis(50);
/// How long the watchdog lingers with no node and nothing to guard.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

/// The socket of the watchdog serving a node with this run directory.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("watchdog.sock")
}

/// One pet: the node's whole view, replacing the deadlines of the lockspaces it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pet {
    pub run_dir: PathBuf,
    pub spaces: Vec<SpaceDeadline>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaceDeadline {
    /// The lockspace name (the storage domain UUID).
    pub space: String,
    /// `CLOCK_BOOTTIME` nanoseconds at which the node's host id there expires.
    pub valid_until_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("cannot listen on the watchdog socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another fence watchdog already serves {path}")]
    AlreadyRunning { path: PathBuf },
}

/// The guarded state, shared by the connection threads and the deadline loop.
#[derive(Debug, Default)]
struct Guard {
    run_dir: Option<PathBuf>,
    /// Lockspace → expiry (boottime) and whether it fired.
    spaces: BTreeMap<String, (Duration, bool)>,
    connections: usize,
    last_connection: Option<Instant>,
}

impl Guard {
    fn apply(&mut self, pet: Pet) {
        self.run_dir = Some(pet.run_dir);
        for s in pet.spaces {
            let until = Duration::from_nanos(s.valid_until_ns);
            let e = self.spaces.entry(s.space).or_insert((until, false));
            if until != e.0 {
                *e = (until, false);
            }
        }
    }
}

/// A QEMU of the node holding leases: its pid and the VM it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub vm: String,
    pub pid: u32,
}

/// The live QEMUs in `run_dir` whose VM holds leases in lockspace `space`.
pub fn holders(run_dir: &Path, space: &str) -> Vec<Holder> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir.join("vms")) else {
        return out;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(text) = std::fs::read_to_string(dir.join("vm.json")) else {
            continue;
        };
        let Ok(rec) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let holds = rec["create"]["lease_domains"]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d.as_str() == Some(space)));
        if !holds {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        // The pid must still be this VM's QEMU (pids are reused): its command line names
        // the VM's QMP socket, as the node checks when it re-attaches.
        let marker = dir.join("qmp.sock").display().to_string();
        if alive(pid) && cmdline_contains(pid, &marker) {
            out.push(Holder {
                vm: e.file_name().to_string_lossy().into_owned(),
                pid,
            });
        }
    }
    out
}

fn cmdline_contains(pid: u32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(marker))
    })
}

/// Running (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// SIGKILLs the holders and waits (bounded) until each has exited; returns the pids that did.
pub fn kill_holders(hs: &[Holder], within: Duration) -> Vec<u32> {
    for h in hs {
        // SAFETY: kill(2) with a pid we just verified belongs to the VM's QEMU.
        unsafe {
            libc::kill(h.pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let start = Instant::now();
    while hs.iter().any(|h| alive(h.pid)) && start.elapsed() < within {
        std::thread::sleep(Duration::from_millis(5));
    }
    hs.iter().filter(|h| !alive(h.pid)).map(|h| h.pid).collect()
}

/// `oxvirt fence-watchdog`: serves `socket` until it disappears or there is nothing to guard.
pub fn serve(socket: &Path) -> Result<(), WatchdogError> {
    if UnixStream::connect(socket).is_ok() {
        return Err(WatchdogError::AlreadyRunning {
            path: socket.to_path_buf(),
        });
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|source| WatchdogError::Listen {
        path: socket.to_path_buf(),
        source,
    })?;
    let guard = Arc::new(Mutex::new(Guard {
        last_connection: Some(Instant::now()),
        ..Guard::default()
    }));
    let g = guard.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || read_pets(conn, g));
        }
    });
    tracing::info!(socket = %socket.display(), "fence watchdog serving");
    let clock = SystemClock;
    let mut last_scan = Instant::now();
    loop {
        std::thread::sleep(TICK);
        if !socket.exists() {
            tracing::info!("watchdog socket removed; exiting");
            return Ok(());
        }
        let now = clock.now();
        let (run_dir, expired, idle) = {
            let g = guard.lock().expect("watchdog state");
            let expired: Vec<(String, bool)> = g
                .spaces
                .iter()
                .filter(|(_, (until, _))| now >= *until)
                .map(|(s, (_, fired))| (s.clone(), *fired))
                .collect();
            let idle = g.connections == 0 && g.last_connection.is_some_and(|t| t.elapsed() >= IDLE_EXIT);
            (g.run_dir.clone(), expired, idle)
        };
        let Some(run_dir) = run_dir else {
            if idle {
                return Ok(());
            }
            continue;
        };
        // Fire at once on a fresh expiry; after that rescan once a second for stragglers.
        let rescan = last_scan.elapsed() >= Duration::from_secs(1);
        for (space, fired) in &expired {
            if *fired && !rescan {
                continue;
            }
            let hs = holders(&run_dir, space);
            if !hs.is_empty() {
                let t = Instant::now();
                let killed = kill_holders(&hs, Duration::from_secs(5));
                tracing::error!(
                    space = %space, holders = ?hs, killed = ?killed,
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "node stopped renewing its host id: killed the lease holders"
                );
            }
            if let Some(e) = guard.lock().expect("watchdog state").spaces.get_mut(space) {
                e.1 = true;
            }
        }
        if rescan {
            last_scan = Instant::now();
        }
        if idle {
            let guarded = guard
                .lock()
                .expect("watchdog state")
                .spaces
                .iter()
                .any(|(s, (until, _))| now < *until && !holders(&run_dir, s).is_empty());
            if !guarded {
                tracing::info!("no node and nothing to guard; exiting");
                return Ok(());
            }
        }
    }
}

fn read_pets(conn: UnixStream, guard: Arc<Mutex<Guard>>) {
    guard.lock().expect("watchdog state").connections += 1;
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Pet>(&line) {
            Ok(p) => guard.lock().expect("watchdog state").apply(p),
            Err(e) => tracing::warn!(error = %e, "ignoring a malformed pet"),
        }
    }
    let mut g = guard.lock().expect("watchdog state");
    g.connections -= 1;
    g.last_connection = Some(Instant::now());
}

/// The node's side: keeps a watchdog running and pets it.
pub struct Petter {
    socket: PathBuf,
    run_dir: PathBuf,
    program: PathBuf,
    stream: Option<UnixStream>,
}

impl Petter {
    /// `program` is the `oxvirt` binary (started as `program fence-watchdog --socket S`).
    pub fn new(run_dir: &Path, program: &Path) -> Petter {
        Petter {
            socket: socket_path(run_dir),
            run_dir: run_dir.to_path_buf(),
            program: program.to_path_buf(),
            stream: None,
        }
    }

    /// Connects to the watchdog, starting one (in its own session, so it survives us) if none
    /// answers.
    fn connect(&mut self) -> std::io::Result<&mut UnixStream> {
        if self.stream.is_none() {
            let s = match UnixStream::connect(&self.socket) {
                Ok(s) => s,
                Err(_) => {
                    self.spawn()?;
                    let start = Instant::now();
                    loop {
                        match UnixStream::connect(&self.socket) {
                            Ok(s) => break s,
                            Err(e) if start.elapsed() > Duration::from_secs(5) => return Err(e),
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                }
            };
            s.set_write_timeout(Some(Duration::from_secs(1)))?;
            self.stream = Some(s);
        }
        Ok(self.stream.as_mut().expect("connected"))
    }

    fn spawn(&self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("watchdog.log"))?;
        let mut cmd = std::process::Command::new(&self.program);
        cmd.arg("fence-watchdog")
            .arg("--socket")
            .arg(&self.socket)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid(2) is async-signal-safe; it detaches the watchdog from our session
        // and process group so that signals aimed at the node do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        tracing::info!(pid = child.id(), socket = %self.socket.display(), "fence watchdog started");
        // Reap it if it exits while we live; it is not ours to wait for otherwise.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        Ok(())
    }

    /// Sends one pet; reconnects (or restarts the watchdog) on failure.
    pub fn pet(&mut self, spaces: Vec<SpaceDeadline>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&Pet {
            run_dir: self.run_dir.clone(),
            spaces,
        })
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        let r = self.connect().and_then(|s| s.write_all(&line));
        if r.is_err() {
            self.stream = None;
        }
        r
    }
}

/// Starts petting for `node`: a thread that sends the deadlines of its lockspaces every
/// [`PET_INTERVAL`] for as long as the process lives.
pub fn start_petting(node: &Arc<crate::service::Node>, program: &Path) {
    let mut petter = Petter::new(&node.config.run_dir, program);
    let pools = node.pools.clone();
    std::thread::Builder::new()
        .name("fence-watchdog-pet".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                let spaces = pools
                    .current()
                    .map(|cp| cp.lockspace_deadlines())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(sd, until)| SpaceDeadline {
                        space: sd.to_string(),
                        valid_until_ns: u64::try_from(until.as_nanos()).unwrap_or(u64::MAX),
                    })
                    .collect();
                match petter.pet(spaces) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "cannot pet the fence watchdog")
                    }
                    Err(_) => {}
                }
                std::thread::sleep(PET_INTERVAL);
            }
        })
        .expect("spawn the watchdog petting thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pet_replaces_deadlines_and_rearms_a_fired_space() {
        let mut g = Guard::default();
        let pet = |until: u64| Pet {
            run_dir: "/run/x".into(),
            spaces: vec![SpaceDeadline {
                space: "sd1".into(),
                valid_until_ns: until,
            }],
        };
        g.apply(pet(1_000));
        assert_eq!(g.spaces["sd1"], (Duration::from_nanos(1_000), false));
        g.spaces.get_mut("sd1").unwrap().1 = true;
        g.apply(pet(1_000));
        assert!(g.spaces["sd1"].1, "the same deadline does not re-arm");
        g.apply(pet(5_000));
        assert_eq!(g.spaces["sd1"], (Duration::from_nanos(5_000), false));
        // A pet that does not name a space leaves its deadline in force.
        g.apply(Pet {
            run_dir: "/run/x".into(),
            spaces: vec![],
        });
        assert_eq!(g.spaces["sd1"], (Duration::from_nanos(5_000), false));
    }

    #[test]
    fn holders_are_found_by_record_and_checked_against_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vms/vm-a");
        std::fs::create_dir_all(&vm).unwrap();
        let marker = vm.join("qmp.sock").display().to_string();
        // A real process whose command line names the marker stands in for QEMU.
        // Its `sleep` outlives the killed shell: no pipe of the test runner is left open by it.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true", &marker])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(vm.join("qemu.pid"), child.id().to_string()).unwrap();
        // Until the exec, the child's command line is ours.
        let start = Instant::now();
        while !cmdline_contains(child.id(), &marker) {
            assert!(start.elapsed() < Duration::from_secs(10), "sh never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let rec = serde_json::json!({ "create": { "lease_domains": ["sd1"] } });
        std::fs::write(vm.join("vm.json"), rec.to_string()).unwrap();
        assert!(holders(dir.path(), "sd2").is_empty());
        let hs = holders(dir.path(), "sd1");
        assert_eq!(
            hs,
            vec![Holder {
                vm: "vm-a".into(),
                pid: child.id()
            }]
        );
        // A reused pid (another command line) is not a holder.
        let mut other = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        while !cmdline_contains(other.id(), "sleep") {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(vm.join("qemu.pid"), other.id().to_string()).unwrap();
        assert!(holders(dir.path(), "sd1").is_empty());
        other.kill().unwrap();
        other.wait().unwrap();
        std::fs::write(vm.join("qemu.pid"), child.id().to_string()).unwrap();
        let killed = kill_holders(&hs, Duration::from_secs(5));
        // Our child turns zombie until reaped: it counts as exited.
        assert_eq!(killed, vec![child.id()]);
        let st = child.wait().unwrap();
        assert!(!st.success());
        assert!(holders(dir.path(), "sd1").is_empty());
    }
}
