//! What the request middleware (route metrics + access-log check) costs per
//! request: `GET /healthz` through the real routes (`flotilla::http::configure`),
//! with and without `flotilla::http::access_log`, called in process (no socket).
//! The difference of the two is the middleware's cost; `unmatched` is a 404, the
//! path where the route is found by re-matching the path.
//!
//! `cargo bench --bench http_metrics` (~15 s, one core)

use std::time::Duration;

use actix_web::dev::Service;
use actix_web::{test, web, App};
use criterion::{criterion_group, criterion_main, Criterion};
use flotilla::http::{self, AppState, EtcdProbe, ServerInfo};
use futures::executor::block_on;

/// Handlers that do not touch etcd; the client connects lazily and never does here.
fn state(runtime: &tokio::runtime::Runtime) -> web::Data<AppState> {
    let client = runtime
        .block_on(etcd_client::Client::connect(["http://127.0.0.1:1"], None))
        .expect("connecting is lazy");
    let info = ServerInfo {
        id: "bench".into(),
        version: "0.0.0",
        cluster_id: "bench".into(),
        advertise_addr: "127.0.0.1:0".into(),
        etcd_endpoints: vec![],
    };
    web::Data::new(
        AppState::new(info, EtcdProbe::new(client, Duration::from_secs(1)))
            .with_max_body_bytes(1024)
            .with_max_heartbeat_bytes(1024),
    )
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let state = state(&runtime);
    let bare = block_on(test::init_service(
        App::new().configure(http::configure(state.clone())),
    ));
    let wrapped = block_on(test::init_service(
        App::new()
            .wrap_fn(http::access_log)
            .configure(http::configure(state)),
    ));

    let mut group = c.benchmark_group("http_middleware");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    group.bench_function("healthz/bare", |b| {
        b.iter(|| {
            let req = test::TestRequest::get().uri("/healthz").to_request();
            block_on(bare.call(req)).unwrap()
        })
    });
    group.bench_function("healthz/with_metrics", |b| {
        b.iter(|| {
            let req = test::TestRequest::get().uri("/healthz").to_request();
            block_on(wrapped.call(req)).unwrap()
        })
    });
    group.bench_function("unmatched/bare", |b| {
        b.iter(|| {
            let req = test::TestRequest::get().uri("/no/such/7").to_request();
            block_on(bare.call(req)).unwrap()
        })
    });
    group.bench_function("unmatched/with_metrics", |b| {
        b.iter(|| {
            let req = test::TestRequest::get().uri("/no/such/7").to_request();
            block_on(wrapped.call(req)).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
