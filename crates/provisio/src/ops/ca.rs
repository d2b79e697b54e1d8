//! `provisio ca create|import|list|show|delete|crl`: the CAs that issue devices' operational
//! certificates at registration (`/certificateAuthorities`, needs ServiceConfig), and their
//! certificate revocation lists (`/crl/{name}.crl`, public).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    client::{Client, seg},
    output::{Listing, print_list, print_object},
};

/// Issuing CA commands.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Make an issuing CA under the instance's issuing root (made on first use).
    Create {
        /// CA name.
        name: String,
    },
    /// Import an issuing CA of your own PKI: its certificate and private key, and the
    /// certificates above it up to the root (the key is sealed at rest with every other).
    Import {
        /// CA name.
        name: String,
        /// The CA's certificate (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The CA's private key (PEM).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The certificates above it up to the root (PEM); without it the CA is its own root.
        #[arg(long, value_name = "FILE")]
        chain: Option<PathBuf>,
    },
    /// List the issuing CAs.
    List {
        #[command(flatten)]
        top: super::Top,
    },
    /// Show one issuing CA (never its key).
    Show {
        /// CA name.
        name: String,
    },
    /// Delete an issuing CA (refused while a credential policy issues from it).
    Delete {
        /// CA name.
        name: String,
    },
    /// Fetch a CA's certificate revocation list (no credential needed, as brokers fetch it)
    /// and list its entries; --out also writes it (DER).
    Crl {
        /// CA name.
        name: String,
        /// Write the CRL (DER) to this file.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn read(p: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {what} {}", p.display()))
}

/// A CRL's facts and entries, as JSON: issuer, this and next update, and each revoked serial
/// (upper-case hex, as `registration show` prints it) with its date.
///
/// # Errors
/// Bytes that are no DER CRL.
pub fn describe_crl(der: &[u8]) -> Result<Value> {
    use x509_parser::prelude::FromDer as _;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| anyhow!("the answer is not a DER CRL: {e}"))?;
    let time = |t: x509_parser::time::ASN1Time| provisio_core::timefmt::format(t.to_datetime());
    let revoked: Vec<Value> = crl
        .iter_revoked_certificates()
        .map(|r| {
            let serial: String = r.raw_serial().iter().map(|b| format!("{b:02X}")).collect();
            json!({"serialNumber": serial, "revocationDate": time(r.revocation_date)})
        })
        .collect();
    Ok(json!({
        "issuer": crl.issuer().to_string(),
        "thisUpdate": time(crl.last_update()),
        "nextUpdate": crl.next_update().map(time),
        "revokedCertificates": revoked,
    }))
}

/// Runs a CA command.
pub async fn run(c: &Client, cmd: CaCommand) -> Result<()> {
    let path = |n: &str| format!("/certificateAuthorities/{}", seg(n));
    match cmd {
        CaCommand::Create { name } => {
            print_object(&c.send(Method::PUT, &path(&name), None, &[]).await?.0, c.json, false);
        }
        CaCommand::Import { name, cert, key, chain } => {
            let mut body = json!({
                "name": name,
                "certificate": read(&cert, "--cert")?,
                "privateKey": read(&key, "--key")?,
            });
            if let Some(chain) = chain {
                body["chain"] = json!(read(&chain, "--chain")?);
            }
            print_object(&c.send(Method::PUT, &path(&name), Some(&body), &[]).await?.0, c.json, false);
        }
        CaCommand::List { top } => {
            let v = c.get("/certificateAuthorities").await?;
            let rows = Listing::of(v["value"].as_array().cloned().unwrap_or_default(), top.top);
            print_list(
                &rows,
                &[("name", "/name"), ("subject", "/subject"), ("expiry", "/notAfterUtc"), ("crl", "/crlPath")],
                c.json,
                false,
            );
        }
        CaCommand::Show { name } => print_object(&c.get(&path(&name)).await?, c.json, false),
        CaCommand::Delete { name } => {
            c.send(Method::DELETE, &path(&name), None, &[]).await?;
            if !c.json {
                println!("certificate authority '{name}' deleted");
            }
        }
        CaCommand::Crl { name, out } => {
            let der = c.get_public(&format!("/crl/{}.crl", seg(&name))).await?;
            let mut v = describe_crl(&der)?;
            if let Some(out) = &out {
                std::fs::write(out, &der).with_context(|| format!("cannot write {}", out.display()))?;
                v["file"] = json!(out);
            }
            if c.json {
                print_object(&v, true, false);
                return Ok(());
            }
            let entries = v.as_object_mut().and_then(|o| o.remove("revokedCertificates")).unwrap_or_default();
            print_object(&v, false, false);
            let rows = Listing::of(entries.as_array().cloned().unwrap_or_default(), None);
            print_list(&rows, &[("serialNumber", "/serialNumber"), ("revoked", "/revocationDate")], false, false);
        }
    }
    Ok(())
}
