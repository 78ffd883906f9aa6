//! Who is asking: `Authorization: Bearer <key>` resolved to a live API key, and what each
//! role may do.
//!
//! A key is `ccm_` followed by 43 base64url characters (256 random bits from the operating
//! system's generator). Only its SHA-256 is stored; the key is printed once when created.
//! Lookup is by that hash, so no key text is ever compared byte by byte in this process.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::ApiState;
use super::problem::Problem;
use crate::store::{self, ApiKey, Role};

/// What starts every key, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "ccm_";

/// A new key and what the database keeps of it.
pub struct NewKey {
    /// Shown once to whoever created it; never stored.
    pub key: String,
    pub hash: [u8; 32],
    /// The first characters, kept for telling keys apart in a listing.
    pub prefix: String,
}

/// Draws a new key from the operating system's random generator.
pub fn generate_key() -> Result<NewKey, String> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| "the operating system's random generator failed".to_owned())?;
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let prefix = key.chars().take(KEY_PREFIX.len() + 6).collect();
    Ok(NewKey {
        hash: hash_key(&key),
        key,
        prefix,
    })
}

/// The stored form of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The caller of a request: a live API key.
#[derive(Debug, Clone)]
pub struct Principal(pub ApiKey);

impl Principal {
    /// The name written as the actor of events and as the holder of claims.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn role(&self) -> Role {
        self.0.role
    }

    /// 403 unless the key may act on `queue`.
    pub fn require_queue(&self, queue: &str) -> Result<(), Problem> {
        if self.0.covers(queue) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this key may not act on queue {queue:?}; ask an admin for a key that names it"
            )))
        }
    }

    /// 403 unless the key is a supervisor's or an admin's.
    pub fn require_supervisor(&self, what: &str) -> Result<(), Problem> {
        match self.0.role {
            Role::Supervisor | Role::Admin => Ok(()),
            Role::Agent => Err(Problem::forbidden(format!(
                "{what} needs a supervisor or admin key; this is an agent key"
            ))),
        }
    }
}

impl FromRequestParts<ApiState> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Principal, Problem> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                Problem::unauthorized("no Authorization header; send `Authorization: Bearer <key>`")
            })?;
        let key = header
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Problem::unauthorized(
                    "the Authorization header is not `Bearer <key>`; send the key ccmail printed \
                     when it was created",
                )
            })?;
        let hash = hash_key(key);
        let found = state
            .db()
            .with_conn("authenticate", async |conn| {
                store::authenticate_api_key(conn, &hash).await
            })
            .await
            .map_err(Problem::from_store)?;
        match found {
            Some(key) => Ok(Principal(key)),
            None => Err(Problem::unauthorized(
                "the key is unknown or revoked; `ccmail api-key list` shows the live keys",
            )),
        }
    }
}
