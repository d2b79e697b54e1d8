//! Wire types of the Azure IoT Hub Device Provisioning Service (DPS), as Provisio speaks them.
//!
//! Everything here is plain serde data: the JSON bodies of the device API
//! ([`device`]), of the service API ([`service`]), of the hub registrar webhook
//! ([`registrar`]) and the error body shared by both APIs ([`error`]). Field names, casing and optionality follow `spec/device-api.md` and
//! `spec/service-api.md`; no DPS rule is enforced here (that is `provisio-core`'s job).

pub mod device;
pub mod error;
pub mod registrar;
pub mod service;

/// `api-version` values the device API accepts (`spec/device-api.md` §1.2). All are
/// served alike; anything else is refused with `400` / `400004`. The source of each is
/// beside it: "spec" is `specification/deviceprovisioningservices/data-plane/
/// DeviceProvisioningServices/` in Azure/azure-rest-api-specs.
pub const DEVICE_API_VERSIONS: &[&str] = &[
    "2017-08-31-preview", // the C, C# and Node SDKs before GA (2017)
    "2017-11-15",         // the C, C# and Node SDKs at GA (2017-2018)
    "2018-04-01",         // DPS re-provisioning docs: devices "using 2018-04-01 or older" keep their hub
    "2018-09-01-preview", // C SDK (2018-09) and Node SDK (2018-10): symmetric keys
    "2018-11-01",         // Node SDK (2018-12), C# SDK (2019)
    "2019-03-31",         // C#, Node, Python, Java, Embedded C; the C SDK until 2024
    "2019-04-15",         // IoT Edge edgelet (2019-2020; Azure/iotedge#4112)
    "2021-06-01",         // the C SDK since 2024-02, Rust aziot-identity-service, DPS curl how-tos
    "2021-10-01",         // spec: stable/2021-10-01/device.json, device/main.tsp `Versions`
    "2021-11-01-preview", // aziot-identity-service (2021-2022), Python and C# preview branches
    "2025-07-01-preview", // spec: device/main.tsp `Versions`, device/examples/2025-07-01-preview
    "2026-04-01",         // spec: stable/2026-04-01/device.json (info.version)
    "2026-11-01",         // spec: device/examples/2026-11-01 (`api-version` of each example)
    "2026-11-02-preview", // spec: device/main.tsp `Versions`, device/examples/2026-11-02-preview
    "2026-11-15-preview", // spec: device/examples/2026-11-15-preview (register and Device Update drafts)
];

/// The device API versions whose `DeviceRegistration` carries `csr` (and whose result carries
/// `issuedCertificateChain`): `2025-07-01-preview` and later (spec: `device/models.tsp`,
/// `@added(Versions.v2025_07_01_preview)`).
pub const CSR_API_VERSIONS: &[&str] =
    &["2025-07-01-preview", "2026-04-01", "2026-11-01", "2026-11-02-preview", "2026-11-15-preview"];

/// `api-version` values the service API accepts (`spec/service-api.md` §1.1), with the
/// source of each ("spec" as for [`DEVICE_API_VERSIONS`]).
pub const SERVICE_API_VERSIONS: &[&str] = &[
    "2017-11-15",         // service SDKs at GA (2017-2018)
    "2018-04-01",         // the C service client
    "2018-09-01-preview", // service SDKs with symmetric keys (2018)
    "2018-11-01",         // the Node service SDK (Azure/azure-iot-sdk-node#441)
    "2019-03-31",         // the C# v1 service SDK
    "2021-10-01",         // spec: stable/2021-10-01/service.json; Node, Python, az iot dps
    "2021-11-01-preview", // spec: preview/2021-11-01-preview (certificate issuance fields)
    "2025-07-01-preview", // spec: service/main.tsp `Versions` (credentialPolicyName)
    "2026-04-01",         // spec: stable/2026-04-01/service.json
    "2026-07-01-preview", // spec: service/examples/2026-07-01-preview
    "2026-11-01",         // spec: service/examples/2026-11-01
    "2026-11-02-preview", // spec: service/examples/2026-11-02-preview
];

/// `api-version` values the certificates API accepts: the service API's and the ARM
/// versions of the DPS certificate resource.
pub const CERTIFICATE_API_VERSIONS: &[&str] = &[
    // The service API's (see SERVICE_API_VERSIONS for their sources).
    "2017-11-15",
    "2018-04-01",
    "2018-09-01-preview",
    "2018-11-01",
    "2019-03-31",
    "2021-10-01",
    "2021-11-01-preview",
    "2025-07-01-preview",
    "2026-04-01",
    "2026-07-01-preview",
    "2026-11-01",
    "2026-11-02-preview",
    // ARM versions of Microsoft.Devices/provisioningServices/certificates (spec
    // resource-manager/Microsoft.Devices), as the portal and az iot dps certificate send them.
    "2017-08-21-preview",
    "2018-01-22",
    "2020-01-01",
    "2020-03-01",
    "2020-09-01-preview",
    "2021-10-15",
    "2022-02-05",
    "2022-12-12",
    "2023-03-01-preview",
    "2025-02-01-preview",
];

/// Whether `version` is one of `known`, compared exactly (DPS versions are lower-case dates).
#[must_use]
pub fn is_supported_api_version(known: &[&str], version: &str) -> bool {
    known.contains(&version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificates_api_takes_every_service_api_version() {
        for v in SERVICE_API_VERSIONS {
            assert!(is_supported_api_version(CERTIFICATE_API_VERSIONS, v), "{v}");
        }
    }

    #[test]
    fn versions_are_unique_and_look_like_dps_versions() {
        for list in [DEVICE_API_VERSIONS, SERVICE_API_VERSIONS, CERTIFICATE_API_VERSIONS] {
            for (i, v) in list.iter().enumerate() {
                assert!(!list[..i].contains(v), "{v} twice");
                let (date, suffix) = v.split_at(10);
                assert!(
                    date.chars().enumerate().all(|(i, c)| if i == 4 || i == 7 { c == '-' } else { c.is_ascii_digit() }),
                    "{v}"
                );
                assert!(suffix.is_empty() || suffix == "-preview", "{v}");
            }
        }
    }
}
