//! `provisio bench` end to end: a small run of every scenario against the server it starts,
//! so that the load generator cannot break unnoticed. Only what any run must produce is
//! checked (a row per scenario, every device registered, no errors, the ratio lines, the
//! held MQTT connections): rates and CPU figures depend on the machine and are not asserted.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_small_bench_run_registers_every_device_over_every_transport() {
    let devices = 24;
    let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["bench", "--devices", &devices.to_string(), "--concurrency", "4"])
        .args(["--enrollments", "50", "--mqtt-hold", "10", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok()).expect("a JSON line");
    let rows = json["rows"].as_array().unwrap();
    let expected = [
        ("baseline: TLS handshake", "-", devices),
        ("baseline: trivial authenticated request", "-", devices * 4),
        ("HTTPS, keep-alive", "symmetric key (group)", devices),
        ("HTTPS, keep-alive (a device re-registering)", "X.509 (group)", devices),
        ("HTTPS, new TLS connection per device", "symmetric key (group)", devices),
        ("HTTPS, new TLS connection per device", "X.509 (group)", devices),
        ("MQTT, a connection per device", "symmetric key (group)", devices),
        ("MQTT, a connection per device", "X.509 (group)", devices),
    ];
    assert_eq!(rows.len(), expected.len(), "{stdout}");
    for (scenario, attestation, ops) in expected {
        let r = rows
            .iter()
            .find(|r| r["scenario"] == scenario && r["attestation"] == attestation)
            .unwrap_or_else(|| panic!("no row for {scenario} / {attestation}:\n{stdout}"));
        assert_eq!(r["errors"], 0, "{scenario} / {attestation}:\n{stdout}");
        assert_eq!(r["ops"], ops, "{r}");
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
        assert!(f("rate") > 0.0, "{r}");
        assert!(f("rss_mb") > 0.0, "{r}");
        // Percentiles in order, and a whole registration takes at least its first request.
        assert!(f("p50") > 0.0 && f("p50") <= f("p99") && f("p99") <= f("max"), "{r}");
        assert!(f("total_p50") >= f("p50") && f("total_max") >= f("max"), "{r}");
    }
    for line in [
        "keep-alive registrations / trivial requests:",
        "new-connection registrations (symmetric) / bare handshakes:",
        "new-connection registrations (X.509) / bare handshakes:",
        "server startup (spawn to ready, 50 preloaded enrollments):",
        "10 idle MQTT connections held:",
    ] {
        assert!(stdout.contains(line), "'{line}' missing:\n{stdout}");
    }
    assert_eq!(json["held_mqtt"]["connections"], 10);
    assert_eq!(json["enrollments"], 50);
}
