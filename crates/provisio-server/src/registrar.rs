//! Hub registrars: what happens at the IoT hub once a device is assigned.
//!
//! DPS creates the device identity in the hub. Provisio hands that step to a
//! [`HubRegistrar`]: `none` (the default) does nothing, `webhook` POSTs the identity, its
//! credentials and its initial twin to a per-hub URL, so operators can bridge to their own
//! IoT platform.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the device authenticates at the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum HubAuthentication {
    /// SAS with the same key the device used at DPS (its individual key, or the key
    /// derived from the group key).
    #[serde(rename_all = "camelCase")]
    Sas {
        /// Primary key.
        primary_key: String,
        /// Secondary key.
        secondary_key: String,
    },
    /// X.509, by the SHA-256 thumbprint of the device certificate (`selfSigned` in IoT Hub).
    #[serde(rename_all = "camelCase")]
    SelfSigned {
        /// SHA-256 thumbprint, upper-case hex.
        primary_thumbprint: String,
    },
}

/// The identity to create or update at a hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubDevice {
    /// The hub host name.
    pub iot_hub_host_name: String,
    /// Device id in the hub.
    pub device_id: String,
    /// Registration id at DPS.
    pub registration_id: String,
    /// Credentials.
    pub authentication: HubAuthentication,
    /// IoT Edge device.
    pub iot_edge: bool,
    /// The initial twin to apply (absent when the device keeps its twin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// The hub the device leaves, if it moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_iot_hub_host_name: Option<String>,
    /// Whether the twin moves with the device (`deviceDataMigrated`).
    pub migrate_device_data: bool,
}

/// What the registrar found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegistrarOutcome {
    /// The identity already existed at the hub (gives `reprovisionedToInitialAssignment`
    /// when DPS had no record of the device).
    pub already_existed: bool,
}

/// Creates device identities at hubs.
#[async_trait::async_trait]
pub trait HubRegistrar: Send + Sync {
    /// Creates or updates `device` at `url` (the hub's registrar endpoint, if any).
    ///
    /// # Errors
    /// A message naming the cause; the registration then fails.
    async fn register(&self, url: Option<&str>, device: &HubDevice) -> Result<RegistrarOutcome, String>;
}

/// Does nothing: hubs are managed elsewhere.
#[derive(Debug, Default)]
pub struct NoRegistrar;

#[async_trait::async_trait]
impl HubRegistrar for NoRegistrar {
    async fn register(&self, _url: Option<&str>, _device: &HubDevice) -> Result<RegistrarOutcome, String> {
        Ok(RegistrarOutcome::default())
    }
}

/// POSTs the identity to the hub's `registrarWebhookUrl`, with retries; hubs without a URL
/// are skipped. The endpoint answers 2xx, optionally with `{"alreadyExisted": true}`.
pub struct WebhookRegistrar {
    http: reqwest::Client,
    attempts: u32,
}

impl WebhookRegistrar {
    /// A registrar using `http`, trying each call `attempts` times.
    #[must_use]
    pub fn new(http: reqwest::Client, attempts: u32) -> Self {
        Self { http, attempts: attempts.max(1) }
    }
}

#[async_trait::async_trait]
impl HubRegistrar for WebhookRegistrar {
    async fn register(&self, url: Option<&str>, device: &HubDevice) -> Result<RegistrarOutcome, String> {
        let Some(url) = url else { return Ok(RegistrarOutcome::default()) };
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
            }
            match self.http.post(url).json(device).send().await {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    return Ok(RegistrarOutcome {
                        already_existed: v.get("alreadyExisted").and_then(Value::as_bool).unwrap_or(false),
                    });
                }
                Ok(r) if r.status().is_client_error() => {
                    return Err(format!(
                        "the hub registrar for {} answered HTTP {}",
                        device.iot_hub_host_name,
                        r.status().as_u16()
                    ));
                }
                Ok(r) => {
                    last = format!(
                        "the hub registrar for {} answered HTTP {}",
                        device.iot_hub_host_name,
                        r.status().as_u16()
                    )
                }
                Err(e) => {
                    last = format!(
                        "the hub registrar for {} could not be reached: {}",
                        device.iot_hub_host_name,
                        redact(&e)
                    )
                }
            }
        }
        Err(format!("{last} (after {} attempts)", self.attempts))
    }
}

/// A reqwest error without the URL's query string (it may hold a function key).
pub(crate) fn redact(e: &reqwest::Error) -> String {
    let mut e2 = e.to_string();
    if let Some(u) = e.url()
        && let Some(q) = u.query()
    {
        e2 = e2.replace(q, "****");
    }
    if e.is_timeout() { format!("timed out ({e2})") } else { e2 }
}
