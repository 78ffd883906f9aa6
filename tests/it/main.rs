#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod doctor;
mod dovecot_harness;
mod ingest;
mod ingest_dovecot;
mod live_reload;
mod log_secrets;
mod metrics;
mod oauth_sim;
mod pop3_dovecot;
mod pop3_sim;
mod prometheus;
mod properties;
mod soak;
mod support;
mod worker_process;
