//! Several nodes on one PostgreSQL database (an in-process server and a `provisio serve`
//! process): any node answers any request, racing registrations agree, and killing a node
//! loses nothing acknowledged. Runs when `PROVISIO_TEST_POSTGRES` names a server.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use serde_json::{Value, json};

use crate::common::{Instance, Process, Server, curl, now, put_enrollment};

fn token(scope: &str, id: &str, key: &str) -> String {
    provisio_core::sas::build_token(
        &format!("{scope}/registrations/{id}"),
        key,
        now() + 3600,
        None,
        provisio_core::sas::SrEncoding::Raw,
    )
    .unwrap()
}

fn put(s: &impl Instance, id: &str, tok: &str) -> (u16, Value) {
    let (st, _, v) = curl(
        s,
        "PUT",
        &format!("/{}/registrations/{id}/register?api-version=2021-06-01", s.info().id_scope),
        Some(tok),
        Some("{}"),
    );
    (st, v)
}

fn poll(s: &impl Instance, id: &str, tok: &str, op: &str) -> (u16, Value) {
    let (st, _, v) = curl(
        s,
        "GET",
        &format!("/{}/registrations/{id}/operations/{op}?api-version=2021-06-01", s.info().id_scope),
        Some(tok),
        None,
    );
    (st, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_postgres_instance() {
    let Some(db) = provisio_testkit::postgres_database().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let hubs = ["--linked-hub", "pg-hub-1.example.net", "--linked-hub", "pg-hub-2.example.net"];
    let a = Server::start(&tmp.path().join("a"), "127.0.0.1:0", &[&["--database", db.as_str()][..], &hubs].concat());
    let mut b = Process::start(&tmp.path().join("b"), "127.0.0.1:0", &["--database", &db]);
    // One instance: same scope, same owner key, same CA.
    assert_eq!(a.info.id_scope, b.info.id_scope);
    assert_eq!(a.info.owner_key(), b.info.owner_key());
    assert_eq!(std::fs::read(a.ca_file()).unwrap(), std::fs::read(b.ca_file()).unwrap());
    let scope = a.info.id_scope.clone();

    // Enrolled on A, registered on A, polled on B; the group on B serves a device on A.
    let e = put_enrollment(
        &a,
        false,
        "pg-dev-1",
        json!({"registrationId": "pg-dev-1", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let t = token(&scope, "pg-dev-1", &key);
    let (st, v) = put(&a, "pg-dev-1", &t);
    assert_eq!(st, 202);
    let (st, v) = poll(&b, "pg-dev-1", &t, v["operationId"].as_str().unwrap());
    assert_eq!((st, v["status"].as_str()), (200, Some("assigned")), "{v}");
    let hub = v["registrationState"]["assignedHub"].as_str().unwrap().to_owned();
    assert!(hub == "pg-hub-1.example.net" || hub == "pg-hub-2.example.net", "{v}");

    // The web console: a session signed in on A is a session on B (the instance's console
    // key is in the shared store), and B's pages show what A recorded.
    let console = |inst: &dyn Instance| {
        let pem = std::fs::read(inst.ca_file()).unwrap();
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .resolve("localhost", ([127, 0, 0, 1], inst.port()).into())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    };
    let cs = a.info.service_connection_string.clone();
    let form = crate::console::form_urlencoded(&[("connection_string", &cs)]);
    let r = console(&a)
        .post(a.url("/console/sign-in"))
        .header("Origin", a.url(""))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let r = console(&b).get(b.url("/console/registrations/pg-dev-1")).header("Cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 200, "A's session is accepted by B");
    let page = r.text().await.unwrap();
    assert!(page.contains(&hub) && page.contains("assigned"), "{page}");

    // The same id on both nodes at once: both answer, and both operations and the record agree.
    let (ta, tb) = (t.clone(), t.clone());
    let (sa, sb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| put(&a, "pg-dev-1", &ta));
        let hb = sc.spawn(|| put(&b, "pg-dev-1", &tb));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!((sa.0, sb.0), (202, 202));
    let (st_a, pa) = poll(&b, "pg-dev-1", &t, sa.1["operationId"].as_str().unwrap());
    let (st_b, pb) = poll(&a, "pg-dev-1", &t, sb.1["operationId"].as_str().unwrap());
    assert_eq!((st_a, st_b), (200, 200), "{pa} {pb}");
    assert_eq!((pa["status"].as_str(), pb["status"].as_str()), (Some("assigned"), Some("assigned")));
    // Two hubs, and hashed allocation on both nodes: the same device goes to the same hub.
    assert_eq!(pa["registrationState"]["assignedHub"], hub.as_str(), "{pa}");
    assert_eq!(pb["registrationState"]["assignedHub"], hub.as_str(), "{pb}");
    assert_ne!(pa["operationId"], pb["operationId"], "two registrations, two operations");
    let (st, _, now_a) =
        curl(&a, "POST", &format!("/{scope}/registrations/pg-dev-1?api-version=2021-06-01"), Some(&t), Some("{}"));
    let (_, _, now_b) =
        curl(&b, "POST", &format!("/{scope}/registrations/pg-dev-1?api-version=2021-06-01"), Some(&t), Some("{}"));
    assert_eq!(st, 200);
    assert_eq!(now_a, now_b, "both nodes see one record");
    assert!(
        now_a["etag"] == pa["registrationState"]["etag"] || now_a["etag"] == pb["registrationState"]["etag"],
        "the record is one of the two writes"
    );

    // Kill B in the middle of a load spread over both nodes: every acknowledged
    // registration is still there, answered by A.
    let g = put_enrollment(
        &a,
        true,
        "pg-load",
        json!({"enrollmentGroupId": "pg-load", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let gk = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = AtomicBool::new(false);
    let nodes = [(a.port, a.ca_file()), (b.port, b.ca_file())];
    std::thread::scope(|sc| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (acked, gk, scope, nodes, stop) = (acked.clone(), gk.clone(), scope.clone(), nodes.clone(), &stop);
                // Each worker registers devices on both nodes in turn until told to stop.
                sc.spawn(move || {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let id = format!("load-{w}-{i}");
                        let tok = token(&scope, &id, &provisio_core::keys::derive_device_key(&gk, &id).unwrap());
                        let (port, ca) = &nodes[i % 2];
                        let out = std::process::Command::new("curl")
                            .args(["-sS", "-m", "5", "-X", "PUT", "--cacert"])
                            .arg(ca)
                            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
                            .args([
                                "-H",
                                &format!("Authorization: {tok}"),
                                "-H",
                                "Content-Type: application/json",
                                "-d",
                                "{}",
                            ])
                            .arg(format!(
                                "https://localhost:{port}/{scope}/registrations/{id}/register?api-version=2021-06-01"
                            ))
                            .output()
                            .unwrap();
                        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
                            && let Some(op) = v["operationId"].as_str()
                        {
                            acked.lock().unwrap().push((id, op.to_owned()));
                        }
                    }
                })
            })
            .collect();
        // Kill B once the load is under way, then let A take more registrations before
        // stopping the load.
        let acked_now = || acked.lock().unwrap().len();
        let wait_for = |n: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while acked_now() < n {
                assert!(std::time::Instant::now() < deadline, "only {} registrations in 60 s", acked_now());
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        wait_for(10);
        b.kill9();
        let at_kill = acked_now();
        wait_for(at_kill + 10);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
    });
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20, "only {} registrations were acknowledged", acked.len());
    for (id, op) in &acked {
        let tok = token(&scope, id, &provisio_core::keys::derive_device_key(&gk, id).unwrap());
        let (st, v) = poll(&a, id, &tok, op);
        assert_eq!((st, v["status"].as_str()), (200, Some("assigned")), "acknowledged {id} lost: {v}");
    }
}
