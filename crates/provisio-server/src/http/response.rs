//! Building HTTP answers: JSON with DPS's content type, and DPS error bodies.

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use serde::Serialize;

use crate::ServerError;

/// `Content-Type` of every JSON answer (the Node SDK parses only `application/json`).
pub const JSON: &str = "application/json; charset=utf-8";

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match crate::to_json(body) {
        Ok(bytes) => {
            let mut r = Response::new(Body::from(bytes));
            *r.status_mut() = status;
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
            r
        }
        Err(e) => error(&ServerError::Internal(format!("serialising a response: {e}"))),
    }
}

/// An empty answer.
pub fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// The DPS error answer for `e`; the tracking id is logged and sent as `x-ms-request-id`.
pub fn error(e: &ServerError) -> Response {
    let body = e.to_body();
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    if let Ok(v) = HeaderValue::from_str(&body.tracking_id) {
        h.insert("x-ms-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&body.error_code.to_string()) {
        h.insert("x-ms-error-code", v);
    }
    if let Some(secs) = e.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}
