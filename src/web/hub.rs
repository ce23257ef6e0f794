//! The pages' view of the deployment: the four streams followed with
//! ordered consumers (ephemeral, nothing left on the server), each message
//! fanned out to the pages that watch its op id and counted for the
//! console.
//!
//! It starts [`LOOKBACK`] in the past, so a console opened on a fresh
//! process already has the last minutes' rates, refusals, holds and sagas;
//! what began before that (a hold with a long timeout, a saga older than
//! the look-back) it learns of only when it next moves. It keeps bounded
//! state: the maps below are capped and the rate ring is two minutes long.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use amends_core::command::{Command, Phase};
use amends_core::partition::{Apology, Input};
use amends_core::route::Partitions;
use amends_core::{Decision, OpId, Outcome, wire};
use amends_nats::topology::{Prefix, Stream, header};
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::audit::{Published, decode_published};

/// How far back the hub starts reading the streams.
pub const LOOKBACK: Duration = Duration::from_secs(15 * 60);

/// Events buffered per watching page before a slow one lags (it then asks
/// the status endpoint again for every op it watches).
const FANOUT_CAPACITY: usize = 4096;

/// The most requests the hub remembers while their decision is due (holds
/// with a timeout, posts, voids): past it the map is cleared, and those
/// holds are missed until their next event.
const AWAITING_MAX: usize = 100_000;

/// The most pending holds and sagas in flight tracked for the console.
const TRACKED_MAX: usize = 100_000;

/// How many dead letters the console lists.
const DEAD_LETTERS_SHOWN: usize = 8;

/// How many holds and sagas the console lists.
const LISTED_MAX: usize = 20;

/// The window of "decisions per second", in seconds.
const RATE_WINDOW_S: u64 = 10;

/// How many seconds of per-second counts are kept (the console's chart).
const RATE_HISTORY_S: u64 = 60;

/// One thing that happened to an operation, as the device page hears it.
#[derive(Debug)]
pub enum Event {
    /// A decision: from the decisions stream, a reply, or a status answer.
    Decision(Decision),
    /// A refused optimistic operation's apology.
    Apology(Apology),
    /// A saga's step message appended to a partition's log (a try,
    /// confirm or cancel).
    Step {
        saga: OpId,
        index: u32,
        phase: Phase,
        partition: u32,
        position: u64,
    },
    /// A step's outcome on its way back to the saga's partition.
    StepOutcome {
        saga: OpId,
        index: u32,
        outcome: Outcome,
    },
}

impl Event {
    /// The op id a page watches to see this event (a step's saga).
    pub fn op_id(&self) -> OpId {
        match self {
            Event::Decision(d) => d.op_id,
            Event::Apology(a) => a.decision.op_id,
            Event::Step { saga, .. } | Event::StepOutcome { saga, .. } => *saga,
        }
    }

    /// The event as the page reads it: one JSON object with `kind`.
    pub fn to_json(&self) -> Value {
        match self {
            Event::Decision(d) => json!({"kind": "decision", "decision": d}),
            Event::Apology(a) => json!({"kind": "apology", "apology": a}),
            Event::Step {
                saga,
                index,
                phase,
                partition,
                position,
            } => json!({
                "kind": "step", "op_id": saga, "index": index, "phase": phase,
                "partition": partition, "position": position,
            }),
            Event::StepOutcome {
                saga,
                index,
                outcome,
            } => json!({"kind": "step_outcome", "op_id": saga, "index": index, "outcome": outcome}),
        }
    }
}

/// The follower of the streams, shared by every page.
pub struct Hub {
    events: broadcast::Sender<Arc<Event>>,
    counts: Mutex<Counts>,
}

/// Which stream a message came from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Requests,
    Decisions,
    Apologies,
    DeadLetters,
}

impl Hub {
    /// Starts following the deployment's streams.
    pub fn start(js: jetstream::Context, prefix: Prefix, partitions: Partitions) -> Arc<Hub> {
        let (events, _) = broadcast::channel(FANOUT_CAPACITY);
        let since_ms = now_ms().saturating_sub(millis(LOOKBACK));
        let hub = Arc::new(Hub {
            events,
            counts: Mutex::new(Counts {
                since_ms,
                partitions: partitions.get(),
                ..Counts::default()
            }),
        });
        for (source, stream, filter) in [
            (Source::Requests, Stream::Requests, prefix.req_wildcard()),
            (Source::Decisions, Stream::Decisions, prefix.dec_wildcard()),
            (
                Source::Apologies,
                Stream::Apologies,
                prefix.apology_wildcard(),
            ),
            (
                Source::DeadLetters,
                Stream::DeadLetters,
                prefix.dlq_wildcard(),
            ),
        ] {
            let name = prefix.stream_name(stream);
            tokio::spawn(follow(Arc::clone(&hub), js.clone(), name, filter, source));
        }
        hub
    }

    /// Every event from now on (a page filters by the op ids it watches).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Hands `event` to every watching page.
    pub fn publish(&self, event: Event) {
        // An error only means no page watches right now.
        let _ = self.events.send(Arc::new(event));
    }

    /// The console's counters, as JSON, at wall time `now_ms`.
    pub fn snapshot(&self, now_ms: u64) -> Value {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot(now_ms)
    }

    /// The requests-stream position of saga `op_id`'s request, if the hub
    /// has seen it (within the look-back, or since).
    pub fn saga_position(&self, op_id: OpId) -> Option<u64> {
        self.counts().saga_positions.get(&op_id).copied()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads one message of `source`: counts it and fans out what a page
    /// can watch.
    fn on_message(&self, source: Source, message: &jetstream::Message) {
        let Ok(info) = message.info() else { return };
        let time_ms = unix_ms(info.published);
        let position = info.stream_sequence;
        let partition = message
            .subject
            .rsplit_once('.')
            .and_then(|(_, p)| p.parse::<u32>().ok())
            .unwrap_or(0);
        match source {
            Source::Requests => {
                let Ok(Input::Request(request)) = wire::decode_request(&message.payload) else {
                    return;
                };
                let event = self
                    .counts()
                    .on_request(request, partition, position, time_ms);
                if let Some(event) = event {
                    self.publish(event);
                }
            }
            Source::Decisions => match decode_published(&message.payload) {
                Some(Published::Decision(d)) => {
                    self.counts().on_decision(&d, time_ms);
                    self.publish(Event::Decision(d));
                }
                Some(Published::HoldExpired(e)) => self.counts().on_expiry(e.hold),
                None => {}
            },
            Source::Apologies => {
                if let Ok(apology) = serde_json::from_slice::<Apology>(&message.payload) {
                    self.counts().apologies_total += 1;
                    self.publish(Event::Apology(apology));
                }
            }
            Source::DeadLetters => {
                let mut counts = self.counts();
                counts.dead_letters_total += 1;
                counts.dead_letters.push_front(json!({
                    "partition": partition,
                    "id": header_text(message, header::MSG_ID),
                    "error": header_text(message, header::ERROR),
                    "bytes": message.payload.len(),
                    "time_ms": time_ms,
                }));
                counts.dead_letters.truncate(DEAD_LETTERS_SHOWN);
            }
        }
    }
}

/// Follows one stream for as long as the process runs: from the look-back
/// at first, then, after an error (the stream not created yet, a lost
/// connection), from the message after the last one read.
async fn follow(
    hub: Arc<Hub>,
    js: jetstream::Context,
    name: String,
    filter: String,
    source: Source,
) {
    let start = time::OffsetDateTime::now_utc() - LOOKBACK;
    let mut last_sequence = None::<u64>;
    loop {
        let deliver_policy = match last_sequence {
            None => consumer::DeliverPolicy::ByStartTime { start_time: start },
            Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq.saturating_add(1),
            },
        };
        let result = async {
            let stream = js.get_stream(&name).await?;
            let config = consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy,
                ..Default::default()
            };
            let mut messages = stream.create_consumer(config).await?.messages().await?;
            while let Some(message) = messages.next().await {
                let message = message?;
                if let Ok(info) = message.info() {
                    last_sequence = Some(info.stream_sequence);
                }
                hub.on_message(source, &message);
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(stream = %name, error = %e, "web: following the stream again in 1 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A request whose decision the console waits for.
#[derive(Debug)]
enum Awaiting {
    /// A hold with a timeout: pending once confirmed.
    Hold(HoldInfo),
    /// A post or void of this hold: it ends once confirmed.
    Resolve(OpId),
}

#[derive(Debug, Clone)]
struct HoldInfo {
    account: String,
    amount: u64,
    partition: u32,
    /// The request's log timestamp plus its timeout (the log time the
    /// partition expires it at, give or take a later message's time).
    expires_ms: u64,
}

#[derive(Debug)]
struct SagaInfo {
    kind: &'static str,
    partition: u32,
    steps: usize,
    /// The step whose try was last seen on a log (0 until one is: steps on
    /// the saga's own partition are decided without a log append).
    step: u32,
    started_ms: u64,
}

/// The console's counters since the look-back's start.
#[derive(Debug, Default)]
struct Counts {
    since_ms: u64,
    partitions: u32,
    decisions_total: u64,
    confirmed_total: u64,
    /// Refusals by reason code.
    refusals: BTreeMap<String, u64>,
    /// Requests seen with an apology topic (resubmissions count again).
    optimistic_total: u64,
    apologies_total: u64,
    dead_letters_total: u64,
    dead_letters: VecDeque<Value>,
    hold_expiries_total: u64,
    /// Decisions per second of stream time.
    per_second: BTreeMap<u64, u64>,
    awaiting: HashMap<OpId, Awaiting>,
    holds: HashMap<OpId, HoldInfo>,
    sagas: HashMap<OpId, SagaInfo>,
    /// Where each saga's request is in the requests stream: a saga's
    /// decision names the message that ended it, not its request.
    saga_positions: HashMap<OpId, u64>,
    /// Sagas already decided, so a resubmission seen on the log later does
    /// not count as a new one in flight.
    sagas_done: HashSet<OpId>,
}

impl Counts {
    fn on_request(
        &mut self,
        request: amends_core::Request,
        partition: u32,
        position: u64,
        time_ms: u64,
    ) -> Option<Event> {
        if request.apology_topic.is_some() {
            self.optimistic_total += 1;
        }
        let op_id = request.op_id;
        match request.command {
            Command::Step {
                saga, index, phase, ..
            } => {
                if phase == Phase::Try
                    && let Some(s) = self.sagas.get_mut(&saga)
                {
                    s.step = s.step.max(index);
                }
                return Some(Event::Step {
                    saga,
                    index,
                    phase,
                    partition,
                    position,
                });
            }
            Command::StepOutcome {
                saga,
                index,
                outcome,
            } => {
                return Some(Event::StepOutcome {
                    saga,
                    index,
                    outcome,
                });
            }
            ref command @ (Command::Transfer { .. } | Command::Saga { .. }) => {
                if self.saga_positions.len() >= TRACKED_MAX {
                    self.saga_positions.clear();
                }
                self.saga_positions.entry(op_id).or_insert(position);
                if !self.sagas_done.contains(&op_id) && self.sagas.len() < TRACKED_MAX {
                    let steps = amends_core::saga::steps(command).len();
                    self.sagas.entry(op_id).or_insert(SagaInfo {
                        kind: command.kind(),
                        partition,
                        steps,
                        step: 0,
                        started_ms: time_ms,
                    });
                }
            }
            Command::Hold {
                account,
                amount,
                timeout_ms: Some(timeout_ms),
            } => self.await_decision(
                op_id,
                Awaiting::Hold(HoldInfo {
                    account: account.as_str().to_owned(),
                    amount: amount.get(),
                    partition,
                    expires_ms: time_ms.saturating_add(timeout_ms),
                }),
            ),
            Command::Post { hold, .. } | Command::Void { hold, .. } => {
                self.await_decision(op_id, Awaiting::Resolve(hold));
            }
            _ => {}
        }
        None
    }

    fn await_decision(&mut self, op_id: OpId, awaiting: Awaiting) {
        if self.awaiting.len() >= AWAITING_MAX {
            tracing::warn!("web console: too many requests awaiting a decision; forgetting them");
            self.awaiting.clear();
        }
        self.awaiting.insert(op_id, awaiting);
    }

    fn on_decision(&mut self, d: &Decision, time_ms: u64) {
        self.decisions_total += 1;
        let second = time_ms / 1000;
        *self.per_second.entry(second).or_default() += 1;
        let oldest_kept = second.saturating_sub(2 * RATE_HISTORY_S);
        while self
            .per_second
            .first_key_value()
            .is_some_and(|(s, _)| *s < oldest_kept)
        {
            self.per_second.pop_first();
        }
        let confirmed = d.outcome.is_confirmed();
        if confirmed {
            self.confirmed_total += 1;
        } else if let Some(reason) = d.outcome.reason() {
            *self.refusals.entry(reason.code().to_owned()).or_default() += 1;
        }
        match self.awaiting.remove(&d.op_id) {
            Some(Awaiting::Hold(info)) if confirmed && self.holds.len() < TRACKED_MAX => {
                self.holds.insert(d.op_id, info);
            }
            Some(Awaiting::Resolve(hold)) if confirmed => {
                self.holds.remove(&hold);
            }
            _ => {}
        }
        if self.sagas.remove(&d.op_id).is_some() {
            if self.sagas_done.len() >= TRACKED_MAX {
                self.sagas_done.clear();
            }
            self.sagas_done.insert(d.op_id);
        }
    }

    fn on_expiry(&mut self, hold: OpId) {
        self.hold_expiries_total += 1;
        self.holds.remove(&hold);
    }

    fn snapshot(&self, now_ms: u64) -> Value {
        let now_s = now_ms / 1000;
        let rate =
            |from: u64, to: u64| -> u64 { self.per_second.range(from..to).map(|(_, n)| n).sum() };
        let per_second = rate(now_s.saturating_sub(RATE_WINDOW_S), now_s);
        let series: Vec<u64> = (now_s.saturating_sub(RATE_HISTORY_S)..now_s)
            .map(|s| self.per_second.get(&s).copied().unwrap_or(0))
            .collect();
        let holds = listed(
            &self.holds,
            |h| h.expires_ms,
            |id, h| {
                json!({
                    "hold": id, "account": h.account, "amount": h.amount,
                    "partition": h.partition, "expires_ms": h.expires_ms,
                    "expires_in_ms": i128::from(h.expires_ms) - i128::from(now_ms),
                })
            },
        );
        let mut by_step: BTreeMap<u32, u64> = BTreeMap::new();
        for s in self.sagas.values() {
            *by_step.entry(s.step).or_default() += 1;
        }
        let sagas = listed(
            &self.sagas,
            |s| s.started_ms,
            |id, s| {
                json!({
                    "op_id": id, "kind": s.kind, "partition": s.partition,
                    "step": s.step, "steps": s.steps,
                    "age_ms": now_ms.saturating_sub(s.started_ms),
                })
            },
        );
        let rejected: u64 = self.refusals.values().sum();
        json!({
            "since_ms": self.since_ms,
            "partitions": self.partitions,
            "decisions_total": self.decisions_total,
            "confirmed_total": self.confirmed_total,
            "rejected_total": rejected,
            "decisions_per_second": ratio(per_second, RATE_WINDOW_S),
            "decisions_series": series,
            "refusals": self.refusals,
            "optimistic_total": self.optimistic_total,
            "apologies_total": self.apologies_total,
            "apology_rate": ratio(self.apologies_total, self.optimistic_total),
            "dead_letters_total": self.dead_letters_total,
            "dead_letters": self.dead_letters,
            "hold_expiries_total": self.hold_expiries_total,
            "holds_pending": self.holds.len(),
            "holds_expiring": holds,
            "sagas_in_flight": self.sagas.len(),
            "sagas_by_step": by_step,
            "sagas": sagas,
        })
    }
}

/// The first [`LISTED_MAX`] entries of `map` by `key` (then op id), each
/// as `show` makes it.
fn listed<T, K: Ord>(
    map: &HashMap<OpId, T>,
    key: impl Fn(&T) -> K,
    show: impl Fn(&OpId, &T) -> Value,
) -> Vec<Value> {
    let mut entries: Vec<(&OpId, &T)> = map.iter().collect();
    entries.sort_by(|a, b| key(a.1).cmp(&key(b.1)).then(a.0.cmp(b.0)));
    entries
        .into_iter()
        .take(LISTED_MAX)
        .map(|(id, v)| show(id, v))
        .collect()
}

/// A header of `message`, as text.
fn header_text(message: &jetstream::Message, name: &str) -> Option<String> {
    Some(message.headers.as_ref()?.get(name)?.as_str().to_owned())
}

/// Milliseconds since the Unix epoch of `t` (0 before it).
fn unix_ms(t: time::OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The wall clock, in milliseconds since the Unix epoch: the console's
/// "now" (ages, expiring soon), never a decision's.
pub fn now_ms() -> u64 {
    unix_ms(time::OffsetDateTime::now_utc())
}

/// `n / d` for the console (0 when `d` is 0); counts past 2^32 saturate,
/// which no window of a console reaches.
fn ratio(n: u64, d: u64) -> f64 {
    let f = |x: u64| f64::from(u32::try_from(x).unwrap_or(u32::MAX));
    if d == 0 { 0.0 } else { f(n) / f(d) }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
