//! POP3 client (RFC 1939, RFC 2449 extensions, RFC 5034 SASL) with the two-step XOAUTH2 login
//! that Exchange Online accepts.
//!
//! - [`codec`]: sans-IO framing, bounded.
//! - [`connection`]: the socket, its buffer and a deadline on every wait; poisoned on failure.
//! - [`client`]: typed protocol states, [`Client`] (authorization) → [`Session`] (transaction).
//! - [`sasl`]: the XOAUTH2 and PLAIN client responses.
//!
//! Errors are one enum, [`Error`], that decides once whether a failure is worth retrying.

pub mod client;
pub mod codec;
pub mod connection;
pub mod sasl;

use std::time::Duration;

use crate::model::retry::Retry;

pub use client::{Client, ServerSpec, Session, TlsMode};
pub use codec::{ListedUidl, Listing, ListingEntry};
pub use connection::{Stream, Timeouts};

/// Everything that can go wrong talking POP3.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("connection to the POP3 server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("POP3 server did not answer within {after:?} ({during})")]
    Timeout {
        during: &'static str,
        after: Duration,
    },
    #[error("the TLS certificate of {host} was not accepted: {reason}. {hint}")]
    TlsCertificate {
        host: String,
        reason: String,
        hint: &'static str,
    },
    #[error("TLS handshake with {host} failed: {source}")]
    TlsHandshake {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS settings: {0}")]
    TlsConfig(#[from] crate::tls::TlsConfigError),
    #[error("the POP3 server closed the connection")]
    Closed,
    #[error("POP3 protocol violation: {0}")]
    Protocol(String),
    #[error("message is larger than the limit of {limit} octets ({received} octets received)")]
    TooLarge { limit: usize, received: u64 },
    /// A multi-line answer went on far past its limit without ending: not a message but a
    /// broken or hostile server. The rest was not read, so the connection is unusable.
    #[error(
        "the server's {during} answer went on past {limit} octets without ending; it was abandoned"
    )]
    ResponseTooLong { during: &'static str, limit: u64 },
    /// A UIDL or LIST listing longer than the listing bound (millions of messages, or an
    /// endless listing). The rest was not read, so the connection is unusable.
    #[error("the {command} listing is longer than {limit} octets; it was abandoned")]
    ListingTooLarge { command: &'static str, limit: u64 },
    /// A listing with more entries than the caller can hold (read whole; the connection is
    /// still usable).
    #[error("the {command} listing has more than {limit} entries")]
    TooManyEntries { command: &'static str, limit: usize },
    #[error("{command} refused by the server: {}", display_status(.code, .text))]
    Server {
        command: &'static str,
        code: Option<String>,
        text: String,
    },
    #[error("{mechanism} authentication rejected by the server: {}{}", display_status(.code, .text), .detail.as_ref().map(|d| format!(" (challenge: {d})")).unwrap_or_default())]
    AuthRejected {
        mechanism: &'static str,
        code: Option<String>,
        text: String,
        /// The decoded error challenge, if the server sent one (Dovecot does).
        detail: Option<String>,
    },
    /// The login was refused because the server is busy or its backend unavailable for now
    /// (Exchange's `Server Unavailable. 21`, RFC 2449 `[SYS/TEMP]` or `[IN-USE]`): not a
    /// verdict on the credentials.
    #[error("the server is busy or temporarily unavailable and refused the {mechanism} login: {}", display_status(.code, .text))]
    ServerBusy {
        mechanism: &'static str,
        code: Option<String>,
        text: String,
    },
    /// The server answered the XOAUTH2 response itself with a protocol error and closed the
    /// connection: what Exchange Online does with a token longer than it accepts.
    #[error("the XOAUTH2 login was cut off after a token of {length} characters ({}): the token is too long for the server", display_status(&None, .text))]
    TokenTooLong {
        /// Characters of the bearer token (never the token itself).
        length: usize,
        text: String,
    },
    #[error("the server does not offer {what}; {hint}")]
    NotSupported {
        what: &'static str,
        hint: &'static str,
    },
    #[error(
        "refusing to send credentials over an unencrypted connection; use implicit TLS (port 995) or STLS"
    )]
    PlaintextAuthRefused,
    #[error("the connection is unusable after an earlier error and was not reused")]
    Poisoned,
    #[error("invalid POP3 request: {0}")]
    InvalidRequest(String),
    /// A command that cannot be encoded (a line break or NUL in an argument).
    #[error("invalid POP3 request: {0}")]
    InvalidCommand(#[source] codec::CodecError),
}

fn display_status(code: &Option<String>, text: &str) -> String {
    match code {
        Some(code) => format!("-ERR [{code}] {text}"),
        None => format!("-ERR {text}"),
    }
}

impl Error {
    /// Worth retrying later with backoff: network trouble, timeouts, and server answers that
    /// say so (RFC 2449 `[SYS/TEMP]`, `[IN-USE]`, `[LOGIN-DELAY]`; Exchange's
    /// `Server Unavailable. 21`).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Io(_)
            | Error::Timeout { .. }
            | Error::TlsHandshake { .. }
            | Error::Closed
            | Error::Protocol(_)
            | Error::ResponseTooLong { .. }
            | Error::ServerBusy { .. }
            | Error::Poisoned => true,
            Error::Server { code, text, .. } | Error::AuthRejected { code, text, .. } => {
                matches!(
                    code.as_deref(),
                    Some("SYS/TEMP") | Some("IN-USE") | Some("LOGIN-DELAY")
                ) || text.contains("Server Unavailable")
            }
            Error::TlsCertificate { .. }
            | Error::TlsConfig(_)
            | Error::TooLarge { .. }
            | Error::ListingTooLarge { .. }
            | Error::TooManyEntries { .. }
            | Error::NotSupported { .. }
            | Error::TokenTooLong { .. }
            | Error::PlaintextAuthRefused
            | Error::InvalidRequest(_)
            | Error::InvalidCommand(_) => false,
        }
    }

    /// Needs a person to change something (credentials, permissions, certificates, settings):
    /// retrying soon will not help.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::AuthRejected { .. } => !self.is_transient(),
            Error::TokenTooLong { .. }
            | Error::TlsCertificate { .. }
            | Error::TlsConfig(_)
            | Error::NotSupported { .. }
            | Error::PlaintextAuthRefused
            | Error::ListingTooLarge { .. }
            | Error::TooManyEntries { .. }
            | Error::InvalidRequest(_)
            | Error::InvalidCommand(_) => true,
            Error::Server { code, .. } => {
                matches!(code.as_deref(), Some("SYS/PERM") | Some("AUTH"))
            }
            _ => false,
        }
    }

    /// The supervisor's decision (see [`crate::model::retry`]): [`Retry::Soon`] for everything
    /// transient and for failures of one message or answer (an oversized message, a refusal
    /// without a permanent code, a busy server at login); [`Retry::Slowly`] for what needs a
    /// person (credentials, a token too long, certificates, missing capabilities, a maildrop
    /// too large to list); [`Retry::Never`]
    /// for requests the pilot's own settings make impossible (a host name or user name that
    /// cannot be sent, TLS settings that do not build, credentials over plaintext).
    pub fn retry(&self) -> Retry {
        match self {
            Error::TlsConfig(_)
            | Error::InvalidRequest(_)
            | Error::InvalidCommand(_)
            | Error::PlaintextAuthRefused => Retry::Never,
            Error::AuthRejected { .. } | Error::Server { .. } if self.is_transient() => Retry::Soon,
            Error::AuthRejected { .. } => Retry::Slowly,
            Error::Server { .. } if self.is_permanent() => Retry::Slowly,
            Error::Server { .. } => Retry::Soon,
            Error::TlsCertificate { .. }
            | Error::NotSupported { .. }
            | Error::TokenTooLong { .. }
            | Error::ListingTooLarge { .. }
            | Error::TooManyEntries { .. } => Retry::Slowly,
            Error::Connect { .. }
            | Error::Io(_)
            | Error::Timeout { .. }
            | Error::TlsHandshake { .. }
            | Error::Closed
            | Error::Protocol(_)
            | Error::ResponseTooLong { .. }
            | Error::ServerBusy { .. }
            | Error::Poisoned
            | Error::TooLarge { .. } => Retry::Soon,
        }
    }

    /// Whether the connection can still be used after this error.
    pub fn poisons_connection(&self) -> bool {
        !matches!(
            self,
            Error::Server { .. }
                | Error::TooLarge { .. }
                | Error::TooManyEntries { .. }
                | Error::InvalidRequest(_)
                | Error::InvalidCommand(_)
        )
    }

    /// A one-line fix for an administrator, where one is known.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::AuthRejected {
                mechanism: "XOAUTH2",
                ..
            } if !self.is_transient() => Some(
                "Exchange gives this answer for more than permissions; first: another session \
                 holding this mailbox (another mail client, or a second ccmail worker polling \
                 the same pilot), or a permission granted less than an hour ago that has not \
                 reached Exchange yet (wait and retry). Then check, in order: POP.AccessAsApp \
                 application permission with admin consent; New-ServicePrincipal with the \
                 Enterprise Application's object id; Add-MailboxPermission FullAccess for this \
                 mailbox; the mailbox address; the token scope \
                 https://outlook.office365.com/.default; POP enabled on the mailbox (run \
                 `ccmail doctor` for the commands)",
            ),
            Error::AuthRejected { .. } if !self.is_transient() => {
                Some("check the user name and password of this mailbox")
            }
            Error::ServerBusy { .. } => Some(
                "the server refused the login for now: wait a few minutes and retry; check that \
                 no other session (another mail client or a second ccmail worker) holds this \
                 mailbox; if it lasts, Exchange Online is throttling this mailbox or has a \
                 backend problem (Microsoft 365 admin center > Service health)",
            ),
            Error::TokenTooLong { .. } => Some(
                "the access token (its length is in the error) is longer than Exchange Online \
                 accepts (tokens over about 4000 characters have been refused): remove API \
                 permissions the app does not need and its group or role claims (Token \
                 configuration; groupMembershipClaims in the manifest), then request a new token",
            ),
            Error::TlsCertificate { hint, .. } => Some(hint),
            Error::NotSupported { hint, .. } => Some(hint),
            Error::PlaintextAuthRefused => {
                Some("set the pilot's TLS mode to implicit (port 995) or starttls")
            }
            Error::Timeout { .. } | Error::Connect { .. } => {
                Some("check the host, the port and that outbound traffic to it is allowed")
            }
            Error::ListingTooLarge { .. } | Error::TooManyEntries { .. } => Some(
                "the maildrop holds more messages than can be listed: move or delete old \
                 messages with another mail client (Outlook on the web for Exchange Online), \
                 or check that this host is the mailbox's real POP3 server",
            ),
            Error::ResponseTooLong { .. } => Some(
                "the server sends an answer that does not end; check that this host is the \
                 mailbox's real POP3 server",
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_retry_decision_per_error() {
        let server = |code: Option<&str>, text: &str| Error::Server {
            command: "RETR",
            code: code.map(str::to_owned),
            text: text.to_owned(),
        };
        let auth = |code: Option<&str>| Error::AuthRejected {
            mechanism: "XOAUTH2",
            code: code.map(str::to_owned),
            text: "no".to_owned(),
            detail: None,
        };
        for (error, retry) in [
            (Error::Closed, Retry::Soon),
            (server(Some("IN-USE"), "busy"), Retry::Soon),
            (server(None, "Server Unavailable. 21"), Retry::Soon),
            (server(None, "no such message"), Retry::Soon),
            (server(Some("SYS/PERM"), "gone"), Retry::Slowly),
            (auth(Some("SYS/TEMP")), Retry::Soon),
            (auth(None), Retry::Slowly),
            (
                Error::ServerBusy {
                    mechanism: "XOAUTH2",
                    code: None,
                    text: "Server Unavailable. 21".to_owned(),
                },
                Retry::Soon,
            ),
            (
                Error::TokenTooLong {
                    length: 5000,
                    text: "Protocol error. Connection is closed. 10".to_owned(),
                },
                Retry::Slowly,
            ),
            (
                Error::TooLarge {
                    limit: 1,
                    received: 2,
                },
                Retry::Soon,
            ),
            (Error::PlaintextAuthRefused, Retry::Never),
            (
                Error::InvalidRequest("\"a b\" is not a valid host name".to_owned()),
                Retry::Never,
            ),
            (
                Error::InvalidCommand(codec::CodecError::ArgumentHasLineBreak),
                Retry::Never,
            ),
        ] {
            assert_eq!(error.retry(), retry, "{error:?}");
        }
    }
}
