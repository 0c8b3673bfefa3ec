//! The worker's first read of its prefix (the cold start of the owner): the whole
//! prefix in one range (the default) against pages of 1,000 keys, on one real etcd,
//! alternating in the same run.
//!
//! etcd 3.4 walks every remaining key of a range for each limited page it answers
//! (etcd-io/etcd#11057), so pages make the read quadratic in the prefix; one range is
//! linear. Method: a plain `main` (an actix System, one etcd); N keys of ~300 B (the
//! size of a changefeed's info, status and task: 100,000 changefeeds are about
//! 300,000 keys) are written once with raw txns, then each round times, per mode,
//! `actors::start` until the reactor's first tick (list, resync, tick), and counts the
//! range requests etcd served meanwhile (`grpc_server_handled_total` for `Range` on
//! etcd's `/metrics`).
//!
//! `cargo bench --bench snapshot_read` runs 300,000 keys, 3 rounds;
//! `FLOTILLA_BENCH_KEYS` and `FLOTILLA_BENCH_ROUNDS` override. Under `cargo test`
//! (no `--bench`) or with `--test` it runs one 3,000-key round as a smoke test.

// The integration tests' etcd launcher, shared as it is.
#[allow(dead_code)]
#[path = "../tests/it/harness/etcd.rs"]
mod etcd;
#[allow(dead_code)]
#[path = "../tests/it/harness/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../tests/it/harness/ports.rs"]
mod ports;

use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use flotilla::actors::{self, WorkerConfig};
use flotilla::state::{self as state, reactor, PatchGroup, Reactor, ReactorState};

const VALUE_BYTES: usize = 300;
const KEYS_PER_TXN: usize = 128;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Counts the keys it was given; finishes at its first tick.
#[derive(Default)]
struct Count(usize);

impl ReactorState for Count {
    fn update(&mut self, _: &str, value: Option<&[u8]>, _: bool) -> Result<(), state::Error> {
        if value.is_some() {
            self.0 += 1;
        }
        Ok(())
    }

    fn get_patches(&mut self) -> Vec<PatchGroup> {
        Vec::new()
    }
}

struct FirstTick(std::sync::mpsc::Sender<usize>);

impl Reactor for FirstTick {
    type State = Count;

    fn tick(&mut self, state: &mut Count) -> Result<(), reactor::Error> {
        let _ = self.0.send(state.0);
        Err(reactor::Error::Finished)
    }
}

async fn fill(client: &Client, prefix: &str, n: usize) {
    let value = vec![b'v'; VALUE_BYTES];
    let mut kv = client.kv_client();
    for start in (0..n).step_by(KEYS_PER_TXN) {
        let ops: Vec<TxnOp> = (start..(start + KEYS_PER_TXN).min(n))
            .map(|i| TxnOp::put(format!("{prefix}k/{i:08}"), value.clone(), None))
            .collect();
        kv.txn(Txn::new().and_then(ops)).await.expect("fill txn");
    }
}

/// Range requests etcd (its client port) has answered so far.
fn ranges_served(port: u16) -> u64 {
    let body = http::try_request(port, "GET", "/metrics", None, None, Duration::from_secs(5))
        .map(|r| r.body)
        .unwrap_or_default();
    body.lines()
        .filter(|l| {
            l.starts_with("grpc_server_handled_total")
                && l.contains("grpc_method=\"Range\"")
                && l.contains("grpc_code=\"OK\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn first_tick(client: &Client, prefix: &str, page_keys: i64) -> (Duration, usize) {
    let (tx, rx) = std::sync::mpsc::channel();
    let config = WorkerConfig {
        list_page_keys: page_keys,
        request_timeout: Duration::from_secs(60),
        ..WorkerConfig::new(prefix)
    };
    let started = Instant::now();
    let handle = actors::start(client.clone(), FirstTick(tx), Count::default(), config);
    handle.wait().await.expect("the worker ran");
    (started.elapsed(), rx.recv().expect("ticked"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let n = env_usize("FLOTILLA_BENCH_KEYS", if full { 300_000 } else { 3_000 });
    let rounds = env_usize("FLOTILLA_BENCH_ROUNDS", if full { 3 } else { 1 });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .try_init();
    println!("snapshot_read: {n} keys of {VALUE_BYTES} B, {rounds} rounds");
    let etcd = etcd::EtcdCluster::single();
    let port: u16 = etcd.endpoints()[0]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let prefix = "/bench/snapshot/";
    let modes: [(&str, i64); 2] = [("one range", 0), ("pages of 1000", 1000)];
    let results = actix_rt::System::new().block_on(async {
        let client = etcd.client().await;
        let filling = Instant::now();
        fill(&client, prefix, n).await;
        println!("filled in {:.1} s", filling.elapsed().as_secs_f64());
        let mut results: Vec<(&str, Duration, u64)> = Vec::new();
        for _ in 0..rounds {
            for (name, page_keys) in modes {
                let before = ranges_served(port);
                let (took, keys) = first_tick(&client, prefix, page_keys).await;
                let requests = ranges_served(port).saturating_sub(before);
                assert_eq!(keys, n, "{name}: the first tick saw every key");
                println!(
                    "{name:>14}: {:>8.1} ms to the first tick, {requests} range requests",
                    took.as_secs_f64() * 1000.0
                );
                results.push((name, took, requests));
            }
        }
        results
    });
    drop(etcd);
    let median = |name: &str| {
        let mut times: Vec<Duration> = results
            .iter()
            .filter(|(m, _, _)| *m == name)
            .map(|(_, t, _)| *t)
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    let (one, pages) = (median("one range"), median("pages of 1000"));
    println!(
        "median: one range {:.1} ms, pages {:.1} ms; pages / one range = {:.2}",
        one.as_secs_f64() * 1000.0,
        pages.as_secs_f64() * 1000.0,
        pages.as_secs_f64() / one.as_secs_f64()
    );
}
