//! The service: the supervisor of one process that serves every partition
//! of a deployment.
//!
//! ```text
//! per partition: loop { run_partition } -- transient error -> backoff, restart
//!                                       -- integrity error -> Stopped (loud), never restarted
//! ticks:         every tick_interval, a tick to each running partition with a hold due
//! compaction:    every compact_interval, Partition::compact on a blocking thread
//! endpoints:     the NATS micro service `amends`, answering from the store:
//!                <prefix>.status.*        (queue group amends-status): what a partition knows of an op id
//!                <prefix>.query.balance.* (queue group amends-query): an account's balance, holds, limits
//!                <prefix>.query.claim.*   (queue group amends-query): the owner of a claim
//!                <prefix>.stats.*         (queue group amends-query): applied position, lag, state
//! gauges:        every gauge_interval, each partition's applied position and lag (crate::metrics)
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

use crate::lease::Guard;
use crate::topology::{Stream, Topology, header};
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

/// The default refresh interval of the per-partition gauges (applied
/// position, lag; see [`crate::metrics`]). Each refresh reads one message
/// per partition from the requests stream; a Prometheus scrape every 15 s
/// or so needs nothing finer.
pub const GAUGE_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

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
    /// How often the applied position and lag gauges are refreshed.
    pub gauge_interval: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            worker: worker::Options::default(),
            tick_interval: TICK_INTERVAL_DEFAULT,
            compact_interval: COMPACT_INTERVAL_DEFAULT,
            backoff_min: RESTART_BACKOFF_MIN,
            backoff_max: RESTART_BACKOFF_MAX,
            gauge_interval: GAUGE_INTERVAL_DEFAULT,
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
    /// The store failed in a way that only reopening it can mend (an I/O
    /// error such as a full disk: sled's handle keeps failing after one):
    /// the service stops, so that the process exits and a process
    /// supervisor starts it again, reopening the store.
    #[error("partition {partition}: {detail}; the store must be reopened: stopping the service")]
    StoreFailed {
        /// The partition whose commit or read failed.
        partition: u32,
        /// The error.
        detail: String,
    },
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
            if let Some(store) = self.stores.get(index) {
                crate::metrics::partition_state(store.id(), state_name(&state).0, restarted);
            }
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
    /// Asked before every (re)start of a worker: only the lease holder
    /// may claim a partition (see [`crate::lease`]).
    guard: Guard,
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
            guard: Guard::always(),
        })
    }

    /// Starts workers only while `guard` is valid (the deployment lease
    /// is held); without it they always start.
    pub fn with_guard(mut self, guard: Guard) -> Service {
        self.guard = guard;
        self
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
            guard,
        } = self;
        let mut workers = JoinSet::new();
        for (index, id) in topology.partitions.ids().enumerate() {
            workers.spawn(supervise(
                js.clone(),
                topology.clone(),
                store.clone(),
                Machine::new(id, topology.partitions, config),
                options,
                status.clone(),
                index,
                guard.clone(),
            ));
        }
        let mut background = JoinSet::new();
        background.spawn(tick(js.clone(), topology.clone(), options, status.clone()));
        background.spawn(compact(config, options, status.clone()));
        background.spawn(serve_endpoints(
            js.clone(),
            topology.clone(),
            config,
            status.clone(),
        ));
        for id in topology.partitions.ids() {
            crate::metrics::register_partition(id);
            crate::metrics::partition_state(id, "running", false);
        }
        background.spawn(gauges(
            js.clone(),
            topology.clone(),
            options,
            status.clone(),
        ));
        while let Some(ended) = workers.join_next().await {
            // Dropping the set aborts the other workers; their commits in
            // flight end on the blocking pool, and the store reopened by the
            // next process resumes from what is durable.
            if let Ok(Some(failed)) = ended {
                return Err(failed);
            }
        }
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

/// How often a supervisor looks at the lease again while it is not valid.
const LEASE_WAIT: Duration = Duration::from_millis(50);

/// Whether a worker error must stop its partition for good: the log went
/// backwards or changed, a newer owner fenced this one out, or the worker
/// is misconfigured. Every other error (NATS, the
/// store, a panicked commit) is retried on a fresh store handle.
pub fn is_fatal(error: &worker::Error) -> bool {
    matches!(
        error,
        worker::Error::LogBehind { .. }
            | worker::Error::LogChanged { .. }
            | worker::Error::LogHole { .. }
            | worker::Error::Fenced { .. }
            | worker::Error::Misconfigured(_)
            | worker::Error::Topology(_)
    )
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
async fn supervise(
    js: jetstream::Context,
    topology: Topology,
    store: Store,
    machine: Machine,
    options: Options,
    status: Status,
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
        if let worker::Error::Store { source, .. } = &error
            && needs_reopen(source)
        {
            tracing::error!(partition = p, %error, "the store failed; stopping the service so that a restart reopens it");
            status.set(
                index,
                PartitionState::Stopped {
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
                PartitionState::Stopped {
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
                .map(|s| matches!(s.expiry_after(None), Ok(Some(e)) if e.at_ms <= now))
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

/// The name of the NATS micro service the endpoints form (`$SRV.PING.amends`,
/// `$SRV.INFO.amends`, `$SRV.STATS.amends` answer for it); its version is
/// this crate's.
pub const SERVICE_NAME: &str = "amends";

/// The queue group of the status endpoint: several processes serving the
/// same deployment share its requests.
pub const STATUS_QUEUE_GROUP: &str = "amends-status";

/// The queue group of the balance and claim queries and the stats
/// endpoint.
pub const QUERY_QUEUE_GROUP: &str = "amends-query";

/// The most requests one endpoint answers at once. Each answer is a few
/// store reads on a blocking thread (a stream lookup for stats), so a
/// burst of queries is served in parallel but cannot pile up unbounded
/// work.
pub const ENDPOINT_CONCURRENCY_MAX: usize = 64;

/// One request-reply endpoint of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `<prefix>.status.<p>`: what a partition knows of an op id.
    Status,
    /// `<prefix>.query.balance.<p>`: an account's balance.
    Balance,
    /// `<prefix>.query.claim.<p>`: the owner of a claim.
    Claim,
    /// `<prefix>.stats.<p>`: a partition's position, lag and state.
    Stats,
}

impl Endpoint {
    const ALL: [Endpoint; 4] = [
        Endpoint::Status,
        Endpoint::Balance,
        Endpoint::Claim,
        Endpoint::Stats,
    ];

    fn name(self) -> &'static str {
        match self {
            Endpoint::Status => "status",
            Endpoint::Balance => "balance",
            Endpoint::Claim => "claim",
            Endpoint::Stats => "stats",
        }
    }

    fn subject(self, topology: &Topology) -> String {
        match self {
            Endpoint::Status => topology.prefix.status_wildcard(),
            Endpoint::Balance => topology.prefix.query_balance_wildcard(),
            Endpoint::Claim => topology.prefix.query_claim_wildcard(),
            Endpoint::Stats => topology.prefix.stats_wildcard(),
        }
    }

    fn queue_group(self) -> &'static str {
        match self {
            Endpoint::Status => STATUS_QUEUE_GROUP,
            Endpoint::Balance | Endpoint::Claim | Endpoint::Stats => QUERY_QUEUE_GROUP,
        }
    }
}

/// What the endpoints answer from.
struct Answers {
    js: jetstream::Context,
    topology: Topology,
    config: Config,
    status: Status,
}

/// Stops the micro service (its `$SRV` verb handler) when dropped: the
/// endpoints' own subscriptions end with their tasks.
struct StopOnDrop(Option<async_nats::service::Service>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(service) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = service.stop().await;
            });
        }
    }
}

/// The request-reply endpoints, as the NATS micro service [`SERVICE_NAME`]:
/// each endpoint keeps its protocol subject (`<prefix>.status.*`,
/// `<prefix>.query.balance.*`, `<prefix>.query.claim.*`,
/// `<prefix>.stats.*`) and its queue group ([`STATUS_QUEUE_GROUP`],
/// [`QUERY_QUEUE_GROUP`]). Every reply is JSON; a bad request gets
/// `{"status":"error","detail":...}`. If the service cannot start or an
/// endpoint ends, it is started again after a backoff.
async fn serve_endpoints(
    js: jetstream::Context,
    topology: Topology,
    config: Config,
    status: Status,
) {
    use async_nats::service::ServiceExt as _;
    use futures_util::StreamExt as _;
    let answers = Arc::new(Answers {
        js: js.clone(),
        topology,
        config,
        status,
    });
    loop {
        let metadata = std::collections::HashMap::from([
            ("prefix".to_owned(), answers.topology.prefix.to_string()),
            (
                "partitions".to_owned(),
                answers.topology.partitions.get().to_string(),
            ),
            (
                "instance".to_owned(),
                format!("{}:{}", worker::hostname(), std::process::id()),
            ),
        ]);
        let started = js
            .client()
            .service_builder()
            .description("amends: status of an op id, balance and claim queries, partition stats")
            .metadata(metadata)
            .queue_group(QUERY_QUEUE_GROUP)
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await;
        match started {
            Ok(service) => {
                let mut tasks = JoinSet::new();
                let mut failed = None;
                for endpoint in Endpoint::ALL {
                    let added = service
                        .endpoint_builder()
                        .name(endpoint.name())
                        .queue_group(endpoint.queue_group())
                        .add(endpoint.subject(&answers.topology))
                        .await;
                    let requests = match added {
                        Ok(requests) => requests,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    };
                    let answers = Arc::clone(&answers);
                    tasks.spawn(requests.for_each_concurrent(
                        ENDPOINT_CONCURRENCY_MAX,
                        move |request| {
                            let answers = Arc::clone(&answers);
                            async move {
                                let answer = answers.answer(endpoint, &request.message).await;
                                let body = serde_json::to_vec(&answer).unwrap_or_default();
                                if let Err(e) = request.respond(Ok(body.into())).await {
                                    tracing::debug!(endpoint = endpoint.name(), error = %e, "reply not sent");
                                }
                            }
                        },
                    ));
                }
                let _stop = StopOnDrop(Some(service));
                match failed {
                    Some(e) => {
                        tracing::warn!(error = %e, "an endpoint could not subscribe; retrying")
                    }
                    None => {
                        tasks.join_next().await;
                        tracing::warn!(
                            "an endpoint subscription ended; starting the endpoints again"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "the endpoints could not start; retrying"),
        }
        tokio::time::sleep(RESTART_BACKOFF_MAX).await;
    }
}

/// `{"status":"error","detail":...}`: the answer to a bad request.
fn error_answer(detail: impl Into<String>) -> serde_json::Value {
    serde_json::json!({"status": "error", "detail": detail.into()})
}

impl Answers {
    /// The reply to one request on `endpoint`.
    async fn answer(&self, endpoint: Endpoint, msg: &async_nats::Message) -> serde_json::Value {
        let found = self.partition(msg).and_then(|(index, store)| {
            let text = std::str::from_utf8(&msg.payload)
                .map_err(|_| error_answer("the body is not UTF-8"))?;
            Ok((index, store, text))
        });
        let (index, store, text) = match found {
            Ok(found) => found,
            Err(answer) => return answer,
        };
        let answer = match endpoint {
            Endpoint::Status => self.op_status(store, text).await,
            Endpoint::Balance => self.balance(store, text).await,
            Endpoint::Claim => self.claim(store, text).await,
            Endpoint::Stats => Ok(self.stats(index, store).await),
        };
        answer.unwrap_or_else(|answer| answer)
    }

    /// The partition a request's subject names (its last token), and its
    /// store.
    fn partition(
        &self,
        msg: &async_nats::Message,
    ) -> Result<(usize, Partition), serde_json::Value> {
        let p = msg
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u32>().ok())
            .and_then(|p| self.topology.partitions.id(p))
            .ok_or_else(|| error_answer(format!("{} names no partition", msg.subject)))?;
        self.status
            .stores
            .iter()
            .enumerate()
            .find(|(_, s)| s.id() == p)
            .map(|(index, store)| (index, store.clone()))
            .ok_or_else(|| error_answer(format!("partition {p} is not served here")))
    }

    /// Refuses a routing key that another partition owns: the client asked
    /// the wrong partition (for example with a wrong partition count).
    fn check_owner(
        &self,
        store: &Partition,
        routing_key: &str,
        what: &str,
    ) -> Result<(), serde_json::Value> {
        let owner = amends_core::route::partition_of(routing_key, self.topology.partitions);
        if owner == store.id() {
            Ok(())
        } else {
            Err(error_answer(format!(
                "{what} belongs to partition {owner}, not {}",
                store.id()
            )))
        }
    }

    /// The status endpoint: `{"status":"decided","decision":...}` or
    /// `{"status":"unknown"}`. A record past the compaction horizon is
    /// unknown, as it is to the core.
    async fn op_status(
        &self,
        store: Partition,
        text: &str,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use serde_json::json;
        let op_id = match text.parse::<OpId>() {
            Ok(op_id) if op_id.to_string() == text => op_id,
            _ => {
                return Err(error_answer(format!(
                    "{text:?} is not an op id in canonical text"
                )));
            }
        };
        let config = self.config;
        let read = tokio::task::spawn_blocking(move || {
            let horizon_ms = config.compaction_horizon_ms(store.clock()?.log_time_ms);
            let found = store.dedup(op_id)?;
            Ok(found.filter(|d| !d.is_compactable(horizon_ms)))
        })
        .await;
        Ok(match lookup(read)? {
            Some(dedup) => json!({"status": "decided", "decision": dedup.decision}),
            None => json!({"status": "unknown"}),
        })
    }

    /// The balance query (body: an account id): `{"status":"found",
    /// "account", "balance", "held", "incoming" (credits reserved by sagas
    /// in flight), "available", "floor", "ceiling",
    /// "position", "log_time_ms"}` or `{"status":"unknown", "position",
    /// "log_time_ms"}`. The position is read first, so the account is as
    /// of that position or later. Pending holds are not listed: the store
    /// keeps holds by op id with no index by account, and listing them
    /// would scan every hold of the partition.
    async fn balance(
        &self,
        store: Partition,
        text: &str,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use serde_json::json;
        let account = amends_core::command::AccountId::new(text)
            .map_err(|e| error_answer(format!("{text:?} is not an account id: {e}")))?;
        self.check_owner(&store, account.as_str(), &format!("account {text:?}"))?;
        let read = tokio::task::spawn_blocking(move || {
            let clock = store.clock()?;
            Ok((clock, store.account(account.as_str())?, account))
        })
        .await;
        let (clock, found, account) = lookup(read)?;
        Ok(match found {
            Some(a) => json!({
                "status": "found",
                "account": account.as_str(),
                "balance": a.balance,
                "held": a.held,
                "incoming": a.incoming,
                "available": a.available(),
                "floor": a.floor,
                "ceiling": a.ceiling,
                "position": clock.position,
                "log_time_ms": clock.log_time_ms,
            }),
            None => json!({
                "status": "unknown",
                "position": clock.position,
                "log_time_ms": clock.log_time_ms,
            }),
        })
    }

    /// The claim query (body: `{"namespace":...,"key":...}`):
    /// `{"status":"claimed","owner",...}` or `{"status":"free",...}`, with
    /// the position and log time they were read at.
    async fn claim(
        &self,
        store: Partition,
        text: &str,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use amends_core::command::{ClaimKey, Namespace};
        use serde_json::json;
        let shape = || error_answer("the body must be {\"namespace\": <text>, \"key\": <text>}");
        let body = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .map_err(|_| shape())?;
        let field = |name: &str| body.get(name).and_then(serde_json::Value::as_str);
        let (Some(namespace), Some(key), 2) = (field("namespace"), field("key"), body.len()) else {
            return Err(shape());
        };
        let namespace = Namespace::new(namespace).map_err(|e| error_answer(e.to_string()))?;
        let key = ClaimKey::new(key).map_err(|e| error_answer(e.to_string()))?;
        let routing_key = amends_core::route::claim_routing_key(namespace.as_str(), key.as_str());
        self.check_owner(&store, &routing_key, "the claim")?;
        let read = tokio::task::spawn_blocking(move || {
            let clock = store.clock()?;
            Ok((clock, store.claim(&routing_key)?))
        })
        .await;
        let (clock, found) = lookup(read)?;
        let mut answer = match found {
            Some(claim) => json!({
                "status": "claimed",
                "owner": claim.owner.as_str(),
                // Held by a saga in flight: final or gone when it ends.
                "tentative": claim.tentative.is_some(),
            }),
            None => json!({"status": "free"}),
        };
        answer["namespace"] = json!(namespace.as_str());
        answer["key"] = json!(key.as_str());
        answer["position"] = json!(clock.position);
        answer["log_time_ms"] = json!(clock.log_time_ms);
        Ok(answer)
    }

    /// The stats endpoint (body ignored): the partition's supervisor state,
    /// restarts, applied position and log time, the requests stream's last
    /// sequence on its subject, and the lag between them. If the stream
    /// cannot be read, `last_sequence` and `lag` are null and
    /// `stream_error` says why.
    async fn stats(&self, index: usize, store: Partition) -> serde_json::Value {
        use serde_json::json;
        let p = store.id();
        let snapshot = self.status.snapshot();
        let (state, detail, restarts) = match snapshot.partitions.get(index) {
            Some(s) => {
                let (name, detail) = state_name(&s.state);
                (name, detail, s.restarts)
            }
            None => ("running", None, 0),
        };
        // A failed read shows as nothing applied, as a failed task does.
        let clock = tokio::task::spawn_blocking(move || store.clock())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let last = last_sequence(&self.js, &self.topology, p).await;
        let mut answer = json!({
            "status": "ok",
            "partition": p.get(),
            "state": state,
            "detail": detail,
            "restarts": restarts,
            "applied_position": clock.position,
            "log_time_ms": clock.log_time_ms,
            "last_sequence": null,
            "lag": null,
        });
        match last {
            Ok(last) => {
                answer["last_sequence"] = json!(last);
                answer["lag"] = json!(last.saturating_sub(clock.position));
            }
            Err(e) => answer["stream_error"] = json!(e),
        }
        answer
    }
}

/// What a query read from a store on the blocking pool, or the error answer
/// when the task or the read failed.
fn lookup<T>(
    read: Result<Result<T, amends_store::Error>, tokio::task::JoinError>,
) -> Result<T, serde_json::Value> {
    read.map_err(|e| e.to_string())
        .and_then(|read| read.map_err(|e| e.to_string()))
        .map_err(|e| error_answer(format!("the lookup failed: {e}")))
}

/// A partition state's name (one of [`crate::metrics::STATES`]) and its
/// error text, if it has one.
fn state_name(state: &PartitionState) -> (&'static str, Option<String>) {
    match state {
        PartitionState::Running => ("running", None),
        PartitionState::Restarting { error, .. } => ("restarting", Some(error.clone())),
        PartitionState::Stopped { reason } => ("stopped", Some(reason.clone())),
    }
}

/// The requests stream's last sequence on partition `p`'s subject (0 if it
/// holds none).
async fn last_sequence(
    js: &jetstream::Context,
    topology: &Topology,
    p: PartitionId,
) -> Result<u64, String> {
    let stream = js
        .get_stream_no_info(topology.prefix.stream_name(Stream::Requests))
        .await
        .map_err(|e| e.to_string())?;
    match stream
        .get_last_raw_message_by_subject(&topology.prefix.req(p))
        .await
    {
        Ok(message) => Ok(message.sequence),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

/// Gauges: every interval, each partition's applied position and lag
/// ([`crate::metrics`]), from its store and the requests stream.
async fn gauges(js: jetstream::Context, topology: Topology, options: Options, status: Status) {
    let period = options.gauge_interval.max(Duration::from_millis(1));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        for store in status.stores.iter() {
            let p = store.id();
            let applied = store.head().map(|h| h.clock.position).unwrap_or(0);
            match last_sequence(&js, &topology, p).await {
                Ok(last) => crate::metrics::position(p, applied, last.saturating_sub(applied)),
                Err(e) => tracing::debug!(partition = p.get(), error = %e, "lag not measured"),
            }
        }
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
