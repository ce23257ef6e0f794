//! The decision fence and the partition workers on a 3-node JetStream
//! cluster (every stream with 3 replicas), from
//! `amends_nats::test_support::cluster`.
//!
//! On a clustered stream nats-server checks one fenced write per fence
//! subject at a time and refuses the others in flight with error 10164
//! ("busy"); a re-send of an already stored `Nats-Msg-Id` is acknowledged
//! as a duplicate (nothing written) before the fence is looked at. These
//! tests run the worker and the service against that, under load, with a
//! stale owner, with the stream leader killed, and with a store behind the
//! decisions stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amends_core::partition::Config;
use amends_core::route::{PartitionId, Partitions, partition_of};
use amends_nats::service::{self, Service};
use amends_nats::test_support::cluster::{self, Cluster};
use amends_nats::test_support::{decision_count, is_decision_subject};
use amends_nats::topology::{Stream, Topology, header};
use amends_nats::worker;
use amends_store::Store;
use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::{Value, json};

use crate::support::{topology, within_cluster};

/// How long a test waits for every operation of its load to be decided.
const DECIDED_TIMEOUT: Duration = Duration::from_secs(30);

/// Busy refusals counted by the process's metrics recorder (see
/// [`busy_refusals`]).
static BUSY: std::sync::OnceLock<Arc<AtomicU64>> = std::sync::OnceLock::new();

/// A metrics recorder that counts `amends_fence_busy_total` and drops
/// everything else.
struct BusyRecorder(Arc<AtomicU64>);

impl metrics::Recorder for BusyRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == amends_nats::metrics::FENCE_BUSY {
            metrics::Counter::from_arc(Arc::clone(&self.0))
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// The busy refusals (error 10164) the workers of this process have met so
/// far. The first call installs the counting recorder. (nextest runs each
/// test in a process of its own, so the count is this test's.)
fn busy_refusals() -> u64 {
    BUSY.get_or_init(|| {
        let count = Arc::new(AtomicU64::new(0));
        // Fails only if another recorder is installed: none is, in this binary.
        metrics::set_global_recorder(BusyRecorder(Arc::clone(&count)))
            .expect("install the counting recorder");
        count
    })
    .load(Ordering::Relaxed)
}

/// A cluster with a deployment of `partitions` partitions on R3 streams.
struct Fixture {
    cluster: Cluster,
    js: jetstream::Context,
    topology: Topology,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(partitions: u32, window: Duration) -> Fixture {
        let cluster = Cluster::start().await;
        let client = cluster::connect(&cluster).await;
        // A short timeout, so that a publish lost with a killed node is
        // retried soon.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client);
        let mut topology = topology("amends", partitions);
        topology.replicas = cluster::NODES;
        topology.duplicate_window = window;
        cluster.ensure_ready(&js, &topology).await;
        Fixture {
            cluster,
            js,
            topology,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn store(&self, name: &str) -> Store {
        Store::open(
            self.dir.path().join(name),
            amends_store::Options::new(self.topology.partitions),
        )
        .expect("open store")
    }

    fn p(&self, index: u32) -> PartitionId {
        self.topology.partitions.id(index).expect("a partition")
    }

    /// Runs the service (every partition, supervised) on `store` until
    /// the returned task is aborted.
    fn spawn_service(&self, store: &Store) -> tokio::task::JoinHandle<()> {
        let options = service::Options {
            worker: worker::Options {
                fetch_wait: Duration::from_millis(100),
                ..worker::Options::default()
            },
            ..service::Options::default()
        };
        let service = Service::new(&self.js, &self.topology, store, Config::default(), options)
            .expect("service");
        tokio::spawn(async move {
            match service.run().await {
                Err(e) => panic!("service returned: {e}"),
                Ok(never) => match never {},
            }
        })
    }

    /// A publisher of requests to this deployment.
    fn publisher(&self) -> Publisher {
        Publisher {
            js: self.js.clone(),
            topology: self.topology.clone(),
        }
    }

    /// [`Publisher::publish_all`].
    async fn publish_all(&self, requests: &[Request]) -> Vec<u64> {
        self.publisher().publish_all(requests, Duration::ZERO).await
    }

    /// Waits until the decisions stream holds `len` decisions (failing
    /// after [`DECIDED_TIMEOUT`]).
    async fn wait_decided(&self, len: u64) {
        let deadline = Instant::now() + DECIDED_TIMEOUT;
        loop {
            let counted = decision_count(&self.js, &self.topology.prefix).await;
            if counted >= len {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{counted} of {len} decided after {DECIDED_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The decisions (and hold-expired events) on the decisions stream, in
    /// stream order.
    async fn decisions(&self) -> Vec<Value> {
        let name = self.topology.prefix.stream_name(Stream::Decisions);
        let mut stream = self.js.get_stream(&name).await.expect("decisions stream");
        let last = stream.info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let m = stream.get_raw_message(seq).await.expect("a stored message");
            if is_decision_subject(&self.topology.prefix, &m.subject) {
                out.push(serde_json::from_slice(&m.payload).expect("decision json"));
            }
        }
        out
    }

    /// Checks the decisions stream against `requests` (published at
    /// `positions`): every op decided exactly once, at its own position,
    /// and each partition's decisions in position order on the stream.
    async fn assert_decided_once_in_order(&self, requests: &[Request], positions: &[u64]) {
        let decisions = self.decisions().await;
        let mut by_op: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
        for d in &decisions {
            by_op
                .entry(d["op_id"].as_str().expect("op id"))
                .or_default()
                .push(d);
        }
        for (r, position) in requests.iter().zip(positions) {
            let found = by_op.get(r.op_id.as_str()).map_or(&[][..], Vec::as_slice);
            assert_eq!(
                found.len(),
                1,
                "op {} decided {} times",
                r.op_id,
                found.len()
            );
            assert_eq!(found[0]["position"], *position, "op {}", r.op_id);
        }
        assert_eq!(decisions.len(), requests.len(), "no decision of another op");
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        for d in &decisions {
            let position = d["position"].as_u64().expect("position");
            let p = self.partition_of_position(requests, positions, position);
            let before = last.insert(p, position).unwrap_or(0);
            assert!(
                position > before,
                "partition {p}: the decision at position {position} is on the stream after the one at {before}"
            );
        }
    }

    fn partition_of_position(&self, requests: &[Request], positions: &[u64], position: u64) -> u32 {
        let index = positions
            .iter()
            .position(|p| *p == position)
            .unwrap_or_else(|| panic!("a decision at position {position}, where no request is"));
        requests[index].partition.get()
    }
}

/// The requests a [`Publisher`] sends before it waits for their acks.
const PUBLISH_CHUNK_LEN: usize = 64;

/// A client publishing requests (cloned into a load task).
#[derive(Clone)]
struct Publisher {
    js: jetstream::Context,
    topology: Topology,
}

impl Publisher {
    /// Publishes every request, [`PUBLISH_CHUNK_LEN`] pipelined at a
    /// time with `pause` after each chunk, each retried until acknowledged
    /// (a node may be down); returns each one's stream position, in order.
    async fn publish_all(&self, requests: &[Request], pause: Duration) -> Vec<u64> {
        let mut positions = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(PUBLISH_CHUNK_LEN) {
            tokio::time::sleep(pause).await;
            let mut acks = Vec::with_capacity(chunk.len());
            for r in chunk {
                acks.push(self.js.publish_with_headers(
                    self.topology.prefix.req(r.partition),
                    msg_id(&r.op_id),
                    r.body.clone().into(),
                ));
            }
            for (r, ack) in chunk.iter().zip(acks) {
                let acked = match ack.await {
                    Ok(pending) => pending.await.ok(),
                    Err(_) => None,
                };
                let sequence = match acked {
                    Some(ack) => ack.sequence,
                    None => self.publish_one(r).await,
                };
                positions.push(sequence);
            }
        }
        positions
    }

    /// Publishes one request until it is acknowledged (the op id
    /// deduplicates a copy of an earlier try).
    async fn publish_one(&self, r: &Request) -> u64 {
        let deadline = Instant::now() + DECIDED_TIMEOUT;
        loop {
            let sent = self
                .js
                .publish_with_headers(
                    self.topology.prefix.req(r.partition),
                    msg_id(&r.op_id),
                    r.body.clone().into(),
                )
                .await;
            if let Ok(pending) = sent
                && let Ok(ack) = pending.await
            {
                return ack.sequence;
            }
            assert!(
                Instant::now() < deadline,
                "request {} never acknowledged",
                r.op_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A request to publish: its partition, op id and body.
#[derive(Clone)]
struct Request {
    partition: PartitionId,
    op_id: String,
    body: Vec<u8>,
}

fn msg_id(op_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, op_id);
    headers
}

/// A request of `command` on the partition of `key`.
fn request(partitions: Partitions, key: &str, command: Value) -> Request {
    let op_id = uuid::Uuid::now_v7().to_string();
    let body = serde_json::to_vec(&json!({"op_id": op_id, "command": command})).expect("json");
    Request {
        partition: partition_of(key, partitions),
        op_id,
        body,
    }
}

/// A mixed load of `ops` operations on 8 accounts and 40 claim keys:
/// opens first, then credits, debits (some refused for funds) and claims
/// (some refused as already claimed).
fn workload(partitions: Partitions, ops: usize) -> Vec<Request> {
    const ACCOUNTS: usize = 8;
    const KEYS: usize = 40;
    let account = |i: usize| format!("acct-{}", i % ACCOUNTS);
    let mut out: Vec<Request> = (0..ACCOUNTS)
        .map(|a| {
            let name = account(a);
            request(
                partitions,
                &name,
                json!({"type": "open_account", "account": name}),
            )
        })
        .collect();
    for i in 0..ops {
        let name = account(i);
        let amount = (i * 7919) % 100 + 1;
        let r = match i % 5 {
            0 | 1 => request(
                partitions,
                &name,
                json!({"type": "credit", "account": name, "amount": amount}),
            ),
            2 | 3 => request(
                partitions,
                &name,
                json!({"type": "debit", "account": name, "amount": amount * 2}),
            ),
            _ => {
                let key = format!("k{}", i % KEYS);
                request(
                    partitions,
                    &key,
                    json!({"type": "claim", "namespace": "users", "key": key, "owner": format!("o{i}")}),
                )
            }
        };
        out.push(r);
    }
    out
}

/// The partitions of a load test: two, so that two workers write fenced
/// decisions to the same stream at once.
const LOAD_PARTITIONS: u32 = 2;

/// The operations of a load test beside the opens.
const LOAD_OPS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r3_streams_decide_a_mixed_load_once_each_in_position_order() {
    // Proves fenced decision writes work on R3 streams under load: 3,008 mixed operations on 2 partitions are published before the service starts (so every batch is full, 256 decisions, and a pipelined publisher would have many fenced writes in flight per partition); every op is decided exactly once at its own position, and each partition's decisions are on the stream in position order.
    within_cluster(async {
        let busy_before = busy_refusals();
        let fx = Fixture::start(LOAD_PARTITIONS, Duration::from_secs(120)).await;
        let requests = workload(fx.topology.partitions, LOAD_OPS);
        let positions = fx.publish_all(&requests).await;
        let store = fx.store("a");
        let started = Instant::now();
        let task = fx.spawn_service(&store);
        fx.wait_decided(u64::try_from(requests.len()).expect("len"))
            .await;
        let elapsed = started.elapsed();
        task.abort();
        let _ = task.await;
        eprintln!(
            "decided {} ops on R3 in {elapsed:?} ({:.0} ops/s); busy refusals: {}",
            requests.len(),
            f64::from(u32::try_from(requests.len()).expect("len")) / elapsed.as_secs_f64(),
            busy_refusals() - busy_before
        );
        fx.assert_decided_once_in_order(&requests, &positions).await;
    })
    .await;
}

/// Writes fenced messages on `amends.owner.9` (a subject of the decisions
/// stream no partition of the test's topology reads), each fenced on
/// partition `p`'s ownership record at its current epoch, one at a time,
/// until `stop` is set or `max` were sent: a racing fenced writer, as a
/// second owner of the partition would be, that makes the worker's
/// writes busy (10164) while its own are being checked. Returns how many
/// the server stored.
async fn race_fenced_writes(
    js: jetstream::Context,
    topology: Topology,
    p: PartitionId,
    stop: Arc<AtomicBool>,
    max: usize,
) -> usize {
    let name = topology.prefix.stream_name(Stream::Decisions);
    let owner = topology.prefix.owner(p);
    let mut stored = 0;
    for _ in 0..max {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        let Ok(record) = stream.get_last_raw_message_by_subject(&owner).await else {
            continue;
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::EXPECTED_LAST_SUBJECT_SEQUENCE,
            record.sequence.to_string().as_str(),
        );
        headers.insert(
            header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
            owner.as_str(),
        );
        if let Ok(pending) = js
            .publish_with_headers(
                format!("{}.owner.9", topology.prefix.as_str()),
                headers,
                "race".into(),
            )
            .await
            && pending.await.is_ok()
        {
            stored += 1;
        }
    }
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_fenced_writes_are_retried_alone_and_land_in_order() {
    // Proves the 10164 path: while the service decides 1,508 operations on one partition, a racing writer keeps sending fenced writes on that partition's ownership record (at its current epoch, on a subject no partition reads), so the worker's fenced decision writes are refused as busy; the busy counter shows they were, and they were retried until each landed, every op once, in position order.
    within_cluster(async {
        let busy_before = busy_refusals();
        let fx = Fixture::start(1, Duration::from_secs(120)).await;
        let requests = workload(fx.topology.partitions, LOAD_OPS / 2);
        let store = fx.store("a");
        let task = fx.spawn_service(&store);
        // The worker claimed the partition once its first decision is there.
        let first = fx.publish_all(&requests[..1]).await;
        fx.wait_decided(1).await;
        let stop = Arc::new(AtomicBool::new(false));
        let racer = tokio::spawn(race_fenced_writes(
            fx.js.clone(),
            fx.topology.clone(),
            fx.p(0),
            Arc::clone(&stop),
            100_000,
        ));
        let mut positions = first;
        positions.extend(fx.publish_all(&requests[1..]).await);
        fx.wait_decided(u64::try_from(requests.len()).expect("len"))
            .await;
        stop.store(true, Ordering::Relaxed);
        let raced = racer.await.expect("the racer");
        task.abort();
        let _ = task.await;
        let busy = busy_refusals() - busy_before;
        eprintln!("racing fenced writes stored: {raced}; busy refusals of the worker: {busy}");
        assert!(raced > 0, "the racer wrote nothing: no contention");
        assert!(busy > 0, "no decision write was refused as busy");
        fx.assert_decided_once_in_order(&requests, &positions).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_decisions_stream_leader_under_load_loses_and_doubles_nothing() {
    // Proves a crash of the node leading the decisions stream (SIGKILL, mid-load) and its restart lose and double nothing: the requests stream's leader goes too if it is the same node; the service rides out the failover (its publishes time out or are refused, its workers restart and republish), the client retries its publishes, and once the node is back and current every op has exactly one decision, at its own position, in position order per partition.
    within_cluster(async {
        let mut fx = Fixture::start(LOAD_PARTITIONS, Duration::from_secs(120)).await;
        let requests = workload(fx.topology.partitions, LOAD_OPS / 2);
        let store = fx.store("a");
        let task = fx.spawn_service(&store);
        // Paced, so that requests are still being published at the kill.
        let load = {
            let (publisher, requests) = (fx.publisher(), requests.clone());
            tokio::spawn(async move {
                publisher
                    .publish_all(&requests, Duration::from_millis(20))
                    .await
            })
        };
        fx.wait_decided(300).await;
        let decisions = fx.topology.prefix.stream_name(Stream::Decisions);
        let leader = fx.cluster.stream_leader(&fx.js, &decisions).await;
        let before = decision_count(&fx.js, &fx.topology.prefix).await;
        fx.cluster.kill9(leader);
        tokio::time::sleep(Duration::from_secs(2)).await;
        fx.cluster.restart(leader);
        let positions = load.await.expect("the load");
        for stream in [Stream::Requests, Stream::Decisions] {
            let name = fx.topology.prefix.stream_name(stream);
            fx.cluster.wait_stream_current(&fx.js, &name).await;
        }
        fx.wait_decided(u64::try_from(requests.len()).expect("len"))
            .await;
        task.abort();
        let _ = task.await;
        eprintln!(
            "killed {} (decisions leader) with {before} of {} decided",
            fx.cluster.name(leader),
            requests.len()
        );
        assert!(
            before < u64::try_from(requests.len()).expect("len"),
            "the leader was killed after the load was decided"
        );
        fx.assert_decided_once_in_order(&requests, &positions).await;
    })
    .await;
}
