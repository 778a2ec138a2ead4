//! Scheduling and availability over the REST API v4 (real HTTPS, real SQLite database, no node
//! needed): cluster scheduling policies and memory overcommit, the read-only
//! `/schedulingpolicies`, affinity groups with their VMs, and power management (a host's fence
//! agent, a real shell script here, and the host `fence` action), and the monitor applying a
//! node's VM report without undoing a newer command. Every refused request is checked to have
//! changed nothing.

use crate::rest_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{start_engine_on, Backend};
use http::{Method, StatusCode};
use oxvirt_engine::model::{ClusterId, Host, HostStatus, HostUuid, VmId, VmRuntime, VmStatus};
use rest_common::{count, root_id, xml_text, Client};

const NONE_ID: &str = "b4ed2332-a7ac-4d5f-9596-99a439cb2812";
const EVEN_ID: &str = "20d25257-b4bd-4589-92a6-c4c5c5d3fd1a";
const POWER_SAVING_ID: &str = "5a2b0939-7d46-4b73-a469-e9c2c7fc6a53";
const DEAD: &str = "9b1d3c5e-0000-4000-8000-00000000dead";

fn vm_xml(name: &str, cluster: &str) -> String {
    format!(
        "<vm><name>{name}</name><cluster><name>{cluster}</name></cluster><template><name>Blank</name></template>\
         <memory>268435456</memory></vm>"
    )
}

async fn add(c: &Client, path: &str, body: &str) -> String {
    let r = c.post(path, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "POST {path}: {}", r.body);
    root_id(&r.body)
}

async fn put(c: &Client, path: &str, body: &str) -> rest_common::Response {
    c.api(Method::PUT, path, body).await
}

/// Whether the body, XML entities decoded, contains `s`.
fn has(body: &str, s: &str) -> bool {
    body.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .contains(s)
}

/// The text of `<inner>` inside the first `<outer …>` element.
fn nested(body: &str, outer: &str, inner: &str) -> Option<String> {
    let i = body.find(&format!("<{outer}"))?;
    xml_text(&body[i..], inner)
}

async fn cluster_scheduling_policy_and_overcommit(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    let db = &t.engine.app().db;
    add(&c, "datacenters", "<data_center><name>sdc</name></data_center>").await;

    // The read-only policies, with oVirt's ids; None is the default.
    let r = c.get("schedulingpolicies").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "scheduling_policy"), 4, "{}", r.body);
    for (id, name) in [
        (NONE_ID, "none"),
        (EVEN_ID, "evenly_distributed"),
        (POWER_SAVING_ID, "power_saving"),
        ("8d5d7bec-68de-4a67-b53e-0ac54686d579", "vm_evenly_distributed"),
    ] {
        let r = c.get(&format!("schedulingpolicies/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.xml_text("name").as_deref(), Some(name));
        assert_eq!(root_id(&r.body), id);
        assert_eq!(
            r.xml_text("default_policy").as_deref(),
            Some(if name == "none" { "true" } else { "false" })
        );
    }
    assert_eq!(
        c.get(&format!("schedulingpolicies/{DEAD}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get("schedulingpolicies/fastest").await.status,
        StatusCode::NOT_FOUND
    );

    // Add with a policy by name and an overcommit; GET shows both; the scheduler sees them.
    let r = c
        .post(
            "clusters",
            "<cluster><name>scl</name><data_center><name>sdc</name></data_center>\
             <scheduling_policy><name>power_saving</name></scheduling_policy>\
             <memory_policy><over_commit><percent>150</percent></over_commit></memory_policy></cluster>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let cl = root_id(&r.body);
    let r = c.get(&format!("clusters/{cl}")).await;
    assert!(
        has(&r.body, &format!(
            "<scheduling_policy href=\"/ovirt-engine/api/schedulingpolicies/{POWER_SAVING_ID}\" id=\"{POWER_SAVING_ID}\">"
        )) || has(&r.body, &format!("id=\"{POWER_SAVING_ID}\"")),
        "{}",
        r.body
    );
    assert_eq!(
        nested(&r.body, "scheduling_policy", "name").as_deref(),
        Some("power_saving")
    );
    assert_eq!(r.xml_text("percent").as_deref(), Some("150"));
    let snap = oxvirt_engine::scheduling::snapshot(t.engine.app(), cl.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(snap.policy.kind, oxvirt_scheduler::PolicyKind::PowerSaving);
    assert_eq!(snap.policy.memory_overcommit_pct, 150);

    // Update by id.
    let r = put(
        &c,
        &format!("clusters/{cl}"),
        &format!("<cluster><scheduling_policy id=\"{EVEN_ID}\"/></cluster>"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        nested(&r.body, "scheduling_policy", "name").as_deref(),
        Some("evenly_distributed")
    );

    // Refused updates name what is wrong and change nothing (not even the valid fields).
    let before = db.cluster_get(cl.parse().unwrap()).await.unwrap().unwrap();
    for (body, says) in [
        (
            "<cluster><name>renamed</name><scheduling_policy><name>fastest</name></scheduling_policy></cluster>".to_string(),
            "\"fastest\"",
        ),
        (
            format!("<cluster><scheduling_policy id=\"{DEAD}\"/></cluster>"),
            DEAD,
        ),
        (
            "<cluster><scheduling_policy id=\"not-a-uuid\"/></cluster>".to_string(),
            "not-a-uuid",
        ),
        (
            format!("<cluster><scheduling_policy id=\"{NONE_ID}\"><name>power_saving</name></scheduling_policy></cluster>"),
            "is none",
        ),
        (
            "<cluster><name>renamed</name><memory_policy><over_commit><percent>50</percent></over_commit></memory_policy></cluster>".to_string(),
            "50%",
        ),
        (
            "<cluster><memory_policy><over_commit><percent>1001</percent></over_commit></memory_policy></cluster>".to_string(),
            "100..=1000",
        ),
        (
            "<cluster><memory_policy><over_commit><percent>lots</percent></over_commit></memory_policy></cluster>".to_string(),
            "percent",
        ),
        (
            "<cluster><custom_scheduling_policy_properties><property><name>HighVmCnt</name><value>2</value></property></custom_scheduling_policy_properties></cluster>".to_string(),
            "HighVmCount",
        ),
        (
            "<cluster><custom_scheduling_policy_properties><property><name>HighUtilization</name><value>150</value></property></custom_scheduling_policy_properties></cluster>".to_string(),
            "more than 100",
        ),
        (
            "<cluster><custom_scheduling_policy_properties><property><name>SpmVmGrace</name><value>-1</value></property></custom_scheduling_policy_properties></cluster>".to_string(),
            "SpmVmGrace",
        ),
        (
            "<cluster><custom_scheduling_policy_properties><property><name>SpmVmGrace</name></property></custom_scheduling_policy_properties></cluster>".to_string(),
            "SpmVmGrace needs a",
        ),
        (
            "<cluster><migration><bandwidth><assignment_method>custom</assignment_method><custom_value>0</custom_value></bandwidth></migration></cluster>".to_string(),
            "1 to 100000",
        ),
        (
            "<cluster><migration><bandwidth><assignment_method>custom</assignment_method></bandwidth></migration></cluster>".to_string(),
            "custom_value",
        ),
        (
            "<cluster><migration><bandwidth><assignment_method>fast</assignment_method></bandwidth></migration></cluster>".to_string(),
            "expected auto",
        ),
        (
            "<cluster><migration><encrypted>maybe</encrypted></migration></cluster>".to_string(),
            "expected true, false or inherit",
        ),
        ("<cluster><name>unclosed</cluster>".to_string(), "not valid XML"),
    ] {
        let r = put(&c, &format!("clusters/{cl}"), &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert!(has(&r.body, says), "{body}: {}", r.body);
        let now = db.cluster_get(cl.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(now, before, "{body} changed the cluster");
    }
    // Migration bandwidth (oVirt's migration policy bandwidth): custom Mbps, back to auto.
    // The reply shows what was set, in the same words.
    for (method, stored) in [
        (
            "<assignment_method>custom</assignment_method><custom_value>800</custom_value>",
            Some(800),
        ),
        ("<assignment_method>auto</assignment_method>", None),
    ] {
        let body = format!("<cluster><migration><bandwidth>{method}</bandwidth></migration></cluster>");
        let r = put(&c, &format!("clusters/{cl}"), &body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(r.body.contains(method), "{}", r.body);
        let now = db.cluster_get(cl.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(now.migration_bandwidth_mbps, stored);
    }
    // Encrypted migrations: off by default, on, and `inherit` (the engine's default) off again.
    assert!(c
        .get(&format!("clusters/{cl}"))
        .await
        .body
        .contains("<encrypted>false</encrypted>"));
    for (value, stored) in [("true", true), ("inherit", false)] {
        let body = format!("<cluster><migration><encrypted>{value}</encrypted></migration></cluster>");
        let r = put(&c, &format!("clusters/{cl}"), &body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(
            r.body.contains(&format!("<encrypted>{stored}</encrypted>")),
            "{}",
            r.body
        );
        let now = db.cluster_get(cl.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(now.migration_encrypted, stored);
    }

    // A policy listing the known ones in its refusal.
    let r = put(
        &c,
        &format!("clusters/{cl}"),
        "<cluster><scheduling_policy><name>fastest</name></scheduling_policy></cluster>",
    )
    .await;
    assert!(
        has(&r.body, "power_saving") && has(&r.body, NONE_ID),
        "{}",
        r.body
    );
    // A cluster nobody has.
    let r = put(
        &c,
        &format!("clusters/{DEAD}"),
        "<cluster><scheduling_policy><name>none</name></scheduling_policy></cluster>",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Adds with a bad policy or overcommit create nothing.
    for body in [
        "<cluster><name>bad1</name><data_center><name>sdc</name></data_center><scheduling_policy><name>fastest</name></scheduling_policy></cluster>",
        "<cluster><name>bad1</name><data_center><name>sdc</name></data_center><memory_policy><over_commit><percent>99</percent></over_commit></memory_policy></cluster>",
    ] {
        let r = c.post("clusters", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(db.cluster_get_by_name("bad1").await.unwrap().is_none());
    }

    // JSON in and out, name in oVirt's mixed case.
    let r = c
        .api_with(
            Method::PUT,
            &format!("clusters/{cl}"),
            r#"{"scheduling_policy": {"name": "VM_Evenly_Distributed"}, "memory_policy": {"over_commit": {"percent": 200}}}"#,
            &[
                ("content-type", "application/json"),
                ("accept", "application/json"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let j = r.json();
    assert_eq!(j["scheduling_policy"]["name"], "vm_evenly_distributed");
    assert_eq!(j["memory_policy"]["over_commit"]["percent"], "200");
    let now = db.cluster_get(cl.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(
        (now.scheduling_policy.as_str(), now.memory_overcommit_percent),
        ("vm_evenly_distributed", 200)
    );

    // The cluster's own policy properties (oVirt's custom_scheduling_policy_properties): shown
    // back, used by the scheduler over the policy's defaults, and cleared by an empty element.
    let r = put(
        &c,
        &format!("clusters/{cl}"),
        "<cluster><custom_scheduling_policy_properties>\
           <property><name>HighVmCount</name><value> 2 </value></property>\
           <property><name>MigrationThreshold</name><value>2</value></property>\
         </custom_scheduling_policy_properties></cluster>",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        has(
            &r.body,
            "<property><name>HighVmCount</name><value>2</value></property>"
        ),
        "{}",
        r.body
    );
    let r = c.get(&format!("clusters/{cl}")).await;
    assert!(
        has(&r.body, "<name>MigrationThreshold</name><value>2</value>"),
        "{}",
        r.body
    );
    let snap = oxvirt_engine::scheduling::snapshot(t.engine.app(), cl.parse().unwrap())
        .await
        .unwrap();
    let p = snap.policy.properties;
    assert_eq!(
        (p.high_vm_count, p.migration_threshold, p.spm_vm_grace),
        (2, 2, 5)
    );
    let r = put(
        &c,
        &format!("clusters/{cl}"),
        "<cluster><custom_scheduling_policy_properties/></cluster>",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!has(&r.body, "custom_scheduling_policy_properties"), "{}", r.body);
    let snap = oxvirt_engine::scheduling::snapshot(t.engine.app(), cl.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(snap.policy.properties.high_vm_count, 10, "the default again");
    t.engine.shutdown().await;
}

async fn affinity_groups_and_their_vms(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    let db = &t.engine.app().db;
    add(&c, "datacenters", "<data_center><name>adc</name></data_center>").await;
    let ca = add(
        &c,
        "clusters",
        "<cluster><name>ca</name><data_center><name>adc</name></data_center></cluster>",
    )
    .await;
    let cb = add(
        &c,
        "clusters",
        "<cluster><name>cb</name><data_center><name>adc</name></data_center></cluster>",
    )
    .await;
    let a1 = add(&c, "vms", &vm_xml("a1", "ca")).await;
    let a2 = add(&c, "vms", &vm_xml("a2", "ca")).await;
    let b1 = add(&c, "vms", &vm_xml("b1", "cb")).await;
    let groups = format!("clusters/{ca}/affinitygroups");
    let members = |g: &str| {
        let g: oxvirt_engine::model::AffinityGroupId = g.parse().unwrap();
        async move { db.affinity_group_get(g).await.unwrap().map(|g| g.vm_ids) }
    };

    // Add with oVirt 4.4's vms_rule and a VM by name.
    let r = c
        .post(
            &groups,
            "<affinity_group><name>apart</name><description>keep them apart</description>\
             <vms_rule><enabled>true</enabled><positive>false</positive><enforcing>true</enforcing></vms_rule>\
             <vms><vm><name>a1</name></vm></vms></affinity_group>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let g = root_id(&r.body);
    let loc = r.headers.get("location").unwrap().to_str().unwrap();
    assert!(
        loc.ends_with(&format!("/clusters/{ca}/affinitygroups/{g}")),
        "{loc}"
    );
    assert_eq!(nested(&r.body, "vms_rule", "positive").as_deref(), Some("false"));
    assert_eq!(nested(&r.body, "vms_rule", "enforcing").as_deref(), Some("true"));
    assert_eq!(r.xml_text("description").as_deref(), Some("keep them apart"));
    assert!(
        r.body
            .contains(&format!("<vm href=\"/ovirt-engine/api/vms/{a1}\" id=\"{a1}\"/>")),
        "{}",
        r.body
    );
    // The scheduler gets it as a hard negative rule.
    let snap = oxvirt_engine::scheduling::snapshot(t.engine.app(), ca.parse().unwrap())
        .await
        .unwrap();
    let rule = snap.affinity_groups[0].vm_rule.unwrap();
    assert_eq!(rule.polarity, oxvirt_scheduler::Polarity::Negative);
    assert!(rule.enforcing);
    // A VM whose disk a job holds (a live move) is not migratable until the job ends.
    {
        use oxvirt_engine::model::{
            DiskAttachment, DiskFormat, DiskInterface, DiskStatus, SdType, StorageDomain, StorageType,
        };
        let sd = db
            .sd_insert(&StorageDomain::new(
                "held",
                SdType::Data,
                StorageType::Localfs,
                "/srv/held",
            ))
            .await
            .unwrap();
        let mut d = oxvirt_engine::model::Disk::new("held_disk", sd.id, DiskFormat::Cow, 1 << 20);
        d.status = DiskStatus::Locked;
        let d = db.disk_insert(&d).await.unwrap();
        let a2_id: VmId = a2.parse().unwrap();
        db.attachment_add(&DiskAttachment {
            vm_id: a2_id,
            disk_id: d.id,
            interface: DiskInterface::Virtio,
            bootable: false,
            active: true,
            read_only: false,
        })
        .await
        .unwrap();
        let snap = oxvirt_engine::scheduling::snapshot(t.engine.app(), ca.parse().unwrap())
            .await
            .unwrap();
        let migratable = |id: &str| {
            snap.vms
                .iter()
                .find(|v| v.id.to_string() == id)
                .unwrap()
                .migratable
        };
        assert!(!migratable(&a2) && migratable(&a1));
        db.attachment_remove(a2_id, d.id).await.unwrap();
        db.disk_delete(d.id).await.unwrap();
    }

    // The deprecated top-level positive/enforcing (oVirt < 4.4) still work.
    let r = c
        .post(
            &groups,
            "<affinity_group><name>together</name><positive>true</positive><enforcing>false</enforcing></affinity_group>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let g2 = root_id(&r.body);
    assert_eq!(nested(&r.body, "vms_rule", "positive").as_deref(), Some("true"));
    assert_eq!(nested(&r.body, "vms_rule", "enforcing").as_deref(), Some("false"));

    // Refused adds create nothing: a taken name, a VM of another cluster, an unknown VM,
    // a bad boolean, no name, a malformed body.
    for (body, status, says) in [
        (
            "<affinity_group><name>apart</name></affinity_group>".to_string(),
            StatusCode::CONFLICT,
            "already has an affinity group named apart",
        ),
        (
            format!("<affinity_group><name>mixed</name><vms><vm id=\"{b1}\"/></vms></affinity_group>"),
            StatusCode::BAD_REQUEST,
            "VM b1 is in cluster cb, not in affinity group mixed's cluster ca",
        ),
        (
            format!("<affinity_group><name>ghost</name><vms><vm id=\"{DEAD}\"/></vms></affinity_group>"),
            StatusCode::BAD_REQUEST,
            DEAD,
        ),
        (
            "<affinity_group><name>x</name><vms><vm id=\"nope\"/></vms></affinity_group>".to_string(),
            StatusCode::BAD_REQUEST,
            "not a UUID",
        ),
        (
            "<affinity_group><name>x</name><positive>maybe</positive></affinity_group>".to_string(),
            StatusCode::BAD_REQUEST,
            "true or false",
        ),
        (
            "<affinity_group><description>no name</description></affinity_group>".to_string(),
            StatusCode::BAD_REQUEST,
            "<name>",
        ),
        (
            "<affinity_group><name>x</affinity_group>".to_string(),
            StatusCode::BAD_REQUEST,
            "not valid XML",
        ),
    ] {
        let r = c.post(&groups, &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(has(&r.body, says), "{body}: {}", r.body);
        assert_eq!(
            db.affinity_groups_of_cluster(ca.parse().unwrap())
                .await
                .unwrap()
                .len(),
            2,
            "{body}"
        );
    }
    assert!(db
        .affinity_groups_of_cluster(cb.parse().unwrap())
        .await
        .unwrap()
        .is_empty());

    // List and get; under another cluster or with a wrong id it is not found.
    let r = c.get(&groups).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(count(&r.body, "affinity_group"), 2, "{}", r.body);
    assert_eq!(c.get(&format!("{groups}/{g}")).await.status, StatusCode::OK);
    for p in [
        format!("clusters/{cb}/affinitygroups/{g}"),
        format!("{groups}/{DEAD}"),
        format!("{groups}/not-a-uuid"),
        format!("clusters/{DEAD}/affinitygroups"),
    ] {
        let r = c.get(&p).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{p}: {}", r.body);
    }

    // Members: add by id, list, refuse a duplicate and another cluster's VM, remove.
    let vms = format!("{groups}/{g}/vms");
    let r = c.post(&vms, &format!("<vm id=\"{a2}\"/>")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(root_id(&r.body), a2);
    let r = c.get(&vms).await;
    assert_eq!(count(&r.body, "vm"), 2, "{}", r.body);
    let r = c.post(&vms, "<vm><name>a2</name></vm>").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(has(&r.body, "already in affinity group apart"), "{}", r.body);
    let r = c.post(&vms, &format!("<vm id=\"{b1}\"/>")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(has(&r.body, "VM b1 is in cluster cb"), "{}", r.body);
    let r = c.post(&vms, "<vm><name>nosuch</name></vm>").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = c.post(&vms, "<vm/>").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let mut want: Vec<VmId> = vec![a1.parse().unwrap(), a2.parse().unwrap()];
    want.sort();
    assert_eq!(members(&g).await.unwrap(), want);
    let r = c.api(Method::DELETE, &format!("{vms}/{a1}"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = c.api(Method::DELETE, &format!("{vms}/{a1}"), "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(members(&g).await.unwrap(), vec![a2.parse::<VmId>().unwrap()]);

    // Update: rename, disable the rule (the scheduler then ignores the group), replace members.
    let r = put(
        &c,
        &format!("{groups}/{g}"),
        &format!(
            "<affinity_group><name>apart2</name><vms_rule><enabled>false</enabled></vms_rule>\
             <vms><vm id=\"{a1}\"/><vm id=\"{a2}\"/></vms></affinity_group>"
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("name").as_deref(), Some("apart2"));
    assert_eq!(nested(&r.body, "vms_rule", "enabled").as_deref(), Some("false"));
    assert_eq!(nested(&r.body, "vms_rule", "positive").as_deref(), Some("false"));
    assert_eq!(members(&g).await.unwrap(), want);
    let snap = oxvirt_engine::scheduling::snapshot(t.engine.app(), ca.parse().unwrap())
        .await
        .unwrap();
    let apart = snap.affinity_groups.iter().find(|x| x.name == "apart2").unwrap();
    assert!(apart.vm_rule.is_none());

    // Refused updates change nothing: the other group's name, another cluster's VM.
    let before = db.affinity_group_get(g.parse().unwrap()).await.unwrap();
    for (body, status) in [
        (
            "<affinity_group><name>together</name></affinity_group>".to_string(),
            StatusCode::CONFLICT,
        ),
        (
            format!(
                "<affinity_group><description>x</description><vms><vm id=\"{b1}\"/></vms></affinity_group>"
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "<affinity_group><enforcing>yes</enforcing></affinity_group>".to_string(),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let r = put(&c, &format!("{groups}/{g}"), &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(
            db.affinity_group_get(g.parse().unwrap()).await.unwrap(),
            before,
            "{body}"
        );
    }
    let r = put(
        &c,
        &format!("clusters/{cb}/affinitygroups/{g}"),
        "<affinity_group><name>moved</name></affinity_group>",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // JSON.
    let r = c
        .api_with(
            Method::GET,
            &format!("{groups}/{g2}"),
            "",
            &[("accept", "application/json")],
        )
        .await;
    assert_eq!(r.json()["vms_rule"]["positive"], "true");

    // Remove: the group goes, its VMs stay.
    let r = c.api(Method::DELETE, &format!("{groups}/{g}"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        c.get(&format!("{groups}/{g}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.api(Method::DELETE, &format!("{groups}/{g}"), "").await.status,
        StatusCode::NOT_FOUND
    );
    assert!(db.vm_get(a1.parse().unwrap()).await.unwrap().is_some());
    assert_eq!(
        db.affinity_groups_of_cluster(ca.parse().unwrap())
            .await
            .unwrap()
            .len(),
        1
    );
    t.engine.shutdown().await;
}

/// A fence agent as a real script: it appends its arguments and standard input to `log`,
/// keeps the power state in `power` (on unless told off) and exits 2 for `status` when off.
fn agent_script(dir: &Path) -> PathBuf {
    let p = dir.join("fence-agent.sh");
    let log = dir.join("log");
    let power = dir.join("power");
    std::fs::write(
        &p,
        format!(
            r#"#!/bin/sh
read line
echo "$* | $line" >> {log}
for last; do :; done
case "$last" in
  on) echo on > {power};;
  off) echo off > {power};;
  status) [ "$(cat {power} 2>/dev/null)" = off ] && exit 2; exit 0;;
  *) exit 1;;
esac
"#,
            log = log.display(),
            power = power.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn log_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn fence_agents_and_the_fence_action(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    let db = &t.engine.app().db;
    let dir = tempfile::tempdir().unwrap();
    let script = agent_script(dir.path());
    add(&c, "datacenters", "<data_center><name>fdc</name></data_center>").await;
    add(
        &c,
        "clusters",
        "<cluster><name>fcl</name><data_center><name>fdc</name></data_center></cluster>",
    )
    .await;
    // An address nothing listens on: the host stays unreachable whatever monitoring does.
    let h = add(
        &c,
        "hosts",
        "<host><name>fh</name><address>127.0.0.1</address><port>9</port><cluster><name>fcl</name></cluster></host>",
    )
    .await;
    let hid: HostUuid = h.parse().unwrap();
    let vm = add(&c, "vms", &vm_xml("fvm", "fcl")).await;
    let vid: VmId = vm.parse().unwrap();
    let agents = format!("hosts/{h}/fenceagents");
    let pm_enabled = |body: &str| nested(body, "power_management", "enabled");

    let r = c.get(&format!("hosts/{h}")).await;
    assert_eq!(pm_enabled(&r.body).as_deref(), Some("false"), "{}", r.body);
    let r = c.get(&agents).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(count(&r.body, "agent"), 0, "{}", r.body);
    // Without an agent the power actions are refused; status too.
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>status</fence_type></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(has(&r.body, "host fh has no fence agent"), "{}", r.body);

    // Refused agents leave the host without one.
    for (body, says) in [
        ("<agent><type>script</type></agent>".to_string(), "needs the option command"),
        (
            "<agent><type>script</type><options><option><name>command</name><value>fence-agent.sh</value></option></options></agent>".to_string(),
            "must be an absolute path",
        ),
        (
            format!("<agent><type>script</type><options><option><name>command</name><value>{}</value></option></options></agent>", dir.path().join("log").display()),
            "is not an executable file",
        ),
        ("<agent><type>nosuchkind</type></agent>".to_string(), "no program fence_nosuchkind"),
        ("<agent><type>../../bin/sh</type></agent>".to_string(), "is not a word"),
        ("<agent><address>10.0.0.9</address></agent>".to_string(), "<type>"),
        (format!("<agent><type>script</type><port>70000</port><options><option><name>command</name><value>{}</value></option></options></agent>", script.display()), "70000"),
        (format!("<agent><type>script</type><options><option><name>command</name><value>{}</value></option><option><name>bad name</name><value>1</value></option></options></agent>", script.display()), "bad name"),
        ("<agent><type>script</agent>".to_string(), "not valid XML"),
    ] {
        let r = c.post(&agents, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert!(has(&r.body, says), "{body}: {}", r.body);
        assert!(oxvirt_engine::fence::agent_of(t.engine.app(), hid).await.unwrap().is_none(), "{body}");
    }
    assert_eq!(
        c.post(
            &format!("hosts/{DEAD}/fenceagents"),
            "<agent><type>script</type></agent>"
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );

    // The agent: oVirt's fields become the script's arguments.
    let body = format!(
        "<agent><type>script</type><address>10.0.0.9</address><username>admin</username><password>pw 1</password>\
         <port>623</port><options><option><name>command</name><value>{}</value></option>\
         <option><name>lanplus</name><value>1</value></option><option><name>verbose</name><value></value></option></options></agent>",
        script.display()
    );
    let r = c.post(&agents, &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(root_id(&r.body), h);
    assert!(!has(&r.body, "pw 1"), "the password is shown: {}", r.body);
    assert_eq!(r.xml_text("address").as_deref(), Some("10.0.0.9"));
    assert_eq!(r.xml_text("port").as_deref(), Some("623"));
    let stored = oxvirt_engine::fence::agent_of(t.engine.app(), hid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.command,
        [
            script.display().to_string(),
            "--ip=10.0.0.9".into(),
            "--username=admin".into(),
            "--password=pw 1".into(),
            "--ipport=623".into(),
            "--lanplus=1".into(),
            "--verbose".into(),
        ]
    );
    // One agent per host.
    let r = c.post(&agents, &body).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(has(&r.body, "already has a fence agent"), "{}", r.body);
    let r = c.get(&agents).await;
    assert_eq!(count(&r.body, "agent"), 1, "{}", r.body);
    assert!(!has(&r.body, "pw 1"));
    let r = c.get(&format!("hosts/{h}")).await;
    assert_eq!(pm_enabled(&r.body).as_deref(), Some("true"), "{}", r.body);
    let r = c.get("hosts").await;
    assert_eq!(pm_enabled(&r.body).as_deref(), Some("true"), "{}", r.body);
    for p in [
        format!("{agents}/{DEAD}"),
        format!("{agents}/x"),
        format!("hosts/{DEAD}/fenceagents/{DEAD}"),
    ] {
        assert_eq!(c.get(&p).await.status, StatusCode::NOT_FOUND, "{p}");
    }

    // Update: the port changes, the password is kept; a bad change changes nothing.
    let r = put(&c, &format!("{agents}/{h}"), "<agent><port>624</port></agent>").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("port").as_deref(), Some("624"));
    let stored = oxvirt_engine::fence::agent_of(t.engine.app(), hid)
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.command.contains(&"--ipport=624".to_string())
            && stored.command.contains(&"--password=pw 1".to_string())
    );
    let r = put(
        &c,
        &format!("{agents}/{h}"),
        "<agent><type>nosuchkind</type></agent>",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(
        oxvirt_engine::fence::agent_of(t.engine.app(), hid)
            .await
            .unwrap()
            .unwrap(),
        stored
    );

    // fence: a missing or unknown type is refused without running the agent.
    for body in ["<action/>", "<action><fence_type>reboot</fence_type></action>"] {
        let r = c.post(&format!("hosts/{h}/fence"), body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert!(
            has(&r.body, "fence_type") || has(&r.body, "fence type"),
            "{}",
            r.body
        );
    }
    assert!(log_lines(dir.path()).is_empty());

    // status: on, with the agent's arguments and the action on stdin.
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>status</fence_type></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        nested(&r.body, "power_management", "status").as_deref(),
        Some("on"),
        "{}",
        r.body
    );
    assert_eq!(
        log_lines(dir.path()),
        ["--ip=10.0.0.9 --username=admin --password=pw 1 --ipport=624 --lanplus=1 --verbose status | action=status"]
    );

    // stop: powered off, the host down, its VMs down as gone from it.
    db.vm_set_runtime(
        vid,
        &[VmStatus::Down],
        &VmRuntime {
            status: VmStatus::Up,
            run_on_host: Some(hid),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>stop</fence_type></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let host = db.host_get(hid).await.unwrap().unwrap();
    assert_eq!(host.status, HostStatus::Down);
    let v = db.vm_get(vid).await.unwrap().unwrap();
    assert_eq!(v.runtime.status, VmStatus::Down);
    assert!(v.runtime.status_detail.unwrap().contains("gone from its host"));
    assert!(log_lines(dir.path())
        .iter()
        .any(|l| l.ends_with("off | action=off")));
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>status</fence_type></action>",
        )
        .await;
    assert_eq!(
        nested(&r.body, "power_management", "status").as_deref(),
        Some("off"),
        "{}",
        r.body
    );

    // start: powered on, handed to monitoring.
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>start</fence_type></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(log_lines(dir.path()).last().unwrap().ends_with("on | action=on"));
    let host = db.host_get(hid).await.unwrap().unwrap();
    assert_ne!(host.status, HostStatus::Down);

    // manual: only for a host that does not respond; it then is down and its VMs gone.
    // (Maintenance: a status monitoring leaves alone, so the refusal is deterministic.)
    db.host_set_status(hid, &[], HostStatus::Maintenance, None)
        .await
        .unwrap();
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>manual</fence_type></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(has(&r.body, "host fh is maintenance"), "{}", r.body);
    assert_eq!(
        db.host_get(hid).await.unwrap().unwrap().status,
        HostStatus::Maintenance
    );
    db.host_set_status(hid, &[], HostStatus::NonResponsive, Some("test: unreachable"))
        .await
        .unwrap();
    db.vm_set_runtime(
        vid,
        &[VmStatus::Down],
        &VmRuntime {
            status: VmStatus::Unknown,
            run_on_host: Some(hid),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>manual</fence_type></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let host = db.host_get(hid).await.unwrap().unwrap();
    assert_eq!(host.status, HostStatus::Down);
    assert!(host.status_detail.unwrap().contains("confirmed"));
    let v = db.vm_get(vid).await.unwrap().unwrap();
    assert_eq!(v.runtime.status, VmStatus::Down);
    assert!(v
        .runtime
        .status_detail
        .unwrap()
        .contains("gone from its host (an administrator confirmed"));

    // Remove the agent: power management is off again.
    let r = c.api(Method::DELETE, &format!("{agents}/{h}"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        c.api(Method::DELETE, &format!("{agents}/{h}"), "").await.status,
        StatusCode::NOT_FOUND
    );
    let r = c.get(&format!("hosts/{h}")).await;
    assert_eq!(pm_enabled(&r.body).as_deref(), Some("false"), "{}", r.body);
    let r = c
        .post(
            &format!("hosts/{h}/fence"),
            "<action><fence_type>start</fence_type></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    t.engine.shutdown().await;
}

/// The monitor applies a node's VM report over the rows it read before asking the node: a VM a
/// command changed meanwhile keeps the command's word (a resume that lands between the poll's
/// question and its answer), while a report about an unchanged VM settles it.
async fn a_poll_answered_before_a_command_never_undoes_it(backend: Backend) {
    use oxvirt_engine::model::Host;
    use oxvirt_engine::monitor::{reconcile_vms, HostView};
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    add(&c, "datacenters", "<data_center><name>dc</name></data_center>").await;
    add(
        &c,
        "clusters",
        "<cluster><name>cl</name><data_center><name>dc</name></data_center></cluster>",
    )
    .await;
    let vm: VmId = add(&c, "vms", &vm_xml("vm1", "cl")).await.parse().unwrap();
    let app = t.engine.app();
    let db = &app.db;
    let cluster = db.vm_get(vm).await.unwrap().unwrap().cluster_id;
    // A host that never enrolled: the monitor's own rounds leave it alone.
    let h = db
        .host_insert(&Host::new("h", "127.0.0.1", 1, cluster))
        .await
        .unwrap();
    let on_h = |status| VmRuntime {
        status,
        run_on_host: Some(h.id),
        ..Default::default()
    };
    db.vm_set_runtime(vm, &[], &on_h(VmStatus::Paused)).await.unwrap();
    let node = app.client(&h).unwrap();
    let report = |state: &str| serde_json::json!([{ "vmID": vm, "status": { "state": state } }]);
    let now = || async { db.vm_get(vm).await.unwrap().unwrap().runtime };

    // Asked while paused; resumed by a command before the answer is applied: the resume stands.
    let before = HostView::read(app, h.id).await.unwrap();
    db.vm_set_runtime(vm, &[VmStatus::Paused], &on_h(VmStatus::Up))
        .await
        .unwrap();
    reconcile_vms(app, &h, &node, &report("paused"), before)
        .await
        .unwrap();
    assert_eq!(
        now().await.status,
        VmStatus::Up,
        "an older report undid the resume"
    );
    // The same report read after the command is the node's newer word: it settles.
    let before = HostView::read(app, h.id).await.unwrap();
    reconcile_vms(app, &h, &node, &report("paused"), before)
        .await
        .unwrap();
    assert_eq!(now().await.status, VmStatus::Paused);

    // The disks a running VM's QEMU has are the node's word too (an engine that died between
    // the node's plug and its own row leaves the row behind) — unless a command changed the
    // row meanwhile.
    use oxvirt_engine::model::{DiskAttachment, DiskInterface};
    let (sd, disks) = rest_common::db_disks(db, &["d1", "d2", "d3"]).await;
    for (d, active) in disks.iter().zip([true, false, true]) {
        db.attachment_add(&DiskAttachment {
            vm_id: vm,
            disk_id: *d,
            interface: DiskInterface::Virtio,
            bootable: false,
            active,
            read_only: false,
        })
        .await
        .unwrap();
    }
    let with_disks = |imgs: &[&oxvirt_engine::model::DiskId]| {
        let disks: Vec<_> = imgs
            .iter()
            .enumerate()
            .map(|(slot, d)| serde_json::json!({ "image": { "sd": sd, "img": d }, "slot": slot }))
            .collect();
        serde_json::json!([{ "vmID": vm, "status": { "state": "paused" }, "disks": disks }])
    };
    let active = || async {
        let mut a = Vec::new();
        for d in &disks {
            a.push(db.attachment_get(vm, *d).await.unwrap().unwrap().active);
        }
        a
    };
    // The node has d2 and d3: d1 was unplugged, d2 plugged; d3 was deactivated by a command
    // after the poll asked, so it stays as the command left it.
    let before = HostView::read(app, h.id).await.unwrap();
    let mut d3 = db.attachment_get(vm, disks[2]).await.unwrap().unwrap();
    d3.active = false;
    db.attachment_update(&d3).await.unwrap();
    reconcile_vms(app, &h, &node, &with_disks(&[&disks[1], &disks[2]]), before)
        .await
        .unwrap();
    assert_eq!(active().await, [false, true, false]);
    // A report without its disk list changes none, nor does a disk still being plugged.
    let before = HostView::read(app, h.id).await.unwrap();
    reconcile_vms(app, &h, &node, &report("paused"), before)
        .await
        .unwrap();
    assert_eq!(active().await, [false, true, false]);
    let mut plugging = with_disks(&[&disks[0], &disks[1]]);
    plugging[0]["disks"][0]["pending"] = true.into();
    let before = HostView::read(app, h.id).await.unwrap();
    reconcile_vms(app, &h, &node, &plugging, before).await.unwrap();
    assert_eq!(active().await, [false, true, false]);
    for d in &disks {
        db.attachment_remove(vm, *d).await.unwrap();
    }

    // Missing from a report asked before a resume: not taken for gone.
    let before = HostView::read(app, h.id).await.unwrap();
    db.vm_set_runtime(vm, &[VmStatus::Paused], &on_h(VmStatus::Up))
        .await
        .unwrap();
    reconcile_vms(app, &h, &node, &serde_json::json!([]), before)
        .await
        .unwrap();
    assert_eq!(now().await.status, VmStatus::Up);
    // Missing from a later one: gone from its host, down.
    let before = HostView::read(app, h.id).await.unwrap();
    reconcile_vms(app, &h, &node, &serde_json::json!([]), before)
        .await
        .unwrap();
    let rt = now().await;
    assert_eq!(
        (rt.status, rt.status_detail.as_deref()),
        (VmStatus::Down, Some("gone from its host"))
    );
}

/// A host an earlier engine left preparing for maintenance (it stopped while emptying the
/// host) is not left so: the next engine's start resumes the maintenance to its end.
async fn maintenance_an_engine_left_half_done_goes_on(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    add(&c, "datacenters", "<data_center><name>mdc</name></data_center>").await;
    let cl: ClusterId = add(
        &c,
        "clusters",
        "<cluster><name>mcl</name><data_center><name>mdc</name></data_center></cluster>",
    )
    .await
    .parse()
    .unwrap();
    let db = &t.engine.app().db;
    let h = db
        .host_insert(&Host::new("hm", "127.0.0.1", 1, cl))
        .await
        .unwrap();
    db.host_set_status(
        h.id,
        &[],
        HostStatus::PreparingForMaintenance,
        Some("moving its VMs"),
    )
    .await
    .unwrap();
    let resumed = t.engine.cmds.resume_interrupted_maintenance().await.unwrap();
    assert_eq!(resumed, vec![h.id]);
    let start = std::time::Instant::now();
    loop {
        let now = db.host_get(h.id).await.unwrap().unwrap().status;
        if now == HostStatus::Maintenance {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "host is {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t
        .engine
        .cmds
        .resume_interrupted_maintenance()
        .await
        .unwrap()
        .is_empty());
    t.engine.shutdown().await;
}

both_backends!(
    cluster_scheduling_policy_and_overcommit,
    affinity_groups_and_their_vms,
    fence_agents_and_the_fence_action,
    a_poll_answered_before_a_command_never_undoes_it,
    maintenance_an_engine_left_half_done_goes_on
);
