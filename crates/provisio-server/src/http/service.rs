//! Service API over HTTPS: what the request carries goes to the engine's
//! [`ServiceApi`](provisio_engine::service::ServiceApi), whose answers become JSON responses.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use provisio_engine::{
    Error, bodies,
    service::{Api, QueryTarget, Right, ServiceCall},
};
use provisio_proto::service::{CertificateBody, SharedAccessPolicy};
use serde::de::DeserializeOwned;

use super::{
    response,
    routes::{AppState, Req},
};

fn json_body<T: DeserializeOwned>(req: &Req, what: &str) -> Result<T, Error> {
    bodies::json_body(&req.body, what)
}

fn call(req: &Req) -> ServiceCall<'_> {
    ServiceCall {
        authorization: req.header(header::AUTHORIZATION.as_str()),
        api_version: req.query("api-version"),
        peer: req.peer_ip,
    }
}

async fn authorize(state: &AppState, req: &Req, right: Right) -> Result<(), Error> {
    proven(req, state.service.authorize(&call(req), Api::Service, right).await)
}

/// Notes on `req` that its token was proven (granted, or refused for a missing right only).
fn proven(req: &Req, result: Result<(), Error>) -> Result<(), Error> {
    if matches!(result, Ok(()) | Err(Error::Forbidden(_))) {
        req.authenticated.store(true, std::sync::atomic::Ordering::Release);
    }
    result
}

/// `GET /enrollments/{id}` and `/enrollmentGroups/{id}`.
pub(crate) async fn get(state: &AppState, req: &Req, group: bool, id: &str) -> Result<Response, Error> {
    authorize(state, req, Right::EnrollmentRead).await?;
    Ok(if group {
        response::json(StatusCode::OK, &state.service.get_group(id).await?)
    } else {
        response::json(StatusCode::OK, &state.service.get_enrollment(id).await?)
    })
}

/// `PUT /enrollments/{id}` and `/enrollmentGroups/{id}`.
pub(crate) async fn put(state: &AppState, req: &Req, group: bool, id: &str) -> Result<Response, Error> {
    authorize(state, req, Right::EnrollmentWrite).await?;
    let if_match = req.header(header::IF_MATCH.as_str()).map(str::to_owned);
    Ok(if group {
        let body = json_body(req, "EnrollmentGroup")?;
        response::json(StatusCode::OK, &state.service.put_group(id, body, if_match.as_deref()).await?)
    } else {
        let body = json_body(req, "IndividualEnrollment")?;
        response::json(StatusCode::OK, &state.service.put_enrollment(id, body, if_match.as_deref()).await?)
    })
}

/// `DELETE /enrollments/{id}` and `/enrollmentGroups/{id}`.
pub(crate) async fn delete(state: &AppState, req: &Req, group: bool, id: &str) -> Result<Response, Error> {
    authorize(state, req, Right::EnrollmentWrite).await?;
    state.service.delete(group, id, req.header(header::IF_MATCH.as_str())).await?;
    Ok(response::empty(StatusCode::NO_CONTENT))
}

async fn authorize_certs(state: &AppState, req: &Req) -> Result<(), Error> {
    proven(req, state.service.authorize(&call(req), Api::Certificates, Right::ServiceConfig).await)
}

/// `GET /certificates`.
pub(crate) async fn list_certificates(state: &AppState, req: &Req) -> Result<Response, Error> {
    authorize_certs(state, req).await?;
    Ok(response::json(StatusCode::OK, &state.certificates.list().await?))
}

/// `GET|PUT|DELETE /certificates/{name}`.
pub(crate) async fn certificate(state: &AppState, req: &Req, name: &str) -> Result<Response, Error> {
    authorize_certs(state, req).await?;
    let if_match = req.header(header::IF_MATCH.as_str());
    match req.method.as_str() {
        "GET" => Ok(response::json(StatusCode::OK, &state.certificates.get(name).await?)),
        "PUT" => {
            let body: CertificateBody = json_body(req, "certificate body")?;
            Ok(response::json(StatusCode::OK, &state.certificates.put(name, body, if_match).await?))
        }
        _ => {
            state.certificates.delete(name, if_match).await?;
            Ok(response::empty(StatusCode::NO_CONTENT))
        }
    }
}

/// `POST /certificates/{name}/generateVerificationCode` and `.../verify`.
pub(crate) async fn certificate_action(
    state: &AppState,
    req: &Req,
    name: &str,
    verify: bool,
) -> Result<Response, Error> {
    authorize_certs(state, req).await?;
    let if_match = req.header(header::IF_MATCH.as_str());
    let r = if verify {
        let body: CertificateBody = json_body(req, "verification body")?;
        state.certificates.verify(name, body, if_match).await?
    } else {
        state.certificates.generate_verification_code(name, if_match).await?
    };
    Ok(response::json(StatusCode::OK, &r))
}

/// `GET /registrations/{id}/audit`: the last refused attestation.
pub(crate) async fn audit(state: &AppState, req: &Req, id: &str) -> Result<Response, Error> {
    authorize(state, req, Right::RegistrationStatusRead).await?;
    Ok(response::json(StatusCode::OK, &state.service.audit(id).await?))
}

/// `POST /enrollments` and `POST /enrollmentGroups`: bulk operations.
pub(crate) async fn bulk(state: &AppState, req: &Req, group: bool) -> Result<Response, Error> {
    authorize(state, req, Right::EnrollmentWrite).await?;
    let body: serde_json::Value = json_body(req, "bulk operation")?;
    Ok(response::json(StatusCode::OK, &state.service.bulk(group, &body).await?))
}

/// The three query routes, paged with `x-ms-max-item-count` and `x-ms-continuation`.
pub(crate) async fn query(state: &AppState, req: &Req, target: QueryTarget) -> Result<Response, Error> {
    let right = if matches!(target, QueryTarget::GroupRegistrations(_)) {
        Right::RegistrationStatusRead
    } else {
        Right::EnrollmentRead
    };
    authorize(state, req, right).await?;
    // The body is optional (Python and the az CLI send none on registration queries).
    let spec = bodies::query_spec(&req.body)?;
    let page_size = match req.header("x-ms-max-item-count").map(str::trim) {
        None | Some("") => None,
        Some(v) => {
            Some(v.parse::<u32>().map_err(|_| Error::invalid("x-ms-max-item-count must be a positive integer."))?)
        }
    };
    let page = state
        .service
        .query(&target, spec.as_ref().map(|q| q.query.as_str()), page_size, req.header("x-ms-continuation"))
        .await?;
    let mut r = response::json(StatusCode::OK, &page.items);
    let h = r.headers_mut();
    h.insert("x-ms-item-type", HeaderValue::from_static(target.item_type()));
    if let Some(c) = page.continuation.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert("x-ms-continuation", c);
    }
    if let Some(n) = page_size {
        h.insert("x-ms-max-item-count", HeaderValue::from(n));
    }
    Ok(r)
}

/// `POST /enrollments/{id}/attestationmechanism` and the group twin.
pub(crate) async fn attestation_mechanism(
    state: &AppState,
    req: &Req,
    group: bool,
    id: &str,
) -> Result<Response, Error> {
    authorize(state, req, Right::EnrollmentWrite).await?;
    Ok(response::json(StatusCode::OK, &state.service.attestation_mechanism(group, id).await?))
}

/// `GET` and `DELETE /registrations/{id}`.
pub(crate) async fn registration(state: &AppState, req: &Req, id: &str) -> Result<Response, Error> {
    if req.method == axum::http::Method::GET {
        authorize(state, req, Right::RegistrationStatusRead).await?;
        Ok(response::json(StatusCode::OK, &state.service.get_registration(id).await?))
    } else {
        authorize(state, req, Right::RegistrationStatusWrite).await?;
        state.service.delete_registration(id, req.header(header::IF_MATCH.as_str())).await?;
        Ok(response::empty(StatusCode::NO_CONTENT))
    }
}

/// `POST /registrations/{id}/revokeCertificates`: revokes every certificate issued to the
/// device; answers how many.
pub(crate) async fn revoke_certificates(state: &AppState, req: &Req, id: &str) -> Result<Response, Error> {
    authorize(state, req, Right::RegistrationStatusWrite).await?;
    let revoked = state.service.revoke_certificates(id).await?;
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "revoked": revoked })))
}

/// `GET /certificateAuthorities`.
pub(crate) async fn list_certificate_authorities(state: &AppState, req: &Req) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    let value = state.engine.issuance().list_cas().await?;
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "value": value })))
}

/// `GET|PUT|DELETE /certificateAuthorities/{name}`.
pub(crate) async fn certificate_authority(state: &AppState, req: &Req, name: &str) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    let issuance = state.engine.issuance();
    match req.method.as_str() {
        "GET" => Ok(response::json(StatusCode::OK, &issuance.get_ca(name).await?)),
        "PUT" => {
            let body = if req.body.iter().all(u8::is_ascii_whitespace) {
                provisio_proto::service::CertificateAuthority {
                    name: name.to_owned(),
                    certificate: None,
                    chain: None,
                    private_key: None,
                    subject: None,
                    sha256_thumbprint: None,
                    not_after_utc: None,
                    crl_path: None,
                    etag: None,
                }
            } else {
                json_body(req, "certificate authority")?
            };
            Ok(response::json(StatusCode::OK, &issuance.put_ca(name, body).await?))
        }
        _ => {
            issuance.delete_ca(name).await?;
            Ok(response::empty(StatusCode::NO_CONTENT))
        }
    }
}

/// `GET /credentialPolicies`.
pub(crate) async fn list_credential_policies(state: &AppState, req: &Req) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    let value = state.engine.issuance().list_policies().await?;
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "value": value })))
}

/// `GET|PUT|DELETE /credentialPolicies/{name}`.
pub(crate) async fn credential_policy(state: &AppState, req: &Req, name: &str) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    let issuance = state.engine.issuance();
    match req.method.as_str() {
        "GET" => Ok(response::json(StatusCode::OK, &issuance.get_policy(name).await?)),
        "PUT" => {
            let body = json_body(req, "certificate policy")?;
            Ok(response::json(StatusCode::OK, &issuance.put_policy(name, body).await?))
        }
        _ => {
            issuance.delete_policy(name).await?;
            Ok(response::empty(StatusCode::NO_CONTENT))
        }
    }
}

/// `GET /crl/{name}.crl`: a CA's CRL (DER), without authentication, as brokers fetch it.
pub(crate) async fn crl(state: &AppState, file: &str) -> Result<Response, Error> {
    let name = file.strip_suffix(".crl").unwrap_or(file);
    let der = state.engine.issuance().crl(name).await?;
    let mut r = Response::new(axum::body::Body::from(der.as_ref().clone()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/pkix-crl"));
    Ok(r)
}

/// `GET /policies`.
pub(crate) async fn list_policies(state: &AppState, req: &Req) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "value": state.service.list_policies().await? })))
}

/// `GET|PUT|DELETE /policies/{name}`.
pub(crate) async fn policy(state: &AppState, req: &Req, name: &str) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    match req.method.as_str() {
        "GET" => Ok(response::json(StatusCode::OK, &state.service.get_policy(name).await?)),
        "PUT" => {
            let body: SharedAccessPolicy = json_body(req, "shared access policy")?;
            Ok(response::json(StatusCode::OK, &state.service.put_policy(name, body).await?))
        }
        _ => {
            state.service.delete_policy(name).await?;
            Ok(response::empty(StatusCode::NO_CONTENT))
        }
    }
}

/// `POST /policies/{name}/regenerateKey`, body `{"keyType": "primary"|"secondary"}`.
pub(crate) async fn regenerate_policy_key(state: &AppState, req: &Req, name: &str) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    let body: serde_json::Value = json_body(req, "regenerateKey body")?;
    let key_type = body.get("keyType").and_then(|v| v.as_str()).unwrap_or("");
    Ok(response::json(StatusCode::OK, &state.service.regenerate_policy_key(name, key_type).await?))
}

/// `GET /linkedHubs`.
pub(crate) async fn list_hubs(state: &AppState, req: &Req) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "value": state.hubs.list().await? })))
}

/// `GET|PUT|DELETE /linkedHubs/{hostName}`. PUT takes `{"allocationWeight": 1..1000,
/// "applyAllocationPolicy": bool, "region"?: str, "registrarWebhookUrl"?: url}`.
pub(crate) async fn hub(state: &AppState, req: &Req, name: &str) -> Result<Response, Error> {
    authorize(state, req, Right::ServiceConfig).await?;
    match req.method.as_str() {
        "GET" => Ok(response::json(StatusCode::OK, &state.hubs.get(name).await?)),
        "PUT" => {
            let hub = bodies::linked_hub(&req.body)?;
            Ok(response::json(StatusCode::OK, &state.hubs.put(name, hub).await?))
        }
        _ => {
            state.hubs.delete(name).await?;
            Ok(response::empty(StatusCode::NO_CONTENT))
        }
    }
}
