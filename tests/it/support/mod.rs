pub mod awkward;
pub mod child;
pub mod dovecot;
pub mod fault_proxy;
pub mod pg_cluster;
pub mod pipeline;
pub mod scenario;
pub mod sim_world;
