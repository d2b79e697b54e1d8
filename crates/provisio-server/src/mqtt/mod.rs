//! The MQTT front-end: MQTT 3.1.1 over TLS. Framing comes from rumqttc's `mqttbytes`
//! codec, the DPS session rules from [`session`]; requests go to the same engine calls as
//! HTTPS and answers carry the same JSON bodies and error codes.

pub mod session;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use provisio_proto::{
    DEVICE_API_VERSIONS,
    device::{RegistrationOperationStatus, RegistrationStatus},
};
use rumqttc::mqttbytes::{Error as MqttError, v4::Packet};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

use self::session::{Event, Request, RequestKind, Session};
use crate::{
    ServerError,
    engine::{Credential, Engine},
};

/// Limits of the MQTT listener.
#[derive(Debug, Clone, Copy)]
pub struct MqttLimits {
    /// Simultaneous connections.
    pub max_connections: usize,
    /// Largest packet accepted.
    pub max_packet_bytes: usize,
    /// TLS handshake plus CONNECT deadline.
    pub connect_timeout: Duration,
    /// Idle limit when the device sets no keep-alive.
    pub idle_timeout: Duration,
    /// `retry-after` on `assigning` answers.
    pub retry_after_secs: u32,
}

/// Serves MQTT on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    engine: Engine,
    limits: MqttLimits,
    per_ip: Arc<crate::http::limit::PerIpLimiter>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(tls);
    let admission = crate::http::limit::Admission::new("MQTT", limits.max_connections, per_ip);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = admission.accept(&listener) => accepted,
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
            let origin = crate::engine::Origin { transport: "mqtt", peer: Some(peer.ip()) };
            match connection(tls, chain, &engine, limits, deadline, origin).await {
                Ok(reason) => tracing::debug!(%peer, reason, "MQTT connection closed"),
                Err(reason) => tracing::info!(%peer, reason, "MQTT connection dropped"),
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
    origin: crate::engine::Origin,
) -> Result<String, String>
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
                Err(e) => return Err(format!("malformed packet: {e}")),
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
                Ok(Err(e)) => return Err(format!("read failed: {e}")),
                Err(_) => {
                    return Err(
                        if session.identity().is_none() { "no CONNECT in time" } else { "keep-alive expired" }.into()
                    );
                }
            }
        };
        let mut events = session.handle(packet);
        while !events.is_empty() {
            let mut next = Vec::new();
            for ev in events {
                match ev {
                    Event::Send(p) => {
                        p.write(&mut out, limits.max_packet_bytes).map_err(|e| format!("encoding failed: {e}"))?;
                    }
                    Event::Request(req) => {
                        // What came before (the PUBACK) goes out before the answer.
                        flush(&mut io, &mut out).await?;
                        let Some(identity) = session.identity().cloned() else {
                            return Err("request before CONNECT".into());
                        };
                        let credential = match (&identity.password, chain.is_empty()) {
                            (Some(p), _) => Credential::Sas(p.clone()),
                            (None, false) => Credential::X509(chain.clone()),
                            (None, true) => Credential::None,
                        };
                        let (status, retry, body) =
                            serve_request(engine, &identity, &credential, &req, limits.retry_after_secs, &origin).await;
                        next.extend(session.respond(&req.rid, status, retry, body));
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

async fn flush<S: tokio::io::AsyncWrite + Unpin>(io: &mut S, out: &mut BytesMut) -> Result<(), String> {
    if !out.is_empty() {
        io.write_all(out).await.map_err(|e| format!("write failed: {e}"))?;
        io.flush().await.map_err(|e| format!("write failed: {e}"))?;
        out.clear();
    }
    Ok(())
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub(crate) fn error_answer(e: &ServerError) -> (u16, Option<u32>, Vec<u8>) {
    let status = e.status();
    let retry = match e.retry_after() {
        Some(s) => Some(u32::try_from(s).unwrap_or(5)),
        None if status >= 500 => Some(5),
        None => None,
    };
    (status, retry, to_json(&e.to_body()))
}

/// Serves one request with the engine; returns (status, retry-after, body).
async fn serve_request(
    engine: &Engine,
    id: &session::Identity,
    credential: &Credential,
    req: &Request,
    retry_after: u32,
    origin: &crate::engine::Origin,
) -> (u16, Option<u32>, Vec<u8>) {
    let result = async {
        let version = match id.api_version.as_deref() {
            None => Err(ServerError::invalid("The MQTT username carries no api-version.")),
            Some(v) if !provisio_proto::is_supported_api_version(DEVICE_API_VERSIONS, v) => {
                Err(ServerError::invalid(format!("Unsupported API version {}.", crate::engine::shorten(v))))
            }
            Some(_) => Ok(()),
        };
        match &req.kind {
            RequestKind::Register(body) => {
                let registration = version.and_then(|()| {
                    crate::bodies::device_registration(body).map_err(|e| {
                        ServerError::malformed(format!("The payload is not a valid DeviceRegistration: {e}"))
                    })
                });
                let op = engine.register_from(origin, &id.scope, &id.registration_id, registration, credential).await?;
                Ok((202, Some(retry_after), to_json(&RegistrationOperationStatus::accepted(op))))
            }
            RequestKind::Poll { operation_id } => {
                version?;
                if operation_id.is_empty() {
                    return Err(ServerError::invalid("The poll topic needs &operationId=…"));
                }
                let st = engine.operation_status(&id.scope, &id.registration_id, operation_id, credential).await?;
                Ok(if st.status == RegistrationStatus::Assigning {
                    (202, Some(retry_after), to_json(&st))
                } else {
                    (200, None, to_json(&st))
                })
            }
            RequestKind::Unknown(topic) => version.and(Err(ServerError::NotFound {
                code: provisio_proto::error::codes::NOT_FOUND,
                message: format!(
                    "Unknown topic '{}'; DPS serves iotdps-register and iotdps-get-operationstatus.",
                    crate::engine::shorten(topic)
                ),
            })),
        }
    }
    .await;
    result.unwrap_or_else(|e| error_answer(&e))
}
