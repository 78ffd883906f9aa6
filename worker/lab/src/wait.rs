//! The lab's one way to wait for a condition, used by the integration tests and the soak: poll
//! it every [`CHECK_EVERY`] (or a chosen interval) until it holds, and fail (naming what was
//! awaited, and whatever the caller says about the state at that moment) once a deadline has
//! passed. Nothing sleeps to synchronise: every wait for another task, process or server goes
//! through [`watch`] (directly or through [`poll`], [`wait_for`] or [`wait_until`]), so a hang
//! becomes a failure with a message, not a stuck test or soak.

use std::future::Future;
use std::time::Duration;

/// How often a condition is re-checked by [`poll`], [`wait_for`] and [`wait_until`].
pub const CHECK_EVERY: Duration = Duration::from_millis(25);

/// Re-checks `check` every `every` until it returns `Some`; an `Err` ends the wait at once.
/// `Ok(None)` once `within` has passed without the condition holding: for a caller to whom
/// "it did not happen" is an answer, not a failure.
pub async fn watch<T, F, Fut>(
    within: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let until = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(Some(v));
        }
        if tokio::time::Instant::now() > until {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}

/// Re-checks `check` every [`CHECK_EVERY`] until it returns `Some`; an `Err` ends the wait at
/// once. Fails after `within`, naming `what` and `context()`.
pub async fn poll<T, F, Fut>(
    what: &str,
    within: Duration,
    check: F,
    context: impl Fn() -> String,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    poll_every(what, within, CHECK_EVERY, check, context).await
}

/// As [`poll`], re-checking every `every`.
pub async fn poll_every<T, F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    check: F,
    context: impl Fn() -> String,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    match watch(within, every, check).await? {
        Some(v) => Ok(v),
        None => {
            let context = context();
            if context.is_empty() {
                anyhow::bail!("timed out after {within:?} waiting for {what}");
            }
            anyhow::bail!("timed out after {within:?} waiting for {what}; {context}");
        }
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
