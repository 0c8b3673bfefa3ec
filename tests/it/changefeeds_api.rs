//! `/api/v1/changefeeds` over HTTP against a real etcd: the JSON contract,
//! CAS create under concurrency, the pause/update/resume/delete flows, every
//! error code, the admin token, an etcd outage and malformed stored values.

use crate::harness;
use crate::harness::app::{app, assert_error, call, call_full};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use actix_web::{test, web, App};
use etcd_client::{Client, GetOptions};
use flotilla::http::{self, AppState, EtcdProbe, ServerInfo};
use flotilla::owner::feeds::Changefeeds;
use flotilla::owner::model::{ChangefeedId, ChangefeedStatus, Key, Keys};
use serde_json::{json, Value};

use crate::harness::EtcdCluster;

const PREFIX: &str = "/flotilla/test";
const ADMIN: &str = "admin-secret-token";
const MAX_BODY: usize = 256 * 1024;

/// A real etcd, a client on it, and the app state serving changefeeds from it.
struct Fixture {
    etcd: EtcdCluster,
    client: Client,
    keys: Keys,
    state: web::Data<AppState>,
}

async fn fixture_with(admin_token: Option<&str>, timeout: Duration) -> Fixture {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let keys = Keys::new(PREFIX);
    let info = ServerInfo {
        id: "test".into(),
        version: "0",
        cluster_id: "test".into(),
        advertise_addr: "127.0.0.1:0".into(),
        etcd_endpoints: etcd.endpoints(),
    };
    let state = web::Data::new(
        AppState::new(info, EtcdProbe::new(client.clone(), timeout))
            .with_changefeeds(Changefeeds::new(client.clone(), keys.clone(), timeout))
            .with_admin_token(admin_token.map(str::to_owned))
            .with_max_body_bytes(MAX_BODY)
            .with_max_heartbeat_bytes(MAX_BODY),
    );
    Fixture {
        etcd,
        client,
        keys,
        state,
    }
}

async fn fixture() -> Fixture {
    fixture_with(None, Duration::from_secs(5)).await
}

impl Fixture {
    async fn put(&self, key: &str, value: impl Into<Vec<u8>>) {
        self.client
            .clone()
            .put(key, value, None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    async fn get_json(&self, key: &str) -> Option<Value> {
        let response = self.client.clone().get(key, None).await.unwrap();
        response
            .kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).unwrap())
    }

    async fn mod_revision(&self, key: &str) -> i64 {
        let response = self.client.clone().get(key, None).await.unwrap();
        response.kvs().first().map_or(0, |kv| kv.mod_revision())
    }

    /// Every key under the cluster prefix.
    async fn all_keys(&self) -> Vec<String> {
        let options = GetOptions::new().with_prefix().with_keys_only();
        let response = self
            .client
            .clone()
            .get(self.keys.root(), Some(options))
            .await
            .unwrap();
        response
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_owned())
            .collect()
    }

    /// The keys under the prefix that belong to changefeed `cf`.
    async fn keys_of(&self, cf: &ChangefeedId) -> Vec<String> {
        self.all_keys()
            .await
            .into_iter()
            .filter(|key| match self.keys.parse(key) {
                Some(
                    Key::ChangefeedInfo(id)
                    | Key::ChangefeedStatus(id)
                    | Key::TaskStatus { changefeed: id, .. }
                    | Key::TaskPosition { changefeed: id, .. },
                ) => id == *cf,
                _ => false,
            })
            .collect()
    }

    async fn assign(&self, cf: &ChangefeedId, executor: &str, epoch: u64) {
        let task = json!({"epoch": epoch, "assigned_at": "2024-01-01T00:00:00Z"});
        self.put(&self.keys.task_status(cf, executor), task.to_string())
            .await;
    }

    async fn report(&self, cf: &ChangefeedId, executor: &str, epoch: u64) {
        let position = json!({"epoch": epoch, "checkpoint_ts": 1, "resolved_ts": 2});
        self.put(&self.keys.task_position(cf, executor), position.to_string())
            .await;
    }

    /// Rewrites one field of a changefeed's info by hand (as the owner would).
    async fn set_info(&self, cf: &ChangefeedId, field: &str, value: Value) {
        let key = self.keys.info(cf);
        let mut info = self.get_json(&key).await.expect("info exists");
        info[field] = value;
        self.put(&key, info.to_string()).await;
    }
}

fn create_req(namespace: Option<&str>, body: Value) -> test::TestRequest {
    let uri = match namespace {
        Some(ns) => format!("/api/v1/changefeeds?namespace={ns}"),
        None => "/api/v1/changefeeds".to_owned(),
    };
    test::TestRequest::post().uri(&uri).set_json(body)
}

fn feed_uri(id: &str, namespace: &str, action: &str) -> String {
    format!("/api/v1/changefeeds/{id}{action}?namespace={namespace}")
}

fn get_req(id: &str, namespace: &str) -> test::TestRequest {
    test::TestRequest::get().uri(&feed_uri(id, namespace, ""))
}

fn list_req(query: &str) -> test::TestRequest {
    test::TestRequest::get().uri(&format!("/api/v1/changefeeds{query}"))
}

fn pause_req(id: &str) -> test::TestRequest {
    test::TestRequest::post().uri(&feed_uri(id, "default", "/pause"))
}

fn resume_req(id: &str) -> test::TestRequest {
    test::TestRequest::post().uri(&feed_uri(id, "default", "/resume"))
}

fn update_req(id: &str, body: Value) -> test::TestRequest {
    test::TestRequest::put()
        .uri(&feed_uri(id, "default", ""))
        .set_json(body)
}

fn delete_req(id: &str, namespace: &str) -> test::TestRequest {
    test::TestRequest::delete().uri(&feed_uri(id, namespace, ""))
}

fn ids(list: &Value) -> Vec<&str> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {list}"))
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect()
}

#[actix_rt::test]
async fn create_get_and_list_by_namespace_and_state() {
    let f = fixture().await;
    let app = app!(f.state);
    let before = flotilla::owner::feeds::now_ts();

    let (status, a, headers) = call_full!(
        app,
        create_req(None, json!({"id": "cf-a", "sink_uri": "kafka://k:9092/t"}))
    );
    assert_eq!(status, StatusCode::CREATED, "{a}");
    assert_eq!(
        headers.get(header::LOCATION).unwrap(),
        "/api/v1/changefeeds/cf-a?namespace=default"
    );
    assert_eq!(a["namespace"], "default");
    assert_eq!(a["id"], "cf-a");
    assert_eq!(a["sink_uri"], "kafka://k:9092/t");
    assert_eq!(a["state"], "normal");
    assert_eq!(a["target_ts"], 0);
    assert_eq!(a["config"], json!({}));
    assert_eq!(a["selector"], json!({}));
    assert_eq!(a["epoch"], 0);
    assert_eq!(a["executor"], Value::Null);
    assert_eq!(a["error"], Value::Null);
    // The default start_ts is now as a TSO: unix millis << 18.
    let start_ts = a["start_ts"].as_u64().unwrap();
    assert!(start_ts >= before && start_ts <= flotilla::owner::feeds::now_ts());
    assert_eq!(a["checkpoint_ts"], start_ts);
    humantime::parse_rfc3339(a["create_time"].as_str().unwrap()).unwrap();

    let (status, b) = call!(
        app,
        create_req(
            Some("default"),
            json!({"id": "cf-b", "sink_uri": "mysql://db/x", "start_ts": 100, "target_ts": 200,
                   "config": {"workers": 4}, "selector": {"zone": "a"}})
        )
    );
    assert_eq!(status, StatusCode::CREATED, "{b}");
    assert_eq!(
        (&b["start_ts"], &b["target_ts"], &b["checkpoint_ts"]),
        (&json!(100), &json!(200), &json!(100))
    );
    // The same id in another namespace is another changefeed.
    let (status, other) = call!(
        app,
        create_req(
            Some("team-2"),
            json!({"id": "cf-a", "sink_uri": "blackhole://"})
        )
    );
    assert_eq!(status, StatusCode::CREATED, "{other}");
    assert_eq!(other["namespace"], "team-2");

    // Reads return what the create answered.
    let (status, got) = call!(app, get_req("cf-a", "default"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got, a);
    let (_, got) = call!(app, get_req("cf-b", "default"));
    assert_eq!(got, b);
    let (_, got) = call!(
        app,
        test::TestRequest::get().uri("/api/v1/changefeeds/cf-b")
    );
    assert_eq!(got, b, "the namespace defaults to `default`");
    let (_, got) = call!(app, get_req("cf-a", "team-2"));
    assert_eq!(got, other);
    let (status, body) = call!(app, get_req("cf-b", "team-2"));
    assert_error(status, &body, 404, "not_found");

    // The documented layout, as etcdctl would show it.
    let cf_b = ChangefeedId::new("default", "cf-b");
    let info = f
        .get_json(&format!("{PREFIX}/default/changefeed/info/cf-b"))
        .await
        .unwrap();
    assert_eq!(info["state"], "normal");
    assert_eq!(info["selector"], json!({"zone": "a"}));
    let status_value = f.get_json(&f.keys.status(&cf_b)).await.unwrap();
    let stored: ChangefeedStatus = serde_json::from_value(status_value).unwrap();
    assert_eq!((stored.checkpoint_ts, stored.epoch), (100, 0));

    // Lists are per namespace, sorted by id.
    let (status, list) = call!(app, list_req(""));
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(ids(&list), ["cf-a", "cf-b"]);
    assert_eq!(list["total"], 2);
    assert_eq!(list["items"][1], b);
    assert_eq!(list["unreadable"], json!([]));
    let (_, list) = call!(app, list_req("?namespace=team-2"));
    assert_eq!(ids(&list), ["cf-a"]);
    let (_, list) = call!(app, list_req("?namespace=empty"));
    assert_eq!((list["total"].clone(), ids(&list).len()), (json!(0), 0));

    // The state filter.
    let (status, body) = call!(app, pause_req("cf-b"));
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, list) = call!(app, list_req("?state=stopped"));
    assert_eq!(ids(&list), ["cf-b"]);
    let (_, list) = call!(app, list_req("?namespace=default&state=normal"));
    assert_eq!(ids(&list), ["cf-a"]);
    let (_, list) = call!(app, list_req("?state=failed"));
    assert!(ids(&list).is_empty(), "{list}");
    assert_eq!(
        list["total"], 2,
        "the namespace's changefeeds, before filters"
    );

    // The executor is the holder the owner recorded for the current epoch
    // (with the task, in one txn): a point read, no task key is read.
    let cf_a = ChangefeedId::new("default", "cf-a");
    f.assign(&cf_a, "exec-1", 1).await;
    f.assign(&cf_a, "exec-2", 2).await;
    let status = json!({"checkpoint_ts": start_ts + 7, "epoch": 2, "pending_reason": null,
                        "holder": {"executor": "exec-2", "epoch": 2}});
    f.put(&f.keys.status(&cf_a), status.to_string()).await;
    let (_, got) = call!(app, get_req("cf-a", "default"));
    assert_eq!(
        (&got["executor"], &got["epoch"]),
        (&json!("exec-2"), &json!(2))
    );
    // A holder of an older epoch (the changefeed was paused since) is none.
    let stale = json!({"checkpoint_ts": start_ts + 7, "epoch": 3,
                       "holder": {"executor": "exec-2", "epoch": 2}});
    f.put(&f.keys.status(&cf_a), stale.to_string()).await;
    let (_, got) = call!(app, get_req("cf-a", "default"));
    assert_eq!(got["executor"], Value::Null);
    f.put(&f.keys.status(&cf_a), status.to_string()).await;
    assert_eq!(got["checkpoint_ts"], start_ts + 7);
    let (_, list) = call!(app, list_req("?state=normal"));
    assert_eq!(list["items"][0]["executor"], "exec-2");
    // A changefeed of another namespace with the same id is not confused with it.
    let (_, got) = call!(app, get_req("cf-a", "team-2"));
    assert_eq!(got["executor"], Value::Null);
    // Pending: the owner's reason is shown.
    let status = json!({"checkpoint_ts": 100, "epoch": 0,
                        "pending_reason": "no live executor matches zone=a"});
    f.put(&f.keys.status(&cf_b), status.to_string()).await;
    let (_, got) = call!(app, get_req("cf-b", "default"));
    assert_eq!(got["pending_reason"], "no live executor matches zone=a");
}

#[actix_rt::test]
async fn duplicate_create_is_409_and_keeps_the_first() {
    let f = fixture().await;
    let app = app!(f.state);
    let (status, first) = call!(
        app,
        create_req(
            None,
            json!({"id": "dup", "sink_uri": "kafka://first", "start_ts": 10})
        )
    );
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let cf = ChangefeedId::new("default", "dup");
    let revisions = (
        f.mod_revision(&f.keys.info(&cf)).await,
        f.mod_revision(&f.keys.status(&cf)).await,
    );

    let (status, body) = call!(
        app,
        create_req(
            None,
            json!({"id": "dup", "sink_uri": "kafka://second", "start_ts": 20})
        )
    );
    assert_error(status, &body, 409, "changefeed_exists");
    let (_, got) = call!(app, get_req("dup", "default"));
    assert_eq!(got, first);
    assert_eq!(
        (
            f.mod_revision(&f.keys.info(&cf)).await,
            f.mod_revision(&f.keys.status(&cf)).await
        ),
        revisions,
        "the failed create wrote nothing"
    );
    // A leftover status alone also blocks a create: it cannot be overwritten.
    let ghost = ChangefeedId::new("default", "ghost");
    f.put(&f.keys.status(&ghost), r#"{"checkpoint_ts":5,"epoch":9}"#)
        .await;
    let (status, body) = call!(
        app,
        create_req(None, json!({"id": "ghost", "sink_uri": "kafka://x"}))
    );
    assert_error(status, &body, 409, "changefeed_exists");
    assert!(f.get_json(&f.keys.info(&ghost)).await.is_none());
}

#[actix_rt::test]
async fn concurrent_creates_of_one_id_yield_exactly_one_201() {
    let f = fixture().await;
    let app = app!(f.state);
    let requests = (0..20).map(|i| {
        let app = &app;
        async move {
            let (status, body) = call!(
                *app,
                create_req(
                    None,
                    json!({"id": "race", "sink_uri": format!("kafka://writer-{i}")})
                )
            );
            (status, body)
        }
    });
    let answers = futures::future::join_all(requests).await;
    let winners: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::CREATED)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    for (status, body) in &answers {
        if *status != StatusCode::CREATED {
            assert_error(*status, body, 409, "changefeed_exists");
        }
    }
    let (_, stored) = call!(app, get_req("race", "default"));
    assert_eq!(&stored, winners[0]);
}

#[actix_rt::test]
async fn concurrent_creates_go_to_etcd_together_and_each_gets_its_own_answer() {
    let f = fixture().await;
    let app = app!(f.state);
    for i in 0..4 {
        let (status, _) = call!(
            app,
            create_req(
                None,
                json!({"id": format!("old{i}"), "sink_uri": "kafka://old"})
            )
        );
        assert_eq!(status, StatusCode::CREATED);
    }
    let txns_before = f.etcd.txns_served(0);
    // 60 new ids, 4 that exist already, and one id asked for 4 times.
    let ids: Vec<String> = (0..60)
        .map(|i| format!("new{i:02}"))
        .chain((0..4).map(|i| format!("old{i}")))
        .chain((0..4).map(|_| "twice".to_string()))
        .collect();
    let requests = ids.iter().map(|id| {
        let app = &app;
        async move {
            let (status, body) = call!(
                *app,
                create_req(None, json!({"id": id, "sink_uri": format!("kafka://{id}")}))
            );
            (id.clone(), status, body)
        }
    });
    let answers = futures::future::join_all(requests).await;
    let txns = f.etcd.txns_served(0) - txns_before;
    let mut twice_created = 0;
    for (id, status, body) in &answers {
        if id.starts_with("new") {
            assert_eq!(*status, StatusCode::CREATED, "{id}: {body}");
            assert_eq!(body["id"], id.as_str());
            assert_eq!(body["sink_uri"], format!("kafka://{id}"));
        } else if id.starts_with("old") {
            assert_error(*status, body, 409, "changefeed_exists");
        } else if *status == StatusCode::CREATED {
            twice_created += 1;
        } else {
            assert_error(*status, body, 409, "changefeed_exists");
        }
    }
    assert_eq!(twice_created, 1, "{answers:?}");
    for (id, status, _) in &answers {
        if *status == StatusCode::CREATED {
            let (status, stored) = call!(app, get_req(id, "default"));
            assert_eq!(status, StatusCode::OK);
            assert_eq!(stored["sink_uri"], format!("kafka://{id}"));
        }
    }
    let (_, stored) = call!(app, get_req("old0", "default"));
    assert_eq!(stored["sink_uri"], "kafka://old", "an existing one is kept");
    // 68 creates arrived together: a handful of group txns (a failed compare
    // costs one more), not one each.
    assert!(txns <= 8, "{txns} txns for 68 concurrent creates");
}

#[actix_rt::test]
async fn pause_update_resume_flows() {
    let f = fixture().await;
    let app = app!(f.state);
    let cf = ChangefeedId::new("default", "flow");
    let (status, created) = call!(
        app,
        create_req(
            None,
            json!({"id": "flow", "sink_uri": "kafka://k/t", "start_ts": 1000, "target_ts": 9000})
        )
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");

    // A running changefeed cannot be updated.
    let (status, body) = call!(
        app,
        update_req("flow", json!({"sink_uri": "kafka://other"}))
    );
    assert_error(status, &body, 409, "changefeed_not_paused");
    let (_, got) = call!(app, get_req("flow", "default"));
    assert_eq!(got["sink_uri"], "kafka://k/t");

    // Pause, twice: the second is a no-op.
    let epoch = created["epoch"].as_u64().unwrap();
    let (status, paused) = call!(app, pause_req("flow"));
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(paused["state"], "stopped");
    let paused_epoch = paused["epoch"].as_u64().unwrap();
    assert!(paused_epoch > epoch, "a pause starts a new epoch");
    let revision = f.mod_revision(&f.keys.info(&cf)).await;
    let (status, again) = call!(app, pause_req("flow").set_json(json!({})));
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again, paused);
    assert_eq!(f.mod_revision(&f.keys.info(&cf)).await, revision);

    // Update while paused; each given field replaces the stored one.
    let (status, updated) = call!(
        app,
        update_req(
            "flow",
            json!({"sink_uri": "blackhole://", "config": {"a": 1}, "selector": {"zone": "b"}})
        )
    );
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["sink_uri"], "blackhole://");
    assert_eq!(updated["config"], json!({"a": 1}));
    assert_eq!(updated["selector"], json!({"zone": "b"}));
    assert_eq!(updated["state"], "stopped");
    assert!(
        updated["epoch"].as_u64().unwrap() > paused_epoch,
        "an update starts a new epoch"
    );
    let (status, updated) = call!(app, update_req("flow", json!({"config": {"b": 2}})));
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(
        (&updated["sink_uri"], &updated["config"]),
        (&json!("blackhole://"), &json!({"b": 2}))
    );
    let (_, got) = call!(app, get_req("flow", "default"));
    assert_eq!(got, updated);
    let (status, body) = call!(app, update_req("flow", json!({})));
    assert_error(status, &body, 400, "invalid_argument");
    let (status, body) = call!(app, update_req("missing", json!({"config": {}})));
    assert_error(status, &body, 404, "not_found");

    // Resume from a checkpoint outside [start_ts, target_ts): refused.
    for bad in [999, 9000, 10_000] {
        let (status, body) = call!(
            app,
            resume_req("flow").set_json(json!({"checkpoint_ts": bad}))
        );
        assert_error(status, &body, 400, "invalid_argument");
    }
    // The owner had recorded errors and a backoff.
    let status_key = f.keys.status(&cf);
    let status = json!({"checkpoint_ts": 3000, "epoch": 4, "retries": 3, "retry_after_ms": 99});
    f.put(&status_key, status.to_string()).await;
    let (status, resumed) = call!(
        app,
        resume_req("flow").set_json(json!({"checkpoint_ts": 5000}))
    );
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(resumed["state"], "normal");
    assert_eq!(resumed["checkpoint_ts"], 5000);
    // Above the old one and above the revision it was decided at: epochs rise
    // across a delete and a create too.
    let resumed_epoch = resumed["epoch"].as_u64().unwrap();
    assert!(resumed_epoch > 4, "a resume starts a new epoch");
    let stored: ChangefeedStatus =
        serde_json::from_value(f.get_json(&status_key).await.unwrap()).unwrap();
    assert_eq!(
        (
            stored.checkpoint_ts,
            stored.epoch,
            stored.retries,
            stored.retry_after_ms
        ),
        (5000, resumed_epoch, 0, 0)
    );
    // Resuming a running changefeed: a no-op, unless it asks for a checkpoint.
    let revision = f.mod_revision(&f.keys.info(&cf)).await;
    let (status, again) = call!(app, resume_req("flow"));
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again, resumed);
    assert_eq!(f.mod_revision(&f.keys.info(&cf)).await, revision);
    let (status, body) = call!(
        app,
        resume_req("flow").set_json(json!({"checkpoint_ts": 6000}))
    );
    assert_error(status, &body, 409, "changefeed_not_paused");

    // Failed (as the owner marks it): not pausable, not updatable; resume
    // clears the error and the retry count, keeps the checkpoint, and starts
    // a new epoch.
    f.set_info(&cf, "state", json!("failed")).await;
    f.set_info(&cf, "error", json!("sink unreachable")).await;
    let status = json!({"checkpoint_ts": 5500, "epoch": 6, "retries": 5});
    f.put(&status_key, status.to_string()).await;
    let (_, got) = call!(app, get_req("flow", "default"));
    assert_eq!(
        (&got["state"], &got["error"]),
        (&json!("failed"), &json!("sink unreachable"))
    );
    let (status, body) = call!(app, pause_req("flow"));
    assert_error(status, &body, 409, "changefeed_wrong_state");
    let (status, body) = call!(app, update_req("flow", json!({"sink_uri": "kafka://x"})));
    assert_error(status, &body, 409, "changefeed_not_paused");
    let (status, resumed) = call!(app, resume_req("flow"));
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(
        (
            &resumed["state"],
            &resumed["error"],
            &resumed["checkpoint_ts"]
        ),
        (&json!("normal"), &Value::Null, &json!(5500))
    );
    let stored: ChangefeedStatus =
        serde_json::from_value(f.get_json(&status_key).await.unwrap()).unwrap();
    assert_eq!(stored.retries, 0);
    assert!(stored.epoch > 6, "{}", stored.epoch);

    // Finished: neither pause nor resume.
    f.set_info(&cf, "state", json!("finished")).await;
    let (status, body) = call!(app, pause_req("flow"));
    assert_error(status, &body, 409, "changefeed_wrong_state");
    let (status, body) = call!(app, resume_req("flow"));
    assert_error(status, &body, 409, "changefeed_wrong_state");
    let (status, body) = call!(app, pause_req("missing"));
    assert_error(status, &body, 404, "not_found");
    let (status, body) = call!(app, resume_req("missing"));
    assert_error(status, &body, 404, "not_found");
}

#[actix_rt::test]
async fn concurrent_updates_each_answer_what_they_wrote() {
    let f = fixture().await;
    let app = app!(f.state);
    let (status, _) = call!(
        app,
        create_req(None, json!({"id": "busy", "sink_uri": "kafka://0"}))
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = call!(app, pause_req("busy"));
    assert_eq!(status, StatusCode::OK);

    let requests = (1..=8).map(|i| {
        let app = &app;
        async move {
            let sink = format!("kafka://{i}");
            let (status, body) = call!(*app, update_req("busy", json!({"sink_uri": sink})));
            (sink, status, body)
        }
    });
    let answers = futures::future::join_all(requests).await;
    let mut written = BTreeSet::new();
    for (sink, status, body) in &answers {
        if *status == StatusCode::OK {
            // The answer is read in the txn that wrote it.
            assert_eq!(body["sink_uri"], *sink, "{body}");
            written.insert(sink.clone());
        } else {
            // Losing every compare is possible with this many writers at once.
            assert_error(*status, body, 409, "conflict");
        }
    }
    assert!(!written.is_empty(), "{answers:?}");
    let (_, got) = call!(app, get_req("busy", "default"));
    assert!(
        written.contains(got["sink_uri"].as_str().unwrap()),
        "{got} is not one of the acknowledged writes {written:?}"
    );
}

#[actix_rt::test]
async fn delete_removes_the_info_and_status_and_leaves_the_tasks_to_the_owner() {
    let f = fixture().await;
    let app = app!(f.state);
    for (ns, id) in [
        ("default", "doomed"),
        ("default", "kept"),
        ("other", "doomed"),
    ] {
        let (status, body) = call!(
            app,
            create_req(Some(ns), json!({"id": id, "sink_uri": "kafka://k"}))
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let doomed = ChangefeedId::new("default", "doomed");
    let kept = ChangefeedId::new("default", "kept");
    let namesake = ChangefeedId::new("other", "doomed");
    // Assignments and progress, as the owner writes them; exec-3 only has a
    // position left (its assignment already moved).
    f.assign(&doomed, "exec-1", 1).await;
    f.report(&doomed, "exec-1", 1).await;
    f.assign(&doomed, "exec-2", 2).await;
    f.report(&doomed, "exec-2", 2).await;
    f.report(&doomed, "exec-3", 0).await;
    f.put(&f.keys.status(&doomed), r#"{"checkpoint_ts":1,"epoch":2}"#)
        .await;
    for cf in [&kept, &namesake] {
        f.assign(cf, "exec-1", 1).await;
        f.report(cf, "exec-1", 1).await;
    }
    // A changefeed whose id extends the deleted one's.
    let (status, _) = call!(
        app,
        create_req(None, json!({"id": "doomed-2", "sink_uri": "kafka://k"}))
    );
    assert_eq!(status, StatusCode::CREATED);
    let longer = ChangefeedId::new("default", "doomed-2");
    f.assign(&longer, "exec-1", 1).await;
    assert_eq!(f.keys_of(&doomed).await.len(), 7);
    let survivors: Vec<String> = f
        .all_keys()
        .await
        .into_iter()
        .filter(|key| !f.keys_of_sync(&doomed, key))
        .collect();
    assert_eq!(survivors.len(), 4 + 4 + 3, "{survivors:?}");

    let tasks: Vec<String> = f
        .keys_of(&doomed)
        .await
        .into_iter()
        .filter(|k| k.contains("/task/"))
        .collect();
    assert_eq!(tasks.len(), 5);
    let (status, body) = call!(app, delete_req("doomed", "default"));
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // The task keys are the owner's: it deletes each once released (its
    // executor acknowledged the stop, or its lease lapsed).
    assert_eq!(f.keys_of(&doomed).await, tasks);
    let mut expected = survivors.clone();
    expected.extend(tasks.iter().cloned());
    expected.sort();
    assert_eq!(
        f.all_keys().await,
        expected,
        "only its info and status are gone"
    );
    let (status, body) = call!(app, get_req("doomed", "default"));
    assert_error(status, &body, 404, "not_found");
    let (status, body) = call!(app, delete_req("doomed", "default"));
    assert_error(status, &body, 404, "not_found");
    let (status, list) = call!(app, list_req(""));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&list), ["doomed-2", "kept"]);
    let (status, got) = call!(app, get_req("doomed", "other"));
    assert_eq!(status, StatusCode::OK, "{got}");

    // Task keys without an info or status: nothing of the API's to delete.
    let orphan = ChangefeedId::new("default", "orphan");
    f.report(&orphan, "exec-9", 3).await;
    f.assign(&orphan, "exec-8", 3).await;
    let (status, body) = call!(app, delete_req("orphan", "default"));
    assert_error(status, &body, 404, "not_found");
    assert_eq!(f.keys_of(&orphan).await.len(), 2);
}

#[actix_rt::test]
async fn delete_of_a_changefeed_with_more_task_keys_than_one_txn_holds_is_one_small_txn() {
    let f = fixture().await;
    let app = app!(f.state);
    let (status, body) = call!(
        app,
        create_req(None, json!({"id": "wide", "sink_uri": "kafka://k"}))
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let wide = ChangefeedId::new("default", "wide");
    // 150 executors' task status and position: 302 keys, more than etcd's
    // 128 operations per txn.
    for i in 0..150 {
        let executor = format!("exec-{i:03}");
        f.assign(&wide, &executor, 1).await;
        f.report(&wide, &executor, 1).await;
    }
    assert_eq!(f.keys_of(&wide).await.len(), 302);
    let (status, body) = call!(app, delete_req("wide", "default"));
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // The info and the status; the 300 task keys are left to the owner.
    assert_eq!(f.keys_of(&wide).await.len(), 300);
    let (status, body) = call!(app, delete_req("wide", "default"));
    assert_error(status, &body, 404, "not_found");
}

impl Fixture {
    fn keys_of_sync(&self, cf: &ChangefeedId, key: &str) -> bool {
        matches!(
            self.keys.parse(key),
            Some(
                Key::ChangefeedInfo(id)
                | Key::ChangefeedStatus(id)
                | Key::TaskStatus { changefeed: id, .. }
                | Key::TaskPosition { changefeed: id, .. },
            ) if id == *cf
        )
    }
}

#[actix_rt::test]
async fn bad_inputs_are_400_invalid_argument_and_write_nothing() {
    let f = fixture().await;
    let app = app!(f.state);
    let long = "x".repeat(129);
    let base = |extra: Value| {
        let mut body = json!({"id": "ok", "sink_uri": "kafka://k"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let creates: Vec<(&str, Option<&str>, Value)> = vec![
        ("id with a space", None, base(json!({"id": "bad id"}))),
        ("id with a dot", None, base(json!({"id": "a.b"}))),
        ("empty id", None, base(json!({"id": ""}))),
        ("reserved id", None, base(json!({"id": "__meta__"}))),
        ("id too long", None, base(json!({"id": long}))),
        ("id not a string", None, base(json!({"id": 5}))),
        ("namespace with a dot", Some("bad.ns"), base(json!({}))),
        ("empty namespace", Some(""), base(json!({}))),
        ("reserved namespace", Some("__meta__"), base(json!({}))),
        ("namespace too long", Some(long.as_str()), base(json!({}))),
        ("empty sink", None, base(json!({"sink_uri": ""}))),
        (
            "sink without scheme",
            None,
            base(json!({"sink_uri": "localhost:9092"})),
        ),
        (
            "sink too long",
            None,
            base(json!({"sink_uri": format!("kafka://{}", "h".repeat(1020))})),
        ),
        ("missing sink", None, json!({"id": "ok"})),
        (
            "selector key",
            None,
            base(json!({"selector": {"-zone": "a"}})),
        ),
        (
            "selector value",
            None,
            base(json!({"selector": {"zone": ""}})),
        ),
        (
            "selector too long",
            None,
            base(json!({"selector": {"z": "a".repeat(64)}})),
        ),
        (
            "target = start",
            None,
            base(json!({"start_ts": 100, "target_ts": 100})),
        ),
        (
            "target < start",
            None,
            base(json!({"start_ts": 100, "target_ts": 50})),
        ),
        ("negative start", None, base(json!({"start_ts": -1}))),
        ("config array", None, base(json!({"config": [1, 2]}))),
        ("config string", None, base(json!({"config": "x"}))),
        (
            "config too big",
            None,
            base(json!({"config": {"x": "y".repeat(65 * 1024)}})),
        ),
        ("unknown field", None, base(json!({"bogus": 1}))),
    ];
    for (what, ns, body) in creates {
        let (status, answer) = call!(app, create_req(ns, body));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        assert_error(status, &answer, 400, "invalid_argument");
    }
    // Malformed bodies and queries.
    let (status, body) = call!(
        app,
        test::TestRequest::post()
            .uri("/api/v1/changefeeds")
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .set_payload("{not json")
    );
    assert_error(status, &body, 400, "invalid_argument");
    let (status, body) = call!(app, test::TestRequest::post().uri("/api/v1/changefeeds"));
    assert_error(status, &body, 400, "invalid_argument");
    // The fields as an array: serde alone would take it for the object.
    let (status, body) = call!(
        app,
        test::TestRequest::post()
            .uri("/api/v1/changefeeds")
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .set_payload(r#"["array", "kafka://k"]"#)
    );
    assert_error(status, &body, 400, "invalid_argument");
    assert!(
        body["message"].as_str().unwrap().contains("JSON object"),
        "{body}"
    );
    let (status, body) = call!(
        app,
        test::TestRequest::post()
            .uri("/api/v1/changefeeds")
            .set_payload(r#"{"id":"x","sink_uri":"kafka://k"}"#)
    );
    assert_error(status, &body, 415, "unsupported_media_type");
    for query in ["?state=running", "?namespace=a.b", "?page=2"] {
        let (status, body) = call!(app, list_req(query));
        assert_error(status, &body, 400, "invalid_argument");
    }
    assert!(f.all_keys().await.is_empty(), "nothing was written");

    // With a changefeed in place: bad ids in paths, unknown fields in bodies.
    let (status, _) = call!(
        app,
        create_req(None, json!({"id": "ok", "sink_uri": "kafka://k"}))
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = call!(app, test::TestRequest::get().uri("/api/v1/changefeeds/a.b"));
    assert_error(status, &body, 400, "invalid_argument");
    let (status, body) = call!(
        app,
        test::TestRequest::get().uri("/api/v1/changefeeds/ok?bogus=1")
    );
    assert_error(status, &body, 400, "invalid_argument");
    let (status, body) = call!(app, pause_req("ok").set_json(json!({"force": true})));
    assert_error(status, &body, 400, "invalid_argument");
    let (status, body) = call!(app, resume_req("ok").set_json(json!({"checkpoint": 5})));
    assert_error(status, &body, 400, "invalid_argument");
    let (status, _) = call!(app, pause_req("ok"));
    assert_eq!(status, StatusCode::OK);
    for body in [
        json!({"target_ts": 5}),
        json!({"sink_uri": "nope"}),
        json!({"selector": {"a": "b/c"}}),
        json!({"config": 1}),
    ] {
        let (status, answer) = call!(app, update_req("ok", body.clone()));
        assert_error(status, &answer, 400, "invalid_argument");
    }
    let (status, body) = call!(
        app,
        test::TestRequest::patch().uri("/api/v1/changefeeds/ok")
    );
    assert_error(status, &body, 405, "method_not_allowed");
    let (_, got) = call!(app, get_req("ok", "default"));
    assert_eq!(got["sink_uri"], "kafka://k");
}

/// Builds a fresh request each time it is called.
type RequestMaker = Box<dyn Fn() -> test::TestRequest>;

#[actix_rt::test]
async fn mutations_need_the_admin_token_when_one_is_set() {
    let f = fixture_with(Some(ADMIN), Duration::from_secs(5)).await;
    let app = app!(f.state);
    let create = || create_req(None, json!({"id": "guarded", "sink_uri": "kafka://k"}));
    let mutations: Vec<(&str, RequestMaker)> = vec![
        ("create", Box::new(create)),
        (
            "update",
            Box::new(|| update_req("guarded", json!({"sink_uri": "kafka://x"}))),
        ),
        ("pause", Box::new(|| pause_req("guarded"))),
        ("resume", Box::new(|| resume_req("guarded"))),
        ("delete", Box::new(|| delete_req("guarded", "default"))),
    ];
    for (what, request) in &mutations {
        let (status, body, headers) = call_full!(app, request());
        assert_error(status, &body, 401, "unauthorized");
        assert_eq!(
            headers.get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer",
            "{what}"
        );
        let (status, body) = call!(
            app,
            request().insert_header((header::AUTHORIZATION, "Bearer wrong-token"))
        );
        assert_error(status, &body, 401, "unauthorized");
        let (status, body) = call!(
            app,
            request().insert_header((header::AUTHORIZATION, format!("Basic {ADMIN}")))
        );
        assert_error(status, &body, 401, "unauthorized");
    }
    assert!(f.all_keys().await.is_empty(), "nothing was written");

    let admin = |req: test::TestRequest| {
        req.insert_header((header::AUTHORIZATION, format!("Bearer {ADMIN}")))
    };
    let (status, body) = call!(app, admin(create()));
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Reads need no token.
    let (status, _) = call!(app, get_req("guarded", "default"));
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call!(app, list_req(""));
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call!(app, admin(pause_req("guarded")));
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call!(
        app,
        admin(update_req("guarded", json!({"sink_uri": "kafka://x"})))
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call!(
        app,
        resume_req("guarded").insert_header((header::AUTHORIZATION, format!("bearer {ADMIN}")))
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call!(app, admin(delete_req("guarded", "default")));
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
}

#[actix_rt::test]
async fn etcd_down_is_503_etcd_unavailable_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    let mut f = fixture_with(None, timeout).await;
    let app = app!(f.state);
    let (status, _) = call!(
        app,
        create_req(None, json!({"id": "cf", "sink_uri": "kafka://k"}))
    );
    assert_eq!(status, StatusCode::CREATED);

    f.etcd.kill(0);
    let requests: Vec<(&str, test::TestRequest)> = vec![
        ("get", get_req("cf", "default")),
        ("list", list_req("")),
        (
            "create",
            create_req(None, json!({"id": "new", "sink_uri": "kafka://k"})),
        ),
        ("pause", pause_req("cf")),
        ("update", update_req("cf", json!({"sink_uri": "kafka://x"}))),
        ("resume", resume_req("cf")),
        ("delete", delete_req("cf", "default")),
    ];
    for (what, request) in requests {
        let started = Instant::now();
        let (status, body, headers) = call_full!(app, request);
        let took = started.elapsed();
        assert_error(status, &body, 503, "etcd_unavailable");
        assert!(headers.contains_key(header::RETRY_AFTER), "{what}");
        assert!(took < Duration::from_secs(2), "{what} took {took:?}");
    }

    // Back up: the changefeed is there, untouched.
    f.etcd.restart(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = call!(app, get_req("cf", "default"));
        if status == StatusCode::OK {
            assert_eq!(body["state"], "normal");
            break;
        }
        assert!(Instant::now() < deadline, "etcd did not come back: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, list) = call!(app, list_req(""));
    assert_eq!(ids(&list), ["cf"]);
}

#[actix_rt::test]
async fn malformed_values_are_reported_and_do_not_hide_the_others() {
    let f = fixture().await;
    let app = app!(f.state);
    for id in ["good", "bad-info", "bad-status"] {
        let (status, _) = call!(
            app,
            create_req(None, json!({"id": id, "sink_uri": "kafka://k"}))
        );
        assert_eq!(status, StatusCode::CREATED);
    }
    let bad_info = ChangefeedId::new("default", "bad-info");
    let bad_status = ChangefeedId::new("default", "bad-status");
    f.put(&f.keys.info(&bad_info), "{not json").await;
    // The status's fields as an array: a record only when read as an object.
    f.put(&f.keys.status(&bad_status), r#"[7, 3]"#).await;
    // A malformed assignment only hides the executor.
    let good = ChangefeedId::new("default", "good");
    f.put(&f.keys.task_status(&good, "exec-1"), "garbage").await;

    for (id, key) in [
        ("bad-info", f.keys.info(&bad_info)),
        ("bad-status", f.keys.status(&bad_status)),
    ] {
        let (status, body) = call!(app, get_req(id, "default"));
        assert_error(status, &body, 500, "corrupt_value");
        assert!(body["message"].as_str().unwrap().contains(&key), "{body}");
    }
    let (status, got) = call!(app, get_req("good", "default"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["executor"], Value::Null);

    let (status, list) = call!(app, list_req(""));
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(ids(&list), ["good"]);
    assert_eq!(
        list["total"], 3,
        "every changefeed of the namespace, unreadable ones too"
    );
    let unreadable: Vec<(&str, &str)> = list["unreadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["id"].as_str().unwrap(), u["key"].as_str().unwrap()))
        .collect();
    let (info_key, status_key) = (f.keys.info(&bad_info), f.keys.status(&bad_status));
    assert_eq!(
        unreadable,
        [
            ("bad-info", info_key.as_str()),
            ("bad-status", status_key.as_str())
        ]
    );

    // Mutations that would need the malformed value write nothing.
    let revision = f.mod_revision(&f.keys.info(&bad_status)).await;
    let (status, body) = call!(app, pause_req("bad-status"));
    assert_error(status, &body, 500, "corrupt_value");
    assert_eq!(f.mod_revision(&f.keys.info(&bad_status)).await, revision);
    let (status, body) = call!(app, pause_req("bad-info"));
    assert_error(status, &body, 500, "corrupt_value");
    // Resuming from a checkpoint replaces a malformed status.
    f.set_info(&bad_status, "state", json!("stopped")).await;
    let (status, body) = call!(
        app,
        resume_req("bad-status").set_json(json!({"checkpoint_ts": 1}))
    );
    assert_eq!(status, StatusCode::BAD_REQUEST, "below start_ts: {body}");
    let start_ts = f.get_json(&f.keys.info(&bad_status)).await.unwrap()["start_ts"]
        .as_u64()
        .unwrap();
    let (status, body) = call!(
        app,
        resume_req("bad-status").set_json(json!({"checkpoint_ts": start_ts + 1}))
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checkpoint_ts"], start_ts + 1);
    // Delete works whatever the values are.
    let (status, body) = call!(app, delete_req("bad-info", "default"));
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(f.keys_of(&bad_info).await.is_empty());
    let (_, list) = call!(app, list_req(""));
    assert_eq!(ids(&list), ["bad-status", "good"]);
    assert_eq!(list["unreadable"], json!([]));
}

#[actix_rt::test]
async fn without_etcd_the_routes_are_503_unavailable() {
    harness::init_tracing();
    let client = crate::harness::app::closed_etcd().await;
    let info = crate::harness::app::server_info();
    let state = web::Data::new(
        AppState::new(info, EtcdProbe::new(client, Duration::from_millis(100)))
            .with_max_body_bytes(MAX_BODY)
            .with_max_heartbeat_bytes(MAX_BODY),
    );
    let app = test::init_service(App::new().configure(http::configure(state))).await;
    let (status, body) = call!(app, list_req(""));
    assert_error(status, &body, 503, "unavailable");
    let (status, body) = call!(
        app,
        create_req(None, json!({"id": "x", "sink_uri": "kafka://k"}))
    );
    assert_error(status, &body, 503, "unavailable");
}

#[actix_rt::test]
async fn reads_span_many_pages() {
    let f = fixture().await;
    let app = app!(f.state);
    // More changefeeds and assignments than one page holds (PAGE_KEYS = 256),
    // written straight to etcd, 40 changefeeds (120 keys) per txn.
    let count = 700;
    let names: Vec<String> = (0..count).map(|i| format!("cf-{i:04}")).collect();
    let executor = |i: usize| format!("exec-{}", i % 7);
    for (n, chunk) in names.chunks(40).enumerate() {
        let mut ops = Vec::new();
        for (i, id) in chunk.iter().enumerate() {
            let cf = ChangefeedId::new("default", id.as_str());
            let info = json!({"sink_uri": "kafka://k", "start_ts": 1, "target_ts": 0,
                              "config": {}, "selector": {}, "state": "normal",
                              "create_time": "2024-01-01T00:00:00Z"});
            let executor = executor(n * 40 + i);
            let status = json!({"checkpoint_ts": 1, "epoch": 1,
                                "holder": {"executor": executor, "epoch": 1}});
            let task = json!({"epoch": 1, "assigned_at": "2024-01-01T00:00:00Z"});
            ops.push(etcd_client::TxnOp::put(
                f.keys.info(&cf),
                info.to_string(),
                None,
            ));
            ops.push(etcd_client::TxnOp::put(
                f.keys.status(&cf),
                status.to_string(),
                None,
            ));
            ops.push(etcd_client::TxnOp::put(
                f.keys.task_status(&cf, &executor),
                task.to_string(),
                None,
            ));
        }
        f.client
            .clone()
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    // The last one moved to "exec-z", whose keys sort after all the others.
    let last = ChangefeedId::new("default", "cf-0699");
    f.client
        .clone()
        .delete(f.keys.task_status(&last, &executor(count - 1)), None)
        .await
        .unwrap();
    f.assign(&last, "exec-z", 1).await;
    f.report(&last, "exec-z", 1).await;
    let status = json!({"checkpoint_ts": 1, "epoch": 1,
                        "holder": {"executor": "exec-z", "epoch": 1}});
    f.put(&f.keys.status(&last), status.to_string()).await;

    let (status, list) = call!(app, list_req("?limit=5000"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["total"], count);
    assert!(list.get("continue").is_none(), "one page holds them all");
    let listed: Vec<&str> = ids(&list);
    assert_eq!(listed, names.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|item| item["executor"].is_string()));
    assert_eq!(list["items"][count - 1]["executor"], "exec-z");
    // Filtered on the server: the holder, the state.
    let (status, held) = call!(app, list_req("?executor=exec-z"));
    assert_eq!(status, StatusCode::OK, "{held}");
    assert_eq!(ids(&held), vec!["cf-0699"]);
    assert_eq!(held["total"], count, "the total is before the filters");
    let (_, stopped) = call!(app, list_req("?state=stopped&limit=5000"));
    assert!(ids(&stopped).is_empty(), "{stopped}");
    // Without a limit: the first page of the default 500, and a way on.
    let (_, first) = call!(app, list_req(""));
    assert_eq!(ids(&first).len(), 500);
    assert!(first["continue"].is_string(), "{first}");

    // One changefeed: its info and status only.
    let (status, got) = call!(app, get_req("cf-0699", "default"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["executor"], "exec-z");
    let (status, _) = call!(app, delete_req("cf-0699", "default"));
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Its task keys (status and position) stay for the owner to release.
    assert_eq!(f.keys_of(&last).await.len(), 2);
    assert_eq!(f.all_keys().await.len(), 3 * (count - 1) + 2);
}

/// Writes changefeeds straight to etcd (info and status), 50 per txn.
async fn put_feeds(f: &Fixture, namespace: &str, names: &[String]) {
    for chunk in names.chunks(50) {
        let mut ops = Vec::new();
        for id in chunk {
            let cf = ChangefeedId::new(namespace, id.as_str());
            let info = json!({"sink_uri": "kafka://k", "start_ts": 1, "target_ts": 0,
                              "config": {}, "selector": {}, "state": "normal",
                              "create_time": "2024-01-01T00:00:00Z"});
            let status = json!({"checkpoint_ts": 1, "epoch": 1});
            ops.push(etcd_client::TxnOp::put(
                f.keys.info(&cf),
                info.to_string(),
                None,
            ));
            ops.push(etcd_client::TxnOp::put(
                f.keys.status(&cf),
                status.to_string(),
                None,
            ));
        }
        f.client
            .clone()
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
}

/// A walk over the pages sees every changefeed that existed when it began
/// exactly once, in order, while others are created and deleted between its
/// pages (before and after where it stands); a new listing then sees them.
#[actix_rt::test]
async fn a_paged_walk_sees_every_changefeed_once_while_others_come_and_go() {
    let f = fixture().await;
    let app = app!(f.state);
    let names: Vec<String> = (0..1000).map(|i| format!("cf-{i:04}")).collect();
    put_feeds(&f, "default", &names).await;
    let mut listed: Vec<String> = Vec::new();
    let mut query = "?limit=150".to_owned();
    let mut pages = 0;
    let (mut created, mut deleted) = (0, 0);
    loop {
        let (status, page) = call!(app, list_req(&query));
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["total"], 1000, "every page counts the snapshot");
        assert!(ids(&page).len() <= 150);
        listed.extend(ids(&page).into_iter().map(str::to_owned));
        pages += 1;
        // Meanwhile: new ones on both sides of where the walk stands, and
        // deletes of ones it listed and of ones it has not reached.
        let fresh: Vec<String> = [pages * 97 % 1000, (pages * 131 + 500) % 1000]
            .iter()
            .map(|i| format!("cf-{i:04}-new{pages}"))
            .collect();
        put_feeds(&f, "default", &fresh).await;
        created += fresh.len();
        for i in [pages * 53 % 1000, (pages * 211 + 700) % 1000] {
            let (status, _) = call!(app, delete_req(&format!("cf-{i:04}"), "default"));
            if status == StatusCode::NO_CONTENT {
                deleted += 1;
            }
        }
        match page["continue"].as_str() {
            Some(token) => query = format!("?limit=150&continue={token}"),
            None => break,
        }
    }
    assert_eq!(pages, 7, "1000 in pages of 150");
    assert_eq!(listed, names, "each once, in order, none of the new ones");
    let (_, now) = call!(app, list_req("?limit=5000"));
    assert_eq!(now["total"], 1000 + created - deleted);
    assert_eq!(ids(&now).len(), 1000 + created - deleted);
}

/// A token whose revision etcd compacted is 410 `expired_continue`; a token
/// that is not one of ours, one of another namespace, or a bad limit is 400.
#[actix_rt::test]
async fn paging_refuses_expired_tokens_with_410_and_bad_ones_with_400() {
    let f = fixture().await;
    let app = app!(f.state);
    let names: Vec<String> = (0..30).map(|i| format!("cf-{i:02}")).collect();
    put_feeds(&f, "default", &names).await;
    let (_, first) = call!(app, list_req("?limit=10"));
    let token = first["continue"].as_str().expect("more pages").to_owned();
    let (status, second) = call!(app, list_req(&format!("?limit=10&continue={token}")));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&second)[0], "cf-10");

    for (query, what) in [
        ("?limit=0".to_owned(), "limit 0"),
        ("?limit=5001".to_owned(), "limit over the maximum"),
        ("?limit=ten".to_owned(), "limit not a number"),
        ("?continue=zz".to_owned(), "not hex"),
        ("?continue=abc".to_owned(), "odd length"),
        ("?continue=7b7d".to_owned(), "hex of {}"),
        (
            format!("?namespace=other&continue={token}"),
            "another namespace's token",
        ),
    ] {
        let (status, body) = call!(app, list_req(&query));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_error(status, &body, 400, "invalid_argument");
    }

    // Writes move the revision on; compaction past the token's revision.
    f.put(&format!("{PREFIX}/unrelated"), "x").await;
    let revision = f
        .client
        .clone()
        .get(format!("{PREFIX}/unrelated"), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    f.etcd.compact(revision).await;
    let (status, body) = call!(app, list_req(&format!("?limit=10&continue={token}")));
    assert_error(status, &body, 410, "expired_continue");
    // Listing again works.
    let (status, again) = call!(app, list_req("?limit=10"));
    assert_eq!(status, StatusCode::OK, "{again}");
}

/// One changefeed's get, pause and resume read what concerns it alone: what
/// etcd sends for them is the same with 10 changefeeds as with 2,010.
#[actix_rt::test]
async fn one_changefeed_s_operations_cost_the_same_whatever_the_namespace_holds() {
    let f = fixture().await;
    let app = app!(f.state);
    let few: Vec<String> = (0..10).map(|i| format!("cf-{i:04}")).collect();
    put_feeds(&f, "default", &few).await;
    let cost = |id: &'static str| {
        let app = &app;
        let f = &f;
        async move {
            let before = f.etcd.bytes_sent(0);
            let (status, _) = call!(*app, get_req(id, "default"));
            assert_eq!(status, StatusCode::OK);
            let (status, _) = call!(*app, pause_req(id));
            assert_eq!(status, StatusCode::OK);
            let (status, _) = call!(
                *app,
                test::TestRequest::post().uri(&feed_uri(id, "default", "/resume"))
            );
            assert_eq!(status, StatusCode::OK);
            f.etcd.bytes_sent(0) - before
        }
    };
    let small = cost("cf-0001").await;
    let many: Vec<String> = (10..2010).map(|i| format!("cf-{i:04}")).collect();
    put_feeds(&f, "default", &many).await;
    let large = cost("cf-0002").await;
    assert!(small > 0, "etcd counted the requests");
    assert!(
        large.abs_diff(small) <= 256,
        "etcd sent {small} bytes for one changefeed among 10, {large} among 2,010"
    );
}

/// A batch creates every item that does not exist yet, in few txns, and names
/// each existing one; an item that breaks a rule, an id given twice, a body
/// that is not one, too many items or a missing admin token refuse the whole
/// batch and write nothing.
#[actix_rt::test]
async fn a_batch_creates_the_new_items_names_the_existing_and_refuses_a_bad_one_whole() {
    let f = fixture_with(Some(ADMIN), Duration::from_secs(5)).await;
    let app = app!(f.state);
    put_feeds(&f, "default", &["cf-0005".to_owned(), "cf-0150".to_owned()]).await;
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"id": format!("cf-{i:04}"), "sink_uri": "kafka://k/t"}))
        .collect();
    let batch = |body: Value, token: Option<&str>| {
        let mut req = test::TestRequest::post()
            .uri("/api/v1/changefeeds:batch")
            .set_json(body);
        if let Some(token) = token {
            req = req.insert_header((header::AUTHORIZATION, format!("Bearer {token}")));
        }
        req
    };
    let (status, body) = call!(app, batch(json!({"items": items}), None));
    assert_error(status, &body, 401, "unauthorized");
    assert!(
        f.all_keys().await.len() == 4,
        "nothing written without the token"
    );
    for (index, bad, why) in [
        (
            7,
            json!({"id": "cf-0007", "sink_uri": "no scheme"}),
            "sink_uri",
        ),
        (
            9,
            json!({"id": "cf-0008", "sink_uri": "kafka://k/again"}),
            "given twice",
        ),
        (
            20,
            json!({"id": "bad/id", "sink_uri": "kafka://k/t"}),
            "bad/id",
        ),
    ] {
        let mut broken = items.clone();
        broken[index] = bad;
        let (status, body) = call!(app, batch(json!({"items": broken}), Some(ADMIN)));
        assert_error(status, &body, 400, "invalid_argument");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("item {index}")) && message.contains(why),
            "{message}"
        );
        assert!(
            f.all_keys().await.len() == 4,
            "nothing written for a bad batch"
        );
    }

    let (status, outcome) = call!(app, batch(json!({"items": items}), Some(ADMIN)));
    assert_eq!(status, StatusCode::OK, "{outcome}");
    let failed: Vec<(u64, &str, &str)> = outcome["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["index"].as_u64().unwrap(),
                f["id"].as_str().unwrap(),
                f["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![
            (5, "cf-0005", "changefeed_exists"),
            (150, "cf-0150", "changefeed_exists"),
        ]
    );
    let created = ids(&json!({"items": outcome["created"]}))
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(created.len(), 298);
    assert_eq!(created[0], "cf-0000");
    // Stored: 298 new changefeeds and the 2 before, each with its info and status;
    // the one written before is unchanged.
    assert_eq!(f.all_keys().await.len(), 2 * 300);
    let (_, listed) = call!(app, list_req("?limit=5000"));
    assert_eq!(listed["total"], 300);
    let (_, old) = call!(app, get_req("cf-0150", "default"));
    assert_eq!(old["sink_uri"], "kafka://k");

    // Whole-batch refusals.
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"id": format!("x{i}"), "sink_uri": "kafka://k"}))
        .collect();
    let (status, body) = call!(app, batch(json!({"items": too_many}), Some(ADMIN)));
    assert_error(status, &body, 400, "invalid_argument");
    let (status, body) = call!(app, batch(json!({"changefeeds": []}), Some(ADMIN)));
    assert_error(status, &body, 400, "invalid_argument");
    let (status, body) = call!(app, batch(json!([1, 2]), Some(ADMIN)));
    assert_error(status, &body, 400, "invalid_argument");
    assert_eq!(
        f.all_keys().await.len(),
        2 * 300,
        "none of these wrote anything"
    );
}
