//! The real `ccmail` binary as a child process of a test: the lab's one spawner
//! (`ccmail_lab::child::Child`, shared with the soak), with its output captured to a file and
//! killed by PID when the test ends without having reaped it. Tests pass [`ccmail`] as the
//! executable.

use std::path::Path;

pub use ccmail_lab::child::Child as CcmailChild;

/// The `ccmail` binary Cargo built for these tests.
pub fn ccmail() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ccmail"))
}
