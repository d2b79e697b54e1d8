//! `provisio device …`: the device side, as one command instead of a page of scripts.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use provisio_client::{ClientError, Credential, Options, Progress, Transport};

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
    /// Register, poll until assigned, and print the result.
    Register(RegisterArgs),
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
        DeviceCommand::Register(a) => {
            let opts = options(&a)?;
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
            if a.json {
                let mut v = serde_json::to_value(&r.state)?;
                v["operationId"] = serde_json::json!(r.operation_id);
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
