//! `provisio device …`: the device side, as one command instead of a page of scripts.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use provisio_client::{
    ClientError, Credential, Options, Progress, Transport,
    csr::{DeviceKey, KeyType},
};

/// Device-side commands.
#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// A device key from a group key: base64(HMAC-SHA256(group key, registration id)).
    DeriveKey {
        /// The enrollment group's key (base64).
        #[arg(long)]
        group_key: String,
        /// The device's registration id.
        #[arg(long)]
        registration_id: String,
    },
    /// A device SAS token, exactly as the walkthrough's Python script prints it.
    Sas {
        /// ID scope.
        #[arg(long)]
        scope: String,
        /// Registration id.
        #[arg(long)]
        registration_id: String,
        /// The device key (base64): an individual key, or one from `derive-key`.
        #[arg(long)]
        key: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        expiry: u64,
        /// Absolute expiry (Unix seconds) instead of --expiry.
        #[arg(long)]
        expires_at: Option<u64>,
    },
    /// Register, poll until assigned, and print the result; with --csr, also get an
    /// operational certificate.
    Register {
        #[command(flatten)]
        args: RegisterArgs,
        #[command(flatten)]
        csr: CsrArgs,
    },
    /// The device's current registration state (POST status lookup, HTTPS).
    Status(RegisterArgs),
    /// The TPM's endorsement key (base64 of its TPM2B_PUBLIC), to enroll the device with
    /// (`provisio enrollment create ID --endorsement-key …`). Needs a build with `--features tpm`.
    TpmEk {
        /// The TPM, by its TCTI: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, …
        #[arg(long, value_name = "TCTI", default_value = "device:/dev/tpmrm0")]
        tpm: String,
    },
}

/// Connection and credential options of `register` and `status`.
#[derive(Debug, Clone, clap::Args)]
pub struct RegisterArgs {
    /// ID scope.
    #[arg(long)]
    scope: String,
    /// Registration id [default with --cert: the certificate's CN].
    #[arg(long)]
    registration_id: Option<String>,
    /// An individual enrollment's symmetric key.
    #[arg(long, group = "cred")]
    key: Option<String>,
    /// A symmetric-key group's key (the device key is derived).
    #[arg(long, group = "cred")]
    group_key: Option<String>,
    /// Device certificate chain (PEM, device first).
    #[arg(long, group = "cred", requires = "cert_key", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, value_name = "FILE")]
    cert_key: Option<PathBuf>,
    /// TPM attestation (HTTPS), with the TPM named by its TCTI: `device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`, … Needs a build with `--features tpm`.
    #[arg(long, group = "cred", value_name = "TCTI")]
    tpm: Option<String>,
    /// host[:port] of the service.
    #[arg(long, default_value = provisio_client::GLOBAL_ENDPOINT)]
    endpoint: String,
    /// https (port 443), mqtt (8883), amqp (5671), or mqtt-ws / amqp-ws (MQTT or AMQP over
    /// WebSockets, port 443).
    #[arg(long, default_value = "https", value_parser = ["https", "mqtt", "amqp", "mqtt-ws", "amqp-ws"])]
    transport: String,
    /// CA certificate (PEM) to trust instead of the system roots (e.g. provisio-data/ca.pem).
    #[arg(long, env = "PROVISIO_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Custom payload for allocation webhooks (JSON, or @file).
    #[arg(long, value_name = "JSON")]
    payload: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Certificate issuance at registration (`register --csr`).
#[derive(Debug, Clone, clap::Args)]
pub struct CsrArgs {
    /// Ask for an operational certificate: make a key, send a certificate signing request for
    /// it (CN = the registration id, api-version 2025-07-01-preview), and write the issued
    /// chain to {id}_cert.pem (leaf first) and the key to {id}_key.pem (mode 0600).
    #[arg(long)]
    csr: bool,
    /// The key to make: p256, p384 or rsa2048 [default: p256].
    #[arg(long, requires = "csr", conflicts_with = "csr_key", value_parser = ["p256", "p384", "rsa2048"])]
    csr_key_type: Option<String>,
    /// Request the certificate for this existing private key (PEM: PKCS#8, SEC1 or PKCS#1)
    /// instead of making one; {id}_key.pem is then not written (the key stays where it is).
    #[arg(long, requires = "csr", value_name = "FILE")]
    csr_key: Option<PathBuf>,
    /// Directory to write {id}_cert.pem and {id}_key.pem to [default: the current one].
    #[arg(long, requires = "csr", value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Overwrite existing {id}_cert.pem and {id}_key.pem.
    #[arg(long, requires = "csr")]
    force: bool,
}

/// What `register --csr` sends and where it writes the result.
struct Issuance {
    /// The certificate file.
    cert: PathBuf,
    /// The key file to write a new key to; `None` with --csr-key.
    new_key: Option<(PathBuf, String)>,
    /// The key file the certificate goes with.
    key_file: PathBuf,
}

/// Makes or reads the key, puts its request into `opts`, and says where the files go; refuses
/// before registering when a file exists and --force is not given.
fn prepare_csr(c: &CsrArgs, opts: &mut Options, json: bool) -> Result<Issuance> {
    let config = |message: String| fail(ClientError::Config(message), json);
    let id = &opts.registration_id;
    // The id names the files: DPS's rules (letters, digits, - . _ :) keep it a plain name.
    provisio_core::ids::RegistrationId::parse(id).map_err(|e| config(format!("--registration-id: {e}")))?;
    let dir = c.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let cert = dir.join(format!("{id}_cert.pem"));
    let (key, new_key, key_file) = match &c.csr_key {
        Some(f) => {
            let pem = read(f, "--csr-key").map_err(|e| config(format!("{e:#}")))?;
            let key = DeviceKey::from_pem(&pem).map_err(|e| match e {
                ClientError::Config(m) => config(format!("--csr-key {}: {m}", f.display())),
                e => fail(e, json),
            })?;
            (key, None, f.clone())
        }
        None => {
            let kind = match c.csr_key_type.as_deref() {
                Some("p384") => KeyType::EcdsaP384,
                Some("rsa2048") => KeyType::Rsa2048,
                _ => KeyType::EcdsaP256,
            };
            let key = DeviceKey::generate(kind).map_err(|e| fail(e, json))?;
            let path = dir.join(format!("{id}_key.pem"));
            let pem = key.to_pem();
            (key, Some((path.clone(), pem)), path)
        }
    };
    if !c.force {
        for p in std::iter::once(&cert).chain(new_key.as_ref().map(|(p, _)| p)) {
            if p.exists() {
                return Err(config(format!("{} exists; pass --force to overwrite it", p.display())));
            }
        }
    }
    opts.csr = Some(key.request(id).map_err(|e| fail(e, json))?);
    Ok(Issuance { cert, new_key, key_file })
}

/// Writes `content` to `path` through a new file created with `mode` beside it, renamed into
/// place: a key is never readable by others, not even for a moment, and a file that existed
/// (with --force) is replaced whole rather than truncated and rewritten.
fn write_file(path: &Path, content: &str, mode: u32, force: bool) -> Result<()> {
    use std::io::Write as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut b = tempfile::Builder::new();
    b.prefix(".provisio-").suffix(".tmp");
    #[cfg(unix)]
    b.permissions(std::os::unix::fs::PermissionsExt::from_mode(mode));
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = b.tempfile_in(dir).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    if force {
        f.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    } else {
        f.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!("{} exists; pass --force to overwrite it", path.display())
            } else {
                anyhow::anyhow!("cannot write {}: {}", path.display(), e.error)
            }
        })?;
    }
    Ok(())
}

fn read(p: &PathBuf, what: &str) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {what} {}", p.display()))
}

fn options(a: &RegisterArgs) -> Result<Options> {
    let credential = match (&a.key, &a.group_key, &a.cert, &a.cert_key, &a.tpm) {
        (Some(k), ..) => Credential::SymmetricKey(k.clone()),
        (_, Some(g), ..) => Credential::GroupKey(g.clone()),
        (_, _, Some(c), Some(k), _) => {
            Credential::X509 { chain_pem: read(c, "--cert")?, key_pem: read(k, "--cert-key")? }
        }
        (.., Some(tcti)) => Credential::Tpm(open_tpm(tcti)?),
        _ => bail!("give one credential: --key, --group-key, --cert with --cert-key, or --tpm"),
    };
    let registration_id = match (&a.registration_id, &credential) {
        (Some(r), _) => r.clone(),
        (None, Credential::X509 { chain_pem, .. }) => {
            let chain = provisio_pki::x509::decode_pem_chain(chain_pem).map_err(|e| anyhow::anyhow!("--cert: {e}"))?;
            let leaf = chain.first().context("--cert holds no certificate")?;
            provisio_pki::x509::common_name(leaf)
                .map_err(|e| anyhow::anyhow!("--cert: {e}"))?
                .context("the certificate has no CN; give --registration-id")?
        }
        (None, Credential::Tpm(_)) => bail!("--registration-id is required with --tpm (the enrollment's)"),
        (None, _) => bail!("--registration-id is required with a symmetric key"),
    };
    let mut o = Options::new(&a.scope, registration_id, credential);
    o.endpoint = a.endpoint.clone();
    o.transport = match a.transport.as_str() {
        "mqtt" => Transport::Mqtt,
        "amqp" => Transport::Amqp,
        "mqtt-ws" => Transport::MqttWs,
        "amqp-ws" => Transport::AmqpWs,
        _ => Transport::Https,
    };
    o.ca_pem = a.ca.as_ref().map(|p| read(p, "--ca")).transpose()?;
    o.payload = a.payload.as_deref().map(|p| crate::ops::json_arg(p, "--payload")).transpose()?;
    o.timeout = Duration::from_secs(a.timeout.max(1));
    Ok(o)
}

/// The TPM named by `tcti`, with its EK and SRK made.
#[cfg(feature = "tpm")]
fn open_tpm(tcti: &str) -> Result<provisio_client::Tpm> {
    let t = provisio_client::tss::TssTpm::open(tcti).map_err(|e| anyhow::anyhow!("--tpm {tcti}: {e}"))?;
    Ok(provisio_client::Tpm::new(t))
}

#[cfg(not(feature = "tpm"))]
fn open_tpm(_tcti: &str) -> Result<provisio_client::Tpm> {
    bail!(
        "this provisio was built without TPM support: build it with `cargo build --release --features tpm` \
         (which links libtss2: `apt-get install libtss2-dev`)"
    )
}

/// Exit codes: 2 configuration, 3 network, 4 authentication, 5 assignment, 1 other.
fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Config(_) | ClientError::Tpm(_) => 2,
        ClientError::Network(_) | ClientError::Timeout(_) => 3,
        ClientError::Authentication { .. } => 4,
        ClientError::Assignment { .. } => 5,
        ClientError::Service { .. } | ClientError::Protocol(_) => 1,
    }
}

/// A failure with the exit code that says what kind it was.
#[derive(Debug)]
pub struct DeviceFailure {
    /// Process exit code.
    pub code: u8,
    /// What to print.
    pub message: String,
}

impl std::fmt::Display for DeviceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeviceFailure {}

fn fail(e: ClientError, json: bool) -> anyhow::Error {
    let code = exit_code(&e);
    if json {
        let kind = ["other", "other", "configuration", "network", "authentication", "assignment"][usize::from(code)];
        let mut v = serde_json::json!({"ok": false, "kind": kind, "message": e.to_string()});
        if let ClientError::Assignment { state, .. } = &e {
            v["registrationState"] = serde_json::to_value(state).unwrap_or_default();
        }
        println!("{v}");
    }
    DeviceFailure { code, message: e.to_string() }.into()
}

/// Writes the new key (if one was made) and the issued chain; returns how many certificates
/// the chain holds.
fn save_certificate(r: &provisio_client::Registration, i: &Issuance, force: bool, json: bool) -> Result<usize> {
    let Some(chain) = r.issued_chain_pem() else {
        let e = ClientError::Protocol(format!(
            "the device was assigned, but the service issued no certificate (does it speak api-version {}?)",
            provisio_client::CSR_API_VERSION
        ));
        return Err(fail(e, json));
    };
    let written = i
        .new_key
        .as_ref()
        .map_or(Ok(()), |(path, pem)| write_file(path, pem, 0o600, force))
        .and_then(|()| write_file(&i.cert, &chain, 0o644, force));
    if let Err(e) = written {
        if json {
            println!("{}", serde_json::json!({"ok": false, "kind": "other", "message": format!("{e:#}")}));
        }
        return Err(e);
    }
    Ok(r.issued_certificate_chain.len())
}

/// Runs a device command.
pub async fn run(cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::DeriveKey { group_key, registration_id } => {
            println!("{}", provisio_core::keys::derive_device_key(&group_key, &registration_id)?);
        }
        DeviceCommand::Sas { scope, registration_id, key, expiry, expires_at } => {
            let se = expires_at.unwrap_or_else(|| {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) + expiry
            });
            let resource = provisio_core::sas::device_resource(&scope, &registration_id);
            println!(
                "{}",
                provisio_core::sas::build_token(
                    &resource,
                    &key,
                    se,
                    Some("registration"),
                    provisio_core::sas::SrEncoding::Upper
                )?
            );
        }
        DeviceCommand::Register { args: a, csr } => {
            let mut opts = options(&a)?;
            let issuance = if csr.csr { Some(prepare_csr(&csr, &mut opts, a.json)?) } else { None };
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            let r = provisio_client::register(&opts, |p| match p {
                Progress::Registering => {
                    bar.set_message(format!("registering {} with {}…", opts.registration_id, opts.endpoint))
                }
                Progress::Assigning { operation_id, retry_after, polls } => bar.set_message(format!(
                    "assigning (operation {operation_id}); poll {} in {} s",
                    polls + 1,
                    retry_after.as_secs()
                )),
            })
            .await;
            bar.finish_and_clear();
            let r = r.map_err(|e| fail(e, a.json))?;
            let files = issuance.as_ref().map(|i| save_certificate(&r, i, csr.force, a.json)).transpose()?;
            if a.json {
                let mut v = serde_json::to_value(&r.state)?;
                v["operationId"] = serde_json::json!(r.operation_id);
                if let Some(i) = &issuance {
                    v["certificateFile"] = serde_json::json!(i.cert);
                    v["keyFile"] = serde_json::json!(i.key_file);
                }
                println!("{v}");
            } else {
                println!(
                    "assigned: {} is device '{}' on {} ({:?})",
                    opts.registration_id,
                    r.device_id.unwrap_or_default(),
                    r.assigned_hub.unwrap_or_default(),
                    r.state.substatus.map_or_else(String::new, |s| format!("{s:?}"))
                );
                if let Some(p) = r.payload {
                    println!("payload: {p}");
                }
                if let (Some(i), Some(n)) = (&issuance, files) {
                    if let Some((k, _)) = &i.new_key {
                        println!("wrote {} (the private key, mode 0600)", k.display());
                    }
                    println!("wrote {} (the certificate and its chain: {n} certificates)", i.cert.display());
                }
            }
        }
        DeviceCommand::TpmEk { tpm } => {
            let ek = open_tpm(&tpm)?.with(|t| t.endorsement_key())?;
            println!("{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ek));
        }
        DeviceCommand::Status(a) => {
            let opts = options(&a)?;
            let st = provisio_client::status(&opts).await.map_err(|e| fail(e, a.json))?;
            if a.json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&st)?);
            }
        }
    }
    Ok(())
}
