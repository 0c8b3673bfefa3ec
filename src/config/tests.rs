//! Tests of the whole load path: defaults, the shipped `config.toml`, layer order, and
//! errors that name the key, the value and its origin.

use std::path::Path;
use std::time::Duration;

use super::*;

pub(super) fn load_env(env: &[(&str, &str)]) -> Result<Config> {
    Config::load(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        &[],
    )
}

#[test]
fn defaults_are_valid_and_derive_prefix_and_store_url() {
    let config = Config::load(None, [], &[]).unwrap();
    assert_eq!(config.server.cluster_id, "default");
    assert_eq!(config.http.listen, "127.0.0.1:8300");
    assert_eq!(config.http.max_body_bytes, 65536);
    assert_eq!(config.http.max_heartbeat_bytes, 1048576);
    assert_eq!(config.etcd.prefix, "/flotilla/default");
    assert_eq!(config.etcd.tick_interval, Duration::from_millis(100));
    // The embedded etcd is started with a higher --max-txn-ops; an external one is
    // assumed to have etcd's default.
    assert_eq!(config.etcd.max_txn_ops, 1024);
    let external = Config::load(
        None,
        [(
            "FLOTILLA_ETCD_ENDPOINTS".to_owned(),
            "http://127.0.0.1:2379".to_owned(),
        )],
        &[],
    )
    .unwrap();
    assert_eq!(external.etcd.max_txn_ops, 128);
    assert_eq!(config.etcd.max_txn_bytes, 1_310_720);
    assert_eq!(config.store.url, "sqlite://data/meta.db?mode=rwc");
    assert_eq!(
        config.registry.keepalive_interval,
        Duration::from_millis(500)
    );
    assert_eq!(config.log.format, LogFormat::Human);
    assert!(config.etcd.is_embedded());
}

#[test]
fn empty_document_equals_defaults() {
    assert_eq!(
        Config::from_toml_str("").unwrap(),
        Config::load(None, [], &[]).unwrap()
    );
}

#[test]
fn shipped_config_toml_parses_to_the_defaults() {
    let text = include_str!("../../config.toml");
    let shipped = Config::from_toml_str(text).unwrap();
    assert_eq!(shipped, Config::load(None, [], &[]).unwrap());
}

#[test]
fn shipped_config_toml_mentions_every_key() {
    let text = include_str!("../../config.toml");
    let mut defaults = toml::Table::try_from(Config::default()).unwrap();
    // Optional keys have no default value, so add them by hand.
    let server = defaults["server"].as_table_mut().unwrap();
    server.insert("advertise_addr".into(), "".into());
    server.insert("admin_token_file".into(), "".into());
    let http = defaults["http"].as_table_mut().unwrap();
    for key in ["tls_cert_file", "tls_key_file", "tls_ca_file"] {
        http.insert(key.into(), "".into());
    }
    let etcd = defaults["etcd"].as_table_mut().unwrap();
    for key in ["tls_ca_file", "tls_cert_file", "tls_key_file"] {
        etcd.insert(key.into(), "".into());
    }
    for (section, keys) in defaults {
        assert!(
            text.contains(&format!("[{section}]")),
            "missing [{section}]"
        );
        for key in keys.as_table().unwrap().keys() {
            assert!(
                text.lines().any(|l| {
                    let l = l.trim_start_matches(['#', ' ']);
                    l.starts_with(&format!("{key} ="))
                }),
                "config.toml does not mention {section}.{key}"
            );
        }
    }
}

#[test]
fn unknown_key_is_named() {
    let err = Config::from_toml_str("[etcd]\nendpoint = []\n").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("etcd.endpoint: unknown key `endpoint`"),
        "{msg}"
    );
}

#[test]
fn unknown_section_is_named() {
    let msg = Config::from_toml_str("[etc]\nx = 1\n")
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("etc: unknown section"), "{msg}");
}

#[test]
fn wrong_type_names_key() {
    let msg = Config::from_toml_str("[http]\nmax_body_bytes = \"big\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("http.max_body_bytes: invalid type"),
        "{msg}"
    );
}

#[test]
fn syntax_error_names_line() {
    let msg = Config::from_toml_str("[http]\nlisten = \n")
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("<string>: line 2:"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[http]\nlisten = \"127.0.0.1:1\"\n[etcd]\ntick_interval = \"1s\"\n",
    )
    .unwrap();
    let env = [
        ("FLOTILLA_HTTP_LISTEN", "127.0.0.1:2"),
        ("FLOTILLA_ETCD_ENDPOINTS", "http://a:2379, http://b:2379"),
        ("FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT", "12379"),
        ("FLOTILLA_REGISTRY_MASS_EXPIRY_RATE", "2"),
        ("FLOTILLA_STORE_URL", "postgres://u@h/db"),
        ("FLOTILLA_LOG_FORMAT", "json"),
        ("FLOTILLA_TEST_SOMETHING", "ignored: not a section"),
        ("PATH", "/bin"),
    ];
    let flags = [Override {
        key: "http.listen",
        flag: "--listen",
        value: "127.0.0.1:3".into(),
    }];
    let config = Config::load(
        Some(&path),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        &flags,
    )
    .unwrap();
    assert_eq!(config.http.listen, "127.0.0.1:3");
    assert_eq!(config.etcd.tick_interval, Duration::from_secs(1));
    assert_eq!(config.etcd.endpoints, ["http://a:2379", "http://b:2379"]);
    assert!(!config.etcd.is_embedded());
    assert_eq!(config.etcd.embedded_client_port, 12379);
    assert_eq!(config.registry.mass_expiry_rate, 2.0);
    assert_eq!(config.store.url, "postgres://u@h/db");
    assert_eq!(config.log.format, LogFormat::Json);
}

#[test]
fn env_error_names_the_variable() {
    let msg = load_env(&[("FLOTILLA_ETCD_TICK_INTERVAL", "abc")])
        .unwrap_err()
        .to_string();
    assert_eq!(
            msg,
            "etcd.tick_interval: \"abc\" is not a duration (write it like \"500ms\", \"10s\" or \"1m\") (set by FLOTILLA_ETCD_TICK_INTERVAL)"
        );
    let msg = load_env(&[("FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT", "x")])
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("etcd.embedded_client_port: \"x\" is not an integer"));
    let msg = load_env(&[("FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT", "70000")])
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("etcd.embedded_client_port: invalid value"),
        "{msg}"
    );
}

#[test]
fn unknown_env_key_in_known_section_is_an_error() {
    let msg = load_env(&[("FLOTILLA_ETCD_ENDPOINT", "http://a:2379")])
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("etcd.endpoint: unknown key"), "{msg}");
    assert!(msg.ends_with("(set by FLOTILLA_ETCD_ENDPOINT)"), "{msg}");
}

#[test]
fn optional_keys_can_be_set_from_env() {
    let config = load_env(&[("FLOTILLA_SERVER_ADVERTISE_ADDR", "10.0.0.1:8300")]).unwrap();
    assert_eq!(
        config.server.advertise_addr.as_deref(),
        Some("10.0.0.1:8300")
    );
}

#[test]
fn out_of_range_values_are_rejected() {
    for (toml, key) in [
        (
            "[registry]\nmass_expiry_fraction = 1.5",
            "registry.mass_expiry_fraction",
        ),
        (
            "[registry]\nmass_expiry_rate = 0.0",
            "registry.mass_expiry_rate",
        ),
        ("[etcd]\ntick_interval = \"0s\"", "etcd.tick_interval"),
        ("[etcd]\nmax_txn_ops = 67", "etcd.max_txn_ops"),
        ("[etcd]\nprefix = \"no-slash\"", "etcd.prefix"),
        (
            "[etcd]\nembedded_peer_port = 2379",
            "etcd.embedded_peer_port",
        ),
        ("[http]\nlisten = \"8300\"", "http.listen"),
        ("[http]\nmax_body_bytes = 0", "http.max_body_bytes"),
        (
            "[http]\nmax_heartbeat_bytes = 100",
            "http.max_heartbeat_bytes",
        ),
        ("[server]\ncluster_id = \"a/b\"", "server.cluster_id"),
        (
            "[server]\nadvertise_addr = \"host\"",
            "server.advertise_addr",
        ),
        (
            "[server]\nadmin_token_file = \"/nonexistent/token\"",
            "server.admin_token_file",
        ),
        ("[server]\nsession_ttl = \"1500ms\"", "server.session_ttl"),
        (
            "[http]\ntls_cert_file = \"/nonexistent\"",
            "http.tls_key_file",
        ),
        (
            "[http]\ntls_cert_file = \"/nonexistent\"\ntls_key_file = \"/nonexistent\"",
            "http.tls_cert_file",
        ),
        ("[etcd]\ntls_ca_file = \"/x\"", "etcd.tls_ca_file"),
        (
            "[etcd]\nendpoints = [\"http://h:2379\"]\ntls_ca_file = \"/x\"",
            "etcd.endpoints",
        ),
        ("[server]\nsession_ttl = \"0s\"", "server.session_ttl"),
        ("[store]\nurl = \"redis://x\"", "store.url"),
        ("[log]\nformat = \"xml\"", "log.format"),
        ("[log]\nlevel = \"info,[\"", "log.level"),
        ("etcd = 5", "etcd"),
    ] {
        let msg = Config::from_toml_str(toml).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("{key}: ")), "{toml:?} gave {msg}");
    }
}

#[test]
fn explicit_prefix_and_store_url_are_kept() {
    let config = Config::from_toml_str(
        "[server]\ncluster_id = \"c1\"\ndata_dir = \"/var/lib/f\"\n[etcd]\nprefix = \"/x\"\n",
    )
    .unwrap();
    assert_eq!(config.etcd.prefix, "/x");
    assert_eq!(config.store.url, "sqlite:///var/lib/f/meta.db?mode=rwc");
}

#[test]
fn missing_file_is_a_read_error() {
    let err = Config::load(Some(Path::new("/nonexistent/flotilla.toml")), [], &[]).unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
}
