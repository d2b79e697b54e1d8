//! The instance: ID scope, shared access policies, local CA and server certificate.
//!
//! All of it lives in the store, so that a restart (or, with a shared database, another
//! node) finds the same instance. The CA certificate is also written to
//! `{data_dir}/ca.pem` for clients to trust.

use std::path::{Path, PathBuf};

use provisio_core::{ids::IdScope, keys, timefmt};
use provisio_pki::CertAndKey;
use provisio_store::{Collection, Precondition, Store};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::SetupError;

/// Name of the policy every new instance gets.
pub const OWNER_POLICY: &str = "provisioningserviceowner";

/// Stored identity of the instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The ID scope.
    pub id_scope: String,
    /// The local CA (certificate and key, PEM).
    pub ca_cert_pem: String,
    /// The local CA's key, PEM.
    pub ca_key_pem: String,
    /// When the instance was created.
    pub created: String,
}

/// A shared access policy of the service API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Policy (key) name.
    pub key_name: String,
    /// Primary key, base64.
    pub primary_key: String,
    /// Secondary key, base64.
    pub secondary_key: String,
    /// Rights, e.g. `ServiceConfig, DeviceConnect, EnrollmentWrite`.
    pub rights: String,
}

/// A stored server certificate and the names it was issued for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerCert {
    hostnames: Vec<String>,
    cert_pem: String,
    key_pem: String,
}

/// Where clients reach this instance; recorded at each start for `provisio info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Host name devices and operators use.
    pub hostname: String,
    /// HTTPS port.
    pub https_port: u16,
}

/// The facts `provisio serve` prints on start and `provisio info` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInfo {
    /// ID scope.
    pub id_scope: String,
    /// Device endpoint host (what devices use as "global endpoint").
    pub device_endpoint: String,
    /// `https://host:port` of the device and service APIs.
    pub https_endpoint: String,
    /// Connection string of the owner policy.
    pub service_connection_string: String,
    /// The CA file clients should trust (absent when serving an operator's certificate).
    pub ca_cert_file: Option<PathBuf>,
    /// Linked hubs.
    pub linked_hubs: Vec<String>,
    /// `host:port` of the MQTT listener, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_endpoint: Option<String>,
    /// `host:port` of the AMQP listener, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_endpoint: Option<String>,
}

impl InstanceInfo {
    /// The owner policy's key, from the service connection string.
    #[must_use]
    pub fn owner_key(&self) -> Option<&str> {
        self.service_connection_string.split(';').find_map(|p| p.strip_prefix("SharedAccessKey="))
    }

    /// The same facts with the owner's key left out of the connection string: what `serve`
    /// prints after the first start, since its output ends up in journald and container logs.
    #[must_use]
    pub fn without_key(&self) -> Self {
        let mut info = self.clone();
        info.service_connection_string = self
            .service_connection_string
            .split(';')
            .filter(|p| !p.starts_with("SharedAccessKey="))
            .collect::<Vec<_>>()
            .join(";");
        info
    }

    /// The MQTT listener's port, when it runs.
    #[must_use]
    pub fn mqtt_port(&self) -> Option<u16> {
        port_of(self.mqtt_endpoint.as_deref())
    }

    /// The AMQP listener's port, when it runs.
    #[must_use]
    pub fn amqp_port(&self) -> Option<u16> {
        port_of(self.amqp_endpoint.as_deref())
    }

    /// The HTTPS port of the device endpoint (443 when it names none).
    #[must_use]
    pub fn https_port(&self) -> u16 {
        port_of(Some(&self.device_endpoint)).unwrap_or(443)
    }
}

/// The port of a `host:port` endpoint.
fn port_of(endpoint: Option<&str>) -> Option<u16> {
    endpoint.and_then(|e| e.rsplit_once(':')).and_then(|(_, p)| p.parse().ok())
}

/// A loaded instance.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The instance identity.
    pub identity: Identity,
    /// The parsed scope.
    pub scope: IdScope,
    /// The owner policy.
    pub owner: Policy,
    /// TLS chain and key to serve (PEM).
    pub tls: CertAndKey,
    /// Whether `tls` was issued by the local CA (so `ca.pem` is the one to trust).
    pub local_ca: bool,
    /// Whether this start created the owner policy (the first start of the instance): only
    /// then is its key printed.
    pub created: bool,
}

/// What the instance is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSettings {
    /// Where `ca.pem` is written for clients to trust.
    pub data_dir: PathBuf,
    /// Host names and IP addresses the server certificate covers; the first is the one
    /// printed in the endpoint and the service connection string.
    pub hostnames: Vec<String>,
    /// An operator's certificate chain and key (PEM files) to serve instead of one issued
    /// by the local CA.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// The configured HTTPS port (the endpoint printed before the listener is bound).
    pub https_port: u16,
}

fn json<T: Serialize>(what: &'static str, v: &T) -> Result<String, SetupError> {
    serde_json::to_string(v).map_err(|e| SetupError::Corrupt { what, detail: e.to_string() })
}

fn parse<T: for<'a> Deserialize<'a>>(what: &'static str, s: &str) -> Result<T, SetupError> {
    serde_json::from_str(s).map_err(|e| SetupError::Corrupt { what, detail: e.to_string() })
}

fn random4() -> [u8; 4] {
    rand::random()
}

/// Loads the instance, creating it on first start.
///
/// # Errors
/// If the store fails, a TLS file cannot be read or the CA cannot be written.
pub async fn load_or_init(store: &dyn Store, config: &InstanceSettings) -> Result<Instance, SetupError> {
    let fresh = || -> Result<String, SetupError> {
        let scope = IdScope::generate(random4());
        let ca =
            provisio_pki::generate_ca(&format!("Provisio CA {scope}")).map_err(|e| SetupError::Pki(e.to_string()))?;
        json(
            "identity",
            &Identity {
                id_scope: scope.to_string(),
                ca_cert_pem: ca.cert_pem,
                ca_key_pem: ca.key_pem,
                created: timefmt::now(),
            },
        )
    };
    // insert_if_absent: two nodes starting together on one database agree on one identity.
    let identity: Identity =
        parse("identity", &store.insert_if_absent(Collection::Meta, "identity", &fresh()?).await?.body)?;
    let scope = IdScope::parse(&identity.id_scope)
        .map_err(|e| SetupError::Corrupt { what: "identity", detail: e.to_string() })?;

    let owner = json(
        "policy",
        &Policy {
            key_name: OWNER_POLICY.into(),
            primary_key: keys::generate_key(),
            secondary_key: keys::generate_key(),
            rights: "ServiceConfig, DeviceConnect, EnrollmentWrite".into(),
        },
    )?;
    let stored = store.insert_if_absent(Collection::Policies, OWNER_POLICY, &owner).await?;
    // The offered body holds fresh random keys: the same body back means this call wrote it.
    let created = stored.body == owner;
    let owner: Policy = parse("policy", &stored.body)?;

    let ca = CertAndKey { cert_pem: identity.ca_cert_pem.clone(), key_pem: identity.ca_key_pem.clone() };
    let (tls, local_ca) = match &config.tls_files {
        Some((cert, key)) => (CertAndKey { cert_pem: read(cert).await?, key_pem: read(key).await? }, false),
        None => (server_cert(store, &ca, &config.hostnames).await?, true),
    };
    if local_ca {
        write_ca(&config.data_dir, &identity.ca_cert_pem).await?;
    }
    Ok(Instance { identity, scope, owner, tls, local_ca, created })
}

async fn read(path: &Path) -> Result<String, SetupError> {
    tokio::fs::read_to_string(path).await.map_err(|source| SetupError::File {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Reuses the stored server certificate while it covers `hostnames` and has more than
/// 30 days left; otherwise issues a new one from the local CA.
async fn server_cert(store: &dyn Store, ca: &CertAndKey, hostnames: &[String]) -> Result<CertAndKey, SetupError> {
    if let Some(doc) = store.get(Collection::Meta, "serverCert").await? {
        let stored: ServerCert = parse("server certificate", &doc.body)?;
        let fresh_enough = provisio_pki::summarize(&stored.cert_pem)
            .is_ok_and(|s| s.not_after > OffsetDateTime::now_utc() + time::Duration::days(30));
        if stored.hostnames == hostnames && fresh_enough {
            return Ok(CertAndKey { cert_pem: stored.cert_pem, key_pem: stored.key_pem });
        }
    }
    let issued = provisio_pki::issue_server_cert(ca, hostnames).map_err(|e| SetupError::Config(e.to_string()))?;
    let stored = ServerCert {
        hostnames: hostnames.to_vec(),
        cert_pem: issued.cert_pem.clone(),
        key_pem: issued.key_pem.clone(),
    };
    store.put(Collection::Meta, "serverCert", &json("server certificate", &stored)?, Precondition::Any).await?;
    // Serve the chain, so clients that trust only the CA can build the path.
    Ok(CertAndKey { cert_pem: format!("{}{}", issued.cert_pem, ca.cert_pem), key_pem: issued.key_pem })
}

async fn write_ca(dir: &Path, pem: &str) -> Result<(), SetupError> {
    let path = dir.join("ca.pem");
    if tokio::fs::read_to_string(&path).await.is_ok_and(|s| s == pem) {
        return Ok(());
    }
    let tmp = dir.join("ca.pem.tmp");
    tokio::fs::write(&tmp, pem).await.and(tokio::fs::rename(&tmp, &path).await).map_err(|source| SetupError::File {
        action: "write",
        path: path.clone(),
        source,
    })
}

/// The key that signs the web console's session cookies: made once per instance, kept in
/// the store (sealed at rest like every key), so that every node accepts every session.
///
/// # Errors
/// Store failures, or a stored key that is not 32 bytes of base64.
pub async fn console_session_key(store: &dyn Store) -> Result<[u8; 32], SetupError> {
    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct SessionKey {
        session_key: String,
    }
    let fresh: [u8; 32] = rand::random();
    let body = json(
        "console session key",
        &SessionKey { session_key: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, fresh) },
    )?;
    let doc = store.insert_if_absent(Collection::Meta, "consoleSessionKey", &body).await?;
    let stored: SessionKey = parse("console session key", &doc.body)?;
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, stored.session_key.trim())
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or(SetupError::Corrupt { what: "console session key", detail: "not 32 bytes of base64".into() })
}

/// Records where this instance is served, for `provisio info`.
///
/// # Errors
/// If the store fails.
pub async fn record_endpoint(store: &dyn Store, endpoint: &Endpoint) -> Result<(), SetupError> {
    store.put(Collection::Meta, "endpoint", &json("endpoint", endpoint)?, Precondition::Any).await?;
    Ok(())
}

/// Reads the facts of an initialised instance without starting it.
///
/// # Errors
/// If the instance was never initialised or the store fails.
pub async fn read_info(store: &dyn Store, config: &InstanceSettings) -> Result<Option<InstanceInfo>, SetupError> {
    let Some(identity) = store.get(Collection::Meta, "identity").await? else {
        return Ok(None);
    };
    let identity: Identity = parse("identity", &identity.body)?;
    let owner: Policy = match store.get(Collection::Policies, OWNER_POLICY).await? {
        Some(d) => parse("policy", &d.body)?,
        None => return Ok(None),
    };
    let endpoint = match store.get(Collection::Meta, "endpoint").await? {
        Some(d) => parse("endpoint", &d.body)?,
        None => default_endpoint(config),
    };
    let ca_file = config.data_dir.join("ca.pem");
    let local_ca = config.tls_files.is_none() && tokio::fs::metadata(&ca_file).await.is_ok();
    Ok(Some(info(
        &identity.id_scope,
        &owner,
        &endpoint,
        local_ca.then_some(ca_file),
        crate::hubs::Hubs::linked_names(store).await?,
    )))
}

/// The endpoint implied by the configuration.
#[must_use]
pub fn default_endpoint(config: &InstanceSettings) -> Endpoint {
    Endpoint {
        hostname: config.hostnames.first().cloned().unwrap_or_else(|| "localhost".into()),
        https_port: config.https_port,
    }
}

/// The hub linked on first start when none is configured: named after the instance.
#[must_use]
pub fn default_hub_name(scope: &str) -> String {
    format!("{}.hub.provisio.local", scope.to_ascii_lowercase())
}

/// Builds the printed facts.
#[must_use]
pub fn info(
    scope: &str,
    owner: &Policy,
    endpoint: &Endpoint,
    ca_cert_file: Option<PathBuf>,
    linked_hubs: Vec<String>,
) -> InstanceInfo {
    let host = if endpoint.https_port == 443 {
        endpoint.hostname.clone()
    } else {
        format!("{}:{}", endpoint.hostname, endpoint.https_port)
    };
    InstanceInfo {
        id_scope: scope.to_owned(),
        device_endpoint: host.clone(),
        https_endpoint: format!("https://{host}"),
        service_connection_string: format!(
            "HostName={host};SharedAccessKeyName={};SharedAccessKey={}",
            owner.key_name, owner.primary_key
        ),
        ca_cert_file,
        linked_hubs,
        mqtt_endpoint: None,
        amqp_endpoint: None,
    }
}
