//! Interop tests: the stock Azure IoT SDK clients (Node and Python, from the npm registry
//! and PyPI), a software TPM (swtpm with tpm2-tools), and port 443, against in-process
//! servers over real TLS on loopback. Built only with `--features interop` (`scripts/test`
//! installs what they need and runs them); `cargo test --workspace` leaves them out.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod amqp;
mod console;
mod mqtt;
mod node;
mod sdk;
mod service_api;
mod tpm;

/// What every module uses from the harness.
mod common {
    pub use provisio_testkit::{
        Instance, PORT_443, Server, assert_dps_error, curl, header, now, put_enrollment, repo_root, run, service,
    };
}
