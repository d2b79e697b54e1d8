//! Service API bodies: individual enrollments, enrollment groups and registration states
//! (`spec/service-api.md` §1.4–1.6).
//!
//! Twin collections (`initialTwin`, `optionalDeviceInformation`) are raw JSON and are
//! echoed verbatim; the server never interprets their keys.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::device::{RegistrationStatus, Substatus};

/// `provisioningStatus` of an enrollment or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    /// Devices may register (the default).
    #[default]
    Enabled,
    /// Registrations end with status `disabled`.
    Disabled,
}

/// `AttestationMechanism`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    /// `none`, `tpm`, `x509` or `symmetricKey`.
    #[serde(rename = "type")]
    pub kind: String,
    /// TPM attestation (individual enrollments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    /// X.509 attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<Value>,
    /// Symmetric-key attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
}

/// `SymmetricKeyAttestation`; keys are base64 of 16–64 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    /// Primary key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Secondary key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

/// `ReprovisionPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Re-run allocation when the device registers again.
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    /// Migrate the device's data when it moves.
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

/// `CustomAllocationDefinition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    /// The webhook called at registration time.
    pub webhook_url: String,
    /// Version of the enrollment schema sent to the webhook.
    pub api_version: String,
}

/// `DeviceCapabilities`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    /// Whether the device is an IoT Edge device.
    #[serde(default)]
    pub iot_edge: bool,
}

/// `IndividualEnrollment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    /// The registration id (required).
    pub registration_id: String,
    /// Desired IoT hub device id; defaults to the registration id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Read-only: the registration state of the device (GET only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
    /// Free-form device information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    /// How the device proves its identity.
    pub attestation: AttestationMechanism,
    /// Device capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Legacy single-hub field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin (raw JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// Opaque version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled; absent means enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Re-provisioning behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Read-only creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Read-only last-update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// `hashed`, `geoLatency`, `static` or `custom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<String>,
    /// Hub host names this enrollment may be assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
}

/// `EnrollmentGroup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    /// The group id (required).
    pub enrollment_group_id: String,
    /// How devices of the group prove their identity.
    pub attestation: AttestationMechanism,
    /// Device capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Legacy single-hub field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin (raw JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// Opaque version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled; absent means enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Re-provisioning behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Read-only creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Read-only last-update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// `hashed`, `geoLatency`, `static` or `custom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<String>,
    /// Hub host names devices of this group may be assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
}

/// `DeviceRegistrationState`, as the service API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    /// Registration id.
    pub registration_id: String,
    /// Creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Assigned hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device id in the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status.
    pub status: RegistrationStatus,
    /// Substatus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    /// Error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Webhook payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}
