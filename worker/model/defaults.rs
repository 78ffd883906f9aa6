//! The defaults of Exchange Online in the global cloud and of a new pilot, each written once.
//!
//! Everything that needs one of these values (the store's column defaults for new rows, the
//! token source, the admin CLI's cloud presets, doctor's advice) names it from here.

use std::time::Duration;

/// Entra ID authority of the global cloud.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The scope of an app-only token for Exchange Online POP/IMAP.
pub const DEFAULT_SCOPE: &str = "https://outlook.office365.com/.default";
/// Exchange Online's POP3S host.
pub const DEFAULT_HOST: &str = "outlook.office365.com";
/// POP3 over implicit TLS (RFC 8314).
pub const DEFAULT_PORT: u16 = 995;
/// How often a mailbox is polled unless configured otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// Largest message downloaded in full (50 MiB); larger ones are stored as headers only.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 50 * 1024 * 1024;
