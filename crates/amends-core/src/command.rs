//! Commands and requests: what a client may ask of a partition.
//!
//! Every string a command carries is a validated newtype that only parsing
//! (serde, or the `new` constructors) can build, so the state machine never
//! sees an empty account id or a zero amount. The limits are named constants
//! and are listed in `specs/protocol.md`. The newtypes and their limits are
//! defined in a module of their own (below this one and
//! [`crate::decision`], which both use them) and re-exported here, their
//! public path.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use crate::decision::Outcome;
use crate::id::OpId;
use crate::route;

pub use crate::field::{
    ACCOUNT_ID_BYTES_MAX, AccountId, Amount, CLAIM_KEY_BYTES_MAX, ClaimKey, DeadlineMs, FieldError,
    NAMESPACE_BYTES_MAX, Namespace, OWNER_BYTES_MAX, Owner, SAGA_DEADLINE_MS_DEFAULT,
    SAGA_DEADLINE_MS_MAX, SAGA_STEPS_MAX, TOPIC_BYTES_MAX, Topic, is_subject_token_byte,
};

/// What an operation asks a partition to do.
///
/// On the wire a command is a JSON object whose `type` names the variant in
/// snake_case; unknown fields are refused.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Opens an account with a zero balance.
    OpenAccount {
        /// The new account's id.
        account: AccountId,
        /// The lowest balance the account may reach; at most 0. Default 0.
        #[serde(default, skip_serializing_if = "is_zero")]
        floor: i64,
        /// The highest balance the account may reach; at least 0. Default:
        /// no ceiling.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ceiling: Option<i64>,
    },
    /// Adds `amount` to the balance.
    Credit {
        /// The account.
        account: AccountId,
        /// How much.
        amount: Amount,
    },
    /// Takes `amount` from the balance if the available balance allows it.
    Debit {
        /// The account.
        account: AccountId,
        /// How much.
        amount: Amount,
    },
    /// Reserves `amount` of the available balance. The hold is named by the
    /// op id of this request; it lasts until posted, voided or expired.
    Hold {
        /// The account.
        account: AccountId,
        /// How much to reserve.
        amount: Amount,
        /// If set, the hold expires this many milliseconds of log time after
        /// the request's log time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Takes up to the held amount from the balance and ends the hold; the
    /// rest of the hold is released.
    Post {
        /// The account the hold is on.
        account: AccountId,
        /// The op id of the hold request.
        hold: OpId,
        /// How much to take; default: the whole held amount.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        amount: Option<Amount>,
    },
    /// Ends a hold without taking anything.
    Void {
        /// The account the hold is on.
        account: AccountId,
        /// The op id of the hold request.
        hold: OpId,
    },
    /// Claims `(namespace, key)` for `owner`.
    Claim {
        /// The namespace, e.g. `username`.
        namespace: Namespace,
        /// The key within the namespace.
        key: ClaimKey,
        /// Who claims it.
        owner: Owner,
    },
    /// Releases `(namespace, key)`; only its owner may.
    Release {
        /// The namespace.
        namespace: Namespace,
        /// The key within the namespace.
        key: ClaimKey,
        /// Who releases it; must be the current owner.
        owner: Owner,
    },
    /// Advances log time so holds expire on an idle partition. A tick is not
    /// an operation: it is not deduplicated and gets no decision.
    Tick {},
    /// Moves `amount` from `from` to `to`: the built-in saga of two steps, a
    /// debit of `from` (a hold until the saga confirms) and a credit of `to`
    /// (reserved against its ceiling until then). Routed by its op id, like
    /// every saga; the accounts may be on any partitions.
    Transfer {
        /// The account debited.
        from: AccountId,
        /// The account credited.
        to: AccountId,
        /// How much.
        amount: Amount,
        /// Log time (ms) after which an unfinished transfer is cancelled;
        /// default [`SAGA_DEADLINE_MS_DEFAULT`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<DeadlineMs>,
    },
    /// A saga: ordered steps on any partitions, confirmed together or
    /// cancelled together. Debits run as holds, credits as reservations and
    /// claims as tentative claims until every step has been tried; other
    /// steps take effect at once and are undone by their `compensation`.
    /// Routed by its op id.
    Saga {
        /// The steps, in order (1 to [`SAGA_STEPS_MAX`]).
        steps: Steps,
        /// Log time (ms) after which an unfinished saga is cancelled;
        /// default [`SAGA_DEADLINE_MS_DEFAULT`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<DeadlineMs>,
    },
    /// A phase of one saga step, sent by the saga's partition to the step's
    /// partition. Written by amends itself; its op id must be the one
    /// derived from the saga's op id ([`crate::saga::step_id`]).
    Step {
        /// The saga's op id.
        saga: OpId,
        /// The step's index in the saga.
        index: u32,
        /// Try, confirm or cancel.
        phase: Phase,
        /// The step.
        step: SagaStep,
    },
    /// The outcome of a step's try, sent back to the saga's partition.
    /// Written by amends itself; its op id must be the one derived from the
    /// saga's op id ([`crate::saga::outcome_id`]).
    StepOutcome {
        /// The saga's op id.
        saga: OpId,
        /// The step's index in the saga.
        index: u32,
        /// What the step's partition decided.
        outcome: Outcome,
    },
}

/// The phase of a saga step: try/confirm/cancel.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reserve (debit, credit, claim) or perform (any other step).
    Try,
    /// Make a reservation final.
    Confirm,
    /// Release a reservation, or run a performed step's compensation.
    Cancel,
}

impl Phase {
    /// The phase's name, as on the wire.
    pub const fn label(self) -> &'static str {
        match self {
            Phase::Try => "try",
            Phase::Confirm => "confirm",
            Phase::Cancel => "cancel",
        }
    }
}

/// One step of a saga: an operation on any partition and, for a step that
/// takes effect at once, the operation that undoes it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "StepWire")]
pub struct SagaStep {
    /// The operation: `debit`, `credit` and `claim` are tentative until the
    /// saga confirms; `open_account`, `post`, `void` and `release` take
    /// effect at once. (`hold` is not a step: a `debit` step is a hold.)
    pub command: Box<Command>,
    /// For a step that takes effect at once: what undoes it if the saga is
    /// cancelled after it. It runs on the step's partition, so it must have
    /// the same routing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Box<Command>>,
}

/// A saga step as parsed, before its checks.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct StepWire {
    /// The operation.
    #[serde(deserialize_with = "crate::json::object_only")]
    command: Box<Command>,
    /// What undoes it, for a step that takes effect at once.
    #[serde(default, deserialize_with = "crate::json::object_only_opt")]
    compensation: Option<Box<Command>>,
}

impl SagaStep {
    /// Checks and builds a step.
    pub fn new(command: Command, compensation: Option<Command>) -> Result<SagaStep, FieldError> {
        SagaStep::try_from(StepWire {
            command: Box::new(command),
            compensation: compensation.map(Box::new),
        })
    }

    /// Whether the step is a reservation (debit, credit, claim) that the
    /// saga confirms or cancels, rather than an operation done at once.
    pub fn is_tentative(&self) -> bool {
        is_tentative_kind(&self.command)
    }
}

fn is_tentative_kind(c: &Command) -> bool {
    matches!(
        c,
        Command::Debit { .. } | Command::Credit { .. } | Command::Claim { .. }
    )
}

/// Whether `c` is an operation on one partition (a saga step or a
/// compensation may be one), as opposed to a tick, a saga or an internal
/// message.
fn is_plain(c: &Command) -> bool {
    !matches!(
        c,
        Command::Tick {}
            | Command::Transfer { .. }
            | Command::Saga { .. }
            | Command::Step { .. }
            | Command::StepOutcome { .. }
    )
}

impl TryFrom<StepWire> for SagaStep {
    type Error = FieldError;
    fn try_from(w: StepWire) -> Result<SagaStep, FieldError> {
        // A `hold` step would leave a hold only the saga could end: a
        // `debit` step is the saga's hold.
        if !is_plain(&w.command) || matches!(*w.command, Command::Hold { .. }) {
            return Err(FieldError::StepKind {
                kind: w.command.kind(),
            });
        }
        if let Some(comp) = &w.compensation {
            if is_tentative_kind(&w.command) {
                return Err(FieldError::Compensation {
                    reason: "debit, credit and claim steps are cancelled by the saga itself; \
                             they take no compensation",
                });
            }
            if !is_plain(comp) {
                return Err(FieldError::Compensation {
                    reason: "a compensation must be a plain operation (not a tick, saga or step)",
                });
            }
            if matches!(**comp, Command::Hold { .. }) {
                // Its id would be derived (not v7): no client could post or
                // void it, and without a timeout it would never end.
                return Err(FieldError::Compensation {
                    reason: "a compensation cannot be a hold",
                });
            }
            if comp.routing_key() != w.command.routing_key() {
                return Err(FieldError::Compensation {
                    reason: "a compensation must have the same routing key as its step",
                });
            }
        }
        Ok(SagaStep {
            command: w.command,
            compensation: w.compensation,
        })
    }
}

/// The steps of a saga: 1 to [`SAGA_STEPS_MAX`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "Vec<SagaStep>", into = "Vec<SagaStep>")]
#[schemars(extend("minItems" = 1, "maxItems" = SAGA_STEPS_MAX))]
pub struct Steps(Vec<SagaStep>);

impl Steps {
    /// Validates and wraps `steps`.
    pub fn new(steps: Vec<SagaStep>) -> Result<Steps, FieldError> {
        if steps.is_empty() || steps.len() > SAGA_STEPS_MAX {
            return Err(FieldError::SagaSteps { len: steps.len() });
        }
        Ok(Steps(steps))
    }

    /// The steps, in order.
    pub fn as_slice(&self) -> &[SagaStep] {
        &self.0
    }
}

impl TryFrom<Vec<SagaStep>> for Steps {
    type Error = FieldError;
    fn try_from(v: Vec<SagaStep>) -> Result<Steps, FieldError> {
        Steps::new(v)
    }
}

impl From<Steps> for Vec<SagaStep> {
    fn from(v: Steps) -> Vec<SagaStep> {
        v.0
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl Command {
    /// The routing key that places this command on a partition, or `None`
    /// for a tick (the sender picks the partition).
    pub fn routing_key(&self) -> Option<Cow<'_, str>> {
        match self {
            Command::OpenAccount { account, .. }
            | Command::Credit { account, .. }
            | Command::Debit { account, .. }
            | Command::Hold { account, .. }
            | Command::Post { account, .. }
            | Command::Void { account, .. } => Some(Cow::Borrowed(account.as_str())),
            Command::Claim { namespace, key, .. } | Command::Release { namespace, key, .. } => {
                Some(Cow::Owned(route::claim_routing_key(
                    namespace.as_str(),
                    key.as_str(),
                )))
            }
            Command::Step { step, .. } => step.command.routing_key(),
            // A saga goes by its op id, which the command does not hold: see
            // [`Request::routing_key`]. A tick goes where its sender puts it.
            Command::Tick {}
            | Command::Transfer { .. }
            | Command::Saga { .. }
            | Command::StepOutcome { .. } => None,
        }
    }

    /// The snake_case name of the command, as in its `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::OpenAccount { .. } => "open_account",
            Command::Credit { .. } => "credit",
            Command::Debit { .. } => "debit",
            Command::Hold { .. } => "hold",
            Command::Post { .. } => "post",
            Command::Void { .. } => "void",
            Command::Claim { .. } => "claim",
            Command::Release { .. } => "release",
            Command::Tick {} => "tick",
            Command::Transfer { .. } => "transfer",
            Command::Saga { .. } => "saga",
            Command::Step { .. } => "step",
            Command::StepOutcome { .. } => "step_outcome",
        }
    }

    /// Whether this is a message amends writes itself (a saga's step or
    /// step outcome), whose op id is derived rather than made by a client.
    pub const fn is_internal(&self) -> bool {
        matches!(self, Command::Step { .. } | Command::StepOutcome { .. })
    }
}

/// One operation: an id, a command and, for an optimistic client, the topic
/// on which a refusal is published as an apology.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The end-to-end operation id (UUID v7, made by the client once).
    pub op_id: OpId,
    /// What to do, as a JSON object.
    // Derived deserializers would also take an array of the fields in
    // order; the protocol allows objects only.
    #[serde(deserialize_with = "crate::json::object_only")]
    pub command: Command,
    /// If set, the client went ahead without waiting: a refusal is also
    /// published on `<prefix>.apology.<apology_topic>` for a workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apology_topic: Option<Topic>,
}

impl Request {
    /// The routing key that places this request on a partition: the
    /// command's (an account, a claim), a saga's op id for `transfer` and
    /// `saga`, the saga's op id for a step outcome; `None` for a tick.
    pub fn routing_key(&self) -> Option<Cow<'_, str>> {
        match &self.command {
            Command::Transfer { .. } | Command::Saga { .. } => {
                Some(Cow::Owned(route::saga_routing_key(&self.op_id.0)))
            }
            Command::StepOutcome { saga, .. } => Some(Cow::Owned(route::saga_routing_key(&saga.0))),
            c => c.routing_key(),
        }
    }
}

/// A 128-bit digest of a request's canonical form.
///
/// Two requests with the same op id are the same operation only when their
/// fingerprints match; otherwise the second is refused as `op_id_conflict`.
/// The digest is XXH3-128 over a tagged, length-prefixed encoding of the
/// parsed request (so JSON key order and whitespace do not matter). It is
/// stored in dedup records, so the encoding is part of the store format.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Fingerprint(pub u128);

/// The longest canonical encoding of a valid request, in bytes: the version
/// tag and op id, the largest command (a claim or release: a tag and three
/// length-prefixed texts at their limits), and a length-prefixed apology
/// topic. [`Canon`] encodes into a stack buffer of this size, so
/// fingerprinting does not allocate.
const CANON_BYTES_MAX: usize = 1
    + 16
    + 1
    + (8 + NAMESPACE_BYTES_MAX)
    + (8 + CLAIM_KEY_BYTES_MAX)
    + (8 + OWNER_BYTES_MAX)
    + 1
    + (8 + TOPIC_BYTES_MAX);

/// Writes a canonical encoding of a request: every field is tagged and
/// every variable-length field is length-prefixed, so no two different
/// requests share an encoding.
///
/// The bytes are hashed in one shot at the end ([`Canon::digest`]).
/// XXH3's one-shot and streaming forms give the same digest for the same
/// bytes, so this matches feeding a streaming hasher piece by piece, only
/// faster for the short inputs requests are.
struct Canon {
    buf: [u8; CANON_BYTES_MAX],
    /// Bytes used in `buf`, or [`Canon::SPILLED`] once the encoding has
    /// moved to `spill`.
    len: usize,
    /// The whole encoding once it outgrew `buf`. Unreachable for requests
    /// built by parsing (their fields are within the limits), but it keeps
    /// the fingerprint total rather than a panic.
    spill: Vec<u8>,
}

impl Canon {
    /// A `len` past the end of `buf`: no write fits in `buf` any more.
    const SPILLED: usize = CANON_BYTES_MAX + 1;

    fn new() -> Canon {
        Canon {
            buf: [0; CANON_BYTES_MAX],
            len: 0,
            spill: Vec::new(),
        }
    }
    #[inline(always)]
    fn bytes(&mut self, b: &[u8]) {
        let end = self.len.saturating_add(b.len());
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.len = end;
            }
            None => self.spill(b),
        }
    }
    #[cold]
    #[inline(never)]
    fn spill(&mut self, b: &[u8]) {
        if self.len != Canon::SPILLED {
            self.spill.extend_from_slice(&self.buf[..self.len]);
            self.len = Canon::SPILLED;
        }
        self.spill.extend_from_slice(b);
    }
    #[inline(always)]
    fn tag(&mut self, t: u8) {
        self.bytes(&[t]);
    }
    #[inline(always)]
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    #[inline(always)]
    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }
    #[inline(always)]
    fn text(&mut self, s: &str) {
        self.u64(u64::try_from(s.len()).unwrap_or(u64::MAX));
        self.bytes(s.as_bytes());
    }
    fn text_bytes(&mut self, b: &[u8]) {
        self.u64(u64::try_from(b.len()).unwrap_or(u64::MAX));
        self.bytes(b);
    }
    #[inline(always)]
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.tag(0),
            Some(v) => {
                self.tag(1);
                self.u64(v);
            }
        }
    }
    #[inline(always)]
    fn id(&mut self, id: OpId) {
        self.bytes(id.0.as_bytes());
    }
    fn digest(&self) -> Fingerprint {
        let bytes = match self.buf.get(..self.len) {
            Some(b) => b,
            None => &self.spill[..],
        };
        Fingerprint(xxh3_128(bytes))
    }
}

impl Request {
    /// The canonical fingerprint of this request (op id included).
    pub fn fingerprint(&self) -> Fingerprint {
        let mut c = Canon::new();
        c.tag(1); // Encoding version.
        c.id(self.op_id);
        match &self.command {
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            } => {
                c.tag(10);
                c.text(account.as_str());
                c.i64(*floor);
                match ceiling {
                    None => c.tag(0),
                    Some(v) => {
                        c.tag(1);
                        c.i64(*v);
                    }
                }
            }
            Command::Credit { account, amount } => {
                c.tag(11);
                c.text(account.as_str());
                c.u64(amount.get());
            }
            Command::Debit { account, amount } => {
                c.tag(12);
                c.text(account.as_str());
                c.u64(amount.get());
            }
            Command::Hold {
                account,
                amount,
                timeout_ms,
            } => {
                c.tag(13);
                c.text(account.as_str());
                c.u64(amount.get());
                c.opt_u64(*timeout_ms);
            }
            Command::Post {
                account,
                hold,
                amount,
            } => {
                c.tag(14);
                c.text(account.as_str());
                c.id(*hold);
                c.opt_u64(amount.map(Amount::get));
            }
            Command::Void { account, hold } => {
                c.tag(15);
                c.text(account.as_str());
                c.id(*hold);
            }
            Command::Claim {
                namespace,
                key,
                owner,
            } => {
                c.tag(16);
                c.text(namespace.as_str());
                c.text(key.as_str());
                c.text(owner.as_str());
            }
            Command::Release {
                namespace,
                key,
                owner,
            } => {
                c.tag(17);
                c.text(namespace.as_str());
                c.text(key.as_str());
                c.text(owner.as_str());
            }
            Command::Tick {} => c.tag(18),
            // Sagas and their internal messages are rare next to the plain
            // operations above: their canonical form is the JSON the parsed
            // command serializes to (fixed field order, no whitespace).
            Command::Transfer { .. }
            | Command::Saga { .. }
            | Command::Step { .. }
            | Command::StepOutcome { .. } => {
                c.tag(19);
                let json = serde_json::to_vec(&self.command).unwrap_or_default();
                c.text_bytes(&json);
            }
        }
        match &self.apology_topic {
            None => c.tag(0),
            Some(t) => {
                c.tag(1);
                c.text(t.as_str());
            }
        }
        c.digest()
    }
}

/// The fingerprint of a message that could not be parsed: XXH3-128 of its
/// raw bytes, in a domain distinct from parsed requests.
pub fn raw_fingerprint(bytes: &[u8]) -> Fingerprint {
    let mut h = Xxh3::new();
    h.update(&[0xFF]);
    h.update(bytes);
    Fingerprint(h.digest128())
}
