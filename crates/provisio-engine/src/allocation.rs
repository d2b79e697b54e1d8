//! Allocation: which hub a device goes to, with which twin and payload, and what happens
//! at the hub. Policy resolution (`spec/service-api.md` §4.2), the built-in policies, the
//! custom allocation webhook (§4.4), re-provisioning (§4.6) and the hub registrar. The
//! rules themselves are `provisio_core::allocation`'s pure functions; this module reads the
//! hubs and makes the calls.

use std::{sync::Arc, time::Duration};

use provisio_core::{
    allocation::{self, Candidate, HubCredential, Policy, PreviousAssignment, Reprovision},
    attest::Matched,
    ids::RegistrationId,
    model::{EnrollmentSettings, LinkedHub, Outcome, RegistrationRecord, X509Details},
    text::shorten,
};
use provisio_proto::error::codes;
use serde_json::{Value, json};

use crate::{
    Error, SetupError,
    hubs::Hubs,
    registrar::{HubAuthentication, HubDevice, HubRegistrar, NoRegistrar, WebhookRegistrar},
    webhook::{Shown, WebhookClient, WebhookSettings},
    wire,
};

/// What happens at the hub once a device is assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegistrarKind {
    /// Nothing (hubs are managed elsewhere).
    #[default]
    None,
    /// POST the identity to the hub's `registrarWebhookUrl`.
    Webhook,
}

impl RegistrarKind {
    /// Parses `none` or `webhook`.
    ///
    /// # Errors
    /// Any other value.
    pub fn parse(s: &str) -> Result<Self, SetupError> {
        match s {
            "none" => Ok(Self::None),
            "webhook" => Ok(Self::Webhook),
            other => Err(SetupError::Config(format!("hub_registrar '{}' must be none or webhook", shorten(other)))),
        }
    }
}

/// How devices are allocated.
#[derive(Debug, Clone, Default)]
pub struct AllocationSettings {
    /// The service-level default policy (hashed, geoLatency or static).
    pub default_policy: Policy,
    /// The serving node's region, for `geoLatency`.
    pub region: Option<String>,
    /// How custom allocation webhooks and registrar endpoints are called.
    pub webhooks: WebhookSettings,
    /// What happens at the hub.
    pub registrar: RegistrarKind,
}

/// Decides and carries out assignments.
#[derive(Clone)]
pub struct Assigner {
    hubs: Hubs,
    default_policy: Policy,
    region: Option<String>,
    webhook: WebhookClient,
    registrar: Arc<dyn HubRegistrar>,
}

/// What assignment decided.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The result.
    pub outcome: Outcome,
    /// The twin the device has at its hub.
    pub twin: Option<Value>,
    /// For a failure of a webhook or a registrar: the precise reason (the answer's start, a
    /// refused address, a connection error), for the audit log only. The outcome's message,
    /// which the device reads, carries at most a status code.
    pub detail: Option<String>,
}

fn failed(code: u32, message: impl Into<String>) -> Assignment {
    failed_because(code, Failure { shown: message.into(), detail: None })
}

fn failed_because(code: u32, f: Failure) -> Assignment {
    Assignment { outcome: Outcome::Failed { error_code: code, error_message: f.shown }, twin: None, detail: f.detail }
}

/// Why a call to the operator's endpoint failed: what the device is told, and what the
/// audit log is told.
struct Failure {
    shown: String,
    detail: Option<String>,
}

impl From<String> for Failure {
    fn from(shown: String) -> Self {
        Self { shown, detail: None }
    }
}

/// Everything assignment needs about one registration.
pub struct Request<'a> {
    /// The device.
    pub id: &'a RegistrationId,
    /// The enrollment it matched.
    pub matched: &'a Matched,
    /// X.509 details, for X.509 devices.
    pub x509: Option<&'a X509Details>,
    /// The device's custom payload.
    pub payload: Option<&'a Value>,
    /// Its previous registration record.
    pub previous: Option<&'a RegistrationRecord>,
    /// Its device id at the hub.
    pub device_id: String,
    /// For TPM devices: the key delivered into the TPM (base64), which it signs with at the
    /// hub too.
    pub tpm_key: Option<&'a str>,
    /// For TPM devices: the storage root key the key was delivered to (base64
    /// `TPM2B_PUBLIC`, as the device sent it).
    pub tpm_storage_root_key: Option<&'a str>,
    /// The SHA-256 thumbprint of the operational certificate issued with this registration.
    pub issued_thumbprint: Option<&'a str>,
}

impl Assigner {
    /// An assigner over the linked `hubs`.
    ///
    /// # Errors
    /// A default policy of `custom` (it is set per enrollment), or unusable webhook
    /// settings.
    pub fn new(hubs: Hubs, settings: AllocationSettings) -> Result<Self, SetupError> {
        if settings.default_policy == Policy::Custom {
            return Err(SetupError::Config(
                "allocation_policy 'custom' must be hashed, geoLatency or static (custom is set per enrollment)."
                    .into(),
            ));
        }
        let webhook = WebhookClient::new(&settings.webhooks)?;
        let registrar: Arc<dyn HubRegistrar> = match settings.registrar {
            RegistrarKind::None => Arc::new(NoRegistrar),
            RegistrarKind::Webhook => Arc::new(WebhookRegistrar::new(webhook.clone())),
        };
        Ok(Self { hubs, default_policy: settings.default_policy, region: settings.region, webhook, registrar })
    }

    /// The address rules its calls follow (the service API checks stored URLs with them).
    #[must_use]
    pub fn addresses(&self) -> &crate::addresses::AddressPolicy {
        self.webhook.addresses()
    }

    /// The same assigner with another hub registrar (tests).
    #[must_use]
    pub fn with_registrar(mut self, registrar: Arc<dyn HubRegistrar>) -> Self {
        self.registrar = registrar;
        self
    }

    /// Assigns a device whose enrollment is enabled.
    ///
    /// # Errors
    /// Only store failures; every allocation problem is a `failed` outcome.
    pub async fn assign(&self, r: Request<'_>) -> Result<Assignment, Error> {
        let settings = match r.matched {
            Matched::Individual(e) => &e.settings,
            Matched::Group(g) => &g.settings,
        };
        let hubs = self.hubs.list().await?;
        let (policy, candidates) = match self.resolve(settings, &hubs) {
            Ok(x) => x,
            Err(msg) => return Ok(failed(codes::HUB_NOT_SPECIFIED, msg)),
        };
        let previous = r.previous.and_then(|p| match &p.outcome {
            Outcome::Assigned { assigned_hub, substatus, .. } => Some(PreviousAssignment {
                hub: assigned_hub.as_str(),
                substatus: *substatus,
                twin: p.initial_twin.as_ref(),
            }),
            _ => None,
        });
        let rp = settings.reprovision_policy;
        let decision = allocation::reprovision(
            previous.as_ref().map(|p| p.hub),
            rp.is_none_or(|p| p.update_hub_assignment),
            rp.is_none_or(|p| p.migrate_device_data),
        );

        // Choose the hub (and, for custom allocation, the webhook's twin and payload).
        let (hub, webhook_twin, payload) = match (&decision, &previous) {
            (Reprovision::Stay, Some(prev)) if policy != Policy::Custom => (prev.hub.to_owned(), None, None),
            _ if policy == Policy::Custom => {
                // "Never re-provision": the webhook may only confirm the current hub.
                let linked: Vec<String> = match (&decision, &previous) {
                    (Reprovision::Stay, Some(prev)) => vec![prev.hub.to_owned()],
                    _ => candidates.iter().map(|c| c.host_name.clone()).collect(),
                };
                match self.custom(&r, settings, &linked, previous.as_ref().map(|p| p.hub)).await {
                    Ok(x) => x,
                    Err(f) => return Ok(failed_because(codes::CUSTOM_ALLOCATION_FAILED, f)),
                }
            }
            _ => {
                let cands: Vec<Candidate<'_>> = candidates
                    .iter()
                    .map(|h| Candidate { name: &h.host_name, weight: h.allocation_weight, region: h.region.as_deref() })
                    .collect();
                match allocation::choose(policy, &cands, r.id.key(), self.region.as_deref()) {
                    Some(h) => (h.to_owned(), None, None),
                    None if policy == Policy::Static => {
                        return Ok(failed(
                            codes::HUB_NOT_SPECIFIED,
                            format!(
                                "Static allocation needs exactly one linked hub in iotHubs; {} are eligible.",
                                cands.len()
                            ),
                        ));
                    }
                    None => {
                        return Ok(failed(
                            codes::HUB_NOT_SPECIFIED,
                            "No linked IoT hub is available for this enrollment.",
                        ));
                    }
                }
            }
        };

        let fresh_twin = allocation::merge_json(settings.initial_twin.as_ref(), webhook_twin.as_ref());
        let plan = allocation::plan_twin(&decision, previous.as_ref(), &hub, fresh_twin);
        let moved = previous.as_ref().is_some_and(|p| !p.hub.eq_ignore_ascii_case(&hub));
        let device = HubDevice {
            iot_hub_host_name: hub.clone(),
            device_id: r.device_id.clone(),
            registration_id: r.id.as_str().to_owned(),
            authentication: hub_authentication(&r),
            iot_edge: settings.iot_edge.unwrap_or(false),
            initial_twin: if plan.apply_twin { plan.twin.clone() } else { None },
            previous_iot_hub_host_name: if moved { previous.as_ref().map(|p| p.hub.to_owned()) } else { None },
            migrate_device_data: plan.migrate,
            payload: r.payload.cloned(),
            issued_certificate_thumbprint: r.issued_thumbprint.map(str::to_owned),
        };
        let url =
            hubs.iter().find(|h| h.host_name.eq_ignore_ascii_case(&hub)).and_then(|h| h.registrar_webhook_url.clone());
        let substatus = match self.registrar.register(url.as_deref(), &device).await {
            Ok(o) => allocation::substatus_after_registrar(plan.substatus, o.already_existed, previous.is_some()),
            Err(e) => {
                let detail = e.detail();
                tracing::warn!(hub = %hub, reason = %detail, "the hub registrar failed");
                let shown = format!("Creating the device at {hub} failed: {e}");
                return Ok(failed_because(codes::HUB_REGISTRATION_FAILED, Failure { shown, detail: Some(detail) }));
            }
        };
        Ok(Assignment {
            outcome: Outcome::Assigned { assigned_hub: hub, device_id: r.device_id, substatus, payload },
            twin: plan.twin,
            detail: None,
        })
    }

    /// The policy and the candidate hubs of an enrollment.
    fn resolve<'h>(
        &self,
        s: &EnrollmentSettings,
        hubs: &'h [LinkedHub],
    ) -> Result<(Policy, Vec<&'h LinkedHub>), String> {
        let listed: Option<Vec<String>> = match (&s.iot_hubs, &s.iot_hub_host_name) {
            (Some(l), _) if !l.is_empty() => Some(l.clone()),
            // Legacy single-hub field: static to that hub.
            (_, Some(h)) if s.allocation_policy.is_none() => return Self::legacy_static(h, hubs),
            _ => None,
        };
        let policy = match &s.allocation_policy {
            Some(p) => Policy::parse(p).ok_or_else(|| format!("Unknown allocation policy '{p}'."))?,
            None => self.default_policy,
        };
        let candidates: Vec<&LinkedHub> = match &listed {
            Some(list) => hubs.iter().filter(|h| list.iter().any(|n| n.eq_ignore_ascii_case(&h.host_name))).collect(),
            None => hubs.iter().filter(|h| h.apply_allocation_policy).collect(),
        };
        if candidates.is_empty() {
            return Err(match listed {
                Some(l) => format!("None of the enrollment's iotHubs ({}) is a linked hub.", l.join(", ")),
                None => "No linked IoT hub takes part in allocation.".into(),
            });
        }
        Ok((policy, candidates))
    }

    fn legacy_static<'h>(name: &str, hubs: &'h [LinkedHub]) -> Result<(Policy, Vec<&'h LinkedHub>), String> {
        match hubs.iter().find(|h| h.host_name.eq_ignore_ascii_case(name)) {
            Some(h) => Ok((Policy::Static, vec![h])),
            None => Err(format!("The enrollment's iotHubHostName '{name}' is not a linked hub.")),
        }
    }

    /// Calls the enrollment's webhook; returns (hub, twin, payload).
    async fn custom(
        &self,
        r: &Request<'_>,
        settings: &EnrollmentSettings,
        linked: &[String],
        current_hub: Option<&str>,
    ) -> Result<(String, Option<Value>, Option<Value>), Failure> {
        let Some(def) = &settings.custom_allocation else {
            return Err("Custom allocation failed: the enrollment has no customAllocationDefinition."
                .to_owned()
                .into());
        };
        let mut ctx = json!({ "registrationId": r.id.as_str() });
        if let Some(h) = current_hub {
            ctx["currentIotHubHostName"] = json!(h);
            ctx["currentDeviceId"] = json!(r.device_id);
        }
        let tpm = match r.matched {
            Matched::Individual(e) => match &e.attestation {
                provisio_core::model::Attestation::Tpm { endorsement_key, storage_root_key } => {
                    Some((endorsement_key, r.tpm_storage_root_key.or(storage_root_key.as_deref())))
                }
                _ => None,
            },
            Matched::Group(_) => None,
        };
        match (r.x509, tpm) {
            (Some(x), _) => {
                ctx["x509"] = json!({
                    "certificateInfo": wire::cert_info_to_wire(&x.certificate_info),
                    "signingCertificateInfo": x.signing_certificate_info.as_ref().map(wire::cert_info_to_wire),
                });
            }
            // A TPM device's public keys, as DPS sends them (`spec/service-api.md` §4.4): the
            // enrolled endorsement key and the storage root key it registered with.
            (None, Some((endorsement_key, storage_root_key))) => {
                let mut tpm = json!({ "endorsementKey": endorsement_key });
                if let Some(srk) = storage_root_key {
                    tpm["storageRootKey"] = json!(srk);
                }
                ctx["tpm"] = tpm;
            }
            // DPS sends an empty object for symmetric-key devices.
            (None, _) => ctx["symmetricKey"] = json!({}),
        }
        if let Some(p) = r.payload {
            ctx["payload"] = p.clone();
        }
        let mut body = json!({ "deviceRuntimeContext": ctx, "linkedHubs": linked });
        match r.matched {
            Matched::Individual(e) => {
                let mut w = serde_json::to_value(wire::enrollment_to_wire(e, "", false, None)).unwrap_or(Value::Null);
                strip_etag(&mut w);
                body["individualEnrollment"] = w;
            }
            Matched::Group(g) => {
                let mut w = serde_json::to_value(wire::group_to_wire(g, "", false)).unwrap_or(Value::Null);
                strip_etag(&mut w);
                body["enrollmentGroup"] = w;
            }
        }
        let resp = self.webhook.post_json(&def.webhook_url, &body, Duration::from_millis(300)).await.map_err(|e| {
            // The device learns the status code at most (DPS's own wording); the body, the
            // address and the connection error go to the audit log.
            let shown = match e.last.shown() {
                Shown::Status(status) => format!("Custom allocation failed with status code: {status}"),
                Shown::NotJson => "Custom allocation failed: the webhook's answer is not valid JSON.".into(),
                Shown::TooLarge => "Custom allocation failed: the webhook's answer is too large.".into(),
                Shown::Unreachable => "Custom allocation failed: the webhook could not be reached.".into(),
            };
            let detail = format!("webhook at {}: {e}", crate::webhook::host_of(&def.webhook_url));
            tracing::warn!(registration_id = %r.id, reason = %detail, "the custom allocation webhook failed");
            Failure { shown, detail: Some(detail) }
        })?;
        let hub = resp
            .get("iotHubHostName")
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| "Custom allocation failed: the webhook's response has no iotHubHostName.".to_owned())?;
        let Some(hub) = linked.iter().find(|l| l.eq_ignore_ascii_case(hub)) else {
            // Not quoted to the device: it is text from the answer.
            return Err(Failure {
                shown: format!(
                    "Custom allocation failed: the webhook chose a hub that is not one of the linked hubs offered ({}).",
                    linked.join(", ")
                ),
                detail: Some(format!("the webhook chose '{}'", shorten(hub))),
            });
        };
        let twin = resp.get("initialTwin").filter(|t| !t.is_null()).cloned();
        let payload = resp.get("payload").filter(|p| !p.is_null()).cloned();
        Ok((hub.clone(), twin, payload))
    }
}

/// The enrollment as DPS embeds it in the webhook's request: no etag, and the webhook URL's
/// query (it holds the function key) shown as `?****`.
fn strip_etag(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("etag");
    }
    if let Some(url) = v.pointer_mut("/customAllocationDefinition/webhookUrl")
        && let Some((base, _query)) = url.as_str().and_then(|u| u.split_once('?'))
    {
        *url = json!(format!("{base}?****"));
    }
}

/// The device's credentials at the hub ([`allocation::hub_credential`]), as the registrar
/// webhook carries them.
fn hub_authentication(r: &Request<'_>) -> HubAuthentication {
    let (attestation, group) = match r.matched {
        Matched::Individual(e) => (&e.attestation, false),
        Matched::Group(g) => (&g.attestation, true),
    };
    let thumbprint = r.x509.map(|x| x.certificate_info.sha256_thumbprint.as_str());
    match allocation::hub_credential(attestation, group, r.id.as_str(), thumbprint, r.tpm_key) {
        HubCredential::Sas { primary_key, secondary_key } => HubAuthentication::Sas { primary_key, secondary_key },
        HubCredential::Thumbprint { sha256 } => HubAuthentication::SelfSigned { primary_thumbprint: sha256 },
    }
}
