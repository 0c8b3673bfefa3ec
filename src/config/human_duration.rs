//! Durations as human strings (`"500ms"`, `"10s"`, `"1m 30s"`): the serde
//! `#[serde(with = "human_duration")]` helpers every duration key uses.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Other(toml::Value),
    }
    match Raw::deserialize(d)? {
        Raw::Text(text) => humantime::parse_duration(text.trim()).map_err(|_| {
            de::Error::custom(format!(
                "{text:?} is not a duration (write it like \"500ms\", \"10s\" or \"1m\")"
            ))
        }),
        Raw::Other(value) => Err(de::Error::custom(format!(
            "{value} is not a duration (write it as a string like \"500ms\" or \"10s\")"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn bad_duration_names_key_and_value() {
        let msg = Config::from_toml_str("[etcd]\ntick_interval = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("etcd.tick_interval: \"abc\" is not a duration"),
            "{msg}"
        );
        assert!(msg.ends_with("(in <string>)"), "{msg}");
    }

    #[test]
    fn duration_as_number_is_rejected() {
        let msg = Config::from_toml_str("[registry]\nmin_ttl = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("registry.min_ttl: 5 is not a duration"),
            "{msg}"
        );
    }
}
