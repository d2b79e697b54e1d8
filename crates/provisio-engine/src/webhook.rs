//! Calls to the operator's endpoints: the custom allocation webhook and the hub
//! registrar. One HTTP client (timeouts, no redirects, the operator's extra CAs), retries
//! of what a retry can fix, and typed failures whose messages never carry a URL's query
//! string (it may hold a function key).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::SetupError;

/// How operator endpoints are called.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Time allowed for one call (connect, send, answer).
    pub timeout: Duration,
    /// Attempts per call (server errors, throttling and network failures are retried).
    pub attempts: u32,
    /// Extra CA certificates (PEM) to trust for https endpoints.
    pub extra_ca_pem: Option<Vec<u8>>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(5), attempts: 2, extra_ca_pem: None }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The endpoint answered with a status that is not a success.
    #[error("status code: {status}{}", body_note(body))]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of its body (quoted, shortened).
        body: String,
    },
    /// A success whose body is not JSON.
    #[error("the response is not valid JSON ({detail}): {body}")]
    NotJson {
        /// The parser's complaint.
        detail: String,
        /// The start of the body.
        body: String,
    },
    /// The answer could not be read.
    #[error("reading the response failed: {0}")]
    Read(String),
    /// No answer: connection refused, DNS, TLS, timeout (the URL's query redacted).
    #[error("could not be called: {0}")]
    Unreachable(String),
}

fn body_note(body: &str) -> String {
    if body.is_empty() { String::new() } else { format!(" (response: {body})") }
}

impl CallError {
    /// Whether another attempt may succeed: server errors, throttling, no answer.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Unreachable(_) => true,
            Self::NotJson { .. } | Self::Read(_) => false,
        }
    }
}

/// A failed call after its attempts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{last}{}", if *attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() })]
pub struct Failed {
    /// The last attempt's failure.
    pub last: CallError,
    /// Attempts made.
    pub attempts: u32,
}

/// POSTs JSON to operator endpoints.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    attempts: u32,
}

impl WebhookClient {
    /// A client with these settings.
    ///
    /// # Errors
    /// Unusable extra CA certificates.
    pub fn new(settings: &WebhookSettings) -> Result<Self, SetupError> {
        let secs = settings.timeout.as_secs().max(1);
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(secs))
            .connect_timeout(Duration::from_secs(secs.clamp(1, 10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("provisio/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &settings.extra_ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SetupError::Config(format!("webhook CA certificates: {e}")))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let http = b.build().map_err(|e| SetupError::Config(format!("webhook client: {e}")))?;
        Ok(Self { http, attempts: settings.attempts.max(1) })
    }

    /// POSTs `body` to `url` and parses the JSON answer, retrying transient failures with a
    /// pause of `pause` times the attempt number.
    ///
    /// # Errors
    /// The last failure, when no attempt succeeded or one failed for good; a success whose
    /// body is not JSON.
    pub async fn post_json<B: Serialize + ?Sized>(
        &self,
        url: &str,
        body: &B,
        pause: Duration,
    ) -> Result<Value, Failed> {
        let (text, attempts) = self.post(url, body, pause).await?;
        serde_json::from_str(&text)
            .map_err(|e| Failed { last: CallError::NotJson { detail: e.to_string(), body: quoted(&text) }, attempts })
    }

    /// POSTs `body` to `url` and returns the answer's text and the attempts it took,
    /// retrying transient failures with a pause of `pause` times the attempt number.
    ///
    /// # Errors
    /// The last failure, when no attempt succeeded or one failed for good.
    pub async fn post<B: Serialize + ?Sized>(
        &self,
        url: &str,
        body: &B,
        pause: Duration,
    ) -> Result<(String, u32), Failed> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = match self.http.post(url).json(body).send().await {
                Ok(r) if r.status().is_success() => match r.text().await {
                    Ok(text) => return Ok((text, attempt)),
                    Err(e) => CallError::Read(redact(&e)),
                },
                Ok(r) => {
                    let status = r.status().as_u16();
                    CallError::Status { status, body: quoted(&r.text().await.unwrap_or_default()) }
                }
                Err(e) => CallError::Unreachable(redact(&e)),
            };
            if !last.is_transient() || attempt >= self.attempts {
                return Err(Failed { last, attempts: attempt });
            }
            tokio::time::sleep(pause * attempt).await;
        }
    }
}

/// The start of a body, as a message may quote it.
fn quoted(text: &str) -> String {
    provisio_core::text::shorten(text.trim())
}

/// A reqwest error without the URL's query string (it may hold a function key).
fn redact(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(u) = e.url()
        && let Some(q) = u.query()
    {
        text = text.replace(q, "****");
    }
    if e.is_timeout() { format!("timed out ({text})") } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_failures_are_retried() {
        let status = |s: u16| CallError::Status { status: s, body: String::new() };
        assert!(status(500).is_transient() && status(503).is_transient() && status(429).is_transient());
        assert!(!status(400).is_transient() && !status(404).is_transient());
        assert!(CallError::Unreachable("refused".into()).is_transient());
        assert!(!CallError::NotJson { detail: "x".into(), body: "y".into() }.is_transient());
    }

    #[test]
    fn messages_name_the_status_and_the_attempts() {
        let f = Failed { last: CallError::Status { status: 500, body: "boom".into() }, attempts: 2 };
        assert_eq!(f.to_string(), "status code: 500 (response: boom) (after 2 attempts)");
        let f = Failed { last: CallError::Status { status: 400, body: String::new() }, attempts: 1 };
        assert_eq!(f.to_string(), "status code: 400");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_tried_as_often_as_configured() {
        // A port nobody listens on: bind one, take its number, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client =
            WebhookClient::new(&WebhookSettings { timeout: Duration::from_secs(2), attempts: 3, extra_ca_pem: None })
                .unwrap();
        let url = format!("http://127.0.0.1:{port}/alloc?code=secret-function-key");
        let e = client.post_json(&url, &serde_json::json!({}), Duration::from_millis(1)).await.unwrap_err();
        assert_eq!(e.attempts, 3);
        assert!(matches!(e.last, CallError::Unreachable(_)), "{e}");
        assert!(!e.to_string().contains("secret-function-key"), "{e}");
    }
}
