//! The dependency rules of ARCHITECTURE.md ("Invariants"), checked on the source
//! text the way rust-analyzer's tidy tests do: a module that imports what its rule
//! forbids fails here, naming the file and line. Comment lines are skipped (they
//! may name what a module does not use).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn src(module: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module)
}

/// The lines of the files of `module` (a directory or a file under `src/`),
/// but comments, that contain one of `forbidden`, unless `allowed` says so.
fn offending(module: &str, forbidden: &[&str], allowed: &[&str]) -> Vec<String> {
    offending_in(&src(module), forbidden, allowed)
}

fn offending_in(root: &Path, forbidden: &[&str], allowed: &[&str]) -> Vec<String> {
    let root = root.to_owned();
    let files = if root.is_dir() {
        sources(&root)
    } else {
        vec![root]
    };
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for token in forbidden {
                if code.contains(token) && !allowed.iter().any(|a| code.contains(a)) {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, code));
                }
            }
        }
    }
    found
}

#[test]
fn state_knows_nothing_of_actix_etcd_http_or_the_other_modules() {
    let found = offending(
        "state",
        &[
            "actix",
            "etcd_client",
            "tokio",
            "crate::actors",
            "crate::http",
            "crate::owner",
            "crate::store",
            "crate::server",
            "crate::client",
            "crate::election",
        ],
        &[],
    );
    assert!(found.is_empty(), "state imports:\n{}", found.join("\n"));
}

#[test]
fn owner_knows_nothing_of_actix_actors_or_http() {
    let found = offending(
        "owner",
        &["actix", "crate::actors", "crate::http", "crate::server"],
        &[],
    );
    assert!(found.is_empty(), "owner imports:\n{}", found.join("\n"));
}

#[test]
fn dependencies_point_from_http_to_actors_to_state() {
    let found = offending("actors", &["crate::http", "crate::server"], &[]);
    assert!(found.is_empty(), "actors import:\n{}", found.join("\n"));
}

#[test]
fn client_depends_on_no_other_flotilla_module() {
    let found = offending("client", &["crate::", "flotilla::"], &["crate::client"]);
    assert!(found.is_empty(), "client imports:\n{}", found.join("\n"));
}

#[test]
fn cli_uses_the_client_only() {
    let found = offending(
        "cli",
        &["crate::", "flotilla::"],
        &["crate::cli", "flotilla::client"],
    );
    assert!(found.is_empty(), "cli imports:\n{}", found.join("\n"));
}

/// The SQL store is the registry's (its settings are the config's to check; the
/// server and the leader only hand it over; HTTP maps its error to a status).
#[test]
fn the_store_is_used_by_the_registry_and_its_wiring_only() {
    let mut found = Vec::new();
    for module in [
        "state",
        "owner",
        "client",
        "cli",
        "election.rs",
        "metrics.rs",
    ] {
        found.extend(offending(module, &["crate::store"], &[]));
    }
    for file in sources(&src("actors")) {
        let rel = file.strip_prefix(src("actors")).unwrap().to_owned();
        if rel.starts_with("executor_registry") || rel == Path::new("leader.rs") {
            continue;
        }
        let module = format!("actors/{}", rel.display());
        found.extend(offending(&module, &["crate::store"], &[]));
    }
    for file in sources(&src("http")) {
        let rel = file.strip_prefix(src("http")).unwrap().to_owned();
        if rel == Path::new("error.rs") {
            continue;
        }
        let module = format!("http/{}", rel.display());
        found.extend(offending(&module, &["crate::store"], &[]));
    }
    assert!(found.is_empty(), "store used by:\n{}", found.join("\n"));
}

/// The checker itself: a forbidden import is found, a comment naming it is not.
#[test]
fn the_checker_finds_an_import_and_skips_comments() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(
        dir.path().join("sub/x.rs"),
        "//! no actix here\n    /// nor crate::http\nuse actix::prelude::*;\nuse crate::client::X;\n",
    )
    .unwrap();
    let hits = offending_in(dir.path(), &["actix", "crate::"], &["crate::client"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(
        hits[0].ends_with("x.rs:3: use actix::prelude::*;"),
        "{hits:?}"
    );
}
