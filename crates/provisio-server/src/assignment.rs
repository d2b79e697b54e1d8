//! Assignment: which hub a device goes to, with which twin and payload, and what happens
//! at the hub. Policy resolution (`spec/service-api.md` §4.2), the built-in policies, the
//! custom allocation webhook (§4.4), re-provisioning (§4.6) and the hub registrar.

use std::{sync::Arc, time::Duration};

use provisio_core::{
    allocation::{self, Candidate, Policy, Reprovision},
    attest::Matched,
    ids::RegistrationId,
    keys,
    model::{Attestation, EnrollmentSettings, LinkedHub, Outcome, RegistrationRecord, Substatus, X509Details},
};
use provisio_proto::error::codes;
use serde_json::{Value, json};

use crate::{
    ServerError,
    hubs::Hubs,
    registrar::{HubAuthentication, HubDevice, HubRegistrar},
    service_model,
};

/// How custom allocation webhooks are called.
#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    attempts: u32,
}

impl WebhookClient {
    /// Calls with `http` (which carries the per-attempt timeout), `attempts` times at most.
    #[must_use]
    pub fn new(http: reqwest::Client, attempts: u32) -> Self {
        Self { http, attempts: attempts.max(1) }
    }

    /// POSTs the allocation request; returns the parsed response or the cause of failure.
    async fn call(&self, url: &str, body: &Value) -> Result<Value, String> {
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
            }
            match self.http.post(url).json(body).send().await {
                Ok(r) if r.status().is_success() => {
                    let text = r.text().await.map_err(|e| format!("reading the webhook's response failed: {e}"))?;
                    return serde_json::from_str::<Value>(&text).map_err(|e| {
                        format!("the webhook's response is not valid JSON ({e}): {}", crate::engine::shorten(&text))
                    });
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    last = format!("Custom allocation failed with status code: {}", status.as_u16());
                    if !text.trim().is_empty() {
                        last.push_str(&format!(" (response: {})", crate::engine::shorten(text.trim())));
                    }
                    // Only server errors and throttling are worth another attempt.
                    if !(status.is_server_error() || status.as_u16() == 429) {
                        return Err(last);
                    }
                }
                Err(e) => last = format!("the webhook could not be called: {}", crate::registrar::redact(&e)),
            }
        }
        Err(format!("{last} (after {} attempts)", self.attempts))
    }
}

/// Decides and carries out assignments.
#[derive(Clone)]
pub struct Assigner {
    /// Linked hubs.
    pub hubs: Hubs,
    /// The service-level default policy.
    pub default_policy: Policy,
    /// The serving node's region, for `geoLatency`.
    pub region: Option<String>,
    /// Custom allocation webhooks.
    pub webhook: WebhookClient,
    /// What happens at the hub.
    pub registrar: Arc<dyn HubRegistrar>,
}

/// What assignment decided.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The result.
    pub outcome: Outcome,
    /// The twin the device has at its hub.
    pub twin: Option<Value>,
}

fn failed(code: u32, message: impl Into<String>) -> Assignment {
    Assignment { outcome: Outcome::Failed { error_code: code, error_message: message.into() }, twin: None }
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
}

impl Assigner {
    /// Assigns a device whose enrollment is enabled.
    ///
    /// # Errors
    /// Only store failures; every allocation problem is a `failed` outcome.
    pub async fn assign(&self, r: Request<'_>) -> Result<Assignment, ServerError> {
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
            Outcome::Assigned { assigned_hub, substatus, .. } => {
                Some((assigned_hub.clone(), *substatus, p.initial_twin.clone()))
            }
            _ => None,
        });
        let rp = settings.reprovision_policy;
        let decision = allocation::reprovision(
            previous.as_ref().map(|p| p.0.as_str()),
            rp.is_none_or(|p| p.update_hub_assignment),
            rp.is_none_or(|p| p.migrate_device_data),
        );

        // Choose the hub (and, for custom allocation, the webhook's twin and payload).
        let (hub, webhook_twin, payload) = match (&decision, &previous) {
            (Reprovision::Stay, Some((prev_hub, _, _))) if policy != Policy::Custom => (prev_hub.clone(), None, None),
            _ if policy == Policy::Custom => {
                // "Never re-provision": the webhook may only confirm the current hub.
                let linked: Vec<String> = match (&decision, &previous) {
                    (Reprovision::Stay, Some((h, _, _))) => vec![h.clone()],
                    _ => candidates.iter().map(|c| c.host_name.clone()).collect(),
                };
                match self.custom(&r, settings, &linked, previous.as_ref().map(|p| p.0.as_str())).await {
                    Ok(x) => x,
                    Err(msg) => return Ok(failed(codes::CUSTOM_ALLOCATION_FAILED, msg)),
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
        let moved = previous.as_ref().is_some_and(|p| !p.0.eq_ignore_ascii_case(&hub));
        let (mut substatus, twin, apply_twin, migrate) = match (&decision, &previous) {
            (Reprovision::Initial, _) | (_, None) => (Substatus::InitialAssignment, fresh_twin, true, false),
            (Reprovision::Stay, Some((_, sub, t))) => (*sub, t.clone(), false, true),
            (Reprovision::Reallocate { migrate: true }, Some((_, sub, t))) => {
                if moved {
                    (Substatus::DeviceDataMigrated, t.clone().or(fresh_twin), true, true)
                } else {
                    (*sub, t.clone(), false, true)
                }
            }
            // Reset to the initial configuration, also on the same hub (a factory reset).
            (Reprovision::Reallocate { migrate: false }, Some(_)) => {
                (Substatus::DeviceDataReset, fresh_twin, true, false)
            }
        };

        let device = HubDevice {
            iot_hub_host_name: hub.clone(),
            device_id: r.device_id.clone(),
            registration_id: r.id.as_str().to_owned(),
            authentication: hub_authentication(&r),
            iot_edge: settings.iot_edge.unwrap_or(false),
            initial_twin: if apply_twin { twin.clone() } else { None },
            previous_iot_hub_host_name: if moved { previous.as_ref().map(|p| p.0.clone()) } else { None },
            migrate_device_data: migrate,
        };
        let url =
            hubs.iter().find(|h| h.host_name.eq_ignore_ascii_case(&hub)).and_then(|h| h.registrar_webhook_url.clone());
        match self.registrar.register(url.as_deref(), &device).await {
            Ok(o) => {
                if o.already_existed && previous.is_none() {
                    substatus = Substatus::ReprovisionedToInitialAssignment;
                }
            }
            Err(msg) => {
                return Ok(failed(
                    codes::HUB_REGISTRATION_FAILED,
                    format!("Creating the device at {hub} failed: {msg}"),
                ));
            }
        }
        Ok(Assignment {
            outcome: Outcome::Assigned { assigned_hub: hub, device_id: r.device_id, substatus, payload },
            twin,
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
    ) -> Result<(String, Option<Value>, Option<Value>), String> {
        let Some(def) = &settings.custom_allocation else {
            return Err("Custom allocation failed: the enrollment has no customAllocationDefinition.".into());
        };
        let mut ctx = json!({ "registrationId": r.id.as_str() });
        if let Some(h) = current_hub {
            ctx["currentIotHubHostName"] = json!(h);
            ctx["currentDeviceId"] = json!(r.device_id);
        }
        match (r.x509, r.matched) {
            (Some(x), _) => {
                ctx["x509"] = json!({
                    "certificateInfo": service_model::cert_info_to_wire(&x.certificate_info),
                    "signingCertificateInfo": x.signing_certificate_info.as_ref().map(service_model::cert_info_to_wire),
                });
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
                let mut w =
                    serde_json::to_value(service_model::enrollment_to_wire(e, "", false, None)).unwrap_or(Value::Null);
                strip_etag(&mut w);
                body["individualEnrollment"] = w;
            }
            Matched::Group(g) => {
                let mut w = serde_json::to_value(service_model::group_to_wire(g, "", false)).unwrap_or(Value::Null);
                strip_etag(&mut w);
                body["enrollmentGroup"] = w;
            }
        }
        let resp = self.webhook.call(&def.webhook_url, &body).await.map_err(|cause| {
            if cause.starts_with("Custom allocation failed") {
                cause
            } else {
                format!("Custom allocation failed: {cause}")
            }
        })?;
        let hub = resp
            .get("iotHubHostName")
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| "Custom allocation failed: the webhook's response has no iotHubHostName.".to_owned())?;
        let Some(hub) = linked.iter().find(|l| l.eq_ignore_ascii_case(hub)) else {
            return Err(format!(
                "Custom allocation failed: the webhook chose '{}', which is not one of the linked hubs offered ({}).",
                crate::engine::shorten(hub),
                linked.join(", ")
            ));
        };
        let twin = resp.get("initialTwin").filter(|t| !t.is_null()).cloned();
        let payload = resp.get("payload").filter(|p| !p.is_null()).cloned();
        Ok((hub.clone(), twin, payload))
    }
}

fn strip_etag(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("etag");
    }
}

/// The device's credentials at the hub: the key it used at DPS (derived for groups), or
/// its certificate's thumbprint.
fn hub_authentication(r: &Request<'_>) -> HubAuthentication {
    if let Some(x) = r.x509 {
        return HubAuthentication::SelfSigned { primary_thumbprint: x.certificate_info.sha256_thumbprint.clone() };
    }
    if let Some(key) = r.tpm_key {
        // A TPM holds one key: both slots name it.
        return HubAuthentication::Sas { primary_key: key.to_owned(), secondary_key: key.to_owned() };
    }
    let (attestation, group) = match r.matched {
        Matched::Individual(e) => (&e.attestation, false),
        Matched::Group(g) => (&g.attestation, true),
    };
    match attestation {
        Attestation::SymmetricKey { primary_key, secondary_key } if group => HubAuthentication::Sas {
            primary_key: keys::derive_device_key(primary_key, r.id.as_str()).unwrap_or_default(),
            secondary_key: keys::derive_device_key(secondary_key, r.id.as_str()).unwrap_or_default(),
        },
        Attestation::SymmetricKey { primary_key, secondary_key } => {
            HubAuthentication::Sas { primary_key: primary_key.clone(), secondary_key: secondary_key.clone() }
        }
        _ => HubAuthentication::Sas { primary_key: String::new(), secondary_key: String::new() },
    }
}
