//! The threaded `Lockspace` handle on a simulated clock and in-memory shared storage: renewal,
//! the fence timeline, liveness of other hosts, resource takeover, shared mode.
//!
//! Time only moves when the test advances it. Before each step the test waits (in real time)
//! until every lockspace that should be renewing has caught up, so a slow machine cannot make
//! a renewal look late.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxvirt_lease::io::{FaultyIo, MemDisk, MemFault, SectorIo};
use oxvirt_lease::lockspace::AcquireOptions;
use oxvirt_lease::{
    direct, Clock, FenceEvent, FenceReason, HostStatus, LeaseError, LeaseMode, Lockspace, LockspaceConfig,
    OwnerWait, SimClock,
};

const N: Duration = Duration::from_secs(1);
const M: Duration = Duration::from_secs(2);
const STEP: Duration = Duration::from_millis(100);
const HOSTS: u64 = 8;

struct World {
    clock: SimClock,
    ls_disk: Arc<MemDisk>,
    res_disk: Arc<MemDisk>,
}

struct Host {
    ls: Lockspace,
    ls_io: Arc<FaultyIo>,
    res_io: Arc<FaultyIo>,
}

impl World {
    fn new() -> World {
        let ls_disk = Arc::new(MemDisk::new(0));
        direct::init_lockspace_with(&*ls_disk, "LS", 1, HOSTS).unwrap();
        let res_disk = Arc::new(MemDisk::new(0));
        direct::init_resource_with(&*res_disk, "LS", "SDM", HOSTS).unwrap();
        World {
            clock: SimClock::new(Duration::from_secs(10_000)),
            ls_disk,
            res_disk,
        }
    }

    fn config(host_id: u64) -> LockspaceConfig {
        let mut c = LockspaceConfig::new("LS", host_id, &format!("host-{host_id}"), N);
        c.fence_margin = M;
        c.max_hosts = HOSTS;
        c
    }

    /// Runs `f` on another thread while advancing the clock until it returns.
    /// The clock moves only while that thread is blocked (waiting on the clock or on I/O):
    /// what it decides from the time it reads cannot depend on how soon a loaded machine
    /// schedules it.
    fn while_advancing<T: Send + 'static>(
        &self,
        live: &[&Host],
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            f()
        });
        let tid = tid_rx.recv().unwrap();
        while !t.is_finished() {
            wait_until_blocked(tid, &t);
            self.step(live);
        }
        t.join().unwrap()
    }

    /// Advances until `h` renews and stops right there, so that its record's age from then
    /// on is exactly the time the test lets pass.
    fn advance_to_renewal(&self, live: &[&Host], h: &Host) {
        let t = h.ls.timeouts();
        let renewed_at = || h.ls.valid_until() - t.renewal_fail();
        let before = renewed_at();
        while renewed_at() == before {
            let start = std::time::Instant::now();
            // A renewal due now lands before the clock moves on.
            while self.now() >= before + t.renewal() && renewed_at() == before {
                assert!(start.elapsed() < Duration::from_secs(20), "renewal thread stuck");
                std::thread::sleep(Duration::from_millis(1));
            }
            if renewed_at() == before {
                self.step(live);
            }
        }
    }

    fn acquire(&self, host_id: u64, live: &[&Host]) -> Host {
        let ls_io = Arc::new(FaultyIo::new(self.ls_disk.clone()));
        let res_io = Arc::new(FaultyIo::new(self.res_disk.clone()));
        let (io, clock) = (ls_io.clone(), self.clock.clone());
        let ls = self
            .while_advancing(live, move || {
                Lockspace::acquire_with_io(io as Arc<dyn SectorIo>, World::config(host_id), Arc::new(clock))
            })
            .unwrap();
        Host { ls, ls_io, res_io }
    }

    /// One clock step, once every live lockspace has renewed on time.
    fn step(&self, live: &[&Host]) {
        for h in live {
            let start = std::time::Instant::now();
            while h.ls.is_valid() && h.ls.valid_until() < self.clock.now() + N * 5 {
                assert!(start.elapsed() < Duration::from_secs(20), "renewal thread stuck");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.clock.advance(STEP);
        std::thread::sleep(Duration::from_millis(1));
    }

    fn advance(&self, live: &[&Host], d: Duration) {
        let end = self.clock.now() + d;
        while self.clock.now() < end {
            self.step(live);
        }
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }
}

/// Waits (in real time) until thread `tid` of this process is neither running nor runnable, or
/// has finished.
fn wait_until_blocked<T>(tid: libc::pid_t, t: &std::thread::JoinHandle<T>) {
    let stat = format!("/proc/self/task/{tid}/stat");
    let start = std::time::Instant::now();
    loop {
        let running = match std::fs::read_to_string(&stat) {
            // The state follows the parenthesised command name.
            Ok(s) => s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('R')),
            Err(_) => false,
        };
        if !running || t.is_finished() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "thread {tid} never blocks"
        );
        std::thread::yield_now();
    }
}

impl Host {
    fn acquire_resource(&self, opts: AcquireOptions) -> Result<oxvirt_lease::ResourceLease, LeaseError> {
        self.ls
            .acquire_resource_with_io(self.res_io.clone() as Arc<dyn SectorIo>, "SDM", opts)
    }
}

fn recorder(ls: &Lockspace) -> (Receiver<FenceEvent>, Arc<Mutex<Vec<FenceEvent>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    ls.on_fence(move |ev| s2.lock().unwrap().push(ev.clone()));
    (ls.fence_channel(), seen)
}

fn wait_fence(rx: &Receiver<FenceEvent>) -> FenceEvent {
    rx.recv_timeout(Duration::from_secs(20)).expect("fence event")
}

#[test]
fn acquire_waits_2n_and_renewals_keep_the_lease_valid() {
    let w = World::new();
    let start = w.now();
    let a = w.acquire(1, &[]);
    let took = w.now() - start;
    assert!(
        took >= 2 * N && took < 2 * N + Duration::from_secs(1),
        "took {took:?}"
    );
    assert_eq!(a.ls.generation(), 1);
    let ts0 = direct::read_lockspace_with(&*w.ls_disk, HOSTS).unwrap()[0]
        .record
        .clone()
        .unwrap()
        .timestamp;
    w.advance(&[&a], Duration::from_secs(30));
    assert!(a.ls.is_valid());
    assert!(a.ls.fenced().is_none());
    let rec = direct::read_lockspace_with(&*w.ls_disk, HOSTS).unwrap()[0]
        .record
        .clone()
        .unwrap();
    // Renewed every 2N: about 15 new timestamps in 30 s.
    assert!(rec.timestamp >= ts0 + 13, "{} -> {}", ts0, rec.timestamp);
    assert_eq!(rec.resource_name.to_string(), "host-1");
    a.ls.release().unwrap();
    let rec = direct::read_lockspace_with(&*w.ls_disk, HOSTS).unwrap()[0]
        .record
        .clone()
        .unwrap();
    assert_eq!(rec.timestamp, 0);
}

#[test]
fn fence_fires_exactly_8n_after_the_last_renewal_when_storage_hangs() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    let (rx, seen) = recorder(&a.ls);
    let lease = a.acquire_resource(AcquireOptions::default()).unwrap();
    a.ls_io.set_fault(MemFault::Hang);
    let deadline = a.ls.valid_until();
    while w.now() + STEP < deadline {
        w.step(&[]);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(seen.lock().unwrap().is_empty(), "fenced before 8N");
    assert!(lease.is_valid());
    w.step(&[]);
    let ev = wait_fence(&rx);
    assert!(
        ev.at >= deadline && ev.at <= deadline + STEP,
        "{ev:?} deadline {deadline:?}"
    );
    assert_eq!(ev.expired_at, deadline);
    assert!(
        matches!(ev.reason, FenceReason::RenewalFailed { since_last_success } if since_last_success >= 8 * N)
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "the callback fires once");
    assert!(!lease.is_valid());
    assert!(matches!(
        a.acquire_resource(AcquireOptions::default()),
        Err(LeaseError::AlreadyHeld { .. })
    ));
    // A fenced holder does not touch the disk when releasing.
    assert!(matches!(lease.release(), Err(LeaseError::Fenced { .. })));
    assert!(matches!(
        a.acquire_resource(AcquireOptions::default()),
        Err(LeaseError::Fenced { .. })
    ));
    // A late subscriber learns of the fence at once.
    assert_eq!(a.ls.fence_channel().try_recv().unwrap(), ev);
}

#[test]
fn a_lease_overwritten_by_another_host_fences_at_the_next_renewal() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    let (rx, _) = recorder(&a.ls);
    let mut rec = direct::read_lockspace_with(&*w.ls_disk, HOSTS).unwrap()[0]
        .record
        .clone()
        .unwrap();
    rec.resource_name = oxvirt_lease::format::Name::new("intruder").unwrap();
    rec.owner_generation += 1;
    w.ls_disk.write(0, &rec.to_sector()).unwrap();
    let t0 = w.now();
    // Each step waits for a renewal that falls due (the one that finds the intruder).
    while a.ls.fenced().is_none() {
        w.step(&[&a]);
        assert!(w.now() - t0 < 4 * N, "not fenced within 2N + slack");
    }
    assert!(matches!(wait_fence(&rx).reason, FenceReason::LeaseLost(_)));
}

#[test]
fn other_hosts_go_unknown_live_fail_dead_on_our_clock() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    let b = w.acquire(2, &[&a]);
    assert_eq!(a.ls.host_status(3), HostStatus::Free);
    w.advance(&[&a, &b], 6 * N);
    assert_eq!(a.ls.host_status(2), HostStatus::Live);
    assert_eq!(b.ls.host_status(1), HostStatus::Live);
    assert_eq!(a.ls.hosts(), vec![(1, HostStatus::Live), (2, HostStatus::Live)]);

    b.ls_io.set_fault(MemFault::Hang);
    // Let A look at least once more, then B's record stops changing.
    w.advance(&[&a], 3 * N);
    let last_live = a.ls.host_observation(2).unwrap().last_live;
    let mut seen = Vec::new();
    while w.now() < last_live + 8 * N + M + 3 * N {
        let s = a.ls.host_status(2);
        let t = w.now() - last_live;
        let expected = if t <= 8 * N {
            HostStatus::Live
        } else if t <= 8 * N + M {
            HostStatus::Fail
        } else {
            HostStatus::Dead
        };
        assert_eq!(s, expected, "at last_live + {t:?}");
        if seen.last() != Some(&s) {
            seen.push(s);
        }
        w.step(&[&a]);
    }
    assert_eq!(seen, vec![HostStatus::Live, HostStatus::Fail, HostStatus::Dead]);
    assert!(b.ls.fenced().is_some(), "B fenced itself");
}

#[test]
fn a_dead_holders_resource_is_taken_after_its_fence_plus_margin() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    let b = w.acquire(2, &[&a]);
    w.advance(&[&a, &b], 4 * N);
    let held = a.acquire_resource(AcquireOptions::default()).unwrap();
    assert_eq!(held.lver(), 1);
    match b.acquire_resource(AcquireOptions::default()) {
        Err(LeaseError::OwnedByOther {
            host_id,
            generation,
            lver,
            ..
        }) => assert_eq!((host_id, generation, lver), (1, 1, 1)),
        other => panic!("expected OwnedByOther, got {other:?}"),
    }
    let (rx, _) = recorder(&a.ls);
    a.ls_io.set_fault(MemFault::Hang);
    a.res_io.set_fault(MemFault::Hang);
    let b = Arc::new(b);
    let b2 = b.clone();
    // As the node does for the SPM: retry while the owner still looks alive; once it falls
    // silent, one acquire waits until it is dead.
    let lease = w.while_advancing(&[&b], move || loop {
        match b2.acquire_resource(AcquireOptions {
            wait: OwnerWait::UntilDead,
            ..AcquireOptions::default()
        }) {
            Ok(l) => return l,
            Err(LeaseError::OwnedByOther { host_id: 1, .. }) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    });
    let taken_at = w.now();
    let fence = wait_fence(&rx);
    assert!(
        taken_at >= fence.expired_at + M,
        "taken at {taken_at:?}, holder's leases expired at {:?}",
        fence.expired_at
    );
    assert!(taken_at <= fence.expired_at + M + 4 * N, "takeover took too long");
    assert_eq!(lease.lver(), 2);
    assert!(!held.is_valid());
    lease.release().unwrap();
}

#[test]
fn shared_holders_exclude_an_exclusive_one() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    let b = w.acquire(2, &[&a]);
    let c = w.acquire(3, &[&a, &b]);
    w.advance(&[&a, &b, &c], 4 * N);
    let shared = AcquireOptions {
        mode: LeaseMode::Shared,
        ..AcquireOptions::default()
    };
    let sa = a.acquire_resource(shared).unwrap();
    let sb = b.acquire_resource(shared).unwrap();
    assert_eq!(sa.mode(), LeaseMode::Shared);
    assert!(sb.lver() > sa.lver());
    match c.acquire_resource(AcquireOptions::default()) {
        Err(LeaseError::SharedHeld { hosts, .. }) => assert_eq!(hosts, vec![1, 2]),
        other => panic!("expected SharedHeld, got {other:?}"),
    }
    let dump = direct::read_resource_with(&*w.res_disk).unwrap();
    assert_eq!(dump.shared_holders(), vec![(1, 1), (2, 1)]);
    sa.release().unwrap();
    match c.acquire_resource(AcquireOptions::default()) {
        Err(LeaseError::SharedHeld { hosts, .. }) => assert_eq!(hosts, vec![2]),
        other => panic!("expected SharedHeld, got {other:?}"),
    }
    sb.release().unwrap();
    let ex = c.acquire_resource(AcquireOptions::default()).unwrap();
    assert_eq!(ex.mode(), LeaseMode::Exclusive);
    assert!(matches!(
        a.acquire_resource(shared),
        Err(LeaseError::OwnedByOther { host_id: 3, .. })
    ));
    assert!(matches!(a.ls.release(), Ok(())));
    assert!(matches!(
        c.ls.release(),
        Err(LeaseError::ResourcesHeld { count: 1, .. })
    ));
    ex.release().unwrap();
    c.ls.release().unwrap();
}

#[test]
fn a_dead_shared_holder_is_cleared_by_an_exclusive_acquire() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    let c = w.acquire(3, &[&a]);
    w.advance(&[&a, &c], 4 * N);
    let _sa = a
        .acquire_resource(AcquireOptions {
            mode: LeaseMode::Shared,
            ..AcquireOptions::default()
        })
        .unwrap();
    assert!(matches!(
        c.acquire_resource(AcquireOptions::default()),
        Err(LeaseError::SharedHeld { .. })
    ));
    a.ls_io.set_fault(MemFault::Hang);
    a.res_io.set_fault(MemFault::Hang);
    w.advance(&[&c], 8 * N + M + 3 * N);
    assert_eq!(c.ls.host_status(1), HostStatus::Dead);
    let ex = c.acquire_resource(AcquireOptions::default()).unwrap();
    assert!(direct::read_resource_with(&*w.res_disk)
        .unwrap()
        .shared_holders()
        .is_empty());
    ex.release().unwrap();
}

#[test]
fn a_host_id_held_by_another_host_is_taken_only_after_it_stays_silent() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    // Another host (another name) asks for the same host id while A renews: busy after the wait.
    let ls_io: Arc<dyn SectorIo> = Arc::new(FaultyIo::new(w.ls_disk.clone()));
    let clock = w.clock.clone();
    let mut cfg = World::config(1);
    cfg.host_name = "host-b".into();
    let cfg2 = cfg.clone();
    let io2 = ls_io.clone();
    let start = w.now();
    let busy = w.while_advancing(&[&a], move || {
        Lockspace::acquire_with_io(io2, cfg2, Arc::new(clock))
    });
    match busy {
        Err(LeaseError::HostIdBusy {
            host_id, owner_name, ..
        }) => assert_eq!((host_id, owner_name.as_str()), (1, "host-1")),
        other => panic!("expected HostIdBusy, got {other:?}"),
    }
    assert!(
        w.now() - start >= 8 * N + M,
        "the acquire waited out 8N + M first"
    );

    // A loses its storage and stops renewing: now the host id is taken, with a new generation.
    a.ls_io.set_fault(MemFault::Hang);
    let (clock, start) = (w.clock.clone(), w.now());
    let b = w
        .while_advancing(&[], move || {
            Lockspace::acquire_with_io(ls_io, cfg, Arc::new(clock))
        })
        .unwrap();
    assert!(w.now() - start >= 8 * N + M + 2 * N);
    assert_eq!(b.generation(), 2);
    assert!(a.ls.fenced().is_some());
    b.release().unwrap();
}

/// A lockspace initialized with a larger io_timeout (VDSM writes its domain's 10 s) and acquired
/// with N = 1 s: the free record's foreign N must not stretch the acquisition past our own
/// lease's validity, so the host id is valid — not already expired — when acquire returns.
#[test]
fn a_free_record_with_a_larger_io_timeout_does_not_delay_acquisition() {
    let clock = SimClock::new(Duration::from_secs(10_000));
    let disk = Arc::new(MemDisk::new(0));
    direct::init_lockspace_with(&*disk, "LS", 10, HOSTS).unwrap();
    let w = World {
        clock: clock.clone(),
        ls_disk: disk,
        res_disk: Arc::new(MemDisk::new(0)),
    };
    let start = w.now();
    let a = w.acquire(3, &[]);
    let took = w.now() - start;
    assert!(
        took >= 2 * N && took < 2 * N + Duration::from_secs(1),
        "took {took:?}"
    );
    assert!(a.ls.is_valid(), "the host id must be valid on return");
    assert!(a.ls.fenced().is_none());
    w.advance(&[&a], Duration::from_secs(10));
    assert!(a.ls.is_valid() && a.ls.fenced().is_none());
    a.ls.release().unwrap();
}

impl World {
    /// A new incarnation of host `host_id` (same name) acquiring with `resume`.
    fn reacquire(&self, host_id: u64, resume: bool, live: &[&Host]) -> Host {
        let ls_io = Arc::new(FaultyIo::new(self.ls_disk.clone()));
        let res_io = Arc::new(FaultyIo::new(self.res_disk.clone()));
        let (io, clock) = (ls_io.clone(), self.clock.clone());
        let mut cfg = World::config(host_id);
        cfg.resume = resume;
        let ls = self
            .while_advancing(live, move || {
                Lockspace::acquire_with_io(io as Arc<dyn SectorIo>, cfg, Arc::new(clock))
            })
            .unwrap();
        Host { ls, ls_io, res_io }
    }
}

/// A node killed with `kill -9` leaves its VMs running on their leases; restarted before its
/// host id expires, it continues that host id with the same generation, so nobody may take
/// the leases in between, and it can re-adopt them. Restarted too late, it waits like anyone.
#[test]
fn a_restarted_holder_resumes_its_unexpired_host_id_and_keeps_its_resources() {
    let w = World::new();
    let a = w.acquire(1, &[]);
    let b = w.acquire(2, &[&a]);
    w.advance(&[&a, &b], 4 * N);
    let held = a.acquire_resource(AcquireOptions::default()).unwrap();
    assert_eq!((held.lver(), a.ls.generation()), (1, 1));
    // The process dies just after a renewal: no more renewals, no release.
    w.advance_to_renewal(&[&a, &b], &a);
    a.ls_io.set_fault(MemFault::Hang);
    a.res_io.set_fault(MemFault::Hang);
    w.advance(&[&b], 3 * N);

    let start = w.now();
    let a2 = w.reacquire(1, true, &[&b]);
    let took = w.now() - start;
    assert_eq!(a2.ls.generation(), 1, "resume keeps the generation");
    assert!(took < 2 * N + Duration::from_secs(1), "resume took {took:?}");
    // The resource stays owned by host 1 in that generation: B may not take it, now or later.
    for _ in 0..3 {
        match b.acquire_resource(AcquireOptions::default()) {
            Err(LeaseError::OwnedByOther {
                host_id, generation, ..
            }) => assert_eq!((host_id, generation), (1, 1)),
            other => panic!("expected OwnedByOther, got {other:?}"),
        }
        w.advance(&[&a2, &b], 5 * N);
    }
    // The new incarnation takes the lease back (its own generation's) for the surviving holder.
    let again = a2.acquire_resource(AcquireOptions::default()).unwrap();
    assert_eq!(again.lver(), 2);
    again.release().unwrap();

    // Killed again and restarted only after its record expired: no resume, the full wait and
    // a new generation (a fence watchdog has killed the holders by then).
    a2.ls_io.set_fault(MemFault::Hang);
    a2.res_io.set_fault(MemFault::Hang);
    w.advance(&[&b], 9 * N);
    let start = w.now();
    let a3 = w.reacquire(1, true, &[&b]);
    assert_eq!(a3.ls.generation(), 2);
    assert!(w.now() - start >= 8 * N + M, "an expired record is waited out");
    a3.ls.release().unwrap();
    b.ls.release().unwrap();
}

#[test]
fn a_hung_lockspace_fences_alone_while_another_of_the_host_keeps_renewing() {
    // One host in two lockspaces (two storage domains) on separate storage.
    let w = World::new();
    let a = w.acquire(1, &[]);
    let disk2 = Arc::new(MemDisk::new(0));
    direct::init_lockspace_with(&*disk2, "LS2", 1, HOSTS).unwrap();
    let io2 = Arc::new(FaultyIo::new(disk2.clone()));
    let (io, clock) = (io2.clone(), w.clock.clone());
    let mut cfg = World::config(1);
    cfg.space_name = "LS2".into();
    let b = Host {
        ls: w
            .while_advancing(&[&a], move || {
                Lockspace::acquire_with_io(io as Arc<dyn SectorIo>, cfg, Arc::new(clock))
            })
            .unwrap(),
        ls_io: io2.clone(),
        res_io: io2,
    };
    let stamp = || {
        direct::read_lockspace_with(&*disk2, HOSTS).unwrap()[0]
            .record
            .clone()
            .unwrap()
            .timestamp
    };
    let (rx, _) = recorder(&a.ls);
    // The first domain's storage hangs (a dead NFS server): its renewals block in I/O.
    a.ls_io.set_fault(MemFault::Hang);
    let deadline = a.ls.valid_until();
    let before = stamp();
    while w.now() < deadline + STEP {
        w.step(&[&b]);
    }
    let ev = wait_fence(&rx);
    assert!(ev.at >= deadline, "{ev:?}");
    // The other lockspace renewed every 2N all along and is still valid.
    assert!(b.ls.is_valid() && b.ls.fenced().is_none());
    let after = stamp();
    assert!(after >= before + 3, "LS2 renewals stalled: {before} -> {after}");
    w.advance(&[&b], 4 * N);
    assert!(stamp() > after, "LS2 stopped renewing after LS1's fence");
    assert!(b.ls.valid_until() > w.now() + 5 * N);
}
