//! The integration tests' harness. The simulated world itself is the lab's
//! (`ccmail_lab::world::World`); here: [`pipeline`] (that world plus a database, a sealed app
//! and a token cache: `PipelineWorld`), [`sim_world`] (the fixed tenant of the client tests),
//! [`child`] (the lab's one spawner, `ccmail_lab::child::Child`, as `CcmailChild`, and the
//! path of the `ccmail` binary: log captured, killed by PID on drop, bound address read from
//! its log), [`wait`] (the lab's one polling wait with a deadline, shared with the soak),
//! [`ports`] (ports without the bind-drop-reuse race where avoidable), and
//! the Dovecot, PostgreSQL-cluster, fault-proxy and scenario helpers.

pub mod awkward;
pub mod child;
pub mod dovecot;
pub mod fault_proxy;
pub mod pg_cluster;
pub mod pipeline;
pub mod ports;
pub mod scenario;
pub mod sim_world;
pub mod wait;
pub mod work;
