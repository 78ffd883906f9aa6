//! ccmail: turns contact-center mailboxes into queues.
//!
//! Layers, bottom up: [`pop3`] speaks the protocol, [`oauth`] obtains and shares app-only
//! tokens, [`ingest`] parses messages and moves them into PostgreSQL through [`store`];
//! [`sim`] plays Exchange Online and Entra ID for the demo and the tests; [`display`] makes
//! outside text safe for terminals and logs; [`model`] is the plain data every layer shares
//! (parsed mail, pilot facts, defaults, work-item words) and imports no other layer.

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod display;
pub mod ingest;
pub mod model;
pub mod oauth;
pub mod ops;
pub mod pop3;
pub mod secrets;
pub mod sim;
pub mod soak;
pub mod store;
pub mod telemetry;
pub mod tls;
