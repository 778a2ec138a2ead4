use std::time::Duration;
use oxvirt_lease::sim::{run, Faults, SimConfig};
fn rnd(s: &mut u64) -> u64 { *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); *s >> 11 }
fn f(s: &mut u64, hi: f64) -> f64 { (rnd(s) % 1_000_000) as f64 / 1_000_000.0 * hi }
#[test]
fn stress() {
    let n: u64 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let base: u64 = std::env::var("BASE").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut bad = 0;
    for i in 0..n {
        let mut s = base * 1_000_003 + i;
        let hosts = 3 + (rnd(&mut s) % 18) as usize;
        let lo = (hosts as u64 / 2).max(1);
        let host_ids = lo + rnd(&mut s) % (hosts as u64 + 4 - lo);
        let cfg = SimConfig { seed: rnd(&mut s), hosts, host_ids, io_timeout: Duration::from_secs(1),
            fence_margin: Duration::from_secs(1 + rnd(&mut s) % 3), drift: f(&mut s, 0.001),
            faults: Faults { fail: f(&mut s, 0.08), slow: f(&mut s, 0.05), lost: f(&mut s, 0.02), tear: f(&mut s, 0.04), pause: f(&mut s, 0.05), crash: f(&mut s, 0.02) },
            duration: Duration::from_secs(300) };
        if let Err(v) = run(&cfg) { bad += 1; println!("{cfg:?}\n{}", v.what); if std::env::var("TRACE").is_ok() { println!("{v}"); break; } }
    }
    assert_eq!(bad, 0);
}
