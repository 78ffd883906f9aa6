//! Who is looking: passwords (argon2id), session cookies and CSRF tokens.
//!
//! - A password is hashed with argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes) on a
//!   blocking thread, never on the runtime's threads.
//! - The session cookie is 256 OS-random bits; the database keeps its SHA-256 only. It is
//!   `HttpOnly`, `SameSite=Strict`, `Path=/`, and `Secure` when the console is served over
//!   TLS (`web.secure_cookies`).
//! - Every form of a logged-in page carries the session's CSRF token; a POST without it (or
//!   with another session's) is refused with 403. The login form is checked by origin: a
//!   cross-site POST to `/login` is refused.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::WebState;
use crate::store::users::{self, User};

/// The session cookie's name.
pub const COOKIE: &str = "ccmail_session";

/// 32 OS-random bytes, base64url.
pub fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| "the operating system's random generator failed".to_owned())?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The argon2id PHC string of `password`.
pub async fn hash_password(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let mut salt = [0u8; 16];
        aws_lc_rs::rand::fill(&mut salt)
            .map_err(|_| "the operating system's random generator failed".to_owned())?;
        let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| format!("hashing the password failed: {e}"))
    })
    .await
    .map_err(|e| format!("the hashing thread failed: {e}"))?
}

/// Whether `password` matches the stored `phc` string (false for a malformed one).
pub async fn verify_password(password: String, phc: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&phc)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Set-Cookie` for a new session.
pub fn session_cookie(token: &str, secure: bool, max_age_secs: u64) -> String {
    format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that ends the session in the browser.
pub fn cleared_cookie(secure: bool) -> String {
    session_cookie("", secure, 0)
}

/// A logged-in person, with the session's CSRF token.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub user: User,
    pub csrf: String,
    pub token_hash: [u8; 32],
}

impl Viewer {
    /// The name written as the holder of claims and the actor of events.
    pub fn actor(&self) -> String {
        format!("user:{}", self.user.name)
    }
}

/// Without a live session: a redirect to the login page, or the database failure that kept
/// the session from being read (answered as a page by `pages`).
pub enum NotLoggedIn {
    Redirect,
    Failed(crate::store::StoreError),
}

impl FromRequestParts<WebState> for Viewer {
    type Rejection = NotLoggedIn;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &WebState,
    ) -> Result<Viewer, NotLoggedIn> {
        let Some(token) = cookie(&parts.headers, COOKIE).filter(|t| !t.is_empty()) else {
            return Err(NotLoggedIn::Redirect);
        };
        let token_hash = hash_token(token);
        let found = state
            .db()
            .with_conn("session", async |conn| {
                users::session(conn, &token_hash).await
            })
            .await
            .map_err(NotLoggedIn::Failed)?;
        match found {
            Some((user, csrf, _)) => Ok(Viewer {
                user,
                csrf,
                token_hash,
            }),
            None => Err(NotLoggedIn::Redirect),
        }
    }
}

/// Whether a POST's origin is this console: `Origin` (or, without it, `Referer`) must name
/// the host the request was sent to.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let origin = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    match origin {
        Some(o) => {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .unwrap_or("");
            rest.split('/').next() == Some(host)
        }
        None => false,
    }
}

/// Constant-time comparison of a submitted CSRF token with the session's.
pub fn csrf_matches(submitted: &str, expected: &str) -> bool {
    submitted.len() == expected.len()
        && submitted
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}
