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
    pub tpm: Option<TpmAttestation>,
    /// X.509 attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    /// Symmetric-key attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
}

/// `TpmAttestation`: the device's public keys, base64 of marshalled `TPM2B_PUBLIC`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    /// Endorsement key (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement_key: Option<String>,
    /// Storage root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

/// `QuerySpecification`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuerySpecification {
    /// The query text, e.g. `SELECT * FROM enrollments`.
    #[serde(default)]
    pub query: String,
}

/// `BulkEnrollmentOperationResult` (and its group twin).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkOperationResult {
    /// Whether every item succeeded.
    pub is_successful: bool,
    /// One entry per failed item.
    pub errors: Vec<BulkOperationError>,
}

/// One failed item of a bulk operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkOperationError {
    /// The enrollment's id (individual enrollments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// The group's id (groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// DPS error code.
    pub error_code: u32,
    /// What went wrong.
    pub error_status: String,
}

/// A shared access policy as the policies API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedAccessPolicy {
    /// Policy name (optional on PUT, where the path names it).
    #[serde(default)]
    pub key_name: String,
    /// Primary key (generated when absent on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Secondary key (generated when absent on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
    /// Comma-separated rights, e.g. `EnrollmentRead, RegistrationStatusRead`.
    #[serde(default)]
    pub rights: String,
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

/// `X509Attestation`: exactly one of the three is used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    /// Individual enrollments: the device's own certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    /// Groups: uploaded root or intermediate certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    /// Groups: names of verified CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CaReferences>,
}

/// `X509Certificates`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    /// Primary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509CertificateWithInfo>,
    /// Secondary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
}

/// `X509CertificateWithInfo`: `certificate` on write, `info` on read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    /// PEM or base64 DER (write only; never echoed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Facts about the stored certificate (read only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<X509CertificateInfo>,
}

/// `X509CertificateInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateInfo {
    /// Subject DN.
    pub subject_name: String,
    /// SHA-1 thumbprint, hex.
    pub sha1_thumbprint: String,
    /// SHA-256 thumbprint, hex.
    pub sha256_thumbprint: String,
    /// Issuer DN.
    pub issuer_name: String,
    /// Start of validity.
    pub not_before_utc: String,
    /// End of validity.
    pub not_after_utc: String,
    /// Serial number, hex.
    pub serial_number: String,
    /// X.509 version.
    pub version: u32,
}

/// `X509CAReferences`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CaReferences {
    /// Name of the primary CA certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Name of the secondary CA certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

/// The certificates API's resource (`CertificateResponse`, ARM shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// `/certificates/{name}`.
    pub id: String,
    /// Certificate name.
    pub name: String,
    /// `Microsoft.Devices/ProvisioningServices/Certificates`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Version tag.
    pub etag: String,
    /// Properties.
    pub properties: CertificateProperties,
}

/// `properties` of a certificate resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateProperties {
    /// Subject DN.
    pub subject: String,
    /// End of validity (RFC 1123).
    pub expiry: String,
    /// SHA-1 thumbprint, upper-case hex.
    pub thumbprint: String,
    /// Proof of possession done (or set on upload).
    pub is_verified: bool,
    /// The certificate, PEM.
    pub certificate: String,
    /// Created (RFC 1123).
    pub created: String,
    /// Updated (RFC 1123).
    pub updated: String,
    /// The outstanding verification code (generateVerificationCode answers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
}

/// Body of `PUT /certificates/{name}` and `POST .../verify`: either top-level or under
/// `properties` (both forms exist in ARM's versions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateBody {
    /// PEM or base64 DER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Mark verified on upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_verified: Option<bool>,
    /// The ARM form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Box<CertificateBody>>,
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
    /// The certificate policy that issues operational certificates to its devices
    /// (`2025-07-01-preview`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_policy_name: Option<String>,
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
    /// The certificate policy that issues operational certificates to its devices
    /// (`2025-07-01-preview`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_policy_name: Option<String>,
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
    /// Provisio: the twin the device was given at its hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// Provisio: the device's current operational certificate, when one was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate: Option<IssuedCertificateInfo>,
}

/// Provisio: an operational certificate issued at registration, as the service API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificateInfo {
    /// Serial number, upper-case hex.
    pub serial_number: String,
    /// SHA-256 thumbprint, upper-case hex.
    pub sha256_thumbprint: String,
    /// End of validity.
    pub not_after_utc: String,
    /// The issuing CA's name.
    pub certificate_authority_name: String,
    /// When it was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_date_time_utc: Option<String>,
}

/// Provisio: an issuing CA of operational certificates (`/certificateAuthorities/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateAuthority {
    /// Its name.
    pub name: String,
    /// Its certificate, PEM (read-only on create; an import sends it with `privateKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The certificates above it up to the root, PEM (import only; absent: self-signed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// Its private key, PEM (write-only, import only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// Read-only: its subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Read-only: SHA-256 thumbprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_thumbprint: Option<String>,
    /// Read-only: end of validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_utc: Option<String>,
    /// Read-only: the path of its CRL on this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_path: Option<String>,
    /// Opaque version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// Provisio: a certificate policy (`/credentialPolicies/{name}`): which CA issues, for how
/// long, to which keys, how often.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialPolicy {
    /// Its name.
    pub name: String,
    /// The issuing CA.
    pub certificate_authority_name: String,
    /// Validity of issued certificates, days (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_in_days: Option<u32>,
    /// Allowed key types: `ecdsa-p256`, `ecdsa-p384`, `rsa` (2048-4096 bits). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_types: Option<Vec<String>>,
    /// Certificates one device may be issued per day (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuance_limit_per_day: Option<u32>,
    /// Opaque version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}
