//! The complete service API: driven by the stock Node `azure-iot-provisioning-service`
//! client, and every error path with our own client.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{Instance, Server, assert_dps_error, now, service};

fn sym(id: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_api_error_paths_rights_policies_and_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("p.toml");
    std::fs::write(&cfg, "service_requests_per_second = 0\n").unwrap();
    let s = Server::start(&tmp.path().join("a"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let v = "api-version=2021-10-01";

    // Bulk: too many items, unknown mode, updateIfMatchETag without etags.
    let eleven: Vec<Value> = (0..11).map(|i| sym(&format!("b{i}"))).collect();
    let (st, b) = service(
        &s,
        Method::POST,
        &format!("/enrollments?{v}"),
        None,
        Some(json!({"mode": "create", "enrollments": eleven})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, b) = service(
        &s,
        Method::POST,
        &format!("/enrollments?{v}"),
        None,
        Some(json!({"mode": "upsert", "enrollments": []})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, b) = service(&s, Method::POST, &format!("/enrollmentGroups?{v}"), None, Some(json!({"mode": "create", "enrollmentGroups": [{"enrollmentGroupId": "bg", "attestation": {"type": "symmetricKey"}}, {"enrollmentGroupId": "bad id", "attestation": {"type": "symmetricKey"}}]}))).await;
    assert_eq!(st, 200);
    assert_eq!(b["errors"][0]["enrollmentGroupId"], "bad id", "{b}");
    assert_eq!(b["errors"][0]["errorCode"], 400_004);
    let (st, b) = service(&s, Method::POST, &format!("/enrollmentGroups?{v}"), None, Some(json!({"mode": "updateIfMatchETag", "enrollmentGroups": [{"enrollmentGroupId": "bg", "attestation": {"type": "symmetricKey"}}]}))).await;
    assert_eq!((st, b["errors"][0]["errorCode"].as_u64()), (200, Some(412_001)), "{b}");
    let (st, b) = service(&s, Method::POST, &format!("/enrollmentGroups?{v}"), None, Some(json!({"mode": "update", "enrollmentGroups": [{"enrollmentGroupId": "bg", "attestation": {"type": "symmetricKey"}}]}))).await;
    assert_eq!(
        (st, b["errors"][0]["errorCode"].as_u64()),
        (200, Some(409_201)),
        "update without etag acts like PUT without If-Match: {b}"
    );

    // Queries: WHERE is refused, a forged continuation is refused, unknown group is 404.
    let (st, b) = service(
        &s,
        Method::POST,
        &format!("/enrollments/query?{v}"),
        None,
        Some(json!({"query": "SELECT * FROM enrollments WHERE x = 1"})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);
    let r = s
        .client()
        .post(s.url(&format!("/enrollmentGroups/query?{v}")))
        .header("Authorization", s.service_token())
        .header("x-ms-continuation", "%%%")
        .json(&json!({"query": "select *"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (st, b) = service(&s, Method::POST, &format!("/registrations/never-was/query?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_204);
    // An empty result has no continuation and the item type.
    let r = s
        .client()
        .post(s.url(&format!("/enrollments/query?{v}")))
        .header("Authorization", s.service_token())
        .header("x-ms-max-item-count", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ms-item-type"], "Enrollment");
    assert!(r.headers().get("x-ms-continuation").is_none());
    assert_eq!(r.json::<Value>().await.unwrap(), json!([]));
    // Registration state of an unknown device; attestation mechanism of an unknown enrollment.
    let (st, b) = service(&s, Method::GET, &format!("/registrations/nobody?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_202);
    let (st, b) = service(&s, Method::POST, &format!("/enrollments/nobody/attestationmechanism?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_201);
    // Group TPM and "none" attestation are refused with a reason.
    let (st, b) = service(
        &s,
        Method::PUT,
        &format!("/enrollmentGroups/tg?{v}"),
        None,
        Some(json!({"enrollmentGroupId": "tg", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}})),
    )
    .await;
    assert_dps_error(st, &b, 400, 400_004);

    // Policies: add a read-only one; it can read but not write.
    let (st, p) = service(
        &s,
        Method::PUT,
        &format!("/policies/reader?{v}"),
        None,
        Some(json!({"keyName": "reader", "rights": "EnrollmentRead, registrationstatusread"})),
    )
    .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["rights"], "EnrollmentRead, RegistrationStatusRead");
    let reader = provisio_core::sas::build_token(
        "localhost",
        p["primaryKey"].as_str().unwrap(),
        now() + 600,
        Some("reader"),
        provisio_core::sas::SrEncoding::Upper,
    )
    .unwrap();
    let r = s
        .client()
        .get(s.url(&format!("/enrollmentGroups/bg?{v}")))
        .header("Authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client()
        .put(s.url(&format!("/enrollments/new-one?{v}")))
        .header("Authorization", &reader)
        .json(&sym("new-one"))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    assert_dps_error(st, &r.json::<Value>().await.unwrap(), 403, 403_001);
    let r = s.client().get(s.url(&format!("/certificates?{v}"))).header("Authorization", &reader).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // Unknown right; list; regenerate; the old key stops working.
    let (st, b) =
        service(&s, Method::PUT, &format!("/policies/bad?{v}"), None, Some(json!({"rights": "Everything"}))).await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, list) = service(&s, Method::GET, &format!("/policies?{v}"), None, None).await;
    assert_eq!(st, 200);
    assert_eq!(list["value"].as_array().unwrap().len(), 2);
    let (st, p2) = service(
        &s,
        Method::POST,
        &format!("/policies/reader/regenerateKey?{v}"),
        None,
        Some(json!({"keyType": "primary"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_ne!(p2["primaryKey"], p["primaryKey"]);
    assert_eq!(p2["secondaryKey"], p["secondaryKey"]);
    let r = s
        .client()
        .get(s.url(&format!("/enrollmentGroups/bg?{v}")))
        .header("Authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The last ServiceConfig policy cannot be removed or demoted.
    let (st, b) = service(&s, Method::DELETE, &format!("/policies/provisioningserviceowner?{v}"), None, None).await;
    assert_dps_error(st, &b, 400, 400_004);
    let (st, _) = service(&s, Method::DELETE, &format!("/policies/reader?{v}"), None, None).await;
    assert_eq!(st, 204);
    let (st, b) = service(&s, Method::GET, &format!("/policies/reader?{v}"), None, None).await;
    assert_dps_error(st, &b, 404, 404_001);

    // Rate limit: with 1 request/s (burst 2), a quick burst gets 429 with Retry-After.
    let tmp2 = tempfile::tempdir().unwrap();
    let cfg2 = tmp2.path().join("p.toml");
    std::fs::write(&cfg2, "service_requests_per_second = 1\n").unwrap();
    let s2 = Server::start(&tmp2.path().join("b"), "127.0.0.1:0", &["--config", cfg2.to_str().unwrap()]);
    let mut throttled = None;
    for _ in 0..6 {
        let r = s2
            .client()
            .get(s2.url(&format!("/enrollments/x?{v}")))
            .header("Authorization", s2.service_token())
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            throttled = Some((r.headers().get("retry-after").cloned(), r.json::<Value>().await.unwrap()));
            break;
        }
    }
    let (retry, body) = throttled.expect("6 quick requests at 1/s were never throttled");
    assert!(retry.is_some());
    assert_dps_error(429, &body, 429, 429_001);
}
