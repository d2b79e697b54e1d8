//! Calls to the operator's endpoints: the custom allocation webhook and the hub
//! registrar. One HTTP client per scheme (timeouts, no redirects, no proxy, the operator's
//! extra CAs, and a resolver that only hands out addresses the [`AddressPolicy`] allows),
//! retries of what a retry can fix, answers read up to a bound, and typed failures whose
//! messages never carry the URL (its query string may hold a function key).
//!
//! A failure has two faces. [`CallError`]'s `Display` is the precise reason (the status and
//! the start of the body, the refused address, the connection error): it goes to the audit
//! log and the operator's log. [`CallError::shown`] is what a device may read in its
//! registration state: a status code, or that no usable answer came. A closed port, a
//! refused address and a timeout look the same there, so a webhook URL can neither read an
//! internal service nor scan ports.

use std::{error::Error as _, net::SocketAddr, time::Duration};

use serde::Serialize;

use crate::{SetupError, addresses::AddressPolicy};

/// Largest answer read: an initial twin (IoT Hub allows 8 KB of tags and 32 KB of desired
/// properties) and a payload fit. A larger answer is a failure, found without reading it
/// whole.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Of an error answer only this much is read: its start goes to the audit log, shortened.
const ERROR_EXCERPT_BYTES: usize = 1024;

/// How operator endpoints are called.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Time allowed for one call (connect, send, answer).
    pub timeout: Duration,
    /// Attempts per call (server errors, throttling and network failures are retried).
    pub attempts: u32,
    /// Extra CA certificates (PEM) to trust for https endpoints.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Which addresses may be called (`webhook_allowed_networks`).
    pub addresses: AddressPolicy,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(5), attempts: 2, extra_ca_pem: None, addresses: AddressPolicy::default() }
    }
}

/// Why a call failed, precisely (see the module's notes on what a device is shown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The endpoint answered with a status that is not a success.
    #[error("HTTP {status}{}", body_note(body))]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of its body (shortened).
        body: String,
    },
    /// A success whose body is not JSON.
    #[error("the answer is not valid JSON ({detail}): {body}")]
    NotJson {
        /// The parser's complaint.
        detail: String,
        /// The start of the body.
        body: String,
    },
    /// A success whose body is larger than [`MAX_ANSWER_BYTES`].
    #[error("the answer is larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    /// The answer could not be read.
    #[error("reading the answer failed: {0}")]
    Read(String),
    /// The URL or the addresses its host resolves to may not be called: nothing was sent.
    #[error("not called: {0}")]
    Refused(String),
    /// No answer: connection refused, DNS, TLS, timeout.
    #[error("no answer: {0}")]
    Unreachable(String),
}

fn body_note(body: &str) -> String {
    if body.is_empty() { String::new() } else { format!(" (answer: {body})") }
}

/// A failure as a device may see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// The endpoint answered with this status.
    Status(u16),
    /// A success whose body is not JSON.
    NotJson,
    /// A success whose body is too large.
    TooLarge,
    /// No usable answer: refused address, closed port, DNS, TLS, timeout, broken answer.
    Unreachable,
}

impl CallError {
    /// Whether another attempt may succeed: server errors, throttling, no answer.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Unreachable(_) => true,
            Self::NotJson { .. } | Self::TooLarge | Self::Read(_) | Self::Refused(_) => false,
        }
    }

    /// What a device may be told of this failure.
    #[must_use]
    pub fn shown(&self) -> Shown {
        match self {
            Self::Status { status, .. } => Shown::Status(*status),
            Self::NotJson { .. } => Shown::NotJson,
            Self::TooLarge => Shown::TooLarge,
            Self::Read(_) | Self::Refused(_) | Self::Unreachable(_) => Shown::Unreachable,
        }
    }
}

/// A failed call after its attempts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{last}{}", if *attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() })]
pub struct Failed {
    /// The last attempt's failure.
    pub last: CallError,
    /// Attempts made (0: refused before any).
    pub attempts: u32,
}

/// The host of a webhook URL, for messages: never its path or query.
#[must_use]
pub fn host_of(url: &str) -> String {
    reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_else(|| "?".into())
}

/// Why the resolver handed out no address (found again in the error's source chain).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AddressRefused(String);

/// Resolves host names and passes on the addresses only if every one may be called: the
/// connection then goes to exactly those (no second lookup an attacker's DNS could answer
/// differently).
struct VettingResolver {
    policy: AddressPolicy,
    /// For `http` URLs: only allowed networks.
    plain: bool,
}

impl reqwest::dns::Resolve for VettingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (policy, plain) = (self.policy.clone(), self.plain);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address").into());
            }
            for a in &addrs {
                policy.vet(&host, a.ip(), plain).map_err(AddressRefused)?;
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// POSTs JSON to operator endpoints.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    /// For `https` URLs: public addresses and allowed networks.
    tls: reqwest::Client,
    /// For `http` URLs: allowed networks only.
    plain: reqwest::Client,
    policy: AddressPolicy,
    attempts: u32,
}

impl WebhookClient {
    /// A client with these settings.
    ///
    /// # Errors
    /// Unusable extra CA certificates.
    pub fn new(settings: &WebhookSettings) -> Result<Self, SetupError> {
        Ok(Self {
            tls: Self::build(settings, false)?,
            plain: Self::build(settings, true)?,
            policy: settings.addresses.clone(),
            attempts: settings.attempts.max(1),
        })
    }

    fn build(settings: &WebhookSettings, plain: bool) -> Result<reqwest::Client, SetupError> {
        let secs = settings.timeout.as_secs().max(1);
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(secs))
            .connect_timeout(Duration::from_secs(secs.clamp(1, 10)))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve and connect for us, past the address checks.
            .no_proxy()
            .https_only(!plain)
            .dns_resolver(VettingResolver { policy: settings.addresses.clone(), plain })
            .user_agent(concat!("provisio/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &settings.extra_ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SetupError::Config(format!("webhook CA certificates: {e}")))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        b.build().map_err(|e| SetupError::Config(format!("webhook client: {e}")))
    }

    /// The address rules this client follows.
    #[must_use]
    pub fn addresses(&self) -> &AddressPolicy {
        &self.policy
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
    ) -> Result<serde_json::Value, Failed> {
        let (answer, attempts) = self.post(url, body, pause).await?;
        serde_json::from_slice(&answer)
            .map_err(|e| Failed { last: CallError::NotJson { detail: e.to_string(), body: quoted(&answer) }, attempts })
    }

    /// POSTs `body` to `url` and returns the answer's body (at most [`MAX_ANSWER_BYTES`])
    /// and the attempts it took, retrying transient failures with a pause of `pause` times
    /// the attempt number.
    ///
    /// # Errors
    /// The last failure, when no attempt succeeded or one failed for good; a URL or an
    /// address the rules refuse (nothing is sent).
    pub async fn post<B: Serialize + ?Sized>(
        &self,
        url: &str,
        body: &B,
        pause: Duration,
    ) -> Result<(Vec<u8>, u32), Failed> {
        let (client, url) =
            self.target(url).map_err(|reason| Failed { last: CallError::Refused(reason), attempts: 0 })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = match Self::once(client, url.clone(), body).await {
                Ok(answer) => return Ok((answer, attempt)),
                Err(e) => e,
            };
            if !last.is_transient() || attempt >= self.attempts {
                return Err(Failed { last, attempts: attempt });
            }
            tokio::time::sleep(pause * attempt).await;
        }
    }

    /// The client for `url`'s scheme, once the URL passes the checks that need no lookup
    /// (a literal address is never given to the resolver).
    fn target(&self, url: &str) -> Result<(&reqwest::Client, reqwest::Url), String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("the URL does not parse ({e})"))?;
        let plain = match u.scheme() {
            "https" => false,
            "http" => true,
            other => return Err(format!("the scheme {other} is not http or https")),
        };
        let literal = match u.host() {
            Some(url::Host::Ipv4(a)) => Some(std::net::IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(std::net::IpAddr::V6(a)),
            Some(url::Host::Domain(_)) => None,
            None => return Err("the URL has no host".into()),
        };
        if let Some(ip) = literal {
            self.policy.vet(&ip.to_string(), ip, plain)?;
        }
        Ok((if plain { &self.plain } else { &self.tls }, u))
    }

    async fn once<B: Serialize + ?Sized>(
        client: &reqwest::Client,
        url: reqwest::Url,
        body: &B,
    ) -> Result<Vec<u8>, CallError> {
        let mut r = client.post(url).json(body).send().await.map_err(failure)?;
        let status = r.status();
        if !status.is_success() {
            let excerpt = read_capped(&mut r, ERROR_EXCERPT_BYTES).await.map(|(b, _)| b).unwrap_or_default();
            return Err(CallError::Status { status: status.as_u16(), body: quoted(&excerpt) });
        }
        if r.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
            return Err(CallError::TooLarge);
        }
        match read_capped(&mut r, MAX_ANSWER_BYTES).await {
            Ok((answer, true)) => Ok(answer),
            Ok((_, false)) => Err(CallError::TooLarge),
            Err(e) => Err(CallError::Read(describe(e))),
        }
    }
}

/// Reads at most `cap` bytes of `r`'s body; the flag says whether that was all of it. The
/// rest is never read (the connection is dropped with the response).
async fn read_capped(r: &mut reqwest::Response, cap: usize) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        let room = cap - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, false));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, true))
}

/// A request that got no answer: refused by the resolver, or unreachable.
fn failure(e: reqwest::Error) -> CallError {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<AddressRefused>() {
            return CallError::Refused(refused.0.clone());
        }
        source = s.source();
    }
    CallError::Unreachable(describe(e))
}

/// A reqwest error and its causes, without the URL (its query may hold a function key).
fn describe(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    if timeout { format!("timed out ({text})") } else { text }
}

/// The start of a body, as a log line may quote it.
fn quoted(body: &[u8]) -> String {
    provisio_core::text::shorten(String::from_utf8_lossy(body).trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn client(allowed: &[&str]) -> WebhookClient {
        let networks: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        WebhookClient::new(&WebhookSettings {
            timeout: Duration::from_secs(5),
            attempts: 1,
            extra_ca_pem: None,
            addresses: AddressPolicy::parse(&networks).unwrap(),
        })
        .unwrap()
    }

    /// A listener on loopback that nothing accepts from: whether anyone connected shows in
    /// its queue once the call has returned (the kernel completes a connection before any
    /// accept).
    fn quiet_listener() -> (std::net::TcpListener, u16) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    fn nobody_connected(l: &std::net::TcpListener) -> bool {
        matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// A one-connection HTTP server on loopback: reads a request, answers `head` and then
    /// `body_len` bytes, and reports how many of those it could write before the client
    /// went away.
    async fn answering(head: String, body_len: usize) -> (u16, tokio::task::JoinHandle<usize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // The whole request: headers, then Content-Length bytes.
            loop {
                let n = s.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if req.len() >= end + 4 + len {
                        break;
                    }
                }
                assert!(n > 0, "the request ended early");
            }
            s.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            let mut written = 0;
            while written < body_len {
                let n = chunk.len().min(body_len - written);
                if s.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                written += n;
            }
            written
        });
        (port, task)
    }

    #[test]
    fn which_failures_are_retried() {
        let status = |s: u16| CallError::Status { status: s, body: String::new() };
        assert!(status(500).is_transient() && status(503).is_transient() && status(429).is_transient());
        assert!(!status(400).is_transient() && !status(404).is_transient());
        assert!(CallError::Unreachable("refused".into()).is_transient());
        assert!(!CallError::Refused("loopback".into()).is_transient(), "the rules will not change on a retry");
        assert!(!CallError::NotJson { detail: "x".into(), body: "y".into() }.is_transient());
    }

    #[test]
    fn messages_name_the_status_and_the_attempts_and_devices_see_only_the_status() {
        let f = Failed { last: CallError::Status { status: 500, body: "boom".into() }, attempts: 2 };
        assert_eq!(f.to_string(), "HTTP 500 (answer: boom) (after 2 attempts)");
        assert_eq!(f.last.shown(), Shown::Status(500));
        let f = Failed { last: CallError::Status { status: 400, body: String::new() }, attempts: 1 };
        assert_eq!(f.to_string(), "HTTP 400");
        for e in [
            CallError::Refused("127.0.0.1 is a loopback address".into()),
            CallError::Unreachable("tcp connect error: Connection refused".into()),
            CallError::Unreachable("timed out".into()),
            CallError::Read("connection reset".into()),
        ] {
            assert_eq!(e.shown(), Shown::Unreachable, "{e}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_tried_as_often_as_configured() {
        // A port nobody listens on: bind one, take its number, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = WebhookClient::new(&WebhookSettings {
            timeout: Duration::from_secs(2),
            attempts: 3,
            extra_ca_pem: None,
            addresses: AddressPolicy::parse(&["127.0.0.0/8".into()]).unwrap(),
        })
        .unwrap();
        let url = format!("http://127.0.0.1:{port}/alloc?code=secret-function-key");
        let e = client.post_json(&url, &serde_json::json!({}), Duration::from_millis(1)).await.unwrap_err();
        assert_eq!(e.attempts, 3);
        assert!(matches!(e.last, CallError::Unreachable(_)), "{e}");
        assert!(!e.to_string().contains("secret-function-key"), "{e}");
    }

    #[tokio::test]
    async fn loopback_and_mapped_addresses_are_refused_without_the_allow_list_and_nothing_is_sent() {
        let (listener, port) = quiet_listener();
        let c = client(&[]);
        for url in [
            format!("http://127.0.0.1:{port}/alloc"),
            format!("https://127.0.0.1:{port}/alloc"),
            format!("https://[::ffff:127.0.0.1]:{port}/alloc"),
            format!("https://2130706433:{port}/alloc"),
        ] {
            let e = c.post(&url, &serde_json::json!({}), Duration::ZERO).await.unwrap_err();
            assert!(matches!(&e.last, CallError::Refused(r) if r.contains("non-public")), "{url}: {e}");
            assert_eq!(e.attempts, 0, "{url}");
        }
        assert!(nobody_connected(&listener));
        // Metadata and private addresses are refused the same way, before any connection.
        for url in ["https://169.254.169.254/latest/meta-data/", "https://10.0.0.1/x", "https://[fd00::1]/x"] {
            let e = c.post(url, &serde_json::json!({}), Duration::ZERO).await.unwrap_err();
            assert!(matches!(e.last, CallError::Refused(_)), "{url}: {e}");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_after_resolution() {
        let (listener, port) = quiet_listener();
        for url in [format!("https://localhost:{port}/alloc"), format!("http://localhost:{port}/alloc")] {
            let e = client(&[]).post(&url, &serde_json::json!({}), Duration::ZERO).await.unwrap_err();
            assert!(matches!(&e.last, CallError::Refused(r) if r.contains("localhost resolves to")), "{url}: {e}");
            assert_eq!(e.last.shown(), Shown::Unreachable);
        }
        assert!(nobody_connected(&listener));
    }

    #[tokio::test]
    async fn http_is_refused_outside_the_allowed_networks() {
        let e = client(&["127.0.0.0/8"]).post("http://8.8.8.8/alloc", &(), Duration::ZERO).await.unwrap_err();
        assert!(matches!(&e.last, CallError::Refused(r) if r.contains("use https")), "{e}");
        let e = client(&[]).post("ftp://example.com/x", &(), Duration::ZERO).await.unwrap_err();
        assert!(matches!(e.last, CallError::Refused(_)), "{e}");
    }

    #[tokio::test]
    async fn an_allowed_network_is_called_and_redirects_are_not_followed() {
        let (elsewhere, other) = quiet_listener();
        let (port, server) = answering(
            format!("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{other}/\r\nContent-Length: 0\r\n\r\n"),
            0,
        )
        .await;
        let e = client(&["127.0.0.0/8"]).post(&format!("http://127.0.0.1:{port}/"), &(), Duration::ZERO).await;
        assert_eq!(e.unwrap_err().last, CallError::Status { status: 302, body: String::new() });
        server.await.unwrap();
        assert!(nobody_connected(&elsewhere));
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_cap_is_not_read_whole() {
        let big = 64 * 1024 * 1024;
        let c = client(&["127.0.0.0/8"]);
        // Announced: refused on its length.
        let (port, server) = answering(
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {big}\r\n\r\n"),
            big,
        )
        .await;
        let e = c.post(&format!("http://127.0.0.1:{port}/"), &(), Duration::ZERO).await.unwrap_err();
        assert_eq!(e.last, CallError::TooLarge);
        assert_eq!(e.last.shown(), Shown::TooLarge);
        assert!(server.await.unwrap() < big, "the whole answer was read");
        // Not announced (read until the connection closes): the reading stops at the cap.
        let (port, server) =
            answering("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n".into(), big)
                .await;
        let e = c.post(&format!("http://127.0.0.1:{port}/"), &(), Duration::ZERO).await.unwrap_err();
        assert_eq!(e.last, CallError::TooLarge);
        assert!(server.await.unwrap() < big, "the whole answer was read");
        // An error answer: only its start is read, and kept shortened for the log.
        let (port, server) =
            answering(format!("HTTP/1.1 500 Internal Server Error\r\nContent-Length: {big}\r\n\r\n"), big).await;
        let e = c.post(&format!("http://127.0.0.1:{port}/"), &(), Duration::ZERO).await.unwrap_err();
        let CallError::Status { status: 500, body } = &e.last else { panic!("{e}") };
        assert!(body.starts_with("xxxx") && body.chars().count() < 100, "{body}");
        assert!(server.await.unwrap() < big, "the whole answer was read");
        // Within the cap: read and returned.
        let (port, server) =
            answering("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}".into(), 0)
                .await;
        let v = c.post_json(&format!("http://127.0.0.1:{port}/"), &(), Duration::ZERO).await.unwrap();
        assert_eq!(v, serde_json::json!({}));
        server.await.unwrap();
    }
}
