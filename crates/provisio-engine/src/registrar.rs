//! Hub registrars: what happens at the IoT hub once a device is assigned.
//!
//! DPS creates the device identity in the hub. Provisio hands that step to a
//! [`HubRegistrar`]: `none` (the default) does nothing, `webhook` POSTs the identity, its
//! credentials and its initial twin ([`HubDevice`]) to a per-hub URL, so operators can
//! bridge to their own IoT platform.

use std::time::Duration;

pub use provisio_proto::registrar::{HubAuthentication, HubDevice, RegistrarAnswer};

use crate::webhook::{CallError, Failed, WebhookClient};

/// What the registrar found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegistrarOutcome {
    /// The identity already existed at the hub (gives `reprovisionedToInitialAssignment`
    /// when DPS had no record of the device).
    pub already_existed: bool,
}

/// Why the identity could not be created at the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrarError {
    /// The hub.
    pub hub: String,
    /// The call's failure.
    pub failure: Failed,
}

impl std::fmt::Display for RegistrarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hub = &self.hub;
        match &self.failure.last {
            CallError::Status { status, .. } => write!(f, "the hub registrar for {hub} answered HTTP {status}")?,
            CallError::Unreachable(e) => write!(f, "the hub registrar for {hub} could not be reached: {e}")?,
            other => write!(f, "the hub registrar for {hub} failed: {other}")?,
        }
        if self.failure.attempts > 1 {
            write!(f, " (after {} attempts)", self.failure.attempts)?;
        }
        Ok(())
    }
}

impl std::error::Error for RegistrarError {}

/// Creates device identities at hubs.
#[async_trait::async_trait]
pub trait HubRegistrar: Send + Sync {
    /// Creates or updates `device` at `url` (the hub's registrar endpoint, if any).
    ///
    /// # Errors
    /// Why it failed; the registration then fails.
    async fn register(&self, url: Option<&str>, device: &HubDevice) -> Result<RegistrarOutcome, RegistrarError>;
}

/// Does nothing: hubs are managed elsewhere.
#[derive(Debug, Default)]
pub struct NoRegistrar;

#[async_trait::async_trait]
impl HubRegistrar for NoRegistrar {
    async fn register(&self, _url: Option<&str>, _device: &HubDevice) -> Result<RegistrarOutcome, RegistrarError> {
        Ok(RegistrarOutcome::default())
    }
}

/// POSTs the identity to the hub's `registrarWebhookUrl`, with retries; hubs without a URL
/// are skipped. The endpoint answers 2xx, optionally with `{"alreadyExisted": true}`.
pub struct WebhookRegistrar {
    client: WebhookClient,
}

impl WebhookRegistrar {
    /// A registrar calling with `client`.
    #[must_use]
    pub fn new(client: WebhookClient) -> Self {
        Self { client }
    }
}

#[async_trait::async_trait]
impl HubRegistrar for WebhookRegistrar {
    async fn register(&self, url: Option<&str>, device: &HubDevice) -> Result<RegistrarOutcome, RegistrarError> {
        let Some(url) = url else { return Ok(RegistrarOutcome::default()) };
        let (text, _) = self
            .client
            .post(url, device, Duration::from_millis(250))
            .await
            .map_err(|failure| RegistrarError { hub: device.iot_hub_host_name.clone(), failure })?;
        // Any 2xx creates the device; a body that says nothing we know is "did not exist".
        let answer: RegistrarAnswer = serde_json::from_str(&text).unwrap_or_default();
        Ok(RegistrarOutcome { already_existed: answer.already_existed })
    }
}
