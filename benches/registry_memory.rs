//! Memory per registered executor: live heap bytes held by the registry after
//! registering 100,000 executors, divided by 100,000. Target: under 1 KiB.
//!
//! `cargo bench --bench registry_memory`
//!
//! A counting global allocator tracks live bytes. The store is a SQLite file
//! (its page cache is bounded), so what grows with the executor count is the
//! registry's own state: the map, the deadline index, names, addresses,
//! labels and token hashes. Each executor has 2 labels, a 16-character name
//! and an 17-character address.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use flotilla::actors::executor_registry::{ExecutorRegistry, GetRegistryStats, Register};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const N: usize = 100_000;

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`:
    // measure only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        println!("registry_memory: run with `cargo bench --bench registry_memory`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/meta.db?mode=rwc", dir.path().display());
    actix_rt::System::new().block_on(async move {
        let addr = support::quiet_registry(&url).await.addr;
        // Warm up pools and caches, then measure from here.
        register(&addr, 0, 2_000).await;
        let before = LIVE.load(Ordering::Relaxed);
        register(&addr, 2_000, 2_000 + N).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = LIVE.load(Ordering::Relaxed);
        let per = (after - before) as f64 / N as f64;
        println!(
            "registered executors: {}",
            addr.send(GetRegistryStats).await.unwrap().initing
        );
        println!(
            "live heap growth for {N} executors: {} bytes",
            after - before
        );
        println!("bytes per registered executor: {per:.0} (target < 1024)");
    });
}

async fn register(addr: &Addr<ExecutorRegistry>, from: usize, to: usize) {
    for start in (from..to).step_by(1_000) {
        let sends: Vec<_> = (start..(start + 1_000).min(to))
            .map(|i| {
                addr.send(Register {
                    name: format!("executor-{i:07}"),
                    address: format!("10.1.{}.{}:9000", i / 250 % 250, i % 250),
                    labels: [
                        ("zone".to_string(), format!("z{}", i % 3)),
                        ("disk".to_string(), "ssd".to_string()),
                    ]
                    .into(),
                })
            })
            .collect();
        for r in futures::future::join_all(sends).await {
            // The registration (token included) is dropped: only the
            // registry keeps state.
            r.unwrap().expect("registered");
        }
    }
}
