#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dovecot_harness;
mod metrics;
mod prometheus;
mod support;
