//! Device API bodies: `PUT .../register`, `GET .../operations/{id}` and the `POST` status lookup.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The request body a device sends (`DeviceRegistration`).
///
/// Every field is optional: C# sends an empty body over MQTT and AMQP, Node sends `{}` on
/// polls and Python sends `"payload": null`. Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    /// The registration id, if the client repeats it in the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// TPM endorsement and storage root keys (TPM attestation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    /// Custom data for allocation webhooks; `null` is the same as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Base64 of a DER PKCS#10 certificate signing request, without PEM armour: the device
    /// asks for an operational certificate (api-version `2025-07-01-preview` and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// TPM public keys as sent by the device: base64 of marshalled `TPM2B_PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    /// The endorsement key.
    pub endorsement_key: String,
    /// The storage root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

/// `EnrollmentStatus`: the status of a registration operation or record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    /// Listed by DPS without meaning; Provisio never emits it to devices.
    Unassigned,
    /// In progress: keep polling.
    Assigning,
    /// Terminal success.
    Assigned,
    /// Terminal failure; `errorCode` and `errorMessage` say why.
    Failed,
    /// The enrollment or group is disabled; terminal.
    Disabled,
}

/// `AssignedDeviceSubstatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Substatus {
    /// First assignment.
    InitialAssignment,
    /// Moved to another hub with its data.
    DeviceDataMigrated,
    /// Moved to another hub, twin reset to the enrollment's initial twin.
    DeviceDataReset,
    /// No prior record, but the device already existed in the hub.
    ReprovisionedToInitialAssignment,
}

/// `RegistrationOperationStatus`: the body of the register answer and of polls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    /// Opaque operation id; never empty.
    pub operation_id: String,
    /// Mirrors `registrationState.status` when that is present.
    pub status: RegistrationStatus,
    /// Absent on the register answer; present on every poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationResult>,
}

impl RegistrationOperationStatus {
    /// The `202` answer to `PUT .../register`: `{"operationId":…,"status":"assigning"}`.
    #[must_use]
    pub fn accepted(operation_id: impl Into<String>) -> Self {
        Self { operation_id: operation_id.into(), status: RegistrationStatus::Assigning, registration_state: None }
    }

    /// A poll answer carrying `state`; the top-level status mirrors the state's.
    #[must_use]
    pub fn with_state(operation_id: impl Into<String>, state: DeviceRegistrationResult) -> Self {
        Self { operation_id: operation_id.into(), status: state.status, registration_state: Some(state) }
    }
}

/// `DeviceRegistrationResult`: a device's registration state as the device sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationResult {
    /// The registration id, as the device spelled it.
    pub registration_id: String,
    /// When the record was first created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// The assigned IoT hub host name (`assigned` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// The IoT hub device id (`assigned` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status of the registration.
    pub status: RegistrationStatus,
    /// Substatus (`assigned` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    /// Error code (`failed` and `disabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message (`failed` and `disabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Last change of the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Opaque version tag of the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Data returned by a custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Symmetric-key details: the group the device registered through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyRegistrationResult>,
    /// X.509 details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// TPM details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    /// The certificate issued for the registration's `csr`: base64 DER, the leaf first,
    /// then each issuer up to the root. Never in the status lookup's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
}

impl DeviceRegistrationResult {
    /// A result holding only the id and the status (e.g. a poll while assigning).
    #[must_use]
    pub fn bare(registration_id: impl Into<String>, status: RegistrationStatus) -> Self {
        Self {
            registration_id: registration_id.into(),
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status,
            substatus: None,
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: None,
            etag: None,
            payload: None,
            symmetric_key: None,
            x509: None,
            tpm: None,
            issued_certificate_chain: None,
        }
    }
}

/// `X509RegistrationResult`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationResult {
    /// The group the device registered through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The device certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_info: Option<crate::service::X509CertificateInfo>,
    /// The group's certificate the chain ended at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<crate::service::X509CertificateInfo>,
}

/// `SymmetricKeyRegistrationResult`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyRegistrationResult {
    /// The enrollment group the device registered through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
}
