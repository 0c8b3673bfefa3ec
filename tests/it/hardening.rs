//! Hardening against a real `flotilla serve` over a real etcd: who may call
//! which route (the token matrix), and malformed values written into etcd
//! from outside.

use std::time::{Duration, Instant};

use crate::harness::http::{request, Response};
use crate::harness::server::{FlotillaServer, ServerOptions};
use serde_json::{json, Value};

const ADMIN: &str = "admin-s3cret-token";
/// The prefix of the test server's cluster (`--cluster-id client-test`).
const PREFIX: &str = "/flotilla/client-test";

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// No `Authorization` header.
    NoToken,
    /// `Bearer` with a token nobody was given.
    Wrong,
    /// The token of the executor the route names (`{id}`); on routes that
    /// name no executor, some executor's token.
    Own,
    /// The token of another executor than the one the route names.
    Other,
    /// The server's admin token.
    Admin,
}

const CALLERS: [Caller; 5] = [
    Caller::NoToken,
    Caller::Wrong,
    Caller::Own,
    Caller::Other,
    Caller::Admin,
];

/// What a call must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Served, with this status.
    Ok(u16),
    /// 401 `unauthorized` with `WWW-Authenticate: Bearer`, and no effect.
    Denied,
}
use Want::{Denied as NO, Ok as OK};

/// Every route of the API x every caller, against a server started with an
/// admin token. Executors prove who they are with their own token
/// (heartbeat, deregistration); the admin token deregisters anyone and is
/// the only key to changefeed writes; reads and registration are open
/// (README: "reads never do"); an executor token is never an admin token.
///
/// `{id}` is an executor id on executor routes and a changefeed id on
/// changefeed routes; each cell gets fresh objects, so a success in one cell
/// cannot turn the next one into a 404.
#[rustfmt::skip]
const MATRIX: &[(&str, &str, [Want; 5])] = &[
    // method  route                                  no token  wrong    own      other    admin
    ("GET",    "/healthz",                             [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("GET",    "/readyz",                              [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("GET",    "/metrics",                             [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("GET",    "/api/v1/status",                       [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("POST",   "/api/v1/executors",                    [OK(201), OK(201), OK(201), OK(201), OK(201)]),
    ("GET",    "/api/v1/executors",                    [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("GET",    "/api/v1/executors/watch",              [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("GET",    "/api/v1/executors/{id}",               [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("POST",   "/api/v1/executors/{id}/heartbeat",     [NO,      NO,      OK(200), NO,      NO     ]),
    ("DELETE", "/api/v1/executors/{id}",               [NO,      NO,      OK(204), NO,      OK(204)]),
    ("GET",    "/api/v1/changefeeds",                  [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("GET",    "/api/v1/changefeeds/{id}",             [OK(200), OK(200), OK(200), OK(200), OK(200)]),
    ("POST",   "/api/v1/changefeeds",                  [NO,      NO,      NO,      NO,      OK(201)]),
    ("POST",   "/api/v1/changefeeds:batch",            [NO,      NO,      NO,      NO,      OK(200)]),
    ("PUT",    "/api/v1/changefeeds/{id}",             [NO,      NO,      NO,      NO,      OK(200)]),
    ("DELETE", "/api/v1/changefeeds/{id}",             [NO,      NO,      NO,      NO,      OK(204)]),
    ("POST",   "/api/v1/changefeeds/{id}/pause",       [NO,      NO,      NO,      NO,      OK(200)]),
    ("POST",   "/api/v1/changefeeds/{id}/resume",      [NO,      NO,      NO,      NO,      OK(200)]),
];

/// Whether a denied call left its subject as it was.
type Unchanged = Box<dyn Fn(&Api) -> bool>;

struct Executor {
    id: String,
    token: String,
}

struct Api {
    port: u16,
    serial: usize,
}

impl Api {
    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
        request(self.port, method, path, token, body.as_ref())
    }

    fn fresh(&mut self, what: &str) -> String {
        self.serial += 1;
        format!("{what}{}", self.serial)
    }

    /// Registers an executor that stays alive for the whole test (a
    /// heartbeat asking for the longest TTL).
    fn register(&mut self) -> Executor {
        let name = self.fresh("x");
        let r = self.call(
            "POST",
            "/api/v1/executors",
            None,
            Some(json!({"name": name, "address": "127.0.0.1:9"})),
        );
        assert_eq!(r.status, 201, "{r:?}");
        let body = r.json();
        let executor = Executor {
            id: body["id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        };
        let r = self.call(
            "POST",
            &format!("/api/v1/executors/{}/heartbeat", executor.id),
            Some(&executor.token),
            Some(json!({"ttl_ms": 60_000})),
        );
        assert_eq!(r.status, 200, "{r:?}");
        executor
    }

    /// Creates a changefeed (as the admin), paused if `stopped`.
    fn changefeed(&mut self, stopped: bool) -> String {
        let id = self.fresh("cf");
        let r = self.call(
            "POST",
            "/api/v1/changefeeds",
            Some(ADMIN),
            Some(json!({"id": id, "sink_uri": "kafka://broker/topic"})),
        );
        assert_eq!(r.status, 201, "{r:?}");
        if stopped {
            let r = self.call(
                "POST",
                &format!("/api/v1/changefeeds/{id}/pause"),
                Some(ADMIN),
                None,
            );
            assert_eq!(r.status, 200, "{r:?}");
        }
        id
    }

    fn get_changefeed(&self, id: &str) -> Response {
        self.call("GET", &format!("/api/v1/changefeeds/{id}"), None, None)
    }
}

#[test]
fn every_route_admits_exactly_the_intended_callers() {
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let mut api = Api {
        port: server.port(),
        serial: 0,
    };
    let a = api.register();
    let b = api.register();

    let mut failures = Vec::new();
    for &(method, route, wants) in MATRIX {
        for (caller, want) in CALLERS.into_iter().zip(wants) {
            // The objects this cell works on, and a check that a denied
            // call left them as they were.
            let mut subject_executor = &a;
            let victim;
            let (path, body, unchanged): (String, Option<Value>, Unchanged) =
                if route.starts_with("/api/v1/executors/{id}") {
                    if method == "DELETE" {
                        victim = api.register();
                        subject_executor = &victim;
                    }
                    let id = subject_executor.id.clone();
                    let path = route.replace("{id}", &id);
                    let unchanged = move |api: &Api| {
                        let r = api.call("GET", &format!("/api/v1/executors/{id}"), None, None);
                        r.status == 200 && r.json()["status"] != "tombstone"
                    };
                    // A heartbeat keeps the long TTL `register` asked for.
                    let body = route
                        .ends_with("/heartbeat")
                        .then(|| json!({"ttl_ms": 60_000}));
                    (path, body, Box::new(unchanged))
                } else if route == "/api/v1/executors" && method == "POST" {
                    let name = api.fresh("reg");
                    let body = json!({"name": name, "address": "127.0.0.1:9"});
                    (route.to_owned(), Some(body), Box::new(|_: &Api| true))
                } else if route == "/api/v1/changefeeds" && method == "POST" {
                    let id = api.fresh("new");
                    let body = json!({"id": id, "sink_uri": "kafka://broker/topic"});
                    let unchanged = move |api: &Api| api.get_changefeed(&id).status == 404;
                    (route.to_owned(), Some(body), Box::new(unchanged))
                } else if route == "/api/v1/changefeeds:batch" {
                    let id = api.fresh("batch");
                    let body = json!({"items": [{"id": id, "sink_uri": "kafka://broker/topic"}]});
                    let unchanged = move |api: &Api| api.get_changefeed(&id).status == 404;
                    (route.to_owned(), Some(body), Box::new(unchanged))
                } else if route.starts_with("/api/v1/changefeeds/{id}") {
                    let stopped = method == "PUT" || route.ends_with("/resume");
                    let id = api.changefeed(stopped);
                    let before = api.get_changefeed(&id).json();
                    let path = route.replace("{id}", &id);
                    let body = (method == "PUT").then(|| json!({"sink_uri": "kafka://other/t"}));
                    let unchanged = move |api: &Api| {
                        let now = api.get_changefeed(&id).json();
                        now["state"] == before["state"] && now["sink_uri"] == before["sink_uri"]
                    };
                    (path, body, Box::new(unchanged))
                } else {
                    (route.to_owned(), None, Box::new(|_: &Api| true))
                };
            let other = if subject_executor.id == a.id { &b } else { &a };
            let token = match caller {
                Caller::NoToken => None,
                Caller::Wrong => Some("not-a-token-anyone-was-given"),
                Caller::Own => Some(subject_executor.token.as_str()),
                Caller::Other => Some(other.token.as_str()),
                Caller::Admin => Some(ADMIN),
            };
            let r = api.call(method, &path, token, body);
            let got = if r.status == 401 {
                let proper = r.json()["code"] == "unauthorized"
                    && r.headers.contains("www-authenticate: bearer");
                if !proper {
                    failures.push(format!(
                        "{method} {route} as {caller:?}: a 401 without code `unauthorized` \
                         or WWW-Authenticate: {r:?}"
                    ));
                }
                if !unchanged(&api) {
                    failures.push(format!(
                        "{method} {route} as {caller:?}: denied, but it had an effect"
                    ));
                }
                NO
            } else {
                OK(r.status)
            };
            if got != want {
                failures.push(format!(
                    "{method} {route} as {caller:?}: want {want:?}, got {got:?} {}",
                    r.body.chars().take(200).collect::<String>()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cells wrong:\n{}",
        failures.len(),
        MATRIX.len() * CALLERS.len(),
        failures.join("\n")
    );
}

/// `flotilla_etcd_worker_skipped_updates_total` in a scrape.
fn skipped_updates(api: &Api) -> u64 {
    let r = api.call("GET", "/metrics", None, None);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_etcd_worker_skipped_updates_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the skipped updates counter in /metrics") as u64
}

/// Heartbeats `executor` (with `progress`) until `done` accepts the answer.
fn beat_until(
    api: &Api,
    executor: &Executor,
    progress: impl Fn(&Value) -> Value,
    done: impl Fn(&Value) -> bool,
    what: &str,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Value::Null;
    loop {
        let r = api.call(
            "POST",
            &format!("/api/v1/executors/{}/heartbeat", executor.id),
            Some(&executor.token),
            Some(json!({"ttl_ms": 60_000, "progress": progress(&last)})),
        );
        assert_eq!(r.status, 200, "heartbeat: {r:?}");
        last = r.json();
        if done(&last) {
            return last;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {last}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assigned(answer: &Value) -> Vec<String> {
    let mut names: Vec<String> = answer["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["changefeed"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Reports `checkpoint_ts = start + step` for every assignment.
fn progress_of(answer: &Value, step: u64) -> Value {
    let items: Vec<Value> = answer["assignments"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            json!({
                "namespace": a["namespace"],
                "changefeed": a["changefeed"],
                "epoch": a["epoch"],
                "checkpoint_ts": a["checkpoint_ts"].as_u64().unwrap() + step,
            })
        })
        .collect();
    Value::Array(items)
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_written_into_etcd_is_skipped_reported_and_poisons_nothing() {
    let mut server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let mut api = Api {
        port: server.port(),
        serial: 0,
    };
    let x = api.register();
    for id in ["good1", "good2"] {
        let r = api.call(
            "POST",
            "/api/v1/changefeeds",
            Some(ADMIN),
            Some(json!({"id": id, "sink_uri": "kafka://broker/topic"})),
        );
        assert_eq!(r.status, 201, "{r:?}");
    }
    beat_until(
        &api,
        &x,
        |_| json!([]),
        |a| assigned(a) == ["good1", "good2"],
        "good1 and good2 assigned",
    );
    let skipped_before = skipped_updates(&api);

    // What `etcdctl put <key> garbage` does, on each kind of value.
    let garbage = [
        (format!("{PREFIX}/default/changefeed/info/bad"), "garbage"),
        (
            format!("{PREFIX}/default/changefeed/status/good1"),
            "garbage",
        ),
        (
            format!("{PREFIX}/default/task/status/ghost-00000000/good2"),
            "{\"epoch\":",
        ),
        (
            format!("{PREFIX}/default/task/position/{}/good1", x.id),
            // Well-formed JSON of the wrong shape. (An array of the
            // fields in order, `[1,2,3]`, would decode: serde's derive
            // accepts a struct as a sequence.)
            r#"{"epoch":"one"}"#,
        ),
    ];
    let mut etcd = server.etcd().client().await;
    for (key, value) in &garbage {
        etcd.put(key.as_str(), *value, None).await.unwrap();
    }

    // Reported: counted and logged with the key, once each.
    let deadline = Instant::now() + Duration::from_secs(10);
    while skipped_updates(&api) < skipped_before + garbage.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "skipped updates: {} before, {} now\n{}",
            skipped_before,
            skipped_updates(&api),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = server.log();
    for (key, _) in &garbage {
        assert!(
            log.lines()
                .any(|l| l.contains("skipped") && l.contains(key.as_str())),
            "no log line about {key}:\n{log}"
        );
    }

    // The owner goes on: a new changefeed is assigned, and every
    // assignment's progress is committed (good1's garbage status is replaced
    // by the owner's next write).
    let r = api.call(
        "POST",
        "/api/v1/changefeeds",
        Some(ADMIN),
        Some(json!({"id": "good3", "sink_uri": "kafka://broker/topic"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let answer = beat_until(
        &api,
        &x,
        |_| json!([]),
        |a| assigned(a) == ["good1", "good2", "good3"],
        "good3 assigned after the garbage",
    );
    let progress = progress_of(&answer, 1000);
    let expected: Vec<(String, u64)> = progress
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["changefeed"].as_str().unwrap().to_owned(),
                p["checkpoint_ts"].as_u64().unwrap(),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = api.call(
            "POST",
            &format!("/api/v1/executors/{}/heartbeat", x.id),
            Some(&x.token),
            Some(json!({"ttl_ms": 60_000, "progress": progress})),
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["rejected"], json!([]), "{r:?}");
        let views: Vec<Value> = expected
            .iter()
            .map(|(id, _)| api.get_changefeed(id).json())
            .collect();
        let caught_up = expected
            .iter()
            .zip(&views)
            .all(|((_, ts), v)| v["checkpoint_ts"] == *ts && v["executor"] == x.id.as_str());
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "progress not committed: want {expected:?}, have {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The API names the broken changefeed and serves the others.
    let list = api.call("GET", "/api/v1/changefeeds", None, None);
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["good1", "good2", "good3"]);
    assert_eq!(list["unreadable"][0]["id"], "bad", "{list}");
    assert_eq!(
        list["unreadable"][0]["key"],
        garbage[0].0.as_str(),
        "{list}"
    );
    let bad = api.get_changefeed("bad");
    assert_eq!(bad.status, 500, "{bad:?}");
    assert_eq!(bad.json()["code"], "corrupt_value");
    assert!(bad.body.contains(&garbage[0].0), "names the key: {bad:?}");

    // Still one healthy server: ready, and its owner never restarted.
    assert_eq!(api.call("GET", "/readyz", None, None).status, 200);
    let log = server.log();
    assert!(
        !log.contains("restarting it"),
        "the owner's worker restarted:\n{log}"
    );

    // An operator removes it through the API.
    let r = api.call("DELETE", "/api/v1/changefeeds/bad", Some(ADMIN), None);
    assert_eq!(r.status, 204, "{r:?}");
    let list = api.call("GET", "/api/v1/changefeeds", None, None).json();
    assert_eq!(list["unreadable"], json!([]), "{list}");
    drop(etcd);
}

/// The admin token can come from `FLOTILLA_ADMIN_TOKEN` instead of a file,
/// and never shows up in the log.
#[test]
fn the_admin_token_from_the_environment_guards_changefeed_writes() {
    const SECRET: &str = "env-admin-secret-4711";
    let server = FlotillaServer::start(ServerOptions {
        env: vec![("FLOTILLA_ADMIN_TOKEN".into(), SECRET.into())],
        ..ServerOptions::default()
    });
    let body = json!({"id": "envtoken", "sink_uri": "blackhole://"});
    let post = |token| {
        request(
            server.port(),
            "POST",
            "/api/v1/changefeeds",
            token,
            Some(&body),
        )
    };
    assert_eq!(post(None).status, 401, "no token");
    assert_eq!(post(Some("wrong")).status, 401, "wrong token");
    let created = post(Some(SECRET));
    assert_eq!(created.status, 201, "{}", created.body);
    let log = server.log();
    assert!(log.contains("admin token loaded"), "{log}");
    assert!(!log.contains(SECRET), "the token is never logged");
}
