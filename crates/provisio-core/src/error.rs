use thiserror::Error;

/// Every way a DPS rule can refuse input, as seen by `provisio-core`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// An identifier broke DPS's rules.
    #[error("invalid {kind} '{value}': {reason}")]
    InvalidId {
        /// What kind of identifier (`registration id`, `ID scope`, …).
        kind: &'static str,
        /// The offending value, truncated for display.
        value: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A symmetric key is not base64 of 16 to 64 bytes.
    #[error("invalid symmetric key: {0}")]
    InvalidKey(&'static str),
    /// A SAS token could not be parsed.
    #[error("malformed SAS token: {0}")]
    MalformedSas(&'static str),
}
