//! Integration tests: real `provisio serve` processes on loopback, real TLS, real SQLite.
//! One test binary (each extra binary costs a link on a 2-core machine).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod allocation;
mod amqp;
mod bad_input;
mod bench;
mod cli;
mod common;
mod device;
mod durability;
mod hardening;
mod interop;
mod mqtt;
mod multinode;
mod service_api;
mod tpm;
mod walkthrough;
mod websocket;
mod x509;
