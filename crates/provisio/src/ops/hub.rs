//! `provisio hub add|list|show|update|remove`: linked IoT hubs.

use anyhow::Result;
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    client::{Client, seg},
    output::{Listing, print_list, print_object},
};

/// Linked hub commands.
#[derive(Debug, clap::Subcommand)]
pub enum HubCommand {
    /// Link a hub.
    Add {
        /// Hub host name.
        name: String,
        #[command(flatten)]
        opts: HubOpts,
    },
    /// List the linked hubs.
    List {
        #[command(flatten)]
        top: super::Top,
        /// Show the registrar webhook URLs' query strings (which may hold keys).
        #[arg(long)]
        show_keys: bool,
    },
    /// Show one linked hub.
    Show {
        /// Hub host name.
        name: String,
        /// Show the registrar webhook URL's query string (which may hold keys).
        #[arg(long)]
        show_keys: bool,
    },
    /// Change a linked hub (only the options given).
    Update {
        /// Hub host name.
        name: String,
        #[command(flatten)]
        opts: HubOpts,
    },
    /// Unlink a hub (its devices stay assigned until they register again).
    Remove {
        /// Hub host name.
        name: String,
    },
}

/// Hub settings.
#[derive(Debug, Clone, clap::Args)]
pub struct HubOpts {
    /// Allocation weight, 1–1000 [default on add: 1].
    #[arg(long)]
    weight: Option<u32>,
    /// Whether the hub takes part in allocation for enrollments that list no hubs.
    #[arg(long)]
    apply_allocation_policy: Option<bool>,
    /// Region, for geoLatency allocation.
    #[arg(long)]
    region: Option<String>,
    /// URL the `webhook` hub registrar POSTs device identities to.
    #[arg(long)]
    registrar_webhook_url: Option<String>,
}

impl HubOpts {
    fn apply(&self, h: &mut Value) {
        if let Some(w) = self.weight {
            h["allocationWeight"] = json!(w);
        }
        if let Some(a) = self.apply_allocation_policy {
            h["applyAllocationPolicy"] = json!(a);
        }
        if let Some(r) = &self.region {
            h["region"] = json!(r);
        }
        if let Some(u) = &self.registrar_webhook_url {
            h["registrarWebhookUrl"] = json!(u);
        }
    }
}

/// Runs a hub command.
pub async fn run(c: &Client, cmd: HubCommand) -> Result<()> {
    let path = |n: &str| format!("/linkedHubs/{}", seg(n));
    match cmd {
        HubCommand::Add { name, opts } => {
            let mut h = json!({"hostName": name});
            opts.apply(&mut h);
            print_object(&c.send(Method::PUT, &path(&name), Some(&h), &[]).await?.0, c.json, false);
        }
        HubCommand::List { top, show_keys } => {
            let v = c.get("/linkedHubs").await?;
            let rows = Listing::of(v["value"].as_array().cloned().unwrap_or_default(), top.top);
            print_list(
                &rows,
                &[
                    ("hostName", "/hostName"),
                    ("weight", "/allocationWeight"),
                    ("applyAllocationPolicy", "/applyAllocationPolicy"),
                    ("region", "/region"),
                    ("registrar", "/registrarWebhookUrl"),
                ],
                c.json,
                show_keys,
            );
        }
        HubCommand::Show { name, show_keys } => print_object(&c.get(&path(&name)).await?, c.json, show_keys),
        HubCommand::Update { name, opts } => {
            let mut h = c.get(&path(&name)).await?;
            opts.apply(&mut h);
            print_object(&c.send(Method::PUT, &path(&name), Some(&h), &[]).await?.0, c.json, false);
        }
        HubCommand::Remove { name } => {
            c.send(Method::DELETE, &path(&name), None, &[]).await?;
            if !c.json {
                println!("hub '{name}' unlinked");
            }
        }
    }
    Ok(())
}
