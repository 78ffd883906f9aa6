//! The HTTP listener: `GET /metrics` (the Prometheus text exposition of
//! [`super::global()`]), `GET /healthz` (the process answers) and `GET /readyz` (the
//! [`Readiness`] check the caller supplies answers `Ok`; the worker checks that the database
//! answers and every embedded migration is applied), plus the probe client of
//! `ccmail healthcheck`.
//!
//! The listener cannot be exhausted by clients that connect and wait ([`HttpLimits`]): it
//! holds at most `max_connections` (beyond that, the one waiting longest without a request in
//! progress is closed to make room, so a probe always gets through unless every connection is
//! busy), a request head must arrive within `header_read_timeout`, a kept-alive connection is
//! closed after `idle_timeout` without a request, and every connection after
//! `max_connection_lifetime`. Its file descriptors are therefore bounded, and ingestion never
//! runs out of them because of idle HTTP clients.
//!
//! It reads the `[http]` settings ([`HttpLimits::from_config`]) and knows nothing of the
//! database: readiness is a callback, so telemetry sits
//! below the store and the ingest layers without importing them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State as Shared;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::global;

/// The answer of one readiness check: `Err` holds why the worker is not ready, in words for
/// the `/readyz` body.
pub type ReadyFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The check behind `/readyz`, run on every request (bounded by a timeout).
pub type Readiness = Arc<dyn Fn() -> ReadyFuture + Send + Sync>;

/// How long `/readyz` waits for the database before answering "not ready".
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The routes `/metrics`, `/healthz` and `/readyz`, the last answered by `ready`.
pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(ready)
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        global().render(),
    )
}

async fn ready_handler(Shared(ready): Shared<Readiness>) -> (StatusCode, String) {
    match tokio::time::timeout(READY_TIMEOUT, ready()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: the database did not answer within {}s\n",
                READY_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// Limits of the HTTP listener (`[http]` settings; see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections held at most.
    pub max_connections: usize,
    /// Time for a complete request head, from connecting or from its first byte.
    pub header_read_timeout: Duration,
    /// A kept-alive connection without a request is closed after this.
    pub idle_timeout: Duration,
    /// Every connection is closed after this (once its current request is answered).
    pub max_connection_lifetime: Duration,
}

impl HttpLimits {
    /// The limits the `[http]` settings ask for (checked to be at least 1 when they load).
    pub fn from_config(http: &crate::config::HttpConfig) -> HttpLimits {
        HttpLimits {
            max_connections: http.max_connections,
            header_read_timeout: http.header_read_timeout_secs,
            idle_timeout: http.idle_timeout_secs,
            max_connection_lifetime: http.max_connection_lifetime_secs,
        }
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 128,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connection_lifetime: Duration::from_secs(600),
        }
    }
}

/// Where a connection is in its life, for its deadlines and for choosing whom to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected, the first request head not complete yet (header-read deadline from connect).
    Fresh,
    /// A response was handed over; waiting for the next request (idle deadline).
    Idle,
    /// The first byte of a next request arrived (header-read deadline from that byte).
    ReadingHead,
    /// A request is being answered (bounded by the connection lifetime only).
    Busy,
}

/// One connection's phase, shared by its I/O wrapper, its service and its watchdog.
struct Watch {
    state: Mutex<(Phase, Instant)>,
    changed: tokio::sync::Notify,
    /// Cancelled when the connection is closed to make room for a new one.
    evict: CancellationToken,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            state: Mutex::new((Phase::Fresh, Instant::now())),
            changed: tokio::sync::Notify::new(),
            evict: CancellationToken::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, (Phase, Instant)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.state() = (phase, Instant::now());
        self.changed.notify_one();
    }

    /// Bytes arrived: on an idle connection that starts the header-read deadline.
    fn on_read(&self) {
        if self.state().0 == Phase::Idle {
            self.set(Phase::ReadingHead);
        }
    }

    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        let (phase, since) = *self.state();
        match phase {
            Phase::Fresh | Phase::ReadingHead => Some(since + limits.header_read_timeout),
            Phase::Idle => Some(since + limits.idle_timeout),
            Phase::Busy => None,
        }
    }

    /// Since when it has been waiting for a request, unless one is in progress.
    fn waiting_since(&self) -> Option<Instant> {
        let (phase, since) = *self.state();
        (phase != Phase::Busy).then_some(since)
    }
}

/// The stream of one connection, telling its [`Watch`] when bytes arrive.
struct Watched {
    stream: tokio::net::TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.on_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The open connections, by id.
#[derive(Default)]
struct Open {
    next_id: AtomicU64,
    watches: Mutex<HashMap<u64, Arc<Watch>>>,
}

/// Removes a connection from [`Open`] when its task ends, however it ends.
struct Registered {
    open: Arc<Open>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock_map(&self.open.watches).remove(&self.id);
    }
}

fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Open {
    /// Makes room for a new connection: under the cap it is simply added; at the cap the
    /// connection waiting longest without a request in progress is evicted in its favour;
    /// when every one is busy there is no room (`None`).
    fn admit(self: &Arc<Self>, max: usize) -> Option<(Arc<Watch>, Registered, bool)> {
        let mut watches = lock_map(&self.watches);
        let mut evicted = false;
        if watches.len() >= max {
            let victim = watches
                .iter()
                .filter_map(|(id, w)| w.waiting_since().map(|since| (since, *id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some(w) = watches.remove(&victim) {
                w.evict.cancel();
                evicted = true;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch::new());
        watches.insert(id, watch.clone());
        Some((
            watch,
            Registered {
                open: self.clone(),
                id,
            },
            evicted,
        ))
    }

    fn evict_all(&self) {
        for w in lock_map(&self.watches).values() {
            w.evict.cancel();
        }
    }
}

/// Serves [`router`] on `listener` within `limits` until `shutdown` is cancelled; then lets
/// requests in progress finish (bounded by the header-read timeout) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ready: Readiness,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_router(listener, router(ready), limits, shutdown).await
}

/// Serves `app` on `listener` under `limits` until `shutdown` (the hardened listener of
/// [`serve`], for any routes: the agents' API uses it too).
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let open = Arc::new(Open::default());
    let tracker = TaskTracker::new();
    let mut warned_at: Option<Instant> = None;
    let mut warn = |what: &str, error: &dyn std::fmt::Display| {
        // At most one warning a minute: a flood must not flood the log as well.
        if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            warned_at = Some(Instant::now());
            tracing::warn!(error = %error, max_connections = limits.max_connections, "{what}");
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or a connection reset before accept): the pending
                // connection stays queued; try again shortly instead of spinning.
                warn("HTTP listener cannot accept a connection; retrying", &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((watch, registered, evicted)) = open.admit(limits.max_connections) else {
            // Every connection is answering a request: close this one at once.
            drop(stream);
            warn(
                "HTTP connection closed at once: every connection is busy",
                &"connection cap reached",
            );
            continue;
        };
        if evicted {
            tracing::debug!("HTTP connection cap reached; closed the longest-waiting idle one");
        }
        let _ = stream.set_nodelay(true);
        tracker.spawn(serve_connection(
            Watched {
                stream,
                watch: watch.clone(),
            },
            watch,
            registered,
            service.clone(),
            limits,
            shutdown.clone(),
        ));
    }
    tracker.close();
    if tokio::time::timeout(limits.header_read_timeout, tracker.wait())
        .await
        .is_err()
    {
        open.evict_all();
        tracker.wait().await;
    }
    Ok(())
}

/// One connection: HTTP/1.1 by hyper, with the deadlines of its [`Watch`] and the lifetime.
async fn serve_connection<S>(
    io: Watched,
    watch: Arc<Watch>,
    _registered: Registered,
    service: S,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let hooks = watch.clone();
    let service = hyper::service::service_fn(move |request| {
        hooks.set(Phase::Busy);
        let answer = service.call(request);
        let hooks = hooks.clone();
        async move {
            let response = answer.await;
            hooks.set(Phase::Idle);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog below owns the header-read deadline (hyper's would also end idle waits).
    builder.header_read_timeout(None).keep_alive(true);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    let lifetime = tokio::time::sleep(limits.max_connection_lifetime);
    tokio::pin!(lifetime);
    let mut closing = false;
    loop {
        let deadline = watch.deadline(&limits);
        let expiry = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            // Dropping the connection closes the socket.
            _ = watch.evict.cancelled() => return,
            _ = expiry => {
                if watch.deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    return;
                }
            }
            _ = watch.changed.notified() => {}
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut lifetime, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

// ---- probing (`ccmail healthcheck`) ----

/// Why a probe of the HTTP listener failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "cannot connect to the ccmail HTTP listener at {addr}: {reason} (is `ccmail run` running, and is http.listen the same address?)"
    )]
    Connect {
        addr: String,
        reason: std::io::Error,
    },
    #[error("the ccmail HTTP listener at {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("the ccmail HTTP listener at {addr} answered something that is not HTTP: {line:?}")]
    Malformed { addr: String, line: String },
    #[error("{path} answered HTTP {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
}

/// The address to probe for a listener bound to `listen`: an unspecified address (`0.0.0.0`,
/// `[::]`) is reached through the loopback address of its family.
pub fn probe_address(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(mut a) if a.ip().is_unspecified() => {
            a.set_ip(match a {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
            a.to_string()
        }
        _ => listen.to_owned(),
    }
}

/// `GET path` on the listener at `addr` (plain HTTP/1.1); the body when the status is 2xx.
pub async fn probe(addr: &str, path: &str, timeout: Duration) -> Result<String, ProbeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Answers of /healthz and /readyz are a line, and /metrics of a few thousand pilots fits
    /// with room to spare; anything larger is cut, not buffered.
    const MAX_ANSWER: u64 = 16 * 1024 * 1024;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|reason| ProbeError::Connect {
                addr: addr.to_owned(),
                reason,
            })?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let io = |reason| ProbeError::Connect {
            addr: addr.to_owned(),
            reason,
        };
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .await
            .map_err(io)?;
        Ok::<_, ProbeError>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout {
            addr: addr.to_owned(),
            after: timeout,
        })??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::Malformed {
            addr: addr.to_owned(),
            line: status_line.chars().take(80).collect(),
        })?;
    let body = body.trim().to_owned();
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(ProbeError::Status {
            path: path.to_owned(),
            status,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_probed_on_loopback() {
        assert_eq!(probe_address("0.0.0.0:9898"), "127.0.0.1:9898");
        assert_eq!(probe_address("[::]:9898"), "[::1]:9898");
        assert_eq!(probe_address("10.1.2.3:80"), "10.1.2.3:80");
        assert_eq!(probe_address("localhost:9898"), "localhost:9898");
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_waiting_makes_room_unless_every_connection_is_busy() {
        let open = Arc::new(Open::default());
        let (first, first_reg, evicted) = open.admit(2).unwrap();
        assert!(!evicted);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (second, second_reg, _) = open.admit(2).unwrap();
        // A connection that just finished a request waits from then on.
        tokio::time::advance(Duration::from_secs(1)).await;
        first.set(Phase::Busy);
        first.set(Phase::Idle);
        let (third, _third_reg, evicted) = open.admit(2).unwrap();
        assert!(evicted);
        assert!(second.evict.is_cancelled(), "the longest waiting is closed");
        assert!(!first.evict.is_cancelled());
        drop(second_reg);
        assert_eq!(lock_map(&open.watches).len(), 2);

        first.set(Phase::Busy);
        third.set(Phase::Busy);
        assert!(
            open.admit(2).is_none(),
            "all busy: the new one is closed at once"
        );
        third.set(Phase::Idle);
        assert!(open.admit(2).is_some());
        drop(first_reg);
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_deadline() {
        let limits = HttpLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connection_lifetime: Duration::from_secs(600),
        };
        let watch = Watch::new();
        let start = Instant::now();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + limits.header_read_timeout)
        );
        // Bytes of the first head do not extend its deadline.
        tokio::time::advance(Duration::from_secs(3)).await;
        watch.on_read();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + limits.header_read_timeout)
        );
        watch.set(Phase::Busy);
        assert_eq!(watch.deadline(&limits), None);
        watch.set(Phase::Idle);
        let idle_since = Instant::now();
        assert_eq!(
            watch.deadline(&limits),
            Some(idle_since + limits.idle_timeout)
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        watch.on_read();
        assert_eq!(
            watch.deadline(&limits),
            Some(Instant::now() + limits.header_read_timeout)
        );
    }
}
