//! Generated sagas against a naive reference of what a saga does.
//!
//! One partition (0 of 2) runs generated sagas, each over resources of its
//! own (so their outcomes do not depend on each other): releasing a desk
//! claimed just before (compensated by claiming it again), a debit that
//! fits or one too large, a claim of a fresh seat, and sometimes a step on
//! the other partition, whose messages are never delivered, so the saga
//! stays in flight until a tick passes its deadline. Clients resubmit
//! sagas with new reply subjects. The reference is the rule, not the
//! protocol: a saga whose steps all succeed is confirmed and did them all;
//! one whose step is refused first is refused naming that step, one that
//! waits on the other partition first runs out of time, and either leaves
//! nothing behind (its compensations ran); its final decision goes to the
//! last client answered "in flight". The invariants are checked after every
//! message, and one answer per op at the end.

use std::collections::BTreeMap;

use amends_core::command::{Command, Request};
use amends_core::decision::{Decision, Outcome, Reason};
use amends_core::id::OpId;
use amends_core::invariants::{self, Scope, View};
use amends_core::partition::{Answer, Config, Effect, Input, Machine};
use amends_core::route::{self, PartitionId, Partitions};
use amends_core::state::MemState;
use amends_core::wire;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The log time of the first message.
const T0_MS: u64 = 1_700_000_000_000;
/// Past any saga's deadline (the default, 60 s).
const PAST_DEADLINES_MS: u64 = 61_000;
/// Every step's account opens with this much.
const FUNDS: u64 = 50;

/// One step of a generated saga.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Release a desk claimed just before; compensated by claiming it
    /// again.
    Release,
    /// Debit a funded account: 20, or (`refused`) 80 of its 50.
    Debit { refused: bool },
    /// Claim a fresh seat.
    Claim,
    /// A credit on the other partition: never answered.
    Remote,
}

/// One generated saga and what happens around it.
#[derive(Clone, Debug)]
pub struct Spec {
    steps: Vec<Kind>,
    /// How many times a client resubmits it, each with a new subject.
    resubmits: u8,
    /// A tick past every deadline follows it.
    expire: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    let kind = prop_oneof![
        3 => Just(Kind::Release),
        2 => Just(Kind::Debit { refused: false }),
        1 => Just(Kind::Debit { refused: true }),
        2 => Just(Kind::Claim),
        1 => Just(Kind::Remote),
    ];
    (
        prop::collection::vec(kind, 1..=4),
        0..3u8,
        prop::bool::weighted(0.3),
    )
        .prop_map(|(steps, resubmits, expire)| Spec {
            steps,
            resubmits,
            expire,
        })
}

/// What the reference says a saga ends as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ending {
    Confirmed,
    Refused { step: u32 },
    OutOfTime,
}

fn ending(steps: &[Kind]) -> Ending {
    for (i, k) in (0u32..).zip(steps) {
        match k {
            Kind::Debit { refused: true } => return Ending::Refused { step: i },
            Kind::Remote => return Ending::OutOfTime,
            _ => {}
        }
    }
    Ending::Confirmed
}

/// The one partition under test and its log, applied as it grows.
struct Run {
    machine: Machine,
    partitions: Partitions,
    here: PartitionId,
    state: MemState,
    position: u64,
    now_ms: u64,
    counter: u128,
    /// Plain operations decided, by op id (for the money ledger).
    commands: BTreeMap<OpId, Command>,
    /// Every `Decided` effect.
    decided: Vec<Decision>,
    /// Per saga: where its final decision went.
    replies: BTreeMap<OpId, Vec<String>>,
    /// Per saga: the subject of its last submission answered in flight.
    wanted: BTreeMap<OpId, String>,
    subjects: u64,
}

impl Run {
    fn new() -> Run {
        let partitions = Partitions::new(2).expect("2 partitions");
        let here = partitions.id(0).expect("partition 0");
        Run {
            machine: Machine::new(here, partitions, Config::default()),
            partitions,
            here,
            state: MemState::new(),
            position: 0,
            now_ms: T0_MS,
            counter: 0,
            commands: BTreeMap::new(),
            decided: Vec::new(),
            replies: BTreeMap::new(),
            wanted: BTreeMap::new(),
            subjects: 0,
        }
    }

    /// The `n`-th name `<prefix>-<i>` that routes here (or, `here` false,
    /// to the other partition), as an account or as a claim key of
    /// `namespace`.
    fn name(&self, prefix: &str, namespace: Option<&str>, here: bool) -> String {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|n| {
                let key = match namespace {
                    Some(ns) => route::claim_routing_key(ns, n),
                    None => n.clone(),
                };
                (route::partition_of(&key, self.partitions) == self.here) == here
            })
            .expect("names of both partitions exist")
    }

    fn op_id(&mut self, saga: bool) -> OpId {
        loop {
            self.counter += 1;
            let id = OpId::v7_from_parts(self.now_ms, self.counter);
            let key = route::saga_routing_key(&id.0);
            if !saga || route::partition_of(&key, self.partitions) == self.here {
                return id;
            }
        }
    }

    /// Appends `request` (with `reply_to`) and applies it; checks the
    /// invariants after it.
    fn apply(
        &mut self,
        request: &Request,
        reply_to: Option<String>,
    ) -> Result<Answer, TestCaseError> {
        self.position += 1;
        self.now_ms += 1;
        let bytes = wire::encode(request);
        let input = wire::decode_request(&bytes).expect("a readable request");
        let mut effects = Vec::new();
        let answer = self
            .machine
            .apply_with_reply(
                &mut self.state,
                self.position,
                self.now_ms,
                &input,
                reply_to.as_deref(),
                &mut effects,
            )
            .map_err(|f| TestCaseError::fail(f.to_string()))?;
        if let (Input::Request(req), Answer::Decided(_)) = (&input, &answer) {
            self.commands.insert(req.op_id, req.command.clone());
        }
        let in_flight = match &answer {
            Answer::Accepted(_) => true,
            Answer::Duplicate(d) => !d.outcome.is_final(),
            _ => false,
        };
        if let (true, Some(to)) = (in_flight, reply_to) {
            self.wanted.insert(request.op_id, to);
        }
        for e in effects {
            match e {
                Effect::Decided(d) => self.decided.push(d),
                Effect::Reply { to, decision } => {
                    self.replies.entry(decision.op_id).or_default().push(to);
                }
                Effect::Apology(_)
                | Effect::HoldExpired(_)
                | Effect::Send { .. }
                | Effect::DeadLetter(_) => {}
            }
        }
        let views = [View::new(self.here, &self.state, &self.commands)];
        let scope = Scope {
            settled: false,
            ledger: true,
        };
        let found = invariants::check(self.partitions, &views, scope);
        prop_assert!(
            found.passed(),
            "after position {}: {:#?}",
            self.position,
            found.failures
        );
        Ok(answer)
    }

    fn plain(&mut self, command: serde_json::Value) -> Result<(), TestCaseError> {
        let op_id = self.op_id(false);
        let request: Request =
            serde_json::from_value(serde_json::json!({"op_id": op_id, "command": command}))
                .expect("a valid request");
        let answer = self.apply(&request, None)?;
        prop_assert!(
            matches!(&answer, Answer::Decided(d) if d.outcome.is_confirmed()),
            "setup {:?}: {:?}",
            request,
            answer
        );
        Ok(())
    }

    fn subject(&mut self) -> String {
        self.subjects += 1;
        format!("_INBOX.model.{}", self.subjects)
    }

    fn tick(&mut self, later_ms: u64) -> Result<(), TestCaseError> {
        self.now_ms += later_ms;
        let tick = Request {
            op_id: self.op_id(false),
            command: Command::Tick {},
            apology_topic: None,
        };
        self.apply(&tick, None).map(drop)
    }
}

/// A saga's resources and the names its steps use.
struct Built {
    op_id: OpId,
    steps: Vec<Kind>,
    /// Per step: the desk, account or seat it names.
    names: Vec<String>,
}

fn start(run: &mut Run, n: usize, spec: &Spec) -> Result<Built, TestCaseError> {
    use serde_json::json;
    let mut names = Vec::new();
    let mut steps = Vec::new();
    for (i, kind) in spec.steps.iter().enumerate() {
        let tag = format!("s{n}.{i}");
        let step = match kind {
            Kind::Release => {
                let desk = run.name(&format!("desk.{tag}"), Some("desk"), true);
                let claim =
                    |t: &str| json!({"type": t, "namespace": "desk", "key": desk, "owner": "o"});
                run.plain(claim("claim"))?;
                let step = json!({"command": claim("release"), "compensation": claim("claim")});
                names.push(desk);
                step
            }
            Kind::Debit { refused } => {
                let account = run.name(&format!("acct.{tag}"), None, true);
                run.plain(json!({"type": "open_account", "account": account}))?;
                run.plain(json!({"type": "credit", "account": account, "amount": FUNDS}))?;
                let amount = if *refused { 80 } else { 20 };
                names.push(account.clone());
                json!({"command": {"type": "debit", "account": account, "amount": amount}})
            }
            Kind::Claim => {
                let seat = run.name(&format!("seat.{tag}"), Some("seat"), true);
                names.push(seat.clone());
                json!({"command": {"type": "claim", "namespace": "seat", "key": seat, "owner": "o"}})
            }
            Kind::Remote => {
                let account = run.name(&format!("far.{tag}"), None, false);
                names.push(account.clone());
                json!({"command": {"type": "credit", "account": account, "amount": 1}})
            }
        };
        steps.push(step);
    }
    let op_id = run.op_id(true);
    let saga: Request = serde_json::from_value(
        json!({"op_id": op_id, "command": {"type": "saga", "steps": steps}}),
    )
    .expect("a valid saga");
    let subject = run.subject();
    let answer = run.apply(&saga, Some(subject))?;
    prop_assert!(matches!(answer, Answer::Accepted(_)), "{:?}", answer);
    for _ in 0..spec.resubmits {
        let subject = run.subject();
        let answer = run.apply(&saga, Some(subject))?;
        prop_assert!(matches!(answer, Answer::Duplicate(_)), "{:?}", answer);
    }
    if spec.expire {
        run.tick(PAST_DEADLINES_MS)?;
    }
    Ok(Built {
        op_id,
        steps: spec.steps.clone(),
        names,
    })
}

/// Checks one ended saga against the reference.
fn check_saga(run: &Run, b: &Built) -> Result<(), TestCaseError> {
    let end = ending(&b.steps);
    let Some(d) = run.decided.iter().find(|d| d.op_id == b.op_id) else {
        return Err(TestCaseError::fail(format!(
            "saga {} got no decision",
            b.op_id
        )));
    };
    match (end, &d.outcome) {
        (Ending::Confirmed, Outcome::Confirmed { .. }) => {}
        (Ending::Refused { step }, Outcome::Rejected { reason }) => prop_assert_eq!(
            reason,
            &Reason::StepRefused {
                step,
                reason: Box::new(Reason::InsufficientFunds {
                    available: 50,
                    floor: 0,
                    requested: 80,
                }),
            }
        ),
        (
            Ending::OutOfTime,
            Outcome::Rejected {
                reason: Reason::DeadlineExceeded { .. },
            },
        ) => {}
        (want, got) => {
            return Err(TestCaseError::fail(format!(
                "saga {} of {:?}: {got:?}, the reference says {want:?}",
                b.op_id, b.steps
            )));
        }
    }
    let confirmed = end == Ending::Confirmed;
    let owner_of = |ns: &str, key: &str| {
        run.state
            .claims()
            .find(|(k, _)| **k == route::claim_routing_key(ns, key))
            .map(|(_, c)| c.owner.as_str().to_owned())
    };
    for (kind, name) in b.steps.iter().zip(&b.names) {
        match kind {
            // A desk given back stays given back only if the saga was
            // confirmed; a cancelled saga's compensation claimed it again.
            Kind::Release => prop_assert_eq!(
                owner_of("desk", name),
                (!confirmed).then(|| "o".to_owned()),
                "desk {} of saga {} ({:?})",
                name,
                b.op_id,
                b.steps
            ),
            Kind::Debit { .. } => {
                let a = run.state.account(name).expect("opened");
                let want = if confirmed { FUNDS - 20 } else { FUNDS };
                prop_assert_eq!(
                    (a.balance, a.held),
                    (i64::try_from(want).expect("small"), 0),
                    "account {} of saga {}",
                    name,
                    b.op_id
                );
            }
            Kind::Claim => prop_assert_eq!(
                owner_of("seat", name),
                confirmed.then(|| "o".to_owned()),
                "seat {} of saga {}",
                name,
                b.op_id
            ),
            Kind::Remote => {}
        }
    }
    let sent = run.replies.get(&b.op_id).cloned().unwrap_or_default();
    let wanted = run.wanted.get(&b.op_id).cloned();
    prop_assert!(
        !sent.is_empty() && sent.iter().all(|to| Some(to) == wanted.as_ref()),
        "saga {}: its final decision went to {:?}, not to {:?}, the subject of its last submission answered in flight",
        b.op_id,
        sent,
        wanted
    );
    Ok(())
}

/// Runs the sagas of `specs`, then a tick past every deadline, and checks
/// each against the reference.
pub fn check(specs: &[Spec]) -> Result<(), TestCaseError> {
    let mut run = Run::new();
    let mut built = Vec::new();
    for (n, spec) in specs.iter().enumerate() {
        built.push(start(&mut run, n, spec)?);
    }
    run.tick(PAST_DEADLINES_MS)?;
    for b in &built {
        check_saga(&run, b)?;
    }
    let found = invariants::one_answer_per_op(&run.decided);
    prop_assert!(found.passed(), "{:#?}", found.failures);
    Ok(())
}

/// The generated runs: up to 8 sagas.
pub fn specs() -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(spec(), 1..=8)
}
