//! Generated partition logs: the `Op` enum, its proptest strategy, and the
//! builder that turns a list of ops into concrete log messages.
//!
//! Ops are relative (an offset from the current log time, an index into the
//! requests sent so far), so shrinking keeps them meaningful; the builder
//! resolves them into (position, log time, bytes, decoded input) entries.
//! Every message goes through `wire::decode_request`, as in the service.

use amends_core::command::{
    AccountId, Amount, ClaimKey, Command, Namespace, Owner, Request, Topic,
};
use amends_core::id::OpId;
use amends_core::partition::{Config, Input, Machine};
use amends_core::route::{self, Partitions};
use amends_core::wire;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

/// Dedup retention of the property tests: small, so generated logs cross it.
pub const RETENTION_MS: u64 = 10_000;
/// Future skew of the property tests.
pub const SKEW_MS: u64 = 1_000;
/// The log time of the first message (late 2023).
pub const T0_MS: u64 = 1_700_000_000_000;
/// The partition under test (of 8).
pub const PARTITION: u32 = 5;
/// The largest amount an `i64` balance can take.
pub const I64_MAX_U: u64 = i64::MAX.unsigned_abs();

/// The partition settings every property test uses.
pub fn config() -> Config {
    Config {
        dedup_retention_ms: RETENTION_MS,
        op_id_future_skew_ms: SKEW_MS,
    }
}

/// The partition count every property test uses.
pub fn partitions() -> Partitions {
    Partitions::new(8).expect("8 partitions")
}

/// The machine every property test uses.
pub fn machine() -> Machine {
    let id = partitions().id(PARTITION).expect("partition 5 of 8");
    Machine::new(id, partitions(), config())
}

/// Where a message's op id comes from.
#[derive(Clone, Copy, Debug)]
pub enum IdSpec {
    /// A v7 id whose timestamp is this far from the message's log time.
    Offset(i64),
    /// A version 4 id (not acceptable for a client operation).
    V4,
}

/// Which hold a post or void names.
#[derive(Clone, Copy, Debug)]
pub enum HoldRef {
    /// A hold requested earlier, on its own account or on the op's account.
    Earlier {
        /// Which of the earlier hold requests.
        of: Index,
        /// Name the hold's own account (else the op's, maybe another).
        own_account: bool,
    },
    /// One of the last few holds requested, on its own account: a hold
    /// resolved before the compaction horizon counts as gone, so the hold
    /// life-cycle refusals need recent holds.
    Recent {
        /// How many hold requests back (0: the last).
        back: u8,
    },
    /// An id no hold ever had.
    Unknown,
}

/// A command over a small universe (accounts, keys and owners by number).
#[derive(Clone, Copy, Debug)]
pub enum Cmd {
    /// `open_account`.
    Open {
        account: u8,
        floor: i64,
        ceiling: Option<i64>,
    },
    /// `credit`.
    Credit { account: u8, amount: u64 },
    /// `debit`.
    Debit { account: u8, amount: u64 },
    /// `hold`.
    Hold {
        account: u8,
        amount: u64,
        timeout_ms: Option<u64>,
    },
    /// `post`.
    Post {
        account: u8,
        hold: HoldRef,
        amount: Option<u64>,
    },
    /// `void`.
    Void { account: u8, hold: HoldRef },
    /// `claim`.
    Claim { key: u8, owner: u8 },
    /// `release`.
    Release { key: u8, owner: u8 },
}

/// How a malformed message is broken (its op id stays readable).
#[derive(Clone, Copy, Debug)]
pub enum Flaw {
    /// A field the protocol does not know.
    UnknownField,
    /// An amount of zero.
    ZeroAmount,
    /// A command type the protocol does not know.
    UnknownCommand,
    /// An empty account id.
    EmptyAccount,
    /// An apology topic with a space.
    BadTopic,
    /// A body over the size limit.
    TooLarge,
}

/// How a conflicting reuse of an op id changes the body.
#[derive(Clone, Copy, Debug)]
pub enum Change {
    /// Add or drop the apology topic.
    ToggleTopic,
    /// Another command.
    Command(Cmd),
    /// A malformed body.
    Malformed(Flaw),
    /// The same command with one field changed (`swap`: the same fields
    /// under another command kind).
    Tweak {
        /// Change the kind, not a field.
        swap: bool,
    },
}

/// A command that differs from `c` in exactly one field, or (`swap`) only
/// in its kind: the nearest conflicting bodies.
fn tweak(c: &Command, swap: bool) -> Command {
    let other = |a: Amount| {
        amount_of(if a.get() == u64::MAX {
            a.get() - 1
        } else {
            a.get() + 1
        })
    };
    let other_owner = |o: &Owner| Owner::new(format!("{o}x")).expect("valid owner");
    match (c.clone(), swap) {
        (
            c @ (Command::Transfer { .. }
            | Command::Saga { .. }
            | Command::Step { .. }
            | Command::StepOutcome { .. }),
            _,
        ) => panic!("the model generates no sagas: {c:?}"),
        (
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            },
            false,
        ) => {
            let ceiling = if ceiling.is_some() { None } else { Some(1000) };
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            }
        }
        (
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            },
            true,
        ) => Command::OpenAccount {
            account,
            floor: floor.saturating_sub(1),
            ceiling,
        },
        (Command::Credit { account, amount }, false) => Command::Credit {
            account,
            amount: other(amount),
        },
        (Command::Credit { account, amount }, true) => Command::Debit { account, amount },
        (Command::Debit { account, amount }, false) => Command::Debit {
            account,
            amount: other(amount),
        },
        (Command::Debit { account, amount }, true) => Command::Credit { account, amount },
        (
            Command::Hold {
                account,
                amount,
                timeout_ms,
            },
            false,
        ) => {
            let timeout_ms = if timeout_ms.is_some() {
                None
            } else {
                Some(1000)
            };
            Command::Hold {
                account,
                amount,
                timeout_ms,
            }
        }
        (
            Command::Hold {
                account, amount, ..
            },
            true,
        ) => Command::Debit { account, amount },
        (
            Command::Post {
                account,
                hold,
                amount,
            },
            false,
        ) => {
            let amount = if amount.is_some() {
                None
            } else {
                Some(amount_of(1))
            };
            Command::Post {
                account,
                hold,
                amount,
            }
        }
        (Command::Post { account, hold, .. }, true) => Command::Void { account, hold },
        (Command::Void { account, hold }, false) => Command::Void {
            account,
            hold: hold.derive("other"),
        },
        (Command::Void { account, hold }, true) => Command::Post {
            account,
            hold,
            amount: None,
        },
        (
            Command::Claim {
                namespace,
                key,
                owner,
            },
            false,
        ) => Command::Claim {
            namespace,
            key,
            owner: other_owner(&owner),
        },
        (
            Command::Claim {
                namespace,
                key,
                owner,
            },
            true,
        ) => Command::Release {
            namespace,
            key,
            owner,
        },
        (
            Command::Release {
                namespace,
                key,
                owner,
            },
            false,
        ) => Command::Release {
            namespace,
            key,
            owner: other_owner(&owner),
        },
        (
            Command::Release {
                namespace,
                key,
                owner,
            },
            true,
        ) => Command::Claim {
            namespace,
            key,
            owner,
        },
        (Command::Tick {}, _) => Command::Tick {},
    }
}

/// How a message moves the log: log time step (may be negative: the log
/// time given is then below the partition's) and position step.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Added to the partition's log time to get the message's.
    pub dt_ms: i64,
    /// Added to the last position (1: no gap).
    pub gap: u64,
}

/// Which earlier message an op repeats: any, or one of the last few (as a
/// client retrying soon after a timeout would).
#[derive(Clone, Copy, Debug)]
pub struct Pick {
    /// Which one.
    pub of: Index,
    /// Among the last `RECENT` only.
    pub recent: bool,
}

/// How far back a recent pick reaches.
const RECENT: usize = 8;

impl Pick {
    /// The index into `len` earlier messages (`len > 0`).
    fn resolve(self, len: usize) -> usize {
        if self.recent {
            len - 1 - self.of.index(len.min(RECENT))
        } else {
            self.of.index(len)
        }
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    (any::<Index>(), any::<bool>()).prop_map(|(of, recent)| Pick { of, recent })
}

/// One thing that happens to a partition.
#[derive(Clone, Debug)]
pub enum Op {
    /// A new operation.
    Fresh {
        cmd: Cmd,
        id: IdSpec,
        topic: bool,
        step: Step,
    },
    /// A new operation whose account or claim key another partition owns
    /// (a client that routed it wrong).
    Misrouted {
        cmd: Cmd,
        id: IdSpec,
        topic: bool,
        step: Step,
    },
    /// An earlier message again, byte for byte.
    Duplicate { of: Pick, step: Step },
    /// An earlier operation again, same body in another JSON layout, later.
    Resubmit { of: Pick, later_ms: u64 },
    /// An earlier op id with another body.
    Conflict {
        of: Pick,
        change: Change,
        step: Step,
    },
    /// A body that does not parse, with a readable op id.
    Malformed { id: IdSpec, flaw: Flaw, step: Step },
    /// A tick, with a fresh op id or one used before (ticks ignore it).
    Tick { reuse: Option<Index>, step: Step },
    /// The worker crashes here (before its batch commits).
    Restart,
    /// The state compacts here.
    Compact,
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1..=100u64,
        2 => 100..=10_000u64,
        1 => I64_MAX_U - 3..=I64_MAX_U + 3,
        1 => u64::MAX - 3..=u64::MAX,
    ]
}

fn account() -> impl Strategy<Value = u8> {
    0..4u8
}

fn hold_ref() -> impl Strategy<Value = HoldRef> {
    prop_oneof![
        6 => any::<Index>().prop_map(|of| HoldRef::Earlier { of, own_account: true }),
        2 => any::<Index>().prop_map(|of| HoldRef::Earlier { of, own_account: false }),
        4 => (0..3u8).prop_map(|back| HoldRef::Recent { back }),
        1 => Just(HoldRef::Unknown),
    ]
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let floor =
        prop_oneof![6 => Just(0i64), 2 => -1000..=-1i64, 1 => Just(i64::MIN), 1 => 1..=5i64];
    let ceiling = prop_oneof![
        6 => Just(None),
        2 => (0..=500i64).prop_map(Some),
        1 => Just(Some(i64::MAX)),
        1 => (-5..=-1i64).prop_map(Some),
    ];
    let timeout = prop_oneof![
        4 => Just(None),
        1 => Just(Some(0u64)),
        2 => (1..=50u64).prop_map(Some),
        2 => (50..=3000u64).prop_map(Some),
        1 => (u64::MAX - 2..=u64::MAX).prop_map(Some),
    ];
    let post_amount = prop_oneof![
        4 => Just(None),
        4 => (1..=100u64).prop_map(Some),
        1 => amount().prop_map(Some),
    ];
    prop_oneof![
        2 => (account(), floor, ceiling)
            .prop_map(|(account, floor, ceiling)| Cmd::Open { account, floor, ceiling }),
        3 => (account(), amount()).prop_map(|(account, amount)| Cmd::Credit { account, amount }),
        3 => (account(), amount()).prop_map(|(account, amount)| Cmd::Debit { account, amount }),
        3 => (account(), amount(), timeout)
            .prop_map(|(account, amount, timeout_ms)| Cmd::Hold { account, amount, timeout_ms }),
        2 => (account(), hold_ref(), post_amount)
            .prop_map(|(account, hold, amount)| Cmd::Post { account, hold, amount }),
        2 => (account(), hold_ref()).prop_map(|(account, hold)| Cmd::Void { account, hold }),
        2 => (0..3u8, 0..3u8).prop_map(|(key, owner)| Cmd::Claim { key, owner }),
        1 => (0..3u8, 0..3u8).prop_map(|(key, owner)| Cmd::Release { key, owner }),
    ]
}

/// Op id offsets: mostly inside the window, sometimes just on or past its
/// edges, sometimes far outside, sometimes not v7 at all. An id just past
/// the upper edge is refused without a record, so a later duplicate or
/// resubmission of it may be decided for the first time.
fn id_spec() -> impl Strategy<Value = IdSpec> {
    let retention = i64::try_from(RETENTION_MS).expect("small");
    let skew = i64::try_from(SKEW_MS).expect("small");
    prop_oneof![
        20 => (-1000..=100i64).prop_map(IdSpec::Offset),
        2 => (-retention..=skew).prop_map(IdSpec::Offset),
        1 => prop_oneof![
            Just(-retention),
            Just(skew),
            Just(-retention - 1),
            Just(skew + 1),
        ]
        .prop_map(IdSpec::Offset),
        1 => (-retention - 5000..-retention).prop_map(IdSpec::Offset),
        1 => (skew + 1..=skew + 5000).prop_map(IdSpec::Offset),
        1 => Just(IdSpec::V4),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let dt = prop_oneof![
        3 => Just(0i64),
        3 => 1..=20i64,
        3 => 20..=200i64,
        2 => 200..=3000i64,
        1 => -2000..=-1i64,
        1 => 10_000..=14_000i64,
    ];
    let gap = prop_oneof![8 => Just(1u64), 1 => 2..=5u64];
    (dt, gap).prop_map(|(dt_ms, gap)| Step { dt_ms, gap })
}

fn flaw() -> impl Strategy<Value = Flaw> {
    prop_oneof![
        Just(Flaw::UnknownField),
        Just(Flaw::ZeroAmount),
        Just(Flaw::UnknownCommand),
        Just(Flaw::EmptyAccount),
        Just(Flaw::BadTopic),
        Just(Flaw::TooLarge),
    ]
}

/// One op. `restarts` and `compactions` weigh those markers (0: never).
pub fn op(restarts: u32, compactions: u32) -> impl Strategy<Value = Op> {
    let change = prop_oneof![
        2 => Just(Change::ToggleTopic),
        2 => cmd().prop_map(Change::Command),
        1 => flaw().prop_map(Change::Malformed),
        4 => any::<bool>().prop_map(|swap| Change::Tweak { swap }),
    ];
    prop_oneof![
        // One in sixteen new operations is misrouted.
        32 => (cmd(), id_spec(), prop::bool::weighted(0.2), step(), prop::bool::weighted(1.0 / 16.0))
            .prop_map(|(cmd, id, topic, step, misrouted)| if misrouted {
                Op::Misrouted { cmd, id, topic, step }
            } else {
                Op::Fresh { cmd, id, topic, step }
            }),
        3 => (pick(), step()).prop_map(|(of, step)| Op::Duplicate { of, step }),
        3 => (pick(), prop_oneof![1..=3000u64, 8000..=14_000u64])
            .prop_map(|(of, later_ms)| Op::Resubmit { of, later_ms }),
        2 => (pick(), change, step())
            .prop_map(|(of, change, step)| Op::Conflict { of, change, step }),
        2 => (id_spec(), flaw(), step())
            .prop_map(|(id, flaw, step)| Op::Malformed { id, flaw, step }),
        3 => (prop::option::weighted(0.2, any::<Index>()), step())
            .prop_map(|(reuse, step)| Op::Tick { reuse, step }),
        restarts => Just(Op::Restart),
        compactions => Just(Op::Compact),
    ]
}

/// Up to `len_max` ops.
pub fn ops(len_max: usize, restarts: u32, compactions: u32) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(restarts, compactions), 1..=len_max)
}

/// One message of the log.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its position (stream sequence).
    pub position: u64,
    /// Its log time as delivered (may be below the partition's log time).
    pub log_time_ms: u64,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// What `wire::decode_request` made of the bytes.
    pub input: Input,
}

/// A log: messages, with crash and compaction markers between them.
#[derive(Clone, Debug)]
pub enum Item {
    /// A message.
    Message(Entry),
    /// A crash before commit, at this point.
    Restart,
    /// A compaction, at this point.
    Compact,
}

/// A message sent earlier, for duplicates and conflicts.
struct Sent {
    op_id: OpId,
    bytes: Vec<u8>,
    request: Option<Request>,
}

/// Resolves relative ops into a concrete log.
struct Builder {
    items: Vec<Item>,
    position: u64,
    /// The partition's log time: the largest delivered so far.
    now_ms: u64,
    sent: Vec<Sent>,
    holds: Vec<(OpId, AccountId)>,
    /// Makes every generated op id distinct.
    counter: u128,
}

/// The `n`-th of `<prefix>0`, `<prefix>1` ... whose routing key (as an
/// account id, or as a claim key of namespace `user` when `key`) partition
/// [`PARTITION`] of 8 owns (`here`), or does not own.
fn routed(prefix: &str, n: u8, key: bool, here: bool) -> String {
    let partitions = Partitions::new(8).expect("8 partitions");
    let owner = |name: &str| {
        let routing_key = if key {
            route::claim_routing_key("user", name)
        } else {
            name.to_owned()
        };
        route::partition_of(&routing_key, partitions).get()
    };
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|name| (owner(name) == PARTITION) == here)
        .nth(usize::from(n))
        .expect("names of every partition exist")
}

/// Account `n` of the universe: on the partition under test, or (`here`
/// false) on another.
fn account_id(n: u8, here: bool) -> AccountId {
    AccountId::new(routed("a", n, false, here)).expect("valid account")
}

fn amount_of(v: u64) -> Amount {
    Amount::new(v).expect("generated amounts are positive")
}

/// `value` as JSON text with every object's keys in reverse order and
/// spaces around separators: the same request in another layout.
fn relayout(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push_str("{ ");
            for (i, (k, v)) in map.iter().rev().enumerate() {
                if i > 0 {
                    out.push_str(" , ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(" : ");
                relayout(v, out);
            }
            out.push_str(" }");
        }
        other => out.push_str(&other.to_string()),
    }
}

impl Builder {
    fn new() -> Builder {
        Builder {
            items: Vec::new(),
            position: 0,
            now_ms: T0_MS,
            sent: Vec::new(),
            holds: Vec::new(),
            counter: 0,
        }
    }

    /// Moves the log on by `step`; returns the message's log time.
    fn advance(&mut self, step: Step) -> u64 {
        self.position += step.gap;
        let delivered = self.now_ms.saturating_add_signed(step.dt_ms);
        self.now_ms = self.now_ms.max(delivered);
        delivered
    }

    fn op_id(&mut self, spec: IdSpec) -> OpId {
        self.counter += 1;
        match spec {
            IdSpec::Offset(ms) => {
                OpId::v7_from_parts(self.now_ms.saturating_add_signed(ms), self.counter)
            }
            IdSpec::V4 => {
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(
                    &(self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes(),
                );
                OpId::from_uuid(uuid::Builder::from_random_bytes(bytes).into_uuid())
            }
        }
    }

    /// The command of `cmd`, on names of the partition under test (`here`)
    /// or of others.
    fn command(&mut self, cmd: Cmd, here: bool) -> Command {
        let account_id = |n: u8| account_id(n, here);
        let hold = |b: &mut Builder, account: u8, hold: HoldRef| {
            let (on, id) = match hold {
                HoldRef::Earlier { of, own_account } if !b.holds.is_empty() => {
                    let (id, on) = b.holds[of.index(b.holds.len())].clone();
                    (if own_account { on } else { account_id(account) }, id)
                }
                HoldRef::Recent { back } if !b.holds.is_empty() => {
                    let back = usize::from(back).min(b.holds.len().saturating_sub(1));
                    let (id, on) = b.holds.iter().rev().nth(back).expect("a hold").clone();
                    (on, id)
                }
                _ => (account_id(account), b.op_id(IdSpec::Offset(0))),
            };
            // A misrouted post or void names an earlier hold on an account
            // of another partition.
            (if here { on } else { account_id(account) }, id)
        };
        let ns = || Namespace::new("user").expect("valid namespace");
        let key = |k: u8| ClaimKey::new(routed("k", k, true, here)).expect("valid key");
        let owner = |o: u8| Owner::new(format!("o{o}")).expect("valid owner");
        match cmd {
            Cmd::Open {
                account,
                floor,
                ceiling,
            } => Command::OpenAccount {
                account: account_id(account),
                floor,
                ceiling,
            },
            Cmd::Credit { account, amount } => Command::Credit {
                account: account_id(account),
                amount: amount_of(amount),
            },
            Cmd::Debit { account, amount } => Command::Debit {
                account: account_id(account),
                amount: amount_of(amount),
            },
            Cmd::Hold {
                account,
                amount,
                timeout_ms,
            } => Command::Hold {
                account: account_id(account),
                amount: amount_of(amount),
                timeout_ms,
            },
            Cmd::Post {
                account,
                hold: h,
                amount,
            } => {
                let (account, hold) = hold(self, account, h);
                Command::Post {
                    account,
                    hold,
                    amount: amount.map(amount_of),
                }
            }
            Cmd::Void { account, hold: h } => {
                let (account, hold) = hold(self, account, h);
                Command::Void { account, hold }
            }
            Cmd::Claim { key: k, owner: o } => Command::Claim {
                namespace: ns(),
                key: key(k),
                owner: owner(o),
            },
            Cmd::Release { key: k, owner: o } => Command::Release {
                namespace: ns(),
                key: key(k),
                owner: owner(o),
            },
        }
    }

    fn push(&mut self, log_time_ms: u64, bytes: Vec<u8>) -> Input {
        let input = wire::decode_request(&bytes).expect("generated messages have a readable op id");
        self.items.push(Item::Message(Entry {
            position: self.position,
            log_time_ms,
            bytes,
            input: input.clone(),
        }));
        input
    }

    fn send_request(&mut self, log_time_ms: u64, request: Request) {
        let bytes = wire::encode(&request);
        let input = self.push(log_time_ms, bytes.clone());
        assert_eq!(
            input,
            Input::Request(request.clone()),
            "a generated request decodes to itself"
        );
        if let Command::Hold { account, .. } = &request.command {
            self.holds.push((request.op_id, account.clone()));
        }
        self.sent.push(Sent {
            op_id: request.op_id,
            bytes,
            request: Some(request),
        });
    }

    fn send_malformed(&mut self, log_time_ms: u64, op_id: OpId, flaw: Flaw) {
        let id = op_id.to_string();
        let credit =
            |amount: u64| format!(r#"{{"type":"credit","account":"a0","amount":{amount}}}"#);
        let text = match flaw {
            Flaw::UnknownField => {
                format!(r#"{{"op_id":"{id}","command":{},"extra":1}}"#, credit(5))
            }
            Flaw::ZeroAmount => format!(r#"{{"op_id":"{id}","command":{}}}"#, credit(0)),
            Flaw::UnknownCommand => {
                format!(r#"{{"op_id":"{id}","command":{{"type":"mint","account":"a0"}}}}"#)
            }
            Flaw::EmptyAccount => {
                format!(
                    r#"{{"op_id":"{id}","command":{{"type":"debit","account":"","amount":3}}}}"#
                )
            }
            Flaw::BadTopic => format!(
                r#"{{"op_id":"{id}","command":{},"apology_topic":"no spaces"}}"#,
                credit(5)
            ),
            Flaw::TooLarge => format!(
                r#"{{"op_id":"{id}","command":{},"apology_topic":"{}"}}"#,
                credit(5),
                "x".repeat(wire::REQUEST_BYTES_MAX)
            ),
        };
        let bytes = text.into_bytes();
        let input = self.push(log_time_ms, bytes.clone());
        assert!(
            matches!(&input, Input::Malformed { op_id: got, .. } if *got == op_id),
            "a generated malformed message decodes as malformed: {input:?}"
        );
        self.sent.push(Sent {
            op_id,
            bytes,
            request: None,
        });
    }

    fn op(&mut self, op: &Op) {
        match op {
            Op::Fresh {
                cmd,
                id,
                topic,
                step,
            }
            | Op::Misrouted {
                cmd,
                id,
                topic,
                step,
            } => {
                let t = self.advance(*step);
                let op_id = self.op_id(*id);
                let command = self.command(*cmd, matches!(op, Op::Fresh { .. }));
                let apology_topic =
                    topic.then(|| Topic::new("orders.refund").expect("valid topic"));
                self.send_request(
                    t,
                    Request {
                        op_id,
                        command,
                        apology_topic,
                    },
                );
            }
            Op::Duplicate { of, step } => {
                if self.sent.is_empty() {
                    return;
                }
                let bytes = self.sent[of.resolve(self.sent.len())].bytes.clone();
                let t = self.advance(*step);
                self.push(t, bytes);
            }
            Op::Resubmit { of, later_ms } => {
                if self.sent.is_empty() {
                    return;
                }
                let sent = &self.sent[of.resolve(self.sent.len())];
                let bytes = match &sent.request {
                    Some(req) => {
                        let mut text = String::new();
                        relayout(
                            &serde_json::to_value(req).expect("requests are JSON"),
                            &mut text,
                        );
                        text.into_bytes()
                    }
                    None => sent.bytes.clone(),
                };
                let step = Step {
                    dt_ms: i64::try_from(*later_ms).expect("small"),
                    gap: 1,
                };
                let t = self.advance(step);
                let input = self.push(t, bytes);
                if let Some(req) = &self.sent[of.resolve(self.sent.len())].request {
                    assert_eq!(
                        input,
                        Input::Request(req.clone()),
                        "a relayout decodes to the same request"
                    );
                }
            }
            Op::Conflict { of, change, step } => {
                if self.sent.is_empty() {
                    return;
                }
                let sent = &self.sent[of.resolve(self.sent.len())];
                let (op_id, original) = (sent.op_id, sent.request.clone());
                let t = self.advance(*step);
                match (change, original) {
                    (Change::Malformed(flaw), _) => self.send_malformed(t, op_id, *flaw),
                    (Change::ToggleTopic, Some(mut req)) => {
                        req.apology_topic = match req.apology_topic {
                            Some(_) => None,
                            None => Some(Topic::new("conflicts").expect("valid topic")),
                        };
                        self.send_request(t, req);
                    }
                    (Change::Tweak { swap }, Some(req)) => {
                        let command = tweak(&req.command, *swap);
                        self.send_request(t, Request { command, ..req });
                    }
                    (Change::Command(_), _)
                    | (Change::ToggleTopic | Change::Tweak { .. }, None) => {
                        let cmd = match change {
                            Change::Command(c) => *c,
                            _ => Cmd::Credit {
                                account: 0,
                                amount: 1,
                            },
                        };
                        let command = self.command(cmd, true);
                        self.send_request(
                            t,
                            Request {
                                op_id,
                                command,
                                apology_topic: None,
                            },
                        );
                    }
                }
            }
            Op::Malformed { id, flaw, step } => {
                let t = self.advance(*step);
                let op_id = self.op_id(*id);
                self.send_malformed(t, op_id, *flaw);
            }
            Op::Tick { reuse, step } => {
                let t = self.advance(*step);
                let op_id = match reuse {
                    Some(of) if !self.sent.is_empty() => self.sent[of.index(self.sent.len())].op_id,
                    _ => self.op_id(IdSpec::Offset(0)),
                };
                let tick = Request {
                    op_id,
                    command: Command::Tick {},
                    apology_topic: None,
                };
                let bytes = wire::encode(&tick);
                let input = self.push(t, bytes);
                assert_eq!(input, Input::Request(tick), "a tick decodes to itself");
            }
            Op::Restart => self.items.push(Item::Restart),
            Op::Compact => self.items.push(Item::Compact),
        }
    }
}

/// The log the ops describe.
pub fn build(ops: &[Op]) -> Vec<Item> {
    let mut b = Builder::new();
    for op in ops {
        b.op(op);
    }
    b.items
}

/// Only the messages of a log.
pub fn messages(items: &[Item]) -> Vec<Entry> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Message(e) => Some(e.clone()),
            Item::Restart | Item::Compact => None,
        })
        .collect()
}
