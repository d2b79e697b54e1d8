//! The web console in a real browser: Debian's `chromium`, driven by `playwright-core`
//! (`interop/browser/console.js`), follows the walkthrough (symmetric-key enrollment,
//! `provisio device register`; root CA with proof of possession, a group on it, a device
//! certificate) and the negative cases, and saves a screenshot of every page into
//! `docs/console/`.

use std::process::Command;

use serde_json::{Value, json};

use crate::common::{Instance, Server, repo_root, service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_in_the_console_with_chromium() {
    let dir = repo_root().join("interop/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix interop/browser` (the README's test command does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(std::path::Path::new(&chromium).exists(), "no {chromium}: `apt-get install chromium` (scripts/setup does)");
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"), "127.0.0.1:0", &["--linked-hub", "console-hub.example.net"]);
    // A policy that may only read: what the console must not let it change.
    let (st, reader) = service(
        &s,
        reqwest::Method::PUT,
        "/policies/console-reader?api-version=2021-10-01",
        None,
        Some(json!({"rights": "EnrollmentRead, RegistrationStatusRead"})),
    )
    .await;
    assert_eq!(st, 200, "{reader}");
    let host = s.info.service_connection_string.split(';').next().unwrap().to_owned();
    let reader_cs =
        format!("{host};SharedAccessKeyName=console-reader;SharedAccessKey={}", reader["primaryKey"].as_str().unwrap());
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let shots = repo_root().join("docs/console");
    let out = Command::new("node")
        .arg(dir.join("console.js"))
        .env("BASE", s.url(""))
        .env("SCOPE", &s.info.id_scope)
        .env("OWNER_CS", &s.info.service_connection_string)
        .env("READER_CS", &reader_cs)
        .env("READER", "console-reader")
        .env("PROVISIO", env!("CARGO_BIN_EXE_provisio"))
        .env("CA", s.ca_file())
        .env("WORK", &work)
        .env("SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "console.js failed:\n{stderr}\n--- server log ---\n{}", s.log_text());
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(summary["ok"], true);
    assert!(summary["steps"].as_array().unwrap().len() >= 12, "{summary}");
    for page in [
        "01-sign-in",
        "02-overview",
        "04-enrollment",
        "05-registration-record",
        "07-certificate-verified",
        "09-enrollment-group",
        "14-audit-log",
        "16-phone-overview",
    ] {
        assert!(shots.join(format!("{page}.png")).exists(), "screenshot {page}");
    }

    // What the browser did is in the store, and in the audit log under the owner policy.
    let (st, e) =
        service(&s, reqwest::Method::GET, "/registrations/console-sym-1?api-version=2021-10-01", None, None).await;
    assert_eq!((st, e["status"].as_str()), (200, Some("assigned")), "{e}");
    let (st, e) =
        service(&s, reqwest::Method::GET, "/registrations/console-x509-dev-1?api-version=2021-10-01", None, None).await;
    assert_eq!((st, e["status"].as_str()), (200, Some("assigned")), "{e}");
    let (st, _) =
        service(&s, reqwest::Method::GET, "/enrollments/read-only-made?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404, "the read-only policy's POST made nothing");
    let (st, _) = service(&s, reqwest::Method::GET, "/enrollments/csrf-made?api-version=2021-10-01", None, None).await;
    assert_eq!(st, 404, "the cross-site POST made nothing");
    let audit = std::fs::read_to_string(tmp.path().join("data/audit.jsonl")).unwrap();
    let lines: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let console: Vec<&Value> = lines.iter().filter(|l| l["transport"] == "console").collect();
    for action in [
        "PUT /enrollments/console-sym-1",
        "PUT /certificates/console-root",
        "POST /certificates/console-root/generateVerificationCode",
        "POST /certificates/console-root/verify",
        "PUT /enrollmentGroups/console-x509-group",
        "POST /policies/console-reader/regenerateKey",
    ] {
        assert!(
            console
                .iter()
                .any(|l| l["action"] == action && l["credential"] == "provisioningserviceowner" && l["result"] == "ok"),
            "audited: {action}"
        );
    }
    assert!(
        console.iter().any(|l| l["action"] == "console sign-in" && l["result"] == "refused" && l["status"] == 401),
        "the refused sign-in is audited"
    );
}
