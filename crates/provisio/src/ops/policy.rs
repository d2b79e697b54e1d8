//! `provisio policy add|list|show|regenerate-key|remove`.

use anyhow::Result;
use reqwest::Method;
use serde_json::json;

use super::{
    client::{Client, seg},
    output::{print_list, print_object},
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
    },
    /// List the policies and their keys.
    List,
    /// Show one policy.
    Show {
        /// Policy name.
        name: String,
    },
    /// Replace a policy's primary or secondary key.
    RegenerateKey {
        /// Policy name.
        name: String,
        /// Which key.
        #[arg(long, value_parser = ["primary", "secondary"])]
        key: String,
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
        PolicyCommand::Add { name, rights } => {
            let (v, _) = c
                .send(
                    Method::PUT,
                    &format!("/policies/{}", seg(&name)),
                    Some(&json!({"keyName": name, "rights": rights})),
                    &[],
                )
                .await?;
            print_object(&v, c.json);
        }
        PolicyCommand::List => {
            let v = c.get("/policies").await?;
            let rows = v["value"].as_array().cloned().unwrap_or_default();
            print_list(&rows, &[("keyName", "/keyName"), ("rights", "/rights"), ("primaryKey", "/primaryKey")], c.json);
        }
        PolicyCommand::Show { name } => print_object(&c.get(&format!("/policies/{}", seg(&name))).await?, c.json),
        PolicyCommand::RegenerateKey { name, key } => {
            let (v, _) = c
                .send(
                    Method::POST,
                    &format!("/policies/{}/regenerateKey", seg(&name)),
                    Some(&json!({"keyType": key})),
                    &[],
                )
                .await?;
            print_object(&v, c.json);
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
