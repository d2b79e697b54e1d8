//! `provisio credential-policy create|list|show|delete`: which CA issues a device's
//! operational certificate, for how long, to which keys, how often (`/credentialPolicies`,
//! needs ServiceConfig). Enrollments and groups name theirs with `--credential-policy`.

use anyhow::Result;
use reqwest::Method;
use serde_json::json;

use super::{
    client::{Client, seg},
    output::{Listing, print_list, print_object},
};

/// Credential (certificate) policy commands.
#[derive(Debug, clap::Subcommand)]
pub enum CredentialPolicyCommand {
    /// Create a credential policy (or replace the one of that name).
    Create {
        /// Policy name.
        name: String,
        /// The issuing CA (`provisio ca create`). Not `--ca`, which names the CA file to
        /// trust for the service's TLS certificate.
        #[arg(long, visible_alias = "certificate-authority", value_name = "CA_NAME")]
        ca_name: String,
        /// Validity of issued certificates, days (1–3650) [default: 30].
        #[arg(long, value_name = "N")]
        validity_days: Option<u32>,
        /// Key types devices may use (comma-separated) [default: all].
        #[arg(long, value_delimiter = ',', value_parser = ["ecdsa-p256", "ecdsa-p384", "rsa"])]
        key_types: Option<Vec<String>>,
        /// Certificates one device may be issued per day [default: 10].
        #[arg(long, value_name = "N")]
        issuance_limit: Option<u32>,
    },
    /// List the credential policies.
    List {
        #[command(flatten)]
        top: super::Top,
    },
    /// Show one credential policy.
    Show {
        /// Policy name.
        name: String,
    },
    /// Delete a credential policy.
    Delete {
        /// Policy name.
        name: String,
    },
}

/// Runs a credential-policy command.
pub async fn run(c: &Client, cmd: CredentialPolicyCommand) -> Result<()> {
    let path = |n: &str| format!("/credentialPolicies/{}", seg(n));
    match cmd {
        CredentialPolicyCommand::Create { name, ca_name, validity_days, key_types, issuance_limit } => {
            let mut body = json!({"name": name, "certificateAuthorityName": ca_name});
            if let Some(d) = validity_days {
                body["validityInDays"] = json!(d);
            }
            if let Some(k) = key_types {
                body["keyTypes"] = json!(k);
            }
            if let Some(l) = issuance_limit {
                body["issuanceLimitPerDay"] = json!(l);
            }
            print_object(&c.send(Method::PUT, &path(&name), Some(&body), &[]).await?.0, c.json, false);
        }
        CredentialPolicyCommand::List { top } => {
            let v = c.get("/credentialPolicies").await?;
            let rows = Listing::of(v["value"].as_array().cloned().unwrap_or_default(), top.top);
            print_list(
                &rows,
                &[
                    ("name", "/name"),
                    ("ca", "/certificateAuthorityName"),
                    ("validityDays", "/validityInDays"),
                    ("keyTypes", "/keyTypes"),
                    ("perDay", "/issuanceLimitPerDay"),
                ],
                c.json,
                false,
            );
        }
        CredentialPolicyCommand::Show { name } => print_object(&c.get(&path(&name)).await?, c.json, false),
        CredentialPolicyCommand::Delete { name } => {
            c.send(Method::DELETE, &path(&name), None, &[]).await?;
            if !c.json {
                println!("credential policy '{name}' deleted");
            }
        }
    }
    Ok(())
}
