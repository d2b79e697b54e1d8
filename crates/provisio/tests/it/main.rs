//! Integration tests: real servers on loopback (in-process through `provisio-testkit`, or
//! the `provisio` binary where the binary itself is tested), real TLS, real SQLite, and
//! PostgreSQL when `PROVISIO_TEST_POSTGRES` names one. Nothing here needs Node, Python,
//! swtpm or port 443: those tests are the `interop` target. One test binary (each extra
//! binary costs a link on a 2-core machine).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod allocation;
mod amqp;
mod attacks;
mod bad_input;
mod bench;
mod cli;
mod common;
mod console;
mod device;
mod durability;
mod hardening;
mod issuance;
mod mqtt;
mod multinode;
mod service_api;
mod transports;
mod walkthrough;
mod websocket;
mod x509;
