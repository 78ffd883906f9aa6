//! Conversations, the loop breaker and the class policy: where a new message belongs and
//! what becomes of its work item, decided inside the ingest transaction.
//!
//! The threading chain, first match wins (never the subject alone):
//! 1. `in_reply_to`: an `In-Reply-To` id equals the `Message-ID` of a stored message of the
//!    same tenant (pilots whose apps share an Entra tenant; a password pilot is its own);
//! 2. `references`: a `References` id, newest first, names such a message, and a guard holds:
//!    the same normalised subject (not empty), or the sender is a participant of that
//!    conversation;
//! 3. `report_original`: a bounce or receipt returns headers whose ids name such a message;
//! 4. `thread_index`: Outlook's `Thread-Index` root matches a conversation, guarded by
//!    `Thread-Topic` (same normalised subject) or the sender being a participant;
//! 5. `new`: a new conversation.
//!
//! Rejected candidates are kept in the evidence with the guard that failed.
//!
//! The loop breaker turns a message into class `loop` when `X-Loop` names the mailbox (the
//! classifier's rule), when this pilot stored the same `Message-ID` with the same bytes or
//! identity before, or when the sender sent more than the rate rule allows within its window.
//!
//! Invariant: [`place`] only reads (and takes a conversation id from the sequence); the
//! message insert writes the conversation's side in the same statement, so a message that
//! turns out to be stored already leaves no trace.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::error::StoreError;
use crate::model::triage::{
    Action, Classification, Finding, LoopTrip, MailClass, SenderRate, ThreadRule, Triage,
    subject_key,
};
use crate::model::{Address, ParsedMail};

/// Participants a conversation records at most (the schema's limit).
pub const MAX_PARTICIPANTS: usize = 100;

/// Ids tried per message: `In-Reply-To`, `References` and a report's returned ids together.
const MAX_CANDIDATE_IDS: usize = 120;

/// What ingest knows for threading and classifying one message.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub pilot_id: i64,
    pub parsed: &'a ParsedMail,
    pub sha256: &'a [u8; 32],
    pub identity: Option<&'a [u8; 32]>,
    /// The classifier's verdict and Outlook's header; `None`: a person's mail.
    pub triage: Option<&'a Triage>,
    /// The loop breaker's rate rule; `None`: no rate rule.
    pub sender_rate: Option<SenderRate>,
    /// For a message stored already (backfill): its row, so that only earlier rows count as
    /// "seen before". `None` for a message being stored.
    pub stored_row: Option<i64>,
}

/// Whether a message started a conversation or continued one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Threaded {
    Created,
    Continued,
}

impl Threaded {
    /// The metric label word.
    pub fn as_str(self) -> &'static str {
        match self {
            Threaded::Created => "created",
            Threaded::Continued => "continued",
        }
    }
}

/// What [`place`] decided for one message; what [`record`] and the work-item insert write.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub conversation_id: i64,
    pub threaded: Threaded,
    pub rule: ThreadRule,
    pub thread_evidence: Value,
    pub classification: Classification,
    pub action: Action,
    pub loop_trip: Option<LoopTrip>,
    subject_key: String,
    participants: Vec<String>,
    thread_index: Option<String>,
}

impl Placement {
    /// The class the message is stored with.
    pub fn class(&self) -> MailClass {
        self.classification.class
    }

    /// The normalised subject a new conversation keys on.
    pub(super) fn subject_key(&self) -> &str {
        &self.subject_key
    }

    /// The message's From/To/Cc addresses, lowercase (the pilot's own is dropped in SQL).
    pub(super) fn participants(&self) -> &[String] {
        &self.participants
    }

    /// Its Outlook `Thread-Index` root.
    pub(super) fn thread_index(&self) -> Option<&str> {
        self.thread_index.as_deref()
    }
}

/// Lowercase sender address (the first `From` mailbox, as the rate rule's index reads it).
fn sender(parsed: &ParsedMail) -> Option<String> {
    parsed
        .from
        .first()
        .and_then(|a| a.email.as_deref())
        .map(|e| e.trim().to_lowercase())
        .filter(|e| !e.is_empty() && e.len() <= 320)
}

fn participants(parsed: &ParsedMail) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let all: [&Vec<Address>; 3] = [&parsed.from, &parsed.to, &parsed.cc];
    for address in all.into_iter().flatten() {
        if let Some(email) = address.email.as_deref() {
            let email = crate::model::text::nul_free(email.trim()).to_lowercase();
            if !email.is_empty() && email.len() <= 320 && !out.contains(&email) {
                out.push(email);
            }
        }
        if out.len() >= MAX_PARTICIPANTS {
            break;
        }
    }
    out
}

/// The threading candidates of [`place`]: the stored messages that `$2` (ids, in the order
/// the rules try them, with their rule in `$3`) name within the tenant of pilot `$1`, each
/// with the guards' facts, and the conversation of Outlook's `Thread-Index` root `$6`.
macro_rules! lookup_threading {
    () => {
        "with tenant as ( \
             select p.id from pilots p where p.id = $1 \
             or p.app_id in (select a.id from oauth_apps a where a.tenant = \
                 (select o.tenant from pilots q join oauth_apps o on o.id = q.app_id where q.id = $1))), \
         refs as (select r.id, r.kind, r.ord from unnest($2::text[], $3::text[]) with ordinality as r(id, kind, ord)), \
         found as ( \
             select distinct on (r.ord) r.ord, r.id, r.kind, m.id as message_row, c.id as conversation_id, \
                    ($4 <> '' and c.subject_key = $4) as same_subject, coalesce($5 = any(c.participants), false) as participant \
             from refs r \
             join messages m on m.message_id = r.id and m.conversation_id is not null \
                  and m.pilot_id in (select id from tenant) \
             join conversations c on c.id = m.conversation_id \
             order by r.ord, m.id desc), \
         outlook as ( \
             select c.id as conversation, ($7 <> '' and c.subject_key = $7) as same_topic, \
                    coalesce($5 = any(c.participants), false) as participant \
             from conversations c \
             where $6::text is not null and c.thread_index = $6 and c.pilot_id in (select id from tenant) \
             order by c.id desc limit 1) \
         select \
             coalesce((select jsonb_agg(jsonb_build_object('id', id, 'kind', kind, 'message', message_row, \
                 'conversation', conversation_id, 'same_subject', same_subject, 'participant', participant) \
                 order by ord) from found), '[]'::jsonb) as candidates, \
             (select to_jsonb(outlook) from outlook) as outlook, "
    };
}

/// The rest of [`place`]'s lookup: seen before (`$8` Message-ID with the bytes `$9` or
/// identity `$10`, in rows before `$12` when given), the sender `$5`'s messages within `$11`
/// seconds (counted up to `$13`, all the rule needs), the pilot's class policy and a fresh
/// conversation id.
macro_rules! lookup_common {
    () => {
        "$8::text is not null and exists (select 1 from messages where pilot_id = $1 and message_id = $8 \
             and (sha256 = $9 or identity = $10) and ($12::bigint is null or id < $12)) as seen_before, \
         case when $5::text is null or $11::float8 is null then 0::bigint else \
             (select count(*) from (select 1 from messages where pilot_id = $1 \
              and lower(from_addrs -> 0 ->> 'email') = $5 \
              and fetched_at > now() - make_interval(secs => $11) limit $13) recent) end as recent, \
         (select jsonb_object_agg(class, action) from pilot_class_policies where pilot_id = $1) as policies, \
         nextval('conversations_id_seq'::regclass) as fresh_id"
    };
}

const LOOKUP_THREADED: &str = concat!(lookup_threading!(), lookup_common!());
const LOOKUP_UNTHREADED: &str = concat!(
    "select '[]'::jsonb as candidates, null::jsonb as outlook, ",
    lookup_common!()
);

/// Decides the conversation, class and action of a message about to be stored. Reads only;
/// see the module documentation.
pub async fn place(conn: &mut PgConnection, facts: &Facts<'_>) -> Result<Placement, StoreError> {
    let parsed = facts.parsed;
    let human = Triage::human();
    let triage = facts.triage.unwrap_or(&human);
    // Values built by hand may hold NUL (the parser's never do); text parameters cannot.
    let nul_free = |t: &str| crate::model::text::nul_free(t).into_owned();
    let sender = sender(parsed).map(|s| nul_free(&s));
    let key = nul_free(&subject_key(parsed.subject.as_deref().unwrap_or("")));
    let topic_key = triage
        .thread_index
        .as_ref()
        .and_then(|t| t.topic.as_deref())
        .map(|t| nul_free(&subject_key(t)));

    // Candidate ids in the order the rules try them.
    let mut ids: Vec<String> = Vec::new();
    let mut kinds: Vec<&'static str> = Vec::new();
    let mut push = |id: &str, kind: &'static str, ids: &mut Vec<String>| {
        let id = crate::model::text::nul_free(id);
        if ids.len() < MAX_CANDIDATE_IDS && !id.is_empty() && !ids.iter().any(|i| *i == id) {
            ids.push(id.into_owned());
            kinds.push(kind);
        }
    };
    for id in &parsed.in_reply_to {
        push(id, "in_reply_to", &mut ids);
    }
    for id in parsed.references.iter().rev() {
        push(id, "references", &mut ids);
    }
    if let Some(original) = &triage.classification.original {
        for id in original.message_id.iter().chain(&original.ancestors) {
            push(id, "report_original", &mut ids);
        }
    }

    // Mail that names no other message (most new mail) skips the threading lookups: a
    // statement without them is cheaper to run and to plan.
    let threading = !ids.is_empty() || triage.thread_index.is_some();
    let sql = if threading {
        LOOKUP_THREADED
    } else {
        LOOKUP_UNTHREADED
    };
    let row: Lookup = sqlx::query_as(sql)
        .bind(facts.pilot_id)
        .bind(&ids)
        .bind(&kinds)
        .bind(&key)
        .bind(sender.as_deref())
        .bind(triage.thread_index.as_ref().map(|t| t.root.as_str()))
        .bind(topic_key.as_deref())
        .bind(
            parsed
                .message_id
                .as_deref()
                .filter(|id| id.len() <= 998)
                .map(nul_free),
        )
        .bind(&facts.sha256[..])
        .bind(facts.identity.map(|i| &i[..]))
        .bind(facts.sender_rate.map(|r| r.window.as_secs_f64()))
        .bind(facts.stored_row)
        .bind(facts.sender_rate.map(|r| i64::from(r.max_messages)))
        .fetch_one(&mut *conn)
        .await?;
    let Lookup {
        candidates: Json(candidates),
        outlook,
        seen_before,
        recent,
        policies,
        fresh_id,
    } = row;

    // Threading: the first candidate whose guard holds.
    let mut rejected: Vec<Value> = Vec::new();
    let mut chosen: Option<(ThreadRule, i64, Value)> = None;
    for c in &candidates {
        let (rule, guard) = match c.kind.as_str() {
            "in_reply_to" => (ThreadRule::InReplyTo, Some("none")),
            "report_original" => (ThreadRule::ReportOriginal, Some("none")),
            _ if c.same_subject => (ThreadRule::References, Some("same_subject")),
            _ if c.participant => (ThreadRule::References, Some("sender_is_participant")),
            _ => (ThreadRule::References, None),
        };
        let Some(guard) = guard else {
            rejected.push(json!({
                "header": "References",
                "message_id": c.id,
                "conversation": c.conversation,
                "reason": "different normalised subject and the sender is not a participant",
            }));
            continue;
        };
        chosen = Some((
            rule,
            c.conversation,
            json!({
                "header": header_of(rule),
                "message_id": c.id,
                "matched_message": c.message,
                "guard": guard,
            }),
        ));
        break;
    }
    if chosen.is_none()
        && let (Some(Json(outlook)), Some(index)) = (&outlook, &triage.thread_index)
    {
        let guard = if outlook.same_topic == Some(true) {
            Some("same_thread_topic")
        } else if outlook.participant {
            Some("sender_is_participant")
        } else {
            None
        };
        match guard {
            Some(guard) => {
                chosen = Some((
                    ThreadRule::ThreadIndex,
                    outlook.conversation,
                    json!({
                        "header": "Thread-Index",
                        "root": index.root,
                        "thread_topic": index.topic,
                        "guard": guard,
                    }),
                ))
            }
            None => rejected.push(json!({
                "header": "Thread-Index",
                "root": index.root,
                "conversation": outlook.conversation,
                "reason": "different Thread-Topic and the sender is not a participant",
            })),
        }
    }
    let (rule, conversation_id, mut evidence, threaded) = match chosen {
        Some((rule, id, evidence)) => (rule, id, evidence, Threaded::Continued),
        None => (
            ThreadRule::New,
            fresh_id,
            json!({ "subject_key": key, "ids_tried": ids.len() }),
            Threaded::Created,
        ),
    };
    if !rejected.is_empty() {
        evidence["rejected"] = Value::Array(rejected);
    }

    // Classification, then the loop breaker's rules that need stored mail.
    let mut classification = triage.classification.clone();
    let mut loop_trip = (classification.class == MailClass::Loop).then_some(LoopTrip::XLoop);
    let over_rate = facts
        .sender_rate
        .is_some_and(|r| recent.saturating_add(1) > i64::from(r.max_messages));
    if loop_trip.is_none() && (seen_before || over_rate) {
        let (trip, finding) = if seen_before {
            (
                LoopTrip::SeenBefore,
                Finding {
                    rule: "seen_before".to_owned(),
                    source: "Message-ID + content".to_owned(),
                    value: crate::model::text::nul_free(
                        &parsed.message_id.clone().unwrap_or_default(),
                    )
                    .chars()
                    .take(crate::model::triage::EVIDENCE_VALUE_CHARS)
                    .collect(),
                },
            )
        } else {
            let rate = facts.sender_rate.unwrap_or(SenderRate {
                max_messages: 0,
                window: std::time::Duration::ZERO,
            });
            (
                LoopTrip::SenderRate,
                Finding {
                    rule: "sender_rate".to_owned(),
                    source: "From".to_owned(),
                    value: format!(
                        "at least {} earlier messages from this sender within {} s (limit {})",
                        recent,
                        rate.window.as_secs(),
                        rate.max_messages
                    ),
                },
            )
        };
        loop_trip = Some(trip);
        classification.evidence.insert(0, finding.clone());
        classification.rule = finding.rule;
        classification.class = MailClass::Loop;
    }
    let class = classification.class;
    let action = policies
        .and_then(|Json(p)| p.get(class.as_str()).and_then(|a| Action::parse(a)))
        .unwrap_or(class.default_action());

    Ok(Placement {
        conversation_id,
        threaded,
        rule,
        thread_evidence: evidence,
        classification,
        action,
        loop_trip,
        subject_key: key,
        participants: participants(parsed),
        thread_index: triage.thread_index.as_ref().map(|t| t.root.clone()),
    })
}

fn header_of(rule: ThreadRule) -> &'static str {
    match rule {
        ThreadRule::InReplyTo => "In-Reply-To",
        ThreadRule::References => "References",
        ThreadRule::ReportOriginal => "returned headers",
        ThreadRule::ThreadIndex => "Thread-Index",
        ThreadRule::New => "",
    }
}

/// What [`place`]'s one query reads.
#[derive(sqlx::FromRow)]
struct Lookup {
    candidates: Json<Vec<Candidate>>,
    outlook: Option<Json<OutlookMatch>>,
    seen_before: bool,
    recent: i64,
    policies: Option<Json<HashMap<String, String>>>,
    fresh_id: i64,
}

#[derive(Debug, serde::Deserialize)]
struct Candidate {
    id: String,
    kind: String,
    message: i64,
    conversation: i64,
    same_subject: bool,
    participant: bool,
}

#[derive(Debug, serde::Deserialize)]
struct OutlookMatch {
    conversation: i64,
    same_topic: Option<bool>,
    participant: bool,
}

/// A stored message without a class yet (stored before schema version 12), for the backfill.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unclassified {
    pub id: i64,
    pub pilot_id: i64,
    pub mailbox: String,
    pub queue: String,
    pub raw: Vec<u8>,
    pub sha256: Vec<u8>,
    pub identity: Option<Vec<u8>>,
    pub subject: Option<String>,
}

/// Up to `limit` messages without a class, oldest first, after row `after`.
pub async fn unclassified(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<Unclassified>, StoreError> {
    Ok(sqlx::query_as(
        "select m.id, m.pilot_id, p.mailbox, w.queue, m.raw, m.sha256, m.identity, m.subject \
         from messages m join pilots p on p.id = m.pilot_id \
         join work_items w on w.message_id = m.id \
         where m.class is null and m.id > $1 order by m.id limit $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Gives the stored message `row` the conversation and class of `placement` (the backfill),
/// with its conversation's side, in one statement guarded by `class is null`: returns false
/// (and writes nothing) when the row has a class already (a concurrent backfill). The work
/// item is left as it is: mail already routed or handled is not taken back.
pub async fn backfill_message(
    conn: &mut PgConnection,
    row: &Unclassified,
    placement: &Placement,
) -> Result<bool, StoreError> {
    let done: Option<i64> = sqlx::query_scalar(
        "with m as (update messages set conversation_id = $2, thread_rule = $3, \
             thread_evidence = $4, class = $5, class_evidence = $6 \
             where id = $1 and class is null returning id, pilot_id), \
         own as (select lower(mailbox) as mailbox from pilots where id = $11), \
         created as (insert into conversations (id, pilot_id, queue, subject_key, subject, \
             participants, thread_index, first_message_id, last_message_id) \
             select $2, m.pilot_id, $7, $8, left($12, 300), \
                 array(select p from unnest($9::text[]) p where p <> (select mailbox from own) limit 100), \
                 $10, m.id, m.id from m where $13), \
         continued as (update conversations c set last_message_id = greatest(c.last_message_id, m.id), \
             message_count = c.message_count + 1, updated_at = now(), \
             thread_index = coalesce(c.thread_index, $10), \
             participants = array(select p from (select distinct p from unnest(c.participants || $9::text[]) p) d \
                 where p <> (select mailbox from own) order by p limit 100) \
             from m where c.id = $2 and not $13) \
         select id from m",
    )
    .bind(row.id)
    .bind(placement.conversation_id)
    .bind(placement.rule.as_str())
    .bind(Json(&placement.thread_evidence))
    .bind(placement.class().as_str())
    .bind(Json(&placement.classification))
    .bind(&row.queue)
    .bind(placement.subject_key())
    .bind(placement.participants())
    .bind(placement.thread_index())
    .bind(row.pilot_id)
    .bind(row.subject.as_deref())
    .bind(placement.threaded == Threaded::Created)
    .fetch_optional(conn)
    .await?;
    Ok(done.is_some())
}

/// Sets what a pilot does with a class of mail (`None`: back to the default).
pub async fn set_class_policy(
    conn: &mut PgConnection,
    pilot_id: i64,
    class: MailClass,
    action: Option<Action>,
) -> Result<(), StoreError> {
    match action {
        Some(action) => {
            sqlx::query(
                "insert into pilot_class_policies (pilot_id, class, action) values ($1, $2, $3) \
                 on conflict (pilot_id, class) do update set action = excluded.action, updated_at = now()",
            )
            .bind(pilot_id)
            .bind(class.as_str())
            .bind(action.as_str())
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query("delete from pilot_class_policies where pilot_id = $1 and class = $2")
                .bind(pilot_id)
                .bind(class.as_str())
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

/// Every class with the action a pilot takes on it, and whether that is the default.
pub async fn class_policies(
    conn: &mut PgConnection,
    pilot_id: i64,
) -> Result<Vec<(MailClass, Action, bool)>, StoreError> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("select class, action from pilot_class_policies where pilot_id = $1")
            .bind(pilot_id)
            .fetch_all(conn)
            .await?;
    Ok(MailClass::ALL
        .into_iter()
        .map(|class| {
            match rows
                .iter()
                .find(|(c, _)| c == class.as_str())
                .and_then(|(_, a)| Action::parse(a))
            {
                Some(action) => (class, action, false),
                None => (class, class.default_action(), true),
            }
        })
        .collect())
}

/// What `ccmail work explain` shows for one work item.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Explanation {
    pub work_item_id: i64,
    pub status: String,
    pub held_reason: Option<String>,
    pub queue: String,
    pub flags: Vec<String>,
    pub message_row: i64,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub conversation_id: Option<i64>,
    pub conversation_subject: Option<String>,
    pub conversation_messages: Option<i32>,
    pub conversation_started_at: Option<DateTime<Utc>>,
    pub last_completed_by: Option<String>,
    pub thread_rule: Option<String>,
    pub thread_evidence: Option<Value>,
    pub class: Option<String>,
    pub class_evidence: Option<Value>,
}

/// The explanation of work item `id`, or `None` when there is no such item.
pub async fn explain(conn: &mut PgConnection, id: i64) -> Result<Option<Explanation>, StoreError> {
    Ok(sqlx::query_as(
        "select w.id as work_item_id, w.status, w.held_reason, w.queue, w.flags, \
         m.id as message_row, m.message_id, m.subject, c.id as conversation_id, \
         c.subject as conversation_subject, c.message_count as conversation_messages, \
         c.created_at as conversation_started_at, c.last_completed_by, \
         m.thread_rule, m.thread_evidence, m.class, m.class_evidence \
         from work_items w join messages m on m.id = w.message_id \
         left join conversations c on c.id = m.conversation_id where w.id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}
