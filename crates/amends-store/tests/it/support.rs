//! Shared test support: the engine under test ([`TestEngine`], sled's
//! [`Sled`]), a seeded RNG, a deterministic log generator (with sagas
//! started here, step outcomes coming back, and steps of other partitions'
//! sagas), a batch driver over any [`PartitionStore`], the in-memory
//! reference run and the invariants every state must keep.

use std::collections::VecDeque;
use std::path::Path;

use amends_core::command::{
    AccountId, Amount, ClaimKey, Command, DeadlineMs, Namespace, Owner, Phase, Request, SagaStep,
    Steps, Topic,
};
use amends_core::decision::{Outcome, Reason};
use amends_core::id::OpId;
use amends_core::invariants;
use amends_core::partition::{Config, Effect, Fault, LogMessage, Machine};
use amends_core::route::{self, PartitionId, Partitions};
use amends_core::saga;
use amends_core::state::{ChangeSet, MemState, Overlay, Read, SagaState, Write};
use amends_core::wire;
use amends_store::{
    Durability, Engine, Error, OUTBOX_CHUNK_LEN, Options, OutboxRange, Partition, PartitionStore,
    Store,
};

/// Log time of the first message.
pub const T0_MS: u64 = 1_700_000_000_000;

/// The partition count of every test store.
pub const PARTITIONS: u32 = 4;

/// The partition the tests write to (any would do).
pub const PARTITION: u32 = 2;

/// A short dedup window, so that compaction has work during a test.
pub fn config() -> Config {
    Config {
        dedup_retention_ms: 20_000,
        op_id_future_skew_ms: 5_000,
    }
}

pub fn partitions() -> Partitions {
    Partitions::new(PARTITIONS).expect("valid partition count")
}

pub fn partition_id() -> PartitionId {
    partitions().id(PARTITION).expect("partition in range")
}

/// A saga op id at `ms` that routes to the test's partition (the first
/// from `seed` on).
pub fn saga_id_here(ms: u64, seed: u128) -> OpId {
    (seed..)
        .map(|n| OpId::v7_from_parts(ms, n))
        .find(|id| {
            route::partition_of(&route::saga_routing_key(&id.0), partitions()) == partition_id()
        })
        .expect("some id routes here")
}

pub fn machine() -> Machine {
    Machine::new(partition_id(), partitions(), config())
}

/// Applies one log message to `state` as a driver does, through
/// `Machine::take`: an unreadable message becomes a dead letter in the
/// outbox; a message's reply subject goes with it.
pub fn apply_msg<S: Read + Write + ?Sized>(
    machine: &Machine,
    state: &mut S,
    m: &Msg,
    effects: &mut Vec<Effect>,
) -> Result<(), Fault<S::Error>> {
    let message = LogMessage {
        bytes: &m.bytes,
        position: m.position,
        log_time_ms: m.log_time_ms,
        reply_to: m.reply_to.as_deref(),
    };
    machine.take(state, &message, effects)?;
    Ok(())
}

/// A storage engine under test. The crash test and the property test are
/// written against [`Engine`] and [`PartitionStore`], and open their
/// stores through this: a second engine runs them by implementing it and
/// instantiating them for itself.
pub trait TestEngine {
    /// The engine's store.
    type Store: Engine;

    /// Opens (or creates) the store in `dir`, of [`PARTITIONS`] partitions.
    fn open(dir: &Path, durability: Durability) -> Self::Store;

    /// Checks what only this engine's layout shows, after a step of the
    /// property test: the outbox holds `confirmed..end` unconfirmed.
    fn check_layout(p: &Part<Self>, confirmed: u64, end: u64, context: &str) {
        let _ = (p, confirmed, end, context);
    }
}

/// The store of one partition of a [`TestEngine`].
pub type Part<E> = <<E as TestEngine>::Store as Engine>::Partition;

/// The sled engine: [`Store`] and [`Partition`].
pub struct Sled;

impl TestEngine for Sled {
    type Store = Store;

    fn open(dir: &Path, durability: Durability) -> Store {
        let options = Options {
            durability,
            ..Options::new(partitions())
        };
        Store::open(dir, options).expect("open store")
    }

    /// Only chunks holding an unconfirmed entry, or the last partial one,
    /// are kept.
    fn check_layout(p: &Partition, confirmed: u64, end: u64, context: &str) {
        let chunks = p
            .dump()
            .map(|kv| kv.expect("dump"))
            .filter(|(k, _)| k.first() == Some(&b'o'))
            .count();
        let first_kept = confirmed / OUTBOX_CHUNK_LEN;
        let want_chunks = end.div_ceil(OUTBOX_CHUNK_LEN).saturating_sub(first_kept);
        assert_eq!(
            u64::try_from(chunks).expect("fits"),
            want_chunks,
            "outbox chunks {context}"
        );
    }
}

/// Opens the test's partition of the store in `dir` on engine `E`.
pub fn open_on<E: TestEngine>(dir: &Path, durability: Durability) -> (E::Store, Part<E>) {
    let store = E::open(dir, durability);
    let p = store.partition(partition_id()).expect("partition");
    (store, p)
}

/// Opens the test's partition of the sled store in `dir`.
pub fn open(dir: &Path) -> (Store, Partition) {
    open_on::<Sled>(dir, Durability::Fsync)
}

/// SplitMix64: small, seedable, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn index(&mut self, len: usize) -> usize {
        let n = u64::try_from(len).expect("usize fits u64");
        usize::try_from(self.below(n)).expect("index fits usize")
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }
}

/// One message of the request log.
#[derive(Clone, Debug)]
pub struct Msg {
    pub position: u64,
    pub log_time_ms: u64,
    pub bytes: Vec<u8>,
    /// The reply subject the message named, if any (a saga remembers it).
    pub reply_to: Option<String>,
}

const ACCOUNTS: u64 = 24;
const NAMESPACES: [&str; 2] = ["username", "email"];
const CLAIM_KEYS: u64 = 20;
const OWNERS: u64 = 4;
/// How many recent messages a duplicate or a conflict is drawn from: a few
/// hundred milliseconds of log time, well inside the dedup window, so that
/// when compaction ran never changes a decision.
const RECENT_LEN: usize = 100;
/// How many recent holds a post or a void is drawn from (the same reason).
const RECENT_HOLDS: usize = 40;
/// How many recent sagas (started here, or steps of other partitions'
/// sagas) step messages are drawn from.
const RECENT_SAGAS: usize = 20;
/// The longest saga deadline generated: far inside the test's dedup window
/// (20 s), as the core requires of a deployment (a saga's dedup record must
/// outlive the saga).
const SAGA_DEADLINE_MS_MAX: u64 = 5_000;

struct Gen {
    rng: Rng,
    now_ms: u64,
    recent: VecDeque<(Vec<u8>, Option<Request>)>,
    holds: VecDeque<(OpId, AccountId)>,
    /// Sagas started on this partition: id, step count, the step whose
    /// outcome the generator sends next.
    sagas: VecDeque<(OpId, u32, u32)>,
    /// Steps of other partitions' sagas: saga id, index, step, and how the
    /// saga ends the step (confirm or cancel: a saga never sends both).
    foreign: VecDeque<(OpId, u32, SagaStep, Phase)>,
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T, len_max: usize) {
    if q.len() == len_max {
        q.pop_front();
    }
    q.push_back(v);
}

fn account(n: u64) -> AccountId {
    AccountId::new(format!("acct-{n}")).expect("valid account id")
}

fn amount(v: u64) -> Amount {
    Amount::new(v.max(1)).expect("positive amount")
}

impl Gen {
    fn op_id(&mut self) -> OpId {
        let ms = self.now_ms.saturating_sub(self.rng.below(2_000));
        OpId::v7_from_parts(ms, self.rng.u128())
    }

    fn some_account(&mut self) -> AccountId {
        account(self.rng.below(ACCOUNTS))
    }

    fn claim_parts(&mut self) -> (Namespace, ClaimKey, Owner) {
        let ns = NAMESPACES[self.rng.index(NAMESPACES.len())];
        (
            Namespace::new(ns).expect("valid namespace"),
            ClaimKey::new(format!("key-{}", self.rng.below(CLAIM_KEYS))).expect("valid key"),
            Owner::new(format!("owner-{}", self.rng.below(OWNERS))).expect("valid owner"),
        )
    }

    fn command(&mut self) -> Command {
        match self.rng.below(100) {
            0..10 => {
                let floor = if self.rng.percent(30) {
                    -i64::try_from(self.rng.below(500)).expect("small")
                } else {
                    0
                };
                let ceiling = self.rng.percent(20).then_some(20_000);
                let floor = if self.rng.percent(3) { 5 } else { floor };
                Command::OpenAccount {
                    account: self.some_account(),
                    floor,
                    ceiling,
                }
            }
            10..35 => {
                let big = self.rng.percent(1);
                let v = if big {
                    u64::MAX
                } else {
                    self.rng.range(1, 1_000)
                };
                Command::Credit {
                    account: self.some_account(),
                    amount: amount(v),
                }
            }
            35..50 => Command::Debit {
                account: self.some_account(),
                amount: amount(self.rng.range(1, 1_500)),
            },
            50..62 => Command::Hold {
                account: self.some_account(),
                amount: amount(self.rng.range(1, 800)),
                timeout_ms: self.rng.percent(60).then(|| self.rng.range(20, 3_000)),
            },
            62..70 => {
                let (hold, account) = self.recent_hold();
                let amount = self.rng.percent(50).then(|| amount(self.rng.range(1, 900)));
                Command::Post {
                    account,
                    hold,
                    amount,
                }
            }
            70..76 => {
                let (hold, account) = self.recent_hold();
                Command::Void { account, hold }
            }
            76..88 => {
                let (namespace, key, owner) = self.claim_parts();
                Command::Claim {
                    namespace,
                    key,
                    owner,
                }
            }
            88..95 => {
                let (namespace, key, owner) = self.claim_parts();
                Command::Release {
                    namespace,
                    key,
                    owner,
                }
            }
            _ => Command::Tick {},
        }
    }

    /// A saga step: mostly reservations (debit, credit, claim), sometimes
    /// an account opened at once.
    fn saga_step(&mut self) -> SagaStep {
        let command = match self.rng.below(10) {
            0..3 => Command::Debit {
                account: self.some_account(),
                amount: amount(self.rng.range(1, 1_000)),
            },
            3..6 => Command::Credit {
                account: self.some_account(),
                amount: amount(self.rng.range(1, 1_000)),
            },
            6..9 => {
                let (namespace, key, owner) = self.claim_parts();
                Command::Claim {
                    namespace,
                    key,
                    owner,
                }
            }
            _ => Command::OpenAccount {
                account: self.some_account(),
                floor: 0,
                ceiling: None,
            },
        };
        SagaStep::new(command, None).expect("valid step")
    }

    /// Always explicit: the default deadline (a minute) would outlive the
    /// test's dedup window.
    fn deadline(&mut self) -> Option<DeadlineMs> {
        let ms = self.rng.range(100, SAGA_DEADLINE_MS_MAX);
        Some(DeadlineMs::new(ms).expect("valid deadline"))
    }

    /// A `transfer` or a `saga` of one to three steps, started here.
    fn saga_start(&mut self) -> (Vec<u8>, Option<Request>) {
        // A saga is decided on the partition of its op id: draw one there.
        let op_id = loop {
            let id = self.op_id();
            if route::partition_of(&route::saga_routing_key(&id.0), partitions()) == partition_id()
            {
                break id;
            }
        };
        let (command, len) = if self.rng.percent(50) {
            let command = Command::Transfer {
                from: self.some_account(),
                to: self.some_account(),
                amount: amount(self.rng.range(1, 800)),
                deadline_ms: self.deadline(),
            };
            (command, 2)
        } else {
            let len = self.rng.range(1, 3);
            let steps = (0..len).map(|_| self.saga_step()).collect();
            let command = Command::Saga {
                steps: Steps::new(steps).expect("valid steps"),
                deadline_ms: self.deadline(),
            };
            (command, u32::try_from(len).expect("small"))
        };
        push_bounded(&mut self.sagas, (op_id, len, 0), RECENT_SAGAS);
        self.request(op_id, command)
    }

    /// The outcome of the try of a recent saga's next step, as the step's
    /// partition would send it (the saga may have moved on or ended: the
    /// outcome is then ignored).
    fn step_outcome(&mut self) -> Option<(Vec<u8>, Option<Request>)> {
        if self.sagas.is_empty() {
            return None;
        }
        let i = self.rng.index(self.sagas.len());
        let (saga, len, index) = self.sagas[i];
        let outcome = if self.rng.percent(75) {
            if index + 1 < len {
                self.sagas[i].2 = index + 1;
            } else {
                self.sagas.remove(i);
            }
            Outcome::confirmed()
        } else {
            self.sagas.remove(i);
            Outcome::Rejected {
                reason: Reason::InsufficientFunds {
                    available: 3,
                    floor: 0,
                    requested: 9,
                },
            }
        };
        let req = saga::outcome_request(saga, index, outcome);
        Some((wire::encode(&req), Some(req)))
    }

    /// A step of another partition's saga: a new step's try (or its
    /// confirm or cancel, overtaking it), or the try or the end (repeated,
    /// in any order) of a recent one.
    fn foreign_step(&mut self) -> (Vec<u8>, Option<Request>) {
        let (saga, index, step, end) = if self.foreign.is_empty() || self.rng.percent(40) {
            let saga = self.op_id();
            let index = u32::try_from(self.rng.below(3)).expect("small");
            let step = self.saga_step();
            let end = if self.rng.percent(50) {
                Phase::Confirm
            } else {
                Phase::Cancel
            };
            push_bounded(
                &mut self.foreign,
                (saga, index, step.clone(), end),
                RECENT_SAGAS,
            );
            (saga, index, step, end)
        } else {
            let i = self.rng.index(self.foreign.len());
            self.foreign[i].clone()
        };
        let phase = if self.rng.percent(60) {
            Phase::Try
        } else {
            end
        };
        let req = saga::step_request(saga, index, phase, step);
        (wire::encode(&req), Some(req))
    }

    fn recent_hold(&mut self) -> (OpId, AccountId) {
        if self.holds.is_empty() || self.rng.percent(5) {
            return (self.op_id(), self.some_account());
        }
        let i = self.rng.index(self.holds.len());
        self.holds[i].clone()
    }

    fn request(&mut self, op_id: OpId, command: Command) -> (Vec<u8>, Option<Request>) {
        let apology_topic = self
            .rng
            .percent(15)
            .then(|| Topic::new("orders.refused").expect("valid topic"));
        if let Command::Hold { account, .. } = &command {
            if self.holds.len() == RECENT_HOLDS {
                self.holds.pop_front();
            }
            self.holds.push_back((op_id, account.clone()));
        }
        let req = Request {
            op_id,
            command,
            apology_topic,
        };
        (wire::encode(&req), Some(req))
    }

    fn message(&mut self) -> Vec<u8> {
        let (bytes, req) = match self.rng.below(100) {
            // An exact duplicate of a recent message.
            0..10 if !self.recent.is_empty() => {
                let i = self.rng.index(self.recent.len());
                return self.recent[i].0.clone();
            }
            // A recent op id with another body: a conflict.
            10..13 if !self.recent.is_empty() => {
                let i = self.rng.index(self.recent.len());
                match self.recent[i].1.clone() {
                    Some(req) => {
                        let command = self.command();
                        let req = Request {
                            op_id: req.op_id,
                            command,
                            apology_topic: None,
                        };
                        return wire::encode(&req);
                    }
                    None => return self.recent[i].0.clone(),
                }
            }
            // Readable op id, unreadable body: refused as malformed.
            13..16 => {
                let id = self.op_id();
                (
                    format!(r#"{{"op_id":"{id}","command":{{"type":"bogus"}}}}"#).into_bytes(),
                    None,
                )
            }
            // No readable op id at all: a dead letter.
            16 => (b"{not json".to_vec(), None),
            // Not a UUID v7: malformed.
            17..19 => {
                let v4 =
                    uuid::Builder::from_random_bytes(self.rng.u128().to_be_bytes()).into_uuid();
                let command = self.command();
                self.request(OpId::from_uuid(v4), command)
            }
            // Outside the window: too far in the future, or too old.
            19..21 => {
                let ms = if self.rng.percent(50) {
                    self.now_ms + 60_000
                } else {
                    self.now_ms.saturating_sub(300_000)
                };
                let id = OpId::v7_from_parts(ms, self.rng.u128());
                let command = self.command();
                self.request(id, command)
            }
            21..28 => self.saga_start(),
            28..33 => match self.step_outcome() {
                Some(msg) => msg,
                None => self.saga_start(),
            },
            33..38 => self.foreign_step(),
            _ => {
                let id = self.op_id();
                let command = self.command();
                self.request(id, command)
            }
        };
        if self.recent.len() == RECENT_LEN {
            self.recent.pop_front();
        }
        self.recent.push_back((bytes.clone(), req));
        bytes
    }
}

/// A deterministic log of `len` messages (positions `1..=len`) with every
/// kind of request, duplicates, conflicts, malformed and unreadable
/// messages, ticks and hold expiries. Log time mostly advances by up to
/// 30 ms and sometimes steps back a little (the machine never lets it go
/// back).
pub fn generate(seed: u64, len: usize) -> Vec<Msg> {
    let mut g = Gen {
        rng: Rng::new(seed),
        now_ms: T0_MS,
        recent: VecDeque::new(),
        holds: VecDeque::new(),
        sagas: VecDeque::new(),
        foreign: VecDeque::new(),
    };
    (1..)
        .take(len)
        .map(|position| {
            g.now_ms += g.rng.below(30);
            let log_time_ms = if g.rng.percent(3) {
                g.now_ms.saturating_sub(g.rng.below(50))
            } else {
                g.now_ms
            };
            let bytes = g.message();
            // Any message may name a reply subject; only a saga keeps it.
            let reply_to = g
                .rng
                .percent(30)
                .then(|| format!("_INBOX.test.{}", g.rng.below(1_000)));
            Msg {
                position,
                log_time_ms,
                bytes,
                reply_to,
            }
        })
        .collect()
}

/// Applies batches of messages to a store partition, as a driver does.
pub struct Runner {
    pub machine: Machine,
    changes: ChangeSet,
    effects: Vec<Effect>,
}

impl Runner {
    pub fn new() -> Runner {
        Runner {
            machine: machine(),
            changes: ChangeSet::default(),
            effects: Vec::new(),
        }
    }

    /// Applies `msgs` on top of `p` into the pending change set, without
    /// committing.
    pub fn apply<P: PartitionStore>(&mut self, p: &P, msgs: &[Msg]) {
        self.try_apply(p, msgs)
            .expect("generated logs only advance, over a readable store");
    }

    /// [`Runner::apply`], stopping at the first fault (a failed read of
    /// `p` included); the pending batch must then be abandoned.
    pub fn try_apply<P: PartitionStore>(
        &mut self,
        p: &P,
        msgs: &[Msg],
    ) -> Result<(), Fault<Error>> {
        for m in msgs {
            let mut view = Overlay::new(p, &mut self.changes);
            apply_msg(&self.machine, &mut view, m, &mut self.effects)?;
        }
        Ok(())
    }

    /// Applies `msgs` and commits them as one batch; returns the outbox
    /// range and the effects to publish.
    pub fn batch<P: PartitionStore>(&mut self, p: &P, msgs: &[Msg]) -> (OutboxRange, Vec<Effect>) {
        self.apply(p, msgs);
        let committed = p.commit(&self.changes, &self.effects).expect("commit");
        self.changes.clear();
        (committed.outbox, std::mem::take(&mut self.effects))
    }

    /// Forgets the uncommitted batch (a crash before the commit).
    pub fn abandon(&mut self) {
        self.changes.clear();
        self.effects.clear();
    }
}

/// The uninterrupted in-memory run of a log prefix: the state and every
/// effect in order.
pub fn reference(msgs: &[Msg]) -> (MemState, Vec<Effect>) {
    let machine = machine();
    let mut mem = MemState::new();
    let mut effects = Vec::new();
    for m in msgs {
        apply_msg(&machine, &mut mem, m, &mut effects).expect("generated logs only advance");
    }
    (mem, effects)
}

/// The compaction horizon at a state's log time.
pub fn horizon<R: Read + ?Sized>(state: &R) -> u64 {
    let clock = state.clock().expect("read the clock");
    config().compaction_horizon_ms(clock.log_time_ms)
}

/// An effect as it is published: kind, deterministic id and JSON body.
pub fn published(e: &Effect) -> (&'static str, OpId, String) {
    let json = |b: Vec<u8>| String::from_utf8(b).expect("JSON is UTF-8");
    match e {
        Effect::Decided(d) => ("decided", d.op_id, json(wire::encode(d))),
        Effect::Apology(a) => ("apology", a.decision.op_id, json(wire::encode(a))),
        Effect::HoldExpired(h) => ("expired", h.event_id, json(wire::encode(h))),
        Effect::Send { partition, request } => (
            "send",
            request.op_id,
            serde_json::json!({ "partition": partition, "request": request }).to_string(),
        ),
        Effect::Reply { to, decision } => (
            "reply",
            decision.op_id,
            serde_json::json!({ "to": to, "decision": decision }).to_string(),
        ), // Its position stands in for an op id, which it has none of.
        Effect::DeadLetter(d) => (
            "dead_letter",
            OpId(uuid::Uuid::from_u128(u128::from(d.position))),
            serde_json::json!({ "position": d.position, "detail": d.detail, "bytes": d.bytes })
                .to_string(),
        ),
    }
}

/// Checks the invariants of the core (`amends_core::invariants`: holds add
/// up to `held`, nothing below its floor or above its ceiling counting the
/// credits sagas reserved, the expiry index names exactly the pending holds
/// with an expiry and the sagas in flight, ...) on a whole state, and what
/// the store keeps of it: every saga in flight has its in-flight dedup
/// record, no decision is from the future.
pub fn check_invariants(mem: &MemState) {
    // The invariants every driver checks (`amends_core::invariants`); the
    // stores here are compacted, so without the money ledger.
    let view = invariants::View::new(partition_id(), mem, []);
    let scope = invariants::Scope {
        settled: false,
        ledger: false,
    };
    let found = invariants::check(partitions(), &[view], scope);
    assert!(found.passed(), "{:#?}", found.failures);
    for (id, s) in mem.sagas() {
        if let SagaState::Trying { .. } = s.state {
            let d = mem
                .dedup(*id)
                .expect("a saga in flight has its dedup record");
            assert!(!d.decision.outcome.is_final(), "saga {id:?} in flight");
        }
    }
    let clock = mem.clock();
    for (op, d) in mem.dedups() {
        assert!(
            d.decision.position <= clock.position,
            "decision of {op:?} from the future"
        );
        assert_eq!(d.decision.op_id, *op);
    }
}

/// Asserts two states are equal record for record, naming the first
/// difference of each kind.
pub fn assert_same_state(got: &MemState, want: &MemState, context: &str) {
    fn sorted<K: Ord + std::fmt::Debug, V: std::fmt::Debug>(
        it: impl Iterator<Item = (K, V)>,
    ) -> Vec<String> {
        let mut v: Vec<(K, V)> = it.collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.iter().map(|(k, v)| format!("{k:?} => {v:?}")).collect()
    }
    fn first_diff(kind: &str, got: &[String], want: &[String]) -> Option<String> {
        if got == want {
            return None;
        }
        let at = got
            .iter()
            .zip(want)
            .position(|(g, w)| g != w)
            .unwrap_or(got.len().min(want.len()));
        Some(format!(
            "{kind}: {} stored vs {} expected; first difference at {at}: stored {:?}, expected {:?}",
            got.len(),
            want.len(),
            got.get(at),
            want.get(at)
        ))
    }
    let diffs: Vec<String> = [
        first_diff(
            "accounts",
            &sorted(got.accounts()),
            &sorted(want.accounts()),
        ),
        first_diff("holds", &sorted(got.holds()), &sorted(want.holds())),
        first_diff("claims", &sorted(got.claims()), &sorted(want.claims())),
        first_diff("dedup", &sorted(got.dedups()), &sorted(want.dedups())),
        first_diff("sagas", &sorted(got.sagas()), &sorted(want.sagas())),
        first_diff(
            "expiries",
            &sorted(got.expiries().map(|k| (k, ()))),
            &sorted(want.expiries().map(|k| (k, ()))),
        ),
        (got.clock() != want.clock()).then(|| {
            format!(
                "clock: stored {:?}, expected {:?}",
                got.clock(),
                want.clock()
            )
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(diffs.is_empty(), "{context}:\n{}", diffs.join("\n"));
    assert!(got == want, "{context}: states differ");
}

/// Opens a store's directory with sled directly (to damage it), waiting
/// like `Store::open` for the lock a just-dropped store may still hold.
pub fn raw_sled(dir: &Path) -> sled::Db {
    let started = std::time::Instant::now();
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if started.elapsed() < std::time::Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("raw sled open of {}: {e}", dir.display()),
        }
    }
}
