//! `flotilla::client`: an async client of the HTTP API, for executors and operators.
//!
//! [`Client`] has one typed method per route; [`Agent`] is an executor's life on top of
//! it (register, heartbeat, report progress, re-register, deregister). The client owns
//! no state but its connection pool, is cheap to clone, and its futures are `Send`: it
//! runs on any tokio runtime, actix's included.
//!
//! Errors are one [`Error`] enum: an answer of the server keeps its HTTP status and its
//! `{"code","message"}`; not reaching the server, a timeout and a malformed answer are
//! variants of their own, so a caller can tell "the server said no" from "no answer".

pub mod agent;
mod outbox;
mod simulate;
pub mod sse;
mod types;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use agent::{
    lease_margin, Agent, AgentConfig, AgentHandle, AgentView, ProgressReporter, MIN_LEASE_MARGIN,
};
pub use simulate::simulate;
pub use types::*;

/// Where a client connects when told nothing else.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8300";
/// How long one request may take by default (the watch stream is exempt once open).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error: its HTTP status and its `{"code","message"}`.
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        /// From `Retry-After` on a 503.
        retry_after: Option<Duration>,
    },
    /// The server URL cannot be used (only `http://host:port` is supported).
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The request could not be sent or its answer not read: no server there, the
    /// connection dropped.
    #[error("cannot reach {server}: {detail}")]
    Unreachable {
        server: String,
        /// The whole cause chain on one line.
        detail: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer within the client's timeout.
    #[error("no answer from {server} within {}", humantime::format_duration(*.timeout))]
    Timeout { server: String, timeout: Duration },
    /// An answer this client does not understand (not the JSON it expects).
    #[error("unexpected answer from {server} (HTTP {status}): {detail}")]
    Unexpected {
        server: String,
        status: u16,
        detail: String,
    },
}

/// The result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status the server answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } | Error::Unexpected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's machine-readable error code (`unknown_executor`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The server refused the request itself (4xx): repeating it unchanged will not help.
    pub fn is_client_error(&self) -> bool {
        self.status().is_some_and(|s| (400..500).contains(&s))
    }

    /// Worth trying again later: no answer, a timeout, or a 5xx (503: the server is
    /// starting, or a part of it is down).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } => true,
            Error::Api { status, .. } | Error::Unexpected { status, .. } => *status >= 500,
            Error::InvalidUrl { .. } => false,
        }
    }
}

/// The error body of every API error.
#[derive(Debug, Deserialize)]
struct ApiErrorBody {
    code: String,
    message: String,
}

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// An API client for one server, or several (any of them answers: followers forward
/// to the leader): it talks to one at a time and moves to the next when that one
/// cannot be reached or does not answer in time. Clones share the connection pool and
/// the current server.
#[derive(Clone)]
pub struct Client {
    http: HttpClient,
    /// `http://host:port` each, without a trailing slash.
    servers: Arc<[String]>,
    /// Index (modulo the count) of the server requests go to.
    current: Arc<AtomicUsize>,
    admin_token: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The admin token stays out of logs.
        f.debug_struct("Client")
            .field("servers", &self.servers)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Client {
    /// A client of the server at `server` (`http://host:port`; a missing scheme means
    /// `http://`), or of several: `URL,URL,...`, tried in turn.
    pub fn new(server: &str) -> Result<Client> {
        let servers = server
            .split(',')
            .map(parse_server)
            .collect::<Result<Vec<_>>>()?;
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        Ok(Client {
            http,
            servers: servers.into(),
            current: Arc::default(),
            admin_token: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sends `Authorization: Bearer <token>` on changefeed writes and on
    /// deregistrations that bring no executor token.
    pub fn with_admin_token(mut self, token: impl Into<String>) -> Client {
        self.admin_token = Some(token.into());
        self
    }

    /// How long one request may take (connect, send, read the answer).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The server this client talks to now.
    pub fn server(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()]
    }

    /// Every server this client may talk to, in order.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// `server` did not answer: the next requests go to the next server (unless
    /// another request moved on already).
    fn next_server_after(&self, server: &str) {
        let n = self.current.load(Ordering::Relaxed);
        if self.servers.len() > 1 && self.servers[n % self.servers.len()] == server {
            let _ = self.current.compare_exchange(
                n,
                n.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    // ---- executors ----

    /// `POST /api/v1/executors`.
    pub async fn register(&self, request: &RegisterRequest) -> Result<Registration> {
        self.call(Method::POST, "/api/v1/executors", None, Some(request))
            .await
    }

    /// `POST /api/v1/executors/{id}/heartbeat` with the executor's own token.
    pub async fn heartbeat(
        &self,
        id: &str,
        token: &str,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse> {
        let path = format!("/api/v1/executors/{}/heartbeat", encode(id));
        self.call(Method::POST, &path, Some(token), Some(request))
            .await
    }

    /// `GET /api/v1/executors`.
    pub async fn list_executors(&self, filter: &ExecutorFilter) -> Result<List<Executor>> {
        let mut query = Vec::new();
        if let Some(status) = &filter.status {
            query.push(format!("status={}", encode(status)));
        }
        for (key, value) in &filter.labels {
            query.push(format!("label={}", encode(&format!("{key}={value}"))));
        }
        let path = with_query("/api/v1/executors", &query);
        self.call(Method::GET, &path, None, None::<&()>).await
    }

    /// `GET /api/v1/executors/{id}`.
    pub async fn get_executor(&self, id: &str) -> Result<Executor> {
        let path = format!("/api/v1/executors/{}", encode(id));
        self.call(Method::GET, &path, None, None::<&()>).await
    }

    /// `DELETE /api/v1/executors/{id}`, with the executor's own token, or the admin
    /// token when `token` is `None`.
    pub async fn deregister(&self, id: &str, token: Option<&str>) -> Result<()> {
        let path = format!("/api/v1/executors/{}", encode(id));
        let token = token.or(self.admin_token.as_deref());
        self.call_empty(Method::DELETE, &path, token, None::<&()>)
            .await
    }

    /// `GET /api/v1/executors/watch`: a snapshot, then online/offline events, until the
    /// server ends the stream (a [`WatchEvent::Resync`], or a shutdown) or the
    /// connection drops (an error item). Opening the stream is bounded by the timeout;
    /// the stream itself is not.
    pub async fn watch_executors(&self) -> Result<WatchStream> {
        let server = self.server().to_owned();
        let request = self.request(
            &server,
            Method::GET,
            "/api/v1/executors/watch",
            None,
            None::<&()>,
        )?;
        let response = self
            .send(&server, request)
            .await
            .inspect_err(|e| self.on_error(&server, e))?;
        let status = response.status();
        if !status.is_success() {
            let body = self.read_body(&server, response.into_body()).await?;
            return Err(self.error_from(&server, status, None, &body));
        }
        let state = WatchState {
            body: Some(response.into_body()),
            parser: sse::SseParser::default(),
            ready: std::collections::VecDeque::new(),
        };
        let stream = futures::stream::unfold(state, move |mut state| {
            let server = server.clone();
            async move {
                loop {
                    if let Some(event) = state.ready.pop_front() {
                        return Some((event, state));
                    }
                    // `None` after the body ended or failed: the stream is over.
                    let body = state.body.as_mut()?;
                    match body.frame().await {
                        None => return None,
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                let events = state.parser.push(data).into_iter();
                                state.ready.extend(
                                    events.filter_map(|e| watch_event(&server, e).transpose()),
                                );
                            }
                        }
                        Some(Err(e)) => {
                            state.body = None;
                            return Some((Err(unreachable_error(&server, e)), state));
                        }
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    // ---- changefeeds ----

    /// `POST /api/v1/changefeeds?namespace=`.
    pub async fn create_changefeed(
        &self,
        namespace: &str,
        request: &CreateChangefeed,
    ) -> Result<Changefeed> {
        let path = with_query("/api/v1/changefeeds", &[namespace_query(namespace)]);
        let token = self.admin_token.as_deref();
        self.call(Method::POST, &path, token, Some(request)).await
    }

    /// `POST /api/v1/changefeeds:batch?namespace=`: up to [`MAX_BATCH_ITEMS`]
    /// changefeeds in one request; the answer says per item what happened.
    pub async fn create_changefeeds(
        &self,
        namespace: &str,
        requests: &[CreateChangefeed],
    ) -> Result<BatchCreated> {
        #[derive(Serialize)]
        struct Batch<'a> {
            items: &'a [CreateChangefeed],
        }
        let path = with_query("/api/v1/changefeeds:batch", &[namespace_query(namespace)]);
        let token = self.admin_token.as_deref();
        self.call(Method::POST, &path, token, Some(&Batch { items: requests }))
            .await
    }

    /// Every changefeed of `namespace` (optionally only those in `state`):
    /// [`Self::list_changefeeds_page`] until the last page, merged. For a
    /// large namespace prefer the pages: this holds all of them in memory.
    pub async fn list_changefeeds(
        &self,
        namespace: &str,
        state: Option<&str>,
    ) -> Result<ChangefeedList> {
        let mut query = ListChangefeeds {
            state: state.map(str::to_owned),
            limit: Some(MAX_LIST_LIMIT),
            ..ListChangefeeds::default()
        };
        let mut all = ChangefeedList::default();
        loop {
            let mut page = self.list_changefeeds_page(namespace, &query).await?;
            all.items.append(&mut page.items);
            all.unreadable.append(&mut page.unreadable);
            all.total = page.total;
            match page.continue_token {
                Some(token) => query.continue_token = Some(token),
                None => return Ok(all),
            }
        }
    }

    /// `GET /api/v1/changefeeds?namespace=&state=&executor=&limit=&continue=`:
    /// one page; pass its `continue_token` back for the next.
    pub async fn list_changefeeds_page(
        &self,
        namespace: &str,
        query: &ListChangefeeds,
    ) -> Result<ChangefeedList> {
        let mut params = vec![namespace_query(namespace)];
        if let Some(state) = &query.state {
            params.push(format!("state={}", encode(state)));
        }
        if let Some(executor) = &query.executor {
            params.push(format!("executor={}", encode(executor)));
        }
        if let Some(limit) = query.limit {
            params.push(format!("limit={limit}"));
        }
        if let Some(token) = &query.continue_token {
            params.push(format!("continue={}", encode(token)));
        }
        let path = with_query("/api/v1/changefeeds", &params);
        self.call(Method::GET, &path, None, None::<&()>).await
    }

    /// `GET /api/v1/changefeeds/{id}?namespace=`.
    pub async fn get_changefeed(&self, namespace: &str, id: &str) -> Result<Changefeed> {
        let path = changefeed_path(namespace, id, "");
        self.call(Method::GET, &path, None, None::<&()>).await
    }

    /// `PUT /api/v1/changefeeds/{id}?namespace=` (only while stopped).
    pub async fn update_changefeed(
        &self,
        namespace: &str,
        id: &str,
        request: &UpdateChangefeed,
    ) -> Result<Changefeed> {
        let path = changefeed_path(namespace, id, "");
        let token = self.admin_token.as_deref();
        self.call(Method::PUT, &path, token, Some(request)).await
    }

    /// `POST /api/v1/changefeeds/{id}/pause?namespace=`.
    pub async fn pause_changefeed(&self, namespace: &str, id: &str) -> Result<Changefeed> {
        let path = changefeed_path(namespace, id, "/pause");
        let token = self.admin_token.as_deref();
        self.call(Method::POST, &path, token, None::<&()>).await
    }

    /// `POST /api/v1/changefeeds/{id}/resume?namespace=`, optionally from a checkpoint.
    pub async fn resume_changefeed(
        &self,
        namespace: &str,
        id: &str,
        checkpoint_ts: Option<u64>,
    ) -> Result<Changefeed> {
        #[derive(Serialize)]
        struct Resume {
            checkpoint_ts: u64,
        }
        let path = changefeed_path(namespace, id, "/resume");
        let token = self.admin_token.as_deref();
        let body = checkpoint_ts.map(|checkpoint_ts| Resume { checkpoint_ts });
        self.call(Method::POST, &path, token, body.as_ref()).await
    }

    /// `DELETE /api/v1/changefeeds/{id}?namespace=`.
    pub async fn delete_changefeed(&self, namespace: &str, id: &str) -> Result<()> {
        let path = changefeed_path(namespace, id, "");
        let token = self.admin_token.as_deref();
        self.call_empty(Method::DELETE, &path, token, None::<&()>)
            .await
    }

    // ---- the server ----

    /// `GET /api/v1/status`.
    pub async fn status(&self) -> Result<ServerStatus> {
        self.call(Method::GET, "/api/v1/status", None, None::<&()>)
            .await
    }

    // ---- plumbing ----

    /// One request whose 2xx answer is JSON `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let (status, bytes) = self.exchange(method, path, token, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Unexpected {
            server: self.server().to_owned(),
            status: status.as_u16(),
            detail: format!("{e} in {}", snippet(&bytes)),
        })
    }

    /// One request whose 2xx answer has no body that matters (204).
    async fn call_empty(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<()> {
        self.exchange(method, path, token, body).await.map(|_| ())
    }

    /// Sends a request and reads the whole answer within the timeout; a non-2xx answer
    /// becomes an error.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, Bytes)> {
        // A server refusing the connection never saw the request: the next one is
        // asked at once, each server once. Any other failure is the caller's to
        // retry (the request may have been handled).
        let mut left = self.servers.len();
        loop {
            left -= 1;
            let server = self.server().to_owned();
            match self
                .exchange_with(&server, method.clone(), path, token, body)
                .await
            {
                Err(Error::Unreachable { ref source, .. })
                    if left > 0
                        && source
                            .downcast_ref::<hyper_util::client::legacy::Error>()
                            .is_some_and(hyper_util::client::legacy::Error::is_connect) =>
                {
                    self.next_server_after(&server);
                }
                result => return result.inspect_err(|e| self.on_error(&server, e)),
            }
        }
    }

    async fn exchange_with(
        &self,
        server: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, Bytes)> {
        let request = self.request(server, method, path, token, body)?;
        let exchange = async {
            let response = self.send(server, request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = self.read_body(server, response.into_body()).await?;
            if status.is_success() {
                Ok((status, bytes))
            } else {
                Err(self.error_from(server, status, retry_after, &bytes))
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Error::Timeout {
                server: server.to_owned(),
                timeout: self.timeout,
            })
            .and_then(|r| r)
    }

    /// A server that cannot be reached or did not answer in time: the next
    /// request goes to the next one.
    fn on_error(&self, server: &str, error: &Error) {
        if matches!(error, Error::Unreachable { .. } | Error::Timeout { .. }) {
            self.next_server_after(server);
        }
    }

    fn request(
        &self,
        server: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<Request<Full<Bytes>>> {
        let uri = format!("{server}{path}");
        let mut builder = Request::builder().method(method).uri(&uri);
        if let Some(token) = token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                Error::InvalidUrl {
                    url: uri.clone(),
                    reason: "the token is not a valid header value".into(),
                }
            })?;
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let body = match body {
            Some(body) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(body).expect("request types serialize"))
            }
            None => Bytes::new(),
        };
        builder
            .header(header::ACCEPT, "application/json")
            .body(Full::new(body))
            .map_err(|e| Error::InvalidUrl {
                url: uri,
                reason: e.to_string(),
            })
    }

    async fn send(
        &self,
        server: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let sending = self.http.request(request);
        tokio::time::timeout(self.timeout, sending)
            .await
            .map_err(|_| Error::Timeout {
                server: server.to_owned(),
                timeout: self.timeout,
            })?
            .map_err(|e| unreachable_error(server, e))
    }

    async fn read_body(&self, server: &str, body: hyper::body::Incoming) -> Result<Bytes> {
        body.collect()
            .await
            .map(|collected| collected.to_bytes())
            .map_err(|e| unreachable_error(server, e))
    }

    fn error_from(
        &self,
        server: &str,
        status: StatusCode,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Error {
        match serde_json::from_slice::<ApiErrorBody>(body) {
            Ok(ApiErrorBody { code, message }) => Error::Api {
                status: status.as_u16(),
                code,
                message,
                retry_after,
            },
            // Not one of ours: a proxy, or another program on that port.
            Err(_) => Error::Unexpected {
                server: server.to_owned(),
                status: status.as_u16(),
                detail: snippet(body),
            },
        }
    }
}

struct WatchState {
    body: Option<hyper::body::Incoming>,
    parser: sse::SseParser,
    ready: std::collections::VecDeque<Result<WatchEvent>>,
}

/// The stream of executor events [`Client::watch_executors`] returns.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

fn watch_event(server: &str, event: sse::SseEvent) -> Result<Option<WatchEvent>> {
    #[derive(Deserialize)]
    struct Snapshot {
        seq: u64,
        executors: Vec<Executor>,
    }
    #[derive(Deserialize)]
    struct Offline {
        id: String,
        reason: String,
    }
    #[derive(Deserialize)]
    struct Resync {
        #[serde(default)]
        reason: String,
    }
    let seq = || {
        event
            .id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or(0)
    };
    let decoded = match event.event.as_str() {
        "snapshot" => serde_json::from_str::<Snapshot>(&event.data)
            .map(|s| WatchEvent::Snapshot {
                seq: s.seq,
                executors: s.executors,
            })
            .map(Some),
        "online" => serde_json::from_str::<Executor>(&event.data)
            .map(|executor| WatchEvent::Online {
                seq: seq(),
                executor,
            })
            .map(Some),
        "offline" => serde_json::from_str::<Offline>(&event.data)
            .map(|o| WatchEvent::Offline {
                seq: seq(),
                id: o.id,
                reason: o.reason,
            })
            .map(Some),
        "resync" => serde_json::from_str::<Resync>(&event.data)
            .map(|r| WatchEvent::Resync { reason: r.reason })
            .map(Some),
        // An event this client does not know: a newer server; skip it.
        _ => Ok(None),
    };
    decoded.map_err(|e| Error::Unexpected {
        server: server.to_owned(),
        status: 200,
        detail: format!("bad {} event: {e}", event.event),
    })
}

/// One server URL (`http://host:port`; a missing scheme means `http://`) as
/// `http://host:port`.
fn parse_server(server: &str) -> Result<String> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: server.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = server.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| invalid(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(invalid("https is not supported; use http://")),
        _ => return Err(invalid("the scheme must be http://")),
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(invalid("no host"));
    };
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid("give the server only, without a path"));
    }
    Ok(format!("http://{authority}"))
}

fn unreachable_error(server: &str, error: impl std::error::Error + Send + Sync + 'static) -> Error {
    // hyper-util says "client error (Connect)"; the useful part ("Connection refused")
    // is further down the chain.
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    Error::Unreachable {
        server: server.to_owned(),
        detail,
        source: Box::new(error),
    }
}

/// The first 200 characters of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None if text.is_empty() => "an empty body".to_owned(),
        None => format!("{text:?}"),
    }
}

fn namespace_query(namespace: &str) -> String {
    format!("namespace={}", encode(namespace))
}

fn changefeed_path(namespace: &str, id: &str, action: &str) -> String {
    with_query(
        &format!("/api/v1/changefeeds/{}{action}", encode(id)),
        &[namespace_query(namespace)],
    )
}

fn with_query(path: &str, query: &[String]) -> String {
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a value is safe
/// in a path segment and in a query.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_checked() {
        assert_eq!(
            Client::new("127.0.0.1:8300").unwrap().server(),
            "http://127.0.0.1:8300"
        );
        assert_eq!(Client::new("http://h:1/").unwrap().server(), "http://h:1");
        for bad in ["https://h:1", "ftp://h", "http://h:1/api", "http://"] {
            assert!(
                matches!(Client::new(bad), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn values_are_percent_encoded() {
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode("zone=a b/c"), "zone%3Da%20b%2Fc");
    }
}
