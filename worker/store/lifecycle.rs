//! A work item's life: claims, the agent's steps under a claim token, the supervisor's steps,
//! the rescue of expired offers and leases, and the event log of every transition.
//!
//! Invariants, each enforced by the SQL itself (not by a read before the write):
//! - every transition is one statement: the guarded update and its event row commit together
//!   or not at all;
//! - an agent's step names the claim token, the agent and the state it expects; a claim that
//!   passed to someone else (offer expired and claimed again, lease expired, transferred,
//!   cancelled) matches no row, so a stale agent changes nothing and gets [`Step::Refused`];
//! - an accept, a heartbeat or a completion after the offer's or lease's expiry is refused
//!   even before the rescue step has run, so expiry does not depend on the rescue's timing;
//! - claims take rows with `for update skip locked`, so concurrent claimers never wait for
//!   each other and never take one row twice;
//! - the rescue step is safe from any number of processes at once (it skips locked rows and
//!   each move is guarded like any other);
//! - times are the database's (`now()`), so replicas agree on expiry.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::error::StoreError;
use super::words;
use crate::model::WorkItemStatus;

/// The actor the rescue step and migrations write in events.
pub const SYSTEM_ACTOR: &str = "system";

/// An offer made by [`claim`]: the item is the agent's until `offer_expires_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub id: i64,
    pub queue: String,
    pub claim_token: String,
    pub offer_expires_at: DateTime<Utc>,
    /// How many times the item has been offered, this offer included.
    pub offers: i32,
    /// Seconds since the item entered its queue, when this is its first offer.
    pub first_offer_wait_secs: Option<f64>,
}

/// What a successful step left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    pub id: i64,
    pub from: WorkItemStatus,
    pub to: WorkItemStatus,
    pub queue: String,
    /// The accepted item's lease expiry (accept, heartbeat).
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Seconds since the item entered its queue, when this was its first accept.
    pub first_accept_wait_secs: Option<f64>,
    /// Seconds the agent held the accepted item (complete).
    pub handle_secs: Option<f64>,
}

/// Where the item stands when a step was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub status: WorkItemStatus,
    pub queue: String,
    /// Who holds it now (offered, accepted).
    pub agent: Option<String>,
    /// The token the step named is the item's current one.
    pub token_matches: bool,
    /// The item's offer or lease has passed its expiry (the rescue step has not run yet).
    pub expired: bool,
}

impl Current {
    /// Why the step was refused, in words for the agent's answer.
    pub fn explain(&self, step: &str) -> String {
        match (self.status, self.token_matches, self.expired) {
            (WorkItemStatus::Offered, true, true) => {
                format!("cannot {step}: the offer has expired; claim the item again")
            }
            (WorkItemStatus::Accepted, true, true) => {
                format!("cannot {step}: the lease has expired; the item goes back to its queue")
            }
            (status, true, _) => format!("cannot {step}: the item is {status}"),
            (status, false, _) => format!(
                "cannot {step}: the claim token is not the item's current one (it is now {status}); \
                 the claim has passed to someone else or ended"
            ),
        }
    }
}

/// The answer of a step that may be refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Done(Moved),
    /// The item is not in the state, or not under the claim, that the step expects; nothing
    /// changed.
    Refused(Current),
    NotFound,
}

/// What one rescue pass moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rescued {
    /// Offers that expired, back in their queue.
    pub offers_expired: u64,
    /// Leases that expired (the agent is taken as lost), back in their queue.
    pub leases_expired: u64,
    /// Of those, items held for a supervisor because they were offered too often.
    pub held: u64,
}

/// One row of an item's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub from_status: Option<String>,
    pub to_status: String,
    /// The claim the event belongs to (offers and the steps under them).
    pub claim_token: Option<String>,
    pub reason: Option<String>,
    pub from_queue: Option<String>,
    pub to_queue: Option<String>,
}

/// The step a supervisor or an operator takes without a claim token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Override<'a> {
    /// Back to the queue from any other state (a done or cancelled item is reopened), offers
    /// counted afresh.
    Requeue,
    /// Withdrawn; the mail stays stored.
    Cancel { reason: &'a str },
    /// To another queue, waiting there; its claim (if any) ends.
    Transfer { to_queue: &'a str },
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn status(word: &str) -> Result<WorkItemStatus, StoreError> {
    words::status(word)
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    id: i64,
    queue: String,
    claim_token: String,
    offer_expires_at: DateTime<Utc>,
    offers: i32,
    first_offer_wait_secs: Option<f64>,
}

/// Offers up to `max` queued items of `queue` to `agent`, highest priority first, then the
/// item that entered the queue first. Rows other claimers have locked are skipped, never
/// waited for; an empty answer means nothing is waiting (or everything is being claimed).
pub async fn claim(
    conn: &mut PgConnection,
    queue: &str,
    agent: &str,
    max: u32,
    offer_ttl: Duration,
) -> Result<Vec<Claim>, StoreError> {
    let rows: Vec<ClaimRow> = sqlx::query_as(
        "with pick as ( \
             select id from work_items \
             where queue = $1 and status = 'queued' \
             order by priority desc, enqueued_at, id \
             limit $2 for update skip locked \
         ), offered as ( \
             update work_items w set status = 'offered', \
                 claim_token = replace(gen_random_uuid()::text, '-', ''), agent = $3, \
                 offered_at = now(), offer_expires_at = now() + make_interval(secs => $4), \
                 first_offered_at = coalesce(w.first_offered_at, now()), \
                 offers = w.offers + 1, updated_at = now() \
             from pick where w.id = pick.id \
             returning w.id, w.queue, w.claim_token, w.offer_expires_at, w.offers, w.priority, \
                 w.enqueued_at, \
                 case when w.first_offered_at = now() \
                     then greatest(extract(epoch from now() - w.enqueued_at), 0)::float8 end \
                     as first_offer_wait_secs \
         ), logged as ( \
             insert into work_item_events (work_item_id, actor, action, from_status, to_status, \
                 claim_token) \
             select id, $3, 'offered', 'queued', 'offered', claim_token from offered \
         ) \
         select id, queue, claim_token, offer_expires_at, offers, first_offer_wait_secs \
         from offered order by priority desc, enqueued_at, id",
    )
    .bind(queue)
    .bind(i64::from(max))
    .bind(agent)
    .bind(secs(offer_ttl))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Claim {
            id: r.id,
            queue: r.queue,
            claim_token: r.claim_token,
            offer_expires_at: r.offer_expires_at,
            offers: r.offers,
            first_offer_wait_secs: r.first_offer_wait_secs,
        })
        .collect())
}

#[derive(sqlx::FromRow)]
struct MovedRow {
    id: i64,
    from_status: String,
    to_status: String,
    queue: String,
    lease_expires_at: Option<DateTime<Utc>>,
    first_accept_wait_secs: Option<f64>,
    handle_secs: Option<f64>,
}

impl MovedRow {
    fn into_moved(self) -> Result<Moved, StoreError> {
        Ok(Moved {
            id: self.id,
            from: status(&self.from_status)?,
            to: status(&self.to_status)?,
            queue: self.queue,
            lease_expires_at: self.lease_expires_at,
            first_accept_wait_secs: self.first_accept_wait_secs,
            handle_secs: self.handle_secs,
        })
    }
}

/// The columns every step's `moved` CTE returns, read by [`MovedRow`]; `prev` is the row
/// before the step.
macro_rules! moved_returning {
    () => {
        "returning w.id, prev.status as from_status, w.status as to_status, w.queue, \
         w.lease_expires_at, w.claim_token as new_token, prev.claim_token as old_token, \
         prev.queue as from_queue, \
         case when prev.first_accepted_at is null and w.first_accepted_at is not null \
             then greatest(extract(epoch from now() - w.enqueued_at), 0)::float8 end \
             as first_accept_wait_secs, \
         case when w.status = 'done' \
             then greatest(extract(epoch from now() - prev.accepted_at), 0)::float8 end \
             as handle_secs"
    };
}

/// The columns a step clears when its claim ends.
macro_rules! claim_cleared {
    () => {
        "claim_token = null, agent = null, offered_at = null, offer_expires_at = null, \
         accepted_at = null, lease_expires_at = null, updated_at = now()"
    };
}

/// Builds a step: `prev` locks the row if `guard` holds, `moved` applies `set`, `logged`
/// writes the event (`action` is an SQL expression over `moved`), and the statement answers
/// the moved row. Bind order: `$1` id, `$2` claim token, `$3` actor, `$4` seconds, `$5` text
/// (reason or queue), `$6` offers before holding, `$7` expected status.
macro_rules! step_sql {
    ($guard:expr, $set:expr, $action:expr, $reason:expr) => {
        concat!(
            "with prev as (select * from work_items where id = $1 and (",
            $guard,
            ") for update), moved as (update work_items w set ",
            $set,
            " from prev where w.id = prev.id ",
            moved_returning!(),
            "), logged as (insert into work_item_events (work_item_id, actor, action, \
             from_status, to_status, claim_token, reason, from_queue, to_queue) \
             select id, $3, ",
            $action,
            ", from_status, to_status, coalesce(old_token, new_token), ",
            $reason,
            ", case when from_queue <> queue then from_queue end, \
             case when from_queue <> queue then queue end from moved) \
             select id, from_status, to_status, queue, lease_expires_at, first_accept_wait_secs, \
             handle_secs from moved"
        )
    };
}

/// The guard of an agent's step on its own claim.
macro_rules! own_claim {
    ($states:expr) => {
        concat!(
            "status in (",
            $states,
            ") and claim_token = $2 and agent = $3"
        )
    };
}

/// The state an item goes back to: held for a supervisor once offered as many times as the
/// parameter named by `$max` allows.
macro_rules! back_to_queue {
    ($max:literal) => {
        concat!(
            "status = case when w.offers >= ",
            $max,
            " then 'held' else 'queued' end, held_reason = case when w.offers >= ",
            $max,
            " then 'offer_limit' end, ",
            claim_cleared!()
        )
    };
}

const ACCEPT: &str = step_sql!(
    concat!(own_claim!("'offered'"), " and offer_expires_at > now()"),
    "status = 'accepted', accepted_at = now(), \
     first_accepted_at = coalesce(w.first_accepted_at, now()), \
     lease_expires_at = now() + make_interval(secs => $4), offer_expires_at = null, \
     updated_at = now()",
    "'accepted'",
    "null::text"
);

const RELEASE: &str = step_sql!(
    own_claim!("'offered', 'accepted'"),
    back_to_queue!("$6"),
    "case from_status when 'offered' then 'rejected' else 'released' end",
    "$5"
);

const COMPLETE: &str = step_sql!(
    concat!(own_claim!("'accepted'"), " and lease_expires_at > now()"),
    concat!(
        "status = 'done', done_at = now(), done_by = $3, ",
        claim_cleared!()
    ),
    "'completed'",
    "$5"
);

const TRANSFER: &str = step_sql!(
    concat!(
        own_claim!("'offered', 'accepted'"),
        " and case status when 'offered' then offer_expires_at else lease_expires_at end > now()"
    ),
    concat!(
        "status = 'queued', queue = $5, offers = 0, ",
        claim_cleared!()
    ),
    "'transferred'",
    "null::text"
);

const REQUEUE: &str = step_sql!(
    "status <> 'queued' and ($7::text is null or status = $7)",
    concat!(
        "status = 'queued', offers = 0, held_reason = null, cancel_reason = null, \
         done_at = null, done_by = null, ",
        claim_cleared!()
    ),
    "'requeued'",
    "$5"
);

const CANCEL: &str = step_sql!(
    "status not in ('done', 'cancelled') and ($7::text is null or status = $7)",
    concat!(
        "status = 'cancelled', cancel_reason = $5, held_reason = null, ",
        claim_cleared!()
    ),
    "'cancelled'",
    "$5"
);

const OVERRIDE_TRANSFER: &str = step_sql!(
    "status not in ('done', 'cancelled') and queue <> $5 and ($7::text is null or status = $7)",
    concat!(
        "status = 'queued', queue = $5, offers = 0, held_reason = null, ",
        claim_cleared!()
    ),
    "'transferred'",
    "null::text"
);

/// The bound values of a step (see [`step_sql!`] for their order).
struct Binds<'a> {
    id: i64,
    token: Option<&'a str>,
    actor: &'a str,
    secs: f64,
    text: Option<&'a str>,
    max_offers: i32,
    expected: Option<WorkItemStatus>,
}

impl<'a> Binds<'a> {
    fn new(id: i64, actor: &'a str) -> Binds<'a> {
        Binds {
            id,
            token: None,
            actor,
            secs: 0.0,
            text: None,
            max_offers: i32::MAX,
            expected: None,
        }
    }
}

async fn run_step(
    conn: &mut PgConnection,
    sql: &'static str,
    binds: Binds<'_>,
) -> Result<Step, StoreError> {
    let row: Option<MovedRow> = sqlx::query_as(sql)
        .bind(binds.id)
        .bind(binds.token)
        .bind(binds.actor)
        .bind(binds.secs)
        .bind(binds.text)
        .bind(binds.max_offers)
        .bind(binds.expected.map(WorkItemStatus::as_str))
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => Ok(Step::Done(row.into_moved()?)),
        None => Ok(match current(conn, binds.id, binds.token).await? {
            Some(current) => Step::Refused(current),
            None => Step::NotFound,
        }),
    }
}

/// Where item `id` stands, compared with the claim token a refused step named.
pub async fn current(
    conn: &mut PgConnection,
    id: i64,
    token: Option<&str>,
) -> Result<Option<Current>, StoreError> {
    let row: Option<(String, String, Option<String>, bool, bool)> = sqlx::query_as(
        "select status, queue, agent, claim_token is not distinct from $2, \
         coalesce(case status when 'offered' then offer_expires_at <= now() \
             when 'accepted' then lease_expires_at <= now() end, false) \
         from work_items where id = $1",
    )
    .bind(id)
    .bind(token)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|(s, queue, agent, token_matches, expired)| {
        Ok(Current {
            status: status(&s)?,
            queue,
            agent,
            token_matches,
            expired,
        })
    })
    .transpose()
}

/// The agent accepts its offer; it then holds the item for `lease_ttl`, renewed by
/// [`heartbeat`].
pub async fn accept(
    conn: &mut PgConnection,
    id: i64,
    token: &str,
    agent: &str,
    lease_ttl: Duration,
) -> Result<Step, StoreError> {
    let mut b = Binds::new(id, agent);
    b.token = Some(token);
    b.secs = secs(lease_ttl);
    run_step(conn, ACCEPT, b).await
}

/// The agent renews its lease on an accepted item for `lease_ttl` from now. Not a
/// transition, so no event is written.
pub async fn heartbeat(
    conn: &mut PgConnection,
    id: i64,
    token: &str,
    agent: &str,
    lease_ttl: Duration,
) -> Result<Step, StoreError> {
    let row: Option<MovedRow> = sqlx::query_as(
        "update work_items w set lease_expires_at = now() + make_interval(secs => $4), \
             updated_at = now() \
         where id = $1 and status = 'accepted' and claim_token = $2 and agent = $3 \
             and lease_expires_at > now() \
         returning id, status as from_status, status as to_status, queue, lease_expires_at, \
             null::float8 as first_accept_wait_secs, null::float8 as handle_secs",
    )
    .bind(id)
    .bind(token)
    .bind(agent)
    .bind(secs(lease_ttl))
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(Step::Done(row.into_moved()?)),
        None => Ok(match current(conn, id, Some(token)).await? {
            Some(current) => Step::Refused(current),
            None => Step::NotFound,
        }),
    }
}

/// The agent gives its offer back (rejected) or its accepted item (released); the item keeps
/// its place in the queue, or is held for a supervisor once it has been offered
/// `max_offers` times.
pub async fn release(
    conn: &mut PgConnection,
    id: i64,
    token: &str,
    agent: &str,
    reason: Option<&str>,
    max_offers: i32,
) -> Result<Step, StoreError> {
    let mut b = Binds::new(id, agent);
    b.token = Some(token);
    b.text = reason;
    b.max_offers = max_offers;
    run_step(conn, RELEASE, b).await
}

/// The agent completes its accepted item.
pub async fn complete(
    conn: &mut PgConnection,
    id: i64,
    token: &str,
    agent: &str,
    note: Option<&str>,
) -> Result<Step, StoreError> {
    let mut b = Binds::new(id, agent);
    b.token = Some(token);
    b.text = note;
    run_step(conn, COMPLETE, b).await
}

/// The agent hands its item to another queue, where it waits like a new one of the same age
/// (it keeps its first-entered time, so the customer's wait counts).
pub async fn transfer(
    conn: &mut PgConnection,
    id: i64,
    token: &str,
    agent: &str,
    to_queue: &str,
) -> Result<Step, StoreError> {
    let mut b = Binds::new(id, agent);
    b.token = Some(token);
    b.text = Some(to_queue);
    run_step(conn, TRANSFER, b).await
}

/// A supervisor's or an operator's step on any item, without a claim token: any claim on the
/// item ends (the agent's later steps are refused). `expected`, when given, must be the
/// item's state (so a supervisor acting on what a page showed does not act on something that
/// has changed since).
pub async fn override_step(
    conn: &mut PgConnection,
    id: i64,
    actor: &str,
    step: Override<'_>,
    reason: Option<&str>,
    expected: Option<WorkItemStatus>,
) -> Result<Step, StoreError> {
    let mut b = Binds::new(id, actor);
    b.expected = expected;
    let sql = match step {
        Override::Requeue => {
            b.text = reason;
            REQUEUE
        }
        Override::Cancel { reason } => {
            b.text = Some(reason);
            CANCEL
        }
        Override::Transfer { to_queue } => {
            b.text = Some(to_queue);
            OVERRIDE_TRANSFER
        }
    };
    run_step(conn, sql, b).await
}

/// Puts expired offers and leases back in their queue (or holds items offered `max_offers`
/// times), at most `limit` items per call; events name `agent_lost` for a lease. What moved,
/// per queue (ordered by name). Safe to run from any number of processes at once.
pub async fn rescue(
    conn: &mut PgConnection,
    max_offers: i32,
    limit: u32,
) -> Result<Vec<(String, Rescued)>, StoreError> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(concat!(
        "with prev as ( \
             select * from work_items \
             where (status = 'offered' and offer_expires_at <= now()) \
                or (status = 'accepted' and lease_expires_at <= now()) \
             limit $2 for update skip locked \
         ), moved as ( \
             update work_items w set ",
        back_to_queue!("$1"),
        " from prev where w.id = prev.id \
             returning w.id, prev.status as from_status, w.status as to_status, \
                 prev.claim_token as old_token, w.offers, w.queue \
         ) \
         insert into work_item_events (work_item_id, actor, action, from_status, to_status, \
             claim_token, reason) \
         select id, 'system', \
             case from_status when 'offered' then 'offer_expired' else 'lease_expired' end, \
             from_status, to_status, old_token, \
             case when from_status = 'accepted' then 'agent_lost' end \
                 || case when to_status = 'held' then '; offered ' || offers || ' times' else '' end \
         from moved returning action, to_status, \
             (select queue from moved where moved.id = work_item_id)"
    ))
    .bind(max_offers)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let mut by_queue: std::collections::BTreeMap<String, Rescued> = Default::default();
    for (action, to, queue) in rows {
        let rescued = by_queue.entry(queue).or_default();
        if action == "offer_expired" {
            rescued.offers_expired += 1;
        } else {
            rescued.leases_expired += 1;
        }
        if to == "held" {
            rescued.held += 1;
        }
    }
    Ok(by_queue.into_iter().collect())
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: i64,
    at: DateTime<Utc>,
    actor: String,
    action: String,
    from_status: Option<String>,
    to_status: String,
    claim_token: Option<String>,
    reason: Option<String>,
    from_queue: Option<String>,
    to_queue: Option<String>,
}

/// Item `id`'s events, oldest first.
pub async fn events(conn: &mut PgConnection, id: i64) -> Result<Vec<Event>, StoreError> {
    let rows: Vec<EventRow> = sqlx::query_as(
        "select id, at, actor, action, from_status, to_status, claim_token, reason, from_queue, \
         to_queue from work_item_events where work_item_id = $1 order by id",
    )
    .bind(id)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Event {
            id: r.id,
            at: r.at,
            actor: r.actor,
            action: r.action,
            from_status: r.from_status,
            to_status: r.to_status,
            claim_token: r.claim_token,
            reason: r.reason,
            from_queue: r.from_queue,
            to_queue: r.to_queue,
        })
        .collect())
}
