//! One device API, three transports: the same request gets the same answer over HTTPS,
//! MQTT and AMQP (status, error code, message, retry hint, body), because every front-end
//! hands it to the engine's one device path and only frames the answer. One row a case,
//! each run against all three transports.

use provisio_testkit::{
    Server,
    devices::{Call, Op, Reply, Transport, send},
    now, put_enrollment,
};
use serde_json::{Value, json};

fn token(scope: &str, id: &str, key: &str) -> String {
    provisio_core::sas::build_token(
        &format!("{scope}/registrations/{id}"),
        key,
        now() + 600,
        Some("registration"),
        provisio_core::sas::SrEncoding::Lower,
    )
    .unwrap()
}

/// What must be the same on every transport: the status, the retry hint and the body
/// without what is unique to one answer (tracking ids, timestamps, operation ids).
fn comparable(r: &Reply) -> (u16, Option<u32>, Value) {
    let mut body = r.body.clone();
    if let Some(o) = body.as_object_mut() {
        for unique in ["trackingId", "timestampUtc", "operationId"] {
            o.remove(unique);
        }
    }
    (r.status, r.retry_after, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_gets_the_same_answer_over_https_mqtt_and_amqp() {
    let tmp = tempfile::tempdir().unwrap();
    // Polls of one device over three transports exceed DPS's 5 per 10 s, and its refusals
    // the audit log's 10 a minute from one address: lift those limits.
    let cfg = tmp.path().join("provisio.toml");
    std::fs::write(&cfg, "device_polls_per_10s = 0\naudit_log_refusals_per_minute = 0\n").unwrap();
    let data = tmp.path().join("data");
    let s = Server::start(&data, "127.0.0.1:0", &["--retry-after-secs", "3", "--config", cfg.to_str().unwrap()]);
    let scope = s.info.id_scope.clone();
    let id = "tx-dev";
    let e = put_enrollment(&s, false, id, json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})).await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let good = token(&scope, id, &key);
    let forged = token(&scope, id, &provisio_core::keys::generate_key());
    let v = Some("2019-03-31");
    let body = br#"{"registrationId":"tx-dev"}"#;

    // (case, api-version, token, body, expected status, expected DPS error code (0: none))
    type Case<'a> = (&'a str, Option<&'a str>, &'a str, &'a [u8], u16, u64);
    let cases: [Case<'_>; 6] = [
        ("missing api-version", None, &good, body, 400, 400_004),
        ("unknown api-version", Some("2019-04-16"), &good, body, 400, 400_004),
        ("body id differs from the request's", v, &good, br#"{"registrationId":"someone-else"}"#, 400, 400_004),
        ("malformed body", v, &good, br#"{"registrationId":"#, 400, 400_001),
        ("forged token", v, &forged, body, 401, 401_002),
        ("an assigning registration", v, &good, body, 202, 0),
    ];
    for (case, api_version, token, body, status, code) in cases {
        let call = Call { scope: &scope, registration_id: id, api_version, token, op: Op::Register(body) };
        let mut replies = Vec::new();
        for t in Transport::ALL {
            let r = send(&s, t, &call).await;
            assert_eq!(r.status, status, "{case} over {t:?}: {r:?}");
            if code == 0 {
                assert_eq!(r.body["status"], "assigning", "{case} over {t:?}: {r:?}");
                assert!(r.body["operationId"].as_str().is_some_and(|o| !o.is_empty()), "{case} over {t:?}: {r:?}");
                assert_eq!(r.retry_after, Some(3), "{case} over {t:?}: the configured Retry-After");
            } else {
                provisio_testkit::assert_dps_error(r.status, &r.body, status, code);
                assert_eq!(r.retry_after, None, "{case} over {t:?}: no retry hint on a client error");
            }
            replies.push((t, r));
        }
        let (first, rest) = replies.split_first().unwrap();
        for (t, r) in rest {
            assert_eq!(comparable(r), comparable(&first.1), "{case}: {t:?} differs from {:?}", first.0);
        }
    }

    // Polls: the assigned operation, and one that does not exist, the same on every
    // transport too.
    let registered = send(
        &s,
        Transport::Https,
        &Call { scope: &scope, registration_id: id, api_version: v, token: &good, op: Op::Register(body) },
    )
    .await;
    let op = registered.body["operationId"].as_str().unwrap().to_owned();
    for (case, op, status) in [("assigned", op.as_str(), 200), ("unknown operation", "4.nothing", 404)] {
        let call = Call { scope: &scope, registration_id: id, api_version: v, token: &good, op: Op::Poll(op) };
        let mut answers = Vec::new();
        for t in Transport::ALL {
            let r = send(&s, t, &call).await;
            assert_eq!(r.status, status, "{case} over {t:?}: {r:?}");
            assert_eq!(r.retry_after, None, "{case} over {t:?}: a terminal answer carries no retry hint");
            answers.push(comparable(&r));
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{case}: {answers:?}");
        if status == 200 {
            assert_eq!(answers[0].2["status"], "assigned");
            assert_eq!(answers[0].2["registrationState"]["registrationId"], id);
        } else {
            assert_eq!(answers[0].2["errorCode"], 404_202);
        }
    }
    // Every refused attempt above is in the audit log, with its transport.
    let log = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    for transport in ["https", "mqtt", "amqp"] {
        let refused = log
            .lines()
            .filter(|l| l.contains(&format!("\"transport\":\"{transport}\"")) && l.contains("\"result\":\"refused\""))
            .count();
        assert_eq!(refused, 5, "{transport}: five refused registrations audited\n{log}");
    }
    drop(s);
}
