//! The tests' one way to wait for a condition: poll it every [`CHECK_EVERY`] until it holds,
//! and fail (naming what was awaited, and whatever the caller says about the state at that
//! moment) once a deadline has passed. Nothing in the tests sleeps to synchronise: every wait
//! for another task, process or server goes through [`poll`] (directly or through
//! [`wait_for`] / [`wait_until`]), so a hang becomes a failure with a message, not a stuck test.

use std::future::Future;
use std::time::Duration;

/// How often a condition is re-checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(25);

/// Re-checks `check` every [`CHECK_EVERY`] until it returns `Some`; an `Err` ends the wait at
/// once. Fails after `within`, naming `what` and `context()`.
pub async fn poll<T, F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
    context: impl Fn() -> String,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let until = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > until {
            let context = context();
            if context.is_empty() {
                anyhow::bail!("timed out after {within:?} waiting for {what}");
            }
            anyhow::bail!("timed out after {within:?} waiting for {what}; {context}");
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Waits for `check` to return `Some`, failing after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(
        what,
        within,
        || {
            let fut = check();
            async move { Ok(fut.await) }
        },
        String::new,
    )
    .await
}

/// Waits until `done` holds (an `Err` ends the wait), failing after `deadline` with `what` and
/// `context()`.
pub async fn wait_until<F, Fut>(
    what: &str,
    deadline: Duration,
    mut done: F,
    context: impl Fn() -> String,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    poll(
        what,
        deadline,
        || {
            let fut = done();
            async move { Ok(fut.await?.then_some(())) }
        },
        context,
    )
    .await
}
