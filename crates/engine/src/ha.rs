//! High availability: the monitor's loop that restarts highly available VMs.
//!
//! Each monitoring round, for every VM with HA enabled, [`HaTracker::need`] classifies it:
//! - running on an up host: nothing to do (the host is remembered for an in-place restart);
//! - `unknown`/`not_responding` on a host that is not up (non-responsive, down): restart
//!   **elsewhere**;
//! - `down` with a crash reason (QEMU died) on a host that is up: restart **in place**;
//! - `down` because it was self-fenced, vanished from its host, was killed after staying
//!   paused on a storage error too long (resume behaviour `kill`), or a previous HA restart
//!   failed ([`RESTART_PENDING`]): restart elsewhere (where the scheduler picks);
//! - `down` for any other reason (stopped by an admin, guest shutdown): nothing.
//!
//! Then [`HaTracker::decide`] turns the need into an [`Action`] given the VM lease as a live
//! node sees it ([`LeaseView`], from `Lease.info`: no owner, or an owner whose host id is dead in
//! that node's view of the lockspace) and the retry schedule:
//!
//! ```text
//! need none                          → Nothing (forget retries)
//! restart running / backoff pending  → Wait
//! lease free or owner dead           → Restart (in place or elsewhere)
//! lease may be held, host has agent  → Fence the host (once), then wait for the lease
//! lease may be held / unknown        → Wait
//! ```
//!
//! Invariant: a restart is never asked for while the lease may still be held; and the node's
//! `VM.create` takes the lease before QEMU starts, so even a wrong view cannot run a VM twice.
//! Failed restarts back off exponentially (1 s, 2 s, 4 s … 30 s) on the injected clock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use oxvirt_scheduler::Purpose;

use crate::app::App;
use crate::commands::{CommandError, Commands};
use crate::db::ListQuery;
use crate::model::{HostStatus, HostUuid, NewEvent, Severity, Vm, VmId, VmStatus};
use crate::time::Timestamp;

/// `status_detail` of an HA VM whose restart failed and is to be tried again.
pub const RESTART_PENDING: &str = "ha restart pending";

/// What the loop knows of one highly available VM.
#[derive(Debug, Clone, PartialEq)]
pub struct HaVm {
    pub id: VmId,
    pub status: VmStatus,
    pub detail: Option<String>,
    pub host: Option<HostUuid>,
}

impl HaVm {
    pub fn of(v: &Vm) -> HaVm {
        HaVm {
            id: v.id,
            status: v.runtime.status,
            detail: v.runtime.status_detail.clone(),
            host: v.runtime.run_on_host,
        }
    }
}

/// Why and where a VM must be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    None,
    /// QEMU crashed on a host that is up.
    InPlace(HostUuid),
    /// Its host is unreachable or fenced it; `from` is that host when known.
    Elsewhere {
        from: Option<HostUuid>,
    },
}

/// The VM lease as a live node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseView {
    /// No node could be asked.
    Unknown,
    /// No owner.
    Free,
    /// The owner's host id is dead in the node's view: the lease may be taken.
    OwnerDead,
    /// The owner is alive, failing, or not yet known dead: the lease may be held.
    MayBeHeld,
}

impl LeaseView {
    /// From a `Lease.info` answer.
    pub fn from_info(info: &serde_json::Value) -> LeaseView {
        match (info["owner"].is_null(), info["ownerStatus"].as_str()) {
            (true, _) | (_, Some("free")) => LeaseView::Free,
            (false, Some("dead")) => LeaseView::OwnerDead,
            _ => LeaseView::MayBeHeld,
        }
    }

    fn may_take(self) -> bool {
        matches!(self, LeaseView::Free | LeaseView::OwnerDead)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Wait(String),
    Restart { in_place: Option<HostUuid> },
    Fence(HostUuid),
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Restarted,
    Failed,
}

/// Retry schedule.
#[derive(Debug, Clone, Copy)]
pub struct HaParams {
    pub first_retry: Duration,
    pub max_backoff: Duration,
    /// A host is fenced at most once per this period.
    pub fence_period: Duration,
}

impl Default for HaParams {
    fn default() -> Self {
        HaParams {
            first_retry: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            fence_period: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Retry {
    failures: u32,
    next_at: Option<Timestamp>,
}

/// The HA loop's memory between rounds (in memory: a restarted engine starts afresh, which only
/// forgets backoffs and in-place hosts).
#[derive(Debug, Default)]
pub struct HaTracker {
    pub params: HaParams,
    last_host: HashMap<VmId, HostUuid>,
    retries: HashMap<VmId, Retry>,
    in_flight: HashSet<VmId>,
    fenced: HashMap<HostUuid, Timestamp>,
}

fn crashed(detail: &str) -> bool {
    detail.contains("\"died\"")
}

/// Self-fenced, gone, killed after staying paused on a storage error too long (its host's
/// storage may still be out: the scheduler picks where), or a failed restart to try again.
fn restart_elsewhere(detail: &str) -> bool {
    detail.contains("\"fenced\"")
        || detail.contains("\"paused_too_long\"")
        || detail.contains("gone from its host")
        || detail.starts_with(RESTART_PENDING)
}

impl HaTracker {
    pub fn new(params: HaParams) -> HaTracker {
        HaTracker {
            params,
            ..Default::default()
        }
    }

    /// Classifies a VM; `host_status` answers for hosts of its cluster.
    pub fn need(&mut self, vm: &HaVm, host_status: impl Fn(HostUuid) -> Option<HostStatus>) -> Need {
        let up = |h: HostUuid| host_status(h) == Some(HostStatus::Up);
        match vm.status {
            VmStatus::Unknown | VmStatus::NotResponding => match vm.host {
                Some(h) if up(h) => Need::None,
                from => Need::Elsewhere { from },
            },
            VmStatus::Down => {
                let detail = vm.detail.as_deref().unwrap_or("");
                let last = self.last_host.get(&vm.id).copied();
                if crashed(detail) {
                    match last {
                        Some(h) if up(h) => Need::InPlace(h),
                        from => Need::Elsewhere { from },
                    }
                } else if restart_elsewhere(detail) {
                    Need::Elsewhere { from: last }
                } else {
                    Need::None
                }
            }
            s if s.is_running() => {
                if let Some(h) = vm.host {
                    self.last_host.insert(vm.id, h);
                }
                Need::None
            }
            _ => Need::None,
        }
    }

    /// The action for a VM this round. `can_fence`: the `from` host is unreachable and has a
    /// fence agent.
    pub fn decide(
        &mut self,
        vm: VmId,
        need: Need,
        lease: LeaseView,
        can_fence: bool,
        now: Timestamp,
    ) -> Action {
        if need == Need::None {
            self.retries.remove(&vm);
            return Action::Nothing;
        }
        if self.in_flight.contains(&vm) {
            return Action::Wait("a restart is running".into());
        }
        if let Some(at) = self.retries.get(&vm).and_then(|r| r.next_at) {
            if now < at {
                return Action::Wait(format!("next attempt at {at}"));
            }
        }
        if lease.may_take() {
            return Action::Restart {
                in_place: match need {
                    Need::InPlace(h) => Some(h),
                    _ => None,
                },
            };
        }
        if let (Need::Elsewhere { from: Some(h) }, true) = (need, can_fence) {
            let recent = self
                .fenced
                .get(&h)
                .is_some_and(|t| now < t.saturating_add(self.params.fence_period));
            if !recent {
                return Action::Fence(h);
            }
        }
        Action::Wait(match lease {
            LeaseView::Unknown => "no live node could read the VM lease".into(),
            _ => "the VM lease may still be held".into(),
        })
    }

    /// An attempt (restart or fence) starts for `vm`.
    pub fn started(&mut self, vm: VmId) {
        self.in_flight.insert(vm);
    }

    pub fn finished(&mut self, vm: VmId, outcome: Outcome, now: Timestamp) {
        self.in_flight.remove(&vm);
        match outcome {
            Outcome::Restarted => {
                self.retries.remove(&vm);
            }
            Outcome::Failed => {
                let r = self.retries.entry(vm).or_default();
                r.failures += 1;
                let exp = r.failures.saturating_sub(1).min(16);
                let wait = (self.params.first_retry * 2u32.pow(exp)).min(self.params.max_backoff);
                r.next_at = Some(now.saturating_add(wait));
            }
        }
    }

    /// A fence of `host` was attempted (successful or not: it is not repeated within
    /// `fence_period`).
    pub fn fence_attempted(&mut self, host: HostUuid, now: Timestamp) {
        self.fenced.insert(host, now);
    }

    /// A host came back: it may be fenced again should it fail again.
    pub fn host_up(&mut self, host: HostUuid) {
        self.fenced.remove(&host);
    }
}

/// The VM lease as `host` (or, failing that, any up host of the data center) sees it.
async fn lease_view(cmds: &Commands, vm: &Vm, ask_first: Option<HostUuid>) -> LeaseView {
    let app = &cmds.app;
    let Ok(Some(sd)) = cmds.vm_lease_domain(vm).await else {
        return LeaseView::Unknown;
    };
    let Ok(Some(cl)) = app.db.cluster_get(vm.cluster_id).await else {
        return LeaseView::Unknown;
    };
    let mut hosts = app.dc_hosts(cl.data_center_id, true).await.unwrap_or_default();
    hosts.sort_by_key(|h| Some(h.id) != ask_first);
    for h in hosts {
        let Ok(node) = app.client(&h) else { continue };
        // Bounded: a frozen node still recorded up must not stall the round.
        let node = node.within(app.settings.poll_timeout());
        match node
            .call("Lease.info", json!({ "sdUUID": sd, "leaseID": vm.id }))
            .await
        {
            Ok(info) => return LeaseView::from_info(&info),
            Err(e) => {
                tracing::debug!(host = %h.name, vm = %vm.name, error = %e, "cannot read the VM lease")
            }
        }
    }
    LeaseView::Unknown
}

async fn event(app: &App, severity: Severity, code: i32, text: String, vm: VmId, host: Option<HostUuid>) {
    let mut e = NewEvent::new(severity, code, text);
    e.vm_id = Some(vm);
    e.host_id = host;
    if let Err(err) = app.db.event_add(&e).await {
        tracing::warn!(error = %err, "cannot record event");
    }
}

/// One pass of the HA loop (called by the monitor after polling hosts).
pub async fn round(cmds: &Commands, tracker: &Arc<Mutex<HaTracker>>) -> Result<(), CommandError> {
    let app = &cmds.app;
    let hosts: HashMap<HostUuid, crate::model::Host> = app
        .db
        .host_list(&ListQuery::default())
        .await?
        .into_iter()
        .map(|h| (h.id, h))
        .collect();
    {
        let mut t = tracker.lock().expect("ha tracker");
        for h in hosts.values().filter(|h| h.status == HostStatus::Up) {
            t.host_up(h.id);
        }
    }
    let mut vms: Vec<Vm> = app
        .db
        .vm_list(&ListQuery::default())
        .await?
        .into_iter()
        .filter(|v| v.ha.enabled)
        .collect();
    vms.sort_by_key(|v| std::cmp::Reverse(v.ha.priority));
    for vm in vms {
        let hv = HaVm::of(&vm);
        let need = tracker
            .lock()
            .expect("ha tracker")
            .need(&hv, |h| hosts.get(&h).map(|h| h.status));
        let now = app.db.now();
        if need == Need::None {
            tracker
                .lock()
                .expect("ha tracker")
                .decide(vm.id, need, LeaseView::Unknown, false, now);
            continue;
        }
        // Ask the host the VM would go to: its view of the lease decides whether it may take it.
        let target = match need {
            Need::InPlace(h) => Some(h),
            _ => crate::scheduling::choose_host(app, vm.cluster_id, vm.id, Purpose::HaRestart)
                .await
                .ok(),
        };
        let lease = lease_view(cmds, &vm, target).await;
        let can_fence = match need {
            Need::Elsewhere { from: Some(h) } => {
                hosts
                    .get(&h)
                    .is_some_and(|h| h.status == HostStatus::NonResponsive)
                    && crate::fence::agent_of(app, h).await?.is_some()
            }
            _ => false,
        };
        let action = tracker
            .lock()
            .expect("ha tracker")
            .decide(vm.id, need, lease, can_fence, now);
        match action {
            Action::Nothing => {}
            Action::Wait(why) => {
                tracing::debug!(vm = %vm.name, ?need, ?lease, why, "HA restart waits")
            }
            Action::Restart { in_place } => {
                tracker.lock().expect("ha tracker").started(vm.id);
                let (cmds, tracker) = (cmds.clone(), tracker.clone());
                tokio::spawn(async move {
                    let app = cmds.app.clone();
                    tracing::info!(vm = %vm.name, ?in_place, "restarting a highly available VM");
                    let r = cmds.ha_restart(vm.id, in_place).await;
                    let outcome = match &r {
                        Ok(v) => {
                            let host = v.runtime.run_on_host;
                            let name = match host {
                                Some(h) => app.host(h).await.map(|h| h.name).unwrap_or_default(),
                                None => String::new(),
                            };
                            event(
                                &app,
                                Severity::Normal,
                                9604,
                                format!("Highly available VM {} restarted on host {name}", vm.name),
                                vm.id,
                                host,
                            )
                            .await;
                            Outcome::Restarted
                        }
                        Err(e) => {
                            tracing::warn!(vm = %vm.name, error = %e, "HA restart failed; will retry");
                            event(
                                &app,
                                Severity::Warning,
                                9603,
                                format!("Failed to restart highly available VM {}: {e}", vm.name),
                                vm.id,
                                None,
                            )
                            .await;
                            Outcome::Failed
                        }
                    };
                    tracker
                        .lock()
                        .expect("ha tracker")
                        .finished(vm.id, outcome, app.db.now());
                });
            }
            Action::Fence(h) => {
                {
                    let mut t = tracker.lock().expect("ha tracker");
                    t.fence_attempted(h, now);
                    t.started(vm.id);
                }
                let (cmds, tracker) = (cmds.clone(), tracker.clone());
                tokio::spawn(async move {
                    let r = cmds.fence_host(h).await;
                    if let Err(e) = &r {
                        tracing::error!(host = %h, error = %e, "fencing failed");
                    }
                    // Fencing frees nothing by itself: the lease still has to expire.
                    let mut t = tracker.lock().expect("ha tracker");
                    t.in_flight.remove(&vm.id);
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{Clock, ManualClock};

    fn vm(status: VmStatus, detail: Option<&str>, host: Option<HostUuid>) -> HaVm {
        HaVm {
            id: VmId::from_uuid(uuid::Uuid::from_u128(1)),
            status,
            detail: detail.map(str::to_string),
            host,
        }
    }

    fn h(n: u128) -> HostUuid {
        HostUuid::from_uuid(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn needs_follow_status_reason_and_host() {
        let mut t = HaTracker::default();
        let (a, b) = (h(10), h(11));
        let st = |x: HostUuid| {
            Some(if x == a {
                HostStatus::Up
            } else {
                HostStatus::NonResponsive
            })
        };
        // Running: nothing, and the host is remembered.
        assert_eq!(t.need(&vm(VmStatus::Up, None, Some(a)), st), Need::None);
        // Crash on a live host: in place.
        let died = r#"{"kind":"died","detail":"signal 9"}"#;
        assert_eq!(
            t.need(&vm(VmStatus::Down, Some(died), None), st),
            Need::InPlace(a)
        );
        // Stopped by the admin or the guest: nothing.
        assert_eq!(t.need(&vm(VmStatus::Down, None, None), st), Need::None);
        let shut = r#"{"kind":"guest_shutdown","detail":""}"#;
        assert_eq!(t.need(&vm(VmStatus::Down, Some(shut), None), st), Need::None);
        // Host unreachable: elsewhere; an unknown VM on an up host is being settled: nothing.
        assert_eq!(
            t.need(&vm(VmStatus::Unknown, None, Some(b)), st),
            Need::Elsewhere { from: Some(b) }
        );
        assert_eq!(t.need(&vm(VmStatus::Unknown, None, Some(a)), st), Need::None);
        // Self-fenced, or a pending restart: elsewhere.
        let fenced = r#"{"kind":"fenced","detail":""}"#;
        assert_eq!(
            t.need(&vm(VmStatus::Down, Some(fenced), None), st),
            Need::Elsewhere { from: Some(a) }
        );
        assert!(matches!(
            t.need(&vm(VmStatus::Down, Some(RESTART_PENDING), None), st),
            Need::Elsewhere { .. }
        ));
        // Killed after a storage pause outlived its lease's safety: elsewhere too.
        let paused =
            r#"{"kind":"paused_too_long","detail":"down because paused on a storage error (EIO) for 8.2s"}"#;
        assert_eq!(
            t.need(&vm(VmStatus::Down, Some(paused), None), st),
            Need::Elsewhere { from: Some(a) }
        );
        // A crash whose last host is now down goes elsewhere.
        t.need(&vm(VmStatus::Up, None, Some(b)), st);
        assert_eq!(
            t.need(&vm(VmStatus::Down, Some(died), None), st),
            Need::Elsewhere { from: Some(b) }
        );
    }

    #[test]
    fn never_restarts_while_the_lease_may_be_held() {
        let mut t = HaTracker::default();
        let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
        let id = vm(VmStatus::Unknown, None, None).id;
        let need = Need::Elsewhere { from: Some(h(3)) };
        for lease in [LeaseView::Unknown, LeaseView::MayBeHeld] {
            for _ in 0..100 {
                clock.advance(Duration::from_secs(7));
                let a = t.decide(id, need, lease, false, clock.now());
                assert!(matches!(a, Action::Wait(_)), "{a:?}");
            }
        }
        assert_eq!(
            t.decide(id, need, LeaseView::OwnerDead, false, clock.now()),
            Action::Restart { in_place: None }
        );
        assert_eq!(
            t.decide(id, Need::InPlace(h(4)), LeaseView::Free, false, clock.now()),
            Action::Restart { in_place: Some(h(4)) }
        );
    }

    #[test]
    fn failures_back_off_exponentially_on_the_injected_clock() {
        let mut t = HaTracker::default();
        let clock = ManualClock::new(Timestamp::from_millis(5_000));
        let id = vm(VmStatus::Unknown, None, None).id;
        let need = Need::Elsewhere { from: None };
        let mut gaps = Vec::new();
        for _ in 0..8 {
            assert!(matches!(
                t.decide(id, need, LeaseView::Free, false, clock.now()),
                Action::Restart { .. }
            ));
            t.started(id);
            // While it runs, no second attempt.
            assert!(matches!(
                t.decide(id, need, LeaseView::Free, false, clock.now()),
                Action::Wait(_)
            ));
            t.finished(id, Outcome::Failed, clock.now());
            let failed_at = clock.now();
            loop {
                clock.advance(Duration::from_millis(100));
                if matches!(
                    t.decide(id, need, LeaseView::Free, false, clock.now()),
                    Action::Restart { .. }
                ) {
                    break;
                }
            }
            gaps.push(clock.now().as_millis() - failed_at.as_millis());
        }
        assert_eq!(gaps, vec![1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        t.started(id);
        t.finished(id, Outcome::Restarted, clock.now());
        assert!(matches!(
            t.decide(id, need, LeaseView::Free, false, clock.now()),
            Action::Restart { .. }
        ));
        // Back up: the retry state is forgotten.
        assert_eq!(
            t.decide(id, Need::None, LeaseView::Free, false, clock.now()),
            Action::Nothing
        );
    }

    #[test]
    fn an_unreachable_host_with_an_agent_is_fenced_once_per_period() {
        let mut t = HaTracker::default();
        let clock = ManualClock::new(Timestamp::from_millis(0));
        let id = vm(VmStatus::Unknown, None, None).id;
        let need = Need::Elsewhere { from: Some(h(7)) };
        assert_eq!(
            t.decide(id, need, LeaseView::MayBeHeld, true, clock.now()),
            Action::Fence(h(7))
        );
        t.fence_attempted(h(7), clock.now());
        clock.advance(Duration::from_secs(60));
        assert!(matches!(
            t.decide(id, need, LeaseView::MayBeHeld, true, clock.now()),
            Action::Wait(_)
        ));
        // Once the fenced host's lease is dead, the VM restarts.
        assert_eq!(
            t.decide(id, need, LeaseView::OwnerDead, true, clock.now()),
            Action::Restart { in_place: None }
        );
        clock.advance(Duration::from_secs(300));
        assert_eq!(
            t.decide(id, need, LeaseView::MayBeHeld, true, clock.now()),
            Action::Fence(h(7))
        );
        t.host_up(h(7));
        assert_eq!(
            t.decide(id, need, LeaseView::MayBeHeld, true, clock.now()),
            Action::Fence(h(7))
        );
        // Without an agent there is nothing to do but wait.
        assert!(matches!(
            t.decide(id, need, LeaseView::MayBeHeld, false, clock.now()),
            Action::Wait(_)
        ));
    }

    #[test]
    fn lease_views_from_lease_info() {
        let v = |j: serde_json::Value| LeaseView::from_info(&j);
        assert_eq!(v(json!({"owner": null, "ownerStatus": "free"})), LeaseView::Free);
        assert_eq!(
            v(json!({"owner": 2, "ownerStatus": "dead"})),
            LeaseView::OwnerDead
        );
        for s in ["live", "fail", "unknown"] {
            assert_eq!(v(json!({"owner": 2, "ownerStatus": s})), LeaseView::MayBeHeld);
        }
        assert_eq!(v(json!({"owner": 2, "ownerStatus": null})), LeaseView::MayBeHeld);
    }
}
