//! How to read an etcd client error: worth retrying later, or not.

/// Whether retrying an etcd error may succeed. Transport failures, timeouts
/// and etcd's own "try again" statuses (leader changes, request timeouts,
/// too many requests) are retryable; malformed requests and permission
/// errors are not.
pub fn is_retryable(error: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => true,
        E::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Unknown
                | Code::Internal
                | Code::ResourceExhausted
                | Code::Cancelled
        ),
        _ => false,
    }
}

/// Whether etcd refused a read at a revision it has compacted away
/// (`mvcc: required revision has been compacted`).
pub fn is_compacted(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::OutOfRange && status.message().contains("compacted"))
}

/// Whether an answer was larger than the client's decode limit (tonic's
/// `decoded message length too large`): retrying the same request cannot help,
/// a smaller one can.
pub fn is_too_large(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::OutOfRange && status.message().contains("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_and_unavailable_errors_are_retryable() {
        let unavailable =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("leader changed"));
        assert!(is_retryable(&unavailable));
        let invalid = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: too many operations in txn request",
        ));
        assert!(!is_retryable(&invalid));
        assert!(!is_retryable(&etcd_client::Error::InvalidArgs("x".into())));
    }

    #[test]
    fn compaction_and_decode_limit_are_told_apart() {
        let compacted = etcd_client::Error::GRpcStatus(tonic::Status::out_of_range(
            "etcdserver: mvcc: required revision has been compacted",
        ));
        let too_large = etcd_client::Error::GRpcStatus(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 4681130 bytes, the limit is: 4194304 bytes",
        ));
        assert!(is_compacted(&compacted) && !is_too_large(&compacted));
        assert!(is_too_large(&too_large) && !is_compacted(&too_large));
        assert!(!is_retryable(&compacted) && !is_retryable(&too_large));
    }
}
