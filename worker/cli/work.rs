//! Handlers of `ccmail work …` (the operator's view of the queues and the supervisor's steps,
//! without the API) and `ccmail api-key …`.
//!
//! Steps taken here are written to the item's events with the actor `cli:<os user>`.

use anyhow::bail;
use clap::{Subcommand, ValueEnum};

use crate::api;
use crate::config::Config;
use crate::model::WorkItemStatus;
use crate::ops::admin::{key_values, or_dash, table};
use crate::store::{self, Role, lifecycle};

use super::init_logs;

/// A status as typed on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum StatusArg {
    Queued,
    Offered,
    Accepted,
    Done,
    Cancelled,
    Held,
}

impl From<StatusArg> for WorkItemStatus {
    fn from(s: StatusArg) -> WorkItemStatus {
        match s {
            StatusArg::Queued => WorkItemStatus::Queued,
            StatusArg::Offered => WorkItemStatus::Offered,
            StatusArg::Accepted => WorkItemStatus::Accepted,
            StatusArg::Done => WorkItemStatus::Done,
            StatusArg::Cancelled => WorkItemStatus::Cancelled,
            StatusArg::Held => WorkItemStatus::Held,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum WorkCommand {
    /// Work items, newest first.
    List {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only items in this state.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Items to show at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One work item with its message (text shown, HTML and attachments listed).
    Show { id: i64 },
    /// Put an item back in its queue: release a held item, reopen a done or cancelled one,
    /// take an offered or accepted one from its agent. Offers are counted afresh.
    Requeue {
        id: i64,
        /// Why, for the item's events.
        #[arg(long)]
        reason: Option<String>,
        /// Act only if the item is still in this state.
        #[arg(long, value_enum)]
        expect: Option<StatusArg>,
    },
    /// Cancel an item (spam, merged, withdrawn…); the mail stays stored.
    Cancel {
        id: i64,
        /// Why: spam, merged, withdrawn, duplicate or other words.
        #[arg(long)]
        reason: String,
        #[arg(long, value_enum)]
        expect: Option<StatusArg>,
    },
    /// An item's history: every transition, who made it and why.
    Events { id: i64 },
    /// Conversations and automatic mail: explain, backfill, class policy.
    #[command(flatten)]
    Triage(super::explain::TriageCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum RoleArg {
    Agent,
    Supervisor,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Agent => Role::Agent,
            RoleArg::Supervisor => Role::Supervisor,
            RoleArg::Admin => Role::Admin,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum ApiKeyCommand {
    /// Create a key for the agents' API; it is printed once and stored only as a hash.
    Create {
        /// A unique name: the actor of the key's steps in every event (never reused).
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// A queue the key may act on (repeat for several). Required for agents; supervisors
        /// and admins without it cover every queue.
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
    },
    /// Every key, live and revoked (never the key itself).
    List,
    /// Revoke a key at once: its next request is refused with 401.
    Revoke { name: String },
}

async fn open(config: &Config) -> anyhow::Result<store::Db> {
    let pool = store::connect(&config.database.url, 2).await?;
    store::migrate(&pool).await?;
    Ok(pool)
}

/// `cli:<os user>`, the actor of the steps taken here.
fn actor() -> String {
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{}", nix::unistd::Uid::current()));
    format!("cli:{name}")
}

fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    or_dash(t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC")))
}

pub(crate) async fn work_command(config: &Config, cmd: WorkCommand) -> anyhow::Result<()> {
    init_logs(config, true);
    let db = open(config).await?;
    let mut conn = db.acquire().await?;
    match cmd {
        WorkCommand::Triage(triage) => {
            drop(conn);
            super::explain::triage_command(config, &db, triage).await
        }
        WorkCommand::List {
            queue,
            status,
            limit,
            json,
        } => {
            if limit == 0 || limit > 10_000 {
                bail!("--limit must be between 1 and 10000");
            }
            let filter = store::WorkFilter {
                queues: queue.into_iter().collect(),
                status: status.map(Into::into),
                before_id: None,
                limit,
            };
            let rows = store::list_work_items(&mut conn, &filter).await?;
            if json {
                let items: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(s, v)| {
                        serde_json::json!({
                            "id": s.id, "queue": s.queue, "status": s.status.as_str(),
                            "agent": s.agent, "offers": s.offers,
                            "flags": s.flags.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
                            "subject": v.subject, "enqueued_at": s.enqueued_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(());
            }
            let table_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|(s, v)| {
                    vec![
                        s.id.to_string(),
                        s.queue.clone(),
                        s.status.to_string(),
                        or_dash(s.agent.as_deref()),
                        s.offers.to_string(),
                        s.enqueued_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        crate::display::truncate(v.subject.as_deref().unwrap_or("-"), 60)
                            .into_owned(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "QUEUE",
                        "STATUS",
                        "AGENT",
                        "OFFERS",
                        "ENQUEUED (UTC)",
                        "SUBJECT"
                    ],
                    &table_rows
                )
            );
            Ok(())
        }
        WorkCommand::Show { id } => {
            let Some(d) = store::work_item_detail(&mut conn, id).await? else {
                bail!("no work item {id}; `ccmail work list` shows the items");
            };
            let s = &d.state;
            let addrs = |list: &[crate::model::Address]| {
                list.iter()
                    .map(|a| match (&a.name, &a.email) {
                        (Some(n), Some(e)) => format!("{n} <{e}>"),
                        (None, Some(e)) => e.clone(),
                        (Some(n), None) => n.clone(),
                        (None, None) => "-".to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            print!(
                "{}",
                key_values(&[
                    ("id", s.id.to_string()),
                    ("queue", s.queue.clone()),
                    ("status", s.status.to_string()),
                    ("agent", or_dash(s.agent.as_deref())),
                    ("offers", s.offers.to_string()),
                    ("enqueued", when(Some(s.enqueued_at))),
                    ("offer expires", when(s.offer_expires_at)),
                    ("lease expires", when(s.lease_expires_at)),
                    ("done", when(s.done_at)),
                    ("done by", or_dash(s.done_by.as_deref())),
                    ("held because", or_dash(s.held_reason.as_deref())),
                    ("cancelled because", or_dash(s.cancel_reason.as_deref())),
                    (
                        "flags",
                        or_dash((!s.flags.is_empty()).then(|| {
                            s.flags
                                .iter()
                                .map(|f| f.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        }),),
                    ),
                    ("from", addrs(&d.from)),
                    ("to", addrs(&d.to)),
                    ("subject", or_dash(d.subject.as_deref())),
                    ("date", when(d.sent_at)),
                    ("size", format!("{} bytes", d.size)),
                    (
                        "html",
                        if d.html_sanitized.is_some() {
                            "yes (sanitised; see the API)".to_owned()
                        } else {
                            "-".to_owned()
                        },
                    ),
                    (
                        "attachments",
                        or_dash((!d.attachments.is_empty()).then(|| {
                            d.attachments
                                .iter()
                                .map(|a| {
                                    format!(
                                        "{}: {} ({}, {} bytes)",
                                        a.ordinal,
                                        a.filename.as_deref().unwrap_or("(no name)"),
                                        a.content_type,
                                        a.size
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("; ")
                        })),
                    ),
                    (
                        "defects",
                        or_dash((!d.defects.is_empty()).then(|| d.defects.join("; ")))
                    ),
                ])
            );
            if let Some(text) = &d.text {
                println!();
                println!("{}", crate::display::escape_lines(text));
            }
            Ok(())
        }
        WorkCommand::Requeue { id, reason, expect } => {
            let outcome = lifecycle::override_step(
                &mut conn,
                id,
                &actor(),
                lifecycle::Override::Requeue,
                reason.as_deref(),
                expect.map(Into::into),
            )
            .await?;
            report(id, "requeue", outcome)
        }
        WorkCommand::Cancel { id, reason, expect } => {
            if reason.trim().is_empty() || reason.len() > 1000 {
                bail!("--reason must be 1 to 1000 bytes, e.g. spam, merged or withdrawn");
            }
            let outcome = lifecycle::override_step(
                &mut conn,
                id,
                &actor(),
                lifecycle::Override::Cancel { reason: &reason },
                None,
                expect.map(Into::into),
            )
            .await?;
            report(id, "cancel", outcome)
        }
        WorkCommand::Events { id } => {
            if store::work_item_state(&mut conn, id).await?.is_none() {
                bail!("no work item {id}; `ccmail work list` shows the items");
            }
            let events = lifecycle::events(&mut conn, id).await?;
            let rows: Vec<Vec<String>> = events
                .iter()
                .map(|e| {
                    vec![
                        e.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                        e.actor.clone(),
                        e.action.clone(),
                        format!("{} → {}", or_dash(e.from_status.as_deref()), e.to_status),
                        match (&e.from_queue, &e.to_queue) {
                            (Some(f), Some(t)) => format!("{f} → {t}"),
                            _ => "-".to_owned(),
                        },
                        or_dash(e.reason.as_deref()),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["AT (UTC)", "ACTOR", "ACTION", "STATUS", "QUEUE", "REASON"],
                    &rows
                )
            );
            Ok(())
        }
    }
}

fn report(id: i64, step: &str, outcome: lifecycle::Step) -> anyhow::Result<()> {
    match outcome {
        lifecycle::Step::Done(moved) => {
            println!(
                "work item {id}: {} → {} (queue {})",
                moved.from, moved.to, moved.queue
            );
            Ok(())
        }
        lifecycle::Step::Refused(current) => bail!(
            "work item {id} is {} (queue {}): cannot {step} it{}",
            current.status,
            current.queue,
            if current.status.is_final() || current.status == WorkItemStatus::Queued {
                ""
            } else {
                "; check --expect"
            }
        ),
        lifecycle::Step::NotFound => {
            bail!("no work item {id}; `ccmail work list` shows the items")
        }
    }
}

pub(crate) async fn api_key_command(config: &Config, cmd: ApiKeyCommand) -> anyhow::Result<()> {
    init_logs(config, true);
    let db = open(config).await?;
    let mut conn = db.acquire().await?;
    match cmd {
        ApiKeyCommand::Create { name, role, queues } => {
            let role = Role::from(role);
            if role == Role::Agent && queues.is_empty() {
                bail!("an agent key must name its queues: --queue QUEUE (repeat for several)");
            }
            for q in &queues {
                if !store::queue_exists(&mut conn, q).await? {
                    bail!(
                        "no queue {q:?}: no pilot feeds it and no item is in it (`ccmail pilot list` shows the queues)"
                    );
                }
            }
            let new = api::generate_key().map_err(anyhow::Error::msg)?;
            let key =
                store::insert_api_key(&mut conn, &name, role, &queues, &new.hash, &new.prefix)
                    .await?;
            eprintln!(
                "API key {:?} created ({}, {}). It is shown once; store it now:",
                key.name,
                key.role,
                if key.queues.is_empty() {
                    "every queue".to_owned()
                } else {
                    format!("queues {}", key.queues.join(", "))
                }
            );
            println!("{}", new.key);
            Ok(())
        }
        ApiKeyCommand::List => {
            let keys = store::list_api_keys(&mut conn).await?;
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        k.name.clone(),
                        k.role.to_string(),
                        if k.queues.is_empty() {
                            "(all)".to_owned()
                        } else {
                            k.queues.join(",")
                        },
                        format!("{}…", k.key_prefix),
                        when(Some(k.created_at)),
                        when(k.last_used_at),
                        when(k.revoked_at),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NAME",
                        "ROLE",
                        "QUEUES",
                        "KEY",
                        "CREATED",
                        "LAST USED",
                        "REVOKED"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        ApiKeyCommand::Revoke { name } => {
            if store::revoke_api_key(&mut conn, &name).await? {
                println!("API key {name:?} revoked");
                Ok(())
            } else {
                bail!("no live API key named {name:?}; `ccmail api-key list` shows the keys")
            }
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum UserCommand {
    /// Create a console account; the password is read from standard input (one line, at least
    /// 12 characters) and stored only as its argon2id hash.
    Add {
        /// The login name (also the actor `user:<name>` in events).
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// A queue the user works (repeat for several). Required for agents.
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
        /// Read the password from standard input (the only way: never on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
}

pub(crate) async fn user_command(config: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    init_logs(config, true);
    let UserCommand::Add {
        name,
        role,
        queues,
        password_stdin: _,
    } = cmd;
    let role = Role::from(role);
    if role == Role::Agent && queues.is_empty() {
        bail!("an agent must work at least one queue: --queue QUEUE (repeat for several)");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.chars().count() < 12 {
        bail!("the password must be at least 12 characters (read one line from standard input)");
    }
    if password.len() > 1024 {
        bail!("the password must be at most 1024 bytes");
    }
    let db = open(config).await?;
    let mut conn = db.acquire().await?;
    for q in &queues {
        if !store::queue_exists(&mut conn, q).await? {
            bail!(
                "no queue {q:?}: no pilot feeds it and no item is in it (`ccmail pilot list` shows the queues)"
            );
        }
    }
    let hash = crate::web::session::hash_password(password)
        .await
        .map_err(anyhow::Error::msg)?;
    let user = store::users::insert_user(&mut conn, &name, role, &queues, &hash).await?;
    store::users::audit(
        &mut conn,
        &actor(),
        "user.add",
        Some(&format!("user:{}", user.name)),
        &serde_json::json!({"role": user.role.as_str(), "queues": user.queues}),
    )
    .await?;
    println!("user {:?} created ({})", user.name, user.role);
    Ok(())
}
