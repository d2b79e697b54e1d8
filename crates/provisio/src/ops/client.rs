//! A small client of Provisio's service API for the operator commands: SAS tokens from
//! a connection string, DPS error bodies turned into messages that say what to fix.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The API version the CLI speaks.
pub const API_VERSION: &str = "2021-10-01";

/// How the operator commands reach the service.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// Service connection string: HostName=…;SharedAccessKeyName=…;SharedAccessKey=…
    #[arg(long, env = "PROVISIO_CONNECTION_STRING", hide_env_values = true, global = true)]
    pub connection_string: Option<String>,
    /// CA certificate (PEM) to trust for the service's TLS certificate (e.g.
    /// provisio-data/ca.pem); the system roots are used without it.
    #[arg(long, env = "PROVISIO_CA", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A connected service client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// `HostName` of the connection string (with its port, if any).
    host_name: String,
    host: String,
    key_name: String,
    key: String,
    /// Print JSON.
    pub json: bool,
}

/// A parsed service connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `HostName` (may carry a port).
    pub host: String,
    /// `SharedAccessKeyName`.
    pub key_name: String,
    /// `SharedAccessKey`.
    pub key: String,
}

impl ConnectionString {
    /// Parses `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` (keys case-insensitive).
    ///
    /// # Errors
    /// When a part is missing.
    pub fn parse(s: &str) -> Result<Self> {
        let (mut host, mut name, mut key) = (None, None, None);
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| anyhow!("connection string part '{part}' has no '='"))?;
            match k.to_ascii_lowercase().as_str() {
                "hostname" => host = Some(v.to_owned()),
                "sharedaccesskeyname" => name = Some(v.to_owned()),
                "sharedaccesskey" => key = Some(v.to_owned()),
                _ => {}
            }
        }
        Ok(Self {
            host: host.ok_or_else(|| anyhow!("the connection string has no HostName"))?,
            key_name: name.ok_or_else(|| anyhow!("the connection string has no SharedAccessKeyName"))?,
            key: key.ok_or_else(|| anyhow!("the connection string has no SharedAccessKey"))?,
        })
    }
}

impl Client {
    /// Connects with the options given.
    ///
    /// # Errors
    /// When the connection string is missing or malformed, or the CA file unreadable.
    pub fn new(args: &ConnArgs) -> Result<Self> {
        let cs = args.connection_string.as_deref().ok_or_else(|| {
            anyhow!("no connection string: pass --connection-string or set PROVISIO_CONNECTION_STRING (`provisio info` prints it)")
        })?;
        let cs = ConnectionString::parse(cs)?;
        provisio_core::keys::decode_key(&cs.key)
            .map_err(|e| anyhow!("SharedAccessKey of the connection string: {e}"))?;
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(60)).https_only(true);
        if let Some(ca) = &args.ca {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read --ca {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
            b = b.tls_certs_only(certs);
        }
        let host = cs.host.split(':').next().unwrap_or(&cs.host).to_owned();
        Ok(Self {
            http: b.build()?,
            base: format!("https://{}", cs.host),
            host_name: cs.host.clone(),
            host,
            key_name: cs.key_name,
            key: cs.key,
            json: args.json,
        })
    }

    /// The `HostName` this client connects to (with its port, if any).
    #[must_use]
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    fn token(&self) -> Result<String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        Ok(provisio_core::sas::build_token(
            &self.host,
            &self.key,
            now + 600,
            Some(&self.key_name),
            provisio_core::sas::SrEncoding::Upper,
        )?)
    }

    /// Sends a request; returns the JSON body (Null when empty) and the response headers.
    ///
    /// # Errors
    /// Network failures and non-2xx answers, with the server's message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<(Value, reqwest::header::HeaderMap)> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.base);
        let mut rb = self.http.request(method.clone(), &url).header("Authorization", self.token()?);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| {
            let detail = format!("{e:?}");
            let hint =
                if detail.contains("Certificate") || detail.contains("certificate") || detail.contains("UnknownIssuer")
                {
                    " (the server's TLS certificate is not trusted: pass --ca with its CA, e.g. provisio-data/ca.pem)"
                } else if e.is_connect() {
                    " (is the server running, and is HostName in the connection string right?)"
                } else {
                    ""
                };
            let mut cause = String::new();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                cause = format!(": {s}");
                src = s.source();
            }
            anyhow!("cannot reach {}: {e}{cause}{hint}", self.base)
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            bail!("{}", describe_error(status, &value));
        }
        Ok((value, headers))
    }

    /// GET.
    ///
    /// # Errors
    /// As [`Client::send`].
    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.send(Method::GET, path, None, &[]).await?.0)
    }

    /// GET of a route that needs no credential and answers bytes (a CA's CRL).
    ///
    /// # Errors
    /// Network failures and non-2xx answers, with the server's message.
    pub async fn get_public(&self, path: &str) -> Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).send().await.map_err(|e| anyhow!("cannot reach {}: {e}", self.base))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| anyhow!("reading the answer of {url}: {e}"))?;
        if !status.is_success() {
            let value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            bail!("{}", describe_error(status, &value));
        }
        Ok(body.to_vec())
    }
}

/// A message an operator can act on, from a DPS error body.
fn describe_error(status: StatusCode, v: &Value) -> String {
    let code = v.get("errorCode").and_then(Value::as_u64).map(|c| format!(" (errorCode {c})")).unwrap_or_default();
    let msg = v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_owned);
    let tracking =
        v.get("trackingId").and_then(Value::as_str).map(|t| format!(" [trackingId {t}]")).unwrap_or_default();
    let hint = match status.as_u16() {
        401 => " Check the connection string (HostName, key name and key).",
        403 => " The policy of the connection string lacks the right; use one with it (`provisio policy list`).",
        // Not after other conflicts (a CA in use by a credential policy).
        409 if msg.contains("already exists") => " Use `update` to change an existing item.",
        412 => " It changed since you read it; read it again or pass --etag '*'.",
        _ => "",
    };
    format!("{} {}{code}: {msg}{tracking}.{hint}", status.as_u16(), status.canonical_reason().unwrap_or(""))
}

/// Percent-encodes one path segment.
#[must_use]
pub fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, provisio_core::sas::PY_QUOTE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connection_strings() {
        let c = ConnectionString::parse(
            "HostName=dps.example:8443;SharedAccessKeyName=owner;SharedAccessKey=a2V5a2V5a2V5a2V5a2V5a2V5=",
        )
        .unwrap();
        assert_eq!(c.host, "dps.example:8443");
        assert_eq!(c.key_name, "owner");
        assert!(ConnectionString::parse("hostname=x;sharedaccesskeyname=y").is_err());
        assert!(ConnectionString::parse("HostName").is_err());
    }
}
