//! ccmail: turns contact-center mailboxes into queues.
//!
//! Layers, bottom up: [`pop3`] speaks the protocol, [`oauth`] obtains and shares app-only
//! tokens, [`ingest`] parses messages and moves them into PostgreSQL through [`store`];
//! [`display`] makes outside text safe for terminals and logs. Simulators, the demo, the bench
//! and the soak test live in the separate `ccmail-lab` package (worker/lab), never in here.

pub mod admin;
pub mod config;
pub mod display;
pub mod doctor;
pub mod ingest;
pub mod metrics;
pub mod oauth;
pub mod pop3;
pub mod secrets;
pub mod store;
pub mod tls;
