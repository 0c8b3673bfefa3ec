//! The [`Reactor`] trait: the logic a worker runs on every tick, and what a tick may
//! return besides success.

use super::ReactorState;

/// The logic that runs on every tick.
pub trait Reactor {
    type State: ReactorState;

    /// Looks at a consistent snapshot and queues patches on `state`.
    ///
    /// The snapshot always includes every write this worker committed before
    /// the tick. Returning [`Error::Finished`] commits the patches of
    /// this tick, then stops the worker cleanly.
    fn tick(&mut self, state: &mut Self::State) -> Result<(), Error>;
}

/// What a tick may return besides success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reactor is done: commit this tick's patches, then stop.
    #[error("reactor finished")]
    Finished,
    /// The reactor hit an error it cannot continue from; the worker stops
    /// without committing this tick's patches.
    #[error("reactor failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}
