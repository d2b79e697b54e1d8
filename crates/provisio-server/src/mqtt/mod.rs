//! The MQTT front-end: MQTT 3.1.1 over TLS. Framing comes from rumqttc's `mqttbytes`
//! codec, the session rules (CONNECT, SUBSCRIBE, PUBACK before the answer) from
//! [`session`]; each request goes to [`Engine::device`], as from every transport, and its
//! answer is published on the response topic.

pub(crate) mod session;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use provisio_core::text::shorten;
use provisio_engine::{
    Answer, Credential, DeviceOperation, DeviceRequest, Engine, Error, Origin, Transport,
    limits::{Admission, PerIpLimiter},
};
use rumqttc::mqttbytes::{Error as MqttError, v4::Packet};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

use self::session::{Event, Identity, Request, RequestKind, Session};
use crate::error::Dropped;

/// Limits of the MQTT listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MqttLimits {
    /// Simultaneous connections.
    pub max_connections: usize,
    /// Largest packet accepted.
    pub max_packet_bytes: usize,
    /// TLS handshake plus CONNECT deadline.
    pub connect_timeout: Duration,
    /// Idle limit when the device sets no keep-alive.
    pub idle_timeout: Duration,
}

/// The longest keep-alive granted, in seconds (IoT Hub's limit): a device that asks for more
/// is held to this, so that a connection that went quiet is closed within about half an hour.
pub(crate) const MAX_KEEP_ALIVE_SECS: u16 = 1177;

/// How long a connected device may stay silent: one and a half times its keep-alive (MQTT
/// 3.1.1 §3.1.2.10), the keep-alive held to [`MAX_KEEP_ALIVE_SECS`]; without one, `idle`.
fn idle_limit(keep_alive: u16, idle: Duration) -> Duration {
    if keep_alive == 0 { idle } else { Duration::from_millis(u64::from(keep_alive.min(MAX_KEEP_ALIVE_SECS)) * 1500) }
}

/// Serves MQTT on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    engine: Engine,
    limits: MqttLimits,
    per_ip: Arc<PerIpLimiter>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(tls);
    let admission = Admission::new("MQTT", limits.max_connections, per_ip);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = crate::accept(&listener, "MQTT") => accepted,
        };
        let Some(admitted) = admission.admit(peer) else { continue };
        let (acceptor, engine) = (acceptor.clone(), engine.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            let deadline = tokio::time::Instant::now() + limits.connect_timeout;
            let Some(crate::tls::Accepted { stream: tls, chain }) =
                crate::tls::accept_by(&acceptor, tcp, deadline, peer, "MQTT").await
            else {
                return;
            };
            let origin = Origin::new(Transport::Mqtt, Some(peer.ip()));
            match connection(tls, chain, &engine, limits, deadline, origin).await {
                Ok(reason) => tracing::debug!(%peer, reason, "MQTT connection closed"),
                Err(reason) => tracing::info!(%peer, %reason, "MQTT connection dropped"),
            }
        });
    }
}

/// One connection: read, decode, let the session decide, serve requests in order.
pub(crate) async fn connection<S>(
    mut io: S,
    chain: Vec<Vec<u8>>,
    engine: &Engine,
    limits: MqttLimits,
    connect_deadline: tokio::time::Instant,
    origin: Origin,
) -> Result<String, Dropped>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut session = Session::new();
    let state = provisio_engine::Connection::default();
    // CONNECT is accepted before any credential is checked (the credential is checked with
    // the first request), so the first request must follow within the connect deadline's
    // length, whatever keep-alive was asked for (issue #24, finding 3).
    let mut first_request_by: Option<tokio::time::Instant> = None;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(4096);
    loop {
        // Decode whatever is buffered; read more when a packet is incomplete.
        let packet = loop {
            match Packet::read(&mut buf, limits.max_packet_bytes) {
                Ok(p) => break p,
                Err(MqttError::InsufficientBytes(_)) => {}
                Err(e) => return Err(Dropped::Malformed(format!("packet: {e}"))),
            }
            let idle = match session.identity() {
                None => connect_deadline,
                Some(id) => tokio::time::Instant::now() + idle_limit(id.keep_alive, limits.idle_timeout),
            };
            let deadline = first_request_by.map_or(idle, |by| by.min(idle));
            match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
                Ok(Ok(0)) => return Ok("peer closed the connection".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Dropped::Read(e)),
                Err(_) => {
                    return Err(Dropped::Timeout(if session.identity().is_none() {
                        "CONNECT"
                    } else if first_request_by.is_some() {
                        "a first request after CONNECT"
                    } else {
                        "packet within the keep-alive"
                    }));
                }
            }
        };
        let connecting = session.identity().is_none();
        let mut events = session.handle(packet);
        if connecting && session.identity().is_some() {
            first_request_by = Some(tokio::time::Instant::now() + limits.connect_timeout);
        }
        while !events.is_empty() {
            let mut next = Vec::new();
            for ev in events {
                match ev {
                    Event::Send(p) => {
                        p.write(&mut out, limits.max_packet_bytes)
                            .map_err(|e| Dropped::Malformed(format!("an answer does not encode: {e}")))?;
                    }
                    Event::Request(req) => {
                        first_request_by = None;
                        // What came before (the PUBACK) goes out before the answer.
                        flush(&mut io, &mut out).await?;
                        let Some(identity) = session.identity().cloned() else {
                            return Err(Dropped::Refused("request before CONNECT".into()));
                        };
                        let credential = Credential::from_parts(identity.password.clone(), chain.clone());
                        let answer = serve_request(engine, &identity, &credential, &req, origin, &state).await;
                        let close = answer.close_connection;
                        next.extend(session.respond(&req.rid, answer.status, answer.retry_after, answer.body));
                        if close {
                            next.push(Event::Close("too many refused X.509 attempts on one connection".into()));
                        }
                    }
                    Event::Close(reason) => {
                        flush(&mut io, &mut out).await?;
                        let _ = io.shutdown().await;
                        return Ok(reason);
                    }
                }
            }
            events = next;
        }
        flush(&mut io, &mut out).await?;
    }
}

async fn flush<S: tokio::io::AsyncWrite + Unpin>(io: &mut S, out: &mut BytesMut) -> Result<(), Dropped> {
    if !out.is_empty() {
        io.write_all(out).await.map_err(Dropped::Write)?;
        io.flush().await.map_err(Dropped::Write)?;
        out.clear();
    }
    Ok(())
}

/// Serves one request with the engine.
async fn serve_request(
    engine: &Engine,
    id: &Identity,
    credential: &Credential,
    req: &Request,
    origin: Origin,
    connection: &provisio_engine::Connection,
) -> Answer {
    let operation = match &req.kind {
        RequestKind::Register(body) => DeviceOperation::Register { body },
        RequestKind::Poll { operation_id } => DeviceOperation::OperationStatus { operation_id },
        RequestKind::Unknown(topic) => {
            return Error::NotFound {
                code: provisio_proto::error::codes::NOT_FOUND,
                message: format!(
                    "Unknown topic '{}'; DPS serves iotdps-register and iotdps-get-operationstatus.",
                    shorten(topic)
                ),
            }
            .answer();
        }
    };
    engine
        .device(DeviceRequest {
            origin,
            scope: &id.scope,
            registration_id: &id.registration_id,
            api_version: id.api_version.as_deref(),
            operation,
            credential,
            connection,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 3 of issue #24: a device could ask for 65,535 s and hold its slot for 27 hours.
    #[test]
    fn keep_alives_are_held_to_iot_hubs_limit() {
        let idle = Duration::from_secs(600);
        assert_eq!(idle_limit(60, idle), Duration::from_secs(90));
        assert_eq!(idle_limit(MAX_KEEP_ALIVE_SECS, idle), Duration::from_millis(1177 * 1500));
        assert_eq!(idle_limit(u16::MAX, idle), Duration::from_millis(1177 * 1500));
        assert_eq!(idle_limit(0, idle), idle);
    }
}
