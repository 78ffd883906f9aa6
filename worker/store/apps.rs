//! The `oauth_apps` table: OAuth app registrations (one Entra ID application in one tenant).
//!
//! Invariants: credentials reach this layer already sealed or as references (`env:`,
//! `file:`); the database refuses anything else. A sealed value opens only for the row
//! identity it was sealed for ([`AppRow::credential_owner`]), so writes that move a credential
//! between identities take the value sealed again ([`update_app_resealed`]). Every admin-set
//! text has a [`TextLimit`]. Writes fire the configuration NOTIFY (a trigger).

use std::fmt;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use sqlx::PgConnection;

use super::error::{StoreError, db_error, map_check, sqlstate};
use super::text_limits::{check_credential, limits};
use crate::model::AssertionAlg;
use crate::secrets::{MasterKey, Owner, SecretError, describe_stored};

pub use crate::model::defaults::{
    DEFAULT_AUTHORITY, DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POLL_INTERVAL,
    DEFAULT_PORT, DEFAULT_SCOPE,
};

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
    /// How the assertion is signed (`assertion_alg`: `RS256` or `PS256`).
    pub alg: AssertionAlg,
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
    pub fn certificate(&self) -> Result<Option<StoredCertificate>, StoreError> {
        match (&self.certificate_pem, &self.assertion_alg) {
            (Some(pem), Some(alg)) => Ok(Some(StoredCertificate {
                pem: pem.clone(),
                alg: AssertionAlg::parse(alg).ok_or_else(|| StoreError::UnexpectedValue {
                    column: "oauth_apps.assertion_alg",
                    value: alg.clone(),
                })?,
            })),
            _ => Ok(None),
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
            self.certificate_pem.is_some() && self.assertion_alg.is_some(),
        )
    }

    /// The token-cache key of this app: pilots of apps with equal keys share one token.
    pub fn token_key(&self) -> crate::model::AppKey {
        crate::model::AppKey {
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
    .bind(certificate.alg.as_str())
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
