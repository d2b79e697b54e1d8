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
/// served alike; anything else is refused with `400` / `400004`.
pub const DEVICE_API_VERSIONS: &[&str] = &[
    "2017-08-31-preview",
    "2017-11-15",
    "2018-04-01",
    "2018-09-01-preview",
    "2018-11-01",
    "2019-01-15",
    "2019-03-31",
    "2019-04-15",
    "2021-06-01",
    "2021-10-01",
    "2021-11-01-preview",
    "2025-07-01-preview",
    "2026-04-01",
];

/// `api-version` values the service API accepts (`spec/service-api.md` §1.1).
pub const SERVICE_API_VERSIONS: &[&str] = &[
    "2017-11-15",
    "2018-04-01",
    "2018-09-01-preview",
    "2018-11-01",
    "2019-03-31",
    "2021-10-01",
    "2021-11-01-preview",
    "2025-07-01-preview",
];

/// `api-version` values the certificates API accepts: the service API's and the ARM
/// versions of the DPS certificate resource.
pub const CERTIFICATE_API_VERSIONS: &[&str] = &[
    "2017-11-15",
    "2018-04-01",
    "2018-09-01-preview",
    "2018-11-01",
    "2019-03-31",
    "2021-10-01",
    "2021-11-01-preview",
    "2025-07-01-preview",
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
