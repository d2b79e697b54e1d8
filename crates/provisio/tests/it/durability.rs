//! Crash safety and restarts of a real process.

use serde_json::json;

use crate::common::{Instance, Process, Server, curl, now, put_enrollment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_registration_survives_kill_9_and_identity_is_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &[]);
    let info = s.info.clone();
    let ca = std::fs::read_to_string(s.ca_file()).unwrap();
    let e = put_enrollment(
        &s,
        false,
        "crash-dev",
        json!({"registrationId": "crash-dev", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let scope = info.id_scope.clone();
    let token = provisio_core::sas::build_token(
        &format!("{scope}/registrations/crash-dev"),
        &key,
        now() + 3600,
        Some("registration"),
        provisio_core::sas::SrEncoding::Raw,
    )
    .unwrap();
    let (st, _, v) = curl(
        &s,
        "PUT",
        &format!("/{scope}/registrations/crash-dev/register?api-version=2021-06-01"),
        Some(&token),
        Some("{}"),
    );
    assert_eq!(st, 202);
    let op = v["operationId"].as_str().unwrap().to_owned();
    let (st, _, before) = curl(
        &s,
        "GET",
        &format!("/{scope}/registrations/crash-dev/operations/{op}?api-version=2021-06-01"),
        Some(&token),
        None,
    );
    assert_eq!((st, before["status"].as_str()), (200, Some("assigned")));

    // kill -9 right after the acknowledgement: no shutdown code runs.
    s.kill9();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    assert_eq!(s.info.id_scope, info.id_scope, "the ID scope changed across a restart");
    assert_eq!(s.info.owner_key(), info.owner_key(), "the policy key changed across a restart");
    assert_eq!(std::fs::read_to_string(s.ca_file()).unwrap(), ca, "the CA changed across a restart");
    let (st, _, after) = curl(
        &s,
        "GET",
        &format!("/{scope}/registrations/crash-dev/operations/{op}?api-version=2021-06-01"),
        Some(&token),
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(after, before, "the acknowledged operation changed after kill -9");
    let (st, _, state) =
        curl(&s, "POST", &format!("/{scope}/registrations/crash-dev?api-version=2021-06-01"), Some(&token), Some("{}"));
    assert_eq!(st, 200);
    assert_eq!(state, before["registrationState"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_info_reports_the_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &[]);
    let status = s.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");

    let out = crate::common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_provisio"))
            .args(["info", "--json", "--data-dir"])
            .arg(tmp.path()),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["idScope"], s.info.id_scope.as_str());
    assert_eq!(v["serviceConnectionString"], s.info.service_connection_string.as_str());
    assert_eq!(v["httpsEndpoint"], s.info.https_endpoint.as_str());
    assert_eq!(v["caCertFile"].as_str().map(std::path::PathBuf::from), s.info.ca_cert_file);
    assert!(s.info.service_connection_string.starts_with("HostName=localhost:"));
    assert!(
        s.info.service_connection_string.contains(";SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=")
    );

    // Text output carries the same facts.
    let text = crate::common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_provisio")).args(["info", "--data-dir"]).arg(tmp.path()),
    );
    assert!(text.contains(&s.info.id_scope) && text.contains("ca.pem"), "{text}");

    // info on an empty directory is a clear error, not a new instance.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["info", "--data-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Provisio instance"));
}
