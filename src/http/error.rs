//! `Error`: every error a request can end in, rendered as `{"code","message"}` with
//! its HTTP status. `code` is stable: clients and scripts match on it, and metrics may
//! use it as a label. Add a variant per new failure a route can report.

use actix_web::error::{PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

pub use crate::error_code::ErrorCode;

/// Errors a handler returns; the `Display` text is the `message` sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: bad JSON, a bad field, a bad path or query parameter.
    #[error("{0}")]
    InvalidArgument(String),
    /// The body is larger than `http.max_body_bytes`.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body is not `application/json`.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// No route, or no such object.
    #[error("{0}")]
    NotFound(String),
    /// The path exists but not with this method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        method: String,
        path: String,
        /// The methods the route answers, for the `Allow` header.
        allow: Option<&'static str>,
    },
    /// etcd did not answer in time.
    #[error("etcd is unavailable: {0}")]
    EtcdUnavailable(String),
    /// etcd raised an alarm: it refuses writes.
    #[error("{0}")]
    EtcdAlarm(&'static str),
    /// Too many registrations from this client address; retry after the
    /// given number of seconds.
    #[error("too many registrations from this address; retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// This server does not lead and cannot reach a leader to forward to.
    #[error("{0}")]
    NoLeader(String),
    /// A subsystem this request needs is not running or not answering.
    #[error("{0}")]
    Unavailable(String),
    /// The executor registry refused the request.
    #[error(transparent)]
    Registry(#[from] crate::actors::executor_registry::Error),
    /// A changefeed request failed (see [`crate::owner::feeds::Error`]).
    #[error(transparent)]
    Changefeed(#[from] crate::owner::feeds::Error),
    /// An admin operation without the admin token, or with a wrong one.
    #[error("{0}")]
    Unauthorized(String),
    /// A bug or an unexpected failure; details go to the log, not to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What handlers return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Error::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            Error::EtcdUnavailable(_) => ErrorCode::EtcdUnavailable,
            Error::EtcdAlarm(_) => ErrorCode::EtcdAlarm,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::NoLeader(_) => ErrorCode::NoLeader,
            Error::TooManyRequests { .. } => ErrorCode::TooManyRequests,
            Error::Registry(e) => e.code(),
            Error::Changefeed(e) => e.code(),
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Written by hand (not derived): `code`'s values are [`ErrorCode::ALL`].
impl utoipa::PartialSchema for ErrorBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .description(Some(
                "The body of every error response: a stable machine-readable `code` and a \
                 message for people.",
            ))
            .property(
                "code",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str()))),
            )
            .required("code")
            .property("message", ObjectBuilder::new().schema_type(Type::String))
            .required("message")
            .into()
    }
}

impl utoipa::ToSchema for ErrorBody {
    fn name() -> std::borrow::Cow<'static, str> {
        "Error".into()
    }
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        match self {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::EtcdUnavailable(_)
            | Error::EtcdAlarm(_)
            | Error::Unavailable(_)
            | Error::NoLeader(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Registry(e) => {
                use crate::actors::executor_registry::Error as R;
                match e {
                    R::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                    R::UnknownExecutor(_) => StatusCode::NOT_FOUND,
                    R::TombstoneExecutor(_) => StatusCode::GONE,
                    R::Unauthorized(_) => StatusCode::UNAUTHORIZED,
                    R::StoreUnavailable(_) | R::NotReady | R::Full(_) | R::TooManyWatchers(_) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }
            Error::Changefeed(e) => {
                use crate::owner::feeds::Error as F;
                match e {
                    F::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                    F::NotFound(_) => StatusCode::NOT_FOUND,
                    F::Exists(_) | F::NotPaused { .. } | F::WrongState { .. } | F::Conflict(_) => {
                        StatusCode::CONFLICT
                    }
                    F::ExpiredContinue { .. } => StatusCode::GONE,
                    F::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    // A malformed stored value is the server's data, not the
                    // request's fault (not 4xx), and retrying will not fix it
                    // (not 503); unlike `Internal`, the message is for the client.
                    F::Etcd(_) | F::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                }
            }
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Error::Internal(detail) = self {
            tracing::error!(%detail, "request failed");
        }
        if let Error::Changefeed(
            error @ (crate::owner::feeds::Error::Etcd(_)
            | crate::owner::feeds::Error::Corrupt { .. }),
        ) = self
        {
            tracing::warn!(%error, "changefeed request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((actix_web::http::header::RETRY_AFTER, "1"));
        }
        if let Error::TooManyRequests { retry_after_secs } = self {
            response.insert_header((
                actix_web::http::header::RETRY_AFTER,
                retry_after_secs.to_string(),
            ));
        }
        if let Error::MethodNotAllowed {
            allow: Some(allow), ..
        } = self
        {
            response.insert_header((actix_web::http::header::ALLOW, *allow));
        }
        if self.status_code() == StatusCode::UNAUTHORIZED {
            response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(ErrorBody {
            code: self.code(),
            message: self.to_string(),
        })
    }
}

/// Error handler for `web::Path` extractors.
pub(super) fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    Error::InvalidArgument(format!("invalid path parameter: {err}")).into()
}

/// Error handler for `web::Query` extractors.
pub(super) fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    Error::InvalidArgument(format!("invalid query string: {err}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::executor_registry;
    use crate::owner::feeds;
    use crate::owner::model::{ChangefeedId, FeedState};

    #[test]
    fn codes_and_statuses_match() {
        for (err, code, status) in [
            (Error::InvalidArgument("x".into()), "invalid_argument", 400),
            (
                Error::PayloadTooLarge { limit: 1 },
                "payload_too_large",
                413,
            ),
            (Error::UnsupportedMediaType, "unsupported_media_type", 415),
            (Error::NotFound("x".into()), "not_found", 404),
            (Error::EtcdUnavailable("x".into()), "etcd_unavailable", 503),
            (Error::EtcdAlarm("x"), "etcd_alarm", 503),
            (Error::Internal("x".into()), "internal", 500),
            (
                Error::TooManyRequests {
                    retry_after_secs: 1,
                },
                "too_many_requests",
                429,
            ),
            (
                Error::Registry(crate::actors::executor_registry::Error::Full(1)),
                "registry_full",
                503,
            ),
            (
                Error::Registry(crate::actors::executor_registry::Error::TooManyWatchers(1)),
                "too_many_watchers",
                503,
            ),
            (Error::NoLeader("x".into()), "no_leader", 503),
            (
                Error::MethodNotAllowed {
                    method: "PATCH".into(),
                    path: "/x".into(),
                    allow: Some("GET"),
                },
                "method_not_allowed",
                405,
            ),
            (Error::NoLeader("x".into()), "no_leader", 503),
            (executor_registry::Error::NotReady.into(), "not_ready", 503),
            (
                feeds::Error::Etcd(std::sync::Arc::new(etcd_client::Error::InvalidArgs(
                    "x".into(),
                )))
                .into(),
                "etcd_error",
                500,
            ),
            (Error::Unavailable("x".into()), "unavailable", 503),
            (
                executor_registry::Error::UnknownExecutor("x".into()).into(),
                "unknown_executor",
                404,
            ),
            (
                executor_registry::Error::TombstoneExecutor("x".into()).into(),
                "tombstone_executor",
                410,
            ),
            (
                executor_registry::Error::Unauthorized("x".into()).into(),
                "unauthorized",
                401,
            ),
            (
                executor_registry::Error::StoreUnavailable(std::sync::Arc::new(
                    crate::store::Error::Duplicate { id: "x".into() },
                ))
                .into(),
                "store_unavailable",
                503,
            ),
            (Error::Unauthorized("x".into()), "unauthorized", 401),
            (
                feeds::Error::InvalidArgument("x".into()).into(),
                "invalid_argument",
                400,
            ),
            (
                feeds::Error::NotFound(ChangefeedId::new("n", "c")).into(),
                "not_found",
                404,
            ),
            (
                feeds::Error::Exists(ChangefeedId::new("n", "c")).into(),
                "changefeed_exists",
                409,
            ),
            (
                feeds::Error::NotPaused {
                    id: ChangefeedId::new("n", "c"),
                    state: FeedState::Normal,
                    hint: "x",
                }
                .into(),
                "changefeed_not_paused",
                409,
            ),
            (
                feeds::Error::WrongState {
                    id: ChangefeedId::new("n", "c"),
                    state: FeedState::Failed,
                    op: "pause",
                }
                .into(),
                "changefeed_wrong_state",
                409,
            ),
            (
                feeds::Error::Conflict(ChangefeedId::new("n", "c")).into(),
                "conflict",
                409,
            ),
            (
                feeds::Error::Unavailable("x".into()).into(),
                "etcd_unavailable",
                503,
            ),
            (
                feeds::Error::Corrupt {
                    key: "k".into(),
                    source: serde_json::from_str::<u8>("x").unwrap_err(),
                }
                .into(),
                "corrupt_value",
                500,
            ),
        ] {
            assert_eq!(err.code().as_str(), code);
            assert_eq!(err.status_code().as_u16(), status, "{code}");
        }
    }
}
