//! The DPS MQTT session, sans I/O: `(state, packet) -> events`. The I/O loop feeds it
//! decoded packets and carries out what it returns, so every rule here is testable with
//! byte vectors and without a socket.
//!
//! Rules (`spec/device-api.md` §4): CONNECT first, with client id = registration id and
//! username `{idScope}/registrations/{registrationId}/api-version=…[&ClientVersion=…]`;
//! CONNACK always has SessionPresent = 0 (every session is clean, whatever the flag);
//! credentials are judged per request and refusals answered on the response topic, as DPS
//! does; only `$dps/registrations/res/#` can be subscribed (granted QoS ≤ 1); a QoS 1
//! request is PUBACKed before its answer is published; answers published before the
//! device subscribed wait for its SUBSCRIBE.

use bytes::Bytes;
use percent_encoding::percent_decode_str;
use rumqttc::mqttbytes::{
    QoS,
    v4::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck},
};

/// The one topic filter devices subscribe to.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
const REGISTER_TOPIC: &str = "$dps/registrations/PUT/iotdps-register/";
const POLL_TOPIC: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";
/// Most answers kept for a device that has not subscribed yet.
const MAX_PENDING: usize = 16;

/// Who the device says it is, from CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// ID scope from the username.
    pub scope: String,
    /// Registration id (= client id).
    pub registration_id: String,
    /// `api-version` from the username, if any.
    pub api_version: Option<String>,
    /// The SAS token, if a password was sent.
    pub password: Option<String>,
    /// Keep-alive in seconds (0: none).
    pub keep_alive: u16,
}

/// What a device asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `iotdps-register`, with the JSON body.
    Register(Bytes),
    /// `iotdps-get-operationstatus`.
    Poll {
        /// The operation id (empty when missing).
        operation_id: String,
    },
    /// A topic DPS does not serve.
    Unknown(String),
}

/// One request, to be answered with [`Session::respond`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The `$rid` to echo.
    pub rid: String,
    /// What is asked.
    pub kind: RequestKind,
}

/// What the I/O loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write this packet.
    Send(Packet),
    /// Serve this request, then call [`Session::respond`].
    Request(Request),
    /// Close the connection (after writing what came before).
    Close(String),
}

/// The state of one connection.
#[derive(Debug, Default)]
pub struct Session {
    identity: Option<Identity>,
    subscribed: bool,
    pending: Vec<Packet>,
    next_pkid: u16,
}

/// Parses `{scope}/registrations/{id}/api-version=…&ClientVersion=…`.
#[must_use]
pub fn parse_username(username: &str) -> Option<(String, String, Option<String>)> {
    let (scope, rest) = username.split_once("/registrations/")?;
    let (id, params) = match rest.rsplit_once('/') {
        Some((id, params)) => (id, params),
        None => (rest, ""),
    };
    if scope.is_empty() || id.is_empty() || scope.contains('/') {
        return None;
    }
    let api_version = params.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "api-version").then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    });
    Some((scope.to_owned(), id.to_owned(), api_version))
}

/// Parses the query of a request topic (`?$rid=…&operationId=…`).
fn query(topic_rest: &str) -> Vec<(String, String)> {
    let q = topic_rest.strip_prefix('?').unwrap_or(topic_rest);
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode_str(v).decode_utf8_lossy().into_owned()))
        .collect()
}

impl Session {
    /// A session waiting for CONNECT.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The device's identity, once connected.
    #[must_use]
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    fn refuse(code: ConnectReturnCode, why: &str) -> Vec<Event> {
        vec![Event::Send(Packet::ConnAck(ConnAck::new(code, false))), Event::Close(why.to_owned())]
    }

    /// Handles one packet from the device.
    pub fn handle(&mut self, packet: Packet) -> Vec<Event> {
        match (packet, self.identity.is_some()) {
            (Packet::Connect(c), false) => {
                let Some(login) = c.login else {
                    return Self::refuse(ConnectReturnCode::BadUserNamePassword, "CONNECT without a username");
                };
                let Some((scope, id, api_version)) = parse_username(&login.username) else {
                    return Self::refuse(
                        ConnectReturnCode::BadUserNamePassword,
                        "username is not {idScope}/registrations/{registrationId}/api-version=…",
                    );
                };
                if !c.client_id.eq_ignore_ascii_case(&id) {
                    return Self::refuse(
                        ConnectReturnCode::BadClientId,
                        "client id is not the username's registration id",
                    );
                }
                self.identity = Some(Identity {
                    scope,
                    registration_id: c.client_id,
                    api_version,
                    password: Some(login.password).filter(|p| !p.is_empty()),
                    keep_alive: c.keep_alive,
                });
                // Every session is clean (Python asks for CleanSession = 0; C# needs SP = 0).
                vec![Event::Send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)))]
            }
            (Packet::Connect(_), true) => vec![Event::Close("second CONNECT".into())],
            (_, false) => vec![Event::Close("the first packet must be CONNECT".into())],
            (Packet::Publish(p), true) => self.publish(p),
            (Packet::Subscribe(s), true) => {
                let codes: Vec<SubscribeReasonCode> = s
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path == RESPONSE_FILTER {
                            SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            })
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                let ok = codes.iter().any(|c| matches!(c, SubscribeReasonCode::Success(_)));
                let mut out = vec![Event::Send(Packet::SubAck(SubAck::new(s.pkid, codes)))];
                if ok {
                    self.subscribed = true;
                    out.extend(self.pending.drain(..).map(Event::Send));
                }
                out
            }
            (Packet::Unsubscribe(u), true) => {
                if u.topics.iter().any(|t| t == RESPONSE_FILTER) {
                    self.subscribed = false;
                }
                vec![Event::Send(Packet::UnsubAck(UnsubAck::new(u.pkid)))]
            }
            (Packet::PingReq, true) => vec![Event::Send(Packet::PingResp)],
            (Packet::Disconnect, true) => vec![Event::Close("device disconnected".into())],
            // Acknowledgements of our QoS 1 answers.
            (Packet::PubAck(_), true) => Vec::new(),
            (other, true) => vec![Event::Close(format!("unexpected packet {:?}", packet_name(&other)))],
        }
    }

    fn publish(&mut self, p: Publish) -> Vec<Event> {
        if p.qos == QoS::ExactlyOnce {
            return vec![Event::Close("QoS 2 is not supported by DPS".into())];
        }
        let mut out = Vec::new();
        // PUBACK before the answer: C# rejects an answer that arrives before it.
        if p.qos == QoS::AtLeastOnce {
            out.push(Event::Send(Packet::PubAck(PubAck::new(p.pkid))));
        }
        let (base, rest) = match p.topic.find('?') {
            Some(i) => p.topic.split_at(i),
            None => (p.topic.as_str(), ""),
        };
        let params = query(rest);
        let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
        let Some(rid) = get("$rid") else {
            // Nothing to answer to: DPS cannot route a reply without $rid.
            return out;
        };
        let kind = match base {
            REGISTER_TOPIC => RequestKind::Register(p.payload),
            POLL_TOPIC => RequestKind::Poll { operation_id: get("operationId").unwrap_or_default() },
            other => RequestKind::Unknown(other.to_owned()),
        };
        out.push(Event::Request(Request { rid, kind }));
        out
    }

    /// The answer to a request: published now (QoS 1), or kept until the device subscribes.
    /// `retry_after`, when the engine gave one, goes into the topic as `&retry-after=` (which
    /// answers get one is the engine's rule, not the framing's).
    pub fn respond(&mut self, rid: &str, status: u16, retry_after: Option<u32>, body: Vec<u8>) -> Vec<Event> {
        let mut topic = format!("$dps/registrations/res/{status}/?$rid={rid}");
        if let Some(s) = retry_after {
            topic.push_str(&format!("&retry-after={s}"));
        }
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, body);
        publish.pkid = self.next_pkid;
        let packet = Packet::Publish(publish);
        if self.subscribed {
            vec![Event::Send(packet)]
        } else if self.pending.len() < MAX_PENDING {
            self.pending.push(packet);
            Vec::new()
        } else {
            vec![Event::Close("too many answers waiting for a SUBSCRIBE".into())]
        }
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::Error as MqttError;

    use super::*;

    const MAX: usize = 128 * 1024;

    /// A CONNECT written byte by byte (MQTT 3.1.1 §3.1).
    fn connect_bytes(
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
        clean: bool,
        keep_alive: u16,
    ) -> Vec<u8> {
        let mut var = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04];
        let mut flags = 0u8;
        if clean {
            flags |= 0x02;
        }
        if username.is_some() {
            flags |= 0x80;
        }
        if password.is_some() {
            flags |= 0x40;
        }
        var.push(flags);
        var.extend(keep_alive.to_be_bytes());
        let mut field = |s: &str| {
            var.extend(u16::try_from(s.len()).unwrap().to_be_bytes());
            var.extend(s.as_bytes());
        };
        field(client_id);
        if let Some(u) = username {
            field(u);
        }
        if let Some(p) = password {
            field(p);
        }
        let mut out = vec![0x10];
        let mut len = var.len();
        loop {
            let mut b = u8::try_from(len % 128).unwrap();
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            out.push(b);
            if len == 0 {
                break;
            }
        }
        out.extend(var);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Packet, MqttError> {
        Packet::read(&mut BytesMut::from(bytes), MAX)
    }

    fn encode(events: &[Event]) -> Vec<Vec<u8>> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Send(p) => {
                    let mut b = BytesMut::new();
                    p.write(&mut b, MAX).unwrap();
                    Some(b.to_vec())
                }
                _ => None,
            })
            .collect()
    }

    const USER: &str =
        "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device%2F1.9.1";

    fn connected(password: Option<&str>) -> Session {
        let mut s = Session::new();
        let ev = s.handle(decode(&connect_bytes("dev-1", Some(USER), password, true, 180)).unwrap());
        assert_eq!(encode(&ev), vec![vec![0x20, 0x02, 0x00, 0x00]]);
        s
    }

    fn publish_bytes(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut var = Vec::new();
        var.extend(u16::try_from(topic.len()).unwrap().to_be_bytes());
        var.extend(topic.as_bytes());
        if qos > 0 {
            var.extend(pkid.to_be_bytes());
        }
        var.extend(payload);
        let mut out = vec![0x30 | (qos << 1), u8::try_from(var.len()).unwrap()];
        out.extend(var);
        out
    }

    fn subscribe_bytes(filter: &str, qos: u8, pkid: u16) -> Vec<u8> {
        let mut var = pkid.to_be_bytes().to_vec();
        var.extend(u16::try_from(filter.len()).unwrap().to_be_bytes());
        var.extend(filter.as_bytes());
        var.push(qos);
        let mut out = vec![0x82, u8::try_from(var.len()).unwrap()];
        out.extend(var);
        out
    }

    #[test]
    fn connect_variants() {
        // Clean session 1 and 0 both get SessionPresent = 0; SAS password and no password.
        for (clean, password) in [(true, Some("SharedAccessSignature sr=x&sig=y&se=1")), (false, None)] {
            let mut s = Session::new();
            let ev = s.handle(decode(&connect_bytes("dev-1", Some(USER), password, clean, 60)).unwrap());
            assert_eq!(encode(&ev), vec![vec![0x20, 0x02, 0x00, 0x00]]);
            let id = s.identity().unwrap();
            assert_eq!((id.scope.as_str(), id.registration_id.as_str()), ("0ne00000A0A", "dev-1"));
            assert_eq!(id.api_version.as_deref(), Some("2019-03-31"));
            assert_eq!(id.password.as_deref(), password);
            assert_eq!(id.keep_alive, 60);
        }
        // The raw-MQTT doc's username without ClientVersion.
        assert_eq!(
            parse_username("0ne1/registrations/d/api-version=2019-03-31"),
            Some(("0ne1".into(), "d".into(), Some("2019-03-31".into())))
        );
        // No username: refused with 4 (bad user name or password), then closed.
        let ev = Session::new().handle(decode(&connect_bytes("dev-1", None, None, true, 60)).unwrap());
        assert_eq!(encode(&ev), vec![vec![0x20, 0x02, 0x00, 0x04]]);
        assert!(matches!(ev.last(), Some(Event::Close(_))));
        // A username that is not a DPS one.
        let ev = Session::new().handle(decode(&connect_bytes("dev-1", Some("admin"), Some("pw"), true, 60)).unwrap());
        assert_eq!(encode(&ev), vec![vec![0x20, 0x02, 0x00, 0x04]]);
        // Client id ≠ registration id: 2 (identifier rejected).
        let ev = Session::new().handle(decode(&connect_bytes("other", Some(USER), None, true, 60)).unwrap());
        assert_eq!(encode(&ev), vec![vec![0x20, 0x02, 0x00, 0x02]]);
        // MQTT 3.1 (protocol name MQIsdp, level 3) does not even decode.
        let mut v31 = connect_bytes("dev-1", Some(USER), None, true, 60);
        v31[8] = 3;
        assert!(decode(&v31).is_err());
    }

    #[test]
    fn packets_before_connect_and_second_connect_close() {
        let ev = Session::new().handle(decode(&[0xC0, 0x00]).unwrap());
        assert!(matches!(ev.as_slice(), [Event::Close(_)]));
        let mut s = connected(None);
        let ev = s.handle(decode(&connect_bytes("dev-1", Some(USER), None, true, 60)).unwrap());
        assert!(matches!(ev.as_slice(), [Event::Close(_)]));
    }

    #[test]
    fn qos1_register_is_pubacked_before_the_request() {
        let mut s = connected(Some("sas"));
        let ev = s.handle(decode(&subscribe_bytes(RESPONSE_FILTER, 1, 7)).unwrap());
        assert_eq!(encode(&ev), vec![vec![0x90, 0x03, 0x00, 0x07, 0x01]]);
        let body = br#"{"registrationId":"dev-1"}"#;
        let ev =
            s.handle(decode(&publish_bytes("$dps/registrations/PUT/iotdps-register/?$rid=42", 1, 9, body)).unwrap());
        assert_eq!(encode(&ev[..1]), vec![vec![0x40, 0x02, 0x00, 0x09]]);
        assert_eq!(
            ev[1],
            Event::Request(Request { rid: "42".into(), kind: RequestKind::Register(Bytes::from_static(body)) })
        );
        // The answer: QoS 1, topic with retry-after for 202.
        let ev = s.respond("42", 202, Some(3), b"{}".to_vec());
        let Event::Send(Packet::Publish(p)) = &ev[0] else { panic!("{ev:?}") };
        assert_eq!(p.topic, "$dps/registrations/res/202/?$rid=42&retry-after=3");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        // Answers without a hint carry only $rid.
        let ev = s.respond("43", 200, None, b"{}".to_vec());
        let Event::Send(Packet::Publish(p)) = &ev[0] else { panic!() };
        assert_eq!(p.topic, "$dps/registrations/res/200/?$rid=43");
        let ev = s.respond("44", 401, None, b"{}".to_vec());
        let Event::Send(Packet::Publish(p2)) = &ev[0] else { panic!() };
        assert_eq!(p2.topic, "$dps/registrations/res/401/?$rid=44");
        assert_ne!(p.pkid, p2.pkid);
        let ev = s.respond("45", 503, Some(5), b"{}".to_vec());
        let Event::Send(Packet::Publish(p)) = &ev[0] else { panic!() };
        assert_eq!(p.topic, "$dps/registrations/res/503/?$rid=45&retry-after=5");
    }

    #[test]
    fn qos0_poll_and_uuid_rids() {
        let mut s = connected(None);
        let topic = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=5f1e2c1a-0000-4000-8000-000000000000&operationId=4.abc.def";
        let ev = s.handle(decode(&publish_bytes(topic, 0, 0, b" ")).unwrap());
        assert_eq!(
            ev,
            vec![Event::Request(Request {
                rid: "5f1e2c1a-0000-4000-8000-000000000000".into(),
                kind: RequestKind::Poll { operation_id: "4.abc.def".into() }
            })]
        );
    }

    #[test]
    fn unknown_topics_and_missing_rid() {
        let mut s = connected(None);
        let ev = s.handle(decode(&publish_bytes("$dps/registrations/POST/whatever/?$rid=1", 1, 3, b"{}")).unwrap());
        assert_eq!(encode(&ev[..1]), vec![vec![0x40, 0x02, 0x00, 0x03]]);
        assert!(matches!(&ev[1], Event::Request(Request { kind: RequestKind::Unknown(_), .. })));
        let ev = s.handle(decode(&publish_bytes("devices/x/messages", 1, 4, b"{}")).unwrap());
        assert_eq!(encode(&ev), vec![vec![0x40, 0x02, 0x00, 0x04]]);
        assert_eq!(ev.len(), 1, "no request without $rid");
        // QoS 2 is refused by closing.
        let mut b = publish_bytes("$dps/registrations/PUT/iotdps-register/?$rid=1", 1, 5, b"{}");
        b[0] = 0x34;
        let ev = s.handle(decode(&b).unwrap());
        assert!(matches!(ev.as_slice(), [Event::Close(_)]));
    }

    #[test]
    fn subscribe_rules_and_publish_before_subscribe() {
        let mut s = connected(None);
        // A request before SUBSCRIBE: the answer waits.
        s.handle(decode(&publish_bytes("$dps/registrations/PUT/iotdps-register/?$rid=1", 1, 1, b"{}")).unwrap());
        assert!(s.respond("1", 202, Some(2), b"{\"status\":\"assigning\"}".to_vec()).is_empty());
        // Other filters are refused (0x80); QoS 2 is granted as 1; then the answer flows.
        let mut both = vec![0x82, 0x00];
        let mut var = 8u16.to_be_bytes().to_vec();
        for (f, q) in [("devices/#", 1u8), (RESPONSE_FILTER, 2)] {
            var.extend(u16::try_from(f.len()).unwrap().to_be_bytes());
            var.extend(f.as_bytes());
            var.push(q);
        }
        both[1] = u8::try_from(var.len()).unwrap();
        both.extend(var);
        let ev = s.handle(decode(&both).unwrap());
        let out = encode(&ev);
        assert_eq!(out[0], vec![0x90, 0x04, 0x00, 0x08, 0x80, 0x01]);
        let Event::Send(Packet::Publish(p)) = &ev[1] else { panic!("{ev:?}") };
        assert_eq!(p.topic, "$dps/registrations/res/202/?$rid=1&retry-after=2");
        // Ping, unsubscribe, disconnect.
        assert_eq!(encode(&s.handle(decode(&[0xC0, 0x00]).unwrap())), vec![vec![0xD0, 0x00]]);
        let mut unsub = vec![0xA2, 0x00, 0x00, 0x09];
        unsub.extend(u16::try_from(RESPONSE_FILTER.len()).unwrap().to_be_bytes());
        unsub.extend(RESPONSE_FILTER.as_bytes());
        unsub[1] = u8::try_from(unsub.len() - 2).unwrap();
        assert_eq!(encode(&s.handle(decode(&unsub).unwrap())), vec![vec![0xB0, 0x02, 0x00, 0x09]]);
        assert!(matches!(s.handle(decode(&[0xE0, 0x00]).unwrap()).as_slice(), [Event::Close(_)]));
    }

    #[test]
    fn oversized_and_malformed_packets_do_not_decode() {
        // Remaining length over the limit.
        let big = publish_bytes("t", 0, 0, &[]);
        let mut huge = vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F];
        huge.extend(&big[2..]);
        assert!(matches!(decode(&huge), Err(MqttError::PayloadSizeLimitExceeded(_))));
        // Garbage: reserved packet type 0, a bad remaining length, a truncated CONNECT.
        assert!(decode(&[0x00, 0x00]).is_err());
        assert!(decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
        let c = connect_bytes("dev-1", Some(USER), None, true, 60);
        assert!(matches!(decode(&c[..c.len() - 3]), Err(MqttError::InsufficientBytes(_))));
        // A PUBLISH whose topic length points past the end.
        assert!(decode(&[0x30, 0x03, 0x00, 0x09, b'a']).is_err());
    }
}

/// Drives a session with arbitrary bytes, as the I/O loop would: decode every packet,
/// handle it, answer every request. Used by the fuzz target and its smoke test; it must
/// never panic.
pub fn drive_with_bytes(data: &[u8], max_packet: usize) {
    let mut buf = bytes::BytesMut::from(data);
    let mut s = Session::new();
    loop {
        match Packet::read(&mut buf, max_packet) {
            Ok(p) => {
                for ev in s.handle(p) {
                    match ev {
                        Event::Request(r) => {
                            let _ = s.respond(&r.rid, 202, Some(2), br#"{"status":"assigning"}"#.to_vec());
                        }
                        Event::Close(_) => return,
                        Event::Send(p) => {
                            let mut out = bytes::BytesMut::new();
                            let _ = p.write(&mut out, max_packet);
                        }
                    }
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod smoke {
    /// A quick, deterministic stand-in for the fuzz target: random and mutated packets.
    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seed: Vec<u8> = {
            let user = "0ne1/registrations/d/api-version=2019-03-31";
            let mut c = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 1, b'd'];
            c.extend(u16::try_from(user.len()).unwrap().to_be_bytes());
            c.extend(user.as_bytes());
            c.extend([0, 1, b'p']);
            c[1] = u8::try_from(c.len() - 2).unwrap();
            c.extend([0x82, 0x1d, 0, 1, 0, 0x18]);
            c.extend(b"$dps/registrations/res/#");
            c.push(1);
            c
        };
        for i in 0..20_000u32 {
            let mut data = seed.clone();
            let flips = (next() % 6) as usize;
            for _ in 0..flips {
                let n = data.len();
                let at = (next() as usize) % n;
                data[at] = next().to_le_bytes()[0];
            }
            if i % 3 == 0 {
                data.extend((0..(next() % 64)).map(|_| next().to_le_bytes()[0]));
            }
            super::drive_with_bytes(&data, 4096);
        }
    }
}
