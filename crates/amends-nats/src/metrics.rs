//! The metrics the workers and the service record, through the `metrics`
//! facade: nothing is exported until a process installs a recorder (the
//! `amends serve --metrics-addr` Prometheus endpoint does), and recording
//! without one costs next to nothing.
//!
//! Every metric is labelled `partition` (the partition number in decimal).
//! The counters without an outcome or reason label are registered at 0 for
//! every partition when the service starts (`register_partition`).
//! Counters count what happened in this process since it started; the
//! apology rate is `rate(amends_apologies_total)` over
//! `rate(amends_optimistic_total)`.
//!
//! | metric | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `amends_decisions_total` | counter | `outcome` (`confirmed`, `rejected`), `reason` (rejected only: the reason code) | operations decided: the decisions in a committed batch's outbox (first decisions only) |
//! | `amends_duplicates_total` | counter | | operations answered again with their recorded decision |
//! | `amends_conflicts_total` | counter | | op ids reused with another body (`op_id_conflict`, sent to the sender only) |
//! | `amends_op_ids_refused_total` | counter | `reason` | op ids refused to their sender only (`malformed`, `op_id_outside_window`) |
//! | `amends_optimistic_total` | counter | | decided operations that named an apology topic |
//! | `amends_apologies_total` | counter | | apologies published |
//! | `amends_dead_letters_total` | counter | | unreadable messages published to the dead-letter stream |
//! | `amends_batch_len` | histogram | | messages applied per store commit |
//! | `amends_commit_seconds` | histogram | | duration of one store commit (one atomic write and its flush) |
//! | `amends_publish_seconds` | histogram | | duration of publishing one batch's outbox, PubAcks included |
//! | `amends_applied_position` | gauge | | the store's applied position |
//! | `amends_lag` | gauge | | the requests stream's last sequence on the partition's subject minus the applied position |
//! | `amends_partition_state` | gauge | `state` (`running`, `restarting`, `stopped`) | 1 for the partition's current state, 0 for the others |
//! | `amends_partition_restarts_total` | counter | | worker restarts after a transient failure |
//! | `amends_fence_busy_total` | counter | | fenced decision writes refused as busy (error 10164: a clustered stream checks one fenced write per partition at a time) and sent again |

use std::collections::BTreeMap;
use std::time::Duration;

use amends_core::partition::{Answer, Effect, Input};
use amends_core::route::PartitionId;

/// Operations decided, by `outcome` and (when rejected) `reason`.
pub const DECISIONS: &str = "amends_decisions_total";
/// Operations answered again with their recorded decision.
pub const DUPLICATES: &str = "amends_duplicates_total";
/// Op ids reused with another body.
pub const CONFLICTS: &str = "amends_conflicts_total";
/// Op ids refused to their sender only, by `reason`.
pub const OP_IDS_REFUSED: &str = "amends_op_ids_refused_total";
/// Decided operations that named an apology topic.
pub const OPTIMISTIC: &str = "amends_optimistic_total";
/// Apologies published.
pub const APOLOGIES: &str = "amends_apologies_total";
/// Messages published to the dead-letter stream.
pub const DEAD_LETTERS: &str = "amends_dead_letters_total";
/// Messages applied per store commit.
pub const BATCH_LEN: &str = "amends_batch_len";
/// The duration of a store commit, in seconds.
pub const COMMIT_SECONDS: &str = "amends_commit_seconds";
/// The duration of publishing a batch's outbox, in seconds.
pub const PUBLISH_SECONDS: &str = "amends_publish_seconds";
/// The store's applied position.
pub const APPLIED_POSITION: &str = "amends_applied_position";
/// Last sequence on the partition's request subject minus the applied position.
pub const LAG: &str = "amends_lag";
/// 1 for the partition's current `state`, 0 for the others.
pub const PARTITION_STATE: &str = "amends_partition_state";
/// Worker restarts after a transient failure.
pub const PARTITION_RESTARTS: &str = "amends_partition_restarts_total";

/// Fenced decision writes refused as busy (error 10164) and sent again.
pub const FENCE_BUSY: &str = "amends_fence_busy_total";

/// The values of the `state` label of [`PARTITION_STATE`].
pub const STATES: [&str; 3] = ["running", "restarting", "stopped"];

/// Describes every metric (help text and unit) to the installed recorder;
/// call once after installing it.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(DECISIONS, "Operations decided, by outcome and reason.");
    describe_counter!(
        DUPLICATES,
        "Operations answered again with their recorded decision."
    );
    describe_counter!(CONFLICTS, "Op ids reused with another body.");
    describe_counter!(OP_IDS_REFUSED, "Op ids refused to their sender only.");
    describe_counter!(
        OPTIMISTIC,
        "Decided operations that named an apology topic."
    );
    describe_counter!(APOLOGIES, "Apologies published.");
    describe_counter!(DEAD_LETTERS, "Messages published as dead letters.");
    describe_histogram!(BATCH_LEN, Unit::Count, "Messages applied per store commit.");
    describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Duration of a store commit.");
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "Duration of publishing a batch's outbox."
    );
    describe_gauge!(APPLIED_POSITION, "The store's applied position.");
    describe_gauge!(
        LAG,
        "Last sequence of the partition's request subject minus the applied position."
    );
    describe_gauge!(
        PARTITION_STATE,
        "1 for the partition's current state, 0 for the others."
    );
    describe_counter!(PARTITION_RESTARTS, "Worker restarts after a failure.");
    describe_counter!(
        FENCE_BUSY,
        "Fenced decision writes refused as busy (10164) and sent again."
    );
}

fn label(partition: PartitionId) -> String {
    partition.get().to_string()
}

/// What one batch decided, tallied while it is applied and recorded only
/// once its commit succeeded (a batch that fails is applied again, and
/// must not count twice).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    confirmed: u64,
    rejected: BTreeMap<&'static str, u64>,
    duplicates: u64,
    conflicts: u64,
    refused: BTreeMap<&'static str, u64>,
    optimistic: u64,
    applied: u64,
}

impl Tally {
    /// Counts the answer to one applied message. Written with `if let`
    /// rather than a `match`, so that answers the core adds later (sagas)
    /// count as applied without breaking this.
    pub(crate) fn answer(&mut self, input: &Input, answer: &Answer) {
        let bump = |n: &mut u64| *n = n.saturating_add(1);
        bump(&mut self.applied);
        if let Answer::Decided(_) = answer
            && let Input::Request(request) = input
            && request.apology_topic.is_some()
        {
            bump(&mut self.optimistic);
        } else if let Answer::Duplicate(_) = answer {
            bump(&mut self.duplicates);
        } else if let Answer::Conflict(_) = answer {
            bump(&mut self.conflicts);
        } else if let Answer::Refused(decision) = answer {
            let code = decision.outcome.reason().map_or("none", |r| r.code());
            bump(self.refused.entry(code).or_default());
        }
    }

    /// Counts the new decisions among a batch's effects (every first
    /// decision is one, whatever message produced it).
    pub(crate) fn effects(&mut self, effects: &[Effect]) {
        for effect in effects {
            if let Effect::Decided(decision) = effect {
                if decision.outcome.is_confirmed() {
                    self.confirmed = self.confirmed.saturating_add(1);
                } else if let Some(reason) = decision.outcome.reason() {
                    let n = self.rejected.entry(reason.code()).or_default();
                    *n = n.saturating_add(1);
                }
            }
        }
    }

    /// Records the tally of a committed batch, its commit's duration and
    /// the applied position after it (`None`: the batch applied nothing new).
    pub(crate) fn committed(
        &self,
        partition: PartitionId,
        elapsed: Duration,
        position: Option<u64>,
    ) {
        let p = label(partition);
        if self.confirmed > 0 {
            metrics::counter!(DECISIONS, "partition" => p.clone(), "outcome" => "confirmed")
                .increment(self.confirmed);
        }
        for (code, n) in &self.rejected {
            metrics::counter!(DECISIONS, "partition" => p.clone(), "outcome" => "rejected", "reason" => *code)
                .increment(*n);
        }
        for (code, n) in &self.refused {
            metrics::counter!(OP_IDS_REFUSED, "partition" => p.clone(), "reason" => *code)
                .increment(*n);
        }
        for (name, n) in [
            (DUPLICATES, self.duplicates),
            (CONFLICTS, self.conflicts),
            (OPTIMISTIC, self.optimistic),
        ] {
            if n > 0 {
                metrics::counter!(name, "partition" => p.clone()).increment(n);
            }
        }
        metrics::histogram!(BATCH_LEN, "partition" => p.clone()).record(u64_f64(self.applied));
        metrics::histogram!(COMMIT_SECONDS, "partition" => p.clone()).record(elapsed.as_secs_f64());
        if let Some(position) = position {
            metrics::gauge!(APPLIED_POSITION, "partition" => p).set(u64_f64(position));
        }
    }
}

/// Records a batch's published outbox: the publish duration and the
/// apologies and dead letters among the effects.
pub(crate) fn published(partition: PartitionId, effects: &[Effect], elapsed: Duration) {
    let p = label(partition);
    let count = |kind: fn(&Effect) -> bool| {
        u64::try_from(effects.iter().filter(|e| kind(e)).count()).unwrap_or(u64::MAX)
    };
    for (name, n) in [
        (APOLOGIES, count(|e| matches!(e, Effect::Apology(_)))),
        (DEAD_LETTERS, count(|e| matches!(e, Effect::DeadLetter(_)))),
    ] {
        if n > 0 {
            metrics::counter!(name, "partition" => p.clone()).increment(n);
        }
    }
    metrics::histogram!(PUBLISH_SECONDS, "partition" => p).record(elapsed.as_secs_f64());
}

/// Records a partition's state (one of [`STATES`]) and, if it was just
/// restarted, the restart.
pub(crate) fn partition_state(partition: PartitionId, state: &str, restarted: bool) {
    let p = label(partition);
    for s in STATES {
        let value = if s == state { 1.0 } else { 0.0 };
        metrics::gauge!(PARTITION_STATE, "partition" => p.clone(), "state" => s).set(value);
    }
    if restarted {
        metrics::counter!(PARTITION_RESTARTS, "partition" => p).increment(1);
    }
}

/// Registers the counters of `partition` at zero, so that each is
/// exported from the start (a rate over a series that appears only at
/// its first event misses that event, and an absent series looks like a
/// broken exporter). Labelled counters (by outcome or reason) appear with
/// their first label value.
pub(crate) fn register_partition(partition: PartitionId) {
    let p = label(partition);
    for name in [
        DUPLICATES,
        CONFLICTS,
        OPTIMISTIC,
        APOLOGIES,
        DEAD_LETTERS,
        PARTITION_RESTARTS,
        FENCE_BUSY,
    ] {
        metrics::counter!(name, "partition" => p.clone()).increment(0);
    }
    metrics::counter!(DECISIONS, "partition" => p, "outcome" => "confirmed").increment(0);
}

/// Records a fenced decision write refused as busy, to be sent again.
pub(crate) fn fence_busy(partition: PartitionId) {
    metrics::counter!(FENCE_BUSY, "partition" => label(partition)).increment(1);
}

/// Records a partition's applied position and lag.
pub(crate) fn position(partition: PartitionId, applied: u64, lag: u64) {
    let p = label(partition);
    metrics::gauge!(APPLIED_POSITION, "partition" => p.clone()).set(u64_f64(applied));
    metrics::gauge!(LAG, "partition" => p).set(u64_f64(lag));
}

/// A count as a metric value. Exact up to 2^53; beyond that the nearest
/// double, which is what a gauge or histogram can hold anyway.
fn u64_f64(n: u64) -> f64 {
    // No lossless `From<u64> for f64`; go through u32 halves.
    let high = f64::from(u32::try_from(n >> 32).unwrap_or(u32::MAX));
    let low = f64::from(u32::try_from(n & 0xffff_ffff).unwrap_or(u32::MAX));
    high * 4_294_967_296.0 + low
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_convert_to_doubles_exactly_below_2_pow_53() {
        // Proves the u64 -> f64 conversion used for gauges without `as`.
        for n in [0, 1, 4_294_967_295, 4_294_967_296, 1 << 40, (1 << 53) - 1] {
            assert_eq!(u64_f64(n).to_string(), n.to_string(), "{n}");
        }
        assert_eq!(u64_f64(u64::MAX), 18_446_744_073_709_551_615.0);
    }
}
