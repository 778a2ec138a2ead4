//! `oxvirt up` as a child process: the real binary on a data directory, its output read line by
//! line, stopped on drop (with any QEMU of its directory it left running).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first of `n` consecutive free ports on loopback (node i of `oxvirt up` listens on the
/// first + i).
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let first = free_port();
        if first.checked_add(n).is_none() {
            continue;
        }
        let held: Vec<_> = (first..first + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return first;
        }
    }
    panic!("no {n} consecutive free ports on 127.0.0.1");
}

pub struct Up {
    pub child: Child,
    data: PathBuf,
    lines: mpsc::Receiver<String>,
    output: Vec<String>,
}

impl Up {
    /// `oxvirt up --data DATA` with `nodes` nodes on TCG and lease timing that holds on a
    /// loaded machine; `password` is OXVIRT_ADMIN_PASSWORD (`None`: the engine makes one up).
    pub fn start(data: &Path, listen: &str, node_port: u16, nodes: u16, password: Option<&str>) -> Up {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oxvirt"));
        cmd.args(["up", "--data"])
            .arg(data)
            .args([
                "--listen",
                listen,
                "--nodes",
                &nodes.to_string(),
                "--node-port",
                &node_port.to_string(),
                "--accel",
                "tcg",
                "--io-timeout",
                "2",
                "--fence-margin",
                "4",
                "--monitor-interval",
                "1",
            ])
            .env("OXVIRT_LOG", "info")
            .env_remove("OXVIRT_ADMIN_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = password {
            cmd.env("OXVIRT_ADMIN_PASSWORD", p);
        }
        let mut child = cmd.spawn().expect("start oxvirt up");
        let (tx, lines) = mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
        }
        Up {
            child,
            data: data.to_path_buf(),
            lines,
            output: Vec::new(),
        }
    }

    /// Reads output until a line contains `needle`; returns that line.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(needle);
                    self.output.push(l.clone());
                    if hit {
                        return l;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "oxvirt up did not print {needle:?} within {limit:?} (exit: {status:?}):\n{}\n{}",
                        self.output.join("\n"),
                        self.node_log()
                    );
                }
            }
        }
    }

    /// The last lines of output so far.
    pub fn drain(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.output.push(l);
        }
        let n = self.output.len();
        self.output[n.saturating_sub(80)..].join("\n")
    }

    pub fn node_log(&self) -> String {
        let p = self.data.join("nodes/node1/node.log");
        let s = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        format!(
            "--- {} (tail) ---\n{}",
            p.display(),
            lines[lines.len().saturating_sub(60)..].join("\n")
        )
    }

    /// Ctrl-C: SIGINT, then waits up to `limit` for `oxvirt up` to exit.
    pub fn interrupt(&mut self, limit: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "oxvirt up still runs {limit:?} after Ctrl-C:\n{}",
                self.drain()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child; SIGTERM lets `oxvirt up` stop its nodes.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // VMs outlive `oxvirt up` by design; those of this test (their files are under its
        // data directory) go with it.
        kill_processes_mentioning(&self.data);
    }
}

/// The processes whose command line names `dir` (pids).
pub fn processes_mentioning(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&needle).then_some(pid)
        })
        .collect()
}

fn kill_processes_mentioning(dir: &Path) {
    for pid in processes_mentioning(dir) {
        // SAFETY: kill(2) on a process this test started (it names our temp directory).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
