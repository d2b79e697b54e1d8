//! Conversions between the wire shapes (device and service API) and the stored model.

use provisio_core::{
    ids::{EnrollmentGroupId, RegistrationId, check_device_id},
    keys,
    model::{
        Attestation, CertInfo, CustomAllocation, Enrollment, EnrollmentGroup, EnrollmentSettings, EnrollmentSource,
        Outcome, PrimarySecondary, RegistrationRecord, ReprovisionPolicy, StoredCert, Substatus, X509Attestation,
    },
    text::shorten,
};
use provisio_proto::{
    device::{
        self, DeviceRegistrationResult, RegistrationStatus, SymmetricKeyRegistrationResult, X509RegistrationResult,
    },
    error::codes,
    service::{
        self as wire, AttestationMechanism, DeviceCapabilities, DeviceRegistrationState, ProvisioningStatus,
        SymmetricKeyAttestation, X509CaReferences, X509CertificateInfo, X509CertificateWithInfo, X509Certificates,
    },
};
use provisio_store::Document;

use crate::Error;

fn corrupt(what: &str, e: &serde_json::Error) -> Error {
    Error::Internal(format!("stored {what} is corrupt: {e}"))
}

/// Reads a stored enrollment.
///
/// # Errors
/// If the body is corrupt.
pub fn enrollment_from_doc(doc: &Document) -> Result<Enrollment, Error> {
    serde_json::from_str(&doc.body).map_err(|e| corrupt("enrollment", &e))
}

/// Reads a stored group.
///
/// # Errors
/// If the body is corrupt.
pub fn group_from_doc(doc: &Document) -> Result<EnrollmentGroup, Error> {
    serde_json::from_str(&doc.body).map_err(|e| corrupt("enrollment group", &e))
}

/// Reads a stored registration record.
///
/// # Errors
/// If the body is corrupt.
pub fn record_from_body(body: &str) -> Result<RegistrationRecord, Error> {
    serde_json::from_str(body).map_err(|e| corrupt("registration record", &e))
}

/// Serialises a model value for the store.
///
/// # Errors
/// Never in practice (the model has only string keys).
pub fn to_body<T: serde::Serialize>(v: &T) -> Result<String, Error> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
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

/// Wire form of certificate facts.
#[must_use]
pub fn cert_info_to_wire(i: &CertInfo) -> X509CertificateInfo {
    X509CertificateInfo {
        subject_name: i.subject_name.clone(),
        sha1_thumbprint: i.sha1_thumbprint.clone(),
        sha256_thumbprint: i.sha256_thumbprint.clone(),
        issuer_name: i.issuer_name.clone(),
        not_before_utc: i.not_before_utc.clone(),
        not_after_utc: i.not_after_utc.clone(),
        serial_number: i.serial_number.clone(),
        version: i.version,
    }
}

/// Reads one certificate slot of a PUT. A slot with only `info` (what GET returns, and
/// what the az CLI sends back on update) keeps the stored certificate of that slot.
fn cert_slot(
    slot: Option<&X509CertificateWithInfo>,
    existing: Option<&StoredCert>,
    field: &str,
    must_be_ca: bool,
) -> Result<Option<StoredCert>, Error> {
    let Some(slot) = slot else { return Ok(None) };
    match (&slot.certificate, existing) {
        (Some(text), _) => {
            let der = provisio_pki::x509::decode_cert_text(text)
                .map_err(|e| Error::invalid(format!("attestation.x509.{field}.certificate: {e}")))?;
            if must_be_ca && !provisio_pki::x509::is_ca(&der).unwrap_or(false) {
                return Err(Error::invalid(format!(
                    "attestation.x509.{field}.certificate is not a CA certificate (basic constraints lack CA:TRUE); \
                     a group's signing certificate must be a root or intermediate CA."
                )));
            }
            let info = provisio_pki::x509::cert_info(&der).map_err(|e| Error::invalid(e.to_string()))?;
            Ok(Some(StoredCert {
                der_base64: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der),
                info,
            }))
        }
        (None, Some(kept)) if slot.info.is_some() => Ok(Some(kept.clone())),
        (None, _) => {
            Err(Error::invalid(format!("attestation.x509.{field} needs a 'certificate' (PEM or base64 DER).")))
        }
    }
}

fn cert_pair(
    w: &X509Certificates,
    existing: Option<&PrimarySecondary<StoredCert>>,
    field: &str,
    must_be_ca: bool,
) -> Result<PrimarySecondary<StoredCert>, Error> {
    let pair = PrimarySecondary {
        primary: cert_slot(
            w.primary.as_ref(),
            existing.and_then(|e| e.primary.as_ref()),
            &format!("{field}.primary"),
            must_be_ca,
        )?,
        secondary: cert_slot(
            w.secondary.as_ref(),
            existing.and_then(|e| e.secondary.as_ref()),
            &format!("{field}.secondary"),
            must_be_ca,
        )?,
    };
    if pair.primary.is_none() {
        return Err(Error::invalid(format!("attestation.x509.{field}.primary is required.")));
    }
    Ok(pair)
}

fn x509_from_wire(a: &AttestationMechanism, existing: Option<&Attestation>, group: bool) -> Result<Attestation, Error> {
    let x = a.x509.clone().ok_or_else(|| Error::invalid("attestation.x509 is required for type 'x509'."))?;
    let prev = match existing {
        Some(Attestation::X509(p)) => Some(p),
        _ => None,
    };
    let given = [x.client_certificates.is_some(), x.signing_certificates.is_some(), x.ca_references.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(Error::invalid(
            "attestation.x509 must hold exactly one of clientCertificates, signingCertificates or caReferences.",
        ));
    }
    if group {
        if x.client_certificates.is_some() {
            return Err(Error::invalid(
                "An enrollment group takes x509.signingCertificates or x509.caReferences, not clientCertificates.",
            ));
        }
        if let Some(sc) = &x.signing_certificates {
            let prev = match prev {
                Some(X509Attestation::SigningCertificates(p)) => Some(p),
                _ => None,
            };
            return Ok(Attestation::X509(X509Attestation::SigningCertificates(cert_pair(
                sc,
                prev,
                "signingCertificates",
                true,
            )?)));
        }
        let refs = x.ca_references.unwrap_or_default();
        let check = |n: &Option<String>| -> Result<Option<String>, Error> {
            match n.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(n) => {
                    crate::certificates::check_name(n)?;
                    Ok(Some(n.to_owned()))
                }
            }
        };
        let pair = PrimarySecondary { primary: check(&refs.primary)?, secondary: check(&refs.secondary)? };
        if pair.primary.is_none() {
            return Err(Error::invalid("attestation.x509.caReferences.primary is required."));
        }
        return Ok(Attestation::X509(X509Attestation::CaReferences(pair)));
    }
    let Some(cc) = &x.client_certificates else {
        return Err(Error::invalid(
            "An individual enrollment takes x509.clientCertificates (the device's own certificate).",
        ));
    };
    let prev = match prev {
        Some(X509Attestation::ClientCertificates(p)) => Some(p),
        _ => None,
    };
    Ok(Attestation::X509(X509Attestation::ClientCertificates(cert_pair(cc, prev, "clientCertificates", false)?)))
}

/// Validates the attestation of a PUT, generating missing symmetric keys.
fn attestation_from_wire(
    a: &AttestationMechanism,
    what: &str,
    existing: Option<&Attestation>,
    group: bool,
) -> Result<Attestation, Error> {
    match a.kind.as_str() {
        "symmetricKey" => {
            let sk = a.symmetric_key.clone().unwrap_or_default();
            let pick = |k: Option<String>, name: &str| -> Result<String, Error> {
                match k.filter(|k| !k.trim().is_empty()) {
                    None => Ok(keys::generate_key()),
                    Some(k) => {
                        keys::decode_key(&k)
                            .map_err(|e| Error::invalid(format!("attestation.symmetricKey.{name}: {e}")))?;
                        Ok(k.trim().to_owned())
                    }
                }
            };
            Ok(Attestation::SymmetricKey {
                primary_key: pick(sk.primary_key, "primaryKey")?,
                secondary_key: pick(sk.secondary_key, "secondaryKey")?,
            })
        }
        "x509" => x509_from_wire(a, existing, group),
        "tpm" if group => Err(Error::invalid(
            "Enrollment groups do not support TPM attestation (DPS offers it for individual enrollments only).",
        )),
        "tpm" => {
            let t = a.tpm.clone().unwrap_or_default();
            let check = |k: Option<String>, name: &str, required: bool| -> Result<Option<String>, Error> {
                match k.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()) {
                    None if required => Err(Error::invalid(format!("attestation.tpm.{name} is required."))),
                    None => Ok(None),
                    Some(k) => {
                        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &k)
                            .map_err(|_| Error::invalid(format!("attestation.tpm.{name} is not base64.")))?;
                        if bytes.len() < 2 || bytes.len() > 2048 {
                            return Err(Error::invalid(format!(
                                "attestation.tpm.{name} must be base64 of a marshalled TPM2B_PUBLIC (2 to 2048 bytes)."
                            )));
                        }
                        // A key the challenge cannot be made for would refuse the device for
                        // ever: say so now.
                        let what =
                            if required { "attestation.tpm.endorsementKey" } else { "attestation.tpm.storageRootKey" };
                        provisio_core::tpm::StorageKey::parse(&bytes, what)
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        Ok(Some(k))
                    }
                }
            };
            Ok(Attestation::Tpm {
                endorsement_key: check(t.endorsement_key, "endorsementKey", true)?.unwrap_or_default(),
                storage_root_key: check(t.storage_root_key, "storageRootKey", false)?,
            })
        }
        "none" => Err(Error::invalid(format!(
            "Attestation type 'none' cannot authenticate devices; use symmetricKey, x509 or tpm for {what}."
        ))),
        other => Err(Error::invalid(format!(
            "Unknown attestation type '{}'; expected symmetricKey, x509 or tpm.",
            shorten(other)
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
        Attestation::Tpm { endorsement_key, storage_root_key } => AttestationMechanism {
            kind: "tpm".into(),
            // The EK is public: DPS returns it on GET too.
            tpm: Some(provisio_proto::service::TpmAttestation {
                endorsement_key: Some(endorsement_key.clone()),
                storage_root_key: storage_root_key.clone(),
            }),
            x509: None,
            symmetric_key: None,
        },
        Attestation::X509(x) => {
            let certs = |p: &PrimarySecondary<StoredCert>| X509Certificates {
                primary: p
                    .primary
                    .as_ref()
                    .map(|c| X509CertificateWithInfo { certificate: None, info: Some(cert_info_to_wire(&c.info)) }),
                secondary: p
                    .secondary
                    .as_ref()
                    .map(|c| X509CertificateWithInfo { certificate: None, info: Some(cert_info_to_wire(&c.info)) }),
            };
            let wire = match x {
                X509Attestation::ClientCertificates(p) => provisio_proto::service::X509Attestation {
                    client_certificates: Some(certs(p)),
                    ..Default::default()
                },
                X509Attestation::SigningCertificates(p) => provisio_proto::service::X509Attestation {
                    signing_certificates: Some(certs(p)),
                    ..Default::default()
                },
                X509Attestation::CaReferences(p) => provisio_proto::service::X509Attestation {
                    ca_references: Some(X509CaReferences {
                        primary: p.primary.clone(),
                        secondary: p.secondary.clone(),
                    }),
                    ..Default::default()
                },
            };
            AttestationMechanism { kind: "x509".into(), tpm: None, x509: Some(wire), symmetric_key: None }
        }
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
    credential_policy_name: Option<String>,
}

fn settings_from_wire(w: WireSettings) -> Result<EnrollmentSettings, Error> {
    use provisio_core::allocation::Policy;
    let policy = match &w.allocation_policy {
        None => None,
        Some(p) => Some(Policy::parse(p).ok_or_else(|| {
            Error::invalid(format!(
                "allocationPolicy '{}' is not one of hashed, geoLatency, static, custom.",
                shorten(p)
            ))
        })?),
    };
    if policy == Some(Policy::Custom) {
        let Some(def) = &w.custom_allocation_definition else {
            return Err(Error::invalid("A CustomAllocationDefinition is required when allocationPolicy is custom."));
        };
        if !(def.webhook_url.starts_with("https://") || def.webhook_url.starts_with("http://")) {
            return Err(Error::invalid("customAllocationDefinition.webhookUrl must be an http(s) URL."));
        }
    }
    // An InitialTwin is {"tags": {…}, "properties": {"desired": {…}}}: anything but an
    // object would reach the hub as garbage.
    if let Some(t) = &w.initial_twin {
        let obj = t.as_object().filter(|_| !t.is_null());
        match obj {
            None if !t.is_null() => return Err(Error::invalid("initialTwin must be a JSON object.")),
            Some(o) => {
                for (k, v) in o {
                    if matches!(k.as_str(), "tags" | "properties") && !(v.is_object() || v.is_null()) {
                        return Err(Error::invalid(format!("initialTwin.{k} must be a JSON object.")));
                    }
                }
                if let Some(d) = o.get("properties").and_then(|p| p.get("desired"))
                    && !(d.is_object() || d.is_null())
                {
                    return Err(Error::invalid("initialTwin.properties.desired must be a JSON object."));
                }
            }
            None => {}
        }
    }
    if policy == Some(Policy::Static) && w.iot_hubs.as_ref().is_some_and(|h| h.len() > 1) {
        return Err(Error::invalid("A static allocation policy takes exactly one hub in iotHubs."));
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
        credential_policy_name: w.credential_policy_name.filter(|n| !n.trim().is_empty()),
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
        credential_policy_name: s.credential_policy_name.clone(),
    }
}

/// Validates a PUT body for `/enrollments/{id}` and builds the model.
///
/// # Errors
/// If an id, key or field breaks a rule.
pub fn enrollment_from_wire(
    path_id: &RegistrationId,
    w: wire::IndividualEnrollment,
    existing: Option<&Enrollment>,
    now: &str,
) -> Result<Enrollment, Error> {
    let created = existing.map(|e| e.created.clone());
    if !w.registration_id.eq_ignore_ascii_case(path_id.as_str()) {
        return Err(Error::invalid(format!(
            "The body's registrationId '{}' does not match '{path_id}' in the path.",
            shorten(&w.registration_id)
        )));
    }
    if let Some(d) = &w.device_id {
        check_device_id(d)?;
    }
    Ok(Enrollment {
        registration_id: path_id.as_str().to_owned(),
        device_id: w.device_id,
        attestation: attestation_from_wire(
            &w.attestation,
            "individual enrollments",
            existing.map(|e| &e.attestation),
            false,
        )?,
        settings: settings_from_wire(WireSettings {
            provisioning_status: w.provisioning_status,
            initial_twin: w.initial_twin,
            capabilities: w.capabilities,
            reprovision_policy: w.reprovision_policy,
            allocation_policy: w.allocation_policy,
            iot_hubs: w.iot_hubs,
            iot_hub_host_name: w.iot_hub_host_name,
            custom_allocation_definition: w.custom_allocation_definition,
            credential_policy_name: w.credential_policy_name,
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
        credential_policy_name: s.credential_policy_name,
    }
}

/// Validates a PUT body for `/enrollmentGroups/{id}` and builds the model.
///
/// # Errors
/// If an id, key or field breaks a rule.
pub fn group_from_wire(
    path_id: &EnrollmentGroupId,
    w: wire::EnrollmentGroup,
    existing: Option<&EnrollmentGroup>,
    now: &str,
) -> Result<EnrollmentGroup, Error> {
    let created = existing.map(|g| g.created.clone());
    if !w.enrollment_group_id.eq_ignore_ascii_case(path_id.as_str()) {
        return Err(Error::invalid(format!(
            "The body's enrollmentGroupId '{}' does not match '{}' in the path.",
            shorten(&w.enrollment_group_id),
            path_id.as_str()
        )));
    }
    Ok(EnrollmentGroup {
        enrollment_group_id: path_id.as_str().to_owned(),
        attestation: attestation_from_wire(
            &w.attestation,
            "enrollment groups",
            existing.map(|g| &g.attestation),
            true,
        )?,
        settings: settings_from_wire(WireSettings {
            provisioning_status: w.provisioning_status,
            initial_twin: w.initial_twin,
            capabilities: w.capabilities,
            reprovision_policy: w.reprovision_policy,
            allocation_policy: w.allocation_policy,
            iot_hubs: w.iot_hubs,
            iot_hub_host_name: w.iot_hub_host_name,
            custom_allocation_definition: w.custom_allocation_definition,
            credential_policy_name: w.credential_policy_name,
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
        credential_policy_name: s.credential_policy_name,
    }
}

/// The service API's view of a registration record.
#[must_use]
pub fn registration_state_to_wire(r: &RegistrationRecord, etag: &str) -> DeviceRegistrationState {
    let d = device_result(r, etag);
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
        initial_twin: r.initial_twin.clone(),
        issued_certificate: r.issued.as_ref().map(|i| provisio_proto::service::IssuedCertificateInfo {
            serial_number: i.serial.clone(),
            sha256_thumbprint: i.sha256_thumbprint.clone(),
            not_after_utc: i.not_after.clone(),
            certificate_authority_name: i.ca_name.clone(),
            revoked_date_time_utc: None,
        }),
    }
}

/// The status a record's outcome shows.
#[must_use]
pub fn status_of(o: &Outcome) -> RegistrationStatus {
    match o {
        Outcome::Assigned { .. } => RegistrationStatus::Assigned,
        Outcome::Failed { .. } => RegistrationStatus::Failed,
        Outcome::Disabled => RegistrationStatus::Disabled,
    }
}

/// The device's view of a registration record.
#[must_use]
pub fn device_result(record: &RegistrationRecord, etag: &str) -> DeviceRegistrationResult {
    let mut r = DeviceRegistrationResult::bare(&record.registration_id, status_of(&record.outcome));
    r.created_date_time_utc = Some(record.created.clone());
    r.last_updated_date_time_utc = Some(record.updated.clone());
    r.etag = Some(etag.to_owned());
    match &record.outcome {
        Outcome::Assigned { assigned_hub, device_id, substatus, payload } => {
            r.assigned_hub = Some(assigned_hub.clone());
            r.device_id = Some(device_id.clone());
            r.substatus = Some(substatus_to_wire(*substatus));
            r.payload.clone_from(payload);
        }
        Outcome::Failed { error_code, error_message } => {
            r.error_code = Some(*error_code);
            r.error_message = Some(error_message.clone());
        }
        Outcome::Disabled => {
            // Older Java SDKs hang on a terminal state without an error code.
            r.error_code = Some(codes::ENROLLMENT_DISABLED);
            r.error_message = Some("The enrollment or enrollment group is disabled.".into());
        }
    }
    let group_id = match &record.source {
        EnrollmentSource::Group { enrollment_group_id } => Some(enrollment_group_id.clone()),
        EnrollmentSource::Individual => None,
    };
    if let Some(t) = &record.tpm {
        r.tpm = Some(serde_json::json!({ "authenticationKey": t.authentication_key }));
    }
    r.issued_certificate_chain = record.issued.as_ref().map(|i| i.chain.clone()).filter(|c| !c.is_empty());
    match &record.x509 {
        Some(x) => {
            r.x509 = Some(X509RegistrationResult {
                enrollment_group_id: group_id,
                certificate_info: Some(cert_info_to_wire(&x.certificate_info)),
                signing_certificate_info: x.signing_certificate_info.as_ref().map(cert_info_to_wire),
            });
        }
        None if record.tpm.is_some() => {}
        None => r.symmetric_key = Some(SymmetricKeyRegistrationResult { enrollment_group_id: group_id }),
    }
    r
}
