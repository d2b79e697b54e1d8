//! The MQTT transport, with a raw TLS client speaking bytes (the stock Node client's tests
//! are in the interop target).

use provisio_testkit::devices::RawMqtt as Raw;
use rumqttc::mqttbytes::{
    QoS,
    v4::{Packet, Subscribe},
};
use serde_json::{Value, json};

use crate::common::{Instance, Server, now, put_enrollment};

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
