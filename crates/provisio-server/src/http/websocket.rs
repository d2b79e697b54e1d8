//! MQTT and AMQP over WebSockets: `wss://{host}/$iothub/websocket` (or `wss://{host}/`) on
//! the HTTPS listener, as the device SDKs' WebSocket transports (`MqttWs`, `AmqpWs`,
//! `websockets=True`, …) speak them for networks that only let port 443 out. The WebSocket's binary messages carry the
//! same byte stream as a TLS connection to the MQTT or AMQP port; the subprotocol the
//! client asks for (`mqtt`, or `AMQPWSB10`) picks which session serves it. A client
//! certificate presented in the HTTPS handshake attests as it does on those ports.

use std::sync::Arc;

use axum::{
    extract::{
        FromRequestParts, Request,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    response::Response,
};

use provisio_engine::{Error, Origin, Transport};

use super::{AppState, ConnectionSlot, PeerAddr, PeerCertificates, response};

/// The subprotocol of MQTT over WebSockets (MQTT 3.1.1, section 6).
pub(crate) const MQTT: &str = "mqtt";
/// The subprotocol of the AMQP WebSocket binding (AMQP 1.0).
pub(crate) const AMQP: &str = "AMQPWSB10";

/// The subprotocol a client asked for that this endpoint speaks, in the client's spelling,
/// and whether it is MQTT: the first of the `Sec-WebSocket-Protocol` offers that names
/// `mqtt` or `AMQPWSB10` without regard to ASCII case. The C SDK asks for `MQTT` (its
/// `MQTT_WS_PROTOCOL_NAME`), others for `mqtt`; RFC 6455 has the server echo the client's
/// token, so it is answered as sent.
fn chosen_subprotocol(headers: &axum::http::HeaderMap) -> Option<(String, bool)> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|offer| {
            if offer.eq_ignore_ascii_case(MQTT) {
                Some((offer.to_owned(), true))
            } else if offer.eq_ignore_ascii_case(AMQP) {
                Some((offer.to_owned(), false))
            } else {
                None
            }
        })
}

/// Whether a request is for the device SDKs' WebSocket endpoint: the path
/// `/$iothub/websocket` (C, Node, Python, Java), or a WebSocket upgrade of `/` (the C# SDK
/// opens `wss://{host}:443` without a path).
#[must_use]
pub(crate) fn is_endpoint(path: &str, headers: &axum::http::HeaderMap) -> bool {
    path.eq_ignore_ascii_case("/$iothub/websocket")
        || path == "/"
            && headers
                .get(axum::http::header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
}

/// Answers a request for the WebSocket endpoint: the upgrade, then the MQTT or AMQP
/// session on the upgraded connection (which keeps the HTTPS connection's slot under the
/// connection limits), or a DPS error if the request is not a usable WebSocket upgrade.
pub(crate) async fn upgrade(state: &Arc<AppState>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let chain = parts.extensions.get::<PeerCertificates>().map(PeerCertificates::der_chain).unwrap_or_default();
    let peer = parts.extensions.get::<PeerAddr>().map(|a| a.0);
    let slot = parts.extensions.get::<ConnectionSlot>().cloned();
    let chosen = chosen_subprotocol(&parts.headers);
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => {
            return response::error(&Error::invalid(format!(
                "/$iothub/websocket takes a WebSocket upgrade with the subprotocol {MQTT} or {AMQP} ({})",
                rejection.body_text()
            )));
        }
    };
    let (mqtt, amqp) = (state.mqtt_limits, state.amqp_limits);
    // A message carries at most one largest packet or frame, plus its framing.
    let largest = mqtt.max_packet_bytes.max(usize::try_from(amqp.max_frame_bytes).unwrap_or(usize::MAX)) + 1024;
    let Some((offer, is_mqtt)) = chosen else {
        return response::error(&Error::invalid(format!(
            "/$iothub/websocket needs the WebSocket subprotocol {MQTT} or {AMQP} (Sec-WebSocket-Protocol; any case)"
        )));
    };
    // axum compares offers exactly: it is given the client's own spelling, which it echoes.
    let ws = ws.protocols([offer]).max_message_size(largest).max_frame_size(largest);
    let engine = state.engine.clone();
    ws.on_failed_upgrade(move |e| tracing::debug!(?peer, error = %e, "WebSocket upgrade failed")).on_upgrade(
        move |socket| async move {
            let _slot = slot;
            let io = provisio_wsio::WsIo::<WebSocket, Message>::new(socket);
            let result = if is_mqtt {
                let deadline = tokio::time::Instant::now() + mqtt.connect_timeout;
                let origin = Origin::new(Transport::MqttWs, peer);
                crate::mqtt::connection(io, chain, &engine, mqtt, deadline, origin).await
            } else {
                let deadline = tokio::time::Instant::now() + amqp.connect_timeout;
                let origin = Origin::new(Transport::AmqpWs, peer);
                crate::amqp::connection(io, chain, engine, amqp, deadline, origin).await
            };
            let transport = if is_mqtt { "MQTT over WebSocket" } else { "AMQP over WebSocket" };
            match result {
                Ok(reason) => tracing::debug!(?peer, reason, transport, "connection closed"),
                Err(reason) => tracing::info!(?peer, %reason, transport, "connection dropped"),
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(values: &[&str]) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        for v in values {
            h.append(axum::http::header::SEC_WEBSOCKET_PROTOCOL, axum::http::HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn subprotocols_match_in_any_case_and_keep_the_clients_spelling() {
        assert_eq!(chosen_subprotocol(&offers(&["MQTT"])), Some(("MQTT".into(), true)));
        assert_eq!(chosen_subprotocol(&offers(&["Mqtt"])), Some(("Mqtt".into(), true)));
        assert_eq!(chosen_subprotocol(&offers(&["mqtt"])), Some(("mqtt".into(), true)));
        assert_eq!(chosen_subprotocol(&offers(&["amqpwsb10"])), Some(("amqpwsb10".into(), false)));
        // The client's order of preference, over several headers and lists.
        assert_eq!(chosen_subprotocol(&offers(&["chat, AMQPWSB10", "mqtt"])), Some(("AMQPWSB10".into(), false)));
        assert_eq!(chosen_subprotocol(&offers(&["chat", "mqttv5"])), None);
        assert_eq!(chosen_subprotocol(&offers(&[])), None);
    }
}
