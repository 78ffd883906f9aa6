//! ccmail: turns contact-center mailboxes into queues.
//!
//! Layout, one line per module, top layer first:
//!
//! | layer | module | role |
//! |---|---|---|
//! | 1 | [`cli`] | the `ccmail` commands: clap definitions and one handler per command |
//! | 2 | [`app`] | `ccmail run`'s wiring: pool, HTTP listener, supervisor, drain |
//! | 3 | [`ingest`] | parsing, the pilot resolver, the pollers and their supervisor |
//! | 3 | [`api`] | the agents' HTTP API (`/api/v1`): claims, steps, items, OpenAPI; the rescue loop |
//! | 3 | [`web`] | the web console: server-rendered pages, accounts' sessions, CSRF, CSP |
//! | 3 | [`ops`] | `doctor` (step-by-step checks with fixes) and `admin` (validation, views) |
//! | 4 | [`store`] | all SQL: apps, pilots, credentials, messages, work items, LISTEN |
//! | 4 | [`pop3`] | the sans-IO POP3 codec, the client's typed states, the TLS connection |
//! | 4 | [`oauth`] | app-only tokens: the token endpoint client, the shared cache, AADSTS facts |
//! | 4 | [`telemetry`] | metric declarations, per-pilot handles, `/metrics` `/healthz` `/readyz` |
//! | 5 | [`model`] | plain data: parsed mail, pilot facts, defaults, work-item words, `Retry` |
//! | 5 | [`config`] | settings, loaded once from the file and `CCMAIL_*`, typed and validated |
//! | 5 | [`secrets`] | the master key, sealed values bound to their row, secret references |
//! | 5 | [`tls`] | the rustls provider and certificate roots |
//! | 5 | [`display`] | outside text made safe for terminals and logs |
//!
//! The dependency rule: a module imports only modules of its own layer or of lower ones
//! (higher numbers), and never one that imports it back, at any depth. `tests/it/layers.rs`
//! reads every `crate::`/`super::`/`self::` path in `worker/` and fails on an edge that breaks
//! the rule. The simulators, the demo, the bench and the soak live in the `ccmail-lab`
//! package (`worker/lab`), which builds on this one and is never part of the product.

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod display;
pub mod ingest;
pub mod model;
pub mod oauth;
pub mod ops;
pub mod pop3;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod web;
