//! The HTTPS transport: `PUT …/register`, `GET …/operations/{id}`, `POST …/registrations/{id}`.

use provisio_proto::device::{
    DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus,
};
use reqwest::{Method, StatusCode};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde_json::Value;

use crate::{ClientError, Credential, Options, Progress, Tpm, finish, retry_delay, tls};

fn client(opts: &Options) -> Result<reqwest::Client, ClientError> {
    // HTTP/1.1 as the device SDKs speak it: a registration is two or three requests on one
    // connection, and HTTP/2's connection set-up (preface, settings, HPACK tables, pings)
    // costs both sides more than it saves.
    let cfg = tls::client_config(opts, &[b"http/1.1"])?;
    reqwest::Client::builder()
        .tls_backend_preconfigured((*cfg).clone())
        .http1_only()
        .timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("provisio-client/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ClientError::Config(format!("HTTPS client: {e}")))
}

fn url(opts: &Options, tail: &str) -> Result<String, ClientError> {
    let (host, port) = opts.host_port()?;
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, provisio_core::sas::PY_QUOTE).to_string();
    Ok(format!(
        "https://{host}:{port}/{}/registrations/{}{tail}?api-version={}",
        enc(&opts.scope),
        enc(&opts.registration_id),
        opts.api_version()
    ))
}

fn network(e: &reqwest::Error) -> ClientError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    ClientError::Network(msg)
}

async fn send(
    c: &reqwest::Client,
    opts: &Options,
    method: Method,
    url: String,
    body: &DeviceRegistration,
) -> Result<(StatusCode, Option<u64>, bytes::Bytes), ClientError> {
    send_as(c, opts, method, url, body, true).await
}

async fn send_as(
    c: &reqwest::Client,
    opts: &Options,
    method: Method,
    url: String,
    body: &DeviceRegistration,
    authorize: bool,
) -> Result<(StatusCode, Option<u64>, bytes::Bytes), ClientError> {
    let mut rb = c.request(method, url).json(body);
    if authorize && let Some(t) = opts.sas_token()? {
        rb = rb.header("Authorization", t);
    }
    let r = rb.send().await.map_err(|e| network(&e))?;
    let status = r.status();
    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let body = r.bytes().await.map_err(|e| network(&e))?;
    Ok((status, retry, body))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body)
        .map_err(|e| ClientError::Protocol(format!("unexpected answer ({e}): {}", String::from_utf8_lossy(body))))
}

/// Registers, then polls.
pub async fn register(opts: &Options, mut progress: impl FnMut(Progress)) -> Result<crate::Registration, ClientError> {
    let c = client(opts)?;
    progress(Progress::Registering);
    let tpm = match &opts.credential {
        Credential::Tpm(t) => Some(t),
        _ => None,
    };
    let body = DeviceRegistration {
        registration_id: Some(opts.registration_id.clone()),
        tpm: tpm.map(tpm_block).transpose()?,
        payload: opts.payload.clone(),
        csr: opts.csr_field(),
    };
    if let Some(t) = tpm {
        challenge(&c, opts, &body, t).await?;
    }
    let (status, mut retry, bytes) = send(&c, opts, Method::PUT, url(opts, "/register")?, &body).await?;
    if !status.is_success() {
        return Err(ClientError::from_answer(status.as_u16(), &bytes, &opts.credential));
    }
    let mut op: RegistrationOperationStatus = parse(&bytes)?;
    let mut polls = 0;
    loop {
        if op.status != RegistrationStatus::Assigning {
            // A TPM device takes in the key the result delivers (the one it signs with at
            // the hub).
            if let (Some(t), Some(key)) = (tpm, op.registration_state.as_ref().and_then(result_key)) {
                t.with(|d| d.take_in(&key))?;
            }
            return finish(op);
        }
        let delay = retry_delay(retry, opts.min_poll_delay);
        progress(Progress::Assigning { operation_id: op.operation_id.clone(), retry_after: delay, polls });
        tokio::time::sleep(delay).await;
        polls += 1;
        let poll_url = url(
            opts,
            &format!(
                "/operations/{}",
                percent_encoding::utf8_percent_encode(&op.operation_id, provisio_core::sas::PY_QUOTE)
            ),
        )?;
        let (status, r, bytes) = send(&c, opts, Method::GET, poll_url, &DeviceRegistration::default()).await?;
        retry = r;
        if status.as_u16() == 429 || status.is_server_error() {
            continue; // transient: poll again after Retry-After
        }
        if !status.is_success() {
            return Err(ClientError::from_answer(status.as_u16(), &bytes, &opts.credential));
        }
        op = parse(&bytes)?;
    }
}

/// The body's `tpm` block: the TPM's EK and SRK, base64.
fn tpm_block(t: &Tpm) -> Result<provisio_proto::device::TpmAttestation, ClientError> {
    let (ek, srk) = t.with(|d| Ok((d.endorsement_key()?, d.storage_root_key()?)))?;
    Ok(provisio_proto::device::TpmAttestation {
        endorsement_key: B64.encode(ek),
        storage_root_key: Some(B64.encode(srk)),
    })
}

/// A TPM device's first request: no credential, its keys; the `401` answer's
/// `authenticationKey` goes into the TPM.
async fn challenge(c: &reqwest::Client, opts: &Options, body: &DeviceRegistration, t: &Tpm) -> Result<(), ClientError> {
    let (status, _, bytes) = send_as(c, opts, Method::PUT, url(opts, "/register")?, body, false).await?;
    let key = (status == StatusCode::UNAUTHORIZED)
        .then(|| serde_json::from_slice::<Value>(&bytes).ok())
        .flatten()
        .and_then(|v| v.get("authenticationKey").and_then(Value::as_str).map(str::to_owned));
    let Some(key) = key else {
        if status.is_success() {
            return Err(ClientError::Protocol("the service accepted a TPM device without a challenge".into()));
        }
        return Err(ClientError::from_answer(status.as_u16(), &bytes, &opts.credential));
    };
    let blob = B64
        .decode(key.trim())
        .map_err(|_| ClientError::Protocol("the challenge's authenticationKey is not base64".into()))?;
    t.with(|d| d.take_in(&blob))
}

/// The key blob in a TPM device's result, if any.
fn result_key(state: &DeviceRegistrationResult) -> Option<Vec<u8>> {
    let key = state.tpm.as_ref()?.get("authenticationKey")?.as_str()?;
    B64.decode(key.trim()).ok()
}

/// The POST status lookup.
pub async fn status(opts: &Options) -> Result<DeviceRegistrationResult, ClientError> {
    let c = client(opts)?;
    let body =
        DeviceRegistration { registration_id: Some(opts.registration_id.clone()), tpm: None, payload: None, csr: None };
    // A TPM holds a key from the service only after a challenge: ask for one first.
    if let Credential::Tpm(t) = &opts.credential {
        let register = DeviceRegistration { tpm: Some(tpm_block(t)?), ..body.clone() };
        challenge(&c, opts, &register, t).await?;
    }
    let (status, _, bytes) = send(&c, opts, Method::POST, url(opts, "")?, &body).await?;
    if !status.is_success() {
        return Err(ClientError::from_answer(status.as_u16(), &bytes, &opts.credential));
    }
    parse(&bytes)
}
