//! `[registry]`: executor liveness (heartbeat and TTL bounds, failover grace, mass-expiry
//! throttling, capacity), its defaults (taken from the runtime registry) and its
//! validation, including the relations between the TTLs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_non_zero, human_duration, Invalid, Result, Warning};

/// `[registry]`: executor liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// How often expired executors are looked for.
    #[serde(with = "human_duration")]
    pub keepalive_interval: Duration,
    /// Interval the server asks executors to heartbeat at.
    #[serde(with = "human_duration")]
    pub heartbeat_interval: Duration,
    /// TTL of an executor that asks for none.
    #[serde(with = "human_duration")]
    pub default_ttl: Duration,
    /// Bounds an executor's requested TTL is clamped to.
    #[serde(with = "human_duration")]
    pub min_ttl: Duration,
    #[serde(with = "human_duration")]
    pub max_ttl: Duration,
    /// TTL given to every executor loaded from the store at start-up or failover.
    #[serde(with = "human_duration")]
    pub failover_grace: Duration,
    /// Share of live executors that, expiring at once, counts as a mass expiry.
    pub mass_expiry_fraction: f64,
    /// Executors expired per second during a mass expiry.
    pub mass_expiry_rate: f64,
    /// Most executors registered at once; beyond it 503 `registry_full`.
    pub max_executors: usize,
    /// Most clients watching the executor feed at once; beyond it 503
    /// `too_many_watchers`.
    pub max_watchers: usize,
}

/// The runtime registry's defaults, written once in
/// [`crate::actors::executor_registry::RegistryConfig`]'s `Default`.
impl Default for RegistryConfig {
    fn default() -> Self {
        let runtime = crate::actors::executor_registry::RegistryConfig::default();
        Self {
            keepalive_interval: runtime.keepalive_interval,
            heartbeat_interval: runtime.heartbeat_interval,
            default_ttl: runtime.default_ttl,
            min_ttl: runtime.min_ttl,
            max_ttl: runtime.max_ttl,
            failover_grace: runtime.failover_grace,
            mass_expiry_fraction: runtime.mass_expiry_fraction,
            mass_expiry_rate: runtime.mass_expiry_rate,
            max_executors: runtime.max_executors,
            max_watchers: runtime.max_watchers,
        }
    }
}

impl RegistryConfig {
    pub(super) fn validate(&self, invalid: Invalid<'_>) -> Result<()> {
        if self.max_executors == 0 {
            return Err(invalid("registry.max_executors", "must be > 0".into()));
        }
        if self.max_watchers == 0 {
            return Err(invalid("registry.max_watchers", "must be > 0".into()));
        }
        check_non_zero(
            invalid,
            [
                ("registry.keepalive_interval", self.keepalive_interval),
                ("registry.heartbeat_interval", self.heartbeat_interval),
                ("registry.default_ttl", self.default_ttl),
                ("registry.min_ttl", self.min_ttl),
                ("registry.max_ttl", self.max_ttl),
            ],
        )?;
        if self.min_ttl > self.max_ttl {
            return Err(invalid(
                "registry.min_ttl",
                format!(
                    "{} is greater than registry.max_ttl ({})",
                    human(self.min_ttl),
                    human(self.max_ttl)
                ),
            ));
        }
        if self.default_ttl < self.min_ttl || self.default_ttl > self.max_ttl {
            return Err(invalid(
                "registry.default_ttl",
                format!(
                    "{} is outside registry.min_ttl..registry.max_ttl ({}..{})",
                    human(self.default_ttl),
                    human(self.min_ttl),
                    human(self.max_ttl)
                ),
            ));
        }
        // An executor that heartbeats no faster than its TTL would flap between online
        // and expired.
        if self.heartbeat_interval >= self.default_ttl {
            return Err(invalid(
                "registry.heartbeat_interval",
                format!(
                    "{} must be shorter than registry.default_ttl ({})",
                    human(self.heartbeat_interval),
                    human(self.default_ttl)
                ),
            ));
        }
        if !(self.mass_expiry_fraction > 0.0 && self.mass_expiry_fraction <= 1.0) {
            return Err(invalid(
                "registry.mass_expiry_fraction",
                format!("{} must be in (0, 1]", self.mass_expiry_fraction),
            ));
        }
        if !(self.mass_expiry_rate.is_finite() && self.mass_expiry_rate > 0.0) {
            return Err(invalid(
                "registry.mass_expiry_rate",
                format!("{} must be a positive number", self.mass_expiry_rate),
            ));
        }
        Ok(())
    }
}

impl RegistryConfig {
    /// The hand-off rule across a failover: a new leader knows neither the TTLs the
    /// old one granted nor when it last answered, so every executor it loads waits at
    /// least the longest lease plus the time the old leader may have kept answering.
    pub(super) fn validate_failover_grace(
        &self,
        session_ttl: Duration,
        invalid: Invalid<'_>,
    ) -> Result<()> {
        let floor = self.max_ttl + session_ttl;
        if self.failover_grace < floor {
            return Err(invalid(
                "registry.failover_grace",
                format!(
                    "{} is shorter than registry.max_ttl ({}) + server.session_ttl ({}) = {}: \
                     after a failover the new leader could expire an executor, and give its \
                     changefeeds to another, while a lease the old leader granted still holds",
                    human(self.failover_grace),
                    human(self.max_ttl),
                    human(session_ttl),
                    human(floor)
                ),
            ));
        }
        Ok(())
    }
}

/// Heartbeat intervals a lease must outlast beyond a failover: the first heartbeat
/// through the new leader, a retry, and the new leader's start.
const FAILOVER_HEARTBEATS: u32 = 3;

impl RegistryConfig {
    /// Settings that are valid but defeat the executor lease's purpose; logged at warn
    /// once the log is set up. `session_ttl`: how long a failover can take.
    pub(super) fn warnings(&self, session_ttl: Duration) -> Vec<Warning> {
        let mut warnings = Vec::new();
        // An agent's lease is the TTL less its margin (by default); while no leader
        // answers, leases run out. One shorter than a failover stops all work at
        // every failover.
        let lease = self
            .default_ttl
            .saturating_sub(crate::client::lease_margin(self.default_ttl, None));
        let failover = session_ttl + self.heartbeat_interval * FAILOVER_HEARTBEATS;
        if lease <= failover {
            warnings.push(Warning {
                key: "registry.default_ttl",
                message: format!(
                    "{} leaves executors a lease of {} (the TTL less the agent's default \
                     margin), no longer than a leader failover (server.session_ttl {} + \
                     {FAILOVER_HEARTBEATS} heartbeat intervals = {}): every failover will stop \
                     all work; raise it to at least {}",
                    human(self.default_ttl),
                    human(lease),
                    human(session_ttl),
                    human(failover),
                    human(min_surviving_ttl(failover)),
                ),
            });
        }
        warnings
    }
}

/// The shortest TTL whose default lease is longer than `failover`.
fn min_surviving_ttl(failover: Duration) -> Duration {
    // lease = ttl - max(ttl / 10, 500 ms) > failover: ttl = failover * 10 / 9, rounded
    // up to a whole second, is enough for any failover above 4.5 s; below, + 500 ms.
    let by_share = (failover * 10 / 9).as_secs() + 1;
    let by_floor = (failover + crate::client::MIN_LEASE_MARGIN).as_secs() + 1;
    Duration::from_secs(by_share.max(by_floor))
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use crate::config::tests::load_env;
    use crate::config::Config;

    #[test]
    fn min_ttl_above_max_ttl_is_rejected() {
        let msg = Config::from_toml_str("[registry]\nmin_ttl = \"2m\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "registry.min_ttl: 2m is greater than registry.max_ttl (1m) (in <string>)"
        );
    }

    #[test]
    fn default_ttl_outside_bounds_is_rejected() {
        let msg = Config::from_toml_str("[registry]\ndefault_ttl = \"500ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("registry.default_ttl: 500ms is outside"),
            "{msg}"
        );
    }

    #[test]
    fn heartbeat_not_shorter_than_ttl_is_rejected() {
        let msg = load_env(&[("FLOTILLA_REGISTRY_HEARTBEAT_INTERVAL", "20s")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("registry.heartbeat_interval: 20s must be shorter"),
            "{msg}"
        );
    }

    #[test]
    fn the_defaults_survive_a_failover_without_warnings() {
        let config = load_env(&[]).unwrap();
        assert_eq!(config.warnings(), Vec::new());
        // The lease (20 s - 2 s) outlasts the session TTL (10 s) + 3 heartbeats.
        assert_eq!(
            config.registry.default_ttl,
            std::time::Duration::from_secs(20)
        );
    }

    #[test]
    fn a_ttl_too_short_for_a_failover_warns_but_loads() {
        let config = load_env(&[("FLOTILLA_REGISTRY_DEFAULT_TTL", "5s")]).unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].key, "registry.default_ttl");
        assert!(
            warnings[0]
                .message
                .contains("every failover will stop all work; raise it to at least 15s"),
            "{}",
            warnings[0].message
        );
        // A shorter session TTL makes the same TTL safe.
        let config = load_env(&[
            ("FLOTILLA_REGISTRY_DEFAULT_TTL", "5s"),
            ("FLOTILLA_SERVER_SESSION_TTL", "1s"),
        ])
        .unwrap();
        assert_eq!(config.warnings(), Vec::new());
    }

    #[test]
    fn a_grace_shorter_than_the_longest_lease_plus_a_failover_is_refused() {
        // Defaults: max_ttl 1m + session_ttl 10s.
        let err = load_env(&[("FLOTILLA_REGISTRY_FAILOVER_GRACE", "69s")]).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("registry.failover_grace"), "{message}");
        assert!(message.contains("1m 10s"), "{message}");
        assert!(load_env(&[("FLOTILLA_REGISTRY_FAILOVER_GRACE", "70s")]).is_ok());
        // A shorter longest TTL makes a shorter grace safe.
        assert!(load_env(&[
            ("FLOTILLA_REGISTRY_FAILOVER_GRACE", "30s"),
            ("FLOTILLA_REGISTRY_MAX_TTL", "20s"),
        ])
        .is_ok());
    }
}
