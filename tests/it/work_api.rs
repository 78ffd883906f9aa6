//! The agents' HTTP API through its real listener, on a real PostgreSQL: claims by many
//! agents at once, fencing over HTTP (409), idempotent POSTs, keys and roles (401/403),
//! downloads with safe headers, the long-poll claim woken by LISTEN/NOTIFY, and the OpenAPI
//! document.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ccmail::api::{self, ApiSettings, ApiState};
use ccmail::store::{self, Role};
use ccmail_lab::testdb::TestDb;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::wait::wait_until;
use crate::support::work;

struct Api {
    db: TestDb,
    state: ApiState,
    base: String,
    client: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Api {
    async fn start() -> Api {
        let db = TestDb::new().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let state = ApiState::new(db.db().clone(), ApiSettings::default(), stop.clone());
        let task = tokio::spawn(api::serve(
            listener,
            state.clone(),
            api::limits(&ccmail::config::ApiConfig::default()),
            stop.clone(),
        ));
        Api {
            db,
            state,
            base,
            client: reqwest::Client::new(),
            stop,
            task,
        }
    }

    async fn key(&self, name: &str, role: Role, queues: &[&str]) -> String {
        let new = api::generate_key().unwrap();
        let queues: Vec<String> = queues.iter().map(|q| (*q).to_owned()).collect();
        let mut conn = self.db.db().acquire().await.unwrap();
        store::insert_api_key(&mut conn, name, role, &queues, &new.hash, &new.prefix)
            .await
            .unwrap();
        new.key
    }

    async fn post(&self, key: Option<&str>, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_with(key, path, body, None).await
    }

    async fn post_with(
        &self,
        key: Option<&str>,
        path: &str,
        body: Value,
        idempotency: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(k) = idempotency {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let json = resp.json().await.unwrap_or(Value::Null);
        (status, json)
    }

    async fn get(&self, key: Option<&str>, path: &str) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send().await.unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.db.drop_db().await.unwrap();
    }
}

fn offer(answer: &Value) -> (i64, String) {
    let item = &answer["items"][0];
    (
        item["id"].as_i64().unwrap(),
        item["claim_token"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn fifty_agents_over_http_take_a_thousand_items_each_exactly_once() {
    let api = Arc::new(Api::start().await);
    let pilot = work::pilot(api.db.db(), "support").await;
    let ids = work::items(api.db.db(), pilot, "support", 1000).await;
    let mut keys = Vec::new();
    for i in 0..50 {
        keys.push(
            api.key(&format!("agent-{i}"), Role::Agent, &["support"])
                .await,
        );
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for key in keys {
        let (api, barrier) = (api.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut handled = Vec::new();
            loop {
                let (status, body) = api
                    .post(Some(&key), "/queues/support/claim", json!({}))
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                if body["items"].as_array().unwrap().is_empty() {
                    return handled;
                }
                let (id, token) = offer(&body);
                let (status, body) = api
                    .post(
                        Some(&key),
                        &format!("/work-items/{id}/accept"),
                        json!({"claim_token": token}),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                let (status, body) = api
                    .post(
                        Some(&key),
                        &format!("/work-items/{id}/complete"),
                        json!({"claim_token": token}),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                assert_eq!(body["status"], "done");
                handled.push(id);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, ids, "every item handled exactly once");
    let (done, completions, offers): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from work_items where status = 'done' and done_by like 'agent-%'), \
         (select count(*) from work_item_events where action = 'completed'), \
         (select count(*) from work_item_events where action = 'offered')",
    )
    .fetch_one(api.db.pool())
    .await
    .unwrap();
    assert_eq!((done, completions, offers), (1000, 1000, 1000));
    let metrics = ccmail::telemetry::global();
    assert!(
        metrics
            .value(&ccmail::telemetry::WORK_CLAIMS, &["support"])
            .unwrap_or(0.0)
            >= 1000.0
    );
    Arc::try_unwrap(api).ok().unwrap().stop().await;
}

#[tokio::test]
async fn a_stale_claimant_gets_409_for_every_step_and_nothing_changes() {
    let api = Api::start().await;
    let pilot = work::pilot(api.db.db(), "q").await;
    let id = work::items(api.db.db(), pilot, "q", 1).await[0];
    let ann = api.key("ann", Role::Agent, &["q"]).await;
    let bob = api.key("bob", Role::Agent, &["q"]).await;
    let (_, first) = api.post(Some(&ann), "/queues/q/claim", json!({})).await;
    let (_, ann_token) = offer(&first);
    work::expire(api.db.db(), id).await;
    let mut conn = api.db.db().acquire().await.unwrap();
    ccmail::store::lifecycle::rescue(&mut conn, 5, 10)
        .await
        .unwrap();
    drop(conn);
    let (_, second) = api.post(Some(&bob), "/queues/q/claim", json!({})).await;
    let (again, bob_token) = offer(&second);
    assert_eq!(again, id);
    let before = work::row(api.db.db(), id).await;
    for step in ["accept", "heartbeat", "complete", "release"] {
        let (status, body) = api
            .post(
                Some(&ann),
                &format!("/work-items/{id}/{step}"),
                json!({"claim_token": ann_token}),
            )
            .await;
        // Bob holds it now: Ann is told it is another agent's, and nothing changes.
        assert_eq!(status, StatusCode::FORBIDDEN, "{step}: {body}");
    }
    // Completing by id alone is not a request this API takes.
    let (status, body) = api
        .post(Some(&bob), &format!("/work-items/{id}/complete"), json!({}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(work::row(api.db.db(), id).await, before, "nothing changed");
    // Bob with Ann's old token: his own item, a token no longer current → 409.
    let (status, body) = api
        .post(
            Some(&bob),
            &format!("/work-items/{id}/accept"),
            json!({"claim_token": ann_token}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["type"], "urn:ccmail:problem:stale-claim");
    assert_eq!(body["current_status"], "offered");
    assert_eq!(work::row(api.db.db(), id).await, before, "nothing changed");
    // Once Bob's own offer has expired, his accept is a 409 too.
    work::expire(api.db.db(), id).await;
    let (status, body) = api
        .post(
            Some(&bob),
            &format!("/work-items/{id}/accept"),
            json!({"claim_token": bob_token}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    api.stop().await;
}

#[tokio::test]
async fn an_expired_offer_and_an_expired_lease_come_back_ahead_of_later_items() {
    let api = Api::start().await;
    let rescue = tokio::spawn(api::rescue_loop(
        api.db.db().clone(),
        ApiSettings::default(),
        api.stop.clone(),
    ));
    let pilot = work::pilot(api.db.db(), "q").await;
    let first = work::items(api.db.db(), pilot, "q", 2).await;
    let ann = api.key("ann", Role::Agent, &["q"]).await;
    let bob = api.key("bob", Role::Agent, &["q"]).await;
    let (_, a) = api.post(Some(&ann), "/queues/q/claim", json!({})).await;
    let (a_id, a_token) = offer(&a);
    let (status, _) = api
        .post(
            Some(&ann),
            &format!("/work-items/{a_id}/accept"),
            json!({"claim_token": a_token}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, b) = api.post(Some(&bob), "/queues/q/claim", json!({})).await;
    let (b_id, _) = offer(&b);
    assert_eq!((a_id, b_id), (first[0], first[1]));
    let later = work::items(api.db.db(), pilot, "q", 2).await;
    work::expire(api.db.db(), a_id).await;
    work::expire(api.db.db(), b_id).await;
    wait_until(
        "the rescue step to put both back",
        Duration::from_secs(20),
        || async {
            Ok(work::row(api.db.db(), a_id).await.0 == "queued"
                && work::row(api.db.db(), b_id).await.0 == "queued")
        },
        String::new,
    )
    .await
    .unwrap();
    let (status, all) = api
        .post(Some(&bob), "/queues/q/claim", json!({"max": 10}))
        .await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let order: Vec<i64> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    assert_eq!(order, [a_id, b_id, later[0], later[1]]);
    assert_eq!(
        work::actions(api.db.db(), a_id).await,
        ["offered", "accepted", "lease_expired", "offered"]
    );
    rescue.abort();
    api.stop().await;
}

#[tokio::test]
async fn the_same_post_with_the_same_idempotency_key_is_one_transition_with_one_answer() {
    let api = Api::start().await;
    let pilot = work::pilot(api.db.db(), "q").await;
    let ids = work::items(api.db.db(), pilot, "q", 3).await;
    let ann = api.key("ann", Role::Agent, &["q"]).await;
    // Two claims at once with one key: one offer, the same answer twice.
    let (a, b) = tokio::join!(
        api.post_with(Some(&ann), "/queues/q/claim", json!({}), Some("claim-1")),
        api.post_with(Some(&ann), "/queues/q/claim", json!({}), Some("claim-1")),
    );
    assert_eq!(a, b);
    let (id, token) = offer(&a.1);
    assert_eq!(id, ids[0]);
    let offers: i64 =
        sqlx::query_scalar("select count(*) from work_items where status = 'offered'")
            .fetch_one(api.db.pool())
            .await
            .unwrap();
    assert_eq!(offers, 1);
    let path = format!("/work-items/{id}/accept");
    let body = json!({"claim_token": token});
    let first = api
        .post_with(Some(&ann), &path, body.clone(), Some("accept-1"))
        .await;
    let second = api
        .post_with(Some(&ann), &path, body.clone(), Some("accept-1"))
        .await;
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(first, second, "the replay is the first answer");
    assert_eq!(
        work::actions(api.db.db(), id).await,
        ["offered", "accepted"]
    );
    // Without the key, the same accept again is a real second request: refused.
    let third = api.post(Some(&ann), &path, body).await;
    assert_eq!(third.0, StatusCode::CONFLICT, "{}", third.1);
    // The key with another request is a mistake, said so.
    let other = api
        .post_with(
            Some(&ann),
            &format!("/work-items/{id}/heartbeat"),
            json!({"claim_token": token}),
            Some("accept-1"),
        )
        .await;
    assert_eq!(other.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", other.1);
    api.stop().await;
}

#[tokio::test]
async fn keys_and_roles_decide_who_may_do_what() {
    let api = Api::start().await;
    let pilot = work::pilot(api.db.db(), "sales").await;
    let other = work::pilot(api.db.db(), "billing").await;
    let id = work::items(api.db.db(), pilot, "sales", 1).await[0];
    work::items(api.db.db(), other, "billing", 1).await;
    let ann = api.key("ann", Role::Agent, &["sales"]).await;
    let bea = api.key("bea", Role::Agent, &["sales"]).await;
    let ben = api.key("ben", Role::Agent, &["billing"]).await;
    let sue = api.key("sue", Role::Supervisor, &[]).await;

    let (status, body) = api.post(None, "/queues/sales/claim", json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let resp = api.get(None, "/openapi.json").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key("www-authenticate"));
    let (status, _) = api
        .post(Some("ccm_not-a-key"), "/queues/sales/claim", json!({}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = api.post(Some(&ben), "/queues/sales/claim", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        api.get(Some(&ben), &format!("/work-items/{id}"))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );

    let (_, claimed) = api.post(Some(&ann), "/queues/sales/claim", json!({})).await;
    let (_, token) = offer(&claimed);
    // Another agent of the same queue cannot act on or read Ann's item.
    let (status, body) = api
        .post(
            Some(&bea),
            &format!("/work-items/{id}/accept"),
            json!({"claim_token": token}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        api.get(Some(&bea), &format!("/work-items/{id}"))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let resp = api.get(Some(&ann), &format!("/work-items/{id}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let item: Value = resp.json().await.unwrap();
    assert_eq!(item["message"]["subject"], "item 1");
    assert_eq!(item["agent"], "ann");
    assert!(
        item["triage"].is_object(),
        "the conversation and class view: {item}"
    );
    // Agents cannot cancel or list; supervisors can.
    let (status, _) = api
        .post(
            Some(&ann),
            &format!("/work-items/{id}/cancel"),
            json!({"reason": "spam"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        api.get(Some(&ann), "/work-items").await.status(),
        StatusCode::FORBIDDEN
    );
    let page: Value = api
        .get(Some(&sue), "/work-items?status=offered")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let (status, body) = api
        .post(
            Some(&sue),
            &format!("/work-items/{id}/transfer"),
            json!({"queue": "billing"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queue"], "billing");
    // Ann's claim ended with the transfer.
    let (status, _) = api
        .post(
            Some(&ann),
            &format!("/work-items/{id}/accept"),
            json!({"claim_token": token}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "billing is not Ann's queue");
    let events: Value = api
        .get(Some(&sue), &format!("/work-items/{id}/events"))
        .await
        .json()
        .await
        .unwrap();
    let actors: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors, ["ann", "sue"]);
    let queues: Value = api.get(Some(&sue), "/queues").await.json().await.unwrap();
    let billing = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "billing")
        .unwrap();
    assert_eq!(billing["counts"]["queued"], 2);

    let mut conn = api.db.db().acquire().await.unwrap();
    assert!(store::revoke_api_key(&mut conn, "sue").await.unwrap());
    drop(conn);
    assert_eq!(
        api.get(Some(&sue), "/queues").await.status(),
        StatusCode::UNAUTHORIZED
    );
    api.stop().await;
}

#[tokio::test]
async fn an_attachment_with_a_hostile_name_and_type_downloads_with_safe_headers() {
    let api = Api::start().await;
    let pilot = work::pilot(api.db.db(), "q").await;
    let id = work::items(api.db.db(), pilot, "q", 1).await[0];
    sqlx::query(
        "insert into attachments (message_id, ordinal, filename, content_type, size, bytes) \
         select message_id, 0, '../../x<script>.html', 'text/html', 27, \
             convert_to('<script>alert(1)</script>\r\n', 'UTF8') \
         from work_items where id = $1",
    )
    .bind(id)
    .execute(api.db.pool())
    .await
    .unwrap();
    let ann = api.key("ann", Role::Agent, &["q"]).await;
    api.post(Some(&ann), "/queues/q/claim", json!({})).await;
    let resp = api
        .get(Some(&ann), &format!("/work-items/{id}/attachments/0"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    let disposition = h["content-disposition"].to_str().unwrap();
    assert!(disposition.starts_with("attachment;"), "{disposition}");
    for bad in ["..", "/", "<", ">"] {
        assert!(!disposition.contains(bad), "{bad} in {disposition}");
    }
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("sandbox")
    );
    assert_eq!(resp.bytes().await.unwrap().len(), 27);
    let raw = api.get(Some(&ann), &format!("/work-items/{id}/raw")).await;
    assert_eq!(raw.headers()["content-type"], "message/rfc822");
    assert!(raw.bytes().await.unwrap().starts_with(b"Subject: item 1"));
    api.stop().await;
}

#[tokio::test]
async fn a_long_poll_claim_returns_when_an_item_arrives_not_at_its_timeout() {
    let api = Arc::new(Api::start().await);
    let pilot = work::pilot(api.db.db(), "q").await;
    let ann = api.key("ann", Role::Agent, &["q"]).await;
    wait_until(
        "the API's LISTEN connection",
        Duration::from_secs(10),
        || async { Ok(api.state.waker().listening()) },
        String::new,
    )
    .await
    .unwrap();
    let waiting = {
        let api = api.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = api
                .post(Some(&ann), "/queues/q/claim", json!({"wait_secs": 20}))
                .await;
            (answer, Instant::now(), started.elapsed())
        })
    };
    wait_until(
        "the claim to wait",
        Duration::from_secs(10),
        || async { Ok(api.state.waker().waiting() == 1) },
        String::new,
    )
    .await
    .unwrap();
    let stored_at = Instant::now();
    let id = work::items(api.db.db(), pilot, "q", 1).await[0];
    let ((status, body), answered_at, total) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(offer(&body).0, id, "it returned with the new item");
    let latency = answered_at.duration_since(stored_at);
    println!("long-poll claim answered {latency:?} after the item was stored");
    assert!(
        total < Duration::from_secs(15),
        "returned because of the item, not the 20 s timeout"
    );
    assert!(
        latency < Duration::from_secs(5),
        "woken by the notification: {latency:?}"
    );
    Arc::try_unwrap(api).ok().unwrap().stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_each_is_served() {
    let api = Api::start().await;
    let sue = api.key("sue", Role::Admin, &[]).await;
    let doc: Value = api
        .get(Some(&sue), "/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let expected: BTreeSet<String> = [
        "/api/v1/queues",
        "/api/v1/queues/{queue}/claim",
        "/api/v1/work-items",
        "/api/v1/work-items/{id}",
        "/api/v1/work-items/{id}/accept",
        "/api/v1/work-items/{id}/heartbeat",
        "/api/v1/work-items/{id}/release",
        "/api/v1/work-items/{id}/complete",
        "/api/v1/work-items/{id}/transfer",
        "/api/v1/work-items/{id}/cancel",
        "/api/v1/work-items/{id}/requeue",
        "/api/v1/work-items/{id}/events",
        "/api/v1/work-items/{id}/attachments/{ordinal}",
        "/api/v1/work-items/{id}/raw",
        "/api/v1/openapi.json",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(paths, expected);
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Every documented operation is served: none falls through to the "no such route" answer.
    let origin = api.base.trim_end_matches("/api/v1").to_owned();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{queue}", "nowhere")
            .replace("{id}", "999")
            .replace("{ordinal}", "0");
        for method in ops.as_object().unwrap().keys() {
            let req = match method.as_str() {
                "get" => api.client.get(format!("{origin}{concrete}")),
                "post" => api
                    .client
                    .post(format!("{origin}{concrete}"))
                    .json(&json!({})),
                other => panic!("unexpected method {other}"),
            };
            let resp = req.bearer_auth(&sue).send().await.unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert!(
                !body["detail"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("no such route"),
                "{method} {path} is documented but not served"
            );
            assert!(status.as_u16() < 500, "{method} {path}: {status} {body}");
        }
    }
    let unknown = api.get(Some(&sue), "/nothing-here").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );
    api.stop().await;
}

/// A property-based fuzzer (schemathesis, from PyPI; `.ci/run` installs it) generates
/// requests from the OpenAPI document, valid and invalid, for every operation; none may be
/// answered with a server error, and every answer must match the document's status codes.
#[tokio::test]
async fn a_property_based_fuzzer_driven_by_the_openapi_document_finds_no_server_error() {
    let found = std::process::Command::new("schemathesis")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "schemathesis is not installed; install it with `python3 -m pip install schemathesis==4.32.5` (.ci/run does this)"
    );
    let api = Api::start().await;
    let pilot = work::pilot(api.db.db(), "nowhere").await;
    work::items(api.db.db(), pilot, "nowhere", 200).await;
    let admin = api.key("fuzz", Role::Admin, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let doc_path = dir.path().join("openapi.json");
    std::fs::write(&doc_path, api::openapi().to_json().unwrap()).unwrap();
    let origin = api.base.trim_end_matches("/api/v1").to_owned();
    let out = tokio::process::Command::new("schemathesis")
        .arg("run")
        .arg(&doc_path)
        .args(["--url", &origin])
        .args(["--header", &format!("Authorization: Bearer {admin}")])
        .args(["--checks", "not_a_server_error,status_code_conformance"])
        .args(["--max-examples", "40", "--seed", "1", "--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--no-color", "--request-timeout", "10"])
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    println!(
        "{}",
        text.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    api.stop().await;
}
