//! Admin-provided hook scripts at VM lifecycle points, as VDSM runs its hooks.
//!
//! Layout: `<hooks_dir>/<point>/<script>` (e.g. `before_vm_start/50_vlan`), executables run in
//! name order. Each gets the VM in its environment (`OXVIRT_HOOK`, `OXVIRT_VM_ID`,
//! `OXVIRT_VM_NAME`, `OXVIRT_VM_RECORD` = the VM's `vm.json`), runs in its own process group and
//! is killed with that group after the time limit. Its output is logged line by line.
//!
//! A failing `before_*` hook stops the operation (the admin's veto, as in VDSM); a failing
//! `after_*` hook is logged and otherwise ignored, since what it follows already happened.
//!
//! Architecture invariant: a hook never runs unbounded — the time limit covers the script and
//! everything it started.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxvirt_types::VmId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    BeforeVmStart,
    AfterVmDestroy,
    BeforeVmMigrateSource,
    AfterVmMigrateSource,
    BeforeVmMigrateDestination,
    AfterVmMigrateDestination,
    /// Around saving a VM's state and ending its QEMU (suspend).
    BeforeVmHibernate,
    AfterVmHibernate,
    /// Around starting a VM from a saved state.
    BeforeVmDehibernate,
    AfterVmDehibernate,
}

impl HookPoint {
    /// The directory name, VDSM's hook name.
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::BeforeVmStart => "before_vm_start",
            Self::AfterVmDestroy => "after_vm_destroy",
            Self::BeforeVmMigrateSource => "before_vm_migrate_source",
            Self::AfterVmMigrateSource => "after_vm_migrate_source",
            Self::BeforeVmMigrateDestination => "before_vm_migrate_destination",
            Self::AfterVmMigrateDestination => "after_vm_migrate_destination",
            Self::BeforeVmHibernate => "before_vm_hibernate",
            Self::AfterVmHibernate => "after_vm_hibernate",
            Self::BeforeVmDehibernate => "before_vm_dehibernate",
            Self::AfterVmDehibernate => "after_vm_dehibernate",
        }
    }

    /// Whether a failure of this hook vetoes the operation.
    pub fn vetoes(self) -> bool {
        matches!(
            self,
            Self::BeforeVmStart
                | Self::BeforeVmMigrateSource
                | Self::BeforeVmMigrateDestination
                | Self::BeforeVmHibernate
                | Self::BeforeVmDehibernate
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook {script} for VM {vm} failed: {outcome}")]
    Failed {
        script: PathBuf,
        vm: VmId,
        outcome: String,
    },
}

/// What one script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    pub script: PathBuf,
    /// `exit code N`, `killed after <limit>`, or `cannot start: ...`.
    pub outcome: String,
    pub success: bool,
    pub output: String,
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct Hooks {
    dir: Option<PathBuf>,
    limit: Duration,
}

impl Hooks {
    /// `dir: None` runs no hooks.
    pub fn new(dir: Option<PathBuf>, limit: Duration) -> Hooks {
        Hooks { dir, limit }
    }

    /// Runs every script of `point`; for a vetoing point, stops at and returns the first failure.
    pub async fn run(
        &self,
        point: HookPoint,
        vm: VmId,
        vm_name: &str,
        record: &Path,
    ) -> Result<Vec<HookRun>, HookError> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let mut scripts: Vec<PathBuf> = match std::fs::read_dir(dir.join(point.dir_name())) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| is_executable(p))
                .collect(),
            Err(_) => return Ok(Vec::new()),
        };
        scripts.sort();
        let mut runs = Vec::new();
        for script in scripts {
            let run = self.run_one(&script, point, vm, vm_name, record).await;
            for line in run.output.lines() {
                tracing::info!(hook = point.dir_name(), script = %script.display(), vm_id = %vm, "{line}");
            }
            tracing::info!(hook = point.dir_name(), script = %script.display(), vm_id = %vm,
                outcome = %run.outcome, elapsed_ms = run.elapsed.as_millis() as u64, "hook finished");
            if !run.success && point.vetoes() {
                return Err(HookError::Failed {
                    script,
                    vm,
                    outcome: run.outcome,
                });
            }
            runs.push(run);
        }
        Ok(runs)
    }

    async fn run_one(
        &self,
        script: &Path,
        point: HookPoint,
        vm: VmId,
        vm_name: &str,
        record: &Path,
    ) -> HookRun {
        let start = Instant::now();
        let mut cmd = tokio::process::Command::new(script);
        cmd.env("OXVIRT_HOOK", point.dir_name())
            .env("OXVIRT_VM_ID", vm.to_string())
            .env("OXVIRT_VM_NAME", vm_name)
            .env("OXVIRT_VM_RECORD", record)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd.as_std_mut().process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return HookRun {
                    script: script.to_path_buf(),
                    outcome: format!("cannot start: {e}"),
                    success: false,
                    output: String::new(),
                    elapsed: start.elapsed(),
                }
            }
        };
        let pgid = child.id().map(|p| p as libc::pid_t);
        // Read while it runs, so that what a hook said before it was killed is still logged.
        let drain = |r: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut buf).await;
                }
                buf
            })
        };
        let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
        let (outcome, success) = match tokio::time::timeout(self.limit, child.wait()).await {
            Ok(Ok(status)) => {
                let outcome = match status.code() {
                    Some(c) => format!("exit code {c}"),
                    None => format!("{status}"),
                };
                (outcome, status.success())
            }
            Ok(Err(e)) => (format!("cannot wait: {e}"), false),
            Err(_) => {
                // Kill what it started too: a child holding the pipes would keep them open.
                if let Some(pg) = pgid {
                    // SAFETY: kill(2) on the hook's own process group.
                    unsafe { libc::kill(-pg, libc::SIGKILL) };
                }
                let _ = child.wait().await;
                (format!("killed after {:?}", self.limit), false)
            }
        };
        let mut output = String::new();
        for h in [out, err] {
            // Pipes close once the group is gone; a bound in case something escaped it.
            if let Ok(Ok(b)) = tokio::time::timeout(Duration::from_secs(2), h).await {
                output.push_str(&String::from_utf8_lossy(&b));
            }
        }
        HookRun {
            script: script.to_path_buf(),
            outcome,
            success,
            output,
            elapsed: start.elapsed(),
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, point: HookPoint, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let d = dir.join(point.dir_name());
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn hooks_run_in_order_with_the_vm_in_their_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let pt = HookPoint::BeforeVmStart;
        script(dir.path(), pt, "20_b", &format!("echo b >> {}", out.display()));
        script(
            dir.path(),
            pt,
            "10_a",
            &format!(
                "echo \"a $OXVIRT_VM_NAME $OXVIRT_HOOK\" >> {}; echo said-a",
                out.display()
            ),
        );
        std::fs::write(dir.path().join(pt.dir_name()).join("README"), "not executable").unwrap();
        let hooks = Hooks::new(Some(dir.path().into()), Duration::from_secs(10));
        let vm = VmId::new_random();
        let runs = hooks.run(pt, vm, "vm1", Path::new("/x")).await.unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].output.trim(), "said-a");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "a vm1 before_vm_start\nb\n"
        );
        // No directory for a point: nothing to run.
        assert!(hooks
            .run(HookPoint::AfterVmDestroy, vm, "vm1", Path::new("/x"))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_failing_before_hook_vetoes_and_a_slow_one_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child-survived");
        script(dir.path(), HookPoint::BeforeVmStart, "10_no", "exit 7");
        script(
            dir.path(),
            HookPoint::AfterVmDestroy,
            "10_slow",
            &format!(
                "echo started slowly; echo to stderr >&2; (sleep 2; touch {}) & sleep 30",
                marker.display()
            ),
        );
        let hooks = Hooks::new(Some(dir.path().into()), Duration::from_millis(500));
        let vm = VmId::new_random();
        let err = hooks
            .run(HookPoint::BeforeVmStart, vm, "vm1", Path::new("/x"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("exit code 7"), "{err}");
        let start = Instant::now();
        let runs = hooks
            .run(HookPoint::AfterVmDestroy, vm, "vm1", Path::new("/x"))
            .await
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!runs[0].success);
        assert!(runs[0].outcome.contains("killed after"), "{}", runs[0].outcome);
        assert_eq!(
            runs[0].output, "started slowly\nto stderr\n",
            "what a killed hook said is kept for the log"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "the hook's background child outlived the limit");
    }
}
