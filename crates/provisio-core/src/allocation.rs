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
