//! The server under test: a `provisio serve` child process, its start-up times, and its
//! RSS and CPU read from `/proc`.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// File name of the embedded database inside a data directory: the server's
/// `provisio_server::DATABASE_FILE`, repeated here so that the load generator does not
/// link the server. If the two ever differ, [`crate::run`] fails at once: it checks that
/// the server sees the enrollments preloaded into this file.
pub(crate) const DATABASE_FILE: &str = "provisio.sqlite";

/// The `provisio` executable to start: `--server`, else the one next to this executable
/// (`target/release/provisio` beside `target/release/provisio-bench`), else one on `PATH`.
pub(crate) fn server_exe(chosen: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = chosen {
        if !p.is_file() {
            bail!("--server {}: no such file", p.display());
        }
        return Ok(p.to_owned());
    }
    let name = format!("provisio{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe().ok().map(|me| me.with_file_name(&name));
    if let Some(p) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join(&name)).find(|p| p.is_file()));
    if let Some(p) = on_path {
        return Ok(p);
    }
    bail!(
        "no `provisio` server executable{} nor on PATH: build it with `cargo build --release -p provisio`, \
         or name one with --server PATH",
        beside.map(|p| format!(" at {}", p.display())).unwrap_or_default()
    )
}

pub(crate) struct Srv {
    child: Child,
    info: Value,
    _dir: tempfile::TempDir,
    pub(crate) startup: Duration,
    /// Spawn to the embedded store's key filter being built (the end of the server's start-up
    /// work: until then lookups of absent documents read the database); `None` with
    /// PostgreSQL, or if the log did not say so in time.
    pub(crate) filter_built: Option<Duration>,
}

impl Srv {
    pub(crate) fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// CPU time the server process has used (user + system), in seconds.
    pub(crate) fn cpu_secs(&self) -> f64 {
        process_cpu_secs(&self.child.id().to_string())
    }

    /// A string field of the server's `serve --json` info line.
    pub(crate) fn s(&self, k: &str) -> String {
        self.info[k].as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `exe serve` on loopback ports in `dir` (or on `database`) and waits for its info
/// line and, with the embedded store, for its key filter.
pub(crate) fn start_server(exe: &Path, database: Option<&str>, dir: tempfile::TempDir) -> Result<Srv> {
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--json", "--data-dir"])
        .arg(dir.path())
        .args([
            "--https-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--hostname",
            "localhost",
            "--hostname",
            "127.0.0.1",
        ])
        .args(["--amqp-listen", "off"])
        .args(["--linked-hub", "bench-hub.example.net", "--retry-after-secs", "0"])
        .env("PROVISIO_SERVICE_REQUESTS_PER_SECOND", "0")
        .env("PROVISIO_MAX_CONNECTIONS", "100000")
        // All load comes from 127.0.0.1 and polls at once: lift the per-IP and per-device limits.
        .env("PROVISIO_MAX_CONNECTIONS_PER_IP", "0")
        .env("PROVISIO_DEVICE_POLLS_PER_10S", "0")
        // The server logs at its default level (a log line costs CPU too; and the bench
        // waits for its "key filter is built" line), into a file rather than over the
        // progress bars.
        .env("PROVISIO_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if let Some(db) = database {
        cmd.args(["--database", db]);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start the server {}", exe.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let Some(line) = BufReader::new(stdout).lines().next().transpose()? else {
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("the server did not start:\n{log}");
    };
    let info: Value = serde_json::from_str(&line).context("bad info line")?;
    let startup = started.elapsed();
    // The scenarios measure the steady state: with many documents in the store (see
    // `--enrollments`) the filter's scan would otherwise run inside the first scenario.
    let filter_built = if database.is_none() {
        let deadline = started + Duration::from_secs(60);
        loop {
            if std::fs::read_to_string(&log_path).unwrap_or_default().contains("key filter is built") {
                break Some(started.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    } else {
        None
    };
    Ok(Srv { child, info, _dir: dir, startup, filter_built })
}

/// CPU time (user + system, all threads) of process `pid` (or `self`), in seconds.
pub(crate) fn process_cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ").map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ") ".
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks_per_sec()
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux the benchmark runs on (the kernel's
/// USER_HZ is fixed at 100 for the /proc interface).
fn clock_ticks_per_sec() -> f64 {
    100.0
}
