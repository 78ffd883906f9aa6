//! Typed settings, loaded once at start-up and passed down explicitly.
//!
//! Sources, later ones win: built-in defaults, the TOML file (`--config`, else
//! `config/ccmail.toml` when it exists), then environment variables `CCMAIL_<SECTION>_<KEY>`
//! (for example `CCMAIL_WORKER_MAX_MESSAGES_PER_POLL=200`) and `DATABASE_URL`. Unknown keys are
//! errors that name the key and where it came from. This is the only module that reads the
//! environment (besides secret references resolved in `secrets.rs`), and it reads it once:
//! the master key is resolved at load too and held in the [`Config`] value.
//!
//! After load every value is in range (`validate()` holds every rule; nothing downstream
//! clamps) and durations are [`Duration`]s. An error names the environment variable that
//! supplied the value when one did, else the file key. This module imports only `secrets`:
//! each module owning a type built from settings (POP3 timeouts, parse and HTTP limits, token
//! source options) converts the settings section itself.
//!
//! Errors never quote the settings file or a value (a file may hold a database password, a
//! value may be a secret pasted into the wrong key): they name the file, the line and column,
//! the key and what is wrong. Settings that decide where credentials may come from and go to
//! ([`Config::credential_policy`]) live here and in the environment only, never in the
//! database that admins write.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::defaults;
use serde::{Deserialize, Serialize};

/// Where the settings file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/ccmail.toml";
/// The database the demo and a bare `ccmail run` use when nothing else is configured.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/ccmail";
/// Environment variable holding the base64 master key that seals stored secrets.
pub const MASTER_KEY_ENV: &str = "CCMAIL_MASTER_KEY";

/// All settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    pub pop3: Pop3Config,
    pub parse: ParseConfig,
    pub classify: ClassifyConfig,
    pub oauth: OAuthConfig,
    pub secrets: SecretsConfig,
    pub http: HttpConfig,
    pub api: ApiConfig,
    pub web: WebConfig,
    pub log: LogConfig,
    /// The master key, resolved once when the settings load (from `CCMAIL_MASTER_KEY`, else
    /// `secrets.master_key_file`); never written out.
    #[serde(skip)]
    master_key: LoadedKey,
    /// [`Config::credential_policy`], built once when the settings load.
    #[serde(skip)]
    credentials: crate::secrets::CredentialPolicy,
}

/// The master key held by [`Config`]: compared by key id, printed as its id only.
#[derive(Debug, Clone, Default)]
struct LoadedKey(Option<crate::secrets::MasterKey>);

impl PartialEq for LoadedKey {
    fn eq(&self, other: &LoadedKey) -> bool {
        self.0.as_ref().map(|k| k.key_id()) == other.0.as_ref().map(|k| k.key_id())
    }
}

/// `[database]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL; `DATABASE_URL` overrides it.
    pub url: String,
    pub max_connections: u32,
    /// Server-side `statement_timeout` of the worker's sessions.
    #[serde(with = "secs")]
    pub statement_timeout_secs: Duration,
    /// Server-side `idle_in_transaction_session_timeout` of the worker's sessions.
    #[serde(with = "secs")]
    pub idle_in_transaction_timeout_secs: Duration,
    /// Time to get a pooled connection (including opening one).
    #[serde(with = "secs")]
    pub acquire_timeout_secs: Duration,
    /// Client-side deadline of a begin, savepoint, commit or rollback.
    #[serde(with = "secs")]
    pub operation_timeout_secs: Duration,
    /// Idle seconds before the server sends TCP keepalive probes on a session's socket.
    #[serde(with = "secs")]
    pub tcp_keepalive_secs: Duration,
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Messages downloaded per poll at most; when more are waiting the pilot polls again at once.
    pub max_messages_per_poll: usize,
    /// Messages stored per transaction at most (DELE follows each commit).
    pub batch_messages: usize,
    /// Octets of messages held before a commit at most.
    pub batch_bytes: usize,
    /// Batches committed in the background while the next one downloads.
    pub commit_concurrency: usize,
    /// Messages parsed (on parser threads) while the next one downloads.
    pub parse_ahead: usize,
    /// A poll stops taking new messages after this many seconds, then commits, deletes and QUITs.
    #[serde(with = "secs")]
    pub max_poll_secs: Duration,
    /// UIDL listing entries looked at per poll; a larger maildrop drains over several polls.
    pub max_listing_entries: usize,
    /// A message whose download fails this many times is stored as headers only and flagged
    /// `fetch_failed`. What counts: the server's `-ERR` to its RETR, and a connection that
    /// breaks while it is the first download of a fresh session; a connection that breaks
    /// after other downloads of the session went through is the link's fault and not counted.
    pub max_retr_attempts: u32,
    /// A `fetch_failed` message is downloaded again this long after the last try, and its
    /// work item completed with the body when it arrives whole.
    #[serde(with = "secs")]
    pub refetch_failed_secs: Duration,
    /// Re-read pilots from the database this often (NOTIFY wakes the worker sooner; the
    /// lease renewals, every third of `lease_ttl_secs`, read them too).
    #[serde(with = "secs")]
    pub reload_interval_secs: Duration,
    /// On SIGTERM/SIGINT, wait this long for pollers to finish their current message and QUIT.
    #[serde(with = "secs")]
    pub shutdown_grace_secs: Duration,
    /// A pilot's lease lasts this long without renewal (renewed every third of it). With
    /// several replicas on one database, a replica that stops renewing (frozen, killed, cut
    /// off) loses its pilots to the others after this long; one that shuts down gives them up
    /// at once.
    #[serde(with = "secs")]
    pub lease_ttl_secs: Duration,
    /// Random spread added to each poll interval, as a fraction of it (0.1 = up to 10 %).
    pub poll_jitter: f64,
    /// Backoff after a transient failure starts here and doubles up to `max_backoff_secs`.
    #[serde(with = "secs")]
    pub initial_backoff_secs: Duration,
    #[serde(with = "secs")]
    pub max_backoff_secs: Duration,
    /// Wait after a permanent failure (configuration error) before trying again.
    #[serde(with = "secs")]
    pub permanent_retry_secs: Duration,
    /// A login refused with the server's generic answer is retried after 15 s, 30 s, then every
    /// 60 s for this long before it counts as persistent ("login refused", the checklist);
    /// then after 2, 5 and 10 minutes, then every `permanent_retry_secs`.
    #[serde(with = "secs")]
    pub login_refusal_grace_secs: Duration,
}

/// `[pop3]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    #[serde(with = "secs")]
    pub connect_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub tls_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub command_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub idle_timeout_secs: Duration,
    /// Slowest average rate of a multi-line answer (after `command_timeout_secs` of grace), in
    /// octets per second: the total deadline of a RETR, a listing or CAPA.
    pub min_rate_bytes_per_sec: u64,
    /// Lets `dangerous_plaintext` pilots log in to hosts other than loopback. The second
    /// switch: the pilot's own setting lives in the database, this one only here.
    pub dangerous_allow_plaintext_to_remote_hosts: bool,
    /// POP3 hosts an XOAUTH2 pilot may log in to: the tenant's access token opens every
    /// mailbox its app may read, so it goes nowhere else. Host names or addresses, compared
    /// without regard to case and never resolved. In the environment, a comma-separated list.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub allowed_xoauth2_hosts: Vec<String>,
}

/// `[parse]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParseConfig {
    /// MIME parts parsed per message at most; past it the rest stays in the raw message only.
    pub max_parts: usize,
    /// A message's parse may take this long, plus `time_per_mib_ms` per MiB, before it is
    /// abandoned and only its header section is kept.
    #[serde(with = "secs")]
    pub time_base_secs: Duration,
    #[serde(with = "millis")]
    pub time_per_mib_ms: Duration,
    /// Parses still running past their budget at once; beyond, only header sections are parsed.
    pub max_abandoned: usize,
}

/// `[classify]`: the loop breaker's rate rule.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// More than this many messages from one sender to one pilot within `loop_window_secs`
    /// make the next ones class `loop` (held by default; every message is still stored).
    pub loop_max_messages: u32,
    #[serde(with = "secs")]
    pub loop_window_secs: Duration,
}

/// `[oauth]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    #[serde(with = "secs")]
    pub connect_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub total_timeout_secs: Duration,
    /// Ask for a new token this long before the current one expires.
    #[serde(with = "secs")]
    pub refresh_ahead_secs: Duration,
    /// Extra PEM CA bundle trusted for the token endpoint (a TLS-inspecting proxy).
    pub extra_ca_file: Option<PathBuf>,
    /// Token authorities a credential may be sent to (https origins). In the environment, a
    /// comma-separated list.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub allowed_authorities: Vec<String>,
}

/// `[secrets]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// File holding the master key (base64 text or 32 raw bytes). `CCMAIL_MASTER_KEY` wins.
    pub master_key_file: Option<PathBuf>,
    /// The only directory `file:` references may point into (symlinks resolved). Unset:
    /// `file:` references are refused.
    pub dir: Option<PathBuf>,
    /// When set, `env:` references may only name variables starting with it. Never
    /// `CCMAIL_*`, `DATABASE_URL` or `PG*`, which are refused whatever the prefix.
    pub env_prefix: Option<String>,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the /metrics, /healthz and /readyz listener.
    pub listen: String,
    /// Connections held at most; beyond it the longest-waiting connection without a request
    /// in progress is closed to make room (a new one is closed at once if all are busy).
    pub max_connections: usize,
    /// A client must send a complete request head within this time of connecting or of
    /// starting to send it.
    #[serde(with = "secs")]
    pub header_read_timeout_secs: Duration,
    /// A kept-alive connection with no request is closed after this.
    #[serde(with = "secs")]
    pub idle_timeout_secs: Duration,
    /// Any connection is closed after this long (after the request in progress).
    #[serde(with = "secs")]
    pub max_connection_lifetime_secs: Duration,
    /// The database gauges of /metrics (work items, oldest queued age, client-secret expiry)
    /// are read this often, never on a scrape.
    #[serde(with = "secs")]
    pub gauge_refresh_secs: Duration,
}

/// `[api]`: the agents' HTTP API (`/api/v1`) and the work-item lifecycle's timings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Whether `ccmail run` serves the API (the rescue of expired offers and leases runs
    /// either way).
    pub enabled: bool,
    /// Address of the API listener; its own, so it can be exposed to the contact center's
    /// network without exposing `/metrics`.
    pub listen: String,
    /// Connections held at most (long-poll claims hold one each while they wait).
    pub max_connections: usize,
    /// A client must send a complete request head within this time.
    #[serde(with = "secs")]
    pub header_read_timeout_secs: Duration,
    /// A kept-alive connection with no request is closed after this.
    #[serde(with = "secs")]
    pub idle_timeout_secs: Duration,
    /// Any connection is closed after this long (after the request in progress).
    #[serde(with = "secs")]
    pub max_connection_lifetime_secs: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// An offer not accepted within this time goes back to its queue.
    #[serde(with = "secs")]
    pub offer_timeout_secs: Duration,
    /// An accepted item whose agent sends no heartbeat within this time goes back to its
    /// queue (the agent is taken as lost).
    #[serde(with = "secs")]
    pub lease_secs: Duration,
    /// After this many offers an item that comes back is held for a supervisor instead.
    pub max_offers: u32,
    /// Longest wait a long-poll claim may ask for.
    #[serde(with = "secs")]
    pub max_claim_wait_secs: Duration,
    /// Most items one claim may take (a dispatcher's batch).
    pub max_claim_batch: u32,
    /// How often expired offers and leases are put back.
    #[serde(with = "secs")]
    pub rescue_interval_secs: Duration,
    /// How long the first answer to a POST with an `Idempotency-Key` is kept for replays.
    #[serde(with = "secs")]
    pub idempotency_retention_secs: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: "127.0.0.1:9899".to_owned(),
            max_connections: 512,
            header_read_timeout_secs: Duration::from_secs(10),
            idle_timeout_secs: Duration::from_secs(60),
            max_connection_lifetime_secs: Duration::from_secs(600),
            max_body_bytes: 64 * 1024,
            offer_timeout_secs: Duration::from_secs(30),
            lease_secs: Duration::from_secs(300),
            max_offers: 5,
            max_claim_wait_secs: Duration::from_secs(30),
            max_claim_batch: 100,
            rescue_interval_secs: Duration::from_secs(1),
            idempotency_retention_secs: Duration::from_secs(86_400),
        }
    }
}

/// `[web]`: the web console for people (agents today), on its own listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Whether `ccmail run` serves the console.
    pub enabled: bool,
    /// Address of the console's listener.
    pub listen: String,
    /// Mark the session cookie `Secure` (set it when a TLS proxy serves the console).
    pub secure_cookies: bool,
    /// A login lasts this long.
    #[serde(with = "secs")]
    pub session_lifetime_secs: Duration,
    /// Failed logins of one user name allowed per `login_window_secs`.
    pub max_failed_logins: u32,
    #[serde(with = "secs")]
    pub login_window_secs: Duration,
    pub max_connections: usize,
    #[serde(with = "secs")]
    pub header_read_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub idle_timeout_secs: Duration,
    #[serde(with = "secs")]
    pub max_connection_lifetime_secs: Duration,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: false,
            listen: "127.0.0.1:9900".to_owned(),
            secure_cookies: false,
            session_lifetime_secs: Duration::from_secs(12 * 3600),
            max_failed_logins: 5,
            login_window_secs: Duration::from_secs(300),
            max_connections: 256,
            header_read_timeout_secs: Duration::from_secs(10),
            idle_timeout_secs: Duration::from_secs(60),
            max_connection_lifetime_secs: Duration::from_secs(600),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `ccmail=debug,info`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: DEFAULT_DATABASE_URL.to_owned(),
            max_connections: defaults::DB_MAX_CONNECTIONS,
            statement_timeout_secs: defaults::DB_STATEMENT_TIMEOUT,
            idle_in_transaction_timeout_secs: defaults::DB_IDLE_IN_TRANSACTION_TIMEOUT,
            acquire_timeout_secs: defaults::DB_ACQUIRE_TIMEOUT,
            operation_timeout_secs: defaults::DB_OPERATION_TIMEOUT,
            tcp_keepalive_secs: defaults::DB_TCP_KEEPALIVE,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            max_messages_per_poll: defaults::MAX_MESSAGES_PER_POLL,
            batch_messages: defaults::BATCH_MESSAGES,
            batch_bytes: defaults::BATCH_BYTES,
            commit_concurrency: defaults::COMMIT_CONCURRENCY,
            parse_ahead: defaults::PARSE_AHEAD,
            max_poll_secs: defaults::MAX_POLL_DURATION,
            max_listing_entries: defaults::MAX_LISTING_ENTRIES,
            max_retr_attempts: defaults::MAX_RETR_ATTEMPTS,
            refetch_failed_secs: defaults::REFETCH_AFTER,
            reload_interval_secs: Duration::from_secs(30),
            shutdown_grace_secs: Duration::from_secs(30),
            lease_ttl_secs: Duration::from_secs(30),
            poll_jitter: 0.1,
            initial_backoff_secs: Duration::from_secs(5),
            max_backoff_secs: Duration::from_secs(300),
            permanent_retry_secs: Duration::from_secs(900),
            login_refusal_grace_secs: defaults::LOGIN_REFUSAL_GRACE,
        }
    }
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            connect_timeout_secs: defaults::POP3_CONNECT_TIMEOUT,
            tls_timeout_secs: defaults::POP3_TLS_TIMEOUT,
            command_timeout_secs: defaults::POP3_COMMAND_TIMEOUT,
            idle_timeout_secs: defaults::POP3_IDLE_TIMEOUT,
            min_rate_bytes_per_sec: defaults::POP3_MIN_RATE_BYTES_PER_SEC,
            dangerous_allow_plaintext_to_remote_hosts: false,
            allowed_xoauth2_hosts: crate::secrets::MICROSOFT_POP_HOSTS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
        }
    }
}

impl Default for OAuthConfig {
    fn default() -> Self {
        OAuthConfig {
            connect_timeout_secs: Duration::from_secs(10),
            total_timeout_secs: Duration::from_secs(30),
            refresh_ahead_secs: Duration::from_secs(300),
            extra_ca_file: None,
            allowed_authorities: crate::secrets::MICROSOFT_AUTHORITIES
                .iter()
                .map(|a| (*a).to_owned())
                .collect(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9898".to_owned(),
            max_connections: 128,
            header_read_timeout_secs: Duration::from_secs(10),
            idle_timeout_secs: Duration::from_secs(60),
            max_connection_lifetime_secs: Duration::from_secs(600),
            gauge_refresh_secs: Duration::from_secs(15),
        }
    }
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        ClassifyConfig {
            loop_max_messages: defaults::LOOP_MAX_MESSAGES,
            loop_window_secs: defaults::LOOP_WINDOW,
        }
    }
}

impl Default for ParseConfig {
    fn default() -> Self {
        ParseConfig {
            max_parts: defaults::PARSE_MAX_PARTS,
            time_base_secs: defaults::PARSE_TIME_BASE,
            time_per_mib_ms: defaults::PARSE_TIME_PER_MIB,
            max_abandoned: defaults::PARSE_MAX_ABANDONED,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".to_owned(),
        }
    }
}

/// A settings problem, naming the key and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("settings file {path}: {message}")]
    File { path: String, message: String },
    #[error("settings file {path}, line {line}, column {column}: {message}")]
    Located {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("environment variable {var} (setting {key}): {message}")]
    EnvInvalid {
        var: String,
        key: &'static str,
        message: String,
    },
    /// A value the secrets layer refused (an authority, the master key file). The cause is
    /// the source, printed after the key by `{:#}` (as the CLI prints errors), not repeated
    /// in this message.
    #[error("setting {key}")]
    Secret {
        key: &'static str,
        #[source]
        source: crate::secrets::SecretError,
    },
    /// The same, for a value from the environment (`key` unless the variable is no setting,
    /// as `CCMAIL_MASTER_KEY`).
    #[error(
        "environment variable {var}{}",
        key.map(|k| format!(" (setting {k})")).unwrap_or_default()
    )]
    EnvSecret {
        var: String,
        key: Option<&'static str>,
        #[source]
        source: crate::secrets::SecretError,
    },
    /// A CA bundle setting that cannot be used (the cause is the source, as above).
    #[error("setting {key}")]
    CaBundle {
        key: &'static str,
        #[source]
        source: crate::tls::TlsConfigError,
    },
}

impl ConfigError {
    /// Always [`Retry::Never`](crate::model::retry::Retry::Never): settings are read once, so only
    /// a restart with corrected settings helps.
    pub fn retry(&self) -> crate::model::retry::Retry {
        crate::model::retry::Retry::Never
    }
}

const SECTIONS: [&str; 10] = [
    "database", "worker", "pop3", "classify", "oauth", "secrets", "http", "api", "web", "log",
];

impl Config {
    /// Loads defaults, then `path` (or [`DEFAULT_CONFIG_PATH`] if present), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env: Vec<(String, String)> = Vec::new();
        for (var, value) in std::env::vars_os() {
            match (var.into_string(), value.into_string()) {
                (Ok(var), Ok(value)) => env.push((var, value)),
                (Ok(var), Err(_)) if var.starts_with("CCMAIL_") || var == "DATABASE_URL" => {
                    return Err(ConfigError::Env {
                        var,
                        message: "is not valid UTF-8".to_owned(),
                    });
                }
                _ => {} // not a setting
            }
        }
        let (table, origin) = match path {
            Some(p) => (read_table(p)?, p.display().to_string()),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => (
                read_table(Path::new(DEFAULT_CONFIG_PATH))?,
                DEFAULT_CONFIG_PATH.to_owned(),
            ),
            None => (toml::Table::new(), "defaults".to_owned()),
        };
        Config::from_sources(table, &origin, &env)
    }

    /// Builds settings from a parsed file and a list of environment variables (testable
    /// without touching the process environment).
    pub fn from_sources(
        table: toml::Table,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let file = table;
        let mut table = file.clone();
        // Which variable supplied each key (`section.key`), in order; a later one wins.
        let mut supplied: Vec<(String, String, toml::Value)> = Vec::new();
        for (var, value) in env {
            let (section, key, value) = if var == "DATABASE_URL" {
                (
                    "database",
                    "url".to_owned(),
                    toml::Value::String(value.clone()),
                )
            } else {
                let Some(rest) = var.strip_prefix("CCMAIL_") else {
                    continue;
                };
                let rest = rest.to_ascii_lowercase();
                let Some(section) = SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_")))
                else {
                    continue; // CCMAIL_MASTER_KEY and test variables are not settings
                };
                (
                    *section,
                    rest[section.len() + 1..].to_owned(),
                    env_value(value),
                )
            };
            set(&mut table, section, &key, value.clone());
            supplied.push((format!("{section}.{key}"), var.clone(), value));
        }
        let mut config: Config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| blame_deserialize(&e, file, origin, &supplied))?;
        config.validate().map_err(|e| name_variable(e, &supplied))?;
        config.credentials = config
            .try_credential_policy()
            .map_err(|e| name_variable(e, &supplied))?;
        config.master_key = LoadedKey(
            config
                .read_master_key(env)
                .map_err(|e| name_variable(e, &supplied))?,
        );
        Ok(config)
    }

    /// Every range rule of the settings; an error names the key (see [`Config::from_sources`]
    /// for naming the environment variable instead). Nothing is clamped after this.
    fn validate(&self) -> Result<(), ConfigError> {
        let (w, p) = (&self.worker, &self.pop3);
        let at_least_one = [
            (
                "worker.max_messages_per_poll",
                w.max_messages_per_poll as u64,
            ),
            ("worker.batch_messages", w.batch_messages as u64),
            ("worker.batch_bytes", w.batch_bytes as u64),
            ("worker.commit_concurrency", w.commit_concurrency as u64),
            ("worker.max_listing_entries", w.max_listing_entries as u64),
            ("worker.max_retr_attempts", u64::from(w.max_retr_attempts)),
            ("parse.max_parts", self.parse.max_parts as u64),
            ("pop3.min_rate_bytes_per_sec", p.min_rate_bytes_per_sec),
            (
                "database.max_connections",
                u64::from(self.database.max_connections),
            ),
            ("http.max_connections", self.http.max_connections as u64),
            ("api.max_connections", self.api.max_connections as u64),
            ("api.max_body_bytes", self.api.max_body_bytes as u64),
            ("api.max_offers", u64::from(self.api.max_offers)),
            ("api.max_claim_batch", u64::from(self.api.max_claim_batch)),
            (
                "web.max_failed_logins",
                u64::from(self.web.max_failed_logins),
            ),
            ("web.max_connections", self.web.max_connections as u64),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let at_least_a_second = [
            ("worker.max_poll_secs", w.max_poll_secs),
            (
                "database.statement_timeout_secs",
                self.database.statement_timeout_secs,
            ),
            (
                "database.idle_in_transaction_timeout_secs",
                self.database.idle_in_transaction_timeout_secs,
            ),
            (
                "database.acquire_timeout_secs",
                self.database.acquire_timeout_secs,
            ),
            (
                "database.operation_timeout_secs",
                self.database.operation_timeout_secs,
            ),
            (
                "database.tcp_keepalive_secs",
                self.database.tcp_keepalive_secs,
            ),
            ("worker.reload_interval_secs", w.reload_interval_secs),
            ("worker.lease_ttl_secs", w.lease_ttl_secs),
            ("worker.initial_backoff_secs", w.initial_backoff_secs),
            ("worker.max_backoff_secs", w.max_backoff_secs),
            ("worker.permanent_retry_secs", w.permanent_retry_secs),
            ("worker.refetch_failed_secs", w.refetch_failed_secs),
            (
                "worker.login_refusal_grace_secs",
                w.login_refusal_grace_secs,
            ),
            ("pop3.connect_timeout_secs", p.connect_timeout_secs),
            ("pop3.tls_timeout_secs", p.tls_timeout_secs),
            ("pop3.command_timeout_secs", p.command_timeout_secs),
            ("pop3.idle_timeout_secs", p.idle_timeout_secs),
            ("parse.time_base_secs", self.parse.time_base_secs),
            ("classify.loop_window_secs", self.classify.loop_window_secs),
            (
                "oauth.connect_timeout_secs",
                self.oauth.connect_timeout_secs,
            ),
            ("oauth.total_timeout_secs", self.oauth.total_timeout_secs),
            (
                "http.header_read_timeout_secs",
                self.http.header_read_timeout_secs,
            ),
            ("http.idle_timeout_secs", self.http.idle_timeout_secs),
            (
                "http.max_connection_lifetime_secs",
                self.http.max_connection_lifetime_secs,
            ),
            ("http.gauge_refresh_secs", self.http.gauge_refresh_secs),
            (
                "api.header_read_timeout_secs",
                self.api.header_read_timeout_secs,
            ),
            ("api.idle_timeout_secs", self.api.idle_timeout_secs),
            (
                "api.max_connection_lifetime_secs",
                self.api.max_connection_lifetime_secs,
            ),
            ("api.offer_timeout_secs", self.api.offer_timeout_secs),
            ("api.lease_secs", self.api.lease_secs),
            ("api.rescue_interval_secs", self.api.rescue_interval_secs),
            ("web.session_lifetime_secs", self.web.session_lifetime_secs),
            ("web.login_window_secs", self.web.login_window_secs),
            (
                "web.header_read_timeout_secs",
                self.web.header_read_timeout_secs,
            ),
            ("web.idle_timeout_secs", self.web.idle_timeout_secs),
            (
                "web.max_connection_lifetime_secs",
                self.web.max_connection_lifetime_secs,
            ),
            (
                "api.idempotency_retention_secs",
                self.api.idempotency_retention_secs,
            ),
        ];
        for (key, value) in at_least_a_second {
            if value < Duration::from_secs(1) {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.classify.loop_max_messages == 0 {
            return Err(invalid(
                "classify.loop_max_messages",
                "must be at least 1 (a person writes far fewer; the rule only holds the excess)",
            ));
        }
        if w.initial_backoff_secs > w.max_backoff_secs {
            return Err(invalid(
                "worker.initial_backoff_secs",
                "must not exceed worker.max_backoff_secs",
            ));
        }
        if !(0.0..=1.0).contains(&w.poll_jitter) {
            return Err(invalid("worker.poll_jitter", "must be between 0 and 1"));
        }
        self.reference_policy()?;
        self.try_credential_policy()?;
        if self.api.max_claim_wait_secs >= self.api.max_connection_lifetime_secs {
            return Err(invalid(
                "api.max_claim_wait_secs",
                "must be shorter than api.max_connection_lifetime_secs",
            ));
        }
        if self.api.max_claim_batch > 1000 {
            return Err(invalid("api.max_claim_batch", "must be at most 1000"));
        }
        if self.api.max_offers > 1000 {
            return Err(invalid("api.max_offers", "must be at most 1000"));
        }
        if self.web.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "web.listen",
                message: format!(
                    "{:?} is not an address like 127.0.0.1:9900",
                    self.web.listen
                ),
            });
        }
        if self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "api.listen",
                message: format!(
                    "{:?} is not an address like 127.0.0.1:9899",
                    self.api.listen
                ),
            });
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "http.listen",
                message: format!(
                    "{:?} is not an address like 127.0.0.1:9898",
                    self.http.listen
                ),
            });
        }
        Ok(())
    }

    fn reference_policy(&self) -> Result<crate::secrets::ReferencePolicy, ConfigError> {
        if let Some(prefix) = &self.secrets.env_prefix {
            let valid = !prefix.is_empty()
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(ConfigError::Invalid {
                    key: "secrets.env_prefix",
                    message: "must be letters, digits and underscores, e.g. MAILSECRET_".to_owned(),
                });
            }
            if crate::secrets::is_reserved_env(prefix) {
                return Err(ConfigError::Invalid {
                    key: "secrets.env_prefix",
                    message: format!(
                        "{prefix} would allow no variable: CCMAIL_*, DATABASE_URL and PG* are \
                         reserved for ccmail's settings and the database login; choose a prefix \
                         of its own, e.g. MAILSECRET_"
                    ),
                });
            }
        }
        if let Some(dir) = &self.secrets.dir {
            let invalid = |message: &str| ConfigError::Invalid {
                key: "secrets.dir",
                message: message.to_owned(),
            };
            if !dir.is_absolute() {
                return Err(invalid(
                    "must be an absolute path, e.g. /etc/ccmail/secrets",
                ));
            }
            let normal: PathBuf = dir.components().collect();
            if normal.parent().is_none()
                || ["/proc", "/sys", "/dev"]
                    .iter()
                    .any(|root| normal.starts_with(root))
            {
                return Err(invalid(
                    "must be a directory of its own for ccmail's secret files, not /, /proc, /sys or /dev",
                ));
            }
        }
        Ok(crate::secrets::ReferencePolicy {
            dir: self.secrets.dir.clone(),
            env_prefix: self.secrets.env_prefix.clone(),
        })
    }

    fn try_credential_policy(&self) -> Result<crate::secrets::CredentialPolicy, ConfigError> {
        if self.oauth.allowed_authorities.is_empty() {
            return Err(ConfigError::Invalid {
                key: "oauth.allowed_authorities",
                message: "must name at least one authority, e.g. https://login.microsoftonline.com"
                    .to_owned(),
            });
        }
        let mut policy = crate::secrets::CredentialPolicy::with_authorities(
            self.reference_policy()?,
            &self.oauth.allowed_authorities,
            self.pop3.dangerous_allow_plaintext_to_remote_hosts,
        )
        .map_err(|source| ConfigError::Secret {
            key: "oauth.allowed_authorities",
            source,
        })?;
        for host in &self.pop3.allowed_xoauth2_hosts {
            let bare = crate::secrets::normalise_host(host);
            if bare.is_empty() || bare.contains(|c: char| c.is_whitespace() || "/@?#".contains(c)) {
                return Err(ConfigError::Invalid {
                    key: "pop3.allowed_xoauth2_hosts",
                    message: format!(
                        "{host:?} is not a host name or address; list hosts such as \
                         outlook.office365.com, without scheme, port or path"
                    ),
                });
            }
        }
        policy.set_xoauth2_hosts(&self.pop3.allowed_xoauth2_hosts);
        Ok(policy)
    }

    /// Where stored credentials may come from and go to: `[secrets]` `dir` and `env_prefix`,
    /// `oauth.allowed_authorities`, `pop3.allowed_xoauth2_hosts`,
    /// `pop3.dangerous_allow_plaintext_to_remote_hosts`. Built and checked once, when the
    /// settings load; settings built by hand (`Config::default()`) hold the default policy.
    pub fn credential_policy(&self) -> crate::secrets::CredentialPolicy {
        self.credentials.clone()
    }

    /// The master key from `CCMAIL_MASTER_KEY` or `secrets.master_key_file`, if configured
    /// (read when the settings loaded).
    pub fn master_key(&self) -> Option<crate::secrets::MasterKey> {
        self.master_key.0.clone()
    }

    /// Reads the master key: `CCMAIL_MASTER_KEY` from `env` wins over the key file.
    fn read_master_key(
        &self,
        env: &[(String, String)],
    ) -> Result<Option<crate::secrets::MasterKey>, ConfigError> {
        if let Some((_, value)) = env.iter().rev().find(|(var, _)| var == MASTER_KEY_ENV) {
            return crate::secrets::MasterKey::from_base64(value.trim())
                .map(Some)
                .map_err(|source| ConfigError::EnvSecret {
                    var: MASTER_KEY_ENV.to_owned(),
                    key: None,
                    source,
                });
        }
        match &self.secrets.master_key_file {
            Some(path) => crate::secrets::MasterKey::from_file(path)
                .map(Some)
                .map_err(|source| ConfigError::Secret {
                    key: "secrets.master_key_file",
                    source,
                }),
            None => Ok(None),
        }
    }
}

/// Durations written as whole seconds in the file and the environment (`*_secs` keys).
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(value.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// Durations written as whole milliseconds (`*_ms` keys).
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `error` naming the environment variable instead of the key when one supplied the value.
fn name_variable(error: ConfigError, supplied: &[(String, String, toml::Value)]) -> ConfigError {
    let var_of = |key: &str| {
        supplied
            .iter()
            .rev()
            .find(|(k, _, _)| k == key)
            .map(|(_, var, _)| var.clone())
    };
    match error {
        ConfigError::Invalid { key, message } => match var_of(key) {
            Some(var) => ConfigError::EnvInvalid { var, key, message },
            None => ConfigError::Invalid { key, message },
        },
        ConfigError::Secret { key, source } => match var_of(key) {
            Some(var) => ConfigError::EnvSecret {
                var,
                key: Some(key),
                source,
            },
            None => ConfigError::Secret { key, source },
        },
        other => other,
    }
}

/// The error of settings that do not deserialise, naming the environment variable that
/// broke them (found by applying the variables to the file one by one), else the file.
fn blame_deserialize(
    error: &toml::de::Error,
    file: toml::Table,
    origin: &str,
    supplied: &[(String, String, toml::Value)],
) -> ConfigError {
    let message = hide_values(error.message()).trim().to_owned();
    let mut table = file;
    for (key, var, value) in supplied {
        let (section, name) = key.split_once('.').unwrap_or((key.as_str(), ""));
        set(&mut table, section, name, value.clone());
        if let Err(e) = Config::deserialize(toml::Value::Table(table.clone())) {
            return ConfigError::Env {
                var: var.clone(),
                message: format!("{} (setting {key})", hide_values(e.message()).trim()),
            };
        }
    }
    if origin == "defaults" {
        ConfigError::Env {
            var: "CCMAIL_*".to_owned(),
            message,
        }
    } else {
        ConfigError::File {
            path: origin.to_owned(),
            message,
        }
    }
}

fn invalid(key: &'static str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.to_owned(),
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let table = text
        .parse::<toml::Table>()
        .map_err(|e| located(path, &text, &e))?;
    // The file alone first, so that a bad key or value is reported with its line and column
    // (the merged table below has no positions).
    if let Err(e) = toml::from_str::<Config>(&text) {
        return Err(located(path, &text, &e));
    }
    Ok(table)
}

/// A TOML error as file, line, column and message: never the source excerpt that toml's own
/// `Display` prints, and no quoted value.
fn located(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = hide_values(e.message().trim());
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            ConfigError::Located {
                path: path.display().to_string(),
                line,
                column,
                message,
            }
        }
        None => ConfigError::File {
            path: path.display().to_string(),
            message,
        },
    }
}

/// Replaces every double-quoted string in a parser message (serde quotes the offending
/// value: `invalid type: string "…", expected u64`) by `<hidden>`, so no value is echoed.
/// Key names (quoted with backticks) stay.
fn hide_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        out.push_str("<hidden>");
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => {}
            }
        }
    }
    out
}

/// A list given as a TOML array, or (from the environment) as one comma-separated string.
fn list_or_comma_separated<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Many(Vec<String>),
        One(String),
    }
    Ok(match List::deserialize(deserializer)? {
        List::Many(items) => items,
        List::One(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key.to_owned(), value);
    }
}

/// Environment values are strings; numbers and booleans are recognised so they fit typed keys.
fn env_value(value: &str) -> toml::Value {
    if let Ok(i) = value.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(f) = value.parse::<f64>() {
        toml::Value::Float(f)
    } else if let Ok(b) = value.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_file_then_env() {
        let table: toml::Table = "[worker]\nmax_messages_per_poll = 42\n[log]\nformat = \"text\"\n"
            .parse()
            .unwrap();
        let c = Config::from_sources(
            table,
            "test.toml",
            &env(&[
                ("CCMAIL_WORKER_BATCH_MESSAGES", "7"),
                ("DATABASE_URL", "postgres://db/x"),
                (
                    "CCMAIL_MASTER_KEY",
                    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.worker.max_messages_per_poll, 42);
        assert_eq!(c.worker.batch_messages, 7);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.database.url, "postgres://db/x");
        assert_eq!(c.pop3, Pop3Config::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let table: toml::Table = "[worker]\nmax_mesages_per_poll = 1\n".parse().unwrap();
        let e = Config::from_sources(table, "ccmail.toml", &[]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("ccmail.toml") && text.contains("max_mesages_per_poll"),
            "{text}"
        );

        let e = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[("CCMAIL_WORKER_NOPE", "1")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn errors_name_the_variable_that_supplied_the_value() {
        let file: toml::Table = "[worker]\nbatch_messages = 0\n".parse().unwrap();
        let e = Config::from_sources(file, "c.toml", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "setting worker.batch_messages: must be at least 1"
        );
        for (var, value, key) in [
            ("CCMAIL_WORKER_BATCH_MESSAGES", "0", "worker.batch_messages"),
            (
                "CCMAIL_WORKER_BATCH_MESSAGES",
                "Secret-42",
                "worker.batch_messages",
            ),
            (
                "CCMAIL_POP3_CONNECT_TIMEOUT_SECS",
                "0",
                "pop3.connect_timeout_secs",
            ),
            (
                "CCMAIL_WORKER_INITIAL_BACKOFF_SECS",
                "600",
                "worker.initial_backoff_secs",
            ),
            ("CCMAIL_WORKER_NOPE", "1", "worker.nope"),
        ] {
            let file: toml::Table = "[worker]\nmax_messages_per_poll = 3\n".parse().unwrap();
            let env = env(&[("CCMAIL_WORKER_PARSE_AHEAD", "1"), (var, value)]);
            let shown = Config::from_sources(file, "c.toml", &env)
                .unwrap_err()
                .to_string();
            assert!(
                shown.starts_with(&format!("environment variable {var}"))
                    && shown.contains(key)
                    && !shown.contains("Secret-42"),
                "{var}={value}: {shown}"
            );
        }
    }

    #[test]
    fn refused_values_keep_their_cause_as_the_source() {
        let e = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[("CCMAIL_MASTER_KEY", "not-base64!")]),
        )
        .unwrap_err();
        assert!(matches!(
            &e,
            ConfigError::EnvSecret { var, key: None, source: crate::secrets::SecretError::InvalidKey { .. } }
                if var == MASTER_KEY_ENV
        ));
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert!(
            shown.starts_with("environment variable CCMAIL_MASTER_KEY: ")
                && shown.contains("base64")
                && !shown.contains("not-base64!"),
            "{shown}"
        );
    }

    #[test]
    fn invalid_values_are_named() {
        let e = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[("CCMAIL_WORKER_BATCH_MESSAGES", "0")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("worker.batch_messages"), "{e}");
        let e = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[("CCMAIL_HTTP_LISTEN", "nowhere")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("http.listen"), "{e}");
        let e = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[("CCMAIL_CLASSIFY_LOOP_MAX_MESSAGES", "0")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("classify.loop_max_messages"), "{e}");
        let c = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[("CCMAIL_CLASSIFY_LOOP_WINDOW_SECS", "120")]),
        )
        .unwrap();
        assert_eq!(c.classify.loop_window_secs, Duration::from_secs(120));
    }

    #[test]
    fn file_errors_name_line_and_column_and_echo_no_value() {
        let dir = tempfile::tempdir().unwrap();
        for (text, line) in [
            ("[database]\nurl = \"postgres://u:Secret-42@db\n", 2),
            ("[worker]\n\nbatch_messages = \"Secret-42\"\n", 3),
            ("[secrets]\nmaster_key = \"Secret-42\"\n", 2),
        ] {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).unwrap();
            let e = Config::load(Some(&path)).unwrap_err();
            let shown = e.to_string();
            assert!(!shown.contains("Secret-42"), "{shown}");
            assert!(
                matches!(e, ConfigError::Located { line: l, column, .. } if l == line && column > 0),
                "{e:?}"
            );
            assert!(shown.contains("c.toml") && shown.contains(&format!("line {line}")));
        }
        assert_eq!(
            hide_values(r#"invalid type: string "a \"b\" c", expected u64"#),
            "invalid type: string <hidden>, expected u64"
        );
        let e = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[("CCMAIL_WORKER_BATCH_MESSAGES", "Secret-42")]),
        )
        .unwrap_err();
        assert!(!e.to_string().contains("Secret-42"), "{e}");
    }

    #[test]
    fn credential_settings_are_checked_and_lists_come_from_the_environment() {
        let c = Config::from_sources(
            toml::Table::new(),
            "defaults",
            &env(&[
                (
                    "CCMAIL_OAUTH_ALLOWED_AUTHORITIES",
                    "https://127.0.0.1:4431, https://login.microsoftonline.com",
                ),
                ("CCMAIL_SECRETS_DIR", "/etc/ccmail/secrets"),
                ("CCMAIL_SECRETS_ENV_PREFIX", "MAILSECRET_"),
                (
                    "CCMAIL_POP3_DANGEROUS_ALLOW_PLAINTEXT_TO_REMOTE_HOSTS",
                    "true",
                ),
            ]),
        )
        .unwrap();
        let policy = c.credential_policy();
        assert!(policy.check_authority("https://127.0.0.1:4431").is_ok());
        assert!(
            policy
                .check_authority("https://login.microsoftonline.us")
                .is_err()
        );
        assert!(policy.plaintext_to_remote_hosts);
        assert_eq!(
            policy.references.dir.as_deref(),
            Some(Path::new("/etc/ccmail/secrets"))
        );
        // Nothing configured: the Microsoft clouds' authorities.
        assert_eq!(
            Config::default().credential_policy().allowed_authorities(),
            crate::secrets::MICROSOFT_AUTHORITIES.as_slice()
        );

        for (var, value, key) in [
            (
                "CCMAIL_SECRETS_ENV_PREFIX",
                "CCMAIL_SECRET_",
                "secrets.env_prefix",
            ),
            ("CCMAIL_SECRETS_ENV_PREFIX", "PGX_", "secrets.env_prefix"),
            ("CCMAIL_SECRETS_DIR", "/", "secrets.dir"),
            ("CCMAIL_SECRETS_DIR", "/proc/self", "secrets.dir"),
            ("CCMAIL_SECRETS_DIR", "secrets", "secrets.dir"),
            (
                "CCMAIL_OAUTH_ALLOWED_AUTHORITIES",
                "http://login.microsoftonline.com",
                "oauth.allowed_authorities",
            ),
            (
                "CCMAIL_OAUTH_ALLOWED_AUTHORITIES",
                "",
                "oauth.allowed_authorities",
            ),
            ("CCMAIL_HTTP_MAX_CONNECTIONS", "0", "http.max_connections"),
            (
                "CCMAIL_HTTP_GAUGE_REFRESH_SECS",
                "0",
                "http.gauge_refresh_secs",
            ),
        ] {
            let e = Config::from_sources(toml::Table::new(), "defaults", &env(&[(var, value)]))
                .unwrap_err();
            assert!(e.to_string().contains(key), "{var}={value}: {e}");
        }
    }

    #[test]
    fn example_file_is_complete_and_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ccmail.example.toml");
        let table = read_table(&path).unwrap();
        let c = Config::from_sources(table.clone(), "example", &[]).unwrap();
        // The example documents every setting with its default value (optional settings
        // without a default are documented as comments and not serialised).
        assert_eq!(c, Config::default());
        let toml::Value::Table(defaults) = toml::Value::try_from(Config::default()).unwrap() else {
            panic!("settings do not serialise to a table")
        };
        for (section, keys) in defaults {
            let toml::Value::Table(keys) = keys else {
                continue;
            };
            for key in keys.keys() {
                let present = table
                    .get(&section)
                    .and_then(|s| s.as_table())
                    .is_some_and(|s| s.contains_key(key));
                assert!(present, "config/ccmail.example.toml lacks {section}.{key}");
            }
        }
    }
}
