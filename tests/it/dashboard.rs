//! The dashboard end to end: a real server over a real etcd, two
//! `flotilla agent --simulate` processes, changefeeds, and the page in headless
//! Chromium (Debian `chromium`, driven by playwright-core from
//! `tests/browser/`, both installed by `scripts/install-deps`). The browser
//! script (`tests/browser/dashboard.mjs`) stops one agent and watches the page.

use crate::harness;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::server::{FlotillaServer, ServerOptions, BIN};
use flotilla::client::{Client, CreateChangefeed, ExecutorFilter, DEFAULT_NAMESPACE};

const ADMIN: &str = "dashboard-admin";
const CHANGEFEEDS: [&str; 4] = ["orders", "users", "payments", "invoices"];

/// Kills the agent if the test fails half-way.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(server: &FlotillaServer, name: &str) -> AgentProcess {
    AgentProcess(
        Command::new(BIN)
            .args(["agent", "--simulate", "--simulate-step", "100ms"])
            .args(["--name", name, "--label", &format!("agent={name}")])
            .args(["--server", &server.url()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(server.data_dir().join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("start flotilla agent"),
    )
}

/// Chromium, node and playwright-core, or a failure that says how to get them:
/// a machine without a browser must not pass this test by skipping it.
fn browser_tools() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("FLOTILLA_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "no Chromium at {}: run scripts/install-deps (Debian package chromium) \
         or set FLOTILLA_CHROMIUM",
        chromium.display()
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed in {}: run scripts/install-deps",
        dir.display()
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is not on PATH: run scripts/install-deps"
    );
    (chromium, dir)
}

#[tokio::test]
async fn dashboard_shows_an_executor_go_offline_and_its_changefeeds_move() {
    harness::init_tracing();
    let (chromium, browser_dir) = browser_tools();
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let client = Client::new(&server.url()).unwrap().with_admin_token(ADMIN);
    let mut alpha = agent(&server, "alpha");
    let _beta = agent(&server, "beta");
    for id in CHANGEFEEDS {
        client
            .create_changefeed(
                DEFAULT_NAMESPACE,
                &CreateChangefeed {
                    id: id.into(),
                    sink_uri: format!("kafka://broker/{id}"),
                    ..CreateChangefeed::default()
                },
            )
            .await
            .unwrap();
    }

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-e2e.png");
    let started = Instant::now();
    let browser = tokio::process::Command::new("node")
        .current_dir(&browser_dir)
        .arg("dashboard.mjs")
        .arg(server.url())
        .arg(alpha.0.id().to_string())
        .args(["alpha", "beta", &CHANGEFEEDS.len().to_string()])
        .arg(&screenshot)
        .env("FLOTILLA_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // The script gives up on each step after 15 s; this bounds the whole.
    let output = tokio::time::timeout(Duration::from_secs(90), browser)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the browser script hung
{}",
                server.log()
            )
        })
        .expect("run node");
    let status = output.status;
    let report = format!(
        "browser script ({status}, {:.1}s):\n{}{}\nscreenshot: {}\nserver log:\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        screenshot.display(),
        server.log()
    );
    assert!(status.success(), "{report}");
    println!("{report}");

    // What the page showed is what the API says.
    let alpha_exit = alpha.0.wait().unwrap();
    assert_eq!(alpha_exit.code(), Some(0), "alpha stopped cleanly");
    let running = client
        .list_executors(&ExecutorFilter {
            status: Some("running".into()),
            ..ExecutorFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(running.total, 1);
    let beta_id = &running.items[0].id;
    assert!(beta_id.starts_with("beta-"), "{beta_id}");
    for id in CHANGEFEEDS {
        let feed = client.get_changefeed(DEFAULT_NAMESPACE, id).await.unwrap();
        assert_eq!(feed.executor.as_ref(), Some(beta_id), "{id}");
    }
}
