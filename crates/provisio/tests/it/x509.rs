//! The walkthrough's X.509 flows with certificates made by plain `openssl` (and by
//! `provisio cert`), registering and polling with `curl --cert/--key`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{Server, assert_dps_error, curl_with, run, service};

const ROOT_EXT: &str = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n";
const DEVICE_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

struct Ossl {
    dir: PathBuf,
}

impl Ossl {
    fn cmd(&self, args: &[&str]) {
        run(Command::new("openssl").current_dir(&self.dir).args(args));
    }

    fn root(&self, name: &str) {
        self.cmd(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}_key.pem"),
            "-out",
            &format!("{name}_cert.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ]);
    }

    /// A certificate for `name` signed by `issuer`, with extensions `ext`.
    fn signed(&self, name: &str, issuer: &str, ext: &str) {
        std::fs::write(self.dir.join(format!("{name}.ext")), ext).unwrap();
        self.cmd(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}_key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        self.cmd(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{issuer}_cert.pem"),
            "-CAkey",
            &format!("{issuer}_key.pem"),
            "-CAcreateserial",
            "-out",
            &format!("{name}_cert.pem"),
            "-days",
            "30",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    /// `openssl req -x509` with its defaults: a self-signed certificate with CA:TRUE.
    fn self_signed(&self, name: &str) {
        self.cmd(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}_key.pem"),
            "-out",
            &format!("{name}_cert.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "30",
        ]);
    }

    fn pem(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}_cert.pem"))).unwrap()
    }

    /// `name`'s certificate followed by the given issuers': what the device sends.
    fn chain(&self, name: &str, above: &[&str]) -> PathBuf {
        let mut s = self.pem(name);
        for a in above {
            s.push_str(&self.pem(a));
        }
        let p = self.dir.join(format!("{name}_chain.pem"));
        std::fs::write(&p, s).unwrap();
        p
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}_key.pem"))
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Registers with a client certificate; returns the poll answer, or the refusal.
fn register(s: &Server, id: &str, chain: &Path, key: &Path) -> Result<Value, (u16, Value)> {
    let scope = &s.info.id_scope;
    let tls = ["--cert", path_str(chain), "--key", path_str(key)];
    let (st, _, v) = curl_with(
        s,
        "PUT",
        &format!("/{scope}/registrations/{id}/register?api-version=2019-03-31"),
        None,
        Some(&format!("{{\"registrationId\":\"{id}\"}}")),
        &tls,
    );
    if st != 202 {
        return Err((st, v));
    }
    let op = v["operationId"].as_str().unwrap().to_owned();
    let (st, _, v) = curl_with(
        s,
        "GET",
        &format!("/{scope}/registrations/{id}/operations/{op}?api-version=2019-03-31"),
        None,
        None,
        &tls,
    );
    assert_eq!(st, 200, "{v}");
    Ok(v)
}

/// Asserts a refusal: 401 / 401002, and the reason in the log line of its tracking id and
/// in the registration's audit record.
async fn assert_refused(s: &Server, id: &str, r: Result<Value, (u16, Value)>, reason: &str) {
    let (st, v) = r.expect_err("expected a refusal");
    assert_dps_error(st, &v, 401, 401_002);
    let tracking = v["trackingId"].as_str().unwrap();
    let log = crate::common::logged(s, tracking).await;
    let line = log.lines().find(|l| l.contains(tracking)).unwrap_or_else(|| panic!("{tracking} not logged"));
    assert!(line.contains(reason), "log line lacks '{reason}': {line}");
    let (st, audit) =
        service(s, Method::GET, &format!("/registrations/{id}/audit?api-version=2021-10-01"), None, None).await;
    assert_eq!(st, 200, "{audit}");
    assert_eq!(audit["trackingId"], tracking);
    assert!(audit["reason"].as_str().unwrap().contains(reason), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_walkthrough_with_openssl_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "x509-hub.example.net"]);
    let o = Ossl { dir: tmp.path().to_owned() };
    o.root("dps-test-root");
    o.signed("dps-test-intermediate", "dps-test-root", ROOT_EXT);
    o.signed("dps-test-device-01", "dps-test-intermediate", DEVICE_EXT);
    o.signed("dps-test-device-02", "dps-test-intermediate", DEVICE_EXT);
    let dev1 = o.chain("dps-test-device-01", &["dps-test-intermediate"]);

    // Root CA group: upload the CA, reference it from a group; unverified, it assigns nothing.
    let (st, cert) = service(
        &s,
        Method::PUT,
        "/certificates/dps-test-root?api-version=2021-10-01",
        None,
        Some(json!({"certificate": o.pem("dps-test-root")})),
    )
    .await;
    assert_eq!(st, 200, "{cert}");
    assert_eq!(cert["properties"]["isVerified"], false);
    assert_eq!(cert["properties"]["subject"], "CN=dps-test-root");
    assert!(cert["properties"]["expiry"].as_str().unwrap().ends_with("GMT"), "{cert}");
    let (st, g) = service(
        &s,
        Method::PUT,
        "/enrollmentGroups/root-group?api-version=2021-10-01",
        None,
        Some(json!({
            "enrollmentGroupId": "root-group",
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "dps-test-root"}}},
        })),
    )
    .await;
    assert_eq!(st, 200, "{g}");
    assert_refused(
        &s,
        "dps-test-device-01",
        register(&s, "dps-test-device-01", &dev1, &o.key("dps-test-device-01")),
        "is not verified",
    )
    .await;

    // Proof of possession, with a verification certificate made by openssl.
    let etag = cert["etag"].as_str().unwrap();
    let (st, code) = service(
        &s,
        Method::POST,
        "/certificates/dps-test-root/generateVerificationCode?api-version=2021-10-01",
        Some(etag),
        None,
    )
    .await;
    assert_eq!(st, 200, "{code}");
    let nonce = code["properties"]["verificationCode"].as_str().unwrap().to_owned();
    assert_eq!(nonce.len(), 48);
    let etag = code["etag"].as_str().unwrap().to_owned();
    // Wrong CN, then wrong signer: refused with the reason.
    o.signed("wrong-cn", "dps-test-root", "basicConstraints=CA:FALSE\n");
    let (st, v) = service(
        &s,
        Method::POST,
        "/certificates/dps-test-root/verify?api-version=2021-10-01",
        Some(&etag),
        Some(json!({"certificate": o.pem("wrong-cn")})),
    )
    .await;
    assert_dps_error(st, &v, 400, 400_004);
    assert!(v["message"].as_str().unwrap().contains("is not the verification code"), "{v}");
    o.root("other-root");
    std::fs::write(tmp.path().join("v.ext"), "basicConstraints=CA:FALSE\n").unwrap();
    o.cmd(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "wrongsigner_key.pem",
        "-out",
        "wrongsigner.csr",
        "-subj",
        &format!("/CN={nonce}"),
    ]);
    o.cmd(&[
        "x509",
        "-req",
        "-in",
        "wrongsigner.csr",
        "-CA",
        "other-root_cert.pem",
        "-CAkey",
        "other-root_key.pem",
        "-CAcreateserial",
        "-out",
        "wrongsigner_cert.pem",
        "-days",
        "2",
        "-extfile",
        "v.ext",
    ]);
    let (st, v) = service(
        &s,
        Method::POST,
        "/certificates/dps-test-root/verify?api-version=2021-10-01",
        Some(&etag),
        Some(json!({"certificate": o.pem("wrongsigner")})),
    )
    .await;
    assert_dps_error(st, &v, 400, 400_004);
    assert!(v["message"].as_str().unwrap().contains("not signed by the private key"), "{v}");
    // The right one.
    o.cmd(&["req", "-new", "-key", "dps-test-root_key.pem", "-out", "verify.csr", "-subj", &format!("/CN={nonce}")]);
    o.cmd(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "verification_key.pem",
        "-out",
        "verification.csr",
        "-subj",
        &format!("/CN={nonce}"),
    ]);
    o.cmd(&[
        "x509",
        "-req",
        "-in",
        "verification.csr",
        "-CA",
        "dps-test-root_cert.pem",
        "-CAkey",
        "dps-test-root_key.pem",
        "-CAcreateserial",
        "-out",
        "verification_cert.pem",
        "-days",
        "2",
        "-extfile",
        "v.ext",
    ]);
    let (st, v) = service(
        &s,
        Method::POST,
        "/certificates/dps-test-root/verify?api-version=2021-10-01",
        None,
        Some(json!({"certificate": o.pem("verification")})),
    )
    .await;
    assert_eq!(st, 412, "If-Match is required: {v}");
    let (st, v) = service(
        &s,
        Method::POST,
        "/certificates/dps-test-root/verify?api-version=2021-10-01",
        Some(&etag),
        Some(json!({"certificate": o.pem("verification")})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["properties"]["isVerified"], true);
    // The code is single-use.
    let (st, _) = service(
        &s,
        Method::POST,
        "/certificates/dps-test-root/verify?api-version=2021-10-01",
        Some("*"),
        Some(json!({"certificate": o.pem("verification")})),
    )
    .await;
    assert_eq!(st, 400);

    // Now the device of the root group registers, sending its intermediate.
    let v = register(&s, "dps-test-device-01", &dev1, &o.key("dps-test-device-01")).expect("root group registration");
    let st = &v["registrationState"];
    assert_eq!(v["status"], "assigned", "{v}");
    assert_eq!(st["assignedHub"], "x509-hub.example.net");
    assert_eq!(st["deviceId"], "dps-test-device-01");
    assert_eq!(st["x509"]["enrollmentGroupId"], "root-group");
    assert_eq!(st["x509"]["certificateInfo"]["subjectName"], "CN=dps-test-device-01");
    assert_eq!(st["x509"]["signingCertificateInfo"]["subjectName"], "CN=dps-test-root");
    assert!(st.get("symmetricKey").is_none());
    // Without its intermediate the chain does not reach the root.
    let alone = o.chain("dps-test-device-02", &[]);
    assert_refused(
        &s,
        "dps-test-device-02",
        register(&s, "dps-test-device-02", &alone, &o.key("dps-test-device-02")),
        "does not lead to",
    )
    .await;

    // Intermediate group: the uploaded intermediate is the anchor, and it is nearer than the root.
    let (st, g) = service(&s, Method::PUT, "/enrollmentGroups/inter-group?api-version=2021-10-01", None, Some(json!({
        "enrollmentGroupId": "inter-group",
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": o.pem("dps-test-intermediate")}}}},
    }))).await;
    assert_eq!(st, 200, "{g}");
    let info = &g["attestation"]["x509"]["signingCertificates"]["primary"]["info"];
    assert_eq!(info["subjectName"], "CN=dps-test-intermediate");
    assert_eq!(info["sha256Thumbprint"].as_str().unwrap().len(), 64);
    assert!(g["attestation"]["x509"]["signingCertificates"]["primary"].get("certificate").is_none());
    let v = register(&s, "dps-test-device-02", &alone, &o.key("dps-test-device-02"))
        .expect("intermediate group registration");
    assert_eq!(v["registrationState"]["x509"]["enrollmentGroupId"], "inter-group", "{v}");
    let v = register(&s, "dps-test-device-01", &dev1, &o.key("dps-test-device-01")).unwrap();
    assert_eq!(v["registrationState"]["x509"]["enrollmentGroupId"], "inter-group", "nearest anchor wins: {v}");

    // Individual enrollment by the device's own certificate (signed by the root).
    o.signed("dps-test-individual", "dps-test-root", DEVICE_EXT);
    let (st, e) = service(&s, Method::PUT, "/enrollments/dps-test-individual?api-version=2021-10-01", None, Some(json!({
        "registrationId": "dps-test-individual",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": o.pem("dps-test-individual")}}}},
    }))).await;
    assert_eq!(st, 200, "{e}");
    let (st, got) =
        service(&s, Method::GET, "/enrollments/dps-test-individual?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 200);
    let info = &got["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
    assert_eq!(info["subjectName"], "CN=dps-test-individual");
    assert_eq!(info["version"], 3);
    // Updating with the info-only body that GET returns keeps the certificate.
    let mut update = got.clone();
    update.as_object_mut().unwrap().remove("registrationState");
    let (st, u) =
        service(&s, Method::PUT, "/enrollments/dps-test-individual?api-version=2021-10-01", Some("*"), Some(update))
            .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(u["attestation"]["x509"]["clientCertificates"]["primary"]["info"], *info);
    let chain = o.chain("dps-test-individual", &[]);
    let v =
        register(&s, "dps-test-individual", &chain, &o.key("dps-test-individual")).expect("individual registration");
    assert!(v["registrationState"]["x509"].get("enrollmentGroupId").is_none(), "{v}");
    assert_eq!(v["registrationState"]["x509"]["certificateInfo"]["sha256Thumbprint"], info["sha256Thumbprint"]);

    // Negatives.
    // CN is not the registration id: refused and logged with the reason, but the attempt is
    // not about that id (anyone can name any id), so no refusal record is stored under it.
    let (st, v) = register(&s, "someone-else", &dev1, &o.key("dps-test-device-01")).expect_err("expected a refusal");
    assert_dps_error(st, &v, 401, 401_002);
    let tracking = v["trackingId"].as_str().unwrap();
    let log = crate::common::logged(&s, tracking).await;
    assert!(log.lines().any(|l| l.contains(tracking) && l.contains("does not match registration id")), "{log}");
    let (st, _) =
        service(&s, Method::GET, "/registrations/someone-else/audit?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404);
    // Unknown CA.
    o.signed("stranger-device", "other-root", DEVICE_EXT);
    let c = o.chain("stranger-device", &[]);
    assert_refused(
        &s,
        "stranger-device",
        register(&s, "stranger-device", &c, &o.key("stranger-device")),
        "does not lead to",
    )
    .await;
    // A self-signed leaf posing as a group member (openssl's default CA:TRUE).
    o.self_signed("selfsigned-device");
    let c = o.chain("selfsigned-device", &[]);
    assert_refused(
        &s,
        "selfsigned-device",
        register(&s, "selfsigned-device", &c, &o.key("selfsigned-device")),
        "is a CA certificate",
    )
    .await;
    // An intermediate without the CA basic constraint, under the verified root.
    o.signed(
        "fake-intermediate",
        "dps-test-root",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,keyCertSign,digitalSignature\n",
    );
    o.signed("victim-device", "fake-intermediate", DEVICE_EXT);
    let c = o.chain("victim-device", &["fake-intermediate"]);
    assert_refused(&s, "victim-device", register(&s, "victim-device", &c, &o.key("victim-device")), "not a CA").await;
    // An expired leaf of the intermediate group.
    let inter = provisio_pki::CertAndKey {
        cert_pem: o.pem("dps-test-intermediate"),
        key_pem: std::fs::read_to_string(o.key("dps-test-intermediate")).unwrap(),
    };
    let now = time::OffsetDateTime::now_utc();
    let expired = provisio_pki::testcerts::issue_valid(
        provisio_pki::testcerts::Role::Device,
        "expired-device",
        Some(&inter),
        provisio_pki::testcerts::KeyKind::EcdsaP256,
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .unwrap();
    std::fs::write(tmp.path().join("expired-device_cert.pem"), &expired.cert_pem).unwrap();
    std::fs::write(tmp.path().join("expired-device_key.pem"), &expired.key_pem).unwrap();
    let c = o.chain("expired-device", &[]);
    assert_refused(&s, "expired-device", register(&s, "expired-device", &c, &o.key("expired-device")), "expired").await;
    // A disabled group gives `disabled`.
    let (st, _) = service(&s, Method::PUT, "/enrollmentGroups/inter-group?api-version=2021-10-01", Some("*"), Some(json!({
        "enrollmentGroupId": "inter-group", "provisioningStatus": "disabled",
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": o.pem("dps-test-intermediate")}}}},
    }))).await;
    assert_eq!(st, 200);
    let v = register(&s, "dps-test-device-02", &alone, &o.key("dps-test-device-02")).unwrap();
    assert_eq!(v["status"], "disabled", "{v}");

    // Certificates API housekeeping: list, delete needs If-Match, 404 after.
    let (st, list) = service(&s, Method::GET, "/certificates?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 200);
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    let (st, v) = service(&s, Method::DELETE, "/certificates/dps-test-root?api-version=2021-10-01", None, None).await;
    assert_dps_error(st, &v, 412, 412_001);
    let (st, _) =
        service(&s, Method::DELETE, "/certificates/dps-test-root?api-version=2022-02-05", Some("*"), None).await;
    assert_eq!(st, 204);
    let (st, v) = service(&s, Method::GET, "/certificates/dps-test-root?api-version=2021-10-01", None, None).await;
    assert_dps_error(st, &v, 404, 404_001);
    // Uploading a leaf as a CA is refused.
    let (st, v) = service(
        &s,
        Method::PUT,
        "/certificates/leaf?api-version=2021-10-01",
        None,
        Some(json!({"certificate": o.pem("dps-test-device-01")})),
    )
    .await;
    assert_dps_error(st, &v, 400, 400_004);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisio_cert_output_works_with_openssl_and_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    let p = |args: &[&str]| {
        run(Command::new(env!("CARGO_BIN_EXE_provisio")).arg("cert").args(args).arg("--out-dir").arg(&dir));
    };
    p(&["root", "pc-root"]);
    p(&["intermediate", "pc-inter", "--ca", "pc-root", "--rsa"]);
    p(&["device", "pc-device-01", "--ca", "pc-inter"]);
    // Refuses to overwrite without --force.
    let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["cert", "root", "pc-root", "--out-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("for testing only"));
    run(Command::new("openssl").current_dir(&dir).args([
        "verify",
        "-CAfile",
        "pc-root_cert.pem",
        "-untrusted",
        "pc-inter_cert.pem",
        "pc-device-01_cert.pem",
    ]));

    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &[]);
    let (st, cert) = service(
        &s,
        Method::PUT,
        "/certificates/pc-root?api-version=2021-10-01",
        None,
        Some(json!({"certificate": std::fs::read_to_string(dir.join("pc-root_cert.pem")).unwrap()})),
    )
    .await;
    assert_eq!(st, 200);
    let (st, code) = service(
        &s,
        Method::POST,
        "/certificates/pc-root/generateVerificationCode?api-version=2021-10-01",
        cert["etag"].as_str(),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let nonce = code["properties"]["verificationCode"].as_str().unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_provisio")).current_dir(&dir).args([
        "cert",
        "verification",
        "--ca",
        "pc-root_cert.pem",
        "--key",
        "pc-root_key.pem",
        "--nonce",
        nonce,
    ]));
    let (st, v) = service(
        &s,
        Method::POST,
        "/certificates/pc-root/verify?api-version=2021-10-01",
        code["etag"].as_str(),
        Some(json!({"certificate": std::fs::read_to_string(dir.join("verification_cert.pem")).unwrap()})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = service(&s, Method::PUT, "/enrollmentGroups/pc-group?api-version=2021-10-01", None, Some(json!({
        "enrollmentGroupId": "pc-group", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "pc-root"}}},
    }))).await;
    assert_eq!(st, 200);
    let v = register(&s, "pc-device-01", &dir.join("pc-device-01_fullchain.pem"), &dir.join("pc-device-01_key.pem"))
        .expect("provisio cert device registers");
    assert_eq!(v["registrationState"]["x509"]["enrollmentGroupId"], "pc-group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_needs_a_verified_ca_above_signing_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Ossl { dir: tmp.path().to_owned() };
    o.root("strict-root");
    o.signed("strict-inter", "strict-root", ROOT_EXT);
    o.signed("strict-dev", "strict-inter", DEVICE_EXT);
    let cfg = tmp.path().join("provisio.toml");
    std::fs::write(&cfg, "x509_signing_certificates_need_verified_ca = true\n").unwrap();
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let (st, _) = service(&s, Method::PUT, "/enrollmentGroups/strict-group?api-version=2021-10-01", None, Some(json!({
        "enrollmentGroupId": "strict-group",
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": o.pem("strict-inter")}}}},
    }))).await;
    assert_eq!(st, 200);
    let chain = o.chain("strict-dev", &[]);
    assert_refused(&s, "strict-dev", register(&s, "strict-dev", &chain, &o.key("strict-dev")), "neither a verified CA")
        .await;
    // Verified on upload (the portal's "set certificate status to verified on upload").
    let (st, c) = service(
        &s,
        Method::PUT,
        "/certificates/strict-root?api-version=2021-10-01",
        None,
        Some(json!({"properties": {"certificate": o.pem("strict-root"), "isVerified": true}})),
    )
    .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["properties"]["isVerified"], true);
    let v = register(&s, "strict-dev", &chain, &o.key("strict-dev")).expect("registers once the root is verified");
    assert_eq!(v["registrationState"]["x509"]["enrollmentGroupId"], "strict-group");
}
