//! The live web dashboard: one HTML page, its script and its style sheet,
//! compiled into the binary (no CDN, no build step) and served by every
//! server itself at `/` and `/assets/...` (never forwarded: only `/api/v1/`
//! is). The page reads the API from the browser: the executor feed
//! (`/api/v1/executors/watch`, Server-Sent Events) for executors going online
//! and offline as it happens, and polls the executor and changefeed lists
//! (heartbeat ages, assignments, checkpoints) and `/api/v1/status` (the
//! leader). On a follower those API calls are forwarded to the leader like
//! any client's.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpResponse};

use super::resource;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// The page loads nothing but its own assets and talks only to this origin,
/// so a script injected through data shown on it (labels, errors) cannot
/// run or send anything anywhere. `data:` images: the empty favicon.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/").get(index))
        .service(resource("/assets/dashboard.js").get(script))
        .service(resource("/assets/dashboard.css").get(style));
}

/// An embedded asset. `no-cache`: the browser revalidates, so a page never
/// runs a script from an older binary after an upgrade.
fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .insert_header((
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .body(body)
}

#[utoipa::path(
    get,
    path = "/",
    operation_id = "dashboard",
    tag = "operations",
    summary = "The live web dashboard (HTML)",
    responses((status = 200, description = "The file", content_type = "text/html", body = String)),
)]
pub(super) async fn index() -> HttpResponse {
    let mut response = asset("text/html; charset=utf-8", INDEX_HTML);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

#[utoipa::path(
    get,
    path = "/assets/dashboard.js",
    operation_id = "dashboard_script",
    tag = "operations",
    summary = "The dashboard's script",
    responses((status = 200, description = "The file", content_type = "text/javascript", body = String)),
)]
pub(super) async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

#[utoipa::path(
    get,
    path = "/assets/dashboard.css",
    operation_id = "dashboard_style",
    tag = "operations",
    summary = "The dashboard's style sheet",
    responses((status = 200, description = "The file", content_type = "text/css", body = String)),
)]
pub(super) async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use actix_web::http::StatusCode;
    use actix_web::{test, App};

    use super::super::{configure, AppState, EtcdProbe, ServerInfo};
    use super::*;
    use crate::election::ElectionView;

    /// A follower with no leader known: every `/api/v1/` request would be
    /// forwarded (and wait for a leader); the dashboard must not be.
    async fn follower_state() -> web::Data<AppState> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(200))
            .with_timeout(Duration::from_millis(200));
        let client = etcd_client::Client::connect(["http://127.0.0.1:9"], Some(options))
            .await
            .expect("connecting is lazy");
        let (_tx, election) = tokio::sync::watch::channel(ElectionView::default());
        let info = ServerInfo {
            id: "follower-1".into(),
            version: "0.0.0",
            cluster_id: "c1".into(),
            advertise_addr: "127.0.0.1:8300".into(),
            etcd_endpoints: vec![],
        };
        web::Data::new(
            AppState::new(info, EtcdProbe::new(client, Duration::from_millis(200)))
                .with_election(election)
                .with_max_body_bytes(1024)
                .with_max_heartbeat_bytes(1024),
        )
    }

    async fn get(
        path: &str,
    ) -> (
        StatusCode,
        String,
        String,
        actix_web::http::header::HeaderMap,
    ) {
        let app = test::init_service(App::new().configure(configure(follower_state().await))).await;
        let response =
            test::call_service(&app, test::TestRequest::get().uri(path).to_request()).await;
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = test::read_body(response).await;
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
            headers,
        )
    }

    #[actix_web::test]
    async fn a_follower_serves_the_page_itself_with_a_strict_policy() {
        let (status, content_type, body, headers) = get("/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(content_type, "text/html; charset=utf-8");
        assert!(body.contains("<title>flotilla</title>"), "{body}");
        let policy = headers
            .get(header::CONTENT_SECURITY_POLICY)
            .unwrap()
            .to_str()
            .unwrap();
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(headers.get(header::CACHE_CONTROL).unwrap(), "no-cache");
    }

    #[actix_web::test]
    async fn every_asset_the_page_names_is_served_with_its_type() {
        let (_, _, page, _) = get("/").await;
        let assets: Vec<&str> = page
            .split('"')
            .filter(|s| s.starts_with("/assets/"))
            .collect();
        assert_eq!(assets.len(), 2, "{assets:?}");
        for path in assets {
            let (status, content_type, body, _) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            let expected = if path.ends_with(".js") {
                "text/javascript; charset=utf-8"
            } else {
                "text/css; charset=utf-8"
            };
            assert_eq!(content_type, expected, "{path}");
            assert!(!body.is_empty());
        }
        let (status, _, body, _) = get("/assets/missing.js").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body.contains("\"code\":\"not_found\""), "{body}");
    }

    #[actix_web::test]
    async fn the_page_is_read_only() {
        let app = test::init_service(App::new().configure(configure(follower_state().await))).await;
        let response =
            test::call_service(&app, test::TestRequest::post().uri("/").to_request()).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
