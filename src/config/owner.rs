//! `[owner]`: how the changefeed owner spends etcd writes and tick time (checkpoint
//! persistence, full passes), with defaults taken from the runtime
//! [`crate::owner::reactor::OwnerConfig`] and their validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_non_zero, human_duration, Invalid, Result};

/// `[owner]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnerConfig {
    /// A changefeed's advanced checkpoint is persisted at most once per interval
    /// (`0s`: at every tick, within the budget).
    #[serde(with = "human_duration")]
    pub checkpoint_interval: Duration,
    /// Checkpoint-only writes per second for all changefeeds together.
    pub max_checkpoint_writes: u32,
    /// Every changefeed is visited once per interval, whatever happened (a
    /// slice per tick).
    #[serde(with = "human_duration")]
    pub full_pass_interval: Duration,
}

impl Default for OwnerConfig {
    fn default() -> Self {
        let runtime = crate::owner::reactor::OwnerConfig::default();
        Self {
            checkpoint_interval: runtime.checkpoint_interval,
            max_checkpoint_writes: runtime.max_checkpoint_writes,
            full_pass_interval: runtime.full_pass_interval,
        }
    }
}

impl OwnerConfig {
    pub(super) fn validate(&self, invalid: Invalid<'_>) -> Result<()> {
        check_non_zero(
            invalid,
            [("owner.full_pass_interval", self.full_pass_interval)],
        )?;
        if self.max_checkpoint_writes == 0 {
            return Err(invalid(
                "owner.max_checkpoint_writes",
                "must be at least 1 (checkpoints would never be persisted)".into(),
            ));
        }
        Ok(())
    }

    /// The runtime settings these keys set; the rest are `base`'s.
    pub fn apply(
        &self,
        base: crate::owner::reactor::OwnerConfig,
    ) -> crate::owner::reactor::OwnerConfig {
        crate::owner::reactor::OwnerConfig {
            checkpoint_interval: self.checkpoint_interval,
            max_checkpoint_writes: self.max_checkpoint_writes,
            full_pass_interval: self.full_pass_interval,
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn owner_keys_parse_and_zero_budget_is_refused() {
        let config = Config::from_toml_str(
            "[owner]\ncheckpoint_interval = \"0s\"\nmax_checkpoint_writes = 50\nfull_pass_interval = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(config.owner.checkpoint_interval, std::time::Duration::ZERO);
        assert_eq!(config.owner.max_checkpoint_writes, 50);
        let msg = Config::from_toml_str("[owner]\nmax_checkpoint_writes = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("owner.max_checkpoint_writes: must be at least 1"),
            "{msg}"
        );
        let msg = Config::from_toml_str("[owner]\nfull_pass_interval = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("owner.full_pass_interval: must be longer than 0s"),
            "{msg}"
        );
    }
}
