//! Protocol-neutral facts about a pilot that several layers name: how its connection is
//! protected, which app registration's token it shares, how that app signs.
//!
//! [`AssertionAlg`] names how an app signs its client assertion; its words are the JWT's own
//! (`RS256`, `PS256`), which the CLI and the database share.
//!
//! Plain data; the store keeps [`TlsMode`] as text through [`TlsMode::as_str`] and
//! [`TlsMode::parse`], pop3 connects by it, secrets binds sealed passwords to it.

use std::fmt;

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// TLS from the first byte (port 995). Exchange Online's documented mode.
    Implicit,
    /// Plain connect, then `STLS` (RFC 2595) before any credential is sent.
    StartTls,
    /// No TLS at all, credentials in clear text. Only for local test servers; never use it
    /// across a network.
    DangerousPlaintext,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TlsMode {
    /// The name used in the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit",
            TlsMode::StartTls => "starttls",
            TlsMode::DangerousPlaintext => "dangerous_plaintext",
        }
    }

    /// Parses [`TlsMode::as_str`]'s names (as stored in `pilots.tls`).
    pub fn parse(s: &str) -> Option<TlsMode> {
        match s {
            "implicit" => Some(TlsMode::Implicit),
            "starttls" => Some(TlsMode::StartTls),
            "dangerous_plaintext" => Some(TlsMode::DangerousPlaintext),
            _ => None,
        }
    }
}

/// Identifies one app registration's token: pilots with equal keys share one token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppKey {
    pub authority: String,
    pub tenant: String,
    pub client_id: String,
    pub scope: String,
}

impl AppKey {
    /// The key as one string, the opaque id telemetry knows this app by.
    pub fn telemetry_id(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}",
            self.authority, self.tenant, self.client_id, self.scope
        )
    }

    /// `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority.trim_end_matches('/'),
            self.tenant
        )
    }
}

impl fmt::Display for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} in tenant {}", self.client_id, self.tenant)
    }
}

/// The JWT signature algorithm of the client assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AssertionAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256; the header names the key by `x5t` (SHA-1 thumbprint).
    Rs256,
    /// RSASSA-PSS with SHA-256; the header names the key by `x5t#S256` (SHA-256 thumbprint).
    Ps256,
}

impl AssertionAlg {
    /// `RS256` or `PS256`, as in the JWT header, the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            AssertionAlg::Rs256 => "RS256",
            AssertionAlg::Ps256 => "PS256",
        }
    }

    /// Parses [`AssertionAlg::as_str`] (case-insensitive).
    pub fn parse(s: &str) -> Option<AssertionAlg> {
        if s.eq_ignore_ascii_case("RS256") {
            Some(AssertionAlg::Rs256)
        } else if s.eq_ignore_ascii_case("PS256") {
            Some(AssertionAlg::Ps256)
        } else {
            None
        }
    }
}

impl fmt::Display for AssertionAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
