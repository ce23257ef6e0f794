//! The service (the supervisor of every partition) against a real
//! nats-server: server restarts, ticks, and a partition whose log went
//! backwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amends_core::partition::{Config, Effect, Machine};
use amends_core::route::{PartitionId, Partitions, partition_of};
use amends_core::state::{ChangeSet, Overlay};
use amends_core::wire;
use amends_nats::service::{self, Service, Supervision};
use amends_nats::topology::{self, Stream, Topology, header};
use amends_nats::worker;
use amends_store::{PartitionStore, Store};
use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::{Server, connect, topology, within};
use amends_nats::test_support::{decision_count, is_decision_subject};

/// How long a test waits for something the service should do promptly.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

struct Fixture {
    js: jetstream::Context,
    topology: Topology,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(partitions: u32) -> (Server, Fixture) {
        let server = Server::start();
        let client = connect(&server).await;
        // A short timeout, so that a publish lost in an outage is retried soon.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(1))
            .build(client);
        let topology = topology("amends", partitions);
        topology::ensure(&js, &topology).await.expect("ensure");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(
            dir.path(),
            amends_store::Options::new(Partitions::new(partitions).expect("count")),
        )
        .expect("open store");
        let fx = Fixture {
            js,
            topology,
            store,
            _dir: dir,
        };
        (server, fx)
    }

    fn options() -> service::Options {
        service::Options {
            worker: worker::Options {
                batch_len_max: 64,
                fetch_wait: Duration::from_millis(100),
                ..worker::Options::default()
            },
            tick_interval: Duration::from_millis(100),
            compact_interval: Duration::from_millis(200),
            ..service::Options::default()
        }
    }

    fn spawn(&self) -> (service::Status, JoinHandle<()>) {
        let service = Service::new(
            &self.js,
            &self.topology,
            &self.store,
            Config::default(),
            Fixture::options(),
        )
        .expect("service");
        let status = service.status();
        let task = tokio::spawn(async move {
            match service.run().await {
                Err(e) => panic!("service returned: {e}"),
                Ok(never) => match never {},
            }
        });
        (status, task)
    }

    fn partition_of(&self, account: &str) -> PartitionId {
        partition_of(account, self.topology.partitions)
    }

    /// Publishes a request until it is acknowledged (retrying through
    /// outages, with the op id as `Nats-Msg-Id`); returns the sequence.
    async fn publish(&self, p: PartitionId, op_id: &str, command: Value) -> u64 {
        let body = serde_json::to_vec(&json!({"op_id": op_id, "command": command})).expect("json");
        loop {
            let mut headers = HeaderMap::new();
            headers.insert(header::MSG_ID, op_id);
            let sent = self
                .js
                .publish_with_headers(self.topology.prefix.req(p), headers, body.clone().into())
                .await;
            match sent {
                Ok(ack) => match ack.await {
                    Ok(ack) => return ack.sequence,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The decisions stream's messages as JSON, once it holds `len` (or
    /// after [`ANSWER_TIMEOUT`]).
    async fn decisions(&self, len: u64) -> Vec<Value> {
        let name = self.topology.prefix.stream_name(Stream::Decisions);
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            // Counted before the stream's end is read, so that every counted
            // decision is at or below that end.
            let counted = decision_count(&self.js, &self.topology.prefix).await;
            if let Ok(mut stream) = self.js.get_stream(&name).await
                && let Ok(info) = stream.info().await
                && (counted >= len || Instant::now() > deadline)
            {
                let mut out = Vec::new();
                for seq in 1..=info.state.last_sequence {
                    if let Ok(m) = stream.get_raw_message(seq).await
                        && is_decision_subject(&self.topology.prefix, &m.subject)
                    {
                        out.push(serde_json::from_slice(&m.payload).expect("json"));
                    }
                }
                return out;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn op_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn code(decision: &Value) -> &str {
    match decision["outcome"].as_str() {
        Some("confirmed") => "confirmed",
        _ => decision["reason"]["code"].as_str().expect("a reason code"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_server_restart_mid_workload_loses_and_doubles_nothing() {
    // Proves the service rides out a SIGKILLed and restarted nats-server on its own: a client retries each publish until acked while the server is down, and afterwards every op has exactly one decision and balances match a naive model in log order.
    within(async {
        let t0 = Instant::now();
        let (mut server, fx) = Fixture::start(4).await;
        let fx = Arc::new(fx);
        let (status, task) = fx.spawn();
        const ACCOUNTS: usize = 8;
        const OPS: usize = 1000;
        let accounts: Vec<String> = (0..ACCOUNTS).map(|a| format!("acct-{a}")).collect();
        for account in &accounts {
            let p = fx.partition_of(account);
            fx.publish(
                p,
                &op_id(),
                json!({"type": "open_account", "account": account}),
            )
            .await;
        }
        let spread: Vec<u32> = accounts.iter().map(|a| fx.partition_of(a).get()).collect();
        let mut used = spread.clone();
        used.sort_unstable();
        used.dedup();
        assert!(
            used.len() >= 3,
            "the accounts cover most partitions: {spread:?}"
        );

        let sent = Arc::new(AtomicUsize::new(0));
        let publisher = tokio::spawn({
            let fx = Arc::clone(&fx);
            let sent = Arc::clone(&sent);
            let accounts = accounts.clone();
            async move {
                let mut ops = BTreeMap::new(); // op id -> (account, credit?, amount)
                for i in 0..OPS {
                    let id = op_id();
                    let account = i % ACCOUNTS;
                    let amount = u64::try_from((i * 7919) % 100 + 1).expect("small");
                    let credit = !(i % 3 == 2 || i % 5 == 4);
                    let kind = if credit { "credit" } else { "debit" };
                    let name = &accounts[account];
                    fx.publish(
                        fx.partition_of(name),
                        &id,
                        json!({"type": kind, "account": name, "amount": amount}),
                    )
                    .await;
                    ops.insert(id, (account, credit, amount));
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                ops
            }
        });
        while sent.load(Ordering::Relaxed) < OPS / 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let restarted_at = sent.load(Ordering::Relaxed);
        let mut server = tokio::task::spawn_blocking(move || {
            server.kill9();
            std::thread::sleep(Duration::from_millis(300));
            server.restart();
            server
        })
        .await
        .expect("restart the server");
        let restarted = t0.elapsed();
        let ops = publisher.await.expect("publisher");
        let published = t0.elapsed();
        assert!(restarted_at < OPS, "the restart fell mid-workload");

        let total = ACCOUNTS + OPS;
        let decisions = fx.decisions(u64::try_from(total).expect("small")).await;
        eprintln!(
            "restarted at {restarted:?}, published at {published:?}, decided at {:?}",
            t0.elapsed()
        );
        let mut by_op: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
        for d in &decisions {
            by_op
                .entry(d["op_id"].as_str().expect("a decision"))
                .or_default()
                .push(d);
        }
        assert_eq!(
            by_op.len(),
            total,
            "every op answered: {:?}",
            status.snapshot()
        );
        assert_eq!(decisions.len(), total, "one decision per op");

        // A naive model, in log order (the position of each decision).
        let mut ordered: Vec<(u64, &str)> = ops
            .keys()
            .map(|id| {
                let d = by_op[id.as_str()][0];
                (d["position"].as_u64().expect("position"), id.as_str())
            })
            .collect();
        ordered.sort_unstable();
        let mut balances = [0_i64; ACCOUNTS];
        for (_, id) in ordered {
            let (account, credit, amount) = ops[id];
            let amount = i64::try_from(amount).expect("small");
            let d = by_op[id][0];
            let expected = if credit {
                balances[account] += amount;
                "confirmed"
            } else if balances[account] >= amount {
                balances[account] -= amount;
                "confirmed"
            } else {
                "insufficient_funds"
            };
            assert_eq!(code(d), expected, "{d}");
            if expected == "confirmed" {
                assert_eq!(d["balance"], balances[account], "{d}");
            }
        }
        for (a, name) in accounts.iter().enumerate() {
            let state = fx
                .store
                .partition(fx.partition_of(name))
                .expect("partition")
                .to_mem_state()
                .expect("state");
            let balance = state
                .accounts()
                .find(|(id, _)| id.as_str() == name)
                .map(|(_, acc)| acc.balance);
            assert_eq!(balance, Some(balances[a]), "{name}");
        }
        let snapshot = status.snapshot();
        eprintln!("status after the restart: {snapshot:?}");
        assert!(
            snapshot
                .partitions
                .iter()
                .all(|p| p.state == Supervision::Running),
            "{snapshot:?}"
        );
        task.abort();
        let _ = task.await;
        server.kill9();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_expires_on_an_idle_partition_through_ticks() {
    // Proves the ticker: a 200 ms hold on a partition that receives nothing else expires, and its hold-expired event reaches the decisions stream, because the service appends ticks.
    within(async {
        let (_server, fx) = Fixture::start(2).await;
        let (_status, task) = fx.spawn();
        let p = fx.partition_of("alice");
        fx.publish(
            p,
            &op_id(),
            json!({"type": "open_account", "account": "alice"}),
        )
        .await;
        fx.publish(
            p,
            &op_id(),
            json!({"type": "credit", "account": "alice", "amount": 100}),
        )
        .await;
        let hold = op_id();
        fx.publish(
            p,
            &hold,
            json!({"type": "hold", "account": "alice", "amount": 60, "timeout_ms": 200}),
        )
        .await;
        let started = Instant::now();
        let decisions = fx.decisions(4).await;
        let elapsed = started.elapsed();
        assert_eq!(decisions.len(), 4, "{decisions:?}");
        let expired = &decisions[3];
        assert_eq!(expired["hold"], hold.as_str(), "{expired}");
        assert!(expired.get("event_id").is_some(), "{expired}");
        assert!(
            elapsed < Duration::from_secs(3),
            "expired after {elapsed:?}"
        );
        task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_log_went_backwards_stops_and_the_others_go_on() {
    // Proves the supervisor stops only the faulty partition: partition 0's store is forged to have applied position 1,000,000 (beyond the log's end, as if the log lost messages), so it is Stopped with LogBehind and not restarted, while partition 1 keeps confirming.
    within(async {
        let (_server, fx) = Fixture::start(2).await;
        let p0 = fx.topology.partitions.id(0).expect("p0");
        let partition = fx.store.partition(p0).expect("partition");
        let tick = format!(r#"{{"op_id":"{}","command":{{"type":"tick"}}}}"#, op_id());
        let input = wire::decode_request(tick.as_bytes()).expect("a tick");
        let machine = Machine::new(p0, fx.topology.partitions, Config::default());
        let mut changes = ChangeSet::default();
        let mut effects: Vec<Effect> = Vec::new();
        {
            let mut state = Overlay::new(&partition, &mut changes);
            machine
                .apply(&mut state, 1_000_000, 1, &input, &mut effects)
                .expect("apply");
        }
        partition.commit(&changes, &effects).expect("commit");

        let (status, task) = fx.spawn();
        let account = (0..)
            .map(|i| format!("acct-{i}"))
            .find(|a| fx.partition_of(a).get() == 1)
            .expect("an account of partition 1");
        let p1 = fx.partition_of(&account);
        for (id, command) in [
            (op_id(), json!({"type": "open_account", "account": account})),
            (
                op_id(),
                json!({"type": "credit", "account": account, "amount": 5}),
            ),
        ] {
            fx.publish(p1, &id, command).await;
        }
        let decisions = fx.decisions(2).await;
        let codes: Vec<&str> = decisions.iter().map(code).collect();
        assert_eq!(codes, ["confirmed", "confirmed"]);

        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let snapshot = loop {
            let snapshot = status.snapshot();
            if matches!(snapshot.partitions[0].state, Supervision::Stopped { .. })
                || Instant::now() > deadline
            {
                break snapshot;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match &snapshot.partitions[0].state {
            Supervision::Stopped { reason } => {
                assert!(reason.contains("went backwards"), "{reason}");
            }
            other => panic!("partition 0 should be stopped: {other:?}"),
        }
        assert_eq!(snapshot.partitions[0].applied_position, 1_000_000);
        assert_eq!(snapshot.partitions[0].restarts, 0);
        assert_eq!(snapshot.partitions[1].state, Supervision::Running);
        assert!(snapshot.partitions[1].applied_position > 0);
        assert!(!task.is_finished(), "the service goes on");
        task.abort();
    })
    .await;
}

/// Asks the status endpoint of partition `p`, retrying while nobody answers
/// yet (the service subscribes when it starts).
async fn ask_status(fx: &Fixture, p: PartitionId, body: &str) -> Value {
    let nats = fx.js.client();
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        match nats
            .request(fx.topology.prefix.status(p), body.to_owned().into())
            .await
        {
            Ok(reply) => return serde_json::from_slice(&reply.payload).expect("json"),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no status reply: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_endpoint_tells_decided_unknown_and_bad_requests() {
    // Proves the status endpoint: a decided op comes back with the decision the decisions stream holds, an op never sent is unknown, and a body that is not an op id is an error.
    within(async {
        let (_server, fx) = Fixture::start(2).await;
        let (_status, task) = fx.spawn();
        let p = fx.partition_of("alice");
        let opened = op_id();
        fx.publish(
            p,
            &opened,
            json!({"type": "open_account", "account": "alice"}),
        )
        .await;
        let decisions = fx.decisions(1).await;
        assert_eq!(decisions.len(), 1, "{decisions:?}");

        let reply = ask_status(&fx, p, &opened).await;
        assert_eq!(reply["status"], "decided", "{reply}");
        assert_eq!(reply["decision"], decisions[0], "{reply}");

        let reply = ask_status(&fx, p, &op_id()).await;
        assert_eq!(reply, json!({"status": "unknown"}));

        for garbage in ["not an op id", "", &opened.to_uppercase()] {
            let reply = ask_status(&fx, p, garbage).await;
            assert_eq!(reply["status"], "error", "{garbage:?}: {reply}");
            assert!(reply["detail"].is_string(), "{reply}");
        }
        task.abort();
    })
    .await;
}
