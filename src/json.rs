//! JSON objects in, nothing else.
//!
//! Every JSON value flotilla reads, from etcd or in a request body, is an
//! object. serde's derived decoders also take an array of the fields in
//! order, which no writer of ours produces: an array written into etcd from
//! outside would pass for a record, and an array body for a request.

use serde::de::{DeserializeOwned, Error as _};

/// Decodes `bytes` as a `T` written as a JSON object.
pub fn from_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(bytes),
        _ => Err(serde_json::Error::custom("expected a JSON object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::model::{ChangefeedStatus, TaskPosition};

    #[test]
    fn objects_only() {
        let status: ChangefeedStatus =
            from_object(br#" {"checkpoint_ts": 5, "epoch": 2}"#).unwrap();
        assert_eq!((status.checkpoint_ts, status.epoch), (5, 2));
        // The same fields as an array: serde_json takes it, we do not.
        assert!(serde_json::from_slice::<ChangefeedStatus>(b"[5, 2]").is_ok());
        let err = from_object::<ChangefeedStatus>(b"[5, 2]").unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
        for other in [&b""[..], b"null", b"5", b"\"x\"", b"  [", b"\xff"] {
            assert!(from_object::<TaskPosition>(other).is_err(), "{other:?}");
        }
    }
}
