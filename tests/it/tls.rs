//! TLS end to end: an etcd that serves TLS and checks client certificates
//! (mTLS), and `flotilla serve` over HTTPS talking to it with its own client
//! certificate. Certificates are made for the test with `openssl`; requests
//! go through `curl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::ports::free_port_array;
use crate::harness::server::{
    die_with_test, Etcd, FlotillaServer, ServerConfig, ServerOptions, Startup,
};
use serde_json::Value;
use tempfile::TempDir;

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{} (run scripts/install-deps): {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a certificate for 127.0.0.1 (etcd and flotilla serve with it) and
/// a client certificate flotilla presents to etcd.
fn make_certificates(dir: &Path) {
    run(
        dir,
        &[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=flotilla-test-ca",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "127.0.0.1"), ("client", "flotilla")] {
        let subject = format!("/CN={cn}");
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let ext = format!("{name}.ext");
        run(
            dir,
            &[
                "openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr,
                "-subj", &subject,
            ],
        );
        run(
            dir,
            &[
                "openssl",
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &ext,
            ],
        );
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command, log: PathBuf) -> Killed {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    die_with_test(command);
    Killed(command.spawn().expect("spawn"))
}

fn etcd_with_mtls(dir: &Path) -> (Killed, String) {
    let [client, peer] = free_port_array::<2>();
    let url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let etcd = spawn(
        Command::new("etcd")
            .args(["--name", "tls", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .arg(format!("--initial-cluster=tls={peer_url}"))
            .args(["--cert-file", "server.pem", "--key-file", "server-key.pem"])
            .args(["--client-cert-auth", "--trusted-ca-file", "ca.pem"])
            .current_dir(dir),
        dir.join("etcd.log"),
    );
    (etcd, url)
}

/// `curl` over HTTPS trusting the test CA: status and JSON body.
fn curl(dir: &Path, method: &str, url: &str, body: Option<&str>) -> Option<(u16, Value)> {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--max-time", "5", "--cacert", "ca.pem", "-X", method])
        .args(["-w", "\n%{http_code}", url])
        .current_dir(dir);
    if let Some(body) = body {
        command.args(["-H", "Content-Type: application/json", "-d", body]);
    }
    let out = command.output().expect("curl (run scripts/install-deps)");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (json, code) = text.rsplit_once('\n')?;
    Some((
        code.trim().parse().ok()?,
        serde_json::from_str(json).unwrap_or(Value::Null),
    ))
}

/// A `flotilla serve` over HTTPS on `etcd`, presenting the client certificate
/// to it when `with_identity`; not waited for (`/readyz` is plain HTTP).
fn serve(dir: &Path, etcd: &str, with_identity: bool) -> (FlotillaServer, String) {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut env = vec![
        ("FLOTILLA_SERVER_SESSION_TTL", "2s".to_owned()),
        ("FLOTILLA_ETCD_REQUEST_TIMEOUT", "1s".to_owned()),
        ("FLOTILLA_ETCD_TLS_CA_FILE", file("ca.pem")),
        ("FLOTILLA_HTTP_TLS_CERT_FILE", file("server.pem")),
        ("FLOTILLA_HTTP_TLS_KEY_FILE", file("server-key.pem")),
        ("FLOTILLA_HTTP_TLS_CA_FILE", file("ca.pem")),
    ];
    if with_identity {
        env.push(("FLOTILLA_ETCD_TLS_CERT_FILE", file("client.pem")));
        env.push(("FLOTILLA_ETCD_TLS_KEY_FILE", file("client-key.pem")));
    }
    let options = ServerOptions {
        env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..ServerOptions::default()
    };
    let startup = Startup {
        etcd: Etcd::Endpoints(etcd.to_owned()),
        config: ServerConfig::Defaults,
        no_wait: true,
        ..Startup::default()
    };
    let server = FlotillaServer::start_with(options, startup);
    let url = format!("https://127.0.0.1:{}", server.port());
    (server, url)
}

#[test]
fn https_server_talks_to_an_etcd_that_checks_client_certificates() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    make_certificates(dir);
    let (_etcd, etcd_url) = etcd_with_mtls(dir);
    let (server, url) = serve(dir, &etcd_url, true);

    let deadline = Instant::now() + Duration::from_secs(30);
    while curl(dir, "GET", &format!("{url}/readyz"), None).map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not ready over HTTPS:\n{}\n{}",
            server.log(),
            std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, status) = curl(dir, "GET", &format!("{url}/api/v1/status"), None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(status["etcd"]["healthy"], true, "{status}");
    assert_eq!(status["election"]["is_leader"], true, "{status}");
    let (code, executor) = curl(
        dir,
        "POST",
        &format!("{url}/api/v1/executors"),
        Some(r#"{"name":"tls","address":"10.0.0.1:9000"}"#),
    )
    .unwrap();
    assert_eq!(code, 201, "{executor}");
    assert!(executor["token"].as_str().is_some());

    // A second server follows and forwards to the leader over HTTPS.
    let (follower_server, follower) = serve(dir, &etcd_url, true);
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        if let Some((200, list)) = curl(dir, "GET", &format!("{follower}/api/v1/executors"), None) {
            break list;
        }
        assert!(
            Instant::now() < deadline,
            "no forwarded answer:\n{}",
            follower_server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(listed["total"], 1, "{listed}");
    let (_, follower_status) =
        curl(dir, "GET", &format!("{follower}/api/v1/status"), None).unwrap();
    assert_eq!(
        follower_status["election"]["is_leader"], false,
        "{follower_status}"
    );

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(url.replace("https://", "http://") + "/healthz")
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");

    // Without a client certificate etcd refuses the connection: the server
    // says so, and never leads.
    let (refused, other) = serve(dir, &etcd_url, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some((200, status)) = curl(dir, "GET", &format!("{other}/api/v1/status"), None) {
            break status;
        }
        assert!(Instant::now() < deadline, "no status:\n{}", refused.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["etcd"]["healthy"], false, "{status}");
    assert_ne!(status["election"]["is_leader"], true, "{status}");
}
