//! `ErrorCode`: every machine-readable `code` an API error can carry, in one enum.
//! The registry, the changefeed administration and the HTTP layer name their codes
//! through it, the OpenAPI document lists [`ErrorCode::ALL`] as the `code` enum, and
//! metrics use [`ErrorCode::as_str`] as a label; so a code cannot be used somewhere
//! and missing from the list. The strings are a contract: clients match on them.

/// Declares the enum, its string for each variant and the list of all of them
/// from one table, so the three cannot disagree.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident => $code:literal,)*) => {
        /// A stable machine-readable error code (see the module docs).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order the API documents them.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as clients see it (`snake_case`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }
        }
    };
}

error_codes! {
    /// A malformed request: bad JSON, field, path or query parameter.
    InvalidArgument => "invalid_argument",
    /// The body is over the route's limit.
    PayloadTooLarge => "payload_too_large",
    /// The body is not `application/json`.
    UnsupportedMediaType => "unsupported_media_type",
    /// No such route or object.
    NotFound => "not_found",
    /// The route exists, not with this method.
    MethodNotAllowed => "method_not_allowed",
    /// A missing or wrong token.
    Unauthorized => "unauthorized",
    /// Too many registrations from one address.
    TooManyRequests => "too_many_requests",
    /// No executor has this id.
    UnknownExecutor => "unknown_executor",
    /// The executor expired or was deregistered.
    TombstoneExecutor => "tombstone_executor",
    /// A changefeed with this id exists.
    ChangefeedExists => "changefeed_exists",
    /// The operation needs a paused changefeed.
    ChangefeedNotPaused => "changefeed_not_paused",
    /// The changefeed's state does not allow the operation.
    ChangefeedWrongState => "changefeed_wrong_state",
    /// A concurrent change won; retry.
    Conflict => "conflict",
    /// A listing's `continue` token outlived its revision (compacted): list again.
    ExpiredContinue => "expired_continue",
    /// The SQL store failed.
    StoreUnavailable => "store_unavailable",
    /// The registry is still loading.
    NotReady => "not_ready",
    /// The registry holds its maximum of executors.
    RegistryFull => "registry_full",
    /// `registry.max_watchers` clients watch the executors already.
    TooManyWatchers => "too_many_watchers",
    /// etcd did not answer in time.
    EtcdUnavailable => "etcd_unavailable",
    /// etcd raised an alarm (NOSPACE: its database is full).
    EtcdAlarm => "etcd_alarm",
    /// A subsystem the request needs is not running.
    Unavailable => "unavailable",
    /// No leader to serve or forward to.
    NoLeader => "no_leader",
    /// A stored value cannot be decoded.
    CorruptValue => "corrupt_value",
    /// etcd refused the request.
    EtcdError => "etcd_error",
    /// A bug or an unexpected failure.
    Internal => "internal",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// For metric labels (`with_label_values(&[error.code()])`).
impl AsRef<str> for ErrorCode {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;
    use std::collections::BTreeSet;

    #[test]
    fn codes_are_distinct_snake_case() {
        let codes: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes.len(), ErrorCode::ALL.len(), "a code appears twice");
        for code in codes {
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code} is not snake_case"
            );
        }
    }
}
