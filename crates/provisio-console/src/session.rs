//! Sessions: a cookie signed (HMAC-SHA256) with the instance's console key, which every
//! node shares through the store, so that any node accepts any session. The cookie names
//! the policy and a fingerprint of its keys (the session ends when a key is regenerated or
//! the policy removed: [`provisio_engine::service::ServiceApi::caller`]), when it was issued
//! (absolute expiry) and last used (idle expiry), and a random nonce from which the
//! session's CSRF token is derived.

use aws_lc_rs::hmac;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "provisio_session";
/// The one-shot message cookie's name (shown after a redirect).
pub(crate) const FLASH: &str = "provisio_flash";

/// How long a session lasts without a request.
pub(crate) const IDLE_SECS: i64 = 30 * 60;
/// How long a session lasts at most.
pub(crate) const ABSOLUTE_SECS: i64 = 12 * 3600;

/// What a session cookie carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    /// The policy.
    pub p: String,
    /// The fingerprint of its keys at sign-in.
    pub f: String,
    /// Issued, Unix seconds.
    pub i: i64,
    /// Last used, Unix seconds.
    pub s: i64,
    /// Random, base64url: the CSRF token derives from it.
    pub n: String,
}

/// Why a cookie does not make a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// Absent, malformed or not signed by this instance.
    Unsigned,
    /// Too old, or idle too long.
    Expired,
}

/// Signs and checks cookies and CSRF tokens with the instance's console key.
pub(crate) struct Signer {
    key: hmac::Key,
}

impl Signer {
    pub(crate) fn new(secret: &[u8; 32]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    fn mac(&self, purpose: &str, data: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(purpose.as_bytes());
        ctx.update(b"\0");
        ctx.update(data.as_bytes());
        B64.encode(ctx.sign().as_ref())
    }

    fn verify(&self, purpose: &str, data: &str, mac: &str) -> bool {
        let Ok(tag) = B64.decode(mac) else { return false };
        let mut msg = purpose.as_bytes().to_vec();
        msg.push(0);
        msg.extend_from_slice(data.as_bytes());
        hmac::verify(&self.key, &msg, &tag).is_ok()
    }

    /// A new session for `policy` with key fingerprint `fingerprint`.
    pub(crate) fn issue(&self, policy: &str, fingerprint: &str, now: i64) -> Claims {
        let nonce: [u8; 16] = rand_bytes();
        Claims { p: policy.to_owned(), f: fingerprint.to_owned(), i: now, s: now, n: B64.encode(nonce) }
    }

    /// The cookie value of `claims`: `base64url(json).mac`.
    pub(crate) fn seal(&self, claims: &Claims) -> String {
        let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mac = self.mac("session", &body);
        format!("{body}.{mac}")
    }

    /// The claims of a cookie value, if this instance signed it and it has not expired.
    pub(crate) fn open(&self, value: &str, now: i64) -> Result<Claims, Invalid> {
        let (body, mac) = value.split_once('.').ok_or(Invalid::Unsigned)?;
        if !self.verify("session", body, mac) {
            return Err(Invalid::Unsigned);
        }
        let claims: Claims =
            B64.decode(body).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Invalid::Unsigned)?;
        if now - claims.i > ABSOLUTE_SECS || now - claims.s > IDLE_SECS || claims.s > now + 300 {
            return Err(Invalid::Expired);
        }
        Ok(claims)
    }

    /// The CSRF token of a session: only its holder (who can read the pages) has it.
    pub(crate) fn csrf(&self, claims: &Claims) -> String {
        self.mac("csrf", &claims.n)
    }

    /// Whether `token` is the session's CSRF token.
    pub(crate) fn csrf_ok(&self, claims: &Claims, token: &str) -> bool {
        self.verify("csrf", &claims.n, token)
    }

    /// A signed one-shot message.
    pub(crate) fn flash(&self, message: &str) -> String {
        let body = B64.encode(message.as_bytes());
        let mac = self.mac("flash", &body);
        format!("{body}.{mac}")
    }

    /// The message of a flash cookie this instance signed.
    pub(crate) fn open_flash(&self, value: &str) -> Option<String> {
        let (body, mac) = value.split_once('.')?;
        if !self.verify("flash", body, mac) {
            return None;
        }
        B64.decode(body).ok().and_then(|b| String::from_utf8(b).ok())
    }
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The system's generator does not fail on Linux; a zero nonce would only make the
    // CSRF token guessable for one session, so failure is not silently ignored: it panics.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(&mut b).expect("the system random number generator");
    b
}

/// The value of cookie `name` in a `Cookie` header.
pub(crate) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A `Set-Cookie` value for the console (only sent back over HTTPS, to the console's path,
/// unreadable by scripts, never sent by another site's requests).
pub(crate) fn set_cookie(name: &str, value: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/console; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_signed_expire_and_carry_their_csrf_token() {
        let s = Signer::new(&[7; 32]);
        let other = Signer::new(&[8; 32]);
        let c = s.issue("owner", "ab12", 1_000);
        let v = s.seal(&c);
        assert_eq!(s.open(&v, 1_100), Ok(c.clone()));
        assert_eq!(other.open(&v, 1_100), Err(Invalid::Unsigned), "another instance's key");
        // A changed claim breaks the signature.
        let (body, mac) = v.split_once('.').unwrap();
        let mut forged = c.clone();
        forged.p = "admin".into();
        let forged_body = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(s.open(&format!("{forged_body}.{mac}"), 1_100), Err(Invalid::Unsigned));
        assert_eq!(s.open(body, 1_100), Err(Invalid::Unsigned));
        assert_eq!(s.open("", 1_100), Err(Invalid::Unsigned));
        // Idle and absolute expiry.
        assert_eq!(s.open(&v, 1_000 + IDLE_SECS + 1), Err(Invalid::Expired));
        let mut busy = c.clone();
        busy.s = 1_000 + ABSOLUTE_SECS;
        assert_eq!(s.open(&s.seal(&busy), 1_000 + ABSOLUTE_SECS + 1), Err(Invalid::Expired));
        // CSRF: this session's token only.
        let t = s.csrf(&c);
        assert!(s.csrf_ok(&c, &t));
        assert!(!s.csrf_ok(&s.issue("owner", "ab12", 1_000), &t), "another session's nonce");
        assert!(!s.csrf_ok(&c, "") && !other.csrf_ok(&c, &t));
        // Flash messages.
        assert_eq!(s.open_flash(&s.flash("Saved.")), Some("Saved.".into()));
        assert_eq!(other.open_flash(&s.flash("Saved.")), None);
    }

    #[test]
    fn cookie_headers_are_read_and_written_safely() {
        assert_eq!(cookie("a=1; provisio_session=x.y; b=2", COOKIE), Some("x.y"));
        assert_eq!(cookie("provisio_session_2=z", COOKIE), None);
        let set = set_cookie(COOKIE, "v", 60);
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/console"] {
            assert!(set.contains(attr), "{set}");
        }
    }
}
