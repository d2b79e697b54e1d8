//! The shared store: PostgreSQL (and engines that speak its protocol), so that several
//! stateless Provisio nodes can serve one instance.
//!
//! Connections are sqlx's `PgConnection`s, reused through a small pool of our own rather
//! than sqlx's: that pool checks a connection with a round trip to the server when it is
//! taken (`test_before_acquire`) and again, unconditionally, whenever it is given back, so
//! every query cost three round trips (a profile of `provisio-bench --database` put a third
//! of the server's CPU in them). Here a query costs one: a connection that completed its
//! work goes back to the pool, any other (an error, a request cancelled mid-query) is
//! closed; one idle for a while is checked before use.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use sqlx::{
    Connection, Row,
    postgres::{PgConnectOptions, PgConnection, PgRow},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    Collection, Document, Operation, Precondition, RegistrationWrite, Result, Store, StoreError, new_etag, unix_now,
};

/// How long a caller waits for a connection when all are in use.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection older than this is checked with a round trip before use (the server
/// may have restarted, or an administrator ended the session, meanwhile). Under load a
/// connection is reused within milliseconds and never checked; after an outage of more
/// than this, every connection is checked and the dead ones are replaced.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);
/// An idle connection older than this is closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(300);
/// How long that check (or a polite close) may take before the connection is given up.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// PostgreSQL-backed [`Store`].
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Arc<Pool>,
}

struct Pool {
    options: PgConnectOptions,
    /// Idle connections, the most recently used last.
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    /// One permit per connection that may be open (`max_connections`).
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Pool {
    // Not derived: the connect options hold the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("host", &self.options.get_host())
            .field("database", &self.options.get_database())
            .field("idle", &self.idle.lock().map_or(0, |v| v.len()))
            .field("free", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

/// A connection taken from the pool. It goes back only through [`Pooled::release`]; dropped
/// otherwise (an error, a cancelled request), it is closed, since it may be mid-exchange.
struct Pooled {
    conn: Option<PgConnection>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Pooled {
    fn conn(&mut self) -> &mut PgConnection {
        // Present from `acquire` until `release`, which consumes `self`.
        self.conn.as_mut().expect("a pooled connection is present until released")
    }

    /// Gives the connection back for reuse: its last exchange completed.
    fn release(mut self) {
        if let Some(conn) = self.conn.take()
            && !self.pool.permits.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push((conn, Instant::now()));
        }
    }
}

impl Pool {
    async fn acquire(self: &Arc<Self>) -> Result<Pooled> {
        let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "no PostgreSQL connection became free within {} s (database_max_connections)",
                    ACQUIRE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|_| StoreError::Backend("the store is closed".into()))?;
        loop {
            let idle = self.idle.lock().map_err(|_| StoreError::Backend("connection pool poisoned".into()))?.pop();
            let conn = match idle {
                Some((conn, since)) if since.elapsed() > MAX_IDLE => {
                    // Politely (a Terminate message), so the server logs no lost client; a
                    // peer that does not answer is not waited for long.
                    let _ = tokio::time::timeout(CHECK_TIMEOUT, conn.close()).await;
                    continue;
                }
                Some((mut conn, since)) if since.elapsed() > CHECK_AFTER_IDLE => {
                    // A connection whose peer vanished without a reset would not answer at all.
                    if !matches!(tokio::time::timeout(CHECK_TIMEOUT, conn.ping()).await, Ok(Ok(()))) {
                        continue;
                    }
                    conn
                }
                Some((conn, _)) => conn,
                None => PgConnection::connect_with(&self.options)
                    .await
                    .map_err(|e| StoreError::Backend(format!("cannot connect to PostgreSQL: {e}")))?,
            };
            return Ok(Pooled { conn: Some(conn), pool: self.clone(), _permit: permit });
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:pass@host:port/db?sslmode=…`) and applies the
    /// migrations; at most `max_connections` connections are opened. sqlx takes a
    /// PostgreSQL advisory lock while migrating, so nodes that start together do not race.
    ///
    /// # Errors
    /// If the URL is malformed or the database cannot be reached or migrated.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions =
            url.parse().map_err(|e| StoreError::Backend(format!("cannot connect to PostgreSQL: {e}")))?;
        let permits = usize::try_from(max_connections.max(1)).unwrap_or(1);
        let pool = Arc::new(Pool { options, idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(permits)) });
        let mut c = pool.acquire().await?;
        sqlx::migrate!("./migrations/postgres")
            .run(c.conn())
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        c.release();
        Ok(Self { pool })
    }

    async fn exists(&self, c: Collection, id: &str) -> Result<bool> {
        let mut conn = self.pool.acquire().await?;
        let found = sqlx::query("SELECT 1 FROM documents WHERE collection = $1 AND id = $2")
            .bind(c.as_str())
            .bind(id)
            .fetch_optional(conn.conn())
            .await?
            .is_some();
        conn.release();
        Ok(found)
    }
}

fn doc(row: &PgRow) -> Result<Document> {
    Ok(Document { id: row.try_get("id")?, etag: row.try_get("etag")?, body: row.try_get("body")? })
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, c: Collection, id: &str) -> Result<Option<Document>> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query("SELECT id, etag, body FROM documents WHERE collection = $1 AND id = $2")
            .bind(c.as_str())
            .bind(id)
            .fetch_optional(conn.conn())
            .await?;
        conn.release();
        row.as_ref().map(doc).transpose()
    }

    async fn get_both(&self, a: Collection, b: Collection, id: &str) -> Result<(Option<Document>, Option<Document>)> {
        let mut conn = self.pool.acquire().await?;
        let rows =
            sqlx::query("SELECT collection, id, etag, body FROM documents WHERE id = $1 AND collection IN ($2, $3)")
                .bind(id)
                .bind(a.as_str())
                .bind(b.as_str())
                .fetch_all(conn.conn())
                .await?;
        conn.release();
        let (mut first, mut second) = (None, None);
        for r in &rows {
            let c: String = r.try_get("collection")?;
            if c == a.as_str() {
                first = Some(doc(r)?);
            } else if c == b.as_str() {
                second = Some(doc(r)?);
            }
        }
        Ok((first, second))
    }

    async fn put(&self, c: Collection, id: &str, body: &str, pre: Precondition) -> Result<Document> {
        let etag = new_etag();
        let now = unix_now();
        let q = match &pre {
            Precondition::CreateOnly => sqlx::query(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (collection, id) DO NOTHING",
            ),
            Precondition::Any => sqlx::query(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (collection, id) DO UPDATE
                 SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at",
            ),
            Precondition::IfMatch(_) => sqlx::query(
                "UPDATE documents SET etag = $3, body = $4, updated_at = $5
                 WHERE collection = $1 AND id = $2 AND etag = $6",
            ),
        };
        let mut q = q.bind(c.as_str()).bind(id).bind(&etag).bind(body).bind(now);
        if let Precondition::IfMatch(expected) = &pre {
            q = q.bind(expected);
        }
        let mut conn = self.pool.acquire().await?;
        let affected = q.execute(conn.conn()).await?.rows_affected();
        conn.release();
        if affected == 0 {
            return Err(match pre {
                Precondition::CreateOnly => StoreError::Conflict,
                _ if self.exists(c, id).await? => StoreError::PreconditionFailed,
                _ => StoreError::NotFound,
            });
        }
        Ok(Document { id: id.to_owned(), etag, body: body.to_owned() })
    }

    async fn insert_if_absent(&self, c: Collection, id: &str, body: &str) -> Result<Document> {
        match self.put(c, id, body, Precondition::CreateOnly).await {
            Err(StoreError::Conflict) => self.get(c, id).await?.ok_or(StoreError::NotFound),
            other => other,
        }
    }

    async fn delete(&self, c: Collection, id: &str, if_match: Option<&str>) -> Result<()> {
        let q = match if_match {
            None => sqlx::query("DELETE FROM documents WHERE collection = $1 AND id = $2").bind(c.as_str()).bind(id),
            Some(etag) => sqlx::query("DELETE FROM documents WHERE collection = $1 AND id = $2 AND etag = $3")
                .bind(c.as_str())
                .bind(id)
                .bind(etag),
        };
        let mut conn = self.pool.acquire().await?;
        let affected = q.execute(conn.conn()).await?.rows_affected();
        conn.release();
        if affected == 0 {
            return Err(if if_match.is_some() && self.exists(c, id).await? {
                StoreError::PreconditionFailed
            } else {
                StoreError::NotFound
            });
        }
        Ok(())
    }

    async fn list(&self, c: Collection, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let mut conn = self.pool.acquire().await?;
        let rows =
            sqlx::query("SELECT id, etag, body FROM documents WHERE collection = $1 AND id > $2 ORDER BY id LIMIT $3")
                .bind(c.as_str())
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(conn.conn())
                .await?;
        conn.release();
        rows.iter().map(doc).collect()
    }

    async fn record_registration(&self, w: &RegistrationWrite<'_>) -> Result<Document> {
        let etag = new_etag();
        let now = unix_now();
        // One statement, so one round trip and its own transaction: the record and its
        // operation are written together or not at all.
        let q = sqlx::query(
            "WITH record AS (
                 INSERT INTO documents (collection, id, etag, body, created_at, updated_at, tag, state)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $8)
                 ON CONFLICT (collection, id) DO UPDATE
                 SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at,
                     tag = excluded.tag, state = excluded.state
             )
             INSERT INTO operations (id, registration_id, registration_etag, registration_body, created_at)
             VALUES ($7, $2, $3, $4, $5)",
        )
        .bind(Collection::Registrations.as_str())
        .bind(w.registration_id)
        .bind(&etag)
        .bind(w.body)
        .bind(now)
        .bind(w.tag)
        .bind(w.operation_id)
        .bind(w.state);
        let mut conn = self.pool.acquire().await?;
        match q.execute(conn.conn()).await {
            Ok(_) => conn.release(),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                conn.release();
                return Err(StoreError::Conflict);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Document { id: w.registration_id.to_owned(), etag, body: w.body.to_owned() })
    }

    async fn count(&self, c: Collection) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE collection = $1")
            .bind(c.as_str())
            .fetch_one(conn.conn())
            .await?;
        conn.release();
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn count_by_state(&self, c: Collection) -> Result<Vec<(String, u64)>> {
        let mut conn = self.pool.acquire().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, count(*) FROM documents WHERE collection = $1 AND state IS NOT NULL
             GROUP BY state ORDER BY state",
        )
        .bind(c.as_str())
        .fetch_all(conn.conn())
        .await?;
        conn.release();
        Ok(rows.into_iter().map(|(s, n)| (s, u64::try_from(n).unwrap_or(0))).collect())
    }

    async fn list_prefix(&self, c: Collection, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(
            "SELECT id, etag, body FROM documents
             WHERE collection = $1 AND id >= $2 AND id < $3 AND id > $4 ORDER BY id LIMIT $5",
        )
        .bind(c.as_str())
        .bind(prefix)
        .bind(crate::prefix_end(prefix))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(conn.conn())
        .await?;
        conn.release();
        rows.iter().map(doc).collect()
    }

    async fn list_by_tag(&self, c: Collection, tag: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(
            "SELECT id, etag, body FROM documents WHERE collection = $1 AND tag = $2 AND id > $3 ORDER BY id LIMIT $4",
        )
        .bind(c.as_str())
        .bind(tag)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(conn.conn())
        .await?;
        conn.release();
        rows.iter().map(doc).collect()
    }

    async fn get_operation(&self, id: &str) -> Result<Option<Operation>> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query(
            "SELECT id, registration_id, registration_etag, registration_body, created_at FROM operations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(conn.conn())
        .await?;
        conn.release();
        row.map(|r| {
            Ok(Operation {
                id: r.try_get("id")?,
                registration_id: r.try_get("registration_id")?,
                registration_etag: r.try_get("registration_etag")?,
                registration_body: r.try_get("registration_body")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn import(&self, c: Collection, docs: &[(String, String)]) -> Result<()> {
        let now = unix_now();
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.conn().begin().await?;
        for (id, body) in docs {
            sqlx::query(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (collection, id) DO UPDATE SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at",
            )
            .bind(c.as_str()).bind(id).bind(new_etag()).bind(body).bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        conn.release();
        Ok(())
    }

    async fn close(&self) {
        // Refuse new work, then close the idle connections politely; connections in use are
        // closed as their holders finish (a closed pool takes nothing back).
        self.pool.permits.close();
        let idle = self.pool.idle.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        for (conn, _) in idle {
            let _ = conn.close().await;
        }
    }

    async fn purge_operations(&self, before: i64) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        let purged =
            sqlx::query("DELETE FROM operations WHERE created_at < $1").bind(before).execute(conn.conn()).await?;
        conn.release();
        Ok(purged.rows_affected())
    }

    async fn trim(&self, c: Collection, keep: u32) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        let trimmed = sqlx::query(
            "DELETE FROM documents WHERE collection = $1 AND id IN (
                 SELECT id FROM documents WHERE collection = $1
                 ORDER BY updated_at DESC, id DESC OFFSET $2)",
        )
        .bind(c.as_str())
        .bind(i64::from(keep))
        .execute(conn.conn())
        .await?;
        conn.release();
        Ok(trimmed.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{fresh_postgres_database, postgres_admin_url};

    fn idle(s: &PostgresStore) -> usize {
        s.pool.idle.lock().map_or(0, |v| v.len())
    }

    /// Ends every session on `url`'s database except the caller's (as a database restart or
    /// an administrator would).
    async fn terminate_sessions(url: &str) {
        let name = url.rsplit_once('/').map(|(_, n)| n.to_owned()).unwrap_or_default();
        let mut admin = PgConnection::connect(&postgres_admin_url().unwrap()).await.unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&mut admin)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn connections_are_reused_and_a_broken_exchange_is_not() {
        let Some(url) = fresh_postgres_database().await else { return };
        let s = PostgresStore::connect(&url, 2).await.unwrap();
        s.put(Collection::Enrollments, "a", "1", Precondition::Any).await.unwrap();
        for _ in 0..20 {
            s.get(Collection::Enrollments, "a").await.unwrap();
        }
        assert_eq!(idle(&s), 1, "sequential calls share one connection");
        // A call cancelled mid-query (its request went away) must not leave its connection,
        // possibly mid-exchange, for the next caller.
        let slow = async {
            let mut c = s.pool.acquire().await.unwrap();
            sqlx::query("SELECT pg_sleep(5)").execute(c.conn()).await.unwrap();
            c.release();
        };
        assert!(tokio::time::timeout(Duration::from_millis(200), slow).await.is_err());
        assert_eq!(idle(&s), 0, "the cancelled call's connection was closed, not pooled");
        assert_eq!(s.get(Collection::Enrollments, "a").await.unwrap().unwrap().body, "1");
        // A failed statement closes its connection too; the store carries on.
        let mut c = s.pool.acquire().await.unwrap();
        assert!(sqlx::query("SELECT * FROM no_such_table").execute(c.conn()).await.is_err());
        drop(c);
        assert_eq!(s.get(Collection::Enrollments, "a").await.unwrap().unwrap().body, "1");
    }

    #[tokio::test]
    async fn at_most_max_connections_are_open_and_callers_wait_for_one() {
        let Some(url) = fresh_postgres_database().await else { return };
        let s = PostgresStore::connect(&url, 2).await.unwrap();
        let held = (s.pool.acquire().await.unwrap(), s.pool.acquire().await.unwrap());
        let third = tokio::time::timeout(Duration::from_millis(300), s.pool.acquire()).await;
        assert!(third.is_err(), "a third connection waits while two are in use");
        held.0.release();
        let third = tokio::time::timeout(Duration::from_secs(5), s.pool.acquire()).await;
        assert!(matches!(third, Ok(Ok(_))), "and gets the one given back");
    }

    #[tokio::test]
    async fn sessions_ended_by_the_server_are_replaced() {
        let Some(url) = fresh_postgres_database().await else { return };
        let s = PostgresStore::connect(&url, 4).await.unwrap();
        s.put(Collection::Enrollments, "a", "1", Precondition::Any).await.unwrap();
        assert_eq!(idle(&s), 1);
        terminate_sessions(&url).await;
        // Idle longer than CHECK_AFTER_IDLE: checked before use, found dead, replaced.
        tokio::time::sleep(CHECK_AFTER_IDLE + Duration::from_millis(200)).await;
        assert_eq!(s.get(Collection::Enrollments, "a").await.unwrap().unwrap().body, "1");
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "d",
            body: "{}",
            tag: None,
            state: None,
            operation_id: "op-1",
        })
        .await
        .unwrap();
        assert!(
            matches!(
                s.record_registration(&crate::RegistrationWrite {
                    registration_id: "d",
                    body: "{}",
                    tag: None,
                    state: None,
                    operation_id: "op-1"
                })
                .await,
                Err(StoreError::Conflict)
            ),
            "a repeated operation id is a conflict, as on SQLite"
        );
        assert_eq!(s.get(Collection::Registrations, "d").await.unwrap().unwrap().body, "{}");
    }

    #[tokio::test]
    async fn a_closed_store_refuses_work() {
        let Some(url) = fresh_postgres_database().await else { return };
        let s = PostgresStore::connect(&url, 2).await.unwrap();
        s.get(Collection::Enrollments, "a").await.unwrap();
        s.close().await;
        assert_eq!(idle(&s), 0);
        assert!(matches!(s.get(Collection::Enrollments, "a").await, Err(StoreError::Backend(_))));
    }

    #[tokio::test]
    async fn a_malformed_url_or_unreachable_server_is_a_clear_error() {
        for url in ["not a url", "postgres://postgres@127.0.0.1:1/x"] {
            match PostgresStore::connect(url, 1).await {
                Err(StoreError::Backend(m)) => assert!(m.contains("cannot connect to PostgreSQL"), "{m}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
