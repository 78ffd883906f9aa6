//! The web console in a real browser: Debian's headless Chromium driven through
//! chromedriver (both started here on 127.0.0.1, stopped by PID), against the console served
//! in process on a real PostgreSQL. An agent logs in, takes the next item, reads it and
//! completes it; hostile HTML in the message runs nothing and loads nothing; a cross-site
//! POST without the CSRF token is refused; a logged-out page redirects to the login.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ccmail::api::ApiSettings;
use ccmail::store::Role;
use ccmail::web::{self, WebSettings, WebState};
use ccmail_lab::child::{Child, SpawnOptions};
use ccmail_lab::testdb::TestDb;
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::wait::{wait_for, wait_until};
use crate::support::work;

const PASSWORD: &str = "correct horse battery staple";

/// Records every request made to it (its request line): a request here means the page
/// loaded or ran something it must not. A connection that sends nothing (a browser's
/// speculative preconnect) is not a request.
async fn canary() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                if let Ok(n) = stream.read(&mut buf).await
                    && n > 0
                {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let line = text.lines().next().unwrap_or("").to_owned();
                    seen.lock().unwrap().push(line);
                }
            });
        }
    });
    (port, hits)
}

/// The console served in this process on a free port.
struct Console {
    base: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Console {
    async fn start(db: &TestDb) -> Console {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let settings = ccmail::config::WebConfig::default();
        let server = tokio::spawn(web::serve(
            listener,
            WebState::new(
                db.db().clone(),
                WebSettings::from_config(&settings, ApiSettings::default()),
            ),
            web::limits(&settings),
            stop.clone(),
        ));
        Console { base, stop, server }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

/// Logs `name` in through the login form and waits for the queues page.
async fn log_in(b: &fantoccini::Client, base: &str, name: &str) {
    b.goto(&format!("{base}/login")).await.unwrap();
    b.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#name"))
        .await
        .unwrap()
        .send_keys(name)
        .await
        .unwrap();
    b.find(Locator::Css("#password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    click(b, "button[type=submit]").await;
    wait_path(b, "/agent").await;
}

struct Browser {
    driver: Child,
    client: fantoccini::Client,
}

impl Browser {
    async fn start(dir: &std::path::Path) -> Browser {
        for exe in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(exe).exists(),
                "{exe} is missing; install Debian's chromium and chromium-driver (.ci/run does this)"
            );
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Child::start(
            std::path::Path::new("/usr/bin/chromedriver"),
            &dir.join("chromedriver.log"),
            &[&format!("--port={port}"), "--allowed-ips=127.0.0.1"],
            &[],
            &SpawnOptions::default(),
        )
        .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         format!("--user-data-dir={}", dir.join("profile").display())],
            }),
        );
        let client = wait_for(
            "chromedriver to accept a session",
            Duration::from_secs(60),
            || {
                let (url, caps) = (url.clone(), caps.clone());
                async move {
                    ClientBuilder::rustls()
                        .ok()?
                        .capabilities(caps)
                        .connect(&url)
                        .await
                        .ok()
                }
            },
        )
        .await
        .unwrap();
        Browser { driver, client }
    }

    async fn stop(self) {
        let _ = self.client.close().await;
        let mut driver = self.driver;
        driver.terminate().unwrap();
        driver.wait(Duration::from_secs(20)).await.unwrap();
    }
}

/// Waits until the browser shows `path` (a click returns before the navigation it starts).
async fn wait_path(b: &fantoccini::Client, path: &str) {
    wait_until(
        &format!("the browser to show {path}"),
        Duration::from_secs(20),
        || async { Ok(b.current_url().await?.path() == path) },
        String::new,
    )
    .await
    .unwrap();
}

/// The text of the element `css`, once the page has it.
async fn click(b: &fantoccini::Client, css: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn text_of(b: &fantoccini::Client, css: &str) -> String {
    b.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// axe-core's accessibility rules run in the page: the serious and critical violations
/// (`.ci/run` installs axe-core from npm into target/axe).
async fn accessibility_violations(b: &fantoccini::Client) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/axe/node_modules/axe-core/axe.min.js");
    let source = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing; install it with `npm install --prefix target/axe axe-core@4.10.3` (.ci/run does this)",
            path.display()
        )
    });
    b.execute(&format!("{source}; return true;"), vec![])
        .await
        .unwrap();
    let found = b
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             axe.run(document).then(r => done(r.violations \
                 .filter(v => v.impact === 'serious' || v.impact === 'critical') \
                 .map(v => v.id + ': ' + v.help + ' (' + v.nodes.length + ')')));",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(found).unwrap()
}

fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_logs_in_takes_reads_and_completes_and_hostile_html_runs_nothing() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "support").await;
    let id = work::items(db.db(), pilot, "support", 1).await[0];
    let (canary_port, hits) = canary().await;
    let c = format!("http://127.0.0.1:{canary_port}");
    // Stored as if the sanitiser had let everything through: the frame's own policy must hold.
    let hostile = format!(
        "<p id=hello>Hello from HTML</p>\
         <script>fetch('{c}/script')</script>\
         <img src=x onerror=\"fetch('{c}/onerror')\">\
         <img src='{c}/img'>\
         <a href=\"javascript:fetch('{c}/js-link')\">click</a>\
         <div style=\"background:url('{c}/css')\">styled</div>\
         <iframe src='{c}/iframe'></iframe>\
         <form action='{c}/form' method=post><input name=x value=1></form>\
         <script>document.forms[0].submit()</script>"
    );
    sqlx::query(
        "update messages set subject = 'Order 42 is late', text_body = 'Hello agent, where is my order?', \
         html_sanitized = $2 where id = (select message_id from work_items where id = $1)",
    )
    .bind(id)
    .bind(&hostile)
    .execute(db.pool())
    .await
    .unwrap();
    let hash = web::session::hash_password(PASSWORD.to_owned())
        .await
        .unwrap();
    let mut conn = db.db().acquire().await.unwrap();
    ccmail::store::users::insert_user(&mut conn, "ann", Role::Agent, &["support".into()], &hash)
        .await
        .unwrap();
    drop(conn);

    let console = Console::start(&db).await;
    let base = console.base.clone();

    let dir = tempfile::tempdir().unwrap();
    let browser = Browser::start(dir.path()).await;
    let b = &browser.client;
    // Logged out: any page leads to the login.
    b.goto(&format!("{base}/agent")).await.unwrap();
    wait_path(b, "/login").await;
    text_of(b, "#name").await;
    assert_eq!(
        accessibility_violations(b).await,
        Vec::<String>::new(),
        "login page"
    );
    // Negative control: the same check sees a field without a label.
    b.execute(
        "document.body.insertAdjacentHTML('beforeend', '<input id=unlabelled>'); return true;",
        vec![],
    )
    .await
    .unwrap();
    let seen = accessibility_violations(b).await;
    assert!(seen.iter().any(|v| v.starts_with("label")), "{seen:?}");
    b.goto(&format!("{base}/login")).await.unwrap();
    text_of(b, "#name").await;
    b.find(Locator::Css("#name"))
        .await
        .unwrap()
        .send_keys("ann")
        .await
        .unwrap();
    b.find(Locator::Css("#password"))
        .await
        .unwrap()
        .send_keys("wrong password!")
        .await
        .unwrap();
    click(b, "button[type=submit]").await;
    let alert = text_of(b, "[role=alert]").await;
    assert!(alert.contains("wrong"), "{alert}");
    b.find(Locator::Css("#name"))
        .await
        .unwrap()
        .send_keys("ann")
        .await
        .unwrap();
    b.find(Locator::Css("#password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    click(b, "button[type=submit]").await;
    wait_path(b, "/agent").await;
    text_of(b, "#take-support").await;
    assert_eq!(
        accessibility_violations(b).await,
        Vec::<String>::new(),
        "queues page"
    );
    let shots = screenshot_dir();
    std::fs::write(
        shots.join("agent-queues.png"),
        b.screenshot().await.unwrap(),
    )
    .unwrap();

    click(b, "#take-support").await;
    wait_path(b, &format!("/agent/items/{id}")).await;
    let subject = text_of(b, "#subject").await;
    assert_eq!(subject, "Order 42 is late");
    let text = text_of(b, "#text").await;
    assert!(text.contains("where is my order"), "{text}");
    // The frame has loaded (its navigation is in the page's resource timings) ...
    let frame_url = format!("{base}/agent/items/{id}/html");
    wait_until(
        "the HTML frame to load",
        Duration::from_secs(20),
        || async {
            let loaded = b
                .execute(
                    "return performance.getEntriesByName(arguments[0]).length",
                    vec![json!(frame_url)],
                )
                .await?;
            Ok(loaded.as_u64().unwrap_or(0) > 0)
        },
        String::new,
    )
    .await
    .unwrap();
    std::fs::write(shots.join("agent-item.png"), b.screenshot().await.unwrap()).unwrap();
    assert_eq!(
        accessibility_violations(b).await,
        Vec::<String>::new(),
        "item page"
    );
    // ... and nothing in it ran or loaded: the canary saw no request at all.
    assert_eq!(
        *hits.lock().unwrap(),
        Vec::<String>::new(),
        "the hostile HTML reached the canary"
    );

    click(b, "#complete").await;
    wait_path(b, &format!("/agent/items/{id}/complete")).await;
    let status = text_of(b, "[role=status]").await;
    assert!(status.contains("completed"), "{status}");
    let (state, done_by): (String, Option<String>) =
        sqlx::query_as("select status, done_by from work_items where id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), done_by.as_deref()),
        ("done", Some("user:ann"))
    );
    let actors: Vec<(String, String)> = sqlx::query_as(
        "select action, actor from work_item_events where work_item_id = $1 order by id",
    )
    .bind(id)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        actors,
        [
            ("offered".to_owned(), "user:ann".to_owned()),
            ("accepted".to_owned(), "user:ann".to_owned()),
            ("completed".to_owned(), "user:ann".to_owned()),
        ]
    );

    // A cross-site POST with the session cookie but without the CSRF token is refused.
    let cookie = b
        .get_named_cookie(web::session::COOKIE)
        .await
        .unwrap()
        .value()
        .to_owned();
    work::items(db.db(), pilot, "support", 1).await;
    let forged = reqwest::Client::new()
        .post(format!("{base}/agent/take"))
        .header("Cookie", format!("{}={cookie}", web::session::COOKIE))
        .header("Origin", "http://evil.example")
        .form(&[("queue", "support")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), reqwest::StatusCode::FORBIDDEN);
    let offered: i64 =
        sqlx::query_scalar("select count(*) from work_items where status = 'offered'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(offered, 0, "the forged take claimed nothing");
    let page = reqwest::get(format!("{base}/agent")).await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");

    // An agent cannot open an admin page.
    b.goto(&format!("{base}/admin/pilots")).await.unwrap();
    wait_path(b, "/admin/pilots").await;
    assert_eq!(text_of(b, "h1").await, "Not allowed");

    browser.stop().await;
    console.stop().await;
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sees_every_pilot_with_its_health_and_the_fix_for_its_last_error() {
    let db = TestDb::new().await.unwrap();
    let healthy = work::pilot(db.db(), "support").await;
    let failing = work::pilot(db.db(), "billing").await;
    let held = work::items(db.db(), healthy, "support", 3).await[0];
    sqlx::query("update work_items set status = 'held', held_reason = 'offer_limit' where id = $1")
        .bind(held)
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("update pilots set last_success_at = now() - interval '1 minute' where id = $1")
        .bind(healthy)
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query(
        "update pilots set last_error = 'login refused: -ERR Authentication failure',          last_error_hint = 'run ccmail doctor --pilot billing@example.test',          last_error_at = now() where id = $1",
    )
    .bind(failing)
    .execute(db.pool())
    .await
    .unwrap();
    let mut conn = db.db().acquire().await.unwrap();
    ccmail::store::leases::acquire_lease(&mut conn, healthy, "replica-7", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let hash = web::session::hash_password(PASSWORD.to_owned())
        .await
        .unwrap();
    ccmail::store::users::insert_user(&mut conn, "root", Role::Admin, &[], &hash)
        .await
        .unwrap();
    drop(conn);
    let console = Console::start(&db).await;
    let base = console.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let browser = Browser::start(dir.path()).await;
    let b = &browser.client;
    log_in(b, &base, "root").await;
    b.goto(&format!("{base}/admin/pilots")).await.unwrap();
    let table = text_of(b, "#pilots").await;
    assert_eq!(
        accessibility_violations(b).await,
        Vec::<String>::new(),
        "pilots page"
    );
    for want in [
        "support@example.test",
        "healthy",
        "replica-7",
        "billing@example.test",
        "failing",
        "Authentication failure",
        "Fix: run ccmail doctor --pilot billing@example.test",
    ] {
        assert!(table.contains(want), "{want} missing from:\n{table}");
    }
    std::fs::write(
        screenshot_dir().join("pilots-overview.png"),
        b.screenshot().await.unwrap(),
    )
    .unwrap();
    // Poll now asks the replica holding the pilot to poll it, and is audited.
    click(b, &format!("#poll-{failing}")).await;
    let status = text_of(b, "[role=status]").await;
    assert!(status.contains("a poll was requested"), "{status}");
    let requested: Vec<i64> =
        sqlx::query_scalar("select id from pilots where poll_requested_at is not null")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(requested, vec![failing]);
    let (actor, target): (String, Option<String>) =
        sqlx::query_as("select actor, target from audit_log where action = 'pilot.poll_now'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(actor, "user:root");
    assert_eq!(target, Some(format!("pilot:{failing}")));
    // The supervisor's view: held items first; releasing one puts it back in its queue.
    b.goto(&format!("{base}/supervisor/items")).await.unwrap();
    let items = text_of(b, "#items").await;
    assert_eq!(
        accessibility_violations(b).await,
        Vec::<String>::new(),
        "items page"
    );
    assert!(items.contains("offer_limit"), "{items}");
    click(b, &format!("#requeue-{held}")).await;
    let status = text_of(b, "[role=status]").await;
    assert!(status.contains("held → queued"), "{status}");
    let (state, actor): (String, String) = sqlx::query_as(
        "select w.status, e.actor from work_items w join work_item_events e on e.work_item_id = w.id \
         where w.id = $1 and e.action = 'requeued'",
    )
    .bind(held)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((state.as_str(), actor.as_str()), ("queued", "user:root"));
    let audited: i64 =
        sqlx::query_scalar("select count(*) from audit_log where action = 'work.requeue'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(audited, 1);
    browser.stop().await;
    console.stop().await;
    db.drop_db().await.unwrap();
}
