//! The transport ceiling: everything amends does on the wire, nothing else.
//!
//! A submitter publishes each request (the same JSON body amends would
//! get) to a JetStream stream, on the subject of its partition, with
//! `Nats-Msg-Id` and the reply-subject header, and waits for the PubAck.
//! One task per partition pulls batches from a pull consumer exactly as an
//! amends worker does (same batch size, same fetch wait, ack policy all),
//! publishes one decision per message to a second JetStream stream
//! (PubAcks awaited), sends each reply on core NATS, and acknowledges the
//! batch. The submitter's answer is that reply. No decoding, no checking,
//! no store: an upper bound for amends on the same server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amends_core::route::{Partitions, partition_of};
use amends_nats::topology::header;
use amends_nats::worker;
use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::amends::request_json;
use super::workload::{Answer, Op, Target};

/// The subject prefix of the ceiling's streams, apart from amends's.
const SUBJECT_PREFIX: &str = "ceiling";

/// The ceiling's streams.
const STREAM_REQ: &str = "BENCH_CEILING_REQ";
const STREAM_DEC: &str = "BENCH_CEILING_DEC";

/// The streams' duplicate window: amends's default.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Waiters of one submitting connection, by request number.
type Waiters = Mutex<HashMap<u64, oneshot::Sender<()>>>;

/// One submitting connection.
struct Submitter {
    js: jetstream::Context,
    inbox: String,
    waiters: Arc<Waiters>,
    next: std::sync::atomic::AtomicU64,
    demux: JoinHandle<()>,
}

/// The ceiling pipeline: its workers and its submitting connections.
pub struct Ceiling {
    partitions: Partitions,
    submitters: Vec<Submitter>,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        for w in &self.workers {
            w.abort();
        }
        for s in &self.submitters {
            s.demux.abort();
        }
    }
}

impl Ceiling {
    /// Creates the streams on the server at `url`, starts one worker per
    /// partition (on one connection, like `amends serve`) and `clients`
    /// submitting connections.
    pub async fn start(
        url: &str,
        partitions: Partitions,
        clients: usize,
    ) -> anyhow::Result<Ceiling> {
        let nats = async_nats::connect(url)
            .await
            .context("connecting the ceiling's workers")?;
        let js = jetstream::new(nats);
        for (name, kind) in [(STREAM_REQ, "req"), (STREAM_DEC, "dec")] {
            js.get_or_create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{SUBJECT_PREFIX}.{kind}.*")],
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..stream::Config::default()
            })
            .await
            .with_context(|| format!("creating stream {name}"))?;
        }
        let requests = js
            .get_stream(STREAM_REQ)
            .await
            .context("opening the ceiling's requests stream")?;
        let mut workers = Vec::new();
        for p in 0..partitions.get() {
            let consumer: consumer::PullConsumer = requests
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(format!("ceiling-{p}")),
                    filter_subject: format!("{SUBJECT_PREFIX}.req.{p}"),
                    ack_policy: consumer::AckPolicy::All,
                    ack_wait: worker::ACK_WAIT_DEFAULT,
                    ..consumer::pull::Config::default()
                })
                .await
                .with_context(|| format!("creating the ceiling's consumer {p}"))?;
            workers.push(tokio::spawn(work(js.clone(), consumer, p)));
        }
        let mut submitters = Vec::new();
        for _ in 0..clients.max(1) {
            let nats = async_nats::connect(url)
                .await
                .context("connecting a ceiling submitter")?;
            let inbox = nats.new_inbox();
            let mut sub = nats
                .subscribe(format!("{inbox}.*"))
                .await
                .context("subscribing to the ceiling's inbox")?;
            nats.flush().await.context("flushing the subscription")?;
            let waiters = Arc::new(Waiters::default());
            let demux_waiters = Arc::clone(&waiters);
            let demux = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let n = msg
                        .subject
                        .rsplit('.')
                        .next()
                        .and_then(|t| t.parse::<u64>().ok());
                    if let Some(n) = n
                        && let Ok(mut w) = demux_waiters.lock()
                        && let Some(tx) = w.remove(&n)
                    {
                        let _ = tx.send(());
                    }
                }
            });
            submitters.push(Submitter {
                js: jetstream::new(nats),
                inbox,
                waiters,
                next: std::sync::atomic::AtomicU64::new(0),
                demux,
            });
        }
        Ok(Ceiling {
            partitions,
            submitters,
            workers,
        })
    }

    /// Fails if a worker stopped with an error.
    pub fn check(&self) -> anyhow::Result<()> {
        for w in &self.workers {
            if w.is_finished() {
                anyhow::bail!("a ceiling worker stopped");
            }
        }
        Ok(())
    }
}

/// One partition's worker: fetch, publish decisions, reply, ack.
async fn work(
    js: jetstream::Context,
    consumer: consumer::PullConsumer,
    p: u32,
) -> anyhow::Result<()> {
    let client = js.client();
    let mut position = 0_u64;
    loop {
        let mut fetched = consumer
            .fetch()
            .max_messages(worker::BATCH_LEN_MAX_DEFAULT)
            .expires(worker::FETCH_WAIT_DEFAULT)
            .messages()
            .await
            .context("ceiling fetch")?;
        let mut batch = Vec::new();
        while let Some(m) = fetched.next().await {
            batch.push(m.map_err(|e| anyhow::anyhow!("ceiling fetch: {e}"))?);
        }
        let Some(last) = batch.last() else {
            continue;
        };
        let mut acks = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for m in &batch {
            position += 1;
            let headers = m.headers.as_ref();
            let op_id = headers
                .and_then(|h| h.get(header::MSG_ID))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            // A body the size of an amends decision.
            let decision = serde_json::json!({
                "op_id": op_id,
                "partition": p,
                "position": position,
                "log_time_ms": 0,
                "outcome": "confirmed",
            })
            .to_string();
            let mut h = HeaderMap::new();
            h.insert(header::MSG_ID, op_id.as_str());
            let ack = js
                .publish_with_headers(
                    format!("{SUBJECT_PREFIX}.dec.{p}"),
                    h,
                    decision.clone().into(),
                )
                .await
                .context("ceiling publish")?;
            acks.push(ack);
            if let Some(reply) = headers.and_then(|h| h.get(header::REPLY_TO)) {
                replies.push((reply.as_str().to_owned(), decision));
            }
        }
        for ack in acks {
            ack.await.context("ceiling publish ack")?;
        }
        for (subject, body) in replies {
            client
                .publish(subject, body.into())
                .await
                .context("ceiling reply")?;
        }
        last.ack()
            .await
            .map_err(|e| anyhow::anyhow!("ceiling ack: {e}"))?;
    }
}

impl Target for Ceiling {
    async fn execute(&self, client: usize, op: Op) -> anyhow::Result<Answer> {
        let submitter = self
            .submitters
            .get(client % self.submitters.len().max(1))
            .context("no ceiling submitter")?;
        let (op_id, body, routing_key) = request_json(op);
        let p = partition_of(&routing_key, self.partitions);
        let n = submitter
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        submitter
            .waiters
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned waiters"))?
            .insert(n, tx);
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, op_id.as_str());
        headers.insert(
            header::REPLY_TO,
            format!("{}.{n}", submitter.inbox).as_str(),
        );
        submitter
            .js
            .publish_with_headers(
                format!("{SUBJECT_PREFIX}.req.{}", p.get()),
                headers,
                body.into(),
            )
            .await
            .context("ceiling submit")?
            .await
            .context("ceiling submit ack")?;
        rx.await.context("ceiling reply lost")?;
        Ok(Answer::Confirmed)
    }
}
