//! Provisio's web console at `/console`: the portal half of the DPS walkthrough (enrollments,
//! groups, certificates with proof of possession, registration records, linked hubs,
//! policies, the audit log), served by `provisio serve` itself on its HTTPS listener.
//!
//! Pages are rendered by the server (askama templates compiled into the binary) and work
//! without JavaScript; a small script adds copy buttons and refreshes the chart. Every
//! action goes through the engine's service API with the rights of the signed-in policy,
//! exactly as the REST service API checks them; every change is an audit line naming the
//! policy. Sessions are cookies signed with the instance's console key (any node accepts
//! them), forms carry a per-session CSRF token and the `Origin` is checked, and the
//! `Content-Security-Policy` allows nothing but the console's own origin.

mod chart;
mod form;
mod pages;
mod session;
mod view;

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};
use provisio_engine::{
    Engine, audit::AuditLog, certificates::Certificates, hubs::Hubs, instance::InstanceInfo, limits::KeyedWindow,
    service::ServiceApi,
};

/// The client's IP address, put in a request's extensions by the listener that accepted it
/// (for the sign-in limit and the audit log).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

/// What the console is built from.
pub struct ConsoleParts {
    /// The registration engine (the chart's counts).
    pub engine: Engine,
    /// The service API, whose rights the console applies.
    pub service: ServiceApi,
    /// The certificates API.
    pub certificates: Certificates,
    /// Linked hubs.
    pub hubs: Hubs,
    /// Where changes are recorded.
    pub audit: AuditLog,
    /// The audit log's file and how many rotated files are kept, to read it back.
    pub audit_file: Option<(PathBuf, u32)>,
    /// The instance's ID scope and endpoints, as `provisio info` prints them.
    pub info: InstanceInfo,
    /// The instance's console key ([`provisio_engine::instance::console_session_key`]).
    pub session_key: [u8; 32],
    /// Largest request body (certificate uploads included).
    pub max_body_bytes: usize,
}

/// The console's state, shared by its handlers.
pub(crate) struct Console {
    pub(crate) parts: ConsoleParts,
    pub(crate) signer: session::Signer,
    /// Sign-in attempts per client address.
    pub(crate) sign_ins: KeyedWindow,
}

/// Sign-in attempts allowed per client address in [`SIGN_IN_WINDOW`].
pub const SIGN_INS_PER_WINDOW: usize = 10;
/// The window of [`SIGN_INS_PER_WINDOW`].
pub const SIGN_IN_WINDOW: Duration = Duration::from_secs(60);

/// The console's routes, all under `/console`.
pub fn router(parts: ConsoleParts) -> Router {
    let max_body = parts.max_body_bytes;
    let console = Arc::new(Console {
        signer: session::Signer::new(&parts.session_key),
        sign_ins: KeyedWindow::new(SIGN_INS_PER_WINDOW, SIGN_IN_WINDOW),
        parts,
    });
    use pages::{admin, certificates, enrollments, overview, registrations};
    Router::new()
        .route("/console", get(overview::root))
        .route("/console/", get(overview::root))
        .route("/console/sign-in", get(overview::sign_in_page).post(overview::sign_in))
        .route("/console/sign-out", post(overview::sign_out))
        .route("/console/overview", get(overview::overview))
        .route("/console/chart.svg", get(overview::chart))
        .route("/console/assets/{name}", get(view::asset))
        .route("/console/enrollments", get(enrollments::list))
        .route("/console/enrollments/new", get(enrollments::new_individual).post(enrollments::create_individual))
        .route("/console/enrollments/{id}", get(enrollments::individual).post(enrollments::update_individual))
        .route("/console/enrollments/{id}/edit", get(enrollments::edit_individual))
        .route("/console/enrollments/{id}/action", post(enrollments::individual_action))
        .route("/console/groups/new", get(enrollments::new_group).post(enrollments::create_group))
        .route("/console/groups/{id}", get(enrollments::group).post(enrollments::update_group))
        .route("/console/groups/{id}/edit", get(enrollments::edit_group))
        .route("/console/groups/{id}/action", post(enrollments::group_action))
        .route("/console/certificates", get(certificates::list).post(certificates::add))
        .route("/console/certificates/{name}", get(certificates::show).post(certificates::action))
        .route("/console/registrations", get(registrations::list))
        .route("/console/registrations/{id}", get(registrations::show).post(registrations::delete))
        .route("/console/hubs", get(admin::hubs).post(admin::hub_action))
        .route("/console/policies", get(admin::policies).post(admin::policy_action))
        .route("/console/audit", get(admin::audit))
        .fallback(view::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(console)
}
