//! Operational certificates issued at registration (issue #26): a device sends a PKCS#10
//! request made by plain `openssl` with its registration, over HTTPS, MQTT and AMQP, and
//! gets a chain that `openssl verify` accepts; what is refused is refused on every transport;
//! revocation shows in the CA's CRL, fetched without a credential.

use std::{path::Path, process::Command};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use provisio_testkit::{
    Server,
    devices::{Call, Op, Transport, send},
    now, put_enrollment,
};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    cli::{Cli, field, fits_100_columns, table_fields},
    common::{Instance, run, service},
};

const V: &str = "api-version=2021-10-01";

fn token(scope: &str, id: &str, key: &str) -> String {
    provisio_core::sas::build_token(
        &format!("{scope}/registrations/{id}"),
        key,
        now() + 600,
        Some("registration"),
        provisio_core::sas::SrEncoding::Raw,
    )
    .unwrap()
}

/// A request for `cn` made by `openssl req` with a new key of `newkey` (`ec` on P-256, or an
/// RSA size); returns its base64 DER and the key file.
fn openssl_csr(dir: &Path, cn: &str, newkey: &[&str]) -> (String, std::path::PathBuf) {
    let key = dir.join(format!("{cn}-{}.key", newkey.join("-").replace(':', "_")));
    let der = dir.join(format!("{cn}.csr.der"));
    run(Command::new("openssl")
        .args(["req", "-new", "-nodes"])
        .args(newkey)
        .arg("-keyout")
        .arg(&key)
        .args(["-subj", &format!("/CN={cn}"), "-outform", "DER", "-out"])
        .arg(&der));
    (B64.encode(std::fs::read(&der).unwrap()), key)
}

fn pem(der_b64: &str) -> String {
    let b64 = der_b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join("\n");
    format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_get_certificates_for_their_requests_over_every_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("provisio.toml");
    std::fs::write(&cfg, "public_url = \"https://dps.example.net\"\ndevice_polls_per_10s = 0\n").unwrap();
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let scope = s.info.id_scope.clone();
    // An issuing CA made by the service, and a policy that issues from it.
    let (st, ca) = service(&s, Method::PUT, &format!("/certificateAuthorities/fleet?{V}"), None, None).await;
    assert_eq!(st, 200, "{ca}");
    assert_eq!(ca["crlPath"], "/crl/fleet.crl");
    assert!(ca.get("privateKey").is_none(), "{ca}");
    let (st, again) = service(&s, Method::PUT, &format!("/certificateAuthorities/fleet?{V}"), None, None).await;
    assert_eq!(st, 409, "{again}");
    assert!(again["message"].as_str().unwrap().contains("not replaced in place"), "{again}");
    let (st, _) = service(&s, Method::POST, &format!("/registrations/nobody/revokeCertificates?{V}"), None, None).await;
    assert_eq!(st, 404, "no such registration");
    let policy = json!({"name": "devices", "certificateAuthorityName": "fleet", "validityInDays": 10});
    let (st, p) = service(&s, Method::PUT, &format!("/credentialPolicies/devices?{V}"), None, Some(policy)).await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["issuanceLimitPerDay"], 10);
    let (st, e) = service(
        &s,
        Method::PUT,
        &format!("/credentialPolicies/bad?{V}"),
        None,
        Some(json!({"name": "bad", "certificateAuthorityName": "nope"})),
    )
    .await;
    assert_eq!(st, 400, "{e}");

    for (n, transport) in Transport::ALL.into_iter().enumerate() {
        let id = format!("cert-dev-{n}");
        let e = put_enrollment(
            &s,
            false,
            &id,
            json!({"registrationId": id, "attestation": {"type": "symmetricKey"}, "credentialPolicyName": "devices"}),
        )
        .await;
        assert_eq!(e["credentialPolicyName"], "devices");
        let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
        let tok = token(&scope, &id, key);
        let call = |op: Op<'_>| {
            let op = match op {
                Op::Register(b) => OwnedOp::Register(b.to_vec()),
                Op::Poll(o) => OwnedOp::Poll(o.to_owned()),
            };
            (scope.clone(), id.clone(), tok.clone(), op)
        };
        // Refused on every transport, with the reason, and nothing stored: a request for
        // another device, an RSA key under 2048 bits, bytes that are no request.
        let (other, _) =
            openssl_csr(tmp.path(), "someone-else", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let (weak, _) = openssl_csr(tmp.path(), &id, &["-newkey", "rsa:1024"]);
        for (bad, why) in [(other, "is not the registration id"), (weak, "RSA 1024"), ("AAAA".to_owned(), "PKCS#10")] {
            let body = serde_json::to_vec(&json!({"registrationId": id, "csr": bad})).unwrap();
            let r = send_owned(&s, transport, call(Op::Register(&body))).await;
            assert_eq!((r.status, r.body["errorCode"].as_u64()), (400, Some(400_004)), "{transport:?}: {}", r.body);
            assert!(r.body["message"].as_str().unwrap().contains(why), "{transport:?}: {}", r.body);
        }
        let (st, _) = service(&s, Method::GET, &format!("/registrations/{id}?{V}"), None, None).await;
        assert_eq!(st, 404, "{transport:?}: a refused request stores no registration");
        // The device's own request: assigned, with its chain.
        let (csr, key_file) = openssl_csr(tmp.path(), &id, &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let body = serde_json::to_vec(&json!({"registrationId": id, "csr": csr})).unwrap();
        let r = send_owned(&s, transport, call(Op::Register(&body))).await;
        assert_eq!(r.status, 202, "{transport:?}: {}", r.body);
        let op = r.body["operationId"].as_str().unwrap().to_owned();
        let r = send_owned(&s, transport, call(Op::Poll(&op))).await;
        assert_eq!(r.status, 200, "{transport:?}: {}", r.body);
        assert_eq!(r.body["status"], "assigned");
        let chain: Vec<String> = r.body["registrationState"]["issuedCertificateChain"]
            .as_array()
            .unwrap_or_else(|| panic!("{transport:?}: no chain in {}", r.body))
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(chain.len(), 3, "leaf, issuing CA, root");
        // `openssl verify` accepts the chain against the root; the leaf's key is the request's.
        let dir = tmp.path();
        std::fs::write(dir.join("leaf.pem"), pem(&chain[0])).unwrap();
        std::fs::write(dir.join("inter.pem"), pem(&chain[1])).unwrap();
        std::fs::write(dir.join("root.pem"), pem(&chain[2])).unwrap();
        let verified = run(Command::new("openssl").current_dir(dir).args([
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "inter.pem",
            "leaf.pem",
        ]));
        assert!(verified.contains("leaf.pem: OK"), "{verified}");
        let leaf_key =
            run(Command::new("openssl").current_dir(dir).args(["x509", "-in", "leaf.pem", "-noout", "-pubkey"]));
        let own_key = run(Command::new("openssl").arg("pkey").arg("-in").arg(&key_file).arg("-pubout"));
        assert_eq!(leaf_key, own_key);
        let text = run(Command::new("openssl").current_dir(dir).args(["x509", "-in", "leaf.pem", "-noout", "-text"]));
        assert!(text.contains(&format!("CN = {id}")) || text.contains(&format!("CN={id}")), "{text}");
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
        assert!(text.contains("https://dps.example.net/crl/fleet.crl"), "{text}");
        // The service API shows the current certificate.
        let (_, state) = service(&s, Method::GET, &format!("/registrations/{id}?{V}"), None, None).await;
        let thumbprint = provisio_pki::x509::sha256_thumbprint(&B64.decode(&chain[0]).unwrap());
        assert_eq!(state["issuedCertificate"]["sha256Thumbprint"], thumbprint, "{state}");
    }

    // Revocation: by API; the CRL (no credential) lists the serial, signed by the CA.
    let (st, v) =
        service(&s, Method::POST, &format!("/registrations/cert-dev-0/revokeCertificates?{V}"), None, None).await;
    assert_eq!((st, &v["revoked"]), (200, &json!(1)), "{v}");
    let (_, state) = service(&s, Method::GET, &format!("/registrations/cert-dev-0?{V}"), None, None).await;
    assert!(state["issuedCertificate"]["revokedDateTimeUtc"].is_string(), "{state}");
    let serial = state["issuedCertificate"]["serialNumber"].as_str().unwrap().to_owned();
    let crl = s.client().get(s.url("/crl/fleet.crl")).send().await.unwrap();
    assert_eq!(crl.status(), 200);
    assert_eq!(crl.headers()["content-type"], "application/pkix-crl");
    std::fs::write(tmp.path().join("fleet.crl"), crl.bytes().await.unwrap()).unwrap();
    std::fs::write(tmp.path().join("ca.pem"), ca["certificate"].as_str().unwrap()).unwrap();
    let listed = run(Command::new("openssl").current_dir(tmp.path()).args([
        "crl",
        "-inform",
        "DER",
        "-in",
        "fleet.crl",
        "-CAfile",
        "ca.pem",
        "-noout",
        "-text",
    ]));
    assert!(listed.to_ascii_uppercase().contains(&serial), "{serial} not in {listed}");
    assert!(listed.contains("Next Update"), "{listed}");
    // Deleting a registration revokes its certificates too.
    let (st, _) = service(&s, Method::DELETE, &format!("/registrations/cert-dev-1?{V}"), None, None).await;
    assert_eq!(st, 204);
    let crl = s.client().get(s.url("/crl/fleet.crl")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(revoked_in(&crl), 2);
    // Disabling an enrollment revokes its device's certificates too.
    let (_, e) = service(&s, Method::GET, &format!("/enrollments/cert-dev-2?{V}"), None, None).await;
    let mut disabled = e.clone();
    disabled["provisioningStatus"] = json!("disabled");
    let (_, mech) =
        service(&s, Method::POST, &format!("/enrollments/cert-dev-2/attestationmechanism?{V}"), None, None).await;
    disabled["attestation"] = mech;
    let (st, v) = service(&s, Method::PUT, &format!("/enrollments/cert-dev-2?{V}"), Some("*"), Some(disabled)).await;
    assert_eq!(st, 200, "{v}");
    let crl = s.client().get(s.url("/crl/fleet.crl")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(revoked_in(&crl), 3);
    // A CA in use by a policy cannot be deleted.
    let (st, _) = service(&s, Method::DELETE, &format!("/certificateAuthorities/fleet?{V}"), None, None).await;
    assert_eq!(st, 409);
}

/// A request's parts, owned (so that one closure can make calls with bodies of any lifetime).
enum OwnedOp {
    Register(Vec<u8>),
    Poll(String),
}

async fn send_owned(
    s: &Server,
    transport: Transport,
    (scope, id, token, op): (String, String, String, OwnedOp),
) -> provisio_testkit::devices::Reply {
    let op = match &op {
        OwnedOp::Register(b) => Op::Register(b),
        OwnedOp::Poll(o) => Op::Poll(o),
    };
    let call = Call { scope: &scope, registration_id: &id, api_version: Some("2025-07-01-preview"), token: &token, op };
    send(s, transport, &call).await
}

/// The number of revoked entries of a DER CRL, as openssl reads it.
fn revoked_in(der: &[u8]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.crl"), der).unwrap();
    let text = run(Command::new("openssl")
        .current_dir(dir.path())
        .args(["crl", "-inform", "DER", "-in", "c.crl", "-noout", "-text"]));
    text.matches("Serial Number:").count()
}

/// Makes the CA `ca` and a policy issuing from it, enrolls `id` under that policy, registers it
/// over HTTPS with an openssl-made request and polls; returns the assigned answer and the
/// device's key file.
async fn onboard_with_csr(s: &Server, dir: &Path, ca: &str, id: &str) -> (Value, std::path::PathBuf) {
    let (st, v) = service(s, Method::PUT, &format!("/certificateAuthorities/{ca}?{V}"), None, None).await;
    assert_eq!(st, 200, "{v}");
    let policy = json!({"name": format!("{ca}-policy"), "certificateAuthorityName": ca});
    let (st, v) = service(s, Method::PUT, &format!("/credentialPolicies/{ca}-policy?{V}"), None, Some(policy)).await;
    assert_eq!(st, 200, "{v}");
    let scope = s.info.id_scope.clone();
    let e = put_enrollment(
        s,
        false,
        id,
        json!({"registrationId": id, "attestation": {"type": "symmetricKey"}, "credentialPolicyName": format!("{ca}-policy")}),
    )
    .await;
    let tok = token(&scope, id, e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap());
    let (csr, key) = openssl_csr(dir, id, &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let body = serde_json::to_vec(&json!({"registrationId": id, "csr": csr})).unwrap();
    let r = send_owned(s, Transport::Https, (scope.clone(), id.to_owned(), tok.clone(), OwnedOp::Register(body))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = r.body["operationId"].as_str().unwrap().to_owned();
    let r = send_owned(s, Transport::Https, (scope, id.to_owned(), tok, OwnedOp::Poll(op))).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    (r.body, key)
}

/// A Mosquitto broker (Debian's package) on its own port that requires client certificates
/// from `ca_bundle` and reads `crl`; stopped when dropped.
struct Broker {
    child: std::process::Child,
    port: u16,
}

impl Broker {
    fn start(dir: &Path, port: u16) -> Self {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\npersistence false\nlog_dest stderr\nlistener {port} 127.0.0.1\n\
                 cafile {d}/clients-ca.pem\ncertfile {d}/broker.pem\nkeyfile {d}/broker.key\n\
                 require_certificate true\nuse_identity_as_username true\nallow_anonymous true\ncrlfile {d}/crl.pem\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stderr(std::fs::File::create(dir.join("mosquitto.log")).unwrap())
            .spawn()
            .expect("mosquitto (Debian's package; scripts/setup installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, port };
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("mosquitto did not listen: {}", std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default());
    }

    /// Whether the device (`device.pem`: its certificate and the issuing CA; `device.key`)
    /// may publish, and what `mosquitto_pub` said.
    fn publishes(&self, dir: &Path) -> (bool, String) {
        let out = Command::new("mosquitto_pub")
            .current_dir(dir)
            .args(["-h", "localhost", "-p", &self.port.to_string(), "--cafile", "broker-ca.pem"])
            .args(["--cert", "device.pem", "--key", "device.key", "-t", "provisio/test", "-m", "hello", "-q", "1"])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The issue's end-to-end case: a device onboards with a symmetric key and a CSR, then
/// connects to a broker that trusts the issuing CA and reads its CRL; once the certificate is
/// revoked and the broker re-reads the CRL, the same connection attempt is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reaches_a_broker_with_its_issued_certificate_until_it_is_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = Server::start(&dir.join("data"), "127.0.0.1:0", &[]);
    let id = "broker-dev";
    let (answer, key) = onboard_with_csr(&s, dir, "broker-ca", id).await;
    let chain: Vec<String> = answer["registrationState"]["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no chain: {answer}"))
        .iter()
        .map(|c| pem(c.as_str().unwrap()))
        .collect();
    // The device's files: its certificate and the issuing CA, its key.
    std::fs::write(dir.join("device.pem"), format!("{}{}", chain[0], chain[1])).unwrap();
    std::fs::copy(&key, dir.join("device.key")).unwrap();
    // The broker trusts the issuing CA (and its root) and serves a certificate of its own.
    std::fs::write(dir.join("clients-ca.pem"), format!("{}{}", chain[1], chain[2])).unwrap();
    let broker_ca = provisio_pki::generate_ca("Broker TLS CA").unwrap();
    let broker = provisio_pki::issue_server_cert(&broker_ca, &["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("broker-ca.pem"), &broker_ca.cert_pem).unwrap();
    std::fs::write(dir.join("broker.pem"), &broker.cert_pem).unwrap();
    std::fs::write(dir.join("broker.key"), &broker.key_pem).unwrap();
    let fetch_crl = async || {
        let der = s.client().get(s.url("/crl/broker-ca.crl")).send().await.unwrap().bytes().await.unwrap();
        std::fs::write(dir.join("crl.der"), der).unwrap();
        run(Command::new("openssl")
            .current_dir(dir)
            .args(["crl", "-inform", "DER", "-in", "crl.der", "-out", "crl.pem"]));
    };
    fetch_crl().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let b = Broker::start(dir, port);
    let (ok, said) = b.publishes(dir);
    assert!(ok, "{said}\n{}", std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default());
    drop(b);
    // Revoked, the CRL fetched again, the broker restarted: refused.
    let (st, v) = service(&s, Method::POST, &format!("/registrations/{id}/revokeCertificates?{V}"), None, None).await;
    assert_eq!((st, &v["revoked"]), (200, &json!(1)));
    fetch_crl().await;
    let b = Broker::start(dir, port);
    let (ok, said) = b.publishes(dir);
    assert!(!ok, "a revoked certificate still connects: {said}");
    // And for the reason that it is revoked (OpenSSL, as the broker checks it).
    std::fs::write(dir.join("leaf.pem"), &chain[0]).unwrap();
    let why = Command::new("openssl")
        .current_dir(dir)
        .args(["verify", "-crl_check", "-CAfile", "clients-ca.pem", "-CRLfile", "crl.pem", "leaf.pem"])
        .output()
        .unwrap();
    let why = format!("{}{}", String::from_utf8_lossy(&why.stdout), String::from_utf8_lossy(&why.stderr));
    assert!(why.contains("certificate revoked"), "{why}");
}

// The operator CLI (`provisio ca`, `credential-policy`, `--credential-policy`, `registration
// revoke|show`) and the device tooling (`provisio device register --csr`).

/// `provisio device register --scope … {args}` run in `cwd`, trusting the server's CA.
fn device_register(s: &Server, cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_provisio"))
        .current_dir(cwd)
        .args(["device", "register", "--scope", &s.info.id_scope])
        .args(args)
        .env("PROVISIO_CA", s.ca_file())
        .env_remove("PROVISIO_CONNECTION_STRING")
        .output()
        .unwrap()
}

/// The certificates of a PEM file, in order.
fn split_pem(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|c| c.contains("-----BEGIN CERTIFICATE-----"))
        .map(str::to_owned)
        .collect()
}

/// Checks a written `{id}_cert.pem` (leaf, issuing CA, root) with `openssl verify`, the root as
/// the only trust anchor; returns the leaf's serial (upper-case hex) as openssl reads it.
fn openssl_verifies(cert_file: &Path) -> String {
    let chain = split_pem(&std::fs::read_to_string(cert_file).unwrap());
    assert_eq!(chain.len(), 3, "leaf, issuing CA, root in {}", cert_file.display());
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in ["leaf.pem", "inter.pem", "root.pem"].iter().zip(&chain) {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let verified = run(Command::new("openssl").current_dir(dir.path()).args([
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "inter.pem",
        "leaf.pem",
    ]));
    assert!(verified.contains("leaf.pem: OK"), "{verified}");
    let serial =
        run(Command::new("openssl").current_dir(dir.path()).args(["x509", "-in", "leaf.pem", "-noout", "-serial"]));
    serial.trim().trim_start_matches("serial=").to_ascii_uppercase()
}

/// The public key (PEM) of the first certificate of `cert_file`.
fn cert_public_key(cert_file: &Path) -> String {
    run(Command::new("openssl").arg("x509").arg("-in").arg(cert_file).args(["-noout", "-pubkey"]))
}

/// The public key (PEM) of a private key file.
fn key_public_key(key_file: &Path) -> String {
    run(Command::new("openssl").arg("pkey").arg("-in").arg(key_file).arg("-pubout"))
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_issuing_cas_and_credential_policies_with_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &[]);
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };

    // A CA made by the service, under its issuing root; never its key.
    let ca = cli.json(&["ca", "create", "fleet"]);
    assert_eq!((ca["name"].as_str(), ca["crlPath"].as_str()), (Some("fleet"), Some("/crl/fleet.crl")), "{ca}");
    assert!(ca["certificate"].as_str().unwrap().contains("BEGIN CERTIFICATE"), "{ca}");
    assert!(ca.get("privateKey").is_none(), "{ca}");
    let err = cli.fails(&["ca", "create", "fleet"]);
    assert!(err.contains("409"), "{err}");
    // An operator's CA: an intermediate under an offline root, both made by `provisio cert`.
    let certs = tmp.path().join("certs");
    let c = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    cli.ok(&["cert", "root", "op-root", "--out-dir", &c("")]);
    cli.ok(&["cert", "intermediate", "op-issuing", "--ca", "op-root", "--out-dir", &c("")]);
    let imported = cli.json(&[
        "ca",
        "import",
        "plant",
        "--cert",
        &c("op-issuing_cert.pem"),
        "--key",
        &c("op-issuing_key.pem"),
        "--chain",
        &c("op-root_cert.pem"),
    ]);
    assert_eq!(imported["subject"], "CN=op-issuing", "{imported}");
    assert!(imported["chain"].as_str().unwrap().contains("BEGIN CERTIFICATE"), "{imported}");
    assert!(imported.get("privateKey").is_none(), "{imported}");
    let err =
        cli.fails(&["ca", "import", "mismatched", "--cert", &c("op-issuing_cert.pem"), "--key", &c("op-root_key.pem")]);
    assert!(err.contains("400") && err.contains("not the certificate's"), "{err}");
    // Lists and shows: tables in 100 columns, PEM summarised, --top, --json.
    let table = cli.ok(&["ca", "list"]);
    fits_100_columns("ca list", &table);
    assert!(table.contains("fleet") && table.contains("CN=op-issuing") && table.contains("2 item(s)"), "{table}");
    assert!(cli.ok(&["ca", "list", "--top", "1"]).contains("more exist"));
    assert_eq!(cli.json(&["ca", "list"]).as_array().unwrap().len(), 2);
    let table = cli.ok(&["ca", "show", "plant"]);
    fits_100_columns("ca show", &table);
    let rows = table_fields(&table);
    assert_eq!(field(&rows, "name"), Some("plant"), "{table}");
    assert!(field(&rows, "certificate").unwrap().starts_with("PEM, "), "{table}");
    assert!(field(&rows, "chain").unwrap().starts_with("PEM, "), "{table}");
    assert_eq!(field(&rows, "crlPath"), Some("/crl/plant.crl"), "{table}");

    // Credential policies.
    let p = cli.json(&[
        "credential-policy",
        "create",
        "sensors",
        "--ca-name",
        "fleet",
        "--validity-days",
        "7",
        "--key-types",
        "ecdsa-p256,rsa",
        "--issuance-limit",
        "3",
    ]);
    assert_eq!(
        (&p["certificateAuthorityName"], &p["validityInDays"], &p["keyTypes"], &p["issuanceLimitPerDay"]),
        (&json!("fleet"), &json!(7), &json!(["ecdsa-p256", "rsa"]), &json!(3)),
        "{p}"
    );
    let p = cli.json(&["credential-policy", "create", "lines", "--certificate-authority", "plant"]);
    assert_eq!((&p["validityInDays"], &p["issuanceLimitPerDay"]), (&json!(30), &json!(10)), "defaults: {p}");
    let err = cli.fails(&["credential-policy", "create", "orphan", "--ca-name", "nope"]);
    assert!(err.contains("400") && err.contains("names no certificate authority"), "{err}");
    let err = cli.fails(&["credential-policy", "create", "x", "--ca-name", "fleet", "--key-types", "dsa"]);
    assert!(err.contains("dsa"), "{err}");
    let table = cli.ok(&["credential-policy", "list"]);
    fits_100_columns("credential-policy list", &table);
    assert!(table.contains("sensors") && table.contains("ecdsa-p256, rsa") && table.contains("2 item(s)"), "{table}");
    assert_eq!(cli.json(&["credential-policy", "list", "--top", "1"]).as_array().unwrap().len(), 1);
    let rows = table_fields(&cli.ok(&["credential-policy", "show", "sensors"]));
    assert_eq!(field(&rows, "certificateAuthorityName"), Some("fleet"));
    assert_eq!(cli.json(&["credential-policy", "show", "lines"])["certificateAuthorityName"], "plant");

    // Enrollments and groups name theirs; "" removes it; other settings stay.
    let e = cli.json(&["enrollment", "create", "pol-dev", "--credential-policy", "sensors", "--iot-hubs", "h1"]);
    assert_eq!(e["credentialPolicyName"], "sensors", "{e}");
    let e = cli.json(&["enrollment", "update", "pol-dev", "--credential-policy", ""]);
    assert!(e.get("credentialPolicyName").is_none_or(Value::is_null), "{e}");
    assert_eq!(e["iotHubs"], json!(["h1"]), "{e}");
    let e = cli.json(&["enrollment", "update", "pol-dev", "--credential-policy", "lines"]);
    assert_eq!(e["credentialPolicyName"], "lines", "{e}");
    assert_eq!(cli.json(&["enrollment", "show", "pol-dev"])["credentialPolicyName"], "lines");
    let g = cli.json(&["enrollment-group", "create", "pol-group", "--credential-policy", "sensors"]);
    assert_eq!(g["credentialPolicyName"], "sensors", "{g}");
    let g = cli.json(&["enrollment-group", "update", "pol-group", "--credential-policy", ""]);
    assert!(g.get("credentialPolicyName").is_none_or(Value::is_null), "{g}");
    let g = cli.json(&["enrollment-group", "update", "pol-group", "--credential-policy", "lines"]);
    assert_eq!(g["credentialPolicyName"], "lines", "{g}");

    // A CA in use cannot go, and the message says why (not "use update").
    let err = cli.fails(&["ca", "delete", "fleet"]);
    assert!(err.contains("409") && err.contains("sensors") && !err.contains("Use `update`"), "{err}");
    cli.ok(&["credential-policy", "delete", "sensors"]);
    assert!(cli.fails(&["credential-policy", "show", "sensors"]).contains("404"));
    assert!(cli.ok(&["ca", "delete", "fleet"]).contains("deleted"));
    assert!(cli.fails(&["ca", "show", "fleet"]).contains("404"));
    assert_eq!(cli.json(&["ca", "list"]).as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_register_with_csr_writes_a_key_and_a_chain_openssl_verifies_on_every_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("provisio.toml");
    std::fs::write(&cfg, "device_polls_per_10s = 0\n").unwrap();
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };
    cli.ok(&["ca", "create", "fleet"]);
    cli.ok(&["credential-policy", "create", "devices", "--ca-name", "fleet"]);
    let https = format!("localhost:{}", s.port);
    let (mqtt, amqp) = (s.info.mqtt_endpoint.clone().unwrap(), s.info.amqp_endpoint.clone().unwrap());

    // Every transport, each key type: the files are written, the chain verifies against the
    // root, the key file is 0600 and its key is the certificate's.
    let mut first = None;
    for (transport, endpoint, key_type, openssl_says) in [
        ("https", &https, None, "ASN1 OID: prime256v1"),
        ("mqtt", &mqtt, Some("p384"), "ASN1 OID: secp384r1"),
        ("amqp", &amqp, Some("rsa2048"), "Public-Key: (2048 bit)"),
        ("mqtt-ws", &https, Some("p256"), "ASN1 OID: prime256v1"),
        ("amqp-ws", &https, None, "ASN1 OID: prime256v1"),
    ] {
        let id = format!("csr-{transport}");
        let e = cli.json(&["enrollment", "create", &id, "--credential-policy", "devices"]);
        let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
        let out = tmp.path().join(transport);
        let mut args = vec!["--registration-id", &id, "--key", &key, "--endpoint", endpoint, "--transport", transport];
        args.extend(["--csr", "--out-dir", out.to_str().unwrap(), "--json"]);
        if let Some(k) = key_type {
            args.extend(["--csr-key-type", k]);
        }
        let o = device_register(&s, tmp.path(), &args);
        assert!(o.status.success(), "{transport}: {}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["status"], "assigned", "{transport}: {v}");
        let (cert, key_file) = (out.join(format!("{id}_cert.pem")), out.join(format!("{id}_key.pem")));
        assert_eq!(v["certificateFile"], cert.to_str().unwrap(), "{v}");
        assert_eq!(v["keyFile"], key_file.to_str().unwrap(), "{v}");
        assert_eq!(v["issuedCertificateChain"].as_array().map(Vec::len), Some(3), "{v}");
        let serial = openssl_verifies(&cert);
        #[cfg(unix)]
        assert_eq!(mode(&key_file), 0o600, "{transport}: the key file is the owner's alone");
        assert_eq!(cert_public_key(&cert), key_public_key(&key_file), "{transport}: the certificate is for the key");
        let text = run(Command::new("openssl").arg("x509").arg("-in").arg(&cert).args(["-noout", "-text"]));
        assert!(text.contains(openssl_says), "{transport}: {text}");
        assert!(text.contains(&format!("CN={id}")) || text.contains(&format!("CN = {id}")), "{text}");
        // The service shows the same certificate.
        let rows = table_fields(&cli.ok(&["registration", "show", &id]));
        assert_eq!(field(&rows, "issuedCertificate.serial"), Some(serial.as_str()), "{transport}: {rows:?}");
        assert_eq!(field(&rows, "issuedCertificate.revoked"), Some("no"), "{rows:?}");
        if first.is_none() {
            first = Some((id, key, serial));
        }
    }
    let (id, key, serial) = first.unwrap();
    let out = tmp.path().join("https");
    let (cert, key_file) = (out.join(format!("{id}_cert.pem")), out.join(format!("{id}_key.pem")));
    let base = ["--registration-id", id.as_str(), "--key", key.as_str(), "--endpoint", https.as_str(), "--csr"];

    // Existing files are not overwritten without --force: refused before registering.
    let before = std::fs::read_to_string(&cert).unwrap();
    let o = device_register(&s, &out, &base);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("exists; pass --force"), "{err}");
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), before);
    // With --force, in the current directory: a new key and certificate. A key file that
    // others could read is replaced by one created 0600, not re-permissioned.
    #[cfg(unix)]
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let old_key = std::fs::read_to_string(&key_file).unwrap();
    let o = device_register(&s, &out, &[&base[..], &["--force"]].concat());
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(said.contains(&format!("wrote ./{id}_key.pem")) && said.contains("3 certificates"), "{said}");
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), old_key, "a new key");
    #[cfg(unix)]
    assert_eq!(mode(&key_file), 0o600);
    assert_ne!(openssl_verifies(&cert), serial, "a new certificate");
    assert_eq!(cert_public_key(&cert), key_public_key(&key_file));

    // --csr-key: a key of the device's own (an SEC1 key made by openssl) is reused, and not copied.
    let own = tmp.path().join("own.key");
    run(Command::new("openssl").args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"]).arg(&own));
    let reuse = tmp.path().join("reuse");
    let o = device_register(
        &s,
        tmp.path(),
        &[&base[..], &["--csr-key", own.to_str().unwrap(), "--out-dir", reuse.to_str().unwrap(), "--json"]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["keyFile"], own.to_str().unwrap());
    let reused_cert = reuse.join(format!("{id}_cert.pem"));
    openssl_verifies(&reused_cert);
    assert_eq!(cert_public_key(&reused_cert), key_public_key(&own));
    assert!(!reuse.join(format!("{id}_key.pem")).exists(), "the key stays where it is");
    // The same key again (renewal keeping the key), this time from the key file written above.
    let o = device_register(
        &s,
        tmp.path(),
        &[&base[..], &["--csr-key", key_file.to_str().unwrap(), "--out-dir", reuse.to_str().unwrap(), "--force"]]
            .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(cert_public_key(&reused_cert), key_public_key(&key_file));
    let o = device_register(&s, tmp.path(), &[&base[..], &["--csr-key", cfg.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(2), "not a key: {}", String::from_utf8_lossy(&o.stderr));

    // A device whose enrollment names no credential policy: refused with the reason, no files.
    let e = cli.json(&["enrollment", "create", "no-policy"]);
    let k = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let none = tmp.path().join("none");
    let o = device_register(
        &s,
        tmp.path(),
        &[
            "--registration-id",
            "no-policy",
            "--key",
            &k,
            "--endpoint",
            &https,
            "--csr",
            "--out-dir",
            none.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("400004") && err.contains("credentialPolicyName"), "{err}");
    assert!(!none.join("no-policy_cert.pem").exists() && !none.join("no-policy_key.pem").exists());

    // Revocation: `registration revoke`, then `registration show` and the CA's CRL say so.
    let current = openssl_verifies(&reused_cert);
    let said = cli.ok(&["registration", "revoke", &id]);
    // Every certificate of the device: the four issued above.
    assert!(said.contains("4 certificate(s)"), "{said}");
    assert!(cli.ok(&["registration", "revoke", &id]).contains("0 certificate(s)"), "none left to revoke");
    assert_eq!(cli.json(&["registration", "revoke", "csr-mqtt"])["revoked"], 1);
    let rows = table_fields(&cli.ok(&["registration", "show", &id]));
    assert_eq!(field(&rows, "issuedCertificate.serial"), Some(current.as_str()));
    assert!(field(&rows, "issuedCertificate.revoked").is_some_and(|r| r.ends_with('Z')), "{rows:?}");
    let crl_file = tmp.path().join("fleet.crl");
    let table = cli.ok(&["ca", "crl", "fleet", "--out", crl_file.to_str().unwrap()]);
    fits_100_columns("ca crl", &table);
    assert!(table.contains(&current) && table.contains("CN=fleet"), "{current} not in\n{table}");
    let listed = run(Command::new("openssl").args(["crl", "-inform", "DER", "-noout", "-text", "-in"]).arg(&crl_file));
    assert!(listed.to_ascii_uppercase().contains(&current), "{current} not in {listed}");
    let v = cli.json(&["ca", "crl", "fleet"]);
    let serials: Vec<&str> =
        v["revokedCertificates"].as_array().unwrap().iter().map(|r| r["serialNumber"].as_str().unwrap()).collect();
    assert!(serials.contains(&current.as_str()), "{v}");
    assert_eq!(serials.len(), 5, "csr-https's four and csr-mqtt's one: {v}");
    assert_eq!(serials.len(), revoked_in(&std::fs::read(&crl_file).unwrap()), "{v}");
    assert!(v["nextUpdate"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    // A CRL needs no credential: a connection string with a wrong key still fetches it.
    let stranger = Cli {
        s: &s,
        cs: format!("HostName=localhost:{};SharedAccessKeyName=x;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==", s.port),
    };
    assert_eq!(stranger.json(&["ca", "crl", "fleet"])["revokedCertificates"], v["revokedCertificates"]);
    assert!(stranger.fails(&["ca", "crl", "nope"]).contains("404"));
}

/// The hub registrar is told the issued certificate's thumbprint (so that a bridge can create
/// the identity at the hub with it), and the registration's audit line names its serial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_registrar_and_the_audit_log_learn_of_the_issued_certificate() {
    use axum::{Json, Router, extract::State, routing::post};
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;
    async fn registrar(State(seen): State<Seen>, Json(dev): Json<serde_json::Value>) -> Json<serde_json::Value> {
        seen.lock().unwrap().push(dev);
        Json(json!({}))
    }
    let seen: Seen = std::sync::Arc::default();
    let app = Router::new().route("/registrar", post(registrar)).with_state(seen.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("provisio.toml");
    std::fs::write(
        &cfg,
        "linked_hubs = [\"hub-r.example.net\"]\nhub_registrar = \"webhook\"\nwebhook_allowed_networks = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let hub = json!({"allocationWeight": 1, "registrarWebhookUrl": format!("http://{addr}/registrar")});
    let (st, h) = service(&s, Method::PUT, &format!("/linkedHubs/hub-r.example.net?{V}"), Some("*"), Some(hub)).await;
    assert_eq!(st, 200, "{h}");
    let id = "reg-cert-dev";
    let (answer, _) = onboard_with_csr(&s, tmp.path(), "fleet", id).await;
    let leaf = B64.decode(answer["registrationState"]["issuedCertificateChain"][0].as_str().unwrap()).unwrap();
    let calls = seen.lock().unwrap().clone();
    let call = calls.iter().find(|c| c["registrationId"] == id).expect("the registrar was called");
    assert_eq!(call["issuedCertificateThumbprint"], provisio_pki::x509::sha256_thumbprint(&leaf));
    let (_, state) = service(&s, Method::GET, &format!("/registrations/{id}?{V}"), None, None).await;
    let serial = state["issuedCertificate"]["serialNumber"].as_str().unwrap().to_owned();
    let audited = provisio_testkit::eventually(std::time::Duration::from_secs(10), async || {
        std::fs::read_to_string(s.data_dir.join("audit.jsonl")).unwrap_or_default().lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["registrationId"] == id && v["result"] == "assigned" && v["certificateSerial"] == serial
            })
        })
    })
    .await;
    assert!(audited, "no audit line names the certificate {serial}");
}
