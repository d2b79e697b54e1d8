//! Operator commands: enrollments, groups, registrations, certificates, policies, and the
//! issuing CAs and credential policies of operational certificates, through the service API
//! (the same one the Azure service SDKs use).

pub mod ca;
pub mod certificate;
pub mod client;
pub mod credential_policy;
mod enrollment;
pub mod hub;
pub mod output;
pub mod policy;
pub mod registration;

pub use certificate::CertificateCommand;
pub use enrollment::{EnrollmentCommand, GroupCommand};
pub use policy::PolicyCommand;
pub use registration::RegistrationCommand;

/// `--top N` of the list commands (as `az iot dps … list --top`).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Top {
    /// List at most N items.
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub top: Option<usize>,
}

/// Reads an argument that is either inline JSON or `@file`.
///
/// # Errors
/// When the file cannot be read or the text is not JSON.
pub fn json_arg(arg: &str, what: &str) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {what} file {path}"))?,
        None => arg.to_owned(),
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

/// `provisio enrollment …`.
///
/// # Errors
/// Connection and service errors.
pub async fn enrollment_run(conn: &client::ConnArgs, cmd: EnrollmentCommand) -> anyhow::Result<()> {
    enrollment::run_enrollment(&client::Client::new(conn)?, cmd).await
}

/// `provisio enrollment-group …` (`compute-device-key` with `--group-key` needs no server).
///
/// # Errors
/// Connection and service errors.
pub async fn group_run(conn: &client::ConnArgs, cmd: GroupCommand) -> anyhow::Result<()> {
    if let GroupCommand::ComputeDeviceKey { id, registration_id, group_key } = cmd {
        let c = if group_key.is_none() { Some(client::Client::new(conn)?) } else { None };
        return enrollment::compute_device_key(c.as_ref(), id, &registration_id, group_key).await;
    }
    enrollment::run_group(&client::Client::new(conn)?, cmd).await
}
