//! The complete service API: driven by the stock Node `azure-iot-provisioning-service`
//! client, and every error path with our own client.

use std::process::Command;

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{PORT_443, Server, assert_dps_error, curl, now, repo_root, service};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_api_error_paths_rights_policies_and_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("p.toml");
    std::fs::write(&cfg, "service_requests_per_second = 0\n").unwrap();
    let s = Server::start(&tmp.path().join("a"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let v = "api-version=2021-10-01";

    // Bulk: too many items, unknown mode, updateIfMatchETag without etags.
    let eleven: Vec<Value> = (0..11).map(|i| sym(&format!("b{i}"))).collect();
    let (st, b) = service(
        &s,
        Method::POST,
        &format!("/enrollments?{v}"),
        None,
        Some(json!({"mode": "create", "enrollments": eleven})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, b) = service(
        &s,
        Method::POST,
        &format!("/enrollments?{v}"),
        None,
        Some(json!({"mode": "upsert", "enrollments": []})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, b) = service(&s, Method::POST, &format!("/enrollmentGroups?{v}"), None, Some(json!({"mode": "create", "enrollmentGroups": [{"enrollmentGroupId": "bg", "attestation": {"type": "symmetricKey"}}, {"enrollmentGroupId": "bad id", "attestation": {"type": "symmetricKey"}}]}))).await;
    assert_eq!(st, 200);
    assert_eq!(b["errors"][0]["enrollmentGroupId"], "bad id", "{b}");
    assert_eq!(b["errors"][0]["errorCode"], 400_004);
    let (st, b) = service(&s, Method::POST, &format!("/enrollmentGroups?{v}"), None, Some(json!({"mode": "updateIfMatchETag", "enrollmentGroups": [{"enrollmentGroupId": "bg", "attestation": {"type": "symmetricKey"}}]}))).await;
    assert_eq!((st, b["errors"][0]["errorCode"].as_u64()), (200, Some(412_001)), "{b}");
    let (st, b) = service(&s, Method::POST, &format!("/enrollmentGroups?{v}"), None, Some(json!({"mode": "update", "enrollmentGroups": [{"enrollmentGroupId": "bg", "attestation": {"type": "symmetricKey"}}]}))).await;
    assert_eq!(
        (st, b["errors"][0]["errorCode"].as_u64()),
        (200, Some(409_201)),
        "update without etag acts like PUT without If-Match: {b}"
    );

    // Queries: WHERE is refused, a forged continuation is refused, unknown group is 404.
    let (st, b) = service(
        &s,
        Method::POST,
        &format!("/enrollments/query?{v}"),
        None,
        Some(json!({"query": "SELECT * FROM enrollments WHERE x = 1"})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);
    let r = s
        .client()
        .post(s.url(&format!("/enrollmentGroups/query?{v}")))
        .header("Authorization", s.service_token())
        .header("x-ms-continuation", "%%%")
        .json(&json!({"query": "select *"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (st, b) = service(&s, Method::POST, &format!("/registrations/never-was/query?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_204);
    // An empty result has no continuation and the item type.
    let r = s
        .client()
        .post(s.url(&format!("/enrollments/query?{v}")))
        .header("Authorization", s.service_token())
        .header("x-ms-max-item-count", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ms-item-type"], "Enrollment");
    assert!(r.headers().get("x-ms-continuation").is_none());
    assert_eq!(r.json::<Value>().await.unwrap(), json!([]));
    // Registration state of an unknown device; attestation mechanism of an unknown enrollment.
    let (st, b) = service(&s, Method::GET, &format!("/registrations/nobody?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_202);
    let (st, b) = service(&s, Method::POST, &format!("/enrollments/nobody/attestationmechanism?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_201);
    // Group TPM and "none" attestation are refused with a reason.
    let (st, b) = service(
        &s,
        Method::PUT,
        &format!("/enrollmentGroups/tg?{v}"),
        None,
        Some(json!({"enrollmentGroupId": "tg", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);

    // Policies: add a read-only one; it can read but not write.
    let (st, p) = service(
        &s,
        Method::PUT,
        &format!("/policies/reader?{v}"),
        None,
        Some(json!({"keyName": "reader", "rights": "EnrollmentRead, registrationstatusread"})),
    )
    .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["rights"], "EnrollmentRead, RegistrationStatusRead");
    let reader = provisio_core::sas::build_token(
        "localhost",
        p["primaryKey"].as_str().unwrap(),
        now() + 600,
        Some("reader"),
        provisio_core::sas::SrEncoding::Upper,
    )
    .unwrap();
    let r = s
        .client()
        .get(s.url(&format!("/enrollmentGroups/bg?{v}")))
        .header("Authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client()
        .put(s.url(&format!("/enrollments/new-one?{v}")))
        .header("Authorization", &reader)
        .json(&sym("new-one"))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    assert_dps_error(st, &r.json::<Value>().await.unwrap(), 403, 403_001);
    let r = s.client().get(s.url(&format!("/certificates?{v}"))).header("Authorization", &reader).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // Unknown right; list; regenerate; the old key stops working.
    let (st, b) =
        service(&s, Method::PUT, &format!("/policies/bad?{v}"), None, Some(json!({"rights": "Everything"}))).await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, list) = service(&s, Method::GET, &format!("/policies?{v}"), None, None).await;
    assert_eq!(st, 200);
    assert_eq!(list["value"].as_array().unwrap().len(), 2);
    let (st, p2) = service(
        &s,
        Method::POST,
        &format!("/policies/reader/regenerateKey?{v}"),
        None,
        Some(json!({"keyType": "primary"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_ne!(p2["primaryKey"], p["primaryKey"]);
    assert_eq!(p2["secondaryKey"], p["secondaryKey"]);
    let r = s
        .client()
        .get(s.url(&format!("/enrollmentGroups/bg?{v}")))
        .header("Authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The last ServiceConfig policy cannot be removed or demoted.
    let (st, b) = service(&s, Method::DELETE, &format!("/policies/provisioningserviceowner?{v}"), None, None).await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, _) = service(&s, Method::DELETE, &format!("/policies/reader?{v}"), None, None).await;
    assert_eq!(st, 204);
    let (st, b) = service(&s, Method::GET, &format!("/policies/reader?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_001);

    // Rate limit: with 1 request/s (burst 2), a quick burst gets 429 with Retry-After.
    let tmp2 = tempfile::tempdir().unwrap();
    let cfg2 = tmp2.path().join("p.toml");
    std::fs::write(&cfg2, "service_requests_per_second = 1\n").unwrap();
    let s2 = Server::start(&tmp2.path().join("b"), "127.0.0.1:0", &["--config", cfg2.to_str().unwrap()]);
    let mut throttled = None;
    for _ in 0..6 {
        let r = s2
            .client()
            .get(s2.url(&format!("/enrollments/x?{v}")))
            .header("Authorization", s2.service_token())
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            throttled = Some((r.headers().get("retry-after").cloned(), r.json::<Value>().await.unwrap()));
            break;
        }
    }
    let (retry, body) = throttled.expect("6 quick requests at 1/s were never throttled");
    assert!(retry.is_some());
    assert_dps_error(429, &body, 429, 429_001);
}
