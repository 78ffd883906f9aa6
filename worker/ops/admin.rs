//! What the `app` and `pilot` commands need besides the store: validation with precise
//! messages, the national-cloud presets, and the views printed as tables or JSON.
//!
//! Invariants: nothing here prints or serialises a credential; views show only how a secret
//! is stored (`sealed`, `env:NAME`, `file:PATH`), never its value. Every text an admin sets is
//! checked against its [`store::limits`](crate::store::limits) before it is stored, and every
//! cell of a table or `key: value` view is escaped ([`crate::display::escape`]), since a row
//! may have been written by anything (a server's error text, a direct `update`).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::display::escape;
use crate::secrets::describe_stored;
use crate::store::{AppRow, PilotAuth, PilotRow, TextLimit, limits};

/// A settings value an admin typed that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error(
        "tenant {0:?} cannot be used with client credentials (AADSTS9001023): use the tenant id (a GUID, Azure portal > Microsoft Entra ID > Overview) or a verified domain such as contoso.onmicrosoft.com"
    )]
    MultiTenantAlias(String),
    #[error(
        "tenant {0:?} is neither a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) nor a domain name such as contoso.onmicrosoft.com"
    )]
    BadTenant(String),
    #[error("mailbox {0:?} is not an e-mail address like support@contoso.com")]
    BadMailbox(String),
    #[error(
        "scope {0:?} must end in /.default for client credentials (AADSTS1002012), e.g. https://outlook.office365.com/.default"
    )]
    BadScope(String),
    #[error("authority {0:?} must be an https:// URL such as https://login.microsoftonline.com")]
    BadAuthority(String),
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("client id {0:?} must not contain spaces; copy the Application (client) ID")]
    BadClientId(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Within `limit` (length, no control characters), or the reason in words.
pub fn validate_text(limit: TextLimit, value: &str) -> Result<(), AdminError> {
    limit.check(value).map_err(|reason| AdminError::Invalid {
        field: limit.field,
        reason,
    })
}

/// A queue name: not blank, within [`limits::QUEUE`].
pub fn validate_queue(queue: &str) -> Result<(), AdminError> {
    validate_non_empty("queue", queue)?;
    validate_text(limits::QUEUE, queue)
}

/// An app name: not blank, within [`limits::APP_NAME`].
pub fn validate_app_name(name: &str) -> Result<(), AdminError> {
    validate_non_empty("name", name)?;
    validate_text(limits::APP_NAME, name)
}

/// A POP3 host name or address: not blank, no spaces, within [`limits::HOST`].
pub fn validate_host(host: &str) -> Result<(), AdminError> {
    validate_non_empty("host", host)?;
    validate_text(limits::HOST, host)?;
    if host.chars().any(char::is_whitespace) {
        return Err(AdminError::Invalid {
            field: "host",
            reason: "it contains a space; give a host name or an address".to_owned(),
        });
    }
    Ok(())
}

/// Names Entra reserves for multi-tenant endpoints; client credentials need a real tenant.
/// A secret or certificate expiring within this many days gets a warning (views and doctor).
pub const EXPIRY_WARNING_DAYS: i64 = 30;

const MULTI_TENANT_ALIASES: [&str; 3] = ["common", "organizations", "consumers"];

fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_domain(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2
        && s.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.chars().any(|c| c.is_ascii_alphabetic()))
}

/// A tenant is a GUID or a domain, and never `common` / `organizations` / `consumers`.
pub fn validate_tenant(tenant: &str) -> Result<(), AdminError> {
    validate_text(limits::TENANT, tenant)?;
    let t = tenant.trim();
    if MULTI_TENANT_ALIASES
        .iter()
        .any(|a| a.eq_ignore_ascii_case(t))
    {
        return Err(AdminError::MultiTenantAlias(tenant.to_owned()));
    }
    if is_guid(t) || is_domain(t) {
        Ok(())
    } else {
        Err(AdminError::BadTenant(tenant.to_owned()))
    }
}

/// `local@domain`, no spaces, one `@`, a domain name after it.
pub fn validate_mailbox(mailbox: &str) -> Result<(), AdminError> {
    validate_text(limits::MAILBOX, mailbox)?;
    let bad = || AdminError::BadMailbox(mailbox.to_owned());
    let (local, domain) = mailbox.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.contains('@')
        || mailbox.chars().any(|c| c.is_whitespace() || c.is_control())
        || !(is_domain(domain) || domain == "localhost")
    {
        return Err(bad());
    }
    Ok(())
}

/// Client-credentials scopes end in `/.default`.
pub fn validate_scope(scope: &str) -> Result<(), AdminError> {
    validate_text(limits::SCOPE, scope)?;
    if scope.ends_with("/.default") && !scope.contains(' ') {
        Ok(())
    } else {
        Err(AdminError::BadScope(scope.to_owned()))
    }
}

/// An `https://` URL.
pub fn validate_authority(authority: &str) -> Result<(), AdminError> {
    validate_text(limits::AUTHORITY, authority)?;
    match authority.strip_prefix("https://") {
        Some(rest) if !rest.is_empty() && !rest.contains(' ') => Ok(()),
        _ => Err(AdminError::BadAuthority(authority.to_owned())),
    }
}

/// Non-empty, no whitespace.
pub fn validate_client_id(client_id: &str) -> Result<(), AdminError> {
    if client_id.trim().is_empty() {
        return Err(AdminError::Empty { field: "client id" });
    }
    validate_text(limits::CLIENT_ID, client_id)?;
    if client_id.chars().any(char::is_whitespace) {
        return Err(AdminError::BadClientId(client_id.to_owned()));
    }
    Ok(())
}

/// Not blank.
pub fn validate_non_empty(field: &'static str, value: &str) -> Result<(), AdminError> {
    if value.trim().is_empty() {
        Err(AdminError::Empty { field })
    } else {
        Ok(())
    }
}

/// A Microsoft cloud: where its tokens come from, the scope for Exchange, the POP host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cloud {
    /// Microsoft 365 global (login.microsoftonline.com, outlook.office365.com).
    Global,
    /// Microsoft 365 GCC High / DoD (login.microsoftonline.us, outlook.office365.us).
    UsGov,
    /// Microsoft 365 operated by 21Vianet (login.partner.microsoftonline.cn, partner.outlook.cn).
    China,
}

/// A cloud's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudPreset {
    pub authority: &'static str,
    pub scope: &'static str,
    pub pop_host: &'static str,
}

impl Cloud {
    /// Authority, scope and POP host of this cloud (docs/exchange-online.md, "Token endpoint and
    /// scope per cloud": the sovereign POP hosts and scopes are unconfirmed, so each stays
    /// overridable).
    pub fn preset(self) -> CloudPreset {
        match self {
            Cloud::Global => CloudPreset {
                authority: crate::model::defaults::DEFAULT_AUTHORITY,
                scope: crate::model::defaults::DEFAULT_SCOPE,
                pop_host: crate::model::defaults::DEFAULT_HOST,
            },
            Cloud::UsGov => CloudPreset {
                authority: "https://login.microsoftonline.us",
                scope: "https://outlook.office365.us/.default",
                pop_host: "outlook.office365.us",
            },
            Cloud::China => CloudPreset {
                authority: "https://login.partner.microsoftonline.cn",
                scope: "https://partner.outlook.cn/.default",
                pop_host: "partner.outlook.cn",
            },
        }
    }

    /// The cloud whose authority this is, if it is a preset.
    pub fn of_authority(authority: &str) -> Option<Cloud> {
        let a = authority.trim_end_matches('/');
        [Cloud::Global, Cloud::UsGov, Cloud::China]
            .into_iter()
            .find(|c| c.preset().authority.eq_ignore_ascii_case(a))
    }

    /// `global`, `us-gov`, `china`.
    pub fn name(self) -> &'static str {
        match self {
            Cloud::Global => "global",
            Cloud::UsGov => "us-gov",
            Cloud::China => "china",
        }
    }
}

/// An app as shown to people and scripts (never its credential's value).
#[derive(Debug, Clone, Serialize)]
pub struct AppView {
    pub id: i64,
    pub name: String,
    pub tenant: String,
    pub client_id: String,
    pub cloud: String,
    pub authority: String,
    pub scope: String,
    /// `client-secret` or `certificate RS256` / `certificate PS256`.
    pub credential: String,
    /// How the secret or key is stored: `sealed`, `env:NAME`, `file:PATH`.
    pub stored_as: String,
    pub expires_at: Option<DateTime<Utc>>,
    /// `expired`, `expires in N days` (within 30 days) or `ok`.
    pub expiry_status: String,
    /// Pilots that log in with this app.
    pub pilots: Vec<String>,
    pub updated_at: DateTime<Utc>,
}

impl AppView {
    /// The view of `app`, used by `pilots`.
    pub fn new(app: &AppRow, pilots: &[PilotRow]) -> AppView {
        AppView {
            id: app.id,
            name: app.name.clone(),
            tenant: app.tenant.clone(),
            client_id: app.client_id.clone(),
            cloud: Cloud::of_authority(&app.authority)
                .map(|c| c.name().to_owned())
                .unwrap_or_else(|| "custom".to_owned()),
            authority: app.authority.clone(),
            scope: app.scope.clone(),
            credential: match &app.assertion_alg {
                Some(alg) => format!("certificate {alg}"),
                None => "client-secret".to_owned(),
            },
            stored_as: describe_stored(&app.credential),
            expires_at: app.secret_expires_at,
            expiry_status: expiry_status(app.secret_expires_at, Utc::now()),
            pilots: pilots
                .iter()
                .filter(|p| matches!(p.auth, PilotAuth::XOAuth2 { app_id } if app_id == app.id))
                .map(|p| p.mailbox.clone())
                .collect(),
            updated_at: app.updated_at,
        }
    }
}

/// `expired`, `expires in N days` when within 30 days, `ok`, or `unknown`.
pub fn expiry_status(expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match expires_at {
        None => "unknown".to_owned(),
        Some(t) if t <= now => "expired".to_owned(),
        Some(t) if (t - now).num_days() < EXPIRY_WARNING_DAYS => {
            format!("expires in {} days", (t - now).num_days())
        }
        Some(_) => "ok".to_owned(),
    }
}

/// A pilot as shown to people and scripts.
#[derive(Debug, Clone, Serialize)]
pub struct PilotView {
    pub id: i64,
    pub queue: String,
    pub mailbox: String,
    pub host: String,
    pub port: u16,
    pub tls: String,
    /// `xoauth2` or `user_pass`.
    pub auth: String,
    /// The app's name for XOAUTH2 pilots.
    pub app: Option<String>,
    pub username: Option<String>,
    pub ca_bundle: Option<String>,
    pub poll_interval_secs: u64,
    pub keep_on_server: bool,
    pub max_message_bytes: u64,
    pub enabled: bool,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_hint: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// The replica whose live lease lets it poll the pilot (filled in by listings that read
    /// the leases); `None`: nobody holds it now.
    pub lease_holder: Option<String>,
}

impl PilotView {
    /// The view of `pilot`; `apps` resolve the app's name.
    pub fn new(pilot: &PilotRow, apps: &[AppRow]) -> PilotView {
        let (auth, app, username) = match &pilot.auth {
            PilotAuth::XOAuth2 { app_id } => (
                "xoauth2",
                Some(
                    apps.iter()
                        .find(|a| a.id == *app_id)
                        .map(|a| a.name.clone())
                        .unwrap_or_else(|| format!("#{app_id}")),
                ),
                None,
            ),
            PilotAuth::UserPass { username, .. } => ("user_pass", None, Some(username.clone())),
        };
        PilotView {
            id: pilot.id,
            queue: pilot.queue.clone(),
            mailbox: pilot.mailbox.clone(),
            host: pilot.host.clone(),
            port: pilot.port,
            tls: pilot.tls.as_str().to_owned(),
            auth: auth.to_owned(),
            app,
            username,
            ca_bundle: pilot.ca_bundle.clone(),
            poll_interval_secs: pilot.poll_interval.as_secs(),
            keep_on_server: pilot.keep_on_server,
            max_message_bytes: pilot.max_message_bytes,
            enabled: pilot.enabled,
            last_success_at: pilot.last_success_at,
            last_error: pilot.last_error.clone(),
            last_error_hint: pilot.last_error_hint.clone(),
            updated_at: pilot.updated_at,
            lease_holder: None,
        }
    }
}

/// A plain-text table: a header row and aligned columns (the last column is not padded).
/// Cells are escaped, so a value cannot break the layout or reach the terminal as a control
/// sequence.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| escape(c).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{:<width$}  ", cell, width = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `key: value` lines for `show`; values are escaped like [`table`] cells.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{k:<width$}  {}", escape(v));
    }
    out
}

/// Optional values as text (`-` when absent).
pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants() {
        for ok in [
            "8f2c1a9e-1111-4222-8333-944455556666",
            "contoso.onmicrosoft.com",
            "contoso.com",
        ] {
            assert_eq!(validate_tenant(ok), Ok(()), "{ok}");
        }
        for alias in ["common", "Organizations", "consumers"] {
            let err = validate_tenant(alias).unwrap_err();
            assert!(err.to_string().contains("AADSTS9001023"), "{err}");
        }
        for bad in [
            "",
            "contoso",
            "8f2c1a9e-1111-4222-8333",
            "a b.com",
            "-x.com",
        ] {
            assert!(
                matches!(validate_tenant(bad), Err(AdminError::BadTenant(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn mailboxes_scopes_authorities() {
        assert_eq!(validate_mailbox("support@contoso.com"), Ok(()));
        for bad in ["support", "@contoso.com", "a@b", "a b@c.com", "a@@c.com"] {
            assert!(validate_mailbox(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate_scope("https://outlook.office365.com/.default"),
            Ok(())
        );
        assert!(validate_scope("https://outlook.office365.com/POP.AccessAsApp").is_err());
        assert_eq!(
            validate_authority("https://login.microsoftonline.us"),
            Ok(())
        );
        assert!(validate_authority("http://login.microsoftonline.com").is_err());
        assert!(validate_client_id("a b").is_err());
    }

    #[test]
    fn clouds_round_trip_and_expiry() {
        for c in [Cloud::Global, Cloud::UsGov, Cloud::China] {
            assert_eq!(Cloud::of_authority(c.preset().authority), Some(c));
        }
        let now = Utc::now();
        assert_eq!(expiry_status(None, now), "unknown");
        assert_eq!(
            expiry_status(Some(now - chrono::Duration::days(1)), now),
            "expired"
        );
        assert_eq!(
            expiry_status(
                Some(now + chrono::Duration::days(10) + chrono::Duration::hours(1)),
                now
            ),
            "expires in 10 days"
        );
        assert_eq!(
            expiry_status(Some(now + chrono::Duration::days(90)), now),
            "ok"
        );
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["id", "name", "note"],
            &[vec!["1".into(), "long-name".into(), "x".into()]],
        );
        assert_eq!(t, "id  name       note\n1   long-name  x\n");
    }

    #[test]
    fn views_escape_control_characters() {
        let hostile = "\x1b[2Jcleared\r\nfake row\u{202e}";
        let t = table(&["id", "error"], &[vec!["1".into(), hostile.into()]]);
        assert_eq!(t.lines().count(), 2, "{t}");
        let clean = |text: &str| {
            text.lines()
                .all(|l| !l.chars().any(crate::display::is_unsafe))
        };
        assert!(clean(&t), "{t:?}");
        let kv = key_values(&[("last error", hostile.to_owned())]);
        assert!(kv.contains("\\u{1b}[2Jcleared"), "{kv}");
        assert!(clean(&kv), "{kv:?}");
    }

    #[test]
    fn texts_over_their_limit_are_named_without_being_echoed() {
        let long = "q".repeat(10 * 1024);
        let err = validate_queue(&long).unwrap_err().to_string();
        assert!(
            err.starts_with("queue is invalid: it is 10240 characters long; at most 100"),
            "{err}"
        );
        assert!(!err.contains(&long));
        let err = validate_queue("sup\x1bport").unwrap_err().to_string();
        assert!(
            err.contains("control character (U+001B) at character 4"),
            "{err}"
        );
        assert!(validate_queue(&"q".repeat(100)).is_ok());
        assert!(validate_queue("VIP Support / EU").is_ok());
        assert!(validate_host("pop.contoso.com").is_ok());
        assert!(validate_host("pop contoso").is_err());
        let err = validate_tenant(&format!("{}.com", "t".repeat(300))).unwrap_err();
        assert!(err.to_string().contains("at most 253"), "{err}");
    }
}
