//! The partition worker against a real nats-server, driven by a plain
//! async-nats client that follows specs/protocol.md and nothing else.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amends_core::partition::{Config, DeadLetter, Effect, LogMessage, Machine, Taken};
use amends_core::route::{PartitionId, Partitions};
use amends_core::state::Read as _;
use amends_nats::topology::{self, Stream, Topology, header};
use amends_nats::worker::{self, Options};
use amends_store::{Partition, PartitionStore, Store};
use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::{Server, connect, topology, within, within_cluster};
use amends_nats::test_support::cluster::{self, Cluster};
use amends_nats::test_support::{decision_count, is_decision_subject};

/// How long a test waits for something the worker should do promptly.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The NATS side of a [`Fixture`]: one server, or a 3-node cluster (every
/// stream with 3 replicas).
enum Nodes {
    One(Server),
    /// Held only to keep the nodes running until the fixture is dropped.
    Three {
        _cluster: Cluster,
    },
}

/// One deployment: a server (or a cluster), a client, a topology, a store
/// directory.
struct Fixture {
    nodes: Nodes,
    client: async_nats::Client,
    js: jetstream::Context,
    topology: Topology,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A server with the topology ensured: one partition, `window` as the
    /// duplicate window.
    async fn start(window: Duration) -> Fixture {
        let server = Server::start();
        let client = connect(&server).await;
        let js = jetstream::new(client.clone());
        let mut topology = topology("amends", 1);
        topology.duplicate_window = window;
        topology::ensure(&js, &topology).await.expect("ensure");
        Fixture {
            nodes: Nodes::One(server),
            client,
            js,
            topology,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// [`Fixture::start`] on a 3-node cluster, the streams with 3 replicas.
    async fn start_cluster(window: Duration) -> Fixture {
        let cluster = Cluster::start().await;
        let client = cluster::connect(&cluster).await;
        let js = jetstream::new(client.clone());
        let mut topology = topology("amends", 1);
        topology.duplicate_window = window;
        topology.replicas = cluster::NODES;
        cluster.ensure_ready(&js, &topology).await;
        Fixture {
            nodes: Nodes::Three { _cluster: cluster },
            client,
            js,
            topology,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The one server (tests that restart or restore it).
    fn server(&mut self) -> &mut Server {
        match &mut self.nodes {
            Nodes::One(server) => server,
            Nodes::Three { .. } => panic!("a one-server test on a cluster fixture"),
        }
    }

    fn p0(&self) -> PartitionId {
        self.topology.partitions.id(0).expect("partition 0")
    }

    /// Opens the store and spawns partition 0's worker.
    fn spawn_worker(&self, options: Options) -> (Store, JoinHandle<()>) {
        let partitions = Partitions::new(1).expect("count");
        let store = Store::open(self.dir.path(), amends_store::Options::new(partitions))
            .expect("open store");
        let partition: Partition = store.partition(self.p0()).expect("partition");
        let machine = Machine::new(self.p0(), partitions, Config::default());
        let js = self.js.clone();
        let topology = self.topology.clone();
        let task = tokio::spawn(async move {
            let stopped = worker::run_partition(&js, &topology, machine, partition, options).await;
            match stopped {
                Err(e) => panic!("worker stopped: {e}"),
                Ok(never) => match never {},
            }
        });
        (store, task)
    }

    /// Publishes `body` to partition 0 with `Nats-Msg-Id` = `msg_id` and,
    /// if given, `Amends-Reply-To`; returns the stream sequence.
    async fn publish(&self, msg_id: &str, reply_to: Option<&str>, body: Vec<u8>) -> u64 {
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, msg_id);
        if let Some(reply_to) = reply_to {
            headers.insert(header::REPLY_TO, reply_to);
        }
        let ack = self
            .js
            .publish_with_headers(self.topology.prefix.req(self.p0()), headers, body.into())
            .await
            .expect("publish")
            .await
            .expect("puback");
        ack.sequence
    }

    /// The JetStream timestamp, in ms, of the requests stream's message at
    /// `position`.
    async fn logged_at_ms(&self, position: u64) -> u64 {
        let logged = self
            .js
            .get_stream(self.topology.prefix.stream_name(Stream::Requests))
            .await
            .expect("requests stream")
            .get_raw_message(position)
            .await
            .expect("the logged message");
        u64::try_from(logged.time.unix_timestamp_nanos() / 1_000_000).expect("ms")
    }

    /// Every message of `stream`, in order: (subject, headers, body).
    async fn read_stream(&self, stream: Stream) -> Vec<(String, HeaderMap, Vec<u8>)> {
        let name = self.topology.prefix.stream_name(stream);
        let mut stream = self.js.get_stream(&name).await.expect("stream");
        let last = stream.info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push((m.subject.to_string(), m.headers, m.payload.to_vec()));
            }
        }
        out
    }

    /// The decisions stream's messages as JSON, once it holds `len`.
    async fn decisions(&self, len: usize) -> Vec<Value> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let mut found = self.read_stream(Stream::Decisions).await;
            found.retain(|(subject, _, _)| is_decision_subject(&self.topology.prefix, subject));
            if found.len() >= len || Instant::now() > deadline {
                return found
                    .iter()
                    .map(|(_, _, body)| serde_json::from_slice(body).expect("decision json"))
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn op_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn request(op_id: &str, command: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({ "op_id": op_id, "command": command })).expect("json")
}

/// A waiting client's inbox: one subscription, answers read in order.
struct Inbox {
    subject: String,
    sub: async_nats::Subscriber,
}

impl Inbox {
    async fn new(client: &async_nats::Client) -> Inbox {
        let subject = client.new_inbox();
        let sub = client.subscribe(subject.clone()).await.expect("subscribe");
        client.flush().await.expect("flush");
        Inbox { subject, sub }
    }

    async fn next(&mut self) -> Value {
        let msg = tokio::time::timeout(ANSWER_TIMEOUT, self.sub.next())
            .await
            .expect("an answer in time")
            .expect("subscription open");
        serde_json::from_slice(&msg.payload).expect("decision json")
    }

    /// Fails if an answer arrives within a second.
    async fn expect_none(&mut self) {
        if let Ok(msg) = tokio::time::timeout(Duration::from_secs(1), self.sub.next()).await {
            panic!("expected no answer, got {msg:?}");
        }
    }
}

/// Publishes a request with a reply subject and waits for its answer.
async fn ask(fx: &Fixture, inbox: &mut Inbox, op_id: &str, command: Value) -> Value {
    fx.publish(op_id, Some(&inbox.subject), request(op_id, command))
        .await;
    inbox.next().await
}

fn code(decision: &Value) -> &str {
    match decision["outcome"].as_str() {
        Some("confirmed") => "confirmed",
        _ => decision["reason"]["code"].as_str().expect("a reason code"),
    }
}

#[tokio::test]
async fn answers_confirm_refuse_duplicate_conflict_and_apology() {
    // Proves the request/decision round trip of protocol.md: each kind of answer arrives on the reply subject, and the decisions and apology streams hold exactly the new decisions.
    within(async {
        let fx = Fixture::start(Duration::from_secs(1)).await;
        let (_store, task) = fx.spawn_worker(Options::default());
        let mut inbox = Inbox::new(&fx.client).await;

        let open = op_id();
        let d = ask(
            &fx,
            &mut inbox,
            &open,
            json!({"type": "open_account", "account": "alice"}),
        )
        .await;
        assert_eq!(code(&d), "confirmed", "{d}");
        let credit = op_id();
        let credited = ask(
            &fx,
            &mut inbox,
            &credit,
            json!({"type": "credit", "account": "alice", "amount": 100}),
        )
        .await;
        assert_eq!(credited["balance"], 100, "{credited}");
        let d = ask(
            &fx,
            &mut inbox,
            &op_id(),
            json!({"type": "debit", "account": "alice", "amount": 150}),
        )
        .await;
        assert_eq!(code(&d), "insufficient_funds", "{d}");
        assert_eq!(d["reason"]["available"], 100, "{d}");
        let claim = op_id();
        let d = ask(
            &fx,
            &mut inbox,
            &claim,
            json!({"type": "claim", "namespace": "users", "key": "bob", "owner": "o1"}),
        )
        .await;
        assert_eq!(code(&d), "confirmed", "{d}");
        let d = ask(
            &fx,
            &mut inbox,
            &op_id(),
            json!({"type": "claim", "namespace": "users", "key": "bob", "owner": "o2"}),
        )
        .await;
        assert_eq!(code(&d), "already_claimed", "{d}");
        assert_eq!(d["reason"]["owner"], "o1", "{d}");

        // Optimistic: refused, so an apology is published too.
        let optimistic = op_id();
        let body = serde_json::to_vec(&json!({
            "op_id": optimistic,
            "command": {"type": "debit", "account": "alice", "amount": 1000},
            "apology_topic": "orders.payments",
        }))
        .expect("json");
        fx.publish(&optimistic, None, body).await;

        // After the 1 s duplicate window, JetStream appends resubmissions.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = ask(
            &fx,
            &mut inbox,
            &credit,
            json!({"type": "credit", "account": "alice", "amount": 100}),
        )
        .await;
        assert_eq!(again, credited, "a duplicate gets the original decision");
        let d = ask(
            &fx,
            &mut inbox,
            &claim,
            json!({"type": "claim", "namespace": "users", "key": "bob", "owner": "o3"}),
        )
        .await;
        assert_eq!(code(&d), "op_id_conflict", "{d}");

        let decisions = fx.decisions(6).await;
        let codes: Vec<&str> = decisions.iter().map(code).collect();
        assert_eq!(
            codes,
            [
                "confirmed",
                "confirmed",
                "insufficient_funds",
                "confirmed",
                "already_claimed",
                "insufficient_funds"
            ],
        );
        assert_eq!(decisions[1], credited);
        let apologies = fx.read_stream(Stream::Apologies).await;
        assert_eq!(apologies.len(), 1);
        let (subject, headers, body) = &apologies[0];
        assert_eq!(subject, "amends.apology.orders.payments");
        assert_eq!(
            headers.get(header::MSG_ID).map(|v| v.as_str()),
            Some(optimistic.as_str())
        );
        let apology: Value = serde_json::from_slice(body).expect("apology json");
        assert_eq!(apology["decision"], decisions[5]);
        assert_eq!(apology["command"]["amount"], 1000);
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn bad_input_is_refused_or_dead_lettered_and_the_partition_goes_on() {
    // Proves bad input never stops a partition: a readable op id gets `malformed`, unreadable bytes land on the dlq stream with the error, and a later request is still confirmed.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        let (_store, task) = fx.spawn_worker(Options::default());
        let mut inbox = Inbox::new(&fx.client).await;

        let bad = op_id();
        let body =
            format!(r#"{{"op_id":"{bad}","command":{{"type":"debit","account":"a","amount":0}}}}"#);
        fx.publish(&bad, Some(&inbox.subject), body.into_bytes())
            .await;
        let d = inbox.next().await;
        assert_eq!(code(&d), "malformed", "{d}");
        assert_eq!(d["op_id"], bad.as_str());

        let position = fx
            .publish("junk-1", Some(&inbox.subject), b"not json at all".to_vec())
            .await;
        let ok = op_id();
        let d = ask(
            &fx,
            &mut inbox,
            &ok,
            json!({"type": "open_account", "account": "a"}),
        )
        .await;
        assert_eq!(code(&d), "confirmed", "{d}");

        let dead = fx.read_stream(Stream::DeadLetters).await;
        assert_eq!(dead.len(), 1);
        let (subject, headers, body) = &dead[0];
        assert_eq!(subject, "amends.dlq.0");
        assert_eq!(body, b"not json at all");
        let msg_id = worker::dead_letter_msg_id(fx.p0(), position);
        assert_eq!(
            headers.get(header::MSG_ID).map(|v| v.as_str()),
            Some(msg_id.as_str())
        );
        let error = headers.get(header::ERROR).expect("Amends-Error").as_str();
        assert!(error.contains("expected"), "{error}");
        let codes: Vec<String> = fx
            .decisions(2)
            .await
            .iter()
            .map(|d| code(d).to_owned())
            .collect();
        assert_eq!(codes, ["malformed", "confirmed"]);
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_dead_letter_last_in_its_batch_is_committed_past() {
    // Proves a dead letter moves the applied position: after a valid request and then unreadable bytes (the last message), the store's applied position is the dead letter's, so a restarted worker does not read and dead-letter it again; log time moves to the dead letter's timestamp, like any message's.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        let (store, task) = fx.spawn_worker(Options::default());
        let mut inbox = Inbox::new(&fx.client).await;
        let d = ask(
            &fx,
            &mut inbox,
            &op_id(),
            json!({"type": "open_account", "account": "a"}),
        )
        .await;
        assert_eq!(code(&d), "confirmed", "{d}");
        let position = fx
            .publish("junk-last", None, b"\xff not json".to_vec())
            .await;
        let partition = store.partition(fx.p0()).expect("partition");
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while partition.clock().expect("read the clock").position < position {
            assert!(
                Instant::now() < deadline,
                "the dead letter was not committed past"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            partition.clock().expect("read the clock").position,
            position
        );
        // Log time is the dead letter's own timestamp, as for any message
        // (the start-up check of the log's tail compares it).
        let junk_ms = fx.logged_at_ms(position).await;
        assert!(junk_ms >= d["log_time_ms"].as_u64().expect("log time"));
        assert_eq!(
            partition.clock().expect("read the clock").log_time_ms,
            junk_ms,
            "log time is the dead letter's"
        );
        // Published after the commit, with the rest of the batch's outbox.
        while fx.read_stream(Stream::DeadLetters).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the dead letter was not published"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fx.read_stream(Stream::DeadLetters).await.len(), 1);
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_dead_letter_committed_before_a_crash_is_published_once_on_restart() {
    // Proves dead letters go through the outbox: (1) unreadable bytes taken and committed, then a crash before their publication (nothing on the dlq stream), are published on the next start from the outbox, with their id, error header and bytes; (2) a dead letter a crashed run had published but not confirmed is republished on start and the dlq stream keeps one copy; the partition decides on, and the stream ends with each dead letter exactly once.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        let store = open_store(&fx.dir.path().join("a"));
        let partition = store.partition(fx.p0()).expect("partition");
        // (1) Committed, never published.
        let first = fx
            .publish("junk-1", None, b"not json at all".to_vec())
            .await;
        let dead = commit_unpublished(&fx, &partition, first, b"not json at all").await;
        assert!(dead_letters(&fx).await.is_empty(), "nothing published yet");
        let task = spawn_on(&fx, &store);
        open_accounts(&fx, &["a"]).await;
        task.abort();
        let _ = task.await;
        let expected_first = (
            Some(worker::dead_letter_msg_id(fx.p0(), first)),
            Some(dead.detail.clone()),
            b"not json at all".to_vec(),
        );
        assert_eq!(
            dead_letters(&fx).await,
            std::slice::from_ref(&expected_first)
        );
        assert_eq!(
            partition.outbox_confirmed().expect("confirmed"),
            partition.outbox_end().expect("end"),
            "the dead letter was confirmed"
        );

        // (2) Committed and published (as the crashed worker would have),
        // not confirmed.
        let second = fx.publish("junk-2", None, b"\xff\xfe".to_vec()).await;
        let dead = commit_unpublished(&fx, &partition, second, b"\xff\xfe").await;
        let mut headers = HeaderMap::new();
        let msg_id = worker::dead_letter_msg_id(fx.p0(), second);
        headers.insert(header::MSG_ID, msg_id.as_str());
        headers.insert(header::ERROR, dead.detail.as_str());
        fx.js
            .publish_with_headers(
                fx.topology.prefix.dlq(fx.p0()),
                headers,
                dead.bytes.clone().into(),
            )
            .await
            .expect("publish")
            .await
            .expect("puback");
        let task = spawn_on(&fx, &store);
        open_accounts(&fx, &["b"]).await;
        task.abort();
        let _ = task.await;
        assert_eq!(
            dead_letters(&fx).await,
            [
                expected_first,
                (Some(msg_id), Some(dead.detail), b"\xff\xfe".to_vec())
            ],
            "each dead letter once"
        );
        assert_eq!(
            partition.outbox_confirmed().expect("confirmed"),
            partition.outbox_end().expect("end")
        );
    })
    .await;
}

/// Takes the unreadable message `bytes` at `position` of partition 0's log
/// as a worker does and commits it, publishing nothing (what a crash right
/// after the commit leaves); returns its dead letter.
async fn commit_unpublished(
    fx: &Fixture,
    partition: &Partition,
    position: u64,
    bytes: &[u8],
) -> DeadLetter {
    let log_time_ms = fx.logged_at_ms(position).await;
    let machine = Machine::new(fx.p0(), fx.topology.partitions, Config::default());
    let mut changes = amends_core::state::ChangeSet::default();
    let mut effects = Vec::new();
    let message = LogMessage {
        bytes,
        position,
        log_time_ms,
        reply_to: None,
    };
    let taken = machine
        .take(
            &mut amends_core::state::Overlay::new(partition, &mut changes),
            &message,
            &mut effects,
        )
        .expect("taken");
    assert_eq!(taken, Taken::DeadLetter);
    partition.commit(&changes, &effects).expect("commit");
    let [Effect::DeadLetter(dead)] = &effects[..] else {
        panic!("one dead letter: {effects:?}");
    };
    dead.clone()
}

/// The dead-letter stream's messages: (`Nats-Msg-Id`, `Amends-Error`,
/// body), each on partition 0's dead-letter subject.
async fn dead_letters(fx: &Fixture) -> Vec<(Option<String>, Option<String>, Vec<u8>)> {
    fx.read_stream(Stream::DeadLetters)
        .await
        .into_iter()
        .map(|(subject, headers, body)| {
            assert_eq!(subject, fx.topology.prefix.dlq(fx.p0()));
            let header = |name| headers.get(name).map(|v| v.as_str().to_owned());
            (header(header::MSG_ID), header(header::ERROR), body)
        })
        .collect()
}

#[tokio::test]
async fn restarts_mid_workload_answer_every_op_exactly_once() {
    // Proves crash safety of the driver loop: the worker task is aborted at eight assorted moments (some between a commit and its publish) and restarted on a reopened store; each op has exactly one stored decision, and decisions and balances match a naive model of the log.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        const ACCOUNTS: usize = 4;
        const OPS: usize = 1500;
        let mut ops = Vec::new(); // (position, op id, account, credit?, amount)
        for a in 0..ACCOUNTS {
            let id = op_id();
            let seq = fx
                .publish(
                    &id,
                    None,
                    request(
                        &id,
                        json!({"type": "open_account", "account": format!("acct-{a}")}),
                    ),
                )
                .await;
            ops.push((seq, id, a, None));
        }
        let mut acks = Vec::new();
        let mut bodies = Vec::new();
        for i in 0..OPS {
            let id = op_id();
            let account = i % ACCOUNTS;
            let amount = u64::try_from((i * 7919) % 100 + 1).expect("small");
            let kind = if (i / ACCOUNTS) % 3 == 2 {
                "debit"
            } else {
                "credit"
            };
            let kind = if i % 5 == 4 { "debit" } else { kind };
            let mut headers = HeaderMap::new();
            headers.insert(header::MSG_ID, id.as_str());
            let body = request(
                &id,
                json!({"type": kind, "account": format!("acct-{account}"), "amount": amount}),
            );
            acks.push(
                fx.js
                    .publish_with_headers(fx.topology.prefix.req(fx.p0()), headers, body.into())
                    .await
                    .expect("publish"),
            );
            bodies.push((id, account, kind == "credit", amount));
        }
        for (ack, (id, account, credit, amount)) in acks.into_iter().zip(bodies) {
            let seq = ack.await.expect("puback").sequence;
            ops.push((seq, id, account, Some((credit, amount))));
        }
        ops.sort_by_key(|op| op.0);

        let options = Options {
            batch_len_max: 16,
            ..Options::default()
        };
        // Stops at assorted moments: between batches, in a commit, while
        // the outbox is being published. Each run first waits for one more
        // stored decision than the last (a worker's start takes a while on
        // a loaded machine), then runs on for `extra_ms`, so every run
        // makes progress and the early stops fall while a batch is being
        // published. (decisions stored, unconfirmed outbox)
        let mut stopped_at = Vec::new();
        let mut stored_before = 0;
        for extra_ms in [0, 3, 0, 7, 1, 0, 5, 2] {
            let (store, task) = fx.spawn_worker(options);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while decision_count(&fx.js, &fx.topology.prefix).await <= stored_before {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no progress past {stored_before} decisions"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(extra_ms)).await;
            task.abort();
            let _ = task.await;
            let stored = decision_count(&fx.js, &fx.topology.prefix).await;
            // A commit still running on its blocking thread holds the store
            // open; the reopen below waits for it, like a real restart.
            let partition = store.partition(fx.p0()).expect("partition");
            let unconfirmed = partition.outbox_end().expect("end").get()
                - partition.outbox_confirmed().expect("confirmed").get();
            stopped_at.push((stored, unconfirmed));
            stored_before = stored;
            drop((partition, store));
        }
        let total = ACCOUNTS + OPS;
        eprintln!("decisions stored when each worker stopped: {stopped_at:?}");
        assert!(
            stopped_at
                .iter()
                .all(|&(n, _)| n < u64::try_from(total).expect("small")),
            "every stop is mid-workload: {stopped_at:?}"
        );
        assert!(
            stopped_at.iter().any(|&(_, unconfirmed)| unconfirmed > 0),
            "some stop fell between a commit and its publish: {stopped_at:?}"
        );
        let (store, task) = fx.spawn_worker(options);
        let decisions = fx.decisions(total).await;
        task.abort();
        let _ = task.await;

        let mut by_op: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        for d in &decisions {
            by_op
                .entry(d["op_id"].as_str().expect("op id").to_owned())
                .or_default()
                .push(d);
        }
        assert_eq!(decisions.len(), total, "one stored decision per op");
        assert_eq!(by_op.len(), total, "every op answered");

        // A naive model of the log, in log order.
        let mut balances = [0_i64; ACCOUNTS];
        for (position, id, account, op) in &ops {
            let d = by_op[id][0];
            assert_eq!(d["position"], *position, "{d}");
            let expected = match op {
                None => "confirmed",
                Some((true, amount)) => {
                    balances[*account] += i64::try_from(*amount).expect("small");
                    "confirmed"
                }
                Some((false, amount)) => {
                    let amount = i64::try_from(*amount).expect("small");
                    if balances[*account] >= amount {
                        balances[*account] -= amount;
                        "confirmed"
                    } else {
                        "insufficient_funds"
                    }
                }
            };
            assert_eq!(code(d), expected, "{d}");
            if op.is_some() && expected == "confirmed" {
                assert_eq!(d["balance"], balances[*account], "{d}");
            }
        }
        let state = store
            .partition(fx.p0())
            .expect("partition")
            .to_mem_state()
            .expect("state");
        for (id, account) in state.accounts() {
            let a: usize = id
                .as_str()
                .trim_start_matches("acct-")
                .parse()
                .expect("index");
            assert_eq!(account.balance, balances[a], "{id:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_log_that_went_backwards_stops_the_partition() {
    // Proves the Jepsen guard: after the requests stream is deleted and recreated (the log lost what the store applied), a restarted worker refuses to decide and returns LogBehind.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        let (store, task) = fx.spawn_worker(Options::default());
        let mut inbox = Inbox::new(&fx.client).await;
        for account in ["a", "b"] {
            let d = ask(
                &fx,
                &mut inbox,
                &op_id(),
                json!({"type": "open_account", "account": account}),
            )
            .await;
            assert_eq!(code(&d), "confirmed", "{d}");
        }
        task.abort();
        let _ = task.await;
        let partition = store.partition(fx.p0()).expect("partition");

        let requests = fx.topology.prefix.stream_name(Stream::Requests);
        fx.js.delete_stream(&requests).await.expect("delete stream");
        topology::ensure(&fx.js, &fx.topology)
            .await
            .expect("ensure");
        let machine = Machine::new(fx.p0(), fx.topology.partitions, Config::default());
        let stopped =
            worker::run_partition(&fx.js, &fx.topology, machine, partition, Options::default())
                .await;
        match stopped {
            Err(amends_nats::Error::LogBehind { partition: 0, .. }) => {}
            other => panic!("expected LogBehind, got {other:?}"),
        }
    })
    .await;
}

/// Opens accounts `names` on partition 0 through a running worker.
async fn open_accounts(fx: &Fixture, names: &[&str]) {
    let mut inbox = Inbox::new(&fx.client).await;
    for account in names {
        let d = ask(
            fx,
            &mut inbox,
            &op_id(),
            json!({"type": "open_account", "account": account}),
        )
        .await;
        assert_eq!(code(&d), "confirmed", "{d}");
    }
}

/// Runs partition 0's worker on `store` until it stops; returns why.
async fn run_until_stopped(fx: &Fixture, store: &Store) -> amends_nats::Error {
    let partition = store.partition(fx.p0()).expect("partition");
    let machine = Machine::new(fx.p0(), fx.topology.partitions, Config::default());
    match worker::run_partition(&fx.js, &fx.topology, machine, partition, Options::default()).await
    {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

/// Copies a directory tree (`cp -a`).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp -a {from:?} {to:?}");
}

#[tokio::test]
async fn a_rolled_back_log_refilled_by_new_requests_stops_the_partition() {
    // Proves a rollback is noticed even when new traffic has passed the applied position: the server's store is restored from a copy taken after 2 requests, the worker had applied 5, clients then publish 6 more; the restarted worker returns LogChanged instead of deciding from position 6 on (which would skip the new requests at 3..5), and decides nothing.
    within(async {
        let mut fx = Fixture::start(Duration::from_secs(120)).await;
        let (store, task) = fx.spawn_worker(Options::default());
        open_accounts(&fx, &["a", "b"]).await;
        task.abort();
        let _ = task.await;
        let snapshot = fx.dir.path().join("nats-snapshot");
        fx.server().kill9();
        copy_dir(&fx.server().store_dir(), &snapshot);
        fx.server().restart();
        let client = connect(fx.server()).await;
        let mut fx = Fixture {
            js: jetstream::new(client.clone()),
            client,
            ..fx
        };
        let task = {
            let (js, topology) = (fx.js.clone(), fx.topology.clone());
            let (partition, p0) = (store.partition(fx.p0()).expect("partition"), fx.p0());
            tokio::spawn(async move {
                let machine = Machine::new(p0, topology.partitions, Config::default());
                worker::run_partition(&js, &topology, machine, partition, Options::default()).await
            })
        };
        open_accounts(&fx, &["c", "d", "e"]).await;
        task.abort();
        let _ = task.await;
        assert_eq!(
            store
                .partition(fx.p0())
                .expect("partition")
                .clock()
                .expect("read the clock")
                .position,
            5
        );

        // The rollback: the server comes back with the older copy.
        fx.server().kill9();
        std::fs::remove_dir_all(fx.server().store_dir()).expect("remove the store");
        copy_dir(&snapshot, &fx.server().store_dir());
        fx.server().restart();
        let client = connect(fx.server()).await;
        let fx = Fixture {
            js: jetstream::new(client.clone()),
            client,
            ..fx
        };
        for i in 0..6 {
            let id = op_id();
            let body = request(
                &id,
                json!({"type": "open_account", "account": format!("n{i}")}),
            );
            fx.publish(&id, None, body).await;
        }
        match run_until_stopped(&fx, &store).await {
            amends_nats::Error::LogChanged {
                partition: 0,
                position: 5,
                found,
            } => assert!(found.contains("after the store's log time"), "{found}"),
            other => panic!("expected LogChanged, got {other:?}"),
        }
        assert_eq!(
            decision_count(&fx.js, &fx.topology.prefix).await,
            2,
            "only the 2 kept decisions"
        );
    })
    .await;
}

#[tokio::test]
async fn a_partition_whose_log_tail_is_deleted_stops_running_and_at_start() {
    // Proves a trimmed tail is noticed at the partition's own level: while the worker idles, the last applied message of its subject is deleted from the stream (other messages follow it in the stream, so the stream-wide last sequence stays above the applied position); the running worker returns LogChanged, and so does a fresh start on the same store.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        let (store, task) = fx.spawn_worker(Options::default());
        open_accounts(&fx, &["a", "b", "c"]).await;
        // A later message of another subject in the same stream (no
        // partition of this one-partition topology reads it).
        fx.js
            .publish("amends.req.9", "{}".into())
            .await
            .expect("publish")
            .await
            .expect("puback");
        let applied = store
            .partition(fx.p0())
            .expect("partition")
            .clock()
            .expect("read the clock")
            .position;
        assert_eq!(applied, 3);
        let requests = fx.topology.prefix.stream_name(Stream::Requests);
        let stream = fx.js.get_stream(&requests).await.expect("stream");
        stream
            .delete_message(applied)
            .await
            .expect("delete the tail");
        let stopped = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the running worker noticed the deleted tail");
        let panic = stopped.expect_err("the worker stopped with an error");
        let text = panic
            .into_panic()
            .downcast::<String>()
            .map(|s| *s)
            .unwrap_or_default();
        assert!(
            text.contains("the log changed under the applied position 3"),
            "{text}"
        );

        match run_until_stopped(&fx, &store).await {
            amends_nats::Error::LogChanged {
                partition: 0,
                position: 3,
                found,
            } => assert_eq!(found, "no message"),
            other => panic!("expected LogChanged, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_deleted_from_the_log_before_it_was_applied_stops_the_partition() {
    // Proves a hole in the middle of a partition's log is not skipped silently: with the worker stopped after two decisions, three credits are published and the middle one is deleted from the stream; the worker restarted on its store stops at once with LogHole naming the deleted sequence, deciding none of the three; a running, idle worker stops the same way when a message above its applied position is deleted; and a store that starts empty (the operator's recovery: replay the log as it is) accepts the hole, decides the other credits and serves on, also after a restart.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        let (store, task) = fx.spawn_worker(Options::default());
        open_accounts(&fx, &["a", "b"]).await;
        task.abort();
        let _ = task.await;
        drop(store);
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let id = op_id();
            let body = request(&id, json!({"type": "credit", "account": "a", "amount": 5}));
            seqs.push(fx.publish(&id, None, body).await);
        }
        let requests = fx.topology.prefix.stream_name(Stream::Requests);
        let stream = fx.js.get_stream(&requests).await.expect("stream");
        stream
            .delete_message(seqs[1])
            .await
            .expect("delete a request");

        let store = open_store(fx.dir.path());
        match run_until_stopped(&fx, &store).await {
            amends_nats::Error::LogHole {
                partition: 0,
                from: 2,
                missing,
            } => assert_eq!(missing, format!("sequences {} missing", seqs[1])),
            other => panic!("expected LogHole, got {other:?}"),
        }
        assert_eq!(fx.decisions(2).await.len(), 2, "nothing more was decided");
        drop(store);

        // A store that starts empty replays the log as it is now.
        let fresh = tempfile::tempdir().expect("tempdir");
        let store = open_store(fresh.path());
        let task = spawn_on(&fx, &store);
        let decided = fx.decisions(4).await;
        assert_eq!(decided.len(), 4, "{decided:?}");
        assert!(!task.is_finished(), "the fresh store serves on");
        task.abort();
        let _ = task.await;
        let task = spawn_on(&fx, &store);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!task.is_finished(), "and again after a restart");

        // Running and idle: a message above what it applied is deleted (a
        // message of a subject no partition of this topology reads).
        let other = fx
            .js
            .publish("amends.req.9", "{}".into())
            .await
            .expect("publish")
            .await
            .expect("puback")
            .sequence;
        stream.delete_message(other).await.expect("delete");
        let stopped = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the running worker noticed the hole")
            .expect("the task ran");
        match stopped {
            amends_nats::Error::LogHole { missing, .. } => {
                assert_eq!(missing, format!("sequences {other} missing"));
            }
            other => panic!("expected LogHole, got {other:?}"),
        }
    })
    .await;
}

/// Spawns partition 0's worker on `store`; the task returns why it stopped.
fn spawn_on(fx: &Fixture, store: &Store) -> JoinHandle<amends_nats::Error> {
    let (js, topology) = (fx.js.clone(), fx.topology.clone());
    let (partition, p0) = (store.partition(fx.p0()).expect("partition"), fx.p0());
    tokio::spawn(async move {
        let machine = Machine::new(p0, topology.partitions, Config::default());
        match worker::run_partition(&js, &topology, machine, partition, Options::default()).await {
            Err(e) => e,
            Ok(never) => match never {},
        }
    })
}

/// As [`spawn_on`], but the worker is restarted after a transient error
/// (as `serve`'s supervisor restarts it: [`amends_nats::service::is_fatal`]
/// says which are) until `settled` is set; from then on, the task returns
/// the first error. On a cluster that just formed, a worker's first
/// JetStream calls can meet a consumer or stream still settling on a
/// loaded machine; each such restart is printed.
fn spawn_restarting(
    fx: &Fixture,
    store: &Store,
    settled: Arc<AtomicBool>,
) -> JoinHandle<amends_nats::Error> {
    let (js, topology) = (fx.js.clone(), fx.topology.clone());
    let (store, p0) = (store.clone(), fx.p0());
    tokio::spawn(async move {
        loop {
            let partition = store.partition(p0).expect("partition");
            let machine = Machine::new(p0, topology.partitions, Config::default());
            let e =
                match worker::run_partition(&js, &topology, machine, partition, Options::default())
                    .await
                {
                    Err(e) => e,
                    Ok(never) => match never {},
                };
            if amends_nats::service::is_fatal(&e) || settled.load(Ordering::SeqCst) {
                return e;
            }
            eprintln!("the worker restarts after a transient error: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Opens a store of one partition in `dir`.
fn open_store(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        amends_store::Options::new(Partitions::new(1).expect("count")),
    )
    .expect("open store")
}

#[tokio::test]
async fn an_older_owner_is_fenced_and_its_decision_never_lands() {
    // Proves the fence is the server's: a running worker decides, then a newer ownership record of its partition is published (as a new owner does on start); the worker's next decision write is refused by nats-server, the worker stops with Fenced naming the newer epoch, and that decision is not on the decisions stream (no reply either), nor is any re-send on the old epoch.
    within(async {
        an_older_owner_is_fenced(Fixture::start(Duration::from_secs(120)).await).await;
    })
    .await;
}

#[tokio::test]
async fn an_older_owner_is_fenced_on_a_cluster_and_its_decision_never_lands() {
    // Proves the same fence on R3 streams of a 3-node cluster, where a re-send of a stored decision on the old epoch is acknowledged as a duplicate (nothing written) instead of refused: nothing of the older owner lands after the newer record.
    within_cluster(async {
        an_older_owner_is_fenced(Fixture::start_cluster(Duration::from_secs(120)).await).await;
    })
    .await;
}

/// The body of the older-owner tests: a worker decides 2 ops, a newer
/// ownership record is published, the worker's next decision is refused
/// and it stops with Fenced; then the older owner's re-sends on its epoch
/// (of the refused decision, and of a stored one) store nothing.
async fn an_older_owner_is_fenced(fx: Fixture) {
    let store = open_store(&fx.dir.path().join("a"));
    let settled = Arc::new(AtomicBool::new(false));
    let mut task = spawn_restarting(&fx, &store, Arc::clone(&settled));
    tokio::select! {
        () = open_accounts(&fx, &["a", "b"]) => {}
        stopped = &mut task => panic!("the worker stopped before it decided: {stopped:?}"),
    }
    // From here on the worker is not restarted: a restart would publish an
    // ownership record newer than the test's.
    settled.store(true, Ordering::SeqCst);
    let newer = fx
        .js
        .publish(
            fx.topology.prefix.owner(fx.p0()),
            r#"{"owner":"newer"}"#.into(),
        )
        .await
        .expect("publish")
        .await
        .expect("puback")
        .sequence;
    let id = op_id();
    let mut inbox = Inbox::new(&fx.client).await;
    fx.publish(
        &id,
        Some(&inbox.subject),
        request(&id, json!({"type": "open_account", "account": "c"})),
    )
    .await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops")
        .expect("the worker");
    let epoch = match &stopped {
        amends_nats::Error::Fenced {
            partition: 0,
            owner,
            epoch,
        } => {
            assert!(owner.contains(&format!("epoch {newer}")), "{owner}");
            *epoch
        }
        other => panic!("expected Fenced, got {other:?}"),
    };
    inbox.expect_none().await;
    let decisions = fx.decisions(2).await;
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert!(decisions.iter().all(|d| d["op_id"] != id.as_str()));

    // The older owner's re-sends, fenced on its epoch: of the refused
    // decision (a new id) and of a stored one (a's, its id on the stream).
    let stored = decisions[0].clone();
    let stored_id = stored["op_id"].as_str().expect("op id").to_owned();
    let refused = json!({"op_id": id, "position": 3, "outcome": "confirmed"});
    for (msg_id, body) in [(id.as_str(), &refused), (stored_id.as_str(), &stored)] {
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, msg_id);
        headers.insert(
            header::EXPECTED_LAST_SUBJECT_SEQUENCE,
            epoch.to_string().as_str(),
        );
        headers.insert(
            header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
            fx.topology.prefix.owner(fx.p0()).as_str(),
        );
        let acked = fx
            .js
            .publish_with_headers(
                fx.topology.prefix.dec(fx.p0()),
                headers,
                serde_json::to_vec(body).expect("json").into(),
            )
            .await
            .expect("publish")
            .await;
        match acked {
            // A stored id: on a cluster, the duplicate check comes first.
            Ok(ack) => assert!(
                ack.duplicate && msg_id == stored_id,
                "a re-send on the old epoch stored: {ack:?}"
            ),
            Err(e) => assert_eq!(
                e.kind(),
                jetstream::context::PublishErrorKind::WrongLastSequence,
                "{e}"
            ),
        }
    }
    assert_eq!(
        decision_count(&fx.js, &fx.topology.prefix).await,
        2,
        "nothing of the older owner landed"
    );
}

#[tokio::test]
async fn a_store_behind_the_decisions_stream_publishes_nothing_twice_after_the_window() {
    // Proves exactly once on the decisions stream does not rest on JetStream's duplicate window: (1) a committed batch whose decision a crashed run had already published is republished from the outbox after the window has passed, and (2) a worker on a fresh store re-derives decisions another store published; the stream keeps exactly one copy of each.
    within(async {
        a_store_behind_publishes_nothing_twice(Fixture::start(Duration::from_millis(200)).await)
            .await;
    })
    .await;
}

#[tokio::test]
async fn a_store_behind_the_decisions_stream_on_a_cluster_publishes_nothing_twice() {
    // Proves the same on R3 streams of a 3-node cluster: a restarted owner's republish of what is already stored, and a fresh store's re-derived decisions, add no second copy after the duplicate window.
    within_cluster(async {
        a_store_behind_publishes_nothing_twice(
            Fixture::start_cluster(Duration::from_millis(200)).await,
        )
        .await;
    })
    .await;
}

/// The body of the store-behind tests (see the first one).
async fn a_store_behind_publishes_nothing_twice(fx: Fixture) {
    let store = open_store(&fx.dir.path().join("a"));
    // (1) A batch committed, its decision published, the outbox not
    // confirmed: what a crash between publish and confirm leaves.
    let id = op_id();
    let position = fx
        .publish(
            &id,
            None,
            request(&id, json!({"type": "open_account", "account": "a"})),
        )
        .await;
    let partition = store.partition(fx.p0()).expect("partition");
    let machine = Machine::new(fx.p0(), fx.topology.partitions, Config::default());
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("ms");
    let mut changes = amends_core::state::ChangeSet::default();
    let mut effects = Vec::new();
    let input = amends_core::wire::decode_request(&request(
        &id,
        json!({"type": "open_account", "account": "a"}),
    ))
    .expect("a request");
    {
        let mut state = amends_core::state::Overlay::new(&partition, &mut changes);
        machine
            .apply(&mut state, position, now_ms, &input, &mut effects)
            .expect("apply");
    }
    partition.commit(&changes, &effects).expect("commit");
    let Some(amends_core::partition::Effect::Decided(d)) = effects.first() else {
        panic!("a decision: {effects:?}");
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, id.as_str());
    fx.js
        .publish_with_headers(
            fx.topology.prefix.dec(fx.p0()),
            headers,
            amends_core::wire::encode(d).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("puback");
    tokio::time::sleep(Duration::from_millis(400)).await; // past the window
    let task = spawn_on(&fx, &store);
    open_accounts(&fx, &["b"]).await;
    task.abort();
    let _ = task.await;
    assert_eq!(decision_count(&fx.js, &fx.topology.prefix).await, 2);

    // (2) A fresh store replays both requests after the window.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = open_store(&fx.dir.path().join("fresh"));
    let task = spawn_on(&fx, &fresh);
    open_accounts(&fx, &["c"]).await;
    task.abort();
    let _ = task.await;
    let decisions = fx.decisions(3).await;
    let ids: std::collections::BTreeSet<&str> = decisions
        .iter()
        .filter_map(|d| d["op_id"].as_str())
        .collect();
    assert_eq!((decisions.len(), ids.len()), (3, 3), "{decisions:?}");
}

#[tokio::test]
async fn an_over_long_reply_subject_costs_no_one_their_connection() {
    // Proves one client's bad Amends-Reply-To cannot hurt another's answers: a request names a 5,000-byte reply subject (over nats-server's 4 KB control-line limit); it is decided (on the decisions stream) and no reply is sent, and the worker's NATS connection (shared here with the test's client) is never dropped: it still has its one connect, and the next request is answered.
    within(async {
        let fx = Fixture::start(Duration::from_secs(120)).await;
        let task = spawn_on(&fx, &open_store(&fx.dir.path().join("a")));
        let long = format!("_INBOX.{}", "x".repeat(5_000));
        let id = op_id();
        fx.publish(
            &id,
            Some(&long),
            request(&id, json!({"type": "open_account", "account": "long"})),
        )
        .await;
        let decisions = fx.decisions(1).await;
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        assert_eq!(decisions[0]["op_id"], id.as_str());
        open_accounts(&fx, &["next"]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let connects = fx
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(connects, 1, "the connection was dropped and made again");
        task.abort();
    })
    .await;
}
