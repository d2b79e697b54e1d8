//! Provisio's test harness (as kanidm's testkit is to kanidm): real servers on loopback
//! ports, real TLS, real storage, and the clients and helpers the integration tests share.
//!
//! [`Server::start`] runs a server **in this process** (`Provisio::bind` on `127.0.0.1:0`, as
//! mini-redis's tests do), configured from the same flags and TOML file as `provisio serve`
//! (through `provisio::config`), on a runtime of its own whose log lines it keeps
//! ([`Server::log_text`]). Tests of the binary itself (signals, `kill -9`, its output) start
//! the `provisio` executable instead and implement [`Instance`] for it, so that every helper
//! here works with both.

pub mod devices;
mod logs;
mod server;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
pub use server::Server;

/// Repository root (for `examples/` and `interop/`).
///
/// # Panics
/// If the source tree is not where this crate was built from.
#[must_use]
pub fn repo_root() -> PathBuf {
    #[allow(clippy::expect_used)]
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the repository root")
}

/// The facts `provisio serve --json` prints (and `provisio info --json`).
pub use provisio_server::InstanceInfo as Info;

/// A running server the helpers can talk to: in-process ([`Server`]) or the binary.
pub trait Instance {
    /// Its start-up facts.
    fn info(&self) -> &Info;
    /// Its HTTPS port.
    fn port(&self) -> u16;
    /// What it has logged so far.
    fn log_text(&self) -> String;

    /// `https://localhost:{port}{path_and_query}`.
    fn url(&self, path_and_query: &str) -> String {
        format!("https://localhost:{}{path_and_query}", self.port())
    }

    /// The CA file clients trust.
    ///
    /// # Panics
    /// When the server serves an operator's certificate (no local CA).
    fn ca_file(&self) -> PathBuf {
        #[allow(clippy::expect_used)]
        self.info().ca_cert_file.clone().expect("local CA")
    }

    /// A client that trusts only the instance's CA and resolves localhost to 127.0.0.1.
    ///
    /// # Panics
    /// If the CA file cannot be read.
    #[allow(clippy::expect_used)]
    fn client(&self) -> reqwest::Client {
        let pem = std::fs::read(self.ca_file()).expect("the CA file");
        let ca = reqwest::Certificate::from_pem(&pem).expect("a CA certificate");
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .resolve("localhost", ([127, 0, 0, 1], self.port()).into())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client")
    }

    /// A service SAS token for the owner policy, made with Provisio's own signer.
    ///
    /// # Panics
    /// Never for a started instance's key.
    #[allow(clippy::expect_used)]
    fn service_token(&self) -> String {
        provisio_core::sas::build_token(
            "localhost",
            self.info().owner_key().expect("the owner key in the connection string"),
            now() + 3600,
            Some("provisioningserviceowner"),
            provisio_core::sas::SrEncoding::Upper,
        )
        .expect("a token")
    }
}

/// The PostgreSQL server the tests may use: `PROVISIO_TEST_POSTGRES` (an admin URL such as
/// `postgres://postgres@127.0.0.1:5432/postgres`).
pub const POSTGRES_VAR: &str = "PROVISIO_TEST_POSTGRES";

/// A fresh database on the test PostgreSQL server, or `None` (the test is skipped, and says
/// so on stderr) when `PROVISIO_TEST_POSTGRES` is not set. `.ci/run` always sets it, and
/// fails when the server is not reachable.
///
/// # Panics
/// When the variable is set but the server refuses the connection or the `CREATE DATABASE`.
pub async fn postgres_database() -> Option<String> {
    use sqlx::{Connection, Executor};
    let Ok(admin) = std::env::var(POSTGRES_VAR) else {
        eprintln!("skipped: {POSTGRES_VAR} is not set (no PostgreSQL server to test against)");
        return None;
    };
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} ({POSTGRES_VAR}) is not reachable: {e}"));
    let name = format!("provisio_it_{}", uuid::Uuid::new_v4().simple());
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE on {admin}: {e}"));
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Waits until `condition` holds, checking every 20 ms, for at most `limit`; returns
/// whether it held. Tests wait on conditions with this instead of fixed sleeps.
pub async fn eventually(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server's log once it holds `needle` (a tracking id, a reason), waiting up to 10 s
/// for it.
///
/// # Panics
/// When `needle` is not logged in time.
pub async fn logged(s: &impl Instance, needle: &str) -> String {
    let mut log = String::new();
    let found = eventually(Duration::from_secs(10), async || {
        log = s.log_text();
        log.contains(needle)
    })
    .await;
    assert!(found, "'{needle}' was not logged in 10 s:\n{log}");
    log
}

/// Runs a command and returns its stdout, panicking with its stderr on failure.
///
/// # Panics
/// If the command cannot run or fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The walkthrough's SAS script.
#[must_use]
pub fn walkthrough_sas(uri: &str, key: &str, policy: &str, expiry: i64) -> String {
    run(Command::new("python3").arg(repo_root().join("examples/walkthrough/sas.py")).args([
        uri,
        key,
        policy,
        &expiry.to_string(),
    ]))
    .trim()
    .to_owned()
}

/// The walkthrough's openssl key derivation.
#[must_use]
pub fn walkthrough_derive(group_key: &str, registration_id: &str) -> String {
    run(Command::new("bash")
        .arg(repo_root().join("examples/walkthrough/derive-key.sh"))
        .args([group_key, registration_id]))
    .trim()
    .to_owned()
}

/// `curl` as the walkthrough runs it; returns (status, headers, body JSON or Null).
pub fn curl(
    server: &impl Instance,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, String, Value) {
    curl_with(server, method, path, auth, body, &[])
}

/// [`curl`] with extra arguments (e.g. `--cert`, `--key`).
///
/// # Panics
/// If curl fails or prints no status line.
#[allow(clippy::expect_used)]
pub fn curl_with(
    server: &impl Instance,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
    extra: &[&str],
) -> (u16, String, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(extra);
    cmd.args(["-sS", "-L", "-i", "-X", method])
        .args(["--cacert"])
        .arg(server.ca_file())
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", server.port())])
        .args(["-H", "Content-Type: application/json", "-H", "Content-Encoding:  utf-8"]);
    if let Some(a) = auth {
        cmd.args(["-H", &format!("Authorization: {a}")]);
    }
    if let Some(b) = body {
        cmd.args(["-d", b]);
    }
    cmd.arg(server.url(path));
    let out = run(&mut cmd);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or(Value::String(body.into()))
    };
    (status, head.to_owned(), json)
}

/// Header value from a raw curl head, case-insensitive.
#[must_use]
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// PUTs an enrollment (or group) through the service API and returns the answer.
///
/// # Panics
/// Unless the service answers 200.
#[allow(clippy::expect_used)]
pub async fn put_enrollment(server: &impl Instance, group: bool, id: &str, body: Value) -> Value {
    let path = if group { "enrollmentGroups" } else { "enrollments" };
    let r = server
        .client()
        .put(server.url(&format!("/{path}/{id}?api-version=2021-10-01")))
        .header("Authorization", server.service_token())
        .json(&body)
        .send()
        .await
        .expect("the service answers");
    let status = r.status();
    let v: Value = r.json().await.expect("a JSON answer");
    assert_eq!(status, 200, "{v}");
    v
}

/// Asserts the DPS error shape: status, `errorCode`, a tracking id, a message, a timestamp.
///
/// # Panics
/// When the body is not that error.
pub fn assert_dps_error(status: u16, body: &Value, expected_status: u16, expected_code: u64) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["errorCode"].as_u64(), Some(expected_code), "{body}");
    assert!(body["trackingId"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["message"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["timestampUtc"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
}

/// Serialises the tests that bind port 443 (the stock Node HTTP and service clients' only
/// port).
pub static PORT_443: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A service API call with the owner policy; returns (status, JSON body or Null).
///
/// # Panics
/// If the service does not answer.
#[allow(clippy::expect_used)]
pub async fn service(
    s: &impl Instance,
    method: reqwest::Method,
    path: &str,
    if_match: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = s.client().request(method, s.url(path)).header("Authorization", s.service_token());
    if let Some(m) = if_match {
        rb = rb.header("If-Match", m);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("the service answers");
    let st = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (st, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}

/// TLS to `port` on 127.0.0.1 as `localhost`, trusting only the server's CA, with a client
/// certificate when `identity` (certificate chain, key: PEM files) is given.
///
/// # Panics
/// If the connection or the handshake fails.
#[allow(clippy::expect_used)]
pub async fn tls_connect(
    s: &impl Instance,
    port: u16,
    identity: Option<(&Path, &Path)>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(s.ca_file()).expect("the CA file") {
        roots.add(c.expect("a CA certificate")).expect("a usable CA certificate");
    }
    let b =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => {
            let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
                .expect("the certificate file")
                .map(|c| c.expect("a certificate"))
                .collect();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).expect("the key file");
            b.with_client_auth_cert(chain, key).expect("a usable client certificate")
        }
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("the listener accepts");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(rustls_pki_types::ServerName::try_from("localhost").expect("a server name"), tcp)
        .await
        .expect("the TLS handshake")
}
