//! Key ranges of etcd reads: the end of a prefix's range (etcd's `--prefix`).

/// The end of the range of keys starting with `prefix`: the prefix with its
/// last byte below 0xff incremented (etcd's `--prefix`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (never one of our prefixes): to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_bound_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/p/ns/task/status/"), b"/p/ns/task/status0");
        assert_eq!(prefix_end("a\u{7f}".as_bytes()), b"a\x80");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
