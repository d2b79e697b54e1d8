//! What a client without any credential can still make the server do (issue #24): each test
//! plays the attack against a running server and checks the limit that now stops it.

use std::{path::Path, process::Command, time::Duration};

use provisio_pki::testcerts::{KeyKind, Role, issue};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Instance, Process, Server, put_enrollment, run, service, tls_connect};

fn config(dir: &Path, body: &str) -> String {
    let p = dir.join("provisio.toml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// The server process's CPU time so far (user + system), from `/proc/{pid}/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz = run(Command::new("getconf").arg("CLK_TCK")).trim().parse::<f64>().unwrap();
    ticks / hz
}

/// `curl` sending `n` register requests with the client certificate `cert`/`key` over HTTP/1.1,
/// on as few connections as the server allows; returns each request's status and whether it
/// opened a new connection.
fn register_with_cert(s: &impl Instance, id: &str, cert: &Path, key: &Path, n: usize) -> Vec<(u16, bool)> {
    let url = s.url(&format!("/{}/registrations/{id}/register?api-version=2021-06-01", s.info().id_scope));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "-X", "PUT", "-w", "%{http_code} %{num_connects}\\n"])
        .arg("--cacert")
        .arg(s.ca_file())
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["-H", "Content-Type: application/json", "-d", &format!("{{\"registrationId\":\"{id}\"}}")]);
    for _ in 0..n {
        cmd.args(["-o", "/dev/null"]).arg(&url);
    }
    run(&mut cmd)
        .lines()
        .map(|l| {
            let (code, connects) = l.split_once(' ').unwrap();
            (code.parse().unwrap(), connects != "0")
        })
        .collect()
}

/// Enrolls `id` with a symmetric key and returns a SAS token of the device.
async fn enrolled_token(s: &impl Instance, id: &str) -> String {
    let e = put_enrollment(s, false, id, json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})).await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    provisio_core::sas::build_token(
        &format!("{}/registrations/{id}", s.info().id_scope),
        key,
        crate::common::now() + 600,
        Some("registration"),
        provisio_core::sas::SrEncoding::Raw,
    )
    .unwrap()
}

/// Writes a device certificate followed by `extra` CA certificates, and its key.
fn write_chain(dir: &Path, name: &str, leaf: &provisio_pki::CertAndKey, extra: &[String]) -> (String, String) {
    let cert = dir.join(format!("{name}_chain.pem"));
    let key = dir.join(format!("{name}_key.pem"));
    let mut pem = leaf.cert_pem.clone();
    for c in extra {
        pem.push_str(c);
    }
    std::fs::write(&cert, pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

/// Finding 1: a chain of 150 self-made CAs, all named like the device certificate's issuer,
/// against five groups whose anchors carry that name too, cost 0.33 s of server CPU per
/// request (and any number of requests per connection). Now a device may present five
/// certificates besides its own; within that, refused chains are remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_built_to_exhaust_path_building_costs_the_server_little_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    // No per-address limit here: the cost of each refusal itself is measured.
    let cfg = config(tmp.path(), "x509_refusals_per_ip_per_minute = 0\n");
    let s = Process::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", &cfg]);
    const NAME: &str = "Fleet Issuing CA";
    for g in 0..5 {
        let anchor = issue(Role::Root, NAME, None, KeyKind::EcdsaP256, 30).unwrap();
        put_enrollment(
            &s,
            true,
            &format!("fleet-{g}"),
            json!({"enrollmentGroupId": format!("fleet-{g}"),
                   "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": anchor.cert_pem}}}}}),
        )
        .await;
    }
    let fakes: Vec<_> = (0..150).map(|_| issue(Role::Root, NAME, None, KeyKind::EcdsaP256, 30).unwrap()).collect();
    let leaf = issue(Role::Device, "victim-01", Some(&fakes[0]), KeyKind::EcdsaP256, 30).unwrap();
    let all: Vec<String> = fakes.iter().map(|f| f.cert_pem.clone()).collect();
    let (long_cert, long_key) = write_chain(tmp.path(), "long", &leaf, &all);
    let (short_cert, short_key) = write_chain(tmp.path(), "short", &leaf, &all[..5]);
    let pid = s.pid();
    for (label, cert, key) in [("150 CAs", &long_cert, &long_key), ("5 CAs", &short_cert, &short_key)] {
        let before = cpu_seconds(pid);
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.extend(register_with_cert(&s, "victim-01", Path::new(cert), Path::new(key), 10));
        }
        let per_request = (cpu_seconds(pid) - before) / answers.len() as f64;
        eprintln!("{label}: {:.2} ms of server CPU per refused request", per_request * 1000.0);
        assert_eq!(answers.len(), 40);
        assert!(answers.iter().all(|(st, _)| *st == 401), "{label}: {answers:?}");
        // Before the fix: 70–330 ms each (release build); the cap, the name filter and the
        // remembered refusal leave the handshake and the HTTP request.
        assert!(per_request < 0.010, "{label}: {:.1} ms of server CPU per refused request", per_request * 1000.0);
    }
    // A device that presents the right intermediates still registers.
    let root = issue(Role::Root, "Real Root", None, KeyKind::EcdsaP256, 30).unwrap();
    let inter = issue(Role::Intermediate, "Real Inter", Some(&root), KeyKind::EcdsaP256, 30).unwrap();
    put_enrollment(
        &s,
        true,
        "real",
        json!({"enrollmentGroupId": "real",
               "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root.cert_pem}}}}}),
    )
    .await;
    let dev = issue(Role::Device, "real-01", Some(&inter), KeyKind::EcdsaP256, 30).unwrap();
    let (cert, key) = write_chain(tmp.path(), "real", &dev, &[all[7].clone(), inter.cert_pem.clone(), root.cert_pem]);
    assert_eq!(register_with_cert(&s, "real-01", Path::new(&cert), Path::new(&key), 1), vec![(202, true)]);
}

/// Finding 1: refused chains are limited per connection (the chain is the handshake's, so
/// repeating it cannot help: the third refusal closes the connection) and per address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_chains_are_limited_per_connection_and_per_address() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "x509_refusals_per_ip_per_minute = 5\n");
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", &cfg]);
    let root = issue(Role::Root, "Nobody's Root", None, KeyKind::EcdsaP256, 30).unwrap();
    let dev = issue(Role::Device, "stranger", Some(&root), KeyKind::EcdsaP256, 30).unwrap();
    let (cert, key) = write_chain(tmp.path(), "stranger", &dev, &[]);
    let answers = register_with_cert(&s, "stranger", Path::new(&cert), Path::new(&key), 8);
    assert_eq!(
        answers,
        vec![
            (401, true),
            (401, false),
            (401, false), // the third refusal on a connection closes it
            (401, true),
            (401, false), // five refusals from this address within a minute
            (429, false),
            (429, false),
            (429, false),
        ]
    );
    // Another client's SAS registration is not affected.
    let token = enrolled_token(&s, "sas-dev").await;
    let r = s
        .client()
        .put(s.url(&format!("/{}/registrations/sas-dev/register?api-version=2021-06-01", s.info().id_scope)))
        .header("Authorization", token)
        .json(&json!({"registrationId": "sas-dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

/// Reads until the server closes the connection; what it sent. Panics after 20 s (the
/// server's deadlines in these tests are 1 s).
async fn read_until_closed(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open; it sent {:?}", String::from_utf8_lossy(&out));
    out
}

/// Finding 3 (a): a TLS connection that never sends a request was never closed (the HTTP
/// version sniffing had no deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_after_the_handshake_is_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "header_timeout_secs = 1\n");
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", &cfg]);
    let mut io = tls_connect(&s, s.port, None).await;
    assert!(read_until_closed(&mut io).await.is_empty());
    // A connection that does send a request is served as before.
    assert_eq!(s.client().get(s.url("/health")).send().await.unwrap().status(), 200);
}

/// Finding 3 (b): a request whose `Content-Length` body never came held its connection
/// forever (the body was read outside the request deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_does_not_hold_the_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "request_timeout_secs = 1\n");
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", &cfg]);
    let mut io = tls_connect(&s, s.port, None).await;
    let head = format!(
        "PUT /{}/registrations/slow/register?api-version=2021-06-01 HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"regis",
        s.info().id_scope
    );
    io.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8(read_until_closed(&mut io).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"errorCode\":503001"), "{answer}");
}

/// Finding 3 (c): MQTT granted any keep-alive (up to 65,535 s) and a CONNACK before any
/// credential is checked, so a connection could idle for 27 hours. The first request must now
/// follow the CONNECT within the connect deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_connection_must_send_its_first_request_soon_after_its_connack() {
    use rumqttc::mqttbytes::v4::{Connect, Login, Packet};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "handshake_timeout_secs = 1\n");
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--config", &cfg]);
    let mut c = provisio_testkit::devices::RawMqtt::connect(&s).await;
    let mut conn = Connect::new("idler");
    conn.keep_alive = u16::MAX;
    conn.login =
        Some(Login::new(format!("{}/registrations/idler/api-version=2019-03-31", s.info().id_scope), "anything"));
    c.send(Packet::Connect(conn)).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    // Silent after the CONNACK: closed (recv gives up with a panic after 10 s of silence).
    assert_eq!(c.recv().await, None);
}

/// Finding 4: five unauthenticated polls every ten seconds kept a chosen device at `429`, as
/// its polls were counted before the credential was checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_without_the_devices_credential_do_not_use_up_its_polls() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &[]);
    let scope = s.info().id_scope.clone();
    let token = enrolled_token(&s, "polled-dev").await;
    let base = format!("/{scope}/registrations/polled-dev");
    let r = s
        .client()
        .put(s.url(&format!("{base}/register?api-version=2021-06-01")))
        .header("Authorization", &token)
        .json(&json!({"registrationId": "polled-dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let op = r.json::<Value>().await.unwrap()["operationId"].as_str().unwrap().to_owned();
    let poll = format!("{base}/operations/{op}?api-version=2021-06-01");
    let forged = token.replace("sig=", "sig=AAAA");
    for auth in [None, Some(forged.as_str())] {
        for _ in 0..6 {
            let mut rb = s.client().get(s.url(&poll));
            if let Some(a) = auth {
                rb = rb.header("Authorization", a);
            }
            assert_eq!(rb.send().await.unwrap().status(), 401);
        }
    }
    let r = s.client().get(s.url(&poll)).header("Authorization", &token).send().await.unwrap();
    assert_eq!(r.status(), 200, "the device's own poll");
    // The device's own polls are still limited (DPS: 5 per 10 s).
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(s.client().get(s.url(&poll)).header("Authorization", &token).send().await.unwrap().status());
    }
    assert_eq!(statuses.last().map(reqwest::StatusCode::as_u16), Some(429), "{statuses:?}");
    let (st, _) = service(&s, Method::GET, "/registrations/polled-dev?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 200);
}

/// What `provisio serve` prints before it serves (text form), then stops it.
fn serve_output(data: &Path) -> String {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["serve", "--data-dir"])
        .arg(data)
        .args(["--https-listen", "127.0.0.1:0", "--mqtt-listen", "off", "--amqp-listen", "off"])
        .env_remove("PROVISIO_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        out.push_str(&line);
        out.push('\n');
        if line.starts_with("Stock Azure SDK") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    out
}

/// Finding 5: `serve` printed the owner's connection string, key included, on every start,
/// into journald and container logs. Now only the first start (which creates the key) does.
#[test]
fn the_owners_key_is_printed_only_when_the_instance_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let first = serve_output(&data);
    let key_line = first.lines().find(|l| l.starts_with("Service connection string:")).unwrap();
    assert!(key_line.contains("SharedAccessKey="), "{first}");
    let key = key_line.split("SharedAccessKey=").nth(1).unwrap().trim().to_owned();
    assert!(first.contains("printed on this first start only"), "{first}");
    let second = serve_output(&data);
    assert!(!second.contains(&key), "{second}");
    assert!(!second.contains("SharedAccessKey="), "{second}");
    assert!(second.contains("SharedAccessKeyName=provisioningserviceowner"), "{second}");
    assert!(second.contains("`provisio info`"), "{second}");
    // `provisio info` still prints it, for whoever may read the data directory.
    let info = run(Command::new(env!("CARGO_BIN_EXE_provisio")).args(["info", "--data-dir"]).arg(&data));
    assert!(info.contains(&key), "{info}");
}

/// Finding 11: a server without `encryption_key` stored every key in plain without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_an_encryption_key_says_so_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = Server::start(&tmp.path().join("plain"), "127.0.0.1:0", &[]);
    crate::common::logged(&plain, "no encryption_key is set").await;
    let cfg = config(tmp.path(), "encryption_key = \"q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\"\n");
    let sealed = Server::start(&tmp.path().join("sealed"), "127.0.0.1:0", &["--config", &cfg]);
    assert_eq!(sealed.client().get(sealed.url("/health")).send().await.unwrap().status(), 200);
    assert!(!sealed.log_text().contains("no encryption_key is set"), "{}", sealed.log_text());
}
