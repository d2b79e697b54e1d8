//! Sign-in, sign-out, the overview and its chart.

use std::sync::Arc;

use askama::Template;
use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use provisio_engine::{
    Error,
    audit::{Entry, Kind},
    service::parse_connection_string,
};

use crate::{
    ClientIp, Console,
    form::Form,
    session,
    view::{self, Ctx, ErrorView, Page},
};

/// `/console`: the overview, or the sign-in page.
pub(crate) async fn root(State(c): State<Arc<Console>>, headers: HeaderMap, request: Request) -> Response {
    let ip = request.extensions().get::<ClientIp>().copied();
    match c.context(&headers, ip).await {
        Ok(ctx) => view::redirect("/console/overview", ctx.cookies),
        Err(r) => r,
    }
}

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignIn {
    error: Option<ErrorView>,
    name: String,
}

/// The sign-in page.
pub(crate) async fn sign_in_page() -> Response {
    view::render(StatusCode::OK, &SignIn { error: None, name: String::new() }, &[])
}

/// Checks a sign-in: a connection string, or a policy name and key, as the service API
/// checks a policy. Limited per client address; refusals within the limit are audited.
pub(crate) async fn sign_in(State(c): State<Arc<Console>>, request: Request) -> Response {
    let ip = request.extensions().get::<ClientIp>().map(|i| i.0);
    let headers = request.headers().clone();
    if !view::same_origin(&headers) {
        return view::forbidden("This form was sent from another site (its Origin is not this console's).");
    }
    let form = match Form::read(request).await {
        Ok(f) => f,
        Err(e) => return view::error_page(&e),
    };
    // The limit comes first: past it, an attempt costs neither a store read nor an audit
    // line (a flood of refusals would otherwise rotate the audit log's history away).
    if let Err(wait) = c.sign_ins.hit(&ip.map_or_else(|| "-".to_owned(), |i| i.to_string())) {
        let (e, _) = Error::Throttled(wait.as_secs().max(1)).tracked();
        tracing::debug!(peer = ?ip, "console sign-in over the per-address limit");
        let page = SignIn { error: Some(ErrorView::from(&e)), name: form.raw("name").to_owned() };
        return view::render(StatusCode::TOO_MANY_REQUESTS, &page, &[]);
    }
    let (name, key) = match (form.get("connection_string"), form.get("name"), form.get("key")) {
        (Some(cs), _, _) => match parse_connection_string(cs) {
            Ok(nk) => nk,
            Err(e) => return refused(&c, ip, "", e, String::new()).await,
        },
        (None, Some(n), Some(k)) => (n.to_owned(), k.to_owned()),
        _ => {
            let e = Error::invalid("Give a connection string, or a policy name and its key.");
            return refused(&c, ip, "", e, form.raw("name").to_owned()).await;
        }
    };
    match c.parts.service.sign_in(&name, &key).await {
        Ok(caller) => {
            let claims = c.signer.issue(&caller.policy, &caller.key_fingerprint, view::unix_now());
            let mut e = Entry::new(Kind::Service, "console sign-in");
            e.transport = Some("console".into());
            e.peer = ip;
            e.credential = Some(caller.policy.clone());
            e.status = 200;
            e.result = "ok".into();
            c.parts.audit.record(&e).await;
            let cookie = session::set_cookie(session::COOKIE, &c.signer.seal(&claims), session::ABSOLUTE_SECS);
            view::redirect("/console/overview", vec![cookie])
        }
        Err(e) => refused(&c, ip, &name, e, name.clone()).await,
    }
}

/// A refused sign-in: audited, and the form again with the error (and the name typed).
async fn refused(c: &Console, ip: Option<std::net::IpAddr>, name: &str, e: Error, typed: String) -> Response {
    let (e, tracking_id) = e.tracked();
    let mut entry = Entry::new(Kind::Service, "console sign-in");
    entry.transport = Some("console".into());
    entry.peer = ip;
    entry.credential = (!name.is_empty()).then(|| provisio_core::text::shorten(name));
    entry.status = e.status();
    entry.result = "refused".into();
    entry.error_code = Some(e.code());
    entry.reason = Some(e.detail().map_or_else(|| e.to_string(), str::to_owned));
    entry.tracking_id = Some(tracking_id);
    c.parts.audit.record(&entry).await;
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    view::render(status, &SignIn { error: Some(ErrorView::from(&e)), name: typed }, &[])
}

/// Ends the session.
pub(crate) async fn sign_out(State(c): State<Arc<Console>>, request: Request) -> Response {
    match c.submitted(request).await {
        Ok(_) => view::redirect("/console/sign-in", vec![session::set_cookie(session::COOKIE, "", 0)]),
        Err(r) => r,
    }
}

#[derive(Template)]
#[template(path = "overview.html")]
struct Overview {
    page: Page,
    id_scope: String,
    device_endpoint: String,
    service_endpoint: String,
    mqtt_endpoint: String,
    amqp_endpoint: String,
    enrollments: u64,
    groups: u64,
    registrations: u64,
    by_status: Vec<(String, u64)>,
    last_hour: u64,
}

/// The overview: the instance's facts, counts, and the chart.
pub(crate) async fn overview(State(c): State<Arc<Console>>, headers: HeaderMap, request: Request) -> Response {
    let ip = request.extensions().get::<ClientIp>().copied();
    let ctx = match c.context(&headers, ip).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let counts = match c.parts.service.counts().await {
        Ok(x) => x,
        Err(e) => return view::error_page(&e),
    };
    let last_hour = match c.parts.engine.registrations_per_minute(60).await {
        Ok(m) => m.iter().map(|(_, c)| c.total()).sum(),
        Err(e) => return view::error_page(&e),
    };
    let info = &c.parts.info;
    let page = Overview {
        page: ctx.page("Overview", "overview"),
        id_scope: info.id_scope.clone(),
        device_endpoint: info.device_endpoint.clone(),
        service_endpoint: info.https_endpoint.clone(),
        mqtt_endpoint: info.mqtt_endpoint.clone().unwrap_or_else(|| "off".into()),
        amqp_endpoint: info.amqp_endpoint.clone().unwrap_or_else(|| "off".into()),
        enrollments: counts.enrollments,
        groups: counts.groups,
        registrations: counts.registrations,
        by_status: counts.registrations_by_status,
        last_hour,
    };
    view::render(StatusCode::OK, &page, &ctx.cookies)
}

/// The chart, as SVG.
pub(crate) async fn chart(State(c): State<Arc<Console>>, headers: HeaderMap, request: Request) -> Response {
    let ip = request.extensions().get::<ClientIp>().copied();
    let ctx: Ctx = match c.context(&headers, ip).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let minutes = match c.parts.engine.registrations_per_minute(60).await {
        Ok(m) => m,
        Err(e) => return view::error_page(&e),
    };
    let mut r = (StatusCode::OK, crate::chart::svg(&minutes)).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(view::CSP));
    r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    for cookie in &ctx.cookies {
        if let Ok(v) = HeaderValue::from_str(cookie) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}
