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
            let deadline = match session.identity() {
                None => connect_deadline,
                Some(id) if id.keep_alive > 0 => {
                    tokio::time::Instant::now() + Duration::from_millis(u64::from(id.keep_alive) * 1500)
                }
                Some(_) => tokio::time::Instant::now() + limits.idle_timeout,
            };
            match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
                Ok(Ok(0)) => return Ok("peer closed the connection".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Dropped::Read(e)),
                Err(_) => {
                    return Err(Dropped::Timeout(if session.identity().is_none() {
                        "CONNECT"
                    } else {
                        "packet within the keep-alive"
                    }));
                }
            }
        };
        let mut events = session.handle(packet);
        while !events.is_empty() {
            let mut next = Vec::new();
            for ev in events {
                match ev {
                    Event::Send(p) => {
                        p.write(&mut out, limits.max_packet_bytes)
                            .map_err(|e| Dropped::Malformed(format!("an answer does not encode: {e}")))?;
                    }
                    Event::Request(req) => {
                        // What came before (the PUBACK) goes out before the answer.
                        flush(&mut io, &mut out).await?;
                        let Some(identity) = session.identity().cloned() else {
                            return Err(Dropped::Refused("request before CONNECT".into()));
                        };
                        let credential = Credential::from_parts(identity.password.clone(), chain.clone());
                        let answer = serve_request(engine, &identity, &credential, &req, origin).await;
                        next.extend(session.respond(&req.rid, answer.status, answer.retry_after, answer.body));
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
        })
        .await
}
