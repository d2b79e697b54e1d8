//! Configuration: defaults, then a TOML file (`--config`), then `PROVISIO_*` environment
//! variables, then flags. Flags win.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use provisio_server::ServerConfig;
use serde::{Deserialize, Serialize};

/// Configuration keys that may come from `PROVISIO_<KEY>` variables.
const ENV_KEYS: &[&str] = &[
    "data_dir",
    "database",
    "database_max_connections",
    "https_listen",
    "mqtt_listen",
    "amqp_listen",
    "hostnames",
    "tls_cert",
    "tls_key",
    "linked_hubs",
    "allocation_policy",
    "region",
    "webhook_timeout_secs",
    "webhook_attempts",
    "webhook_ca_file",
    "webhook_allowed_networks",
    "hub_registrar",
    "retry_after_secs",
    "sas_clock_skew_secs",
    "max_body_bytes",
    "max_connections",
    "max_connections_per_ip",
    "max_headers",
    "registrations_per_second",
    "device_polls_per_10s",
    "max_concurrent_operations",
    "handshake_timeout_secs",
    "header_timeout_secs",
    "request_timeout_secs",
    "operation_retention_hours",
    "refusal_records_kept",
    "x509_refusals_per_ip_per_minute",
    "x509_signing_certificates_need_verified_ca",
    "service_requests_per_second",
    "max_bulk_items",
    "max_query_page_size",
    "cache_ttl_ms",
    "poll_auth_cache_secs",
    "encryption_key",
    "encryption_previous_keys",
    "audit_log",
    "audit_log_max_mb",
    "audit_log_keep",
    "audit_log_refusals_per_minute",
    "console",
    "public_url",
    "amqp_max_frame_bytes",
    "amqp_max_sessions",
    "amqp_max_links",
    "amqp_idle_timeout_secs",
    "log_format",
    "log",
];

/// Options shared by commands that read an instance.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct CommonArgs {
    /// TOML configuration file (keys as in the README's configuration reference).
    #[arg(long, env = "PROVISIO_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory of the instance's state [default: ./provisio-data].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Shared PostgreSQL database URL (postgres://…) instead of the embedded SQLite one.
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

/// `provisio serve` flags. Every flag overrides the file and the environment.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServeArgs {
    /// The configuration file, data directory and database.
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    /// HTTPS listen address [default: 0.0.0.0:8443]. Stock SDK HTTP clients need port 443.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_listen: Option<String>,
    /// MQTT-over-TLS listen address, or `off` [default: 0.0.0.0:8883].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_listen: Option<String>,
    /// AMQP-over-TLS listen address, or `off` [default: 0.0.0.0:5671].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_listen: Option<String>,
    /// Host name or IP the server certificate covers; repeat for several. The first is
    /// the one printed [default: localhost, 127.0.0.1 and this machine's host name].
    #[arg(long = "hostname", value_name = "NAME")]
    #[serde(rename = "hostnames", skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// TLS certificate chain (PEM) to serve instead of one from the local CA.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// IoT hub host name devices are assigned to; repeat for several [default: one hub
    /// named after the instance].
    #[arg(long = "linked-hub", value_name = "HOSTNAME")]
    #[serde(rename = "linked_hubs", skip_serializing_if = "Vec::is_empty")]
    pub linked_hubs: Vec<String>,
    /// Retry-After, in seconds, sent while a registration is assigning [default: 2].
    #[arg(long, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u32>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Print the start-up facts as one JSON line instead of text.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

/// Logging settings (not part of the server library's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub log_format: String,
    /// A tracing filter, e.g. `info` or `provisio_server=debug`.
    pub log: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { log_format: "text".into(), log: "info".into() }
    }
}

fn figment(file: Option<&PathBuf>, flags: &impl Serialize) -> Result<Figment> {
    let mut f = Figment::from(Serialized::defaults(ServerConfig::default()))
        .merge(Serialized::defaults(LogSettings::default()));
    if let Some(path) = file {
        if !path.exists() {
            bail!("configuration file {} does not exist", path.display());
        }
        f = f.merge(Toml::file_exact(path));
    }
    Ok(f.merge(Env::prefixed("PROVISIO_").only(ENV_KEYS)).merge(Serialized::defaults(flags)))
}

/// Splits the figment into the server's and the logger's settings.
fn extract(f: &Figment) -> Result<(ServerConfig, LogSettings)> {
    let log: LogSettings = f.extract().context("invalid logging configuration")?;
    // The server config refuses unknown keys, so remove the logger's before extracting.
    let mut value = f.extract::<figment::value::Dict>().context("invalid configuration")?;
    value.remove("log_format");
    value.remove("log");
    let config: ServerConfig = Figment::from(Serialized::defaults(value)).extract().context("invalid configuration")?;
    if !matches!(log.log_format.as_str(), "text" | "json") {
        bail!("log_format must be 'text' or 'json', not '{}'", log.log_format);
    }
    Ok((config, log))
}

/// The configuration of `provisio serve`.
pub fn load_serve(args: &ServeArgs) -> Result<(ServerConfig, LogSettings)> {
    extract(&figment(args.common.config.as_ref(), args)?)
}

/// The configuration of commands that only read an instance.
pub fn load_common(args: &CommonArgs) -> Result<ServerConfig> {
    Ok(extract(&figment(args.config.as_ref(), args)?)?.0)
}

/// Starts logging to stderr.
pub fn init_logging(s: &LogSettings) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&s.log).context("invalid log filter")?;
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let res = if s.log_format == "json" { builder.json().try_init() } else { builder.try_init() };
    res.map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_env_and_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "p.toml",
                "https_listen = \"127.0.0.1:1111\"\nretry_after_secs = 7\nhostnames = [\"file.example\"]\nlog_format = \"json\"",
            )?;
            jail.set_env("PROVISIO_HTTPS_LISTEN", "127.0.0.1:2222");
            jail.set_env("PROVISIO_LINKED_HUBS", "[\"env-hub.example\"]");
            jail.set_env("PROVISIO_CONNECTION_STRING", "ignored by serve");
            let mut args = ServeArgs::default();
            args.common.config = Some("p.toml".into());
            let (c, log) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!(c.https_listen, "127.0.0.1:2222"); // env over file
            assert_eq!(c.retry_after_secs, 7); // file over default
            assert_eq!(c.hostnames, ["file.example"]);
            assert_eq!(c.linked_hubs, ["env-hub.example"]);
            assert_eq!(log.log_format, "json");
            args.https_listen = Some("127.0.0.1:3333".into());
            args.hostnames = vec!["flag.example".into()];
            let (c, _) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!(c.https_listen, "127.0.0.1:3333"); // flag over env
            assert_eq!(c.hostnames, ["flag.example"]);
            Ok(())
        });
    }

    #[test]
    fn amqp_listener_from_default_file_env_and_flag() {
        figment::Jail::expect_with(|jail| {
            let args = ServeArgs::default();
            let (c, _) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!(c.amqp_listen, "0.0.0.0:5671");
            assert_eq!((c.amqp_max_frame_bytes, c.amqp_max_sessions, c.amqp_max_links), (65536, 4, 8));
            jail.create_file("p.toml", "amqp_listen = \"off\"\namqp_max_links = 3\namqp_idle_timeout_secs = 9")?;
            let mut args = ServeArgs::default();
            args.common.config = Some("p.toml".into());
            let (c, _) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!((c.amqp_listen.as_str(), c.amqp_max_links, c.amqp_idle_timeout_secs), ("off", 3, 9));
            jail.set_env("PROVISIO_AMQP_LISTEN", "127.0.0.1:5672");
            jail.set_env("PROVISIO_AMQP_MAX_SESSIONS", "2");
            let (c, _) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!((c.amqp_listen.as_str(), c.amqp_max_sessions), ("127.0.0.1:5672", 2));
            args.amqp_listen = Some("127.0.0.1:5673".into());
            let (c, _) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!(c.amqp_listen, "127.0.0.1:5673");
            Ok(())
        });
    }

    #[test]
    fn webhook_allowed_networks_from_file_and_env() {
        figment::Jail::expect_with(|jail| {
            let (c, _) = load_serve(&ServeArgs::default()).map_err(|e| e.to_string())?;
            assert!(c.webhook_allowed_networks.is_empty(), "nothing is allowed by default");
            jail.create_file("p.toml", "webhook_allowed_networks = [\"127.0.0.0/8\"]")?;
            let mut args = ServeArgs::default();
            args.common.config = Some("p.toml".into());
            let (c, _) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!(c.webhook_allowed_networks, ["127.0.0.0/8"]);
            jail.set_env("PROVISIO_WEBHOOK_ALLOWED_NETWORKS", "[\"10.0.0.0/8\", \"fd00::/8\"]");
            let (c, _) = load_serve(&args).map_err(|e| e.to_string())?;
            assert_eq!(c.webhook_allowed_networks, ["10.0.0.0/8", "fd00::/8"]);
            Ok(())
        });
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("p.toml", "htps_listen = \"x\"")?;
            let mut args = ServeArgs::default();
            args.common.config = Some("p.toml".into());
            assert!(load_serve(&args).is_err());
            Ok(())
        });
    }
}
