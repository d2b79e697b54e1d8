//! The store alone, without HTTP or TLS: what a registration's storage work costs.
//!
//! `cargo bench -p provisio-store` runs it on a fresh embedded (SQLite) database; with
//! `PROVISIO_BENCH_POSTGRES=postgres://…` it runs on that PostgreSQL database too (its
//! tables are used as they are: give it an empty database).
//!
//! Two phases, each reporting the process's CPU time per operation (user + system, all
//! threads, from `/proc/self/stat`) and the rate:
//! - **register**: what the engine does for a new device, from 32 concurrent tasks: one
//!   `get_both` (enrollment + previous record) and one `record_registration` (committed
//!   durably, in groups);
//! - **read**: `get_both` of existing records, one at a time.

use std::{sync::Arc, time::Instant};

use provisio_store::{Collection, PostgresStore, SqliteStore, Store};

const TASKS: usize = 32;

/// Devices per phase: a measurement under `cargo bench` (which passes `--bench`), a quick
/// smoke run under `cargo test --all-targets`.
fn devices() -> usize {
    if std::env::args().any(|a| a == "--bench") { 40_000 } else { 1_000 }
}

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, in clock ticks (USER_HZ, 100 on Linux).
    (ticks(11) + ticks(12)) / 100.0
}

fn report(what: &str, ops: usize, cpu0: f64, t0: Instant) {
    let (cpu, secs) = (cpu_secs() - cpu0, t0.elapsed().as_secs_f64());
    #[allow(clippy::cast_precision_loss)]
    let ops = ops as f64;
    println!("  {what:9} {:7.1} µs CPU/op {:9.0} ops/s", cpu * 1e6 / ops, ops / secs);
}

async fn run(name: &str, store: Arc<dyn Store>) -> Result<(), Box<dyn std::error::Error>> {
    println!("{name}");
    let n = devices();
    // A registration record's size: the JSON the engine stores is about 400 bytes.
    let body = Arc::new(format!("{{\"registrationId\":\"x\",\"pad\":\"{}\"}}", "x".repeat(360)));
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let (cpu0, t0) = (cpu_secs(), Instant::now());
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (store, body, run_id) = (store.clone(), body.clone(), run_id.clone());
        tasks.push(tokio::spawn(async move {
            for i in (task..n).step_by(TASKS) {
                let id = format!("dev-{run_id}-{i}");
                store.get_both(Collection::Enrollments, Collection::Registrations, &id).await?;
                let op = format!("4.{i:016x}.{run_id}");
                store
                    .record_registration(&provisio_store::RegistrationWrite {
                        registration_id: &id,
                        body: &body,
                        tag: Some("bench-group"),
                        state: None,
                        operation_id: &op,
                    })
                    .await?;
            }
            Ok::<_, provisio_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    report("register", n, cpu0, t0);
    let (cpu0, t0) = (cpu_secs(), Instant::now());
    for k in 0..n {
        // A stride through the ids, so that reads are not in insertion order.
        let id = format!("dev-{run_id}-{}", (k * 7919) % n);
        let (_, record) = store.get_both(Collection::Enrollments, Collection::Registrations, &id).await?;
        assert!(record.is_some(), "record {id} missing");
    }
    report("read", n, cpu0, t0);
    store.close().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    run("embedded (SQLite, WAL, synchronous=FULL)", Arc::new(SqliteStore::open(&dir.path().join("bench.db")).await?))
        .await?;
    if let Ok(url) = std::env::var("PROVISIO_BENCH_POSTGRES") {
        run("PostgreSQL", Arc::new(PostgresStore::connect(&url, 16).await?)).await?;
    }
    Ok(())
}
