//! Certificates: CA certificates with proof of possession, as the portal's page has them
//! (Add with a name and a file, Generate verification code, upload the verification
//! certificate, Verify; Delete).

use std::sync::Arc;

use askama::Template;
use axum::{
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use provisio_engine::{Error, service::Right};
use provisio_proto::service::{CertificateBody, CertificateResponse};

use super::enrollments::{Confirm, enc, submitted_with};
use crate::{
    ClientIp, Console,
    view::{self, Ctx, ErrorView},
};

/// A certificate as the pages show it.
struct CertRow {
    name: String,
    href: String,
    subject: String,
    thumbprint: String,
    expiry: String,
    verified: bool,
    etag: String,
    created: String,
    updated: String,
    pem: String,
}

impl CertRow {
    fn of(r: &CertificateResponse) -> Self {
        Self {
            href: format!("/console/certificates/{}", enc(&r.name)),
            name: r.name.clone(),
            subject: r.properties.subject.clone(),
            thumbprint: r.properties.thumbprint.clone(),
            expiry: r.properties.expiry.clone(),
            verified: r.properties.is_verified,
            etag: r.etag.clone(),
            created: r.properties.created.clone(),
            updated: r.properties.updated.clone(),
            pem: r.properties.certificate.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "certificates.html")]
struct List {
    page: view::Page,
    rows: Vec<CertRow>,
    /// The add form's name, kept after an error.
    name: String,
}

#[derive(Template)]
#[template(path = "certificate.html")]
struct Show {
    page: view::Page,
    c: CertRow,
    /// The verification code just generated.
    code: Option<String>,
}

async fn admin(c: &Console, headers: &HeaderMap, ip: Option<ClientIp>) -> Result<Ctx, Response> {
    c.context_with(headers, ip, Right::ServiceConfig).await
}

async fn list_page(c: &Console, ctx: &Ctx, name: String, error: Option<ErrorView>) -> Response {
    let rows: Result<Vec<CertRow>, Error> = c.parts.certificates.list().await.and_then(|v| {
        let items: Vec<CertificateResponse> = serde_json::from_value(v["value"].clone())
            .map_err(|e| Error::Internal(format!("listing certificates: {e}")))?;
        Ok(items.iter().map(CertRow::of).collect())
    });
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return view::error_page(&e),
    };
    let status = if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    let mut page = ctx.page("Certificates", "certificates");
    page.error = error;
    view::render(status, &List { page, rows, name }, &ctx.cookies)
}

/// Certificates: the list and the Add form.
pub(crate) async fn list(State(c): State<Arc<Console>>, headers: HeaderMap, request: Request) -> Response {
    match admin(&c, &headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(ctx) => list_page(&c, &ctx, String::new(), None).await,
        Err(r) => r,
    }
}

/// Add: a name and a `.pem` or `.cer` file.
pub(crate) async fn add(State(c): State<Arc<Console>>, request: Request) -> Response {
    let (ctx, form) = match submitted_with(&c, request, Right::ServiceConfig).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let name = form.get("name").unwrap_or_default().to_owned();
    let result = match form.file_text("certificate") {
        None => Err(Error::invalid("Choose the certificate's file (.pem or .cer).")),
        Some(text) => c
            .parts
            .certificates
            .put(&name, CertificateBody { certificate: Some(text), is_verified: None, properties: None }, None)
            .await
            .map(|_| ()),
    };
    let result = result.map_err(|e| e.tracked().0);
    ctx.audit(&c, format!("PUT /certificates/{}", provisio_core::text::shorten(&name)), result.as_ref().err()).await;
    match result {
        Ok(()) => c.done(
            &ctx,
            &format!("/console/certificates/{}", enc(&name)),
            "Added. Generate a verification code to prove that you hold the CA's private key.",
        ),
        Err(e) => list_page(&c, &ctx, name, Some(ErrorView::from(&e))).await,
    }
}

async fn show_page(c: &Console, ctx: &Ctx, name: &str, code: Option<String>, error: Option<ErrorView>) -> Response {
    let cert = match c.parts.certificates.get(name).await {
        Ok(x) => x,
        Err(e) => return view::error_page(&e),
    };
    let status = if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    let mut page = ctx.page(format!("Certificate {}", cert.name), "certificates");
    page.error = error;
    view::render(status, &Show { page, c: CertRow::of(&cert), code }, &ctx.cookies)
}

/// A certificate's details, and the proof-of-possession steps.
pub(crate) async fn show(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    match admin(&c, &headers, request.extensions().get::<ClientIp>().copied()).await {
        Ok(ctx) => show_page(&c, &ctx, &name, None, None).await,
        Err(r) => r,
    }
}

/// Generate verification code, Verify (with the uploaded verification certificate), or
/// Delete (after a confirmation).
pub(crate) async fn action(State(c): State<Arc<Console>>, Path(name): Path<String>, request: Request) -> Response {
    let (ctx, form) = match submitted_with(&c, request, Right::ServiceConfig).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let etag = form.get("etag").map(str::to_owned);
    let short = provisio_core::text::shorten(&name);
    let base = format!("/console/certificates/{}", enc(&name));
    match form.get("action") {
        Some("generate") => {
            let r = c
                .parts
                .certificates
                .generate_verification_code(&name, etag.as_deref())
                .await
                .map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("POST /certificates/{short}/generateVerificationCode"), r.as_ref().err()).await;
            match r {
                Ok(cert) => show_page(&c, &ctx, &name, cert.properties.verification_code, None).await,
                Err(e) => show_page(&c, &ctx, &name, None, Some(ErrorView::from(&e))).await,
            }
        }
        Some("verify") => {
            let result = match form.file_text("certificate") {
                None => Err(Error::invalid(
                    "Choose the verification certificate's file: a certificate whose CN is the verification code, signed by this CA's key.",
                )),
                Some(text) => c
                    .parts
                    .certificates
                    .verify(
                        &name,
                        CertificateBody { certificate: Some(text), is_verified: None, properties: None },
                        etag.as_deref(),
                    )
                    .await
                    .map(|_| ()),
            };
            let result = result.map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("POST /certificates/{short}/verify"), result.as_ref().err()).await;
            match result {
                Ok(()) => c.done(&ctx, &base, "Verified. Enrollment groups can now use this certificate."),
                Err(e) => show_page(&c, &ctx, &name, None, Some(ErrorView::from(&e))).await,
            }
        }
        Some("delete") if form.get("confirm") != Some("yes") => {
            let page = Confirm {
                page: ctx.page("Delete", "certificates"),
                question: format!("Delete certificate {name}? Enrollment groups that name it stop admitting devices."),
                action: base.clone(),
                fields: vec![("action".into(), "delete".into()), ("etag".into(), etag.unwrap_or_default())],
                cancel: base,
            };
            view::render(StatusCode::OK, &page, &ctx.cookies)
        }
        Some("delete") => {
            let result = c.parts.certificates.delete(&name, etag.as_deref()).await.map_err(|e| e.tracked().0);
            ctx.audit(&c, format!("DELETE /certificates/{short}"), result.as_ref().err()).await;
            match result {
                Ok(()) => c.done(&ctx, "/console/certificates", "Deleted."),
                Err(e) => show_page(&c, &ctx, &name, None, Some(ErrorView::from(&e))).await,
            }
        }
        _ => view::error_page(&Error::invalid("Unknown action.")),
    }
}
