//! OVF stores and registration, with real processes: an in-process engine and an `oxvirt node`,
//! two local data domains. A template and VMs live on `data1` (one VM made from the template,
//! with a snapshot and data in both layers); the engine's periodic pass writes `data1`'s two
//! OVF stores, which are checked on storage as oVirt would read them (the description's JSON,
//! the tar listed by `tar`). Deactivated, `data1` refuses to detach while a VM spans it and
//! `data0`, or keeps its lease there; once that VM lets go of both, the detach takes the
//! template, the VMs and the disks out of the engine's records. A second engine with a node of
//! its own, which never saw any of it, imports the domain: it offers them as unregistered; a
//! VM is refused before its template, then both register with their disks, NIC and snapshot
//! (one into another cluster by oVirt's cluster mapping), and the VM's disk reads back the data
//! of every layer. Refused and changing nothing: registering twice, an id that is not there, a
//! name that is taken. One VM registers through the admin portal's "VM import" form.
//! (Re-attaching to the same engine is the SDK's and Ansible's scenario in `rest_clients`.)

use crate::common;
use crate::transfers::{engine_cfg, https_request, login_with_dc1_and_cl1, oxvirt, PASSWORD};

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::free_port;
use http::{Method, StatusCode};
use oxvirt_engine::daemon::Engine;
use oxvirt_engine::model::{SnapshotType, VmId};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn qemu_io_write(path: &Path, pattern: u8, off_mib: u64) {
    let out = std::process::Command::new(oxvirt_testkit::require_tool("qemu-io"))
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern:#x} {off_mib}M 1M"),
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The OVF stores on a domain's storage: (description, the tar they hold), newest first.
fn stores_on_disk(domain: &Path) -> Vec<(Value, Vec<u8>)> {
    let mut out = Vec::new();
    for img in std::fs::read_dir(domain.join("images")).unwrap() {
        let img = img.unwrap().path();
        for f in std::fs::read_dir(&img).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_none_or(|e| e != "meta") {
                continue;
            }
            let meta = std::fs::read_to_string(&f).unwrap();
            if !meta.lines().any(|l| l == "DISKTYPE=OVFS") {
                continue;
            }
            let desc = meta
                .lines()
                .find_map(|l| l.strip_prefix("DESCRIPTION="))
                .unwrap_or_default();
            let d: Value = serde_json::from_str(desc).unwrap_or_else(|e| panic!("{e}: {desc}"));
            let data = std::fs::read(f.with_extension("")).unwrap();
            let size = d["Size"].as_u64().unwrap_or(0) as usize;
            out.push((d, data[..size.min(data.len())].to_vec()));
        }
    }
    out.sort_by_key(|(d, _)| std::cmp::Reverse(d["Last Updated"].as_str().map(str::to_string)));
    out
}

/// `tar -t` of an archive: its member names, as the real tool reads them.
fn tar_names(data: &[u8], work: &Path) -> Vec<String> {
    try_tar_names(data, work).unwrap_or_else(|e| panic!("tar -tf: {e}"))
}

/// As [`tar_names`], or what `tar` said when the archive is not one (a store read while the
/// engine rewrites it).
fn try_tar_names(data: &[u8], work: &Path) -> Result<Vec<String>, String> {
    let f = work.join("store.tar");
    std::fs::write(&f, data).unwrap();
    let out = std::process::Command::new(oxvirt_testkit::require_tool("tar"))
        .arg("-tf")
        .arg(&f)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_domains_carry_their_vms_and_templates_to_be_registered_again() {
    let engine_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (store0, store1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node = tempfile::tempdir().unwrap();
    let w = work.path();

    let mut cfg = engine_cfg(engine_dir.path());
    cfg.settings.ovf_update_interval = Duration::from_secs(2);
    let engine = Engine::start(cfg, Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let db = engine.cmds.app.db.clone();
    let addr = free_port();
    let _node = common::spawn_node(
        "node1",
        node.path(),
        addr,
        &[
            "--engine",
            &engine.addr.to_string(),
            "--ca-fingerprint",
            &engine.ca_fingerprint(),
        ],
    );
    let _reaper = common::QemuReaper(vec![node.path().join("run")]);
    login_with_dc1_and_cl1(w, engine_dir.path(), &engine).await;
    let a = addr.to_string();
    oxvirt(
        w,
        &["host", "create", "node1", "--address", &a, "--cluster", "cl1"],
        true,
    )
    .await;
    for (name, dir) in [("data0", &store0), ("data1", &store1)] {
        let p = dir.path().to_str().unwrap();
        oxvirt(
            w,
            &[
                "sd", "create", name, "--host", "node1", "--path", p, "--dc", "dc1",
            ],
            true,
        )
        .await;
    }
    let sd1 = json(&oxvirt(w, &["sd", "show", "data1", "-o", "json"], true).await.0)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let dom1 = store1.path().join(&sd1);

    // base (16 MiB disk, 'A' at 0) → template tpl → web, a thin clone with a snapshot and 'B'
    // at 1 MiB in its top layer, and a NIC; span has disks on both domains.
    oxvirt(
        w,
        &[
            "vm",
            "create",
            "base",
            "--cluster",
            "cl1",
            "--disk-size",
            "16M",
            "--sd",
            "data1",
            "--memory",
            "256M",
            "--cpus",
            "2",
        ],
        true,
    )
    .await;
    let vm_id = |n: &str| {
        let db = db.clone();
        let n = n.to_string();
        async move { db.vm_get_by_name(&n).await.unwrap().unwrap().id }
    };
    let leaf = |vm: VmId| {
        let db = db.clone();
        async move {
            let a = db.attachments_of_vm(vm).await.unwrap();
            let chain = db.volume_chain(a[0].disk_id).await.unwrap();
            (a[0].disk_id, chain)
        }
    };
    let base = vm_id("base").await;
    let (bdisk, chain) = leaf(base).await;
    qemu_io_write(
        &dom1
            .join("images")
            .join(bdisk.to_string())
            .join(chain[0].id.to_string()),
        0x41,
        0,
    );
    oxvirt(w, &["template", "create", "tpl", "--vm", "base"], true).await;
    oxvirt(
        w,
        &["vm", "create", "web", "--cluster", "cl1", "--template", "tpl"],
        true,
    )
    .await;
    let web = vm_id("web").await;
    oxvirt(
        w,
        &["snapshot", "create", "--vm", "web", "--description", "s1"],
        true,
    )
    .await;
    let (wdisk, chain) = leaf(web).await;
    // Its own volumes: the clone's base (on the template's volume) and the snapshot's top.
    assert_eq!(chain.len(), 2, "{chain:?}");
    let tvol = chain[0]
        .parent_id
        .expect("a thin clone's base has the template's volume under it");
    let top = dom1
        .join("images")
        .join(wdisk.to_string())
        .join(chain[1].id.to_string());
    qemu_io_write(&top, 0x42, 1);
    oxvirt(w, &["nic", "create", "nic1", "--vm", "web"], true).await;
    let mac = db.nics_of_vm(web).await.unwrap()[0].mac;
    oxvirt(
        w,
        &[
            "vm",
            "create",
            "span",
            "--cluster",
            "cl1",
            "--disk-size",
            "16M",
            "--sd",
            "data0",
        ],
        true,
    )
    .await;
    oxvirt(
        w,
        &["disk", "create", "spanx", "--size", "16M", "--sd", "data1"],
        true,
    )
    .await;
    oxvirt(w, &["disk", "attach", "spanx", "--vm", "span"], true).await;

    // The periodic pass writes both stores; oVirt's reader would find them.
    let tpl = db.template_get_by_name("tpl").await.unwrap().unwrap().id;
    let span_id = vm_id("span").await;
    let want: Vec<String> = [
        base.to_string(),
        web.to_string(),
        tpl.to_string(),
        span_id.to_string(),
    ]
    .iter()
    .map(|id| format!("{id}.ovf"))
    .collect();
    let start = Instant::now();
    // Both complete and holding all four: the pass that followed the last change is done (a
    // store read while one is being written is a torn archive, retried).
    let stores = loop {
        let s = stores_on_disk(&dom1);
        let complete = s.len() == 2
            && s.iter().all(|(d, t)| {
                d["Updated"] == true && try_tar_names(t, w).is_ok_and(|n| want.iter().all(|x| n.contains(x)))
            });
        if complete {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no complete OVF stores on data1: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for (d, tar) in &stores {
        assert_eq!(d["Disk Description"], "OVF_STORE");
        assert!(d["Storage Domains"].to_string().contains(&sd1), "{d}");
        let mut names = tar_names(tar, w);
        assert_eq!(names.first().map(String::as_str), Some("info.json"), "{names:?}");
        assert_eq!(
            names.last().map(String::as_str),
            Some("metadata.json"),
            "{names:?}"
        );
        names.sort();
        for x in &want {
            assert!(names.contains(x), "{x} in {names:?}");
        }
    }

    // Detach: refused while span has a disk on each domain, then taken out of the records.
    oxvirt(w, &["sd", "deactivate", "data1"], true).await;
    let (o, e) = oxvirt(w, &["sd", "detach", "data1"], false).await;
    assert!(
        format!("{o}{e}").contains("VM span has disks on storage domain"),
        "{o}{e}"
    );
    assert!(db.vm_get(web).await.unwrap().is_some(), "nothing forgotten");
    oxvirt(w, &["disk", "detach", "spanx", "--vm", "span"], true).await;
    // Nor while a VM that stays keeps its lease there.
    let mut sv = db.vm_get_by_name("span").await.unwrap().unwrap();
    sv.lease_storage_domain_id = Some(sd1.parse().unwrap());
    let sv = engine.cmds.update_vm(&sv).await.unwrap();
    let (o, e) = oxvirt(w, &["sd", "detach", "data1"], false).await;
    assert!(
        format!("{o}{e}").contains("VM span keeps its lease on storage domain"),
        "{o}{e}"
    );
    let mut sv = sv;
    sv.lease_storage_domain_id = None;
    engine.cmds.update_vm(&sv).await.unwrap();
    oxvirt(w, &["sd", "detach", "data1"], true).await;
    for v in [base, web] {
        assert!(
            db.vm_get(v).await.unwrap().is_none(),
            "VM {v} left with the domain"
        );
    }
    assert!(
        db.template_get(tpl).await.unwrap().is_none(),
        "the template left with the domain"
    );
    assert!(db.disk_get(wdisk).await.unwrap().is_none());
    assert!(db.vm_get_by_name("span").await.unwrap().is_some(), "span stays");
    assert!(
        dom1.join("images").join(wdisk.to_string()).is_dir(),
        "storage keeps the disks"
    );

    // Another engine, which has never seen any of it (a recovery site, or this one after its
    // database was lost), imports the domain through a node of its own: offered as unregistered.
    drop(_node);
    let (engine2_dir, work2, node2) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let routes = oxvirt_engine::portal::routes_with(oxvirt_engine::rest::routes());
    let engine2 = Engine::start(engine_cfg(engine2_dir.path()), Some(routes))
        .await
        .unwrap();
    let addr2 = free_port();
    let _node2 = common::spawn_node(
        "node2",
        node2.path(),
        addr2,
        &[
            "--engine",
            &engine2.addr.to_string(),
            "--ca-fingerprint",
            &engine2.ca_fingerprint(),
        ],
    );
    let _reaper2 = common::QemuReaper(vec![node2.path().join("run")]);
    let (w, db) = (work2.path(), engine2.cmds.app.db.clone());
    login_with_dc1_and_cl1(w, engine2_dir.path(), &engine2).await;
    let a = addr2.to_string();
    oxvirt(
        w,
        &["host", "create", "node2", "--address", &a, "--cluster", "cl1"],
        true,
    )
    .await;
    let p1 = store1.path().to_str().unwrap();
    oxvirt(
        w,
        &["sd", "import", "--host", "node2", "--path", p1, "--dc", "dc1"],
        true,
    )
    .await;
    oxvirt(w, &["cluster", "create", "cl-dr", "--dc", "dc1"], true).await;
    let leaf = |vm: VmId| {
        let db = db.clone();
        async move {
            let a = db.attachments_of_vm(vm).await.unwrap();
            let chain = db.volume_chain(a[0].disk_id).await.unwrap();
            (a[0].disk_id, chain)
        }
    };
    let list = |kind: &'static str| {
        let w = w.to_path_buf();
        async move {
            let out = oxvirt(
                &w,
                &["sd", "unregistered", "data1", "--kind", kind, "-o", "json"],
                true,
            )
            .await
            .0;
            let v = json(&out);
            let mut names: Vec<String> = v
                .as_array()
                .unwrap_or_else(|| panic!("{out}"))
                .iter()
                .map(|e| e["name"].as_str().unwrap_or_default().to_string())
                .collect();
            names.sort();
            names
        }
    };
    // span too, as the stores last described it: its disk on data0 is not here.
    assert_eq!(list("vm").await, ["base", "span", "web"]);
    assert_eq!(list("template").await, ["tpl"]);
    assert!(list("disk").await.contains(&"spanx".to_string()));

    let (o, e) = oxvirt(
        w,
        &["sd", "register", "data1", &web.to_string(), "--kind", "vm"],
        false,
    )
    .await;
    assert!(
        format!("{o}{e}").contains("register the template first"),
        "{o}{e}"
    );
    assert!(db.vm_get(web).await.unwrap().is_none(), "nothing registered");
    oxvirt(
        w,
        &["sd", "register", "data1", &tpl.to_string(), "--kind", "template"],
        true,
    )
    .await;
    let (out, _) = oxvirt(
        w,
        &[
            "sd",
            "register",
            "data1",
            &web.to_string(),
            "--kind",
            "vm",
            "-o",
            "json",
        ],
        true,
    )
    .await;
    let v = json(&out);
    assert_eq!(
        (v["name"].as_str(), v["status"].as_str()),
        (Some("web"), Some("down")),
        "{v}"
    );
    let vm = db.vm_get(web).await.unwrap().unwrap();
    assert_eq!(vm.template_id, tpl);
    let (d, chain) = leaf(web).await;
    assert_eq!(d, wdisk);
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[0].parent_id, Some(tvol), "still on the template's volume");
    let snaps = db.snapshots_of_vm(web).await.unwrap();
    let s1 = snaps
        .iter()
        .find(|s| s.snapshot_type == SnapshotType::Regular)
        .unwrap_or_else(|| panic!("{snaps:?}"));
    assert_eq!(s1.description, "s1");
    assert_eq!(s1.disks.len(), 1, "the snapshot keeps its volume: {s1:?}");
    assert_eq!(s1.disks[0].volume_id, chain[0].id);
    let nics = db.nics_of_vm(web).await.unwrap();
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].mac, mac, "its MAC is free here, so kept");

    // Again, or an id that is not there: refused. base comes back under another name when its
    // own is taken.
    let (o, e) = oxvirt(
        w,
        &["sd", "register", "data1", &web.to_string(), "--kind", "vm"],
        false,
    )
    .await;
    assert!(format!("{o}{e}").contains("registered already"), "{o}{e}");
    let stray = VmId::new_random().to_string();
    let (o, e) = oxvirt(w, &["sd", "register", "data1", &stray, "--kind", "vm"], false).await;
    assert!(format!("{o}{e}").contains("not found"), "{o}{e}");
    oxvirt(w, &["vm", "create", "base", "--cluster", "cl1"], true).await;
    let (o, e) = oxvirt(
        w,
        &["sd", "register", "data1", &base.to_string(), "--kind", "vm"],
        false,
    )
    .await;
    assert!(format!("{o}{e}").contains("a VM named base exists"), "{o}{e}");
    oxvirt(
        w,
        &[
            "sd",
            "register",
            "data1",
            &base.to_string(),
            "--kind",
            "vm",
            "--rename",
            "base-dr",
            "--map-cluster",
            "cl1=cl-dr",
        ],
        true,
    )
    .await;
    let b = db.vm_get(base).await.unwrap().unwrap();
    let cl_dr = db.cluster_get_by_name("cl-dr").await.unwrap().unwrap().id;
    assert_eq!(
        b.cluster_id, cl_dr,
        "oVirt's cluster mapping: the OVF's cl1 is cl-dr here"
    );
    assert_eq!(
        (b.name.as_str(), b.memory_bytes, b.cpu.vcpus()),
        ("base-dr", 256 * MIB, 2)
    );
    // span's disk on data0 is missing: refused, unless it comes without it.
    let span = db
        .unregistered_ovfs(sd1.parse().unwrap(), None)
        .await
        .unwrap()
        .into_iter()
        .find(|u| u.name == "span")
        .unwrap()
        .entity_id
        .to_string();
    let (o, e) = oxvirt(w, &["sd", "register", "data1", &span, "--kind", "vm"], false).await;
    assert!(format!("{o}{e}").contains("allow_partial_import"), "{o}{e}");
    // Through the portal this time: the domain's page lists it under "VM import", and its
    // form registers it without the missing disk.
    let base_url = format!("https://{}", engine2.addr);
    let ca = std::fs::read_to_string(engine2_dir.path().join("pki/ca.pem")).unwrap();
    let form = |pairs: &[(&str, &str)]| {
        Bytes::from(
            pairs
                .iter()
                .map(|(k, v)| format!("{k}={}", v.replace(' ', "+").replace('@', "%40")))
                .collect::<Vec<_>>()
                .join("&"),
        )
    };
    let ctype = ("content-type", "application/x-www-form-urlencoded".to_string());
    let (st, h, _) = https_request(
        &format!("{base_url}/portal/login"),
        &ca,
        Method::POST,
        std::slice::from_ref(&ctype),
        form(&[("username", "admin@internal"), ("password", PASSWORD)]),
    )
    .await;
    assert!(st.is_redirection(), "portal login: {st}");
    let cookie = h
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("oxvirt_portal="))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {h:?}"))
        .to_string();
    let (st, _, page) = https_request(
        &format!("{base_url}/portal/storagedomains/{sd1}"),
        &ca,
        Method::GET,
        &[("cookie", cookie.clone())],
        Bytes::new(),
    )
    .await;
    let page = String::from_utf8_lossy(&page).into_owned();
    assert_eq!(st, StatusCode::OK, "{page}");
    assert!(
        page.contains("VM import") && page.contains(&format!("data-id=\"{span}\"")),
        "{page}"
    );
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token: {page}"))
        .to_string();
    let cl2 = db
        .cluster_get_by_name("cl1")
        .await
        .unwrap()
        .unwrap()
        .id
        .to_string();
    let (st, _, body) = https_request(
        &format!("{base_url}/portal/storagedomains/{sd1}/vms/{span}/register"),
        &ca,
        Method::POST,
        &[ctype, ("cookie", cookie)],
        form(&[("csrf", &csrf), ("cluster", &cl2), ("allow_partial", "1")]),
    )
    .await;
    assert!(st.is_redirection(), "{st}: {}", String::from_utf8_lossy(&body));
    let start = Instant::now();
    let sv = loop {
        if let Some(v) = db.vm_get_by_name("span").await.unwrap() {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the portal did not register span"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let atts = db.attachments_of_vm(sv.id).await.unwrap();
    let mut names = Vec::new();
    for a in &atts {
        names.push(db.disk_get(a.disk_id).await.unwrap().unwrap().name);
    }
    assert_eq!(names, ["spanx"], "only the disk storage has");
    assert_eq!(list("vm").await, Vec::<String>::new(), "nothing left to register");

    // The registered VM's disk reads back the template's data and its own layer's.
    let raw = w.join("web.raw");
    oxvirt(
        w,
        &[
            "disk",
            "download",
            &wdisk.to_string(),
            raw.to_str().unwrap(),
            "--format",
            "raw",
        ],
        true,
    )
    .await;
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, 16 * MIB);
    assert!(
        data[..MIB as usize].iter().all(|b| *b == 0x41),
        "the template's data"
    );
    assert!(
        data[MIB as usize..2 * MIB as usize].iter().all(|b| *b == 0x42),
        "the snapshot layer's data"
    );

    // The stores follow: written on demand, the registered entities in them as before.
    oxvirt(w, &["sd", "update-ovf", "data1"], true).await;
    let (_, tar) = &stores_on_disk(&dom1)[0];
    assert!(tar_names(tar, w).contains(&format!("{web}.ovf")));
}

/// BENCHMARKS.md: writing the OVF stores of a domain holding 1,000 VMs (each with a disk of
/// one volume and a NIC) through the engine, against what the bare tools take to write the
/// same OVFs into the same two volumes (`tar` of the files, `dd conv=fsync` into each, as
/// VDSM writes a store). Median of 3 runs each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ovf_stores_of_1000_vms_against_tar_and_dd() {
    use oxvirt_engine::model::*;
    const N: usize = 1000;
    let engine_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let node = tempfile::tempdir().unwrap();
    let w = work.path();
    let engine = Engine::start(engine_cfg(engine_dir.path()), Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let db = engine.cmds.app.db.clone();
    let addr = free_port();
    let _node = common::spawn_node(
        "node1",
        node.path(),
        addr,
        &[
            "--engine",
            &engine.addr.to_string(),
            "--ca-fingerprint",
            &engine.ca_fingerprint(),
        ],
    );
    login_with_dc1_and_cl1(w, engine_dir.path(), &engine).await;
    let a = addr.to_string();
    oxvirt(
        w,
        &["host", "create", "node1", "--address", &a, "--cluster", "cl1"],
        true,
    )
    .await;
    let p = store.path().to_str().unwrap();
    oxvirt(
        w,
        &[
            "sd", "create", "data1", "--host", "node1", "--path", p, "--dc", "dc1",
        ],
        true,
    )
    .await;
    let sd: SdUuid = db.sd_get_by_name("data1").await.unwrap().unwrap().id;
    let cl = db.cluster_get_by_name("cl1").await.unwrap().unwrap().id;
    let mut tx = db.begin().await.unwrap();
    for n in 0..N {
        let vm = tx.vm_insert(&Vm::new(&format!("vm-{n:04}"), cl)).await.unwrap();
        let disk = tx
            .disk_insert(&Disk::new(
                &format!("vm-{n:04}_Disk1"),
                sd,
                DiskFormat::Cow,
                10 << 30,
            ))
            .await
            .unwrap();
        tx.volume_insert(&Volume {
            id: VolUuid::new_random(),
            disk_id: disk.id,
            storage_domain_id: sd,
            parent_id: None,
            voltype: VolType::Leaf,
            format: DiskFormat::Cow,
            actual_size: 0,
            created_at: oxvirt_engine::time::Timestamp::from_millis(0),
        })
        .await
        .unwrap();
        tx.attachment_add(&DiskAttachment {
            vm_id: vm.id,
            disk_id: disk.id,
            interface: DiskInterface::Virtio,
            bootable: true,
            active: true,
            read_only: false,
        })
        .await
        .unwrap();
        let nic = Nic {
            id: NicId::new_random(),
            vm_id: vm.id,
            name: "nic1".into(),
            network: None,
            mac: MacAddr([0; 6]),
            interface: NicInterface::Virtio,
            plugged: true,
            linked: true,
        };
        tx.nic_add(&nic, None).await.unwrap();
    }
    tx.commit().await.unwrap();

    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut ours = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        assert!(engine.cmds.update_ovf_store(sd, true).await.unwrap());
        ours.push(t0.elapsed());
    }
    let dom = store.path().join(sd.to_string());
    let stores = stores_on_disk(&dom);
    assert_eq!(stores.len(), 2);
    let (_, tar) = &stores[0];
    let names = tar_names(tar, w);
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".ovf")).count(),
        N,
        "every VM's OVF"
    );

    // The bare tools: the same files tarred, the tar written into both store volumes.
    let files = w.join("ovfs");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(w.join("store.tar"), tar).unwrap();
    let x = std::process::Command::new("tar")
        .arg("-xf")
        .arg(w.join("store.tar"))
        .arg("-C")
        .arg(&files)
        .status()
        .unwrap();
    assert!(x.success());
    let vols: Vec<String> = std::fs::read_dir(dom.join("images"))
        .unwrap()
        .flatten()
        .flat_map(|i| std::fs::read_dir(i.path()).unwrap().flatten())
        .filter(|f| {
            f.path().extension().is_some_and(|e| e == "meta")
                && std::fs::read_to_string(f.path())
                    .unwrap()
                    .contains("DISKTYPE=OVFS")
        })
        .map(|f| f.path().with_extension("").display().to_string())
        .collect();
    let script = format!(
        "set -e; tar -cf {t} -C {f} .; for v in {v}; do dd if={t} of=$v bs=1M conv=fsync,notrunc status=none; done",
        t = w.join("bare.tar").display(),
        f = files.display(),
        v = vols.join(" ")
    );
    let mut bare = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let s = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .status()
            .unwrap();
        assert!(s.success());
        bare.push(t0.elapsed());
    }
    let (o, b) = (median(ours), median(bare));
    println!(
        "| OVF stores of a domain with {N} VMs ({:.1} MiB tar, two stores) | {:.1} ms | `tar` + `dd conv=fsync` ×2 {:.1} ms | {:.1} |",
        tar.len() as f64 / (1 << 20) as f64,
        o.as_secs_f64() * 1e3,
        b.as_secs_f64() * 1e3,
        o.as_secs_f64() / b.as_secs_f64()
    );
    assert!(o < Duration::from_secs(60), "{o:?}");
}

/// `POOL_UUID` of the domain at `root`, as its metadata has it.
fn pool_of(root: &Path) -> String {
    std::fs::read_to_string(root.join("dom_md/metadata"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("POOL_UUID="))
        .unwrap_or_default()
        .to_string()
}

/// A disaster recovery: a data center dies (its engine stops, its one node is killed) without
/// detaching its master domain. Another engine imports the domain, which still names the dead
/// pool; while the first node still renews its lease on it the attach is refused and nothing on
/// storage changes; once that node is gone the attach takes the domain over (the lockspace
/// watched, the SDM lease of the dead SPM waited out) and its VM registers from the OVF
/// stores with its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_data_centers_domain_is_taken_over_once_its_hosts_are_gone() {
    let (engine_dir, work, store, node) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let w = work.path();
    let engine = Engine::start(engine_cfg(engine_dir.path()), Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let addr = free_port();
    let node1 = common::spawn_node(
        "node1",
        node.path(),
        addr,
        &[
            "--engine",
            &engine.addr.to_string(),
            "--ca-fingerprint",
            &engine.ca_fingerprint(),
        ],
    );
    let _reaper = common::QemuReaper(vec![node.path().join("run")]);
    login_with_dc1_and_cl1(w, engine_dir.path(), &engine).await;
    let a = addr.to_string();
    oxvirt(
        w,
        &["host", "create", "node1", "--address", &a, "--cluster", "cl1"],
        true,
    )
    .await;
    let p = store.path().to_str().unwrap();
    oxvirt(
        w,
        &[
            "sd", "create", "data1", "--host", "node1", "--path", p, "--dc", "dc1",
        ],
        true,
    )
    .await;
    let sd = engine
        .cmds
        .app
        .db
        .sd_get_by_name("data1")
        .await
        .unwrap()
        .unwrap()
        .id;
    let root = store.path().join(sd.to_string());
    let old_pool = pool_of(&root);
    assert!(!old_pool.is_empty());
    oxvirt(
        w,
        &[
            "vm",
            "create",
            "web",
            "--cluster",
            "cl1",
            "--disk-size",
            "16M",
            "--sd",
            "data1",
        ],
        true,
    )
    .await;
    let web = engine
        .cmds
        .app
        .db
        .vm_get_by_name("web")
        .await
        .unwrap()
        .unwrap()
        .id;
    let att = engine.cmds.app.db.attachments_of_vm(web).await.unwrap();
    let disk = att[0].disk_id;
    let vol = engine.cmds.app.db.volume_chain(disk).await.unwrap()[0].id;
    qemu_io_write(
        &root.join("images").join(disk.to_string()).join(vol.to_string()),
        0x43,
        2,
    );
    oxvirt(w, &["sd", "update-ovf", "data1"], true).await;
    // The SPM writes OVF store volumes only: a guest's raw disk is refused, unchanged.
    oxvirt(
        w,
        &[
            "disk", "create", "rawd", "--size", "1M", "--sd", "data1", "--format", "raw",
        ],
        true,
    )
    .await;
    let db1 = engine.cmds.app.db.clone();
    let rawd = db1
        .disk_list(&oxvirt_engine::db::ListQuery::new())
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.name == "rawd")
        .unwrap()
        .id;
    let rvol = db1.volume_chain(rawd).await.unwrap()[0].id;
    let dc1 = db1.dc_get_by_name("dc1").await.unwrap().unwrap();
    let (_, spm) = engine.cmds.app.dc_spm(dc1.id).await.unwrap();
    let rpath = root.join("images").join(rawd.to_string()).join(rvol.to_string());
    let before = std::fs::read(&rpath).unwrap();
    let e = spm
        .call(
            "Volume.writeData",
            serde_json::json!({ "spUUID": dc1.storage_pool_id, "sdUUID": sd, "imgUUID": rawd,
                                "volUUID": rvol, "offset": 0, "data": "eA==", "sync": true }),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("only OVF store volumes"), "{e}");
    assert_eq!(std::fs::read(&rpath).unwrap(), before, "the disk is untouched");

    // The recovery site: an engine and a node of its own, the domain imported as it is.
    let (engine2_dir, work2, node2) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let w2 = work2.path();
    let engine2 = Engine::start(
        engine_cfg(engine2_dir.path()),
        Some(oxvirt_engine::rest::routes()),
    )
    .await
    .unwrap();
    let addr2 = free_port();
    let _node2 = common::spawn_node(
        "node2",
        node2.path(),
        addr2,
        &[
            "--engine",
            &engine2.addr.to_string(),
            "--ca-fingerprint",
            &engine2.ca_fingerprint(),
        ],
    );
    let _reaper2 = common::QemuReaper(vec![node2.path().join("run")]);
    login_with_dc1_and_cl1(w2, engine2_dir.path(), &engine2).await;
    let a2 = addr2.to_string();
    oxvirt(
        w2,
        &["host", "create", "node2", "--address", &a2, "--cluster", "cl1"],
        true,
    )
    .await;
    oxvirt(w2, &["sd", "import", "--host", "node2", "--path", p], true).await;

    // The first site still runs: refused, and storage unchanged.
    let (o, e) = oxvirt(w2, &["sd", "attach", "data1", "--dc", "dc1"], false).await;
    assert!(format!("{o}{e}").contains("is in use"), "{o}{e}");
    assert_eq!(pool_of(&root), old_pool, "the running pool keeps its domain");

    // It dies: the attach takes the domain over.
    drop(node1);
    engine.shutdown().await;
    let t0 = Instant::now();
    oxvirt(w2, &["sd", "attach", "data1", "--dc", "dc1"], true).await;
    println!("take-over attach: {:.1} s", t0.elapsed().as_secs_f64());
    let new_pool = pool_of(&root);
    assert!(
        !new_pool.is_empty() && new_pool != old_pool,
        "{new_pool} vs {old_pool}"
    );
    let (out, _) = oxvirt(
        w2,
        &["sd", "unregistered", "data1", "--kind", "vm", "-o", "json"],
        true,
    )
    .await;
    assert!(out.contains("\"web\""), "{out}");
    oxvirt(
        w2,
        &["sd", "register", "data1", &web.to_string(), "--kind", "vm"],
        true,
    )
    .await;
    let raw = w2.join("web.raw");
    oxvirt(
        w2,
        &[
            "disk",
            "download",
            &disk.to_string(),
            raw.to_str().unwrap(),
            "--format",
            "raw",
        ],
        true,
    )
    .await;
    let data = std::fs::read(&raw).unwrap();
    assert!(
        data[2 * MIB as usize..3 * MIB as usize]
            .iter()
            .all(|b| *b == 0x43),
        "the VM's data, written at the first site"
    );
}
