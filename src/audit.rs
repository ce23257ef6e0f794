//! `amends audit`: replays a deployment's log, re-derives every decision and
//! the state of every partition, and checks them against what the service
//! published and against the invariants.
//!
//! It only reads the streams (never the service's store), so it runs beside
//! a live `amends serve`. The order of reads makes "not published yet"
//! decidable: first the ack floor of every partition's worker consumer
//! (the worker acknowledges a message only after publishing its effects),
//! then the end of the requests and decisions streams, then both streams up
//! to those ends. An effect of a message at or below its partition's ack
//! floor must be on the decisions stream; one above it may still be on its
//! way (a warning, not a failure).
//!
//! Exit codes: 0 every check passed, 1 a check failed, 2 an error (no
//! connection, no deployment).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use amends_core::command::Command;
use amends_core::invariants;
use amends_core::partition::{
    Answer, Config, Effect, HoldExpired, Input, LogMessage, Machine, Taken,
};
use amends_core::route::{PartitionId, Partitions};
use amends_core::state::{HoldStatus, MemState, SagaState};
use amends_core::{Decision, OpId, wire};
use amends_nats::topology::{self, Stream};
use amends_nats::worker;
use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use futures_util::StreamExt as _;

use crate::nats::DeploymentArgs;

/// Exit code: a check failed.
pub const EXIT_FAILED: u8 = 1;

/// The flags of `amends audit`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// How long to try to connect, in milliseconds, before giving up.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// How long to wait for the next message of a stream that has not been
    /// read to its end yet, in milliseconds, before giving up.
    #[arg(long, default_value_t = 10_000)]
    pub idle_timeout_ms: u64,
}

/// What the audit found: failures make the exit code 1, warnings do not.
#[derive(Default, Debug)]
struct Findings {
    failures: Vec<String>,
    warnings: Vec<String>,
}

impl Findings {
    fn fail(&mut self, text: String) {
        self.failures.push(text);
    }

    fn warn(&mut self, text: String) {
        self.warnings.push(text);
    }
}

/// One message of the decisions stream.
pub(crate) enum Published {
    Decision(Decision),
    HoldExpired(HoldExpired),
}

/// A partition replayed from its log.
struct Replay {
    machine: Machine,
    state: MemState,
    /// The worker's ack floor when the audit started: effects of messages
    /// at or below it were published before the streams were read.
    ack_floor: u64,
    messages: u64,
    dead_letters: u64,
    /// Decisions re-derived, with the position of the message that made
    /// them, in log order.
    decisions: Vec<(u64, Decision)>,
    expiries: Vec<(u64, HoldExpired)>,
    /// The command of each operation this partition decided from its own
    /// log (the first body of its op id), sagas and saga messages excluded.
    commands: HashMap<OpId, Command>,
    matched: u64,
}

impl Replay {
    fn new(machine: Machine, ack_floor: u64) -> Replay {
        Replay {
            machine,
            state: MemState::new(),
            ack_floor,
            messages: 0,
            dead_letters: 0,
            decisions: Vec::new(),
            expiries: Vec::new(),
            commands: HashMap::new(),
            matched: 0,
        }
    }

    /// Takes one log message exactly as the partition's worker does
    /// (`Machine::take`); returns its effects.
    fn take(&mut self, message: &LogMessage<'_>, findings: &mut Findings) -> Vec<Effect> {
        self.messages = self.messages.saturating_add(1);
        let p = self.machine.partition();
        let seq = message.position;
        let mut effects = Vec::new();
        match self.machine.take(&mut self.state, message, &mut effects) {
            Ok(Taken::Applied {
                input: Input::Request(req),
                answer: Answer::Decided(_) | Answer::Accepted(_),
            }) => {
                self.commands.insert(req.op_id, req.command);
            }
            Ok(_) => {}
            Err(fault) => findings.fail(format!("partition {p}: {fault}")),
        }
        for effect in &effects {
            match effect {
                Effect::Decided(d) => self.decisions.push((seq, d.clone())),
                Effect::HoldExpired(e) => self.expiries.push((seq, e.clone())),
                Effect::DeadLetter(_) => self.dead_letters = self.dead_letters.saturating_add(1),
                Effect::Apology(_) | Effect::Send { .. } | Effect::Reply { .. } => {}
            }
        }
        effects
    }
}

/// Runs the audit. `Ok` carries the exit code (0 clean, 1 failed); `Err`
/// is an error (exit code 2).
pub async fn run(args: AuditArgs) -> anyhow::Result<u8> {
    let deployment = &args.deployment;
    let prefix = deployment.topology_prefix()?;
    let (js, partitions) = deployment
        .jetstream(
            "amends-audit",
            Duration::from_millis(args.connect_timeout_ms),
        )
        .await?;

    let req_name = prefix.stream_name(Stream::Requests);
    let dec_name = prefix.stream_name(Stream::Decisions);
    let mut req_stream = js
        .get_stream(&req_name)
        .await
        .with_context(|| format!("opening the requests stream {req_name}"))?;
    let mut dec_stream = js
        .get_stream(&dec_name)
        .await
        .with_context(|| format!("opening the decisions stream {dec_name}"))?;

    // 1. Ack floors, before the streams' ends (see the module docs).
    let mut replays = Vec::new();
    for id in partitions.ids() {
        let ack_floor = match req_stream
            .consumer_info(topology::worker_consumer(id))
            .await
        {
            Ok(info) => info.ack_floor.stream_sequence,
            // No worker consumer yet: nothing is known to be published.
            Err(_) => 0,
        };
        replays.push(Replay::new(
            Machine::new(id, partitions, Config::default()),
            ack_floor,
        ));
    }
    // 2. The ends.
    let req_state = req_stream
        .info()
        .await
        .context("reading the requests stream's state")?
        .state
        .clone();
    let dec_state = dec_stream
        .info()
        .await
        .context("reading the decisions stream's state")?
        .state
        .clone();

    let bar = indicatif::ProgressBar::new(req_state.messages.saturating_add(dec_state.messages));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} messages ({per_sec}, {eta})",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let idle = Duration::from_millis(args.idle_timeout_ms);
    let mut findings = Findings::default();

    // 3. The decisions stream, once, into maps by op id and event id.
    bar.set_message("decisions");
    let dec_subjects: HashMap<String, PartitionId> =
        partitions.ids().map(|id| (prefix.dec(id), id)).collect();
    let owner_subjects: std::collections::HashSet<String> =
        partitions.ids().map(|id| prefix.owner(id)).collect();
    // Decisions by partition and op id: dedup is per partition, so an op id
    // a client published on two partitions is decided on each.
    let mut published: HashMap<(u32, OpId), Vec<(u64, Decision)>> = HashMap::new();
    let mut published_expiries: HashMap<OpId, Vec<(u64, HoldExpired)>> = HashMap::new();
    read_stream(
        &dec_stream,
        dec_state.last_sequence,
        idle,
        &bar,
        |message, read| {
            let seq = read.position;
            // Ownership records fence the decisions; they are not ones.
            if owner_subjects.contains(message.subject.as_str()) {
                return;
            }
            if !dec_subjects.contains_key(message.subject.as_str()) {
                findings.warn(format!(
                    "decisions stream: message {seq} on {:?}, the subject of no partition",
                    message.subject.as_str()
                ));
                return;
            }
            match decode_published(&message.payload) {
                Some(Published::Decision(d)) => published
                    .entry((d.partition, d.op_id))
                    .or_default()
                    .push((seq, d)),
                Some(Published::HoldExpired(e)) => published_expiries
                    .entry(e.event_id)
                    .or_default()
                    .push((seq, e)),
                None => findings.fail(format!(
                    "decisions stream: message {seq} on {} is neither a decision nor a hold expiry",
                    message.subject.as_str()
                )),
            }
        },
    )
    .await?;

    // 4. The requests stream, applied partition by partition.
    bar.set_message("requests");
    let req_subjects: HashMap<String, usize> = partitions
        .ids()
        .zip(0usize..)
        .map(|(id, i)| (prefix.req(id), i))
        .collect();
    read_stream(
        &req_stream,
        req_state.last_sequence,
        idle,
        &bar,
        |message, read| {
            let seq = read.position;
            let Some(&i) = req_subjects.get(message.subject.as_str()) else {
                findings.warn(format!(
                    "requests stream: message {seq} on {:?}, the subject of no partition",
                    message.subject.as_str()
                ));
                return;
            };
            let Some(r) = replays.get_mut(i) else {
                return;
            };
            r.take(&read, &mut findings);
        },
    )
    .await?;
    bar.finish_and_clear();

    compare(&mut replays, &published, &published_expiries, &mut findings);
    check_invariants(&replays, partitions, &mut findings);
    report(&replays, &findings);
    Ok(if findings.failures.is_empty() {
        0
    } else {
        EXIT_FAILED
    })
}

/// Reads `stream` from its first message up to sequence `end` with an
/// ordered consumer, calling `each(message, log message)`: the message
/// as the worker reads it (`worker::log_message`: its stream sequence,
/// log time, reply subject). Gives up when no message comes for `idle`.
async fn read_stream(
    stream: &jetstream::stream::Stream,
    end: u64,
    idle: Duration,
    bar: &indicatif::ProgressBar,
    mut each: impl FnMut(&jetstream::Message, LogMessage<'_>),
) -> anyhow::Result<()> {
    if end == 0 {
        return Ok(());
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("creating an ordered consumer")?;
    let mut messages = consumer.messages().await.context("reading a stream")?;
    let mut last = 0;
    while last < end {
        let next = tokio::time::timeout(idle, messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("no message for {idle:?} at sequence {last} of {end}"))?;
        let message = next
            .with_context(|| format!("the stream ended at sequence {last} of {end}"))?
            .context("reading a message")?;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("reading a message's info: {e}"))?;
        last = info.stream_sequence;
        if last > end {
            break;
        }
        each(&message, worker::log_message(&message, &info));
        bar.inc(1);
    }
    Ok(())
}

/// A decisions-stream body: a hold expiry (it has an `event_id`) or a
/// decision; `None` if it is neither.
pub(crate) fn decode_published(bytes: &[u8]) -> Option<Published> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if value.get("event_id").is_some() {
        serde_json::from_value(value)
            .ok()
            .map(Published::HoldExpired)
    } else {
        serde_json::from_value(value).ok().map(Published::Decision)
    }
}

/// Compares what the log re-derives with what the decisions stream holds.
fn compare(
    replays: &mut [Replay],
    published: &HashMap<(u32, OpId), Vec<(u64, Decision)>>,
    published_expiries: &HashMap<OpId, Vec<(u64, HoldExpired)>>,
    findings: &mut Findings,
) {
    let mut derived: HashMap<(u32, OpId), u64> = HashMap::new();
    let mut decided_on: BTreeMap<OpId, Vec<u32>> = BTreeMap::new();
    let mut derived_events: HashMap<OpId, u32> = HashMap::new();
    for r in replays.iter_mut() {
        let p = r.machine.partition();
        for (pos, d) in &r.decisions {
            // A second decision of one op id is the invariants' to report
            // (`one_answer_per_op`).
            derived.insert((p.get(), d.op_id), *pos);
            decided_on.entry(d.op_id).or_default().push(p.get());
            match published.get(&(p.get(), d.op_id)) {
                None if *pos <= r.ack_floor => findings.fail(format!(
                    "op {}: decided at partition {p} position {pos} (acknowledged by the worker) but not on the decisions stream",
                    d.op_id
                )),
                None => findings.warn(format!(
                    "op {}: decided at partition {p} position {pos}, not published (yet): the service may be behind",
                    d.op_id
                )),
                Some(copies) => {
                    let mut all_equal = true;
                    // Identical copies: nothing below names them. (Copies
                    // that differ fail below, each by its sequence.)
                    if copies.len() > 1 && copies.iter().all(|(_, copy)| copy == d) {
                        all_equal = false;
                        let seqs: Vec<u64> = copies.iter().map(|(seq, _)| *seq).collect();
                        findings.fail(format!(
                            "op {}: on the decisions stream {} times (sequences {seqs:?}); each operation is decided once",
                            d.op_id,
                            copies.len()
                        ));
                    }
                    for (seq, copy) in copies {
                        if copy != d {
                            all_equal = false;
                            findings.fail(format!(
                                "op {}: the decisions stream (sequence {seq}) says {} but the log re-derives {}",
                                d.op_id,
                                String::from_utf8_lossy(&wire::encode(copy)),
                                String::from_utf8_lossy(&wire::encode(d)),
                            ));
                        }
                    }
                    if all_equal {
                        r.matched = r.matched.saturating_add(1);
                    }
                }
            }
        }
        for (pos, e) in &r.expiries {
            derived_events.insert(e.event_id, p.get());
            match published_expiries.get(&e.event_id) {
                None if *pos <= r.ack_floor => findings.fail(format!(
                    "hold expiry {} (hold {}): applied at partition {p} position {pos} (acknowledged) but not on the decisions stream",
                    e.event_id, e.hold
                )),
                None => findings.warn(format!(
                    "hold expiry {} (hold {}): not published (yet): the service may be behind",
                    e.event_id, e.hold
                )),
                Some(copies) => {
                    if copies.len() > 1 && copies.iter().all(|(_, copy)| copy == e) {
                        let seqs: Vec<u64> = copies.iter().map(|(seq, _)| *seq).collect();
                        findings.fail(format!(
                            "hold expiry {}: on the decisions stream {} times (sequences {seqs:?})",
                            e.event_id,
                            copies.len()
                        ));
                    }
                    for (seq, copy) in copies.iter().filter(|(_, c)| c != e) {
                        findings.fail(format!(
                            "hold expiry {}: the decisions stream (sequence {seq}) says {} but the log re-derives {}",
                            e.event_id,
                            String::from_utf8_lossy(&wire::encode(copy)),
                            String::from_utf8_lossy(&wire::encode(e)),
                        ));
                    }
                }
            }
        }
    }
    // One op id decided on several partitions: its client published it on
    // each (every decision above matched its own partition's log). The
    // service cannot see that (dedup is per partition), so it is the
    // client's to fix; it is reported, and does not fail the audit.
    for (op_id, on) in decided_on.iter().filter(|(_, on)| on.len() > 1) {
        findings.warn(format!(
            "op {op_id}: decided on partitions {on:?}, one decision each: a client published this op id on more than one partition (op ids are deduplicated per partition; after wrong_partition, submit again under a new op id)"
        ));
    }
    // Published but never derived: forged, or from a log that lost messages.
    // Decisions of messages past what was read are the service running on.
    let applied_by: HashMap<u32, u64> = replays
        .iter()
        .map(|r| (r.machine.partition().get(), r.state.clock().position))
        .collect();
    let read_up_to = |partition: u32| applied_by.get(&partition).copied().unwrap_or(0);
    let mut extra: BTreeMap<String, String> = BTreeMap::new();
    for ((partition, op_id), copies) in published {
        if derived.contains_key(&(*partition, *op_id)) {
            continue;
        }
        for (seq, d) in copies {
            if d.position <= read_up_to(d.partition) {
                extra.insert(
                    op_id.to_string(),
                    format!(
                        "op {op_id}: on the decisions stream (sequence {seq}) but the log does not decide it there"
                    ),
                );
            }
        }
    }
    for (event_id, copies) in published_expiries {
        if derived_events.contains_key(event_id) {
            continue;
        }
        for (seq, e) in copies {
            if e.position <= read_up_to(e.partition) {
                extra.insert(
                    event_id.to_string(),
                    format!("hold expiry {event_id}: on the decisions stream (sequence {seq}) but the log does not expire it"),
                );
            }
        }
    }
    for text in extra.into_values() {
        findings.fail(text);
    }
}

/// Checks the invariants (`amends_core::invariants`) over the re-derived
/// states of every partition and the decisions they made. The service may
/// be behind, so a saga may be in flight and a reservation whose confirm
/// or cancel is not applied yet is a warning.
fn check_invariants(replays: &[Replay], partitions: Partitions, findings: &mut Findings) {
    let views: Vec<invariants::View<'_>> = replays
        .iter()
        .map(|r| invariants::View::new(r.machine.partition(), &r.state, &r.commands))
        .collect();
    let scope = invariants::Scope {
        settled: false,
        ledger: true,
    };
    let mut found = invariants::check(partitions, &views, scope);
    found.extend(invariants::one_answer_per_op(
        replays
            .iter()
            .flat_map(|r| r.decisions.iter().map(|(_, d)| d)),
    ));
    for text in found.failures {
        findings.fail(text);
    }
    for text in found.warnings {
        findings.warn(text);
    }
}

/// Prints the table and the findings.
fn report(replays: &[Replay], findings: &Findings) {
    println!(
        "{:>9} {:>9} {:>7} {:>9} {:>8} {:>6} {:>9} {:>8} {:>8} {:>7} {:>8}",
        "partition",
        "messages",
        "dead",
        "decisions",
        "matched",
        "sagas",
        "in flight",
        "accounts",
        "holds",
        "claims",
        "expiries"
    );
    for r in replays {
        let sagas = r.state.sagas().count();
        let in_flight = r
            .state
            .sagas()
            .filter(|(_, s)| matches!(s.state, SagaState::Trying { .. }))
            .count();
        let pending = r
            .state
            .holds()
            .filter(|(_, h)| h.status == HoldStatus::Pending)
            .count();
        println!(
            "{:>9} {:>9} {:>7} {:>9} {:>8} {:>6} {:>9} {:>8} {:>8} {:>7} {:>8}",
            r.machine.partition().get(),
            r.messages,
            r.dead_letters,
            r.decisions.len(),
            r.matched,
            sagas,
            in_flight,
            r.state.accounts().count(),
            pending,
            r.state.claims().count(),
            r.expiries.len(),
        );
    }
    for w in &findings.warnings {
        println!("warning: {w}");
    }
    for f in &findings.failures {
        println!("FAILED: {f}");
    }
    if findings.failures.is_empty() {
        println!("audit passed ({} warnings)", findings.warnings.len());
    } else {
        println!(
            "audit failed: {} failures, {} warnings",
            findings.failures.len(),
            findings.warnings.len()
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::VecDeque;

    use amends_core::command::{AccountId, Owner, Phase};
    use amends_core::state::{Account, Claim, Hold, Write as _};
    use amends_core::{Request, route, saga};

    use super::*;

    const N: u32 = 4;
    /// Log time of the first message; every op id below is a v7 id of it.
    const T0: u64 = 1_800_000_000_000;

    fn op(i: u64) -> OpId {
        let mut random = [0u8; 10];
        random[2..].copy_from_slice(&i.to_be_bytes());
        let id = uuid::Builder::from_unix_timestamp_millis(T0, &random);
        OpId(id.into_uuid())
    }

    fn json(op_id: OpId, command: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"op_id": op_id, "command": command})).unwrap()
    }

    /// Runs `bodies` through `N` partitions the way the workers would: each
    /// request on its routing key's partition, every `Send` appended to its
    /// partition's log, one log (and one position counter) for all, as one
    /// stream holds every partition's subject.
    fn run_log(bodies: &[Vec<u8>]) -> (Vec<Replay>, Findings) {
        let n = Partitions::new(N).unwrap();
        let mut replays: Vec<Replay> = n
            .ids()
            .map(|id| Replay::new(Machine::new(id, n, Config::default()), u64::MAX))
            .collect();
        let mut findings = Findings::default();
        let mut queue: VecDeque<(usize, Vec<u8>)> = bodies
            .iter()
            .map(|b| {
                let req: Request = serde_json::from_slice(b).unwrap();
                let p = route::partition_of(&req.routing_key().unwrap(), n);
                (usize::try_from(p.get()).unwrap(), b.clone())
            })
            .collect();
        let mut seq = 0;
        while let Some((p, body)) = queue.pop_front() {
            seq += 1;
            assert!(seq < 10_000, "bounded");
            let message = LogMessage {
                bytes: &body,
                position: seq,
                log_time_ms: T0 + seq,
                reply_to: None,
            };
            for effect in replays[p].take(&message, &mut findings) {
                if let Effect::Send { partition, request } = effect {
                    let q = usize::try_from(partition.get()).unwrap();
                    queue.push_back((q, wire::encode(&request)));
                }
            }
        }
        (replays, findings)
    }

    fn check(replays: &[Replay]) -> Findings {
        let mut findings = Findings::default();
        check_invariants(replays, Partitions::new(N).unwrap(), &mut findings);
        findings
    }

    /// A workload touching every kind of money movement and reservation.
    fn workload() -> Vec<Vec<u8>> {
        use serde_json::json;
        let saga = json!({"type": "saga", "steps": [
            {"command": {"type": "debit", "account": "a", "amount": 5}},
            {"command": {"type": "claim", "namespace": "seat", "key": "7", "owner": "o"}},
        ]});
        vec![
            json(op(1), json!({"type": "open_account", "account": "a"})),
            json(op(2), json!({"type": "open_account", "account": "b"})),
            json(
                op(3),
                json!({"type": "credit", "account": "a", "amount": 100}),
            ),
            json(op(4), json!({"type": "debit", "account": "a", "amount": 7})),
            json(op(5), json!({"type": "hold", "account": "a", "amount": 9})),
            json(
                op(6),
                json!({"type": "post", "account": "a", "hold": op(5), "amount": 4}),
            ),
            json(
                op(7),
                json!({"type": "transfer", "from": "a", "to": "b", "amount": 11}),
            ),
            json(
                op(8),
                json!({"type": "transfer", "from": "b", "to": "a", "amount": 1000}),
            ),
            json(op(9), saga),
            json(
                op(10),
                json!({"type": "debit", "account": "b", "amount": 1}),
            ),
        ]
    }

    #[test]
    fn a_clean_replay_has_no_findings_and_every_tamper_is_named() {
        // Proves the invariant checks pass a real replay (credits, debits,
        // a post, transfers confirmed and refused, a saga with a claim) and
        // fail each kind of broken state: a balance off by one, a hold past
        // its expiry, a tentative claim of an ended saga, held out of sync.
        let (replays, findings) = run_log(&workload());
        assert!(findings.failures.is_empty(), "{findings:?}");
        let clean = check(&replays);
        assert!(
            clean.failures.is_empty() && clean.warnings.is_empty(),
            "{clean:?}"
        );
        let sagas: usize = replays.iter().map(|r| r.state.sagas().count()).sum();
        assert_eq!(sagas, 3);

        let a =
            usize::try_from(route::partition_of("a", Partitions::new(N).unwrap()).get()).unwrap();
        let tamper = |f: &dyn Fn(&mut MemState)| {
            let (mut replays, _) = run_log(&workload());
            f(&mut replays[a].state);
            check(&replays).failures.join("\n")
        };
        let account = replays[a].state.account("a").unwrap();
        // 100 - 7 - 4 (posted of the hold of 9) - 11 (transfer) - 5 (saga).
        assert_eq!((account.balance, account.held), (73, 0));
        let failures = tamper(&|s| {
            let id = AccountId::new("a").unwrap();
            s.put_account(
                &id,
                Account {
                    balance: account.balance + 1,
                    ..account
                },
            );
        });
        assert!(failures.contains("money not conserved"), "{failures}");

        // A pending hold of 1 on "a" (its account's held raised to match).
        let add_hold = |s: &mut MemState, hold: OpId, expires_at_ms: Option<u64>| {
            let id = AccountId::new("a").unwrap();
            s.put_hold(
                hold,
                Hold {
                    account: id.clone(),
                    amount: 1,
                    expires_at_ms,
                    status: HoldStatus::Pending,
                },
            );
            s.put_account(
                &id,
                Account {
                    held: account.held + 1,
                    ..account
                },
            );
        };
        let failures = tamper(&|s| add_hold(s, op(99), Some(T0)));
        assert!(failures.contains("past its expiry"), "{failures}");

        let failures = tamper(&|s| {
            let id = AccountId::new("a").unwrap();
            s.put_account(
                &id,
                Account {
                    held: account.held + 3,
                    ..account
                },
            );
        });
        assert!(failures.contains("pending holds add up to"), "{failures}");

        // A hold with a derived id, no expiry and no saga: nobody can end it.
        let failures = tamper(&|s| add_hold(s, op(98).derive("nobody's step"), None));
        assert!(failures.contains("no saga to end it"), "{failures}");

        let seat = route::claim_routing_key("seat", "7");
        let q =
            usize::try_from(route::partition_of(&seat, Partitions::new(N).unwrap()).get()).unwrap();
        let (mut replays, _) = run_log(&workload());
        let try_id = saga::step_id(op(9), 1, Phase::Try);
        replays[q].state.put_claim(
            &seat,
            Some(Claim {
                owner: Owner::new("o").unwrap(),
                tentative: Some(try_id),
            }),
        );
        let failures = check(&replays).failures.join("\n");
        assert!(failures.contains("which has ended"), "{failures}");
    }
}
