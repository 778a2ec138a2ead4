//! Kernel same-page merging, as oVirt's MoM reports and tunes it: `/sys/kernel/mm/ksm`.
//!
//! Architecture invariant: only the knobs named here are written, all validated before the
//! first write, and a write failing half-way restores the knobs already written, so bad input
//! or a refusing kernel changes nothing. A kernel without KSM (`CONFIG_KSM` off: no sysfs
//! directory) gives [`KsmError::Unavailable`], never a partial state.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    #[error("KSM is not available on this host: {dir} is missing (kernel built without CONFIG_KSM)")]
    Unavailable { dir: PathBuf },
    #[error("cannot read KSM setting {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write KSM setting {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("KSM setting {path} holds {value:?}, not a number")]
    Parse { path: PathBuf, value: String },
    #[error("KSM {what} must be between {min} and {max}, got {value}")]
    OutOfRange {
        what: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

/// `run`: 0 stops merging (merged pages stay merged), 1 runs, 2 stops and unmerges everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KsmRun {
    Stop,
    Run,
    Unmerge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmState {
    pub run: KsmRun,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub full_scans: u64,
    /// `None` on kernels built without NUMA (no such knob).
    pub merge_across_nodes: Option<bool>,
}

/// A change of KSM's knobs as MoM asks for it (VDSM's `ksmTune` keys); absent knobs stay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KsmTune {
    #[serde(default)]
    pub run: Option<KsmRun>,
    #[serde(default)]
    pub pages_to_scan: Option<u64>,
    #[serde(default)]
    pub sleep_millisecs: Option<u64>,
    #[serde(default)]
    pub merge_across_nodes: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct Ksm {
    dir: PathBuf,
}

impl Default for Ksm {
    fn default() -> Self {
        Ksm::new(Path::new(KSM_SYSFS))
    }
}

impl Ksm {
    pub fn new(dir: &Path) -> Ksm {
        Ksm {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the kernel has KSM at all.
    pub fn available(&self) -> bool {
        self.dir.join("run").exists()
    }

    fn require(&self) -> Result<(), KsmError> {
        if self.available() {
            Ok(())
        } else {
            Err(KsmError::Unavailable {
                dir: self.dir.clone(),
            })
        }
    }

    fn read(&self, name: &str) -> Result<u64, KsmError> {
        let path = self.dir.join(name);
        let s = std::fs::read_to_string(&path).map_err(|source| KsmError::Read {
            path: path.clone(),
            source,
        })?;
        s.trim().parse().map_err(|_| KsmError::Parse {
            path,
            value: s.trim().to_string(),
        })
    }

    fn write(&self, name: &str, v: u64) -> Result<(), KsmError> {
        let path = self.dir.join(name);
        std::fs::write(&path, v.to_string()).map_err(|source| KsmError::Write { path, source })
    }

    pub fn state(&self) -> Result<KsmState, KsmError> {
        self.require()?;
        let run = match self.read("run")? {
            0 => KsmRun::Stop,
            2 => KsmRun::Unmerge,
            _ => KsmRun::Run,
        };
        Ok(KsmState {
            run,
            pages_to_scan: self.read("pages_to_scan")?,
            sleep_millisecs: self.read("sleep_millisecs")?,
            pages_shared: self.read("pages_shared")?,
            pages_sharing: self.read("pages_sharing")?,
            full_scans: self.read("full_scans")?,
            merge_across_nodes: if self.dir.join("merge_across_nodes").exists() {
                Some(self.read("merge_across_nodes")? != 0)
            } else {
                None
            },
        })
    }

    /// Applies `tune` (validated as a whole first; a knob the kernel refuses undoes the ones
    /// already written) and returns the state read back.
    pub fn apply(&self, tune: &KsmTune) -> Result<KsmState, KsmError> {
        let before = self.state()?;
        if let Some(v) = tune.pages_to_scan {
            check("pages_to_scan", v, 1, 100_000)?;
        }
        if let Some(v) = tune.sleep_millisecs {
            check("sleep_millisecs", v, 1, 60_000)?;
        }
        if tune.merge_across_nodes.is_some() && before.merge_across_nodes.is_none() {
            return Err(KsmError::Write {
                path: self.dir.join("merge_across_nodes"),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "this kernel has no NUMA merge knob",
                ),
            });
        }
        // Tuning first, `run` last: a scan never starts with half the new settings.
        let mut writes: Vec<(&'static str, u64, u64)> = Vec::new();
        if let Some(v) = tune.pages_to_scan {
            writes.push(("pages_to_scan", v, before.pages_to_scan));
        }
        if let Some(v) = tune.sleep_millisecs {
            writes.push(("sleep_millisecs", v, before.sleep_millisecs));
        }
        if let (Some(v), Some(old)) = (tune.merge_across_nodes, before.merge_across_nodes) {
            writes.push(("merge_across_nodes", v as u64, old as u64));
        }
        if let Some(run) = tune.run {
            writes.push(("run", run_value(run), run_value(before.run)));
        }
        for (i, (name, v, _)) in writes.iter().enumerate() {
            if let Err(e) = self.write(name, *v) {
                for (name, _, old) in writes[..i].iter().rev() {
                    if let Err(undo) = self.write(name, *old) {
                        tracing::warn!(knob = name, error = %undo, "cannot restore KSM setting");
                    }
                }
                return Err(e);
            }
        }
        self.state()
    }

    pub fn set_run(&self, run: KsmRun) -> Result<(), KsmError> {
        self.require()?;
        self.write("run", run_value(run))
    }

    /// Tunes the scan rate (MoM's `ksm_pages_to_scan` / `ksm_sleep_ms`). Both are validated
    /// before either is written.
    pub fn tune(&self, pages_to_scan: u64, sleep_millisecs: u64) -> Result<(), KsmError> {
        self.require()?;
        check("pages_to_scan", pages_to_scan, 1, 100_000)?;
        check("sleep_millisecs", sleep_millisecs, 1, 60_000)?;
        self.write("pages_to_scan", pages_to_scan)?;
        self.write("sleep_millisecs", sleep_millisecs)
    }
}

fn run_value(run: KsmRun) -> u64 {
    match run {
        KsmRun::Stop => 0,
        KsmRun::Run => 1,
        KsmRun::Unmerge => 2,
    }
}

fn check(what: &'static str, value: u64, min: u64, max: u64) -> Result<(), KsmError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(KsmError::OutOfRange {
            what,
            value,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the real sysfs: reads, turns KSM on with a tuning, reads it back, then restores.
    #[test]
    fn ksm_state_and_control_on_the_real_kernel() {
        let ksm = Ksm::default();
        let before = ksm
            .state()
            .unwrap_or_else(|e| panic!("this test needs {KSM_SYSFS}: {e}"));
        let restore = |k: &Ksm| {
            k.tune(before.pages_to_scan, before.sleep_millisecs).unwrap();
            k.set_run(before.run).unwrap();
        };
        let res = std::panic::catch_unwind(|| {
            ksm.tune(123, 45).unwrap();
            ksm.set_run(KsmRun::Run).unwrap();
            let s = ksm.state().unwrap();
            assert_eq!(s.run, KsmRun::Run);
            assert_eq!((s.pages_to_scan, s.sleep_millisecs), (123, 45));
            // Out of range: refused, nothing written.
            let e = ksm.tune(0, 45).unwrap_err();
            assert!(matches!(
                e,
                KsmError::OutOfRange {
                    what: "pages_to_scan",
                    ..
                }
            ));
            assert!(ksm.tune(100, 1_000_000).is_err());
            assert_eq!(ksm.state().unwrap().pages_to_scan, 123);
        });
        restore(&ksm);
        assert_eq!(ksm.state().unwrap().run, before.run);
        if let Err(p) = res {
            std::panic::resume_unwind(p);
        }
    }

    #[test]
    fn a_missing_setting_is_named_and_a_kernel_without_ksm_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let e = Ksm::new(&dir.path().join("nope")).state().unwrap_err();
        assert!(matches!(e, KsmError::Unavailable { .. }), "{e}");
        assert!(e.to_string().contains("CONFIG_KSM"), "{e}");
        std::fs::write(dir.path().join("run"), "1\n").unwrap();
        let e = Ksm::new(dir.path()).state().unwrap_err();
        assert!(e.to_string().contains("pages_to_scan"), "{e}");
    }

    /// A knob the kernel refuses half-way undoes the ones already written. A read-only sysctl
    /// (refused even to root) stands in for the refusing knob.
    #[test]
    fn a_refused_knob_undoes_the_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        for (k, v) in [
            ("run", "0"),
            ("pages_to_scan", "100"),
            ("sleep_millisecs", "20"),
            ("pages_shared", "0"),
            ("pages_sharing", "0"),
            ("full_scans", "3"),
        ] {
            std::fs::write(dir.path().join(k), format!("{v}\n")).unwrap();
        }
        std::os::unix::fs::symlink(
            "/proc/sys/kernel/ngroups_max",
            dir.path().join("merge_across_nodes"),
        )
        .unwrap();
        let ksm = Ksm::new(dir.path());
        assert_eq!(ksm.state().unwrap().merge_across_nodes, Some(true));
        let tune = KsmTune {
            run: Some(KsmRun::Run),
            pages_to_scan: Some(500),
            sleep_millisecs: Some(50),
            merge_across_nodes: Some(false),
        };
        let e = ksm.apply(&tune).unwrap_err();
        assert!(e.to_string().contains("merge_across_nodes"), "{e}");
        for (k, v) in [("pages_to_scan", "100"), ("sleep_millisecs", "20"), ("run", "0")] {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(k)).unwrap().trim(),
                v,
                "{k}"
            );
        }
    }
}
