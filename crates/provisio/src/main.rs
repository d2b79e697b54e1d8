//! `provisio`: the Provisio server and its command-line tools.

mod audit;
mod cert;
mod device;
mod ops;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use provisio::config;
use provisio_server::{InstanceInfo, Provisio, ServerConfig};

/// Provisio: a self-hostable IoT device provisioning service, wire-compatible with
/// Azure IoT Hub DPS.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the provisioning service.
    Serve(config::ServeArgs),
    /// Print the ID scope, endpoints, service connection string and CA file of an instance.
    Info(InfoArgs),
    /// Make test certificates: roots, intermediates, devices, proof-of-possession certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// The device side: derive keys, make SAS tokens, register and poll.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Individual enrollments (service API).
    Enrollment {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::EnrollmentCommand,
    },
    /// Enrollment groups (service API).
    EnrollmentGroup {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::GroupCommand,
    },
    /// Registration states (service API).
    Registration {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::RegistrationCommand,
    },
    /// CA certificates and proof of possession (service API).
    Certificate {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::CertificateCommand,
    },
    /// Linked IoT hubs (service API; needs ServiceConfig).
    Hub {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::hub::HubCommand,
    },
    /// CAs that issue devices' operational certificates at registration, and their CRLs
    /// (service API; needs ServiceConfig).
    Ca {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::ca::CaCommand,
    },
    /// Credential policies: which CA issues a device's certificate, for how long, to which
    /// keys (service API; needs ServiceConfig).
    CredentialPolicy {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::credential_policy::CredentialPolicyCommand,
    },
    /// Shared access policies (service API; needs ServiceConfig).
    Policy {
        #[command(flatten)]
        conn: ops::client::ConnArgs,
        #[command(subcommand)]
        cmd: ops::PolicyCommand,
    },
    /// Read the audit log: registration attempts and service API changes.
    Audit(audit::AuditArgs),
    /// Re-encrypt every stored secret with the current encryption_key (after enabling
    /// encryption or rotating the key; see the README).
    Rekey(RekeyArgs),
}

#[derive(Debug, clap::Args)]
struct RekeyArgs {
    #[command(flatten)]
    common: config::CommonArgs,
}

#[derive(Debug, clap::Args)]
struct InfoArgs {
    #[command(flatten)]
    common: config::CommonArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// mimalloc instead of glibc's allocator. After a burst of connections (a fleet
/// reconnecting over MQTT, say) glibc's heap is left fragmented and every later request
/// costs more: a trivial request 25–29 µs of server CPU instead of 17–18, a keep-alive
/// registration 124–142 µs instead of 105–112, until a restart. With mimalloc the same
/// requests cost 15–18 and 90–98 µs before and after the burst (`provisio-bench --rounds 2`,
/// BENCHMARKS.md), for about 14 MB more resident memory when idle.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<device::DeviceFailure>() {
                Some(f) => std::process::ExitCode::from(f.code),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Info(args) => info(args).await,
        Command::Cert(cmd) => cert::run(cmd),
        Command::Device(cmd) => device::run(cmd).await,
        Command::Enrollment { conn, cmd } => ops::enrollment_run(&conn, cmd).await,
        Command::EnrollmentGroup { conn, cmd } => ops::group_run(&conn, cmd).await,
        Command::Registration { conn, cmd } => ops::registration::run(&ops::client::Client::new(&conn)?, cmd).await,
        Command::Certificate { conn, cmd } => ops::certificate::run(&ops::client::Client::new(&conn)?, cmd).await,
        Command::Hub { conn, cmd } => ops::hub::run(&ops::client::Client::new(&conn)?, cmd).await,
        Command::Policy { conn, cmd } => ops::policy::run(&ops::client::Client::new(&conn)?, cmd).await,
        Command::Ca { conn, cmd } => ops::ca::run(&ops::client::Client::new(&conn)?, cmd).await,
        Command::CredentialPolicy { conn, cmd } => {
            ops::credential_policy::run(&ops::client::Client::new(&conn)?, cmd).await
        }
        Command::Audit(args) => audit::run(&args),
        Command::Rekey(args) => rekey(args).await,
    }
}

/// Prints an instance's facts; `console` says whether the web console is served.
fn print_info(info: &InstanceInfo, json: bool, console: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(info)?);
        return Ok(());
    }
    println!("ID scope:                  {}", info.id_scope);
    println!("Device endpoint:           {}", info.device_endpoint);
    println!("HTTPS endpoint:            {}", info.https_endpoint);
    println!("Service connection string: {}", info.service_connection_string);
    match &info.ca_cert_file {
        Some(ca) => println!("CA certificate:            {}", ca.display()),
        None => println!("CA certificate:            (serving the operator's certificate from --tls-cert)"),
    }
    if let Some(m) = &info.mqtt_endpoint {
        println!("MQTT endpoint:             {m}");
    }
    if let Some(a) = &info.amqp_endpoint {
        println!("AMQP endpoint:             {a}");
    }
    println!("Linked IoT hubs:           {}", info.linked_hubs.join(", "));
    if console {
        println!("Web console:               {}/console", info.https_endpoint);
    }
    Ok(())
}

async fn serve(args: config::ServeArgs) -> Result<()> {
    let (config, log): (ServerConfig, config::LogSettings) = config::load_serve(&args)?;
    config::init_logging(&log)?;
    let console = config.console;
    let server = Provisio::open(config).await.context("cannot start Provisio")?;
    let listeners = server.bind().await?;
    // The owner's key only on the first start: this output ends up in journald and container
    // logs, start after start.
    let info = if server.created() { server.info(&listeners) } else { server.info(&listeners).without_key() };
    if !args.json {
        println!("Provisio {} is ready.", env!("CARGO_PKG_VERSION"));
    }
    print_info(&info, args.json, console)?;
    if !args.json {
        if server.created() {
            println!("The connection string above holds the owner's key and is printed on this first start only.");
        } else {
            println!("The owner's key is not printed here: `provisio info` prints the service connection string.");
        }
        println!("Devices use the device endpoint as their global endpoint, with the ID scope above.");
        println!("Stock Azure SDK HTTP clients only connect to port 443: use --https-listen 0.0.0.0:443 for them.");
    }
    tracing::info!(id_scope = %info.id_scope, endpoint = %info.https_endpoint, "Provisio is serving");
    server.run(listeners, shutdown_signal()).await?;
    tracing::info!("Provisio stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
}

async fn rekey(args: RekeyArgs) -> Result<()> {
    let config = config::load_common(&args.common)?;
    let changed = provisio_server::reseal(&config).await.context("re-encrypting the stored secrets failed")?;
    match config.encryption_key {
        Some(_) => println!("{changed} documents re-encrypted with the current encryption_key."),
        None => println!("{changed} documents now hold their secrets in plain (no encryption_key is set)."),
    }
    Ok(())
}

async fn info(args: InfoArgs) -> Result<()> {
    let config = config::load_common(&args.common)?;
    let db: PathBuf = config.data_dir.join(provisio_server::DATABASE_FILE);
    if config.database.is_none() && !db.exists() {
        bail!(
            "no Provisio instance in {} (run `provisio serve --data-dir {}` once to create it)",
            config.data_dir.display(),
            config.data_dir.display()
        );
    }
    let Some(info) = provisio_server::read_info(&config).await? else {
        bail!("the instance is not initialised yet (run `provisio serve` once)");
    };
    print_info(&info, args.json, config.console)
}
