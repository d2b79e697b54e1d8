//! The registration engine: the one implementation of DPS device semantics that every
//! front-end calls through [`Engine::device`](crate::device).
//!
//! `register` attests the device, finds its enrollment, allocates a hub and persists the
//! registration record together with the operation in one transaction, then answers
//! `assigning` with the operation id. Polls (`operation_status`) read that operation
//! back, so any node sharing the store can answer them.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use provisio_core::{
    attest::{self, Matched},
    ids::RegistrationId,
    model::{
        Attestation, EnrollmentGroup, EnrollmentSource, Outcome, RegistrationRecord, X509Attestation, X509Details,
    },
    sas::SasToken,
    text::shorten,
    timefmt,
};
use provisio_pki::attest::{Anchor, X509Match};
use provisio_proto::{
    device::{DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus},
    error::codes,
};
use provisio_store::{Collection, Precondition, Store};

use crate::{
    Error, StoreResult,
    certificates::Certificates,
    device::{Credential, Origin, check_body_id},
    wire,
};

/// What attestation established.
struct Attested {
    matched: Matched,
    x509: Option<X509Details>,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// SAS expiry tolerance, seconds.
    pub sas_clock_skew_secs: u64,
    /// Whether a group's signing certificate must be, or be signed by, a verified CA.
    pub signing_certificates_need_verified_ca: bool,
    /// How long enrollment groups and hubs are cached.
    pub cache_ttl: std::time::Duration,
    /// Registrations per second of this node (0: no limit).
    pub registrations_per_second: u32,
    /// Polls per device per 10 s (DPS: 5; 0: no limit).
    pub device_polls_per_10s: usize,
    /// Device operations in progress at once (0: no limit).
    pub max_concurrent_operations: usize,
    /// How long a proven credential spares a device's polls a second attestation.
    pub poll_auth_cache: std::time::Duration,
    /// Refusal records kept in the store (the most recent; 0: none are written).
    pub refusal_records_kept: u32,
    /// Seconds a device is told to wait before polling an `assigning` operation.
    pub retry_after_secs: u32,
    /// Refused X.509 attempts per client address (IPv6: per /64) per minute before its
    /// next ones are told to wait (`429`) without a validation (0: no limit).
    pub x509_refusals_per_ip_per_minute: usize,
}

impl Default for EngineSettings {
    /// The defaults of `provisio serve`.
    fn default() -> Self {
        Self {
            sas_clock_skew_secs: 30,
            signing_certificates_need_verified_ca: false,
            cache_ttl: std::time::Duration::from_secs(1),
            registrations_per_second: 0,
            device_polls_per_10s: 5,
            max_concurrent_operations: 1024,
            poll_auth_cache: std::time::Duration::from_secs(30),
            refusal_records_kept: 10_000,
            retry_after_secs: 2,
            x509_refusals_per_ip_per_minute: 30,
        }
    }
}

/// Keeps the store's refusal records ([`Collection::Audit`]) to
/// [`EngineSettings::refusal_records_kept`]: each is keyed by the registration id a client
/// chose (a certificate's CN), so every refused attempt could otherwise add one.
#[derive(Default)]
struct RefusalRecords {
    /// Records this engine has written.
    written: std::sync::atomic::AtomicU64,
    /// A trim is running.
    trimming: std::sync::atomic::AtomicBool,
}

/// The registration engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    certificates: Certificates,
    assigner: crate::allocation::Assigner,
    group_cache: Arc<crate::cache::TtlCache<Vec<EnrollmentGroup>>>,
    registrations: Arc<crate::limits::RateLimiter>,
    polls: Arc<crate::limits::KeyedWindow>,
    scope: provisio_core::ids::IdScope,
    settings: Arc<EngineSettings>,
    pub(crate) audit: crate::audit::AuditLog,
    /// Permits for operations in progress (`None`: unlimited).
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
    /// Credentials proven recently, for polls.
    pub(crate) auth_cache: Arc<crate::cache::AuthCache>,
    /// Operations written moments ago, for polls.
    recent_operations: Arc<crate::cache::RecentOperations>,
    /// Chains validated before, for X.509 devices registering again.
    x509_cache: Arc<provisio_pki::cache::X509Cache>,
    /// Chain validations running at once (one per core).
    x509_verifications: Arc<tokio::sync::Semaphore>,
    /// Refused X.509 attempts per client address (IPv6: per /64).
    x509_refusals: Arc<crate::limits::KeyedWindow>,
    /// TPM challenges issued per registration id.
    pub(crate) tpm_challenges: Arc<crate::limits::KeyedWindow>,
    refusals: Arc<RefusalRecords>,
    /// Registrations per minute, for the console's chart.
    stats: Arc<crate::stats::Stats>,
    /// Operational certificates issued at registration.
    issuance: crate::issuance::Issuance,
}

/// How long a device waits for a turn to have its chain validated before it is told to come
/// back: validations are CPU-bound and capped at one per core.
const VERIFICATION_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Certificates whose last refusal a registration id's refusal record keeps.
const REFUSALS_PER_ID: usize = 5;

/// The refusals in a stored refusal record, newest first (a record written before records
/// kept several is its own only entry).
fn refusal_entries(body: &str) -> Vec<serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut o)) => match o.remove("refusals") {
            Some(serde_json::Value::Array(list)) => list,
            _ => vec![serde_json::Value::Object(o)],
        },
        _ => Vec::new(),
    }
}

/// Largest number of symmetric-key groups tried for one device (DPS caps groups at 100).
const MAX_GROUPS: u32 = 1000;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn unix_now_i64() -> i64 {
    i64::try_from(unix_now()).unwrap_or(i64::MAX)
}

impl Engine {
    /// An engine for the instance with this scope.
    #[must_use]
    pub fn new(
        store: Arc<dyn Store>,
        scope: provisio_core::ids::IdScope,
        settings: EngineSettings,
        assigner: crate::allocation::Assigner,
    ) -> Self {
        let group_cache = Arc::new(crate::cache::TtlCache::new(settings.cache_ttl));
        let settings_ops = settings.max_concurrent_operations;
        let poll_auth_cache = settings.poll_auth_cache;
        let x509_refusals_per_minute = settings.x509_refusals_per_ip_per_minute;
        let issuance = crate::issuance::Issuance::new(store.clone(), scope.as_str(), None);
        let registrations = Arc::new(crate::limits::RateLimiter::new(settings.registrations_per_second));
        let polls = Arc::new(crate::limits::KeyedWindow::new(
            settings.device_polls_per_10s,
            std::time::Duration::from_secs(10),
        ));
        Self {
            certificates: Certificates::new(store.clone()),
            store,
            assigner,
            group_cache,
            registrations,
            polls,
            scope,
            settings: Arc::new(settings),
            audit: crate::audit::AuditLog::disabled(),
            in_flight: (settings_ops > 0).then(|| Arc::new(tokio::sync::Semaphore::new(settings_ops))),
            auth_cache: Arc::new(crate::cache::AuthCache::new(poll_auth_cache, 100_000)),
            // A minute covers the first polls of any stock client; 20,000 snapshots of about
            // 1 KB bound the memory.
            recent_operations: Arc::new(crate::cache::RecentOperations::new(
                std::time::Duration::from_secs(60),
                20_000,
            )),
            // 10,000 devices' chains and certificate descriptions: a few MB.
            x509_cache: Arc::new(provisio_pki::cache::X509Cache::new(10_000)),
            x509_verifications: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            )),
            x509_refusals: Arc::new(crate::limits::KeyedWindow::new(
                x509_refusals_per_minute,
                std::time::Duration::from_secs(60),
            )),
            tpm_challenges: Arc::new(crate::limits::KeyedWindow::new(
                crate::tpm::CHALLENGES_PER_MINUTE,
                std::time::Duration::from_secs(60),
            )),
            refusals: Arc::default(),
            stats: crate::stats::Stats::new(),
            issuance,
        }
    }

    /// Stores the record of a refused X.509 attestation for `GET /registrations/{id}/audit`,
    /// and trims the stored ones back to the limit after every tenth of it (at most every
    /// thousand), one trim at a time, in the background.
    ///
    /// A registration id's record keeps the newest refusal of each of its last
    /// [`REFUSALS_PER_ID`] certificates (by SHA-256 thumbprint), newest first: a refusal
    /// replaces only the entry of its own certificate, whose private key the client proved
    /// in the TLS handshake, so no one can rewrite what another certificate's attempt left.
    /// A flood of new certificates pushes older entries out, but a device that retries puts
    /// its own back.
    async fn record_refusal(&self, id: &RegistrationId, record: serde_json::Value) {
        use std::sync::atomic::Ordering;
        let keep = self.settings.refusal_records_kept;
        if keep == 0 {
            return;
        }
        let thumbprint = record["certificateInfo"]["sha256Thumbprint"].as_str().unwrap_or_default().to_owned();
        // Two nodes may refuse the same id at once: the write is conditional, and retried.
        let mut written = false;
        for _ in 0..3 {
            let doc = match self.store.get(Collection::Audit, id.key()).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the refusal record");
                    return;
                }
            };
            let mut entries = doc.as_ref().map(|d| refusal_entries(&d.body)).unwrap_or_default();
            entries.retain(|r| {
                !r["certificateInfo"]["sha256Thumbprint"].as_str().is_some_and(|t| t.eq_ignore_ascii_case(&thumbprint))
            });
            entries.insert(0, record.clone());
            entries.truncate(REFUSALS_PER_ID);
            let mut body = record.clone();
            body["refusals"] = serde_json::Value::Array(entries);
            let condition = doc.map_or(Precondition::CreateOnly, |d| Precondition::IfMatch(d.etag));
            match self.store.put(Collection::Audit, id.key(), &body.to_string(), condition).await {
                Ok(_) => {
                    written = true;
                    break;
                }
                Err(provisio_store::StoreError::Conflict | provisio_store::StoreError::PreconditionFailed) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not write the refusal record");
                    return;
                }
            }
        }
        if !written {
            tracing::warn!(registration_id = %id, "the refusal record changed under every write; this one is in the audit log only");
            return;
        }
        let every = u64::from((keep / 10).clamp(1, 1000));
        let written = self.refusals.written.fetch_add(1, Ordering::Relaxed) + 1;
        if !written.is_multiple_of(every) || self.refusals.trimming.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, refusals) = (self.store.clone(), self.refusals.clone());
        tokio::spawn(async move {
            match store.trim(Collection::Audit, keep).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(trimmed = n, kept = keep, "older refusal records removed"),
                Err(e) => tracing::warn!(error = %e, "could not trim the refusal records"),
            }
            refusals.trimming.store(false, Ordering::Release);
        });
    }

    /// A permit to work on one device operation, or 429 when the node is at its limit: a
    /// device told to come back beats a queue that grows until every request times out.
    fn admit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Error> {
        match &self.in_flight {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| Error::Throttled(1)),
        }
    }

    /// Points the CRL distribution points of issued certificates at `url`
    /// (`https://host[:port]`, the service as devices and brokers reach it).
    #[must_use]
    pub fn with_public_url(mut self, url: Option<String>) -> Self {
        self.issuance = crate::issuance::Issuance::new(self.store.clone(), self.scope.as_str(), url);
        self
    }

    /// Issuing CAs, certificate policies and issued certificates.
    #[must_use]
    pub fn issuance(&self) -> &crate::issuance::Issuance {
        &self.issuance
    }

    /// Records every registration attempt in `audit`.
    #[must_use]
    pub fn with_audit(mut self, audit: crate::audit::AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// Every enrollment group, parsed; cached for a moment because every group device's
    /// registration and poll needs them.
    async fn groups(&self) -> Result<Arc<Vec<EnrollmentGroup>>, Error> {
        let store = self.store.clone();
        self.group_cache
            .get_or_load(|| async move {
                store
                    .list(Collection::EnrollmentGroups, None, MAX_GROUPS)
                    .await
                    .or_internal()?
                    .iter()
                    .map(wire::group_from_doc)
                    .collect::<Result<Vec<_>, Error>>()
            })
            .await
    }

    /// Attests a read-only request (poll, status query), unless this exact credential was
    /// proven for this device moments ago.
    async fn attest_for_read(
        &self,
        id: &RegistrationId,
        credential: &Credential,
        peer: Option<IpAddr>,
    ) -> Result<(), Error> {
        if !credential.fingerprint(id.key()).is_some_and(|f| self.auth_cache.recalls(&f)) {
            self.attest(id, credential, None, peer).await?;
            self.remember(id, credential);
        }
        Ok(())
    }

    fn remember(&self, id: &RegistrationId, credential: &Credential) {
        let expires = match credential {
            Credential::Sas(raw) => SasToken::parse(raw).ok().map(|t| {
                let left = t.expiry.saturating_sub(unix_now());
                std::time::Instant::now() + std::time::Duration::from_secs(left)
            }),
            _ => None,
        };
        if let Some(f) = credential.fingerprint(id.key()) {
            self.auth_cache.remember(f, expires);
            self.auth_cache.index(id.key(), f);
        }
    }

    /// The service API of this instance, sharing the engine's caches so that its writes
    /// take effect on the next registration: a group write drops the cached groups, any
    /// enrollment write the credentials proven for polls.
    #[must_use]
    pub fn service_api(
        &self,
        hostnames: Vec<String>,
        limits: crate::service::ServiceLimits,
    ) -> crate::service::ServiceApi {
        crate::service::ServiceApi::new(self.store.clone(), hostnames, self.settings.sas_clock_skew_secs)
            .with_limits(limits)
            .with_webhook_addresses(self.assigner.addresses().clone())
            .with_group_cache(self.group_cache.clone())
            .with_auth_cache(self.auth_cache.clone())
            .with_issuance(self.issuance.clone())
    }

    /// The store this engine works on.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The audit log registration attempts go to.
    #[must_use]
    pub fn audit(&self) -> &crate::audit::AuditLog {
        &self.audit
    }

    /// Registrations per minute over the last `minutes` minutes (oldest first, the current
    /// one last), by result, over every node sharing the store.
    ///
    /// # Errors
    /// Store failures.
    pub async fn registrations_per_minute(
        &self,
        minutes: i64,
    ) -> Result<Vec<(i64, crate::stats::MinuteCounts)>, Error> {
        self.stats.last(self.store.as_ref(), minutes).await
    }

    /// Writes this node's registration counts to the store (about once a minute), and removes
    /// counts older than two hours.
    ///
    /// # Errors
    /// Store failures.
    pub async fn flush_stats(&self) -> Result<(), Error> {
        self.stats.flush(self.store.as_ref()).await
    }

    /// Seconds a device is told to wait before its next poll.
    pub(crate) fn retry_after_secs(&self) -> u32 {
        self.settings.retry_after_secs
    }

    /// The instance's ID scope.
    #[must_use]
    pub fn scope(&self) -> &str {
        self.scope.as_str()
    }

    fn check_scope(&self, scope: &str) -> Result<(), Error> {
        if self.scope.matches(scope) {
            Ok(())
        } else {
            Err(Error::NotFound {
                code: codes::NOT_FOUND,
                message: format!("No provisioning service has the ID scope '{}'.", shorten(scope)),
            })
        }
    }

    /// Authenticates a device and returns the enrollment its credential proves.
    /// `enrollment` is the device's individual enrollment when the caller already read it
    /// (`Some(None)`: it has none); otherwise it is read here.
    async fn attest(
        &self,
        id: &RegistrationId,
        credential: &Credential,
        enrollment: Option<Option<provisio_store::Document>>,
        peer: Option<IpAddr>,
    ) -> Result<Attested, Error> {
        match credential {
            Credential::X509(chain) => self.attest_x509(id, chain, enrollment, peer).await,
            other => Ok(Attested { matched: self.attest_sas(id, other, enrollment).await?, x509: None }),
        }
    }

    pub(crate) async fn individual(
        &self,
        id: &RegistrationId,
        prefetched: Option<Option<provisio_store::Document>>,
    ) -> Result<Option<provisio_core::model::Enrollment>, Error> {
        let doc = match prefetched {
            Some(d) => d,
            None => self.store.get(Collection::Enrollments, id.key()).await.or_internal()?,
        };
        doc.as_ref().map(wire::enrollment_from_doc).transpose()
    }

    /// X.509: the chain from TLS against the individual enrollment, then the groups.
    ///
    /// Path building costs CPU a client chooses (issue #24, finding 1), so: an address with
    /// too many refused chains lately is told to wait before anything is validated; the
    /// validation runs on the blocking pool, at most one per core at a time, never on the
    /// async workers that serve every other connection; and refused chains are remembered
    /// ([`provisio_pki::cache::REFUSAL_MEMORY`]).
    async fn attest_x509(
        &self,
        id: &RegistrationId,
        chain: &[Vec<u8>],
        prefetched: Option<Option<provisio_store::Document>>,
        peer: Option<IpAddr>,
    ) -> Result<Attested, Error> {
        let address = peer.map(crate::limits::address_key);
        if let Some(a) = &address {
            self.x509_refusals.check(a).map_err(|wait| Error::Throttled(wait.as_secs().max(1)))?;
        }
        let individual = self.individual(id, prefetched).await?;
        let mut groups = Vec::new();
        let verified = if individual.is_none() && self.settings.signing_certificates_need_verified_ca {
            self.certificates.verified_ders().await?
        } else {
            Vec::new()
        };
        if individual.is_none() {
            for g in self.groups().await?.iter() {
                let g = g.clone();
                let anchors = match &g.attestation {
                    Attestation::X509(X509Attestation::SigningCertificates(p)) => {
                        let mut v = Vec::new();
                        for (label, c) in [
                            ("signingCertificates.primary", &p.primary),
                            ("signingCertificates.secondary", &p.secondary),
                        ] {
                            if let Some(c) = c {
                                let der = B64.decode(&c.der_base64).map_err(|e| Error::Internal(e.to_string()))?;
                                let usable = if !self.settings.signing_certificates_need_verified_ca
                                    || provisio_pki::x509::is_or_signed_by_any(&der, &verified)
                                {
                                    Ok(())
                                } else {
                                    Err("it is neither a verified CA certificate nor signed by one \
                                         (x509_signing_certificates_need_verified_ca is on)"
                                        .to_owned())
                                };
                                v.push(Anchor {
                                    label: format!("{label} '{}'", c.info.subject_name),
                                    der: Some(der),
                                    usable,
                                });
                            }
                        }
                        v
                    }
                    Attestation::X509(X509Attestation::CaReferences(p)) => {
                        let mut v = Vec::new();
                        for name in p.iter() {
                            let label = format!("CA certificate '{name}'");
                            v.push(match self.certificates.find(name).await? {
                                None => Anchor { label, der: None, usable: Err("it does not exist".into()) },
                                Some(ca) => Anchor {
                                    label,
                                    der: Some(ca.der()?),
                                    usable: if ca.is_verified {
                                        Ok(())
                                    } else {
                                        Err("it is not verified (proof of possession has not been completed)".into())
                                    },
                                },
                            });
                        }
                        v
                    }
                    _ => continue,
                };
                groups.push((g, anchors));
            }
        }
        let verdict = self.verify_off_the_workers(id, chain, individual, groups).await?;
        if verdict.is_err()
            && let Some(a) = &address
        {
            // Over the limit already counts as refused; the next attempt waits.
            let _ = self.x509_refusals.hit(a);
        }
        match verdict {
            Ok(X509Match::Individual { enrollment, certificate }) => Ok(Attested {
                matched: Matched::Individual(*enrollment),
                x509: Some(X509Details { certificate_info: certificate, signing_certificate_info: None }),
            }),
            Ok(X509Match::Group { group, certificate, signing_certificate }) => Ok(Attested {
                matched: Matched::Group(*group),
                x509: Some(X509Details {
                    certificate_info: certificate,
                    signing_certificate_info: Some(signing_certificate),
                }),
            }),
            Err(refusal) => {
                let tracking_id = uuid::Uuid::new_v4().to_string();
                // Recorded under the id only when the certificate is about it (its CN is the
                // id): anyone can present a certificate and name any id in the request.
                let cn = chain.first().and_then(|leaf| self.x509_cache.describe(leaf).ok()).and_then(|(_, cn)| cn);
                if let Some(info) = refusal.certificate.as_ref()
                    && cn.is_some_and(|cn| cn.eq_ignore_ascii_case(id.as_str()))
                {
                    let audit = serde_json::json!({
                        "registrationId": id.as_str(),
                        "timestampUtc": timefmt::now(),
                        "trackingId": tracking_id,
                        "attestation": "x509",
                        "reason": refusal.detail,
                        "certificateInfo": wire::cert_info_to_wire(info),
                    });
                    self.record_refusal(id, audit).await;
                }
                Err(Error::Unauthorized {
                    public: refusal.public,
                    detail: refusal.detail,
                    tracking_id: Some(tracking_id),
                })
            }
        }
    }

    /// Runs [`provisio_pki::attest::attest`] on the blocking pool, at most
    /// `x509_verifications` at a time; a device that cannot get a turn within
    /// [`VERIFICATION_QUEUE_WAIT`] is told to come back (`429`).
    async fn verify_off_the_workers(
        &self,
        id: &RegistrationId,
        chain: &[Vec<u8>],
        individual: Option<provisio_core::model::Enrollment>,
        groups: Vec<(EnrollmentGroup, Vec<Anchor>)>,
    ) -> Result<Result<X509Match, Box<provisio_pki::attest::Refusal>>, Error> {
        let turn = tokio::time::timeout(VERIFICATION_QUEUE_WAIT, self.x509_verifications.clone().acquire_owned())
            .await
            .map_err(|_| Error::Throttled(1))?
            .map_err(|e| Error::Internal(format!("verification slots closed: {e}")))?;
        let (id, chain, cache) = (id.as_str().to_owned(), chain.to_vec(), self.x509_cache.clone());
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            provisio_pki::attest::attest(&id, &chain, individual, groups, time::OffsetDateTime::now_utc(), &cache)
        })
        .await
        .map_err(|e| Error::Internal(format!("chain validation did not finish: {e}")))
    }

    /// Symmetric key: the SAS token against the individual enrollment, then the groups.
    async fn attest_sas(
        &self,
        id: &RegistrationId,
        credential: &Credential,
        prefetched: Option<Option<provisio_store::Document>>,
    ) -> Result<Matched, Error> {
        let Credential::Sas(raw) = credential else {
            return Err(Error::Unauthorized {
                public: "Unauthorized: no SAS token (Authorization header) was presented.".into(),
                detail: format!("registration '{id}' presented no credential"),
                tracking_id: None,
            });
        };
        let token = SasToken::parse(raw)?;
        attest::check_device_token(
            &token,
            self.scope.as_str(),
            id.as_str(),
            unix_now(),
            self.settings.sas_clock_skew_secs,
        )?;
        let individual = self.individual(id, prefetched).await?;
        if let Some(e) = individual.as_ref().filter(|e| matches!(e.attestation, Attestation::Tpm { .. })) {
            self.tpm_challenge_key(id, &token).await?;
            return Ok(Matched::Individual(e.clone()));
        }
        let groups = if individual.is_some() {
            Vec::new()
        } else {
            self.groups()
                .await?
                .iter()
                .filter(|g| matches!(g.attestation, Attestation::SymmetricKey { .. }))
                .cloned()
                .collect::<Vec<_>>()
        };
        Ok(attest::symmetric_key(&token, id.as_str(), individual, groups)?)
    }

    fn parse_id(registration_id: &str) -> Result<RegistrationId, Error> {
        Ok(RegistrationId::parse(registration_id)?)
    }

    /// The checks a registration (or a TPM challenge) passes first: the node's limit (the
    /// permit is held until the caller is done), the scope, the instance's registration rate
    /// (DPS-style throttling), a valid id.
    pub(crate) fn admit_registration(
        &self,
        scope: &str,
        registration_id: &str,
    ) -> Result<(Option<tokio::sync::OwnedSemaphorePermit>, RegistrationId), Error> {
        let permit = self.admit()?;
        self.check_scope(scope)?;
        self.registrations.acquire().map_err(|wait| Error::Throttled(wait.as_secs().max(1)))?;
        Ok((permit, Self::parse_id(registration_id)?))
    }

    /// `PUT {scope}/registrations/{id}/register` from inside the process: returns the
    /// operation id.
    #[cfg(test)]
    pub(crate) async fn register(
        &self,
        scope: &str,
        registration_id: &str,
        request: DeviceRegistration,
        credential: &Credential,
    ) -> Result<String, Error> {
        let origin = Origin::new(crate::device::Transport::Internal, None);
        self.register_from(&origin, scope, registration_id, Ok(request), credential).await
    }

    /// Records a registration attempt refused before it reached the engine's checks, and
    /// returns the error with the tracking id its audit line carries.
    pub(crate) async fn refuse_registration(
        &self,
        origin: &Origin,
        registration_id: &str,
        credential: &Credential,
        e: Error,
    ) -> Error {
        let mut entry = attempt(origin, registration_id, credential.kind());
        self.stats.record(crate::stats::Result::Refused);
        let e = refused(&mut entry, e);
        self.audit.record_attempt(&entry).await;
        e
    }

    /// A registration attempt from `origin`, audited whatever its result. `request` is the
    /// parsed body, or why it could not be parsed (still an attempt to record). Errors come
    /// back with the tracking id the audit line carries.
    ///
    /// # Errors
    /// Unknown scope, invalid id, refused credential, a store failure, or `request`'s error.
    pub(crate) async fn register_from(
        &self,
        origin: &Origin,
        scope: &str,
        registration_id: &str,
        request: Result<DeviceRegistration, Error>,
        credential: &Credential,
    ) -> Result<String, Error> {
        let result = match request {
            Ok(r) => self.register_inner(scope, registration_id, r, credential, origin.peer).await,
            Err(e) => Err(e),
        };
        let mut entry = attempt(origin, registration_id, credential.kind());
        self.stats.record(match &result {
            Ok((_, r, _)) if matches!(r.outcome, Outcome::Assigned { .. }) => crate::stats::Result::Assigned,
            Ok(_) => crate::stats::Result::Failed,
            Err(_) => crate::stats::Result::Refused,
        });
        let result = match result {
            Ok((operation_id, record, detail)) => {
                entry.status = 202;
                entry.operation_id = Some(operation_id.clone());
                if let EnrollmentSource::Group { enrollment_group_id } = &record.source {
                    entry.enrollment_group_id = Some(enrollment_group_id.clone());
                }
                entry.certificate_serial = record.issued.as_ref().map(|i| i.serial.clone());
                match record.outcome {
                    Outcome::Assigned { assigned_hub, device_id, .. } => {
                        entry.result = "assigned".into();
                        entry.assigned_hub = Some(assigned_hub);
                        entry.device_id = Some(device_id);
                    }
                    Outcome::Failed { error_code, error_message } => {
                        entry.result = "failed".into();
                        entry.error_code = Some(error_code);
                        // What the device read, and what it was not told.
                        entry.reason = Some(match detail {
                            Some(d) => format!("{error_message} ({d})"),
                            None => error_message,
                        });
                    }
                    Outcome::Disabled => {
                        entry.result = "disabled".into();
                        entry.reason = Some("the enrollment is disabled".into());
                    }
                }
                Ok(operation_id)
            }
            Err(e) => Err(refused(&mut entry, e)),
        };
        self.audit.record_attempt(&entry).await;
        result
    }

    async fn register_inner(
        &self,
        scope: &str,
        registration_id: &str,
        request: DeviceRegistration,
        credential: &Credential,
        peer: Option<IpAddr>,
    ) -> Result<(String, RegistrationRecord, Option<String>), Error> {
        let (_permit, id) = self.admit_registration(scope, registration_id)?;
        check_body_id(id.as_str(), &request)?;
        // The enrollment and the previous record in one round trip.
        let (enrollment, previous) =
            self.store.get_both(Collection::Enrollments, Collection::Registrations, id.key()).await.or_internal()?;
        let Attested { matched, x509 } = self.attest(&id, credential, Some(enrollment), peer).await?;
        self.remember(&id, credential);
        let previous = previous.map(|doc| wire::record_from_body(&doc.body)).transpose()?;
        let now = timefmt::now();
        let (settings, source, device_id) = match &matched {
            Matched::Individual(e) => (
                &e.settings,
                EnrollmentSource::Individual,
                e.device_id.clone().unwrap_or_else(|| id.as_str().to_owned()),
            ),
            Matched::Group(g) => (
                &g.settings,
                EnrollmentSource::Group { enrollment_group_id: g.enrollment_group_id.clone() },
                id.as_str().to_owned(),
            ),
        };
        let payload = request.payload.filter(|p| !p.is_null());
        // A certificate request is checked before anything is decided: one that cannot be
        // honoured refuses the registration, and nothing is stored (issue #26).
        let prepared = match &request.csr {
            Some(csr) => Some(self.issuance.prepare(&id, settings.credential_policy_name.as_deref(), csr).await?),
            None => None,
        };
        // A TPM device's challenge: its key goes to the hub registrar and, wrapped afresh,
        // into the result.
        let tpm_challenge = match &matched {
            Matched::Individual(e) if matches!(e.attestation, Attestation::Tpm { .. }) => {
                Some(self.tpm_challenge_of(&id, credential).await?)
            }
            _ => None,
        };
        // The certificate is issued before the hub registrar is called, so that the registrar
        // can be told its thumbprint; a registration that then ends other than assigned has
        // it revoked at once.
        let issued = match (&prepared, settings.enabled) {
            (Some(p), true) => Some(self.issuance.issue(&id, p, source_group(&matched)).await?),
            _ => None,
        };
        let assignment = if settings.enabled {
            self.assigner
                .assign(crate::allocation::Request {
                    id: &id,
                    matched: &matched,
                    x509: x509.as_ref(),
                    payload: payload.as_ref(),
                    previous: previous.as_ref(),
                    device_id,
                    tpm_key: tpm_challenge.as_ref().map(|c| c.challenge_key.as_str()),
                    tpm_storage_root_key: tpm_challenge.as_ref().map(|c| c.storage_root_key.as_str()),
                    issued_thumbprint: issued.as_ref().map(|i| i.sha256_thumbprint.as_str()),
                })
                .await?
        } else {
            crate::allocation::Assignment {
                outcome: Outcome::Disabled,
                twin: previous.as_ref().and_then(|p| p.initial_twin.clone()),
                detail: None,
            }
        };
        let tpm = match (&matched, &assignment.outcome, &tpm_challenge) {
            (Matched::Individual(e), Outcome::Assigned { .. }, Some(c)) => match &e.attestation {
                Attestation::Tpm { endorsement_key, .. } => Some(crate::tpm::tpm_result(&id, endorsement_key, c)?),
                _ => None,
            },
            _ => None,
        };
        let mut record = RegistrationRecord {
            registration_id: id.as_str().to_owned(),
            created: previous.as_ref().map_or_else(|| now.clone(), |p| p.created.clone()),
            updated: now,
            outcome: assignment.outcome,
            source,
            device_payload: payload,
            x509,
            initial_twin: assignment.twin,
            tpm,
            issued: None,
        };
        if let Some(issued) = issued {
            if matches!(record.outcome, Outcome::Assigned { .. }) {
                tracing::info!(registration_id = %id, serial = issued.serial, ca = issued.ca_name, "certificate issued");
                record.issued = Some(issued);
            } else {
                self.issuance.revoke_serial(&id, &issued.serial).await?;
            }
        } else if matches!(record.outcome, Outcome::Assigned { .. }) {
            // A registration without a request keeps showing the device's current certificate
            // (its chain is not sent again: the device asked for none).
            record.issued = previous.as_ref().and_then(|p| p.issued.clone()).map(|mut i| {
                i.chain.clear();
                i
            });
        }
        let operation_id = new_operation_id();
        let body = crate::to_json(&record)
            .map_err(|e| e.to_string())
            .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()))
            .map_err(Error::Internal)?;
        let tag = match &record.source {
            EnrollmentSource::Group { enrollment_group_id } => Some(enrollment_group_id.to_ascii_lowercase()),
            EnrollmentSource::Individual => None,
        };
        // The outcome as the store's state label, for the counts by status.
        let state = serde_json::to_value(wire::status_of(&record.outcome)).ok();
        let write = provisio_store::RegistrationWrite {
            registration_id: id.key(),
            body: &body,
            tag: tag.as_deref(),
            state: state.as_ref().and_then(serde_json::Value::as_str),
            operation_id: &operation_id,
        };
        let stored = self.store.record_registration(&write).await.or_internal()?;
        self.recent_operations.insert(
            operation_id.clone(),
            crate::cache::RecentOperation {
                registration_key: id.key().to_owned(),
                state: wire::device_result(&record, &stored.etag),
            },
        );
        // Debug, not info: the audit log records every registration already (with more
        // detail); the operator's log keeps what needs attention.
        tracing::debug!(registration_id = %id, operation_id, status = ?wire::status_of(&record.outcome), "registered");
        Ok((operation_id, record, assignment.detail))
    }

    /// `GET {scope}/registrations/{id}/operations/{operationId}`.
    ///
    /// # Errors
    /// Unknown scope, refused credential, or an operation that does not exist or belongs
    /// to another device (both `404`).
    pub(crate) async fn operation_status(
        &self,
        scope: &str,
        registration_id: &str,
        operation_id: &str,
        credential: &Credential,
        peer: Option<IpAddr>,
    ) -> Result<RegistrationOperationStatus, Error> {
        let _permit = self.admit()?;
        self.check_scope(scope)?;
        let id = Self::parse_id(registration_id)?;
        self.attest_for_read(&id, credential, peer).await?;
        // A device may poll 5 times per 10 s (DPS's limit); faster gets 429 + Retry-After.
        // Charged after attestation: registration ids and scopes are not secrets, and polls
        // charged before it let anyone keep a chosen device at 429 (issue #24, finding 4).
        self.polls.hit(id.key()).map_err(|wait| Error::Throttled(wait.as_secs().max(1)))?;
        let not_found = || Error::NotFound {
            code: codes::REGISTRATION_NOT_FOUND,
            message: format!("Operation '{}' was not found for registration '{id}'.", shorten(operation_id)),
        };
        if let Some(recent) = self.recent_operations.get(operation_id) {
            if recent.registration_key != id.key() {
                return Err(not_found());
            }
            return Ok(RegistrationOperationStatus::with_state(operation_id, recent.state.clone()));
        }
        let op = self.store.get_operation(operation_id).await.or_internal()?.ok_or_else(not_found)?;
        if op.registration_id != id.key() {
            return Err(not_found());
        }
        let record = wire::record_from_body(&op.registration_body)?;
        Ok(RegistrationOperationStatus::with_state(op.id, wire::device_result(&record, &op.registration_etag)))
    }

    /// `POST {scope}/registrations/{id}`: the device's current registration state.
    ///
    /// # Errors
    /// Unknown scope, refused credential, or no registration yet (`404`).
    pub(crate) async fn registration_status(
        &self,
        scope: &str,
        registration_id: &str,
        credential: &Credential,
        peer: Option<IpAddr>,
    ) -> Result<DeviceRegistrationResult, Error> {
        let _permit = self.admit()?;
        self.check_scope(scope)?;
        let id = Self::parse_id(registration_id)?;
        self.attest_for_read(&id, credential, peer).await?;
        let doc = self.store.get(Collection::Registrations, id.key()).await.or_internal()?.ok_or_else(|| {
            Error::NotFound {
                code: codes::REGISTRATION_NOT_FOUND,
                message: format!("Registration '{id}' has no registration state yet."),
            }
        })?;
        let mut result = wire::device_result(&wire::record_from_body(&doc.body)?, &doc.etag);
        // The spec keeps the issued chain out of the status lookup's answer.
        result.issued_certificate_chain = None;
        Ok(result)
    }
}

/// The group a matched enrollment is, if it is one.
fn source_group(m: &Matched) -> Option<&str> {
    match m {
        Matched::Group(g) => Some(g.enrollment_group_id.as_str()),
        Matched::Individual(_) => None,
    }
}

/// The audit entry of a registration attempt by `registration_id` from `origin`.
pub(crate) fn attempt(origin: &Origin, registration_id: &str, credential: &str) -> crate::audit::Entry {
    let mut entry = crate::audit::Entry::new(crate::audit::Kind::Registration, "register");
    entry.registration_id = Some(crate::audit::bounded(registration_id, crate::audit::MAX_ID_CHARS));
    entry.transport = Some(origin.transport.as_str().to_owned());
    entry.peer = origin.peer;
    entry.credential = Some(credential.to_owned());
    entry
}

/// Marks `entry` refused by `e`; returns `e` with the tracking id the entry carries.
pub(crate) fn refused(entry: &mut crate::audit::Entry, e: Error) -> Error {
    let (e, tracking_id) = e.tracked();
    entry.result = "refused".into();
    entry.status = e.status();
    entry.error_code = Some(e.code());
    entry.reason = Some(crate::audit::bounded(
        &e.detail().map_or_else(|| e.to_string(), str::to_owned),
        crate::audit::MAX_REASON_CHARS,
    ));
    entry.tracking_id = Some(tracking_id);
    e
}

fn new_operation_id() -> String {
    // Shaped like DPS's ids ("{n}.{16 hex}.{uuid}"); clients treat it as opaque. The middle
    // part is the time in microseconds, so that new ids sort after older ones and the
    // store's operation index grows at its end instead of rewriting a random page per
    // registration (measured: 11% less server CPU per registration). The random UUID
    // keeps the id unguessable and unique.
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    format!("4.{micros:016x}.{}", uuid::Uuid::new_v4())
}

#[cfg(test)]
mod tests {
    use provisio_core::{
        ids::IdScope,
        keys,
        sas::{SrEncoding, build_token},
    };
    use provisio_proto::{
        device::RegistrationStatus,
        service::{AttestationMechanism, IndividualEnrollment, SymmetricKeyAttestation},
    };
    use provisio_store::SqliteStore;
    use serde_json::json;

    use super::*;
    use crate::service::ServiceApi;

    const SCOPE: &str = "0ne0000ABCD";

    async fn setup(hubs: &[&str]) -> (Engine, ServiceApi, Arc<dyn Store>) {
        setup_with(hubs, crate::allocation::AllocationSettings::default()).await
    }

    async fn setup_with(
        hubs: &[&str],
        allocation: crate::allocation::AllocationSettings,
    ) -> (Engine, ServiceApi, Arc<dyn Store>) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let hub_list: Vec<String> = hubs.iter().map(|h| (*h).to_owned()).collect();
        let linked = crate::hubs::Hubs::new(store.clone());
        linked.seed(&hub_list, "unused.example").await.unwrap();
        let assigner = crate::allocation::Assigner::new(linked, allocation).unwrap();
        let engine = Engine::new(
            store.clone(),
            IdScope::parse(SCOPE).unwrap(),
            EngineSettings {
                sas_clock_skew_secs: 0,
                signing_certificates_need_verified_ca: false,
                cache_ttl: std::time::Duration::from_secs(1),
                registrations_per_second: 0,
                device_polls_per_10s: 0,
                max_concurrent_operations: 0,
                poll_auth_cache: std::time::Duration::ZERO,
                refusal_records_kept: 3,
                retry_after_secs: 2,
                x509_refusals_per_ip_per_minute: 0,
            },
            assigner,
        );
        (engine, ServiceApi::new(store.clone(), vec!["localhost".into()], 0), store)
    }

    fn token(id: &str, key: &str) -> Credential {
        Credential::Sas(
            build_token(&format!("{SCOPE}/registrations/{id}"), key, unix_now() + 600, None, SrEncoding::Lower)
                .unwrap(),
        )
    }

    async fn enroll(api: &ServiceApi, id: &str, hubs: Option<Vec<String>>) -> String {
        let e = api
            .put_enrollment(
                id,
                IndividualEnrollment {
                    registration_id: id.into(),
                    device_id: None,
                    registration_state: None,
                    optional_device_information: None,
                    attestation: AttestationMechanism {
                        kind: "symmetricKey".into(),
                        tpm: None,
                        x509: None,
                        symmetric_key: Some(SymmetricKeyAttestation::default()),
                    },
                    capabilities: None,
                    iot_hub_host_name: None,
                    initial_twin: None,
                    etag: None,
                    provisioning_status: None,
                    reprovision_policy: None,
                    created_date_time_utc: None,
                    last_updated_date_time_utc: None,
                    allocation_policy: None,
                    iot_hubs: hubs,
                    custom_allocation_definition: None,
                    credential_policy_name: None,
                },
                None,
            )
            .await
            .unwrap();
        e.attestation.symmetric_key.unwrap().primary_key.unwrap()
    }

    #[tokio::test]
    async fn tpm_tokens_must_be_signed_with_the_current_unexpired_challenge_key() {
        let (engine, api, store) = setup(&["hub1.example.net"]).await;
        // A real EK and SRK (swtpm's, as the fuzz corpus keeps them; the first byte there
        // selects the fuzz mode).
        let ek = &include_bytes!("../../../fuzz/corpus/tpm/ek")[1..];
        let srk = &include_bytes!("../../../fuzz/corpus/tpm/srk")[1..];
        let e: IndividualEnrollment = serde_json::from_value(serde_json::json!({
            "registrationId": "tpm-1",
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(ek)}},
        }))
        .unwrap();
        api.put_enrollment("tpm-1", e, None).await.unwrap();
        let key = provisio_core::keys::generate_key();
        let challenge = |expires: i64| {
            serde_json::json!({"challengeKey": key, "storageRootKey": B64.encode(srk), "expires": expires}).to_string()
        };
        let register = async |credential: &Credential| {
            engine.register(SCOPE, "tpm-1", DeviceRegistration::default(), credential).await
        };
        // No challenge yet.
        let e = register(&token("tpm-1", &key)).await.unwrap_err();
        assert!(e.detail().unwrap_or_default().contains("no outstanding challenge"), "{e:?}");
        // An expired one.
        store.put(Collection::TpmChallenges, "tpm-1", &challenge(unix_now_i64() - 1), Precondition::Any).await.unwrap();
        let e = register(&token("tpm-1", &key)).await.unwrap_err();
        assert!(e.detail().unwrap_or_default().contains("expired"), "{e:?}");
        // A current one, and a token signed with another key.
        store
            .put(Collection::TpmChallenges, "tpm-1", &challenge(unix_now_i64() + 60), Precondition::Any)
            .await
            .unwrap();
        let e = register(&token("tpm-1", &provisio_core::keys::generate_key())).await.unwrap_err();
        assert_eq!(e.status(), 401);
        assert!(e.detail().unwrap_or_default().contains("not signed with its TPM challenge key"), "{e:?}");
        // Finding 7 of issue #24: a SAS probe learns nothing about the id being TPM-enrolled;
        // the answer is an unknown id's.
        let unknown = engine
            .register(
                SCOPE,
                "nobody",
                DeviceRegistration::default(),
                &token("nobody", &provisio_core::keys::generate_key()),
            )
            .await
            .unwrap_err();
        assert_eq!((e.status(), e.code(), e.to_string()), (unknown.status(), unknown.code(), unknown.to_string()));
        assert_eq!(e.to_string(), "Unauthorized");
        // The right key: assigned, with the key for the TPM in the result and no symmetric key.
        let op = register(&token("tpm-1", &key)).await.unwrap();
        let status = engine.operation_status(SCOPE, "tpm-1", &op, &token("tpm-1", &key), None).await.unwrap();
        let state = status.registration_state.unwrap();
        assert_eq!(state.status, RegistrationStatus::Assigned);
        assert!(state.symmetric_key.is_none() && state.x509.is_none());
        let blob = B64.decode(state.tpm.unwrap()["authenticationKey"].as_str().unwrap()).unwrap();
        assert!(blob.len() > 600, "{}", blob.len());
    }

    /// One HTTP request on loopback: its JSON body comes back through the handle; the answer
    /// is `answer`.
    async fn one_request(answer: &'static str) -> (String, tokio::task::JoinHandle<serde_json::Value>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alloc", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            let body_at = loop {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if req.len() >= end + 4 + len {
                        break end + 4;
                    }
                }
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            serde_json::from_slice(&req[body_at..]).unwrap()
        });
        (url, task)
    }

    /// Issue #25, point 4: the custom allocation webhook's `deviceRuntimeContext` carries a TPM
    /// device's keys, as DPS sends them (it said `symmetricKey: {}`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tpm_devices_webhook_context_carries_its_keys() {
        let mut allocation = crate::allocation::AllocationSettings::default();
        allocation.webhooks.addresses = crate::addresses::AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let (engine, _, _store) = setup_with(&["hub1.example.net"], allocation).await;
        let api = engine.service_api(vec!["localhost".into()], crate::service::ServiceLimits::default());
        let (url, seen) = one_request(r#"{"iotHubHostName":"hub1.example.net"}"#).await;
        let ek = &include_bytes!("../../../fuzz/corpus/tpm/ek")[1..];
        let srk = &include_bytes!("../../../fuzz/corpus/tpm/srk")[1..];
        let e: IndividualEnrollment = serde_json::from_value(serde_json::json!({
            "registrationId": "tpm-3",
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(ek)}},
            "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": format!("{url}?code=function-key"), "apiVersion": "2021-10-01"},
        }))
        .unwrap();
        api.put_enrollment("tpm-3", e, None).await.unwrap();
        let device = crate::TpmChallenge::new(ek, srk).unwrap();
        engine.store_tpm_challenge(&RegistrationId::parse("tpm-3").unwrap(), &device).await.unwrap();
        let payload = serde_json::json!({"model": "m-1"});
        let request = DeviceRegistration { payload: Some(payload.clone()), ..DeviceRegistration::default() };
        let key = B64.encode(&device.key);
        let op = engine.register(SCOPE, "tpm-3", request, &token("tpm-3", &key)).await.unwrap();
        let request = seen.await.unwrap();
        // The function key in the URL's query is masked, as DPS does.
        assert_eq!(request["individualEnrollment"]["customAllocationDefinition"]["webhookUrl"], format!("{url}?****"));
        assert!(!request.to_string().contains("function-key"), "{request}");
        let ctx = request["deviceRuntimeContext"].clone();
        assert_eq!(
            ctx["tpm"],
            serde_json::json!({"endorsementKey": B64.encode(ek), "storageRootKey": B64.encode(srk)}),
            "{ctx}"
        );
        assert!(ctx.get("symmetricKey").is_none() && ctx.get("x509").is_none(), "{ctx}");
        assert_eq!(ctx["payload"], payload);
        assert!(!ctx.to_string().contains(&key), "the challenge key is a secret: {ctx}");
        let status = engine.operation_status(SCOPE, "tpm-3", &op, &token("tpm-3", &key), None).await.unwrap();
        assert_eq!(status.registration_state.unwrap().assigned_hub.as_deref(), Some("hub1.example.net"));
    }

    /// Finding 8 of issue #24: anyone who knows a device's EK (a public key) could ask for a
    /// challenge right after the device did and void the device's.
    #[tokio::test]
    async fn a_strangers_challenges_do_not_void_the_devices() {
        let (engine, api, _store) = setup(&["hub1.example.net"]).await;
        let ek = &include_bytes!("../../../fuzz/corpus/tpm/ek")[1..];
        let srk = &include_bytes!("../../../fuzz/corpus/tpm/srk")[1..];
        let e: IndividualEnrollment = serde_json::from_value(serde_json::json!({
            "registrationId": "tpm-2",
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(ek)}},
        }))
        .unwrap();
        api.put_enrollment("tpm-2", e, None).await.unwrap();
        let id = RegistrationId::parse("tpm-2").unwrap();
        // The device's challenge, then a stranger's, as many as it is allowed.
        let device = crate::TpmChallenge::new(ek, srk).unwrap();
        engine.store_tpm_challenge(&id, &device).await.unwrap();
        let origin = Origin::new(crate::device::Transport::Internal, None);
        let body = || {
            Ok(DeviceRegistration {
                tpm: Some(provisio_proto::device::TpmAttestation {
                    endorsement_key: B64.encode(ek),
                    storage_root_key: Some(B64.encode(srk)),
                }),
                ..DeviceRegistration::default()
            })
        };
        for _ in 0..crate::tpm::CHALLENGES_PER_MINUTE {
            engine.tpm_challenge(&origin, SCOPE, "tpm-2", body()).await.unwrap();
        }
        let e = engine.tpm_challenge(&origin, SCOPE, "tpm-2", body()).await.unwrap_err();
        assert_eq!(e.status(), 429, "{e:?}");
        // The device's key still works.
        let device_key = B64.encode(&device.key);
        let op = engine.register(SCOPE, "tpm-2", DeviceRegistration::default(), &token("tpm-2", &device_key)).await;
        let op = op.unwrap();
        let status = engine.operation_status(SCOPE, "tpm-2", &op, &token("tpm-2", &device_key), None).await.unwrap();
        assert_eq!(status.registration_state.unwrap().status, RegistrationStatus::Assigned);
        // Keys beyond the kept ones are dropped, the oldest first.
        let stored = engine.stored_tpm_challenges(&id).await.unwrap();
        assert_eq!(stored.len(), crate::tpm::CHALLENGES_KEPT);
        assert_eq!(stored[crate::tpm::CHALLENGES_KEPT - 1].challenge_key, device_key);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusal_records_are_kept_to_their_limit() {
        use provisio_pki::testcerts::{KeyKind, Role, issue};
        let (engine, _api, store) = setup(&["hub1.example.net"]).await;
        let idle = async || {
            while engine.refusals.trimming.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        // Certificates with CNs of the client's choosing, from a root no enrollment knows.
        let root = issue(Role::Root, "stranger-root", None, KeyKind::EcdsaP256, 1).unwrap();
        for i in 0..12 {
            if i == 11 {
                idle().await;
            }
            let id = format!("stranger-{i:02}");
            let cert = issue(Role::Device, &id, Some(&root), KeyKind::EcdsaP256, 1).unwrap();
            let chain = provisio_pki::x509::decode_pem_chain(&cert.cert_pem).unwrap();
            let refused =
                engine.register(SCOPE, &id, DeviceRegistration::default(), &Credential::X509(chain)).await.unwrap_err();
            assert_eq!(refused.status(), 401);
        }
        // The trim after the last refusal started when none was running: it saw every write.
        idle().await;
        let kept: Vec<String> =
            store.list(Collection::Audit, None, 100).await.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(kept.len(), 3, "{kept:?}");
        // The newest stays (within a second, the greater ids do).
        assert!(kept.contains(&"stranger-11".to_owned()), "{kept:?}");
    }

    /// A device certificate with this CN under `root`, as the chain a device presents.
    fn device_chain(cn: &str, root: &provisio_pki::CertAndKey) -> Vec<Vec<u8>> {
        use provisio_pki::testcerts::{KeyKind, Role, issue};
        let cert = issue(Role::Device, cn, Some(root), KeyKind::EcdsaP256, 1).unwrap();
        provisio_pki::x509::decode_pem_chain(&cert.cert_pem).unwrap()
    }

    #[tokio::test]
    async fn a_refusal_record_keeps_each_certificate_of_the_id_and_no_other_certificate_replaces_it() {
        use provisio_pki::testcerts::{KeyKind, Role, issue};
        let (engine, api, store) = setup(&["hub1.example.net"]).await;
        let root = issue(Role::Root, "stranger-root", None, KeyKind::EcdsaP256, 1).unwrap();
        let refuse = async |id: &str, chain: &Vec<Vec<u8>>| {
            let e = engine
                .register(SCOPE, id, DeviceRegistration::default(), &Credential::X509(chain.clone()))
                .await
                .unwrap_err();
            assert_eq!(e.status(), 401);
            e.tracking_id().unwrap().to_owned()
        };
        let thumbprints = async || -> Vec<String> {
            let r = api.audit("victim").await.unwrap();
            r["refusals"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["certificateInfo"]["sha256Thumbprint"].as_str().unwrap().to_owned())
                .collect()
        };
        let thumb = |chain: &Vec<Vec<u8>>| provisio_pki::x509::cert_info(&chain[0]).unwrap().sha256_thumbprint;
        let a = device_chain("victim", &root);
        let tracked = refuse("victim", &a).await;
        assert_eq!(api.audit("victim").await.unwrap()["trackingId"], tracked.as_str());
        // A certificate of another CN, sent for this id, is not about it: nothing changes.
        let other = device_chain("someone-else", &root);
        refuse("victim", &other).await;
        assert_eq!(api.audit("victim").await.unwrap()["trackingId"], tracked.as_str());
        refuse("unrecorded", &other).await;
        assert_eq!(api.audit("unrecorded").await.unwrap_err().status(), 404);
        // Another certificate with the id's CN adds its own entry; the first one stays.
        let b = device_chain("victim", &root);
        let tracked_b = refuse("victim", &b).await;
        let r = api.audit("victim").await.unwrap();
        assert_eq!(r["trackingId"], tracked_b.as_str(), "the newest at the top");
        assert_eq!(r["refusals"][1]["trackingId"], tracked.as_str(), "the first kept");
        assert_eq!(thumbprints().await, vec![thumb(&b), thumb(&a)]);
        // Five newer certificates push both out; the device that retries comes back.
        let flood: Vec<_> = (0..5).map(|_| device_chain("victim", &root)).collect();
        for c in &flood {
            refuse("victim", c).await;
        }
        assert_eq!(thumbprints().await, flood.iter().rev().map(thumb).collect::<Vec<_>>());
        let again = refuse("VICTIM", &a).await;
        let r = api.audit("victim").await.unwrap();
        assert_eq!(r["trackingId"], again.as_str());
        assert_eq!(thumbprints().await.len(), REFUSALS_PER_ID);
        // A record written before records kept several is kept as one entry.
        let old = json!({"registrationId": "legacy", "trackingId": "t-old", "attestation": "x509"});
        store.put(Collection::Audit, "legacy", &old.to_string(), Precondition::Any).await.unwrap();
        refuse("legacy", &device_chain("legacy", &root)).await;
        let r = api.audit("legacy").await.unwrap();
        assert_eq!(r["refusals"][1]["trackingId"], "t-old", "{r}");
    }

    #[tokio::test]
    async fn refused_attempts_write_bounded_lines_and_a_flood_from_one_address_is_summed_up() {
        use provisio_pki::testcerts::{KeyKind, Role, issue};
        let (engine, api, _) = setup(&["hub1.example.net"]).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = crate::audit::AuditLog::open(crate::audit::AuditConfig {
            path: path.clone(),
            max_bytes: u64::MAX,
            keep: 1,
            refusals: crate::audit::RefusalLimits::per_minute(10),
        })
        .await
        .unwrap();
        let engine = engine.with_audit(log.clone());
        // Fifteen X.509 groups: a refused chain's reason names each one.
        for i in 0..15 {
            let root = issue(Role::Root, &format!("group-root-{i:02}"), None, KeyKind::EcdsaP256, 1).unwrap();
            let g: provisio_proto::service::EnrollmentGroup = serde_json::from_value(json!({
                "enrollmentGroupId": format!("x509-group-{i:02}"),
                "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root.cert_pem}}}},
            }))
            .unwrap();
            api.put_group(&format!("x509-group-{i:02}"), g, None).await.unwrap();
        }
        let attacker = Origin::new(crate::device::Transport::Https, Some("192.0.2.7".parse().unwrap()));
        let send = async |origin: Origin, id: &str, credential: &Credential| {
            engine
                .device(crate::DeviceRequest {
                    origin,
                    scope: SCOPE,
                    registration_id: id,
                    api_version: Some("2021-06-01"),
                    operation: crate::DeviceOperation::Register { body: b"{}" },
                    credential,
                    connection: &crate::Connection::default(),
                })
                .await
        };
        let stranger = issue(Role::Root, "stranger-root", None, KeyKind::EcdsaP256, 1).unwrap();
        let a = send(attacker, "stranger", &Credential::X509(device_chain("stranger", &stranger))).await;
        assert_eq!(a.status, 401);
        let long_id = "x".repeat(5000);
        assert_eq!(send(attacker, &long_id, &Credential::None).await.status, 400);
        let raw = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = raw.lines().collect();
        assert_eq!(lines.len(), 2);
        let x509: crate::audit::Entry = serde_json::from_str(lines[0]).unwrap();
        let reason = x509.reason.unwrap();
        assert!(reason.ends_with('…') && reason.chars().count() == crate::audit::MAX_REASON_CHARS + 1, "{reason}");
        assert!(lines[0].len() < 1600, "{}", lines[0].len());
        let long: crate::audit::Entry = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(long.registration_id.unwrap().chars().count(), crate::audit::MAX_ID_CHARS + 1);
        assert!(lines[1].len() < 1000, "{}", lines[1]);
        // A flood of forged tokens from the same address: ten lines a minute in all.
        let forged = token("dev-1", &provisio_core::keys::generate_key());
        for _ in 0..40 {
            assert_eq!(send(attacker, "dev-1", &forged).await.status, 401);
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 10);
        // Another address is not silenced by it; an enrolled device is written whatever the flood.
        let other = Origin::new(crate::device::Transport::Mqtt, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(send(other, "dev-1", &forged).await.status, 401);
        let key = enroll(&api, "dev-2", None).await;
        assert_eq!(send(attacker, "dev-2", &token("dev-2", &key)).await.status, 202);
        log.flush().await;
        let (entries, bad) = crate::audit::read(&path, 1, &crate::audit::Filter::default()).unwrap();
        assert_eq!(bad, 0);
        assert_eq!(entries.len(), 13, "{entries:#?}");
        assert_eq!(entries[10].peer, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(entries[11].result, "assigned");
        assert_eq!((entries[12].result.as_str(), entries[12].suppressed), ("suppressed", Some(32)));
        assert_eq!(entries[12].peer, attacker.peer);
        assert!(crate::audit::verify(&[path]).unwrap().is_ok());
    }

    #[tokio::test]
    async fn payload_is_stored_and_null_payload_ignored() {
        let (engine, api, store) = setup(&["h1"]).await;
        let key = enroll(&api, "dev-p", None).await;
        let req = DeviceRegistration { payload: Some(json!({"model": "x1"})), ..DeviceRegistration::default() };
        engine.register(SCOPE, "DEV-P", req, &token("DEV-P", &key)).await.unwrap();
        let rec = wire::record_from_body(&store.get(Collection::Registrations, "dev-p").await.unwrap().unwrap().body)
            .unwrap();
        assert_eq!(rec.device_payload, Some(json!({"model": "x1"})));
        // The device's spelling of its id is echoed.
        assert_eq!(rec.registration_id, "DEV-P");
        let req = DeviceRegistration {
            registration_id: Some("dev-p".into()),
            payload: Some(serde_json::Value::Null),
            ..DeviceRegistration::default()
        };
        engine.register(SCOPE, "dev-p", req, &token("dev-p", &key)).await.unwrap();
        let rec = wire::record_from_body(&store.get(Collection::Registrations, "dev-p").await.unwrap().unwrap().body)
            .unwrap();
        assert_eq!(rec.device_payload, None);
    }

    #[tokio::test]
    async fn a_poll_answered_from_the_recent_operations_equals_one_read_from_the_store() {
        let (mut engine, api, _) = setup(&["h1"]).await;
        let key = enroll(&api, "dev-c", None).await;
        let req = DeviceRegistration { payload: Some(json!({"model": "x1"})), ..DeviceRegistration::default() };
        let op = engine.register(SCOPE, "Dev-C", req, &token("Dev-C", &key)).await.unwrap();
        let cached = engine.operation_status(SCOPE, "Dev-C", &op, &token("Dev-C", &key), None).await.unwrap();
        // Another device's poll of this operation is refused from the cache as from the store.
        let other = enroll(&api, "dev-o", None).await;
        let refused = engine.operation_status(SCOPE, "dev-o", &op, &token("dev-o", &other), None).await.unwrap_err();
        assert_eq!(refused.status(), 404);
        engine.recent_operations = Arc::new(crate::cache::RecentOperations::new(std::time::Duration::ZERO, 0));
        let stored = engine.operation_status(SCOPE, "Dev-C", &op, &token("Dev-C", &key), None).await.unwrap();
        assert_eq!(serde_json::to_value(&cached).unwrap(), serde_json::to_value(&stored).unwrap());
        let refused = engine.operation_status(SCOPE, "dev-o", &op, &token("dev-o", &other), None).await.unwrap_err();
        assert_eq!(refused.status(), 404);
    }

    #[tokio::test]
    async fn iot_hubs_restrict_and_no_hub_fails_with_400208() {
        let (engine, api, _) = setup(&["h1", "h2"]).await;
        let key = enroll(&api, "dev-r", Some(vec!["H2".into()])).await;
        let op = engine.register(SCOPE, "dev-r", DeviceRegistration::default(), &token("dev-r", &key)).await.unwrap();
        let st = engine.operation_status(SCOPE, "dev-r", &op, &token("dev-r", &key), None).await.unwrap();
        assert_eq!(st.registration_state.unwrap().assigned_hub.as_deref(), Some("h2"));

        let key = enroll(&api, "dev-none", Some(vec!["elsewhere".into()])).await;
        let op =
            engine.register(SCOPE, "dev-none", DeviceRegistration::default(), &token("dev-none", &key)).await.unwrap();
        let st = engine.operation_status(SCOPE, "dev-none", &op, &token("dev-none", &key), None).await.unwrap();
        assert_eq!(st.status, RegistrationStatus::Failed);
        let rs = st.registration_state.unwrap();
        assert_eq!(rs.error_code, Some(codes::HUB_NOT_SPECIFIED));
        assert!(rs.error_message.is_some());
    }

    #[test]
    fn operation_ids_are_unique_and_sort_by_creation() {
        let ids: Vec<String> = (0..1000).map(|_| new_operation_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "unique");
        // The time part never goes back within a run (ties are broken by the UUID).
        let time = |id: &str| id.split('.').nth(1).map(str::to_owned).unwrap_or_default();
        assert!(ids.windows(2).all(|w| time(&w[0]) <= time(&w[1])));
        assert!(ids.iter().all(|id| id.starts_with("4.") && id.len() == 2 + 16 + 1 + 36));
    }

    #[tokio::test]
    async fn operations_of_one_device_are_snapshots() {
        let (engine, api, _) = setup(&["h1"]).await;
        let key = enroll(&api, "dev-s", None).await;
        let cred = token("dev-s", &key);
        let op1 = engine.register(SCOPE, "dev-s", DeviceRegistration::default(), &cred).await.unwrap();
        let op2 = engine.register(SCOPE, "dev-s", DeviceRegistration::default(), &cred).await.unwrap();
        let s1 = engine.operation_status(SCOPE, "dev-s", &op1, &cred, None).await.unwrap();
        let s2 = engine.operation_status(SCOPE, "dev-s", &op2, &cred, None).await.unwrap();
        assert_ne!(s1.registration_state.as_ref().unwrap().etag, s2.registration_state.as_ref().unwrap().etag);
        let now = engine.registration_status(SCOPE, "dev-s", &cred, None).await.unwrap();
        assert_eq!(now.etag, s2.registration_state.unwrap().etag);
        // Group keys never authenticate the POST status lookup of another id.
        assert!(
            engine.registration_status(SCOPE, "dev-s", &token("dev-s", &keys::generate_key()), None).await.is_err()
        );
    }
}
