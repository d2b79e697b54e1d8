//! The MQTT transport: the stock Node MQTT client, and a raw TLS client speaking bytes.

use std::{process::Command, time::Duration};

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    QoS,
    v4::{Connect, Login, Packet, PubAck, Publish, Subscribe},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Server, now, put_enrollment, repo_root};

fn node_mqtt(s: &Server, id: &str, env: &[(&str, &str)]) -> Value {
    let dir = repo_root().join("interop/node");
    let out = Command::new("node")
        .arg(dir.join("register.js"))
        .env("PROVISIO_HOST", s.info.mqtt_endpoint.as_deref().expect("MQTT listener"))
        .env("ID_SCOPE", &s.info.id_scope)
        .env("REGISTRATION_ID", id)
        .env("TRANSPORT", "mqtt")
        .envs(env.iter().copied())
        .env("NODE_EXTRA_CA_CERTS", s.ca_file())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("register.js: no JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_node_mqtt_client_symmetric_key_and_x509() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    for args in [vec!["root", "mq-root"], vec!["device", "mq-x509-dev", "--ca", "mq-root"]] {
        crate::common::run(
            Command::new(env!("CARGO_BIN_EXE_provisio")).arg("cert").args(&args).arg("--out-dir").arg(&dir),
        );
    }
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "mqtt-hub.example.net"]);

    // Individual symmetric key.
    let e = put_enrollment(
        &s,
        false,
        "mq-ind-1",
        json!({"registrationId": "mq-ind-1", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let r = node_mqtt(&s, "mq-ind-1", &[("SYMMETRIC_KEY", key), ("PAYLOAD", r#"{"fw":"1.2"}"#)]);
    assert_eq!(r["ok"], true, "{r}\n{}", s.log_text());
    assert_eq!(r["result"]["assignedHub"], "mqtt-hub.example.net");
    assert_eq!(r["result"]["status"], "assigned");
    // Group symmetric key.
    let gk = provisio_core::keys::generate_key();
    put_enrollment(&s, true, "mq-group", json!({"enrollmentGroupId": "mq-group", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": gk}}})).await;
    let dk = provisio_core::keys::derive_device_key(&gk, "mq-gdev-1").unwrap();
    let r = node_mqtt(&s, "mq-gdev-1", &[("SYMMETRIC_KEY", &dk)]);
    assert_eq!(r["result"]["symmetricKey"]["enrollmentGroupId"], "mq-group", "{r}");
    // X.509 group on an uploaded root.
    let root = std::fs::read_to_string(dir.join("mq-root_cert.pem")).unwrap();
    put_enrollment(&s, true, "mq-x509", json!({"enrollmentGroupId": "mq-x509", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root}}}}})).await;
    let (cert, k) = (dir.join("mq-x509-dev_fullchain.pem"), dir.join("mq-x509-dev_key.pem"));
    let r = node_mqtt(
        &s,
        "mq-x509-dev",
        &[("ATTESTATION", "x509"), ("CERT_FILE", cert.to_str().unwrap()), ("KEY_FILE", k.to_str().unwrap())],
    );
    assert_eq!(r["result"]["x509"]["enrollmentGroupId"], "mq-x509", "{r}");
    // A wrong key fails in the SDK (401 on the response topic).
    let r = node_mqtt(&s, "mq-ind-1", &[("SYMMETRIC_KEY", &provisio_core::keys::generate_key())]);
    assert_eq!(r["ok"], false, "{r}");
}

/// A raw MQTT client over TLS: writes packets, reads packets.
struct Raw {
    io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: BytesMut,
}

impl Raw {
    async fn connect(s: &Server) -> Self {
        let port: u16 = s.info.mqtt_endpoint.as_deref().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
        Self { io: crate::common::tls_connect(s, port, None).await, buf: BytesMut::new() }
    }

    async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, 1 << 20).unwrap();
        self.io.write_all(&b).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// The next packet, or None when the server closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
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

    async fn hello(s: &Server, id: &str, password: &str) -> Self {
        let mut c = Self::connect(s).await;
        let mut conn = Connect::new(id);
        conn.keep_alive = 30;
        conn.login =
            Some(Login::new(format!("{}/registrations/{id}/api-version=2019-03-31", s.info.id_scope), password));
        c.send(Packet::Connect(conn)).await;
        let Some(Packet::ConnAck(a)) = c.recv().await else { panic!("no CONNACK") };
        assert!(!a.session_present);
        c
    }

    async fn request(&mut self, topic: &str, payload: &[u8], pkid: u16) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        // PUBACK first, then the answer (trap 6).
        assert_eq!(self.recv().await, Some(Packet::PubAck(PubAck::new(pkid))));
        let Some(Packet::Publish(answer)) = self.recv().await else { panic!("no answer") };
        self.send(Packet::PubAck(PubAck::new(answer.pkid))).await;
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_mqtt_register_poll_refusals_and_isolation() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let e =
        put_enrollment(&s, false, "raw-1", json!({"registrationId": "raw-1", "attestation": {"type": "symmetricKey"}}))
            .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let token = provisio_core::sas::build_token(
        &format!("{}/registrations/raw-1", s.info.id_scope),
        key,
        now() + 600,
        Some("registration"),
        provisio_core::sas::SrEncoding::Upper,
    )
    .unwrap();

    let mut a = Raw::hello(&s, "raw-1", &token).await;
    a.send(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))).await;
    assert!(matches!(a.recv().await, Some(Packet::SubAck(_))));

    // Another connection sends garbage: only it is closed.
    let mut b = Raw::hello(&s, "raw-1", &token).await;
    b.send_raw(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
    assert_eq!(b.recv().await, None, "a malformed packet closes its connection");

    let ans = a.request("$dps/registrations/PUT/iotdps-register/?$rid=r-1", br#"{"registrationId":"raw-1"}"#, 1).await;
    assert_eq!(ans.topic, "$dps/registrations/res/202/?$rid=r-1&retry-after=2");
    let v: Value = serde_json::from_slice(&ans.payload).unwrap();
    assert_eq!(v["status"], "assigning");
    let op = v["operationId"].as_str().unwrap().to_owned();
    let ans = a
        .request(&format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r-2&operationId={op}"), b" ", 2)
        .await;
    assert_eq!(ans.topic, "$dps/registrations/res/200/?$rid=r-2");
    let v: Value = serde_json::from_slice(&ans.payload).unwrap();
    assert_eq!(v["status"], "assigned", "{v}");
    assert_eq!(v["registrationState"]["registrationId"], "raw-1");
    // Unknown topic and unknown operation: DPS error bodies on the response topic.
    let ans = a.request("$dps/registrations/POST/nothing/?$rid=r-3", b"{}", 3).await;
    assert_eq!(ans.topic, "$dps/registrations/res/404/?$rid=r-3");
    let ans = a.request("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r-4&operationId=nope", b"", 4).await;
    let v: Value = serde_json::from_slice(&ans.payload).unwrap();
    assert_eq!((ans.topic.as_str(), v["errorCode"].as_u64()), ("$dps/registrations/res/404/?$rid=r-4", Some(404_202)));
    // Malformed JSON.
    let ans = a.request("$dps/registrations/PUT/iotdps-register/?$rid=r-5", b"{", 5).await;
    let v: Value = serde_json::from_slice(&ans.payload).unwrap();
    assert_eq!((ans.topic.as_str(), v["errorCode"].as_u64()), ("$dps/registrations/res/400/?$rid=r-5", Some(400_001)));
    // Still fine after all that.
    a.send(Packet::PingReq).await;
    assert_eq!(a.recv().await, Some(Packet::PingResp));
    a.send(Packet::Disconnect).await;
    assert_eq!(a.recv().await, None);

    // A forged token: CONNACK succeeds, the request gets 401 on the response topic (as DPS).
    let forged = provisio_core::sas::build_token(
        &format!("{}/registrations/raw-1", s.info.id_scope),
        &provisio_core::keys::generate_key(),
        now() + 600,
        None,
        provisio_core::sas::SrEncoding::Raw,
    )
    .unwrap();
    let mut c = Raw::hello(&s, "raw-1", &forged).await;
    c.send(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))).await;
    c.recv().await;
    let ans = c.request("$dps/registrations/PUT/iotdps-register/?$rid=x", b"{}", 9).await;
    let v: Value = serde_json::from_slice(&ans.payload).unwrap();
    assert_eq!((ans.topic.as_str(), v["errorCode"].as_u64()), ("$dps/registrations/res/401/?$rid=x", Some(401_002)));
    assert!(v["trackingId"].is_string());
    // The server is unharmed: HTTPS still answers.
    let r = s.client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
