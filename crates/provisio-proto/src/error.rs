//! The DPS error body (`ProvisioningServiceErrorDetails`) and the numeric codes Provisio emits.
//!
//! `errorCode` is always `HTTP status × 1000 + sub-code`: the C# AMQP and Embedded C
//! clients derive the HTTP class by integer division, so the two must agree.

use serde::{Deserialize, Serialize};

/// The JSON body of every non-2xx answer of the device and service APIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// `HTTP status × 1000 + sub-code`, e.g. `401002`.
    pub error_code: u32,
    /// Identifier of this failure, also logged by the server and sent as `x-ms-request-id`.
    pub tracking_id: String,
    /// Human-readable reason.
    pub message: String,
    /// When the error happened, ISO-8601 UTC.
    pub timestamp_utc: String,
    /// Optional extra details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<std::collections::BTreeMap<String, String>>,
}

/// Numeric error codes. Those marked *DPS* are observed from Azure DPS; the others are
/// Provisio's own sub-codes within the HTTP class DPS uses for the same situation.
pub mod codes {
    /// DPS: argument invalid (malformed body, unsupported api-version, bad id).
    pub const ARGUMENT_INVALID: u32 = 400_004;
    /// Provisio: the request body is not valid JSON or has the wrong shape.
    pub const MALFORMED_BODY: u32 = 400_001;
    /// DPS: custom allocation failed.
    pub const CUSTOM_ALLOCATION_FAILED: u32 = 400_207;
    /// DPS: no IoT hub could be assigned.
    pub const HUB_NOT_SPECIFIED: u32 = 400_208;
    /// DPS (C SDK: "hub unauthorized"); Provisio: creating the device at its hub failed.
    pub const HUB_REGISTRATION_FAILED: u32 = 400_209;
    /// DPS: unauthorized (generic).
    pub const UNAUTHORIZED_GENERIC: u32 = 401_000;
    /// DPS: unauthorized: the SAS token or certificate was not accepted.
    pub const UNAUTHORIZED: u32 = 401_002;
    /// Provisio: the enrollment or group is disabled (reported inside a `disabled` result).
    pub const ENROLLMENT_DISABLED: u32 = 403_002;
    /// Provisio: the service policy lacks the right the operation needs.
    pub const FORBIDDEN: u32 = 403_001;
    /// Provisio: route or ID scope not found.
    pub const NOT_FOUND: u32 = 404_001;
    /// DPS: enrollment / registration not found.
    pub const ENROLLMENT_NOT_FOUND: u32 = 404_201;
    /// DPS (meaning unconfirmed); Provisio: registration state or operation not found.
    pub const REGISTRATION_NOT_FOUND: u32 = 404_202;
    /// DPS (C# e2e): enrollment group not found.
    pub const ENROLLMENT_GROUP_NOT_FOUND: u32 = 404_204;
    /// Provisio: HTTP method not allowed on this route.
    pub const METHOD_NOT_ALLOWED: u32 = 405_001;
    /// DPS: the enrollment already exists (create without If-Match).
    pub const ALREADY_EXISTS: u32 = 409_201;
    /// Provisio: ETag mismatch (DPS's sub-code is unconfirmed).
    pub const PRECONDITION_FAILED: u32 = 412_001;
    /// Provisio: request body larger than the configured limit.
    pub const PAYLOAD_TOO_LARGE: u32 = 413_001;
    /// Provisio: unsupported media type.
    pub const UNSUPPORTED_MEDIA_TYPE: u32 = 415_001;
    /// Provisio: throttled.
    pub const THROTTLED: u32 = 429_001;
    /// Provisio: internal server error.
    pub const INTERNAL: u32 = 500_001;
    /// Provisio: the server is not ready or is shutting down.
    pub const UNAVAILABLE: u32 = 503_001;

    /// The HTTP status class an error code belongs to.
    #[must_use]
    pub const fn http_status(code: u32) -> u16 {
        // Codes are constructed as status * 1000 + sub-code with status < 600.
        #[allow(clippy::cast_possible_truncation)]
        {
            (code / 1000) as u16
        }
    }
}
