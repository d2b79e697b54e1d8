//! TPM attestation: the challenge that delivers a key only the device's TPM can take in,
//! and the check of the SAS tokens the device then signs with it (`spec/device-api.md` §3).
//!
//! Over HTTPS the challenge is the answer to a register request without a credential
//! ([`Engine::tpm_challenge`], called by the device API). Over AMQP it is the SASL `TPM`
//! exchange, which cannot wait for the store: the front-end makes a [`TpmChallenge`] for the
//! keys the device sent (synchronously, [`TpmChallenge::new`]), sends its blob, and once
//! SASL is done hands it to [`Engine::keep_tpm_challenge`], which checks the enrollment and
//! keeps the key.

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use provisio_core::{
    ids::RegistrationId,
    model::{Attestation, TpmDetails},
    sas::SasToken,
    tpm,
};
use provisio_proto::device::DeviceRegistration;
use provisio_store::{Collection, Precondition};

use crate::{
    Engine, Error, StoreResult,
    device::{Origin, check_body_id},
    engine::{attempt, refused, unix_now_i64},
};

/// How long a TPM device may sign with the key of its challenge (seconds).
pub const TPM_CHALLENGE_SECS: i64 = 3600;

/// A challenge made for the keys a TPM device sent, not kept yet: the fresh HMAC key (which
/// never leaves the engine) and the blob that delivers it into that TPM.
#[derive(Clone)]
pub struct TpmChallenge {
    ek: Vec<u8>,
    srk: Vec<u8>,
    pub(crate) key: Vec<u8>,
    blob: Vec<u8>,
}

impl std::fmt::Debug for TpmChallenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never in a log.
        f.debug_struct("TpmChallenge").field("blob_len", &self.blob.len()).finish_non_exhaustive()
    }
}

impl TpmChallenge {
    /// A challenge for the TPM whose endorsement key and storage root key are `ek` and `srk`
    /// (marshalled `TPM2B_PUBLIC`s).
    ///
    /// # Errors
    /// `400` when the keys are not ones a challenge can be made for.
    pub fn new(ek: &[u8], srk: &[u8]) -> Result<Self, Error> {
        let (key, blob) = tpm::new_challenge(ek, srk).map_err(tpm_invalid)?;
        Ok(Self { ek: ek.to_vec(), srk: srk.to_vec(), key, blob })
    }

    /// The `authenticationKey` blob to send to the device.
    #[must_use]
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// For tests: whether a SAS token is signed with this challenge's key.
    #[doc(hidden)]
    #[must_use]
    pub fn signs(&self, token: &SasToken) -> bool {
        token.signed_with(&self.key)
    }
}

/// Unexpired challenges kept per device. Anyone who knows a device's EK (a public key) may
/// ask for a challenge; if each replaced the last, asking right after the device did would
/// void the device's (issue #24, finding 8). With this many kept and at most
/// [`CHALLENGES_PER_MINUTE`] issued per device, voiding one takes longer than a device takes
/// to use it.
pub(crate) const CHALLENGES_KEPT: usize = 4;

/// Challenges issued per registration id per minute; more get `429`.
pub(crate) const CHALLENGES_PER_MINUTE: usize = 3;

/// A TPM device's outstanding challenge, as stored.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredChallenge {
    /// The HMAC key sent to the TPM, base64 (sealed at rest when encryption is on).
    pub(crate) challenge_key: String,
    /// The SRK it was wrapped to (base64 `TPM2B_PUBLIC`), to wrap the result's key.
    pub(crate) storage_root_key: String,
    /// Unix seconds after which the key is refused.
    pub(crate) expires: i64,
}

/// A device's challenges as stored: the newest at the top level (the form of one challenge,
/// so that records written before keep working), the earlier unexpired ones as one string
/// (JSON of a list), a field the store seals like the key.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredChallenges {
    #[serde(flatten)]
    newest: StoredChallenge,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    earlier_challenges: String,
}

impl StoredChallenges {
    /// Every challenge, newest first.
    fn all(self) -> Result<Vec<StoredChallenge>, Error> {
        let mut out = vec![self.newest];
        if !self.earlier_challenges.is_empty() {
            let earlier: Vec<StoredChallenge> = serde_json::from_str(&self.earlier_challenges)
                .map_err(|e| Error::Internal(format!("stored TPM challenges are corrupt: {e}")))?;
            out.extend(earlier);
        }
        Ok(out)
    }
}

impl Engine {
    /// A TPM device's first `register`: no credential, its EK and SRK in the body's `tpm`.
    /// Checks the EK against the device's individual enrollment and answers with a fresh HMAC
    /// key that only that TPM can take in (base64 of [`tpm::authentication_key`]'s blob). The
    /// key is kept for [`TPM_CHALLENGE_SECS`] to check the SAS tokens the device signs with it;
    /// a new challenge joins the unexpired ones ([`CHALLENGES_KEPT`]), at most
    /// [`CHALLENGES_PER_MINUTE`] per device. Audited like a registration.
    ///
    /// # Errors
    /// Unknown scope (`404`); no enrollment, one that is not TPM or whose EK differs (`401`,
    /// the same answer for all three); keys this service cannot use (`400`); a store failure.
    pub(crate) async fn tpm_challenge(
        &self,
        origin: &Origin,
        scope: &str,
        registration_id: &str,
        request: Result<DeviceRegistration, Error>,
    ) -> Result<String, Error> {
        let result = match request {
            Ok(r) => self.tpm_challenge_inner(scope, registration_id, &r).await,
            Err(e) => Err(e),
        };
        self.audit_challenge(origin, registration_id, result).await
    }

    async fn tpm_challenge_inner(
        &self,
        scope: &str,
        registration_id: &str,
        request: &DeviceRegistration,
    ) -> Result<String, Error> {
        let (_permit, id) = self.admit_registration(scope, registration_id)?;
        check_body_id(id.as_str(), request)?;
        let (ek_sent, srk_sent) = tpm_keys_of(request)?;
        let srk = self.tpm_enrolled(&id, &ek_sent, srk_sent).await?;
        self.tpm_challenges.hit(id.key()).map_err(|wait| Error::Throttled(wait.as_secs().max(1)))?;
        let challenge = TpmChallenge::new(&ek_sent, &srk)?;
        self.store_tpm_challenge(&id, &challenge).await?;
        Ok(B64.encode(&challenge.blob))
    }

    /// The AMQP form of the TPM challenge (SASL mechanism `TPM`): the front-end has already
    /// sent `challenge`'s blob, because the SASL exchange cannot wait for the store; this
    /// checks the EK against the device's enrollment and keeps the key for the SAS tokens
    /// that follow. Audited like a registration.
    ///
    /// # Errors
    /// Unknown scope (`404`); no TPM enrollment with this EK (`401`); a store failure.
    pub async fn keep_tpm_challenge(
        &self,
        origin: &Origin,
        scope: &str,
        registration_id: &str,
        challenge: &TpmChallenge,
    ) -> Result<(), Error> {
        let result = async {
            let (_permit, id) = self.admit_registration(scope, registration_id)?;
            self.tpm_enrolled(&id, &challenge.ek, Some(challenge.srk.clone())).await?;
            self.tpm_challenges.hit(id.key()).map_err(|wait| Error::Throttled(wait.as_secs().max(1)))?;
            self.store_tpm_challenge(&id, challenge).await
        }
        .await;
        self.audit_challenge(origin, registration_id, result).await
    }

    /// Checks that the device has a TPM enrollment whose EK is `ek_sent`; returns the SRK to
    /// wrap to (the one sent, else the enrolled one). Whether the keys are usable is
    /// [`TpmChallenge::new`]'s to say (over AMQP it already has, during SASL).
    async fn tpm_enrolled(
        &self,
        id: &RegistrationId,
        ek_sent: &[u8],
        srk_sent: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, Error> {
        // One answer for an unknown device, another attestation and another EK: no oracle
        // for which registration ids are enrolled (DPS answers 404201 to the first).
        let refused = |detail: String| Error::Unauthorized {
            public: "Unauthorized: no TPM enrollment of this registration id has this endorsement key.".into(),
            detail,
            tracking_id: None,
        };
        let enrollment = self
            .individual(id, None)
            .await?
            .ok_or_else(|| refused(format!("registration '{id}' sent a TPM endorsement key and has no enrollment")))?;
        let Attestation::Tpm { endorsement_key, storage_root_key } = &enrollment.attestation else {
            return Err(refused(format!(
                "registration '{id}' sent a TPM endorsement key; its enrollment uses {}",
                enrollment.attestation.kind()
            )));
        };
        let enrolled = B64.decode(endorsement_key.trim()).unwrap_or_default();
        if aws_lc_rs::constant_time::verify_slices_are_equal(&enrolled, ek_sent).is_err() {
            return Err(refused(format!("registration '{id}' sent an endorsement key other than its enrollment's")));
        }
        let srk = match (srk_sent, storage_root_key) {
            (Some(s), _) => s,
            (None, Some(s)) => B64.decode(s.trim()).map_err(|_| {
                Error::Internal(format!("the stored storageRootKey of enrollment '{id}' is not base64"))
            })?,
            (None, None) => {
                return Err(Error::invalid(
                    "tpm.storageRootKey is required: the key is delivered wrapped to the device's storage root key.",
                ));
            }
        };
        Ok(srk)
    }

    /// Keeps the challenge's key as the device's newest, with the unexpired earlier ones (at
    /// most [`CHALLENGES_KEPT`] in all). Two challenges of one device at the same moment on
    /// two nodes may keep only one of them: the device whose key was dropped is refused and
    /// asks again.
    pub(crate) async fn store_tpm_challenge(&self, id: &RegistrationId, challenge: &TpmChallenge) -> Result<(), Error> {
        let now = unix_now_i64();
        let newest = StoredChallenge {
            challenge_key: B64.encode(&challenge.key),
            storage_root_key: B64.encode(&challenge.srk),
            expires: now.saturating_add(TPM_CHALLENGE_SECS),
        };
        let mut earlier: Vec<StoredChallenge> =
            self.stored_tpm_challenges(id).await?.into_iter().filter(|c| c.expires >= now).collect();
        let dropped = earlier.len() >= CHALLENGES_KEPT;
        earlier.truncate(CHALLENGES_KEPT - 1);
        let earlier_challenges = if earlier.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&earlier).map_err(|e| Error::Internal(e.to_string()))?
        };
        let body = serde_json::to_string(&StoredChallenges { newest, earlier_challenges })
            .map_err(|e| Error::Internal(e.to_string()))?;
        self.store.put(Collection::TpmChallenges, id.key(), &body, Precondition::Any).await.or_internal()?;
        if dropped {
            // A token proven with the dropped key no longer counts; other devices' do.
            self.auth_cache.forget(id.key());
        }
        Ok(())
    }

    /// Records a TPM challenge (or its refusal) in the audit log.
    async fn audit_challenge<T>(
        &self,
        origin: &Origin,
        registration_id: &str,
        result: Result<T, Error>,
    ) -> Result<T, Error> {
        let mut entry = attempt(origin, registration_id, "tpm");
        let result = match result {
            Ok(v) => {
                entry.status = 401;
                entry.result = "challenged".into();
                Ok(v)
            }
            Err(e) => Err(refused(&mut entry, e)),
        };
        self.audit.record_attempt(&entry).await;
        result
    }

    /// The unexpired challenge of a TPM device whose key signed its SAS `token`, or `401`.
    pub(crate) async fn tpm_challenge_key(
        &self,
        id: &RegistrationId,
        token: &SasToken,
    ) -> Result<StoredChallenge, Error> {
        // The public answer is the one an unknown id or a wrong key gets: a SAS probe must not
        // learn that an id is TPM-enrolled (issue #24, finding 7). The detail is logged.
        let refused = |detail: String| Error::unauthorized(detail);
        let all = self.stored_tpm_challenges(id).await?;
        if all.is_empty() {
            return Err(refused(format!("TPM registration '{id}' has no outstanding challenge")));
        }
        let now = unix_now_i64();
        let mut expired = 0;
        for c in all {
            if c.expires < now {
                expired += 1;
                continue;
            }
            let key = B64
                .decode(&c.challenge_key)
                .map_err(|_| Error::Internal("a stored TPM challenge key is not base64".into()))?;
            if token.signed_with(&key) {
                return Ok(c);
            }
        }
        Err(refused(if expired > 0 {
            format!("the SAS token of '{id}' is not signed with an unexpired TPM challenge key ({expired} expired)")
        } else {
            format!("the SAS token of '{id}' is not signed with its TPM challenge key")
        }))
    }

    /// The challenge whose key signed the SAS token of a TPM device that attested with it
    /// moments ago (its key goes into the result).
    pub(crate) async fn tpm_challenge_of(
        &self,
        id: &RegistrationId,
        credential: &crate::Credential,
    ) -> Result<StoredChallenge, Error> {
        let crate::Credential::Sas(raw) = credential else {
            return Err(Error::unauthorized(format!("TPM registration '{id}' presented no SAS token")));
        };
        self.tpm_challenge_key(id, &SasToken::parse(raw)?).await
    }

    /// A device's stored challenges, newest first (none: empty).
    pub(crate) async fn stored_tpm_challenges(&self, id: &RegistrationId) -> Result<Vec<StoredChallenge>, Error> {
        let Some(doc) = self.store.get(Collection::TpmChallenges, id.key()).await.or_internal()? else {
            return Ok(Vec::new());
        };
        serde_json::from_str::<StoredChallenges>(&doc.body)
            .map_err(|e| Error::Internal(format!("stored TPM challenge is corrupt: {e}")))?
            .all()
    }
}

/// The EK (required) and SRK (optional) of a body's `tpm` block, decoded from base64.
fn tpm_keys_of(request: &DeviceRegistration) -> Result<(Vec<u8>, Option<Vec<u8>>), Error> {
    let tpm = request.tpm.as_ref().ok_or_else(|| Error::invalid("The body has no tpm block."))?;
    let decode = |name: &str, v: &str| {
        B64.decode(v.trim()).map_err(|_| Error::invalid(format!("tpm.{name} is not base64 of a TPM2B_PUBLIC.")))
    };
    let ek = decode("endorsementKey", &tpm.endorsement_key)?;
    let srk = tpm.storage_root_key.as_deref().filter(|s| !s.trim().is_empty()).map(|s| decode("storageRootKey", s));
    Ok((ek, srk.transpose()?))
}

/// The result's `tpm.authenticationKey`: the key the device proved, wrapped afresh for its
/// TPM (the SDKs import it for the hub).
pub(crate) fn tpm_result(id: &RegistrationId, endorsement_key: &str, c: &StoredChallenge) -> Result<TpmDetails, Error> {
    let decode =
        |b: &str| B64.decode(b.trim()).map_err(|_| Error::Internal(format!("stored TPM key of '{id}' is not base64")));
    let ek = tpm::StorageKey::parse(&decode(endorsement_key)?, "endorsementKey").map_err(tpm_invalid)?;
    let srk = tpm::StorageKey::parse(&decode(&c.storage_root_key)?, "storageRootKey").map_err(tpm_invalid)?;
    let blob =
        tpm::authentication_key(&ek, &srk, &decode(&c.challenge_key)?).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(TpmDetails { authentication_key: B64.encode(blob) })
}

fn tpm_invalid(e: tpm::TpmError) -> Error {
    Error::invalid(e.to_string())
}
