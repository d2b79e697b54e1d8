//! Starting and driving a real server process.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

/// Repository root (for examples/ and interop/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The facts `provisio serve --json` prints.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Info {
    pub id_scope: String,
    pub device_endpoint: String,
    pub https_endpoint: String,
    pub service_connection_string: String,
    pub ca_cert_file: Option<PathBuf>,
    pub linked_hubs: Vec<String>,
    pub mqtt_endpoint: Option<String>,
    #[serde(default)]
    pub amqp_endpoint: Option<String>,
}

impl Info {
    /// The owner policy key from the connection string.
    pub fn owner_key(&self) -> String {
        self.service_connection_string.split(';').find_map(|p| p.strip_prefix("SharedAccessKey=")).unwrap().to_owned()
    }
}

/// A running `provisio serve`.
pub struct Server {
    child: Option<Child>,
    pub info: Info,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts a server on `listen` with its state in `data_dir`, and waits until
    /// `/health` answers.
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let log =
            data_dir.join(format!("server-{}.log", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()));
        std::fs::create_dir_all(data_dir).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_provisio"))
            .args(["serve", "--json", "--data-dir"])
            .arg(data_dir)
            .args(["--https-listen", listen, "--hostname", "localhost", "--hostname", "127.0.0.1"])
            .args(if extra.contains(&"--mqtt-listen") { &[][..] } else { &["--mqtt-listen", "127.0.0.1:0"][..] })
            .args(if extra.contains(&"--amqp-listen") { &[][..] } else { &["--amqp-listen", "127.0.0.1:0"][..] })
            .args(extra)
            .env("PROVISIO_LOG", "info,provisio_server=debug")
            .env_remove("PROVISIO_CONFIG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn provisio");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        let info: Info = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad info line {line:?}: {e}"));
        let port = info.device_endpoint.rsplit_once(':').map_or(443, |(_, p)| p.parse().unwrap());
        let s = Self { child: Some(child), info, port, log };
        s.wait_healthy();
        s
    }

    fn wait_healthy(&self) {
        let client = self.client();
        let url = self.url("/health");
        // Its own thread and runtime: callers may already be inside a runtime.
        let ok = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            (0..100).any(|_| {
                let up = rt.block_on(async { client.get(&url).send().await }).is_ok_and(|r| r.status() == 200);
                if !up {
                    std::thread::sleep(Duration::from_millis(100));
                }
                up
            })
        })
        .join()
        .unwrap();
        assert!(ok, "server never became healthy; log:\n{}", self.log_text());
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("https://localhost:{}{path_and_query}", self.port)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.info.ca_cert_file.clone().expect("local CA")
    }

    /// A client that trusts only the instance's CA and resolves localhost to 127.0.0.1.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca_file()).unwrap()).unwrap();
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .resolve("localhost", ([127, 0, 0, 1], self.port).into())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// A service SAS token for the owner policy, made with our own signer.
    pub fn service_token(&self) -> String {
        provisio_core::sas::build_token(
            "localhost",
            &self.info.owner_key(),
            now() + 3600,
            Some("provisioningserviceowner"),
            provisio_core::sas::SrEncoding::Upper,
        )
        .unwrap()
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no shutdown of any kind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        for _ in 0..100 {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        c.kill().unwrap();
        panic!("server ignored SIGTERM for 10 s");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Runs a command and returns its stdout, panicking with its stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The walkthrough's SAS script.
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
pub fn walkthrough_derive(group_key: &str, registration_id: &str) -> String {
    run(Command::new("bash")
        .arg(repo_root().join("examples/walkthrough/derive-key.sh"))
        .args([group_key, registration_id]))
    .trim()
    .to_owned()
}

/// `curl` as the walkthrough runs it; returns (status, headers, body JSON or Null).
pub fn curl(server: &Server, method: &str, path: &str, auth: Option<&str>, body: Option<&str>) -> (u16, String, Value) {
    curl_with(server, method, path, auth, body, &[])
}

/// [`curl`] with extra arguments (e.g. `--cert`, `--key`).
pub fn curl_with(
    server: &Server,
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
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", server.port)])
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
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or(Value::String(body.into()))
    };
    (status, head.to_owned(), json)
}

/// Header value from a raw curl head, case-insensitive.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// PUTs a symmetric-key enrollment (or group) through the service API.
pub async fn put_enrollment(server: &Server, group: bool, id: &str, body: Value) -> Value {
    let path = if group { "enrollmentGroups" } else { "enrollments" };
    let r = server
        .client()
        .put(server.url(&format!("/{path}/{id}?api-version=2021-10-01")))
        .header("Authorization", server.service_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

/// Asserts the DPS error shape and returns the body.
pub fn assert_dps_error(status: u16, body: &Value, expected_status: u16, expected_code: u64) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["errorCode"].as_u64(), Some(expected_code), "{body}");
    assert!(body["trackingId"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["message"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["timestampUtc"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
}

/// Serialises the tests that bind port 443 (the stock Node HTTP transport's only port).
pub static PORT_443: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A service API call with the owner policy; returns (status, JSON body or Null).
pub async fn service(
    s: &Server,
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
    let r = rb.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    (st, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}

/// TLS to `port` on 127.0.0.1 as `localhost`, trusting only the server's CA, with a client
/// certificate when `identity` (certificate chain, key: PEM files) is given.
pub async fn tls_connect(
    s: &Server,
    port: u16,
    identity: Option<(&Path, &Path)>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(s.ca_file()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => {
            let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}
