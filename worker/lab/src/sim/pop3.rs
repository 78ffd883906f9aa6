//! An Exchange-Online-like POP3 server, for `ccmail-lab demo`, the benchmark and the tests.
//!
//! It listens on 127.0.0.1 with an implicit-TLS port (like 995) and a plain port that offers `STLS`
//! (like 110), and answers the way Exchange Online does (docs/exchange-online.md, "How Exchange
//! Online's POP3 behaves"): the greeting, the CAPA list, two-step `AUTH XOAUTH2` only (the one-line
//! form closes the connection), the single auth-failure line for every app-only mistake, estimated
//! `LIST` sizes. Bearer tokens are checked against an [`EntraSim`]: a token is good for every
//! existing mailbox of its tenant's domain.
//!
//! Invariants (RFC 1939):
//! - Only `QUIT` in the TRANSACTION state removes messages marked by `DELE`; a session that
//!   ends any other way (error, drop, fault, simulator stop) removes nothing.
//! - A session sees the maildrop as it was at login; later deliveries show in the next session.
//! - UIDLs made by [`Pop3Sim::deliver`] are unique, stable and never reused; messages are served
//!   with CRLF line endings and dot-stuffing whatever line endings they were delivered with.
//!   Only the hostile knobs break this on purpose: [`Pop3Sim::deliver_with_uidl`] (any UIDL,
//!   duplicates and malformed ones included) and [`Pop3Sim::replace_message`] (a UIDL reused for
//!   different content).
//! - Credentials (AUTH blobs, PASS arguments) never reach logs or [`Pop3Sim::commands`].
//! - Faults are read when a session starts and apply to every session started until they are
//!   changed; sessions already running keep theirs.
//! - With a session limit ([`Pop3Sim::set_session_limit`]) at most that many sessions are
//!   logged into one mailbox at once; a session holds its place from login until it ends in
//!   any way, and a login beyond the limit is refused with the configured line (the session
//!   stays in AUTHORIZATION). Sessions already logged in are never thrown out.
//! - With a token limit ([`Pop3Sim::set_token_limit`]) an XOAUTH2 response longer than the
//!   limit is answered with [`ONE_LINE_AUTH_ERROR`] and the connection closed, as Exchange
//!   Online does with an oversized token.
//!
//! Hostile server mode: besides the network faults ([`Fault::Hang`], [`Fault::Slow`], the
//! drops, [`Pop3Sim::drop_every_nth_retr`] for a link that keeps dropping), a session can
//! answer like a broken or malicious server: an endless multi-line body ([`Fault::Endless`]), a
//! body trickled at a few bytes per second ([`Fault::Trickle`]), extra listing lines
//! ([`Fault::ListingLine`]: no message number, a number listed twice …), a huge listing made of
//! virtual entries ([`Fault::VirtualEntries`]), and maildrops holding duplicate, malformed or
//! reused UIDLs ([`Pop3Sim::deliver_with_uidl`],
//! [`Pop3Sim::replace_message`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use super::SimError;
use super::cert::TestCa;
use super::entra::EntraSim;
use super::net::{
    ClosableListener, Lifecycle, StopOnDrop, Stream, accept_backoff, lock as lock_mutex,
};

/// The line Exchange Online answers every app-only login mistake with.
pub const AUTH_FAILURE: &str = "-ERR Authentication failure: unknown user name or bad password.";
/// The line Exchange Online answers a one-line `AUTH XOAUTH2 <blob>` with, before closing.
pub const ONE_LINE_AUTH_ERROR: &str = "-ERR Protocol error. Connection is closed. 10";
/// The success line of `AUTH`.
pub const AUTH_SUCCESS: &str = "+OK User successfully authenticated.";
/// The start of the greeting (a base64 server id in brackets follows).
pub const GREETING_PREFIX: &str = "+OK The Microsoft Exchange POP3 service is ready.";
/// The line Exchange Online answers a login with while its backend is busy or unavailable
/// (one of the answers [`Pop3Sim::set_session_limit`] can give).
pub const SERVER_UNAVAILABLE: &str = "-ERR Server Unavailable. 21";
/// The default answer of a message made to fail with [`Pop3Sim::fail_retr`].
pub const RETR_FAILURE: &str = "-ERR [SYS/TEMP] Server Unavailable. 21";

/// RFC 2449 §4: a command line is at most 255 octets including CRLF.
const MAX_COMMAND: usize = 255;
/// SASL continuation lines carry a whole bearer token (Exchange accepts about 4 KiB of token);
/// anything far beyond that is garbage.
const MAX_SASL_LINE: usize = 64 * 1024;
/// [`Pop3Sim::commands`] keeps at most this many lines (the newest), so a long benchmark does
/// not grow memory without bound.
const MAX_RECORDED_COMMANDS: usize = 100_000;
/// Generated bodies ([`Fault::Endless`], [`Fault::VirtualEntries`]) are written in pieces of
/// about this size, so they cost no memory however long they are.
const STREAM_CHUNK: usize = 64 * 1024;
/// The `LIST` size of a [`Fault::VirtualEntries`] entry.
const VIRTUAL_SIZE: usize = 1000;

/// A fault injected into the sessions that start while it is set.
///
/// `command` fields match a command line case-insensitively when the line equals it or starts
/// with it followed by a space: `"RETR"` matches every RETR, `"RETR 2"` only message 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection abruptly (no TLS close_notify) after writing this many bytes of a
    /// RETR response (the `+OK` line included).
    DropAfterRetrBytes(usize),
    /// Read the command and never answer; the socket stays open until the client leaves or
    /// the simulator stops.
    Hang { command: String },
    /// Write every response in chunks of `chunk` bytes with `delay` before each (tokio time).
    Slow { chunk: usize, delay: Duration },
    /// Answer the command with `line` (e.g. `-ERR [SYS/TEMP] Server Unavailable. 21` or
    /// `-ERR [IN-USE] …`) instead of executing it.
    Err { command: String, line: String },
    /// Close the connection right after reading the command, without executing it: a `QUIT`
    /// dropped this way deletes nothing.
    DropAfterCommand { command: String },
    /// Execute the command, then close without answering: a `QUIT` dropped this way has
    /// deleted the marked messages, but the client never hears so.
    DropBeforeReply { command: String },
    /// Answer the command with `+OK` and a multi-line body that never ends, written as fast as
    /// the client reads it, until the client leaves. The lines look like the command's: UIDL
    /// and LIST lines with increasing message numbers, capability lines for CAPA, header lines
    /// for RETR and TOP.
    Endless { command: String },
    /// Write the status line of the command's response at once and the rest at
    /// `bytes_per_second` (one write of that many bytes per second of tokio time). A slow
    /// status line is already bounded by the client's command deadline; this is the slow body.
    Trickle {
        command: String,
        bytes_per_second: usize,
    },
    /// Insert `line` (raw bytes; CRLF is added) into the multi-line UIDL or LIST listing named
    /// by `command`, before listing line `at` (0-based; past the end it is appended): a line
    /// without a message number, a number listed twice, garbage.
    ListingLine {
        command: String,
        at: usize,
        line: Vec<u8>,
    },
    /// The multi-line UIDL and LIST listings (and STAT) count `count` more messages, numbered
    /// after the real ones, generated while they are written (no memory per entry): a huge
    /// maildrop for free. Every other command treats those numbers as out of range. Their
    /// UIDL lines are about 57 octets, so 700 000 of them make a 40 MB listing.
    VirtualEntries { count: usize },
    /// Accept the connection (and the TLS handshake on the implicit-TLS port) but never send
    /// the greeting; the socket stays open until the client leaves or the simulator stops.
    NoGreeting,
}

impl Fault {
    fn command(&self) -> Option<&str> {
        match self {
            Fault::Hang { command }
            | Fault::Err { command, .. }
            | Fault::DropAfterCommand { command }
            | Fault::DropBeforeReply { command }
            | Fault::Endless { command }
            | Fault::Trickle { command, .. }
            | Fault::ListingLine { command, .. } => Some(command),
            Fault::DropAfterRetrBytes(_)
            | Fault::Slow { .. }
            | Fault::VirtualEntries { .. }
            | Fault::NoGreeting => None,
        }
    }

    fn matches(&self, line: &str) -> bool {
        let Some(command) = self.command() else {
            return false;
        };
        let command = command.trim();
        line.len() >= command.len()
            && line.is_char_boundary(command.len())
            && line[..command.len()].eq_ignore_ascii_case(command)
            && line[command.len()..]
                .chars()
                .next()
                .is_none_or(|c| c == ' ')
    }
}

/// Handle to a running POP3 simulator. Cheap to clone; the simulator stops on
/// [`Pop3Sim::shutdown`] or when the last handle is dropped.
#[derive(Clone)]
pub struct Pop3Sim {
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

impl std::fmt::Debug for Pop3Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3Sim")
            .field("tls", &self.shared.tls_addr)
            .field("plain", &self.shared.plain_addr)
            .finish_non_exhaustive()
    }
}

/// State reachable from the session tasks (which must not keep the simulator alive).
struct Shared {
    tls_addr: SocketAddr,
    plain_addr: SocketAddr,
    life: Arc<Lifecycle>,
    entra: EntraSim,
    tls: TlsAcceptor,
    state: Mutex<Maildrops>,
    sessions: AtomicU64,
    logins: AtomicU64,
    auth_failures: AtomicU64,
}

#[derive(Default)]
struct Maildrops {
    /// Keyed by the lower-cased address.
    boxes: HashMap<String, Mailbox>,
    faults: Vec<Fault>,
    /// UIDL -> (remaining failures, answer line).
    retr_failures: HashMap<String, (usize, String)>,
    /// [`Pop3Sim::drop_every_nth_retr`]: (n, RETRs served since it was set, in any session).
    retr_drops: Option<(u64, u64)>,
    commands: VecDeque<String>,
    next_uid: u64,
    /// At most this many sessions logged into one mailbox, and the answer beyond it.
    session_limit: Option<(usize, String)>,
    /// Longest XOAUTH2 response (base64 octets) accepted.
    token_limit: Option<usize>,
    /// Sessions logged in now, by mailbox.
    active: HashMap<String, usize>,
    /// The most sessions ever logged into each mailbox at once.
    peak: HashMap<String, usize>,
}

#[derive(Default)]
struct Mailbox {
    password: Option<String>,
    messages: Vec<Message>,
}

#[derive(Clone)]
struct Message {
    uidl: String,
    /// As delivered (LF or CRLF).
    raw: Arc<[u8]>,
}

impl Pop3Sim {
    /// Starts the implicit-TLS and the plain (`STLS`) listeners on ephemeral 127.0.0.1 ports.
    /// Bearer tokens are validated by `entra`, which stays running while this simulator does.
    pub async fn start(ca: &TestCa, entra: EntraSim) -> Result<Pop3Sim, SimError> {
        let cert = ca.server_cert(&["localhost", "127.0.0.1"])?;
        let tls = TlsAcceptor::from(cert.rustls_server_config()?);
        let tls_listener = ClosableListener::bind().await?;
        let plain_listener = ClosableListener::bind().await?;
        let life = Arc::new(Lifecycle::new(vec![
            tls_listener.clone(),
            plain_listener.clone(),
        ]));
        let shared = Arc::new(Shared {
            tls_addr: tls_listener.local_addr(),
            plain_addr: plain_listener.local_addr(),
            life: life.clone(),
            entra,
            tls,
            state: Mutex::new(Maildrops::default()),
            sessions: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
        });
        spawn_acceptor(&shared, tls_listener, true);
        spawn_acceptor(&shared, plain_listener, false);
        tracing::debug!(tls = %shared.tls_addr, plain = %shared.plain_addr, "pop3 simulator listening");
        Ok(Pop3Sim {
            shared,
            _stop: Arc::new(StopOnDrop(life)),
        })
    }

    /// The implicit-TLS listener (like port 995).
    pub fn tls_addr(&self) -> SocketAddr {
        self.shared.tls_addr
    }

    /// The plain listener that offers `STLS` (like port 110). Logins are refused on it until
    /// the client has upgraded with `STLS`.
    pub fn plain_addr(&self) -> SocketAddr {
        self.shared.plain_addr
    }

    /// The token endpoint this simulator trusts.
    pub fn entra(&self) -> &EntraSim {
        &self.shared.entra
    }

    /// Closes both listeners now (a connect after this returns is refused) and ends every
    /// session soon after, without applying any pending `DELE`. Idempotent.
    pub fn shutdown(&self) {
        self.shared.life.stop();
    }

    /// Waits until every session and task of a stopped simulator has ended. Call after
    /// [`Pop3Sim::shutdown`]; it never resolves for a running simulator.
    pub async fn stopped(&self) {
        self.shared.life.stopped().await;
    }

    /// Creates an empty mailbox (no-op if it exists). Addresses compare case-insensitively.
    pub fn add_mailbox(&self, address: &str) {
        self.shared
            .lock()
            .boxes
            .entry(address.to_ascii_lowercase())
            .or_default();
    }

    /// Sets the password `USER`/`PASS` and `AUTH PLAIN` accept for `address` (creating the
    /// mailbox if needed).
    pub fn set_password(&self, address: &str, password: &str) {
        self.shared
            .lock()
            .boxes
            .entry(address.to_ascii_lowercase())
            .or_default()
            .password = Some(password.to_owned());
    }

    /// Delivers a message (LF or CRLF line endings; stored as given, served with CRLF) and
    /// returns its UIDL. Creates the mailbox if needed.
    pub fn deliver(&self, address: &str, raw: Vec<u8>) -> String {
        let mut state = self.shared.lock();
        state.next_uid += 1;
        let uidl = new_uidl(state.next_uid);
        state
            .boxes
            .entry(address.to_ascii_lowercase())
            .or_default()
            .messages
            .push(Message {
                uidl: uidl.clone(),
                raw: raw.into(),
            });
        uidl
    }

    /// Delivers a message under a UIDL of the caller's choosing, unchecked: the same UIDL as
    /// another message, one with spaces, control characters or 4 KB of text. It is listed and
    /// answered exactly as given (a CR LF inside it breaks the listing's framing, as a hostile
    /// server would). Creates the mailbox if needed.
    pub fn deliver_with_uidl(&self, address: &str, uidl: &str, raw: Vec<u8>) {
        self.shared
            .lock()
            .boxes
            .entry(address.to_ascii_lowercase())
            .or_default()
            .messages
            .push(Message {
                uidl: uidl.to_owned(),
                raw: raw.into(),
            });
    }

    /// UIDL reuse: the message listed as `uidl` in `address` gets new content, so a later
    /// session sees a different message under a UIDL a client may already have stored.
    /// Returns whether such a message was there (sessions already running keep their view).
    pub fn replace_message(&self, address: &str, uidl: &str, raw: Vec<u8>) -> bool {
        let mut state = self.shared.lock();
        let Some(mailbox) = state.boxes.get_mut(&address.to_ascii_lowercase()) else {
            return false;
        };
        match mailbox.messages.iter_mut().find(|m| m.uidl == uidl) {
            Some(message) => {
                message.raw = raw.into();
                true
            }
            None => false,
        }
    }

    /// The messages now in `address` (UIDL, bytes as delivered), in maildrop order.
    pub fn messages(&self, address: &str) -> Vec<(String, Vec<u8>)> {
        self.shared
            .lock()
            .boxes
            .get(&address.to_ascii_lowercase())
            .map(|b| {
                b.messages
                    .iter()
                    .map(|m| (m.uidl.clone(), m.raw.to_vec()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Connections accepted since start or [`Pop3Sim::reset_counters`].
    pub fn sessions(&self) -> u64 {
        self.shared.sessions.load(Ordering::SeqCst)
    }

    /// Successful logins (any mechanism) since start or [`Pop3Sim::reset_counters`].
    pub fn logins(&self) -> u64 {
        self.shared.logins.load(Ordering::SeqCst)
    }

    /// Refused logins since start or [`Pop3Sim::reset_counters`].
    pub fn auth_failures(&self) -> u64 {
        self.shared.auth_failures.load(Ordering::SeqCst)
    }

    /// Sets the session, login and auth-failure counters to zero.
    pub fn reset_counters(&self) {
        self.shared.sessions.store(0, Ordering::SeqCst);
        self.shared.logins.store(0, Ordering::SeqCst);
        self.shared.auth_failures.store(0, Ordering::SeqCst);
    }

    /// Every command line received (all sessions, oldest first, the newest 100 000 kept), with
    /// AUTH initial responses, SASL continuation lines and PASS arguments shown as
    /// `<redacted>`: a one-line XOAUTH2 shows as `AUTH XOAUTH2 <redacted>`.
    pub fn commands(&self) -> Vec<String> {
        self.shared.lock().commands.iter().cloned().collect()
    }

    /// Forgets the recorded command lines.
    pub fn clear_commands(&self) {
        self.shared.lock().commands.clear();
    }

    /// Allows at most `max` sessions logged into one mailbox at once (`None`: no limit); a
    /// login beyond it is answered with `line` ([`AUTH_FAILURE`], as Exchange Online usually
    /// answers, or [`SERVER_UNAVAILABLE`]). Applies to logins from now on.
    pub fn set_session_limit(&self, max: Option<usize>, line: &str) {
        self.shared.lock().session_limit = max.map(|n| (n, line.to_owned()));
    }

    /// Sessions logged into `address` now.
    pub fn active_sessions(&self, address: &str) -> usize {
        self.shared
            .lock()
            .active
            .get(&address.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// The most sessions ever logged into `address` at the same time (since start).
    pub fn peak_sessions(&self, address: &str) -> usize {
        self.shared
            .lock()
            .peak
            .get(&address.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Answers an XOAUTH2 response longer than `octets` (base64, as sent) with
    /// [`ONE_LINE_AUTH_ERROR`] and closes the connection (`None`: no limit).
    pub fn set_token_limit(&self, octets: Option<usize>) {
        self.shared.lock().token_limit = octets;
    }

    /// Replaces the injected faults with `fault` (or none) for sessions started from now on.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.lock().faults = fault.into_iter().collect();
    }

    /// Adds a fault to those applied to sessions started from now on.
    pub fn add_fault(&self, fault: Fault) {
        self.shared.lock().faults.push(fault);
    }

    /// Removes every injected session fault (per-message RETR failures stay).
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Makes `RETR` of the message `uidl` answer [`RETR_FAILURE`] the next `times` times
    /// (`usize::MAX`: always), in any session.
    pub fn fail_retr(&self, uidl: &str, times: usize) {
        self.fail_retr_with(uidl, times, RETR_FAILURE);
    }

    /// Cuts the connection in the middle of every `n`th RETR response, counted across all
    /// sessions and mailboxes from this call on (`0`: never): half of the message is written,
    /// then the connection closes without TLS close_notify, like a link that keeps dropping.
    pub fn drop_every_nth_retr(&self, n: u64) {
        self.shared.lock().retr_drops = (n > 0).then_some((n, 0));
    }

    /// As [`Pop3Sim::fail_retr`], answering `line` (which should start with `-ERR`).
    pub fn fail_retr_with(&self, uidl: &str, times: usize, line: &str) {
        let mut state = self.shared.lock();
        if times == 0 {
            state.retr_failures.remove(uidl);
        } else {
            state
                .retr_failures
                .insert(uidl.to_owned(), (times, line.to_owned()));
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Maildrops> {
        lock_mutex(&self.state)
    }

    fn record(&self, line: String) {
        let mut state = self.lock();
        if state.commands.len() >= MAX_RECORDED_COMMANDS {
            state.commands.pop_front();
        }
        state.commands.push_back(line);
    }
}

/// An Exchange-looking UIDL: `AAQkAD` and the base64url of a never-reused counter plus random
/// bytes (RFC 1939 §7: 1–70 printable characters, unique in the maildrop).
fn new_uidl(counter: u64) -> String {
    let mut bytes = counter.to_be_bytes().to_vec();
    bytes.extend((0..6).map(|_| fastrand::u8(..)));
    format!("AAQkAD{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The greeting's bracketed part: like Exchange, the base64 of a UTF-16LE server name.
fn greeting() -> String {
    let host = format!(
        "SN{}PR{:02}CA{:04}.namprd{:02}.prod.outlook.com",
        fastrand::u8(1..10),
        fastrand::u8(1..20),
        fastrand::u16(..10000),
        fastrand::u8(1..20)
    );
    let utf16: Vec<u8> = host.encode_utf16().flat_map(u16::to_le_bytes).collect();
    format!("{GREETING_PREFIX} [{}]", STANDARD.encode(utf16))
}

/// The bytes the simulator serves for `raw` (and so the bytes ccmail stores): every line
/// ending as CRLF and a final CRLF.
pub fn as_served(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32 + 2);
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    if !out.ends_with(b"\r\n") {
        if out.ends_with(b"\r") {
            out.push(b'\n');
        } else {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// A multi-line response body from CRLF text: RFC 1939 §3 byte-stuffing of lines starting
/// with `.`, then the `.` terminator line.
fn multiline(crlf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(crlf.len() + 16);
    for line in crlf.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// `TOP n k`: the header, the blank line and the first `lines` body lines (RFC 1939 §7).
fn top(crlf: &[u8], lines: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut in_body = false;
    let mut body_lines = 0;
    for line in crlf.split_inclusive(|&b| b == b'\n') {
        if in_body {
            if body_lines == lines {
                break;
            }
            body_lines += 1;
        } else if line == b"\r\n" {
            in_body = true;
        }
        out.extend_from_slice(line);
    }
    out
}

/// Exchange Online's `LIST` sizes are estimates (docs/exchange-online.md, "How Exchange Online's
/// POP3 behaves"): a few percent and a constant above the real size, never the exact octet count.
fn estimated_size(crlf_len: usize) -> usize {
    crlf_len + crlf_len / 25 + 97
}

/// Accepts connections and starts a session task per connection (TLS handshakes happen in
/// that task, so a slow client never blocks the others).
fn spawn_acceptor(shared: &Arc<Shared>, listener: ClosableListener, implicit_tls: bool) {
    let shared_for_loop = shared.clone();
    shared.life.tracker.spawn(async move {
        let shared = shared_for_loop;
        let cancel = shared.life.cancel.clone();
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                None => break,
                Some(Ok(conn)) => conn,
                Some(Err(error)) => {
                    accept_backoff(&error).await;
                    continue;
                }
            };
            shared.sessions.fetch_add(1, Ordering::SeqCst);
            let session_shared = shared.clone();
            let cancel = cancel.clone();
            shared.life.tracker.spawn(async move {
                // Cancelling drops the session mid-command: nothing marked is deleted.
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    () = run_session(session_shared, tcp, peer, implicit_tls) => {}
                }
            });
        }
    });
}

async fn run_session(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
) {
    let stream: Box<dyn Stream> = if implicit_tls {
        match shared.tls.accept(tcp).await {
            Ok(tls) => Box::new(tls),
            Err(error) => {
                tracing::debug!(%peer, %error, "pop3 simulator TLS handshake failed");
                return;
            }
        }
    } else {
        Box::new(tcp)
    };
    let faults = shared.lock().faults.clone();
    let mut session = Session {
        shared,
        stream,
        buf: Vec::new(),
        tls: implicit_tls,
        faults,
        mute: false,
        trickle: None,
        state: SessionState::Authorization { user: None },
        _slot: None,
    };
    match session.serve().await {
        Ok(()) | Err(End::Close) => {}
        Err(End::Io(error)) => tracing::debug!(%peer, %error, "pop3 simulator session ended"),
    }
}

/// Why a session ends early.
enum End {
    /// The session (or a fault) decided to close the connection.
    Close,
    Io(std::io::Error),
}

impl From<std::io::Error> for End {
    fn from(error: std::io::Error) -> End {
        End::Io(error)
    }
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

enum SessionState {
    Authorization {
        user: Option<String>,
    },
    Transaction {
        mailbox: String,
        /// The maildrop as it was at login.
        messages: Vec<Message>,
        deleted: Vec<bool>,
    },
}

struct Session {
    shared: Arc<Shared>,
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    tls: bool,
    faults: Vec<Fault>,
    /// Set by [`Fault::DropBeforeReply`]: the next write closes the connection instead.
    mute: bool,
    /// Set by [`Fault::Trickle`] for one response: its rate, and whether the status line (sent
    /// at once) has been written.
    trickle: Option<(usize, bool)>,
    state: SessionState,
    /// This session's place under the session limit, held from login until it ends.
    _slot: Option<Slot>,
}

/// A logged-in session's count in [`Maildrops::active`]; given back when dropped, so every
/// way a session ends (QUIT, error, drop, cancel) frees it.
struct Slot {
    shared: Arc<Shared>,
    mailbox: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(n) = state.active.get_mut(&self.mailbox) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.active.remove(&self.mailbox);
            }
        }
    }
}

impl Session {
    async fn serve(&mut self) -> Result<(), End> {
        if self.faults.contains(&Fault::NoGreeting) {
            return self.hang().await;
        }
        let greeting = greeting();
        self.reply(&greeting).await?;
        loop {
            let line = match self.read_line(MAX_COMMAND).await? {
                Line::Eof => return Ok(()),
                Line::TooLong => {
                    self.shared.record("<line too long>".to_owned());
                    self.reply("-ERR Command line too long.").await?;
                    continue;
                }
                Line::Text(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            };
            self.shared.record(redact(&line));
            // Listing lines are applied while the listing is written, not instead of it.
            let fault = self
                .faults
                .iter()
                .find(|f| f.matches(&line) && !matches!(f, Fault::ListingLine { .. }))
                .cloned();
            if let Some(fault) = fault {
                match fault {
                    Fault::DropAfterCommand { .. } => return Err(End::Close),
                    Fault::Hang { .. } => return self.hang().await,
                    Fault::Err { line: answer, .. } => {
                        self.reply(&answer).await?;
                        continue;
                    }
                    Fault::DropBeforeReply { .. } => self.mute = true,
                    Fault::Endless { .. } => return self.endless(&line).await,
                    Fault::Trickle {
                        bytes_per_second, ..
                    } => self.trickle = Some((bytes_per_second.max(1), false)),
                    Fault::DropAfterRetrBytes(_)
                    | Fault::Slow { .. }
                    | Fault::ListingLine { .. }
                    | Fault::VirtualEntries { .. }
                    | Fault::NoGreeting => {}
                }
            }
            let done = self.command(&line).await;
            self.trickle = None;
            done?;
        }
    }

    /// [`Fault::Endless`]: `+OK`, then lines shaped like the command's body, forever.
    async fn endless(&mut self, line: &str) -> Result<(), End> {
        let verb = line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        self.send(b"+OK\r\n").await?;
        let mut n: u64 = 0;
        let mut chunk = Vec::with_capacity(STREAM_CHUNK + 128);
        loop {
            chunk.clear();
            while chunk.len() < STREAM_CHUNK {
                n += 1;
                let line = match verb.as_str() {
                    "UIDL" => format!("{n} AAQkADendless{n:020}\r\n"),
                    "LIST" => format!("{n} 1000\r\n"),
                    "CAPA" => format!("X-ENDLESS-{n}\r\n"),
                    _ => format!("X-Endless-{n}: {}\r\n", "a".repeat(48)),
                };
                chunk.extend_from_slice(line.as_bytes());
            }
            // Fails once the client has gone, which ends the session.
            self.send(&chunk).await?;
        }
    }

    /// Never answers again; keeps the socket open until the client leaves.
    async fn hang(&mut self) -> Result<(), End> {
        let mut scratch = [0u8; 4096];
        while self.stream.read(&mut scratch).await? > 0 {}
        Ok(())
    }

    async fn command(&mut self, line: &str) -> Result<(), End> {
        let (verb, args) = match line.split_once(' ') {
            Some((verb, args)) => (verb.to_ascii_uppercase(), args.trim()),
            None => (line.to_ascii_uppercase(), ""),
        };
        let authorization = matches!(self.state, SessionState::Authorization { .. });
        match verb.as_str() {
            "CAPA" => self.capa().await,
            "NOOP" if !authorization => self.reply("+OK").await,
            "QUIT" => self.quit().await,
            "STLS" if authorization && !self.tls => self.starttls().await,
            "USER" | "PASS" | "AUTH" if authorization && !self.tls => {
                self.reply("-ERR Command is not valid in this state. Use STLS first.")
                    .await
            }
            "USER" if authorization => {
                self.state = SessionState::Authorization {
                    user: Some(args.to_owned()),
                };
                self.reply("+OK").await
            }
            "PASS" if authorization => self.pass(args).await,
            "AUTH" if authorization => self.auth(args).await,
            "STAT" | "LIST" | "UIDL" | "TOP" | "RETR" | "DELE" | "RSET" if !authorization => {
                self.transaction(&verb, args).await
            }
            "STLS" | "USER" | "PASS" | "AUTH" | "NOOP" | "STAT" | "LIST" | "UIDL" | "TOP"
            | "RETR" | "DELE" | "RSET" => {
                self.reply("-ERR Command is not valid in this state.").await
            }
            _ => self.reply("-ERR Protocol error. 14").await,
        }
    }

    async fn capa(&mut self) -> Result<(), End> {
        let mut response = String::from("+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n");
        if !self.tls && matches!(self.state, SessionState::Authorization { .. }) {
            response.push_str("STLS\r\n");
        }
        response.push_str(".\r\n");
        self.send(response.as_bytes()).await
    }

    async fn starttls(&mut self) -> Result<(), End> {
        self.reply("+OK Begin TLS negotiation.").await?;
        // RFC 2595 §4: anything the client pipelined before the handshake is discarded, so it
        // cannot be injected into the protected session.
        self.buf.clear();
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::empty()));
        let tls = self.shared.tls.accept(plain).await?;
        self.stream = Box::new(tls);
        self.tls = true;
        Ok(())
    }

    async fn quit(&mut self) -> Result<(), End> {
        if let SessionState::Transaction {
            mailbox,
            messages,
            deleted,
        } = &self.state
        {
            // RFC 1939 §6: the UPDATE state is entered only by QUIT from TRANSACTION.
            let gone: Vec<&str> = messages
                .iter()
                .zip(deleted)
                .filter(|(_, d)| **d)
                .map(|(m, _)| m.uidl.as_str())
                .collect();
            if let Some(mbox) = self.shared.lock().boxes.get_mut(mailbox) {
                mbox.messages.retain(|m| !gone.contains(&m.uidl.as_str()));
            }
        }
        self.reply("+OK Microsoft Exchange Server POP3 server signing off.")
            .await?;
        let _ = self.stream.shutdown().await;
        Err(End::Close)
    }

    async fn pass(&mut self, password: &str) -> Result<(), End> {
        let SessionState::Authorization { user } = &self.state else {
            return Err(End::Close);
        };
        let Some(user) = user.clone() else {
            return self.reply("-ERR Command is not valid in this state.").await;
        };
        if self.password_ok(&user, password) {
            if let Err(refusal) = self.login(&user) {
                self.shared.auth_failures.fetch_add(1, Ordering::SeqCst);
                self.state = SessionState::Authorization { user: None };
                return self.reply(&refusal).await;
            }
            self.reply("+OK User successfully logged on.").await
        } else {
            self.shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            self.state = SessionState::Authorization { user: None };
            self.reply("-ERR Logon failure: unknown user name or bad password.")
                .await
        }
    }

    async fn auth(&mut self, args: &str) -> Result<(), End> {
        if args.is_empty() {
            return self.send(b"+OK\r\nPLAIN\r\nXOAUTH2\r\n.\r\n").await;
        }
        let (mechanism, initial) = match args.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_owned())),
            None => (args.to_ascii_uppercase(), None),
        };
        match mechanism.as_str() {
            "XOAUTH2" => {
                if initial.is_some() {
                    // Exchange Online refuses SASL-IR for XOAUTH2 and hangs up.
                    self.reply(ONE_LINE_AUTH_ERROR).await?;
                    return Err(End::Close);
                }
                let Some(blob) = self.sasl_response(None).await? else {
                    return Ok(());
                };
                let limit = self.shared.lock().token_limit;
                if limit.is_some_and(|max| blob.len() > max) {
                    // Exchange Online answers an oversized token like a protocol error and
                    // hangs up.
                    self.shared.auth_failures.fetch_add(1, Ordering::SeqCst);
                    self.reply(ONE_LINE_AUTH_ERROR).await?;
                    return Err(End::Close);
                }
                let user = decode_base64(&blob)
                    .and_then(|bytes| parse_xoauth2(&bytes))
                    .filter(|(user, token)| self.bearer_ok(user, token))
                    .map(|(user, _)| user);
                self.finish_auth(user).await
            }
            "PLAIN" => {
                let Some(blob) = self.sasl_response(initial).await? else {
                    return Ok(());
                };
                let user = decode_base64(&blob)
                    .and_then(|bytes| parse_plain(&bytes))
                    .filter(|(user, password)| self.password_ok(user, password))
                    .map(|(user, _)| user);
                self.finish_auth(user).await
            }
            _ => self.reply("-ERR Unrecognized authentication type.").await,
        }
    }

    /// The client's SASL response: the initial response if given (`=` is an empty one), else
    /// after an empty `+ ` challenge. `None` when the client cancelled with `*` (answered).
    async fn sasl_response(&mut self, initial: Option<String>) -> Result<Option<String>, End> {
        if let Some(initial) = initial {
            return Ok(Some(if initial == "=" {
                String::new()
            } else {
                initial
            }));
        }
        self.send(b"+ \r\n").await?;
        let line = match self.read_line(MAX_SASL_LINE).await? {
            Line::Eof => return Err(End::Close),
            Line::TooLong => {
                self.shared.record("<redacted>".to_owned());
                self.shared.auth_failures.fetch_add(1, Ordering::SeqCst);
                self.reply(AUTH_FAILURE).await?;
                return Ok(None);
            }
            Line::Text(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        if line.trim() == "*" {
            self.shared.record("*".to_owned());
            self.reply("-ERR Authentication canceled.").await?;
            return Ok(None);
        }
        self.shared.record("<redacted>".to_owned());
        Ok(Some(line.trim().to_owned()))
    }

    async fn finish_auth(&mut self, user: Option<String>) -> Result<(), End> {
        match user {
            Some(user) => match self.login(&user) {
                Ok(()) => self.reply(AUTH_SUCCESS).await,
                Err(refusal) => {
                    self.shared.auth_failures.fetch_add(1, Ordering::SeqCst);
                    self.reply(&refusal).await
                }
            },
            None => {
                self.shared.auth_failures.fetch_add(1, Ordering::SeqCst);
                self.reply(AUTH_FAILURE).await
            }
        }
    }

    fn password_ok(&self, user: &str, password: &str) -> bool {
        self.shared
            .lock()
            .boxes
            .get(&user.to_ascii_lowercase())
            .and_then(|b| b.password.as_deref())
            .is_some_and(|p| p == password)
    }

    /// An app-only token opens every existing mailbox of its tenant's domain.
    fn bearer_ok(&self, user: &str, token: &str) -> bool {
        let Some(grant) = self.shared.entra.validate(token) else {
            return false;
        };
        let exists = self
            .shared
            .lock()
            .boxes
            .contains_key(&user.to_ascii_lowercase());
        let domain = user.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
        exists && domain.eq_ignore_ascii_case(&grant.tenant_domain)
    }

    /// Enters TRANSACTION with a snapshot of the maildrop, unless the mailbox already has as
    /// many sessions as the session limit allows: then the refusal line.
    fn login(&mut self, user: &str) -> Result<(), String> {
        let mailbox = user.to_ascii_lowercase();
        let messages = {
            let mut state = self.shared.lock();
            let active = state.active.get(&mailbox).copied().unwrap_or(0);
            if let Some((max, line)) = &state.session_limit
                && active >= *max
            {
                return Err(line.clone());
            }
            let now = {
                let n = state.active.entry(mailbox.clone()).or_insert(0);
                *n += 1;
                *n
            };
            let peak = state.peak.entry(mailbox.clone()).or_insert(0);
            *peak = (*peak).max(now);
            state
                .boxes
                .get(&mailbox)
                .map(|b| b.messages.clone())
                .unwrap_or_default()
        };
        self._slot = Some(Slot {
            shared: self.shared.clone(),
            mailbox: mailbox.clone(),
        });
        self.shared.logins.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(mailbox, messages = messages.len(), "pop3 simulator login");
        self.state = SessionState::Transaction {
            mailbox,
            deleted: vec![false; messages.len()],
            messages,
        };
        Ok(())
    }

    async fn transaction(&mut self, verb: &str, args: &str) -> Result<(), End> {
        let virtual_count = self
            .faults
            .iter()
            .find_map(|f| match f {
                Fault::VirtualEntries { count } => Some(*count),
                _ => None,
            })
            .unwrap_or(0);
        let mut inserted: Vec<(usize, Vec<u8>)> = self
            .faults
            .iter()
            .filter_map(|f| match f {
                Fault::ListingLine { command, at, line }
                    if command.trim().eq_ignore_ascii_case(verb) =>
                {
                    Some((*at, line.clone()))
                }
                _ => None,
            })
            .collect();
        let SessionState::Transaction {
            messages, deleted, ..
        } = &mut self.state
        else {
            return Err(End::Close);
        };
        let mut words = args.split_whitespace();
        let first = words.next();
        let second = words.next();
        // RFC 1939: message numbers are 1-based and must not name a deleted message.
        let pick = |n: Option<&str>| -> Result<usize, &'static str> {
            let n: usize = n
                .ok_or("-ERR Protocol error. 14")?
                .parse()
                .map_err(|_| "-ERR Protocol error. 14")?;
            if n == 0 || n > messages.len() {
                return Err("-ERR The specified message is out of range.");
            }
            if deleted[n - 1] {
                return Err("-ERR The specified message has been deleted.");
            }
            Ok(n - 1)
        };
        let live = || {
            messages
                .iter()
                .zip(deleted.iter())
                .enumerate()
                .filter(|(_, (_, d))| !**d)
                .map(|(i, (m, _))| (i + 1, m))
        };
        let response: Vec<u8> = match verb {
            "STAT" => {
                let (count, size) = live().fold((0, 0), |(c, s), (_, m)| {
                    (c + 1, s + estimated_size(as_served(&m.raw).len()))
                });
                let count = count + virtual_count;
                let size = size + virtual_count * VIRTUAL_SIZE;
                format!("+OK {count} {size}\r\n").into_bytes()
            }
            "LIST" if first.is_none() => {
                let rows: Vec<(usize, usize)> = live()
                    .map(|(n, m)| (n, estimated_size(as_served(&m.raw).len())))
                    .collect();
                let total: usize =
                    rows.iter().map(|(_, s)| s).sum::<usize>() + virtual_count * VIRTUAL_SIZE;
                let head = format!("+OK {} {total}\r\n", rows.len() + virtual_count);
                let lines = rows
                    .into_iter()
                    .map(|(n, size)| format!("{n} {size}").into_bytes())
                    .collect();
                let first_virtual = messages.len() + 1;
                return self
                    .listing(
                        head,
                        lines,
                        &mut inserted,
                        false,
                        first_virtual,
                        virtual_count,
                    )
                    .await;
            }
            "LIST" => match pick(first) {
                Ok(i) => format!(
                    "+OK {} {}\r\n",
                    i + 1,
                    estimated_size(as_served(&messages[i].raw).len())
                )
                .into_bytes(),
                Err(e) => format!("{e}\r\n").into_bytes(),
            },
            "UIDL" if first.is_none() => {
                let lines = live()
                    .map(|(n, m)| format!("{n} {}", m.uidl).into_bytes())
                    .collect();
                let first_virtual = messages.len() + 1;
                return self
                    .listing(
                        "+OK\r\n".to_owned(),
                        lines,
                        &mut inserted,
                        true,
                        first_virtual,
                        virtual_count,
                    )
                    .await;
            }
            "UIDL" => match pick(first) {
                Ok(i) => format!("+OK {} {}\r\n", i + 1, messages[i].uidl).into_bytes(),
                Err(e) => format!("{e}\r\n").into_bytes(),
            },
            "TOP" => match (pick(first), second.map(str::parse::<usize>)) {
                (Ok(i), Some(Ok(lines))) => {
                    let mut out = b"+OK\r\n".to_vec();
                    out.extend(multiline(&top(&as_served(&messages[i].raw), lines)));
                    out
                }
                (Err(e), _) => format!("{e}\r\n").into_bytes(),
                (Ok(_), _) => b"-ERR Protocol error. 14\r\n".to_vec(),
            },
            "RETR" => match pick(first) {
                Ok(i) => {
                    let message = messages[i].clone();
                    return self.retr(&message).await;
                }
                Err(e) => format!("{e}\r\n").into_bytes(),
            },
            "DELE" => match pick(first) {
                Ok(i) => {
                    deleted[i] = true;
                    b"+OK\r\n".to_vec()
                }
                Err(e) => format!("{e}\r\n").into_bytes(),
            },
            "RSET" => {
                deleted.iter_mut().for_each(|d| *d = false);
                b"+OK\r\n".to_vec()
            }
            _ => b"-ERR Protocol error. 14\r\n".to_vec(),
        };
        self.send(&response).await
    }

    /// Writes a multi-line UIDL (`uidl`) or LIST listing: `lines` with the
    /// [`Fault::ListingLine`]s inserted, then `virtual_count` generated entries numbered from
    /// `first_virtual`, streamed in chunks, then the terminator.
    async fn listing(
        &mut self,
        head: String,
        lines: Vec<Vec<u8>>,
        inserted: &mut [(usize, Vec<u8>)],
        uidl: bool,
        first_virtual: usize,
        virtual_count: usize,
    ) -> Result<(), End> {
        // Stable: several lines inserted at one position keep the order they were added in.
        inserted.sort_by_key(|(at, _)| *at);
        let mut out = head.into_bytes();
        let mut extra = inserted.iter().peekable();
        for (i, line) in lines.iter().enumerate() {
            while let Some((_, bytes)) = extra.next_if(|(at, _)| *at <= i) {
                out.extend_from_slice(bytes);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        for (_, bytes) in extra {
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\r\n");
        }
        let end = first_virtual + virtual_count;
        let mut n = first_virtual;
        while n < end {
            if out.len() >= STREAM_CHUNK {
                self.send(&out).await?;
                out.clear();
            }
            let line = if uidl {
                format!("{n} AAQkADvirtual{n:035}\r\n")
            } else {
                format!("{n} {VIRTUAL_SIZE}\r\n")
            };
            out.extend_from_slice(line.as_bytes());
            n += 1;
        }
        out.extend_from_slice(b".\r\n");
        self.send(&out).await
    }

    async fn retr(&mut self, message: &Message) -> Result<(), End> {
        let failure = {
            let mut state = self.shared.lock();
            match state.retr_failures.get_mut(&message.uidl) {
                Some((remaining, line)) => {
                    let line = line.clone();
                    if *remaining != usize::MAX {
                        *remaining -= 1;
                        if *remaining == 0 {
                            state.retr_failures.remove(&message.uidl);
                        }
                    }
                    Some(line)
                }
                None => None,
            }
        };
        if let Some(line) = failure {
            return self.reply(&line).await;
        }
        let mut response = b"+OK\r\n".to_vec();
        response.extend(multiline(&as_served(&message.raw)));
        let nth_drop = {
            let mut state = self.shared.lock();
            match &mut state.retr_drops {
                Some((n, served)) => {
                    *served += 1;
                    *served % *n == 0
                }
                None => false,
            }
        };
        let cut = self
            .faults
            .iter()
            .find_map(|f| match f {
                Fault::DropAfterRetrBytes(n) => Some(*n),
                _ => None,
            })
            .or(nth_drop.then_some(response.len() / 2));
        match cut {
            Some(n) => {
                self.send(&response[..n.min(response.len())]).await?;
                // Dropped without close_notify or QUIT handling: an abrupt end mid-message.
                Err(End::Close)
            }
            None => self.send(&response).await,
        }
    }

    async fn reply(&mut self, line: &str) -> Result<(), End> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes).await
    }

    /// Writes a response, honouring [`Fault::Slow`] and [`Fault::DropBeforeReply`].
    async fn send(&mut self, bytes: &[u8]) -> Result<(), End> {
        if self.mute {
            return Err(End::Close);
        }
        if let Some((rate, status_sent)) = self.trickle {
            let mut rest = bytes;
            if !status_sent {
                let head = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |lf| lf + 1);
                self.stream.write_all(&rest[..head]).await?;
                self.stream.flush().await?;
                rest = &rest[head..];
                self.trickle = Some((rate, true));
            }
            for piece in rest.chunks(rate) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.stream.write_all(piece).await?;
                self.stream.flush().await?;
            }
            return Ok(());
        }
        let slow = self.faults.iter().find_map(|f| match f {
            Fault::Slow { chunk, delay } => Some((*chunk, *delay)),
            _ => None,
        });
        match slow {
            Some((chunk, delay)) => {
                for piece in bytes.chunks(chunk.max(1)) {
                    tokio::time::sleep(delay).await;
                    self.stream.write_all(piece).await?;
                    self.stream.flush().await?;
                }
            }
            None => {
                self.stream.write_all(bytes).await?;
                self.stream.flush().await?;
            }
        }
        Ok(())
    }

    /// Reads one line (LF or CRLF terminated) of at most `max` octets including the ending.
    /// A longer line is consumed whole and reported as [`Line::TooLong`].
    async fn read_line(&mut self, max: usize) -> Result<Line, End> {
        let mut too_long = false;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                if too_long || line.len() > max {
                    return Ok(Line::TooLong);
                }
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Line::Text(line));
            }
            if self.buf.len() > max {
                too_long = true;
                self.buf.clear();
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Line::Eof);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The command line as recorded: credentials replaced by `<redacted>`.
fn redact(line: &str) -> String {
    let mut words = line.splitn(3, ' ');
    let verb = words.next().unwrap_or_default();
    if verb.eq_ignore_ascii_case("PASS") {
        return format!("{verb} <redacted>");
    }
    if verb.eq_ignore_ascii_case("AUTH") {
        return match (words.next(), words.next()) {
            (Some(mechanism), Some(_)) => format!("{verb} {mechanism} <redacted>"),
            _ => line.to_owned(),
        };
    }
    line.to_owned()
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

/// XOAUTH2 initial client response: `user={user}\x01auth=Bearer {token}\x01\x01`.
fn parse_xoauth2(bytes: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let body = text.strip_suffix("\x01\x01")?;
    let mut user = None;
    let mut token = None;
    for field in body.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u.to_owned());
        } else if let Some(auth) = field.strip_prefix("auth=") {
            let (scheme, value) = auth.split_once(' ')?;
            if scheme.eq_ignore_ascii_case("Bearer") {
                token = Some(value.to_owned());
            }
        }
    }
    Some((user?, token?))
}

/// RFC 4616 PLAIN: `[authzid] NUL authcid NUL passwd`; an authzid must equal the authcid.
fn parse_plain(bytes: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split('\0');
    let (authzid, authcid, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !(authzid.is_empty() || authzid.eq_ignore_ascii_case(authcid)) {
        return None;
    }
    Some((authcid.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::entra::SimApp;
    use anyhow::{Context as _, bail, ensure};
    use rustls::pki_types::ServerName;

    const DOMAIN: &str = "contoso.example";
    const MAILBOX: &str = "support@contoso.example";
    const OTHER: &str = "sales@fabrikam.example";

    struct Fixture {
        ca: TestCa,
        pop: Pop3Sim,
    }

    async fn fixture() -> anyhow::Result<Fixture> {
        ccmail::tls::install_crypto_provider();
        let ca = TestCa::new("pop3 sim test CA")?;
        let entra = EntraSim::start(&ca).await?;
        entra.register_app(SimApp {
            tenant: "3b9f7c1e-0000-4000-8000-000000000001".to_owned(),
            tenant_domain: DOMAIN.to_owned(),
            client_id: "app-1".to_owned(),
            client_secret: "secret-1".to_owned(),
            secret_expired: false,
        });
        let pop = Pop3Sim::start(&ca, entra).await?;
        pop.add_mailbox(MAILBOX);
        pop.add_mailbox(OTHER);
        Ok(Fixture { ca, pop })
    }

    impl Fixture {
        /// A token from the simulated token endpoint, fetched over HTTPS.
        async fn token(&self) -> anyhow::Result<String> {
            let http = reqwest::Client::builder()
                .tls_backend_preconfigured(ccmail::tls::client_config_owned(&[self
                    .ca
                    .cert_der()
                    .clone()])?)
                .build()?;
            let json: serde_json::Value = http
                .post(self.pop.entra().token_url(DOMAIN))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "app-1"),
                    ("client_secret", "secret-1"),
                    ("scope", "https://outlook.office365.com/.default"),
                ])
                .send()
                .await?
                .json()
                .await?;
            Ok(json["access_token"]
                .as_str()
                .context("no access_token")?
                .to_owned())
        }

        async fn tls(&self) -> anyhow::Result<Client> {
            let tcp = tokio::net::TcpStream::connect(self.pop.tls_addr()).await?;
            Client::over_tls(Box::new(tcp), &self.ca).await
        }

        async fn plain(&self) -> anyhow::Result<Client> {
            let tcp = tokio::net::TcpStream::connect(self.pop.plain_addr()).await?;
            Ok(Client {
                stream: Box::new(tcp),
                buf: Vec::new(),
            })
        }

        /// A TLS session logged into `mailbox` with XOAUTH2, greeting consumed.
        async fn login(&self, mailbox: &str) -> anyhow::Result<Client> {
            let token = self.token().await?;
            let mut c = self.tls().await?;
            c.line().await?;
            ensure!(c.cmd("AUTH XOAUTH2").await? == "+ ");
            let reply = c.cmd(&xoauth2(mailbox, &token)).await?;
            ensure!(reply == AUTH_SUCCESS, "login failed: {reply}");
            Ok(c)
        }
    }

    fn xoauth2(user: &str, token: &str) -> String {
        STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
    }

    /// A deliberately dumb POP3 client: raw lines in, raw lines out.
    struct Client {
        stream: Box<dyn Stream>,
        buf: Vec<u8>,
    }

    impl Client {
        async fn over_tls(stream: Box<dyn Stream>, ca: &TestCa) -> anyhow::Result<Client> {
            let config = ccmail::tls::client_config(&[ca.cert_der().clone()])?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from("localhost")?, stream)
                .await?;
            Ok(Client {
                stream: Box::new(tls),
                buf: Vec::new(),
            })
        }

        async fn send(&mut self, line: &str) -> anyhow::Result<()> {
            self.stream
                .write_all(format!("{line}\r\n").as_bytes())
                .await?;
            self.stream.flush().await?;
            Ok(())
        }

        /// One line without its CRLF; a line must end with CRLF.
        async fn line(&mut self) -> anyhow::Result<String> {
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                    return Ok(String::from_utf8(line[..pos].to_vec())?);
                }
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed");
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        async fn cmd(&mut self, line: &str) -> anyhow::Result<String> {
            self.send(line).await?;
            self.line().await
        }

        /// The lines of a multi-line body as sent (still dot-stuffed), without the terminator.
        async fn body(&mut self) -> anyhow::Result<Vec<String>> {
            let mut lines = Vec::new();
            loop {
                let line = self.line().await?;
                if line == "." {
                    return Ok(lines);
                }
                lines.push(line);
            }
        }

        /// Everything until the server closes; `Ok` also for an abrupt (TLS) close.
        async fn rest(&mut self) -> Vec<u8> {
            let mut out = std::mem::take(&mut self.buf);
            let mut chunk = [0u8; 4096];
            while let Ok(n) = self.stream.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
            out
        }
    }

    #[tokio::test]
    async fn greeting_and_capa_on_both_ports_and_stls() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let mut c = fx.tls().await?;
        let greeting = c.line().await?;
        assert!(
            greeting.starts_with(&format!("{GREETING_PREFIX} [")),
            "{greeting}"
        );
        assert!(greeting.ends_with(']'));
        assert_eq!(c.cmd("CAPA").await?, "+OK");
        assert_eq!(
            c.body().await?,
            ["TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER"]
        );

        let mut p = fx.plain().await?;
        assert!(p.line().await?.starts_with(GREETING_PREFIX));
        assert_eq!(p.cmd("CAPA").await?, "+OK");
        assert_eq!(
            p.body().await?,
            ["TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER", "STLS"]
        );
        assert!(
            p.cmd("AUTH XOAUTH2").await?.starts_with("-ERR"),
            "no login in clear"
        );
        assert_eq!(p.cmd("STLS").await?, "+OK Begin TLS negotiation.");
        let mut p = Client::over_tls(p.stream, &fx.ca).await?;
        assert_eq!(p.cmd("CAPA").await?, "+OK");
        assert_eq!(
            p.body().await?,
            ["TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER"]
        );
        assert!(p.cmd("STLS").await?.starts_with("-ERR"));
        let token = fx.token().await?;
        assert_eq!(p.cmd("AUTH XOAUTH2").await?, "+ ");
        assert_eq!(p.cmd(&xoauth2(MAILBOX, &token)).await?, AUTH_SUCCESS);
        assert_eq!(fx.pop.sessions(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn session_limit_refuses_logins_beyond_it_until_a_session_ends() -> anyhow::Result<()> {
        let fx = fixture().await?;
        fx.pop.set_session_limit(Some(1), AUTH_FAILURE);
        let first = fx.login(MAILBOX).await?;
        assert_eq!(fx.pop.active_sessions(MAILBOX), 1);
        let token = fx.token().await?;
        let mut second = fx.tls().await?;
        second.line().await?;
        assert_eq!(second.cmd("AUTH XOAUTH2").await?, "+ ");
        assert_eq!(second.cmd(&xoauth2(MAILBOX, &token)).await?, AUTH_FAILURE);
        // Still in AUTHORIZATION: a transaction command is refused.
        assert!(second.cmd("STAT").await?.starts_with("-ERR"));

        fx.pop.set_session_limit(Some(1), SERVER_UNAVAILABLE);
        assert_eq!(second.cmd("AUTH XOAUTH2").await?, "+ ");
        assert_eq!(
            second.cmd(&xoauth2(MAILBOX, &token)).await?,
            SERVER_UNAVAILABLE
        );

        drop(first);
        crate::wait::wait_for("the first session to end", Duration::from_secs(10), || {
            let n = fx.pop.active_sessions(MAILBOX);
            async move { (n == 0).then_some(()) }
        })
        .await?;
        assert_eq!(second.cmd("AUTH XOAUTH2").await?, "+ ");
        assert_eq!(second.cmd(&xoauth2(MAILBOX, &token)).await?, AUTH_SUCCESS);
        assert_eq!(fx.pop.active_sessions(MAILBOX), 1);
        assert_eq!(fx.pop.auth_failures(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn token_limit_answers_a_long_blob_with_the_protocol_error_and_closes()
    -> anyhow::Result<()> {
        let fx = fixture().await?;
        let token = fx.token().await?;
        let blob = xoauth2(MAILBOX, &token);
        fx.pop.set_token_limit(Some(blob.len() - 1));
        let mut c = fx.tls().await?;
        c.line().await?;
        assert_eq!(c.cmd("AUTH XOAUTH2").await?, "+ ");
        assert_eq!(c.cmd(&blob).await?, ONE_LINE_AUTH_ERROR);
        assert!(c.rest().await.is_empty(), "closed after the error");
        assert_eq!(fx.pop.logins(), 0);

        fx.pop.set_token_limit(Some(blob.len()));
        fx.login(MAILBOX).await?;
        assert_eq!(fx.pop.logins(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn one_line_xoauth2_is_refused_and_the_connection_closed() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let token = fx.token().await?;
        let mut c = fx.tls().await?;
        c.line().await?;
        let blob = xoauth2(MAILBOX, &token);
        assert_eq!(
            c.cmd(&format!("AUTH XOAUTH2 {blob}")).await?,
            ONE_LINE_AUTH_ERROR
        );
        assert!(c.rest().await.is_empty(), "closed after the error");
        assert_eq!(fx.pop.logins(), 0);
        let commands = fx.pop.commands();
        assert_eq!(commands, ["AUTH XOAUTH2 <redacted>"]);
        assert!(!commands.concat().contains(&token));
        Ok(())
    }

    #[tokio::test]
    async fn two_step_xoauth2_logs_in_with_a_token_from_the_endpoint() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let token = fx.token().await?;
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("STAT").await?, "+OK 0 0");
        assert_eq!(fx.pop.logins(), 1);
        let commands = fx.pop.commands();
        assert_eq!(commands, ["AUTH XOAUTH2", "<redacted>", "STAT"]);
        assert!(!commands.concat().contains(&token));
        Ok(())
    }

    #[tokio::test]
    async fn bad_tokens_and_foreign_mailboxes_get_the_exchange_failure_line() -> anyhow::Result<()>
    {
        let fx = fixture().await?;
        let token = fx.token().await?;
        let mut c = fx.tls().await?;
        c.line().await?;
        let attempts = [
            xoauth2(MAILBOX, "forged-token"),
            // A good token for contoso does not open a fabrikam mailbox.
            xoauth2(OTHER, &token),
            // Nor a mailbox that does not exist in its own domain.
            xoauth2("nobody@contoso.example", &token),
            "not base64!".to_owned(),
        ];
        for blob in attempts {
            assert_eq!(c.cmd("AUTH XOAUTH2").await?, "+ ");
            assert_eq!(c.cmd(&blob).await?, AUTH_FAILURE);
        }
        // The connection stays open, as on Exchange; `*` cancels an exchange.
        assert_eq!(c.cmd("AUTH XOAUTH2").await?, "+ ");
        assert!(c.cmd("*").await?.starts_with("-ERR"));
        assert!(
            c.cmd("STAT").await?.starts_with("-ERR"),
            "still not logged in"
        );
        assert_eq!(fx.pop.auth_failures(), 4);

        fx.pop.entra().revoke_all();
        assert_eq!(c.cmd("AUTH XOAUTH2").await?, "+ ");
        assert_eq!(c.cmd(&xoauth2(MAILBOX, &token)).await?, AUTH_FAILURE);
        assert_eq!(fx.pop.logins(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn user_pass_and_auth_plain_check_the_mailbox_password() -> anyhow::Result<()> {
        let fx = fixture().await?;
        fx.pop.set_password(MAILBOX, "hunter2");
        let mut c = fx.tls().await?;
        c.line().await?;
        assert_eq!(c.cmd(&format!("USER {MAILBOX}")).await?, "+OK");
        assert!(c.cmd("PASS wrong").await?.starts_with("-ERR"));
        assert_eq!(c.cmd(&format!("USER {MAILBOX}")).await?, "+OK");
        assert_eq!(
            c.cmd("PASS hunter2").await?,
            "+OK User successfully logged on."
        );

        let plain = STANDARD.encode(format!("\0{MAILBOX}\0hunter2"));
        let mut c = fx.tls().await?;
        c.line().await?;
        assert_eq!(c.cmd(&format!("AUTH PLAIN {plain}")).await?, AUTH_SUCCESS);
        let mut c = fx.tls().await?;
        c.line().await?;
        assert_eq!(c.cmd("AUTH PLAIN").await?, "+ ");
        assert_eq!(
            c.cmd(&STANDARD.encode(format!("\0{MAILBOX}\0nope")))
                .await?,
            AUTH_FAILURE
        );
        assert_eq!(fx.pop.logins(), 2);
        let commands = fx.pop.commands();
        assert!(!commands.concat().contains("hunter2"), "{commands:?}");
        assert!(commands.contains(&"PASS <redacted>".to_owned()));
        assert!(commands.contains(&"AUTH PLAIN <redacted>".to_owned()));
        Ok(())
    }

    #[tokio::test]
    async fn retr_serves_crlf_dot_stuffed_messages_with_estimated_sizes() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let raw = b"Subject: dots\nFrom: a@b.example\n\n.leading dot\n..two dots\nlast".to_vec();
        let uidl = fx.pop.deliver(MAILBOX, raw.clone());
        assert!(uidl.len() <= 70 && uidl.bytes().all(|b| b.is_ascii_graphic()));
        let crlf_len = as_served(&raw).len();

        let mut c = fx.login(MAILBOX).await?;
        let stat = c.cmd("STAT").await?;
        let size: usize = stat.rsplit(' ').next().context("size")?.parse()?;
        assert!(stat.starts_with("+OK 1 "));
        assert!(
            size > crlf_len,
            "LIST/STAT sizes are estimates, never exact"
        );
        assert_eq!(c.cmd("LIST 1").await?, format!("+OK 1 {size}"));
        assert_eq!(c.cmd("UIDL").await?, "+OK");
        assert_eq!(c.body().await?, [format!("1 {uidl}")]);

        c.send("RETR 1").await?;
        let mut wire = Vec::new();
        loop {
            let line = c.line().await?;
            let end = line == ".";
            wire.extend_from_slice(line.as_bytes());
            wire.extend_from_slice(b"\r\n");
            if end {
                break;
            }
        }
        assert_eq!(
            String::from_utf8(wire)?,
            "+OK\r\nSubject: dots\r\nFrom: a@b.example\r\n\r\n..leading dot\r\n...two dots\r\nlast\r\n.\r\n"
        );
        assert_eq!(c.cmd("TOP 1 1").await?, "+OK");
        assert_eq!(
            c.body().await?,
            ["Subject: dots", "From: a@b.example", "", "..leading dot"]
        );
        assert!(c.cmd("RETR 2").await?.starts_with("-ERR"));
        assert!(c.cmd("RETR x").await?.starts_with("-ERR"));
        assert!(c.cmd("FROB").await?.starts_with("-ERR"));
        assert!(
            c.cmd(&"X".repeat(300)).await?.starts_with("-ERR"),
            "over 255 octets"
        );
        assert_eq!(c.cmd("NOOP").await?, "+OK");
        assert_eq!(
            fx.pop.messages(MAILBOX),
            [(uidl, raw)],
            "stored as delivered"
        );
        Ok(())
    }

    #[tokio::test]
    async fn only_quit_applies_dele() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let first = fx
            .pop
            .deliver(MAILBOX, b"Subject: 1\r\n\r\none\r\n".to_vec());
        let second = fx
            .pop
            .deliver(MAILBOX, b"Subject: 2\r\n\r\ntwo\r\n".to_vec());

        // DELE, then the connection just ends: nothing is removed.
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("DELE 1").await?, "+OK");
        assert!(
            c.cmd("RETR 1").await?.starts_with("-ERR"),
            "deleted is gone"
        );
        assert!(c.cmd("DELE 1").await?.starts_with("-ERR"));
        drop(c);
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("UIDL").await?, "+OK");
        assert_eq!(
            c.body().await?,
            [format!("1 {first}"), format!("2 {second}")]
        );

        // RSET unmarks; DELE + QUIT removes.
        assert_eq!(c.cmd("DELE 2").await?, "+OK");
        assert_eq!(c.cmd("RSET").await?, "+OK");
        assert_eq!(c.cmd("DELE 1").await?, "+OK");
        // Delivered during the session: not in this session's maildrop, kept by QUIT.
        let third = fx.pop.deliver(MAILBOX, b"Subject: 3\n\nthree\n".to_vec());
        assert!(c.cmd("RETR 3").await?.starts_with("-ERR"));
        assert!(c.cmd("QUIT").await?.starts_with("+OK"));
        let left: Vec<String> = fx.pop.messages(MAILBOX).into_iter().map(|m| m.0).collect();
        assert_eq!(left, [second.clone(), third.clone()]);

        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("UIDL").await?, "+OK");
        assert_eq!(
            c.body().await?,
            [format!("1 {second}"), format!("2 {third}")]
        );
        Ok(())
    }

    #[tokio::test]
    async fn quit_faults_decide_whether_deletions_happen() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let uidl = fx.pop.deliver(MAILBOX, b"Subject: q\r\n\r\nq\r\n".to_vec());
        fx.pop.set_fault(Some(Fault::DropAfterCommand {
            command: "quit".to_owned(),
        }));
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("DELE 1").await?, "+OK");
        c.send("QUIT").await?;
        assert!(c.rest().await.is_empty());
        assert_eq!(fx.pop.messages(MAILBOX).len(), 1, "dropped before QUIT ran");

        fx.pop.set_fault(Some(Fault::DropBeforeReply {
            command: "QUIT".to_owned(),
        }));
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("DELE 1").await?, "+OK");
        c.send("QUIT").await?;
        assert!(c.rest().await.is_empty(), "no +OK for the QUIT");
        assert!(
            fx.pop.messages(MAILBOX).is_empty(),
            "QUIT ran: {uidl} is gone"
        );
        Ok(())
    }

    #[tokio::test]
    async fn err_and_retr_faults() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let one = fx.pop.deliver(MAILBOX, b"Subject: 1\r\n\r\n1\r\n".to_vec());
        fx.pop.deliver(MAILBOX, b"Subject: 2\r\n\r\n2\r\n".to_vec());
        fx.pop.fail_retr(&one, 2);
        fx.pop.set_fault(Some(Fault::Err {
            command: "RETR 2".to_owned(),
            line: "-ERR [IN-USE] Mailbox in use.".to_owned(),
        }));
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("RETR 1").await?, RETR_FAILURE);
        assert_eq!(c.cmd("RETR 1").await?, RETR_FAILURE);
        assert_eq!(c.cmd("RETR 1").await?, "+OK");
        assert_eq!(c.body().await?, ["Subject: 1", "", "1"]);
        assert_eq!(c.cmd("RETR 2").await?, "-ERR [IN-USE] Mailbox in use.");
        assert_eq!(c.cmd("RETR 2").await?, "-ERR [IN-USE] Mailbox in use.");

        fx.pop.clear_faults();
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("RETR 2").await?, "+OK", "cleared faults do not apply");
        Ok(())
    }

    #[tokio::test]
    async fn drop_after_retr_bytes_cuts_the_message() -> anyhow::Result<()> {
        let fx = fixture().await?;
        fx.pop.deliver(
            MAILBOX,
            format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(5000)).into_bytes(),
        );
        fx.pop.set_fault(Some(Fault::DropAfterRetrBytes(1000)));
        let mut c = fx.login(MAILBOX).await?;
        c.send("RETR 1").await?;
        let got = c.rest().await;
        assert_eq!(got.len(), 1000);
        assert!(got.starts_with(b"+OK\r\nSubject: big\r\n"));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn hang_never_answers_and_ends_on_shutdown() -> anyhow::Result<()> {
        let fx = fixture().await?;
        fx.pop.set_fault(Some(Fault::Hang {
            command: "UIDL".to_owned(),
        }));
        let mut c = fx.login(MAILBOX).await?;
        c.send("UIDL").await?;
        let waited = tokio::time::timeout(Duration::from_secs(3600), c.line()).await;
        assert!(waited.is_err(), "no answer within an hour");

        // Another session is served meanwhile.
        fx.pop.clear_faults();
        let mut other = fx.login(MAILBOX).await?;
        assert_eq!(other.cmd("STAT").await?, "+OK 0 0");

        fx.pop.shutdown();
        assert!(
            c.rest().await.is_empty(),
            "the hung session ends with the simulator"
        );
        fx.pop.stopped().await;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn slow_writes_in_delayed_chunks() -> anyhow::Result<()> {
        let fx = fixture().await?;
        fx.pop.set_fault(Some(Fault::Slow {
            chunk: 10,
            delay: Duration::from_secs(1),
        }));
        let started = tokio::time::Instant::now();
        let mut c = fx.tls().await?;
        let greeting = c.line().await?;
        assert!(greeting.starts_with(GREETING_PREFIX));
        let chunks = (greeting.len() + 2).div_ceil(10) as u64;
        assert!(started.elapsed() >= Duration::from_secs(chunks));
        Ok(())
    }

    #[tokio::test]
    async fn endless_answers_never_reach_a_terminator() -> anyhow::Result<()> {
        let fx = fixture().await?;
        fx.pop.deliver(MAILBOX, b"Subject: 1\r\n\r\n1\r\n".to_vec());
        for command in ["CAPA", "UIDL", "LIST", "RETR 1", "TOP 1 0"] {
            fx.pop.set_fault(Some(Fault::Endless {
                command: command.to_owned(),
            }));
            let mut c = if command == "CAPA" {
                let mut c = fx.tls().await?;
                c.line().await?;
                c
            } else {
                fx.login(MAILBOX).await?
            };
            assert_eq!(c.cmd(command).await?, "+OK", "{command}");
            // Far more than any real answer, and still no terminator.
            let mut octets = 0;
            let mut numbers = Vec::new();
            while octets < 2 << 20 {
                let line = c.line().await?;
                assert_ne!(line, ".", "{command} ended");
                octets += line.len() + 2;
                if numbers.len() < 3 {
                    numbers.push(line.split(' ').next().unwrap_or_default().to_owned());
                }
            }
            if matches!(command, "UIDL" | "LIST") {
                assert_eq!(numbers, ["1", "2", "3"], "{command}: listing-shaped lines");
            }
        }
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn trickle_sends_the_status_line_then_a_few_bytes_a_second() -> anyhow::Result<()> {
        let fx = fixture().await?;
        fx.pop
            .deliver(MAILBOX, b"Subject: slow\r\n\r\nbody\r\n".to_vec());
        fx.pop.set_fault(Some(Fault::Trickle {
            command: "RETR".to_owned(),
            bytes_per_second: 4,
        }));
        let mut c = fx.login(MAILBOX).await?;
        let started = tokio::time::Instant::now();
        assert_eq!(c.cmd("RETR 1").await?, "+OK");
        assert!(started.elapsed() < Duration::from_secs(1), "status at once");
        assert_eq!(c.body().await?, ["Subject: slow", "", "body"]);
        // 27 octets of body and terminator, 4 a second.
        let body = "Subject: slow\r\n\r\nbody\r\n.\r\n".len() as u64;
        assert!(started.elapsed() >= Duration::from_secs(body.div_ceil(4)));
        // Only that response: the next one comes at once.
        let started = tokio::time::Instant::now();
        assert_eq!(c.cmd("NOOP").await?, "+OK");
        assert!(started.elapsed() < Duration::from_secs(1));
        Ok(())
    }

    #[tokio::test]
    async fn listing_lines_are_inserted_where_asked() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let one = fx.pop.deliver(MAILBOX, b"Subject: 1\r\n\r\n1\r\n".to_vec());
        let two = fx.pop.deliver(MAILBOX, b"Subject: 2\r\n\r\n2\r\n".to_vec());
        fx.pop.set_fault(Some(Fault::ListingLine {
            command: "UIDL".to_owned(),
            at: 0,
            line: b"no-number-here".to_vec(),
        }));
        fx.pop.add_fault(Fault::ListingLine {
            command: "UIDL".to_owned(),
            at: 99,
            line: format!("1 {two}").into_bytes(),
        });
        fx.pop.add_fault(Fault::ListingLine {
            command: "LIST".to_owned(),
            at: 1,
            line: b"1 77".to_vec(),
        });
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("UIDL").await?, "+OK");
        assert_eq!(
            c.body().await?,
            [
                "no-number-here".to_owned(),
                format!("1 {one}"),
                format!("2 {two}"),
                format!("1 {two}")
            ]
        );
        assert!(c.cmd("LIST").await?.starts_with("+OK 2 "));
        let list = c.body().await?;
        assert_eq!(list.len(), 3);
        assert_eq!(list[1], "1 77");
        // Single-message answers are untouched.
        assert_eq!(c.cmd("UIDL 1").await?, format!("+OK 1 {one}"));
        Ok(())
    }

    #[tokio::test]
    async fn virtual_entries_make_a_huge_listing_for_free() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let real = fx.pop.deliver(MAILBOX, b"Subject: 1\r\n\r\n1\r\n".to_vec());
        fx.pop
            .set_fault(Some(Fault::VirtualEntries { count: 100_000 }));
        let mut c = fx.login(MAILBOX).await?;
        let stat = c.cmd("STAT").await?;
        assert!(stat.starts_with("+OK 100001 "), "{stat}");
        assert_eq!(c.cmd("UIDL").await?, "+OK");
        let lines = c.body().await?;
        assert_eq!(lines.len(), 100_001);
        assert_eq!(lines[0], format!("1 {real}"));
        assert_eq!(lines[1], format!("2 AAQkADvirtual{:035}", 2));
        let octets: usize = lines.iter().map(|l| l.len() + 2).sum();
        assert!(
            (5_000_000..6_000_000).contains(&octets),
            "about 57 octets a line: {octets}"
        );
        let distinct: std::collections::HashSet<&str> =
            lines.iter().filter_map(|l| l.split(' ').nth(1)).collect();
        assert_eq!(distinct.len(), lines.len(), "virtual UIDLs are unique");
        assert!(c.cmd("LIST").await?.starts_with("+OK 100001 "));
        assert_eq!(
            c.body().await?.last().map(String::as_str),
            Some("100001 1000")
        );
        assert!(
            c.cmd("RETR 2").await?.starts_with("-ERR"),
            "virtual: no content"
        );
        assert_eq!(c.cmd("RETR 1").await?, "+OK");
        assert_eq!(c.body().await?, ["Subject: 1", "", "1"]);
        Ok(())
    }

    #[tokio::test]
    async fn chosen_uidls_are_listed_exactly_as_given() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let long = "L".repeat(4096);
        let uidls = [
            "SAME",
            "SAME",
            "has space",
            "esc\x1b[31mred\x07",
            long.as_str(),
        ];
        for (i, uidl) in uidls.iter().enumerate() {
            fx.pop.deliver_with_uidl(
                MAILBOX,
                uidl,
                format!("Subject: {i}\r\n\r\n{i}\r\n").into_bytes(),
            );
        }
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("UIDL").await?, "+OK");
        let want: Vec<String> = uidls
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{} {u}", i + 1))
            .collect();
        assert_eq!(c.body().await?, want);
        assert_eq!(c.cmd("UIDL 3").await?, "+OK 3 has space");
        // Two different messages behind one UIDL.
        assert_eq!(c.cmd("RETR 2").await?, "+OK");
        assert_eq!(c.body().await?, ["Subject: 1", "", "1"]);
        Ok(())
    }

    #[tokio::test]
    async fn replace_message_reuses_a_uidl_for_new_content() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let uidl = fx
            .pop
            .deliver(MAILBOX, b"Subject: original\r\n\r\nfirst\r\n".to_vec());
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("RETR 1").await?, "+OK");
        assert_eq!(c.body().await?, ["Subject: original", "", "first"]);
        assert!(fx.pop.replace_message(
            MAILBOX,
            &uidl,
            b"Subject: impostor\r\n\r\nsecond\r\n".to_vec()
        ));
        assert!(!fx.pop.replace_message(MAILBOX, "no-such-uidl", Vec::new()));
        // The running session keeps its view; the next one sees new content, same UIDL.
        assert_eq!(c.cmd("RETR 1").await?, "+OK");
        assert_eq!(c.body().await?, ["Subject: original", "", "first"]);
        let mut c = fx.login(MAILBOX).await?;
        assert_eq!(c.cmd("UIDL 1").await?, format!("+OK 1 {uidl}"));
        assert_eq!(c.cmd("RETR 1").await?, "+OK");
        assert_eq!(c.body().await?, ["Subject: impostor", "", "second"]);
        Ok(())
    }

    #[tokio::test]
    async fn shutdown_and_drop_end_listeners_and_sessions() -> anyhow::Result<()> {
        let fx = fixture().await?;
        let mut c = fx.login(MAILBOX).await?;
        let (tls, plain) = (fx.pop.tls_addr(), fx.pop.plain_addr());
        fx.pop.clone().shutdown();
        assert!(tokio::net::TcpStream::connect(tls).await.is_err());
        assert!(tokio::net::TcpStream::connect(plain).await.is_err());
        assert!(c.rest().await.is_empty());
        fx.pop.stopped().await;

        let fx = fixture().await?;
        let addr = fx.pop.tls_addr();
        let life = fx.pop.shared.life.clone();
        let mut c = fx.login(MAILBOX).await?;
        drop(fx);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert!(c.rest().await.is_empty());
        life.stopped().await;
        Ok(())
    }

    #[test]
    fn microsofts_documented_xoauth2_blob_parses() -> anyhow::Result<()> {
        let blob = "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ==";
        let parsed = decode_base64(blob).and_then(|b| parse_xoauth2(&b));
        assert_eq!(
            parsed,
            Some((
                "test@contoso.onmicrosoft.com".to_owned(),
                "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA".to_owned()
            ))
        );
        assert_eq!(parse_xoauth2(b"user=a@b\x01auth=Bearer t\x01"), None);
        Ok(())
    }

    #[test]
    fn fault_commands_match_whole_words() {
        let retr = Fault::Err {
            command: "RETR".to_owned(),
            line: "-ERR".to_owned(),
        };
        assert!(retr.matches("retr 1"));
        assert!(retr.matches("RETR"));
        assert!(!retr.matches("RETRX 1"));
        let retr2 = Fault::Hang {
            command: "RETR 2".to_owned(),
        };
        assert!(retr2.matches("RETR 2"));
        assert!(!retr2.matches("RETR 20"));
        assert!(!Fault::DropAfterRetrBytes(3).matches("RETR 1"));
    }

    #[test]
    fn uidls_are_unique_and_exchange_shaped() {
        let a = new_uidl(1);
        let b = new_uidl(2);
        assert_ne!(a, b);
        assert!(a.starts_with("AAQkAD") && a.len() <= 70);
    }
}
