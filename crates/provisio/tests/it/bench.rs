//! `provisio bench` end to end: a small run of every scenario against the server it starts,
//! so that the load generator cannot break unnoticed. Only what any run must produce is
//! checked (a row per scenario, every device registered, no errors, the ratio lines, the
//! held MQTT connections, the medians over rounds): rates and CPU figures depend on the
//! machine and are not asserted.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_small_bench_run_registers_every_device_over_every_transport() {
    let devices = 24;
    let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["bench", "--devices", &devices.to_string(), "--concurrency", "4"])
        .args(["--enrollments", "50", "--mqtt-hold", "10", "--rounds", "2", "--json"])
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
    // Each round registers devices of its own: a second round of new devices that were not
    // new would still succeed, but X.509 devices get certificates named for their round.
    assert_eq!(rows.len(), 2 * expected.len(), "{stdout}");
    for ((scenario, attestation, ops), round) in expected.iter().flat_map(|e| [(*e, 1), (*e, 2)]) {
        let r = rows
            .iter()
            .find(|r| r["scenario"] == scenario && r["attestation"] == attestation && r["round"] == round)
            .unwrap_or_else(|| panic!("no row for {scenario} / {attestation} in round {round}:\n{stdout}"));
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
        "medians of 2 rounds",
        "keep-alive registrations / trivial requests: median ",
    ] {
        assert!(stdout.contains(line), "'{line}' missing:\n{stdout}");
    }
    let medians = json["medians"]["ratios"].as_array().unwrap();
    assert_eq!(medians.len(), 6, "{medians:?}");
    for m in medians {
        let per_round: Vec<f64> = m["per_round"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let median = m["median"].as_f64().unwrap();
        assert_eq!(per_round.len(), 2, "{m}");
        assert!((median - (per_round[0] + per_round[1]) / 2.0).abs() < 1e-6 && median > 0.0, "{m}");
    }
    assert_eq!(json["medians"]["scenarios"].as_array().unwrap().len(), expected.len());
    assert_eq!(json["held_mqtt"]["connections"], 10);
    assert_eq!(json["enrollments"], 50);
    // The embedded store's key filter was built (the server logged it) before the scenarios.
    assert!(json["filter_built_ms"].as_u64().is_some_and(|ms| ms >= json["startup_ms"].as_u64().unwrap()), "{json}");
    assert!(stdout.contains("its key filter built"), "{stdout}");
}
