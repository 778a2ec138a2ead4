//! Engine time: UTC timestamps in milliseconds and the injected clock.
//!
//! Everything the engine stores with a time (creation, job start/end, event time, token expiry)
//! takes it from a [`Clock`] so that tests can drive expiry and ordering with [`ManualClock`].
//! Timestamps are stored as integer milliseconds since the Unix epoch, which both database
//! backends compare and sort natively.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }
    pub const fn as_millis(self) -> i64 {
        self.0
    }
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }
    /// Saturating: a duration too large for the range ends at the far future.
    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }
    /// ISO 8601 / RFC 3339 in UTC with milliseconds, as the REST API serves dates:
    /// `2024-05-01T12:34:56.789Z`.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }
}

impl Timestamp {
    fn civil(self) -> ((i64, u32, u32), i64, i64) {
        let secs = self.0.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        (civil_from_days(days), secs.rem_euclid(86_400), days)
    }

    /// oVirt's OVF date, in UTC: `2024/05/01 12:34:56`.
    pub fn to_ovf(self) -> String {
        let ((y, m, d), sod, _) = self.civil();
        format!(
            "{y:04}/{m:02}/{d:02} {:02}:{:02}:{:02}",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }

    /// Reads [`Timestamp::to_ovf`]'s form (`-` for `/` too).
    pub fn from_ovf(s: &str) -> Option<Timestamp> {
        let (date, time) = s.trim().split_once(' ')?;
        let d: Vec<i64> = date
            .split(['/', '-'])
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let t: Vec<i64> = time.split(':').map(str::parse).collect::<Result<_, _>>().ok()?;
        from_parts(d.as_slice(), t.as_slice())
    }

    /// How Java's `Date.toString()` writes a date, in UTC (`Mon Dec 07 20:41:43 UTC 2026`):
    /// oVirt's OVF store descriptions carry "Last Updated" this way.
    pub fn to_java(self) -> String {
        const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
        let ((y, m, d), sod, days) = self.civil();
        format!(
            "{} {} {d:02} {:02}:{:02}:{:02} UTC {y}",
            DAYS[days.rem_euclid(7) as usize],
            MONTHS[m as usize - 1],
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }

    /// Reads [`Timestamp::to_java`]'s form. The zone is taken as UTC whatever it says: oVirt
    /// writes its server's zone, which only orders one domain's stores, all written by one
    /// engine.
    pub fn from_java(s: &str) -> Option<Timestamp> {
        let f: Vec<&str> = s.split_whitespace().collect();
        let [_, mon, day, time, _zone, year] = f.as_slice() else {
            return None;
        };
        let m = MONTHS.iter().position(|x| x == mon)? as i64 + 1;
        let t: Vec<i64> = time.split(':').map(str::parse).collect::<Result<_, _>>().ok()?;
        from_parts(&[year.parse().ok()?, m, day.parse().ok()?], t.as_slice())
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn from_parts(d: &[i64], t: &[i64]) -> Option<Timestamp> {
    let ([y, m, d], [hh, mm, ss]) = (d, t) else {
        return None;
    };
    if !(1..=12).contains(m) || !(1..=31).contains(d) || *hh > 23 || *mm > 59 || *ss > 60 {
        return None;
    }
    let days = days_from_civil(*y, *m as u32, *d as u32);
    Some(Timestamp((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000))
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

/// Where the engine gets the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that moves only when told to; for tests of expiry and ordering.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(AtomicI64::new(start.as_millis()))
    }
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.as_millis(), Ordering::SeqCst);
    }
    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovf_and_java_dates_round_trip() {
        // 2026-12-07T20:41:43Z, a Monday.
        let t = Timestamp::from_millis(1_796_676_103_000);
        assert_eq!(t.to_ovf(), "2026/12/07 20:41:43");
        assert_eq!(t.to_java(), "Mon Dec 07 20:41:43 UTC 2026");
        assert_eq!(Timestamp::from_ovf(&t.to_ovf()), Some(t));
        assert_eq!(Timestamp::from_java(&t.to_java()), Some(t));
        assert_eq!(
            Timestamp::from_java("Thu Feb 18 00:23:07 IST 2016").map(|t| t.to_ovf()),
            Some("2016/02/18 00:23:07".into())
        );
        let leap = Timestamp::from_millis(1_709_251_199_000);
        assert_eq!(Timestamp::from_ovf(&leap.to_ovf()), Some(leap));
        assert_eq!(Timestamp::from_ovf("2024/13/01 00:00:00"), None);
        assert_eq!(Timestamp::from_java("yesterday"), None);
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(Timestamp::from_millis(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T23:59:59.999Z, a leap day.
        assert_eq!(
            Timestamp::from_millis(1_709_251_199_999).to_rfc3339(),
            "2024-02-29T23:59:59.999Z"
        );
        assert_eq!(
            Timestamp::from_millis(-1).to_rfc3339(),
            "1969-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp::from_millis(1000));
        assert_eq!(c.now().as_millis(), 1000);
        c.advance(Duration::from_secs(2));
        assert_eq!(c.now().as_millis(), 3000);
        c.set(Timestamp::from_millis(5));
        assert_eq!(c.now().as_millis(), 5);
        assert_eq!(
            Timestamp::from_millis(i64::MAX - 1).saturating_add(Duration::from_secs(9)),
            Timestamp::from_millis(i64::MAX)
        );
    }
}
