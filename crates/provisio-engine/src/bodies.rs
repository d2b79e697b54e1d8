//! Request bodies as the server reads them, shared by the HTTPS and MQTT front-ends and by
//! the fuzz targets (`fuzz/`), so that both exercise exactly the same parsing.

use provisio_core::model::LinkedHub;
use provisio_proto::{
    device::DeviceRegistration,
    service::{CertificateBody, QuerySpecification},
};
use serde::de::DeserializeOwned;

use crate::Error;

/// A `DeviceRegistration` (HTTPS body or MQTT payload). Empty and whitespace-only bodies
/// (C#, Node, Python polls; C# over MQTT) mean "no fields".
///
/// # Errors
/// The JSON error; the caller words the message for its transport.
pub fn device_registration(bytes: &[u8]) -> Result<DeviceRegistration, serde_json::Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(DeviceRegistration::default());
    }
    serde_json::from_slice(bytes)
}

/// A required JSON service API body of type `T`, named `what` in messages.
///
/// # Errors
/// 400 for an empty or malformed body.
pub fn json_body<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::malformed(format!("The request body must be a JSON {what}.")));
    }
    serde_json::from_slice(bytes).map_err(|e| Error::malformed(format!("The request body is not a valid {what}: {e}")))
}

/// The optional `QuerySpecification` of the query routes (Python and the az CLI send none
/// on registration queries).
///
/// # Errors
/// 400 for a malformed body.
pub fn query_spec(bytes: &[u8]) -> Result<Option<QuerySpecification>, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) { Ok(None) } else { json_body(bytes, "QuerySpecification").map(Some) }
}

/// The body of `PUT /certificates/{name}` and `POST .../verify`: the ARM form (under
/// `properties`) when present, else the top-level fields.
#[must_use]
pub fn certificate_body(body: CertificateBody) -> CertificateBody {
    match body.properties {
        Some(p) => *p,
        None => body,
    }
}

/// The body of `PUT /linkedHubs/{hostName}`: `{"allocationWeight": 1..1000,
/// "applyAllocationPolicy": bool, "region"?: str, "registrarWebhookUrl"?: url}`. The
/// values are checked by [`crate::hubs::validate`] when the hub is written.
///
/// # Errors
/// 400 for a malformed body or a weight that is not a whole number.
pub fn linked_hub(bytes: &[u8]) -> Result<LinkedHub, Error> {
    let v: serde_json::Value = json_body(bytes, "linked hub")?;
    Ok(LinkedHub {
        host_name: v.get("hostName").and_then(|x| x.as_str()).unwrap_or_default().to_owned(),
        allocation_weight: match v.get("allocationWeight") {
            None | Some(serde_json::Value::Null) => 1,
            Some(w) => w
                .as_u64()
                .and_then(|w| u32::try_from(w).ok())
                .ok_or_else(|| Error::invalid("allocationWeight must be a whole number from 1 to 1000."))?,
        },
        apply_allocation_policy: v.get("applyAllocationPolicy").and_then(serde_json::Value::as_bool).unwrap_or(true),
        region: v.get("region").and_then(|x| x.as_str()).map(str::to_owned),
        registrar_webhook_url: v.get("registrarWebhookUrl").and_then(|x| x.as_str()).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_device_bodies_are_empty_registrations() {
        for b in [&b""[..], b" ", b"\r\n\t "] {
            assert_eq!(device_registration(b).unwrap(), DeviceRegistration::default());
        }
        assert_eq!(device_registration(b"{}").unwrap(), DeviceRegistration::default());
        assert!(device_registration(b"{").is_err());
        assert!(json_body::<QuerySpecification>(b"  ", "QuerySpecification").is_err());
        assert_eq!(query_spec(b"").unwrap(), None);
    }

    #[test]
    fn linked_hub_weight_must_be_whole() {
        assert_eq!(linked_hub(br#"{"hostName":"h.azure-devices.net"}"#).unwrap().allocation_weight, 1);
        assert!(linked_hub(br#"{"allocationWeight":1.5}"#).is_err());
        assert!(linked_hub(br#"{"allocationWeight":4294967296}"#).is_err());
    }
}
