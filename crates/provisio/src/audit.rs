//! `provisio audit`: reads the audit log that `provisio serve` writes.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use provisio_engine::audit::{self, Filter, Kind};

use crate::{config, ops::output};

/// `provisio audit` options.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
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
    /// Print JSON lines (as stored) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `provisio audit`.
pub fn run(args: &AuditArgs) -> Result<()> {
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
        &rows,
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
    );
    Ok(())
}
