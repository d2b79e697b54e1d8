//! `provisio certificate upload|list|show|verification-code|verify|delete`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::json;

use super::{
    client::{Client, seg},
    output::{Listing, print_list, print_object},
};

/// CA certificate commands (proof of possession).
#[derive(Debug, clap::Subcommand)]
pub enum CertificateCommand {
    /// Upload a root or intermediate CA certificate (PEM or DER base64).
    Upload {
        /// Certificate name.
        name: String,
        /// Certificate file.
        #[arg(long)]
        file: PathBuf,
        /// Mark it verified without proof of possession.
        #[arg(long)]
        verified: bool,
        /// Replace an existing certificate with this etag ('*' for any).
        #[arg(long)]
        etag: Option<String>,
    },
    /// List the CA certificates.
    List {
        #[command(flatten)]
        top: super::Top,
    },
    /// Show one CA certificate.
    Show {
        /// Certificate name.
        name: String,
    },
    /// Generate a verification code (sign a certificate with it as CN: `provisio cert verification`).
    VerificationCode {
        /// Certificate name.
        name: String,
        /// Etag of the certificate [default: '*'].
        #[arg(long)]
        etag: Option<String>,
    },
    /// Verify proof of possession with the verification certificate.
    Verify {
        /// Certificate name.
        name: String,
        /// Verification certificate file.
        #[arg(long)]
        file: PathBuf,
        /// Etag of the certificate [default: '*'].
        #[arg(long)]
        etag: Option<String>,
    },
    /// Delete a CA certificate.
    Delete {
        /// Certificate name.
        name: String,
        /// Etag of the certificate [default: '*'].
        #[arg(long)]
        etag: Option<String>,
    },
}

fn read(p: &PathBuf) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// Runs a certificate command.
pub async fn run(c: &Client, cmd: CertificateCommand) -> Result<()> {
    let path = |n: &str| format!("/certificates/{}", seg(n));
    match cmd {
        CertificateCommand::Upload { name, file, verified, etag } => {
            let body = json!({"certificate": read(&file)?, "isVerified": verified});
            let h: Vec<(&str, &str)> = etag.as_deref().map(|e| vec![("If-Match", e)]).unwrap_or_default();
            print_object(&c.send(Method::PUT, &path(&name), Some(&body), &h).await?.0, c.json, false);
        }
        CertificateCommand::List { top } => {
            let v = c.get("/certificates").await?;
            let rows = Listing::of(v["value"].as_array().cloned().unwrap_or_default(), top.top);
            print_list(
                &rows,
                &[
                    ("name", "/name"),
                    ("subject", "/properties/subject"),
                    ("verified", "/properties/isVerified"),
                    ("expiry", "/properties/expiry"),
                    ("thumbprint", "/properties/thumbprint"),
                ],
                c.json,
                false,
            );
        }
        CertificateCommand::Show { name } => print_object(&c.get(&path(&name)).await?, c.json, false),
        CertificateCommand::VerificationCode { name, etag } => {
            let e = etag.unwrap_or_else(|| "*".into());
            let (v, _) = c
                .send(Method::POST, &format!("{}/generateVerificationCode", path(&name)), None, &[("If-Match", &e)])
                .await?;
            if c.json {
                print_object(&v, true, false);
            } else {
                println!("{}", v["properties"]["verificationCode"].as_str().unwrap_or_default());
            }
        }
        CertificateCommand::Verify { name, file, etag } => {
            let e = etag.unwrap_or_else(|| "*".into());
            let body = json!({"certificate": read(&file)?});
            print_object(
                &c.send(Method::POST, &format!("{}/verify", path(&name)), Some(&body), &[("If-Match", &e)]).await?.0,
                c.json,
                false,
            );
        }
        CertificateCommand::Delete { name, etag } => {
            let e = etag.unwrap_or_else(|| "*".into());
            c.send(Method::DELETE, &path(&name), None, &[("If-Match", &e)]).await?;
            if !c.json {
                println!("certificate '{name}' deleted");
            }
        }
    }
    Ok(())
}
