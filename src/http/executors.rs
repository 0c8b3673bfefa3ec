//! `/api/v1/executors`: registration, heartbeats, reads, deregistration and
//! the Server-Sent Events feed, all answered by the `ExecutorRegistry` actor.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::Addr;
use actix_web::http::header;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::error::{Error, ErrorBody, Result};
use super::{bearer_token, json_body, resource, AppState};
use crate::actors::executor_registry::{
    self, Caller, Deregister, ExecutorEvent, ExecutorInfo, ExecutorRegistry, ExecutorStatus,
    GetExecutor, ListExecutors, Register, Subscribe, TokenHash,
};
use crate::actors::leader::Roles;
use crate::actors::owner::{Assignment, Rejected, Revoked, Work};
use crate::owner::feeds::validate_id;
use crate::owner::model::ChangefeedId;
use crate::owner::reactor::ProgressReport;

/// How often an idle watch stream gets a comment line, so proxies and
/// clients can tell a quiet feed from a dead connection.
const WATCH_KEEPALIVE: Duration = Duration::from_secs(15);

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Heartbeats first: the router tries resources in order and a pattern
    // with a `{id}` segment costs a regex match; the hottest route should pay
    // for one, not two.
    cfg.service(resource("/api/v1/executors/{id}/heartbeat").route(web::post().to(heartbeat)))
        .service(
            resource("/api/v1/executors")
                .route(web::post().to(register))
                .route(web::get().to(list)),
        )
        // Before `{id}`, which would otherwise match "watch".
        .service(resource("/api/v1/executors/watch").route(web::get().to(watch)))
        .service(
            resource("/api/v1/executors/{id}")
                .route(web::get().to(get))
                .route(web::delete().to(deregister)),
        );
}

fn registry(state: &AppState) -> Result<Addr<ExecutorRegistry>> {
    roles(state).map(|r| r.registry.addr)
}

/// The leader-only actors. Missing only when this server stepped down
/// between routing and here, or runs no registry at all.
fn roles(state: &AppState) -> Result<Roles> {
    state.roles.get().ok_or_else(|| not_leading(state))
}

fn not_leading(state: &AppState) -> Error {
    if state.election.is_some() {
        return Error::NoLeader("this server just stopped leading; retry".into());
    }
    Error::Unavailable("the executor registry is not running on this server".into())
}

/// `POST /api/v1/executors` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterRequest {
    /// The executor's name; its id is `<name>-<8 hex digits>`.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[a-zA-Z0-9]([-.a-zA-Z0-9]*[a-zA-Z0-9])?$"
    )]
    name: String,
    /// Where the executor can be reached (`host:port`, a URL): no spaces.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$"
    )]
    address: String,
    #[serde(default)]
    #[schema(value_type = crate::labels::LabelMap, required = false)]
    labels: BTreeMap<String, String>,
}

/// The registered executor, with the token it authenticates with (returned
/// once, never again) and the interval to heartbeat at.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct RegisterResponse {
    #[serde(flatten)]
    executor: ExecutorInfo,
    token: String,
    heartbeat_interval_ms: u64,
    /// The largest heartbeat body this server reads (413 above): pack the
    /// progress under it.
    max_heartbeat_bytes: u64,
}

/// Register an executor.
///
/// Validates the name, address and labels, writes the executor to the SQL store
/// (503 `store_unavailable` if that fails: nothing is registered), and returns its
/// id, its token (returned once) and the heartbeat interval.
#[utoipa::path(
    post,
    path = "/api/v1/executors",
    operation_id = "register_executor",
    tag = "executors",
    request_body(content = RegisterRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered", body = RegisterResponse,
         headers(("Location" = String, description = "The executor's URL"))),
        (status = 400, description = "`invalid_argument`: no body, malformed JSON, an unknown field, a bad name, address or label", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 429, description = "`too_many_requests`: too many registrations from this client address", body = ErrorBody,
         headers(("Retry-After" = String))),
        (status = 503, description = "`store_unavailable`, `not_ready`, `registry_full`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn register(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse> {
    limit_registration(&state, &req)?;
    let request: RegisterRequest = json_body(&req, body, state.max_body_bytes)
        .await?
        .ok_or_else(|| {
            Error::InvalidArgument(
                "a JSON body {\"name\",\"address\",\"labels\"} is required".into(),
            )
        })?;
    let registration = registry(&state)?
        .send(Register {
            name: request.name,
            address: request.address,
            labels: request.labels,
        })
        .await
        .map_err(mailbox)??;
    Ok(HttpResponse::Created()
        .insert_header((
            header::LOCATION,
            format!("/api/v1/executors/{}", registration.executor.id),
        ))
        .json(RegisterResponse {
            executor: registration.executor,
            token: registration.token,
            heartbeat_interval_ms: registration.heartbeat_interval.as_millis() as u64,
            max_heartbeat_bytes: state.max_heartbeat_bytes as u64,
        }))
}

/// Takes a registration token for the client's address, unless a member of
/// the election forwarded the request (it was limited there). The hop marker
/// alone proves nothing: anyone can send it, so it counts only from the
/// address of a server seen in the election.
pub(super) fn limit_registration(state: &AppState, req: &HttpRequest) -> Result<()> {
    let Some(peer) = req.peer_addr() else {
        return Ok(());
    };
    if req.headers().contains_key(&super::forward::FORWARDED_BY)
        && super::forward::is_member_address(state, peer.ip())
    {
        return Ok(());
    }
    state.register_limit.check(peer.ip())
}

/// `POST /api/v1/executors/{id}/heartbeat` body; it may be empty.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HeartbeatRequest {
    /// The TTL this executor asks for, clamped to the server's bounds;
    /// absent: the server's default.
    #[schema(minimum = 1)]
    ttl_ms: Option<u64>,
    /// Progress of the current assignments (at most 10,000 items).
    #[serde(default)]
    #[schema(max_items = 10000)]
    progress: Vec<ProgressItem>,
    /// Tasks of the last answer's `revoked` this executor no longer runs:
    /// stopped, with the workload's confirmation (at most 10,000 items). Each
    /// releases its changefeed to be assigned again at once, instead of after
    /// this executor's lease.
    #[serde(default)]
    #[schema(max_items = 10000)]
    stopped: Vec<StoppedItem>,
    /// The `generation` of the last answer whose lists this executor took:
    /// while it is current the answer says `unchanged` and leaves the lists out.
    #[schema(minimum = 0)]
    generation: Option<u64>,
}

/// A task an executor has stopped (from `revoked`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct StoppedItem {
    #[serde(default = "default_namespace")]
    #[schema(pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", default = "default")]
    namespace: String,
    #[schema(pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$")]
    changefeed: String,
    epoch: u64,
}

/// Progress of one assignment, as an executor reports it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ProgressItem {
    #[serde(default = "default_namespace")]
    #[schema(pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", default = "default")]
    namespace: String,
    #[schema(pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$")]
    changefeed: String,
    epoch: u64,
    checkpoint_ts: u64,
    #[serde(default)]
    resolved_ts: u64,
    #[serde(default)]
    error: Option<String>,
}

fn default_namespace() -> String {
    super::changefeeds::DEFAULT_NAMESPACE.to_owned()
}

/// One `?label=key=value` filter of the listing, in the document: a string
/// with a `=` (the server splits it at the first one).
pub(super) struct LabelFilter;

impl utoipa::PartialSchema for LabelFilter {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("="))
            .examples(["zone=a"])
            .into()
    }
}

impl utoipa::ToSchema for LabelFilter {}

/// Most progress items one heartbeat may carry.
const MAX_PROGRESS_ITEMS: usize = 10_000;
/// Longest error message kept from a report.
const MAX_ERROR_LEN: usize = 4096;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct HeartbeatResponse {
    /// The TTL granted: the server expires this executor no earlier than
    /// `ttl_ms` after it received this heartbeat. The executor's lease: it
    /// must stop all work at the time it *sent* this heartbeat + `ttl_ms` -
    /// a safety margin (the agent's default: 10 % of it, at least 500 ms),
    /// unless a later heartbeat was acknowledged by then. Count on a
    /// monotonic clock; only the clocks' rates must agree.
    ttl_ms: u64,
    /// When to send the next heartbeat.
    heartbeat_interval_ms: u64,
    /// The largest heartbeat body this server reads (413 above): pack the
    /// progress under it.
    max_heartbeat_bytes: u64,
    /// The changefeeds this executor must run, as committed in etcd; a
    /// changefeed missing here must be stopped.
    assignments: Vec<Assignment>,
    /// Progress reports refused (a stale epoch: another executor runs it now).
    rejected: Vec<Rejected>,
    /// Tasks taken away from this executor (moved, paused, updated, deleted,
    /// retried after an error, finished): stop each if it still runs, then
    /// name it in `stopped`. Until then (or until this executor's lease lapses)
    /// the changefeed is not assigned to anyone: no two executors ever run it
    /// at once.
    revoked: Vec<Revoked>,
    /// The generation of `assignments` and `revoked`: send it back as the
    /// request's `generation`.
    generation: u64,
    /// The request's `generation` is current: `assignments` and `revoked` are
    /// empty here and the executor's own lists still hold (the lease is
    /// extended all the same).
    unchanged: bool,
}

/// Heartbeat: keep the executor alive, report progress, learn assignments.
///
/// The body may be empty. `assignments` lists the changefeeds this executor must
/// run, as committed in etcd; one that leaves the list must be stopped. Progress
/// for anything but a current assignment at its current epoch comes back in
/// `rejected`.
///
/// The hand-off: a task taken away from this executor is listed in `revoked`
/// until the executor names it in a later heartbeat's `stopped` (after its
/// workload confirmed the stop) or its lease lapses; only then is the
/// changefeed assigned again, to this executor or another. An executor that
/// never sends `stopped` is safe too, but each move then waits for the
/// longest TTL the server grants. A `stopped` item that is not in `revoked`
/// is ignored. Deregistering with the executor's own token acknowledges the
/// stop of everything it had: stop the work first.
///
/// The executor lease: an answer holds for its `ttl_ms` counted from when the
/// executor sent the request, less a safety margin. An executor that gets no
/// 200 by then (the server cannot be reached, answers 503, or is slow) must
/// stop every assignment, since the server may have expired it and given
/// them to another, and take work again only from a later 200. Keep the margin
/// and `ttl_ms` above a leader failover (about the election's session TTL),
/// or every failover stops all work.
#[utoipa::path(
    post,
    path = "/api/v1/executors/{id}/heartbeat",
    operation_id = "heartbeat",
    tag = "executors",
    params(("id" = String, Path, description = "The executor id")),
    request_body(content = Option<HeartbeatRequest>, content_type = "application/json"),
    security(("executor_token" = [])),
    responses(
        (status = 200, description = "Alive", body = HeartbeatResponse),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or not this executor's",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "`unknown_executor`: register first", body = ErrorBody),
        (status = 410, description = "`tombstone_executor`: expired or deregistered; register again", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `no_leader`: keep the current work while its lease holds (send time of the last 200 + its `ttl_ms` - a margin), and retry", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn heartbeat(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse> {
    let token = bearer_token(&req).ok_or_else(|| {
        Error::Registry(executor_registry::Error::Unauthorized(
            id.as_str().to_owned(),
        ))
    })?;
    let token = TokenHash::of(token);
    let authenticate = || {
        state.roles.with(|roles| -> Result<()> {
            let roles = roles.ok_or_else(|| not_leading(&state))?;
            Ok(roles.registry.table.authenticate(&id, &token)?)
        })
    };
    // The id and token come before the body: the body of a caller that is
    // not a live executor is not even read when it may be large (up to
    // `max_heartbeat_bytes`), and an executor that is gone learns it
    // whatever it sent. A body declared no larger than any other request's
    // limit is read first, and the token checked once, with the heartbeat
    // (or before a bad body's error): one lock on the common path.
    let small = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n <= state.max_body_bytes);
    if !small {
        authenticate()?;
    }
    let (progress, stopped, known, ttl) =
        match heartbeat_request(&req, body, state.max_heartbeat_bytes).await {
            Ok(request) => request,
            Err(error) => {
                if small {
                    authenticate()?;
                }
                return Err(error);
            }
        };
    // Answered here, on the HTTP worker's thread, from the tables the
    // registry and the owner share with it: no actor message on this path.
    // The registry first, so only an authenticated, live executor's
    // progress counts.
    let (ack, work) = state.roles.with(|roles| -> Result<_> {
        let roles = roles.ok_or_else(|| not_leading(&state))?;
        // Only while this server's election lease certainly holds: a leader
        // frozen past it may have a successor that moved the work.
        if !roles.lease.is_valid() {
            return Err(Error::NoLeader(
                "this server's leadership lease has lapsed (another server may lead now); \
                 retry"
                    .into(),
            ));
        }
        let ack = roles.registry.table.heartbeat(&id, &token, ttl)?;
        Ok((ack, work_for(roles, &id, progress, stopped, known)?))
    })?;
    Ok(HttpResponse::Ok().json(HeartbeatResponse {
        ttl_ms: ack.ttl.as_millis() as u64,
        heartbeat_interval_ms: ack.heartbeat_interval.as_millis() as u64,
        max_heartbeat_bytes: state.max_heartbeat_bytes as u64,
        assignments: work.assignments,
        rejected: work.rejected,
        revoked: work.revoked,
        generation: work.generation,
        unchanged: work.unchanged,
    }))
}

/// The heartbeat's body, read and checked: its progress reports, the stops it
/// acknowledges and the TTL asked for.
async fn heartbeat_request(
    req: &HttpRequest,
    body: web::Payload,
    limit: usize,
) -> Result<(
    Vec<ProgressReport>,
    Vec<(ChangefeedId, u64)>,
    Option<u64>,
    Option<Duration>,
)> {
    let request: HeartbeatRequest = json_body(req, body, limit).await?.unwrap_or_default();
    if request.progress.len() > MAX_PROGRESS_ITEMS {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_PROGRESS_ITEMS} progress items per heartbeat"
        )));
    }
    if request.stopped.len() > MAX_PROGRESS_ITEMS {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_PROGRESS_ITEMS} stopped items per heartbeat"
        )));
    }
    let mut stopped = Vec::with_capacity(request.stopped.len());
    for item in request.stopped {
        validate_id("stopped namespace", &item.namespace)?;
        validate_id("stopped changefeed", &item.changefeed)?;
        stopped.push((
            ChangefeedId::new(item.namespace, item.changefeed),
            item.epoch,
        ));
    }
    let mut progress = Vec::with_capacity(request.progress.len());
    for item in request.progress {
        validate_id("progress namespace", &item.namespace)?;
        validate_id("progress changefeed", &item.changefeed)?;
        let error = item.error.map(|mut e| {
            if let Some((end, _)) = e.char_indices().nth(MAX_ERROR_LEN) {
                e.truncate(end);
            }
            e
        });
        progress.push(ProgressReport {
            changefeed: ChangefeedId::new(item.namespace, item.changefeed),
            epoch: item.epoch,
            checkpoint_ts: item.checkpoint_ts,
            resolved_ts: item.resolved_ts,
            error,
        });
    }
    let ttl = match request.ttl_ms {
        Some(0) => return Err(Error::InvalidArgument("ttl_ms must be positive".into())),
        Some(ms) => Some(Duration::from_millis(ms)),
        None => None,
    };
    Ok((progress, stopped, request.generation, ttl))
}

/// The owner's answer to a heartbeat the registry accepted.
fn work_for(
    roles: &Roles,
    id: &str,
    progress: Vec<ProgressReport>,
    stopped: Vec<(ChangefeedId, u64)>,
    known: Option<u64>,
) -> Result<Work> {
    Ok(match &roles.owner {
        // If the owner cannot answer after the heartbeat counted, a 503
        // tells the executor to keep its current work and ask again (an
        // empty list would stop everything).
        Some(owner) => owner
            .work(id, progress, stopped, known)
            .map_err(|e| Error::Unavailable(e.to_string()))?,
        // A server built without an owner (registry-only tests) has no work
        // to hand out and takes no progress.
        None => Work {
            assignments: Vec::new(),
            revoked: Vec::new(),
            generation: 0,
            unchanged: false,
            rejected: progress
                .into_iter()
                .map(|p| Rejected {
                    namespace: p.changefeed.namespace,
                    changefeed: p.changefeed.id,
                    epoch: p.epoch,
                    reason: "no_owner: this server runs no changefeed owner".into(),
                })
                .collect(),
        },
    })
}

/// `GET /api/v1/executors`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = ExecutorList)]
pub(super) struct ListResponse {
    items: Vec<ExecutorView>,
    total: usize,
}

/// An executor as the API shows it: the registry's view and the changefeeds
/// (`namespace/id`) the owner has assigned to it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Executor)]
pub(super) struct ExecutorView {
    #[serde(flatten)]
    info: ExecutorInfo,
    /// `namespace/id` of each changefeed assigned to it.
    changefeeds: Vec<String>,
}

fn with_changefeeds(state: &AppState, items: Vec<ExecutorInfo>) -> Vec<ExecutorView> {
    let mut assigned = state.roles.with(|roles| {
        roles
            .and_then(|r| r.owner.as_ref())
            .map(|owner| owner.assigned(items.iter().map(|e| e.id.as_str())))
    });
    items
        .into_iter()
        .enumerate()
        .map(|(i, info)| ExecutorView {
            info,
            changefeeds: assigned
                .as_mut()
                .map(|lists| std::mem::take(&mut lists[i]))
                .unwrap_or_default(),
        })
        .collect()
}

/// List executors, optionally filtered by status and labels.
///
/// `GET /api/v1/executors?status=running&label=zone=a&label=disk=ssd`
#[utoipa::path(
    get,
    path = "/api/v1/executors",
    operation_id = "list_executors",
    tag = "executors",
    params(
        ("status" = Option<ExecutorStatus>, Query, description = "Only executors in this status"),
        ("label" = Option<Vec<LabelFilter>>, Query, explode = true,
         description = "`key=value`; repeatable, all must match"),
    ),
    responses(
        (status = 200, description = "The executors", body = ListResponse),
        (status = 400, description = "`invalid_argument`: a bad filter or an unknown parameter", body = ErrorBody),
        (status = 503, description = "`unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn list(
    state: web::Data<AppState>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse> {
    let mut filter = ListExecutors::default();
    for (key, value) in query.into_inner() {
        match key.as_str() {
            "status" => {
                filter.status = Some(match value.as_str() {
                    "initing" => ExecutorStatus::Initing,
                    "running" => ExecutorStatus::Running,
                    "tombstone" => ExecutorStatus::Tombstone,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "status {other:?} is not one of initing, running, tombstone"
                        )))
                    }
                });
            }
            "label" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    Error::InvalidArgument(format!("label filter {value:?} is not key=value"))
                })?;
                filter.labels.insert(k.to_owned(), v.to_owned());
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown query parameter {other:?} (expected status, label)"
                )))
            }
        }
    }
    let items = registry(&state)?.send(filter).await.map_err(mailbox)?;
    let items = with_changefeeds(&state, items);
    Ok(HttpResponse::Ok().json(ListResponse {
        total: items.len(),
        items,
    }))
}

/// One executor; a recently expired one shows `"status": "tombstone"`.
#[utoipa::path(
    get,
    path = "/api/v1/executors/{id}",
    operation_id = "get_executor",
    tag = "executors",
    params(("id" = String, Path, description = "The executor id")),
    responses(
        (status = 200, description = "The executor", body = ExecutorView),
        (status = 404, description = "`unknown_executor`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn get(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse> {
    let info = registry(&state)?
        .send(GetExecutor {
            id: id.into_inner(),
        })
        .await
        .map_err(mailbox)??;
    let view = with_changefeeds(&state, vec![info]).pop();
    Ok(HttpResponse::Ok().json(view))
}

/// Deregister an executor (graceful), with its own token or the admin token.
#[utoipa::path(
    delete,
    path = "/api/v1/executors/{id}",
    operation_id = "deregister_executor",
    tag = "executors",
    params(("id" = String, Path, description = "The executor id")),
    security(("executor_token" = []), ("admin_token" = [])),
    responses(
        (status = 204, description = "Deregistered: announced offline, its changefeeds move"),
        (status = 401, description = "`unauthorized`: no token, or neither this executor's nor the admin's",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "`unknown_executor`", body = ErrorBody),
        (status = 410, description = "`tombstone_executor`: already gone", body = ErrorBody),
        (status = 503, description = "`not_ready`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn deregister(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let token = bearer_token(&req).ok_or_else(|| {
        Error::Registry(executor_registry::Error::Unauthorized(
            id.as_str().to_owned(),
        ))
    })?;
    let caller = if state.is_admin_token(token) {
        Caller::Admin
    } else {
        Caller::Executor {
            token: token.to_owned(),
        }
    };
    registry(&state)?
        .send(Deregister {
            id: id.into_inner(),
            caller,
        })
        .await
        .map_err(mailbox)??;
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /api/v1/executors/watch`: `snapshot`, then `online` / `offline`
/// events, in order; `resync` (then the end of the stream) when this client
/// fell behind.
#[utoipa::path(
    get,
    path = "/api/v1/executors/watch",
    operation_id = "watch_executors",
    tag = "executors",
    summary = "Server-Sent Events feed of the executors",
    description = "First a `snapshot` event `{\"seq\",\"executors\"}`, then `online` \
        (an executor: when it registers, and again with status `running` at its first \
        heartbeat to this leader) and `offline` (`{\"id\",\"reason\"}`) events with `id:` = seq, \
        and a `: keepalive` comment every 15 s of quiet. A client that falls behind \
        gets `resync` and the end of the stream: reconnect for a fresh snapshot.",
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String),
        (status = 503, description = "`not_ready`, `too_many_watchers` (`registry.max_watchers`), \
            `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn watch(state: web::Data<AppState>) -> Result<HttpResponse> {
    let subscription = registry(&state)?
        .send(Subscribe { watcher: true })
        .await
        .map_err(mailbox)??;
    let snapshot = sse_frame(
        "snapshot",
        Some(subscription.seq),
        &serde_json::json!({ "seq": subscription.seq, "executors": subscription.snapshot }),
    );
    let mut keepalive = tokio::time::interval(WATCH_KEEPALIVE);
    keepalive.reset();
    let events = stream::unfold(
        (subscription.events, keepalive, false),
        |(mut rx, mut keepalive, ended)| async move {
            if ended {
                return None;
            }
            let frame = tokio::select! {
                event = rx.recv() => match event? {
                    ExecutorEvent::Online { seq, executor } => sse_frame("online", Some(seq), &executor),
                    ExecutorEvent::Offline { seq, id, reason, .. } => {
                        sse_frame("offline", Some(seq), &serde_json::json!({ "id": id, "reason": reason }))
                    }
                    ExecutorEvent::Resync => {
                        let frame = sse_frame("resync", None, &serde_json::json!({
                            "reason": "this subscriber fell behind; reconnect for a fresh snapshot"
                        }));
                        return Some((Ok::<_, actix_web::Error>(frame), (rx, keepalive, true)));
                    }
                },
                _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
            };
            Some((Ok(frame), (rx, keepalive, false)))
        },
    );
    let body = stream::once(async move { Ok::<_, actix_web::Error>(snapshot) }).chain(events);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

fn sse_frame(event: &str, id: Option<u64>, data: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(data).expect("API types serialize");
    let id = id.map(|id| format!("id: {id}\n")).unwrap_or_default();
    Bytes::from(format!("{id}event: {event}\ndata: {json}\n\n"))
}

/// A registry that does not answer (stopping, or gone) is a 503.
pub(super) fn mailbox(error: actix::MailboxError) -> Error {
    Error::Unavailable(format!("the executor registry is not answering: {error}"))
}
