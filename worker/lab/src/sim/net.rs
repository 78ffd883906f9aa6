//! Listener plumbing shared by the simulators: a TCP listener that can be closed synchronously,
//! a lifecycle (cancellation + task tracking) and a stream wrapper that fails once the
//! simulator stops.
//!
//! Invariant: after [`Lifecycle::stop`] returns, the listening sockets are closed (new connects
//! are refused); tasks observe the cancellation and end without further help.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use super::SimError;

/// Locks a mutex, ignoring poisoning: simulator state stays usable after a panicking test
/// thread, and no invariant spans a panic point.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A bound TCP listener that [`ClosableListener::close`] drops synchronously.
///
/// The accept loop polls through the mutex instead of owning the socket, so closing does not
/// have to wait for that task to be scheduled.
#[derive(Clone)]
pub(crate) struct ClosableListener {
    socket: Arc<Mutex<Option<TcpListener>>>,
    addr: SocketAddr,
}

impl ClosableListener {
    /// Binds an ephemeral port on 127.0.0.1.
    pub(crate) async fn bind() -> Result<ClosableListener, SimError> {
        let socket = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(SimError::Bind)?;
        let addr = socket.local_addr().map_err(SimError::Bind)?;
        Ok(ClosableListener {
            socket: Arc::new(Mutex::new(Some(socket))),
            addr,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the socket now; pending and later accepts return `None`.
    pub(crate) fn close(&self) {
        drop(lock(&self.socket).take());
    }

    /// Accepts one connection; `None` once closed. The caller also selects on the lifecycle's
    /// cancellation, which is what wakes it after `close`.
    pub(crate) async fn accept(&self) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        std::future::poll_fn(|cx| match lock(&self.socket).as_ref() {
            None => Poll::Ready(None),
            Some(socket) => socket.poll_accept(cx).map(Some),
        })
        .await
    }
}

/// Cancellation, task tracking and the listeners of one simulator.
pub(crate) struct Lifecycle {
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    listeners: Vec<ClosableListener>,
}

impl Lifecycle {
    pub(crate) fn new(listeners: Vec<ClosableListener>) -> Lifecycle {
        Lifecycle {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            listeners,
        }
    }

    /// Closes the listeners and tells every task to end. Idempotent.
    pub(crate) fn stop(&self) {
        for listener in &self.listeners {
            listener.close();
        }
        self.tracker.close();
        self.cancel.cancel();
    }

    /// Resolves when every tracked task has ended (only after [`Lifecycle::stop`]).
    pub(crate) async fn stopped(&self) {
        self.tracker.wait().await;
    }
}

/// Held only by user handles: dropping the last one stops the simulator.
pub(crate) struct StopOnDrop(pub(crate) Arc<Lifecycle>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Any bidirectional byte stream the simulators serve (TCP or TLS over TCP).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A stream that fails with `ConnectionAborted` once the simulator is cancelled, so that
/// connections owned by tasks we do not control (hyper's) end when the simulator stops.
pub(crate) struct Guarded {
    inner: Box<dyn Stream>,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Guarded {
    pub(crate) fn new(inner: Box<dyn Stream>, cancel: &CancellationToken) -> Guarded {
        Guarded {
            inner,
            cancelled: Box::pin(cancel.clone().cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cancelled.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "simulator stopped",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

use std::future::Future;

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Retries after a failed `accept` (e.g. out of file descriptors) without spinning.
pub(crate) async fn accept_backoff(error: &io::Error) {
    tracing::warn!(%error, "simulator accept failed; retrying");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}
