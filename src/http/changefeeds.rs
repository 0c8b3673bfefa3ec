//! `/api/v1/changefeeds`: create, list, read, update, pause, resume and
//! delete changefeeds, answered by [`Changefeeds`] straight from etcd.
//! Every route takes `?namespace=` (default `default`); mutations need the
//! admin token when the server has one.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::error::{Error, ErrorBody, Result};
use super::{bearer_token, json_body, resource, AppState};
use crate::owner::feeds::{
    self, BatchCreated, ChangefeedView, Changefeeds, CreateChangefeed, ResumeChangefeed,
    Unreadable, UpdateChangefeed,
};
use crate::owner::model::FeedState;

/// The namespace of requests that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/api/v1/changefeeds")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(
        resource("/api/v1/changefeeds/{id}")
            .route(web::get().to(get))
            .route(web::put().to(update))
            .route(web::delete().to(delete)),
    )
    .service(resource("/api/v1/changefeeds:batch").route(web::post().to(create_batch)))
    .service(resource("/api/v1/changefeeds/{id}/pause").route(web::post().to(pause)))
    .service(resource("/api/v1/changefeeds/{id}/resume").route(web::post().to(resume)));
}

fn changefeeds(state: &AppState) -> Result<&Changefeeds> {
    state.changefeeds.as_ref().ok_or_else(|| {
        Error::Unavailable("changefeeds are not served by this server (no etcd)".into())
    })
}

/// Mutations are admin operations when the server has an admin token.
fn require_admin(state: &AppState, req: &HttpRequest) -> Result<()> {
    if state.admin_token.is_none() {
        return Ok(());
    }
    match bearer_token(req) {
        Some(token) if state.is_admin_token(token) => Ok(()),
        Some(_) => Err(Error::Unauthorized("wrong admin token".into())),
        None => Err(Error::Unauthorized(
            "changefeed changes need the admin token: Authorization: Bearer <token>".into(),
        )),
    }
}

/// `?namespace=` of the routes that take nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scope {
    namespace: Option<String>,
}

impl Scope {
    /// Parsed from the request, after the admin check: an unauthorized
    /// request learns nothing about what else is wrong with it.
    fn of(req: &HttpRequest) -> Result<Scope> {
        query(req)
    }

    fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| Error::InvalidArgument(format!("invalid query string: {e}")))
}

/// `?namespace=&state=&executor=&limit=&continue=` of the listing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    namespace: Option<String>,
    state: Option<String>,
    executor: Option<String>,
    limit: Option<String>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

/// A body that must be empty or `{}` (pause).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NoFields {}

/// `GET /api/v1/changefeeds`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = ChangefeedList)]
pub(super) struct ListResponse {
    items: Vec<ChangefeedView>,
    /// Changefeeds in the namespace when the listing's first page was read,
    /// before the filters (the same on every page).
    total: usize,
    unreadable: Vec<Unreadable>,
    /// Pass it as `continue` for the next page; absent on the last page. A
    /// page may hold fewer than `limit` items (a filter matched few) and still
    /// have a next one.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_token: Option<String>,
}

/// Create a changefeed.
///
/// `start_ts` absent or 0 means now (unix milliseconds `<< 18`); `target_ts` is
/// 0 (run forever) or greater than `start_ts`. The answer is the stored
/// changefeed: `checkpoint_ts = start_ts`, epoch 0, no executor.
#[utoipa::path(
    post,
    path = "/api/v1/changefeeds",
    operation_id = "create_changefeed",
    tag = "changefeeds",
    params(("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`")),
    request_body(content = CreateChangefeed, content_type = "application/json"),
    security((), ("admin_token" = [])),
    responses(
        (status = 201, description = "Created", body = ChangefeedView,
         headers(("Location" = String, description = "The changefeed's URL"))),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: the server has an admin token and the request does not carry it",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 409, description = "`changefeed_exists`: the id is taken", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 500, description = "`corrupt_value` (a malformed value in etcd, named) or `etcd_error`", body = ErrorBody),
        (status = 503, description = "`etcd_unavailable`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let scope = Scope::of(&req)?;
    let request: CreateChangefeed = json_body(&req, body, state.max_body_bytes)
        .await?
        .ok_or_else(|| {
            Error::InvalidArgument(
                "a JSON body {\"id\",\"sink_uri\",\"start_ts\"?,\"target_ts\"?,\"config\"?,\
                 \"selector\"?} is required"
                    .into(),
            )
        })?;
    let view = changefeeds(&state)?
        .create(scope.namespace(), request)
        .await?;
    Ok(HttpResponse::Created()
        .insert_header((
            header::LOCATION,
            // Both are restricted to [A-Za-z0-9_-]: nothing to escape.
            format!(
                "/api/v1/changefeeds/{}?namespace={}",
                view.id, view.namespace
            ),
        ))
        .json(view))
}

/// `POST /api/v1/changefeeds:batch` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchCreate {
    /// At most 1000 changefeeds, each as `POST /api/v1/changefeeds` takes it.
    #[schema(max_items = 1000)]
    items: Vec<CreateChangefeed>,
}

/// The body limit of a batch: this many times `http.max_body_bytes`.
const BATCH_BODY_FACTOR: usize = 16;

/// Create many changefeeds at once.
///
/// For operators who import thousands: each item is what `POST
/// /api/v1/changefeeds` takes. Every item is checked first: one that breaks a
/// rule, or an id given twice, refuses the batch (400, naming it) and nothing
/// is written. Then they are written in as few txns as etcd allows, each
/// requiring that its changefeeds do not exist. The answer lists what was
/// created and, per item not created, why (`changefeed_exists`, `conflict`,
/// or an etcd error code). The body may be up to 16 times `http.max_body_bytes`.
#[utoipa::path(
    post,
    path = "/api/v1/changefeeds:batch",
    operation_id = "create_changefeeds",
    tag = "changefeeds",
    params(("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`")),
    request_body(content = BatchCreate, content_type = "application/json"),
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "What was created and what was not, item by item", body = BatchCreated),
        (status = 400, description = "`invalid_argument`: a malformed body, an item that breaks a rule or an id given twice (named), more than 1000 items or a bad namespace; nothing written", body = ErrorBody),
        (status = 401, description = "`unauthorized`: the server has an admin token and the request does not carry it",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn create_batch(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let scope = Scope::of(&req)?;
    let limit = state.max_body_bytes.saturating_mul(BATCH_BODY_FACTOR);
    let request: BatchCreate = json_body(&req, body, limit).await?.ok_or_else(|| {
        Error::InvalidArgument(
            "a JSON body {\"items\":[{\"id\",\"sink_uri\",...}]} is required".into(),
        )
    })?;
    let outcome = changefeeds(&state)?
        .create_many(scope.namespace(), request.items)
        .await?;
    Ok(HttpResponse::Ok().json(outcome))
}

/// List the changefeeds of a namespace, a page at a time, sorted by id.
///
/// `GET /api/v1/changefeeds?namespace=default&state=normal&executor=E&limit=500`,
/// then `&continue=<the previous page's continue>` until an answer has no
/// `continue`. Every page of one listing is read at the revision of its first
/// page: a walk sees each changefeed that existed then exactly once. A token
/// older than etcd's compaction is `410 expired_continue`: list again. The
/// filters apply on the server; changefeeds whose stored values cannot be
/// decoded are named under `unreadable`.
#[utoipa::path(
    get,
    path = "/api/v1/changefeeds",
    operation_id = "list_changefeeds",
    tag = "changefeeds",
    params(
        ("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`"),
        ("state" = Option<FeedState>, Query, description = "Only changefeeds in this state"),
        ("executor" = Option<String>, Query, description = "Only changefeeds whose current assignment this executor holds"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 5000, description = "Items per page: default 500, at most 5000"),
        ("continue" = Option<String>, Query, description = "The `continue` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of changefeeds", body = ListResponse),
        (status = 400, description = "`invalid_argument` (a bad filter, limit or continue token)", body = ErrorBody),
        (status = 410, description = "`expired_continue`: the listing's revision was compacted; list again", body = ErrorBody),
        (status = 500, description = "`corrupt_value` (a malformed value in etcd, named) or `etcd_error`", body = ErrorBody),
        (status = 503, description = "`etcd_unavailable`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse> {
    let query: ListQuery = query(&req)?;
    let limit = query
        .limit
        .as_deref()
        .map(|limit| {
            limit.parse::<usize>().map_err(|_| {
                Error::InvalidArgument(format!(
                    "limit must be a whole number between 1 and {}, not {limit:?}",
                    feeds::MAX_LIST_LIMIT
                ))
            })
        })
        .transpose()?;
    let options = feeds::ListOptions {
        state: query.state.as_deref().map(feeds::parse_state).transpose()?,
        executor: query.executor,
        limit,
        continue_token: query.continue_token,
    };
    let namespace = query.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let listing = changefeeds(&state)?.list(namespace, &options).await?;
    Ok(HttpResponse::Ok().json(ListResponse {
        total: listing.total,
        items: listing.items,
        unreadable: listing.unreadable,
        continue_token: listing.continue_token,
    }))
}

/// One changefeed, with its state, checkpoint and executor.
#[utoipa::path(
    get,
    path = "/api/v1/changefeeds/{id}",
    operation_id = "get_changefeed",
    tag = "changefeeds",
    params(("id" = String, Path, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "The changefeed id"), ("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`")),
    responses(
        (status = 200, description = "The changefeed", body = ChangefeedView),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 500, description = "`corrupt_value` (a malformed value in etcd, named) or `etcd_error`", body = ErrorBody),
        (status = 503, description = "`etcd_unavailable`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn get(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let scope = Scope::of(&req)?;
    let view = changefeeds(&state)?.get(scope.namespace(), &id).await?;
    Ok(HttpResponse::Ok().json(view))
}

/// Update a paused changefeed: each field given replaces the stored one.
#[utoipa::path(
    put,
    path = "/api/v1/changefeeds/{id}",
    operation_id = "update_changefeed",
    tag = "changefeeds",
    params(("id" = String, Path, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "The changefeed id"), ("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`")),
    request_body(content = UpdateChangefeed, content_type = "application/json"),
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Updated", body = ChangefeedView),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: the server has an admin token and the request does not carry it",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`changefeed_not_paused` (pause it first) or `conflict`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 500, description = "`corrupt_value` (a malformed value in etcd, named) or `etcd_error`", body = ErrorBody),
        (status = 503, description = "`etcd_unavailable`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let scope = Scope::of(&req)?;
    let request: UpdateChangefeed = json_body(&req, body, state.max_body_bytes)
        .await?
        .ok_or_else(|| {
            Error::InvalidArgument(
                "a JSON body {\"sink_uri\"?,\"config\"?,\"selector\"?} is required".into(),
            )
        })?;
    let view = changefeeds(&state)?
        .update(scope.namespace(), &id, request)
        .await?;
    Ok(HttpResponse::Ok().json(view))
}

/// Pause a changefeed: `normal` -> `stopped` (already stopped: no-op).
#[utoipa::path(
    post,
    path = "/api/v1/changefeeds/{id}/pause",
    operation_id = "pause_changefeed",
    tag = "changefeeds",
    params(("id" = String, Path, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "The changefeed id"), ("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`")),
    request_body(content = Option<NoFields>, content_type = "application/json",
                 description = "Empty or `{}`"),
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Paused", body = ChangefeedView),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: the server has an admin token and the request does not carry it",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`changefeed_wrong_state` (failed or finished) or `conflict`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 500, description = "`corrupt_value` (a malformed value in etcd, named) or `etcd_error`", body = ErrorBody),
        (status = 503, description = "`etcd_unavailable`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn pause(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let scope = Scope::of(&req)?;
    let _: Option<NoFields> = json_body(&req, body, state.max_body_bytes).await?;
    let view = changefeeds(&state)?.pause(scope.namespace(), &id).await?;
    Ok(HttpResponse::Ok().json(view))
}

/// Resume a changefeed: `stopped` or `failed` -> `normal`.
///
/// Clears the error, the retry count and the backoff. With `checkpoint_ts` (in
/// `[start_ts, target_ts)`) it also rewrites the checkpoint. Already normal: a
/// no-op without a checkpoint, 409 `changefeed_not_paused` with one.
#[utoipa::path(
    post,
    path = "/api/v1/changefeeds/{id}/resume",
    operation_id = "resume_changefeed",
    tag = "changefeeds",
    params(("id" = String, Path, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "The changefeed id"), ("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`")),
    request_body(content = Option<ResumeChangefeed>, content_type = "application/json"),
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Resumed", body = ChangefeedView),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: the server has an admin token and the request does not carry it",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`changefeed_not_paused`, `changefeed_wrong_state` (finished) or `conflict`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 500, description = "`corrupt_value` (a malformed value in etcd, named) or `etcd_error`", body = ErrorBody),
        (status = 503, description = "`etcd_unavailable`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn resume(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let scope = Scope::of(&req)?;
    let request: ResumeChangefeed = json_body(&req, body, state.max_body_bytes)
        .await?
        .unwrap_or_default();
    let view = changefeeds(&state)?
        .resume(scope.namespace(), &id, request)
        .await?;
    Ok(HttpResponse::Ok().json(view))
}

/// Delete a changefeed: every key of it, in one txn.
#[utoipa::path(
    delete,
    path = "/api/v1/changefeeds/{id}",
    operation_id = "delete_changefeed",
    tag = "changefeeds",
    params(("id" = String, Path, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "The changefeed id"), ("namespace" = Option<String>, Query, pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$", description = "Default `default`")),
    security((), ("admin_token" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: the server has an admin token and the request does not carry it",
         body = ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 404, description = "`not_found`: nothing there", body = ErrorBody),
        (status = 409, description = "`conflict`", body = ErrorBody),
        (status = 500, description = "`corrupt_value` (a malformed value in etcd, named) or `etcd_error`", body = ErrorBody),
        (status = 503, description = "`etcd_unavailable`, `unavailable` or `no_leader`", body = ErrorBody,
         headers(("Retry-After" = String))),
    ),
)]
pub(super) async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let scope = Scope::of(&req)?;
    changefeeds(&state)?.delete(scope.namespace(), &id).await?;
    Ok(HttpResponse::NoContent().finish())
}
