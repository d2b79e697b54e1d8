//! Manage enrollments: individual enrollments and enrollment groups, searched and paged
//! in the store; add, details, edit (with the etag that was read), enable and disable,
//! delete with a confirmation; a group's derived device keys and registration records.

use std::sync::Arc;

use askama::Template;
use axum::{
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use provisio_engine::{
    Error,
    service::{QueryTarget, Right},
};
use provisio_proto::service::{EnrollmentGroup, IndividualEnrollment};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    ClientIp, Console,
    form::Form,
    pages::PAGE,
    view::{self, Ctx, ErrorView, Page},
};

/// The list's query: which tab, the search, the page.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    tab: Option<String>,
    q: Option<String>,
    after: Option<String>,
}

/// A row of the lists.
struct Row {
    id: String,
    href: String,
    attestation: String,
    status: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "enrollments.html")]
struct List {
    page: Page,
    groups: bool,
    q: String,
    rows: Vec<Row>,
    next: Option<String>,
    can_write: bool,
}

fn status_text(v: &Value) -> String {
    v["provisioningStatus"].as_str().unwrap_or("enabled").to_owned()
}

fn attestation_text(v: &Value) -> String {
    match v["attestation"]["type"].as_str() {
        Some("symmetricKey") => "Symmetric Key".into(),
        Some("tpm") => "TPM".into(),
        Some("x509") if v["attestation"]["x509"]["caReferences"].is_object() => "X.509 (CA Certificate)".into(),
        Some("x509") if v["attestation"]["x509"]["signingCertificates"].is_object() => {
            "X.509 (Intermediate Certificate)".into()
        }
        Some("x509") => "X.509".into(),
        Some(other) => other.to_owned(),
        None => String::new(),
    }
}

/// Percent-encodes a path segment or query value (ids may hold `:` and `.`).
pub(crate) fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Manage enrollments: the two lists.
pub(crate) async fn list(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
    request: Request,
) -> Response {
    let ctx =
        match c.context_with(&headers, request.extensions().get::<ClientIp>().copied(), Right::EnrollmentRead).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let groups = q.tab.as_deref() == Some("groups");
    let prefix = q.q.clone().unwrap_or_default();
    let after = q.after.as_deref().filter(|a| !a.is_empty());
    let rows: Result<Vec<Row>, Error> = if groups {
        c.parts.service.search_groups(&prefix, after, PAGE + 1).await.map(|gs| {
            gs.iter()
                .map(|g| {
                    let v = serde_json::to_value(g).unwrap_or(Value::Null);
                    Row {
                        href: format!("/console/groups/{}", enc(&g.enrollment_group_id)),
                        id: g.enrollment_group_id.clone(),
                        attestation: attestation_text(&v),
                        status: status_text(&v),
                        detail: v["allocationPolicy"].as_str().unwrap_or("(service default)").to_owned(),
                    }
                })
                .collect()
        })
    } else {
        c.parts.service.search_enrollments(&prefix, after, PAGE + 1).await.map(|es| {
            es.iter()
                .map(|e| {
                    let v = serde_json::to_value(e).unwrap_or(Value::Null);
                    Row {
                        href: format!("/console/enrollments/{}", enc(&e.registration_id)),
                        id: e.registration_id.clone(),
                        attestation: attestation_text(&v),
                        status: status_text(&v),
                        detail: e.device_id.clone().unwrap_or_default(),
                    }
                })
                .collect()
        })
    };
    let mut rows = match rows {
        Ok(r) => r,
        Err(e) => return view::error_page(&e),
    };
    let next = if rows.len() > PAGE as usize {
        rows.truncate(PAGE as usize);
        rows.last().map(|r| {
            format!(
                "/console/enrollments?tab={}&q={}&after={}",
                if groups { "groups" } else { "individual" },
                enc(&prefix),
                enc(&r.id)
            )
        })
    } else {
        None
    };
    let title = "Manage enrollments";
    let page = List {
        page: ctx.page(title, "enrollments"),
        groups,
        q: prefix,
        rows,
        next,
        can_write: ctx.may(Right::EnrollmentWrite),
    };
    view::render(StatusCode::OK, &page, &ctx.cookies)
}

/// What an enrollment form shows: the values (as typed, or as stored) and the choices.
#[derive(Debug, Clone, Default)]
pub(crate) struct Values {
    id: String,
    device_id: String,
    mechanism: String,
    /// Groups: `certificate` or `symmetricKey`.
    attestation_type: String,
    /// Groups: `ca` or `intermediate`.
    certificate_type: String,
    ca_name: String,
    auto_keys: bool,
    primary_key: String,
    secondary_key: String,
    endorsement_key: String,
    iot_edge: bool,
    hubs: Vec<String>,
    allocation_policy: String,
    webhook_url: String,
    webhook_api_version: String,
    reprovision: String,
    initial_twin: String,
    enabled: bool,
    etag: String,
}

impl Values {
    fn fresh() -> Self {
        Self {
            mechanism: "symmetricKey".into(),
            attestation_type: "certificate".into(),
            certificate_type: "ca".into(),
            auto_keys: true,
            reprovision: "reprovisionandmigratedata".into(),
            enabled: true,
            webhook_api_version: "2021-10-01".into(),
            ..Self::default()
        }
    }

    fn from_form(f: &Form) -> Self {
        Self {
            id: f.raw("id").trim().to_owned(),
            device_id: f.raw("device_id").trim().to_owned(),
            mechanism: f.get("mechanism").unwrap_or("symmetricKey").to_owned(),
            attestation_type: f.get("attestation_type").unwrap_or("certificate").to_owned(),
            certificate_type: f.get("certificate_type").unwrap_or("ca").to_owned(),
            ca_name: f.raw("ca_name").trim().to_owned(),
            auto_keys: f.checked("auto_keys"),
            primary_key: f.raw("primary_key").trim().to_owned(),
            secondary_key: f.raw("secondary_key").trim().to_owned(),
            endorsement_key: f.raw("endorsement_key").trim().to_owned(),
            iot_edge: f.checked("iot_edge"),
            hubs: f.all("hubs").into_iter().map(str::to_owned).collect(),
            allocation_policy: f.get("allocation_policy").unwrap_or("").to_owned(),
            webhook_url: f.raw("webhook_url").trim().to_owned(),
            webhook_api_version: f.get("webhook_api_version").unwrap_or("2021-10-01").to_owned(),
            reprovision: f.get("reprovision").unwrap_or("reprovisionandmigratedata").to_owned(),
            initial_twin: f.raw("initial_twin").to_owned(),
            enabled: f.get("provisioning_status") != Some("disabled"),
            etag: f.raw("etag").to_owned(),
        }
    }

    /// The values of a stored enrollment or group (with its keys, when `secrets` has them).
    fn from_stored(v: &Value, group: bool, secrets: Option<&Value>) -> Self {
        let a = &v["attestation"];
        let keys = secrets.map_or(&Value::Null, |s| &s["symmetricKey"]);
        let rp = &v["reprovisionPolicy"];
        let reprovision = match (rp["updateHubAssignment"].as_bool(), rp["migrateDeviceData"].as_bool()) {
            (Some(false), _) => "neverreprovision",
            (_, Some(false)) => "reprovisionandresetdata",
            _ => "reprovisionandmigratedata",
        };
        Self {
            id: if group { v["enrollmentGroupId"].as_str() } else { v["registrationId"].as_str() }
                .unwrap_or_default()
                .to_owned(),
            device_id: v["deviceId"].as_str().unwrap_or_default().to_owned(),
            mechanism: a["type"].as_str().unwrap_or("symmetricKey").to_owned(),
            attestation_type: if a["type"] == "x509" { "certificate" } else { "symmetricKey" }.into(),
            certificate_type: if a["x509"]["caReferences"].is_object() { "ca" } else { "intermediate" }.into(),
            ca_name: a["x509"]["caReferences"]["primary"].as_str().unwrap_or_default().to_owned(),
            auto_keys: false,
            primary_key: keys["primaryKey"].as_str().unwrap_or_default().to_owned(),
            secondary_key: keys["secondaryKey"].as_str().unwrap_or_default().to_owned(),
            endorsement_key: a["tpm"]["endorsementKey"].as_str().unwrap_or_default().to_owned(),
            iot_edge: v["capabilities"]["iotEdge"].as_bool().unwrap_or(false),
            hubs: v["iotHubs"]
                .as_array()
                .map(|h| h.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            allocation_policy: v["allocationPolicy"].as_str().unwrap_or_default().to_owned(),
            webhook_url: v["customAllocationDefinition"]["webhookUrl"].as_str().unwrap_or_default().to_owned(),
            webhook_api_version: v["customAllocationDefinition"]["apiVersion"]
                .as_str()
                .unwrap_or("2021-10-01")
                .to_owned(),
            reprovision: reprovision.into(),
            initial_twin: match &v["initialTwin"] {
                Value::Null => String::new(),
                t => serde_json::to_string_pretty(t).unwrap_or_default(),
            },
            enabled: v["provisioningStatus"] != "disabled",
            etag: v["etag"].as_str().unwrap_or_default().to_owned(),
        }
    }

    /// The settings every enrollment and group has, as the service API's JSON.
    fn settings(&self, body: &mut Value) -> Result<(), Error> {
        body["provisioningStatus"] = json!(if self.enabled { "enabled" } else { "disabled" });
        body["capabilities"] = json!({ "iotEdge": self.iot_edge });
        if !self.hubs.is_empty() {
            body["iotHubs"] = json!(self.hubs);
        }
        if !self.allocation_policy.is_empty() {
            body["allocationPolicy"] = json!(self.allocation_policy);
        }
        if self.allocation_policy == "custom" {
            body["customAllocationDefinition"] =
                json!({ "webhookUrl": self.webhook_url, "apiVersion": self.webhook_api_version });
        }
        body["reprovisionPolicy"] = match self.reprovision.as_str() {
            "neverreprovision" => json!({ "updateHubAssignment": false, "migrateDeviceData": true }),
            "reprovisionandresetdata" => json!({ "updateHubAssignment": true, "migrateDeviceData": false }),
            _ => json!({ "updateHubAssignment": true, "migrateDeviceData": true }),
        };
        // Validated before anything is saved: a twin that is not JSON is the form's error.
        if !self.initial_twin.trim().is_empty() {
            let twin: Value = serde_json::from_str(&self.initial_twin)
                .map_err(|e| Error::invalid(format!("The initial twin is not valid JSON: {e}.")))?;
            body["initialTwin"] = twin;
        }
        Ok(())
    }

    fn keys(&self) -> Value {
        if self.auto_keys {
            json!({})
        } else {
            json!({ "primaryKey": self.primary_key, "secondaryKey": self.secondary_key })
        }
    }
}

/// A certificate slot from an uploaded file, or none.
fn cert_slot(form: &Form, field: &str) -> Option<Value> {
    form.file_text(field).map(|text| json!({ "certificate": text }))
}

/// The service API's `IndividualEnrollment` of an individual enrollment form.
fn individual_body(v: &Values, form: &Form, stored: Option<&Value>) -> Result<IndividualEnrollment, Error> {
    let attestation = match v.mechanism.as_str() {
        "x509" => {
            let kept = stored.map(|s| s["attestation"]["x509"]["clientCertificates"].clone());
            let slot = |field: &str, which: &str| {
                cert_slot(form, field).or_else(|| kept.as_ref().map(|k| k[which].clone()).filter(|s| !s.is_null()))
            };
            let (primary, secondary) =
                (slot("primary_certificate", "primary"), slot("secondary_certificate", "secondary"));
            if primary.is_none() {
                return Err(Error::invalid("X.509 needs a Primary Certificate file (.pem or .cer)."));
            }
            json!({ "type": "x509", "x509": { "clientCertificates": { "primary": primary, "secondary": secondary } } })
        }
        "tpm" => json!({ "type": "tpm", "tpm": { "endorsementKey": v.endorsement_key } }),
        _ => json!({ "type": "symmetricKey", "symmetricKey": v.keys() }),
    };
    let mut body = json!({ "registrationId": v.id, "attestation": attestation });
    if !v.device_id.is_empty() {
        body["deviceId"] = json!(v.device_id);
    }
    v.settings(&mut body)?;
    serde_json::from_value(body).map_err(|e| Error::malformed(format!("The enrollment is not valid: {e}")))
}

/// The service API's `EnrollmentGroup` of a group form.
fn group_body(v: &Values, form: &Form, stored: Option<&Value>) -> Result<EnrollmentGroup, Error> {
    let attestation = match (v.attestation_type.as_str(), v.certificate_type.as_str()) {
        ("symmetricKey", _) => json!({ "type": "symmetricKey", "symmetricKey": v.keys() }),
        (_, "intermediate") => {
            let kept = stored.map(|s| s["attestation"]["x509"]["signingCertificates"]["primary"].clone());
            let primary = cert_slot(form, "primary_certificate").or_else(|| kept.filter(|k| !k.is_null()));
            let Some(primary) = primary else {
                return Err(Error::invalid(
                    "An Intermediate Certificate group needs the certificate's file (.pem or .cer).",
                ));
            };
            json!({ "type": "x509", "x509": { "signingCertificates": { "primary": primary } } })
        }
        _ => {
            if v.ca_name.is_empty() {
                return Err(Error::invalid(
                    "A CA Certificate group needs a verified CA certificate: add one under Certificates.",
                ));
            }
            json!({ "type": "x509", "x509": { "caReferences": { "primary": v.ca_name } } })
        }
    };
    let mut body = json!({ "enrollmentGroupId": v.id, "attestation": attestation });
    v.settings(&mut body)?;
    serde_json::from_value(body).map_err(|e| Error::malformed(format!("The enrollment group is not valid: {e}")))
}

#[derive(Template)]
#[template(path = "enrollment_form.html")]
struct EnrollmentFormPage {
    page: Page,
    group: bool,
    editing: bool,
    action: String,
    v: Values,
    linked_hubs: Vec<String>,
    verified_cas: Vec<String>,
}

async fn form_page(
    c: &Console,
    ctx: &Ctx,
    group: bool,
    v: Values,
    editing: bool,
    error: Option<ErrorView>,
) -> Response {
    let linked_hubs =
        c.parts.hubs.list().await.map(|h| h.into_iter().map(|h| h.host_name).collect()).unwrap_or_default();
    let verified_cas = if group { verified_cas(c).await } else { Vec::new() };
    let (title, action) = match (group, editing) {
        (false, false) => ("Add individual enrollment".to_owned(), "/console/enrollments/new".to_owned()),
        (true, false) => ("Add enrollment group".to_owned(), "/console/groups/new".to_owned()),
        (false, true) => (format!("Edit enrollment {}", v.id), format!("/console/enrollments/{}", enc(&v.id))),
        (true, true) => (format!("Edit enrollment group {}", v.id), format!("/console/groups/{}", enc(&v.id))),
    };
    let mut page = ctx.page(title, "enrollments");
    let status = if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    if let Some(e) = &error {
        page.error = Some(e.clone());
    }
    let p = EnrollmentFormPage { page, group, editing, action, v, linked_hubs, verified_cas };
    let status = error
        .as_ref()
        .and_then(|e| StatusCode::from_u16(u16::try_from(e.code / 1000).unwrap_or(400)).ok())
        .unwrap_or(status);
    view::render(status, &p, &ctx.cookies)
}

/// The names of the verified CA certificates (a CA Certificate group's choices).
async fn verified_cas(c: &Console) -> Vec<String> {
    match c.parts.certificates.list().await {
        Ok(v) => v["value"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["properties"]["isVerified"] == true)
                    .filter_map(|x| x["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

async fn writer(c: &Console, headers: &HeaderMap, ip: Option<ClientIp>) -> Result<Ctx, Response> {
    c.context_with(headers, ip, Right::EnrollmentWrite).await
}

/// Add individual enrollment: the form.
pub(crate) async fn new_individual(State(c): State<Arc<Console>>, headers: HeaderMap, request: Request) -> Response {
    match writer(&c, &headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(ctx) => form_page(&c, &ctx, false, Values::fresh(), false, None).await,
        Err(r) => r,
    }
}

/// Add enrollment group: the form.
pub(crate) async fn new_group(State(c): State<Arc<Console>>, headers: HeaderMap, request: Request) -> Response {
    match writer(&c, &headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(ctx) => form_page(&c, &ctx, true, Values::fresh(), false, None).await,
        Err(r) => r,
    }
}

/// A form submission whose policy must have `right` (else the `403` page), however it was
/// sent.
pub(crate) async fn submitted_with(c: &Console, request: Request, right: Right) -> Result<(Ctx, Form), Response> {
    let (ctx, form) = c.submitted(request).await?;
    ctx.caller.require(right).map_err(|e| view::error_page(&e))?;
    Ok((ctx, form))
}

/// Save of an enrollment form: add (`editing` false) or edit.
async fn save_submitted(c: &Console, request: Request, group: bool, editing: bool) -> Response {
    match submitted_with(c, request, Right::EnrollmentWrite).await {
        Ok((ctx, form)) => save(c, &ctx, group, &form, editing).await,
        Err(r) => r,
    }
}

/// Saves an enrollment or group: create (no etag) or update (with the etag the form read).
async fn save(c: &Console, ctx: &Ctx, group: bool, form: &Form, editing: bool) -> Response {
    let v = Values::from_form(form);
    if editing && v.etag.is_empty() {
        let e = Error::PreconditionFailed("The form carries no etag: reload the enrollment and edit it again.".into());
        return form_page(c, ctx, group, v, editing, Some(ErrorView::from(&e))).await;
    }
    let stored = if editing { stored_json(c, group, &v.id).await.ok() } else { None };
    let if_match = editing.then_some(v.etag.as_str());
    let result = if group {
        match group_body(&v, form, stored.as_ref()) {
            Ok(body) => c.parts.service.put_group(&v.id, body, if_match).await.map(|_| ()),
            Err(e) => Err(e),
        }
    } else {
        match individual_body(&v, form, stored.as_ref()) {
            Ok(body) => c.parts.service.put_enrollment(&v.id, body, if_match).await.map(|_| ()),
            Err(e) => Err(e),
        }
    };
    let result = result.map_err(|e| e.tracked().0);
    let path = if group { "enrollmentGroups" } else { "enrollments" };
    ctx.audit(c, format!("PUT /{path}/{}", provisio_core::text::shorten(&v.id)), result.as_ref().err()).await;
    match result {
        Ok(()) => {
            let to = if group {
                format!("/console/groups/{}", enc(&v.id))
            } else {
                format!("/console/enrollments/{}", enc(&v.id))
            };
            c.done(ctx, &to, if editing { "Saved." } else { "Saved. Copy the Primary Key below to the device." })
        }
        Err(e) => form_page(c, ctx, group, v, editing, Some(ErrorView::from(&e))).await,
    }
}

/// Add individual enrollment: Save.
pub(crate) async fn create_individual(State(c): State<Arc<Console>>, request: Request) -> Response {
    save_submitted(&c, request, false, false).await
}

/// Add enrollment group: Save.
pub(crate) async fn create_group(State(c): State<Arc<Console>>, request: Request) -> Response {
    save_submitted(&c, request, true, false).await
}

/// An enrollment's or group's JSON as stored (keys stripped), with its etag.
async fn stored_json(c: &Console, group: bool, id: &str) -> Result<Value, Error> {
    if group {
        c.parts.service.get_group(id).await.map(|g| serde_json::to_value(g).unwrap_or(Value::Null))
    } else {
        c.parts.service.get_enrollment(id).await.map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
    }
}

/// An enrollment's or group's keys (the service API's attestation mechanism).
async fn secrets(c: &Console, group: bool, id: &str) -> Result<Value, Error> {
    c.parts.service.attestation_mechanism(group, id).await.map(|a| serde_json::to_value(a).unwrap_or(Value::Null))
}

/// An enrollment's or group's keys, read to be shown: audited as the service API audits the
/// same read (`POST /{enrollments|enrollmentGroups}/{id}/attestationmechanism`).
async fn shown_secrets(c: &Console, ctx: &Ctx, group: bool, id: &str) -> Result<Value, Error> {
    let result = secrets(c, group, id).await.map_err(|e| e.tracked().0);
    let path = if group { "enrollmentGroups" } else { "enrollments" };
    let action = format!("POST /{path}/{}/attestationmechanism", provisio_core::text::shorten(id));
    ctx.audit(c, action, result.as_ref().err()).await;
    result
}

/// Edit: the form with the stored values (and the etag they were read with).
async fn edit(c: &Console, headers: &HeaderMap, ip: Option<ClientIp>, group: bool, id: &str) -> Response {
    let ctx = match writer(c, headers, ip).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let stored = match stored_json(c, group, id).await {
        Ok(v) => v,
        Err(e) => return view::error_page(&e),
    };
    // Only a symmetric key enrollment's form shows secrets.
    let keys = if stored["attestation"]["type"] == "symmetricKey" {
        shown_secrets(c, &ctx, group, id).await.ok()
    } else {
        None
    };
    form_page(c, &ctx, group, Values::from_stored(&stored, group, keys.as_ref()), true, None).await
}

/// Edit an individual enrollment.
pub(crate) async fn edit_individual(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    edit(&c, &headers, request.extensions().get::<ClientIp>().copied(), false, &id).await
}

/// Edit a group.
pub(crate) async fn edit_group(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    edit(&c, &headers, request.extensions().get::<ClientIp>().copied(), true, &id).await
}

/// Save an edited individual enrollment.
pub(crate) async fn update_individual(State(c): State<Arc<Console>>, request: Request) -> Response {
    save_submitted(&c, request, false, true).await
}

/// Save an edited group.
pub(crate) async fn update_group(State(c): State<Arc<Console>>, request: Request) -> Response {
    save_submitted(&c, request, true, true).await
}

/// The details of an enrollment or group, as label/value rows.
fn detail_rows(v: &Value, group: bool) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let mut push = |k: &str, val: String| {
        if !val.is_empty() {
            rows.push((k.to_owned(), val));
        }
    };
    if group {
        push("Group name", v["enrollmentGroupId"].as_str().unwrap_or_default().into());
    } else {
        push("Registration ID", v["registrationId"].as_str().unwrap_or_default().into());
        push("IoT Hub Device ID", v["deviceId"].as_str().unwrap_or("(the registration id)").into());
    }
    push("Mechanism", attestation_text(v));
    let a = &v["attestation"];
    if let Some(ca) = a["x509"]["caReferences"]["primary"].as_str() {
        push("CA Certificate", ca.into());
    }
    for (label, path) in [
        ("Primary Certificate", &a["x509"]["clientCertificates"]["primary"]["info"]),
        ("Secondary Certificate", &a["x509"]["clientCertificates"]["secondary"]["info"]),
        ("Intermediate Certificate", &a["x509"]["signingCertificates"]["primary"]["info"]),
    ] {
        if let Some(subject) = path["subjectName"].as_str() {
            push(label, format!("{subject} (SHA-256 {})", path["sha256Thumbprint"].as_str().unwrap_or_default()));
        }
    }
    if let Some(ek) = a["tpm"]["endorsementKey"].as_str() {
        push("Endorsement key", provisio_core::text::shorten(ek));
    }
    push("Provisioning status", status_text(v));
    push("IoT Edge", if v["capabilities"]["iotEdge"] == true { "yes" } else { "no" }.into());
    push("Allocation policy", v["allocationPolicy"].as_str().unwrap_or("(service default)").into());
    if let Some(h) = v["iotHubs"].as_array() {
        push("IoT hubs", h.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "));
    }
    if let Some(u) = v["customAllocationDefinition"]["webhookUrl"].as_str() {
        push("Webhook URL", u.into());
    }
    let rp = &v["reprovisionPolicy"];
    push(
        "Re-provisioning",
        match (rp["updateHubAssignment"].as_bool(), rp["migrateDeviceData"].as_bool()) {
            (Some(false), _) => "Never re-provision",
            (_, Some(false)) => "Re-provision and reset to initial config",
            _ => "Re-provision and migrate data",
        }
        .into(),
    );
    push("Created", v["createdDateTimeUtc"].as_str().unwrap_or_default().into());
    push("Updated", v["lastUpdatedDateTimeUtc"].as_str().unwrap_or_default().into());
    rows
}

/// A registration record as a list row.
pub(crate) struct RecordRow {
    pub(crate) id: String,
    pub(crate) href: String,
    pub(crate) status: String,
    pub(crate) hub: String,
    pub(crate) device_id: String,
    pub(crate) updated: String,
}

impl RecordRow {
    pub(crate) fn of(v: &Value) -> Self {
        let id = v["registrationId"].as_str().unwrap_or_default().to_owned();
        Self {
            href: format!("/console/registrations/{}", enc(&id)),
            id,
            status: v["status"].as_str().unwrap_or_default().to_owned(),
            hub: v["assignedHub"].as_str().unwrap_or_default().to_owned(),
            device_id: v["deviceId"].as_str().unwrap_or_default().to_owned(),
            updated: v["lastUpdatedDateTimeUtc"].as_str().unwrap_or_default().to_owned(),
        }
    }
}

#[derive(Template)]
#[template(path = "enrollment.html")]
struct Detail {
    page: Page,
    group: bool,
    id: String,
    base: String,
    rows: Vec<(String, String)>,
    symmetric: bool,
    keys: Option<(String, String)>,
    can_write: bool,
    enabled: bool,
    etag: String,
    twin: String,
    state: Vec<(String, String)>,
    records: Vec<RecordRow>,
    can_read_records: bool,
    derived: Option<(String, String)>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct DetailQuery {
    keys: Option<String>,
}

async fn detail(
    c: &Console,
    ctx: &Ctx,
    group: bool,
    id: &str,
    show_keys: bool,
    derived: Option<(String, String)>,
    error: Option<ErrorView>,
) -> Response {
    if let Err(e) = ctx.caller.require(Right::EnrollmentRead) {
        return view::error_page(&e);
    }
    let v = match stored_json(c, group, id).await {
        Ok(v) => v,
        Err(e) => return view::error_page(&e),
    };
    let symmetric = v["attestation"]["type"] == "symmetricKey";
    let can_write = ctx.may(Right::EnrollmentWrite);
    let keys = if symmetric && show_keys && can_write {
        shown_secrets(c, ctx, group, id).await.ok().map(|s| {
            let k = &s["symmetricKey"];
            (
                k["primaryKey"].as_str().unwrap_or_default().to_owned(),
                k["secondaryKey"].as_str().unwrap_or_default().to_owned(),
            )
        })
    } else {
        None
    };
    let state = if group {
        Vec::new()
    } else {
        let s = &v["registrationState"];
        if s["status"].is_null() || (s["status"] == "unassigned" && s["assignedHub"].is_null()) {
            Vec::new()
        } else {
            [
                ("Status", "status"),
                ("Substatus", "substatus"),
                ("Assigned hub", "assignedHub"),
                ("Device ID", "deviceId"),
                ("Error code", "errorCode"),
                ("Error message", "errorMessage"),
                ("Last updated", "lastUpdatedDateTimeUtc"),
            ]
            .iter()
            .filter_map(|(label, k)| match &s[*k] {
                Value::Null => None,
                Value::String(x) => Some(((*label).to_owned(), x.clone())),
                other => Some(((*label).to_owned(), other.to_string())),
            })
            .collect()
        }
    };
    let can_read_records = ctx.may(Right::RegistrationStatusRead);
    let records = if group && can_read_records {
        match c
            .parts
            .service
            .query(&QueryTarget::GroupRegistrations(id.to_owned()), None, Some(super::PAGE), None)
            .await
        {
            Ok(p) => p.items.iter().map(RecordRow::of).collect(),
            Err(_) => Vec::new(),
        }
    } else {
        Vec::new()
    };
    let name =
        if group { v["enrollmentGroupId"].as_str() } else { v["registrationId"].as_str() }.unwrap_or(id).to_owned();
    let base =
        if group { format!("/console/groups/{}", enc(&name)) } else { format!("/console/enrollments/{}", enc(&name)) };
    let mut page =
        ctx.page(if group { format!("Enrollment group {name}") } else { format!("Enrollment {name}") }, "enrollments");
    page.error = error;
    let twin = match &v["initialTwin"] {
        Value::Null => String::new(),
        t => serde_json::to_string_pretty(t).unwrap_or_default(),
    };
    let d = Detail {
        page,
        group,
        id: name,
        base,
        rows: detail_rows(&v, group),
        symmetric,
        keys,
        can_write,
        enabled: v["provisioningStatus"] != "disabled",
        etag: v["etag"].as_str().unwrap_or_default().to_owned(),
        twin,
        state,
        records,
        can_read_records,
        derived,
    };
    view::render(StatusCode::OK, &d, &ctx.cookies)
}

/// An individual enrollment's details (`?keys=1` shows its keys).
pub(crate) async fn individual(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
    request: Request,
) -> Response {
    match c.context(&headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(ctx) => detail(&c, &ctx, false, &id, q.keys.is_some(), None, None).await,
        Err(r) => r,
    }
}

/// A group's details.
pub(crate) async fn group(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
    request: Request,
) -> Response {
    match c.context(&headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(ctx) => detail(&c, &ctx, true, &id, q.keys.is_some(), None, None).await,
        Err(r) => r,
    }
}

#[derive(Template)]
#[template(path = "confirm.html")]
pub(crate) struct Confirm {
    pub(crate) page: Page,
    pub(crate) question: String,
    pub(crate) action: String,
    /// Hidden fields to send again.
    pub(crate) fields: Vec<(String, String)>,
    pub(crate) cancel: String,
}

/// Enable, Disable, Delete (after a confirmation), or derive a device key.
async fn action(c: &Console, group: bool, id: &str, request: Request) -> Response {
    let (ctx, form) = match submitted_with(c, request, Right::EnrollmentWrite).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let path = if group { "enrollmentGroups" } else { "enrollments" };
    let base = if group { format!("/console/groups/{}", enc(id)) } else { format!("/console/enrollments/{}", enc(id)) };
    let etag = form.get("etag").map(str::to_owned);
    match form.get("action") {
        Some("delete") if form.get("confirm") != Some("yes") => {
            let page = Confirm {
                page: ctx.page("Delete", "enrollments"),
                question: format!(
                    "Delete {} {id}? Devices it enrolled can no longer register.",
                    if group { "enrollment group" } else { "enrollment" }
                ),
                action: format!("{base}/action"),
                fields: vec![("action".into(), "delete".into()), ("etag".into(), etag.unwrap_or_default())],
                cancel: base,
            };
            view::render(StatusCode::OK, &page, &ctx.cookies)
        }
        Some("delete") => {
            let result = c.parts.service.delete(group, id, etag.as_deref()).await.map_err(|e| e.tracked().0);
            ctx.audit(c, format!("DELETE /{path}/{}", provisio_core::text::shorten(id)), result.as_ref().err()).await;
            match result {
                Ok(()) => {
                    c.done(&ctx, &format!("/console/enrollments{}", if group { "?tab=groups" } else { "" }), "Deleted.")
                }
                Err(e) => detail(c, &ctx, group, id, false, None, Some(ErrorView::from(&e))).await,
            }
        }
        Some(verb @ ("enable" | "disable")) => {
            let result = set_status(c, group, id, verb == "enable", etag.as_deref()).await.map_err(|e| e.tracked().0);
            ctx.audit(c, format!("PUT /{path}/{}", provisio_core::text::shorten(id)), result.as_ref().err()).await;
            match result {
                Ok(()) => c.done(&ctx, &base, if verb == "enable" { "Enabled." } else { "Disabled." }),
                Err(e) => detail(c, &ctx, group, id, false, None, Some(ErrorView::from(&e))).await,
            }
        }
        Some("derive") if group => {
            let rid = form.get("registration_id").unwrap_or_default().to_owned();
            // The id first: the group's key is read (and that read audited) only to be used.
            let derived = match provisio_core::ids::RegistrationId::parse(&rid) {
                Err(e) => Err(Error::from(e)),
                Ok(_) => shown_secrets(c, &ctx, true, id).await.and_then(|s| {
                    let key = s["symmetricKey"]["primaryKey"].as_str().unwrap_or_default().to_owned();
                    provisio_core::keys::derive_device_key(&key, &rid).map_err(Error::from)
                }),
            };
            match derived {
                Ok(k) => detail(c, &ctx, group, id, false, Some((rid, k)), None).await,
                Err(e) => detail(c, &ctx, group, id, false, None, Some(ErrorView::from(&e))).await,
            }
        }
        _ => view::error_page(&Error::invalid("Unknown action.")),
    }
}

/// Enable or disable: the stored enrollment (with its keys) written back with the new
/// status, under the etag the page was read with.
async fn set_status(c: &Console, group: bool, id: &str, enabled: bool, etag: Option<&str>) -> Result<(), Error> {
    let Some(etag) = etag else {
        return Err(Error::PreconditionFailed("The form carries no etag: reload the page.".into()));
    };
    let mut v = stored_json(c, group, id).await?;
    if v["attestation"]["type"] == "symmetricKey" {
        v["attestation"] = secrets(c, group, id).await?;
    }
    v["provisioningStatus"] = json!(if enabled { "enabled" } else { "disabled" });
    if let Some(o) = v.as_object_mut() {
        o.remove("registrationState");
        o.remove("etag");
    }
    if group {
        let body: EnrollmentGroup = serde_json::from_value(v).map_err(|e| Error::Internal(e.to_string()))?;
        c.parts.service.put_group(id, body, Some(etag)).await.map(|_| ())
    } else {
        let body: IndividualEnrollment = serde_json::from_value(v).map_err(|e| Error::Internal(e.to_string()))?;
        c.parts.service.put_enrollment(id, body, Some(etag)).await.map(|_| ())
    }
}

/// Actions on an individual enrollment.
pub(crate) async fn individual_action(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    action(&c, false, &id, request).await
}

/// Actions on a group.
pub(crate) async fn group_action(State(c): State<Arc<Console>>, Path(id): Path<String>, request: Request) -> Response {
    action(&c, true, &id, request).await
}
