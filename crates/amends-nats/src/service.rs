//! The service: the supervisor of one process that serves every partition
//! of a deployment.
//!
//! ```text
//! per partition: loop { run_partition } -- transient error -> backoff, restart
//!                                       -- integrity error -> Stopped (loud), never restarted
//! ticks:         every tick_interval, a tick to each running partition with a hold due
//! compaction:    every compact_interval, Partition::compact on a blocking thread
//! status:        <prefix>.status.* (queue group amends-status): what a partition knows of an op id
//! ```
//!
//! [`Service::run`] runs until every partition has stopped (then it returns
//! [`Error::AllStopped`]) or until it is dropped: everything it spawned lives
//! in a [`JoinSet`] that aborts its tasks when dropped, so dropping (or
//! aborting) the future stops every worker, the ticker and the compactor.
//! Every worker await is a safe point to stop (see [`worker`]).
//!
//! What it reports lives in a [`Status`] handle ([`Service::status`]): each
//! partition's [`PartitionState`] and its applied position, read live from
//! the store.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amends_core::id::OpId;
use amends_core::partition::{Config, Machine};
use amends_core::route::PartitionId;
use amends_core::state::Read;
use amends_store::{Partition, Store};
use async_nats::HeaderMap;
use async_nats::jetstream;
use tokio::task::JoinSet;

use crate::topology::{Topology, header};
use crate::worker;

/// The first restart delay of a worker that stopped on a transient error.
/// Short: a lost connection usually comes back within a few hundred
/// milliseconds (the client reconnects on its own).
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// The longest restart delay: the delay doubles on every failed attempt up
/// to this, so a server that is down for long is retried every 2 s, not in
/// a tight loop, and a recovered one is found within 2 s.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The default tick interval. A hold expires at the first message whose log
/// time reaches its expiry; on an idle partition that message is a tick, so
/// this bounds how late (in wall time) an expiry is seen: about one second,
/// which is finer than any sensible hold timeout, while costing at most one
/// small log message per second per partition, and only while a hold is due.
pub const TICK_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

/// The default compaction interval. A pass reads every dedup and hold
/// record of a partition, so it is not run often; records outlive the
/// dedup retention (24 hours by default) by at most this much.
pub const COMPACT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5 * 60);

/// The service's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Each partition worker's settings.
    pub worker: worker::Options,
    /// How often ticks are considered (see [`TICK_INTERVAL_DEFAULT`]).
    pub tick_interval: Duration,
    /// How often each partition is compacted.
    pub compact_interval: Duration,
    /// The first restart delay after a transient failure.
    pub backoff_min: Duration,
    /// The longest restart delay.
    pub backoff_max: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            worker: worker::Options::default(),
            tick_interval: TICK_INTERVAL_DEFAULT,
            compact_interval: COMPACT_INTERVAL_DEFAULT,
            backoff_min: RESTART_BACKOFF_MIN,
            backoff_max: RESTART_BACKOFF_MAX,
        }
    }
}

/// Why the service could not start, or why it returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topology is invalid, or the store has another partition count.
    #[error("service misconfigured: {0}")]
    Misconfigured(String),
    /// The store could not hand out a partition.
    #[error("store: {0}")]
    Store(#[from] amends_store::Error),
    /// Every partition stopped on an integrity error; see [`Status`].
    #[error("every partition stopped: {0}")]
    AllStopped(String),
}

/// What a partition's supervisor is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionState {
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
    pub state: PartitionState,
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

/// A shared handle on the service's status; cheap to clone.
#[derive(Debug, Clone)]
pub struct Status {
    states: Arc<Mutex<Vec<(PartitionState, u64)>>>,
    stores: Arc<[Partition]>,
}

impl Status {
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

    fn set(&self, index: usize, state: PartitionState, restarted: bool) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = states.get_mut(index) {
            slot.0 = state;
            if restarted {
                slot.1 = slot.1.saturating_add(1);
            }
        }
    }

    fn is_stopped(&self, index: usize) -> bool {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(states.get(index), Some((PartitionState::Stopped { .. }, _)))
    }
}

/// The supervisor of every partition of a deployment in one process.
#[derive(Debug)]
pub struct Service {
    js: jetstream::Context,
    topology: Topology,
    store: Store,
    config: Config,
    options: Options,
    status: Status,
}

impl Service {
    /// Checks the settings and prepares the service; nothing runs until
    /// [`Service::run`]. The topology's streams must exist
    /// ([`crate::topology::ensure`]).
    pub fn new(
        js: &jetstream::Context,
        topology: &Topology,
        store: &Store,
        config: Config,
        options: Options,
    ) -> Result<Service, Error> {
        topology
            .validate()
            .map_err(|e| Error::Misconfigured(e.to_string()))?;
        if store.partitions() != topology.partitions {
            return Err(Error::Misconfigured(format!(
                "the store has {} partitions, the topology {}",
                store.partitions().get(),
                topology.partitions.get()
            )));
        }
        let stores: Vec<Partition> = topology
            .partitions
            .ids()
            .map(|id| store.partition(id))
            .collect::<Result<_, _>>()?;
        let status = Status {
            states: Arc::new(Mutex::new(vec![(PartitionState::Running, 0); stores.len()])),
            stores: stores.into(),
        };
        Ok(Service {
            js: js.clone(),
            topology: topology.clone(),
            store: store.clone(),
            config,
            options,
            status,
        })
    }

    /// The status handle.
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Runs every partition until all have stopped (see the module docs).
    /// Drop the future to stop the service.
    pub async fn run(self) -> Result<Infallible, Error> {
        let Service {
            js,
            topology,
            store,
            config,
            options,
            status,
        } = self;
        let mut workers = JoinSet::new();
        for (index, id) in topology.partitions.ids().enumerate() {
            workers.spawn(supervise(
                js.clone(),
                topology.clone(),
                store.clone(),
                Machine::new(id, config),
                options,
                status.clone(),
                index,
            ));
        }
        let mut background = JoinSet::new();
        background.spawn(tick(js.clone(), topology.clone(), options, status.clone()));
        background.spawn(compact(config, options, status.clone()));
        background.spawn(serve_status(
            js.client(),
            topology.clone(),
            config,
            status.clone(),
        ));
        while workers.join_next().await.is_some() {}
        let reasons: Vec<String> = status
            .snapshot()
            .partitions
            .into_iter()
            .map(|p| format!("partition {}: {:?}", p.partition, p.state))
            .collect();
        Err(Error::AllStopped(reasons.join("; ")))
    }
}

/// Runs a service over every partition: [`Service::new`] then
/// [`Service::run`]. Use [`Service`] directly to watch its [`Status`].
pub async fn run(
    js: &jetstream::Context,
    topology: &Topology,
    store: &Store,
    config: Config,
    options: Options,
) -> Result<Infallible, Error> {
    Service::new(js, topology, store, config, options)?
        .run()
        .await
}

/// Whether a worker error must stop its partition for good: the log went
/// backwards or the worker is misconfigured. Every other error (NATS, the
/// store, a panicked commit) is retried on a fresh store handle.
pub fn is_fatal(error: &worker::Error) -> bool {
    matches!(
        error,
        worker::Error::LogBehind { .. }
            | worker::Error::Misconfigured(_)
            | worker::Error::Topology(_)
    )
}

/// The restart delay after `attempt` failures in a row (1-based):
/// `min * 2^(attempt-1)`, at most `max`.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let shift = attempt.saturating_sub(1).min(20);
    min.saturating_mul(1 << shift).min(max)
}

/// One partition's supervisor: runs its worker, restarting it after
/// transient failures, until a fatal one.
async fn supervise(
    js: jetstream::Context,
    topology: Topology,
    store: Store,
    machine: Machine,
    options: Options,
    status: Status,
    index: usize,
) {
    let p = machine.partition().get();
    let mut attempt = 0_u32;
    loop {
        let started = Instant::now();
        let error = match store.partition(machine.partition()) {
            Ok(partition) => {
                let before = partition.head().map(|h| h.clock.position).unwrap_or(0);
                status.set(index, PartitionState::Running, attempt > 0);
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
            Err(e) => worker::Error::Store {
                partition: p,
                source: e,
            },
        };
        if is_fatal(&error) {
            tracing::error!(partition = p, %error, "partition stopped; it is not restarted until an operator looks");
            status.set(
                index,
                PartitionState::Stopped {
                    reason: error.to_string(),
                },
                false,
            );
            return;
        }
        attempt = attempt.saturating_add(1);
        let delay = backoff(attempt, options.backoff_min, options.backoff_max);
        tracing::warn!(partition = p, attempt, ?delay, %error, "partition worker failed; restarting");
        status.set(
            index,
            PartitionState::Restarting {
                attempt,
                error: error.to_string(),
            },
            false,
        );
        tokio::time::sleep(delay).await;
    }
}

/// Ticks: every interval, a tick to each partition that is not stopped and
/// has a hold due by the wall clock (its first expiry at or before now).
/// Partitions without a due hold get nothing, so ticks do not grow an idle
/// log. The wall clock here and the server's (log time) may differ: a tick
/// sent early changes nothing and the next one follows an interval later.
async fn tick(js: jetstream::Context, topology: Topology, options: Options, status: Status) {
    let mut interval = tokio::time::interval(options.tick_interval.max(Duration::from_millis(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let stores = Arc::clone(&status.stores);
        let now = unix_ms();
        let due = tokio::task::spawn_blocking(move || {
            stores
                .iter()
                .map(|s| s.expiry_after(None).is_some_and(|e| e.at_ms <= now))
                .collect::<Vec<bool>>()
        })
        .await
        .unwrap_or_default();
        let mut acks = Vec::new();
        for (index, id) in topology.partitions.ids().enumerate() {
            if !due.get(index).copied().unwrap_or(false) || status.is_stopped(index) {
                continue;
            }
            match publish_tick(&js, &topology, id).await {
                Ok(ack) => acks.push((id, ack)),
                Err(e) => tracing::debug!(partition = id.get(), error = %e, "tick not published"),
            }
        }
        for (id, ack) in acks {
            if let Err(e) = ack.await {
                tracing::debug!(partition = id.get(), error = %e, "tick not acknowledged");
            }
        }
    }
}

/// The `Nats-Msg-Id` of a tick: `tick-<p>-<v7 id>`, unique per tick.
pub fn tick_msg_id(partition: PartitionId, op_id: OpId) -> String {
    format!("tick-{partition}-{}", op_id)
}

async fn publish_tick(
    js: &jetstream::Context,
    topology: &Topology,
    id: PartitionId,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = unix_ms();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let rand = (u128::from(std::process::id()) << 96) | (u128::from(nanos) << 64) | u128::from(n);
    let op_id = OpId::v7_from_parts(now, rand);
    let body = format!(r#"{{"op_id":"{}","command":{{"type":"tick"}}}}"#, op_id);
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, tick_msg_id(id, op_id).as_str());
    js.publish_with_headers(topology.prefix.req(id), headers, body.into())
        .await
}

/// Compaction: every interval, each partition that is not stopped is
/// compacted at the horizon of its applied log time, on a blocking thread.
async fn compact(config: Config, options: Options, status: Status) {
    let period = options.compact_interval.max(Duration::from_millis(1));
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        for index in 0..status.stores.len() {
            if status.is_stopped(index) {
                continue;
            }
            let store = status.stores[index].clone();
            let p = store.id().get();
            let done = tokio::task::spawn_blocking(move || {
                let clock = store.head()?.clock;
                store.compact(config.compaction_horizon_ms(clock.log_time_ms))
            })
            .await;
            match done {
                Ok(Ok(c)) => tracing::debug!(partition = p, ?c, "compacted"),
                Ok(Err(e)) => tracing::warn!(partition = p, error = %e, "compaction failed"),
                Err(e) => tracing::warn!(partition = p, error = %e, "compaction panicked"),
            }
        }
    }
}

/// The queue group of the status endpoint: several processes serving the
/// same deployment share its requests.
pub const STATUS_QUEUE_GROUP: &str = "amends-status";

/// The status endpoint: answers each request on `<prefix>.status.<p>` (body:
/// an op id in canonical text) with what partition `p` knows of the op:
/// `{"status":"decided","decision":...}`, `{"status":"unknown"}`, or
/// `{"status":"error","detail":...}` for a bad request. A record past the
/// compaction horizon is unknown, as it is to the core. If the subscription
/// fails or ends, it is made again after a backoff.
async fn serve_status(
    nats: async_nats::Client,
    topology: Topology,
    config: Config,
    status: Status,
) {
    use futures_util::StreamExt;
    let subject = topology.prefix.status_wildcard();
    loop {
        match nats
            .queue_subscribe(subject.clone(), STATUS_QUEUE_GROUP.to_owned())
            .await
        {
            Ok(mut sub) => {
                while let Some(msg) = sub.next().await {
                    let Some(reply) = msg.reply.clone() else {
                        continue;
                    };
                    let answer = status_answer(&topology, config, &status, &msg).await;
                    let body = serde_json::to_vec(&answer).unwrap_or_default();
                    if let Err(e) = nats.publish(reply, body.into()).await {
                        tracing::debug!(error = %e, "status reply not sent");
                    }
                }
                tracing::warn!("status subscription ended; subscribing again");
            }
            Err(e) => tracing::warn!(error = %e, "status subscription failed; retrying"),
        }
        tokio::time::sleep(RESTART_BACKOFF_MAX).await;
    }
}

/// The reply to one status request.
async fn status_answer(
    topology: &Topology,
    config: Config,
    status: &Status,
    msg: &async_nats::Message,
) -> serde_json::Value {
    use serde_json::json;
    let error = |detail: String| json!({"status": "error", "detail": detail});
    let p = msg
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .and_then(|t| t.parse::<u32>().ok())
        .and_then(|p| topology.partitions.id(p));
    let Some(p) = p else {
        return error(format!("{} names no partition", msg.subject));
    };
    let Some(store) = status.stores.iter().find(|s| s.id() == p).cloned() else {
        return error(format!("partition {p} is not served here"));
    };
    let text = match std::str::from_utf8(&msg.payload) {
        Ok(text) => text,
        Err(_) => return error("the body is not UTF-8".to_owned()),
    };
    let op_id = match text.parse::<OpId>() {
        Ok(op_id) if op_id.to_string() == text => op_id,
        _ => return error(format!("{text:?} is not an op id in canonical text")),
    };
    let found = tokio::task::spawn_blocking(move || {
        let horizon_ms = config.compaction_horizon_ms(store.clock().log_time_ms);
        store.dedup(op_id).filter(|d| !d.is_compactable(horizon_ms))
    })
    .await;
    match found {
        Ok(Some(dedup)) => json!({"status": "decided", "decision": dedup.decision}),
        Ok(None) => json!({"status": "unknown"}),
        Err(e) => error(format!("the lookup failed: {e}")),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
