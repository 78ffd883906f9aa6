//! When a pilot polls next, and how: the rules the supervisor's pilot loop follows after
//! every poll, kept apart from the loop so they can be tested poll by poll.

use std::time::Duration;

use tokio::time::Instant;

use crate::ingest::poller::{PollError, PollMode, PollOutcome};
use crate::model::retry::Retry;
use crate::oauth;
use crate::pop3;

/// The settings [`Pacing`] reads.
#[derive(Debug, Clone, Copy)]
pub struct PacingSettings {
    pub poll_interval: Duration,
    pub poll_jitter: f64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub permanent_retry: Duration,
    pub login_refusal_grace: Duration,
}

/// What the pilot loop remembers between polls, and the rules for the next one:
/// - after a success: the poll interval with jitter, or at once when the per-poll cap left
///   messages behind;
/// - a failed poll that stored or deleted messages made progress: the backoff starts over at
///   its first step (a link that drops now and then must not slow a mailbox that drains);
/// - a login refused with the server's generic answer ([`pop3::Error::AuthRejected`]) is a
///   state, not a verdict (Exchange Online answers a missing permission, too many sessions on
///   the mailbox and a permission still propagating all alike): retried after 15 s, 30 s, then
///   every 60 s; only after 3 refusals over `login_refusal_grace` is it persistent (the
///   checklist, the metric), retried after 2, 5 and 10 minutes, then every `permanent_retry`;
/// - other failures: what the error's [`Retry`] says: exponential backoff ([`Retry::Soon`]),
///   `permanent_retry` ([`Retry::Slowly`]), or no retry until the pilot changes
///   ([`Retry::Never`]);
/// - after a poll that was cut off once it had downloaded messages, the next polls use short
///   sessions (half of what the cut-off session downloaded; commit, DELE, QUIT each), so a
///   link that keeps dropping still shrinks the mailbox with every session; a clean poll ends
///   that.
#[derive(Debug, Default)]
pub struct Pacing {
    /// Consecutive failed polls without progress.
    failures: u32,
    /// Consecutive refused logins, since when, and how many of them came after the refusal
    /// turned persistent.
    refusals: u32,
    refused_since: Option<Instant>,
    persistent_refusals: u32,
    session_messages: Option<usize>,
}

/// What [`Pacing::next`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `None`: wait for the pilot's settings to change.
    pub delay: Option<Duration>,
    /// The poll's login was refused: how long that has lasted.
    pub refusal: Option<Refusal>,
}

impl Decision {
    /// The refusal has lasted long enough to be reported as persistent.
    pub fn login_refused(&self) -> bool {
        self.refusal.as_ref().is_some_and(|r| r.persistent)
    }
}

/// A run of refused logins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub count: u32,
    pub lasted: Duration,
    pub persistent: bool,
}

/// Early retries of a refused login, then every [`REFUSAL_STEADY`] within the grace period.
const REFUSAL_EARLY: [Duration; 2] = [Duration::from_secs(15), Duration::from_secs(30)];
const REFUSAL_STEADY: Duration = Duration::from_secs(60);
/// Retries once the refusal is persistent, before `permanent_retry` takes over.
const REFUSAL_LATE: [Duration; 3] = [
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(600),
];
/// Refusals (at least) that make a refusal persistent, with the grace period.
const REFUSALS_TO_PERSIST: u32 = 3;

impl Pacing {
    /// How the next poll should run.
    pub fn mode(&self) -> PollMode {
        PollMode {
            session_messages: self.session_messages,
        }
    }

    /// Consecutive failed polls without progress.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Takes in a poll's outcome (at `now`) and decides when the next one runs.
    pub fn next(
        &mut self,
        outcome: &PollOutcome,
        settings: &PacingSettings,
        now: Instant,
    ) -> Decision {
        let error = match &outcome.result {
            Ok(()) => {
                *self = Pacing::default();
                let delay = if outcome.report.more_waiting {
                    Duration::ZERO
                } else {
                    jittered(settings.poll_interval, settings.poll_jitter)
                };
                return Decision {
                    delay: Some(delay),
                    refusal: None,
                };
            }
            Err(e) => e,
        };
        if outcome.downloaded_before_failure > 0 {
            self.session_messages = Some((outcome.downloaded_before_failure / 2).max(1));
        }
        if let PollError::Pop3(pop3::Error::AuthRejected { .. }) = error {
            self.refusals = self.refusals.saturating_add(1);
            let since = *self.refused_since.get_or_insert(now);
            let lasted = now.saturating_duration_since(since);
            let persistent =
                self.refusals >= REFUSALS_TO_PERSIST && lasted >= settings.login_refusal_grace;
            let delay = if persistent {
                self.persistent_refusals = self.persistent_refusals.saturating_add(1);
                let step = usize::try_from(self.persistent_refusals - 1).unwrap_or(usize::MAX);
                REFUSAL_LATE
                    .get(step)
                    .map_or(settings.permanent_retry, |d| {
                        (*d).min(settings.permanent_retry)
                    })
            } else {
                let step = usize::try_from(self.refusals - 1).unwrap_or(usize::MAX);
                let early = REFUSAL_EARLY.get(step).copied().unwrap_or(REFUSAL_STEADY);
                // Never slower than the slowest retry the settings allow.
                early.min(settings.permanent_retry)
            };
            self.failures = self.failures.saturating_add(1);
            return Decision {
                delay: Some(delay),
                refusal: Some(Refusal {
                    count: self.refusals,
                    lasted,
                    persistent,
                }),
            };
        }
        // Any other answer ends a run of refusals: the login got further, or never got there.
        self.refusals = 0;
        self.refused_since = None;
        self.persistent_refusals = 0;
        self.failures = if outcome.progressed() {
            1
        } else {
            self.failures.saturating_add(1)
        };
        let delay = match error.retry() {
            Retry::Soon => Some(oauth::backoff(
                settings.initial_backoff,
                settings.max_backoff,
                self.failures,
            )),
            Retry::Slowly => Some(settings.permanent_retry),
            Retry::Never => None,
        };
        Decision {
            delay,
            refusal: None,
        }
    }
}

impl Refusal {
    /// The pilot's error text for a refused login: the causes that pass by themselves first,
    /// while they are plausible.
    pub fn describe(&self, error: &PollError, delay: Option<Duration>) -> String {
        let retry = delay.map_or_else(
            || "not retried until the pilot changes".to_owned(),
            |d| format!("retrying in {} s", d.as_secs()),
        );
        let times = if self.count == 1 {
            "once".to_owned()
        } else {
            format!("{} times over {} s", self.count, self.lasted.as_secs())
        };
        if self.persistent {
            format!(
                "{error} (refused {times}: persistent, not a passing session limit or \
                 propagation delay; check the app's permissions as the fix says; {retry})"
            )
        } else {
            format!(
                "{error} (refused {times}; often temporary: another session may hold this \
                 mailbox (another mail client, or another ccmail worker polling it), or a \
                 permission granted less than an hour ago has not reached the server yet; \
                 {retry})"
            )
        }
    }
}

fn jittered(interval: Duration, jitter: f64) -> Duration {
    interval + interval.mul_f64(jitter * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::poller::PollReport;

    fn settings() -> PacingSettings {
        PacingSettings {
            poll_interval: Duration::from_secs(5),
            poll_jitter: 0.0,
            initial_backoff: Duration::from_secs(4),
            max_backoff: Duration::from_secs(300),
            permanent_retry: Duration::from_secs(900),
            login_refusal_grace: Duration::from_secs(600),
        }
    }

    fn refused() -> PollOutcome {
        PollOutcome {
            report: PollReport::default(),
            result: Err(PollError::Pop3(pop3::Error::AuthRejected {
                mechanism: "XOAUTH2",
                code: None,
                text: "Authentication failure: unknown user name or bad password.".to_owned(),
                detail: None,
            })),
            downloaded_before_failure: 0,
        }
    }

    fn dropped(stored: usize, downloaded: usize) -> PollOutcome {
        PollOutcome {
            report: PollReport {
                stored,
                ..PollReport::default()
            },
            result: Err(PollError::Pop3(pop3::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))),
            downloaded_before_failure: downloaded,
        }
    }

    fn ok() -> PollOutcome {
        PollOutcome {
            report: PollReport::default(),
            result: Ok(()),
            downloaded_before_failure: 0,
        }
    }

    #[test]
    fn a_refused_login_is_retried_quickly_then_reported_as_persistent() {
        let (s, start) = (settings(), Instant::now());
        let mut pacing = Pacing::default();
        let mut at = start;
        let mut delays = Vec::new();
        let mut persistent_at = None;
        for _ in 0..20 {
            let d = pacing.next(&refused(), &s, at);
            let refusal = d.refusal.clone().unwrap();
            assert_eq!(d.login_refused(), refusal.persistent);
            if refusal.persistent && persistent_at.is_none() {
                persistent_at = Some(at - start);
            }
            let delay = d.delay.unwrap();
            delays.push(delay.as_secs());
            at += delay;
        }
        // 15, 30, then every 60 s within the grace: another session ending is noticed
        // within a minute.
        assert_eq!(&delays[..4], &[15, 30, 60, 60]);
        let persistent_at = persistent_at.unwrap();
        assert!(persistent_at >= s.login_refusal_grace, "{persistent_at:?}");
        assert!(persistent_at < s.login_refusal_grace + REFUSAL_STEADY * 2);
        let after: Vec<u64> = delays[delays.len() - 4..].to_vec();
        assert!(after.iter().all(|d| *d == 900), "{delays:?}");
        assert!(delays.contains(&120) && delays.contains(&300) && delays.contains(&600));
        // A success ends the state.
        let d = pacing.next(&ok(), &s, at);
        assert!(!d.login_refused() && d.refusal.is_none());
        assert_eq!(d.delay, Some(s.poll_interval));
        assert_eq!(
            pacing.next(&refused(), &s, at).delay,
            Some(REFUSAL_EARLY[0])
        );
    }

    #[test]
    fn the_refusal_text_names_the_passing_causes_until_it_persists() {
        let (s, start) = (settings(), Instant::now());
        let mut pacing = Pacing::default();
        let outcome = refused();
        let error = outcome.result.as_ref().unwrap_err();
        let d = pacing.next(&outcome, &s, start);
        let text = d.refusal.unwrap().describe(error, d.delay);
        assert!(text.contains("another session"), "{text}");
        assert!(text.contains("less than an hour ago"), "{text}");
        let persistent = Refusal {
            count: 12,
            lasted: Duration::from_secs(700),
            persistent: true,
        };
        let text = persistent.describe(error, Some(Duration::from_secs(120)));
        assert!(
            text.contains("persistent") && text.contains("permissions"),
            "{text}"
        );
    }

    #[test]
    fn progress_starts_the_backoff_over_and_interrupted_polls_use_short_sessions() {
        let (s, now) = (settings(), Instant::now());
        let mut pacing = Pacing::default();
        // Failures without progress back off further and further.
        let mut last = Duration::ZERO;
        for _ in 0..4 {
            last = pacing.next(&dropped(0, 0), &s, now).delay.unwrap();
        }
        assert!(last > s.initial_backoff, "{last:?}");
        assert_eq!(pacing.mode().session_messages, None);
        // A failed poll that stored messages: back to the first step, and short sessions.
        let d = pacing.next(&dropped(6, 6), &s, now);
        assert!(d.delay.unwrap() <= s.initial_backoff, "{d:?}");
        assert_eq!(pacing.mode().session_messages, Some(3));
        // Cut off before any download of its session: the session size stays.
        pacing.next(&dropped(3, 0), &s, now);
        assert_eq!(pacing.mode().session_messages, Some(3));
        pacing.next(&dropped(1, 1), &s, now);
        assert_eq!(pacing.mode().session_messages, Some(1));
        // A clean poll ends it.
        pacing.next(&ok(), &s, now);
        assert_eq!(pacing.mode().session_messages, None);
        assert_eq!(pacing.failures(), 0);
    }
}
