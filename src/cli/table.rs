//! Plain-text tables and key/value blocks for the CLI's human output.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Columns padded to their widest cell, two spaces apart; the last column is not
/// padded (no trailing spaces).
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push('\n');
    }
    out
}

/// `key: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
    }
    out
}

/// `a=1,b=2`, or `-` when empty.
pub fn labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `1.5s`-style age of a millisecond count.
pub fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

/// How far a TiDB-style timestamp (unix milliseconds `<< 18`) is behind the wall
/// clock, or `-` for 0 or one in the future.
pub fn lag(ts: u64) -> String {
    let physical_ms = ts >> 18;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if physical_ms == 0 || physical_ms > now_ms {
        return "-".into();
    }
    millis(now_ms - physical_ms)
}

/// `-` for nothing.
pub fn or_dash(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or("-").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_without_trailing_spaces() {
        let out = render(
            &["ID", "STATE", "SINK"],
            &[
                vec!["orders".into(), "normal".into(), "kafka://a".into()],
                vec!["x".into(), "stopped".into(), "kafka://bb".into()],
            ],
        );
        assert_eq!(
            out,
            "ID      STATE    SINK\norders  normal   kafka://a\nx       stopped  kafka://bb\n"
        );
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(millis(250), "250ms");
        assert_eq!(millis(1500), "1.5s");
        assert_eq!(millis(125_000), "2m 5s");
        assert_eq!(lag(0), "-");
    }
}
