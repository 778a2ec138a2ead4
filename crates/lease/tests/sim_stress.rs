//! Harsher fault mixes than the property test (up to 8% failed, 5% slow, 2% lost and 4% torn
//! I/Os, frequent pauses and crashes), over many seeds. Runs 16 configurations by default;
//! `LEASE_SIM_RUNS=2000 cargo test --release -p oxvirt-lease --test sim_stress` for a long run
//! (`LEASE_SIM_BASE` picks another series of seeds).

use std::time::Duration;

use oxvirt_lease::sim::{run, Faults, SimConfig};

/// splitmix64, so a configuration is a pure function of its index.
fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn frac(s: &mut u64, hi: f64) -> f64 {
    (next(s) % 1_000_000) as f64 / 1_000_000.0 * hi
}

fn config(base: u64, i: u64) -> SimConfig {
    let mut s = base.wrapping_mul(1_000_003).wrapping_add(i);
    let hosts = 3 + (next(&mut s) % 18) as usize;
    let lo = (hosts as u64 / 2).max(1);
    let host_ids = lo + next(&mut s) % (hosts as u64 + 4 - lo);
    SimConfig {
        seed: next(&mut s),
        hosts,
        host_ids,
        io_timeout: Duration::from_secs(1),
        fence_margin: Duration::from_secs(1 + next(&mut s) % 3),
        drift: frac(&mut s, 0.001),
        faults: Faults {
            fail: frac(&mut s, 0.08),
            slow: frac(&mut s, 0.05),
            lost: frac(&mut s, 0.02),
            tear: frac(&mut s, 0.04),
            pause: frac(&mut s, 0.05),
            crash: frac(&mut s, 0.02),
        },
        duration: Duration::from_secs(300),
    }
}

#[test]
fn invariants_hold_under_harsh_faults() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (runs, base) = (env("LEASE_SIM_RUNS", 16), env("LEASE_SIM_BASE", 1));
    let mut acquired = 0;
    for i in 0..runs {
        let cfg = config(base, i);
        match run(&cfg) {
            Ok(r) => acquired += r.exclusive_acquired + r.shared_acquired,
            Err(v) => panic!("{cfg:?}\n{v}"),
        }
    }
    assert!(
        acquired > runs,
        "the runs must have exercised the resource: {acquired} acquisitions"
    );
}
