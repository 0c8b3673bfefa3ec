//! Forwarding: a follower sends leader-only requests to the leader, and
//! streams the answer back, so clients may talk to any server.
//!
//! Leader-only: everything under `/api/v1/` but what each server answers
//! itself ([`answered_here`]): `/api/v1/status`, the OpenAPI document and
//! the docs page. A forwarded request carries
//! [`FORWARDED_BY`]; a server that gets one and does not lead either answers
//! 503 `no_leader` instead of forwarding again, so a stale view can never
//! make a loop. With no leader known, a request waits up to
//! [`NO_LEADER_WAIT`] for one, then gets 503 `no_leader` with `Retry-After`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use actix_web::guard::{self, GuardContext};
use actix_web::http::header::{self, HeaderName};
use actix_web::{web, HttpRequest, HttpResponse};

use super::error::{Error, Result};
use super::AppState;
use crate::election::Member;
use crate::metrics;

/// Marks a request a follower forwarded; its value is that server's id.
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-flotilla-forwarded-by");

/// How long a request waits for a leader to be known.
pub const NO_LEADER_WAIT: Duration = Duration::from_secs(3);

/// Deadline for the leader's response head (a watch's body streams on).
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Registered before every other route: takes the requests this server must
/// forward, and only those.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .guard(guard::fn_guard(must_forward))
            .default_service(web::to(forward)),
    );
}

/// `/api/v1/` paths every server answers itself: its own status, and the
/// API's document and docs page (the same on every server, and wanted when
/// there is no leader too).
fn answered_here(path: &str) -> bool {
    path == "/api/v1/status"
        || path == super::openapi::SPEC_PATH
        || path == "/api/v1/docs"
        || path.starts_with(super::openapi::DOCS_PATH)
}

fn must_forward(ctx: &GuardContext<'_>) -> bool {
    if answered_here(ctx.head().uri.path()) {
        return false;
    }
    ctx.app_data::<web::Data<AppState>>()
        .is_some_and(|state| state.election.is_some() && state.roles.is_empty())
}

thread_local! {
    // awc's client is per thread (like the HTTP worker that uses it); one
    // per worker keeps its connection pool to the leader warm. Built on the
    // first forward, with the server's TLS settings.
    static CLIENT: std::cell::OnceCell<awc::Client> = const { std::cell::OnceCell::new() };
}

fn client(state: &AppState) -> awc::Client {
    CLIENT.with(|cell| {
        cell.get_or_init(|| {
            let mut connector = awc::Connector::new();
            if let Some(tls) = &state.peer_tls {
                connector = connector.rustls_0_23(tls.clone());
            }
            awc::Client::builder()
                .connector(connector)
                .timeout(LEADER_TIMEOUT)
                .disable_redirects()
                .finish()
        })
        .clone()
    })
}

fn no_leader(message: String) -> Error {
    metrics::election()
        .forwarded_requests_total
        .with_label_values(&["no_leader"])
        .inc();
    Error::NoLeader(message)
}

/// The leader other than this server, waiting up to [`NO_LEADER_WAIT`].
async fn leader(state: &AppState) -> Result<Member> {
    let Some(view) = &state.election else {
        return Err(no_leader("this server runs no election".into()));
    };
    let mut view = view.clone();
    let wait = async {
        loop {
            if let Some(leader) = view.borrow_and_update().leader.clone() {
                return Some(leader);
            }
            if view.changed().await.is_err() {
                return None;
            }
        }
    };
    match tokio::time::timeout(NO_LEADER_WAIT, wait).await {
        Ok(Some(leader)) => Ok(leader),
        _ => Err(no_leader(format!(
            "no leader is elected (waited {} ms); retry",
            NO_LEADER_WAIT.as_millis()
        ))),
    }
}

/// Whether `ip` is the address some server of the election advertises.
/// Only an IP literal can match: a member advertised by host name is not
/// recognised, and what it forwards is limited as its own traffic.
pub fn is_member_address(state: &AppState, ip: IpAddr) -> bool {
    state.election.as_ref().is_some_and(|view| {
        view.borrow().members.iter().any(|m| {
            m.candidate
                .advertise_addr
                .parse::<SocketAddr>()
                .is_ok_and(|addr| addr.ip() == ip)
        })
    })
}

/// Headers that describe one connection, not the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Why a request cannot go to `leader` from this server (which does not run the
/// roles), if it cannot: this server itself was just elected, or `leader` is an
/// earlier run of this server. `/readyz` asks the same.
pub(super) fn cannot_forward_to(state: &AppState, leader: &Member) -> Option<Error> {
    if leader.candidate.server_id == state.info.id {
        // Elected a moment ago: the roles are starting.
        return Some(no_leader(
            "this server was just elected and is starting; retry".into(),
        ));
    }
    if leader.candidate.advertise_addr == state.info.advertise_addr {
        // A run of this server killed before it could resign: its key holds
        // the leadership until its lease expires. Forwarding would only
        // come back here.
        return Some(no_leader(format!(
            "the leadership is held by {}, an earlier run of this server at the same \
             address, until its lease expires; retry",
            leader.candidate.server_id
        )));
    }
    None
}

async fn forward(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse> {
    if let Some(from) = req.headers().get(&FORWARDED_BY) {
        return Err(no_leader(format!(
            "forwarded by {} to this server, which is not the leader either; retry",
            from.to_str().unwrap_or("another server")
        )));
    }
    if req.method() == actix_web::http::Method::POST && req.path() == "/api/v1/executors" {
        super::executors::limit_registration(&state, &req)?;
    }
    let leader = leader(&state).await?;
    if let Some(error) = cannot_forward_to(&state, &leader) {
        return Err(error);
    }
    let url = format!(
        "{}://{}{}",
        if state.peer_tls.is_some() {
            "https"
        } else {
            "http"
        },
        leader.candidate.advertise_addr,
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let mut request = client(&state)
        .request(req.method().clone(), url)
        .no_decompress()
        .insert_header((FORWARDED_BY, state.info.id.as_str()));
    for (name, value) in req.headers() {
        if !hop_by_hop(name) && *name != header::HOST {
            request = request.append_header((name.clone(), value.clone()));
        }
    }
    let response = request.send_stream(body).await.map_err(|e| {
        no_leader(format!(
            "the leader {} at {} is unreachable ({e}); retry",
            leader.candidate.server_id, leader.candidate.advertise_addr
        ))
    })?;
    metrics::election()
        .forwarded_requests_total
        .with_label_values(&["ok"])
        .inc();
    let mut answer = HttpResponse::build(response.status());
    for (name, value) in response.headers() {
        if !hop_by_hop(name) && *name != header::CONTENT_LENGTH {
            answer.append_header((name.clone(), value.clone()));
        }
    }
    Ok(answer.streaming(response))
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use actix_web::{test as atest, App};
    use serde_json::Value;

    use super::*;
    use crate::election::ElectionView;
    use crate::http::{configure, test_support};

    /// A follower (an election, no roles): what it forwards and what it
    /// answers itself. A request marked as forwarded is refused at once
    /// (503 `no_leader`) where it would be forwarded, so the test needs no
    /// leader.
    #[actix_web::test]
    async fn a_follower_answers_status_and_docs_itself_and_forwards_the_rest() {
        let (_election, view) = tokio::sync::watch::channel(ElectionView::default());
        let state = web::Data::new(
            test_support::unreachable_etcd_state()
                .await
                .with_election(view),
        );
        let app = atest::init_service(App::new().configure(configure(state))).await;
        let call = |method: actix_web::http::Method, uri: &str| {
            atest::TestRequest::default()
                .method(method)
                .uri(uri)
                .insert_header((FORWARDED_BY, "another-server"))
                .to_request()
        };
        use actix_web::http::Method;
        for (method, uri) in [
            (Method::GET, "/api/v1/executors"),
            (Method::POST, "/api/v1/executors/e-1/heartbeat"),
            (Method::GET, "/api/v1/changefeeds/c?namespace=n"),
            (Method::DELETE, "/api/v1/changefeeds/c"),
            (Method::GET, "/api/v1/nothing-here"),
            (Method::GET, "/api/v1/statuses"),
            (Method::GET, "/api/v1/openapi.json.bak"),
            (Method::GET, "/api/v1/docsx"),
        ] {
            let resp = atest::call_service(&app, call(method.clone(), uri)).await;
            assert_eq!(
                resp.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{method} {uri}"
            );
            let body: Value = serde_json::from_slice(&atest::read_body(resp).await).unwrap();
            assert_eq!(body["code"], "no_leader", "{method} {uri}");
            assert!(
                body["message"].as_str().unwrap().contains("another-server"),
                "{method} {uri}: {body}"
            );
        }
        for (uri, status) in [
            ("/api/v1/status", StatusCode::OK),
            ("/api/v1/openapi.json", StatusCode::OK),
            ("/api/v1/docs", StatusCode::PERMANENT_REDIRECT),
            ("/api/v1/docs/", StatusCode::OK),
            ("/api/v1/docs/swagger-ui.css", StatusCode::OK),
            ("/healthz", StatusCode::OK),
        ] {
            let resp = atest::call_service(&app, call(Method::GET, uri)).await;
            assert_eq!(resp.status(), status, "{uri}");
        }
    }
}
