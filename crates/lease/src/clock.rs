//! Clocks: the monotonic time that every lease deadline is measured on, real or simulated.
//!
//! Invariant: lease logic never reads the wall clock. The real clock is `CLOCK_BOOTTIME`, which
//! is monotonic and keeps counting while the machine is suspended, so a host that resumes after
//! a suspend sees at once that its leases have expired instead of trusting stale deadlines.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A source of monotonic time that threads can sleep on.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since an arbitrary origin; never goes backwards.
    fn now(&self) -> Duration;

    /// Blocks until `deadline` (on this clock) or until `wake` is signalled; returns true if
    /// woken by the signal.
    fn sleep_until(&self, deadline: Duration, wake: &Wake) -> bool;
}

/// A one-shot signal that interrupts [`Clock::sleep_until`] (used to stop background threads).
#[derive(Debug, Default)]
pub struct Wake {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn new() -> Wake {
        Wake::default()
    }

    pub fn signal(&self) {
        *self.set.lock().expect("wake lock") = true;
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        *self.set.lock().expect("wake lock")
    }

    /// Waits up to `timeout` of real time for the signal.
    fn wait_real(&self, timeout: Duration) -> bool {
        let g = self.set.lock().expect("wake lock");
        if *g {
            return true;
        }
        let (g, _) = self.cv.wait_timeout(g, timeout).expect("wake lock");
        *g
    }
}

/// The machine's `CLOCK_BOOTTIME`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME exists on every
        // Linux we run on.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn sleep_until(&self, deadline: Duration, wake: &Wake) -> bool {
        loop {
            let now = self.now();
            if now >= deadline {
                return wake.is_set();
            }
            // Condvar timeouts run on CLOCK_MONOTONIC, which stops during suspend: waking at
            // least every SUSPEND_CHECK bounds how late a deadline is noticed after a resume.
            if wake.wait_real((deadline - now).min(SUSPEND_CHECK)) {
                return true;
            }
        }
    }
}

/// Longest real wait between two looks at `CLOCK_BOOTTIME` while sleeping.
const SUSPEND_CHECK: Duration = Duration::from_millis(200);

/// A clock that moves only when a test advances it. Sleepers wake when the time they wait for
/// has been reached by [`SimClock::advance`] or [`SimClock::set`].
#[derive(Debug, Clone, Default)]
pub struct SimClock {
    inner: Arc<(Mutex<Duration>, Condvar)>,
}

impl SimClock {
    pub fn new(start: Duration) -> SimClock {
        SimClock {
            inner: Arc::new((Mutex::new(start), Condvar::new())),
        }
    }

    pub fn advance(&self, d: Duration) {
        let (m, cv) = &*self.inner;
        *m.lock().expect("sim clock") += d;
        cv.notify_all();
    }

    pub fn set(&self, t: Duration) {
        let (m, cv) = &*self.inner;
        let mut g = m.lock().expect("sim clock");
        if t > *g {
            *g = t;
        }
        cv.notify_all();
    }
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        *self.inner.0.lock().expect("sim clock")
    }

    fn sleep_until(&self, deadline: Duration, wake: &Wake) -> bool {
        let (m, cv) = &*self.inner;
        loop {
            if wake.is_set() {
                return true;
            }
            let g = m.lock().expect("sim clock");
            if *g >= deadline {
                return false;
            }
            // Poll the wake signal every few real milliseconds; the condvar wakes us on advance.
            let _ = cv.wait_timeout(g, Duration::from_millis(5)).expect("sim clock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_monotonic_and_sleeps() {
        let c = SystemClock;
        let a = c.now();
        let w = Wake::new();
        assert!(!c.sleep_until(a + Duration::from_millis(20), &w));
        assert!(c.now() >= a + Duration::from_millis(20));
    }

    #[test]
    fn wake_interrupts_sleep() {
        let c = SystemClock;
        let w = Arc::new(Wake::new());
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w2.signal();
        });
        let start = c.now();
        assert!(c.sleep_until(start + Duration::from_secs(30), &w));
        assert!(c.now() - start < Duration::from_secs(10));
        t.join().unwrap();
    }

    #[test]
    fn sim_clock_sleepers_wake_on_advance() {
        let c = SimClock::new(Duration::from_secs(100));
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let w = Wake::new();
            c2.sleep_until(Duration::from_secs(105), &w)
        });
        std::thread::sleep(Duration::from_millis(10));
        c.advance(Duration::from_secs(5));
        assert!(!t.join().unwrap());
        assert_eq!(c.now(), Duration::from_secs(105));
    }
}
