//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! Two paths, chosen so that the common requests cost no thread hand-off:
//! - **Reads** run on the caller's thread, on a connection taken from a small pool of
//!   read connections (WAL lets them read while the writer commits). A point read by
//!   primary key takes microseconds; handing it to another thread and waking the caller
//!   afterwards cost more than the read itself (a third of the server's CPU under load,
//!   when reads went through a driver's per-connection worker thread).
//! - **Writes** go to one writer thread that owns the only write connection. It takes
//!   every queued write, runs each under its own savepoint (a failing write undoes only
//!   itself) and commits them together: one fsync per batch instead of one per write
//!   (group commit), and no `SQLITE_BUSY` between writers of this process. A
//!   registration's write, which refuses only before it changes anything, skips the
//!   savepoint (see [`Undo::Batch`]).
//!
//! A private in-memory database has a single connection, so there its reads also go
//! through the writer thread.
//!
//! A store that holds the database's lock file (`{database}.lock`: one server per embedded
//! database) also keeps a [`KeyFilter`] of the keys that may exist, and answers a lookup of
//! any other key without reading the database (see [`crate::keyfilter`]).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Collection, Document, Operation, Precondition, RegistrationWrite, Result, Store, StoreError, keyfilter::KeyFilter,
    new_etag, unix_now,
};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;
/// Writes that may wait for the writer before callers wait to queue.
const QUEUE: usize = 4096;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 16;
/// How long a connection waits for a lock held by another process (a CLI command).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema, in order; applied once each, tracked in `PRAGMA user_version`.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_initial.sql")),
    (2, include_str!("../migrations/sqlite/0002_tags.sql")),
    (3, include_str!("../migrations/sqlite/0003_state.sql")),
];

/// Runs after its batch commits (or fails to): `None` on success, else why the commit failed.
type Done = Box<dyn FnOnce(Option<&str>) + Send>;
/// A unit of work for the writer thread, given the connection or why there is no
/// transaction to run in. Returns whether it succeeded (else its changes are undone) and
/// what to do once the batch is committed.
type Work = Box<dyn FnOnce(std::result::Result<&Connection, &str>) -> (bool, Done) + Send>;

/// How a unit's changes are undone when it fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Undo {
    /// Under a savepoint of its own: a failing unit undoes only itself.
    Savepoint,
    /// Without a savepoint, for a unit that refuses before it changes anything (its
    /// expected failures are checks made first). If it fails after changing the
    /// database after all (an I/O error, a full disk), its whole batch is undone and
    /// every unit in it fails. A savepoint costs a copy of every page the unit touches
    /// (the sub-journal): a fifth of the writer's work for a registration.
    Batch,
}

/// A unit of work and how it is undone.
struct Unit {
    undo: Undo,
    work: Work,
}

/// Messages to the writer thread.
enum Msg {
    Work(Unit),
    /// Commit what is queued, close the connection and stop; the reply says it has.
    Close(oneshot::Sender<()>),
}

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` for an in-memory database: its reads go through the writer.
    path: Option<PathBuf>,
    readers: Mutex<Vec<Connection>>,
    writer: mpsc::Sender<Msg>,
    /// Set by [`Store::close`]: reads are refused from then on.
    closed: std::sync::atomic::AtomicBool,
    /// Another store holds the database's lock file.
    locked_elsewhere: bool,
    /// The keys that may exist; only while no other process can write the database.
    filter: Option<Arc<KeyFilter>>,
    /// Where filter builds run.
    runtime: tokio::runtime::Handle,
    /// Point reads that reached the database (tests).
    #[cfg(test)]
    reads: std::sync::atomic::AtomicU64,
}

/// The state of a database's lock file (`{database}.lock`).
#[derive(Debug)]
enum Lock {
    /// This store holds it. The writer thread keeps it and lets go once its last write has
    /// committed (at [`Store::close`], when the store is dropped, or when the process ends),
    /// so that a next server's filter scan sees every write of this one.
    Held(std::fs::File),
    /// Another store holds it, in this process or another: a server is using the database.
    HeldElsewhere,
    /// The file system does not lock, or the lock file cannot be made.
    Unavailable,
}

/// Takes the lock file of the database at `path` if nobody holds it.
fn take_lock(path: &Path) -> Lock {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let file = match std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&name) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %Path::new(&name).display(), error = %e, "cannot create the database's lock file");
            return Lock::Unavailable;
        }
    };
    match file.try_lock() {
        Ok(()) => Lock::Held(file),
        Err(std::fs::TryLockError::WouldBlock) => Lock::HeldElsewhere,
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(path = %Path::new(&name).display(), error = %e, "cannot lock the database's lock file");
            Lock::Unavailable
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

fn stopped() -> StoreError {
    StoreError::Backend(
        "the database writer did not answer (the store is closed, or the write failed: see the log)".into(),
    )
}

/// Opens a connection with the settings every connection of the store shares.
fn connect(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Brings the schema up to date. A database made by earlier versions (whose migrations
/// were tracked by sqlx in `_sqlx_migrations`) continues from what that table records; one
/// made by a newer version is refused rather than used with a schema this one does not know.
fn migrate(conn: &mut Connection) -> Result<()> {
    let mut version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        let sqlx: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
            [],
            |r| r.get(0),
        )?;
        if sqlx {
            version =
                conn.query_row("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success = 1", [], |r| {
                    r.get(0)
                })?;
            conn.pragma_update(None, "user_version", version)?;
        }
    }
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if version > known {
        return Err(StoreError::Backend(format!(
            "the database was made by a newer version of Provisio (schema {version}; this one knows up to {known})"
        )));
    }
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|e| StoreError::Backend(format!("migration {v} failed: {e}")))?;
        tx.pragma_update(None, "user_version", v)?;
        tx.commit()?;
    }
    Ok(())
}

/// The longest a batch waits for company (see [`write_loop`]).
const MAX_COMMIT_DELAY: Duration = Duration::from_millis(1);

/// The writer thread: commits queued work in batches until the store closes or every
/// handle is gone.
///
/// Group commit with a self-tuning delay: when the previous batch held more than one write
/// (others are writing too), a new batch waits up to half the previous commit's duration
/// (at most [`MAX_COMMIT_DELAY`]) for more writes before it commits, so that one commit
/// and its `fsync` serve more of them. A lone writer never waits. Measured with
/// `provisio-bench`: 5–9% less server CPU per registration and a higher rate, for a
/// fraction of a millisecond of latency under load.
fn write_loop(conn: Connection, mut rx: mpsc::Receiver<Msg>, lock: Lock) {
    let mut closing = None;
    let (mut last_len, mut last_commit) = (0, Duration::ZERO);
    while closing.is_none() {
        let Some(first) = rx.blocking_recv() else { break };
        let mut batch = Vec::new();
        match first {
            Msg::Work(w) => batch.push(w),
            Msg::Close(reply) => closing = Some(reply),
        }
        let mut waited = last_len < 2;
        while closing.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Work(w)) => batch.push(w),
                Ok(Msg::Close(reply)) => closing = Some(reply),
                Err(_) if !waited => {
                    waited = true;
                    std::thread::sleep((last_commit / 2).min(MAX_COMMIT_DELAY));
                }
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            last_len = batch.len();
            let started = std::time::Instant::now();
            run_batch(&conn, batch);
            last_commit = started.elapsed();
        }
    }
    // Closing checkpoints the WAL into the database file. Writes queued after the close
    // are refused (their replies drop with the queue) before the closer hears it is done.
    drop(conn);
    drop(rx);
    if let Lock::Held(file) = lock {
        let _ = file.unlock();
    }
    if let Some(reply) = closing {
        let _ = reply.send(());
    }
}

/// Runs a batch in one transaction, each unit under its own savepoint unless it is
/// [`Undo::Batch`], then reports the commit's outcome to every unit.
fn run_batch(conn: &Connection, batch: Vec<Unit>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let why = format!("could not begin a transaction: {e}");
        tracing::error!(error = %e, "the database could not begin a transaction");
        for unit in batch {
            let (_, d) = (unit.work)(Err(&why));
            d(None);
        }
        return;
    }
    let mut done = Vec::with_capacity(batch.len());
    let mut units = batch.into_iter();
    let mut aborted = None;
    for Unit { undo, work } in units.by_ref() {
        if undo == Undo::Savepoint
            && let Err(e) = conn.prepare_cached("SAVEPOINT unit").and_then(|mut s| s.execute([]))
        {
            let (_, d) = work(Err(&format!("could not open a savepoint: {e}")));
            done.push(d);
            continue;
        }
        let changes = conn.total_changes();
        // A panicking unit must not take the writer (and every later write) down with it: its
        // caller's reply is dropped with it, which the caller reports as a store error.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(Ok(conn))));
        let failed = !matches!(ran, Ok((true, _)));
        match undo {
            // A unit that failed undoes its own changes and only those.
            Undo::Savepoint => {
                if failed {
                    let _ = conn.execute_batch("ROLLBACK TO unit");
                }
                let _ = conn.prepare_cached("RELEASE unit").and_then(|mut s| s.execute([]));
            }
            // SQLite may have rolled the transaction back itself (I/O error, full disk).
            Undo::Batch if failed && (conn.total_changes() != changes || conn.is_autocommit()) => {
                aborted = Some("a write failed after changing the database; its batch was undone".to_owned());
            }
            Undo::Batch => {}
        }
        match ran {
            Ok((_, d)) => done.push(d),
            Err(_) => tracing::error!("a database write panicked; its changes were undone"),
        }
        if aborted.is_some() {
            break;
        }
    }
    if let Some(why) = aborted {
        tracing::error!("{why}");
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for unit in units {
            let (_, d) = (unit.work)(Err(&why));
            done.push(d);
        }
        for d in done {
            d(Some(&why));
        }
        return;
    }
    let commit = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
    if commit.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    let why = commit.err();
    for d in done {
        d(why.as_deref());
    }
}

fn doc(r: &rusqlite::Row<'_>) -> rusqlite::Result<Document> {
    Ok(Document { id: r.get(0)?, etag: r.get(1)?, body: r.get(2)? })
}

fn exists(conn: &Connection, c: Collection, id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM documents WHERE collection = ?1 AND id = ?2")?
        .query_row(params![c.as_str(), id], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
}

fn get(conn: &Connection, c: Collection, id: &str) -> rusqlite::Result<Option<Document>> {
    conn.prepare_cached("SELECT id, etag, body FROM documents WHERE collection = ?1 AND id = ?2")?
        .query_row(params![c.as_str(), id], doc)
        .optional()
}

/// A write inside a unit: the etag mismatch and not-found cases are told apart in the
/// same transaction as the write, so they cannot race with another writer.
fn put(conn: &Connection, c: Collection, id: &str, body: &str, pre: &Precondition) -> Result<Document> {
    let etag = new_etag();
    let now = unix_now();
    let affected = match pre {
        Precondition::CreateOnly => conn
            .prepare_cached(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (collection, id) DO NOTHING",
            )?
            .execute(params![c.as_str(), id, etag, body, now])?,
        Precondition::Any => conn
            .prepare_cached(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (collection, id) DO UPDATE
                 SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at",
            )?
            .execute(params![c.as_str(), id, etag, body, now])?,
        Precondition::IfMatch(expected) => conn
            .prepare_cached(
                "UPDATE documents SET etag = ?1, body = ?2, updated_at = ?3
                 WHERE collection = ?4 AND id = ?5 AND etag = ?6",
            )?
            .execute(params![etag, body, now, c.as_str(), id, expected])?,
    };
    if affected == 0 {
        return Err(match pre {
            Precondition::CreateOnly => StoreError::Conflict,
            _ if exists(conn, c, id)? => StoreError::PreconditionFailed,
            _ => StoreError::NotFound,
        });
    }
    Ok(Document { id: id.to_owned(), etag, body: body.to_owned() })
}

fn list(
    conn: &Connection,
    c: Collection,
    tag: Option<&str>,
    after: Option<&str>,
    limit: u32,
) -> rusqlite::Result<Vec<Document>> {
    let after = after.unwrap_or("");
    match tag {
        None => conn
            .prepare_cached(
                "SELECT id, etag, body FROM documents WHERE collection = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?
            .query_map(params![c.as_str(), after, limit], doc)?
            .collect(),
        Some(tag) => conn
            .prepare_cached(
                "SELECT id, etag, body FROM documents WHERE collection = ?1 AND tag = ?2 AND id > ?3
                 ORDER BY id LIMIT ?4",
            )?
            .query_map(params![c.as_str(), tag, after, limit], doc)?
            .collect(),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies migrations.
    ///
    /// # Errors
    /// If the file cannot be opened or migrated.
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_owned();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let mut conn = connect(&p, OpenFlags::default())?;
            // WAL: readers do not block the writer nor it them. FULL: an acknowledged
            // commit survives power loss, not only a process crash.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", true)?;
            migrate(&mut conn)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))??;
        let lock = take_lock(&path);
        // Only a store that no other process can write behind its back may trust a filter
        // of the keys it has seen; it is built by a scan, in the background.
        let filter = matches!(lock, Lock::Held(_)).then(|| Arc::new(KeyFilter::new()));
        let store = Self::start(conn, Some(path), lock, filter)?;
        store.spawn_filter_build();
        Ok(store)
    }

    /// Opens a private in-memory database (tests).
    ///
    /// # Errors
    /// If SQLite fails.
    pub async fn in_memory() -> Result<Self> {
        let mut conn = Connection::open_in_memory()?;
        migrate(&mut conn)?;
        // Private and new: no document exists yet, and nobody else can add one.
        Self::start(conn, None, Lock::Unavailable, Some(Arc::new(KeyFilter::empty())))
    }

    fn start(conn: Connection, path: Option<PathBuf>, lock: Lock, filter: Option<Arc<KeyFilter>>) -> Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let locked_elsewhere = matches!(lock, Lock::HeldElsewhere);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(conn, rx, lock))
            .map_err(|e| StoreError::Backend(format!("cannot start the database writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                readers: Mutex::new(Vec::new()),
                writer: tx,
                closed: std::sync::atomic::AtomicBool::new(false),
                locked_elsewhere,
                filter,
                runtime: tokio::runtime::Handle::current(),
                #[cfg(test)]
                reads: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Whether another store holds the database's lock file: a server (in this process or
    /// another) is using it. A server refuses to start on such a database.
    #[must_use]
    pub fn is_locked_elsewhere(&self) -> bool {
        self.inner.locked_elsewhere
    }

    /// Whether lookups of absent keys are answered without reading the database (the key
    /// filter is built). For tests and diagnostics.
    #[must_use]
    pub fn filters_lookups(&self) -> bool {
        self.inner.filter.as_ref().is_some_and(|f| f.is_built())
    }

    /// Writes queued for the writer thread and not taken by it yet (tests wait on this
    /// instead of sleeping).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.inner.writer.max_capacity() - self.inner.writer.capacity()
    }

    /// One document from the database, the key filter already consulted.
    async fn read_one(&self, c: Collection, id: &str) -> Result<Option<Document>> {
        let id = id.to_owned();
        self.read(move |conn| get(conn, c, &id)).await
    }

    /// False if no document `c`/`id` can exist (the key filter says it was never written).
    /// True on a closed store, whose reads answer that it is closed.
    fn may_exist(&self, c: Collection, id: &str) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
            || self.inner.filter.as_ref().is_none_or(|f| f.may_contain(c, id))
    }

    /// Called by the writer thread before a write that may create `c`/`id`: from now on a
    /// lookup of it reads the database.
    fn will_write(&self, c: Collection, id: &str) {
        if let Some(f) = &self.inner.filter
            && f.add(c, id)
        {
            self.spawn_filter_build();
        }
    }

    /// Builds the key filter anew in the background, from a scan of every document's key.
    fn spawn_filter_build(&self) {
        let Some(filter) = self.inner.filter.clone() else { return };
        let store = self.clone();
        self.inner.runtime.spawn(async move {
            let started = std::time::Instant::now();
            let counted = store
                .read_many(|conn| conn.query_row("SELECT count(*) FROM documents", [], |r| r.get::<_, i64>(0)))
                .await;
            // A store that cannot count its documents is closed or failing: it keeps the
            // filter it has (still exact, only fuller) and asks for no further rebuild.
            let Ok(count) = counted else { return };
            if !filter.begin_build(u64::try_from(count).unwrap_or(0)) {
                return;
            }
            // Every write queued before the build began adds its key to the old filter only;
            // once this empty write's batch has committed, all of them are in the snapshot
            // the scan reads, and every later one adds its key to the new filter as well.
            let scanned = match store.write(|_| Ok(())).await {
                Ok(()) => {
                    let (f, s) = (filter.clone(), store.clone());
                    store
                        .read_many(move |conn| {
                            let mut stmt = conn.prepare("SELECT collection, id FROM documents")?;
                            let mut rows = stmt.query([])?;
                            while let Some(r) = rows.next()? {
                                // A closing store stops scanning: the build is abandoned.
                                if s.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
                                    return Ok(false);
                                }
                                let (c, id) = (r.get_ref(0)?.as_str()?, r.get_ref(1)?.as_str()?);
                                f.add_built(c, id);
                            }
                            Ok(true)
                        })
                        .await
                }
                Err(e) => Err(e),
            };
            match scanned {
                Ok(false) => filter.abandon_build(),
                Ok(true) => {
                    filter.finish_build();
                    let ms = started.elapsed().as_millis();
                    tracing::info!(
                        keys = count,
                        ms,
                        "the store's key filter is built: lookups of absent documents skip the database"
                    );
                }
                Err(e) => {
                    filter.abandon_build();
                    if !store.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
                        tracing::warn!(error = %e, "could not build the store's key filter: lookups read the database");
                    }
                }
            }
        });
    }

    /// Runs `f` in the writer's next batch under a savepoint of its own; answers once that
    /// batch is committed.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_with(Undo::Savepoint, f).await
    }

    /// [`SqliteStore::write`], undone as `undo` says if it fails.
    async fn write_with<T, F>(&self, undo: Undo, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => f(conn),
                Err(why) => Err(StoreError::Backend(why.to_owned())),
            };
            let ok = result.is_ok();
            let done: Done = Box::new(move |commit_failed: Option<&str>| {
                let result = match commit_failed {
                    Some(why) => Err(StoreError::Backend(format!("commit failed: {why}"))),
                    None => result,
                };
                let _ = reply.send(result);
            });
            (ok, done)
        });
        self.inner.writer.send(Msg::Work(Unit { undo, work })).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs a short read on this thread with a pooled read connection (see the module
    /// documentation for why not on another thread).
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        #[cfg(test)]
        self.inner.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(path) = &self.inner.path else {
            return self.write(move |conn| Ok(f(conn)?)).await;
        };
        let conn = self.reader(path)?;
        let result = f(&conn);
        self.give_back(conn);
        Ok(result?)
    }

    /// Runs a read that may touch many rows on a blocking thread.
    async fn read_many<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        if self.inner.path.is_none() {
            return self.read(f).await;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let path = this.inner.path.as_deref().ok_or_else(stopped)?;
            let conn = this.reader(path)?;
            let result = f(&conn);
            this.give_back(conn);
            Ok(result?)
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    fn reader(&self, path: &Path) -> Result<Connection> {
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) || self.inner.writer.is_closed() {
            return Err(stopped());
        }
        let pooled = self.inner.readers.lock().map_err(|_| stopped())?.pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => Ok(connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?),
        }
    }

    fn give_back(&self, conn: Connection) {
        if let Ok(mut idle) = self.inner.readers.lock()
            && idle.len() < MAX_IDLE_READERS
        {
            idle.push(conn);
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, c: Collection, id: &str) -> Result<Option<Document>> {
        if !self.may_exist(c, id) {
            return Ok(None);
        }
        self.read_one(c, id).await
    }

    async fn get_both(&self, a: Collection, b: Collection, id: &str) -> Result<(Option<Document>, Option<Document>)> {
        match (self.may_exist(a, id), self.may_exist(b, id)) {
            (false, false) => return Ok((None, None)),
            (true, false) => return Ok((self.read_one(a, id).await?, None)),
            (false, true) => return Ok((None, self.read_one(b, id).await?)),
            (true, true) => {}
        }
        let id = id.to_owned();
        self.read(move |conn| {
            // Two point lookups, not `collection IN (?2, ?3)`: SQLite answers an IN list of
            // bound values by building a temporary b-tree of them on every execution (its
            // own page cache, mallocs and mutexes), which cost more than both lookups.
            let mut stmt = conn.prepare_cached(
                "SELECT id, etag, body, collection FROM documents WHERE collection = ?2 AND id = ?1
                 UNION ALL
                 SELECT id, etag, body, collection FROM documents WHERE collection = ?3 AND id = ?1",
            )?;
            let mut rows = stmt.query(params![id, a.as_str(), b.as_str()])?;
            let (mut first, mut second) = (None, None);
            while let Some(r) = rows.next()? {
                let c: String = r.get(3)?;
                if c == a.as_str() {
                    first = Some(doc(r)?);
                } else if c == b.as_str() {
                    second = Some(doc(r)?);
                }
            }
            Ok((first, second))
        })
        .await
    }

    async fn put(&self, c: Collection, id: &str, body: &str, pre: Precondition) -> Result<Document> {
        let (id, body, this) = (id.to_owned(), body.to_owned(), self.clone());
        self.write(move |conn| {
            this.will_write(c, &id);
            put(conn, c, &id, &body, &pre)
        })
        .await
    }

    async fn insert_if_absent(&self, c: Collection, id: &str, body: &str) -> Result<Document> {
        let (id, body, this) = (id.to_owned(), body.to_owned(), self.clone());
        self.write(move |conn| {
            this.will_write(c, &id);
            match put(conn, c, &id, &body, &Precondition::CreateOnly) {
                Err(StoreError::Conflict) => get(conn, c, &id)?.ok_or(StoreError::NotFound),
                other => other,
            }
        })
        .await
    }

    async fn delete(&self, c: Collection, id: &str, if_match: Option<&str>) -> Result<()> {
        let (id, if_match) = (id.to_owned(), if_match.map(str::to_owned));
        self.write(move |conn| {
            let affected = match &if_match {
                None => conn
                    .prepare_cached("DELETE FROM documents WHERE collection = ?1 AND id = ?2")?
                    .execute(params![c.as_str(), id])?,
                Some(etag) => conn
                    .prepare_cached("DELETE FROM documents WHERE collection = ?1 AND id = ?2 AND etag = ?3")?
                    .execute(params![c.as_str(), id, etag])?,
            };
            if affected == 0 {
                return Err(if if_match.is_some() && exists(conn, c, &id)? {
                    StoreError::PreconditionFailed
                } else {
                    StoreError::NotFound
                });
            }
            Ok(())
        })
        .await
    }

    async fn list(&self, c: Collection, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let after = after.map(str::to_owned);
        self.read_many(move |conn| list(conn, c, None, after.as_deref(), limit)).await
    }

    async fn record_registration(&self, w: &RegistrationWrite<'_>) -> Result<Document> {
        let (registration_id, body) = (w.registration_id.to_owned(), w.body.to_owned());
        let (tag, state) = (w.tag.map(str::to_owned), w.state.map(str::to_owned));
        let (operation_id, this) = (w.operation_id.to_owned(), self.clone());
        // No savepoint: the one refusal (a taken operation id) comes before any change.
        self.write_with(Undo::Batch, move |conn| {
            this.will_write(Collection::Registrations, &registration_id);
            let now = unix_now();
            let etag = new_etag();
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO operations (id, registration_id, registration_etag, registration_body, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
                )?
                .execute(params![operation_id, registration_id, etag, body, now])?;
            if inserted == 0 {
                return Err(StoreError::Conflict);
            }
            conn.prepare_cached(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at, tag, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)
                 ON CONFLICT (collection, id) DO UPDATE
                 SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at,
                     tag = excluded.tag, state = excluded.state",
            )?
            .execute(params![
                Collection::Registrations.as_str(),
                registration_id,
                etag,
                body,
                now,
                tag,
                state
            ])?;
            Ok(Document { id: registration_id, etag, body })
        })
        .await
    }

    async fn count(&self, c: Collection) -> Result<u64> {
        self.read_many(move |conn| {
            conn.prepare_cached("SELECT count(*) FROM documents WHERE collection = ?1")?
                .query_row(params![c.as_str()], |r| r.get::<_, i64>(0))
        })
        .await
        .map(|n| u64::try_from(n).unwrap_or(0))
    }

    async fn count_by_state(&self, c: Collection) -> Result<Vec<(String, u64)>> {
        self.read_many(move |conn| {
            conn.prepare_cached(
                "SELECT state, count(*) FROM documents WHERE collection = ?1 AND state IS NOT NULL
                 GROUP BY state ORDER BY state",
            )?
            .query_map(params![c.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0)))
            })?
            .collect()
        })
        .await
    }

    async fn list_prefix(&self, c: Collection, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let (start, end) = (prefix.to_owned(), crate::prefix_end(prefix));
        // One lower bound, not two: SQLite seeks the index on one of them and filters by
        // the other, which made a page deep in a large collection scan every row before it.
        let after = after.filter(|a| *a >= prefix).map(str::to_owned);
        self.read_many(move |conn| match after {
            Some(after) => conn
                .prepare_cached(
                    "SELECT id, etag, body FROM documents WHERE collection = ?1 AND id > ?2 AND id < ?3
                     ORDER BY id LIMIT ?4",
                )?
                .query_map(params![c.as_str(), after, end, limit], doc)?
                .collect(),
            None => conn
                .prepare_cached(
                    "SELECT id, etag, body FROM documents WHERE collection = ?1 AND id >= ?2 AND id < ?3
                     ORDER BY id LIMIT ?4",
                )?
                .query_map(params![c.as_str(), start, end, limit], doc)?
                .collect(),
        })
        .await
    }

    async fn list_by_tag(&self, c: Collection, tag: &str, after: Option<&str>, limit: u32) -> Result<Vec<Document>> {
        let (tag, after) = (tag.to_owned(), after.map(str::to_owned));
        self.read_many(move |conn| list(conn, c, Some(&tag), after.as_deref(), limit)).await
    }

    async fn get_operation(&self, id: &str) -> Result<Option<Operation>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, registration_id, registration_etag, registration_body, created_at
                 FROM operations WHERE id = ?1",
            )?
            .query_row(params![id], |r| {
                Ok(Operation {
                    id: r.get(0)?,
                    registration_id: r.get(1)?,
                    registration_etag: r.get(2)?,
                    registration_body: r.get(3)?,
                    created_at: r.get(4)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn purge_operations(&self, before: i64) -> Result<u64> {
        self.write(move |conn| {
            let n = conn.prepare_cached("DELETE FROM operations WHERE created_at < ?1")?.execute(params![before])?;
            Ok(n as u64)
        })
        .await
    }

    async fn trim(&self, c: Collection, keep: u32) -> Result<u64> {
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM documents WHERE collection = ?1 AND id IN (
                         SELECT id FROM documents WHERE collection = ?1
                         ORDER BY updated_at DESC, id DESC LIMIT -1 OFFSET ?2)",
                )?
                .execute(params![c.as_str(), keep])?;
            Ok(n as u64)
        })
        .await
    }

    async fn import(&self, c: Collection, docs: &[(String, String)]) -> Result<()> {
        let (docs, this) = (docs.to_vec(), self.clone());
        self.write(move |conn| {
            for (id, _) in &docs {
                this.will_write(c, id);
            }
            let now = unix_now();
            let mut stmt = conn.prepare_cached(
                "INSERT INTO documents (collection, id, etag, body, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (collection, id) DO UPDATE
                 SET etag = excluded.etag, body = excluded.body, updated_at = excluded.updated_at",
            )?;
            for (id, body) in &docs {
                stmt.execute(params![c.as_str(), id, new_etag(), body, now])?;
            }
            Ok(())
        })
        .await
    }

    async fn close(&self) {
        self.inner.closed.store(true, std::sync::atomic::Ordering::Release);
        if let Ok(mut idle) = self.inner.readers.lock() {
            idle.clear();
        }
        let (reply, done) = oneshot::channel();
        if self.inner.writer.send(Msg::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_database_made_by_earlier_versions_opens_with_its_data() {
        // Earlier versions ran the same migrations through sqlx, which recorded them in
        // `_sqlx_migrations` and left `user_version` at 0.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0].1).unwrap();
            conn.execute_batch(MIGRATIONS[1].1).unwrap();
            conn.execute_batch(
                "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
                   installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
                   checksum BLOB NOT NULL, execution_time BIGINT NOT NULL);
                 INSERT INTO _sqlx_migrations VALUES (1, 'initial', CURRENT_TIMESTAMP, 1, x'00', 1);
                 INSERT INTO _sqlx_migrations VALUES (2, 'tags', CURRENT_TIMESTAMP, 1, x'00', 1);
                 INSERT INTO documents (collection, id, etag, body, created_at, updated_at, tag)
                   VALUES ('enrollments', 'dev1', 'e1', '{\"v\":1}', 1, 1, NULL);",
            )
            .unwrap();
        }
        // Re-running a migration would fail ("table documents already exists").
        let s = SqliteStore::open(&path).await.unwrap();
        let d = s.get(Collection::Enrollments, "dev1").await.unwrap().unwrap();
        assert_eq!((d.etag.as_str(), d.body.as_str()), ("e1", "{\"v\":1}"));
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "dev1",
            body: "{}",
            tag: Some("g"),
            state: None,
            operation_id: "op1",
        })
        .await
        .unwrap();
        s.close().await;
        let version: i64 = Connection::open(&path).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        // It went on from the sqlx-recorded version 2 to the latest.
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
        // And a fresh database is created at the latest version.
        let fresh = dir.path().join("fresh.sqlite");
        SqliteStore::open(&fresh).await.unwrap().close().await;
        let version: i64 =
            Connection::open(&fresh).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn a_database_made_by_a_newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path).await.unwrap().close().await;
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteStore::open(&path).await.unwrap_err().to_string();
        assert!(err.contains("newer version") && err.contains("99"), "{err}");
    }

    /// Holds the writer (inside a write it has taken) until the returned sender sends, so
    /// that what is queued meanwhile lands in one batch.
    async fn hold_writer(s: &SqliteStore) -> (tokio::task::JoinHandle<Result<()>>, std::sync::mpsc::Sender<()>) {
        let (held, release) = std::sync::mpsc::channel::<()>();
        let (entered, inside) = oneshot::channel::<()>();
        let hold = tokio::spawn({
            let s = s.clone();
            async move {
                s.write(move |_| {
                    let _ = entered.send(());
                    let _ = release.recv_timeout(Duration::from_secs(5));
                    Ok(())
                })
                .await
            }
        });
        tokio::time::timeout(Duration::from_secs(5), inside).await.unwrap().unwrap();
        (hold, held)
    }

    /// Waits until `n` writes (at least) are queued behind the held writer.
    async fn queued(s: &SqliteStore, n: usize) {
        for _ in 0..500 {
            if s.queued() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} writes queued after 5 s, not {n}", s.queued());
    }

    /// Queues creates of `dev{i}` for each `i` in `ids` (one batch while the writer is held).
    fn creates(s: &SqliteStore, ids: std::ops::Range<usize>) -> Vec<tokio::task::JoinHandle<Result<Document>>> {
        ids.map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put(Collection::Enrollments, &format!("dev{i}"), "{}", Precondition::CreateOnly).await
            })
        })
        .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_undoes_only_itself_within_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let (hold, held) = hold_writer(&s).await;
        let failing = tokio::spawn({
            let s = s.clone();
            async move {
                s.write(|conn| {
                    put(conn, Collection::Enrollments, "half", "{}", &Precondition::Any)?;
                    Err::<(), _>(StoreError::Backend("second step failed".into()))
                })
                .await
            }
        });
        // dev1..dev19 once each, dev0 twice (two racing creates).
        let mut others = creates(&s, 0..20);
        others.extend(creates(&s, 0..1));
        queued(&s, 22).await;
        held.send(()).unwrap();
        hold.await.unwrap().unwrap();
        assert!(matches!(failing.await.unwrap(), Err(StoreError::Backend(_))));
        let (mut ok, mut conflicts) = (0, 0);
        for o in others {
            match o.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::Conflict) => conflicts += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        // One of dev0's creates is refused and nothing else is harmed.
        assert_eq!((ok, conflicts), (20, 1));
        assert!(s.get(Collection::Enrollments, "half").await.unwrap().is_none(), "the failed unit's write is undone");
        assert_eq!(s.list(Collection::Enrollments, None, 100).await.unwrap().len(), 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_without_savepoint_that_refuses_first_harms_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "dev",
            body: "{}",
            tag: None,
            state: None,
            operation_id: "op-1",
        })
        .await
        .unwrap();
        let (hold, held) = hold_writer(&s).await;
        let before = creates(&s, 0..10);
        // The operation id is taken: refused before any change, so nothing else is undone.
        let taken = tokio::spawn({
            let s = s.clone();
            async move {
                s.record_registration(&crate::RegistrationWrite {
                    registration_id: "dev",
                    body: "{\"second\":1}",
                    tag: None,
                    state: None,
                    operation_id: "op-1",
                })
                .await
            }
        });
        let fresh = tokio::spawn({
            let s = s.clone();
            async move {
                s.record_registration(&crate::RegistrationWrite {
                    registration_id: "dev2",
                    body: "{}",
                    tag: Some("g"),
                    state: None,
                    operation_id: "op-2",
                })
                .await
            }
        });
        let after = creates(&s, 10..20);
        queued(&s, 22).await;
        held.send(()).unwrap();
        hold.await.unwrap().unwrap();
        assert!(matches!(taken.await.unwrap(), Err(StoreError::Conflict)));
        fresh.await.unwrap().unwrap();
        for c in before.into_iter().chain(after) {
            c.await.unwrap().unwrap();
        }
        assert_eq!(s.list(Collection::Enrollments, None, 100).await.unwrap().len(), 20);
        assert_eq!(s.get(Collection::Registrations, "dev").await.unwrap().unwrap().body, "{}");
        assert!(s.get_operation("op-2").await.unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_without_savepoint_failing_after_a_change_undoes_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        s.put(Collection::Meta, "kept", "{}", Precondition::Any).await.unwrap();
        let (hold, held) = hold_writer(&s).await;
        let before = creates(&s, 0..10);
        let failing = tokio::spawn({
            let s = s.clone();
            async move {
                s.write_with(Undo::Batch, |conn| {
                    put(conn, Collection::Enrollments, "half", "{}", &Precondition::Any)?;
                    Err::<(), _>(StoreError::Backend("second step failed".into()))
                })
                .await
            }
        });
        // The failing unit comes after the first ten in the batch, the next ten after it.
        queued(&s, 11).await;
        let after = creates(&s, 10..20);
        queued(&s, 21).await;
        held.send(()).unwrap();
        hold.await.unwrap().unwrap();
        assert!(matches!(failing.await.unwrap(), Err(StoreError::Backend(_))));
        // Every unit of the batch, before and after the failing one, is told so; none is
        // reported done while undone.
        for c in before.into_iter().chain(after) {
            assert!(matches!(c.await.unwrap(), Err(StoreError::Backend(_))));
        }
        assert!(s.list(Collection::Enrollments, None, 100).await.unwrap().is_empty(), "the whole batch is undone");
        assert!(s.get(Collection::Meta, "kept").await.unwrap().is_some(), "earlier commits are untouched");
        // The writer goes on.
        s.put(Collection::Enrollments, "next", "{}", Precondition::CreateOnly).await.unwrap();
        assert!(s.get(Collection::Enrollments, "next").await.unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_is_undone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let r = s
            .write(|conn| -> Result<()> {
                put(conn, Collection::Meta, "half", "{}", &Precondition::Any)?;
                panic!("a bug in a write");
            })
            .await;
        assert!(matches!(r, Err(StoreError::Backend(_))));
        assert!(s.get(Collection::Meta, "half").await.unwrap().is_none());
        s.put(Collection::Meta, "after", "{}", Precondition::Any).await.unwrap();
        assert!(s.get(Collection::Meta, "after").await.unwrap().is_some());
    }

    /// Waits for the store's key filter to be built.
    async fn filter_built(s: &SqliteStore) {
        for _ in 0..500 {
            if s.filters_lookups() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the key filter was not built within 5 s");
    }

    fn reads(s: &SqliteStore) -> u64 {
        s.inner.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[tokio::test]
    async fn absent_keys_are_answered_without_reading_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        filter_built(&s).await;
        let (e, r) = (Collection::Enrollments, Collection::Registrations);
        let before = reads(&s);
        assert!(s.get(e, "nobody").await.unwrap().is_none());
        assert_eq!(s.get_both(e, r, "nobody").await.unwrap(), (None, None));
        assert_eq!(reads(&s), before, "no read for keys never written");
        // Every way of writing a document makes it visible at once.
        s.put(e, "put", "{}", Precondition::CreateOnly).await.unwrap();
        s.insert_if_absent(e, "inserted", "{}").await.unwrap();
        s.import(e, &[("imported".into(), "{}".into())]).await.unwrap();
        s.record_registration(&crate::RegistrationWrite {
            registration_id: "registered",
            body: "{}",
            tag: Some("g"),
            state: None,
            operation_id: "op1",
        })
        .await
        .unwrap();
        for id in ["put", "inserted", "imported"] {
            assert!(s.get(e, id).await.unwrap().is_some(), "{id}");
            assert!(s.get_both(e, r, id).await.unwrap().0.is_some(), "{id}");
        }
        let (enrollment, record) = s.get_both(e, r, "registered").await.unwrap();
        assert!(enrollment.is_none() && record.is_some());
        // Deleted and written again: found again.
        s.delete(e, "put", None).await.unwrap();
        assert!(s.get(e, "put").await.unwrap().is_none());
        s.put(e, "put", "{\"again\":1}", Precondition::Any).await.unwrap();
        assert_eq!(s.get(e, "put").await.unwrap().unwrap().body, "{\"again\":1}");
        let before = reads(&s);
        assert!(s.get(r, "put").await.unwrap().is_none(), "the collection is part of the key");
        assert_eq!(reads(&s), before);
        s.close().await;
    }

    #[tokio::test]
    async fn the_filter_holds_what_was_there_and_what_is_written_while_it_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let old: Vec<(String, String)> = (0..20_000).map(|i| (format!("old-{i}"), "{}".to_owned())).collect();
        {
            let s = SqliteStore::open(&path).await.unwrap();
            s.import(Collection::Enrollments, &old).await.unwrap();
            s.close().await;
        }
        // Writes race with the build's scan from the moment the store opens.
        let s = SqliteStore::open(&path).await.unwrap();
        let mut writers = Vec::new();
        for w in 0..8 {
            let s = s.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..50 {
                    s.record_registration(&crate::RegistrationWrite {
                        registration_id: &format!("new-{w}-{i}"),
                        body: "{}",
                        tag: None,
                        state: None,
                        operation_id: &format!("op-{w}-{i}"),
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        filter_built(&s).await;
        for (id, _) in old.iter().step_by(97) {
            assert!(s.get(Collection::Enrollments, id).await.unwrap().is_some(), "{id}");
        }
        for w in 0..8 {
            for i in 0..50 {
                let id = format!("new-{w}-{i}");
                assert!(s.get(Collection::Registrations, &id).await.unwrap().is_some(), "{id}");
            }
        }
        s.close().await;
    }

    #[tokio::test]
    async fn a_second_store_on_a_database_in_use_reads_everything_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let first = SqliteStore::open(&path).await.unwrap();
        assert!(!first.is_locked_elsewhere());
        let second = SqliteStore::open(&path).await.unwrap();
        assert!(second.is_locked_elsewhere(), "the first store holds the lock");
        // It has no filter at all (not one being built): the first one writes behind its back.
        assert!(second.inner.filter.is_none() && !second.filters_lookups());
        first.put(Collection::Enrollments, "by-first", "{}", Precondition::Any).await.unwrap();
        assert!(second.get(Collection::Enrollments, "by-first").await.unwrap().is_some());
        second.close().await;
        first.close().await;
        // Closed: the next store takes the lock.
        let third = SqliteStore::open(&path).await.unwrap();
        assert!(!third.is_locked_elsewhere());
        filter_built(&third).await;
        assert!(third.get(Collection::Enrollments, "by-first").await.unwrap().is_some());
        third.close().await;
    }

    #[tokio::test]
    async fn a_closed_store_answers_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        s.put(Collection::Meta, "x", "{}", Precondition::Any).await.unwrap();
        s.close().await;
        assert!(matches!(s.get(Collection::Meta, "x").await, Err(StoreError::Backend(_))));
        assert!(matches!(s.put(Collection::Meta, "y", "{}", Precondition::Any).await, Err(StoreError::Backend(_))));
        // Closing twice is harmless.
        s.close().await;
        let memory = SqliteStore::in_memory().await.unwrap();
        memory.close().await;
        assert!(matches!(memory.get(Collection::Meta, "x").await, Err(StoreError::Backend(_))));
    }
}
