//! Shared pieces of the fault-injection scenarios (`faults_*.rs`): fast supervisor settings,
//! counting POP3 commands, and the one summary line
//! each scenario prints:
//!
//! `scenario=<name> faults=<n> messages=<n> lost=<n> duplicated=<n>`

use std::time::Duration;

use ccmail::ingest::poller::IngestLimits;
use ccmail::ingest::supervisor::SupervisorSettings;
use ccmail::secrets::CredentialPolicy;

use super::pipeline::{Tally, test_timeouts};

/// Supervisor settings that retry fast, so a scenario's recovery takes seconds; `credentials`
/// allow the world's simulators.
pub fn fast_settings(limits: IngestLimits, credentials: CredentialPolicy) -> SupervisorSettings {
    SupervisorSettings {
        limits,
        timeouts: test_timeouts(),
        reload_interval: Duration::from_secs(1),
        poll_jitter: 0.0,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(2),
        permanent_retry: Duration::from_secs(1),
        login_refusal_grace: ccmail::model::defaults::LOGIN_REFUSAL_GRACE,
        shutdown_grace: Duration::from_secs(10),
        credentials,
    }
}

/// Command lines of `commands` whose verb is `verb` (`"DELE"`, `"RETR"` …).
pub fn with_verb<'a>(commands: &'a [String], verb: &str) -> Vec<&'a String> {
    commands
        .iter()
        .filter(|c| {
            c.split(' ')
                .next()
                .is_some_and(|v| v.eq_ignore_ascii_case(verb))
        })
        .collect()
}

/// Prints the scenario's summary line (visible with `cargo nextest run --no-capture`).
pub fn summary(name: &str, faults: u64, messages: usize, tally: &Tally) {
    eprintln!(
        "scenario={name} faults={faults} messages={messages} lost={} duplicated={}",
        tally.lost.len(),
        tally.duplicated.len()
    );
}
