//! The engine's storage commands, each failed at every step and crashed at every point of its
//! saga (the omicron saga test pattern), against the real engine database (the disk and the
//! VM/template sweeps on PostgreSQL, the others on SQLite) and a real
//! `oxvirt node` as SPM on a real file domain: adding and removing a disk, a VM cloned from a
//! template, a VM cloned from a VM, and a template; taking, removing, restoring, previewing and
//! cloning a cold snapshot, and committing or undoing the preview; deactivating, detaching and removing a second storage
//! domain (there the engine's record and the pool metadata on storage must agree), and moving
//! a disk to it.
//!
//! After every run, once the saga has ended (unwound before its point of no return, finished
//! at or past it, resumed by the engine's own executor after a crash): no saga is left
//! running, stuck or blocked; nothing is locked; every disk the engine knows has its image on
//! the domain with exactly the volumes, parents and roles the engine records, every image on
//! the domain is a disk the engine knows, and the domain checker finds nothing (metadata,
//! chains, legality, leftovers, `qemu-img check`); the command happened entirely or not at
//! all. Then the run is undone with the ordinary commands and the world must be back to its
//! baseline, so each run starts from the same state.

use crate::common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{attach_data_domain, cow_disk, start_cluster, start_cluster_on_postgres, Cluster};
use oxvirt_engine::commands::{AddSnapshot, AddVm, Answer, CommandError, Commands};
use oxvirt_engine::db::{Db, ListQuery, SagaState};
use oxvirt_engine::model::{
    ClusterId, DiskId, DiskStatus, SagaId, SdStatus, SdUuid, SnapshotStatus, SnapshotType, TemplateId,
    TemplateStatus, VmId, VmOs, VmStatus, BLANK_TEMPLATE_ID,
};
use oxvirt_engine::saga::testing::{
    crash_at_each_point, fail_at_each_step, Fault, FaultAt, FaultInjector, FaultPoint, Faults,
};
use oxvirt_engine::saga::{ForwardRetry, SagaExecutor, SagaOutcome};

const MIB: u64 = 1 << 20;

struct World {
    c: Cluster,
    sd: SdUuid,
    cluster: ClusterId,
    /// A down VM with one disk: snapshots and templates are taken of it.
    base: VmId,
    tmpl: TemplateId,
}

/// What must be the same before a run and after it is undone.
#[derive(Debug, Clone, PartialEq)]
struct Fingerprint {
    disks: BTreeMap<DiskId, Vec<String>>,
    vms: BTreeSet<VmId>,
    templates: BTreeSet<TemplateId>,
    snapshots: BTreeSet<String>,
    images: BTreeSet<String>,
}

impl World {
    async fn new() -> World {
        World::with(start_cluster(1).await).await
    }

    /// The engine on PostgreSQL (the other sweeps run on SQLite).
    async fn on_postgres() -> World {
        World::with(start_cluster_on_postgres(1).await).await
    }

    async fn with(c: Cluster) -> World {
        let (_, sd) = attach_data_domain(&c, "host1").await;
        let e = c.engine.clone();
        let cluster = e
            .app()
            .db
            .cluster_get_by_name("Default")
            .await
            .unwrap()
            .unwrap()
            .id;
        let base = e
            .cmds
            .add_vm(vm_req("base", cluster, BLANK_TEMPLATE_ID), None)
            .await
            .unwrap();
        e.cmds
            .add_disk(
                cow_disk("base_disk", sd.id, 16 * MIB, Some((base.id, false))),
                None,
            )
            .await
            .unwrap();
        let tmpl = e.cmds.add_template(base.id, "tmpl", "", None).await.unwrap();
        World {
            c,
            sd: sd.id,
            cluster,
            base: base.id,
            tmpl: tmpl.id,
        }
    }

    fn cmds(&self) -> &Commands {
        &self.c.engine.cmds
    }

    fn db(&self) -> &Db {
        &self.c.engine.app().db
    }

    /// The engine's commands on an executor that injects `faults`.
    fn faulty(&self, faults: Arc<dyn FaultInjector>) -> Commands {
        let app = self.c.engine.app().clone();
        let retry = ForwardRetry {
            attempts: 3,
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        };
        let sagas = SagaExecutor::with_faults(app.db.clone(), app.clone(), faults, retry);
        Commands::register_all(&sagas).unwrap();
        Commands {
            app,
            sagas,
            answer: Answer::WhenDone,
        }
    }

    async fn saga_ids(&self) -> HashSet<SagaId> {
        self.db()
            .saga_list(&[])
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect()
    }

    /// How the one saga named `name` started since `before` ended, from the saga log.
    async fn outcome_since(&self, before: &HashSet<SagaId>, name: &str) -> SagaOutcome {
        let new: Vec<_> = self
            .db()
            .saga_list(&[])
            .await
            .unwrap()
            .into_iter()
            .filter(|s| !before.contains(&s.id) && s.name == name)
            .collect();
        assert_eq!(new.len(), 1, "one {name} saga ran: {new:?}");
        let s = &new[0];
        let error = s.error.clone().unwrap_or_default();
        match s.state {
            SagaState::Done => SagaOutcome::Done {
                outputs: Default::default(),
            },
            SagaState::Unwound => SagaOutcome::Unwound { error },
            SagaState::Stuck => SagaOutcome::Stuck {
                error,
                undo_error: s.undo_error.clone().unwrap_or_default(),
            },
            SagaState::Blocked => SagaOutcome::Blocked { error },
            SagaState::Running | SagaState::Unwinding => SagaOutcome::Interrupted,
        }
    }

    /// "The engine restarts": its own executor resumes the interrupted saga to its end.
    async fn resume(&self) -> SagaOutcome {
        let handles = self.cmds().sagas.resume_all().await.unwrap();
        assert_eq!(handles.len(), 1, "one interrupted saga to resume");
        handles.into_iter().next().unwrap().wait().await.unwrap()
    }

    async fn fingerprint(&self) -> Fingerprint {
        let db = self.db();
        let mut disks = BTreeMap::new();
        for d in db.disk_list(&ListQuery::new()).await.unwrap() {
            let vols = db.volume_chain(d.id).await.unwrap();
            disks.insert(
                d.id,
                vols.iter().map(|v| format!("{} {:?}", v.id, v.voltype)).collect(),
            );
        }
        let vms: BTreeSet<_> = db
            .vm_list(&ListQuery::new())
            .await
            .unwrap()
            .iter()
            .map(|v| v.id)
            .collect();
        let mut snapshots = BTreeSet::new();
        for vm in &vms {
            for s in db.snapshots_of_vm(*vm).await.unwrap() {
                snapshots.insert(format!("{} {:?}", s.id, s.snapshot_type));
            }
        }
        Fingerprint {
            disks,
            vms,
            templates: db
                .template_list(&ListQuery::new())
                .await
                .unwrap()
                .iter()
                .map(|t| t.id)
                .collect(),
            snapshots,
            images: self
                .domain()
                .dump_chains()
                .unwrap()
                .iter()
                .map(|c| c.image.to_string())
                .collect(),
        }
    }

    fn domain(&self) -> oxvirt_storage::FileStorageDomain {
        oxvirt_storage::FileStorageDomain::find(&self.c.storage, self.sd).unwrap()
    }

    /// The engine's records and the domain agree, and nothing waits for anyone.
    async fn assert_consistent(&self, what: &str) {
        let db = self.db();
        let open = db
            .saga_list(&[
                SagaState::Running,
                SagaState::Unwinding,
                SagaState::Stuck,
                SagaState::Blocked,
            ])
            .await
            .unwrap();
        assert!(open.is_empty(), "{what}: sagas left open: {open:?}");
        for v in db.vm_list(&ListQuery::new()).await.unwrap() {
            assert_eq!(v.runtime.status, VmStatus::Down, "{what}: VM {}", v.name);
            for s in db.snapshots_of_vm(v.id).await.unwrap() {
                assert!(
                    matches!(s.status, SnapshotStatus::Ok | SnapshotStatus::InPreview),
                    "{what}: snapshot {} is {}",
                    s.description,
                    s.status
                );
            }
        }
        for t in db.template_list(&ListQuery::new()).await.unwrap() {
            assert_eq!(t.status, TemplateStatus::Ok, "{what}: template {}", t.name);
        }
        let report = self.domain().check(false).unwrap();
        assert!(
            report.is_clean(),
            "{what}: the domain checker: {:?}",
            report.problems
        );
        let mut chains: BTreeMap<_, _> = self
            .domain()
            .dump_chains()
            .unwrap()
            .into_iter()
            .map(|c| (c.image.to_string(), c.chain))
            .collect();
        for d in db.disk_list(&ListQuery::new()).await.unwrap() {
            assert_eq!(
                (d.status, d.locked_by),
                (DiskStatus::Ok, None),
                "{what}: disk {}",
                d.name
            );
            if d.storage_domain_id != self.sd {
                continue; // on a second domain: its scenario checks it
            }
            let chain = chains
                .remove(&d.id.to_string())
                .unwrap_or_else(|| panic!("{what}: disk {} has no image on the domain", d.name))
                .unwrap_or_else(|e| panic!("{what}: disk {}'s chain: {e}", d.name));
            let on_disk: BTreeMap<_, _> = chain
                .iter()
                .filter(|v| v.meta.image.to_string() == d.id.to_string())
                .map(|v| {
                    let role = v.meta.role.as_str().to_ascii_lowercase();
                    (v.id.to_string(), (v.meta.parent().map(|p| p.to_string()), role))
                })
                .collect();
            let recorded: BTreeMap<_, _> = db
                .volume_chain(d.id)
                .await
                .unwrap()
                .iter()
                .map(|v| {
                    let role = format!("{:?}", v.voltype).to_ascii_lowercase();
                    (v.id.to_string(), (v.parent_id.map(|p| p.to_string()), role))
                })
                .collect();
            assert_eq!(
                on_disk, recorded,
                "{what}: disk {}'s volumes: storage vs engine",
                d.name
            );
        }
        assert!(
            chains.is_empty(),
            "{what}: images the engine does not know: {:?}",
            chains.keys()
        );
    }
}

fn vm_req(name: &str, cluster: ClusterId, template: TemplateId) -> AddVm {
    AddVm {
        name: name.into(),
        description: String::new(),
        cluster,
        template,
        memory_bytes: Some(128 * MIB),
        cpu: None,
        os: VmOs::default(),
        ha: None,
        resume_behavior: None,
    }
}

/// One command under test: how to set up for it, run it, see whether it happened, and undo it
/// with the ordinary commands.
trait Scenario {
    /// The saga the command runs.
    const SAGA: &'static str;
    /// What `prepare` made for the run.
    type Ctx;
    async fn prepare(&self, w: &World) -> Self::Ctx;
    /// Runs the command on `cmds` (its result is ignored: the saga log tells).
    async fn run(&self, w: &World, cmds: &Commands, c: &Self::Ctx);
    /// Asserts the command took effect entirely (`done`) or not at all.
    async fn check(&self, w: &World, c: &Self::Ctx, done: bool, what: &str);
    /// Back to the baseline.
    async fn reset(&self, w: &World, c: Self::Ctx);
    /// Whether `reset` also brings back the volumes of every chain (a committed preview keeps
    /// the state it replaced in the chain, under the preview's leaf, until a merge).
    fn keeps_chains(&self) -> bool {
        true
    }
}

/// Fails `S`'s saga at each step, then crashes it at each point, checking after each run.
async fn sweep<S: Scenario>(w: &World, s: &S) {
    let steps = w.cmds().sagas.step_count(S::SAGA).unwrap();
    let no_return = w.cmds().sagas.point_of_no_return(S::SAGA);
    let baseline = w.fingerprint().await;
    let cur: RefCell<Option<S::Ctx>> = RefCell::new(None);
    let cur = &cur;
    let baseline = &baseline;
    let verify = move |what: String, done: bool| async move {
        let ctx = cur.borrow_mut().take().unwrap();
        w.assert_consistent(&what).await;
        s.check(w, &ctx, done, &what).await;
        s.reset(w, ctx).await;
        let mut now = w.fingerprint().await;
        if !s.keeps_chains() {
            // The same disks, whatever their chains.
            let chains = |k: &DiskId| baseline.disks.get(k).cloned().unwrap_or_default();
            now.disks = now.disks.keys().map(|k| (*k, chains(k))).collect();
        }
        assert_eq!(&now, baseline, "{what}: not back to the baseline");
    };
    fail_at_each_step(
        steps,
        no_return,
        move |fault| async move {
            let ctx = s.prepare(w).await;
            let before = w.saga_ids().await;
            s.run(w, &w.faulty(fault), &ctx).await;
            *cur.borrow_mut() = Some(ctx);
            w.outcome_since(&before, S::SAGA).await
        },
        move |i, point, out| {
            verify(
                format!("{} failing at step {i} {point:?}", S::SAGA),
                out.is_done(),
            )
        },
    )
    .await;
    crash_at_each_point(
        steps,
        no_return,
        move |faults| async move {
            let ctx = s.prepare(w).await;
            let before = w.saga_ids().await;
            s.run(w, &w.faulty(Arc::new(Faults(faults))), &ctx).await;
            assert_eq!(w.outcome_since(&before, S::SAGA).await, SagaOutcome::Interrupted);
            *cur.borrow_mut() = Some(ctx);
            w.resume().await
        },
        move |i, point, out| {
            verify(
                format!("{} crashing at step {i} {point:?}", S::SAGA),
                out.is_done(),
            )
        },
    )
    .await;
}

async fn vm_named(w: &World, name: &str) -> Option<VmId> {
    w.db().vm_get_by_name(name).await.unwrap().map(|v| v.id)
}

async fn disk_named(w: &World, name: &str) -> Option<DiskId> {
    w.db()
        .disk_list(&ListQuery::new())
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .map(|d| d.id)
}

struct AddDiskRun;
impl Scenario for AddDiskRun {
    const SAGA: &'static str = "add_disk";
    type Ctx = ();
    async fn prepare(&self, _: &World) {}
    async fn run(&self, w: &World, cmds: &Commands, _: &()) {
        let _ = cmds
            .add_disk(cow_disk("swept", w.sd, 16 * MIB, Some((w.base, false))), None)
            .await;
    }
    async fn check(&self, w: &World, _: &(), done: bool, what: &str) {
        let d = disk_named(w, "swept").await;
        assert_eq!(d.is_some(), done, "{what}: the disk");
        let attached = w.db().attachments_of_vm(w.base).await.unwrap().len();
        assert_eq!(attached, 1 + usize::from(done), "{what}: the base VM's disks");
    }
    async fn reset(&self, w: &World, _: ()) {
        if let Some(d) = disk_named(w, "swept").await {
            w.cmds().remove_disk(d, None).await.unwrap();
        }
    }
}

struct RemoveDiskRun;
impl Scenario for RemoveDiskRun {
    const SAGA: &'static str = "remove_disk";
    type Ctx = DiskId;
    async fn prepare(&self, w: &World) -> DiskId {
        w.cmds()
            .add_disk(cow_disk("victim", w.sd, 16 * MIB, None), None)
            .await
            .unwrap()
            .id
    }
    async fn run(&self, _: &World, cmds: &Commands, d: &DiskId) {
        let _ = cmds.remove_disk(*d, None).await;
    }
    async fn check(&self, w: &World, d: &DiskId, done: bool, what: &str) {
        assert_eq!(
            w.db().disk_get(*d).await.unwrap().is_none(),
            done,
            "{what}: the disk"
        );
    }
    async fn reset(&self, w: &World, d: DiskId) {
        if w.db().disk_get(d).await.unwrap().is_some() {
            w.cmds().remove_disk(d, None).await.unwrap();
        }
    }
}

/// Copies the base VM's disk within its domain.
struct CopyDiskRun;
impl Scenario for CopyDiskRun {
    const SAGA: &'static str = "copy_disk";
    type Ctx = DiskId;
    async fn prepare(&self, w: &World) -> DiskId {
        w.db().attachments_of_vm(w.base).await.unwrap()[0].disk_id
    }
    async fn run(&self, w: &World, cmds: &Commands, d: &DiskId) {
        let _ = cmds.copy_disk(*d, w.sd, Some("copied".into()), None).await;
    }
    async fn check(&self, w: &World, d: &DiskId, done: bool, what: &str) {
        let copy = disk_named(w, "copied").await;
        assert_eq!(copy.is_some(), done, "{what}: the copy");
        assert_eq!(
            w.db().disk_get(*d).await.unwrap().unwrap().status,
            DiskStatus::Ok,
            "{what}: the source disk"
        );
        let images = w.domain().images().unwrap();
        if let Some(c) = copy {
            let chain = w.db().volume_chain(c).await.unwrap();
            assert_eq!(chain.len(), 1, "{what}: the copy's volumes");
            let image = c.to_string().parse().unwrap();
            assert!(images.contains(&image), "{what}: the copy's image");
            let on_storage = w.domain().chain(image).unwrap();
            assert_eq!(
                on_storage.ids(),
                vec![chain[0].id],
                "{what}: the copy's chain on storage"
            );
        }
    }
    async fn reset(&self, w: &World, _: DiskId) {
        if let Some(c) = disk_named(w, "copied").await {
            w.cmds().remove_disk(c, None).await.unwrap();
        }
    }
}

/// Extends a disk of its own (a disk does not shrink back: each run gets a new one).
struct ExtendDiskRun;
impl Scenario for ExtendDiskRun {
    const SAGA: &'static str = "extend_disk";
    type Ctx = DiskId;
    async fn prepare(&self, w: &World) -> DiskId {
        w.cmds()
            .add_disk(cow_disk("grower", w.sd, 16 * MIB, None), None)
            .await
            .unwrap()
            .id
    }
    async fn run(&self, _: &World, cmds: &Commands, d: &DiskId) {
        let _ = cmds.extend_disk(*d, 48 * MIB, None).await;
    }
    async fn check(&self, w: &World, d: &DiskId, done: bool, what: &str) {
        let disk = w.db().disk_get(*d).await.unwrap().unwrap();
        assert_eq!(disk.status, DiskStatus::Ok, "{what}: the disk");
        let want = if done { 48 * MIB } else { 16 * MIB };
        assert_eq!(disk.provisioned_size, want, "{what}: the recorded size");
        let leaf = w.db().volume_chain(*d).await.unwrap().pop().unwrap();
        let info = w
            .domain()
            .volume_info(d.to_string().parse().unwrap(), leaf.id)
            .unwrap();
        if done {
            assert_eq!(info.meta.capacity, 48 * MIB, "{what}: the volume's capacity");
        }
    }
    async fn reset(&self, w: &World, d: DiskId) {
        w.cmds().remove_disk(d, None).await.unwrap();
    }
}

struct AddVmFromTemplate;
impl Scenario for AddVmFromTemplate {
    const SAGA: &'static str = "add_vm";
    type Ctx = ();
    async fn prepare(&self, _: &World) {}
    async fn run(&self, w: &World, cmds: &Commands, _: &()) {
        let _ = cmds.add_vm(vm_req("clone", w.cluster, w.tmpl), None).await;
    }
    async fn check(&self, w: &World, _: &(), done: bool, what: &str) {
        let vm = vm_named(w, "clone").await;
        assert_eq!(vm.is_some(), done, "{what}: the VM");
        if let Some(vm) = vm {
            let atts = w.db().attachments_of_vm(vm).await.unwrap();
            assert_eq!(atts.len(), 1, "{what}: the clone's disk");
            let tdisk = w.db().template_disks(w.tmpl).await.unwrap()[0].id;
            let tvol = w.db().volume_chain(tdisk).await.unwrap()[0].id;
            let chain = w.db().volume_chain(atts[0].disk_id).await.unwrap();
            assert_eq!(
                chain[0].parent_id,
                Some(tvol),
                "{what}: a thin clone of the template"
            );
        }
    }
    async fn reset(&self, w: &World, _: ()) {
        if let Some(vm) = vm_named(w, "clone").await {
            w.cmds().remove_vm(vm, false, None).await.unwrap();
        }
    }
}

struct RemoveVmRun;
impl Scenario for RemoveVmRun {
    const SAGA: &'static str = "remove_vm";
    type Ctx = VmId;
    async fn prepare(&self, w: &World) -> VmId {
        w.cmds()
            .add_vm(vm_req("doomed", w.cluster, w.tmpl), None)
            .await
            .unwrap()
            .id
    }
    async fn run(&self, _: &World, cmds: &Commands, vm: &VmId) {
        let _ = cmds.remove_vm(*vm, false, None).await;
    }
    async fn check(&self, w: &World, vm: &VmId, done: bool, what: &str) {
        assert_eq!(
            w.db().vm_get(*vm).await.unwrap().is_none(),
            done,
            "{what}: the VM"
        );
    }
    async fn reset(&self, w: &World, vm: VmId) {
        if w.db().vm_get(vm).await.unwrap().is_some() {
            w.cmds().remove_vm(vm, false, None).await.unwrap();
        }
    }
}

struct CloneVmRun;
impl Scenario for CloneVmRun {
    const SAGA: &'static str = "clone_vm";
    type Ctx = ();
    async fn prepare(&self, _: &World) {}
    async fn run(&self, w: &World, cmds: &Commands, _: &()) {
        let _ = cmds.clone_vm(w.base, "swept_clone", None).await;
    }
    async fn check(&self, w: &World, _: &(), done: bool, what: &str) {
        let clone = vm_named(w, "swept_clone").await;
        assert_eq!(clone.is_some(), done, "{what}: the clone");
        let base = w.db().vm_get(w.base).await.unwrap().unwrap();
        assert_eq!(
            base.runtime.status,
            VmStatus::Down,
            "{what}: the source is unlocked"
        );
        if let Some(c) = clone {
            let atts = w.db().attachments_of_vm(c).await.unwrap();
            let base_disks: Vec<DiskId> = w
                .db()
                .attachments_of_vm(w.base)
                .await
                .unwrap()
                .iter()
                .map(|a| a.disk_id)
                .collect();
            assert_eq!(atts.len(), base_disks.len(), "{what}: the clone's disks");
            assert!(
                atts.iter().all(|a| !base_disks.contains(&a.disk_id)),
                "{what}: copies, not the source's disks"
            );
            assert_eq!(
                w.db().vm_get(c).await.unwrap().unwrap().runtime.status,
                VmStatus::Down,
                "{what}: the clone is unlocked"
            );
        }
    }
    async fn reset(&self, w: &World, _: ()) {
        if let Some(c) = vm_named(w, "swept_clone").await {
            w.cmds().remove_vm(c, false, None).await.unwrap();
        }
    }
}

async fn regular_snapshot(w: &World, description: &str) -> Option<oxvirt_engine::model::SnapshotId> {
    w.db()
        .snapshots_of_vm(w.base)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.snapshot_type == SnapshotType::Regular && s.description == description)
        .map(|s| s.id)
}

struct AddColdSnapshot;
impl Scenario for AddColdSnapshot {
    const SAGA: &'static str = "add_snapshot";
    type Ctx = ();
    async fn prepare(&self, _: &World) {}
    async fn run(&self, w: &World, cmds: &Commands, _: &()) {
        let req = AddSnapshot {
            description: "swept".into(),
            persist_memory: false,
            disks: None,
        };
        let _ = cmds.add_snapshot(w.base, req, None).await;
    }
    async fn check(&self, w: &World, _: &(), done: bool, what: &str) {
        assert_eq!(
            regular_snapshot(w, "swept").await.is_some(),
            done,
            "{what}: the snapshot"
        );
        let disk = w.db().attachments_of_vm(w.base).await.unwrap()[0].disk_id;
        let depth = w.db().volume_chain(disk).await.unwrap().len();
        assert_eq!(depth, 1 + usize::from(done), "{what}: the base disk's chain");
    }
    async fn reset(&self, w: &World, _: ()) {
        if let Some(s) = regular_snapshot(w, "swept").await {
            w.cmds().remove_snapshot(w.base, s, None).await.unwrap();
        }
    }
}

struct RemoveColdSnapshot;
impl Scenario for RemoveColdSnapshot {
    const SAGA: &'static str = "remove_snapshot";
    type Ctx = oxvirt_engine::model::SnapshotId;
    async fn prepare(&self, w: &World) -> Self::Ctx {
        let req = AddSnapshot {
            description: "merged".into(),
            persist_memory: false,
            disks: None,
        };
        w.cmds().add_snapshot(w.base, req, None).await.unwrap().id
    }
    async fn run(&self, w: &World, cmds: &Commands, s: &Self::Ctx) {
        let _ = cmds.remove_snapshot(w.base, *s, None).await;
    }
    async fn check(&self, w: &World, _: &Self::Ctx, done: bool, what: &str) {
        assert_eq!(
            regular_snapshot(w, "merged").await.is_none(),
            done,
            "{what}: the snapshot"
        );
    }
    async fn reset(&self, w: &World, s: Self::Ctx) {
        if regular_snapshot(w, "merged").await.is_some() {
            w.cmds().remove_snapshot(w.base, s, None).await.unwrap();
        }
    }
}

/// A regular snapshot of the base VM, taken with the ordinary command.
async fn snapshot_of_base(w: &World, description: &str) -> oxvirt_engine::model::SnapshotId {
    let req = AddSnapshot {
        description: description.into(),
        persist_memory: false,
        disks: None,
    };
    w.cmds().add_snapshot(w.base, req, None).await.unwrap().id
}

async fn in_preview(w: &World) -> bool {
    let snaps = w.db().snapshots_of_vm(w.base).await.unwrap();
    snaps.iter().any(|s| s.snapshot_type == SnapshotType::Preview)
}

/// Ends a preview if one is on, then removes the snapshot.
async fn drop_snapshot(w: &World, s: oxvirt_engine::model::SnapshotId) {
    if in_preview(w).await {
        w.cmds().undo_snapshot(w.base, None).await.unwrap();
    }
    w.cmds().remove_snapshot(w.base, s, None).await.unwrap();
}

async fn base_leaf(w: &World) -> oxvirt_engine::model::VolUuid {
    let disk = w.db().attachments_of_vm(w.base).await.unwrap()[0].disk_id;
    w.db().volume_chain(disk).await.unwrap().last().unwrap().id
}

struct PreviewRun;
impl Scenario for PreviewRun {
    const SAGA: &'static str = "preview_snapshot";
    type Ctx = oxvirt_engine::model::SnapshotId;
    async fn prepare(&self, w: &World) -> Self::Ctx {
        snapshot_of_base(w, "previewed").await
    }
    async fn run(&self, w: &World, cmds: &Commands, s: &Self::Ctx) {
        let _ = cmds.preview_snapshot(w.base, *s, false, None).await;
    }
    async fn check(&self, w: &World, _: &Self::Ctx, done: bool, what: &str) {
        assert_eq!(in_preview(w).await, done, "{what}: in preview");
    }
    async fn reset(&self, w: &World, s: Self::Ctx) {
        drop_snapshot(w, s).await
    }
}

/// Ends a preview: committing it (`true`) or undoing it.
struct EndPreviewRun(bool);
impl Scenario for EndPreviewRun {
    const SAGA: &'static str = "end_preview";
    /// The snapshot previewed and the leaf the VM had before.
    type Ctx = (oxvirt_engine::model::SnapshotId, oxvirt_engine::model::VolUuid);
    async fn prepare(&self, w: &World) -> Self::Ctx {
        let s = snapshot_of_base(w, "previewed").await;
        let leaf = base_leaf(w).await;
        w.cmds().preview_snapshot(w.base, s, false, None).await.unwrap();
        (s, leaf)
    }
    async fn run(&self, w: &World, cmds: &Commands, _: &Self::Ctx) {
        let _ = match self.0 {
            true => cmds.commit_snapshot(w.base, None).await,
            false => cmds.undo_snapshot(w.base, None).await,
        };
    }
    async fn check(&self, w: &World, (_, leaf): &Self::Ctx, done: bool, what: &str) {
        assert_eq!(in_preview(w).await, !done, "{what}: in preview");
        if done {
            // Undo: back on the leaf kept aside; commit: on the preview's own leaf.
            assert_eq!(base_leaf(w).await == *leaf, !self.0, "{what}: the leaf");
        }
    }
    async fn reset(&self, w: &World, (s, _): Self::Ctx) {
        drop_snapshot(w, s).await
    }
    fn keeps_chains(&self) -> bool {
        !self.0
    }
}

struct RestoreRun;
impl Scenario for RestoreRun {
    const SAGA: &'static str = "restore_snapshot";
    type Ctx = (oxvirt_engine::model::SnapshotId, oxvirt_engine::model::VolUuid);
    async fn prepare(&self, w: &World) -> Self::Ctx {
        let s = snapshot_of_base(w, "restored").await;
        (s, base_leaf(w).await)
    }
    async fn run(&self, w: &World, cmds: &Commands, (s, _): &Self::Ctx) {
        let _ = cmds.restore_snapshot(w.base, *s, false, None).await;
    }
    async fn check(&self, w: &World, (_, leaf): &Self::Ctx, done: bool, what: &str) {
        assert_eq!(
            base_leaf(w).await != *leaf,
            done,
            "{what}: a new leaf on the snapshot"
        );
    }
    async fn reset(&self, w: &World, (s, _): Self::Ctx) {
        drop_snapshot(w, s).await
    }
}

/// A VM made from a snapshot of the base VM: the snapshot and the base's disks are unlocked
/// afterwards whatever happened, and the clone is whole or absent.
struct CloneSnapshotRun;
impl Scenario for CloneSnapshotRun {
    const SAGA: &'static str = "clone_vm";
    type Ctx = oxvirt_engine::model::SnapshotId;
    async fn prepare(&self, w: &World) -> Self::Ctx {
        snapshot_of_base(w, "cloned").await
    }
    async fn run(&self, w: &World, cmds: &Commands, s: &Self::Ctx) {
        let _ = cmds.clone_vm_from_snapshot(w.base, *s, "snap_clone", None).await;
    }
    async fn check(&self, w: &World, s: &Self::Ctx, done: bool, what: &str) {
        let clone = vm_named(w, "snap_clone").await;
        assert_eq!(clone.is_some(), done, "{what}: the clone");
        let snap = w.db().snapshot_get(*s).await.unwrap().unwrap();
        assert_eq!(
            snap.status,
            SnapshotStatus::Ok,
            "{what}: the snapshot is unlocked"
        );
        for a in w.db().attachments_of_vm(w.base).await.unwrap() {
            let d = w.db().disk_get(a.disk_id).await.unwrap().unwrap();
            assert_eq!(d.status, DiskStatus::Ok, "{what}: the source's disk is unlocked");
        }
        if let Some(c) = clone {
            let atts = w.db().attachments_of_vm(c).await.unwrap();
            assert_eq!(atts.len(), snap.disks.len(), "{what}: the clone's disks");
            for a in atts {
                let chain = w.db().volume_chain(a.disk_id).await.unwrap();
                assert_eq!(chain.len(), 1, "{what}: the clone's chain is collapsed");
            }
        }
    }
    async fn reset(&self, w: &World, s: Self::Ctx) {
        if let Some(c) = vm_named(w, "snap_clone").await {
            w.cmds().remove_vm(c, false, None).await.unwrap();
        }
        drop_snapshot(w, s).await
    }
}

struct AddTemplateRun;
impl Scenario for AddTemplateRun {
    const SAGA: &'static str = "add_template";
    type Ctx = ();
    async fn prepare(&self, _: &World) {}
    async fn run(&self, w: &World, cmds: &Commands, _: &()) {
        let _ = cmds.add_template(w.base, "swept_tmpl", "", None).await;
    }
    async fn check(&self, w: &World, _: &(), done: bool, what: &str) {
        let t = w.db().template_get_by_name("swept_tmpl").await.unwrap();
        assert_eq!(t.is_some(), done, "{what}: the template");
        if let Some(t) = t {
            assert_eq!(
                w.db().template_disks(t.id).await.unwrap().len(),
                1,
                "{what}: its disk"
            );
        }
    }
    async fn reset(&self, w: &World, _: ()) {
        if let Some(t) = w.db().template_get_by_name("swept_tmpl").await.unwrap() {
            w.cmds().remove_template(t.id).await.unwrap();
        }
    }
}

struct RemoveTemplateRun;
impl Scenario for RemoveTemplateRun {
    const SAGA: &'static str = "remove_template";
    type Ctx = TemplateId;
    async fn prepare(&self, w: &World) -> TemplateId {
        w.cmds()
            .add_template(w.base, "doomed_tmpl", "", None)
            .await
            .unwrap()
            .id
    }
    async fn run(&self, _: &World, cmds: &Commands, t: &TemplateId) {
        let _ = cmds.remove_template(*t).await;
    }
    async fn check(&self, w: &World, t: &TemplateId, done: bool, what: &str) {
        assert_eq!(
            w.db().template_get(*t).await.unwrap().is_none(),
            done,
            "{what}: the template"
        );
    }
    async fn reset(&self, w: &World, t: TemplateId) {
        if w.db().template_get(t).await.unwrap().is_some() {
            w.cmds().remove_template(t).await.unwrap();
        }
    }
}

/// A second data domain of the Default data center, on its own directory: deactivated,
/// detached and removed by the scenarios below.
struct Domain2 {
    dir: tempfile::TempDir,
}

impl Domain2 {
    async fn dc(&self, w: &World) -> oxvirt_engine::model::DcId {
        w.db().dc_get_by_name("Default").await.unwrap().unwrap().id
    }

    async fn id(&self, w: &World) -> Option<SdUuid> {
        w.db().sd_get_by_name("data2").await.unwrap().map(|s| s.id)
    }

    /// Added, attached and active (whatever of that it lacks).
    async fn active(&self, w: &World) -> SdUuid {
        let dc = self.dc(w).await;
        let sd = match self.id(w).await {
            Some(sd) => sd,
            None => {
                let host = w.db().host_get_by_name("host1").await.unwrap().unwrap();
                let mut req = common::cluster::data_domain(&self.dir.path().display().to_string(), host.id);
                req.name = "data2".into();
                w.cmds().add_storage_domain(req, None).await.unwrap().id
            }
        };
        if w.db().pool_attachments(sd).await.unwrap().is_empty() {
            w.cmds().attach_storage_domain(dc, sd, None).await.unwrap();
        }
        w.cmds().activate_storage_domain(dc, sd).await.unwrap();
        w.cmds()
            .wait_domain_active(dc, sd, Duration::from_secs(60))
            .await
            .unwrap();
        sd
    }

    /// Its status in the data center as the engine records it and as the pool metadata on
    /// the master domain says (`None`: not in the pool).
    async fn statuses(
        &self,
        w: &World,
        sd: SdUuid,
    ) -> (Option<SdStatus>, Option<oxvirt_storage::pool::DomainStatus>) {
        let dc = self.dc(w).await;
        let row = w
            .db()
            .pool_members(dc)
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.storage_domain_id == sd)
            .map(|m| m.status);
        let md = oxvirt_storage::pool::read_domain_metadata(w.domain().root()).unwrap();
        let pm = oxvirt_storage::pool::PoolMetadata::from_domain(&md).unwrap();
        (row, pm.status(sd))
    }
}

struct DeactivateRun(Domain2);
impl Scenario for DeactivateRun {
    const SAGA: &'static str = "deactivate_storage_domain";
    type Ctx = SdUuid;
    async fn prepare(&self, w: &World) -> SdUuid {
        self.0.active(w).await
    }
    async fn run(&self, w: &World, cmds: &Commands, sd: &SdUuid) {
        let _ = cmds.deactivate_storage_domain(self.0.dc(w).await, *sd).await;
    }
    async fn check(&self, w: &World, sd: &SdUuid, done: bool, what: &str) {
        use oxvirt_storage::pool::DomainStatus as OnStorage;
        let want = if done {
            (Some(SdStatus::Maintenance), Some(OnStorage::Attached))
        } else {
            (Some(SdStatus::Active), Some(OnStorage::Active))
        };
        assert_eq!(self.0.statuses(w, *sd).await, want, "{what}: engine vs storage");
    }
    async fn reset(&self, w: &World, _: SdUuid) {
        self.0.active(w).await;
    }
}

/// The detach of a domain holding a VM ("carried", made in `prepare` with its disk there):
/// done, the VM left the engine with the domain; undone, it is there as before.
struct DetachRun(Domain2);
impl Scenario for DetachRun {
    const SAGA: &'static str = "detach_storage_domain";
    type Ctx = (SdUuid, VmId);
    async fn prepare(&self, w: &World) -> (SdUuid, VmId) {
        let sd = self.0.active(w).await;
        let vm = w
            .cmds()
            .add_vm(vm_req("carried", w.cluster, BLANK_TEMPLATE_ID), None)
            .await
            .unwrap()
            .id;
        w.cmds()
            .add_disk(cow_disk("carried_disk", sd, 16 * MIB, Some((vm, true))), None)
            .await
            .unwrap();
        w.cmds()
            .deactivate_storage_domain(self.0.dc(w).await, sd)
            .await
            .unwrap();
        (sd, vm)
    }
    async fn run(&self, w: &World, cmds: &Commands, c: &(SdUuid, VmId)) {
        let _ = cmds.detach_storage_domain(self.0.dc(w).await, c.0).await;
    }
    async fn check(&self, w: &World, c: &(SdUuid, VmId), done: bool, what: &str) {
        use oxvirt_storage::pool::DomainStatus as OnStorage;
        let (sd, vm) = c;
        let want = if done {
            (None, None)
        } else {
            (Some(SdStatus::Maintenance), Some(OnStorage::Attached))
        };
        assert_eq!(self.0.statuses(w, *sd).await, want, "{what}: engine vs storage");
        assert_eq!(
            w.db().vm_get(*vm).await.unwrap().is_none(),
            done,
            "{what}: the VM on the domain leaves with it, or stays"
        );
        let sd = &sd;
        let root = self.0.dir.path().join(sd.to_string());
        let md = oxvirt_storage::pool::read_domain_metadata(&root).unwrap();
        assert_eq!(md.pools.is_empty(), done, "{what}: the domain's POOL_UUID");
    }
    async fn reset(&self, w: &World, (_, vm): (SdUuid, VmId)) {
        self.0.active(w).await;
        // Undone, the VM is still here: it goes (with its disk) for the baseline. Done, it is
        // storage's alone, an unregistered VM of the domain.
        if w.db().vm_get(vm).await.unwrap().is_some() {
            w.cmds().remove_vm(vm, false, None).await.unwrap();
        }
    }
}

struct RemoveDomainRun(Domain2);
impl Scenario for RemoveDomainRun {
    const SAGA: &'static str = "remove_storage_domain";
    type Ctx = SdUuid;
    async fn prepare(&self, w: &World) -> SdUuid {
        let sd = self.0.active(w).await;
        let dc = self.0.dc(w).await;
        w.cmds().deactivate_storage_domain(dc, sd).await.unwrap();
        w.cmds().detach_storage_domain(dc, sd).await.unwrap();
        sd
    }
    async fn run(&self, _: &World, cmds: &Commands, sd: &SdUuid) {
        let _ = cmds.remove_storage_domain(*sd, None, true).await;
    }
    async fn check(&self, w: &World, sd: &SdUuid, done: bool, what: &str) {
        assert_eq!(
            w.db().sd_get(*sd).await.unwrap().is_none(),
            done,
            "{what}: the domain's row"
        );
        assert_eq!(
            self.0.dir.path().join(sd.to_string()).exists(),
            !done,
            "{what}: the domain's storage"
        );
    }
    async fn reset(&self, _: &World, _: SdUuid) {
        // The next `active` adds it anew (or finds the one left).
    }
}

struct MoveDiskRun(Domain2);
impl Scenario for MoveDiskRun {
    const SAGA: &'static str = "move_disk";
    type Ctx = (DiskId, SdUuid);
    async fn prepare(&self, w: &World) -> (DiskId, SdUuid) {
        let sd2 = self.0.active(w).await;
        let d = w
            .cmds()
            .add_disk(cow_disk("mover", w.sd, 16 * MIB, None), None)
            .await
            .unwrap();
        (d.id, sd2)
    }
    async fn run(&self, _: &World, cmds: &Commands, (disk, sd2): &(DiskId, SdUuid)) {
        let _ = cmds.move_disk(*disk, *sd2, None).await;
    }
    async fn check(&self, w: &World, (disk, sd2): &(DiskId, SdUuid), done: bool, what: &str) {
        let d = w.db().disk_get(*disk).await.unwrap().unwrap();
        let on = if done { *sd2 } else { w.sd };
        assert_eq!(d.storage_domain_id, on, "{what}: the disk's domain");
        for v in w.db().volume_chain(*disk).await.unwrap() {
            assert_eq!(v.storage_domain_id, on, "{what}: volume {}", v.id);
        }
        let second = oxvirt_storage::FileStorageDomain::find(self.0.dir.path(), *sd2).unwrap();
        let image = disk.to_string().parse().unwrap();
        assert_eq!(
            second.image_exists(image),
            done,
            "{what}: the image on the destination"
        );
        assert_eq!(
            w.domain().image_exists(image),
            !done,
            "{what}: the image on the source"
        );
        let report = second.check(false).unwrap();
        assert!(
            report.is_clean(),
            "{what}: the destination: {:?}",
            report.problems
        );
    }
    async fn reset(&self, w: &World, (disk, _): (DiskId, SdUuid)) {
        w.cmds().remove_disk(disk, None).await.unwrap();
    }
}

/// One sweep of a storage domain command on a world of its own (each activation waits 2N for
/// the host ids in the domain's lockspace, so the three run apart, side by side).
async fn sweep_domain_command<S: Scenario>(make: impl FnOnce(Domain2) -> S) {
    let w = World::new().await;
    let d2 = Domain2 {
        dir: tempfile::tempdir().unwrap(),
    };
    sweep(&w, &make(d2)).await;
    w.domain()
        .check(true)
        .map(|r| assert!(r.is_clean(), "{:?}", r.problems))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_deactivation_fails_and_crashes_at_every_step_and_storage_agrees() {
    sweep_domain_command(DeactivateRun).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_detachment_fails_and_crashes_at_every_step_and_storage_agrees() {
    sweep_domain_command(DetachRun).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_move_fails_and_crashes_at_every_step_and_storage_agrees() {
    sweep_domain_command(MoveDiskRun).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_removal_fails_and_crashes_at_every_step_and_storage_agrees() {
    sweep_domain_command(RemoveDomainRun).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_commands_fail_and_crash_at_every_step_and_storage_agrees() {
    let w = World::on_postgres().await;
    sweep(&w, &AddDiskRun).await;
    sweep(&w, &RemoveDiskRun).await;
    sweep(&w, &CopyDiskRun).await;
    sweep(&w, &ExtendDiskRun).await;

    // A removal failing on every attempt past its point of no return is blocked, its disk
    // still locked; retried through its job once the cause is gone, it finishes.
    let d = w
        .cmds()
        .add_disk(cow_disk("stubborn", w.sd, 16 * MIB, None), None)
        .await
        .unwrap()
        .id;
    let fails = (0..3)
        .map(|_| FaultAt::new(1, FaultPoint::BeforeAction, Fault::Fail))
        .collect();
    let err = w
        .faulty(Arc::new(Faults(fails)))
        .remove_disk(d, None)
        .await
        .unwrap_err();
    let CommandError::Blocked { job: Some(job), .. } = err else {
        panic!("not blocked: {err}")
    };
    assert_eq!(
        w.db().disk_get(d).await.unwrap().unwrap().status,
        DiskStatus::Locked
    );
    w.cmds().retry_job(job).await.unwrap();
    assert!(w.db().disk_get(d).await.unwrap().is_none());
    w.assert_consistent("a blocked removal retried").await;
    w.domain()
        .check(true)
        .map(|r| assert!(r.is_clean(), "{:?}", r.problems))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_and_template_commands_fail_and_crash_at_every_step_and_storage_agrees() {
    let w = World::on_postgres().await;
    sweep(&w, &AddVmFromTemplate).await;
    sweep(&w, &RemoveVmRun).await;
    sweep(&w, &CloneVmRun).await;
    sweep(&w, &AddTemplateRun).await;
    sweep(&w, &RemoveTemplateRun).await;
    w.domain()
        .check(true)
        .map(|r| assert!(r.is_clean(), "{:?}", r.problems))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_commands_fail_and_crash_at_every_step_and_storage_agrees() {
    let w = World::new().await;
    sweep(&w, &AddColdSnapshot).await;
    sweep(&w, &RemoveColdSnapshot).await;
    sweep(&w, &RestoreRun).await;
    sweep(&w, &CloneSnapshotRun).await;
    w.domain()
        .check(true)
        .map(|r| assert!(r.is_clean(), "{:?}", r.problems))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_commands_fail_and_crash_at_every_step_and_storage_agrees() {
    let w = World::new().await;
    sweep(&w, &PreviewRun).await;
    sweep(&w, &EndPreviewRun(true)).await;
    sweep(&w, &EndPreviewRun(false)).await;
    w.domain()
        .check(true)
        .map(|r| assert!(r.is_clean(), "{:?}", r.problems))
        .unwrap();
}
