//! Bad input on every endpoint: each refusal is a DPS-shaped error, the server keeps
//! serving, and nothing is stored.

use provisio_core::{
    keys::generate_key,
    sas::{SrEncoding, build_token},
};
use serde_json::{Value, json};

use crate::common::{Instance, Server, assert_dps_error, now, put_enrollment};

async fn send(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    auth: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut rb = s.client().request(method, s.url(path)).header("Content-Type", "application/json").body(body);
    if let Some(a) = auth {
        rb = rb.header("Authorization", a);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    if status >= 400 {
        assert_eq!(ct.as_deref(), Some("application/json; charset=utf-8"), "{status} {text}");
    }
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}

fn device_token(scope: &str, id: &str, key: &str, expiry: u64) -> String {
    build_token(&format!("{scope}/registrations/{id}"), key, expiry, Some("registration"), SrEncoding::Raw).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_api_bad_input() {
    use reqwest::Method;
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let scope = s.info.id_scope.clone();
    let e =
        put_enrollment(&s, false, "dev-1", json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}}))
            .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let good = device_token(&scope, "dev-1", &key, now() + 3600);
    let reg = format!("/{scope}/registrations/dev-1/register?api-version=2019-03-31");

    // Malformed JSON and wrong shapes.
    for body in ["{", "[1,2]", "{\"registrationId\": 5}", "\u{0}\u{1}", "null x"] {
        let (st, v) = send(&s, Method::PUT, &reg, Some(&good), body).await;
        assert_dps_error(st, &v, 400, 400_001);
    }
    // Oversized body.
    let big = format!("{{\"registrationId\":\"dev-1\",\"payload\":\"{}\"}}", "x".repeat(200 * 1024));
    let (st, v) = send(&s, Method::PUT, &reg, Some(&good), big).await;
    assert_dps_error(st, &v, 413, 413_001);
    // api-version: unsupported, then missing.
    let (st, v) = send(
        &s,
        Method::PUT,
        &format!("/{scope}/registrations/dev-1/register?api-version=2019-04-16"),
        Some(&good),
        "{}",
    )
    .await;
    assert_dps_error(st, &v, 400, 400_004);
    assert!(v["message"].as_str().unwrap().contains("Unsupported API version 2019-04-16"), "{v}");
    let (st, v) = send(&s, Method::PUT, &format!("/{scope}/registrations/dev-1/register"), Some(&good), "{}").await;
    assert_dps_error(st, &v, 400, 400_004);
    // Registration ids that break the rules.
    for bad in ["bad%20id", "ends-with-dot.", &"x".repeat(129), "%C3%BCml"] {
        let (st, v) = send(
            &s,
            Method::PUT,
            &format!("/{scope}/registrations/{bad}/register?api-version=2019-03-31"),
            Some(&good),
            "{}",
        )
        .await;
        assert_dps_error(st, &v, 400, 400_004);
    }
    // Body id that is not the path's.
    let (st, v) = send(&s, Method::PUT, &reg, Some(&good), r#"{"registrationId":"dev-2"}"#).await;
    assert_dps_error(st, &v, 400, 400_004);

    // Credentials: forged, expired, for another resource, malformed, absent, unknown device.
    let forged = device_token(&scope, "dev-1", &generate_key(), now() + 3600);
    let expired = device_token(&scope, "dev-1", &key, now() - 3600);
    let other_resource = device_token(&scope, "dev-2", &key, now() + 3600);
    let other_scope = device_token("0ne00000000", "dev-1", &key, now() + 3600);
    let cases: [(Option<&str>, Option<&str>); 8] = [
        (Some(&forged), Some("Unauthorized")),
        (Some(&expired), Some("expired")),
        (Some(&other_resource), Some("another resource")),
        (Some(&other_scope), Some("another resource")),
        (Some("SharedAccessSignature sr=x&sig=abc"), Some("malformed")),
        (Some("Basic dXNlcjpwYXNz"), Some("malformed")),
        (Some(&good.replace("skn=registration", "skn=owner")), Some("registration")),
        (None, Some("no SAS token")),
    ];
    for (auth, msg) in cases {
        let (st, v) = send(&s, Method::PUT, &reg, auth, "{}").await;
        assert_dps_error(st, &v, 401, 401_002);
        let m = v["message"].as_str().unwrap().to_lowercase();
        assert!(m.contains(&msg.unwrap().to_lowercase()), "{auth:?}: {v}");
    }
    // An unknown device looks exactly like a forged token.
    let unknown = device_token(&scope, "nobody", &key, now() + 3600);
    let (st, v) = send(
        &s,
        Method::PUT,
        &format!("/{scope}/registrations/nobody/register?api-version=2019-03-31"),
        Some(&unknown),
        "{}",
    )
    .await;
    assert_dps_error(st, &v, 401, 401_002);
    assert_eq!(v["message"], "Unauthorized");
    // The reason is logged with the tracking id; the token's signature is not.
    let (_, v) = send(&s, Method::PUT, &reg, Some(&forged), "{}").await;
    let tracking = v["trackingId"].as_str().unwrap().to_owned();
    let log = crate::common::logged(&s, &tracking).await;
    let line = log.lines().find(|l| l.contains(&tracking)).unwrap_or_else(|| panic!("tracking id not logged:\n{log}"));
    assert!(line.contains("neither the primary nor the secondary key"), "{line}");
    let sig = forged.split("sig=").nth(1).unwrap().split('&').next().unwrap();
    assert!(!log.contains(sig), "a token signature reached the log");
    assert!(!log.contains(&key), "a device key reached the log");

    // Unknown scope.
    let (st, v) =
        send(&s, Method::PUT, "/0neFFFFFFFF/registrations/dev-1/register?api-version=2019-03-31", Some(&good), "{}")
            .await;
    assert_dps_error(st, &v, 404, 404_001);

    // Nothing above was stored: the status lookup finds no registration.
    let (st, v) =
        send(&s, Method::POST, &format!("/{scope}/registrations/dev-1?api-version=2019-03-31"), Some(&good), "").await;
    assert_dps_error(st, &v, 404, 404_202);

    // Polls: unknown operation, another device's operation, forged token.
    let (st, v) = send(&s, Method::PUT, &reg, Some(&good), "").await;
    assert_eq!(st, 202, "{v}");
    let op = v["operationId"].as_str().unwrap().to_owned();
    let (st, v) = send(
        &s,
        Method::GET,
        &format!("/{scope}/registrations/dev-1/operations/nope?api-version=2019-03-31"),
        Some(&good),
        "",
    )
    .await;
    assert_dps_error(st, &v, 404, 404_202);
    let e2 =
        put_enrollment(&s, false, "dev-2", json!({"registrationId": "dev-2", "attestation": {"type": "symmetricKey"}}))
            .await;
    let good2 =
        device_token(&scope, "dev-2", e2["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap(), now() + 3600);
    let (st, v) = send(
        &s,
        Method::GET,
        &format!("/{scope}/registrations/dev-2/operations/{op}?api-version=2019-03-31"),
        Some(&good2),
        "",
    )
    .await;
    assert_dps_error(st, &v, 404, 404_202);
    let (st, v) = send(
        &s,
        Method::GET,
        &format!("/{scope}/registrations/dev-1/operations/{op}?api-version=2019-03-31"),
        Some(&forged),
        "",
    )
    .await;
    assert_dps_error(st, &v, 401, 401_002);
    // Case-insensitive routes and ids: the C SDK encodes, others do not.
    let (st, v) = send(
        &s,
        Method::GET,
        &format!("/{}/REGISTRATIONS/DEV-1/Operations/{op}?api-version=2019-03-31", scope.to_lowercase()),
        Some(&good),
        "{}",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "assigned");

    // Routing errors keep the DPS shape.
    let (st, v) = send(&s, Method::DELETE, &reg, Some(&good), "").await;
    assert_dps_error(st, &v, 405, 405_001);
    let (st, v) = send(&s, Method::GET, "/no/such/route/here/at/all", None, "").await;
    assert_dps_error(st, &v, 404, 404_001);

    // Still serving.
    let (st, _) = send(&s, Method::GET, "/health", None, "").await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_api_bad_input() {
    use reqwest::Method;
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let owner = s.info.owner_key().unwrap().to_owned();
    let tok =
        |sr: &str, key: &str, exp: u64, skn: Option<&str>| build_token(sr, key, exp, skn, SrEncoding::Upper).unwrap();
    let path = "/enrollments/dev-x?api-version=2021-10-01";
    let body = json!({"registrationId": "dev-x", "attestation": {"type": "symmetricKey"}}).to_string();

    // Authentication.
    let bad_auth = [
        None,
        Some(tok("localhost", &generate_key(), now() + 600, Some("provisioningserviceowner"))),
        Some(tok("localhost", &owner, now() - 600, Some("provisioningserviceowner"))),
        Some(tok("other.example", &owner, now() + 600, Some("provisioningserviceowner"))),
        Some(tok("localhost", &owner, now() + 600, None)),
        Some(tok("localhost", &owner, now() + 600, Some("nosuchpolicy"))),
        Some("Bearer eyJhbGciOi.x.y".to_owned()),
    ];
    for auth in &bad_auth {
        for m in [Method::PUT, Method::GET, Method::DELETE] {
            let (st, v) = send(&s, m.clone(), path, auth.as_deref(), body.clone()).await;
            assert_dps_error(st, &v, 401, 401_002);
        }
    }
    // The port in sr (Python signs "localhost:8443" encoded) is accepted, as is a raw sr.
    let good = s.service_token();
    let with_port = tok(&format!("localhost:{}", s.port), &owner, now() + 600, Some("provisioningserviceowner"));
    let (st, v) = send(&s, Method::GET, path, Some(&with_port), "").await;
    assert_dps_error(st, &v, 404, 404_201);

    // Bodies.
    for (b, code) in [
        ("{".to_owned(), 400_001),
        (String::new(), 400_001),
        (json!({"registrationId": "dev-x"}).to_string(), 400_001),
        (json!({"registrationId": "dev-y", "attestation": {"type": "symmetricKey"}}).to_string(), 400_004),
        (json!({"registrationId": "dev-x", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "not base64!"}}}).to_string(), 400_004),
        (json!({"registrationId": "dev-x", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}).to_string(), 400_004),
        (json!({"registrationId": "dev-x", "attestation": {"type": "magic"}}).to_string(), 400_004),
        (json!({"registrationId": "dev-x", "deviceId": "bad device id", "attestation": {"type": "symmetricKey"}}).to_string(), 400_004),
        (json!({"registrationId": "dev-x", "allocationPolicy": "random", "attestation": {"type": "symmetricKey"}}).to_string(), 400_004),
        (format!("{{\"registrationId\":\"dev-x\",\"attestation\":{{\"type\":\"symmetricKey\"}},\"initialTwin\":{{\"tags\":{{\"t\":\"{}\"}}}}}}", "x".repeat(100 * 1024)), 413_001),
    ] {
        let (st, v) = send(&s, Method::PUT, path, Some(&good), b.clone()).await;
        assert_dps_error(st, &v, u16::try_from(code / 1000).unwrap(), code);
    }
    let (st, v) = send(&s, Method::PUT, "/enrollments/bad.?api-version=2021-10-01", Some(&good), body.clone()).await;
    assert_dps_error(st, &v, 400, 400_004);
    let (st, v) = send(&s, Method::PUT, "/enrollments/dev-x?api-version=1999-01-01", Some(&good), body.clone()).await;
    assert_dps_error(st, &v, 400, 400_004);
    // None of that stored anything.
    let (st, v) = send(&s, Method::GET, path, Some(&good), "").await;
    assert_dps_error(st, &v, 404, 404_201);

    // ETag rules: create, replayed create, wrong etag, right etag, '*'.
    let (st, created) = send(&s, Method::PUT, path, Some(&good), body.clone()).await;
    assert_eq!(st, 200, "{created}");
    let (st, v) = send(&s, Method::PUT, path, Some(&good), body.clone()).await;
    assert_dps_error(st, &v, 409, 409_201);
    let put_if = |etag: String| {
        let c = s.client();
        let url = s.url(path);
        let (good, body) = (good.clone(), body.clone());
        async move {
            let r = c
                .put(url)
                .header("Authorization", good)
                .header("If-Match", etag)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = put_if("\"stale\"".into()).await;
    assert_dps_error(st, &v, 412, 412_001);
    let etag = created["etag"].as_str().unwrap().to_owned();
    let (st, updated) = put_if(format!("\"{etag}\"")).await;
    assert_eq!(st, 200, "{updated}");
    assert_ne!(updated["etag"], created["etag"]);
    assert_eq!(updated["createdDateTimeUtc"], created["createdDateTimeUtc"]);
    let (st, _) = put_if("*".into()).await;
    assert_eq!(st, 200);
    // Delete with a stale etag fails; unconditional delete works; second delete is 404.
    let r =
        s.client().delete(s.url(path)).header("Authorization", &good).header("If-Match", etag).send().await.unwrap();
    assert_eq!(r.status(), 412);
    let (st, _) = send(&s, Method::DELETE, path, Some(&good), "").await;
    assert_eq!(st, 204);
    let (st, v) = send(&s, Method::DELETE, path, Some(&good), "").await;
    assert_dps_error(st, &v, 404, 404_201);
    let (st, v) = send(&s, Method::GET, "/enrollmentGroups/nope?api-version=2021-10-01", Some(&good), "").await;
    assert_dps_error(st, &v, 404, 404_204);
    // Routes are case-insensitive (the Node SDK writes /enrollmentgroups).
    let g = json!({"enrollmentGroupId": "grp", "attestation": {"type": "symmetricKey"}}).to_string();
    let (st, v) = send(&s, Method::PUT, "/ENROLLMENTGROUPS/grp?api-version=2021-10-01", Some(&good), g).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = send(&s, Method::GET, "/enrollmentgroups/GRP?api-version=2021-10-01", Some(&good), "").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["attestation"], json!({"type": "symmetricKey"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_without_alpn_older_versions_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let ca = s.ca_file();
    let url = s.url("/health");
    let resolve = format!("localhost:{}:127.0.0.1", s.port);
    for (flags, expect_ok) in [
        (vec!["--tlsv1.2", "--tls-max", "1.2", "--no-alpn"], true),
        (vec!["--tlsv1.3", "--no-alpn"], true),
        (vec!["--http1.1"], true),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &resolve])
            .args(&flags)
            .arg(&url)
            .output()
            .unwrap();
        assert_eq!(
            out.status.success() && out.stdout == b"200",
            expect_ok,
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // TLS 1.1 and 1.0 are refused by the server (SECLEVEL=0 lets openssl offer them), while
    // the same client completes TLS 1.2.
    let s_client = |v: &str| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", s.port), v, "-cipher", "DEFAULT@SECLEVEL=0"])
            .args(["-servername", "localhost"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    assert!(s_client("-tls1_2").contains("Protocol  : TLSv1.2"));
    for v in ["-tls1_1", "-tls1"] {
        let all = s_client(v);
        assert!(all.contains("alert") && !all.contains("Cipher is ECDHE"), "{v} was accepted: {all}");
    }
    // The server asks for a client certificate but does not require one (curl sent none above).
}

/// The specification's error shape (issue #25, point 3): every error answer carries
/// `x-ms-error-code`, on the device and the service API, and `info` holds the retry hint
/// where there is one (and is absent where Provisio has nothing to put in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_carry_x_ms_error_code_and_the_retry_hint_in_info() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("d"), "127.0.0.1:0", &[]);
    let scope = s.info.id_scope.clone();
    let e = put_enrollment(
        &s,
        false,
        "info-1",
        json!({"registrationId": "info-1", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let tok = device_token(&scope, "info-1", &key, now() + 600);
    let client = s.client();
    let r = client
        .put(s.url(&format!("/{scope}/registrations/info-1/register?api-version=2019-03-31")))
        .header("Authorization", &tok)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let op = r.json::<Value>().await.unwrap()["operationId"].as_str().unwrap().to_owned();
    let poll = s.url(&format!("/{scope}/registrations/info-1/operations/{op}?api-version=2019-03-31"));
    let mut last = None;
    for _ in 0..6 {
        last = Some(client.get(&poll).header("Authorization", &tok).send().await.unwrap());
    }
    let r = last.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ms-error-code"], "429001");
    let retry = r.headers()["retry-after"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_dps_error(429, &body, 429, 429_001);
    assert_eq!(body["info"], json!({"retryAfter": retry}), "{body}");
    let r = client.get(&poll).header("Authorization", "SharedAccessSignature sr=x&sig=y&se=1").send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["x-ms-error-code"].to_str().unwrap()), (401, "401002"));
    let body: Value = r.json().await.unwrap();
    assert!(body.get("info").is_none(), "nothing to say: {body}");
    let r = client.get(s.url("/enrollments/nobody?api-version=2021-10-01")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["x-ms-error-code"].to_str().unwrap()), (401, "401002"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_connection_limits() {
    use reqwest::Method;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("p.toml");
    std::fs::write(&cfg, "max_connections_per_ip = 3\nregistrations_per_second = 2\nmax_headers = 40\n").unwrap();
    let s = Server::start(&tmp.path().join("d"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let scope = s.info.id_scope.clone();
    // Secrets on disk are private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("d/provisio.sqlite")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::metadata(tmp.path().join("d")).unwrap().permissions().mode() & 0o777, 0o700);
    }
    let e =
        put_enrollment(&s, false, "thr-1", json!({"registrationId": "thr-1", "attestation": {"type": "symmetricKey"}}))
            .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let tok = device_token(&scope, "thr-1", &key, now() + 600);
    let reg = format!("/{scope}/registrations/thr-1/register?api-version=2019-03-31");

    // Instance registration rate: a quick burst over 2/s (bursts of 4) gets 429 + Retry-After.
    let mut op = None;
    let mut throttled = false;
    for _ in 0..8 {
        let (st, v) = send(&s, Method::PUT, &reg, Some(&tok), "{}").await;
        match st {
            202 => op = v["operationId"].as_str().map(str::to_owned),
            429 => {
                assert_dps_error(st, &v, 429, 429_001);
                throttled = true;
            }
            other => panic!("{other}: {v}"),
        }
    }
    assert!(throttled, "8 registrations at once were never throttled at 2/s");
    // Device polls: 5 per 10 s, then 429.
    let poll = format!("/{scope}/registrations/thr-1/operations/{}?api-version=2019-03-31", op.unwrap());
    for i in 0..5 {
        let (st, v) = send(&s, Method::GET, &poll, Some(&tok), "").await;
        assert_eq!(st, 200, "poll {i}: {v}");
    }
    let r = s.client().get(s.url(&poll)).header("Authorization", &tok).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    assert_dps_error(429, &r.json::<Value>().await.unwrap(), 429, 429_001);

    // Too many headers (HTTP/1.1): refused before any handler runs, with 431 (written by
    // hand: a client library may give up on such an answer in its own way).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = |n: usize| {
            let mut r = String::from("GET /health HTTP/1.1\r\nHost: localhost\r\n");
            for i in 0..n {
                r.push_str(&format!("x-h-{i}: v\r\n"));
            }
            r + "Connection: close\r\n\r\n"
        };
        for (headers, status) in [(10, "200"), (60, "431")] {
            let mut tls = crate::common::tls_connect(&s, s.port, None).await;
            tls.write_all(head(headers).as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{headers} headers: {answer}");
        }
    }

    // Per-IP connections: the fourth simultaneous connection from 127.0.0.1 is closed at once.
    let port = s.port;
    // A finished TLS handshake means the server admitted the connection.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(crate::common::tls_connect(&s, port, None).await);
    }
    let mut fourth = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), fourth.read(&mut b))
        .await
        .expect("fourth connection not closed");
    assert!(matches!(n, Ok(0) | Err(_)), "the fourth connection was served");
    drop(held);
    let client = s.client();
    let freed = crate::common::eventually(std::time::Duration::from_secs(10), async || {
        client.get(s.url("/health")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(freed, "slots are freed when connections close");
}

/// Percent-encodes everything but unreserved characters, as a client builds a path.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Counts what the service API lists: enrollments, groups, certificates, policies, hubs.
async fn inventory(s: &Server, good: &str) -> Vec<usize> {
    use reqwest::Method;
    let mut out = Vec::new();
    for (m, path) in [
        (Method::POST, "/enrollments/query?api-version=2021-10-01"),
        (Method::POST, "/enrollmentGroups/query?api-version=2021-10-01"),
        (Method::GET, "/certificates?api-version=2021-10-01"),
        (Method::GET, "/policies?api-version=2021-10-01"),
        (Method::GET, "/linkedHubs?api-version=2021-10-01"),
    ] {
        let (st, v) = send(s, m, path, Some(good), json!({"query": "SELECT *"}).to_string()).await;
        assert_eq!(st, 200, "{path}: {v}");
        let n = v.as_array().or_else(|| v["value"].as_array()).map_or_else(|| panic!("{path}: {v}"), Vec::len);
        out.push(n);
    }
    out
}

/// Every endpoint against a table of hostile ids (unicode, injection, traversal, control
/// characters, overlong) and hostile bodies (wrong types, deep nesting, lone surrogates,
/// BOM, NUL): each gets a DPS-shaped 4xx, never a 5xx, and nothing is stored. Then
/// replayed tokens: after the enrollment is deleted, after its key changed, and on
/// another device's operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_every_endpoint() {
    use reqwest::Method;
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let scope = s.info.id_scope.clone();
    let good = s.service_token();
    let v = "api-version=2021-10-01";
    let before = inventory(&s, &good).await;

    let hostile_ids = [
        "dev-\u{fc}\u{f1}-\u{2603}",
        "\u{1F600}",
        "\u{202E}evil",
        "'; DROP TABLE documents; --",
        "\" OR 1=1 --",
        "../../../etc/passwd",
        "a\u{0}b",
        "a\nb",
        "$(reboot)",
        "<script>alert(1)</script>",
        "{\"$gt\":\"\"}",
        &"x".repeat(300),
    ];
    let cert_body = json!({"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"});
    for raw in hostile_ids {
        let id = encode(raw);
        let token = device_token(&scope, &id, &generate_key(), now() + 3600);
        let cases: Vec<(Method, String, Option<&str>, String)> = vec![
            (
                Method::PUT,
                format!("/enrollments/{id}?{v}"),
                Some(&good),
                json!({"registrationId": raw, "attestation": {"type": "symmetricKey"}}).to_string(),
            ),
            (Method::GET, format!("/enrollments/{id}?{v}"), Some(&good), String::new()),
            (Method::DELETE, format!("/enrollments/{id}?{v}"), Some(&good), String::new()),
            (Method::POST, format!("/enrollments/{id}/attestationmechanism?{v}"), Some(&good), String::new()),
            (
                Method::PUT,
                format!("/enrollmentGroups/{id}?{v}"),
                Some(&good),
                json!({"enrollmentGroupId": raw, "attestation": {"type": "symmetricKey"}}).to_string(),
            ),
            (Method::GET, format!("/registrations/{id}?{v}"), Some(&good), String::new()),
            (Method::DELETE, format!("/registrations/{id}?{v}"), Some(&good), String::new()),
            (Method::POST, format!("/registrations/{id}/query?{v}"), Some(&good), "{}".into()),
            (Method::PUT, format!("/certificates/{id}?{v}"), Some(&good), cert_body.to_string()),
            (Method::POST, format!("/certificates/{id}/verify?{v}"), Some(&good), cert_body.to_string()),
            (Method::PUT, format!("/policies/{id}?{v}"), Some(&good), json!({"rights": "EnrollmentRead"}).to_string()),
            (Method::PUT, format!("/linkedHubs/{id}?{v}"), Some(&good), json!({"allocationWeight": 1}).to_string()),
            (Method::PUT, format!("/{scope}/registrations/{id}/register?{v}"), Some(&token), "{}".into()),
            (Method::GET, format!("/{scope}/registrations/{id}/operations/{id}?{v}"), Some(&token), String::new()),
            (Method::POST, format!("/{scope}/registrations/{id}?{v}"), Some(&token), String::new()),
        ];
        for (m, path, auth, body) in cases {
            let (st, body) = send(&s, m.clone(), &path, auth, body).await;
            assert!((400..500).contains(&st), "{m} {path}: {st} {body}");
            assert_eq!(body["errorCode"].as_u64().map(|c| c / 1000), Some(u64::from(st)), "{m} {path}: {body}");
            assert!(body["trackingId"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
        }
    }

    // Hostile bodies on valid ids.
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let deep_obj = format!("{{\"registrationId\":\"dev-h\",\"payload\":{deep}}}");
    let bodies: Vec<String> = vec![
        r#"{"registrationId": 5, "attestation": {"type": "symmetricKey"}}"#.into(),
        r#"{"registrationId": "dev-h", "attestation": "symmetricKey"}"#.into(),
        r#"{"registrationId": "dev-h", "attestation": {"type": ["symmetricKey"]}}"#.into(),
        r#"{"registrationId": "dev-h", "attestation": {"type": "symmetricKey"}, "provisioningStatus": true}"#.into(),
        r#"{"registrationId": "dev-h", "attestation": {"type": "symmetricKey"}, "iotHubs": "hub"}"#.into(),
        r#"{"registrationId": "dev-h", "attestation": {"type": "symmetricKey"}, "initialTwin": "twin"}"#.into(),
        r#"{"registrationId": "dev-h", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": 12}}}"#
            .into(),
        r#"{"registrationId": "dev-\ud800", "attestation": {"type": "symmetricKey"}}"#.into(),
        "\u{feff}{\"registrationId\": \"dev-h\", \"attestation\": {\"type\": \"symmetricKey\"}}".into(),
        "{\"registrationId\": \"dev-h\u{0}\", \"attestation\": {\"type\": \"symmetricKey\"}}".into(),
        r#"{"registrationId": "dev-h", "attestation": {"type": "symmetricKey"}, "capabilities": {"iotEdge": 1e999}}"#
            .into(),
        deep_obj.clone(),
    ];
    for b in &bodies {
        for path in [format!("/enrollments/dev-h?{v}"), format!("/enrollmentGroups/dev-h?{v}")] {
            let (st, body) = send(&s, Method::PUT, &path, Some(&good), b.clone()).await;
            assert!(st == 400 || st == 413, "PUT {path} {b:.80}: {st} {body}");
            assert_eq!(body["errorCode"].as_u64().map(|c| c / 1000), Some(u64::from(st)), "{body}");
        }
        let (st, body) = send(&s, Method::POST, &format!("/enrollments?{v}"), Some(&good), b.clone()).await;
        assert_eq!(st, 400, "bulk {b:.80}: {body}");
        let (st, body) = send(&s, Method::POST, &format!("/enrollments/query?{v}"), Some(&good), b.clone()).await;
        assert!(st == 400 || st == 200, "query {b:.80}: {st} {body}");
    }
    assert_eq!(inventory(&s, &good).await, before, "hostile input stored something");

    // Device bodies, with a valid token for an enrolled device.
    let e =
        put_enrollment(&s, false, "dev-r", json!({"registrationId": "dev-r", "attestation": {"type": "symmetricKey"}}))
            .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let tok = device_token(&scope, "dev-r", &key, now() + 3600);
    let reg = format!("/{scope}/registrations/dev-r/register?api-version=2021-06-01");
    for b in [
        r#"{"registrationId": 5}"#.to_owned(),
        r#"{"registrationId": ["dev-r"]}"#.into(),
        r#"{"registrationId": "dev-\ud800"}"#.into(),
        r#"{"registrationId": "dev-r", "tpm": "x"}"#.into(),
        "\u{feff}{}".into(),
        format!("{{\"registrationId\":\"dev-r\",\"payload\":{deep}}}"),
        "{\"registrationId\": \"dev-r\"} trailing".into(),
    ] {
        let (st, body) = send(&s, Method::PUT, &reg, Some(&tok), b.clone()).await;
        assert_eq!(st, 400, "{b:.80}: {body}");
        assert_eq!(body["errorCode"], 400_001, "{b:.80}: {body}");
    }
    let (st, body) =
        send(&s, Method::POST, &format!("/{scope}/registrations/dev-r?api-version=2021-06-01"), Some(&tok), "").await;
    assert_dps_error(st, &body, 404, 404_202);

    // Replays. A working token, used once…
    let (st, first) = send(&s, Method::PUT, &reg, Some(&tok), "{}").await;
    assert_eq!(st, 202, "{first}");
    let op = first["operationId"].as_str().unwrap().to_owned();
    let poll_path = format!("/{scope}/registrations/dev-r/operations/{op}?api-version=2021-06-01");
    let (st, body) = send(&s, Method::GET, &poll_path, Some(&tok), "").await;
    assert_eq!(st, 200, "{body}");
    // …replayed on another device's path is refused, and so is its operation from there.
    let (st, body) = send(
        &s,
        Method::GET,
        &format!("/{scope}/registrations/dev-other/operations/{op}?api-version=2021-06-01"),
        Some(&tok),
        "",
    )
    .await;
    assert_dps_error(st, &body, 401, 401_002);
    // …replayed after the enrollment's keys changed is refused.
    let mut rekeyed = e.clone();
    rekeyed["attestation"]["symmetricKey"] = json!({"primaryKey": generate_key(), "secondaryKey": generate_key()});
    let (st, body) =
        crate::common::service(&s, Method::PUT, &format!("/enrollments/dev-r?{v}"), Some("*"), Some(rekeyed)).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = send(&s, Method::PUT, &reg, Some(&tok), "{}").await;
    assert_dps_error(st, &body, 401, 401_002);
    // Its polls too, although the token was proven for them moments before the change.
    let (st, body) = send(&s, Method::GET, &poll_path, Some(&tok), "").await;
    assert_dps_error(st, &body, 401, 401_002);
    // …and after the enrollment is deleted, with either old token.
    let (st, _) = crate::common::service(&s, Method::DELETE, &format!("/enrollments/dev-r?{v}"), None, None).await;
    assert_eq!(st, 204);
    let (st, body) = send(&s, Method::PUT, &reg, Some(&tok), "{}").await;
    assert_dps_error(st, &body, 401, 401_002);
    // A service token replayed after its policy's key was regenerated is refused.
    let (st, _) = crate::common::service(
        &s,
        Method::PUT,
        &format!("/policies/ops?{v}"),
        None,
        Some(json!({"rights": "EnrollmentRead"})),
    )
    .await;
    assert_eq!(st, 200);
    let (_, ops) = send(&s, Method::GET, &format!("/policies/ops?{v}"), Some(&good), "").await;
    let ops_token =
        build_token("localhost", ops["primaryKey"].as_str().unwrap(), now() + 600, Some("ops"), SrEncoding::Upper)
            .unwrap();
    let (st, _) = send(&s, Method::GET, &format!("/enrollments/none?{v}"), Some(&ops_token), "").await;
    assert_eq!(st, 404, "the fresh token works");
    let (st, _) =
        send(&s, Method::POST, &format!("/policies/ops/regenerateKey?{v}"), Some(&good), r#"{"keyType":"primary"}"#)
            .await;
    assert_eq!(st, 200);
    let (st, body) = send(&s, Method::GET, &format!("/enrollments/none?{v}"), Some(&ops_token), "").await;
    assert_dps_error(st, &body, 401, 401_002);

    // Still serving.
    let (st, _) = send(&s, Method::GET, "/health", None, "").await;
    assert_eq!(st, 200);
}
