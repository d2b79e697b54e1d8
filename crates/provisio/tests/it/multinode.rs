//! Several `provisio serve` processes on one PostgreSQL database: any node answers any
//! request, racing registrations agree, and killing a node loses nothing acknowledged.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::common::{Server, curl, now, put_enrollment};

/// A fresh database on the test PostgreSQL server (see `provisio-store`'s conformance suite).
async fn fresh_database() -> String {
    use sqlx::{Connection, Executor};
    let admin = std::env::var("PROVISIO_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is not reachable ({e}); `.ci/run` starts it"));
    let name = format!("provisio_it_{}", uuid::Uuid::new_v4().simple());
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

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

fn put(s: &Server, id: &str, tok: &str) -> (u16, Value) {
    let (st, _, v) = curl(
        s,
        "PUT",
        &format!("/{}/registrations/{id}/register?api-version=2021-06-01", s.info.id_scope),
        Some(tok),
        Some("{}"),
    );
    (st, v)
}

fn poll(s: &Server, id: &str, tok: &str, op: &str) -> (u16, Value) {
    let (st, _, v) = curl(
        s,
        "GET",
        &format!("/{}/registrations/{id}/operations/{op}?api-version=2021-06-01", s.info.id_scope),
        Some(tok),
        None,
    );
    (st, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_postgres_instance() {
    let db = fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let a =
        Server::start(&tmp.path().join("a"), "127.0.0.1:0", &["--database", &db, "--linked-hub", "pg-hub.example.net"]);
    let mut b = Server::start(&tmp.path().join("b"), "127.0.0.1:0", &["--database", &db]);
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
    assert_eq!(v["registrationState"]["assignedHub"], "pg-hub.example.net");

    // The same id on both nodes at once: both answer, and both operations and the record agree.
    let (ta, tb) = (t.clone(), t.clone());
    let (sa, sb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| put(&a, "pg-dev-1", &ta));
        let hb = sc.spawn(|| put(&b, "pg-dev-1", &tb));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!((sa.0, sb.0), (202, 202));
    let (_, pa) = poll(&b, "pg-dev-1", &t, sa.1["operationId"].as_str().unwrap());
    let (_, pb) = poll(&a, "pg-dev-1", &t, sb.1["operationId"].as_str().unwrap());
    assert_eq!(pa["registrationState"]["assignedHub"], pb["registrationState"]["assignedHub"]);
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
    let nodes = [(a.port, a.ca_file()), (b.port, b.ca_file())];
    std::thread::scope(|sc| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (acked, gk, scope, nodes) = (acked.clone(), gk.clone(), scope.clone(), nodes.clone());
                sc.spawn(move || {
                    for i in 0..30 {
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
        std::thread::sleep(std::time::Duration::from_millis(400));
        b.kill9();
        for w in workers {
            w.join().unwrap();
        }
    });
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 30, "only {} registrations were acknowledged", acked.len());
    for (id, op) in &acked {
        let tok = token(&scope, id, &provisio_core::keys::derive_device_key(&gk, id).unwrap());
        let (st, v) = poll(&a, id, &tok, op);
        assert_eq!((st, v["status"].as_str()), (200, Some("assigned")), "acknowledged {id} lost: {v}");
    }
}
