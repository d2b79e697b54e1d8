//! Service API over HTTPS: authorise, parse, call [`ServiceApi`](crate::service_api::ServiceApi).

use axum::{
    http::{StatusCode, header},
    response::Response,
};
use provisio_proto::{CERTIFICATE_API_VERSIONS, SERVICE_API_VERSIONS, service::CertificateBody};
use serde::de::DeserializeOwned;

use super::{
    response,
    routes::{AppState, Req},
};
use crate::{ServerError, service_api::Right};

fn json_body<T: DeserializeOwned>(req: &Req, what: &str) -> Result<T, ServerError> {
    let bytes = &req.body;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ServerError::malformed(format!("The request body must be a JSON {what}.")));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ServerError::malformed(format!("The request body is not a valid {what}: {e}")))
}

async fn authorize(state: &AppState, req: &Req, right: Right) -> Result<(), ServerError> {
    req.require_api_version(SERVICE_API_VERSIONS)?;
    state.service.authorize(req.header(header::AUTHORIZATION.as_str()), right).await
}

/// `GET /enrollments/{id}` and `/enrollmentGroups/{id}`.
pub async fn get(state: &AppState, req: &mut Req, group: bool, id: &str) -> Result<Response, ServerError> {
    authorize(state, req, Right::EnrollmentRead).await?;
    Ok(if group {
        response::json(StatusCode::OK, &state.service.get_group(id).await?)
    } else {
        response::json(StatusCode::OK, &state.service.get_enrollment(id).await?)
    })
}

/// `PUT /enrollments/{id}` and `/enrollmentGroups/{id}`.
pub async fn put(state: &AppState, req: &mut Req, group: bool, id: &str) -> Result<Response, ServerError> {
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
pub async fn delete(state: &AppState, req: &mut Req, group: bool, id: &str) -> Result<Response, ServerError> {
    authorize(state, req, Right::EnrollmentWrite).await?;
    state.service.delete(group, id, req.header(header::IF_MATCH.as_str())).await?;
    Ok(response::empty(StatusCode::NO_CONTENT))
}

async fn authorize_certs(state: &AppState, req: &Req) -> Result<(), ServerError> {
    req.require_api_version(CERTIFICATE_API_VERSIONS)?;
    state.service.authorize(req.header(header::AUTHORIZATION.as_str()), Right::ServiceConfig).await
}

/// `GET /certificates`.
pub async fn list_certificates(state: &AppState, req: &Req) -> Result<Response, ServerError> {
    authorize_certs(state, req).await?;
    Ok(response::json(StatusCode::OK, &state.certificates.list().await?))
}

/// `GET|PUT|DELETE /certificates/{name}`.
pub async fn certificate(state: &AppState, req: &Req, name: &str) -> Result<Response, ServerError> {
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
pub async fn certificate_action(
    state: &AppState,
    req: &Req,
    name: &str,
    verify: bool,
) -> Result<Response, ServerError> {
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
pub async fn audit(state: &AppState, req: &Req, id: &str) -> Result<Response, ServerError> {
    req.require_api_version(SERVICE_API_VERSIONS)?;
    state.service.authorize(req.header(header::AUTHORIZATION.as_str()), Right::RegistrationStatusRead).await?;
    Ok(response::json(StatusCode::OK, &state.service.audit(id).await?))
}
