//! The real `ccmail` binary as a child process: `ccmail run` against a fresh database, a pilot
//! on the POP3 simulator and the Entra simulator's token endpoint (trusted through
//! `oauth.extra_ca_file`), stopped with SIGTERM; and `ccmail-lab demo` run twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use ccmail_lab::sim::mailgen::{self, Kind, MailGen};
use ccmail_lab::sim::pop3::Fault;
use secrecy::ExposeSecret;

use crate::support::child::CcmailChild;
use crate::support::pipeline::{Ledger, PipelineWorld};

/// The worker's shutdown grace in the test settings.
const GRACE: Duration = Duration::from_secs(10);
/// How long the worker may take to drain the test mailbox.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// Waits until `done` holds while the child keeps running; fails after `deadline`.
async fn wait_while_running(
    child: &mut CcmailChild,
    what: &str,
    deadline: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let child = &*child;
    crate::support::wait::wait_until(
        what,
        deadline,
        || {
            let ready = child.assert_running().map(|()| done());
            std::future::ready(ready)
        },
        || format!("ccmail's output:\n{}", child.output()),
    )
    .await
}

#[tokio::test]
async fn run_drains_a_mailbox_and_on_sigterm_finishes_the_message_quits_and_exits_zero()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0x5167);
    for i in 0..6 {
        let raw = mails.message(&row.mailbox, Kind::ALL[i % Kind::ALL.len()]);
        ledger.deliver(&world.pop, &row.mailbox, raw)?;
    }

    let config = world.dir().join("ccmail.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nreload_interval_secs = 1\nlease_ttl_secs = 3\nshutdown_grace_secs = {}\n\
             initial_backoff_secs = 1\nmax_backoff_secs = 2\npoll_jitter = 0.0\n\n\
             [oauth]\nextra_ca_file = {:?}\nallowed_authorities = [{:?}]\n\n\
             [pop3]\nallowed_xoauth2_hosts = [\"127.0.0.1\"]\n\n\
             [log]\nformat = \"text\"\nlevel = \"info\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            GRACE.as_secs(),
            world.ca_path().display().to_string(),
            world.entra.authority()
        ),
    )?;
    let key = world.key.to_base64();
    let config_arg = config.display().to_string();
    let mut child = CcmailChild::spawn(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config_arg, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
        ],
    )?;

    let pop = world.pop.clone();
    let mailbox = row.mailbox.clone();
    wait_while_running(&mut child, "draining the mailbox", DRAIN_DEADLINE, || {
        pop.messages(&mailbox).is_empty()
    })
    .await?;
    assert_eq!(world.work_items().await?, 6);

    // Now make downloads slow, deliver more, and stop the worker once a download is under way:
    // it must finish the message in hand, store it, DELE and QUIT, then exit.
    world.pop.clear_commands();
    world.pop.set_fault(Some(Fault::Slow {
        chunk: 512,
        delay: Duration::from_millis(5),
    }));
    for i in 0..20 {
        let raw = mails.message(&row.mailbox, Kind::ALL[i % Kind::ALL.len()]);
        ledger.deliver(&world.pop, &row.mailbox, raw)?;
    }
    wait_while_running(&mut child, "a download under way", DRAIN_DEADLINE, || {
        pop.commands().iter().any(|c| c.starts_with("RETR "))
    })
    .await?;
    child.terminate()?;
    let status = child.wait(GRACE + Duration::from_secs(5)).await?;
    let output = child.output();
    assert!(status.success(), "exit status {status}; output:\n{output}");
    assert_eq!(
        world.pop.commands().last().map(String::as_str),
        Some("QUIT"),
        "the last word to the server is QUIT; output:\n{output}"
    );
    assert!(
        !output.contains(&world.client_secret),
        "the client secret reached the logs"
    );

    // Nothing lost, nothing doubled: what is still on the server is exactly what is not stored.
    let left: HashSet<String> = world
        .pop
        .messages(&row.mailbox)
        .iter()
        .filter_map(|(_, raw)| mailgen::marker(raw))
        .collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for head in world.heads(&[row.id]).await? {
        let marker = mailgen::marker(&head).context("a stored message without its marker")?;
        *counts.entry(marker).or_default() += 1;
    }
    assert!(counts.values().all(|c| *c == 1), "duplicates: {counts:?}");
    assert!(
        counts.keys().all(|m| !left.contains(m)),
        "a stored message was left on the server"
    );
    assert_eq!(
        counts.len() + left.len(),
        ledger.len(),
        "a message was lost"
    );
    assert_eq!(world.work_items().await? as usize, counts.len());
    world.finish().await
}
