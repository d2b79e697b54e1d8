//! What every page shares: the signed-in context, the layout's data, errors as DPS shows
//! them, and responses with the console's security headers.

use std::sync::Arc;

use askama::Template;
use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use provisio_engine::{
    Error,
    audit::{Entry, Kind},
    service::{Caller, Right},
};

use crate::{
    ClientIp, Console,
    session::{self, Claims},
};

/// `Content-Security-Policy` of every answer: the console's own origin only, no inline
/// script or style, no framing.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                              form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A DPS error, as a page shows it.
#[derive(Debug, Clone)]
pub(crate) struct ErrorView {
    pub(crate) code: u32,
    pub(crate) tracking_id: String,
    pub(crate) message: String,
}

impl From<&Error> for ErrorView {
    fn from(e: &Error) -> Self {
        // The body is built (and the failure logged with its tracking id) as for the APIs.
        let body = e.to_body();
        Self { code: body.error_code, tracking_id: body.tracking_id, message: body.message }
    }
}

/// Which sections the signed-in policy may open (the navigation shows only those).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Nav {
    pub(crate) enrollments: bool,
    pub(crate) certificates: bool,
    pub(crate) registrations: bool,
    pub(crate) admin: bool,
}

/// The layout's data.
#[derive(Debug, Clone)]
pub(crate) struct Page {
    pub(crate) title: String,
    pub(crate) section: &'static str,
    pub(crate) policy: String,
    pub(crate) csrf: String,
    pub(crate) nav: Nav,
    pub(crate) flash: Option<String>,
    pub(crate) error: Option<ErrorView>,
}

/// A signed-in request.
pub(crate) struct Ctx {
    pub(crate) caller: Caller,
    pub(crate) claims: Claims,
    pub(crate) csrf: String,
    pub(crate) flash: Option<String>,
    /// The refreshed session cookie (its idle expiry slides), and the spent flash cookie.
    pub(crate) cookies: Vec<String>,
    pub(crate) ip: Option<std::net::IpAddr>,
}

impl Ctx {
    pub(crate) fn may(&self, right: Right) -> bool {
        self.caller.may(right)
    }

    /// The layout's data for a page of `section`.
    pub(crate) fn page(&self, title: impl Into<String>, section: &'static str) -> Page {
        Page {
            title: title.into(),
            section,
            policy: self.caller.policy.clone(),
            csrf: self.csrf.clone(),
            nav: Nav {
                enrollments: self.may(Right::EnrollmentRead),
                certificates: self.may(Right::ServiceConfig),
                registrations: self.may(Right::RegistrationStatusRead),
                admin: self.may(Right::ServiceConfig),
            },
            flash: self.flash.clone(),
            error: None,
        }
    }

    /// Records a change made through the console, as the service API records its own: the
    /// action names the equivalent service API request.
    pub(crate) async fn audit(&self, console: &Console, action: String, error: Option<&Error>) {
        let mut e = Entry::new(Kind::Service, action);
        e.transport = Some("console".into());
        e.peer = self.ip;
        e.credential = Some(self.caller.policy.clone());
        match error {
            None => {
                e.status = 200;
                e.result = "ok".into();
            }
            Some(err) => {
                e.status = err.status();
                e.result = "refused".into();
                e.error_code = Some(err.code());
                e.reason = Some(err.detail().map_or_else(|| err.to_string(), str::to_owned));
                e.tracking_id = err.tracking_id().map(str::to_owned);
            }
        }
        console.parts.audit.record(&e).await;
    }
}

/// Unix seconds.
pub(crate) fn unix_now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
        .unwrap_or(i64::MAX)
}

/// Where a signed-out browser is sent.
pub(crate) fn to_sign_in() -> Response {
    redirect("/console/sign-in", Vec::new())
}

impl Console {
    /// The session of a request, or the sign-in page (a session that ended is cleared).
    pub(crate) async fn context(&self, headers: &HeaderMap, ip: Option<ClientIp>) -> Result<Ctx, Response> {
        // Over HTTP/2 a browser sends each cookie in a `cookie` header of its own (RFC 9113
        // §8.2.3): all of them are read, not just the first.
        let cookies: Vec<&str> = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).collect();
        let cookies = cookies.join("; ");
        let cookies = cookies.as_str();
        let Some(value) = session::cookie(cookies, session::COOKIE) else { return Err(to_sign_in()) };
        let now = unix_now();
        let Ok(mut claims) = self.signer.open(value, now) else {
            return Err(redirect("/console/sign-in", vec![session::set_cookie(session::COOKIE, "", 0)]));
        };
        let caller = match self.parts.service.caller(&claims.p, &claims.f).await {
            Ok(c) => c,
            Err(e) if e.status() == 401 => {
                return Err(redirect("/console/sign-in", vec![session::set_cookie(session::COOKIE, "", 0)]));
            }
            Err(e) => return Err(error_page(&e)),
        };
        claims.s = now;
        let mut set = vec![session::set_cookie(session::COOKIE, &self.signer.seal(&claims), session::ABSOLUTE_SECS)];
        let flash = session::cookie(cookies, session::FLASH).and_then(|f| self.signer.open_flash(f));
        if flash.is_some() {
            set.push(session::set_cookie(session::FLASH, "", 0));
        }
        let csrf = self.signer.csrf(&claims);
        Ok(Ctx { caller, claims, csrf, flash, cookies: set, ip: ip.map(|i| i.0) })
    }

    /// The session of a request whose policy must have `right` (else the `403` page).
    pub(crate) async fn context_with(
        &self,
        headers: &HeaderMap,
        ip: Option<ClientIp>,
        right: Right,
    ) -> Result<Ctx, Response> {
        let ctx = self.context(headers, ip).await?;
        ctx.caller.require(right).map_err(|e| error_page(&e))?;
        Ok(ctx)
    }

    /// A form submission and its session: an `Origin` (or, without one, a `Referer`) of this
    /// very host, a session, and the form's CSRF token. The body is read only once the
    /// origin and the session are known: a request without a session costs no body read.
    pub(crate) async fn submitted(
        &self,
        request: axum::extract::Request,
    ) -> Result<(Ctx, crate::form::Form), Response> {
        let ip = request.extensions().get::<ClientIp>().copied();
        let headers = request.headers().clone();
        if !same_origin(&headers) {
            return Err(forbidden("This form was sent from another site (its Origin is not this console's)."));
        }
        let ctx = self.context(&headers, ip).await?;
        let form = crate::form::Form::read(request).await.map_err(|e| error_page(&e))?;
        if !form.get("_csrf").is_some_and(|t| self.signer.csrf_ok(&ctx.claims, t)) {
            return Err(forbidden("This form's CSRF token is missing or belongs to another session; reload the page."));
        }
        Ok((ctx, form))
    }

    /// A redirect after a change, with a message for the next page.
    pub(crate) fn done(&self, ctx: &Ctx, to: &str, message: &str) -> Response {
        let mut cookies = ctx.cookies.clone();
        cookies.retain(|c| !c.starts_with(session::FLASH));
        cookies.push(session::set_cookie(session::FLASH, &self.signer.flash(message), 60));
        redirect(to, cookies)
    }
}

/// Whether a request's `Origin` (or `Referer`) is this host, over HTTPS.
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else { return false };
    let expected = format!("https://{host}");
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        return origin.eq_ignore_ascii_case(&expected);
    }
    headers.get(header::REFERER).and_then(|v| v.to_str().ok()).is_some_and(|r| {
        r.len() > expected.len()
            && r[..expected.len()].eq_ignore_ascii_case(&expected)
            && r[expected.len()..].starts_with('/')
    })
}

/// Adds the console's headers to a response.
fn secure(mut r: Response, cookies: &[String]) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    r
}

/// An HTML page.
pub(crate) fn html(status: StatusCode, body: String, cookies: &[String]) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    secure(r, cookies)
}

/// Renders a template (a failure to render is our bug: an internal error page).
pub(crate) fn render<T: Template>(status: StatusCode, t: &T, cookies: &[String]) -> Response {
    match t.render() {
        Ok(body) => html(status, body, cookies),
        Err(e) => error_page(&Error::Internal(format!("rendering a console page: {e}"))),
    }
}

/// `303 See Other` to `to`.
pub(crate) fn redirect(to: &str, cookies: Vec<String>) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    secure(r, &cookies)
}

/// A page that only says what went wrong.
#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage {
    title: String,
    error: ErrorView,
}

/// The error page for `e`, with its status.
pub(crate) fn error_page(e: &Error) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let page = MessagePage { title: status.canonical_reason().unwrap_or("Error").to_owned(), error: e.into() };
    match page.render() {
        Ok(body) => html(status, body, &[]),
        Err(_) => html(status, format!("{} {}", e.code(), status), &[]),
    }
}

/// `403` with a reason.
pub(crate) fn forbidden(message: &str) -> Response {
    error_page(&Error::Forbidden(message.to_owned()))
}

/// Unknown console paths.
pub(crate) async fn not_found() -> Response {
    error_page(&Error::NotFound {
        code: provisio_proto::error::codes::NOT_FOUND,
        message: "No such console page.".into(),
    })
}

/// The stylesheet and the script, compiled in.
pub(crate) async fn asset(State(_): State<Arc<Console>>, Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (include_str!("../assets/console.css"), "text/css; charset=utf-8"),
        "console.js" => (include_str!("../assets/console.js"), "text/javascript; charset=utf-8"),
        "favicon.svg" => (include_str!("../assets/favicon.svg"), "image/svg+xml"),
        _ => return not_found().await,
    };
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    let mut r = secure(r, &[]);
    // Compiled into the binary: they change only with it.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    r
}
