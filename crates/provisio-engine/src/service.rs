//! The service (enrollment) API, independent of HTTP: authorisation with shared access
//! policies and the enrollment and group operations.

use std::{sync::Arc, time::SystemTime};

use provisio_core::{
    ids::{EnrollmentGroupId, RegistrationId},
    model::{Attestation, X509Attestation},
    sas::SasToken,
    text::shorten,
    timefmt,
};
use provisio_proto::{
    device::RegistrationStatus,
    error::codes,
    service::{
        AttestationMechanism, BulkOperationError, BulkOperationResult, DeviceRegistrationState, EnrollmentGroup,
        IndividualEnrollment, SharedAccessPolicy,
    },
};
use provisio_store::{Collection, Precondition, Store};

use crate::{Error, Resource, StoreResult, instance::Policy, wire as model};

/// A right a service operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Read enrollments and groups.
    EnrollmentRead,
    /// Write enrollments and groups.
    EnrollmentWrite,
    /// Read registration states and audit records.
    RegistrationStatusRead,
    /// Delete registration states.
    RegistrationStatusWrite,
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
            Self::RegistrationStatusWrite => &["RegistrationStatusWrite", "EnrollmentWrite", "ServiceConfig"],
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
    limits: ServiceLimits,
    /// Authenticated requests per second over the whole service API.
    rate: Arc<crate::limits::RateLimiter>,
    /// Refused tokens per client address.
    refusals: Arc<crate::limits::KeyedWindow>,
    group_cache: Option<Arc<crate::cache::TtlCache<Vec<provisio_core::model::EnrollmentGroup>>>>,
    auth_cache: Option<Arc<crate::cache::AuthCache>>,
    /// What stored webhook URLs may point at.
    webhooks: crate::addresses::AddressPolicy,
    /// Operational certificates, revoked with their enrollment.
    issuance: Option<crate::issuance::Issuance>,
}

/// Which API a request is for: each has its own api-versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Enrollments, groups, registration states, policies, hubs
    /// ([`provisio_proto::SERVICE_API_VERSIONS`]).
    Service,
    /// CA certificates ([`provisio_proto::CERTIFICATE_API_VERSIONS`], which adds the ARM
    /// versions).
    Certificates,
}

impl Api {
    fn versions(self) -> &'static [&'static str] {
        match self {
            Self::Service => provisio_proto::SERVICE_API_VERSIONS,
            Self::Certificates => provisio_proto::CERTIFICATE_API_VERSIONS,
        }
    }
}

/// What a front-end found on a service request that decides whether it may run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceCall<'a> {
    /// The `Authorization` header (a service SAS token).
    pub authorization: Option<&'a str>,
    /// The `api-version` query parameter.
    pub api_version: Option<&'a str>,
    /// The client's address (its refused tokens are counted per address).
    pub peer: Option<std::net::IpAddr>,
}

/// Refused service tokens one address (an IPv6 /64) may present per minute; beyond, its
/// requests get `429` before their token is looked at. Operators with a valid token are not
/// counted, so a stranger's noise cannot lock them out (issue #24, finding 6).
pub const REFUSALS_PER_ADDRESS_PER_MINUTE: usize = 60;

/// Size limits of the service API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Most items in one bulk operation (DPS: 10).
    pub max_bulk_items: usize,
    /// Default query page size.
    pub default_page_size: u32,
    /// Largest query page size.
    pub max_page_size: u32,
    /// Requests per second (bursts to twice that); 0: no limit.
    pub requests_per_second: u32,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self { max_bulk_items: 10, default_page_size: 100, max_page_size: 1000, requests_per_second: 0 }
    }
}

/// What a query lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryTarget {
    /// `POST /enrollments/query`.
    Enrollments,
    /// `POST /enrollmentGroups/query`.
    EnrollmentGroups,
    /// `POST /registrations/{groupId}/query`.
    GroupRegistrations(String),
}

impl QueryTarget {
    /// The `x-ms-item-type` header value.
    #[must_use]
    pub fn item_type(&self) -> &'static str {
        match self {
            Self::Enrollments => "Enrollment",
            Self::EnrollmentGroups => "EnrollmentGroup",
            Self::GroupRegistrations(_) => "DeviceRegistration",
        }
    }
}

/// One page of query results.
#[derive(Debug, Clone)]
pub struct QueryPage {
    /// Items (JSON values of the target's wire type).
    pub items: Vec<serde_json::Value>,
    /// Token for the next page; `None` on the last page.
    pub continuation: Option<String>,
}

/// Checks a bulk operation body (`{"mode": …, "enrollments"|"enrollmentGroups": [...]}`)
/// and returns its mode and items.
///
/// # Errors
/// 400 for a missing or unknown mode, a missing array or more than `max_items` items.
pub fn bulk_request(
    group: bool,
    body: &serde_json::Value,
    max_items: usize,
) -> Result<(&str, &[serde_json::Value]), Error> {
    let mode = body.get("mode").and_then(|m| m.as_str()).ok_or_else(|| {
        Error::invalid("The bulk operation needs 'mode': create, update, updateIfMatchETag or delete.")
    })?;
    let list_field = if group { "enrollmentGroups" } else { "enrollments" };
    let items = body
        .get(list_field)
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::invalid(format!("The bulk operation needs '{list_field}': an array.")))?;
    if items.len() > max_items {
        return Err(Error::invalid(format!(
            "A bulk operation takes at most {max_items} items; this one has {}.",
            items.len()
        )));
    }
    if !matches!(mode, "create" | "update" | "updateIfMatchETag" | "delete") {
        return Err(Error::invalid(format!(
            "Unknown bulk mode '{}'; expected create, update, updateIfMatchETag or delete.",
            shorten(mode)
        )));
    }
    Ok((mode, items))
}

/// Accepts `SELECT *` with an optional `FROM <name>`, in any case; DPS has no filters.
///
/// # Errors
/// 400 for any other query.
pub fn check_query(q: &str) -> Result<(), Error> {
    let words: Vec<String> = q.split_whitespace().map(str::to_ascii_lowercase).collect();
    let ok = match words.as_slice() {
        [] => true,
        [select, star] => select == "select" && star == "*",
        [select, star, from, name] => {
            select == "select"
                && star == "*"
                && from == "from"
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "Unsupported query '{}': only 'SELECT *' with an optional 'FROM <collection>' is supported (DPS has no WHERE filter).",
            shorten(q)
        )))
    }
}

/// How a write must relate to the stored version (from `If-Match`).
fn precondition(if_match: Option<&str>) -> Precondition {
    match if_match.map(str::trim) {
        None | Some("") => Precondition::CreateOnly,
        Some("*") => Precondition::Any,
        Some(v) => Precondition::IfMatch(unquote(v).to_owned()),
    }
}

/// The etag a `DELETE` must match: none for an absent or `*` `If-Match`.
fn delete_condition(if_match: Option<&str>) -> Option<&str> {
    match if_match.map(str::trim) {
        None | Some("" | "*") => None,
        Some(v) => Some(unquote(v)),
    }
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v)
}

impl ServiceApi {
    /// A service API over `store`; tokens must name one of `hostnames`.
    #[must_use]
    pub fn new(store: Arc<dyn Store>, hostnames: Vec<String>, skew: u64) -> Self {
        Self {
            store,
            hostnames: Arc::new(hostnames),
            skew,
            limits: ServiceLimits::default(),
            rate: Arc::new(crate::limits::RateLimiter::new(0)),
            refusals: Arc::new(crate::limits::KeyedWindow::new(
                REFUSALS_PER_ADDRESS_PER_MINUTE,
                std::time::Duration::from_secs(60),
            )),
            group_cache: None,
            auth_cache: None,
            issuance: None,
            webhooks: crate::addresses::AddressPolicy::default(),
        }
    }

    /// Refuses custom allocation webhook URLs that these rules would never call (the call
    /// itself checks again, after resolving the host).
    #[must_use]
    pub fn with_webhook_addresses(mut self, a: crate::addresses::AddressPolicy) -> Self {
        self.webhooks = a;
        self
    }

    /// A clear 400 for a webhook URL that can never be called.
    fn check_webhook(&self, settings: &provisio_core::model::EnrollmentSettings) -> Result<(), Error> {
        match &settings.custom_allocation {
            Some(c) => self
                .webhooks
                .check_stored(&c.webhook_url)
                .map_err(|why| Error::invalid(format!("customAllocationDefinition.webhookUrl {why}."))),
            None => Ok(()),
        }
    }

    /// Invalidates the engine's group cache on every group write.
    #[must_use]
    pub fn with_group_cache(
        mut self,
        c: Arc<crate::cache::TtlCache<Vec<provisio_core::model::EnrollmentGroup>>>,
    ) -> Self {
        self.group_cache = Some(c);
        self
    }

    /// Clears the engine's cache of proven credentials on every enrollment write.
    #[must_use]
    pub fn with_auth_cache(mut self, c: Arc<crate::cache::AuthCache>) -> Self {
        self.auth_cache = Some(c);
        self
    }

    /// Revokes operational certificates when their enrollment is disabled or deleted.
    #[must_use]
    pub fn with_issuance(mut self, i: crate::issuance::Issuance) -> Self {
        self.issuance = Some(i);
        self
    }

    /// Revokes the certificates of an enrollment (or every device of a group) that was
    /// disabled or deleted (issue #26).
    async fn revoke_for(&self, group: bool, id: &str) -> Result<(), Error> {
        let Some(issuance) = &self.issuance else { return Ok(()) };
        let n =
            if group { issuance.revoke_group(id).await? } else { issuance.revoke(&RegistrationId::parse(id)?).await? };
        if n > 0 {
            tracing::info!(enrollment = id, group, revoked = n, "certificates revoked with their enrollment");
        }
        Ok(())
    }

    fn groups_changed(&self) {
        if let Some(c) = &self.group_cache {
            c.invalidate();
        }
        self.enrollments_changed();
    }

    fn enrollments_changed(&self) {
        if let Some(c) = &self.auth_cache {
            c.clear();
        }
    }

    /// Replaces the size limits.
    #[must_use]
    pub fn with_limits(mut self, limits: ServiceLimits) -> Self {
        self.limits = limits;
        self.rate = Arc::new(crate::limits::RateLimiter::new(limits.requests_per_second));
        self
    }

    /// Whether a request may run: its address's refused tokens, its `api-version` (as
    /// [`crate::device::check_api_version`] checks every version), its token
    /// ([`ServiceApi::authorize_token`]), then the service API's rate. The rate is charged
    /// only once the token is proven: requests without one used to drain it and lock the
    /// operators out.
    ///
    /// # Errors
    /// `429` over the address's refusals or the rate, `400` for the version, `401` / `403`
    /// for the token.
    pub async fn authorize(&self, call: &ServiceCall<'_>, api: Api, right: Right) -> Result<(), Error> {
        let address = call.peer.map(crate::limits::address_key);
        if let Some(a) = &address {
            self.refusals.check(a).map_err(|wait| Error::Throttled(wait.as_secs().max(1)))?;
        }
        crate::device::check_api_version(api.versions(), call.api_version)?;
        if let Err(e) = self.authorize_token(call.authorization, right).await {
            if e.status() == 401
                && let Some(a) = &address
            {
                let _ = self.refusals.hit(a);
            }
            return Err(e);
        }
        self.rate.acquire().map_err(|wait| Error::Throttled(wait.as_secs().max(1)))
    }

    /// Checks a service SAS token: the policy named by `skn` signed it (primary or
    /// secondary key), `sr` names this service, it has not expired, and the policy has
    /// `right`.
    ///
    /// # Errors
    /// `401` for a bad token, `403` for a missing right.
    pub async fn authorize_token(&self, authorization: Option<&str>, right: Right) -> Result<(), Error> {
        let refuse =
            |public: &str, detail: String| Error::Unauthorized { public: public.into(), detail, tracking_id: None };
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
        let policy: Option<Policy> =
            match self.store.get(Collection::Policies, &skn.to_ascii_lowercase()).await.or_internal()? {
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
            return Err(Error::Forbidden(format!(
                "The shared access policy '{skn}' lacks the {right:?} right this operation needs."
            )));
        }
        Ok(())
    }

    fn resource(group: bool, id: &str) -> Resource<'_> {
        if group {
            Resource { kind: "Enrollment group", id, not_found_code: codes::ENROLLMENT_GROUP_NOT_FOUND }
        } else {
            Resource { kind: "Enrollment", id, not_found_code: codes::ENROLLMENT_NOT_FOUND }
        }
    }

    fn not_found(group: bool, id: &str) -> Error {
        Self::resource(group, id).not_found()
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
    ) -> Result<IndividualEnrollment, Error> {
        let id = RegistrationId::parse(id)?;
        let existing = self.store.get(Collection::Enrollments, id.key()).await.or_internal()?;
        let existing = existing.as_ref().map(model::enrollment_from_doc).transpose()?;
        let now = timefmt::now();
        let enrollment = model::enrollment_from_wire(&id, body, existing.as_ref(), &now)?;
        self.check_webhook(&enrollment.settings)?;
        let doc = self
            .store
            .put(Collection::Enrollments, id.key(), &model::to_body(&enrollment)?, precondition(if_match))
            .await
            .about(&Self::resource(false, id.as_str()))?;
        self.enrollments_changed();
        if !enrollment.settings.enabled {
            self.revoke_for(false, id.as_str()).await?;
        }
        Ok(model::enrollment_to_wire(&enrollment, &doc.etag, true, None))
    }

    /// `GET /enrollments/{id}`: keys stripped, with the registration state.
    ///
    /// # Errors
    /// 404 if absent.
    pub async fn get_enrollment(&self, id: &str) -> Result<IndividualEnrollment, Error> {
        let id = RegistrationId::parse(id)?;
        let doc = self
            .store
            .get(Collection::Enrollments, id.key())
            .await
            .or_internal()?
            .ok_or_else(|| Self::not_found(false, id.as_str()))?;
        let enrollment = model::enrollment_from_doc(&doc)?;
        let state = match self.store.get(Collection::Registrations, id.key()).await.or_internal()? {
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
                initial_twin: None,
                issued_certificate: None,
            },
        };
        Ok(model::enrollment_to_wire(&enrollment, &doc.etag, false, Some(state)))
    }

    /// `DELETE /enrollments/{id}` or `/enrollmentGroups/{id}`.
    ///
    /// # Errors
    /// 404 if absent, 412 on an etag mismatch.
    pub async fn delete(&self, group: bool, id: &str, if_match: Option<&str>) -> Result<(), Error> {
        let (collection, key, shown) = if group {
            let g = EnrollmentGroupId::parse(id)?;
            (Collection::EnrollmentGroups, g.key().to_owned(), g.as_str().to_owned())
        } else {
            let r = RegistrationId::parse(id)?;
            (Collection::Enrollments, r.key().to_owned(), r.as_str().to_owned())
        };
        let etag = delete_condition(if_match);
        self.store.delete(collection, &key, etag).await.about(&Self::resource(group, &shown))?;
        if group {
            self.groups_changed();
        } else {
            self.enrollments_changed();
        }
        self.revoke_for(group, &shown).await
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
    ) -> Result<EnrollmentGroup, Error> {
        let id = EnrollmentGroupId::parse(id)?;
        let existing = self.store.get(Collection::EnrollmentGroups, id.key()).await.or_internal()?;
        let existing = existing.as_ref().map(model::group_from_doc).transpose()?;
        let now = timefmt::now();
        let group = model::group_from_wire(&id, body, existing.as_ref(), &now)?;
        self.check_webhook(&group.settings)?;
        if let Attestation::X509(X509Attestation::CaReferences(refs)) = &group.attestation {
            for name in refs.iter() {
                if self.store.get(Collection::Certificates, &name.to_ascii_lowercase()).await.or_internal()?.is_none() {
                    return Err(Error::invalid(format!(
                        "attestation.x509.caReferences names the CA certificate '{name}', which does not exist; upload it with PUT /certificates/{name}."
                    )));
                }
            }
        }
        let doc = self
            .store
            .put(Collection::EnrollmentGroups, id.key(), &model::to_body(&group)?, precondition(if_match))
            .await
            .about(&Self::resource(true, id.as_str()))?;
        self.groups_changed();
        if !group.settings.enabled {
            self.revoke_for(true, id.as_str()).await?;
        }
        Ok(model::group_to_wire(&group, &doc.etag, true))
    }

    /// `POST /enrollments/{id}/attestationmechanism` (and the group twin): with secrets.
    ///
    /// # Errors
    /// 404 if absent.
    pub async fn attestation_mechanism(&self, group: bool, id: &str) -> Result<AttestationMechanism, Error> {
        if group {
            let g = EnrollmentGroupId::parse(id)?;
            let doc = self
                .store
                .get(Collection::EnrollmentGroups, g.key())
                .await
                .or_internal()?
                .ok_or_else(|| Self::not_found(true, g.as_str()))?;
            Ok(model::attestation_to_wire(&model::group_from_doc(&doc)?.attestation, true))
        } else {
            let r = RegistrationId::parse(id)?;
            let doc = self
                .store
                .get(Collection::Enrollments, r.key())
                .await
                .or_internal()?
                .ok_or_else(|| Self::not_found(false, r.as_str()))?;
            Ok(model::attestation_to_wire(&model::enrollment_from_doc(&doc)?.attestation, true))
        }
    }

    /// `POST /enrollments` / `POST /enrollmentGroups`: a bulk operation, item by item.
    ///
    /// # Errors
    /// 400 for a malformed request or too many items; per-item failures are in the result.
    pub async fn bulk(&self, group: bool, body: &serde_json::Value) -> Result<BulkOperationResult, Error> {
        let (mode, items) = bulk_request(group, body, self.limits.max_bulk_items)?;
        let id_field = if group { "enrollmentGroupId" } else { "registrationId" };
        let mut errors = Vec::new();
        for item in items {
            let id = item.get(id_field).and_then(|v| v.as_str()).unwrap_or("").to_owned();
            let etag = item.get("etag").and_then(|v| v.as_str()).map(str::to_owned);
            let outcome = self.bulk_item(group, mode, &id, etag.as_deref(), item).await;
            if let Err(e) = outcome {
                let (registration_id, enrollment_group_id) = if group { (None, Some(id)) } else { (Some(id), None) };
                errors.push(BulkOperationError {
                    registration_id,
                    enrollment_group_id,
                    error_code: e.code(),
                    error_status: e.to_string(),
                });
            }
        }
        Ok(BulkOperationResult { is_successful: errors.is_empty(), errors })
    }

    async fn bulk_item(
        &self,
        group: bool,
        mode: &str,
        id: &str,
        etag: Option<&str>,
        item: &serde_json::Value,
    ) -> Result<(), Error> {
        if id.is_empty() {
            return Err(Error::invalid(format!(
                "The item has no {}.",
                if group { "enrollmentGroupId" } else { "registrationId" }
            )));
        }
        // DPS's recorded behaviour: "update" without an etag acts like PUT without If-Match.
        let if_match = match (mode, etag) {
            ("create", _) | ("update", None) => None,
            ("update" | "updateIfMatchETag" | "delete", Some(e)) => Some(e),
            ("updateIfMatchETag", None) => {
                return Err(Error::PreconditionFailed("updateIfMatchETag needs the item's etag.".into()));
            }
            _ => None,
        };
        if mode == "delete" {
            return self.delete(group, id, if_match).await;
        }
        let parse_err = |e: serde_json::Error| Error::malformed(format!("The item is not valid: {e}"));
        if group {
            let g: EnrollmentGroup = serde_json::from_value(item.clone()).map_err(parse_err)?;
            self.put_group(id, g, if_match).await.map(|_| ())
        } else {
            let e: IndividualEnrollment = serde_json::from_value(item.clone()).map_err(parse_err)?;
            self.put_enrollment(id, e, if_match).await.map(|_| ())
        }
    }

    /// A query page. `continuation` is the token of the previous page.
    ///
    /// # Errors
    /// 400 for an unsupported query or a bad token; 404 for an unknown group.
    pub async fn query(
        &self,
        target: &QueryTarget,
        query: Option<&str>,
        page_size: Option<u32>,
        continuation: Option<&str>,
    ) -> Result<QueryPage, Error> {
        if let Some(q) = query {
            check_query(q)?;
        }
        let size = page_size.unwrap_or(self.limits.default_page_size).clamp(1, self.limits.max_page_size);
        let after = match continuation.map(str::trim).filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => Some(
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| Error::invalid("The x-ms-continuation token is not one this server issued."))?,
            ),
        };
        // One extra row tells whether another page exists.
        let mut docs = match target {
            QueryTarget::Enrollments => {
                self.store.list(Collection::Enrollments, after.as_deref(), size + 1).await.or_internal()?
            }
            QueryTarget::EnrollmentGroups => {
                self.store.list(Collection::EnrollmentGroups, after.as_deref(), size + 1).await.or_internal()?
            }
            QueryTarget::GroupRegistrations(g) => {
                let g = EnrollmentGroupId::parse(g)?;
                if self.store.get(Collection::EnrollmentGroups, g.key()).await.or_internal()?.is_none()
                    && after.is_none()
                {
                    // Orphaned records of a deleted group are still listed, as in DPS; an id
                    // that never had any is reported as unknown.
                    let any =
                        self.store.list_by_tag(Collection::Registrations, g.key(), None, 1).await.or_internal()?;
                    if any.is_empty() {
                        return Err(Self::not_found(true, g.as_str()));
                    }
                }
                self.store
                    .list_by_tag(Collection::Registrations, g.key(), after.as_deref(), size + 1)
                    .await
                    .or_internal()?
            }
        };
        let more = docs.len() > size as usize;
        docs.truncate(size as usize);
        let continuation = if more {
            docs.last()
                .map(|d| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, d.id.as_bytes()))
        } else {
            None
        };
        let to_value = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| Error::Internal(e.to_string()));
        let mut items = Vec::with_capacity(docs.len());
        for d in &docs {
            items.push(match target {
                QueryTarget::Enrollments => to_value(serde_json::to_value(model::enrollment_to_wire(
                    &model::enrollment_from_doc(d)?,
                    &d.etag,
                    false,
                    None,
                )))?,
                QueryTarget::EnrollmentGroups => {
                    to_value(serde_json::to_value(model::group_to_wire(&model::group_from_doc(d)?, &d.etag, false)))?
                }
                QueryTarget::GroupRegistrations(_) => to_value(serde_json::to_value(
                    model::registration_state_to_wire(&model::record_from_body(&d.body)?, &d.etag),
                ))?,
            });
        }
        Ok(QueryPage { items, continuation })
    }

    /// `GET /registrations/{id}`.
    ///
    /// # Errors
    /// 404 if the device has no registration state.
    pub async fn get_registration(&self, id: &str) -> Result<DeviceRegistrationState, Error> {
        let id = RegistrationId::parse(id)?;
        let doc = self.store.get(Collection::Registrations, id.key()).await.or_internal()?.ok_or_else(|| {
            Error::NotFound {
                code: codes::REGISTRATION_NOT_FOUND,
                message: format!("Registration '{id}' was not found."),
            }
        })?;
        let mut state = model::registration_state_to_wire(&model::record_from_body(&doc.body)?, &doc.etag);
        if let (Some(c), Some(issuance)) = (state.issued_certificate.as_mut(), &self.issuance) {
            c.revoked_date_time_utc = issuance.revoked_at(&id, &c.serial_number).await?;
        }
        Ok(state)
    }

    /// `DELETE /registrations/{id}`: removes the DPS record only (not the hub device), and
    /// revokes the device's operational certificates (issue #26).
    ///
    /// # Errors
    /// 404, 412.
    pub async fn delete_registration(&self, id: &str, if_match: Option<&str>) -> Result<(), Error> {
        let id = RegistrationId::parse(id)?;
        let etag = delete_condition(if_match);
        self.store.delete(Collection::Registrations, id.key(), etag).await.about(&Resource {
            kind: "Registration",
            id: id.as_str(),
            not_found_code: codes::REGISTRATION_NOT_FOUND,
        })?;
        self.revoke_for(false, id.as_str()).await
    }

    /// `POST /registrations/{id}/revokeCertificates`: revokes every certificate issued to the
    /// device; returns how many. An id without a registration record is a 404, as GET would
    /// answer; one whose certificates were all revoked already revokes 0.
    ///
    /// # Errors
    /// 404; store failures.
    pub async fn revoke_certificates(&self, id: &str) -> Result<usize, Error> {
        let rid = RegistrationId::parse(id)?;
        let revoked = match &self.issuance {
            Some(issuance) => issuance.revoke(&rid).await?,
            None => 0,
        };
        if revoked == 0 {
            self.get_registration(id).await?;
        }
        Ok(revoked)
    }

    /// `GET /policies`: every shared access policy, with keys.
    ///
    /// # Errors
    /// Store failures.
    pub async fn list_policies(&self) -> Result<Vec<SharedAccessPolicy>, Error> {
        let docs = self.store.list(Collection::Policies, None, 1000).await.or_internal()?;
        docs.iter().map(|d| Ok(policy_to_wire(&parse_policy(&d.body)?))).collect()
    }

    /// `GET /policies/{name}`.
    ///
    /// # Errors
    /// 404.
    pub async fn get_policy(&self, name: &str) -> Result<SharedAccessPolicy, Error> {
        check_policy_name(name)?;
        let doc = self
            .store
            .get(Collection::Policies, &name.to_ascii_lowercase())
            .await
            .or_internal()?
            .ok_or_else(|| policy(name).not_found())?;
        Ok(policy_to_wire(&parse_policy(&doc.body)?))
    }

    /// `PUT /policies/{name}`: creates a policy (keys generated unless given) or changes
    /// its rights (keys kept unless given).
    ///
    /// # Errors
    /// 400 for an unknown right or a bad key; 400 when the change would leave no policy
    /// with `ServiceConfig`.
    pub async fn put_policy(&self, name: &str, body: SharedAccessPolicy) -> Result<SharedAccessPolicy, Error> {
        check_policy_name(name)?;
        if !body.key_name.is_empty() && !body.key_name.eq_ignore_ascii_case(name) {
            return Err(Error::invalid("The body's keyName does not match the name in the path."));
        }
        let rights = normalize_rights(&body.rights)?;
        let existing = match self.store.get(Collection::Policies, &name.to_ascii_lowercase()).await.or_internal()? {
            Some(d) => Some(parse_policy(&d.body)?),
            None => None,
        };
        let key = |given: Option<String>, old: Option<&String>, field: &str| -> Result<String, Error> {
            match given.filter(|k| !k.trim().is_empty()) {
                Some(k) => {
                    provisio_core::keys::decode_key(&k).map_err(|e| Error::invalid(format!("{field}: {e}")))?;
                    Ok(k.trim().to_owned())
                }
                None => Ok(old.cloned().unwrap_or_else(provisio_core::keys::generate_key)),
            }
        };
        let policy = Policy {
            key_name: existing.as_ref().map_or_else(|| name.to_owned(), |p| p.key_name.clone()),
            primary_key: key(body.primary_key, existing.as_ref().map(|p| &p.primary_key), "primaryKey")?,
            secondary_key: key(body.secondary_key, existing.as_ref().map(|p| &p.secondary_key), "secondaryKey")?,
            rights,
        };
        if !policy.rights.contains("ServiceConfig") {
            self.ensure_other_admin(name).await?;
        }
        let body = serde_json::to_string(&policy).map_err(|e| Error::Internal(e.to_string()))?;
        self.store
            .put(Collection::Policies, &name.to_ascii_lowercase(), &body, Precondition::Any)
            .await
            .or_internal()?;
        tracing::info!(policy = name, rights = %policy.rights, "shared access policy written");
        Ok(policy_to_wire(&policy))
    }

    /// `DELETE /policies/{name}`.
    ///
    /// # Errors
    /// 404; 400 when it is the last policy with `ServiceConfig`.
    pub async fn delete_policy(&self, name: &str) -> Result<(), Error> {
        check_policy_name(name)?;
        self.ensure_other_admin(name).await?;
        self.store.delete(Collection::Policies, &name.to_ascii_lowercase(), None).await.about(&policy(name))?;
        tracing::info!(policy = name, "shared access policy removed");
        Ok(())
    }

    /// `POST /policies/{name}/regenerateKey`, body `{"keyType": "primary"|"secondary"}`.
    ///
    /// # Errors
    /// 404; 400 for an unknown key type.
    pub async fn regenerate_policy_key(&self, name: &str, key_type: &str) -> Result<SharedAccessPolicy, Error> {
        check_policy_name(name)?;
        let doc = self
            .store
            .get(Collection::Policies, &name.to_ascii_lowercase())
            .await
            .or_internal()?
            .ok_or_else(|| policy(name).not_found())?;
        let mut p = parse_policy(&doc.body)?;
        match key_type.to_ascii_lowercase().as_str() {
            "primary" => p.primary_key = provisio_core::keys::generate_key(),
            "secondary" => p.secondary_key = provisio_core::keys::generate_key(),
            _ => return Err(Error::invalid("keyType must be 'primary' or 'secondary'.")),
        }
        let body = serde_json::to_string(&p).map_err(|e| Error::Internal(e.to_string()))?;
        self.store
            .put(Collection::Policies, &name.to_ascii_lowercase(), &body, Precondition::IfMatch(doc.etag))
            .await
            .about(&policy(name))?;
        tracing::info!(policy = name, key_type, "shared access policy key regenerated");
        Ok(policy_to_wire(&p))
    }

    /// Refuses a change that would leave no policy with `ServiceConfig` besides `name`.
    async fn ensure_other_admin(&self, name: &str) -> Result<(), Error> {
        let others = self.store.list(Collection::Policies, None, 1000).await.or_internal()?;
        let has_admin = others
            .iter()
            .filter(|d| !d.id.eq_ignore_ascii_case(name))
            .any(|d| parse_policy(&d.body).is_ok_and(|p| p.rights.split(',').any(|r| r.trim() == "ServiceConfig")));
        if has_admin {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "Policy '{name}' is the last one with ServiceConfig; removing that right would lock every operator out."
            )))
        }
    }

    /// `GET /registrations/{id}/audit`: the last refused X.509 attestation of a registration
    /// id, with `refusals`, the newest refusal of each of its last few certificates (see
    /// the engine's refusal records: only certificates whose CN is the id are recorded).
    ///
    /// # Errors
    /// 404 if nothing was refused for this id.
    pub async fn audit(&self, id: &str) -> Result<serde_json::Value, Error> {
        let id = RegistrationId::parse(id)?;
        let doc = self.store.get(Collection::Audit, id.key()).await.or_internal()?.ok_or_else(|| Error::NotFound {
            code: codes::REGISTRATION_NOT_FOUND,
            message: format!("No refused attestation is recorded for '{id}'."),
        })?;
        serde_json::from_str(&doc.body).map_err(|e| Error::Internal(format!("stored audit record is corrupt: {e}")))
    }

    /// Signs in as policy `name` with one of its keys (compared in constant time).
    ///
    /// # Errors
    /// `401` for an unknown policy or a wrong key (the same answer for both).
    pub async fn sign_in(&self, name: &str, key: &str) -> Result<Caller, Error> {
        let refused = |detail: String| Error::Unauthorized {
            public: "Unauthorized: the policy name or key is not right.".into(),
            detail,
            tracking_id: None,
        };
        let policy = match self.store.get(Collection::Policies, &name.to_ascii_lowercase()).await.or_internal()? {
            Some(d) => parse_policy(&d.body)?,
            None => return Err(refused(format!("sign-in as unknown policy '{}'", shorten(name)))),
        };
        let given = provisio_core::keys::decode_key(key).unwrap_or_default();
        let matches = [&policy.primary_key, &policy.secondary_key].into_iter().any(|k| {
            provisio_core::keys::decode_key(k)
                .is_ok_and(|k| aws_lc_rs::constant_time::verify_slices_are_equal(&k, &given).is_ok())
        });
        if given.is_empty() || !matches {
            return Err(refused(format!("sign-in as policy '{}' with a key that is not its", policy.key_name)));
        }
        Ok(Caller { key_fingerprint: key_fingerprint(&policy), policy: policy.key_name, rights: policy.rights })
    }

    /// The caller of a session signed in as policy `name` when its keys had `fingerprint`.
    ///
    /// # Errors
    /// `401` when the policy is gone or a key was regenerated since (the session ends).
    pub async fn caller(&self, name: &str, fingerprint: &str) -> Result<Caller, Error> {
        let ended = |detail: String| Error::Unauthorized {
            public: "Unauthorized: the session has ended; sign in again.".into(),
            detail,
            tracking_id: None,
        };
        let policy = match self.store.get(Collection::Policies, &name.to_ascii_lowercase()).await.or_internal()? {
            Some(d) => parse_policy(&d.body)?,
            None => return Err(ended(format!("the session's policy '{}' was removed", shorten(name)))),
        };
        let current = key_fingerprint(&policy);
        if aws_lc_rs::constant_time::verify_slices_are_equal(current.as_bytes(), fingerprint.as_bytes()).is_err() {
            return Err(ended(format!("a key of the session's policy '{}' was regenerated", policy.key_name)));
        }
        Ok(Caller { key_fingerprint: current, policy: policy.key_name, rights: policy.rights })
    }

    /// The numbers of the console's overview, counted in the store.
    ///
    /// # Errors
    /// Store failures.
    pub async fn counts(&self) -> Result<Counts, Error> {
        Ok(Counts {
            enrollments: self.store.count(Collection::Enrollments).await.or_internal()?,
            groups: self.store.count(Collection::EnrollmentGroups).await.or_internal()?,
            registrations: self.store.count(Collection::Registrations).await.or_internal()?,
            registrations_by_status: self.store.count_by_state(Collection::Registrations).await.or_internal()?,
        })
    }

    /// Individual enrollments whose registration id starts with `prefix` (any case), after
    /// `after` (a key from the previous page), at most `limit`, keys stripped: paged in
    /// the store, however many there are.
    ///
    /// # Errors
    /// Store failures.
    pub async fn search_enrollments(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<IndividualEnrollment>, Error> {
        let docs = self.search(Collection::Enrollments, prefix, after, limit).await?;
        docs.iter()
            .map(|d| Ok(model::enrollment_to_wire(&model::enrollment_from_doc(d)?, &d.etag, false, None)))
            .collect()
    }

    /// Enrollment groups whose id starts with `prefix`, as [`ServiceApi::search_enrollments`].
    ///
    /// # Errors
    /// Store failures.
    pub async fn search_groups(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EnrollmentGroup>, Error> {
        let docs = self.search(Collection::EnrollmentGroups, prefix, after, limit).await?;
        docs.iter().map(|d| Ok(model::group_to_wire(&model::group_from_doc(d)?, &d.etag, false))).collect()
    }

    /// Registration records whose registration id starts with `prefix`, as
    /// [`ServiceApi::search_enrollments`].
    ///
    /// # Errors
    /// Store failures.
    pub async fn search_registrations(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeviceRegistrationState>, Error> {
        let docs = self.search(Collection::Registrations, prefix, after, limit).await?;
        docs.iter()
            .map(|d| Ok(model::registration_state_to_wire(&model::record_from_body(&d.body)?, &d.etag)))
            .collect()
    }

    async fn search(
        &self,
        c: Collection,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<provisio_store::Document>, Error> {
        // Stored keys are case-folded ids.
        let prefix = prefix.trim().to_ascii_lowercase();
        let after = after.map(str::to_ascii_lowercase);
        let limit = limit.clamp(1, self.limits.max_page_size);
        self.store.list_prefix(c, &prefix, after.as_deref(), limit).await.or_internal()
    }

    /// `GET /enrollmentGroups/{id}`: keys stripped.
    ///
    /// # Errors
    /// 404 if absent.
    pub async fn get_group(&self, id: &str) -> Result<EnrollmentGroup, Error> {
        let id = EnrollmentGroupId::parse(id)?;
        let doc = self
            .store
            .get(Collection::EnrollmentGroups, id.key())
            .await
            .or_internal()?
            .ok_or_else(|| Self::not_found(true, id.as_str()))?;
        Ok(model::group_to_wire(&model::group_from_doc(&doc)?, &doc.etag, false))
    }
}

/// Who acts through a signed-in session (the web console): a policy whose key was proven
/// at sign-in. It holds the policy's rights and a fingerprint of its keys, so that the
/// session ends when a key is regenerated or the policy removed ([`ServiceApi::caller`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The policy's name.
    pub policy: String,
    /// Its rights, canonical (`ServiceConfig, EnrollmentWrite`).
    pub rights: String,
    /// A fingerprint of its current keys (hex of a SHA-256 prefix).
    pub key_fingerprint: String,
}

impl Caller {
    /// Whether the caller's policy grants `right` (as the service API decides it).
    #[must_use]
    pub fn may(&self, right: Right) -> bool {
        self.rights.split(',').map(str::trim).any(|r| right.granted_by().iter().any(|g| g.eq_ignore_ascii_case(r)))
    }

    /// `403` unless the caller's policy grants `right`.
    ///
    /// # Errors
    /// `403` / `403001` naming the policy and the right.
    pub fn require(&self, right: Right) -> Result<(), Error> {
        if self.may(right) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "The shared access policy '{}' lacks the {right:?} right this operation needs.",
                self.policy
            )))
        }
    }
}

/// A fingerprint of a policy's two keys: it changes when either is regenerated.
fn key_fingerprint(p: &Policy) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(p.primary_key.as_bytes());
    ctx.update(b"\0");
    ctx.update(p.secondary_key.as_bytes());
    ctx.finish().as_ref().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The policy name and key of a service connection string
/// (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`, in any order).
///
/// # Errors
/// `400` when either part is missing.
pub fn parse_connection_string(s: &str) -> Result<(String, String), Error> {
    let mut name = None;
    let mut key = None;
    for part in s.trim().split(';') {
        if let Some((k, v)) = part.split_once('=') {
            match k.trim() {
                k if k.eq_ignore_ascii_case("SharedAccessKeyName") => name = Some(v.trim().to_owned()),
                // A key is base64 and may end in '=': take everything after the first '='.
                k if k.eq_ignore_ascii_case("SharedAccessKey") => key = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    match (name, key) {
        (Some(n), Some(k)) if !n.is_empty() && !k.is_empty() => Ok((n, k)),
        _ => Err(Error::invalid(
            "A service connection string has SharedAccessKeyName=… and SharedAccessKey=… (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…).",
        )),
    }
}

/// Counts shown on the console's overview.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counts {
    /// Individual enrollments.
    pub enrollments: u64,
    /// Enrollment groups.
    pub groups: u64,
    /// Registration records in all.
    pub registrations: u64,
    /// Registration records by status (`assigned`, `failed`, `disabled`).
    pub registrations_by_status: Vec<(String, u64)>,
}

/// Every right a policy can hold, in DPS's spelling.
pub const ALL_RIGHTS: &[&str] = &[
    "ServiceConfig",
    "EnrollmentRead",
    "EnrollmentWrite",
    "DeviceConnect",
    "RegistrationStatusRead",
    "RegistrationStatusWrite",
];

/// The canonical spelling of a comma-separated list of rights.
///
/// # Errors
/// 400 for an unknown right or an empty list.
pub fn normalize_rights(rights: &str) -> Result<String, Error> {
    let mut out: Vec<&str> = Vec::new();
    for r in rights.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let Some(canon) = ALL_RIGHTS.iter().find(|k| k.eq_ignore_ascii_case(r)) else {
            return Err(Error::invalid(format!(
                "Unknown right '{}'; rights are {}.",
                shorten(r),
                ALL_RIGHTS.join(", ")
            )));
        };
        if !out.contains(canon) {
            out.push(canon);
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(format!("A policy needs at least one right: {}.", ALL_RIGHTS.join(", "))));
    }
    Ok(out.join(", "))
}

/// Validates a policy name: 1–64 of `A-Z a-z 0-9 - . _`.
///
/// # Errors
/// If the name breaks the rule.
pub fn check_policy_name(name: &str) -> Result<(), Error> {
    if !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "Invalid policy name '{}': use 1 to 64 letters, digits, '-', '.' or '_'.",
            shorten(name)
        )))
    }
}

fn parse_policy(body: &str) -> Result<Policy, Error> {
    serde_json::from_str(body).map_err(|e| Error::Internal(format!("stored policy is corrupt: {e}")))
}

fn policy_to_wire(p: &Policy) -> SharedAccessPolicy {
    SharedAccessPolicy {
        key_name: p.key_name.clone(),
        primary_key: Some(p.primary_key.clone()),
        secondary_key: Some(p.secondary_key.clone()),
        rights: p.rights.clone(),
    }
}

fn policy(name: &str) -> Resource<'_> {
    Resource { kind: "Shared access policy", id: name, not_found_code: codes::NOT_FOUND }
}

#[cfg(test)]
mod tests {
    use provisio_core::sas::{SrEncoding, build_token};
    use provisio_store::SqliteStore;
    use serde_json::json;

    use super::*;

    const V: Option<&str> = Some("2021-10-01");

    async fn api() -> ServiceApi {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        ServiceApi::new(store, vec!["dps.example.com".into()], 0)
    }

    /// Creates policy `name` with `rights`; returns its primary and secondary keys.
    async fn policy(api: &ServiceApi, name: &str, rights: &str) -> (String, String) {
        let p = api
            .put_policy(
                name,
                SharedAccessPolicy {
                    key_name: name.into(),
                    primary_key: None,
                    secondary_key: None,
                    rights: rights.into(),
                },
            )
            .await
            .unwrap();
        (p.primary_key.unwrap(), p.secondary_key.unwrap())
    }

    fn token(host: &str, key: &str, name: Option<&str>, expiry: u64) -> String {
        build_token(host, key, expiry, name, SrEncoding::Upper).unwrap()
    }

    fn soon() -> u64 {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 600
    }

    async fn check(api: &ServiceApi, authorization: Option<&str>, right: Right) -> Result<(), Error> {
        api.authorize(&ServiceCall { authorization, api_version: V, peer: None }, Api::Service, right).await
    }

    #[tokio::test]
    async fn each_right_grants_exactly_the_operations_dps_grants_it() {
        let api = api().await;
        // The owner keeps ServiceConfig, so that every other policy may lack it.
        policy(&api, "owner", "ServiceConfig").await;
        use Right::*;
        let operations =
            [EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite, ServiceConfig];
        // (policy right, the operations it allows), `spec/service-api.md` §2.1.
        let table: [(&str, &[Right]); 6] = [
            ("EnrollmentRead", &[EnrollmentRead]),
            ("EnrollmentWrite", &[EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite]),
            ("RegistrationStatusRead", &[RegistrationStatusRead]),
            ("RegistrationStatusWrite", &[RegistrationStatusRead, RegistrationStatusWrite]),
            ("ServiceConfig", &operations),
            ("DeviceConnect", &[]),
        ];
        for (right, allowed) in table {
            let name = format!("p-{}", right.to_ascii_lowercase());
            let (key, _) = policy(&api, &name, right).await;
            let t = token("dps.example.com", &key, Some(&name), soon());
            for op in operations {
                let got = check(&api, Some(&t), op).await;
                if allowed.contains(&op) {
                    assert!(got.is_ok(), "{right} must allow {op:?}: {got:?}");
                } else {
                    let e = got.unwrap_err();
                    assert_eq!((e.status(), e.code()), (403, 403_001), "{right} must not allow {op:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn only_a_current_token_of_a_policy_for_this_host_is_accepted() {
        let api = api().await;
        let (primary, secondary) = policy(&api, "owner", "ServiceConfig").await;
        let r = Right::EnrollmentRead;
        // Either key, any case of the host, a port in the resource.
        for t in [
            token("dps.example.com", &primary, Some("owner"), soon()),
            token("DPS.example.com:443", &secondary, Some("OWNER"), soon()),
        ] {
            check(&api, Some(&t), r).await.unwrap();
        }
        let other_key = provisio_core::keys::generate_key();
        for (case, auth) in [
            ("no token", None),
            ("a bearer token", Some("Bearer abc".to_owned())),
            ("not a SAS token", Some("SharedAccessSignature nothing".to_owned())),
            ("another host", Some(token("evil.example.com", &primary, Some("owner"), soon()))),
            ("expired", Some(token("dps.example.com", &primary, Some("owner"), 1))),
            ("no key name", Some(token("dps.example.com", &primary, None, soon()))),
            ("an unknown policy", Some(token("dps.example.com", &primary, Some("nobody"), soon()))),
            ("another key", Some(token("dps.example.com", &other_key, Some("owner"), soon()))),
        ] {
            let e = check(&api, auth.as_deref(), r).await.unwrap_err();
            assert_eq!((e.status(), e.code()), (401, 401_002), "{case}");
        }
        // The api-version is checked before the token, and the certificates API has its own.
        let t = token("dps.example.com", &primary, Some("owner"), soon());
        let call = |v| ServiceCall { authorization: Some(&t), api_version: v, peer: None };
        assert_eq!(api.authorize(&call(None), Api::Service, r).await.unwrap_err().code(), 400_004);
        assert!(api.authorize(&call(Some("2022-12-12")), Api::Service, r).await.is_err());
        api.authorize(&call(Some("2022-12-12")), Api::Certificates, Right::ServiceConfig).await.unwrap();
    }

    #[tokio::test]
    async fn the_service_rate_answers_429_with_the_wait() {
        let api = api().await.with_limits(ServiceLimits { requests_per_second: 1, ..ServiceLimits::default() });
        let (key, _) = policy(&api, "owner", "ServiceConfig").await;
        let t = token("dps.example.com", &key, Some("owner"), soon());
        // A burst of twice the rate, then 429.
        check(&api, Some(&t), Right::EnrollmentRead).await.unwrap();
        check(&api, Some(&t), Right::EnrollmentRead).await.unwrap();
        let e = check(&api, Some(&t), Right::EnrollmentRead).await.unwrap_err();
        assert_eq!((e.status(), e.retry_after()), (429, Some(1)));
    }

    /// Finding 6 of issue #24: requests without a valid token drained the rate limit and
    /// locked the operators out.
    #[tokio::test]
    async fn refused_tokens_do_not_drain_the_rate_and_are_limited_per_address() {
        let api = api().await.with_limits(ServiceLimits { requests_per_second: 1, ..ServiceLimits::default() });
        let (key, _) = policy(&api, "owner", "ServiceConfig").await;
        let good = token("dps.example.com", &key, Some("owner"), soon());
        let forged = token("dps.example.com", &provisio_core::keys::generate_key(), Some("owner"), soon());
        let stranger: std::net::IpAddr = [203, 0, 113, 9].into();
        let operator: std::net::IpAddr = [198, 51, 100, 1].into();
        let call = |t, peer| ServiceCall { authorization: Some(t), api_version: V, peer: Some(peer) };
        for _ in 0..REFUSALS_PER_ADDRESS_PER_MINUTE {
            let e = api.authorize(&call(&forged, stranger), Api::Service, Right::EnrollmentRead).await.unwrap_err();
            assert_eq!(e.status(), 401);
        }
        // The stranger is now told to wait, without its token being checked.
        let e = api.authorize(&call(&forged, stranger), Api::Service, Right::EnrollmentRead).await.unwrap_err();
        assert_eq!(e.status(), 429);
        // The operator's burst (twice the rate) is intact.
        api.authorize(&call(&good, operator), Api::Service, Right::EnrollmentRead).await.unwrap();
        api.authorize(&call(&good, operator), Api::Service, Right::EnrollmentRead).await.unwrap();
    }

    fn enrollment(id: &str) -> IndividualEnrollment {
        serde_json::from_value(json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})).unwrap()
    }

    #[tokio::test]
    async fn etags_decide_creates_updates_and_deletes() {
        let api = api().await;
        let created = api.put_enrollment("dev-1", enrollment("dev-1"), None).await.unwrap();
        let etag = created.etag.clone().unwrap();
        // A create of an existing id is a conflict; a stale etag a failed precondition.
        assert_eq!(api.put_enrollment("dev-1", enrollment("dev-1"), None).await.unwrap_err().code(), 409_201);
        assert_eq!(
            api.put_enrollment("DEV-1", enrollment("dev-1"), Some("\"stale\"")).await.unwrap_err().code(),
            412_001
        );
        // The current etag, quoted or not, updates and changes the etag; `*` always does.
        let updated = api.put_enrollment("dev-1", enrollment("dev-1"), Some(&format!("\"{etag}\""))).await.unwrap();
        let etag2 = updated.etag.clone().unwrap();
        assert_ne!(etag2, etag);
        assert_eq!(api.put_enrollment("dev-1", enrollment("dev-1"), Some(&etag)).await.unwrap_err().code(), 412_001);
        api.put_enrollment("dev-1", enrollment("dev-1"), Some("*")).await.unwrap();
        // Deletes: a stale etag is refused, none or `*` deletes, a second delete finds nothing.
        assert_eq!(api.delete(false, "dev-1", Some(&etag2)).await.unwrap_err().code(), 412_001);
        api.delete(false, "dev-1", Some("*")).await.unwrap();
        assert_eq!(api.delete(false, "dev-1", None).await.unwrap_err().code(), 404_201);
        assert_eq!(api.get_enrollment("dev-1").await.unwrap_err().code(), 404_201);
        // The body's id must be the path's.
        assert_eq!(api.put_enrollment("dev-2", enrollment("dev-3"), None).await.unwrap_err().code(), 400_004);
    }

    #[tokio::test]
    async fn bulk_operations_check_the_request_then_report_each_item() {
        let api = api().await.with_limits(ServiceLimits { max_bulk_items: 3, ..ServiceLimits::default() });
        let items = |ids: &[&str]| ids.iter().map(|id| json!(enrollment(id))).collect::<Vec<_>>();
        // The request itself: too many items, an unknown mode, no array.
        for (body, why) in [
            (json!({"mode": "create", "enrollments": items(&["a", "b", "c", "d"])}), "at most 3"),
            (json!({"mode": "upsert", "enrollments": items(&["a"])}), "Unknown bulk mode"),
            (json!({"mode": "create"}), "'enrollments': an array"),
            (json!({"enrollments": items(&["a"])}), "needs 'mode'"),
        ] {
            let e = api.bulk(false, &body).await.unwrap_err();
            assert_eq!(e.code(), 400_004, "{body}");
            assert!(e.to_string().contains(why), "{e}");
        }
        // Items: each succeeds or fails on its own, the result lists the failures.
        let r = api.bulk(false, &json!({"mode": "create", "enrollments": items(&["a", "b"])})).await.unwrap();
        assert!(r.is_successful && r.errors.is_empty(), "{r:?}");
        let r = api.bulk(false, &json!({"mode": "create", "enrollments": items(&["b", "c"])})).await.unwrap();
        assert!(!r.is_successful);
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert_eq!((r.errors[0].registration_id.as_deref(), r.errors[0].error_code), (Some("b"), 409_201));
        assert!(api.get_enrollment("c").await.is_ok(), "the other item was created");
        // updateIfMatchETag needs each item's etag. update without one acts as a PUT without
        // If-Match does (DPS's recorded behaviour): it creates, and conflicts with an existing
        // item; with the item's etag it updates.
        let r = api.bulk(false, &json!({"mode": "updateIfMatchETag", "enrollments": items(&["a"])})).await.unwrap();
        assert_eq!(r.errors[0].error_code, 412_001, "{r:?}");
        let r = api.bulk(false, &json!({"mode": "update", "enrollments": items(&["a", "new"])})).await.unwrap();
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert_eq!((r.errors[0].registration_id.as_deref(), r.errors[0].error_code), (Some("a"), 409_201));
        assert!(api.get_enrollment("new").await.is_ok());
        let etag = api.get_enrollment("a").await.unwrap().etag.unwrap();
        let mut item = json!(enrollment("a"));
        item["etag"] = json!(etag);
        let r = api.bulk(false, &json!({"mode": "updateIfMatchETag", "enrollments": [item]})).await.unwrap();
        assert!(r.is_successful, "{r:?}");
        let r = api.bulk(false, &json!({"mode": "delete", "enrollments": items(&["a", "missing"])})).await.unwrap();
        assert_eq!(r.errors.len(), 1);
        assert_eq!((r.errors[0].registration_id.as_deref(), r.errors[0].error_code), (Some("missing"), 404_201));
        assert_eq!(api.get_enrollment("a").await.unwrap_err().code(), 404_201);
    }

    #[test]
    fn queries_are_select_star_only() {
        for ok in ["", "SELECT *", "select * from enrollments", "SELECT * FROM c"] {
            check_query(ok).unwrap();
        }
        for bad in ["SELECT * FROM c WHERE x = 1", "DELETE FROM c", "SELECT id", "SELECT * FROM c; DROP"] {
            assert_eq!(check_query(bad).unwrap_err().code(), 400_004, "{bad}");
        }
    }
}
