pub mod awkward;
pub mod child;
pub mod dovecot;
pub mod pipeline;
pub mod sim_world;
