//! Allocation: the custom allocation webhook against a real HTTP server inside the test,
//! re-provisioning policies across a hub change, the hub registrar, and the hubs API/CLI.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::post};
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{Instance, Server, curl, now, service};

/// Every request the fake webhook received.
type Seen = Arc<Mutex<Vec<Value>>>;

/// The customer's webhook: its answer depends on the registration id.
async fn allocate(State(seen): State<Seen>, Json(req): Json<Value>) -> axum::response::Response {
    seen.lock().unwrap().push(req.clone());
    let id = req["deviceRuntimeContext"]["registrationId"].as_str().unwrap_or("").to_owned();
    match id.as_str() {
        "wh-slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Json(json!({"iotHubHostName": "hub-a.example.net"})).into_response()
        }
        "wh-500" => (StatusCode::INTERNAL_SERVER_ERROR, "database on fire").into_response(),
        "wh-badjson" => (StatusCode::OK, "{not json").into_response(),
        "wh-unknown" => Json(json!({"iotHubHostName": "evil.example.net"})).into_response(),
        "wh-nohub" => Json(json!({"payload": {"x": 1}})).into_response(),
        _ => Json(json!({
            "iotHubHostName": "hub-b.example.net",
            "initialTwin": {"tags": {"from": "webhook"}, "properties": {"desired": {"rate": 10}}},
            "payload": {"greeting": "hello", "echo": req["deviceRuntimeContext"]["payload"].clone()},
        }))
        .into_response(),
    }
}

/// The hub registrar endpoint: records identities; says "already existed" for one id and
/// fails for another.
async fn registrar(State(seen): State<Seen>, Json(dev): Json<Value>) -> axum::response::Response {
    seen.lock().unwrap().push(dev.clone());
    match dev["registrationId"].as_str().unwrap_or("") {
        "rp-broken" => (StatusCode::SERVICE_UNAVAILABLE, "hub down").into_response(),
        "rp-existing" => Json(json!({"alreadyExisted": true})).into_response(),
        _ => Json(json!({})).into_response(),
    }
}

async fn start_http(seen: Seen) -> String {
    let app = Router::new().route("/alloc", post(allocate)).route("/registrar", post(registrar)).with_state(seen);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

/// The last audit line of `id`'s registration attempts.
fn audit_line(s: &Server, id: &str) -> Value {
    let log = std::fs::read_to_string(s.data_dir.join("audit.jsonl")).unwrap();
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["registrationId"] == id)
        .unwrap_or_else(|| panic!("no audit line for {id}"))
}

fn register(s: &Server, id: &str, key: &str, body: &str) -> Value {
    let scope = &s.info.id_scope;
    let token = provisio_core::sas::build_token(
        &format!("{scope}/registrations/{id}"),
        key,
        now() + 600,
        None,
        provisio_core::sas::SrEncoding::Raw,
    )
    .unwrap();
    let (st, _, v) = curl(
        s,
        "PUT",
        &format!("/{scope}/registrations/{id}/register?api-version=2019-03-31"),
        Some(&token),
        Some(body),
    );
    assert_eq!(st, 202, "{v}");
    let op = v["operationId"].as_str().unwrap();
    let (st, _, v) = curl(
        s,
        "GET",
        &format!("/{scope}/registrations/{id}/operations/{op}?api-version=2019-03-31"),
        Some(&token),
        None,
    );
    assert_eq!(st, 200, "{v}");
    v
}

/// The webhooks of these tests run on loopback, which the server calls only when allowed.
const LOOPBACK_ALLOWED: &str = "webhook_allowed_networks = [\"127.0.0.0/8\"]\n";

fn hubs_cfg(dir: &std::path::Path, extra: &str) -> String {
    let p = dir.join("provisio.toml");
    std::fs::write(&p, format!("linked_hubs = [\"hub-a.example.net\", \"hub-b.example.net\"]\n{extra}")).unwrap();
    p.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_allocation_webhook() {
    let seen: Seen = Arc::default();
    let base = start_http(seen.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = hubs_cfg(tmp.path(), &format!("webhook_timeout_secs = 1\nwebhook_attempts = 2\n{LOOPBACK_ALLOWED}"));
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--config", &cfg]);
    let v = "api-version=2021-10-01";

    // Custom needs a definition.
    let (st, b) = service(
        &s,
        Method::PUT,
        &format!("/enrollments/x?{v}"),
        None,
        Some(json!({"registrationId": "x", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom"})),
    )
    .await;
    crate::common::assert_dps_error(st, &b, 400, 400_004);

    // An individual enrollment allocated by the webhook, with a device payload.
    let (st, e) = service(&s, Method::PUT, &format!("/enrollments/wh-dev-1?{v}"), None, Some(json!({
        "registrationId": "wh-dev-1", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": format!("{base}/alloc?code=secret-function-key"), "apiVersion": "2021-10-01"},
        "initialTwin": {"tags": {"site": "plant-1"}, "properties": {"desired": {"rate": 1}}},
    }))).await;
    assert_eq!(st, 200, "{e}");
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let r = register(&s, "wh-dev-1", key, r#"{"registrationId":"wh-dev-1","payload":{"model":"m7"}}"#);
    let rs = &r["registrationState"];
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(rs["assignedHub"], "hub-b.example.net");
    assert_eq!(rs["payload"], json!({"greeting": "hello", "echo": {"model": "m7"}}));
    // The request, field by field.
    let req = seen.lock().unwrap().last().cloned().unwrap();
    let ctx = &req["deviceRuntimeContext"];
    assert_eq!(ctx["registrationId"], "wh-dev-1");
    assert_eq!(ctx["symmetricKey"], json!({}));
    assert_eq!(ctx["payload"], json!({"model": "m7"}));
    assert!(ctx.get("currentIotHubHostName").is_none() && ctx.get("currentDeviceId").is_none(), "{req}");
    assert_eq!(req["linkedHubs"], json!(["hub-a.example.net", "hub-b.example.net"]));
    let ie = &req["individualEnrollment"];
    assert_eq!(ie["registrationId"], "wh-dev-1");
    assert_eq!(ie["attestation"], json!({"type": "symmetricKey"}), "no secrets to the webhook");
    assert_eq!(ie["allocationPolicy"], "custom");
    assert_eq!(ie["initialTwin"]["tags"]["site"], "plant-1");
    assert!(req.get("enrollmentGroup").is_none());
    // The twin kept with the registration: the enrollment's merged with the webhook's.
    let (_, state) = service(&s, Method::GET, &format!("/registrations/wh-dev-1?{v}"), None, None).await;
    assert_eq!(
        state["initialTwin"],
        json!({"tags": {"site": "plant-1", "from": "webhook"}, "properties": {"desired": {"rate": 10}}})
    );
    assert_eq!(state["payload"]["greeting"], "hello");
    // Registering again tells the webhook where the device is.
    register(&s, "wh-dev-1", key, "{}");
    let req = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(req["deviceRuntimeContext"]["currentIotHubHostName"], "hub-b.example.net");
    assert_eq!(req["deviceRuntimeContext"]["currentDeviceId"], "wh-dev-1");
    assert!(req["deviceRuntimeContext"].get("payload").is_none());

    // Failures, through a group: each is `failed` / 400207; the device reads the status
    // code at most, the audit log the precise cause.
    let (st, g) = service(
        &s,
        Method::PUT,
        &format!("/enrollmentGroups/wh-group?{v}"),
        None,
        Some(json!({
            "enrollmentGroupId": "wh-group", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": format!("{base}/alloc"), "apiVersion": "2021-10-01"},
        })),
    )
    .await;
    assert_eq!(st, 200);
    let gk = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    for (id, shown, audited) in [
        ("wh-slow", "Custom allocation failed: the webhook could not be reached.", "timed out"),
        ("wh-500", "Custom allocation failed with status code: 500", "database on fire"),
        ("wh-badjson", "Custom allocation failed: the webhook's answer is not valid JSON.", "{not json"),
        ("wh-unknown", "not one of the linked hubs", "evil.example.net"),
        ("wh-nohub", "no iotHubHostName", "no iotHubHostName"),
    ] {
        let dk = provisio_core::keys::derive_device_key(&gk, id).unwrap();
        let r = register(&s, id, &dk, "{}");
        assert_eq!(r["status"], "failed", "{id}: {r}");
        assert_eq!(r["registrationState"]["errorCode"], 400_207, "{id}: {r}");
        let msg = r["registrationState"]["errorMessage"].as_str().unwrap();
        assert!(msg.contains(shown), "{id}: '{msg}' lacks '{shown}'");
        if shown != audited {
            assert!(!msg.contains(audited), "{id}: the device reads '{msg}'");
        }
        let line = audit_line(&s, id);
        assert!(line["reason"].as_str().unwrap().contains(audited), "{id}: {line}");
        assert!(!line.to_string().contains("secret-function-key"));
    }
    // A 500 is retried (2 attempts), a timeout too; the group device saw enrollmentGroup.
    let n500 = seen.lock().unwrap().iter().filter(|r| r["deviceRuntimeContext"]["registrationId"] == "wh-500").count();
    assert_eq!(n500, 2);
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["enrollmentGroup"]["enrollmentGroupId"], "wh-group");
    assert_eq!(last["enrollmentGroup"]["attestation"], json!({"type": "symmetricKey"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovision_policies_across_a_hub_change_and_the_hub_registrar() {
    let seen: Seen = Arc::default();
    let base = start_http(seen.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = hubs_cfg(tmp.path(), &format!("hub_registrar = \"webhook\"\nwebhook_attempts = 2\n{LOOPBACK_ALLOWED}"));
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--config", &cfg]);
    let v = "api-version=2021-10-01";
    // Hub B's identities go to the registrar endpoint.
    let (st, h) = service(
        &s,
        Method::PUT,
        &format!("/linkedHubs/hub-b.example.net?{v}"),
        None,
        Some(json!({"allocationWeight": 1, "registrarWebhookUrl": format!("{base}/registrar")})),
    )
    .await;
    assert_eq!(st, 200, "{h}");

    let put = |id: &str, hub: &str, policy: Option<Value>| {
        let mut e = json!({
            "registrationId": id, "attestation": {"type": "symmetricKey"}, "allocationPolicy": "static", "iotHubs": [hub],
            "initialTwin": {"tags": {"hub": hub}},
        });
        if let Some(p) = policy {
            e["reprovisionPolicy"] = p;
        }
        e
    };
    for (id, policy, hub_after, sub_after, twin_after) in [
        ("rp-migrate", None, "hub-b.example.net", "deviceDataMigrated", "hub-a.example.net"),
        (
            "rp-reset",
            Some(json!({"updateHubAssignment": true, "migrateDeviceData": false})),
            "hub-b.example.net",
            "deviceDataReset",
            "hub-b.example.net",
        ),
        (
            "rp-never",
            Some(json!({"updateHubAssignment": false, "migrateDeviceData": false})),
            "hub-a.example.net",
            "initialAssignment",
            "hub-a.example.net",
        ),
    ] {
        let (st, e) = service(
            &s,
            Method::PUT,
            &format!("/enrollments/{id}?{v}"),
            None,
            Some(put(id, "hub-a.example.net", policy.clone())),
        )
        .await;
        assert_eq!(st, 200, "{e}");
        let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
        let r = register(&s, id, &key, "{}");
        assert_eq!(r["registrationState"]["assignedHub"], "hub-a.example.net");
        assert_eq!(r["registrationState"]["substatus"], "initialAssignment");
        // The enrollment now points at hub B.
        let mut upd = put(id, "hub-b.example.net", policy);
        upd["attestation"] = e["attestation"].clone();
        let (st, _) = service(&s, Method::PUT, &format!("/enrollments/{id}?{v}"), Some("*"), Some(upd)).await;
        assert_eq!(st, 200);
        // The device sends a payload this time: the registrar gets it too.
        let r = register(&s, id, &key, &format!(r#"{{"payload":{{"site":"{id}"}}}}"#));
        assert_eq!(r["registrationState"]["assignedHub"], hub_after, "{id}: {r}");
        assert_eq!(r["registrationState"]["substatus"], sub_after, "{id}: {r}");
        let (_, state) = service(&s, Method::GET, &format!("/registrations/{id}?{v}"), None, None).await;
        assert_eq!(state["initialTwin"]["tags"]["hub"], twin_after, "{id}: twin {state}");
    }
    // The registrar saw the moves to hub B, with credentials, twin and the hub left.
    let calls = seen.lock().unwrap().clone();
    let migrate = calls.iter().find(|c| c["registrationId"] == "rp-migrate").expect("registrar called for rp-migrate");
    assert_eq!(migrate["iotHubHostName"], "hub-b.example.net");
    assert_eq!(migrate["previousIotHubHostName"], "hub-a.example.net");
    assert_eq!(migrate["migrateDeviceData"], true);
    assert_eq!(migrate["authentication"]["type"], "sas");
    assert!(migrate["authentication"]["primaryKey"].as_str().is_some_and(|k| !k.is_empty()));
    let reset = calls.iter().find(|c| c["registrationId"] == "rp-reset").unwrap();
    assert_eq!(reset["initialTwin"]["tags"]["hub"], "hub-b.example.net");
    // Issue #25, point 4: the device's payload reaches the registrar.
    assert_eq!(migrate["payload"], json!({"site": "rp-migrate"}));
    assert_eq!(reset["payload"], json!({"site": "rp-reset"}));
    assert!(calls.iter().all(|c| c["registrationId"] != "rp-never"), "hub A has no registrar");

    // Deleting the registration state lets the device register afresh.
    let (st, _) = service(&s, Method::DELETE, &format!("/registrations/rp-migrate?{v}"), None, None).await;
    assert_eq!(st, 204);
    let (_, e) =
        service(&s, Method::POST, &format!("/enrollments/rp-migrate/attestationmechanism?{v}"), None, None).await;
    let key = e["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let r = register(&s, "rp-migrate", &key, "{}");
    assert_eq!(r["registrationState"]["substatus"], "initialAssignment");
    // …unless the hub already had it: reprovisionedToInitialAssignment.
    let (_, e) = service(
        &s,
        Method::PUT,
        &format!("/enrollments/rp-existing?{v}"),
        None,
        Some(put("rp-existing", "hub-b.example.net", None)),
    )
    .await;
    let r = register(&s, "rp-existing", e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap(), "{}");
    assert_eq!(r["registrationState"]["substatus"], "reprovisionedToInitialAssignment", "{r}");
    // A registrar that keeps failing fails the registration with the cause.
    let (_, e) = service(
        &s,
        Method::PUT,
        &format!("/enrollments/rp-broken?{v}"),
        None,
        Some(put("rp-broken", "hub-b.example.net", None)),
    )
    .await;
    let r = register(&s, "rp-broken", e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap(), "{}");
    assert_eq!(r["status"], "failed");
    assert_eq!(r["registrationState"]["errorCode"], 400_209);
    let msg = r["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(msg.contains("HTTP 503") && !msg.contains("hub down"), "{r}");
    assert!(audit_line(&s, "rp-broken")["reason"].as_str().unwrap().contains("hub down"));
    // Disabling works as in DPS: `disabled`, hub untouched.
    let mut off = put("rp-reset", "hub-b.example.net", None);
    off["provisioningStatus"] = json!("disabled");
    let (_, am) =
        service(&s, Method::POST, &format!("/enrollments/rp-reset/attestationmechanism?{v}"), None, None).await;
    off["attestation"] = json!({"type": "symmetricKey", "symmetricKey": am["symmetricKey"].clone()});
    service(&s, Method::PUT, &format!("/enrollments/rp-reset?{v}"), Some("*"), Some(off)).await;
    let r = register(&s, "rp-reset", am["symmetricKey"]["primaryKey"].as_str().unwrap(), "{}");
    assert_eq!(r["status"], "disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_api_and_cli_weights_and_geo_latency() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = hubs_cfg(tmp.path(), "region = \"westeurope\"\nallocation_policy = \"geoLatency\"\n");
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--config", &cfg]);
    let cli = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_provisio"))
            .args(args)
            .arg("--json")
            .env("PROVISIO_CONNECTION_STRING", &s.info.service_connection_string)
            .env("PROVISIO_CA", s.ca_file())
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["hub", "add", "hub-eu.example.net", "--weight", "5", "--region", "westeurope"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["allocationWeight"], 5);
    let (ok, _, err) = cli(&["hub", "add", "bad.example.net", "--weight", "0"]);
    assert!(!ok && err.contains("allocationWeight"), "{err}");
    let (ok, out, _) = cli(&["hub", "list"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().len(), 3);
    // geoLatency (the service default here): devices go to the hub of this node's region.
    let (_, g) = service(
        &s,
        Method::PUT,
        "/enrollmentGroups/geo?api-version=2021-10-01",
        None,
        Some(json!({"enrollmentGroupId": "geo", "attestation": {"type": "symmetricKey"}})),
    )
    .await;
    let gk = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    for i in 0..5 {
        let id = format!("geo-{i}");
        let r = register(&s, &id, &provisio_core::keys::derive_device_key(&gk, &id).unwrap(), "{}");
        assert_eq!(r["registrationState"]["assignedHub"], "hub-eu.example.net", "{r}");
    }
    // Excluded from allocation: devices spread over the other two.
    let (ok, _, err) = cli(&["hub", "update", "hub-eu.example.net", "--apply-allocation-policy", "false"]);
    assert!(ok, "{err}");
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let id = format!("geo2-{i}");
        let r = register(&s, &id, &provisio_core::keys::derive_device_key(&gk, &id).unwrap(), "{}");
        seen.insert(r["registrationState"]["assignedHub"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, ["hub-a.example.net".to_owned(), "hub-b.example.net".to_owned()].into_iter().collect());
    let (ok, _, _) = cli(&["hub", "remove", "hub-eu.example.net"]);
    assert!(ok);
    let (ok, out, _) = cli(&["hub", "list"]);
    assert!(ok && !out.contains("hub-eu"));
    // A static enrollment may not list two hubs.
    let (st, b) = service(&s, Method::PUT, "/enrollments/st?api-version=2021-10-01", None, Some(json!({"registrationId": "st", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "static", "iotHubs": ["hub-a.example.net", "hub-b.example.net"]}))).await;
    crate::common::assert_dps_error(st, &b, 400, 400_004);
}

/// `max_concurrent_operations`: while one registration waits on a slow webhook, a second
/// one on a node limited to one operation gets 429 + Retry-After, and goes through after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operation_limit_answers_429() {
    let seen: Seen = Arc::default();
    let base = start_http(seen.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg =
        hubs_cfg(tmp.path(), &format!("webhook_timeout_secs = 10\nmax_concurrent_operations = 1\n{LOOPBACK_ALLOWED}"));
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--config", &cfg]);
    let v = "api-version=2021-10-01";
    let (st, g) = service(
        &s,
        Method::PUT,
        &format!("/enrollmentGroups/busy?{v}"),
        None,
        Some(json!({
            "enrollmentGroupId": "busy", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": format!("{base}/alloc"), "apiVersion": "2021-10-01"},
        })),
    )
    .await;
    assert_eq!(st, 200, "{g}");
    let gk = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let put = |id: &'static str| {
        let (client, url, scope) = (s.client(), s.url(""), s.info.id_scope.clone());
        let key = provisio_core::keys::derive_device_key(&gk, id).unwrap();
        async move {
            let token = provisio_core::sas::build_token(
                &format!("{scope}/registrations/{id}"),
                &key,
                now() + 600,
                Some("registration"),
                provisio_core::sas::SrEncoding::Raw,
            )
            .unwrap();
            let r = client
                .put(format!("{url}/{scope}/registrations/{id}/register?api-version=2021-06-01"))
                .header("Authorization", token)
                .json(&json!({"registrationId": id}))
                .send()
                .await
                .unwrap();
            let retry = r.headers().get("retry-after").map(|h| h.to_str().unwrap().to_owned());
            (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
        }
    };
    // wh-slow holds the only permit for 3 s (the webhook sleeps).
    let slow = tokio::spawn(put("wh-slow"));
    let calling = crate::common::eventually(Duration::from_secs(10), async || {
        seen.lock().unwrap().iter().any(|r| r["deviceRuntimeContext"]["registrationId"] == "wh-slow")
    })
    .await;
    assert!(calling, "the slow registration never reached its webhook");
    let (st, retry, body) = put("busy-dev").await;
    crate::common::assert_dps_error(st, &body, 429, 429_001);
    assert_eq!(retry.as_deref(), Some("1"));
    let (st, _, body) = slow.await.unwrap();
    assert_eq!(st, 202, "{body}");
    let (st, _, body) = put("busy-dev").await;
    assert_eq!(st, 202, "after the slow one finished: {body}");
}

/// A listener on loopback that nothing accepts from: once a call has returned, its queue
/// shows whether anyone connected (the kernel completes a connection before any accept).
fn quiet_listener() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn nobody_connected(l: &std::net::TcpListener) -> bool {
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Issue #24, finding 2: without `webhook_allowed_networks` a webhook or registrar URL on
/// loopback is refused when stored (literal addresses) and when called (names, after they
/// resolve); nothing reaches the endpoint, and the device reads one message whatever was
/// there: a closed port, a webhook answering 500 with a body, a port that never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_on_loopback_are_refused_without_the_allow_list_and_devices_cannot_tell_ports_apart() {
    let seen: Seen = Arc::default();
    let base = start_http(seen.clone()).await;
    let port = base.rsplit(':').next().unwrap().to_owned();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (quiet, quiet_port) = quiet_listener();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = hubs_cfg(tmp.path(), "hub_registrar = \"webhook\"\nwebhook_timeout_secs = 1\nwebhook_attempts = 1\n");
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--config", &cfg]);
    let v = "api-version=2021-10-01";
    let custom = |id: &str, url: &str| {
        json!({
            "registrationId": id, "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
        })
    };

    // Literal addresses are refused when stored, in any spelling.
    for url in [
        format!("{base}/alloc"),
        format!("http://[::ffff:127.0.0.1]:{port}/alloc"),
        "https://169.254.169.254/metadata/instance".to_owned(),
        "https://10.0.0.1/alloc".to_owned(),
    ] {
        let (st, b) = service(&s, Method::PUT, &format!("/enrollments/lit?{v}"), None, Some(custom("lit", &url))).await;
        crate::common::assert_dps_error(st, &b, 400, 400_004);
        assert!(b["message"].as_str().unwrap().contains("webhook_allowed_networks"), "{url}: {b}");
    }
    let (st, b) = service(
        &s,
        Method::PUT,
        &format!("/linkedHubs/hub-b.example.net?{v}"),
        None,
        Some(json!({"allocationWeight": 1, "registrarWebhookUrl": format!("{base}/registrar")})),
    )
    .await;
    crate::common::assert_dps_error(st, &b, 400, 400_004);

    // Names are resolved when called, and loopback refused: a closed port, the webhook that
    // answers 500 with a body, and a port that would never answer.
    let mut messages = std::collections::BTreeSet::new();
    for (id, url) in [
        ("lo-closed", format!("http://localhost:{closed}/alloc")),
        ("wh-500", format!("http://localhost:{port}/alloc")),
        ("lo-quiet", format!("https://localhost:{quiet_port}/alloc")),
    ] {
        let (st, e) = service(&s, Method::PUT, &format!("/enrollments/{id}?{v}"), None, Some(custom(id, &url))).await;
        assert_eq!(st, 200, "{e}");
        let r = register(&s, id, e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap(), "{}");
        assert_eq!(r["status"], "failed", "{id}: {r}");
        assert_eq!(r["registrationState"]["errorCode"], 400_207, "{id}: {r}");
        messages.insert(r["registrationState"]["errorMessage"].as_str().unwrap().to_owned());
        let line = audit_line(&s, id);
        assert!(line["reason"].as_str().unwrap().contains("localhost resolves to"), "{id}: {line}");
    }
    assert_eq!(
        messages.into_iter().collect::<Vec<_>>(),
        ["Custom allocation failed: the webhook could not be reached."]
    );
    assert!(seen.lock().unwrap().is_empty(), "a request reached the webhook");
    assert!(nobody_connected(&quiet), "the server connected to a refused address");

    // The hub registrar: the same rules.
    let (st, h) = service(
        &s,
        Method::PUT,
        &format!("/linkedHubs/hub-b.example.net?{v}"),
        None,
        Some(json!({"allocationWeight": 1, "registrarWebhookUrl": format!("http://localhost:{port}/registrar")})),
    )
    .await;
    assert_eq!(st, 200, "{h}");
    let (_, e) = service(
        &s,
        Method::PUT,
        &format!("/enrollments/lo-reg?{v}"),
        None,
        Some(json!({"registrationId": "lo-reg", "attestation": {"type": "symmetricKey"},
                    "allocationPolicy": "static", "iotHubs": ["hub-b.example.net"]})),
    )
    .await;
    let r = register(&s, "lo-reg", e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap(), "{}");
    assert_eq!(r["registrationState"]["errorCode"], 400_209, "{r}");
    assert_eq!(
        r["registrationState"]["errorMessage"],
        "Creating the device at hub-b.example.net failed: the hub registrar for hub-b.example.net could not be reached"
    );
    assert!(seen.lock().unwrap().is_empty(), "a request reached the registrar");
}

/// Issue #24, finding 11: webhook and registrar URLs (they hold function keys) are sealed
/// at rest when `encryption_key` is set, and still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_are_sealed_at_rest_and_still_called() {
    let seen: Seen = Arc::default();
    let base = start_http(seen.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let key = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
    let cfg =
        hubs_cfg(tmp.path(), &format!("hub_registrar = \"webhook\"\nencryption_key = \"{key}\"\n{LOOPBACK_ALLOWED}"));
    let data = tmp.path().join("server");
    let mut s = Server::start(&data, "127.0.0.1:0", &["--config", &cfg]);
    let v = "api-version=2021-10-01";
    let (st, h) = service(
        &s,
        Method::PUT,
        &format!("/linkedHubs/hub-b.example.net?{v}"),
        None,
        Some(json!({"allocationWeight": 1, "registrarWebhookUrl": format!("{base}/registrar?code=registrar-function-key")})),
    )
    .await;
    assert_eq!(st, 200, "{h}");
    let (mut dev_key, mut group_key) = (String::new(), String::new());
    for (group, id) in [(false, "sealed-wh"), (true, "sealed-wh-group")] {
        let (path, id_field) =
            if group { ("enrollmentGroups", "enrollmentGroupId") } else { ("enrollments", "registrationId") };
        let (st, e) = service(&s, Method::PUT, &format!("/{path}/{id}?{v}"), None, Some(json!({
            id_field: id, "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": format!("{base}/alloc?code=allocation-function-key"), "apiVersion": "2021-10-01"},
        }))).await;
        assert_eq!(st, 200, "{e}");
        // The service API shows them as written: sealing is at rest only.
        assert!(e["customAllocationDefinition"]["webhookUrl"].as_str().unwrap().ends_with("allocation-function-key"));
        e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().clone_into(if group {
            &mut group_key
        } else {
            &mut dev_key
        });
    }
    let group_dev_key = provisio_core::keys::derive_device_key(&group_key, "sealed-wh-dev").unwrap();
    for (id, key) in [("sealed-wh", dev_key.as_str()), ("sealed-wh-dev", group_dev_key.as_str())] {
        let r = register(&s, id, key, "{}");
        assert_eq!(r["status"], "assigned", "{id}: {r}");
        assert_eq!(r["registrationState"]["assignedHub"], "hub-b.example.net");
        let calls = seen.lock().unwrap().clone();
        assert!(calls.iter().any(|c| c["deviceRuntimeContext"]["registrationId"] == id), "{id}: webhook not called");
        assert!(calls.iter().any(|c| c["registrationId"] == id), "{id}: registrar not called");
    }
    s.stop();
    let db = crate::hardening::data_dir_bytes(&data);
    assert!(crate::hardening::contains(&db, "$sealed:v1:"), "nothing was sealed");
    for secret in ["allocation-function-key", "registrar-function-key"] {
        assert!(!crate::hardening::contains(&db, secret), "{secret} is stored in plain");
    }
}
