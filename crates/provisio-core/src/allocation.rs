//! Choosing an IoT hub.

use aws_lc_rs::digest;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Weighted hash of the registration id.
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
