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

use crate::decision::{Outcome, Reason};
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
/// parsed request (so JSON key order and whitespace do not matter), sagas
/// and their step messages included: no part of it goes through serde, so
/// a change in how a command serializes never turns a resubmission into a
/// conflict. It is stored in dedup records (and a saga's is made again
/// from its saga record when the saga ends), so the encoding is part of
/// the store format: a change to it needs a new store format version.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Fingerprint(pub u128);

/// The longest canonical encoding of a valid plain request, in bytes: the
/// version tag and op id, the largest plain command (a claim or release: a
/// tag and three length-prefixed texts at their limits), and a
/// length-prefixed apology topic. [`Canon`] encodes into a stack buffer of
/// this size, so fingerprinting the common operations does not allocate;
/// a saga or a step message, which carries whole commands, may be longer
/// and spills to the heap.
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
    /// The whole encoding once it outgrew `buf`: a saga or step message
    /// with long steps (a plain request within the limits always fits in
    /// `buf`). It also keeps the fingerprint total rather than a panic.
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
    /// The length of a list (a saga's steps).
    fn len(&mut self, n: usize) {
        self.u64(u64::try_from(n).unwrap_or(u64::MAX));
    }
    #[inline(always)]
    fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.tag(0),
            Some(v) => {
                self.tag(1);
                self.i64(v);
            }
        }
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
    /// The encoding so far.
    fn as_bytes(&self) -> &[u8] {
        match self.buf.get(..self.len) {
            Some(b) => b,
            None => &self.spill[..],
        }
    }
    fn digest(&self) -> Fingerprint {
        Fingerprint(xxh3_128(self.as_bytes()))
    }
}

impl Request {
    /// The canonical fingerprint of this request (op id included).
    pub fn fingerprint(&self) -> Fingerprint {
        let mut c = Canon::new();
        c.request(self);
        c.digest()
    }
}

/// The canonical encoding, part by part. Every command has a tag of its
/// own (10 to 18 the plain operations, 20 to 23 the sagas and their
/// messages); tag 19 was the JSON form of the sagas (store formats 2 and
/// 3) and is never written again. A saga's encoding holds its steps' commands in the
/// same encoding as the plain operations, so no part of any request's
/// fingerprint depends on how serde lays it out.
impl Canon {
    fn request(&mut self, r: &Request) {
        self.tag(1); // Encoding version.
        self.id(r.op_id);
        self.command(&r.command);
        match &r.apology_topic {
            None => self.tag(0),
            Some(t) => {
                self.tag(1);
                self.text(t.as_str());
            }
        }
    }

    fn command(&mut self, command: &Command) {
        match command {
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            } => {
                self.tag(10);
                self.text(account.as_str());
                self.i64(*floor);
                self.opt_i64(*ceiling);
            }
            Command::Credit { account, amount } => {
                self.tag(11);
                self.text(account.as_str());
                self.u64(amount.get());
            }
            Command::Debit { account, amount } => {
                self.tag(12);
                self.text(account.as_str());
                self.u64(amount.get());
            }
            Command::Hold {
                account,
                amount,
                timeout_ms,
            } => {
                self.tag(13);
                self.text(account.as_str());
                self.u64(amount.get());
                self.opt_u64(*timeout_ms);
            }
            Command::Post {
                account,
                hold,
                amount,
            } => {
                self.tag(14);
                self.text(account.as_str());
                self.id(*hold);
                self.opt_u64(amount.map(Amount::get));
            }
            Command::Void { account, hold } => {
                self.tag(15);
                self.text(account.as_str());
                self.id(*hold);
            }
            Command::Claim {
                namespace,
                key,
                owner,
            } => {
                self.tag(16);
                self.text(namespace.as_str());
                self.text(key.as_str());
                self.text(owner.as_str());
            }
            Command::Release {
                namespace,
                key,
                owner,
            } => {
                self.tag(17);
                self.text(namespace.as_str());
                self.text(key.as_str());
                self.text(owner.as_str());
            }
            Command::Tick {} => self.tag(18),
            Command::Transfer {
                from,
                to,
                amount,
                deadline_ms,
            } => {
                self.tag(20);
                self.text(from.as_str());
                self.text(to.as_str());
                self.u64(amount.get());
                self.opt_u64(deadline_ms.map(DeadlineMs::get));
            }
            Command::Saga { steps, deadline_ms } => {
                self.tag(21);
                self.len(steps.as_slice().len());
                for step in steps.as_slice() {
                    self.step(step);
                }
                self.opt_u64(deadline_ms.map(DeadlineMs::get));
            }
            Command::Step {
                saga,
                index,
                phase,
                step,
            } => {
                self.tag(22);
                self.id(*saga);
                self.u64(u64::from(*index));
                self.tag(match phase {
                    Phase::Try => 0,
                    Phase::Confirm => 1,
                    Phase::Cancel => 2,
                });
                self.step(step);
            }
            Command::StepOutcome {
                saga,
                index,
                outcome,
            } => {
                self.tag(23);
                self.id(*saga);
                self.u64(u64::from(*index));
                self.outcome(outcome);
            }
        }
    }

    fn step(&mut self, step: &SagaStep) {
        self.command(&step.command);
        match &step.compensation {
            None => self.tag(0),
            Some(c) => {
                self.tag(1);
                self.command(c);
            }
        }
    }

    fn outcome(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Confirmed { balance, available } => {
                self.tag(0);
                self.opt_i64(*balance);
                self.opt_i64(*available);
            }
            Outcome::Rejected { reason } => {
                self.tag(1);
                self.reason(reason);
            }
            Outcome::InFlight { step } => {
                self.tag(2);
                self.u64(u64::from(*step));
            }
        }
    }

    /// A reason: its stable code (so the encoding does not follow the
    /// order of the enum), then its fields in declaration order.
    fn reason(&mut self, reason: &Reason) {
        self.text(reason.code());
        match reason {
            Reason::OpIdConflict
            | Reason::UnknownAccount
            | Reason::AccountExists
            | Reason::HoldNotFound
            | Reason::HoldAlreadyPosted
            | Reason::HoldAlreadyVoided
            | Reason::HoldExpired
            | Reason::Overflow
            | Reason::NotClaimed
            | Reason::ClaimPending
            | Reason::SagaCancelled => {}
            Reason::OpIdOutsideWindow {
                op_time_ms,
                earliest_ms,
                latest_ms,
            } => {
                self.u64(*op_time_ms);
                self.u64(*earliest_ms);
                self.u64(*latest_ms);
            }
            Reason::Malformed { detail } => self.text(detail),
            Reason::ReplySubjectInvalid { bytes_max } => self.u64(u64::from(*bytes_max)),
            Reason::WrongPartition { partition } => self.u64(u64::from(*partition)),
            Reason::InvalidLimits { floor, ceiling } => {
                self.i64(*floor);
                self.opt_i64(*ceiling);
            }
            Reason::PostExceedsHold { held, requested } => {
                self.i64(*held);
                self.u64(*requested);
            }
            Reason::InsufficientFunds {
                available,
                floor,
                requested,
            } => {
                self.i64(*available);
                self.i64(*floor);
                self.u64(*requested);
            }
            Reason::CeilingExceeded {
                balance,
                ceiling,
                requested,
            } => {
                self.i64(*balance);
                self.i64(*ceiling);
                self.u64(*requested);
            }
            Reason::AlreadyClaimed { owner } | Reason::NotOwner { owner } => {
                self.text(owner.as_str());
            }
            Reason::StepRefused { step, reason } => {
                self.u64(u64::from(*step));
                self.reason(reason);
            }
            Reason::DeadlineExceeded { deadline_ms } => self.u64(*deadline_ms),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn op(n: u128) -> OpId {
        OpId::v7_from_parts(1_700_000_000_000, n)
    }

    fn request(n: u128, command: serde_json::Value) -> Request {
        serde_json::from_value(serde_json::json!({"op_id": op(n), "command": command}))
            .expect("a valid request")
    }

    fn canonical(r: &Request) -> Vec<u8> {
        let mut c = Canon::new();
        c.request(r);
        c.as_bytes().to_vec()
    }

    /// One request of every command kind, the saga family with every
    /// optional part present.
    fn every_kind() -> Vec<Request> {
        use serde_json::json;
        let step = json!({"command": {"type": "release", "namespace": "seat", "key": "7", "owner": "o"},
                          "compensation": {"type": "claim", "namespace": "seat", "key": "7", "owner": "o"}});
        vec![
            request(
                1,
                json!({"type": "open_account", "account": "a", "floor": -5, "ceiling": 9}),
            ),
            request(2, json!({"type": "credit", "account": "a", "amount": 3})),
            request(3, json!({"type": "debit", "account": "a", "amount": 3})),
            request(
                4,
                json!({"type": "hold", "account": "a", "amount": 3, "timeout_ms": 10}),
            ),
            request(
                5,
                json!({"type": "post", "account": "a", "hold": op(4), "amount": 2}),
            ),
            request(6, json!({"type": "void", "account": "a", "hold": op(4)})),
            request(
                7,
                json!({"type": "claim", "namespace": "seat", "key": "7", "owner": "o"}),
            ),
            request(
                8,
                json!({"type": "release", "namespace": "seat", "key": "7", "owner": "o"}),
            ),
            request(9, json!({"type": "tick"})),
            request(
                10,
                json!({"type": "transfer", "from": "a", "to": "b", "amount": 5, "deadline_ms": 60}),
            ),
            request(
                11,
                json!({"type": "saga", "deadline_ms": 60, "steps": [
                {"command": {"type": "debit", "account": "a", "amount": 5}}, step.clone()]}),
            ),
            request(
                12,
                json!({"type": "step", "saga": op(11), "index": 1, "phase": "cancel", "step": step}),
            ),
            request(
                13,
                json!({"type": "step_outcome", "saga": op(11), "index": 0, "outcome": {
                "outcome": "rejected", "reason": {"code": "step_refused", "step": 2, "reason": {
                    "code": "insufficient_funds", "available": -1, "floor": 0, "requested": 5}}}}),
            ),
        ]
    }

    #[test]
    fn fingerprints_are_pinned() {
        // Proves the fingerprint of every command kind, sagas and their messages included, is the one store format 4 expects: fingerprints are kept in dedup records, so a change here needs a new store FORMAT_VERSION (amends-store) or a resubmission after an upgrade would be refused op_id_conflict.
        // The first nine (the plain operations) are those of formats 2
        // and 3: only the saga family's encoding changed in format 4.
        let want: [u128; 13] = [
            0x2ed8dde932b0fea99a72babc7ed0ce6b,
            0xc4dc15662e17ddf9d4b4fb64a205d622,
            0x72c29e9c3a2b58349243bea58dd272da,
            0x7ea65bf4b21dcd5a9ad0991c4954c08e,
            0xc50f14042641aab5cdc38932060c6b6e,
            0x55a454abac136ae25086568d47980737,
            0x1ef7fdc69c7f09e1bd62b2e7e0a22030,
            0x925a1715b86f6a1cb8d2a8a770a0ceb1,
            0x3ce4509a075d5faa45d7c1e2913caddc,
            0xa6fd74ca224f25bc2ea69e33e18c5a83,
            0x61c7d95980bf05227b285e947d421bd6,
            0xd4032bb7b87fccce05b942d6dd35c245,
            0xc66f5e4c414605d5cddc0e319616a277,
        ];
        let got: Vec<u128> = every_kind().iter().map(|r| r.fingerprint().0).collect();
        assert_eq!(got, want, "{got:#x?}");
    }

    #[test]
    fn a_transfers_canonical_bytes_are_pinned() {
        // Proves a saga's canonical encoding is the tagged, length-prefixed form of its fields, not the JSON serde writes: version 1, the op id, tag 20, both account ids with their lengths, the amount, the deadline, no apology topic.
        let r = request(
            10,
            serde_json::json!({"type": "transfer", "from": "a", "to": "bc", "amount": 5, "deadline_ms": 60}),
        );
        let mut want = vec![1];
        want.extend_from_slice(op(10).0.as_bytes());
        want.push(20);
        want.extend_from_slice(&1u64.to_le_bytes());
        want.push(b'a');
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(b"bc");
        want.extend_from_slice(&5u64.to_le_bytes());
        want.push(1);
        want.extend_from_slice(&60u64.to_le_bytes());
        want.push(0);
        assert_eq!(canonical(&r), want);
    }

    #[test]
    fn a_step_carries_its_command_in_the_plain_encoding() {
        // Proves a saga step's command is encoded exactly as the same command sent alone (after the request's version tag and op id), so one encoding serves both.
        let plain = request(
            8,
            serde_json::json!({"type": "release", "namespace": "seat", "key": "7", "owner": "o"}),
        );
        let alone = canonical(&plain);
        let command_bytes = &alone[17..alone.len() - 1];
        let kinds = every_kind();
        let step = canonical(&kinds[11]);
        assert!(
            step.windows(command_bytes.len())
                .any(|w| w == command_bytes),
            "the step's bytes hold the release's"
        );
    }

    #[test]
    fn every_field_of_a_saga_changes_its_fingerprint() {
        // Proves the saga family's fingerprints tell apart requests that differ in one field only (a step's compensation, a phase, an index, a deadline, a reason's detail), so a changed body is a conflict, never a duplicate.
        use serde_json::json;
        let comp = |owner: &str| {
            json!({"command": {"type": "release", "namespace": "seat", "key": "7", "owner": "o"},
                          "compensation": {"type": "claim", "namespace": "seat", "key": "7", "owner": owner}})
        };
        let bodies = [
            json!({"type": "transfer", "from": "a", "to": "b", "amount": 5}),
            json!({"type": "transfer", "from": "a", "to": "b", "amount": 5, "deadline_ms": 60}),
            json!({"type": "transfer", "from": "b", "to": "a", "amount": 5}),
            json!({"type": "saga", "steps": [comp("o")]}),
            json!({"type": "saga", "steps": [{"command": {"type": "release", "namespace": "seat", "key": "7", "owner": "o"}}]}),
            json!({"type": "saga", "steps": [comp("o"), comp("o")]}),
            json!({"type": "saga", "steps": [comp("p")]}),
            json!({"type": "step", "saga": op(1), "index": 0, "phase": "try", "step": comp("o")}),
            json!({"type": "step", "saga": op(1), "index": 0, "phase": "cancel", "step": comp("o")}),
            json!({"type": "step", "saga": op(1), "index": 1, "phase": "try", "step": comp("o")}),
            json!({"type": "step", "saga": op(2), "index": 0, "phase": "try", "step": comp("o")}),
            json!({"type": "step_outcome", "saga": op(1), "index": 0, "outcome": {"outcome": "confirmed"}}),
            json!({"type": "step_outcome", "saga": op(1), "index": 0, "outcome": {"outcome": "confirmed", "balance": 0}}),
            json!({"type": "step_outcome", "saga": op(1), "index": 0, "outcome": {"outcome": "in_flight", "step": 0}}),
            json!({"type": "step_outcome", "saga": op(1), "index": 0, "outcome": {"outcome": "rejected", "reason": {"code": "malformed", "detail": "x"}}}),
            json!({"type": "step_outcome", "saga": op(1), "index": 0, "outcome": {"outcome": "rejected", "reason": {"code": "malformed", "detail": "y"}}}),
            json!({"type": "step_outcome", "saga": op(1), "index": 0, "outcome": {"outcome": "rejected", "reason": {"code": "saga_cancelled"}}}),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for body in bodies {
            assert!(
                seen.insert(request(1, body.clone()).fingerprint().0),
                "{body}"
            );
        }
    }
}
