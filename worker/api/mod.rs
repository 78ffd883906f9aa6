//! The agents' HTTP API (`/api/v1`): claims and every step of a work item's life, the work
//! item with its message, attachments and raw `.eml`, queues and events, for the contact
//! center's agent desktop, router or dispatcher. Plus the rescue loop that puts expired
//! offers and leases back.
//!
//! - Authentication: `Authorization: Bearer <key>` ([`auth`]); every route, the OpenAPI
//!   document included. No key or a revoked key → 401; a key without the role or the queue →
//!   403.
//! - Errors: RFC 9457 `application/problem+json` ([`problem`]); a step whose claim is no
//!   longer current → 409.
//! - `Idempotency-Key` on every POST: the first answer (success or problem) is kept with the
//!   transition, in one transaction, and replayed for the same key and the same request; the
//!   same key with another request → 422.
//! - The OpenAPI 3.1 document at `/api/v1/openapi.json` is generated from the handlers'
//!   annotations ([`routes`]), so a route cannot be served without being documented.
//!
//! Layering: uses the store, telemetry, config and model; `app` serves it beside the
//! metrics listener; nothing below imports it.

pub mod auth;
pub mod problem;
pub mod routes;
pub mod waker;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::ApiConfig;
use crate::store::{self, Db};
use crate::telemetry::{self, HttpLimits};

pub use auth::{Principal, generate_key, hash_key};
pub use problem::Problem;

/// The lifecycle's timings and the API's bounds (`[api]` settings).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSettings {
    pub offer_ttl: Duration,
    pub lease_ttl: Duration,
    pub max_offers: i32,
    pub max_claim_wait: Duration,
    pub max_claim_batch: u32,
    pub max_body_bytes: usize,
    pub rescue_interval: Duration,
    pub idempotency_retention: Duration,
}

impl ApiSettings {
    pub fn from_config(api: &ApiConfig) -> ApiSettings {
        ApiSettings {
            offer_ttl: api.offer_timeout_secs,
            lease_ttl: api.lease_secs,
            // Checked to be at most 1000 when the settings load.
            max_offers: i32::try_from(api.max_offers).unwrap_or(i32::MAX),
            max_claim_wait: api.max_claim_wait_secs,
            max_claim_batch: api.max_claim_batch,
            max_body_bytes: api.max_body_bytes,
            rescue_interval: api.rescue_interval_secs,
            idempotency_retention: api.idempotency_retention_secs,
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings::from_config(&ApiConfig::default())
    }
}

/// The listener limits the `[api]` settings ask for.
pub fn limits(api: &ApiConfig) -> HttpLimits {
    HttpLimits {
        max_connections: api.max_connections,
        header_read_timeout: api.header_read_timeout_secs,
        idle_timeout: api.idle_timeout_secs,
        max_connection_lifetime: api.max_connection_lifetime_secs,
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    settings: ApiSettings,
    waker: Arc<waker::Waker>,
    /// Cancelled at shutdown: long-poll claims answer at once.
    shutdown: CancellationToken,
}

impl ApiState {
    pub fn new(db: Db, settings: ApiSettings, shutdown: CancellationToken) -> ApiState {
        ApiState {
            inner: Arc::new(Inner {
                db,
                settings,
                waker: Arc::new(waker::Waker::default()),
                shutdown,
            }),
        }
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn settings(&self) -> &ApiSettings {
        &self.inner.settings
    }

    pub fn waker(&self) -> &Arc<waker::Waker> {
        &self.inner.waker
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }
}

/// The `/api/v1` routes and the OpenAPI document that describes them.
pub fn router(state: ApiState) -> Router {
    let (router, _) = routes::split(state);
    router
}

/// The OpenAPI document of [`router`] (also served at `/api/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::document()
}

/// Serves the API on `listener` until `shutdown`, with the LISTEN waker for long-poll
/// claims.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let waker = tokio::spawn(
        state
            .waker()
            .clone()
            .run(state.db().clone(), shutdown.clone()),
    );
    let served = telemetry::serve_router(listener, router(state), limits, shutdown).await;
    waker.abort();
    served
}

/// Puts expired offers and leases back every `rescue_interval` until `shutdown`, and forgets
/// kept idempotent answers past their retention. Safe to run in every replica.
pub async fn rescue_loop(db: Db, settings: ApiSettings, shutdown: CancellationToken) {
    /// Items moved per statement; a backlog of expiries is worked off in several.
    const BATCH: u32 = 500;
    let metrics = telemetry::global();
    let mut last_cleanup: Option<tokio::time::Instant> = None;
    loop {
        loop {
            let rescued = db
                .with_conn("rescue", async |conn| {
                    store::lifecycle::rescue(conn, settings.max_offers, BATCH).await
                })
                .await;
            match rescued {
                Ok(by_queue) => {
                    let mut moved = 0;
                    for (queue, r) in &by_queue {
                        moved += r.offers_expired + r.leases_expired;
                        metrics.work_rescued(queue, r.offers_expired, r.leases_expired, r.held);
                        if r.leases_expired > 0 || r.held > 0 {
                            tracing::info!(queue = %queue, offers_expired = r.offers_expired, leases_expired = r.leases_expired, held = r.held, "expired claims put back");
                        }
                    }
                    if moved < u64::from(BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rescue of expired offers and leases failed; trying again");
                    break;
                }
            }
        }
        if last_cleanup.is_none_or(|t| t.elapsed() >= Duration::from_secs(300)) {
            last_cleanup = Some(tokio::time::Instant::now());
            let retention = settings.idempotency_retention.as_secs_f64();
            if let Err(e) = db
                .with_conn("idempotency cleanup", async |conn| {
                    store::expire_idempotency_keys(conn, retention).await
                })
                .await
            {
                tracing::warn!(error = %e, "forgetting old idempotent answers failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(settings.rescue_interval) => {}
        }
    }
}
