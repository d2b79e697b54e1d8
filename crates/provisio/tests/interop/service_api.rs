//! The complete service API driven by the stock Node `azure-iot-provisioning-service`
//! client (which connects to port 443 only).

use std::process::Command;

use serde_json::{Value, json};

use crate::common::{Instance, PORT_443, Server, curl, now, repo_root};

/// Runs one operation of the stock Node service client (`interop/node/service.js`).
fn node(s: &Server, op: &str, args: Value) -> Value {
    let dir = repo_root().join("interop/node");
    assert!(dir.join("node_modules/azure-iot-provisioning-service").exists(), "run `npm ci --prefix interop/node`");
    let out = Command::new("node")
        .arg(dir.join("service.js"))
        .arg(op)
        .arg(args.to_string())
        .env("PROVISIO_CONNECTION_STRING", &s.info.service_connection_string)
        .env("NODE_EXTRA_CA_CERTS", s.ca_file())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("service.js {op}: no JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

fn ok(v: Value) -> Value {
    assert_eq!(v["ok"], true, "{v}");
    v["result"].clone()
}

fn err_status(v: &Value) -> u64 {
    assert_eq!(v["ok"], false, "{v}");
    v["error"]["statusCode"].as_u64().unwrap_or_else(|| panic!("no status: {v}"))
}

fn sym(id: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_service_client_drives_every_operation() {
    let _port = PORT_443.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:443", &["--linked-hub", "svc-hub.example.net"]);
    assert!(
        s.info.service_connection_string.starts_with("HostName=localhost;"),
        "{}",
        s.info.service_connection_string
    );

    // Individual enrollment: create, get (keys stripped), update with the etag.
    let mut e = sym("node-svc-1");
    e["initialTwin"] = json!({"tags": {"version": "1", "site": "a"}, "properties": {"desired": {"interval": 5}}});
    e["capabilities"] = json!({"iotEdge": true});
    e["reprovisionPolicy"] = json!({"updateHubAssignment": false, "migrateDeviceData": false});
    e["optionalDeviceInformation"] = json!({"additionalProperties": {"x": 1}});
    let created = ok(node(&s, "createOrUpdateIndividualEnrollment", json!({"enrollment": e})));
    assert!(created["attestation"]["symmetricKey"]["primaryKey"].is_string(), "{created}");
    let got = ok(node(&s, "getIndividualEnrollment", json!({"id": "node-svc-1"})));
    assert_eq!(got["attestation"], json!({"type": "symmetricKey"}));
    assert_eq!(got["registrationState"]["status"], "unassigned");
    // Twin collections are echoed verbatim, a tag named "version" included.
    assert_eq!(got["initialTwin"], e["initialTwin"]);
    assert_eq!(got["capabilities"]["iotEdge"], true);
    assert_eq!(got["optionalDeviceInformation"], e["optionalDeviceInformation"]);
    let mut upd = got.clone();
    upd.as_object_mut().unwrap().remove("registrationState");
    upd["attestation"] = created["attestation"].clone();
    upd["provisioningStatus"] = json!("disabled");
    let r = node(&s, "createOrUpdateIndividualEnrollment", json!({"enrollment": upd}));
    let updated = ok(r.clone());
    assert_eq!(updated["provisioningStatus"], "disabled");
    assert!(r["requests"][0]["ifMatch"].is_string(), "update sends If-Match: {r}");
    // A stale etag is refused (412); a create of an existing id is refused (409).
    let r = node(&s, "createOrUpdateIndividualEnrollment", json!({"enrollment": upd}));
    assert_eq!(err_status(&r), 412);
    assert_eq!(
        err_status(&node(&s, "createOrUpdateIndividualEnrollment", json!({"enrollment": sym("node-svc-1")}))),
        409
    );
    // Attestation mechanism returns the keys.
    let am = ok(node(&s, "getIndividualEnrollmentAttestationMechanism", json!({"id": "node-svc-1"})));
    assert_eq!(am["symmetricKey"]["primaryKey"], created["attestation"]["symmetricKey"]["primaryKey"]);

    // TPM and X.509 individual enrollments.
    let ek = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAxsj2gUScTk1UjuioeTlfGYZrrimExB+bScH75adUMRIi2UOMxG1kw4y+9RW/IVoMl4e620VxZad0ARX2gUqVjYO7KPVt3dyKhZS3dkcvfBisBhP1XH9B33VqHG9SHnbnQXdBUaCgKAfxome8UmBKfe+naTsE5fkvjb/do3/dD6l4sGBwFCnKRdln4XpM03zLpoHFao8zOwt8l/uP3qUIxmCYv9A7m69Ms+5/pCkTu/rK4mRDsfhZ0QLfbzVI6zQFOKF/rwsfBtFeWlWtcuJMKlXdD8TXWElTzgh7JS4qhFzreL0c1mI0GCj+Aws0usZh7dLIVPnlgZcBhgy1SSDQMQ==";
    let t = ok(node(
        &s,
        "createOrUpdateIndividualEnrollment",
        json!({"enrollment": {"registrationId": "node-tpm-1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}}),
    ));
    assert_eq!(t["attestation"]["tpm"]["endorsementKey"], ek);
    let t = ok(node(&s, "getIndividualEnrollment", json!({"id": "node-tpm-1"})));
    assert_eq!(t["attestation"]["tpm"]["endorsementKey"], ek, "the EK is public and returned by GET");

    // Groups: create, get, update with etag, attestation mechanism (lower-case route).
    let g = ok(node(
        &s,
        "createOrUpdateEnrollmentGroup",
        json!({"group": {"enrollmentGroupId": "node-grp", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "hashed", "iotHubs": ["svc-hub.example.net"]}}),
    ));
    let gk = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let mut gg = ok(node(&s, "getEnrollmentGroup", json!({"id": "node-grp"})));
    assert_eq!(gg["attestation"], json!({"type": "symmetricKey"}));
    assert_eq!(gg["iotHubs"], json!(["svc-hub.example.net"]));
    gg["attestation"] = g["attestation"].clone();
    gg["initialTwin"] = json!({"tags": {"t": 1}});
    assert_eq!(ok(node(&s, "createOrUpdateEnrollmentGroup", json!({"group": gg})))["initialTwin"]["tags"]["t"], 1);
    let r = node(&s, "getEnrollmentGroupAttestationMechanism", json!({"id": "node-grp"}));
    assert_eq!(ok(r.clone())["symmetricKey"]["primaryKey"], gk.as_str());
    assert!(r["requests"][0]["path"].as_str().unwrap().starts_with("/enrollmentgroups/"), "{r}");

    // Bulk create (one already exists), then paged queries.
    let items: Vec<Value> = (0..6).map(|i| sym(&format!("bulk-{i}"))).chain([sym("node-svc-1")]).collect();
    let b = ok(node(&s, "runBulkEnrollmentOperation", json!({"mode": "create", "enrollments": items})));
    assert_eq!(b["isSuccessful"], false, "{b}");
    assert_eq!(b["errors"].as_array().unwrap().len(), 1, "{b}");
    assert_eq!(b["errors"][0]["registrationId"], "node-svc-1");
    assert_eq!(b["errors"][0]["errorCode"], 409_201);
    let q = ok(node(&s, "queryIndividualEnrollments", json!({"pageSize": 3})));
    let pages = q["pages"].as_array().unwrap();
    let all: Vec<&Value> = pages.iter().flat_map(|p| p.as_array().unwrap()).collect();
    assert_eq!(all.len(), 8, "{q}"); // 6 bulk + node-svc-1 + node-tpm-1
    assert!(pages.iter().all(|p| p.as_array().unwrap().len() <= 3), "{q}");
    assert_eq!(pages.len(), 3);
    assert!(
        all.iter().all(|e| e.get("registrationState").is_none() && e["attestation"].get("symmetricKey").is_none()),
        "{q}"
    );
    ok(node(
        &s,
        "createOrUpdateEnrollmentGroup",
        json!({"group": {"enrollmentGroupId": "node-grp-2", "attestation": {"type": "symmetricKey"}}}),
    ));
    let q = ok(node(&s, "queryEnrollmentGroups", json!({"pageSize": 1})));
    let pages = q["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 2, "{q}");
    assert_eq!(pages[0][0]["enrollmentGroupId"], "node-grp");
    assert_eq!(pages[1][0]["enrollmentGroupId"], "node-grp-2");
    assert!(pages[0][0]["attestation"].get("symmetricKey").is_none(), "query strips keys: {q}");
    // Bulk delete.
    let del: Vec<Value> = (0..6)
        .map(|i| json!({"registrationId": format!("bulk-{i}"), "attestation": {"type": "symmetricKey"}}))
        .collect();
    let b = ok(node(&s, "runBulkEnrollmentOperation", json!({"mode": "delete", "enrollments": del})));
    assert_eq!(b["isSuccessful"], true, "{b}");
    assert_eq!(err_status(&node(&s, "getIndividualEnrollment", json!({"id": "bulk-3"}))), 404);

    // Registration states: two group devices register, then get, query by group, delete.
    for id in ["grp-dev-1", "grp-dev-2"] {
        let key = provisio_core::keys::derive_device_key(&gk, id).unwrap();
        let token = provisio_core::sas::build_token(
            &format!("{}/registrations/{id}", s.info.id_scope),
            &key,
            now() + 600,
            Some("registration"),
            provisio_core::sas::SrEncoding::Raw,
        )
        .unwrap();
        let (st, _, _) = curl(
            &s,
            "PUT",
            &format!("/{}/registrations/{id}/register?api-version=2019-03-31", s.info.id_scope),
            Some(&token),
            Some("{}"),
        );
        assert_eq!(st, 202);
    }
    let st = ok(node(&s, "getDeviceRegistrationState", json!({"id": "grp-dev-1"})));
    assert_eq!(st["status"], "assigned");
    assert_eq!(st["assignedHub"], "svc-hub.example.net");
    let q = ok(node(&s, "queryDeviceRegistrationStates", json!({"groupId": "node-grp", "pageSize": 1})));
    assert_eq!(q["pages"].as_array().unwrap().len(), 2, "{q}");
    assert_eq!(q["pages"][1][0]["registrationId"], "grp-dev-2");
    ok(node(&s, "deleteDeviceRegistrationState", json!({"id": "grp-dev-1", "etag": st["etag"]})));
    assert_eq!(err_status(&node(&s, "getDeviceRegistrationState", json!({"id": "grp-dev-1"}))), 404);

    // Deletes with etags.
    let cur = ok(node(&s, "getEnrollmentGroup", json!({"id": "node-grp"})));
    assert_eq!(err_status(&node(&s, "deleteEnrollmentGroup", json!({"id": "node-grp", "etag": "stale"}))), 412);
    ok(node(&s, "deleteEnrollmentGroup", json!({"id": "node-grp", "etag": cur["etag"]})));
    ok(node(&s, "deleteIndividualEnrollment", json!({"id": "node-svc-1"})));
    assert_eq!(err_status(&node(&s, "getEnrollmentGroup", json!({"id": "node-grp"}))), 404);
    // The group's registration records outlive it, as in DPS.
    let q = ok(node(&s, "queryDeviceRegistrationStates", json!({"groupId": "node-grp", "pageSize": 10})));
    assert_eq!(q["pages"][0].as_array().unwrap().len(), 1, "{q}");
}
