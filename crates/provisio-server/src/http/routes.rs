//! Routing. DPS routes are case-insensitive and their segments arrive percent-encoded
//! by some clients, so routing is done here on decoded segments rather than by a
//! case-sensitive router.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use percent_encoding::percent_decode_str;

use provisio_core::text::shorten;
use provisio_engine::{
    DeviceOperation, Error,
    audit::{AuditLog, Entry, Kind, MAX_ACTION_CHARS},
    certificates::Certificates,
    hubs::Hubs,
    limits::PerIpLimiter,
    service::{QueryTarget, ServiceApi},
};

use super::{device, response, service};

/// Shared state of the HTTPS front-end.
pub(crate) struct AppState {
    /// The registration engine.
    pub engine: provisio_engine::Engine,
    /// The service API.
    pub service: ServiceApi,
    /// The certificates API.
    pub certificates: Certificates,
    /// Linked hubs.
    pub hubs: Hubs,
    /// Connections per client IP, shared by every listener.
    pub per_ip: Arc<PerIpLimiter>,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Deadline for one request.
    pub request_timeout: Duration,
    /// Where service API changes are recorded.
    pub audit: AuditLog,
    /// Limits of MQTT sessions, also over WebSockets.
    pub mqtt_limits: crate::mqtt::MqttLimits,
    /// Limits of AMQP sessions, also over WebSockets.
    pub amqp_limits: crate::amqp::AmqpLimits,
    /// The web console's routes (`/console`), when it is on.
    pub console: Option<Router>,
}

/// The router: everything goes through [`dispatch`].
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// A parsed request, as the handlers see it.
pub(crate) struct Req {
    /// Method.
    pub method: Method,
    /// Decoded path segments.
    pub segments: Vec<String>,
    /// Decoded query parameters.
    pub query: Vec<(String, String)>,
    /// Headers.
    pub headers: HeaderMap,
    /// Path as sent (for logs and SAS path prefixes).
    pub path: String,
    /// The body, read under the size limit before routing.
    pub body: Bytes,
    /// `host[:port]` the client addressed (`Host`, or the HTTP/2 `:authority`).
    pub authority: Option<String>,
    /// The client certificate chain from the TLS handshake.
    pub peer: super::PeerCertificates,
    /// The client's IP address.
    pub peer_ip: Option<std::net::IpAddr>,
    /// What the engine keeps about the connection.
    pub connection: Arc<provisio_engine::Connection>,
    /// Whether the request came over HTTP/1.x (which can be told to close the connection).
    pub http1: bool,
    /// Set once the request's service token is proven (its policy may still lack the
    /// right): a refusal before that is an unauthenticated one, audited within limits.
    pub authenticated: Arc<std::sync::atomic::AtomicBool>,
}

impl Req {
    /// A query parameter (names compared case-insensitively).
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Reads a body, refusing more than `limit` bytes with `413`.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Error> {
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > limit as u64)
    {
        return Err(Error::PayloadTooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Error::PayloadTooLarge(limit)),
        Err(e) => Err(Error::malformed(format!("could not read the request body: {e}"))),
    }
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Parses and routes one request, under the request deadline.
async fn dispatch(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if super::websocket::is_endpoint(request.uri().path(), request.headers()) {
        return super::websocket::upgrade(&state, request).await;
    }
    if let Some(console) = &state.console
        && is_console(request.uri().path())
    {
        return console_request(&state, console.clone(), request).await;
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(decode).collect();
    let query = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let peer = parts.extensions.get::<super::PeerCertificates>().cloned().unwrap_or_default();
    let peer_ip = parts.extensions.get::<super::PeerAddr>().map(|a| a.0);
    let connection = parts.extensions.get::<super::ConnectionSlot>().map(|s| s.engine.clone()).unwrap_or_default();
    let http1 = parts.version < axum::http::Version::HTTP_2;
    // The body arrives under the request deadline too: a `Content-Length` whose bytes never
    // come would otherwise hold the connection forever (issue #24, finding 3).
    let body = match tokio::time::timeout(state.request_timeout, read_body(&parts.headers, body, state.max_body_bytes))
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return response::error(&e),
        Err(_) => return response::error(&Error::Timeout),
    };
    let authority = parts
        .uri
        .authority()
        .map(ToString::to_string)
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
    let authenticated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let req = Req {
        method: parts.method,
        segments,
        query,
        headers: parts.headers,
        path,
        body,
        authority,
        peer,
        peer_ip,
        connection,
        http1,
        authenticated: authenticated.clone(),
    };
    let started = std::time::Instant::now();
    let (method, path) = (req.method.clone(), req.path.clone());
    let audited = is_service_change(&req) || returns_secrets(&req);
    let key_name = if audited { key_name(&req) } else { None };
    let peer_ip = req.peer_ip;
    let mut reason = None;
    let resp = match tokio::time::timeout(state.request_timeout, route(&state, req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            if audited {
                reason = Some(provisio_engine::audit::bounded(
                    &e.detail().map_or_else(|| e.to_string(), str::to_owned),
                    provisio_engine::audit::MAX_REASON_CHARS,
                ));
            }
            response::error(&e)
        }
        Err(_) => response::error(&Error::Timeout),
    };
    let status = resp.status().as_u16();
    tracing::debug!(%method, path, status, elapsed_ms = started.elapsed().as_millis(), "request");
    if audited {
        let action = format!("{method} {path}");
        let mut e = Entry::new(Kind::Service, provisio_engine::audit::bounded(&action, MAX_ACTION_CHARS));
        e.peer = peer_ip;
        e.credential = key_name;
        e.status = status;
        e.result = if resp.status().is_success() { "ok" } else { "refused" }.into();
        e.reason = reason;
        {
            let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
            e.error_code = header("x-ms-error-code").and_then(|c| c.parse().ok());
            e.tracking_id = if resp.status().is_success() { None } else { header("x-ms-request-id") };
        }
        if authenticated.load(std::sync::atomic::Ordering::Acquire) {
            state.audit.record(&e).await;
        } else {
            state.audit.record_refusal(&e).await;
        }
    }
    resp
}

/// Whether a path is the web console's (`/console` and below). No DPS path starts so: the
/// device API's first segment is an ID scope (`0ne…`), the service API's a collection.
fn is_console(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// Hands a request to the console, with the client's address, under the request deadline.
async fn console_request(state: &AppState, console: Router, mut request: Request) -> Response {
    use tower::ServiceExt as _;
    if let Some(ip) = request.extensions().get::<super::PeerAddr>().map(|a| a.0) {
        request.extensions_mut().insert(provisio_console::ClientIp(ip));
    }
    // HTTP/2 carries the host as `:authority` (in the URI), not as a Host header: the
    // console compares Origin with Host, so it gets one.
    if !request.headers().contains_key(header::HOST)
        && let Some(v) = request.uri().authority().and_then(|a| axum::http::HeaderValue::from_str(a.as_str()).ok())
    {
        request.headers_mut().insert(header::HOST, v);
    }
    match tokio::time::timeout(state.request_timeout, console.oneshot(request)).await {
        Ok(Ok(r)) => r,
        Ok(Err(never)) => match never {},
        Err(_) => response::error(&Error::Timeout),
    }
}

/// Whether a request would change state through the service API (those are audited).
fn is_service_change(req: &Req) -> bool {
    const SERVICE: &[&str] = &[
        "enrollments",
        "enrollmentgroups",
        "registrations",
        "linkedhubs",
        "policies",
        "certificates",
        "certificateauthorities",
        "credentialpolicies",
    ];
    let Some(first) = req.segments.first() else { return false };
    let read_only_post = req.segments.last().is_some_and(|l| is(l, "query") || is(l, "attestationmechanism"));
    SERVICE.iter().any(|s| is(first, s))
        && !matches!(req.method, Method::GET | Method::HEAD | Method::OPTIONS)
        && !(req.method == Method::POST && read_only_post)
}

/// Whether a service request reads secrets: an enrollment's or group's keys
/// (`attestationmechanism`), or shared access policies with their keys. Those reads are
/// audited like changes.
fn returns_secrets(req: &Req) -> bool {
    match req.segments.as_slice() {
        [c, _, a] if is(c, "enrollments") || is(c, "enrollmentgroups") => {
            is(a, "attestationmechanism") && req.method == Method::POST
        }
        [p] | [p, _] if is(p, "policies") => req.method == Method::GET,
        _ => false,
    }
}

/// The policy a service request claims to act as (`skn` of its SAS token); never more of
/// the token than that.
fn key_name(req: &Req) -> Option<String> {
    let raw = req.header(header::AUTHORIZATION.as_str())?;
    provisio_core::sas::SasToken::parse(raw).ok().and_then(|t| t.skn).map(|k| shorten(&k))
}

fn is(seg: &str, lit: &str) -> bool {
    seg.eq_ignore_ascii_case(lit)
}

fn method_not_allowed(req: &Req, allowed: &str) -> Error {
    Error::MethodNotAllowed(format!(
        "Method {} is not allowed on {}; allowed: {allowed}.",
        req.method,
        shorten(&req.path)
    ))
}

async fn route(state: &AppState, req: Req) -> Result<Response, Error> {
    let seg: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let m = req.method.clone();
    match seg.as_slice() {
        [h] if is(h, "health") => {
            if m == Method::GET || m == Method::HEAD {
                Ok(response::json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
            } else {
                Err(method_not_allowed(&req, "GET"))
            }
        }
        // Service API: bulk, query, /enrollments/{id}, /enrollmentGroups/{id}, attestationmechanism.
        [c] if is(c, "enrollments") || is(c, "enrollmentgroups") => {
            let group = is(c, "enrollmentgroups");
            if m == Method::POST {
                service::bulk(state, &req, group).await
            } else {
                Err(method_not_allowed(&req, "POST"))
            }
        }
        [c, q] if (is(c, "enrollments") || is(c, "enrollmentgroups")) && is(q, "query") && m == Method::POST => {
            let target =
                if is(c, "enrollmentgroups") { QueryTarget::EnrollmentGroups } else { QueryTarget::Enrollments };
            service::query(state, &req, target).await
        }
        [c, id] if is(c, "enrollments") || is(c, "enrollmentgroups") => {
            let group = is(c, "enrollmentgroups");
            let id = (*id).to_owned();
            match m {
                Method::GET => service::get(state, &req, group, &id).await,
                Method::PUT => service::put(state, &req, group, &id).await,
                Method::DELETE => service::delete(state, &req, group, &id).await,
                _ => Err(method_not_allowed(&req, "GET, PUT, DELETE")),
            }
        }
        [c, id, a] if (is(c, "enrollments") || is(c, "enrollmentgroups")) && is(a, "attestationmechanism") => {
            let (group, id) = (is(c, "enrollmentgroups"), (*id).to_owned());
            if m == Method::POST {
                service::attestation_mechanism(state, &req, group, &id).await
            } else {
                Err(method_not_allowed(&req, "POST"))
            }
        }
        // Registration states.
        [r, id] if is(r, "registrations") => {
            let id = (*id).to_owned();
            match m {
                Method::GET | Method::DELETE => service::registration(state, &req, &id).await,
                _ => Err(method_not_allowed(&req, "GET, DELETE")),
            }
        }
        [r, group, q] if is(r, "registrations") && is(q, "query") => {
            let group = (*group).to_owned();
            if m == Method::POST {
                service::query(state, &req, QueryTarget::GroupRegistrations(group)).await
            } else {
                Err(method_not_allowed(&req, "POST"))
            }
        }
        // Linked hubs (Provisio's admin API).
        [h] if is(h, "linkedhubs") => {
            if m == Method::GET {
                service::list_hubs(state, &req).await
            } else {
                Err(method_not_allowed(&req, "GET"))
            }
        }
        [h, name] if is(h, "linkedhubs") => {
            let name = (*name).to_owned();
            match m {
                Method::GET | Method::PUT | Method::DELETE => service::hub(state, &req, &name).await,
                _ => Err(method_not_allowed(&req, "GET, PUT, DELETE")),
            }
        }
        // Shared access policies (Provisio's admin API).
        [p] if is(p, "policies") => {
            if m == Method::GET {
                service::list_policies(state, &req).await
            } else {
                Err(method_not_allowed(&req, "GET"))
            }
        }
        [p, name] if is(p, "policies") => {
            let name = (*name).to_owned();
            match m {
                Method::GET | Method::PUT | Method::DELETE => service::policy(state, &req, &name).await,
                _ => Err(method_not_allowed(&req, "GET, PUT, DELETE")),
            }
        }
        [p, name, a] if is(p, "policies") && is(a, "regeneratekey") => {
            let name = (*name).to_owned();
            if m == Method::POST {
                service::regenerate_policy_key(state, &req, &name).await
            } else {
                Err(method_not_allowed(&req, "POST"))
            }
        }
        // Certificates API.
        [c] if is(c, "certificates") => {
            if m == Method::GET {
                service::list_certificates(state, &req).await
            } else {
                Err(method_not_allowed(&req, "GET"))
            }
        }
        [c, name] if is(c, "certificates") => {
            let name = (*name).to_owned();
            match m {
                Method::GET | Method::PUT | Method::DELETE => service::certificate(state, &req, &name).await,
                _ => Err(method_not_allowed(&req, "GET, PUT, DELETE")),
            }
        }
        [c, name, action]
            if is(c, "certificates") && (is(action, "generateverificationcode") || is(action, "verify")) =>
        {
            let (name, verify) = ((*name).to_owned(), is(action, "verify"));
            if m == Method::POST {
                service::certificate_action(state, &req, &name, verify).await
            } else {
                Err(method_not_allowed(&req, "POST"))
            }
        }
        [r, id, a] if is(r, "registrations") && is(a, "revokecertificates") => {
            let id = (*id).to_owned();
            if m == Method::POST {
                service::revoke_certificates(state, &req, &id).await
            } else {
                Err(method_not_allowed(&req, "POST"))
            }
        }
        // Operational certificates (issue #26): issuing CAs, certificate policies, CRLs.
        [c] if is(c, "certificateauthorities") => {
            if m == Method::GET {
                service::list_certificate_authorities(state, &req).await
            } else {
                Err(method_not_allowed(&req, "GET"))
            }
        }
        [c, name] if is(c, "certificateauthorities") => {
            let name = (*name).to_owned();
            match m {
                Method::GET | Method::PUT | Method::DELETE => service::certificate_authority(state, &req, &name).await,
                _ => Err(method_not_allowed(&req, "GET, PUT, DELETE")),
            }
        }
        [c] if is(c, "credentialpolicies") => {
            if m == Method::GET {
                service::list_credential_policies(state, &req).await
            } else {
                Err(method_not_allowed(&req, "GET"))
            }
        }
        [c, name] if is(c, "credentialpolicies") => {
            let name = (*name).to_owned();
            match m {
                Method::GET | Method::PUT | Method::DELETE => service::credential_policy(state, &req, &name).await,
                _ => Err(method_not_allowed(&req, "GET, PUT, DELETE")),
            }
        }
        [c, file] if is(c, "crl") => {
            let file = (*file).to_owned();
            if m == Method::GET { service::crl(state, &file).await } else { Err(method_not_allowed(&req, "GET")) }
        }
        [r, id, a] if is(r, "registrations") && is(a, "audit") => {
            let id = (*id).to_owned();
            if m == Method::GET { service::audit(state, &req, &id).await } else { Err(method_not_allowed(&req, "GET")) }
        }
        // Device API.
        [scope, r, id, op] if is(r, "registrations") && is(op, "register") => {
            if m == Method::PUT {
                Ok(device::serve(state, &req, scope, id, DeviceOperation::Register { body: &req.body }).await)
            } else {
                Err(method_not_allowed(&req, "PUT"))
            }
        }
        [scope, r, id, ops, op_id] if is(r, "registrations") && is(ops, "operations") => {
            if m == Method::GET {
                // The body of a poll carries nothing (Node sends `{}`; its size was bounded).
                Ok(device::serve(state, &req, scope, id, DeviceOperation::OperationStatus { operation_id: op_id })
                    .await)
            } else {
                Err(method_not_allowed(&req, "GET"))
            }
        }
        [scope, r, id] if is(r, "registrations") => {
            if m == Method::POST {
                Ok(device::serve(state, &req, scope, id, DeviceOperation::RegistrationStatus { body: &req.body }).await)
            } else {
                Err(method_not_allowed(&req, "POST"))
            }
        }
        _ => Err(Error::NotFound {
            code: provisio_proto::error::codes::NOT_FOUND,
            message: format!("No such route: {} {}.", req.method, shorten(&req.path)),
        }),
    }
}
