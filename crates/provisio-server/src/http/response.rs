//! Building HTTP answers: the engine's [`Answer`]s (JSON with DPS's content type, error
//! headers, `Retry-After`) and the service API's JSON.

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use provisio_engine::{Answer, Error};
use serde::Serialize;

/// `Content-Type` of every JSON answer (the Node SDK parses only `application/json`).
pub(crate) const JSON: &str = "application/json; charset=utf-8";

/// An engine answer as an HTTP response: its status and JSON body, `Retry-After` when it
/// carries a hint, and for errors the tracking id as `x-ms-request-id` and the code as
/// `x-ms-error-code`.
pub(crate) fn answer(a: Answer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(Body::from(a.body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    if let Some(secs) = a.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(e) = a.error {
        if let Ok(v) = HeaderValue::from_str(&e.tracking_id) {
            h.insert("x-ms-request-id", v);
        }
        h.insert("x-ms-error-code", HeaderValue::from(e.code));
    }
    r
}

/// A JSON answer of the service API.
pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    answer(Answer::json(status.as_u16(), None, body))
}

/// An empty answer.
pub(crate) fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// The DPS error answer for `e`.
pub(crate) fn error(e: &Error) -> Response {
    answer(e.answer())
}
