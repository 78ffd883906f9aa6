//! Stored credentials across tables (app secrets and private keys, pilot passwords): the
//! accepted forms, master-key rotation and the upgrade of unbound sealed values.
//!
//! Invariants: a credential is stored sealed or as a reference, never in the clear; every
//! rewrite is guarded on the row still holding the value that was read, so a concurrent
//! rotation is never overwritten; an `enc:v1` value held by several rows is a copy and is
//! never bound to a row.

use std::fmt;

use sqlx::PgConnection;

use super::apps::AppRow;
use super::error::{StoreError, map_check};
use super::pilots::{PilotAuth, list_pilots};
use super::text_limits::check_credential;
use crate::secrets::{Owner, SealedForm, SecretRef};

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
