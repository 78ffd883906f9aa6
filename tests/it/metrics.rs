//! The worker's observability surface, end to end: `ccmail run` (the real binary) polls
//! simulated Exchange Online mailboxes with a fresh database, and its HTTP listener is checked
//! from outside: `/metrics` has a sample for every declared metric and for every metric name
//! that a dashboard panel, a dashboard variable or an alert rule mentions; `/healthz`,
//! `/readyz` and `ccmail healthcheck` answer; logs are JSON with the pilot id on the poll span
//! and without secrets. [`WorkerRun`] is shared with the Prometheus tests.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use secrecy::{ExposeSecret, SecretString};
use tokio::process::Command;

use ccmail::secrets::MasterKey;
use ccmail::store;
use ccmail::telemetry;
use ccmail_lab::testdb::TestDb;
use ccmail_lab::world::World;

use crate::support::child::CcmailChild;
use crate::support::ports::ClosedPort;

use crate::support::wait::wait_for;

/// The repository root (dashboards/, RUNBOOK.md).
pub(crate) fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const DOMAIN: &str = "contoso.test";
/// Size limit of the pilots; the oversize message exceeds it.
const SIZE_LIMIT: usize = 256 * 1024;

/// A `ccmail run` process over the lab's [`World`] and a fresh database, with two working
/// pilots (support, sales) and one whose server refuses connections (broken).
pub(crate) struct WorkerRun {
    pub db: TestDb,
    pub world: World,
    pub http: SocketAddr,
    pub config_path: PathBuf,
    pub mailboxes: Vec<String>,
    pub client_secret: String,
    pub master_key: SecretString,
    pub broken_pilot: i64,
    /// The worker; kept after it exited, for its log.
    child: Option<CcmailChild>,
    /// Whether the worker exited successfully, once [`WorkerRun::stop_worker`] reaped it.
    stopped: Option<bool>,
    _closed: ClosedPort,
}

impl WorkerRun {
    /// Sets everything up, delivers `messages` mails (plus one malformed and one oversize) to
    /// each working mailbox, starts the worker and waits for `/healthz`.
    pub async fn start(messages: usize) -> anyhow::Result<WorkerRun> {
        let db = TestDb::new().await?;
        let mut world = World::builder()
            .ca_name("ccmail metrics test CA")
            .tenant("0c5b2f3e-1d2a-4b8e-9f00-5a1e2d3c4b5a")
            .domain(DOMAIN)
            .client_id("6f1e3a2b-0000-4c1d-8e2f-ops000000001")
            .client_secret(&format!("ops~{:032x}", fastrand::u128(..)))
            .seed(42)
            .start()
            .await?;
        let client_secret = world.client_secret.clone();
        let key = MasterKey::generate();
        let mut conn = db.pool().acquire().await?;
        let mut app = store::NewApp::new("contoso", &world.tenant, &world.client_id, String::new());
        app.authority = world.entra.authority();
        app.seal_credential(&key, &SecretString::from(client_secret.clone()))?;
        app.secret_expires_at = Some(chrono::Utc::now() + chrono::Duration::days(20));
        let app = store::insert_app(&mut conn, &app).await?;

        let mut mailboxes = Vec::new();
        let closed = ClosedPort::new()?;
        let mut broken_pilot = 0;
        for queue in ["support", "sales", "broken"] {
            let mailbox = format!("{queue}@{DOMAIN}");
            let mut pilot = world.new_pilot(queue, &mailbox, app.id);
            if queue == "broken" {
                pilot.port = closed.port();
            }
            pilot.max_message_bytes = SIZE_LIMIT as u64;
            let row = store::insert_pilot(&mut conn, &pilot).await?;
            if queue == "broken" {
                broken_pilot = row.id;
                continue;
            }
            world.pop.add_mailbox(&mailbox);
            for _ in 0..messages {
                let raw = world.mails.mixed(&mailbox);
                world.pop.deliver(&mailbox, raw);
            }
            let raw = world.mails.malformed(&mailbox);
            world.pop.deliver(&mailbox, raw);
            let raw = world.mails.oversize(&mailbox, SIZE_LIMIT + 4096);
            world.pop.deliver(&mailbox, raw);
            mailboxes.push(mailbox);
        }
        drop(conn);

        // The worker binds a port of its own choosing and logs it; see `CcmailChild::listen_addr`.
        let config_path = world.dir().join("ccmail.toml");
        std::fs::write(&config_path, world.worker_toml(db.url(), "127.0.0.1:0"))?;
        let master_key = key.to_base64();
        let child = CcmailChild::spawn(
            crate::support::child::ccmail(),
            world.dir(),
            "worker",
            &["--config", &config_path.display().to_string(), "run"],
            // DATABASE_URL would override the settings' database: set it to the same one.
            &[
                ("CCMAIL_MASTER_KEY", master_key.expose_secret()),
                ("DATABASE_URL", db.url()),
            ],
        )?;
        let http = child.listen_addr(Duration::from_secs(30)).await?;
        let run = WorkerRun {
            db,
            world,
            http,
            config_path,
            mailboxes,
            client_secret,
            master_key,
            broken_pilot,
            child: Some(child),
            stopped: None,
            _closed: closed,
        };
        let addr = run.http.to_string();
        wait_for("the worker's /healthz", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move {
                telemetry::probe(&addr, "/healthz", Duration::from_secs(2))
                    .await
                    .ok()
            }
        })
        .await?;
        Ok(run)
    }

    /// Runs `ccmail --config … healthcheck ARGS`; returns (success, stdout + stderr).
    pub async fn healthcheck(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_ccmail"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("healthcheck")
            .args(args)
            .env_remove("DATABASE_URL")
            // The settings say port 0 (the worker chose its own): name the bound address.
            .env("CCMAIL_HTTP_LISTEN", self.http.to_string())
            .stdin(Stdio::null())
            .output()
            .await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// Delivers `n` more ordinary messages to each working mailbox.
    pub fn deliver_more(&mut self, n: usize) {
        for mailbox in &self.mailboxes {
            for _ in 0..n {
                let raw = self.world.mails.mixed(mailbox);
                self.world.pop.deliver(mailbox, raw);
            }
        }
    }

    /// Waits until only the oversize messages (left on the server by design) remain.
    pub async fn wait_drained(&self) -> anyhow::Result<()> {
        wait_for(
            "the mailboxes to be drained",
            Duration::from_secs(60),
            || async {
                let left: usize = self
                    .mailboxes
                    .iter()
                    .map(|m| self.world.pop.messages(m).len())
                    .sum();
                (left <= self.mailboxes.len()).then_some(())
            },
        )
        .await
    }

    /// The `/metrics` text.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        Ok(telemetry::probe(&self.http.to_string(), "/metrics", Duration::from_secs(5)).await?)
    }

    /// Waits until a scrape satisfies `ok` (the database gauges refresh every second).
    pub async fn scrape_until(
        &self,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        wait_for(what, Duration::from_secs(45), || async {
            self.scrape().await.ok().filter(|t| ok(t))
        })
        .await
    }

    /// The worker's log so far.
    pub fn log(&self) -> anyhow::Result<String> {
        Ok(self
            .child
            .as_ref()
            .map(CcmailChild::output)
            .unwrap_or_default())
    }

    /// SIGTERM, then waits for the worker to exit (SIGKILL after 30 s); returns its success.
    pub async fn stop_worker(&mut self) -> anyhow::Result<bool> {
        if let Some(success) = self.stopped {
            return Ok(success);
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(true);
        };
        child.terminate()?;
        // On a timeout the child is killed (by PID) when the run is dropped.
        let success = child.wait(Duration::from_secs(30)).await?.success();
        self.stopped = Some(success);
        Ok(success)
    }

    /// Stops the worker and the simulators and drops the database.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        let clean = self.stop_worker().await?;
        self.world.stop(Duration::from_secs(30)).await?;
        self.db.drop_db().await?;
        ensure!(clean, "`ccmail run` exited with a failure after SIGTERM");
        Ok(())
    }
}

/// Names of the samples in a Prometheus text exposition.
pub(crate) fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every PromQL expression of the dashboard (panel targets and, for `label_values(sel, label)`
/// variables, the selector), each with where it comes from.
pub(crate) fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let path = repo_path("dashboards/ccmail.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut out = Vec::new();
    for panel in dash["panels"]
        .as_array()
        .context("dashboard has no panels")?
    {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"]
            .as_array()
            .context("panel without targets")?
        {
            let expr = target["expr"].as_str().context("target without expr")?;
            out.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    for var in dash["templating"]["list"]
        .as_array()
        .context("no variables")?
    {
        if var["type"] == "query" {
            let q = var["query"]["query"]
                .as_str()
                .context("variable without query")?;
            let selector = q
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(','))
                .map(|(sel, _)| sel.trim())
                .with_context(|| {
                    format!("variable query {q:?} is not label_values(selector, label)")
                })?;
            out.push((format!("variable {}", var["name"]), selector.to_owned()));
        }
    }
    ensure!(!out.is_empty());
    Ok(out)
}

/// Every `expr:` of the alert rules, with its alert name. Expressions must be one line.
pub(crate) fn rule_queries() -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_path("dashboards/alerts.yml"))?;
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(expr) = line.strip_prefix("expr:") {
            let expr = expr.trim();
            ensure!(
                !expr.is_empty() && !expr.starts_with('|') && !expr.starts_with('>'),
                "alert {alert}: keep expr on one line so the consistency test reads it"
            );
            out.push((format!("alert {alert}"), expr.to_owned()));
        }
    }
    ensure!(!out.is_empty(), "no rules found in dashboards/alerts.yml");
    Ok(out)
}

/// The metric names a PromQL expression selects: identifiers outside label matchers
/// (`{…}`), ranges (`[…]`), strings and grouping lists (`by (…)`, `on (…)` …), that are
/// neither function names nor keywords. Grafana variables (`$x`) are skipped.
pub(crate) fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        // Aggregation operators, which may take `by (…)` before their parenthesis.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_to = |from: usize, close: char| {
        let mut j = from;
        let mut quote: Option<char> = None;
        while j < chars.len() {
            let c = chars[j];
            match quote {
                Some(_) if c == '\\' => j += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == close => return j + 1,
                None => {}
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_to(i + 1, c);
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number, possibly with an exponent (1e3) or a duration suffix.
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut k = i;
            while k < chars.len() && chars[k].is_whitespace() {
                k += 1;
            }
            let call = chars.get(k) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if call {
                    i = skip_to(k + 1, ')');
                }
            } else if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Metrics that Prometheus itself makes, allowed in dashboards and rules.
const PROMETHEUS_METRICS: &[&str] = &["up"];

#[test]
fn metric_names_are_extracted_from_promql() {
    let e = r#"histogram_quantile(0.95, sum by (le, command) (rate(ccmail_pop3_command_duration_seconds_bucket{pilot=~"$pilot",queue=~"a{b}"}[$__rate_interval])))"#;
    assert_eq!(
        metric_names(e),
        vec!["ccmail_pop3_command_duration_seconds_bucket"]
    );
    let e = r#"(ccmail_token_expiry_timestamp_seconds - time() < 600) and on (app) (ccmail_token_refresh_consecutive_failures > 0)"#;
    assert_eq!(
        metric_names(e),
        vec![
            "ccmail_token_expiry_timestamp_seconds",
            "ccmail_token_refresh_consecutive_failures"
        ]
    );
    let e = r#"(up{job="ccmail"} == 0) or absent(up{job="ccmail"}) - 30 * 86400 + 1e3"#;
    assert_eq!(metric_names(e), vec!["up", "up"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_metric_is_in_the_running_workers_output() -> anyhow::Result<()> {
    let mut run = WorkerRun::start(8).await?;

    // Series of every loaded pilot exist at once, even before its first poll completes, and
    // the pilot whose server refuses connections shows up as down with counted errors.
    let broken = run.broken_pilot.to_string();
    let up_broken = format!("ccmail_pilot_up{{pilot=\"{broken}\",queue=\"broken\"}} 0\n");
    run.scrape_until("series of the broken pilot", |t| t.contains(&up_broken))
        .await?;
    run.wait_drained().await?;
    let text = run
        .scrape_until("the work-item gauges and a failed poll of the broken pilot", |t| {
            t.contains("ccmail_work_items{queue=\"support\",status=\"queued\"} 10\n")
                && t.contains("ccmail_work_items{queue=\"sales\",status=\"queued\"} 10\n")
                && !t.contains(&format!(
                    "ccmail_ingest_errors_total{{pilot=\"{broken}\",queue=\"broken\",reason=\"pop3\"}} 0\n"
                ))
        })
        .await?;

    // Every declared metric has samples.
    let names = sample_names(&text);
    for def in telemetry::ALL {
        let present = match def.kind {
            telemetry::Kind::Histogram => names.contains(&format!("{}_bucket", def.name)),
            _ => names.contains(def.name),
        };
        ensure!(
            present,
            "{} is declared but has no sample in /metrics:\n{text}",
            def.name
        );
    }
    // Every name the dashboard and the alert rules use exists in the real output.
    let mut checked = 0;
    for (origin, expr) in dashboard_queries()?.into_iter().chain(rule_queries()?) {
        let used = metric_names(&expr);
        ensure!(!used.is_empty(), "{origin}: no metric in {expr:?}");
        for name in used {
            ensure!(
                names.contains(&name) || PROMETHEUS_METRICS.contains(&name.as_str()),
                "{origin} uses {name}, which the worker does not export (expr {expr:?})"
            );
            checked += 1;
        }
    }
    ensure!(checked > 20, "only {checked} metric references found");

    // Values that the run must have produced.
    let sample = |prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let support = |m: &str| {
        text.lines()
            .filter(|l| l.starts_with(m) && l.contains("queue=\"support\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    // 8 ordinary + 1 malformed + 1 oversize (stored as headers) = 10 work items per queue.
    ensure!(support("ccmail_messages_ingested_total") == 10.0, "{text}");
    ensure!(support("ccmail_oversize_messages_total") == 1.0, "{text}");
    ensure!(support("ccmail_ingested_bytes_total") > 10_000.0, "{text}");
    ensure!(sample("ccmail_token_requests_total{app=\"contoso\",result=\"success\"}") >= Some(1.0));
    let expiry = sample("ccmail_client_secret_expiry_timestamp_seconds{app=\"contoso\"}")
        .context("no client secret expiry")?;
    let in_days = (expiry - chrono::Utc::now().timestamp() as f64) / 86400.0;
    ensure!(
        (19.9..20.1).contains(&in_days),
        "secret expires in {in_days} days"
    );
    ensure!(
        support("ccmail_pilot_up") == 1.0,
        "the support pilot is not up:\n{text}"
    );
    ensure!(
        text.contains(&format!(
            "ccmail_pilot_up{{pilot=\"{broken}\",queue=\"broken\"}} 0\n"
        )),
        "the broken pilot is not down:\n{text}"
    );

    // Health endpoints and the healthcheck command.
    let ready = telemetry::probe(&run.http.to_string(), "/readyz", Duration::from_secs(5)).await?;
    ensure!(ready == "ready", "{ready}");
    let (ok, out) = run.healthcheck(&[]).await?;
    ensure!(ok && out.trim() == "ok", "healthcheck: {out}");
    let (ok, out) = run.healthcheck(&["--ready"]).await?;
    ensure!(ok && out.trim() == "ready", "healthcheck --ready: {out}");

    // Logs: JSON lines; inside a poll the span carries the pilot id; no secret anywhere.
    let stopped_cleanly = run.stop_worker().await?;
    ensure!(stopped_cleanly, "the worker failed on SIGTERM");
    let (ok, out) = run.healthcheck(&[]).await?;
    ensure!(
        !ok && out.contains("cannot connect"),
        "healthcheck of a stopped worker: {out}"
    );
    let log = run.log()?;
    let mut in_poll_span = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("log line is not JSON: {line}"))?;
        if v["span"]["name"] == "poll" {
            ensure!(
                v["span"]["pilot"].is_number(),
                "poll span without pilot: {line}"
            );
            in_poll_span += 1;
        }
    }
    ensure!(in_poll_span > 0, "no log line inside a poll span:\n{log}");
    ensure!(
        !log.contains(&run.client_secret),
        "the client secret is in the log"
    );
    ensure!(
        !log.contains(run.master_key.expose_secret()),
        "the master key is in the log"
    );
    run.finish().await
}

#[tokio::test]
async fn readyz_reports_missing_migrations_and_healthz_stays_up() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(telemetry::serve(
        listener,
        ccmail::ingest::observe::readiness(db.db().clone()),
        telemetry::HttpLimits::default(),
        stop.clone(),
    ));

    let ready = telemetry::probe(&addr, "/readyz", Duration::from_secs(5)).await?;
    ensure!(ready == "ready", "{ready}");
    sqlx::query("delete from _sqlx_migrations")
        .execute(db.pool())
        .await?;
    match telemetry::probe(&addr, "/readyz", Duration::from_secs(5)).await {
        Err(telemetry::ProbeError::Status {
            status: 503, body, ..
        }) => ensure!(
            body.contains("migrations not applied: 1") && body.contains("ccmail migrate"),
            "{body}"
        ),
        other => bail!("expected 503 for missing migrations, got {other:?}"),
    }
    ensure!(telemetry::probe(&addr, "/healthz", Duration::from_secs(5)).await? == "ok");
    let text = telemetry::probe(&addr, "/metrics", Duration::from_secs(5)).await?;
    ensure!(text.contains("# TYPE ccmail_poll_duration_seconds histogram"));
    ensure!(text.contains(&format!(
        "ccmail_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));

    stop.cancel();
    server.await??;
    db.drop_db().await?;
    Ok(())
}
