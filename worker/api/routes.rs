//! The `/api/v1` handlers, each annotated with its OpenAPI description; the router and the
//! document are built together from these annotations ([`split`]), so a route cannot be
//! served undocumented.
//!
//! Who may do what:
//! - claim: any key covering the queue (agents: the queues their key names);
//! - accept, heartbeat, release, complete, transfer with a claim token: the key that holds
//!   the claim (another agent's item → 403; a claim that is no longer current → 409);
//! - transfer without a token, cancel, requeue, list: supervisor and admin keys, on the
//!   queues they cover;
//! - read an item, its attachments, raw message and events: supervisors and admins on their
//!   queues; an agent on the items it holds or completed.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::Principal;
use super::problem::{PROBLEM_JSON, Problem};
use super::waker::FALLBACK_POLL;
use crate::model::WorkItemStatus;
use crate::store::{self, Role, lifecycle};
use crate::telemetry;

// ---------------------------------------------------------------------------------------
// Wire types

/// A work item's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Offered,
    Accepted,
    Done,
    Cancelled,
    Held,
}

impl From<WorkItemStatus> for Status {
    fn from(s: WorkItemStatus) -> Status {
        match s {
            WorkItemStatus::Queued => Status::Queued,
            WorkItemStatus::Offered => Status::Offered,
            WorkItemStatus::Accepted => Status::Accepted,
            WorkItemStatus::Done => Status::Done,
            WorkItemStatus::Cancelled => Status::Cancelled,
            WorkItemStatus::Held => Status::Held,
        }
    }
}

impl From<Status> for WorkItemStatus {
    fn from(s: Status) -> WorkItemStatus {
        match s {
            Status::Queued => WorkItemStatus::Queued,
            Status::Offered => WorkItemStatus::Offered,
            Status::Accepted => WorkItemStatus::Accepted,
            Status::Done => WorkItemStatus::Done,
            Status::Cancelled => WorkItemStatus::Cancelled,
            Status::Held => WorkItemStatus::Held,
        }
    }
}

/// Body of a claim; both fields optional (an empty body claims one item without waiting).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Items to take at most (1 unless given; a dispatcher's batch up to `api.max_claim_batch`).
    #[schema(minimum = 1, maximum = 1000)]
    pub max: Option<u32>,
    /// Seconds to wait for work when none is queued (0 unless given; up to
    /// `api.max_claim_wait_secs`). The answer comes as soon as an item arrives.
    #[schema(minimum = 0, maximum = 3600)]
    pub wait_secs: Option<f64>,
}

/// One item offered to the caller.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Offer {
    pub id: i64,
    pub queue: String,
    /// Names this claim in every later step; a new claim of the item draws a new one.
    pub claim_token: String,
    /// Accept before this time, or the item goes back to its queue.
    pub offer_expires_at: DateTime<Utc>,
    /// Times the item has been offered, this offer included.
    pub offers: i32,
}

/// The items a claim took; empty when nothing was waiting (after the wait asked for).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClaimResponse {
    pub items: Vec<Offer>,
}

/// A step under a claim.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimStep {
    pub claim_token: String,
}

/// Giving an offer or an accepted item back.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub claim_token: String,
    /// Why, for the item's events (at most 1000 bytes).
    pub reason: Option<String>,
}

/// Completing an accepted item.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    pub claim_token: String,
    /// A note for the item's events (at most 1000 bytes).
    pub note: Option<String>,
}

/// Moving an item to another queue: with the claim token by the agent holding it, without
/// by a supervisor.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub queue: String,
    pub claim_token: Option<String>,
    /// Supervisor: act only if the item is still in this state.
    pub expected_status: Option<Status>,
}

/// Why an item is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    Spam,
    Merged,
    Withdrawn,
    Duplicate,
    Other,
}

impl CancelReason {
    fn as_str(self) -> &'static str {
        match self {
            CancelReason::Spam => "spam",
            CancelReason::Merged => "merged",
            CancelReason::Withdrawn => "withdrawn",
            CancelReason::Duplicate => "duplicate",
            CancelReason::Other => "other",
        }
    }
}

/// Cancelling an item (the mail stays stored and visible).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub reason: CancelReason,
    /// Words for the item's events (at most 900 bytes).
    pub note: Option<String>,
    pub expected_status: Option<Status>,
}

/// Putting an item back in its queue (a held item released, a done one reopened).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequeueRequest {
    pub reason: Option<String>,
    pub expected_status: Option<Status>,
}

/// A work item's state after a step.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepResponse {
    pub id: i64,
    pub status: Status,
    pub queue: String,
    /// Renew with a heartbeat before this time (accepted items).
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// A mailbox of an address header.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddressBody {
    pub name: Option<String>,
    pub email: Option<String>,
}

/// An attachment of the message (its bytes at `.../attachments/{ordinal}`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttachmentBody {
    pub ordinal: i32,
    pub filename: Option<String>,
    pub content_type: String,
    pub size: i64,
    pub inline: bool,
    pub content_id: Option<String>,
}

/// A work item with its message.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkItemBody {
    pub id: i64,
    pub queue: String,
    pub status: Status,
    pub priority: i16,
    pub flags: Vec<String>,
    pub agent: Option<String>,
    pub offers: i32,
    pub enqueued_at: DateTime<Utc>,
    pub offer_expires_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub done_at: Option<DateTime<Utc>>,
    pub done_by: Option<String>,
    pub held_reason: Option<String>,
    pub cancel_reason: Option<String>,
    pub message: MessageBody,
    /// The conversation the message belongs to and why, and the message's class and why.
    pub triage: Option<TriageBody>,
}

/// How a message was threaded and classed, with the evidence.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TriageBody {
    pub conversation_id: Option<i64>,
    /// Messages in the conversation so far.
    pub conversation_messages: Option<i32>,
    /// The agent who last completed an item of the conversation: prefer them for the reply.
    pub last_completed_by: Option<String>,
    /// The threading rule that matched (`in_reply_to`, `references`, `thread_index`, `new`…).
    pub thread_rule: Option<String>,
    #[schema(value_type = Object)]
    pub thread_evidence: Option<serde_json::Value>,
    /// `human`, `auto_reply`, `auto_generated`, `bounce`, `receipt` or `loop`.
    pub class: Option<String>,
    #[schema(value_type = Object)]
    pub class_evidence: Option<serde_json::Value>,
}

/// The message of a work item.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MessageBody {
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub from: Vec<AddressBody>,
    pub to: Vec<AddressBody>,
    pub cc: Vec<AddressBody>,
    pub reply_to: Vec<AddressBody>,
    pub date: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub text: Option<String>,
    /// The sender's HTML after sanitising (scripts, handlers, remote loads removed); show it
    /// in a sandboxed frame all the same.
    pub html_sanitized: Option<String>,
    pub size: i64,
    pub headers_only: bool,
    pub parse_error: Option<String>,
    pub defects: Vec<String>,
    pub attachments: Vec<AttachmentBody>,
}

/// A short line of a work-item listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkItemLine {
    pub id: i64,
    pub queue: String,
    pub status: Status,
    pub agent: Option<String>,
    pub offers: i32,
    pub flags: Vec<String>,
    pub subject: Option<String>,
    pub from: Vec<AddressBody>,
    pub enqueued_at: DateTime<Utc>,
    pub attachments: i64,
}

/// A page of a work-item listing, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkItemPage {
    pub items: Vec<WorkItemLine>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_before: Option<i64>,
}

/// Filters of a work-item listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// Only items with a smaller id (the previous page's `next_before`).
    pub before: Option<i64>,
    /// Items per page (50 unless given, at most 500).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// A queue's counts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueueBody {
    pub queue: String,
    /// Items by status, every status present.
    pub counts: BTreeMap<String, i64>,
    /// Seconds the oldest queued item has waited; absent when nothing is queued.
    pub oldest_waiting_secs: Option<f64>,
}

/// The queues the caller may see.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueBody>,
}

/// One event of an item's history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventBody {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// An API key's name, `system` or `cli:<user>`.
    pub actor: String,
    /// offered, accepted, rejected, released, completed, transferred, cancelled, requeued,
    /// offer_expired, lease_expired.
    pub action: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub reason: Option<String>,
    pub from_queue: Option<String>,
    pub to_queue: Option<String>,
}

/// An item's events, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub events: Vec<EventBody>,
}

// ---------------------------------------------------------------------------------------
// The document and the router

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `ccmail api-key create` (`ccm_...`)."))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ccmail agents' API",
        description = "Claim work items and take them through their life: queued → offered → \
                       accepted → done. Every step under a claim names its claim token; a claim \
                       that is no longer current is refused with 409 and changes nothing.",
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(Problem)),
)]
struct ApiDoc;

/// The path of a step on a work item.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct ItemPath {
    /// The work item's id.
    id: i64,
}

/// The header every POST may carry.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct IdempotencyHeader {
    /// Replays the first answer for the same key and request (1 to 200 visible ASCII
    /// characters).
    #[param(rename = "Idempotency-Key")]
    idempotency_key: Option<String>,
}

/// The answers of a step on a work item.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum StepAnswers {
    /// The item after the step.
    #[response(status = 200)]
    Moved(StepResponse),
    /// A malformed Idempotency-Key.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No key, or an unknown or revoked one.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The key's role or queues do not allow it, or another agent holds the item.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such work item.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// The claim or the state is no longer current; nothing changed.
    #[response(status = 409, content_type = "application/problem+json")]
    Stale(Problem),
    /// The body is not what the route takes.
    #[response(status = 422, content_type = "application/problem+json")]
    Invalid(Problem),
}

/// Every route with its description: the one list both the router and the document come
/// from.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_queues))
        .routes(routes!(claim))
        .routes(routes!(list_work_items))
        .routes(routes!(get_work_item))
        .routes(routes!(accept))
        .routes(routes!(heartbeat))
        .routes(routes!(release))
        .routes(routes!(complete))
        .routes(routes!(transfer))
        .routes(routes!(cancel))
        .routes(routes!(requeue))
        .routes(routes!(events))
        .routes(routes!(attachment))
        .routes(routes!(raw_message))
        .routes(routes!(openapi_json))
}

/// The router with its state, and the OpenAPI document built from the same routes.
pub fn split(state: ApiState) -> (Router, utoipa::openapi::OpenApi) {
    let max_body = state.settings().max_body_bytes;
    let (router, mut doc) = routes().split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let router = router
        .fallback(|| async {
            Problem::not_found("no such route; the API's routes are listed at /api/v1/openapi.json")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state);
    (router, doc)
}

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = routes().split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

// ---------------------------------------------------------------------------------------
// Shared request handling

/// What a POST answered, with what to record once it has committed.
struct Answer {
    status: StatusCode,
    body: serde_json::Value,
    effects: Vec<Effect>,
    replayed: bool,
}

enum Effect {
    Claimed {
        queue: String,
        count: u64,
        first_offer_waits: Vec<f64>,
    },
    Moved {
        queue: String,
        action: &'static str,
        first_accept_wait: Option<f64>,
        handled: Option<f64>,
    },
    Stale {
        step: &'static str,
    },
}

impl Answer {
    fn ok(body: impl Serialize, effects: Vec<Effect>) -> Answer {
        Answer {
            status: StatusCode::OK,
            body: serde_json::to_value(body).unwrap_or(serde_json::Value::Null),
            effects,
            replayed: false,
        }
    }

    fn problem(problem: Problem, effects: Vec<Effect>) -> Answer {
        Answer {
            status: problem.status_code(),
            body: serde_json::to_value(&problem).unwrap_or(serde_json::Value::Null),
            effects,
            replayed: false,
        }
    }

    fn into_response(self) -> Response {
        let metrics = telemetry::global();
        for effect in &self.effects {
            match effect {
                Effect::Claimed {
                    queue,
                    count,
                    first_offer_waits,
                } => metrics.work_claimed(queue, *count, first_offer_waits),
                Effect::Moved {
                    queue,
                    action,
                    first_accept_wait,
                    handled,
                } => metrics.work_moved(queue, action, *first_accept_wait, *handled),
                Effect::Stale { step } => metrics.work_stale(step),
            }
        }
        let is_problem = !self.status.is_success();
        let mut response = (
            self.status,
            serde_json::to_vec(&self.body).unwrap_or_default(),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if is_problem {
                PROBLEM_JSON
            } else {
                "application/json"
            }),
        );
        if self.replayed {
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

/// An `Idempotency-Key` and the hash of the request it came with.
struct IdemKey {
    key: String,
    request_hash: [u8; 32],
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn idempotency_key(
    headers: &HeaderMap,
    route: &str,
    body: &[u8],
) -> Result<Option<IdemKey>, Problem> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 200 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            Problem::bad_request(
                "Idempotency-Key must be 1 to 200 visible ASCII characters (a UUID is a good key)",
            )
        })?;
    let mut hash = Sha256::new();
    hash.update(route.as_bytes());
    hash.update([0]);
    hash.update(body);
    Ok(Some(IdemKey {
        key: key.to_owned(),
        request_hash: hash.finalize().into(),
    }))
}

/// A POST's session: a transaction with its `Idempotency-Key` reserved when it has one, else
/// a plain connection (the step is one statement, atomic on its own).
struct Pending<'k> {
    tx: store::Session,
    idem: Option<&'k IdemKey>,
    api_key_id: i64,
}

/// Begins a POST's transaction. A key already used answers at once: its kept answer (same
/// request) or 422 (another request).
async fn begin<'k>(
    state: &ApiState,
    principal: &Principal,
    idem: Option<&'k IdemKey>,
) -> Result<Result<Pending<'k>, Answer>, Problem> {
    let db = state.db();
    let Some(k) = idem else {
        let conn = db.acquire().await.map_err(Problem::from_store)?;
        return Ok(Ok(Pending {
            tx: store::Session::Conn(conn),
            idem,
            api_key_id: principal.0.id,
        }));
    };
    let mut tx = db.begin().await.map_err(Problem::from_store)?;
    {
        // Why first: a concurrent request with the same key waits on this row until this
        // transaction ends, so the work is done once.
        let first =
            store::reserve_idempotency_key(&mut tx, principal.0.id, &k.key, &k.request_hash)
                .await
                .map_err(Problem::from_store)?;
        if !first {
            tx.rollback().await.map_err(Problem::from_store)?;
            let kept = db
                .with_conn("idempotent replay", async |conn| {
                    store::kept_answer(conn, principal.0.id, &k.key).await
                })
                .await
                .map_err(Problem::from_store)?;
            return match kept {
                Some(kept) if kept.request_hash == k.request_hash => Ok(Err(Answer {
                    status: StatusCode::from_u16(kept.status_code)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    body: kept.response,
                    effects: Vec::new(),
                    replayed: true,
                })),
                Some(_) => Err(Problem::invalid(
                    "this Idempotency-Key was used with another request; use a new key for a new \
                     request",
                )),
                None => Err(Problem::new(
                    StatusCode::CONFLICT,
                    "in-progress",
                    "Request in progress",
                    "a request with this Idempotency-Key is still in progress; retry shortly",
                )),
            };
        }
    }
    Ok(Ok(Pending {
        tx: store::Session::Tx(tx),
        idem,
        api_key_id: principal.0.id,
    }))
}

impl Pending<'_> {
    /// Keeps `answer` for the key and commits.
    async fn commit(mut self, answer: Answer) -> Result<Answer, Problem> {
        if let Some(k) = self.idem {
            store::keep_answer(
                &mut self.tx,
                self.api_key_id,
                &k.key,
                answer.status.as_u16(),
                &answer.body,
            )
            .await
            .map_err(Problem::from_store)?;
        }
        self.tx.commit().await.map_err(Problem::from_store)?;
        Ok(answer)
    }

    /// Nothing to answer yet: rolls back, releasing the key.
    async fn rollback(self) -> Result<(), Problem> {
        self.tx.rollback().await.map_err(Problem::from_store)
    }
}

/// A handler's body: a problem becomes its response.
fn respond(result: Result<Response, Problem>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_required(body)
}

fn parse_required<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| {
        Problem::invalid(format!(
            "the request body is not the JSON this route takes: {e}; see /api/v1/openapi.json"
        ))
    })
}

fn item_id(path: Result<Path<i64>, PathRejection>) -> Result<i64, Problem> {
    match path {
        Ok(Path(id)) if id > 0 => Ok(id),
        _ => Err(Problem::not_found(
            "work item ids are positive integers; no such work item",
        )),
    }
}

fn check_text(field: &str, value: Option<&str>, max: usize) -> Result<(), Problem> {
    match value {
        Some(v) if v.len() > max || v.chars().any(char::is_control) => Err(Problem::invalid(
            format!("{field} must be at most {max} bytes without control characters"),
        )),
        _ => Ok(()),
    }
}

/// A queue name as the schema allows it: 1 to 200 bytes, no control characters (NUL
/// included, which PostgreSQL's text refuses).
fn check_queue_name(queue: &str) -> Result<(), Problem> {
    if queue.is_empty() || queue.len() > 200 || queue.chars().any(char::is_control) {
        return Err(Problem::invalid(
            "a queue name is 1 to 200 bytes without control characters",
        ));
    }
    Ok(())
}

fn check_token(token: &str) -> Result<(), Problem> {
    if token.is_empty() || token.len() > 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Problem::invalid(
            "claim_token must be the token the claim answered (32 hexadecimal digits)",
        ));
    }
    Ok(())
}

/// The item's state, after checking that the caller may act on its queue.
async fn item_in_reach(
    state: &ApiState,
    principal: &Principal,
    id: i64,
) -> Result<store::WorkItemState, Problem> {
    let item = state
        .db()
        .with_conn("work item", async |conn| {
            store::work_item_state(conn, id).await
        })
        .await
        .map_err(Problem::from_store)?
        .ok_or_else(|| Problem::not_found(format!("no work item {id}")))?;
    principal.require_queue(&item.queue)?;
    Ok(item)
}

/// 403 unless the caller may read the item: supervisors and admins on their queues, an
/// agent on items it holds or completed.
fn may_read(principal: &Principal, item: &store::WorkItemState) -> Result<(), Problem> {
    if principal.role() != Role::Agent {
        return Ok(());
    }
    let name = Some(principal.name());
    if item.agent.as_deref() == name || item.done_by.as_deref() == name {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "an agent key reads only the items it holds or completed; claim the item first",
        ))
    }
}

fn step_response(moved: &lifecycle::Moved) -> StepResponse {
    StepResponse {
        id: moved.id,
        status: moved.to.into(),
        queue: moved.queue.clone(),
        lease_expires_at: moved.lease_expires_at,
    }
}

/// The answer of a store step: the moved item, or why it was refused.
fn step_answer(
    principal: &Principal,
    step: &'static str,
    action: Option<&'static str>,
    outcome: lifecycle::Step,
) -> Answer {
    match outcome {
        lifecycle::Step::Done(moved) => {
            let effects = action
                .map(|action| Effect::Moved {
                    queue: moved.queue.clone(),
                    action: if action == "released" && moved.from == WorkItemStatus::Offered {
                        "rejected"
                    } else {
                        action
                    },
                    first_accept_wait: moved.first_accept_wait_secs,
                    handled: moved.handle_secs,
                })
                .into_iter()
                .collect();
            Answer::ok(step_response(&moved), effects)
        }
        lifecycle::Step::Refused(current) => {
            if !principal.0.covers(&current.queue) {
                return Answer::problem(
                    Problem::forbidden("this key may not act on the item's queue"),
                    vec![Effect::Stale { step }],
                );
            }
            if let Some(holder) = &current.agent
                && holder != principal.name()
                && principal.role() == Role::Agent
            {
                return Answer::problem(
                    Problem::forbidden("the item is held by another agent"),
                    vec![Effect::Stale { step }],
                );
            }
            Answer::problem(
                Problem::stale(current.explain(step), current.status.as_str()),
                vec![Effect::Stale { step }],
            )
        }
        lifecycle::Step::NotFound => {
            Answer::problem(Problem::not_found("no such work item"), vec![])
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handlers

/// The queues the key may see, with counts by status and the oldest waiting age.
#[utoipa::path(get, path = "/api/v1/queues", tag = "queues",
    responses(
        (status = 200, body = QueueList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_queues(State(state): State<ApiState>, principal: Principal) -> Response {
    respond(
        async {
            let summaries = state
                .db()
                .with_conn("queues", async |conn| store::queue_summaries(conn).await)
                .await
                .map_err(Problem::from_store)?;
            let queues = summaries
                .into_iter()
                .filter(|s| principal.0.covers(&s.queue))
                .map(|s| QueueBody {
                    counts: WorkItemStatus::ALL
                        .iter()
                        .map(|status| {
                            let n = s
                                .counts
                                .iter()
                                .find(|(st, _)| st == status)
                                .map_or(0, |(_, n)| *n);
                            (status.as_str().to_owned(), n)
                        })
                        .collect(),
                    oldest_waiting_secs: s.oldest_waiting_secs,
                    queue: s.queue,
                })
                .collect();
            Ok(axum::Json(QueueList { queues }).into_response())
        }
        .await,
    )
}

/// Claims up to `max` queued items of the queue, highest priority first, then the longest
/// waiting; waits up to `wait_secs` for work when none is queued (woken when an item
/// arrives). Each item is offered to the caller until `offer_expires_at`.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/claim", tag = "work items",
    params(("queue" = String, Path, description = "The queue's name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and request")),
    request_body(content = Option<ClaimRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = ClaimResponse),
        (status = 400, body = Problem, content_type = "application/problem+json", description = "A malformed Idempotency-Key"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn claim(
    State(state): State<ApiState>,
    principal: Principal,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        async {
            let request: ClaimRequest = parse_body(&body)?;
            check_queue_name(&queue)?;
            principal.require_queue(&queue)?;
            let settings = state.settings();
            let max = request.max.unwrap_or(1);
            if max == 0 || max > settings.max_claim_batch {
                return Err(Problem::invalid(format!(
                    "max must be between 1 and {} (api.max_claim_batch)",
                    settings.max_claim_batch
                )));
            }
            let wait = request.wait_secs.unwrap_or(0.0);
            if !(0.0..=settings.max_claim_wait.as_secs_f64()).contains(&wait) {
                return Err(Problem::invalid(format!(
                    "wait_secs must be between 0 and {} (api.max_claim_wait_secs)",
                    settings.max_claim_wait.as_secs()
                )));
            }
            let mut known_queue = false;
            let idem = idempotency_key(&headers, &format!("claim {queue}"), &body)?;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(wait);
            loop {
                // Why armed before the attempt: an item committed between the attempt and the
                // wait must still wake this claim. Only a queue known to exist gets a notifier,
                // so names typed by clients cannot grow the waker's map.
                let notify = known_queue.then(|| state.waker().queue(&queue));
                let mut notified = notify.as_ref().map(|n| Box::pin(n.notified()));
                if let Some(n) = notified.as_mut() {
                    n.as_mut().enable();
                }
                let last =
                    tokio::time::Instant::now() >= deadline || state.shutdown().is_cancelled();
                let mut pending = match begin(&state, &principal, idem.as_ref()).await? {
                    Ok(pending) => pending,
                    Err(replay) => return Ok(replay.into_response()),
                };
                let claims = lifecycle::claim(
                    &mut pending.tx,
                    &queue,
                    principal.name(),
                    max,
                    settings.offer_ttl,
                )
                .await
                .map_err(Problem::from_store)?;
                if claims.is_empty() && !known_queue {
                    // Only an empty claim asks whether the queue exists at all.
                    if !store::queue_exists(&mut pending.tx, &queue)
                        .await
                        .map_err(Problem::from_store)?
                    {
                        pending.rollback().await?;
                        return Err(Problem::not_found(format!(
                            "no queue {queue:?}: no pilot feeds it and no item is in it"
                        )));
                    }
                    known_queue = true;
                    if !last {
                        // Try again at once, now armed for the wake-up.
                        pending.rollback().await?;
                        continue;
                    }
                }
                if !claims.is_empty() || last {
                    let effects = vec![Effect::Claimed {
                        queue: queue.clone(),
                        count: claims.len() as u64,
                        first_offer_waits: claims
                            .iter()
                            .filter_map(|c| c.first_offer_wait_secs)
                            .collect(),
                    }];
                    let items = claims
                        .into_iter()
                        .map(|c| Offer {
                            id: c.id,
                            queue: c.queue,
                            claim_token: c.claim_token,
                            offer_expires_at: c.offer_expires_at,
                            offers: c.offers,
                        })
                        .collect();
                    let answer = Answer::ok(ClaimResponse { items }, effects);
                    return Ok(pending.commit(answer).await?.into_response());
                }
                pending.rollback().await?;
                let now = tokio::time::Instant::now();
                let mut until = deadline;
                if !state.waker().listening() {
                    until = until.min(now + FALLBACK_POLL);
                }
                let _waiting = state.waker().wait_guard();
                tokio::select! {
                    _ = async {
                        match notified.as_mut() {
                            Some(n) => n.await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = tokio::time::sleep_until(until) => {}
                    _ = state.shutdown().cancelled() => {}
                }
            }
        }
        .await,
    )
}

/// Work items of the queues the key covers, newest first (supervisor and admin keys).
#[utoipa::path(get, path = "/api/v1/work-items", tag = "work items",
    params(ListQuery),
    responses(
        (status = 200, body = WorkItemPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_work_items(
    State(state): State<ApiState>,
    principal: Principal,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    respond(
        async {
            principal.require_supervisor("listing work items")?;
            let Query(query) = query
                .map_err(|e| Problem::bad_request(format!("the query string is not valid: {e}")))?;
            let limit = query.limit.unwrap_or(50);
            if limit == 0 || limit > 500 {
                return Err(Problem::invalid("limit must be between 1 and 500"));
            }
            let queues = match &query.queue {
                Some(q) => {
                    check_queue_name(q)?;
                    principal.require_queue(q)?;
                    vec![q.clone()]
                }
                None => principal.0.queues.clone(),
            };
            let filter = store::WorkFilter {
                queues,
                status: query.status.map(Into::into),
                before_id: query.before,
                limit,
            };
            let rows = state
                .db()
                .with_conn("work items", async |conn| {
                    store::list_work_items(conn, &filter).await
                })
                .await
                .map_err(Problem::from_store)?;
            let next_before = (rows.len() == limit as usize)
                .then(|| rows.last().map(|(s, _)| s.id))
                .flatten();
            let items = rows
                .into_iter()
                .map(|(s, v)| WorkItemLine {
                    id: s.id,
                    queue: s.queue,
                    status: s.status.into(),
                    agent: s.agent,
                    offers: s.offers,
                    flags: s.flags.iter().map(|f| f.as_str().to_owned()).collect(),
                    subject: v.subject,
                    from: addresses(v.from),
                    enqueued_at: s.enqueued_at,
                    attachments: v.attachments,
                })
                .collect();
            Ok(axum::Json(WorkItemPage { items, next_before }).into_response())
        }
        .await,
    )
}

fn addresses(list: Vec<crate::model::Address>) -> Vec<AddressBody> {
    list.into_iter()
        .map(|a| AddressBody {
            name: a.name,
            email: a.email,
        })
        .collect()
}

/// A work item with its message: sender, recipients, subject, date, text, sanitised HTML,
/// the list of attachments, flags.
#[utoipa::path(get, path = "/api/v1/work-items/{id}", tag = "work items",
    params(("id" = i64, Path, description = "The work item's id")),
    responses(
        (status = 200, body = WorkItemBody),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_work_item(
    State(state): State<ApiState>,
    principal: Principal,
    path: Result<Path<i64>, PathRejection>,
) -> Response {
    respond(
        async {
            let id = item_id(path)?;
            let item = item_in_reach(&state, &principal, id).await?;
            may_read(&principal, &item)?;
            let (detail, explained) = state
                .db()
                .with_conn("work item", async |conn| {
                    Ok((
                        store::work_item_detail(conn, id).await?,
                        store::explain(conn, id).await?,
                    ))
                })
                .await
                .map_err(Problem::from_store)?;
            let detail = detail.ok_or_else(|| Problem::not_found(format!("no work item {id}")))?;
            let s = detail.state;
            Ok(axum::Json(WorkItemBody {
                id: s.id,
                queue: s.queue,
                status: s.status.into(),
                priority: s.priority,
                flags: s.flags.iter().map(|f| f.as_str().to_owned()).collect(),
                agent: s.agent,
                offers: s.offers,
                enqueued_at: s.enqueued_at,
                offer_expires_at: s.offer_expires_at,
                lease_expires_at: s.lease_expires_at,
                done_at: s.done_at,
                done_by: s.done_by,
                held_reason: s.held_reason,
                cancel_reason: s.cancel_reason,
                triage: explained.map(|e| TriageBody {
                    conversation_id: e.conversation_id,
                    conversation_messages: e.conversation_messages,
                    last_completed_by: e.last_completed_by,
                    thread_rule: e.thread_rule,
                    thread_evidence: e.thread_evidence,
                    class: e.class,
                    class_evidence: e.class_evidence,
                }),
                message: MessageBody {
                    message_id: detail.internet_message_id,
                    subject: detail.subject,
                    from: addresses(detail.from),
                    to: addresses(detail.to),
                    cc: addresses(detail.cc),
                    reply_to: addresses(detail.reply_to),
                    date: detail.sent_at,
                    received_at: detail.fetched_at,
                    text: detail.text,
                    html_sanitized: detail.html_sanitized,
                    size: detail.size,
                    headers_only: detail.headers_only,
                    parse_error: detail.parse_error,
                    defects: detail.defects,
                    attachments: detail
                        .attachments
                        .into_iter()
                        .map(|a| AttachmentBody {
                            ordinal: a.ordinal,
                            filename: a.filename,
                            content_type: a.content_type,
                            size: a.size,
                            inline: a.inline,
                            content_id: a.content_id,
                        })
                        .collect(),
                },
            })
            .into_response())
        }
        .await,
    )
}

/// An agent's step under its claim.
#[derive(Clone, Copy)]
enum AgentStep {
    Accept,
    Heartbeat,
    Release,
    Complete,
}

impl AgentStep {
    fn word(self) -> &'static str {
        match self {
            AgentStep::Accept => "accept",
            AgentStep::Heartbeat => "heartbeat",
            AgentStep::Release => "release",
            AgentStep::Complete => "complete",
        }
    }
}

async fn agent_step(
    state: ApiState,
    principal: Principal,
    path: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
    step: AgentStep,
) -> Response {
    respond(
        async {
            let id = item_id(path)?;
            let (token, text) = match step {
                AgentStep::Accept | AgentStep::Heartbeat => {
                    let r: ClaimStep = parse_required(&body)?;
                    (r.claim_token, None)
                }
                AgentStep::Release => {
                    let r: ReleaseRequest = parse_required(&body)?;
                    check_text("reason", r.reason.as_deref(), 1000)?;
                    (r.claim_token, r.reason)
                }
                AgentStep::Complete => {
                    let r: CompleteRequest = parse_required(&body)?;
                    check_text("note", r.note.as_deref(), 1000)?;
                    (r.claim_token, r.note)
                }
            };
            check_token(&token)?;
            // No read before the step: the step's own guard (this agent, this token) is the
            // check; who may see what is decided from the item only when it is refused.
            let idem = idempotency_key(&headers, &format!("{} {id}", step.word()), &body)?;
            let settings = state.settings().clone();
            let mut pending = match begin(&state, &principal, idem.as_ref()).await? {
                Ok(pending) => pending,
                Err(replay) => return Ok(replay.into_response()),
            };
            let agent = principal.name();
            let (outcome, action) = match step {
                AgentStep::Accept => (
                    lifecycle::accept(&mut pending.tx, id, &token, agent, settings.lease_ttl)
                        .await
                        .map_err(Problem::from_store)?,
                    Some("accepted"),
                ),
                AgentStep::Heartbeat => (
                    lifecycle::heartbeat(&mut pending.tx, id, &token, agent, settings.lease_ttl)
                        .await
                        .map_err(Problem::from_store)?,
                    None,
                ),
                AgentStep::Release => (
                    lifecycle::release(
                        &mut pending.tx,
                        id,
                        &token,
                        agent,
                        text.as_deref(),
                        settings.max_offers,
                    )
                    .await
                    .map_err(Problem::from_store)?,
                    Some("released"),
                ),
                AgentStep::Complete => (
                    lifecycle::complete(&mut pending.tx, id, &token, agent, text.as_deref())
                        .await
                        .map_err(Problem::from_store)?,
                    Some("completed"),
                ),
            };
            let answer = step_answer(&principal, step.word(), action, outcome);
            Ok(pending.commit(answer).await?.into_response())
        }
        .await,
    )
}

/// A documented route for an agent's step under its claim: the OpenAPI description, the
/// request body it takes, and the step it runs.
macro_rules! agent_step_route {
    ($(#[doc = $doc:literal])* $name:ident, $path:literal, $body:ty, $step:expr) => {
        $(#[doc = $doc])*
        #[utoipa::path(post, path = $path, tag = "work items",
            params(ItemPath, IdempotencyHeader),
            request_body = $body,
            responses(StepAnswers))]
        async fn $name(
            State(state): State<ApiState>,
            principal: Principal,
            path: Result<Path<i64>, PathRejection>,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            agent_step(state, principal, path, headers, body, $step).await
        }
    };
}

agent_step_route!(
    /// Accepts an offer: the caller then holds the item until `lease_expires_at`, renewed by
    /// heartbeats.
    accept, "/api/v1/work-items/{id}/accept", ClaimStep, AgentStep::Accept
);
agent_step_route!(
    /// Renews the lease on an accepted item for `api.lease_secs` from now.
    heartbeat, "/api/v1/work-items/{id}/heartbeat", ClaimStep, AgentStep::Heartbeat
);
agent_step_route!(
    /// Gives an offer (rejected) or an accepted item (released) back to its queue, where it
    /// keeps its place.
    release, "/api/v1/work-items/{id}/release", ReleaseRequest, AgentStep::Release
);
agent_step_route!(
    /// Completes an accepted item.
    complete, "/api/v1/work-items/{id}/complete", CompleteRequest, AgentStep::Complete
);

/// Moves an item to another queue, where it waits with its original age: by the agent
/// holding it (with its claim token) or by a supervisor (without).
#[utoipa::path(post, path = "/api/v1/work-items/{id}/transfer", tag = "work items",
    params(ItemPath, IdempotencyHeader),
    request_body = TransferRequest,
    responses(StepAnswers))]
async fn transfer(
    State(state): State<ApiState>,
    principal: Principal,
    path: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        async {
            let id = item_id(path)?;
            let request: TransferRequest = parse_required(&body)?;
            check_queue_name(&request.queue)?;
            let item = item_in_reach(&state, &principal, id).await?;
            if request.claim_token.is_none() {
                principal.require_supervisor("a transfer without a claim token")?;
            }
            if let Some(token) = &request.claim_token {
                check_token(token)?;
            }
            if item.queue == request.queue {
                return Err(Problem::invalid(format!(
                    "the item is already in queue {:?}",
                    request.queue
                )));
            }
            let to_queue = request.queue.clone();
            let exists = state
                .db()
                .with_conn("queue", async |conn| {
                    store::queue_exists(conn, &to_queue).await
                })
                .await
                .map_err(Problem::from_store)?;
            if !exists {
                return Err(Problem::invalid(format!(
                    "no queue {to_queue:?}: no pilot feeds it and no item is in it"
                )));
            }
            let idem = idempotency_key(&headers, &format!("transfer {id}"), &body)?;
            let mut pending = match begin(&state, &principal, idem.as_ref()).await? {
                Ok(pending) => pending,
                Err(replay) => return Ok(replay.into_response()),
            };
            let outcome = match &request.claim_token {
                Some(token) => {
                    lifecycle::transfer(&mut pending.tx, id, token, principal.name(), &to_queue)
                        .await
                        .map_err(Problem::from_store)?
                }
                None => lifecycle::override_step(
                    &mut pending.tx,
                    id,
                    principal.name(),
                    lifecycle::Override::Transfer {
                        to_queue: &to_queue,
                    },
                    None,
                    request.expected_status.map(Into::into),
                )
                .await
                .map_err(Problem::from_store)?,
            };
            let answer = step_answer(&principal, "transfer", Some("transferred"), outcome);
            Ok(pending.commit(answer).await?.into_response())
        }
        .await,
    )
}

/// Cancels an item (spam, merged, withdrawn…); the mail stays stored and visible. Ends any
/// claim on it. Supervisor and admin keys.
#[utoipa::path(post, path = "/api/v1/work-items/{id}/cancel", tag = "work items",
    params(ItemPath, IdempotencyHeader),
    request_body = CancelRequest,
    responses(StepAnswers))]
async fn cancel(
    State(state): State<ApiState>,
    principal: Principal,
    path: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        async {
            let id = item_id(path)?;
            let request: CancelRequest = parse_required(&body)?;
            check_text("note", request.note.as_deref(), 900)?;
            principal.require_supervisor("cancelling an item")?;
            item_in_reach(&state, &principal, id).await?;
            let reason = match &request.note {
                Some(note) => format!("{}: {note}", request.reason.as_str()),
                None => request.reason.as_str().to_owned(),
            };
            let idem = idempotency_key(&headers, &format!("cancel {id}"), &body)?;
            let mut pending = match begin(&state, &principal, idem.as_ref()).await? {
                Ok(pending) => pending,
                Err(replay) => return Ok(replay.into_response()),
            };
            let outcome = lifecycle::override_step(
                &mut pending.tx,
                id,
                principal.name(),
                lifecycle::Override::Cancel { reason: &reason },
                None,
                request.expected_status.map(Into::into),
            )
            .await
            .map_err(Problem::from_store)?;
            let answer = step_answer(&principal, "cancel", Some("cancelled"), outcome);
            Ok(pending.commit(answer).await?.into_response())
        }
        .await,
    )
}

/// Puts an item back in its queue with its offers counted afresh: releases a held item,
/// reopens a done or cancelled one, takes an offered or accepted one from its agent.
/// Supervisor and admin keys.
#[utoipa::path(post, path = "/api/v1/work-items/{id}/requeue", tag = "work items",
    params(ItemPath, IdempotencyHeader),
    request_body(content = Option<RequeueRequest>, content_type = "application/json"),
    responses(StepAnswers))]
async fn requeue(
    State(state): State<ApiState>,
    principal: Principal,
    path: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        async {
            let id = item_id(path)?;
            let request: RequeueRequest = parse_body(&body)?;
            check_text("reason", request.reason.as_deref(), 1000)?;
            principal.require_supervisor("requeueing an item")?;
            item_in_reach(&state, &principal, id).await?;
            let idem = idempotency_key(&headers, &format!("requeue {id}"), &body)?;
            let mut pending = match begin(&state, &principal, idem.as_ref()).await? {
                Ok(pending) => pending,
                Err(replay) => return Ok(replay.into_response()),
            };
            let outcome = lifecycle::override_step(
                &mut pending.tx,
                id,
                principal.name(),
                lifecycle::Override::Requeue,
                request.reason.as_deref(),
                request.expected_status.map(Into::into),
            )
            .await
            .map_err(Problem::from_store)?;
            let answer = step_answer(&principal, "requeue", Some("requeued"), outcome);
            Ok(pending.commit(answer).await?.into_response())
        }
        .await,
    )
}

/// The item's history: every transition, who made it, when, and why.
#[utoipa::path(get, path = "/api/v1/work-items/{id}/events", tag = "work items",
    params(("id" = i64, Path, description = "The work item's id")),
    responses(
        (status = 200, body = EventList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
async fn events(
    State(state): State<ApiState>,
    principal: Principal,
    path: Result<Path<i64>, PathRejection>,
) -> Response {
    respond(
        async {
            let id = item_id(path)?;
            let item = item_in_reach(&state, &principal, id).await?;
            may_read(&principal, &item)?;
            let events = state
                .db()
                .with_conn("events", async |conn| lifecycle::events(conn, id).await)
                .await
                .map_err(Problem::from_store)?;
            let events = events
                .into_iter()
                .map(|e| EventBody {
                    id: e.id,
                    at: e.at,
                    actor: e.actor,
                    action: e.action,
                    from_status: e.from_status,
                    to_status: e.to_status,
                    reason: e.reason,
                    from_queue: e.from_queue,
                    to_queue: e.to_queue,
                })
                .collect();
            Ok(axum::Json(EventList { events }).into_response())
        }
        .await,
    )
}

/// Content types a browser may be told as they are: they cannot run script in ccmail's
/// origin. Everything else is sent as `application/octet-stream`.
pub(crate) const PASSIVE_TYPES: &[&str] = &[
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "text/plain",
    "text/csv",
    "application/zip",
    "application/msword",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.ms-excel",
];

/// `Content-Disposition: attachment` with an ASCII fallback name and the UTF-8 name
/// (RFC 6266 / RFC 8187); the name is the sanitised one whatever the sender wrote.
pub(crate) fn disposition(name: Option<&str>, fallback: &str) -> HeaderValue {
    let safe = name
        .and_then(crate::ingest::parse::safe_filename)
        .unwrap_or_else(|| fallback.to_owned());
    let ascii: String = safe
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._- ()+,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = safe
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// Headers of every download: saved, never rendered or sniffed, never cached by proxies.
pub(crate) fn download(content_type: &str, disposition: HeaderValue, bytes: Vec<u8>) -> Response {
    let content_type = HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    let mut response = (StatusCode::OK, bytes).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CONTENT_DISPOSITION, disposition);
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    response
}

/// An attachment's bytes, as a download.
#[utoipa::path(get, path = "/api/v1/work-items/{id}/attachments/{ordinal}", tag = "work items",
    params(("id" = i64, Path, description = "The work item's id"),
        ("ordinal" = i32, Path, description = "The attachment's position in the message, from 0")),
    responses(
        (status = 200, content_type = "application/octet-stream", description = "The attachment, with `Content-Disposition: attachment`"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
async fn attachment(
    State(state): State<ApiState>,
    principal: Principal,
    path: Result<Path<(i64, i32)>, PathRejection>,
) -> Response {
    respond(
        async {
            let Ok(Path((id, ordinal))) = path else {
                return Err(Problem::not_found("no such attachment"));
            };
            let item = item_in_reach(&state, &principal, id).await?;
            may_read(&principal, &item)?;
            let content = state
                .db()
                .with_conn("attachment", async |conn| {
                    store::attachment_content(conn, id, ordinal).await
                })
                .await
                .map_err(Problem::from_store)?
                .ok_or_else(|| {
                    Problem::not_found(format!("work item {id} has no attachment {ordinal}"))
                })?;
            let declared = content.info.content_type.to_ascii_lowercase();
            let content_type = if PASSIVE_TYPES.contains(&declared.as_str()) {
                declared
            } else {
                "application/octet-stream".to_owned()
            };
            Ok(download(
                &content_type,
                disposition(
                    content.info.filename.as_deref(),
                    &format!("attachment-{id}-{ordinal}"),
                ),
                content.bytes,
            ))
        }
        .await,
    )
}

/// The message exactly as downloaded from the mailbox (`.eml`).
#[utoipa::path(get, path = "/api/v1/work-items/{id}/raw", tag = "work items",
    params(("id" = i64, Path, description = "The work item's id")),
    responses(
        (status = 200, content_type = "message/rfc822", description = "The raw message"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
async fn raw_message(
    State(state): State<ApiState>,
    principal: Principal,
    path: Result<Path<i64>, PathRejection>,
) -> Response {
    respond(
        async {
            let id = item_id(path)?;
            let item = item_in_reach(&state, &principal, id).await?;
            may_read(&principal, &item)?;
            let raw = state
                .db()
                .with_conn("raw message", async |conn| {
                    store::raw_message(conn, id).await
                })
                .await
                .map_err(Problem::from_store)?
                .ok_or_else(|| Problem::not_found(format!("no work item {id}")))?;
            let name = format!("work-item-{id}.eml");
            Ok(download(
                "message/rfc822",
                disposition(Some(&name), &name),
                raw,
            ))
        }
        .await,
    )
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses(
        (status = 200, content_type = "application/json", description = "The OpenAPI 3.1 document"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ))]
async fn openapi_json(_principal: Principal) -> Response {
    match document().to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "the OpenAPI document cannot be written");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the OpenAPI document cannot be written",
            )
            .into_response()
        }
    }
}
