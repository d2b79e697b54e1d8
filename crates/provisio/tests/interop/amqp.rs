//! The stock Node AMQP client (`azure-iot-provisioning-device-amqp`): symmetric keys,
//! individual and group, and X.509 without a SASL layer.

use std::process::Command;

use serde_json::{Value as Json, json};

use crate::{
    common::{Instance, Server, put_enrollment},
    node,
};

async fn registration_status(s: &Server, id: &str) -> u16 {
    crate::common::service(s, reqwest::Method::GET, &format!("/registrations/{id}?api-version=2021-10-01"), None, None)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_amqp_client_symmetric_key_and_x509() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    for args in [vec!["root", "aq-root"], vec!["device", "aq-x509-dev", "--ca", "aq-root"]] {
        crate::common::run(
            Command::new(env!("CARGO_BIN_EXE_provisio")).arg("cert").args(&args).arg("--out-dir").arg(&dir),
        );
    }
    let s = Server::start(
        &tmp.path().join("server"),
        "127.0.0.1:0",
        &["--linked-hub", "amqp-hub.example.net", "--retry-after-secs", "1"],
    );

    // Individual symmetric key, with a payload.
    let e = put_enrollment(
        &s,
        false,
        "aq-ind-1",
        json!({"registrationId": "aq-ind-1", "deviceId": "aq-dev-1", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let r = node::amqp(&s, "aq-ind-1", &[("SYMMETRIC_KEY", key), ("PAYLOAD", r#"{"fw":"1.2"}"#)]);
    assert_eq!(r["ok"], true, "{r}\n{}", s.log_text());
    assert_eq!(r["result"]["assignedHub"], "amqp-hub.example.net", "{r}");
    assert_eq!(r["result"]["deviceId"], "aq-dev-1", "{r}");
    assert_eq!(r["result"]["status"], "assigned", "{r}");
    // Group symmetric key.
    let gk = provisio_core::keys::generate_key();
    put_enrollment(&s, true, "aq-group", json!({"enrollmentGroupId": "aq-group", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": gk}}})).await;
    let dk = provisio_core::keys::derive_device_key(&gk, "aq-gdev-1").unwrap();
    let r = node::amqp(&s, "aq-gdev-1", &[("SYMMETRIC_KEY", &dk)]);
    assert_eq!(r["ok"], true, "{r}\n{}", s.log_text());
    assert_eq!(r["result"]["status"], "assigned", "{r}");
    assert_eq!(r["result"]["assignedHub"], "amqp-hub.example.net", "{r}");
    assert_eq!(r["result"]["deviceId"], "aq-gdev-1", "{r}");
    assert_eq!(r["result"]["symmetricKey"]["enrollmentGroupId"], "aq-group", "{r}");
    // X.509 group on an uploaded root: no SASL layer, the certificate from TLS.
    let root = std::fs::read_to_string(dir.join("aq-root_cert.pem")).unwrap();
    put_enrollment(&s, true, "aq-x509", json!({"enrollmentGroupId": "aq-x509", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root}}}}})).await;
    let (cert, k) = (dir.join("aq-x509-dev_fullchain.pem"), dir.join("aq-x509-dev_key.pem"));
    let r = node::amqp(
        &s,
        "aq-x509-dev",
        &[("ATTESTATION", "x509"), ("CERT_FILE", cert.to_str().unwrap()), ("KEY_FILE", k.to_str().unwrap())],
    );
    assert_eq!(r["ok"], true, "{r}\n{}", s.log_text());
    assert_eq!(r["result"]["x509"]["enrollmentGroupId"], "aq-x509", "{r}");
    assert_eq!(r["result"]["status"], "assigned", "{r}");
    assert_eq!(r["result"]["assignedHub"], "amqp-hub.example.net", "{r}");
    assert_eq!(r["result"]["deviceId"], "aq-x509-dev", "{r}");
    // A wrong key fails in the SDK (the request is rejected with 401), and nothing is stored.
    let e2 = put_enrollment(
        &s,
        false,
        "aq-ind-2",
        json!({"registrationId": "aq-ind-2", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    assert!(e2["attestation"]["symmetricKey"]["primaryKey"].is_string());
    let r = node::amqp(&s, "aq-ind-2", &[("SYMMETRIC_KEY", &provisio_core::keys::generate_key())]);
    node::assert_refused(&r, 401_002);
    assert_eq!(registration_status(&s, "aq-ind-2").await, 404);
    // Every attempt is in the audit log, marked as AMQP.
    let audit = std::fs::read_to_string(tmp.path().join("server/audit.jsonl")).unwrap();
    let entries: Vec<Json> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let by = |id: &str| entries.iter().filter(|e| e["registrationId"] == id).cloned().collect::<Vec<_>>();
    for (id, result, credential) in [
        ("aq-ind-1", "assigned", "symmetricKey"),
        ("aq-gdev-1", "assigned", "symmetricKey"),
        ("aq-x509-dev", "assigned", "x509"),
        ("aq-ind-2", "refused", "symmetricKey"),
    ] {
        let e = by(id);
        assert!(!e.is_empty(), "{id} not audited: {audit}");
        assert!(e.iter().all(|e| e["transport"] == "amqp" && e["credential"] == credential), "{e:?}");
        assert_eq!(e[0]["result"], result, "{e:?}");
    }
}
