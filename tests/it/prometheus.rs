//! The dashboards and alert rules against real Prometheus tools (Debian package
//! `prometheus`): `promtool check rules` and `promtool test rules` (a unit test per alert),
//! the structure every alert needs (for, severity, summary, description, a runbook link to an
//! existing RUNBOOK.md section), and a private Prometheus on 127.0.0.1 that scrapes a running
//! worker while it ingests mail, after which every dashboard query returns data and every
//! rule evaluates without error.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::process::Command;

use crate::metrics::{WorkerRun, dashboard_queries, repo_path};
use crate::support::ports::free_port;
use crate::support::wait::wait_for;

/// The binary's path, or an error that says how to install it. Never a silent skip.
fn require(binary: &str) -> anyhow::Result<String> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(binary))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Ok(p.display().to_string()),
        None => bail!(
            "{binary} is not installed; install it with \
             `apt-get install -y --no-install-recommends prometheus` (with a policy-rc.d that \
             exits 101 so the system service does not start; .ci/run does this)"
        ),
    }
}

#[tokio::test]
async fn alert_rules_pass_promtool_check_and_unit_tests() -> anyhow::Result<()> {
    let promtool = require("promtool")?;
    let dir = repo_path("dashboards");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// GitHub's anchor for a Markdown heading: lowercase, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_for_severity_texts_and_a_runbook_section() -> anyhow::Result<()> {
    let rules = std::fs::read_to_string(repo_path("dashboards/alerts.yml"))?;
    let runbook = std::fs::read_to_string(repo_path("RUNBOOK.md"))?;
    let anchors: Vec<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(anchor)
        .collect();
    let tests = std::fs::read_to_string(repo_path("dashboards/alerts.test.yml"))?;
    let blocks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    ensure!(
        blocks.len() >= 7,
        "expected at least 7 alerts, found {}",
        blocks.len()
    );
    for block in blocks {
        let name = block.lines().next().unwrap_or("").trim();
        for key in [
            "expr:",
            "for:",
            "severity:",
            "summary:",
            "description:",
            "runbook_url:",
        ] {
            ensure!(block.contains(key), "alert {name} has no {key}");
        }
        let url = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("runbook_url:"))
            .map(|u| u.trim().trim_matches('"'))
            .unwrap_or("");
        let section = url.strip_prefix("RUNBOOK.md#").with_context(|| {
            format!("alert {name}: runbook_url {url:?} is not RUNBOOK.md#section")
        })?;
        ensure!(
            anchors.iter().any(|a| a == section),
            "alert {name}: RUNBOOK.md has no section #{section} (sections: {anchors:?})"
        );
        ensure!(
            tests.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - exp_labels"
            )),
            "alert {name} has no promtool test case in which it fires"
        );
    }
    Ok(())
}

/// A private Prometheus process; killed when dropped.
struct Prometheus {
    child: tokio::process::Child,
    addr: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> anyhow::Result<Prometheus> {
        let binary = require("prometheus")?;
        let dir = tempfile::Builder::new().prefix("ccmail-prom-").tempdir()?;
        let rules = repo_path("dashboards/alerts.yml");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {:?}\n\
                 scrape_configs:\n  - job_name: ccmail\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display().to_string()
            ),
        )?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting prometheus")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let p = Prometheus {
            child,
            addr,
            http,
            _dir: dir,
        };
        wait_for(
            "Prometheus to be ready",
            Duration::from_secs(60),
            || async {
                let r = p
                    .http
                    .get(format!("http://{}/-/ready", p.addr))
                    .send()
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await?;
        Ok(p)
    }

    /// An instant query; the `data.result` array.
    async fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = self
            .http
            .post(format!("http://{}/api/v1/query", self.addr))
            .form(&[("query", promql)])
            .send()
            .await?
            .json()
            .await?;
        ensure!(v["status"] == "success", "query {promql:?} failed: {v}");
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// Grafana's variables, as a person looking at "All" pilots and queues over a short range.
fn as_grafana_would_send(expr: &str) -> String {
    expr.replace("$__rate_interval", "20s")
        .replace("$pilot", ".*")
        .replace("$queue", ".*")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_worker_and_every_dashboard_query_returns_data()
-> anyhow::Result<()> {
    // Fail before any set-up when the package is missing.
    require("prometheus")?;
    let mut run = WorkerRun::start(10).await?;
    let prom = Prometheus::start(&run.http.to_string()).await?;
    let result = async {
        // Mail keeps arriving while Prometheus scrapes, so rates are computed over real traffic.
        for _ in 0..5 {
            run.deliver_more(3);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        run.wait_drained().await?;
        wait_for(
            "25 scrapes of the worker",
            Duration::from_secs(90),
            || async {
                let r = prom
                    .query("count_over_time(up{job=\"ccmail\"}[1m]) >= 25")
                    .await
                    .ok()?;
                (!r.is_empty()).then_some(())
            },
        )
        .await?;
        // The database gauges refresh every second: wait until a scrape saw the backlog.
        wait_for(
            "work-item gauges in Prometheus",
            Duration::from_secs(45),
            || async {
                let r = prom
                    .query("ccmail_work_items{queue=\"support\",status=\"queued\"} > 10")
                    .await
                    .ok()?;
                (!r.is_empty()).then_some(())
            },
        )
        .await?;
        let up = prom.query("up{job=\"ccmail\"} == 1").await?;
        ensure!(up.len() == 1, "the worker is not up in Prometheus: {up:?}");

        let mut empty = Vec::new();
        let queries = dashboard_queries()?;
        for (origin, expr) in &queries {
            let promql = as_grafana_would_send(expr);
            if prom.query(&promql).await?.is_empty() {
                empty.push(format!("{origin}: {promql}"));
            }
        }
        ensure!(
            empty.is_empty(),
            "dashboard queries without data:\n{}",
            empty.join("\n")
        );
        let rate = prom
            .query("sum(rate(ccmail_messages_ingested_total[30s])) > 0")
            .await?;
        ensure!(
            !rate.is_empty(),
            "no ingest rate although mail arrived while scraping"
        );

        // Every rule evaluates cleanly against the real series.
        let rules: serde_json::Value = prom
            .http
            .get(format!("http://{}/api/v1/rules", prom.addr))
            .send()
            .await?
            .json()
            .await?;
        let mut rule_count = 0;
        for group in rules["data"]["groups"]
            .as_array()
            .context("no rule groups")?
        {
            for rule in group["rules"].as_array().context("no rules")? {
                ensure!(rule["health"] == "ok", "rule unhealthy: {rule}");
                rule_count += 1;
            }
        }
        ensure!(rule_count >= 7, "Prometheus loaded only {rule_count} rules");
        Ok::<_, anyhow::Error>(queries.len())
    }
    .await;
    prom.stop().await?;
    let checked = result?;
    ensure!(checked >= 15, "only {checked} dashboard queries");
    run.finish().await
}
