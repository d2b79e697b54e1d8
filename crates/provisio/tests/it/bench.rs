//! `provisio-bench` end to end: a small run of every scenario against the `provisio`
//! server it starts, so that the load generator cannot break unnoticed. Only what any run
//! must measure is checked (a row per scenario in which every job was counted as it
//! succeeded, the ratios and their medians, the MQTT connections the server accepted, the
//! key filter built): rates and CPU figures depend on the machine and are not asserted.

use clap::Parser;
use provisio_bench::BenchArgs;

#[tokio::test(flavor = "multi_thread")]
async fn a_small_bench_run_registers_every_device_over_every_transport() {
    let devices = 24;
    let args = BenchArgs::try_parse_from([
        "provisio-bench",
        "--server",
        env!("CARGO_BIN_EXE_provisio"),
        "--devices",
        &devices.to_string(),
        "--concurrency",
        "4",
        "--enrollments",
        "50",
        "--mqtt-hold",
        "10",
        "--rounds",
        "2",
    ])
    .unwrap();
    // `run` also checks that the server sees the 50 preloaded enrollments.
    let report = provisio_bench::run(args).await.unwrap();

    let expected = [
        ("baseline: TLS handshake", "-", devices),
        ("baseline: trivial authenticated request", "-", devices * 4),
        ("HTTPS, keep-alive", "symmetric key (group)", devices),
        ("HTTPS, keep-alive (a device re-registering)", "X.509 (group)", devices),
        ("HTTPS with a CSR, keep-alive (certificate issued)", "symmetric key (group)", devices),
        ("HTTPS, new TLS connection per device", "symmetric key (group)", devices),
        ("HTTPS, new TLS connection per device", "X.509 (group)", devices),
        ("MQTT, a connection per device", "symmetric key (group)", devices),
        ("MQTT, a connection per device", "X.509 (group)", devices),
    ];
    // Each round registers devices of its own: a second round of devices that were not new
    // would still succeed, but X.509 devices get certificates named for their round.
    assert_eq!(report.rounds.len(), 2);
    for (i, round) in report.rounds.iter().enumerate() {
        assert_eq!(round.rows.len(), expected.len(), "round {i}: {:#?}", round.rows);
        for (scenario, attestation, jobs) in expected {
            let r = round.row(scenario, attestation).unwrap_or_else(|| panic!("no row for {scenario} / {attestation}"));
            // Counted from the jobs that returned success, one by one.
            assert_eq!((r.succeeded, r.errors, &r.first_error), (jobs, 0, &None), "round {i}: {r:#?}");
            assert!(r.rate() > 0.0 && r.rss_mb > 0.0, "{r:#?}");
            // Percentiles in order, and a whole registration takes at least its first request.
            let (f, t) = (r.register, r.assigned);
            assert!(f.p50 > 0.0 && f.p50 <= f.p99 && f.p99 <= f.max, "{r:#?}");
            assert!(t.p50 >= f.p50 && t.max >= f.max, "{r:#?}");
        }
        let names: Vec<&str> = round.ratios.iter().map(|r| r.name.as_str()).collect();
        for name in [
            "keep-alive registrations / trivial requests",
            "by server CPU: keep-alive registrations / trivial requests",
            "new-connection registrations (symmetric) / bare handshakes",
            "new-connection registrations (X.509) / bare handshakes",
            "registrations with a CSR / without",
            "by server CPU: registrations with a CSR / without",
        ] {
            assert!(names.contains(&name), "'{name}' missing: {names:?}");
        }
        assert_eq!(names.len(), 8, "{names:?}");
        // By rate only: 24 operations may cost the server less than one 10 ms clock tick of CPU.
        let by_rate = round.ratios.iter().filter(|r| !r.name.starts_with("by server CPU"));
        assert!(by_rate.map(|r| r.percent).all(|p| p > 0.0), "{:?}", round.ratios);
    }

    let medians = report.medians.as_ref().expect("medians of two rounds");
    assert_eq!(medians.scenarios.len(), expected.len());
    assert_eq!(medians.ratios.len(), 8);
    for m in &medians.ratios {
        assert_eq!(m.per_round.len(), 2, "{m:?}");
        assert!((m.median - (m.per_round[0] + m.per_round[1]) / 2.0).abs() < 1e-6, "{m:?}");
        assert!(m.median > 0.0 || m.name.starts_with("by server CPU"), "{m:?}");
    }

    // Held means accepted: a CONNACK with return code 0, read from each connection.
    let held = report.held_mqtt.as_ref().expect("held MQTT connections");
    assert_eq!((held.accepted, held.refused, held.failed), (10, 0, 0), "{held:?}");
    assert!(held.rss_after_mb > 0.0, "{held:?}");

    // The embedded store's key filter was built (the server logged it) before the scenarios.
    let filter = report.filter_built.expect("the key filter built");
    assert!(filter >= report.startup, "{filter:?} < {:?}", report.startup);

    // `--json` prints this object: the measured figures are in it.
    let json = report.to_json();
    assert_eq!(json["rows"].as_array().map(Vec::len), Some(2 * expected.len()), "{json}");
    assert_eq!(json["rows"][1]["succeeded"], devices * 4, "{json}");
    assert_eq!(json["held_mqtt"]["accepted"], 10, "{json}");
}
