//! Simulators of Exchange Online POP3S and the Entra ID token endpoint, for `ccmail-lab demo` and
//! the tests. They listen on 127.0.0.1 only and keep all state in memory.
//!
//! Lifecycle invariant shared by both simulators: a handle is a cheap `Clone`; `shutdown()` on
//! any handle, or dropping the last handle, closes the listening sockets at once (a connect
//! after it is refused) and ends every connection and background task soon after.

pub mod cert;
pub mod entra;
pub mod hostile;
pub mod mailgen;
mod net;
pub mod pop3;

/// Why a simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on 127.0.0.1: {0}; check that the loopback interface is up")]
    Bind(#[source] std::io::Error),
    #[error("cannot make the simulator's server certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot build the simulator's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}
