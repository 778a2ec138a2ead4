//! Seeded simulations of 3 to 20 hosts contending for host ids and one resource, with faults;
//! the simulator checks the lease invariants after every event (see `oxvirt_lease::sim`):
//! a host id held by at most one host, at most one exclusive holder, shared and exclusive never
//! together, fencing tokens (lver) only growing.

use std::time::Duration;

use oxvirt_lease::sim::{run, Faults, SimConfig, SimReport};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn check(cfg: &SimConfig) -> SimReport {
    match run(cfg) {
        Ok(r) => r,
        Err(v) => panic!("{cfg:?}\n{v}"),
    }
}

#[test]
fn fault_free_cluster_makes_progress() {
    let r = check(&SimConfig::new(1, 5));
    assert!(r.host_ids_acquired >= 5, "{r:?}");
    assert!(r.exclusive_acquired >= 10, "{r:?}");
    assert!(r.shared_acquired >= 3, "{r:?}");
    assert!(r.owned_by_other > 0, "hosts must have contended: {r:?}");
    assert_eq!(r.fences, 0, "{r:?}");
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let mut cfg = SimConfig::new(77, 8);
    cfg.faults = Faults {
        fail: 0.02,
        slow: 0.02,
        lost: 0.005,
        tear: 0.01,
        pause: 0.02,
        crash: 0.01,
    };
    assert_eq!(check(&cfg), check(&cfg));
}

#[test]
fn crashed_and_paused_holders_are_fenced_and_replaced() {
    let mut cfg = SimConfig::new(5, 6);
    cfg.faults.pause = 0.05;
    cfg.faults.crash = 0.02;
    cfg.duration = Duration::from_secs(600);
    let r = check(&cfg);
    assert!(r.crashes > 0 && r.pauses > 0, "{r:?}");
    assert!(r.fences > 0, "a long pause must have fenced someone: {r:?}");
    assert!(r.exclusive_acquired > 10, "{r:?}");
}

fn faults() -> impl Strategy<Value = Faults> {
    (
        0.0..0.05f64,
        0.0..0.03f64,
        0.0..0.01f64,
        0.0..0.02f64,
        0.0..0.03f64,
        0.0..0.01f64,
    )
        .prop_map(|(fail, slow, lost, tear, pause, crash)| Faults {
            fail,
            slow,
            lost,
            tear,
            pause,
            crash,
        })
}

fn config() -> impl Strategy<Value = SimConfig> {
    (any::<u64>(), 3usize..=20, faults(), 0.0..0.001f64, 1u64..=3).prop_flat_map(
        |(seed, hosts, faults, drift, m)| {
            let lo = (hosts as u64 / 2).max(1);
            (lo..=hosts as u64 + 3).prop_map(move |host_ids| SimConfig {
                seed,
                hosts,
                host_ids,
                io_timeout: Duration::from_secs(1),
                fence_margin: Duration::from_secs(m),
                drift,
                faults,
                duration: Duration::from_secs(300),
            })
        },
    )
}

proptest! {
    #![proptest_config(Config {
        cases: 96,
        rng_seed: RngSeed::Fixed(0x0a11_1ea5e),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn invariants_hold_under_contention_and_faults(cfg in config()) {
        let r = check(&cfg);
        prop_assert!(r.host_ids_acquired > 0, "{:?}", r);
    }
}
