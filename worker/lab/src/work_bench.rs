//! `ccmail-lab bench-work`: how fast agents can take work, in a fresh database.
//!
//! Two measurements on the same machine, one after the other:
//! - **store**: `concurrency` tasks claim, accept and complete items through the store
//!   functions (each step its own statement, as the API runs them), counting full
//!   claim + complete cycles per second;
//! - **HTTP**: `agents` clients, each with its own key, run claim → accept → complete through
//!   the real API listener on 127.0.0.1 (in this process), counting cycles per second and
//!   the latency of each claim request (p50, p99).
//!
//! Figures only, never a pass/fail: absolute numbers depend on the machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use ccmail::api::{self, ApiSettings, ApiState};
use ccmail::store::{self, Role, lifecycle};

use crate::testdb::TestDb;
use crate::workload;

/// `ccmail-lab bench-work` options.
#[derive(Args, Debug, Clone)]
pub struct WorkBenchArgs {
    /// Items handled by each of the two measurements.
    #[arg(long, default_value_t = 5000)]
    pub items: i64,
    /// Concurrent tasks of the store measurement.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Concurrent agents of the HTTP measurement.
    #[arg(long, default_value_t = 16)]
    pub agents: usize,
}

/// What one measurement found.
#[derive(Debug, Clone)]
pub struct Rate {
    pub cycles: usize,
    pub elapsed: Duration,
    /// Claim latencies, sorted (HTTP only).
    pub claim_latencies: Vec<Duration>,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        if self.claim_latencies.is_empty() {
            return None;
        }
        let i = ((self.claim_latencies.len() - 1) as f64 * p).round() as usize;
        self.claim_latencies.get(i).copied()
    }
}

/// Runs both measurements and prints them.
pub async fn run(args: &WorkBenchArgs) -> anyhow::Result<()> {
    let store_rate = store_cycles(args).await?;
    println!(
        "store: {} claim+accept+complete cycles by {} tasks in {:.2} s: {:.0} cycles/s",
        store_rate.cycles,
        args.concurrency,
        store_rate.elapsed.as_secs_f64(),
        store_rate.per_sec()
    );
    let http = http_cycles(args).await?;
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    println!(
        "http:  {} claim → accept → complete cycles by {} agents in {:.2} s: {:.0} cycles/s; claim latency p50 {:.1} ms, p99 {:.1} ms",
        http.cycles,
        args.agents,
        http.elapsed.as_secs_f64(),
        http.per_sec(),
        ms(http.percentile(0.50)),
        ms(http.percentile(0.99)),
    );
    Ok(())
}

/// The store measurement.
pub async fn store_cycles(args: &WorkBenchArgs) -> anyhow::Result<Rate> {
    let db = TestDb::new().await?;
    let pilot = workload::pilot(db.db(), "bench").await?;
    workload::items(db.db(), pilot, "bench", args.items).await?;
    let settings = ApiSettings::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let (pool, settings) = (db.db().clone(), settings.clone());
        tasks.push(tokio::spawn(async move {
            let agent = format!("bench-{worker}");
            let mut cycles = 0usize;
            loop {
                let mut conn = pool.acquire().await?;
                let claims =
                    lifecycle::claim(&mut conn, "bench", &agent, 1, settings.offer_ttl).await?;
                let Some(c) = claims.first() else {
                    return anyhow::Ok(cycles);
                };
                let accepted =
                    lifecycle::accept(&mut conn, c.id, &c.claim_token, &agent, settings.lease_ttl)
                        .await?;
                let completed =
                    lifecycle::complete(&mut conn, c.id, &c.claim_token, &agent, None).await?;
                if !matches!(
                    (accepted, completed),
                    (lifecycle::Step::Done(_), lifecycle::Step::Done(_))
                ) {
                    bail!("item {} was refused a step it held the claim for", c.id);
                }
                cycles += 1;
            }
        }));
    }
    let mut cycles = 0;
    for t in tasks {
        cycles += t.await.context("a store task failed")??;
    }
    let elapsed = started.elapsed();
    db.drop_db().await?;
    Ok(Rate {
        cycles,
        elapsed,
        claim_latencies: Vec::new(),
    })
}

/// The HTTP measurement.
pub async fn http_cycles(args: &WorkBenchArgs) -> anyhow::Result<Rate> {
    let db = TestDb::new().await?;
    let pilot = workload::pilot(db.db(), "bench").await?;
    workload::items(db.db(), pilot, "bench", args.items).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/api/v1", listener.local_addr()?);
    let stop = CancellationToken::new();
    let state = ApiState::new(db.db().clone(), ApiSettings::default(), stop.clone());
    let server = tokio::spawn(api::serve(
        listener,
        state,
        api::limits(&ccmail::config::ApiConfig::default()),
        stop.clone(),
    ));
    let mut keys = Vec::new();
    {
        let mut conn = db.db().acquire().await?;
        for i in 0..args.agents {
            let new = api::generate_key().map_err(anyhow::Error::msg)?;
            store::insert_api_key(
                &mut conn,
                &format!("agent-{i}"),
                Role::Agent,
                &["bench".to_owned()],
                &new.hash,
                &new.prefix,
            )
            .await?;
            keys.push(new.key);
        }
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.agents)
        .build()?;
    let base = Arc::new(base);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for key in keys {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let post = async |path: &str, body: Value| -> anyhow::Result<Value> {
                let resp = client
                    .post(format!("{base}{path}"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await?;
                let status = resp.status();
                let body: Value = resp.json().await?;
                if !status.is_success() {
                    bail!("{path}: {status} {body}");
                }
                Ok(body)
            };
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                let claimed = post("/queues/bench/claim", json!({})).await?;
                latencies.push(t.elapsed());
                let Some(item) = claimed["items"].as_array().and_then(|a| a.first()) else {
                    return anyhow::Ok(latencies);
                };
                let id = item["id"].as_i64().context("claim without an id")?;
                let token = json!({"claim_token": item["claim_token"]});
                post(&format!("/work-items/{id}/accept"), token.clone()).await?;
                post(&format!("/work-items/{id}/complete"), token).await?;
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.context("an agent task failed")??);
    }
    let elapsed = started.elapsed();
    // The last claim of each agent found nothing: it is a claim, but not a cycle.
    let cycles = latencies.len().saturating_sub(args.agents);
    latencies.sort_unstable();
    stop.cancel();
    server.await??;
    db.drop_db().await?;
    Ok(Rate {
        cycles,
        elapsed,
        claim_latencies: latencies,
    })
}
