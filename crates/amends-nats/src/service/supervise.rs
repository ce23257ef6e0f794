//! One partition's supervisor: its worker, restarted after a transient
//! error with a capped backoff, stopped for good on an integrity error, and
//! which errors are which.

use std::time::{Duration, Instant};

use amends_core::partition::Machine;
use amends_store::{Engine, PartitionStore};
use async_nats::jetstream;

use super::{Options, Status, Supervision};
use crate::Error;
use crate::lease::Guard;
use crate::topology::Topology;
use crate::worker;

/// How often a supervisor looks at the lease again while it is not valid.
const LEASE_WAIT: Duration = Duration::from_millis(50);

/// Whether a worker error must stop its partition for good: the log went
/// backwards or changed, a newer owner fenced this one out, or the worker
/// (or its topology) is misconfigured. Every other error (NATS, the
/// store, a panicked commit) is retried on a fresh store handle. The
/// service's and the lease's own errors never come from a worker; they
/// are classified by what they would mean there (a misconfiguration or a
/// lost lease stops, a failed request is retried).
pub fn is_fatal(error: &Error) -> bool {
    match error {
        Error::LogBehind { .. }
        | Error::LogChanged { .. }
        | Error::LogHole { .. }
        | Error::Fenced { .. }
        | Error::Misconfigured(_)
        // The topology's errors (a worker's used to be wrapped in one
        // variant, `Topology`, and were fatal).
        | Error::InvalidPrefix { .. }
        | Error::InvalidTopology { .. }
        | Error::Stream { .. }
        | Error::IncompatibleStream { .. }
        | Error::Meta { .. }
        | Error::CorruptMeta { .. }
        | Error::PartitionCountMismatch { .. }
        // The service's and the lease's.
        | Error::ServiceMisconfigured(_)
        | Error::StoreFailed { .. }
        | Error::AllStopped(_)
        | Error::LeaseLost { .. }
        | Error::LeaseTtlTooShort { .. } => true,
        Error::Store { .. }
        | Error::Nats { .. }
        | Error::Panicked { .. }
        | Error::ConsumerReset { .. }
        | Error::ConsumerGap { .. }
        | Error::ConsumerStalled { .. }
        | Error::StoreHandle(_)
        | Error::LeaseBucket { .. } => false,
    }
}

/// Whether a store error leaves the store's handle unusable (sled keeps
/// failing after an I/O error such as a full disk, even once space is
/// back): only reopening it, in a new process, mends it.
pub fn needs_reopen(error: &amends_store::Error) -> bool {
    matches!(error, amends_store::Error::Storage { .. })
}

/// The restart delay after `attempt` failures in a row (1-based):
/// `min * 2^(attempt-1)`, at most `max`.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let shift = attempt.saturating_sub(1).min(20);
    min.saturating_mul(1 << shift).min(max)
}

/// One partition's supervisor: runs its worker, restarting it after
/// transient failures, until a fatal one.
#[allow(clippy::too_many_arguments)] // an apply context is the restructuring's (issue 12)
pub(super) async fn supervise<E: Engine>(
    js: jetstream::Context,
    topology: Topology,
    store: E,
    machine: Machine,
    options: Options,
    status: Status<E::Partition>,
    index: usize,
    guard: Guard,
) -> Option<Error> {
    let p = machine.partition().get();
    let mut attempt = 0_u32;
    loop {
        // A process that may have lost the lease (it paused past the TTL)
        // claims nothing: the lease's keeper ends it if it did.
        while !guard.is_valid() {
            tokio::time::sleep(LEASE_WAIT).await;
        }
        let started = Instant::now();
        let error = match store.partition(machine.partition()) {
            Ok(partition) => {
                let before = partition.head().map(|h| h.clock.position).unwrap_or(0);
                status.set(index, Supervision::Running, attempt > 0);
                let stopped =
                    worker::run_partition(&js, &topology, machine, partition, options.worker).await;
                let error = match stopped {
                    Err(e) => e,
                    Ok(never) => match never {},
                };
                let after = status.stores[index]
                    .head()
                    .map(|h| h.clock.position)
                    .unwrap_or(0);
                // Progress, or a long run, means the last failure is over.
                if after > before || started.elapsed() > options.backoff_max {
                    attempt = 0;
                }
                error
            }
            Err(e) => Error::Store {
                partition: p,
                source: e,
            },
        };
        if let Error::Store { source, .. } = &error
            && needs_reopen(source)
        {
            tracing::error!(partition = p, %error, "the store failed; stopping the service so that a restart reopens it");
            status.set(
                index,
                Supervision::Stopped {
                    reason: format!("{error}; the process must restart to reopen the store"),
                },
                false,
            );
            return Some(Error::StoreFailed {
                partition: p,
                detail: error.to_string(),
            });
        }
        if is_fatal(&error) {
            tracing::error!(partition = p, %error, "partition stopped; it is not restarted until an operator looks");
            status.set(
                index,
                Supervision::Stopped {
                    reason: error.to_string(),
                },
                false,
            );
            return None;
        }
        attempt = attempt.saturating_add(1);
        let delay = backoff(attempt, options.backoff_min, options.backoff_max);
        tracing::warn!(partition = p, attempt, ?delay, %error, "partition worker failed; restarting");
        status.set(
            index,
            Supervision::Restarting {
                attempt,
                error: error.to_string(),
            },
            false,
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN};

    #[test]
    fn backoff_doubles_and_is_capped() {
        let delays: Vec<u64> = (1..=8)
            .map(|a| {
                let d = backoff(a, RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX);
                u64::try_from(d.as_millis()).expect("small")
            })
            .collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(
            backoff(u32::MAX, RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX),
            RESTART_BACKOFF_MAX
        );
    }
}
