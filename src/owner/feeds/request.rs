//! The request bodies of the changefeed API and their validation: every check runs
//! before anything is read or written.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use super::{encode, Error, Result, MAX_CONFIG_BYTES, MAX_SINK_URI_LEN, TSO_LOGICAL_BITS};
use crate::labels::shorten;
use crate::owner::model::{is_valid_id, ChangefeedId, FeedState, MAX_ID_LEN};

/// `POST /api/v1/changefeeds` body.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChangefeed {
    #[schema(pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$")]
    pub id: String,
    /// `scheme://...`, at most 1024 bytes, no spaces or control characters
    /// (what `validate_sink_uri` accepts; the schema counts characters).
    #[schema(
        max_length = 1024,
        pattern = r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f-\x9f]*$"
    )]
    pub sink_uri: String,
    /// Absent or 0: now, as a TiDB-style timestamp (unix millis << 18).
    #[serde(default)]
    pub start_ts: Option<u64>,
    /// Absent or 0: runs forever; otherwise greater than `start_ts`.
    #[serde(default)]
    pub target_ts: Option<u64>,
    /// A JSON object of at most 64 KiB; absent: `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub config: Option<Value>,
    /// Labels an executor must have (the executor label rules); absent: any
    /// executor.
    #[serde(default)]
    #[schema(value_type = Option<crate::labels::LabelMap>)]
    pub selector: Option<BTreeMap<String, String>>,
}

/// `PUT /api/v1/changefeeds/{id}` body: each field given replaces the stored one.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UpdateChangefeed {
    #[serde(default)]
    #[schema(
        nullable = false,
        max_length = 1024,
        pattern = r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f-\x9f]*$"
    )]
    pub sink_uri: Option<String>,
    #[serde(default)]
    #[schema(value_type = Object, required = false)]
    pub config: Option<Value>,
    #[serde(default)]
    #[schema(value_type = crate::labels::LabelMap, required = false)]
    pub selector: Option<BTreeMap<String, String>>,
}

/// `POST /api/v1/changefeeds/{id}/resume` body (optional).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeChangefeed {
    /// Resume from here instead of the stored checkpoint.
    #[serde(default)]
    pub checkpoint_ts: Option<u64>,
}

/// Now as a TiDB-style timestamp: unix millis in the physical bits, logical 0.
pub fn now_ts() -> u64 {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    millis << TSO_LOGICAL_BITS
}

/// Parses a `?state=` filter.
pub fn parse_state(s: &str) -> Result<FeedState> {
    FeedState::parse(s).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "state {:?} is not one of normal, stopped, failed, finished",
            shorten(s)
        ))
    })
}

pub(super) fn changefeed_id(namespace: &str, id: &str) -> Result<ChangefeedId> {
    validate_id("namespace", namespace)?;
    validate_id("changefeed id", id)?;
    Ok(ChangefeedId::new(namespace, id))
}

/// Namespaces and ids: the pattern of [`is_valid_id`].
pub fn validate_id(what: &str, s: &str) -> Result<()> {
    if is_valid_id(s) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{what} {:?} must be 1..{MAX_ID_LEN} characters, each a letter, a digit, '-' or '_' \
         (and not \"__meta__\")",
        shorten(s)
    )))
}

pub(super) fn validate_sink_uri(uri: &str) -> Result<()> {
    let invalid = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "sink_uri {:?} {why}",
            shorten(uri)
        )))
    };
    if uri.is_empty() {
        return invalid("must not be empty");
    }
    if uri.len() > MAX_SINK_URI_LEN {
        return invalid(&format!("is longer than {MAX_SINK_URI_LEN} bytes"));
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("must not contain spaces or control characters");
    }
    // RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    let scheme_ok = uri.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    });
    if !scheme_ok {
        return invalid("must start with a scheme, as in kafka://host:9092/topic");
    }
    Ok(())
}

/// `None` -> `{}`; otherwise a JSON object of at most [`MAX_CONFIG_BYTES`].
pub(super) fn validate_config(config: Option<Value>) -> Result<Value> {
    let config = config.unwrap_or_else(|| Value::Object(Default::default()));
    if !config.is_object() {
        return Err(Error::InvalidArgument(
            "config must be a JSON object".into(),
        ));
    }
    let size = encode(&config).len();
    if size > MAX_CONFIG_BYTES {
        return Err(Error::InvalidArgument(format!(
            "config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} are allowed"
        )));
    }
    Ok(config)
}

/// The executor label rules ([`crate::labels`]).
pub(super) fn validate_selector(selector: &BTreeMap<String, String>) -> Result<()> {
    crate::labels::validate_map(selector, "selector").map_err(Error::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::feeds::MAX_SELECTOR_LABELS;

    #[test]
    fn sink_uris_need_a_scheme() {
        for good in [
            "kafka://h:9092/t",
            "blackhole://",
            "mysql+ssl://u@h/db",
            "s3://b/p?x=1",
        ] {
            assert!(validate_sink_uri(good).is_ok(), "{good}");
        }
        let long = format!("kafka://{}", "x".repeat(MAX_SINK_URI_LEN));
        for bad in [
            "",
            "kafka",
            "://h",
            "1ka://h",
            "ka fka://h",
            "kafka://a b",
            "k_a://h",
            &long,
        ] {
            assert!(validate_sink_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selectors_follow_the_label_rules() {
        let sel = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(validate_selector(&sel("zone", "us-east.1")).is_ok());
        assert!(validate_selector(&sel(&"k".repeat(63), "v")).is_ok());
        for (k, v) in [
            ("", "v"),
            ("k", ""),
            ("-k", "v"),
            ("k", "v."),
            ("k/x", "v"),
            ("k", "é"),
        ] {
            assert!(validate_selector(&sel(k, v)).is_err(), "{k}={v}");
        }
        assert!(validate_selector(&sel(&"k".repeat(64), "v")).is_err());
        let many: BTreeMap<_, _> = (0..=MAX_SELECTOR_LABELS)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        assert!(validate_selector(&many).is_err());
    }

    #[test]
    fn config_is_an_object_of_bounded_size() {
        assert_eq!(validate_config(None).unwrap(), serde_json::json!({}));
        assert!(validate_config(Some(serde_json::json!({"a": [1, 2]}))).is_ok());
        for bad in [serde_json::json!([1]), serde_json::json!("x"), Value::Null] {
            assert!(validate_config(Some(bad.clone())).is_err(), "{bad}");
        }
        let big = serde_json::json!({ "x": "y".repeat(MAX_CONFIG_BYTES) });
        assert!(validate_config(Some(big)).is_err());
    }

    #[test]
    fn now_is_a_tso_with_a_zero_logical_part() {
        let ts = now_ts();
        assert_eq!(ts & ((1 << TSO_LOGICAL_BITS) - 1), 0);
        let millis = ts >> TSO_LOGICAL_BITS;
        // After 2020 and before 2100.
        assert!(
            millis > 1_577_836_800_000 && millis < 4_102_444_800_000,
            "{millis}"
        );
    }

    #[test]
    fn long_inputs_are_shortened_in_messages() {
        let Err(Error::InvalidArgument(message)) = validate_id("namespace", &"x".repeat(10_000))
        else {
            panic!("a 10000-character namespace is invalid");
        };
        assert!(message.len() < 300, "{message}");
    }
}
