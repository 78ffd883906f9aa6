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

/// Messages stored per poll at most; the rest wait for the next poll.
pub const MAX_MESSAGES_PER_POLL: usize = 500;
/// Messages committed together in one transaction.
pub const BATCH_MESSAGES: usize = 50;
/// Raw bytes committed together in one transaction (16 MiB).
pub const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Failed RETRs of one message (across polls) after which its headers are stored instead.
pub const MAX_RETR_ATTEMPTS: u32 = 5;
/// Batches being committed while the next one downloads.
pub const COMMIT_CONCURRENCY: usize = 2;
/// Messages being parsed while the next one downloads.
pub const PARSE_AHEAD: usize = 2;
/// A poll stops taking new messages after this long.
pub const MAX_POLL_DURATION: Duration = Duration::from_secs(15 * 60);
/// A headers-only message whose download kept failing is tried again after a day.
pub const REFETCH_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// A login the server refuses with its generic answer is retried on a short schedule for this
/// long before the refusal counts as persistent (the time another session takes to end, or a
/// new permission to reach the server).
pub const LOGIN_REFUSAL_GRACE: Duration = Duration::from_secs(10 * 60);
/// UIDL listing entries looked at per poll.
pub const MAX_LISTING_ENTRIES: usize = 100_000;

/// Time to open the TCP connection to a POP3 server.
pub const POP3_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Time for the TLS handshake with a POP3 server.
pub const POP3_TLS_TIMEOUT: Duration = Duration::from_secs(15);
/// Time for one POP3 command's response to start.
pub const POP3_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Silence tolerated within a multi-line POP3 response.
pub const POP3_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Slowest average rate a multi-line POP3 body may arrive at (16 KiB/s).
pub const POP3_MIN_RATE_BYTES_PER_SEC: u64 = 16 * 1024;

/// MIME parts parsed per message at most.
pub const PARSE_MAX_PARTS: usize = 20_000;
/// Time a parse may take, whatever the size.
pub const PARSE_TIME_BASE: Duration = Duration::from_secs(10);
/// Time a parse may take per MiB of input, on top of [`PARSE_TIME_BASE`].
pub const PARSE_TIME_PER_MIB: Duration = Duration::from_secs(1);
/// Parses still running past their budget at the same time before parsing only headers.
pub const PARSE_MAX_ABANDONED: usize = 2;

/// Connections in the worker's database pool.
pub const DB_MAX_CONNECTIONS: u32 = 10;
/// Server-side limit of one statement (`statement_timeout`).
pub const DB_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Server-side limit of a transaction left idle (`idle_in_transaction_session_timeout`).
pub const DB_IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Time to get a pooled connection, including opening a new one.
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Client-side deadline of one transaction step (begin, savepoint, commit, rollback): longer
/// than the statement timeout, so a slow server's own error arrives first.
pub const DB_OPERATION_TIMEOUT: Duration = Duration::from_secs(45);
/// Idle time before the server probes a session's socket (TCP keepalive).
pub const DB_TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// First wait between attempts to reach the database at start-up; it doubles up to
/// [`DB_WAIT_MAX_BACKOFF`].
pub const DB_WAIT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between attempts to reach the database at start-up.
pub const DB_WAIT_MAX_BACKOFF: Duration = Duration::from_secs(15);

/// The loop breaker's rate rule: more than this many messages from one sender to one pilot
/// within [`LOOP_WINDOW`] are a loop. Two auto-responders answering each other pass it within
/// minutes; a person writing to a contact center never does.
pub const LOOP_MAX_MESSAGES: u32 = 100;
/// The window of [`LOOP_MAX_MESSAGES`].
pub const LOOP_WINDOW: Duration = Duration::from_secs(600);
