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
