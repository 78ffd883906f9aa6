//! Ports for the tests' child processes, without the bind-drop-reuse race where it can be
//! avoided at all.
//!
//! The preferred way is to let the child bind port 0 and report the address it got: ccmail
//! logs `serving /metrics` with `listen = addr` (see
//! [`CcmailChild::listen_addr`](super::child::CcmailChild::listen_addr)), and in-process
//! servers take a listener the test bound itself. A port that must refuse connections is a
//! [`ClosedPort`]: bound, never listening, held as long as it is needed. Only programs that
//! can neither bind port 0 and say so nor inherit a socket (PostgreSQL, Prometheus) get a
//! [`free_port`], and that one never hands out the same port twice in this test process.

use std::collections::HashSet;
use std::sync::Mutex;

/// Ports [`free_port`] already handed out in this process.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port on 127.0.0.1 that was free a moment ago (bound, read, released) and that this test
/// process never handed out before. Another process can still take it before the child binds
/// it: use it only for programs that cannot report a port-0 address.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..64 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut seen = HANDED_OUT
            .lock()
            .map_err(|_| anyhow::anyhow!("the port registry's lock is poisoned"))?;
        if seen.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no fresh port after 64 tries")
}

/// A port on 127.0.0.1 that refuses connections for as long as this value lives: bound (so no
/// other process can take it) but not listening, so a connect gets RST at once.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    port: u16,
}

impl ClosedPort {
    pub fn new() -> anyhow::Result<ClosedPort> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let port = socket.local_addr()?.port();
        Ok(ClosedPort {
            _socket: socket,
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}
