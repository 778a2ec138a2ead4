//! The SPM role's timing on a simulated clock and in-memory shared storage: the SPM whose
//! storage hangs fences itself (no more pool metadata writes) at 8N, strictly before another
//! host may take the SDM lease at 8N + M; the new SPM's lver is larger, and the old SPM's
//! writes are refused both by its own fence and by the lver stored in the pool metadata.

use std::sync::Arc;
use std::time::Duration;

use oxvirt_lease::io::{FaultyIo, MemDisk, MemFault, SectorIo};
use oxvirt_lease::{direct, Clock, Lockspace, LockspaceConfig, SimClock};
use oxvirt_storage::pool::SpmFence;
use oxvirt_storage::spm::{acquire_sdm_with_io, SpmError, SpmRole, SpmState};
use oxvirt_types::SdUuid;

const N: Duration = Duration::from_secs(1);
const M: Duration = Duration::from_secs(2);
const STEP: Duration = Duration::from_millis(100);
const HOSTS: u64 = 4;

struct Host {
    ls: Arc<Lockspace>,
    ls_io: Arc<FaultyIo>,
    res_io: Arc<FaultyIo>,
    role: Arc<SpmRole>,
}

struct World {
    clock: SimClock,
    ls_disk: Arc<MemDisk>,
    res_disk: Arc<MemDisk>,
    sd: SdUuid,
}

impl World {
    fn new() -> World {
        let sd = SdUuid::new_random();
        let ls_disk = Arc::new(MemDisk::new(0));
        direct::init_lockspace_with(&*ls_disk, &sd.to_string(), 1, HOSTS).unwrap();
        let res_disk = Arc::new(MemDisk::new(0));
        direct::init_resource_with(&*res_disk, &sd.to_string(), "SDM", HOSTS).unwrap();
        World {
            clock: SimClock::new(Duration::from_secs(1000)),
            ls_disk,
            res_disk,
            sd,
        }
    }

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

    fn while_advancing<T: Send + 'static>(
        &self,
        live: &[&Host],
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let t = std::thread::spawn(f);
        while !t.is_finished() {
            self.step(live);
        }
        t.join().unwrap()
    }

    fn host(&self, host_id: u64, live: &[&Host]) -> Host {
        let ls_io = Arc::new(FaultyIo::new(self.ls_disk.clone()));
        let res_io = Arc::new(FaultyIo::new(self.res_disk.clone()));
        let mut cfg = LockspaceConfig::new(&self.sd.to_string(), host_id, &format!("host-{host_id}"), N);
        cfg.fence_margin = M;
        cfg.max_hosts = HOSTS;
        let (io, clock) = (ls_io.clone(), self.clock.clone());
        let ls = self
            .while_advancing(live, move || {
                Lockspace::acquire_with_io(io as Arc<dyn SectorIo>, cfg, Arc::new(clock))
            })
            .unwrap();
        let role = Arc::new(SpmRole::new(host_id));
        let r = role.clone();
        ls.on_fence(move |ev| {
            r.fence(&format!("{:?}", ev.reason));
        });
        Host {
            ls: Arc::new(ls),
            ls_io,
            res_io,
            role,
        }
    }
}

fn become_spm(w: &World, h: &Host, live: &[&Host], wait: bool) -> Result<u64, SpmError> {
    h.role.begin_contend()?;
    let (ls, io, sd) = (h.ls.clone(), h.res_io.clone() as Arc<dyn SectorIo>, w.sd);
    match w.while_advancing(live, move || acquire_sdm_with_io(&ls, sd, io, wait)) {
        Ok(lease) => h.role.acquired(lease),
        Err(e) => {
            h.role.contend_failed();
            Err(e)
        }
    }
}

#[test]
fn a_hung_spm_fences_itself_before_another_host_can_take_the_role() {
    let w = World::new();
    let a = w.host(1, &[]);
    let b = w.host(2, &[&a]);
    w.advance(&[&a, &b], 4 * N);
    let lver1 = become_spm(&w, &a, &[&a, &b], false).unwrap();
    assert_eq!(lver1, 1);
    assert_eq!(a.role.check().unwrap(), (1, 1));
    // A second host cannot take a live SPM's role, and its role goes back to Free.
    assert!(matches!(
        become_spm(&w, &b, &[&a, &b], false),
        Err(SpmError::Lease { .. })
    ));
    assert_eq!(b.role.state(), SpmState::Free);
    // A running job keeps the role from stopping.
    {
        let _job = a.role.job().unwrap();
        assert!(matches!(
            a.role.begin_stop(),
            Err(SpmError::Busy { running: 1, .. })
        ));
    }

    // Host 1's storage hangs. Host 2 contends, waiting for host 1 to be dead.
    let hung_at = w.clock.now();
    a.ls_io.set_fault(MemFault::Hang);
    a.res_io.set_fault(MemFault::Hang);
    // Like the engine, it keeps asking: an attempt that sees host 1's lease still changing
    // (alive) fails with OwnedByOther.
    b.role.begin_contend().unwrap();
    let mut fenced_at = None;
    let lease = loop {
        let (ls, io, sd) = (b.ls.clone(), b.res_io.clone() as Arc<dyn SectorIo>, w.sd);
        let contender = std::thread::spawn(move || acquire_sdm_with_io(&ls, sd, io, true));
        while !contender.is_finished() {
            w.step(&[&b]);
            if fenced_at.is_none() && a.role.check().is_err() {
                fenced_at = Some(w.clock.now());
                assert!(
                    matches!(a.role.state(), SpmState::Fenced { .. }),
                    "{:?}",
                    a.role.state()
                );
            }
            assert!(w.clock.now() < hung_at + 60 * N, "takeover never happened");
        }
        match contender.join().unwrap() {
            Ok(lease) => break lease,
            Err(SpmError::Lease { .. }) => w.step(&[&b]),
            Err(e) => panic!("{e:?}"),
        }
    };
    let taken_at = w.clock.now();
    let fenced_at = fenced_at.expect("host 1 never fenced its SPM role");
    // Self-fencing happens by 8N after the last renewal, i.e. before 8N from the hang; the
    // takeover no earlier than 8N + M after it.
    assert!(
        fenced_at <= hung_at + 8 * N + STEP * 2,
        "fenced at +{:?}",
        fenced_at - hung_at
    );
    assert!(
        taken_at >= fenced_at + M,
        "taken at +{:?}, fenced at +{:?}",
        taken_at - hung_at,
        fenced_at - hung_at
    );
    let lver2 = b.role.acquired(lease).unwrap();
    assert_eq!(lver2, 2, "the fencing token grows");
    assert_eq!(b.role.check().unwrap(), (2, 2));
    // The fenced SPM stays unable to act, and cannot start jobs.
    assert!(a.role.check().is_err());
    assert!(a.role.job().is_err());
    assert_eq!(a.role.state().vdsm(), "Free");
}

#[test]
fn stop_releases_and_another_host_takes_over_at_once() {
    let w = World::new();
    let a = w.host(1, &[]);
    let b = w.host(2, &[&a]);
    w.advance(&[&a, &b], 4 * N);
    become_spm(&w, &a, &[&a, &b], false).unwrap();
    let lease = a.role.begin_stop().unwrap().unwrap();
    assert_eq!(a.role.state(), SpmState::Stopping);
    assert!(a.role.check().is_err(), "no writes while stopping");
    lease.release().unwrap();
    a.role.stopped();
    assert_eq!(a.role.state(), SpmState::Free);
    let t0 = w.clock.now();
    let lver = become_spm(&w, &b, &[&a, &b], false).unwrap();
    assert_eq!(lver, 2);
    assert!(
        w.clock.now() - t0 < 2 * N,
        "a released lease is taken without waiting"
    );
    assert!(matches!(
        b.role.begin_contend(),
        Err(SpmError::AlreadySpm { lver: 2, .. })
    ));
}
