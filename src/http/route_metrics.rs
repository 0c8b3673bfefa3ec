//! Request metrics by route: `flotilla_http_requests_total` and
//! `flotilla_http_request_duration_seconds`, labelled by the matched route *pattern*
//! (`/api/v1/executors/{id}/heartbeat`, never the raw path, so ids cannot explode the
//! number of series), the method and the status.
//!
//! Cheap on purpose: the heartbeat route serves ~90k requests/s. [`super::resource`]
//! attaches a [`RouteMetrics`] to every resource as resource data, so after the
//! response the middleware finds the route with one type-id lookup in the request's
//! data, never by matching or formatting the path. Each `RouteMetrics` keeps the
//! handles it has resolved per (method, status) in a short list scanned without
//! hashing; after the first request of a kind, recording is two atomic updates of
//! the counter and histogram, no allocation and no label lookup. The App is built
//! once per HTTP worker thread, so each worker has its own `RouteMetrics` per route
//! and the cache needs no lock.

use std::cell::RefCell;
use std::time::Duration;

use actix_web::http::{Method, StatusCode};
use actix_web::HttpRequest;
use prometheus::{Histogram, IntCounter};

use crate::metrics;

/// The route label of requests that matched no route (the JSON 404).
pub(crate) const UNMATCHED: &str = "unmatched";

/// Method labels; anything else (extension methods) is `other`, so a client cannot
/// invent label values.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other",
];

/// A bound on the cached (method, status) pairs per route; more are still counted,
/// just resolved per request (only a client sending odd methods gets there).
const MAX_SLOTS: usize = 32;

/// The index of `method`'s label in [`METHODS`].
pub(crate) fn method_index(method: &Method) -> u8 {
    match method.as_str() {
        "GET" => 0,
        "POST" => 1,
        "PUT" => 2,
        "DELETE" => 3,
        "PATCH" => 4,
        "HEAD" => 5,
        "OPTIONS" => 6,
        _ => 7,
    }
}

/// The metrics of one route (on one HTTP worker).
pub(crate) struct RouteMetrics {
    route: Box<str>,
    slots: RefCell<Vec<Slot>>,
}

/// Resolved handles for one (method, status) of a route.
struct Slot {
    method: u8,
    status: u16,
    requests: IntCounter,
    duration: Histogram,
}

impl Slot {
    fn resolve(route: &str, method: u8, status: StatusCode) -> Slot {
        let labels = [route, METHODS[usize::from(method)], status.as_str()];
        let m = metrics::http();
        Slot {
            method,
            status: status.as_u16(),
            requests: m.requests_total.with_label_values(&labels),
            duration: m.request_duration_seconds.with_label_values(&labels),
        }
    }

    fn record(&self, elapsed: Duration) {
        self.requests.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

impl RouteMetrics {
    pub(crate) fn new(route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.into(),
            slots: RefCell::new(Vec::new()),
        }
    }

    /// Counts one request and its latency.
    pub(crate) fn observe(&self, method: u8, status: StatusCode, elapsed: Duration) {
        let code = status.as_u16();
        if let Some(slot) = self
            .slots
            .borrow()
            .iter()
            .find(|s| s.status == code && s.method == method)
        {
            slot.record(elapsed);
            return;
        }
        let slot = Slot::resolve(&self.route, method, status);
        slot.record(elapsed);
        let mut slots = self.slots.borrow_mut();
        if slots.len() < MAX_SLOTS {
            slots.push(slot);
        }
    }
}

thread_local! {
    static UNMATCHED_ROUTE: RouteMetrics = RouteMetrics::new(UNMATCHED);
}

/// Records a request that got a response: under the route [`super::resource`]
/// attached, else under the pattern actix matched (a route registered without
/// `resource()`: correct but slower, it formats the pattern per request), else as
/// [`UNMATCHED`].
pub(crate) fn observe(req: &HttpRequest, method: u8, status: StatusCode, elapsed: Duration) {
    if let Some(route) = req.app_data::<RouteMetrics>() {
        route.observe(method, status, elapsed);
    } else if let Some(pattern) = req.match_pattern() {
        Slot::resolve(&pattern, method, status).record(elapsed);
    } else {
        observe_unmatched(method, status, elapsed);
    }
}

/// Records a request under [`UNMATCHED`]; also used for a request whose service
/// failed without a response (its route is no longer known).
pub(crate) fn observe_unmatched(method: u8, status: StatusCode, elapsed: Duration) {
    UNMATCHED_ROUTE.with(|route| route.observe(method, status, elapsed));
}

#[cfg(test)]
mod tests {
    use actix_web::{test as actix_test, web, App, HttpResponse};

    use super::*;

    fn count(route: &str, method: &str, status: &str) -> u64 {
        metrics::http()
            .requests_total
            .with_label_values(&[route, method, status])
            .get()
    }

    fn duration_count(route: &str, method: &str, status: &str) -> u64 {
        metrics::http()
            .request_duration_seconds
            .with_label_values(&[route, method, status])
            .get_sample_count()
    }

    async fn ok() -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    /// 200 only on the cheap path: the route's metrics travel with the request.
    async fn ok_with_route_metrics(req: actix_web::HttpRequest) -> HttpResponse {
        match req.app_data::<RouteMetrics>() {
            Some(_) => HttpResponse::Ok().finish(),
            None => HttpResponse::InternalServerError().finish(),
        }
    }

    /// Every route value in the HTTP series; metrics are process-wide, so tests use
    /// route patterns of their own.
    fn route_labels() -> Vec<String> {
        metrics::registry()
            .gather()
            .iter()
            .filter(|f| f.name() == "flotilla_http_requests_total")
            .flat_map(|f| f.get_metric().to_vec())
            .flat_map(|m| {
                m.get_label()
                    .iter()
                    .filter(|l| l.name() == "route")
                    .map(|l| l.value().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[actix_web::test]
    async fn requests_are_counted_by_route_pattern_method_and_status() {
        let route = "/route-metrics-test/{id}/beat";
        let app = actix_test::init_service(
            App::new()
                .wrap_fn(super::super::access_log)
                .service(super::super::resource(route).route(web::post().to(ok_with_route_metrics)))
                .default_service(web::to(super::super::not_found)),
        )
        .await;
        for id in ["a-1", "b-2", "c-3"] {
            let req = actix_test::TestRequest::post()
                .uri(&format!("/route-metrics-test/{id}/beat"))
                .to_request();
            assert_eq!(actix_test::call_service(&app, req).await.status(), 200);
        }
        let req = actix_test::TestRequest::get()
            .uri("/route-metrics-test/a-1/beat")
            .to_request();
        assert_eq!(actix_test::call_service(&app, req).await.status(), 405);
        let req = actix_test::TestRequest::default()
            .method(Method::from_bytes(b"BREW").unwrap())
            .uri("/route-metrics-test/a-1/beat")
            .to_request();
        assert_eq!(actix_test::call_service(&app, req).await.status(), 405);

        assert_eq!(count(route, "POST", "200"), 3);
        assert_eq!(duration_count(route, "POST", "200"), 3);
        assert_eq!(count(route, "GET", "405"), 1);
        assert_eq!(count(route, "other", "405"), 1);
        let routes = route_labels();
        assert!(routes.iter().any(|r| r == route), "{routes:?}");
        assert!(
            !routes.iter().any(|r| r.contains("a-1")),
            "a raw path leaked into the route label: {routes:?}"
        );
    }

    #[actix_web::test]
    async fn unrouted_paths_share_one_unmatched_label() {
        let app = actix_test::init_service(
            App::new()
                .wrap_fn(super::super::access_log)
                .service(super::super::resource("/route-metrics-known").route(web::get().to(ok)))
                .default_service(web::to(super::super::not_found)),
        )
        .await;
        // Other tests may count 404s concurrently; this one only adds.
        let before = count(UNMATCHED, "DELETE", "404");
        for path in ["/route-metrics-nope/1", "/route-metrics-nope/2"] {
            let req = actix_test::TestRequest::delete().uri(path).to_request();
            assert_eq!(actix_test::call_service(&app, req).await.status(), 404);
        }
        assert!(count(UNMATCHED, "DELETE", "404") >= before + 2);
        let routes = route_labels();
        assert!(
            !routes.iter().any(|r| r.contains("route-metrics-nope")),
            "{routes:?}"
        );
    }

    #[actix_web::test]
    async fn routes_registered_without_resource_use_the_matched_pattern() {
        let app = actix_test::init_service(
            App::new()
                .wrap_fn(super::super::access_log)
                .route("/route-metrics-plain/{id}", web::get().to(ok)),
        )
        .await;
        let req = actix_test::TestRequest::get()
            .uri("/route-metrics-plain/x-9")
            .to_request();
        assert_eq!(actix_test::call_service(&app, req).await.status(), 200);
        assert_eq!(count("/route-metrics-plain/{id}", "GET", "200"), 1);
    }

    #[test]
    fn the_slot_cache_is_bounded() {
        let route = RouteMetrics::new("/route-metrics-bounded");
        for status in 200..300 {
            let status = StatusCode::from_u16(status).unwrap();
            route.observe(0, status, Duration::from_micros(5));
            route.observe(0, status, Duration::from_micros(5));
        }
        assert_eq!(route.slots.borrow().len(), MAX_SLOTS);
        assert_eq!(count("/route-metrics-bounded", "GET", "299"), 2);
        assert_eq!(count("/route-metrics-bounded", "GET", "201"), 2);
    }
}
