//! What the service reports: each partition's [`Supervision`], read
//! through the shared [`Status`] handle, with its applied position read
//! live from the store.

use std::sync::{Arc, Mutex, PoisonError};

use amends_core::protocol::query;
use amends_store::{Partition, PartitionStore};

/// What a partition's supervisor is doing, with the error behind a
/// restart or a stop. The wire has only its name: [`query::PartitionState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Supervision {
    /// The worker runs (or is starting).
    Running,
    /// The worker stopped on a transient error and is restarted after a
    /// backoff; `attempt` counts the failures since it last made progress.
    Restarting {
        /// Failures in a row.
        attempt: u32,
        /// The last error, as text.
        error: String,
    },
    /// The worker stopped on an integrity error (the log went backwards, a
    /// misconfiguration) and is not restarted: an operator must look.
    Stopped {
        /// The error, as text.
        reason: String,
    },
}

/// One partition's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: u32,
    /// What its supervisor is doing.
    pub state: Supervision,
    /// The store's applied position (0 if it could not be read).
    pub applied_position: u64,
    /// How many times the worker was restarted since the service started.
    pub restarts: u64,
}

/// A snapshot of every partition's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    /// One entry per partition, in partition order.
    pub partitions: Vec<PartitionStatus>,
}

/// A shared handle on the service's status; cheap to clone. `P` is the
/// store of one partition (sled's by default).
#[derive(Debug, Clone)]
pub struct Status<P = Partition> {
    pub(super) states: Arc<Mutex<Vec<(Supervision, u64)>>>,
    pub(super) stores: Arc<[P]>,
}

impl<P: PartitionStore> Status<P> {
    /// Every partition of `stores` running, none restarted yet.
    pub(super) fn new(stores: Vec<P>) -> Status<P> {
        Status {
            states: Arc::new(Mutex::new(vec![(Supervision::Running, 0); stores.len()])),
            stores: stores.into(),
        }
    }

    /// The current status of every partition.
    pub fn snapshot(&self) -> ServiceStatus {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        ServiceStatus {
            partitions: states
                .iter()
                .zip(self.stores.iter())
                .map(|((state, restarts), store)| PartitionStatus {
                    partition: store.id().get(),
                    state: state.clone(),
                    applied_position: store.head().map(|h| h.clock.position).unwrap_or(0),
                    restarts: *restarts,
                })
                .collect(),
        }
    }

    pub(super) fn set(&self, index: usize, state: Supervision, restarted: bool) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = states.get_mut(index) {
            if let Some(store) = self.stores.get(index) {
                crate::metrics::partition_state(store.id(), wire_state(&state).0.name(), restarted);
            }
            slot.0 = state;
            if restarted {
                slot.1 = slot.1.saturating_add(1);
            }
        }
    }

    pub(super) fn is_stopped(&self, index: usize) -> bool {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(states.get(index), Some((Supervision::Stopped { .. }, _)))
    }
}

/// A partition state as the stats endpoint reports it (its name is one of
/// [`crate::metrics::STATES`]), and its error text, if it has one.
pub(super) fn wire_state(state: &Supervision) -> (query::PartitionState, Option<String>) {
    match state {
        Supervision::Running => (query::PartitionState::Running, None),
        Supervision::Restarting { error, .. } => {
            (query::PartitionState::Restarting, Some(error.clone()))
        }
        Supervision::Stopped { reason } => (query::PartitionState::Stopped, Some(reason.clone())),
    }
}
