//! The executor registry: heartbeats/s and the cost of an expiry pass that
//! finds nothing, with 1,000, 10,000 and 100,000 registered executors. Both
//! should be flat in the number of executors.
//!
//! `cargo bench --bench registry`
//!
//! Executors are registered through the actor on an in-memory SQLite store
//! (the registration path, SQL insert included, is real). `heartbeats` calls
//! `ExecutorTable::heartbeat` as the HTTP handler does (token hash, lock,
//! deadline index update), 1,000 per sample. (The mailbox path the first runs
//! compared it with is gone: no production caller sent heartbeats to the actor.)
//! `stats_roundtrip` (an O(1) message) is the baseline: an expiry pass that
//! finds nothing should cost about one message round trip.

mod support;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flotilla::actors::executor_registry::{
    GetRegistryStats, Register, Registration, RegistryHandle, RunExpiryPass, TokenHash,
};

const BATCH: usize = 1_000;

async fn setup(n: usize) -> (RegistryHandle, Vec<Registration>) {
    let registry = support::quiet_registry("sqlite::memory:").await;
    let addr = &registry.addr;
    let mut registrations = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let sends: Vec<_> = chunk
            .iter()
            .map(|i| {
                addr.send(Register {
                    name: format!("bench{i}"),
                    address: format!("10.0.{}.{}:9000", i / 250, i % 250),
                    labels: [("zone".to_string(), format!("z{}", i % 3))].into(),
                })
            })
            .collect();
        for r in futures::future::join_all(sends).await {
            registrations.push(r.unwrap().expect("registered"));
        }
    }
    (registry, registrations)
}

fn registry(c: &mut Criterion) {
    let system = actix_rt::System::new();
    let mut group = c.benchmark_group("registry");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    // `cargo test --all-targets` runs this binary without `--bench`, as a
    // smoke test: keep that quick.
    let sizes: &[usize] = if std::env::args().any(|a| a == "--bench") {
        &[1_000, 10_000, 100_000]
    } else {
        &[1_000]
    };
    for &n in sizes {
        let (registry, registrations) = system.block_on(setup(n));
        let addr = &registry.addr;
        let mut next = 0usize;
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_with_input(BenchmarkId::new("heartbeats", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..BATCH {
                        let r = &registrations[next % registrations.len()];
                        next += 1;
                        registry
                            .table
                            .heartbeat(&r.executor.id, &TokenHash::of(&r.token), None)
                            .expect("accepted");
                    }
                }
                start.elapsed()
            })
        });
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("expiry_pass_nothing_expired", n),
            &n,
            |b, _| {
                b.iter_custom(|iters| {
                    system.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            assert_eq!(addr.send(RunExpiryPass).await.unwrap(), 0);
                        }
                        start.elapsed()
                    })
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("stats_roundtrip", n), &n, |b, _| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        addr.send(GetRegistryStats).await.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, registry);
criterion_main!(benches);
