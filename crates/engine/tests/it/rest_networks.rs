//! Networks over the REST API v4 (real HTTPS, real SQLite database, no node needed): the
//! management network a data center comes with, logical networks in XML and JSON, cluster
//! networks, vNIC profiles, and VM NICs with their network given as a vNIC profile and their
//! MAC from the cluster's pool.

use crate::rest_common;

use crate::common::{start_engine_on, Backend};
use http::{Method, StatusCode};
use rest_common::{count, root_id, xml_text, Client};

async fn networks_clusters_profiles_and_vm_nics(backend: Backend) {
    let t = start_engine_on(backend).await;
    let mut c = Client::new(&t.engine);
    c.login().await;

    let r = c
        .post("datacenters", "<data_center><name>ndc</name></data_center>")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let dc = root_id(&r.body);
    let r = c
        .post(
            "clusters",
            "<cluster><name>ncl</name><data_center><name>ndc</name></data_center></cluster>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let cl = root_id(&r.body);

    // The data center came with ovirtmgmt, the cluster's management network.
    let r = c.get(&format!("datacenters/{dc}/networks")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(count(&r.body, "network"), 1, "{}", r.body);
    assert_eq!(r.xml_text("name").as_deref(), Some("ovirtmgmt"));
    let r = c.get(&format!("clusters/{cl}/networks")).await;
    assert!(
        r.body.contains("<usage>management</usage>") && r.body.contains("<required>true</required>"),
        "{}",
        r.body
    );

    // A VM network with a VLAN and an MTU; bad ones are refused with the rule they break.
    let r = c
        .post(
            &format!("datacenters/{dc}/networks"),
            "<network><name>vmnet</name><mtu>9000</mtu><vlan id=\"10\"/><usages><usage>vm</usage></usages></network>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let net = root_id(&r.body);
    assert!(
        r.body.contains("<vlan id=\"10\">") && r.body.contains("<mtu>9000</mtu>"),
        "{}",
        r.body
    );
    let r = c
        .post(
            "networks",
            "<network><name>this-name-is-far-too-long</name><data_center><name>ndc</name></data_center><vlan id=\"10\"/></network>",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body.contains("1 to 15") && r.body.contains("VLAN 10"),
        "{}",
        r.body
    );
    // JSON in and out; a network with empty usages is not a VM network.
    let r = c
        .api_with(
            Method::POST,
            "networks",
            r#"{"name": "storage", "data_center": {"id": "DC"}, "usages": {}}"#
                .replace("DC", &dc)
                .as_str(),
            &[
                ("content-type", "application/json"),
                ("accept", "application/json"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let j = r.json();
    assert_eq!(j["name"], "storage");
    let storage = j["id"].as_str().unwrap().to_string();

    // One vNIC profile per VM network.
    let r = c.get("vnicprofiles").await;
    assert_eq!(
        count(&r.body, "vnic_profile"),
        2,
        "ovirtmgmt and vmnet: {}",
        r.body
    );
    let r = c.get(&format!("networks/{net}/vnicprofiles")).await;
    assert_eq!(count(&r.body, "vnic_profile"), 1, "{}", r.body);
    let profile = {
        let b = &r.body;
        let i = b.find("<vnic_profile ").unwrap();
        let j = b[i..].find(" id=\"").unwrap() + i + 5;
        let k = b[j..].find('"').unwrap() + j;
        b[j..k].to_string()
    };
    assert_eq!(
        c.get(&format!("vnicprofiles/{profile}")).await.status,
        StatusCode::OK
    );
    let r = c.get(&format!("networks/{storage}/vnicprofiles")).await;
    assert_eq!(count(&r.body, "vnic_profile"), 0, "not a VM network: {}", r.body);

    // Attached to the cluster, optional, then required; the management network stays required.
    let r = c
        .post(
            &format!("clusters/{cl}/networks"),
            &format!("<network id=\"{net}\"><required>false</required></network>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.xml_text("required").as_deref(), Some("false"));
    let r = c
        .api(
            Method::PUT,
            &format!("clusters/{cl}/networks/{net}"),
            "<network><required>true</required></network>",
        )
        .await;
    assert_eq!(r.xml_text("required").as_deref(), Some("true"), "{}", r.body);
    let mgmt = {
        let r = c.get(&format!("datacenters/{dc}/networks")).await;
        let i = r.body.find("<network ").unwrap();
        let j = r.body[i..].find(" id=\"").unwrap() + i + 5;
        let k = r.body[j..].find('"').unwrap() + j;
        r.body[j..k].to_string()
    };
    let r = c
        .api(
            Method::PUT,
            &format!("clusters/{cl}/networks/{mgmt}"),
            "<network><required>false</required></network>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(
        c.api(Method::DELETE, &format!("networks/{mgmt}"), "")
            .await
            .status,
        StatusCode::CONFLICT
    );

    // A VM NIC on the network through its profile; the MAC from the pool.
    let r = c
        .post(
            "vms",
            "<vm><name>nvm</name><cluster><name>ncl</name></cluster><template><name>Blank</name></template></vm>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let vm = root_id(&r.body);
    let r = c
        .post(
            &format!("vms/{vm}/nics"),
            &format!("<nic><name>nic1</name><vnic_profile id=\"{profile}\"/></nic>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let nic = root_id(&r.body);
    let mac = xml_text(&r.body, "address").unwrap();
    assert!(mac.starts_with("56:6f:"), "{mac}");
    assert!(
        r.body.contains(&format!(
            "<vnic_profile href=\"/ovirt-engine/api/vnicprofiles/{profile}\" id=\"{profile}\"/>"
        )),
        "{}",
        r.body
    );
    // The same MAC twice is a conflict; an unknown profile is not found.
    let r = c
        .post(
            &format!("vms/{vm}/nics"),
            &format!("<nic><name>nic2</name><mac><address>{mac}</address></mac></nic>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = c
        .post(
            &format!("vms/{vm}/nics"),
            "<nic><name>nic2</name><vnic_profile id=\"5b0e9b3c-0000-4000-8000-000000000000\"/></nic>",
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // Update: unlinked, empty profile.
    let r = c
        .api(
            Method::PUT,
            &format!("vms/{vm}/nics/{nic}"),
            "<nic><linked>false</linked><vnic_profile/></nic>",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.xml_text("linked").as_deref(), Some("false"));
    assert!(!r.body.contains("<vnic_profile"), "{}", r.body);
    // A network a NIC uses keeps its name; without NICs it can go.
    let r = c
        .api(
            Method::PUT,
            &format!("vms/{vm}/nics/{nic}"),
            &format!("<nic><vnic_profile id=\"{profile}\"/></nic>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = c
        .api(
            Method::PUT,
            &format!("networks/{net}"),
            "<network><name>renamed</name></network>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);

    // A template made of the VM keeps its NIC; a VM made of the template gets it, with a MAC
    // of its own.
    let r = c
        .post(
            "templates",
            &format!("<template><name>nt</name><vm id=\"{vm}\"/></template>"),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let tmpl = root_id(&r.body);
    assert!(r.body.contains(&format!("templates/{tmpl}/nics")), "{}", r.body);
    let r = c.get(&format!("templates/{tmpl}/nics")).await;
    assert_eq!(count(&r.body, "nic"), 1, "{}", r.body);
    assert!(r.body.contains(&profile), "{}", r.body);
    assert_eq!(
        xml_text(&r.body, "linked").as_deref(),
        Some("false"),
        "{}",
        r.body
    );
    let tnic = root_id(&format!("?>{}", &r.body[r.body.find("<nic ").unwrap()..]));
    let r = c.get(&format!("templates/{tmpl}/nics/{tnic}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = c
        .post(
            "vms",
            &format!("<vm><name>fromnt</name><cluster id=\"{cl}\"/><template id=\"{tmpl}\"/></vm>"),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let vm2 = root_id(&r.body);
    let r = c.get(&format!("vms/{vm2}/nics")).await;
    assert_eq!(count(&r.body, "nic"), 1, "{}", r.body);
    assert!(r.body.contains(&profile), "{}", r.body);
    let mac1 = xml_text(&c.get(&format!("vms/{vm}/nics/{nic}")).await.body, "address");
    assert_ne!(xml_text(&r.body, "address"), mac1, "{}", r.body);
    // The template's NIC uses the network too.
    assert_eq!(
        c.api(Method::DELETE, &format!("vms/{vm2}"), "").await.status,
        StatusCode::OK
    );
    assert_eq!(
        c.api(Method::DELETE, &format!("vms/{vm}/nics/{nic}"), "")
            .await
            .status,
        StatusCode::OK
    );
    let r = c
        .api(
            Method::PUT,
            &format!("networks/{net}"),
            "<network><name>renamed</name></network>",
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(
        c.api(Method::DELETE, &format!("templates/{tmpl}"), "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(count(&c.get(&format!("vms/{vm}/nics")).await.body, "nic"), 0);

    // The cluster's MAC pool: linked from the cluster, its ranges replaced, new NICs drawing
    // from the new range; bad ranges refused with the pool unchanged.
    let r = c.get(&format!("clusters/{cl}")).await;
    assert!(r.body.contains(&format!("/macpools/{cl}")), "{}", r.body);
    let r = c.get("macpools").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("<name>ncl</name>"), "{}", r.body);
    let r = c.get(&format!("macpools/{cl}")).await;
    assert_eq!(
        xml_text(&r.body, "from").as_deref(),
        Some("56:6f:00:00:00:00"),
        "{}",
        r.body
    );
    let put = |body: &'static str| {
        let c = &c;
        let path = format!("macpools/{cl}");
        async move { c.api(Method::PUT, &path, body).await }
    };
    let r = put("<mac_pool><ranges><range><from>02:1a:4a:00:00:10</from><to>02:1a:4a:00:00:1f</to></range></ranges></mac_pool>").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(xml_text(&r.body, "free").as_deref(), Some("16"), "{}", r.body);
    for bad in [
        "<mac_pool><ranges><range><from>03:00:00:00:00:00</from><to>03:00:00:00:00:05</to></range></ranges></mac_pool>",
        "<mac_pool><ranges><range><from>02:00:00:00:00:09</from><to>02:00:00:00:00:01</to></range></ranges></mac_pool>",
        "<mac_pool><ranges><range><from>02:00:00:00:00:00</from><to>02:00:00:00:00:09</to></range><range><from>02:00:00:00:00:05</from><to>02:00:00:00:00:0f</to></range></ranges></mac_pool>",
        "<mac_pool><ranges><range><from>nonsense</from><to>02:00:00:00:00:09</to></range></ranges></mac_pool>",
        "<mac_pool><name>other</name></mac_pool>",
    ] {
        let r = put(bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    let r = c
        .post(
            &format!("vms/{vm}/nics"),
            &format!("<nic><name>nic3</name><vnic_profile id=\"{profile}\"/></nic>"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let nic3 = root_id(&r.body);
    let mac = xml_text(&r.body, "address").unwrap();
    assert!(mac.starts_with("02:1a:4a:00:00:1"), "{mac}");
    let r = c.get(&format!("macpools/{cl}")).await;
    assert_eq!(xml_text(&r.body, "free").as_deref(), Some("15"), "{}", r.body);
    assert_eq!(
        c.api(Method::DELETE, &format!("vms/{vm}/nics/{nic3}"), "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        c.api(Method::DELETE, &format!("clusters/{cl}/networks/{net}"), "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        c.api(Method::DELETE, &format!("networks/{net}"), "").await.status,
        StatusCode::OK
    );
    assert_eq!(
        c.get(&format!("networks/{net}")).await.status,
        StatusCode::NOT_FOUND
    );

    // Bonds in `setupnetworks`: a malformed one is refused before any node is asked.
    let host = t
        .engine
        .app()
        .db
        .host_insert(&oxvirt_engine::model::Host::new(
            "bhost",
            "127.0.0.1",
            1,
            cl.parse().unwrap(),
        ))
        .await
        .unwrap();
    for (body, says) in [
        (
            "<host_nic><name>bond0</name></host_nic>",
            "bond bond0 needs",
        ),
        (
            "<host_nic><name>bond0</name><bonding><options><option><name>mode</name></option></options></bonding></host_nic>",
            "needs a",
        ),
        (
            "<host_nic><bonding/></host_nic>",
            "a bond",
        ),
    ] {
        let r = c
            .post(
                &format!("hosts/{}/setupnetworks", host.id),
                &format!("<action><modified_bonds>{body}</modified_bonds></action>"),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(r.body.contains(says), "{says}: {}", r.body);
    }
}

both_backends!(networks_clusters_profiles_and_vm_nics);
