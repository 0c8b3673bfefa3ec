//! Group commit of single creates: `POST /api/v1/changefeeds` requests that
//! arrive together go to etcd together. Each create waits in one queue; a task
//! takes whatever is waiting (up to a txn's worth, each changefeed once) and
//! commits it as one txn of [`Changefeeds::create_chunk`], which still requires
//! each changefeed's keys not to exist and tells each create its own outcome
//! (an existing one is `changefeed_exists`, the others are created). At most
//! [`IN_FLIGHT`] such txns are in flight; while they are, the next group
//! gathers. One create alone waits for nothing: its group is itself.
//!
//! Why: a create is one small txn, and etcd's cost per txn (a raft entry, a
//! commit) dominates; at 16 concurrent clients the groups hold about 8, and
//! creating through the API outpaces a raw loop of single txns.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::batch::Ready;
use super::{Changefeeds, Error, Result};
use crate::owner::model::ChangefeedId;

/// Group txns in flight at once.
const IN_FLIGHT: usize = 2;
/// Creates waiting at most; beyond it a create waits to enter the queue
/// (bounded by the request timeout like the rest of it).
const QUEUE: usize = 4096;

/// The sending end of the queue.
pub(super) type Queue = mpsc::Sender<Waiting>;

/// One create waiting for its group.
pub(super) struct Waiting {
    ready: Ready,
    reply: oneshot::Sender<Result<Ready>>,
}

impl Changefeeds {
    /// Commits one prepared create with whatever others are waiting; gives
    /// it back once created.
    pub(super) async fn create_grouped(&self, ready: Ready) -> Result<Ready> {
        let queue = self.creates.get_or_init(|| self.start_group_commit());
        let (reply, answer) = oneshot::channel();
        let wait = async {
            queue
                .send(Waiting { ready, reply })
                .await
                .map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Starts the task that commits the groups, on the runtime `new` was
    /// called on (else the current one). It ends when every clone of this
    /// `Changefeeds` is gone.
    fn start_group_commit(&self) -> Queue {
        let (tx, rx) = mpsc::channel(QUEUE);
        let feeds = Changefeeds {
            // The task's own handle must not keep its queue open.
            creates: Arc::default(),
            ..self.clone()
        };
        match &self.runtime {
            Some(runtime) => drop(runtime.spawn(commit_groups(feeds, rx))),
            None => drop(tokio::spawn(commit_groups(feeds, rx))),
        }
        tx
    }
}

fn stopped() -> Error {
    Error::Unavailable("the server is stopping".into())
}

async fn commit_groups(feeds: Changefeeds, mut rx: mpsc::Receiver<Waiting>) {
    let per_txn = (feeds.max_txn_ops / 2).max(1);
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    // A create of a changefeed already in the group waits for the next one
    // (etcd refuses a txn that puts a key twice).
    let mut carried: Vec<Waiting> = Vec::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut group = Vec::new();
        let mut ids: HashSet<ChangefeedId> = HashSet::new();
        let mut later = Vec::new();
        for waiting in carried.drain(..) {
            if group.len() < per_txn && ids.insert(waiting.ready.cf.clone()) {
                group.push(waiting);
            } else {
                later.push(waiting);
            }
        }
        carried = later;
        if group.is_empty() {
            match rx.recv().await {
                Some(waiting) => {
                    ids.insert(waiting.ready.cf.clone());
                    group.push(waiting);
                }
                None => return,
            }
        }
        while group.len() < per_txn {
            let Ok(waiting) = rx.try_recv() else { break };
            if ids.insert(waiting.ready.cf.clone()) {
                group.push(waiting);
            } else {
                carried.push(waiting);
            }
        }
        let feeds = feeds.clone();
        tokio::spawn(async move {
            let mut replies = Vec::with_capacity(group.len());
            let mut chunk = Vec::with_capacity(group.len());
            for (index, Waiting { mut ready, reply }) in group.into_iter().enumerate() {
                ready.index = index;
                chunk.push(ready);
                replies.push(Some(reply));
            }
            for (ready, result) in feeds.create_chunk(chunk).await {
                if let Some(reply) = replies[ready.index].take() {
                    // The create may have timed out meanwhile: nobody to tell.
                    let _ = reply.send(result.map(|()| ready));
                }
            }
            drop(permit);
        });
    }
}
