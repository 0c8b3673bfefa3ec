//! Request limits that protect the registry from a flood: registrations per
//! client address (a token bucket each). Body size and connection count are
//! set on the server itself (`json_body`, `http.max_connections`), and the
//! registry caps how many executors it holds (`registry.max_executors`).
//!
//! The bucket is taken where the client's request arrives: a follower limits
//! before it forwards, and the leader does not limit a request again that a
//! member forwarded (it carries the hop marker), or every client behind one
//! follower would share one bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::error::Error;

/// How many client addresses are tracked at once; beyond it, idle (full)
/// buckets are dropped, and if none is idle the request is refused, so the
/// limiter's own memory is bounded too.
const MAX_CLIENTS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Registrations per second per client address, with a burst.
#[derive(Debug)]
pub struct RegisterLimiter {
    rate: f64,
    burst: f64,
    clients: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Default for RegisterLimiter {
    /// The defaults of `http.register_rate` and `http.register_burst`.
    fn default() -> Self {
        Self::new(100.0, 1000)
    }
}

impl RegisterLimiter {
    /// `rate` registrations per second, `burst` at once; a rate of 0 turns
    /// the limit off.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            clients: Mutex::default(),
        }
    }

    /// Takes one token for `client`, or says when to retry.
    pub fn check(&self, client: IpAddr) -> Result<(), Error> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            let (rate, burst) = (self.rate, self.burst);
            clients.retain(|_, b| refill(b, now, rate, burst) < burst);
            if clients.len() >= MAX_CLIENTS {
                return Err(too_many(Duration::from_secs(1)));
            }
        }
        let bucket = clients.entry(client).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = refill(bucket, now, self.rate, self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate);
        Err(too_many(wait))
    }
}

fn refill(bucket: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * rate).min(burst)
}

fn too_many(wait: Duration) -> Error {
    Error::TooManyRequests {
        retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_and_others_are_not_affected() {
        let limiter = RegisterLimiter::new(1.0, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            limiter.check(a).unwrap();
        }
        match limiter.check(a) {
            Err(Error::TooManyRequests { retry_after_secs }) => {
                assert_eq!(retry_after_secs, 1)
            }
            other => panic!("expected 429, got {other:?}"),
        }
        limiter
            .check(b)
            .expect("another address has its own bucket");
        let off = RegisterLimiter::new(0.0, 1);
        for _ in 0..1000 {
            off.check(a).unwrap();
        }
    }
}
