//! The walkthrough, replayed: an enrollment created through the service API, the SAS
//! token made by the walkthrough's Python script (and the group key derived by its
//! openssl command), then `curl -X PUT .../register` and `curl -X GET .../operations/…`.

use serde_json::{Value, json};

use crate::common::{Instance, Server, curl, header, put_enrollment, walkthrough_derive, walkthrough_sas};

fn register_and_poll(s: &Server, reg_id: &str, token: &str, body: &str) -> Value {
    let scope = &s.info.id_scope;
    let (status, head, v) = curl(
        s,
        "PUT",
        &format!("/{scope}/registrations/{reg_id}/register?api-version=2019-03-31"),
        Some(token),
        Some(body),
    );
    assert_eq!(status, 202, "{head}\n{v}");
    assert_eq!(v["status"], "assigning", "{v}");
    assert!(v.get("registrationState").is_none(), "first answer has no registrationState: {v}");
    let op = v["operationId"].as_str().unwrap().to_owned();
    assert!(!op.is_empty());
    assert_eq!(header(&head, "retry-after"), Some("2"));
    assert!(header(&head, "content-type").unwrap().starts_with("application/json"));
    let (status, _, v) = curl(
        s,
        "GET",
        &format!("/{scope}/registrations/{reg_id}/operations/{op}?api-version=2019-03-31"),
        Some(token),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["operationId"], op.as_str());
    assert_eq!(v["status"], "assigned", "{v}");
    v
}

fn check_state(v: &Value, reg_id: &str, hub: &str) {
    let st = &v["registrationState"];
    assert_eq!(st["registrationId"], reg_id);
    assert_eq!(st["assignedHub"], hub);
    assert_eq!(st["deviceId"], reg_id);
    assert_eq!(st["status"], "assigned");
    assert_eq!(st["substatus"], "initialAssignment");
    for f in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
        assert!(st[f].as_str().is_some_and(|s| !s.is_empty()), "{f} in {st}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_individual_and_group_with_curl() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &["--linked-hub", "hub-a.example.net"]);
    let scope = s.info.id_scope.clone();
    assert_eq!(s.info.linked_hubs, ["hub-a.example.net"]);
    assert!(
        scope.starts_with("0ne")
            && scope.len() == 11
            && scope[3..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()),
        "{scope}"
    );

    // Individual enrollment with auto-generated keys, as the portal does.
    let created = put_enrollment(
        &s,
        false,
        "dps-sym-key-test01",
        json!({
            "registrationId": "dps-sym-key-test01",
            "attestation": {"type": "symmetricKey"},
        }),
    )
    .await;
    let primary = created["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let secondary = created["attestation"]["symmetricKey"]["secondaryKey"].as_str().unwrap().to_owned();
    assert_ne!(primary, secondary);
    assert_eq!(created["provisioningStatus"], "enabled");

    let uri = format!("{scope}/registrations/dps-sym-key-test01");
    let token = walkthrough_sas(&uri, &primary, "registration", 3600);
    assert!(token.contains("%2Fregistrations%2F"), "{token}");
    let v = register_and_poll(&s, "dps-sym-key-test01", &token, r#"{"registrationId": "dps-sym-key-test01"}"#);
    check_state(&v, "dps-sym-key-test01", "hub-a.example.net");
    assert!(v["registrationState"]["symmetricKey"].get("enrollmentGroupId").is_none());

    // The secondary key works too.
    let token2 = walkthrough_sas(&uri, &secondary, "registration", 3600);
    register_and_poll(&s, "dps-sym-key-test01", &token2, r#"{"registrationId": "dps-sym-key-test01"}"#);

    // The status lookup returns the bare registration state.
    let (status, _, st) = curl(
        &s,
        "POST",
        &format!("/{scope}/registrations/dps-sym-key-test01?api-version=2021-06-01"),
        Some(&token),
        Some(r#"{"registrationId":"dps-sym-key-test01"}"#),
    );
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["status"], "assigned");
    assert_eq!(st["assignedHub"], "hub-a.example.net");

    // GET of the enrollment strips the keys and shows the registration state.
    let r = s
        .client()
        .get(s.url("/enrollments/dps-sym-key-test01?api-version=2021-10-01"))
        .header("Authorization", s.service_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["attestation"], json!({"type": "symmetricKey"}));
    assert_eq!(e["registrationState"]["status"], "assigned");

    // Group enrollment with keys given by the operator; device key derived with openssl.
    let group_key = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
    put_enrollment(&s, true, "dps-test-sym-group1", json!({
        "enrollmentGroupId": "dps-test-sym-group1",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": provisio_core::keys::generate_key()}},
    })).await;
    let device_key = walkthrough_derive(group_key, "dps-test-sym-device01");
    assert_eq!(device_key, provisio_core::keys::derive_device_key(group_key, "dps-test-sym-device01").unwrap());
    let token =
        walkthrough_sas(&format!("{scope}/registrations/dps-test-sym-device01"), &device_key, "registration", 3600);
    let v = register_and_poll(&s, "dps-test-sym-device01", &token, r#"{"registrationId": "dps-test-sym-device01"}"#);
    check_state(&v, "dps-test-sym-device01", "hub-a.example.net");
    assert_eq!(v["registrationState"]["symmetricKey"]["enrollmentGroupId"], "dps-test-sym-group1");

    // The group key itself is not a device key.
    let token =
        walkthrough_sas(&format!("{scope}/registrations/dps-test-sym-device02"), group_key, "registration", 3600);
    let (status, _, v) = curl(
        &s,
        "PUT",
        &format!("/{scope}/registrations/dps-test-sym-device02/register?api-version=2019-03-31"),
        Some(&token),
        Some("{}"),
    );
    crate::common::assert_dps_error(status, &v, 401, 401_002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_precedence_payload_and_reregistration() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        "127.0.0.1:0",
        &["--linked-hub", "h1.example", "--linked-hub", "h2.example", "--linked-hub", "h3.example"],
    );
    let scope = s.info.id_scope.clone();
    let group_key = provisio_core::keys::generate_key();
    put_enrollment(&s, true, "g1", json!({"enrollmentGroupId": "g1", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key}}})).await;

    // Many group devices spread over the three hubs; each keeps its hub on re-registration.
    let mut hubs = std::collections::HashMap::new();
    for i in 0..12 {
        let id = format!("spread-{i}");
        let key = provisio_core::keys::derive_device_key(&group_key, &id).unwrap();
        let token = walkthrough_sas(&format!("{scope}/registrations/{id}"), &key, "", 3600);
        let v = register_and_poll(&s, &id, &token, &format!(r#"{{"registrationId":"{id}","payload":{{"n":{i}}}}}"#));
        let hub = v["registrationState"]["assignedHub"].as_str().unwrap().to_owned();
        *hubs.entry(hub.clone()).or_insert(0) += 1;
        let again = register_and_poll(&s, &id, &token, "{}");
        assert_eq!(again["registrationState"]["assignedHub"], hub.as_str());
        assert_eq!(again["registrationState"]["substatus"], "initialAssignment");
        assert_ne!(again["operationId"], v["operationId"]);
        // createdDateTimeUtc is kept, lastUpdated moves on.
        assert_eq!(again["registrationState"]["createdDateTimeUtc"], v["registrationState"]["createdDateTimeUtc"]);
    }
    assert!(hubs.len() >= 2, "12 devices all went to one hub: {hubs:?}");

    // A disabled individual enrollment blocks a device that the group would accept.
    let id = "spread-0";
    put_enrollment(
        &s,
        false,
        id,
        json!({"registrationId": id, "provisioningStatus": "disabled", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = provisio_core::keys::derive_device_key(&group_key, id).unwrap();
    let token = walkthrough_sas(&format!("{scope}/registrations/{id}"), &key, "registration", 3600);
    let (status, _, v) = curl(
        &s,
        "PUT",
        &format!("/{scope}/registrations/{id}/register?api-version=2019-03-31"),
        Some(&token),
        Some("{}"),
    );
    crate::common::assert_dps_error(status, &v, 401, 401_002);

    // With its own key, the device learns it is disabled.
    let e = put_enrollment(&s, false, "dev-disabled", json!({"registrationId": "dev-disabled", "provisioningStatus": "disabled", "attestation": {"type": "symmetricKey"}})).await;
    let k = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let token = walkthrough_sas(&format!("{scope}/registrations/dev-disabled"), k, "registration", 3600);
    let (status, _, v) = curl(
        &s,
        "PUT",
        &format!("/{scope}/registrations/dev-disabled/register?api-version=2019-03-31"),
        Some(&token),
        Some("{}"),
    );
    assert_eq!(status, 202);
    let op = v["operationId"].as_str().unwrap();
    let (status, _, v) = curl(
        &s,
        "GET",
        &format!("/{scope}/registrations/dev-disabled/operations/{op}?api-version=2019-03-31"),
        Some(&token),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(v["status"], "disabled", "{v}");
    assert_eq!(v["registrationState"]["status"], "disabled");
    assert!(v["registrationState"]["errorCode"].is_u64() && v["registrationState"]["errorMessage"].is_string(), "{v}");
    assert!(v["registrationState"].get("assignedHub").is_none());

    // A disabled group gives `disabled` to its devices.
    let gk = provisio_core::keys::generate_key();
    put_enrollment(&s, true, "g-off", json!({"enrollmentGroupId": "g-off", "provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": gk}}})).await;
    let dk = provisio_core::keys::derive_device_key(&gk, "off-1").unwrap();
    let token = walkthrough_sas(&format!("{scope}/registrations/off-1"), &dk, "registration", 3600);
    let (_, _, v) = curl(
        &s,
        "PUT",
        &format!("/{scope}/registrations/off-1/register?api-version=2019-03-31"),
        Some(&token),
        Some("{}"),
    );
    let op = v["operationId"].as_str().unwrap();
    let (_, _, v) = curl(
        &s,
        "GET",
        &format!("/{scope}/registrations/off-1/operations/{op}?api-version=2019-03-31"),
        Some(&token),
        None,
    );
    assert_eq!(v["status"], "disabled", "{v}");
}
