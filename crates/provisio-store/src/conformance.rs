//! The store conformance suite. Every backend must pass it: SQLite (file-backed, as in
//! production, and in-memory), the encrypting wrapper over both, and a real PostgreSQL
//! server when `PROVISIO_TEST_POSTGRES` names one (an admin URL such as
//! `postgres://postgres@127.0.0.1:5432/postgres`; each test gets a fresh database). Without
//! it the PostgreSQL stores are left out and say so; `.ci/run` always sets it.

use sqlx::{Connection, Executor};

use crate::{Collection as C, PostgresStore, Precondition as P, SqliteStore, Store, StoreError};

/// The variable naming the test PostgreSQL server.
pub const POSTGRES_VAR: &str = "PROVISIO_TEST_POSTGRES";

/// The admin URL of the test PostgreSQL server, if one is configured.
pub fn postgres_admin_url() -> Option<String> {
    let url = std::env::var(POSTGRES_VAR).ok();
    if url.is_none() {
        eprintln!("PostgreSQL left out: {POSTGRES_VAR} is not set");
    }
    url
}

/// A fresh, empty database on the test server (its URL), or `None` without one.
///
/// # Panics
/// When the server is configured but cannot be reached or refuses the database.
pub async fn fresh_postgres_database() -> Option<String> {
    let admin = postgres_admin_url()?;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("the PostgreSQL test server at {admin} ({POSTGRES_VAR}) is not reachable: {e}"));
    let name = format!("provisio_test_{}", uuid::Uuid::new_v4().simple());
    let sql = format!("CREATE DATABASE {name}");
    conn.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

async fn stores() -> Vec<(tempfile::TempDir, Box<dyn Store>)> {
    let dir = tempfile::tempdir().unwrap();
    let file = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
    let mem = SqliteStore::in_memory().await.unwrap();
    // The encrypting wrapper must keep every rule of the store it wraps.
    let keys = || crate::Keyring::new(Some("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="), &[]).unwrap();
    let sealed_dir = tempfile::tempdir().unwrap();
    let sealed_file: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(SqliteStore::open(&sealed_dir.path().join("db.sqlite")).await.unwrap());
    let mut all: Vec<(tempfile::TempDir, Box<dyn Store>)> = vec![
        (dir, Box::new(file)),
        (tempfile::tempdir().unwrap(), Box::new(mem)),
        (sealed_dir, Box::new(crate::SealedStore::new(sealed_file, keys()))),
    ];
    if let (Some(a), Some(b)) = (fresh_postgres_database().await, fresh_postgres_database().await) {
        let pg = PostgresStore::connect(&a, 4).await.unwrap();
        let sealed_pg: std::sync::Arc<dyn Store> = std::sync::Arc::new(PostgresStore::connect(&b, 4).await.unwrap());
        all.push((tempfile::tempdir().unwrap(), Box::new(pg)));
        all.push((tempfile::tempdir().unwrap(), Box::new(crate::SealedStore::new(sealed_pg, keys()))));
    }
    all
}

#[tokio::test]
async fn put_get_and_etag_rules() {
    for (_d, s) in stores().await {
        let a = s.put(C::Enrollments, "dev1", "{\"v\":1}", P::CreateOnly).await.unwrap();
        assert_eq!(s.get(C::Enrollments, "dev1").await.unwrap().unwrap(), a);
        // Same id, other collection: independent.
        assert!(s.get(C::EnrollmentGroups, "dev1").await.unwrap().is_none());
        assert!(matches!(s.put(C::Enrollments, "dev1", "{}", P::CreateOnly).await, Err(StoreError::Conflict)));
        assert!(matches!(
            s.put(C::Enrollments, "dev1", "{}", P::IfMatch("nope".into())).await,
            Err(StoreError::PreconditionFailed)
        ));
        assert!(matches!(
            s.put(C::Enrollments, "ghost", "{}", P::IfMatch("nope".into())).await,
            Err(StoreError::NotFound)
        ));
        let b = s.put(C::Enrollments, "dev1", "{\"v\":2}", P::IfMatch(a.etag.clone())).await.unwrap();
        assert_ne!(a.etag, b.etag);
        // The old etag is stale now.
        assert!(matches!(
            s.put(C::Enrollments, "dev1", "{}", P::IfMatch(a.etag.clone())).await,
            Err(StoreError::PreconditionFailed)
        ));
        let c = s.put(C::Enrollments, "dev1", "{\"v\":3}", P::Any).await.unwrap();
        assert_eq!(s.get(C::Enrollments, "dev1").await.unwrap().unwrap().body, "{\"v\":3}");
        assert!(matches!(s.delete(C::Enrollments, "dev1", Some(&b.etag)).await, Err(StoreError::PreconditionFailed)));
        s.delete(C::Enrollments, "dev1", Some(&c.etag)).await.unwrap();
        assert!(matches!(s.delete(C::Enrollments, "dev1", None).await, Err(StoreError::NotFound)));
        assert!(s.get(C::Enrollments, "dev1").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn insert_if_absent_keeps_the_first() {
    for (_d, s) in stores().await {
        let a = s.insert_if_absent(C::Meta, "instance", "first").await.unwrap();
        let b = s.insert_if_absent(C::Meta, "instance", "second").await.unwrap();
        assert_eq!(a, b);
        assert_eq!(b.body, "first");
    }
}

#[tokio::test]
async fn list_pages_in_id_order() {
    for (_d, s) in stores().await {
        for i in [3, 1, 2, 5, 4] {
            s.put(C::EnrollmentGroups, &format!("g{i}"), "{}", P::CreateOnly).await.unwrap();
        }
        let p1 = s.list(C::EnrollmentGroups, None, 2).await.unwrap();
        assert_eq!(p1.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["g1", "g2"]);
        let p2 = s.list(C::EnrollmentGroups, Some("g2"), 10).await.unwrap();
        assert_eq!(p2.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["g3", "g4", "g5"]);
        assert!(s.list(C::Enrollments, None, 10).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn registrations_and_operations() {
    for (_d, s) in stores().await {
        let r1 = s
            .record_registration(&crate::RegistrationWrite {
                registration_id: "dev1",
                body: "{\"n\":1}",
                tag: Some("g1"),
                state: None,
                operation_id: "op1",
            })
            .await
            .unwrap();
        let r2 = s
            .record_registration(&crate::RegistrationWrite {
                registration_id: "dev1",
                body: "{\"n\":2}",
                tag: Some("g1"),
                state: None,
                operation_id: "op2",
            })
            .await
            .unwrap();
        assert_ne!(r1.etag, r2.etag);
        let op1 = s.get_operation("op1").await.unwrap().unwrap();
        assert_eq!((op1.registration_body.as_str(), op1.registration_etag.as_str()), ("{\"n\":1}", r1.etag.as_str()));
        assert_eq!(s.get(C::Registrations, "dev1").await.unwrap().unwrap(), r2);
        // Operation ids are unique: a replayed id fails and changes nothing.
        assert!(
            s.record_registration(&crate::RegistrationWrite {
                registration_id: "dev1",
                body: "{\"n\":3}",
                tag: None,
                state: None,
                operation_id: "op1"
            })
            .await
            .is_err()
        );
        assert_eq!(s.get(C::Registrations, "dev1").await.unwrap().unwrap(), r2);
        assert!(s.get_operation("nope").await.unwrap().is_none());
        // Tags: registrations of a group, paged.
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "dev2",
            body: "{}",
            tag: Some("g1"),
            state: None,
            operation_id: "op3",
        })
        .await
        .unwrap();
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "dev3",
            body: "{}",
            tag: Some("g2"),
            state: None,
            operation_id: "op4",
        })
        .await
        .unwrap();
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "dev4",
            body: "{}",
            tag: None,
            state: None,
            operation_id: "op5",
        })
        .await
        .unwrap();
        let ids = |v: Vec<crate::Document>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(s.list_by_tag(C::Registrations, "g1", None, 10).await.unwrap()), ["dev1", "dev2"]);
        assert_eq!(ids(s.list_by_tag(C::Registrations, "g1", Some("dev1"), 10).await.unwrap()), ["dev2"]);
        assert_eq!(ids(s.list_by_tag(C::Registrations, "g1", None, 1).await.unwrap()), ["dev1"]);
        // Re-registering through no group clears the tag.
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "dev2",
            body: "{}",
            tag: None,
            state: None,
            operation_id: "op6",
        })
        .await
        .unwrap();
        assert_eq!(ids(s.list_by_tag(C::Registrations, "g1", None, 10).await.unwrap()), ["dev1"]);
        assert_eq!(s.purge_operations(crate::unix_now() + 10).await.unwrap(), 6);
        assert!(s.get_operation("op2").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn trim_keeps_the_most_recently_updated() {
    let stores = stores().await;
    for (_d, s) in &stores {
        // The greatest id, but the oldest update: trimmed first.
        s.put(C::Audit, "z-old", "{}", P::Any).await.unwrap();
        s.put(C::Enrollments, "other", "{}", P::Any).await.unwrap();
    }
    // Updates are timed to the second: the next ones come in the next second, together.
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let to_next_second =
        std::time::Duration::from_secs(1) - std::time::Duration::from_nanos(since_epoch.subsec_nanos().into());
    tokio::time::sleep(to_next_second + std::time::Duration::from_millis(20)).await;
    for (_d, s) in &stores {
        for id in ["b", "a", "c"] {
            s.put(C::Audit, id, "{}", P::Any).await.unwrap();
        }
    }
    for (_d, s) in &stores {
        let ids = async || s.list(C::Audit, None, 10).await.unwrap().into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(s.trim(C::Audit, 4).await.unwrap(), 0);
        assert_eq!(s.trim(C::Audit, 3).await.unwrap(), 1);
        assert_eq!(ids().await, ["a", "b", "c"]);
        // Updated in the same second: the greater ids stay.
        assert_eq!(s.trim(C::Audit, 2).await.unwrap(), 1);
        assert_eq!(ids().await, ["b", "c"]);
        assert_eq!(s.trim(C::Audit, 0).await.unwrap(), 2);
        assert!(ids().await.is_empty());
        // Other collections are not touched.
        assert!(s.get(C::Enrollments, "other").await.unwrap().is_some());
    }
}

#[tokio::test]
async fn file_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    {
        let s = SqliteStore::open(&path).await.unwrap();
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "dev1",
            body: "{}",
            tag: None,
            state: None,
            operation_id: "op1",
        })
        .await
        .unwrap();
        // No close(): dropping without a clean shutdown, as after a crash.
    }
    let s = SqliteStore::open(&path).await.unwrap();
    assert!(s.get_operation("op1").await.unwrap().is_some());
}

#[tokio::test]
async fn concurrent_writers_agree() {
    // Two handles on one PostgreSQL database (as two nodes): racing creates, racing etag
    // updates and racing registrations each end in one consistent state.
    let Some(url) = fresh_postgres_database().await else { return };
    let a = PostgresStore::connect(&url, 4).await.unwrap();
    let b = PostgresStore::connect(&url, 4).await.unwrap();
    let (ra, rb) = tokio::join!(
        a.put(C::Enrollments, "race", "a", P::CreateOnly),
        b.put(C::Enrollments, "race", "b", P::CreateOnly)
    );
    assert!(ra.is_ok() ^ rb.is_ok(), "exactly one create wins");
    let cur = a.get(C::Enrollments, "race").await.unwrap().unwrap();
    let (ua, ub) = tokio::join!(
        a.put(C::Enrollments, "race", "a2", P::IfMatch(cur.etag.clone())),
        b.put(C::Enrollments, "race", "b2", P::IfMatch(cur.etag.clone()))
    );
    assert!(ua.is_ok() ^ ub.is_ok(), "exactly one update with the same etag wins");
    let winner = if ua.is_ok() { "a2" } else { "b2" };
    assert_eq!(b.get(C::Enrollments, "race").await.unwrap().unwrap().body, winner);
    let (x, y) = tokio::join!(
        a.record_registration(&crate::RegistrationWrite {
            registration_id: "dev",
            body: "1",
            tag: None,
            state: None,
            operation_id: "op-a"
        }),
        b.record_registration(&crate::RegistrationWrite {
            registration_id: "dev",
            body: "2",
            tag: None,
            state: None,
            operation_id: "op-b"
        })
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let now = a.get(C::Registrations, "dev").await.unwrap().unwrap();
    assert!(now == x || now == y, "the record is one of the two writes, whole");
    for op in ["op-a", "op-b"] {
        assert!(b.get_operation(op).await.unwrap().is_some());
    }
    // Migrations are idempotent and safe to run again (a third node starting).
    PostgresStore::connect(&url, 1).await.unwrap();
}

#[tokio::test]
async fn get_both_reads_two_collections_at_once() {
    for (_d, s) in stores().await {
        assert_eq!(s.get_both(C::Enrollments, C::Registrations, "d").await.unwrap(), (None, None));
        let e = s.put(C::Enrollments, "d", "{\"e\":1}", P::Any).await.unwrap();
        s.put(C::Enrollments, "other", "{}", P::Any).await.unwrap();
        s.put(C::Hubs, "d", "{}", P::Any).await.unwrap();
        assert_eq!(s.get_both(C::Enrollments, C::Registrations, "d").await.unwrap(), (Some(e.clone()), None));
        let r = s
            .record_registration(&crate::RegistrationWrite {
                registration_id: "d",
                body: "{\"r\":1}",
                tag: None,
                state: None,
                operation_id: "op-1",
            })
            .await
            .unwrap();
        let (x, y) = s.get_both(C::Enrollments, C::Registrations, "d").await.unwrap();
        assert_eq!(x, Some(e));
        assert_eq!(y.map(|d| (d.etag, d.body)), Some((r.etag, "{\"r\":1}".to_owned())));
        assert_eq!(s.get_both(C::Enrollments, C::Registrations, "D").await.unwrap(), (None, None), "ids are exact");
    }
}

#[tokio::test]
async fn counts_states_and_prefix_search() {
    for (_d, s) in stores().await {
        assert_eq!(s.count(C::Enrollments).await.unwrap(), 0);
        for id in ["dev-a1", "dev-a2", "dev-b1", "deva", "other", "dev-a3"] {
            s.put(C::Enrollments, id, "{}", P::Any).await.unwrap();
        }
        s.put(C::EnrollmentGroups, "dev-a9", "{}", P::Any).await.unwrap();
        assert_eq!(s.count(C::Enrollments).await.unwrap(), 6);
        assert_eq!(s.count(C::EnrollmentGroups).await.unwrap(), 1);
        // A prefix search pages in id order, in its own collection only.
        let ids = |docs: Vec<crate::Document>| docs.into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(s.list_prefix(C::Enrollments, "dev-a", None, 2).await.unwrap()), ["dev-a1", "dev-a2"]);
        assert_eq!(ids(s.list_prefix(C::Enrollments, "dev-a", Some("dev-a2"), 2).await.unwrap()), ["dev-a3"]);
        assert_eq!(ids(s.list_prefix(C::Enrollments, "dev", None, 10).await.unwrap()).len(), 5);
        assert!(s.list_prefix(C::Enrollments, "zzz", None, 10).await.unwrap().is_empty());
        assert_eq!(
            ids(s.list_prefix(C::Enrollments, "", None, 10).await.unwrap()).len(),
            6,
            "an empty prefix lists all"
        );
        // States: registration records by outcome; a record's state follows its last write.
        let write = |id: &'static str, state: Option<&'static str>, op: &'static str| crate::RegistrationWrite {
            registration_id: id,
            body: "{}",
            tag: None,
            state,
            operation_id: op,
        };
        s.record_registration(&write("r1", Some("assigned"), "op-s1")).await.unwrap();
        s.record_registration(&write("r2", Some("assigned"), "op-s2")).await.unwrap();
        s.record_registration(&write("r3", Some("failed"), "op-s3")).await.unwrap();
        s.record_registration(&write("r4", None, "op-s4")).await.unwrap();
        s.record_registration(&write("r2", Some("disabled"), "op-s5")).await.unwrap();
        assert_eq!(
            s.count_by_state(C::Registrations).await.unwrap(),
            [("assigned".to_owned(), 1), ("disabled".to_owned(), 1), ("failed".to_owned(), 1)]
        );
        assert_eq!(s.count(C::Registrations).await.unwrap(), 4);
        assert!(s.count_by_state(C::Enrollments).await.unwrap().is_empty());
    }
}
