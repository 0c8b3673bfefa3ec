//! Label rules shared by executor labels and changefeed selectors (the same
//! rules as tiflow's): keys and values are 1..63 characters matching
//! `^[a-zA-Z0-9]([-.a-zA-Z0-9]*[a-zA-Z0-9])?$`.

use std::collections::BTreeMap;

/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 63;

/// Most labels an executor may have (and a changefeed selector may require).
pub const MAX_LABELS: usize = 32;

/// The pattern, as the error messages show it.
pub const LABEL_PATTERN: &str = "^[a-zA-Z0-9]([-.a-zA-Z0-9]*[a-zA-Z0-9])?$";

/// The OpenAPI schema of a label map (executor labels, changefeed selectors):
/// at most [`MAX_LABELS`] entries whose keys and values follow the rules above.
pub struct LabelMap;

impl utoipa::PartialSchema for LabelMap {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let label = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_LABEL_LEN))
                .pattern(Some(LABEL_PATTERN))
        };
        ObjectBuilder::new()
            .description(Some(format!(
                "At most {MAX_LABELS} labels; keys and values 1..{MAX_LABEL_LEN} characters \
                 matching {LABEL_PATTERN}."
            )))
            .max_properties(Some(MAX_LABELS))
            .property_names(Some(label()))
            .additional_properties(Some(label()))
            .into()
    }
}

impl utoipa::ToSchema for LabelMap {
    fn name() -> std::borrow::Cow<'static, str> {
        "Labels".into()
    }
}

/// Whether `s` matches [`LABEL_PATTERN`] (any length; without a regex engine).
pub fn matches_pattern(s: &str) -> bool {
    let bytes = s.as_bytes();
    let edge = |b: &u8| b.is_ascii_alphanumeric();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            edge(first)
                && edge(last)
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
        }
        _ => false,
    }
}

/// Whether `s` is a valid label key or value.
pub fn is_valid_label(s: &str) -> bool {
    s.len() <= MAX_LABEL_LEN && matches_pattern(s)
}

/// Checks a whole label map; the error names `what` ("label", "selector").
pub fn validate_map(labels: &BTreeMap<String, String>, what: &str) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "a {what} has at most {MAX_LABELS} entries, got {}",
            labels.len()
        ));
    }
    for (key, value) in labels {
        for (part, s) in [("key", key), ("value", value)] {
            if !is_valid_label(s) {
                return Err(format!(
                    "{what} {part} {:?} must be 1..{MAX_LABEL_LEN} characters matching {LABEL_PATTERN}",
                    shorten(s)
                ));
            }
        }
    }
    Ok(())
}

/// At most 64 characters of `s`, for error messages that echo input.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_tiflow_rules() {
        for ok in ["a", "a1", "zone-1", "a.b-c", "A9"] {
            assert!(is_valid_label(ok), "{ok}");
        }
        assert!(is_valid_label(&"x".repeat(63)));
        assert!(!is_valid_label(&"x".repeat(64)));
        for bad in ["", "-a", "a-", ".a", "a_b", "a b", "é", "a/b"] {
            assert!(!is_valid_label(bad), "{bad}");
        }
    }
}
