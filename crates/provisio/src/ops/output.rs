//! Tables for people, JSON for scripts.
//!
//! A table fits the terminal (100 columns when stdout is not one): an item's nested fields
//! become rows of their own, named by their dotted path (`attestation.symmetricKey.primaryKey`),
//! long values wrap, and secrets (keys, the query strings of URLs) are masked unless the
//! command was given `--show-keys`. `--json` prints what the service answered, unchanged.

use comfy_table::{ColumnConstraint, ContentArrangement, LineStyle, Table, TableStyle};
use serde_json::{Map, Value};

/// The width of a table when stdout is not a terminal, and the most a key/value table takes.
pub const WIDTH: u16 = 100;

/// Leaf fields whose values are secrets (symmetric keys, policy keys) or long public keys
/// (TPM), shown masked unless `--show-keys`.
const KEY_FIELDS: &[&str] = &["primaryKey", "secondaryKey", "endorsementKey", "storageRootKey"];

/// Twin collections longer than this are summarised by their keys.
const TWIN_INLINE: usize = 120;

/// Fields shown first: what names the item.
const ID_FIELDS: &[&str] = &["registrationId", "enrollmentGroupId", "keyName", "hostName", "name", "deviceId", "type"];

/// Rules above and below and under the header, no vertical lines: columns are two spaces
/// apart, so that beside the longest names (`attestation.x509.signingCertificates.secondary.…`)
/// a 40-character thumbprint still fits in 100 columns.
const STYLE: TableStyle = TableStyle::new()
    .top_border(LineStyle::none().fill('─').junction('─'))
    .header_separator(LineStyle::none().fill('═').junction('═'))
    .bottom_border(LineStyle::none().fill('─').junction('─'));

/// A list as the service gave it, and whether `--top` left items out.
#[derive(Debug, Default)]
pub struct Listing {
    /// The items listed.
    pub items: Vec<Value>,
    /// Whether the service holds more than were listed.
    pub more: bool,
}

impl Listing {
    /// The first `top` of `items` (all without `top`).
    #[must_use]
    pub fn of(mut items: Vec<Value>, top: Option<usize>) -> Self {
        let more = top.is_some_and(|n| items.len() > n);
        if let Some(n) = top {
            items.truncate(n);
        }
        Self { items, more }
    }
}

/// `first 4 characters…`: enough to tell two keys apart, too little to use one.
#[must_use]
pub fn mask(s: &str) -> String {
    if s.chars().count() <= 4 {
        return "…".into();
    }
    let head: String = s.chars().take(4).collect();
    format!("{head}…")
}

/// A URL with the values of its query string (where webhook keys such as Azure Functions'
/// `code=` live) and any password masked.
#[must_use]
pub fn mask_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // Drop a fragment: it may carry a token too, and is never sent to the server anyway.
    let base = base.split_once('#').map_or(base, |(b, _)| b);
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            match authority.rsplit_once('@') {
                Some((user, host)) => {
                    let user = user.split_once(':').map_or(user, |(u, _)| u);
                    format!("{scheme}://{user}:…@{host}{path}")
                }
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    match query.map(|q| q.split_once('#').map_or(q, |(q, _)| q)) {
        None | Some("") => base,
        Some(q) => {
            let masked: Vec<String> = q
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) => format!("{name}=…"),
                    None => pair.to_owned(),
                })
                .collect();
            format!("{base}?{}", masked.join("&"))
        }
    }
}

/// A leaf value's text in a table: secrets masked unless `show_keys`, PEM shortened.
fn leaf(name: &str, v: &Value, show_keys: bool) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) if !show_keys && KEY_FIELDS.contains(&name) => mask(s),
        Value::String(s) if !show_keys && name.to_ascii_lowercase().ends_with("url") => mask_url(s),
        // A CA's certificate and chain (PEM) are long; `--json` prints them.
        Value::String(s) if (name == "certificate" || name == "chain") && s.len() > 80 => {
            format!("PEM, {} characters (--json prints it)", s.len())
        }
        Value::String(s) => s.clone(),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            a.iter().map(|x| leaf(name, x, show_keys)).collect::<Vec<_>>().join(", ")
        }
        other => other.to_string(),
    }
}

/// A twin collection in one line: its JSON when short, else its keys.
fn twin_summary(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() <= TWIN_INLINE {
        return text;
    }
    match v.as_object() {
        Some(o) => {
            let mut names = String::new();
            for k in o.keys() {
                if names.chars().count() + k.chars().count() > TWIN_INLINE / 2 {
                    names.push_str(", …");
                    break;
                }
                if !names.is_empty() {
                    names.push_str(", ");
                }
                names.push_str(k);
            }
            let n = o.len();
            format!("{n} key{}: {names} (--json prints them)", if n == 1 { "" } else { "s" })
        }
        None => format!("{} characters (--json prints it)", text.chars().count()),
    }
}

/// `X509CertificateInfo` (or a registration's `certificateInfo`): the facts that tell
/// certificates apart.
fn cert_rows(path: &str, info: &Map<String, Value>, out: &mut Vec<(String, String)>) {
    let s = |k: &str| info.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    out.push((format!("{path}.subject"), s("subjectName")));
    out.push((format!("{path}.thumbprint"), s("sha1Thumbprint")));
    out.push((format!("{path}.expiry"), s("notAfterUtc")));
}

/// A registration's `issuedCertificate`: the operational certificate issued at its last
/// registration, and whether it was revoked.
fn issued_rows(path: &str, c: &Map<String, Value>, out: &mut Vec<(String, String)>) {
    let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    out.push((format!("{path}.serial"), s("serialNumber")));
    out.push((format!("{path}.thumbprint"), s("sha256Thumbprint")));
    out.push((format!("{path}.expiry"), s("notAfterUtc")));
    out.push((format!("{path}.ca"), s("certificateAuthorityName")));
    let revoked = c.get("revokedDateTimeUtc").and_then(Value::as_str).map_or_else(|| "no".to_owned(), str::to_owned);
    out.push((format!("{path}.revoked"), revoked));
}

fn is_cert_info(v: &Value) -> bool {
    v.get("subjectName").is_some_and(Value::is_string)
}

fn walk(path: &str, name: &str, v: &Value, show_keys: bool, out: &mut Vec<(String, String)>) {
    match v {
        Value::Null => {}
        Value::Object(o) if name == "initialTwin" => {
            for (k, c) in o {
                match (k.as_str(), c.as_object()) {
                    ("properties", Some(props)) => {
                        for (pk, pc) in props {
                            out.push((format!("{path}.properties.{pk}"), twin_summary(pc)));
                        }
                    }
                    _ => out.push((format!("{path}.{k}"), twin_summary(c))),
                }
            }
        }
        Value::Object(_) if name == "optionalDeviceInformation" => out.push((path.to_owned(), twin_summary(v))),
        Value::Object(o) if is_cert_info(v) => cert_rows(path, o, out),
        Value::Object(o) if name == "issuedCertificate" => issued_rows(path, o, out),
        Value::Object(o) if o.get("info").is_some_and(is_cert_info) && o.get("certificate").is_none() => {
            if let Some(info) = o.get("info").and_then(Value::as_object) {
                cert_rows(path, info, out);
            }
        }
        Value::Object(o) if o.is_empty() => out.push((path.to_owned(), "{}".into())),
        Value::Object(o) => {
            for (k, c) in ordered(o) {
                walk(&format!("{path}.{k}"), k, c, show_keys, out);
            }
            // GET never returns symmetric keys: say how to see them rather than leave a gap.
            if name == "attestation"
                && o.get("type").and_then(Value::as_str) == Some("symmetricKey")
                && !o.contains_key("symmetricKey")
            {
                out.push((format!("{path}.symmetricKey"), "not fetched (--show-keys fetches them)".into()));
            }
        }
        Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            for (i, c) in a.iter().enumerate() {
                walk(&format!("{path}[{i}]"), name, c, show_keys, out);
            }
        }
        _ => out.push((path.to_owned(), leaf(name, v, show_keys))),
    }
}

/// An object's fields, those naming it first.
fn ordered(o: &Map<String, Value>) -> impl Iterator<Item = (&String, &Value)> {
    let first = ID_FIELDS.iter().filter_map(|k| o.get_key_value(*k));
    first.chain(o.iter().filter(|(k, _)| !ID_FIELDS.contains(&k.as_str())))
}

/// The rows of a key/value table of `value`: one per leaf field, by dotted path.
#[must_use]
pub fn fields(value: &Value, show_keys: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match value.as_object() {
        Some(o) => {
            for (k, v) in ordered(o) {
                walk(k, k, v, show_keys, &mut out);
            }
        }
        None => out.push(("value".into(), leaf("value", value, show_keys))),
    }
    out
}

/// A table that wraps its cells to fit `cap` columns, or the terminal when narrower.
fn table(header: &[&str], cap: Option<u16>) -> Table {
    let mut t = Table::new();
    t.load_style(STYLE).set_content_arrangement(ContentArrangement::Dynamic).set_header(header);
    let width = t.width().unwrap_or(WIDTH);
    t.set_width(cap.map_or(width, |c| width.min(c)));
    for c in t.column_iter_mut() {
        c.set_padding((0, 1));
    }
    t
}

/// `2026-01-02T03:04:05.1234567Z` to the second, for list columns.
fn to_second(s: String) -> String {
    match s.find('.') {
        Some(19) if s.as_bytes().get(10) == Some(&b'T') && s.ends_with('Z') => format!("{}Z", &s[..19]),
        _ => s,
    }
}

/// Prints `value` as JSON, or as a key/value table of its fields (secrets masked unless
/// `show_keys`).
pub fn print_object(value: &Value, json: bool, show_keys: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        return;
    }
    let mut t = table(&["field", "value"], Some(WIDTH));
    for (k, v) in fields(value, show_keys) {
        t.add_row([k, v]);
    }
    // Names are never wrapped; values take the rest of the width.
    if let Some(c) = t.column_mut(0) {
        c.set_constraint(ColumnConstraint::ContentWidth);
    }
    println!("{t}");
}

/// Prints a list as JSON, or as a table of the given columns (JSON pointers), secrets masked
/// unless `show_keys`.
pub fn print_list(list: &Listing, columns: &[(&str, &str)], json: bool, show_keys: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&list.items).unwrap_or_default());
        return;
    }
    let header: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    let mut t = table(&header, None);
    for r in &list.items {
        t.add_row(columns.iter().map(|(_, ptr)| {
            let name = ptr.rsplit('/').next().unwrap_or_default();
            to_second(leaf(name, r.pointer(ptr).unwrap_or(&Value::Null), show_keys))
        }));
    }
    println!("{t}");
    if list.more {
        println!("{} item(s); more exist (raise --top to list them)", list.items.len());
    } else {
        println!("{} item(s)", list.items.len());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_and_url_queries_are_masked_unless_asked_for() {
        let e = json!({
            "registrationId": "dev-1",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2VjcmV0c2VjcmV0", "secondaryKey": "b3RoZXJvdGhlcg=="}},
            "customAllocationDefinition": {"webhookUrl": "https://fn.example/api/alloc?code=s3cr3t&x=1", "apiVersion": "2021-10-01"},
        });
        let rows = fields(&e, false);
        let get = |rows: &[(String, String)], k: &str| rows.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get(&rows, "attestation.symmetricKey.primaryKey").as_deref(), Some("c2Vj…"));
        assert_eq!(
            get(&rows, "customAllocationDefinition.webhookUrl").as_deref(),
            Some("https://fn.example/api/alloc?code=…&x=…")
        );
        let shown = fields(&e, true);
        assert_eq!(get(&shown, "attestation.symmetricKey.primaryKey").as_deref(), Some("c2VjcmV0c2VjcmV0"));
        assert_eq!(
            get(&shown, "customAllocationDefinition.webhookUrl").as_deref(),
            Some("https://fn.example/api/alloc?code=s3cr3t&x=1")
        );
    }

    #[test]
    fn list_timestamps_are_cut_to_the_second() {
        assert_eq!(to_second("2026-12-07T02:01:30.5317265Z".into()), "2026-12-07T02:01:30Z");
        assert_eq!(to_second("2026-12-07T02:01:30Z".into()), "2026-12-07T02:01:30Z");
        assert_eq!(to_second("v1.2".into()), "v1.2");
    }

    #[test]
    fn urls_lose_passwords_and_fragments() {
        assert_eq!(mask_url("https://u:p@h.example:8443/a/b?k=v#frag"), "https://u:…@h.example:8443/a/b?k=…");
        assert_eq!(mask_url("https://h.example/hook"), "https://h.example/hook");
        assert_eq!(mask(""), "…");
        assert_eq!(mask("abc"), "…");
    }

    #[test]
    fn an_issued_certificate_shows_serial_thumbprint_expiry_and_revocation() {
        let mut r = json!({"registrationId": "d", "issuedCertificate": {"serialNumber": "4A01",
            "sha256Thumbprint": "AB".repeat(32), "notAfterUtc": "2030-01-01T00:00:00Z",
            "certificateAuthorityName": "fleet"}});
        let rows = fields(&r, false);
        let get = |rows: &[(String, String)], k: &str| rows.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get(&rows, "issuedCertificate.serial").as_deref(), Some("4A01"));
        assert_eq!(get(&rows, "issuedCertificate.thumbprint"), Some("AB".repeat(32)));
        assert_eq!(get(&rows, "issuedCertificate.expiry").as_deref(), Some("2030-01-01T00:00:00Z"));
        assert_eq!(get(&rows, "issuedCertificate.ca").as_deref(), Some("fleet"));
        assert_eq!(get(&rows, "issuedCertificate.revoked").as_deref(), Some("no"));
        r["issuedCertificate"]["revokedDateTimeUtc"] = json!("2026-01-02T03:04:05Z");
        assert_eq!(get(&fields(&r, false), "issuedCertificate.revoked").as_deref(), Some("2026-01-02T03:04:05Z"));
    }

    #[test]
    fn certificates_twins_and_hubs_become_rows() {
        let info = json!({"subjectName": "CN=dev", "sha1Thumbprint": "AB", "sha256Thumbprint": "CD",
            "issuerName": "CN=root", "notBeforeUtc": "a", "notAfterUtc": "2030-01-01T00:00:00Z",
            "serialNumber": "01", "version": 3});
        let e = json!({
            "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"info": info}}}},
            "iotHubs": ["h1", "h2"],
            "initialTwin": {"tags": {"a": 1}, "properties": {"desired": {"big": "x".repeat(200)}}},
        });
        let rows = fields(&e, false);
        let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "attestation.type",
                "attestation.x509.clientCertificates.primary.subject",
                "attestation.x509.clientCertificates.primary.thumbprint",
                "attestation.x509.clientCertificates.primary.expiry",
                "initialTwin.properties.desired",
                "initialTwin.tags",
                "iotHubs",
            ]
        );
        assert_eq!(rows[4].1, "1 key: big (--json prints them)");
        assert_eq!(rows[5].1, r#"{"a":1}"#);
        assert_eq!(rows[6].1, "h1, h2");
    }
}
