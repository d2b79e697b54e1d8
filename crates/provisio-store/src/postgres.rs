//! The shared store: PostgreSQL (and engines that speak its protocol), so that several
//! stateless Provisio nodes can serve one instance.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    Row,
    postgres::{PgPool, PgPoolOptions, PgRow},
};

use crate::{Collection, Document, Operation, Precondition, Result, Store, StoreError, new_etag, unix_now};

/// PostgreSQL-backed [`Store`].
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:pass@host:port/db?sslmode=…`) and applies the
    /// migrations. sqlx takes a PostgreSQL advisory lock while migrating, so nodes that
    /// start together do not race.
    ///
    /// # Errors
    /// If the database cannot be reached or migrated.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(300))
            .connect(url)
            .await
            .map_err(|e| StoreError::Backend(format!("cannot connect to PostgreSQL: {e}")))?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        Ok(Self { pool })
    }

    async fn exists(&self, c: Collection, id: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM documents WHERE collection = $1 AND id = $2")
            .bind(c.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }
}

fn doc(row: &PgRow) -> Result<Document> {
    Ok(Document { id: row.try_get("id")?, etag: row.try_get("etag")?, body: row.try_get("body")? })
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, c: Collection, id: &str) -> Result<Option<Document>> {
        sqlx::query("SELECT id, etag, body FROM documents WHERE collection = $1 AND id = $2")
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
            sqlx::query("SELECT collection, id, etag, body FROM documents WHERE id = $1 AND collection IN ($2, $3)")
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
        let affected = q.execute(&self.pool).await?.rows_affected();
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
            None => sqlx::query("DELETE FROM documents WHERE collection = $1 AND id = $2")
                .bind(c.as_str())
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected(),
            Some(etag) => sqlx::query("DELETE FROM documents WHERE collection = $1 AND id = $2 AND etag = $3")
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
            sqlx::query("SELECT id, etag, body FROM documents WHERE collection = $1 AND id > $2 ORDER BY id LIMIT $3")
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
        let etag = new_etag();
        let now = unix_now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO documents (collection, id, etag, body, created_at, updated_at, tag)
             VALUES ($1, $2, $3, $4, $5, $5, $6)
             ON CONFLICT (collection, id) DO UPDATE
             SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at, tag = excluded.tag",
        )
        .bind(Collection::Registrations.as_str())
        .bind(registration_id)
        .bind(&etag)
        .bind(body)
        .bind(now)
        .bind(tag)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO operations (id, registration_id, registration_etag, registration_body, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(operation_id)
        .bind(registration_id)
        .bind(&etag)
        .bind(body)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Document { id: registration_id.to_owned(), etag, body: body.to_owned() })
    }

    async fn list_by_tag(&self, c: Collection, tag: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let rows = sqlx::query(
            "SELECT id, etag, body FROM documents WHERE collection = $1 AND tag = $2 AND id > $3 ORDER BY id LIMIT $4",
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
            "SELECT id, registration_id, registration_etag, registration_body, created_at FROM operations WHERE id = $1",
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
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (collection, id) DO UPDATE SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at",
            )
            .bind(c.as_str()).bind(id).bind(new_etag()).bind(body).bind(now)
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
        Ok(sqlx::query("DELETE FROM operations WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
