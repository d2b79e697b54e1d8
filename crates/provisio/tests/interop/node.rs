//! The stock Node SDK harness (`interop/node/register.js`): one registration over any of its
//! transports, its outcome as the one JSON line it prints.

use std::process::Command;

use serde_json::Value;

use crate::common::{Instance, Server, repo_root};

/// Runs `register.js` as device `id` over `transport` (`http`, `mqtt`, `amqp`, `mqtt-ws`,
/// `amqp-ws`) to `host`, with `env`; returns its JSON line, `{"ok": …, "result"|"error": …}`.
pub fn register(s: &Server, transport: &str, host: &str, id: &str, env: &[(&str, &str)]) -> Value {
    let dir = repo_root().join("interop/node");
    assert!(
        dir.join("node_modules/azure-iot-provisioning-device").exists(),
        "the stock Node SDK is not installed: run `npm ci --prefix interop/node` (the README's test command does)"
    );
    let out = Command::new("node")
        .arg(dir.join("register.js"))
        .env("PROVISIO_HOST", host)
        .env("ID_SCOPE", &s.info.id_scope)
        .env("REGISTRATION_ID", id)
        .env("TRANSPORT", transport)
        .env("REGISTER_TIMEOUT_MS", "30000")
        .envs(env.iter().copied())
        .env("NODE_EXTRA_CA_CERTS", s.ca_file())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("register.js printed no JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

/// [`register`] over MQTT to the server's MQTT listener.
pub fn mqtt(s: &Server, id: &str, env: &[(&str, &str)]) -> Value {
    register(s, "mqtt", s.info.mqtt_endpoint.as_deref().expect("an MQTT listener"), id, env)
}

/// [`register`] over AMQP to the server's AMQP listener.
pub fn amqp(s: &Server, id: &str, env: &[(&str, &str)]) -> Value {
    register(s, "amqp", s.info.amqp_endpoint.as_deref().expect("an AMQP listener"), id, env)
}

/// Asserts that the SDK failed with the DPS error `code` (the harness prints the SDK's
/// error, whose message carries the service's answer): a refusal, not a timeout or a
/// crash of the harness.
pub fn assert_refused(r: &Value, code: u64) {
    assert_eq!(r["ok"], false, "{r}");
    assert_ne!(r["error"]["name"], "HarnessTimeout", "a timeout is not a refusal: {r}");
    let error = r["error"].to_string();
    assert!(error.contains(&code.to_string()), "the SDK's error names {code}: {r}");
}
