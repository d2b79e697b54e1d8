//! Provisio's DPS semantics with storage and no transport.
//!
//! Every front-end (HTTPS, MQTT, AMQP, and their WebSocket forms) parses its framing,
//! builds a [`device::DeviceRequest`] and calls [`Engine::device`]; the engine decides every
//! DPS rule (api-version, body parsing and the body-id check, the TPM challenge, attestation,
//! allocation, `202` or `200`, when a retry hint is given) and returns a transport-neutral
//! [`Answer`] that the front-end maps back to its framing. The service API's logic
//! ([`service::ServiceApi`], [`certificates::Certificates`], [`hubs::Hubs`]), the instance,
//! audit, caches and limits live here too. Nothing here knows HTTP, MQTT, AMQP or TLS
//! acceptors.
//!
//! ```text
//! front-end ──DeviceRequest──▶ Engine::device ──▶ attest ─▶ allocate ─▶ store
//!     ▲                              │
//!     └────────────Answer────────────┘
//! ```

pub mod addresses;
pub mod allocation;
pub mod audit;
pub mod bodies;
pub mod cache;
pub mod certificates;
pub mod device;
mod engine;
mod error;
pub mod hubs;
pub mod instance;
pub mod issuance;
pub mod limits;
pub mod registrar;
pub mod service;
pub mod stats;
mod tpm;
pub mod webhook;
pub mod wire;

pub use device::{Answer, Connection, Credential, DeviceOperation, DeviceRequest, Origin, Transport};
pub use engine::{Engine, EngineSettings};
pub use error::{Error, Resource, SetupError, StoreResult};
pub use tpm::{TPM_CHALLENGE_SECS, TpmChallenge};

/// Serialises `v` as JSON into a buffer sized for the documents of a registration (record,
/// answer, audit line), so that it is not grown three or four times on the way: a
/// `realloc` takes a lock on its allocator arena, which the worker threads contend for.
/// 1,024 bytes is also the largest request glibc answers from its thread-local cache.
///
/// # Errors
/// What serde_json reports (never for the types this crate serialises).
pub fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, v)?;
    Ok(out)
}
