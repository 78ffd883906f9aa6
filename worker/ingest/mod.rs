//! Ingest: parsing messages and moving them from a maildrop into PostgreSQL.

pub mod classify;
pub mod identity;
pub mod leasing;
pub mod observe;
pub mod pacing;
pub mod parse;
pub mod pilot;
pub mod placement;
pub mod poller;
pub mod supervisor;
