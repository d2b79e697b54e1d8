//! The web console over HTTPS without a browser: sessions, CSRF and Origin checks, rights,
//! the sign-in limit, escaping, etags, paging in the store, and `console = false`. (The
//! walkthrough in a real browser is the interop target's `console` test.)

use reqwest::{Method, StatusCode, redirect};
use serde_json::{Value, json};

use crate::common::{Instance, Server, service};

/// A browser stand-in: one session cookie, no redirects followed.
struct Browser {
    client: reqwest::Client,
    base: String,
    cookie: String,
}

/// An answer: status, `Location`, body.
struct Page {
    status: StatusCode,
    location: String,
    body: String,
    set_cookies: Vec<String>,
}

impl Page {
    /// The CSRF token the page's forms carry.
    fn csrf(&self) -> String {
        let at = self.body.find(r#"name="_csrf" value=""#).expect("a form with a CSRF token") + 20;
        self.body[at..].split('"').next().unwrap().to_owned()
    }
}

impl Browser {
    fn new(s: &Server) -> Self {
        let pem = std::fs::read(s.ca_file()).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .resolve("localhost", ([127, 0, 0, 1], s.port()).into())
            .redirect(redirect::Policy::none())
            .build()
            .unwrap();
        Self { client, base: s.url(""), cookie: String::new() }
    }

    async fn send(&mut self, rb: reqwest::RequestBuilder) -> Page {
        let rb = if self.cookie.is_empty() { rb } else { rb.header("Cookie", &self.cookie) };
        let r = rb.send().await.unwrap();
        let set_cookies: Vec<String> =
            r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
        for c in &set_cookies {
            if let Some(v) = c.strip_prefix("provisio_session=") {
                let v = v.split(';').next().unwrap();
                self.cookie = if v.is_empty() { String::new() } else { format!("provisio_session={v}") };
            }
        }
        let status = r.status();
        let location = r.headers().get("location").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        Page { status, location, body: r.text().await.unwrap(), set_cookies }
    }

    async fn get(&mut self, path: &str) -> Page {
        let rb = self.client.get(format!("{}{path}", self.base));
        self.send(rb).await
    }

    /// A form POST from the console's own pages (Origin set), fields URL-encoded.
    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let origin = self.base.clone();
        self.post_from(path, fields, Some(&origin)).await
    }

    async fn post_from(&mut self, path: &str, fields: &[(&str, &str)], origin: Option<&str>) -> Page {
        let body: String = form_urlencoded(fields);
        let mut rb = self
            .client
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(o) = origin {
            rb = rb.header("Origin", o);
        }
        self.send(rb).await
    }

    async fn sign_in(&mut self, connection_string: &str) -> Page {
        self.post("/console/sign-in", &[("connection_string", connection_string)]).await
    }
}

pub(crate) fn form_urlencoded(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish()
}

async fn policy(s: &Server, name: &str, rights: &str) -> String {
    let (st, p) = service(
        s,
        Method::PUT,
        &format!("/policies/{name}?api-version=2021-10-01"),
        None,
        Some(json!({ "rights": rights })),
    )
    .await;
    assert_eq!(st, 200, "{p}");
    format!("HostName=localhost;SharedAccessKeyName={name};SharedAccessKey={}", p["primaryKey"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_forms_rights_and_paging() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &[]);
    let owner = s.info.service_connection_string.clone();

    // Signed out: every page sends to the sign-in page; the sign-in page carries the
    // security headers.
    let mut b = Browser::new(&s);
    let p = b.get("/console/enrollments").await;
    assert_eq!((p.status, p.location.as_str()), (StatusCode::SEE_OTHER, "/console/sign-in"));
    let r = b.client.get(s.url("/console/sign-in")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");

    // Sign-in: wrong key refused (401, in the page), right one sets a strict cookie.
    let wrong = owner.replace(s.info.owner_key().unwrap(), "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    let p = b.sign_in(&wrong).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert!(p.body.contains("401002") && b.cookie.is_empty(), "{}", p.body);
    let p = b.sign_in("HostName=localhost").await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST, "a connection string without a key");
    let p = b.sign_in(&owner).await;
    assert_eq!((p.status, p.location.as_str()), (StatusCode::SEE_OTHER, "/console/overview"));
    let set = p.set_cookies.iter().find(|c| c.starts_with("provisio_session=")).unwrap();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(attr), "{set}");
    }
    // A sign-in form from another site is refused before the key is even looked at.
    let mut other = Browser::new(&s);
    let p = other.post_from("/console/sign-in", &[("connection_string", &owner)], Some("https://evil.example")).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    assert!(other.cookie.is_empty());

    // A forged or tampered cookie is no session.
    let mut forged = Browser::new(&s);
    forged.cookie = format!("{}x", b.cookie);
    assert_eq!(forged.get("/console/overview").await.location, "/console/sign-in");

    // Add an enrollment whose twin carries a script: saved, shown escaped.
    let form = b.get("/console/enrollments/new").await;
    assert_eq!(form.status, StatusCode::OK);
    let csrf = form.csrf();
    let twin = r#"{"tags": {"x": "<script>alert(1)</script>"}}"#;
    let p = b
        .post(
            "/console/enrollments/new",
            &[
                ("_csrf", &csrf),
                ("mechanism", "symmetricKey"),
                ("id", "con-1"),
                ("auto_keys", "1"),
                ("initial_twin", twin),
            ],
        )
        .await;
    assert_eq!((p.status, p.location.as_str()), (StatusCode::SEE_OTHER, "/console/enrollments/con-1"), "{}", p.body);
    let page = b.get("/console/enrollments/con-1").await;
    assert!(!page.body.contains("<script>alert(1)"), "escaped");
    assert!(
        page.body.contains("&#60;script&#62;alert(1)&#60;/script&#62;") || page.body.contains("&lt;script&gt;"),
        "shown as text"
    );
    assert!(!page.body.contains("primaryKey") && !page.body.contains(r#"id="primary-key""#), "keys hidden until asked");
    let (_, stored) = service(&s, Method::GET, "/enrollments/con-1?api-version=2021-10-01", None, None).await;
    assert_eq!(stored["initialTwin"]["tags"]["x"], "<script>alert(1)</script>");

    // CSRF: no token, another session's token, no Origin and no Referer, a foreign Origin.
    for (fields, origin) in [
        (vec![("id", "con-x"), ("mechanism", "symmetricKey")], Some(b.base.clone())),
        (vec![("_csrf", "AAAA"), ("id", "con-x"), ("mechanism", "symmetricKey")], Some(b.base.clone())),
        (vec![("_csrf", csrf.as_str()), ("id", "con-x"), ("mechanism", "symmetricKey")], None),
        (
            vec![("_csrf", csrf.as_str()), ("id", "con-x"), ("mechanism", "symmetricKey")],
            Some("https://evil.example".into()),
        ),
    ] {
        let p = b.post_from("/console/enrollments/new", &fields, origin.as_deref()).await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{fields:?} {origin:?}");
    }
    let (st, _) = service(&s, Method::GET, "/enrollments/con-x?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404, "no refused form made anything");

    // A twin that is not JSON: 400 on the form, with what was typed kept.
    let p = b
        .post(
            "/console/enrollments/new",
            &[
                ("_csrf", &csrf),
                ("mechanism", "symmetricKey"),
                ("id", "con-2"),
                ("auto_keys", "1"),
                ("initial_twin", "{nope"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("not valid JSON") && p.body.contains(r#"value="con-2""#) && p.body.contains("{nope"));

    // Edit with a stale etag: the concurrent change is reported (412), not overwritten.
    let edit = b.get("/console/enrollments/con-1/edit").await;
    let etag_at = edit.body.find(r#"name="etag" value=""#).unwrap() + 19;
    let etag = edit.body[etag_at..].split('"').next().unwrap().to_owned();
    let (st, _) = service(&s, Method::PUT, "/enrollments/con-1?api-version=2021-10-01", Some("*"), Some(json!({"registrationId": "con-1", "attestation": {"type": "symmetricKey"}, "deviceId": "changed-elsewhere"}))).await;
    assert_eq!(st, 200);
    let p = b
        .post(
            "/console/enrollments/con-1",
            &[("_csrf", &csrf), ("mechanism", "symmetricKey"), ("id", "con-1"), ("device_id", "mine"), ("etag", &etag)],
        )
        .await;
    assert_eq!(p.status, StatusCode::PRECONDITION_FAILED, "{}", p.body);
    assert!(p.body.contains("412") && p.body.contains(r#"value="mine""#));
    let (_, e) = service(&s, Method::GET, "/enrollments/con-1?api-version=2021-10-01", None, None).await;
    assert_eq!(e["deviceId"], "changed-elsewhere");

    // Paging in the store: 120 enrollments in pages of 50, and a search by prefix.
    for i in 0..120 {
        let (st, _) = service(
            &s,
            Method::PUT,
            &format!("/enrollments/page-{i:03}?api-version=2021-10-01"),
            None,
            Some(json!({"registrationId": format!("page-{i:03}"), "attestation": {"type": "symmetricKey"}})),
        )
        .await;
        assert_eq!(st, 200);
    }
    let p1 = b.get("/console/enrollments?q=page-").await;
    assert_eq!(p1.body.matches(r#"<a href="/console/enrollments/page-"#).count(), 50);
    assert!(p1.body.contains("after=page-049\" rel=\"next\""), "next page link");
    let p3 = b.get("/console/enrollments?tab=individual&q=page-&after=page-099").await;
    assert_eq!(p3.body.matches(r#"<a href="/console/enrollments/page-"#).count(), 20);
    assert!(!p3.body.contains("rel=\"next\""));
    let found = b.get("/console/enrollments?q=PAGE-11").await;
    assert_eq!(found.body.matches(r#"<a href="/console/enrollments/page-11"#).count(), 10, "case-insensitive prefix");

    // A read-only policy: no Add, and a hand-made POST with its own cookie and token: 403.
    let reader = policy(&s, "reader", "EnrollmentRead").await;
    let mut r = Browser::new(&s);
    assert_eq!(r.sign_in(&reader).await.status, StatusCode::SEE_OTHER);
    let list = r.get("/console/enrollments").await;
    assert!(!list.body.contains("Add individual enrollment"));
    assert!(!list.body.contains(">Certificates<"), "no section it may not open");
    assert_eq!(r.get("/console/enrollments/new").await.status, StatusCode::FORBIDDEN);
    assert_eq!(r.get("/console/certificates").await.status, StatusCode::FORBIDDEN);
    let token = list.csrf();
    let p = r
        .post(
            "/console/enrollments/con-1/action",
            &[("_csrf", &token), ("action", "delete"), ("confirm", "yes"), ("etag", "*")],
        )
        .await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    assert!(p.body.contains("403") && p.body.contains("EnrollmentWrite"));
    let (st, _) = service(&s, Method::GET, "/enrollments/con-1?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 200, "not deleted");

    // Delete asks first, then deletes; the change is audited under the policy.
    let detail = b.get("/console/enrollments/con-1").await;
    let p = b
        .post("/console/enrollments/con-1/action", &[("_csrf", &detail.csrf()), ("action", "delete"), ("etag", "*")])
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains("Delete enrollment con-1?") && p.body.contains(r#"name="confirm" value="yes""#));
    let p = b
        .post(
            "/console/enrollments/con-1/action",
            &[("_csrf", &detail.csrf()), ("action", "delete"), ("etag", "*"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let (st, _) = service(&s, Method::GET, "/enrollments/con-1?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404);
    let audit = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    let deleted: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["action"] == "DELETE /enrollments/con-1")
        .collect();
    assert_eq!(deleted.len(), 1, "{audit}");
    assert_eq!(
        (&deleted[0]["transport"], &deleted[0]["credential"]),
        (&json!("console"), &json!("provisioningserviceowner"))
    );

    // The session ends when its policy's key is regenerated, or the policy removed.
    let (st, _) = service(
        &s,
        Method::POST,
        "/policies/reader/regenerateKey?api-version=2021-10-01",
        None,
        Some(json!({"keyType": "secondary"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(r.get("/console/enrollments").await.location, "/console/sign-in");
    let reader = policy(&s, "reader", "EnrollmentRead").await;
    assert_eq!(r.sign_in(&reader).await.status, StatusCode::SEE_OTHER);
    let (st, _) = service(&s, Method::DELETE, "/policies/reader?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 204);
    assert_eq!(r.get("/console/overview").await.location, "/console/sign-in");

    // Sign-out ends the session in this browser.
    let o = b.get("/console/overview").await;
    let p = b.post("/console/sign-out", &[("_csrf", &o.csrf())]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert!(b.cookie.is_empty());
    assert_eq!(b.get("/console/overview").await.location, "/console/sign-in");

    // Sign-in attempts are limited per address: after 10 in a minute, 429.
    let mut statuses = Vec::new();
    let mut t = Browser::new(&s);
    for _ in 0..12 {
        statuses.push(t.sign_in(&wrong).await.status.as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    // Attempts past the limit cost no audit line (a flood cannot rotate the log away).
    let audit = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    let sign_ins: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["action"] == "console sign-in")
        .collect();
    assert!(sign_ins.iter().any(|l| l["status"] == 401), "refusals within the limit are audited");
    assert!(!sign_ins.iter().any(|l| l["status"] == 429), "throttled attempts are not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("p.toml");
    std::fs::write(&cfg, "console = false\n").unwrap();
    let s = Server::start(&tmp.path().join("d"), "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let r = s.client().get(s.url("/console/sign-in")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// Registers `id` over HTTPS with `key` and polls once: the answer's status.
async fn register(s: &Server, id: &str, key: &str) -> u16 {
    let scope = &s.info.id_scope;
    let token = provisio_core::sas::build_token(
        &format!("{scope}/registrations/{id}"),
        key,
        crate::common::now() + 600,
        Some("registration"),
        provisio_core::sas::SrEncoding::Upper,
    )
    .unwrap();
    let r = s
        .client()
        .put(s.url(&format!("/{scope}/registrations/{id}/register?api-version=2021-06-01")))
        .header("Authorization", token)
        .json(&json!({ "registrationId": id }))
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_groups_records_hubs_policies_and_the_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), "127.0.0.1:0", &["--linked-hub", "hub-a.example.net"]);
    let mut b = Browser::new(&s);
    assert_eq!(b.sign_in(&s.info.service_connection_string.clone()).await.status, StatusCode::SEE_OTHER);

    // A symmetric-key group; the page derives a device's key as the device does.
    let csrf = b.get("/console/groups/new").await.csrf();
    let p = b
        .post(
            "/console/groups/new",
            &[
                ("_csrf", &csrf),
                ("id", "grp"),
                ("attestation_type", "symmetricKey"),
                ("auto_keys", "1"),
                ("provisioning_status", "enabled"),
            ],
        )
        .await;
    assert_eq!((p.status, p.location.as_str()), (StatusCode::SEE_OTHER, "/console/groups/grp"), "{}", p.body);
    let (_, keys) =
        service(&s, Method::POST, "/enrollmentGroups/grp/attestationmechanism?api-version=2021-10-01", None, None)
            .await;
    let group_key = keys["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let want = provisio_core::keys::derive_device_key(&group_key, "grp-dev-1").unwrap();
    let p = b
        .post("/console/groups/grp/action", &[("_csrf", &csrf), ("action", "derive"), ("registration_id", "grp-dev-1")])
        .await;
    assert!(p.body.contains(&format!(r#"id="derived-key" class="secret" value="{want}""#)), "{}", p.body);
    let p = b
        .post("/console/groups/grp/action", &[("_csrf", &csrf), ("action", "derive"), ("registration_id", "bad id!")])
        .await;
    assert!(p.body.contains("role=\"alert\""), "an invalid registration id is the page's error");

    // The device registers; the group's page and the records list by group show it.
    assert_eq!(register(&s, "grp-dev-1", &want).await, 202);
    let page = b.get("/console/groups/grp").await;
    assert!(page.body.contains(r#"<a href="/console/registrations/grp-dev-1">grp-dev-1</a>"#));
    let by_group = b.get("/console/registrations?group=grp").await;
    assert!(by_group.body.contains("grp-dev-1") && by_group.body.contains("hub-a.example.net"));

    // Disable: a device of the group is recorded `disabled`; a refused device's page shows
    // the attempt and its reason; Enable lets devices in again.
    let etag_of = |body: &str| {
        let at = body.find(r#"name="etag" value=""#).unwrap() + 19;
        body[at..].split('"').next().unwrap().to_owned()
    };
    let p = b
        .post("/console/groups/grp/action", &[("_csrf", &csrf), ("action", "disable"), ("etag", &etag_of(&page.body))])
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let (_, g) = service(&s, Method::GET, "/enrollmentGroups/grp?api-version=2021-10-01", None, None).await;
    assert_eq!(g["provisioningStatus"], "disabled");
    assert_eq!(g["attestation"]["symmetricKey"]["primaryKey"], Value::Null, "keys kept, not shown");
    let (_, keys_after) =
        service(&s, Method::POST, "/enrollmentGroups/grp/attestationmechanism?api-version=2021-10-01", None, None)
            .await;
    assert_eq!(keys_after["symmetricKey"]["primaryKey"], keys["symmetricKey"]["primaryKey"], "disabling kept the keys");
    assert_eq!(
        register(&s, "grp-dev-2", &provisio_core::keys::derive_device_key(&group_key, "grp-dev-2").unwrap()).await,
        202
    );
    let disabled = b.get("/console/registrations/grp-dev-2").await;
    assert!(disabled.body.contains(r#"class="status-disabled">disabled<"#), "{}", disabled.body);
    assert_eq!(register(&s, "nobody-1", &group_key).await, 401);
    let record = b.get("/console/registrations/nobody-1").await;
    assert!(record.body.contains("has no registration record"), "{}", record.body);
    assert!(record.body.contains("refused") && record.body.contains("401"), "the refused attempt is listed");
    let page = b.get("/console/groups/grp").await;
    let p = b
        .post("/console/groups/grp/action", &[("_csrf", &csrf), ("action", "enable"), ("etag", &etag_of(&page.body))])
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    // A stale etag is reported.
    let p = b
        .post("/console/groups/grp/action", &[("_csrf", &csrf), ("action", "disable"), ("etag", &etag_of(&page.body))])
        .await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains("412"), "{}", p.body);

    // Delete a registration record (after the confirmation): the device provisions afresh.
    let rec = b.get("/console/registrations/grp-dev-1").await;
    let p = b.post("/console/registrations/grp-dev-1", &[("_csrf", &csrf), ("etag", &etag_of(&rec.body))]).await;
    assert!(p.body.contains("Delete the registration record of grp-dev-1?"));
    let p = b
        .post(
            "/console/registrations/grp-dev-1",
            &[("_csrf", &csrf), ("etag", &etag_of(&rec.body)), ("confirm", "yes")],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let (st, _) = service(&s, Method::GET, "/registrations/grp-dev-1?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404);

    // Linked hubs: add with a weight and region, a bad weight is the form's error, remove.
    let p = b
        .post(
            "/console/hubs",
            &[
                ("_csrf", &csrf),
                ("action", "save"),
                ("name", "hub-b.example.net"),
                ("weight", "5"),
                ("apply", "1"),
                ("region", "westeurope"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let (_, h) = service(&s, Method::GET, "/linkedHubs/hub-b.example.net?api-version=2021-10-01", None, None).await;
    assert_eq!((h["allocationWeight"].as_u64(), h["region"].as_str()), (Some(5), Some("westeurope")), "{h}");
    let p = b
        .post("/console/hubs", &[("_csrf", &csrf), ("action", "save"), ("name", "hub-c.example.net"), ("weight", "0")])
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains(r#"value="hub-c.example.net""#), "the form keeps what was typed");
    let p = b
        .post(
            "/console/hubs",
            &[("_csrf", &csrf), ("action", "remove"), ("name", "hub-b.example.net"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let (st, _) = service(&s, Method::GET, "/linkedHubs/hub-b.example.net?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404);

    // Policies: add with rights; its connection strings only on request; the last
    // ServiceConfig policy cannot lose the right.
    let p = b
        .post(
            "/console/policies",
            &[
                ("_csrf", &csrf),
                ("action", "save"),
                ("name", "ops"),
                ("rights", "EnrollmentRead"),
                ("rights", "RegistrationStatusRead"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let list = b.get("/console/policies").await;
    assert!(
        list.body.contains("EnrollmentRead, RegistrationStatusRead") && !list.body.contains("SharedAccessKeyName=ops")
    );
    let shown = b.get("/console/policies?show=ops").await;
    assert!(shown.body.contains("SharedAccessKeyName=ops;SharedAccessKey="));
    let p = b
        .post(
            "/console/policies",
            &[("_csrf", &csrf), ("action", "save"), ("name", "provisioningserviceowner"), ("rights", "EnrollmentRead")],
        )
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("last one with ServiceConfig"));

    // The audit log, filtered: service changes made here name the policy and the console.
    let audit = b.get("/console/audit?kind=service&registration_id=").await;
    assert!(
        audit.body.contains("PUT /linkedHubs/hub-b.example.net")
            && audit.body.contains("DELETE /registrations/grp-dev-1")
    );
    let regs = b.get("/console/audit?registration_id=nobody-1").await;
    assert!(regs.body.contains("nobody-1") && !regs.body.contains("PUT /linkedHubs"));
    assert_eq!(b.get("/console/audit?since=yesterday").await.status, StatusCode::BAD_REQUEST);

    // Pages that showed secrets (a derived device key, a policy's connection strings) are
    // audited as the service API's reads of them are.
    let audit = std::fs::read_to_string(tmp.path().join("audit.jsonl")).unwrap();
    let reads: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["transport"] == "console" && l["credential"] == "provisioningserviceowner")
        .filter_map(|l| l["action"].as_str().map(str::to_owned))
        .filter(|a| a.starts_with("GET ") || a.ends_with("/attestationmechanism"))
        .collect();
    assert_eq!(reads, ["POST /enrollmentGroups/grp/attestationmechanism", "GET /policies/ops"], "{audit}");
}
