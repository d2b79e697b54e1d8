//! Device API over HTTPS: parse, call the engine, answer in DPS's shapes.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use provisio_proto::{
    DEVICE_API_VERSIONS,
    device::{DeviceRegistration, RegistrationOperationStatus, RegistrationStatus},
};

use super::{
    response,
    routes::{AppState, Req},
};
use crate::{ServerError, engine::Credential};

/// A SAS token wins over a client certificate (a device may hold both); without either
/// the engine refuses.
fn credential(req: &Req) -> Credential {
    if let Some(v) = req.header(header::AUTHORIZATION.as_str()) {
        return Credential::Sas(v.to_owned());
    }
    let chain = req.peer.der_chain();
    if chain.is_empty() { Credential::None } else { Credential::X509(chain) }
}

/// Parses a `DeviceRegistration` ([`crate::bodies::device_registration`]).
fn registration_body(req: &Req) -> Result<DeviceRegistration, ServerError> {
    crate::bodies::device_registration(&req.body)
        .map_err(|e| ServerError::malformed(format!("The request body is not a valid DeviceRegistration: {e}")))
}

fn with_retry_after(mut r: Response, secs: u32) -> Response {
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// `PUT /{scope}/registrations/{id}/register`.
pub async fn register(state: &AppState, req: &mut Req, scope: &str, id: &str) -> Result<Response, ServerError> {
    let body = req.require_api_version(DEVICE_API_VERSIONS).and_then(|()| registration_body(req));
    let origin = crate::engine::Origin { transport: "https", peer: req.peer_ip };
    let credential = credential(req);
    // A TPM device's first request carries no credential, only its keys: it is answered
    // with the challenge (401 and the key for its TPM), as DPS does.
    if matches!(credential, Credential::None) && body.as_ref().is_ok_and(|b| b.tpm.is_some()) {
        let key = state.engine.tpm_challenge(&origin, scope, id, body).await?;
        let challenge = serde_json::json!({
            "authenticationKey": key,
            "keyName": "registration",
            "message": "Take the key into the TPM, sign a SAS token with it and register again with it.",
        });
        return Ok(response::json(StatusCode::UNAUTHORIZED, &challenge));
    }
    let op = state.engine.register_from(&origin, scope, id, body, &credential).await?;
    let mut r = response::json(StatusCode::ACCEPTED, &RegistrationOperationStatus::accepted(op));
    if let Some(host) = &req.authority {
        let loc = format!("https://{host}/{scope}/registrations/{id}/register");
        if let Ok(v) = HeaderValue::from_str(&loc) {
            r.headers_mut().insert(header::LOCATION, v);
        }
    }
    Ok(with_retry_after(r, state.retry_after_secs))
}

/// `GET /{scope}/registrations/{id}/operations/{operationId}`.
pub async fn operation_status(
    state: &AppState,
    req: &mut Req,
    scope: &str,
    id: &str,
    operation_id: &str,
) -> Result<Response, ServerError> {
    req.require_api_version(DEVICE_API_VERSIONS)?;
    // Node sends `{}` on polls; the body carries nothing we need (its size was bounded).
    let status = state.engine.operation_status(scope, id, operation_id, &credential(req)).await?;
    Ok(if status.status == RegistrationStatus::Assigning {
        with_retry_after(response::json(StatusCode::ACCEPTED, &status), state.retry_after_secs)
    } else {
        response::json(StatusCode::OK, &status)
    })
}

/// `POST /{scope}/registrations/{id}`: the bare `DeviceRegistrationResult`.
pub async fn registration_status(
    state: &AppState,
    req: &mut Req,
    scope: &str,
    id: &str,
) -> Result<Response, ServerError> {
    req.require_api_version(DEVICE_API_VERSIONS)?;
    let body = registration_body(req)?;
    if let Some(body_id) = &body.registration_id
        && !body_id.eq_ignore_ascii_case(id)
    {
        return Err(ServerError::invalid("The body's registrationId does not match the path."));
    }
    let result = state.engine.registration_status(scope, id, &credential(req)).await?;
    Ok(response::json(StatusCode::OK, &result))
}
