//! The web console: server-rendered pages (askama templates, checked at compile time; no
//! script, no external assets) for agents, on a listener of its own (`web.listen`).
//!
//! Security headers on every page: a strict Content-Security-Policy (`default-src 'none'`;
//! styles and images from this origin only; forms post only here; never framed), `nosniff`,
//! a referrer only to this origin (so a form's `Origin` names it), no caching. A message's HTML is shown in a sandboxed frame whose own answer
//! carries `CSP: sandbox; default-src 'none'`, so even HTML the sanitiser missed runs no
//! script and loads nothing.
//!
//! Layering: uses the store (accounts, sessions, the lifecycle), the API's download helpers
//! and settings, config and telemetry's hardened listener; `app` serves it.

pub mod pages;
pub mod session;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::api::ApiSettings;
use crate::config::WebConfig;
use crate::store::Db;
use crate::telemetry::{self, HttpLimits};

/// The console's settings.
#[derive(Debug, Clone)]
pub struct WebSettings {
    pub session_lifetime: Duration,
    pub secure_cookies: bool,
    /// Failed logins of one user name allowed per `login_window`.
    pub max_failed_logins: usize,
    pub login_window: Duration,
    /// The lifecycle's timings (offer, lease, max offers) shared with the API.
    pub lifecycle: ApiSettings,
}

impl WebSettings {
    pub fn from_config(web: &WebConfig, lifecycle: ApiSettings) -> WebSettings {
        WebSettings {
            session_lifetime: web.session_lifetime_secs,
            secure_cookies: web.secure_cookies,
            max_failed_logins: web.max_failed_logins as usize,
            login_window: web.login_window_secs,
            lifecycle,
        }
    }
}

/// The listener limits the `[web]` settings ask for.
pub fn limits(web: &WebConfig) -> HttpLimits {
    HttpLimits {
        max_connections: web.max_connections,
        header_read_timeout: web.header_read_timeout_secs,
        idle_timeout: web.idle_timeout_secs,
        max_connection_lifetime: web.max_connection_lifetime_secs,
    }
}

/// What every page handler shares.
#[derive(Clone)]
pub struct WebState {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    settings: WebSettings,
    failed_logins: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl WebState {
    pub fn new(db: Db, settings: WebSettings) -> WebState {
        WebState {
            inner: Arc::new(Inner {
                db,
                settings,
                failed_logins: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn settings(&self) -> &WebSettings {
        &self.inner.settings
    }

    /// Whether `name` may try to log in now (fewer failures than allowed in the window).
    fn login_allowed(&self, name: &str) -> bool {
        let window = self.inner.settings.login_window;
        let mut map = self
            .inner
            .failed_logins
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Why bounded: names are typed by anyone; forget the oldest entries past 10,000.
        if map.len() > 10_000 {
            map.retain(|_, v| v.back().is_some_and(|t| t.elapsed() < window));
        }
        let attempts = map.entry(name.to_owned()).or_default();
        while attempts.front().is_some_and(|t| t.elapsed() >= window) {
            attempts.pop_front();
        }
        attempts.len() < self.inner.settings.max_failed_logins
    }

    fn login_failed(&self, name: &str) {
        let mut map = self
            .inner
            .failed_logins
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned())
            .or_default()
            .push_back(Instant::now());
    }
}

/// The content-security policy of every page.
pub const PAGE_CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
                            frame-src 'self'; form-action 'self'; frame-ancestors 'self'; \
                            base-uri 'none'";

/// The console's routes with their security headers.
pub fn router(state: WebState) -> Router {
    use axum::routing::{get, post};
    Router::new()
        .route("/", get(pages::home))
        .route("/login", get(pages::login_page).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/agent", get(pages::agent_home))
        .route("/agent/take", post(pages::take_next))
        .route("/agent/items/{id}", get(pages::item_page))
        .route("/agent/items/{id}/html", get(pages::item_html))
        .route(
            "/agent/items/{id}/attachments/{ordinal}",
            get(pages::item_attachment),
        )
        .route("/agent/items/{id}/{action}", post(pages::agent_step))
        .route("/admin/pilots", get(pages::admin_pilots))
        .route("/admin/pilots/{id}/poll", post(pages::pilot_poll_now))
        .route("/supervisor/items", get(pages::supervisor_items))
        .route(
            "/supervisor/items/{id}/{action}",
            post(pages::supervisor_step),
        )
        .route("/static/app.css", get(pages::stylesheet))
        .fallback(pages::not_found)
        .layer(axum::middleware::map_response(pages::security_headers))
        .with_state(state)
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: WebState,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    telemetry::serve_router(listener, router(state), limits, shutdown).await
}
