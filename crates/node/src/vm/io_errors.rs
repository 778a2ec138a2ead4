//! What becomes of a VM that QEMU stopped on a storage I/O error (VDSM's resume behaviour).
//!
//! Every image disk runs with `werror=stop,rerror=stop`: a failed read or write stops the
//! whole guest (run state `io-error`) instead of handing the guest an error its file systems
//! would turn into a read-only remount or a corrupt journal. The guest never sees the error;
//! the request is retried when the VM continues. What happens next is the VM's
//! [`ResumeBehavior`], given by the engine:
//!
//! - `auto_resume` (the default): continued once every storage domain of its disks has
//!   passed a domain-monitor check that *started after* the pause — so a VM is never resumed
//!   on the strength of a check that predates the outage, and never waits for a monitor state
//!   change it missed (VDSM resumes only on the monitor's valid/invalid transitions, so a blip
//!   shorter than one check interval leaves its VMs paused for good);
//! - `leave_paused`: stays paused until an administrator resumes or stops it;
//! - `kill`: like `auto_resume` while the outage is short; once paused longer than
//!   [`kill_after`] (8 × `io_timeout`, VDSM's timeout: the time after which another host may
//!   take the VM's lease) QEMU is killed, the VM goes down as "paused too long", and the
//!   engine restarts it if it is highly available. The engine forces it for HA VMs with a
//!   VM lease: a paused VM keeps its lease, so it would block the restart elsewhere.
//!
//! `ENOSPC` pauses are not this module's: a thin disk's are answered by an extend (see
//! [`super::thin`]), and on a full file domain only freeing space helps, which the
//! administrator does and then resumes. Such a VM is left paused and never killed.
//!
//! A fault the monitor cannot see (a bad region under the images while the domain metadata
//! reads fine) would have an `auto_resume` guest stopped again at once after each resume, and
//! resumed again at the next check: [`ResumeBackoff`] doubles the wait after every resume that
//! did not hold (from one monitor interval up to [`RESUME_MAX_WAIT`]) and forgets once a
//! resumed guest ran for [`RESUME_HELD`].
//!
//! Architecture invariant: [`verdict`] and [`ResumeBackoff`] are pure; the node's loop feeds
//! them the pause, the domain monitor's last checks and the time, and carries out the verdict.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What to do with the VM when storage fails under it (oVirt's
/// `storage_error_resume_behaviour`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeBehavior {
    #[default]
    AutoResume,
    LeavePaused,
    Kill,
}

/// Why QEMU stopped the guest, as VDSM's `pauseCode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PauseCode {
    #[serde(rename = "EIO")]
    Eio,
    #[serde(rename = "ENOSPC")]
    Enospc,
    #[serde(rename = "EPERM")]
    Eperm,
    #[serde(rename = "EOTHER")]
    Eother,
}

impl PauseCode {
    /// From a `BLOCK_IO_ERROR` event: QEMU's `nospace` flag and its `strerror` text.
    pub fn from_event(nospace: bool, reason: &str) -> PauseCode {
        let r = reason.to_ascii_lowercase();
        if nospace || r.contains("no space") {
            PauseCode::Enospc
        } else if r.contains("input/output") {
            PauseCode::Eio
        } else if r.contains("permission") || r.contains("not permitted") || r.contains("read-only") {
            PauseCode::Eperm
        } else {
            PauseCode::Eother
        }
    }

    /// From `query-block`'s `io-status` of the devices, for a VM found stopped (a restarted
    /// node has no event): `nospace` on any device wins, `failed` is an I/O error.
    pub fn from_io_status<'a>(statuses: impl IntoIterator<Item = &'a str>) -> PauseCode {
        let mut code = PauseCode::Eother;
        for s in statuses {
            match s {
                "nospace" => return PauseCode::Enospc,
                "failed" => code = PauseCode::Eio,
                _ => {}
            }
        }
        code
    }

    pub fn vdsm_name(self) -> &'static str {
        match self {
            PauseCode::Eio => "EIO",
            PauseCode::Enospc => "ENOSPC",
            PauseCode::Eperm => "EPERM",
            PauseCode::Eother => "EOTHER",
        }
    }
}

/// A VM stopped on an I/O error: why, and since when (on the node's monotonic clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoPause {
    pub code: PauseCode,
    pub since: Instant,
}

/// A storage domain as the domain monitor last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainSeen {
    pub valid: bool,
    /// When that check started.
    pub checked_from: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Wait,
    Resume,
    /// Kill QEMU; the VM goes down as paused too long.
    Kill,
}

/// A resumed guest that ran this long without stopping again had its storage back.
pub const RESUME_HELD: Duration = Duration::from_secs(60);
/// The longest wait between resumes that do not hold.
pub const RESUME_MAX_WAIT: Duration = Duration::from_secs(300);

/// Resumes of one VM that did not hold (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeBackoff {
    failed: u32,
    last: Option<Instant>,
    /// When the pause that began this run of resumes began.
    first: Option<Instant>,
}

impl ResumeBackoff {
    /// Whether a resume may be tried now for a pause that began at `since`; `base` is the
    /// first wait (the monitor's interval).
    pub fn ready(&self, since: Instant, now: Instant, base: Duration) -> bool {
        match self.last {
            None => true,
            Some(last) if held(last, since) => true,
            Some(last) => now >= last + self.wait(base),
        }
    }

    /// A resume was tried now for a pause that began at `since`.
    pub fn resumed(&mut self, since: Instant, now: Instant) {
        match self.last {
            Some(last) if !held(last, since) => self.failed = self.failed.saturating_add(1),
            _ => {
                self.failed = 0;
                self.first = Some(since);
            }
        }
        self.last = Some(now);
    }

    /// How long the guest has really been stopped, for a pause that began at `since`: from
    /// the first pause of a run of resumes that did not hold (each of which stopped the guest
    /// again at once), so that they do not put off a `kill` for ever.
    pub fn stopped_since(&self, since: Instant) -> Instant {
        match (self.last, self.first) {
            (Some(last), Some(first)) if !held(last, since) => first.min(since),
            _ => since,
        }
    }

    /// Whether this record may be forgotten (nothing tried for longer than a resume needs to
    /// hold).
    pub fn stale(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|l| now.saturating_duration_since(l) >= RESUME_HELD)
    }

    fn wait(&self, base: Duration) -> Duration {
        base.saturating_mul(1u32 << self.failed.min(16))
            .min(RESUME_MAX_WAIT)
    }
}

/// The resume at `last` held if the guest ran `RESUME_HELD` before stopping again at `since`.
fn held(last: Instant, since: Instant) -> bool {
    since.saturating_duration_since(last) >= RESUME_HELD
}

/// How long a `kill` VM may stay paused on an I/O error: 8 × `io_timeout`, the time after
/// which its host id — and with it its leases — may be taken by another host.
pub fn kill_after(io_timeout: Duration) -> Duration {
    io_timeout * 8
}

/// The verdict for a VM paused as `pause`, whose disks live on domains last seen as
/// `domains` (`None`: not monitored here, e.g. the pool is disconnected).
pub fn verdict(
    behavior: ResumeBehavior,
    pause: IoPause,
    domains: &[Option<DomainSeen>],
    now: Instant,
    kill_after: Duration,
) -> Verdict {
    if pause.code == PauseCode::Enospc || behavior == ResumeBehavior::LeavePaused {
        return Verdict::Wait;
    }
    if behavior == ResumeBehavior::Kill && now.saturating_duration_since(pause.since) >= kill_after {
        return Verdict::Kill;
    }
    let healthy = !domains.is_empty()
        && domains
            .iter()
            .all(|d| d.is_some_and(|d| d.valid && d.checked_from > pause.since));
    if healthy {
        Verdict::Resume
    } else {
        Verdict::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn seen(valid: bool, at: Instant) -> Option<DomainSeen> {
        Some(DomainSeen {
            valid,
            checked_from: at,
        })
    }

    #[test]
    fn codes_come_from_qemus_words() {
        assert_eq!(PauseCode::from_event(false, "Input/output error"), PauseCode::Eio);
        assert_eq!(
            PauseCode::from_event(true, "No space left on device"),
            PauseCode::Enospc
        );
        assert_eq!(
            PauseCode::from_event(false, "Permission denied"),
            PauseCode::Eperm
        );
        assert_eq!(
            PauseCode::from_event(false, "Read-only file system"),
            PauseCode::Eperm
        );
        assert_eq!(
            PauseCode::from_event(false, "Stale file handle"),
            PauseCode::Eother
        );
        assert_eq!(PauseCode::from_io_status(["ok", "failed"]), PauseCode::Eio);
        assert_eq!(
            PauseCode::from_io_status(["failed", "nospace"]),
            PauseCode::Enospc
        );
        assert_eq!(PauseCode::from_io_status(["ok"]), PauseCode::Eother);
        assert_eq!(serde_json::to_value(PauseCode::Eio).unwrap(), "EIO");
    }

    #[test]
    fn auto_resume_waits_for_a_check_that_started_after_the_pause() {
        let t0 = Instant::now();
        let pause = IoPause {
            code: PauseCode::Eio,
            since: t0 + 10 * S,
        };
        let v = |d: &[Option<DomainSeen>], now| verdict(ResumeBehavior::AutoResume, pause, d, now, 8 * S);
        let now = t0 + 12 * S;
        assert_eq!(
            v(&[seen(true, t0 + 9 * S)], now),
            Verdict::Wait,
            "a check from before the outage proves nothing"
        );
        assert_eq!(
            v(&[seen(false, t0 + 11 * S)], now),
            Verdict::Wait,
            "still failing"
        );
        assert_eq!(v(&[seen(true, t0 + 11 * S)], now), Verdict::Resume);
        assert_eq!(
            v(&[seen(true, t0 + 11 * S), seen(false, t0 + 11 * S)], now),
            Verdict::Wait,
            "every domain of its disks"
        );
        assert_eq!(
            v(&[seen(true, t0 + 11 * S), None], now),
            Verdict::Wait,
            "an unmonitored domain"
        );
        assert_eq!(v(&[], now), Verdict::Wait, "no domain to judge by");
        assert_eq!(
            v(&[seen(false, t0 + 99 * S)], t0 + 100 * S),
            Verdict::Wait,
            "auto_resume is never killed"
        );
    }

    #[test]
    fn kill_resumes_a_short_outage_and_kills_a_long_one() {
        let t0 = Instant::now();
        let pause = IoPause {
            code: PauseCode::Eother,
            since: t0,
        };
        let v = |d: &[Option<DomainSeen>], now| verdict(ResumeBehavior::Kill, pause, d, now, kill_after(S));
        assert_eq!(v(&[seen(true, t0 + 3 * S)], t0 + 4 * S), Verdict::Resume);
        assert_eq!(v(&[seen(false, t0 + 3 * S)], t0 + 7 * S), Verdict::Wait);
        assert_eq!(v(&[seen(false, t0 + 7 * S)], t0 + 8 * S), Verdict::Kill);
        assert_eq!(
            v(&[seen(true, t0 + 8 * S)], t0 + 9 * S),
            Verdict::Kill,
            "past the deadline its lease may be another host's: never resumed"
        );
    }

    #[test]
    fn resumes_that_do_not_hold_back_off_and_are_forgotten_once_one_holds() {
        let t0 = Instant::now();
        let mut b = ResumeBackoff::default();
        assert!(b.ready(t0, t0, S), "the first resume is at once");
        b.resumed(t0, t0);
        // Stopped again 10 ms later: the next try waits one interval, then two, then four.
        let mut t = t0;
        for wait in [1, 2, 4, 8] {
            let since = t + Duration::from_millis(10);
            assert!(
                !b.ready(since, t + wait * S - Duration::from_millis(1), S),
                "wait {wait}"
            );
            assert!(b.ready(since, t + wait * S, S), "wait {wait}");
            t += wait * S;
            b.resumed(since, t);
        }
        assert!(!b.stale(t + 59 * S));
        assert_eq!(
            b.stopped_since(t + Duration::from_millis(10)),
            t0,
            "resumes that did not hold do not restart the clock of a kill"
        );
        // Capped.
        let mut long = b.clone();
        for _ in 0..20 {
            long.resumed(t, t);
        }
        assert!(long.ready(t, t + RESUME_MAX_WAIT, S));
        // A resume that held a minute: the next pause is answered at once again.
        let since = t + RESUME_HELD;
        assert!(b.ready(since, since, S));
        b.resumed(since, since);
        assert!(
            b.ready(since + Duration::from_millis(10), since + S, S),
            "back to one interval"
        );
        assert_eq!(b.stopped_since(since + Duration::from_millis(10)), since);
        assert!(b.stale(since + RESUME_HELD));
    }

    #[test]
    fn leave_paused_and_enospc_wait_for_the_administrator() {
        let t0 = Instant::now();
        let ok = [seen(true, t0 + S)];
        let eio = IoPause {
            code: PauseCode::Eio,
            since: t0,
        };
        let later = t0 + 100 * S;
        assert_eq!(
            verdict(ResumeBehavior::LeavePaused, eio, &ok, later, S),
            Verdict::Wait
        );
        let nospace = IoPause {
            code: PauseCode::Enospc,
            since: t0,
        };
        for b in [ResumeBehavior::AutoResume, ResumeBehavior::Kill] {
            assert_eq!(verdict(b, nospace, &ok, later, S), Verdict::Wait, "{b:?}");
        }
    }
}
