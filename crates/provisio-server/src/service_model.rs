//! Conversions between the service API's wire shapes and the stored model.

use provisio_core::{
    ids::{EnrollmentGroupId, RegistrationId, check_device_id},
    keys,
    model::{
        Attestation, CustomAllocation, Enrollment, EnrollmentGroup, EnrollmentSettings, RegistrationRecord,
        ReprovisionPolicy, Substatus,
    },
};
use provisio_proto::{
    device,
    service::{
        self as wire, AttestationMechanism, DeviceCapabilities, DeviceRegistrationState, ProvisioningStatus,
        SymmetricKeyAttestation,
    },
};
use provisio_store::Document;

use crate::{ServerError, engine};

fn corrupt(what: &str, e: &serde_json::Error) -> ServerError {
    ServerError::Internal(format!("stored {what} is corrupt: {e}"))
}

/// Reads a stored enrollment.
///
/// # Errors
/// If the body is corrupt.
pub fn enrollment_from_doc(doc: &Document) -> Result<Enrollment, ServerError> {
    serde_json::from_str(&doc.body).map_err(|e| corrupt("enrollment", &e))
}

/// Reads a stored group.
///
/// # Errors
/// If the body is corrupt.
pub fn group_from_doc(doc: &Document) -> Result<EnrollmentGroup, ServerError> {
    serde_json::from_str(&doc.body).map_err(|e| corrupt("enrollment group", &e))
}

/// Reads a stored registration record.
///
/// # Errors
/// If the body is corrupt.
pub fn record_from_body(body: &str) -> Result<RegistrationRecord, ServerError> {
    serde_json::from_str(body).map_err(|e| corrupt("registration record", &e))
}

/// Serialises a model value for the store.
///
/// # Errors
/// Never in practice (the model has only string keys).
pub fn to_body<T: serde::Serialize>(v: &T) -> Result<String, ServerError> {
    serde_json::to_string(v).map_err(|e| ServerError::Internal(e.to_string()))
}

/// Wire substatus of a model substatus.
#[must_use]
pub fn substatus_to_wire(s: Substatus) -> device::Substatus {
    match s {
        Substatus::InitialAssignment => device::Substatus::InitialAssignment,
        Substatus::DeviceDataMigrated => device::Substatus::DeviceDataMigrated,
        Substatus::DeviceDataReset => device::Substatus::DeviceDataReset,
        Substatus::ReprovisionedToInitialAssignment => device::Substatus::ReprovisionedToInitialAssignment,
    }
}

/// Validates the attestation of a PUT, generating missing symmetric keys.
fn attestation_from_wire(a: &AttestationMechanism, what: &str) -> Result<Attestation, ServerError> {
    match a.kind.as_str() {
        "symmetricKey" => {
            let sk = a.symmetric_key.clone().unwrap_or_default();
            let pick = |k: Option<String>, name: &str| -> Result<String, ServerError> {
                match k.filter(|k| !k.trim().is_empty()) {
                    None => Ok(keys::generate_key()),
                    Some(k) => {
                        keys::decode_key(&k)
                            .map_err(|e| ServerError::invalid(format!("attestation.symmetricKey.{name}: {e}")))?;
                        Ok(k.trim().to_owned())
                    }
                }
            };
            Ok(Attestation::SymmetricKey {
                primary_key: pick(sk.primary_key, "primaryKey")?,
                secondary_key: pick(sk.secondary_key, "secondaryKey")?,
            })
        }
        "x509" | "tpm" | "none" => Err(ServerError::invalid(format!(
            "Attestation type '{}' is not supported for {what} by this server yet; use 'symmetricKey'.",
            a.kind
        ))),
        other => Err(ServerError::invalid(format!(
            "Unknown attestation type '{}'; expected symmetricKey, x509 or tpm.",
            engine::shorten(other)
        ))),
    }
}

/// Wire attestation; keys only when `with_secrets` (PUT answers, attestationmechanism).
#[must_use]
pub fn attestation_to_wire(a: &Attestation, with_secrets: bool) -> AttestationMechanism {
    match a {
        Attestation::SymmetricKey { primary_key, secondary_key } => AttestationMechanism {
            kind: "symmetricKey".into(),
            tpm: None,
            x509: None,
            symmetric_key: with_secrets.then(|| SymmetricKeyAttestation {
                primary_key: Some(primary_key.clone()),
                secondary_key: Some(secondary_key.clone()),
            }),
        },
    }
}

struct WireSettings {
    provisioning_status: Option<ProvisioningStatus>,
    initial_twin: Option<serde_json::Value>,
    capabilities: Option<DeviceCapabilities>,
    reprovision_policy: Option<wire::ReprovisionPolicy>,
    allocation_policy: Option<String>,
    iot_hubs: Option<Vec<String>>,
    iot_hub_host_name: Option<String>,
    custom_allocation_definition: Option<wire::CustomAllocationDefinition>,
}

fn settings_from_wire(w: WireSettings) -> Result<EnrollmentSettings, ServerError> {
    if let Some(p) = &w.allocation_policy
        && !matches!(p.as_str(), "hashed" | "geoLatency" | "static" | "custom")
    {
        return Err(ServerError::invalid(format!(
            "allocationPolicy '{}' is not one of hashed, geoLatency, static, custom.",
            engine::shorten(p)
        )));
    }
    Ok(EnrollmentSettings {
        enabled: w.provisioning_status.unwrap_or_default() == ProvisioningStatus::Enabled,
        initial_twin: w.initial_twin,
        iot_edge: w.capabilities.map(|c| c.iot_edge),
        reprovision_policy: w.reprovision_policy.map(|p| ReprovisionPolicy {
            update_hub_assignment: p.update_hub_assignment,
            migrate_device_data: p.migrate_device_data,
        }),
        allocation_policy: w.allocation_policy,
        iot_hubs: w.iot_hubs,
        iot_hub_host_name: w.iot_hub_host_name,
        custom_allocation: w
            .custom_allocation_definition
            .map(|c| CustomAllocation { webhook_url: c.webhook_url, api_version: c.api_version }),
    })
}

fn settings_to_wire(s: &EnrollmentSettings) -> WireSettings {
    WireSettings {
        provisioning_status: Some(if s.enabled { ProvisioningStatus::Enabled } else { ProvisioningStatus::Disabled }),
        initial_twin: s.initial_twin.clone(),
        capabilities: s.iot_edge.map(|iot_edge| DeviceCapabilities { iot_edge }),
        reprovision_policy: s.reprovision_policy.map(|p| wire::ReprovisionPolicy {
            update_hub_assignment: p.update_hub_assignment,
            migrate_device_data: p.migrate_device_data,
        }),
        allocation_policy: s.allocation_policy.clone(),
        iot_hubs: s.iot_hubs.clone(),
        iot_hub_host_name: s.iot_hub_host_name.clone(),
        custom_allocation_definition: s.custom_allocation.as_ref().map(|c| wire::CustomAllocationDefinition {
            webhook_url: c.webhook_url.clone(),
            api_version: c.api_version.clone(),
        }),
    }
}

/// Validates a PUT body for `/enrollments/{id}` and builds the model.
///
/// # Errors
/// If an id, key or field breaks a rule.
pub fn enrollment_from_wire(
    path_id: &RegistrationId,
    w: wire::IndividualEnrollment,
    created: Option<String>,
    now: &str,
) -> Result<Enrollment, ServerError> {
    if !w.registration_id.eq_ignore_ascii_case(path_id.as_str()) {
        return Err(ServerError::invalid(format!(
            "The body's registrationId '{}' does not match '{path_id}' in the path.",
            engine::shorten(&w.registration_id)
        )));
    }
    if let Some(d) = &w.device_id {
        check_device_id(d)?;
    }
    Ok(Enrollment {
        registration_id: path_id.as_str().to_owned(),
        device_id: w.device_id,
        attestation: attestation_from_wire(&w.attestation, "individual enrollments")?,
        settings: settings_from_wire(WireSettings {
            provisioning_status: w.provisioning_status,
            initial_twin: w.initial_twin,
            capabilities: w.capabilities,
            reprovision_policy: w.reprovision_policy,
            allocation_policy: w.allocation_policy,
            iot_hubs: w.iot_hubs,
            iot_hub_host_name: w.iot_hub_host_name,
            custom_allocation_definition: w.custom_allocation_definition,
        })?,
        optional_device_information: w.optional_device_information,
        created: created.unwrap_or_else(|| now.to_owned()),
        updated: now.to_owned(),
    })
}

/// The wire form of a stored enrollment.
#[must_use]
pub fn enrollment_to_wire(
    e: &Enrollment,
    etag: &str,
    with_secrets: bool,
    registration_state: Option<DeviceRegistrationState>,
) -> wire::IndividualEnrollment {
    let s = settings_to_wire(&e.settings);
    wire::IndividualEnrollment {
        registration_id: e.registration_id.clone(),
        device_id: e.device_id.clone(),
        registration_state,
        optional_device_information: e.optional_device_information.clone(),
        attestation: attestation_to_wire(&e.attestation, with_secrets),
        capabilities: s.capabilities,
        iot_hub_host_name: s.iot_hub_host_name,
        initial_twin: s.initial_twin,
        etag: Some(etag.to_owned()),
        provisioning_status: s.provisioning_status,
        reprovision_policy: s.reprovision_policy,
        created_date_time_utc: Some(e.created.clone()),
        last_updated_date_time_utc: Some(e.updated.clone()),
        allocation_policy: s.allocation_policy,
        iot_hubs: s.iot_hubs,
        custom_allocation_definition: s.custom_allocation_definition,
    }
}

/// Validates a PUT body for `/enrollmentGroups/{id}` and builds the model.
///
/// # Errors
/// If an id, key or field breaks a rule.
pub fn group_from_wire(
    path_id: &EnrollmentGroupId,
    w: wire::EnrollmentGroup,
    created: Option<String>,
    now: &str,
) -> Result<EnrollmentGroup, ServerError> {
    if !w.enrollment_group_id.eq_ignore_ascii_case(path_id.as_str()) {
        return Err(ServerError::invalid(format!(
            "The body's enrollmentGroupId '{}' does not match '{}' in the path.",
            engine::shorten(&w.enrollment_group_id),
            path_id.as_str()
        )));
    }
    Ok(EnrollmentGroup {
        enrollment_group_id: path_id.as_str().to_owned(),
        attestation: attestation_from_wire(&w.attestation, "enrollment groups")?,
        settings: settings_from_wire(WireSettings {
            provisioning_status: w.provisioning_status,
            initial_twin: w.initial_twin,
            capabilities: w.capabilities,
            reprovision_policy: w.reprovision_policy,
            allocation_policy: w.allocation_policy,
            iot_hubs: w.iot_hubs,
            iot_hub_host_name: w.iot_hub_host_name,
            custom_allocation_definition: w.custom_allocation_definition,
        })?,
        created: created.unwrap_or_else(|| now.to_owned()),
        updated: now.to_owned(),
    })
}

/// The wire form of a stored group.
#[must_use]
pub fn group_to_wire(g: &EnrollmentGroup, etag: &str, with_secrets: bool) -> wire::EnrollmentGroup {
    let s = settings_to_wire(&g.settings);
    wire::EnrollmentGroup {
        enrollment_group_id: g.enrollment_group_id.clone(),
        attestation: attestation_to_wire(&g.attestation, with_secrets),
        capabilities: s.capabilities,
        iot_hub_host_name: s.iot_hub_host_name,
        initial_twin: s.initial_twin,
        etag: Some(etag.to_owned()),
        provisioning_status: s.provisioning_status,
        reprovision_policy: s.reprovision_policy,
        created_date_time_utc: Some(g.created.clone()),
        last_updated_date_time_utc: Some(g.updated.clone()),
        allocation_policy: s.allocation_policy,
        iot_hubs: s.iot_hubs,
        custom_allocation_definition: s.custom_allocation_definition,
    }
}

/// The service API's view of a registration record.
#[must_use]
pub fn registration_state_to_wire(r: &RegistrationRecord, etag: &str) -> DeviceRegistrationState {
    let d = engine::device_result(r, etag);
    DeviceRegistrationState {
        registration_id: d.registration_id,
        created_date_time_utc: d.created_date_time_utc,
        assigned_hub: d.assigned_hub,
        device_id: d.device_id,
        status: d.status,
        substatus: d.substatus,
        error_code: d.error_code,
        error_message: d.error_message,
        last_updated_date_time_utc: d.last_updated_date_time_utc,
        etag: d.etag,
        payload: d.payload,
    }
}
