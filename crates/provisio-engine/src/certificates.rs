//! The certificates API: Provisio's equivalent of DPS's management-plane CA certificate
//! operations, with the ARM resource shapes (`spec/service-api.md` §3): upload, list,
//! show, delete, and proof of possession (verification code, then a certificate with
//! that code as CN signed by the CA's key).

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use provisio_core::text::shorten;
use provisio_proto::{
    error::codes,
    service::{CertificateBody, CertificateProperties, CertificateResponse},
};
use provisio_store::{Collection, Document, Precondition, Store};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc2822};

use crate::{Error, Resource, StoreResult};

/// How long a verification code stays valid.
const CODE_LIFETIME_SECS: i64 = 24 * 3600;

/// A stored CA certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCa {
    /// Name as the operator spelled it.
    pub name: String,
    /// DER, base64.
    pub der_base64: String,
    /// Proof of possession done (or asserted on upload).
    pub is_verified: bool,
    /// Created, Unix seconds.
    pub created: i64,
    /// Updated, Unix seconds.
    pub updated: i64,
    /// Outstanding verification code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    /// When the code expires, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_expires: Option<i64>,
}

impl StoredCa {
    /// The certificate's DER.
    ///
    /// # Errors
    /// If the stored base64 is corrupt.
    pub fn der(&self) -> Result<Vec<u8>, Error> {
        B64.decode(&self.der_base64).map_err(|e| Error::Internal(format!("stored certificate is corrupt: {e}")))
    }
}

/// Validates a certificate name: 1–128 of `A-Z a-z 0-9 - . _`.
///
/// # Errors
/// If the name breaks the rule.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "Invalid certificate name '{}': use 1 to 128 letters, digits, '-', '.' or '_'.",
            shorten(name)
        )))
    }
}

fn rfc1123(unix: i64) -> String {
    // ARM shows "Thu, 12 Oct 2017 19:23:50 GMT".
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc2822).ok())
        .map_or_else(String::new, |s| s.replace("+0000", "GMT"))
}

fn pem(der: &[u8]) -> String {
    let b = B64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn resource(name: &str) -> Resource<'_> {
    Resource { kind: "Certificate", id: name, not_found_code: codes::NOT_FOUND }
}

fn if_match_required(if_match: Option<&str>, name: &str) -> Result<Option<String>, Error> {
    match if_match.map(str::trim) {
        None | Some("") => Err(Error::PreconditionFailed(format!(
            "If-Match is required: send the etag of certificate '{name}' (or *)."
        ))),
        Some("*") => Ok(None),
        Some(v) => Ok(Some(v.trim_matches('"').to_owned())),
    }
}

/// The certificates API over a store.
#[derive(Clone)]
pub struct Certificates {
    store: Arc<dyn Store>,
}

impl Certificates {
    /// Certificates kept in `store`.
    #[must_use]
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    fn response(doc: &Document, ca: &StoredCa, with_code: bool) -> Result<CertificateResponse, Error> {
        let der = ca.der()?;
        let info = provisio_pki::x509::cert_info(&der).map_err(|e| Error::Internal(e.to_string()))?;
        let expiry = OffsetDateTime::parse(&info.not_after_utc, &time::format_description::well_known::Rfc3339)
            .map_or_else(|_| info.not_after_utc.clone(), |t| rfc1123(t.unix_timestamp()));
        Ok(CertificateResponse {
            id: format!("/certificates/{}", ca.name),
            name: ca.name.clone(),
            kind: "Microsoft.Devices/ProvisioningServices/Certificates".into(),
            etag: doc.etag.clone(),
            properties: CertificateProperties {
                subject: info.subject_name,
                expiry,
                thumbprint: info.sha1_thumbprint,
                is_verified: ca.is_verified,
                certificate: pem(&der),
                created: rfc1123(ca.created),
                updated: rfc1123(ca.updated),
                verification_code: if with_code { ca.verification_code.clone() } else { None },
            },
        })
    }

    fn parse(doc: &Document) -> Result<StoredCa, Error> {
        serde_json::from_str(&doc.body).map_err(|e| Error::Internal(format!("stored certificate is corrupt: {e}")))
    }

    async fn load(&self, name: &str) -> Result<(Document, StoredCa), Error> {
        check_name(name)?;
        let doc = self
            .store
            .get(Collection::Certificates, &name.to_ascii_lowercase())
            .await
            .or_internal()?
            .ok_or_else(|| resource(name).not_found())?;
        let ca = Self::parse(&doc)?;
        Ok((doc, ca))
    }

    async fn save(&self, ca: &StoredCa, pre: Precondition) -> Result<Document, Error> {
        let body = serde_json::to_string(ca).map_err(|e| Error::Internal(e.to_string()))?;
        self.store
            .put(Collection::Certificates, &ca.name.to_ascii_lowercase(), &body, pre)
            .await
            .about(&resource(&ca.name))
    }

    /// `PUT /certificates/{name}`: upload (or, with `If-Match`, replace) a CA certificate.
    ///
    /// # Errors
    /// Invalid name or certificate, not a CA, 409 / 412.
    pub async fn put(
        &self,
        name: &str,
        body: CertificateBody,
        if_match: Option<&str>,
    ) -> Result<CertificateResponse, Error> {
        check_name(name)?;
        let body = crate::bodies::certificate_body(body);
        let text =
            body.certificate.ok_or_else(|| Error::invalid("The body needs 'certificate' (PEM or base64 DER)."))?;
        let der =
            provisio_pki::x509::decode_cert_text(&text).map_err(|e| Error::invalid(format!("certificate: {e}")))?;
        if !provisio_pki::x509::is_ca(&der).unwrap_or(false) {
            return Err(Error::invalid(
                "certificate is not a CA certificate (basic constraints lack CA:TRUE); upload the root or intermediate CA that signs your devices.",
            ));
        }
        let now = provisio_store::unix_now();
        let pre = match if_match.map(str::trim) {
            None | Some("") => Precondition::CreateOnly,
            Some("*") => Precondition::Any,
            Some(v) => Precondition::IfMatch(v.trim_matches('"').to_owned()),
        };
        let created = match self.store.get(Collection::Certificates, &name.to_ascii_lowercase()).await.or_internal()? {
            Some(d) => Self::parse(&d)?.created,
            None => now,
        };
        let ca = StoredCa {
            name: name.to_owned(),
            der_base64: B64.encode(&der),
            is_verified: body.is_verified.unwrap_or(false),
            created,
            updated: now,
            verification_code: None,
            code_expires: None,
        };
        let doc = self.save(&ca, pre).await?;
        Self::response(&doc, &ca, false)
    }

    /// `GET /certificates/{name}`.
    ///
    /// # Errors
    /// 404.
    pub async fn get(&self, name: &str) -> Result<CertificateResponse, Error> {
        let (doc, ca) = self.load(name).await?;
        Self::response(&doc, &ca, false)
    }

    /// `GET /certificates`: `{"value": [...]}`.
    ///
    /// # Errors
    /// Store failures.
    pub async fn list(&self) -> Result<serde_json::Value, Error> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.list(Collection::Certificates, after.as_deref(), 500).await.or_internal()?;
            for d in &page {
                out.push(Self::response(d, &Self::parse(d)?, false)?);
            }
            match page.last() {
                Some(last) if page.len() == 500 => after = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(serde_json::json!({ "value": out }))
    }

    /// `DELETE /certificates/{name}` (If-Match required, `*` allowed).
    ///
    /// # Errors
    /// 404, 412.
    pub async fn delete(&self, name: &str, if_match: Option<&str>) -> Result<(), Error> {
        check_name(name)?;
        let etag = if_match_required(if_match, name)?;
        self.store
            .delete(Collection::Certificates, &name.to_ascii_lowercase(), etag.as_deref())
            .await
            .about(&resource(name))
    }

    /// `POST /certificates/{name}/generateVerificationCode`.
    ///
    /// # Errors
    /// 404, 412.
    pub async fn generate_verification_code(
        &self,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<CertificateResponse, Error> {
        let etag = if_match_required(if_match, name)?;
        let (_, mut ca) = self.load(name).await?;
        let code: [u8; 24] = rand::random();
        ca.verification_code = Some(code.iter().map(|b| format!("{b:02X}")).collect());
        ca.code_expires = Some(provisio_store::unix_now() + CODE_LIFETIME_SECS);
        ca.updated = provisio_store::unix_now();
        let doc = self.save(&ca, etag.map_or(Precondition::Any, Precondition::IfMatch)).await?;
        Self::response(&doc, &ca, true)
    }

    /// `POST /certificates/{name}/verify`: proof of possession.
    ///
    /// # Errors
    /// 400 with the reason when the certificate does not prove possession; 404, 412.
    pub async fn verify(
        &self,
        name: &str,
        body: CertificateBody,
        if_match: Option<&str>,
    ) -> Result<CertificateResponse, Error> {
        let etag = if_match_required(if_match, name)?;
        let (_, mut ca) = self.load(name).await?;
        let body = crate::bodies::certificate_body(body);
        let text = body.certificate.ok_or_else(|| {
            Error::invalid("The body needs 'certificate': the verification certificate (PEM or base64 DER).")
        })?;
        let ver =
            provisio_pki::x509::decode_cert_text(&text).map_err(|e| Error::invalid(format!("certificate: {e}")))?;
        let now = provisio_store::unix_now();
        let code = match (&ca.verification_code, ca.code_expires) {
            (Some(c), Some(exp)) if exp > now => c.clone(),
            (Some(_), _) => {
                return Err(Error::invalid(format!(
                    "The verification code of '{name}' has expired; generate a new one with POST /certificates/{name}/generateVerificationCode."
                )));
            }
            (None, _) => {
                return Err(Error::invalid(format!(
                    "Certificate '{name}' has no outstanding verification code; generate one with POST /certificates/{name}/generateVerificationCode."
                )));
            }
        };
        let now_t = OffsetDateTime::now_utc();
        provisio_pki::x509::verify_proof_of_possession(&ca.der()?, &ver, &code, now_t)
            .map_err(|e| Error::invalid(format!("Proof of possession failed: {e}.")))?;
        ca.is_verified = true;
        // A code proves possession once.
        ca.verification_code = None;
        ca.code_expires = None;
        ca.updated = now;
        let doc = self.save(&ca, etag.map_or(Precondition::Any, Precondition::IfMatch)).await?;
        tracing::info!(certificate = name, "CA certificate verified by proof of possession");
        Self::response(&doc, &ca, false)
    }

    /// The DER of every verified CA certificate.
    ///
    /// # Errors
    /// Store failures.
    pub async fn verified_ders(&self) -> Result<Vec<Vec<u8>>, Error> {
        let mut out = Vec::new();
        for d in self.store.list(Collection::Certificates, None, 1000).await.or_internal()? {
            let ca = Self::parse(&d)?;
            if ca.is_verified {
                out.push(ca.der()?);
            }
        }
        Ok(out)
    }

    /// A stored CA by name, for attestation.
    ///
    /// # Errors
    /// Store failures.
    pub async fn find(&self, name: &str) -> Result<Option<StoredCa>, Error> {
        match self.store.get(Collection::Certificates, &name.to_ascii_lowercase()).await.or_internal()? {
            Some(d) => Ok(Some(Self::parse(&d)?)),
            None => Ok(None),
        }
    }
}
