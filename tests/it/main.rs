#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dovecot_harness;
mod faults_net;
mod faults_pg;
mod faults_token;
mod ingest;
mod ingest_dovecot;
mod log_secrets;
mod oauth_sim;
mod pop3_dovecot;
mod pop3_sim;
mod support;
mod worker_process;
