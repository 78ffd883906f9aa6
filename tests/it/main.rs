#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod doctor;
mod dovecot_harness;
mod live_reload;
mod support;
