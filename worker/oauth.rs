//! OAuth 2.0 client-credentials tokens for Exchange Online, shared by every poller.
//!
//! - [`TokenSource`] asks `{authority}/{tenant}/oauth2/v2.0/token` for an app-only token with a
//!   client secret (reqwest over rustls, connect and total deadlines) and turns Entra's answers
//!   into [`AccessToken`] or a typed [`OAuthError`] that knows transient from permanent and
//!   carries the admin's fix for each AADSTS code.
//! - [`TokenCache`] keeps one token per app (authority, tenant, client id, scope), refreshes it
//!   ahead of expiry with one request however many pollers ask at once (single-flight), keeps
//!   serving the old token while a refresh fails and it is still valid, and backs off after a
//!   failure so a broken app registration is not hammered. Token requests per hour therefore
//!   depend on the number of apps, never on the number of mailboxes.
//!
//! Secrets (client secret, access token) are [`SecretString`]s: never logged, never in errors.
//! An answer of the token endpoint is read up to [`MAX_TOKEN_RESPONSE_BYTES`] and no further,
//! so neither an endless nor a huge body (a broken proxy, a hostile endpoint) can grow memory.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

mod aadsts;
mod certificate;
pub use aadsts::{AADSTS, Aadsts, aadsts_fix, aadsts_meaning};
pub use certificate::{
    AssertionAlg, CLIENT_ASSERTION_TYPE, CertificateCredential, CertificateError, thumbprint_sha1,
    thumbprint_sha256,
};

pub use crate::model::defaults::{DEFAULT_AUTHORITY, DEFAULT_SCOPE};

/// Largest token endpoint answer read (256 KiB). Entra's answers are a few KiB even with a
/// large token (Exchange Online rejects tokens over about 4 KB anyway).
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 256 * 1024;

pub use crate::model::AppKey;

/// An app registration and how it proves its identity.
#[derive(Clone, Debug)]
pub struct AppCredentials {
    pub key: AppKey,
    pub credential: Credential,
}

impl AppCredentials {
    /// An app that authenticates with a client secret.
    pub fn with_secret(key: AppKey, client_secret: SecretString) -> AppCredentials {
        AppCredentials {
            key,
            credential: Credential::Secret(client_secret),
        }
    }
}

/// How an app authenticates to the token endpoint (docs/exchange-online.md, "Credentials").
#[derive(Clone)]
pub enum Credential {
    /// `client_secret`: the secret's Value.
    Secret(SecretString),
    /// `client_assertion`: a JWT signed with the private key of a certificate registered on
    /// the app (private_key_jwt).
    Certificate(Arc<CertificateCredential>),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(<redacted>)"),
            Credential::Certificate(c) => f.debug_tuple("Certificate").field(c).finish(),
        }
    }
}

impl From<SecretString> for Credential {
    fn from(secret: SecretString) -> Credential {
        Credential::Secret(secret)
    }
}

/// A bearer token and when it stops working.
#[derive(Clone)]
pub struct AccessToken {
    secret: SecretString,
    /// When Entra says it expires, on the (pausable) tokio clock.
    pub expires_at: Instant,
    /// The same moment on the wall clock, for metrics and logs.
    pub expires_at_wall: SystemTime,
    /// When the cache should start asking for a new one.
    pub refresh_at: Instant,
    /// How long it was valid for when issued (capped).
    lifetime: Duration,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("length", &self.secret.expose_secret().len())
            .field("expires_at_wall", &self.expires_at_wall)
            .finish()
    }
}

/// Longest lifetime believed from `expires_in` (Entra issues 60–90 minutes; a huge value is
/// an error somewhere and must not overflow the clock).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl AccessToken {
    /// A token valid for `lifetime` from now, refreshed `refresh_ahead` before it expires
    /// (but never before half its lifetime, so a very short-lived token cannot cause a loop).
    pub fn new(secret: SecretString, lifetime: Duration, refresh_ahead: Duration) -> AccessToken {
        let lifetime = lifetime.min(MAX_LIFETIME);
        let now = Instant::now();
        let refresh_after = lifetime.saturating_sub(refresh_ahead).max(lifetime / 2);
        AccessToken {
            secret,
            expires_at: now + lifetime,
            expires_at_wall: SystemTime::now() + lifetime,
            refresh_at: now + refresh_after,
            lifetime,
        }
    }

    /// The bearer token itself.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// Length in characters (Exchange Online has rejected tokens over 4096 characters).
    pub fn len(&self) -> usize {
        self.secret.expose_secret().len()
    }

    /// Whether the token is empty (never true for a token from [`TokenSource`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it may still be handed out when callers need it valid `min_validity` longer.
    /// A token that never lived that long (a tiny `expires_in`) is usable for the first half
    /// of its life instead: otherwise every caller would fetch its own, one request per poll.
    pub fn usable(&self, min_validity: Duration) -> bool {
        self.valid_for(min_validity.min(self.lifetime / 2))
    }

    /// Whether it will still be valid `margin` from now.
    pub fn valid_for(&self, margin: Duration) -> bool {
        Instant::now() + margin < self.expires_at
    }
}

/// Entra's error answer (`error`, `error_codes`, ids support needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraError {
    pub http_status: u16,
    pub error: String,
    pub codes: Vec<u32>,
    /// The first line of `error_description` (without the trace/correlation trailer).
    pub description: String,
    pub trace_id: Option<String>,
    pub correlation_id: Option<String>,
}

/// Why no token could be obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    #[error("token endpoint {url} unreachable: {reason}")]
    Transport { url: String, reason: String },
    #[error("token endpoint {url} did not answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("token endpoint {url} answered HTTP {status} without an OAuth error body")]
    Http { url: String, status: u16 },
    #[error("{}", entra_message(.0))]
    Entra(Box<EntraError>),
    #[error("token endpoint answer could not be read: {0}")]
    Malformed(String),
    #[error(
        "token endpoint {url} answered HTTP {status} with a body larger than {} KiB; reading \
         stopped there",
        MAX_TOKEN_RESPONSE_BYTES / 1024
    )]
    TooLarge { url: String, status: u16 },
    #[error("invalid app settings: {0}")]
    Config(String),
}

fn entra_message(e: &EntraError) -> String {
    let mut s = format!("token request refused ({} HTTP {}", e.error, e.http_status);
    if let Some(code) = e.codes.first() {
        s.push_str(&format!(", AADSTS{code}"));
    }
    s.push_str(&format!("): {}", e.description));
    if let Some(t) = &e.trace_id {
        s.push_str(&format!(" [trace id {t}"));
        if let Some(c) = &e.correlation_id {
            s.push_str(&format!(", correlation id {c}"));
        }
        s.push(']');
    }
    s
}

impl OAuthError {
    /// Worth retrying with backoff: network trouble, 5xx, 408/429, `temporarily_unavailable`,
    /// throttling codes.
    pub fn is_transient(&self) -> bool {
        match self {
            OAuthError::Transport { .. } | OAuthError::Timeout { .. } => true,
            OAuthError::Http { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            OAuthError::Entra(e) => {
                e.http_status >= 500
                    || e.http_status == 429
                    || e.error == "temporarily_unavailable"
                    || e.codes.iter().any(|c| aadsts::is_throttling(*c))
            }
            // A 200 with a body we cannot read is most likely a proxy in the way.
            OAuthError::Malformed(_) | OAuthError::TooLarge { .. } => true,
            OAuthError::Config(_) => false,
        }
    }

    /// Needs an administrator (the AADSTS configuration codes, bad settings).
    pub fn is_permanent(&self) -> bool {
        !self.is_transient()
    }

    /// The supervisor's decision (see [`crate::model::retry`]): [`Retry::Soon`] when
    /// [`OAuthError::is_transient`], else [`Retry::Slowly`]: an AADSTS configuration error is
    /// fixed in Entra, not in ccmail's settings, and a signing or clock failure may clear.
    pub fn retry(&self) -> crate::model::retry::Retry {
        if self.is_transient() {
            crate::model::retry::Retry::Soon
        } else {
            crate::model::retry::Retry::Slowly
        }
    }

    /// The first AADSTS code, if Entra sent one.
    pub fn aadsts(&self) -> Option<u32> {
        match self {
            OAuthError::Entra(e) => e.codes.first().copied(),
            _ => None,
        }
    }

    /// What the administrator should do, in one line.
    pub fn fix(&self) -> Option<&'static str> {
        match self {
            OAuthError::Entra(e) => e.codes.iter().find_map(|c| aadsts_fix(*c)).or(
                match e.error.as_str() {
                    "invalid_client" => Some("check the client secret (its Value, not its Secret ID) and that it has not expired"),
                    "unauthorized_client" => Some("check the application (client) id and that the app exists in this tenant"),
                    "invalid_scope" => Some("use exactly https://outlook.office365.com/.default as the scope"),
                    _ => None,
                },
            ),
            OAuthError::Transport { .. } | OAuthError::Timeout { .. } => Some(
                "check that this host can reach the authority over HTTPS (proxy, firewall, DNS)",
            ),
            OAuthError::Config(_) => None,
            OAuthError::Http { .. } | OAuthError::Malformed(_) | OAuthError::TooLarge { .. } => {
                Some("check the authority URL; a proxy may be answering instead of Entra ID")
            }
        }
    }
}

/// Anything that can produce tokens for an app: the real HTTP [`TokenSource`], or a scripted
/// source in unit tests of the cache.
pub trait FetchToken: Send + Sync + 'static {
    /// Requests a new token.
    fn fetch<'a>(
        &'a self,
        app: &'a AppCredentials,
    ) -> Pin<Box<dyn Future<Output = Result<AccessToken, OAuthError>> + Send + 'a>>;
}

/// Settings of the HTTP token source.
#[derive(Debug, Clone)]
pub struct TokenSourceOptions {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    /// Start refreshing this long before expiry.
    pub refresh_ahead: Duration,
    /// Extra trusted CAs (tests, TLS-inspecting proxies).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl TokenSourceOptions {
    /// The `[oauth]` deadlines, refresh lead time and extra CA bundle (read here, so a bad
    /// bundle is an error naming `oauth.extra_ca_file`).
    pub fn from_config(
        oauth: &crate::config::OAuthConfig,
    ) -> Result<TokenSourceOptions, crate::config::ConfigError> {
        let extra_roots = match &oauth.extra_ca_file {
            Some(path) => crate::tls::read_pem_bundle(path).map_err(|source| {
                crate::config::ConfigError::CaBundle {
                    key: "oauth.extra_ca_file",
                    source,
                }
            })?,
            None => Vec::new(),
        };
        Ok(TokenSourceOptions {
            connect_timeout: oauth.connect_timeout_secs,
            total_timeout: oauth.total_timeout_secs,
            refresh_ahead: oauth.refresh_ahead_secs,
            extra_roots,
        })
    }
}

impl Default for TokenSourceOptions {
    fn default() -> Self {
        TokenSourceOptions {
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            refresh_ahead: Duration::from_secs(300),
            extra_roots: Vec::new(),
        }
    }
}

/// Client-credentials requests to the Microsoft identity platform v2.0 endpoint.
pub struct TokenSource {
    http: reqwest::Client,
    options: TokenSourceOptions,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("options", &self.options)
            .finish()
    }
}

impl TokenSource {
    /// Builds the HTTP client (certificates verified; TLS 1.2+).
    pub fn new(options: TokenSourceOptions) -> Result<TokenSource, OAuthError> {
        let tls = crate::tls::client_config_owned(&options.extra_roots)
            .map_err(|e| OAuthError::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(options.connect_timeout)
            .timeout(options.total_timeout)
            .https_only(true)
            .user_agent(concat!("ccmail/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OAuthError::Config(format!("HTTP client: {e}")))?;
        Ok(TokenSource { http, options })
    }

    /// One token request.
    pub async fn request(&self, app: &AppCredentials) -> Result<AccessToken, OAuthError> {
        let url = app.key.token_url();
        if !url.starts_with("https://") {
            return Err(OAuthError::Config(format!(
                "authority {:?} must be an https:// URL",
                app.key.authority
            )));
        }
        // A fresh assertion per request: it is short-lived and its `jti` must be unique.
        let assertion = match &app.credential {
            Credential::Secret(_) => None,
            Credential::Certificate(cert) => Some(cert.assertion(&app.key.client_id, &url)?),
        };
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", app.key.client_id.as_str()),
            ("scope", app.key.scope.as_str()),
        ];
        match (&app.credential, &assertion) {
            (Credential::Secret(secret), _) => form.push(("client_secret", secret.expose_secret())),
            (Credential::Certificate(_), Some(jwt)) => {
                form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE));
                form.push(("client_assertion", jwt.expose_secret()));
            }
            (Credential::Certificate(_), None) => {}
        }
        let response = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(|e| transport_error(&url, &e, self.options.total_timeout))?;
        let status = response.status().as_u16();
        let body = read_bounded(response, &url, self.options.total_timeout).await?;
        let token = parse_token_response(&url, status, &body, self.options.refresh_ahead)?;
        tracing::info!(
            app = %app.key,
            expires_in_s = token.expires_at.saturating_duration_since(Instant::now()).as_secs(),
            token_length = token.len(),
            "access token obtained"
        );
        if token.len() > 4000 {
            tracing::warn!(
                app = %app.key,
                token_length = token.len(),
                "access token longer than 4000 characters; Exchange Online has rejected such tokens"
            );
        }
        Ok(token)
    }
}

impl FetchToken for TokenSource {
    fn fetch<'a>(
        &'a self,
        app: &'a AppCredentials,
    ) -> Pin<Box<dyn Future<Output = Result<AccessToken, OAuthError>> + Send + 'a>> {
        Box::pin(self.request(app))
    }
}

/// The body of `response`, at most [`MAX_TOKEN_RESPONSE_BYTES`]: a larger one (by its
/// `Content-Length` or as it arrives) fails without being read further. The request's total
/// deadline covers a body that trickles.
async fn read_bounded(
    mut response: reqwest::Response,
    url: &str,
    total_timeout: Duration,
) -> Result<Vec<u8>, OAuthError> {
    let status = response.status().as_u16();
    let too_large = || OAuthError::TooLarge {
        url: url.to_owned(),
        status,
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_TOKEN_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(url, &e, total_timeout))?
    {
        if body.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn transport_error(url: &str, e: &reqwest::Error, after: Duration) -> OAuthError {
    if e.is_timeout() {
        return OAuthError::Timeout {
            url: url.to_owned(),
            after,
        };
    }
    // reqwest's Display names the URL, never the form body; include the cause chain.
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    OAuthError::Transport {
        url: url.to_owned(),
        reason,
    }
}

#[derive(serde::Deserialize)]
struct TokenOk {
    token_type: String,
    expires_in: NumberOrString,
    access_token: String,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(u64),
    String(String),
}

#[derive(serde::Deserialize)]
struct TokenErr {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u32>,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
}

/// Turns the endpoint's HTTP answer into a token or a typed error (sans-IO, so it is tested on
/// recorded bodies).
pub fn parse_token_response(
    url: &str,
    status: u16,
    body: &[u8],
    refresh_ahead: Duration,
) -> Result<AccessToken, OAuthError> {
    if (200..300).contains(&status) {
        let ok: TokenOk = serde_json::from_slice(body)
            .map_err(|e| OAuthError::Malformed(format!("success body: {e}")))?;
        if !ok.token_type.eq_ignore_ascii_case("bearer") {
            return Err(OAuthError::Malformed(format!(
                "token_type {:?}, expected Bearer",
                ok.token_type
            )));
        }
        if ok.access_token.is_empty() {
            return Err(OAuthError::Malformed("empty access_token".to_owned()));
        }
        let expires_in = match ok.expires_in {
            NumberOrString::Number(n) => n,
            NumberOrString::String(s) => s.trim().parse().map_err(|_| {
                OAuthError::Malformed(format!("expires_in {s:?} is not a number of seconds"))
            })?,
        };
        return Ok(AccessToken::new(
            SecretString::from(ok.access_token),
            Duration::from_secs(expires_in),
            refresh_ahead,
        ));
    }
    match serde_json::from_slice::<TokenErr>(body) {
        Ok(err) => {
            let description = err
                .error_description
                .as_deref()
                .and_then(|d| d.lines().next())
                .unwrap_or("")
                .trim()
                .to_owned();
            Err(OAuthError::Entra(Box::new(EntraError {
                http_status: status,
                error: err.error,
                codes: err.error_codes,
                description,
                trace_id: err.trace_id,
                correlation_id: err.correlation_id,
            })))
        }
        Err(_) => Err(OAuthError::Http {
            url: url.to_owned(),
            status,
        }),
    }
}

/// How the cache paces requests.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// A token is handed out only if it stays valid at least this long (time to log in).
    pub min_validity: Duration,
    /// First wait after a transient failure; doubles up to `max_backoff`.
    pub transient_backoff: Duration,
    /// First wait after a permanent failure (configuration error); doubles up to `max_backoff`.
    pub permanent_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            min_validity: Duration::from_secs(30),
            transient_backoff: Duration::from_secs(2),
            permanent_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(900),
        }
    }
}

/// What the cache knows about one app, for metrics and `doctor`.
#[derive(Debug, Clone)]
pub struct TokenStatus {
    pub key: AppKey,
    pub expires_at: Option<SystemTime>,
    pub last_error: Option<OAuthError>,
    pub consecutive_failures: u32,
}

#[derive(Default)]
struct Slot {
    token: Option<AccessToken>,
    last_error: Option<OAuthError>,
    failures: u32,
    /// No request before this moment (backoff after a failure).
    next_attempt: Option<Instant>,
}

struct Entry {
    /// Held by the one caller that is requesting a token: the single flight.
    flight: tokio::sync::Mutex<()>,
    /// Readable without waiting for the flight.
    slot: Mutex<Slot>,
}

/// One token per app, shared by all pollers. See the module documentation.
pub struct TokenCache {
    source: Arc<dyn FetchToken>,
    policy: CachePolicy,
    entries: Mutex<HashMap<AppKey, Arc<Entry>>>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the slot inconsistent (plain assignments),
    // so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Plan {
    Serve(AccessToken),
    Fail(OAuthError),
    Fetch,
}

impl TokenCache {
    /// A cache over `source`.
    pub fn new(source: Arc<dyn FetchToken>, policy: CachePolicy) -> TokenCache {
        TokenCache {
            source,
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entry(&self, key: &AppKey) -> Arc<Entry> {
        lock(&self.entries)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    flight: tokio::sync::Mutex::new(()),
                    slot: Mutex::new(Slot::default()),
                })
            })
            .clone()
    }

    /// Decides, from what is cached, whether to serve, fail or fetch.
    fn plan(&self, slot: &Slot, in_flight_elsewhere: bool) -> Plan {
        let now = Instant::now();
        let usable = slot
            .token
            .as_ref()
            .filter(|t| t.usable(self.policy.min_validity));
        if let Some(t) = usable
            && (now < t.refresh_at || in_flight_elsewhere)
        {
            return Plan::Serve(t.clone());
        }
        if let Some(next) = slot.next_attempt
            && now < next
        {
            // Backing off after a failure: the old token if it still works, else the error.
            return match (usable, &slot.last_error) {
                (Some(t), _) => Plan::Serve(t.clone()),
                (None, Some(e)) => Plan::Fail(e.clone()),
                (None, None) => Plan::Fetch,
            };
        }
        Plan::Fetch
    }

    /// A token for `app`: the cached one while it is fresh, otherwise one new request shared by
    /// every concurrent caller. If the refresh fails and the old token is still valid, the old
    /// token is returned and the failure is recorded (see [`TokenCache::status`]).
    pub async fn token(&self, app: &AppCredentials) -> Result<AccessToken, OAuthError> {
        let entry = self.entry(&app.key);
        // Fast path: fresh token, or a usable one while someone else refreshes.
        let busy = entry.flight.try_lock().is_err();
        match self.plan(&lock(&entry.slot), busy) {
            Plan::Serve(t) => return Ok(t),
            Plan::Fail(e) => return Err(e),
            Plan::Fetch => {}
        }
        let _flight = entry.flight.lock().await;
        // Whoever held the flight before us may have refreshed already.
        match self.plan(&lock(&entry.slot), false) {
            Plan::Serve(t) => return Ok(t),
            Plan::Fail(e) => return Err(e),
            Plan::Fetch => {}
        }
        let result = self.source.fetch(app).await;
        let mut slot = lock(&entry.slot);
        match result {
            Ok(token) => {
                slot.token = Some(token.clone());
                slot.last_error = None;
                slot.failures = 0;
                slot.next_attempt = None;
                crate::telemetry::global().token_request(
                    &app.key.telemetry_id(),
                    &app.key.client_id,
                    crate::telemetry::TokenOutcome::Issued(token.expires_at_wall),
                    0,
                );
                Ok(token)
            }
            Err(error) => {
                slot.failures = slot.failures.saturating_add(1);
                let base = if error.is_transient() {
                    self.policy.transient_backoff
                } else {
                    self.policy.permanent_backoff
                };
                let wait = backoff(base, self.policy.max_backoff, slot.failures);
                slot.next_attempt = Some(Instant::now() + wait);
                crate::telemetry::global().token_request(
                    &app.key.telemetry_id(),
                    &app.key.client_id,
                    crate::telemetry::TokenOutcome::Failed {
                        transient: error.is_transient(),
                    },
                    slot.failures,
                );
                tracing::warn!(
                    app = %app.key,
                    error = %error,
                    fix = error.fix().unwrap_or(""),
                    transient = error.is_transient(),
                    retry_in_s = wait.as_secs(),
                    "token request failed"
                );
                slot.last_error = Some(error.clone());
                match slot
                    .token
                    .as_ref()
                    .filter(|t| t.usable(self.policy.min_validity))
                {
                    Some(old) => Ok(old.clone()),
                    None => Err(error),
                }
            }
        }
    }

    /// When the cached token of `key` expires, if there is one.
    pub fn expiry(&self, key: &AppKey) -> Option<SystemTime> {
        let entry = lock(&self.entries).get(key).cloned()?;
        let slot = lock(&entry.slot);
        slot.token.as_ref().map(|t| t.expires_at_wall)
    }

    /// Every app's token state.
    pub fn status(&self) -> Vec<TokenStatus> {
        let entries: Vec<(AppKey, Arc<Entry>)> = lock(&self.entries)
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        entries
            .into_iter()
            .map(|(key, entry)| {
                let slot = lock(&entry.slot);
                TokenStatus {
                    key,
                    expires_at: slot.token.as_ref().map(|t| t.expires_at_wall),
                    last_error: slot.last_error.clone(),
                    consecutive_failures: slot.failures,
                }
            })
            .collect()
    }
}

/// Exponential backoff with full jitter in the upper half: `base * 2^(n-1)`, capped, then a
/// random point between half and all of it (so many pollers do not retry in lockstep).
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const URL: &str = "https://login.example/t/oauth2/v2.0/token";

    #[test]
    fn parses_success_with_number_or_string_expiry() {
        for body in [
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAi"}"#,
            r#"{"token_type":"bearer","expires_in":"3599","access_token":"eyJ0eXAi"}"#,
        ] {
            let t =
                parse_token_response(URL, 200, body.as_bytes(), Duration::from_secs(300)).unwrap();
            assert_eq!(t.secret().expose_secret(), "eyJ0eXAi");
            let left = t.expires_at - Instant::now();
            assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3599));
            let refresh = t.refresh_at - Instant::now();
            assert!(refresh <= Duration::from_secs(3299) && refresh > Duration::from_secs(3290));
        }
    }

    #[test]
    fn tiny_and_huge_lifetimes_are_safe() {
        let tiny = parse_token_response(
            URL,
            200,
            br#"{"token_type":"Bearer","expires_in":4,"access_token":"x"}"#,
            Duration::from_secs(300),
        )
        .unwrap();
        // Refresh no earlier than half the lifetime: no request loop.
        assert!(tiny.refresh_at - Instant::now() >= Duration::from_secs(1));
        let huge = parse_token_response(
            URL,
            200,
            br#"{"token_type":"Bearer","expires_in":18446744073709551615,"access_token":"x"}"#,
            Duration::from_secs(300),
        )
        .unwrap();
        assert!(huge.expires_at - Instant::now() <= MAX_LIFETIME);
    }

    #[test]
    fn malformed_answers() {
        for (status, body) in [
            (200, &b"{not json"[..]),
            (
                200,
                br#"{"token_type":"mac","expires_in":1,"access_token":"x"}"#,
            ),
            (
                200,
                br#"{"token_type":"Bearer","expires_in":"soon","access_token":"x"}"#,
            ),
            (
                200,
                br#"{"token_type":"Bearer","expires_in":5,"access_token":""}"#,
            ),
        ] {
            let e = parse_token_response(URL, status, body, Duration::ZERO).unwrap_err();
            assert!(matches!(e, OAuthError::Malformed(_)), "{e:?}");
        }
        let e = parse_token_response(URL, 502, b"<html>bad gateway</html>", Duration::ZERO)
            .unwrap_err();
        assert!(matches!(e, OAuthError::Http { status: 502, .. }));
        assert!(e.is_transient());
        let e = parse_token_response(URL, 404, b"", Duration::ZERO).unwrap_err();
        assert!(e.is_permanent());
    }

    #[test]
    fn entra_errors_are_classified_with_fixes() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.\r\nTrace ID: 0a1b\r\nCorrelation ID: 2c3d\r\nTimestamp: 2026-11-29 09:00:00Z","error_codes":[7000215],"timestamp":"2026-11-29 09:00:00Z","trace_id":"0a1b","correlation_id":"2c3d","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#;
        let e = parse_token_response(URL, 401, body, Duration::ZERO).unwrap_err();
        assert_eq!(e.aadsts(), Some(7000215));
        assert!(e.is_permanent());
        assert!(e.fix().unwrap().contains("Value, not its Secret ID"));
        let text = e.to_string();
        assert!(text.contains("AADSTS7000215"), "{text}");
        assert!(text.contains("trace id 0a1b") && text.contains("correlation id 2c3d"));
        assert!(!text.contains("Timestamp"), "{text}");

        let transient = [
            (
                400,
                r#"{"error":"temporarily_unavailable","error_codes":[]}"#,
            ),
            (429, r#"{"error":"invalid_request","error_codes":[50196]}"#),
            (400, r#"{"error":"invalid_request","error_codes":[90055]}"#),
            (503, r#"{"error":"server_error","error_codes":[]}"#),
        ];
        for (status, body) in transient {
            let e = parse_token_response(URL, status, body.as_bytes(), Duration::ZERO).unwrap_err();
            assert!(e.is_transient(), "{body}");
        }
        for code in [
            7000215u32, 7000222, 7000218, 700016, 90002, 900023, 90038, 70011, 1002012, 700022,
            500011, 700027, 50012, 7000112, 53003,
        ] {
            let body = format!(r#"{{"error":"invalid_request","error_codes":[{code}]}}"#);
            let e = parse_token_response(URL, 400, body.as_bytes(), Duration::ZERO).unwrap_err();
            assert!(e.is_permanent(), "{code}");
            assert!(e.fix().is_some(), "{code} has no fix");
        }
    }

    /// A scripted token endpoint for the cache's timing logic under paused time. (The HTTP
    /// path and request counting are tested against the Entra simulator.)
    struct Scripted {
        calls: AtomicUsize,
        results: Mutex<Vec<Result<Duration, OAuthError>>>,
        delay: Duration,
    }

    impl FetchToken for Scripted {
        fn fetch<'a>(
            &'a self,
            _app: &'a AppCredentials,
        ) -> Pin<Box<dyn Future<Output = Result<AccessToken, OAuthError>> + Send + 'a>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                let next = lock(&self.results).remove(0);
                next.map(|lifetime| {
                    AccessToken::new(
                        SecretString::from(format!("token-{n}")),
                        lifetime,
                        Duration::from_secs(300),
                    )
                })
            })
        }
    }

    fn app(client: &str) -> AppCredentials {
        AppCredentials {
            key: AppKey {
                authority: DEFAULT_AUTHORITY.into(),
                tenant: "contoso.test".into(),
                client_id: client.into(),
                scope: DEFAULT_SCOPE.into(),
            },
            credential: Credential::Secret(SecretString::from("s")),
        }
    }

    fn outage() -> OAuthError {
        OAuthError::Http {
            url: URL.into(),
            status: 503,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_and_serves_old_token_while_refresh_fails() {
        let source = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            results: Mutex::new(vec![
                Ok(Duration::from_secs(3600)),
                Err(outage()),
                Err(outage()),
                Ok(Duration::from_secs(3600)),
            ]),
            delay: Duration::from_millis(10),
        });
        let cache = TokenCache::new(source.clone(), CachePolicy::default());
        let a = app("one");
        let t0 = cache.token(&a).await.unwrap();
        assert_eq!(t0.secret().expose_secret(), "token-0");
        // Fresh: no request.
        tokio::time::advance(Duration::from_secs(1000)).await;
        assert_eq!(
            cache.token(&a).await.unwrap().secret().expose_secret(),
            "token-0"
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        // Inside the refresh window (5 min before expiry): a refresh is attempted, it fails,
        // the old token is still served and the failure is visible.
        tokio::time::advance(Duration::from_secs(2400)).await;
        let t = cache.token(&a).await.unwrap();
        assert_eq!(t.secret().expose_secret(), "token-0");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        let status = cache.status();
        assert_eq!(status[0].consecutive_failures, 1);
        assert!(status[0].last_error.is_some());
        // During the backoff no request is made.
        assert_eq!(
            cache.token(&a).await.unwrap().secret().expose_secret(),
            "token-0"
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // After the backoff: retried, fails again, old token still served.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            cache.token(&a).await.unwrap().secret().expose_secret(),
            "token-0"
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
        // Then the endpoint recovers.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            cache.token(&a).await.unwrap().secret().expose_secret(),
            "token-3"
        );
        assert!(cache.status()[0].last_error.is_none());
        assert!(cache.expiry(&a.key).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_is_never_served_and_errors_back_off() {
        let source = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            results: Mutex::new(vec![
                Ok(Duration::from_secs(100)),
                Err(outage()),
                Err(outage()),
            ]),
            delay: Duration::ZERO,
        });
        let cache = TokenCache::new(source.clone(), CachePolicy::default());
        let a = app("one");
        cache.token(&a).await.unwrap();
        tokio::time::advance(Duration::from_secs(90)).await;
        // 10 s left, below min_validity: the old token must not be handed out.
        assert!(cache.token(&a).await.is_err());
        // Many callers during the backoff: the cached error, no new request.
        for _ in 0..100 {
            assert!(cache.token(&a).await.is_err());
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_request_per_app() {
        let source = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            results: Mutex::new(vec![
                Ok(Duration::from_secs(3600)),
                Ok(Duration::from_secs(3600)),
            ]),
            delay: Duration::from_millis(200),
        });
        let cache = Arc::new(TokenCache::new(source.clone(), CachePolicy::default()));
        let mut tasks = Vec::new();
        for i in 0..200 {
            let cache = cache.clone();
            let a = app(if i % 2 == 0 { "one" } else { "two" });
            tasks.push(tokio::spawn(async move { cache.token(&a).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        for attempt in 1..30 {
            let d = backoff(base, max, attempt);
            let full = base.saturating_mul(1 << (attempt - 1).min(20)).min(max);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut a = app("one");
        a.credential = Credential::Secret(SecretString::from("very-secret-value"));
        assert!(!format!("{a:?}").contains("very-secret-value"));
        let t = AccessToken::new(
            SecretString::from("supersecrettoken"),
            Duration::from_secs(10),
            Duration::ZERO,
        );
        assert!(!format!("{t:?}").contains("supersecrettoken"));
    }
}
