//! The HTTPS front-end: one TLS listener carrying the device API, the service API,
//! `/health` and the WebSocket endpoint of MQTT and AMQP. This module owns sockets, TLS and
//! HTTP framing only; every DPS decision is made by the engine or the service API.

mod device;
mod response;
mod routes;
mod service;
mod websocket;

use std::{sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use provisio_engine::limits::{Admission, Admitted};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

pub(crate) use routes::AppState;

/// The certificates a client presented during the TLS handshake (empty without one).
#[derive(Debug, Clone, Default)]
pub struct PeerCertificates(pub Option<Arc<Vec<CertificateDer<'static>>>>);

impl PeerCertificates {
    /// The chain as the engine takes it, leaf first (DER; empty without one).
    #[must_use]
    pub fn der_chain(&self) -> Vec<Vec<u8>> {
        self.0.as_ref().map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect()).unwrap_or_default()
    }
}

/// The client's IP address (for the audit log).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::IpAddr);

/// The connection's slot under the connection limits, shared by its requests: a request
/// that upgrades the connection (WebSocket) keeps it for the life of the upgraded stream.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSlot {
    _admitted: Arc<Admitted>,
    /// What the engine keeps about the connection.
    pub(crate) engine: Arc<provisio_engine::Connection>,
}

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Simultaneous connections.
    pub max_connections: usize,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Request-head deadline (also the keep-alive idle limit).
    pub header_timeout: Duration,
    /// Most request headers (HTTP/1.1; HTTP/2 gets a matching header-list size).
    pub max_headers: usize,
}

/// Serves HTTPS on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (for at most 10 seconds).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<AppState>,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(tls);
    let router = routes::router(state.clone());
    let admission = Admission::new("HTTPS", limits.max_connections, state.per_ip.clone());
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_headers(limits.max_headers);
    builder.http2().max_header_list_size(u32::try_from(limits.max_headers * 1024).unwrap_or(u32::MAX));
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = crate::accept(&listener, "HTTPS") => accepted,
        };
        let Some(admitted) = admission.admit(peer) else { continue };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let slot = ConnectionSlot { _admitted: Arc::new(admitted), engine: Arc::default() };
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let peer_certs = PeerCertificates(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
            );
            // A connection that sends no request within the head deadline is closed: hyper's
            // `header_read_timeout` starts only once it knows the HTTP version, and sniffing
            // that has no deadline of its own (issue #24, finding 3).
            let first_request = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = first_request.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
                req.extensions_mut().insert(peer_certs.clone());
                req.extensions_mut().insert(PeerAddr(peer.ip()));
                req.extensions_mut().insert(slot.clone());
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(tls), service).into_owned());
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = &mut conn => ended,
                () = tokio::time::sleep(limits.header_timeout) => {
                    if !first_request.load(std::sync::atomic::Ordering::Relaxed) {
                        tracing::debug!(%peer, "no request within the head deadline; closing the connection");
                        return;
                    }
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not finish within 10 s of shutdown");
    }
}
