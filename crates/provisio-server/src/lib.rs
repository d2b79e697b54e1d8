//! The Provisio server: listeners, TLS and the thin front-ends (HTTPS with the service API
//! and WebSockets, MQTT, AMQP) that parse their framing, call [`provisio_engine`] and frame
//! its answers; and the wiring of an instance from its [`ServerConfig`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), provisio_server::ServerError> {
//! let config = provisio_server::ServerConfig::default();
//! let server = provisio_server::Provisio::open(config).await?;
//! let listeners = server.bind().await?;
//! println!("{:?}", server.info(&listeners));
//! server.run(listeners, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

mod amqp;
pub mod config;
mod error;
mod http;
mod mqtt;
mod tls;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use config::{Secret, ServerConfig};
pub use error::ServerError;
pub use provisio_engine::instance::InstanceInfo;
use provisio_engine::{
    Engine, EngineSettings,
    addresses::AddressPolicy,
    allocation::{AllocationSettings, Assigner, RegistrarKind},
    audit::{AuditConfig, AuditLog, RefusalLimits},
    certificates::Certificates,
    hubs::Hubs,
    instance::{self, InstanceSettings},
    service::ServiceLimits,
    webhook::WebhookSettings,
};
use provisio_store::{Collection, Keyring, PostgresStore, SealedStore, SqliteStore, Store};
use tokio::net::TcpListener;

/// File name of the embedded database inside the data directory.
pub const DATABASE_FILE: &str = "provisio.sqlite";

/// The sockets a server serves on; bind them yourself (tests use `127.0.0.1:0`) or with
/// [`Provisio::bind`].
#[derive(Debug)]
pub struct Listeners {
    /// HTTPS: device API, service API, `/health`.
    pub https: TcpListener,
    /// MQTT over TLS (absent when disabled).
    pub mqtt: Option<TcpListener>,
    /// AMQP over TLS (absent when disabled).
    pub amqp: Option<TcpListener>,
}

/// An opened, initialised instance, ready to serve.
pub struct Provisio {
    config: ServerConfig,
    store: Arc<dyn Store>,
    instance: instance::Instance,
    linked_hubs: Vec<String>,
    allocation: AllocationSettings,
    instance_settings: InstanceSettings,
}

/// Opens the configured store: PostgreSQL when `database` is set, else the embedded
/// SQLite database in `data_dir` (created if needed).
///
/// # Errors
/// If the directory or database cannot be created or reached.
pub async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>, ServerError> {
    open_store_for(config, Use::Tool).await
}

/// Who opens a store: a server must be the only one on an embedded database.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Serve,
    Tool,
}

async fn open_store_for(config: &ServerConfig, by: Use) -> Result<Arc<dyn Store>, ServerError> {
    let store = open_raw_store(config, by).await?;
    let keys = keyring(config)?;
    if keys.is_empty() {
        // Without a key, sealed secrets would surface later as baffling parse errors.
        if let Some(identity) = store.get(Collection::Meta, "identity").await?
            && provisio_store::sealed::has_sealed_values(&identity.body)
        {
            return Err(ServerError::Config(
                "the database holds encrypted secrets: set encryption_key (PROVISIO_ENCRYPTION_KEY) to the key they were sealed with"
                    .into(),
            ));
        }
        return Ok(store);
    }
    let sealed = SealedStore::new(store, keys);
    // A wrong key is a configuration error: say so at start, not on the first request.
    sealed.get(Collection::Meta, "identity").await.map_err(|e| match e {
        provisio_store::StoreError::Backend(m) => ServerError::Config(m),
        other => ServerError::from(other),
    })?;
    Ok(Arc::new(sealed))
}

fn keyring(config: &ServerConfig) -> Result<Keyring, ServerError> {
    let previous: Vec<String> = config.encryption_previous_keys.iter().map(|k| k.0.clone()).collect();
    Keyring::new(config.encryption_key.as_ref().map(|k| k.0.as_str()), &previous)
        .map_err(|e| ServerError::Config(e.to_string()))
}

/// The facts of the instance configured by `config` (`provisio info`), without starting it;
/// `None` if it was never started.
///
/// # Errors
/// If the store cannot be opened or read.
pub async fn read_info(config: &ServerConfig) -> Result<Option<InstanceInfo>, ServerError> {
    let store = open_store(config).await?;
    let info = instance::read_info(store.as_ref(), &instance_settings(config)?).await;
    store.close().await;
    Ok(info?)
}

/// Re-encrypts every stored secret with the current `encryption_key` (or stores them in
/// plain when none is set, reading with `encryption_previous_keys`): run after enabling
/// encryption or rotating the key. Returns how many documents changed.
///
/// # Errors
/// If the store fails or a secret was sealed with a key that is not configured.
pub async fn reseal(config: &ServerConfig) -> Result<u64, ServerError> {
    let store = open_raw_store(config, Use::Tool).await?;
    let sealed = SealedStore::new(store.clone(), keyring(config)?);
    let changed = sealed.reseal_all().await;
    store.close().await;
    Ok(changed?)
}

async fn open_raw_store(config: &ServerConfig, by: Use) -> Result<Arc<dyn Store>, ServerError> {
    create_private_dir(&config.data_dir)
        .map_err(|e| ServerError::Config(format!("cannot create data directory {}: {e}", config.data_dir.display())))?;
    match config.database.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PostgresStore::connect(url, config.database_max_connections).await?))
        }
        Some(other) => Err(ServerError::Config(format!(
            "database '{}' is not a postgres:// URL (leave it unset for the embedded SQLite database)",
            other.split('@').next_back().unwrap_or("")
        ))),
        None => {
            let db = config.data_dir.join(DATABASE_FILE);
            // Created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the
            // database's mode): no moment in which the keys are readable by others.
            create_private_file(&db)
                .map_err(|e| ServerError::Config(format!("cannot create the database {}: {e}", db.display())))?;
            let store = SqliteStore::open(&db).await?;
            if by == Use::Serve && store.is_locked_elsewhere() {
                store.close().await;
                // Two servers on one embedded database would each miss the other's writes
                // in their caches; several nodes share a PostgreSQL database instead.
                return Err(ServerError::Config(format!(
                    "another Provisio server is using {} (stop it first, or give this one its own --data-dir; \
                     several nodes share a PostgreSQL database: --database postgres://…)",
                    db.display()
                )));
            }
            protect_secrets(&config.data_dir, &db);
            Ok(Arc::new(store))
        }
    }
}

/// Creates `dir` (and its parents) if needed; a directory created here is 0700 from the
/// start.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Creates `path` empty with mode 0600 unless it exists (an existing file is left as it is).
fn create_private_file(path: &std::path::Path) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path).map(drop)
}

/// The database holds keys: only the service's user may read it (0600, directory 0700).
fn protect_secrets(dir: &std::path::Path, db: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &std::path::Path, mode: u32| {
            if p.exists()
                && let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            {
                tracing::warn!(path = %p.display(), error = %e, "cannot restrict permissions");
            }
        };
        set(dir, 0o700);
        for suffix in ["", "-wal", "-shm"] {
            set(&std::path::PathBuf::from(format!("{}{suffix}", db.display())), 0o600);
        }
    }
}

impl Provisio {
    /// Opens the store and loads (or, on first start, creates) the instance.
    ///
    /// # Errors
    /// If the store, the TLS material or the configuration is unusable.
    pub async fn open(config: ServerConfig) -> Result<Self, ServerError> {
        let allocation = allocation_settings(&config)?;
        let instance_settings = instance_settings(&config)?;
        let store = open_store_for(&config, Use::Serve).await?;
        if config.encryption_key.is_none() {
            tracing::warn!(
                "no encryption_key is set: keys, policy keys and webhook URLs are stored in plain in the database \
                 (set encryption_key to a base64 of 32 random bytes, e.g. `openssl rand -base64 32`, then run \
                 `provisio rekey`)"
            );
        }
        let instance = instance::load_or_init(store.as_ref(), &instance_settings).await?;
        let hubs = Hubs::new(store.clone());
        hubs.seed(&config.linked_hubs, &instance::default_hub_name(instance.scope.as_str())).await?;
        let linked_hubs = Hubs::linked_names(store.as_ref()).await?;
        Ok(Self { config, store, instance, linked_hubs, allocation, instance_settings })
    }

    /// Binds the configured listen addresses.
    ///
    /// # Errors
    /// If an address is invalid or in use.
    pub async fn bind(&self) -> Result<Listeners, ServerError> {
        let addr: SocketAddr = self.config.https_listen.parse().map_err(|_| {
            ServerError::Config(format!("--https-listen '{}' is not an address:port", self.config.https_listen))
        })?;
        let https =
            TcpListener::bind(addr).await.map_err(|source| ServerError::Listen { listener: "HTTPS", addr, source })?;
        let mqtt = bind_optional(&self.config.mqtt_listen, "--mqtt-listen", "MQTT").await?;
        let amqp = bind_optional(&self.config.amqp_listen, "--amqp-listen", "AMQP").await?;
        Ok(Listeners { https, mqtt, amqp })
    }

    /// Whether this start created the instance's owner policy (its first start).
    #[must_use]
    pub fn created(&self) -> bool {
        self.instance.created
    }

    /// The instance's ID scope.
    #[must_use]
    pub fn id_scope(&self) -> &str {
        self.instance.scope.as_str()
    }

    /// The facts to print, for the given listeners.
    #[must_use]
    pub fn info(&self, listeners: &Listeners) -> InstanceInfo {
        let endpoint = self.endpoint(listeners);
        let mut info = instance::info(
            self.instance.scope.as_str(),
            &self.instance.owner,
            &endpoint,
            self.instance.local_ca.then(|| self.config.data_dir.join("ca.pem")),
            self.linked_hubs.clone(),
        );
        info.mqtt_endpoint = listeners
            .mqtt
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("{}:{}", endpoint.hostname, a.port()));
        info.amqp_endpoint = listeners
            .amqp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("{}:{}", endpoint.hostname, a.port()));
        info
    }

    fn endpoint(&self, listeners: &Listeners) -> instance::Endpoint {
        let mut e = instance::default_endpoint(&self.instance_settings);
        if let Ok(a) = listeners.https.local_addr() {
            e.https_port = a.port();
        }
        e
    }

    /// Serves until `shutdown` resolves, then drains connections and closes the store.
    ///
    /// # Errors
    /// If the TLS configuration or the audit log is unusable, or the store fails at start.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let store: Arc<dyn Store> = self.store.clone();
        instance::record_endpoint(store.as_ref(), &self.endpoint(&listeners)).await?;
        let (cert, key) = (&self.instance.tls.cert_pem, &self.instance.tls.key_pem);
        let https_tls = tls::server_config(cert, key, &[b"h2", b"http/1.1"])?;
        let stream_tls = tls::server_config(cert, key, &[])?;
        let c = &self.config;
        let audit = match c.audit_log_path() {
            Some(path) => AuditLog::open(AuditConfig {
                path: path.clone(),
                max_bytes: c.audit_log_max_mb.saturating_mul(1024 * 1024).max(4096),
                keep: c.audit_log_keep,
                refusals: RefusalLimits::per_minute(c.audit_log_refusals_per_minute),
            })
            .await
            .map_err(|e| ServerError::Config(format!("cannot open the audit log {}: {e}", path.display())))?,
            None => AuditLog::disabled(),
        };
        let hubs = Hubs::with_ttl(store.clone(), Duration::from_millis(c.cache_ttl_ms))
            .with_webhook_addresses(self.allocation.webhooks.addresses.clone());
        let assigner = Assigner::new(hubs.clone(), self.allocation.clone())?;
        let public_url = c
            .public_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| u.trim_end_matches('/').to_owned());
        let engine = Engine::new(store.clone(), self.instance.scope.clone(), engine_settings(c), assigner)
            .with_audit(audit.clone())
            .with_public_url(public_url);
        let service = engine.service_api(
            c.effective_hostnames(),
            ServiceLimits {
                max_bulk_items: c.max_bulk_items,
                default_page_size: 100.min(c.max_query_page_size),
                max_page_size: c.max_query_page_size,
                requests_per_second: c.service_requests_per_second,
            },
        );
        let per_ip = Arc::new(provisio_engine::limits::PerIpLimiter::new(c.max_connections_per_ip));
        // MQTT and AMQP sessions have the same limits on their own ports and over WebSockets.
        let mqtt_limits = mqtt::MqttLimits {
            max_connections: c.max_connections,
            max_packet_bytes: c.max_body_bytes + 4096,
            connect_timeout: Duration::from_secs(c.handshake_timeout_secs),
            idle_timeout: Duration::from_secs(c.header_timeout_secs.max(60) * 10),
        };
        let amqp_limits = amqp::AmqpLimits {
            max_connections: c.max_connections,
            max_frame_bytes: c.amqp_max_frame_bytes,
            max_message_bytes: u64::try_from(c.max_body_bytes).unwrap_or(u64::MAX).saturating_add(4096),
            max_sessions: c.amqp_max_sessions.max(1),
            max_links: c.amqp_max_links.max(2),
            connect_timeout: Duration::from_secs(c.handshake_timeout_secs),
            idle_timeout: Duration::from_secs(c.amqp_idle_timeout_secs.max(1)),
        };
        let console = if c.console {
            let listeners_info = self.info(&listeners);
            Some(provisio_console::router(provisio_console::ConsoleParts {
                engine: engine.clone(),
                service: service.clone(),
                certificates: Certificates::new(store.clone()),
                hubs: hubs.clone(),
                audit: audit.clone(),
                audit_file: c.audit_log_path().map(|p| (p, c.audit_log_keep)),
                info: listeners_info,
                session_key: instance::console_session_key(store.as_ref()).await?,
                max_body_bytes: c.max_body_bytes,
            }))
        } else {
            None
        };
        let state = Arc::new(http::AppState {
            engine: engine.clone(),
            service,
            per_ip: per_ip.clone(),
            certificates: Certificates::new(store.clone()),
            hubs,
            console,
            max_body_bytes: c.max_body_bytes,
            request_timeout: Duration::from_secs(c.request_timeout_secs),
            audit: audit.clone(),
            mqtt_limits,
            amqp_limits,
        });
        let limits = http::ConnLimits {
            max_connections: c.max_connections,
            handshake_timeout: Duration::from_secs(c.handshake_timeout_secs),
            header_timeout: Duration::from_secs(c.header_timeout_secs),
            max_headers: c.max_headers,
        };
        let purge = tokio::spawn(housekeeping(store.clone(), c.operation_retention_hours, c.refusal_records_kept));
        let stats = tokio::spawn(flush_stats(engine.clone()));
        // One shutdown signal for every listener.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mqtt = listeners.mqtt.map(|l| {
            let serve = mqtt::serve(
                l,
                stream_tls.clone(),
                engine.clone(),
                mqtt_limits,
                per_ip.clone(),
                stopped(stop_rx.clone()),
            );
            tokio::spawn(serve)
        });
        let amqp = listeners.amqp.map(|l| {
            let serve = amqp::serve(
                l,
                stream_tls.clone(),
                engine.clone(),
                amqp_limits,
                per_ip.clone(),
                stopped(stop_rx.clone()),
            );
            tokio::spawn(serve)
        });
        let https = tokio::spawn(http::serve(listeners.https, https_tls, state, limits, stopped(stop_rx.clone())));
        shutdown.await;
        let _ = stop_tx.send(true);
        let _ = https.await;
        if let Some(m) = mqtt {
            let _ = m.await;
        }
        if let Some(a) = amqp {
            let _ = a.await;
        }
        purge.abort();
        stats.abort();
        if let Err(e) = engine.flush_stats().await {
            tracing::warn!(error = %e, "cannot write the last minute's registration counts");
        }
        audit.flush().await;
        self.store.close().await;
        Ok(())
    }
}

/// What the engine is told, from the configuration.
fn engine_settings(c: &ServerConfig) -> EngineSettings {
    EngineSettings {
        sas_clock_skew_secs: c.sas_clock_skew_secs,
        signing_certificates_need_verified_ca: c.x509_signing_certificates_need_verified_ca,
        cache_ttl: Duration::from_millis(c.cache_ttl_ms),
        registrations_per_second: c.registrations_per_second,
        device_polls_per_10s: c.device_polls_per_10s,
        max_concurrent_operations: c.max_concurrent_operations,
        poll_auth_cache: Duration::from_secs(c.poll_auth_cache_secs),
        refusal_records_kept: c.refusal_records_kept,
        retry_after_secs: c.retry_after_secs,
        x509_refusals_per_ip_per_minute: c.x509_refusals_per_ip_per_minute,
    }
}

/// How devices are allocated, from the configuration (the webhook CA file is read here, so
/// that a missing file stops the start rather than the first webhook call).
fn allocation_settings(c: &ServerConfig) -> Result<AllocationSettings, ServerError> {
    let default_policy = provisio_core::allocation::Policy::parse(&c.allocation_policy)
        .filter(|p| *p != provisio_core::allocation::Policy::Custom)
        .ok_or_else(|| {
            ServerError::Config(format!(
                "allocation_policy '{}' must be hashed, geoLatency or static (custom is set per enrollment).",
                provisio_core::text::shorten(&c.allocation_policy)
            ))
        })?;
    let extra_ca_pem = match &c.webhook_ca_file {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?)
        }
        None => None,
    };
    Ok(AllocationSettings {
        default_policy,
        region: c.region.clone(),
        webhooks: WebhookSettings {
            timeout: Duration::from_secs(c.webhook_timeout_secs.max(1)),
            attempts: c.webhook_attempts,
            extra_ca_pem,
            addresses: AddressPolicy::parse(&c.webhook_allowed_networks)?,
        },
        registrar: RegistrarKind::parse(&c.hub_registrar)?,
    })
}

/// What the instance is opened with, from the configuration.
fn instance_settings(c: &ServerConfig) -> Result<InstanceSettings, ServerError> {
    let tls_files = match (&c.tls_cert, &c.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => return Err(ServerError::Config("--tls-cert and --tls-key must be given together".into())),
    };
    Ok(InstanceSettings {
        data_dir: c.data_dir.clone(),
        hostnames: c.effective_hostnames(),
        tls_files,
        https_port: c.https_listen.parse::<SocketAddr>().map_or(8443, |a| a.port()),
    })
}

/// The next connection on `listener`, with Nagle's algorithm off (answers are small and
/// wanted at once). An accept error (EMFILE and friends) is logged and retried after 50 ms
/// rather than in a spin. Cancel-safe.
pub(crate) async fn accept(listener: &TcpListener, name: &'static str) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, listener = name, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Binds an optional listener (`off` or empty: none).
async fn bind_optional(value: &str, flag: &str, listener: &'static str) -> Result<Option<TcpListener>, ServerError> {
    match value.trim() {
        "off" | "" => Ok(None),
        a => {
            let addr: SocketAddr =
                a.parse().map_err(|_| ServerError::Config(format!("{flag} '{a}' is not an address:port or 'off'")))?;
            Ok(Some(TcpListener::bind(addr).await.map_err(|source| ServerError::Listen { listener, addr, source })?))
        }
    }
}

/// Every ten minutes: deletes operations older than the retention period, and trims the
/// refusal records to their limit (each node trims after its own writes too; this covers
/// records written by nodes that have stopped since).
async fn housekeeping(store: Arc<dyn Store>, retention_hours: u64, refusals_kept: u32) {
    let retention = i64::try_from(retention_hours.saturating_mul(3600)).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        match store.purge_operations(provisio_store::unix_now().saturating_sub(retention)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired registration operations removed"),
            Err(e) => tracing::warn!(error = %e, "purging operations failed"),
        }
        match store.trim(provisio_store::Collection::Audit, refusals_kept).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(trimmed = n, kept = refusals_kept, "older refusal records removed"),
            Err(e) => tracing::warn!(error = %e, "trimming the refusal records failed"),
        }
    }
}

/// Writes this node's registration counts to the store once a minute, for the console's
/// chart on every node, and the audit log's summaries of refusals counted in windows that
/// have ended.
async fn flush_stats(engine: Engine) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Err(e) = engine.flush_stats().await {
            tracing::warn!(error = %e, "cannot write the registration counts");
        }
        engine.audit().tick().await;
    }
}

/// Internals the fuzz targets (`fuzz/`) drive directly, so that they exercise exactly the
/// parsers the listeners use. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::amqp::link::{tpm_sasl_init, tpm_sasl_segments};
    pub use crate::mqtt::session::drive_with_bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 11 of issue #24: the database was created with the umask's mode and restricted
    /// afterwards; now it is private from the moment it exists.
    #[cfg(unix)]
    #[test]
    fn the_data_directory_and_database_are_private_from_their_creation() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let db = dir.join("provisio.db");
        create_private_file(&db).unwrap();
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
        // An existing file keeps its content.
        std::fs::write(&db, b"data").unwrap();
        create_private_file(&db).unwrap();
        assert_eq!(std::fs::read(&db).unwrap(), b"data");
    }
}
