//! The only part of the POP3 client that does I/O: a byte stream, its read buffer, and a
//! deadline around every wait.
//!
//! Invariants:
//! - every network await is bounded (connect and TLS in `client.rs`; here: each command's
//!   write + status line, the idle time between reads of a multi-line body, and the whole body
//!   by the minimum-rate rule below);
//! - a multi-line body must keep up a minimum average rate: after a grace of
//!   [`Timeouts::command`] the octets received must be at least [`Timeouts::min_rate`] per
//!   second of waiting, counting only time spent waiting on the server. A body with a wire
//!   limit of L octets therefore ends within about `command + L / min_rate`, however slowly or
//!   endlessly the server sends;
//! - an optional hard deadline ([`Connection::set_deadline`]) caps every wait: each command's
//!   own deadline is the earlier of its own and the hard one, and once it has passed every wait
//!   fails with [`Error::Timeout`] (and poisons the connection) without writing anything;
//! - after a timeout, an I/O error or a framing error the connection is *poisoned*: every later
//!   call fails with [`Error::Poisoned`] and nothing more is written to the server, so a
//!   half-read response can never be mistaken for the next one;
//! - the read buffer never holds more than one status line (bounded) plus one socket read, and
//!   multi-line bodies are decoded as they arrive into an output bounded by the caller's limit.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::Error;
use super::codec::{
    self, AuthReply, BodyDecoder, CodecError, Command, Decode, MultiLine, StatusLine,
};
use crate::model::defaults;

/// Deadlines for each kind of wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// TLS handshake (implicit TLS or after STLS).
    pub tls: Duration,
    /// Writing one command and reading its status line (includes the greeting); also the
    /// grace a multi-line body has before [`Timeouts::min_rate`] applies.
    pub command: Duration,
    /// Longest silence between two reads of a multi-line body (a long RETR may take minutes
    /// in total, but the server must keep sending).
    pub idle: Duration,
    /// Slowest average rate a multi-line body may arrive at, in octets per second, after a
    /// grace of `command`: the total bound on a body (see the module documentation). 0 counts
    /// as 1.
    pub min_rate: u64,
}

impl From<&crate::config::Pop3Config> for Timeouts {
    /// The `[pop3]` deadlines.
    fn from(pop3: &crate::config::Pop3Config) -> Timeouts {
        Timeouts {
            connect: pop3.connect_timeout_secs,
            tls: pop3.tls_timeout_secs,
            command: pop3.command_timeout_secs,
            idle: pop3.idle_timeout_secs,
            min_rate: pop3.min_rate_bytes_per_sec,
        }
    }
}

impl Timeouts {
    /// The defaults: 15 s to connect and for TLS, 60 s per command and of silence within a
    /// body, and bodies at 16 KiB/s or faster. A RETR limited to 16 MiB (33 MiB on the wire,
    /// see [`codec::default_wire_limit`]) then ends within about 60 s + 35 min whatever the
    /// server does; Exchange Online sends megabytes a second.
    pub const DEFAULT: Timeouts = Timeouts {
        connect: defaults::POP3_CONNECT_TIMEOUT,
        tls: defaults::POP3_TLS_TIMEOUT,
        command: defaults::POP3_COMMAND_TIMEOUT,
        idle: defaults::POP3_IDLE_TIMEOUT,
        min_rate: defaults::POP3_MIN_RATE_BYTES_PER_SEC,
    };
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::DEFAULT
    }
}

/// The time a multi-line body may have taken so far under the minimum-rate rule:
/// `grace + received / min_rate`.
fn rate_allowance(grace: Duration, received: u64, min_rate: u64) -> Duration {
    let rate = u128::from(min_rate.max(1));
    let nanos = u128::from(received) * 1_000_000_000 / rate;
    let earned = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
    grace.saturating_add(earned)
}

/// `at + after`, or about a year from `at` if that does not fit an instant.
fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(365 * 24 * 3600))
}

/// A TCP stream, with or without TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

const READ_CHUNK: usize = 16 * 1024;

/// A POP3 byte stream with its buffer and deadlines.
pub struct Connection<S> {
    stream: S,
    buf: Vec<u8>,
    timeouts: Timeouts,
    /// The hard deadline over every wait, if one is set.
    deadline: Option<Instant>,
    status_limit: usize,
    secure: bool,
    poisoned: bool,
}

impl<S> std::fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("secure", &self.secure)
            .field("poisoned", &self.poisoned)
            .field("deadline", &self.deadline)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a connected stream. `secure` says whether it is encrypted (decides whether
    /// credentials may be sent over it).
    pub fn new(stream: S, secure: bool, timeouts: Timeouts) -> Connection<S> {
        Connection {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            timeouts,
            deadline: None,
            status_limit: codec::DEFAULT_STATUS_LINE_LIMIT,
            secure,
            poisoned: false,
        }
    }

    /// Whether the stream is encrypted.
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// Whether an earlier failure made this connection unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The deadlines in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Sets (or with `None` lifts) a hard deadline over every later wait. A wait it cuts short
    /// fails with [`Error::Timeout`] and poisons the connection; once it has passed, every
    /// call fails at once, writing nothing.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// The hard deadline, if one is set.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The earlier of `own` and the hard deadline.
    fn cap(&self, own: Instant) -> Instant {
        match self.deadline {
            Some(hard) if hard < own => hard,
            _ => own,
        }
    }

    /// Gives back the stream for a TLS upgrade. Fails if the server sent bytes we have not
    /// read yet: after `+OK` to STLS anything buffered was sent in plaintext and could have
    /// been injected (the STARTTLS command-injection attack), so it is refused.
    pub fn into_stream(self) -> Result<S, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if !self.buf.is_empty() {
            return Err(Error::Protocol(
                "the server sent data after +OK to STLS before the TLS handshake".to_owned(),
            ));
        }
        Ok(self.stream)
    }

    /// Runs `fut` (which uses this connection) and poisons the connection if it fails in a way
    /// that leaves the stream in an unknown state.
    fn check<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result
            && e.poisons_connection()
        {
            self.poisoned = true;
        }
        result
    }

    fn ensure_usable(&self) -> Result<(), Error> {
        if self.poisoned {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Sends one command and reads its status line, within the command deadline.
    pub async fn command(&mut self, cmd: &Command<'_>) -> Result<StatusLine, Error> {
        let status = self.exchange(cmd, codec::decode_status).await?;
        tracing::trace!(status = ?status, "pop3 recv");
        Ok(status)
    }

    /// Sends one SASL line and reads the server's reply (continuation or final status).
    pub async fn sasl_step(&mut self, cmd: &Command<'_>) -> Result<AuthReply, Error> {
        let reply = self.exchange(cmd, codec::decode_auth_reply).await?;
        tracing::trace!(reply = ?redact_continuation(&reply), "pop3 recv");
        Ok(reply)
    }

    /// Writes `cmd` and decodes one reply line with `decode`, both within the command
    /// deadline; poisons the connection on failure.
    async fn exchange<T>(
        &mut self,
        cmd: &Command<'_>,
        decode: fn(&[u8], usize) -> Result<Decode<T>, codec::CodecError>,
    ) -> Result<T, Error> {
        self.ensure_usable()?;
        tracing::trace!(command = ?cmd, "pop3 send");
        // The encoded line may hold a credential: it lives only until the write is done.
        let bytes = cmd.encode().map_err(Error::InvalidCommand)?;
        let during = cmd.name();
        let started = Instant::now();
        let own = later(started, self.timeouts.command);
        let until = self.cap(own);
        // Past the hard deadline nothing is written: the command could not be answered in time.
        let result = if until <= started {
            Err(Error::Timeout {
                during,
                after: Duration::ZERO,
            })
        } else {
            match timeout_at(until, async {
                self.write_all(&bytes).await?;
                self.read_frame(decode).await
            })
            .await
            {
                Ok(r) => r,
                Err(_) => Err(self.timed_out(during, started, until, own)),
            }
        };
        drop(bytes);
        self.check(result)
    }

    /// Writes one command without reading its reply (RFC 2449 §6.6 PIPELINING: the replies
    /// come back in order and are read later with [`Connection::read_status`]). The write has
    /// the command deadline, capped by the hard one; past the hard deadline nothing is
    /// written. Poisons the connection on failure.
    pub async fn send(&mut self, cmd: &Command<'_>) -> Result<(), Error> {
        self.ensure_usable()?;
        tracing::trace!(command = ?cmd, "pop3 send (pipelined)");
        let bytes = cmd.encode().map_err(Error::InvalidCommand)?;
        let during = cmd.name();
        let started = Instant::now();
        let own = later(started, self.timeouts.command);
        let until = self.cap(own);
        let result = if until <= started {
            Err(Error::Timeout {
                during,
                after: Duration::ZERO,
            })
        } else {
            match timeout_at(until, self.write_all(&bytes)).await {
                Ok(r) => r,
                Err(_) => Err(self.timed_out(during, started, until, own)),
            }
        };
        drop(bytes);
        self.check(result)
    }

    /// Poisons the connection: the caller found the stream in a state it cannot continue from.
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    /// The error for a status-line wait cut at `until`: the command deadline, or the time
    /// waited when the hard deadline came first.
    fn timed_out(
        &self,
        during: &'static str,
        started: Instant,
        until: Instant,
        own: Instant,
    ) -> Error {
        let after = if until == own {
            self.timeouts.command
        } else {
            until.saturating_duration_since(started)
        };
        Error::Timeout { during, after }
    }

    /// Reads one status line (the greeting, or a reply to a command sent earlier).
    pub async fn read_status(&mut self, during: &'static str) -> Result<StatusLine, Error> {
        self.ensure_usable()?;
        let started = Instant::now();
        let own = later(started, self.timeouts.command);
        let until = self.cap(own);
        let result = if until <= started {
            Err(Error::Timeout {
                during,
                after: Duration::ZERO,
            })
        } else {
            match timeout_at(until, self.read_frame(codec::decode_status)).await {
                Ok(r) => r,
                Err(_) => Err(self.timed_out(during, started, until, own)),
            }
        };
        if let Ok(status) = &result {
            tracing::trace!(status = ?status, "pop3 recv");
        }
        self.check(result)
    }

    /// Reads the body of a multi-line response, keeping at most `limit` octets. Over the limit
    /// the rest is read and discarded and [`Error::TooLarge`] is returned; the connection stays
    /// usable. Past [`codec::default_wire_limit`]`(limit)` octets the body counts as endless:
    /// [`Error::ResponseTooLong`], and the connection is poisoned. Waits are bounded as for
    /// [`Connection::read_body`].
    pub async fn read_multiline(
        &mut self,
        limit: usize,
        during: &'static str,
    ) -> Result<Vec<u8>, Error> {
        let mut decoder = MultiLine::new(limit);
        self.read_body(&mut decoder, during).await?;
        let seen = decoder.seen();
        tracing::trace!(octets = seen, "pop3 recv multi-line body");
        decoder
            .finish()
            .map_err(|received| Error::TooLarge { limit, received })
    }

    /// Feeds the body of a multi-line response to `decoder` until its terminator. Each read
    /// waits at most the idle deadline, the whole body keeps up the minimum rate after its
    /// grace, and the hard deadline caps both; a decoder's wire limit ends an endless body.
    /// Any failure poisons the connection.
    pub async fn read_body(
        &mut self,
        decoder: &mut impl BodyDecoder,
        during: &'static str,
    ) -> Result<(), Error> {
        self.ensure_usable()?;
        let result = self.read_body_inner(decoder, during).await;
        self.check(result)
    }

    async fn read_body_inner(
        &mut self,
        decoder: &mut impl BodyDecoder,
        during: &'static str,
    ) -> Result<(), Error> {
        let Timeouts {
            command: grace,
            idle,
            min_rate,
            ..
        } = self.timeouts;
        // Only time spent waiting on the server counts against the rate.
        let mut waited = Duration::ZERO;
        let mut received = 0u64;
        loop {
            let progress = decoder
                .decode_body(&self.buf)
                .map_err(|e| body_error(e, during))?;
            self.buf.drain(..progress.consumed);
            received += progress.consumed as u64;
            if progress.done {
                return Ok(());
            }
            let now = Instant::now();
            let allowed = rate_allowance(grace, received, min_rate).saturating_sub(waited);
            let until = self.cap(later(now, allowed.min(idle)));
            if until <= now {
                return Err(Error::Timeout {
                    during,
                    after: waited,
                });
            }
            let read = timeout_at(until, self.fill()).await;
            waited += now.elapsed();
            match read {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::Timeout {
                        during,
                        after: waited,
                    });
                }
            }
        }
    }

    async fn read_frame<T>(
        &mut self,
        decode: fn(&[u8], usize) -> Result<Decode<T>, codec::CodecError>,
    ) -> Result<T, Error> {
        loop {
            match decode(&self.buf, self.status_limit) {
                Ok(Decode::Complete { frame, consumed }) => {
                    self.buf.drain(..consumed);
                    return Ok(frame);
                }
                Ok(Decode::Incomplete) => self.fill().await?,
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
        }
    }

    /// Reads once from the stream into the buffer. End of stream is [`Error::Closed`].
    async fn fill(&mut self) -> Result<(), Error> {
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let n = self.stream.read(&mut self.buf[start..]).await;
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(start);
                return Err(Error::Io(e));
            }
        };
        self.buf.truncate(start + n);
        if n == 0 {
            return Err(Error::Closed);
        }
        Ok(())
    }

    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Closes the write side, best effort and bounded; used after QUIT.
    pub async fn shutdown(&mut self) {
        let until = self.cap(later(Instant::now(), self.timeouts.command));
        let _ = timeout_at(until, self.stream.shutdown()).await;
    }
}

/// A body decoder's refusal as the error of the command it answers.
fn body_error(error: CodecError, during: &'static str) -> Error {
    match error {
        CodecError::ResponseTooLong { limit } => Error::ResponseTooLong { during, limit },
        CodecError::ListingTooLong { limit } => Error::ListingTooLarge {
            command: during,
            limit,
        },
        other => Error::Protocol(other.to_string()),
    }
}

/// Server challenges are not secret, but keep traces short.
fn redact_continuation(reply: &AuthReply) -> String {
    match reply {
        AuthReply::Continue(c) if c.is_empty() => "+".to_owned(),
        AuthReply::Continue(c) => format!("+ <challenge, {} octets>", c.len()),
        AuthReply::Done(s) => format!("{s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test(start_paused = true)]
    async fn a_read_that_never_completes_times_out_and_poisons() {
        let (client_side, _server_side) = duplex(1024);
        let timeouts = Timeouts {
            command: Duration::from_secs(30),
            ..Timeouts::default()
        };
        let mut conn = Connection::new(client_side, true, timeouts);
        let started = tokio::time::Instant::now();
        let err = conn.command(&Command::Noop).await.unwrap_err();
        assert!(
            matches!(err, Error::Timeout { during: "NOOP", .. }),
            "{err:?}"
        );
        assert!(err.is_transient());
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(conn.is_poisoned());
        // The connection is never used again: nothing is written, the call fails at once.
        let err = conn.command(&Command::Noop).await.unwrap_err();
        assert!(matches!(err, Error::Poisoned));
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_deadline_inside_a_multiline_body() {
        let (client_side, mut server_side) = duplex(1024);
        let timeouts = Timeouts {
            idle: Duration::from_secs(5),
            ..Timeouts::default()
        };
        let mut conn = Connection::new(client_side, true, timeouts);
        server_side.write_all(b"+OK\r\npart of a").await.unwrap();
        conn.command(&Command::Retr(1)).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = conn.read_multiline(1000, "RETR").await.unwrap_err();
        assert!(
            matches!(err, Error::Timeout { during: "RETR", .. }),
            "{err:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(conn.is_poisoned());
    }

    /// Writes `+OK`, then `rate` octets of `x` per second, forever (or until the client leaves).
    fn trickle(mut server: tokio::io::DuplexStream, rate: usize) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if server.write_all(b"+OK\r\n").await.is_err() {
                return;
            }
            let chunk = vec![b'x'; rate];
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if server.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_times_out_by_the_minimum_rate() {
        let (client_side, server_side) = duplex(1 << 16);
        let timeouts = Timeouts {
            command: Duration::from_secs(10),
            idle: Duration::from_secs(5),
            min_rate: 1024,
            ..Timeouts::default()
        };
        let server = trickle(server_side, 1);
        let mut conn = Connection::new(client_side, true, timeouts);
        conn.command(&Command::Retr(1)).await.unwrap();
        let started = Instant::now();
        let err = conn.read_multiline(1 << 20, "RETR").await.unwrap_err();
        let elapsed = started.elapsed();
        // 1 octet a second never trips the 5 s idle deadline; the rate does, once the 10 s
        // grace plus what the octets earned (1/1024 s each) has been spent waiting.
        match err {
            Error::Timeout { during, after } => {
                assert_eq!(during, "RETR");
                assert_eq!(after, elapsed);
            }
            other => panic!("{other:?}"),
        }
        assert!(elapsed >= Duration::from_secs(10), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(11), "{elapsed:?}");
        assert!(conn.is_poisoned());
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_is_read_whole() {
        let (client_side, mut server_side) = duplex(1 << 16);
        let timeouts = Timeouts {
            command: Duration::from_secs(2),
            idle: Duration::from_secs(5),
            min_rate: 1000,
            ..Timeouts::default()
        };
        // 30 000 octets at 1 000 a second: 30 s, within the allowance all along.
        let server = tokio::spawn(async move {
            server_side.write_all(b"+OK\r\n").await.unwrap();
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                server_side.write_all(&[b'y'; 998]).await.unwrap();
                server_side.write_all(b"\r\n").await.unwrap();
            }
            server_side.write_all(b".\r\n").await.unwrap();
            server_side
        });
        let mut conn = Connection::new(client_side, true, timeouts);
        conn.command(&Command::Retr(1)).await.unwrap();
        let body = conn.read_multiline(1 << 20, "RETR").await.unwrap();
        assert_eq!(body.len(), 30_000);
        assert!(!conn.is_poisoned());
        drop(server.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_body_at_full_speed_is_abandoned_at_its_wire_limit() {
        let (client_side, mut server_side) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut sent = 0u64;
            if server_side.write_all(b"+OK\r\n").await.is_err() {
                return sent;
            }
            let chunk = [b'z'; 4096];
            while sent < 64 << 20 && server_side.write_all(&chunk).await.is_ok() {
                sent += chunk.len() as u64;
            }
            sent
        });
        let mut conn = Connection::new(client_side, true, Timeouts::default());
        conn.command(&Command::Retr(1)).await.unwrap();
        let err = conn.read_multiline(1000, "RETR").await.unwrap_err();
        let limit = codec::default_wire_limit(1000);
        match err {
            Error::ResponseTooLong { during, limit: l } => {
                assert_eq!((during, l), ("RETR", limit));
            }
            other => panic!("{other:?}"),
        }
        assert!(conn.is_poisoned());
        drop(conn);
        let sent = server.await.unwrap();
        assert!(
            sent < limit + (1 << 17),
            "read {sent} octets for a {limit} octet limit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_hard_deadline_cuts_every_wait_and_then_writes_nothing() {
        let (client_side, server_side) = duplex(1 << 16);
        let (mut server_read, mut server_write) = tokio::io::split(server_side);
        server_write.write_all(b"+OK\r\npart").await.unwrap();
        let mut conn = Connection::new(client_side, true, Timeouts::default());
        let start = Instant::now();
        conn.set_deadline(Some(start + Duration::from_secs(3)));
        assert_eq!(conn.deadline(), Some(start + Duration::from_secs(3)));
        // A body that would be allowed 60 s of silence is cut at the 3 s deadline.
        conn.command(&Command::Retr(1)).await.unwrap();
        let err = conn.read_multiline(1000, "RETR").await.unwrap_err();
        assert!(
            matches!(err, Error::Timeout { during: "RETR", .. }),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(conn.is_poisoned());

        // A fresh connection whose deadline is already over fails at once and writes nothing.
        let (client_side, mut server_side) = duplex(1 << 16);
        let mut conn = Connection::new(client_side, true, Timeouts::default());
        conn.set_deadline(Some(Instant::now()));
        let err = conn.command(&Command::Noop).await.unwrap_err();
        match err {
            Error::Timeout { during, after } => {
                assert_eq!((during, after), ("NOOP", Duration::ZERO));
            }
            other => panic!("{other:?}"),
        }
        assert!(conn.is_poisoned());
        drop(conn);
        let mut written = Vec::new();
        server_side.read_to_end(&mut written).await.unwrap();
        assert!(written.is_empty(), "{written:?}");

        // A status line cut by the hard deadline reports the time actually waited.
        let (client_side, _server_side) = duplex(1 << 16);
        let mut conn = Connection::new(client_side, true, Timeouts::default());
        conn.set_deadline(Some(Instant::now() + Duration::from_secs(2)));
        let err = conn.command(&Command::Stat).await.unwrap_err();
        match err {
            Error::Timeout { during, after } => {
                assert_eq!((during, after), ("STAT", Duration::from_secs(2)));
            }
            other => panic!("{other:?}"),
        }
        // Lifting it brings back the command deadline (on a connection not yet poisoned).
        let (client_side, _server_side) = duplex(1 << 16);
        let mut conn = Connection::new(client_side, true, Timeouts::default());
        conn.set_deadline(Some(Instant::now() + Duration::from_secs(2)));
        conn.set_deadline(None);
        let started = Instant::now();
        let err = conn.command(&Command::Stat).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }));
        assert_eq!(started.elapsed(), Timeouts::default().command);
        drop(server_read.read(&mut [0u8; 64]).await);
    }

    #[test]
    fn rate_allowance_is_grace_plus_octets_over_rate() {
        let grace = Duration::from_secs(60);
        assert_eq!(rate_allowance(grace, 0, 16 * 1024), grace);
        assert_eq!(
            rate_allowance(grace, 16 << 20, 16 * 1024),
            grace + Duration::from_secs(1024)
        );
        assert_eq!(rate_allowance(grace, 1, 0), grace + Duration::from_secs(1));
        assert_eq!(
            rate_allowance(grace, u64::MAX, 1),
            grace.saturating_add(Duration::from_nanos(u64::MAX))
        );
    }

    #[tokio::test]
    async fn closed_stream_is_an_error_and_poisons() {
        let (client_side, server_side) = duplex(1024);
        drop(server_side);
        let mut conn = Connection::new(client_side, true, Timeouts::default());
        let err = conn.read_status("greeting").await.unwrap_err();
        assert!(matches!(err, Error::Closed | Error::Io(_)), "{err:?}");
        assert!(conn.is_poisoned());
    }

    #[tokio::test]
    async fn too_large_keeps_the_connection_usable() {
        let (client_side, mut server_side) = duplex(1 << 16);
        let mut conn = Connection::new(client_side, true, Timeouts::default());
        server_side
            .write_all(b"+OK\r\n0123456789\r\n.\r\n+OK next\r\n")
            .await
            .unwrap();
        conn.command(&Command::Retr(1)).await.unwrap();
        let err = conn.read_multiline(5, "RETR").await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooLarge {
                    limit: 5,
                    received: 12
                }
            ),
            "{err:?}"
        );
        assert!(!conn.is_poisoned());
        let status = conn.read_status("next").await.unwrap();
        assert_eq!(status.text, "next");
    }

    #[tokio::test]
    async fn buffered_bytes_after_stls_are_refused() {
        let (client_side, mut server_side) = duplex(1024);
        let mut conn = Connection::new(client_side, false, Timeouts::default());
        server_side
            .write_all(b"+OK Begin TLS\r\n+OK injected\r\n")
            .await
            .unwrap();
        conn.command(&Command::Stls).await.unwrap();
        assert!(matches!(conn.into_stream(), Err(Error::Protocol(_))));
    }
}
