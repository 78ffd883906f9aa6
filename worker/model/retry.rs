//! The one retry decision every layer's error exposes, and the supervisor consumes.
//!
//! Each layer's error type (`pop3::Error`, `oauth::OAuthError`, `store::StoreError`,
//! `secrets::SecretError`, `config::ConfigError`, and in ingest `PollError` and `ResolveError`)
//! has a `retry(&self) -> Retry` that maps every variant to one of three answers. Finer
//! predicates (`is_transient`, `poisons_connection`) stay where a layer needs them for its own
//! work; the supervisor's backoff decision reads only [`Retry`]. Imports nothing.

/// When trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient: network trouble, timeouts, a busy or throttling server, a database
    /// fail-over. Retry with the short exponential backoff (`worker.initial_backoff_secs`
    /// doubling up to `worker.max_backoff_secs`).
    Soon,
    /// Needs a person or time: rejected credentials, missing permissions, an untrusted
    /// certificate, a maildrop too large to list. Retry after the long interval
    /// (`worker.permanent_retry_secs`), so a fix made elsewhere is picked up without a restart.
    Slowly,
    /// Retrying cannot help until the settings change (the pilot's or app's row, or the
    /// worker's settings): the supervisor does not retry until a reload brings the change.
    Never,
}
