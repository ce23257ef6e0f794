//! A deterministic simulation of sagas across many partitions.
//!
//! Every partition has a log, a committed state and an outbox. A seeded
//! scheduler interleaves, at random: applying the next message of some
//! partition (and sometimes crashing before the commit, so the message is
//! applied again from the committed state), relaying an outbox entry
//! (mostly in order, sometimes any entry; sometimes twice, and sometimes
//! "crashing" after the publish so the entry is relayed again later),
//! resubmitting a client's saga, and advancing log
//! time. Messages of different partitions interleave in every order. At
//! quiescence the test checks what must hold whatever happened: money is
//! conserved and every balance is exactly what the confirmed transfers say,
//! every saga ended, no hold, reservation or tentative claim is left, and
//! every saga got exactly one decision (all copies equal). The seed is
//! printed on failure; `AMENDS_SIM_SEEDS=N` runs more seeds.

use std::collections::{BTreeMap, VecDeque};

use amends_core::command::{Command, Request};
use amends_core::decision::{Decision, Outcome, Reason};
use amends_core::id::OpId;
use amends_core::partition::{Answer, Config, Effect, Input, Machine};
use amends_core::route::{self, PartitionId, Partitions};
use amends_core::state::{ChangeSet, HoldStatus, MemState, Overlay, SagaState};
use amends_core::wire;

/// Log time at the start of every run.
const T0_MS: u64 = 1_700_000_000_000;
const PARTITIONS: u32 = 4;
const ACCOUNTS: usize = 6;
const OPENING_BALANCE: i64 = 100;

/// A small deterministic RNG (SplitMix64): the simulation must not depend
/// on anything but its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).expect("fits")).expect("fits")
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

struct Partition {
    machine: Machine,
    state: MemState,
    /// Messages appended to the log and not applied yet (JSON bodies, so
    /// every message goes through the wire decoder as in production).
    log: VecDeque<Vec<u8>>,
    /// The position of the next message.
    next_position: u64,
    /// Committed effects not relayed yet, in order.
    outbox: VecDeque<Effect>,
}

/// What a client submitted: a transfer or a claim saga.
#[derive(Clone, Debug)]
enum Submitted {
    Transfer {
        from: usize,
        to: usize,
        amount: i64,
    },
    ClaimSaga {
        key: usize,
        owner: usize,
        account: usize,
        amount: i64,
    },
}

struct Sim {
    rng: Rng,
    partitions: Partitions,
    parts: Vec<Partition>,
    now_ms: u64,
    /// Every copy of every published decision, by op id.
    published: BTreeMap<OpId, Vec<Decision>>,
    /// The client requests, by op id, to resubmit them.
    requests: BTreeMap<OpId, (Request, Submitted)>,
    crashes: u64,
    duplicates: u64,
}

fn account(i: usize) -> String {
    format!("acct-{i}")
}

fn key(i: usize) -> String {
    format!("seat-{i}")
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let partitions = Partitions::new(PARTITIONS).expect("valid count");
        let config = Config::default();
        let parts = partitions
            .ids()
            .map(|id| Partition {
                machine: Machine::new(id, partitions, config),
                state: MemState::new(),
                log: VecDeque::new(),
                next_position: 1,
                outbox: VecDeque::new(),
            })
            .collect();
        Sim {
            rng: Rng(seed),
            partitions,
            parts,
            now_ms: T0_MS,
            published: BTreeMap::new(),
            requests: BTreeMap::new(),
            crashes: 0,
            duplicates: 0,
        }
    }

    fn new_op_id(&mut self) -> OpId {
        let rand = u128::from(self.rng.next()) << 64 | u128::from(self.rng.next());
        OpId::v7_from_parts(self.now_ms, rand)
    }

    fn partition_of(&self, req: &Request) -> PartitionId {
        let key = req.routing_key().expect("not a tick");
        route::partition_of(&key, self.partitions)
    }

    fn append(&mut self, p: PartitionId, req: &Request) {
        let idx = usize::try_from(p.get()).expect("fits");
        self.parts[idx].log.push_back(wire::encode(req));
    }

    fn submit(&mut self, command: serde_json::Value) -> Request {
        let op_id = self.new_op_id();
        let req: Request = serde_json::from_value(serde_json::json!({
            "op_id": op_id, "command": command
        }))
        .expect("a valid request");
        let p = self.partition_of(&req);
        self.append(p, &req);
        req
    }

    /// Applies the next message of partition `idx`; with some chance the
    /// worker crashes before its commit and the message stays in the log.
    fn deliver(&mut self, idx: usize) {
        let Some(body) = self.parts[idx].log.front().cloned() else {
            return;
        };
        // Log time advances a little with every append that is applied.
        self.now_ms += u64::try_from(self.rng.below(3)).expect("small");
        let crash = self.rng.chance(10);
        let part = &mut self.parts[idx];
        let input = wire::decode_request(&body).expect("the simulation writes readable messages");
        let mut changes = ChangeSet::default();
        let mut out = Vec::new();
        let answer = {
            let mut overlay = Overlay::new(&part.state, &mut changes);
            part.machine
                .apply(
                    &mut overlay,
                    part.next_position,
                    self.now_ms,
                    &input,
                    &mut out,
                )
                .expect("the log advances")
        };
        if crash {
            self.crashes += 1;
            return;
        }
        part.state.absorb(&mut changes);
        part.log.pop_front();
        part.next_position += 1;
        part.outbox.extend(out);
        if let (Input::Request(req), Answer::Decided(d)) = (&input, &answer) {
            // A plain operation's decision reaches its client directly.
            assert_eq!(req.op_id, d.op_id);
        }
    }

    /// Relays the first outbox entry of partition `idx`: sometimes twice,
    /// sometimes without removing it (a crash after the publish).
    fn relay(&mut self, idx: usize) {
        let len = self.parts[idx].outbox.len();
        if len == 0 {
            return;
        }
        // Mostly in order, as a worker publishes; sometimes any entry, so
        // messages from one partition to another also arrive out of order.
        let at = if self.rng.chance(30) {
            self.rng.below(len)
        } else {
            0
        };
        let effect = self.parts[idx].outbox[at].clone();
        let copies = if self.rng.chance(15) { 2 } else { 1 };
        for _ in 0..copies {
            match &effect {
                Effect::Send { partition, request } => self.append(*partition, request),
                Effect::Decided(d) | Effect::Reply { decision: d, .. } => {
                    self.published.entry(d.op_id).or_default().push(d.clone());
                }
                Effect::Apology(_) | Effect::HoldExpired(_) | Effect::DeadLetter(_) => {}
            }
        }
        if copies == 2 {
            self.duplicates += 1;
        }
        if !self.rng.chance(10) {
            self.parts[idx].outbox.remove(at);
        }
    }

    fn resubmit_some(&mut self) {
        if self.requests.is_empty() {
            return;
        }
        let i = self.rng.below(self.requests.len());
        let (req, _) = self.requests.values().nth(i).expect("in range").clone();
        let p = self.partition_of(&req);
        self.append(p, &req);
        self.duplicates += 1;
    }

    fn busy(&self) -> bool {
        self.parts
            .iter()
            .any(|p| !p.log.is_empty() || !p.outbox.is_empty())
    }

    /// Runs the scheduler until nothing is left to deliver or relay.
    fn drive(&mut self, budget: usize) {
        let n = self.parts.len();
        for _ in 0..budget {
            if !self.busy() {
                return;
            }
            let idx = self.rng.below(n);
            match self.rng.below(10) {
                0..=4 => self.deliver(idx),
                5..=8 => self.relay(idx),
                _ => {
                    if self.rng.chance(20) {
                        self.resubmit_some();
                    }
                }
            }
        }
        panic!("not quiescent after {budget} scheduler steps");
    }

    /// Ticks every partition at log time `at_ms`, as the service does.
    fn tick_all(&mut self, at_ms: u64) {
        self.now_ms = self.now_ms.max(at_ms);
        for p in self.partitions.ids() {
            let tick = Request {
                op_id: self.new_op_id(),
                command: Command::Tick {},
                apology_topic: None,
            };
            self.append(p, &tick);
        }
    }
}

fn run(seed: u64) {
    let mut sim = Sim::new(seed);
    // Accounts, funded, each on its own partition by its id.
    for i in 0..ACCOUNTS {
        sim.submit(serde_json::json!({"type": "open_account", "account": account(i)}));
        sim.submit(
            serde_json::json!({"type": "credit", "account": account(i), "amount": OPENING_BALANCE}),
        );
    }
    sim.drive(100_000);

    // Transfers among a few hot accounts (some too large to succeed, some
    // to a missing account) and claim sagas competing for a few seats.
    for _ in 0..60 {
        let submitted = if sim.rng.chance(70) {
            let from = sim.rng.below(ACCOUNTS);
            let to = sim.rng.below(ACCOUNTS + 1); // ACCOUNTS: no such account
            let amount = i64::try_from(sim.rng.below(60) + 1).expect("small");
            Submitted::Transfer { from, to, amount }
        } else {
            Submitted::ClaimSaga {
                key: sim.rng.below(3),
                owner: sim.rng.below(4),
                account: sim.rng.below(ACCOUNTS),
                amount: i64::try_from(sim.rng.below(30) + 1).expect("small"),
            }
        };
        let deadline = if sim.rng.chance(20) { 2 } else { 60_000 };
        let command = match &submitted {
            Submitted::Transfer { from, to, amount } => serde_json::json!({
                "type": "transfer", "from": account(*from), "to": account(*to),
                "amount": amount, "deadline_ms": deadline,
            }),
            Submitted::ClaimSaga {
                key: k,
                owner,
                account: a,
                amount,
            } => serde_json::json!({
                "type": "saga", "deadline_ms": deadline, "steps": [
                    {"command": {"type": "claim", "namespace": "seat", "key": key(*k), "owner": format!("o{owner}")}},
                    {"command": {"type": "debit", "account": account(*a), "amount": amount}},
                ],
            }),
        };
        let req = sim.submit(command);
        sim.requests.insert(req.op_id, (req, submitted));
        // Interleave submissions with some work.
        let steps = sim.rng.below(40);
        for _ in 0..steps {
            let idx = sim.rng.below(sim.parts.len());
            if sim.rng.chance(50) {
                sim.deliver(idx);
            } else {
                sim.relay(idx);
            }
        }
    }
    sim.drive(1_000_000);
    // Deadlines are in log time: tick past every deadline, then settle.
    let late = sim.now_ms + 120_000;
    sim.tick_all(late);
    sim.drive(1_000_000);

    check(&sim);
}

fn check(sim: &Sim) {
    // Every saga got exactly one decision, final, and equal in every copy.
    let mut expected = [OPENING_BALANCE; ACCOUNTS];
    let mut owners: BTreeMap<usize, usize> = BTreeMap::new();
    for (op_id, (_, submitted)) in &sim.requests {
        let copies = sim
            .published
            .get(op_id)
            .unwrap_or_else(|| panic!("saga {op_id} ({submitted:?}) got no decision"));
        let first = &copies[0];
        assert!(
            copies.iter().all(|d| d == first),
            "saga {op_id} got different decisions: {copies:?}"
        );
        assert!(first.outcome.is_final(), "saga {op_id}: {first:?}");
        if let Outcome::Rejected { reason } = &first.outcome {
            assert!(
                matches!(
                    reason,
                    Reason::StepRefused { .. } | Reason::DeadlineExceeded { .. }
                ),
                "saga {op_id}: unexpected refusal {reason:?}"
            );
        }
        if first.outcome.is_confirmed() {
            match submitted {
                Submitted::Transfer { from, to, amount } => {
                    expected[*from] -= amount;
                    expected[*to] += amount;
                }
                Submitted::ClaimSaga {
                    key: k,
                    owner,
                    account: a,
                    amount,
                } => {
                    expected[*a] -= amount;
                    let prior = owners.insert(*k, *owner);
                    assert!(
                        prior.is_none_or(|o| o == *owner),
                        "seat {k} confirmed for {prior:?} and {owner}"
                    );
                }
            }
        }
        // The saga's partition says the same.
        let p = usize::try_from(first.partition).expect("fits");
        let record = sim.parts[p]
            .state
            .sagas()
            .find(|(id, _)| *id == op_id)
            .map(|(_, s)| s.state);
        assert!(
            matches!(
                record,
                Some(SagaState::Confirmed { .. } | SagaState::Cancelled { .. })
            ),
            "saga {op_id} is {record:?}"
        );
    }
    // Money is conserved: transfers move it, and only confirmed claim
    // sagas take it out (they pay for their seat).
    let paid: i64 = sim
        .requests
        .iter()
        .filter(|(id, _)| sim.published[*id][0].outcome.is_confirmed())
        .map(|(_, (_, s))| match s {
            Submitted::ClaimSaga { amount, .. } => *amount,
            Submitted::Transfer { .. } => 0,
        })
        .sum();
    let opening = OPENING_BALANCE * i64::try_from(ACCOUNTS).expect("fits");

    let mut balances = BTreeMap::new();
    for part in &sim.parts {
        for (id, a) in part.state.accounts() {
            assert_eq!(a.held, 0, "{id}: holds left");
            assert_eq!(a.incoming, 0, "{id}: reserved credits left");
            assert!(a.balance >= a.floor, "{id} below its floor");
            balances.insert(id.as_str().to_owned(), a.balance);
        }
        for (id, h) in part.state.holds() {
            assert_ne!(h.status, HoldStatus::Pending, "hold {id} left pending");
        }
        for (k, c) in part.state.claims() {
            assert_eq!(c.tentative, None, "claim {k:?} left tentative");
        }
        for (id, s) in part.state.sagas() {
            assert!(s.ended_at_ms().is_some(), "saga {id} never ended");
        }
        assert_eq!(part.state.expiries().count(), 0, "deadlines left");
    }
    assert_eq!(
        balances.values().sum::<i64>(),
        opening - paid,
        "money is not conserved"
    );
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(
            balances.get(&account(i)),
            Some(want),
            "{}: the balance is not what the confirmed transfers say",
            account(i)
        );
    }
    // Every confirmed seat is owned by its saga's owner, for good.
    for (k, owner) in &owners {
        let rk = route::claim_routing_key("seat", &key(*k));
        let found = sim
            .parts
            .iter()
            .flat_map(|p| p.state.claims())
            .find(|(key, _)| **key == rk)
            .map(|(_, c)| c.owner.as_str().to_owned());
        assert_eq!(found, Some(format!("o{owner}")), "seat {k}");
    }
}

fn seeds() -> u64 {
    std::env::var("AMENDS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

#[test]
fn sagas_stay_correct_under_reordering_duplicates_and_crashes() {
    // Proves the saga invariants (money conserved and exact, every saga terminal with one decision, nothing left held or tentative) over many seeded interleavings with crashes before commit and duplicated messages.
    for seed in 0..seeds() {
        let result = std::panic::catch_unwind(|| run(seed));
        if let Err(e) = result {
            eprintln!("failed with seed {seed}");
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn the_simulation_injects_what_it_claims() {
    // Proves the scheduler really crashed workers, duplicated messages and ended sagas both ways, so the invariant test is not vacuous.
    let mut sim = Sim::new(7);
    for i in 0..ACCOUNTS {
        sim.submit(serde_json::json!({"type": "open_account", "account": account(i)}));
        sim.submit(
            serde_json::json!({"type": "credit", "account": account(i), "amount": OPENING_BALANCE}),
        );
    }
    sim.drive(100_000);
    let mut ids = Vec::new();
    for i in 0..30 {
        let amount = if i % 3 == 0 { 1_000 } else { 5 };
        let req = sim.submit(serde_json::json!({
            "type": "transfer", "from": account(i % ACCOUNTS), "to": account((i + 1) % ACCOUNTS),
            "amount": amount,
        }));
        ids.push(req.op_id);
        sim.requests.insert(
            req.op_id,
            (
                req,
                Submitted::Transfer {
                    from: i % ACCOUNTS,
                    to: (i + 1) % ACCOUNTS,
                    amount,
                },
            ),
        );
    }
    sim.drive(1_000_000);
    check(&sim);
    assert!(sim.crashes > 0, "no crash was injected");
    assert!(sim.duplicates > 0, "no duplicate was injected");
    let outcomes: Vec<bool> = ids
        .iter()
        .map(|id| sim.published[id][0].outcome.is_confirmed())
        .collect();
    assert!(outcomes.contains(&true) && outcomes.contains(&false));
    // Cross-partition transfers were among them.
    let cross = (0..ACCOUNTS).any(|i| {
        let a = route::partition_of(&account(i), sim.partitions);
        let b = route::partition_of(&account((i + 1) % ACCOUNTS), sim.partitions);
        a != b
    });
    assert!(
        cross,
        "every account is on one partition; the test proves less"
    );
}
