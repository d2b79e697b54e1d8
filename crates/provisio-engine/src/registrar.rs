//! Hub registrars: what happens at the IoT hub once a device is assigned.
//!
//! DPS creates the device identity in the hub. Provisio hands that step to a
//! [`HubRegistrar`]: `none` (the default) does nothing, `webhook` POSTs the identity, its
//! credentials and its initial twin ([`HubDevice`]) to a per-hub URL, so operators can
//! bridge to their own IoT platform.

use std::time::Duration;

pub use provisio_proto::registrar::{HubAuthentication, HubDevice, RegistrarAnswer};

use crate::webhook::{Failed, Shown, WebhookClient};

/// What the registrar found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegistrarOutcome {
    /// The identity already existed at the hub (gives `reprovisionedToInitialAssignment`
    /// when DPS had no record of the device).
    pub already_existed: bool,
}

/// Why the identity could not be created at the hub. Its `Display` is what the device may
/// read (a status code, or that no usable answer came); [`RegistrarError::detail`] is the
/// precise reason, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrarError {
    /// The hub.
    pub hub: String,
    /// The call's failure.
    pub failure: Failed,
}

impl RegistrarError {
    /// The precise reason: the answer's start, the refused address or the connection error.
    #[must_use]
    pub fn detail(&self) -> String {
        format!("hub registrar for {}: {}", self.hub, self.failure)
    }
}

impl std::fmt::Display for RegistrarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hub = &self.hub;
        match self.failure.last.shown() {
            Shown::Status(status) => write!(f, "the hub registrar for {hub} answered HTTP {status}"),
            Shown::NotJson => write!(f, "the hub registrar for {hub} gave an answer that is not JSON"),
            Shown::TooLarge => write!(f, "the hub registrar for {hub} gave too large an answer"),
            Shown::Unreachable => write!(f, "the hub registrar for {hub} could not be reached"),
        }
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
        let (answer, _) = self
            .client
            .post(url, device, Duration::from_millis(250))
            .await
            .map_err(|failure| RegistrarError { hub: device.iot_hub_host_name.clone(), failure })?;
        // Any 2xx creates the device; a body that says nothing we know is "did not exist".
        let answer: RegistrarAnswer = serde_json::from_slice(&answer).unwrap_or_default();
        Ok(RegistrarOutcome { already_existed: answer.already_existed })
    }
}
