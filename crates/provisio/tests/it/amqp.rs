//! The AMQP transport: the stock Node AMQP client (symmetric keys, individual and group,
//! and X.509), fe2o3-amqp's client as a scripted device, and raw frames for what no
//! well-behaved client sends. Every refusal is checked to store nothing.

use std::time::Duration;

use fe2o3_amqp::{
    Connection, Receiver, Sender, Session,
    connection::ConnectionHandle,
    sasl_profile::SaslProfile,
    types::{
        messaging::{ApplicationProperties, Body, Message, MessageId, Outcome, Properties},
        primitives::{Binary, SimpleValue, Value},
    },
};
use fe2o3_amqp_types::{
    definitions::{DeliveryTag, Handle},
    performatives::{Begin, Open, Performative, Transfer},
    primitives::Symbol,
    sasl::{SaslCode, SaslInit, SaslOutcome},
};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Instance, Server, now, put_enrollment};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn registration_status(s: &Server, id: &str) -> u16 {
    crate::common::service(s, reqwest::Method::GET, &format!("/registrations/{id}?api-version=2021-10-01"), None, None)
        .await
        .0
}

/// An error condition's symbol.
fn cond(c: &fe2o3_amqp_types::definitions::ErrorCondition) -> String {
    serde_amqp::from_slice::<Symbol>(&serde_amqp::to_vec(c).unwrap()).unwrap().0
}

fn amqp_port(s: &Server) -> u16 {
    s.info.amqp_endpoint.as_deref().unwrap().rsplit_once(':').unwrap().1.parse().unwrap()
}

/// TLS to the AMQP port, with a client certificate when `identity` (cert, key PEM files) is given.
async fn tls(s: &Server, identity: Option<(&std::path::Path, &std::path::Path)>) -> Tls {
    crate::common::tls_connect(s, amqp_port(s), identity).await
}

fn sas(s: &Server, id: &str, key: &str) -> String {
    provisio_core::sas::build_token(
        &format!("{}/registrations/{id}", s.info.id_scope),
        key,
        now() + 600,
        Some("registration"),
        provisio_core::sas::SrEncoding::Lower,
    )
    .unwrap()
}

async fn open_sas(
    s: &Server,
    id: &str,
    token: &str,
) -> Result<ConnectionHandle<()>, fe2o3_amqp::connection::OpenError> {
    Connection::builder()
        .container_id("test-device")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: format!("{}/registrations/{id}", s.info.id_scope),
            password: token.to_owned(),
        })
        .open_with_stream(tls(s, None).await)
        .await
}

fn request(op: &str, operation_id: Option<&str>, correlation: &str, body: Body<Value>) -> Message<Body<Value>> {
    let mut ap = ApplicationProperties::builder().insert("iotdps-operation-type", SimpleValue::String(op.into()));
    if let Some(o) = operation_id {
        ap = ap.insert("iotdps-operation-id", SimpleValue::String(o.into()));
    }
    if op == "iotdps-register" {
        ap = ap.insert("iotdps-forceRegistration", SimpleValue::Bool(false));
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id: Some(MessageId::String(correlation.into())),
            ..Properties::default()
        }),
        application_properties: Some(ap.build()),
        body,
        footer: None,
    }
}

fn data(json: &str) -> Body<Value> {
    Body::Data(fe2o3_amqp::types::messaging::Batch::new(vec![fe2o3_amqp::types::messaging::Data(Binary::from(
        json.as_bytes().to_vec(),
    ))]))
}

/// One device on fe2o3's client: a session and both links on `addr`.
struct Device {
    conn: ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    tx: Sender,
    rx: Receiver,
}

impl Device {
    /// Both links on `addr`, with the api-version the SDKs send as a link property.
    async fn attach(conn: ConnectionHandle<()>, addr: &str) -> Self {
        Self::attach_with(conn, addr, Some("2019-03-31")).await
    }

    /// Both links on `addr`, with `api_version` as the link property (or none).
    async fn attach_with(mut conn: ConnectionHandle<()>, addr: &str, api_version: Option<&str>) -> Self {
        let properties = || {
            let mut f = fe2o3_amqp::types::definitions::Fields::default();
            if let Some(v) = api_version {
                f.insert(Symbol::from("com.microsoft:api-version"), Value::String(v.into()));
            }
            f
        };
        let mut session = Session::begin(&mut conn).await.unwrap();
        let rx =
            Receiver::builder().name("recv").source(addr).properties(properties()).attach(&mut session).await.unwrap();
        let tx =
            Sender::builder().name("send").target(addr).properties(properties()).attach(&mut session).await.unwrap();
        Self { conn, session, tx, rx }
    }

    /// Sends a request; returns the outcome and, when accepted, the reply.
    async fn ask(&mut self, m: Message<Body<Value>>) -> (Outcome, Option<Message<Body<Value>>>) {
        let outcome = tokio::time::timeout(Duration::from_secs(10), self.tx.send(m)).await.unwrap().unwrap();
        if !matches!(outcome, Outcome::Accepted(_)) {
            return (outcome, None);
        }
        let d = tokio::time::timeout(Duration::from_secs(10), self.rx.recv::<Body<Value>>()).await.unwrap().unwrap();
        self.rx.accept(&d).await.unwrap();
        (outcome, Some(d.into_message()))
    }

    async fn close(mut self) {
        let _ = self.tx.close().await;
        let _ = self.rx.close().await;
        let _ = self.session.end().await;
        let _ = self.conn.close().await;
    }
}

fn reply_json(m: &Message<Body<Value>>) -> Json {
    match &m.body {
        Body::Data(b) => {
            serde_json::from_slice(&b.iter().flat_map(|d| d.0.iter().copied()).collect::<Vec<_>>()).unwrap()
        }
        other => panic!("reply body is not a data section: {other:?}"),
    }
}

fn app_prop<'a>(m: &'a Message<Body<Value>>, k: &str) -> Option<&'a SimpleValue> {
    m.application_properties.as_ref()?.0.get(k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fe2o3_client_register_poll_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &["--retry-after-secs", "3"]);
    let mut keys = std::collections::HashMap::new();
    for id in ["aq-a", "aq-b", "aq-c"] {
        let e =
            put_enrollment(&s, false, id, json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})).await;
        keys.insert(id, e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned());
    }
    let scope = s.info.id_scope.clone();

    // Register (data body, full amqps:// address form) and poll (amqp-value body).
    let conn = open_sas(&s, "aq-a", &sas(&s, "aq-a", &keys["aq-a"])).await.unwrap();
    let mut a = Device::attach(conn, &format!("amqps://localhost/{scope}/registrations/aq-a")).await;
    let (o, reply) = a.ask(request("iotdps-register", None, "corr-1", data(r#"{"registrationId":"aq-a"}"#))).await;
    assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    let reply = reply.unwrap();
    assert_eq!(reply.properties.as_ref().unwrap().correlation_id, Some(MessageId::String("corr-1".into())));
    assert_eq!(app_prop(&reply, "iotdps-status"), Some(&SimpleValue::Int(202)));
    assert_eq!(app_prop(&reply, "retry-after"), Some(&SimpleValue::String("3".into())));
    let v = reply_json(&reply);
    assert_eq!(v["status"], "assigning", "{v}");
    let op_a = v["operationId"].as_str().unwrap().to_owned();
    let (_, reply) = a
        .ask(request(
            "iotdps-get-operationstatus",
            Some(&op_a),
            "corr-2",
            Body::Value(fe2o3_amqp::types::messaging::AmqpValue(Value::String(String::new()))),
        ))
        .await;
    let reply = reply.unwrap();
    assert_eq!(app_prop(&reply, "iotdps-status"), Some(&SimpleValue::Int(200)));
    assert_eq!(app_prop(&reply, "retry-after"), None);
    let v = reply_json(&reply);
    assert_eq!(v["status"], "assigned", "{v}");
    assert_eq!(v["registrationState"]["registrationId"], "aq-a");
    // Malformed JSON and an unknown operation: Rejected with the DPS error body.
    let (o, _) = a.ask(request("iotdps-register", None, "corr-3", data("{"))).await;
    let Outcome::Rejected(r) = o else { panic!("{o:?}") };
    let e = r.error.unwrap();
    let body: Json = serde_json::from_str(e.description.as_deref().unwrap()).unwrap();
    assert_eq!(body["errorCode"], 400_001, "{body}");
    let (o, _) = a.ask(request("iotdps-get-operationstatus", Some("nope"), "corr-4", Body::Empty)).await;
    let Outcome::Rejected(r) = o else { panic!("{o:?}") };
    let e = r.error.unwrap();
    assert_eq!(cond(&e.condition), "amqp:not-found");
    a.close().await;

    // Device b polls device a's operation: not found, and b gets nothing stored.
    let conn = open_sas(&s, "aq-b", &sas(&s, "aq-b", &keys["aq-b"])).await.unwrap();
    let mut b = Device::attach(conn, &format!("{scope}/registrations/aq-b")).await;
    let (o, _) = b.ask(request("iotdps-get-operationstatus", Some(&op_a), "corr-5", Body::Empty)).await;
    let Outcome::Rejected(r) = o else { panic!("poll for another device's operation: {o:?}") };
    let body: Json = serde_json::from_str(r.error.unwrap().description.as_deref().unwrap()).unwrap();
    assert_eq!(body["errorCode"], 404_202, "{body}");
    b.close().await;
    assert_eq!(registration_status(&s, "aq-b").await, 404);

    // Device b attaches on device c's address: the connection is closed with an error.
    let mut conn = open_sas(&s, "aq-b", &sas(&s, "aq-b", &keys["aq-b"])).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let other = format!("{scope}/registrations/aq-c");
    let attached = tokio::time::timeout(Duration::from_secs(10), async {
        let rx = Receiver::attach(&mut session, "recv", other.as_str()).await;
        match rx {
            Ok(_) => Sender::attach(&mut session, "send", other.as_str()).await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap();
    assert!(attached.is_err(), "an attach to another device's address must be refused");
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.on_close()).await.unwrap();
    assert!(closed.is_err(), "the server closes with an error: {closed:?}");
    assert_eq!(registration_status(&s, "aq-c").await, 404);

    // A forged SAS token: SASL succeeds (the token is judged per request, as over MQTT),
    // the register is rejected with 401002 and nothing is stored.
    let conn = open_sas(&s, "aq-c", &sas(&s, "aq-c", &provisio_core::keys::generate_key())).await.unwrap();
    let mut c = Device::attach(conn, &format!("{scope}/registrations/aq-c")).await;
    let (o, _) = c.ask(request("iotdps-register", None, "corr-6", data("{}"))).await;
    let Outcome::Rejected(r) = o else { panic!("{o:?}") };
    let e = r.error.unwrap();
    assert_eq!(cond(&e.condition), "amqp:unauthorized-access");
    let body: Json = serde_json::from_str(e.description.as_deref().unwrap()).unwrap();
    assert_eq!(body["errorCode"], 401_002, "{body}");
    c.close().await;
    assert_eq!(registration_status(&s, "aq-c").await, 404);

    // A SASL username that is not a device address: SASL outcome auth.
    let r = open_sas(&s, "x", "SharedAccessSignature sr=a&sig=b&se=1").await;
    assert!(r.is_ok(), "a well-formed username is accepted at SASL level: {r:?}");
    let r = Connection::builder()
        .container_id("t")
        .sasl_profile(SaslProfile::Plain { username: "guest".into(), password: "guest".into() })
        .open_with_stream(tls(&s, None).await)
        .await;
    assert!(r.is_err(), "a username that names no device is refused at SASL");
    // No SASL and no client certificate: the connection is closed with an error.
    let mut conn = Connection::builder().container_id("t").open_with_stream(tls(&s, None).await).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.on_close()).await.unwrap();
    assert!(closed.is_err(), "{closed:?}");

    let r = s.client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Raw frames over TLS.
struct Raw {
    io: Tls,
}

impl Raw {
    fn frame(kind: u8, channel: u16, body: &[u8]) -> Vec<u8> {
        let mut f = u32::try_from(8 + body.len()).unwrap().to_be_bytes().to_vec();
        f.extend([2, kind]);
        f.extend(channel.to_be_bytes());
        f.extend(body);
        f
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    async fn header(&mut self) -> [u8; 8] {
        let mut h = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(10), self.io.read_exact(&mut h)).await.unwrap().unwrap();
        h
    }

    /// The next frame's body, or None at the end of the stream.
    async fn read_frame(&mut self) -> Option<Vec<u8>> {
        let mut size = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(10), self.io.read_exact(&mut size)).await.expect("server silent")
        {
            Ok(_) => {}
            Err(_) => return None,
        }
        let size = u32::from_be_bytes(size) as usize;
        let mut rest = vec![0u8; size - 4];
        self.io.read_exact(&mut rest).await.ok()?;
        let doff = usize::from(rest[0]) * 4;
        Some(rest[doff - 4..].to_vec())
    }

    /// SASL PLAIN up to the AMQP header exchange.
    async fn sasl_plain(s: &Server, id: &str, token: &str) -> Self {
        let mut r = Self { io: tls(s, None).await };
        r.send(b"AMQP\x03\x01\x00\x00").await;
        assert_eq!(&r.header().await, b"AMQP\x03\x01\x00\x00");
        r.read_frame().await.unwrap(); // mechanisms
        let mut resp = vec![0u8];
        resp.extend(format!("{}/registrations/{id}", s.info.id_scope).as_bytes());
        resp.push(0);
        resp.extend(token.as_bytes());
        let init =
            SaslInit { mechanism: Symbol::from("PLAIN"), initial_response: Some(Binary::from(resp)), hostname: None };
        r.send(&Self::frame(1, 0, &serde_amqp::to_vec(&init).unwrap())).await;
        let outcome: SaslOutcome = serde_amqp::from_slice(&r.read_frame().await.unwrap()).unwrap();
        assert_eq!(outcome.code, SaslCode::Ok);
        r.send(b"AMQP\x00\x01\x00\x00").await;
        assert_eq!(&r.header().await, b"AMQP\x00\x01\x00\x00");
        r
    }

    async fn open_and_begin(&mut self) {
        let open = Open {
            container_id: "raw".into(),
            hostname: Some("localhost".into()),
            max_frame_size: Default::default(),
            channel_max: Default::default(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 2048,
            outgoing_window: 2048,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(&Self::frame(0, 0, &serde_amqp::to_vec(&Performative::Open(open)).unwrap())).await;
        self.send(&Self::frame(0, 0, &serde_amqp::to_vec(&Performative::Begin(begin)).unwrap())).await;
    }

    /// The performatives the server sends within `d` (stops early at the end of the stream).
    async fn frames_for(&mut self, d: Duration) -> Vec<Performative> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let mut size = [0u8; 4];
            match tokio::time::timeout_at(deadline, self.io.read_exact(&mut size)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return seen,
            }
            let mut rest = vec![0u8; u32::from_be_bytes(size) as usize - 4];
            if self.io.read_exact(&mut rest).await.is_err() {
                return seen;
            }
            let body = &rest[usize::from(rest[0]) * 4 - 4..];
            if let Ok(p) = serde_amqp::from_slice::<Performative>(body) {
                seen.push(p);
            }
        }
    }

    /// Reads until the server ends the session or closes the connection; returns the
    /// error condition it gave (or "eof").
    async fn refusal(&mut self) -> String {
        loop {
            let Some(body) = self.read_frame().await else { return "eof".into() };
            if body.is_empty() {
                continue; // heartbeat
            }
            match serde_amqp::from_slice::<Performative>(&body) {
                Ok(Performative::Close(c)) => return c.error.map_or("close".into(), |e| cond(&e.condition)),
                Ok(Performative::End(e)) => return e.error.map_or("end".into(), |e| cond(&e.condition)),
                Ok(Performative::Detach(d)) if d.error.is_some() => {
                    return d.error.map(|e| cond(&e.condition)).unwrap_or_default();
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_are_refused_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let e = put_enrollment(
        &s,
        false,
        "aq-raw",
        json!({"registrationId": "aq-raw", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let token = sas(&s, "aq-raw", &key);

    // A transfer before any attach: the connection ends.
    let mut r = Raw::sasl_plain(&s, "aq-raw", &token).await;
    r.open_and_begin().await;
    let transfer = Transfer {
        handle: Handle(0),
        delivery_id: Some(0),
        delivery_tag: Some(DeliveryTag::from(vec![1u8])),
        message_format: Some(0),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    let mut f = serde_amqp::to_vec(&Performative::Transfer(transfer)).unwrap();
    // An application-properties section naming the register operation, then a data section.
    f.extend(
        serde_amqp::to_vec(
            &ApplicationProperties::builder()
                .insert("iotdps-operation-type", SimpleValue::String("iotdps-register".into()))
                .build(),
        )
        .unwrap(),
    );
    f.extend([0x00, 0x53, 0x75, 0xa0, 0x02, b'{', b'}']);
    r.send(&Raw::frame(0, 0, &f)).await;
    // The server ends the connection (`read_frame` panics if it stays silent): the transfer
    // is neither served nor settled, and nothing is stored.
    let mut seen = Vec::new();
    while let Some(body) = r.read_frame().await {
        if body.is_empty() {
            continue; // heartbeat
        }
        match serde_amqp::from_slice::<Performative>(&body) {
            Ok(Performative::Close(_)) => break,
            Ok(p) => seen.push(p),
            Err(_) => {}
        }
    }
    assert!(
        !seen.iter().any(|p| matches!(p, Performative::Disposition(_) | Performative::Transfer(_))),
        "a transfer before attach was served: {seen:?}"
    );
    crate::common::logged(&s, "a transfer on a handle that no attach opened").await;
    assert_eq!(registration_status(&s, "aq-raw").await, 404, "transfer before attach stored something");

    // Malformed frames: a performative that is not AMQP, then an absurd frame size. The
    // server ends the connection (`refusal` panics if it stays silent); fe2o3-amqp sends a
    // plain Close or just hangs up, without an error condition.
    let mut r = Raw::sasl_plain(&s, "aq-raw", &token).await;
    r.open_and_begin().await;
    r.send(&Raw::frame(0, 0, &[0x00, 0x53, 0x99, 0x45, 0xff, 0xff])).await;
    let why = r.refusal().await;
    assert!(["close", "eof"].contains(&why.as_str()) || why.starts_with("amqp:"), "{why}");
    assert_eq!(r.frames_for(Duration::from_secs(1)).await.len(), 0, "nothing after the close");
    let mut r = Raw::sasl_plain(&s, "aq-raw", &token).await;
    r.send(&[0xff, 0xff, 0xff, 0xf0, 2, 0, 0, 0]).await;
    let why = r.refusal().await;
    assert!(["close", "eof"].contains(&why.as_str()) || why.starts_with("amqp:"), "{why}");
    // Garbage instead of a protocol header: the server answers with its header and hangs up.
    let mut r = Raw { io: tls(&s, None).await };
    r.send(b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(&r.header().await, b"AMQP\x03\x01\x00\x00");
    assert_eq!(r.read_frame().await, None);

    // SASL TPM is refused with a SASL auth outcome (not supported over AMQP yet).
    let mut r = Raw { io: tls(&s, None).await };
    r.send(b"AMQP\x03\x01\x00\x00").await;
    r.header().await;
    r.read_frame().await.unwrap();
    let init = SaslInit {
        mechanism: Symbol::from("TPM"),
        initial_response: Some(Binary::from(vec![0u8, 1, 2])),
        hostname: None,
    };
    r.send(&Raw::frame(1, 0, &serde_amqp::to_vec(&init).unwrap())).await;
    let outcome: SaslOutcome = serde_amqp::from_slice(&r.read_frame().await.unwrap()).unwrap();
    assert_eq!(outcome.code, SaslCode::Auth);

    assert_eq!(registration_status(&s, "aq-raw").await, 404);
    // The server is unharmed: the device still registers.
    let conn = open_sas(&s, "aq-raw", &token).await.unwrap();
    let mut d = Device::attach(conn, &format!("{}/registrations/aq-raw", s.info.id_scope)).await;
    let (o, reply) = d.ask(request("iotdps-register", None, "ok", data("{}"))).await;
    assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    assert_eq!(reply_json(&reply.unwrap())["status"], "assigning");
    d.close().await;
    assert_eq!(registration_status(&s, "aq-raw").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_link_limits_and_off() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let e = put_enrollment(
        &s,
        false,
        "aq-lim",
        json!({"registrationId": "aq-lim", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let token = sas(&s, "aq-lim", e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap());

    // Five sessions (the default limit is 4, announced as channel-max 3): fe2o3-amqp's
    // engine closes the connection (with `amqp:not-implemented`).
    let mut r = Raw::sasl_plain(&s, "aq-lim", &token).await;
    r.open_and_begin().await;
    for channel in 1..5u16 {
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 2048,
            outgoing_window: 2048,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        r.send(&Raw::frame(0, channel, &serde_amqp::to_vec(&Performative::Begin(begin)).unwrap())).await;
    }
    let why = r.refusal().await;
    assert!(why.starts_with("amqp:") || why == "eof", "a fifth session must be refused: {why}");
    drop(r);

    // Nine links (the default limit is 8): the server closes the connection with
    // `amqp:resource-limit-exceeded`.
    let mut conn = open_sas(&s, "aq-lim", &token).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let addr = format!("{}/registrations/aq-lim", s.info.id_scope);
    let mut links = Vec::new();
    let mut refused = false;
    for i in 0..9 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            Receiver::attach(&mut session, format!("r{i}"), addr.as_str()),
        )
        .await
        {
            Ok(Ok(l)) => links.push(l),
            Ok(Err(_)) | Err(_) => {
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "nine links on one connection were all attached");
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.on_close()).await.unwrap();
    assert!(closed.is_err(), "the server closes the connection with an error: {closed:?}");
    drop(links);
    assert_eq!(registration_status(&s, "aq-lim").await, 404);

    // `--amqp-listen off`: no AMQP endpoint.
    let off = Server::start(&tmp.path().join("off"), "127.0.0.1:0", &["--amqp-listen", "off"]);
    assert_eq!(off.info.amqp_endpoint, None);
    assert!(s.info.amqp_endpoint.is_some());
}
