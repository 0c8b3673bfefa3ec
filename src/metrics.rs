//! The process-wide Prometheus registry. Every metric is registered here once.
use std::sync::LazyLock;

use prometheus::{Encoder, Registry, TextEncoder};

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    Registry::new_custom(Some("flotilla".into()), None).expect("valid registry prefix")
});

/// The registry all flotilla metrics live in.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Renders every registered metric in the Prometheus text exposition format.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut buf)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(buf).expect("prometheus text format is UTF-8")
}

/// Metrics of the orchestrator worker (all workers of the process share them).
pub struct WorkerMetrics {
    pub txn_size_bytes: prometheus::Histogram,
    pub txn_duration_seconds: prometheus::Histogram,
    pub tick_duration_seconds: prometheus::Histogram,
    pub txn_conflicts_total: prometheus::IntCounter,
    pub committed_keys_total: prometheus::IntCounter,
    pub resyncs_total: prometheus::IntCounterVec,
    pub rewatches_total: prometheus::IntCounterVec,
    pub watch_lag_revisions: prometheus::IntGauge,
    pub queued_events: prometheus::IntGauge,
    pub etcd_retries_total: prometheus::IntCounter,
    pub skipped_updates_total: prometheus::IntCounter,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
    register(
        prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(name, help).buckets(buckets),
        )
        .expect("valid histogram"),
    )
}

fn counter(name: &str, help: &str) -> prometheus::IntCounter {
    register(prometheus::IntCounter::new(name, help).expect("valid counter"))
}

static WORKER: LazyLock<WorkerMetrics> = LazyLock::new(|| WorkerMetrics {
    txn_size_bytes: histogram(
        "etcd_worker_txn_size_bytes",
        "Estimated size of each etcd txn the worker sends.",
        prometheus::exponential_buckets(64.0, 4.0, 10).expect("valid buckets"),
    ),
    txn_duration_seconds: histogram(
        "etcd_worker_txn_duration_seconds",
        "Time from sending an etcd txn to its answer, failures included.",
        prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
    ),
    tick_duration_seconds: histogram(
        "etcd_worker_tick_duration_seconds",
        "Time one reactor tick takes.",
        prometheus::exponential_buckets(0.00005, 2.0, 18).expect("valid buckets"),
    ),
    txn_conflicts_total: counter(
        "etcd_worker_txn_conflicts_total",
        "Txns whose compares failed; their patches were dropped and re-derived.",
    ),
    committed_keys_total: counter(
        "etcd_worker_committed_keys_total",
        "Keys written by committed worker txns.",
    ),
    resyncs_total: register(
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "etcd_worker_resyncs_total",
                "Full re-reads of the watched prefix, by reason.",
            ),
            &["reason"],
        )
        .expect("valid counter vec"),
    ),
    rewatches_total: register(
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "etcd_worker_rewatches_total",
                "Watches opened again from the next revision (nothing re-read), by reason.",
            ),
            &["reason"],
        )
        .expect("valid counter vec"),
    ),
    watch_lag_revisions: register(
        prometheus::IntGauge::new(
            "etcd_worker_watch_lag_revisions",
            "etcd's current revision minus the last revision the worker applied.",
        )
        .expect("valid gauge"),
    ),
    queued_events: register(
        prometheus::IntGauge::new(
            "etcd_worker_queued_events",
            "Watch events waiting for the commit in flight to end (bounded: the worker restarts \
             from a fresh read beyond 1,048,576).",
        )
        .expect("valid gauge"),
    ),
    etcd_retries_total: counter(
        "etcd_worker_etcd_retries_total",
        "Retryable etcd errors the worker backed off from.",
    ),
    skipped_updates_total: counter(
        "etcd_worker_skipped_updates_total",
        "Key updates the reactor state rejected (malformed values); logged and skipped.",
    ),
});

/// The worker metrics, registered on first use.
pub fn worker() -> &'static WorkerMetrics {
    &WORKER
}

/// Metrics of the executor registry.
pub struct RegistryMetrics {
    pub executors: prometheus::IntGaugeVec,
    pub registrations_total: prometheus::IntCounterVec,
    pub heartbeats_total: prometheus::IntCounterVec,
    pub expiries_total: prometheus::IntCounterVec,
    pub mass_silence: prometheus::IntGauge,
    pub watch_subscribers: prometheus::IntGauge,
    pub watch_disconnects_total: prometheus::IntCounter,
    pub pending_store_deletes: prometheus::IntGauge,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::IntCounterVec {
    register(
        prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)
            .expect("valid counter vec"),
    )
}

fn gauge(name: &str, help: &str) -> prometheus::IntGauge {
    register(prometheus::IntGauge::new(name, help).expect("valid gauge"))
}

static REGISTRY_METRICS: LazyLock<RegistryMetrics> = LazyLock::new(|| {
    RegistryMetrics {
    executors: register(
        prometheus::IntGaugeVec::new(
            prometheus::Opts::new("executors", "Executors in the registry, by status."),
            &["status"],
        )
        .expect("valid gauge vec"),
    ),
    registrations_total: counter_vec(
        "executor_registrations_total",
        "Executor registrations, by outcome (ok or an error code).",
        &["outcome"],
    ),
    heartbeats_total: counter_vec(
        "executor_heartbeats_total",
        "Executor heartbeats, by outcome (ok or an error code).",
        &["outcome"],
    ),
    expiries_total: counter_vec(
        "executor_removals_total",
        "Executors removed from the registry, by reason (expired or deregistered).",
        &["reason"],
    ),
    mass_silence: gauge(
        "executor_mass_silence",
        "1 while more than mass_expiry_fraction of the executors are overdue and expiry is throttled.",
    ),
    watch_subscribers: gauge(
        "executor_watch_subscribers",
        "Subscribers of the executor watch feed.",
    ),
    watch_disconnects_total: counter(
        "executor_watch_disconnects_total",
        "Watch subscribers cut off because they fell behind.",
    ),
    pending_store_deletes: gauge(
        "executor_pending_store_deletes",
        "Removed executors whose SQL row is still to be deleted (retried in the background).",
    ),
}
});

/// The registry metrics, registered on first use.
pub fn registry_metrics() -> &'static RegistryMetrics {
    &REGISTRY_METRICS
}

/// Metrics of the SQL metadata store (every `Store` of the process shares them).
pub struct StoreMetrics {
    pub operation_duration_seconds: prometheus::HistogramVec,
    pub errors_total: prometheus::IntCounterVec,
    pub skipped_rows_total: prometheus::IntCounter,
}

static STORE: LazyLock<StoreMetrics> = LazyLock::new(|| StoreMetrics {
    operation_duration_seconds: register(
        prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "store_operation_duration_seconds",
                "Time one SQL store operation takes, failures included, by operation.",
            )
            .buckets(prometheus::exponential_buckets(0.0002, 2.0, 18).expect("valid buckets")),
            &["operation"],
        )
        .expect("valid histogram vec"),
    ),
    errors_total: register(
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "store_errors_total",
                "SQL store operations that failed (database unreachable, timed out or refused \
                 the statement), by operation. A duplicate executor id is not counted.",
            ),
            &["operation"],
        )
        .expect("valid counter vec"),
    ),
    skipped_rows_total: counter(
        "store_skipped_rows_total",
        "Stored executor rows that could not be decoded on load; logged and skipped.",
    ),
});

/// The store metrics, registered on first use.
pub fn store() -> &'static StoreMetrics {
    &STORE
}

/// Metrics of the leader election and request forwarding.
pub struct ElectionMetrics {
    pub leader_changes_total: prometheus::IntCounter,
    pub campaign_seconds: prometheus::Histogram,
    pub forwarded_requests_total: prometheus::IntCounterVec,
}

static ELECTION: LazyLock<ElectionMetrics> = LazyLock::new(|| {
    ElectionMetrics {
    leader_changes_total: counter(
        "leader_changes_total",
        "Times this server became the leader.",
    ),
    campaign_seconds: register(
        prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "election_campaign_duration_seconds",
                "Time to join the election: lease grant, election key put, keep-alive start.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid histogram"),
    ),
    forwarded_requests_total: counter_vec(
        "forwarded_requests_total",
        "Requests a follower forwarded to the leader, by outcome (ok, no_leader, leader_unreachable).",
        &["outcome"],
    ),
}
});

/// The election metrics, registered on first use.
pub fn election() -> &'static ElectionMetrics {
    &ELECTION
}

/// Metrics of the HTTP API, by route pattern (never the raw path), method and status.
/// Handles are resolved once per (route, method, status) and cached by
/// `http::route_metrics`; see there before adding a label.
pub struct HttpMetrics {
    pub requests_total: prometheus::IntCounterVec,
    pub request_duration_seconds: prometheus::HistogramVec,
}

/// The labels of [`HttpMetrics`], in order.
pub const HTTP_LABELS: [&str; 3] = ["route", "method", "status"];

static HTTP: LazyLock<HttpMetrics> = LazyLock::new(|| HttpMetrics {
    requests_total: counter_vec(
        "http_requests_total",
        "HTTP requests answered, by route pattern (`unmatched` when no route matched), \
         method and status.",
        &HTTP_LABELS,
    ),
    request_duration_seconds: register(
        prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "http_request_duration_seconds",
                "Time from receiving an HTTP request to its response head (a stream such as \
                 the executor watch is not timed to its end), by route pattern, method and status.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ]),
            &HTTP_LABELS,
        )
        .expect("valid histogram vec"),
    ),
});

/// The HTTP metrics, registered on first use.
pub fn http() -> &'static HttpMetrics {
    &HTTP
}

static IS_LEADER: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "is_leader",
        "1 while this server is the elected leader (runs the executor registry and the \
         changefeed owner), 0 otherwise.",
    )
});

/// `flotilla_is_leader`.
pub fn is_leader() -> &'static prometheus::IntGauge {
    &IS_LEADER
}

/// Metrics of etcd's upkeep: the leader's compactions and etcd's alarms.
pub struct EtcdMetrics {
    pub compactions_total: prometheus::IntCounterVec,
    pub compacted_revision: prometheus::IntGauge,
    pub alarm: prometheus::IntGaugeVec,
}

static ETCD: LazyLock<EtcdMetrics> = LazyLock::new(|| EtcdMetrics {
    compactions_total: register(
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "etcd_compactions_total",
                "Compactions of etcd's history run by the leader, by outcome \
                 (compacted, already_compacted, failed).",
            ),
            &["outcome"],
        )
        .expect("valid counter vec"),
    ),
    compacted_revision: register(
        prometheus::IntGauge::new(
            "etcd_compacted_revision",
            "The revision this server last compacted etcd's history to (0: not yet).",
        )
        .expect("valid gauge"),
    ),
    alarm: register(
        prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "etcd_alarm",
                "1 while etcd has raised this alarm (nospace: its quota is full and it \
                 refuses writes; corrupt), else 0.",
            ),
            &["alarm"],
        )
        .expect("valid gauge vec"),
    ),
});

/// The etcd upkeep metrics, registered on first use.
pub fn etcd() -> &'static EtcdMetrics {
    &ETCD
}

/// The changefeed owner's scheduling.
pub struct OwnerMetrics {
    pub tick_visited_changefeeds: prometheus::Histogram,
    pub full_passes_total: prometheus::IntCounter,
    pub checkpoint_writes_total: prometheus::IntCounter,
    pub checkpoint_persist_lag_seconds: prometheus::Gauge,
    pub releasing_tasks: prometheus::IntGauge,
    pub released_total: prometheus::IntCounterVec,
}

static OWNER: LazyLock<OwnerMetrics> = LazyLock::new(|| OwnerMetrics {
    tick_visited_changefeeds: histogram(
        "owner_tick_visited_changefeeds",
        "Changefeeds one owner tick visited (changed ones and a slice of the sweep).",
        prometheus::exponential_buckets(1.0, 4.0, 10).expect("valid buckets"),
    ),
    full_passes_total: counter(
        "owner_full_passes_total",
        "Owner sweeps completed (every changefeed visited since the last one).",
    ),
    checkpoint_writes_total: counter(
        "owner_checkpoint_writes_total",
        "Checkpoint-only status writes the owner queued (within its budget).",
    ),
    checkpoint_persist_lag_seconds: register(
        prometheus::Gauge::new(
            "owner_checkpoint_persist_lag_seconds",
            "Age of the oldest persisted checkpoint still waiting for the write budget, \
             as of the last tick (0: none waits).",
        )
        .expect("valid gauge"),
    ),
    releasing_tasks: gauge(
        "owner_releasing_tasks",
        "Tasks taken away from their executor and not released yet (no new assignment of \
         their changefeed until the executor acknowledges the stop or its lease lapses), as \
         of the last tick.",
    ),
    released_total: counter_vec(
        "owner_released_total",
        "Tasks released, by how: `acknowledged` (the executor confirmed the stop) or \
         `lapsed` (its lease had certainly ended).",
        &["how"],
    ),
});

pub fn owner() -> &'static OwnerMetrics {
    &OWNER
}

/// Registers every metric family now and creates the series of every label value known
/// in advance (outcome `ok`, each removal and resync reason, each store operation), so
/// a scrape shows them at 0 before the first event: `rate()` and alerts see a series
/// from the start, and dashboards never reference a name a scrape lacks.
pub fn register_all() {
    let worker = worker();
    for reason in crate::actors::etcd_watcher::ResyncReason::ALL {
        worker.resyncs_total.with_label_values(&[reason.as_str()]);
    }
    for reason in crate::actors::etcd_watcher::RewatchReason::ALL {
        worker.rewatches_total.with_label_values(&[reason.as_str()]);
    }
    let registry = registry_metrics();
    for status in ["initing", "running", "tombstone"] {
        registry.executors.with_label_values(&[status]);
    }
    registry.registrations_total.with_label_values(&["ok"]);
    registry.heartbeats_total.with_label_values(&["ok"]);
    for reason in ["expired", "deregistered"] {
        registry.expiries_total.with_label_values(&[reason]);
    }
    let store = store();
    for operation in [
        "connect",
        "insert_executor",
        "delete_executor",
        "load_executors",
        "ping",
    ] {
        store
            .operation_duration_seconds
            .with_label_values(&[operation]);
        store.errors_total.with_label_values(&[operation]);
    }
    http();
    for how in ["acknowledged", "lapsed"] {
        owner().released_total.with_label_values(&[how]);
    }
    is_leader();
    let election = election();
    for outcome in ["ok", "no_leader"] {
        election
            .forwarded_requests_total
            .with_label_values(&[outcome]);
    }
    let etcd = etcd();
    for outcome in crate::actors::compactor::Outcome::LABELS {
        etcd.compactions_total.with_label_values(&[outcome]);
    }
    for alarm in ["nospace", "corrupt"] {
        etcd.alarm.with_label_values(&[alarm]);
    }
}
