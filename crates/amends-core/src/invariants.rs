//! The invariants of DESIGN.md, written once.
//!
//! What must hold of a deployment's partitions whatever was delivered,
//! duplicated, reordered or crashed: money is conserved (every balance is
//! what the confirmed operations moved), no claim has two owners (every
//! account and claim lives on the partition its key routes to), every
//! operation has one answer, every saga ends, and nothing stays held or
//! reserved without something that will end it. The model tests, the saga
//! simulation and `amends audit` all check these functions, over
//! [`MemState`]s (the tests' states, or the audit's replay of the log).
//!
//! They are part of the public API, not a test helper behind a feature:
//! the verifier of DESIGN.md ("Trust, but verify") is a library beside the
//! core, and these are its checks. Like the rest of the crate they are
//! pure: they read the states and return [`Findings`].
//!
//! What they deliberately do not do: compare states or decisions with a
//! reference (the tests' models and the audit's comparison with the
//! decisions stream do that), or know what a workload should have done
//! (a simulation's expected balances are its own).

use std::collections::{BTreeMap, HashMap};

use crate::command::{Command, Phase};
use crate::decision::Decision;
use crate::id::OpId;
use crate::partition::saga;
use crate::route::{self, PartitionId, Partitions};
use crate::state::{ExpiryKey, HoldStatus, MemState, SagaState};

/// One partition as the checks see it.
#[derive(Clone, Debug)]
pub struct View<'a> {
    partition: PartitionId,
    state: &'a MemState,
    /// The command of each operation the partition decided from its own log
    /// (the first body of its op id). Only plain credits and debits are
    /// read from it, for the money ledger; anything else is skipped.
    commands: Vec<(OpId, &'a Command)>,
}

impl<'a> View<'a> {
    /// Partition `partition` with state `state` and the commands it decided
    /// (`commands`: op id and command of each operation it decided from its
    /// own log; sagas and saga messages may be among them).
    pub fn new(
        partition: PartitionId,
        state: &'a MemState,
        commands: impl IntoIterator<Item = (&'a OpId, &'a Command)>,
    ) -> View<'a> {
        View {
            partition,
            state,
            commands: commands.into_iter().map(|(id, c)| (*id, c)).collect(),
        }
    }
}

/// Which checks apply: what the caller knows about its states.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Scope {
    /// Every message was applied and every effect delivered (a simulation
    /// at quiescence, past every deadline): no saga may be in flight, and
    /// nothing a saga reserved may be left. Otherwise a saga may be in
    /// flight, and a reservation of a saga that ended whose confirm or
    /// cancel is not applied yet is a warning (it may be on its way).
    pub settled: bool,
    /// The states were never compacted, so the money ledger can be read
    /// from them: a compacted state has forgotten the dedup records and
    /// the resolved holds that say what moved money.
    pub ledger: bool,
}

/// What the checks found: failures break an invariant; warnings are what
/// may still be on its way (see [`Scope::settled`]).
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct Findings {
    /// The broken invariants, one sentence each.
    pub failures: Vec<String>,
    /// What is not wrong yet, one sentence each.
    pub warnings: Vec<String>,
}

impl Findings {
    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Adds the findings of `other`.
    pub fn extend(&mut self, other: Findings) {
        self.failures.extend(other.failures);
        self.warnings.extend(other.warnings);
    }

    fn fail(&mut self, text: String) {
        self.failures.push(text);
    }

    fn warn(&mut self, text: String) {
        self.warnings.push(text);
    }
}

/// Where a saga's step lives: the saga, the step's index and partition.
struct StepOf {
    saga: OpId,
    saga_partition: PartitionId,
    index: u32,
    partition: PartitionId,
}

/// The partitions checked, by partition.
struct World<'v, 'a> {
    partitions: Partitions,
    views: BTreeMap<PartitionId, &'v View<'a>>,
    /// Every saga step's try id (to find the saga behind a tentative claim
    /// or a saga hold).
    steps: HashMap<OpId, StepOf>,
    /// Whether every partition is checked: only then is a reservation
    /// whose saga is not found the step of no saga (rather than of a saga
    /// on a partition not checked).
    whole: bool,
}

impl World<'_, '_> {
    fn state(&self, p: PartitionId) -> Option<&MemState> {
        self.views.get(&p).map(|v| v.state)
    }

    /// Whether phase `phase` of step `index` of `saga` was decided on
    /// `p` (and, when `confirmed`, confirmed).
    fn step_decided(&self, p: PartitionId, saga: OpId, index: u32, phase: Phase) -> Option<bool> {
        let d = self.state(p)?.dedup(saga::step_id(saga, index, phase))?;
        Some(d.decision.outcome.is_confirmed())
    }
}

/// Checks the states of `views`: some or all partitions of `partitions`
/// (a saga's reservations on a partition not among them, and a step of a
/// saga kept on one, are taken on trust).
pub fn check(partitions: Partitions, views: &[View<'_>], scope: Scope) -> Findings {
    let views_by: BTreeMap<PartitionId, &View<'_>> =
        views.iter().map(|v| (v.partition, v)).collect();
    let whole = partitions.ids().all(|p| views_by.contains_key(&p));
    let mut world = World {
        partitions,
        views: views_by,
        steps: HashMap::new(),
        whole,
    };
    for v in views {
        for (saga_id, s) in v.state.sagas() {
            for (index, step) in (0u32..).zip(saga::steps(&s.command).iter()) {
                let Some(key) = step.command.routing_key() else {
                    continue;
                };
                world.steps.insert(
                    saga::step_id(*saga_id, index, Phase::Try),
                    StepOf {
                        saga: *saga_id,
                        saga_partition: v.partition,
                        index,
                        partition: route::partition_of(&key, partitions),
                    },
                );
            }
        }
    }
    let mut findings = Findings::default();
    for v in views {
        check_partition(&world, v, scope, &mut findings);
    }
    if scope.ledger {
        check_money(&world, views, &mut findings);
    }
    findings
}

/// The invariants of one partition's own state.
fn check_partition(world: &World<'_, '_>, v: &View<'_>, scope: Scope, findings: &mut Findings) {
    let p = v.partition;
    let state = v.state;
    let now = state.clock().log_time_ms;
    let routes_here = |key: &str| route::partition_of(key, world.partitions) == p;

    // What the expiry index must hold: the pending holds with an expiry and
    // the deadlines of the sagas in flight.
    let mut expiring: Vec<ExpiryKey> = Vec::new();
    let mut held: HashMap<&str, i128> = HashMap::new();
    for (hold_id, h) in state.holds() {
        if h.status != HoldStatus::Pending {
            continue;
        }
        *held.entry(h.account.as_str()).or_default() += i128::from(h.amount);
        match (h.expires_at_ms, world.steps.get(hold_id)) {
            // A hold due at `at` is expired by the first message applied
            // at log time `at` or later, before that message decides
            // anything; so only a hold that message made itself (with a
            // timeout of 0) can be pending at `at == now`.
            (Some(at), _) if at < now => findings.fail(format!(
                "partition {p}: hold {hold_id} on {} is pending past its expiry {at} (log time {now})",
                h.account
            )),
            (Some(at), _) => expiring.push(ExpiryKey {
                at_ms: at,
                id: *hold_id,
            }),
            (None, Some(step)) => {
                saga_reservation(world, step, "hold", &hold_id.to_string(), scope, findings);
            }
            // A client's own hold (a v7 id) may wait for its post or void
            // for ever; a hold with a derived id that is the step of no
            // saga (on any partition: all must be checked to know) could
            // never end.
            (None, None) if world.whole && hold_id.v7_unix_ms().is_none() => findings.fail(format!(
                "partition {p}: hold {hold_id} on {} has no expiry and no saga to end it",
                h.account
            )),
            (None, None) => {}
        }
    }
    for (id, a) in state.accounts() {
        let name = format!("partition {p}: account {id}");
        if !routes_here(id.as_str()) {
            findings.fail(format!("{name} is not in the partition its id routes to"));
        }
        if a.held < 0 {
            findings.fail(format!("{name}: held {} < 0", a.held));
        }
        if a.incoming < 0 {
            findings.fail(format!("{name}: incoming {} < 0", a.incoming));
        }
        if scope.settled && a.incoming != 0 {
            findings.fail(format!(
                "{name}: incoming {} reserved with no saga in flight",
                a.incoming
            ));
        }
        let pending = held.remove(id.as_str()).unwrap_or(0);
        if i128::from(a.held) != pending {
            findings.fail(format!(
                "{name}: held {} but its pending holds add up to {pending}",
                a.held
            ));
        }
        if i128::from(a.balance) - i128::from(a.held) < i128::from(a.floor) {
            findings.fail(format!(
                "{name}: balance {} - held {} is below the floor {}",
                a.balance, a.held, a.floor
            ));
        }
        if let Some(ceiling) = a.ceiling
            && i128::from(a.balance) + i128::from(a.incoming) > i128::from(ceiling)
        {
            findings.fail(format!(
                "{name}: balance {} + incoming {} is above the ceiling {ceiling}",
                a.balance, a.incoming
            ));
        }
    }
    let mut orphans: Vec<_> = held.into_iter().collect();
    orphans.sort_unstable();
    for (account, amount) in orphans {
        findings.fail(format!(
            "partition {p}: pending holds of {amount} on {account}, an account it does not have"
        ));
    }
    for (key, c) in state.claims() {
        let shown = key.replace('\u{1f}', "/");
        if !routes_here(key) {
            findings.fail(format!(
                "partition {p}: claim {shown} is not in the partition its key routes to (owned twice?)"
            ));
        }
        if let Some(try_id) = c.tentative {
            match world.steps.get(&try_id) {
                Some(step) => saga_reservation(world, step, "claim", &shown, scope, findings),
                None if world.whole => findings.fail(format!(
                    "partition {p}: claim {shown} is tentative for {try_id}, the step of no saga"
                )),
                None => {}
            }
        }
    }
    for (saga_id, s) in state.sagas() {
        let SagaState::Trying { step } = s.state else {
            continue;
        };
        if scope.settled {
            findings.fail(format!(
                "partition {p}: saga {saga_id} never ended (it tries step {step})"
            ));
        } else if s.deadline_ms < now {
            findings.fail(format!(
                "partition {p}: saga {saga_id} still tries step {step} after its deadline {} (log time {now})",
                s.deadline_ms
            ));
        }
        expiring.push(ExpiryKey {
            at_ms: s.deadline_ms,
            id: *saga_id,
        });
    }
    expiring.sort_unstable();
    let mut index: Vec<ExpiryKey> = state.expiries().copied().collect();
    index.sort_unstable();
    if index != expiring {
        findings.fail(format!(
            "partition {p}: the expiry index {index:?} is not the pending holds with an expiry and the deadlines of the sagas in flight {expiring:?}"
        ));
    }
}

/// A saga's reservation (a tentative claim or a saga hold) still stands:
/// fine while the saga is in flight; a failure if the step's confirm or
/// cancel was applied and left it, or if everything was delivered
/// ([`Scope::settled`]); else a warning (that message may be on its way).
fn saga_reservation(
    world: &World<'_, '_>,
    step: &StepOf,
    what: &str,
    name: &str,
    scope: Scope,
    findings: &mut Findings,
) {
    let Some(saga) = world
        .state(step.saga_partition)
        .and_then(|s| s.saga(step.saga))
    else {
        return;
    };
    if matches!(saga.state, SagaState::Trying { .. }) {
        return;
    }
    let applied = [Phase::Confirm, Phase::Cancel].into_iter().any(|phase| {
        world
            .step_decided(step.partition, step.saga, step.index, phase)
            .is_some()
    });
    let text = format!(
        "{what} {name}: reserved by step {} of saga {}, which has ended",
        step.index, step.saga
    );
    if applied {
        findings.fail(format!("{text}, and the step's confirm or cancel left it"));
    } else if scope.settled {
        findings.fail(format!("{text}, and everything was delivered"));
    } else {
        findings.warn(format!("{text}; its confirm or cancel is not applied yet"));
    }
}

/// Money: every balance is what the confirmed operations moved (plain
/// credits and debits, posted holds, saga credits confirmed, compensations
/// run), and the sums agree.
fn check_money(world: &World<'_, '_>, views: &[View<'_>], findings: &mut Findings) {
    let mut ledger: BTreeMap<(PartitionId, String), i128> = BTreeMap::new();
    // What saga steps moved outside of holds: a credit step's confirm, and
    // a compensation that ran (the step's cancel, confirmed, with no
    // confirm of it).
    for v in views {
        for (saga_id, s) in v.state.sagas() {
            for (index, step) in (0u32..).zip(saga::steps(&s.command).iter()) {
                let Some(q) = step
                    .command
                    .routing_key()
                    .map(|k| route::partition_of(&k, world.partitions))
                else {
                    continue;
                };
                let decided = |phase| world.step_decided(q, *saga_id, index, phase);
                if decided(Phase::Try) != Some(true) {
                    continue;
                }
                if let Command::Credit { account, amount } = &*step.command
                    && decided(Phase::Confirm) == Some(true)
                {
                    *ledger.entry((q, account.to_string())).or_default() +=
                        i128::from(amount.get());
                }
                if let Some(comp) = &step.compensation
                    && decided(Phase::Cancel) == Some(true)
                    && decided(Phase::Confirm).is_none()
                {
                    add_plain(&mut ledger, q, comp);
                }
            }
        }
    }
    for v in views {
        // Money moved by plain commands this partition decided.
        for (op_id, command) in &v.commands {
            if v.state
                .dedup(*op_id)
                .is_some_and(|d| d.decision.outcome.is_confirmed())
            {
                add_plain(&mut ledger, v.partition, command);
            }
        }
        for (_, h) in v.state.holds() {
            if let HoldStatus::Posted { amount, .. } = h.status {
                *ledger
                    .entry((v.partition, h.account.to_string()))
                    .or_default() -= i128::from(amount);
            }
        }
    }
    let mut balances: BTreeMap<(PartitionId, String), i128> = BTreeMap::new();
    for v in views {
        for (id, a) in v.state.accounts() {
            balances.insert((v.partition, id.to_string()), i128::from(a.balance));
        }
    }
    for (key, moved) in &ledger {
        let balance = balances.get(key).copied().unwrap_or(0);
        if balance != *moved {
            findings.fail(format!(
                "account {}: balance {balance}, but confirmed credits - debits - posted holds = {moved}",
                key.1
            ));
        }
    }
    for (key, balance) in &balances {
        if !ledger.contains_key(key) && *balance != 0 {
            findings.fail(format!(
                "account {}: balance {balance} that no confirmed operation moved",
                key.1
            ));
        }
    }
    let total_balance: i128 = balances.values().sum();
    let total_moved: i128 = ledger.values().sum();
    if total_balance != total_moved {
        findings.fail(format!(
            "money not conserved: balances add up to {total_balance}, confirmed credits - debits - posted holds to {total_moved}"
        ));
    }
}

/// Adds what a confirmed plain `credit` or `debit` moved (a `post` is
/// counted through its hold record).
fn add_plain(
    ledger: &mut BTreeMap<(PartitionId, String), i128>,
    partition: PartitionId,
    command: &Command,
) {
    let (account, moved) = match command {
        Command::Credit { account, amount } => (account, i128::from(amount.get())),
        Command::Debit { account, amount } => (account, -i128::from(amount.get())),
        _ => return,
    };
    *ledger.entry((partition, account.to_string())).or_default() += moved;
}

/// One answer per operation: of `decisions` (every decision a run made or
/// published, copies included), all those of one op id on one partition
/// are the same decision, and none is a saga's in-flight answer (which is
/// never published).
pub fn one_answer_per_op<'d>(decisions: impl IntoIterator<Item = &'d Decision>) -> Findings {
    let mut first: HashMap<(u32, OpId), &Decision> = HashMap::new();
    let mut findings = Findings::default();
    for d in decisions {
        if !d.outcome.is_final() {
            findings.fail(format!(
                "op {}: an in-flight answer was decided as final: {d:?}",
                d.op_id
            ));
        }
        match first.get(&(d.partition, d.op_id)) {
            None => {
                first.insert((d.partition, d.op_id), d);
            }
            Some(was) if *was == d => {}
            Some(was) => findings.fail(format!(
                "op {}: two answers on partition {}: {was:?}, then {d:?}",
                d.op_id, d.partition
            )),
        }
    }
    findings
}
