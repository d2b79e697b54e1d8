//! The MQTT transport: a minimal MQTT 3.1.1 client for the DPS topics, on rumqttc's packet
//! codec and our own TLS (so the device certificate and CA handling match HTTPS), directly
//! or inside a WebSocket.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    QoS,
    v4::{Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{ClientError, Options, Progress};

const MAX_PACKET: usize = 256 * 1024;

struct Conn {
    io: Box<dyn crate::ws::Stream>,
    buf: BytesMut,
    next_pkid: u16,
}

impl Conn {
    async fn send(&mut self, p: Packet) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        p.write(&mut b, MAX_PACKET).map_err(|e| ClientError::Protocol(e.to_string()))?;
        // Flushed at once: a WebSocket sends its message only then.
        self.io.write_all(&b).await.map_err(|e| ClientError::Network(format!("MQTT write: {e}")))?;
        self.io.flush().await.map_err(|e| ClientError::Network(format!("MQTT write: {e}")))
    }

    async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(ClientError::Protocol(format!("MQTT: {e}"))),
            }
            let n = tokio::time::timeout(Duration::from_secs(60), self.io.read_buf(&mut self.buf))
                .await
                .map_err(|_| ClientError::Network("MQTT: the service said nothing for 60 s".into()))?
                .map_err(|e| ClientError::Network(format!("MQTT read: {e}")))?;
            if n == 0 {
                return Err(ClientError::Network("MQTT: the service closed the connection".into()));
            }
        }
    }

    /// Publishes `{topic}?$rid={rid}{suffix}` and waits for its answer:
    /// `(status, retry-after, body)`.
    async fn request(
        &mut self,
        topic: &str,
        suffix: &str,
        payload: Vec<u8>,
    ) -> Result<(u16, Option<u64>, bytes::Bytes), ClientError> {
        let rid = uuid::Uuid::new_v4().to_string();
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        let mut p = Publish::new(format!("{topic}?$rid={rid}{suffix}"), QoS::AtLeastOnce, payload);
        p.pkid = self.next_pkid;
        self.send(Packet::Publish(p)).await?;
        loop {
            match self.recv().await? {
                Packet::Publish(answer) => {
                    if answer.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(PubAck::new(answer.pkid))).await?;
                    }
                    // $dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]
                    let Some(rest) = answer.topic.strip_prefix("$dps/registrations/res/") else { continue };
                    let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
                    let params: Vec<(&str, &str)> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
                    if !params.iter().any(|(k, v)| *k == "$rid" && *v == rid) {
                        continue;
                    }
                    let status = status
                        .parse()
                        .map_err(|_| ClientError::Protocol(format!("bad answer topic {}", answer.topic)))?;
                    let retry = params.iter().find(|(k, _)| *k == "retry-after").and_then(|(_, v)| v.parse().ok());
                    return Ok((status, retry, answer.payload));
                }
                Packet::PubAck(_) | Packet::PingResp | Packet::SubAck(_) => {}
                other => return Err(ClientError::Protocol(format!("unexpected MQTT packet {other:?}"))),
            }
        }
    }
}

async fn connect(opts: &Options) -> Result<Conn, ClientError> {
    let io = crate::ws::open(opts, "mqtt").await?;
    let mut c = Conn { io, buf: BytesMut::new(), next_pkid: 0 };
    let mut connect = Connect::new(opts.registration_id.clone());
    connect.keep_alive = 60;
    let user = format!(
        "{}/registrations/{}/api-version={}&ClientVersion={}",
        opts.scope,
        opts.registration_id,
        opts.api_version(),
        percent_encoding::utf8_percent_encode(
            concat!("provisio-client/", env!("CARGO_PKG_VERSION")),
            provisio_core::sas::PY_QUOTE
        )
    );
    connect.login = Some(Login::new(user, opts.sas_token()?.unwrap_or_default()));
    c.send(Packet::Connect(connect)).await?;
    match c.recv().await? {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {}
        Packet::ConnAck(a) => {
            return Err(ClientError::Authentication {
                credential: opts.credential.describe(),
                status: 401,
                error_code: 401_000,
                tracking_id: "-".into(),
                message: format!("CONNACK refused the connection: {:?}", a.code),
            });
        }
        other => return Err(ClientError::Protocol(format!("expected CONNACK, got {other:?}"))),
    }
    c.send(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))).await?;
    Ok(c)
}

const REGISTER: &str = "$dps/registrations/PUT/iotdps-register/";
const POLL: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";

/// The MQTT connection and the register request's body.
struct Device {
    conn: Conn,
    body: Vec<u8>,
}

impl crate::Requests for Device {
    async fn request(&mut self, operation: Option<&str>) -> Result<crate::Answer, ClientError> {
        match operation {
            Some(id) => self.conn.request(POLL, &format!("&operationId={id}"), b" ".to_vec()).await,
            None => self.conn.request(REGISTER, "", self.body.clone()).await,
        }
    }
}

/// Registers, then polls, on one connection.
pub async fn register(opts: &Options, mut progress: impl FnMut(Progress)) -> Result<crate::Registration, ClientError> {
    progress(Progress::Registering);
    let mut device = Device { conn: connect(opts).await?, body: crate::registration_body(opts)? };
    let result = crate::register_and_poll(opts, &mut device, progress).await;
    let _ = device.conn.send(Packet::Disconnect).await;
    result
}
