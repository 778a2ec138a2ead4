//! The VM lifecycle as one explicit state machine.
//!
//! ```text
//!                 create()                         prepare_incoming()
//!                    │                                    │
//!                    ▼                                    ▼
//!             ┌─WaitForLaunch                    MigrationDestination──┐
//!             │      │ QmpReady                           │ Resumed    │
//!             │      ▼                                    ▼            │
//!             │     Up ◄──────────────────────────────────┘            │
//!             │   │ ▲ │ ▲                                              │
//!    Stopped  │   │ │ │ └─ Resumed ─ Paused{User | IoError | Other} ◄──┤ Stopped
//!   (paused   │   │ │ └──── Stopped ─────────────┘ ▲                   │
//!    at start)│   │ │                              │ MigrationEnded    │
//!             │   │ └── MigrationEnded{ok: false} ─┤ {ok: false}       │
//!             │   ├── MigrationStarted ──► MigrationSource ─┐          │
//!             │   └── PowerdownRequested ─► PoweringDown    │          │
//!             │                                │            │ MigrationEnded{ok: true}
//!             │                                │            ▼          │
//!             └───────────── Exited(reason) ───┴──────►   Down(reason) ◄┘
//! ```
//!
//! `Exited` is accepted in every state but `Down`: whatever the VM was doing, a QEMU process
//! that is gone makes it `Down` with the reason. `Down` is final; `destroy` removes the VM.
//! A guest paused on ENOSPC is `Paused{IoError}` (QEMU's run state `io-error`), which the thin
//! provisioning monitor resumes after an extend. A source whose migration completed (run state
//! `postmigrate`, e.g. found by a restarted node) is `MigrationSource`, never `Paused`: resuming
//! it would run the guest twice. `SavingStarted` (from `Up` or `Paused`) makes a VM
//! `SavingState` while its state streams to a file: it ends `Down{Saved}` (hibernation, QEMU
//! exits), `Paused` on `StateSaved` (a snapshot with memory; the node runs it on), or as it
//! was on `MigrationEnded{ok: false}`; a node restarted mid-save finds it `MigrationSource`
//! and feeds `StateSaved` from its record. A destination held for its leases (QEMU started with `-S`)
//! stays `MigrationDestination` after the stream ends, until the node's `cont` brings
//! `Resumed`. Commands check [`VmStatus::allows`] before
//! touching QEMU, so a refused command changes nothing.
//!
//! Architecture invariant: this module is pure; the manager feeds it inputs derived from QMP
//! events and process exits and persists nothing from it (the state is re-derived on recovery
//! from QEMU's run state).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmStatus {
    /// QEMU spawned, QMP not yet answering.
    WaitForLaunch,
    /// QEMU waits for the incoming migration stream.
    MigrationDestination,
    Up,
    Paused {
        reason: PauseReason,
    },
    /// ACPI power-down sent; waiting for the guest (and then QEMU) to stop.
    PoweringDown,
    /// Outgoing migration in progress; the guest runs until the switch-over.
    MigrationSource,
    /// The guest's state streams to a file (hibernation, a snapshot with memory): the guest
    /// is stopped and stays here; only destroy is allowed until the stream ends.
    SavingState,
    Down {
        reason: DownReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// Paused by a command (`pause`, or started paused).
    User,
    /// Stopped by a write error with `werror=enospc`/`stop` (run state `io-error`).
    IoError,
    /// Any other run state QEMU reports while not running.
    Other(String),
}

/// Why a VM is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownReason {
    pub kind: DownKind,
    /// Human-readable detail: the SHUTDOWN reason, an exit status, QEMU's last log lines.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownKind {
    /// The guest powered itself off (or answered the ACPI power-down).
    GuestShutdown,
    /// `destroy` killed QEMU, or graceful shutdown fell back to it.
    Destroyed,
    /// The guest now runs on the migration destination.
    Migrated,
    /// Hibernated: the guest's state is saved to a volume, from which a later start resumes it.
    Saved,
    /// Killed by self-fencing.
    Fenced,
    /// QEMU never got as far as answering QMP.
    StartFailed,
    /// QEMU went away without being asked to (crash, signal, incoming migration failure).
    Died,
    /// Killed after staying stopped on a storage error longer than its resume behaviour
    /// `kill` allows (VDSM's exit reason `DESTROYED_ON_PAUSE_TIMEOUT`).
    PausedTooLong,
}

/// What happened, as the manager observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// QMP answered; `running` and `status` are from `query-status`.
    QmpReady {
        running: bool,
        status: String,
    },
    /// QEMU stopped the guest; `status` from `query-status` (`paused`, `io-error`, ...).
    Stopped {
        status: String,
    },
    Resumed,
    PowerdownRequested,
    MigrationStarted,
    /// The outgoing migration ended; `ok` is `completed`, otherwise it failed or was cancelled
    /// and the guest stays here (`running` tells whether it still runs).
    MigrationEnded {
        ok: bool,
        running: bool,
    },
    /// A stream of the guest's state to a file begins (the node pauses the guest first).
    SavingStarted,
    /// The stream to a file completed and the guest runs on here (a snapshot with memory):
    /// it is whole, stopped, and `cont` runs it.
    StateSaved,
    Exited(DownReason),
}

/// Operations the manager checks against the state before acting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Pause,
    Resume,
    Shutdown,
    Reboot,
    Migrate,
    Snapshot,
    Merge,
    Balloon,
    /// Hot plug and unplug of devices, link state.
    Devices,
    /// Destroy is allowed in every state (it is how a `Down` VM is removed).
    Destroy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input} is not possible while the VM is {from}")]
pub struct InvalidTransition {
    pub from: String,
    pub input: String,
}

impl VmStatus {
    /// Short name as VDSM reports it (`Up`, `Paused`, `Down`, `Migration Source`...).
    pub fn vdsm_name(&self) -> &'static str {
        match self {
            Self::WaitForLaunch => "WaitForLaunch",
            Self::MigrationDestination => "Migration Destination",
            Self::Up => "Up",
            Self::Paused { .. } => "Paused",
            Self::PoweringDown => "Powering down",
            Self::MigrationSource => "Migration Source",
            Self::SavingState => "Saving State",
            Self::Down { .. } => "Down",
        }
    }

    pub fn is_down(&self) -> bool {
        matches!(self, Self::Down { .. })
    }

    pub fn allows(&self, op: Op) -> bool {
        use VmStatus::*;
        match op {
            Op::Destroy => true,
            Op::Pause => matches!(self, Up),
            Op::Resume => matches!(self, Paused { .. }),
            Op::Shutdown => matches!(self, Up | Paused { .. } | PoweringDown),
            Op::Reboot => matches!(self, Up),
            Op::Migrate => matches!(self, Up | Paused { .. }),
            Op::Snapshot | Op::Merge | Op::Balloon | Op::Devices => matches!(self, Up | Paused { .. }),
        }
    }

    /// The state after `input`, or why `input` cannot happen now.
    pub fn next(&self, input: &Input) -> Result<VmStatus, InvalidTransition> {
        use VmStatus::*;
        let invalid = || InvalidTransition {
            from: format!("{self:?}"),
            input: format!("{input:?}"),
        };
        Ok(match (self, input) {
            (Down { .. }, _) => return Err(invalid()),
            (_, Input::Exited(reason)) => Down {
                reason: reason.clone(),
            },
            // Recovery re-derives the state from QEMU's run state whatever we believed.
            (_, Input::QmpReady { running, status }) => Self::from_run_state(*running, status),
            (MigrationDestination | Up | Paused { .. }, Input::Stopped { status })
            | (WaitForLaunch, Input::Stopped { status }) => Self::from_run_state(false, status),
            // The source pauses at the switch-over and the guest is powering off on its own.
            (MigrationSource | PoweringDown | SavingState, Input::Stopped { .. }) => self.clone(),
            (MigrationDestination | Paused { .. } | Up | WaitForLaunch, Input::Resumed) => Up,
            (MigrationSource | PoweringDown | SavingState, Input::Resumed) => self.clone(),
            (Up | Paused { .. } | PoweringDown, Input::PowerdownRequested) => PoweringDown,
            (Up | Paused { .. }, Input::MigrationStarted) => MigrationSource,
            (Up | Paused { .. }, Input::SavingStarted) => SavingState,
            (MigrationSource, Input::MigrationEnded { ok: true, .. }) => MigrationSource,
            (SavingState, Input::MigrationEnded { ok: true, .. }) => SavingState,
            // A node restarted mid-save finds QEMU `postmigrate` (MigrationSource); its record
            // says where the stream went.
            (SavingState | MigrationSource, Input::StateSaved) => Paused {
                reason: PauseReason::User,
            },
            (MigrationSource | SavingState, Input::MigrationEnded { ok: false, running }) => {
                if *running {
                    Up
                } else {
                    Paused {
                        reason: PauseReason::User,
                    }
                }
            }
            _ => return Err(invalid()),
        })
    }

    /// Maps QEMU's `query-status` to our state.
    pub fn from_run_state(running: bool, status: &str) -> VmStatus {
        if running {
            return VmStatus::Up;
        }
        match status {
            "inmigrate" => VmStatus::MigrationDestination,
            // The migration completed: the guest runs on the destination now, and `cont` here
            // would run it twice. Only destroy is allowed from MigrationSource.
            "postmigrate" => VmStatus::MigrationSource,
            "io-error" => VmStatus::Paused {
                reason: PauseReason::IoError,
            },
            "paused" | "prelaunch" => VmStatus::Paused {
                reason: PauseReason::User,
            },
            other => VmStatus::Paused {
                reason: PauseReason::Other(other.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(kind: DownKind) -> Input {
        Input::Exited(DownReason {
            kind,
            detail: String::new(),
        })
    }

    #[test]
    fn a_normal_life() {
        let s = VmStatus::WaitForLaunch;
        let s = s
            .next(&Input::QmpReady {
                running: true,
                status: "running".into(),
            })
            .unwrap();
        assert_eq!(s, VmStatus::Up);
        let s = s
            .next(&Input::Stopped {
                status: "paused".into(),
            })
            .unwrap();
        assert!(s.allows(Op::Resume) && !s.allows(Op::Pause));
        let s = s.next(&Input::Resumed).unwrap();
        let s = s.next(&Input::PowerdownRequested).unwrap();
        assert_eq!(s, VmStatus::PoweringDown);
        // The guest stops while powering off: still powering down.
        let s = s
            .next(&Input::Stopped {
                status: "shutdown".into(),
            })
            .unwrap();
        assert_eq!(s, VmStatus::PoweringDown);
        let s = s.next(&down(DownKind::GuestShutdown)).unwrap();
        assert!(s.is_down());
        assert!(s.next(&Input::Resumed).is_err(), "Down is final");
        assert!(s.allows(Op::Destroy) && !s.allows(Op::Migrate));
    }

    #[test]
    fn enospc_pause_and_resume() {
        let s = VmStatus::Up
            .next(&Input::Stopped {
                status: "io-error".into(),
            })
            .unwrap();
        assert_eq!(
            s,
            VmStatus::Paused {
                reason: PauseReason::IoError
            }
        );
        assert_eq!(s.next(&Input::Resumed).unwrap(), VmStatus::Up);
    }

    #[test]
    fn migration_outcomes() {
        let s = VmStatus::Up.next(&Input::MigrationStarted).unwrap();
        assert_eq!(s, VmStatus::MigrationSource);
        assert!(!s.allows(Op::Migrate), "one migration at a time");
        // Switch-over pauses the source; that is not a user pause.
        let s2 = s
            .next(&Input::Stopped {
                status: "finish-migrate".into(),
            })
            .unwrap();
        assert_eq!(s2, VmStatus::MigrationSource);
        let failed = s
            .next(&Input::MigrationEnded {
                ok: false,
                running: true,
            })
            .unwrap();
        assert_eq!(failed, VmStatus::Up);
        let done = s
            .next(&Input::MigrationEnded {
                ok: true,
                running: false,
            })
            .unwrap();
        assert_eq!(
            done.next(&down(DownKind::Migrated)).unwrap(),
            VmStatus::Down {
                reason: DownReason {
                    kind: DownKind::Migrated,
                    detail: String::new()
                }
            }
        );
        // A stream to a file: nothing but destroy meanwhile; a snapshot with memory then runs
        // the guest on here, a failed one leaves it as it was.
        let saving = VmStatus::Up.next(&Input::SavingStarted).unwrap();
        assert_eq!(saving.vdsm_name(), "Saving State");
        assert!(!saving.allows(Op::Migrate) && !saving.allows(Op::Resume) && saving.allows(Op::Destroy));
        let ended = saving
            .next(&Input::MigrationEnded {
                ok: true,
                running: false,
            })
            .unwrap();
        assert_eq!(ended, VmStatus::SavingState);
        let saved = ended.next(&Input::StateSaved).unwrap();
        assert!(saved.allows(Op::Resume), "{saved:?}");
        let failed = saving
            .next(&Input::MigrationEnded {
                ok: false,
                running: true,
            })
            .unwrap();
        assert_eq!(failed, VmStatus::Up);
        // Found after a node restart mid-save: QEMU is `postmigrate`.
        assert!(done.next(&Input::StateSaved).unwrap().allows(Op::Resume));
        assert!(VmStatus::Up.next(&Input::StateSaved).is_err());
        let dest = VmStatus::MigrationDestination;
        assert_eq!(dest.next(&Input::Resumed).unwrap(), VmStatus::Up);
        assert!(dest.next(&down(DownKind::Died)).unwrap().is_down());
    }

    #[test]
    fn invalid_inputs_are_refused_with_both_sides_named() {
        let e = VmStatus::WaitForLaunch
            .next(&Input::MigrationStarted)
            .unwrap_err();
        assert!(e.to_string().contains("MigrationStarted"), "{e}");
        assert!(e.to_string().contains("WaitForLaunch"), "{e}");
        assert!(VmStatus::MigrationSource
            .next(&Input::PowerdownRequested)
            .is_err());
    }

    #[test]
    fn run_states_map() {
        assert_eq!(
            VmStatus::from_run_state(false, "inmigrate"),
            VmStatus::MigrationDestination
        );
        assert_eq!(
            VmStatus::from_run_state(false, "postmigrate"),
            VmStatus::MigrationSource
        );
        // A source found after its migration completed (e.g. by a restarted node) must not be
        // resumable: the guest already runs on the destination.
        let recovered = VmStatus::WaitForLaunch
            .next(&Input::QmpReady {
                running: false,
                status: "postmigrate".into(),
            })
            .unwrap();
        assert!(!recovered.allows(Op::Resume), "{recovered:?}");
        assert!(recovered.allows(Op::Destroy));
        assert_eq!(VmStatus::from_run_state(true, "running"), VmStatus::Up);
    }
}
