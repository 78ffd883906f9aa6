//! Checks the private Dovecot harness against a raw POP3 client written here (the project's
//! own client is tested against Dovecot elsewhere): TLS and STLS, USER/PASS, UIDL/RETR with
//! dot-stuffing, XOAUTH2 through a real introspection round trip, DELE semantics, and that
//! stopping or dropping the harness leaves no master process behind.
//!
//! `C:`/`S:` comments in the tests show the exchange being checked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::dovecot::{Dovecot, DovecotOptions};

/// Every read and write of the test client has this deadline, so a hang fails the test.
const IO_DEADLINE: Duration = Duration::from_secs(15);
/// The one token the introspection stub calls active.
const GOOD_TOKEN: &str = "good-token";
/// What the stub answers as the token's `username`. Dovecot applies `username_format = %d`
/// to this value as well as to the login, so it needs a domain part: a bare `contoso.test`
/// would expand to "" and match no mailbox.
const APP_USERNAME: &str = "pop-app@contoso.test";

// ---------------------------------------------------------------------------------------------
// Introspection stub (RFC 7662, POST form `token=…`)
// ---------------------------------------------------------------------------------------------

/// An introspection endpoint on 127.0.0.1 that calls only [`GOOD_TOKEN`] active.
struct Introspection {
    url: String,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Introspection {
    async fn start() -> anyhow::Result<Introspection> {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let app = axum::Router::new().route(
            "/introspect",
            axum::routing::post(
                move |axum::Form(form): axum::Form<HashMap<String, String>>| {
                    let counter = Arc::clone(&counter);
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let answer = if form.get("token").map(String::as_str) == Some(GOOD_TOKEN) {
                            serde_json::json!({ "active": true, "username": APP_USERNAME })
                        } else {
                            serde_json::json!({ "active": false })
                        };
                        axum::Json(answer)
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the introspection stub")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("introspection stub stopped: {e}");
            }
        });
        Ok(Introspection {
            url: format!("http://{addr}/introspect"),
            calls,
            task,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Introspection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw POP3 client
// ---------------------------------------------------------------------------------------------

/// A minimal POP3 client: one line out, lines in, every step under [`IO_DEADLINE`].
struct Pop3<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Pop3<S> {
    fn new(stream: S) -> Self {
        Pop3 {
            io: BufReader::new(stream),
        }
    }

    /// One raw line including its CRLF; an empty vector means the server closed.
    async fn raw_line(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut line = Vec::new();
        tokio::time::timeout(IO_DEADLINE, self.io.read_until(b'\n', &mut line))
            .await
            .map_err(|_| anyhow!("no line from the server within {IO_DEADLINE:?}"))?
            .context("reading from the server")?;
        Ok(line)
    }

    /// One status line without its CRLF.
    async fn line(&mut self) -> anyhow::Result<String> {
        let line = self.raw_line().await?;
        ensure!(!line.is_empty(), "the server closed the connection");
        ensure!(
            line.ends_with(b"\r\n"),
            "line not terminated by CRLF: {line:?}"
        );
        Ok(String::from_utf8_lossy(&line[..line.len() - 2]).into_owned())
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stream = self.io.get_mut();
        tokio::time::timeout(IO_DEADLINE, async {
            stream.write_all(line.as_bytes()).await?;
            stream.write_all(b"\r\n").await?;
            stream.flush().await
        })
        .await
        .map_err(|_| anyhow!("could not send within {IO_DEADLINE:?}"))?
        .context("writing to the server")
    }

    async fn cmd(&mut self, line: &str) -> anyhow::Result<String> {
        self.send(line).await?;
        self.line().await
    }

    /// Sends `line` and insists on `+OK`.
    async fn ok(&mut self, line: &str) -> anyhow::Result<String> {
        let reply = self.cmd(line).await?;
        ensure!(reply.starts_with("+OK"), "C: {line} -> S: {reply}");
        Ok(reply)
    }

    /// The body of a multi-line response exactly as on the wire (still dot-stuffed), up to
    /// and excluding the terminating `.CRLF` (RFC 1939 §3).
    async fn multiline(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.raw_line().await?;
            ensure!(
                !line.is_empty(),
                "the server closed inside a multi-line response"
            );
            if line == b".\r\n" {
                return Ok(body);
            }
            body.extend_from_slice(&line);
        }
    }

    /// `+OK` line plus multi-line body of a command such as UIDL or RETR.
    async fn ok_multiline(&mut self, line: &str) -> anyhow::Result<Vec<u8>> {
        self.ok(line).await?;
        self.multiline().await
    }

    async fn login(&mut self, user: &str, password: &str) -> anyhow::Result<()> {
        self.ok(&format!("USER {user}")).await?;
        self.ok(&format!("PASS {password}")).await?;
        Ok(())
    }

    /// Two-step XOAUTH2 as Exchange Online requires; returns the server's answer to the blob.
    async fn auth_xoauth2(&mut self, user: &str, token: &str) -> anyhow::Result<String> {
        let go_ahead = self.cmd("AUTH XOAUTH2").await?;
        ensure!(
            go_ahead == "+" || go_ahead == "+ ",
            "expected an empty continuation after AUTH XOAUTH2, got {go_ahead:?}"
        );
        self.cmd(&xoauth2_blob(user, token)).await
    }

    /// Parsed `UIDL`: (message number, unique id).
    async fn uidl(&mut self) -> anyhow::Result<Vec<(u32, String)>> {
        let body = self.ok_multiline("UIDL").await?;
        String::from_utf8(body)
            .context("UIDL listing is not UTF-8")?
            .lines()
            .map(|l| {
                let (n, uid) = l
                    .split_once(' ')
                    .ok_or_else(|| anyhow!("bad UIDL line {l:?}"))?;
                Ok((n.parse()?, uid.to_owned()))
            })
            .collect()
    }

    fn into_inner(self) -> S {
        self.io.into_inner()
    }
}

fn xoauth2_blob(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

fn tls_connector(dovecot: &Dovecot) -> anyhow::Result<TlsConnector> {
    let roots = ccmail::tls::parse_pem_bundle(dovecot.ca_pem().as_bytes(), "Dovecot test CA")?;
    Ok(TlsConnector::from(ccmail::tls::client_config(&roots)?))
}

/// Implicit TLS to POP3S, certificate verified for 127.0.0.1; the greeting is checked.
async fn connect_pop3s(dovecot: &Dovecot) -> anyhow::Result<Pop3<TlsStream<TcpStream>>> {
    let tcp = connect_tcp(dovecot.pop3s_addr()).await?;
    let tls = tokio::time::timeout(
        IO_DEADLINE,
        tls_connector(dovecot)?.connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake timed out"))?
    .context("TLS handshake with Dovecot")?;
    let mut pop = Pop3::new(tls);
    expect_greeting(&mut pop).await?;
    Ok(pop)
}

async fn connect_tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(IO_DEADLINE, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))
}

async fn expect_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    pop: &mut Pop3<S>,
) -> anyhow::Result<String> {
    let greeting = pop.line().await?;
    ensure!(greeting.starts_with("+OK "), "greeting was {greeting:?}");
    Ok(greeting)
}

/// RFC 1939 §3 as a server applies it to a stored message: bare LF becomes CRLF, and a line
/// that starts with `.` gets one more `.`.
fn wire_form(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 16);
    let mut at_line_start = true;
    for (i, &b) in raw.iter().enumerate() {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// Undoes dot-stuffing on a wire body.
fn unstuff(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire.len());
    for line in wire.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

/// Bare LF to CRLF, nothing else.
fn crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 16);
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

async fn start(oauth_domain_format: bool) -> anyhow::Result<(Dovecot, Introspection)> {
    ccmail::tls::install_crypto_provider();
    let introspection = Introspection::start().await?;
    let dovecot = Dovecot::start(DovecotOptions {
        introspection_url: introspection.url.clone(),
        oauth_domain_format,
    })
    .await?;
    Ok((dovecot, introspection))
}

/// Runs `body`; on failure, attaches Dovecot's log so the cause is visible.
async fn with_log<T>(
    dovecot: &Dovecot,
    body: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match body.await {
        Ok(v) => Ok(v),
        Err(e) => Err(e.context(format!("Dovecot log:\n{}", dovecot.log()))),
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// PIDs of live processes in process group `pgid` (the master leads its instance's group),
/// read from `/proc/<pid>/stat`: `pid (comm) state ppid pgrp …`. Zombies are dead already
/// (an orphan's zombie waits for init to reap it), so they do not count.
fn group_members(pgid: u32) -> anyhow::Result<Vec<u32>> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between read_dir and read: that is simply not a member.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, after_comm)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
        if !zombie && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
            members.push(pid);
        }
    }
    Ok(members)
}

const MSG_ONE: &[u8] = b"From: Customer <c@example.net>\nTo: support@contoso.test\nSubject: one\n\nfirst line\n.a line that starts with a dot\n..two dots\nlast line\n";
const MSG_TWO: &[u8] = b"From: Other <o@example.net>\r\nTo: support@contoso.test\r\nSubject: two\r\n\r\nalready CRLF\r\n.\r\nend\r\n";

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dovecot_greets_and_accepts_user_pass_on_pop3s_and_stls() -> anyhow::Result<()> {
    let (dovecot, _introspection) = start(false).await?;
    dovecot.add_user("Alice@Contoso.test", "s3cret")?;
    with_log(&dovecot, async {
        // S: +OK … ready.   C: USER / PASS   S: +OK Logged in.
        let mut pop = connect_pop3s(&dovecot).await?;
        pop.login("alice@contoso.test", "s3cret").await?;
        pop.ok("QUIT").await?;

        // A wrong password is refused.
        let mut pop = connect_pop3s(&dovecot).await?;
        pop.ok("USER alice@contoso.test").await?;
        let reply = pop.cmd("PASS wrong").await?;
        ensure!(reply.starts_with("-ERR"), "wrong password got {reply:?}");

        // The plain port offers STLS; after the upgrade the same login works.
        let mut plain = Pop3::new(connect_tcp(dovecot.pop3_addr()).await?);
        expect_greeting(&mut plain).await?;
        let capa = String::from_utf8(plain.ok_multiline("CAPA").await?)?;
        ensure!(capa.lines().any(|l| l == "STLS"), "CAPA lacks STLS: {capa}");
        plain.ok("STLS").await?;
        let tcp = plain.into_inner();
        let tls = tls_connector(&dovecot)?
            .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
            .await
            .context("STLS handshake")?;
        let mut pop = Pop3::new(tls);
        let capa = String::from_utf8(pop.ok_multiline("CAPA").await?)?;
        ensure!(
            capa.lines()
                .any(|l| l.starts_with("SASL") && l.contains("XOAUTH2")),
            "CAPA after STLS lacks SASL XOAUTH2: {capa}"
        );
        ensure!(
            !capa.lines().any(|l| l == "STLS"),
            "STLS offered again inside TLS"
        );
        pop.login("alice@contoso.test", "s3cret").await?;
        pop.ok("QUIT").await?;
        Ok(())
    })
    .await?;
    dovecot.stop();
    Ok(())
}

#[tokio::test]
async fn dovecot_uidl_and_retr_return_the_delivered_bytes() -> anyhow::Result<()> {
    let (dovecot, _introspection) = start(false).await?;
    dovecot.add_user("alice@contoso.test", "s3cret")?;
    let first = dovecot.deliver("alice@contoso.test", MSG_ONE)?;
    let second = dovecot.deliver("alice@contoso.test", MSG_TWO)?;
    ensure!(first != second, "two deliveries share one file name");
    let stored = dovecot.maildir_messages("alice@contoso.test")?;
    ensure!(stored.len() == 2, "Maildir holds {} files", stored.len());
    with_log(&dovecot, async {
        let mut pop = connect_pop3s(&dovecot).await?;
        pop.login("alice@contoso.test", "s3cret").await?;

        // C: UIDL   S: 1 <uid> / 2 <uid> / .
        let uidl = pop.uidl().await?;
        ensure!(uidl.len() == 2, "UIDL lists {uidl:?}");
        ensure!(
            uidl.iter().map(|(n, _)| *n).collect::<Vec<_>>() == [1, 2],
            "numbers {uidl:?}"
        );
        ensure!(uidl[0].1 != uidl[1].1, "UIDs not unique: {uidl:?}");
        for (_, uid) in &uidl {
            // pop3_uidl_format = %08Xu%08Xv: 16 hex digits.
            ensure!(
                uid.len() == 16 && uid.chars().all(|c| c.is_ascii_hexdigit()),
                "UID {uid:?} is not %08Xu%08Xv"
            );
        }

        // Delivery order is message order (Maildir names sort by time, then sequence).
        for (n, raw) in [(1, MSG_ONE), (2, MSG_TWO)] {
            let wire = pop.ok_multiline(&format!("RETR {n}")).await?;
            ensure!(
                wire == wire_form(raw),
                "RETR {n} wire bytes differ:\n{}\n---expected---\n{}",
                String::from_utf8_lossy(&wire),
                String::from_utf8_lossy(&wire_form(raw))
            );
            ensure!(unstuff(&wire) == crlf(raw), "RETR {n} unstuffed differs");
        }
        // The dot-stuffed lines really were on the wire.
        let wire_one = wire_form(MSG_ONE);
        ensure!(
            wire_one
                .windows(b"\r\n..a line".len())
                .any(|w| w == b"\r\n..a line"),
            "test vector lost its leading dot"
        );
        pop.ok("QUIT").await?;

        // UIDs are stable across sessions.
        let mut pop = connect_pop3s(&dovecot).await?;
        pop.login("alice@contoso.test", "s3cret").await?;
        ensure!(pop.uidl().await? == uidl, "UIDL changed between sessions");
        pop.ok("QUIT").await?;
        Ok(())
    })
    .await?;
    dovecot.stop();
    Ok(())
}

#[tokio::test]
async fn dovecot_xoauth2_one_domain_token_opens_every_mailbox_of_that_domain() -> anyhow::Result<()>
{
    let (dovecot, introspection) = start(true).await?;
    for user in [
        "support@contoso.test",
        "sales@contoso.test",
        "eve@fabrikam.test",
    ] {
        dovecot.add_user(user, "unused-password")?;
    }
    dovecot.deliver("sales@contoso.test", MSG_TWO)?;
    with_log(&dovecot, async {
        // C: AUTH XOAUTH2   S: +   C: <blob>   S: +OK Logged in.
        for (user, expected) in [("support@contoso.test", 0), ("sales@contoso.test", 1)] {
            let mut pop = connect_pop3s(&dovecot).await?;
            let reply = pop.auth_xoauth2(user, GOOD_TOKEN).await?;
            ensure!(reply.starts_with("+OK"), "{user}: {reply:?}");
            let uidl = pop.uidl().await?;
            ensure!(
                uidl.len() == expected,
                "{user} sees {uidl:?}, not its own maildrop"
            );
            pop.ok("QUIT").await?;
        }
        ensure!(
            introspection.calls() >= 2,
            "Dovecot did not introspect each token (calls: {})",
            introspection.calls()
        );

        // Another domain's mailbox is refused with the same token.
        let mut pop = connect_pop3s(&dovecot).await?;
        let reply = pop.auth_xoauth2("eve@fabrikam.test", GOOD_TOKEN).await?;
        // Dovecot answers with an error challenge first; the empty line ends the exchange.
        let reply = if reply.starts_with("+ ") {
            pop.cmd("").await?
        } else {
            reply
        };
        ensure!(
            reply.starts_with("-ERR"),
            "foreign-domain login got {reply:?}"
        );
        Ok(())
    })
    .await?;
    dovecot.stop();
    Ok(())
}

#[tokio::test]
async fn dovecot_xoauth2_bad_token_gets_error_challenge_then_err() -> anyhow::Result<()> {
    let (dovecot, introspection) = start(true).await?;
    dovecot.add_user("support@contoso.test", "unused-password")?;
    with_log(&dovecot, async {
        // C: AUTH XOAUTH2   S: +   C: <blob>   S: + <base64 json>   C: (empty)   S: -ERR …
        let mut pop = connect_pop3s(&dovecot).await?;
        let challenge = pop
            .auth_xoauth2("support@contoso.test", "stale-token")
            .await?;
        let Some(encoded) = challenge.strip_prefix("+ ") else {
            bail!("expected an error challenge, got {challenge:?}");
        };
        let json: serde_json::Value = serde_json::from_slice(
            &B64.decode(encoded.trim())
                .context("challenge is not base64")?,
        )
        .context("challenge is not JSON")?;
        ensure!(
            json["status"] == "401",
            "challenge status is {}",
            json["status"]
        );
        let last = pop.cmd("").await?;
        ensure!(last.starts_with("-ERR"), "after empty line: {last:?}");
        ensure!(introspection.calls() >= 1, "the token was not introspected");
        Ok(())
    })
    .await?;
    dovecot.stop();
    Ok(())
}

#[tokio::test]
async fn dovecot_dele_then_quit_removes_the_file() -> anyhow::Result<()> {
    let (dovecot, _introspection) = start(false).await?;
    dovecot.add_user("alice@contoso.test", "s3cret")?;
    dovecot.deliver("alice@contoso.test", MSG_ONE)?;
    dovecot.deliver("alice@contoso.test", MSG_TWO)?;
    with_log(&dovecot, async {
        let mut pop = connect_pop3s(&dovecot).await?;
        pop.login("alice@contoso.test", "s3cret").await?;
        pop.ok("DELE 1").await?;
        // C: QUIT applies the deletion (RFC 1939 §6).
        pop.ok("QUIT").await?;
        let left = dovecot.maildir_messages("alice@contoso.test")?;
        ensure!(left.len() == 1, "{} files left", left.len());
        ensure!(
            crlf(&left[0].1) == crlf(MSG_TWO),
            "the wrong message was deleted"
        );
        Ok(())
    })
    .await?;
    dovecot.stop();
    Ok(())
}

#[tokio::test]
async fn dovecot_dele_without_quit_removes_nothing() -> anyhow::Result<()> {
    let (dovecot, _introspection) = start(false).await?;
    dovecot.add_user("alice@contoso.test", "s3cret")?;
    dovecot.deliver("alice@contoso.test", MSG_ONE)?;
    with_log(&dovecot, async {
        let mut pop = connect_pop3s(&dovecot).await?;
        pop.login("alice@contoso.test", "s3cret").await?;
        pop.ok("DELE 1").await?;
        // Dropping the connection leaves the session without QUIT: nothing is deleted.
        drop(pop);

        // A new session that sees the message proves the old one ended without deleting
        // (Dovecot holds no lock past the dropped session, and POP3 has no other way to know).
        let mut pop = connect_pop3s(&dovecot).await?;
        pop.login("alice@contoso.test", "s3cret").await?;
        let uidl = pop.uidl().await?;
        ensure!(uidl.len() == 1, "after a dropped DELE, UIDL lists {uidl:?}");
        pop.ok("QUIT").await?;
        let left = dovecot.maildir_messages("alice@contoso.test")?;
        ensure!(left.len() == 1, "{} files left", left.len());
        ensure!(crlf(&left[0].1) == crlf(MSG_ONE), "message changed");
        Ok(())
    })
    .await?;
    dovecot.stop();
    Ok(())
}

#[tokio::test]
async fn dovecot_stop_and_drop_leave_no_master_process() -> anyhow::Result<()> {
    let (dovecot, _introspection) = start(false).await?;
    let pid = dovecot.master_pid();
    let root = dovecot.root_dir().to_path_buf();
    ensure!(process_exists(pid), "master {pid} not running after start");
    // A login and a mail session are running when it stops.
    dovecot.add_user("alice@contoso.test", "s3cret")?;
    let mut session = connect_pop3s(&dovecot).await?;
    session.login("alice@contoso.test", "s3cret").await?;
    let members = group_members(pid)?;
    ensure!(
        members.len() > 2,
        "expected master and its services in group {pid}, found {members:?}"
    );
    let pid_file = std::fs::read_to_string(root.join("run/master.pid"))?;
    ensure!(
        pid_file.trim() == pid.to_string(),
        "master.pid is {pid_file:?}"
    );
    dovecot.stop();
    ensure!(!process_exists(pid), "master {pid} survived stop()");
    let left = group_members(pid)?;
    ensure!(left.is_empty(), "stop() left processes {left:?}");
    drop(session);
    ensure!(!root.exists(), "stop() left {}", root.display());

    let (dovecot, _introspection) = start(false).await?;
    let pid = dovecot.master_pid();
    let root = dovecot.root_dir().to_path_buf();
    ensure!(process_exists(pid), "second master {pid} not running");
    drop(dovecot);
    ensure!(!process_exists(pid), "master {pid} survived drop");
    let left = group_members(pid)?;
    ensure!(left.is_empty(), "drop left processes {left:?}");
    ensure!(!root.exists(), "drop left {}", root.display());
    Ok(())
}

#[tokio::test]
async fn dovecot_instances_run_side_by_side() -> anyhow::Result<()> {
    let (a, b) = tokio::try_join!(start(false), start(false))?;
    let (a, _ia) = a;
    let (b, _ib) = b;
    ensure!(a.pop3s_addr() != b.pop3s_addr(), "instances share a port");
    a.add_user("alice@contoso.test", "s3cret")?;
    b.add_user("alice@contoso.test", "s3cret")?;
    a.deliver("alice@contoso.test", MSG_ONE)?;
    for (dovecot, expected) in [(&a, 1), (&b, 0)] {
        with_log(dovecot, async {
            let mut pop = connect_pop3s(dovecot).await?;
            pop.login("alice@contoso.test", "s3cret").await?;
            let uidl = pop.uidl().await?;
            ensure!(uidl.len() == expected, "UIDL {uidl:?}");
            pop.ok("QUIT").await?;
            Ok(())
        })
        .await?;
    }
    a.stop();
    b.stop();
    Ok(())
}
