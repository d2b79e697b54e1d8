//! The device API's JSON bodies, parsed exactly as the HTTPS and MQTT front-ends parse
//! them (`provisio_engine::bodies::device_registration`, lenient about blank bodies), and
//! the answer shapes clients parse. Invariants: no panic, and what parses survives a
//! serialise/parse round trip unchanged.
#![no_main]

use provisio_proto::device::{DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus};
use serde::{Serialize, de::DeserializeOwned};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
    let text = serde_json::to_vec(v).expect("a parsed body serialises");
    let again: T = serde_json::from_slice(&text).expect("a serialised body parses");
    assert_eq!(*v, again);
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(r) = provisio_engine::bodies::device_registration(data) {
        let text = serde_json::to_vec(&r).expect("a parsed registration serialises");
        let again: DeviceRegistration =
            provisio_engine::bodies::device_registration(&text).expect("a serialised registration parses");
        assert_eq!(r, again);
    }
    if let Ok(s) = serde_json::from_slice::<RegistrationOperationStatus>(data) {
        round_trip(&s);
    }
    if let Ok(s) = serde_json::from_slice::<DeviceRegistrationResult>(data) {
        round_trip(&s);
    }
});
