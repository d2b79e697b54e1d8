//! A device-side client of the Device Provisioning Service: registers a device and polls
//! until it is assigned, over HTTPS, MQTT or AMQP (the last two also over WebSockets),
//! against Provisio or Azure DPS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), provisio_client::ClientError> {
//! use provisio_client::{Credential, Options, Transport};
//! let mut opts = Options::new("0ne00000A0A", "my-device", Credential::GroupKey("…base64…".into()));
//! opts.endpoint = "dps.example.com:8443".into();
//! opts.transport = Transport::Mqtt;
//! let r = provisio_client::register(&opts, |_| {}).await?;
//! println!("{} on {}", r.device_id.unwrap_or_default(), r.assigned_hub.unwrap_or_default());
//! # Ok(()) }
//! ```

mod amqp;
pub mod csr;
mod http;
mod mqtt;
mod tls;
#[cfg(feature = "tpm")]
pub mod tss;
mod ws;

use std::time::Duration;

use provisio_proto::device::{DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus};
use serde_json::Value;
use thiserror::Error;

/// The public DPS global endpoint, the default.
pub const GLOBAL_ENDPOINT: &str = "global.azure-devices-provisioning.net";

/// The device API version the client speaks.
pub const API_VERSION: &str = "2019-03-31";

/// The device API version the client speaks when it sends a certificate signing request
/// ([`Options::csr`]): the first whose `DeviceRegistration` carries `csr` and whose result
/// carries `issuedCertificateChain`.
pub const CSR_API_VERSION: &str = "2025-07-01-preview";

/// How the device proves its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An individual enrollment's key (base64).
    SymmetricKey(String),
    /// A symmetric-key enrollment group's key: the device key is derived from it.
    GroupKey(String),
    /// An X.509 certificate chain (PEM, device first) and its private key (PEM).
    X509 {
        /// Certificate chain, PEM.
        chain_pem: String,
        /// Private key, PEM.
        key_pem: String,
    },
    /// A TPM (HTTPS only): the service's challenge delivers a key into it, which signs the
    /// SAS tokens.
    Tpm(Tpm),
}

/// A TPM as TPM attestation uses it. [`tss::TssTpm`] (feature `tpm`) is one on the TCG
/// software stack; tests may bring their own.
pub trait TpmDevice: Send {
    /// The endorsement key, as a marshalled `TPM2B_PUBLIC`.
    ///
    /// # Errors
    /// The TPM's, in words.
    fn endorsement_key(&mut self) -> Result<Vec<u8>, String>;
    /// The storage root key, as a marshalled `TPM2B_PUBLIC`.
    ///
    /// # Errors
    /// The TPM's, in words.
    fn storage_root_key(&mut self) -> Result<Vec<u8>, String>;
    /// Takes in the key an `authenticationKey` blob delivers (activate the credential with
    /// the EK, import and load the key under the SRK).
    ///
    /// # Errors
    /// The TPM's, in words (a blob made for another TPM fails here).
    fn take_in(&mut self, blob: &[u8]) -> Result<(), String>;
    /// HMAC-SHA256 of `data` with the key taken in last.
    ///
    /// # Errors
    /// The TPM's, in words, or no key taken in yet.
    fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, String>;
}

/// A shared [`TpmDevice`].
#[derive(Clone)]
pub struct Tpm(std::sync::Arc<std::sync::Mutex<Box<dyn TpmDevice>>>);

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tpm")
    }
}

/// The same TPM handle (a device has one TPM).
impl PartialEq for Tpm {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Tpm {}

impl Tpm {
    /// Wraps a TPM.
    #[must_use]
    pub fn new(device: impl TpmDevice + 'static) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Box::new(device))))
    }

    /// Runs `f` with the TPM; its error becomes a [`ClientError::Tpm`].
    ///
    /// # Errors
    /// `f`'s.
    pub fn with<R>(&self, f: impl FnOnce(&mut dyn TpmDevice) -> Result<R, String>) -> Result<R, ClientError> {
        let mut d = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(d.as_mut()).map_err(ClientError::Tpm)
    }
}

impl Credential {
    /// What to call it in messages.
    #[must_use]
    pub fn describe(&self) -> &'static str {
        match self {
            Self::SymmetricKey(_) => "the symmetric key",
            Self::GroupKey(_) => "the key derived from the group key",
            Self::X509 { .. } => "the X.509 certificate",
            Self::Tpm(_) => "the TPM",
        }
    }
}

/// The device transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// HTTPS (port 443 by default).
    #[default]
    Https,
    /// MQTT 3.1.1 over TLS (port 8883 by default).
    Mqtt,
    /// AMQP 1.0 over TLS (port 5671 by default).
    Amqp,
    /// MQTT over WebSockets (`wss://{host}/$iothub/websocket`, port 443 by default).
    MqttWs,
    /// AMQP over WebSockets (`wss://{host}/$iothub/websocket`, port 443 by default).
    AmqpWs,
}

/// What a registration needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host[:port]`; the port defaults to the transport's (443, 8883 or 5671; 443 over WebSockets).
    pub endpoint: String,
    /// The ID scope.
    pub scope: String,
    /// The registration id.
    pub registration_id: String,
    /// The credential.
    pub credential: Credential,
    /// The transport.
    pub transport: Transport,
    /// CA certificates (PEM) to trust instead of the system roots.
    pub ca_pem: Option<String>,
    /// Custom payload for allocation webhooks.
    pub payload: Option<Value>,
    /// Give up after this long.
    pub timeout: Duration,
    /// SAS token lifetime.
    pub token_lifetime: Duration,
    /// Shortest wait between polls, whatever `Retry-After` says (1 s; benchmarks use 0).
    pub min_poll_delay: Duration,
    /// A prebuilt TLS configuration (trusted roots and, for X.509, the device certificate)
    /// to use instead of building one from `ca_pem` and the credential: lets a simulator
    /// of many devices parse its CA once. Its ALPN list is set per transport.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// A PKCS#10 certificate signing request (DER) to send with the registration, for an
    /// operational certificate ([`csr::DeviceKey::request`] makes one). With it the client
    /// speaks [`CSR_API_VERSION`] on every transport, and an assigned [`Registration`] holds
    /// the issued chain.
    pub csr: Option<Vec<u8>>,
}

impl Options {
    /// Options with the defaults: the global endpoint, HTTPS, system roots, 2 minutes.
    #[must_use]
    pub fn new(scope: impl Into<String>, registration_id: impl Into<String>, credential: Credential) -> Self {
        Self {
            endpoint: GLOBAL_ENDPOINT.into(),
            scope: scope.into(),
            registration_id: registration_id.into(),
            credential,
            transport: Transport::Https,
            ca_pem: None,
            payload: None,
            timeout: Duration::from_secs(120),
            token_lifetime: Duration::from_secs(3600),
            min_poll_delay: Duration::from_secs(1),
            tls: None,
            csr: None,
        }
    }

    /// The device API version of the requests: [`CSR_API_VERSION`] with a [`Options::csr`],
    /// else [`API_VERSION`].
    #[must_use]
    pub fn api_version(&self) -> &'static str {
        if self.csr.is_some() { CSR_API_VERSION } else { API_VERSION }
    }

    /// The `csr` field of the register body: base64 of the DER request, no PEM armour.
    pub(crate) fn csr_field(&self) -> Option<String> {
        use base64::Engine as _;
        self.csr.as_ref().map(|der| base64::engine::general_purpose::STANDARD.encode(der))
    }

    /// `(host, port)` of the endpoint for the transport.
    ///
    /// # Errors
    /// A malformed endpoint.
    pub fn host_port(&self) -> Result<(String, u16), ClientError> {
        let default = match self.transport {
            Transport::Https | Transport::MqttWs | Transport::AmqpWs => 443,
            Transport::Mqtt => 8883,
            Transport::Amqp => 5671,
        };
        let e = self
            .endpoint
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("mqtts://")
            .trim_start_matches("amqps://")
            .trim_start_matches("wss://")
            .trim_end_matches('/');
        match e.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !h.contains(']') || h.ends_with(']') => {
                let port = p.parse().map_err(|_| ClientError::Config(format!("bad port in endpoint '{e}'")))?;
                Ok((h.trim_matches(['[', ']']).to_owned(), port))
            }
            _ if e.is_empty() => Err(ClientError::Config("the endpoint is empty".into())),
            _ => Ok((e.to_owned(), default)),
        }
    }

    /// The device key to sign SAS tokens with, if the credential is a key.
    ///
    /// # Errors
    /// A key that is not base64 of 16 to 64 bytes.
    pub fn device_key(&self) -> Result<Option<String>, ClientError> {
        match &self.credential {
            Credential::SymmetricKey(k) => {
                provisio_core::keys::decode_key(k).map_err(|e| ClientError::Config(format!("--key: {e}")))?;
                Ok(Some(k.clone()))
            }
            Credential::GroupKey(g) => Ok(Some(
                provisio_core::keys::derive_device_key(g, &self.registration_id)
                    .map_err(|e| ClientError::Config(format!("--group-key: {e}")))?,
            )),
            Credential::X509 { .. } | Credential::Tpm(_) => Ok(None),
        }
    }

    /// A SAS token for this device, or `None` for X.509.
    ///
    /// # Errors
    /// A bad key.
    pub fn sas_token(&self) -> Result<Option<String>, ClientError> {
        let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            + self.token_lifetime.as_secs();
        let resource = provisio_core::sas::device_resource(&self.scope, &self.registration_id);
        if let Credential::Tpm(tpm) = &self.credential {
            let signed = provisio_core::sas::build_token_signed(
                &resource,
                expiry,
                Some("registration"),
                provisio_core::sas::SrEncoding::Upper,
                |data| tpm.with(|t| t.sign(data)),
            )?;
            return Ok(Some(signed));
        }
        let Some(key) = self.device_key()? else { return Ok(None) };
        Ok(Some(
            provisio_core::sas::build_token(
                &resource,
                &key,
                expiry,
                Some("registration"),
                provisio_core::sas::SrEncoding::Upper,
            )
            .map_err(|e| ClientError::Config(e.to_string()))?,
        ))
    }
}

/// The outcome of a registration that reached a terminal state.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// `assigned`, `failed` or `disabled`.
    pub status: RegistrationStatus,
    /// The operation id.
    pub operation_id: String,
    /// The full registration state as the service sent it.
    pub state: DeviceRegistrationResult,
    /// The assigned hub (`assigned` only).
    pub assigned_hub: Option<String>,
    /// The device id at the hub (`assigned` only).
    pub device_id: Option<String>,
    /// The payload of a custom allocation webhook.
    pub payload: Option<Value>,
    /// The certificate issued for [`Options::csr`], DER: the leaf first, then each issuer up
    /// to the root. Empty when no request was sent (or the service issued none).
    pub issued_certificate_chain: Vec<Vec<u8>>,
}

impl Registration {
    /// [`Registration::issued_certificate_chain`] as PEM (leaf first); `None` when empty.
    #[must_use]
    pub fn issued_chain_pem(&self) -> Option<String> {
        (!self.issued_certificate_chain.is_empty()).then(|| csr::certificates_pem(&self.issued_certificate_chain))
    }
}

/// Where a registration stands, for progress displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Connecting and sending the register request.
    Registering,
    /// The service is assigning; polling again after this delay.
    Assigning {
        /// The operation id.
        operation_id: String,
        /// The delay before the next poll.
        retry_after: Duration,
        /// Polls so far.
        polls: u32,
    },
}

/// Why a registration did not complete, in terms a person can act on.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The options are wrong (bad key, missing file, malformed endpoint).
    #[error("configuration: {0}")]
    Config(String),
    /// The service could not be reached or the TLS handshake failed.
    #[error("network: {0}")]
    Network(String),
    /// The service refused the credential.
    #[error(
        "authentication: the service refused {credential} (HTTP {status}, errorCode {error_code}, trackingId {tracking_id}): {message}"
    )]
    Authentication {
        /// Which credential.
        credential: &'static str,
        /// HTTP (or MQTT topic) status.
        status: u16,
        /// DPS error code.
        error_code: u32,
        /// Tracking id to quote to the operator.
        tracking_id: String,
        /// The service's message.
        message: String,
    },
    /// The service answered with another error.
    #[error("service: HTTP {status}, errorCode {error_code}, trackingId {tracking_id}: {message}")]
    Service {
        /// Status.
        status: u16,
        /// DPS error code.
        error_code: u32,
        /// Tracking id.
        tracking_id: String,
        /// Message.
        message: String,
    },
    /// The registration ended `failed` or `disabled`.
    #[error("assignment: the registration ended {status:?} (errorCode {error_code}): {message}")]
    Assignment {
        /// `failed` or `disabled`.
        status: RegistrationStatus,
        /// DPS error code.
        error_code: u32,
        /// Message.
        message: String,
        /// The full state.
        state: Box<DeviceRegistrationResult>,
    },
    /// The service answered something that is not DPS.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The registration did not finish in time.
    #[error("timed out after {0:?} waiting for the assignment")]
    Timeout(Duration),
    /// The TPM refused or failed an operation.
    #[error("TPM: {0}")]
    Tpm(String),
}

impl ClientError {
    /// An error answer of the service (status + DPS error body).
    pub(crate) fn from_answer(status: u16, body: &[u8], credential: &Credential) -> Self {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let error_code = v
            .get("errorCode")
            .and_then(Value::as_u64)
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(u32::from(status) * 1000);
        let tracking_id = v.get("trackingId").and_then(Value::as_str).unwrap_or("-").to_owned();
        let message = v
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
        if status == 401 || status == 403 {
            Self::Authentication { credential: credential.describe(), status, error_code, tracking_id, message }
        } else {
            Self::Service { status, error_code, tracking_id, message }
        }
    }
}

/// Turns a terminal operation status into a result.
pub(crate) fn finish(op: RegistrationOperationStatus) -> Result<Registration, ClientError> {
    let state = op
        .registration_state
        .ok_or_else(|| ClientError::Protocol("a terminal answer without registrationState".into()))?;
    match op.status {
        RegistrationStatus::Assigned => Ok(Registration {
            status: op.status,
            operation_id: op.operation_id,
            assigned_hub: state.assigned_hub.clone(),
            device_id: state.device_id.clone(),
            payload: state.payload.clone(),
            issued_certificate_chain: decode_chain(state.issued_certificate_chain.as_deref().unwrap_or_default())?,
            state,
        }),
        s => Err(ClientError::Assignment {
            status: s,
            error_code: state.error_code.unwrap_or(0),
            message: state.error_message.clone().unwrap_or_else(|| format!("status {s:?}")),
            state: Box::new(state),
        }),
    }
}

/// The DER certificates of an `issuedCertificateChain` (base64 each).
fn decode_chain(chain: &[String]) -> Result<Vec<Vec<u8>>, ClientError> {
    use base64::Engine as _;
    chain
        .iter()
        .map(|c| {
            base64::engine::general_purpose::STANDARD.decode(c.trim()).map_err(|_| {
                ClientError::Protocol("issuedCertificateChain holds an entry that is not base64 DER".into())
            })
        })
        .collect()
}

/// The wait before the next poll: `Retry-After` (2 s when absent), at most 60 s and at
/// least `min`.
pub(crate) fn retry_delay(secs: Option<u64>, min: Duration) -> Duration {
    Duration::from_secs(secs.unwrap_or(2).min(60)).max(min)
}

/// An answer of the service on a connection: `(status, retry-after seconds, JSON body)`.
pub(crate) type Answer = (u16, Option<u64>, bytes::Bytes);

/// A connection that carries the device API's requests (MQTT, AMQP).
pub(crate) trait Requests {
    /// Sends the register request (`None`) or the status request of an operation, and waits
    /// for its answer.
    async fn request(&mut self, operation: Option<&str>) -> Result<Answer, ClientError>;
}

/// The register request's body.
pub(crate) fn registration_body(opts: &Options) -> Result<Vec<u8>, ClientError> {
    let body = provisio_proto::device::DeviceRegistration {
        registration_id: Some(opts.registration_id.clone()),
        tpm: None,
        payload: opts.payload.clone(),
        csr: opts.csr_field(),
    };
    serde_json::to_vec(&body).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Registers on `conn`, then polls until a terminal state. A transient answer (`429`,
/// `5xx`) repeats the last request after its `Retry-After`.
pub(crate) async fn register_and_poll(
    opts: &Options,
    conn: &mut impl Requests,
    mut progress: impl FnMut(Progress),
) -> Result<Registration, ClientError> {
    let (mut status, mut retry, mut answer) = conn.request(None).await?;
    let mut polls = 0;
    let mut operation: Option<String> = None;
    loop {
        if status == 429 || status >= 500 {
            tokio::time::sleep(retry_delay(retry, opts.min_poll_delay)).await;
        } else if !(200..300).contains(&status) {
            return Err(ClientError::from_answer(status, &answer, &opts.credential));
        } else {
            let op: RegistrationOperationStatus = serde_json::from_slice(&answer).map_err(|e| {
                ClientError::Protocol(format!("unexpected answer ({e}): {}", String::from_utf8_lossy(&answer)))
            })?;
            if op.status != RegistrationStatus::Assigning {
                return finish(op);
            }
            let delay = retry_delay(retry, opts.min_poll_delay);
            progress(Progress::Assigning { operation_id: op.operation_id.clone(), retry_after: delay, polls });
            tokio::time::sleep(delay).await;
            operation = Some(op.operation_id);
        }
        polls += 1;
        (status, retry, answer) = conn.request(operation.as_deref()).await?;
    }
}

/// Registers the device and polls until the service reaches a terminal state, honouring
/// `Retry-After`; `progress` hears about each step.
///
/// # Errors
/// A [`ClientError`] that says whether the network, the credential or the assignment failed.
pub async fn register(opts: &Options, progress: impl FnMut(Progress)) -> Result<Registration, ClientError> {
    if matches!(opts.credential, Credential::Tpm(_)) && opts.transport != Transport::Https {
        return Err(ClientError::Config(
            "TPM attestation goes over HTTPS here (DPS has no TPM over MQTT; AMQP's SASL TPM is the service's, not yet this client's)"
                .into(),
        ));
    }
    let work = async {
        match opts.transport {
            Transport::Https => http::register(opts, progress).await,
            Transport::Mqtt | Transport::MqttWs => mqtt::register(opts, progress).await,
            Transport::Amqp | Transport::AmqpWs => amqp::register(opts, progress).await,
        }
    };
    tokio::time::timeout(opts.timeout, work).await.map_err(|_| ClientError::Timeout(opts.timeout))?
}

/// The device's current registration state (`POST {scope}/registrations/{id}`, HTTPS).
///
/// # Errors
/// As [`register`].
pub async fn status(opts: &Options) -> Result<DeviceRegistrationResult, ClientError> {
    tokio::time::timeout(opts.timeout, http::status(opts)).await.map_err(|_| ClientError::Timeout(opts.timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let mut o = Options::new("s", "d", Credential::SymmetricKey("a2V5a2V5a2V5a2V5a2V5a2V5".into()));
        assert_eq!(o.host_port().unwrap(), (GLOBAL_ENDPOINT.to_owned(), 443));
        o.transport = Transport::Mqtt;
        assert_eq!(o.host_port().unwrap().1, 8883);
        o.transport = Transport::Amqp;
        assert_eq!(o.host_port().unwrap().1, 5671);
        o.endpoint = "amqps://dps.example".into();
        assert_eq!(o.host_port().unwrap(), ("dps.example".to_owned(), 5671));
        o.transport = Transport::MqttWs;
        o.endpoint = "wss://dps.example/".into();
        assert_eq!(o.host_port().unwrap(), ("dps.example".to_owned(), 443));
        o.transport = Transport::Mqtt;
        o.endpoint = GLOBAL_ENDPOINT.into();
        o.endpoint = "localhost:18443".into();
        assert_eq!(o.host_port().unwrap(), ("localhost".to_owned(), 18443));
        o.endpoint = "https://dps.example/".into();
        assert_eq!(o.host_port().unwrap(), ("dps.example".to_owned(), 8883));
        o.endpoint = "h:notaport".into();
        assert!(o.host_port().is_err());
    }

    #[test]
    fn group_keys_are_derived() {
        let o = Options::new(
            "0ne1",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
            Credential::GroupKey(
                "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==".into(),
            ),
        );
        assert_eq!(o.device_key().unwrap().as_deref(), Some("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="));
        assert!(
            o.sas_token().unwrap().unwrap().contains("sr=0ne1%2Fregistrations%2Fsn-007-888-abc-mac-a1-b2-c3-d4-e5-f6")
        );
    }
}
