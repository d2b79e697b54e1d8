//! Device API over HTTPS: what the request carries goes to [`Engine::device`]; its answer
//! becomes the HTTP response (with `Location` on an accepted register).
//!
//! [`Engine::device`]: provisio_engine::Engine::device

use axum::{
    http::{HeaderValue, header},
    response::Response,
};
use provisio_engine::{Credential, DeviceOperation, DeviceRequest, Origin, Transport};

use super::{
    response,
    routes::{AppState, Req},
};

/// A SAS token wins over a client certificate (a device may hold both); without either
/// the engine refuses.
fn credential(req: &Req) -> Credential {
    Credential::from_parts(req.header(header::AUTHORIZATION.as_str()).map(str::to_owned), req.peer.der_chain())
}

/// Serves one device request: `PUT …/register`, `GET …/operations/{id}` or
/// `POST {scope}/registrations/{id}`.
pub(crate) async fn serve(
    state: &AppState,
    req: &Req,
    scope: &str,
    id: &str,
    operation: DeviceOperation<'_>,
) -> Response {
    let credential = credential(req);
    let connection = req.connection.clone();
    let answer = state
        .engine
        .device(DeviceRequest {
            origin: Origin::new(Transport::Https, req.peer_ip),
            scope,
            registration_id: id,
            api_version: req.query("api-version"),
            operation,
            credential: &credential,
            connection: &connection,
        })
        .await;
    let close = answer.close_connection;
    let accepted_register = answer.status == 202 && matches!(operation, DeviceOperation::Register { .. });
    let mut r = response::answer(answer);
    // DPS points `Location` at the register URL (no client uses it).
    if accepted_register
        && let Some(host) = &req.authority
        && let Ok(v) = HeaderValue::from_str(&format!("https://{host}/{scope}/registrations/{id}/register"))
    {
        r.headers_mut().insert(header::LOCATION, v);
    }
    // HTTP/1.1 closes after this answer; HTTP/2 has no such header, and its next X.509
    // requests on the connection are refused without a validation.
    if close && req.http1 {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}
