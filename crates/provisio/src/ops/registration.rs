//! `provisio registration show|list|delete|revoke`.

use anyhow::Result;
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    client::{Client, seg},
    output::{Listing, print_list, print_object},
};

/// Registration-state commands.
#[derive(Debug, clap::Subcommand)]
pub enum RegistrationCommand {
    /// Show a device's registration state.
    Show {
        /// Registration id.
        id: String,
    },
    /// List the registration states of the devices of an enrollment group.
    List {
        /// Enrollment group id.
        #[arg(long)]
        group: String,
        #[command(flatten)]
        top: super::Top,
    },
    /// Revoke every operational certificate issued to a device (its CA's CRL lists them).
    Revoke {
        /// Registration id.
        id: String,
    },
    /// Delete a device's registration state (the device may register again; its
    /// certificates are revoked).
    Delete {
        /// Registration id.
        id: String,
        /// Only if the record still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
}

/// Most items asked for in one page; the server may send fewer (its limit is 1000 by default).
const PAGE: usize = 500;

/// Pages through a query; returns every item, or the first `top`.
///
/// # Errors
/// As [`Client::send`].
pub async fn query_all(c: &Client, path: &str, body: &Value, top: super::Top) -> Result<Listing> {
    let top = top.top;
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // Ask for no more than --top still needs, so that no page is fetched only to be cut.
        let size = top.map_or(PAGE, |n| n.saturating_sub(out.len()).min(PAGE)).to_string();
        let mut headers = vec![("x-ms-max-item-count", size.as_str())];
        if let Some(t) = &token {
            headers.push(("x-ms-continuation", t.as_str()));
        }
        let (v, h) = c.send(Method::POST, path, Some(body), &headers).await?;
        out.extend(v.as_array().cloned().unwrap_or_default());
        token = h.get("x-ms-continuation").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let full = top.is_some_and(|n| out.len() >= n);
        if token.is_none() || full {
            let mut listing = Listing::of(out, top);
            listing.more |= full && token.is_some();
            return Ok(listing);
        }
    }
}

/// Runs a registration command.
pub async fn run(c: &Client, cmd: RegistrationCommand) -> Result<()> {
    match cmd {
        RegistrationCommand::Show { id } => {
            print_object(&c.get(&format!("/registrations/{}", seg(&id))).await?, c.json, false)
        }
        RegistrationCommand::List { group, top } => {
            let rows =
                query_all(c, &format!("/registrations/{}/query", seg(&group)), &json!({"query": "SELECT *"}), top)
                    .await?;
            print_list(
                &rows,
                &[
                    ("registrationId", "/registrationId"),
                    ("status", "/status"),
                    ("assignedHub", "/assignedHub"),
                    ("deviceId", "/deviceId"),
                    ("lastUpdated", "/lastUpdatedDateTimeUtc"),
                ],
                c.json,
                false,
            );
        }
        RegistrationCommand::Revoke { id } => {
            let (v, _) =
                c.send(Method::POST, &format!("/registrations/{}/revokeCertificates", seg(&id)), None, &[]).await?;
            if c.json {
                print_object(&v, true, false);
            } else {
                let n = v["revoked"].as_u64().unwrap_or(0);
                println!("{n} certificate(s) of '{id}' revoked");
            }
        }
        RegistrationCommand::Delete { id, etag } => {
            let m = etag.unwrap_or_else(|| "*".into());
            c.send(Method::DELETE, &format!("/registrations/{}", seg(&id)), None, &[("If-Match", &m)]).await?;
            if !c.json {
                println!("registration state of '{id}' deleted");
            }
        }
    }
    Ok(())
}
