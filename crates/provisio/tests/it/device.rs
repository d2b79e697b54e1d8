//! `provisio device …` and the provisio-client library, against a real server: every
//! transport × attestation, the walkthrough's vectors, and errors a person can act on.

use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::common::{Instance, Server, put_enrollment, repo_root, run};

fn device(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_provisio")).arg("device").args(args).output().unwrap()
}

#[test]
fn sas_and_derived_keys_match_the_walkthrough_scripts() {
    let key = "gPD2SOUYSOMXygVZA+pupNvWckqaS3Qnu+BUBbw7TbIZU7y2UZ5ksp4uMJfdV+nTIBayN+fZIZco4tS7oeVR/A==";
    // The walkthrough's generate_sas_token with time() pinned, expiry 3600.
    let py = run(Command::new("python3")
        .env("PYTHONPATH", repo_root().join("examples/walkthrough"))
        .args(["-c", &format!("import sas; sas.time = lambda: 1700000000; print(sas.generate_sas_token('0ne00057505/registrations/dps-sym-key-test01', '{key}', 'registration', 3600))")]));
    let ours = device(&[
        "sas",
        "--scope",
        "0ne00057505",
        "--registration-id",
        "dps-sym-key-test01",
        "--key",
        key,
        "--expires-at",
        "1700003600",
    ]);
    assert!(ours.status.success());
    assert_eq!(String::from_utf8_lossy(&ours.stdout).trim(), py.trim());
    // The walkthrough's openssl derivation.
    let g = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
    for id in ["sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6", "dps-test-sym-device01"] {
        let ours = device(&["derive-key", "--group-key", g, "--registration-id", id]);
        assert_eq!(String::from_utf8_lossy(&ours.stdout).trim(), crate::common::walkthrough_derive(g, id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_over_every_transport_and_attestation() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    for args in [
        vec!["root", "dv-root"],
        vec!["device", "dv-x509-https", "--ca", "dv-root"],
        vec!["device", "dv-x509-mqtt", "--ca", "dv-root"],
        vec!["device", "dv-x509-amqp", "--ca", "dv-root"],
        vec!["device", "dv-x509-mqtt-ws", "--ca", "dv-root"],
        vec!["device", "dv-x509-amqp-ws", "--ca", "dv-root"],
    ] {
        run(Command::new(env!("CARGO_BIN_EXE_provisio")).arg("cert").args(&args).arg("--out-dir").arg(&certs));
    }
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "dev-hub.example.net"]);
    let scope = s.info.id_scope.clone();
    let ca = s.ca_file();
    let https = format!("localhost:{}", s.port);
    let mqtt = s.info.mqtt_endpoint.clone().unwrap();
    let amqp = s.info.amqp_endpoint.clone().unwrap();

    let e = put_enrollment(
        &s,
        false,
        "dv-key",
        json!({"registrationId": "dv-key", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let g = put_enrollment(
        &s,
        true,
        "dv-group",
        json!({"enrollmentGroupId": "dv-group", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let gk = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let root = std::fs::read_to_string(certs.join("dv-root_cert.pem")).unwrap();
    put_enrollment(&s, true, "dv-x509", json!({"enrollmentGroupId": "dv-x509", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root}}}}})).await;

    for (transport, endpoint) in
        [("https", &https), ("mqtt", &mqtt), ("amqp", &amqp), ("mqtt-ws", &https), ("amqp-ws", &https)]
    {
        let base = [
            "register",
            "--scope",
            &scope,
            "--endpoint",
            endpoint,
            "--transport",
            transport,
            "--ca",
            ca.to_str().unwrap(),
            "--json",
        ];
        // Individual key, with a payload.
        let o = device(
            &[&base[..], &["--registration-id", "dv-key", "--key", &key, "--payload", r#"{"fw":"2.0"}"#]].concat(),
        );
        assert!(o.status.success(), "{transport} key: {}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            (v["status"].as_str(), v["assignedHub"].as_str()),
            (Some("assigned"), Some("dev-hub.example.net")),
            "{v}"
        );
        assert!(v["operationId"].is_string());
        // Group key (derived on the device).
        let id = format!("dv-group-{transport}");
        let o = device(&[&base[..], &["--registration-id", &id, "--group-key", &gk]].concat());
        assert!(o.status.success(), "{transport} group: {}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["symmetricKey"]["enrollmentGroupId"], "dv-group");
        // X.509: the registration id comes from the certificate's CN.
        let name = format!("dv-x509-{transport}");
        let (c, k) = (certs.join(format!("{name}_fullchain.pem")), certs.join(format!("{name}_key.pem")));
        let o = device(&[&base[..], &["--cert", c.to_str().unwrap(), "--cert-key", k.to_str().unwrap()]].concat());
        assert!(o.status.success(), "{transport} x509: {}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            (v["registrationId"].as_str(), v["x509"]["enrollmentGroupId"].as_str()),
            (Some(name.as_str()), Some("dv-x509")),
            "{v}"
        );
    }

    // Status lookup.
    let o = device(&[
        "status",
        "--scope",
        &scope,
        "--endpoint",
        &https,
        "--ca",
        ca.to_str().unwrap(),
        "--registration-id",
        "dv-key",
        "--key",
        &key,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout).unwrap()["status"], "assigned");

    // Errors say what failed. A refused key: exit 4, which credential, errorCode, trackingId.
    for (transport, endpoint) in
        [("https", &https), ("mqtt", &mqtt), ("amqp", &amqp), ("mqtt-ws", &https), ("amqp-ws", &https)]
    {
        let o = device(&[
            "register",
            "--scope",
            &scope,
            "--endpoint",
            endpoint,
            "--transport",
            transport,
            "--ca",
            ca.to_str().unwrap(),
            "--registration-id",
            "dv-key",
            "--key",
            &provisio_core::keys::generate_key(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{err}");
        assert!(
            err.contains("authentication")
                && err.contains("the symmetric key")
                && err.contains("401002")
                && err.contains("trackingId"),
            "{err}"
        );
    }
    // Nobody listening: exit 3, network.
    let o = device(&[
        "register",
        "--scope",
        &scope,
        "--endpoint",
        "127.0.0.1:1",
        "--ca",
        ca.to_str().unwrap(),
        "--registration-id",
        "dv-key",
        "--key",
        &key,
        "--timeout",
        "10",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("network"));
    // An untrusted server certificate: network (TLS), not authentication.
    let o = device(&[
        "register",
        "--scope",
        &scope,
        "--endpoint",
        &https,
        "--registration-id",
        "dv-key",
        "--key",
        &key,
        "--timeout",
        "10",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    // Disabled: exit 5, assignment, with the state in --json.
    put_enrollment(&s, false, "dv-off", json!({"registrationId": "dv-off", "provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}})).await;
    let o = device(&[
        "register",
        "--scope",
        &scope,
        "--endpoint",
        &https,
        "--ca",
        ca.to_str().unwrap(),
        "--registration-id",
        "dv-off",
        "--key",
        &key,
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["registrationState"]["status"].as_str()),
        (Some("assignment"), Some("disabled")),
        "{v}"
    );
    // Configuration mistakes: exit 2.
    let o = device(&[
        "register",
        "--scope",
        &scope,
        "--registration-id",
        "x",
        "--key",
        "not base64!",
        "--endpoint",
        &https,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
}
