//! The HTTPS transport: `PUT …/register`, `GET …/operations/{id}`, `POST …/registrations/{id}`.

use provisio_proto::device::{
    DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus,
};
use reqwest::{Method, StatusCode};

use crate::{ClientError, Options, Progress, finish, retry_delay, tls};

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
        crate::API_VERSION
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
    let mut rb = c.request(method, url).json(body);
    if let Some(t) = opts.sas_token()? {
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
    let body = DeviceRegistration {
        registration_id: Some(opts.registration_id.clone()),
        tpm: None,
        payload: opts.payload.clone(),
    };
    let (status, mut retry, bytes) = send(&c, opts, Method::PUT, url(opts, "/register")?, &body).await?;
    if !status.is_success() {
        return Err(ClientError::from_answer(status.as_u16(), &bytes, &opts.credential));
    }
    let mut op: RegistrationOperationStatus = parse(&bytes)?;
    let mut polls = 0;
    loop {
        if op.status != RegistrationStatus::Assigning {
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

/// The POST status lookup.
pub async fn status(opts: &Options) -> Result<DeviceRegistrationResult, ClientError> {
    let c = client(opts)?;
    let body = DeviceRegistration { registration_id: Some(opts.registration_id.clone()), tpm: None, payload: None };
    let (status, _, bytes) = send(&c, opts, Method::POST, url(opts, "")?, &body).await?;
    if !status.is_success() {
        return Err(ClientError::from_answer(status.as_u16(), &bytes, &opts.credential));
    }
    parse(&bytes)
}
