//! Service API over HTTPS: authorise, parse, call [`ServiceApi`](crate::service_api::ServiceApi).

use axum::{
    http::{StatusCode, header},
    response::Response,
};
use provisio_proto::SERVICE_API_VERSIONS;
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
