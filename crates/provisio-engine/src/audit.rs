//! The audit log: one JSON line for every registration attempt (successful or not, with
//! its precise reason and tracking id) and for every change made through the service API.
//!
//! Each line is appended by the request that makes it, with one `write` to a file opened
//! in append mode, before the request is answered: a crash of the process loses no line of
//! an answered request. The file is rotated by size. `provisio audit` reads the files back.
//!
//! The line is written on the request's own thread, under a lock held only for that one
//! system call (a copy into the page cache, a few microseconds). A writer thread fed by a
//! channel, as before, cost two thread hand-offs per registration (waking the writer, then
//! being woken by it) and more CPU than the writes themselves (see BENCHMARKS.md).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use std::io::Write as _;

use serde::{Deserialize, Serialize};

/// What an audit line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// A device's registration attempt.
    Registration,
    /// A change through the service API.
    Service,
}

/// One audit line. Secrets never appear: no token, key or signature is ever put here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// Registration attempt or service change.
    pub kind: Kind,
    /// `register`, or the service request (`PUT /enrollments/{id}`).
    pub action: String,
    /// The registration id (registration attempts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// `https`, `mqtt` or `amqp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<IpAddr>,
    /// `symmetricKey`, `x509` or `none` (registration attempts); the policy name (service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// `assigned`, `failed`, `disabled` (registration recorded) or `refused`.
    pub result: String,
    /// HTTP-style status answered.
    pub status: u16,
    /// DPS error code, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// The precise reason (also what the device was not told).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Tracking id of the error answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_id: Option<String>,
    /// Operation id of an accepted registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// The enrollment group that matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The hub assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// The device id at the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

impl Entry {
    /// A blank entry stamped now.
    #[must_use]
    pub fn new(kind: Kind, action: impl Into<String>) -> Self {
        Self {
            time: provisio_core::timefmt::now(),
            kind,
            action: action.into(),
            registration_id: None,
            transport: None,
            peer: None,
            credential: None,
            result: String::new(),
            status: 0,
            error_code: None,
            reason: None,
            tracking_id: None,
            operation_id: None,
            enrollment_group_id: None,
            assigned_hub: None,
            device_id: None,
        }
    }
}

/// Where the log goes and when it rotates.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The current file; rotated files are `{path}.1` (newest) to `{path}.{keep}`.
    pub path: PathBuf,
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

/// The open file and its size, behind the log's lock.
#[derive(Debug)]
struct Writer {
    config: AuditConfig,
    file: std::fs::File,
    size: u64,
}

impl Writer {
    /// Appends one line (one `write`) and rotates the file once it is large enough.
    fn append(&mut self, line: &[u8]) {
        if let Err(e) = self.file.write_all(line) {
            tracing::error!(error = %e, path = %self.config.path.display(), "cannot write the audit log");
            return;
        }
        self.size += line.len() as u64;
        if self.size >= self.config.max_bytes {
            match rotate(&self.config) {
                Ok(f) => {
                    self.file = f;
                    self.size = 0;
                }
                Err(e) => tracing::error!(error = %e, "cannot rotate the audit log"),
            }
        }
    }
}

/// A handle to the audit log; cheap to clone. A disabled log drops entries.
#[derive(Clone, Debug, Default)]
pub struct AuditLog {
    writer: Option<Arc<Mutex<Writer>>>,
}

impl AuditLog {
    /// A log that records nothing (`audit_log = "off"`).
    #[must_use]
    pub fn disabled() -> Self {
        Self { writer: None }
    }

    /// Opens (creating if needed, mode 0600) the log file.
    ///
    /// # Errors
    /// If the file cannot be opened.
    pub async fn open(config: AuditConfig) -> std::io::Result<Self> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(&config.path)?;
        let size = file.metadata()?.len();
        Ok(Self { writer: Some(Arc::new(Mutex::new(Writer { config, file, size }))) })
    }

    /// Writes an entry: returns once the line is handed to the operating system, so an
    /// answer sent after it is never missing from the log, even after a kill -9.
    pub async fn record(&self, entry: &Entry) {
        let Some(writer) = &self.writer else { return };
        let mut line = match crate::to_json(entry) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "audit entry not serialisable");
                return;
            }
        };
        line.push(b'\n');
        writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).append(&line);
    }

    /// Puts what was written on disk (used at shutdown and in tests).
    pub async fn flush(&self) {
        let Some(writer) = self.writer.clone() else { return };
        let synced = tokio::task::spawn_blocking(move || {
            writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).file.sync_data()
        })
        .await;
        if let Ok(Err(e)) = synced {
            tracing::error!(error = %e, "cannot sync the audit log");
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

/// `{path}.{n}` for a rotated file.
#[must_use]
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

fn rotate(config: &AuditConfig) -> std::io::Result<std::fs::File> {
    if config.keep == 0 {
        std::fs::remove_file(&config.path)?;
    } else {
        let _ = std::fs::remove_file(rotated(&config.path, config.keep));
        for n in (1..config.keep).rev() {
            let from = rotated(&config.path, n);
            if from.try_exists().unwrap_or(false) {
                std::fs::rename(&from, rotated(&config.path, n + 1))?;
            }
        }
        std::fs::rename(&config.path, rotated(&config.path, 1))?;
    }
    open_append(&config.path)
}

/// What `provisio audit` selects.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this registration id (case-insensitive).
    pub registration_id: Option<String>,
    /// Only this tracking or operation id.
    pub tracking_id: Option<String>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only entries at or after this time (RFC 3339; compared as text, as all are UTC).
    pub since: Option<String>,
}

impl Filter {
    /// Whether an entry is selected.
    #[must_use]
    pub fn matches(&self, e: &Entry) -> bool {
        self.registration_id
            .as_ref()
            .is_none_or(|r| e.registration_id.as_ref().is_some_and(|x| x.eq_ignore_ascii_case(r)))
            && self.tracking_id.as_ref().is_none_or(|t| {
                e.tracking_id.as_deref() == Some(t.as_str()) || e.operation_id.as_deref() == Some(t.as_str())
            })
            && self.kind.is_none_or(|k| e.kind == k)
            && self.since.as_ref().is_none_or(|s| e.time.as_str() >= s.as_str())
    }
}

/// Reads the log (oldest rotated file first) and returns the selected entries in order.
/// Lines that do not parse (a torn last line after a power cut) are skipped and counted.
///
/// # Errors
/// If the current file cannot be read.
pub fn read(path: &Path, keep: u32, filter: &Filter) -> std::io::Result<(Vec<Entry>, usize)> {
    let mut files: Vec<PathBuf> = (1..=keep.max(1)).rev().map(|n| rotated(path, n)).filter(|p| p.exists()).collect();
    files.push(path.to_path_buf());
    let (mut out, mut bad) = (Vec::new(), 0);
    for f in files {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && f != path => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Entry>(line) {
                Ok(e) if filter.matches(&e) => out.push(e),
                Ok(_) => {}
                Err(_) => bad += 1,
            }
        }
    }
    Ok((out, bad))
}

/// The newest selected entries, newest first, as the console shows them.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    /// At most the limit asked for, newest first.
    pub entries: Vec<Entry>,
    /// Whether the whole log was searched (`false`: the scan budget ran out first, and
    /// older matching lines may exist; `provisio audit` reads everything).
    pub complete: bool,
}

/// Reads the log backwards from its newest line (current file, then `.1`, `.2`, …) and
/// returns up to `limit` selected entries, newest first, reading at most `max_scan` bytes:
/// a page of recent lines costs the same however large the log has grown.
///
/// # Errors
/// If a file cannot be read.
pub fn recent(path: &Path, keep: u32, filter: &Filter, limit: usize, max_scan: u64) -> std::io::Result<Recent> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    const BLOCK: u64 = 64 * 1024;
    let mut out = Recent { entries: Vec::new(), complete: true };
    let mut budget = max_scan;
    let files = std::iter::once(path.to_path_buf()).chain((1..=keep).map(|n| rotated(path, n)));
    for f in files {
        let mut file = match std::fs::File::open(&f) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut end = file.metadata()?.len();
        // Bytes of a line cut by the block boundary, kept until its start is read.
        let mut carry: Vec<u8> = Vec::new();
        while end > 0 || !carry.is_empty() {
            if budget == 0 {
                out.complete = false;
                return Ok(out);
            }
            let start = end.saturating_sub(BLOCK.min(budget));
            let mut block = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(&mut block)?;
            budget = budget.saturating_sub(end - start);
            block.extend_from_slice(&carry);
            // The first piece may be the tail of a line that starts in an earlier block.
            let (head, lines) = match (start, block.iter().position(|&b| b == b'\n')) {
                (0, _) => (Vec::new(), &block[..]),
                (_, Some(i)) => (block[..i].to_vec(), &block[i + 1..]),
                (_, None) => (block.clone(), &block[..0]),
            };
            for line in lines.rsplit(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
                if let Ok(e) = serde_json::from_slice::<Entry>(line)
                    && filter.matches(&e)
                {
                    out.entries.push(e);
                    if out.entries.len() >= limit {
                        out.complete = false;
                        return Ok(out);
                    }
                }
            }
            carry = head;
            end = start;
            if end == 0 {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(id: &str, result: &str) -> Entry {
        let mut e = Entry::new(Kind::Registration, "register");
        e.registration_id = Some(id.into());
        e.result = result.into();
        e.status = if result == "refused" { 401 } else { 202 };
        e
    }

    #[tokio::test]
    async fn lines_are_written_filtered_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditConfig { path: path.clone(), max_bytes: 2_000, keep: 2 }).await.unwrap();
        for i in 0..100 {
            log.record(&entry(&format!("dev-{}", i % 4), if i % 2 == 0 { "assigned" } else { "refused" })).await;
        }
        log.flush().await;
        assert!(rotated(&path, 1).exists(), "rotated at 2,000 bytes");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let f = Filter { registration_id: Some("DEV-1".into()), ..Filter::default() };
        let (got, bad) = read(&path, 2, &f).unwrap();
        assert_eq!(bad, 0);
        assert!(!got.is_empty());
        assert!(got.iter().all(|e| e.registration_id.as_deref() == Some("dev-1") && e.result == "refused"));
        // At most keep + 1 files: the oldest lines are gone, the newest are all there.
        assert!(!rotated(&path, 3).exists());
        let (all, _) = read(&path, 2, &Filter::default()).unwrap();
        assert!(all.len() < 100 && all.len() > 10, "{}", all.len());
        assert_eq!(all.last().unwrap().registration_id.as_deref(), Some("dev-3"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_write_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditConfig { path: path.clone(), max_bytes: u64::MAX, keep: 1 }).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..200 {
                        log.record(&entry(&format!("dev-{t}-{i}"), "assigned")).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        log.flush().await;
        let (all, bad) = read(&path, 1, &Filter::default()).unwrap();
        assert_eq!((all.len(), bad), (1600, 0));
        for t in 0..8 {
            // Each task's lines are all there, in the order it wrote them.
            let mine: Vec<_> = all
                .iter()
                .filter_map(|e| e.registration_id.as_deref()?.strip_prefix(&format!("dev-{t}-")))
                .map(|i| i.parse::<u32>().unwrap())
                .collect();
            assert_eq!(mine, (0..200).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn torn_lines_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditConfig { path: path.clone(), max_bytes: u64::MAX, keep: 1 }).await.unwrap();
        log.record(&entry("a", "assigned")).await;
        log.flush().await;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"time\":\"20"))
            .unwrap();
        let (got, bad) = read(&path, 1, &Filter::default()).unwrap();
        assert_eq!((got.len(), bad), (1, 1));
    }

    #[tokio::test]
    async fn recent_reads_backwards_across_rotated_files_within_a_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditConfig { path: path.clone(), max_bytes: 150_000, keep: 3 }).await.unwrap();
        for i in 0..2_000 {
            let mut e = entry(&format!("dev-{}", i % 7), "assigned");
            e.operation_id = Some(format!("op-{i}"));
            log.record(&e).await;
        }
        log.flush().await;
        assert!(rotated(&path, 1).exists());
        let (all, _) = read(&path, 3, &Filter::default()).unwrap();
        let op = |e: &Entry| e.operation_id.clone().unwrap();
        // Newest first, the same lines as a full read, across block and file boundaries.
        let r = recent(&path, 3, &Filter::default(), usize::MAX, u64::MAX).unwrap();
        assert!(r.complete);
        assert_eq!(r.entries.iter().map(op).collect::<Vec<_>>(), all.iter().rev().map(op).collect::<Vec<_>>());
        let f = Filter { registration_id: Some("dev-3".into()), ..Filter::default() };
        let r = recent(&path, 3, &f, 5, u64::MAX).unwrap();
        let want: Vec<_> = all.iter().rev().filter(|e| f.matches(e)).take(5).map(op).collect();
        assert_eq!(r.entries.iter().map(op).collect::<Vec<_>>(), want);
        assert!(!r.complete, "stopped at the limit");
        // A small budget reads only the newest lines, and says so.
        let r = recent(&path, 3, &Filter::default(), usize::MAX, 10_000).unwrap();
        assert!(!r.complete && !r.entries.is_empty() && r.entries.len() < 100, "{}", r.entries.len());
        assert_eq!(op(&r.entries[0]), "op-1999");
        // No log yet: nothing, complete.
        let r = recent(&dir.path().join("none.jsonl"), 3, &Filter::default(), 10, u64::MAX).unwrap();
        assert!(r.complete && r.entries.is_empty());
    }

    #[test]
    fn disabled_log_is_silent() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let log = AuditLog::disabled();
            log.record(&entry("a", "assigned")).await;
            log.flush().await;
        });
    }
}
