//! The portal's POSTs: login and logout, and the actions that run commands.
//!
//! An action validates its form at once (a bad form is a 400 and changes nothing), then runs
//! its command in the background under a correlation id `portal-<n>`, so that the jobs of its
//! sagas can be found and their progress shown; the request answers right away. The
//! [`ActionLog`] remembers the outcome of the last [`LOG_LEN`] actions for the toasts of the
//! browser that started them.
//!
//! Destructive actions ([`Verb::destructive`]) need `confirm=1`: the script asks in a dialog
//! and adds it; without script the server answers with a confirmation page whose button posts
//! the same form again with it.
//!
//! Action states: `running` → `done` | `failed`, set once by the task running the command.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::StatusCode;
use oxvirt_rpc::{HttpRequest, Reply};
use serde::Serialize;
use serde_json::json;

use crate::commands::{AddDisk, AddStorageDomain, AddVm, AddVmDisk, MigrateOptions, VmStartOptions};
use crate::daemon::Engine;
use crate::model::*;

use super::html::{layout, Html};
use super::{
    auth, html_reply, json_reply, pages, redirect, redirect_with, safe_back, Ctx, Form, PortalError,
};

/// How many actions the log keeps.
pub const LOG_LEN: usize = 200;

/// What happened to an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionState {
    Running,
    Done,
    Failed,
}

/// One action started from the portal.
#[derive(Debug, Clone, Serialize)]
pub struct ActionRecord {
    pub id: u64,
    #[serde(skip)]
    pub user: UserId,
    pub label: String,
    pub state: ActionState,
    pub message: String,
    pub correlation_id: String,
    /// Where the result can be seen (a new VM's page…), once done.
    pub link: Option<String>,
    pub started_ms: i64,
}

/// The bounded, in-memory log of recent actions.
#[derive(Debug, Default)]
pub struct ActionLog {
    next: AtomicU64,
    recent: Mutex<VecDeque<ActionRecord>>,
}

impl ActionLog {
    /// Records a new running action and returns it.
    pub fn begin(&self, user: UserId, label: &str, correlation_id: &str, now_ms: i64) -> ActionRecord {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let r = ActionRecord {
            id,
            user,
            label: label.to_string(),
            state: ActionState::Running,
            message: String::new(),
            correlation_id: correlation_id.to_string(),
            link: None,
            started_ms: now_ms,
        };
        let mut q = self.recent.lock().expect("action log");
        if q.len() == LOG_LEN {
            q.pop_front();
        }
        q.push_back(r.clone());
        r
    }

    /// Ends an action (once; a second end is ignored).
    pub fn end(&self, id: u64, result: Result<Option<String>, String>) {
        let mut q = self.recent.lock().expect("action log");
        if let Some(r) = q
            .iter_mut()
            .find(|r| r.id == id && r.state == ActionState::Running)
        {
            match result {
                Ok(link) => {
                    r.state = ActionState::Done;
                    r.link = link;
                }
                Err(e) => {
                    r.state = ActionState::Failed;
                    r.message = e;
                }
            }
        }
    }

    /// The user's actions with an id above `after`.
    pub fn of_user(&self, user: UserId, after: u64) -> Vec<ActionRecord> {
        self.recent
            .lock()
            .expect("action log")
            .iter()
            .filter(|r| r.user == user && r.id > after)
            .cloned()
            .collect()
    }

    /// A fresh correlation id for the jobs of one action.
    pub fn correlation_id() -> String {
        format!("portal-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
    }

    pub fn get(&self, id: u64) -> Option<ActionRecord> {
        self.recent
            .lock()
            .expect("action log")
            .iter()
            .find(|r| r.id == id)
            .cloned()
    }

    /// The user's running actions and those that ended recently, for the page's first poll.
    pub fn running_of_user(&self, user: UserId) -> Vec<ActionRecord> {
        self.recent
            .lock()
            .expect("action log")
            .iter()
            .filter(|r| r.user == user && r.state == ActionState::Running)
            .cloned()
            .collect()
    }
}

/// `POST /portal/login`.
pub async fn login(engine: &Arc<Engine>, req: &HttpRequest) -> Result<Reply, PortalError> {
    let form = Form(crate::rest::parse_query(
        std::str::from_utf8(&req.body).unwrap_or(""),
    ));
    let next = safe_back(form.get("next"));
    let retry = format!("next={}", super::url_encode(&next));
    let (Some(user), Some(password)) = (
        form.get("username"),
        form.0
            .iter()
            .find(|(k, _)| k == "password")
            .map(|(_, v)| v.as_str()),
    ) else {
        return Ok(pages::login_page(
            Some(&retry),
            Some("Enter a user name and a password."),
        ));
    };
    let db = &engine.cmds.app.db;
    match db.user_verify_password(user, password).await? {
        Some(u) => {
            let t = db.token_issue(u.id, auth::SESSION_TTL).await?;
            tracing::info!(user = %u.principal(), "portal login");
            Ok(redirect_with(&next, Some(auth::set_cookie(&t.token))))
        }
        None => {
            tracing::info!(user, "portal login refused");
            Ok(pages::login_page(
                Some(&retry),
                Some("The user name or the password is incorrect."),
            ))
        }
    }
}

/// What an action does, parsed from its path before anything runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Verb {
    Logout,
    AddVm,
    Vm(VmId, VmVerb),
    /// A change to one of a VM's disks (hot plugged or unplugged while the VM runs).
    VmDisk(VmId, DiskId, VmDiskVerb),
    Snapshot(VmId, SnapshotId, SnapVerb),
    Host(HostUuid, HostVerb),
    AddSd,
    Sd(SdUuid, SdVerb),
    /// Register an unregistered VM or template of a domain (its OVF stores') into the cluster
    /// in the form, under the name in the form when one is given.
    Register(SdUuid, OvfEntityType, uuid::Uuid),
    RemoveDisk(DiskId),
    /// Copy (`true`) or move a disk chosen in the form to a domain chosen in the form.
    DiskTransfer {
        copy: bool,
    },
    /// Grow a disk chosen in the form to the size in the form.
    ExtendDisk,
    RemoveTemplate(TemplateId),
    /// Retry the command behind a job that waits for an administrator.
    RetryJob(JobId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmVerb {
    Start,
    Shutdown,
    Stop,
    Pause,
    Resume,
    Reboot,
    Remove,
    Migrate,
    Snapshot,
    Template,
    /// Attach a floating disk (`disk`), active.
    AttachDisk,
    /// Add a new disk (`disk_mib`, `sd`, `disk_format`), attached and active.
    AddDisk,
    /// Clone the VM (down) as a new one (`name`).
    Clone,
    /// Put an ISO disk (`iso`, empty: eject) into the CD-ROM: the configuration's, or with
    /// `current` the running VM's.
    Cdrom,
    /// End the snapshot preview keeping the previewed state.
    CommitPreview,
    /// End the snapshot preview returning to the state kept aside.
    UndoPreview,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmDiskVerb {
    Activate,
    Deactivate,
    Detach,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapVerb {
    /// `memory`: the VM resumes from the memory the snapshot saved, when it saved some.
    Restore {
        memory: bool,
    },
    /// Run the VM on the snapshot's data (and memory) until the preview is committed or undone.
    Preview {
        memory: bool,
    },
    Remove,
    /// A new VM (form field `name`) as the snapshot was.
    Clone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostVerb {
    Maintenance,
    Activate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdVerb {
    Attach,
    Activate,
    Deactivate,
    Detach,
    Remove,
    /// Write the domain's OVF stores now.
    UpdateOvf,
}

fn id<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, PortalError> {
    s.parse()
        .map_err(|_| PortalError::NotFound(format!("{what} {s} not found")))
}

impl Verb {
    /// The action a POST path names.
    pub fn parse(segs: &[&str]) -> Result<Verb, PortalError> {
        Ok(match segs {
            ["logout"] => Verb::Logout,
            ["vms"] => Verb::AddVm,
            ["vms", v, verb] => Verb::Vm(
                id(v, "VM")?,
                match *verb {
                    "start" => VmVerb::Start,
                    "shutdown" => VmVerb::Shutdown,
                    "stop" => VmVerb::Stop,
                    "pause" => VmVerb::Pause,
                    "resume" => VmVerb::Resume,
                    "reboot" => VmVerb::Reboot,
                    "remove" => VmVerb::Remove,
                    "migrate" => VmVerb::Migrate,
                    "snapshot" => VmVerb::Snapshot,
                    "template" => VmVerb::Template,
                    "attach-disk" => VmVerb::AttachDisk,
                    "add-disk" => VmVerb::AddDisk,
                    "cdrom" => VmVerb::Cdrom,
                    "clone" => VmVerb::Clone,
                    "commit-preview" => VmVerb::CommitPreview,
                    "undo-preview" => VmVerb::UndoPreview,
                    _ => return Err(unknown(segs)),
                },
            ),
            ["vms", v, "disks", d, verb] => Verb::VmDisk(
                id(v, "VM")?,
                id(d, "disk")?,
                match *verb {
                    "activate" => VmDiskVerb::Activate,
                    "deactivate" => VmDiskVerb::Deactivate,
                    "detach" => VmDiskVerb::Detach,
                    _ => return Err(unknown(segs)),
                },
            ),
            ["vms", v, "snapshots", s, verb] => Verb::Snapshot(
                id(v, "VM")?,
                id(s, "snapshot")?,
                match *verb {
                    "restore" => SnapVerb::Restore { memory: false },
                    "restore-memory" => SnapVerb::Restore { memory: true },
                    "preview" => SnapVerb::Preview { memory: false },
                    "preview-memory" => SnapVerb::Preview { memory: true },
                    "remove" => SnapVerb::Remove,
                    "clone" => SnapVerb::Clone,
                    _ => return Err(unknown(segs)),
                },
            ),
            ["hosts", h, verb] => Verb::Host(
                id(h, "host")?,
                match *verb {
                    "maintenance" => HostVerb::Maintenance,
                    "activate" => HostVerb::Activate,
                    _ => return Err(unknown(segs)),
                },
            ),
            ["storagedomains"] => Verb::AddSd,
            ["storagedomains", s, verb] => Verb::Sd(
                id(s, "storage domain")?,
                match *verb {
                    "attach" => SdVerb::Attach,
                    "activate" => SdVerb::Activate,
                    "deactivate" => SdVerb::Deactivate,
                    "detach" => SdVerb::Detach,
                    "remove" => SdVerb::Remove,
                    "update-ovf" => SdVerb::UpdateOvf,
                    _ => return Err(unknown(segs)),
                },
            ),
            ["storagedomains", s, kind @ ("vms" | "templates"), e, "register"] => Verb::Register(
                id(s, "storage domain")?,
                if *kind == "vms" {
                    OvfEntityType::Vm
                } else {
                    OvfEntityType::Template
                },
                id(e, "unregistered entity")?,
            ),
            ["disks", "copy"] => Verb::DiskTransfer { copy: true },
            ["disks", "move"] => Verb::DiskTransfer { copy: false },
            ["disks", "extend"] => Verb::ExtendDisk,
            ["disks", d, "remove"] => Verb::RemoveDisk(id(d, "disk")?),
            ["templates", t, "remove"] => Verb::RemoveTemplate(id(t, "template")?),
            ["jobs", j, "retry"] => Verb::RetryJob(id(j, "job")?),
            _ => return Err(unknown(segs)),
        })
    }

    /// Whether the action loses data or interrupts a guest, and so needs `confirm=1`.
    pub fn destructive(&self) -> bool {
        match self {
            // Ending a preview discards one of the two states.
            Verb::Vm(_, v) => matches!(
                v,
                VmVerb::Shutdown
                    | VmVerb::Stop
                    | VmVerb::Reboot
                    | VmVerb::Remove
                    | VmVerb::CommitPreview
                    | VmVerb::UndoPreview
            ),
            // A preview keeps the present aside: undoing it gives it back; a clone only adds.
            Verb::Snapshot(_, _, SnapVerb::Preview { .. } | SnapVerb::Clone) => false,
            // A running guest loses the disk.
            Verb::VmDisk(_, _, v) => *v != VmDiskVerb::Activate,
            // A retry acts on half-done storage: the admin confirms the cause is fixed.
            Verb::Snapshot(..) | Verb::RemoveDisk(_) | Verb::RemoveTemplate(_) | Verb::RetryJob(_) => true,
            Verb::Host(_, h) => *h == HostVerb::Maintenance,
            Verb::Sd(_, s) => matches!(s, SdVerb::Deactivate | SdVerb::Detach | SdVerb::Remove),
            Verb::Logout
            | Verb::AddVm
            | Verb::AddSd
            | Verb::Register(..)
            | Verb::DiskTransfer { .. }
            | Verb::ExtendDisk => false,
        }
    }
}

fn unknown(segs: &[&str]) -> PortalError {
    PortalError::NotFound(format!("no such action /portal/{}", segs.join("/")))
}

/// A command to run in the background: its label and its future.
type Job = (
    String,
    futures_util::future::BoxFuture<'static, Result<Option<String>, crate::commands::CommandError>>,
);

/// `POST /portal/…` other than login.
pub async fn post(ctx: &Ctx, segs: &[&str], form: &Form, fetch: bool) -> Result<Reply, PortalError> {
    match post_inner(ctx, segs, form, fetch).await {
        Err(e) if fetch => Ok(json_reply(e.status(), &json!({ "error": e.to_string() }))),
        other => other,
    }
}

async fn post_inner(ctx: &Ctx, segs: &[&str], form: &Form, fetch: bool) -> Result<Reply, PortalError> {
    let verb = Verb::parse(segs)?;
    if verb == Verb::Logout {
        ctx.db().token_revoke(&ctx.session.token).await?;
        tracing::info!(user = %ctx.session.user.principal(), "portal logout");
        return Ok(redirect_with("/portal/login", Some(auth::clear_cookie())));
    }
    let back = safe_back(form.get("back"));
    if verb.destructive() && form.get("confirm") != Some("1") {
        if fetch {
            return Err(PortalError::Bad("this action needs confirm=1".into()));
        }
        return Ok(confirm_page(ctx, segs, form, &describe(ctx, &verb).await?));
    }
    let now = ctx.db().now().as_millis();
    let corr = ActionLog::correlation_id();
    let (label, fut) = prepare(ctx, &verb, form, corr.clone()).await?;
    let rec = ctx.portal.actions.begin(ctx.session.user.id, &label, &corr, now);
    tracing::info!(user = %ctx.session.user.principal(), action = %label, correlation_id = %rec.correlation_id, "portal action");
    let portal = ctx.portal.clone();
    let engine = ctx.engine.clone();
    let (aid, label2) = (rec.id, label.clone());
    tokio::spawn(async move {
        let r = fut.await;
        engine.cmds.app.kick.notify_one();
        match &r {
            Ok(_) => tracing::info!(action = %label2, "portal action done"),
            Err(e) => tracing::warn!(action = %label2, error = %e, "portal action failed"),
        }
        portal.actions.end(aid, r.map_err(|e| super::error_chain(&e)));
    });
    if fetch {
        return Ok(json_reply(
            StatusCode::ACCEPTED,
            &json!({ "action": rec.id, "label": label, "correlation_id": rec.correlation_id }),
        ));
    }
    Ok(redirect(&back))
}

/// What the confirmation asks about.
async fn describe(ctx: &Ctx, verb: &Verb) -> Result<String, PortalError> {
    let db = ctx.db();
    let vm_name = |id: VmId| async move {
        db.vm_get(id)
            .await?
            .map(|v| v.name)
            .ok_or_else(|| PortalError::NotFound(format!("VM {id} not found")))
    };
    Ok(match verb {
        Verb::Vm(id, VmVerb::Shutdown) => format!("Shut down VM {} (ACPI)?", vm_name(*id).await?),
        Verb::Vm(id, VmVerb::Stop) => format!(
            "Power off VM {} now? Unsaved guest data is lost.",
            vm_name(*id).await?
        ),
        Verb::Vm(id, VmVerb::Reboot) => format!(
            "Reboot VM {} now (a reset)? Unsaved guest data is lost.",
            vm_name(*id).await?
        ),
        Verb::Vm(id, VmVerb::CommitPreview) => format!(
            "Commit the previewed snapshot of VM {}? The state kept aside is discarded.",
            vm_name(*id).await?
        ),
        Verb::Vm(id, VmVerb::UndoPreview) => format!(
            "Undo the preview of VM {}? What changed while previewing is discarded.",
            vm_name(*id).await?
        ),
        Verb::Vm(id, _) => format!("Remove VM {} and its disks?", vm_name(*id).await?),
        Verb::VmDisk(id, disk, v) => format!(
            "{} disk {disk} of VM {}? A running guest loses it.",
            if *v == VmDiskVerb::Detach {
                "Detach"
            } else {
                "Deactivate"
            },
            vm_name(*id).await?
        ),
        Verb::Snapshot(id, _, SnapVerb::Restore { memory }) => format!(
            "Restore VM {} to the snapshot{}? Newer data is discarded.",
            vm_name(*id).await?,
            if *memory { " with its memory" } else { "" }
        ),
        Verb::Snapshot(id, _, SnapVerb::Preview { .. }) => {
            format!("Preview a snapshot of VM {}?", vm_name(*id).await?)
        }
        Verb::Snapshot(id, _, SnapVerb::Remove) => {
            format!("Remove a snapshot of VM {}?", vm_name(*id).await?)
        }
        Verb::Host(id, _) => format!(
            "Move host {} to maintenance? Its VMs migrate away.",
            ctx.cmds().app.host(*id).await?.name
        ),
        Verb::Sd(id, v) => {
            let sd = db
                .sd_get(*id)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("storage domain {id} not found")))?;
            format!("{v:?} storage domain {}?", sd.name)
        }
        Verb::RemoveDisk(id) => format!("Remove disk {id} and its data?"),
        Verb::RemoveTemplate(id) => format!("Remove template {id}?"),
        Verb::RetryJob(id) => {
            format!("Retry job {id}? Do it once what made it fail is fixed (its events say what).")
        }
        _ => "Are you sure?".into(),
    })
}

fn confirm_page(ctx: &Ctx, segs: &[&str], form: &Form, question: &str) -> Reply {
    let mut h = Html::new();
    h.heading("Please confirm", None);
    h.raw("<p class=\"confirm-text\">").text(question).raw("</p>");
    h.raw("<form method=\"post\" action=\"/portal/")
        .text(segs.join("/"))
        .raw("\">");
    for (k, v) in &form.0 {
        if k != "confirm" {
            h.raw("<input type=\"hidden\" name=\"")
                .text(k)
                .raw("\" value=\"")
                .text(v)
                .raw("\">");
        }
    }
    h.raw("<input type=\"hidden\" name=\"confirm\" value=\"1\">")
        .raw(
            "<button type=\"submit\" class=\"danger\">Confirm</button> <a class=\"button secondary\" href=\"",
        )
        .text(safe_back(form.get("back")))
        .raw("\">Cancel</a></form>");
    html_reply(
        StatusCode::OK,
        layout(
            "Confirm",
            "",
            Some(&ctx.session.user.principal()),
            Some(&ctx.session.csrf),
            &h.finish(),
        ),
    )
}

const MIB: u64 = 1 << 20;

/// Name rules shared by VMs, templates and storage domains (what the REST layer accepts too).
fn valid_name(n: &str, what: &str) -> Result<(), PortalError> {
    if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(PortalError::Bad(format!(
            "{what} name {n:?} must be 1-64 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

/// Validates the form and builds the command; nothing runs yet.
async fn prepare(ctx: &Ctx, verb: &Verb, form: &Form, corr: String) -> Result<Job, PortalError> {
    let e = ctx.engine.clone();
    let corr = Some(corr);
    let db = ctx.db();
    let vm = |id: VmId| async move {
        db.vm_get(id)
            .await?
            .ok_or_else(|| PortalError::NotFound(format!("VM {id} not found")))
    };
    Ok(match verb.clone() {
        Verb::Logout => unreachable!("handled before"),
        Verb::AddVm => {
            let req = add_vm_request(ctx, form).await?;
            let disk = disk_request(ctx, form, &format!("{}_disk1", req.name)).await?;
            let label = format!("Create VM {}", req.name);
            (
                label,
                Box::pin(async move {
                    let v = e.cmds.add_vm(req, corr.clone()).await?;
                    if let Some(d) = disk {
                        let add = AddDisk {
                            content_type: crate::model::DiskContentType::Data,
                            attach_to: Some(AddVmDisk {
                                vm: v.id,
                                interface: DiskInterface::Virtio,
                                bootable: true,
                                active: true,
                            }),
                            ..d
                        };
                        e.cmds.add_disk(add, corr).await?;
                    }
                    Ok(Some(format!("/portal/vms/{}", v.id)))
                }),
            )
        }
        Verb::Vm(id, v) => {
            let cur = vm(id).await?;
            let name = cur.name.clone();
            match v {
                VmVerb::Start => (
                    format!("Start VM {name}"),
                    Box::pin(async move {
                        e.cmds.start_vm(id, VmStartOptions::default(), corr).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::Shutdown => (
                    format!("Shut down VM {name}"),
                    Box::pin(async move {
                        e.cmds.shutdown_vm(id).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::Stop => (
                    format!("Power off VM {name}"),
                    Box::pin(async move {
                        e.cmds.stop_vm(id).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::Pause => (
                    format!("Pause VM {name}"),
                    Box::pin(async move {
                        e.cmds.pause_vm(id).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::Resume => (
                    format!("Resume VM {name}"),
                    Box::pin(async move {
                        e.cmds.resume_vm(id).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::Reboot => (
                    format!("Reboot VM {name}"),
                    Box::pin(async move {
                        e.cmds.reboot_vm(id).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::Remove => (
                    format!("Remove VM {name}"),
                    Box::pin(async move {
                        e.cmds.remove_vm(id, false, corr).await?;
                        Ok(Some("/portal/vms".into()))
                    }),
                ),
                VmVerb::Migrate => {
                    let host: Option<HostUuid> = form.parse("host", "host")?;
                    if let Some(h) = host {
                        ctx.cmds().app.host(h).await?;
                    }
                    (
                        format!("Migrate VM {name}"),
                        Box::pin(async move {
                            e.cmds.migrate_vm(id, MigrateOptions { host }, corr).await?;
                            Ok(None)
                        }),
                    )
                }
                VmVerb::Snapshot => {
                    let description = form
                        .required("description", "a snapshot description")?
                        .to_string();
                    if description.len() > 200 {
                        return Err(PortalError::Bad(
                            "the snapshot description is longer than 200 characters".into(),
                        ));
                    }
                    let persist_memory = form.get("memory") == Some("on");
                    (
                        format!("Snapshot VM {name} ({description})"),
                        Box::pin(async move {
                            e.cmds
                                .add_snapshot(
                                    id,
                                    crate::commands::AddSnapshot {
                                        description,
                                        persist_memory,
                                        disks: None,
                                    },
                                    corr,
                                )
                                .await?;
                            Ok(None)
                        }),
                    )
                }
                VmVerb::AttachDisk => {
                    let disk: DiskId = form
                        .parse("disk", "disk")?
                        .ok_or_else(|| PortalError::Bad("choose a disk to attach".into()))?;
                    let how = active_data_disk(id, form)?;
                    (
                        format!("Attach a disk to VM {name}"),
                        Box::pin(async move {
                            e.cmds.attach_disk(id, disk, how).await?;
                            Ok(None)
                        }),
                    )
                }
                VmVerb::AddDisk => {
                    let n = ctx.db().attachments_of_vm(id).await?.len() + 1;
                    let add = disk_request(ctx, form, &format!("{name}_disk{n}"))
                        .await?
                        .ok_or_else(|| PortalError::Bad("give the new disk a size".into()))?;
                    let add = AddDisk {
                        content_type: crate::model::DiskContentType::Data,
                        attach_to: Some(active_data_disk(id, form)?),
                        ..add
                    };
                    (
                        format!("Add disk {} to VM {name}", add.name),
                        Box::pin(async move {
                            e.cmds.add_disk(add, corr).await?;
                            Ok(None)
                        }),
                    )
                }
                VmVerb::Clone => {
                    let new = form.required("name", "a name for the clone")?.to_string();
                    valid_name(&new, "VM")?;
                    (
                        format!("Clone VM {name} as {new}"),
                        Box::pin(async move {
                            let v = e.cmds.clone_vm(id, &new, corr).await?;
                            Ok(Some(format!("/portal/vms/{}", v.id)))
                        }),
                    )
                }
                VmVerb::Cdrom => {
                    let iso: Option<DiskId> = form.parse("iso", "ISO disk")?;
                    // The box is on the form whatever the status; a VM that is down has no
                    // drive to change now.
                    let current = form.get("current") == Some("on") && cur.runtime.status.is_running();
                    let label = match (iso.is_some(), current) {
                        (true, true) => format!("Change the CD of running VM {name}"),
                        (true, false) => format!("Set the CD of VM {name} for its next start"),
                        (false, true) => format!("Eject the CD of running VM {name}"),
                        (false, false) => format!("Empty the CD of VM {name} for its next start"),
                    };
                    (
                        label,
                        Box::pin(async move {
                            e.cmds.set_vm_cdrom(id, iso, current).await?;
                            Ok(None)
                        }),
                    )
                }
                VmVerb::CommitPreview => (
                    format!("Commit the preview of VM {name}"),
                    Box::pin(async move {
                        e.cmds.commit_snapshot(id, corr).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::UndoPreview => (
                    format!("Undo the preview of VM {name}"),
                    Box::pin(async move {
                        e.cmds.undo_snapshot(id, corr).await?;
                        Ok(None)
                    }),
                ),
                VmVerb::Template => {
                    let tname = form.required("name", "a template name")?.to_string();
                    valid_name(&tname, "template")?;
                    let desc = form.get("description").unwrap_or("").to_string();
                    (
                        format!("Make template {tname} from VM {name}"),
                        Box::pin(async move {
                            let t = e.cmds.add_template(id, &tname, &desc, corr).await?;
                            Ok(Some(format!("/portal/templates?template={}#new-vm", t.id)))
                        }),
                    )
                }
            }
        }
        Verb::VmDisk(vid, did, v) => {
            let name = vm(vid).await?.name;
            let disk = ctx
                .db()
                .disk_get(did)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("disk {did} not found")))?
                .name;
            let label = match v {
                VmDiskVerb::Activate => format!("Activate disk {disk} of VM {name}"),
                VmDiskVerb::Deactivate => format!("Deactivate disk {disk} of VM {name}"),
                VmDiskVerb::Detach => format!("Detach disk {disk} from VM {name}"),
            };
            (
                label,
                Box::pin(async move {
                    match v {
                        VmDiskVerb::Detach => e.cmds.detach_disk(vid, did).await?,
                        _ => {
                            e.cmds
                                .set_disk_active(vid, did, v == VmDiskVerb::Activate)
                                .await?;
                        }
                    }
                    Ok(None)
                }),
            )
        }
        Verb::Snapshot(vid, sid, v) => {
            let cur = vm(vid).await?;
            let name = cur.name;
            match v {
                SnapVerb::Restore { memory } => (
                    format!("Restore VM {name} to a snapshot"),
                    Box::pin(async move {
                        e.cmds.restore_snapshot(vid, sid, memory, corr).await?;
                        Ok(None)
                    }),
                ),
                SnapVerb::Preview { memory } => (
                    format!("Preview a snapshot of VM {name}"),
                    Box::pin(async move {
                        e.cmds.preview_snapshot(vid, sid, memory, corr).await?;
                        Ok(None)
                    }),
                ),
                SnapVerb::Remove => (
                    format!("Remove a snapshot of VM {name}"),
                    Box::pin(async move {
                        e.cmds.remove_snapshot(vid, sid, corr).await?;
                        Ok(None)
                    }),
                ),
                SnapVerb::Clone => {
                    let new = form.required("name", "a name for the clone")?.to_string();
                    valid_name(&new, "VM")?;
                    (
                        format!("Clone a snapshot of VM {name} as {new}"),
                        Box::pin(async move {
                            let v = e.cmds.clone_vm_from_snapshot(vid, sid, &new, corr).await?;
                            Ok(Some(format!("/portal/vms/{}", v.id)))
                        }),
                    )
                }
            }
        }
        Verb::Host(id, v) => {
            let h = ctx.cmds().app.host(id).await?;
            match v {
                HostVerb::Maintenance => (
                    format!("Maintenance of host {}", h.name),
                    Box::pin(async move {
                        e.cmds.host_maintenance(id).await?;
                        Ok(None)
                    }),
                ),
                HostVerb::Activate => (
                    format!("Activate host {}", h.name),
                    Box::pin(async move {
                        e.cmds.host_activate(id).await?;
                        Ok(None)
                    }),
                ),
            }
        }
        Verb::AddSd => {
            let name = form.required("name", "a name")?.to_string();
            valid_name(&name, "storage domain")?;
            let storage_type: StorageType = form
                .parse("storage_type", "storage type")?
                .unwrap_or(StorageType::Localfs);
            let path = form.required("path", "a path")?.to_string();
            if !path.starts_with('/') {
                return Err(PortalError::Bad(format!("the path {path:?} is not absolute")));
            }
            let address = form.get("address").map(str::to_string);
            if storage_type == StorageType::Nfs && address.is_none() {
                return Err(PortalError::Bad(
                    "an NFS domain needs its server's address".into(),
                ));
            }
            let host: HostUuid = form
                .parse("host", "host")?
                .ok_or_else(|| PortalError::Bad("choose the host that creates the domain".into()))?;
            ctx.cmds().app.host(host).await?;
            let dc: Option<DcId> = form.parse("dc", "data center")?;
            if let Some(d) = dc {
                ctx.cmds().app.dc(d).await?;
            }
            if db.sd_get_by_name(&name).await?.is_some() {
                return Err(PortalError::Conflict(format!(
                    "a storage domain named {name} exists"
                )));
            }
            let req = AddStorageDomain {
                name: name.clone(),
                description: String::new(),
                domain_type: SdType::Data,
                storage_type,
                address,
                path,
                vfs_type: None,
                mount_options: None,
                host,
            };
            (
                format!("Add storage domain {name}"),
                Box::pin(async move {
                    let sd = e.cmds.add_storage_domain(req, corr.clone()).await?;
                    if let Some(dc) = dc {
                        e.cmds.attach_storage_domain(dc, sd.id, corr).await?;
                    }
                    Ok(Some("/portal/storagedomains".into()))
                }),
            )
        }
        Verb::Sd(id, v) => {
            let sd = db
                .sd_get(id)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("storage domain {id} not found")))?;
            let name = sd.name;
            if v == SdVerb::UpdateOvf {
                return Ok((
                    format!("Update the OVF stores of storage domain {name}"),
                    Box::pin(async move {
                        e.cmds.update_ovf_store(id, true).await?;
                        Ok(None)
                    }),
                ));
            }
            let dc = match v {
                SdVerb::Attach => {
                    let d: DcId = ctx
                        .q("dc")
                        .or(form.get("dc"))
                        .ok_or_else(|| PortalError::Bad("choose a data center".into()))?
                        .parse()
                        .map_err(|_| PortalError::Bad("the data center id is not valid".into()))?;
                    Some(ctx.cmds().app.dc(d).await?.id)
                }
                SdVerb::Remove => None,
                _ => Some(ctx.cmds().domain_dc(id).await?.id),
            };
            let label = format!("{v:?} storage domain {name}");
            (
                label,
                Box::pin(async move {
                    match (v, dc) {
                        (SdVerb::Attach, Some(dc)) => {
                            e.cmds.attach_storage_domain(dc, id, corr).await?;
                        }
                        (SdVerb::Activate, Some(dc)) => e.cmds.activate_storage_domain(dc, id).await?,
                        (SdVerb::Deactivate, Some(dc)) => e.cmds.deactivate_storage_domain(dc, id).await?,
                        (SdVerb::Detach, Some(dc)) => e.cmds.detach_storage_domain(dc, id).await?,
                        _ => e.cmds.remove_storage_domain(id, None, false).await?,
                    }
                    Ok(None)
                }),
            )
        }
        Verb::Register(sd, kind, entity) => {
            let cluster: ClusterId = form
                .get("cluster")
                .ok_or_else(|| PortalError::Bad("choose a cluster".into()))?
                .parse()
                .map_err(|_| PortalError::Bad("the cluster id is not valid".into()))?;
            let name = form
                .get("name")
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string);
            let opts = crate::commands::ovf::RegisterOptions {
                cluster: Some(cluster),
                name,
                allow_partial_import: form.get("allow_partial") == Some("1"),
                reassign_bad_macs: form.get("reassign_macs") == Some("1"),
                ..Default::default()
            };
            let what = match kind {
                OvfEntityType::Vm => "VM",
                OvfEntityType::Template => "template",
            };
            (
                format!(
                    "Register {what} {entity} from storage domain {}",
                    ctx.cmds().sd_label(sd).await
                ),
                Box::pin(async move {
                    Ok(Some(match kind {
                        OvfEntityType::Vm => {
                            let v = e.cmds.register_vm(sd, VmId::from_uuid(entity), opts).await?;
                            format!("/portal/vms/{}", v.id)
                        }
                        OvfEntityType::Template => {
                            let t = e
                                .cmds
                                .register_template(sd, TemplateId::from_uuid(entity), opts)
                                .await?;
                            format!("/portal/templates/{}", t.id)
                        }
                    }))
                }),
            )
        }
        Verb::RemoveDisk(id) => {
            let d = db
                .disk_get(id)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("disk {id} not found")))?;
            (
                format!("Remove disk {}", d.name),
                Box::pin(async move {
                    e.cmds.remove_disk(id, corr).await?;
                    Ok(None)
                }),
            )
        }
        Verb::DiskTransfer { copy } => {
            let disk: DiskId = form
                .parse("disk", "disk")?
                .ok_or_else(|| PortalError::Bad("a disk is required".into()))?;
            let sd: SdUuid = form
                .parse("sd", "storage domain")?
                .ok_or_else(|| PortalError::Bad("a storage domain is required".into()))?;
            let d = db
                .disk_get(disk)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("disk {disk} not found")))?;
            let to = db
                .sd_get(sd)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("storage domain {sd} not found")))?;
            let name = if copy {
                form.get("name").map(str::to_string)
            } else {
                None
            };
            if let Some(n) = &name {
                valid_name(n, "the copy's")?;
            }
            let verb = if copy { "Copy" } else { "Move" };
            (
                format!("{verb} disk {} to storage domain {}", d.name, to.name),
                Box::pin(async move {
                    if copy {
                        e.cmds.copy_disk(disk, sd, name, corr).await?;
                    } else {
                        e.cmds.move_disk(disk, sd, corr).await?;
                    }
                    Ok(Some("/portal/disks".into()))
                }),
            )
        }
        Verb::ExtendDisk => {
            let disk: DiskId = form
                .parse("disk", "disk")?
                .ok_or_else(|| PortalError::Bad("a disk is required".into()))?;
            let mib: u64 = form
                .parse("size_mib", "the new size")?
                .filter(|m: &u64| *m > 0 && *m <= 1 << 30)
                .ok_or_else(|| PortalError::Bad("the new size must be 1 MiB to 1 PiB".into()))?;
            let d = db
                .disk_get(disk)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("disk {disk} not found")))?;
            if mib << 20 < d.provisioned_size {
                return Err(PortalError::Bad(format!(
                    "disk {} has {} MiB: it cannot shrink to {mib} MiB",
                    d.name,
                    d.provisioned_size >> 20
                )));
            }
            (
                format!("Extend disk {} to {mib} MiB", d.name),
                Box::pin(async move {
                    e.cmds.extend_disk(disk, mib << 20, corr).await?;
                    Ok(Some("/portal/disks".into()))
                }),
            )
        }
        Verb::RemoveTemplate(id) => {
            let t = db
                .template_get(id)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("template {id} not found")))?;
            (
                format!("Remove template {}", t.name),
                Box::pin(async move {
                    e.cmds.remove_template(id).await?;
                    Ok(None)
                }),
            )
        }
        Verb::RetryJob(id) => {
            let j = db
                .job_get(id)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("job {id} not found")))?;
            (
                format!("Retry {}", j.description),
                Box::pin(async move {
                    e.cmds.retry_job(id).await?;
                    Ok(Some(format!("/portal/jobs/{id}")))
                }),
            )
        }
    })
}

/// The new VM's request from the form (checked: names, sizes, references).
async fn add_vm_request(ctx: &Ctx, form: &Form) -> Result<AddVm, PortalError> {
    let name = form.required("name", "a VM name")?.to_string();
    valid_name(&name, "VM")?;
    let cluster: ClusterId = form
        .parse("cluster", "cluster")?
        .ok_or_else(|| PortalError::Bad("choose a cluster".into()))?;
    let db = ctx.db();
    db.cluster_get(cluster)
        .await?
        .ok_or_else(|| PortalError::NotFound(format!("cluster {cluster} not found")))?;
    let template: TemplateId = form.parse("template", "template")?.unwrap_or(BLANK_TEMPLATE_ID);
    db.template_get(template)
        .await?
        .ok_or_else(|| PortalError::NotFound(format!("template {template} not found")))?;
    if db.vm_get_by_name(&name).await?.is_some() {
        return Err(PortalError::Conflict(format!("a VM named {name} exists")));
    }
    let memory_mib: Option<u64> = form.parse("memory_mib", "memory")?;
    if let Some(m) = memory_mib {
        if !(16..=4 << 20).contains(&m) {
            return Err(PortalError::Bad(format!(
                "memory {m} MiB is out of 16 MiB..4 TiB"
            )));
        }
    }
    let cpus: Option<u32> = form.parse("cpus", "vCPU count")?;
    if let Some(c) = cpus {
        if !(1..=64).contains(&c) {
            return Err(PortalError::Bad(format!("{c} vCPUs is out of 1..64")));
        }
    }
    let ha = match form.get("ha") {
        Some("on") => {
            let priority: i32 = form.parse("ha_priority", "HA priority")?.unwrap_or(1);
            if !(0..=100).contains(&priority) {
                return Err(PortalError::Bad(format!(
                    "HA priority {priority} is out of 0..100"
                )));
            }
            Some(crate::model::HighAvailability {
                enabled: true,
                priority,
            })
        }
        None => None,
        Some(other) => {
            return Err(PortalError::Bad(format!(
                "highly available: {other:?} is not on or absent"
            )))
        }
    };
    let path = |k: &str| -> Result<Option<String>, PortalError> {
        match form.get(k) {
            Some(p) if !p.starts_with('/') => {
                Err(PortalError::Bad(format!("the {k} path {p:?} is not absolute")))
            }
            other => Ok(other.map(str::to_string)),
        }
    };
    let os = VmOs {
        kernel: path("kernel")?,
        initrd: path("initrd")?,
        cmdline: form.get("cmdline").map(str::to_string),
        ..VmOs::default()
    };
    if os.kernel.is_none() && (os.initrd.is_some() || os.cmdline.is_some()) {
        return Err(PortalError::Bad(
            "an initrd or a command line needs a kernel".into(),
        ));
    }
    Ok(AddVm {
        name,
        description: form.get("description").unwrap_or("").to_string(),
        cluster,
        template,
        memory_bytes: memory_mib.map(|m| m * MIB),
        cpu: cpus.map(|c| CpuTopology {
            sockets: c,
            cores: 1,
            threads: 1,
        }),
        os,
        ha,
        resume_behavior: form.parse("resume_behavior", "resume behaviour")?,
    })
}

/// The new VM's own disk, when the form asks for one (VMs from Blank).
/// A data disk attached active to `vm`, as the portal adds them, on the form's `interface`
/// (virtio when it names none).
fn active_data_disk(vm: VmId, form: &Form) -> Result<AddVmDisk, PortalError> {
    Ok(AddVmDisk {
        vm,
        interface: form
            .parse("interface", "disk interface")?
            .unwrap_or(DiskInterface::Virtio),
        bootable: false,
        active: true,
    })
}

/// The new disk the form describes (`disk_mib`, `sd`, `disk_format`) named `name`; `None`
/// without a size.
async fn disk_request(ctx: &Ctx, form: &Form, name: &str) -> Result<Option<AddDisk>, PortalError> {
    let mib: u64 = form.parse("disk_mib", "disk size")?.unwrap_or(0);
    if mib == 0 {
        return Ok(None);
    }
    if mib > 64 << 20 {
        return Err(PortalError::Bad(format!(
            "a disk of {mib} MiB is larger than 64 TiB"
        )));
    }
    let sd: SdUuid = form
        .parse("sd", "storage domain")?
        .ok_or_else(|| PortalError::Bad("choose a storage domain for the disk".into()))?;
    ctx.db()
        .sd_get(sd)
        .await?
        .ok_or_else(|| PortalError::NotFound(format!("storage domain {sd} not found")))?;
    let format: DiskFormat = form
        .parse("disk_format", "disk format")?
        .unwrap_or(DiskFormat::Cow);
    Ok(Some(AddDisk {
        name: name.to_string(),
        description: String::new(),
        storage_domain: sd,
        provisioned_size: mib * MIB,
        format,
        sparse: format == DiskFormat::Cow,
        shareable: false,
        content_type: crate::model::DiskContentType::Data,
        attach_to: None,
        disk_profile: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_to_verbs_and_bad_ones_are_refused() {
        let v = VmId::new_random();
        let vs = v.to_string();
        assert_eq!(
            Verb::parse(&["vms", &vs, "start"]).unwrap(),
            Verb::Vm(v, VmVerb::Start)
        );
        assert!(!Verb::parse(&["vms", &vs, "start"]).unwrap().destructive());
        assert!(Verb::parse(&["vms", &vs, "stop"]).unwrap().destructive());
        assert!(Verb::parse(&["vms", &vs, "reboot"]).unwrap().destructive());
        assert!(Verb::parse(&["vms", &vs, "shutdown"]).unwrap().destructive());
        assert!(Verb::parse(&["vms", &vs, "remove"]).unwrap().destructive());
        assert!(!Verb::parse(&["vms", &vs, "snapshot"]).unwrap().destructive());
        let h = HostUuid::new_random().to_string();
        assert!(Verb::parse(&["hosts", &h, "maintenance"]).unwrap().destructive());
        assert!(!Verb::parse(&["hosts", &h, "activate"]).unwrap().destructive());
        let sd = SdUuid::new_random();
        let (sds, e) = (sd.to_string(), uuid::Uuid::new_v4());
        let reg = Verb::parse(&["storagedomains", &sds, "vms", &e.to_string(), "register"]).unwrap();
        assert_eq!(reg, Verb::Register(sd, OvfEntityType::Vm, e));
        assert!(!reg.destructive());
        assert!(Verb::parse(&["storagedomains", &sds, "disks", &e.to_string(), "register"]).is_err());
        assert!(!Verb::parse(&["storagedomains", &sds, "update-ovf"])
            .unwrap()
            .destructive());
        let d = DiskId::new_random().to_string();
        let disk = |verb| Verb::parse(&["vms", &vs, "disks", &d, verb]);
        assert!(!disk("activate").unwrap().destructive());
        assert!(disk("deactivate").unwrap().destructive());
        assert!(disk("detach").unwrap().destructive());
        assert!(disk("explode").is_err());
        assert!(!Verb::parse(&["vms", &vs, "attach-disk"]).unwrap().destructive());
        assert!(Verb::parse(&["vms", &vs, "commit-preview"])
            .unwrap()
            .destructive());
        assert!(Verb::parse(&["vms", &vs, "undo-preview"]).unwrap().destructive());
        let s = SnapshotId::new_random().to_string();
        assert_eq!(
            Verb::parse(&["vms", &vs, "snapshots", &s, "preview-memory"]).unwrap(),
            Verb::Snapshot(v, s.parse().unwrap(), SnapVerb::Preview { memory: true })
        );
        assert!(!Verb::parse(&["vms", &vs, "snapshots", &s, "clone"])
            .unwrap()
            .destructive());
        assert!(!Verb::parse(&["vms", &vs, "snapshots", &s, "preview"])
            .unwrap()
            .destructive());
        assert!(matches!(
            Verb::parse(&["vms", &vs, "explode"]),
            Err(PortalError::NotFound(_))
        ));
        assert!(matches!(
            Verb::parse(&["vms", "not-a-uuid", "start"]),
            Err(PortalError::NotFound(_))
        ));
        assert!(matches!(Verb::parse(&["nothing"]), Err(PortalError::NotFound(_))));
        assert_eq!(
            Verb::parse(&["disks", "copy"]).unwrap(),
            Verb::DiskTransfer { copy: true }
        );
        assert!(!Verb::parse(&["disks", "move"]).unwrap().destructive());
        assert_eq!(Verb::parse(&["disks", "extend"]).unwrap(), Verb::ExtendDisk);
    }

    #[test]
    fn the_action_log_is_bounded_and_per_user() {
        let log = ActionLog::default();
        let (a, b) = (UserId::new_random(), UserId::new_random());
        let r1 = log.begin(a, "one", &ActionLog::correlation_id(), 1);
        let r2 = log.begin(b, "two", &ActionLog::correlation_id(), 2);
        assert_ne!(r1.correlation_id, r2.correlation_id);
        assert!(r1.correlation_id.starts_with("portal-"));
        assert_eq!(log.of_user(a, 0).len(), 1);
        assert_eq!(log.running_of_user(b).len(), 1);
        log.end(r1.id, Err("boom".into()));
        log.end(r1.id, Ok(None));
        let got = log.get(r1.id).unwrap();
        assert_eq!(
            (got.state, got.message.as_str()),
            (ActionState::Failed, "boom"),
            "ends once"
        );
        assert!(log.of_user(a, r1.id).is_empty());
        for i in 0..LOG_LEN + 5 {
            log.begin(a, "x", "c", i as i64);
        }
        assert_eq!(log.recent.lock().unwrap().len(), LOG_LEN);
        assert!(log.get(r1.id).is_none(), "the oldest went first");
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("web-01.a_b", "VM").is_ok());
        for bad in ["", "a b", "x/y", "<script>", &"a".repeat(65)] {
            assert!(valid_name(bad, "VM").is_err(), "{bad}");
        }
    }
}
