//! MQTT packet decoding and the DPS session, on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    provisio_server::fuzzing::drive_with_bytes(data, 64 * 1024);
});
