//! The service API's JSON bodies, parsed as the HTTPS front-end parses them
//! (`provisio_engine::bodies`) and validated as a PUT validates them
//! (`provisio_engine::wire::*_from_wire`, the bulk, query, policy and hub checks).
//!
//! The first byte chooses the body (its value modulo 8; the corpus uses ASCII digits):
//! `0` individual enrollment, `1` enrollment group, `2` bulk operation, `3` query
//! specification, `4` certificate body (upload and verify), `5` shared access policy,
//! `6` linked hub, `7` the answer shapes the CLI parses. The rest is the body.
//!
//! Invariants: no panic; an accepted enrollment or group survives the store's
//! serialise/parse round trip and a GET-then-PUT of its own wire form unchanged.
#![no_main]

use provisio_core::ids::{EnrollmentGroupId, RegistrationId};
use provisio_proto::service::{
    BulkOperationResult, CertificateBody, CertificateResponse, DeviceRegistrationState, EnrollmentGroup,
    IndividualEnrollment, SharedAccessPolicy,
};
use provisio_engine::{bodies, service as service_api, wire as model};

const NOW: &str = "2030-01-01T00:00:00.0000000Z";

fn enrollment(w: IndividualEnrollment, id: &str) {
    let Ok(path) = RegistrationId::parse(id) else { return };
    let Ok(e) = model::enrollment_from_wire(&path, w, None, NOW) else { return };
    let stored: provisio_core::model::Enrollment =
        serde_json::from_str(&model::to_body(&e).expect("serialises")).expect("stored form parses");
    assert_eq!(stored, e);
    // GET (with secrets, as a PUT answers) and PUT it back: nothing changes.
    let wire = serde_json::to_vec(&model::enrollment_to_wire(&e, "etag", true, None)).expect("serialises");
    let w2: IndividualEnrollment = bodies::json_body(&wire, "IndividualEnrollment").expect("wire form parses");
    let again = model::enrollment_from_wire(&path, w2, Some(&e), NOW).expect("its own wire form is accepted");
    assert_eq!(again, e);
}

fn group(w: EnrollmentGroup, id: &str) {
    let Ok(path) = EnrollmentGroupId::parse(id) else { return };
    let Ok(g) = model::group_from_wire(&path, w, None, NOW) else { return };
    let stored: provisio_core::model::EnrollmentGroup =
        serde_json::from_str(&model::to_body(&g).expect("serialises")).expect("stored form parses");
    assert_eq!(stored, g);
    let wire = serde_json::to_vec(&model::group_to_wire(&g, "etag", true)).expect("serialises");
    let w2: EnrollmentGroup = bodies::json_body(&wire, "EnrollmentGroup").expect("wire form parses");
    let again = model::group_from_wire(&path, w2, Some(&g), NOW).expect("its own wire form is accepted");
    assert_eq!(again, g);
}

fn certificate(body: CertificateBody) {
    let body = bodies::certificate_body(body);
    if let Some(text) = body.certificate
        && let Ok(der) = provisio_pki::x509::decode_cert_text(&text)
    {
        let _ = provisio_pki::x509::is_ca(&der);
        let _ = provisio_pki::x509::cert_info(&der);
    }
}

fn reparse<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
    let again: T = serde_json::from_slice(&serde_json::to_vec(v).expect("serialises")).expect("parses");
    assert_eq!(*v, again);
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 8 {
        0 => {
            if let Ok(w) = bodies::json_body::<IndividualEnrollment>(body, "IndividualEnrollment") {
                let id = w.registration_id.clone();
                enrollment(w, &id);
            }
        }
        1 => {
            if let Ok(w) = bodies::json_body::<EnrollmentGroup>(body, "EnrollmentGroup") {
                let id = w.enrollment_group_id.clone();
                group(w, &id);
            }
        }
        2 => {
            let Ok(v) = bodies::json_body::<serde_json::Value>(body, "bulk operation") else { return };
            for is_group in [false, true] {
                let Ok((mode, items)) = service_api::bulk_request(is_group, &v, 10) else { continue };
                if mode == "delete" {
                    continue;
                }
                for item in items {
                    let field = if is_group { "enrollmentGroupId" } else { "registrationId" };
                    let id = item.get(field).and_then(|v| v.as_str()).unwrap_or("").to_owned();
                    if is_group {
                        if let Ok(w) = serde_json::from_value::<EnrollmentGroup>(item.clone()) {
                            group(w, &id);
                        }
                    } else if let Ok(w) = serde_json::from_value::<IndividualEnrollment>(item.clone()) {
                        enrollment(w, &id);
                    }
                }
            }
        }
        3 => {
            if let Ok(Some(q)) = bodies::query_spec(body) {
                let _ = service_api::check_query(&q.query);
            }
        }
        4 => {
            if let Ok(b) = bodies::json_body::<CertificateBody>(body, "certificate body") {
                certificate(b);
            }
        }
        5 => {
            if let Ok(p) = bodies::json_body::<SharedAccessPolicy>(body, "shared access policy") {
                let _ = service_api::check_policy_name(&p.key_name);
                if let Ok(r) = service_api::normalize_rights(&p.rights) {
                    assert_eq!(service_api::normalize_rights(&r).expect("canonical rights are rights"), r);
                }
                for k in [&p.primary_key, &p.secondary_key].into_iter().flatten() {
                    let _ = provisio_core::keys::decode_key(k);
                }
            }
        }
        6 => {
            if let Ok(h) = bodies::linked_hub(body) {
                let _ = provisio_engine::hubs::validate(&h);
            }
        }
        _ => {
            if let Ok(r) = serde_json::from_slice::<CertificateResponse>(body) {
                reparse(&r);
            }
            if let Ok(r) = serde_json::from_slice::<BulkOperationResult>(body) {
                reparse(&r);
            }
            if let Ok(r) = serde_json::from_slice::<DeviceRegistrationState>(body) {
                reparse(&r);
            }
        }
    }
});
