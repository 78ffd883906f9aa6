//! Checks on what admins set, shared by the apps and pilots tables: limits on texts (names,
//! hosts, mailboxes, ...) and the form of a stored credential, checked here with a clear
//! message before the schema's check constraints refuse them.
//!
//! Invariant: every number here equals the one in migration 0007's constraints.

use super::error::StoreError;
use crate::secrets::SecretRef;

/// Refuses credentials in no recognised form before they reach the database, with the
/// explanation of the three accepted forms (the database refuses them too).
pub(super) fn check_credential(field: &'static str, stored: &str) -> Result<(), StoreError> {
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

    pub(super) fn enforce(&self, value: &str) -> Result<(), StoreError> {
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
