//! The README's walk-through, run as a new admin would run it: the blocks of "Adding a mailbox
//! pilot" marked `walkthrough` (settings and master key, `ccmail migrate`, the app, the pilot
//! with `--check`), in order, with the real `ccmail` binary in an empty directory and an empty
//! environment, against the lab's Entra ID and POP3 simulators (an authority and a POP3 server
//! of one's own, with a private CA) and a database that does not exist yet. Only the
//! placeholders are replaced; the admin's own inputs are the secret's Value in `secret.txt`
//! and the private CA's bundle. A negative control runs the same steps without
//! `ccmail migrate` and must fail.

use std::path::Path;
use std::process::Output;

use tokio::process::Command;

use anyhow::{Context, bail, ensure};
use ccmail_lab::testdb::admin_url;
use ccmail_lab::world::World;
use sqlx::Connection;

/// One fenced block of the walk-through: its language (`sh` or `toml`) and its text.
struct Block {
    lang: String,
    text: String,
}

/// The blocks marked `walkthrough` in the README's "Adding a mailbox pilot" section.
fn walkthrough_blocks(readme: &str) -> anyhow::Result<Vec<Block>> {
    let start = readme
        .find("## Adding a mailbox pilot")
        .context("the README has no \"Adding a mailbox pilot\" section")?;
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut blocks = Vec::new();
    let mut open: Option<(String, usize, Vec<String>)> = None;
    for line in section[..end].lines() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```")
                    && info.split_whitespace().any(|w| w == "walkthrough")
                {
                    let lang = info
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    open = Some((lang, line.len() - trimmed.len(), Vec::new()));
                }
            }
            Some((lang, indent, lines)) => {
                if trimmed.starts_with("```") {
                    blocks.push(Block {
                        lang: std::mem::take(lang),
                        text: lines.join("\n") + "\n",
                    });
                    open = None;
                } else {
                    lines.push(line.get(*indent..).unwrap_or(trimmed).to_owned());
                }
            }
        }
    }
    ensure!(open.is_none(), "an unclosed walkthrough block");
    Ok(blocks)
}

/// The walk-through's placeholders and example hosts, and what they stand for here.
fn substitutions(
    world: &World,
    dir: &Path,
    database_url: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let etc = dir.join("etc/ccmail/");
    Ok(vec![
        (
            "/etc/ccmail/".to_owned(),
            etc.to_str().context("a UTF-8 path")?.to_owned(),
        ),
        (
            "postgres://ccmail@db.example.com:5432/ccmail".to_owned(),
            database_url.to_owned(),
        ),
        ("<tenant id>".to_owned(), world.tenant.clone()),
        ("<client id>".to_owned(), world.client_id.clone()),
        (
            "https://login.example.net".to_owned(),
            world.entra.authority(),
        ),
        ("pop.example.net".to_owned(), "127.0.0.1".to_owned()),
        (
            "--port 995".to_owned(),
            format!("--port {}", world.pop.tls_addr().port()),
        ),
        (
            "support@contoso.com".to_owned(),
            format!("support@{}", world.domain),
        ),
    ])
}

/// `database` (a name not in use) on the test server.
fn database_url(database: &str) -> anyhow::Result<String> {
    let admin = admin_url();
    let (server, _) = admin
        .rsplit_once('/')
        .context("a database URL with a name")?;
    Ok(format!("{server}/{database}"))
}

async fn drop_database(database: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&admin_url()).await?;
    sqlx::query(&format!(
        "drop database if exists {} with (force)",
        ccmail::store::quote_ident(database)
    ))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Runs `script` with `sh -e` in `dir`, with only `ccmail` and the system's tools on `PATH`.
/// (Asynchronous: the simulators answer on this test's runtime.)
async fn sh(dir: &Path, script: &str) -> anyhow::Result<Output> {
    let ccmail = Path::new(env!("CARGO_BIN_EXE_ccmail"));
    let bin = ccmail.parent().context("the binary's directory")?;
    Ok(Command::new("sh")
        .arg("-e")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("HOME", dir)
        .kill_on_drop(true)
        .output()
        .await?)
}

/// Runs the walk-through (without the lines `skip` names) in a fresh directory against a new
/// database; the output of the last step and of `pilot list --json`.
async fn run_walkthrough(world: &World, skip: Option<&str>) -> anyhow::Result<(Output, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))?;
    let blocks = walkthrough_blocks(&readme)?;
    let langs: Vec<&str> = blocks.iter().map(|b| b.lang.as_str()).collect();
    ensure!(
        langs == ["sh", "toml", "sh", "sh"],
        "the walk-through's marked blocks changed shape: {langs:?}"
    );
    let dir = tempfile::tempdir()?;
    let database = format!("ccmail_walkthrough_{:08x}", fastrand::u32(..));
    let url = database_url(&database)?;
    let subs = substitutions(world, dir.path(), &url)?;
    let apply = |text: &str| {
        subs.iter()
            .fold(text.to_owned(), |t, (from, to)| t.replace(from, to))
    };
    // The admin's own inputs: the secret's Value, the private CA's bundle.
    std::fs::write(dir.path().join("secret.txt"), &world.client_secret)?;
    let result = async {
        let mut last = None;
        for (i, block) in blocks.iter().enumerate() {
            let text = apply(&block.text);
            ensure!(
                !text.contains("example.")
                    && !text.contains("<tenant")
                    && !text.contains("<client"),
                "a placeholder was not replaced in block {i}:\n{text}"
            );
            match block.lang.as_str() {
                "toml" => {
                    let config = dir.path().join("config/ccmail.toml");
                    let mut settings = std::fs::read_to_string(&config)
                        .context("the settings file the earlier steps wrote")?;
                    settings.push('\n');
                    settings.push_str(&text);
                    std::fs::write(&config, settings)?;
                }
                _ => {
                    if i == 0 {
                        std::fs::create_dir_all(dir.path().join("etc/ccmail"))?;
                        std::fs::write(
                            dir.path().join("etc/ccmail/private-ca.pem"),
                            world.ca.cert_pem(),
                        )?;
                    }
                    let script: String = text
                        .lines()
                        .filter(|l| skip.is_none_or(|s| l.trim() != s))
                        .map(|l| format!("{l}\n"))
                        .collect();
                    let out = sh(dir.path(), &script).await?;
                    if !out.status.success() {
                        return Ok((out, String::new()));
                    }
                    last = Some(out);
                }
            }
        }
        let listed = sh(dir.path(), "ccmail pilot list --json").await?;
        ensure!(
            listed.status.success(),
            "pilot list failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
        Ok((
            last.context("no sh block ran")?,
            String::from_utf8(listed.stdout)?,
        ))
    }
    .await;
    drop_database(&database).await?;
    result
}

#[tokio::test]
async fn the_readme_walkthrough_reaches_a_passing_pilot_check() -> anyhow::Result<()> {
    let world = World::builder().mailboxes(["support"]).start().await?;
    let (check, listed) = run_walkthrough(&world, None).await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    ensure!(check.status.success(), "pilot add --check failed:\n{text}");
    ensure!(!text.contains("FAIL"), "{text}");
    let pilots: serde_json::Value = serde_json::from_str(&listed)?;
    let mailbox = format!("support@{}", world.domain);
    let found = pilots
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["mailbox"] == mailbox.as_str()));
    ensure!(found, "the pilot was not saved: {listed}");
    ensure!(world.pop.logins() >= 1, "the check never logged in");
    world.stop(std::time::Duration::from_secs(30)).await
}

#[tokio::test]
async fn without_ccmail_migrate_the_walkthrough_fails() -> anyhow::Result<()> {
    let world = World::builder().mailboxes(["support"]).start().await?;
    let (out, _) = run_walkthrough(&world, Some("ccmail migrate")).await?;
    if out.status.success() {
        bail!(
            "the walk-through passed without ccmail migrate: the step is not needed, or the test does not run it"
        );
    }
    let text = String::from_utf8_lossy(&out.stderr);
    ensure!(
        text.contains("ccmail_walkthrough_") && text.contains("does not exist"),
        "it failed, but not for want of the database: {text}"
    );
    world.stop(std::time::Duration::from_secs(30)).await
}
