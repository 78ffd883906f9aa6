//! A small TCP fault proxy on 127.0.0.1, put between ccmail and a server (the POP3 simulator or
//! PostgreSQL) to break the network the way real networks break.
//!
//! Byte-level knobs (they see TLS records, so they work for POP3S too) are read when a
//! connection is accepted and apply to every connection accepted while they are set:
//! - reset the client connection (RST, not FIN) after forwarding N bytes downstream;
//! - stall: after N bytes downstream, forward nothing more but keep both sockets open;
//! - cap the downstream bandwidth.
//!
//! One protocol-aware knob, for PostgreSQL without TLS (`sslmode=disable`): cut the connection
//! at the next `COMMIT` the client sends, either before forwarding it (the server rolls the
//! transaction back) or after forwarding it and letting the server answer (the server has
//! committed) — in both cases the client only sees a dead connection, so the outcome of its
//! commit is unknown to it. The client's bytes of the cut transaction (from its `BEGIN`) are
//! kept so a test can tell which rows it carried.
//!
//! Freezing (a host that stops answering without closing anything): [`FaultProxy::freeze`]
//! turns every live connection into a black hole (bytes either way are read and dropped, the
//! sockets stay open for as long as the proxy lives) and holds new connections the same way
//! without dialling the server; [`FaultProxy::thaw`] lets new connections through again (the
//! frozen ones stay dead, as TCP sessions through a rebooted middlebox do).
//! [`CommitCut::Freeze`] freezes only the connection that sends the next `COMMIT`, before
//! forwarding it; [`FaultProxy::freeze_next_statement_in_transaction`] the one that next sends
//! a statement inside a transaction (an insert of a batch, say).
//!
//! Invariants: the proxy listens on 127.0.0.1 only; dropping it stops accepting and ends every
//! proxied connection (its tasks are aborted).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Where the next `COMMIT` is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitCut {
    /// Drop the connection instead of forwarding `COMMIT`: the server rolls back.
    BeforeForward,
    /// Forward `COMMIT`, wait for the server's answer, then reset the client without it: the
    /// server has committed, the client cannot know.
    AfterReply,
    /// Hold `COMMIT` and go silent on that connection, keeping its sockets open: the client
    /// waits for an answer that never comes; the server rolls back when its
    /// `idle_in_transaction_session_timeout` ends the session.
    Freeze,
}

/// Byte-level faults applied to connections accepted while set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Knobs {
    /// Reset the client after forwarding this many bytes server → client.
    pub reset_after_downstream: Option<u64>,
    /// Stop forwarding server → client after this many bytes (sockets stay open).
    pub stall_after_downstream: Option<u64>,
    /// Server → client bytes per second.
    pub downstream_bytes_per_sec: Option<u64>,
}

#[derive(Default)]
struct State {
    knobs: Knobs,
    /// Armed by [`FaultProxy::cut_next_commit`], consumed by the first `COMMIT` seen.
    commit_cut: Option<CommitCut>,
    /// Client bytes (from `BEGIN` to `COMMIT`) of each transaction whose commit was cut.
    cut_transactions: Vec<Vec<u8>>,
    /// Armed by [`FaultProxy::freeze_next_statement_in_transaction`].
    freeze_in_transaction: bool,
}

struct Shared {
    state: Mutex<State>,
    connections: AtomicU64,
    /// Faults that actually fired (resets, stalls, commit cuts).
    faults: AtomicU64,
    downstream_bytes: AtomicU64,
    /// Set by [`FaultProxy::freeze`], cleared by [`FaultProxy::thaw`].
    frozen: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See the module documentation.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the acceptor drops its JoinSet, which aborts every connection task.
        self.acceptor.abort();
    }
}

impl FaultProxy {
    /// Listens on an ephemeral 127.0.0.1 port and forwards each connection to `upstream`,
    /// byte for byte (any protocol, TLS included).
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        FaultProxy::start_with(upstream, false).await
    }

    /// As [`FaultProxy::start`] for a PostgreSQL server reached without TLS: the client's
    /// messages are parsed so [`FaultProxy::cut_next_commit`] can act on its `COMMIT`.
    pub async fn start_postgres(upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        FaultProxy::start_with(upstream, true).await
    }

    async fn start_with(upstream: SocketAddr, postgres: bool) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            connections: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            downstream_bytes: AtomicU64::new(0),
            frozen: std::sync::atomic::AtomicBool::new(false),
        });
        let acceptor = tokio::spawn(accept_loop(listener, upstream, postgres, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            acceptor,
        })
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the byte-level knobs for connections accepted from now on.
    pub fn set(&self, knobs: Knobs) {
        self.shared.lock().knobs = knobs;
    }

    /// Removes every knob (connections already running keep theirs) and disarms a commit cut.
    pub fn clear(&self) {
        let mut state = self.shared.lock();
        state.knobs = Knobs::default();
        state.commit_cut = None;
    }

    /// Cuts the next `COMMIT` any proxied PostgreSQL connection sends.
    pub fn cut_next_commit(&self, cut: CommitCut) {
        self.shared.lock().commit_cut = Some(cut);
    }

    /// Freezes the connection that next sends a statement inside a transaction (after its
    /// `BEGIN`, before its `COMMIT`): the client waits for an answer to an insert that never
    /// comes, with its sockets open; the server ends the session at its idle timeout.
    pub fn freeze_next_statement_in_transaction(&self) {
        self.shared.lock().freeze_in_transaction = true;
    }

    /// The client's bytes of every transaction whose commit was cut, oldest first.
    pub fn cut_transactions(&self) -> Vec<Vec<u8>> {
        self.shared.lock().cut_transactions.clone()
    }

    /// Freezes every live connection and holds new ones (see the module documentation).
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::SeqCst);
    }

    /// Lets new connections through again; connections frozen so far stay silent.
    pub fn thaw(&self) {
        self.shared.frozen.store(false, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Faults that fired so far (each reset, stall or commit cut counts once).
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::SeqCst)
    }

    /// Bytes forwarded server → client so far.
    pub fn downstream_bytes(&self) -> u64 {
        self.shared.downstream_bytes.load(Ordering::SeqCst)
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    postgres: bool,
    shared: Arc<Shared>,
) {
    let mut connections = JoinSet::new();
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of file descriptors and the like: try again shortly rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let knobs = shared.lock().knobs;
        let shared = shared.clone();
        connections.spawn(async move {
            if shared.frozen.load(Ordering::SeqCst) {
                black_hole(client).await;
                return;
            }
            if let Ok(server) = TcpStream::connect(upstream).await {
                relay(client, server, knobs, postgres, &shared).await;
            }
        });
        // Reap finished connections so the set does not grow for the proxy's lifetime.
        while connections.try_join_next().is_some() {}
    }
}

/// Reads and drops whatever `client` sends until it closes: a peer that went silent.
async fn black_hole(mut client: TcpStream) {
    let mut sink = vec![0u8; 16 * 1024];
    while let Ok(n) = client.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}

/// Closes `client` with a TCP RST (SO_LINGER 0), as a crashed middlebox or server would.
fn reset(client: TcpStream) {
    // If linger cannot be set the close is a FIN: still a dead connection to the client.
    let _ = client.set_zero_linger();
    drop(client);
}

/// What the PostgreSQL frontend parser found in the client's bytes.
enum PgEvent {
    /// Forward these bytes.
    Forward(Vec<u8>),
    /// A `COMMIT` query message (not yet forwarded).
    Commit(Vec<u8>),
    /// A message sent inside an open transaction (after `BEGIN`).
    InTransaction(Vec<u8>),
}

/// Splits the client → server byte stream of a PostgreSQL connection into messages (protocol
/// 3.0: untyped startup / SSL request first, then a type byte and a length per message).
#[derive(Default)]
struct PgFrontend {
    buffer: Vec<u8>,
    started: bool,
    /// Client bytes since the last `BEGIN`, when one is open.
    transaction: Option<Vec<u8>>,
}

const PG_SSL_REQUEST: u32 = 80_877_103;
const PG_GSSENC_REQUEST: u32 = 80_877_104;

impl PgFrontend {
    fn push(&mut self, bytes: &[u8]) -> Vec<PgEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        loop {
            let (header, typed) = if self.started { (5, true) } else { (4, false) };
            if self.buffer.len() < header {
                break;
            }
            let len_at = usize::from(typed);
            let len = u32::from_be_bytes([
                self.buffer[len_at],
                self.buffer[len_at + 1],
                self.buffer[len_at + 2],
                self.buffer[len_at + 3],
            ]) as usize;
            let total = len + len_at;
            if self.buffer.len() < total || len < 4 {
                break;
            }
            let message: Vec<u8> = self.buffer.drain(..total).collect();
            if !typed {
                let code = message
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(0);
                if code != PG_SSL_REQUEST && code != PG_GSSENC_REQUEST {
                    self.started = true;
                }
                events.push(PgEvent::Forward(message));
                continue;
            }
            let query = (message[0] == b'Q').then(|| {
                String::from_utf8_lossy(&message[5..])
                    .trim_end_matches('\0')
                    .trim()
                    .to_ascii_uppercase()
            });
            match query.as_deref() {
                Some("BEGIN") => self.transaction = Some(Vec::new()),
                Some("COMMIT") => {
                    events.push(PgEvent::Commit(message));
                    continue;
                }
                _ => {}
            }
            if let Some(t) = &mut self.transaction {
                t.extend_from_slice(&message);
                if query.as_deref() != Some("BEGIN") {
                    events.push(PgEvent::InTransaction(message));
                    continue;
                }
            }
            events.push(PgEvent::Forward(message));
        }
        events
    }
}

/// Forwards both directions until either side is done or a fault ends the connection.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    knobs: Knobs,
    postgres: bool,
    shared: &Shared,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut client = client;
    let mut server = server;
    let mut pg = PgFrontend::default();
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    let mut sent_down: u64 = 0;
    let mut stalled = false;
    // Set once a COMMIT was forwarded under `CommitCut::AfterReply`: the next server bytes are
    // its answer, which the client must never see.
    let mut swallow_reply = false;
    loop {
        tokio::select! {
            read = client.read(&mut up) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if shared.frozen.load(Ordering::SeqCst) {
                    shared.faults.fetch_add(1, Ordering::SeqCst);
                    drop(server);
                    black_hole(client).await;
                    return;
                }
                if stalled {
                    continue;
                }
                let events = if postgres {
                    pg.push(&up[..n])
                } else {
                    vec![PgEvent::Forward(up[..n].to_vec())]
                };
                for event in events {
                    let bytes = match event {
                        PgEvent::Forward(bytes) => bytes,
                        PgEvent::InTransaction(bytes) => {
                            let armed = std::mem::take(&mut shared.lock().freeze_in_transaction);
                            if armed {
                                shared.faults.fetch_add(1, Ordering::SeqCst);
                                let _server = server;
                                black_hole(client).await;
                                return;
                            }
                            bytes
                        }
                        PgEvent::Commit(bytes) => {
                            let armed = shared.lock().commit_cut.take();
                            let Some(cut) = armed else {
                                pg.transaction = None;
                                if server.write_all(&bytes).await.is_err() {
                                    return;
                                }
                                continue;
                            };
                            let mut transaction = pg.transaction.take().unwrap_or_default();
                            transaction.extend_from_slice(&bytes);
                            shared.lock().cut_transactions.push(transaction);
                            shared.faults.fetch_add(1, Ordering::SeqCst);
                            match cut {
                                CommitCut::BeforeForward => {
                                    reset(client);
                                    return;
                                }
                                CommitCut::AfterReply => {
                                    swallow_reply = true;
                                    bytes
                                }
                                CommitCut::Freeze => {
                                    // The server keeps the session (and its open
                                    // transaction) until its idle timeout ends it.
                                    let _server = server;
                                    black_hole(client).await;
                                    return;
                                }
                            }
                        }
                    };
                    if server.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
            read = server.read(&mut down), if !stalled => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if shared.frozen.load(Ordering::SeqCst) {
                    shared.faults.fetch_add(1, Ordering::SeqCst);
                    drop(server);
                    black_hole(client).await;
                    return;
                }
                if swallow_reply {
                    // The server has answered the COMMIT: it is durable, and the client will
                    // never hear so.
                    reset(client);
                    return;
                }
                let mut chunk = &down[..n];
                let limit = [knobs.reset_after_downstream, knobs.stall_after_downstream]
                    .into_iter()
                    .flatten()
                    .min();
                if let Some(limit) = limit {
                    let room = limit.saturating_sub(sent_down) as usize;
                    chunk = &chunk[..chunk.len().min(room)];
                }
                if forward_down(&mut client, chunk, knobs.downstream_bytes_per_sec).await.is_err() {
                    return;
                }
                sent_down += chunk.len() as u64;
                shared.downstream_bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                if chunk.len() < n {
                    shared.faults.fetch_add(1, Ordering::SeqCst);
                    if knobs.reset_after_downstream.is_some_and(|r| sent_down >= r) {
                        reset(client);
                        return;
                    }
                    stalled = true;
                }
            }
        }
    }
}

/// Writes `bytes` to the client, paced to `rate` bytes per second when capped.
async fn forward_down(
    client: &mut TcpStream,
    bytes: &[u8],
    rate: Option<u64>,
) -> std::io::Result<()> {
    let Some(rate) = rate.filter(|r| *r > 0) else {
        return client.write_all(bytes).await;
    };
    // Twenty slices a second: smooth enough for a deadline-based client, cheap for the proxy.
    let slice = (rate / 20).max(1) as usize;
    for part in bytes.chunks(slice) {
        client.write_all(part).await?;
        // Pacing, not synchronisation: this is what a slow link looks like.
        tokio::time::sleep(Duration::from_secs_f64(part.len() as f64 / rate as f64)).await;
    }
    Ok(())
}
