//! POP3 protocol states as types: a [`Client`] is in the AUTHORIZATION state, logging in
//! consumes it and yields a [`Session`] in the TRANSACTION state, `quit` consumes the session.
//!
//! The stream type is generic so tests drive the client over `tokio::io::duplex` and assert the
//! exact bytes written. Real connections use [`Stream`] and [`Client::connect`].
//!
//! Order rules that matter (RFC 1939 §6): deletions happen only when QUIT is answered in the
//! TRANSACTION state. Dropping a [`Session`] without calling [`Session::quit`] closes the socket
//! and the server deletes nothing, which is what callers want after any failure.
//!
//! Nothing the server sends is trusted: every answer is bounded in size and time (see
//! `connection.rs`), listings are judged line by line ([`Session::uidl_listing`]), and a UIDL
//! that does not identify exactly one message is reported as such, never passed on as if it
//! did.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use super::codec::{
    self, AuthReply, BodyDecoder, Capabilities, CodecError, Command, LineDecoder, Listing,
    ListingDecoder, MultiLine, Progress, StatusLine,
};
use super::connection::{Connection, Stream, Timeouts};
use super::{Error, sasl};
pub use crate::model::TlsMode;

/// Where and how to connect. Built once per pilot; the TLS configuration inside is shared by
/// every connection to that server.
#[derive(Clone)]
pub struct ServerSpec {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub timeouts: Timeouts,
    tls_config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ServerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSpec")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl ServerSpec {
    /// A server verified against the Mozilla roots plus `extra_roots` (for on-premises servers
    /// with a private CA, and for tests).
    pub fn new(
        host: impl Into<String>,
        port: u16,
        tls: TlsMode,
        extra_roots: &[CertificateDer<'static>],
        timeouts: Timeouts,
    ) -> Result<ServerSpec, Error> {
        Ok(ServerSpec {
            host: host.into(),
            port,
            tls,
            timeouts,
            tls_config: crate::tls::client_config(extra_roots)?,
        })
    }
}

/// The AUTHORIZATION state: greeting read, not logged in.
#[derive(Debug)]
pub struct Client<S> {
    conn: Connection<S>,
    greeting: StatusLine,
    capabilities: Option<Capabilities>,
    allow_plaintext_auth: bool,
}

/// The TRANSACTION state: logged in.
#[derive(Debug)]
pub struct Session<S> {
    conn: Connection<S>,
    /// The server listed `PIPELINING` in CAPA (RFC 2449 §6.6).
    offers_pipelining: bool,
    /// Commands may be sent ahead: offered, and not turned off by the caller.
    pipelining: bool,
    /// Commands sent ahead whose replies are not read yet, oldest first; at most
    /// [`PIPELINE_WINDOW`]. Every command other than the `RETR` at the front (and a pipelined
    /// `DELE`) first settles these.
    pending: VecDeque<Pending>,
}

/// A command sent ahead under PIPELINING, awaiting its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Retr { n: u32, limit: usize },
    Dele(u32),
}

/// Most commands a [`Session`] keeps in flight under PIPELINING. The server streams the
/// replies into the socket while the client parses and stores the previous message; a few are
/// enough to hide the round trip, and the kernel's socket buffers (not ours) hold what waits.
pub const PIPELINE_WINDOW: usize = 16;

/// Upper bound of a CAPA body: real ones are a few hundred octets.
const CAPA_LIMIT: usize = 64 * 1024;

/// Most entries [`Session::uidl_all`] and [`Session::list_all`] return; a larger maildrop needs
/// [`Session::uidl_listing`] with a cap.
pub const LIST_ALL_MAX_ENTRIES: usize = 1_000_000;

impl Client<Stream> {
    /// Connects, performs TLS as the spec says, reads the greeting and asks CAPA. Each step has
    /// its own deadline.
    pub async fn connect(spec: &ServerSpec) -> Result<Client<Stream>, Error> {
        Client::connect_greeting_within(spec, None).await
    }

    /// [`Client::connect`], waiting at most `greeting` (when shorter than the command
    /// deadline) for the greeting: a diagnosis wants a server that accepts the connection but
    /// never greets found quickly.
    pub async fn connect_greeting_within(
        spec: &ServerSpec,
        greeting: Option<Duration>,
    ) -> Result<Client<Stream>, Error> {
        let t = spec.timeouts;
        let tcp = match timeout(
            t.connect,
            TcpStream::connect((spec.host.as_str(), spec.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    host: spec.host.clone(),
                    port: spec.port,
                    source,
                });
            }
            Err(_) => {
                return Err(Error::Timeout {
                    during: "TCP connect",
                    after: t.connect,
                });
            }
        };
        // Commands are one line each and we always wait for the answer: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        match spec.tls {
            TlsMode::Implicit => {
                let tls = handshake(spec, tcp).await?;
                let conn = Connection::new(Stream::Tls(Box::new(tls)), true, t);
                let mut client = Client::greeted(conn, false, greeting).await?;
                client.capa().await?;
                Ok(client)
            }
            TlsMode::StartTls => {
                let conn = Connection::new(Stream::Plain(tcp), false, t);
                let mut client = Client::greeted(conn, false, greeting).await?;
                let offers_stls = client.capa().await?.is_some_and(|c| c.has("STLS"));
                if !offers_stls {
                    return Err(Error::NotSupported {
                        what: "STLS",
                        hint: "use implicit TLS (usually port 995) for this server",
                    });
                }
                let status = client.conn.command(&Command::Stls).await?;
                if !status.ok {
                    return Err(server_error("STLS", status));
                }
                let Stream::Plain(tcp) = client.conn.into_stream()? else {
                    return Err(Error::Protocol("STLS on an encrypted stream".to_owned()));
                };
                let tls = handshake(spec, tcp).await?;
                let conn = Connection::new(Stream::Tls(Box::new(tls)), true, t);
                let mut client = Client {
                    conn,
                    greeting: client.greeting,
                    capabilities: None,
                    allow_plaintext_auth: false,
                };
                // RFC 2595 §4: capabilities learnt before the upgrade must be discarded.
                client.capa().await?;
                Ok(client)
            }
            TlsMode::DangerousPlaintext => {
                let conn = Connection::new(Stream::Plain(tcp), false, t);
                let mut client = Client::from_connection(conn, true).await?;
                client.capa().await?;
                Ok(client)
            }
        }
    }
}

async fn handshake(
    spec: &ServerSpec,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let name = ServerName::try_from(spec.host.clone())
        .map_err(|_| Error::InvalidRequest(format!("{:?} is not a valid host name", spec.host)))?;
    let connector = tokio_rustls::TlsConnector::from(spec.tls_config.clone());
    match timeout(spec.timeouts.tls, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(classify_tls_error(&spec.host, e)),
        Err(_) => Err(Error::Timeout {
            during: "TLS handshake",
            after: spec.timeouts.tls,
        }),
    }
}

/// Certificate problems need a person; anything else in the handshake is network trouble.
fn classify_tls_error(host: &str, e: std::io::Error) -> Error {
    use rustls::CertificateError as C;
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(cert_error)) => {
            let hint = match cert_error {
                C::UnknownIssuer | C::BadSignature => {
                    "the server's certificate is not signed by a trusted CA; for an on-premises server with a private CA set the pilot's ca_bundle to that CA's PEM file"
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "the certificate does not name this host; use the host name printed on the certificate (outlook.office365.com for Exchange Online)"
                }
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => {
                    "the certificate is outside its validity period; check this machine's clock, then the server's certificate"
                }
                C::Revoked => "the server's certificate has been revoked",
                _ => "check the server's certificate chain",
            };
            Error::TlsCertificate {
                host: host.to_owned(),
                reason: cert_error_text(cert_error),
                hint,
            }
        }
        // An io::Error wrapping a rustls::Error displays as the rustls error.
        _ => Error::TlsHandshake {
            host: host.to_owned(),
            source: e,
        },
    }
}

fn cert_error_text(e: &rustls::CertificateError) -> String {
    // rustls' Display is precise but long for context variants; keep the first sentence.
    let text = rustls::Error::InvalidCertificate(e.clone()).to_string();
    text.split(" (").next().unwrap_or(&text).to_owned()
}

fn server_error(command: &'static str, status: StatusLine) -> Error {
    Error::Server {
        command,
        code: status.code,
        text: status.text,
    }
}

/// Whether a refused login says the server is busy rather than judging the credentials:
/// RFC 2449 `[SYS/TEMP]` and `[IN-USE]`, and Exchange Online's `Server Unavailable. 21`
/// (sent without a response code).
fn is_busy(status: &StatusLine) -> bool {
    matches!(status.code.as_deref(), Some("SYS/TEMP") | Some("IN-USE"))
        || status
            .text
            .to_ascii_lowercase()
            .starts_with("server unavailable")
}

/// Exchange Online answers an XOAUTH2 response carrying a token longer than it accepts with
/// `-ERR Protocol error. Connection is closed. 10` and hangs up.
fn is_cut_off(status: &StatusLine) -> bool {
    status.code.is_none()
        && status
            .text
            .to_ascii_lowercase()
            .starts_with("protocol error. connection is closed")
}

fn auth_rejected(mechanism: &'static str, status: StatusLine, detail: Option<String>) -> Error {
    if is_busy(&status) {
        return Error::ServerBusy {
            mechanism,
            code: status.code,
            text: status.text,
        };
    }
    Error::AuthRejected {
        mechanism,
        code: status.code,
        text: status.text,
        detail,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps a connected stream and reads the greeting. `secure` says whether the stream is
    /// encrypted; credentials are never sent over an unencrypted one.
    pub async fn new(stream: S, secure: bool, timeouts: Timeouts) -> Result<Client<S>, Error> {
        Client::from_connection(Connection::new(stream, secure, timeouts), false).await
    }

    async fn from_connection(
        conn: Connection<S>,
        allow_plaintext_auth: bool,
    ) -> Result<Client<S>, Error> {
        Client::greeted(conn, allow_plaintext_auth, None).await
    }

    /// Reads the greeting, within `within` when given (the connection's hard deadline is
    /// restored afterwards).
    async fn greeted(
        mut conn: Connection<S>,
        allow_plaintext_auth: bool,
        within: Option<Duration>,
    ) -> Result<Client<S>, Error> {
        let hard = conn.deadline();
        if let Some(within) = within {
            let limit = Instant::now() + within;
            conn.set_deadline(Some(hard.map_or(limit, |h| h.min(limit))));
        }
        let greeting = conn.read_status("greeting").await;
        conn.set_deadline(hard);
        let greeting = greeting?;
        if !greeting.ok {
            return Err(server_error("greeting", greeting));
        }
        Ok(Client {
            conn,
            greeting,
            capabilities: None,
            allow_plaintext_auth,
        })
    }

    /// The server's greeting (match only on `+OK`: Exchange Online's text changed in 2025).
    pub fn greeting(&self) -> &StatusLine {
        &self.greeting
    }

    /// What the last CAPA said, if it was asked and answered.
    pub fn capabilities(&self) -> Option<&Capabilities> {
        self.capabilities.as_ref()
    }

    /// Whether the connection is encrypted.
    pub fn is_secure(&self) -> bool {
        self.conn.is_secure()
    }

    /// Sets (or lifts) a hard deadline over every later wait of this connection, kept by the
    /// [`Session`] after login; see [`Session::set_deadline`].
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.conn.set_deadline(deadline);
    }

    /// RFC 2449 §5: asks CAPA. A server without CAPA answers `-ERR`: that is `Ok(None)`.
    /// A body over 64 KiB is not a capability list: [`Error::ResponseTooLong`].
    pub async fn capa(&mut self) -> Result<Option<&Capabilities>, Error> {
        let status = self.conn.command(&Command::Capa).await?;
        if !status.ok {
            self.capabilities = None;
            return Ok(None);
        }
        let mut decoder = MultiLine::with_wire_limit(CAPA_LIMIT, CAPA_LIMIT as u64);
        self.conn.read_body(&mut decoder, "CAPA").await?;
        // Bare LFs decode to CRLF, so the kept body can outgrow the wire limit.
        let body = decoder.finish().map_err(|_| Error::ResponseTooLong {
            during: "CAPA",
            limit: CAPA_LIMIT as u64,
        })?;
        self.capabilities = Some(Capabilities::parse(&body));
        Ok(self.capabilities.as_ref())
    }

    fn ensure_may_send_credentials(&self) -> Result<(), Error> {
        if self.conn.is_secure() || self.allow_plaintext_auth {
            Ok(())
        } else {
            Err(Error::PlaintextAuthRefused)
        }
    }

    /// Logs in with SASL XOAUTH2 in two steps, the only form Exchange Online accepts:
    /// `AUTH XOAUTH2`, wait for `+`, then the base64 response on its own line. (The one-line
    /// form with an initial response is answered `-ERR Protocol error. Connection is closed. 10`.)
    /// If the server answers the response with an error challenge `+ <data>`, an empty line is
    /// sent and the final `-ERR` read (RFC 7628 §3.2.3 behaviour, which Dovecot follows).
    pub async fn auth_xoauth2(
        mut self,
        user: &str,
        token: &SecretString,
    ) -> Result<Session<S>, Error> {
        const MECH: &str = "XOAUTH2";
        self.ensure_may_send_credentials()?;
        if let Some(caps) = &self.capabilities
            && caps.advertises_sasl()
            && !caps.has_sasl(MECH)
        {
            return Err(Error::NotSupported {
                what: "SASL XOAUTH2",
                hint: "for Exchange Online use outlook.office365.com; an on-premises Exchange needs OAuth enabled for POP",
            });
        }
        match self.conn.sasl_step(&Command::Auth(MECH)).await? {
            AuthReply::Continue(_) => {}
            AuthReply::Done(status) if !status.ok => return Err(auth_rejected(MECH, status, None)),
            AuthReply::Done(_) => {
                return Err(Error::Protocol(
                    "+OK to AUTH XOAUTH2 before any credentials were sent".to_owned(),
                ));
            }
        }
        let response = sasl::xoauth2_response(user, token);
        match self
            .conn
            .sasl_step(&Command::SaslResponse(&response))
            .await?
        {
            AuthReply::Done(status) if status.ok => Ok(self.into_session()),
            // Only right after the response: the same line to the bare `AUTH XOAUTH2` would
            // be a different mistake.
            AuthReply::Done(status) if is_cut_off(&status) => Err(Error::TokenTooLong {
                length: token.expose_secret().len(),
                text: status.text,
            }),
            AuthReply::Done(status) => Err(auth_rejected(MECH, status, None)),
            AuthReply::Continue(challenge) => {
                let detail = sasl::decode_challenge(&challenge);
                let empty = SecretString::from("");
                match self.conn.sasl_step(&Command::SaslResponse(&empty)).await? {
                    AuthReply::Done(status) if status.ok => Ok(self.into_session()),
                    AuthReply::Done(status) => Err(auth_rejected(MECH, status, detail)),
                    AuthReply::Continue(_) => Err(Error::Protocol(
                        "a second SASL challenge after the XOAUTH2 error challenge".to_owned(),
                    )),
                }
            }
        }
    }

    /// The TRANSACTION state on this connection; PIPELINING is used if the last CAPA offered it.
    fn into_session(self) -> Session<S> {
        let pipelining = self
            .capabilities
            .as_ref()
            .is_some_and(|caps| caps.has("PIPELINING"));
        Session {
            conn: self.conn,
            offers_pipelining: pipelining,
            pipelining,
            pending: VecDeque::new(),
        }
    }

    /// Logs in with `USER` / `PASS` (RFC 1939 §7), for servers without OAuth.
    pub async fn auth_user_pass(
        mut self,
        user: &str,
        password: &SecretString,
    ) -> Result<Session<S>, Error> {
        const MECH: &str = "USER/PASS";
        self.ensure_may_send_credentials()?;
        let status = self.conn.command(&Command::User(user)).await?;
        if !status.ok {
            return Err(auth_rejected(MECH, status, None));
        }
        let status = self.conn.command(&Command::Pass(password)).await?;
        if !status.ok {
            return Err(auth_rejected(MECH, status, None));
        }
        Ok(self.into_session())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Whether an earlier failure made the connection unusable (then drop the session).
    pub fn is_poisoned(&self) -> bool {
        self.conn.is_poisoned()
    }

    /// Sets (or with `None` lifts) a hard deadline over every later wait: each command's own
    /// deadline becomes the earlier of its own and this one. A wait cut by it fails with
    /// [`Error::Timeout`] and poisons the session; after it, every command fails at once
    /// without writing anything, QUIT included (lift or move it first to still QUIT).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.conn.set_deadline(deadline);
    }

    /// The hard deadline, if one is set.
    pub fn deadline(&self) -> Option<Instant> {
        self.conn.deadline()
    }

    /// Whether the server offers PIPELINING, so [`Session::send_retr`] may be used.
    pub fn pipelining(&self) -> bool {
        self.pipelining
    }

    /// Turns PIPELINING off (or back on, if the server offered it) for this session; what is
    /// in flight already is still read in turn.
    pub fn set_pipelining(&mut self, on: bool) {
        self.pipelining = on && self.offers_pipelining;
    }

    /// Replies still to be read for commands sent ahead.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Message numbers of the `RETR`s sent ahead, oldest first.
    pub fn retrs_in_flight(&self) -> impl Iterator<Item = u32> + '_ {
        self.pending.iter().filter_map(|p| match p {
            Pending::Retr { n, .. } => Some(*n),
            Pending::Dele(_) => None,
        })
    }

    /// RFC 2449 §6.6: sends `RETR n` now and reads its reply later, in order, when
    /// [`Session::retr`] asks for `n` (with `limit`, kept to drain the body if it is never
    /// asked for). Only when the server offers PIPELINING, and at most
    /// [`PIPELINE_WINDOW`] commands in flight ([`Error::InvalidRequest`] otherwise, nothing
    /// written). The write has the command deadline; a failure poisons the session.
    pub async fn send_retr(&mut self, n: u32, limit: usize) -> Result<(), Error> {
        self.send_ahead(Pending::Retr { n, limit }).await
    }

    async fn send_ahead(&mut self, what: Pending) -> Result<(), Error> {
        if !self.pipelining {
            return Err(Error::InvalidRequest(
                "commands sent ahead need a server that offers PIPELINING".to_owned(),
            ));
        }
        if self.pending.len() >= PIPELINE_WINDOW {
            return Err(Error::InvalidRequest(format!(
                "at most {PIPELINE_WINDOW} commands may be in flight"
            )));
        }
        let cmd = match what {
            Pending::Retr { n, .. } => Command::Retr(n),
            Pending::Dele(n) => Command::Dele(n),
        };
        self.conn.send(&cmd).await?;
        self.pending.push_back(what);
        Ok(())
    }

    /// Reads the reply to the oldest command sent ahead. A `RETR` body is read and thrown
    /// away (nobody asked for it any more: none of it is kept, the wire limit of its own
    /// `limit` applies, the session stays usable); a refused `DELE` poisons the session, because the caller has
    /// already moved on as if it had been accepted and must not reach QUIT.
    async fn settle_front(&mut self) -> Result<(), Error> {
        let Some(front) = self.pending.pop_front() else {
            return Ok(());
        };
        match front {
            Pending::Retr { n, limit } => {
                let status = self.conn.read_status("RETR").await?;
                if status.ok {
                    tracing::debug!(
                        message = n,
                        "discarding a RETR sent ahead that was not used"
                    );
                    let mut decoder =
                        MultiLine::with_wire_limit(0, codec::default_wire_limit(limit));
                    self.conn.read_body(&mut decoder, "RETR").await?;
                }
                Ok(())
            }
            Pending::Dele(n) => {
                let status = self.conn.read_status("DELE").await?;
                if status.ok {
                    Ok(())
                } else {
                    self.conn.poison();
                    Err(Error::Protocol(format!(
                        "DELE {n}, sent ahead, was refused ({}); the session ends without QUIT so nothing is deleted",
                        status.text
                    )))
                }
            }
        }
    }

    /// Reads every reply still outstanding; see [`Session::settle_front`].
    async fn settle_all(&mut self) -> Result<(), Error> {
        while !self.pending.is_empty() {
            self.settle_front().await?;
        }
        Ok(())
    }

    async fn simple(&mut self, cmd: Command<'_>) -> Result<StatusLine, Error> {
        // Replies come back in order: those of commands sent ahead come first.
        self.settle_all().await?;
        let name = cmd.name();
        let status = self.conn.command(&cmd).await?;
        if status.ok {
            Ok(status)
        } else {
            Err(server_error(name, status))
        }
    }

    async fn multiline(&mut self, cmd: Command<'_>, limit: usize) -> Result<Vec<u8>, Error> {
        let name = cmd.name();
        self.simple(cmd).await?;
        self.conn.read_multiline(limit, name).await
    }

    /// `STAT`: message count and maildrop size in octets (an estimate on Exchange Online).
    pub async fn stat(&mut self) -> Result<(u32, u64), Error> {
        let status = self.simple(Command::Stat).await?;
        codec::parse_stat(&status.text)
            .ok_or_else(|| Error::Protocol(format!("unreadable STAT answer {:?}", status.text)))
    }

    /// `UIDL` (RFC 1939 §7): the unique-id listing, judged line by line, with at most
    /// `max_entries` entries kept (the rest is read and discarded, `truncated` says so). A bad
    /// line spoils only its own entry; a UIDL listed for several messages is
    /// [`ListedUidl::Shared`](codec::ListedUidl::Shared). Memory is O(`max_entries`); the
    /// listing may take [`codec::MAX_LISTING_BYTES`] on the wire (beyond:
    /// [`Error::ListingTooLarge`], the session is poisoned). The session stays usable after a
    /// listing read to its end, truncated or not.
    pub async fn uidl_listing(&mut self, max_entries: usize) -> Result<Listing, Error> {
        self.simple(Command::Uidl(None)).await?;
        let mut decoder = ListingDecoder::new(max_entries, codec::MAX_LISTING_BYTES);
        self.conn.read_body(&mut decoder, "UIDL").await?;
        let listing = decoder.finish();
        tracing::trace!(
            entries = listing.entries.len(),
            truncated = listing.truncated,
            unreadable = listing.unreadable_lines,
            "pop3 recv UIDL listing"
        );
        Ok(listing)
    }

    /// `UIDL` for every message whose UIDL identifies it alone: (message number, unique id),
    /// in server order. Messages with a shared or malformed UIDL, and lines without a message
    /// number, are left out (and counted in a warning): they cannot be told apart safely. Use
    /// [`Session::uidl_listing`] to see them. More than [`LIST_ALL_MAX_ENTRIES`] entries:
    /// [`Error::TooManyEntries`].
    pub async fn uidl_all(&mut self) -> Result<Vec<(u32, String)>, Error> {
        let listing = self.uidl_listing(LIST_ALL_MAX_ENTRIES).await?;
        if listing.truncated {
            return Err(Error::TooManyEntries {
                command: "UIDL",
                limit: LIST_ALL_MAX_ENTRIES,
            });
        }
        let listed = listing.entries.len();
        let unique: Vec<(u32, String)> = listing
            .entries
            .into_iter()
            .filter_map(|e| match e.uidl {
                codec::ListedUidl::Unique(uidl) => Some((e.number, uidl)),
                _ => None,
            })
            .collect();
        let left_out = listed - unique.len();
        if left_out > 0 || listing.unreadable_lines > 0 {
            tracing::warn!(
                left_out,
                unreadable_lines = listing.unreadable_lines,
                "UIDL listing: messages with a shared or malformed unique-id were left out"
            );
        }
        Ok(unique)
    }

    /// `UIDL n`. The whole rest of the answer is the unique-id (RFC 1939 §7); one that is not
    /// 1–70 printable characters is an error.
    pub async fn uidl(&mut self, n: u32) -> Result<String, Error> {
        let status = self.simple(Command::Uidl(Some(n))).await?;
        let unreadable =
            |why: &str| Error::Protocol(format!("unreadable UIDL answer {:?}: {why}", status.text));
        if status.escaped {
            return Err(unreadable("it contains control characters"));
        }
        match codec::parse_uidl_answer(&status.text) {
            Ok((_, uidl)) => Ok(uidl.to_owned()),
            Err(why) => Err(unreadable(why)),
        }
    }

    /// `LIST` for every message: (message number, size in octets as the server estimates it),
    /// read line by line; lines without a number and size are left out. More than
    /// [`LIST_ALL_MAX_ENTRIES`] entries: [`Error::TooManyEntries`].
    pub async fn list_all(&mut self) -> Result<Vec<(u32, u64)>, Error> {
        self.simple(Command::List(None)).await?;
        let mut decoder = ScanListing {
            lines: LineDecoder::new(codec::MAX_LISTING_LINE, codec::MAX_LISTING_BYTES),
            entries: Vec::new(),
            more: false,
        };
        self.conn.read_body(&mut decoder, "LIST").await?;
        if decoder.more {
            return Err(Error::TooManyEntries {
                command: "LIST",
                limit: LIST_ALL_MAX_ENTRIES,
            });
        }
        Ok(decoder.entries)
    }

    /// `LIST n`.
    pub async fn list(&mut self, n: u32) -> Result<u64, Error> {
        let status = self.simple(Command::List(Some(n))).await?;
        codec::parse_listing_line(&status.text)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| Error::Protocol(format!("unreadable LIST answer {:?}", status.text)))
    }

    /// `TOP n lines`: the headers and the first `lines` body lines, at most `limit` octets.
    pub async fn top(&mut self, n: u32, lines: u32, limit: usize) -> Result<Vec<u8>, Error> {
        self.multiline(Command::Top(n, lines), limit).await
    }

    /// `RETR n` into memory, at most `limit` octets. Over the limit: [`Error::TooLarge`], the
    /// rest of the message is read and discarded and the session stays usable.
    ///
    /// If `RETR n` was sent ahead ([`Session::send_retr`]), the replies before it are read
    /// first (a `RETR` nobody asked for any more is read and thrown away) and then its own;
    /// otherwise the command is sent now.
    pub async fn retr(&mut self, n: u32, limit: usize) -> Result<Vec<u8>, Error> {
        let sent_ahead = |p: &Pending| matches!(p, Pending::Retr { n: m, .. } if *m == n);
        if !self.pending.iter().any(sent_ahead) {
            return self.multiline(Command::Retr(n), limit).await;
        }
        while !self.pending.front().is_some_and(sent_ahead) {
            self.settle_front().await?;
        }
        self.pending.pop_front();
        let status = self.conn.read_status("RETR").await?;
        if !status.ok {
            return Err(server_error("RETR", status));
        }
        self.conn.read_multiline(limit, "RETR").await
    }

    /// `DELE n`: marks the message; the server removes it only at QUIT.
    ///
    /// While other commands are in flight under PIPELINING the `DELE` joins them and its reply
    /// is read in turn; if the server refuses it then, the session is poisoned (it must end
    /// without QUIT, so nothing is deleted): a caller may count a pipelined `DELE` as done
    /// only once QUIT succeeded.
    pub async fn dele(&mut self, n: u32) -> Result<(), Error> {
        if self.pipelining && !self.pending.is_empty() && self.pending.len() < PIPELINE_WINDOW {
            return self.send_ahead(Pending::Dele(n)).await;
        }
        self.simple(Command::Dele(n)).await.map(drop)
    }

    /// `RSET`: unmarks every message marked for deletion.
    pub async fn rset(&mut self) -> Result<(), Error> {
        self.simple(Command::Rset).await.map(drop)
    }

    /// `NOOP`.
    pub async fn noop(&mut self) -> Result<(), Error> {
        self.simple(Command::Noop).await.map(drop)
    }

    /// `QUIT`: enters the UPDATE state; the server removes the marked messages and closes.
    pub async fn quit(mut self) -> Result<(), Error> {
        self.simple(Command::Quit).await?;
        self.conn.shutdown().await;
        Ok(())
    }
}

/// A scan listing (RFC 1939 §5 LIST) decoded line by line into (number, size) pairs.
struct ScanListing {
    lines: LineDecoder,
    entries: Vec<(u32, u64)>,
    more: bool,
}

impl BodyDecoder for ScanListing {
    fn decode_body(&mut self, buf: &[u8]) -> Result<Progress, CodecError> {
        let ScanListing {
            lines,
            entries,
            more,
        } = self;
        lines.decode(buf, |line, _| {
            let Ok(line) = std::str::from_utf8(line) else {
                return;
            };
            let Some((n, size)) =
                codec::parse_listing_line(line).and_then(|(n, v)| Some((n, v.parse().ok()?)))
            else {
                return;
            };
            if entries.len() < LIST_ALL_MAX_ENTRIES {
                entries.push((n, size));
            } else {
                *more = true;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, duplex};

    /// One scripted exchange: what the client must write (exactly), and what the server
    /// answers.
    enum Step {
        S(&'static str),
        C(String),
    }

    /// Plays the server side of a transcript, asserting the exact bytes the client writes.
    async fn serve(stream: DuplexStream, script: Vec<Step>) -> Vec<String> {
        let (read, mut write) = tokio::io::split(stream);
        let mut read = BufReader::new(read);
        let mut written = Vec::new();
        for step in script {
            match step {
                Step::S(text) => write.write_all(text.as_bytes()).await.unwrap(),
                Step::C(want) => {
                    let mut line = String::new();
                    read.read_line(&mut line).await.unwrap();
                    assert_eq!(line, want, "client wrote the wrong bytes");
                    written.push(line);
                }
            }
        }
        written
    }

    fn c(s: &str) -> Step {
        Step::C(format!("{s}\r\n"))
    }

    const GREETING: &str =
        "+OK The Microsoft Exchange POP3 service is ready. [UwBOADIAUABSADEA]\r\n";
    const CAPA: &str = "+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n";

    #[tokio::test]
    async fn microsoft_documented_two_step_xoauth2_transcript() {
        let (client_side, server_side) = duplex(1 << 16);
        let blob = "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ==";
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S(GREETING),
                c("CAPA"),
                Step::S(CAPA),
                c("AUTH XOAUTH2"),
                Step::S("+ \r\n"),
                c(blob),
                Step::S("+OK User successfully authenticated.\r\n"),
                c("STAT"),
                Step::S("+OK 1 1234\r\n"),
                c("QUIT"),
                Step::S("+OK Microsoft Exchange Server POP3 server signing off.\r\n"),
            ],
        ));
        let mut client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        assert!(client.capa().await.unwrap().unwrap().has_sasl("XOAUTH2"));
        let token = SecretString::from("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA");
        let mut session = client
            .auth_xoauth2("test@contoso.onmicrosoft.com", &token)
            .await
            .unwrap();
        assert_eq!(session.stat().await.unwrap(), (1, 1234));
        session.quit().await.unwrap();
        let written = server.await.unwrap();
        // Never the one-line form.
        assert!(written.iter().all(|l| !l.starts_with("AUTH XOAUTH2 ")));
    }

    #[tokio::test]
    async fn bare_plus_continuation_is_accepted() {
        let (client_side, server_side) = duplex(1 << 16);
        let token = SecretString::from("tok");
        let blob = sasl::xoauth2_response("a@b.test", &token);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK ready\r\n"),
                c("AUTH XOAUTH2"),
                Step::S("+\r\n"),
                Step::C(format!("{}\r\n", blob.expose_secret())),
                Step::S("+OK\r\n"),
            ],
        ));
        let client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        client.auth_xoauth2("a@b.test", &token).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn exchange_auth_failure_is_auth_rejected_with_its_text() {
        let (client_side, server_side) = duplex(1 << 16);
        let token = SecretString::from("bad");
        let blob = sasl::xoauth2_response("a@b.test", &token);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S(GREETING),
                c("AUTH XOAUTH2"),
                Step::S("+ \r\n"),
                Step::C(format!("{}\r\n", blob.expose_secret())),
                Step::S("-ERR Authentication failure: unknown user name or bad password.\r\n"),
            ],
        ));
        let client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        let err = client.auth_xoauth2("a@b.test", &token).await.unwrap_err();
        match &err {
            Error::AuthRejected { text, .. } => assert_eq!(
                text,
                "Authentication failure: unknown user name or bad password."
            ),
            other => panic!("{other:?}"),
        }
        assert!(err.is_permanent() && !err.is_transient());
        assert!(err.hint().unwrap().contains("POP.AccessAsApp"));
        assert!(!err.to_string().contains("bad\u{1}"));
        server.await.unwrap();
    }

    /// The answers Exchange gives a login for a busy server or a token it cannot take are
    /// classified, not folded into the generic authentication failure.
    #[tokio::test]
    async fn busy_server_and_cut_off_token_are_their_own_errors() {
        let token = SecretString::from("x".repeat(4321));
        let blob = sasl::xoauth2_response("a@b.test", &token);
        for (answer, after_blob) in [
            ("-ERR Server Unavailable. 21\r\n", true),
            ("-ERR [SYS/TEMP] try later\r\n", true),
            ("-ERR [IN-USE] mailbox locked\r\n", false),
            ("-ERR Server Unavailable. 21\r\n", false),
            ("-ERR Protocol error. Connection is closed. 10\r\n", true),
        ] {
            let (client_side, server_side) = duplex(1 << 16);
            let mut steps = vec![Step::S(GREETING), c("AUTH XOAUTH2")];
            if after_blob {
                steps.push(Step::S("+ \r\n"));
                steps.push(Step::C(format!("{}\r\n", blob.expose_secret())));
            }
            steps.push(Step::S(answer));
            let server = tokio::spawn(serve(server_side, steps));
            let client = Client::new(client_side, true, Timeouts::default())
                .await
                .unwrap();
            let err = client.auth_xoauth2("a@b.test", &token).await.unwrap_err();
            if answer.contains("Protocol error") {
                assert!(
                    matches!(err, Error::TokenTooLong { length: 4321, .. }),
                    "{err:?}"
                );
                assert_eq!(err.retry(), crate::model::retry::Retry::Slowly);
                assert!(err.to_string().contains("4321 characters"), "{err}");
                assert!(err.hint().unwrap().contains("group"), "{err}");
            } else {
                assert!(matches!(err, Error::ServerBusy { .. }), "{answer}: {err:?}");
                assert_eq!(err.retry(), crate::model::retry::Retry::Soon);
                assert!(err.is_transient() && !err.is_permanent());
                assert!(err.hint().unwrap().contains("another"), "{err}");
            }
            assert!(!err.to_string().contains("xxxx"), "{err}");
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn error_challenge_gets_an_empty_line_then_final_err() {
        let (client_side, server_side) = duplex(1 << 16);
        let token = SecretString::from("bad");
        let blob = sasl::xoauth2_response("a@b.test", &token);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK Dovecot ready.\r\n"),
                c("AUTH XOAUTH2"),
                Step::S("+ \r\n"),
                Step::C(format!("{}\r\n", blob.expose_secret())),
                Step::S("+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0=\r\n"),
                Step::C("\r\n".to_owned()),
                Step::S("-ERR [AUTH] Authentication failed.\r\n"),
            ],
        ));
        let client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        let err = client.auth_xoauth2("a@b.test", &token).await.unwrap_err();
        match &err {
            Error::AuthRejected {
                code, text, detail, ..
            } => {
                assert_eq!(code.as_deref(), Some("AUTH"));
                assert_eq!(text, "Authentication failed.");
                assert_eq!(
                    detail.as_deref(),
                    Some(r#"{"status":"401","schemes":"bearer"}"#)
                );
            }
            other => panic!("{other:?}"),
        }
        server.await.unwrap();
    }

    #[tokio::test]
    async fn credentials_are_never_sent_in_the_clear() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(server_side, vec![Step::S("+OK ready\r\n")]));
        let client = Client::new(client_side, false, Timeouts::default())
            .await
            .unwrap();
        let err = client
            .auth_xoauth2("a@b.test", &SecretString::from("t"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PlaintextAuthRefused));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn xoauth2_not_offered_is_reported_before_sending_anything() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK ready\r\n"),
                c("CAPA"),
                Step::S("+OK\r\nUIDL\r\nSASL PLAIN\r\n.\r\n"),
            ],
        ));
        let mut client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        client.capa().await.unwrap();
        let err = client
            .auth_xoauth2("a@b.test", &SecretString::from("t"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotSupported { .. }), "{err:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn transaction_commands_transcript() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK ready\r\n"),
                c("USER agent@contoso.test"),
                Step::S("+OK\r\n"),
                c("PASS s3cret"),
                Step::S("+OK logged in\r\n"),
                c("UIDL"),
                Step::S("+OK\r\n1 AAA1\r\n2 AAA2\r\n.\r\n"),
                c("UIDL 2"),
                Step::S("+OK 2 AAA2\r\n"),
                c("LIST"),
                Step::S("+OK 2 messages\r\n1 120\r\n2 4000\r\n.\r\n"),
                c("LIST 1"),
                Step::S("+OK 1 120\r\n"),
                c("TOP 1 0"),
                Step::S("+OK\r\nSubject: hi\r\n\r\n.\r\n"),
                c("RETR 1"),
                Step::S("+OK 120 octets\r\nSubject: hi\r\n\r\n..dot\r\n.\r\n"),
                c("RETR 2"),
                Step::S("+OK\r\n0123456789012345678901234567890123456789\r\n.\r\n"),
                c("DELE 1"),
                Step::S("+OK\r\n"),
                c("RETR 1"),
                Step::S("-ERR Message 1 has been deleted.\r\n"),
                c("RSET"),
                Step::S("+OK\r\n"),
                c("NOOP"),
                Step::S("+OK\r\n"),
                c("DELE 1"),
                Step::S("+OK\r\n"),
                c("QUIT"),
                Step::S("+OK bye\r\n"),
            ],
        ));
        let client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        let mut s = client
            .auth_user_pass("agent@contoso.test", &SecretString::from("s3cret"))
            .await
            .unwrap();
        assert_eq!(
            s.uidl_all().await.unwrap(),
            vec![(1, "AAA1".to_owned()), (2, "AAA2".to_owned())]
        );
        assert_eq!(s.uidl(2).await.unwrap(), "AAA2");
        assert_eq!(s.list_all().await.unwrap(), vec![(1, 120), (2, 4000)]);
        assert_eq!(s.list(1).await.unwrap(), 120);
        assert_eq!(s.top(1, 0, 1000).await.unwrap(), b"Subject: hi\r\n\r\n");
        assert_eq!(
            s.retr(1, 1000).await.unwrap(),
            b"Subject: hi\r\n\r\n.dot\r\n"
        );
        let err = s.retr(2, 10).await.unwrap_err();
        assert!(matches!(
            err,
            Error::TooLarge {
                limit: 10,
                received: 42
            }
        ));
        s.dele(1).await.unwrap();
        let err = s.retr(1, 1000).await.unwrap_err();
        assert!(matches!(
            err,
            Error::Server {
                command: "RETR",
                ..
            }
        ));
        assert!(!s.is_poisoned());
        s.rset().await.unwrap();
        s.noop().await.unwrap();
        s.dele(1).await.unwrap();
        s.quit().await.unwrap();
        server.await.unwrap();
    }

    const CAPA_PIPELINING: &str = "+OK\r\nTOP\r\nUIDL\r\nPIPELINING\r\nUSER\r\n.\r\n";

    async fn pipelining_session(client_side: DuplexStream) -> Session<DuplexStream> {
        let mut client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        client.capa().await.unwrap();
        client
            .auth_user_pass("agent@contoso.test", &SecretString::from("s3cret"))
            .await
            .unwrap()
    }

    fn pipelining_login() -> Vec<Step> {
        vec![
            Step::S("+OK ready\r\n"),
            c("CAPA"),
            Step::S(CAPA_PIPELINING),
            c("USER agent@contoso.test"),
            Step::S("+OK\r\n"),
            c("PASS s3cret"),
            Step::S("+OK logged in\r\n"),
        ]
    }

    #[tokio::test]
    async fn pipelined_retrs_and_dele_are_answered_in_order() {
        let (client_side, server_side) = duplex(1 << 16);
        let mut script = pipelining_login();
        script.extend([
            // All three RETRs reach the server before it answers any of them.
            c("RETR 1"),
            c("RETR 2"),
            c("RETR 3"),
            Step::S("+OK\r\none\r\n.\r\n+OK\r\n..two\r\n.\r\n-ERR no such message\r\n"),
            // Sent while RETR 2 and 3 are unanswered: it joins them.
            c("DELE 1"),
            Step::S("+OK\r\n"),
            c("RETR 4"),
            Step::S("+OK\r\nnobody asks for this one\r\n.\r\n"),
            c("NOOP"),
            Step::S("+OK\r\n"),
            c("QUIT"),
            Step::S("+OK bye\r\n"),
        ]);
        let server = tokio::spawn(serve(server_side, script));
        let mut s = pipelining_session(client_side).await;
        assert!(s.pipelining());
        for n in 1..=3 {
            s.send_retr(n, 1000).await.unwrap();
        }
        assert_eq!(s.retrs_in_flight().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(s.retr(1, 1000).await.unwrap(), b"one\r\n");
        s.dele(1).await.unwrap();
        assert_eq!(s.in_flight(), 3);
        assert_eq!(s.retr(2, 1000).await.unwrap(), b".two\r\n");
        let err = s.retr(3, 1000).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Server {
                    command: "RETR",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!s.is_poisoned());
        // Sent ahead, never asked for: another command reads it first and throws it away.
        s.send_retr(4, 1000).await.unwrap();
        s.noop().await.unwrap();
        assert_eq!(s.in_flight(), 0);
        s.quit().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_pipelined_dele_poisons_the_session_before_quit() {
        let (client_side, server_side) = duplex(1 << 16);
        let mut script = pipelining_login();
        script.extend([
            c("RETR 1"),
            Step::S("+OK\r\none\r\n.\r\n"),
            c("RETR 2"),
            c("DELE 1"),
            Step::S("+OK\r\ntwo\r\n.\r\n-ERR [SYS/TEMP] try later\r\n"),
        ]);
        let server = tokio::spawn(serve(server_side, script));
        let mut s = pipelining_session(client_side).await;
        s.send_retr(1, 1000).await.unwrap();
        assert_eq!(s.retr(1, 1000).await.unwrap(), b"one\r\n");
        s.send_retr(2, 1000).await.unwrap();
        s.dele(1).await.unwrap();
        assert_eq!(s.retr(2, 1000).await.unwrap(), b"two\r\n");
        let written = server.await.unwrap();
        // QUIT reads the DELE's refusal first and then writes nothing: no deletion applies.
        let err = s.quit().await.unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ref m) if m.contains("DELE 1")),
            "{err:?}"
        );
        assert_eq!(written.last().map(String::as_str), Some("DELE 1\r\n"));
    }

    #[tokio::test]
    async fn without_pipelining_nothing_is_sent_ahead() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK ready\r\n"),
                c("CAPA"),
                Step::S("+OK\r\nUIDL\r\nUSER\r\n.\r\n"),
                c("USER agent@contoso.test"),
                Step::S("+OK\r\n"),
                c("PASS s3cret"),
                Step::S("+OK logged in\r\n"),
                c("RETR 1"),
                Step::S("+OK\r\none\r\n.\r\n"),
                c("QUIT"),
                Step::S("+OK bye\r\n"),
            ],
        ));
        let mut s = pipelining_session(client_side).await;
        assert!(!s.pipelining());
        let err = s.send_retr(1, 1000).await.unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
        s.set_pipelining(true);
        assert!(
            !s.pipelining(),
            "turned on although the server does not offer it"
        );
        assert_eq!(s.retr(1, 1000).await.unwrap(), b"one\r\n");
        s.quit().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn uidl_listing_judges_each_line_and_leaves_the_session_usable() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK ready\r\n"),
                c("USER u"),
                Step::S("+OK\r\n"),
                c("PASS p"),
                Step::S("+OK\r\n"),
                c("UIDL"),
                Step::S(
                    "+OK\r\n1 AAA\r\n2 abc def\r\n3 SAME\r\n4 SAME\r\n5 esc\x1b[0m\r\ngarbage\r\n6 ZZZ\r\n7 YYY\r\n.\r\n",
                ),
                c("UIDL"),
                Step::S("+OK\r\n1 AAA\r\n2 abc def\r\n3 SAME\r\n4 SAME\r\n.\r\n"),
                c("UIDL 2"),
                Step::S("+OK 2 abc def\r\n"),
                c("UIDL 5"),
                Step::S("+OK 5 esc\x1b[0m\r\n"),
                c("LIST"),
                Step::S("+OK\r\n1 120\r\nnonsense\r\n2 4000 extra words\r\n.\r\n"),
                c("NOOP"),
                Step::S("+OK\r\n"),
            ],
        ));
        let client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        let mut s = client
            .auth_user_pass("u", &SecretString::from("p"))
            .await
            .unwrap();
        let listing = s.uidl_listing(6).await.unwrap();
        assert!(listing.truncated, "entry 7 was read and dropped");
        assert_eq!(listing.unreadable_lines, 1);
        let verdicts: Vec<(u32, Option<&str>, bool)> = listing
            .entries
            .iter()
            .map(|e| {
                let shared = matches!(e.uidl, codec::ListedUidl::Shared(_));
                (e.number, e.uidl.unique(), shared)
            })
            .collect();
        assert_eq!(
            verdicts,
            [
                (1, Some("AAA"), false),
                (2, None, false),
                (3, None, true),
                (4, None, true),
                (5, None, false),
                (6, Some("ZZZ"), false),
            ]
        );
        match &listing.entries[4].uidl {
            codec::ListedUidl::Invalid { excerpt, .. } => assert_eq!(excerpt, "5 esc\\x1b[0m"),
            other => panic!("{other:?}"),
        }
        // The legacy form keeps only what identifies one message; `abc` is not a UIDL here.
        assert_eq!(s.uidl_all().await.unwrap(), vec![(1, "AAA".to_owned())]);
        assert!(matches!(s.uidl(2).await, Err(Error::Protocol(_))));
        assert!(matches!(s.uidl(5).await, Err(Error::Protocol(_))));
        assert_eq!(s.list_all().await.unwrap(), vec![(1, 120), (2, 4000)]);
        s.noop().await.unwrap();
        assert!(!s.is_poisoned());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn escapes_in_err_text_are_escaped_in_the_error() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK ready\r\n"),
                c("USER u"),
                Step::S("+OK\r\n"),
                c("PASS p"),
                Step::S("+OK\r\n"),
                c("STAT"),
                Step::S("-ERR [SYS/TEMP] \x1b]0;owned\x07\u{202e}txt.exe\r\n"),
            ],
        ));
        let client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        let mut s = client
            .auth_user_pass("u", &SecretString::from("p"))
            .await
            .unwrap();
        let err = s.stat().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            r"STAT refused by the server: -ERR [SYS/TEMP] \x1b]0;owned\x07\u{202e}txt.exe"
        );
        assert!(err.is_transient());
        server.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_deadline_cuts_a_hanging_command() {
        let (client_side, mut server_side) = duplex(1 << 16);
        // Answers the greeting, USER and PASS, then never again (the stream stays open).
        server_side
            .write_all(b"+OK ready\r\n+OK\r\n+OK\r\n")
            .await
            .unwrap();
        let mut client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        let start = Instant::now();
        client.set_deadline(Some(start + Duration::from_secs(5)));
        let mut s = client
            .auth_user_pass("u", &SecretString::from("p"))
            .await
            .unwrap();
        assert_eq!(s.deadline(), Some(start + Duration::from_secs(5)));
        let err = s.retr(1, 1000).await.unwrap_err();
        assert!(
            matches!(err, Error::Timeout { during: "RETR", .. }),
            "{err:?}"
        );
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "not the 60 s command deadline"
        );
        assert!(s.is_poisoned());
        assert!(matches!(s.quit().await, Err(Error::Poisoned)));
        drop(server_side);
    }

    #[tokio::test]
    async fn transient_server_codes() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(
            server_side,
            vec![
                Step::S("+OK ready\r\n"),
                c("USER u"),
                Step::S("-ERR [IN-USE] Mailbox locked by another session\r\n"),
            ],
        ));
        let client = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap();
        let err = client
            .auth_user_pass("u", &SecretString::from("p"))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(!err.is_permanent());
        server.await.unwrap();
        let e = Error::Server {
            command: "STAT",
            code: None,
            text: "Server Unavailable. 21".into(),
        };
        assert!(e.is_transient());
        let e = Error::Server {
            command: "RETR",
            code: Some("SYS/PERM".into()),
            text: "x".into(),
        };
        assert!(e.is_permanent());
    }

    #[tokio::test]
    async fn negative_greeting_is_an_error() {
        let (client_side, server_side) = duplex(1 << 16);
        let server = tokio::spawn(serve(
            server_side,
            vec![Step::S("-ERR [SYS/TEMP] try later\r\n")],
        ));
        let err = Client::new(client_side, true, Timeouts::default())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        server.await.unwrap();
    }
}
