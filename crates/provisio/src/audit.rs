//! `provisio audit`: reads the audit log that `provisio serve` writes, and `provisio audit
//! verify` checks its hash chain.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use provisio_engine::audit::{self, Filter, Kind};

use crate::{config, ops::output};

/// `provisio audit` options.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    #[command(flatten)]
    common: config::CommonArgs,
    /// The log file [default: the configured audit_log, i.e. {data_dir}/audit.jsonl].
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Only this registration id (case-insensitive).
    #[arg(long, value_name = "ID")]
    registration_id: Option<String>,
    /// Only the entry with this tracking id or operation id.
    #[arg(long, value_name = "ID")]
    tracking_id: Option<String>,
    /// Only registration attempts or only service API changes.
    #[arg(long, value_parser = ["registration", "service"])]
    kind: Option<String>,
    /// Only entries at or after this time (RFC 3339, UTC, e.g. 2026-11-28T10:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only the last N entries selected.
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Print JSON lines (the stored fields, without the chain's "prev") instead of a table.
    #[arg(long)]
    json: bool,
}

/// What `provisio audit` does besides listing.
#[derive(Debug, clap::Subcommand)]
enum AuditCommand {
    /// Check the log's hash chain (every line carries the SHA-256 of the line before it):
    /// prints the first broken line as FILE:LINE and exits non-zero, or the chain's head.
    Verify(VerifyArgs),
}

/// `provisio audit verify` options.
#[derive(Debug, clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    common: config::CommonArgs,
    /// The files to check, oldest first [default: the configured audit_log's rotated files,
    /// audit.jsonl.{keep} … audit.jsonl.1, then audit.jsonl]. One node's files form one
    /// chain; check each node's files on their own.
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
}

/// The configured log file, or the reason there is none.
fn configured_path(config: &provisio_server::ServerConfig) -> Result<PathBuf> {
    match config.audit_log_path() {
        Some(p) => Ok(p),
        None => bail!("the audit log is off (audit_log = \"off\"); name the files to check"),
    }
}

/// Runs `provisio audit verify`.
fn verify(args: &VerifyArgs) -> Result<()> {
    let files = if args.paths.is_empty() {
        let config = config::load_common(&args.common)?;
        let path = configured_path(&config)?;
        if !path.exists() {
            bail!("no audit log at {} (it is written by `provisio serve`)", path.display());
        }
        audit::files(&path, config.audit_log_keep)
    } else {
        args.paths.clone()
    };
    let v = match audit::verify(&files).context("cannot read the audit log")? {
        Ok(v) => v,
        Err(broken) => bail!("the audit log's chain is broken at {broken}"),
    };
    for (file, line) in &v.incomplete {
        eprintln!("warning: {}:{line} was cut short (a crash during its write); it is in the chain", file.display());
    }
    if v.unchained > 0 {
        eprintln!("note: the first {} line(s) predate the hash chain and are not checked", v.unchained);
    }
    let start = if v.unchained > 0 {
        "from the lines that predate it"
    } else if v.from_genesis {
        "from the log's first line"
    } else {
        "from a line whose predecessors were rotated away (or removed)"
    };
    println!("ok: {} line(s) in {} file(s) chained {start}; head {}", v.lines, v.files, v.head);
    Ok(())
}

/// Runs `provisio audit`.
pub fn run(args: &AuditArgs) -> Result<()> {
    if let Some(AuditCommand::Verify(v)) = &args.command {
        return verify(v);
    }
    let config = config::load_common(&args.common)?;
    let path = match (&args.file, config.audit_log_path()) {
        (Some(f), _) => f.clone(),
        (None, Some(p)) => p,
        (None, None) => bail!("the audit log is off (audit_log = \"off\"); pass --file to read an older one"),
    };
    if !path.exists() {
        bail!("no audit log at {} (it is written by `provisio serve`)", path.display());
    }
    let filter = Filter {
        registration_id: args.registration_id.clone(),
        tracking_id: args.tracking_id.clone(),
        kind: args.kind.as_deref().map(|k| if k == "service" { Kind::Service } else { Kind::Registration }),
        since: args.since.clone(),
    };
    let (mut entries, bad) = audit::read(&path, config.audit_log_keep, &filter)
        .with_context(|| format!("cannot read the audit log {}", path.display()))?;
    if let Some(n) = args.last {
        entries.drain(..entries.len().saturating_sub(n));
    }
    if bad > 0 {
        eprintln!("warning: {bad} unreadable line(s) skipped");
    }
    if args.json {
        for e in &entries {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(());
    }
    let mut rows: Vec<serde_json::Value> = entries.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    // One column each for "where it went or why not" and "the id to quote".
    for r in &mut rows {
        if r.get("reason").is_none() {
            r["reason"] = r.get("assignedHub").cloned().unwrap_or_default();
        }
        if r.get("trackingId").is_none() {
            r["trackingId"] = r.get("operationId").cloned().unwrap_or_default();
        }
    }
    output::print_list(
        &output::Listing { items: rows, more: false },
        &[
            ("time", "/time"),
            ("action", "/action"),
            ("registration id", "/registrationId"),
            ("via", "/transport"),
            ("credential", "/credential"),
            ("result", "/result"),
            ("status", "/status"),
            ("hub / reason", "/reason"),
            ("tracking / operation id", "/trackingId"),
        ],
        false,
        false,
    );
    Ok(())
}
