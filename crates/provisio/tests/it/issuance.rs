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
use serde_json::json;

use crate::common::{Instance, run, service};

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
    let scope = s.info.id_scope.clone();
    let (st, ca) = service(&s, Method::PUT, &format!("/certificateAuthorities/broker-ca?{V}"), None, None).await;
    assert_eq!(st, 200, "{ca}");
    let policy = json!({"name": "broker", "certificateAuthorityName": "broker-ca"});
    let (st, _) = service(&s, Method::PUT, &format!("/credentialPolicies/broker?{V}"), None, Some(policy)).await;
    assert_eq!(st, 200);
    let id = "broker-dev";
    let e = put_enrollment(
        &s,
        false,
        id,
        json!({"registrationId": id, "attestation": {"type": "symmetricKey"}, "credentialPolicyName": "broker"}),
    )
    .await;
    let tok = token(&scope, id, e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap());
    let (csr, key) = openssl_csr(dir, id, &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let body = serde_json::to_vec(&json!({"registrationId": id, "csr": csr})).unwrap();
    let r =
        send_owned(&s, Transport::Https, (scope.clone(), id.to_owned(), tok.clone(), OwnedOp::Register(body))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = r.body["operationId"].as_str().unwrap().to_owned();
    let r = send_owned(&s, Transport::Https, (scope.clone(), id.to_owned(), tok, OwnedOp::Poll(op))).await;
    let chain: Vec<String> = r.body["registrationState"]["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no chain: {}", r.body))
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
