//! The hub registrar webhook's body: the device identity Provisio asks an operator's
//! endpoint to create or update at an IoT hub once the device is assigned there.

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
    /// The custom payload the device sent with its registration (absent when it sent none),
    /// as the custom allocation webhook gets it in `deviceRuntimeContext.payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The SHA-256 thumbprint (upper-case hex) of the operational certificate issued with
    /// this registration, so that a bridge can create the identity at the hub with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_thumbprint: Option<String>,
}

/// The registrar endpoint's answer (any 2xx; the body is optional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrarAnswer {
    /// The identity already existed at the hub.
    #[serde(default)]
    pub already_existed: bool,
}
