//! The HTTP API (actix-web): server set-up, shared request state, and the routes.
//!
//! Layout: [`configure`] is the single place where routes and extractor settings are
//! registered, so the server and the tests build the same app. To add routes, write a
//! module under `src/http/` with a `configure(cfg: &mut web::ServiceConfig)` function and
//! call it from [`configure`]. To give handlers access to something new (an actor's
//! `Addr`, the store), add a field to [`AppState`] with its default in [`AppState::new`]
//! and a `with_` method to set it; handlers take `web::Data<AppState>`.
//! Handlers return [`Result<T, Error>`](Error) so every error has the same JSON shape.
//! Every route is documented in the OpenAPI document ([`openapi`]): annotate the handler
//! with `#[utoipa::path]` and list it in [`openapi::ApiDoc`] (a unit test fails otherwise).

mod changefeeds;
mod dashboard;
mod error;
mod executors;
pub mod forward;
pub mod limits;
pub mod listen;
pub mod openapi;
mod route_metrics;
mod status;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use tokio::sync::watch;

use crate::actors::etcd_alarms::EtcdAlarms;
use crate::actors::leader::RoleSlot;
use crate::config::HttpConfig;
use crate::election::ElectionView;
use crate::owner::feeds::Changefeeds;

pub use error::{Error, ErrorBody, Result};
pub use listen::{listen, serve};

/// Facts about this server, fixed at start-up; reported by `/api/v1/status`.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Unique per process; later used as the leader-election identity.
    pub id: String,
    pub version: &'static str,
    pub cluster_id: String,
    /// The address other servers and executors use to reach this one.
    pub advertise_addr: String,
    pub etcd_endpoints: Vec<String>,
}

/// Checks that etcd answers. Cloning is cheap (the client is a channel handle).
#[derive(Clone)]
pub struct EtcdProbe {
    client: etcd_client::Client,
    timeout: Duration,
}

impl EtcdProbe {
    /// `client` must be created on a runtime that outlives the HTTP server (the main
    /// System): an etcd client dies with the runtime that created it.
    pub fn new(client: etcd_client::Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    /// `Ok` when etcd answers a status request within the timeout; the reason otherwise.
    pub async fn check(&self) -> std::result::Result<(), String> {
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.status()).await {
            Ok(Ok(status)) if status.leader() != 0 => Ok(()),
            Ok(Ok(_)) => Err("etcd has no leader".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }
}

/// Everything handlers share. Add fields here as later subsystems need them.
///
/// Built with [`AppState::new`] and its `with_` methods, the one place that
/// lists every field: `AppState::new(info, etcd).with_roles(roles)`.
pub struct AppState {
    pub info: ServerInfo,
    pub etcd: EtcdProbe,
    /// The leader-only actors (executor registry, changefeed owner) while
    /// this server runs them; empty otherwise.
    pub roles: RoleSlot,
    /// The election this server takes part in; `None`: no election, the
    /// roles are fixed and nothing is forwarded.
    pub election: Option<watch::Receiver<ElectionView>>,
    /// Changefeed administration in etcd; `None` where this server has no etcd.
    pub changefeeds: Option<Changefeeds>,
    /// The operators' token (`server.admin_token_file`); `None`: no admin.
    pub admin_token: Option<String>,
    /// Largest request body accepted (`http.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Largest heartbeat body accepted (`http.max_heartbeat_bytes`).
    pub max_heartbeat_bytes: usize,
    /// Registrations per client address (`http.register_rate`, `_burst`).
    pub register_limit: limits::RegisterLimiter,
    /// How to reach the other servers when forwarding: `None` over plain
    /// HTTP, or HTTPS trusting `http.tls_ca_file`.
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// etcd's alarms as this server last polled them; `None`: not watched.
    pub etcd_alarms: Option<EtcdAlarms>,
}

impl AppState {
    /// A server that runs no roles, takes part in no election, administers
    /// no changefeeds, has no admin token and forwards over plain HTTP, with
    /// the `[http]` defaults ([`HttpConfig::default`]) for the body limits
    /// and the registration rate.
    pub fn new(info: ServerInfo, etcd: EtcdProbe) -> Self {
        let http = HttpConfig::default();
        Self {
            info,
            etcd,
            roles: RoleSlot::default(),
            election: None,
            changefeeds: None,
            admin_token: None,
            max_body_bytes: http.max_body_bytes,
            max_heartbeat_bytes: http.max_heartbeat_bytes,
            register_limit: limits::RegisterLimiter::new(http.register_rate, http.register_burst),
            peer_tls: None,
            etcd_alarms: None,
        }
    }

    /// Publishes the leader-only actors through `roles`.
    pub fn with_roles(self, roles: RoleSlot) -> Self {
        Self { roles, ..self }
    }

    /// Takes part in the election `view` watches: leader-only requests are
    /// forwarded while `roles` is empty.
    pub fn with_election(self, view: watch::Receiver<ElectionView>) -> Self {
        Self {
            election: Some(view),
            ..self
        }
    }

    /// Serves the changefeed administration from `changefeeds`.
    pub fn with_changefeeds(self, changefeeds: Changefeeds) -> Self {
        Self {
            changefeeds: Some(changefeeds),
            ..self
        }
    }

    /// The operators' token; `None`: no admin.
    pub fn with_admin_token(self, admin_token: Option<String>) -> Self {
        Self {
            admin_token,
            ..self
        }
    }

    /// The body limits and the registration rate of `http`.
    pub fn with_http_limits(self, http: &HttpConfig) -> Self {
        Self {
            max_body_bytes: http.max_body_bytes,
            max_heartbeat_bytes: http.max_heartbeat_bytes,
            register_limit: limits::RegisterLimiter::new(http.register_rate, http.register_burst),
            ..self
        }
    }

    /// Largest request body accepted, but for heartbeats.
    pub fn with_max_body_bytes(self, max_body_bytes: usize) -> Self {
        Self {
            max_body_bytes,
            ..self
        }
    }

    /// Largest heartbeat body accepted.
    pub fn with_max_heartbeat_bytes(self, max_heartbeat_bytes: usize) -> Self {
        Self {
            max_heartbeat_bytes,
            ..self
        }
    }

    /// Registrations per client address.
    pub fn with_register_limit(self, register_limit: limits::RegisterLimiter) -> Self {
        Self {
            register_limit,
            ..self
        }
    }

    /// How to reach the other servers when forwarding: `None` over plain
    /// HTTP, or HTTPS with this client configuration.
    pub fn with_peer_tls(self, peer_tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self { peer_tls, ..self }
    }

    /// etcd's alarms, polled elsewhere: `/readyz` is 503 while one is raised.
    pub fn with_etcd_alarms(self, alarms: EtcdAlarms) -> Self {
        Self {
            etcd_alarms: Some(alarms),
            ..self
        }
    }

    /// Whether `token` is the admin token (compared in constant time).
    pub fn is_admin_token(&self, token: &str) -> bool {
        self.admin_token.as_deref().is_some_and(|admin| {
            admin.len() == token.len()
                && admin
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Reads a JSON body of at most `limit` bytes. An empty body is `None`; a
/// non-empty one must be `application/json`.
pub(crate) async fn json_body<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Option<T>> {
    use futures::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| Error::InvalidArgument(format!("cannot read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(Error::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    if body.is_empty() {
        return Ok(None);
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if !is_json {
        return Err(Error::UnsupportedMediaType);
    }
    crate::json::from_object(&body)
        .map(Some)
        .map_err(|e| Error::InvalidArgument(format!("invalid JSON body: {e}")))
}

/// Registers routes, extractor error handlers and the JSON 404 fallback.
/// Bodies are read by [`json_body`], under `state.max_body_bytes`.
/// Used as `App::new().configure(http::configure(state))`.
pub fn configure(
    state: web::Data<AppState>,
) -> impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static {
    move |cfg| {
        cfg.app_data(state.clone())
            .app_data(web::PathConfig::default().error_handler(error::path_error))
            .app_data(web::QueryConfig::default().error_handler(error::query_error))
            // First: on a follower it takes every leader-only request.
            .configure(forward::configure)
            .configure(executors::configure)
            .configure(status::configure)
            .configure(changefeeds::configure)
            .configure(openapi::configure)
            .configure(dashboard::configure)
            .default_service(web::to(not_found));
    }
}

/// A resource whose wrong-method requests get a JSON 405 instead of an empty one,
/// counted in the request metrics under `path` as its route label. Register every
/// route through it, with its full path (no `web::scope`): that keeps the metrics
/// cheap (see [`route_metrics`]).
pub(crate) fn resource(path: &str) -> actix_web::Resource {
    #[cfg(test)]
    REGISTERED.with(|paths| paths.borrow_mut().insert(path.to_owned()));
    web::resource(path)
        .app_data(route_metrics::RouteMetrics::new(path))
        .default_service(web::to(method_not_allowed))
}

/// What the unit tests of the HTTP modules share.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A server without roles, election or changefeeds, whose etcd is a closed
    /// port: every probe fails fast.
    pub(crate) async fn unreachable_etcd_state() -> AppState {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(200))
            .with_timeout(Duration::from_millis(200));
        let client = etcd_client::Client::connect([endpoint.as_str()], Some(options))
            .await
            .expect("connecting is lazy");
        let info = ServerInfo {
            id: "test-1".into(),
            version: "0.0.0",
            cluster_id: "c1".into(),
            advertise_addr: "127.0.0.1:8300".into(),
            etcd_endpoints: vec![endpoint],
        };
        AppState::new(info, EtcdProbe::new(client, Duration::from_millis(300)))
            .with_max_body_bytes(65536)
            .with_max_heartbeat_bytes(65536)
    }
}

#[cfg(test)]
thread_local! {
    /// Every path given to [`resource`] on this thread: what the OpenAPI
    /// tests compare the document against.
    pub(crate) static REGISTERED: std::cell::RefCell<std::collections::BTreeSet<String>> =
        Default::default();
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(Error::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse> {
    Err(Error::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.path().to_owned(),
        allow: req
            .match_pattern()
            .and_then(|pattern| openapi::allowed_methods(&pattern)),
    })
}

/// Requests left out of the access log: probes, scrapes and heartbeats
/// would drown it (thousands per second at scale; they are counted in
/// metrics). A plain string test: this runs on every request.
fn is_quiet(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
        || (path.starts_with("/api/v1/executors/") && path.ends_with("/heartbeat"))
}

/// The request middleware: counts every request in the route metrics
/// (see `route_metrics`) and writes one structured log line per request (method,
/// path, status, latency, peer) except probes, scrapes and heartbeats. [`serve`] wraps every app in
/// it (`App::new().wrap_fn(access_log)`); public for the benches.
pub fn access_log<S>(
    req: actix_web::dev::ServiceRequest,
    service: &S,
) -> impl std::future::Future<
    Output = std::result::Result<actix_web::dev::ServiceResponse, actix_web::Error>,
>
where
    S: actix_web::dev::Service<
        actix_web::dev::ServiceRequest,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
{
    let started = std::time::Instant::now();
    let method = route_metrics::method_index(req.method());
    let logged = (!is_quiet(req.path()))
        .then(|| (req.method().clone(), req.path().to_owned(), req.peer_addr()));
    let response = service.call(req);
    async move {
        let response = response.await;
        let elapsed = started.elapsed();
        let response = match response {
            Ok(response) => {
                route_metrics::observe(response.request(), method, response.status(), elapsed);
                response
            }
            Err(e) => {
                let status = e.as_response_error().status_code();
                route_metrics::observe_unmatched(method, status, elapsed);
                return Err(e);
            }
        };
        if let Some((method, path, peer)) = logged {
            tracing::info!(
                target: "flotilla::http",
                %method,
                path,
                status = response.status().as_u16(),
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                peer = peer.map(tracing::field::display),
                "request"
            );
        }
        Ok(response)
    }
}
