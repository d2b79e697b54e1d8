//! Encryption at rest of the secrets inside stored documents.
//!
//! [`SealedStore`] wraps any [`Store`]. On the way in it replaces the secret string fields
//! of a document (symmetric keys of enrollments and groups, policy keys, the CA's and the
//! server's private keys, the console's session key, and the webhook URLs of enrollments,
//! groups and hubs, whose query strings hold function keys) with `$sealed:v1:{kid}:{base64(nonce ‖ ciphertext ‖ tag)}`,
//! AES-256-GCM under the current key with the collection, document id and field name as
//! associated data, so a sealed value cannot be moved to another document or field. On
//! the way out it opens them with whichever configured key has that `kid`.
//!
//! Plain values are still read (an existing database keeps working when encryption is
//! switched on) and are sealed on their next write or by [`SealedStore::reseal_all`],
//! which is also how keys are rotated: make the new key current, keep the old one among
//! the previous keys until every document has been resealed.

use std::sync::Arc;

use async_trait::async_trait;
use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    digest,
    rand::{SecureRandom, SystemRandom},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde_json::{Map, Value};

use crate::{Collection, Document, Operation, Precondition, RegistrationWrite, Result, Store, StoreError};

const PREFIX: &str = "$sealed:v1:";

/// Fields holding secrets, at the top level of a document or inside its `attestation`
/// (a hub's `registrarWebhookUrl` is at its top level).
const SECRET_FIELDS: &[&str] = &[
    "primaryKey",
    "secondaryKey",
    "caKeyPem",
    "keyPem",
    "challengeKey",
    "earlierChallenges",
    "sessionKey",
    "registrarWebhookUrl",
];

/// The custom allocation webhook of an enrollment or a group: `settings.customAllocation`.
const WEBHOOK_PATH: [&str; 2] = ["settings", "customAllocation"];
const WEBHOOK_FIELDS: &[&str] = &["webhookUrl"];

/// Collections whose documents carry secrets.
const SEALED_COLLECTIONS: &[Collection] = &[
    Collection::Enrollments,
    Collection::EnrollmentGroups,
    Collection::Policies,
    Collection::Meta,
    Collection::TpmChallenges,
    Collection::Hubs,
    Collection::IssuingCas,
];

/// Key problems, reported at start-up before anything is served.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not base64 of exactly 32 bytes.
    #[error("{0} must be the base64 of exactly 32 random bytes (make one with `openssl rand -base64 32`)")]
    Malformed(&'static str),
}

/// One AES-256-GCM key and its short identifier.
struct SealKey {
    kid: String,
    key: LessSafeKey,
}

impl SealKey {
    fn parse(b64: &str, what: &'static str) -> Result<Self, KeyError> {
        let raw = B64.decode(b64.trim()).map_err(|_| KeyError::Malformed(what))?;
        if raw.len() != 32 {
            return Err(KeyError::Malformed(what));
        }
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| KeyError::Malformed(what))?);
        // The kid names the key without revealing it: 8 hex digits of its SHA-256.
        let kid = hex8(digest::digest(&digest::SHA256, &raw).as_ref());
        Ok(Self { kid, key })
    }
}

fn hex8(b: &[u8]) -> String {
    b.iter().take(4).map(|x| format!("{x:02x}")).collect()
}

/// The keys a node holds: the current one (absent: write plain values) and older ones
/// that are only read.
pub struct Keyring {
    current: Option<SealKey>,
    previous: Vec<SealKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the key ids: never the keys.
        f.debug_struct("Keyring")
            .field("current", &self.current.as_ref().map(|k| &k.kid))
            .field("previous", &self.previous.iter().map(|k| &k.kid).collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Builds a keyring from base64 keys.
    ///
    /// # Errors
    /// If a key is not base64 of 32 bytes.
    pub fn new(current: Option<&str>, previous: &[String]) -> Result<Self, KeyError> {
        Ok(Self {
            current: current
                .filter(|k| !k.trim().is_empty())
                .map(|k| SealKey::parse(k, "encryption_key"))
                .transpose()?,
            previous: previous
                .iter()
                .filter(|k| !k.trim().is_empty())
                .map(|k| SealKey::parse(k, "encryption_previous_keys"))
                .collect::<Result<_, _>>()?,
            rng: SystemRandom::new(),
        })
    }

    /// Whether any key is configured (otherwise the store needs no wrapping).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.current.is_none() && self.previous.is_empty()
    }

    /// The id of the current key, if any.
    #[must_use]
    pub fn current_kid(&self) -> Option<&str> {
        self.current.as_ref().map(|k| k.kid.as_str())
    }

    fn seal(&self, plain: &str, aad: &str) -> Result<Option<String>> {
        let Some(k) = &self.current else { return Ok(None) };
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Backend("no randomness for a nonce".into()))?;
        let mut buf = plain.as_bytes().to_vec();
        k.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| StoreError::Backend("sealing a secret failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(Some(format!("{PREFIX}{}:{}", k.kid, B64.encode(out))))
    }

    fn open(&self, sealed: &str, aad: &str) -> Result<String> {
        let rest = &sealed[PREFIX.len()..];
        let (kid, b64) = rest.split_once(':').ok_or_else(|| corrupt(aad))?;
        let key = self.current.iter().chain(&self.previous).find(|k| k.kid == kid).ok_or_else(|| {
            StoreError::Backend(format!(
                "a stored secret ({aad}) is encrypted with key {kid}, which is not configured; \
                 set encryption_key (or add it to encryption_previous_keys)"
            ))
        })?;
        let raw = B64.decode(b64).map_err(|_| corrupt(aad))?;
        if raw.len() < NONCE_LEN {
            return Err(corrupt(aad));
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt(aad))?;
        let mut buf = ct.to_vec();
        let plain = key.key.open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf).map_err(|_| {
            StoreError::Backend(format!("a stored secret ({aad}) does not decrypt with key {kid}: it was altered"))
        })?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt(aad))
    }
}

fn corrupt(aad: &str) -> StoreError {
    StoreError::Backend(format!("a stored secret ({aad}) is not a well-formed sealed value"))
}

/// Whether a body holds any sealed value: lets a node without keys fail clearly.
#[must_use]
pub fn has_sealed_values(body: &str) -> bool {
    body.contains(PREFIX)
}

/// Applies `f` to every secret field of a document body; returns the new body, or `None`
/// when nothing changed (the body is passed through untouched).
fn transform(
    body: &str,
    c: Collection,
    id: &str,
    mut f: impl FnMut(&str, &str) -> Result<Option<String>>,
) -> Result<Option<String>> {
    if !SEALED_COLLECTIONS.contains(&c) {
        return Ok(None);
    }
    // Bodies that are not JSON objects hold no secrets of ours.
    let Ok(Value::Object(mut doc)) = serde_json::from_str::<Value>(body) else { return Ok(None) };
    let mut changed = false;
    let mut visit = |obj: &mut Map<String, Value>, path: &str, fields: &[&str]| -> Result<()> {
        for field in fields {
            if let Some(Value::String(v)) = obj.get_mut(*field) {
                let aad = format!("{}/{id}/{path}{field}", c.as_str());
                if let Some(new) = f(v, &aad)? {
                    *v = new;
                    changed = true;
                }
            }
        }
        Ok(())
    };
    visit(&mut doc, "", SECRET_FIELDS)?;
    if let Some(Value::Object(att)) = doc.get_mut("attestation") {
        visit(att, "attestation.", SECRET_FIELDS)?;
    }
    if let Some(Value::Object(def)) = doc.get_mut(WEBHOOK_PATH[0]).and_then(|s| s.get_mut(WEBHOOK_PATH[1])) {
        visit(def, "settings.customAllocation.", WEBHOOK_FIELDS)?;
    }
    if !changed {
        return Ok(None);
    }
    serde_json::to_string(&doc).map(Some).map_err(|e| StoreError::Backend(e.to_string()))
}

/// A [`Store`] that encrypts secrets before they reach the inner store.
pub struct SealedStore {
    inner: Arc<dyn Store>,
    keys: Keyring,
}

impl SealedStore {
    /// Wraps `inner`.
    #[must_use]
    pub fn new(inner: Arc<dyn Store>, keys: Keyring) -> Self {
        Self { inner, keys }
    }

    fn seal_body(&self, c: Collection, id: &str, body: &str) -> Result<Option<String>> {
        transform(body, c, id, |v, aad| if v.starts_with(PREFIX) { Ok(None) } else { self.keys.seal(v, aad) })
    }

    fn open_body(&self, c: Collection, id: &str, body: &str) -> Result<Option<String>> {
        if !has_sealed_values(body) {
            return Ok(None);
        }
        transform(body, c, id, |v, aad| if v.starts_with(PREFIX) { self.keys.open(v, aad).map(Some) } else { Ok(None) })
    }

    fn open_doc(&self, c: Collection, mut d: Document) -> Result<Document> {
        if let Some(b) = self.open_body(c, &d.id, &d.body)? {
            d.body = b;
        }
        Ok(d)
    }

    fn sealed<'a>(&self, c: Collection, id: &str, body: &'a str) -> Result<std::borrow::Cow<'a, str>> {
        Ok(self.seal_body(c, id, body)?.map_or(std::borrow::Cow::Borrowed(body), std::borrow::Cow::Owned))
    }

    /// Rewrites every document that holds secrets so that each is sealed with the current
    /// key (or, with no current key, stored plain). Returns how many documents changed.
    /// Documents changed concurrently are retried; run it after every key change.
    ///
    /// # Errors
    /// If a stored secret cannot be opened with the configured keys, or the store fails.
    pub async fn reseal_all(&self) -> Result<u64> {
        let mut changed = 0;
        for &c in SEALED_COLLECTIONS {
            let mut after: Option<String> = None;
            loop {
                let page = self.inner.list(c, after.as_deref(), 500).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                for mut raw in page {
                    while self.needs_reseal(c, &raw)? {
                        let plain = self.open_doc(c, raw.clone())?;
                        let body =
                            transform(&plain.body, c, &raw.id, |v, aad| self.keys.seal(v, aad))?.unwrap_or(plain.body);
                        match self.inner.put(c, &raw.id, &body, Precondition::IfMatch(raw.etag.clone())).await {
                            Ok(_) => {
                                changed += 1;
                                break;
                            }
                            // Changed meanwhile: look again at the new version.
                            Err(StoreError::PreconditionFailed) => match self.inner.get(c, &raw.id).await? {
                                Some(d) => raw = d,
                                None => break,
                            },
                            Err(StoreError::NotFound) => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        Ok(changed)
    }

    /// Whether a stored document has a secret that is plain while a current key exists,
    /// or sealed with anything but the current key.
    fn needs_reseal(&self, c: Collection, raw: &Document) -> Result<bool> {
        let want = self.keys.current_kid().map(|k| format!("{PREFIX}{k}:"));
        let mut stale = false;
        transform(&raw.body, c, &raw.id, |v, _| {
            stale |= match &want {
                Some(w) => !v.starts_with(w.as_str()),
                None => v.starts_with(PREFIX),
            };
            Ok(None)
        })?;
        Ok(stale)
    }
}

#[async_trait]
impl Store for SealedStore {
    async fn get(&self, c: Collection, id: &str) -> Result<Option<Document>> {
        self.inner.get(c, id).await?.map(|d| self.open_doc(c, d)).transpose()
    }

    async fn get_both(&self, a: Collection, b: Collection, id: &str) -> Result<(Option<Document>, Option<Document>)> {
        let (x, y) = self.inner.get_both(a, b, id).await?;
        Ok((x.map(|d| self.open_doc(a, d)).transpose()?, y.map(|d| self.open_doc(b, d)).transpose()?))
    }

    async fn put(&self, c: Collection, id: &str, body: &str, pre: Precondition) -> Result<Document> {
        let sealed = self.sealed(c, id, body)?;
        let mut d = self.inner.put(c, id, &sealed, pre).await?;
        body.clone_into(&mut d.body);
        Ok(d)
    }

    async fn insert_if_absent(&self, c: Collection, id: &str, body: &str) -> Result<Document> {
        let sealed = self.sealed(c, id, body)?;
        let d = self.inner.insert_if_absent(c, id, &sealed).await?;
        self.open_doc(c, d)
    }

    async fn delete(&self, c: Collection, id: &str, if_match: Option<&str>) -> Result<()> {
        self.inner.delete(c, id, if_match).await
    }

    async fn list(&self, c: Collection, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        self.inner.list(c, after, limit).await?.into_iter().map(|d| self.open_doc(c, d)).collect()
    }

    async fn record_registration(&self, w: &RegistrationWrite<'_>) -> Result<Document> {
        // Registration records hold no keys.
        self.inner.record_registration(w).await
    }

    async fn count(&self, c: Collection) -> Result<u64> {
        self.inner.count(c).await
    }

    async fn count_by_state(&self, c: Collection) -> Result<Vec<(String, u64)>> {
        self.inner.count_by_state(c).await
    }

    async fn list_prefix(&self, c: Collection, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        self.inner.list_prefix(c, prefix, after, limit).await?.into_iter().map(|d| self.open_doc(c, d)).collect()
    }

    async fn list_by_tag(&self, c: Collection, tag: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        self.inner.list_by_tag(c, tag, after, limit).await?.into_iter().map(|d| self.open_doc(c, d)).collect()
    }

    async fn get_operation(&self, id: &str) -> Result<Option<Operation>> {
        self.inner.get_operation(id).await
    }

    async fn purge_operations(&self, before: i64) -> Result<u64> {
        self.inner.purge_operations(before).await
    }

    async fn trim(&self, c: Collection, keep: u32) -> Result<u64> {
        self.inner.trim(c, keep).await
    }

    async fn import(&self, c: Collection, docs: &[(String, String)]) -> Result<()> {
        let sealed = docs
            .iter()
            .map(|(id, body)| Ok((id.clone(), self.sealed(c, id, body)?.into_owned())))
            .collect::<Result<Vec<_>>>()?;
        self.inner.import(c, &sealed).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::SqliteStore;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "HxwdHhscGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";
    const DOC: &str = r#"{"registrationId":"dev-1","attestation":{"type":"symmetricKey","primaryKey":"cHJpbWFyeS1zZWNyZXQ=","secondaryKey":"c2Vjb25kYXJ5LXNlY3JldA=="},"initialTwin":{"primaryKey":"not-a-secret-of-ours"}}"#;

    async fn raw_store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap());
        (dir, s)
    }

    fn sealed(inner: &Arc<dyn Store>, current: Option<&str>, previous: &[&str]) -> SealedStore {
        let prev: Vec<String> = previous.iter().map(|s| (*s).to_owned()).collect();
        SealedStore::new(inner.clone(), Keyring::new(current, &prev).unwrap())
    }

    #[tokio::test]
    async fn secrets_are_sealed_on_disk_and_opened_on_read() {
        let (dir, raw) = raw_store().await;
        let s = sealed(&raw, Some(K1), &[]);
        let put = s.put(Collection::Enrollments, "dev-1", DOC, Precondition::CreateOnly).await.unwrap();
        assert_eq!(put.body, DOC);
        let stored = raw.get(Collection::Enrollments, "dev-1").await.unwrap().unwrap().body;
        assert!(!stored.contains("cHJpbWFyeS1zZWNyZXQ="), "{stored}");
        assert!(!stored.contains("c2Vjb25kYXJ5LXNlY3JldA=="), "{stored}");
        assert_eq!(stored.matches(PREFIX).count(), 2, "{stored}");
        // Only our fields: a twin property of the same name is left alone.
        assert!(stored.contains("not-a-secret-of-ours"));
        let got = s.get(Collection::Enrollments, "dev-1").await.unwrap().unwrap();
        assert_eq!(serde_json::from_str::<Value>(&got.body).unwrap(), serde_json::from_str::<Value>(DOC).unwrap());
        let listed = s.list(Collection::Enrollments, None, 10).await.unwrap();
        assert_eq!(listed[0].body, got.body);
        // Nothing of the key reaches the database file either (WAL included).
        raw.close().await;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(20).any(|w| w == b"cHJpbWFyeS1zZWNyZXQ="));
        }
    }

    #[tokio::test]
    async fn tpm_challenge_keys_are_sealed() {
        let (_dir, raw) = raw_store().await;
        let s = sealed(&raw, Some(K1), &[]);
        let doc = r#"{"challengeKey":"Y2hhbGxlbmdlLWtleQ==","storageRootKey":"AAEC","expires":1}"#;
        s.put(Collection::TpmChallenges, "tpm-1", doc, Precondition::Any).await.unwrap();
        let stored = raw.get(Collection::TpmChallenges, "tpm-1").await.unwrap().unwrap().body;
        assert!(!stored.contains("Y2hhbGxlbmdlLWtleQ==") && stored.contains("AAEC"), "{stored}");
        let got = s.get(Collection::TpmChallenges, "tpm-1").await.unwrap().unwrap().body;
        assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), serde_json::from_str::<Value>(doc).unwrap());
    }

    #[tokio::test]
    async fn collections_without_secrets_pass_through() {
        let (_dir, raw) = raw_store().await;
        let s = sealed(&raw, Some(K1), &[]);
        s.put(Collection::Certificates, "c", DOC, Precondition::Any).await.unwrap();
        assert_eq!(raw.get(Collection::Certificates, "c").await.unwrap().unwrap().body, DOC);
    }

    #[tokio::test]
    async fn webhook_urls_are_sealed_and_plain_ones_still_read() {
        let (_dir, raw) = raw_store().await;
        let s = sealed(&raw, Some(K1), &[]);
        let enrollment = r#"{"registrationId":"d","attestation":{"type":"symmetricKey"},"settings":{"enabled":true,"customAllocation":{"webhookUrl":"https://f.example.net/api/alloc?code=function-key-1","apiVersion":"2021-10-01"}}}"#;
        let hub = r#"{"hostName":"h.example.net","allocationWeight":1,"applyAllocationPolicy":true,"registrarWebhookUrl":"https://f.example.net/api/reg?code=function-key-2"}"#;
        for (c, id, doc, secret) in [
            (Collection::Enrollments, "d", enrollment, "function-key-1"),
            (Collection::EnrollmentGroups, "g", enrollment, "function-key-1"),
            (Collection::Hubs, "h.example.net", hub, "function-key-2"),
        ] {
            s.put(c, id, doc, Precondition::Any).await.unwrap();
            let stored = raw.get(c, id).await.unwrap().unwrap().body;
            assert!(!stored.contains(secret) && !stored.contains("f.example.net"), "{stored}");
            assert!(stored.contains("h.example.net") || c != Collection::Hubs, "only the URL is sealed: {stored}");
            for got in [s.get(c, id).await.unwrap().unwrap().body, s.list(c, None, 10).await.unwrap()[0].body.clone()] {
                assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), serde_json::from_str::<Value>(doc).unwrap());
            }
            // Stored in plain before encryption was switched on: still read, sealed by a reseal.
            raw.put(c, id, doc, Precondition::Any).await.unwrap();
            assert!(s.get(c, id).await.unwrap().unwrap().body.contains(secret));
        }
        assert_eq!(s.reseal_all().await.unwrap(), 3);
        for (c, id) in
            [(Collection::Enrollments, "d"), (Collection::EnrollmentGroups, "g"), (Collection::Hubs, "h.example.net")]
        {
            assert!(!raw.get(c, id).await.unwrap().unwrap().body.contains("function-key"), "{id} resealed");
        }
    }

    #[tokio::test]
    async fn plain_values_are_read_and_resealed() {
        let (_dir, raw) = raw_store().await;
        raw.put(
            Collection::Policies,
            "p",
            r#"{"keyName":"p","primaryKey":"a2V5","secondaryKey":"a2V5Mg=="}"#,
            Precondition::Any,
        )
        .await
        .unwrap();
        let s = sealed(&raw, Some(K1), &[]);
        assert!(s.get(Collection::Policies, "p").await.unwrap().unwrap().body.contains("a2V5"));
        assert_eq!(s.reseal_all().await.unwrap(), 1);
        let stored = raw.get(Collection::Policies, "p").await.unwrap().unwrap().body;
        assert!(!stored.contains("\"a2V5\""), "{stored}");
        assert_eq!(s.reseal_all().await.unwrap(), 0, "a second pass changes nothing");
    }

    #[tokio::test]
    async fn rotation_moves_every_value_to_the_new_key() {
        let (_dir, sqlite) = raw_store().await;
        rotate(&sqlite).await;
        if let Some(url) = crate::conformance::fresh_postgres_database().await {
            let pg: Arc<dyn Store> = Arc::new(crate::PostgresStore::connect(&url, 2).await.unwrap());
            rotate(&pg).await;
        }
    }

    async fn rotate(raw: &Arc<dyn Store>) {
        let raw = raw.clone();
        sealed(&raw, Some(K1), &[]).put(Collection::Enrollments, "dev-1", DOC, Precondition::Any).await.unwrap();
        let old_kid = Keyring::new(Some(K1), &[]).unwrap().current_kid().unwrap().to_owned();
        // New key without the old one: refused with a message that names the missing key.
        let err = sealed(&raw, Some(K2), &[]).get(Collection::Enrollments, "dev-1").await.unwrap_err();
        assert!(err.to_string().contains(&old_kid), "{err}");
        let s = sealed(&raw, Some(K2), &[K1]);
        assert_eq!(s.reseal_all().await.unwrap(), 1);
        // The old key is no longer needed.
        let got = sealed(&raw, Some(K2), &[]).get(Collection::Enrollments, "dev-1").await.unwrap().unwrap();
        assert!(got.body.contains("cHJpbWFyeS1zZWNyZXQ="));
        // And decryption can be switched off the same way.
        assert_eq!(sealed(&raw, None, &[K2]).reseal_all().await.unwrap(), 1);
        assert_eq!(
            serde_json::from_str::<Value>(&raw.get(Collection::Enrollments, "dev-1").await.unwrap().unwrap().body)
                .unwrap(),
            serde_json::from_str::<Value>(DOC).unwrap()
        );
    }

    #[tokio::test]
    async fn tampered_or_moved_values_are_refused() {
        let (_dir, raw) = raw_store().await;
        let s = sealed(&raw, Some(K1), &[]);
        s.put(Collection::Enrollments, "dev-1", DOC, Precondition::Any).await.unwrap();
        let stored = raw.get(Collection::Enrollments, "dev-1").await.unwrap().unwrap().body;
        // Copied verbatim into another document: the associated data no longer matches.
        raw.put(Collection::Enrollments, "dev-2", &stored, Precondition::Any).await.unwrap();
        let err = s.get(Collection::Enrollments, "dev-2").await.unwrap_err();
        assert!(err.to_string().contains("altered"), "{err}");
        // A flipped character.
        let v: Value = serde_json::from_str(&stored).unwrap();
        let sealed_key = v["attestation"]["primaryKey"].as_str().unwrap();
        let mut flipped = sealed_key.to_owned();
        let last = flipped.pop().unwrap();
        flipped.push(if last == 'A' { 'B' } else { 'A' });
        raw.put(Collection::Enrollments, "dev-1", &stored.replace(sealed_key, &flipped), Precondition::Any)
            .await
            .unwrap();
        assert!(s.get(Collection::Enrollments, "dev-1").await.is_err());
    }

    #[test]
    fn malformed_keys_are_refused_and_never_printed() {
        for bad in ["", "not base64!", "AAEC", &B64.encode([0u8; 31])] {
            if bad.is_empty() {
                assert!(Keyring::new(Some(bad), &[]).unwrap().is_empty());
                continue;
            }
            let e = Keyring::new(Some(bad), &[]).unwrap_err().to_string();
            assert!(e.contains("32"), "{e}");
        }
        let k = Keyring::new(Some(K1), &[K2.to_owned()]).unwrap();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(K1) && !dbg.contains(K2), "{dbg}");
    }
}
