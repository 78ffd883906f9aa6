//! Operations for people: `doctor` checks a pilot or an app step by step with the fix for each
//! failure; `admin` validates what admins enter and renders the views of apps and pilots.
//!
//! Invariant: `doctor` may use `admin`'s validation, never the other way round; neither
//! deletes mail or prints a secret.

pub mod admin;
pub mod doctor;
