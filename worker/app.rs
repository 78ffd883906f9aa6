//! `ccmail run`'s wiring, as a library function: the database pool, the HTTP listener for
//! `/metrics`, `/healthz` and `/readyz`, the agents' API on its own listener, the rescue of
//! expired offers and leases, the gauge refresh, the token cache and the supervisor of the
//! pollers, and the drain on shutdown. The CLI calls [`run`] with a token cancelled by
//! SIGTERM/SIGINT; a test can call it in-process with its own token.
//!
//! Ordering invariants: the listener serves before the database is reached (`ccmail run`
//! waits for PostgreSQL with backoff, `/readyz` red meanwhile, SIGTERM still stops it); the
//! listener is bound before migrating (a container probe sees the
//! process alive during a long migration, and a port conflict is reported before any work
//! starts); the listener stops only after the pollers have drained (metrics stay readable
//! while the last messages are committed).

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiSettings, ApiState};
use crate::config::Config;
use crate::ingest::observe;
use crate::ingest::supervisor::{Supervisor, SupervisorSettings};
use crate::oauth::{CachePolicy, TokenCache, TokenSource, TokenSourceOptions};
use crate::store;
use crate::telemetry::{self, HttpLimits};
use crate::web::{self, WebSettings, WebState};

/// How long shutdown waits for the gauge refresh to notice it is cancelled.
const REFRESH_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `http.listen` (and `api.listen` when the API is enabled) and runs the worker until
/// `shutdown` is cancelled, then drains.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = bind(config).await?;
    let api = if config.api.enabled {
        Some(bind_api(config).await?)
    } else {
        None
    };
    let web = if config.web.enabled {
        Some(bind_web(config).await?)
    } else {
        None
    };
    run_listeners(config, listener, api, web, shutdown).await
}

/// Binds the web console's listener the settings name.
pub async fn bind_web(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(&config.web.listen).await.with_context(|| {
        format!(
            "cannot listen on {} for the web console (set web.listen or CCMAIL_WEB_LISTEN to a free address, or web.enabled = false)",
            config.web.listen
        )
    })
}

/// Binds the agents' API listener the settings name; the error says which setting to change.
pub async fn bind_api(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(&config.api.listen).await.with_context(|| {
        format!(
            "cannot listen on {} for the agents' API (set api.listen or CCMAIL_API_LISTEN to a free address, or api.enabled = false)",
            config.api.listen
        )
    })
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
/// address from the listener before handing it over), until `shutdown` is cancelled; the
/// agents' API is not served.
pub async fn run_on(
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(config, listener, None, shutdown).await
}

/// Runs the worker with the listeners the caller bound: `/metrics` and health on `listener`,
/// the agents' API on `api` when given. The rescue of expired offers and leases runs either
/// way.
pub async fn run_with(
    config: &Config,
    listener: TcpListener,
    api: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_listeners(config, listener, api, None, shutdown).await
}

/// As [`run_with`], with the web console on `web` when given.
pub async fn run_listeners(
    config: &Config,
    listener: TcpListener,
    api: Option<TcpListener>,
    web: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = store::Db::connect_lazy(
        &config.database.url,
        &store::DbSettings::from_config(&config.database),
    )?;
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
    let api_settings = ApiSettings::from_config(&config.api);
    let api_task = api.map(|api_listener| {
        match api_listener.local_addr() {
            Ok(addr) => tracing::info!(listen = %addr, "serving the agents' API at /api/v1"),
            Err(e) => tracing::warn!(error = %e, "API listener has no local address"),
        }
        tokio::spawn(api::serve(
            api_listener,
            ApiState::new(pool.clone(), api_settings.clone(), shutdown.clone()),
            api::limits(&config.api),
            http_stop.clone(),
        ))
    });

    let web_task = web.map(|web_listener| {
        match web_listener.local_addr() {
            Ok(addr) => tracing::info!(listen = %addr, "serving the web console"),
            Err(e) => tracing::warn!(error = %e, "web console listener has no local address"),
        }
        tokio::spawn(web::serve(
            web_listener,
            WebState::new(
                pool.clone(),
                WebSettings::from_config(&config.web, api_settings.clone()),
            ),
            web::limits(&config.web),
            http_stop.clone(),
        ))
    });
    // Why the listener first: while the database is away `/healthz` answers and `/readyz`
    // says why the worker is not ready, instead of the process exiting and restarting.
    let result = match wait_for_database(config, &pool, &shutdown).await {
        Ok(true) => supervise(config, pool, shutdown).await,
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    // Metrics stay available until the pollers have drained.
    http_stop.cancel();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP listener failed"),
        Err(e) => tracing::warn!(error = %e, "HTTP listener task failed"),
    }
    if let Some(web_task) = web_task {
        match web_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "web console listener failed"),
            Err(e) => tracing::warn!(error = %e, "web console listener task failed"),
        }
    }
    if let Some(api_task) = api_task {
        match api_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "API listener failed"),
            Err(e) => tracing::warn!(error = %e, "API listener task failed"),
        }
    }

    // Why bounded: a refresh stuck on a database connection that went silent must not keep
    // the process from exiting; its reads change nothing.
    let mut refresh = refresh;
    match tokio::time::timeout(REFRESH_STOP, &mut refresh).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "gauge refresh task failed"),
        Err(_) => {
            refresh.abort();
            tracing::warn!("gauge refresh still waiting for the database at shutdown; abandoned");
        }
    }
    result
}

/// Waits until the database answers, retrying with backoff (logged, so an operator sees what
/// the worker waits for). True once it answers; false when `shutdown` came first. A refusal
/// that only an operator can fix (login refused, database missing) ends the wait with that
/// error.
async fn wait_for_database(
    config: &Config,
    pool: &store::Db,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let target = store::redacted_url(&config.database.url);
    let mut backoff = crate::model::defaults::DB_WAIT_INITIAL_BACKOFF;
    let mut attempts: u32 = 0;
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            outcome = pool.ping_server() => outcome,
        };
        match outcome {
            Ok(()) => {
                if attempts > 0 {
                    tracing::info!(database = %target, attempts, "the database answers");
                }
                return Ok(true);
            }
            Err(e) if e.is_transient() => {
                attempts += 1;
                tracing::warn!(
                    database = %target,
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    "waiting for the database; /readyz stays red until it answers"
                );
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(crate::model::defaults::DB_WAIT_MAX_BACKOFF);
    }
}

/// Migrates, builds the shared token cache and runs the supervisor until `shutdown`.
async fn supervise(
    config: &Config,
    pool: store::Db,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    store::migrate(&pool).await?;
    // After migrating: the rescue step needs the lifecycle's columns.
    let rescue = tokio::spawn(api::rescue_loop(
        pool.clone(),
        ApiSettings::from_config(&config.api),
        shutdown.clone(),
    ));
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
    // Why abandoned, not awaited: a rescue pass only moves expired claims back, which the
    // next pass (of any process) does as well.
    rescue.abort();
    Ok(())
}
