//! The one place where failures become DPS error answers ([`Error`]), the start-up errors
//! that are not DPS answers ([`SetupError`]), and the one mapping of store errors
//! ([`StoreResult`]).

use std::path::PathBuf;

use provisio_core::{CoreError, attest::AttestError};
use provisio_proto::error::{ErrorBody, codes};
use provisio_store::StoreError;

/// Seconds a client is told to wait after a server-side failure (5xx) that names no
/// other wait.
pub const RETRY_AFTER_FAILURE_SECS: u64 = 5;

/// Every failure the device API and the service API answer with: each becomes a DPS
/// error body ([`Error::to_body`]) and an [`Answer`] ([`Error::answer`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: the message is safe to show.
    #[error("{message}")]
    BadRequest {
        /// DPS error code (400xxx).
        code: u32,
        /// What was wrong.
        message: String,
    },
    /// Credentials refused. `public` is what the caller sees; `detail` is logged only.
    #[error("{public}")]
    Unauthorized {
        /// Shown to the caller.
        public: String,
        /// Logged with the tracking id.
        detail: String,
        /// A tracking id already recorded elsewhere (the audit record), if any.
        tracking_id: Option<String>,
    },
    /// The service policy lacks the right.
    #[error("{0}")]
    Forbidden(String),
    /// Something does not exist.
    #[error("{message}")]
    NotFound {
        /// DPS error code (404xxx).
        code: u32,
        /// What was missing.
        message: String,
    },
    /// Method not allowed on a route.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Create of an existing id.
    #[error("{0}")]
    Conflict(String),
    /// ETag mismatch.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Body too large.
    #[error("request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// Our fault. The detail is logged, not shown.
    #[error("internal error")]
    Internal(String),
    /// Request took too long.
    #[error("the request timed out")]
    Timeout,
    /// Rate limit reached; retry after this many seconds.
    #[error("too many requests: retry after {0} s")]
    Throttled(u64),
    /// Another error whose tracking id is already recorded (in the audit log).
    #[error("{inner}")]
    Tracked {
        /// The error.
        inner: Box<Error>,
        /// The tracking id to answer with.
        tracking_id: String,
    },
}

impl Error {
    /// 400 with `400004` ("argument invalid").
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::BadRequest { code: codes::ARGUMENT_INVALID, message: message.into() }
    }

    /// 400 with `400001` (malformed body).
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::BadRequest { code: codes::MALFORMED_BODY, message: message.into() }
    }

    /// 401 / `401002` with a generic public message and a logged detail.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::Unauthorized { public: "Unauthorized".into(), detail: detail.into(), tracking_id: None }
    }

    /// Gives the error a tracking id (kept if it already has one) and returns it.
    #[must_use]
    pub fn tracked(self) -> (Self, String) {
        match self.tracking_id() {
            Some(t) => {
                let t = t.to_owned();
                (self, t)
            }
            None => {
                let t = uuid::Uuid::new_v4().to_string();
                (Self::Tracked { inner: Box::new(self), tracking_id: t.clone() }, t)
            }
        }
    }

    /// The tracking id already given to this error, if any.
    #[must_use]
    pub fn tracking_id(&self) -> Option<&str> {
        match self {
            Self::Unauthorized { tracking_id: Some(t), .. } | Self::Tracked { tracking_id: t, .. } => Some(t),
            _ => None,
        }
    }

    /// The error itself, without its tracking id.
    #[must_use]
    pub fn untracked(&self) -> &Self {
        match self {
            Self::Tracked { inner, .. } => inner.untracked(),
            other => other,
        }
    }

    /// Seconds the client should wait before retrying: the wait of a throttled request, and
    /// [`RETRY_AFTER_FAILURE_SECS`] for every server-side failure (`5xx`), on every
    /// transport (MQTT and AMQP clients retry those after the hint; HTTP clients read
    /// `Retry-After`). Client errors get none: retrying them cannot help.
    #[must_use]
    pub fn retry_after(&self) -> Option<u64> {
        match self.untracked() {
            Self::Throttled(s) => Some(*s),
            e if e.status() >= 500 => Some(RETRY_AFTER_FAILURE_SECS),
            _ => None,
        }
    }

    /// The DPS error code.
    #[must_use]
    pub fn code(&self) -> u32 {
        match self {
            Self::Tracked { inner, .. } => inner.code(),
            Self::BadRequest { code, .. } | Self::NotFound { code, .. } => *code,
            Self::Unauthorized { .. } => codes::UNAUTHORIZED,
            Self::Forbidden(_) => codes::FORBIDDEN,
            Self::MethodNotAllowed(_) => codes::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => codes::ALREADY_EXISTS,
            Self::PreconditionFailed(_) => codes::PRECONDITION_FAILED,
            Self::PayloadTooLarge(_) => codes::PAYLOAD_TOO_LARGE,
            Self::Internal(_) => codes::INTERNAL,
            Self::Timeout => codes::UNAVAILABLE,
            Self::Throttled(_) => codes::THROTTLED,
        }
    }

    /// The HTTP status (the first three digits of the code).
    #[must_use]
    pub fn status(&self) -> u16 {
        codes::http_status(self.code())
    }

    /// What is logged beyond the public message.
    #[must_use]
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Unauthorized { detail, .. } | Self::Internal(detail) => Some(detail),
            Self::Tracked { inner, .. } => inner.detail(),
            _ => None,
        }
    }

    /// Builds the body, logging the failure under a fresh tracking id.
    #[must_use]
    pub fn to_body(&self) -> ErrorBody {
        let tracking_id = self.tracking_id().map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let code = self.code();
        match self.detail() {
            Some(detail) if code >= 500_000 => {
                tracing::error!(tracking_id, error_code = code, detail, "request failed");
            }
            Some(detail) => tracing::info!(tracking_id, error_code = code, detail, "request refused"),
            None => tracing::info!(tracking_id, error_code = code, message = %self, "request refused"),
        }
        // `info` (the specification's string map) only where Provisio can say what it holds:
        // the retry hint a throttled or failed request carries (`Retry-After` over HTTPS, the
        // MQTT topic's `retry-after`, AMQP's error info), for clients that read only bodies.
        let info =
            self.retry_after().map(|secs| std::iter::once(("retryAfter".to_owned(), secs.to_string())).collect());
        ErrorBody {
            error_code: code,
            tracking_id,
            message: self.to_string(),
            timestamp_utc: provisio_core::timefmt::now(),
            info,
        }
    }
}

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::MalformedSas(_) => {
                Self::Unauthorized { public: e.to_string(), detail: e.to_string(), tracking_id: None }
            }
            CoreError::InvalidId { .. } | CoreError::InvalidKey(_) => Self::invalid(e.to_string()),
        }
    }
}

impl From<AttestError> for Error {
    fn from(e: AttestError) -> Self {
        let public = match &e {
            // Safe to tell: they concern the token, not whether the device is enrolled.
            AttestError::Expired { .. } => "The SAS token has expired.".to_owned(),
            AttestError::WrongResource { .. } => {
                "The SAS token was issued for another resource than this request's.".to_owned()
            }
            AttestError::WrongKeyName(_) => "The SAS token key name must be 'registration'.".to_owned(),
            // An unknown device and a wrong key must look the same.
            AttestError::NoEnrollment(_) | AttestError::KeyMismatch(_) | AttestError::WrongAttestationType { .. } => {
                "Unauthorized".to_owned()
            }
        };
        Self::Unauthorized { public, detail: e.to_string(), tracking_id: None }
    }
}

/// What a store error means for one resource (an enrollment, a group, a certificate …):
/// the one place where `NotFound`, `Conflict` and `PreconditionFailed` become DPS answers.
#[derive(Debug, Clone, Copy)]
pub struct Resource<'a> {
    /// What it is, capitalised, as messages name it ("Enrollment group").
    pub kind: &'static str,
    /// Its id or name, as the client spelled it.
    pub id: &'a str,
    /// The DPS error code when it does not exist.
    pub not_found_code: u32,
}

impl Resource<'_> {
    /// `404` for this resource.
    #[must_use]
    pub fn not_found(&self) -> Error {
        Error::NotFound {
            code: self.not_found_code,
            message: format!("{} '{}' was not found.", self.kind, provisio_core::text::shorten(self.id)),
        }
    }

    /// The DPS answer for a store error on this resource.
    #[must_use]
    pub fn store_error(&self, e: StoreError) -> Error {
        let id = provisio_core::text::shorten(self.id);
        match e {
            StoreError::NotFound => self.not_found(),
            StoreError::Conflict => Error::Conflict(format!(
                "{} '{id}' already exists. To replace it, send If-Match with its etag, or If-Match: *.",
                self.kind
            )),
            StoreError::PreconditionFailed => Error::PreconditionFailed(format!(
                "{} '{id}' has changed: the If-Match etag does not match.",
                self.kind
            )),
            StoreError::Backend(m) => Error::Internal(format!("store: {m}")),
        }
    }
}

/// Maps the error of a store call, explicitly at each call: there is no blanket
/// conversion, so a `NotFound` or `Conflict` is never silently answered as `500`.
pub trait StoreResult<T> {
    /// For calls whose only failure is the store's own (reads, where a missing document is
    /// `None`, and unconditional writes): any error is an internal one.
    ///
    /// # Errors
    /// `500`, with the store's message kept for the log.
    fn or_internal(self) -> Result<T, Error>;

    /// For writes and deletes of `resource`: `404`, `409` and `412` as DPS answers them.
    ///
    /// # Errors
    /// As [`Resource::store_error`].
    fn about(self, resource: &Resource<'_>) -> Result<T, Error>;
}

impl<T> StoreResult<T> for Result<T, StoreError> {
    fn or_internal(self) -> Result<T, Error> {
        self.map_err(|e| match e {
            StoreError::Backend(m) => Error::Internal(format!("store: {m}")),
            other => Error::Internal(format!("store: unexpected answer to a read: {other}")),
        })
    }

    fn about(self, resource: &Resource<'_>) -> Result<T, Error> {
        self.map_err(|e| resource.store_error(e))
    }
}

/// Why an instance cannot be opened or started: configuration, files, the store. These are
/// for the operator who starts the service, never DPS answers.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A setting is unusable; the message says which and why.
    #[error("{0}")]
    Config(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A stored document cannot be read.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt {
        /// What was read.
        what: &'static str,
        /// Why it does not parse.
        detail: String,
    },
    /// A file cannot be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        /// `read`, `write`, `create` …
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Key or certificate material cannot be made or used.
    #[error("{0}")]
    Pki(String),
}
