//! The stock Node MQTT client (`azure-iot-provisioning-device-mqtt`): symmetric keys,
//! individual and group, and X.509.

use std::process::Command;

use serde_json::json;

use crate::{
    common::{Instance, Server, put_enrollment},
    node,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_mqtt_client_symmetric_key_and_x509() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    for args in [vec!["root", "mq-root"], vec!["device", "mq-x509-dev", "--ca", "mq-root"]] {
        crate::common::run(
            Command::new(env!("CARGO_BIN_EXE_provisio")).arg("cert").args(&args).arg("--out-dir").arg(&dir),
        );
    }
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "mqtt-hub.example.net"]);

    // Individual symmetric key.
    let e = put_enrollment(
        &s,
        false,
        "mq-ind-1",
        json!({"registrationId": "mq-ind-1", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let r = node::mqtt(&s, "mq-ind-1", &[("SYMMETRIC_KEY", key), ("PAYLOAD", r#"{"fw":"1.2"}"#)]);
    assert_eq!(r["ok"], true, "{r}\n{}", s.log_text());
    assert_eq!(r["result"]["assignedHub"], "mqtt-hub.example.net");
    assert_eq!(r["result"]["status"], "assigned");
    // Group symmetric key.
    let gk = provisio_core::keys::generate_key();
    put_enrollment(&s, true, "mq-group", json!({"enrollmentGroupId": "mq-group", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": gk}}})).await;
    let dk = provisio_core::keys::derive_device_key(&gk, "mq-gdev-1").unwrap();
    let r = node::mqtt(&s, "mq-gdev-1", &[("SYMMETRIC_KEY", &dk)]);
    assert_eq!(r["ok"], true, "{r}\n{}", s.log_text());
    assert_eq!(r["result"]["status"], "assigned", "{r}");
    assert_eq!(r["result"]["assignedHub"], "mqtt-hub.example.net", "{r}");
    assert_eq!(r["result"]["deviceId"], "mq-gdev-1", "{r}");
    assert_eq!(r["result"]["symmetricKey"]["enrollmentGroupId"], "mq-group", "{r}");
    // X.509 group on an uploaded root.
    let root = std::fs::read_to_string(dir.join("mq-root_cert.pem")).unwrap();
    put_enrollment(&s, true, "mq-x509", json!({"enrollmentGroupId": "mq-x509", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root}}}}})).await;
    let (cert, k) = (dir.join("mq-x509-dev_fullchain.pem"), dir.join("mq-x509-dev_key.pem"));
    let r = node::mqtt(
        &s,
        "mq-x509-dev",
        &[("ATTESTATION", "x509"), ("CERT_FILE", cert.to_str().unwrap()), ("KEY_FILE", k.to_str().unwrap())],
    );
    assert_eq!(r["ok"], true, "{r}\n{}", s.log_text());
    assert_eq!(r["result"]["status"], "assigned", "{r}");
    assert_eq!(r["result"]["assignedHub"], "mqtt-hub.example.net", "{r}");
    assert_eq!(r["result"]["deviceId"], "mq-x509-dev", "{r}");
    assert_eq!(r["result"]["x509"]["enrollmentGroupId"], "mq-x509", "{r}");
    // A wrong key fails in the SDK (401 on the response topic).
    let r = node::mqtt(&s, "mq-ind-1", &[("SYMMETRIC_KEY", &provisio_core::keys::generate_key())]);
    node::assert_refused(&r, 401_002);
    assert_eq!(r["error"]["statusCode"], 401, "the response topic's status: {r}");
}
