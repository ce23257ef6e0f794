//! The partition worker: the driver that moves one partition's request log
//! through the core state machine and into the store, then out to NATS.
//!
//! ```text
//! start:  check the log under the store -> publish the ownership record (epoch)
//!         -> republish the unconfirmed outbox (without what the stream holds)
//!         -> (re)create the pull consumer at applied + 1
//! loop:   fetch batch N+1 -> Machine::take each message (decode, apply or
//!            dead-letter) over the store and batch N's changes (batch N is
//!            committing meanwhile) -> wait for N's commit
//!         -> hand N to the publisher task -> start N+1's PartitionStore::commit
//! publisher (its own task, batches in commit order, while the loop goes on):
//!         publish the batch's decisions in order, fenced on the epoch (PubAcks
//!         awaited; pipelined on one replica, one at a time on a cluster),
//!         then its apologies, saga messages and dead letters (deterministic
//!         Nats-Msg-Id) -> outbox_confirm -> replies to Amends-Reply-To (core
//!         NATS) -> ack the batch
//! ```
//!
//! Commits are strictly in order, so the durable state is always a prefix
//! of the log. When the loop stops on an error, [`run_partition`] waits for
//! the commit in flight before it returns, so a restarted worker never
//! races it. Every await point is a safe place to crash or be cancelled: the store's
//! applied position and outbox say where to resume, the consumer is
//! recreated from the store's position on every start, and everything
//! published carries a deterministic `Nats-Msg-Id`, so a republish inside
//! the streams' duplicate window stores nothing twice; on the decisions
//! stream, a republish after it stores nothing twice either, because the
//! worker reads which decisions are there first.
//!
//! One writer per partition is the server's to enforce: every decision
//! write names this worker's ownership record, so once a newer worker (in
//! this process or another) has published its own, this one's writes are
//! refused and it stops with [`Error::Fenced`].
//!
//! A message that cannot be read is no exception: `Machine::take` moves the
//! applied position past it and pushes an `Effect::DeadLetter`, which is
//! committed in the outbox with the batch and published after the commit
//! like an apology (unfenced, once the batch's decisions are stored), with
//! the id `dlq-<p>-<position>`. A crash after the commit republishes it
//! from the outbox on the next start (the dead-letter stream's duplicate
//! window drops a copy a crashed run had published), and once committed
//! the message is never read again.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use amends_core::decision::Decision;
use amends_core::partition::{Effect, Fault, LogMessage, Machine, Taken};
use amends_core::protocol::OwnershipRecord;
use amends_core::protocol::query::PartitionOwner;
use amends_core::route::PartitionId;
use amends_core::state::{ChangeSet, Clock, Overlay, Read, Stacked};
use amends_core::wire;
use amends_store::{OutboxSeq, PartitionStore};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::topology::{Prefix, Stream, Topology, header, last_on_subject};
use crate::{Error, Source};

/// The default largest batch: one commit (one fsync) per this many
/// messages at most. Larger batches amortise the fsync; smaller ones answer
/// sooner under light load (a batch is committed as soon as the fetch
/// returns, full or not).
pub const BATCH_LEN_MAX_DEFAULT: usize = 256;

/// The default longest wait of one fetch for its batch to fill. An idle
/// partition loops this often; a busy one never waits this long.
pub const FETCH_WAIT_DEFAULT: Duration = Duration::from_millis(500);

/// How long JetStream waits for the ack of a delivered batch before it
/// delivers it again. A batch is acknowledged after its commit; a
/// redelivery of what was applied is skipped (see
/// [`run_partition`]), so this only bounds how soon a lost ack is retried.
pub const ACK_WAIT_DEFAULT: Duration = Duration::from_secs(30);

/// Committed batches that may wait for the publisher while the worker
/// applies and commits the next one. Two let a partition commit batch N+1
/// while batch N is published; more only queue.
pub const PIPELINE_DEPTH: usize = 2;

/// The fetch wait while a commit is in flight: long enough to take the
/// messages already there, short enough not to hold the commit's
/// publication back.
pub const PIPELINED_FETCH_WAIT: Duration = Duration::from_millis(1);

/// How often a fenced decision write refused as busy (error 10164: a
/// clustered stream checks one fenced write per subject at a time, so
/// another owner's write racing this one makes it busy) is tried again
/// before the worker gives up and restarts.
pub const FENCE_BUSY_TRIES: u32 = 100;

/// The pause before the first retry of a busy fenced write; it grows
/// linearly with each retry.
pub const FENCE_BUSY_BACKOFF: Duration = Duration::from_millis(2);

/// JetStream's error code for a fenced write refused because another one
/// on the same subject is being checked (clustered streams).
const FENCE_BUSY_CODE: u64 = 10164;

/// Outbox entries republished per page on start.
pub const OUTBOX_PAGE_LEN: usize = 1024;

/// The stall watchdog looks at the requests stream after this many empty
/// fetches in a row (with [`FETCH_WAIT_DEFAULT`], once a second). A pull
/// consumer was once seen idle for seconds after a nats-server restart
/// while messages waited; two looks in a row that both see a message past
/// what was delivered, with only empty fetches between them, prove a stall
/// (a message published between a fetch and a look is not one), and the
/// worker stops with [`Error::ConsumerStalled`] to recreate its consumer.
pub const STALL_CHECK_IDLE_FETCHES: u32 = 2;

/// The worker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The most messages per fetch, hence per commit.
    pub batch_len_max: usize,
    /// The longest a fetch waits for its batch.
    pub fetch_wait: Duration,
    /// The consumer's ack wait.
    pub ack_wait: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            batch_len_max: BATCH_LEN_MAX_DEFAULT,
            fetch_wait: FETCH_WAIT_DEFAULT,
            ack_wait: ACK_WAIT_DEFAULT,
        }
    }
}

/// The `Nats-Msg-Id` of a dead letter: derived from its position, so the
/// republish after a crash is dropped by the dead-letter stream.
pub fn dead_letter_msg_id(partition: PartitionId, position: u64) -> String {
    format!("dlq-{partition}-{position}")
}

/// Runs the worker of one partition until it fails.
///
/// `store` is the partition's handle in the store (its only writer while
/// this runs); `machine` must be the same partition's. On start it
/// republishes the unconfirmed outbox, checks that the requests stream
/// does not end below the applied position, and recreates the durable
/// consumer `worker-<p>` (filtered to `<prefix>.req.<p>`, ack-all) at the
/// applied position + 1: the store is the source of truth, never the
/// consumer's own progress.
///
/// A redelivered message (JetStream's `delivered > 1`) at or below the
/// applied position was applied already and is skipped; a first delivery
/// there is [`Error::LogBehind`]. Bad input never stops the partition.
/// A consumer that delivers nothing while the stream holds requests for it
/// stops the worker with [`Error::ConsumerStalled`] (see
/// [`STALL_CHECK_IDLE_FETCHES`]), so that it is recreated.
/// Cancel it by dropping the future (or aborting its task): every await is
/// a safe point to stop, and the next start resumes from the store. A
/// commit in flight then runs to its end on the blocking pool; a driver
/// that starts another worker on the same partition in the same process
/// after dropping one should give it that moment (the supervisor never
/// drops a worker to restart it: it restarts one that returned, and
/// `run_partition` returns only after its commit in flight).
pub async fn run_partition<P: PartitionStore>(
    js: &jetstream::Context,
    topology: &Topology,
    machine: Machine,
    store: P,
    options: Options,
) -> Result<Infallible, Error> {
    topology.validate()?;
    let id = store.id();
    let p = id.get();
    if machine.partition() != id || topology.partitions.id(p) != Some(id) {
        return Err(Error::Misconfigured(format!(
            "store partition {id}, machine partition {}, topology of {} partitions",
            machine.partition(),
            topology.partitions.get()
        )));
    }

    let mut worker = Worker {
        js: js.clone(),
        prefix: topology.prefix.clone(),
        machine,
        store: Some(store),
        changes: ChangeSet::default(),
        epoch: 0,
        fence_pipelined: false,
        catch_up: None,
        holes_checked: 0,
    };

    let applied = worker.clock()?.position;
    let requests = topology.prefix.stream_name(Stream::Requests);
    let mut stream = js
        .get_stream(&requests)
        .await
        .map_err(nats_error(p, "get stream"))?;
    let last = stream
        .info()
        .await
        .map_err(nats_error(p, "stream info"))?
        .state
        .last_sequence;
    if last < applied {
        let fault = Fault::PositionNotAdvancing { applied, got: last };
        tracing::error!(partition = p, %fault, "requests stream ends below the applied position; stopping the partition");
        return Err(Error::LogBehind {
            partition: p,
            fault,
        });
    }
    let subject = topology.prefix.req(id);
    check_tail(&stream, &subject, p, worker.clock()?).await?;
    // Holes in the log: a store that starts empty takes the log as it is
    // (an operator chose to replay it), else what it applied was checked.
    if applied == 0 {
        let store = worker.store()?;
        store
            .accept_log_up_to(last)
            .map_err(|e| worker.store_error(e))?;
    }
    let accepted = worker
        .store()?
        .log_accepted()
        .map_err(|e| worker.store_error(e))?;
    worker.holes_checked = applied.max(accepted);
    check_holes(&stream, p, worker.holes_checked).await?;
    // From here on this worker is the partition's writer: an older one's
    // decision writes are refused by the server.
    worker.epoch = claim_ownership(js, &topology.prefix, id).await?;
    worker.fence_pipelined = decisions_unreplicated(js, &topology.prefix, p).await?;
    // A store behind the decisions stream (a new store, or an older copy)
    // re-derives decisions an earlier owner published: they are not
    // published again.
    let through = last_published_position(js, &topology.prefix, id).await?;
    if through > applied {
        let ids = published_ids(js, &topology.prefix, id, 1).await?;
        tracing::info!(
            partition = p,
            applied,
            through,
            published = ids.len(),
            "catching up: decisions already on the stream are not published again"
        );
        worker.catch_up = Some(Arc::new(CatchUp { through, ids }));
    }
    worker.republish_outbox().await?;
    let name = crate::topology::worker_consumer(id);
    match stream.delete_consumer(&name).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            ) => {}
        Err(e) => return Err(nats_error(p, "delete consumer")(e)),
    }
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("amends worker of partition {p}")),
            filter_subject: topology.prefix.req(id),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: applied.saturating_add(1),
            },
            ack_policy: consumer::AckPolicy::All,
            ack_wait: options.ack_wait,
            ..consumer::pull::Config::default()
        })
        .await
        .map_err(nats_error(p, "create consumer"))?;
    tracing::info!(partition = p, consumer = %name, start = applied.saturating_add(1), epoch = worker.epoch, "partition worker started");

    // Committed batches go to the publisher in order; it publishes while
    // the next batch is applied and committed. Backpressure: at most
    // `PIPELINE_DEPTH` committed batches wait.
    let (to_publish, mut committed) = tokio::sync::mpsc::channel::<Outgoing>(PIPELINE_DEPTH);
    let mut publisher = worker.publisher()?;
    let mut publishing = AbortOnDrop(tokio::spawn(async move {
        while let Some(batch) = committed.recv().await {
            publisher.publish_committed(batch).await?;
        }
        Ok(())
    }));

    // The batch being committed while the next one is fetched and applied.
    // Whatever stops the loop, that commit is waited for before the worker
    // returns: a restarted worker must never race it.
    let mut pending: Option<InFlight> = None;
    let stopped = pump(
        &mut worker,
        &consumer,
        &mut stream,
        &subject,
        options,
        applied,
        &to_publish,
        &mut publishing,
        &mut pending,
    )
    .await;
    if let Some(in_flight) = pending.take() {
        let _ = in_flight.task.await;
    }
    stopped
}

/// The worker's loop: fetch, apply over the batch being committed, hand
/// that batch to the publisher, commit this one. Returns only on an error.
#[allow(clippy::too_many_arguments)]
async fn pump<P: PartitionStore>(
    worker: &mut Worker<P>,
    consumer: &consumer::PullConsumer,
    stream: &mut jetstream::stream::Stream,
    subject: &str,
    options: Options,
    applied: u64,
    to_publish: &tokio::sync::mpsc::Sender<Outgoing>,
    publishing: &mut AbortOnDrop,
    pending: &mut Option<InFlight>,
) -> Result<Infallible, Error> {
    let p = worker.partition();
    let mut consumer_seq = 0_u64;
    // The stall watchdog: the last stream sequence delivered, the empty
    // fetches in a row, and what the last look at the stream saw waiting.
    let mut delivered = applied;
    let mut idle_fetches = 0_u32;
    let mut suspect: Option<u64> = None;
    loop {
        if publishing.0.is_finished() {
            return Err(publisher_stopped(publishing, p).await);
        }
        // With a commit in flight, only take what is there already: the
        // committed batch must not wait for new requests to be published.
        let wait = match *pending {
            Some(_) => PIPELINED_FETCH_WAIT,
            None => options.fetch_wait,
        };
        let mut fetched = consumer
            .fetch()
            .max_messages(options.batch_len_max.max(1))
            .expires(wait)
            .messages()
            .await
            .map_err(nats_error(p, "fetch"))?;
        let mut batch = Vec::new();
        while let Some(message) = fetched.next().await {
            batch.push(message.map_err(nats_error(p, "fetch"))?);
        }
        if batch.is_empty()
            && let Some(in_flight) = pending.take()
        {
            let done = worker.finish(in_flight).await?;
            hand_over(to_publish, publishing, done, p).await?;
            continue;
        }
        let Some(last) = batch.last().cloned() else {
            idle_fetches = idle_fetches.saturating_add(1);
            if idle_fetches.is_multiple_of(STALL_CHECK_IDLE_FETCHES) {
                let none = jetstream::stream::LastRawMessageErrorKind::NoMessageFound;
                let waiting = match stream.get_last_raw_message_by_subject(subject).await {
                    Ok(message) => message.sequence,
                    Err(e) if e.kind() == none => 0,
                    Err(e) => return Err(nats_error(p, "stall check")(e)),
                };
                // Idle is when the tail is looked at again: a trim or a
                // rollback of the log while the partition runs.
                check_tail(stream, subject, p, worker.clock()?).await?;
                check_holes(stream, p, worker.holes_checked).await?;
                worker.holes_checked = worker.holes_checked.max(worker.clock()?.position);
                if suspect.is_some_and(|seen| seen > delivered) {
                    tracing::warn!(
                        partition = p,
                        delivered,
                        waiting,
                        "consumer stalled; recreating"
                    );
                    return Err(Error::ConsumerStalled {
                        partition: p,
                        delivered,
                        waiting,
                    });
                }
                suspect = (waiting > delivered).then_some(waiting);
            }
            continue;
        };
        idle_fetches = 0;
        suspect = None;
        for message in &batch {
            let info = message.info().map_err(nats_error(p, "read message info"))?;
            // Every delivery must follow the last one without a gap: a
            // delivery the client library dropped (async-nats 0.51 drops a
            // fetch's buffered messages once its own expiry timer fires,
            // as after a pause of the process) must never be acknowledged
            // by a later one under ack-all.
            if info.consumer_sequence > consumer_seq.saturating_add(1) {
                tracing::warn!(
                    partition = p,
                    last = consumer_seq,
                    got = info.consumer_sequence,
                    "deliveries missing from the consumer; recreating it"
                );
                return Err(Error::ConsumerGap {
                    partition: p,
                    last: consumer_seq,
                    got: info.consumer_sequence,
                });
            }
            if info.consumer_sequence <= consumer_seq {
                tracing::warn!(
                    partition = p,
                    last = consumer_seq,
                    got = info.consumer_sequence,
                    "the consumer went backwards; recreating it"
                );
                return Err(Error::ConsumerReset {
                    partition: p,
                    last: consumer_seq,
                    got: info.consumer_sequence,
                });
            }
            consumer_seq = info.consumer_sequence;
            delivered = delivered.max(info.stream_sequence);
        }
        // Decide this batch over the store and the batch being committed,
        // while that commit runs; then commit this one.
        let below = pending.as_ref().map(|f| Arc::clone(&f.changes));
        let decided = worker.decide(&batch, below).await?;
        if let Some(in_flight) = pending.take() {
            let done = worker.finish(in_flight).await?;
            hand_over(to_publish, publishing, done, p).await?;
        }
        *pending = Some(worker.start_commit(decided, last)?);
    }
}

/// Checks that the requests stream still holds, at the store's applied
/// position, the message the store applied there: a message of this
/// partition's subject, no newer than the store's log time. The stream has
/// no age or size limits, so that message can be gone or replaced only if
/// the log was trimmed, or rolled back (a restore of an older copy, or
/// acknowledged writes lost) and new requests took its sequence: deciding
/// on from the consumer's start would skip those requests.
///
/// A message of another partition there, or one published later than
/// everything the store applied, or none, is [`Error::LogChanged`]. (A
/// rollback refilled by a message of this partition whose timestamp is not
/// later, which needs the server's clock to have gone back, is not seen
/// here; `amends audit` compares every decision with the log.)
async fn check_tail(
    stream: &jetstream::stream::Stream,
    subject: &str,
    p: u32,
    applied: amends_core::state::Clock,
) -> Result<(), Error> {
    if applied.position == 0 {
        return Ok(());
    }
    let changed = |found: String| {
        tracing::error!(partition = p, position = applied.position, %found, "the log changed under the applied position; stopping the partition");
        Err(Error::LogChanged {
            partition: p,
            position: applied.position,
            found,
        })
    };
    let message = match stream.get_raw_message(applied.position).await {
        Ok(message) => message,
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return changed("no message".to_owned());
        }
        Err(e) => return Err(nats_error(p, "read the applied message")(e)),
    };
    if message.subject.as_str() != subject {
        return changed(format!("a message of {}", message.subject));
    }
    let time_ms = log_time_ms(message.time.unix_timestamp_nanos());
    if time_ms > applied.log_time_ms {
        return changed(format!(
            "a message published at {time_ms} ms, after the store's log time {} ms",
            applied.log_time_ms
        ));
    }
    Ok(())
}

/// Looks for messages missing from the requests stream above `from`: the
/// sequences JetStream lists as deleted, and those before its first
/// sequence (a purge of its head). The requests stream never loses a
/// message on its own (limits retention, no age or size limit), so a
/// missing one was deleted or purged by hand, or lost with the server's
/// disk, and one of this partition's requests may be among them: a
/// consumer skips such a hole without a word. Interior messages of other
/// partitions cannot be told apart (a deleted message has no subject any
/// more), so any hole above `from` stops the partition.
async fn check_holes(stream: &jetstream::stream::Stream, p: u32, from: u64) -> Result<(), Error> {
    let info = stream
        .info_builder()
        .with_deleted(true)
        .fetch()
        .await
        .map_err(|e| nats_error(p, "stream info")(Box::new(e)))?
        .info;
    let state = &info.state;
    let mut missing: Vec<String> = Vec::new();
    let head_end = state.first_sequence.saturating_sub(1);
    if head_end > from && state.messages > 0 {
        missing.push(format!("{}..={head_end}", from.saturating_add(1)));
    }
    let mut deleted: Vec<u64> = state
        .deleted
        .iter()
        .flatten()
        .copied()
        .filter(|&s| s > from)
        .collect();
    deleted.sort_unstable();
    let count = deleted.len();
    missing.extend(deleted.iter().take(10).map(u64::to_string));
    if count > 10 {
        missing.push(format!("and {} more", count - 10));
    }
    if missing.is_empty() {
        return Ok(());
    }
    let missing = format!("sequences {} missing", missing.join(", "));
    tracing::error!(partition = p, from, %missing, "messages are missing from the requests stream; stopping the partition");
    Err(Error::LogHole {
        partition: p,
        from,
        missing,
    })
}

/// A JetStream timestamp (nanoseconds since the Unix epoch) as log time:
/// milliseconds since the Unix epoch (0 before it).
fn log_time_ms(unix_nanos: i128) -> u64 {
    u64::try_from(unix_nanos / 1_000_000).unwrap_or(0)
}

/// A message of a partition's request log read out of its JetStream
/// envelope, as the core takes it: its payload, its stream sequence (the
/// position), its JetStream timestamp as log time and its
/// `Amends-Reply-To` header. `amends audit` reads the log through this too,
/// so that it replays exactly what the worker applied. `info` is the
/// message's own (`message.info()`).
pub fn log_message<'a>(
    message: &'a jetstream::Message,
    info: &jetstream::message::Info<'_>,
) -> LogMessage<'a> {
    LogMessage {
        bytes: &message.payload,
        position: info.stream_sequence,
        log_time_ms: log_time_ms(info.published.unix_timestamp_nanos()),
        reply_to: message
            .headers
            .as_ref()
            .and_then(|h| h.get(header::REPLY_TO))
            .map(|v| v.as_str()),
    }
}

/// Publishes this worker's ownership record of `partition` on the
/// decisions stream and returns its stream sequence: the epoch every
/// decision write of this worker is fenced on. Any older owner's fenced
/// writes are refused from this moment on, re-sends included.
async fn claim_ownership(
    js: &jetstream::Context,
    prefix: &Prefix,
    partition: PartitionId,
) -> Result<u64, Error> {
    let p = partition.get();
    let record = OwnershipRecord {
        partition: p,
        pid: std::process::id(),
        host: hostname(),
    };
    let body = serde_json::to_vec(&record)
        .map_err(|e| nats_error(p, "encode the ownership record")(Box::new(e)))?;
    let ack = js
        .publish(prefix.owner(partition), body.into())
        .await
        .map_err(|e| nats_error(p, "publish the ownership record")(Box::new(e)))?
        .await
        .map_err(|e| nats_error(p, "publish the ownership record")(Box::new(e)))?;
    Ok(ack.sequence)
}

/// Partition `partition`'s latest ownership record on the decisions
/// stream, with its sequence (the owner's epoch): who the fence lets write
/// its decisions. None if the partition has had no owner yet.
pub async fn current_owner(
    js: &jetstream::Context,
    prefix: &Prefix,
    partition: PartitionId,
) -> Result<Option<PartitionOwner>, Error> {
    let p = partition.get();
    let Some(message) = last_on_subject(
        js,
        &prefix.stream_name(Stream::Decisions),
        &prefix.owner(partition),
    )
    .await
    .map_err(nats_error(p, "read the ownership record"))?
    else {
        return Ok(None);
    };
    let record: OwnershipRecord = serde_json::from_slice(&message.payload)
        .map_err(|e| nats_error(p, "read the ownership record")(Box::new(e)))?;
    Ok(Some(PartitionOwner {
        epoch: message.sequence,
        host: record.host,
        pid: record.pid,
    }))
}

/// This machine's host name, for ownership records and logs.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The `Nats-Msg-Id`s of `partition`'s decisions (and hold-expired
/// events) on the decisions stream from stream sequence `from` on, read
/// with a headers-only ordered consumer.
async fn published_ids(
    js: &jetstream::Context,
    prefix: &Prefix,
    partition: PartitionId,
    from: u64,
) -> Result<HashSet<String>, Error> {
    let p = partition.get();
    let stream = js
        .get_stream(prefix.stream_name(Stream::Decisions))
        .await
        .map_err(nats_error(p, "get decisions stream"))?;
    let subject = prefix.dec(partition);
    let none = jetstream::stream::LastRawMessageErrorKind::NoMessageFound;
    let mut seen = HashSet::new();
    // Nothing there: an ordered consumer would wait for a first message.
    match stream
        .get_first_raw_message_by_subject(&subject, from)
        .await
    {
        Ok(_) => {}
        Err(e) if e.kind() == none => return Ok(seen),
        Err(e) => return Err(nats_error(p, "read published decisions")(e)),
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject,
            headers_only: true,
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..consumer::pull::OrderedConfig::default()
        })
        .await
        .map_err(nats_error(p, "read published decisions"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(nats_error(p, "read published decisions"))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(nats_error(p, "read published decisions"))?;
        if let Some(id) = message.headers.as_ref().and_then(|h| h.get(header::MSG_ID)) {
            seen.insert(id.as_str().to_owned());
        }
        let info = message
            .info()
            .map_err(nats_error(p, "read published decisions"))?;
        if info.pending == 0 {
            break;
        }
    }
    Ok(seen)
}

/// The partition position of the last decision (or hold-expired event) on
/// the decisions stream, 0 if none.
async fn last_published_position(
    js: &jetstream::Context,
    prefix: &Prefix,
    partition: PartitionId,
) -> Result<u64, Error> {
    let p = partition.get();
    let last = last_on_subject(
        js,
        &prefix.stream_name(Stream::Decisions),
        &prefix.dec(partition),
    )
    .await
    .map_err(nats_error(p, "read the last decision"))?;
    Ok(last
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
        .and_then(|v| v.get("position").and_then(serde_json::Value::as_u64))
        .unwrap_or(0))
}

/// The partition position a decision or hold-expired effect was made at.
fn decided_at(effect: &Effect) -> Option<u64> {
    match effect {
        Effect::Decided(d) => Some(d.position),
        Effect::HoldExpired(e) => Some(e.position),
        _ => None,
    }
}

/// Whether the decisions stream has a single replica (see
/// [`Worker::fence_pipelined`]), as its info says now.
async fn decisions_unreplicated(
    js: &jetstream::Context,
    prefix: &Prefix,
    p: u32,
) -> Result<bool, Error> {
    let stream = js
        .get_stream(prefix.stream_name(Stream::Decisions))
        .await
        .map_err(nats_error(p, "get decisions stream"))?;
    Ok(stream.cached_info().config.num_replicas <= 1)
}

/// Whether a fenced publish was refused only because another fenced write
/// on its subject was being checked (error 10164, clustered streams).
fn fence_busy(e: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| j.error_code().0 == FENCE_BUSY_CODE)
}

/// Hands a committed batch to the publisher, which publishes it, then
/// acknowledges it.
async fn hand_over(
    to_publish: &tokio::sync::mpsc::Sender<Outgoing>,
    publishing: &mut AbortOnDrop,
    done: Outgoing,
    p: u32,
) -> Result<(), Error> {
    if to_publish.send(done).await.is_err() {
        return Err(publisher_stopped(publishing, p).await);
    }
    Ok(())
}

/// Wraps a foreign error of `action` on partition `p`.
fn nats_error<E: Into<Source>>(p: u32, action: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Nats {
        partition: p,
        action,
        source: e.into(),
    }
}

/// One message of a batch, read out of its JetStream envelope (see
/// [`log_message`]) and owned, for the blocking apply.
struct Incoming {
    position: u64,
    log_time_ms: u64,
    redelivered: bool,
    bytes: Bytes,
    reply_to: Option<String>,
}

impl Incoming {
    fn log_message(&self) -> LogMessage<'_> {
        LogMessage {
            bytes: &self.bytes,
            position: self.position,
            log_time_ms: self.log_time_ms,
            reply_to: self.reply_to.as_deref(),
        }
    }
}

struct Worker<P> {
    js: jetstream::Context,
    prefix: Prefix,
    machine: Machine,
    /// `None` only while a blocking commit holds it.
    store: Option<P>,
    changes: ChangeSet,
    /// The stream sequence of this worker's ownership record: every
    /// decision it writes is fenced on it.
    epoch: u64,
    /// Whether fenced decision writes may be pipelined: only when the
    /// decisions stream has one replica. A replicated (clustered) stream
    /// checks one fenced write per fence subject at a time and refuses the
    /// others in flight as busy (10164) while later ones may pass, so
    /// pipelined writes would land out of position order; there each is
    /// written alone, after the one before it is acknowledged.
    fence_pipelined: bool,
    /// The requests-stream sequence up to which no missing message is a
    /// fault (see [`check_holes`]): what this partition had applied when
    /// it last looked, or what its store accepted when it started empty.
    holes_checked: u64,
    /// Set while the store is behind what the decisions stream holds.
    catch_up: Option<Arc<CatchUp>>,
}

/// What a worker whose store is behind the decisions stream must not
/// publish again.
struct CatchUp {
    /// The position of the last decision on the stream when it started.
    through: u64,
    /// The ids of every decision of the partition on the stream then.
    ids: HashSet<String>,
}

impl<P: PartitionStore> Worker<P> {
    fn partition(&self) -> u32 {
        self.machine.partition().get()
    }

    fn store(&self) -> Result<&P, Error> {
        self.store
            .as_ref()
            .ok_or_else(|| Error::Misconfigured("store handle lost by a failed commit".to_owned()))
    }

    /// The store's applied position and log time.
    fn clock(&self) -> Result<Clock, Error> {
        self.store()?.clock().map_err(|e| self.store_error(e))
    }

    fn nats_error(&self, action: &'static str, source: Source) -> Error {
        Error::Nats {
            partition: self.partition(),
            action,
            source,
        }
    }

    fn store_error(&self, source: amends_store::Error) -> Error {
        Error::Store {
            partition: self.partition(),
            source,
        }
    }

    /// Publishes every unconfirmed outbox entry, page by page, confirming
    /// each page once all its PubAcks are in.
    ///
    /// Decisions already on the decisions stream are not published again,
    /// whatever the stream's duplicate window: the decisions stored after
    /// the sequence recorded at the last confirmation
    /// ([`PartitionStore::decisions_published`]) are read first (this worker
    /// has fenced every older writer, so nothing is added meanwhile), and
    /// an entry whose id is among them is skipped.
    async fn republish_outbox(&mut self) -> Result<(), Error> {
        let publisher = self.publisher()?;
        let mut from = OutboxSeq(0);
        let mut total = 0_usize;
        let mut on_stream: Option<HashSet<String>> = None;
        loop {
            let page = self
                .store()?
                .outbox_read(from, OUTBOX_PAGE_LEN)
                .map_err(|e| self.store_error(e))?;
            let Some(&(last, _)) = page.last() else {
                break;
            };
            let on_stream = match (&mut on_stream, &self.catch_up) {
                (Some(seen), _) => seen,
                (None, Some(catch_up)) => on_stream.insert(catch_up.ids.clone()),
                (None, None) => on_stream.insert(publisher.decisions_since_confirmed().await?),
            };
            let effects: Vec<Effect> = page.into_iter().map(|(_, e)| e).collect();
            let published = publisher.publish_effects(&effects, on_stream).await?;
            from = OutboxSeq(last.get().saturating_add(1));
            self.store()?
                .outbox_confirm_published(from, published)
                .map_err(|e| self.store_error(e))?;
            // A saga's final decision may have missed its requester: send
            // it again (a client ignores what it already has).
            publisher.send_replies(saga_replies(&effects)).await;
            total = total.saturating_add(effects.len());
        }
        if total > 0 {
            tracing::info!(
                partition = self.partition(),
                entries = total,
                "republished the unconfirmed outbox"
            );
        }
        Ok(())
    }

    /// The publishing half, with its own handle on the store.
    fn publisher(&self) -> Result<Publisher<P>, Error> {
        Ok(Publisher {
            js: self.js.clone(),
            prefix: self.prefix.clone(),
            partition: self.machine.partition(),
            store: self.store()?.clone(),
            epoch: self.epoch,
            fence_pipelined: self.fence_pipelined,
            catch_up: self.catch_up.clone(),
        })
    }

    /// Decides one batch (each message through `Machine::take`) over the
    /// store and, if a commit is in flight, that batch's changes (`below`).
    async fn decide(
        &mut self,
        batch: &[jetstream::Message],
        below: Option<Arc<ChangeSet>>,
    ) -> Result<BatchOutput, Error> {
        let p = self.machine.partition();
        let mut incoming = Vec::with_capacity(batch.len());
        for message in batch {
            let info = message
                .info()
                .map_err(|e| self.nats_error("read message info", e))?;
            let read = log_message(message, &info);
            incoming.push(Incoming {
                position: read.position,
                log_time_ms: read.log_time_ms,
                redelivered: info.delivered > 1,
                bytes: message.payload.clone(),
                reply_to: read.reply_to.map(str::to_owned),
            });
        }
        let below = below.unwrap_or_default();
        let store = self.store()?.clone();

        // Off the async threads: sled reads block.
        let machine = self.machine;
        let mut changes = std::mem::take(&mut self.changes);
        let result = tokio::task::spawn_blocking(move || {
            let stacked = Stacked {
                base: &store,
                top: &below,
            };
            let result = take_batch(&machine, &stacked, &mut changes, &incoming);
            (changes, result)
        })
        .await
        .map_err(|e| Error::Panicked {
            partition: p.get(),
            detail: e.to_string(),
        })?;
        let (changes, result) = result;
        // A failed read stops the batch here (`Stop::Store`): nothing
        // decided over missing state reaches the commit.
        let (effects, replies, tally) = result.map_err(|e| stop_error(p, e))?;
        Ok(BatchOutput {
            changes,
            effects,
            replies,
            tally,
        })
    }

    /// Starts committing an applied batch on the blocking pool; its
    /// changes stay readable for the next batch's apply.
    fn start_commit(
        &mut self,
        decided: BatchOutput,
        last: jetstream::Message,
    ) -> Result<InFlight, Error> {
        let store = self.store()?.clone();
        let machine = self.machine;
        let BatchOutput {
            changes,
            effects,
            replies,
            mut tally,
        } = decided;
        let changes = Arc::new(changes);
        let to_commit = Arc::clone(&changes);
        let task = tokio::task::spawn_blocking(move || {
            let position = to_commit.clock.map(|c| c.position); // metrics
            let commit_started = std::time::Instant::now();
            let committed = store.commit(&to_commit, &effects).map_err(Stop::Store)?;
            tally.effects(&effects);
            tally.committed(machine.partition(), commit_started.elapsed(), position);
            Ok((effects, committed.outbox.end))
        });
        Ok(InFlight {
            task,
            changes,
            replies,
            last,
        })
    }

    /// Waits for a batch's commit; returns what to publish (and the
    /// message to acknowledge after).
    async fn finish(&mut self, in_flight: InFlight) -> Result<Outgoing, Error> {
        let p = self.machine.partition();
        let InFlight {
            task,
            changes,
            replies,
            last,
        } = in_flight;
        let (effects, end) = task
            .await
            .map_err(|e| Error::Panicked {
                partition: p.get(),
                detail: e.to_string(),
            })?
            .map_err(|e| stop_error(p, e))?;
        // Keep the allocations for the next batch when nobody else holds
        // the change set any more.
        if let Ok(mut changes) = Arc::try_unwrap(changes) {
            changes.clear();
            self.changes = changes;
        }
        Ok(Outgoing {
            effects,
            replies,
            end,
            last: Some(last),
        })
    }
}

/// A batch decided but not committed.
struct BatchOutput {
    changes: ChangeSet,
    effects: Vec<Effect>,
    replies: Vec<(String, Decision)>,
    tally: crate::metrics::Tally,
}

/// A batch whose commit runs on the blocking pool.
struct InFlight {
    task: tokio::task::JoinHandle<Result<(Vec<Effect>, OutboxSeq), Stop>>,
    /// Its changes, read by the next batch's apply meanwhile.
    changes: Arc<ChangeSet>,
    replies: Vec<(String, Decision)>,
    /// Its last message, acknowledged once the commit is done.
    last: jetstream::Message,
}

/// The worker error of a stopped apply or commit.
fn stop_error(p: PartitionId, stop: Stop) -> Error {
    match stop {
        Stop::Fault(fault) => {
            tracing::error!(partition = p.get(), %fault, "the log went backwards; stopping the partition");
            Error::LogBehind {
                partition: p.get(),
                fault,
            }
        }
        Stop::Store(e) => Error::Store {
            partition: p.get(),
            source: e,
        },
    }
}

/// The publishing half of a partition worker: it publishes committed
/// batches' outboxes in commit order, confirms them in the store and sends
/// the replies. It runs as its own task, so that a partition applies and
/// commits its next batch while the last one is being published.
struct Publisher<P> {
    js: jetstream::Context,
    prefix: Prefix,
    partition: PartitionId,
    store: P,
    /// The worker's epoch: the fence of every decision write.
    epoch: u64,
    /// See [`Worker::fence_pipelined`].
    fence_pipelined: bool,
    /// Dropped once a batch decides past what the stream held at start.
    catch_up: Option<Arc<CatchUp>>,
}

/// A committed batch, waiting to be published.
struct Outgoing {
    effects: Vec<Effect>,
    replies: Vec<(String, Decision)>,
    end: OutboxSeq,
    /// The batch's last message, acknowledged once the batch is published
    /// (ack policy all: it acknowledges the whole batch).
    last: Option<jetstream::Message>,
}

impl<P: PartitionStore> Publisher<P> {
    fn store_error(&self, source: amends_store::Error) -> Error {
        Error::Store {
            partition: self.partition.get(),
            source,
        }
    }

    /// Publishes a committed batch's outbox, confirms it and sends its
    /// replies (after the publish: a client never hears of a decision that
    /// is not on the decisions stream).
    async fn publish_committed(&mut self, batch: Outgoing) -> Result<(), Error> {
        let publish_started = std::time::Instant::now(); // metrics
        let empty = HashSet::new();
        let skip = self.catch_up.as_ref().map_or(&empty, |c| &c.ids);
        let published = self.publish_effects(&batch.effects, skip).await?;
        if let Some(catch_up) = &self.catch_up
            && batch
                .effects
                .iter()
                .any(|e| decided_at(e) > Some(catch_up.through))
        {
            tracing::info!(
                partition = self.partition.get(),
                through = catch_up.through,
                "caught up with the decisions stream"
            );
            self.catch_up = None;
        }
        crate::metrics::published(self.partition, &batch.effects, publish_started.elapsed());
        self.store
            .outbox_confirm_published(batch.end, published)
            .map_err(|e| self.store_error(e))?;
        let replies = batch
            .replies
            .into_iter()
            .chain(saga_replies(&batch.effects));
        self.send_replies(replies).await;
        // Acknowledged once published, so that whatever the consumer has
        // acknowledged is on the decisions stream (`amends audit` relies
        // on it); a restart resumes from the store either way.
        if let Some(last) = batch.last {
            last.ack().await.map_err(|e| Error::Nats {
                partition: self.partition.get(),
                action: "ack",
                source: e,
            })?;
        }
        Ok(())
    }

    /// Publishes effects, except those whose `Nats-Msg-Id` is in `skip`
    /// (already on the decisions stream), and waits for every PubAck.
    /// Returns the highest decisions-stream sequence written, if any.
    ///
    /// The decisions (and hold-expired events) go first, in order, each
    /// fenced on the epoch (pipelined on a decisions stream of one
    /// replica, one at a time on a replicated one: see
    /// [`Worker::fence_pipelined`]); only once all of them are
    /// acknowledged go the effects that cannot be fenced (apologies and
    /// saga messages to partitions' logs), so that a fenced-out worker
    /// never sends one whose decision did not land.
    async fn publish_effects(
        &self,
        effects: &[Effect],
        skip: &HashSet<String>,
    ) -> Result<Option<u64>, Error> {
        let p = self.partition;
        let epoch = self.epoch.to_string();
        let owner = self.prefix.owner(p);
        let mut decisions = Vec::new();
        let mut others = Vec::new();
        for effect in effects {
            let (subject, msg_id, body) = match effect {
                Effect::Decided(d) => (self.prefix.dec(p), d.op_id.to_string(), wire::encode(d)),
                Effect::HoldExpired(e) => {
                    (self.prefix.dec(p), e.event_id.to_string(), wire::encode(e))
                }
                Effect::Apology(a) => (
                    self.prefix.apology(&a.topic),
                    a.decision.op_id.to_string(),
                    wire::encode(a),
                ),
                // A saga's message to a partition's log: its derived op id
                // deduplicates a re-publication in JetStream and in the core.
                Effect::Send { partition, request } => (
                    self.prefix.req(*partition),
                    request.op_id.to_string(),
                    wire::encode(request),
                ),
                // Core NATS, after the outbox is confirmed: `send_replies`.
                Effect::Reply { .. } => continue,
                // The raw bytes, with the error in a header; the id is
                // derived from the position.
                Effect::DeadLetter(dead) => {
                    tracing::warn!(partition = p.get(), position = dead.position, detail = %dead.detail, "dead letter");
                    (
                        self.prefix.dlq(p),
                        dead_letter_msg_id(p, dead.position),
                        dead.bytes.clone(),
                    )
                }
            };
            let fenced = matches!(effect, Effect::Decided(_) | Effect::HoldExpired(_));
            if fenced && skip.contains(&msg_id) {
                continue;
            }
            let mut headers = HeaderMap::new();
            headers.insert(header::MSG_ID, msg_id.as_str());
            if let Effect::DeadLetter(dead) = effect {
                headers.insert(header::ERROR, header_safe(&dead.detail).as_str());
            }
            if fenced {
                headers.insert(header::EXPECTED_LAST_SUBJECT_SEQUENCE, epoch.as_str());
                headers.insert(
                    header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
                    owner.as_str(),
                );
                decisions.push((subject, headers, Bytes::from(body)));
            } else {
                others.push((subject, headers, Bytes::from(body)));
            }
        }

        let mut highest = None;
        if self.fence_pipelined {
            let mut acks = Vec::with_capacity(decisions.len());
            for (subject, headers, body) in &decisions {
                acks.push(self.send(subject, headers, body).await?);
            }
            // One replica: the server checks each fenced write as it
            // comes, so none is refused as busy, and an error stops the
            // batch (a restart republishes it in order).
            for ack in acks {
                match ack.await {
                    Ok(ack) => highest = highest.max(Some(ack.sequence)),
                    Err(e) => return Err(self.refused(e).await),
                }
            }
        } else {
            // Replicated: one fenced write at a time, so that decisions
            // land in position order (see `Worker::fence_pipelined`).
            for (subject, headers, body) in &decisions {
                let sequence = self.publish_fenced_alone(subject, headers, body).await?;
                highest = highest.max(Some(sequence));
            }
        }

        let mut acks = Vec::with_capacity(others.len());
        for (subject, headers, body) in &others {
            acks.push(self.send(subject, headers, body).await?);
        }
        for ack in acks {
            ack.await
                .map_err(|e| nats_error(p.get(), "publish ack")(Box::new(e)))?;
        }
        Ok(highest)
    }

    /// Sends one publish; its PubAck comes later.
    async fn send(
        &self,
        subject: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        self.js
            .publish_with_headers(subject.to_owned(), headers.clone(), body.clone())
            .await
            .map_err(|e| nats_error(self.partition.get(), "publish")(Box::new(e)))
    }

    /// Publishes one fenced write and waits for it, again while the server
    /// says it is busy (at most [`FENCE_BUSY_TRIES`] times): another fenced
    /// write on the same fence subject was being checked, which only a
    /// racing owner of the partition sends.
    async fn publish_fenced_alone(
        &self,
        subject: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<u64, Error> {
        let mut attempt = 0_u32;
        loop {
            attempt = attempt.saturating_add(1);
            match self.send(subject, headers, body).await?.await {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if fence_busy(&e) && attempt < FENCE_BUSY_TRIES => {
                    crate::metrics::fence_busy(self.partition);
                    tokio::time::sleep(FENCE_BUSY_BACKOFF.saturating_mul(attempt)).await;
                }
                Err(e) => return Err(self.refused(e).await),
            }
        }
    }

    /// The worker error of a refused decision write: [`Error::Fenced`] when
    /// the fence refused it, naming the newer owner.
    async fn refused(&self, e: jetstream::context::PublishError) -> Error {
        let p = self.partition.get();
        if e.kind() != jetstream::context::PublishErrorKind::WrongLastSequence {
            return nats_error(p, "publish ack")(Box::new(e));
        }
        let owner = match self.owner_record().await {
            Ok(Some(record)) => record,
            Ok(None) => "no ownership record".to_owned(),
            Err(e) => format!("the ownership record could not be read: {e}"),
        };
        tracing::error!(partition = p, epoch = self.epoch, %owner, "fenced: a newer owner took the partition; stopping it");
        Error::Fenced {
            partition: p,
            epoch: self.epoch,
            owner,
        }
    }

    /// The partition's latest ownership record: its sequence and body.
    async fn owner_record(&self) -> Result<Option<String>, Source> {
        let last = last_on_subject(
            &self.js,
            &self.prefix.stream_name(Stream::Decisions),
            &self.prefix.owner(self.partition),
        )
        .await?;
        Ok(last.map(|m| {
            format!(
                "epoch {}: {}",
                m.sequence,
                String::from_utf8_lossy(&m.payload)
            )
        }))
    }

    /// The ids of this partition's decisions stored after the sequence
    /// recorded at the last outbox confirmation: those of the unconfirmed
    /// outbox that an earlier run published.
    async fn decisions_since_confirmed(&self) -> Result<HashSet<String>, Error> {
        let from = self
            .store
            .decisions_published()
            .map_err(|e| self.store_error(e))?;
        published_ids(
            &self.js,
            &self.prefix,
            self.partition,
            from.saturating_add(1),
        )
        .await
    }

    /// Sends decisions to reply subjects (core NATS, best effort).
    async fn send_replies(&self, replies: impl Iterator<Item = (String, Decision)>) {
        let p = self.partition;
        let client = self.js.client();
        for (reply_to, decision) in replies {
            // A reply subject inside the deployment's own subjects would let a
            // client write into amends' streams: it is ignored.
            if reply_to.starts_with(&format!("{}.", self.prefix.as_str())) {
                tracing::warn!(partition = p.get(), %reply_to, "reply subject inside the prefix ignored");
                continue;
            }
            // A subject the server would refuse (too long for its control
            // line, or not a subject) would cost this process its NATS
            // connection, and every other client its answers meanwhile. The
            // core refused such a request (`reply_subject_invalid`); its
            // duplicates and op id refusals are answered here too, so the
            // same rule keeps them off the connection.
            if !wire::reply_subject_is_valid(&reply_to) {
                tracing::warn!(
                    partition = p.get(),
                    len = reply_to.len(),
                    "reply subject not a valid subject of at most {} bytes; reply not sent",
                    wire::REPLY_SUBJECT_BYTES_MAX
                );
                continue;
            }
            if let Err(e) = client
                .publish(reply_to.clone(), wire::encode(&decision).into())
                .await
            {
                // A bad reply subject is the client's problem, never the
                // partition's: the decision is on the decisions stream.
                tracing::warn!(partition = p.get(), %reply_to, error = %e, "reply not sent");
            }
        }
    }
}

/// Aborts a task when dropped: the publisher goes with its worker.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the publisher task ended (it ends only on an error).
async fn publisher_stopped(task: &mut AbortOnDrop, p: u32) -> Error {
    match (&mut task.0).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) => Error::Misconfigured(format!("partition {p}: the publisher ended")),
        Err(e) => Error::Panicked {
            partition: p,
            detail: format!("the publisher: {e}"),
        },
    }
}

/// The final saga decisions among `effects`, with their reply subjects.
fn saga_replies(effects: &[Effect]) -> impl Iterator<Item = (String, Decision)> + '_ {
    effects.iter().filter_map(|e| match e {
        Effect::Reply { to, decision } => Some((to.clone(), decision.clone())),
        _ => None,
    })
}

/// Why a batch's apply or commit stopped.
enum Stop {
    /// The log went backwards.
    Fault(Fault),
    /// The store failed: a read while applying, or the commit.
    Store(amends_store::Error),
}

impl From<Fault<amends_store::Error>> for Stop {
    fn from(fault: Fault<amends_store::Error>) -> Stop {
        match fault.into_log_fault() {
            Ok(fault) => Stop::Fault(fault),
            Err(e) => Stop::Store(e),
        }
    }
}

/// Decisions to send to reply subjects.
type Replies = Vec<(String, Decision)>;

/// Takes a batch's messages over `state` into `changes`: the blocking
/// half of [`Worker::decide`]. Returns the effects, the replies and the metrics tally,
/// or why the batch stopped (then nothing of it may be committed).
fn take_batch<B: Read<Error = amends_store::Error> + ?Sized>(
    machine: &Machine,
    base: &B,
    changes: &mut ChangeSet,
    incoming: &[Incoming],
) -> Result<(Vec<Effect>, Replies, crate::metrics::Tally), Stop> {
    changes.clear();
    let mut effects = Vec::new();
    let mut replies = Vec::new();
    let mut tally = crate::metrics::Tally::default();
    let mut state = Overlay::new(base, changes);
    for msg in incoming {
        let applied = state.clock().map_err(Stop::Store)?.position;
        if msg.position <= applied && msg.redelivered {
            continue;
        }
        let taken = machine.take(&mut state, &msg.log_message(), &mut effects)?;
        if let Taken::Applied { input, answer } = &taken {
            tally.answer(input, answer);
        }
        if let (Some(reply_to), Some(decision)) = (&msg.reply_to, taken.decision()) {
            replies.push((reply_to.clone(), decision.clone()));
        }
    }
    Ok((effects, replies, tally))
}

/// A header value cannot hold line breaks: they are replaced by spaces.
fn header_safe(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}
