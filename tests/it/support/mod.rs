pub mod child;
pub mod dovecot;
pub mod sim_world;
