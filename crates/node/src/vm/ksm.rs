//! Kernel same-page merging, as oVirt's MoM reports and tunes it: `/sys/kernel/mm/ksm`.
//!
//! Architecture invariant: only the knobs named here are written, each validated first, so bad
//! input changes nothing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

#[derive(Debug, thiserror::Error)]
pub enum KsmError {
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
        })
    }

    pub fn set_run(&self, run: KsmRun) -> Result<(), KsmError> {
        let v = match run {
            KsmRun::Stop => 0,
            KsmRun::Run => 1,
            KsmRun::Unmerge => 2,
        };
        self.write("run", v)
    }

    /// Tunes the scan rate (MoM's `ksm_pages_to_scan` / `ksm_sleep_ms`). Both are validated
    /// before either is written.
    pub fn tune(&self, pages_to_scan: u64, sleep_millisecs: u64) -> Result<(), KsmError> {
        check("pages_to_scan", pages_to_scan, 1, 100_000)?;
        check("sleep_millisecs", sleep_millisecs, 1, 60_000)?;
        self.write("pages_to_scan", pages_to_scan)?;
        self.write("sleep_millisecs", sleep_millisecs)
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
    fn a_missing_setting_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Ksm::new(dir.path()).state().unwrap_err();
        assert!(e.to_string().contains("run"), "{e}");
    }
}
