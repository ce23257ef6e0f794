//! Data-driven cases: a few setup steps, one operation, and the JSON of the
//! outcome it must get. One case per reason code, in precedence order; cases
//! where two reasons apply and the earlier wins; confirmations; what a
//! refusal of the op id (outside the window, or not v7) leaves behind
//! (nothing); what a request on the wrong partition leaves behind (nothing
//! but its refusal).
//!
//! The cases run on the only partition of a one-partition deployment
//! ([`single`]), which owns every routing key, unless they are about
//! routing or sagas across partitions (then on a partition of 8).

use amends_core::command::{
    AccountId, Amount, ClaimKey, Command, DeadlineMs, Namespace, Owner, Phase, Request, SagaStep,
    Topic,
};
use amends_core::decision::{Decision, Reason};
use amends_core::id::OpId;
use amends_core::partition::{Answer, Effect, Input, Machine};
use amends_core::route::{self, PartitionId, Partitions};
use amends_core::saga;
use amends_core::state::{MemState, Write};
use amends_core::wire;
use serde_json::{Value, json};

use crate::log::{I64_MAX_U, T0_MS, config, machine};

/// One step of a case.
enum Step {
    /// Log time moves to `T0_MS` plus this many milliseconds.
    At(u64),
    /// A request.
    Req(Request),
    /// Raw message bytes.
    Raw(String),
    /// A request ([`Step::Req`] or [`Step::Raw`]) published with an
    /// `Amends-Reply-To` subject.
    Replied(Box<Step>, String),
}

/// The op id numbered `n`: a v7 id at `T0_MS`.
fn id(n: u128) -> OpId {
    OpId::v7_from_parts(T0_MS, n)
}

/// The op id numbered `n` with its timestamp at `T0_MS` plus `ms`.
fn id_at(ms: u64, n: u128) -> OpId {
    OpId::v7_from_parts(T0_MS + ms, n)
}

/// A request under an explicit op id.
fn req_id(op_id: OpId, command: Command) -> Step {
    Step::Req(Request {
        op_id,
        command,
        apology_topic: None,
    })
}

/// A UUID v4 op id (never a valid client op id).
fn v4(n: u128) -> OpId {
    OpId::from_uuid(uuid::Uuid::from_u128(
        0x0000_0000_0000_4000_8000_0000_0000_0000 | n,
    ))
}

/// The raw body of a credit of zero (malformed) under `op_id`.
fn zero_credit(op_id: OpId) -> Step {
    Step::Raw(format!(
        r#"{{"op_id":"{op_id}","command":{{"type":"credit","account":"a","amount":0}}}}"#
    ))
}

fn req(n: u128, command: Command) -> Step {
    Step::Req(Request {
        op_id: id(n),
        command,
        apology_topic: None,
    })
}

fn at(ms: u64) -> Step {
    Step::At(ms)
}

fn acct(a: &str) -> AccountId {
    AccountId::new(a).expect("valid account")
}

fn amt(v: u64) -> Amount {
    Amount::new(v).expect("positive amount")
}

fn open(a: &str) -> Command {
    open_with(a, 0, None)
}

fn open_with(a: &str, floor: i64, ceiling: Option<i64>) -> Command {
    Command::OpenAccount {
        account: acct(a),
        floor,
        ceiling,
    }
}

fn credit(a: &str, v: u64) -> Command {
    Command::Credit {
        account: acct(a),
        amount: amt(v),
    }
}

fn debit(a: &str, v: u64) -> Command {
    Command::Debit {
        account: acct(a),
        amount: amt(v),
    }
}

fn hold(a: &str, v: u64, timeout_ms: Option<u64>) -> Command {
    Command::Hold {
        account: acct(a),
        amount: amt(v),
        timeout_ms,
    }
}

fn post(a: &str, hold: u128, v: Option<u64>) -> Command {
    Command::Post {
        account: acct(a),
        hold: id(hold),
        amount: v.map(amt),
    }
}

fn void(a: &str, hold: u128) -> Command {
    Command::Void {
        account: acct(a),
        hold: id(hold),
    }
}

fn claim(key: &str, owner: &str) -> Command {
    Command::Claim {
        namespace: Namespace::new("user").expect("valid namespace"),
        key: ClaimKey::new(key).expect("valid key"),
        owner: Owner::new(owner).expect("valid owner"),
    }
}

fn release(key: &str, owner: &str) -> Command {
    let Command::Claim {
        namespace,
        key,
        owner,
    } = claim(key, owner)
    else {
        unreachable!("claim builds a claim")
    };
    Command::Release {
        namespace,
        key,
        owner,
    }
}

/// The only partition of a one-partition deployment: every saga step is
/// local, so a saga is decided within the message that starts it.
fn single() -> Machine {
    let partitions = Partitions::new(1).expect("1 partition");
    Machine::new(
        partitions.id(0).expect("partition 0 of 1"),
        partitions,
        config(),
    )
}

/// An account on another partition than [`machine`]'s, so a saga's step on
/// it is sent through the outbox and the saga stays in flight.
/// The machine of the partition (of 8) that keeps saga `id(n)`: a saga is
/// decided only on the partition of its op id.
fn home_of(n: u128) -> Machine {
    let partitions = Partitions::new(8).expect("8 partitions");
    let home = route::partition_of(&route::saga_routing_key(&id(n).0), partitions);
    Machine::new(home, partitions, config())
}

fn remote_account() -> String {
    elsewhere_than(home_of(1).partition(), "r")
}

/// The first of `<prefix>0`, `<prefix>1` ... that a partition other than
/// `partition` (of 8) owns, as an account id or a claim key (namespace
/// `user`).
fn elsewhere_than(partition: PartitionId, prefix: &str) -> String {
    let partitions = Partitions::new(8).expect("8 partitions");
    let routed = |name: &str| {
        let account = route::partition_of(name, partitions);
        let key = route::partition_of(&route::claim_routing_key("user", name), partitions);
        account != partition && key != partition
    };
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| routed(name))
        .expect("some name is elsewhere")
}

/// The partition (of 8) that owns account `name`.
fn owner_of_account(name: &str) -> u32 {
    route::partition_of(name, Partitions::new(8).expect("8 partitions")).get()
}

/// The partition (of 8) that owns claim key `name` of namespace `user`.
fn owner_of_key(name: &str) -> u32 {
    let key = route::claim_routing_key("user", name);
    route::partition_of(&key, Partitions::new(8).expect("8 partitions")).get()
}

/// `step` published with reply subject `to`.
fn replied(step: Step, to: &str) -> Step {
    Step::Replied(Box::new(step), to.to_owned())
}

/// The first of `<prefix>0`, `<prefix>1` ... that `partition` (of 8) owns
/// as an account id.
fn account_on(partition: PartitionId, prefix: &str) -> String {
    let partitions = Partitions::new(8).expect("8 partitions");
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| route::partition_of(name, partitions) == partition)
        .expect("some account is there")
}

fn transfer(from: &str, to: &str, v: u64, deadline_ms: Option<u64>) -> Command {
    Command::Transfer {
        from: acct(from),
        to: acct(to),
        amount: amt(v),
        deadline_ms: deadline_ms.map(|d| DeadlineMs::new(d).expect("valid deadline")),
    }
}

/// Phase `phase` of step `index` of saga `saga` (the op id numbered
/// `saga`), under its derived op id, as the saga's partition sends it.
fn step_msg(saga: u128, index: u32, phase: Phase, command: Command) -> Step {
    let step = SagaStep::new(command, None).expect("a valid step");
    Step::Req(saga::step_request(id(saga), index, phase, step))
}

/// A partition fed step by step at increasing positions.
struct Partition {
    machine: Machine,
    state: MemState,
    position: u64,
    log_time_ms: u64,
}

impl Partition {
    fn new() -> Partition {
        Partition::of(single())
    }

    fn of(machine: Machine) -> Partition {
        Partition {
            machine,
            state: MemState::new(),
            position: 0,
            log_time_ms: T0_MS,
        }
    }

    /// Applies a step; returns its answer and effects (`None` for `At`).
    fn step(&mut self, step: Step) -> Option<(Answer, Vec<Effect>)> {
        let (step, reply_to) = match step {
            Step::Replied(inner, to) => (*inner, Some(to)),
            other => (other, None),
        };
        let input = match step {
            Step::At(ms) => {
                self.log_time_ms = T0_MS + ms;
                return None;
            }
            Step::Req(r) => Input::Request(r),
            Step::Raw(text) => {
                wire::decode_request(text.as_bytes()).expect("case has a readable op id")
            }
            Step::Replied(..) => panic!("a reply subject is given once"),
        };
        self.position += 1;
        let mut effects = Vec::new();
        let answer = self
            .machine
            .apply_with_reply(
                &mut self.state,
                self.position,
                self.log_time_ms,
                &input,
                reply_to.as_deref(),
                &mut effects,
            )
            .expect("positions advance");
        Some((answer, effects))
    }
}

/// Runs `setup` (every request of which must be confirmed), then `op`, and
/// compares the JSON of `op`'s outcome with `expected`. Also checks where the
/// decision goes: a conflict or a refusal of the op id to the sender only
/// (nothing recorded or pushed), any other decision recorded and pushed.
#[track_caller]
fn check(setup: Vec<Step>, op: Step, expected: Value) {
    check_on(single(), setup, op, expected);
}

/// The final decision a message published for a saga (a saga ended by it).
fn published(effects: &[Effect]) -> Option<&Decision> {
    effects.iter().rev().find_map(|e| match e {
        Effect::Decided(d) => Some(d),
        _ => None,
    })
}

/// [`check`] on `machine`. For a saga the outcome compared is the one the
/// op leads to: the final decision it publishes (a saga it starts, or a
/// tick past a deadline, or a step outcome), else its own (a step message's
/// internal decision). Setup steps may start sagas (in flight) or be step
/// messages, whose decisions must not be refusals.
#[track_caller]
fn check_on(machine: Machine, setup: Vec<Step>, op: Step, expected: Value) {
    let mut p = Partition::of(machine);
    for s in setup {
        if let Some((answer, _)) = p.step(s) {
            let confirmed = match &answer {
                Answer::Decided(d) | Answer::Internal(d) => d.outcome.is_confirmed(),
                Answer::Accepted(_) => true,
                _ => false,
            };
            assert!(confirmed, "setup step not confirmed: {answer:?}");
        }
    }
    let records = p.state.dedups().count();
    let (answer, effects) = p.step(op).expect("the op is a message");
    let decision = match &answer {
        Answer::Accepted(_) | Answer::Ticked => {
            published(&effects).expect("the op ends a saga").clone()
        }
        Answer::Internal(d) => published(&effects).unwrap_or(d).clone(),
        other => other.decision().expect("the op gets a decision").clone(),
    };
    let got = serde_json::to_value(&decision.outcome).expect("outcomes are JSON");
    assert_eq!(got, expected, "answer: {answer:?}");
    match (&answer, expected["reason"]["code"].as_str()) {
        (Answer::Conflict(_), Some("op_id_conflict"))
        | (Answer::Refused(_), Some("op_id_outside_window")) => {
            assert!(effects.is_empty(), "pushed {effects:?}");
            assert_eq!(p.state.dedups().count(), records, "recorded {answer:?}");
        }
        // An op id that is not v7 cannot be deduplicated: refused to the
        // sender only, like an op id outside the window.
        (Answer::Refused(d), Some("malformed")) if d.op_id.v7_unix_ms().is_none() => {
            assert!(effects.is_empty(), "pushed {effects:?}");
            assert_eq!(p.state.dedups().count(), records, "recorded {answer:?}");
        }
        (Answer::Decided(d), _) => {
            assert_eq!(effects.last(), Some(&Effect::Decided(d.clone())));
            assert_eq!(p.state.dedup(d.op_id).map(|r| r.decision).as_ref(), Some(d));
        }
        // A saga's final decision is recorded under the saga's op id; a
        // step message's own decision is recorded but never published.
        (Answer::Accepted(_) | Answer::Ticked | Answer::Internal(_), _) => {
            let record = p.state.dedup(decision.op_id).map(|r| r.decision);
            assert_eq!(record.as_ref(), Some(&decision));
            if let Answer::Internal(d) = &answer {
                assert!(
                    !effects
                        .iter()
                        .any(|e| matches!(e, Effect::Decided(x) if x.op_id == d.op_id)),
                    "published an internal decision: {effects:?}"
                );
            }
        }
        _ => panic!("wrong answer: {answer:?}"),
    }
}

fn rejected(reason: Value) -> Value {
    json!({ "outcome": "rejected", "reason": reason })
}

fn confirmed(balance: i64, available: i64) -> Value {
    json!({ "outcome": "confirmed", "balance": balance, "available": available })
}

/// One case per reason code, in precedence order: the machine, the setup,
/// the op and its outcome.
fn reason_cases() -> Vec<(Machine, Vec<Step>, Step, Value)> {
    let v4 = OpId::from_uuid(uuid::Uuid::from_u128(
        0x1234_5678_9abc_4def_8123_4567_89ab_cdef,
    ));
    let remote = remote_account();
    let foreign = elsewhere_than(machine().partition(), "f");
    let routing = vec![
        (
            single(),
            vec![],
            replied(req(1, open("a")), &"a".repeat(257)),
            rejected(json!({ "code": "reply_subject_invalid", "bytes_max": 256 })),
        ),
        (
            machine(),
            vec![],
            req(1, open(&foreign)),
            rejected(json!({ "code": "wrong_partition", "partition": owner_of_account(&foreign) })),
        ),
    ];
    let first = vec![
        (
            vec![req(1, open("a"))],
            req(1, open("b")),
            rejected(json!({ "code": "op_id_conflict" })),
        ),
        (
            vec![at(20_000)],
            req(1, open("a")),
            rejected(json!({
                "code": "op_id_outside_window",
                "op_time_ms": T0_MS,
                "earliest_ms": T0_MS + 10_000,
                "latest_ms": T0_MS + 21_000,
            })),
        ),
        (
            vec![],
            Step::Req(Request {
                op_id: v4,
                command: open("a"),
                apology_topic: None,
            }),
            rejected(json!({
                "code": "malformed",
                "detail": "op_id must be a UUID version 7 (see specs/protocol.md)",
            })),
        ),
    ];
    let plain = vec![
        (
            vec![],
            req(1, credit("a", 5)),
            rejected(json!({ "code": "unknown_account" })),
        ),
        (
            vec![req(1, open("a"))],
            req(2, open("a")),
            rejected(json!({ "code": "account_exists" })),
        ),
        (
            vec![],
            req(1, open_with("a", 0, Some(-1))),
            rejected(json!({ "code": "invalid_limits", "floor": 0, "ceiling": -1 })),
        ),
        (
            vec![req(1, open("a"))],
            req(2, void("a", 9)),
            rejected(json!({ "code": "hold_not_found" })),
        ),
        (
            vec![
                req(1, open("a")),
                req(2, credit("a", 10)),
                req(3, hold("a", 10, None)),
                req(4, post("a", 3, None)),
            ],
            req(5, void("a", 3)),
            rejected(json!({ "code": "hold_already_posted" })),
        ),
        (
            vec![
                req(1, open("a")),
                req(2, credit("a", 10)),
                req(3, hold("a", 10, None)),
                req(4, void("a", 3)),
            ],
            req(5, post("a", 3, None)),
            rejected(json!({ "code": "hold_already_voided" })),
        ),
        (
            vec![
                req(1, open("a")),
                req(2, credit("a", 10)),
                req(3, hold("a", 10, Some(100))),
                at(100),
            ],
            req(4, post("a", 3, None)),
            rejected(json!({ "code": "hold_expired" })),
        ),
        (
            vec![
                req(1, open("a")),
                req(2, credit("a", 10)),
                req(3, hold("a", 10, None)),
            ],
            req(4, post("a", 3, Some(11))),
            rejected(json!({ "code": "post_exceeds_hold", "held": 10, "requested": 11 })),
        ),
        (
            vec![req(1, open("a")), req(2, credit("a", I64_MAX_U))],
            req(3, credit("a", 1)),
            rejected(json!({ "code": "overflow" })),
        ),
        (
            vec![
                req(1, open_with("a", -5, None)),
                req(2, credit("a", 10)),
                req(3, hold("a", 4, None)),
            ],
            req(4, debit("a", 12)),
            rejected(json!({
                "code": "insufficient_funds",
                "available": 6,
                "floor": -5,
                "requested": 12,
            })),
        ),
        (
            vec![
                req(1, open_with("a", 0, Some(100))),
                req(2, credit("a", 60)),
            ],
            req(3, credit("a", 41)),
            rejected(json!({
                "code": "ceiling_exceeded",
                "balance": 60,
                "ceiling": 100,
                "requested": 41,
            })),
        ),
        (
            vec![req(1, claim("ann", "o1"))],
            req(2, claim("ann", "o2")),
            rejected(json!({ "code": "already_claimed", "owner": "o1" })),
        ),
        (
            vec![],
            req(1, release("ann", "o1")),
            rejected(json!({ "code": "not_claimed" })),
        ),
        (
            vec![req(1, claim("ann", "o1"))],
            req(2, release("ann", "o2")),
            rejected(json!({ "code": "not_owner", "owner": "o1" })),
        ),
    ];
    let sagas = vec![
        // A saga's try claims ann for o1 tentatively: o1 must wait.
        (
            single(),
            vec![step_msg(1, 0, Phase::Try, claim("ann", "o1"))],
            req(2, claim("ann", "o1")),
            rejected(json!({ "code": "claim_pending" })),
        ),
        // One partition: the debit's try is refused within the message
        // that starts the transfer, which then ends rejected.
        (
            single(),
            vec![req(1, open("a")), req(2, open("b"))],
            req(3, transfer("a", "b", 5, None)),
            rejected(json!({
                "code": "step_refused",
                "step": 0,
                "reason": {
                    "code": "insufficient_funds",
                    "available": 0,
                    "floor": 0,
                    "requested": 5,
                },
            })),
        ),
        // The debit's try went to another partition and no outcome came
        // back: the first message at the deadline (a tick) cancels it.
        (
            home_of(1),
            vec![req(1, transfer(&remote, "b", 5, Some(100))), at(100)],
            req(2, Command::Tick {}),
            rejected(json!({ "code": "deadline_exceeded", "deadline_ms": T0_MS + 100 })),
        ),
        // The cancel of step 0 arrived before its try.
        (
            single(),
            vec![
                req(2, open("a")),
                req(3, credit("a", 10)),
                step_msg(1, 0, Phase::Cancel, debit("a", 5)),
            ],
            step_msg(1, 0, Phase::Try, debit("a", 5)),
            rejected(json!({ "code": "saga_cancelled" })),
        ),
    ];
    let on_single = |cases: Vec<(Vec<Step>, Step, Value)>| {
        cases
            .into_iter()
            .map(|(setup, op, want)| (single(), setup, op, want))
            .collect::<Vec<_>>()
    };
    on_single(first)
        .into_iter()
        .chain(routing)
        .chain(on_single(plain))
        .chain(sagas)
        .collect()
}

#[test]
fn one_case_per_reason_in_precedence_order() {
    // Proves each reason code is produced with its documented JSON and answer kind (sagas' by the decision their message leads to), by one small case per code listed in Reason::CODES order.
    let cases = reason_cases();
    let codes: Vec<&str> = cases
        .iter()
        .map(|(_, _, _, want)| want["reason"]["code"].as_str().expect("a code"))
        .collect();
    assert_eq!(codes, Reason::CODES, "the cases follow Reason::CODES");
    for (machine, setup, op, want) in cases {
        check_on(machine, setup, op, want);
    }
}

#[test]
fn earlier_reason_wins() {
    // Proves precedence: when two reasons apply, the one listed first in Reason::CODES is returned, case by case.
    let code = |c: &str| rejected(json!({ "code": c }));
    let funded = || {
        vec![
            req(1, open("a")),
            req(2, credit("a", 10)),
            req(3, hold("a", 10, Some(100))),
        ]
    };
    let too_old = || {
        rejected(json!({
            "code": "op_id_outside_window",
            "op_time_ms": T0_MS,
            "earliest_ms": T0_MS + 1,
            "latest_ms": T0_MS + 11_001,
        }))
    };
    // op_id_conflict before op_id_outside_window: dedup comes first, while
    // the record is kept (here the op id is too old by 1 ms).
    check(
        vec![req(1, open("a")), at(10_001)],
        req(1, open("b")),
        code("op_id_conflict"),
    );
    // Until the record is past the compaction horizon (log time − retention
    // − skew = T0 + 1 here): then it counts as gone, stored or not, and the
    // op id is refused as too old.
    check(
        vec![req(1, open("a")), at(11_001)],
        req(1, open("b")),
        rejected(json!({
            "code": "op_id_outside_window",
            "op_time_ms": T0_MS,
            "earliest_ms": T0_MS + 1_001,
            "latest_ms": T0_MS + 12_001,
        })),
    );
    // hold_already_voided while the hold is kept; hold_not_found once it
    // was resolved before the horizon (T0 at 11_000, T0 + 1 at 11_001).
    let voided = || {
        let mut s = funded();
        s.push(req(4, void("a", 3)));
        s
    };
    let mut kept = voided();
    kept.push(at(11_000));
    check(
        kept,
        req_id(id_at(11_000, 5), void("a", 3)),
        code("hold_already_voided"),
    );
    let mut gone = voided();
    gone.push(at(11_001));
    check(
        gone,
        req_id(id_at(11_001, 5), post("a", 3, None)),
        code("hold_not_found"),
    );
    // op_id_conflict before malformed: a bad body under a decided op id.
    check(
        vec![req(1, open("a"))],
        zero_credit(id(1)),
        code("op_id_conflict"),
    );
    // op_id_outside_window before malformed: a bad body, too old or too new.
    check(vec![at(10_001)], zero_credit(id(1)), too_old());
    check(
        vec![],
        zero_credit(id_at(1_001, 1)),
        rejected(json!({
            "code": "op_id_outside_window",
            "op_time_ms": T0_MS + 1_001,
            "earliest_ms": T0_MS - 10_000,
            "latest_ms": T0_MS + 1_000,
        })),
    );
    // op_id_outside_window before unknown_account.
    check(vec![at(10_001)], req(1, credit("nobody", 1)), too_old());
    // malformed (not v7) before unknown_account.
    check(
        vec![],
        req_id(v4(1), credit("nobody", 1)),
        rejected(json!({ "code": "malformed", "detail": crate::reference::NOT_V7_DETAIL })),
    );
    // A bad body under a non-v7 op id: the op id is checked before the
    // body, so malformed with the op id's detail (not the parser's), and
    // refused to the sender only.
    check(
        vec![],
        zero_credit(v4(1)),
        rejected(json!({ "code": "malformed", "detail": crate::reference::NOT_V7_DETAIL })),
    );
    // unknown_account before overflow.
    check(
        vec![],
        req(1, credit("nobody", u64::MAX)),
        code("unknown_account"),
    );
    // unknown_account before hold_not_found, for post and void.
    check(
        funded(),
        req(4, post("nobody", 3, None)),
        code("unknown_account"),
    );
    check(funded(), req(4, void("nobody", 3)), code("unknown_account"));
    // account_exists before invalid_limits.
    check(
        vec![req(1, open("a"))],
        req(2, open_with("a", 1, None)),
        code("account_exists"),
    );
    // hold_not_found (the hold is on another account) before post_exceeds_hold.
    let mut two = funded();
    two.push(req(4, open("b")));
    check(
        two,
        req(5, post("b", 3, Some(u64::MAX))),
        code("hold_not_found"),
    );
    // hold_expired before post_exceeds_hold.
    let mut late = funded();
    late.push(at(150));
    check(late, req(4, post("a", 3, Some(11))), code("hold_expired"));
    // post_exceeds_hold before overflow: an amount no balance can take.
    check(
        funded(),
        req(4, post("a", 3, Some(u64::MAX))),
        rejected(json!({ "code": "post_exceeds_hold", "held": 10, "requested": u64::MAX })),
    );
    // overflow before insufficient_funds: amounts above i64::MAX, and a
    // debit that would go below i64::MIN on an account without a real floor.
    check(
        vec![req(1, open("a"))],
        req(2, debit("a", I64_MAX_U + 1)),
        code("overflow"),
    );
    check(
        vec![req(1, open("a"))],
        req(2, hold("a", u64::MAX, None)),
        code("overflow"),
    );
    check(
        vec![
            req(1, open_with("a", i64::MIN, None)),
            req(2, debit("a", I64_MAX_U)),
        ],
        req(3, debit("a", 2)),
        code("overflow"),
    );
    // overflow of a hold's expiry before insufficient_funds.
    check(
        vec![req(1, open("a"))],
        req(2, hold("a", 1, Some(u64::MAX))),
        code("overflow"),
    );
    // overflow before ceiling_exceeded.
    check(
        vec![req(1, open_with("a", 0, Some(10)))],
        req(2, credit("a", I64_MAX_U + 1)),
        code("overflow"),
    );
    // The envelope, between the op id and body checks and the command's.
    let invalid_reply = || rejected(json!({ "code": "reply_subject_invalid", "bytes_max": 256 }));
    let foreign = elsewhere_than(machine().partition(), "f");
    let here = account_on(machine().partition(), "h");
    let wrong = |name: &str| {
        rejected(json!({ "code": "wrong_partition", "partition": owner_of_account(name) }))
    };
    // op_id_conflict and op_id_outside_window before reply_subject_invalid.
    check(
        vec![req(1, open("a"))],
        replied(req(1, open("b")), "a.*"),
        code("op_id_conflict"),
    );
    check(vec![at(10_001)], replied(req(1, open("a")), ""), too_old());
    // malformed before reply_subject_invalid: a bad body has no trusted
    // envelope either.
    let Value::Object(malformed) =
        check_outcome(single(), vec![], replied(zero_credit(id(1)), ">"))
    else {
        panic!("an outcome object")
    };
    assert_eq!(malformed["reason"]["code"], "malformed", "{malformed:?}");
    // reply_subject_invalid before wrong_partition.
    check_on(
        machine(),
        vec![],
        replied(req(1, open(&foreign)), &"x".repeat(5_000)),
        invalid_reply(),
    );
    // op_id_conflict before wrong_partition: an op id decided here, reused
    // for a body that belongs elsewhere.
    check_on(
        machine(),
        vec![req(1, open(&here))],
        req(1, open(&foreign)),
        code("op_id_conflict"),
    );
    // wrong_partition before every command check: the account is not open
    // here, the amounts overflow, the claim is nobody's here.
    for command in [
        credit(&foreign, u64::MAX),
        debit(&foreign, 1),
        hold(&foreign, 1, Some(u64::MAX)),
        post(&foreign, 3, None),
        void(&foreign, 3),
    ] {
        check_on(machine(), vec![], req(1, command), wrong(&foreign));
    }
    let key_wrong =
        rejected(json!({ "code": "wrong_partition", "partition": owner_of_key(&foreign) }));
    check_on(
        machine(),
        vec![],
        req(1, release(&foreign, "o1")),
        key_wrong,
    );
}

/// The outcome `op` gets on `machine` after `setup`, as JSON (for cases
/// whose reason has a free-text detail).
fn check_outcome(machine: Machine, setup: Vec<Step>, op: Step) -> Value {
    let mut p = Partition::of(machine);
    for s in setup {
        p.step(s);
    }
    let (answer, _) = p.step(op).expect("the op is a message");
    let d = answer.decision().expect("the op gets a decision");
    serde_json::to_value(&d.outcome).expect("outcomes are JSON")
}

#[test]
fn confirmations_show_balance_and_available() {
    // Proves confirmed balance commands report the balance and available after the operation, and claims report nothing more, by one case per command.
    let base = || {
        vec![
            req(1, open_with("a", -50, Some(1000))),
            req(2, credit("a", 100)),
        ]
    };
    check(vec![], req(1, open("a")), confirmed(0, 0));
    check(
        vec![req(1, open("a"))],
        req(2, credit("a", 100)),
        confirmed(100, 100),
    );
    check(base(), req(3, debit("a", 150)), confirmed(-50, -50));
    check(
        base(),
        req(3, hold("a", 30, Some(5_000))),
        confirmed(100, 70),
    );
    let held = || {
        let mut s = base();
        s.push(req(3, hold("a", 30, None)));
        s
    };
    check(held(), req(4, post("a", 3, Some(20))), confirmed(80, 80));
    check(held(), req(4, post("a", 3, None)), confirmed(70, 70));
    check(held(), req(4, void("a", 3)), confirmed(100, 100));
    check(held(), req(4, debit("a", 120)), confirmed(-20, -50));
    check(
        vec![],
        req(1, claim("ann", "o1")),
        json!({ "outcome": "confirmed" }),
    );
    // Claiming what you own is confirmed again.
    check(
        vec![req(1, claim("ann", "o1"))],
        req(2, claim("ann", "o1")),
        json!({ "outcome": "confirmed" }),
    );
    check(
        vec![req(1, claim("ann", "o1"))],
        req(2, release("ann", "o1")),
        json!({ "outcome": "confirmed" }),
    );
}

#[test]
fn malformed_bodies_are_refused() {
    // Proves a body that fails to parse, with a readable op id, is refused as malformed with the parser's detail, and resending it is a duplicate.
    let op = id(1);
    let body =
        format!(r#"{{"op_id":"{op}","command":{{"type":"credit","account":"a","amount":0}}}}"#);
    let mut p = Partition::new();
    let (answer, _) = p.step(Step::Raw(body.clone())).expect("a message");
    let Answer::Decided(first) = answer else {
        panic!("decided, got {answer:?}")
    };
    let got = serde_json::to_value(&first.outcome).expect("JSON");
    assert_eq!(got["reason"]["code"], "malformed");
    assert!(
        got["reason"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("amount must be at least 1")),
        "detail: {got}"
    );
    let (again, _) = p.step(Step::Raw(body)).expect("a message");
    assert_eq!(again, Answer::Duplicate(first));
    // The same op id with a parsed body is another body: a conflict.
    let (conflict, _) = p.step(req(1, open("a"))).expect("a message");
    let Answer::Conflict(d) = conflict else {
        panic!("conflict, got {conflict:?}")
    };
    assert_eq!(d.outcome.reason(), Some(&Reason::OpIdConflict));
}

#[test]
fn expiry_and_apology_effects() {
    // Proves the outbox of one message: hold expiries first, in (time, id) order, then the apology of a refused optimistic request, then its decision.
    let mut p = Partition::new();
    for s in [
        req(1, open("a")),
        req(2, credit("a", 10)),
        req(4, hold("a", 3, Some(50))),
        req(3, hold("a", 2, Some(50))),
    ] {
        p.step(s);
    }
    p.step(req(5, hold("a", 4, Some(20))));
    p.step(at(60));
    let refused = Request {
        op_id: id(6),
        command: debit("a", 11),
        apology_topic: Some(Topic::new("orders.refund").expect("valid topic")),
    };
    let (answer, effects) = p.step(Step::Req(refused)).expect("a message");
    let json: Vec<Value> = effects
        .iter()
        .map(|e| match e {
            Effect::HoldExpired(x) => json!({
                "expired": x.hold,
                "amount": x.amount,
                "at": x.log_time_ms - T0_MS,
                "position": x.position,
            }),
            Effect::Apology(a) => json!({
                "apology": a.topic.as_str(),
                "code": a.decision.outcome.reason().map(Reason::code),
            }),
            Effect::Decided(d) => json!({ "decided": d.op_id, "position": d.position }),
            other => panic!("no saga in this case: {other:?}"),
        })
        .collect();
    let expected = vec![
        json!({ "expired": id(5), "amount": 4, "at": 60, "position": 6 }),
        json!({ "expired": id(3), "amount": 2, "at": 60, "position": 6 }),
        json!({ "expired": id(4), "amount": 3, "at": 60, "position": 6 }),
        json!({ "apology": "orders.refund", "code": "insufficient_funds" }),
        json!({ "decided": id(6), "position": 6 }),
    ];
    assert_eq!(json, expected);
    let decision = answer.decision().expect("decided");
    assert_eq!(
        serde_json::to_value(&decision.outcome).expect("JSON"),
        rejected(
            json!({ "code": "insufficient_funds", "available": 10, "floor": 0, "requested": 11 })
        )
    );
}

#[test]
fn refusals_of_the_op_id_are_for_the_sender_only() {
    // Proves a refusal of the op id (outside the window, or not v7) records and pushes nothing (no decision, no apology), for a request with an apology topic and for a malformed body alike, so the op id is judged afresh each time: a too-new one is decided once log time catches up, a non-v7 one is refused every time, and a resend whose record is past the compaction horizon is refused outside the window, before and after compaction, rather than decided twice.
    let outside = |p: &mut Partition, s: Step| {
        let before = p.state.clone();
        let (answer, effects) = p.step(s).expect("a message");
        let Answer::Refused(d) = &answer else {
            panic!("refused, got {answer:?}")
        };
        assert_eq!(d.position, p.position, "answered at its own position");
        assert!(effects.is_empty(), "pushed {effects:?}");
        // A record past the horizon may still be stored, untouched.
        let record = |s: &MemState| s.dedup(d.op_id).map(|r| r.decision);
        assert_eq!(record(&p.state), record(&before), "recorded {answer:?}");
        assert_eq!(p.state.dedups().count(), before.dedups().count());
    };
    let mut p = Partition::new();
    p.step(req(1, open("a")));

    // Too new by 1 ms, optimistic, and it would be refused: no apology.
    let optimistic = Request {
        op_id: id_at(1_001, 2),
        command: debit("a", 5),
        apology_topic: Some(Topic::new("orders.refund").expect("valid topic")),
    };
    let early = || Step::Req(optimistic.clone());
    outside(&mut p, early());
    // Not recorded, so the same message again is no duplicate.
    outside(&mut p, early());
    // Once log time is within the skew of its timestamp it is decided, for
    // the first time, with its apology; then it is a duplicate.
    p.step(at(1));
    let (answer, effects) = p.step(early()).expect("a message");
    let Answer::Decided(first) = answer else {
        panic!("decided, got {answer:?}")
    };
    assert!(matches!(
        first.outcome.reason(),
        Some(Reason::InsufficientFunds { .. })
    ));
    assert!(matches!(&effects[..], [Effect::Apology(_), Effect::Decided(d)] if *d == first));
    let (again, effects) = p.step(early()).expect("a message");
    assert_eq!(again, Answer::Duplicate(first));
    assert!(effects.is_empty());

    // The same for a malformed body: the window comes first.
    outside(&mut p, zero_credit(id_at(1_002, 3)));
    p.step(at(2));
    let (answer, _) = p.step(zero_credit(id_at(1_002, 3))).expect("a message");
    let Answer::Decided(bad) = answer else {
        panic!("decided, got {answer:?}")
    };
    assert!(matches!(
        bad.outcome.reason(),
        Some(Reason::Malformed { .. })
    ));
    let (again, _) = p.step(zero_credit(id_at(1_002, 3))).expect("a message");
    assert_eq!(again, Answer::Duplicate(bad));

    // Not v7: refused as malformed every time, whatever the body, with no
    // apology, and never a duplicate.
    let not_v7 = || {
        Step::Req(Request {
            op_id: v4(7),
            ..optimistic.clone()
        })
    };
    outside(&mut p, not_v7());
    outside(&mut p, not_v7());
    outside(&mut p, zero_credit(v4(7)));

    // Too old: a new op id is refused; a decided one is still a duplicate
    // while its record is kept, and refused once the record is past the
    // compaction horizon, whether compaction has removed it yet or not.
    p.step(at(10_001));
    outside(&mut p, req(4, credit("a", 1)));
    let (answer, _) = p.step(req(1, open("a"))).expect("a message");
    assert!(matches!(answer, Answer::Duplicate(_)), "got {answer:?}");
    p.step(at(20_000));
    assert!(p.state.dedup(id(1)).is_some(), "nothing compacted yet");
    outside(&mut p, req(1, open("a")));
    outside(&mut p, zero_credit(id_at(1_002, 3)));
    let horizon = single().config().compaction_horizon_ms(T0_MS + 20_000);
    p.state.compact(horizon);
    assert_eq!(
        p.state.dedups().count(),
        0,
        "every record is past the horizon"
    );
    outside(&mut p, req(1, open("a")));
    outside(&mut p, zero_credit(id_at(1_002, 3)));
}

#[test]
fn a_saga_on_another_partition_than_its_op_ids_is_refused() {
    // Proves a saga published to the wrong partition is refused at once, wrong_partition naming the partition of its op id, instead of waiting out its deadline for outcomes that would go elsewhere; the refusal is recorded and published and no step is sent.
    let mut p = Partition::of(machine());
    let home = route::partition_of(
        &route::saga_routing_key(&id(1).0),
        Partitions::new(8).expect("8"),
    );
    assert_ne!(
        home,
        machine().partition(),
        "the case needs a saga that belongs elsewhere"
    );
    let (answer, effects) = p
        .step(req(1, transfer("a", "b", 5, None)))
        .expect("a message");
    let Answer::Decided(d) = answer else {
        panic!("decided, got {answer:?}")
    };
    assert_eq!(
        d.outcome.reason(),
        Some(&Reason::WrongPartition {
            partition: home.get()
        })
    );
    assert_eq!(
        effects,
        vec![Effect::Decided(d.clone())],
        "only its decision"
    );
    assert_eq!(p.state.dedup(id(1)).map(|r| r.decision), Some(d));
    assert!(p.state.saga(id(1)).is_none(), "no saga was started");
}

#[test]
fn a_request_on_the_wrong_partition_has_no_effect() {
    // Proves every command with a routing key, published on a partition that does not own the key, is refused wrong_partition naming the owner, changes nothing but the clock and its own dedup record (with an apology when it names a topic), is a duplicate when resent, and is confirmed on its own partition.
    let foreign = elsewhere_than(machine().partition(), "f");
    let partitions = Partitions::new(8).expect("8 partitions");
    let key_owner = owner_of_key(&foreign);
    let account_owner = owner_of_account(&foreign);
    let commands = [
        (open(&foreign), account_owner),
        (credit(&foreign, 5), account_owner),
        (debit(&foreign, 5), account_owner),
        (hold(&foreign, 5, None), account_owner),
        (post(&foreign, 1, None), account_owner),
        (void(&foreign, 1), account_owner),
        (claim(&foreign, "o1"), key_owner),
        (release(&foreign, "o1"), key_owner),
    ];
    let mut p = Partition::of(machine());
    let mut n = 10;
    for (command, owner) in commands {
        n += 1;
        for topic in [None, Some(Topic::new("misrouted").expect("valid topic"))] {
            n += 1;
            let request = Request {
                op_id: id(n),
                command: command.clone(),
                apology_topic: topic.clone(),
            };
            let before = p.state.clone();
            let (answer, effects) = p.step(Step::Req(request.clone())).expect("a message");
            let Answer::Decided(d) = &answer else {
                panic!("decided, got {answer:?}")
            };
            assert_eq!(
                d.outcome.reason(),
                Some(&Reason::WrongPartition { partition: owner }),
                "{command:?}"
            );
            let mut expected = Vec::new();
            if let Some(topic) = topic {
                expected.push(Effect::Apology(amends_core::partition::Apology {
                    topic,
                    command: command.clone(),
                    decision: d.clone(),
                }));
            }
            expected.push(Effect::Decided(d.clone()));
            assert_eq!(effects, expected);
            // Nothing changed but the clock and this op id's record.
            let record = p.state.dedup(id(n)).expect("the refusal is recorded");
            assert_eq!(&record.decision, d);
            let mut expected_state = before;
            expected_state.put_dedup(id(n), record);
            expected_state.set_clock(p.state.clock());
            assert_eq!(p.state, expected_state, "{command:?} changed the state");
            let (again, effects) = p.step(Step::Req(request)).expect("a message");
            assert_eq!(again, Answer::Duplicate(d.clone()));
            assert!(effects.is_empty());
        }
    }
    // On the partition that owns them, the same names are served.
    let owner = partitions.id(account_owner).expect("a partition of 8");
    let mut right = Partition::of(Machine::new(owner, partitions, config()));
    let (answer, _) = right.step(req(1, open(&foreign))).expect("a message");
    assert!(
        matches!(&answer, Answer::Decided(d) if d.outcome.is_confirmed()),
        "{answer:?}"
    );
    let owner = partitions.id(key_owner).expect("a partition of 8");
    let mut right = Partition::of(Machine::new(owner, partitions, config()));
    let (answer, _) = right
        .step(req(1, claim(&foreign, "o1")))
        .expect("a message");
    assert!(
        matches!(&answer, Answer::Decided(d) if d.outcome.is_confirmed()),
        "{answer:?}"
    );
}

#[test]
fn forged_saga_messages_on_the_wrong_partition_are_refused() {
    // Proves a step for an account, or a step outcome for a saga, that another partition owns is refused wrong_partition to its sender only: nothing is recorded, nothing sent, no step is tried.
    let foreign = elsewhere_than(machine().partition(), "f");
    let home = home_of(7).partition();
    assert_ne!(
        home,
        machine().partition(),
        "the case needs a saga that lives elsewhere"
    );
    let outcome = saga::outcome_request(id(7), 0, amends_core::decision::Outcome::confirmed());
    for (message, owner) in [
        (
            step_msg(7, 0, Phase::Try, credit(&foreign, 5)),
            owner_of_account(&foreign),
        ),
        (
            step_msg(7, 0, Phase::Cancel, claim(&foreign, "o1")),
            owner_of_key(&foreign),
        ),
        (Step::Req(outcome.clone()), home.get()),
    ] {
        let mut p = Partition::of(machine());
        let (answer, effects) = p.step(message).expect("a message");
        let Answer::Refused(d) = &answer else {
            panic!("refused, got {answer:?}")
        };
        assert_eq!(
            d.outcome.reason(),
            Some(&Reason::WrongPartition { partition: owner })
        );
        assert!(effects.is_empty(), "pushed {effects:?}");
        assert_eq!(p.state.dedups().count(), 0, "recorded {answer:?}");
    }
}
