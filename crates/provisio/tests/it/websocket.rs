//! MQTT and AMQP over WebSockets at `/$iothub/websocket`: what the endpoint refuses, what
//! ends a connection, and that an upgraded connection keeps its slot under the connection
//! limits. The stock SDKs' WebSocket transports registering devices are in `interop.rs`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest},
};

use crate::common::{Instance, Server, assert_dps_error};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A WebSocket to the server's endpoint over TLS, asking for `protocol`.
async fn ws(s: &Server, protocol: Option<&str>) -> Result<WebSocketStream<Tls>, tungstenite::Error> {
    ws_at(s, "/$iothub/websocket", protocol).await
}

/// A WebSocket to `path` on the server over TLS, asking for `protocol`.
async fn ws_at(s: &Server, path: &str, protocol: Option<&str>) -> Result<WebSocketStream<Tls>, tungstenite::Error> {
    let tls = crate::common::tls_connect(s, s.port, None).await;
    let mut request = format!("wss://localhost:{}{path}", s.port).into_client_request().unwrap();
    if let Some(p) = protocol {
        request.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    tokio_tungstenite::client_async(request, tls).await.map(|(ws, _)| ws)
}

/// Whether the server ends the connection (within 5 s) without sending it anything.
async fn ended(c: &mut WebSocketStream<Tls>) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), c.next()).await {
        Ok(None | Some(Err(_) | Ok(Message::Close(_)))) => true,
        Ok(Some(Ok(m))) => panic!("the server sent {m:?}"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_endpoint_refuses_bad_upgrades_and_ends_bad_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("p.toml");
    std::fs::write(&cfg, "max_connections_per_ip = 3\n").unwrap();
    let s = Server::start(&tmp.path().join("d"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);

    // A plain request: a DPS error that says what the endpoint takes.
    let r = s.client().get(s.url("/$iothub/websocket")).send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_dps_error(status, &v, 400, 400_004);
    assert!(v["message"].as_str().unwrap().contains("AMQPWSB10"), "{v}");
    // An upgrade for a subprotocol it does not serve, or for none.
    for protocol in [Some("chat"), Some("mqttv3.1"), None] {
        match ws(&s, protocol).await {
            Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400, "{protocol:?}"),
            Err(e) => panic!("{protocol:?}: {e}"),
            Ok(_) => panic!("{protocol:?} was upgraded"),
        }
    }

    // The C# SDK upgrades `/` (it opens `wss://{host}:443`): the same sessions serve it, and a
    // CONNECT there gets its CONNACK. `/` without an upgrade is no endpoint.
    let mut c = ws_at(&s, "/", Some("mqtt")).await.unwrap();
    let mut connect = bytes::BytesMut::new();
    let mut packet = rumqttc::mqttbytes::v4::Connect::new("ws-root-dev");
    packet.login = Some(rumqttc::mqttbytes::v4::Login::new(
        format!("{}/registrations/ws-root-dev/api-version=2019-03-31", s.info.id_scope),
        "SharedAccessSignature sr=x&sig=y&se=1",
    ));
    rumqttc::mqttbytes::v4::Packet::Connect(packet).write(&mut connect, 1024).unwrap();
    c.send(Message::Binary(connect.freeze())).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), c.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(answer, Message::Binary(vec![0x20, 0x02, 0x00, 0x00].into()), "CONNACK, accepted");
    drop(c);
    assert_eq!(s.client().get(s.url("/")).send().await.unwrap().status(), 404);

    // MQTT: a packet type that does not exist ends the connection, as does a text message
    // (MQTT travels in binary messages). AMQP: a stream that does not start with an AMQP
    // protocol header is answered with the header the server speaks, then ended (AMQP 1.0,
    // 2.2).
    let mut c = ws(&s, Some("mqtt")).await.unwrap();
    c.send(Message::Binary(vec![0xf0, 0xff, 0xff, 0xff, 0xff, 0x7f].into())).await.unwrap();
    assert!(ended(&mut c).await, "malformed MQTT");
    let mut c = ws(&s, Some("mqtt")).await.unwrap();
    c.send(Message::Text("CONNECT".into())).await.unwrap();
    assert!(ended(&mut c).await, "text message");
    let mut c = ws(&s, Some("AMQPWSB10")).await.unwrap();
    c.send(Message::Binary(b"GET / HTTP/1.1\r\n\r\n".to_vec().into())).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), c.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(answer, Message::Binary(b"AMQP\x03\x01\x00\x00".to_vec().into()));
    assert!(ended(&mut c).await, "no AMQP header");

    // An upgraded connection keeps its slot under the limits: with three connections per
    // address, three open WebSockets leave none for another request until one closes.
    // (Once the connections above have given their slots back.)
    let mut held = Vec::new();
    let all_three = crate::common::eventually(Duration::from_secs(10), async || {
        held.clear();
        for p in ["mqtt", "mqtt", "AMQPWSB10"] {
            match ws(&s, Some(p)).await {
                Ok(c) => held.push(c),
                Err(_) => return false,
            }
        }
        true
    })
    .await;
    assert!(all_three, "three WebSockets could not be opened");
    assert!(s.client().get(s.url("/health")).send().await.is_err(), "a fourth connection was let in");
    drop(held.pop());
    let freed = crate::common::eventually(Duration::from_secs(10), async || {
        s.client().get(s.url("/health")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(freed, "the closed WebSocket gave its slot back");
    crate::common::logged(&s, "MQTT over WebSocket").await;
}

/// Writes one MQTT packet to `io`.
async fn send_packet(io: &mut (impl tokio::io::AsyncWrite + Unpin), p: rumqttc::mqttbytes::v4::Packet) {
    use tokio::io::AsyncWriteExt;
    let mut b = bytes::BytesMut::new();
    p.write(&mut b, 1 << 20).unwrap();
    io.write_all(&b).await.unwrap();
    io.flush().await.unwrap();
}

/// Reads the next MQTT packet from `io` (10 s at most).
async fn next_packet(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut bytes::BytesMut,
) -> rumqttc::mqttbytes::v4::Packet {
    use tokio::io::AsyncReadExt;
    loop {
        match rumqttc::mqttbytes::v4::Packet::read(buf, 1 << 20) {
            Ok(p) => return p,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("bad packet: {e}"),
        }
        let n = tokio::time::timeout(Duration::from_secs(10), io.read_buf(buf)).await.unwrap().unwrap();
        assert!(n > 0, "the server closed the connection");
    }
}

/// Issue #25, point 1: the C SDK asks for the subprotocol `MQTT` (its `MQTT_WS_PROTOCOL_NAME`),
/// and was refused with `400`. Any spelling is served, and echoed as the client sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websockets_is_served_for_any_spelling_of_the_subprotocol() {
    use rumqttc::mqttbytes::{
        QoS,
        v4::{Connect, Login, Packet, PubAck, Publish, Subscribe},
    };
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &[]);
    let scope = s.info().id_scope.clone();
    for (n, spelling) in ["MQTT", "Mqtt", "mqtt"].into_iter().enumerate() {
        let id = format!("ws-case-{n}");
        let e = crate::common::put_enrollment(
            &s,
            false,
            &id,
            serde_json::json!({"registrationId": id, "attestation": {"type": "symmetricKey"}}),
        )
        .await;
        let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
        let token = provisio_core::sas::build_token(
            &format!("{scope}/registrations/{id}"),
            key,
            crate::common::now() + 600,
            Some("registration"),
            provisio_core::sas::SrEncoding::Raw,
        )
        .unwrap();
        let tls = crate::common::tls_connect(&s, s.port, None).await;
        let mut request = format!("wss://localhost:{}/$iothub/websocket", s.port).into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", spelling.parse().unwrap());
        let (ws, answer) = tokio_tungstenite::client_async(request, tls).await.unwrap();
        assert_eq!(answer.headers()["sec-websocket-protocol"], spelling, "the client's own spelling is echoed");
        let mut io = provisio_wsio::WsIo::<_, Message>::new(ws);
        let mut buf = bytes::BytesMut::new();
        let mut connect = Connect::new(&id);
        connect.keep_alive = 60;
        connect.login = Some(Login::new(format!("{scope}/registrations/{id}/api-version=2019-03-31"), token));
        send_packet(&mut io, Packet::Connect(connect)).await;
        assert!(matches!(next_packet(&mut io, &mut buf).await, Packet::ConnAck(_)));
        send_packet(&mut io, Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))).await;
        assert!(matches!(next_packet(&mut io, &mut buf).await, Packet::SubAck(_)));
        let mut poll_topic = None;
        for (pkid, topic, body) in [
            (
                1,
                "$dps/registrations/PUT/iotdps-register/?$rid=1".to_owned(),
                format!("{{\"registrationId\":\"{id}\"}}"),
            ),
            (2, String::new(), String::new()),
        ] {
            let topic = if pkid == 1 { topic } else { poll_topic.take().unwrap() };
            let mut p = Publish::new(topic, QoS::AtLeastOnce, body.into_bytes());
            p.pkid = pkid;
            send_packet(&mut io, Packet::Publish(p)).await;
            assert_eq!(next_packet(&mut io, &mut buf).await, Packet::PubAck(PubAck::new(pkid)));
            let Packet::Publish(answer) = next_packet(&mut io, &mut buf).await else { panic!("no answer") };
            send_packet(&mut io, Packet::PubAck(PubAck::new(answer.pkid))).await;
            let (status, _, _) = provisio_testkit::devices::parse_response_topic(&answer.topic);
            let v: Value = serde_json::from_slice(&answer.payload).unwrap();
            if pkid == 1 {
                assert_eq!(status, 202, "{spelling}: {v}");
                let op = v["operationId"].as_str().unwrap();
                poll_topic =
                    Some(format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={op}"));
            } else {
                assert_eq!(status, 200, "{spelling}: {v}");
                assert_eq!(v["status"], "assigned", "{spelling}: {v}");
            }
        }
    }
}
