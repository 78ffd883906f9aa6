//! A pilot ready to poll, and the one resolver that builds it from its rows.
//!
//! [`resolve`] is the only way from stored rows (or a pilot about to be stored) to a
//! [`Pilot`]: the supervisor runs it before starting a poller and doctor before checking a
//! login, so doctor can never pass a pilot that the poller would build differently.
//!
//! Invariants: texts are checked against the schema's limits (rows written before them),
//! the login's destination is checked against the credential policy before any secret is
//! read (an XOAUTH2 pilot only to an allowed host, so no token is ever requested for it), a
//! sealed secret opens only for the row it was sealed for.
//!
//! It lives in ingest, not in the plain model: building the runtime login and server means
//! loading certificates (oauth) and TLS configurations (pop3), which the model must not
//! import. Doctor (ops) imports it from here, a sibling layer.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rustls::pki_types::CertificateDer;
use secrecy::SecretString;

use crate::oauth::{self, AppCredentials};
use crate::pop3::{ServerSpec, Timeouts};
use crate::secrets::{self, CredentialPolicy, MasterKey};
use crate::store::{self, AppRow, NewPilot, PilotRow};

/// How a pilot logs in, resolved: the one type the poller and doctor both use.
#[derive(Debug, Clone)]
pub enum Login {
    /// SASL XOAUTH2 with an app-only token (Exchange Online).
    XOAuth2 {
        app: AppCredentials,
        /// The app's name in ccmail, if it is stored there (for messages and commands shown).
        name: Option<String>,
        /// When the client secret (or certificate) expires, if known.
        expires_at: Option<DateTime<Utc>>,
    },
    /// USER / PASS (other servers).
    UserPass {
        username: String,
        password: SecretString,
    },
}

/// Everything a poller needs about its pilot, resolved (secrets decrypted, TLS set up).
#[derive(Debug, Clone)]
pub struct Pilot {
    pub id: i64,
    pub queue: String,
    pub mailbox: String,
    pub server: ServerSpec,
    pub auth: Login,
    pub keep_on_server: bool,
    pub max_message_bytes: usize,
    pub poll_interval: Duration,
    /// The pilot's series, labelled with its id and queue.
    pub metrics: crate::telemetry::PilotMetrics,
    /// What the pollers learned about this pilot's server while it runs.
    pub quirks: ServerQuirks,
    /// The lease this replica polls the pilot under (the supervisor's pollers); `None` for a
    /// one-off poll outside the supervisor (doctor, benchmarks, tests of one poll).
    pub lease: Option<crate::ingest::leasing::LeaseGuard>,
}

/// What polls of one pilot learn about its server and remember until the pilot restarts.
#[derive(Debug, Clone, Default)]
pub struct ServerQuirks {
    /// A `LIST` answer broke the connection (endless, over the listing limit): later polls
    /// do without listed sizes (the bounded RETR decides alone what is oversize).
    list_broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ServerQuirks {
    pub fn list_broken(&self) -> bool {
        self.list_broken.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_list_broken(&self) {
        self.list_broken
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a pilot cannot be started. The causes are fields of the message, not error sources,
/// so a report that prints an error with its chain (`{:#}`) names each cause once.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("pilot {pilot} uses XOAUTH2 but its app is missing")]
    MissingApp { pilot: i64 },
    #[error("secret of {what}: {error}")]
    Secret {
        what: String,
        error: secrets::SecretError,
    },
    #[error("credential of {what}: {error}")]
    Refused {
        what: String,
        error: secrets::SecretError,
    },
    #[error("pilot {pilot}: {field} is invalid: {reason}")]
    Invalid {
        pilot: i64,
        field: &'static str,
        reason: String,
    },
    #[error("certificate credential of app {app}: {reason}")]
    Certificate { app: String, reason: String },
    #[error("CA bundle of pilot {pilot}: {error}")]
    CaBundle {
        pilot: i64,
        error: crate::tls::TlsConfigError,
    },
    #[error("pilot {pilot}: {error}")]
    Server {
        pilot: i64,
        error: crate::pop3::Error,
    },
}

impl ResolveError {
    /// [`Retry::Never`](crate::model::retry::Retry::Never) for every variant: a pilot is resolved
    /// from its row, its app's row and the worker's settings, so the supervisor does not try
    /// again until one of the rows changes (its fingerprint) or the worker restarts.
    pub fn retry(&self) -> crate::model::retry::Retry {
        crate::model::retry::Retry::Never
    }

    /// The fix to record on the pilot.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ResolveError::MissingApp { .. } => {
                Some("add the app with `ccmail app add` and point the pilot at it")
            }
            ResolveError::Secret { .. } => Some(
                "set CCMAIL_MASTER_KEY (or secrets.master_key_file) to the key the secret was sealed with, or store the secret again",
            ),
            ResolveError::Refused { .. } => Some(
                "store the secret again (sealed) with `ccmail app rotate-secret` or `ccmail pilot update --secret-stdin`, or change the settings named in the error",
            ),
            ResolveError::Invalid { .. } => {
                Some("correct the value with `ccmail pilot update` or `ccmail app update`")
            }
            ResolveError::Certificate { .. } => Some(
                "store the certificate and its private key again with `ccmail app rotate-secret --certificate PEM --private-key-file PEM`",
            ),
            ResolveError::CaBundle { .. } => {
                Some("point ca_bundle at a readable PEM file, or clear it")
            }
            ResolveError::Server { .. } => None,
        }
    }
}

/// The credential of `owner` resolved under `policy`: its refusals are told apart from broken
/// secrets.
fn resolve_secret(
    stored: &str,
    key: Option<&MasterKey>,
    policy: &CredentialPolicy,
    owner: &secrets::Owner,
    what: impl FnOnce() -> String,
) -> Result<secrecy::SecretString, ResolveError> {
    policy.resolve(stored, key, owner).map_err(|source| {
        if source.is_refusal() {
            ResolveError::Refused {
                what: what(),
                error: source,
            }
        } else {
            ResolveError::Secret {
                what: what(),
                error: source,
            }
        }
    })
}

/// An app's token-request credentials from its row: the client secret, or the certificate
/// and its private key, unsealed with `key`. Refused (before anything is read) when `policy`
/// does not allow the app's authority, when the credential is a reference `policy` does not
/// allow, and when a sealed credential was not sealed for this app as it is now.
pub fn app_credentials(
    app: &AppRow,
    key: Option<&MasterKey>,
    policy: &CredentialPolicy,
) -> Result<AppCredentials, ResolveError> {
    let what = || format!("app {}", app.name);
    policy
        .check_authority(&app.authority)
        .map_err(|source| ResolveError::Refused {
            what: what(),
            error: source,
        })?;
    let secret = resolve_secret(&app.credential, key, policy, &app.credential_owner(), what)?;
    let certificate = app.certificate().map_err(|e| ResolveError::Certificate {
        app: app.name.clone(),
        reason: e.to_string(),
    })?;
    let credential = match certificate {
        None => oauth::Credential::Secret(secret),
        Some(cert) => {
            let loaded = oauth::CertificateCredential::from_pem(&cert.pem, &secret, cert.alg)
                .map_err(|e| ResolveError::Certificate {
                    app: app.name.clone(),
                    reason: e.to_string(),
                })?;
            oauth::Credential::Certificate(Arc::new(loaded))
        }
    };
    Ok(AppCredentials {
        key: app.token_key(),
        credential,
    })
}

/// Builds the runtime pilot from its rows: checks the texts against the schema's limits
/// (rows from before them), checks where the login may go under `policy` (an XOAUTH2 pilot
/// only to an allowed host, before anything about its app is read, so no token is ever
/// requested for it), decrypts or reads the secrets (a sealed one only if it was sealed for
/// this row as it is), loads the CA bundle.
///
/// `id` names the pilot in errors and in the result (0 for a pilot not stored yet, such as
/// the one `ccmail doctor` checks from its flags); `app` is the OAuth app an XOAUTH2 pilot
/// logs in with.
pub fn resolve(
    id: i64,
    row: &NewPilot,
    app: Option<&AppRow>,
    key: Option<&MasterKey>,
    policy: &CredentialPolicy,
    timeouts: Timeouts,
) -> Result<Pilot, ResolveError> {
    let texts = [
        (store::limits::QUEUE, Some(row.queue.as_str())),
        (store::limits::MAILBOX, Some(row.mailbox.as_str())),
        (store::limits::HOST, Some(row.host.as_str())),
        (store::limits::CA_BUNDLE, row.ca_bundle.as_deref()),
    ];
    for (limit, value) in texts {
        if let Some(value) = value {
            limit.check(value).map_err(|reason| ResolveError::Invalid {
                pilot: id,
                field: limit.field,
                reason,
            })?;
        }
    }
    policy
        .check_pop3_host(&row.host, row.tls)
        .map_err(|source| ResolveError::Refused {
            what: format!("pilot {}", id),
            error: source,
        })?;
    let auth = match &row.auth {
        store::PilotAuth::XOAuth2 { .. } => {
            policy
                .check_xoauth2_host(&row.host)
                .map_err(|source| ResolveError::Refused {
                    what: format!("pilot {}", id),
                    error: source,
                })?;
            let app = app.ok_or(ResolveError::MissingApp { pilot: id })?;
            Login::XOAuth2 {
                app: app_credentials(app, key, policy)?,
                name: Some(app.name.clone()),
                expires_at: app.secret_expires_at,
            }
        }
        store::PilotAuth::UserPass {
            username,
            credential,
        } => Login::UserPass {
            username: username.clone(),
            password: resolve_secret(
                credential,
                key,
                policy,
                &secrets::Owner::pilot(&row.host, row.port, row.tls, username),
                || format!("pilot {}", id),
            )?,
        },
    };
    let server = server(id, row, timeouts)?;
    Ok(Pilot {
        id,
        queue: row.queue.clone(),
        mailbox: row.mailbox.clone(),
        server,
        auth,
        keep_on_server: row.keep_on_server,
        max_message_bytes: usize::try_from(row.max_message_bytes).unwrap_or(usize::MAX),
        poll_interval: row.poll_interval,
        metrics: crate::telemetry::global().pilot_metrics(id, &row.queue),
        quirks: ServerQuirks::default(),
        lease: None,
    })
}

/// The pilot's server as the poller connects to it: host, port, TLS mode and the pilot's CA
/// bundle on top of the Mozilla roots. Part of [`resolve`]; on its own for doctor's check of
/// credentials given on the command line.
pub fn server(id: i64, row: &NewPilot, timeouts: Timeouts) -> Result<ServerSpec, ResolveError> {
    let extra_roots: Vec<CertificateDer<'static>> = match &row.ca_bundle {
        Some(path) => {
            crate::tls::read_pem_bundle(std::path::Path::new(path)).map_err(|source| {
                ResolveError::CaBundle {
                    pilot: id,
                    error: source,
                }
            })?
        }
        None => Vec::new(),
    };
    ServerSpec::new(row.host.clone(), row.port, row.tls, &extra_roots, timeouts).map_err(|source| {
        ResolveError::Server {
            pilot: id,
            error: source,
        }
    })
}

/// [`resolve`] for a stored pilot: its row and the app it logs in with.
pub fn resolve_pilot(
    row: &PilotRow,
    app: Option<&AppRow>,
    key: Option<&MasterKey>,
    policy: &CredentialPolicy,
    timeouts: Timeouts,
) -> Result<Pilot, ResolveError> {
    resolve(row.id, &row.settings(), app, key, policy, timeouts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_named_once_when_the_error_is_printed_with_its_chain() {
        let error = ResolveError::Secret {
            what: "pilot 7".to_owned(),
            error: secrets::SecretError::EnvMissing {
                name: "APP_SECRET".to_owned(),
            },
        };
        let cause = secrets::SecretError::EnvMissing {
            name: "APP_SECRET".to_owned(),
        }
        .to_string();
        let chained = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(chained.matches(&cause).count(), 1, "{chained}");
    }
}
