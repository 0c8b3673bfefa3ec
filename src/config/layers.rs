//! The merging of configuration layers: the file, `FLOTILLA_<SECTION>_<KEY>` environment
//! variables and command-line flags become one TOML table, with the origin of every key
//! kept for error messages, and are then deserialized section by section.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::de::DeserializeOwned;

use super::{Config, Error, Origin, Result, ENV_PREFIX, SECTIONS};

/// `FLOTILLA_ETCD_TICK_INTERVAL` -> `etcd.tick_interval`; `None` when the variable names
/// no section. Section names have no `_`, so the first `_` after the prefix splits.
pub(super) fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
    let (section, key) = rest.split_once('_')?;
    SECTIONS
        .contains(&section)
        .then(|| format!("{section}.{key}"))
}

/// The configuration as TOML tables, layer by layer, with the origin of every key.
#[derive(Default)]
pub(super) struct Layers {
    table: toml::Table,
    origins: HashMap<String, Origin>,
}

impl Layers {
    pub(super) fn add_file(&mut self, path: &Path, text: &str) -> Result<()> {
        let table: toml::Table = toml::from_str(text).map_err(|e| Error::Syntax {
            path: path.to_owned(),
            line: e
                .span()
                .map_or(1, |span| text[..span.start].matches('\n').count() + 1),
            message: e.message().trim().to_owned(),
        })?;
        for (section, value) in table {
            let toml::Value::Table(keys) = value else {
                // Let `build` report it with the section's name.
                self.origins
                    .insert(section.clone(), Origin::File(path.to_owned()));
                self.table.insert(section, value);
                continue;
            };
            for (key, value) in keys {
                self.insert(&section, key, value, Origin::File(path.to_owned()));
            }
        }
        Ok(())
    }

    /// Sets `section.key` from a string typed on a command line or in the environment,
    /// converting it to the type the key has in the defaults (lists are comma-separated).
    pub(super) fn set_str(&mut self, key: &str, raw: &str, origin: Origin) -> Result<()> {
        let (section, name) = key.split_once('.').expect("keys are section.key");
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
        let template = defaults
            .get(section)
            .and_then(|s| s.get(name))
            .cloned()
            // Optional keys have no default; unknown ones are reported by `build`.
            .unwrap_or(toml::Value::String(String::new()));
        let invalid = |what: &str| Error::Invalid {
            key: key.into(),
            message: format!("{raw:?} is not {what}"),
            origin: origin.clone(),
        };
        let value = match template {
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| invalid("an integer"))?)
            }
            toml::Value::Float(_) => {
                toml::Value::Float(raw.trim().parse().map_err(|_| invalid("a number"))?)
            }
            toml::Value::Boolean(_) => {
                toml::Value::Boolean(raw.trim().parse().map_err(|_| invalid("true or false"))?)
            }
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            ),
            _ => toml::Value::String(raw.into()),
        };
        self.insert(section, name.into(), value, origin);
        Ok(())
    }

    fn insert(&mut self, section: &str, key: String, value: toml::Value, origin: Origin) {
        self.origins.insert(format!("{section}.{key}"), origin);
        let entry = self
            .table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(keys) = entry {
            keys.insert(key, value);
        }
    }

    fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    pub(super) fn build(mut self) -> Result<Config> {
        let mut config = Config {
            server: self.section("server")?,
            http: self.section("http")?,
            etcd: self.section("etcd")?,
            store: self.section("store")?,
            registry: self.section("registry")?,
            owner: self.section("owner")?,
            log: self.section("log")?,
        };
        if let Some(section) = self.table.keys().next() {
            return Err(Error::Invalid {
                key: section.clone(),
                message: format!("unknown section (expected one of {})", SECTIONS.join(", ")),
                origin: self.origin(section),
            });
        }
        config.validate(&|key| self.origin(key))?;
        Ok(config)
    }

    /// Takes `name` out of the table and deserializes it.
    ///
    /// Each key is first deserialized on its own (all fields have defaults, so a
    /// one-key table is a complete section): serde's errors do not say which field
    /// failed, and this way the error can name `section.key` and its origin.
    fn section<T: DeserializeOwned + Default>(&mut self, name: &str) -> Result<T> {
        let Some(value) = self.table.remove(name) else {
            return Ok(T::default());
        };
        let toml::Value::Table(keys) = value else {
            return Err(Error::Invalid {
                key: name.into(),
                message: format!("must be a table ([{name}]), not {}", value.type_str()),
                origin: self.origin(name),
            });
        };
        // BTreeMap for a stable "first" error.
        let sorted: BTreeMap<_, _> = keys.iter().collect();
        for (key, value) in sorted {
            let single = toml::Table::from_iter([(key.clone(), value.clone())]);
            if let Err(e) = single.try_into::<T>() {
                let full = format!("{name}.{key}");
                return Err(Error::Invalid {
                    message: tidy_serde_message(e.message()),
                    origin: self.origin(&full),
                    key: full,
                });
            }
        }
        keys.try_into::<T>().map_err(|e| Error::Invalid {
            key: name.into(),
            message: tidy_serde_message(e.message()),
            origin: self.origin(name),
        })
    }
}

/// serde says "unknown field"; our users write keys.
fn tidy_serde_message(message: &str) -> String {
    let message = message.trim();
    match message.strip_prefix("unknown field ") {
        Some(rest) => format!("unknown key {rest}"),
        None => message.to_owned(),
    }
}
