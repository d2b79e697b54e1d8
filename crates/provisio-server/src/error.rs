//! Why a server cannot start: configuration, listeners, TLS material, the store. These go
//! to the operator who starts the service; DPS answers to clients are
//! [`provisio_engine::Error`]'s.

use std::net::SocketAddr;

use provisio_engine::SetupError;
use provisio_store::StoreError;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is unusable; the message says which and why.
    #[error("{0}")]
    Config(String),
    /// A listener cannot be bound.
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Listen {
        /// `HTTPS`, `MQTT` or `AMQP`.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The store cannot be opened or failed during start-up.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The instance cannot be opened (files, stored documents, settings).
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// Why the server dropped a device connection (MQTT or AMQP; logged, not answered).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Dropped {
    /// A deadline passed: what was awaited.
    #[error("no {0} in time")]
    Timeout(&'static str),
    /// Reading failed.
    #[error("read failed: {0}")]
    Read(std::io::Error),
    /// Writing failed.
    #[error("write failed: {0}")]
    Write(std::io::Error),
    /// Bytes that are not the protocol.
    #[error("malformed: {0}")]
    Malformed(String),
    /// The protocol's own refusal (an AMQP error condition and why, a SASL outcome …).
    #[error("{0}")]
    Refused(String),
}
