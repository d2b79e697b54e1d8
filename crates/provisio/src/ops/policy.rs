//! `provisio policy add|list|show|regenerate-key|remove`.

use anyhow::Result;
use reqwest::Method;
use serde_json::json;

use super::{
    client::{Client, seg},
    output::{Listing, print_list, print_object},
};

/// Shared access policy commands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Add a policy (or change the rights of an existing one); keys are generated.
    Add {
        /// Policy name.
        name: String,
        /// Comma-separated rights: ServiceConfig, EnrollmentRead, EnrollmentWrite,
        /// RegistrationStatusRead, RegistrationStatusWrite, DeviceConnect.
        #[arg(long)]
        rights: String,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// List the policies.
    List {
        #[command(flatten)]
        top: super::Top,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// Show one policy.
    Show {
        /// Policy name.
        name: String,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// Replace a policy's primary or secondary key.
    RegenerateKey {
        /// Policy name.
        name: String,
        /// Which key.
        #[arg(long, value_parser = ["primary", "secondary"])]
        key: String,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// Remove a policy.
    Remove {
        /// Policy name.
        name: String,
    },
}

/// Runs a policy command.
pub async fn run(c: &Client, cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Add { name, rights, show_keys } => {
            let (v, _) = c
                .send(
                    Method::PUT,
                    &format!("/policies/{}", seg(&name)),
                    Some(&json!({"keyName": name, "rights": rights})),
                    &[],
                )
                .await?;
            print_object(&v, c.json, show_keys);
        }
        PolicyCommand::List { top, show_keys } => {
            let v = c.get("/policies").await?;
            let rows = Listing::of(v["value"].as_array().cloned().unwrap_or_default(), top.top);
            print_list(
                &rows,
                &[("keyName", "/keyName"), ("rights", "/rights"), ("primaryKey", "/primaryKey")],
                c.json,
                show_keys,
            );
        }
        PolicyCommand::Show { name, show_keys } => {
            print_object(&c.get(&format!("/policies/{}", seg(&name))).await?, c.json, show_keys);
        }
        PolicyCommand::RegenerateKey { name, key, show_keys } => {
            let (v, _) = c
                .send(
                    Method::POST,
                    &format!("/policies/{}/regenerateKey", seg(&name)),
                    Some(&json!({"keyType": key})),
                    &[],
                )
                .await?;
            print_object(&v, c.json, show_keys);
        }
        PolicyCommand::Remove { name } => {
            c.send(Method::DELETE, &format!("/policies/{}", seg(&name)), None, &[]).await?;
            if !c.json {
                println!("policy '{name}' removed");
            }
        }
    }
    Ok(())
}
