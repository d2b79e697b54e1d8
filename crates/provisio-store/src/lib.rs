//! Provisio's storage: the [`Store`] trait, its embedded SQLite implementation and its
//! PostgreSQL implementation for several nodes.
//!
//! The store versions opaque JSON documents (enrollments, groups, registration records,
//! policies, instance metadata) with ETags and keeps registration operations. It knows
//! nothing of DPS wire formats; `provisio-server` decides what goes in a body.
//! Every write is a single atomic statement or one transaction, so ETag checks cannot
//! race, and SQLite runs with `synchronous=FULL` so an acknowledged write survives a crash.

mod keyfilter;
mod postgres;
pub mod sealed;
mod sqlite;

use async_trait::async_trait;
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use thiserror::Error;

pub use postgres::PostgresStore;
pub use sealed::{Keyring, SealedStore};
pub use sqlite::SqliteStore;

/// A kind of document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    /// Individual enrollments, keyed by case-folded registration id.
    Enrollments,
    /// Enrollment groups, keyed by case-folded group id.
    EnrollmentGroups,
    /// Registration records, keyed by case-folded registration id.
    Registrations,
    /// Shared access policies, keyed by name.
    Policies,
    /// Instance metadata (identity, CA, server certificate).
    Meta,
    /// CA certificates of the certificates API, keyed by case-folded name.
    Certificates,
    /// Refused attestation attempts, keyed by case-folded registration id (last one kept).
    Audit,
    /// Linked IoT hubs, keyed by case-folded host name.
    Hubs,
    /// Outstanding TPM challenges (the key a TPM device was sent), keyed by case-folded
    /// registration id.
    TpmChallenges,
    /// Issuing CAs of operational certificates, keyed by case-folded name.
    IssuingCas,
    /// Certificate policies, keyed by case-folded name.
    CredentialPolicies,
    /// Operational certificates issued at registration, keyed by
    /// `{case-folded registration id}/{serial}` (a device's are listed together).
    IssuedCertificates,
}

impl Collection {
    /// The name stored in the `collection` column.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enrollments => "enrollments",
            Self::EnrollmentGroups => "enrollmentGroups",
            Self::Registrations => "registrations",
            Self::Policies => "policies",
            Self::Meta => "meta",
            Self::Certificates => "certificates",
            Self::Audit => "audit",
            Self::TpmChallenges => "tpmChallenges",
            Self::Hubs => "hubs",
            Self::IssuingCas => "issuingCas",
            Self::CredentialPolicies => "credentialPolicies",
            Self::IssuedCertificates => "issuedCertificates",
        }
    }
}

/// A stored, versioned document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Key within its collection.
    pub id: String,
    /// Changes on every write.
    pub etag: String,
    /// JSON body.
    pub body: String,
}

/// The condition a write must meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Only if no document has this id (`PUT` without `If-Match`).
    CreateOnly,
    /// Unconditionally (`If-Match: *`).
    Any,
    /// Only if the current etag is this one.
    IfMatch(String),
}

/// One registration operation: a snapshot of the registration record it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Operation id.
    pub id: String,
    /// Case-folded registration id.
    pub registration_id: String,
    /// The record's etag after this operation.
    pub registration_etag: String,
    /// The record's body after this operation.
    pub registration_body: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A registration record as [`Store::record_registration`] writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationWrite<'a> {
    /// The record's id (the case-folded registration id).
    pub registration_id: &'a str,
    /// The record.
    pub body: &'a str,
    /// Its secondary key (its enrollment group), for [`Store::list_by_tag`].
    pub tag: Option<&'a str>,
    /// An opaque label (its outcome), for [`Store::count_by_state`].
    pub state: Option<&'a str>,
    /// The operation that produced it.
    pub operation_id: &'a str,
}

/// The largest id that starts with `prefix`'s upper bound: `prefix` followed by the greatest
/// code point, which every id starting with `prefix` sorts below (bytewise).
#[must_use]
pub fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

/// Storage failures.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The document does not exist.
    #[error("not found")]
    NotFound,
    /// A document with this id already exists.
    #[error("already exists")]
    Conflict,
    /// The etag did not match.
    #[error("etag mismatch")]
    PreconditionFailed,
    /// The database failed.
    #[error("database error: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

/// Result of store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Storage behind the registration engine and the service API.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads a document.
    async fn get(&self, c: Collection, id: &str) -> Result<Option<Document>>;

    /// Reads the documents with the same id in two collections, in one round trip (a
    /// registration reads the device's enrollment and its previous record together).
    async fn get_both(&self, a: Collection, b: Collection, id: &str) -> Result<(Option<Document>, Option<Document>)> {
        Ok((self.get(a, id).await?, self.get(b, id).await?))
    }

    /// Writes a document under `pre`; returns it with its new etag.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] for `CreateOnly` on an existing id,
    /// [`StoreError::NotFound`] / [`StoreError::PreconditionFailed`] for `IfMatch`.
    async fn put(&self, c: Collection, id: &str, body: &str, pre: Precondition) -> Result<Document>;

    /// Inserts `body` unless the id exists; returns whichever document is stored. Used
    /// to initialise instance state exactly once even when nodes start together.
    async fn insert_if_absent(&self, c: Collection, id: &str, body: &str) -> Result<Document>;

    /// Deletes a document, if `if_match` is given only when its etag matches.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or [`StoreError::PreconditionFailed`].
    async fn delete(&self, c: Collection, id: &str, if_match: Option<&str>) -> Result<()>;

    /// Lists documents in id order, starting after `after`, at most `limit`.
    async fn list(&self, c: Collection, after: Option<&str>, limit: u32) -> Result<Vec<Document>>;

    /// Writes a registration record and records the operation that produced it, in one
    /// transaction. Returns the record with its new etag.
    async fn record_registration(&self, w: &RegistrationWrite<'_>) -> Result<Document>;

    /// How many documents `c` holds.
    async fn count(&self, c: Collection) -> Result<u64>;

    /// How many documents of `c` carry each state label (documents without one are not
    /// counted), in label order.
    async fn count_by_state(&self, c: Collection) -> Result<Vec<(String, u64)>>;

    /// Lists the documents of `c` whose id starts with `prefix` (bytewise), in id order,
    /// after `after`, at most `limit`: a search by id that pages in the store.
    async fn list_prefix(&self, c: Collection, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>>;

    /// Lists documents whose tag is `tag`, in id order, after `after`, at most `limit`.
    async fn list_by_tag(&self, c: Collection, tag: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>>;

    /// Reads an operation.
    async fn get_operation(&self, id: &str) -> Result<Option<Operation>>;

    /// Deletes operations created before `before` (Unix seconds); returns how many.
    async fn purge_operations(&self, before: i64) -> Result<u64>;

    /// Deletes the documents of `c` beyond the `keep` most recently updated (of those
    /// updated in the same second, the ones with the greater ids are kept); returns how many
    /// it deleted. For collections that anyone can grow, such as [`Collection::Audit`].
    async fn trim(&self, c: Collection, keep: u32) -> Result<u64>;

    /// Writes many documents in one transaction (`Precondition::Any` each): bulk loads.
    async fn import(&self, c: Collection, docs: &[(String, String)]) -> Result<()>;

    /// Closes connections (and checkpoints an embedded database) at shutdown.
    async fn close(&self) {}
}

/// A fresh etag: base64 of a quoted UUID, the shape DPS uses.
#[must_use]
pub fn new_etag() -> String {
    B64.encode(format!("\"{}\"", uuid::Uuid::new_v4()))
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod conformance;
