//! `provisio-bench`: Provisio's load generator, as `redis-benchmark` is to `redis-server`.
//! It starts a `provisio serve` of its own and measures registrations per second, latency
//! percentiles, errors and server RSS and CPU, next to baselines measured in the same run
//! (a bare TLS handshake, a trivial authenticated request), so the results hold as ratios
//! on a noisy machine.
//!
//! [`run`] prints what it measures (a Markdown table per round, the ratios, their medians,
//! with `--json` one JSON object) and returns it as a [`Report`].

pub mod console;
mod report;
mod server;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use provisio_client::{Credential, Options, Transport};
pub use report::{HeldMqtt, Latency, Medians, Ratio, RatioMedian, Report, Round, Row, ScenarioMedian};
use serde_json::{Value, json};
use server::{Srv, process_cpu_secs};

/// `provisio-bench` options.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "provisio-bench", version, about, long_about = None)]
pub struct BenchArgs {
    /// Devices registered per scenario (the trivial-request baseline makes four requests per
    /// device, so that it runs about as long as the others: a scenario of a fraction of a
    /// second measures warm-up, not the steady state).
    #[arg(long, default_value_t = 20_000)]
    pub devices: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Scenarios: handshake, trivial, https-keepalive, https-csr, https-newconn, mqtt.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "handshake,trivial,https-keepalive,https-csr,https-newconn,mqtt"
    )]
    pub scenarios: Vec<String>,
    /// Individual enrollments loaded into the store before the server starts (scale test).
    #[arg(long, default_value_t = 0)]
    pub enrollments: usize,
    /// Hold this many idle MQTT connections at the end and report the server's RSS.
    #[arg(long, default_value_t = 0)]
    pub mqtt_hold: usize,
    /// Run the scenarios this many times, one after the other, and report each scenario's
    /// median and each ratio's median as well: on a shared or virtual machine one run's ratio
    /// can be off by a third, the median of alternating runs much less.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Use this PostgreSQL database instead of a fresh embedded one.
    #[arg(long)]
    pub database: Option<String>,
    /// The `provisio` executable to start as the server [default: `provisio` next to this
    /// executable, else on PATH].
    #[arg(long, value_name = "PATH")]
    pub server: Option<PathBuf>,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
    /// Instead of the registration scenarios, measure the web console's pages on stores
    /// preloaded with these numbers of enrollments, the first being the baseline
    /// (e.g. `100,100000`).
    #[arg(long, value_delimiter = ',', value_name = "N,N")]
    pub console_pages: Vec<usize>,
    /// Requests per page with `--console-pages`.
    #[arg(long, default_value_t = 200)]
    pub console_requests: usize,
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

    fn row(self, srv: &Srv, scenario: &str, attestation: &str, d: Driven) -> Row {
        // The counters first: sorting the latencies is the report's work, not the scenario's.
        let rss_mb = srv.rss_mb();
        let server_cpu_secs = srv.cpu_secs() - self.server;
        let client_cpu_secs = process_cpu_secs("self") - self.client;
        let Driven { mut first, mut total, ops, succeeded, secs, first_error } = d;
        Row {
            scenario: scenario.into(),
            attestation: attestation.into(),
            ops,
            succeeded,
            errors: ops - succeeded,
            secs,
            register: Latency::of(&mut first),
            assigned: Latency::of(&mut total),
            rss_mb,
            server_cpu_secs,
            client_cpu_secs,
            first_error,
        }
    }
}

/// What [`drive`] measured: the latencies (µs) of the jobs that succeeded, how many ran and
/// how many succeeded, elapsed seconds.
struct Driven {
    first: Vec<u32>,
    total: Vec<u32>,
    ops: usize,
    /// Jobs that returned `Ok`, counted one by one; every other job is an error.
    succeeded: usize,
    secs: f64,
    first_error: Option<String>,
}

/// What one worker of [`drive`] brings back.
#[derive(Default)]
struct WorkerResult {
    first: Vec<u32>,
    total: Vec<u32>,
    first_error: Option<String>,
}

/// The message of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned())
}

/// Runs `n` jobs on `c` workers with a progress bar; each job returns (first, total) µs.
///
/// A job counts as succeeded only when it returned `Ok`; everything else is an error: a job
/// that returned `Err` or panicked (the worker goes on with the next one), and, should a
/// worker itself die, every job whose success it can no longer report.
async fn drive<F, Fut>(label: &str, n: usize, c: usize, job: F) -> Driven
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(u32, u32), String>> + Send,
{
    use futures_util::FutureExt;
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
            let mut out = WorkerResult::default();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match std::panic::AssertUnwindSafe(async { job(i, worker).await }).catch_unwind().await {
                    Ok(Ok((f, t))) => {
                        out.first.push(f);
                        out.total.push(t);
                    }
                    Ok(Err(e)) => {
                        out.first_error.get_or_insert(e);
                    }
                    Err(panic) => {
                        out.first_error.get_or_insert_with(|| format!("job {i} panicked: {}", panic_message(&*panic)));
                    }
                }
                bar.inc(1);
            }
            out
        }));
    }
    let (mut first, mut total, mut err, mut crash) = (Vec::new(), Vec::new(), None, None);
    for (worker, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(w) => {
                first.extend(w.first);
                total.extend(w.total);
                if err.is_none() {
                    err = w.first_error;
                }
            }
            // Its results are lost with it: its jobs are not counted as succeeded.
            Err(e) => {
                crash.get_or_insert_with(|| match e.try_into_panic() {
                    Ok(panic) => format!("worker {worker} panicked: {}", panic_message(&*panic)),
                    Err(e) => format!("worker {worker} did not finish: {e}"),
                });
            }
        }
    }
    bar.finish_and_clear();
    let succeeded = total.len();
    Driven { first, total, ops: n, succeeded, secs: started.elapsed().as_secs_f64(), first_error: crash.or(err) }
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
    /// The primary key of the symmetric-key group that issues certificates (`https-csr`).
    gk_csr: String,
    /// The root of the X.509 group.
    root: provisio_pki::CertAndKey,
    /// A TLS client configuration without a client certificate.
    cfg: Arc<rustls::ClientConfig>,
}

/// One round: every selected scenario once, with device ids carrying `tag`.
#[allow(clippy::too_many_lines)]
async fn run_round(setup: &Setup, args: &BenchArgs, tag: &str) -> Result<Vec<Row>> {
    let Setup { srv, https_port, https, mqtt_by_ip, scope, ca, svc_token, gk, gk_csr, root, cfg } = setup;
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
        rows.push(probe.row(srv, "baseline: TLS handshake", "-", d));
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
        rows.push(probe.row(srv, "baseline: trivial authenticated request", "-", d));
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
        rows.push(probe.row(srv, "HTTPS, keep-alive", "symmetric key (group)", d));
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
        rows.push(probe.row(srv, "HTTPS, keep-alive (a device re-registering)", "X.509 (group)", d));
    }
    if has("https-csr") {
        // The same registration as "HTTPS, keep-alive" with a PKCS#10 request in the body:
        // the difference is the issuance (a CSR check and a certificate signed and stored).
        // The requests are made before the clock starts (a device makes its key once).
        let csrs: Arc<Vec<String>> =
            Arc::new((0..n).map(|i| bench_csr(&format!("csr-{tag}{i}"))).collect::<Result<_>>()?);
        let clients: Vec<reqwest::Client> =
            (0..c.max(1)).map(|_| keepalive_client(ca, https_port, None)).collect::<Result<_>>()?;
        let clients = Arc::new(clients);
        let (scope2, gk2, https2, tag2) = (scope.clone(), gk_csr.clone(), https.clone(), tag.clone());
        let probe = Probe::start(srv);
        let d = drive("https keep-alive, sym key + CSR", n, c, move |i, worker| {
            let (clients, scope, gk, https, csrs) =
                (clients.clone(), scope2.clone(), gk2.clone(), https2.clone(), csrs.clone());
            let id = format!("csr-{tag2}{i}");
            async move {
                let tok = group_device_token(&scope, &gk, &id)?;
                csr_registration(&clients[worker], &https, &scope, &id, &tok, &csrs[i]).await
            }
        })
        .await;
        rows.push(probe.row(srv, "HTTPS with a CSR, keep-alive (certificate issued)", "symmetric key (group)", d));
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
            rows.push(probe.row(srv, scenario, if x509 { "X.509 (group)" } else { "symmetric key (group)" }, d));
        }
    }
    Ok(rows)
}

/// The `provisio` executable to start: `--server`, else the one beside this executable,
/// else one on `PATH`.
///
/// # Errors
/// If there is none.
pub fn server_exe(chosen: Option<&std::path::Path>) -> Result<PathBuf> {
    server::server_exe(chosen)
}

/// Runs the benchmark: starts the server, runs `args.rounds` rounds of the selected
/// scenarios, holds the MQTT connections, prints it all and returns it.
///
/// # Errors
/// When the server cannot be found or started, the set-up on it fails, or the server does
/// not see the preloaded enrollments. A failing job is no error of the run: it is counted in
/// its row.
pub async fn run(args: BenchArgs) -> Result<Report> {
    let exe = server::server_exe(args.server.as_deref())?;
    let dir = tempfile::tempdir()?;
    if args.enrollments > 0 {
        if args.database.is_some() {
            bail!("--enrollments preloads the embedded store only");
        }
        preload(dir.path(), args.enrollments).await?;
    }
    let srv = server::start_server(&exe, args.database.as_deref(), dir)?;
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
    if args.enrollments > 0 {
        // The preload wrote the server's database file by name: the last enrollment written
        // must be there for the server.
        let id = format!("pre-{:07}", args.enrollments - 1);
        let r = reqw
            .get(format!("https://{https}/enrollments/{id}?api-version=2021-10-01"))
            .header("Authorization", &svc_token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "the server does not see the preloaded enrollment {id} (HTTP {}): is its embedded database \
                 still the file {} of its data directory?",
                r.status(),
                server::DATABASE_FILE
            );
        }
    }
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

    // A group whose devices get operational certificates: a CA made by the server, a policy
    // that lets each device be issued as many as the rounds need.
    let put = async |path: &str, body: Value| -> Result<Value> {
        Ok(reqw
            .put(format!("https://{https}/{path}?api-version=2021-10-01"))
            .header("Authorization", &svc_token)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    };
    put("certificateAuthorities/bench-ca", json!({"name": "bench-ca"})).await?;
    put(
        "credentialPolicies/bench",
        json!({"name": "bench", "certificateAuthorityName": "bench-ca", "issuanceLimitPerDay": 1000}),
    )
    .await?;
    let group = put(
        "enrollmentGroups/bench-csr",
        json!({"enrollmentGroupId": "bench-csr", "attestation": {"type": "symmetricKey"}, "credentialPolicyName": "bench"}),
    )
    .await?;
    let gk_csr = group["attestation"]["symmetricKey"]["primaryKey"].as_str().context("group key")?.to_owned();

    let cfg = tls_config(&ca, None)?;
    let setup = Setup { srv, https_port, https, mqtt_by_ip, scope, ca, svc_token, gk, gk_csr, root, cfg };

    let mut rounds: Vec<Round> = Vec::new();
    for round in 0..args.rounds {
        if args.rounds > 1 {
            println!("round {} of {}", round + 1, args.rounds);
        }
        // Every round registers devices of its own (a registration id taken in an earlier
        // round would make a re-registration).
        let tag = if args.rounds > 1 { format!("r{round}-") } else { String::new() };
        let round = Round::new(run_round(&setup, &args, &tag).await?);
        report::print_rows(&round.rows);
        report::print_ratios(&round);
        if args.rounds > 1 {
            println!();
        }
        rounds.push(round);
    }

    let held_mqtt =
        if args.mqtt_hold > 0 { Some(hold_mqtt(&setup.srv, &mqtt, &setup.cfg, args.mqtt_hold).await?) } else { None };
    let report = Report {
        medians: (rounds.len() > 1).then(|| report::medians(&rounds)),
        rounds,
        startup: setup.srv.startup,
        filter_built: setup.srv.filter_built,
        embedded_store: args.database.is_none(),
        enrollments: args.enrollments,
        held_mqtt,
    };
    report.print_summary(args.json);
    Ok(report)
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

/// A PKCS#10 request for `id` with a new ECDSA P-256 key, base64 DER (the device API's `csr`).
fn bench_csr(id: &str) -> Result<String> {
    use base64::Engine as _;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, id);
    Ok(base64::engine::general_purpose::STANDARD.encode(params.serialize_request(&key)?.der()))
}

/// [`keepalive_registration`] with `csr` in the body (api-version `2025-07-01-preview`); the
/// poll must carry the issued chain.
async fn csr_registration(
    client: &reqwest::Client,
    https: &str,
    scope: &str,
    id: &str,
    token: &str,
    csr: &str,
) -> Result<(u32, u32), String> {
    const V: &str = "api-version=2025-07-01-preview";
    let t0 = Instant::now();
    let r = client
        .put(format!("https://{https}/{scope}/registrations/{id}/register?{V}"))
        .header("Content-Type", "application/json")
        .header("Authorization", token)
        .body(json!({"registrationId": id, "csr": csr}).to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(format!("register: HTTP {}: {}", r.status(), r.text().await.unwrap_or_default()));
    }
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    let first = micros(t0.elapsed());
    let op = v["operationId"].as_str().unwrap_or_default().to_owned();
    let v: Value = client
        .get(format!("https://{https}/{scope}/registrations/{id}/operations/{op}?{V}"))
        .header("Authorization", token)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if v["status"] != "assigned" || !v["registrationState"]["issuedCertificateChain"].is_array() {
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

/// Opens `n` idle MQTT connections (TLS + CONNECT), holds those the server accepts (a
/// CONNACK with return code 0) and reports the server's RSS before and after.
async fn hold_mqtt(srv: &Srv, endpoint: &str, cfg: &Arc<rustls::ClientConfig>, n: usize) -> Result<HeldMqtt> {
    let port: u16 = endpoint.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).context("mqtt port")?;
    let before = srv.rss_mb();
    let bar = indicatif::ProgressBar::new(n as u64);
    let mut conns = Vec::with_capacity(n);
    let (mut refused, mut failed, mut first_failure) = (0, 0, None);
    let scope = srv.s("idScope");
    for i in 0..n {
        let attempt = tokio::time::timeout(Duration::from_secs(30), hold_one(cfg, port, &scope, i)).await;
        match attempt {
            Ok(Ok(Held::Accepted(tls))) => conns.push(*tls),
            Ok(Ok(Held::Refused(why))) => {
                refused += 1;
                first_failure.get_or_insert(format!("hold-{i}: {why}"));
            }
            Ok(Err(e)) => {
                failed += 1;
                first_failure.get_or_insert(format!("hold-{i}: {e:#}"));
            }
            Err(_) => {
                failed += 1;
                first_failure.get_or_insert(format!("hold-{i}: no CONNACK within 30 s"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = srv.rss_mb();
    Ok(HeldMqtt {
        requested: n,
        accepted: conns.len(),
        refused,
        failed,
        first_failure,
        rss_before_mb: before,
        rss_after_mb: after,
    })
}

/// How the server answered one CONNECT of [`hold_mqtt`].
enum Held {
    /// CONNACK with return code 0: the open connection.
    Accepted(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    /// CONNACK with another return code.
    Refused(String),
}

/// Connects, sends CONNECT, and reads the CONNACK of connection `i`.
async fn hold_one(cfg: &Arc<rustls::ClientConfig>, port: u16, scope: &str, i: usize) -> Result<Held> {
    use rumqttc::mqttbytes::v4::{Connect, Login, Packet};
    use tokio::io::AsyncWriteExt;
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
    Ok(match read_connack(&mut tls).await? {
        Ok(()) => Held::Accepted(Box::new(tls)),
        Err(why) => Held::Refused(why),
    })
}

/// Reads the CONNACK that answers a CONNECT: `Ok(Ok(()))` for return code 0 (accepted),
/// `Ok(Err(why))` for another return code, `Err` when no CONNACK came.
async fn read_connack(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<Result<(), String>> {
    use rumqttc::mqttbytes::{
        Error as MqttError,
        v4::{ConnectReturnCode, Packet},
    };
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(64);
    loop {
        match Packet::read(&mut buf, 1 << 16) {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => return Ok(Ok(())),
            Ok(Packet::ConnAck(ack)) => {
                return Ok(Err(format!("CONNACK return code {} ({:?})", ack.code as u8, ack.code)));
            }
            Ok(other) => bail!("expected CONNACK, got {other:?}"),
            Err(MqttError::InsufficientBytes(_)) => {
                if stream.read_buf(&mut buf).await? == 0 {
                    bail!("the server closed the connection before its CONNACK");
                }
            }
            Err(e) => bail!("bad CONNACK: {e}"),
        }
    }
}

/// Writes `n` individual symmetric-key enrollments straight into a fresh embedded store.
async fn preload(dir: &std::path::Path, n: usize) -> Result<()> {
    use provisio_store::{Collection, Store};
    let store = provisio_store::SqliteStore::open(&dir.join(server::DATABASE_FILE)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drive_counts_only_the_jobs_that_returned_success() {
        // Job 3 fails, job 5 panics: the other 8 of 10 succeed, on either of 2 workers.
        let d = drive("test", 10, 2, |i, _| async move {
            match i {
                3 => Err("refused".to_owned()),
                5 => panic!("job five"),
                _ => Ok((1, 2)),
            }
        })
        .await;
        assert_eq!((d.ops, d.succeeded, d.first.len(), d.total.len()), (10, 8, 8, 8));
        let e = d.first_error.unwrap_or_default();
        assert!(e == "refused" || e == "job 5 panicked: job five", "{e}");
    }

    #[tokio::test]
    async fn a_connack_holds_only_with_return_code_zero() {
        let accepted: &[u8] = &[0x20, 0x02, 0x00, 0x00];
        assert_eq!(read_connack(&mut &accepted[..]).await.ok(), Some(Ok(())));
        // 4: bad user name or password.
        let refused: &[u8] = &[0x20, 0x02, 0x00, 0x04];
        let why = read_connack(&mut &refused[..]).await.ok().and_then(Result::err).unwrap_or_default();
        assert!(why.starts_with("CONNACK return code 4"), "{why}");
        // Closed before the whole CONNACK, or another packet (PINGRESP) first: no CONNACK.
        let short: &[u8] = &[0x20, 0x02, 0x00];
        assert!(read_connack(&mut &short[..]).await.is_err());
        let other: &[u8] = &[0xd0, 0x00];
        assert!(read_connack(&mut &other[..]).await.is_err());
    }
}
