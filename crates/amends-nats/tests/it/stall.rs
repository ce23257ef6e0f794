//! The worker's stall watchdog: a pull consumer that stops delivering
//! while requests wait is noticed and recreated.
//!
//! The stall is injected for real through the JetStream API: the worker's
//! own durable consumer is paused (`$JS.API.CONSUMER.PAUSE`, nats-server
//! 2.11+) behind its back, so its fetches come back empty while the
//! requests stream holds messages for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use amends_core::partition::{Config, Machine};
use amends_core::route::{PartitionId, Partitions};
use amends_nats::topology::{self, Stream, Topology, header};
use amends_nats::worker::{self, Options};
use amends_store::Store;
use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::{Server, connect, topology, within};

/// How long a test waits for one answer. Paused, the consumer would
/// deliver nothing for an hour; the watchdog must act well within this.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(8);

/// A short fetch wait, so the watchdog looks every 200 ms.
const FETCH_WAIT: Duration = Duration::from_millis(100);

struct Fixture {
    _server: Server,
    client: async_nats::Client,
    js: jetstream::Context,
    topology: Topology,
    _dir: tempfile::TempDir,
    /// How many times the worker stopped with `ConsumerStalled`.
    stalls: Arc<AtomicU32>,
    task: JoinHandle<()>,
}

impl Fixture {
    /// A server, one partition, and its worker run in a loop that restarts
    /// it after `ConsumerStalled` (as the service's supervisor does) and
    /// panics on any other stop.
    async fn start() -> Fixture {
        let server = Server::start();
        let client = connect(&server).await;
        let js = jetstream::new(client.clone());
        let topology = topology("amends", 1);
        topology::ensure(&js, &topology).await.expect("ensure");
        let dir = tempfile::tempdir().expect("tempdir");
        let partitions = Partitions::new(1).expect("count");
        let store =
            Store::open(dir.path(), amends_store::Options::new(partitions)).expect("open store");
        let stalls = Arc::new(AtomicU32::new(0));
        let task = {
            let (js, topology, stalls) = (js.clone(), topology.clone(), stalls.clone());
            tokio::spawn(async move {
                let p0 = p0(&topology);
                loop {
                    let partition = store.partition(p0).expect("partition");
                    let machine = Machine::new(p0, topology.partitions, Config::default());
                    let options = Options {
                        fetch_wait: FETCH_WAIT,
                        ..Options::default()
                    };
                    match worker::run_partition(&js, &topology, machine, partition, options).await {
                        Err(amends_nats::Error::ConsumerStalled { .. }) => {
                            stalls.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => panic!("worker stopped: {e}"),
                        Ok(never) => match never {},
                    }
                }
            })
        };
        Fixture {
            _server: server,
            client,
            js,
            topology,
            _dir: dir,
            stalls,
            task,
        }
    }

    /// Publishes `body` to partition 0, answers to `reply_to`.
    async fn publish(&self, msg_id: &str, reply_to: &str, body: Vec<u8>) {
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, msg_id);
        headers.insert(header::REPLY_TO, reply_to);
        self.js
            .publish_with_headers(
                self.topology.prefix.req(p0(&self.topology)),
                headers,
                body.into(),
            )
            .await
            .expect("publish")
            .await
            .expect("puback");
    }

    /// Pauses the worker's durable consumer for an hour, behind its back.
    async fn pause_worker_consumer(&self) {
        let subject = format!(
            "$JS.API.CONSUMER.PAUSE.{}.{}",
            self.topology.prefix.stream_name(Stream::Requests),
            topology::worker_consumer(p0(&self.topology))
        );
        let until = json!({ "pause_until": "2099-01-01T00:00:00Z" });
        let reply = self
            .client
            .request(subject, serde_json::to_vec(&until).expect("json").into())
            .await
            .expect("pause request");
        let reply: Value = serde_json::from_slice(&reply.payload).expect("pause reply json");
        assert_eq!(reply["paused"], true, "the consumer is paused: {reply}");
    }
}

fn p0(topology: &Topology) -> PartitionId {
    topology.partitions.id(0).expect("partition 0")
}

fn request(op_id: &str, command: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({ "op_id": op_id, "command": command })).expect("json")
}

async fn next(sub: &mut async_nats::Subscriber) -> Value {
    let msg = tokio::time::timeout(ANSWER_TIMEOUT, sub.next())
        .await
        .expect("an answer in time")
        .expect("subscription open");
    serde_json::from_slice(&msg.payload).expect("decision json")
}

#[tokio::test]
async fn a_paused_consumer_is_noticed_and_recreated() {
    // Proves the watchdog: with the worker's consumer paused behind its back, requests that wait in the stream are still decided, after exactly the ConsumerStalled stop and a recreated consumer.
    within(async {
        let fx = Fixture::start().await;
        let inbox = fx.client.new_inbox();
        let mut sub = fx.client.subscribe(inbox.clone()).await.expect("subscribe");
        fx.client.flush().await.expect("flush");

        let open = uuid::Uuid::now_v7().to_string();
        fx.publish(
            &open,
            &inbox,
            request(&open, json!({"type": "open_account", "account": "a"})),
        )
        .await;
        assert_eq!(next(&mut sub).await["outcome"], "confirmed");
        assert_eq!(
            fx.stalls.load(Ordering::SeqCst),
            0,
            "no stall while healthy"
        );

        fx.pause_worker_consumer().await;
        let mut credits = Vec::new();
        for _ in 0..3 {
            let op = uuid::Uuid::now_v7().to_string();
            fx.publish(
                &op,
                &inbox,
                request(&op, json!({"type": "credit", "account": "a", "amount": 5})),
            )
            .await;
            credits.push(op);
        }
        let mut balances = Vec::new();
        for op in &credits {
            let d = next(&mut sub).await;
            assert_eq!(d["op_id"], op.as_str(), "answers in log order: {d}");
            assert_eq!(d["outcome"], "confirmed", "{d}");
            balances.push(d["balance"].as_i64().expect("a balance"));
        }
        assert_eq!(balances, [5, 10, 15], "each waiting credit applied once");
        assert!(
            fx.stalls.load(Ordering::SeqCst) >= 1,
            "the answers came through the watchdog's restart"
        );
        assert!(!fx.task.is_finished(), "the worker is still running");
        fx.task.abort();
    })
    .await;
}

#[tokio::test]
async fn an_idle_partition_ending_in_a_dead_letter_is_not_a_stall() {
    // Proves the watchdog compares with what was delivered, not applied: a trailing dead letter never trips it while the partition idles.
    within(async {
        let fx = Fixture::start().await;
        let inbox = fx.client.new_inbox();
        fx.publish("not-an-op-id", &inbox, b"{ not json".to_vec())
            .await;
        let dlq = fx.topology.prefix.stream_name(Stream::DeadLetters);
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let mut stream = fx.js.get_stream(&dlq).await.expect("dlq stream");
            if stream.info().await.expect("info").state.messages == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "dead letter in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Ten watchdog looks (every two empty fetches of FETCH_WAIT).
        tokio::time::sleep(FETCH_WAIT * 20).await;
        assert_eq!(
            fx.stalls.load(Ordering::SeqCst),
            0,
            "an idle partition is not stalled"
        );
        assert!(!fx.task.is_finished(), "the worker is still running");
        fx.task.abort();
    })
    .await;
}
