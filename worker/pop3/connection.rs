//! The only part of the POP3 client that does I/O: a byte stream, its read buffer, and a
//! deadline around every wait.
//!
//! Invariants:
//! - every network await is bounded (connect and TLS in `client.rs`; here: each command's
//!   write + status line, and the idle time between reads of a multi-line body);
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
use tokio::time::timeout;

use super::Error;
use super::codec::{self, AuthReply, Command, Decode, MultiLine, StatusLine};

/// Deadlines for each kind of wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// TLS handshake (implicit TLS or after STLS).
    pub tls: Duration,
    /// Writing one command and reading its status line (includes the greeting).
    pub command: Duration,
    /// Longest silence between two reads of a multi-line body (a long RETR may take minutes
    /// in total, but the server must keep sending).
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(15),
            tls: Duration::from_secs(15),
            command: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
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
    status_limit: usize,
    secure: bool,
    poisoned: bool,
}

impl<S> std::fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("secure", &self.secure)
            .field("poisoned", &self.poisoned)
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
        let bytes = cmd
            .encode()
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let after = self.timeouts.command;
        let result = match timeout(after, async {
            self.write_all(&bytes).await?;
            self.read_frame(decode).await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                during: cmd.name(),
                after,
            }),
        };
        drop(bytes);
        self.check(result)
    }

    /// Reads one status line (the greeting, or a reply to a command sent earlier).
    pub async fn read_status(&mut self, during: &'static str) -> Result<StatusLine, Error> {
        self.ensure_usable()?;
        let after = self.timeouts.command;
        let result = match timeout(after, self.read_frame(codec::decode_status)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout { during, after }),
        };
        if let Ok(status) = &result {
            tracing::trace!(status = ?status, "pop3 recv");
        }
        self.check(result)
    }

    /// Reads the body of a multi-line response, keeping at most `limit` octets. Over the limit
    /// the rest is read and discarded and [`Error::TooLarge`] is returned; the connection stays
    /// usable. Each read waits at most the idle deadline.
    pub async fn read_multiline(
        &mut self,
        limit: usize,
        during: &'static str,
    ) -> Result<Vec<u8>, Error> {
        self.ensure_usable()?;
        let result = self.read_multiline_inner(limit, during).await;
        self.check(result)
    }

    async fn read_multiline_inner(
        &mut self,
        limit: usize,
        during: &'static str,
    ) -> Result<Vec<u8>, Error> {
        let mut decoder = MultiLine::new(limit);
        loop {
            let progress = decoder.decode(&self.buf);
            self.buf.drain(..progress.consumed);
            if progress.done {
                break;
            }
            let after = self.timeouts.idle;
            match timeout(after, self.fill()).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::Timeout { during, after }),
            }
        }
        let seen = decoder.seen();
        tracing::trace!(octets = seen, "pop3 recv multi-line body");
        decoder
            .finish()
            .map_err(|received| Error::TooLarge { limit, received })
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
        let _ = timeout(self.timeouts.command, self.stream.shutdown()).await;
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
