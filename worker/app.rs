//! `ccmail run`'s wiring, as a library function: the database pool, the HTTP listener for
//! `/metrics`, `/healthz` and `/readyz`, the gauge refresh, the token cache and the supervisor
//! of the pollers, and the drain on shutdown. The CLI calls [`run`] with a token cancelled by
//! SIGTERM/SIGINT; a test can call it in-process with its own token.
//!
//! Ordering invariants: the listener is bound before migrating (a container probe sees the
//! process alive during a long migration, and a port conflict is reported before any work
//! starts); the listener stops only after the pollers have drained (metrics stay readable
//! while the last messages are committed).

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::observe;
use crate::ingest::supervisor::{Supervisor, SupervisorSettings};
use crate::oauth::{CachePolicy, TokenCache, TokenSource, TokenSourceOptions};
use crate::store;
use crate::telemetry::{self, HttpLimits};

/// Binds `http.listen` and runs the worker until `shutdown` is cancelled, then drains.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = bind(config).await?;
    run_on(config, listener, shutdown).await
}

/// Binds the HTTP listener the settings name; the error says which setting to change.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(&config.http.listen).await.with_context(|| {
        format!(
            "cannot listen on {} for /metrics, /healthz and /readyz (set http.listen or CCMAIL_HTTP_LISTEN to a free address)",
            config.http.listen
        )
    })
}

/// Runs the worker with an HTTP listener the caller bound (a test binds port 0 and reads the
/// address from the listener before handing it over), until `shutdown` is cancelled.
pub async fn run_on(
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = store::connect(&config.database.url, config.database.max_connections).await?;
    match listener.local_addr() {
        Ok(addr) => tracing::info!(listen = %addr, "serving /metrics, /healthz and /readyz"),
        Err(e) => tracing::warn!(error = %e, "HTTP listener has no local address"),
    }
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(telemetry::serve(
        listener,
        observe::readiness(pool.clone()),
        HttpLimits::from_config(&config.http),
        http_stop.clone(),
    ));
    let refresh = tokio::spawn(observe::refresh_loop(
        pool.clone(),
        config.http.gauge_refresh_secs,
        http_stop.clone(),
    ));
    let result = supervise(config, pool, shutdown).await;
    // Metrics stay available until the pollers have drained.
    http_stop.cancel();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP listener failed"),
        Err(e) => tracing::warn!(error = %e, "HTTP listener task failed"),
    }
    if let Err(e) = refresh.await {
        tracing::warn!(error = %e, "gauge refresh task failed");
    }
    result
}

/// Migrates, builds the shared token cache and runs the supervisor until `shutdown`.
async fn supervise(
    config: &Config,
    pool: store::Db,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    store::migrate(&pool).await?;
    let tokens = Arc::new(TokenCache::new(
        Arc::new(TokenSource::new(TokenSourceOptions::from_config(
            &config.oauth,
        )?)?),
        CachePolicy::default(),
    ));
    let supervisor = Supervisor::new(
        pool,
        tokens,
        SupervisorSettings::from_config(config),
        config.master_key(),
    );
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "ccmail worker started");
    supervisor.run(shutdown).await;
    Ok(())
}
