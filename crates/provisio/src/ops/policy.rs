//! `provisio policy add|list|show|connection-string|regenerate-key|remove`.

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{Value, json};

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
    /// Print a policy's service connection string, with the host name this command
    /// connects to (as `az iot dps connection-string show`). A subcommand rather than
    /// `show --connection-string`, which is already the option that takes one.
    ConnectionString {
        /// Policy name.
        #[arg(default_value = "provisioningserviceowner")]
        name: String,
        /// The key the connection string holds.
        #[arg(long, default_value = "primary", value_parser = ["primary", "secondary"])]
        key_type: String,
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

/// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` of `policy` with its `key_type` key.
///
/// # Errors
/// When the policy has no such key.
pub fn connection_string(host: &str, policy: &Value, key_type: &str) -> Result<String> {
    let field = if key_type == "secondary" { "secondaryKey" } else { "primaryKey" };
    let name = policy["keyName"].as_str().context("the policy has no keyName")?;
    let key = policy[field].as_str().with_context(|| format!("policy '{name}' has no {key_type} key"))?;
    Ok(format!("HostName={host};SharedAccessKeyName={name};SharedAccessKey={key}"))
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
        PolicyCommand::ConnectionString { name, key_type } => {
            let p = c.get(&format!("/policies/{}", seg(&name))).await?;
            let cs = connection_string(c.host_name(), &p, &key_type)?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&json!({ "connectionString": cs }))?);
            } else {
                println!("{cs}");
            }
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
