//! Enrollments, groups and registration records, as Provisio stores them.
//!
//! These are Provisio's own serde shapes (the store keeps them as JSON documents); the
//! service API's wire shapes live in `provisio-proto` and are converted at the edge.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a device proves its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
// Values are handled one at a time, never in bulk arrays, so the size difference is moot.
#[allow(clippy::large_enum_variant)]
pub enum Attestation {
    /// Symmetric keys (base64). For a group these are group keys from which device keys
    /// are derived.
    #[serde(rename_all = "camelCase")]
    SymmetricKey {
        /// Primary key.
        primary_key: String,
        /// Secondary key.
        secondary_key: String,
    },
    /// X.509 certificates.
    X509(X509Attestation),
    /// TPM endorsement key (individual enrollments).
    #[serde(rename_all = "camelCase")]
    Tpm {
        /// Base64 of the EK's `TPM2B_PUBLIC`.
        endorsement_key: String,
        /// Base64 of the SRK's `TPM2B_PUBLIC`, if given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        storage_root_key: Option<String>,
    },
}

impl Attestation {
    /// The DPS name of the attestation type.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SymmetricKey { .. } => "symmetricKey",
            Self::X509(_) => "x509",
            Self::Tpm { .. } => "tpm",
        }
    }
}

/// `X509CertificateInfo`: facts about a certificate, as DPS reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// Subject distinguished name, e.g. `CN=device-01`.
    pub subject_name: String,
    /// SHA-1 of the DER, upper-case hex.
    pub sha1_thumbprint: String,
    /// SHA-256 of the DER, upper-case hex.
    pub sha256_thumbprint: String,
    /// Issuer distinguished name.
    pub issuer_name: String,
    /// Start of validity (`2023-05-09T20:31:22Z`).
    pub not_before_utc: String,
    /// End of validity.
    pub not_after_utc: String,
    /// Serial number, upper-case hex.
    pub serial_number: String,
    /// X.509 version (3).
    pub version: u32,
}

/// A certificate stored with an enrollment: its DER (base64) and its facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCert {
    /// Base64 of the DER encoding.
    pub der_base64: String,
    /// Facts, computed when it was stored.
    pub info: CertInfo,
}

/// A primary and an optional secondary value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "T: Deserialize<'de>", serialize = "T: Serialize"))]
pub struct PrimarySecondary<T> {
    /// Primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<T>,
    /// Secondary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<T>,
}

impl<T> PrimarySecondary<T> {
    /// Primary then secondary, skipping absent ones.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.primary.iter().chain(self.secondary.iter())
    }
}

/// X.509 attestation of an enrollment or group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum X509Attestation {
    /// Individual enrollment: the device's own certificates, matched by thumbprint.
    ClientCertificates(PrimarySecondary<StoredCert>),
    /// Group: uploaded root or intermediate certificates, used as trust anchors.
    SigningCertificates(PrimarySecondary<StoredCert>),
    /// Group: names of CA certificates of the certificates API, which must be verified.
    CaReferences(PrimarySecondary<String>),
}

/// `reprovisionPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Re-run allocation on a new registration.
    pub update_hub_assignment: bool,
    /// Migrate device data when the hub changes.
    pub migrate_device_data: bool,
}

/// `customAllocationDefinition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocation {
    /// Webhook URL.
    pub webhook_url: String,
    /// Enrollment schema version sent to the webhook.
    pub api_version: String,
}

/// Settings shared by individual enrollments and groups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSettings {
    /// `provisioningStatus` is `enabled` (absent counts as enabled).
    pub enabled: bool,
    /// Initial twin, kept verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// `capabilities.iotEdge`, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_edge: Option<bool>,
    /// Re-provisioning policy, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Allocation policy name, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<String>,
    /// Hubs this enrollment may use, if restricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Legacy single-hub field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation: Option<CustomAllocation>,
    /// The certificate policy that issues operational certificates from devices' requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_policy_name: Option<String>,
}

/// An individual enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrollment {
    /// Registration id as the operator spelled it.
    pub registration_id: String,
    /// Desired device id; the registration id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Attestation.
    pub attestation: Attestation,
    /// Shared settings.
    pub settings: EnrollmentSettings,
    /// `optionalDeviceInformation`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    /// Creation time (DPS format).
    pub created: String,
    /// Last update time (DPS format).
    pub updated: String,
}

/// An enrollment group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    /// Group id as the operator spelled it.
    pub enrollment_group_id: String,
    /// Attestation (group keys or signing certificates).
    pub attestation: Attestation,
    /// Shared settings.
    pub settings: EnrollmentSettings,
    /// Creation time (DPS format).
    pub created: String,
    /// Last update time (DPS format).
    pub updated: String,
}

/// Which enrollment a registration went through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum EnrollmentSource {
    /// An individual enrollment (same id as the registration).
    Individual,
    /// An enrollment group.
    #[serde(rename_all = "camelCase")]
    Group {
        /// The group id.
        enrollment_group_id: String,
    },
}

/// `AssignedDeviceSubstatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Substatus {
    /// First assignment.
    InitialAssignment,
    /// Moved, data migrated.
    DeviceDataMigrated,
    /// Moved, data reset.
    DeviceDataReset,
    /// Record lost, device already in hub.
    ReprovisionedToInitialAssignment,
}

/// How a registration ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum Outcome {
    /// Assigned to a hub.
    #[serde(rename_all = "camelCase")]
    Assigned {
        /// Hub host name.
        assigned_hub: String,
        /// Device id in the hub.
        device_id: String,
        /// Substatus.
        substatus: Substatus,
        /// Payload returned to the device (custom allocation).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<Value>,
    },
    /// Failed; code and message say why.
    #[serde(rename_all = "camelCase")]
    Failed {
        /// DPS error code.
        error_code: u32,
        /// Message.
        error_message: String,
    },
    /// The enrollment or group is disabled.
    Disabled,
}

/// The registration record of a device, written by each registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// Registration id as the device spelled it.
    pub registration_id: String,
    /// First registration.
    pub created: String,
    /// This registration.
    pub updated: String,
    /// Result.
    pub outcome: Outcome,
    /// The enrollment it matched.
    pub source: EnrollmentSource,
    /// The custom payload the device sent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_payload: Option<Value>,
    /// For X.509 devices: the certificates that attested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Details>,
    /// The twin the device was given at its hub (enrollment's, merged with the webhook's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// For TPM devices: the key delivered with the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmDetails>,
    /// The operational certificate issued with this registration, if the device asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<IssuedCertificate>,
}

/// An operational certificate issued from a device's request at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    /// Base64 DER: the certificate, then each issuer up to the root.
    pub chain: Vec<String>,
    /// Serial number, upper-case hex.
    pub serial: String,
    /// SHA-256 thumbprint of the certificate, upper-case hex.
    pub sha256_thumbprint: String,
    /// End of validity, ISO-8601 UTC.
    pub not_after: String,
    /// The issuing CA's name.
    pub ca_name: String,
}

/// What a TPM device's registration delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmDetails {
    /// Base64 of the blob that delivers the device's key into its TPM (see
    /// [`crate::tpm::authentication_key`]): only that TPM can open it.
    pub authentication_key: String,
}

/// A linked IoT hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHub {
    /// Host name, e.g. `hub1.azure-devices.net`.
    pub host_name: String,
    /// Weight for `hashed` allocation, 1–1000.
    pub allocation_weight: u32,
    /// Whether the hub takes part in allocation when an enrollment lists no hubs.
    pub apply_allocation_policy: bool,
    /// Region, for `geoLatency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Where to create device identities (absent: nowhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registrar_webhook_url: Option<String>,
}

/// The certificates behind an X.509 registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Details {
    /// The device certificate.
    pub certificate_info: CertInfo,
    /// The group certificate the chain ended at (groups only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<CertInfo>,
}
