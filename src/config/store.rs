//! `[store]`: the SQL metadata store's URL, checked with the store's own parser, or
//! derived from the data directory when empty.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Invalid, Result};

/// `[store]`: the SQL metadata store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sea-orm URL; empty means `sqlite://<data_dir>/meta.db?mode=rwc`, filled in by
    /// [`Config::load`](super::Config::load) so that `--data-dir` moves the database too.
    pub url: String,
}

impl StoreConfig {
    /// Checks `url`, or fills it in from `data_dir` when empty.
    pub(super) fn validate(&mut self, data_dir: &Path, invalid: Invalid<'_>) -> Result<()> {
        if self.url.is_empty() {
            self.url = format!("sqlite://{}/meta.db?mode=rwc", data_dir.display());
        } else if let Err(reason) = crate::store::check_url(&self.url) {
            return Err(invalid(
                "store.url",
                format!("{}: {reason}", crate::store::redact_url(&self.url)),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn a_store_url_the_store_cannot_open_is_refused_at_start() {
        for url in ["mysql://u:secret@h/db", "redis://h", "nonsense"] {
            let toml = format!("[store]\nurl = {url:?}\n");
            let msg = Config::from_toml_str(&toml).unwrap_err().to_string();
            assert!(msg.starts_with("store.url: "), "{msg}");
            assert!(!msg.contains("secret"), "the password is redacted: {msg}");
        }
    }
}
