//! The end-to-end ingest through a real POP3 server that no one on this project wrote: a
//! private Dovecot whose `oauth2` passdb validates the XOAUTH2 bearer token by introspection at
//! the Entra simulator, plus a USER/PASS pilot on the same server. Pilots, the sealed app
//! secret and the sealed password go through `ccmail::store` and the supervisor's
//! `resolve_pilot`, as in production.

use std::time::Duration;

use anyhow::Context;
use ccmail::store::PilotAuth;
use ccmail_lab::sim::mailgen::{Kind, MailGen};
use secrecy::SecretString;

use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::pipeline::{
    DOMAIN, Ledger, PipelineWorld, eight_bit_header_message, small_limits,
};

#[tokio::test]
async fn xoauth2_and_user_pass_pilots_drain_a_real_dovecot_exactly_once() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let dovecot = Dovecot::start(DovecotOptions {
        introspection_url: world.entra.introspection_url(),
        oauth_domain_format: true,
    })
    .await?;
    let ca_path = world.dir().join("dovecot-ca.pem");
    std::fs::write(&ca_path, dovecot.ca_pem())?;
    let addr = dovecot.pop3s_addr();
    let point_at_dovecot = |p: &mut ccmail::store::NewPilot| {
        p.host = addr.ip().to_string();
        p.port = addr.port();
        p.ca_bundle = Some(ca_path.display().to_string());
    };

    // XOAUTH2: the mailbox must exist in Dovecot (any password); the token opens it.
    let oauth_box = format!("support@{DOMAIN}");
    dovecot.add_user(&oauth_box, "unused-for-oauth")?;
    let oauth_row = world.add_pilot("support", point_at_dovecot).await?;

    let password = "Sales-Pass-42";
    let pass_box = format!("sales@{DOMAIN}");
    dovecot.add_user(&pass_box, password)?;
    let pass_row = world
        .add_pilot("sales", |p| {
            point_at_dovecot(p);
            p.auth = PilotAuth::UserPass {
                username: pass_box.clone(),
                credential: String::new(),
            };
            let owner = p.credential_owner().expect("a USER/PASS pilot");
            let sealed = world
                .key
                .seal(&SecretString::from(password.to_owned()), &owner);
            p.auth = PilotAuth::UserPass {
                username: pass_box.clone(),
                credential: sealed.expect("sealing a password"),
            };
        })
        .await?;

    let mut mails = MailGen::new(0xd0ec07);
    let mut ledger = Ledger::default();
    for mailbox in [&oauth_box, &pass_box] {
        for i in 0..12 {
            let raw = mails.message(mailbox, Kind::ALL[i % Kind::ALL.len()]);
            ledger.note(&raw)?;
            dovecot.deliver(mailbox, &raw)?;
        }
        let odd = [
            mails.malformed(mailbox),
            eight_bit_header_message(mailbox, &format!("it-8bit-{mailbox}")),
        ];
        for raw in odd {
            ledger.note(&raw)?;
            dovecot.deliver(mailbox, &raw)?;
        }
    }

    let limits = small_limits();
    let pilots = [oauth_row.id, pass_row.id];
    for row in [&oauth_row, &pass_row] {
        let pilot = world.resolve(row).await?;
        let report = tokio::time::timeout(Duration::from_secs(60), world.poll(&pilot, &limits))
            .await
            .context("a poll of Dovecot took over 60 s")?
            .with_context(|| format!("polling {} at Dovecot:\n{}", row.mailbox, dovecot.log()))?;
        assert_eq!((report.stored, report.deleted), (14, 14), "{report:?}");
    }
    assert!(
        world.entra.introspections() >= 1,
        "Dovecot validated the token at the introspection endpoint"
    );
    assert_eq!(world.entra.token_requests(), 1);
    for mailbox in [&oauth_box, &pass_box] {
        assert!(
            dovecot.maildir_messages(mailbox)?.is_empty(),
            "{mailbox} is empty on the server"
        );
    }
    assert_eq!(world.work_items().await?, 28);
    ledger
        .check(&world.heads(&pilots).await?)
        .assert_exactly_once()?;
    for m in world.stored(&pilots).await? {
        assert!(!m.headers_only && m.work_items == 1, "{m:?}");
        assert!(
            ledger.is_delivered_digest(&m.sha256),
            "stored bytes differ from what was delivered to Dovecot: {m:?}"
        );
    }

    // A second poll finds empty mailboxes and adds nothing.
    for row in [&oauth_row, &pass_row] {
        let pilot = world.resolve(row).await?;
        let report = world.poll(&pilot, &limits).await?;
        assert_eq!((report.on_server, report.stored), (0, 0), "{report:?}");
    }
    assert_eq!(world.work_items().await?, 28);
    dovecot.stop();
    world.finish().await
}
