//! Free loopback ports. Every port a test needs at once is taken in one call:
//! the listeners are all held until every port is chosen, so the kernel cannot
//! hand out the same port twice (two `free_port()` calls may). They are released
//! on return, before the process under test binds them, so another process may
//! still win the race (the etcd harness retries then).

use std::net::TcpListener;

/// `count` distinct free loopback ports.
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local addr of a bound listener")
                .port()
        })
        .collect()
}

/// `N` distinct free loopback ports, as an array to destructure.
pub fn free_port_array<const N: usize>() -> [u16; N] {
    let ports = free_ports(N);
    std::array::from_fn(|i| ports[i])
}

/// One free loopback port (when a test needs only one).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}
