//! `[log]`: the log line format and the `tracing` filter, its defaults and its validation.

use serde::{Deserialize, Serialize};

use super::{Invalid, Result};

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, or `info,flotilla=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// `log.format`: how log lines look on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event (`text` is accepted as an older name).
    #[default]
    #[serde(alias = "text")]
    Human,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the
    /// event's fields at the top level.
    Json,
}

impl LogConfig {
    pub(super) fn validate(&self, invalid: Invalid<'_>) -> Result<()> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.level),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::LogFormat;
    use crate::config::Config;

    #[test]
    fn log_format_text_is_an_alias_of_human() {
        for (value, format) in [
            ("human", LogFormat::Human),
            ("text", LogFormat::Human),
            ("json", LogFormat::Json),
        ] {
            let config = Config::from_toml_str(&format!("[log]\nformat = \"{value}\"\n")).unwrap();
            assert_eq!(config.log.format, format, "{value}");
        }
    }
}
