//! The service: the supervisor of one process that serves every partition
//! of a deployment.
//!
//! ```text
//! per partition: loop { run_partition } -- transient error -> backoff, restart
//!                                       -- integrity error -> Stopped (loud), never restarted
//! ticks:         every tick_interval, a tick to each running partition with a hold due
//! compaction:    every compact_interval, PartitionStore::compact on a blocking thread
//! endpoints:     the NATS micro service `amends`, answering from the store, per served partition <p>:
//!                <prefix>.status.<p>        (queue group amends-status): what a partition knows of an op id
//!                <prefix>.query.balance.<p> (queue group amends-query): an account's balance, holds, limits
//!                <prefix>.query.claim.<p>   (queue group amends-query): the owner of a claim
//!                <prefix>.stats.<p>         (queue group amends-query): applied position, lag, state
//!                and, on each kind's wildcard (queue group amends-unrouted), an error for a partition
//!                the deployment does not have
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
//! partition's [`Supervision`] and its applied position, read live from
//! the store.
//!
//! One file per job: this one holds [`Options`] and [`Service`] (what it
//! spawns); `supervise.rs` one partition's supervisor and the error
//! classification ([`is_fatal`], [`needs_reopen`], [`backoff`]);
//! `status.rs` the [`Status`] handle; `tick.rs` the ticks; `compact.rs`
//! the compactor; `endpoints.rs` the micro service and its endpoints;
//! `answers.rs` what the endpoints answer (the protocol's
//! `amends_core::protocol::query` answers); `gauges.rs` the position and
//! lag gauges.

mod answers;
mod compact;
mod endpoints;
mod gauges;
mod status;
mod supervise;
mod tick;

use std::convert::Infallible;
use std::time::Duration;

use amends_core::partition::{Config, Machine};
use amends_store::{Engine, Store};
use async_nats::jetstream;
use tokio::task::JoinSet;

use crate::Error;
use crate::lease::Guard;
use crate::topology::Topology;
use crate::worker;

use compact::compact;
use gauges::gauges;
use supervise::supervise;
use tick::tick;

pub use endpoints::{
    ENDPOINT_CONCURRENCY_MAX, QUERY_QUEUE_GROUP, SERVICE_NAME, STATUS_QUEUE_GROUP,
    UNROUTED_QUEUE_GROUP, serve_endpoints,
};
pub use status::{PartitionStatus, ServiceStatus, Status, Supervision};
pub use supervise::{backoff, is_fatal, needs_reopen};
pub use tick::tick_msg_id;

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

/// The supervisor of every partition of a deployment in one process, over
/// the store `E` (sled's by default).
#[derive(Debug)]
pub struct Service<E: Engine = Store> {
    js: jetstream::Context,
    topology: Topology,
    store: E,
    config: Config,
    options: Options,
    status: Status<E::Partition>,
    /// Asked before every (re)start of a worker: only the lease holder
    /// may claim a partition (see [`crate::lease`]).
    guard: Guard,
}

impl<E: Engine> Service<E> {
    /// Checks the settings and prepares the service; nothing runs until
    /// [`Service::run`]. The topology's streams must exist
    /// ([`crate::topology::ensure`]).
    pub fn new(
        js: &jetstream::Context,
        topology: &Topology,
        store: &E,
        config: Config,
        options: Options,
    ) -> Result<Service<E>, Error> {
        topology
            .validate()
            .map_err(|e| Error::ServiceMisconfigured(e.to_string()))?;
        if store.partitions() != topology.partitions {
            return Err(Error::ServiceMisconfigured(format!(
                "the store has {} partitions, the topology {}",
                store.partitions().get(),
                topology.partitions.get()
            )));
        }
        let stores: Vec<E::Partition> = topology
            .partitions
            .ids()
            .map(|id| store.partition(id))
            .collect::<Result<_, _>>()
            .map_err(Error::StoreHandle)?;
        let status = Status::new(stores);
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
    pub fn with_guard(mut self, guard: Guard) -> Service<E> {
        self.guard = guard;
        self
    }

    /// The status handle.
    pub fn status(&self) -> Status<E::Partition> {
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
            topology.partitions.ids().collect(),
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
pub async fn run<E: Engine>(
    js: &jetstream::Context,
    topology: &Topology,
    store: &E,
    config: Config,
    options: Options,
) -> Result<Infallible, Error> {
    Service::new(js, topology, store, config, options)?
        .run()
        .await
}
