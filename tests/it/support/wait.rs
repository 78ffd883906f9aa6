//! The tests' one way to wait for a condition is the lab's (`ccmail_lab::wait`, shared with
//! the soak): poll it until it holds, fail with a message naming what was awaited once a
//! deadline has passed. Nothing in the tests sleeps to synchronise.

pub use ccmail_lab::wait::{poll, wait_for, wait_until};
