//! Interop with the stock Azure IoT device SDK for Node (`azure-iot-provisioning-device`
//! with its HTTP transport and `azure-iot-security-symmetric-key`), over real TLS.
//!
//! The Node HTTP transport only connects to port 443, so this test serves there (CI runs
//! as root); it is the only test that binds 443. `npm ci` in `interop/node` must have run
//! (the README's test command does it).

use std::process::Command;

use serde_json::{Value, json};

use crate::common::{Instance, Server, put_enrollment, repo_root};

fn node_register(s: &Server, registration_id: &str, key: &str) -> Value {
    node_run(s, registration_id, &[("ATTESTATION", "symmetricKey"), ("SYMMETRIC_KEY", key)])
}

fn node_run(s: &Server, registration_id: &str, env: &[(&str, &str)]) -> Value {
    node_output(s, registration_id, env)["result"].clone()
}

/// Runs the Node harness over HTTPS (port 443) with `env` and returns its JSON line, which
/// must say `ok`.
pub(crate) fn node_output(s: &Server, registration_id: &str, env: &[(&str, &str)]) -> Value {
    let v = crate::node::register(s, "http", "localhost", registration_id, env);
    assert_eq!(v["ok"], true, "Node SDK registration failed: {v}\nserver log:\n{}", s.log_text());
    v
}

/// The audit lines of `registration_id`.
fn audited(data_dir: &std::path::Path, registration_id: &str) -> Vec<Value> {
    let audit = std::fs::read_to_string(data_dir.join("audit.jsonl")).unwrap();
    audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["registrationId"] == registration_id)
        .collect()
}

/// Test certificates made by `provisio cert` in `dir`: each entry is its arguments.
fn make_certs(dir: &std::path::Path, certs: &[&[&str]]) {
    std::fs::create_dir_all(dir).unwrap();
    for args in certs {
        crate::common::run(
            Command::new(env!("CARGO_BIN_EXE_provisio")).arg("cert").args(*args).arg("--out-dir").arg(dir),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_http_client_registers_individual_and_group_devices() {
    let _port = crate::common::PORT_443.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        "127.0.0.1:443",
        &["--linked-hub", "node-hub.example.net", "--retry-after-secs", "1"],
    );

    let e = put_enrollment(&s, false, "node-individual-1", json!({"registrationId": "node-individual-1", "deviceId": "node-dev-1", "attestation": {"type": "symmetricKey"}})).await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let r = node_register(&s, "node-individual-1", key);
    assert_eq!(r["assignedHub"], "node-hub.example.net", "{r}");
    assert_eq!(r["deviceId"], "node-dev-1", "{r}");
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["registrationId"], "node-individual-1", "{r}");

    let gk = provisio_core::keys::generate_key();
    put_enrollment(&s, true, "node-group", json!({"enrollmentGroupId": "node-group", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": gk}}})).await;
    let dk = provisio_core::keys::derive_device_key(&gk, "node-group-dev-7").unwrap();
    let r = node_register(&s, "node-group-dev-7", &dk);
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["assignedHub"], "node-hub.example.net", "{r}");
    assert_eq!(r["deviceId"], "node-group-dev-7", "{r}");
    assert_eq!(r["symmetricKey"]["enrollmentGroupId"], "node-group", "{r}");

    // A wrong key fails in the SDK with our 401.
    let key = provisio_core::keys::generate_key();
    let v = crate::node::register(&s, "http", "localhost", "node-individual-1", &[("SYMMETRIC_KEY", &key)]);
    crate::node::assert_refused(&v, 401_002);
    assert_eq!(v["error"]["statusCode"], 401, "{v}");
    assert_eq!(v["error"]["responseJson"]["errorCode"], 401_002, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_http_x509_client_registers_a_group_device() {
    let _port = crate::common::PORT_443.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    make_certs(
        &dir,
        &[
            &["root", "node-root"],
            &["intermediate", "node-inter", "--ca", "node-root"],
            &["device", "node-x509-dev-1", "--ca", "node-inter"],
        ],
    );
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:443", &["--linked-hub", "node-x509-hub.example.net"]);
    let inter = std::fs::read_to_string(dir.join("node-inter_cert.pem")).unwrap();
    let (st, g) = crate::common::service(
        &s,
        reqwest::Method::PUT,
        "/enrollmentGroups/node-x509-group?api-version=2021-10-01",
        None,
        Some(json!({
            "enrollmentGroupId": "node-x509-group",
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": inter}}}},
        })),
    )
    .await;
    assert_eq!(st, 200, "{g}");
    let cert = dir.join("node-x509-dev-1_fullchain.pem");
    let key = dir.join("node-x509-dev-1_key.pem");
    let r = node_run(
        &s,
        "node-x509-dev-1",
        &[("ATTESTATION", "x509"), ("CERT_FILE", cert.to_str().unwrap()), ("KEY_FILE", key.to_str().unwrap())],
    );
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["assignedHub"], "node-x509-hub.example.net", "{r}");
    assert_eq!(r["deviceId"], "node-x509-dev-1", "{r}");
    assert_eq!(r["x509"]["enrollmentGroupId"], "node-x509-group", "{r}");
}

/// A symmetric-key group `{prefix}-group` and an X.509 group `{prefix}-x509-group` on the root
/// certificate at `root`; returns the symmetric-key group's primary key.
async fn two_groups(s: &Server, prefix: &str, root: &std::path::Path) -> String {
    let gk = provisio_core::keys::generate_key();
    let (sym, x509) = (format!("{prefix}-group"), format!("{prefix}-x509-group"));
    put_enrollment(
        s,
        true,
        &sym,
        json!({"enrollmentGroupId": sym, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": gk}}}),
    )
    .await;
    let root = std::fs::read_to_string(root).unwrap();
    put_enrollment(s, true, &x509, json!({"enrollmentGroupId": x509, "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root}}}}})).await;
    gk
}

/// MQTT and AMQP over WebSockets (`MqttWs`, `AmqpWs`), which the SDK always sends to
/// `wss://{host}:443/$iothub/websocket`: symmetric-key and X.509 group devices, with the
/// MQTT and AMQP ports turned off (the HTTPS listener serves both), and a wrong key refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_websocket_clients_register_over_mqtt_and_amqp() {
    let _port = crate::common::PORT_443.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    make_certs(
        &dir,
        &[
            &["root", "ws-root"],
            &["device", "ws-x509-mqtt", "--ca", "ws-root"],
            &["device", "ws-x509-amqp", "--ca", "ws-root"],
        ],
    );
    let s = Server::start(
        &tmp.path().join("server"),
        "127.0.0.1:443",
        &["--linked-hub", "ws-hub.example.net", "--mqtt-listen", "off", "--amqp-listen", "off"],
    );
    let gk = two_groups(&s, "ws", &dir.join("ws-root_cert.pem")).await;

    for transport in ["mqtt-ws", "amqp-ws"] {
        let id = format!("ws-sym-{}", &transport[..4]);
        let dk = provisio_core::keys::derive_device_key(&gk, &id).unwrap();
        let r = node_run(
            &s,
            &id,
            &[("TRANSPORT", transport), ("ATTESTATION", "symmetricKey"), ("SYMMETRIC_KEY", dk.as_str())],
        );
        assert_eq!(r["status"], "assigned", "{transport}: {r}");
        assert_eq!(r["assignedHub"], "ws-hub.example.net", "{transport}: {r}");
        assert_eq!(r["deviceId"], id, "{transport}: {r}");
        assert_eq!(r["symmetricKey"]["enrollmentGroupId"], "ws-group", "{transport}: {r}");

        let id = format!("ws-x509-{}", &transport[..4]);
        let cert = dir.join(format!("{id}_fullchain.pem"));
        let key = dir.join(format!("{id}_key.pem"));
        let r = node_run(
            &s,
            &id,
            &[
                ("TRANSPORT", transport),
                ("ATTESTATION", "x509"),
                ("CERT_FILE", cert.to_str().unwrap()),
                ("KEY_FILE", key.to_str().unwrap()),
            ],
        );
        assert_eq!(r["status"], "assigned", "{transport}: {r}");
        assert_eq!(r["assignedHub"], "ws-hub.example.net", "{transport}: {r}");
        assert_eq!(r["deviceId"], id, "{transport}: {r}");
        assert_eq!(r["x509"]["enrollmentGroupId"], "ws-x509-group", "{transport}: {r}");

        // A key that is not the device's: refused, and the SDK says so.
        let key = provisio_core::keys::generate_key();
        let v = crate::node::register(&s, transport, "localhost", "ws-sym-wrong", &[("SYMMETRIC_KEY", &key)]);
        crate::node::assert_refused(&v, 401_002);
    }
    // The audit log names the transport of each attempt (a line is written before the
    // answer it records is sent).
    let audit = std::fs::read_to_string(tmp.path().join("server/audit.jsonl")).unwrap();
    for transport in ["mqtt-ws", "amqp-ws"] {
        assert!(
            audit.contains(&format!("\"transport\":\"{transport}\"")),
            "{transport} not in the audit log:\n{audit}"
        );
    }
}

/// Runs `interop/python/register.py` (the stock Python SDK, `azure-iot-device`) with `env`;
/// returns its JSON line.
fn python_run(s: &Server, registration_id: &str, env: &[(&str, &str)]) -> Value {
    let dir = repo_root().join("interop/python");
    let python = dir.join(".venv/bin/python");
    assert!(
        python.exists(),
        "the stock Python SDK is not installed: run `python3 -m venv interop/python/.venv && interop/python/.venv/bin/pip install -r interop/python/requirements.txt` (the README's test command does)"
    );
    let out = Command::new(python)
        .arg(dir.join("register.py"))
        .env("PROVISIO_HOST", "localhost")
        .env("ID_SCOPE", &s.info.id_scope)
        .env("REGISTRATION_ID", registration_id)
        .env("CA_FILE", s.ca_file())
        .envs(env.iter().copied())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("register.py printed no JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

/// The stock Python SDK (`azure-iot-device`), which provisions over MQTT only: on port 8883
/// and over WebSockets (`websockets=True`, port 443), with a symmetric-key group device, an
/// X.509 group device and a payload; a wrong key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_client_registers_over_mqtt_and_websockets() {
    let _port = crate::common::PORT_443.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    make_certs(
        &dir,
        &[
            &["root", "py-root"],
            &["device", "py-x509-8883", "--ca", "py-root"],
            &["device", "py-x509-443", "--ca", "py-root"],
        ],
    );
    let s = Server::start(
        &tmp.path().join("server"),
        "127.0.0.1:443",
        &["--linked-hub", "py-hub.example.net", "--mqtt-listen", "127.0.0.1:8883"],
    );
    let gk = two_groups(&s, "py", &dir.join("py-root_cert.pem")).await;

    for (port, websockets) in [("8883", "0"), ("443", "1")] {
        let id = format!("py-sym-{port}");
        let dk = provisio_core::keys::derive_device_key(&gk, &id).unwrap();
        let v = python_run(
            &s,
            &id,
            &[("WEBSOCKETS", websockets), ("SYMMETRIC_KEY", dk.as_str()), ("PAYLOAD", r#"{"model":"py-1"}"#)],
        );
        assert_eq!(v["ok"], true, "{port}: {v}\n{}", s.log_text());
        let r = &v["result"];
        assert_eq!(r["status"], "assigned", "{port}: {r}");
        assert_eq!(r["assignedHub"], "py-hub.example.net", "{port}: {r}");
        assert_eq!(r["deviceId"], id, "{port}: {r}");
        assert_eq!(r["substatus"], "initialAssignment", "{port}: {r}");

        let id = format!("py-x509-{port}");
        let cert = dir.join(format!("{id}_fullchain.pem"));
        let key = dir.join(format!("{id}_key.pem"));
        let v = python_run(
            &s,
            &id,
            &[("WEBSOCKETS", websockets), ("CERT_FILE", cert.to_str().unwrap()), ("KEY_FILE", key.to_str().unwrap())],
        );
        assert_eq!(v["ok"], true, "{port}: {v}\n{}", s.log_text());
        assert_eq!(v["result"]["status"], "assigned", "{port}: {v}");
        assert_eq!(v["result"]["assignedHub"], "py-hub.example.net", "{port}: {v}");
        assert_eq!(v["result"]["deviceId"], id, "{port}: {v}");

        let v = python_run(
            &s,
            "py-sym-wrong",
            &[("WEBSOCKETS", websockets), ("SYMMETRIC_KEY", provisio_core::keys::generate_key().as_str())],
        );
        assert_eq!(v["ok"], false, "{port}: {v}");
        // The SDK's error does not carry our body: the audit log says it was our refusal
        // (401002 over this transport), not a timeout or a broken connection.
        let transport = if websockets == "1" { "mqtt-ws" } else { "mqtt" };
        let refused = audited(&tmp.path().join("server"), "py-sym-wrong");
        assert!(
            refused
                .iter()
                .any(|e| e["transport"] == transport && e["result"] == "refused" && e["errorCode"] == 401_002),
            "{port}: {v}\n{refused:?}"
        );
    }
    // The audit log names the transport of each attempt (a line is written before the
    // answer it records is sent).
    let audit = std::fs::read_to_string(tmp.path().join("server/audit.jsonl")).unwrap();
    for transport in ["\"transport\":\"mqtt\"", "\"transport\":\"mqtt-ws\""] {
        assert!(audit.contains(transport), "{transport} not in the audit log:\n{audit}");
    }
}
