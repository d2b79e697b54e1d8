//! The audit log: one JSON line for every registration attempt (successful or not, with
//! its precise reason and tracking id), for every change made through the service API, and
//! for every read that returns secrets (enrollment keys, policy keys).
//!
//! Each line is appended by the request that makes it, with one `write` to a file opened
//! in append mode, before the request is answered: a crash of the process loses no line of
//! an answered request. The file is rotated by size. `provisio audit` reads the files back.
//!
//! The line is written on the request's own thread, under a lock held only for that one
//! system call (a copy into the page cache, a few microseconds). A writer thread fed by a
//! channel, as before, cost two thread hand-offs per registration (waking the writer, then
//! being woken by it) and more CPU than the writes themselves (see BENCHMARKS.md).
//!
//! **Tamper evidence.** Every line starts with `"prev"`: the SHA-256 (hex) of the previous
//! line's bytes (without its newline). The first line of a new log carries [`GENESIS`]; the
//! first line after a rotation carries the hash of the rotated file's last line, so the
//! files of one node form one chain. [`verify`] (`provisio audit verify`) walks it: an edited,
//! inserted or removed line breaks the chain at the line after it.
//!
//! **Refusals are bounded.** A client with no credential can make the server write a line
//! per attempt; unchecked, that rotates every kept file away. Refusals of unauthenticated
//! requests go through [`AuditLog::record_refusal`]: a few per client address per minute are
//! written in full, the rest are counted and summed up in one line per address and minute
//! ([`RefusalLimits`]).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use std::io::Write as _;

use serde::{Deserialize, Serialize};

/// What an audit line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// A device's registration attempt.
    Registration,
    /// A change through the service API, or a read of secrets.
    Service,
}

/// One audit line. Secrets never appear: no token, key or signature is ever put here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// Registration attempt or service request.
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
    /// `assigned`, `failed`, `disabled` (registration recorded), `refused`, `ok`, or
    /// `suppressed` (a summary of refusals that were counted, not written).
    pub result: String,
    /// HTTP-style status answered (0 on a summary line).
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
    /// On a summary line: how many refusals were counted and not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// The serial of the operational certificate issued with this registration (issue #26).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
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
            suppressed: None,
            certificate_serial: None,
        }
    }
}

/// At most `max` characters of `s`, control characters removed (a value must not break a
/// line), and `…` when it was cut: what a client sends is bounded before it is written.
#[must_use]
pub fn bounded(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).filter(|c| !c.is_control()).collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Longest registration id written (DPS's own limit is 128 characters).
pub const MAX_ID_CHARS: usize = 128;
/// Longest reason written; the full reason of a refused X.509 chain (one clause per group
/// anchor tried) is in the server log under the same tracking id.
pub const MAX_REASON_CHARS: usize = 1000;
/// Longest action (a request's method and path) written.
pub const MAX_ACTION_CHARS: usize = 300;

/// The `prev` of the first line of a new log: no line came before it.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How many refused unauthenticated requests are written in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalLimits {
    /// Lines per client address (an IPv6 client's /64) and kind per window; 0: no limit.
    pub per_address: u32,
    /// Lines from all addresses together per window.
    pub total: u32,
    /// The window.
    pub window: Duration,
    /// Addresses counted one by one; refusals from further addresses share one count.
    pub max_addresses: usize,
}

impl RefusalLimits {
    /// `per_address` lines a minute per address, 100 times that from all together, 1,000
    /// addresses counted one by one. With the defaults (10) a flood writes at most about
    /// 1,000 full lines (at most ~1.5 KB each, with the fields bounded) and 1,000 summaries
    /// a minute, about 2 MB, however many addresses it comes from, so the 600 MB kept by
    /// default last at least five hours of it; one address alone writes 11 lines a minute.
    #[must_use]
    pub fn per_minute(per_address: u32) -> Self {
        Self {
            per_address,
            total: per_address.saturating_mul(100),
            window: Duration::from_secs(60),
            max_addresses: 1000,
        }
    }
}

impl Default for RefusalLimits {
    fn default() -> Self {
        Self::per_minute(10)
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
    /// How many refusals of unauthenticated requests are written in full.
    pub refusals: RefusalLimits,
}

/// SHA-256 of `bytes`.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The open file, its size and the hash of its last line, behind the log's lock.
#[derive(Debug)]
struct Writer {
    config: AuditConfig,
    file: std::fs::File,
    size: u64,
    /// Hex SHA-256 of the last line written (the next line's `prev`).
    prev: [u8; 64],
}

impl Writer {
    /// Appends one entry's JSON (`{…}`) as a line that starts with the chain's `prev`: one
    /// `write`, then a rotation once the file is large enough.
    fn append(&mut self, json: &[u8]) {
        let Some(rest) = json.strip_prefix(b"{").filter(|r| r.len() > 1) else {
            tracing::error!("audit entry is not a JSON object");
            return;
        };
        let mut line = Vec::with_capacity(json.len() + 80);
        line.extend_from_slice(b"{\"prev\":\"");
        line.extend_from_slice(&self.prev);
        line.extend_from_slice(b"\",");
        line.extend_from_slice(rest);
        let hash = sha256(&line);
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            tracing::error!(error = %e, path = %self.config.path.display(), "cannot write the audit log");
            return;
        }
        // Cannot fail: 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(hash, &mut self.prev);
        self.size += line.len() as u64;
        if self.size >= self.config.max_bytes {
            match rotate(&self.config) {
                Ok(f) => {
                    self.file = f;
                    self.size = 0;
                    // The chain's head, outside the log: removing the newest lines of the
                    // log cannot hide from this.
                    tracing::info!(head = %String::from_utf8_lossy(&self.prev), "audit log rotated");
                }
                Err(e) => tracing::error!(error = %e, "cannot rotate the audit log"),
            }
        }
    }
}

/// Who refused requests come from, as [`Limiter`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    /// One IPv4 address, or one IPv6 /64 (its first address).
    Addr(IpAddr),
    /// Requests with no known address.
    Unknown,
    /// Every address beyond [`RefusalLimits::max_addresses`].
    Others,
}

impl Source {
    fn of(peer: Option<IpAddr>) -> Self {
        match peer {
            None => Self::Unknown,
            Some(IpAddr::V4(a)) => Self::Addr(IpAddr::V4(a)),
            Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
                Some(v4) => Self::Addr(IpAddr::V4(v4)),
                // A client usually holds a whole /64: counted per address, it would have
                // 2^64 windows.
                None => Self::Addr(IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & !u128::from(u64::MAX)))),
            },
        }
    }

    fn describe(self, max: usize) -> String {
        match self {
            Self::Addr(IpAddr::V4(a)) => a.to_string(),
            Self::Addr(IpAddr::V6(a)) => format!("{a}/64"),
            Self::Unknown => "clients of no known address".into(),
            Self::Others => format!("addresses beyond the {max} counted one by one"),
        }
    }
}

/// One source's count in its current window.
#[derive(Debug)]
struct Window {
    /// When the window started, for the summary.
    started: String,
    written: u32,
    suppressed: u64,
}

/// Counts refused unauthenticated requests per source in fixed windows.
#[derive(Debug)]
struct Limiter {
    limits: RefusalLimits,
    windows: HashMap<(Kind, Source), Window>,
    /// The windows in the order they started, to end them in that order.
    order: VecDeque<(Instant, Kind, Source)>,
    /// Lines written from all sources in the window that started at `.0`.
    total: (Instant, u32),
}

impl Limiter {
    fn new(limits: RefusalLimits) -> Self {
        Self { limits, windows: HashMap::new(), order: VecDeque::new(), total: (Instant::now(), 0) }
    }

    /// Whether a refusal of `kind` from `peer` is written in full; summaries of windows
    /// that have ended are put in `due`.
    fn admit(&mut self, kind: Kind, peer: Option<IpAddr>, now: Instant, due: &mut Vec<Entry>) -> bool {
        if self.limits.per_address == 0 {
            return true;
        }
        self.end_windows(now, due);
        let mut key = (kind, Source::of(peer));
        if !self.windows.contains_key(&key) && self.windows.len() >= self.limits.max_addresses {
            key.1 = Source::Others;
        }
        let order = &mut self.order;
        let w = self.windows.entry(key).or_insert_with(|| {
            order.push_back((now, key.0, key.1));
            Window { started: provisio_core::timefmt::now(), written: 0, suppressed: 0 }
        });
        if now.saturating_duration_since(self.total.0) >= self.limits.window {
            self.total = (now, 0);
        }
        if w.written < self.limits.per_address && self.total.1 < self.limits.total {
            w.written += 1;
            self.total.1 += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Ends the windows older than the window length: one summary each that suppressed any.
    fn end_windows(&mut self, now: Instant, due: &mut Vec<Entry>) {
        while let Some(&(start, kind, source)) = self.order.front() {
            if now.saturating_duration_since(start) < self.limits.window {
                break;
            }
            self.order.pop_front();
            if let Some(w) = self.windows.remove(&(kind, source)) {
                self.summary(kind, source, &w, due);
            }
        }
    }

    /// Ends every window (at shutdown).
    fn end_all(&mut self, due: &mut Vec<Entry>) {
        while let Some((_, kind, source)) = self.order.pop_front() {
            if let Some(w) = self.windows.remove(&(kind, source)) {
                self.summary(kind, source, &w, due);
            }
        }
    }

    fn summary(&self, kind: Kind, source: Source, w: &Window, due: &mut Vec<Entry>) {
        if w.suppressed == 0 {
            return;
        }
        let mut e = Entry::new(kind, "refusals not written");
        e.peer = match source {
            Source::Addr(a) => Some(a),
            Source::Unknown | Source::Others => None,
        };
        e.result = "suppressed".into();
        e.suppressed = Some(w.suppressed);
        e.reason = Some(format!(
            "{} more refused unauthenticated request(s) from {} in the {} s from {} were counted, not written \
             (at most {} written a window per address, {} from all addresses)",
            w.suppressed,
            source.describe(self.limits.max_addresses),
            self.limits.window.as_secs(),
            w.started,
            self.limits.per_address,
            self.limits.total
        ));
        due.push(e);
    }
}

/// The log's file and its refusal counts.
#[derive(Debug)]
struct Inner {
    writer: Mutex<Writer>,
    limiter: Mutex<Limiter>,
}

/// A handle to the audit log; cheap to clone. A disabled log drops entries.
#[derive(Clone, Debug, Default)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

impl AuditLog {
    /// A log that records nothing (`audit_log = "off"`).
    #[must_use]
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Opens (creating if needed, mode 0600) the log file, and finds the chain's head: the
    /// hash of the last line of the file, or of the newest rotated file when the file is
    /// empty, or [`GENESIS`]. A last line cut short by a crash is ended with a newline, so
    /// that the next line starts on its own; the chain runs through it.
    ///
    /// # Errors
    /// If the file cannot be opened or read.
    pub async fn open(config: AuditConfig) -> std::io::Result<Self> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = open_append(&config.path)?;
        let mut size = file.metadata()?.len();
        let last = match last_line(&config.path)? {
            Some((line, ended)) => {
                if !ended {
                    file.write_all(b"\n")?;
                    size += 1;
                }
                Some(line)
            }
            None => last_line(&rotated(&config.path, 1))?.map(|(line, _)| line),
        };
        let mut prev = [0u8; 64];
        match last {
            Some(line) => {
                let _ = hex::encode_to_slice(sha256(&line), &mut prev);
            }
            None => prev.copy_from_slice(GENESIS.as_bytes()),
        }
        let limiter = Limiter::new(config.refusals);
        Ok(Self {
            inner: Some(Arc::new(Inner {
                writer: Mutex::new(Writer { config, file, size, prev }),
                limiter: Mutex::new(limiter),
            })),
        })
    }

    /// Writes an entry: returns once the line is handed to the operating system, so an
    /// answer sent after it is never missing from the log, even after a kill -9.
    pub async fn record(&self, entry: &Entry) {
        let Some(inner) = &self.inner else { return };
        inner.write(entry);
    }

    /// Writes the refusal of an unauthenticated request (no credential, or one that did not
    /// hold), within [`RefusalLimits`]: beyond them it is only counted, and the count is
    /// written as one summary line per address when its window ends.
    pub async fn record_refusal(&self, entry: &Entry) {
        let Some(inner) = &self.inner else { return };
        let mut due = Vec::new();
        let admitted = inner.limiter().admit(entry.kind, entry.peer, Instant::now(), &mut due);
        for s in &due {
            inner.write(s);
        }
        if admitted {
            inner.write(entry);
        }
    }

    /// A registration attempt: refusals (`4xx`: before or at attestation, so by clients not
    /// known to hold a credential) through [`AuditLog::record_refusal`], the rest in full.
    pub async fn record_attempt(&self, entry: &Entry) {
        if (400..500).contains(&entry.status) {
            self.record_refusal(entry).await;
        } else {
            self.record(entry).await;
        }
    }

    /// Writes the summaries of refusal windows that have ended (called once a minute, so
    /// that a flood that stopped is summed up without waiting for the next refusal).
    pub async fn tick(&self) {
        let Some(inner) = &self.inner else { return };
        let mut due = Vec::new();
        inner.limiter().end_windows(Instant::now(), &mut due);
        for s in &due {
            inner.write(s);
        }
    }

    /// Writes the summaries of every refusal window and puts what was written on disk (used
    /// at shutdown and in tests).
    pub async fn flush(&self) {
        let Some(inner) = self.inner.clone() else { return };
        let mut due = Vec::new();
        inner.limiter().end_all(&mut due);
        for s in &due {
            inner.write(s);
        }
        let synced = tokio::task::spawn_blocking(move || {
            let w = inner.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            tracing::debug!(head = %String::from_utf8_lossy(&w.prev), "audit log synced");
            w.file.sync_data()
        })
        .await;
        if let Ok(Err(e)) = synced {
            tracing::error!(error = %e, "cannot sync the audit log");
        }
    }
}

impl Inner {
    fn limiter(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, entry: &Entry) {
        // Serialised before the lock is taken: only the write itself is serialised.
        match crate::to_json(entry) {
            Ok(json) => self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).append(&json),
            Err(e) => tracing::error!(error = %e, "audit entry not serialisable"),
        }
    }
}

/// The last line of `path` (without its newline) and whether it ended with one; `None` for
/// an empty or absent file. Reads at most the last MiB (a line is a few KB).
fn last_line(path: &Path) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    const MAX: u64 = 1024 * 1024;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(MAX);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    let ended = tail.last() == Some(&b'\n');
    if ended {
        tail.pop();
    }
    let line = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => tail.split_off(i + 1),
        None => {
            if start > 0 {
                tracing::warn!(path = %path.display(), "the audit log's last line is over 1 MiB; the chain breaks there");
            }
            tail
        }
    };
    Ok(Some((line, ended)))
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

/// The files of a log, oldest first: `{path}.{keep}` … `{path}.1` that exist, then `path`.
#[must_use]
pub fn files(path: &Path, keep: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=keep).rev().map(|n| rotated(path, n)).filter(|p| p.exists()).collect();
    files.push(path.to_path_buf());
    files
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

/// What [`verify`] found in an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Files read.
    pub files: usize,
    /// Lines checked (every line that carries `prev`).
    pub lines: u64,
    /// Lines before the first that carries `prev` (written before the chain existed).
    pub unchained: u64,
    /// Whether the first checked line is the first of a log ([`GENESIS`]); otherwise older
    /// lines were rotated away (or removed), which the chain cannot tell apart.
    pub from_genesis: bool,
    /// Lines whose `prev` holds but whose rest does not parse (cut short by a crash).
    pub incomplete: Vec<(PathBuf, u64)>,
    /// The hash of the last line: the next line's `prev`. Kept elsewhere, it shows whether
    /// the newest lines were removed later.
    pub head: String,
}

/// Where [`verify`] found the chain broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The file.
    pub file: PathBuf,
    /// The line, from 1.
    pub line: u64,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.why)
    }
}

/// The `prev` a line starts with: the line begins `{"prev":"<64 hex digits>"`, so that
/// even a line cut short by a crash shows whether it follows its predecessor.
fn prev_of(line: &[u8]) -> Option<&str> {
    let hex = line.strip_prefix(b"{\"prev\":\"")?.get(..64)?;
    (line.get(73) == Some(&b'"') && hex.iter().all(u8::is_ascii_hexdigit)).then(|| std::str::from_utf8(hex).ok())?
}

/// Checks the chain through `files`, in order (oldest first, as [`files`] lists them):
/// each line's `prev` must be the hash of the line before it, across files. The first
/// broken line is returned as `Err` in the `Ok`.
///
/// # Errors
/// If a file cannot be read.
pub fn verify(files: &[PathBuf]) -> std::io::Result<Result<Verified, Broken>> {
    use std::io::BufRead as _;
    let mut v = Verified {
        files: 0,
        lines: 0,
        unchained: 0,
        from_genesis: false,
        incomplete: Vec::new(),
        head: GENESIS.to_owned(),
    };
    // The hash of the line before, once there is one.
    let mut prev: Option<String> = None;
    let mut chained = false;
    for path in files {
        v.files += 1;
        let mut r = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut buf = Vec::new();
        let mut n = 0u64;
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            n += 1;
            let ended = buf.last() == Some(&b'\n');
            if ended {
                buf.pop();
            }
            let broken = |why: String| Ok(Err(Broken { file: path.clone(), line: n, why }));
            let Some(p) = prev_of(&buf) else {
                if !chained && !buf.is_empty() && serde_json::from_slice::<Entry>(&buf).is_ok() {
                    v.unchained += 1;
                    prev = Some(hex::encode(sha256(&buf)));
                    continue;
                }
                if !ended && files.last() == Some(path) {
                    // Being written right now (or cut before its `prev` by a crash).
                    break;
                }
                return broken("the line does not start with the hash of the line before it (\"prev\")".into());
            };
            match (&prev, chained) {
                (Some(want), _) if p != want => {
                    return broken(format!(
                        "\"prev\" is {p}, but the line before it hashes to {want}: a line was changed, removed or \
                         inserted here"
                    ));
                }
                (None, _) => v.from_genesis = p == GENESIS,
                _ => {}
            }
            chained = true;
            v.lines += 1;
            if serde_json::from_slice::<Entry>(&buf).is_err() {
                v.incomplete.push((path.clone(), n));
            }
            prev = Some(hex::encode(sha256(&buf)));
        }
    }
    if let Some(p) = prev {
        v.head = p;
    }
    Ok(Ok(v))
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
    let (mut out, mut bad) = (Vec::new(), 0);
    for f in files(path, keep.max(1)) {
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
        let log = AuditLog::open(AuditConfig {
            path: path.clone(),
            max_bytes: 2_000,
            keep: 2,
            refusals: RefusalLimits::default(),
        })
        .await
        .unwrap();
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
        let log = AuditLog::open(AuditConfig {
            path: path.clone(),
            max_bytes: u64::MAX,
            keep: 1,
            refusals: RefusalLimits::default(),
        })
        .await
        .unwrap();
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
        let log = AuditLog::open(AuditConfig {
            path: path.clone(),
            max_bytes: u64::MAX,
            keep: 1,
            refusals: RefusalLimits::default(),
        })
        .await
        .unwrap();
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
        let log = AuditLog::open(AuditConfig {
            path: path.clone(),
            max_bytes: 150_000,
            keep: 3,
            refusals: RefusalLimits::default(),
        })
        .await
        .unwrap();
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

    fn config(path: &Path, max_bytes: u64, keep: u32) -> AuditConfig {
        AuditConfig { path: path.to_owned(), max_bytes, keep, refusals: RefusalLimits::default() }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    fn hash_hex(line: &str) -> String {
        hex::encode(sha256(line.as_bytes()))
    }

    #[tokio::test]
    async fn every_line_carries_the_hash_of_the_line_before_across_rotations_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(config(&path, 3_000, 3)).await.unwrap();
        for i in 0..20 {
            log.record(&entry(&format!("dev-{i}"), "assigned")).await;
        }
        drop(log);
        // A restart carries on the chain of the file it finds.
        let log = AuditLog::open(config(&path, 3_000, 3)).await.unwrap();
        for i in 20..30 {
            log.record(&entry(&format!("dev-{i}"), "assigned")).await;
        }
        log.flush().await;
        assert!(rotated(&path, 2).exists(), "rotated twice at least");
        let all: Vec<String> = files(&path, 3).iter().flat_map(|f| lines(f)).collect();
        assert_eq!(all.len(), 30);
        assert!(all[0].starts_with(&format!("{{\"prev\":\"{GENESIS}\",\"time\":")), "{}", all[0]);
        for w in all.windows(2) {
            assert_eq!(prev_of(w[1].as_bytes()), Some(hash_hex(&w[0]).as_str()), "{} -> {}", w[0], w[1]);
        }
        // The first line of each file follows the last line of the file rotated before it.
        let first_current = lines(&path).first().cloned();
        if let Some(first) = first_current {
            assert_eq!(prev_of(first.as_bytes()), Some(hash_hex(lines(&rotated(&path, 1)).last().unwrap()).as_str()));
        }
        let v = verify(&files(&path, 3)).unwrap().unwrap();
        assert_eq!((v.lines, v.unchained, v.from_genesis), (30, 0, true));
        assert!(v.incomplete.is_empty());
        assert_eq!(v.head, hash_hex(all.last().unwrap()));
        // The entries read back as before.
        let (got, bad) = read(&path, 3, &Filter::default()).unwrap();
        assert_eq!((got.len(), bad), (30, 0));
        // A restart on an empty current file (just rotated) follows the rotated file.
        std::fs::write(&path, b"").unwrap();
        let before = lines(&rotated(&path, 1));
        let log = AuditLog::open(config(&path, u64::MAX, 3)).await.unwrap();
        log.record(&entry("after-restart", "assigned")).await;
        assert_eq!(prev_of(lines(&path)[0].as_bytes()), Some(hash_hex(before.last().unwrap()).as_str()));
    }

    #[tokio::test]
    async fn verify_finds_an_edited_a_removed_and_an_inserted_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(config(&path, u64::MAX, 1)).await.unwrap();
        for i in 0..10 {
            log.record(&entry(&format!("dev-{i}"), if i == 4 { "refused" } else { "assigned" })).await;
        }
        log.flush().await;
        let intact = lines(&path);
        assert!(verify(std::slice::from_ref(&path)).unwrap().is_ok());
        let check = |edited: Vec<String>| {
            let f = dir.path().join("edited.jsonl");
            std::fs::write(&f, edited.join("\n") + "\n").unwrap();
            verify(&[f]).unwrap().unwrap_err()
        };
        // A refusal turned into a success: the next line no longer follows it.
        let mut edited = intact.clone();
        edited[4] = edited[4].replace("\"refused\"", "\"assigned\"");
        let b = check(edited);
        assert_eq!(b.line, 6, "{b}");
        assert!(b.why.contains("changed, removed or inserted"), "{b}");
        // A line removed.
        let mut removed = intact.clone();
        removed.remove(4);
        assert_eq!(check(removed).line, 5);
        // A line inserted: a copy of its predecessor's prev does not follow the predecessor.
        let mut inserted = intact.clone();
        inserted.insert(4, intact[3].replace("dev-3", "dev-x"));
        assert_eq!(check(inserted).line, 5);
        // A line without a prev in the middle of the chain.
        let mut stripped = intact.clone();
        stripped[7] = format!("{{{}", &stripped[7][75..]);
        let b = check(stripped);
        assert_eq!(b.line, 8, "{b}");
        // The middle file of three removed: the break is at the first line after the gap.
        let log = AuditLog::open(config(&path, 1_500, 3)).await.unwrap();
        for i in 0..30 {
            log.record(&entry(&format!("more-{i}"), "assigned")).await;
        }
        let all = files(&path, 3);
        assert_eq!(all.len(), 4);
        assert!(verify(&all).unwrap().is_ok());
        let gap = [all[0].clone(), all[2].clone(), all[3].clone()];
        let b = verify(&gap).unwrap().unwrap_err();
        assert_eq!((b.file.clone(), b.line), (all[2].clone(), 1), "{b}");
        // The oldest file rotated away: still a chain, not from the start.
        let v = verify(&all[1..]).unwrap().unwrap();
        assert!(!v.from_genesis);
    }

    #[tokio::test]
    async fn a_line_cut_by_a_crash_stays_in_the_chain_and_lines_from_before_the_chain_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // Lines written before the chain existed (an older version).
        let old = serde_json::to_string(&entry("old", "assigned")).unwrap();
        std::fs::write(&path, format!("{old}\n{old}\n")).unwrap();
        let log = AuditLog::open(config(&path, u64::MAX, 1)).await.unwrap();
        log.record(&entry("a", "assigned")).await;
        drop(log);
        // A write cut short after its prev.
        let cut = format!("{{\"prev\":\"{}\",\"time\":\"2026-", hash_hex(&lines(&path)[2]));
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(cut.as_bytes()).unwrap();
        drop(f);
        let log = AuditLog::open(config(&path, u64::MAX, 1)).await.unwrap();
        log.record(&entry("c", "assigned")).await;
        log.flush().await;
        let v = verify(std::slice::from_ref(&path)).unwrap().unwrap();
        assert_eq!((v.unchained, v.lines, v.incomplete.len()), (2, 3, 1), "{v:?}");
        assert_eq!(v.incomplete[0].1, 4);
        let (got, bad) = read(&path, 1, &Filter::default()).unwrap();
        assert_eq!((got.len(), bad), (4, 1));
    }

    fn limits(per_address: u32, total: u32, max_addresses: usize) -> RefusalLimits {
        RefusalLimits { per_address, total, window: Duration::from_secs(60), max_addresses }
    }

    #[test]
    fn refusals_beyond_the_limit_are_summed_up_once_per_address_and_window() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let mut l = Limiter::new(limits(3, 1000, 3));
        let t0 = Instant::now();
        let mut due = Vec::new();
        let admitted = (0..10).filter(|_| l.admit(Kind::Registration, ip("192.0.2.1"), t0, &mut due)).count();
        assert_eq!(admitted, 3);
        // Another address has its own count; an IPv6 /64 is one address.
        assert!(l.admit(Kind::Registration, ip("192.0.2.2"), t0, &mut due));
        let v6 = (0..5).filter(|i| l.admit(Kind::Registration, ip(&format!("2001:db8::{i}")), t0, &mut due)).count();
        assert_eq!(v6, 3);
        // Beyond the addresses counted one by one, the others share one count.
        let others =
            (0..5).filter(|i| l.admit(Kind::Registration, ip(&format!("198.51.100.{i}")), t0, &mut due)).count();
        assert_eq!(others, 3);
        assert!(due.is_empty(), "no window has ended");
        // A minute later: one summary for each window that suppressed something.
        assert!(l.admit(Kind::Registration, ip("192.0.2.1"), t0 + Duration::from_secs(61), &mut due));
        let mut summaries: Vec<(Option<IpAddr>, Option<u64>)> = due.iter().map(|e| (e.peer, e.suppressed)).collect();
        summaries.sort();
        assert_eq!(summaries, vec![(None, Some(2)), (ip("192.0.2.1"), Some(7)), (ip("2001:db8::"), Some(2))]);
        assert!(due.iter().all(|e| e.result == "suppressed" && e.reason.is_some()));
        assert!(due.iter().any(|e| e.reason.as_deref().unwrap().contains("2001:db8::/64")));
        // At shutdown, the open windows are summed up too.
        due.clear();
        for _ in 0..4 {
            l.admit(Kind::Service, ip("192.0.2.1"), t0 + Duration::from_secs(62), &mut due);
        }
        l.end_all(&mut due);
        assert_eq!(due.iter().map(|e| (e.kind, e.suppressed)).collect::<Vec<_>>(), vec![(Kind::Service, Some(1))]);
        assert!(l.windows.is_empty() && l.order.is_empty());
    }

    #[test]
    fn refusals_from_every_address_together_are_bounded_and_zero_means_no_limit() {
        let mut l = Limiter::new(limits(10, 25, 1000));
        let t0 = Instant::now();
        let mut due = Vec::new();
        let admitted = (0..100u8)
            .filter(|i| l.admit(Kind::Registration, Some(IpAddr::from([10, 0, 0, *i])), t0, &mut due))
            .count();
        assert_eq!(admitted, 25);
        let later = t0 + Duration::from_secs(60);
        assert!(l.admit(Kind::Registration, Some(IpAddr::from([10, 0, 1, 1])), later, &mut due));
        assert_eq!(due.len(), 75, "one summary per address that was cut");
        let mut off = Limiter::new(limits(0, 0, 0));
        assert!((0..1000).all(|_| off.admit(Kind::Registration, None, t0, &mut due)));
    }

    #[tokio::test]
    async fn refusals_are_written_within_the_limit_and_summed_up_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut c = config(&path, u64::MAX, 1);
        c.refusals = limits(5, 100, 100);
        let log = AuditLog::open(c).await.unwrap();
        let mut refused = entry("x", "refused");
        refused.peer = Some("203.0.113.9".parse().unwrap());
        for _ in 0..50 {
            log.record_attempt(&refused).await;
        }
        // Attempts that were not refused are always written.
        log.record_attempt(&entry("y", "assigned")).await;
        assert_eq!(lines(&path).len(), 6);
        log.flush().await;
        let (got, _) = read(&path, 1, &Filter::default()).unwrap();
        assert_eq!(got.len(), 7);
        assert_eq!((got[6].result.as_str(), got[6].suppressed), ("suppressed", Some(45)));
        assert!(verify(std::slice::from_ref(&path)).unwrap().is_ok());
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
