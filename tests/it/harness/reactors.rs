//! Reactors and states shared by the worker tests: a plain key/value state,
//! a closure reactor, the bank and the linearizability checker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flotilla::state::{
    self as state, reactor, Change, DataPatch, PatchGroup, Reactor, ReactorState,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every key under the prefix with its raw value.
#[derive(Default)]
pub struct KvState {
    pub values: BTreeMap<String, Vec<u8>>,
    patches: Vec<PatchGroup>,
    /// Updates received with `is_init == true`.
    pub init_updates: u64,
}

impl KvState {
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.values.get(key).map(Vec::as_slice)
    }

    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key).map(|v| {
            std::str::from_utf8(v)
                .expect("utf8")
                .parse()
                .expect("an integer")
        })
    }

    pub fn queue(&mut self, group: PatchGroup) {
        self.patches.push(group);
    }
}

impl ReactorState for KvState {
    fn update(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
        is_init: bool,
    ) -> Result<(), state::Error> {
        if is_init {
            self.init_updates += 1;
        }
        match value {
            Some(v) => self.values.insert(key.to_owned(), v.to_vec()),
            None => self.values.remove(key),
        };
        Ok(())
    }

    fn get_patches(&mut self) -> Vec<PatchGroup> {
        std::mem::take(&mut self.patches)
    }
}

/// A reactor made of a closure called with the state and the tick number.
pub struct FnReactor<F> {
    f: F,
    pub ticks: Arc<AtomicU64>,
}

impl<F> FnReactor<F>
where
    F: FnMut(&mut KvState, u64) -> Result<(), reactor::Error>,
{
    pub fn new(f: F) -> Self {
        Self {
            f,
            ticks: Arc::default(),
        }
    }
}

impl<F> Reactor for FnReactor<F>
where
    F: FnMut(&mut KvState, u64) -> Result<(), reactor::Error>,
{
    type State = KvState;

    fn tick(&mut self, state: &mut KvState) -> Result<(), reactor::Error> {
        let n = self.ticks.fetch_add(1, Ordering::SeqCst);
        (self.f)(state, n)
    }
}

pub fn failed(message: String) -> reactor::Error {
    reactor::Error::Failed(message.into())
}

/// Appends `suffix` to the value of `key` (absent = empty).
pub fn append(key: &str, suffix: &'static str) -> DataPatch {
    DataPatch::single(key, move |old| {
        let mut value = old.unwrap_or_default().to_vec();
        value.extend_from_slice(suffix.as_bytes());
        Ok(Change::Put(value))
    })
}

/// Adds `delta` to the integer at `key` (absent = 0).
pub fn add(key: String, delta: i64) -> DataPatch {
    DataPatch::single(key.clone(), move |old| {
        let current: i64 = match old {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| flotilla::state::patch::Error::Malformed {
                    key: key.clone(),
                    reason: "not an integer".into(),
                })?,
        };
        Ok(Change::Put((current + delta).to_string().into_bytes()))
    })
}

/// tiflow's bank: accounts whose sum must always be 0. Every tick checks the
/// sum on its snapshot, then queues a few transfers, one group each.
pub struct Bank {
    pub prefix: String,
    pub accounts: usize,
    rng: StdRng,
    /// Chance per tick to return `Finished` (the test then starts a new worker).
    finish_chance: f64,
    /// Ticks that saw every account, over all bank workers sharing it.
    pub checked_ticks: Arc<AtomicU64>,
}

impl Bank {
    pub fn new(
        prefix: &str,
        accounts: usize,
        seed: u64,
        finish_chance: f64,
        checked: Arc<AtomicU64>,
    ) -> Self {
        Self {
            prefix: prefix.to_owned(),
            accounts,
            rng: StdRng::seed_from_u64(seed),
            finish_chance,
            checked_ticks: checked,
        }
    }

    pub fn account(&self, i: usize) -> String {
        format!("{}/account/{i:02}", self.prefix)
    }
}

impl Reactor for Bank {
    type State = KvState;

    fn tick(&mut self, state: &mut KvState) -> Result<(), reactor::Error> {
        let mut sum = 0;
        for i in 0..self.accounts {
            match state.get_i64(&self.account(i)) {
                Some(balance) => sum += balance,
                None => return Err(failed(format!("account {i} is missing"))),
            }
        }
        if sum != 0 {
            return Err(failed(format!("the accounts sum to {sum}, not 0")));
        }
        self.checked_ticks.fetch_add(1, Ordering::Relaxed);
        for _ in 0..self.rng.random_range(0..=self.accounts / 5 + 1) {
            let from = self.rng.random_range(0..self.accounts);
            let to = self.rng.random_range(0..self.accounts);
            let amount = self.rng.random_range(0..100);
            state.queue(vec![
                add(self.account(from), -amount),
                add(self.account(to), amount),
            ]);
        }
        if self.rng.random_bool(self.finish_chance) {
            return Err(reactor::Error::Finished);
        }
        Ok(())
    }
}

/// Checks linearizability: `value` (written from outside, increasing) never
/// goes backward between ticks, and `own` (incremented by this reactor every
/// tick) always shows this reactor's last committed write.
pub struct Linearizability {
    pub value_key: String,
    pub own_key: String,
    /// Stop once `value` reaches this.
    pub target: i64,
    /// Require `own` to grow by exactly one per tick. Only valid when etcd
    /// never fails: a txn with an unknown outcome may not have committed.
    pub strict: bool,
    last_value: i64,
    last_own: Option<i64>,
    pub ticks_with_news: u64,
}

impl Linearizability {
    pub fn new(prefix: &str, target: i64, strict: bool) -> Self {
        Self {
            value_key: format!("{prefix}/value"),
            own_key: format!("{prefix}/own"),
            target,
            strict,
            last_value: -1,
            last_own: None,
            ticks_with_news: 0,
        }
    }
}

impl Reactor for Linearizability {
    type State = KvState;

    fn tick(&mut self, state: &mut KvState) -> Result<(), reactor::Error> {
        let value = state.get_i64(&self.value_key).unwrap_or(-1);
        if value < self.last_value {
            return Err(failed(format!(
                "value went back from {} to {value}",
                self.last_value
            )));
        }
        if value > self.last_value {
            self.ticks_with_news += 1;
        }
        self.last_value = value;
        let own = state.get_i64(&self.own_key).unwrap_or(0);
        if let Some(last) = self.last_own {
            if own < last {
                return Err(failed(format!(
                    "own counter went back from {last} to {own}"
                )));
            }
            if self.strict && own != last + 1 {
                return Err(failed(format!(
                    "tick saw own counter {own} after committing {}: the reactor is behind its own write",
                    last + 1
                )));
            }
        }
        self.last_own = Some(own);
        if value >= self.target {
            return Err(reactor::Error::Finished);
        }
        state.queue(vec![add(self.own_key.clone(), 1)]);
        Ok(())
    }
}

/// Creates `accounts` bank accounts at 0 under `prefix`.
pub async fn seed_bank(client: &etcd_client::Client, prefix: &str, accounts: usize) {
    let mut client = client.clone();
    for i in 0..accounts {
        client
            .put(format!("{prefix}/account/{i:02}"), "0", None)
            .await
            .expect("seed an account");
    }
}

/// The sum of all accounts under `prefix`, read straight from etcd.
pub async fn bank_sum(client: &etcd_client::Client, prefix: &str) -> i64 {
    let mut client = client.clone();
    let resp = client
        .get(
            format!("{prefix}/account/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("read the accounts");
    resp.kvs()
        .iter()
        .map(|kv| {
            kv.value_str()
                .expect("utf8")
                .parse::<i64>()
                .expect("an integer")
        })
        .sum()
}
