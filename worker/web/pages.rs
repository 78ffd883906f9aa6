//! The console's pages and form handlers.
//!
//! Every POST of a logged-in page checks the session's CSRF token first; every step on a
//! work item goes through the same fenced lifecycle statements as the API, with the claim
//! token the page was rendered with (so a page left open after the claim passed to someone
//! else changes nothing). An agent is the holder `user:<name>` in claims and events.

use askama::Template;
use axum::Form;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::session::{self, Viewer};
use super::{PAGE_CSP, WebState};
use crate::api::routes::{PASSIVE_TYPES, disposition, download};
use crate::model::{Address, WorkItemStatus};
use crate::store::{self, Role, StoreError, lifecycle, users};

// ---------------------------------------------------------------------------------------
// Templates

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    message: Option<String>,
}

struct QueueRow {
    name: String,
    queued: i64,
    oldest: Option<Age>,
}

struct Age {
    iso: String,
    text: String,
}

#[derive(Template)]
#[template(path = "agent.html")]
struct AgentPage {
    user: String,
    role: String,
    csrf: String,
    message: Option<String>,
    queues: Vec<QueueRow>,
}

struct AttachmentRow {
    ordinal: i32,
    name: String,
    content_type: String,
    size: i64,
}

#[derive(Template)]
#[template(path = "item.html")]
struct ItemPage {
    user: String,
    role: String,
    csrf: String,
    id: i64,
    subject: String,
    from: String,
    to: String,
    date: Option<String>,
    queue: String,
    status: String,
    flags: String,
    text: Option<String>,
    has_html: bool,
    attachments: Vec<AttachmentRow>,
    claim_token: Option<String>,
}

#[derive(Template)]
#[template(path = "problem.html")]
struct ProblemPage {
    title: String,
    detail: String,
}

fn render(t: impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console page could not be rendered");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let mut r = render(ProblemPage {
        title: title.to_owned(),
        detail: detail.into(),
    });
    *r.status_mut() = status;
    r
}

/// A database failure as a page: logged here, shown without its text.
pub fn store_failure(e: StoreError) -> Response {
    if e.is_transient() {
        tracing::warn!(error = %e, "console request failed: the database did not answer");
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Database unavailable",
            "The database did not answer. Try again in a moment.",
        )
    } else {
        tracing::error!(error = %e, "console request failed");
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong",
            "The request failed inside ccmail; the worker's log has the cause.",
        )
    }
}

fn forbidden(detail: &str) -> Response {
    problem(StatusCode::FORBIDDEN, "Not allowed", detail)
}

/// Security headers on every answer (the HTML frame and downloads set stricter ones).
pub async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(PAGE_CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
    response
}

impl IntoResponse for session::NotLoggedIn {
    fn into_response(self) -> Response {
        match self {
            session::NotLoggedIn::Redirect => Redirect::to("/login").into_response(),
            session::NotLoggedIn::Failed(e) => store_failure(e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Session pages

pub async fn home(viewer: Result<Viewer, session::NotLoggedIn>) -> Response {
    match viewer {
        Ok(_) => Redirect::to("/agent").into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn login_page() -> Response {
    render(LoginPage { message: None })
}

#[derive(Deserialize)]
pub struct LoginForm {
    name: String,
    password: String,
}

pub async fn login(
    State(state): State<WebState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !session::same_origin(&headers) {
        return forbidden("The login form must be sent from this console's own page.");
    }
    let name = form.name.trim().to_owned();
    if name.is_empty() || name.len() > 100 || form.password.len() > 1024 {
        return login_refused(StatusCode::UNAUTHORIZED);
    }
    if !state.login_allowed(&name) {
        return {
            let mut r = render(LoginPage {
                message: Some(
                    "Too many failed logins for this user name. Wait a few minutes and try again."
                        .to_owned(),
                ),
            });
            *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            r
        };
    }
    let found = match state
        .db()
        .with_conn("login", async |conn| {
            users::user_for_login(conn, &name).await
        })
        .await
    {
        Ok(found) => found,
        Err(e) => return store_failure(e),
    };
    // Why a hash even for an unknown name: the answer takes as long either way.
    let (user, phc) = match found {
        Some((user, phc)) => (Some(user), phc),
        None => (None, DUMMY_HASH.to_owned()),
    };
    let ok = session::verify_password(form.password, phc).await;
    let Some(user) = user.filter(|_| ok) else {
        state.login_failed(&name);
        return login_refused(StatusCode::UNAUTHORIZED);
    };
    let (token, csrf) = match (session::random_token(), session::random_token()) {
        (Ok(t), Ok(c)) => (t, c),
        _ => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "No random numbers were available for the session.",
            );
        }
    };
    let lifetime = state.settings().session_lifetime;
    let hash = session::hash_token(&token);
    let actor = format!("user:{}", user.name);
    if let Err(e) = state
        .db()
        .with_conn("login", async |conn| {
            users::insert_session(conn, &hash, user.id, &csrf, lifetime.as_secs_f64()).await?;
            users::audit(conn, &actor, "login", None, &serde_json::json!({})).await
        })
        .await
    {
        return store_failure(e);
    }
    let mut r = Redirect::to("/agent").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::session_cookie(
        &token,
        state.settings().secure_cookies,
        lifetime.as_secs(),
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// An argon2id hash of a random password, verified against when the user name is unknown.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$yb3Hq3t9vYlC6J5m0xS6k2uT8g9bq1Y3cZ0rR9d4cWE";

fn login_refused(status: StatusCode) -> Response {
    let mut r = render(LoginPage {
        message: Some("The user name or the password is wrong.".to_owned()),
    });
    *r.status_mut() = status;
    r
}

#[derive(Deserialize)]
pub struct CsrfForm {
    // Missing is refused like wrong (403), not as a malformed form.
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    State(state): State<WebState>,
    viewer: Viewer,
    Form(form): Form<CsrfForm>,
) -> Response {
    if !session::csrf_matches(&form.csrf, &viewer.csrf) {
        return forbidden("The form was not sent from this session's page (CSRF check).");
    }
    let hash = viewer.token_hash;
    if let Err(e) = state
        .db()
        .with_conn("logout", async |conn| {
            users::delete_session(conn, &hash).await
        })
        .await
    {
        return store_failure(e);
    }
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::cleared_cookie(state.settings().secure_cookies))
    {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

// ---------------------------------------------------------------------------------------
// Agent pages

fn age_text(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

async fn agent_page(state: &WebState, viewer: &Viewer, message: Option<String>) -> Response {
    let summaries = match state
        .db()
        .with_conn("queues", async |conn| store::queue_summaries(conn).await)
        .await
    {
        Ok(s) => s,
        Err(e) => return store_failure(e),
    };
    let now = chrono::Utc::now();
    let queues = summaries
        .into_iter()
        .filter(|s| viewer.user.covers(&s.queue))
        .map(|s| QueueRow {
            queued: s
                .counts
                .iter()
                .find(|(st, _)| *st == WorkItemStatus::Queued)
                .map_or(0, |(_, n)| *n),
            oldest: s.oldest_waiting_secs.map(|secs| Age {
                iso: (now - chrono::Duration::milliseconds((secs * 1000.0) as i64))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                text: age_text(secs),
            }),
            name: s.queue,
        })
        .collect();
    render(AgentPage {
        user: viewer.user.name.clone(),
        role: viewer.user.role.to_string(),
        csrf: viewer.csrf.clone(),
        message,
        queues,
    })
}

pub async fn agent_home(State(state): State<WebState>, viewer: Viewer) -> Response {
    agent_page(&state, &viewer, None).await
}

#[derive(Deserialize)]
pub struct TakeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    queue: String,
}

/// Take next: claim the queue's first item and accept it at once (the agent chose it).
pub async fn take_next(
    State(state): State<WebState>,
    viewer: Viewer,
    Form(form): Form<TakeForm>,
) -> Response {
    if !session::csrf_matches(&form.csrf, &viewer.csrf) {
        return forbidden("The form was not sent from this session's page (CSRF check).");
    }
    if !viewer.user.covers(&form.queue) {
        return forbidden("You do not work this queue.");
    }
    let settings = state.settings().lifecycle.clone();
    let actor = viewer.actor();
    let queue = form.queue.clone();
    let taken = state
        .db()
        .with_conn("take next", async |conn| {
            let claims = lifecycle::claim(conn, &queue, &actor, 1, settings.offer_ttl).await?;
            let Some(c) = claims.into_iter().next() else {
                return Ok(None);
            };
            let step =
                lifecycle::accept(conn, c.id, &c.claim_token, &actor, settings.lease_ttl).await?;
            Ok(Some((c, step)))
        })
        .await;
    match taken {
        Ok(Some((c, lifecycle::Step::Done(moved)))) => {
            let metrics = crate::telemetry::global();
            metrics.work_claimed(
                &c.queue,
                1,
                &c.first_offer_wait_secs.into_iter().collect::<Vec<_>>(),
            );
            metrics.work_moved(&c.queue, "accepted", moved.first_accept_wait_secs, None);
            Redirect::to(&format!("/agent/items/{}", c.id)).into_response()
        }
        Ok(Some((c, _))) => {
            agent_page(
                &state,
                &viewer,
                Some(format!(
                    "Item {} could not be accepted; take the next one.",
                    c.id
                )),
            )
            .await
        }
        Ok(None) => {
            agent_page(
                &state,
                &viewer,
                Some(format!("Nothing is waiting in {}.", form.queue)),
            )
            .await
        }
        Err(e) => store_failure(e),
    }
}

fn addresses(list: &[Address]) -> String {
    list.iter()
        .map(|a| match (&a.name, &a.email) {
            (Some(n), Some(e)) => format!("{n} <{e}>"),
            (None, Some(e)) => e.clone(),
            (Some(n), None) => n.clone(),
            (None, None) => String::new(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn item_id(path: Result<Path<i64>, PathRejection>) -> Option<i64> {
    path.ok().map(|Path(id)| id).filter(|id| *id > 0)
}

/// The item, if the viewer may see it: supervisors and admins on their queues; agents on
/// items they hold or completed.
async fn visible_item(
    state: &WebState,
    viewer: &Viewer,
    id: i64,
) -> Result<store::WorkItemDetail, Response> {
    let detail = state
        .db()
        .with_conn("work item", async |conn| {
            store::work_item_detail(conn, id).await
        })
        .await
        .map_err(store_failure)?
        .ok_or_else(|| {
            problem(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no such work item.",
            )
        })?;
    let s = &detail.state;
    if !viewer.user.covers(&s.queue) {
        return Err(forbidden("You do not work this item's queue."));
    }
    let me = viewer.actor();
    if viewer.user.role == Role::Agent
        && s.agent.as_deref() != Some(me.as_str())
        && s.done_by.as_deref() != Some(me.as_str())
    {
        return Err(forbidden(
            "This item is not yours; take it from its queue first.",
        ));
    }
    Ok(detail)
}

pub async fn item_page(
    State(state): State<WebState>,
    viewer: Viewer,
    path: Result<Path<i64>, PathRejection>,
) -> Response {
    let Some(id) = item_id(path) else {
        return not_found().await;
    };
    let d = match visible_item(&state, &viewer, id).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let me = viewer.actor();
    let claim_token = if d.state.status == WorkItemStatus::Accepted
        && d.state.agent.as_deref() == Some(me.as_str())
    {
        match state
            .db()
            .with_conn("claim token", async |conn| {
                store::claim_token_of(conn, id, &me).await
            })
            .await
        {
            Ok(t) => t,
            Err(e) => return store_failure(e),
        }
    } else {
        None
    };
    render(ItemPage {
        user: viewer.user.name.clone(),
        role: viewer.user.role.to_string(),
        csrf: viewer.csrf.clone(),
        id,
        subject: d
            .subject
            .clone()
            .unwrap_or_else(|| "(no subject)".to_owned()),
        from: addresses(&d.from),
        to: addresses(&d.to),
        date: d
            .sent_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        queue: d.state.queue.clone(),
        status: d.state.status.to_string(),
        flags: d
            .state
            .flags
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        text: d.text.clone(),
        has_html: d.html_sanitized.is_some(),
        attachments: d
            .attachments
            .iter()
            .map(|a| AttachmentRow {
                ordinal: a.ordinal,
                name: a
                    .filename
                    .as_deref()
                    .and_then(crate::ingest::parse::safe_filename)
                    .unwrap_or_else(|| format!("attachment {}", a.ordinal)),
                content_type: a.content_type.clone(),
                size: a.size,
            })
            .collect(),
        claim_token,
    })
}

/// The sanitised HTML, for the sandboxed frame: its own policy forbids scripts, plugins,
/// forms and every load, whatever the HTML says.
pub async fn item_html(
    State(state): State<WebState>,
    viewer: Viewer,
    path: Result<Path<i64>, PathRejection>,
) -> Response {
    let Some(id) = item_id(path) else {
        return not_found().await;
    };
    let d = match visible_item(&state, &viewer, id).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let html = d.html_sanitized.unwrap_or_default();
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:",
        ),
    );
    r
}

pub async fn item_attachment(
    State(state): State<WebState>,
    viewer: Viewer,
    path: Result<Path<(i64, i32)>, PathRejection>,
) -> Response {
    let Ok(Path((id, ordinal))) = path else {
        return not_found().await;
    };
    if let Err(r) = visible_item(&state, &viewer, id).await {
        return r;
    }
    let content = match state
        .db()
        .with_conn("attachment", async |conn| {
            store::attachment_content(conn, id, ordinal).await
        })
        .await
    {
        Ok(Some(c)) => c,
        Ok(None) => return not_found().await,
        Err(e) => return store_failure(e),
    };
    let declared = content.info.content_type.to_ascii_lowercase();
    let content_type = if PASSIVE_TYPES.contains(&declared.as_str()) {
        declared
    } else {
        "application/octet-stream".to_owned()
    };
    download(
        &content_type,
        disposition(
            content.info.filename.as_deref(),
            &format!("attachment-{id}-{ordinal}"),
        ),
        content.bytes,
    )
}

#[derive(Deserialize)]
pub struct StepForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    claim_token: String,
}

/// Complete or Release (`/agent/items/{id}/complete|release`).
pub async fn agent_step(
    State(state): State<WebState>,
    viewer: Viewer,
    path: Result<Path<(i64, String)>, PathRejection>,
    Form(form): Form<StepForm>,
) -> Response {
    if !session::csrf_matches(&form.csrf, &viewer.csrf) {
        return forbidden("The form was not sent from this session's page (CSRF check).");
    }
    let Some((id, complete)) = path.ok().and_then(|Path((id, action))| {
        let complete = match action.as_str() {
            "complete" => true,
            "release" => false,
            _ => return None,
        };
        (id > 0).then_some((id, complete))
    }) else {
        return not_found().await;
    };
    let me = viewer.actor();
    let max_offers = state.settings().lifecycle.max_offers;
    let token = form.claim_token.clone();
    let outcome = state
        .db()
        .with_conn("work item step", async |conn| {
            if complete {
                lifecycle::complete(conn, id, &token, &me, None).await
            } else {
                lifecycle::release(
                    conn,
                    id,
                    &token,
                    &me,
                    Some("released in the console"),
                    max_offers,
                )
                .await
            }
        })
        .await;
    match outcome {
        Ok(lifecycle::Step::Done(moved)) => {
            crate::telemetry::global().work_moved(
                &moved.queue,
                if complete { "completed" } else { "released" },
                moved.first_accept_wait_secs,
                moved.handle_secs,
            );
            agent_page(
                &state,
                &viewer,
                Some(format!(
                    "Item {id} {}.",
                    if complete {
                        "completed"
                    } else {
                        "released to its queue"
                    }
                )),
            )
            .await
        }
        Ok(lifecycle::Step::Refused(current)) => problem(
            StatusCode::CONFLICT,
            "No longer yours",
            current.explain(if complete { "complete" } else { "release" }),
        ),
        Ok(lifecycle::Step::NotFound) => not_found().await,
        Err(e) => store_failure(e),
    }
}

pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("templates/app.css"),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "Not found", "There is no such page.")
}

// ---------------------------------------------------------------------------------------
// Admin pages

struct PilotLine {
    id: i64,
    mailbox: String,
    queue: String,
    health: &'static str,
    last_success: Option<String>,
    last_error: Option<String>,
    hint: Option<String>,
    oldest: Option<String>,
    holder: Option<String>,
    secret_days: Option<i64>,
    /// `soon` (shown red) under 30 days.
    secret_class: &'static str,
}

#[derive(Template)]
#[template(path = "admin_pilots.html")]
struct PilotsPage {
    user: String,
    role: String,
    csrf: String,
    message: Option<String>,
    pilots: Vec<PilotLine>,
}

/// A pilot's health from its last outcomes: disabled; failing (its last poll failed and none
/// succeeded in 15 minutes); degraded (its last poll failed, an earlier one recently
/// succeeded); healthy.
fn health(p: &store::PilotRow, now: chrono::DateTime<chrono::Utc>) -> &'static str {
    if !p.enabled {
        return "disabled";
    }
    let failed_last = match (p.last_error_at, p.last_success_at) {
        (Some(e), Some(s)) => e > s,
        (Some(_), None) => true,
        _ => false,
    };
    if !failed_last {
        return "healthy";
    }
    match p.last_success_at {
        Some(s) if now - s < chrono::Duration::minutes(15) => "degraded",
        _ => "failing",
    }
}

pub async fn admin_pilots(State(state): State<WebState>, viewer: Viewer) -> Response {
    if viewer.user.role != Role::Admin {
        return forbidden("The pilots overview is for admins.");
    }
    pilots_page(&state, &viewer, None).await
}

async fn pilots_page(state: &WebState, viewer: &Viewer, message: Option<String>) -> Response {
    let loaded = state
        .db()
        .with_conn("pilots overview", async |conn| {
            let pilots = store::list_pilots(conn).await?;
            let apps = store::list_apps(conn).await?;
            let oldest = store::oldest_queued_age(conn).await?;
            let holders = store::leases::lease_holders(conn).await?;
            Ok((pilots, apps, oldest, holders))
        })
        .await;
    let (pilots, apps, oldest, holders) = match loaded {
        Ok(l) => l,
        Err(e) => return store_failure(e),
    };
    let now = chrono::Utc::now();
    let lines = pilots
        .iter()
        .map(|p| {
            let app = match &p.auth {
                store::PilotAuth::XOAuth2 { app_id } => apps.iter().find(|a| a.id == *app_id),
                _ => None,
            };
            let secret_days = app
                .and_then(|a| a.secret_expires_at)
                .map(|t| (t - now).num_days());
            PilotLine {
                id: p.id,
                secret_class: if secret_days.is_some_and(|d| d < 30) {
                    "soon"
                } else {
                    ""
                },
                mailbox: p.mailbox.clone(),
                queue: p.queue.clone(),
                health: health(p, now),
                last_success: p
                    .last_success_at
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                last_error: p.last_error.clone(),
                hint: p.last_error_hint.clone(),
                oldest: oldest
                    .iter()
                    .find(|(q, _)| *q == p.queue)
                    .map(|(_, age)| age_text(age.as_secs_f64())),
                holder: holders
                    .iter()
                    .find(|h| h.pilot_id == p.id && h.live)
                    .map(|h| h.holder.clone()),
                secret_days,
            }
        })
        .collect();
    render(PilotsPage {
        user: viewer.user.name.clone(),
        role: viewer.user.role.to_string(),
        csrf: viewer.csrf.clone(),
        message,
        pilots: lines,
    })
}

/// Poll now (`/admin/pilots/{id}/poll`): asks the replica holding the pilot to poll it at
/// once (`pilots.poll_requested_at`), audited as `pilot.poll_now`.
pub async fn pilot_poll_now(
    State(state): State<WebState>,
    viewer: Viewer,
    path: Result<Path<i64>, PathRejection>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if viewer.user.role != Role::Admin {
        return forbidden("Asking for a poll is for admins.");
    }
    if !session::csrf_matches(&form.csrf, &viewer.csrf) {
        return forbidden("The form was not sent from this session's page (CSRF check).");
    }
    let Some(id) = item_id(path) else {
        return not_found().await;
    };
    let actor = viewer.actor();
    let done = state
        .db()
        .with_conn("poll now", async |conn| {
            let found = store::request_poll(conn, id).await?;
            if found {
                users::audit(
                    conn,
                    &actor,
                    "pilot.poll_now",
                    Some(&format!("pilot:{id}")),
                    &serde_json::json!({}),
                )
                .await?;
            }
            Ok(found)
        })
        .await;
    match done {
        Ok(true) => {
            let message =
                format!("Pilot {id}: a poll was requested; the replica holding it polls it next.");
            pilots_page(&state, &viewer, Some(message)).await
        }
        Ok(false) => not_found().await,
        Err(e) => store_failure(e),
    }
}

// ---------------------------------------------------------------------------------------
// Supervisor pages

struct ItemLine {
    id: i64,
    queue: String,
    subject: String,
    agent: String,
    why: String,
    status: &'static str,
    cancellable: bool,
}

#[derive(Template)]
#[template(path = "supervisor.html")]
struct SupervisorPage {
    user: String,
    role: String,
    csrf: String,
    message: Option<String>,
    states: Vec<(&'static str, bool)>,
    items: Vec<ItemLine>,
}

#[derive(Deserialize)]
pub struct StateQuery {
    status: Option<String>,
}

async fn supervisor_page(
    state: &WebState,
    viewer: &Viewer,
    status: WorkItemStatus,
    message: Option<String>,
) -> Response {
    let filter = store::WorkFilter {
        queues: viewer.user.queues.clone(),
        status: Some(status),
        before_id: None,
        limit: 200,
    };
    let rows = match state
        .db()
        .with_conn("items", async |conn| {
            store::list_work_items(conn, &filter).await
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return store_failure(e),
    };
    let items = rows
        .into_iter()
        .filter(|(s, _)| viewer.user.covers(&s.queue))
        .map(|(s, v)| ItemLine {
            id: s.id,
            queue: s.queue.clone(),
            subject: v.subject.unwrap_or_else(|| "(no subject)".to_owned()),
            agent: s.agent.clone().or(s.done_by.clone()).unwrap_or_default(),
            why: s
                .held_reason
                .clone()
                .or(s.cancel_reason.clone())
                .unwrap_or_default(),
            status: s.status.as_str(),
            cancellable: !s.status.is_final(),
        })
        .collect();
    render(SupervisorPage {
        user: viewer.user.name.clone(),
        role: viewer.user.role.to_string(),
        csrf: viewer.csrf.clone(),
        message,
        states: WorkItemStatus::ALL
            .iter()
            .map(|s| (s.as_str(), *s == status))
            .collect(),
        items,
    })
}

fn supervisor_only(viewer: &Viewer) -> Option<Response> {
    (viewer.user.role == Role::Agent).then(|| forbidden("This page is for supervisors and admins."))
}

pub async fn supervisor_items(
    State(state): State<WebState>,
    viewer: Viewer,
    query: Result<axum::extract::Query<StateQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(r) = supervisor_only(&viewer) {
        return r;
    }
    let status = query
        .ok()
        .and_then(|q| q.0.status)
        .and_then(|s| WorkItemStatus::parse(&s))
        .unwrap_or(WorkItemStatus::Held);
    supervisor_page(&state, &viewer, status, None).await
}

#[derive(Deserialize)]
pub struct OverrideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    expected: String,
    #[serde(default)]
    reason: String,
}

/// Requeue (release a held item) or Cancel (`/supervisor/items/{id}/requeue|cancel`).
pub async fn supervisor_step(
    State(state): State<WebState>,
    viewer: Viewer,
    path: Result<Path<(i64, String)>, PathRejection>,
    Form(form): Form<OverrideForm>,
) -> Response {
    if let Some(r) = supervisor_only(&viewer) {
        return r;
    }
    if !session::csrf_matches(&form.csrf, &viewer.csrf) {
        return forbidden("The form was not sent from this session's page (CSRF check).");
    }
    let Some((id, cancel)) = path.ok().and_then(|Path((id, action))| {
        let cancel = match action.as_str() {
            "cancel" => true,
            "requeue" => false,
            _ => return None,
        };
        (id > 0).then_some((id, cancel))
    }) else {
        return not_found().await;
    };
    let Some(expected) = WorkItemStatus::parse(&form.expected) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Malformed form",
            "The form names no state.",
        );
    };
    let reason = form.reason.clone();
    if cancel && !["spam", "merged", "withdrawn", "duplicate"].contains(&reason.as_str()) {
        return problem(
            StatusCode::BAD_REQUEST,
            "Malformed form",
            "Choose why the item is cancelled.",
        );
    }
    let actor = viewer.actor();
    let covers = match state
        .db()
        .with_conn("work item", async |conn| {
            store::work_item_state(conn, id).await
        })
        .await
    {
        Ok(Some(s)) => viewer.user.covers(&s.queue),
        Ok(None) => return not_found().await,
        Err(e) => return store_failure(e),
    };
    if !covers {
        return forbidden("You do not supervise this item's queue.");
    }
    let outcome = state
        .db()
        .with_conn("supervisor step", async |conn| {
            let step = if cancel {
                lifecycle::Override::Cancel { reason: &reason }
            } else {
                lifecycle::Override::Requeue
            };
            let moved = lifecycle::override_step(
                conn,
                id,
                &actor,
                step,
                Some("from the console"),
                Some(expected),
            )
            .await?;
            if let lifecycle::Step::Done(m) = &moved {
                users::audit(
                    conn,
                    &actor,
                    if cancel {
                        "work.cancel"
                    } else {
                        "work.requeue"
                    },
                    Some(&format!("work_item:{id}")),
                    &serde_json::json!({"from": m.from.as_str(), "reason": reason}),
                )
                .await?;
            }
            Ok(moved)
        })
        .await;
    match outcome {
        Ok(lifecycle::Step::Done(m)) => {
            supervisor_page(
                &state,
                &viewer,
                expected,
                Some(format!("Item {id}: {} → {}.", m.from, m.to)),
            )
            .await
        }
        Ok(lifecycle::Step::Refused(current)) => problem(
            StatusCode::CONFLICT,
            "Changed meanwhile",
            format!(
                "Item {id} is {} now, not {expected}; nothing was changed. Reload the list.",
                current.status
            ),
        ),
        Ok(lifecycle::Step::NotFound) => not_found().await,
        Err(e) => store_failure(e),
    }
}
