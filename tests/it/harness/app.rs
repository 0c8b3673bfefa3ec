//! In-process API tests: the actix app over an [`flotilla::http::AppState`], and the
//! request macros and error assertion every such test uses.

/// An initialised test service over `state` (a `web::Data<AppState>`).
macro_rules! app {
    ($state:expr) => {
        actix_web::test::init_service(
            actix_web::App::new().configure(flotilla::http::configure($state.clone())),
        )
        .await
    };
}

/// Sends a request; returns the status, the JSON body (Null when empty) and
/// the response headers.
macro_rules! call_full {
    ($app:expr, $req:expr) => {{
        let resp = actix_web::test::call_service(&$app, $req.to_request()).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = actix_web::test::read_body(resp).await;
        let body: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("non-JSON body {bytes:?}: {e}"))
        };
        (status, body, headers)
    }};
}

/// Sends a request and returns status and JSON body (Null when empty).
macro_rules! call {
    ($app:expr, $req:expr) => {{
        let (status, body, _) = $crate::harness::app::call_full!($app, $req);
        (status, body)
    }};
}

pub(crate) use {app, call, call_full};

/// An API error answer: the status, the stable `code`, and a non-empty message.
pub fn assert_error(
    status: actix_web::http::StatusCode,
    body: &serde_json::Value,
    want_status: u16,
    want_code: &str,
) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["code"], want_code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// The identity of an in-process test server.
pub fn server_info() -> flotilla::http::ServerInfo {
    flotilla::http::ServerInfo {
        id: "test".into(),
        version: "0",
        cluster_id: "c".into(),
        advertise_addr: "127.0.0.1:0".into(),
        etcd_endpoints: vec![],
    }
}

/// An etcd client to a closed port (connecting is lazy), for tests that keep
/// etcd out: every request fails within 100 ms.
pub async fn closed_etcd() -> etcd_client::Client {
    etcd_client::Client::connect(
        ["http://127.0.0.1:1"],
        Some(
            etcd_client::ConnectOptions::new()
                .with_connect_timeout(std::time::Duration::from_millis(100)),
        ),
    )
    .await
    .expect("connecting is lazy")
}
