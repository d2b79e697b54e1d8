//! TPM attestation against a real TPM 2.0 implementation: swtpm, driven by tpm2-tools the
//! way the device SDKs drive a TPM (ActivateCredential with the EK under a PolicySecret
//! session, Import and Load under the SRK, TPM2_HMAC with the imported key), and the device
//! API spoken with `curl`, as in the walkthrough.
//!
//! Needs `swtpm` and `tpm2-tools` (`.ci/run` installs them; Debian: `apt-get install swtpm
//! tpm2-tools`). Without them these tests fail and say so.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use aws_lc_rs::hmac;
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use provisio_core::tpm::{StorageKey, authentication_key};
use serde_json::{Value, json};

use crate::common::{Server, assert_dps_error, curl, now, put_enrollment};

/// A software TPM on loopback and a scratch directory for tpm2-tools' files.
struct SoftTpm {
    child: Child,
    dir: tempfile::TempDir,
    tcti: String,
    port: u16,
}

impl Drop for SoftTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SoftTpm {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Two free ports next to each other (commands and control).
        let port = (0..50)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
            .find(|p| *p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok())
            .unwrap();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.path().display()))
            .args(["--server", &format!("type=tcp,port={port},bindaddr=127.0.0.1")])
            .args(["--ctrl", &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1)])
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("swtpm could not be started ({e}); install swtpm and tpm2-tools"));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self { child, dir, tcti: format!("swtpm:host=127.0.0.1,port={port}"), port }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// Runs a tpm2-tools command in the scratch directory; the error carries the TPM's answer.
    fn run(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(self.dir.path())
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .output()
            .unwrap_or_else(|e| panic!("{} could not be run ({e}); install tpm2-tools", args[0]));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Creates the EK (TCG template, RSA-2048) and an SRK; returns their `TPM2B_PUBLIC`s.
    fn keys(&self) -> (Vec<u8>, Vec<u8>) {
        self.run(&["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"]).unwrap();
        self.run(&["tpm2_createprimary", "-Q", "-C", "o", "-c", "srk.ctx"]).unwrap();
        self.run(&["tpm2_readpublic", "-Q", "-c", "srk.ctx", "-o", "srk.pub"]).unwrap();
        // swtpm has no resource manager: transient objects stay loaded until flushed.
        self.run(&["tpm2_flushcontext", "-t"]).unwrap();
        (std::fs::read(self.path("ek.pub")).unwrap(), std::fs::read(self.path("srk.pub")).unwrap())
    }

    /// What a device SDK does with an `authenticationKey` blob: activate the credential,
    /// import the key under the SRK and load it (as `hmac.ctx`).
    fn take_in(&self, blob: &[u8]) -> Result<(), String> {
        let parts = split(blob);
        // tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
        let mut cred = vec![0xBA, 0xDC, 0xC0, 0xDE, 0, 0, 0, 1];
        cred.extend_from_slice(&parts[0]);
        cred.extend_from_slice(&parts[1]);
        for (f, b) in [("cred.bin", &cred), ("dup.bin", &parts[2]), ("seed.bin", &parts[3]), ("obj.pub", &parts[4])] {
            std::fs::write(self.path(f), b).unwrap();
        }
        self.run(&["tpm2_startauthsession", "--policy-session", "-S", "session.ctx"])?;
        let activated = self.run(&["tpm2_policysecret", "-S", "session.ctx", "-c", "e"]).and_then(|()| {
            self.run(&[
                "tpm2_activatecredential",
                "-c",
                "srk.ctx",
                "-C",
                "ek.ctx",
                "-i",
                "cred.bin",
                "-o",
                "inner.key",
                "-P",
                "session:session.ctx",
            ])
        });
        self.run(&["tpm2_flushcontext", "session.ctx"])?;
        self.run(&["tpm2_flushcontext", "-t"])?;
        activated?;
        let imported = self.run(&[
            "tpm2_import",
            "-C",
            "srk.ctx",
            "-u",
            "obj.pub",
            "-i",
            "dup.bin",
            "-s",
            "seed.bin",
            "-k",
            "inner.key",
            "-r",
            "obj.priv",
        ]);
        self.run(&["tpm2_flushcontext", "-t"])?;
        imported?;
        let loaded = self.run(&["tpm2_load", "-C", "srk.ctx", "-u", "obj.pub", "-r", "obj.priv", "-c", "hmac.ctx"]);
        self.run(&["tpm2_flushcontext", "-t"])?;
        loaded
    }

    /// TPM2_HMAC (SHA-256) of `msg` with the key taken in last.
    fn hmac(&self, msg: &[u8]) -> Vec<u8> {
        std::fs::write(self.path("msg.bin"), msg).unwrap();
        let signed = self.run(&["tpm2_hmac", "-c", "hmac.ctx", "-g", "sha256", "-o", "mac.bin", "msg.bin"]);
        self.run(&["tpm2_flushcontext", "-t"]).unwrap();
        signed.unwrap();
        std::fs::read(self.path("mac.bin")).unwrap()
    }

    /// A DPS SAS token for `{scope}/registrations/{id}`, signed by the TPM.
    fn sas(&self, scope: &str, id: &str) -> String {
        let sr = format!("{scope}%2fregistrations%2f{id}");
        let se = now() + 3600;
        let sig = B64.encode(self.hmac(format!("{sr}\n{se}").as_bytes()));
        let sig = sig.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
        format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn=registration")
    }
}

/// The blob's six TPM2B parts, each with its size prefix.
fn split(blob: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut rest = blob;
    while rest.len() >= 2 {
        let n = 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        parts.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    assert!(rest.is_empty() && parts.len() == 6, "not six TPM2B parts");
    parts
}

#[test]
fn a_real_tpm_takes_in_the_delivered_key_and_signs_with_it() {
    let tpm = SoftTpm::start();
    let (ek_pub, srk_pub) = tpm.keys();
    let ek = StorageKey::parse(&ek_pub, "endorsementKey").unwrap();
    let srk = StorageKey::parse(&srk_pub, "storageRootKey").unwrap();
    let key = [0x5a_u8; 32];
    tpm.take_in(&authentication_key(&ek, &srk, &key).unwrap()).unwrap();
    let msg = b"0ne00000001%2fregistrations%2ftpm-1\n1767225600";
    assert_eq!(tpm.hmac(msg), hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), msg).as_ref());
}

#[test]
fn a_blob_for_another_tpm_or_altered_is_refused_by_the_tpm() {
    let tpm = SoftTpm::start();
    let (ek_pub, srk_pub) = tpm.keys();
    let other = SoftTpm::start();
    let (other_ek, _) = other.keys();
    let srk = StorageKey::parse(&srk_pub, "storageRootKey").unwrap();
    // Encrypted to another TPM's EK: this one cannot activate the credential.
    let foreign = StorageKey::parse(&other_ek, "endorsementKey").unwrap();
    let e = tpm.take_in(&authentication_key(&foreign, &srk, &[1; 32]).unwrap()).unwrap_err();
    assert!(e.contains("tpm2_activatecredential"), "{e}");
    // One bit of the duplicate flipped: the import's integrity check refuses it.
    let ek = StorageKey::parse(&ek_pub, "endorsementKey").unwrap();
    let mut blob = authentication_key(&ek, &srk, &[1; 32]).unwrap();
    let parts = split(&blob);
    let at = parts[0].len() + parts[1].len() + parts[2].len() - 1;
    blob[at] ^= 1;
    let e = tpm.take_in(&blob).unwrap_err();
    assert!(e.contains("tpm2_import"), "{e}");
}

/// A TPM individual enrollment with the EK `ek` (base64), through the service API.
async fn enroll_tpm(s: &Server, id: &str, device_id: Option<&str>, ek: &str) -> Value {
    let mut body = json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}});
    if let Some(d) = device_id {
        body["deviceId"] = json!(d);
    }
    put_enrollment(s, false, id, body).await
}

fn register_path(scope: &str, id: &str) -> String {
    format!("/{scope}/registrations/{id}/register?api-version=2021-06-01")
}

fn tpm_body(id: &str, ek: &[u8], srk: Option<&[u8]>) -> String {
    let mut tpm = json!({"endorsementKey": B64.encode(ek)});
    if let Some(srk) = srk {
        tpm["storageRootKey"] = json!(B64.encode(srk));
    }
    json!({"registrationId": id, "tpm": tpm}).to_string()
}

/// The challenge: `401` with `authenticationKey` and `keyName`, and no `status`.
fn challenge(s: &Server, scope: &str, id: &str, body: &str) -> Vec<u8> {
    let (status, _, v) = curl(s, "PUT", &register_path(scope, id), None, Some(body));
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["keyName"], "registration", "{v}");
    assert!(v.get("status").is_none() && v.get("errorCode").is_none(), "{v}");
    B64.decode(v["authenticationKey"].as_str().unwrap()).unwrap()
}

/// A hub registrar endpoint that keeps what it is sent.
async fn registrar_endpoint() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = std::sync::Arc::default();
    let keep = seen.clone();
    let app = axum::Router::new().route(
        "/registrar",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(v);
                axum::Json(json!({}))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/registrar"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_device_registers_with_curl_and_its_tpm() {
    let tpm = SoftTpm::start();
    let (ek, srk) = tpm.keys();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("provisio.toml");
    // The registrar endpoint runs on loopback, which the server calls only when allowed.
    std::fs::write(&cfg, "hub_registrar = \"webhook\"\nwebhook_allowed_networks = [\"127.0.0.0/8\"]\n").unwrap();
    let s = Server::start(
        tmp.path(),
        "127.0.0.1:0",
        &["--linked-hub", "hub-t.example.net", "--config", cfg.to_str().unwrap()],
    );
    let scope = s.info.id_scope.clone();
    let (registrar, seen) = registrar_endpoint().await;
    let (status, v) = crate::common::service(
        &s,
        reqwest::Method::PUT,
        "/linkedHubs/hub-t.example.net?api-version=2021-10-01",
        None,
        Some(json!({"allocationWeight": 1, "registrarWebhookUrl": registrar})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let created = enroll_tpm(&s, "tpm-dev-01", None, &B64.encode(&ek)).await;
    assert_eq!(created["attestation"]["type"], "tpm");

    // 1. No credential, the TPM's keys: the challenge, which only this TPM can take in.
    let blob = challenge(&s, &scope, "tpm-dev-01", &tpm_body("tpm-dev-01", &ek, Some(&srk)));
    tpm.take_in(&blob).unwrap();
    // 2. The same request signed by the TPM with the delivered key.
    let token = tpm.sas(&scope, "tpm-dev-01");
    let body = tpm_body("tpm-dev-01", &ek, Some(&srk));
    let (status, _, v) = curl(&s, "PUT", &register_path(&scope, "tpm-dev-01"), Some(&token), Some(&body));
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["status"], "assigning");
    let op = v["operationId"].as_str().unwrap().to_owned();
    // 3. The poll, signed the same way: assigned, with the key again for the device's TPM.
    let poll = format!("/{scope}/registrations/tpm-dev-01/operations/{op}?api-version=2021-06-01");
    let (status, _, v) = curl(&s, "GET", &poll, Some(&token), None);
    assert_eq!(status, 200, "{v}");
    let state = &v["registrationState"];
    assert_eq!(state["status"], "assigned", "{v}");
    assert_eq!(state["assignedHub"], "hub-t.example.net");
    assert_eq!(state["deviceId"], "tpm-dev-01");
    assert!(state.get("symmetricKey").is_none() && state.get("x509").is_none(), "{v}");
    let result_blob = B64.decode(state["tpm"]["authenticationKey"].as_str().unwrap()).unwrap();
    assert_ne!(result_blob, blob, "wrapped afresh");
    // The result's blob opens in the same TPM to the same key: the token it signs now is
    // the one it signed before (same expiry second or not, the device's key is unchanged).
    let msg = b"hub sas";
    let before = tpm.hmac(msg);
    tpm.take_in(&result_blob).unwrap();
    assert_eq!(tpm.hmac(msg), before);
    // The hub registrar was given that key for the device's identity at the hub.
    let calls = seen.lock().unwrap().clone();
    let call = calls.iter().find(|c| c["registrationId"] == "tpm-dev-01").expect("registrar called");
    assert_eq!(call["authentication"]["type"], "sas", "{call}");
    let hub_key = B64.decode(call["authentication"]["primaryKey"].as_str().unwrap()).unwrap();
    assert_eq!(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &hub_key), msg).as_ref(), before.as_slice());
    // The device's registration state (POST) with the same token.
    let (status, _, v) = curl(
        &s,
        "POST",
        &format!("/{scope}/registrations/tpm-dev-01?api-version=2021-06-01"),
        Some(&token),
        Some("{}"),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "assigned");

    // A second boot: a Rust/aziot-style second request without the tpm block works too. A
    // new challenge does not void the earlier key (anyone who knows the EK may ask for one:
    // issue #24, finding 8): tokens of both keys register, while they are unexpired.
    let blob2 = challenge(&s, &scope, "tpm-dev-01", &tpm_body("tpm-dev-01", &ek, Some(&srk)));
    let (status, _, v) = curl(&s, "PUT", &register_path(&scope, "tpm-dev-01"), Some(&token), Some(&body));
    assert_eq!(status, 202, "the earlier key still counts: {v}");
    tpm.take_in(&blob2).unwrap();
    let token2 = tpm.sas(&scope, "tpm-dev-01");
    let (status, _, v) = curl(
        &s,
        "PUT",
        &register_path(&scope, "tpm-dev-01"),
        Some(&token2),
        Some(r#"{"registrationId":"tpm-dev-01"}"#),
    );
    assert_eq!(status, 202, "{v}");
    // The audit log records the challenges (credential "tpm") next to the registrations.
    let audit = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    let challenged = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["result"] == "challenged" && e["credential"] == "tpm" && e["registrationId"] == "tpm-dev-01")
        .count();
    assert_eq!(challenged, 2, "{audit}");
    // At most 3 challenges per device per minute: the third is answered, the fourth is 429.
    challenge(&s, &scope, "tpm-dev-01", &tpm_body("tpm-dev-01", &ek, Some(&srk)));
    let (status, head, v) =
        curl(&s, "PUT", &register_path(&scope, "tpm-dev-01"), None, Some(&tpm_body("tpm-dev-01", &ek, Some(&srk))));
    assert_dps_error(status, &v, 429, 429_001);
    assert!(crate::common::header(&head, "retry-after").is_some(), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_challenges_and_tokens_are_refused_with_dps_errors() {
    let tpm = SoftTpm::start();
    let (ek, srk) = tpm.keys();
    let other = SoftTpm::start();
    let (other_ek, other_srk) = other.keys();
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &["--linked-hub", "hub-t.example.net"]);
    let scope = s.info.id_scope.clone();
    enroll_tpm(&s, "tpm-dev-02", None, &B64.encode(&ek)).await;
    put_enrollment(&s, false, "sym-dev", json!({"registrationId": "sym-dev", "attestation": {"type": "symmetricKey"}}))
        .await;
    // An EK no challenge can be made for is refused when enrolled, not at the device's turn:
    // a truncated one, random bytes, a signing key.
    let mut signing = ek.clone();
    signing[7] = 0x05;
    for bad in [ek[..100].to_vec(), vec![7; 64], signing] {
        let (status, v) = crate::common::service(
            &s,
            reqwest::Method::PUT,
            "/enrollments/tpm-bad?api-version=2021-10-01",
            None,
            Some(json!({"registrationId": "tpm-bad", "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(&bad)}}})),
        )
        .await;
        assert_dps_error(status, &v, 400, 400_004);
        assert!(v["message"].as_str().unwrap().contains("attestation.tpm.endorsementKey"), "{v}");
    }
    let put = |id: &str, auth: Option<&str>, body: &str| curl(&s, "PUT", &register_path(&scope, id), auth, Some(body));

    // Another TPM's EK for this device: refused before anything is sent.
    let (status, _, v) = put("tpm-dev-02", None, &tpm_body("tpm-dev-02", &other_ek, Some(&other_srk)));
    assert_dps_error(status, &v, 401, 401_002);
    // No enrollment: the same 401 (DPS answers 404201, which tells anyone which ids are
    // enrolled).
    let (status, _, v) = put("tpm-nobody", None, &tpm_body("tpm-nobody", &ek, Some(&srk)));
    assert_dps_error(status, &v, 401, 401_002);
    // A symmetric-key enrollment is not proven by a TPM.
    let (status, _, v) = put("sym-dev", None, &tpm_body("sym-dev", &ek, Some(&srk)));
    assert_dps_error(status, &v, 401, 401_002);
    // Malformed tpm blocks: 400 in the DPS shape.
    for body in [
        r#"{"registrationId":"tpm-dev-02","tpm":{"endorsementKey":"%%%"}}"#.to_owned(),
        r#"{"registrationId":"tpm-dev-02","tpm":{}}"#.to_owned(),
        r#"{"registrationId":"tpm-dev-02","tpm":{"endorsementKey":7}}"#.to_owned(),
        tpm_body("tpm-dev-02", &ek, None),
        tpm_body("tpm-dev-02", &ek, Some(&srk[..40])),
        tpm_body("other-id", &ek, Some(&srk)),
    ] {
        let (status, _, v) = put("tpm-dev-02", None, &body);
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["errorCode"].as_u64().map(|c| c / 1000), Some(400), "{body}: {v}");
    }
    // A token before any challenge, a forged token, and a token from another TPM.
    let forged = format!(
        "SharedAccessSignature sr={scope}%2fregistrations%2ftpm-dev-02&sig=AAAA&se={}&skn=registration",
        now() + 600
    );
    let (status, _, v) = put("tpm-dev-02", Some(&forged), r#"{"registrationId":"tpm-dev-02"}"#);
    assert_dps_error(status, &v, 401, 401_002);
    let blob = challenge(&s, &scope, "tpm-dev-02", &tpm_body("tpm-dev-02", &ek, Some(&srk)));
    // The other TPM cannot take in this TPM's key.
    assert!(other.take_in(&blob).unwrap_err().contains("tpm2_activatecredential"));
    let (status, _, v) = put("tpm-dev-02", Some(&forged), r#"{"registrationId":"tpm-dev-02"}"#);
    assert_dps_error(status, &v, 401, 401_002);
    // The refusals above registered nothing; the right TPM's token then does.
    let state = "/registrations/tpm-dev-02?api-version=2021-10-01";
    let (status, v) = crate::common::service(&s, reqwest::Method::GET, state, None, None).await;
    assert_eq!(status, 404, "{v}");
    tpm.take_in(&blob).unwrap();
    let (status, _, v) = put("tpm-dev-02", Some(&tpm.sas(&scope, "tpm-dev-02")), r#"{"registrationId":"tpm-dev-02"}"#);
    assert_eq!(status, 202, "{v}");
    let (status, v) = crate::common::service(&s, reqwest::Method::GET, state, None, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "assigned", "{v}");
}

/// The stock Node SDK (`azure-iot-security-tpm` with tss.js, and the HTTP transport) with a
/// software TPM: it makes its EK and SRK in the TPM, takes the challenge's key in, signs with
/// it and polls to `assigned`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_tpm_client_registers_over_https_and_amqp() {
    let _port = crate::common::PORT_443.lock().await;
    let tpm = SoftTpm::start();
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        "127.0.0.1:443",
        &["--linked-hub", "node-tpm-hub.example.net", "--retry-after-secs", "1"],
    );
    let swtpm = tpm.port.to_string();
    let env = [("ATTESTATION", "tpm"), ("SWTPM_PORT", swtpm.as_str())];
    let printed = crate::sdk::node_output(&s, "node-tpm-1", &[env[0], env[1], ("TPM_PRINT_EK", "1")]);
    let ek = printed["endorsementKey"].as_str().unwrap().to_owned();
    enroll_tpm(&s, "node-tpm-1", Some("node-tpm-dev"), &ek).await;
    // The SDK's TPM path hands back the whole operation status.
    let out = crate::sdk::node_output(&s, "node-tpm-1", &env)["result"].clone();
    assert_eq!(out["status"], "assigned", "{out}");
    let r = out["registrationState"].clone();
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["assignedHub"], "node-tpm-hub.example.net", "{r}");
    assert_eq!(r["deviceId"], "node-tpm-dev", "{r}");
    assert!(r["tpm"]["authenticationKey"].as_str().is_some_and(|k| !k.is_empty()), "{r}");

    // The same device again over AMQP: SASL mechanism TPM (EK, then SRK, the blob in
    // challenge frames, the SAS token in the last response), then the register message.
    let amqp = s.info.amqp_endpoint.clone().unwrap();
    let amqp_env = [env[0], env[1], ("TRANSPORT", "amqp"), ("PROVISIO_HOST", amqp.as_str())];
    let out = crate::sdk::node_output(&s, "node-tpm-1", &amqp_env)["result"].clone();
    let r = if out.get("registrationState").is_some() { out["registrationState"].clone() } else { out };
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["assignedHub"], "node-tpm-hub.example.net", "{r}");
    assert!(r["tpm"]["authenticationKey"].as_str().is_some_and(|k| !k.is_empty()), "{r}");

    // Enrolled with another TPM's EK: the SDK gets our 401 (in the DPS error shape, with no
    // authenticationKey), says the answer is not a challenge and stops; the audit log has why.
    let other = SoftTpm::start();
    let (other_ek, _) = other.keys();
    enroll_tpm(&s, "node-tpm-2", None, &B64.encode(&other_ek)).await;
    let v = node_failure(&s, "node-tpm-2", &[env[0], env[1], ("PROVISIO_HOST", "localhost")]);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["name"], "FormatError", "{v}");
    let audit = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).any(|e| e["registrationId"] == "node-tpm-2"
            && e["result"] == "refused"
            && e["errorCode"] == 401_002
            && e["credential"] == "tpm"),
        "{audit}"
    );
    // Over AMQP the same refusal closes the connection before any link: the SDK fails.
    let v = node_failure(&s, "node-tpm-2", &amqp_env);
    assert_eq!(v["ok"], false, "{v}");
    assert_ne!(v["error"]["name"], "HarnessTimeout", "{v}");
    let audit = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .any(|e| e["registrationId"] == "node-tpm-2" && e["transport"] == "amqp" && e["errorCode"] == 401_002),
        "{audit}"
    );
}

/// Runs the Node harness for a registration that must fail; returns its JSON line.
fn node_failure(s: &Server, registration_id: &str, env: &[(&str, &str)]) -> Value {
    crate::node::register(s, "http", "localhost", registration_id, env)
}

fn provisio_device(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_provisio")).arg("device").args(args).output().unwrap()
}

/// Without the `tpm` feature `--tpm` says how to get it (exit code 2, configuration).
#[cfg(not(feature = "tpm"))]
#[test]
fn device_tpm_options_say_how_to_build_them() {
    let out = provisio_device(&["tpm-ek", "--tpm", "swtpm:host=127.0.0.1,port=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--features tpm"), "{out:?}");
}

/// `provisio device tpm-ek` and `register --tpm` on the TCG software stack (tss-esapi) with
/// swtpm: the EK is the one tpm2-tools makes, the registration completes over HTTPS, and a
/// TPM enrolled under another EK is refused as an authentication failure (exit code 4).
#[cfg(feature = "tpm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisio_device_registers_with_a_tpm() {
    use crate::common::Instance;
    let tpm = SoftTpm::start();
    let tcti = tpm.tcti.clone();
    let out = provisio_device(&["tpm-ek", "--tpm", &tcti]);
    assert!(out.status.success(), "{out:?}");
    let ek = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (ek_tools, _) = tpm.keys();
    assert_eq!(B64.decode(&ek).unwrap(), ek_tools, "the same EK as tpm2_createek");

    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &["--linked-hub", "cli-tpm-hub.example.net"]);
    let scope = s.info.id_scope.clone();
    enroll_tpm(&s, "cli-tpm", None, &ek).await;
    let endpoint = format!("localhost:{}", s.port);
    let ca = s.ca_file();
    let base = ["--scope", &scope, "--endpoint", &endpoint, "--ca", ca.to_str().unwrap(), "--json", "--tpm", &tcti];
    let out = provisio_device(&[&["register", "--registration-id", "cli-tpm"][..], &base].concat());
    assert!(out.status.success(), "{out:?}\n{}", s.log_text());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "assigned", "{v}");
    assert_eq!(v["assignedHub"], "cli-tpm-hub.example.net", "{v}");
    assert!(v["tpm"]["authenticationKey"].is_string(), "{v}");
    // The status lookup from a fresh process: a challenge first, then the POST.
    let out = provisio_device(&[&["status", "--registration-id", "cli-tpm"][..], &base].concat());
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "assigned", "{v}");

    // Another device's EK in the enrollment: the service's 401, exit code 4.
    let other = SoftTpm::start();
    let (other_ek, _) = other.keys();
    enroll_tpm(&s, "cli-tpm-2", None, &B64.encode(&other_ek)).await;
    let out = provisio_device(&[&["register", "--registration-id", "cli-tpm-2"][..], &base].concat());
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "authentication", "{v}");
    // MQTT has no TPM path: a configuration error before anything is sent.
    let out =
        provisio_device(&[&["register", "--registration-id", "cli-tpm", "--transport", "mqtt"][..], &base].concat());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
