//! Scripted devices on every transport: one request, sent exactly as written (any
//! api-version or none, any body, any token), and its answer read back into one shape
//! ([`Reply`]), so that a test can send the same request over HTTPS, MQTT and AMQP and
//! compare what comes back.

use std::time::Duration;

use bytes::BytesMut;
use fe2o3_amqp::{
    Connection, Receiver, Sender, Session,
    sasl_profile::SaslProfile,
    types::{
        definitions::Fields,
        messaging::{ApplicationProperties, Batch, Body, Data, Message, MessageId, Outcome, Properties},
        primitives::{Binary, SimpleValue, Symbol, Value},
    },
};
use rumqttc::mqttbytes::{
    QoS,
    v4::{Connect, Login, Packet, PubAck, Publish, Subscribe},
};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Instance;

/// A device transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The REST device API.
    Https,
    /// MQTT over TLS.
    Mqtt,
    /// AMQP over TLS.
    Amqp,
}

impl Transport {
    /// All three.
    pub const ALL: [Self; 3] = [Self::Https, Self::Mqtt, Self::Amqp];
}

/// One device request, as sent.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// The ID scope it names.
    pub scope: &'a str,
    /// The registration id it names.
    pub registration_id: &'a str,
    /// The api-version it carries (query, MQTT username, AMQP link property), or none.
    pub api_version: Option<&'a str>,
    /// The SAS token (Authorization, MQTT password, SASL PLAIN password).
    pub token: &'a str,
    /// Register with this body, or poll this operation.
    pub op: Op<'a>,
}

/// What is asked.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Register, with this body.
    Register(&'a [u8]),
    /// Poll this operation.
    Poll(&'a str),
}

/// An answer, whatever the transport.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status, MQTT topic status, AMQP `iotdps-status`.
    pub status: u16,
    /// `Retry-After`, the topic's `retry-after`, AMQP's `retry-after`.
    pub retry_after: Option<u32>,
    /// The JSON body (the error body of a Rejected outcome over AMQP).
    pub body: Json,
}

/// Sends `call` over `transport` on a connection of its own.
///
/// # Panics
/// When the server does not answer the way any DPS transport answers.
pub async fn send(s: &impl Instance, transport: Transport, call: &Call<'_>) -> Reply {
    match transport {
        Transport::Https => https(s, call).await,
        Transport::Mqtt => mqtt(s, call).await,
        Transport::Amqp => amqp(s, call).await,
    }
}

#[allow(clippy::expect_used)]
async fn https(s: &impl Instance, call: &Call<'_>) -> Reply {
    let base = format!("/{}/registrations/{}", call.scope, call.registration_id);
    let query = call.api_version.map(|v| format!("?api-version={v}")).unwrap_or_default();
    let client = s.client();
    let request = match call.op {
        Op::Register(body) => client.put(s.url(&format!("{base}/register{query}"))).body(body.to_vec()),
        Op::Poll(op) => client.get(s.url(&format!("{base}/operations/{op}{query}"))),
    };
    let r = request
        .header("Content-Type", "application/json; charset=utf-8")
        .header("Authorization", call.token)
        .send()
        .await
        .expect("an HTTPS answer");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let text = r.text().await.expect("a body");
    Reply { status, retry_after, body: serde_json::from_str(&text).unwrap_or(Json::String(text)) }
}

/// A raw MQTT 3.1.1 client over TLS: writes packets, reads packets.
pub struct RawMqtt {
    io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: BytesMut,
}

impl RawMqtt {
    /// TLS to the server's MQTT listener.
    ///
    /// # Panics
    /// When the server runs no MQTT listener.
    #[allow(clippy::expect_used)]
    pub async fn connect(s: &impl Instance) -> Self {
        let port = s.info().mqtt_port().expect("an MQTT listener");
        Self { io: crate::tls_connect(s, port, None).await, buf: BytesMut::new() }
    }

    /// Writes a packet.
    ///
    /// # Panics
    /// If the packet cannot be written.
    #[allow(clippy::expect_used)]
    pub async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, 1 << 20).expect("an encodable packet");
        self.io.write_all(&b).await.expect("the connection takes it");
    }

    /// Writes raw bytes.
    ///
    /// # Panics
    /// If the connection is closed.
    #[allow(clippy::expect_used)]
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("the connection takes it");
        self.io.flush().await.expect("the connection takes it");
    }

    /// The next packet, or `None` when the server closed the connection.
    ///
    /// # Panics
    /// When the server sends a malformed packet or nothing for 10 s.
    #[allow(clippy::expect_used)]
    pub async fn recv(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from server: {e}"),
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.buf))
                .await
                .expect("server silent");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// CONNECT as `id` with this username and password; returns the client once the
    /// CONNACK accepted it.
    ///
    /// # Panics
    /// Without an accepting CONNACK.
    pub async fn hello_as(s: &impl Instance, id: &str, username: &str, password: &str) -> Self {
        let mut c = Self::connect(s).await;
        let mut conn = Connect::new(id);
        conn.keep_alive = 30;
        conn.login = Some(Login::new(username, password));
        c.send(Packet::Connect(conn)).await;
        let Some(Packet::ConnAck(a)) = c.recv().await else { panic!("no CONNACK") };
        assert_eq!(a.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success, "CONNACK refused");
        assert!(!a.session_present);
        c
    }

    /// CONNECT as `id` of the instance's scope with api-version 2019-03-31.
    ///
    /// # Panics
    /// Without an accepting CONNACK.
    pub async fn hello(s: &impl Instance, id: &str, password: &str) -> Self {
        let username = format!("{}/registrations/{id}/api-version=2019-03-31", s.info().id_scope);
        Self::hello_as(s, id, &username, password).await
    }

    /// SUBSCRIBE to the response topics.
    ///
    /// # Panics
    /// Without a SUBACK.
    pub async fn subscribe(&mut self) {
        self.send(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))).await;
        assert!(matches!(self.recv().await, Some(Packet::SubAck(_))), "no SUBACK");
    }

    /// PUBLISHes a QoS 1 request and returns the answer (after checking that its PUBACK
    /// came first, DPS's order), acknowledged.
    ///
    /// # Panics
    /// When the order or the answer is wrong.
    pub async fn request(&mut self, topic: &str, payload: &[u8], pkid: u16) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        assert_eq!(self.recv().await, Some(Packet::PubAck(PubAck::new(pkid))), "PUBACK before the answer");
        let Some(Packet::Publish(answer)) = self.recv().await else { panic!("no answer") };
        self.send(Packet::PubAck(PubAck::new(answer.pkid))).await;
        answer
    }
}

/// The status and retry hint of a response topic `$dps/registrations/res/{status}/?$rid=…`.
///
/// # Panics
/// When the topic is not a response topic.
#[must_use]
pub fn parse_response_topic(topic: &str) -> (u16, String, Option<u32>) {
    let rest = topic.strip_prefix("$dps/registrations/res/").unwrap_or_else(|| panic!("not a response topic: {topic}"));
    let (status, query) = rest.split_once("/?").unwrap_or_else(|| panic!("no query in {topic}"));
    let mut rid = String::new();
    let mut retry = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("$rid", v)) => v.clone_into(&mut rid),
            Some(("retry-after", v)) => retry = v.parse().ok(),
            _ => {}
        }
    }
    (status.parse().unwrap_or_else(|_| panic!("status in {topic}")), rid, retry)
}

async fn mqtt(s: &impl Instance, call: &Call<'_>) -> Reply {
    let mut username = format!("{}/registrations/{}", call.scope, call.registration_id);
    if let Some(v) = call.api_version {
        username.push_str(&format!("/api-version={v}"));
    }
    let mut c = RawMqtt::hello_as(s, call.registration_id, &username, call.token).await;
    c.subscribe().await;
    let answer = match call.op {
        Op::Register(body) => c.request("$dps/registrations/PUT/iotdps-register/?$rid=1", body, 1).await,
        Op::Poll(op) => {
            c.request(&format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId={op}"), b" ", 1)
                .await
        }
    };
    c.send(Packet::Disconnect).await;
    let (status, rid, retry_after) = parse_response_topic(&answer.topic);
    assert_eq!(rid, "1", "the $rid is echoed");
    Reply {
        status,
        retry_after,
        body: serde_json::from_slice(&answer.payload).unwrap_or_else(|_| Json::String(format!("{:?}", answer.payload))),
    }
}

fn number(v: &SimpleValue) -> Option<u32> {
    match v {
        SimpleValue::Int(i) => u32::try_from(*i).ok(),
        SimpleValue::Uint(u) => Some(*u),
        SimpleValue::Long(l) => u32::try_from(*l).ok(),
        SimpleValue::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn value_number(v: &Value) -> Option<u32> {
    match v {
        Value::Int(i) => u32::try_from(*i).ok(),
        Value::Uint(u) => Some(*u),
        Value::Long(l) => u32::try_from(*l).ok(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[allow(clippy::expect_used)]
async fn amqp(s: &impl Instance, call: &Call<'_>) -> Reply {
    let port = s.info().amqp_port().expect("an AMQP listener");
    let mut conn = Connection::builder()
        .container_id("testkit-device")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: format!("{}/registrations/{}", call.scope, call.registration_id),
            password: call.token.to_owned(),
        })
        .open_with_stream(crate::tls_connect(s, port, None).await)
        .await
        .expect("the connection opens");
    let mut session = Session::begin(&mut conn).await.expect("a session");
    let address = format!("{}/registrations/{}", call.scope, call.registration_id);
    let properties = || {
        let mut f = Fields::default();
        if let Some(v) = call.api_version {
            f.insert(Symbol::from("com.microsoft:api-version"), Value::String(v.into()));
        }
        f
    };
    let mut rx = Receiver::builder()
        .name("recv")
        .source(address.as_str())
        .properties(properties())
        .attach(&mut session)
        .await
        .expect("the receiver attaches");
    let mut tx = Sender::builder()
        .name("send")
        .target(address.as_str())
        .properties(properties())
        .attach(&mut session)
        .await
        .expect("the sender attaches");
    let (kind, body) = match call.op {
        Op::Register(b) => ("iotdps-register", Body::Data(Batch::new(vec![Data(Binary::from(b.to_vec()))]))),
        Op::Poll(_) => ("iotdps-get-operationstatus", Body::Empty),
    };
    let mut ap = ApplicationProperties::builder().insert("iotdps-operation-type", SimpleValue::String(kind.into()));
    if let Op::Poll(op) = call.op {
        ap = ap.insert("iotdps-operation-id", SimpleValue::String(op.into()));
    }
    let message = Message::<Body<Value>> {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties { correlation_id: Some(MessageId::String("c-1".into())), ..Properties::default() }),
        application_properties: Some(ap.build()),
        body,
        footer: None,
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), tx.send(message))
        .await
        .expect("an outcome in time")
        .expect("the request is settled");
    let reply = match outcome {
        Outcome::Accepted(_) => {
            let d = tokio::time::timeout(Duration::from_secs(10), rx.recv::<Body<Value>>())
                .await
                .expect("a reply in time")
                .expect("a reply");
            rx.accept(&d).await.expect("the reply is accepted");
            let m = d.into_message();
            let props = m.application_properties.as_ref().map(|p| &p.0);
            let status = props.and_then(|p| p.get("iotdps-status")).and_then(number).expect("iotdps-status");
            let retry_after = props.and_then(|p| p.get("retry-after")).and_then(number);
            let bytes: Vec<u8> = match &m.body {
                Body::Data(b) => b.iter().flat_map(|d| d.0.iter().copied()).collect(),
                other => panic!("the reply is not a data section: {other:?}"),
            };
            Reply {
                status: u16::try_from(status).unwrap_or(0),
                retry_after,
                body: serde_json::from_slice(&bytes).unwrap_or(Json::Null),
            }
        }
        Outcome::Rejected(r) => {
            let e = r.error.expect("a rejection with an error");
            let info = e.info.as_ref();
            let status =
                info.and_then(|i| i.get(&Symbol::from("iotdps-status"))).and_then(value_number).expect("iotdps-status");
            let retry_after = info.and_then(|i| i.get(&Symbol::from("retry-after"))).and_then(value_number);
            let body = e.description.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or(Json::Null);
            Reply { status: u16::try_from(status).unwrap_or(0), retry_after, body }
        }
        other => panic!("unexpected outcome {other:?}"),
    };
    let _ = tx.close().await;
    let _ = rx.close().await;
    let _ = session.end().await;
    let _ = conn.close().await;
    reply
}
