//! OAuth app registrations and mailbox pilots: the configuration admins change at runtime.
//!
//! Invariants: credentials reach this layer already sealed or as references (`env:`, `file:`);
//! the database refuses anything else. A sealed value opens only for the row identity it was
//! sealed for ([`AppRow::credential_owner`], [`PilotRow::credential_owner`]), so writes that
//! move a credential between identities take the value sealed again ([`update_app_resealed`]). A pilot's auth columns always agree with its auth kind
//! (check constraint `pilots_auth_consistent`); `(lower(mailbox), lower(host))` is unique.
//! Every admin-set text that is indexed or shown has a [`TextLimit`] (length, no control
//! characters), checked here with a clear message and by the schema's `*_limits` constraints.
//! Status writes from pollers (`record_poll_*`) do not bump `updated_at` and do not fire the
//! configuration NOTIFY; the error text they store is escaped and capped, since it may quote a
//! server.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::error::{StoreError, db_error, map_check, sqlstate};
use crate::secrets::{MasterKey, Owner, SealedForm, SecretError, SecretRef, describe_stored};
use secrecy::SecretString;

/// Entra ID authority of the global cloud.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The scope of an app-only token for Exchange Online POP.
pub const DEFAULT_SCOPE: &str = "https://outlook.office365.com/.default";
/// Exchange Online's POP3S host.
pub const DEFAULT_HOST: &str = "outlook.office365.com";
/// POP3 over implicit TLS (RFC 8314).
pub const DEFAULT_PORT: u16 = 995;
/// How often a mailbox is polled unless configured otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// Largest message downloaded in full (50 MiB); larger ones are stored as headers only.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 50 * 1024 * 1024;

/// A limit on an admin-set text: at most `max_chars` characters, none of them a control
/// character or a bidirectional override ([`crate::display::is_unsafe`]). The schema holds the
/// same numbers in its `<table>_<column>_limits` check constraints (migration 0007), because
/// the database can be written without ccmail, and a btree index refuses rows over about
/// 2,700 bytes, so one over-long value would break every insert that touches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimit {
    /// The field as an admin knows it (`queue`, `app name`, `CA bundle path`).
    pub field: &'static str,
    pub max_chars: usize,
}

impl TextLimit {
    /// Why `value` is over the limit, in words (never quoting the value: it may be 10 KB).
    pub fn check(&self, value: &str) -> Result<(), String> {
        let chars = value.chars().count();
        if chars > self.max_chars {
            return Err(format!(
                "it is {chars} characters long; at most {} are allowed",
                self.max_chars
            ));
        }
        if let Some((at, c)) = value
            .chars()
            .enumerate()
            .find(|(_, c)| crate::display::is_unsafe(*c))
        {
            return Err(format!(
                "it contains a control character (U+{:04X}) at character {}; use printable \
                 characters only",
                u32::from(c),
                at + 1
            ));
        }
        Ok(())
    }

    fn enforce(&self, value: &str) -> Result<(), StoreError> {
        self.check(value)
            .map_err(|reason| StoreError::InvalidInput {
                field: self.field,
                reason,
            })
    }
}

/// The limits of every admin-set text (see [`TextLimit`]).
pub mod limits {
    use super::TextLimit;

    /// Queue names are routing keys and metric labels.
    pub const QUEUE: TextLimit = TextLimit {
        field: "queue",
        max_chars: 100,
    };
    /// RFC 5321: 64 octets of local part, `@`, 255 of domain.
    pub const MAILBOX: TextLimit = TextLimit {
        field: "mailbox",
        max_chars: 320,
    };
    /// The longest DNS name.
    pub const HOST: TextLimit = TextLimit {
        field: "host",
        max_chars: 253,
    };
    pub const USERNAME: TextLimit = TextLimit {
        field: "username",
        max_chars: 320,
    };
    /// Linux's PATH_MAX.
    pub const CA_BUNDLE: TextLimit = TextLimit {
        field: "CA bundle path",
        max_chars: 4096,
    };
    pub const APP_NAME: TextLimit = TextLimit {
        field: "app name",
        max_chars: 100,
    };
    /// A GUID, or a domain name.
    pub const TENANT: TextLimit = TextLimit {
        field: "tenant",
        max_chars: 253,
    };
    /// Entra's client ids are GUIDs (36 characters).
    pub const CLIENT_ID: TextLimit = TextLimit {
        field: "client id",
        max_chars: 100,
    };
    pub const AUTHORITY: TextLimit = TextLimit {
        field: "authority",
        max_chars: 200,
    };
    pub const SCOPE: TextLimit = TextLimit {
        field: "scope",
        max_chars: 200,
    };
}

macro_rules! app_columns {
    () => {
        "id, name, tenant, client_id, authority, scope, credential, secret_expires_at, \
         certificate_pem, assertion_alg, created_at, updated_at"
    };
}

macro_rules! pilot_columns {
    () => {
        "id, queue, mailbox, host, port, tls, auth, app_id, username, password_credential, \
         ca_bundle, poll_interval_secs, keep_on_server, max_message_bytes, enabled, \
         last_success_at, last_error, last_error_hint, last_error_at, created_at, updated_at"
    };
}

/// A new OAuth app registration (one Entra ID application in one tenant).
#[derive(Clone)]
pub struct NewApp {
    /// Unique human handle, used by the CLI (`--app support-app`).
    pub name: String,
    /// Tenant GUID or verified domain (never `common` for client credentials).
    pub tenant: String,
    /// Application (client) id.
    pub client_id: String,
    /// Token authority, e.g. [`DEFAULT_AUTHORITY`].
    pub authority: String,
    /// Token scope, e.g. [`DEFAULT_SCOPE`].
    pub scope: String,
    /// The client secret, already sealed (`enc:v2:…`, for [`NewApp::credential_owner`]) or a
    /// reference (`env:`/`file:`).
    pub credential: String,
    /// When the client secret expires (Entra shows it; at most 24 months), for alerting.
    pub secret_expires_at: Option<DateTime<Utc>>,
    /// For a certificate credential: the PEM certificate (then `credential` is its private
    /// key) and the assertion algorithm (`RS256` or `PS256`).
    pub certificate: Option<StoredCertificate>,
}

/// The public half of a certificate credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCertificate {
    /// The certificate uploaded to the app registration, PEM.
    pub pem: String,
    /// `RS256` or `PS256`.
    pub alg: String,
}

impl NewApp {
    /// An app in the global cloud with the Exchange Online scope.
    pub fn new(name: &str, tenant: &str, client_id: &str, credential: String) -> NewApp {
        NewApp {
            name: name.to_owned(),
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            authority: DEFAULT_AUTHORITY.to_owned(),
            scope: DEFAULT_SCOPE.to_owned(),
            credential,
            secret_expires_at: None,
            certificate: None,
        }
    }
}

impl NewApp {
    /// The owner this app's credential is sealed for: its authority, tenant, client id and
    /// credential kind.
    pub fn credential_owner(&self) -> Owner {
        Owner::app(
            &self.authority,
            &self.tenant,
            &self.client_id,
            self.certificate.is_some(),
        )
    }

    /// Seals `secret` with `key` as this app's credential. Call it once authority, tenant,
    /// client id and certificate are set: the sealed value opens only for those.
    pub fn seal_credential(
        &mut self,
        key: &MasterKey,
        secret: &SecretString,
    ) -> Result<(), SecretError> {
        self.credential = key.seal(secret, &self.credential_owner())?;
        Ok(())
    }
}

impl fmt::Debug for NewApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewApp")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("client_id", &self.client_id)
            .field("authority", &self.authority)
            .field("scope", &self.scope)
            .field("credential", &describe_stored(&self.credential))
            .field("secret_expires_at", &self.secret_expires_at)
            .finish()
    }
}

/// A stored OAuth app registration.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AppRow {
    pub id: i64,
    pub name: String,
    pub tenant: String,
    pub client_id: String,
    pub authority: String,
    pub scope: String,
    /// Sealed or a reference; resolve with [`crate::secrets::resolve`].
    pub credential: String,
    pub secret_expires_at: Option<DateTime<Utc>>,
    /// Set for a certificate credential (then `credential` holds the private key).
    pub certificate_pem: Option<String>,
    /// `RS256` or `PS256` for a certificate credential.
    pub assertion_alg: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl AppRow {
    /// The certificate credential's public half, if the app uses one.
    pub fn certificate(&self) -> Option<StoredCertificate> {
        match (&self.certificate_pem, &self.assertion_alg) {
            (Some(pem), Some(alg)) => Some(StoredCertificate {
                pem: pem.clone(),
                alg: alg.clone(),
            }),
            _ => None,
        }
    }
}

impl AppRow {
    /// The owner this app's credential must be sealed for (see [`NewApp::credential_owner`]).
    pub fn credential_owner(&self) -> Owner {
        Owner::app(
            &self.authority,
            &self.tenant,
            &self.client_id,
            self.certificate().is_some(),
        )
    }

    /// The token-cache key of this app: pilots of apps with equal keys share one token.
    pub fn token_key(&self) -> crate::oauth::AppKey {
        crate::oauth::AppKey {
            authority: self.authority.clone(),
            tenant: self.tenant.clone(),
            client_id: self.client_id.clone(),
            scope: self.scope.clone(),
        }
    }
}

impl fmt::Debug for AppRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("client_id", &self.client_id)
            .field("authority", &self.authority)
            .field("scope", &self.scope)
            .field("credential", &describe_stored(&self.credential))
            .field("secret_expires_at", &self.secret_expires_at)
            .field("assertion_alg", &self.assertion_alg)
            .finish_non_exhaustive()
    }
}

pub use crate::pop3::TlsMode;

/// How a pilot logs in.
#[derive(Clone, PartialEq, Eq)]
pub enum PilotAuth {
    /// SASL XOAUTH2 with an app-only token of the given OAuth app.
    XOAuth2 { app_id: i64 },
    /// `USER`/`PASS` (servers other than Exchange Online); the password is sealed or a reference.
    UserPass {
        username: String,
        credential: String,
    },
}

impl fmt::Debug for PilotAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PilotAuth::XOAuth2 { app_id } => {
                f.debug_struct("XOAuth2").field("app_id", app_id).finish()
            }
            PilotAuth::UserPass {
                username,
                credential,
            } => f
                .debug_struct("UserPass")
                .field("username", username)
                .field("credential", &describe_stored(credential))
                .finish(),
        }
    }
}

/// A new mailbox pilot.
#[derive(Debug, Clone)]
pub struct NewPilot {
    /// Contact-center queue the work items go to.
    pub queue: String,
    /// Mailbox address; also the XOAUTH2 `user=`.
    pub mailbox: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub auth: PilotAuth,
    /// Path of an extra PEM CA bundle to trust for this server.
    pub ca_bundle: Option<String>,
    /// Whole seconds, at least one.
    pub poll_interval: Duration,
    /// Leave messages on the server after storing them (no `DELE`).
    pub keep_on_server: bool,
    pub max_message_bytes: u64,
    pub enabled: bool,
}

impl NewPilot {
    /// An enabled Exchange Online pilot with the documented defaults.
    pub fn new(queue: &str, mailbox: &str, auth: PilotAuth) -> NewPilot {
        NewPilot {
            queue: queue.to_owned(),
            mailbox: mailbox.to_owned(),
            host: DEFAULT_HOST.to_owned(),
            port: DEFAULT_PORT,
            tls: TlsMode::Implicit,
            auth,
            ca_bundle: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            keep_on_server: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            enabled: true,
        }
    }
}

impl NewPilot {
    /// For a USER/PASS pilot, the owner its password is sealed for: host, port, TLS mode and
    /// username. `None` for XOAUTH2 (the app holds the credential).
    pub fn credential_owner(&self) -> Option<Owner> {
        password_owner(&self.host, self.port, self.tls, &self.auth)
    }
}

fn password_owner(host: &str, port: u16, tls: TlsMode, auth: &PilotAuth) -> Option<Owner> {
    match auth {
        PilotAuth::UserPass { username, .. } => Some(Owner::pilot(host, port, tls, username)),
        PilotAuth::XOAuth2 { .. } => None,
    }
}

/// A stored mailbox pilot with its last poll outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PilotRow {
    pub id: i64,
    pub queue: String,
    pub mailbox: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub auth: PilotAuth,
    pub ca_bundle: Option<String>,
    pub poll_interval: Duration,
    pub keep_on_server: bool,
    pub max_message_bytes: u64,
    pub enabled: bool,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_hint: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl PilotRow {
    /// See [`NewPilot::credential_owner`].
    pub fn credential_owner(&self) -> Option<Owner> {
        password_owner(&self.host, self.port, self.tls, &self.auth)
    }
}

/// The row as PostgreSQL returns it, before the typed conversion.
#[derive(sqlx::FromRow)]
struct PilotRecord {
    id: i64,
    queue: String,
    mailbox: String,
    host: String,
    port: i32,
    tls: String,
    auth: String,
    app_id: Option<i64>,
    username: Option<String>,
    password_credential: Option<String>,
    ca_bundle: Option<String>,
    poll_interval_secs: i32,
    keep_on_server: bool,
    max_message_bytes: i64,
    enabled: bool,
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_error_hint: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<PilotRecord> for PilotRow {
    type Error = StoreError;

    fn try_from(r: PilotRecord) -> Result<PilotRow, StoreError> {
        let unexpected =
            |column: &'static str, value: String| StoreError::UnexpectedValue { column, value };
        let auth = match (r.auth.as_str(), r.app_id, r.username, r.password_credential) {
            ("xoauth2", Some(app_id), None, None) => PilotAuth::XOAuth2 { app_id },
            ("user_pass", None, Some(username), Some(credential)) => PilotAuth::UserPass {
                username,
                credential,
            },
            (kind, ..) => return Err(unexpected("pilots.auth", kind.to_owned())),
        };
        Ok(PilotRow {
            id: r.id,
            port: u16::try_from(r.port)
                .map_err(|_| unexpected("pilots.port", r.port.to_string()))?,
            tls: TlsMode::parse(&r.tls).ok_or_else(|| unexpected("pilots.tls", r.tls.clone()))?,
            auth,
            poll_interval: u64::try_from(r.poll_interval_secs)
                .map(Duration::from_secs)
                .map_err(|_| {
                    unexpected(
                        "pilots.poll_interval_secs",
                        r.poll_interval_secs.to_string(),
                    )
                })?,
            max_message_bytes: u64::try_from(r.max_message_bytes).map_err(|_| {
                unexpected("pilots.max_message_bytes", r.max_message_bytes.to_string())
            })?,
            queue: r.queue,
            mailbox: r.mailbox,
            host: r.host,
            ca_bundle: r.ca_bundle,
            keep_on_server: r.keep_on_server,
            enabled: r.enabled,
            last_success_at: r.last_success_at,
            last_error: r.last_error,
            last_error_hint: r.last_error_hint,
            last_error_at: r.last_error_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// Refuses credentials in no recognised form before they reach the database, with the
/// explanation of the three accepted forms (the database refuses them too).
fn check_credential(field: &'static str, stored: &str) -> Result<(), StoreError> {
    let invalid = |err: crate::secrets::SecretError| StoreError::InvalidInput {
        field,
        reason: err.to_string(),
    };
    match SecretRef::parse(stored).map_err(invalid)? {
        // Whatever the settings allow, these names are never a reference (the schema agrees).
        SecretRef::Env(name) if crate::secrets::is_reserved_env(&name) => {
            Err(invalid(crate::secrets::SecretError::EnvReserved { name }))
        }
        _ => Ok(()),
    }
}

/// Stores a new OAuth app. A taken name, or an app with the same authority, tenant, client id
/// and scope, gives [`StoreError::Duplicate`] naming the field.
pub async fn insert_app(conn: &mut PgConnection, app: &NewApp) -> Result<AppRow, StoreError> {
    check_app_texts(app)?;
    check_credential("credential", &app.credential)?;
    sqlx::query_as(concat!(
        "insert into oauth_apps (name, tenant, client_id, authority, scope, credential, \
         secret_expires_at, certificate_pem, assertion_alg) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning ",
        app_columns!()
    ))
    .bind(&app.name)
    .bind(&app.tenant)
    .bind(&app.client_id)
    .bind(&app.authority)
    .bind(&app.scope)
    .bind(&app.credential)
    .bind(app.secret_expires_at)
    .bind(app.certificate.as_ref().map(|c| c.pem.as_str()))
    .bind(app.certificate.as_ref().map(|c| c.alg.as_str()))
    .fetch_one(conn)
    .await
    .map_err(|err| app_write_error(err, app))
}

fn check_app_texts(app: &NewApp) -> Result<(), StoreError> {
    limits::APP_NAME.enforce(&app.name)?;
    limits::TENANT.enforce(&app.tenant)?;
    limits::CLIENT_ID.enforce(&app.client_id)?;
    limits::AUTHORITY.enforce(&app.authority)?;
    limits::SCOPE.enforce(&app.scope)
}

/// Maps a failed insert or update of an app to the error naming the clashing field.
fn app_write_error(err: sqlx::Error, app: &NewApp) -> StoreError {
    if let Some((db, code)) = db_error(&err)
        && code == sqlstate::UNIQUE_VIOLATION
    {
        match db.constraint() {
            Some("oauth_apps_name_key") => {
                return StoreError::Duplicate {
                    entity: "OAuth app",
                    field: "name",
                    value: format!("{:?}", app.name),
                };
            }
            Some("oauth_apps_identity_key") => {
                return StoreError::Duplicate {
                    entity: "OAuth app",
                    field: "authority, tenant, client id and scope",
                    value: format!(
                        "{} / {} / {} / {}",
                        app.authority, app.tenant, app.client_id, app.scope
                    ),
                };
            }
            _ => {}
        }
    }
    map_check(err, "OAuth app")
}

/// Changes an app's identity fields (name, tenant, client id, authority, scope, expiry) to
/// those of `app`; the credential columns are left alone (see [`set_app_credential`] and
/// [`set_app_certificate`], and [`update_app_resealed`] when a bound field changes). Returns
/// the updated row; running workers restart its pilots.
pub async fn update_app(
    conn: &mut PgConnection,
    id: i64,
    app: &NewApp,
) -> Result<AppRow, StoreError> {
    write_app(conn, id, app, None).await
}

/// As [`update_app`], and replaces the credential by `app.credential`: the same secret sealed
/// again for the changed authority, tenant or client id. Guarded on the row still holding
/// `expected` (what was sealed again), so a secret rotated meanwhile is never overwritten by
/// the old one.
pub async fn update_app_resealed(
    conn: &mut PgConnection,
    id: i64,
    app: &NewApp,
    expected: &str,
) -> Result<AppRow, StoreError> {
    check_credential("credential", &app.credential)?;
    write_app(conn, id, app, Some(expected)).await
}

async fn write_app(
    conn: &mut PgConnection,
    id: i64,
    app: &NewApp,
    expected: Option<&str>,
) -> Result<AppRow, StoreError> {
    check_app_texts(app)?;
    let row: Option<AppRow> = sqlx::query_as(concat!(
        "update oauth_apps set name = $2, tenant = $3, client_id = $4, authority = $5, \
         scope = $6, secret_expires_at = $7, \
         credential = case when $8::text is null then credential else $9 end, \
         updated_at = now() where id = $1 and ($8::text is null or credential = $8) returning ",
        app_columns!()
    ))
    .bind(id)
    .bind(&app.name)
    .bind(&app.tenant)
    .bind(&app.client_id)
    .bind(&app.authority)
    .bind(&app.scope)
    .bind(app.secret_expires_at)
    .bind(expected)
    .bind(&app.credential)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|err| app_write_error(err, app))?;
    if let Some(row) = row {
        return Ok(row);
    }
    let exists: bool = sqlx::query_scalar("select exists (select 1 from oauth_apps where id = $1)")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    if exists {
        return Err(StoreError::InvalidInput {
            field: "credential",
            reason: format!(
                "the credential of OAuth app id {id} changed while it was being sealed again; \
                 run the command again"
            ),
        });
    }
    Err(StoreError::NotFound {
        entity: "OAuth app",
        key: format!("id {id}"),
    })
}

/// Replaces an app's credential with a certificate credential: `private_key` (sealed or a
/// reference), the PEM certificate and the assertion algorithm, with the certificate's expiry.
pub async fn set_app_certificate(
    conn: &mut PgConnection,
    id: i64,
    private_key: &str,
    certificate: &StoredCertificate,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    check_credential("private key", private_key)?;
    let done = sqlx::query(
        "update oauth_apps set credential = $2, certificate_pem = $3, assertion_alg = $4, \
         secret_expires_at = $5, updated_at = now() where id = $1",
    )
    .bind(id)
    .bind(private_key)
    .bind(&certificate.pem)
    .bind(&certificate.alg)
    .bind(expires_at)
    .execute(conn)
    .await
    .map_err(|err| map_check(err, "OAuth app"))?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound {
            entity: "OAuth app",
            key: format!("id {id}"),
        });
    }
    Ok(())
}

/// Removes an app. Refused with [`StoreError::InUse`] while pilots log in with it.
pub async fn delete_app(conn: &mut PgConnection, id: i64) -> Result<(), StoreError> {
    let done = sqlx::query("delete from oauth_apps where id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await;
    match done {
        Ok(done) if done.rows_affected() == 0 => Err(StoreError::NotFound {
            entity: "OAuth app",
            key: format!("id {id}"),
        }),
        Ok(_) => Ok(()),
        Err(err) => match db_error(&err) {
            Some((_, code)) if code == sqlstate::FOREIGN_KEY_VIOLATION => {
                let users: Vec<String> =
                    sqlx::query_scalar("select mailbox from pilots where app_id = $1 order by id")
                        .bind(id)
                        .fetch_all(&mut *conn)
                        .await?;
                Err(StoreError::InUse {
                    entity: "OAuth app",
                    key: format!("id {id}"),
                    detail: format!(
                        "pilots {} log in with it; remove them or point them at another app first",
                        users.join(", ")
                    ),
                })
            }
            _ => Err(StoreError::Database(err)),
        },
    }
}

/// All OAuth apps, by name.
pub async fn list_apps(conn: &mut PgConnection) -> Result<Vec<AppRow>, StoreError> {
    Ok(sqlx::query_as(concat!(
        "select ",
        app_columns!(),
        " from oauth_apps order by name"
    ))
    .fetch_all(conn)
    .await?)
}

/// The OAuth app with this id, or [`StoreError::NotFound`].
pub async fn get_app(conn: &mut PgConnection, id: i64) -> Result<AppRow, StoreError> {
    sqlx::query_as(concat!(
        "select ",
        app_columns!(),
        " from oauth_apps where id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        entity: "OAuth app",
        key: format!("id {id}"),
    })
}

/// The OAuth app with this name, or [`StoreError::NotFound`].
pub async fn get_app_by_name(conn: &mut PgConnection, name: &str) -> Result<AppRow, StoreError> {
    sqlx::query_as(concat!(
        "select ",
        app_columns!(),
        " from oauth_apps where name = $1"
    ))
    .bind(name)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        entity: "OAuth app",
        key: format!("named {name:?}"),
    })
}

/// Replaces an app's credential (a new client secret, or a re-seal under a new master key)
/// and its expiry.
pub async fn set_app_credential(
    conn: &mut PgConnection,
    id: i64,
    credential: &str,
    secret_expires_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    check_credential("credential", credential)?;
    // Back to a client secret: a certificate credential's public half goes with it.
    let done = sqlx::query(
        "update oauth_apps set credential = $2, secret_expires_at = $3, certificate_pem = null, \
         assertion_alg = null, updated_at = now() where id = $1",
    )
    .bind(id)
    .bind(credential)
    .bind(secret_expires_at)
    .execute(conn)
    .await
    .map_err(|err| map_check(err, "OAuth app"))?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound {
            entity: "OAuth app",
            key: format!("id {id}"),
        });
    }
    Ok(())
}

/// Where a stored credential lives: an OAuth app or a USER/PASS pilot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CredentialHolder {
    App { id: i64, name: String },
    Pilot { id: i64 },
}

impl fmt::Display for CredentialHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialHolder::App { id, name } => write!(f, "app {name} (id {id})"),
            CredentialHolder::Pilot { id } => write!(f, "pilot {id}"),
        }
    }
}

/// One stored credential with its row's identity.
struct HeldCredential {
    holder: CredentialHolder,
    owner: Owner,
    stored: String,
}

/// Every stored credential (app secrets and private keys, pilot passwords), apps first, each
/// in id order.
async fn held_credentials(conn: &mut PgConnection) -> Result<Vec<HeldCredential>, StoreError> {
    let apps: Vec<AppRow> = sqlx::query_as(concat!(
        "select ",
        app_columns!(),
        " from oauth_apps order by id"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let mut held: Vec<HeldCredential> = apps
        .into_iter()
        .map(|app| HeldCredential {
            owner: app.credential_owner(),
            holder: CredentialHolder::App {
                id: app.id,
                name: app.name,
            },
            stored: app.credential,
        })
        .collect();
    for pilot in list_pilots(&mut *conn).await? {
        if let (Some(owner), PilotAuth::UserPass { credential, .. }) =
            (pilot.credential_owner(), &pilot.auth)
        {
            held.push(HeldCredential {
                holder: CredentialHolder::Pilot { id: pilot.id },
                owner,
                stored: credential.clone(),
            });
        }
    }
    Ok(held)
}

/// Groups of rows that hold the very same `enc:v1` text. Every seal draws a fresh nonce, so
/// two rows with one value mean all but one are copies; which one is the original cannot be
/// told, so none of them may be bound to its row.
fn shared_unbound(held: &[HeldCredential]) -> Vec<Vec<CredentialHolder>> {
    let mut by_value: std::collections::BTreeMap<&str, Vec<CredentialHolder>> =
        std::collections::BTreeMap::new();
    for h in held {
        if matches!(
            SecretRef::parse(&h.stored),
            Ok(SecretRef::Sealed {
                form: SealedForm::V1,
                ..
            })
        ) {
            by_value
                .entry(&h.stored)
                .or_default()
                .push(h.holder.clone());
        }
    }
    by_value.into_values().filter(|g| g.len() > 1).collect()
}

/// Replaces `old` by `fresh` in the credential column of `holder`, if it still holds `old`;
/// whether it did. `touch` bumps `updated_at` (a change admins made, such as a key rotation).
async fn replace_credential(
    conn: &mut PgConnection,
    holder: &CredentialHolder,
    old: &str,
    fresh: &str,
    touch: bool,
) -> Result<bool, StoreError> {
    check_credential("credential", fresh)?;
    let statement = match (holder, touch) {
        (CredentialHolder::App { .. }, true) => {
            "update oauth_apps set credential = $2, updated_at = now() \
             where id = $1 and credential = $3"
        }
        (CredentialHolder::App { .. }, false) => {
            "update oauth_apps set credential = $2 where id = $1 and credential = $3"
        }
        (CredentialHolder::Pilot { .. }, true) => {
            "update pilots set password_credential = $2, updated_at = now() \
             where id = $1 and password_credential = $3"
        }
        (CredentialHolder::Pilot { .. }, false) => {
            "update pilots set password_credential = $2 where id = $1 and password_credential = $3"
        }
    };
    let id = match holder {
        CredentialHolder::App { id, .. } | CredentialHolder::Pilot { id } => *id,
    };
    let done = sqlx::query(statement)
        .bind(id)
        .bind(fresh)
        .bind(old)
        .execute(&mut *conn)
        .await
        .map_err(|err| map_check(err, "credential"))?;
    Ok(done.rows_affected() == 1)
}

/// Rewrites every stored credential (app secrets and private keys, pilot passwords) through
/// `reseal`, which gets the owner the value must belong to, for master-key rotation.
/// References (`env:`, `file:`) pass through unchanged when `reseal` returns them as they are.
/// An `enc:v1` value held by several rows is refused (all but one are copies: store the secret
/// again for each). Call it inside a transaction so a failure changes nothing. Returns how many
/// credentials changed.
pub async fn reseal_credentials(
    conn: &mut PgConnection,
    mut reseal: impl FnMut(&Owner, &str) -> Result<String, String>,
) -> Result<u64, StoreError> {
    let held = held_credentials(conn).await?;
    if let Some(group) = shared_unbound(&held).first() {
        return Err(StoreError::InvalidInput {
            field: "credential",
            reason: format!(
                "{} hold the very same sealed value, so all but one are copies; store the \
                 secret again for each of them (`ccmail app rotate-secret`, `ccmail pilot \
                 update ID --secret-stdin`), then rotate",
                join_holders(group)
            ),
        });
    }
    let mut changed = 0;
    for h in held {
        let fresh = reseal(&h.owner, &h.stored).map_err(|reason| StoreError::InvalidInput {
            field: "credential",
            reason: format!("{}: {reason}", h.holder),
        })?;
        if fresh == h.stored {
            continue;
        }
        // Guarded on the old value: a concurrent change makes this rotation fail loudly.
        if !replace_credential(conn, &h.holder, &h.stored, &fresh, true).await? {
            return Err(StoreError::InvalidInput {
                field: "credential",
                reason: format!("{} changed during the rotation; run it again", h.holder),
            });
        }
        changed += 1;
    }
    Ok(changed)
}

fn join_holders(group: &[CredentialHolder]) -> String {
    group
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`upgrade_unbound_credentials`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnboundUpgrade {
    /// Values sealed again as `enc:v2` for the row they are in.
    pub upgraded: u64,
    /// Rows holding the very same `enc:v1` value: none of them was upgraded.
    pub shared: Vec<Vec<CredentialHolder>>,
    /// Values `upgrade` could not seal again, with why (a key id, never a secret).
    pub failed: Vec<(CredentialHolder, String)>,
    /// Values that changed between reading and writing (upgraded by another worker, or
    /// stored again by an admin): left to the next pass.
    pub raced: u64,
}

/// Seals every `enc:v1` credential again as `enc:v2` bound to the row it is in, through
/// `upgrade` (which gets the row's owner and the stored value and returns the new value, or
/// `None` to leave it). Each write is guarded on the row still holding that exact value, and
/// does not bump `updated_at` (the configuration did not change). Values held by several rows
/// are copies and are left alone, as are values `upgrade` fails on; both are reported.
pub async fn upgrade_unbound_credentials(
    conn: &mut PgConnection,
    mut upgrade: impl FnMut(&Owner, &str) -> Result<Option<String>, String>,
) -> Result<UnboundUpgrade, StoreError> {
    let held = held_credentials(conn).await?;
    let mut report = UnboundUpgrade {
        shared: shared_unbound(&held),
        ..UnboundUpgrade::default()
    };
    for h in held {
        if report.shared.iter().flatten().any(|s| *s == h.holder) {
            continue;
        }
        let fresh = match upgrade(&h.owner, &h.stored) {
            Ok(Some(fresh)) => fresh,
            Ok(None) => continue,
            Err(reason) => {
                report.failed.push((h.holder, reason));
                continue;
            }
        };
        if replace_credential(conn, &h.holder, &h.stored, &fresh, false).await? {
            report.upgraded += 1;
        } else {
            report.raced += 1;
        }
    }
    Ok(report)
}

/// Stores a new pilot. The same mailbox on the same host (case-insensitively) gives
/// [`StoreError::Duplicate`]; an unknown app id gives [`StoreError::NotFound`]; values the
/// schema refuses (port 0, …) give [`StoreError::Constraint`].
pub async fn insert_pilot(
    conn: &mut PgConnection,
    pilot: &NewPilot,
) -> Result<PilotRow, StoreError> {
    let values = PilotValues::of(pilot)?;
    let query = sqlx::query_as(concat!(
        "insert into pilots (queue, mailbox, host, port, tls, auth, app_id, username, \
         password_credential, ca_bundle, poll_interval_secs, keep_on_server, max_message_bytes, \
         enabled) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) returning ",
        pilot_columns!()
    ));
    let record: PilotRecord = bind_pilot(query, pilot, &values)
        .fetch_one(conn)
        .await
        .map_err(|err| pilot_write_error(err, pilot, values.app_id))?;
    record.try_into()
}

/// A [`NewPilot`]'s values in their column types, checked.
struct PilotValues<'a> {
    kind: &'static str,
    app_id: Option<i64>,
    username: Option<&'a str>,
    credential: Option<&'a str>,
    poll_secs: i32,
    max_bytes: i64,
}

impl<'a> PilotValues<'a> {
    fn of(pilot: &'a NewPilot) -> Result<PilotValues<'a>, StoreError> {
        limits::QUEUE.enforce(&pilot.queue)?;
        limits::MAILBOX.enforce(&pilot.mailbox)?;
        limits::HOST.enforce(&pilot.host)?;
        if let Some(path) = &pilot.ca_bundle {
            limits::CA_BUNDLE.enforce(path)?;
        }
        if let PilotAuth::UserPass { username, .. } = &pilot.auth {
            limits::USERNAME.enforce(username)?;
        }
        let poll_secs = i32::try_from(pilot.poll_interval.as_secs())
            .ok()
            .filter(|secs| *secs > 0)
            .ok_or_else(|| StoreError::InvalidInput {
                field: "poll_interval",
                reason: format!(
                    "{:?} must be between 1 second and {} seconds",
                    pilot.poll_interval,
                    i32::MAX
                ),
            })?;
        let max_bytes =
            i64::try_from(pilot.max_message_bytes).map_err(|_| StoreError::InvalidInput {
                field: "max_message_bytes",
                reason: format!("{} is too large", pilot.max_message_bytes),
            })?;
        let (kind, app_id, username, credential) = match &pilot.auth {
            PilotAuth::XOAuth2 { app_id } => ("xoauth2", Some(*app_id), None, None),
            PilotAuth::UserPass {
                username,
                credential,
            } => {
                check_credential("password credential", credential)?;
                (
                    "user_pass",
                    None,
                    Some(username.as_str()),
                    Some(credential.as_str()),
                )
            }
        };
        Ok(PilotValues {
            kind,
            app_id,
            username,
            credential,
            poll_secs,
            max_bytes,
        })
    }
}

type PilotQuery<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, PilotRecord, sqlx::postgres::PgArguments>;

/// Binds a pilot's settings as parameters $1..$14, in the column order of `insert_pilot` and
/// `update_pilot`.
fn bind_pilot<'q>(
    query: PilotQuery<'q>,
    pilot: &'q NewPilot,
    values: &PilotValues<'q>,
) -> PilotQuery<'q> {
    query
        .bind(&pilot.queue)
        .bind(&pilot.mailbox)
        .bind(&pilot.host)
        .bind(i32::from(pilot.port))
        .bind(pilot.tls.as_str())
        .bind(values.kind)
        .bind(values.app_id)
        .bind(values.username)
        .bind(values.credential)
        .bind(&pilot.ca_bundle)
        .bind(values.poll_secs)
        .bind(pilot.keep_on_server)
        .bind(values.max_bytes)
        .bind(pilot.enabled)
}

/// Maps a failed insert or update of a pilot to the error naming the clashing field.
fn pilot_write_error(err: sqlx::Error, pilot: &NewPilot, app_id: Option<i64>) -> StoreError {
    if let Some((db, code)) = db_error(&err) {
        if code == sqlstate::UNIQUE_VIOLATION && db.constraint() == Some("pilots_mailbox_host_key")
        {
            return StoreError::Duplicate {
                entity: "pilot",
                field: "mailbox and host",
                value: format!("{} on {}", pilot.mailbox, pilot.host),
            };
        }
        if code == sqlstate::FOREIGN_KEY_VIOLATION {
            return StoreError::NotFound {
                entity: "OAuth app",
                key: format!("id {}", app_id.unwrap_or_default()),
            };
        }
    }
    map_check(err, "pilot")
}

/// Changes every configurable field of pilot `id` to those of `pilot` (`enabled` included).
/// The same errors as [`insert_pilot`], plus [`StoreError::NotFound`] for an unknown id.
/// Running workers restart the pilot's poller with the new settings.
///
/// `read_password` is the password credential the caller read before building `pilot` (or
/// `None` for an XOAUTH2 pilot): the update applies only if the row still holds it, so a
/// password rotated or re-sealed meanwhile (by `ccmail key rotate`, a worker's upgrade of an
/// old sealed form, another admin) is never overwritten with the stale one.
pub async fn update_pilot(
    conn: &mut PgConnection,
    id: i64,
    pilot: &NewPilot,
    read_password: Option<&str>,
) -> Result<PilotRow, StoreError> {
    let values = PilotValues::of(pilot)?;
    let query = sqlx::query_as(concat!(
        "update pilots set queue = $1, mailbox = $2, host = $3, port = $4, tls = $5, auth = $6, \
         app_id = $7, username = $8, password_credential = $9, ca_bundle = $10, \
         poll_interval_secs = $11, keep_on_server = $12, max_message_bytes = $13, enabled = $14, \
         updated_at = now() where id = $15 and password_credential is not distinct from $16 \
         returning ",
        pilot_columns!()
    ));
    let record: Option<PilotRecord> = bind_pilot(query, pilot, &values)
        .bind(id)
        .bind(read_password)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|err| pilot_write_error(err, pilot, values.app_id))?;
    if let Some(record) = record {
        return record.try_into();
    }
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pilots where id = $1)")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    Err(if exists {
        StoreError::InvalidInput {
            field: "password",
            reason: format!(
                "the password credential of pilot {id} changed while it was being updated \
                 (a key rotation or another admin); run the command again"
            ),
        }
    } else {
        StoreError::NotFound {
            entity: "pilot",
            key: format!("id {id}"),
        }
    })
}

/// Removes a pilot that has no stored messages. A pilot with stored mail is refused with
/// [`StoreError::InUse`]: its messages and work items must stay; disable it instead.
pub async fn delete_pilot(conn: &mut PgConnection, id: i64) -> Result<(), StoreError> {
    let done = sqlx::query("delete from pilots where id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await;
    match done {
        Ok(done) => pilot_touched(done.rows_affected(), id),
        Err(err) => match db_error(&err) {
            Some((_, code)) if code == sqlstate::FOREIGN_KEY_VIOLATION => {
                let messages: i64 =
                    sqlx::query_scalar("select count(*) from messages where pilot_id = $1")
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await?;
                Err(StoreError::InUse {
                    entity: "pilot",
                    key: format!("id {id}"),
                    detail: format!(
                        "{messages} stored messages (and their work items) belong to it; \
                         disable it with `ccmail pilot disable {id}` instead"
                    ),
                })
            }
            _ => Err(StoreError::Database(err)),
        },
    }
}

/// Pilots whose mailbox is `mailbox` (case-insensitive; one per host), by id.
pub async fn find_pilots_by_mailbox(
    conn: &mut PgConnection,
    mailbox: &str,
) -> Result<Vec<PilotRow>, StoreError> {
    let records: Vec<PilotRecord> = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots where lower(mailbox) = lower($1) order by id"
    ))
    .bind(mailbox)
    .fetch_all(conn)
    .await?;
    records.into_iter().map(PilotRow::try_from).collect()
}

/// All pilots, by id.
pub async fn list_pilots(conn: &mut PgConnection) -> Result<Vec<PilotRow>, StoreError> {
    let records: Vec<PilotRecord> = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots order by id"
    ))
    .fetch_all(conn)
    .await?;
    records.into_iter().map(PilotRow::try_from).collect()
}

/// The pilot with this id, or [`StoreError::NotFound`].
pub async fn get_pilot(conn: &mut PgConnection, id: i64) -> Result<PilotRow, StoreError> {
    let record: PilotRecord = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots where id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        entity: "pilot",
        key: format!("id {id}"),
    })?;
    record.try_into()
}

/// Every enabled pilot, by id, with the OAuth app it logs in with (`None` for `user_pass`).
/// What the supervisor reads to decide which pollers to run.
pub async fn enabled_pilots_with_apps(
    conn: &mut PgConnection,
) -> Result<Vec<(PilotRow, Option<AppRow>)>, StoreError> {
    let records: Vec<PilotRecord> = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots where enabled order by id"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let pilots = records
        .into_iter()
        .map(PilotRow::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    let app_ids: Vec<i64> = pilots
        .iter()
        .filter_map(|p| match p.auth {
            PilotAuth::XOAuth2 { app_id } => Some(app_id),
            PilotAuth::UserPass { .. } => None,
        })
        .collect();
    let apps: Vec<AppRow> = sqlx::query_as(concat!(
        "select ",
        app_columns!(),
        " from oauth_apps where id = any($1)"
    ))
    .bind(&app_ids)
    .fetch_all(&mut *conn)
    .await?;
    pilots
        .into_iter()
        .map(|pilot| match pilot.auth {
            PilotAuth::XOAuth2 { app_id } => {
                // The foreign key (on delete restrict) keeps the app while a pilot uses it.
                let app = apps
                    .iter()
                    .find(|a| a.id == app_id)
                    .cloned()
                    .ok_or_else(|| StoreError::NotFound {
                        entity: "OAuth app",
                        key: format!("id {app_id} (used by pilot {})", pilot.id),
                    })?;
                Ok((pilot, Some(app)))
            }
            PilotAuth::UserPass { .. } => Ok((pilot, None)),
        })
        .collect()
}

/// Enables or disables a pilot; [`StoreError::NotFound`] if there is no such pilot.
pub async fn set_pilot_enabled(
    conn: &mut PgConnection,
    id: i64,
    enabled: bool,
) -> Result<(), StoreError> {
    let done = sqlx::query("update pilots set enabled = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(enabled)
        .execute(conn)
        .await?;
    pilot_touched(done.rows_affected(), id)
}

fn pilot_touched(rows: u64, id: i64) -> Result<(), StoreError> {
    if rows == 0 {
        return Err(StoreError::NotFound {
            entity: "pilot",
            key: format!("id {id}"),
        });
    }
    Ok(())
}

/// Records a successful poll and clears the last error.
pub async fn record_poll_success(conn: &mut PgConnection, pilot_id: i64) -> Result<(), StoreError> {
    let done = sqlx::query(
        "update pilots set last_success_at = now(), last_error = null, last_error_hint = null, \
         last_error_at = null where id = $1",
    )
    .bind(pilot_id)
    .execute(conn)
    .await?;
    pilot_touched(done.rows_affected(), pilot_id)
}

/// The most characters of a poll error (and of its hint) stored on a pilot.
pub const MAX_ERROR_CHARS: usize = 2000;

/// Records a failed poll: the error (never containing a secret: callers pass redacted text)
/// and an optional hint telling the admin what to fix. `last_success_at` is kept, so "failing
/// since" stays visible. Both are stored escaped ([`crate::display::escape`]) and capped at
/// [`MAX_ERROR_CHARS`]: error text may quote a server, and whatever reads the row later (a
/// terminal, a web page) should not have to trust it.
pub async fn record_poll_error(
    conn: &mut PgConnection,
    pilot_id: i64,
    error: &str,
    hint: Option<&str>,
) -> Result<(), StoreError> {
    let clean = |text: &str| {
        crate::display::truncate(&crate::display::escape(text), MAX_ERROR_CHARS).into_owned()
    };
    let error = clean(error);
    let hint = hint.map(clean);
    let done = sqlx::query(
        "update pilots set last_error = $2, last_error_hint = $3, last_error_at = now() \
         where id = $1",
    )
    .bind(pilot_id)
    .bind(error)
    .bind(hint)
    .execute(conn)
    .await?;
    pilot_touched(done.rows_affected(), pilot_id)
}
