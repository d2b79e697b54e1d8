//! Operational certificates issued at registration (issue #26): issuing CAs, certificate
//! policies, the certificates issued to devices, their revocation and each CA's CRL.
//!
//! A device sends a PKCS#10 request (`csr`) with its registration; the enrollment (or group)
//! names a certificate policy (`credentialPolicyName`), which names the issuing CA, the
//! validity, the key types allowed and how many certificates one device may be issued a day.
//! The request is checked before the device is assigned ([`Issuance::prepare`]): a request
//! that cannot be honoured refuses the registration and nothing is stored. Once the device
//! is assigned, the certificate is issued ([`Issuance::issue`]) and its chain goes into the
//! registration's result.

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use provisio_core::{ids::RegistrationId, model::IssuedCertificate, text::shorten, timefmt};
use provisio_pki::{
    CertAndKey,
    issue::{AllowedKeys, Csr},
};
use provisio_proto::{
    error::codes,
    service::{CertificateAuthority, CredentialPolicy},
};
use provisio_store::{Collection, Precondition, Store};
use serde::{Deserialize, Serialize};

use crate::{Error, Resource, StoreResult};

/// Validity of issued certificates unless the policy says otherwise, days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 30;
/// Certificates one device may be issued per day unless the policy says otherwise.
pub const DEFAULT_ISSUANCE_LIMIT_PER_DAY: u32 = 10;
/// How long a CRL is valid for (`nextUpdate`).
const CRL_VALIDITY: time::Duration = time::Duration::days(7);
/// How long a signed CRL is served again before a new one is signed. `GET /crl/{ca}.crl` needs
/// no credential, and signing one reads every issued-certificate record: without this, each
/// request would cost that much. A revocation on this node signs a new one at the next request;
/// other nodes' revocations show within this time.
const CRL_REUSE: std::time::Duration = std::time::Duration::from_secs(60);
/// Validity of CAs made by [`Issuance::create_ca`], days.
const CA_VALIDITY_DAYS: i64 = 3650;
/// The `Meta` key of the root that CAs made here are issued under.
const ISSUING_ROOT: &str = "issuingRoot";

/// A stored issuing CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCa {
    name: String,
    cert_pem: String,
    /// Sealed at rest like every private key.
    key_pem: String,
    /// The certificates above it up to the root (empty when it is a root).
    #[serde(default)]
    chain_pem: String,
    created: String,
}

/// A stored certificate policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredPolicy {
    name: String,
    ca_name: String,
    validity_days: u32,
    key_types: Vec<String>,
    issuance_limit_per_day: u32,
}

/// A certificate issued to a device, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredIssued {
    registration_id: String,
    serial: String,
    sha256_thumbprint: String,
    not_after: String,
    ca_name: String,
    /// Unix seconds.
    issued: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked: Option<String>,
    /// The group the device registered through, if any (revoked with the group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

/// A device's request, checked against its policy, ready to be honoured once it is assigned.
#[derive(Debug, Clone)]
pub struct Prepared {
    csr: Csr,
    policy: StoredPolicy,
    ca: StoredCa,
}

/// The key type names a policy lists.
const KEY_TYPES: &[&str] = &["ecdsa-p256", "ecdsa-p384", "rsa"];

fn allowed_keys(types: &[String]) -> AllowedKeys {
    let has = |t: &str| types.iter().any(|k| k.eq_ignore_ascii_case(t));
    AllowedKeys {
        ecdsa_p256: has("ecdsa-p256"),
        ecdsa_p384: has("ecdsa-p384"),
        rsa_bits: has("rsa").then_some((2048, 4096)),
    }
}

fn pem_chain_ders(pem: &str) -> Result<Vec<Vec<u8>>, Error> {
    provisio_pki::x509::decode_pem_chain(pem).map_err(|e| Error::Internal(format!("a stored CA is corrupt: {e}")))
}

fn check_name(what: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("{what} name '{}' must be 1-128 characters of A-Z a-z 0-9 - . _", shorten(name))))
    }
}

/// A CRL as signed, and when.
type SignedCrl = (std::time::Instant, Arc<Vec<u8>>);

/// Issuing CAs, certificate policies and issued certificates, in the store.
#[derive(Clone)]
pub struct Issuance {
    store: Arc<dyn Store>,
    /// `https://host[:port]` of this service, for CRL distribution points.
    public_url: Option<String>,
    /// The instance's ID scope, for the issuing root's name.
    scope: String,
    /// Signed CRLs by case-folded CA name, with when they were signed ([`CRL_REUSE`]).
    crls: Arc<std::sync::Mutex<std::collections::HashMap<String, SignedCrl>>>,
}

impl Issuance {
    /// Issuance over `store`; issued certificates point at CRLs under `public_url` when given.
    #[must_use]
    pub fn new(store: Arc<dyn Store>, scope: &str, public_url: Option<String>) -> Self {
        Self { store, public_url, scope: scope.to_owned(), crls: Arc::default() }
    }

    /// The path of a CA's CRL on the HTTPS listener (no authentication).
    #[must_use]
    pub fn crl_path(name: &str) -> String {
        format!("/crl/{}.crl", name.to_ascii_lowercase())
    }

    /// The root that CAs made here are issued under, made on first use. It is not the
    /// instance's TLS root, whose path length allows no intermediate.
    async fn issuing_root(&self) -> Result<CertAndKey, Error> {
        #[derive(Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Root {
            cert_pem: String,
            key_pem: String,
        }
        let fresh = provisio_pki::issue::issuing_root(&format!("Provisio Issuing Root {}", self.scope))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let body = serde_json::to_string(&Root { cert_pem: fresh.cert_pem, key_pem: fresh.key_pem })
            .map_err(|e| Error::Internal(e.to_string()))?;
        // insert_if_absent: two nodes making their first CA at once agree on one root.
        let doc = self.store.insert_if_absent(Collection::Meta, ISSUING_ROOT, &body).await.or_internal()?;
        let root: Root = serde_json::from_str(&doc.body).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(CertAndKey { cert_pem: root.cert_pem, key_pem: root.key_pem })
    }

    /// `PUT /certificateAuthorities/{name}` without a certificate: makes an issuing CA under
    /// the issuing root. With `certificate` and `privateKey` (and `chain` up to the root):
    /// imports an operator's CA.
    ///
    /// # Errors
    /// `409` when it exists; `400` for a bad name, certificate, key or chain.
    pub async fn put_ca(&self, name: &str, body: CertificateAuthority) -> Result<CertificateAuthority, Error> {
        check_name("A certificate authority", name)?;
        let stored = match (&body.certificate, &body.private_key) {
            (None, None) => {
                let root = self.issuing_root().await?;
                let ca = provisio_pki::issue::issuing_ca(&root, name, CA_VALIDITY_DAYS)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                StoredCa {
                    name: name.to_owned(),
                    cert_pem: ca.cert_pem,
                    key_pem: ca.key_pem,
                    chain_pem: root.cert_pem,
                    created: timefmt::now(),
                }
            }
            (Some(cert), Some(key)) => {
                let chain = body.chain.clone().unwrap_or_default();
                provisio_pki::issue::check_ca(cert, key, &chain).map_err(|e| Error::invalid(e.to_string()))?;
                StoredCa {
                    name: name.to_owned(),
                    cert_pem: cert.clone(),
                    key_pem: key.clone(),
                    chain_pem: chain,
                    created: timefmt::now(),
                }
            }
            _ => {
                return Err(Error::invalid(
                    "An imported certificate authority needs both 'certificate' and 'privateKey' (PEM); \
                     send neither to have one made.",
                ));
            }
        };
        let doc_body = serde_json::to_string(&stored).map_err(|e| Error::Internal(e.to_string()))?;
        let key = name.to_ascii_lowercase();
        // A CA is never replaced in place: the certificates it issued name it.
        self.store.put(Collection::IssuingCas, &key, &doc_body, Precondition::CreateOnly).await.map_err(
            |e| match e {
                provisio_store::StoreError::Conflict => Error::Conflict(format!(
                    "Certificate authority '{}' already exists; a CA is not replaced in place (delete it first, \
                 or use another name).",
                    shorten(name)
                )),
                other => Resource { kind: "Certificate authority", id: name, not_found_code: codes::NOT_FOUND }
                    .store_error(other),
            },
        )?;
        self.get_ca(name).await
    }

    async fn stored_ca(&self, name: &str) -> Result<Option<(StoredCa, String)>, Error> {
        let Some(doc) = self.store.get(Collection::IssuingCas, &name.to_ascii_lowercase()).await.or_internal()? else {
            return Ok(None);
        };
        let ca: StoredCa =
            serde_json::from_str(&doc.body).map_err(|e| Error::Internal(format!("stored CA is corrupt: {e}")))?;
        Ok(Some((ca, doc.etag)))
    }

    fn ca_to_wire(ca: &StoredCa, etag: &str) -> Result<CertificateAuthority, Error> {
        let der = pem_chain_ders(&ca.cert_pem)?.into_iter().next().ok_or_else(|| Error::Internal("empty CA".into()))?;
        let info = provisio_pki::x509::cert_info(&der).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(CertificateAuthority {
            name: ca.name.clone(),
            certificate: Some(ca.cert_pem.clone()),
            chain: (!ca.chain_pem.is_empty()).then(|| ca.chain_pem.clone()),
            private_key: None,
            subject: Some(info.subject_name),
            sha256_thumbprint: Some(info.sha256_thumbprint),
            not_after_utc: Some(info.not_after_utc),
            crl_path: Some(Self::crl_path(&ca.name)),
            etag: Some(etag.to_owned()),
        })
    }

    /// `GET /certificateAuthorities/{name}` (never the private key).
    ///
    /// # Errors
    /// `404` when it does not exist.
    pub async fn get_ca(&self, name: &str) -> Result<CertificateAuthority, Error> {
        let (ca, etag) = self.stored_ca(name).await?.ok_or_else(|| not_found("certificate authority", name))?;
        Self::ca_to_wire(&ca, &etag)
    }

    /// `GET /certificateAuthorities`.
    ///
    /// # Errors
    /// Store failures.
    pub async fn list_cas(&self) -> Result<Vec<CertificateAuthority>, Error> {
        let mut out = Vec::new();
        for doc in self.store.list(Collection::IssuingCas, None, 1000).await.or_internal()? {
            let ca: StoredCa =
                serde_json::from_str(&doc.body).map_err(|e| Error::Internal(format!("stored CA is corrupt: {e}")))?;
            out.push(Self::ca_to_wire(&ca, &doc.etag)?);
        }
        Ok(out)
    }

    /// `DELETE /certificateAuthorities/{name}`: refused while a policy names it.
    ///
    /// # Errors
    /// `404`; `409` while a policy uses it.
    pub async fn delete_ca(&self, name: &str) -> Result<(), Error> {
        if let Some(p) = self.list_stored_policies().await?.into_iter().find(|p| p.ca_name.eq_ignore_ascii_case(name)) {
            return Err(Error::Conflict(format!(
                "The certificate policy '{}' issues from '{name}': delete or change it first.",
                p.name
            )));
        }
        self.store.delete(Collection::IssuingCas, &name.to_ascii_lowercase(), None).await.about(&Resource {
            kind: "Certificate authority",
            id: name,
            not_found_code: codes::NOT_FOUND,
        })
    }

    /// `PUT /credentialPolicies/{name}`: creates or replaces a policy.
    ///
    /// # Errors
    /// `400` for a bad name, an unknown CA or key type, a zero validity or limit.
    pub async fn put_policy(&self, name: &str, body: CredentialPolicy) -> Result<CredentialPolicy, Error> {
        check_name("A certificate policy", name)?;
        if !body.name.eq_ignore_ascii_case(name) {
            return Err(Error::invalid(format!(
                "The body's name '{}' does not match '{name}' in the path.",
                shorten(&body.name)
            )));
        }
        if self.stored_ca(&body.certificate_authority_name).await?.is_none() {
            return Err(Error::invalid(format!(
                "certificateAuthorityName '{}' names no certificate authority; create it with PUT \
                 /certificateAuthorities/{{name}} (provisio ca create).",
                shorten(&body.certificate_authority_name)
            )));
        }
        let validity_days = body.validity_in_days.unwrap_or(DEFAULT_VALIDITY_DAYS);
        let limit = body.issuance_limit_per_day.unwrap_or(DEFAULT_ISSUANCE_LIMIT_PER_DAY);
        if validity_days == 0 || validity_days > 3650 || limit == 0 {
            return Err(Error::invalid("validityInDays must be 1-3650 and issuanceLimitPerDay at least 1."));
        }
        let key_types = body.key_types.unwrap_or_else(|| KEY_TYPES.iter().map(|k| (*k).to_owned()).collect());
        if let Some(bad) = key_types.iter().find(|k| !KEY_TYPES.iter().any(|t| t.eq_ignore_ascii_case(k))) {
            return Err(Error::invalid(format!(
                "keyTypes: '{}' is not one of {}.",
                shorten(bad),
                KEY_TYPES.join(", ")
            )));
        }
        if key_types.is_empty() {
            return Err(Error::invalid("keyTypes must allow at least one key type."));
        }
        let stored = StoredPolicy {
            name: name.to_owned(),
            ca_name: body.certificate_authority_name,
            validity_days,
            key_types,
            issuance_limit_per_day: limit,
        };
        let doc_body = serde_json::to_string(&stored).map_err(|e| Error::Internal(e.to_string()))?;
        self.store
            .put(Collection::CredentialPolicies, &name.to_ascii_lowercase(), &doc_body, Precondition::Any)
            .await
            .or_internal()?;
        self.get_policy(name).await
    }

    async fn stored_policy(&self, name: &str) -> Result<Option<(StoredPolicy, String)>, Error> {
        let Some(doc) =
            self.store.get(Collection::CredentialPolicies, &name.to_ascii_lowercase()).await.or_internal()?
        else {
            return Ok(None);
        };
        let p =
            serde_json::from_str(&doc.body).map_err(|e| Error::Internal(format!("stored policy is corrupt: {e}")))?;
        Ok(Some((p, doc.etag)))
    }

    fn policy_to_wire(p: &StoredPolicy, etag: &str) -> CredentialPolicy {
        CredentialPolicy {
            name: p.name.clone(),
            certificate_authority_name: p.ca_name.clone(),
            validity_in_days: Some(p.validity_days),
            key_types: Some(p.key_types.clone()),
            issuance_limit_per_day: Some(p.issuance_limit_per_day),
            etag: Some(etag.to_owned()),
        }
    }

    /// `GET /credentialPolicies/{name}`.
    ///
    /// # Errors
    /// `404` when it does not exist.
    pub async fn get_policy(&self, name: &str) -> Result<CredentialPolicy, Error> {
        let (p, etag) = self.stored_policy(name).await?.ok_or_else(|| not_found("certificate policy", name))?;
        Ok(Self::policy_to_wire(&p, &etag))
    }

    async fn list_stored_policies(&self) -> Result<Vec<StoredPolicy>, Error> {
        self.store
            .list(Collection::CredentialPolicies, None, 1000)
            .await
            .or_internal()?
            .iter()
            .map(|d| {
                serde_json::from_str(&d.body).map_err(|e| Error::Internal(format!("stored policy is corrupt: {e}")))
            })
            .collect()
    }

    /// `GET /credentialPolicies`.
    ///
    /// # Errors
    /// Store failures.
    pub async fn list_policies(&self) -> Result<Vec<CredentialPolicy>, Error> {
        let docs = self.store.list(Collection::CredentialPolicies, None, 1000).await.or_internal()?;
        docs.iter()
            .map(|d| {
                let p: StoredPolicy = serde_json::from_str(&d.body)
                    .map_err(|e| Error::Internal(format!("stored policy is corrupt: {e}")))?;
                Ok(Self::policy_to_wire(&p, &d.etag))
            })
            .collect()
    }

    /// `DELETE /credentialPolicies/{name}`.
    ///
    /// # Errors
    /// `404` when it does not exist.
    pub async fn delete_policy(&self, name: &str) -> Result<(), Error> {
        self.store.delete(Collection::CredentialPolicies, &name.to_ascii_lowercase(), None).await.about(&Resource {
            kind: "Certificate policy",
            id: name,
            not_found_code: codes::NOT_FOUND,
        })
    }

    /// Checks a device's `csr` against the policy its enrollment names, before the device is
    /// assigned: the enrollment has a policy, the policy's CA exists, the request verifies,
    /// names the device and has an allowed key, and the device has not reached its issuances
    /// for the day.
    ///
    /// # Errors
    /// `400` / `400004` naming what is wrong; `429` at the day's limit.
    pub async fn prepare(&self, id: &RegistrationId, policy_name: Option<&str>, csr: &str) -> Result<Prepared, Error> {
        let refuse = |public: String| Error::BadRequest { code: codes::ARGUMENT_INVALID, message: public };
        let Some(policy_name) = policy_name else {
            return Err(refuse(format!(
                "The registration carries a csr, but the enrollment of '{id}' names no credentialPolicyName: it \
                 issues no certificates."
            )));
        };
        let (policy, _) = self.stored_policy(policy_name).await?.ok_or_else(|| {
            refuse(format!(
                "The enrollment's credentialPolicyName '{}' names no certificate policy.",
                shorten(policy_name)
            ))
        })?;
        let (ca, _) = self
            .stored_ca(&policy.ca_name)
            .await?
            .ok_or_else(|| Error::Internal(format!("the certificate policy '{}' names a missing CA", policy.name)))?;
        let csr =
            Csr::parse(csr, id.as_str(), &allowed_keys(&policy.key_types)).map_err(|e| refuse(format!("{e}.")))?;
        let since = crate::engine::unix_now_i64() - 24 * 3600;
        let today = self.issued_to(id).await?.iter().filter(|i| i.issued > since).count();
        if today >= policy.issuance_limit_per_day as usize {
            return Err(Error::Throttled(3600));
        }
        Ok(Prepared { csr, policy, ca })
    }

    /// Issues the certificate of a prepared request and records it.
    ///
    /// # Errors
    /// Signing or store failures.
    pub async fn issue(
        &self,
        id: &RegistrationId,
        p: &Prepared,
        group: Option<&str>,
    ) -> Result<IssuedCertificate, Error> {
        let ca = CertAndKey { cert_pem: p.ca.cert_pem.clone(), key_pem: p.ca.key_pem.clone() };
        let crl_url = self.public_url.as_ref().map(|u| format!("{u}{}", Self::crl_path(&p.ca.name)));
        let now = time::OffsetDateTime::now_utc();
        let issued = provisio_pki::issue::issue(
            &ca,
            &p.csr,
            id.as_str(),
            time::Duration::days(i64::from(p.policy.validity_days)),
            crl_url.as_deref(),
            now,
        )
        .map_err(|e| Error::Internal(format!("issuing a certificate: {e}")))?;
        let mut chain = vec![B64.encode(&issued.der)];
        for der in pem_chain_ders(&p.ca.cert_pem)?.into_iter().chain(pem_chain_ders(&p.ca.chain_pem)?) {
            chain.push(B64.encode(der));
        }
        let not_after = timefmt::format(issued.not_after);
        let record = StoredIssued {
            registration_id: id.as_str().to_owned(),
            serial: issued.serial.clone(),
            sha256_thumbprint: issued.sha256_thumbprint.clone(),
            not_after: not_after.clone(),
            ca_name: p.ca.name.clone(),
            issued: now.unix_timestamp(),
            revoked: None,
            group: group.map(str::to_owned),
        };
        let body = serde_json::to_string(&record).map_err(|e| Error::Internal(e.to_string()))?;
        self.store
            .put(
                Collection::IssuedCertificates,
                &format!("{}/{}", id.key(), issued.serial),
                &body,
                Precondition::CreateOnly,
            )
            .await
            .or_internal()?;
        Ok(IssuedCertificate {
            chain,
            serial: issued.serial,
            sha256_thumbprint: issued.sha256_thumbprint,
            not_after,
            ca_name: p.ca.name.clone(),
        })
    }

    /// Every certificate issued to a device, oldest key first.
    async fn issued_to(&self, id: &RegistrationId) -> Result<Vec<StoredIssued>, Error> {
        Ok(self.issued_records(&format!("{}/", id.key())).await?.into_iter().map(|(_, i)| i).collect())
    }

    /// Every issued-certificate record whose key starts with `prefix` (`""`: all), with its key,
    /// a page at a time. A record that does not parse is skipped (and logged): it must not keep a
    /// CRL from being signed.
    async fn issued_records(&self, prefix: &str) -> Result<Vec<(String, StoredIssued)>, Error> {
        const PAGE: u32 = 1000;
        let mut out = Vec::new();
        let mut after = (!prefix.is_empty()).then(|| prefix.to_owned());
        loop {
            let page = self.store.list(Collection::IssuedCertificates, after.as_deref(), PAGE).await.or_internal()?;
            for doc in &page {
                if !doc.id.starts_with(prefix) {
                    return Ok(out);
                }
                match serde_json::from_str(&doc.body) {
                    Ok(i) => out.push((doc.id.clone(), i)),
                    Err(e) => tracing::warn!(key = doc.id, error = %e, "an issued-certificate record is corrupt"),
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => after = Some(last.id.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// When the certificate with `serial` of a device was revoked, if it was.
    ///
    /// # Errors
    /// Store failures.
    pub async fn revoked_at(&self, id: &RegistrationId, serial: &str) -> Result<Option<String>, Error> {
        let doc =
            self.store.get(Collection::IssuedCertificates, &format!("{}/{serial}", id.key())).await.or_internal()?;
        Ok(doc.and_then(|d| serde_json::from_str::<StoredIssued>(&d.body).ok()).and_then(|i| i.revoked))
    }

    /// Marks one record revoked now and stores it; the next CRL request signs a new CRL.
    async fn mark_revoked(&self, key: &str, mut i: StoredIssued) -> Result<(), Error> {
        i.revoked = Some(timefmt::now());
        let body = serde_json::to_string(&i).map_err(|e| Error::Internal(e.to_string()))?;
        self.store.put(Collection::IssuedCertificates, key, &body, Precondition::Any).await.or_internal()?;
        tracing::info!(registration_id = i.registration_id, serial = i.serial, ca = i.ca_name, "certificate revoked");
        self.crls_changed();
        Ok(())
    }

    /// Revokes every unrevoked record of `records` for which `matches` holds; returns how many.
    async fn revoke_where(
        &self,
        records: Vec<(String, StoredIssued)>,
        matches: impl Fn(&StoredIssued) -> bool,
    ) -> Result<usize, Error> {
        let mut n = 0;
        for (key, i) in records {
            if i.revoked.is_none() && matches(&i) {
                self.mark_revoked(&key, i).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Revokes every unrevoked certificate of a device; returns how many.
    ///
    /// # Errors
    /// Store failures.
    pub async fn revoke(&self, id: &RegistrationId) -> Result<usize, Error> {
        self.revoke_where(self.issued_records(&format!("{}/", id.key())).await?, |_| true).await
    }

    /// Revokes one certificate of a device (issued for a registration that did not end
    /// assigned).
    ///
    /// # Errors
    /// Store failures.
    pub async fn revoke_serial(&self, id: &RegistrationId, serial: &str) -> Result<(), Error> {
        let key = format!("{}/{serial}", id.key());
        self.revoke_where(self.issued_records(&key).await?, |i| i.serial == serial).await.map(drop)
    }

    /// Revokes every certificate issued through a group (it was disabled or deleted);
    /// returns how many.
    ///
    /// # Errors
    /// Store failures.
    pub async fn revoke_group(&self, group: &str) -> Result<usize, Error> {
        let of_group = |i: &StoredIssued| i.group.as_deref().is_some_and(|g| g.eq_ignore_ascii_case(group));
        self.revoke_where(self.issued_records("").await?, of_group).await
    }

    /// The CRL of a CA, DER, signed now: every revoked certificate it issued.
    ///
    /// # Errors
    /// `404` for an unknown CA; store or signing failures.
    pub async fn crl(&self, name: &str) -> Result<Arc<Vec<u8>>, Error> {
        let key = name.to_ascii_lowercase();
        if let Some((at, der)) = self.crls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key)
            && at.elapsed() < CRL_REUSE
        {
            return Ok(der.clone());
        }
        let (ca, _) = self.stored_ca(name).await?.ok_or_else(|| not_found("certificate authority", name))?;
        let mut revoked = Vec::new();
        for (_, i) in self.issued_records("").await? {
            if let Some(at) = &i.revoked
                && i.ca_name.eq_ignore_ascii_case(&ca.name)
                && let Ok(at) = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            {
                revoked.push(provisio_pki::issue::Revoked { serial: i.serial, at });
            }
        }
        let now = time::OffsetDateTime::now_utc();
        // CRL numbers must grow: seconds since the epoch do, across nodes too.
        let number = u64::try_from(now.unix_timestamp()).unwrap_or(0);
        let der = Arc::new(
            provisio_pki::issue::crl(
                &CertAndKey { cert_pem: ca.cert_pem, key_pem: ca.key_pem },
                &revoked,
                number,
                CRL_VALIDITY,
                now,
            )
            .map_err(|e| Error::Internal(format!("signing the CRL: {e}")))?,
        );
        // One entry per existing CA: unknown names were refused above.
        self.crls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, (std::time::Instant::now(), der.clone()));
        Ok(der)
    }

    /// Forgets the signed CRLs (a certificate was revoked on this node).
    fn crls_changed(&self) {
        self.crls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

fn not_found(what: &str, name: &str) -> Error {
    Error::NotFound { code: codes::NOT_FOUND, message: format!("No {what} named '{}'.", shorten(name)) }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
    use provisio_proto::{
        device::DeviceRegistration,
        service::{CertificateAuthority, CredentialPolicy},
    };
    use provisio_store::{Collection, SqliteStore, Store};
    use x509_parser::prelude::FromDer;

    use crate::{
        Connection, Credential, DeviceOperation, DeviceRequest, Engine, EngineSettings, Origin, Transport,
        allocation::{AllocationSettings, Assigner},
    };

    const SCOPE: &str = "0ne00000001";

    async fn engine() -> (Engine, crate::service::ServiceApi, Arc<dyn Store>) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let hubs = crate::hubs::Hubs::new(store.clone());
        hubs.seed(&["hub1.example.net".to_owned()], "unused.example").await.unwrap();
        let settings = EngineSettings {
            device_polls_per_10s: 0,
            poll_auth_cache: std::time::Duration::ZERO,
            ..Default::default()
        };
        let engine = Engine::new(
            store.clone(),
            provisio_core::ids::IdScope::parse(SCOPE).unwrap(),
            settings,
            Assigner::new(hubs, AllocationSettings::default()).unwrap(),
        )
        .with_public_url(Some("https://dps.example.net".into()));
        let api = engine.service_api(vec!["localhost".into()], crate::service::ServiceLimits::default());
        (engine, api, store)
    }

    fn csr(cn: &str) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        B64.encode(params.serialize_request(&key).unwrap().der())
    }

    async fn enroll(api: &crate::service::ServiceApi, id: &str, policy: Option<&str>) -> String {
        let mut body = serde_json::json!({"registrationId": id, "attestation": {"type": "symmetricKey"}});
        if let Some(p) = policy {
            body["credentialPolicyName"] = serde_json::json!(p);
        }
        let e = api.put_enrollment(id, serde_json::from_value(body).unwrap(), None).await.unwrap();
        e.attestation.symmetric_key.unwrap().primary_key.unwrap()
    }

    fn token(id: &str, key: &str) -> Credential {
        Credential::Sas(
            provisio_core::sas::build_token(
                &format!("{SCOPE}/registrations/{id}"),
                key,
                crate::engine::unix_now_i64().unsigned_abs() + 600,
                Some("registration"),
                provisio_core::sas::SrEncoding::Raw,
            )
            .unwrap(),
        )
    }

    async fn device(
        engine: &Engine,
        id: &str,
        version: &str,
        operation: DeviceOperation<'_>,
        credential: &Credential,
    ) -> crate::Answer {
        engine
            .device(DeviceRequest {
                origin: Origin::new(Transport::Internal, None),
                scope: SCOPE,
                registration_id: id,
                api_version: Some(version),
                operation,
                credential,
                connection: &Connection::default(),
            })
            .await
    }

    async fn setup_policy(engine: &Engine, limit: u32) {
        let ca = CertificateAuthority {
            name: "fleet".into(),
            certificate: None,
            chain: None,
            private_key: None,
            subject: None,
            sha256_thumbprint: None,
            not_after_utc: None,
            crl_path: None,
            etag: None,
        };
        engine.issuance().put_ca("fleet", ca).await.unwrap();
        let policy = CredentialPolicy {
            name: "devices".into(),
            certificate_authority_name: "fleet".into(),
            validity_in_days: Some(7),
            key_types: None,
            issuance_limit_per_day: Some(limit),
            etag: None,
        };
        engine.issuance().put_policy("devices", policy).await.unwrap();
    }

    #[tokio::test]
    async fn a_registration_with_a_csr_gets_its_certificate_chain_and_its_refusals_store_nothing() {
        let (engine, api, store) = engine().await;
        setup_policy(&engine, 2).await;
        let key = enroll(&api, "dev-1", Some("devices")).await;
        let cred = token("dev-1", &key);
        let req = csr("dev-1");
        let body = serde_json::to_vec(&DeviceRegistration { csr: Some(req.clone()), ..Default::default() }).unwrap();
        let a = device(&engine, "dev-1", "2025-07-01-preview", DeviceOperation::Register { body: &body }, &cred).await;
        assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
        let op: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        let op = op["operationId"].as_str().unwrap().to_owned();
        let a = device(
            &engine,
            "dev-1",
            "2025-07-01-preview",
            DeviceOperation::OperationStatus { operation_id: &op },
            &cred,
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["status"], "assigned", "{v}");
        let chain: Vec<Vec<u8>> = v["registrationState"]["issuedCertificateChain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| B64.decode(c.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(chain.len(), 3, "leaf, issuing CA, root");
        let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&chain[0]).unwrap();
        assert_eq!(leaf.subject().iter_common_name().next().unwrap().as_str().unwrap(), "dev-1");
        assert!(
            provisio_pki::x509::verify_chain(&chain[0], &chain[1..2], &chain[2], time::OffsetDateTime::now_utc())
                .is_ok()
        );
        // The status lookup never shows the chain; the service API shows the certificate.
        let a =
            device(&engine, "dev-1", "2025-07-01-preview", DeviceOperation::RegistrationStatus { body: b"{}" }, &cred)
                .await;
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["status"], "assigned");
        assert!(v.get("issuedCertificateChain").is_none(), "{v}");
        let state = api.get_registration("dev-1").await.unwrap();
        let issued = state.issued_certificate.unwrap();
        assert_eq!(issued.sha256_thumbprint, provisio_pki::x509::sha256_thumbprint(&chain[0]));
        // A csr with the status lookup, or with an api-version before 2025-07-01-preview: 400.
        let with_csr =
            serde_json::to_vec(&DeviceRegistration { csr: Some(req.clone()), ..Default::default() }).unwrap();
        let a = device(
            &engine,
            "dev-1",
            "2025-07-01-preview",
            DeviceOperation::RegistrationStatus { body: &with_csr },
            &cred,
        )
        .await;
        assert_eq!(a.error.map(|e| e.code), Some(400_004));
        let a = device(&engine, "dev-1", "2021-06-01", DeviceOperation::Register { body: &with_csr }, &cred).await;
        assert_eq!(a.error.map(|e| e.code), Some(400_004));
        assert!(String::from_utf8_lossy(&a.body).contains("2025-07-01-preview"));
        // Refusals: the CN of another device, an enrollment without a policy; nothing stored.
        let before = store.count(Collection::IssuedCertificates).await.unwrap();
        let other = csr("dev-2");
        let wrong = serde_json::to_vec(&DeviceRegistration { csr: Some(other), ..Default::default() }).unwrap();
        let a = device(&engine, "dev-1", "2025-07-01-preview", DeviceOperation::Register { body: &wrong }, &cred).await;
        assert_eq!(a.error.map(|e| e.code), Some(400_004));
        assert!(String::from_utf8_lossy(&a.body).contains("is not the registration id"));
        let plain_key = enroll(&api, "dev-3", None).await;
        let own = csr("dev-3");
        let own = serde_json::to_vec(&DeviceRegistration { csr: Some(own), ..Default::default() }).unwrap();
        let a = device(
            &engine,
            "dev-3",
            "2025-07-01-preview",
            DeviceOperation::Register { body: &own },
            &token("dev-3", &plain_key),
        )
        .await;
        assert_eq!(a.error.map(|e| e.code), Some(400_004));
        assert!(String::from_utf8_lossy(&a.body).contains("credentialPolicyName"));
        assert!(store.get(Collection::Registrations, "dev-3").await.unwrap().is_none());
        assert_eq!(store.count(Collection::IssuedCertificates).await.unwrap(), before);
        // A registration without a request still shows the current certificate, without a chain.
        let plain = serde_json::to_vec(&DeviceRegistration::default()).unwrap();
        let a = device(&engine, "dev-1", "2025-07-01-preview", DeviceOperation::Register { body: &plain }, &cred).await;
        let op: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        let op = op["operationId"].as_str().unwrap().to_owned();
        let a = device(
            &engine,
            "dev-1",
            "2025-07-01-preview",
            DeviceOperation::OperationStatus { operation_id: &op },
            &cred,
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["status"], "assigned");
        assert!(v["registrationState"].get("issuedCertificateChain").is_none(), "{v}");
        let kept = api.get_registration("dev-1").await.unwrap().issued_certificate.unwrap();
        assert_eq!(kept.serial_number, issued.serial_number);
        // Renewal issues a new certificate, up to the day's limit (2), then 429.
        let a = device(&engine, "dev-1", "2026-11-01", DeviceOperation::Register { body: &body }, &cred).await;
        assert_eq!(a.status, 202);
        let a = device(&engine, "dev-1", "2026-11-01", DeviceOperation::Register { body: &body }, &cred).await;
        assert_eq!(a.status, 429);
        // Revocation: the CRL lists both.
        let id = provisio_core::ids::RegistrationId::parse("dev-1").unwrap();
        // A CRL (its route needs no credential) is signed once and served again, until a
        // revocation on this node.
        let first = engine.issuance().crl("fleet").await.unwrap();
        assert!(Arc::ptr_eq(&first, &engine.issuance().crl("fleet").await.unwrap()), "served again");
        assert_eq!(engine.issuance().revoke(&id).await.unwrap(), 2);
        assert!(!Arc::ptr_eq(&first, &engine.issuance().crl("fleet").await.unwrap()), "signed anew");
        let crl = engine.issuance().crl("fleet").await.unwrap();
        let (_, list) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
        assert_eq!(list.iter_revoked_certificates().count(), 2);
    }
}
