//! Operational endpoints: liveness, readiness, Prometheus metrics, and server status.

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::{resource, AppState, Error, ErrorBody, Result};
use crate::actors::executor_registry::{self, GetRegistryStats, PingStore};
use crate::election::ElectionView;

/// The exposition format `/metrics` speaks.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/healthz").get(healthz))
        .service(resource("/readyz").get(readyz))
        .service(resource("/metrics").get(metrics))
        .service(resource("/api/v1/status").get(status));
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Healthy {
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

/// The process is up and serving HTTP; says nothing about its dependencies.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    summary = "Liveness",
    responses((status = 200, description = "Serving HTTP", body = Healthy)),
)]
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Healthy { status: "ok" })
}

/// Ready to do work: etcd answers and the registry has loaded its executors.
/// A load balancer should stop routing here otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    summary = "Readiness",
    description = "200 when etcd answers and the registry (on the leader) has loaded its \
        executors, or (on a follower) a leader is known to forward to.",
    responses(
        (status = 200, description = "Ready", body = Healthy),
        (status = 503, description = "`etcd_unavailable`, `not_ready`, `unavailable` or `no_leader`",
         body = ErrorBody, headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse> {
    state.etcd.check().await.map_err(Error::EtcdUnavailable)?;
    if let Some(problem) = state.etcd_alarms.as_ref().and_then(|a| a.problem()) {
        return Err(Error::EtcdAlarm(problem));
    }
    if let Some(view) = &state.election {
        // A follower is ready when it has a leader to forward to: not itself
        // while its roles start, nor an earlier run of itself.
        if state.roles.is_empty() {
            let leader = view.borrow().leader.clone();
            let Some(leader) = leader else {
                return Err(Error::NoLeader("no leader is elected yet".into()));
            };
            if let Some(error) = super::forward::cannot_forward_to(&state, &leader) {
                return Err(error);
            }
        }
    }
    if let Some(roles) = state.roles.get() {
        let stats = roles
            .registry
            .addr
            .send(GetRegistryStats)
            .await
            .map_err(super::executors::mailbox)?;
        if !stats.loaded {
            return Err(executor_registry::Error::NotReady.into());
        }
        // Heartbeats need the owner's answer too.
        if roles.owner.as_ref().is_some_and(|desk| !desk.is_running()) {
            return Err(Error::Unavailable(
                crate::actors::owner::Error::NotRunning.to_string(),
            ));
        }
    }
    Ok(HttpResponse::Ok().json(Healthy { status: "ok" }))
}

/// Every metric in the Prometheus text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses(
        (status = 200, description = "The text exposition format, version 0.0.4",
         content_type = "text/plain; version=0.0.4", body = String),
    ),
)]
pub(super) async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(PROMETHEUS_CONTENT_TYPE)
        .body(crate::metrics::render())
}

/// This server as it sees itself.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = ServerStatus)]
pub(super) struct Status<'a> {
    /// Unique per process.
    id: &'a str,
    version: &'a str,
    cluster_id: &'a str,
    /// The address other servers and executors use to reach this one.
    advertise_addr: &'a str,
    etcd: EtcdStatus<'a>,
    /// The SQL store, as the registry sees it; `null` without a registry.
    store: Option<StoreStatus>,
    /// Executors by status; `null` without a registry.
    executors: Option<ExecutorCounts>,
    /// The election as this server sees it (leader, members, this server's
    /// lease); `null` on a server that runs none.
    election: Option<ElectionView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct StoreStatus {
    healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ExecutorCounts {
    /// Whether the registry has loaded the executors from SQL.
    loaded: bool,
    initing: usize,
    running: usize,
    tombstone: usize,
    mass_silence: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct EtcdStatus<'a> {
    endpoints: &'a [String],
    healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Always 200: it reports unhealthy parts instead of failing.
#[utoipa::path(
    get,
    path = "/api/v1/status",
    operation_id = "server_status",
    tag = "operations",
    summary = "This server: id, version, etcd and store health, executors, election",
    description = "Answered by every server itself (never forwarded to the leader); always 200.",
    responses((status = 200, description = "This server's status", body = Status)),
)]
pub(super) async fn status(state: web::Data<AppState>) -> HttpResponse {
    let info = &state.info;
    let etcd_error = state.etcd.check().await.err();
    let (store, executors) = match state.roles.get().map(|r| r.registry) {
        None => (None, None),
        Some(registry) => {
            let store_error = match registry.addr.send(PingStore).await {
                Ok(result) => result.err().map(|e| e.to_string()),
                Err(e) => Some(super::executors::mailbox(e).to_string()),
            };
            let counts = registry
                .addr
                .send(GetRegistryStats)
                .await
                .ok()
                .map(|s| ExecutorCounts {
                    loaded: s.loaded,
                    initing: s.initing,
                    running: s.running,
                    tombstone: s.tombstones,
                    mass_silence: s.mass_silence,
                });
            (
                Some(StoreStatus {
                    healthy: store_error.is_none(),
                    error: store_error,
                }),
                counts,
            )
        }
    };
    HttpResponse::Ok().json(Status {
        id: &info.id,
        version: info.version,
        cluster_id: &info.cluster_id,
        advertise_addr: &info.advertise_addr,
        etcd: EtcdStatus {
            endpoints: &info.etcd_endpoints,
            healthy: etcd_error.is_none(),
            error: etcd_error,
        },
        store,
        executors,
        election: state.election.as_ref().map(|view| view.borrow().clone()),
    })
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use actix_web::{test, App};
    use serde_json::{json, Value};

    use super::super::configure;
    use super::*;

    /// State whose etcd is a closed port: every probe fails fast.
    async fn unreachable_etcd_state() -> web::Data<AppState> {
        web::Data::new(
            super::super::test_support::unreachable_etcd_state()
                .await
                .with_max_body_bytes(32)
                .with_max_heartbeat_bytes(32),
        )
    }

    async fn echo(
        state: web::Data<AppState>,
        req: actix_web::HttpRequest,
        body: web::Payload,
    ) -> Result<HttpResponse> {
        let value: Option<Value> =
            super::super::json_body(&req, body, state.max_body_bytes).await?;
        Ok(HttpResponse::Ok().json(value))
    }

    macro_rules! app {
        () => {
            test::init_service(
                App::new()
                    .configure(configure(unreachable_etcd_state().await))
                    .route("/echo", web::post().to(echo)),
            )
            .await
        };
    }

    async fn body_json(resp: actix_web::dev::ServiceResponse) -> Value {
        serde_json::from_slice(&test::read_body(resp).await).unwrap()
    }

    #[actix_web::test]
    async fn healthz_is_ok_without_etcd() {
        let app = app!();
        let resp =
            test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_json(resp).await, json!({"status": "ok"}));
    }

    #[actix_web::test]
    async fn readyz_is_503_when_etcd_is_down() {
        let app = app!();
        let resp =
            test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = body_json(resp).await;
        assert_eq!(body["code"], "etcd_unavailable");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .starts_with("etcd is unavailable"));
    }

    #[actix_web::test]
    async fn status_reports_unhealthy_etcd_and_no_leader() {
        let app = app!();
        let resp = test::call_service(
            &app,
            test::TestRequest::get().uri("/api/v1/status").to_request(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = body_json(resp).await;
        assert_eq!(body["id"], "test-1");
        assert_eq!(body["cluster_id"], "c1");
        assert_eq!(body["etcd"]["healthy"], false);
        assert_eq!(body["etcd"]["endpoints"].as_array().unwrap().len(), 1);
        assert_eq!(body["leader"], Value::Null);
    }

    #[actix_web::test]
    async fn metrics_use_the_prometheus_content_type() {
        let app = app!();
        let resp =
            test::call_service(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            PROMETHEUS_CONTENT_TYPE
        );
    }

    #[actix_web::test]
    async fn unknown_route_is_json_404() {
        let app = app!();
        let resp =
            test::call_service(&app, test::TestRequest::get().uri("/nope").to_request()).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body = body_json(resp).await;
        assert_eq!(body["code"], "not_found");
        assert_eq!(body["message"], "no route for GET /nope");
    }

    #[actix_web::test]
    async fn wrong_method_is_json_405() {
        let app = app!();
        let resp =
            test::call_service(&app, test::TestRequest::post().uri("/healthz").to_request()).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body_json(resp).await["code"], "method_not_allowed");
    }

    #[actix_web::test]
    async fn json_body_errors_are_json() {
        let app = app!();
        let cases = [
            (
                "application/json",
                "{\"a\":",
                StatusCode::BAD_REQUEST,
                "invalid_argument",
            ),
            (
                "text/plain",
                "{}",
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            ),
            (
                "application/json",
                "[\"0123456789\",\"0123456789\",\"0123456789\"]",
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
            ),
        ];
        for (content_type, body, status, code) in cases {
            let req = test::TestRequest::post()
                .uri("/echo")
                .insert_header(("content-type", content_type))
                .set_payload(body)
                .to_request();
            let resp = test::call_service(&app, req).await;
            assert_eq!(resp.status(), status, "{body}");
            assert_eq!(body_json(resp).await["code"], code, "{body}");
        }
        let req = test::TestRequest::post()
            .uri("/echo")
            .insert_header(("content-type", "application/json"))
            .set_payload("{\"a\":1}")
            .to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
}
