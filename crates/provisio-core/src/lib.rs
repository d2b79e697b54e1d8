//! DPS semantics without I/O.
//!
//! * [`ids`]: identifiers that enforce DPS's rules (`IdScope`, `RegistrationId`, …);
//! * [`sas`]: SAS token parsing, signing and verification, over the `sr` text as sent;
//! * [`keys`]: symmetric keys: validation, generation, group-key derivation;
//! * [`model`]: enrollments, groups and registration records as stored;
//! * [`attest`]: which enrollment a symmetric-key credential proves;
//! * [`allocation`]: choosing an IoT hub;
//! * [`timefmt`]: DPS's timestamp format;
//! * [`text`]: quoting client input in messages;
//! * [`tpm`]: the blob that delivers a TPM device's key (TPM attestation).

pub mod allocation;
pub mod attest;
pub mod ids;
pub mod keys;
pub mod model;
pub mod sas;
pub mod text;
pub mod timefmt;
pub mod tpm;

mod error;
pub use error::CoreError;
