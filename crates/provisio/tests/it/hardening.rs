//! Hardening: secrets encrypted at rest (with rotation), the audit log and `provisio
//! audit`, and repeated kill -9 under a load of registrations.

use std::{collections::BTreeMap, path::Path, process::Command};

use provisio_core::sas::{SrEncoding, build_token};
use serde_json::{Value, json};

use crate::common::{Instance, Process, Server, now, put_enrollment, run, service};

const K1: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
const K2: &str = "ESIzRFVmd4iZqrvM3e7/ABEiM0RVZneImaq7zN3u/wA=";

fn config_file(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

fn device_token(scope: &str, id: &str, key: &str) -> String {
    build_token(&format!("{scope}/registrations/{id}"), key, now() + 3600, Some("registration"), SrEncoding::Raw)
        .unwrap()
}

async fn register(s: &impl Instance, scope: &str, id: &str, token: &str) -> (u16, Value) {
    let r = s
        .client()
        .put(s.url(&format!("/{scope}/registrations/{id}/register?api-version=2021-06-01")))
        .header("Authorization", token)
        .json(&json!({"registrationId": id}))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap())
}

/// Every file of the data directory, as bytes (database, WAL, everything).
pub(crate) fn data_dir_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && !p.extension().is_some_and(|x| x == "log" || x == "toml") {
            all.extend(std::fs::read(&p).unwrap());
        }
    }
    all
}

pub(crate) fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_at_rest_and_keys_rotate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg1 = config_file(tmp.path(), "k1.toml", &format!("encryption_key = \"{K1}\"\n"));
    let mut s = Process::start(&data, "127.0.0.1:0", &["--config", &cfg1]);
    let scope = s.info.id_scope.clone();
    let owner = s.info.owner_key().unwrap().to_owned();
    let e = put_enrollment(
        &s,
        false,
        "sealed-dev",
        json!({"registrationId": "sealed-dev", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let g = put_enrollment(
        &s,
        true,
        "sealed-grp",
        json!({"enrollmentGroupId": "sealed-grp", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let group_key = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let (st, v) = register(&s, &scope, "sealed-dev", &device_token(&scope, "sealed-dev", &key)).await;
    assert_eq!(st, 202, "{v}");
    // The service API still shows the keys: encryption is at rest only.
    let (_, back) = service(
        &s,
        reqwest::Method::POST,
        "/enrollments/sealed-dev/attestationmechanism?api-version=2021-10-01",
        None,
        None,
    )
    .await;
    assert_eq!(back["symmetricKey"]["primaryKey"], key.as_str(), "{back}");
    s.kill9();

    // No key of any kind is in the files: device key, group key, owner policy key, CA key.
    let bytes = data_dir_bytes(&data);
    assert!(contains(&bytes, "$sealed:v1:"), "nothing was sealed");
    for (what, secret) in
        [("device key", key.as_str()), ("group key", group_key.as_str()), ("owner key", owner.as_str())]
    {
        assert!(!contains(&bytes, secret), "the {what} is stored in plain");
    }
    assert!(!contains(&bytes, "PRIVATE KEY-----"), "a private key is stored in plain");

    // Without the key the server refuses to start, and says why.
    let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["serve", "--https-listen", "127.0.0.1:0", "--mqtt-listen", "off", "--data-dir"])
        .arg(&data)
        .env_remove("PROVISIO_ENCRYPTION_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("encrypted secrets") && err.contains("encryption_key"), "{err}");
    // Nor with a wrong key (the message names the key id it needs, never a key).
    let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["serve", "--https-listen", "127.0.0.1:0", "--mqtt-listen", "off", "--data-dir"])
        .arg(&data)
        .env("PROVISIO_ENCRYPTION_KEY", K2)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not configured") && !err.contains(K1) && !err.contains(K2), "{err}");
    // A malformed key is refused before anything is touched.
    let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["rekey", "--data-dir"])
        .arg(&data)
        .env("PROVISIO_ENCRYPTION_KEY", "too-short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 random bytes"));

    // Rotation: K2 current, K1 previous; rekey; then K1 is no longer needed.
    let cfg12 = config_file(
        tmp.path(),
        "k12.toml",
        &format!("encryption_key = \"{K2}\"\nencryption_previous_keys = [\"{K1}\"]\n"),
    );
    let out =
        run(Command::new(env!("CARGO_BIN_EXE_provisio")).args(["rekey", "--config", &cfg12, "--data-dir"]).arg(&data));
    let n: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(n >= 5, "identity, server cert, policy, enrollment and group: {out}");
    let out =
        run(Command::new(env!("CARGO_BIN_EXE_provisio")).args(["rekey", "--config", &cfg12, "--data-dir"]).arg(&data));
    assert!(out.starts_with("0 documents"), "a second rekey has nothing to do: {out}");
    let cfg2 = config_file(tmp.path(), "k2.toml", &format!("encryption_key = \"{K2}\"\n"));
    let s = Server::start(&data, "127.0.0.1:0", &["--config", &cfg2]);
    assert_eq!(s.info.owner_key(), Some(owner.as_str()), "the policy key survived rotation");
    let (st, v) = register(&s, &scope, "sealed-dev", &device_token(&scope, "sealed-dev", &key)).await;
    assert_eq!(st, 202, "the device key survived rotation: {v}");
    let derived = provisio_core::keys::derive_device_key(&group_key, "grp-dev-1").unwrap();
    let (st, v) = register(&s, &scope, "grp-dev-1", &device_token(&scope, "grp-dev-1", &derived)).await;
    assert_eq!(st, 202, "the group key survived rotation: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_every_attempt_and_change() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &[]);
    let scope = s.info.id_scope.clone();
    let e = put_enrollment(
        &s,
        false,
        "audited",
        json!({"registrationId": "audited", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let good = device_token(&scope, "audited", &key);
    let forged = device_token(&scope, "audited", &provisio_core::keys::generate_key());
    let (st, ok) = register(&s, &scope, "audited", &good).await;
    assert_eq!(st, 202);
    let (st, refused) = register(&s, &scope, "audited", &forged).await;
    assert_eq!(st, 401);
    // A body the server cannot parse is an attempt too.
    let r = s
        .client()
        .put(s.url(&format!("/{scope}/registrations/audited/register?api-version=2021-06-01")))
        .header("Authorization", &good)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let malformed: Value = r.json().await.unwrap();
    // A disabled enrollment: recorded as such.
    let mut disabled = e.clone();
    disabled["provisioningStatus"] = json!("disabled");
    let (st, _) =
        service(&s, reqwest::Method::PUT, "/enrollments/audited?api-version=2021-10-01", Some("*"), Some(disabled))
            .await;
    assert_eq!(st, 200);
    let (st, _) = register(&s, &scope, "audited", &good).await;
    assert_eq!(st, 202);
    // A refused service change (bad body) and a delete.
    let (st, _) =
        service(&s, reqwest::Method::PUT, "/enrollments/other?api-version=2021-10-01", None, Some(json!({"x": 1})))
            .await;
    assert_eq!(st, 400);
    let (st, _) = service(&s, reqwest::Method::DELETE, "/enrollments/audited?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 204);
    // Reads are not changes.
    let (st, _) = service(&s, reqwest::Method::GET, "/enrollments/nope?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404);
    // SIGTERM flushes the log.
    assert!(s.terminate().success());

    let audit = |args: &[&str]| -> Vec<Value> {
        let out =
            run(Command::new(env!("CARGO_BIN_EXE_provisio")).arg("audit").args(args).arg("--data-dir").arg(tmp.path()));
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let regs = audit(&["--registration-id", "AUDITED", "--json"]);
    assert_eq!(regs.len(), 4, "{regs:#?}");
    assert_eq!(regs[0]["result"], "assigned");
    assert_eq!(regs[0]["operationId"], ok["operationId"]);
    assert_eq!(regs[0]["transport"], "https");
    assert_eq!(regs[0]["peer"], "127.0.0.1");
    assert_eq!(regs[0]["credential"], "symmetricKey");
    assert!(regs[0]["assignedHub"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(regs[1]["result"], "refused");
    assert_eq!(regs[1]["status"], 401);
    assert_eq!(regs[1]["errorCode"], 401_002);
    assert_eq!(regs[1]["trackingId"], refused["trackingId"], "the device's tracking id finds the entry");
    assert!(regs[1]["reason"].as_str().unwrap().contains("neither the primary nor the secondary key"), "{}", regs[1]);
    assert_eq!(regs[2]["result"], "refused");
    assert_eq!(regs[2]["errorCode"], 400_001);
    assert_eq!(regs[2]["trackingId"], malformed["trackingId"]);
    assert_eq!(regs[3]["result"], "disabled");
    // Look-up by tracking id.
    let one = audit(&["--tracking-id", refused["trackingId"].as_str().unwrap(), "--json"]);
    assert_eq!(one, vec![regs[1].clone()]);

    let changes = audit(&["--kind", "service", "--json"]);
    let actions: Vec<(&str, u64)> =
        changes.iter().map(|c| (c["action"].as_str().unwrap(), c["status"].as_u64().unwrap())).collect();
    assert_eq!(
        actions,
        [
            ("PUT /enrollments/audited", 200),
            ("PUT /enrollments/audited", 200),
            ("PUT /enrollments/other", 400),
            ("DELETE /enrollments/audited", 204)
        ],
        "{changes:#?}"
    );
    assert!(changes.iter().all(|c| c["credential"] == "provisioningserviceowner"));
    assert!(changes[2]["reason"].as_str().is_some_and(|r| r.contains("IndividualEnrollment")), "{}", changes[2]);

    // The table form, for people.
    let table = run(Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["audit", "--registration-id", "audited", "--data-dir"])
        .arg(tmp.path()));
    assert!(table.contains("assigned") && table.contains("refused") && table.contains("4 item(s)"), "{table}");

    // No secret reached the audit log.
    let raw = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    for secret in [key.as_str(), good.split("sig=").nth(1).unwrap(), forged.split("sig=").nth(1).unwrap()] {
        let secret = secret.split('&').next().unwrap();
        assert!(!raw.contains(secret), "a secret reached the audit log");
    }
}

/// `provisio audit` with `args` against the log in `dir`: its JSON lines.
fn audit_json(dir: &Path, args: &[&str]) -> Vec<Value> {
    let out = run(Command::new(env!("CARGO_BIN_EXE_provisio"))
        .arg("audit")
        .args(args)
        .arg("--json")
        .arg("--data-dir")
        .arg(dir));
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_passes_on_an_intact_log_and_names_the_first_edited_or_removed_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &[]);
    let scope = s.info.id_scope.clone();
    let e = put_enrollment(
        &s,
        false,
        "chained",
        json!({"registrationId": "chained", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    for token in [device_token(&scope, "chained", &key), device_token(&scope, "chained", K1)] {
        register(&s, &scope, "chained", &token).await;
    }
    let (st, _) = service(&s, reqwest::Method::DELETE, "/enrollments/chained?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 204);
    assert!(s.terminate().success());
    let verify = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_provisio")).args(["audit", "verify"]).args(args).output().unwrap()
    };
    // The configured log, found from the data directory.
    let data_dir = tmp.path().to_str().unwrap();
    let ok = verify(&["--data-dir", data_dir]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.starts_with("ok: 4 line(s) in 1 file(s) chained from the log's first line; head "), "{out}");
    let log = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l.starts_with("{\"prev\":\"")), "{log}");
    // The refused attempt made to look like a success.
    assert!(lines[2].contains("\"refused\""), "{}", lines[2]);
    let edited = tmp.path().join("edited.jsonl");
    let mut copy: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    copy[2] = copy[2].replace("\"refused\"", "\"assigned\"");
    std::fs::write(&edited, copy.join("\n") + "\n").unwrap();
    let broken = verify(&[edited.to_str().unwrap()]);
    assert!(!broken.status.success());
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(err.contains(&format!("{}:4:", edited.display())), "{err}");
    // The refused attempt removed.
    let removed = tmp.path().join("removed.jsonl");
    let mut copy: Vec<&str> = lines.clone();
    copy.remove(2);
    std::fs::write(&removed, copy.join("\n") + "\n").unwrap();
    let broken = verify(&[removed.to_str().unwrap()]);
    assert!(!broken.status.success());
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(err.contains(&format!("{}:3:", removed.display())), "{err}");
    // A restart carries the chain on.
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &[]);
    register(&s, &scope, "chained", &device_token(&scope, "chained", K2)).await;
    assert!(s.terminate().success());
    let ok = verify(&["--data-dir", data_dir]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: 5 line(s)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_writes_refusals_of_unauthenticated_requests_within_a_limit_per_address() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &["--mqtt-listen", "off", "--amqp-listen", "off"]);
    let scope = s.info.id_scope.clone();
    // Forged device tokens, and a registration id far longer than any DPS allows.
    let long_id = "x".repeat(1000);
    for i in 0..30 {
        let id = if i == 0 { long_id.as_str() } else { "someone" };
        let r = s
            .client()
            .put(s.url(&format!("/{scope}/registrations/{id}/register?api-version=2021-06-01")))
            .header("Authorization", device_token(&scope, "someone", K1))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 400 | 401), "{}", r.status());
    }
    // Service requests with a forged token.
    let forged = build_token("localhost", K2, now() + 600, Some("provisioningserviceowner"), SrEncoding::Raw).unwrap();
    for _ in 0..30 {
        let r = s
            .client()
            .put(s.url("/enrollments/x?api-version=2021-10-01"))
            .header("Authorization", &forged)
            .json(&json!({"registrationId": "x", "attestation": {"type": "symmetricKey"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // A proven caller is written in full whatever the flood from its address.
    for i in 0..12 {
        let (st, _) =
            service(&s, reqwest::Method::DELETE, &format!("/enrollments/gone-{i}?api-version=2021-10-01"), None, None)
                .await;
        assert_eq!(st, 404);
    }
    assert!(s.terminate().success());
    for (kind, attempts) in [("registration", 30), ("service", 30)] {
        let lines = audit_json(tmp.path(), &["--kind", kind]);
        let refused: Vec<&Value> = lines.iter().filter(|l| l["result"] == "refused" && l["status"] != 404).collect();
        let summaries: Vec<&Value> = lines.iter().filter(|l| l["result"] == "suppressed").collect();
        let suppressed: u64 = summaries.iter().map(|l| l["suppressed"].as_u64().unwrap()).sum();
        // Ten a minute from one address (a slow run may straddle two minutes).
        assert!(refused.len() <= 20 && !summaries.is_empty(), "{kind}: {lines:#?}");
        assert_eq!(refused.len() as u64 + suppressed, attempts, "{kind}: every refusal written or counted");
        assert!(summaries.iter().all(|l| l["peer"] == "127.0.0.1"), "{summaries:?}");
    }
    let service_lines = audit_json(tmp.path(), &["--kind", "service"]);
    assert_eq!(service_lines.iter().filter(|l| l["status"] == 404).count(), 12, "{service_lines:#?}");
    // No line is longer than a couple of KB, whatever the client sent.
    let raw = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    assert!(raw.lines().all(|l| l.len() < 2000), "{raw}");
    assert!(!raw.contains(&long_id[..200]));
    run(Command::new(env!("CARGO_BIN_EXE_provisio")).args(["audit", "verify", "--data-dir"]).arg(tmp.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_reads_that_return_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &["--mqtt-listen", "off", "--amqp-listen", "off"]);
    put_enrollment(&s, false, "keyed", json!({"registrationId": "keyed", "attestation": {"type": "symmetricKey"}}))
        .await;
    put_enrollment(
        &s,
        true,
        "keyed-group",
        json!({"enrollmentGroupId": "keyed-group", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let reads = [
        (reqwest::Method::POST, "/enrollments/keyed/attestationmechanism"),
        (reqwest::Method::POST, "/enrollmentGroups/keyed-group/attestationmechanism"),
        (reqwest::Method::GET, "/policies"),
        (reqwest::Method::GET, "/policies/provisioningserviceowner"),
    ];
    for (method, path) in &reads {
        let (st, v) = service(&s, method.clone(), &format!("{path}?api-version=2021-10-01"), None, None).await;
        assert_eq!(st, 200, "{path}: {v}");
    }
    // Reads without secrets are not audited.
    let (st, _) = service(&s, reqwest::Method::GET, "/enrollments/keyed?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 200);
    assert!(s.terminate().success());
    let lines = audit_json(tmp.path(), &["--kind", "service"]);
    let actions: Vec<String> =
        lines.iter().map(|l| format!("{} as {}: {}", l["action"], l["credential"], l["status"])).collect();
    let want: Vec<String> = ["PUT /enrollments/keyed".to_owned(), "PUT /enrollmentGroups/keyed-group".to_owned()]
        .into_iter()
        .chain(reads.iter().map(|(method, path)| format!("{method} {path}")))
        .map(|a| format!("\"{a}\" as \"provisioningserviceowner\": 200"))
        .collect();
    assert_eq!(actions, want);
    assert!(lines.iter().all(|l| l["peer"] == "127.0.0.1" && l["result"] == "ok"));
}

/// What a load worker saw.
enum Seen {
    /// A `202` with this operation: from this moment the registration must survive.
    Accepted { id: String, op: String },
    /// Its poll said `assigned`, to this hub and device id.
    Assigned { id: String, hub: String, device: String },
    /// An answer that is not what a live server gives (a transport error is not one: the
    /// kill causes those).
    Wrong(String),
}

/// Repeated kill -9 while devices register: every registration acknowledged with a `202`
/// (recorded the moment it arrives, whether or not its poll got through before the kill) is
/// present, `assigned` and unchanged after each restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill_9_under_load_loses_no_acknowledged_registration() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Process::start(tmp.path(), "127.0.0.1:0", &["--mqtt-listen", "off"]);
    let scope = s.info.id_scope.clone();
    let g =
        put_enrollment(&s, true, "load", json!({"enrollmentGroupId": "load", "attestation": {"type": "symmetricKey"}}))
            .await;
    let group_key = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    // registration id -> (operation id, assigned hub and device id once its poll said so)
    let mut acknowledged: BTreeMap<String, (String, Option<(String, String)>)> = BTreeMap::new();
    for round in 0..4u32 {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
        let mut workers = Vec::new();
        for w in 0..6 {
            let (client, base, scope, group_key, tx) =
                (s.client(), s.url(""), scope.clone(), group_key.clone(), tx.clone());
            // Each worker registers devices until the server is gone.
            workers.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("r{round}-w{w}-d{i}");
                    let key = provisio_core::keys::derive_device_key(&group_key, &id).unwrap();
                    let token = device_token(&scope, &id, &key);
                    let Ok(r) = client
                        .put(format!("{base}/{scope}/registrations/{id}/register?api-version=2021-06-01"))
                        .header("Authorization", &token)
                        .json(&json!({"registrationId": id}))
                        .send()
                        .await
                    else {
                        return;
                    };
                    let status = r.status();
                    let Ok(v) = r.json::<Value>().await else { return };
                    if status != 202 {
                        let _ = tx.send(Seen::Wrong(format!("{id}: register answered {status}: {v}")));
                        return;
                    }
                    let op = v["operationId"].as_str().unwrap().to_owned();
                    let _ = tx.send(Seen::Accepted { id: id.clone(), op: op.clone() });
                    let Ok(r) = client
                        .get(format!("{base}/{scope}/registrations/{id}/operations/{op}?api-version=2021-06-01"))
                        .header("Authorization", &token)
                        .send()
                        .await
                    else {
                        return;
                    };
                    let Ok(v) = r.json::<Value>().await else { return };
                    let st = &v["registrationState"];
                    match (v["status"].as_str(), st["assignedHub"].as_str(), st["deviceId"].as_str()) {
                        (Some("assigned"), Some(hub), Some(device)) => {
                            let _ = tx.send(Seen::Assigned { id, hub: hub.to_owned(), device: device.to_owned() });
                        }
                        _ => {
                            let _ = tx.send(Seen::Wrong(format!("{id}: poll answered {v}")));
                            return;
                        }
                    }
                }
            }));
        }
        drop(tx);
        // Kill in the middle of the load: once this round has some registrations through,
        // while the workers keep registering.
        let wanted = 10 + 5 * round as usize;
        let mut accepted_this_round = 0;
        let mut wrong = Vec::new();
        let mut take = |seen: Seen, accepted: &mut usize| match seen {
            Seen::Accepted { id, op } => {
                acknowledged.insert(id, (op, None));
                *accepted += 1;
            }
            Seen::Assigned { id, hub, device } => {
                if let Some(entry) = acknowledged.get_mut(&id) {
                    entry.1 = Some((hub, device));
                }
            }
            Seen::Wrong(w) => wrong.push(w),
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while accepted_this_round < wanted {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(seen)) => take(seen, &mut accepted_this_round),
                Ok(None) => panic!("round {round}: every worker stopped before the kill"),
                Err(_) => panic!("round {round}: only {accepted_this_round} registrations in 60 s"),
            }
        }
        s.kill9();
        for w in workers {
            w.await.unwrap();
        }
        while let Some(seen) = rx.recv().await {
            take(seen, &mut accepted_this_round);
        }
        assert!(wrong.is_empty(), "round {round}: answers no live server gives: {wrong:#?}");

        s = Process::start(tmp.path(), "127.0.0.1:0", &["--mqtt-listen", "off"]);
        // Every acknowledged registration, from every round so far, is there and unchanged.
        for (id, (op, assigned)) in &acknowledged {
            let key = provisio_core::keys::derive_device_key(&group_key, id).unwrap();
            let token = device_token(&scope, id, &key);
            let r = s
                .client()
                .get(s.url(&format!("/{scope}/registrations/{id}/operations/{op}?api-version=2021-06-01")))
                .header("Authorization", &token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "round {round}: the acknowledged operation of {id} was lost");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["status"], "assigned", "{v}");
            let (st, rec) =
                service(&s, reqwest::Method::GET, &format!("/registrations/{id}?api-version=2021-10-01"), None, None)
                    .await;
            assert_eq!(st, 200, "round {round}: registration record of {id} lost");
            assert_eq!(rec["status"], "assigned");
            assert_eq!(rec["assignedHub"], v["registrationState"]["assignedHub"]);
            if let Some((hub, device)) = assigned {
                assert_eq!(v["registrationState"]["assignedHub"], hub.as_str(), "{id}");
                assert_eq!(v["registrationState"]["deviceId"], device.as_str(), "{id}");
            }
        }
    }
    // The audit log survived the kills too: readable, torn last lines at most skipped; a
    // line is written before its answer, so every acknowledged registration has one.
    let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["audit", "--json", "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let audited: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["result"] == "assigned")
        .filter_map(|e| e["operationId"].as_str().map(str::to_owned))
        .collect();
    for (id, (op, _)) in &acknowledged {
        assert!(audited.contains(op), "the acknowledged registration of {id} ({op}) is not in the audit log");
    }
    // Its hash chain too: each restart carried it on from the last line written.
    let verified =
        run(Command::new(env!("CARGO_BIN_EXE_provisio")).args(["audit", "verify", "--data-dir"]).arg(tmp.path()));
    assert!(verified.starts_with("ok: ") && verified.contains("from the log's first line"), "{verified}");
}
