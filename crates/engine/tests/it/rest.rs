//! The REST API v4 over the engine's real HTTPS listener with a real database — each test runs
//! on SQLite and on PostgreSQL (`<test>::sqlite`, `<test>::postgres`): SSO, status codes,
//! faults, search, follow, JSON, actions on objects that need no node.

use crate::rest_common;

use crate::common::{start_engine_on, Backend};
use http::{Method, StatusCode};
use rest_common::{count, root_id, start_engine, Client};

fn vm_xml(name: &str, cluster: &str) -> String {
    format!(
        "<vm><name>{name}</name><cluster><name>{cluster}</name></cluster><template><name>Blank</name></template>\
         <memory>268435456</memory><cpu><topology><cores>2</cores><sockets>1</sockets><threads>1</threads></topology></cpu>\
         <os><kernel>/k</kernel><cmdline>console=ttyS0</cmdline></os></vm>"
    )
}

async fn sso_tokens_and_authentication(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);

    // Bad credentials: 400, JSON, error_code + error.
    let r = c
        .send(
            Method::POST,
            "/ovirt-engine/sso/oauth/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            "grant_type=password&scope=ovirt-app-api&username=admin%40internal&password=wrong",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.content_type(), "application/json");
    let j = r.json();
    assert_eq!(j["error_code"], "access_denied");
    assert!(j["error"].as_str().unwrap().contains("admin@internal"), "{j}");
    let r = c
        .send(
            Method::POST,
            "/ovirt-engine/sso/oauth/token",
            &[],
            "grant_type=client_credentials&username=admin&password=x",
        )
        .await;
    assert_eq!(r.json()["error_code"], "unsupported_grant_type");

    // No token: 401 with a fault.
    let r = c
        .send(Method::GET, "/ovirt-engine/api", &[("version", "4")], "")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body.contains("<fault>") && r.body.contains("<reason>Unauthorized</reason>"),
        "{}",
        r.body
    );

    c.login().await;
    let r = c.get("/ovirt-engine/api").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.content_type(), "application/xml");
    assert_eq!(r.headers.get("version").unwrap(), "4");
    for el in [
        "product_info",
        "special_objects",
        "summary",
        "time",
        "authenticated_user",
    ] {
        assert!(r.body.contains(&format!("<{el}")), "{el} missing: {}", r.body);
    }
    assert!(r.body.contains(
        "<blank_template href=\"/ovirt-engine/api/templates/00000000-0000-0000-0000-000000000000\""
    ));
    assert_eq!(r.xml_text("major").as_deref(), Some("4"));
    let time = r.xml_text("time").unwrap();
    assert!(
        time.ends_with('Z') && time.len() == 24 && time.as_bytes()[10] == b'T',
        "{time}"
    );

    // The user the token stands for.
    let users = c.get("users").await;
    assert_eq!(users.status, StatusCode::OK);
    assert_eq!(users.xml_text("user_name").as_deref(), Some("admin@internal"));
    let uid = {
        let b = &users.body;
        let i = b.find("<user href").unwrap();
        root_id(&format!("?>{}", &b[i..]))
    };
    let r = c.get(&format!("users/{uid}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.xml_text("name").as_deref(), Some("admin"));

    // HTTP Basic works without a token; a wrong password does not.
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("admin@internal:{}", rest_common::ADMIN_PASSWORD))
    );
    let r = c
        .send(
            Method::GET,
            "/ovirt-engine/api/datacenters",
            &[("authorization", &basic)],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let bad = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin@internal:nope")
    );
    let r = c
        .send(
            Method::GET,
            "/ovirt-engine/api/datacenters",
            &[("authorization", &bad)],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Logout revokes the token: the next request is a 401 (the SDK then logs in again).
    let token = c.token.clone().unwrap();
    let r = c
        .send(
            Method::POST,
            "/ovirt-engine/services/sso-logout",
            &[],
            &format!("scope=&token={token}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "application/json");
    assert_eq!(r.json(), serde_json::json!({}));
    let r = c.get("datacenters").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    c.login().await;
    assert_eq!(c.get("datacenters").await.status, StatusCode::OK);
    t.engine.shutdown().await;
}

async fn collections_status_codes_and_faults(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;

    // Add: 201, Location, the entity with id and href.
    let r = c
        .post(
            "datacenters",
            "<data_center><name>dc1</name><description>first</description><local>false</local>\
             <version><major>4</major><minor>7</minor></version></data_center>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let dc = root_id(&r.body);
    let loc = r.headers.get("location").unwrap().to_str().unwrap().to_string();
    assert_eq!(loc, format!("/ovirt-engine/api/datacenters/{dc}"));
    assert!(r.body.contains(&format!("href=\"{loc}\"")));
    assert!(
        r.body.contains("<link href=\"") && r.body.contains("rel=\"storagedomains\""),
        "{}",
        r.body
    );
    assert_eq!(r.xml_text("status").as_deref(), Some("uninitialized"));

    // The same name again: 409 with a fault; no name: 400; a body that is not XML: 400.
    let r = c
        .post("datacenters", "<data_center><name>dc1</name></data_center>")
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.body.contains("<fault><reason>") && r.body.contains("<detail>"),
        "{}",
        r.body
    );
    let r = c
        .post(
            "datacenters",
            "<data_center><description>x</description></data_center>",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("needs &lt;name&gt;"), "{}", r.body);
    let r = c.post("datacenters", "<data_center><name>x</name>").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Unknown ids and paths: 404; a known path with another method: 405.
    let r = c.get("datacenters/5b0e9b3c-0000-4000-8000-000000000000").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        c.get("datacenters/not-a-uuid").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(c.get("nothing/here").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        c.api(Method::PATCH, "datacenters", "").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    // JSON in and out.
    let r = c
        .api_with(
            Method::POST,
            "clusters",
            r#"{"name":"cl-1","data_center":{"id":"DC"},"cpu":{"type":"qemu64","architecture":"x86_64"}}"#
                .replace("DC", &dc)
                .as_str(),
            &[
                ("content-type", "application/json"),
                ("accept", "application/json"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.content_type(), "application/json");
    let j = r.json();
    assert_eq!(j["name"], "cl-1");
    assert_eq!(j["data_center"]["id"], dc.as_str());
    assert_eq!(j["cpu"]["type"], "qemu64");
    let cl = j["id"].as_str().unwrap().to_string();
    let r = c
        .api_with(Method::GET, "datacenters", "", &[("accept", "application/json")])
        .await;
    let j = r.json();
    assert_eq!(j["data_center"][0]["name"], "dc1");
    assert_eq!(j["data_center"][0]["local"], "false");
    assert!(j["data_center"][0]["link"].as_array().unwrap().len() >= 2);

    // Update, follow, sub-collections.
    let r = c
        .api(
            Method::PUT,
            &format!("datacenters/{dc}"),
            "<data_center><description>renamed</description></data_center>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.xml_text("description").as_deref(), Some("renamed"));
    let r = c.get(&format!("datacenters/{dc}?follow=clusters")).await;
    assert!(
        r.body.contains("<clusters><cluster href=") && r.body.contains("<name>cl-1</name>"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("rel=\"clusters\""));
    let r = c.get(&format!("datacenters/{dc}/clusters")).await;
    assert_eq!(count(&r.body, "cluster"), 1, "{}", r.body);
    assert_eq!(
        c.get("datacenters?follow=nonsense").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        c.get(&format!("datacenters/{dc}/storagedomains")).await.status,
        StatusCode::OK
    );

    // Hosts: added by name and address (the node enrolls later), searchable, removable.
    let r = c
        .post(
            "hosts",
            "<host><name>h1</name><address>127.0.0.1:54999</address><root_password>x</root_password>\
             <cluster><name>cl-1</name></cluster></host>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let h1 = root_id(&r.body);
    assert_eq!(r.xml_text("address").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.xml_text("port").as_deref(), Some("54999"));
    let r = c.get("hosts?search=name%3Dh1+and+cluster%3D%22cl-1%22").await;
    assert_eq!(count(&r.body, "host"), 1, "{}", r.body);
    let r = c.get("hosts?search=status%3Dup").await;
    assert_eq!(count(&r.body, "host"), 0, "{}", r.body);
    let r = c.post(&format!("hosts/{h1}/deactivate"), "<action/>").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("status").as_deref(), Some("complete"));
    let r = c.api(Method::DELETE, &format!("hosts/{h1}"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("status").as_deref(), Some("complete"));
    assert_eq!(c.get(&format!("hosts/{h1}")).await.status, StatusCode::NOT_FOUND);

    // A cluster in use cannot go; an empty data center can (DELETE: 200 with an <action>).
    let r = c.api(Method::DELETE, &format!("datacenters/{dc}"), "").await;
    assert_ne!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        c.api(Method::DELETE, &format!("clusters/{cl}"), "").await.status,
        StatusCode::OK
    );
    let r = c
        .api(Method::DELETE, &format!("datacenters/{dc}?force=true"), "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.contains("<action><status>complete</status></action>"),
        "{}",
        r.body
    );
    assert_eq!(
        c.get(&format!("datacenters/{dc}")).await.status,
        StatusCode::NOT_FOUND
    );

    // The description of what is served.
    let r = c.get("openapi.json").await;
    assert_eq!(r.content_type(), "application/json");
    assert_eq!(r.json(), oxvirt_engine::rest::openapi::document());
    t.engine.shutdown().await;
}

async fn vms_search_follow_actions_jobs_and_events(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    assert_eq!(
        c.post("datacenters", "<data_center><name>Default</name></data_center>")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        c.post(
            "clusters",
            "<cluster><name>Default</name><data_center><name>Default</name></data_center></cluster>"
        )
        .await
        .status,
        StatusCode::CREATED
    );
    let first_event = c.get("events?max=1").await;
    let from = first_event
        .body
        .find("<event href")
        .map(|i| root_id(&format!("?>{}", &first_event.body[i..])))
        .unwrap_or_else(|| "0".into());

    let mut ids = Vec::new();
    for n in ["web1", "web2", "web3", "db1", "my.vm"] {
        let r = c
            .api_with(
                Method::POST,
                "vms",
                &vm_xml(n, "Default"),
                &[("correlation-id", &format!("corr-{}", n.replace(' ', "_")))],
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.xml_text("status").as_deref(), Some("down"));
        assert_eq!(r.xml_text("memory").as_deref(), Some("268435456"));
        assert_eq!(r.xml_text("cores").as_deref(), Some("2"));
        assert_eq!(r.xml_text("kernel").as_deref(), Some("/k"));
        ids.push(root_id(&r.body));
    }
    let r = c.post("vms", &vm_xml("web1", "Default")).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = c.post("vms", &vm_xml("x", "NoSuchCluster")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Search: wildcards, quotes, and, or, status, sortby, max, page, case_sensitive.
    let names = |body: &str| -> Vec<String> {
        body.split("<vm href")
            .skip(1)
            .map(|s| rest_common::xml_text(s, "name").unwrap())
            .collect()
    };
    let r = c.get("vms?search=name%3Dweb*").await;
    assert_eq!(names(&r.body), ["web1", "web2", "web3"]);
    let r = c.get("vms?search=name%3D%22my.vm%22").await;
    assert_eq!(names(&r.body), ["my.vm"]);
    let r = c
        .get("vms?search=name=web*+and+status=down+sortby+name+desc")
        .await;
    assert_eq!(names(&r.body), ["web3", "web2", "web1"]);
    let r = c.get("vms?search=sortby+name+asc+page+2&max=2").await;
    assert_eq!(names(&r.body), ["web1", "web2"]);
    let r = c.get("vms?max=1").await;
    assert_eq!(names(&r.body).len(), 1);
    let r = c.get("vms?search=status%3Dup").await;
    assert!(names(&r.body).is_empty());
    let r = c.get("vms?search=name%3DWEB1").await;
    assert!(names(&r.body).is_empty());
    let r = c.get("vms?search=name%3DWEB1&case_sensitive=false").await;
    assert_eq!(names(&r.body), ["web1"]);
    let r = c
        .get("vms?search=cluster%3DDefault+and+datacenter%3DDefault+and+name%3Ddb1")
        .await;
    assert_eq!(names(&r.body), ["db1"]);
    let r = c.get("vms?search=storage.name%3Dnone").await;
    assert!(names(&r.body).is_empty(), "{}", r.body);
    let r = c.get("vms?search=colour%3Dblue").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("colour"), "{}", r.body);
    // `and` binds tighter than `or`; each alternative is searched whole, paging applies to
    // the union, and an unknown field in any alternative is refused.
    let r = c
        .get("vms?search=name%3Dweb1+or+name%3Ddb*+and+cluster%3DDefault+or+name%3Dnone+sortby+name+desc")
        .await;
    assert_eq!(names(&r.body), ["web1", "db1"], "{}", r.body);
    let r = c
        .get("vms?search=name%3Dweb*+or+name%3Dmy.vm+sortby+name&max=2")
        .await;
    assert_eq!(names(&r.body), ["my.vm", "web1"]);
    let r = c.get("vms?search=name%3Dweb1+or+colour%3Dblue").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        c.get("vms?search=name%3Da+or").await.status,
        StatusCode::BAD_REQUEST
    );

    // NICs and follow.
    let vm = &ids[0];
    let r = c
        .post(
            &format!("vms/{vm}/nics"),
            "<nic><name>nic1</name><interface>virtio</interface></nic>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let mac = r.xml_text("address").unwrap();
    assert!(mac.starts_with("56:6f:"), "{mac}");
    let r = c
        .get(&format!("vms/{vm}?follow=nics,snapshots,disk_attachments"))
        .await;
    assert!(r.body.contains("<nics><nic href="), "{}", r.body);
    assert!(
        r.body.contains("<snapshot_type>active</snapshot_type>"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("<disk_attachments></disk_attachments>"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("rel=\"nics\""));
    let r = c.get(&format!("vms/{vm}/snapshots")).await;
    assert_eq!(count(&r.body, "snapshot"), 1, "{}", r.body);
    // `max` bounds a sub-collection too; a bad one is refused.
    let r = c.get(&format!("vms/{vm}/snapshots?max=0")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "snapshot"), 0, "{}", r.body);
    let r = c.get(&format!("vms/{vm}/snapshots?max=many")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = c.get(&format!("vms/{vm}")).await;
    for rel in ["diskattachments", "nics", "snapshots"] {
        let link = format!("<link href=\"/ovirt-engine/api/vms/{vm}/{rel}\" rel=\"{rel}\"/>");
        assert!(r.body.contains(&link), "{link}: {}", r.body);
    }
    assert!(r
        .body
        .contains("<template href=\"/ovirt-engine/api/templates/00000000-0000-0000-0000-000000000000\""));

    // Actions on a VM that is down, with no host up: clear faults, nothing changes.
    let r = c.post(&format!("vms/{vm}/suspend"), "<action/>").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = c.post(&format!("vms/{vm}/start"), "<action/>").await;
    assert!(r.status.is_client_error(), "{}", r.body);
    assert!(r.body.contains("<fault>"), "{}", r.body);
    let r = c
        .post(&format!("vms/{vm}/stop"), "<action><force>true</force></action>")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("status").as_deref(), Some("complete"));
    let snap_active = {
        let r = c.get(&format!("vms/{vm}/snapshots")).await;
        let i = r.body.find("<snapshot href").unwrap();
        root_id(&format!("?>{}", &r.body[i..]))
    };
    let r = c
        .post(
            &format!("vms/{vm}/previewsnapshot"),
            &format!("<action><snapshot id=\"{snap_active}\"/></action>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body); // the active snapshot is no preview
                                                                 // A VM from a snapshot: a regular one, named by a UUID that exists, one at a time; each
                                                                 // refusal leaves no VM behind.
    let vms_before = count(&c.get("vms").await.body, "vm");
    for (snaps, want) in [
        (
            format!("<snapshot id=\"{snap_active}\"/>"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "<snapshot id=\"not-a-uuid\"/>".to_string(),
            StatusCode::BAD_REQUEST,
        ),
        ("<snapshot/>".to_string(), StatusCode::BAD_REQUEST),
        (String::new(), StatusCode::BAD_REQUEST),
        (
            format!("<snapshot id=\"{snap_active}\"/><snapshot id=\"{snap_active}\"/>"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "<snapshot id=\"5f0c7f3e-8e8b-4c1e-9d55-6b1a2c3d4e5f\"/>".to_string(),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let body = format!(
            "<vm><name>fromsnap</name><cluster><name>Default</name></cluster>\
             <snapshots>{snaps}</snapshots></vm>"
        );
        let r = c.post("vms", &body).await;
        assert_eq!(r.status, want, "{snaps}: {}", r.body);
        assert!(r.body.contains("<fault>"), "{}", r.body);
    }
    assert_eq!(count(&c.get("vms").await.body, "vm"), vms_before);
    let r = c.post(&format!("vms/{vm}/undosnapshot"), "<action/>").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    // Async: checked before the answer. A refusal is the request's fault, nothing to do is
    // complete at once (the answers for work that goes on, 202 pending with its job, are in
    // the real-node tests).
    let r = c
        .post(
            &format!("vms/{vm}/suspend"),
            "<action><async>true</async></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("<fault>"), "{}", r.body);
    let r = c
        .post(
            &format!("vms/{}/stop", ids[1]),
            "<action><async>true</async></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("status").as_deref(), Some("complete"));
    let r = c
        .api(
            Method::DELETE,
            "templates/00000000-0000-0000-0000-000000000000?async=true",
            "",
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.body);
    assert!(r.body.contains("Blank template cannot be removed"), "{}", r.body);

    // Update.
    let r = c
        .api(
            Method::PUT,
            &format!("vms/{vm}"),
            "<vm><memory>536870912</memory><description>d</description></vm>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("memory").as_deref(), Some("536870912"));
    // Suspended, it keeps the size its saved state needs; other changes go through.
    let db = &t.engine.app().db;
    let vid: oxvirt_engine::model::VmId = vm.parse().unwrap();
    let rt = |status| oxvirt_engine::model::VmRuntime {
        status,
        ..Default::default()
    };
    use oxvirt_engine::model::VmStatus;
    db.vm_set_runtime(vid, &[VmStatus::Down], &rt(VmStatus::Suspended))
        .await
        .unwrap();
    let r = c
        .api(
            Method::PUT,
            &format!("vms/{vm}"),
            "<vm><memory>1073741824</memory></vm>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("suspended"), "{}", r.body);
    let r = c
        .api(
            Method::PUT,
            &format!("vms/{vm}"),
            "<vm><description>e</description></vm>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("memory").as_deref(), Some("536870912"));
    db.vm_set_runtime(vid, &[VmStatus::Suspended], &rt(VmStatus::Down))
        .await
        .unwrap();

    // Jobs by correlation id, events from a cursor.
    let r = c.get("jobs?search=correlation_id%3Dcorr-web2").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "job"), 1, "{}", r.body);
    assert_eq!(r.xml_text("status").as_deref(), Some("finished"));
    let job = {
        let i = r.body.find("<job href").unwrap();
        root_id(&format!("?>{}", &r.body[i..]))
    };
    let r = c.get(&format!("jobs/{job}/steps")).await;
    assert!(count(&r.body, "step") >= 1, "{}", r.body);
    let r = c.get(&format!("events?from={from}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(count(&r.body, "event") >= 5, "{}", r.body);
    assert!(
        r.body.contains("<correlation_id>corr-web1</correlation_id>"),
        "{}",
        r.body
    );
    let r = c.get("events?search=correlation_id%3Dcorr-db1").await;
    assert!(count(&r.body, "event") >= 1, "{}", r.body);
    let r = c.get("events?search=severity%3Ealert").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = c
        .get("events?search=severity%3E%3Dnormal+sortby+time+asc+page+1&max=2")
        .await;
    assert_eq!(count(&r.body, "event"), 2, "{}", r.body);

    // Templates: Blank is there; removing it is refused.
    let r = c.get("templates?search=name%3DBlank").await;
    assert_eq!(count(&r.body, "template"), 1, "{}", r.body);
    let r = c
        .api(
            Method::DELETE,
            "templates/00000000-0000-0000-0000-000000000000",
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);

    // A VM's graphics console: VNC, id 766e63 as in oVirt; a down VM's console does not open.
    let vm0 = &ids[0];
    let r = c.get(&format!("vms/{vm0}/graphicsconsoles")).await;
    assert!(
        r.body.contains("<graphics_console href=")
            && r.body.contains("id=\"766e63\"")
            && r.body.contains("<protocol>vnc</protocol>"),
        "{}",
        r.body
    );
    assert_eq!(
        c.get(&format!("vms/{vm0}/graphicsconsoles/7370696365"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    for action in ["ticket", "remoteviewerconnectionfile"] {
        let r = c
            .post(
                &format!("vms/{vm0}/graphicsconsoles/766e63/{action}"),
                "<action/>",
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{action}: {}", r.body);
        assert!(r.body.contains("opens while it runs"), "{}", r.body);
    }
    let r = c
        .post(
            &format!("vms/{vm0}/graphicsconsoles/766e63/ticket"),
            "<action><ticket><expiry>0</expiry></ticket></action>",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);

    // Remove: 200 with an <action>; then 404. The removal's job carries the request's
    // correlation id.
    for (i, id) in ids.iter().enumerate() {
        let corr = format!("corr-rm-{i}");
        let r = c
            .api_with(
                Method::DELETE,
                &format!("vms/{id}"),
                "",
                &[("correlation-id", &corr)],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(c.get(&format!("vms/{id}")).await.status, StatusCode::NOT_FOUND);
        let r = c.get(&format!("jobs?search=correlation_id%3D{corr}")).await;
        assert_eq!(count(&r.body, "job"), 1, "{}", r.body);
    }
    assert!(names(&c.get("vms").await.body).is_empty());
    t.engine.shutdown().await;
}

/// The OpenAPI description served at /ovirt-engine/api/openapi.json lists exactly what the
/// server answers: every documented path and method reaches a handler over HTTPS (no 404 "no
/// such path", no 405), undocumented ones do not, and it is the checked-in docs/rest-openapi.json.
/// The disks a VM's QEMU has change while it is down (rows only) or up or paused (hot plug on
/// its host, see the e2e tests); a suspended one resumes only with the devices it was saved
/// with and a migrating one is between hosts, so both refuse, as does an up VM the engine
/// places on no host. An inactive disk may be attached at any time, and activated once the
/// change is allowed.
async fn disks_change_on_a_vm_only_while_down_or_plugged_on_its_host(backend: Backend) {
    use oxvirt_engine::model::{VmRuntime, VmStatus};
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    c.dc_and_cluster().await;
    let r = c.post("vms", &vm_xml("busy", "cl")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let vm: oxvirt_engine::model::VmId = root_id(&r.body).parse().unwrap();
    let db = &t.engine.app().db;
    let (_, disks) = rest_common::db_disks(db, &["d1", "d2"]).await;
    // No host runs it (there are none): the monitor leaves the recorded status alone.
    let set = async |status: VmStatus| {
        let rt = VmRuntime {
            status,
            ..Default::default()
        };
        db.vm_set_runtime(vm, &[], &rt).await.unwrap();
    };
    let att = |d: &oxvirt_engine::model::DiskId, active: bool| {
        format!("<disk_attachment><disk id=\"{d}\"/><interface>virtio</interface><active>{active}</active></disk_attachment>")
    };
    let path = format!("vms/{vm}/diskattachments");

    for (status, why) in [
        (VmStatus::Suspended, "only while it is down, up or paused"),
        (VmStatus::Migrating, "only while it is down, up or paused"),
        (VmStatus::Up, "runs nowhere"),
    ] {
        set(status).await;
        let r = c.post(&path, &att(&disks[0], true)).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{status}: {}", r.body);
        assert!(r.body.contains(why), "{status}: {}", r.body);
    }
    assert!(
        db.attachments_of_vm(vm).await.unwrap().is_empty(),
        "nothing attached"
    );
    // Inactive: attached now, QEMU untouched; activating needs the VM down or on a host.
    let r = c.post(&path, &att(&disks[0], false)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let one = format!("{path}/{}", disks[0]);
    let activate = "<disk_attachment><active>true</active></disk_attachment>";
    let r = c.api(Method::PUT, &one, activate).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = c
        .api(
            Method::PUT,
            &one,
            "<disk_attachment><bootable>true</bootable></disk_attachment>",
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "boot order only counts at the next start: {}",
        r.body
    );
    set(VmStatus::Down).await;
    let r = c.api(Method::PUT, &one, activate).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = c.post(&path, &att(&disks[1], true)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // An active disk stays while the VM is suspended or up, and goes once it is down.
    set(VmStatus::Suspended).await;
    let r = c.api(Method::DELETE, &one, "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    set(VmStatus::Down).await;
    let r = c.api(Method::DELETE, &one, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(db.attachments_of_vm(vm).await.unwrap().len(), 1);

    // A SATA disk changes only while the VM is down, as in oVirt: neither attached active
    // nor deactivated while it runs, and nothing changes.
    let two = format!("{path}/{}", disks[1]);
    let sata = "<disk_attachment><interface>sata</interface></disk_attachment>";
    let r = c.api(Method::PUT, &two, sata).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // On a host that never enrolled (the monitor leaves it alone): refused before any call.
    let cluster = db.vm_get(vm).await.unwrap().unwrap().cluster_id;
    let host = db
        .host_insert(&oxvirt_engine::model::Host::new("h", "127.0.0.1", 1, cluster))
        .await
        .unwrap();
    let rt = VmRuntime {
        status: VmStatus::Up,
        run_on_host: Some(host.id),
        ..Default::default()
    };
    db.vm_set_runtime(vm, &[], &rt).await.unwrap();
    let r = c
        .api(
            Method::PUT,
            &two,
            "<disk_attachment><active>false</active></disk_attachment>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.body.contains("cannot be plugged into or unplugged"),
        "{}",
        r.body
    );
    let r = c
        .post(
            &path,
            &format!(
                "<disk_attachment><disk id=\"{}\"/><interface>sata</interface><active>true</active></disk_attachment>",
                disks[0]
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let atts = db.attachments_of_vm(vm).await.unwrap();
    assert_eq!(atts.len(), 1, "{atts:?}");
    assert!(atts[0].active && atts[0].interface == oxvirt_engine::model::DiskInterface::Sata);
}

/// A disk removal that cannot reach an SPM fails past its point of no return: it is not rolled
/// back (its image may be half deleted) but blocked, the disk locked, and its job is what an
/// admin retries; a job that waits for nobody cannot be retried.
async fn blocked_commands_are_retried_through_their_job(backend: Backend) {
    use oxvirt_engine::model::{DiskFormat, DiskStatus};
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    let r = c
        .post("datacenters", "<data_center><name>dc</name></data_center>")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let db = &t.engine.app().db;
    let dc = db.dc_get_by_name("dc").await.unwrap().unwrap();
    let sd = rest_common::active_domain(db, dc.id, "gone").await;
    let disk = db
        .disk_insert(&oxvirt_engine::model::Disk::new(
            "stranded",
            sd.id,
            DiskFormat::Raw,
            1 << 20,
        ))
        .await
        .unwrap();

    let r = c
        .api_with(
            Method::DELETE,
            &format!("disks/{}", disk.id),
            "",
            &[("correlation-id", "rm-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
    assert!(r.body.contains("past rolling back"), "{}", r.body);
    let d = db.disk_get(disk.id).await.unwrap().unwrap();
    assert_eq!(
        d.status,
        DiskStatus::Locked,
        "not unlocked: its image may be half gone"
    );
    let r = c.get("jobs?search=correlation_id%3Drm-1").await;
    assert_eq!(r.xml_text("status").as_deref(), Some("failed"), "{}", r.body);
    let job = root_id(&format!("?>{}", &r.body[r.body.find("<job ").unwrap()..]));
    let events = c.get("events?search=correlation_id%3Drm-1").await;
    assert!(
        events.body.contains("needs an administrator to retry it"),
        "{}",
        events.body
    );

    // Still no SPM: the retry runs and is blocked again, the job failed again.
    let r = c.post(&format!("jobs/{job}/retry"), "<action/>").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
    assert!(r.body.contains("past rolling back"), "{}", r.body);
    let r = c.get(&format!("jobs/{job}")).await;
    assert_eq!(r.xml_text("status").as_deref(), Some("failed"), "{}", r.body);
    let steps = c.get(&format!("jobs/{job}/steps")).await;
    assert!(steps.body.contains("<step "), "{}", steps.body);

    // Jobs that wait for nobody, or that do not exist.
    let r = c
        .post(
            "clusters",
            "<cluster><name>cl</name><data_center><name>dc</name></data_center></cluster>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = c.post("vms", &vm_xml("fine", "cl")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let done = c.get("jobs?search=status%3Dfinished").await;
    let done_job = root_id(&format!("?>{}", &done.body[done.body.find("<job ").unwrap()..]));
    let r = c.post(&format!("jobs/{done_job}/retry"), "<action/>").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("not waiting for an administrator"), "{}", r.body);
    let r = c
        .post(&format!("jobs/{}/retry", uuid::Uuid::new_v4()), "<action/>")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_what_is_served() {
    let t = start_engine().await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    let r = c.get("openapi.json").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.content_type(), "application/json");
    let doc = r.json();
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/rest-openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        doc, checked_in,
        "docs/rest-openapi.json differs from the served description"
    );
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() > 40, "{}", paths.len());
    let unrouted = |r: &rest_common::Response| {
        r.status == StatusCode::METHOD_NOT_ALLOWED
            || (r.status == StatusCode::NOT_FOUND && r.body.contains("no such path"))
    };
    let mut checked = 0;
    for (path, item) in paths {
        // An id nothing has: handlers answer 404 "… not found", never "no such path".
        let concrete: String = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    "9b1d3c5e-0000-4000-8000-00000000dead"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for (method, op) in item.as_object().unwrap() {
            let m: Method = method.to_ascii_uppercase().parse().unwrap();
            if path.starts_with("/ovirt-engine/sso") || path.starts_with("/ovirt-engine/services") {
                let r = c
                    .send(
                        m,
                        &concrete,
                        &[("content-type", "application/x-www-form-urlencoded")],
                        "",
                    )
                    .await;
                assert!(!unrouted(&r), "{method} {path}: {} {}", r.status, r.body);
                assert!(op["responses"].is_object(), "{method} {path}");
                checked += 1;
                continue;
            }
            // DELETE and actions on a missing object must not remove or change anything; the
            // body is an empty element of the documented root so that parsing succeeds.
            let body = match op["requestBody"]["content"]["application/xml"]["schema"]["$ref"].as_str() {
                Some(r) => format!("<{0}></{0}>", r.rsplit('/').next().unwrap()),
                None => String::new(),
            };
            let r = c.api(m.clone(), &concrete, &body).await;
            assert!(
                !unrouted(&r),
                "{method} {path} is documented but not served: {} {}",
                r.status,
                r.body
            );
            assert!(
                r.status != StatusCode::INTERNAL_SERVER_ERROR,
                "{method} {path}: {}",
                r.body
            );
            checked += 1;
        }
    }
    assert!(checked >= paths.len(), "{checked}");
    // Served means documented: methods and paths outside the description are refused.
    for (m, p) in [
        (Method::PATCH, "vms"),
        (Method::GET, "vms/x/y/z"),
        (Method::GET, "nothing"),
        (Method::DELETE, "jobs"),
    ] {
        let r = c.api(m.clone(), p, "").await;
        assert!(unrouted(&r), "{m} {p}: {} {}", r.status, r.body);
        let full = format!("/ovirt-engine/api/{p}");
        let documented = paths
            .get(&full)
            .is_some_and(|i| i.get(m.as_str().to_ascii_lowercase()).is_some());
        assert!(!documented, "{m} {full}");
    }
}

/// `/imagetransfers` refuses what cannot be served before anything changes, and the CA that
/// transfer clients verify hosts with is served as oVirt serves it.
async fn image_transfers_refuse_bad_requests_and_the_ca_is_served(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    let r = c.get("imagetransfers").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "<image_transfer "), 0);
    let missing = "5b0e9b3c-0000-4000-8000-000000000000";
    for (body, status, says) in [
        ("<image_transfer><direction>upload</direction></image_transfer>", StatusCode::BAD_REQUEST, "needs &lt;disk"),
        (
            &*format!("<image_transfer><disk id=\"{missing}\"/><direction>sideways</direction></image_transfer>"),
            StatusCode::BAD_REQUEST,
            "sideways",
        ),
        (
            &*format!("<image_transfer><disk id=\"{missing}\"/><format>cow</format></image_transfer>"),
            StatusCode::BAD_REQUEST,
            "format cow",
        ),
        (
            &*format!("<image_transfer><disk id=\"{missing}\"/><snapshot id=\"{missing}\"/></image_transfer>"),
            StatusCode::NOT_FOUND,
            "disk snapshot",
        ),
        (
            &*format!("<image_transfer><disk id=\"{missing}\"/><backup id=\"{missing}\"/></image_transfer>"),
            StatusCode::BAD_REQUEST,
            "backups",
        ),
        (
            &*format!("<image_transfer><disk id=\"{missing}\"/><inactivity_timeout>0</inactivity_timeout></image_transfer>"),
            StatusCode::BAD_REQUEST,
            "inactivity_timeout",
        ),
        (
            &*format!("<image_transfer><disk id=\"{missing}\"/><direction>download</direction></image_transfer>"),
            StatusCode::NOT_FOUND,
            missing,
        ),
    ] {
        let r = c.post("imagetransfers", body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.body.contains(says), "{body}: {}", r.body);
    }
    assert_eq!(count(&c.get("imagetransfers").await.body, "<image_transfer "), 0);
    assert_eq!(
        c.get(&format!("imagetransfers/{missing}")).await.status,
        StatusCode::NOT_FOUND
    );
    let r = c
        .post(&format!("imagetransfers/{missing}/finalize"), "<action/>")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = c
        .send(
            Method::GET,
            "/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA",
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, t.engine.ca_pem());
    let r = c
        .send(
            Method::GET,
            "/ovirt-engine/services/pki-resource?resource=engine-key",
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// The CD-ROM of a VM through REST: ISO disks go into it and never get attached, the
/// configuration changes without `current`, a down VM has no running drive to change, an ISO in
/// use cannot be removed, the boot order round-trips, and a run once's CD is refused unless it
/// is an ISO.
async fn cdroms_hold_iso_disks_only(backend: Backend) {
    use oxvirt_engine::model::{DiskContentType, VmRuntime, VmStatus};
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    c.dc_and_cluster().await;
    let r = c
        .post(
            "vms",
            "<vm><name>installer</name><cluster><name>cl</name></cluster>\
             <os><type>windows_2022</type><boot><devices><device>cdrom</device><device>hd</device></devices></boot></os></vm>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert!(r.body.contains("<type>windows_2022</type>"), "{}", r.body);
    assert!(
        r.body.contains("<device>cdrom</device><device>hd</device>")
            || r.body.contains("<device>cdrom</device>\n"),
        "{}",
        r.body
    );
    let vm: oxvirt_engine::model::VmId = root_id(&r.body).parse().unwrap();
    let db = &t.engine.app().db;
    let (_, disks) = rest_common::db_disks(db, &["data", "iso"]).await;
    let (data, iso) = (disks[0], disks[1]);
    let mut d = db.disk_get(iso).await.unwrap().unwrap();
    d.content_type = DiskContentType::Iso;
    // content_type is set at creation only; write it as an upload's disk would have it.
    db.disk_delete(iso).await.unwrap();
    db.disk_insert(&d).await.unwrap();
    let r = c.get(&format!("disks/{iso}")).await;
    assert!(r.body.contains("<content_type>iso</content_type>"), "{}", r.body);

    let cd = format!("vms/{vm}/cdroms/00000000-0000-0000-0000-000000000000");
    let r = c.get(&format!("vms/{vm}/cdroms")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "cdrom"), 1, "{}", r.body);
    assert!(!r.body.contains("<file"), "empty at first: {}", r.body);
    for (body, status, says) in [
        (
            format!("<cdrom><file id=\"{data}\"/></cdrom>"),
            StatusCode::BAD_REQUEST,
            "is no ISO",
        ),
        (
            "<cdrom><file id=\"x.iso\"/></cdrom>".to_string(),
            StatusCode::BAD_REQUEST,
            "not an ISO disk",
        ),
        (
            "<cdrom><file id=\"5b0e9b3c-0000-4000-8000-000000000000\"/></cdrom>".to_string(),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        ("<cdrom/>".to_string(), StatusCode::BAD_REQUEST, "needs"),
    ] {
        let r = c.put(&cd, &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.body.contains(says), "{body}: {}", r.body);
    }
    let r = c.put(&cd, &format!("<cdrom><file id=\"{iso}\"/></cdrom>")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(&format!("<file id=\"{iso}\"")), "{}", r.body);
    assert!(c.get(&cd).await.body.contains(&iso.to_string()));
    // A down VM has no drive to change now.
    let r = c
        .put(
            &format!("{cd}?current=true"),
            &format!("<cdrom><file id=\"{iso}\"/></cdrom>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("current=true"), "{}", r.body);
    assert_eq!(c.get("vms/x/cdroms/1").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        c.get(&format!("vms/{vm}/cdroms/1")).await.status,
        StatusCode::NOT_FOUND
    );

    // An ISO is not attached as a disk, and not removed while a CD-ROM holds it.
    let r = c
        .post(
            &format!("vms/{vm}/diskattachments"),
            &format!("<disk_attachment><disk id=\"{iso}\"/><interface>virtio</interface></disk_attachment>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("is an ISO"), "{}", r.body);
    let r = c.delete(&format!("disks/{iso}")).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("installer"), "{}", r.body);
    // Running with another ISO in its drive (as after current=true), the VM holds both.
    db.vm_set_run_cdrom(vm, Some(iso)).await.unwrap();
    let r = c.put(&cd, "<cdrom><file id=\"\"/></cdrom>").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!r.body.contains("<file"), "ejected: {}", r.body);
    let rt = VmRuntime {
        status: VmStatus::Up,
        ..Default::default()
    };
    db.vm_set_runtime(vm, &[], &rt).await.unwrap();
    assert!(c
        .get(&format!("{cd}?current=true"))
        .await
        .body
        .contains(&iso.to_string()));
    assert!(!c.get(&cd).await.body.contains(&iso.to_string()));
    assert_eq!(
        c.delete(&format!("disks/{iso}")).await.status,
        StatusCode::CONFLICT
    );
    let rt = VmRuntime::default();
    db.vm_set_runtime(vm, &[], &rt).await.unwrap();
    assert!(
        db.vms_with_cdrom(iso).await.unwrap().is_empty(),
        "a down VM's old drive holds nothing"
    );

    // A run once with a data disk as its CD is refused before anything starts.
    let r = c
        .post(
            &format!("vms/{vm}/start"),
            &format!("<action><vm><cdroms><cdrom><file id=\"{data}\"/></cdrom></cdroms></vm></action>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = c
        .put(
            &format!("vms/{vm}"),
            "<vm><os><boot><devices><device>floppy</device></devices></boot></os></vm>",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = c
        .put(
            &format!("vms/{vm}"),
            "<vm><os><boot><devices><device>hd</device></devices></boot></os></vm>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = db.vm_get(vm).await.unwrap().unwrap();
    assert_eq!(v.os.boot_devices, vec![oxvirt_engine::model::BootDevice::Hd]);
    assert_eq!(v.os.os_type, "windows_2022", "the type is kept");
}

/// Statistics of a VM that is down (its memory and zeros) and of a host that is not up (what
/// monitoring learnt), one by its id, an unknown id 404; ids follow names across objects.
async fn statistics_of_down_vms_and_hosts(backend: Backend) {
    use oxvirt_engine::model::{Host, HostStats};
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    c.dc_and_cluster().await;
    let mut ids = Vec::new();
    for n in ["s1", "s2"] {
        let r = c.post("vms", &vm_xml(n, "cl")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        ids.push(root_id(&r.body).to_string());
    }
    let r = c.get(&format!("vms/{}", ids[0])).await;
    assert!(r.body.contains("rel=\"statistics\""), "{}", r.body);
    let memory = r
        .body
        .split("<memory>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string();
    let r = c.get(&format!("vms/{}/statistics", ids[0])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "statistic"), 7, "{}", r.body);
    let installed = r.body.split("<name>memory.installed</name>").nth(1).unwrap();
    assert!(
        installed.contains(&format!("<datum>{memory}</datum>")),
        "{}",
        r.body
    );
    assert!(installed.contains("<unit>bytes</unit>") && installed.contains("<type>integer</type>"));
    let total = r.body.split("<name>cpu.current.total</name>").nth(1).unwrap();
    assert!(
        total.contains("<datum>0</datum>") && total.contains("<unit>percent</unit>"),
        "{}",
        r.body
    );
    // The id of memory.installed, the same for the other VM; one statistic by its id.
    let sid = r.body.split("<name>memory.installed</name>").next().unwrap();
    let sid = sid
        .rsplit("id=\"")
        .next()
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let other = c.get(&format!("vms/{}/statistics", ids[1])).await.body;
    assert!(other.contains(&format!("id=\"{sid}\"")), "{other}");
    let r = c.get(&format!("vms/{}/statistics/{sid}", ids[0])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.contains("memory.installed") && r.body.contains(&ids[0]),
        "{}",
        r.body
    );
    assert_eq!(
        c.get(&format!("vms/{}/statistics/nope", ids[0])).await.status,
        StatusCode::NOT_FOUND
    );

    let db = &t.engine.app().db;
    let cl = db.cluster_get_by_name("cl").await.unwrap().unwrap();
    let h = db
        .host_insert(&Host::new("h1", "127.0.0.1", 1, cl.id))
        .await
        .unwrap();
    db.host_update_stats(
        h.id,
        &HostStats {
            cpu_cores: Some(2),
            memory_bytes: Some(8 << 30),
            free_memory_bytes: Some(6 << 30),
        },
    )
    .await
    .unwrap();
    let r = c.get(&format!("hosts/{}/statistics", h.id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "statistic"), 11, "{}", r.body);
    let used = r.body.split("<name>memory.used</name>").nth(1).unwrap();
    assert!(
        used.contains(&format!("<datum>{}</datum>", 2u64 << 30)),
        "{}",
        r.body
    );
}

/// External events: recorded with their origin and custom id, found again, refused a second
/// time for the same pair and without what they need, removed.
async fn external_events_are_recorded_once_per_origin_and_id(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    c.dc_and_cluster().await;
    let r = c.post("vms", &vm_xml("evm", "cl")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let vm = root_id(&r.body).to_string();
    let ev = |custom: &str, extra: &str| {
        format!(
            "<event><description>backup of evm done</description><severity>warning</severity>\
             <origin>backup-tool</origin>{custom}<vm id=\"{vm}\"/>{extra}</event>"
        )
    };
    let r = c.post("events", &ev("<custom_id>42</custom_id>", "")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    for needle in [
        "<origin>backup-tool</origin>",
        "<custom_id>42</custom_id>",
        "<code>12001</code>",
        "<severity>warning</severity>",
    ] {
        assert!(r.body.contains(needle), "{needle}: {}", r.body);
    }
    let id = root_id(&r.body).to_string();
    let listed = c.get("events?search=severity%3E%3Dwarning").await.body;
    assert!(listed.contains(&format!("id=\"{id}\"")), "{listed}");
    let r = c.post("events", &ev("<custom_id>42</custom_id>", "")).await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "the same origin and id twice: {}",
        r.body
    );
    let r = c.post("events", &ev("", "")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("custom_id"), "{}", r.body);
    let r = c
        .post(
            "events",
            "<event><description>x</description><origin>oVirt</origin><custom_id>1</custom_id></event>",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = c.post("events", &ev("<custom_id>43</custom_id>", "")).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "another id of the same origin: {}",
        r.body
    );
    // Removed from the log, it is gone; its origin and id are free again.
    let r = c.delete(&format!("events/{id}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(c.get(&format!("events/{id}")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        c.delete(&format!("events/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    let r = c.post("events", &ev("<custom_id>42</custom_id>", "")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

/// A storage domain's space thresholds: read with oVirt's defaults, changed by PUT, a warning
/// outside 0..100 refused unchanged; `available`/`used` from the monitored space.
async fn storage_domain_space_thresholds(backend: Backend) {
    use oxvirt_engine::model::{SdType, StorageDomain, StorageType};
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    let db = &t.engine.app().db;
    let sd = db
        .sd_insert(&StorageDomain::new(
            "lowsd",
            SdType::Data,
            StorageType::Localfs,
            "/srv/lowsd",
        ))
        .await
        .unwrap();
    db.sd_set_space(sd.id, 100 << 30, 3 << 30).await.unwrap();
    let r = c.get(&format!("storagedomains/{}", sd.id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("warning_low_space_indicator").as_deref(), Some("10"));
    assert_eq!(r.xml_text("critical_space_action_blocker").as_deref(), Some("5"));
    assert_eq!(
        r.xml_text("available").as_deref(),
        Some(&*(3u64 << 30).to_string())
    );
    let stored = db.sd_get(sd.id).await.unwrap().unwrap();
    assert_eq!(
        stored.low_space(),
        Some(oxvirt_engine::model::LowSpace::Critical),
        "3 GB free is under the default 5 GB"
    );
    let r = c
        .put(
            &format!("storagedomains/{}", sd.id),
            "<storage_domain><warning_low_space_indicator>20</warning_low_space_indicator>\
             <critical_space_action_blocker>2</critical_space_action_blocker></storage_domain>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("warning_low_space_indicator").as_deref(), Some("20"));
    assert_eq!(r.xml_text("critical_space_action_blocker").as_deref(), Some("2"));
    assert_eq!(
        db.sd_get(sd.id).await.unwrap().unwrap().low_space(),
        Some(oxvirt_engine::model::LowSpace::Warning),
        "3 GB of 100 is under 20 % but over 2 GB"
    );
    for bad in [
        "<warning_low_space_indicator>101</warning_low_space_indicator>",
        "<critical_space_action_blocker>-1</critical_space_action_blocker>",
    ] {
        let r = c
            .put(
                &format!("storagedomains/{}", sd.id),
                &format!("<storage_domain>{bad}</storage_domain>"),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    let now = db.sd_get(sd.id).await.unwrap().unwrap();
    assert_eq!(
        (now.warning_low_space_indicator, now.critical_space_action_blocker),
        (20, 2),
        "unchanged"
    );
}

/// Tags as oVirt's TagsService and AssignedTagsService serve them: a tree under the root tag,
/// put on VMs, hosts and templates by id or name, searched with `tag=`; removing a tag takes
/// its subtree off everything; bad requests change nothing.
async fn tags_on_vms_hosts_and_templates(backend: Backend) {
    use oxvirt_engine::model::Host;
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    c.dc_and_cluster().await;
    let root = "00000000-0000-0000-0000-000000000000";
    let r = c.get("tags").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(count(&r.body, "tag"), 1, "only the root: {}", r.body);
    assert!(r.body.contains(&format!("id=\"{root}\"")) && r.body.contains("<name>root</name>"));
    assert!(c.get("").await.body.contains(&format!(
        "<root_tag href=\"/ovirt-engine/api/tags/{root}\" id=\"{root}\"/>"
    )));

    let r = c
        .post(
            "tags",
            "<tag><name>web</name><description>front</description></tag>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let web = root_id(&r.body);
    assert!(
        r.body.contains(&format!(
            "<parent href=\"/ovirt-engine/api/tags/{root}\" id=\"{root}\"/>"
        )),
        "{}",
        r.body
    );
    let r = c
        .post(
            "tags",
            "<tag><name>web-prod</name><parent><name>web</name></parent></tag>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let prod = root_id(&r.body);
    assert!(
        r.body.contains(&format!("id=\"{web}\"/>")),
        "under web: {}",
        r.body
    );
    for (body, status) in [
        ("<tag><name>web</name></tag>", StatusCode::CONFLICT),
        ("<tag><name>root</name></tag>", StatusCode::CONFLICT),
        (
            "<tag><name>x</name><parent><name>nope</name></parent></tag>",
            StatusCode::NOT_FOUND,
        ),
        ("<tag><name>bad name!</name></tag>", StatusCode::BAD_REQUEST),
        (
            "<tag><description>no name</description></tag>",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let r = c.post("tags", body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
    }
    assert_eq!(count(&c.get("tags").await.body, "tag"), 3);

    // On a VM (by name), a host (by id) and the Blank template.
    let r = c.post("vms", &vm_xml("tagged", "cl")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let vm = root_id(&r.body);
    assert!(
        r.body
            .contains(&format!("href=\"/ovirt-engine/api/vms/{vm}/tags\" rel=\"tags\"")),
        "{}",
        r.body
    );
    let r = c.post("vms", &vm_xml("plain", "cl")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = c
        .post(&format!("vms/{vm}/tags"), "<tag><name>web-prod</name></tag>")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(&*format!("/ovirt-engine/api/vms/{vm}/tags/{prod}"))
    );
    let r = c
        .post(&format!("vms/{vm}/tags"), &format!("<tag id=\"{prod}\"/>"))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "twice: {}", r.body);
    let r = c
        .post(&format!("vms/{vm}/tags"), &format!("<tag id=\"{root}\"/>"))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "the root on a VM: {}", r.body);
    let r = c.get(&format!("vms/{vm}/tags")).await;
    assert_eq!(count(&r.body, "tag"), 1, "{}", r.body);
    assert_eq!(
        c.get(&format!("vms/{vm}/tags/{prod}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        c.get(&format!("vms/{vm}/tags/{web}")).await.status,
        StatusCode::NOT_FOUND
    );
    let r = c.get("vms?search=tag%3Dweb-prod").await;
    assert_eq!(count(&r.body, "vm"), 1, "{}", r.body);
    assert!(r.body.contains("<name>tagged</name>"));
    assert_eq!(count(&c.get("vms?search=tag%3Dweb").await.body, "vm"), 0);
    let db = &t.engine.app().db;
    let cl = db.cluster_get_by_name("cl").await.unwrap().unwrap();
    let host = db
        .host_insert(&Host::new("th", "127.0.0.9", 54321, cl.id))
        .await
        .unwrap();
    let r = c
        .post(
            &format!("hosts/{}/tags", host.id),
            &format!("<tag id=\"{web}\"/>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(count(&c.get("hosts?search=tag%3Dweb").await.body, "host"), 1);
    let blank = "00000000-0000-0000-0000-000000000000";
    let r = c
        .post(&format!("templates/{blank}/tags"), "<tag><name>web</name></tag>")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let missing = "5b0e9b3c-0000-4000-8000-000000000000";
    let r = c
        .post(&format!("vms/{missing}/tags"), "<tag><name>web</name></tag>")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Moves: never under itself; a rename; the root stays.
    let r = c
        .put(
            &format!("tags/{web}"),
            &format!("<tag><parent id=\"{prod}\"/></tag>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "a cycle: {}", r.body);
    let r = c.put(&format!("tags/{web}"), "<tag><name>www</name></tag>").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("<name>www</name>"));
    assert_eq!(
        c.put(&format!("tags/{root}"), "<tag><name>x</name></tag>")
            .await
            .status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        c.delete(&format!("tags/{root}")).await.status,
        StatusCode::CONFLICT
    );

    // Off one thing; then the whole subtree off everything.
    let r = c.delete(&format!("hosts/{}/tags/{web}", host.id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        c.delete(&format!("hosts/{}/tags/{web}", host.id)).await.status,
        StatusCode::NOT_FOUND
    );
    let r = c.delete(&format!("tags/{web}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        count(&c.get("tags").await.body, "tag"),
        1,
        "web-prod went with www"
    );
    assert_eq!(count(&c.get(&format!("vms/{vm}/tags")).await.body, "tag"), 0);
    assert_eq!(
        count(&c.get(&format!("templates/{blank}/tags")).await.body, "tag"),
        0
    );
}

/// Storage QoS and disk profiles over REST: limits in MB/s and IOPS, a total excluding its
/// parts, profiles pointing at a QoS of their domain's data center, a disk's profile on add
/// and update, a profile in use not removed, a removed QoS leaving its profiles unlimited.
async fn storage_qos_and_disk_profiles(backend: Backend) {
    use oxvirt_engine::model::{Disk, DiskFormat, SdType, StorageDomain, StorageType};
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;
    c.dc_and_cluster().await;
    let db = &t.engine.app().db;
    let dc = db.dc_get_by_name("dc").await.unwrap().unwrap();
    let sd = rest_common::active_domain(db, dc.id, "qsd").await;
    let other = db
        .sd_insert(&StorageDomain::new(
            "qsd2",
            SdType::Data,
            StorageType::Localfs,
            "/srv/qsd2",
        ))
        .await
        .unwrap();
    let qoss = format!("datacenters/{}/qoss", dc.id);
    for (body, status, says) in [
        ("<qos><name>x</name></qos>", StatusCode::BAD_REQUEST, "type"),
        ("<qos><name>x</name><type>cpu</type></qos>", StatusCode::BAD_REQUEST, "storage QoS"),
        (
            "<qos><name>x</name><type>storage</type><max_throughput>10</max_throughput><max_read_throughput>5</max_read_throughput></qos>",
            StatusCode::BAD_REQUEST,
            "total throughput",
        ),
    ] {
        let r = c.post(&qoss, body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.body.contains(says), "{body}: {}", r.body);
    }
    let r = c
        .post(&qoss, "<qos><name>slow</name><type>storage</type><max_write_throughput>2</max_write_throughput><max_iops>100</max_iops></qos>")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let qos = root_id(&r.body);
    assert_eq!(r.xml_text("max_write_throughput").as_deref(), Some("2"));
    assert_eq!(r.xml_text("max_throughput"), None);
    assert_eq!(
        c.post(&qoss, "<qos><name>slow</name><type>storage</type></qos>")
            .await
            .status,
        StatusCode::CONFLICT
    );

    // Profiles: on the attached domain with that QoS; the unattached one takes none.
    let r = c
        .post(
            &format!("storagedomains/{}/diskprofiles", sd.id),
            &format!("<disk_profile><name>p1</name><qos id=\"{qos}\"/></disk_profile>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let p1 = root_id(&r.body);
    let r = c
        .post(
            "diskprofiles",
            &format!(
                "<disk_profile><name>p2</name><storage_domain id=\"{}\"/><qos id=\"{qos}\"/></disk_profile>",
                other.id
            ),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "not in the QoS's data center: {}",
        r.body
    );
    let r = c
        .post(
            "diskprofiles",
            &format!(
                "<disk_profile><name>p2</name><storage_domain id=\"{}\"/></disk_profile>",
                other.id
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let p2 = root_id(&r.body);
    assert_eq!(
        count(
            &c.get(&format!("storagedomains/{}/diskprofiles", sd.id))
                .await
                .body,
            "disk_profile"
        ),
        1
    );
    assert_eq!(count(&c.get("diskprofiles").await.body, "disk_profile"), 2);

    // A disk's profile: of its own domain only; in use, the profile stays.
    let disk = db
        .disk_insert(&Disk::new("qd", sd.id, DiskFormat::Cow, 1 << 30))
        .await
        .unwrap();
    let r = c
        .put(
            &format!("disks/{}", disk.id),
            &format!("<disk><disk_profile id=\"{p2}\"/></disk>"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "another domain's profile: {}",
        r.body
    );
    let r = c
        .put(
            &format!("disks/{}", disk.id),
            &format!("<disk><disk_profile id=\"{p1}\"/></disk>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.contains(&format!(
            "<disk_profile href=\"/ovirt-engine/api/diskprofiles/{p1}\" id=\"{p1}\"/>"
        )),
        "{}",
        r.body
    );
    assert_eq!(
        c.delete(&format!("diskprofiles/{p1}")).await.status,
        StatusCode::CONFLICT
    );
    // The QoS changes and goes; the profile stays, unlimited.
    let r = c
        .put(
            &format!("{qoss}/{qos}"),
            "<qos><max_write_throughput>0</max_write_throughput></qos>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("max_write_throughput"), None, "0: none");
    assert_eq!(
        r.xml_text("max_iops").as_deref(),
        Some("100"),
        "the rest unchanged"
    );
    assert_eq!(c.delete(&format!("{qoss}/{qos}")).await.status, StatusCode::OK);
    let r = c.get(&format!("diskprofiles/{p1}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.body.contains("<qos "), "unlimited now: {}", r.body);
    let r = c
        .put(&format!("disks/{}", disk.id), "<disk><disk_profile/></disk>")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        c.delete(&format!("diskprofiles/{p1}")).await.status,
        StatusCode::OK
    );
}

both_backends!(
    storage_qos_and_disk_profiles,
    tags_on_vms_hosts_and_templates,
    storage_domain_space_thresholds,
    external_events_are_recorded_once_per_origin_and_id,
    statistics_of_down_vms_and_hosts,
    cdroms_hold_iso_disks_only,
    sso_tokens_and_authentication,
    collections_status_codes_and_faults,
    vms_search_follow_actions_jobs_and_events,
    disks_change_on_a_vm_only_while_down_or_plugged_on_its_host,
    blocked_commands_are_retried_through_their_job,
    image_transfers_refuse_bad_requests_and_the_ca_is_served
);
