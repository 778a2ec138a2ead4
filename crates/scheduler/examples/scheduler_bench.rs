//! Times `place`, `plan_evacuation` and `balance` on a 50-host, 2,000-VM cluster.
//!
//! `cargo run --release -p oxvirt-scheduler --example scheduler_bench`
//!
//! Every call validates and indexes the whole snapshot, as the engine's calls will; the figures
//! are medians over repeated calls on the same snapshot.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use oxvirt_scheduler::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const HOSTS: usize = 50;
const VMS: usize = 2000;

fn cluster(kind: PolicyKind) -> Snapshot {
    let mut rng = StdRng::seed_from_u64(50_2000);
    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        let mut h = host(i as u128);
        h.cpu_cores = 32;
        h.cpu_threads = 64;
        h.mem_total_mib = 256 * 1024;
        h.storage_domains = (1..=4).map(sd).collect();
        h.networks = ["ovirtmgmt", "prod", "backup"]
            .iter()
            .map(|n| (*n).to_owned())
            .collect();
        h.spm = i == 0;
        hosts.push(h);
    }
    let mut vms = Vec::new();
    for i in 0..VMS {
        let mut v = vm(i as u128);
        v.memory_mib = *[1024, 2048, 4096, 8192].choose(&mut rng).unwrap();
        v.vcpus = rng.gen_range(1..=8);
        v.cpu_usage_pct = rng.gen_range(0.0..20.0);
        v.storage_domains = [sd(rng.gen_range(1..=4))].into();
        v.networks.insert("prod".into());
        v.highly_available = rng.gen_bool(0.3);
        v.ha_priority = *[1, 50, 100].choose(&mut rng).unwrap();
        if rng.gen_bool(0.05) {
            v.pinned_hosts = (0..3).map(|_| hid(rng.gen_range(0..HOSTS) as u128)).collect();
        }
        // 1,900 run, skewed so that the first ten hosts are crowded; 100 are down.
        if i < VMS - 100 {
            let h = if rng.gen_bool(0.4) {
                rng.gen_range(0..10)
            } else {
                rng.gen_range(0..HOSTS)
            };
            v.current_host = Some(hid(h as u128));
        }
        vms.push(v);
    }
    let groups = (0..100)
        .map(|g| {
            let members: Vec<u128> = (0..rng.gen_range(2..=6))
                .map(|_| rng.gen_range(0..VMS) as u128)
                .collect();
            let polarity = if g % 2 == 0 {
                Polarity::Negative
            } else {
                Polarity::Positive
            };
            group(&format!("g{g}"), &members, &[], Some((polarity, g % 4 < 2)), None)
        })
        .collect();
    let mut snap = snapshot(hosts, vms, kind);
    snap.affinity_groups = groups;
    snap.policy.memory_overcommit_pct = 150;
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    recompute(&mut snap, &Model::default());
    snap
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut samples = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(std::hint::black_box(f()));
        samples.push(t.elapsed());
    }
    (median(samples), last.unwrap())
}

fn main() {
    let snap = cluster(PolicyKind::EvenlyDistributed);
    let down: Vec<_> = snap
        .vms
        .iter()
        .filter(|v| v.current_host.is_none())
        .map(|v| v.id)
        .collect();
    let over = snap.hosts.iter().filter(|h| h.cpu_load_pct >= 80.0).count();
    println!(
        "cluster: {HOSTS} hosts, {VMS} VMs ({} running), {} affinity groups, {over} hosts ≥ 80% CPU",
        VMS - down.len(),
        snap.affinity_groups.len()
    );

    let mut i = 0;
    let (t, p) = time(200, || {
        i += 1;
        place(&snap, down[i % down.len()], Purpose::Start)
    });
    println!(
        "place (start one VM):           {t:?} median of 200  [{}]",
        p.is_ok()
    );

    let running: Vec<_> = snap
        .vms
        .iter()
        .filter(|v| v.current_host.is_some())
        .map(|v| v.id)
        .collect();
    let (t, _) = time(200, || {
        i += 1;
        place(&snap, running[i % running.len()], Purpose::Migrate)
    });
    println!("place (migrate one VM):         {t:?} median of 200");

    let (t, plan) = time(20, || plan_evacuation(&snap, hid(3)).unwrap());
    println!(
        "plan_evacuation (host of {} VMs): {t:?} median of 20  [{} planned, {} unplaced]",
        plan.moves.len() + plan.unplaced.len(),
        plan.moves.len(),
        plan.unplaced.len()
    );

    let params = BalanceParams {
        max_parallel_migrations: 10,
        ..BalanceParams::default()
    };
    let now = Timestamp::from_unix_millis(1_700_000_000_000);
    for kind in [
        PolicyKind::EvenlyDistributed,
        PolicyKind::PowerSaving,
        PolicyKind::VmEvenlyDistributed,
    ] {
        let mut s = snap.clone();
        s.policy = ClusterPolicy {
            kind,
            properties: PolicyProperties::defaults_for(kind),
            ..s.policy
        };
        s.policy.properties.cpu_over_commit_duration_minutes = 0;
        s.policy.properties.high_vm_count = 40;
        let (t, (migrations, _)) = time(20, || {
            balance(&s, &BalanceState::default(), now, &params).unwrap()
        });
        println!(
            "balance ({kind}, ≤ 10 moves): {t:?} median of 20  [{} migrations]",
            migrations.len()
        );
    }
}
