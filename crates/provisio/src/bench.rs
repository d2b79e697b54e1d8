//! `provisio bench`: a load generator that starts its own server and measures
//! registrations per second, latency percentiles, errors and server RSS, next to baselines
//! measured in the same run (a bare TLS handshake, a trivial authenticated request), so
//! the results hold as ratios on a noisy machine.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use provisio_client::{Credential, Options, Transport};
use serde_json::{Value, json};

/// `provisio bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Devices registered per scenario (the trivial-request baseline makes four requests per
    /// device, so that it runs about as long as the others: a scenario of a fraction of a
    /// second measures warm-up, not the steady state).
    #[arg(long, default_value_t = 20_000)]
    devices: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Scenarios: handshake, trivial, https-keepalive, https-newconn, mqtt.
    #[arg(long, value_delimiter = ',', default_value = "handshake,trivial,https-keepalive,https-newconn,mqtt")]
    scenarios: Vec<String>,
    /// Individual enrollments loaded into the store before the server starts (scale test).
    #[arg(long, default_value_t = 0)]
    enrollments: usize,
    /// Hold this many idle MQTT connections at the end and report the server's RSS.
    #[arg(long, default_value_t = 0)]
    mqtt_hold: usize,
    /// Run the scenarios this many times, one after the other, and report each scenario's
    /// median and each ratio's median as well: on a shared or virtual machine one run's ratio
    /// can be off by a third, the median of alternating runs much less.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Use this PostgreSQL database instead of a fresh embedded one.
    #[arg(long)]
    database: Option<String>,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
}

struct Srv {
    child: Child,
    info: Value,
    _dir: tempfile::TempDir,
    startup: Duration,
    /// Spawn to the embedded store's key filter being built (the end of the server's start-up
    /// work: until then lookups of absent documents read the database); `None` with
    /// PostgreSQL, or if the log did not say so in time.
    filter_built: Option<Duration>,
}

impl Srv {
    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// CPU time the server process has used (user + system), in seconds.
    fn cpu_secs(&self) -> f64 {
        process_cpu_secs(&self.child.id().to_string())
    }

    fn s(&self, k: &str) -> String {
        self.info[k].as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &BenchArgs, dir: tempfile::TempDir) -> Result<Srv> {
    let exe = std::env::current_exe()?;
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--json", "--data-dir"])
        .arg(dir.path())
        .args([
            "--https-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--hostname",
            "localhost",
            "--hostname",
            "127.0.0.1",
        ])
        .args(["--amqp-listen", "off"])
        .args(["--linked-hub", "bench-hub.example.net", "--retry-after-secs", "0"])
        .env("PROVISIO_SERVICE_REQUESTS_PER_SECOND", "0")
        .env("PROVISIO_MAX_CONNECTIONS", "100000")
        // All load comes from 127.0.0.1 and polls at once: lift the per-IP and per-device limits.
        .env("PROVISIO_MAX_CONNECTIONS_PER_IP", "0")
        .env("PROVISIO_DEVICE_POLLS_PER_10S", "0")
        // The server logs at its default level (a log line costs CPU too; and the bench
        // waits for its "key filter is built" line), into a file rather than over the
        // progress bars.
        .env("PROVISIO_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if let Some(db) = &args.database {
        cmd.args(["--database", db]);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start the server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let Some(line) = BufReader::new(stdout).lines().next().transpose()? else {
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("the server did not start:\n{log}");
    };
    let info: Value = serde_json::from_str(&line).context("bad info line")?;
    let startup = started.elapsed();
    // The scenarios measure the steady state: with many documents in the store (see
    // `--enrollments`) the filter's scan would otherwise run inside the first scenario.
    let filter_built = if args.database.is_none() {
        let deadline = started + Duration::from_secs(60);
        loop {
            if std::fs::read_to_string(&log_path).unwrap_or_default().contains("key filter is built") {
                break Some(started.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    } else {
        None
    };
    Ok(Srv { child, info, _dir: dir, startup, filter_built })
}

/// CPU time (user + system, all threads) of process `pid` (or `self`), in seconds.
fn process_cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ").map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ") ".
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks_per_sec()
}

/// The CPU counters at the start of a scenario; [`Probe::row`] turns a run into its [`Row`].
struct Probe {
    server: f64,
    client: f64,
}

impl Probe {
    fn start(srv: &Srv) -> Self {
        Self { server: srv.cpu_secs(), client: process_cpu_secs("self") }
    }

    fn row(self, srv: &Srv, scenario: &str, attestation: &str, ops: usize, d: Driven) -> Row {
        Row {
            scenario: scenario.into(),
            attestation: attestation.into(),
            ops,
            errors: d.errors,
            secs: d.secs,
            first: d.first,
            total: d.total,
            rss_mb: srv.rss_mb(),
            server_cpu_secs: srv.cpu_secs() - self.server,
            client_cpu_secs: process_cpu_secs("self") - self.client,
            first_error: d.first_error,
        }
    }
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux the benchmark runs on (the kernel's
/// USER_HZ is fixed at 100 for the /proc interface).
fn clock_ticks_per_sec() -> f64 {
    100.0
}

/// One scenario's measurements.
#[derive(Debug, Default, Clone)]
struct Row {
    scenario: String,
    attestation: String,
    ops: usize,
    errors: usize,
    secs: f64,
    first: Vec<u32>,
    total: Vec<u32>,
    rss_mb: f64,
    /// CPU the server used during the scenario.
    server_cpu_secs: f64,
    /// CPU the load generator (this process) used during the scenario.
    client_cpu_secs: f64,
    first_error: Option<String>,
}

impl Row {
    fn rate(&self) -> f64 {
        (self.ops - self.errors) as f64 / self.secs.max(1e-9)
    }

    /// Server CPU per successful operation, in microseconds: what one operation costs the
    /// server, whatever the load generator beside it costs.
    fn server_us(&self) -> f64 {
        self.server_cpu_secs * 1e6 / ((self.ops - self.errors).max(1) as f64)
    }

    /// The load generator's CPU per successful operation, in microseconds.
    fn client_us(&self) -> f64 {
        self.client_cpu_secs * 1e6 / ((self.ops - self.errors).max(1) as f64)
    }
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i.min(v.len() - 1)]) / 1000.0
}

/// What [`drive`] measured: per-job latencies in µs, errors, elapsed seconds.
struct Driven {
    first: Vec<u32>,
    total: Vec<u32>,
    errors: usize,
    secs: f64,
    first_error: Option<String>,
}

/// Runs `n` jobs on `c` workers with a progress bar; each job returns (first, total) µs.
async fn drive<F, Fut>(label: &str, n: usize, c: usize, job: F) -> Driven
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(u32, u32), String>> + Send,
{
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{label:>28} {{bar:30}} {{pos}}/{{len}} {{per_sec}}"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let job = Arc::new(job);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..c.max(1) {
        let (job, next, bar) = (job.clone(), next.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let (mut first, mut total, mut errors, mut err) = (Vec::new(), Vec::new(), 0usize, None);
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match job(i, worker).await {
                    Ok((f, t)) => {
                        first.push(f);
                        total.push(t);
                    }
                    Err(e) => {
                        errors += 1;
                        err.get_or_insert(e);
                    }
                }
                bar.inc(1);
            }
            (first, total, errors, err)
        }));
    }
    let (mut first, mut total, mut errors, mut err) = (Vec::new(), Vec::new(), 0, None);
    for t in tasks {
        if let Ok((f, tt, e, m)) = t.await {
            first.extend(f);
            total.extend(tt);
            errors += e;
            if err.is_none() {
                err = m;
            }
        }
    }
    bar.finish_and_clear();
    Driven { first, total, errors, secs: started.elapsed().as_secs_f64(), first_error: err }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The client TLS configuration of a simulated device: the instance's CA, the device
/// certificate for X.509. Session resumption is off: every device is a different client,
/// so each handshake is a full one, in the baseline as in the scenarios.
fn tls_config(ca: &str, device: Option<(&str, &str)>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut cfg = match device {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(key.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// One device's registration over HTTPS on a new connection, with the same client stack
/// as the handshake baseline (tokio-rustls, then hyper's HTTP/1.1 client on that
/// connection), so that the ratio of the two measures the server and not the client
/// library: `PUT …/register`, then `GET …/operations/{id}` until `assigned`.
/// Returns (register, register→assigned) in µs.
async fn https_device(
    cfg: Arc<rustls::ClientConfig>,
    port: u16,
    scope: &str,
    id: &str,
    token: Option<&str>,
) -> Result<(u32, u32), String> {
    use http_body_util::{BodyExt, Full};
    let t0 = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let request = |method: &str, path: String, body: String| {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(format!("/{scope}/registrations/{id}{path}?api-version=2021-06-01"))
            .header("host", "localhost")
            .header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", t);
        }
        b.body(Full::new(bytes::Bytes::from(body))).map_err(|e| e.to_string())
    };
    let mut exchange = async |req: hyper::Request<Full<bytes::Bytes>>| -> Result<(u16, Value), String> {
        let r = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let body = r.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, serde_json::from_slice(&body).map_err(|e| format!("HTTP {status}: {e}"))?))
    };
    let (status, v) = exchange(request("PUT", "/register".into(), format!("{{\"registrationId\":\"{id}\"}}"))?).await?;
    if status != 202 {
        return Err(format!("register: HTTP {status}: {v}"));
    }
    let first = micros(t0.elapsed());
    let op = v["operationId"].as_str().unwrap_or_default().to_owned();
    loop {
        let (status, v) = exchange(request("GET", format!("/operations/{op}"), String::new())?).await?;
        match (status, v["status"].as_str()) {
            (200 | 202, Some("assigned")) => break,
            (200 | 202, Some("assigning")) => {}
            _ => return Err(format!("poll: HTTP {status}: {v}")),
        }
    }
    drop(sender);
    let _ = conn.await;
    Ok((first, micros(t0.elapsed())))
}

/// What every round works with: the server and what the set-up made on it.
struct Setup {
    srv: Srv,
    https_port: u16,
    /// `localhost:{port}`, for clients that check the server's name.
    https: String,
    /// The MQTT endpoint by address.
    mqtt_by_ip: String,
    scope: String,
    /// The server's CA certificate (PEM).
    ca: String,
    /// A service SAS token of the owner policy.
    svc_token: String,
    /// The symmetric-key group's primary key.
    gk: String,
    /// The root of the X.509 group.
    root: provisio_pki::CertAndKey,
    /// A TLS client configuration without a client certificate.
    cfg: Arc<rustls::ClientConfig>,
}

/// One round: every selected scenario once, with device ids carrying `tag`.
#[allow(clippy::too_many_lines)]
async fn run_round(setup: &Setup, args: &BenchArgs, tag: &str) -> Result<Vec<Row>> {
    let Setup { srv, https_port, https, mqtt_by_ip, scope, ca, svc_token, gk, root, cfg } = setup;
    let (https_port, tag) = (*https_port, tag.to_owned());
    let (n, c) = (args.devices, args.concurrency);
    let has = |s: &str| args.scenarios.iter().any(|x| x == s);
    let mut rows: Vec<Row> = Vec::new();
    if has("handshake") {
        let cfg = cfg.clone();
        let probe = Probe::start(srv);
        let d = drive("bare TLS handshake", n, c, move |_, _| {
            let cfg = cfg.clone();
            async move {
                let t0 = Instant::now();
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", https_port)).await.map_err(|e| e.to_string())?;
                let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
                let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| e.to_string())?;
                drop(tls);
                let d = micros(t0.elapsed());
                Ok((d, d))
            }
        })
        .await;
        rows.push(probe.row(srv, "baseline: TLS handshake", "-", n, d));
    }
    if has("trivial") {
        let clients: Vec<reqwest::Client> =
            (0..c.max(1)).map(|_| keepalive_client(ca, https_port, None)).collect::<Result<_>>()?;
        let clients = Arc::new(clients);
        let url = format!("https://{https}/linkedHubs?api-version=2021-10-01");
        let tok = svc_token.clone();
        let probe = Probe::start(srv);
        let d = drive("baseline: trivial request", n * 4, c, move |_, worker| {
            let (clients, url, tok) = (clients.clone(), url.clone(), tok.clone());
            async move {
                let t0 = Instant::now();
                // Each worker keeps its own connection: truly kept alive.
                let r =
                    clients[worker].get(&url).header("Authorization", tok).send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("HTTP {}", r.status()));
                }
                let _ = r.bytes().await;
                let d = micros(t0.elapsed());
                Ok((d, d))
            }
        })
        .await;
        rows.push(probe.row(srv, "baseline: trivial authenticated request", "-", n * 4, d));
    }
    if has("https-keepalive") {
        let clients: Vec<reqwest::Client> =
            (0..c.max(1)).map(|_| keepalive_client(ca, https_port, None)).collect::<Result<_>>()?;
        let clients = Arc::new(clients);
        let (scope2, gk2, https2, tag2) = (scope.clone(), gk.clone(), https.clone(), tag.clone());
        let probe = Probe::start(srv);
        let d = drive("https keep-alive, sym key", n, c, move |i, worker| {
            let (clients, scope, gk, https) = (clients.clone(), scope2.clone(), gk2.clone(), https2.clone());
            let id = format!("ka-{tag2}{i}");
            async move {
                let tok = group_device_token(&scope, &gk, &id)?;
                keepalive_registration(&clients[worker], &https, &scope, &id, Some(&tok)).await
            }
        })
        .await;
        rows.push(probe.row(srv, "HTTPS, keep-alive", "symmetric key (group)", n, d));
        // X.509 on a kept-alive connection: the connection carries one device's certificate,
        // so each worker is one device that registers again and again on its connection
        // (re-provisioning), attested by its certificate chain every time.
        let clients: Vec<reqwest::Client> = (0..c.max(1))
            .map(|w| {
                let d = device_cert(root, &format!("ka-x-{w}"))?;
                keepalive_client(ca, https_port, Some(&format!("{}{}", d.cert_pem, d.key_pem)))
            })
            .collect::<Result<_>>()?;
        let clients = Arc::new(clients);
        let (scope2, https2) = (scope.clone(), https.clone());
        let probe = Probe::start(srv);
        let d =
            drive("https keep-alive, x509", n, c, move |_, worker| {
                let (clients, scope, https) = (clients.clone(), scope2.clone(), https2.clone());
                async move {
                    keepalive_registration(&clients[worker], &https, &scope, &format!("ka-x-{worker}"), None).await
                }
            })
            .await;
        rows.push(probe.row(srv, "HTTPS, keep-alive (a device re-registering)", "X.509 (group)", n, d));
    }
    for (name, transport, endpoint) in
        // By address, as the handshake baseline connects: a name lookup per device is the
        // load generator's cost, not the server's.
        [
            ("https-newconn", Transport::Https, format!("127.0.0.1:{https_port}")),
            ("mqtt", Transport::Mqtt, mqtt_by_ip.clone()),
        ]
    {
        if !has(name) {
            continue;
        }
        for x509 in [false, true] {
            // Each device's TLS configuration is made before the clock starts, as a device
            // has its own in flash; the certificates are issued here too.
            let certs: Arc<Vec<(String, String, Arc<rustls::ClientConfig>)>> = Arc::new(if x509 {
                (0..n)
                    .map(|i| {
                        let d = device_cert(root, &format!("{name}-x-{tag}{i}"))?;
                        let tls = tls_config(ca, Some((&d.cert_pem, &d.key_pem)))?;
                        Ok((d.cert_pem, d.key_pem, tls))
                    })
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            });
            let (scope2, gk2, ep, cfg2) = (scope.clone(), gk.clone(), endpoint.clone(), cfg.clone());
            let name2 = format!("{name}-{}", if x509 { "x" } else { "s" });
            let tag2 = tag.clone();
            let label = format!("{name}, {}", if x509 { "x509" } else { "sym key" });
            let probe = Probe::start(srv);
            let d = drive(&label, n, c, move |i, _| {
                let (scope, gk, ep, cfg, certs) =
                    (scope2.clone(), gk2.clone(), ep.clone(), cfg2.clone(), certs.clone());
                // As the certificates above were issued: `{scenario}-{x|s}-{round tag}{i}`.
                let id = format!("{name2}-{tag2}{i}");
                async move {
                    if transport == Transport::Https {
                        return if x509 {
                            https_device(certs[i].2.clone(), https_port, &scope, &id, None).await
                        } else {
                            let tok = group_device_token(&scope, &gk, &id)?;
                            https_device(cfg, https_port, &scope, &id, Some(&tok)).await
                        };
                    }
                    let (id, cred, tls) = if x509 {
                        let (c, k, tls) = certs[i].clone();
                        (id, Credential::X509 { chain_pem: c, key_pem: k }, tls)
                    } else {
                        (id, Credential::GroupKey(gk), cfg)
                    };
                    let mut o = Options::new(scope, id, cred);
                    o.endpoint = ep;
                    o.transport = transport;
                    o.tls = Some(tls);
                    o.min_poll_delay = Duration::ZERO;
                    o.timeout = Duration::from_secs(30);
                    let t0 = Instant::now();
                    let mut first = 0;
                    provisio_client::register(&o, |p| {
                        if matches!(p, provisio_client::Progress::Assigning { .. }) && first == 0 {
                            first = micros(t0.elapsed());
                        }
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    Ok((first, micros(t0.elapsed())))
                }
            })
            .await;
            let scenario = if transport == Transport::Https {
                "HTTPS, new TLS connection per device"
            } else {
                "MQTT, a connection per device"
            };
            rows.push(probe.row(srv, scenario, if x509 { "X.509 (group)" } else { "symmetric key (group)" }, n, d));
        }
    }
    Ok(rows)
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    if args.enrollments > 0 {
        if args.database.is_some() {
            bail!("--enrollments preloads the embedded store only");
        }
        preload(dir.path(), args.enrollments).await?;
    }
    let srv = start_server(&args, dir)?;
    let https_port: u16 = srv.s("deviceEndpoint").rsplit_once(':').and_then(|(_, p)| p.parse().ok()).context("port")?;
    let https = format!("localhost:{https_port}");
    let mqtt = srv.s("mqttEndpoint");
    let mqtt_by_ip = format!("127.0.0.1:{}", mqtt.rsplit_once(':').map_or("8883", |(_, p)| p));
    let scope = srv.s("idScope");
    let ca = std::fs::read_to_string(srv.s("caCertFile"))?;
    let cs = srv.s("serviceConnectionString");
    let owner_key = cs.split("SharedAccessKey=").nth(1).context("key")?.to_owned();
    let svc_token = provisio_core::sas::build_token(
        "localhost",
        &owner_key,
        now() + 36_000,
        Some("provisioningserviceowner"),
        provisio_core::sas::SrEncoding::Upper,
    )?;
    let reqw = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
        .resolve("localhost", ([127, 0, 0, 1], https_port).into())
        .build()?;
    // A symmetric-key group and an X.509 group with one device certificate per device.
    let group: Value = reqw
        .put(format!("https://{https}/enrollmentGroups/bench-sym?api-version=2021-10-01"))
        .header("Authorization", &svc_token)
        .json(&json!({"enrollmentGroupId": "bench-sym", "attestation": {"type": "symmetricKey"}}))
        .send()
        .await?
        .json()
        .await?;
    let gk = group["attestation"]["symmetricKey"]["primaryKey"].as_str().context("group key")?.to_owned();
    let root = provisio_pki::testcerts::issue(
        provisio_pki::testcerts::Role::Root,
        "bench-root",
        None,
        provisio_pki::testcerts::KeyKind::EcdsaP256,
        2,
    )?;
    reqw.put(format!("https://{https}/enrollmentGroups/bench-x509?api-version=2021-10-01"))
        .header("Authorization", &svc_token)
        .json(&json!({"enrollmentGroupId": "bench-x509", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root.cert_pem}}}}}))
        .send()
        .await?
        .error_for_status()?;

    let cfg = tls_config(&ca, None)?;
    let setup = Setup { srv, https_port, https, mqtt_by_ip, scope, ca, svc_token, gk, root, cfg };

    let mut rounds: Vec<Vec<Row>> = Vec::new();
    for round in 0..args.rounds {
        if args.rounds > 1 {
            println!("round {} of {}", round + 1, args.rounds);
        }
        // Every round registers devices of its own (a registration id taken in an earlier
        // round would make a re-registration).
        let tag = if args.rounds > 1 { format!("r{round}-") } else { String::new() };
        let mut rows = run_round(&setup, &args, &tag).await?;
        print_rows(&mut rows);
        print_ratios(&rows);
        if args.rounds > 1 {
            println!();
        }
        rounds.push(rows);
    }

    let held =
        if args.mqtt_hold > 0 { Some(hold_mqtt(&setup.srv, &mqtt, &setup.cfg, args.mqtt_hold).await?) } else { None };
    report(&args, &setup.srv, &rounds, held);
    Ok(())
}

/// A client that keeps one connection alive; `identity` (certificate and key, PEM) for X.509.
fn keepalive_client(ca: &str, port: u16, identity: Option<&str>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .http1_only()
        .pool_max_idle_per_host(1);
    if let Some(pem) = identity {
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes())?);
    }
    Ok(b.build()?)
}

/// One registration on a kept-alive connection: `PUT …/register`, then one
/// `GET …/operations/{id}` that must answer `assigned` (the server is started with
/// `--retry-after-secs 0`). Returns (register, register→assigned) in µs.
async fn keepalive_registration(
    client: &reqwest::Client,
    https: &str,
    scope: &str,
    id: &str,
    token: Option<&str>,
) -> Result<(u32, u32), String> {
    let t0 = Instant::now();
    let mut put = client
        .put(format!("https://{https}/{scope}/registrations/{id}/register?api-version=2021-06-01"))
        .header("Content-Type", "application/json")
        .body(format!("{{\"registrationId\":\"{id}\"}}"));
    if let Some(t) = token {
        put = put.header("Authorization", t);
    }
    let r = put.send().await.map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(format!("register: HTTP {}: {}", r.status(), r.text().await.unwrap_or_default()));
    }
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    let first = micros(t0.elapsed());
    let op = v["operationId"].as_str().unwrap_or_default().to_owned();
    let mut get =
        client.get(format!("https://{https}/{scope}/registrations/{id}/operations/{op}?api-version=2021-06-01"));
    if let Some(t) = token {
        get = get.header("Authorization", t);
    }
    let v: Value = get.send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
    if v["status"] != "assigned" {
        return Err(format!("poll: {v}"));
    }
    Ok((first, micros(t0.elapsed())))
}

/// A device certificate (ECDSA P-256, CN = `id`) signed by the X.509 group's root.
fn device_cert(root: &provisio_pki::CertAndKey, id: &str) -> Result<provisio_pki::CertAndKey> {
    Ok(provisio_pki::testcerts::issue(
        provisio_pki::testcerts::Role::Device,
        id,
        Some(root),
        provisio_pki::testcerts::KeyKind::EcdsaP256,
        2,
    )?)
}

/// The SAS token a device of the symmetric-key group signs with its derived key, as a
/// device computes it at run time (so the load generator pays for it in every scenario).
fn group_device_token(scope: &str, group_key: &str, id: &str) -> Result<String, String> {
    let key = provisio_core::keys::derive_device_key(group_key, id).map_err(|e| e.to_string())?;
    provisio_core::sas::build_token(
        &format!("{scope}/registrations/{id}"),
        &key,
        now() + 3600,
        None,
        provisio_core::sas::SrEncoding::Raw,
    )
    .map_err(|e| e.to_string())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Opens `n` idle MQTT connections (TLS + CONNECT) and reports the server's RSS.
async fn hold_mqtt(srv: &Srv, endpoint: &str, cfg: &Arc<rustls::ClientConfig>, n: usize) -> Result<(usize, f64, f64)> {
    use rumqttc::mqttbytes::v4::{Connect, Login, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port: u16 = endpoint.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).context("mqtt port")?;
    let before = srv.rss_mb();
    let bar = indicatif::ProgressBar::new(n as u64);
    let mut conns = Vec::with_capacity(n);
    let scope = srv.s("idScope");
    for i in 0..n {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
            .await?;
        let mut c = Connect::new(format!("hold-{i}"));
        c.keep_alive = 600;
        c.login = Some(Login::new(format!("{scope}/registrations/hold-{i}/api-version=2019-03-31"), ""));
        let mut b = bytes::BytesMut::new();
        Packet::Connect(c).write(&mut b, 1 << 16)?;
        tls.write_all(&b).await?;
        let mut ack = [0u8; 4];
        tls.read_exact(&mut ack).await?;
        conns.push(tls);
        bar.inc(1);
    }
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = srv.rss_mb();
    Ok((conns.len(), before, after))
}

/// Prints a round's table (and each scenario's first error).
fn print_rows(rows: &mut [Row]) {
    println!(
        "| scenario | attestation | devices | errors | registrations/s | register p50 / p99 / max (ms) | register→assigned p50 / p99 / max (ms) | server RSS (MB) | server CPU per op (µs) | load generator CPU per op (µs) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows.iter_mut() {
        let (f50, f99, fmax) = (pct(&mut r.first, 0.5), pct(&mut r.first, 0.99), pct(&mut r.first, 1.0));
        let (t50, t99, tmax) = (pct(&mut r.total, 0.5), pct(&mut r.total, 0.99), pct(&mut r.total, 1.0));
        println!(
            "| {} | {} | {} | {} | {:.0} | {f50:.2} / {f99:.2} / {fmax:.2} | {t50:.2} / {t99:.2} / {tmax:.2} | {:.0} | {:.0} | {:.0} |",
            r.scenario,
            r.attestation,
            r.ops,
            r.errors,
            r.rate(),
            r.rss_mb,
            r.server_us(),
            r.client_us()
        );
        if let Some(e) = &r.first_error {
            eprintln!("  first error in '{}': {e}", r.scenario);
        }
    }
}

/// A row as JSON (its latency vectors sorted by [`print_rows`] already).
fn row_json(round: usize, r: &mut Row) -> Value {
    let (f50, f99, fmax) = (pct(&mut r.first, 0.5), pct(&mut r.first, 0.99), pct(&mut r.first, 1.0));
    let (t50, t99, tmax) = (pct(&mut r.total, 0.5), pct(&mut r.total, 0.99), pct(&mut r.total, 1.0));
    json!({"round": round + 1, "scenario": r.scenario, "attestation": r.attestation, "ops": r.ops, "errors": r.errors, "rate": r.rate(),
        "p50": f50, "p99": f99, "max": fmax, "total_p50": t50, "total_p99": t99, "total_max": tmax, "rss_mb": r.rss_mb,
        "server_cpu_us": r.server_us(), "client_cpu_us": r.client_us()})
}

/// The ratios of a round, in percent: by rate (what the targets are stated in), then by
/// the server's own CPU (which the load generator beside it does not distort).
fn ratios(rows: &[Row]) -> Vec<(String, f64)> {
    let find = |s: &str, a: &str| rows.iter().find(|r| r.scenario.starts_with(s) && r.attestation.starts_with(a));
    let mut out = Vec::new();
    if let (Some(ka), Some(tr)) = (find("HTTPS, keep-alive", "symmetric"), find("baseline: trivial", "-")) {
        out.push(("keep-alive registrations / trivial requests".to_owned(), 100.0 * ka.rate() / tr.rate().max(1e-9)));
        out.push((
            "by server CPU: keep-alive registrations / trivial requests".to_owned(),
            100.0 * tr.server_us() / ka.server_us().max(1e-9),
        ));
    }
    if let Some(hs) = find("baseline: TLS handshake", "-") {
        for a in ["symmetric", "X.509"] {
            if let Some(nc) = find("HTTPS, new TLS", a) {
                out.push((
                    format!("new-connection registrations ({a}) / bare handshakes"),
                    100.0 * nc.rate() / hs.rate().max(1e-9),
                ));
                out.push((
                    format!("by server CPU: new-connection registrations ({a}) / bare handshakes"),
                    100.0 * hs.server_us() / nc.server_us().max(1e-9),
                ));
            }
        }
    }
    out
}

/// Prints a round's ratios, with what each costs in the server's CPU.
fn print_ratios(rows: &[Row]) {
    println!();
    for (name, pct) in ratios(rows).iter().filter(|(n, _)| !n.starts_with("by server CPU")) {
        let note = if name.starts_with("keep-alive") { " (ceiling 50%: a registration is two requests)" } else { "" };
        println!("{name}: {pct:.1}%{note}");
    }
    let cpu = |s: &str, a: &str| {
        rows.iter().find(|r| r.scenario.starts_with(s) && r.attestation.starts_with(a)).map(Row::server_us)
    };
    if let (Some(ka), Some(tr)) = (cpu("HTTPS, keep-alive", "symmetric"), cpu("baseline: trivial", "-")) {
        println!(
            "by server CPU: a keep-alive registration costs {ka:.0} µs = {:.1} trivial requests ({:.0} registrations/s per server core)",
            ka / tr.max(1e-9),
            1e6 / ka.max(1e-9)
        );
    }
    if let Some(hs) = cpu("baseline: TLS handshake", "-") {
        for a in ["symmetric", "X.509"] {
            if let Some(nc) = cpu("HTTPS, new TLS", a) {
                println!(
                    "by server CPU: a new-connection registration ({a}) costs {nc:.0} µs = {:.2} bare handshakes ({:.1}% of the handshake rate)",
                    nc / hs.max(1e-9),
                    100.0 * hs / nc.max(1e-9)
                );
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Across rounds: each scenario's rate and CPU per round with their medians, and each
/// ratio's.
fn print_medians(rounds: &[Vec<Row>]) -> Value {
    println!("medians of {} rounds", rounds.len());
    println!(
        "| scenario | attestation | registrations/s per round | median | server CPU per op (µs), median | load generator CPU per op (µs), median |"
    );
    println!("|---|---|---|---|---|---|");
    let mut scenarios = Vec::new();
    for r in rounds.first().map_or(&[][..], Vec::as_slice) {
        let same: Vec<&Row> = rounds
            .iter()
            .filter_map(|rs| rs.iter().find(|x| x.scenario == r.scenario && x.attestation == r.attestation))
            .collect();
        let rates: Vec<f64> = same.iter().map(|x| x.rate()).collect();
        let (rate, server, client) = (
            median(rates.clone()),
            median(same.iter().map(|x| x.server_us()).collect()),
            median(same.iter().map(|x| x.client_us()).collect()),
        );
        let each: Vec<String> = rates.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "| {} | {} | {} | {rate:.0} | {server:.0} | {client:.0} |",
            r.scenario,
            r.attestation,
            each.join(", ")
        );
        scenarios.push(json!({"scenario": r.scenario, "attestation": r.attestation, "rates": rates, "rate": rate, "server_cpu_us": server, "client_cpu_us": client}));
    }
    println!();
    let per_round: Vec<Vec<(String, f64)>> = rounds.iter().map(|rs| ratios(rs)).collect();
    let mut out = Vec::new();
    for (i, (name, _)) in per_round.first().map_or(&[][..], Vec::as_slice).iter().enumerate() {
        let values: Vec<f64> = per_round.iter().filter_map(|r| r.get(i).map(|(_, v)| *v)).collect();
        let each: Vec<String> = values.iter().map(|v| format!("{v:.1}%")).collect();
        let m = median(values.clone());
        println!("{name}: median {m:.1}% ({})", each.join(", "));
        out.push(json!({"ratio": name, "per_round": values, "median": m}));
    }
    json!({"scenarios": scenarios, "ratios": out})
}

fn report(args: &BenchArgs, srv: &Srv, rounds: &[Vec<Row>], held: Option<(usize, f64, f64)>) {
    let medians = (rounds.len() > 1).then(|| print_medians(rounds));
    println!(
        "server startup (spawn to ready, {} preloaded enrollments): {:.0} ms{}",
        args.enrollments,
        srv.startup.as_secs_f64() * 1000.0,
        match (args.database.is_none(), srv.filter_built) {
            (true, Some(t)) => format!("; its key filter built {:.0} ms after spawn", t.as_secs_f64() * 1000.0),
            (true, None) => "; its key filter not built within 60 s".to_owned(),
            (false, _) => String::new(),
        }
    );
    if let Some((n, before, after)) = held {
        println!("{n} idle MQTT connections held: server RSS {before:.0} MB -> {after:.0} MB");
    }
    if args.json {
        let mut rows = Vec::new();
        let mut ratios_json = Vec::new();
        for (i, round) in rounds.iter().enumerate() {
            for r in round {
                rows.push(row_json(i, &mut r.clone()));
            }
            ratios_json.push(json!(
                ratios(round).into_iter().map(|(n, v)| json!({"ratio": n, "percent": v})).collect::<Vec<_>>()
            ));
        }
        println!(
            "{}",
            json!({"rows": rows, "ratios": ratios_json, "medians": medians, "startup_ms": srv.startup.as_millis() as u64, "filter_built_ms": srv.filter_built.map(|t| t.as_millis() as u64), "enrollments": args.enrollments, "held_mqtt": held.map(|h| json!({"connections": h.0, "rss_before_mb": h.1, "rss_after_mb": h.2}))})
        );
    }
}

/// Writes `n` individual symmetric-key enrollments straight into a fresh embedded store.
async fn preload(dir: &std::path::Path, n: usize) -> Result<()> {
    use provisio_store::{Collection, Store};
    let store = provisio_store::SqliteStore::open(&dir.join(provisio_server::DATABASE_FILE)).await?;
    let key = provisio_core::keys::generate_key();
    let bar = indicatif::ProgressBar::new(n as u64);
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let e = provisio_core::model::Enrollment {
            registration_id: format!("pre-{i:07}"),
            device_id: None,
            attestation: provisio_core::model::Attestation::SymmetricKey {
                primary_key: key.clone(),
                secondary_key: key.clone(),
            },
            settings: provisio_core::model::EnrollmentSettings { enabled: true, ..Default::default() },
            optional_device_information: None,
            created: provisio_core::timefmt::now(),
            updated: provisio_core::timefmt::now(),
        };
        batch.push((e.registration_id.clone(), serde_json::to_string(&e)?));
        if batch.len() == 10_000 || i + 1 == n {
            store.import(Collection::Enrollments, &batch).await?;
            bar.inc(batch.len() as u64);
            batch.clear();
        }
    }
    bar.finish_and_clear();
    store.close().await;
    Ok(())
}
