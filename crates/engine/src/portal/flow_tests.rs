//! The portal end to end on a real engine (SQLite, its real command layer, no node): login,
//! sessions, CSRF and origin checks, every page, an action that runs, one that fails, the
//! confirmation of destructive actions and the live endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use oxvirt_rpc::{HttpRequest, Reply};
use serde_json::Value;

use super::*;
use crate::app::EngineSettings;
use crate::daemon::EngineConfig;
use crate::model::{VmStatus, BLANK_TEMPLATE_ID};

const PW: &str = "portal-unit-test";

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, k: &str) -> &str {
        self.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

struct T {
    engine: Arc<Engine>,
    portal: Arc<Portal>,
    cookie: Option<String>,
    _dir: tempfile::TempDir,
}

impl T {
    async fn new() -> T {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::start(
            EngineConfig {
                data_dir: dir.path().to_path_buf(),
                db_url: None,
                listen: "127.0.0.1:0".parse().unwrap(),
                admin_password: Some(PW.into()),
                settings: EngineSettings {
                    forward_retry: crate::saga::ForwardRetry {
                        attempts: 2,
                        first_delay: Duration::from_millis(10),
                        max_delay: Duration::from_millis(10),
                    },
                    ..EngineSettings::default()
                },
            },
            None,
        )
        .await
        .unwrap();
        crate::allinone::ensure_default(&engine).await.unwrap();
        T {
            engine,
            portal: Portal::with_sample_interval(Duration::from_millis(200)),
            cookie: None,
            _dir: dir,
        }
    }

    async fn send(&self, method: Method, target: &str, body: &str, extra: &[(&'static str, &str)]) -> Resp {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target.to_string(), None),
        };
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:8443"));
        if let Some(c) = &self.cookie {
            headers.insert(
                "cookie",
                HeaderValue::from_str(&format!("oxvirt_portal={c}")).unwrap(),
            );
        }
        for (k, v) in extra {
            headers.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let req = HttpRequest {
            method,
            path,
            query,
            headers,
            body: Bytes::from(body.to_string()),
            peer: "127.0.0.1:40000".parse().unwrap(),
            client: None,
        };
        match self.portal.handle(self.engine.clone(), req).await {
            Reply::Headers {
                status,
                headers,
                body,
                ..
            } => Resp {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            },
            Reply::Full { status, body, .. } => Resp {
                status,
                headers: HeaderMap::new(),
                body: String::from_utf8_lossy(&body).into_owned(),
            },
            Reply::Stream { .. } => panic!("the portal does not stream"),
        }
    }

    async fn get(&self, target: &str) -> Resp {
        self.send(Method::GET, target, "", &[]).await
    }

    async fn post(&self, target: &str, form: &[(&str, &str)], extra: &[(&'static str, &str)]) -> Resp {
        let body: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{k}={}", url_encode(v)))
            .collect();
        self.send(Method::POST, target, &body.join("&"), extra).await
    }

    async fn login(&mut self) -> String {
        let r = self
            .post(
                "/portal/login",
                &[
                    ("username", "admin@internal"),
                    ("password", PW),
                    ("next", "/portal/vms"),
                ],
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        assert_eq!(r.header("location"), "/portal/vms");
        let c = r.header("set-cookie");
        let token = c
            .strip_prefix("oxvirt_portal=")
            .and_then(|s| s.split(';').next())
            .unwrap()
            .to_string();
        self.cookie = Some(token.clone());
        auth::csrf_for(&token)
    }

    /// Polls the action log until the action is no longer running.
    async fn action_outcome(&self, label: &str) -> Value {
        let start = Instant::now();
        loop {
            let live = self.get("/portal/api/live?actions_after=0").await.json();
            if let Some(a) = live["actions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["label"] == label && a["state"] != "running")
            {
                return a.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{label} did not end: {live}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_pages_actions_and_live_updates() {
    let mut t = T::new().await;

    // Without a session: pages redirect to the login page, the JSON API is a 401.
    let r = t.get("/portal/vms?name=x").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header("location"), "/portal/login?next=/portal/vms%3Fname%3Dx");
    assert_eq!(t.get("/portal/api/live").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(t.get("/").await.header("location"), "/portal/");
    let login = t.get("/portal/login").await;
    assert_eq!(login.status, StatusCode::OK);
    assert!(login
        .header("content-security-policy")
        .contains("script-src 'self'"));
    let js = t.get("/portal/static/portal.js").await;
    assert_eq!((js.status, js.body.contains("data-live")), (StatusCode::OK, true));
    assert_eq!(
        t.get("/portal/static/nope.js").await.status,
        StatusCode::NOT_FOUND
    );

    // A wrong password is refused; an outside `next` is not followed.
    let r = t
        .post(
            "/portal/login",
            &[("username", "admin@internal"), ("password", "nope")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("incorrect") && r.header("set-cookie").is_empty());
    let r = t
        .post(
            "/portal/login",
            &[
                ("username", "admin@internal"),
                ("password", PW),
                ("next", "https://evil.example/"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.header("location"), "/portal/");
    let csrf = t.login().await;

    // Every page renders.
    for (path, needle) in [
        ("/portal/", "Dashboard"),
        ("/portal/datacenters", "Default"),
        ("/portal/clusters", "Default"),
        ("/portal/hosts", "No hosts."),
        ("/portal/storagedomains", "Add a storage domain"),
        ("/portal/disks", "No disks."),
        ("/portal/vms", "New VM"),
        ("/portal/snapshots", "Snapshots"),
        ("/portal/templates", "Blank"),
        ("/portal/jobs", "Jobs"),
        ("/portal/events", "Events"),
    ] {
        let r = t.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert!(r.body.contains(needle), "{path} lacks {needle:?}");
        assert!(r.body.contains(&csrf), "{path} carries the CSRF token");
    }
    assert_eq!(
        t.get("/portal/vms/not-a-uuid").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.get("/portal/nothing").await.status, StatusCode::NOT_FOUND);

    let db = t.engine.app().db.clone();
    // A storage domain's page: where it is, its use and its disks.
    let pagedisk = {
        use crate::model::{Disk, DiskFormat, SdType, StorageDomain, StorageType};
        let mut sd = StorageDomain::new("pagesd", SdType::Data, StorageType::Localfs, "/srv/pagesd");
        sd.capacity_bytes = Some(10 << 30);
        sd.free_bytes = Some(6 << 30);
        let sd = db.sd_insert(&sd).await.unwrap();
        let pagedisk = db
            .disk_insert(&Disk::new("pagedisk", sd.id, DiskFormat::Cow, 2 << 30))
            .await
            .unwrap();
        let r = t.get("/portal/storagedomains").await;
        assert!(
            r.body.contains(&format!("/portal/storagedomains/{}", sd.id)),
            "{}",
            r.body
        );
        let r = t.get(&format!("/portal/storagedomains/{}", sd.id)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        for needle in [
            "pagedisk",
            "/srv/pagesd",
            "4 GiB of 10 GiB",
            "none (unattached)",
            // 6 GB free is over 5 GB and 10 %: no alarm, the thresholds shown.
            "<dd>warning under 10 % free, critical (no new disks) under 5 GB</dd>",
        ] {
            assert!(r.body.contains(needle), "the page lacks {needle:?}: {}", r.body);
        }
        assert_eq!(
            t.get("/portal/storagedomains/00000000-0000-4000-8000-000000000009")
                .await
                .status,
            StatusCode::NOT_FOUND
        );
        let mut iso = Disk::new("pageiso", sd.id, DiskFormat::Raw, 4 << 20);
        iso.content_type = crate::model::DiskContentType::Iso;
        let iso = db.disk_insert(&iso).await.unwrap();
        (pagedisk.id, iso.id)
    };
    let (pagedisk, pageiso) = pagedisk;
    // A data center's, a cluster's and a template's pages, each linked from its list and
    // linking to what it holds.
    {
        let cl = db.cluster_get_by_name("Default").await.unwrap().unwrap();
        let dc = cl.data_center_id;
        let pages: [(&str, String, Vec<String>); 3] = [
            (
                "datacenters",
                dc.to_string(),
                vec![
                    format!("/portal/clusters/{}", cl.id),
                    "No storage domain is attached.".into(),
                    "No hosts.".into(),
                    "none yet".into(),
                ],
            ),
            (
                "clusters",
                cl.id.to_string(),
                vec![
                    format!("/portal/datacenters/{dc}"),
                    "Scheduling policy".into(),
                    "No VMs in this cluster.".into(),
                ],
            ),
            (
                "templates",
                BLANK_TEMPLATE_ID.to_string(),
                vec![
                    "Template Blank".into(),
                    "New VM from it".into(),
                    "No disks.".into(),
                    "No VM was made from it.".into(),
                ],
            ),
        ];
        for (kind, id, needles) in pages {
            let page = format!("/portal/{kind}/{id}");
            let list = t.get(&format!("/portal/{kind}")).await.body;
            assert!(
                list.contains(&page),
                "/portal/{kind} lacks a link to {page}: {list}"
            );
            let r = t.get(&page).await;
            assert_eq!(r.status, StatusCode::OK, "{page}: {}", r.body);
            for needle in needles {
                assert!(r.body.contains(&needle), "{page} lacks {needle:?}: {}", r.body);
            }
            for id in ["00000000-0000-4000-8000-000000000009", "not-a-uuid"] {
                let r = t.get(&format!("/portal/{kind}/{id}")).await;
                assert_eq!(r.status, StatusCode::NOT_FOUND, "{kind}/{id}");
            }
        }
    }
    let cluster = db
        .cluster_get_by_name("Default")
        .await
        .unwrap()
        .unwrap()
        .id
        .to_string();
    let blank = BLANK_TEMPLATE_ID.to_string();
    let vm_form = |name: &'static str, csrf: &str| -> Vec<(&'static str, String)> {
        vec![
            ("csrf", csrf.to_string()),
            ("name", name.to_string()),
            ("cluster", cluster.clone()),
            ("template", blank.clone()),
            ("memory_mib", "64".into()),
            ("back", "/portal/vms".into()),
        ]
    };
    async fn post_owned(t: &T, target: &str, f: Vec<(&str, String)>, extra: &[(&'static str, &str)]) -> Resp {
        let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        t.post(target, &f, extra).await
    }

    // POSTs need the session's CSRF token and, when named, our own origin.
    let r = post_owned(&t, "/portal/vms", vm_form("t1", "bad"), &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = post_owned(
        &t,
        "/portal/vms",
        vm_form("t1", &csrf),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A bad name is refused before anything runs.
    let r = post_owned(&t, "/portal/vms", vm_form("a<b", &csrf), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("must be 1-64 letters") && !r.body.contains("a<b\""));
    assert!(db.vm_get_by_name("t1").await.unwrap().is_none());
    // So is a high-availability priority out of range.
    let mut bad_ha = vm_form("t1", &csrf);
    bad_ha.extend([("ha", "on".to_string()), ("ha_priority", "500".to_string())]);
    let r = post_owned(&t, "/portal/vms", bad_ha, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("HA priority 500 is out of 0..100"), "{}", r.body);
    assert!(db.vm_get_by_name("t1").await.unwrap().is_none());
    // And a resume behaviour oVirt does not have.
    let mut bad_rb = vm_form("t1", &csrf);
    bad_rb.push(("resume_behavior", "reboot".to_string()));
    let r = post_owned(&t, "/portal/vms", bad_rb, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body
            .contains("resume behaviour &quot;reboot&quot; is not valid"),
        "{}",
        r.body
    );
    assert!(db.vm_get_by_name("t1").await.unwrap().is_none());

    // Creating a VM runs in the background; the page is back at once.
    let mut form = vm_form("t1", &csrf);
    form.extend([("ha", "on".to_string()), ("ha_priority", "3".to_string())]);
    let r = post_owned(&t, "/portal/vms", form, &[("origin", "https://127.0.0.1:8443")]).await;
    assert_eq!(
        (r.status, r.header("location")),
        (StatusCode::SEE_OTHER, "/portal/vms"),
        "{}",
        r.body
    );
    let done = t.action_outcome("Create VM t1").await;
    assert_eq!(done["state"], "done", "{done}");
    let vm = db
        .vm_get_by_name("t1")
        .await
        .unwrap()
        .expect("the VM was created");
    assert_eq!(vm.memory_bytes, 64 << 20);
    assert_eq!((vm.ha.enabled, vm.ha.priority), (true, 3), "the HA checkbox");
    assert_eq!(
        vm.resume_behavior,
        crate::model::ResumeBehavior::Kill,
        "a highly available VM is killed on long storage errors, whatever the form said"
    );
    let id = vm.id.to_string();
    assert!(done["link"].as_str().unwrap().ends_with(&id));
    let page = t.get("/portal/vms").await.body;
    assert!(page.contains(&format!("data-id=\"{id}\"")) && page.contains(">t1</a>"));
    let tag = db
        .tag_insert(&crate::model::Tag {
            id: crate::model::TagId::new_random(),
            name: "web".into(),
            description: String::new(),
            parent: None,
            created_at: db.now(),
        })
        .await
        .unwrap();
    db.tag_assign(tag.id, crate::model::TagTarget::Vm(vm.id))
        .await
        .unwrap();
    let page = t.get(&format!("/portal/vms/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("VM t1") && page.body.contains("data-console"));
    assert!(
        page.body.contains("<dd>kill</dd>"),
        "HA: killed on long storage errors: {}",
        page.body
    );
    assert!(page.body.contains("<dd>web</dd>"), "its tags: {}", page.body);

    // The live endpoint reports its membership and status.
    let live = t
        .get("/portal/api/live?sets=vms,vms_running,templates&events_after=0")
        .await
        .json();
    assert_eq!(live["sets"]["vms"], serde_json::json!([id.clone()]));
    assert_eq!(live["sets"]["vms_running"], serde_json::json!([]));
    assert_eq!(live["vms"][&id]["status"], "down");
    assert_eq!(live["counts"]["vms_running"], "0 / 1");
    assert_eq!(live["tasks"], serde_json::json!([]), "no SPM, no storage tasks");
    // The data centers and snapshots pages watch sets of their own; what the page shows and
    // what the poller answers agree (else the page would re-render on every poll).
    for (path, set) in [
        ("/portal/datacenters", "dcs"),
        ("/portal/snapshots", "snappage:1"),
    ] {
        let page = t.get(path).await.body;
        assert!(
            page.contains(&format!("data-live-set=\"{set}\"")),
            "{path}: {page}"
        );
        let mut rows: Vec<String> = page
            .split("<tr data-id=\"")
            .skip(1)
            .map(|r| {
                let (id, rest) = r.split_once('"').unwrap();
                let v = rest
                    .strip_prefix(" data-v=\"")
                    .and_then(|x| x.split_once('"'))
                    .map(|(v, _)| v);
                v.map_or(id.to_string(), |v| format!("{id}={v}"))
            })
            .collect();
        rows.sort();
        let live = t.get(&format!("/portal/api/live?sets={set}")).await.json();
        assert_eq!(live["sets"][set], serde_json::json!(rows), "{path}");
    }
    let dcs = t.get("/portal/datacenters").await.body;
    assert!(dcs.contains("data-region=\"head-sub\">1 data center(s)"), "{dcs}");
    let jobs_page = t.get("/portal/jobs").await.body;
    assert!(jobs_page.contains("data-live-tasks") && jobs_page.contains("Adding VM t1"));
    let console = t.get(&format!("/portal/api/console?vm={id}")).await.json();
    assert_eq!(console["running"], false);
    // A down VM's VNC console does not open.
    let vv = t.get(&format!("/portal/api/console.vv?vm={id}")).await;
    assert_eq!(vv.status, StatusCode::CONFLICT, "{}", vv.body);
    assert!(vv.body.contains("opens while it runs"), "{}", vv.body);

    // The CD-ROM: the VM's page offers ISO disks (not data disks); one goes into the
    // configuration of the VM, which is down (the "now" box is ignored then).
    let page = t.get(&format!("/portal/vms/{id}")).await.body;
    let form = page
        .split(&format!("action=\"/portal/vms/{id}/cdrom\""))
        .nth(1)
        .and_then(|f| f.split("</form>").next())
        .unwrap_or_else(|| panic!("no CD-ROM form: {page}"));
    assert!(
        form.contains(&pageiso.to_string()) && !form.contains(&pagedisk.to_string()),
        "{form}"
    );
    let r = t
        .post(
            &format!("/portal/vms/{id}/cdrom"),
            &[("csrf", &csrf), ("iso", &pagedisk.to_string())],
            &[("x-portal-fetch", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let label = "Set the CD of VM t1 for its next start";
    let failed = t.action_outcome(label).await;
    assert_eq!(failed["state"], "failed", "a data disk is no ISO: {failed}");
    let iso = pageiso.to_string();
    let r = t
        .post(
            &format!("/portal/vms/{id}/cdrom"),
            &[("csrf", &csrf), ("iso", &iso), ("current", "on")],
            &[("x-portal-fetch", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let start = Instant::now();
    while db.vm_get(vm.id).await.unwrap().unwrap().cdrom != Some(pageiso) {
        assert!(start.elapsed() < Duration::from_secs(20), "the CD was not set");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t.get(&format!("/portal/vms/{id}")).await.body.contains("pageiso"));

    // Cloned from its page (a VM without disks: no storage work), the clone with its CD.
    let r = t
        .post(
            &format!("/portal/vms/{id}/clone"),
            &[("csrf", &csrf), ("name", "t1-clone")],
            &[("x-portal-fetch", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let done = t.action_outcome("Clone VM t1 as t1-clone").await;
    assert_eq!(done["state"], "done", "{done}");
    let clone = db.vm_get_by_name("t1-clone").await.unwrap().unwrap();
    assert_eq!(clone.cdrom, Some(pageiso));
    assert_eq!(clone.memory_bytes, vm.memory_bytes);
    let r = t
        .post(
            &format!("/portal/vms/{id}/clone"),
            &[("csrf", &csrf), ("name", "bad name")],
            &[("x-portal-fetch", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    t.engine.cmds.remove_vm(clone.id, false, None).await.unwrap();

    // A floating disk is offered on the VM's page and attached active; deactivating and
    // detaching it ask first (a running guest would lose it).
    let page = t.get(&format!("/portal/vms/{id}")).await.body;
    assert!(
        page.contains("attach-disk") && page.contains(&pagedisk.to_string()),
        "{page}"
    );
    let fetch = [("x-portal-fetch", "1")];
    let pd = pagedisk.to_string();
    assert!(page.contains("name=\"interface\""), "{page}");
    let r = t
        .post(
            &format!("/portal/vms/{id}/attach-disk"),
            &[("csrf", &csrf), ("disk", &pd), ("interface", "bogus")],
            &fetch,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = t
        .post(
            &format!("/portal/vms/{id}/attach-disk"),
            &[("csrf", &csrf), ("disk", &pd), ("interface", "virtio_scsi")],
            &fetch,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(t.action_outcome("Attach a disk to VM t1").await["state"], "done");
    let att = || async { db.attachment_get(vm.id, pagedisk).await.unwrap() };
    let a = att().await.unwrap();
    assert!(a.active && a.interface == crate::model::DiskInterface::VirtioScsi);
    let page = t.get(&format!("/portal/vms/{id}")).await.body;
    assert!(
        page.contains(&format!("/portal/vms/{id}/disks/{pd}/deactivate")),
        "{page}"
    );
    let deactivate = format!("/portal/vms/{id}/disks/{pd}/deactivate");
    let r = t.post(&deactivate, &[("csrf", &csrf)], &fetch).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "needs a confirmation");
    let r = t
        .post(&deactivate, &[("csrf", &csrf), ("confirm", "1")], &fetch)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let label = "Deactivate disk pagedisk of VM t1";
    assert_eq!(t.action_outcome(label).await["state"], "done");
    assert!(!att().await.unwrap().active);
    let r = t
        .post(
            &format!("/portal/vms/{id}/disks/{pd}/detach"),
            &[("csrf", &csrf), ("confirm", "1")],
            &fetch,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(
        t.action_outcome("Detach disk pagedisk from VM t1").await["state"],
        "done"
    );
    assert!(att().await.is_none());
    // A new disk needs a size.
    let r = t
        .post(&format!("/portal/vms/{id}/add-disk"), &[("csrf", &csrf)], &fetch)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);

    // A snapshot offers a preview; while one is previewed, the page offers commit and undo
    // instead, both asking first.
    {
        use crate::model::{Snapshot, SnapshotId, SnapshotStatus, SnapshotType};
        let snap = SnapshotId::new_random();
        db.snapshot_insert(&Snapshot::locked(
            snap,
            vm.id,
            "before",
            SnapshotType::Regular,
            vec![],
            vm.configuration(),
        ))
        .await
        .unwrap();
        db.snapshot_set_status(snap, &[], SnapshotStatus::Ok)
            .await
            .unwrap();
        let page = t.get(&format!("/portal/vms/{id}")).await.body;
        assert!(page.contains(&format!("/snapshots/{snap}/preview")), "{page}");
        assert!(page.contains(&format!("/snapshots/{snap}/clone")), "{page}");
        assert!(!page.contains("commit-preview"));
        db.snapshot_set_status(snap, &[], SnapshotStatus::InPreview)
            .await
            .unwrap();
        let page = t.get(&format!("/portal/vms/{id}")).await.body;
        assert!(
            page.contains("Previewing snapshot &quot;before&quot;")
                || page.contains("Previewing snapshot \"before\""),
            "{page}"
        );
        assert!(
            page.contains(&format!("/portal/vms/{id}/commit-preview")),
            "{page}"
        );
        assert!(page.contains(&format!("/portal/vms/{id}/undo-preview")), "{page}");
        assert!(!page.contains(&format!("/snapshots/{snap}/preview\"")), "{page}");
        assert!(
            !page.contains(&format!("/snapshots/{snap}/clone")),
            "in preview: {page}"
        );
        let r = t
            .post(
                &format!("/portal/vms/{id}/undo-preview"),
                &[("csrf", &csrf)],
                &fetch,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "undo asks first: {}", r.body);
        db.snapshot_delete(snap).await.unwrap();
    }

    // Destructive actions ask first: a confirmation page, or a 400 for the script.
    let stop = format!("/portal/vms/{id}/remove");
    let r = t
        .post(&stop, &[("csrf", &csrf), ("back", "/portal/vms")], &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("Remove VM t1") && r.body.contains("name=\"confirm\" value=\"1\""));
    let r = t
        .post(&stop, &[("csrf", &csrf)], &[("x-portal-fetch", "1")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("confirm"));
    assert!(db.vm_get(vm.id).await.unwrap().is_some(), "nothing was removed");

    // An action that cannot succeed (no host is up) ends failed with the reason.
    let r = t
        .post(
            &format!("/portal/vms/{id}/start"),
            &[("csrf", &csrf)],
            &[("x-portal-fetch", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.json()["label"], "Start VM t1");
    let failed = t.action_outcome("Start VM t1").await;
    assert_eq!(failed["state"], "failed");
    assert!(!failed["message"].as_str().unwrap().is_empty());
    assert_eq!(
        db.vm_get(vm.id).await.unwrap().unwrap().runtime.status,
        VmStatus::Down
    );

    // Confirmed, the removal runs.
    let r = t
        .post(
            &stop,
            &[("csrf", &csrf), ("confirm", "1")],
            &[("x-portal-fetch", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(t.action_outcome("Remove VM t1").await["state"], "done");
    assert!(db.vm_get(vm.id).await.unwrap().is_none());

    // Adding a storage domain checks its form before anything runs.
    let sd = |path: &'static str, host: &'static str| {
        vec![
            ("csrf", csrf.clone()),
            ("name", "data2".to_string()),
            ("storage_type", "localfs".to_string()),
            ("path", path.to_string()),
            ("host", host.to_string()),
        ]
    };
    let r = post_owned(
        &t,
        "/portal/storagedomains",
        sd("relative/dir", ""),
        &[("x-portal-fetch", "1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("not absolute"));
    let r = post_owned(
        &t,
        "/portal/storagedomains",
        sd("/srv/data2", ""),
        &[("x-portal-fetch", "1")],
    )
    .await;
    assert!(r.json()["error"].as_str().unwrap().contains("choose the host"));
    let nohost = "00000000-0000-4000-8000-000000000001";
    let r = post_owned(
        &t,
        "/portal/storagedomains",
        sd("/srv/data2", nohost),
        &[("x-portal-fetch", "1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(db.sd_get_by_name("data2").await.unwrap().is_none());
    // Maintenance of a host asks first, too.
    let r = t
        .post(
            &format!("/portal/hosts/{nohost}/maintenance"),
            &[("csrf", &csrf)],
            &[("x-portal-fetch", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Logging out revokes the token.
    let r = t.post("/portal/logout", &[("csrf", &csrf)], &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.header("set-cookie").contains("Max-Age=0"));
    assert_eq!(t.get("/portal/").await.status, StatusCode::SEE_OTHER);
    t.engine.shutdown().await;
}

/// A disk removal that cannot reach an SPM is blocked past its point of no return: its job's
/// page says so and offers a retry, which asks for confirmation and then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_command_is_retried_from_its_job_page() {
    use crate::model::{Disk, DiskFormat, PoolMember, SdStatus, SdType, StorageDomain, StorageType};
    let mut t = T::new().await;
    let csrf = t.login().await;
    let db = t.engine.app().db.clone();
    let dc = db.dc_get_by_name("Default").await.unwrap().unwrap();
    let sd = db
        .sd_insert(&StorageDomain::new(
            "gone",
            SdType::Data,
            StorageType::Localfs,
            "/nonexistent",
        ))
        .await
        .unwrap();
    db.pool_attach(&PoolMember {
        data_center_id: dc.id,
        storage_domain_id: sd.id,
        status: SdStatus::Active,
        master: true,
    })
    .await
    .unwrap();
    let disk = db
        .disk_insert(&Disk::new("stranded", sd.id, DiskFormat::Raw, 1 << 20))
        .await
        .unwrap();
    let r = t
        .post(
            &format!("/portal/disks/{}/remove", disk.id),
            &[("csrf", &csrf), ("confirm", "1")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let out = t.action_outcome("Remove disk stranded").await;
    assert_eq!(out["state"], "failed", "{out}");
    assert!(
        out["message"].as_str().unwrap().contains("past rolling back"),
        "{out}"
    );

    let job = db.job_list(&Default::default()).await.unwrap();
    let job = job
        .iter()
        .find(|j| j.description.starts_with("Removing disk"))
        .unwrap();
    let page = t.get(&format!("/portal/jobs/{}", job.id)).await;
    assert_eq!(page.status, StatusCode::OK);
    for needle in [
        "data-saga-state=\"blocked\"",
        "failed past the point where it could be rolled back",
        &format!("/portal/jobs/{}/retry", job.id),
    ] {
        assert!(
            page.body.contains(needle),
            "the job page lacks {needle:?}: {}",
            page.body
        );
    }
    // Without confirmation: the question, nothing run.
    let r = t
        .post(&format!("/portal/jobs/{}/retry", job.id), &[("csrf", &csrf)], &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("Please confirm") && r.body.contains("once what made it fail is fixed"));
    // Confirmed: it runs, and (the SPM still missing) is blocked again.
    let r = t
        .post(
            &format!("/portal/jobs/{}/retry", job.id),
            &[("csrf", &csrf), ("confirm", "1")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let out = t.action_outcome(&format!("Retry {}", job.description)).await;
    assert_eq!(out["state"], "failed", "{out}");
    let steps = db.saga_get(job.saga_id.unwrap()).await.unwrap().unwrap().steps;
    assert!(steps.iter().any(|s| s.name == "delete"), "{steps:?}");
    t.engine.shutdown().await;
}
