//! Linked IoT hubs, Shared access policies and the Audit log: the instance's settings,
//! for a policy with `ServiceConfig`.

use std::sync::Arc;

use askama::Template;
use axum::{
    extract::{Query, Request, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use provisio_core::model::LinkedHub;
use provisio_engine::{
    Error,
    audit::{self, Filter, Kind},
    service::{ALL_RIGHTS, Right},
};
use provisio_proto::service::SharedAccessPolicy;
use serde::Deserialize;

use super::enrollments::{Confirm, submitted_with};
use crate::{
    ClientIp, Console,
    form::Form,
    view::{self, Ctx, ErrorView, Page},
};

async fn admin(c: &Console, headers: &HeaderMap, ip: Option<ClientIp>) -> Result<Ctx, Response> {
    c.context_with(headers, ip, Right::ServiceConfig).await
}

/// A page's `?edit=` or `?show=`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Pick {
    edit: Option<String>,
    show: Option<String>,
}

/// The hub form's values.
#[derive(Debug, Clone)]
struct HubValues {
    name: String,
    weight: String,
    apply: bool,
    region: String,
    registrar: String,
    editing: bool,
}

impl HubValues {
    fn of(h: &LinkedHub) -> Self {
        Self {
            name: h.host_name.clone(),
            weight: h.allocation_weight.to_string(),
            apply: h.apply_allocation_policy,
            region: h.region.clone().unwrap_or_default(),
            registrar: h.registrar_webhook_url.clone().unwrap_or_default(),
            editing: true,
        }
    }

    fn fresh() -> Self {
        Self {
            name: String::new(),
            weight: "1".into(),
            apply: true,
            region: String::new(),
            registrar: String::new(),
            editing: false,
        }
    }

    fn from_form(f: &Form) -> Self {
        Self {
            name: f.raw("name").trim().to_owned(),
            weight: f.raw("weight").trim().to_owned(),
            apply: f.checked("apply"),
            region: f.raw("region").trim().to_owned(),
            registrar: f.raw("registrar").trim().to_owned(),
            editing: f.checked("editing"),
        }
    }

    fn hub(&self) -> Result<LinkedHub, Error> {
        let weight = self
            .weight
            .parse::<u32>()
            .map_err(|_| Error::invalid("The allocation weight is a whole number from 1 to 1000."))?;
        Ok(LinkedHub {
            host_name: self.name.clone(),
            allocation_weight: weight,
            apply_allocation_policy: self.apply,
            region: (!self.region.is_empty()).then(|| self.region.clone()),
            registrar_webhook_url: (!self.registrar.is_empty()).then(|| self.registrar.clone()),
        })
    }
}

#[derive(Template)]
#[template(path = "hubs.html")]
struct Hubs {
    page: Page,
    hubs: Vec<LinkedHub>,
    v: HubValues,
}

async fn hubs_page(c: &Console, ctx: &Ctx, v: HubValues, error: Option<ErrorView>) -> Response {
    let hubs = match c.parts.hubs.list().await {
        Ok(h) => h,
        Err(e) => return view::error_page(&e),
    };
    let status = if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    let mut page = ctx.page("Linked IoT hubs", "hubs");
    page.error = error;
    view::render(status, &Hubs { page, hubs, v }, &ctx.cookies)
}

/// Linked IoT hubs: the list, and the form to add one or (`?edit=`) change one.
pub(crate) async fn hubs(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(p): Query<Pick>,
    request: Request,
) -> Response {
    let ctx = match admin(&c, &headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let v = match p.edit.as_deref() {
        Some(name) => match c.parts.hubs.get(name).await {
            Ok(h) => HubValues::of(&h),
            Err(e) => return view::error_page(&e),
        },
        None => HubValues::fresh(),
    };
    hubs_page(&c, &ctx, v, None).await
}

/// Save (add or change) or Remove (after a confirmation) a linked hub.
pub(crate) async fn hub_action(State(c): State<Arc<Console>>, request: Request) -> Response {
    let (ctx, form) = match submitted_with(&c, request, Right::ServiceConfig).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let v = HubValues::from_form(&form);
    let short = provisio_core::text::shorten(&v.name);
    match form.get("action") {
        Some("save") => {
            let result =
                async { c.parts.hubs.put(&v.name, v.hub()?).await.map(|_| ()) }.await.map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("PUT /linkedHubs/{short}"), result.as_ref().err()).await;
            match result {
                Ok(()) => c.done(&ctx, "/console/hubs", "Saved."),
                Err(e) => hubs_page(&c, &ctx, v, Some(ErrorView::from(&e))).await,
            }
        }
        Some("remove") if form.get("confirm") != Some("yes") => {
            let page = Confirm {
                page: ctx.page("Remove", "hubs"),
                question: format!(
                    "Unlink {}? Devices assigned to it stay there until they register again; no new device is assigned to it.",
                    v.name
                ),
                action: "/console/hubs".into(),
                fields: vec![("action".into(), "remove".into()), ("name".into(), v.name.clone())],
                cancel: "/console/hubs".into(),
            };
            view::render(StatusCode::OK, &page, &ctx.cookies)
        }
        Some("remove") => {
            let result = c.parts.hubs.delete(&v.name).await.map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("DELETE /linkedHubs/{short}"), result.as_ref().err()).await;
            match result {
                Ok(()) => c.done(&ctx, "/console/hubs", "Removed."),
                Err(e) => hubs_page(&c, &ctx, HubValues::fresh(), Some(ErrorView::from(&e))).await,
            }
        }
        _ => view::error_page(&Error::invalid("Unknown action.")),
    }
}

/// A policy row.
struct PolicyRow {
    name: String,
    rights: String,
}

#[derive(Template)]
#[template(path = "policies.html")]
struct Policies {
    page: Page,
    rows: Vec<PolicyRow>,
    /// The policy whose connection strings are shown: (name, primary, secondary).
    shown: Option<(String, String, String)>,
    /// The form: name, rights checked, editing.
    name: String,
    rights: Vec<(&'static str, bool)>,
    editing: bool,
}

fn connection_string(c: &Console, name: &str, key: &str) -> String {
    let host =
        c.parts.info.service_connection_string.split(';').find_map(|p| p.strip_prefix("HostName=")).unwrap_or_default();
    format!("HostName={host};SharedAccessKeyName={name};SharedAccessKey={key}")
}

async fn policies_page(
    c: &Console,
    ctx: &Ctx,
    show: Option<&str>,
    form: (String, Vec<String>, bool),
    error: Option<ErrorView>,
) -> Response {
    let policies = match c.parts.service.list_policies().await {
        Ok(p) => p,
        Err(e) => return view::error_page(&e),
    };
    let shown = show.and_then(|s| policies.iter().find(|p| p.key_name.eq_ignore_ascii_case(s))).map(|p| {
        (
            p.key_name.clone(),
            connection_string(c, &p.key_name, p.primary_key.as_deref().unwrap_or_default()),
            connection_string(c, &p.key_name, p.secondary_key.as_deref().unwrap_or_default()),
        )
    });
    // Connection strings carry the policy's keys: shown, they are audited as the service
    // API's read of the policy.
    if let Some((name, _, _)) = &shown {
        ctx.audit(c, format!("GET /policies/{}", provisio_core::text::shorten(name)), None).await;
    }
    let rows = policies.iter().map(|p| PolicyRow { name: p.key_name.clone(), rights: p.rights.clone() }).collect();
    let (name, checked, editing) = form;
    let rights = ALL_RIGHTS.iter().map(|r| (*r, checked.iter().any(|c| c.eq_ignore_ascii_case(r)))).collect();
    let status = if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    let mut page = ctx.page("Shared access policies", "policies");
    page.error = error;
    view::render(status, &Policies { page, rows, shown, name, rights, editing }, &ctx.cookies)
}

/// Shared access policies: the list, `?show=` a policy's connection strings, `?edit=` its
/// rights.
pub(crate) async fn policies(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(p): Query<Pick>,
    request: Request,
) -> Response {
    let ctx = match admin(&c, &headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let form = match p.edit.as_deref() {
        Some(name) => match c.parts.service.get_policy(name).await {
            Ok(pol) => (pol.key_name, pol.rights.split(',').map(|r| r.trim().to_owned()).collect(), true),
            Err(e) => return view::error_page(&e),
        },
        None => (String::new(), Vec::new(), false),
    };
    policies_page(&c, &ctx, p.show.as_deref(), form, None).await
}

/// Add or change a policy's rights, Regenerate a key, Remove (after a confirmation).
pub(crate) async fn policy_action(State(c): State<Arc<Console>>, request: Request) -> Response {
    let (ctx, form) = match submitted_with(&c, request, Right::ServiceConfig).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let name = form.get("name").unwrap_or_default().to_owned();
    let short = provisio_core::text::shorten(&name);
    let rights: Vec<String> = form.all("rights").into_iter().map(str::to_owned).collect();
    let editing = form.checked("editing");
    let result = match form.get("action") {
        Some("save") => {
            let body = SharedAccessPolicy {
                key_name: name.clone(),
                primary_key: None,
                secondary_key: None,
                rights: rights.join(", "),
            };
            let r = c.parts.service.put_policy(&name, body).await.map(|_| ()).map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("PUT /policies/{short}"), r.as_ref().err()).await;
            r.map(|()| "Saved.".to_owned())
        }
        Some(which @ ("regenerate-primary" | "regenerate-secondary")) => {
            let key_type = which.trim_start_matches("regenerate-");
            let r = c.parts.service.regenerate_policy_key(&name, key_type).await.map(|_| ()).map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("POST /policies/{short}/regenerateKey"), r.as_ref().err()).await;
            r.map(|()| format!("The {key_type} key of {name} was regenerated: sessions and clients that used the old key must sign in again."))
        }
        Some("remove") if form.get("confirm") != Some("yes") => {
            let page = Confirm {
                page: ctx.page("Remove", "policies"),
                question: format!(
                    "Remove policy {name}? Every client and console session using it is refused from now on."
                ),
                action: "/console/policies".into(),
                fields: vec![("action".into(), "remove".into()), ("name".into(), name.clone())],
                cancel: "/console/policies".into(),
            };
            return view::render(StatusCode::OK, &page, &ctx.cookies);
        }
        Some("remove") => {
            let r = c.parts.service.delete_policy(&name).await.map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("DELETE /policies/{short}"), r.as_ref().err()).await;
            r.map(|()| "Removed.".to_owned())
        }
        _ => Err(Error::invalid("Unknown action.")),
    };
    match result {
        // A change to the signed-in policy itself may end this session: the next page says so.
        Ok(message) => c.done(&ctx, "/console/policies", &message),
        Err(e) => policies_page(&c, &ctx, None, (name, rights, editing), Some(ErrorView::from(&e))).await,
    }
}

/// The audit log's filter.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuditQuery {
    registration_id: Option<String>,
    tracking_id: Option<String>,
    kind: Option<String>,
    since: Option<String>,
}

/// An audit line as the page shows it.
struct Line {
    time: String,
    kind: &'static str,
    action: String,
    registration_id: String,
    transport: String,
    peer: String,
    credential: String,
    result: String,
    status: u16,
    code: String,
    reason: String,
    tracking_id: String,
    hub: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    page: Page,
    registration_id: String,
    tracking_id: String,
    kind: String,
    since: String,
    lines: Vec<Line>,
    complete: bool,
    off: bool,
}

/// Lines an audit page shows at most.
const AUDIT_LINES: usize = 200;

/// The audit log, newest first, filtered by registration id, tracking id, kind and time.
pub(crate) async fn audit(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
    request: Request,
) -> Response {
    let ctx = match admin(&c, &headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let clean = |s: &Option<String>| s.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
    let kind = match clean(&q.kind).as_deref() {
        None => None,
        Some("registration") => Some(Kind::Registration),
        Some("service") => Some(Kind::Service),
        Some(_) => return view::error_page(&Error::invalid("kind is 'registration' or 'service'.")),
    };
    let since = clean(&q.since);
    if let Some(s) = &since
        && time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_err()
        && time::Date::parse(s, &time::macros::format_description!("[year]-[month]-[day]")).is_err()
    {
        return view::error_page(&Error::invalid(
            "Since is a date (2026-12-01) or an RFC 3339 time (2026-12-01T10:00:00Z).",
        ));
    }
    let filter = Filter {
        registration_id: clean(&q.registration_id),
        tracking_id: clean(&q.tracking_id),
        kind,
        since: since.clone(),
    };
    let (lines, complete, off) = match &c.parts.audit_file {
        None => (Vec::new(), true, true),
        Some((path, keep)) => {
            let (path, keep, f) = (path.clone(), *keep, filter.clone());
            match tokio::task::spawn_blocking(move || {
                audit::recent(&path, keep, &f, AUDIT_LINES, 4 * super::registrations::SCAN_BYTES)
            })
            .await
            {
                Ok(Ok(r)) => (r.entries, r.complete, false),
                Ok(Err(e)) => return view::error_page(&Error::Internal(format!("reading the audit log: {e}"))),
                Err(e) => return view::error_page(&Error::Internal(format!("reading the audit log: {e}"))),
            }
        }
    };
    let lines = lines
        .into_iter()
        .map(|e| Line {
            kind: if e.kind == Kind::Registration { "registration" } else { "service" },
            registration_id: e.registration_id.unwrap_or_default(),
            transport: e.transport.unwrap_or_default(),
            peer: e.peer.map(|p| p.to_string()).unwrap_or_default(),
            credential: e.credential.unwrap_or_default(),
            status: e.status,
            code: e.error_code.map(|c| c.to_string()).unwrap_or_default(),
            reason: e.reason.unwrap_or_default(),
            tracking_id: e.tracking_id.or(e.operation_id).unwrap_or_default(),
            hub: e.assigned_hub.unwrap_or_default(),
            time: e.time,
            action: e.action,
            result: e.result,
        })
        .collect();
    let page = AuditPage {
        page: ctx.page("Audit log", "audit"),
        registration_id: filter.registration_id.unwrap_or_default(),
        tracking_id: filter.tracking_id.unwrap_or_default(),
        kind: clean(&q.kind).unwrap_or_default(),
        since: since.unwrap_or_default(),
        lines,
        complete,
        off,
    };
    view::render(StatusCode::OK, &page, &ctx.cookies)
}
