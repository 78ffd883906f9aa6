//! `ccmail work explain`, `ccmail work backfill` and `ccmail work policy`: why a work item
//! is in its conversation and class, the one-time classification of mail stored before
//! conversations existed, and what a pilot does with each class of mail.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::ingest::{classify, parse};
use crate::model::triage::{Action, MailClass};
use crate::ops::admin::{key_values, or_dash, table};
use crate::store;

/// The conversation and class commands of `ccmail work`.
#[derive(Subcommand)]
pub enum TriageCommand {
    /// Show a work item's conversation, the threading rule and its evidence, the class and
    /// its evidence.
    Explain(ExplainArgs),
    /// Give messages stored before conversations existed a conversation and a class (safe
    /// to run again; work items keep their state).
    Backfill(BackfillArgs),
    /// Show or set what a pilot does with each class of mail (route, route_flagged, hold).
    Policy(PolicyArgs),
}

#[derive(Args)]
pub struct ExplainArgs {
    /// Work item id.
    pub id: i64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BackfillArgs {
    /// Messages read per round trip.
    #[arg(long, default_value_t = 200)]
    pub batch: i64,
}

#[derive(Args)]
pub struct PolicyArgs {
    /// Pilot id or mailbox.
    #[arg(long)]
    pub pilot: String,
    /// Class to change: human, auto_reply, auto_generated, bounce, receipt, loop.
    #[arg(long, requires = "change")]
    pub class: Option<String>,
    /// New action for the class: route, route_flagged, hold.
    #[arg(long, group = "change")]
    pub action: Option<String>,
    /// Put the class back to its default action.
    #[arg(long, group = "change")]
    pub default: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs one of the commands (the `work` handler has set up logging and opened `db`).
pub async fn triage_command(
    config: &Config,
    db: &store::Db,
    command: TriageCommand,
) -> anyhow::Result<()> {
    match command {
        TriageCommand::Explain(args) => explain(db, args).await,
        TriageCommand::Backfill(args) => backfill(config, db, args).await,
        TriageCommand::Policy(args) => policy(db, args).await,
    }
}

async fn explain(db: &store::Db, args: ExplainArgs) -> anyhow::Result<()> {
    let mut conn = db.acquire().await?;
    let Some(e) = store::explain(&mut conn, args.id).await? else {
        bail!("no work item {}; `ccmail work list` shows them", args.id);
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    let pretty = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .and_then(|v| serde_json::to_string_pretty(v).ok())
            .unwrap_or_else(|| "-".to_owned())
    };
    print!(
        "{}",
        key_values(&[
            ("work item", e.work_item_id.to_string()),
            ("status", e.status.clone()),
            ("held reason", or_dash(e.held_reason.clone())),
            ("queue", e.queue.clone()),
            ("flags", e.flags.join(", ")),
            ("message", e.message_row.to_string()),
            ("message-id", or_dash(e.message_id.clone())),
            ("subject", or_dash(e.subject.clone())),
            ("conversation", or_dash(e.conversation_id)),
            (
                "conversation subject",
                or_dash(e.conversation_subject.clone())
            ),
            ("conversation messages", or_dash(e.conversation_messages)),
            ("conversation started", or_dash(e.conversation_started_at)),
            ("last completed by", or_dash(e.last_completed_by.clone())),
            (
                "threading rule",
                e.thread_rule.clone().unwrap_or_else(|| {
                    "- (stored before conversations: run `ccmail work backfill`)".to_owned()
                }),
            ),
            ("class", or_dash(e.class.clone())),
        ])
    );
    // JSON escapes control characters itself, so sender-written evidence is safe to print.
    println!("threading evidence:\n{}", pretty(&e.thread_evidence));
    println!("class evidence:\n{}", pretty(&e.class_evidence));
    Ok(())
}

async fn backfill(config: &Config, db: &store::Db, args: BackfillArgs) -> anyhow::Result<()> {
    let limits = parse::ParseLimits::from(&config.parse);
    let (mut after, mut done, mut skipped) = (0i64, 0u64, 0u64);
    loop {
        let rows = {
            let mut conn = db.acquire().await?;
            store::unclassified(&mut conn, after, args.batch.max(1)).await?
        };
        let Some(last) = rows.last() else { break };
        after = last.id;
        for row in rows {
            let parsed = parse::parse_bounded(bytes::Bytes::from(row.raw.clone()), &limits).await;
            let triage = classify::classify(&row.raw, &parsed, &row.mailbox);
            let sha256: [u8; 32] = row
                .sha256
                .as_slice()
                .try_into()
                .context("a stored sha256 is not 32 bytes")?;
            let identity: Option<[u8; 32]> =
                row.identity.as_deref().and_then(|i| i.try_into().ok());
            // One transaction per message: threading reads what the earlier ones wrote.
            let mut tx = db.begin().await?;
            let placement = store::place(
                &mut tx,
                &store::Facts {
                    pilot_id: row.pilot_id,
                    parsed: &parsed,
                    sha256: &sha256,
                    identity: identity.as_ref(),
                    triage: Some(&triage),
                    // A rate over stored history says nothing about a loop now.
                    sender_rate: None,
                    stored_row: Some(row.id),
                },
            )
            .await?;
            if store::backfill_message(&mut tx, &row, &placement).await? {
                done += 1;
            } else {
                skipped += 1;
            }
            tx.commit().await?;
        }
    }
    println!("backfilled {done} messages ({skipped} done meanwhile by another run)");
    Ok(())
}

fn class_word(word: &str) -> anyhow::Result<MailClass> {
    MailClass::parse(word).with_context(|| {
        format!(
            "unknown class {word:?}: one of {}",
            MailClass::ALL.map(MailClass::as_str).join(", ")
        )
    })
}

async fn policy(db: &store::Db, args: PolicyArgs) -> anyhow::Result<()> {
    let mut conn = db.acquire().await?;
    let pilot = super::admin::find_pilot(&mut conn, &args.pilot).await?;
    if let Some(class) = &args.class {
        let class = class_word(class)?;
        let action = match (&args.action, args.default) {
            (Some(word), _) => Some(Action::parse(word).with_context(|| {
                format!(
                    "unknown action {word:?}: one of {}",
                    Action::ALL.map(Action::as_str).join(", ")
                )
            })?),
            (None, true) => None,
            (None, false) => bail!("name the change: --action ACTION or --default"),
        };
        store::set_class_policy(&mut conn, pilot.id, class, action).await?;
    }
    let rows = store::class_policies(&mut conn, pilot.id).await?;
    if args.json {
        let value: Vec<_> = rows
            .iter()
            .map(|(c, a, d)| serde_json::json!({"class": c, "action": a, "default": d}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(c, a, d)| {
            vec![
                c.as_str().to_owned(),
                a.as_str().to_owned(),
                if *d { "default" } else { "set" }.to_owned(),
            ]
        })
        .collect();
    print!("{}", table(&["CLASS", "ACTION", ""], &rows));
    Ok(())
}
