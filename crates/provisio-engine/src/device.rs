//! The device API, once for every transport.
//!
//! A front-end extracts what its framing carries (the origin, the scope and registration
//! id, the operation id of a poll, the api-version, the body bytes and the credential) into a
//! [`DeviceRequest`] and calls [`Engine::device`]. Every DPS rule is decided here: the
//! api-version, body parsing and the body-id check, the TPM challenge of a first request,
//! `202` or `200`, and when a retry hint is given. The [`Answer`] says what to send; the
//! front-end only frames it (HTTP status and headers, the MQTT response topic, AMQP
//! properties or a Rejected outcome).
//!
//! Where the transports really differ, it is because DPS's do (`spec/device-api.md`):
//! the TPM challenge is answered in band only over HTTPS (AMQP runs it in SASL, see
//! [`Engine::keep_tpm_challenge`]; MQTT has none), and the status lookup (`POST
//! {scope}/registrations/{id}`) exists only over HTTPS.

use std::net::IpAddr;

use provisio_proto::{
    DEVICE_API_VERSIONS,
    device::{DeviceRegistration, RegistrationOperationStatus, RegistrationStatus},
};
use serde::Serialize;

use crate::{Engine, Error};

/// The transport a request came over (for the audit log, and for the one rule that
/// depends on it: where a TPM challenge is answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTPS (the REST device API).
    Https,
    /// MQTT over TLS.
    Mqtt,
    /// MQTT over a WebSocket on the HTTPS listener.
    MqttWs,
    /// AMQP over TLS.
    Amqp,
    /// AMQP over a WebSocket on the HTTPS listener.
    AmqpWs,
    /// A caller inside the process (tests, tools).
    Internal,
}

impl Transport {
    /// The name the audit log uses.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Mqtt => "mqtt",
            Self::MqttWs => "mqtt-ws",
            Self::Amqp => "amqp",
            Self::AmqpWs => "amqp-ws",
            Self::Internal => "internal",
        }
    }

    /// Whether a register request without a credential and with a `tpm` block is answered
    /// with the TPM challenge (`401` and the key): DPS does so over HTTPS. Over AMQP the
    /// challenge is the SASL `TPM` mechanism's exchange, and MQTT has no TPM attestation.
    #[must_use]
    pub fn challenges_tpm_in_band(self) -> bool {
        matches!(self, Self::Https | Self::Internal)
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The transport.
    pub transport: Transport,
    /// The client's IP address.
    pub peer: Option<IpAddr>,
}

impl Origin {
    /// A request over `transport` from `peer`.
    #[must_use]
    pub fn new(transport: Transport, peer: Option<IpAddr>) -> Self {
        Self { transport, peer }
    }
}

/// The credential a front-end extracted from the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A SAS token (`Authorization` header, MQTT password, SASL PLAIN password, or the SAS
    /// token that ends a SASL `TPM` exchange).
    Sas(String),
    /// The client certificate chain from the TLS handshake, leaf first (DER).
    X509(Vec<Vec<u8>>),
    /// Nothing was presented.
    None,
}

impl Credential {
    /// The attestation kind, as the audit log names it.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sas(_) => "symmetricKey",
            Self::X509(_) => "x509",
            Self::None => "none",
        }
    }

    /// A SHA-256 of `registration_key` and the exact credential (the whole SAS token, or the
    /// whole certificate chain), for the cache of credentials proven moments ago; `None`
    /// for no credential, which is never remembered.
    #[must_use]
    pub(crate) fn fingerprint(&self, registration_key: &str) -> Option<[u8; 32]> {
        use aws_lc_rs::digest::{Context, SHA256};
        let mut ctx = Context::new(&SHA256);
        ctx.update(registration_key.as_bytes());
        match self {
            Self::Sas(token) => {
                ctx.update(b"\0sas\0");
                ctx.update(token.as_bytes());
            }
            Self::X509(chain) => {
                ctx.update(b"\0x509");
                for der in chain {
                    ctx.update(&(der.len() as u64).to_be_bytes());
                    ctx.update(der);
                }
            }
            Self::None => return None,
        }
        ctx.finish().as_ref().try_into().ok()
    }

    /// What a front-end found: a SAS token wins over a client certificate (a device may
    /// hold both); with neither, [`Credential::None`].
    #[must_use]
    pub fn from_parts(sas: Option<String>, chain: Vec<Vec<u8>>) -> Self {
        match (sas, chain.is_empty()) {
            (Some(t), _) => Self::Sas(t),
            (None, false) => Self::X509(chain),
            (None, true) => Self::None,
        }
    }
}

/// Refused X.509 attempts one connection may make. Its chain is fixed by the TLS handshake,
/// so repeating a refused one on the same connection cannot help; a device that is fixed
/// (or a group that is added) connects again.
pub const MAX_X509_REFUSALS_PER_CONNECTION: u32 = 3;

/// What the engine keeps about one connection, across its requests: the front-end holds one
/// per connection and passes it with every request.
#[derive(Debug, Default)]
pub struct Connection {
    refused_x509: std::sync::atomic::AtomicU32,
}

impl Connection {
    fn x509_exhausted(&self, credential: &Credential) -> bool {
        matches!(credential, Credential::X509(_))
            && self.refused_x509.load(std::sync::atomic::Ordering::Relaxed) >= MAX_X509_REFUSALS_PER_CONNECTION
    }

    /// Counts a refused X.509 answer; true when the connection has used up its attempts.
    fn note(&self, credential: &Credential, answer: &Answer) -> bool {
        if !matches!(credential, Credential::X509(_)) || answer.status != 401 {
            return false;
        }
        self.refused_x509.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= MAX_X509_REFUSALS_PER_CONNECTION
    }
}

/// What a device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOperation<'a> {
    /// `PUT {scope}/registrations/{id}/register`, MQTT `iotdps-register`, AMQP
    /// `iotdps-register`: the `DeviceRegistration` body as sent (possibly empty).
    Register {
        /// The body.
        body: &'a [u8],
    },
    /// `GET …/operations/{operationId}`, MQTT and AMQP `iotdps-get-operationstatus`
    /// (empty when the framing carried none; the body of a poll carries nothing).
    OperationStatus {
        /// The operation id.
        operation_id: &'a str,
    },
    /// `POST {scope}/registrations/{id}`: the device's current registration state.
    RegistrationStatus {
        /// The `DeviceRegistration` body as sent.
        body: &'a [u8],
    },
}

/// One device request, as a front-end extracted it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRequest<'a> {
    /// Transport and peer.
    pub origin: Origin,
    /// The ID scope the request names.
    pub scope: &'a str,
    /// The registration id the request names (path, MQTT username, AMQP address).
    pub registration_id: &'a str,
    /// The api-version the request carries (query parameter, MQTT username, AMQP attach
    /// property), if any.
    pub api_version: Option<&'a str>,
    /// What is asked.
    pub operation: DeviceOperation<'a>,
    /// The credential.
    pub credential: &'a Credential,
    /// The connection the request came on.
    pub connection: &'a Connection,
}

/// The DPS error code and tracking id of an error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerError {
    /// `errorCode`.
    pub code: u32,
    /// `trackingId` (logged with the cause; HTTP also sends it as `x-ms-request-id`).
    pub tracking_id: String,
}

/// What to send back, whatever the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP-style status (also the MQTT topic's and AMQP's `iotdps-status`).
    pub status: u16,
    /// Seconds to wait before the next request, when the client should be told.
    pub retry_after: Option<u32>,
    /// The JSON body.
    pub body: Vec<u8>,
    /// Set for error answers.
    pub error: Option<AnswerError>,
    /// The connection should be closed once this answer is sent (it has used up its
    /// refused X.509 attempts, [`MAX_X509_REFUSALS_PER_CONNECTION`]).
    pub close_connection: bool,
}

impl Answer {
    /// A JSON answer.
    #[must_use]
    pub fn json<T: Serialize + ?Sized>(status: u16, retry_after: Option<u32>, body: &T) -> Self {
        match crate::to_json(body) {
            Ok(body) => Self { status, retry_after, body, error: None, close_connection: false },
            Err(e) => Self::error(&Error::Internal(format!("serialising an answer: {e}"))),
        }
    }

    /// The answer for `e`: its DPS error body, its status, and its retry hint
    /// ([`Error::retry_after`]). The failure is logged under the body's tracking id.
    #[must_use]
    pub fn error(e: &Error) -> Self {
        let body = e.to_body();
        let error = AnswerError { code: body.error_code, tracking_id: body.tracking_id.clone() };
        Self {
            status: e.status(),
            retry_after: e.retry_after().map(|s| u32::try_from(s).unwrap_or(u32::MAX)),
            body: serde_json::to_vec(&body).unwrap_or_default(),
            error: Some(error),
            close_connection: false,
        }
    }

    /// Whether the request succeeded (a `2xx` answer).
    #[must_use]
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl Error {
    /// This error as an [`Answer`].
    #[must_use]
    pub fn answer(&self) -> Answer {
        Answer::error(self)
    }
}

/// Checks an `api-version` against the `known` ones: required, and one of the list, on
/// every transport and in both APIs (DPS answers `400` / `400004`).
///
/// # Errors
/// `400` / `400004` for a missing or unknown version.
pub fn check_api_version(known: &[&str], given: Option<&str>) -> Result<(), Error> {
    match given.map(str::trim).filter(|v| !v.is_empty()) {
        None => Err(Error::invalid(
            "The request carries no api-version (the api-version query parameter over HTTPS, api-version= in the \
             MQTT username, the com.microsoft:api-version link property over AMQP).",
        )),
        Some(v) if provisio_proto::is_supported_api_version(known, v) => Ok(()),
        Some(v) => Err(Error::invalid(format!(
            "Unsupported API version {}. Supported versions: {}.",
            provisio_core::text::shorten(v),
            known.join(", ")
        ))),
    }
}

/// Parses a `DeviceRegistration` body ([`crate::bodies::device_registration`]: blank
/// bodies mean "no fields").
fn registration_body(body: &[u8]) -> Result<DeviceRegistration, Error> {
    crate::bodies::device_registration(body)
        .map_err(|e| Error::malformed(format!("The request body is not a valid DeviceRegistration: {e}")))
}

/// The body's `registrationId`, when given, must name the device of the request (compared
/// case-insensitively, as registration ids are).
pub(crate) fn check_body_id(registration_id: &str, body: &DeviceRegistration) -> Result<(), Error> {
    match &body.registration_id {
        Some(body_id) if !body_id.eq_ignore_ascii_case(registration_id) => Err(Error::invalid(format!(
            "The body's registrationId '{}' does not match the registration id '{}' of the request.",
            provisio_core::text::shorten(body_id),
            provisio_core::text::shorten(registration_id)
        ))),
        _ => Ok(()),
    }
}

/// The body of a TPM challenge (`spec/device-api.md` §3.2): the key for the TPM and the key
/// name to sign with (the C SDK needs `keyName`), and no `status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TpmChallengeBody<'a> {
    authentication_key: &'a str,
    key_name: &'a str,
    message: &'a str,
}

impl Engine {
    /// Serves one device request, over any transport.
    pub async fn device(&self, request: DeviceRequest<'_>) -> Answer {
        if request.connection.x509_exhausted(request.credential) {
            let mut answer = Error::Unauthorized {
                public: "Unauthorized: this connection's client certificate was refused; connect again.".into(),
                detail: format!(
                    "the connection has had {MAX_X509_REFUSALS_PER_CONNECTION} refused X.509 attempts; not validated"
                ),
                tracking_id: None,
            }
            .answer();
            answer.close_connection = true;
            return answer;
        }
        let mut answer = self.device_answer(&request).await;
        answer.close_connection = request.connection.note(request.credential, &answer);
        answer
    }

    async fn device_answer(&self, request: &DeviceRequest<'_>) -> Answer {
        match request.operation {
            DeviceOperation::Register { body } => self.device_register(request, body).await,
            DeviceOperation::OperationStatus { operation_id } => {
                self.device_operation_status(request, operation_id).await.unwrap_or_else(|e| e.answer())
            }
            DeviceOperation::RegistrationStatus { body } => {
                self.device_registration_status(request, body).await.unwrap_or_else(|e| e.answer())
            }
        }
    }

    /// A register request: every attempt, refused or not, is audited.
    async fn device_register(&self, r: &DeviceRequest<'_>, body: &[u8]) -> Answer {
        let parsed = check_api_version(DEVICE_API_VERSIONS, r.api_version).and_then(|()| registration_body(body));
        // A TPM device's first request carries no credential, only its keys: it is answered
        // with the challenge (401 and the key for its TPM), as DPS does over HTTPS.
        if matches!(r.credential, Credential::None)
            && let Ok(registration) = &parsed
            && registration.tpm.is_some()
        {
            if !r.origin.transport.challenges_tpm_in_band() {
                let refused = Error::Unauthorized {
                    public: "Unauthorized: TPM attestation starts with a register over HTTPS or with SASL TPM over \
                             AMQP; MQTT does not offer it."
                        .into(),
                    detail: format!(
                        "registration '{}' sent a TPM block without a credential over {}",
                        provisio_core::text::shorten(r.registration_id),
                        r.origin.transport.as_str()
                    ),
                    tracking_id: None,
                };
                return self.refuse_registration(&r.origin, r.registration_id, r.credential, refused).await.answer();
            }
            return match self.tpm_challenge(&r.origin, r.scope, r.registration_id, parsed).await {
                Ok(key) => Answer::json(
                    401,
                    None,
                    &TpmChallengeBody {
                        authentication_key: &key,
                        key_name: "registration",
                        message: "Take the key into the TPM, sign a SAS token with it and register again with it.",
                    },
                ),
                Err(e) => e.answer(),
            };
        }
        // A csr exists from 2025-07-01-preview on; an older version that sends one is told so
        // rather than have it silently dropped.
        let parsed = parsed.and_then(|registration| match (&registration.csr, r.api_version) {
            (Some(_), Some(v)) if !provisio_proto::CSR_API_VERSIONS.contains(&v.trim()) => {
                Err(Error::invalid(format!(
                    "The csr field needs api-version 2025-07-01-preview or later ({}); this request has {}.",
                    provisio_proto::CSR_API_VERSIONS.join(", "),
                    provisio_core::text::shorten(v)
                )))
            }
            _ => Ok(registration),
        });
        match self.register_from(&r.origin, r.scope, r.registration_id, parsed, r.credential).await {
            Ok(operation_id) => {
                Answer::json(202, Some(self.retry_after_secs()), &RegistrationOperationStatus::accepted(operation_id))
            }
            Err(e) => e.answer(),
        }
    }

    async fn device_operation_status(&self, r: &DeviceRequest<'_>, operation_id: &str) -> Result<Answer, Error> {
        check_api_version(DEVICE_API_VERSIONS, r.api_version)?;
        if operation_id.trim().is_empty() {
            return Err(Error::invalid(
                "The status request names no operation id (the operations/{operationId} path segment over HTTPS, \
                 &operationId= in the MQTT topic, the iotdps-operation-id property over AMQP).",
            ));
        }
        let status =
            self.operation_status(r.scope, r.registration_id, operation_id, r.credential, r.origin.peer).await?;
        Ok(if status.status == RegistrationStatus::Assigning {
            Answer::json(202, Some(self.retry_after_secs()), &status)
        } else {
            Answer::json(200, None, &status)
        })
    }

    async fn device_registration_status(&self, r: &DeviceRequest<'_>, body: &[u8]) -> Result<Answer, Error> {
        check_api_version(DEVICE_API_VERSIONS, r.api_version)?;
        let registration = registration_body(body)?;
        check_body_id(r.registration_id, &registration)?;
        if registration.csr.is_some() {
            return Err(Error::invalid(
                "The status lookup (POST {idScope}/registrations/{registrationId}) takes no csr: send it with a \
                 register request.",
            ));
        }
        let result = self.registration_status(r.scope, r.registration_id, r.credential, r.origin.peer).await?;
        Ok(Answer::json(200, None, &result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_devices_and_exact_credentials_apart() {
        let tok = Credential::Sas("SharedAccessSignature sr=s/registrations/d&sig=abc&se=1".into());
        let other = Credential::Sas("SharedAccessSignature sr=s/registrations/d&sig=abd&se=1".into());
        let fp = tok.fingerprint("d").unwrap();
        assert_eq!(Some(fp), tok.fingerprint("d"));
        assert_ne!(Some(fp), tok.fingerprint("e"), "another device");
        assert_ne!(Some(fp), other.fingerprint("d"), "another token");
        // A chain of one certificate [ab] is not a chain of two [a][b].
        let one = Credential::X509(vec![b"ab".to_vec()]).fingerprint("d");
        let two = Credential::X509(vec![b"a".to_vec(), b"b".to_vec()]).fingerprint("d");
        assert_ne!(one, two);
        assert_eq!(Credential::None.fingerprint("d"), None);
    }

    #[test]
    fn api_versions_are_required_and_known() {
        assert!(check_api_version(DEVICE_API_VERSIONS, Some("2019-03-31")).is_ok());
        for missing in [None, Some(""), Some("  ")] {
            let e = check_api_version(DEVICE_API_VERSIONS, missing).unwrap_err();
            assert_eq!((e.status(), e.code()), (400, 400_004));
            assert!(e.to_string().contains("no api-version"), "{e}");
        }
        let e = check_api_version(DEVICE_API_VERSIONS, Some("2019-04-16")).unwrap_err();
        assert_eq!(e.code(), 400_004);
        // Issue #25, point 2: the specification's newer versions, and none that no source shows.
        for v in ["2021-10-01", "2025-07-01-preview", "2026-04-01", "2026-11-01", "2026-11-02-preview"] {
            assert!(check_api_version(DEVICE_API_VERSIONS, Some(v)).is_ok(), "{v}");
        }
        assert_eq!(check_api_version(DEVICE_API_VERSIONS, Some("2019-01-15")).unwrap_err().code(), 400_004);
        assert!(e.to_string().starts_with("Unsupported API version 2019-04-16."), "{e}");
    }

    #[test]
    fn the_body_id_may_differ_only_in_case() {
        let body = |id: &str| DeviceRegistration { registration_id: Some(id.into()), ..DeviceRegistration::default() };
        assert!(check_body_id("Dev-1", &body("dev-1")).is_ok());
        assert!(check_body_id("dev-1", &DeviceRegistration::default()).is_ok());
        let e = check_body_id("dev-1", &body("dev-2")).unwrap_err();
        assert_eq!(e.code(), 400_004);
    }

    #[test]
    fn error_answers_carry_a_retry_hint_only_when_a_retry_can_help() {
        let hint = |e: Error| e.answer().retry_after;
        assert_eq!(hint(Error::Throttled(7)), Some(7));
        assert_eq!(hint(Error::Internal("x".into())), Some(5));
        assert_eq!(hint(Error::Timeout), Some(5));
        assert_eq!(hint(Error::invalid("x")), None);
        assert_eq!(hint(Error::unauthorized("x")), None);
        // Issue #25, point 3: `info` carries the retry hint, and only that, where there is one.
        let body = |e: Error| serde_json::from_slice::<serde_json::Value>(&e.answer().body).unwrap();
        assert_eq!(body(Error::Throttled(7))["info"], serde_json::json!({"retryAfter": "7"}));
        assert_eq!(body(Error::Timeout)["info"], serde_json::json!({"retryAfter": "5"}));
        assert!(body(Error::unauthorized("x")).get("info").is_none());
        assert!(body(Error::invalid("x")).get("info").is_none());
        let a = Error::NotFound { code: 404_202, message: "gone".into() }.answer();
        assert_eq!(a.status, 404);
        let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(body["errorCode"], 404_202);
        assert_eq!(body["trackingId"].as_str(), a.error.as_ref().map(|e| e.tracking_id.as_str()));
    }
}
