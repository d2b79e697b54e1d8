//! The service (enrollment) API, independent of HTTP: authorisation with shared access
//! policies and the enrollment and group operations.

use std::{sync::Arc, time::SystemTime};

use provisio_core::{
    ids::{EnrollmentGroupId, RegistrationId},
    model::{Attestation, X509Attestation},
    sas::SasToken,
    timefmt,
};
use provisio_proto::{
    device::RegistrationStatus,
    error::codes,
    service::{DeviceRegistrationState, EnrollmentGroup, IndividualEnrollment},
};
use provisio_store::{Collection, Precondition, Store, StoreError};

use crate::{ServerError, instance::Policy, service_model as model};

/// A right a service operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Read enrollments and groups.
    EnrollmentRead,
    /// Write enrollments and groups.
    EnrollmentWrite,
    /// Read registration states and audit records.
    RegistrationStatusRead,
    /// Change service configuration (certificates).
    ServiceConfig,
}

impl Right {
    /// Policy rights that grant this right (`spec/service-api.md` §2.1).
    fn granted_by(self) -> &'static [&'static str] {
        match self {
            Self::EnrollmentRead => &["EnrollmentRead", "EnrollmentWrite", "ServiceConfig"],
            Self::EnrollmentWrite => &["EnrollmentWrite", "ServiceConfig"],
            Self::RegistrationStatusRead => {
                &["RegistrationStatusRead", "RegistrationStatusWrite", "EnrollmentWrite", "ServiceConfig"]
            }
            Self::ServiceConfig => &["ServiceConfig"],
        }
    }
}

/// The service API.
#[derive(Clone)]
pub struct ServiceApi {
    store: Arc<dyn Store>,
    hostnames: Arc<Vec<String>>,
    skew: u64,
}

/// How a write must relate to the stored version (from `If-Match`).
fn precondition(if_match: Option<&str>) -> Precondition {
    match if_match.map(str::trim) {
        None | Some("") => Precondition::CreateOnly,
        Some("*") => Precondition::Any,
        Some(v) => Precondition::IfMatch(unquote(v).to_owned()),
    }
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v)
}

impl ServiceApi {
    /// A service API over `store`; tokens must name one of `hostnames`.
    #[must_use]
    pub fn new(store: Arc<dyn Store>, hostnames: Vec<String>, skew: u64) -> Self {
        Self { store, hostnames: Arc::new(hostnames), skew }
    }

    /// Checks a service SAS token: the policy named by `skn` signed it (primary or
    /// secondary key), `sr` names this service, it has not expired, and the policy has
    /// `right`.
    ///
    /// # Errors
    /// `401` for a bad token, `403` for a missing right.
    pub async fn authorize(&self, authorization: Option<&str>, right: Right) -> Result<(), ServerError> {
        let refuse = |public: &str, detail: String| ServerError::Unauthorized {
            public: public.into(),
            detail,
            tracking_id: None,
        };
        let raw = authorization.ok_or_else(|| {
            refuse("Unauthorized: the Authorization header is missing.", "service request without Authorization".into())
        })?;
        if raw.trim_start().to_ascii_lowercase().starts_with("bearer ") {
            return Err(refuse(
                "Unauthorized: Microsoft Entra (Bearer) tokens are not supported; use a shared access signature.",
                "bearer token presented".into(),
            ));
        }
        let token = SasToken::parse(raw)?;
        let skn = token.skn.clone().ok_or_else(|| {
            refuse("Unauthorized: the SAS token has no key name (skn).", "service token without skn".into())
        })?;
        let resource = token.sr.trim_end_matches('/').to_ascii_lowercase();
        let host = resource.split('/').next().unwrap_or("");
        let host_no_port =
            host.rsplit_once(':').map_or(host, |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { host });
        if !self.hostnames.iter().any(|h| h.eq_ignore_ascii_case(host_no_port)) {
            return Err(refuse(
                "Unauthorized: the SAS token was issued for another resource than this service.",
                format!("service token sr '{}' names no host of this service {:?}", token.sr, self.hostnames),
            ));
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if token.is_expired(now, self.skew) {
            return Err(refuse(
                "Unauthorized: the SAS token has expired.",
                format!("service token expired at {} (now {now})", token.expiry),
            ));
        }
        let policy: Option<Policy> = match self.store.get(Collection::Policies, &skn.to_ascii_lowercase()).await? {
            Some(d) => serde_json::from_str(&d.body).ok(),
            None => None,
        };
        let Some(policy) = policy else {
            return Err(refuse("Unauthorized", format!("no shared access policy named '{skn}'")));
        };
        let signed = [&policy.primary_key, &policy.secondary_key]
            .into_iter()
            .any(|k| provisio_core::keys::decode_key(k).is_ok_and(|k| token.signed_with(&k)));
        if !signed {
            return Err(refuse("Unauthorized", format!("signature does not match policy '{skn}'")));
        }
        let has = policy
            .rights
            .split(',')
            .map(str::trim)
            .any(|r| right.granted_by().iter().any(|g| g.eq_ignore_ascii_case(r)));
        if !has {
            return Err(ServerError::Forbidden(format!(
                "The shared access policy '{skn}' lacks the {right:?} right this operation needs."
            )));
        }
        Ok(())
    }

    fn store_error(e: StoreError, group: bool, id: &str) -> ServerError {
        let what = if group { "Enrollment group" } else { "Enrollment" };
        match e {
            StoreError::Conflict => ServerError::Conflict(format!(
                "{what} '{id}' already exists. To update it, send If-Match with its etag, or If-Match: *."
            )),
            StoreError::PreconditionFailed => {
                ServerError::PreconditionFailed(format!("{what} '{id}' has changed: the If-Match etag does not match."))
            }
            StoreError::NotFound => Self::not_found(group, id),
            StoreError::Backend(_) => e.into(),
        }
    }

    fn not_found(group: bool, id: &str) -> ServerError {
        if group {
            ServerError::NotFound {
                code: codes::ENROLLMENT_GROUP_NOT_FOUND,
                message: format!("Enrollment group '{id}' was not found."),
            }
        } else {
            ServerError::NotFound {
                code: codes::ENROLLMENT_NOT_FOUND,
                message: format!("Enrollment '{id}' was not found."),
            }
        }
    }

    /// `PUT /enrollments/{id}`.
    ///
    /// # Errors
    /// Invalid body, 409 on create of an existing id, 412 on an etag mismatch.
    pub async fn put_enrollment(
        &self,
        id: &str,
        body: IndividualEnrollment,
        if_match: Option<&str>,
    ) -> Result<IndividualEnrollment, ServerError> {
        let id = RegistrationId::parse(id)?;
        let existing = self.store.get(Collection::Enrollments, id.key()).await?;
        let existing = existing.as_ref().map(model::enrollment_from_doc).transpose()?;
        let now = timefmt::now();
        let enrollment = model::enrollment_from_wire(&id, body, existing.as_ref(), &now)?;
        let doc = self
            .store
            .put(Collection::Enrollments, id.key(), &model::to_body(&enrollment)?, precondition(if_match))
            .await
            .map_err(|e| Self::store_error(e, false, id.as_str()))?;
        Ok(model::enrollment_to_wire(&enrollment, &doc.etag, true, None))
    }

    /// `GET /enrollments/{id}`: keys stripped, with the registration state.
    ///
    /// # Errors
    /// 404 if absent.
    pub async fn get_enrollment(&self, id: &str) -> Result<IndividualEnrollment, ServerError> {
        let id = RegistrationId::parse(id)?;
        let doc = self
            .store
            .get(Collection::Enrollments, id.key())
            .await?
            .ok_or_else(|| Self::not_found(false, id.as_str()))?;
        let enrollment = model::enrollment_from_doc(&doc)?;
        let state = match self.store.get(Collection::Registrations, id.key()).await? {
            Some(r) => model::registration_state_to_wire(&model::record_from_body(&r.body)?, &r.etag),
            None => DeviceRegistrationState {
                registration_id: enrollment.registration_id.clone(),
                created_date_time_utc: None,
                assigned_hub: None,
                device_id: None,
                status: RegistrationStatus::Unassigned,
                substatus: None,
                error_code: None,
                error_message: None,
                last_updated_date_time_utc: None,
                etag: None,
                payload: None,
            },
        };
        Ok(model::enrollment_to_wire(&enrollment, &doc.etag, false, Some(state)))
    }

    /// `DELETE /enrollments/{id}` or `/enrollmentGroups/{id}`.
    ///
    /// # Errors
    /// 404 if absent, 412 on an etag mismatch.
    pub async fn delete(&self, group: bool, id: &str, if_match: Option<&str>) -> Result<(), ServerError> {
        let (collection, key, shown) = if group {
            let g = EnrollmentGroupId::parse(id)?;
            (Collection::EnrollmentGroups, g.key().to_owned(), g.as_str().to_owned())
        } else {
            let r = RegistrationId::parse(id)?;
            (Collection::Enrollments, r.key().to_owned(), r.as_str().to_owned())
        };
        let etag = match if_match.map(str::trim) {
            None | Some("" | "*") => None,
            Some(v) => Some(unquote(v)),
        };
        self.store.delete(collection, &key, etag).await.map_err(|e| Self::store_error(e, group, &shown))
    }

    /// `PUT /enrollmentGroups/{id}`.
    ///
    /// # Errors
    /// Invalid body, 409 on create of an existing id, 412 on an etag mismatch.
    pub async fn put_group(
        &self,
        id: &str,
        body: EnrollmentGroup,
        if_match: Option<&str>,
    ) -> Result<EnrollmentGroup, ServerError> {
        let id = EnrollmentGroupId::parse(id)?;
        let existing = self.store.get(Collection::EnrollmentGroups, id.key()).await?;
        let existing = existing.as_ref().map(model::group_from_doc).transpose()?;
        let now = timefmt::now();
        let group = model::group_from_wire(&id, body, existing.as_ref(), &now)?;
        if let Attestation::X509(X509Attestation::CaReferences(refs)) = &group.attestation {
            for name in refs.iter() {
                if self.store.get(Collection::Certificates, &name.to_ascii_lowercase()).await?.is_none() {
                    return Err(ServerError::invalid(format!(
                        "attestation.x509.caReferences names the CA certificate '{name}', which does not exist; upload it with PUT /certificates/{name}."
                    )));
                }
            }
        }
        let doc = self
            .store
            .put(Collection::EnrollmentGroups, id.key(), &model::to_body(&group)?, precondition(if_match))
            .await
            .map_err(|e| Self::store_error(e, true, id.as_str()))?;
        Ok(model::group_to_wire(&group, &doc.etag, true))
    }

    /// `GET /registrations/{id}/audit`: the last refused attestation of a registration id.
    ///
    /// # Errors
    /// 404 if nothing was refused for this id.
    pub async fn audit(&self, id: &str) -> Result<serde_json::Value, ServerError> {
        let id = RegistrationId::parse(id)?;
        let doc = self.store.get(Collection::Audit, id.key()).await?.ok_or_else(|| ServerError::NotFound {
            code: codes::REGISTRATION_NOT_FOUND,
            message: format!("No refused attestation is recorded for '{id}'."),
        })?;
        serde_json::from_str(&doc.body)
            .map_err(|e| ServerError::Internal(format!("stored audit record is corrupt: {e}")))
    }

    /// `GET /enrollmentGroups/{id}`: keys stripped.
    ///
    /// # Errors
    /// 404 if absent.
    pub async fn get_group(&self, id: &str) -> Result<EnrollmentGroup, ServerError> {
        let id = EnrollmentGroupId::parse(id)?;
        let doc = self
            .store
            .get(Collection::EnrollmentGroups, id.key())
            .await?
            .ok_or_else(|| Self::not_found(true, id.as_str()))?;
        Ok(model::group_to_wire(&model::group_from_doc(&doc)?, &doc.etag, false))
    }
}
