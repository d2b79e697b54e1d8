//! Registration records: searched by registration id or listed by group; a record with its
//! recent attempts from the audit log (with the precise refusal reasons, which the device is
//! never told); Delete, so that the device provisions afresh.

use std::sync::Arc;

use askama::Template;
use axum::{
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use provisio_engine::{
    Error,
    audit::{self, Entry, Filter},
    service::{QueryTarget, Right},
};
use serde::Deserialize;
use serde_json::Value;

use super::{
    PAGE,
    enrollments::{Confirm, RecordRow, enc, submitted_with},
};
use crate::{
    ClientIp, Console,
    view::{self, Ctx, ErrorView},
};

/// How many attempts a record's page shows, and how much of the log it reads for them.
const ATTEMPTS: usize = 20;
/// Bytes of the audit log read backwards for a page (the newest lines; `provisio audit`
/// reads everything).
pub(crate) const SCAN_BYTES: u64 = 8 * 1024 * 1024;

/// The list's query.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    q: Option<String>,
    group: Option<String>,
    after: Option<String>,
}

#[derive(Template)]
#[template(path = "registrations.html")]
struct List {
    page: view::Page,
    q: String,
    group: String,
    rows: Vec<RecordRow>,
    next: Option<String>,
}

/// Registration records: by id prefix, or a group's.
pub(crate) async fn list(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
    request: Request,
) -> Response {
    let ctx = match c
        .context_with(&headers, request.extensions().get::<ClientIp>().copied(), Right::RegistrationStatusRead)
        .await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let prefix = q.q.clone().unwrap_or_default();
    let group = q.group.clone().unwrap_or_default().trim().to_owned();
    let after = q.after.as_deref().filter(|a| !a.is_empty());
    let (rows, next) = if group.is_empty() {
        match c.parts.service.search_registrations(&prefix, after, PAGE + 1).await {
            Ok(items) => {
                let mut rows: Vec<RecordRow> =
                    items.iter().map(|r| RecordRow::of(&serde_json::to_value(r).unwrap_or(Value::Null))).collect();
                let next = (rows.len() > PAGE as usize).then(|| {
                    rows.truncate(PAGE as usize);
                    rows.last().map(|r| format!("/console/registrations?q={}&after={}", enc(&prefix), enc(&r.id)))
                });
                (rows, next.flatten())
            }
            Err(e) => return view::error_page(&e),
        }
    } else {
        let target = QueryTarget::GroupRegistrations(group.clone());
        match c.parts.service.query(&target, None, Some(PAGE), after).await {
            Ok(p) => (
                p.items.iter().map(RecordRow::of).collect(),
                p.continuation.map(|t| format!("/console/registrations?group={}&after={}", enc(&group), enc(&t))),
            ),
            Err(e) => return view::error_page(&e),
        }
    };
    let page = List { page: ctx.page("Registration records", "registrations"), q: prefix, group, rows, next };
    view::render(StatusCode::OK, &page, &ctx.cookies)
}

/// An attempt, as the record's page shows it.
struct Attempt {
    time: String,
    transport: String,
    peer: String,
    credential: String,
    result: String,
    code: String,
    reason: String,
    tracking_id: String,
    hub: String,
}

impl Attempt {
    fn of(e: &Entry) -> Self {
        Self {
            time: e.time.clone(),
            transport: e.transport.clone().unwrap_or_default(),
            peer: e.peer.map(|p| p.to_string()).unwrap_or_default(),
            credential: e.credential.clone().unwrap_or_default(),
            result: e.result.clone(),
            code: e.error_code.map(|c| c.to_string()).unwrap_or_default(),
            reason: e.reason.clone().unwrap_or_default(),
            tracking_id: e.tracking_id.clone().or_else(|| e.operation_id.clone()).unwrap_or_default(),
            hub: e.assigned_hub.clone().unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "registration.html")]
struct Show {
    page: view::Page,
    id: String,
    /// The record's fields, `None` when the device has no record.
    record: Option<Vec<(String, String)>>,
    etag: String,
    group: String,
    attempts: Vec<Attempt>,
    /// Whether the attempts cover the whole log (or only its newest part).
    complete: bool,
    audit_off: bool,
    /// The last refused X.509 attestation, as every node stored it.
    last_refusal: Option<String>,
    can_delete: bool,
}

async fn show_page(c: &Console, ctx: &Ctx, id: &str, error: Option<ErrorView>) -> Response {
    if let Err(e) = ctx.caller.require(Right::RegistrationStatusRead) {
        return view::error_page(&e);
    }
    if let Err(e) = provisio_core::ids::RegistrationId::parse(id) {
        return view::error_page(&Error::from(e));
    }
    let (record, etag, group) = match c.parts.service.get_registration(id).await {
        Ok(r) => {
            let v = serde_json::to_value(&r).unwrap_or(Value::Null);
            let fields = [
                ("Registration ID", "registrationId"),
                ("Status", "status"),
                ("Substatus", "substatus"),
                ("Assigned hub", "assignedHub"),
                ("Device ID", "deviceId"),
                ("Created", "createdDateTimeUtc"),
                ("Last updated", "lastUpdatedDateTimeUtc"),
                ("Error code", "errorCode"),
                ("Error message", "errorMessage"),
            ];
            let rows = fields
                .iter()
                .filter_map(|(label, k)| match &v[*k] {
                    Value::Null => None,
                    Value::String(s) => Some(((*label).to_owned(), s.clone())),
                    other => Some(((*label).to_owned(), other.to_string())),
                })
                .collect();
            let group = v["enrollmentGroupId"].as_str().unwrap_or_default().to_owned();
            (Some(rows), v["etag"].as_str().unwrap_or_default().to_owned(), group)
        }
        Err(e) if e.status() == 404 => (None, String::new(), String::new()),
        Err(e) => return view::error_page(&e),
    };
    let (attempts, complete, audit_off) = match &c.parts.audit_file {
        None => (Vec::new(), true, true),
        Some((path, keep)) => {
            let (path, keep) = (path.clone(), *keep);
            let filter = Filter { registration_id: Some(id.to_owned()), ..Filter::default() };
            let read =
                tokio::task::spawn_blocking(move || audit::recent(&path, keep, &filter, ATTEMPTS, SCAN_BYTES)).await;
            match read {
                Ok(Ok(r)) => (r.entries.iter().map(Attempt::of).collect(), r.complete, false),
                Ok(Err(e)) => return view::error_page(&Error::Internal(format!("reading the audit log: {e}"))),
                Err(e) => return view::error_page(&Error::Internal(format!("reading the audit log: {e}"))),
            }
        }
    };
    let last_refusal =
        c.parts.service.audit(id).await.ok().map(|v| serde_json::to_string_pretty(&v).unwrap_or_default());
    let mut page = ctx.page(format!("Registration {id}"), "registrations");
    let status = if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    page.error = error;
    let s = Show {
        page,
        id: id.to_owned(),
        record,
        etag,
        group,
        attempts,
        complete,
        audit_off,
        last_refusal,
        can_delete: ctx.may(Right::RegistrationStatusWrite),
    };
    view::render(status, &s, &ctx.cookies)
}

/// A registration record and its recent attempts.
pub(crate) async fn show(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    match c.context(&headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(ctx) => show_page(&c, &ctx, &id, None).await,
        Err(r) => r,
    }
}

/// Delete (after a confirmation): the device provisions afresh at its next registration.
pub(crate) async fn delete(State(c): State<Arc<Console>>, Path(id): Path<String>, request: Request) -> Response {
    let (ctx, form) = match submitted_with(&c, request, Right::RegistrationStatusWrite).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let base = format!("/console/registrations/{}", enc(&id));
    let etag = form.get("etag").map(str::to_owned);
    if form.get("confirm") != Some("yes") {
        let page = Confirm {
            page: ctx.page("Delete", "registrations"),
            question: format!(
                "Delete the registration record of {id}? The device is not removed from its hub; its next registration is treated as its first."
            ),
            action: base.clone(),
            fields: vec![("etag".into(), etag.unwrap_or_default())],
            cancel: base,
        };
        return view::render(StatusCode::OK, &page, &ctx.cookies);
    }
    let result = c.parts.service.delete_registration(&id, etag.as_deref()).await.map_err(|e| e.tracked().0);
    ctx.audit(&c, format!("DELETE /registrations/{}", provisio_core::text::shorten(&id)), result.as_ref().err()).await;
    match result {
        Ok(()) => c.done(&ctx, "/console/registrations", "Deleted."),
        Err(e) => show_page(&c, &ctx, &id, Some(ErrorView::from(&e))).await,
    }
}
