//! Choosing an IoT hub, and what a (re-)registration does at it: the twin, the substatus
//! and the credentials the device gets there.

use aws_lc_rs::digest;
use serde_json::Value;

use crate::model::{Attestation, Substatus};

/// A hub that may receive devices, with its allocation weight (1–1000).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubChoice<'a> {
    /// Host name.
    pub name: &'a str,
    /// Allocation weight; 0 excludes the hub.
    pub weight: u32,
}

/// The `hashed` policy: weighted rendezvous hashing of the registration id.
///
/// Every hub gets a score `-weight / ln(u)`, where `u` in (0,1) is a hash of the hub name
/// and the case-folded registration id; the highest score wins. A device therefore
/// keeps its hub while the hub set is unchanged, devices spread in proportion to the
/// weights, and adding or removing a hub moves only the devices that must move.
#[must_use]
pub fn hashed<'a>(hubs: &[HubChoice<'a>], registration_key: &str) -> Option<&'a str> {
    let mut best: Option<(f64, &'a str)> = None;
    for hub in hubs.iter().filter(|h| h.weight > 0) {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(hub.name.to_ascii_lowercase().as_bytes());
        ctx.update(&[0]);
        ctx.update(registration_key.as_bytes());
        let d = ctx.finish();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        // Map to the open interval (0, 1); 53 bits keep the f64 exact.
        #[allow(clippy::cast_precision_loss)]
        let u = ((u64::from_be_bytes(b) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(hub.weight) / u.ln();
        // Ties (practically impossible) break on the name, so the order of `hubs` never matters.
        if best.is_none_or(|(s, n)| score > s || (score == s && hub.name < n)) {
            best = Some((score, hub.name));
        }
    }
    best.map(|(_, n)| n)
}

/// The allocation policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Weighted hash of the registration id (DPS's default).
    #[default]
    Hashed,
    /// The hubs of the serving node's region, hashed; all hubs if none is there.
    GeoLatency,
    /// The one hub of the enrollment.
    Static,
    /// The customer's webhook decides.
    Custom,
}

impl Policy {
    /// Parses a DPS policy name (case-insensitive: ARM spells them `Hashed`, …).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "hashed" => Some(Self::Hashed),
            "geolatency" => Some(Self::GeoLatency),
            "static" => Some(Self::Static),
            "custom" => Some(Self::Custom),
            _ => None,
        }
    }
}

/// A hub with what allocation needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Host name.
    pub name: &'a str,
    /// Allocation weight.
    pub weight: u32,
    /// Region, if configured.
    pub region: Option<&'a str>,
}

/// Picks a hub among `candidates` for the built-in policies (`Custom` is decided by the
/// webhook; it returns `None` here).
#[must_use]
pub fn choose<'a>(
    policy: Policy,
    candidates: &[Candidate<'a>],
    registration_key: &str,
    node_region: Option<&str>,
) -> Option<&'a str> {
    let all: Vec<HubChoice<'a>> = candidates.iter().map(|c| HubChoice { name: c.name, weight: c.weight }).collect();
    match policy {
        Policy::Hashed => hashed(&all, registration_key),
        Policy::Static => match candidates {
            [only] => Some(only.name),
            _ => None,
        },
        Policy::GeoLatency => {
            let local: Vec<HubChoice<'a>> = candidates
                .iter()
                .filter(|c| node_region.is_some_and(|r| c.region.is_some_and(|cr| cr.eq_ignore_ascii_case(r))))
                .map(|c| HubChoice { name: c.name, weight: c.weight })
                .collect();
            hashed(&local, registration_key).or_else(|| hashed(&all, registration_key))
        }
        Policy::Custom => None,
    }
}

/// What re-registration does, given the device's previous hub and the enrollment's
/// `reprovisionPolicy` (`updateHubAssignment`, `migrateDeviceData`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reprovision {
    /// First assignment (no previous record).
    Initial,
    /// Keep the previous hub: the policy does not update hub assignments.
    Stay,
    /// Allocate again.
    Reallocate {
        /// Carry the twin along (`true`) or reset it to the initial twin (`false`).
        migrate: bool,
    },
}

/// Decides the re-registration behaviour (`spec/service-api.md` §4.6). A missing policy
/// means the DPS default, re-provision and migrate data.
#[must_use]
pub fn reprovision(previous_hub: Option<&str>, update_hub_assignment: bool, migrate_device_data: bool) -> Reprovision {
    match previous_hub {
        None => Reprovision::Initial,
        Some(_) if !update_hub_assignment => Reprovision::Stay,
        Some(_) => Reprovision::Reallocate { migrate: migrate_device_data },
    }
}

/// Merges `over` into `base`: objects key by key (recursively), anything else replaced.
#[must_use]
pub fn merge_json(base: Option<&serde_json::Value>, over: Option<&serde_json::Value>) -> Option<serde_json::Value> {
    use serde_json::Value;
    match (base, over) {
        (None, None) => None,
        (Some(b), None) => Some(b.clone()),
        (None, Some(o)) => Some(o.clone()),
        (Some(Value::Object(b)), Some(Value::Object(o))) => {
            let mut out = b.clone();
            for (k, v) in o {
                let merged = merge_json(b.get(k), Some(v)).unwrap_or(Value::Null);
                out.insert(k.clone(), merged);
            }
            Some(Value::Object(out))
        }
        (Some(_), Some(o)) => Some(o.clone()),
    }
}

/// A device's previous assignment, as its re-registration sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreviousAssignment<'a> {
    /// The hub it was assigned to.
    pub hub: &'a str,
    /// The substatus it was given.
    pub substatus: Substatus,
    /// The twin it has there.
    pub twin: Option<&'a Value>,
}

/// What a registration does with the device's twin, and the substatus it reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinPlan {
    /// The substatus of the result (before the hub registrar has spoken, see
    /// [`substatus_after_registrar`]).
    pub substatus: Substatus,
    /// The twin the device has at its hub afterwards.
    pub twin: Option<Value>,
    /// Whether that twin is applied at the hub (`false`: the hub keeps what it has).
    pub apply_twin: bool,
    /// Whether the device's data moves with it (`deviceDataMigrated`).
    pub migrate: bool,
}

/// The substatus matrix of `spec/service-api.md` §4.6: given the re-registration
/// `decision`, the `previous` assignment, the `hub` chosen now and the enrollment's
/// `fresh_twin` (its initial twin merged with a custom allocation webhook's), what the
/// device's twin becomes and which substatus it is told.
///
/// * first assignment (or no previous assignment): `initialAssignment`, the fresh twin;
/// * stay (updateHubAssignment off): the previous substatus and twin, nothing applied;
/// * re-allocate and migrate: to another hub `deviceDataMigrated` with the previous twin
///   (the fresh one if it had none); to the same hub nothing changes;
/// * re-allocate and reset: `deviceDataReset` with the fresh twin, also on the same hub
///   (a factory reset).
#[must_use]
pub fn plan_twin(
    decision: &Reprovision,
    previous: Option<&PreviousAssignment<'_>>,
    hub: &str,
    fresh_twin: Option<Value>,
) -> TwinPlan {
    let plan = |substatus, twin, apply_twin, migrate| TwinPlan { substatus, twin, apply_twin, migrate };
    let Some(prev) = previous else {
        return plan(Substatus::InitialAssignment, fresh_twin, true, false);
    };
    let moved = !prev.hub.eq_ignore_ascii_case(hub);
    match decision {
        Reprovision::Initial => plan(Substatus::InitialAssignment, fresh_twin, true, false),
        Reprovision::Stay => plan(prev.substatus, prev.twin.cloned(), false, true),
        Reprovision::Reallocate { migrate: true } if moved => {
            plan(Substatus::DeviceDataMigrated, prev.twin.cloned().or(fresh_twin), true, true)
        }
        Reprovision::Reallocate { migrate: true } => plan(prev.substatus, prev.twin.cloned(), false, true),
        Reprovision::Reallocate { migrate: false } => plan(Substatus::DeviceDataReset, fresh_twin, true, false),
    }
}

/// The substatus once the hub registrar has created the device: a device DPS had no record
/// of that already existed at the hub is `reprovisionedToInitialAssignment` (since
/// api-version 2019-04-15; `spec/device-api.md` §1.6).
#[must_use]
pub fn substatus_after_registrar(
    planned: Substatus,
    already_existed_at_hub: bool,
    had_previous_record: bool,
) -> Substatus {
    if already_existed_at_hub && !had_previous_record { Substatus::ReprovisionedToInitialAssignment } else { planned }
}

/// The credentials a device gets at its hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubCredential {
    /// Shared access keys.
    Sas {
        /// Primary key (base64).
        primary_key: String,
        /// Secondary key (base64).
        secondary_key: String,
    },
    /// X.509, by the SHA-256 thumbprint of the device certificate.
    Thumbprint {
        /// Upper-case hex.
        sha256: String,
    },
}

/// Which credentials a device gets at its hub: the certificate it presented (X.509), the
/// key delivered into its TPM (both slots: a TPM holds one), the keys derived from its
/// group's keys (`from_group`), or its individual enrollment's keys. An attestation without
/// what it needs (which attestation never lets through) gives empty keys.
#[must_use]
pub fn hub_credential(
    attestation: &Attestation,
    from_group: bool,
    registration_id: &str,
    certificate_sha256: Option<&str>,
    tpm_key: Option<&str>,
) -> HubCredential {
    if let Some(t) = certificate_sha256 {
        return HubCredential::Thumbprint { sha256: t.to_owned() };
    }
    if let Some(key) = tpm_key {
        return HubCredential::Sas { primary_key: key.to_owned(), secondary_key: key.to_owned() };
    }
    match attestation {
        Attestation::SymmetricKey { primary_key, secondary_key } if from_group => HubCredential::Sas {
            primary_key: crate::keys::derive_device_key(primary_key, registration_id).unwrap_or_default(),
            secondary_key: crate::keys::derive_device_key(secondary_key, registration_id).unwrap_or_default(),
        },
        Attestation::SymmetricKey { primary_key, secondary_key } => {
            HubCredential::Sas { primary_key: primary_key.clone(), secondary_key: secondary_key.clone() }
        }
        Attestation::X509(_) | Attestation::Tpm { .. } => {
            HubCredential::Sas { primary_key: String::new(), secondary_key: String::new() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_order_independent() {
        let a = [HubChoice { name: "h1", weight: 1 }, HubChoice { name: "h2", weight: 1 }];
        let b = [HubChoice { name: "h2", weight: 1 }, HubChoice { name: "h1", weight: 1 }];
        for i in 0..100 {
            let k = format!("dev-{i}");
            assert_eq!(hashed(&a, &k), hashed(&b, &k));
        }
        assert_eq!(hashed(&[], "x"), None);
        assert_eq!(hashed(&[HubChoice { name: "h", weight: 0 }], "x"), None);
    }

    #[test]
    fn spreads_by_weight() {
        let hubs = [
            HubChoice { name: "a", weight: 1 },
            HubChoice { name: "b", weight: 1 },
            HubChoice { name: "c", weight: 2 },
        ];
        let mut counts = std::collections::HashMap::new();
        for i in 0..8000 {
            *counts.entry(hashed(&hubs, &format!("device-{i}")).unwrap()).or_insert(0) += 1;
        }
        // Expected 2000 / 2000 / 4000; allow generous statistical slack.
        assert!((1700..2300).contains(&counts["a"]), "{counts:?}");
        assert!((1700..2300).contains(&counts["b"]), "{counts:?}");
        assert!((3600..4400).contains(&counts["c"]), "{counts:?}");
    }

    #[test]
    fn ten_thousand_ids_follow_the_weights_within_five_percent() {
        let hubs = [
            Candidate { name: "w1.example", weight: 1, region: None },
            Candidate { name: "w2.example", weight: 2, region: None },
            Candidate { name: "w3.example", weight: 3, region: None },
            Candidate { name: "w4.example", weight: 4, region: None },
        ];
        let mut counts = std::collections::HashMap::new();
        for i in 0..10_000 {
            let id = format!("device-{i:05}");
            let hub = choose(Policy::Hashed, &hubs, &id, None).unwrap();
            // Stable: the same id gets the same hub again.
            assert_eq!(choose(Policy::Hashed, &hubs, &id, None), Some(hub));
            *counts.entry(hub).or_insert(0u32) += 1;
        }
        for h in &hubs {
            // Each hub's share is within 5 points of its weight's share of the total…
            let share = f64::from(h.weight) / 10.0;
            let got = f64::from(counts[h.name]) / 10_000.0;
            assert!((got - share).abs() <= 0.05, "{}: share {got} vs {share} ({counts:?})", h.name);
            // …and within 4 standard deviations of a binomial draw, i.e. the hash is unbiased.
            let sd = (10_000.0 * share * (1.0 - share)).sqrt();
            assert!((got * 10_000.0 - share * 10_000.0).abs() <= 4.0 * sd, "{}: {counts:?}", h.name);
        }
    }

    #[test]
    fn static_geo_and_reprovision_rules() {
        let a = Candidate { name: "a", weight: 1, region: Some("westeurope") };
        let b = Candidate { name: "b", weight: 1, region: Some("eastus") };
        let c = Candidate { name: "c", weight: 1, region: Some("eastus") };
        assert_eq!(choose(Policy::Static, std::slice::from_ref(&a), "x", None), Some("a"));
        assert_eq!(choose(Policy::Static, &[a.clone(), b.clone()], "x", None), None);
        for i in 0..50 {
            let id = format!("d{i}");
            assert_eq!(
                choose(Policy::GeoLatency, &[a.clone(), b.clone(), c.clone()], &id, Some("WestEurope")),
                Some("a")
            );
            assert_ne!(choose(Policy::GeoLatency, &[a.clone(), b.clone(), c.clone()], &id, Some("eastus")), Some("a"));
        }
        // No hub in the node's region: all hubs.
        assert!(choose(Policy::GeoLatency, &[a, b], "x", Some("mars")).is_some());
        assert_eq!(reprovision(None, false, false), Reprovision::Initial);
        assert_eq!(reprovision(Some("h"), false, true), Reprovision::Stay);
        assert_eq!(reprovision(Some("h"), true, true), Reprovision::Reallocate { migrate: true });
        assert_eq!(reprovision(Some("h"), true, false), Reprovision::Reallocate { migrate: false });
    }

    #[test]
    fn twins_merge_deeply() {
        let base = serde_json::json!({"tags": {"a": 1, "b": {"c": 2}}, "properties": {"desired": {"x": 1}}});
        let over = serde_json::json!({"tags": {"b": {"d": 3}}, "properties": {"desired": {"x": 2}}});
        assert_eq!(
            merge_json(Some(&base), Some(&over)).unwrap(),
            serde_json::json!({"tags": {"a": 1, "b": {"c": 2, "d": 3}}, "properties": {"desired": {"x": 2}}})
        );
        assert_eq!(merge_json(None, Some(&over)), Some(over.clone()));
        assert_eq!(merge_json(None, None), None);
    }

    #[test]
    fn removing_a_hub_moves_only_its_devices() {
        let three = [
            HubChoice { name: "a", weight: 1 },
            HubChoice { name: "b", weight: 1 },
            HubChoice { name: "c", weight: 1 },
        ];
        let two = &three[..2];
        for i in 0..1000 {
            let k = format!("d{i}");
            let before = hashed(&three, &k).unwrap();
            if before != "c" {
                assert_eq!(hashed(two, &k), Some(before));
            }
        }
    }
}

#[cfg(test)]
mod reprovision_tests {
    use serde_json::json;

    use super::*;
    use crate::model::Substatus::{
        DeviceDataMigrated as Migrated, DeviceDataReset as Reset, InitialAssignment as Initial,
        ReprovisionedToInitialAssignment as ReInitial,
    };

    /// Every (policy, previous hub, new hub) combination of `spec/service-api.md` §4.6, one
    /// row each: (update hub assignment, migrate data, previous hub and substatus, new hub,
    /// substatus told, twin: "prev" / "fresh" / none, twin applied, data migrated).
    #[test]
    fn the_substatus_matrix() {
        type Row =
            (bool, bool, Option<(&'static str, Substatus)>, &'static str, Substatus, Option<&'static str>, bool, bool);
        let rows: &[Row] = &[
            // No previous assignment: whatever the policy, an initial assignment.
            (true, true, None, "h1", Initial, Some("fresh"), true, false),
            (true, false, None, "h1", Initial, Some("fresh"), true, false),
            (false, true, None, "h1", Initial, Some("fresh"), true, false),
            (false, false, None, "h1", Initial, Some("fresh"), true, false),
            // Never re-provision: stays, keeps its substatus and twin, nothing applied.
            (false, true, Some(("h1", Initial)), "h1", Initial, Some("prev"), false, true),
            (false, false, Some(("h1", Migrated)), "h1", Migrated, Some("prev"), false, true),
            // Re-provision and migrate: another hub migrates, the same hub changes nothing.
            (true, true, Some(("h1", Initial)), "h2", Migrated, Some("prev"), true, true),
            (true, true, Some(("h1", Reset)), "H1", Reset, Some("prev"), false, true),
            (true, true, Some(("h1", Initial)), "h1", Initial, Some("prev"), false, true),
            // Re-provision and reset: the fresh twin, on another hub or the same one.
            (true, false, Some(("h1", Initial)), "h2", Reset, Some("fresh"), true, false),
            (true, false, Some(("h1", Migrated)), "h1", Reset, Some("fresh"), true, false),
        ];
        let (prev_twin, fresh_twin) = (json!({"tags": {"from": "prev"}}), json!({"tags": {"from": "fresh"}}));
        for &(update, migrate, previous, hub, substatus, twin, apply_twin, migrated) in rows {
            let previous = previous.map(|(h, s)| PreviousAssignment { hub: h, substatus: s, twin: Some(&prev_twin) });
            let decision = reprovision(previous.map(|p| p.hub), update, migrate);
            let got = plan_twin(&decision, previous.as_ref(), hub, Some(fresh_twin.clone()));
            let want_twin = twin.map(|t| if t == "prev" { prev_twin.clone() } else { fresh_twin.clone() });
            let want = TwinPlan { substatus, twin: want_twin, apply_twin, migrate: migrated };
            assert_eq!(got, want, "update={update} migrate={migrate} previous={previous:?} hub={hub}");
        }
    }

    #[test]
    fn a_migrating_device_without_a_twin_gets_the_fresh_one() {
        let previous = PreviousAssignment { hub: "h1", substatus: Initial, twin: None };
        let got = plan_twin(&Reprovision::Reallocate { migrate: true }, Some(&previous), "h2", Some(json!({"a": 1})));
        assert_eq!((got.substatus, got.twin), (Migrated, Some(json!({"a": 1}))));
    }

    #[test]
    fn the_registrar_turns_an_unknown_device_already_at_its_hub_into_reprovisioned() {
        for (planned, existed, had_record, want) in [
            (Initial, true, false, ReInitial),
            (Initial, false, false, Initial),
            (Initial, true, true, Initial),
            (Migrated, true, true, Migrated),
            (Reset, false, true, Reset),
        ] {
            assert_eq!(
                substatus_after_registrar(planned, existed, had_record),
                want,
                "{planned:?} {existed} {had_record}"
            );
        }
    }

    #[test]
    fn hub_credentials_by_attestation() {
        use crate::model::{PrimarySecondary, X509Attestation};
        let (p, s) = (crate::keys::generate_key(), crate::keys::generate_key());
        let sym = Attestation::SymmetricKey { primary_key: p.clone(), secondary_key: s.clone() };
        let sas = |a: &str, b: &str| HubCredential::Sas { primary_key: a.to_owned(), secondary_key: b.to_owned() };
        let derived = |k: &str| crate::keys::derive_device_key(k, "Dev-1").unwrap();
        let x509 = Attestation::X509(X509Attestation::CaReferences(PrimarySecondary {
            primary: Some("root".to_owned()),
            secondary: None,
        }));
        let tpm = Attestation::Tpm { endorsement_key: "AAE=".into(), storage_root_key: None };
        // (attestation, from a group, certificate thumbprint, TPM key, credential given)
        type Row<'a> = (&'a Attestation, bool, Option<&'a str>, Option<&'a str>, HubCredential);
        let rows: &[Row<'_>] = &[
            // An individual enrollment's own keys; a group's keys derived for the device.
            (&sym, false, None, None, sas(&p, &s)),
            (&sym, true, None, None, sas(&derived(&p), &derived(&s))),
            // X.509: the certificate's thumbprint, individual or group.
            (&x509, true, Some("AB12"), None, HubCredential::Thumbprint { sha256: "AB12".into() }),
            (&x509, false, Some("AB12"), None, HubCredential::Thumbprint { sha256: "AB12".into() }),
            // TPM: the key in the TPM, in both slots.
            (&tpm, false, None, Some("a2V5"), sas("a2V5", "a2V5")),
            // Nothing to give (attestation never lets such a device through).
            (&tpm, false, None, None, sas("", "")),
        ];
        for (attestation, group, thumbprint, tpm_key, want) in rows {
            assert_eq!(&hub_credential(attestation, *group, "Dev-1", *thumbprint, *tpm_key), want, "{attestation:?}");
        }
    }
}
