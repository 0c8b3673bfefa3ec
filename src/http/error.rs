//! `ApiError`: every error a request can end in, rendered as `{"code","message"}` with
//! its HTTP status. `code` is stable: clients and scripts match on it, and metrics may
//! use it as a label. Add a variant per new failure a route can report.

use actix_web::error::{PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

pub use crate::error_code::ErrorCode;

/// Errors a handler returns; the `Display` text is the `message` sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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
    Registry(#[from] crate::actors::executor_registry::RegistryError),
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
pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            ApiError::EtcdUnavailable(_) => ErrorCode::EtcdUnavailable,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::NoLeader(_) => ErrorCode::NoLeader,
            ApiError::TooManyRequests { .. } => ErrorCode::TooManyRequests,
            ApiError::Registry(e) => e.code(),
            ApiError::Changefeed(e) => e.code(),
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Internal(_) => ErrorCode::Internal,
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

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::EtcdUnavailable(_) | ApiError::Unavailable(_) | ApiError::NoLeader(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Registry(e) => {
                use crate::actors::executor_registry::RegistryError as R;
                match e {
                    R::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                    R::UnknownExecutor(_) => StatusCode::NOT_FOUND,
                    R::TombstoneExecutor(_) => StatusCode::GONE,
                    R::Unauthorized(_) => StatusCode::UNAUTHORIZED,
                    R::StoreUnavailable(_) | R::NotReady | R::Full(_) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }
            ApiError::Changefeed(e) => {
                use crate::owner::feeds::Error as F;
                match e {
                    F::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                    F::NotFound(_) => StatusCode::NOT_FOUND,
                    F::Exists(_) | F::NotPaused { .. } | F::WrongState { .. } | F::Conflict(_) => {
                        StatusCode::CONFLICT
                    }
                    F::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    // A malformed stored value is the server's data, not the
                    // request's fault (not 4xx), and retrying will not fix it
                    // (not 503); unlike `Internal`, the message is for the client.
                    F::Etcd(_) | F::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                }
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(detail) = self {
            tracing::error!(%detail, "request failed");
        }
        if let ApiError::Changefeed(
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
        if let ApiError::TooManyRequests { retry_after_secs } = self {
            response.insert_header((
                actix_web::http::header::RETRY_AFTER,
                retry_after_secs.to_string(),
            ));
        }
        if let ApiError::MethodNotAllowed {
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
    ApiError::InvalidArgument(format!("invalid path parameter: {err}")).into()
}

/// Error handler for `web::Query` extractors.
pub(super) fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::InvalidArgument(format!("invalid query string: {err}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::executor_registry::RegistryError;
    use crate::owner::feeds::Error as FeedError;
    use crate::owner::model::{ChangefeedId, FeedState};

    #[test]
    fn codes_and_statuses_match() {
        for (err, code, status) in [
            (
                ApiError::InvalidArgument("x".into()),
                "invalid_argument",
                400,
            ),
            (
                ApiError::PayloadTooLarge { limit: 1 },
                "payload_too_large",
                413,
            ),
            (
                ApiError::UnsupportedMediaType,
                "unsupported_media_type",
                415,
            ),
            (ApiError::NotFound("x".into()), "not_found", 404),
            (
                ApiError::EtcdUnavailable("x".into()),
                "etcd_unavailable",
                503,
            ),
            (ApiError::Internal("x".into()), "internal", 500),
            (
                ApiError::TooManyRequests {
                    retry_after_secs: 1,
                },
                "too_many_requests",
                429,
            ),
            (
                ApiError::Registry(crate::actors::executor_registry::RegistryError::Full(1)),
                "registry_full",
                503,
            ),
            (ApiError::NoLeader("x".into()), "no_leader", 503),
            (
                ApiError::MethodNotAllowed {
                    method: "PATCH".into(),
                    path: "/x".into(),
                    allow: Some("GET"),
                },
                "method_not_allowed",
                405,
            ),
            (ApiError::NoLeader("x".into()), "no_leader", 503),
            (RegistryError::NotReady.into(), "not_ready", 503),
            (
                FeedError::Etcd(etcd_client::Error::InvalidArgs("x".into())).into(),
                "etcd_error",
                500,
            ),
            (ApiError::Unavailable("x".into()), "unavailable", 503),
            (
                RegistryError::UnknownExecutor("x".into()).into(),
                "unknown_executor",
                404,
            ),
            (
                RegistryError::TombstoneExecutor("x".into()).into(),
                "tombstone_executor",
                410,
            ),
            (
                RegistryError::Unauthorized("x".into()).into(),
                "unauthorized",
                401,
            ),
            (
                RegistryError::StoreUnavailable(std::sync::Arc::new(
                    crate::store::Error::Duplicate { id: "x".into() },
                ))
                .into(),
                "store_unavailable",
                503,
            ),
            (ApiError::Unauthorized("x".into()), "unauthorized", 401),
            (
                FeedError::InvalidArgument("x".into()).into(),
                "invalid_argument",
                400,
            ),
            (
                FeedError::NotFound(ChangefeedId::new("n", "c")).into(),
                "not_found",
                404,
            ),
            (
                FeedError::Exists(ChangefeedId::new("n", "c")).into(),
                "changefeed_exists",
                409,
            ),
            (
                FeedError::NotPaused {
                    id: ChangefeedId::new("n", "c"),
                    state: FeedState::Normal,
                    hint: "x",
                }
                .into(),
                "changefeed_not_paused",
                409,
            ),
            (
                FeedError::WrongState {
                    id: ChangefeedId::new("n", "c"),
                    state: FeedState::Failed,
                    op: "pause",
                }
                .into(),
                "changefeed_wrong_state",
                409,
            ),
            (
                FeedError::Conflict(ChangefeedId::new("n", "c")).into(),
                "conflict",
                409,
            ),
            (
                FeedError::Unavailable("x".into()).into(),
                "etcd_unavailable",
                503,
            ),
            (
                FeedError::Corrupt {
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
