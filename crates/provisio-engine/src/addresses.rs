//! Which addresses the server's own calls (custom allocation webhooks, hub registrars) may
//! reach. Anyone allowed to write an enrollment chooses such a URL, so without rules the
//! server would call its own loopback, the private network or a cloud metadata service for
//! them. The rules:
//!
//! * an address inside one of `webhook_allowed_networks` may be called, over `http` or
//!   `https`;
//! * any other address must be public (not loopback, private, link-local, carrier-grade NAT,
//!   unspecified, multicast, documentation or another special-purpose range, nor an
//!   IPv4-mapped or NAT64 form of one), and is called over `https` only.
//!
//! A host name is resolved at call time, every address it resolves to is checked, and the
//! connection goes to exactly those addresses ([`crate::webhook`]), so a name whose answer
//! changes between a check and the connection (DNS rebinding) gains nothing.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::SetupError;

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(first: u16, second: u16, len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(first, second, 0, 0, 0, 0, 0, 0), len)
}

/// IPv4 ranges that are not public (IANA's special-purpose address registry).
const NOT_PUBLIC_V4: &[Ipv4Net] = &[
    v4(0, 0, 0, 0, 8),       // "this network", with the unspecified address
    v4(10, 0, 0, 0, 8),      // private
    v4(100, 64, 0, 0, 10),   // shared address space (carrier-grade NAT)
    v4(127, 0, 0, 0, 8),     // loopback
    v4(169, 254, 0, 0, 16),  // link-local, with the cloud metadata service 169.254.169.254
    v4(172, 16, 0, 0, 12),   // private
    v4(192, 0, 0, 0, 24),    // IETF protocol assignments
    v4(192, 0, 2, 0, 24),    // documentation
    v4(192, 88, 99, 0, 24),  // 6to4 relay anycast
    v4(192, 168, 0, 0, 16),  // private
    v4(198, 18, 0, 0, 15),   // benchmarking
    v4(198, 51, 100, 0, 24), // documentation
    v4(203, 0, 113, 0, 24),  // documentation
    v4(224, 0, 0, 0, 4),     // multicast
    v4(240, 0, 0, 0, 4),     // reserved, with the broadcast address
];

/// Public IPv6 addresses are global unicast (2000::/3) outside these ranges; everything
/// else (loopback, unspecified, unique local fc00::/7, link-local fe80::/10, multicast…)
/// is not.
const GLOBAL_UNICAST_V6: Ipv6Net = v6(0x2000, 0, 3);
const NOT_PUBLIC_V6: &[Ipv6Net] = &[
    v6(0x2001, 0, 23),      // IETF protocol assignments, with Teredo
    v6(0x2001, 0x0db8, 32), // documentation
    v6(0x2002, 0, 16),      // 6to4 (an IPv4 address in disguise)
    v6(0x3fff, 0, 20),      // documentation
];

/// NAT64's well-known prefix: the last 32 bits are an IPv4 address, judged as one.
const NAT64_V6: Ipv6Net = v6(0x0064, 0xff9b, 96);

/// Whether `ip` is a public address (see the module's rules).
fn is_public(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(a) => !NOT_PUBLIC_V4.iter().any(|n| n.contains(&a)),
        IpAddr::V6(a) if NAT64_V6.contains(&a) => {
            let o = a.octets();
            is_public(IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15])))
        }
        IpAddr::V6(a) => GLOBAL_UNICAST_V6.contains(&a) && !NOT_PUBLIC_V6.iter().any(|n| n.contains(&a)),
    }
}

/// How the server may call an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Inside an allowed network: over `http` or `https`.
    Allowed,
    /// A public address: over `https` only.
    Public,
    /// Neither: never called.
    Refused,
}

/// The networks the operator allowed the server to call besides public addresses
/// (`webhook_allowed_networks`), and the rules above. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Arc<[IpNet]>,
}

impl AddressPolicy {
    /// A policy allowing `networks` besides public addresses.
    #[must_use]
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self { allowed: networks.into_iter().map(|n| n.trunc()).collect() }
    }

    /// Parses `webhook_allowed_networks`: CIDRs (`10.0.0.0/8`, `fd00::/8`) or single
    /// addresses.
    ///
    /// # Errors
    /// An entry that is neither.
    pub fn parse(networks: &[String]) -> Result<Self, SetupError> {
        let parsed = networks
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                    SetupError::Config(format!(
                        "webhook_allowed_networks: '{}' is not a network in CIDR form (such as 10.0.0.0/8) or an address",
                        provisio_core::text::shorten(s)
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(parsed))
    }

    /// The allowed networks.
    #[must_use]
    pub fn allowed(&self) -> &[IpNet] {
        &self.allowed
    }

    /// How `ip` may be called.
    #[must_use]
    pub fn reach(&self, ip: IpAddr) -> Reach {
        let canonical = ip.to_canonical();
        if self.allowed.iter().any(|n| n.contains(&ip) || n.contains(&canonical)) {
            Reach::Allowed
        } else if is_public(ip) {
            Reach::Public
        } else {
            Reach::Refused
        }
    }

    /// Checks one address `host` stands for, for a call over `http` (`plain`) or `https`.
    ///
    /// # Errors
    /// Why the address may not be called (for the audit log and the operator).
    pub fn vet(&self, host: &str, ip: IpAddr, plain: bool) -> Result<(), String> {
        let named = |what: &str| {
            if host.trim_start_matches('[').trim_end_matches(']') == ip.to_string() {
                format!("{ip} is {what}")
            } else {
                format!("{host} resolves to {ip}, {what}")
            }
        };
        match self.reach(ip) {
            Reach::Allowed => Ok(()),
            Reach::Public if !plain => Ok(()),
            Reach::Public => Err(format!(
                "{}; http is only used inside webhook_allowed_networks, use https",
                named("outside webhook_allowed_networks")
            )),
            Reach::Refused => Err(named(
                "a loopback, private, link-local or other non-public address outside webhook_allowed_networks",
            )),
        }
    }

    /// The check made when a webhook URL is stored: an `http(s)` URL with a host, whose
    /// host, if it is an address, may be called. Host names are checked at call time, when
    /// they are resolved.
    ///
    /// # Errors
    /// Why the URL can never be called.
    pub fn check_stored(&self, url: &str) -> Result<(), String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
        let plain = match u.scheme() {
            "https" => false,
            "http" => true,
            _ => return Err("must be an https URL (or http inside webhook_allowed_networks)".into()),
        };
        let ip = match u.host() {
            Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
            Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
            Some(url::Host::Domain(_)) => return Ok(()),
            None => return Err("has no host".into()),
        };
        self.vet(&ip.to_string(), ip, plain).map_err(|why| format!("is not allowed: {why}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    #[test]
    fn special_purpose_addresses_are_refused_in_every_spelling() {
        let none = AddressPolicy::default();
        for a in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.0.170",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
            "100::1",
        ] {
            assert_eq!(none.reach(ip(a)), Reach::Refused, "{a}");
        }
        for a in
            ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
        {
            assert_eq!(none.reach(ip(a)), Reach::Public, "{a}");
        }
    }

    #[test]
    fn allowed_networks_admit_http_and_their_mapped_forms() {
        let p = AddressPolicy::parse(&["127.0.0.0/8".into(), " fd00::/8 ".into(), "10.9.8.7".into()]).unwrap();
        for a in ["127.0.0.1", "::ffff:127.0.0.1", "fd00::5", "10.9.8.7"] {
            assert_eq!(p.reach(ip(a)), Reach::Allowed, "{a}");
            assert!(p.vet(a, ip(a), true).is_ok(), "{a}");
        }
        assert_eq!(p.reach(ip("10.9.8.6")), Reach::Refused);
        // Public addresses: https only.
        assert!(p.vet("8.8.8.8", ip("8.8.8.8"), false).is_ok());
        let e = p.vet("hooks.example.com", ip("8.8.8.8"), true).unwrap_err();
        assert!(e.contains("hooks.example.com resolves to 8.8.8.8") && e.contains("use https"), "{e}");
        let e = p.vet("169.254.169.254", ip("169.254.169.254"), false).unwrap_err();
        assert!(e.starts_with("169.254.169.254 is a loopback, private, link-local"), "{e}");
        for bad in ["10.0.0.0/33", "localhost", "10.0.0/8", ""] {
            let e = AddressPolicy::parse(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("webhook_allowed_networks"), "{e}");
        }
    }

    #[test]
    fn stored_urls_are_checked_where_they_can_be() {
        let none = AddressPolicy::default();
        assert!(none.check_stored("https://hooks.example.com/alloc?code=k").is_ok());
        assert!(none.check_stored("https://8.8.8.8/alloc").is_ok());
        // Literal addresses in any spelling the URL parser accepts.
        for u in [
            "https://127.0.0.1/x",
            "https://2130706433/x",
            "https://0x7f.1/x",
            "https://[::1]/x",
            "https://[::ffff:7f00:1]/x",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            let e = none.check_stored(u).unwrap_err();
            assert!(e.contains("non-public address"), "{u}: {e}");
        }
        let e = none.check_stored("http://8.8.8.8/x").unwrap_err();
        assert!(e.contains("use https"), "{e}");
        for u in ["ftp://example.com/x", "not a url", "file:///etc/passwd"] {
            assert!(none.check_stored(u).is_err(), "{u}");
        }
        let lo = AddressPolicy::parse(&["127.0.0.0/8".into()]).unwrap();
        assert!(lo.check_stored("http://127.0.0.1:8080/alloc").is_ok());
        for u in ["http://hooks.internal/alloc", "http://localhost:8080/alloc"] {
            assert!(none.check_stored(u).is_ok(), "{u}: names are checked at call time, once resolved");
        }
    }
}
