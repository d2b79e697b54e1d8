//! MQTT and AMQP over WebSockets: `wss://{host}/$iothub/websocket` on the HTTPS listener, as
//! the device SDKs' WebSocket transports (`MqttWs`, `AmqpWs`, `websockets=True`, …) speak
//! them for networks that only let port 443 out. The WebSocket's binary messages carry the
//! same byte stream as a TLS connection to the MQTT or AMQP port; the subprotocol the
//! client asks for (`mqtt`, or `AMQPWSB10`) picks which session serves it. A client
//! certificate presented in the HTTPS handshake attests as it does on those ports.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use axum::{
    body::Bytes,
    extract::{
        FromRequestParts, Request,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    response::Response,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{AppState, ConnectionSlot, PeerAddr, PeerCertificates, response};
use crate::ServerError;

/// The subprotocol of MQTT over WebSockets (MQTT 3.1.1, section 6).
pub const MQTT: &str = "mqtt";
/// The subprotocol of the AMQP WebSocket binding (AMQP 1.0).
pub const AMQP: &str = "AMQPWSB10";

/// Whether `path` is the device SDKs' WebSocket endpoint.
#[must_use]
pub fn is_endpoint(path: &str) -> bool {
    path.eq_ignore_ascii_case("/$iothub/websocket")
}

/// Answers a request for the WebSocket endpoint: the upgrade, then the MQTT or AMQP
/// session on the upgraded connection (which keeps the HTTPS connection's slot under the
/// connection limits), or a DPS error if the request is not a usable WebSocket upgrade.
pub async fn upgrade(state: &Arc<AppState>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let chain: Vec<Vec<u8>> = parts
        .extensions
        .get::<PeerCertificates>()
        .and_then(|p| p.0.as_ref())
        .map(|c| c.iter().map(|d| d.to_vec()).collect())
        .unwrap_or_default();
    let peer = parts.extensions.get::<PeerAddr>().map(|a| a.0);
    let slot = parts.extensions.get::<ConnectionSlot>().cloned();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => {
            return response::error(&ServerError::invalid(format!(
                "/$iothub/websocket takes a WebSocket upgrade with the subprotocol {MQTT} or {AMQP} ({})",
                rejection.body_text()
            )));
        }
    };
    let (mqtt, amqp) = (state.mqtt_limits, state.amqp_limits);
    // A message carries at most one largest packet or frame, plus its framing.
    let largest = mqtt.max_packet_bytes.max(usize::try_from(amqp.max_frame_bytes).unwrap_or(usize::MAX)) + 1024;
    let ws = ws.protocols([MQTT, AMQP]).max_message_size(largest).max_frame_size(largest);
    let is_mqtt = match ws.selected_protocol().and_then(|p| p.to_str().ok()) {
        Some(MQTT) => true,
        Some(_) => false,
        None => {
            return response::error(&ServerError::invalid(format!(
                "/$iothub/websocket needs the WebSocket subprotocol {MQTT} or {AMQP} (Sec-WebSocket-Protocol)"
            )));
        }
    };
    let engine = state.engine.clone();
    ws.on_failed_upgrade(move |e| tracing::debug!(?peer, error = %e, "WebSocket upgrade failed")).on_upgrade(
        move |socket| async move {
            let _slot = slot;
            let io = WsIo::new(socket);
            let result = if is_mqtt {
                let deadline = tokio::time::Instant::now() + mqtt.connect_timeout;
                let origin = crate::engine::Origin { transport: "mqtt-ws", peer };
                crate::mqtt::connection(io, chain, &engine, mqtt, deadline, origin).await
            } else {
                let deadline = tokio::time::Instant::now() + amqp.connect_timeout;
                let origin = crate::engine::Origin { transport: "amqp-ws", peer };
                crate::amqp::connection(io, chain, engine, amqp, deadline, origin).await
            };
            let transport = if is_mqtt { "MQTT over WebSocket" } else { "AMQP over WebSocket" };
            match result {
                Ok(reason) => tracing::debug!(?peer, reason, transport, "connection closed"),
                Err(reason) => tracing::info!(?peer, reason, transport, "connection dropped"),
            }
        },
    )
}

/// A WebSocket's binary messages as one byte stream, as the MQTT and AMQP sessions read
/// and write a TLS stream. Each write is sent as one binary message; pings are answered by
/// the WebSocket layer; a close message or the end of the connection reads as the end of
/// the stream.
pub struct WsIo {
    ws: WebSocket,
    /// What is left of the message being read.
    pending: Bytes,
    /// The peer sent a close message.
    closed: bool,
}

impl WsIo {
    /// The stream of `ws`'s binary messages.
    #[must_use]
    pub fn new(ws: WebSocket) -> Self {
        Self { ws, pending: Bytes::new(), closed: false }
    }
}

impl std::fmt::Debug for WsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo").field("pending", &self.pending.len()).field("closed", &self.closed).finish()
    }
}

impl AsyncRead for WsIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a text message where the protocol's binary messages were expected",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => self.closed = true,
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        ready!(self.ws.poll_ready_unpin(cx)).map_err(std::io::Error::other)?;
        self.ws.start_send_unpin(Message::Binary(Bytes::copy_from_slice(data))).map_err(std::io::Error::other)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ws.poll_flush_unpin(cx).map_err(std::io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ws.poll_close_unpin(cx).map_err(std::io::Error::other)
    }
}
