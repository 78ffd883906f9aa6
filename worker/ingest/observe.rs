//! The database side of telemetry: the periodic read that sets the work-item and
//! client-secret gauges, and the readiness check behind `/readyz`.
//!
//! It lives here, above both [`crate::store`] and [`crate::telemetry`], so that telemetry
//! imports neither the store nor oauth. Gauges are read every refresh interval, never on a
//! scrape, so Prometheus cannot load the database.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{self, Db, StoreError};
use crate::telemetry::{self, AppInfo, Metrics, QueueCount, Readiness};

/// Reads the work-item gauges and the apps (names, client-secret expiry) once.
pub async fn refresh_from_database(pool: &Db, metrics: &Metrics) -> Result<(), StoreError> {
    let (apps, counts, oldest) = pool
        .with_conn("refresh the gauges", async |conn| {
            let apps = store::list_apps(conn).await?;
            let counts = store::queue_counts(conn).await?;
            let oldest = store::oldest_queued_age(conn).await?;
            Ok((apps, counts, oldest))
        })
        .await?;
    let apps: Vec<AppInfo> = apps
        .iter()
        .map(|a| AppInfo {
            id: a.token_key().telemetry_id(),
            name: a.name.clone(),
            secret_expires_at: a.secret_expires_at.map(std::time::SystemTime::from),
        })
        .collect();
    let counts: Vec<QueueCount> = counts
        .into_iter()
        .map(|c| QueueCount {
            queue: c.queue,
            status: c.status,
            count: c.count,
        })
        .collect();
    metrics.apps_refreshed(&apps);
    metrics.queues_refreshed(&counts, &oldest);
    Ok(())
}

/// Refreshes the database gauges of [`telemetry::global()`] every `interval` until `cancel`,
/// and runs the registry's upkeep on the same tick.
pub async fn refresh_loop(pool: Db, interval: Duration, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        telemetry::global().upkeep();
        if let Err(e) = refresh_from_database(&pool, telemetry::global()).await {
            telemetry::global().refresh_failed();
            tracing::warn!(error = %e, "could not read work-item gauges from the database");
        }
    }
}

/// The `/readyz` check over `pool`: the database answers and every embedded migration is
/// applied.
pub fn readiness(pool: Db) -> Readiness {
    std::sync::Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move { check_ready(&pool).await })
    })
}

/// Why the worker is not ready, in words for the `/readyz` body.
async fn check_ready(pool: &Db) -> Result<(), String> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| format!("database unreachable: {e}"))?;
    let pending = store::pending_migrations(&mut conn)
        .await
        .map_err(|e| format!("cannot read the migration table: {e}"))?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "migrations not applied: {} (run `ccmail migrate`)",
            pending
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}
