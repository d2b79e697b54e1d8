//! Round trips through the operator CLI against a real server.

use std::process::{Command, Output};

use serde_json::Value;

use crate::common::{Instance, Process, Server, curl, now};

/// The `provisio` binary with the server's connection string and CA in its environment.
pub(crate) struct Cli<'a> {
    pub(crate) s: &'a Server,
    pub(crate) cs: String,
}

impl Cli<'_> {
    pub(crate) fn raw(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_provisio"))
            .args(args)
            .env("PROVISIO_CONNECTION_STRING", &self.cs)
            .env("PROVISIO_CA", self.s.ca_file())
            .output()
            .unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let o = self.raw(args);
        assert!(o.status.success(), "provisio {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }

    pub(crate) fn fails(&self, args: &[&str]) -> String {
        let o = self.raw(args);
        assert!(!o.status.success(), "provisio {args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "cli-hub.example.net"]);
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };

    // Enrollments: create, show (with and without keys), update keeps keys, list, delete.
    let e = cli.json(&[
        "enrollment",
        "create",
        "cli-dev-1",
        "--device-id",
        "cli-device",
        "--initial-twin",
        r#"{"tags":{"a":1}}"#,
    ]);
    let key = e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let shown = cli.json(&["enrollment", "show", "cli-dev-1"]);
    assert_eq!(shown["attestation"], serde_json::json!({"type": "symmetricKey"}));
    assert_eq!(shown["deviceId"], "cli-device");
    assert_eq!(
        cli.json(&["enrollment", "show", "cli-dev-1", "--show-keys"])["attestation"]["symmetricKey"]["primaryKey"],
        key.as_str()
    );
    let u = cli.json(&[
        "enrollment",
        "update",
        "cli-dev-1",
        "--status",
        "disabled",
        "--iot-hubs",
        "h1,h2",
        "--reprovision-policy",
        "never",
    ]);
    assert_eq!(u["provisioningStatus"], "disabled");
    assert_eq!(u["iotHubs"], serde_json::json!(["h1", "h2"]));
    assert_eq!(u["reprovisionPolicy"]["updateHubAssignment"], false);
    assert_eq!(u["attestation"]["symmetricKey"]["primaryKey"], key.as_str(), "update must keep the keys");
    assert_eq!(u["initialTwin"]["tags"]["a"], 1, "update must keep other fields");
    let err = cli.fails(&["enrollment", "update", "cli-dev-1", "--etag", "stale", "--status", "enabled"]);
    assert!(err.contains("412") && err.contains("--etag"), "{err}");
    let err = cli.fails(&["enrollment", "create", "cli-dev-1"]);
    assert!(err.contains("409") && err.contains("update"), "{err}");
    let table = cli.ok(&["enrollment", "list"]);
    assert!(table.contains("registrationId") && table.contains("cli-dev-1") && table.contains("1 item(s)"), "{table}");

    // Bulk import from CSV with more rows than one bulk request takes.
    let csv_path = tmp.path().join("devices.csv");
    let mut csv = String::from("registrationId,deviceId,provisioningStatus,iotHubs\n");
    for i in 0..25 {
        csv.push_str(&format!("imp-{i:02},dev-{i:02},enabled,cli-hub.example.net\n"));
    }
    std::fs::write(&csv_path, csv).unwrap();
    let r = cli.json(&["enrollment", "import", csv_path.to_str().unwrap()]);
    assert_eq!((r["total"].as_u64(), r["succeeded"].as_u64()), (Some(25), Some(25)), "{r}");
    assert_eq!(cli.json(&["enrollment", "list"]).as_array().unwrap().len(), 26);
    let err = cli.fails(&["enrollment", "import", csv_path.to_str().unwrap()]);
    assert!(err.contains("25 enrollment(s) were not imported"), "{err}");
    let r = cli.json(&["enrollment", "import", csv_path.to_str().unwrap(), "--mode", "update"]);
    assert_eq!(r["succeeded"], 25, "{r}");
    // JSON import too.
    let json_path = tmp.path().join("devices.json");
    std::fs::write(&json_path, r#"[{"registrationId":"imp-json","attestation":{"type":"symmetricKey"}}]"#).unwrap();
    assert_eq!(cli.json(&["enrollment", "import", json_path.to_str().unwrap()])["succeeded"], 1);
    cli.ok(&["enrollment", "delete", "imp-json"]);
    assert!(cli.fails(&["enrollment", "show", "imp-json"]).contains("was not found"));

    // Groups and device keys.
    let g = cli.json(&["enrollment-group", "create", "cli-group", "--allocation-policy", "hashed"]);
    let gk = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let dk = cli.ok(&["enrollment-group", "compute-device-key", "cli-group", "--registration-id", "cli-gdev-1"]);
    assert_eq!(dk.trim(), provisio_core::keys::derive_device_key(&gk, "cli-gdev-1").unwrap());
    let offline = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["enrollment-group", "compute-device-key", "--registration-id", "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"])
        .args([
            "--group-key",
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        ])
        .env_remove("PROVISIO_CONNECTION_STRING")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&offline.stdout).trim(), "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=");
    assert_eq!(
        cli.json(&["enrollment-group", "update", "cli-group", "--status", "disabled"])["provisioningStatus"],
        "disabled"
    );
    cli.json(&["enrollment-group", "update", "cli-group", "--status", "enabled"]);
    assert_eq!(cli.json(&["enrollment-group", "list"]).as_array().unwrap().len(), 1);

    // Registrations: a group device registers; show, list by group, delete.
    let token = provisio_core::sas::build_token(
        &format!("{}/registrations/cli-gdev-1", s.info.id_scope),
        dk.trim(),
        now() + 600,
        None,
        provisio_core::sas::SrEncoding::Upper,
    )
    .unwrap();
    let (st, _, _) = curl(
        &s,
        "PUT",
        &format!("/{}/registrations/cli-gdev-1/register?api-version=2019-03-31", s.info.id_scope),
        Some(&token),
        Some("{}"),
    );
    assert_eq!(st, 202);
    assert_eq!(cli.json(&["registration", "show", "cli-gdev-1"])["assignedHub"], "cli-hub.example.net");
    assert_eq!(cli.json(&["registration", "list", "--group", "cli-group"]).as_array().unwrap().len(), 1);
    cli.ok(&["registration", "delete", "cli-gdev-1"]);
    assert!(cli.fails(&["registration", "show", "cli-gdev-1"]).contains("404"));
    cli.ok(&["enrollment-group", "delete", "cli-group"]);

    // Certificates with proof of possession, made by `provisio cert`.
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    cli.ok(&["cert", "root", "cli-root", "--out-dir", certs.to_str().unwrap()]);
    let root = certs.join("cli-root_cert.pem");
    assert_eq!(
        cli.json(&["certificate", "upload", "cli-root", "--file", root.to_str().unwrap()])["properties"]["isVerified"],
        false
    );
    let code = cli.ok(&["certificate", "verification-code", "cli-root"]);
    cli.ok(&[
        "cert",
        "verification",
        "--ca",
        root.to_str().unwrap(),
        "--key",
        certs.join("cli-root_key.pem").to_str().unwrap(),
        "--nonce",
        code.trim(),
        "--out-dir",
        certs.to_str().unwrap(),
    ]);
    let v = cli.json(&[
        "certificate",
        "verify",
        "cli-root",
        "--file",
        certs.join("verification_cert.pem").to_str().unwrap(),
    ]);
    assert_eq!(v["properties"]["isVerified"], true);
    assert_eq!(cli.json(&["certificate", "list"]).as_array().unwrap().len(), 1);
    let g = cli.json(&["enrollment-group", "create", "x509-cli", "--ca-name", "cli-root"]);
    assert_eq!(g["attestation"]["x509"]["caReferences"]["primary"], "cli-root");
    cli.ok(&["enrollment-group", "delete", "x509-cli"]);
    cli.ok(&["certificate", "delete", "cli-root"]);

    // Policies: a read-only policy can read but gets a clear 403 on writes.
    let p = cli.json(&["policy", "add", "reader", "--rights", "EnrollmentRead"]);
    let reader = Cli {
        s: &s,
        cs: format!(
            "HostName=localhost:{};SharedAccessKeyName=reader;SharedAccessKey={}",
            s.port,
            p["primaryKey"].as_str().unwrap()
        ),
    };
    reader.json(&["enrollment", "show", "cli-dev-1"]);
    let err = reader.fails(&["enrollment", "create", "nope"]);
    assert!(err.contains("403") && err.contains("lacks the EnrollmentWrite right"), "{err}");
    let p2 = cli.json(&["policy", "regenerate-key", "reader", "--key", "primary"]);
    assert_ne!(p2["primaryKey"], p["primaryKey"]);
    assert!(reader.fails(&["enrollment", "show", "cli-dev-1"]).contains("401"));
    assert_eq!(cli.json(&["policy", "list"]).as_array().unwrap().len(), 2);
    cli.ok(&["policy", "remove", "reader"]);
    assert!(cli.fails(&["policy", "remove", "provisioningserviceowner"]).contains("lock every operator out"));

    // Errors a person can act on.
    let none = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["enrollment", "list"])
        .env_remove("PROVISIO_CONNECTION_STRING")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&none.stderr).contains("PROVISIO_CONNECTION_STRING"));
    let untrusted = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["enrollment", "list"])
        .env("PROVISIO_CONNECTION_STRING", &cli.cs)
        .env_remove("PROVISIO_CA")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("--ca"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
}

#[test]
fn an_unreachable_database_is_named_when_the_server_cannot_start() {
    // "internal error" is what a device would be told; the operator starting the server is
    // told why: here, nothing listens on port 1.
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["serve", "info"] {
        let out = Command::new(env!("CARGO_BIN_EXE_provisio"))
            .args([cmd, "--database", "postgres://provisio@127.0.0.1:1/provisio", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cmd} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot connect to PostgreSQL"), "{cmd}: {err}");
    }
}

#[test]
fn a_second_server_on_an_embedded_database_in_use_refuses_to_start() {
    // Each would miss the other's writes in its caches; `info` may still read it.
    let dir = tempfile::tempdir().unwrap();
    let mut first = Process::start(dir.path(), "127.0.0.1:0", &[]);
    let second = Command::new(env!("CARGO_BIN_EXE_provisio"))
        .args(["serve", "--https-listen", "127.0.0.1:0", "--mqtt-listen", "off", "--amqp-listen", "off", "--data-dir"])
        .arg(dir.path())
        .env_remove("PROVISIO_CONFIG")
        .output()
        .unwrap();
    assert!(!second.status.success(), "the second server must not start");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another Provisio server is using"), "{err}");
    let info = crate::common::run(
        Command::new(env!("CARGO_BIN_EXE_provisio")).args(["info", "--json", "--data-dir"]).arg(dir.path()),
    );
    assert!(info.contains(&first.info.id_scope), "{info}");
    // Once the first has stopped, the next one starts on the same state.
    assert!(first.terminate().success());
    let again = Server::start(dir.path(), "127.0.0.1:0", &[]);
    assert_eq!(again.info.id_scope, first.info.id_scope);
}

#[test]
fn device_register_help_names_the_endpoint_default_once() {
    let help = crate::common::run(Command::new(env!("CARGO_BIN_EXE_provisio")).args(["device", "register", "--help"]));
    assert_eq!(help.matches(provisio_client::GLOBAL_ENDPOINT).count(), 1, "{help}");
    assert!(help.contains(&format!("[default: {}]", provisio_client::GLOBAL_ENDPOINT)), "{help}");
}

/// Every line of `out` is at most 100 columns wide.
pub(crate) fn fits_100_columns(what: &str, out: &str) {
    for line in out.lines() {
        assert!(line.chars().count() <= 100, "{what}: a line of {} columns:\n{out}", line.chars().count());
    }
}

/// The rows of a key/value table (`field  value`), wrapped values joined again.
pub(crate) fn table_fields(out: &str) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut body = false;
    for line in out.lines() {
        if line.starts_with('═') {
            body = true;
            continue;
        }
        if !body || line.starts_with('─') {
            continue;
        }
        if line.starts_with(' ') {
            if let Some(last) = rows.last_mut() {
                last.1.push_str(line.trim());
            }
        } else {
            let (k, v) = line.split_once(' ').unwrap_or((line, ""));
            rows.push((k.to_owned(), v.trim().to_owned()));
        }
    }
    rows
}

pub(crate) fn field<'a>(rows: &'a [(String, String)], name: &str) -> Option<&'a str> {
    rows.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_takes_top_and_pages_through_the_service_to_reach_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Pages of 4, so that --top 9 needs three of them.
    let config = tmp.path().join("provisio.toml");
    std::fs::write(&config, "max_query_page_size = 4\n").unwrap();
    let hubs =
        ["--linked-hub", "top-1.example.net", "--linked-hub", "top-2.example.net", "--linked-hub", "top-3.example.net"];
    let s = Server::start(
        &tmp.path().join("server"),
        "127.0.0.1:0",
        &[&["--config", config.to_str().unwrap()][..], &hubs].concat(),
    );
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };

    for i in 0..10 {
        crate::common::put_enrollment(
            &s,
            false,
            &format!("top-{i:02}"),
            serde_json::json!({"registrationId": format!("top-{i:02}"), "attestation": {"type": "symmetricKey"}}),
        )
        .await;
        crate::common::put_enrollment(
            &s,
            true,
            &format!("topg-{i:02}"),
            serde_json::json!({"enrollmentGroupId": format!("topg-{i:02}"), "attestation": {"type": "symmetricKey"}}),
        )
        .await;
    }
    // Six devices of one group register.
    let g = cli.json(&["enrollment-group", "show", "topg-00", "--show-keys"]);
    let group_key = g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    for i in 0..6 {
        let id = format!("topd-{i}");
        let key = provisio_core::keys::derive_device_key(&group_key, &id).unwrap();
        let token = provisio_core::sas::build_token(
            &format!("{}/registrations/{id}", s.info.id_scope),
            &key,
            now() + 600,
            None,
            provisio_core::sas::SrEncoding::Upper,
        )
        .unwrap();
        let (st, _, _) = curl(
            &s,
            "PUT",
            &format!("/{}/registrations/{id}/register?api-version=2019-03-31", s.info.id_scope),
            Some(&token),
            Some("{}"),
        );
        assert_eq!(st, 202);
    }
    for p in ["top-reader", "top-writer"] {
        cli.ok(&["policy", "add", p, "--rights", "EnrollmentRead"]);
    }
    let certs = tmp.path().join("certs");
    for name in ["top-ca-1", "top-ca-2", "top-ca-3"] {
        cli.ok(&["cert", "root", name, "--out-dir", certs.to_str().unwrap()]);
        let file = certs.join(format!("{name}_cert.pem"));
        cli.ok(&["certificate", "upload", name, "--file", file.to_str().unwrap()]);
    }

    // (list command, how many there are, a --top below that which crosses a page)
    let lists: [(&[&str], usize, usize); 6] = [
        (&["enrollment", "list"], 10, 9),
        (&["enrollment-group", "list"], 10, 9),
        (&["registration", "list", "--group", "topg-00"], 6, 5),
        (&["hub", "list"], 3, 2),
        (&["policy", "list"], 3, 2),
        (&["certificate", "list"], 3, 2),
    ];
    for (cmd, all, top) in lists {
        let count = |extra: &[&str]| cli.json(&[cmd, extra].concat()).as_array().unwrap().len();
        assert_eq!(count(&[]), all, "{cmd:?}");
        assert_eq!(count(&["--top", &top.to_string()]), top, "{cmd:?} --top {top}");
        assert_eq!(count(&["--top", "1"]), 1, "{cmd:?} --top 1");
        assert_eq!(count(&["--top", "500"]), all, "{cmd:?} --top 500");
        let table = cli.ok(&[cmd, &["--top", &top.to_string()]].concat());
        assert!(table.contains(&format!("{top} item(s); more exist")), "{cmd:?}: {table}");
        fits_100_columns(&format!("{cmd:?}"), &table);
        let table = cli.ok(cmd);
        assert!(table.contains(&format!("{all} item(s)\n")) && !table.contains("more exist"), "{cmd:?}: {table}");
        fits_100_columns(&format!("{cmd:?}"), &table);
    }
    let first = cli.json(&["enrollment", "list", "--top", "9"]);
    let ids: Vec<&str> = first.as_array().unwrap().iter().map(|e| e["registrationId"].as_str().unwrap()).collect();
    assert_eq!(ids, (0..9).map(|i| format!("top-{i:02}")).collect::<Vec<_>>(), "nine distinct enrollments, in order");
    let err = cli.fails(&["enrollment", "list", "--top", "0"]);
    assert!(err.contains("--top"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_show_prints_one_hub_with_its_registrar_query_masked_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "show-hub.example.net"]);
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };

    // hub show: one hub, its registrar URL's query masked in the table but not in JSON.
    cli.ok(&[
        "hub",
        "update",
        "show-hub.example.net",
        "--weight",
        "7",
        "--region",
        "westeurope",
        "--registrar-webhook-url",
        "https://registrar.example/api/devices?code=hub-secret-code",
    ]);
    let h = cli.json(&["hub", "show", "show-hub.example.net"]);
    assert_eq!(h["hostName"], "show-hub.example.net");
    assert_eq!(h["allocationWeight"], 7);
    assert_eq!(h["registrarWebhookUrl"], "https://registrar.example/api/devices?code=hub-secret-code");
    let table = cli.ok(&["hub", "show", "show-hub.example.net"]);
    let rows = table_fields(&table);
    assert_eq!(field(&rows, "hostName"), Some("show-hub.example.net"), "{table}");
    assert_eq!(field(&rows, "region"), Some("westeurope"), "{table}");
    assert_eq!(field(&rows, "registrarWebhookUrl"), Some("https://registrar.example/api/devices?code=…"), "{table}");
    let shown = cli.ok(&["hub", "show", "show-hub.example.net", "--show-keys"]);
    assert!(shown.contains("code=hub-secret-code"), "{shown}");
    assert!(!cli.ok(&["hub", "list"]).contains("hub-secret-code"));
    let err = cli.fails(&["hub", "show", "nope.example.net"]);
    assert!(err.contains("404"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_connection_string_reaches_the_service_with_that_policys_rights() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "cs-hub.example.net"]);
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };

    // The owner's connection string by default: the one the server printed.
    assert_eq!(cli.ok(&["policy", "connection-string"]).trim(), s.info.service_connection_string);
    // Another policy's, with either key, reaches the service with that policy's rights.
    let p = cli.json(&["policy", "add", "cs-reader", "--rights", "EnrollmentRead"]);
    cli.ok(&["enrollment", "create", "cs-dev"]);
    for key_type in ["primary", "secondary"] {
        let cs = cli.ok(&["policy", "connection-string", "cs-reader", "--key-type", key_type]).trim().to_owned();
        let key = p[format!("{key_type}Key")].as_str().unwrap();
        assert_eq!(cs, format!("HostName=localhost:{};SharedAccessKeyName=cs-reader;SharedAccessKey={key}", s.port));
        assert_eq!(
            cli.json(&["policy", "connection-string", "cs-reader", "--key-type", key_type])["connectionString"],
            cs
        );
        let reader = Cli { s: &s, cs };
        assert_eq!(reader.json(&["enrollment", "show", "cs-dev"])["registrationId"], "cs-dev");
        let err = reader.fails(&["enrollment", "create", "cs-other"]);
        assert!(err.contains("403") && err.contains("EnrollmentWrite"), "{err}");
    }
    // Policy tables mask the keys unless asked.
    let key = p["primaryKey"].as_str().unwrap();
    for cmd in [&["policy", "show", "cs-reader"][..], &["policy", "list"]] {
        let table = cli.ok(cmd);
        assert!(!table.contains(key) && table.contains(&format!("{}…", &key[..4])), "{cmd:?}: {table}");
        fits_100_columns(&format!("{cmd:?}"), &table);
        let full = cli.ok(&[cmd, &["--show-keys"]].concat());
        assert!(full.contains(&key[..10]) && !full.contains(&format!("{}…", &key[..4])), "{cmd:?}: {full}");
    }
    let full = cli.ok(&["policy", "show", "cs-reader", "--show-keys"]);
    assert_eq!(field(&table_fields(&full), "primaryKey"), Some(key), "{full}");
    assert!(cli.fails(&["policy", "connection-string", "nope"]).contains("404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_secondary_certificate_keeps_the_primary_and_refuses_the_secondary() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "rsc-hub.example.net"]);
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let path = |dir: &std::path::Path, file: &str| dir.join(file).to_str().unwrap().to_owned();
    // Two roots, and two certificates of the same device (CN = its registration id).
    for (dir, root) in [(&one, "rsc-root-a"), (&two, "rsc-root-b")] {
        cli.ok(&["cert", "root", root, "--out-dir", dir.to_str().unwrap()]);
        cli.ok(&["cert", "device", "rsc-dev", "--ca", root, "--out-dir", dir.to_str().unwrap()]);
    }
    let register = |dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_provisio"))
            .args(["device", "register", "--scope", &s.info.id_scope, "--json"])
            .args(["--cert", &path(dir, "rsc-dev_fullchain.pem"), "--cert-key", &path(dir, "rsc-dev_key.pem")])
            .args(["--endpoint", &format!("localhost:{}", s.port)])
            .arg("--ca")
            .arg(s.ca_file())
            .output()
            .unwrap()
    };

    // An individual enrollment with both device certificates: either registers.
    let e = cli.json(&[
        "enrollment",
        "create",
        "rsc-dev",
        "--certificate",
        &path(&one, "rsc-dev_cert.pem"),
        "--secondary-certificate",
        &path(&two, "rsc-dev_cert.pem"),
    ]);
    let certs = &e["attestation"]["x509"]["clientCertificates"];
    let primary = certs["primary"]["info"]["sha1Thumbprint"].as_str().unwrap().to_owned();
    assert!(certs["secondary"]["info"]["sha1Thumbprint"].is_string(), "{e}");
    assert!(register(&two).status.success(), "the secondary certificate registers before its removal");

    let u = cli.json(&["enrollment", "update", "rsc-dev", "--remove-secondary-certificate"]);
    let shown = cli.json(&["enrollment", "show", "rsc-dev"]);
    for v in [&u, &shown] {
        let certs = &v["attestation"]["x509"]["clientCertificates"];
        assert!(certs.get("secondary").is_none_or(Value::is_null), "the secondary is gone: {v}");
        assert_eq!(certs["primary"]["info"]["sha1Thumbprint"], primary.as_str(), "the primary stays: {v}");
        assert_eq!(certs["primary"]["info"]["subjectName"], "CN=rsc-dev");
    }
    let table = cli.ok(&["enrollment", "show", "rsc-dev"]);
    let rows = table_fields(&table);
    assert_eq!(field(&rows, "attestation.x509.clientCertificates.primary.thumbprint"), Some(primary.as_str()));
    assert!(!table.contains("secondary"), "{table}");
    let refused = register(&two);
    assert_eq!(refused.status.code(), Some(4), "the removed certificate is refused: {refused:?}");
    let ok = register(&one);
    assert!(ok.status.success(), "the primary still registers: {ok:?}");
    // A certificate can be added back as secondary, keeping the primary; --rsc is az's short form.
    let u = cli.json(&["enrollment", "update", "rsc-dev", "--secondary-certificate", &path(&two, "rsc-dev_cert.pem")]);
    assert_eq!(u["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha1Thumbprint"], primary.as_str());
    assert!(u["attestation"]["x509"]["clientCertificates"]["secondary"]["info"].is_object(), "{u}");
    let u = cli.json(&["enrollment", "update", "rsc-dev", "--rsc"]);
    assert!(u["attestation"]["x509"]["clientCertificates"].get("secondary").is_none_or(Value::is_null), "{u}");

    // A group on two signing certificates.
    let g = cli.json(&[
        "enrollment-group",
        "create",
        "rsc-group",
        "--certificate",
        &path(&one, "rsc-root-a_cert.pem"),
        "--secondary-certificate",
        &path(&two, "rsc-root-b_cert.pem"),
    ]);
    let signing = &g["attestation"]["x509"]["signingCertificates"];
    assert_eq!(signing["secondary"]["info"]["subjectName"], "CN=rsc-root-b", "{g}");
    cli.json(&["enrollment-group", "update", "rsc-group", "--remove-secondary-certificate"]);
    let g = cli.json(&["enrollment-group", "show", "rsc-group"]);
    let signing = &g["attestation"]["x509"]["signingCertificates"];
    assert!(signing.get("secondary").is_none_or(Value::is_null), "{g}");
    assert_eq!(signing["primary"]["info"]["subjectName"], "CN=rsc-root-a", "{g}");

    // A group on CA references.
    for (name, file) in [("ca-one", path(&one, "rsc-root-a_cert.pem")), ("ca-two", path(&two, "rsc-root-b_cert.pem"))] {
        cli.ok(&["certificate", "upload", name, "--file", &file, "--verified"]);
    }
    let g =
        cli.json(&["enrollment-group", "create", "rsc-refs", "--ca-name", "ca-one", "--secondary-ca-name", "ca-two"]);
    assert_eq!(g["attestation"]["x509"]["caReferences"]["secondary"], "ca-two", "{g}");
    let g = cli.json(&["enrollment-group", "update", "rsc-refs", "--remove-secondary-certificate"]);
    assert_eq!(g["attestation"]["x509"]["caReferences"]["primary"], "ca-one", "{g}");
    assert!(g["attestation"]["x509"]["caReferences"].get("secondary").is_none_or(Value::is_null), "{g}");

    // Not for keys; not together with a new secondary.
    cli.ok(&["enrollment", "create", "rsc-sym"]);
    let err = cli.fails(&["enrollment", "update", "rsc-sym", "--remove-secondary-certificate"]);
    assert!(err.contains("X.509") && err.contains("symmetricKey"), "{err}");
    let err = cli.fails(&[
        "enrollment",
        "update",
        "rsc-dev",
        "--remove-secondary-certificate",
        "--secondary-certificate",
        &path(&two, "rsc-dev_cert.pem"),
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
}

/// Base64 of a `TPM2B_PUBLIC` of the TCG EK template (RSA-2048) with a fresh modulus.
fn tpm_endorsement_key() -> String {
    use aws_lc_rs::signature::KeyPair as _;
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let n = kp.public_key().modulus().big_endian_without_leading_zero().to_vec();
    let tpm2b = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
        out.extend_from_slice(b);
    };
    let mut p = Vec::new();
    // RSA, SHA-256 names, restricted | decrypt | …, a 32-byte policy, AES-128-CFB, no scheme,
    // 2048 bits, the default exponent, then the modulus.
    for v in [0x0001_u16, 0x000B] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p.extend_from_slice(&0x0003_00B2_u32.to_be_bytes());
    tpm2b(&mut p, &[0x83; 32]);
    for v in [0x0006_u16, 128, 0x0043, 0x0010, 2048] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p.extend_from_slice(&0u32.to_be_bytes());
    tpm2b(&mut p, &n);
    let mut out = Vec::new();
    tpm2b(&mut out, &p);
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tables_fit_100_columns_with_keys_masked_unless_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("server"), "127.0.0.1:0", &["--linked-hub", "wide-hub.example.net"]);
    let cli = Cli { s: &s, cs: s.info.service_connection_string.clone() };
    let certs = tmp.path().join("certs");
    cli.ok(&["cert", "root", "wide-root", "--out-dir", certs.to_str().unwrap()]);
    cli.ok(&["cert", "device", "wide-x509", "--ca", "wide-root", "--out-dir", certs.to_str().unwrap()]);
    let device_cert = certs.join("wide-x509_cert.pem").to_str().unwrap().to_owned();
    let ek = tpm_endorsement_key();
    let desired = format!(
        r#"{{"properties":{{"desired":{{"firmware":"{}","interval":30}}}},"tags":{{"site":"lab"}}}}"#,
        "v".repeat(200)
    );
    let webhook = "https://alloc.example/api/allocate?code=webhook-secret-code";

    // Created with everything that made the old table 280 columns wide.
    let created = cli.ok(&[
        "enrollment",
        "create",
        "wide-sym",
        "--initial-twin",
        &desired,
        "--iot-hubs",
        "wide-hub.example.net",
        "--allocation-policy",
        "custom",
        "--webhook-url",
        webhook,
        "--reprovision-policy",
        "reprovisionandresetdata",
        "--iot-edge",
        "true",
    ]);
    fits_100_columns("enrollment create", &created);
    cli.ok(&[
        "enrollment",
        "create",
        "wide-x509",
        "--certificate",
        &device_cert,
        "--secondary-certificate",
        &device_cert,
    ]);
    cli.ok(&["enrollment", "create", "wide-tpm", "--endorsement-key", &ek]);
    let sym_key =
        cli.json(&["enrollment", "show", "wide-sym", "--show-keys"])["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned();
    let created_rows = table_fields(&created);
    assert_eq!(
        field(&created_rows, "attestation.symmetricKey.primaryKey"),
        Some(format!("{}…", &sym_key[..4]).as_str())
    );
    assert!(!created.contains(&sym_key[..10]), "{created}");

    for id in ["wide-sym", "wide-x509", "wide-tpm"] {
        let masked = cli.ok(&["enrollment", "show", id]);
        let shown = cli.ok(&["enrollment", "show", id, "--show-keys"]);
        fits_100_columns(id, &masked);
        fits_100_columns(id, &shown);
        let (masked, shown) = (table_fields(&masked), table_fields(&shown));
        assert_eq!(field(&masked, "registrationId"), Some(id));
        match id {
            "wide-sym" => {
                assert_eq!(field(&masked, "attestation.type"), Some("symmetricKey"));
                assert!(masked.iter().all(|(_, v)| !v.contains(&sym_key[..10])), "{masked:?}");
                assert_eq!(field(&shown, "attestation.symmetricKey.primaryKey"), Some(sym_key.as_str()));
                assert_eq!(
                    field(&masked, "customAllocationDefinition.webhookUrl"),
                    Some("https://alloc.example/api/allocate?code=…")
                );
                assert_eq!(field(&shown, "customAllocationDefinition.webhookUrl"), Some(webhook));
                assert_eq!(field(&masked, "iotHubs"), Some("wide-hub.example.net"));
                assert_eq!(field(&masked, "allocationPolicy"), Some("custom"));
                assert_eq!(field(&masked, "capabilities.iotEdge"), Some("true"));
                assert_eq!(field(&masked, "reprovisionPolicy.migrateDeviceData"), Some("false"));
                assert_eq!(field(&masked, "initialTwin.tags"), Some(r#"{"site":"lab"}"#));
                let summary = field(&masked, "initialTwin.properties.desired").unwrap();
                assert!(summary.contains("2 keys: firmware, interval"), "{summary}");
            }
            "wide-x509" => {
                assert_eq!(field(&masked, "attestation.type"), Some("x509"));
                for slot in ["primary", "secondary"] {
                    let p = format!("attestation.x509.clientCertificates.{slot}");
                    assert_eq!(field(&masked, &format!("{p}.subject")), Some("CN=wide-x509"));
                    assert_eq!(field(&masked, &format!("{p}.thumbprint")).map(str::len), Some(40));
                    assert!(field(&masked, &format!("{p}.expiry")).is_some_and(|e| e.ends_with('Z')), "{masked:?}");
                }
            }
            _ => {
                assert_eq!(field(&masked, "attestation.type"), Some("tpm"));
                assert_eq!(field(&masked, "attestation.tpm.endorsementKey"), Some(format!("{}…", &ek[..4]).as_str()));
                assert_eq!(field(&shown, "attestation.tpm.endorsementKey"), Some(ek.as_str()));
                // JSON stays the service's answer, whole.
                assert_eq!(cli.json(&["enrollment", "show", id])["attestation"]["tpm"]["endorsementKey"], ek.as_str());
            }
        }
    }
    let list = cli.ok(&["enrollment", "list"]);
    fits_100_columns("enrollment list", &list);
    assert!(list.contains("wide-hub.example.net") && list.contains("3 item(s)"), "{list}");
}
