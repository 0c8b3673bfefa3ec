//! The README's five-minute walk-through, run as written: the shell block
//! after the `<!-- walkthrough -->` marker runs in bash (`-euo pipefail`, so
//! any failing command fails the test) with the built `flotilla` first on
//! `PATH`, and what its commands print must be what the README's comments
//! say. Only the ports differ (set through the environment, so other tests
//! and servers on this machine do not collide with it).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::ports::free_port_array;
use crate::harness::server::BIN;

const MARKER: &str = "<!-- walkthrough:";

/// The first fenced `sh` block after the marker.
fn walkthrough(readme: &str) -> String {
    let start = readme
        .find(MARKER)
        .expect("README.md has a walk-through marker");
    let rest = &readme[start..];
    let open = rest
        .find("```sh\n")
        .expect("a ```sh block after the marker")
        + "```sh\n".len();
    let close = rest[open..].find("```").expect("the block ends");
    rest[open..open + close].to_owned()
}

/// Kills every process the walk-through started (its process group) on drop:
/// the server first gets SIGTERM, so it stops its embedded etcd.
struct ProcessGroup(i32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process group this test created.
        unsafe { libc::kill(-self.0, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(500));
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// The rows (split on whitespace) of each table in `out` whose header's
/// first columns are `columns`; a table ends at the next header or blank line.
fn tables<'a>(out: &'a str, columns: &[&str]) -> Vec<Vec<Vec<&'a str>>> {
    let mut found = Vec::new();
    let mut current: Option<Vec<Vec<&str>>> = None;
    for line in out.lines() {
        if line.starts_with("ID ") || line.trim().is_empty() {
            found.extend(current.take());
            if line
                .split_whitespace()
                .take(columns.len())
                .eq(columns.iter().copied())
            {
                current = Some(Vec::new());
            }
        } else if let Some(rows) = &mut current {
            rows.push(line.split_whitespace().collect());
        }
    }
    found.extend(current);
    found
}

#[test]
fn readme_walkthrough_works_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let script = walkthrough(&readme);
    let dir = tempfile::Builder::new()
        .prefix("flotilla-walkthrough-")
        .tempdir()
        .unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let [port, etcd_client, etcd_peer] = free_port_array::<3>();
    let started = Instant::now();
    let mut bash = Command::new("bash");
    bash.args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("TMPDIR", dir.path())
        .env("FLOTILLA_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLOTILLA_SERVER", format!("http://127.0.0.1:{port}"))
        .env(
            "FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT",
            etcd_client.to_string(),
        )
        .env("FLOTILLA_ETCD_EMBEDDED_PEER_PORT", etcd_peer.to_string())
        .env_remove("FLOTILLA_ADMIN_TOKEN")
        .env_remove("FLOTILLA_NAMESPACE")
        .stdin(Stdio::null())
        // Files, not pipes: the server and agents it leaves running hold them
        // open, and a pipe would not end until they do.
        .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .process_group(0);
    let mut child = bash.spawn().expect("run bash");
    let _group = ProcessGroup(child.id() as i32);
    let deadline = started + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(dir.path().join("stdout")).unwrap();
    let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    let logs: String = ["server.log", "alpha.log", "beta.log"]
        .iter()
        .filter_map(|name| {
            let found = std::fs::read_dir(dir.path())
                .ok()?
                .filter_map(Result::ok)
                .map(|entry| entry.path().join(name))
                .find(|path| path.exists())?;
            Some(format!(
                "--- {name}\n{}",
                std::fs::read_to_string(found).unwrap_or_default()
            ))
        })
        .collect();
    let report = format!(
        "walk-through ({}, {:.1}s)\n--- stdout\n{out}--- stderr\n{err}{logs}",
        status.map_or_else(|| "still running after 60 s".to_owned(), |s| s.to_string()),
        started.elapsed().as_secs_f64(),
    );
    assert!(status.is_some_and(|s| s.success()), "{report}");

    let executors = tables(&out, &["ID", "STATUS"]);
    let feeds = tables(&out, &["ID", "STATE"]);
    assert_eq!((executors.len(), feeds.len()), (2, 2), "{report}");
    let status_of = |table: &[Vec<&str>], name: &str| -> String {
        let rows: Vec<_> = table
            .iter()
            .filter(|row| row[0].starts_with(&format!("{name}-")))
            .collect();
        assert_eq!(rows.len(), 1, "one {name} row\n{report}");
        rows[0][1].to_owned()
    };

    // "alpha-... and beta-..., both running"
    assert_eq!(status_of(&executors[0], "alpha"), "running", "{report}");
    assert_eq!(status_of(&executors[0], "beta"), "running", "{report}");
    // "two on alpha-..., two on beta-..."
    let on = |table: &[Vec<&str>], name: &str| {
        table
            .iter()
            .filter(|row| row[2].starts_with(&format!("{name}-")))
            .count()
    };
    assert_eq!(feeds[0].len(), 4, "{report}");
    assert_eq!(
        (on(&feeds[0], "alpha"), on(&feeds[0], "beta")),
        (2, 2),
        "{report}"
    );
    // "alpha-... is a tombstone"; "all four on beta-..."
    assert_eq!(status_of(&executors[1], "alpha"), "tombstone", "{report}");
    assert_eq!(status_of(&executors[1], "beta"), "running", "{report}");
    assert_eq!(feeds[1].len(), 4, "{report}");
    assert_eq!(on(&feeds[1], "beta"), 4, "{report}");
    println!("{report}");
}
