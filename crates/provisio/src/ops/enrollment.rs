//! `provisio enrollment …` and `provisio enrollment-group …`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    Top,
    client::{Client, seg},
    json_arg,
    output::{print_list, print_object},
    registration::query_all,
};

/// Settings shared by enrollments and groups; on `update`, only the given ones change.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Settings {
    /// Provisioning status.
    #[arg(long, value_parser = ["enabled", "disabled"])]
    status: Option<String>,
    /// Initial twin: JSON, or @file.
    #[arg(long, value_name = "JSON")]
    initial_twin: Option<String>,
    /// Whether devices are IoT Edge devices.
    #[arg(long)]
    iot_edge: Option<bool>,
    /// Hubs the enrollment may be assigned to (comma-separated).
    #[arg(long, value_delimiter = ',')]
    iot_hubs: Option<Vec<String>>,
    /// Allocation policy.
    #[arg(long, value_parser = ["hashed", "geoLatency", "static", "custom"])]
    allocation_policy: Option<String>,
    /// Re-provisioning policy.
    #[arg(long, value_parser = ["reprovisionandmigratedata", "reprovisionandresetdata", "never"])]
    reprovision_policy: Option<String>,
    /// Custom allocation webhook URL.
    #[arg(long)]
    webhook_url: Option<String>,
    /// Enrollment schema version sent to the webhook.
    #[arg(long, default_value = "2021-10-01")]
    webhook_api_version: String,
    /// The credential policy that issues certificates to devices sending a certificate
    /// signing request (`provisio credential-policy`); "" removes it.
    #[arg(long, value_name = "NAME")]
    credential_policy: Option<String>,
}

impl Settings {
    fn apply(&self, e: &mut Value) -> Result<()> {
        if let Some(s) = &self.status {
            e["provisioningStatus"] = json!(s);
        }
        if let Some(t) = &self.initial_twin {
            e["initialTwin"] = json_arg(t, "--initial-twin")?;
        }
        if let Some(b) = self.iot_edge {
            e["capabilities"] = json!({"iotEdge": b});
        }
        if let Some(h) = &self.iot_hubs {
            e["iotHubs"] = json!(h);
        }
        if let Some(p) = &self.allocation_policy {
            e["allocationPolicy"] = json!(p);
        }
        if let Some(p) = &self.reprovision_policy {
            e["reprovisionPolicy"] = match p.as_str() {
                "reprovisionandmigratedata" => json!({"updateHubAssignment": true, "migrateDeviceData": true}),
                "reprovisionandresetdata" => json!({"updateHubAssignment": true, "migrateDeviceData": false}),
                _ => json!({"updateHubAssignment": false, "migrateDeviceData": false}),
            };
        }
        if let Some(u) = &self.webhook_url {
            e["customAllocationDefinition"] = json!({"webhookUrl": u, "apiVersion": self.webhook_api_version});
        }
        match self.credential_policy.as_deref().map(str::trim) {
            Some("") => {
                if let Some(o) = e.as_object_mut() {
                    o.remove("credentialPolicyName");
                }
            }
            Some(p) => e["credentialPolicyName"] = json!(p),
            None => {}
        }
        Ok(())
    }
}

/// How devices authenticate; on `update`, given values replace the stored ones.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AttestationArgs {
    /// Attestation type [default on create: symmetric-key].
    #[arg(long, value_parser = ["symmetric-key", "x509", "tpm"])]
    attestation: Option<String>,
    /// Symmetric primary key (base64; generated when omitted).
    #[arg(long)]
    primary_key: Option<String>,
    /// Symmetric secondary key (base64; generated when omitted).
    #[arg(long)]
    secondary_key: Option<String>,
    /// X.509 certificate file: the device's (enrollment) or the group's signing CA.
    #[arg(long, value_name = "FILE")]
    certificate: Option<PathBuf>,
    /// X.509 secondary certificate file.
    #[arg(long, value_name = "FILE")]
    secondary_certificate: Option<PathBuf>,
    /// Group: name of a verified CA certificate (instead of --certificate).
    #[arg(long, value_name = "NAME")]
    ca_name: Option<String>,
    /// Group: name of a secondary verified CA certificate.
    #[arg(long, value_name = "NAME")]
    secondary_ca_name: Option<String>,
    /// TPM endorsement key (base64).
    #[arg(long)]
    endorsement_key: Option<String>,
    /// TPM storage root key (base64).
    #[arg(long)]
    storage_root_key: Option<String>,
}

impl AttestationArgs {
    /// The attestation type (wire name) the options name or imply; `None` when none is given.
    fn kind(&self) -> Option<&'static str> {
        match self.attestation.as_deref() {
            Some("symmetric-key") => Some("symmetricKey"),
            Some("x509") => Some("x509"),
            Some("tpm") => Some("tpm"),
            _ if self.certificate.is_some()
                || self.secondary_certificate.is_some()
                || self.ca_name.is_some()
                || self.secondary_ca_name.is_some() =>
            {
                Some("x509")
            }
            _ if self.endorsement_key.is_some() || self.storage_root_key.is_some() => Some("tpm"),
            _ if self.primary_key.is_some() || self.secondary_key.is_some() => Some("symmetricKey"),
            _ => None,
        }
    }

    /// The attestation of an update: `current` (as read, keys included) with the options
    /// given applied to it, as `az iot dps enrollment update` does; another type, or the
    /// other form of a group's X.509 attestation, is built afresh.
    fn patch(&self, current: &Value, group: bool, remove_secondary: bool) -> Result<Value> {
        let cur = current["type"].as_str().unwrap_or_default();
        if remove_secondary && cur != "x509" {
            bail!("--remove-secondary-certificate is for X.509 attestation; this one uses {cur}");
        }
        if !group && (self.ca_name.is_some() || self.secondary_ca_name.is_some()) {
            bail!("--ca-name and --secondary-ca-name are for enrollment groups; give --certificate");
        }
        let mut a = current.clone();
        let kind = self.kind().unwrap_or(cur);
        let refs = a["x509"].get("caReferences").is_some_and(|r| !r.is_null());
        let other_form = group
            && kind == "x509"
            && if refs {
                self.certificate.is_some() || self.secondary_certificate.is_some()
            } else {
                self.ca_name.is_some() || self.secondary_ca_name.is_some()
            };
        if kind != cur || other_form {
            if remove_secondary {
                bail!("--remove-secondary-certificate cannot go with a new kind of attestation");
            }
            return self.build(group);
        }
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
        let set = |v: &mut Value, field: &str, new: Option<Value>| {
            if let Some(n) = new {
                v[field] = n;
            }
        };
        match kind {
            "symmetricKey" => {
                let sk = &mut a["symmetricKey"];
                set(sk, "primaryKey", self.primary_key.as_ref().map(|k| json!(k)));
                set(sk, "secondaryKey", self.secondary_key.as_ref().map(|k| json!(k)));
            }
            "tpm" => {
                let t = &mut a["tpm"];
                set(t, "endorsementKey", self.endorsement_key.as_ref().map(|k| json!(k)));
                set(t, "storageRootKey", self.storage_root_key.as_ref().map(|k| json!(k)));
            }
            _ => {
                let (slot, primary, secondary) = if refs {
                    (
                        "caReferences",
                        self.ca_name.as_ref().map(|n| json!(n)),
                        self.secondary_ca_name.as_ref().map(|n| json!(n)),
                    )
                } else {
                    let cert = |p: &Option<PathBuf>| -> Result<Option<Value>> {
                        p.as_ref().map(|p| Ok(json!({"certificate": read(p)?}))).transpose()
                    };
                    (
                        if group { "signingCertificates" } else { "clientCertificates" },
                        cert(&self.certificate)?,
                        cert(&self.secondary_certificate)?,
                    )
                };
                let certs = &mut a["x509"][slot];
                if remove_secondary && let Some(o) = certs.as_object_mut() {
                    // Slots sent back with only their `info` keep their stored certificate;
                    // an absent slot is removed.
                    o.remove("secondary");
                }
                set(certs, "primary", primary);
                set(certs, "secondary", secondary);
            }
        }
        Ok(a)
    }

    fn build(&self, group: bool) -> Result<Value> {
        let kind = self.kind().unwrap_or("symmetricKey");
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
        Ok(match kind {
            "symmetricKey" => {
                json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key}})
            }
            "tpm" => {
                let Some(ek) = &self.endorsement_key else { bail!("--attestation tpm needs --endorsement-key") };
                json!({"type": "tpm", "tpm": {"endorsementKey": ek, "storageRootKey": self.storage_root_key}})
            }
            _ => {
                let certs = |p: &Option<PathBuf>| -> Result<Value> {
                    Ok(match p {
                        Some(p) => json!({"certificate": read(p)?}),
                        None => Value::Null,
                    })
                };
                let x509 = if group && self.ca_name.is_some() {
                    json!({"caReferences": {"primary": self.ca_name, "secondary": self.secondary_ca_name}})
                } else {
                    let Some(_) = &self.certificate else {
                        bail!(if group {
                            "x509 groups need --certificate (a root or intermediate) or --ca-name"
                        } else {
                            "x509 enrollments need --certificate (the device certificate)"
                        })
                    };
                    let pair =
                        json!({"primary": certs(&self.certificate)?, "secondary": certs(&self.secondary_certificate)?});
                    if group { json!({"signingCertificates": pair}) } else { json!({"clientCertificates": pair}) }
                };
                json!({"type": "x509", "x509": x509})
            }
        })
    }
}

/// Individual enrollment commands.
#[derive(Debug, clap::Subcommand)]
pub enum EnrollmentCommand {
    /// Create an individual enrollment.
    Create {
        /// Registration id.
        id: String,
        /// IoT hub device id [default: the registration id].
        #[arg(long)]
        device_id: Option<String>,
        /// optionalDeviceInformation: JSON, or @file.
        #[arg(long, value_name = "JSON")]
        device_information: Option<String>,
        #[command(flatten)]
        attestation: AttestationArgs,
        #[command(flatten)]
        settings: Settings,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// Show an enrollment.
    Show {
        /// Registration id.
        id: String,
        /// Fetch the keys and show them in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// List enrollments.
    List {
        #[command(flatten)]
        top: Top,
    },
    /// Change an enrollment (read, modify, write back with its etag).
    Update {
        /// Registration id.
        id: String,
        /// IoT hub device id.
        #[arg(long)]
        device_id: Option<String>,
        /// Write only if the enrollment still has this etag ('*' for any) [default: the etag just read].
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        attestation: AttestationArgs,
        #[command(flatten)]
        settings: Settings,
        /// Remove the secondary X.509 certificate (or secondary CA reference), keeping the
        /// primary.
        #[arg(long, visible_alias = "rsc", conflicts_with_all = ["secondary_certificate", "secondary_ca_name"])]
        remove_secondary_certificate: bool,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// Delete an enrollment.
    Delete {
        /// Registration id.
        id: String,
        /// Only if it still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Create (or update) many enrollments from a CSV or JSON file, in bulk operations.
    Import {
        /// A JSON array of enrollments, or a CSV with a header row: registrationId and any of
        /// deviceId, primaryKey, secondaryKey, provisioningStatus, iotHubs (';'-separated).
        file: PathBuf,
        /// create fails on existing ids; update replaces them (`If-Match: *` per item).
        #[arg(long, default_value = "create", value_parser = ["create", "update"])]
        mode: String,
        /// Items per bulk request (the server's limit is 10 by default).
        #[arg(long, default_value_t = 10)]
        batch: usize,
    },
}

/// Enrollment group commands.
#[derive(Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// Create an enrollment group.
    Create {
        /// Group id.
        id: String,
        #[command(flatten)]
        attestation: AttestationArgs,
        #[command(flatten)]
        settings: Settings,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// Show a group.
    Show {
        /// Group id.
        id: String,
        /// Fetch the keys and show them in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// List groups.
    List {
        #[command(flatten)]
        top: Top,
    },
    /// Change a group (read, modify, write back with its etag).
    Update {
        /// Group id.
        id: String,
        /// Write only if the group still has this etag ('*' for any) [default: the etag just read].
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        attestation: AttestationArgs,
        #[command(flatten)]
        settings: Settings,
        /// Remove the secondary X.509 certificate (or secondary CA reference), keeping the
        /// primary.
        #[arg(long, visible_alias = "rsc", conflicts_with_all = ["secondary_certificate", "secondary_ca_name"])]
        remove_secondary_certificate: bool,
        /// Show the keys in full.
        #[arg(long)]
        show_keys: bool,
    },
    /// Delete a group.
    Delete {
        /// Group id.
        id: String,
        /// Only if it still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
    /// The device key of a device of a symmetric-key group: HMAC-SHA256 of the
    /// registration id under the group key.
    ComputeDeviceKey {
        /// Group id (its primary key is fetched), unless --group-key is given.
        id: Option<String>,
        /// Registration id of the device.
        #[arg(long)]
        registration_id: String,
        /// The group key itself (no server needed).
        #[arg(long)]
        group_key: Option<String>,
    },
}

const ENROLLMENT_COLUMNS: &[(&str, &str)] = &[
    ("registrationId", "/registrationId"),
    ("attestation", "/attestation/type"),
    ("status", "/provisioningStatus"),
    ("deviceId", "/deviceId"),
    ("iotHubs", "/iotHubs"),
    ("updated", "/lastUpdatedDateTimeUtc"),
];

const GROUP_COLUMNS: &[(&str, &str)] = &[
    ("enrollmentGroupId", "/enrollmentGroupId"),
    ("attestation", "/attestation/type"),
    ("status", "/provisioningStatus"),
    ("iotHubs", "/iotHubs"),
    ("updated", "/lastUpdatedDateTimeUtc"),
];

async fn show(c: &Client, group: bool, id: &str, keys: bool) -> Result<Value> {
    let base = if group { "enrollmentGroups" } else { "enrollments" };
    let mut v = c.get(&format!("/{base}/{}", seg(id))).await?;
    if keys {
        let (am, _) = c.send(Method::POST, &format!("/{base}/{}/attestationmechanism", seg(id)), None, &[]).await?;
        v["attestation"] = am;
    }
    Ok(v)
}

/// What `update` changes.
struct Change {
    etag: Option<String>,
    attestation: AttestationArgs,
    settings: Settings,
    device_id: Option<String>,
    remove_secondary_certificate: bool,
}

async fn update(c: &Client, group: bool, id: &str, ch: Change) -> Result<Value> {
    let base = if group { "enrollmentGroups" } else { "enrollments" };
    // Read with keys, so that writing back keeps them.
    let mut v = show(c, group, id, true).await?;
    if let Some(o) = v.as_object_mut() {
        o.remove("registrationState");
    }
    v["attestation"] = ch.attestation.patch(&v["attestation"], group, ch.remove_secondary_certificate)?;
    if let Some(d) = ch.device_id {
        v["deviceId"] = json!(d);
    }
    ch.settings.apply(&mut v)?;
    let m = ch.etag.or_else(|| v["etag"].as_str().map(str::to_owned)).unwrap_or_else(|| "*".into());
    Ok(c.send(Method::PUT, &format!("/{base}/{}", seg(id)), Some(&v), &[("If-Match", &m)]).await?.0)
}

async fn delete(c: &Client, group: bool, id: &str, etag: Option<String>) -> Result<()> {
    let base = if group { "enrollmentGroups" } else { "enrollments" };
    let h: Vec<(&str, &str)> = etag.as_deref().map(|e| vec![("If-Match", e)]).unwrap_or_default();
    c.send(Method::DELETE, &format!("/{base}/{}", seg(id)), None, &h).await?;
    if !c.json {
        println!("{} '{id}' deleted", if group { "enrollment group" } else { "enrollment" });
    }
    Ok(())
}

/// Runs an enrollment command.
pub async fn run_enrollment(c: &Client, cmd: EnrollmentCommand) -> Result<()> {
    match cmd {
        EnrollmentCommand::Create { id, device_id, device_information, attestation, settings, show_keys } => {
            let mut e = json!({"registrationId": id, "attestation": attestation.build(false)?});
            if let Some(d) = device_id {
                e["deviceId"] = json!(d);
            }
            if let Some(i) = device_information {
                e["optionalDeviceInformation"] = json_arg(&i, "--device-information")?;
            }
            settings.apply(&mut e)?;
            let (v, _) = c.send(Method::PUT, &format!("/enrollments/{}", seg(&id)), Some(&e), &[]).await?;
            print_object(&v, c.json, show_keys);
        }
        EnrollmentCommand::Show { id, show_keys } => {
            print_object(&show(c, false, &id, show_keys).await?, c.json, show_keys);
        }
        EnrollmentCommand::List { top } => {
            let rows = query_all(c, "/enrollments/query", &json!({"query": "SELECT * FROM enrollments"}), top).await?;
            print_list(&rows, ENROLLMENT_COLUMNS, c.json, false);
        }
        EnrollmentCommand::Update {
            id,
            device_id,
            etag,
            attestation,
            settings,
            remove_secondary_certificate,
            show_keys,
        } => {
            let ch = Change { etag, attestation, settings, device_id, remove_secondary_certificate };
            print_object(&update(c, false, &id, ch).await?, c.json, show_keys);
        }
        EnrollmentCommand::Delete { id, etag } => delete(c, false, &id, etag).await?,
        EnrollmentCommand::Import { file, mode, batch } => import(c, &file, &mode, batch).await?,
    }
    Ok(())
}

/// Runs an enrollment-group command.
pub async fn run_group(c: &Client, cmd: GroupCommand) -> Result<()> {
    match cmd {
        GroupCommand::Create { id, attestation, settings, show_keys } => {
            let mut g = json!({"enrollmentGroupId": id, "attestation": attestation.build(true)?});
            settings.apply(&mut g)?;
            let (v, _) = c.send(Method::PUT, &format!("/enrollmentGroups/{}", seg(&id)), Some(&g), &[]).await?;
            print_object(&v, c.json, show_keys);
        }
        GroupCommand::Show { id, show_keys } => print_object(&show(c, true, &id, show_keys).await?, c.json, show_keys),
        GroupCommand::List { top } => {
            let rows =
                query_all(c, "/enrollmentGroups/query", &json!({"query": "SELECT * FROM enrollmentGroups"}), top)
                    .await?;
            print_list(&rows, GROUP_COLUMNS, c.json, false);
        }
        GroupCommand::Update { id, etag, attestation, settings, remove_secondary_certificate, show_keys } => {
            let ch = Change { etag, attestation, settings, device_id: None, remove_secondary_certificate };
            print_object(&update(c, true, &id, ch).await?, c.json, show_keys);
        }
        GroupCommand::Delete { id, etag } => delete(c, true, &id, etag).await?,
        GroupCommand::ComputeDeviceKey { .. } => unreachable!("handled without a connection"),
    }
    Ok(())
}

/// `enrollment-group compute-device-key`: local when the group key is given.
pub async fn compute_device_key(
    c: Option<&Client>,
    id: Option<String>,
    registration_id: &str,
    group_key: Option<String>,
) -> Result<()> {
    let key = match (group_key, id, c) {
        (Some(k), _, _) => k,
        (None, Some(id), Some(c)) => {
            let (am, _) = c
                .send(Method::POST, &format!("/enrollmentGroups/{}/attestationmechanism", seg(&id)), None, &[])
                .await?;
            am["symmetricKey"]["primaryKey"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("group '{id}' has no symmetric key (it uses {} attestation)", am["type"]))?
        }
        _ => bail!("give the group id (and a connection string) or --group-key"),
    };
    println!("{}", provisio_core::keys::derive_device_key(&key, registration_id)?);
    Ok(())
}

/// Reads enrollments from a JSON array or a CSV file.
fn read_items(file: &PathBuf) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON array of enrollments", file.display()))?;
        return Ok(v);
    }
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text.as_bytes());
    let headers = rdr.headers()?.clone();
    if !headers.iter().any(|h| h == "registrationId") {
        bail!("{}: the CSV header row needs a registrationId column", file.display());
    }
    let mut out = Vec::new();
    for (line, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", file.display(), line + 2))?;
        let get =
            |name: &str| headers.iter().position(|h| h == name).and_then(|i| rec.get(i)).filter(|v| !v.is_empty());
        let mut e = json!({
            "registrationId": get("registrationId").unwrap_or_default(),
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": get("primaryKey"), "secondaryKey": get("secondaryKey")}},
        });
        if let Some(d) = get("deviceId") {
            e["deviceId"] = json!(d);
        }
        if let Some(s) = get("provisioningStatus") {
            e["provisioningStatus"] = json!(s);
        }
        if let Some(h) = get("iotHubs") {
            e["iotHubs"] = json!(h.split(';').map(str::trim).collect::<Vec<_>>());
        }
        out.push(e);
    }
    Ok(out)
}

async fn import(c: &Client, file: &PathBuf, mode: &str, batch: usize) -> Result<()> {
    let items = read_items(file)?;
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} enrollments ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut failures = Vec::new();
    for chunk in items.chunks(batch.max(1)) {
        let body = json!({"mode": mode, "enrollments": chunk.iter().map(|e| {
            let mut e = e.clone();
            if mode == "update" { e["etag"] = json!("*"); }
            e
        }).collect::<Vec<_>>()});
        let (r, _) = c.send(Method::POST, "/enrollments", Some(&body), &[]).await?;
        failures.extend(r["errors"].as_array().cloned().unwrap_or_default());
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let ok = items.len() - failures.len();
    if c.json {
        println!("{}", json!({"total": items.len(), "succeeded": ok, "errors": failures}));
    } else {
        println!("imported {ok} of {} enrollments", items.len());
        for f in &failures {
            println!(
                "  {}: {} ({})",
                f["registrationId"].as_str().unwrap_or("?"),
                f["errorStatus"].as_str().unwrap_or(""),
                f["errorCode"]
            );
        }
    }
    if failures.is_empty() { Ok(()) } else { bail!("{} enrollment(s) were not imported", failures.len()) }
}
