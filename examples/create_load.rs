//! The create rate of `scripts/bench-scale`, and its raw-etcd baseline: `--count`
//! changefeeds `<id-prefix>0000000 ..` created by `--concurrency` tasks, each
//! waiting for its answer before the next, either
//! - through the API (`--server URL --admin-token T`): `POST /api/v1/changefeeds`
//!   with flotilla's client library, or
//! - straight to etcd (`--etcd URL --prefix P`): each create as a txn of its
//!   own (`flotilla::owner::feeds::create_txn`: the same keys, values and
//!   compares the route commits; the route groups the creates that arrive
//!   together into one txn), on one etcd client, without the server.
//!
//! Prints one line: `created=N seconds=S rate=R`.
//!
//! ```text
//! cargo run --release --example create_load -- --etcd http://127.0.0.1:2379 \
//!     --prefix /bench-raw --count 100000 --concurrency 16
//! cargo run --release --example create_load -- --server http://127.0.0.1:8080 \
//!     --admin-token T --count 100000 --concurrency 16
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use flotilla::client::{Client, CreateChangefeed};
use flotilla::owner::feeds::{create_txn, prepare_create};
use flotilla::owner::model::Keys;

#[derive(Default)]
struct Args {
    server: Option<String>,
    admin_token: Option<String>,
    etcd: Option<String>,
    prefix: String,
    namespace: String,
    id_prefix: String,
    count: usize,
    concurrency: usize,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        prefix: "/flotilla/default".into(),
        namespace: "default".into(),
        id_prefix: "cf".into(),
        count: 10_000,
        concurrency: 16,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--server" => args.server = Some(value),
            "--admin-token" => args.admin_token = Some(value),
            "--etcd" => args.etcd = Some(value),
            "--prefix" => args.prefix = value,
            "--namespace" => args.namespace = value,
            "--id-prefix" => args.id_prefix = value,
            "--count" => args.count = number(&value)?,
            "--concurrency" => args.concurrency = number(&value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be > 0".into());
    }
    if args.server.is_some() == args.etcd.is_some() {
        return Err("give exactly one of --server and --etcd".into());
    }
    Ok(args)
}

/// Where the creates go.
#[derive(Clone)]
enum Target {
    Api(Client),
    Etcd(etcd_client::KvClient, Arc<Keys>),
}

impl Target {
    /// Creates one; `Ok(false)` if it existed.
    async fn create(&mut self, namespace: &str, id: String) -> Result<bool, String> {
        let sink_uri = format!("blackhole://{id}");
        match self {
            Target::Api(client) => {
                let request = CreateChangefeed {
                    id,
                    sink_uri,
                    ..CreateChangefeed::default()
                };
                match client.create_changefeed(namespace, &request).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.code() == Some("changefeed_exists") => Ok(false),
                    Err(e) => Err(e.to_string()),
                }
            }
            Target::Etcd(kv, keys) => {
                let request: flotilla::owner::feeds::CreateChangefeed =
                    serde_json::from_value(serde_json::json!({ "id": id, "sink_uri": sink_uri }))
                        .map_err(|e| e.to_string())?;
                let (cf, info, status) =
                    prepare_create(namespace, request).map_err(|e| e.to_string())?;
                let response = kv
                    .txn(create_txn(keys, &cf, &info, &status))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(response.succeeded())
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let target = match (&args.server, &args.etcd) {
        (Some(server), _) => {
            let mut client = Client::new(server)?;
            if let Some(token) = &args.admin_token {
                client = client.with_admin_token(token.clone());
            }
            Target::Api(client)
        }
        (None, Some(etcd)) => {
            let client = etcd_client::Client::connect([etcd.as_str()], None).await?;
            Target::Etcd(client.kv_client(), Arc::new(Keys::new(args.prefix.clone())))
        }
        (None, None) => unreachable!("checked by args()"),
    };
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (mut target, next) = (target.clone(), next.clone());
            let (namespace, id_prefix, count) =
                (args.namespace.clone(), args.id_prefix.clone(), args.count);
            tokio::spawn(async move {
                let mut created = 0usize;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, String>(created);
                    }
                    let id = format!("{id_prefix}{i:06}");
                    created += usize::from(target.create(&namespace, id).await?);
                }
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        created += task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "created={created} seconds={seconds:.2} rate={:.0}",
        created as f64 / seconds
    );
    Ok(())
}
