//! Server configuration. The binary fills it from flags, `PROVISIO_*` variables and a
//! TOML file (flags win); every field has a default that suits a first run.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything `provisio serve` can be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the embedded database, `ca.pem` and other state live.
    pub data_dir: PathBuf,
    /// A shared PostgreSQL database (`postgres://user:pass@host:5432/db`) instead of the
    /// embedded SQLite one; every node of an instance points at the same one.
    pub database: Option<String>,
    /// Connections each node keeps to the shared database.
    pub database_max_connections: u32,
    /// Address of the HTTPS listener (device API, service API, `/health`).
    pub https_listen: String,
    /// Address of the MQTT-over-TLS listener, or `off`.
    pub mqtt_listen: String,
    /// Address of the AMQP-over-TLS listener (AMQP 1.0, port 5671 for stock SDKs), or `off`.
    pub amqp_listen: String,
    /// Host names and IP addresses the server certificate covers; the first is the one
    /// printed in the endpoint and the service connection string. Default: `localhost`,
    /// `127.0.0.1` and the machine's host name.
    pub hostnames: Vec<String>,
    /// TLS certificate chain (PEM) to serve instead of one issued by the local CA.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// IoT hubs linked at start (added if not linked yet; manage them with the hubs API).
    /// On the very first start without any, one hub named after the instance is linked.
    pub linked_hubs: Vec<String>,
    /// The service-level default allocation policy: hashed, geoLatency or static.
    pub allocation_policy: String,
    /// This node's region, for `geoLatency` allocation.
    pub region: Option<String>,
    /// Time allowed for one custom allocation webhook call (and hub registrar call), seconds.
    pub webhook_timeout_secs: u64,
    /// Attempts per webhook call (server errors, throttling and network failures are retried).
    pub webhook_attempts: u32,
    /// Extra CA certificates (PEM) to trust for https webhooks.
    pub webhook_ca_file: Option<PathBuf>,
    /// Networks (CIDRs such as `10.0.0.0/8`, or single addresses) that custom allocation
    /// webhooks and hub registrars may reach besides public addresses, over `http` too.
    /// Loopback, private, link-local and other non-public addresses outside them are never
    /// called, and public ones only over `https`. Empty by default.
    pub webhook_allowed_networks: Vec<String>,
    /// What happens at the hub once a device is assigned: `none`, or `webhook` (POST the
    /// identity to the hub's `registrarWebhookUrl`).
    pub hub_registrar: String,
    /// `Retry-After` sent with `assigning` answers, in seconds.
    pub retry_after_secs: u32,
    /// Clock skew tolerated on SAS token expiry, in seconds.
    pub sas_clock_skew_secs: u64,
    /// Largest request body accepted, in bytes (DPS's documented cap is 96 KB).
    pub max_body_bytes: usize,
    /// Most simultaneous connections; more are closed at once.
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Registrations per second this node accepts (0: no limit); more get 429.
    pub registrations_per_second: u32,
    /// Polls a device may make per 10 s (DPS: 5; 0: no limit); more get 429.
    pub device_polls_per_10s: usize,
    /// Device operations (registrations, polls, status queries) this node works on at
    /// once, over every transport (0: no limit); more get 429 with Retry-After.
    pub max_concurrent_operations: usize,
    /// Time allowed for a TLS handshake, in seconds.
    pub handshake_timeout_secs: u64,
    /// Time allowed for a request's headers to arrive (also closes idle keep-alive
    /// connections), in seconds.
    pub header_timeout_secs: u64,
    /// Time allowed to handle one request, in seconds.
    pub request_timeout_secs: u64,
    /// How long registration operations can be polled, in hours.
    pub operation_retention_hours: u64,
    /// Refused X.509 attestations kept in the store for `GET /registrations/{id}/audit`
    /// (the most recent ones; 0 keeps none). Their ids are whatever a client wrote in its
    /// certificate, so the number is bounded; the audit log records every refusal anyway.
    pub refusal_records_kept: u32,
    /// Refused X.509 attempts one client address (an IPv6 /64) may make per minute; beyond,
    /// its X.509 requests get `429` without a chain validation (0: no limit).
    pub x509_refusals_per_ip_per_minute: usize,
    /// Azure's stricter rule for X.509 groups: a group's uploaded signing certificate
    /// anchors chains only if it is, or is signed by, a verified CA certificate of the
    /// certificates API. Off by default: an uploaded intermediate is trusted as is.
    pub x509_signing_certificates_need_verified_ca: bool,
    /// Service API requests per second (bursts to twice that); 0 disables the limit.
    pub service_requests_per_second: u32,
    /// Most items in one bulk enrollment operation (DPS: 10).
    pub max_bulk_items: usize,
    /// Largest query page (`x-ms-max-item-count`); the default page is 100.
    pub max_query_page_size: u32,
    /// Largest AMQP frame accepted (the max-frame-size announced in Open), in bytes.
    pub amqp_max_frame_bytes: u32,
    /// Most AMQP sessions on one connection (devices use one).
    pub amqp_max_sessions: u16,
    /// Most AMQP links on one connection (devices use two).
    pub amqp_max_links: usize,
    /// AMQP idle timeout announced in Open, in seconds: a connection on which the device
    /// sends nothing (not even an empty frame) for this long is closed.
    pub amqp_idle_timeout_secs: u64,
    /// How long enrollment groups and linked hubs are cached, in milliseconds (changes made
    /// through another node apply within this time; 0 disables the cache).
    pub cache_ttl_ms: u64,
    /// How long a device's verified credential is remembered for its polls and status
    /// queries, in seconds (0: verify every request). Register requests always verify.
    pub poll_auth_cache_secs: u64,
    /// Key (base64 of 32 random bytes) that encrypts symmetric keys, policy keys and
    /// private keys in the store (AES-256-GCM). Unset: stored in plain.
    pub encryption_key: Option<Secret>,
    /// Older keys, only used to read values sealed before a rotation.
    pub encryption_previous_keys: Vec<Secret>,
    /// The audit log (JSON lines): a file path, empty for `{data_dir}/audit.jsonl`, or `off`.
    pub audit_log: String,
    /// Size at which the audit log is rotated, in MiB.
    pub audit_log_max_mb: u64,
    /// Rotated audit log files kept (`audit.jsonl.1` is the newest).
    pub audit_log_keep: u32,
    /// Refusals of unauthenticated requests written in full per client address (an IPv6
    /// client's /64) per minute; more are counted in one summary line (0: no limit).
    pub audit_log_refusals_per_minute: u32,
    /// Serve the web console at `/console` on the HTTPS listener.
    pub console: bool,
    /// `https://host[:port]` at which devices and brokers reach this service: issued
    /// certificates name their CA's CRL under it (`{public_url}/crl/{ca}.crl`). Unset: no CRL
    /// distribution point in issued certificates.
    pub public_url: Option<String>,
}

/// A configured secret: kept out of `Debug` output so it never reaches a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./provisio-data"),
            database: None,
            database_max_connections: 16,
            https_listen: "0.0.0.0:8443".into(),
            mqtt_listen: "0.0.0.0:8883".into(),
            amqp_listen: "0.0.0.0:5671".into(),
            hostnames: Vec::new(),
            tls_cert: None,
            tls_key: None,
            linked_hubs: Vec::new(),
            allocation_policy: "hashed".into(),
            region: None,
            webhook_timeout_secs: 5,
            webhook_attempts: 2,
            webhook_ca_file: None,
            webhook_allowed_networks: Vec::new(),
            hub_registrar: "none".into(),
            retry_after_secs: 2,
            sas_clock_skew_secs: 30,
            max_body_bytes: 96 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 100,
            max_headers: 100,
            registrations_per_second: 0,
            device_polls_per_10s: 5,
            max_concurrent_operations: 1024,
            handshake_timeout_secs: 10,
            header_timeout_secs: 30,
            request_timeout_secs: 30,
            operation_retention_hours: 24,
            refusal_records_kept: 10_000,
            x509_refusals_per_ip_per_minute: 30,
            x509_signing_certificates_need_verified_ca: false,
            service_requests_per_second: 200,
            max_bulk_items: 10,
            max_query_page_size: 1000,
            amqp_max_frame_bytes: 64 * 1024,
            amqp_max_sessions: 4,
            amqp_max_links: 8,
            amqp_idle_timeout_secs: 240,
            cache_ttl_ms: 1000,
            poll_auth_cache_secs: 30,
            encryption_key: None,
            encryption_previous_keys: Vec::new(),
            audit_log: String::new(),
            audit_log_max_mb: 100,
            audit_log_keep: 5,
            audit_log_refusals_per_minute: 10,
            console: true,
            public_url: None,
        }
    }
}

impl ServerConfig {
    /// The audit log's file, or `None` when it is `off`.
    #[must_use]
    pub fn audit_log_path(&self) -> Option<PathBuf> {
        match self.audit_log.trim() {
            "off" => None,
            "" => Some(self.data_dir.join("audit.jsonl")),
            p => Some(PathBuf::from(p)),
        }
    }

    /// The host names to serve: the configured ones, or the defaults.
    #[must_use]
    pub fn effective_hostnames(&self) -> Vec<String> {
        if !self.hostnames.is_empty() {
            return self.hostnames.clone();
        }
        let mut v = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if let Some(h) = gethostname::gethostname().to_str() {
            let h = h.to_ascii_lowercase();
            if provisio_pki::is_dns_name(&h) && !v.contains(&h) {
                v.push(h);
            }
        }
        v
    }
}
