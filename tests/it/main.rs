#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dovecot_harness;
mod ingest;
mod ingest_dovecot;
mod support;
mod worker_process;
