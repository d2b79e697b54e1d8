//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.

use std::{path::Path, str::FromStr, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Row,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

use crate::{Collection, Document, Operation, Precondition, Result, Store, StoreError, new_etag, unix_now};

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Group commit: registrations queue here and one writer commits them in batches, so
    /// that a burst of devices costs one fsync per batch instead of one each.
    writer: tokio::sync::mpsc::Sender<Job>,
}

/// One queued registration write.
#[derive(Debug)]
struct Job {
    registration_id: String,
    body: String,
    tag: Option<String>,
    operation_id: String,
    reply: tokio::sync::oneshot::Sender<Result<Document>>,
}

/// Most registrations committed in one transaction.
const MAX_BATCH: usize = 256;

/// Commits queued registrations in batches until every sender is gone.
async fn write_loop(pool: SqlitePool, mut rx: tokio::sync::mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let results = write_batch(&pool, &jobs).await;
        for (job, r) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(r);
        }
    }
}

/// Writes a batch in one transaction; each job succeeds or fails on its own (a duplicate
/// operation id fails its job only), and all fail together only if the commit fails.
async fn write_batch(pool: &SqlitePool, jobs: &[Job]) -> Vec<Result<Document>> {
    let run = async {
        let now = unix_now();
        let mut tx = pool.begin().await?;
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            let etag = new_etag();
            let inserted = sqlx::query(
                "INSERT INTO operations (id, registration_id, registration_etag, registration_body, created_at)
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&j.operation_id)
            .bind(&j.registration_id)
            .bind(&etag)
            .bind(&j.body)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                out.push(Err(StoreError::Conflict));
                continue;
            }
            sqlx::query(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at, tag)
                 VALUES (?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (collection, id) DO UPDATE
                 SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at, tag = excluded.tag",
            )
            .bind(Collection::Registrations.as_str())
            .bind(&j.registration_id)
            .bind(&etag)
            .bind(&j.body)
            .bind(now)
            .bind(now)
            .bind(&j.tag)
            .execute(&mut *tx)
            .await?;
            out.push(Ok(Document { id: j.registration_id.clone(), etag, body: j.body.clone() }));
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(out)
    };
    match run.await {
        Ok(out) => out,
        Err(e) => jobs.iter().map(|_| Err(StoreError::Backend(e.to_string()))).collect(),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies migrations.
    ///
    /// # Errors
    /// If the file cannot be opened or migrated.
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged commit survives power loss, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        Self::connect(opts).await
    }

    /// Opens a private in-memory database (tests).
    ///
    /// # Errors
    /// If SQLite fails.
    pub async fn in_memory() -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection: each in-memory connection would otherwise be its own database.
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await?;
        let s = Self::with_pool(pool);
        s.migrate().await?;
        Ok(s)
    }

    async fn connect(opts: SqliteConnectOptions) -> Result<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        let s = Self::with_pool(pool);
        s.migrate().await?;
        Ok(s)
    }

    fn with_pool(pool: SqlitePool) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(write_loop(pool.clone(), rx));
        Self { pool, writer: tx }
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))
    }

    async fn exists(&self, c: Collection, id: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM documents WHERE collection = ? AND id = ?")
            .bind(c.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }
}

fn doc(row: &sqlx::sqlite::SqliteRow) -> Result<Document> {
    Ok(Document { id: row.try_get("id")?, etag: row.try_get("etag")?, body: row.try_get("body")? })
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, c: Collection, id: &str) -> Result<Option<Document>> {
        sqlx::query("SELECT id, etag, body FROM documents WHERE collection = ? AND id = ?")
            .bind(c.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(doc)
            .transpose()
    }

    async fn get_both(&self, a: Collection, b: Collection, id: &str) -> Result<(Option<Document>, Option<Document>)> {
        let rows =
            sqlx::query("SELECT collection, id, etag, body FROM documents WHERE id = ? AND collection IN (?, ?)")
                .bind(id)
                .bind(a.as_str())
                .bind(b.as_str())
                .fetch_all(&self.pool)
                .await?;
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
        let affected = match &pre {
            Precondition::CreateOnly => sqlx::query(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection, id) DO NOTHING",
            )
            .bind(c.as_str())
            .bind(id)
            .bind(&etag)
            .bind(body)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Precondition::Any => sqlx::query(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?)
                 ON CONFLICT (collection, id) DO UPDATE
                 SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at",
            )
            .bind(c.as_str())
            .bind(id)
            .bind(&etag)
            .bind(body)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Precondition::IfMatch(expected) => sqlx::query(
                "UPDATE documents SET etag = ?, body = ?, updated_at = ?
                 WHERE collection = ? AND id = ? AND etag = ?",
            )
            .bind(&etag)
            .bind(body)
            .bind(now)
            .bind(c.as_str())
            .bind(id)
            .bind(expected)
            .execute(&self.pool)
            .await?
            .rows_affected(),
        };
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
        let affected = match if_match {
            None => sqlx::query("DELETE FROM documents WHERE collection = ? AND id = ?")
                .bind(c.as_str())
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected(),
            Some(etag) => sqlx::query("DELETE FROM documents WHERE collection = ? AND id = ? AND etag = ?")
                .bind(c.as_str())
                .bind(id)
                .bind(etag)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        };
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
        let rows =
            sqlx::query("SELECT id, etag, body FROM documents WHERE collection = ? AND id > ? ORDER BY id LIMIT ?")
                .bind(c.as_str())
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(doc).collect()
    }

    async fn record_registration(
        &self,
        registration_id: &str,
        body: &str,
        tag: Option<&str>,
        operation_id: &str,
    ) -> Result<Document> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            registration_id: registration_id.to_owned(),
            body: body.to_owned(),
            tag: tag.map(str::to_owned),
            operation_id: operation_id.to_owned(),
            reply,
        };
        self.writer.send(job).await.map_err(|_| StoreError::Backend("the registration writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("the registration writer has stopped".into()))?
    }

    async fn list_by_tag(&self, c: Collection, tag: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let rows = sqlx::query(
            "SELECT id, etag, body FROM documents WHERE collection = ? AND tag = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(c.as_str())
        .bind(tag)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(doc).collect()
    }

    async fn get_operation(&self, id: &str) -> Result<Option<Operation>> {
        let row = sqlx::query(
            "SELECT id, registration_id, registration_etag, registration_body, created_at
             FROM operations WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
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
        let mut tx = self.pool.begin().await?;
        for (id, body) in docs {
            sqlx::query(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)
                 ON CONFLICT (collection, id) DO UPDATE SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at",
            )
            .bind(c.as_str()).bind(id).bind(new_etag()).bind(body).bind(now).bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn purge_operations(&self, before: i64) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM operations WHERE created_at < ?")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
