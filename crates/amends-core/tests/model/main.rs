//! Model-based property tests of the partition state machine.
//!
//! Generated logs (`log.rs`: fresh requests of every kind, duplicates,
//! resubmissions, conflicting reuses of op ids, malformed messages, ticks,
//! log time that jumps or goes back, op ids on both sides of the window,
//! crashes and compactions) are applied to `Machine::apply` and checked
//! against a naive reference model (`reference.rs`), against themselves
//! (replay, batching through an overlay, restarts) and against the
//! invariants of DESIGN.md after every message: one `Decided` per op id
//! (never one for an op id that is not v7), an answer that decides nothing (a
//! duplicate, a conflict, a refusal of the op id) changes nothing but what a
//! tick would, and when compaction runs never changes an answer. `cases.rs`
//! holds small, data-driven cases, one per reason code. `sagas.rs`
//! generates sagas (steps with compensations, steps on another partition
//! that keep a saga in flight until its deadline, resubmissions with new
//! reply subjects) and checks them against a naive reference of what a
//! saga does. The invariants are `amends_core::invariants`, the ones the
//! saga simulation and `amends audit` check too.

mod cases;
mod log;
mod reference;
mod sagas;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use amends_core::command::{Command, Request, raw_fingerprint};
use amends_core::decision::{Decision, Outcome, Reason};
use amends_core::id::OpId;
use amends_core::invariants::{self, Scope, View};
use amends_core::partition::{Answer, Effect, Fault, Input};
use amends_core::state::{ChangeSet, HoldStatus, MemState, Overlay};
use amends_core::wire;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestCaseError, TestRunner};

use crate::log::{Entry, Item, PARTITION, RETENTION_MS, SKEW_MS};
use crate::reference::{Body, Reference};

/// Generated logs per property.
const CASES: u32 = 256;
/// Longest generated log, in ops.
const OPS_MAX: usize = 200;

/// The seed of the property tests unless `AMENDS_PROPTEST_SEED` says
/// otherwise.
const DEFAULT_SEED: u64 = 0x616d_656e_6473;

/// Runs `test` on `CASES` values of `strategy` (`PROPTEST_CASES` overrides
/// it, for a longer soak); panics with the shrunk failing input on failure.
fn run<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let config = ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CASES),
        // Shrinking a 200-op log is cheap; a clear counterexample is worth it.
        max_shrink_iters: 4096,
        // Keep the tree clean: a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    // A fixed seed by default, so the suite (and its coverage checks) is the
    // same on every run; `AMENDS_PROPTEST_SEED=<u64>` picks another, and
    // `AMENDS_PROPTEST_SEED=random` draws one (for soaks). The seed is
    // printed on failure.
    let seed: u64 = match std::env::var("AMENDS_PROPTEST_SEED").ok().as_deref() {
        None => DEFAULT_SEED,
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| {
                d.as_nanos().to_le_bytes()[..8]
                    .iter()
                    .fold(0u64, |a, b| (a << 8) | u64::from(*b))
            })
            .unwrap_or(DEFAULT_SEED),
        Some(v) => v
            .parse()
            .expect("AMENDS_PROPTEST_SEED is a u64 or `random`"),
    };
    let mut seed_bytes = [0u8; 32];
    for chunk in seed_bytes.chunks_mut(8) {
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    let rng = proptest::test_runner::TestRng::from_seed(config.rng_algorithm, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e} (AMENDS_PROPTEST_SEED={seed})");
    }
}

/// What the generated logs exercised, over all cases of one property.
#[derive(Default)]
struct Coverage(BTreeSet<String>);

impl Coverage {
    fn note(&mut self, input: &Input, answer: &Answer, effects: &[Effect]) {
        let tag = match answer {
            Answer::Decided(d) => match &d.outcome {
                Outcome::Confirmed { .. } => "confirmed",
                Outcome::Rejected { reason } => reason.code(),
                Outcome::InFlight { .. } => "in_flight",
            },
            Answer::Duplicate(_) => "duplicate",
            Answer::Conflict(_) => "conflict",
            Answer::Refused(d) => {
                let why = match d.outcome.reason() {
                    Some(Reason::OpIdOutsideWindow {
                        op_time_ms,
                        earliest_ms,
                        ..
                    }) if op_time_ms < earliest_ms => "too_old",
                    Some(Reason::OpIdOutsideWindow { .. }) => "too_new",
                    _ => "not_v7",
                };
                self.insert(&format!("refused:{why}"));
                match input {
                    Input::Malformed { .. } => {
                        self.insert(&format!("refused:{why}:malformed_body"))
                    }
                    Input::Request(r) if r.apology_topic.is_some() => {
                        self.insert("refused:apology_topic");
                    }
                    Input::Request(_) => {}
                }
                "refused"
            }
            Answer::Ticked => "ticked",
            Answer::Accepted(_) => "accepted",
            Answer::Internal(_) => "internal",
        };
        self.0.insert(tag.to_owned());
        for e in effects {
            let tag = match e {
                Effect::Decided(_) => "effect:decided",
                Effect::Apology(_) => "effect:apology",
                Effect::HoldExpired(_) => "effect:hold_expired",
                Effect::Send { .. } => "effect:send",
                Effect::Reply { .. } => "effect:reply",
                Effect::DeadLetter(_) => "effect:dead_letter",
            };
            self.0.insert(tag.to_owned());
        }
    }

    fn insert(&mut self, tag: &str) {
        self.0.insert(tag.to_owned());
    }

    /// Fails unless every tag in `expected` was seen.
    fn assert_has(&self, expected: &[&str]) {
        let missing: Vec<_> = expected.iter().filter(|t| !self.0.contains(**t)).collect();
        assert!(
            missing.is_empty(),
            "the generated logs never produced {missing:?}; saw {:?}",
            self.0
        );
    }
}

/// What the harness learns from answers alone, to check the state against.
#[derive(Default)]
struct Books {
    /// The one `Decided` answer of every op id.
    decided: BTreeMap<OpId, Decision>,
    /// Every op id ever answered `Refused`.
    refused: BTreeSet<OpId>,
    /// The request decided for each op id (absent for malformed ones).
    requests: BTreeMap<OpId, Request>,
    /// Confirmed credits minus confirmed debits minus posted amounts.
    money: i128,
}

impl Books {
    /// Records one message's answer; checks exactly-once and the shape of
    /// the effects (expiries, then an apology and the decision if decided;
    /// expiries only otherwise).
    fn record(
        &mut self,
        input: &Input,
        answer: &Answer,
        effects: &[Effect],
    ) -> Result<(), TestCaseError> {
        let expiries = effects
            .iter()
            .take_while(|e| matches!(e, Effect::HoldExpired(_)))
            .count();
        let rest = &effects[expiries..];
        if let Some(d) = answer.decision() {
            prop_assert_eq!(d.op_id, op_id_of(input), "the answer names another op id");
        }
        match answer {
            Answer::Decided(d) => {
                prop_assert!(
                    !self.decided.contains_key(&d.op_id),
                    "op id {} decided twice: {:?} then {:?}",
                    d.op_id,
                    self.decided.get(&d.op_id),
                    d
                );
                prop_assert!(
                    !matches!(
                        d.outcome.reason(),
                        Some(Reason::OpIdConflict | Reason::OpIdOutsideWindow { .. })
                    ),
                    "a sender-only refusal was decided and published: {:?}",
                    d
                );
                prop_assert!(
                    op_time_ms(d.op_id).is_some(),
                    "an op id that is not v7 was decided and published: {:?}",
                    d
                );
                let apology = match rest {
                    [Effect::Decided(e)] => {
                        prop_assert_eq!(e, d);
                        false
                    }
                    [Effect::Apology(a), Effect::Decided(e)] => {
                        prop_assert_eq!(e, d);
                        prop_assert_eq!(&a.decision, d);
                        prop_assert!(!d.outcome.is_confirmed(), "apology for a confirmation");
                        true
                    }
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "bad effects after expiries: {other:?}"
                        )));
                    }
                };
                self.decided.insert(d.op_id, d.clone());
                if let Input::Request(req) = input {
                    prop_assert_eq!(
                        apology,
                        req.apology_topic.is_some() && !d.outcome.is_confirmed()
                    );
                    self.requests.insert(req.op_id, req.clone());
                    if d.outcome.is_confirmed() {
                        self.money += self.money_moved(&req.command);
                    }
                }
            }
            Answer::Duplicate(d) => {
                prop_assert_eq!(
                    Some(d),
                    self.decided.get(&d.op_id),
                    "a duplicate gets the original"
                );
                prop_assert!(rest.is_empty(), "a duplicate pushed {:?}", rest);
            }
            Answer::Conflict(d) => {
                prop_assert!(self.decided.contains_key(&d.op_id), "conflict with nothing");
                prop_assert_eq!(d.outcome.reason(), Some(&Reason::OpIdConflict));
                prop_assert!(rest.is_empty(), "a conflict pushed {:?}", rest);
            }
            Answer::Refused(d) => {
                prop_assert!(rest.is_empty(), "a refusal of the op id pushed {:?}", rest);
                self.refused.insert(d.op_id);
                // The window at the refusal's log time, from the settings.
                let earliest = d.log_time_ms.saturating_sub(RETENTION_MS);
                let latest = d.log_time_ms.saturating_add(SKEW_MS);
                let Some(t) = op_time_ms(d.op_id) else {
                    // Not v7: malformed whatever the body, with the op id's
                    // own detail (never the parser's, never outside the
                    // window).
                    let want = Reason::Malformed {
                        detail: reference::NOT_V7_DETAIL.to_owned(),
                    };
                    prop_assert_eq!(d.outcome.reason(), Some(&want), "a non-v7 op id refused");
                    return Ok(());
                };
                prop_assert!(
                    t < earliest || latest < t,
                    "{} is inside [{}, {}]",
                    t,
                    earliest,
                    latest
                );
                let want = Reason::OpIdOutsideWindow {
                    op_time_ms: t,
                    earliest_ms: earliest,
                    latest_ms: latest,
                };
                prop_assert_eq!(d.outcome.reason(), Some(&want));
                if let Some(first) = self.decided.get(&d.op_id) {
                    // A decided op id is refused only once its record is
                    // past the compaction horizon (log time − retention −
                    // skew): its decision and its timestamp both before it.
                    let horizon = earliest.saturating_sub(SKEW_MS);
                    prop_assert!(
                        t < horizon && first.log_time_ms < horizon,
                        "op id decided as {:?} refused before its record passed the horizon: {:?}",
                        first,
                        d
                    );
                }
            }
            Answer::Ticked => prop_assert!(rest.is_empty(), "a tick pushed {:?}", rest),
            Answer::Accepted(_) | Answer::Internal(_) => {
                prop_assert!(false, "the model generates no sagas, got {:?}", answer)
            }
        }
        Ok(())
    }

    /// How a confirmed command changed the sum of balances.
    fn money_moved(&self, command: &Command) -> i128 {
        match command {
            Command::Credit { amount, .. } => i128::from(amount.get()),
            Command::Debit { amount, .. } => -i128::from(amount.get()),
            Command::Post { hold, amount, .. } => match amount {
                Some(a) => -i128::from(a.get()),
                None => match self.requests.get(hold).map(|r| &r.command) {
                    Some(Command::Hold { amount, .. }) => -i128::from(amount.get()),
                    other => panic!("post of {hold} confirmed, but its hold request is {other:?}"),
                },
            },
            _ => 0,
        }
    }
}

/// The op id of a message (also a tick's).
fn op_id_of(input: &Input) -> OpId {
    match input {
        Input::Request(r) => r.op_id,
        Input::Malformed { op_id, .. } => *op_id,
    }
}

/// The timestamp of a v7 op id, read from its bits (not with the core's
/// `OpId::v7_unix_ms`); `None` for another version.
fn op_time_ms(op_id: OpId) -> Option<u64> {
    (op_id.0.get_version_num() == 7).then(|| {
        let ms = op_id.0.as_u128() >> 80;
        u64::try_from(ms).expect("48 bits fit")
    })
}

/// Checks that a message whose answer decides nothing (a duplicate, a
/// conflict, a refusal of the op id) changed the state and pushed
/// effects exactly as a tick at its position and log time would have: the
/// clock and due hold expiries, nothing else (no record, no decision, no
/// apology).
fn check_like_tick(
    before: &MemState,
    e: &Entry,
    after: &MemState,
    effects: &[Effect],
) -> Result<(), TestCaseError> {
    let tick = Input::Request(Request {
        op_id: op_id_of(&e.input),
        command: Command::Tick {},
        apology_topic: None,
    });
    let mut ticked = before.clone();
    let mut tick_effects = Vec::new();
    let answer = log::machine().apply(
        &mut ticked,
        e.position,
        e.log_time_ms,
        &tick,
        &mut tick_effects,
    );
    prop_assert_eq!(answer, Ok(Answer::Ticked));
    prop_assert!(
        ticked == *after,
        "the message at position {} changed more than a tick would",
        e.position
    );
    prop_assert_eq!(&tick_effects[..], effects, "effects beyond a tick's");
    Ok(())
}

/// The invariants of a partition state, and its dedup records against the
/// answers.
fn check_invariants(state: &MemState, books: &Books, compacted: bool) -> Result<(), TestCaseError> {
    let balances: i128 = state.accounts().map(|(_, a)| i128::from(a.balance)).sum();
    prop_assert_eq!(balances, books.money, "money is not conserved");

    // The invariants every driver checks (`amends_core::invariants`): held
    // amounts, floors and ceilings, the expiry index, routing; and, on a
    // state never compacted, the money ledger.
    let commands = books.requests.iter().map(|(id, r)| (id, &r.command));
    let view = View::new(log::machine().partition(), state, commands);
    let scope = Scope {
        settled: false,
        ledger: !compacted,
    };
    let found = invariants::check(log::partitions(), &[view], scope);
    prop_assert!(found.passed(), "invariants: {:#?}", found.failures);
    prop_assert!(found.warnings.is_empty(), "{:#?}", found.warnings);

    for (op, dedup) in state.dedups() {
        prop_assert_eq!(
            Some(&dedup.decision),
            books.decided.get(op),
            "dedup record of {}",
            op
        );
    }
    if !compacted {
        prop_assert_eq!(
            state.dedups().count(),
            books.decided.len(),
            "a decision has no dedup record"
        );
    }
    Ok(())
}

/// The state equals the reference model's, record by record.
fn check_against_model(state: &MemState, model: &Reference) -> Result<(), TestCaseError> {
    let clock = state.clock();
    prop_assert_eq!(
        (clock.position, clock.log_time_ms),
        (model.position, model.now_ms),
        "clock"
    );

    let accounts: BTreeMap<String, (i64, i64, i64, Option<i64>)> = state
        .accounts()
        .map(|(id, a)| (id.to_string(), (a.balance, a.held, a.floor, a.ceiling)))
        .collect();
    let want: BTreeMap<String, (i64, i64, i64, Option<i64>)> = model
        .accounts
        .iter()
        .map(|(id, a)| (id.clone(), (a.balance, a.held, a.floor, a.ceiling)))
        .collect();
    prop_assert_eq!(accounts, want, "accounts");

    type HoldRow = (String, i64, Option<u64>, HoldStatus);
    let holds: BTreeMap<OpId, HoldRow> = state
        .holds()
        .map(|(id, h)| {
            (
                *id,
                (h.account.to_string(), h.amount, h.expires_at_ms, h.status),
            )
        })
        .collect();
    let want: BTreeMap<OpId, HoldRow> = model
        .holds
        .iter()
        .map(|(id, h)| {
            (
                *id,
                (h.account.clone(), h.amount, h.expires_at_ms, h.status),
            )
        })
        .collect();
    prop_assert_eq!(holds, want, "holds");

    let claims: BTreeMap<String, String> = state
        .claims()
        .map(|(k, c)| (k.clone(), c.owner.to_string()))
        .collect();
    prop_assert_eq!(claims, model.claims_by_routing_key(), "claims");

    prop_assert_eq!(state.dedups().count(), model.seen.len(), "dedup records");
    for (op, seen) in &model.seen {
        let Some(dedup) = state.dedup(*op) else {
            return Err(TestCaseError::fail(format!("no dedup record for {op}")));
        };
        prop_assert_eq!(&dedup.decision, &seen.decision, "decision of {}", op);
        let fingerprint = match &seen.body {
            Body::Parsed(req) => req.fingerprint(),
            Body::Raw(bytes) => raw_fingerprint(bytes),
        };
        prop_assert_eq!(dedup.fingerprint, fingerprint, "fingerprint of {}", op);
    }
    Ok(())
}

#[test]
fn matches_reference() {
    // Proves apply on a MemState answers, emits and stores exactly what the naive reference model does, message by message, with the invariants checked after each and every answer that decides nothing compared with a tick.
    let coverage = RefCell::new(Coverage::default());
    run(log::ops(OPS_MAX, 0, 0), |ops| {
        let machine = log::machine();
        let mut state = MemState::new();
        let mut model = Reference::new(PARTITION, 8, RETENTION_MS, SKEW_MS);
        let mut books = Books::default();
        for entry in log::messages(&log::build(&ops)) {
            let Entry {
                position,
                log_time_ms,
                input,
                bytes,
            } = &entry;
            let before = state.clone();
            let mut effects = Vec::new();
            let got = machine.apply(&mut state, *position, *log_time_ms, input, &mut effects);
            let (want, want_effects) = model.apply(*position, *log_time_ms, input, bytes);
            prop_assert_eq!(&got, &want, "answer at position {}", position);
            prop_assert_eq!(&effects, &want_effects, "effects at position {}", position);
            let Ok(answer) = got else {
                return Err(TestCaseError::fail("generated positions always advance"));
            };
            let op_id = op_id_of(input);
            match &answer {
                Answer::Decided(_) if books.refused.contains(&op_id) => {
                    // A too-new op id, now inside the window: its first decision.
                    coverage.borrow_mut().insert("decided after refused");
                }
                Answer::Refused(_) if books.decided.contains_key(&op_id) => {
                    // Nothing compacts here: the record is still stored, and
                    // counts as gone because it is past the horizon.
                    prop_assert!(before.dedup(op_id).is_some(), "{} lost its record", op_id);
                    coverage.borrow_mut().insert("refused:resend_past_horizon");
                }
                Answer::Decided(d) if d.outcome.reason() == Some(&Reason::HoldNotFound) => {
                    if let Input::Request(Request {
                        command:
                            Command::Post { account, hold, .. } | Command::Void { account, hold },
                        ..
                    }) = input
                        && before.hold(*hold).is_some_and(|h| h.account == *account)
                    {
                        // The hold is stored on this account, so it counts
                        // as gone: resolved before the horizon.
                        coverage.borrow_mut().insert("hold_not_found:past_horizon");
                    }
                }
                _ => {}
            }
            books.record(input, &answer, &effects)?;
            if !matches!(answer, Answer::Decided(_)) {
                check_like_tick(&before, &entry, &state, &effects)?;
            }
            check_against_model(&state, &model)?;
            check_invariants(&state, &books, false)?;
            coverage.borrow_mut().note(input, &answer, &effects);
        }
        Ok(())
    });
    // Conflicts and refusals of the op id are never `Decided`: they are
    // counted under their own answers. The model generates no sagas: their
    // reasons are covered by tests/saga_sim.rs, the reason cases and the
    // vectors. It publishes nothing with a reply subject: the reason cases
    // and the vectors cover `reply_subject_invalid`.
    let mut expected: Vec<&str> = Reason::CODES
        .iter()
        .filter(|c| {
            !matches!(
                **c,
                "op_id_conflict"
                    | "op_id_outside_window"
                    | "reply_subject_invalid"
                    | "claim_pending"
                    | "step_refused"
                    | "deadline_exceeded"
                    | "saga_cancelled"
            )
        })
        .copied()
        .collect();
    expected.extend([
        "confirmed",
        "duplicate",
        "conflict",
        "refused",
        "refused:too_old",
        "refused:too_new",
        "refused:not_v7",
        "refused:too_old:malformed_body",
        "refused:too_new:malformed_body",
        "refused:not_v7:malformed_body",
        "refused:apology_topic",
        "refused:resend_past_horizon",
        "decided after refused",
        "hold_not_found:past_horizon",
        "ticked",
        "effect:apology",
        "effect:hold_expired",
    ]);
    coverage.into_inner().assert_has(&expected);
}

/// Every answer and effect of one run, and the state it ended in.
struct Run {
    answers: Vec<Answer>,
    effects: Vec<Vec<Effect>>,
    state: MemState,
}

fn apply_all(entries: &[Entry]) -> Run {
    let machine = log::machine();
    let mut state = MemState::new();
    let mut answers = Vec::new();
    let mut all = Vec::new();
    for e in entries {
        let mut effects = Vec::new();
        let answer = machine
            .apply(
                &mut state,
                e.position,
                e.log_time_ms,
                &e.input,
                &mut effects,
            )
            .unwrap_or_else(|f| panic!("generated positions always advance: {f}"));
        answers.push(answer);
        all.push(effects);
    }
    Run {
        answers,
        effects: all,
        state,
    }
}

/// The wire bytes of everything a run published or answered.
fn wire_bytes(run: &Run) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (answer, effects) in run.answers.iter().zip(&run.effects) {
        if let Some(d) = answer.decision() {
            out.push(wire::encode(d));
        }
        for e in effects {
            out.push(match e {
                Effect::Decided(d) => wire::encode(d),
                Effect::Apology(a) => wire::encode(a),
                Effect::HoldExpired(x) => wire::encode(x),
                Effect::Send { request, .. } => wire::encode(request),
                Effect::Reply { decision, .. } => wire::encode(decision),
                Effect::DeadLetter(d) => d.bytes.clone(),
            });
        }
    }
    out
}

#[test]
fn replay_is_bit_identical() {
    // Proves a partition is a function of its log: replaying the raw messages (decoded again) into a fresh state gives equal answers, effects, state and JSON bytes, also when resumed from a mid-log snapshot.
    run((log::ops(OPS_MAX, 0, 0), any::<Index>()), |(ops, cut)| {
        let entries = log::messages(&log::build(&ops));
        let first = apply_all(&entries);
        // The replay reads the log as a store rebuilt from it (serve on an
        // empty data directory) does: bytes only.
        let reread: Vec<Entry> = entries
            .iter()
            .map(|e| Entry {
                input: wire::decode_request(&e.bytes).expect("the op id was readable before"),
                ..e.clone()
            })
            .collect();
        let again = apply_all(&reread);
        prop_assert_eq!(&first.answers, &again.answers);
        prop_assert_eq!(&first.effects, &again.effects);
        prop_assert!(first.state == again.state, "replayed state differs");
        prop_assert_eq!(wire_bytes(&first), wire_bytes(&again));

        // Resume from a snapshot taken at `cut`: the suffix replays the same.
        let cut = cut.index(entries.len() + 1);
        let prefix = apply_all(&entries[..cut]);
        let machine = log::machine();
        let mut state = prefix.state.clone();
        for (i, e) in entries.iter().enumerate().skip(cut) {
            let mut effects = Vec::new();
            let answer = machine.apply(
                &mut state,
                e.position,
                e.log_time_ms,
                &e.input,
                &mut effects,
            );
            prop_assert_eq!(answer.as_ref(), Ok(&first.answers[i]));
            prop_assert_eq!(&effects, &first.effects[i]);
        }
        prop_assert!(
            state == first.state,
            "state resumed from a snapshot differs"
        );
        Ok(())
    });
}

#[test]
fn overlay_batches_equal_direct_apply() {
    // Proves batching through Overlay + ChangeSet + absorb, with crashes that drop an uncommitted batch and resume from the base's clock, commits exactly the direct run's states, answers and effects.
    let coverage = RefCell::new(Coverage::default());
    let strategy = (
        log::ops(OPS_MAX, 3, 0),
        prop::collection::vec(1..=8usize, 1..=16),
        prop::collection::vec(any::<bool>(), 1..=8),
    );
    run(strategy, |(ops, sizes, fresh_sets)| {
        let items = log::build(&ops);
        let entries = log::messages(&items);
        let direct = apply_all(&entries);
        // The crash points: before the message with this index.
        let mut crashes = Vec::new();
        let mut seen = 0;
        for item in &items {
            match item {
                Item::Message(_) => seen += 1,
                Item::Restart => crashes.push(seen),
                Item::Compact => {}
            }
        }

        let machine = log::machine();
        let mut base = MemState::new();
        let mut changes = ChangeSet::default();
        let mut answers: Vec<Answer> = Vec::new();
        let mut effects: Vec<Vec<Effect>> = Vec::new();
        let (mut next, mut batches, mut crashed) = (0usize, 0usize, 0usize);
        while next < entries.len() {
            let size = sizes[batches % sizes.len()];
            batches += 1;
            let start = next;
            let mut batch_answers = Vec::new();
            let mut batch_effects = Vec::new();
            let mut crash = false;
            {
                let mut overlay = Overlay::new(&base, &mut changes);
                while next < entries.len() && next - start < size {
                    if let Some(at) = crashes.iter().position(|c| *c == next) {
                        // Each crash point fires once, possibly mid-batch.
                        crashes.remove(at);
                        crash = true;
                        break;
                    }
                    let e = &entries[next];
                    let mut out = Vec::new();
                    let answer =
                        machine.apply(&mut overlay, e.position, e.log_time_ms, &e.input, &mut out);
                    let Ok(answer) = answer else {
                        return Err(TestCaseError::fail(format!("fault in a batch: {answer:?}")));
                    };
                    batch_answers.push(answer);
                    batch_effects.push(out);
                    next += 1;
                }
            }
            if crash {
                // The batch dies with the process: nothing of it is durable.
                if fresh_sets[crashed % fresh_sets.len()] {
                    changes = ChangeSet::default();
                } else {
                    changes.clear();
                    prop_assert!(changes.is_empty() && changes.dedup_order.is_empty());
                }
                crashed += 1;
                coverage.borrow_mut().insert(if next > start {
                    "crash mid-batch"
                } else {
                    "crash at batch start"
                });
                // Resume after what the durable state says was applied.
                let applied = base.clock().position;
                next = entries
                    .iter()
                    .position(|e| e.position > applied)
                    .unwrap_or(entries.len());
                prop_assert_eq!(
                    next,
                    start,
                    "the base's clock is the last committed message"
                );
                continue;
            }

            // The outbox order is the order of decisions.
            let decided: Vec<OpId> = batch_effects
                .iter()
                .flatten()
                .filter_map(|e| match e {
                    Effect::Decided(d) => Some(d.op_id),
                    _ => None,
                })
                .collect();
            prop_assert_eq!(&changes.dedup_order, &decided, "dedup_order of a batch");
            prop_assert_eq!(changes.is_empty(), next == start);
            base.absorb(&mut changes);
            prop_assert!(
                changes.is_empty() && changes.dedup_order.is_empty(),
                "absorb leaves a clean set"
            );
            answers.extend(batch_answers);
            effects.extend(batch_effects);
            coverage.borrow_mut().insert("commit");

            // Committed batches equal the direct run, prefix by prefix.
            prop_assert_eq!(&answers[..], &direct.answers[..next]);
            prop_assert_eq!(&effects[..], &direct.effects[..next]);
            let mut direct_prefix = apply_all(&entries[..next]);
            prop_assert!(
                base == direct_prefix.state,
                "state after committing through {}",
                next
            );

            // A message delivered again past the store is a fault, and writes nothing.
            if let Some(last) = next.checked_sub(1).map(|i| &entries[i]) {
                let mut scratch = ChangeSet::default();
                let mut out = Vec::new();
                let got = machine.apply(
                    &mut Overlay::new(&base, &mut scratch),
                    last.position,
                    last.log_time_ms,
                    &last.input,
                    &mut out,
                );
                let want = Fault::PositionNotAdvancing {
                    applied: last.position,
                    got: last.position,
                };
                prop_assert_eq!(got, Err(want));
                prop_assert!(
                    scratch.is_empty() && out.is_empty(),
                    "a fault wrote something"
                );
                // And MemState directly agrees.
                let got = machine.apply(
                    &mut direct_prefix.state,
                    last.position,
                    0,
                    &last.input,
                    &mut out,
                );
                prop_assert_eq!(got, Err(want));
                prop_assert!(direct_prefix.state == base && out.is_empty());
            }
        }
        prop_assert!(base == direct.state, "final state");
        prop_assert_eq!(answers, direct.answers);
        prop_assert_eq!(effects, direct.effects);
        Ok(())
    });
    coverage
        .into_inner()
        .assert_has(&["crash mid-batch", "crash at batch start", "commit"]);
}

#[test]
fn compaction_keeps_exactly_once() {
    // Proves compaction at Config::compaction_horizon_ms (at random points, or eagerly before every message) never lets an op id be decided twice: a resend is a Duplicate of the decision on record, or, once the record is past the horizon (compacted or not), refused outside the window with nothing recorded or published.
    let coverage = RefCell::new(Coverage::default());
    run((log::ops(OPS_MAX, 0, 4), any::<bool>()), |(ops, eager)| {
        let machine = log::machine();
        let config = *machine.config();
        let mut state = MemState::new();
        let mut books = Books::default();
        // Forgets all that the horizon at `now_ms` allows.
        let compact = |state: &mut MemState, now_ms: u64| {
            let before = state.dedups().count();
            state.compact(config.compaction_horizon_ms(now_ms));
            if state.dedups().count() < before {
                coverage.borrow_mut().insert("compacted");
            }
        };
        for item in log::build(&ops) {
            let e = match item {
                Item::Message(e) => e,
                Item::Compact => {
                    let now_ms = state.clock().log_time_ms;
                    compact(&mut state, now_ms);
                    continue;
                }
                Item::Restart => continue,
            };
            if eager {
                // As early as the message's own log time allows.
                let now_ms = state.clock().log_time_ms.max(e.log_time_ms);
                compact(&mut state, now_ms);
            }
            let before = state.clone();
            let mut effects = Vec::new();
            let answer = machine
                .apply(
                    &mut state,
                    e.position,
                    e.log_time_ms,
                    &e.input,
                    &mut effects,
                )
                .map_err(|f| {
                    TestCaseError::fail(format!("generated positions always advance: {f}"))
                })?;
            let op_id = op_id_of(&e.input);
            let decided = books.decided.contains_key(&op_id);
            let forgotten = decided && before.dedup(op_id).is_none();
            match &answer {
                // `record` fails any second decision; this names the cause.
                Answer::Decided(d) if decided => {
                    return Err(TestCaseError::fail(format!(
                        "op id {op_id} decided {:?}, then again {d:?} (record compacted: {forgotten})",
                        books.decided.get(&op_id),
                    )));
                }
                Answer::Refused(_) if forgotten => {
                    coverage.borrow_mut().insert("refused after compaction");
                }
                Answer::Refused(_) if decided => {
                    coverage
                        .borrow_mut()
                        .insert("refused past the horizon, record still stored");
                }
                Answer::Duplicate(_) | Answer::Conflict(_) => prop_assert!(
                    !forgotten,
                    "op id {} answered from a forgotten record",
                    op_id
                ),
                _ => {}
            }
            books.record(&e.input, &answer, &effects)?;
            if !matches!(answer, Answer::Decided(_)) {
                check_like_tick(&before, &e, &state, &effects)?;
            }
            check_invariants(&state, &books, true)?;
            coverage.borrow_mut().note(&e.input, &answer, &effects);
        }
        Ok(())
    });
    coverage.into_inner().assert_has(&[
        "compacted",
        "refused after compaction",
        "refused past the horizon, record still stored",
        "duplicate",
        "refused:too_old",
        "refused:too_new",
        "refused:not_v7",
    ]);
}

#[test]
fn compaction_timing_never_changes_answers() {
    // Proves when compaction runs changes no decision: the same log run with no physical compaction and with MemState::compact at Config::compaction_horizon_ms (at random points, or eagerly before and after every message) gives exactly the same answers and effects, and states that are equal once both are compacted to the current horizon.
    let coverage = RefCell::new(Coverage::default());
    run((log::ops(OPS_MAX, 0, 4), any::<bool>()), |(ops, eager)| {
        let machine = log::machine();
        let config = *machine.config();
        let mut plain = MemState::new();
        let mut compacted = MemState::new();
        let compact = |state: &mut MemState, now_ms: u64| {
            let (dedups, holds) = (state.dedups().count(), state.holds().count());
            state.compact(config.compaction_horizon_ms(now_ms));
            if state.dedups().count() < dedups {
                coverage.borrow_mut().insert("compacted a dedup record");
            }
            if state.holds().count() < holds {
                coverage.borrow_mut().insert("compacted a hold");
            }
        };
        for item in log::build(&ops) {
            let e = match item {
                Item::Message(e) => e,
                Item::Compact => {
                    let now_ms = compacted.clock().log_time_ms;
                    compact(&mut compacted, now_ms);
                    continue;
                }
                Item::Restart => continue,
            };
            if eager {
                let now_ms = compacted.clock().log_time_ms.max(e.log_time_ms);
                compact(&mut compacted, now_ms);
            }
            let op_id = op_id_of(&e.input);
            let stored = plain.dedup(op_id).is_some();
            let gone = stored && compacted.dedup(op_id).is_none();
            let mut want_effects = Vec::new();
            let want = machine.apply(
                &mut plain,
                e.position,
                e.log_time_ms,
                &e.input,
                &mut want_effects,
            );
            let mut effects = Vec::new();
            let got = machine.apply(
                &mut compacted,
                e.position,
                e.log_time_ms,
                &e.input,
                &mut effects,
            );
            prop_assert_eq!(&got, &want, "answer at position {}", e.position);
            prop_assert_eq!(
                &effects,
                &want_effects,
                "effects at position {}",
                e.position
            );
            if gone {
                coverage.borrow_mut().insert(match got {
                    Ok(Answer::Refused(_)) => "resend of a compacted record: refused",
                    _ => "resend of a compacted record: other",
                });
            }
            if eager {
                let now_ms = compacted.clock().log_time_ms;
                compact(&mut compacted, now_ms);
            }
            // Compacted to the current horizon, the states are the same.
            let horizon = config.compaction_horizon_ms(compacted.clock().log_time_ms);
            let mut a = plain.clone();
            a.compact(horizon);
            let mut b = compacted.clone();
            b.compact(horizon);
            prop_assert!(a == b, "states differ at position {}", e.position);
        }
        Ok(())
    });
    coverage.into_inner().assert_has(&[
        "compacted a dedup record",
        "compacted a hold",
        "resend of a compacted record: refused",
    ]);
}

#[test]
fn a_claim_key_never_has_two_owners_across_partitions() {
    // Proves uniqueness does not rest on clients routing right: claims and releases of a few keys by a few owners, each published on any of 4 partitions, leave every key claimed on at most one partition, its own; a request on another partition is refused wrong_partition naming that one.
    use amends_core::command::{ClaimKey, Namespace, Owner};
    use amends_core::partition::{Config, Machine};
    use amends_core::route::{self, Partitions};

    let partitions = Partitions::new(4).expect("4 partitions");
    let key_of = |k: u8| format!("k{k}");
    let owner_of =
        |k: u8| route::partition_of(&route::claim_routing_key("user", &key_of(k)), partitions);
    // Every partition owns some of the keys, so both paths are taken.
    let homes: BTreeSet<u32> = (0..8u8).map(|k| owner_of(k).get()).collect();
    assert!(homes.len() > 1, "the keys span partitions: {homes:?}");
    let op = (0..8u8, 0..3u8, 0..4u32, any::<bool>());
    run(prop::collection::vec(op, 1..=60), |ops| {
        let config = Config::default();
        let machines: Vec<Machine> = partitions
            .ids()
            .map(|p| Machine::new(p, partitions, config))
            .collect();
        let mut states = vec![MemState::new(); machines.len()];
        let t0 = 1_700_000_000_000_u64;
        for (n, (k, o, on, release)) in ops.into_iter().enumerate() {
            let n = u64::try_from(n).expect("few ops");
            let namespace = Namespace::new("user").expect("valid namespace");
            let key = ClaimKey::new(key_of(k)).expect("valid key");
            let owner = Owner::new(format!("o{o}")).expect("valid owner");
            let command = if release {
                Command::Release {
                    namespace,
                    key,
                    owner,
                }
            } else {
                Command::Claim {
                    namespace,
                    key,
                    owner,
                }
            };
            let on = usize::try_from(on).expect("a partition index");
            let request = Request {
                op_id: OpId::v7_from_parts(t0 + n, u128::from(n)),
                command,
                apology_topic: None,
            };
            let mut effects = Vec::new();
            let answer = machines[on]
                .apply(
                    &mut states[on],
                    n + 1,
                    t0 + n,
                    &Input::Request(request),
                    &mut effects,
                )
                .map_err(|f| TestCaseError::fail(f.to_string()))?;
            let Answer::Decided(d) = &answer else {
                return Err(TestCaseError::fail(format!("decided, got {answer:?}")));
            };
            let home = owner_of(k);
            if machines[on].partition() != home {
                prop_assert_eq!(
                    d.outcome.reason(),
                    Some(&Reason::WrongPartition {
                        partition: home.get()
                    })
                );
            } else {
                prop_assert!(
                    !matches!(d.outcome.reason(), Some(Reason::WrongPartition { .. })),
                    "refused on its own partition: {:?}",
                    d
                );
            }
            // Every claimed key is claimed on its own partition only.
            for (p, state) in states.iter().enumerate() {
                for (routing_key, _) in state.claims() {
                    let right = route::partition_of(routing_key, partitions);
                    prop_assert_eq!(
                        right,
                        machines[p].partition(),
                        "{:?} claimed on partition {}",
                        routing_key,
                        p
                    );
                }
            }
        }
        Ok(())
    });
}

#[test]
fn sagas_match_their_reference() {
    // Proves generated sagas (a desk released and compensated by a claim, debits that fit or not, seat claims, a step on another partition that keeps the saga in flight until a tick passes its deadline; resubmitted with new reply subjects) end as the naive reference says: confirmed with every step done, or refused at the first refused step or out of time with nothing left behind, compensations included; the final decision goes to the last client answered in flight; the invariants hold after every message and every op has one answer.
    run(sagas::specs(), |specs| sagas::check(&specs));
}
