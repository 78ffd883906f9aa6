//! Live reload against a running worker: `ccmail run` as a child process, pilots added,
//! disabled and updated with the `ccmail pilot` CLI while it runs. Every step waits on a
//! condition with a deadline (work items in the database, maildrops drained, the worker's own
//! log lines), never on a fixed sleep.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use ccmail::secrets::MasterKey;
use ccmail::store;
use ccmail_lab::child::SpawnOptions;
use ccmail_lab::sim::mailgen::MailGen;
use ccmail_lab::sim::pop3::Pop3Sim;
use ccmail_lab::testdb::TestDb;
use ccmail_lab::world::World;

use crate::support::child::CcmailChild;

const TENANT: &str = "8f2c1a9e-1111-4222-8333-944455556666";
const DOMAIN: &str = "contoso.example";
const CLIENT: &str = "0a1b2c3d-aaaa-4bbb-8ccc-ddddeeeeffff";
const SECRET: &str = "live~reload~secret";
const DEADLINE: Duration = Duration::from_secs(30);

/// `ccmail run` as a child ([`CcmailChild`]: killed by PID on drop if the test did not stop
/// it), with nothing of the test's environment but `env`.
struct Worker {
    child: CcmailChild,
}

impl Worker {
    fn start(env: &[(String, String)], dir: &Path) -> Worker {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let child = CcmailChild::spawn_with(
            crate::support::child::ccmail(),
            dir,
            "worker",
            &["run"],
            &env,
            SpawnOptions {
                clear_env: true,
                ..SpawnOptions::default()
            },
        )
        .unwrap();
        Worker { child }
    }

    fn logged(&self, needles: &[&str]) -> bool {
        self.child
            .output()
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
    }

    fn log_text(&self) -> String {
        self.child.output()
    }

    /// SIGTERM, then wait for the exit with a deadline.
    async fn stop(mut self) -> std::process::ExitStatus {
        self.child.terminate().unwrap();
        match self.child.wait(DEADLINE).await {
            Ok(status) => status,
            Err(e) => panic!("worker ignored SIGTERM: {e}"),
        }
    }
}

/// Polls `condition` until it holds or `DEADLINE` passes.
async fn wait_until<F, Fut>(what: &str, worker: &Worker, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = crate::support::wait::wait_until(
        what,
        DEADLINE,
        || {
            let fut = condition();
            async move { Ok(fut.await) }
        },
        String::new,
    )
    .await;
    if let Err(e) = waited {
        panic!("{e}\nworker log:\n{}", worker.log_text());
    }
}

async fn work_items(db: &TestDb, queue: &str) -> i64 {
    sqlx::query_scalar("select count(*) from work_items where queue = $1")
        .bind(queue)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

fn cli(env: &[(String, String)], dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ccmail"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ccmail {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilots_added_disabled_and_updated_while_run_is_running() {
    let db = TestDb::new().await.unwrap();
    // The lab's World, whose POP3 simulator is server A; a second one (B) trusts the same
    // Entra simulator, so a pilot can be moved to another port and a stopped one observed alone.
    let world = World::builder()
        .ca_name("live reload CA")
        .tenant(TENANT)
        .domain(DOMAIN)
        .client_id(CLIENT)
        .client_secret(SECRET)
        .start()
        .await
        .unwrap();
    let (entra, pop_a) = (&world.entra, &world.pop);
    let pop_b = Pop3Sim::start(&world.ca, entra.clone()).await.unwrap();
    let dir = world.dir();
    let ca_path: PathBuf = world.ca_path();
    let ca_arg = ca_path.display().to_string();

    let key = MasterKey::generate();
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.url().to_owned()),
        (
            "CCMAIL_MASTER_KEY".into(),
            key.to_base64().expose_secret().to_owned(),
        ),
        ("CCMAIL_OAUTH_EXTRA_CA_FILE".into(), ca_arg.clone()),
        ("CCMAIL_OAUTH_ALLOWED_AUTHORITIES".into(), entra.authority()),
        (
            "CCMAIL_POP3_ALLOWED_XOAUTH2_HOSTS".into(),
            "127.0.0.1".into(),
        ),
        ("CCMAIL_WORKER_RELOAD_INTERVAL_SECS".into(), "1".into()),
        ("CCMAIL_WORKER_POLL_JITTER".into(), "0.0".into()),
        ("CCMAIL_WORKER_SHUTDOWN_GRACE_SECS".into(), "5".into()),
        ("CCMAIL_HTTP_LISTEN".into(), "127.0.0.1:0".into()),
        ("CCMAIL_LOG_FORMAT".into(), "json".into()),
        ("CCMAIL_LOG_LEVEL".into(), "info".into()),
    ];

    // The app and a first pilot (support@, on server B) exist before the worker starts.
    let app = {
        let mut conn = db.pool().acquire().await.unwrap();
        let mut app = store::NewApp::new("support-app", TENANT, CLIENT, String::new());
        app.authority = entra.authority();
        app.seal_credential(&key, &SecretString::from(SECRET))
            .unwrap();
        store::insert_app(&mut conn, &app).await.unwrap()
    };
    let support = "support@contoso.example";
    let sales = "sales@contoso.example";
    pop_b.add_mailbox(support);
    pop_a.add_mailbox(sales);
    let port_a = pop_a.tls_addr().port().to_string();
    let port_b = pop_b.tls_addr().port().to_string();
    let mut mail = MailGen::new(11);
    for _ in 0..2 {
        pop_b.deliver(support, mail.mixed(support));
    }
    cli(
        &env,
        dir,
        &[
            "pilot",
            "add",
            "--queue",
            "support",
            "--mailbox",
            support,
            "--app",
            "support-app",
            "--host",
            "127.0.0.1",
            "--port",
            &port_b,
            "--ca-bundle",
            &ca_arg,
            "--poll-interval",
            "1",
        ],
    );
    let support_id = {
        let mut conn = db.pool().acquire().await.unwrap();
        store::find_pilots_by_mailbox(&mut conn, support)
            .await
            .unwrap()[0]
            .id
    };

    let worker = Worker::start(&env, dir);
    wait_until("the first pilot drains", &worker, || async {
        work_items(&db, "support").await == 2 && pop_b.messages(support).is_empty()
    })
    .await;

    // 1. Added while running: starts draining without a restart.
    for _ in 0..3 {
        pop_a.deliver(sales, mail.mixed(sales));
    }
    cli(
        &env,
        dir,
        &[
            "pilot",
            "add",
            "--queue",
            "sales",
            "--mailbox",
            sales,
            "--app",
            "support-app",
            "--host",
            "127.0.0.1",
            "--port",
            &port_a,
            "--ca-bundle",
            &ca_arg,
            "--poll-interval",
            "1",
        ],
    );
    wait_until("the added pilot drains", &worker, || async {
        work_items(&db, "sales").await == 3 && pop_a.messages(sales).is_empty()
    })
    .await;

    // 2. Disabled while running: its poller stops, no new session on its server.
    cli(&env, dir, &["pilot", "disable", &support_id.to_string()]);
    let stopped = format!("\"pilot\":{support_id}");
    wait_until("the disabled pilot's poller stops", &worker, || {
        let done = worker.logged(&["poller stopped", &stopped]);
        async move { done }
    })
    .await;
    let sessions_after_stop = pop_b.sessions();
    pop_b.deliver(support, mail.mixed(support));
    // Two more full polls of the enabled pilot (poll interval 1 s): the disabled one, also at
    // 1 s, would have polled meanwhile if it were still running.
    for expected in [4, 5] {
        pop_a.deliver(sales, mail.mixed(sales));
        wait_until("the enabled pilot keeps draining", &worker, || async {
            work_items(&db, "sales").await == expected && pop_a.messages(sales).is_empty()
        })
        .await;
    }
    assert_eq!(
        pop_b.sessions(),
        sessions_after_stop,
        "the disabled pilot opened a session"
    );
    assert_eq!(pop_b.messages(support).len(), 1);
    assert_eq!(work_items(&db, "support").await, 2);

    // 3. Updated while running: new server (port) and new queue are picked up.
    pop_b.add_mailbox(sales);
    pop_b.deliver(sales, mail.mixed(sales));
    cli(
        &env,
        dir,
        &[
            "pilot",
            "update",
            sales,
            "--port",
            &port_b,
            "--queue",
            "sales-vip",
        ],
    );
    wait_until(
        "the updated pilot polls its new server into its new queue",
        &worker,
        || async { work_items(&db, "sales-vip").await == 1 && pop_b.messages(sales).is_empty() },
    )
    .await;
    assert_eq!(work_items(&db, "sales").await, 5);
    assert_eq!(pop_b.messages(support).len(), 1, "still disabled");
    assert!(app.id > 0);

    let status = worker.stop().await;
    assert!(status.success(), "worker exit: {status:?}");
    pop_a.shutdown();
    pop_b.shutdown();
    entra.shutdown();
    db.drop_db().await.unwrap();
}
