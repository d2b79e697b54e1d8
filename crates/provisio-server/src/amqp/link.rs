//! The DPS rules of an AMQP connection, sans I/O: SASL decisions, link attach checks,
//! request parsing and reply building. The listener in the parent module feeds it what
//! fe2o3-amqp decoded and carries out what it returns, so every rule here is testable
//! without a socket.
//!
//! Rules (`spec/device-api.md` §5): symmetric keys use SASL PLAIN with authcid
//! `{idScope}/registrations/{registrationId}` and the SAS token as password; X.509 devices
//! send no SASL layer (or EXTERNAL/ANONYMOUS) and the certificate comes from TLS; TPM
//! devices run SASL `TPM` (§3.5: the EK in the init, the SRK asked for, the challenge in
//! segments, the SAS token in the last response). Both links attach on
//! `{idScope}/registrations/{id}`, bare or
//! as `amqps://{host}/…`, and must name the authenticated device. Requests carry
//! `iotdps-operation-type` (`iotdps-register` or `iotdps-get-operationstatus`) and, on
//! polls, `iotdps-operation-id`; the answer goes back on the device's receiver link with
//! the request's correlation id, or, for errors, as a Rejected outcome whose description is
//! the JSON error body.

use fe2o3_amqp_types::{
    definitions::{AmqpError, Error as AmqpErrorFrame, ErrorCondition, Fields, LinkError},
    messaging::{ApplicationProperties, Body, Data, Message, MessageId, Properties},
    primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value},
};

use provisio_core::text::shorten;
use provisio_engine::Error;

/// Why a SASL exchange is refused (logged; the device gets a SASL `auth` outcome).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslRefusal {
    /// A mechanism this server does not offer.
    #[error("SASL mechanism '{0}' is not supported")]
    Mechanism(String),
    /// SASL PLAIN without its initial response.
    #[error("SASL PLAIN without an initial response")]
    PlainMissing,
    /// SASL PLAIN's response is not `authzid NUL authcid NUL password`.
    #[error("SASL PLAIN response is not authzid NUL authcid NUL password")]
    PlainFraming,
    /// The PLAIN username or password is not UTF-8.
    #[error("SASL PLAIN {0} is not UTF-8")]
    PlainNotUtf8(&'static str),
    /// The PLAIN username names no device.
    #[error("SASL PLAIN username is not {{idScope}}/registrations/{{registrationId}}")]
    PlainUsername,
    /// The PLAIN password is empty.
    #[error("SASL PLAIN password (the SAS token) is empty")]
    PlainNoToken,
    /// SASL TPM's init is not `0 idScope 0 registrationId 0 EK`.
    #[error("SASL TPM init is not 0 idScope 0 registrationId 0 endorsementKey")]
    TpmInitFraming,
    /// SASL TPM's init names no valid device.
    #[error("SASL TPM idScope or registration id is not valid")]
    TpmDevice,
    /// SASL TPM's init carries no EK.
    #[error("SASL TPM init carries no endorsement key")]
    TpmNoEk,
    /// The SRK response does not start with 0.
    #[error("the SRK response does not start with 0")]
    TpmSrkFraming,
    /// The keys cannot be used for a challenge.
    #[error("{0}")]
    TpmKeys(String),
    /// The challenge does not fit the exchange.
    #[error("a TPM blob of {0} bytes does not fit in {TPM_MAX_SEGMENTS} SASL challenges")]
    TpmBlobTooLarge(usize),
    /// An interim challenge was answered with something else than 0.
    #[error("an interim challenge was not acknowledged with 0")]
    TpmUnacknowledged,
    /// The last challenge was not answered with 0 and a SAS token.
    #[error("the last challenge was not answered with 0 and a SAS token")]
    TpmNoToken,
    /// A response came when no challenge was sent.
    #[error("a SASL response without a challenge")]
    UnexpectedResponse,
}

/// Application property naming the operation.
pub const OPERATION_TYPE: &str = "iotdps-operation-type";
/// Application property carrying the operation id of a poll.
pub const OPERATION_ID: &str = "iotdps-operation-id";
/// Application property of a register request.
pub const FORCE_REGISTRATION: &str = "iotdps-forceRegistration";
/// Application property of replies: the HTTP-style status.
pub const STATUS: &str = "iotdps-status";
/// Polling hint read by the C and Node clients.
pub const RETRY_AFTER: &str = "retry-after";
/// Polling hint read by the C# client.
pub const RETRY_AFTER_CSHARP: &str = "Retry-After";
/// Attach property with the client's API version.
pub const API_VERSION_PROPERTY: &str = "com.microsoft:api-version";
/// `iotdps-operation-type` of a registration.
pub const OP_REGISTER: &str = "iotdps-register";
/// `iotdps-operation-type` of a status poll.
pub const OP_STATUS: &str = "iotdps-get-operationstatus";

/// A device address: `{idScope}/registrations/{registrationId}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// ID scope.
    pub scope: String,
    /// Registration id.
    pub registration_id: String,
}

impl Device {
    /// Whether `other` names the same device (scopes and registration ids compare
    /// case-insensitively, as DPS does).
    #[must_use]
    pub fn same(&self, other: &Self) -> bool {
        self.scope.eq_ignore_ascii_case(&other.scope)
            && self.registration_id.eq_ignore_ascii_case(&other.registration_id)
    }
}

/// Parses a link address or SASL authcid: `{idScope}/registrations/{registrationId}`,
/// optionally prefixed by `amqps://{host}/` (the C client's form).
#[must_use]
pub fn parse_address(address: &str) -> Option<Device> {
    let rest = match address.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("amqps") || scheme.eq_ignore_ascii_case("amqp") => {
            rest.split_once('/')?.1
        }
        Some(_) => return None,
        None => address.strip_prefix('/').unwrap_or(address),
    };
    let (scope, id) = rest.split_once("/registrations/")?;
    let id = id.strip_suffix('/').unwrap_or(id);
    if scope.is_empty() || id.is_empty() || scope.contains('/') || id.contains('/') || id.contains('?') {
        return None;
    }
    Some(Device { scope: scope.to_owned(), registration_id: id.to_owned() })
}

/// How the device authenticated at connection level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// SASL PLAIN: the device named in the username, and its SAS token.
    Sas {
        /// The device from the username.
        device: Device,
        /// The password: a SAS token, judged by the engine on every request.
        token: String,
    },
    /// No SASL layer, or SASL EXTERNAL/ANONYMOUS: the TLS client certificate is the
    /// credential (the device is named by the first link it attaches).
    Certificate,
}

/// Decides a SASL init: PLAIN (symmetric keys) and EXTERNAL/ANONYMOUS (X.509, the
/// certificate coming from TLS) are accepted; TPM and everything else are refused.
///
/// # Errors
/// Why the SASL exchange fails (sent as a SASL `auth` outcome).
pub(crate) fn sasl_init(mechanism: &str, initial_response: Option<&[u8]>) -> Result<Auth, SaslRefusal> {
    match mechanism {
        "PLAIN" => {
            let response = initial_response.ok_or(SaslRefusal::PlainMissing)?;
            let mut parts = response.splitn(3, |b| *b == 0);
            let (Some(_authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(SaslRefusal::PlainFraming);
            };
            let authcid = std::str::from_utf8(authcid).map_err(|_| SaslRefusal::PlainNotUtf8("username"))?;
            let token = std::str::from_utf8(password).map_err(|_| SaslRefusal::PlainNotUtf8("password"))?;
            let device = parse_address(authcid).ok_or(SaslRefusal::PlainUsername)?;
            if token.trim().is_empty() {
                return Err(SaslRefusal::PlainNoToken);
            }
            Ok(Auth::Sas { device, token: token.to_owned() })
        }
        "EXTERNAL" | "ANONYMOUS" => Ok(Auth::Certificate),
        // TPM is a challenge exchange, run by the SASL acceptor (`tpm_sasl_init` onwards).
        other => Err(SaslRefusal::Mechanism(shorten(other))),
    }
}

/// Most bytes of the blob in one SASL challenge frame (the C client keeps its own SASL
/// frames' data to 470 bytes; frames may be as small as 512 bytes during SASL).
const TPM_SEGMENT: usize = 400;
/// Most challenge segments: C# compares a growing counter with the control byte's 2-bit
/// sequence number.
const TPM_MAX_SEGMENTS: usize = 4;

/// The init of SASL mechanism `TPM`: `0 ‖ idScope ‖ 0 ‖ registrationId ‖ 0 ‖ EK TPM2B_PUBLIC`.
/// Returns the device and the EK's bytes.
///
/// # Errors
/// Anything else.
pub fn tpm_sasl_init(initial_response: Option<&[u8]>) -> Result<(Device, Vec<u8>), SaslRefusal> {
    let response = initial_response.ok_or(SaslRefusal::TpmInitFraming)?;
    let mut parts = response.splitn(4, |b| *b == 0);
    let (Some([]), Some(scope), Some(id), Some(ek)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SaslRefusal::TpmInitFraming);
    };
    let scope = std::str::from_utf8(scope).map_err(|_| SaslRefusal::TpmDevice)?;
    let id = std::str::from_utf8(id).map_err(|_| SaslRefusal::TpmDevice)?;
    let device = parse_address(&format!("{scope}/registrations/{id}")).ok_or(SaslRefusal::TpmDevice)?;
    if ek.is_empty() {
        return Err(SaslRefusal::TpmNoEk);
    }
    Ok((device, ek.to_vec()))
}

/// The blob as SASL challenge frames: each `control ‖ segment`, the control byte `0x80 | seq`
/// for an interim segment and `0xC0 | seq` for the last.
///
/// # Errors
/// A blob that does not fit in [`TPM_MAX_SEGMENTS`] segments.
pub fn tpm_sasl_segments(blob: &[u8]) -> Result<Vec<Vec<u8>>, SaslRefusal> {
    let chunks: Vec<&[u8]> = blob.chunks(TPM_SEGMENT).collect();
    if chunks.is_empty() || chunks.len() > TPM_MAX_SEGMENTS {
        return Err(SaslRefusal::TpmBlobTooLarge(blob.len()));
    }
    let last = chunks.len() - 1;
    Ok(chunks
        .iter()
        .enumerate()
        .map(|(seq, c)| {
            // seq < TPM_MAX_SEGMENTS = 4: it fits the two low bits.
            let control = if seq == last { 0xC0 } else { 0x80 } | (seq as u8 & 0x03);
            [&[control][..], c].concat()
        })
        .collect())
}

/// Which way a link carries messages, seen from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device's sender link: requests come in (the address is the attach's target).
    FromDevice,
    /// The device's receiver link: replies go out (the address is the attach's source).
    ToDevice,
}

/// A refusal: an AMQP error condition and a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The AMQP error condition.
    pub condition: &'static str,
    /// Why.
    pub description: String,
}

impl Refusal {
    fn new(condition: &'static str, description: impl Into<String>) -> Self {
        Self { condition, description: description.into() }
    }

    /// The AMQP error to close or detach with.
    #[must_use]
    pub fn to_error(&self) -> AmqpErrorFrame {
        AmqpErrorFrame::new(condition(self.condition), Some(self.description.clone()), None)
    }
}

/// The link state of one connection.
#[derive(Debug)]
pub struct Links {
    device: Option<Device>,
    api_version: Option<String>,
    attached: usize,
    max_links: usize,
    to_device: usize,
}

impl Links {
    /// A connection authenticated with `auth`, allowing at most `max_links` links.
    #[must_use]
    pub fn new(auth: Auth, max_links: usize) -> Self {
        let device = match &auth {
            Auth::Sas { device, .. } => Some(device.clone()),
            Auth::Certificate => None,
        };
        Self { device, api_version: None, attached: 0, max_links, to_device: 0 }
    }

    /// The device this connection speaks for, once known.
    #[must_use]
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }

    /// The API version from the attach properties, if any was sent.
    #[must_use]
    pub fn api_version(&self) -> Option<&str> {
        self.api_version.as_deref()
    }

    /// Whether a link to the device (for replies) is attached.
    #[must_use]
    pub fn can_reply(&self) -> bool {
        self.to_device > 0
    }

    /// Judges an attach: the address must be the connection's device (for certificate
    /// connections, the first attach names it and the rest must agree).
    ///
    /// # Errors
    /// The refusal to detach (or close) with.
    pub fn on_attach(
        &mut self,
        direction: Direction,
        address: Option<&str>,
        api_version: Option<&str>,
    ) -> Result<(), Refusal> {
        if self.attached >= self.max_links {
            return Err(Refusal::new(
                "amqp:resource-limit-exceeded",
                format!("at most {} links per connection", self.max_links),
            ));
        }
        let address = address.ok_or_else(|| Refusal::new("amqp:not-found", "the link has no address"))?;
        let wanted = parse_address(address).ok_or_else(|| {
            Refusal::new(
                "amqp:not-found",
                format!("link address '{}' is not {{idScope}}/registrations/{{registrationId}}", shorten(address)),
            )
        })?;
        match &self.device {
            Some(d) if !d.same(&wanted) => {
                return Err(Refusal::new(
                    "amqp:unauthorized-access",
                    format!(
                        "this connection is authenticated for '{}/registrations/{}', not '{}'",
                        d.scope,
                        d.registration_id,
                        shorten(address)
                    ),
                ));
            }
            Some(_) => {}
            None => self.device = Some(wanted),
        }
        if let Some(v) = api_version {
            self.api_version = Some(v.to_owned());
        }
        self.attached += 1;
        if direction == Direction::ToDevice {
            self.to_device += 1;
        }
        Ok(())
    }

    /// A link was detached.
    pub fn on_detach(&mut self, direction: Direction) {
        self.attached = self.attached.saturating_sub(1);
        if direction == Direction::ToDevice {
            self.to_device = self.to_device.saturating_sub(1);
        }
    }
}

/// What a device asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `iotdps-register`, with the JSON body (possibly empty).
    Register {
        /// The `DeviceRegistration` JSON.
        body: Vec<u8>,
        /// `iotdps-forceRegistration`.
        force: bool,
    },
    /// `iotdps-get-operationstatus`.
    Poll {
        /// `iotdps-operation-id`.
        operation_id: String,
    },
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The id to put in the reply's correlation-id (the request's correlation-id, else
    /// its message-id).
    pub correlation_id: Option<MessageId>,
    /// What is asked.
    pub operation: Operation,
}

fn prop<'a>(props: Option<&'a ApplicationProperties>, key: &str) -> Option<&'a SimpleValue> {
    props?.0.get(key).filter(|v| !matches!(v, SimpleValue::Null))
}

fn text(v: &SimpleValue) -> Option<String> {
    match v {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// The request body as bytes: data sections concatenated, or an amqp-value string or
/// binary; no body (or null) is empty.
///
/// # Errors
/// A body of another shape (400).
pub fn body_bytes(body: &Body<Value>) -> Result<Vec<u8>, Error> {
    match body {
        Body::Data(batch) => Ok(batch.iter().flat_map(|d| d.0.iter().copied()).collect()),
        Body::Value(v) => match &v.0 {
            Value::String(s) => Ok(s.as_bytes().to_vec()),
            Value::Binary(b) => Ok(b.to_vec()),
            Value::Null => Ok(Vec::new()),
            _ => Err(Error::malformed("The request body must be JSON in a data section or an amqp-value string.")),
        },
        Body::Empty => Ok(Vec::new()),
        Body::Sequence(_) => {
            Err(Error::malformed("The request body must be JSON in a data section or an amqp-value string."))
        }
    }
}

/// Parses a request message.
///
/// # Errors
/// A message without a known operation type or a poll without an operation id (400),
/// with the correlation id still recovered where possible.
pub fn parse_request(message: &Message<Body<Value>>) -> Result<Request, (Option<MessageId>, Error)> {
    let correlation_id =
        message.properties.as_ref().and_then(|p| p.correlation_id.clone().or_else(|| p.message_id.clone()));
    let props = message.application_properties.as_ref();
    let fail = |e: Error| (correlation_id.clone(), e);
    let op = prop(props, OPERATION_TYPE).and_then(text).unwrap_or_default();
    let operation = match op.as_str() {
        OP_REGISTER => {
            let force = match prop(props, FORCE_REGISTRATION) {
                None => false,
                Some(SimpleValue::Bool(b)) => *b,
                Some(SimpleValue::String(s)) if s.eq_ignore_ascii_case("true") => true,
                Some(SimpleValue::String(s)) if s.eq_ignore_ascii_case("false") => false,
                Some(_) => return Err(fail(Error::invalid("iotdps-forceRegistration must be true or false."))),
            };
            Operation::Register { body: body_bytes(&message.body).map_err(fail)?, force }
        }
        OP_STATUS => {
            let operation_id = prop(props, OPERATION_ID).and_then(text).unwrap_or_default();
            if operation_id.trim().is_empty() {
                return Err(fail(Error::invalid("A status request needs the iotdps-operation-id property.")));
            }
            Operation::Poll { operation_id }
        }
        "" => {
            return Err(fail(Error::invalid(
                "The message has no iotdps-operation-type (iotdps-register or iotdps-get-operationstatus).",
            )));
        }
        other => {
            return Err(fail(Error::NotFound {
                code: provisio_proto::error::codes::NOT_FOUND,
                message: format!(
                    "Unknown operation '{}'; DPS serves iotdps-register and iotdps-get-operationstatus.",
                    shorten(other)
                ),
            }));
        }
    };
    Ok(Request { correlation_id, operation })
}

/// The reply to a served request: the JSON in a data section, the request's
/// correlation-id, `iotdps-status` and, when given, `retry-after`/`Retry-After`.
#[must_use]
pub fn reply(correlation_id: Option<MessageId>, status: u16, retry_after: Option<u32>, json: Vec<u8>) -> Message<Data> {
    let mut props = ApplicationProperties::builder().insert(STATUS, SimpleValue::Int(i32::from(status)));
    if let Some(r) = retry_after {
        props = props
            .insert(RETRY_AFTER, SimpleValue::String(r.to_string()))
            .insert(RETRY_AFTER_CSHARP, SimpleValue::String(r.to_string()));
    }
    let properties = Properties {
        correlation_id,
        content_type: Some(Symbol::from("application/json")),
        content_encoding: Some(Symbol::from("utf-8")),
        ..Properties::default()
    };
    Message::builder().properties(properties).application_properties(props.build()).data(Binary::from(json)).build()
}

/// The AMQP error condition for an HTTP-style status (what the Node and C# clients map
/// back: throttling and internal errors are retried).
#[must_use]
pub fn condition_for(status: u16) -> &'static str {
    match status {
        401 | 403 => "amqp:unauthorized-access",
        404 => "amqp:not-found",
        409 | 412 => "com.microsoft:precondition-failed",
        413 => "amqp:link:message-size-exceeded",
        429 => "com.microsoft:device-container-throttled",
        s if s >= 500 => "amqp:internal-error",
        _ => "com.microsoft:argument-error",
    }
}

fn condition(name: &'static str) -> ErrorCondition {
    match name {
        "amqp:unauthorized-access" => AmqpError::UnauthorizedAccess.into(),
        "amqp:not-found" => AmqpError::NotFound.into(),
        "amqp:internal-error" => AmqpError::InternalError.into(),
        "amqp:resource-limit-exceeded" => AmqpError::ResourceLimitExceeded.into(),
        "amqp:not-allowed" => AmqpError::NotAllowed.into(),
        "amqp:link:message-size-exceeded" => LinkError::MessageSizeExceeded.into(),
        other => ErrorCondition::Custom(Symbol::from(other)),
    }
}

/// The Rejected outcome's error for a failed request: description = the JSON error body,
/// info = `iotdps-status` and, when given, `retry-after`/`Retry-After`.
#[must_use]
pub fn rejection(status: u16, retry_after: Option<u32>, json: &[u8]) -> AmqpErrorFrame {
    let mut info: Fields = OrderedMap::new();
    info.insert(Symbol::from(STATUS), Value::Int(i32::from(status)));
    if let Some(r) = retry_after {
        info.insert(Symbol::from(RETRY_AFTER), Value::String(r.to_string()));
        info.insert(Symbol::from(RETRY_AFTER_CSHARP), Value::String(r.to_string()));
    }
    AmqpErrorFrame::new(condition(condition_for(status)), Some(String::from_utf8_lossy(json).into_owned()), Some(info))
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::messaging::{AmqpValue, Batch};

    use super::*;

    fn dev(scope: &str, id: &str) -> Device {
        Device { scope: scope.into(), registration_id: id.into() }
    }

    fn sas(id: &str) -> Auth {
        Auth::Sas { device: dev("0ne00000001", id), token: "SharedAccessSignature sr=x&sig=y&se=1".into() }
    }

    #[test]
    fn addresses_bare_and_full() {
        assert_eq!(parse_address("0ne00000001/registrations/dev-1"), Some(dev("0ne00000001", "dev-1")));
        assert_eq!(
            parse_address("amqps://dps.example.com/0ne00000001/registrations/dev-1"),
            Some(dev("0ne00000001", "dev-1"))
        );
        assert_eq!(parse_address("/0ne00000001/registrations/dev-1"), Some(dev("0ne00000001", "dev-1")));
        for bad in [
            "",
            "0ne00000001",
            "0ne00000001/registrations/",
            "/registrations/dev-1",
            "a/b/registrations/dev-1",
            "0ne00000001/registrations/dev-1/extra",
            "http://h/0ne00000001/registrations/dev-1",
            "amqps://host-only",
        ] {
            assert_eq!(parse_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn sasl_plain_captures_device_and_token() {
        let r = b"\x000ne00000001/registrations/dev-1\x00SharedAccessSignature sr=a&sig=b&se=1";
        assert_eq!(
            sasl_init("PLAIN", Some(r)),
            Ok(Auth::Sas {
                device: dev("0ne00000001", "dev-1"),
                token: "SharedAccessSignature sr=a&sig=b&se=1".into()
            })
        );
    }

    #[test]
    fn sasl_refusals() {
        assert!(sasl_init("PLAIN", None).is_err());
        assert!(sasl_init("PLAIN", Some(b"no-nuls")).is_err());
        assert!(sasl_init("PLAIN", Some(b"\x00guest\x00guest")).is_err(), "username must be a device address");
        assert!(sasl_init("PLAIN", Some(b"\x000ne1/registrations/d\x00")).is_err(), "empty token");
        assert!(sasl_init("PLAIN", Some(b"\x000ne1/registrations/d\x00\xff\xfe")).is_err(), "non-UTF-8");
        // TPM is the acceptor's exchange, not a one-step init.
        assert_eq!(sasl_init("TPM", Some(b"\x00ek")), Err(SaslRefusal::Mechanism("TPM".into())));
        let (device, ek) = tpm_sasl_init(Some(b"\x000ne00000001\x00tpm-1\x00\x01\x3a\x00\x01")).unwrap();
        assert_eq!((device.scope.as_str(), device.registration_id.as_str()), ("0ne00000001", "tpm-1"));
        assert_eq!(ek, b"\x01\x3a\x00\x01", "an EK's zero bytes stay in it");
        for bad in [
            &b""[..],
            b"0ne00000001\x00tpm-1\x00ek",
            b"\x000ne00000001\x00tpm-1",
            b"\x000ne00000001\x00\x00ek",
            b"\x000ne00000001\x00tpm-1\x00",
        ] {
            assert!(tpm_sasl_init(Some(bad)).is_err(), "{bad:?}");
        }
        assert!(tpm_sasl_init(None).is_err());
        let segments = tpm_sasl_segments(&[7; 900]).unwrap();
        assert_eq!(
            segments.iter().map(|s| (s[0], s.len())).collect::<Vec<_>>(),
            [(0x80, 401), (0x81, 401), (0xC2, 101)]
        );
        assert_eq!(tpm_sasl_segments(&[7; 10]).unwrap(), [[&[0xC0][..], &[7; 10]].concat()]);
        assert!(tpm_sasl_segments(&[7; 1601]).is_err() && tpm_sasl_segments(&[]).is_err());
        assert!(sasl_init("SCRAM-SHA-256", None).is_err());
        assert_eq!(sasl_init("EXTERNAL", None), Ok(Auth::Certificate));
        assert_eq!(sasl_init("ANONYMOUS", Some(b"x")), Ok(Auth::Certificate));
    }

    #[test]
    fn sas_links_must_name_the_authenticated_device() {
        let mut l = Links::new(sas("dev-1"), 4);
        assert!(!l.can_reply());
        l.on_attach(Direction::ToDevice, Some("0ne00000001/registrations/DEV-1"), Some("2019-03-31")).unwrap();
        assert!(l.can_reply());
        assert_eq!(l.api_version(), Some("2019-03-31"));
        l.on_attach(Direction::FromDevice, Some("amqps://h/0ne00000001/registrations/dev-1"), None).unwrap();
        let r = l.on_attach(Direction::FromDevice, Some("0ne00000001/registrations/dev-2"), None).unwrap_err();
        assert_eq!(r.condition, "amqp:unauthorized-access");
        let r = l.on_attach(Direction::FromDevice, Some("0ne00000002/registrations/dev-1"), None).unwrap_err();
        assert_eq!(r.condition, "amqp:unauthorized-access");
        let r = l.on_attach(Direction::FromDevice, Some("$cbs"), None).unwrap_err();
        assert_eq!(r.condition, "amqp:not-found");
        let r = l.on_attach(Direction::FromDevice, None, None).unwrap_err();
        assert_eq!(r.condition, "amqp:not-found");
        assert_eq!(l.device(), Some(&dev("0ne00000001", "dev-1")));
    }

    #[test]
    fn certificate_connections_are_pinned_by_the_first_attach() {
        let mut l = Links::new(Auth::Certificate, 4);
        assert_eq!(l.device(), None);
        l.on_attach(Direction::ToDevice, Some("0ne00000001/registrations/x509-dev"), None).unwrap();
        assert_eq!(l.device(), Some(&dev("0ne00000001", "x509-dev")));
        assert!(l.on_attach(Direction::FromDevice, Some("0ne00000001/registrations/other"), None).is_err());
        l.on_attach(Direction::FromDevice, Some("0ne00000001/registrations/x509-dev"), None).unwrap();
    }

    #[test]
    fn link_limit_and_detach() {
        let mut l = Links::new(sas("d"), 2);
        let a = Some("0ne00000001/registrations/d");
        l.on_attach(Direction::ToDevice, a, None).unwrap();
        l.on_attach(Direction::FromDevice, a, None).unwrap();
        assert_eq!(l.on_attach(Direction::FromDevice, a, None).unwrap_err().condition, "amqp:resource-limit-exceeded");
        l.on_detach(Direction::ToDevice);
        assert!(!l.can_reply());
        l.on_attach(Direction::ToDevice, a, None).unwrap();
        assert!(l.can_reply());
    }

    fn message(props: &[(&str, SimpleValue)], body: Body<Value>, correlation: Option<&str>) -> Message<Body<Value>> {
        let mut ap = ApplicationProperties::builder();
        for (k, v) in props {
            ap = ap.insert(*k, v.clone());
        }
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                correlation_id: correlation.map(|c| MessageId::String(c.into())),
                ..Properties::default()
            }),
            application_properties: Some(ap.build()),
            body,
            footer: None,
        }
    }

    fn data(b: &[u8]) -> Body<Value> {
        Body::Data(Batch::new(vec![Data(Binary::from(b.to_vec()))]))
    }

    #[test]
    fn register_with_data_or_value_body() {
        let m = message(
            &[(OPERATION_TYPE, SimpleValue::String(OP_REGISTER.into())), (FORCE_REGISTRATION, SimpleValue::Bool(true))],
            data(br#"{"registrationId":"d"}"#),
            Some("c-1"),
        );
        let r = parse_request(&m).unwrap();
        assert_eq!(r.correlation_id, Some(MessageId::String("c-1".into())));
        assert_eq!(r.operation, Operation::Register { body: br#"{"registrationId":"d"}"#.to_vec(), force: true });

        let m = message(
            &[(OPERATION_TYPE, SimpleValue::String(OP_REGISTER.into()))],
            Body::Value(AmqpValue(Value::String("{}".into()))),
            None,
        );
        assert_eq!(parse_request(&m).unwrap().operation, Operation::Register { body: b"{}".to_vec(), force: false });

        let m = message(&[(OPERATION_TYPE, SimpleValue::String(OP_REGISTER.into()))], Body::Empty, None);
        assert_eq!(parse_request(&m).unwrap().operation, Operation::Register { body: Vec::new(), force: false });

        let m = message(
            &[(OPERATION_TYPE, SimpleValue::String(OP_REGISTER.into())), (FORCE_REGISTRATION, SimpleValue::Int(1))],
            Body::Empty,
            Some("c-2"),
        );
        let (c, e) = parse_request(&m).unwrap_err();
        assert_eq!(c, Some(MessageId::String("c-2".into())));
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn polls_need_an_operation_id() {
        let m = message(
            &[
                (OPERATION_TYPE, SimpleValue::String(OP_STATUS.into())),
                (OPERATION_ID, SimpleValue::String("4.abc".into())),
            ],
            Body::Value(AmqpValue(Value::String(String::new()))),
            Some("c"),
        );
        assert_eq!(parse_request(&m).unwrap().operation, Operation::Poll { operation_id: "4.abc".into() });
        let m = message(&[(OPERATION_TYPE, SimpleValue::String(OP_STATUS.into()))], Body::Empty, None);
        assert_eq!(parse_request(&m).unwrap_err().1.status(), 400);
    }

    #[test]
    fn unknown_or_missing_operations() {
        let m = message(&[], data(b"{}"), None);
        assert_eq!(parse_request(&m).unwrap_err().1.status(), 400);
        let m = message(&[(OPERATION_TYPE, SimpleValue::String("iotdps-get-registration".into()))], data(b"{}"), None);
        assert_eq!(parse_request(&m).unwrap_err().1.status(), 404);
        let m = message(
            &[(OPERATION_TYPE, SimpleValue::String(OP_REGISTER.into()))],
            Body::Value(AmqpValue(Value::Int(3))),
            None,
        );
        assert_eq!(parse_request(&m).unwrap_err().1.status(), 400);
    }

    #[test]
    fn message_id_stands_in_for_a_missing_correlation_id() {
        let mut m = message(&[(OPERATION_TYPE, SimpleValue::String(OP_REGISTER.into()))], Body::Empty, None);
        m.properties = Some(Properties { message_id: Some(MessageId::Ulong(7)), ..Properties::default() });
        assert_eq!(parse_request(&m).unwrap().correlation_id, Some(MessageId::Ulong(7)));
    }

    #[test]
    fn replies_carry_correlation_status_and_retry() {
        let m = reply(Some(MessageId::String("c".into())), 202, Some(3), b"{\"status\":\"assigning\"}".to_vec());
        assert_eq!(m.properties.as_ref().unwrap().correlation_id, Some(MessageId::String("c".into())));
        let ap = &m.application_properties.as_ref().unwrap().0;
        assert_eq!(ap.get(STATUS), Some(&SimpleValue::Int(202)));
        assert_eq!(ap.get(RETRY_AFTER), Some(&SimpleValue::String("3".into())));
        assert_eq!(ap.get(RETRY_AFTER_CSHARP), Some(&SimpleValue::String("3".into())));
        assert_eq!(m.body.0.as_ref(), b"{\"status\":\"assigning\"}");
        let m = reply(None, 200, None, b"{}".to_vec());
        assert!(m.application_properties.as_ref().unwrap().0.get(RETRY_AFTER).is_none());
    }

    #[test]
    fn rejections_map_statuses_to_conditions() {
        let e = rejection(401, None, b"{\"errorCode\":401002}");
        assert_eq!(e.condition, ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess));
        assert_eq!(e.description.as_deref(), Some("{\"errorCode\":401002}"));
        let e = rejection(429, Some(4), b"{}");
        assert_eq!(e.condition, ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled")));
        let info = e.info.unwrap();
        assert_eq!(info.get(&Symbol::from(RETRY_AFTER)), Some(&Value::String("4".into())));
        assert_eq!(info.get(&Symbol::from(STATUS)), Some(&Value::Int(429)));
        assert_eq!(condition_for(404), "amqp:not-found");
        assert_eq!(condition_for(503), "amqp:internal-error");
        assert_eq!(condition_for(400), "com.microsoft:argument-error");
    }
}

/// Watches the frames a peer sends, before fe2o3-amqp decodes them, for the one rule the
/// library does not enforce: a transfer must travel on a link the peer attached (AMQP 1.0
/// §2.7.5; fe2o3-amqp silently drops such a transfer, so the device would wait for an
/// answer forever). It reads only frame headers and the first fields of attach, detach,
/// end and transfer performatives; anything it cannot parse is left to fe2o3-amqp.
#[derive(Debug, Default)]
pub struct FrameGuard {
    /// Bytes of a frame head not complete yet.
    pending: Vec<u8>,
    /// Bytes of the current frame still to pass without looking.
    skip: usize,
    /// (channel, handle) of every link the peer attached and has not detached.
    attached: std::collections::HashSet<(u16, u32)>,
}

/// How much of a frame the guard looks at: header, extended header and the performative's
/// first fields.
const GUARD_HEAD: usize = 8 + 1020 + 64;

impl FrameGuard {
    /// Feeds bytes the peer sent, in order.
    ///
    /// # Errors
    /// The rule broken, when a transfer names a handle no attach opened.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), &'static str> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            // Collect a frame's head (or a protocol header) before judging it.
            let need = self.head_len();
            let take = need.saturating_sub(self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < self.head_len() {
                continue;
            }
            let head = std::mem::take(&mut self.pending);
            if head.starts_with(b"AMQP") {
                continue; // a protocol header (8 bytes), e.g. after SASL
            }
            let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if size < 8 {
                // Malformed: fe2o3-amqp refuses it; stop looking at this stream.
                self.skip = usize::MAX;
                continue;
            }
            self.skip = size.saturating_sub(head.len());
            self.judge(&head[..head.len().min(size)])?;
        }
        Ok(())
    }

    /// How many bytes of the current frame the guard wants before judging it.
    fn head_len(&self) -> usize {
        if self.pending.len() < 8 {
            return 8;
        }
        if self.pending.starts_with(b"AMQP") {
            return 8;
        }
        let size = u32::from_be_bytes([self.pending[0], self.pending[1], self.pending[2], self.pending[3]]) as usize;
        size.clamp(8, GUARD_HEAD)
    }

    fn judge(&mut self, frame: &[u8]) -> Result<(), &'static str> {
        let (doff, kind) = (usize::from(frame[4]) * 4, frame[5]);
        let channel = u16::from_be_bytes([frame[6], frame[7]]);
        if kind != 0 || doff < 8 || frame.len() <= doff {
            return Ok(()); // SASL frame, heartbeat, or something fe2o3-amqp will judge
        }
        let mut r = Reader(&frame[doff..]);
        let Some(code) = r.descriptor() else { return Ok(()) };
        let first_uint = |r: &mut Reader<'_>| r.list_header().and_then(|n| (n > 0).then(|| r.uint()).flatten());
        match code {
            // attach: name, then handle.
            0x12 => {
                if let Some(n) = r.list_header()
                    && n >= 2
                    && r.skip_string()
                    && let Some(h) = r.uint()
                {
                    self.attached.insert((channel, h));
                }
            }
            // detach: handle.
            0x16 => {
                if let Some(h) = first_uint(&mut r) {
                    self.attached.remove(&(channel, h));
                }
            }
            // end: every link of the session.
            0x17 => self.attached.retain(|(c, _)| *c != channel),
            // transfer: handle.
            0x14 => {
                if let Some(h) = first_uint(&mut r)
                    && !self.attached.contains(&(channel, h))
                {
                    return Err("a transfer on a handle that no attach opened");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Just enough of the AMQP type system for [`FrameGuard`].
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A described type's numeric descriptor.
    fn descriptor(&mut self) -> Option<u64> {
        if self.byte()? != 0x00 {
            return None;
        }
        match self.byte()? {
            0x53 => self.byte().map(u64::from),
            0x80 => self.take(8).map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
            0x44 => Some(0),
            _ => None,
        }
    }

    /// A list's element count (the list's size is not needed).
    fn list_header(&mut self) -> Option<u32> {
        match self.byte()? {
            0x45 => Some(0),
            0xc0 => {
                self.byte()?;
                self.byte().map(u32::from)
            }
            0xd0 => {
                self.u32()?;
                self.u32()
            }
            _ => None,
        }
    }

    fn uint(&mut self) -> Option<u32> {
        match self.byte()? {
            0x43 => Some(0),
            0x52 => self.byte().map(u32::from),
            0x70 => self.u32(),
            _ => None,
        }
    }

    /// Skips a string, a symbol or null; false for anything else.
    fn skip_string(&mut self) -> bool {
        let len = match self.byte() {
            Some(0x40) => return true,
            Some(0xa1 | 0xa3) => self.byte().map(usize::from),
            Some(0xb1 | 0xb3) => self.u32().map(|n| n as usize),
            _ => None,
        };
        len.is_some_and(|n| self.take(n).is_some())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod guard_tests {
    use fe2o3_amqp_types::{
        definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode},
        messaging::{Source, Target},
        performatives::{Attach, Detach, End, Performative, Transfer},
    };

    use super::FrameGuard;

    fn frame(channel: u16, p: Performative) -> Vec<u8> {
        let body = serde_amqp::to_vec(&p).unwrap();
        let mut f = u32::try_from(body.len() + 8).unwrap().to_be_bytes().to_vec();
        f.extend([2, 0]);
        f.extend(channel.to_be_bytes());
        f.extend(body);
        f
    }

    fn attach(handle: u32, name: &str) -> Performative {
        Performative::Attach(Attach {
            name: name.into(),
            handle: Handle(handle),
            role: Role::Sender,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().address("0ne/registrations/d").build())),
            target: Some(Box::new(Target::builder().address("0ne/registrations/d").build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn transfer(handle: u32) -> Performative {
        Performative::Transfer(Transfer {
            handle: Handle(handle),
            delivery_id: Some(0),
            delivery_tag: Some(vec![1u8].into()),
            message_format: Some(0),
            settled: Some(false),
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        })
    }

    #[test]
    fn transfers_need_an_attached_handle() {
        let mut g = FrameGuard::default();
        g.feed(b"AMQP\x00\x01\x00\x00").unwrap();
        assert!(g.feed(&frame(0, transfer(0))).is_err(), "before any attach");

        let mut g = FrameGuard::default();
        g.feed(&frame(0, attach(0, "sender"))).unwrap();
        g.feed(&frame(0, transfer(0))).unwrap();
        assert!(g.feed(&frame(0, transfer(1))).is_err(), "another handle");
        assert!(g.feed(&frame(1, transfer(0))).is_err(), "another session");
        // A big handle (uint, not smalluint) and a long name.
        g.feed(&frame(0, attach(300_000, &"n".repeat(300)))).unwrap();
        g.feed(&frame(0, transfer(300_000))).unwrap();
        // Detach and end forget links.
        g.feed(&frame(0, Performative::Detach(Detach { handle: Handle(0), closed: true, error: None }))).unwrap();
        assert!(g.feed(&frame(0, transfer(0))).is_err(), "after detach");
        g.feed(&frame(0, Performative::End(End { error: None }))).unwrap();
        assert!(g.feed(&frame(0, transfer(300_000))).is_err(), "after end");
    }

    #[test]
    fn frames_split_anywhere_and_payloads_are_skipped() {
        // Attach, a transfer with a large payload, heartbeat, SASL header: fed one byte at
        // a time, then in odd chunks.
        let mut stream = b"AMQP\x03\x01\x00\x00".to_vec();
        stream.extend([0, 0, 0, 8, 2, 1, 0, 0]); // an (empty) SASL frame
        stream.extend(b"AMQP\x00\x01\x00\x00");
        stream.extend(frame(0, attach(7, "l")));
        let mut t = frame(0, transfer(7));
        t.extend(vec![0xAB; 5000]);
        let size = u32::try_from(t.len()).unwrap().to_be_bytes();
        t[..4].copy_from_slice(&size);
        stream.extend(&t);
        stream.extend([0, 0, 0, 8, 2, 0, 0, 0]); // heartbeat
        stream.extend(frame(0, transfer(7)));
        let mut g = FrameGuard::default();
        for b in &stream {
            g.feed(std::slice::from_ref(b)).unwrap();
        }
        let mut g = FrameGuard::default();
        for c in stream.chunks(37) {
            g.feed(c).unwrap();
        }
        // The payload bytes (0xAB…) were skipped, not read as frames; a bad transfer after
        // them is still caught.
        assert!(g.feed(&frame(0, transfer(8))).is_err());
    }

    #[test]
    fn garbage_is_left_to_the_library() {
        let mut g = FrameGuard::default();
        g.feed(&[0, 0, 0, 2, 9, 9, 9, 9, 1, 2, 3]).unwrap();
        let mut g = FrameGuard::default();
        g.feed(&[0, 0, 0, 12, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).unwrap();
    }
}
