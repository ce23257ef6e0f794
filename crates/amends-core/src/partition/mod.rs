//! The partition state machine.
//!
//! [`Machine::take`] takes one raw log message (a [`LogMessage`]: its
//! bytes, position, log time and reply subject) and the partition's state,
//! decodes it ([`crate::wire::decode_request`]) and returns what became of
//! it ([`Taken`]: the [`Answer`] for the sender, or a dead letter) while
//! pushing the durable [`Effect`]s (the outbox, dead letters included) into
//! a vector. It is a pure function of the state and the arguments:
//! replaying the same log from the same state gives the same answers,
//! effects and state. [`Machine::apply`] and [`Machine::apply_with_reply`]
//! are the same for a message decoded already.
//!
//! Order of work for every message: check the position advances, advance
//! log time (it never goes back), expire every pending hold whose expiry is
//! at or before the new log time, then decide the message. An unreadable
//! message (a dead letter) only moves the position and the log time.
//!
//! # Layout
//!
//! This module holds the entry points ([`Machine::take`],
//! [`Machine::apply`], [`Machine::apply_with_reply`]), the types they take
//! and give, and the order of work: the clock, the expiry index, the
//! checks of a request's envelope and route, and which concern decides it.
//! Each concern is a file of its own, written as methods of [`Machine`] or
//! of `Ctx` (one apply's state, position, log time and outbox):
//!
//! - `dedup.rs`: dedup records, the lookup of an op id decided before,
//!   the op id window.
//! - `balance.rs`: accounts, credits and debits, holds and their expiry,
//!   and the credit reservations of sagas.
//! - `claim.rs`: claims and releases, and the tentative claims of sagas.
//! - [`saga`]: the saga protocol (step ids and messages) and the saga side
//!   of the machine: start, steps, outcomes, cancels and compensations,
//!   deadlines.

use std::collections::VecDeque;
use std::convert::Infallible;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::command::{AccountId, Command, Phase, Request, Topic};
use crate::decision::{Decision, Outcome, Reason};
use crate::id::OpId;
use crate::route::{self, PartitionId, Partitions};
use crate::state::{Clock, Read, Write};
use crate::wire;

pub use crate::wire::Input;

mod balance;
mod claim;
mod dedup;
pub mod saga;

/// Default dedup retention: a day of log time, like common idempotency
/// windows. An op id can be resubmitted safely for this long.
pub const DEDUP_RETENTION_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;

/// Default tolerance for client clocks that run ahead of log time: an op id
/// whose UUID v7 timestamp is further in the future is refused.
pub const OP_ID_FUTURE_SKEW_MS_DEFAULT: u64 = 15 * 60 * 1000;

/// The label that derives a hold expiry event's id from the hold's id.
pub const EXPIRY_LABEL: &str = "expiry";

/// Settings of a partition that change decisions. Every process that
/// applies a partition's log (the service, `audit`, `rebuild`) must use the
/// same values, or replay would decide differently.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Config {
    /// How long (log time) a decided op id is remembered. Resubmitting an op
    /// id is safe within this window; older op ids are refused with
    /// `op_id_outside_window`, never applied twice.
    pub dedup_retention_ms: u64,
    /// How far ahead of log time an op id's timestamp may be.
    pub op_id_future_skew_ms: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            dedup_retention_ms: DEDUP_RETENTION_MS_DEFAULT,
            op_id_future_skew_ms: OP_ID_FUTURE_SKEW_MS_DEFAULT,
        }
    }
}

impl Config {
    /// The accepted op id timestamps at `log_time_ms`, inclusive.
    pub fn window(&self, log_time_ms: u64) -> (u64, u64) {
        (
            log_time_ms.saturating_sub(self.dedup_retention_ms),
            log_time_ms.saturating_add(self.op_id_future_skew_ms),
        )
    }

    /// Dedup records and resolved holds with a log time before this horizon
    /// may be forgotten at `log_time_ms`.
    ///
    /// Why it is safe: only op ids inside the window are recorded (a
    /// refusal outside it is answered to the sender and not recorded), so a
    /// recorded op id's timestamp `t` is at most `skew` after its decision's
    /// log time `d`. A record is forgotten only once `d` is before the
    /// horizon ([`crate::state::Dedup::is_compactable`], which also asks
    /// `t` to be), so `t < now - retention`: a resubmission of that op id is
    /// refused as outside the window, and never decided again, before the
    /// missing record could matter.
    pub fn compaction_horizon_ms(&self, log_time_ms: u64) -> u64 {
        log_time_ms
            .saturating_sub(self.dedup_retention_ms)
            .saturating_sub(self.op_id_future_skew_ms)
    }
}

/// What the sender of a message gets back.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Answer {
    /// A new decision (also pushed as [`Effect::Decided`]).
    Decided(Decision),
    /// The op id was decided before with the same body: the original
    /// decision, unchanged. Nothing is pushed to the outbox.
    Duplicate(Decision),
    /// The op id was decided before with a different body: this refusal
    /// (`op_id_conflict`) goes to the sender only. The original decision
    /// stands and nothing is recorded or pushed.
    Conflict(Decision),
    /// The op id cannot be deduplicated: it is not a UUID v7 (`malformed`)
    /// or its timestamp is outside the dedup window
    /// (`op_id_outside_window`). This refusal goes to the sender only:
    /// nothing is recorded or pushed, so memory stays bounded by the
    /// retention whatever ids clients send, and no op id is ever decided
    /// twice. A too-old id may have been decided before (its record is past
    /// the compaction horizon); a too-new one can be sent again once the
    /// client's clock is right. A step message (which amends writes
    /// itself) that fails its own checks, `wrong_partition` included, is
    /// refused this way too: it was forged.
    Refused(Decision),
    /// A tick: log time advanced, nothing to answer.
    Ticked,
    /// A saga (a `transfer` or `saga` request) was started: its decision
    /// is in flight (`outcome: in_flight`) and nothing is sent now. The
    /// final decision comes later, as [`Effect::Decided`] and
    /// [`Effect::Reply`] of the message that ends the saga.
    Accepted(Decision),
    /// A saga's step or step outcome, which amends wrote itself, was
    /// decided. Its decision is recorded (the status of its derived op id)
    /// but not published or sent.
    Internal(Decision),
}

impl Answer {
    /// The decision to send to the requester, if any.
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Answer::Decided(d)
            | Answer::Duplicate(d)
            | Answer::Conflict(d)
            | Answer::Refused(d) => Some(d),
            Answer::Ticked | Answer::Accepted(_) | Answer::Internal(_) => None,
        }
    }
}

/// An optimistic operation that was refused, published for a business
/// workflow on `<prefix>.apology.<topic>`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Apology {
    /// The topic the client named.
    pub topic: Topic,
    /// The command that was refused.
    pub command: Command,
    /// The refusal.
    pub decision: Decision,
}

/// A hold lapsed at its expiry: an event on the decisions stream, so nobody
/// has to poll to learn that a reservation ended.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldExpired {
    /// The event's own id, derived from the hold id with
    /// [`EXPIRY_LABEL`] (`"expiry"`; see [`OpId::derive`]).
    pub event_id: OpId,
    /// The hold (the op id of its `hold` request).
    pub hold: OpId,
    /// The account the hold was on.
    pub account: AccountId,
    /// The amount released.
    pub amount: i64,
    /// The partition.
    pub partition: u32,
    /// The position of the log message whose log time passed the expiry.
    pub position: u64,
    /// The log time at which the expiry was applied.
    pub log_time_ms: u64,
}

/// One message of a partition's request log as the log holds it: what
/// [`Machine::take`] takes. Everything in it is part of the log, so replay
/// gives the same answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LogMessage<'a> {
    /// The message's body, undecoded.
    pub bytes: &'a [u8],
    /// Its position (the log's sequence number).
    pub position: u64,
    /// Its log time (the log's timestamp), in milliseconds since the Unix
    /// epoch.
    pub log_time_ms: u64,
    /// The reply subject it named (`Amends-Reply-To`), if any.
    pub reply_to: Option<&'a str>,
}

/// What became of a log message taken by [`Machine::take`].
#[derive(Clone, PartialEq, Eq, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per message and taken apart at once, never stored: a box would cost an allocation per message"
)]
pub enum Taken {
    /// The message was read and applied.
    Applied {
        /// What it was read as.
        input: Input,
        /// What its sender gets back.
        answer: Answer,
    },
    /// The message could not be read (no readable op id): nobody can be
    /// answered. Its position and log time were taken, nothing else
    /// changed, and an [`Effect::DeadLetter`] was pushed.
    DeadLetter,
}

impl Taken {
    /// The decision to send to the requester, if any.
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Taken::Applied { answer, .. } => answer.decision(),
            Taken::DeadLetter => None,
        }
    }
}

/// A log message that could not be read, for the partition's dead-letter
/// subject: its raw bytes and what was wrong.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DeadLetter {
    /// The position of the message in the partition's log (what makes the
    /// dead letter's deterministic id).
    pub position: u64,
    /// What was wrong, for a human.
    pub detail: String,
    /// The message's bytes, unchanged.
    pub bytes: Vec<u8>,
}

/// A durable side effect of applying a message: the partition's outbox. A
/// driver runs effects only after the state that produced them is durable.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Effect {
    /// Publish a new decision (and send it to the requester, if waiting).
    Decided(Decision),
    /// Publish an apology.
    Apology(Apology),
    /// Publish a hold expiry event.
    HoldExpired(HoldExpired),
    /// Append `request` (a saga's step or step outcome) to the request log
    /// of `partition`, deduplicated by its op id.
    Send {
        /// The partition whose log gets the message.
        partition: PartitionId,
        /// The message.
        request: Request,
    },
    /// Send a saga's final decision to the reply subject of its request.
    /// Best effort, like every reply: the decision is also published with
    /// [`Effect::Decided`].
    Reply {
        /// The reply subject.
        to: String,
        /// The final decision.
        decision: Decision,
    },
    /// Put a message that could not be read on the dead-letter subject.
    DeadLetter(DeadLetter),
}

/// Why a message could not be applied: the log is broken, or the state
/// could not be read (`E` is the state's [`Read::Error`]; the default,
/// [`Infallible`], is a fault of the log alone, as with a [`MemState`]
/// state). Either way the driver must not commit the batch: deciding on a
/// broken log would contradict decisions already published, and a decision
/// made over state that could not be read may be wrong. A broken log stops
/// the partition loudly; a failed read stops the batch, which the driver
/// may retry on a fresh store handle.
///
/// [`MemState`]: crate::state::MemState
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Fault<E = Infallible> {
    /// A message's position is not after the last applied position: the
    /// log went backwards or a message was delivered twice past the store.
    #[error("log position {got} is not after the applied position {applied}")]
    PositionNotAdvancing {
        /// The last applied position.
        applied: u64,
        /// The position of the message.
        got: u64,
    },
    /// A read of the partition's state failed (the store's error). The
    /// state may hold part of the message's writes: the driver drops the
    /// whole batch.
    #[error("a read of the partition's state failed: {0}")]
    Read(#[source] E),
}

impl<E> Fault<E> {
    /// The fault of the log, or the read error: for a driver that reports
    /// the two apart.
    pub fn into_log_fault(self) -> Result<Fault, E> {
        match self {
            Fault::PositionNotAdvancing { applied, got } => {
                Ok(Fault::PositionNotAdvancing { applied, got })
            }
            Fault::Read(e) => Err(e),
        }
    }
}

/// The state machine of one partition.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Machine {
    partition: PartitionId,
    partitions: Partitions,
    config: Config,
}

/// What deciding an operation gives: its outcome, or why it has none (the
/// reason it is refused, or a failed read of a state whose error is `E`).
type Verdict<E> = Result<Outcome, NoOutcome<E>>;

/// Why deciding an operation gave no outcome.
enum NoOutcome<E> {
    /// The operation is refused: a decision like any other.
    Refused(Reason),
    /// A read of the state failed: nothing may be decided, and the apply
    /// stops with [`Fault::Read`].
    Read(E),
}

impl<E> From<Reason> for NoOutcome<E> {
    fn from(reason: Reason) -> NoOutcome<E> {
        NoOutcome::Refused(reason)
    }
}

impl<E> NoOutcome<E> {
    /// The outcome of a refused operation; the read error otherwise.
    fn into_rejected(self) -> Result<Outcome, E> {
        match self {
            NoOutcome::Refused(reason) => Ok(Outcome::Rejected { reason }),
            NoOutcome::Read(e) => Err(e),
        }
    }
}

/// The outcome of deciding an operation, a refusal included, or the read
/// error that stopped it.
fn outcome_of<E>(verdict: Verdict<E>) -> Result<Outcome, E> {
    verdict.or_else(NoOutcome::into_rejected)
}

/// What one [`Machine::apply_with_reply`] works on: the state, the message's
/// position and log time, and where its effects go. Every part of the
/// machine (dedup, balances, claims, sagas) takes it instead of a list of
/// arguments.
struct Ctx<'a, S: ?Sized> {
    /// The partition's state, read and written through.
    state: &'a mut S,
    /// The position of the message being applied.
    position: u64,
    /// The log time at which it is applied (never before the state's).
    now: u64,
    /// Dedup records, holds and sagas resolved before this log time count
    /// as gone ([`Config::compaction_horizon_ms`] of `now`).
    horizon_ms: u64,
    /// Saga messages for this partition, decided after the message.
    local: VecDeque<Request>,
    /// The outbox.
    out: &'a mut Vec<Effect>,
}

impl Machine {
    /// The machine of `partition`, one of `partitions` (the deployment's
    /// count, which places saga steps), with `config`.
    pub const fn new(partition: PartitionId, partitions: Partitions, config: Config) -> Machine {
        Machine {
            partition,
            partitions,
            config,
        }
    }

    /// The partition.
    pub const fn partition(&self) -> PartitionId {
        self.partition
    }

    /// The settings.
    pub const fn config(&self) -> &Config {
        &self.config
    }

    /// Takes one raw message of the partition's log: the one way a driver
    /// feeds the machine, so every driver (the worker, the audit) decodes,
    /// dead-letters and applies alike.
    ///
    /// A message that decodes ([`wire::decode_request`]) is applied as by
    /// [`Machine::apply_with_reply`] with its reply subject. One that does
    /// not (no readable op id) cannot be answered: its position and log
    /// time are taken as for any message, [`Effect::DeadLetter`] is pushed
    /// with its bytes and what was wrong, and nothing else changes (log
    /// time moving changes no decision: the next message moves it at least
    /// as far; it keeps the clock equal to the last message's time, which a
    /// driver compares with the log to notice a rollback). The errors are
    /// [`Machine::apply`]'s.
    pub fn take<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        message: &LogMessage<'_>,
        out: &mut Vec<Effect>,
    ) -> Result<Taken, Fault<S::Error>> {
        match wire::decode_request(message.bytes) {
            Ok(input) => {
                let answer = self.apply_with_reply(
                    state,
                    message.position,
                    message.log_time_ms,
                    &input,
                    message.reply_to,
                    out,
                )?;
                Ok(Taken::Applied { input, answer })
            }
            Err(unreadable) => {
                self.skip(state, message.position, message.log_time_ms)?;
                out.push(Effect::DeadLetter(DeadLetter {
                    position: message.position,
                    detail: unreadable.detail,
                    bytes: message.bytes.to_vec(),
                }));
                Ok(Taken::DeadLetter)
            }
        }
    }

    /// Applies one log message.
    ///
    /// `position` must be greater than the state's applied position;
    /// `log_time_ms` is the message's log time (a smaller value than the
    /// state's is taken as the state's: log time never goes back). On
    /// [`Fault::PositionNotAdvancing`], nothing was written; on
    /// [`Fault::Read`], `state` and `out` may hold part of the message's
    /// writes and effects, and nothing of the batch may be committed.
    pub fn apply<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        log_time_ms: u64,
        input: &Input,
        out: &mut Vec<Effect>,
    ) -> Result<Answer, Fault<S::Error>> {
        self.apply_with_reply(state, position, log_time_ms, input, None, out)
    }

    /// [`Machine::apply`] for a message that named a reply subject. A
    /// request whose subject is not valid
    /// ([`wire::reply_subject_is_valid`]) is refused with
    /// `reply_subject_invalid`; a saga remembers a valid one to send its
    /// final decision there ([`Effect::Reply`]). The subject is part of the
    /// log message, so replay stays deterministic.
    pub fn apply_with_reply<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        log_time_ms: u64,
        input: &Input,
        reply_to: Option<&str>,
        out: &mut Vec<Effect>,
    ) -> Result<Answer, Fault<S::Error>> {
        let clock = state.clock().map_err(Fault::Read)?;
        if position <= clock.position {
            return Err(Fault::PositionNotAdvancing {
                applied: clock.position,
                got: position,
            });
        }
        let now = clock.log_time_ms.max(log_time_ms);
        state.set_clock(Clock {
            position,
            log_time_ms: now,
        });
        let mut cx = Ctx {
            state,
            position,
            now,
            // Records past the compaction horizon count as gone whether or
            // not a compactor has removed them yet, so when compaction runs
            // never changes a decision: replay and audit decide exactly the
            // same.
            horizon_ms: self.config.compaction_horizon_ms(now),
            // Saga messages for this same partition are decided right here,
            // in this message, rather than through the log: fewer appends,
            // same decisions (they are deterministic in the state either
            // way).
            local: VecDeque::new(),
            out,
        };
        self.expire(&mut cx).map_err(Fault::Read)?;
        let answer = self.decide(&mut cx, input, reply_to).map_err(Fault::Read)?;
        // This ends: every message to self has an op id derived from its
        // saga's and is decided once (a repeat is a duplicate and sends
        // nothing), and a saga sends a bounded number of them (a try, an
        // outcome and a confirm or cancel per step), however many sagas
        // one message ends (expiries).
        while let Some(request) = cx.local.pop_front() {
            let input = Input::Request(request);
            self.decide(&mut cx, &input, None).map_err(Fault::Read)?;
        }
        Ok(answer)
    }

    /// Moves the applied position past a message that cannot be read and
    /// its log time to the message's, and changes nothing else: such a
    /// message is not applied, but the partition must not read it again
    /// (see [`Machine::take`]).
    fn skip<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        log_time_ms: u64,
    ) -> Result<(), Fault<S::Error>> {
        let clock = state.clock().map_err(Fault::Read)?;
        if position <= clock.position {
            return Err(Fault::PositionNotAdvancing {
                applied: clock.position,
                got: position,
            });
        }
        state.set_clock(Clock {
            position,
            log_time_ms: clock.log_time_ms.max(log_time_ms),
        });
        Ok(())
    }

    /// Decides one message (after the clock and expiries): the body of
    /// [`Machine::apply_with_reply`].
    fn decide<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        input: &Input,
        reply_to: Option<&str>,
    ) -> Result<Answer, S::Error> {
        let (op_id, fingerprint) = match input {
            Input::Request(Request {
                command: Command::Tick {},
                ..
            }) => return Ok(Answer::Ticked),
            Input::Request(req) => (req.op_id, req.fingerprint()),
            Input::Malformed {
                op_id, fingerprint, ..
            } => (*op_id, *fingerprint),
        };
        if let Some(answer) = self.seen(cx, op_id, fingerprint, reply_to)? {
            return Ok(answer);
        }

        // The op id is checked before anything is recorded. A record of an
        // op id that is not v7 or outside the window would be useless (no
        // timestamp bounds it; a too-old id can never be valid again) or
        // would have to outlive any retention (a too-new id), so these
        // refusals go to the sender only and memory stays bounded.
        let checked = match input {
            Input::Request(req) if req.command.is_internal() => self.check_internal(req, cx.now),
            _ => self.check_op_id(op_id, cx.now),
        };
        if let Err(reason) = checked {
            let refused = self.decision(cx, op_id, Outcome::Rejected { reason });
            return Ok(Answer::Refused(refused));
        }
        let outcome = match input {
            Input::Malformed { detail, .. } => Outcome::Rejected {
                reason: Reason::Malformed {
                    detail: detail.clone(),
                },
            },
            // Saga messages, which amends writes itself (`check_internal`
            // checked their envelope): their decisions are recorded, not
            // published.
            Input::Request(Request {
                op_id: step_id,
                command:
                    Command::Step {
                        saga,
                        index,
                        phase,
                        step,
                    },
                ..
            }) => {
                let outcome = outcome_of(self.step(cx, *step_id, *saga, *index, *phase, step))?;
                if *phase == Phase::Try {
                    self.send_outcome(cx, *saga, *index, outcome.clone());
                }
                return Ok(self.internal(cx, op_id, fingerprint, outcome));
            }
            Input::Request(Request {
                command:
                    Command::StepOutcome {
                        saga,
                        index,
                        outcome,
                    },
                ..
            }) => {
                self.on_outcome(cx, *saga, *index, outcome)?;
                return Ok(self.internal(cx, op_id, fingerprint, Outcome::confirmed()));
            }
            Input::Request(req) => match self.check_envelope(req, reply_to) {
                Err(reason) => Outcome::Rejected { reason },
                Ok(())
                    if matches!(req.command, Command::Transfer { .. } | Command::Saga { .. }) =>
                {
                    let d = self.start_saga(cx, req, fingerprint, reply_to);
                    return Ok(Answer::Accepted(d));
                }
                Ok(()) => outcome_of(cx.execute(req))?,
            },
        };
        let decision = self.decision(cx, op_id, outcome);
        cx.record(op_id, fingerprint, decision.clone());
        if let (Input::Request(req), Outcome::Rejected { .. }) = (input, &decision.outcome)
            && let Some(topic) = &req.apology_topic
        {
            cx.out.push(Effect::Apology(Apology {
                topic: topic.clone(),
                command: req.command.clone(),
                decision: decision.clone(),
            }));
        }
        cx.out.push(Effect::Decided(decision.clone()));
        Ok(Answer::Decided(decision))
    }

    /// The decision on `op_id` with `outcome`, made by the message being
    /// applied.
    fn decision<S: ?Sized>(&self, cx: &Ctx<'_, S>, op_id: OpId, outcome: Outcome) -> Decision {
        Decision::new(op_id, self.partition.get(), cx.position, cx.now, outcome)
    }

    /// Checks what a client request came with besides its body: the reply
    /// subject it named, then the partition it was published on. These
    /// refusals are decisions like the command's own (recorded, published).
    fn check_envelope(&self, req: &Request, reply_to: Option<&str>) -> Result<(), Reason> {
        if reply_to.is_some_and(|r| !wire::reply_subject_is_valid(r)) {
            return Err(Reason::ReplySubjectInvalid {
                bytes_max: wire::REPLY_SUBJECT_BYTES_MAX,
            });
        }
        self.check_route(req)
    }

    /// Refuses a request whose routing key another partition owns: deciding
    /// it here would let one key (a claim, an account) live on two
    /// partitions. A tick has no key and goes anywhere.
    fn check_route(&self, req: &Request) -> Result<(), Reason> {
        let Some(key) = req.routing_key() else {
            return Ok(());
        };
        let owner = route::partition_of(&key, self.partitions);
        if owner == self.partition {
            Ok(())
        } else {
            Err(Reason::WrongPartition {
                partition: owner.get(),
            })
        }
    }

    /// Expires every pending hold and cancels every saga in flight whose
    /// time (expiry, deadline) is at or before the log time.
    fn expire<S: Read + Write + ?Sized>(&self, cx: &mut Ctx<'_, S>) -> Result<(), S::Error> {
        // The cursor makes a mass expiry linear: entries before it were
        // just removed, and an overlay would otherwise step past each again.
        let mut cursor = None;
        while let Some(key) = cx.state.expiry_after(cursor)? {
            cursor = Some(key);
            if key.at_ms > cx.now {
                break;
            }
            let hold = cx.state.hold(key.id)?;
            if hold.is_none()
                && let Some(s) = cx.state.saga(key.id)?
            {
                self.expire_saga(cx, key.id, s)?;
                continue;
            }
            self.expire_hold(cx, key, hold)?;
        }
        Ok(())
    }
}

impl<S: Read + Write + ?Sized> Ctx<'_, S> {
    /// Decides the plain operation `req` (not a tick, a saga or a saga
    /// message).
    fn execute(&mut self, req: &Request) -> Verdict<S::Error> {
        match &req.command {
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            } => self.open_account(account, *floor, *ceiling),
            Command::Credit {
                account: id,
                amount,
            } => self.credit(id, *amount),
            Command::Debit {
                account: id,
                amount,
            } => self.debit(id, *amount),
            Command::Hold {
                account: id,
                amount,
                timeout_ms,
            } => self.new_hold(req.op_id, id, *amount, *timeout_ms),
            Command::Post {
                account: id,
                hold: hold_id,
                amount,
            } => self.post(id, *hold_id, *amount, false),
            Command::Void {
                account: id,
                hold: hold_id,
            } => self.void(id, *hold_id, false),
            Command::Claim {
                namespace,
                key,
                owner,
            } => self.claim(namespace, key, owner),
            Command::Release {
                namespace,
                key,
                owner,
            } => self.release(namespace, key, owner),
            // Ticks return before dedup, and sagas and saga messages are
            // decided by `decide` before `execute` is reached.
            Command::Tick {}
            | Command::Transfer { .. }
            | Command::Saga { .. }
            | Command::Step { .. }
            | Command::StepOutcome { .. } => Ok(Outcome::confirmed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Account, Claim, Dedup, ExpiryKey, Hold, MemState, Saga};

    /// A read that fails, as a store's would.
    #[derive(Debug, thiserror::Error)]
    #[error("the disk is gone")]
    struct Gone;

    /// A state in memory whose account reads fail.
    struct AccountsUnreadable(MemState);

    impl Read for AccountsUnreadable {
        type Error = Gone;
        fn account(&self, _: &str) -> Result<Option<Account>, Gone> {
            Err(Gone)
        }
        fn hold(&self, id: OpId) -> Result<Option<Hold>, Gone> {
            Ok(self.0.hold(id))
        }
        fn claim(&self, key: &str) -> Result<Option<Claim>, Gone> {
            Ok(self.0.claim(key))
        }
        fn dedup(&self, op: OpId) -> Result<Option<Dedup>, Gone> {
            Ok(self.0.dedup(op))
        }
        fn saga(&self, id: OpId) -> Result<Option<Saga>, Gone> {
            Ok(self.0.saga(id))
        }
        fn expiry_after(&self, after: Option<ExpiryKey>) -> Result<Option<ExpiryKey>, Gone> {
            Ok(self.0.expiry_after(after))
        }
        fn clock(&self) -> Result<Clock, Gone> {
            Ok(self.0.clock())
        }
    }

    impl Write for AccountsUnreadable {
        fn put_account(&mut self, id: &AccountId, account: Account) {
            self.0.put_account(id, account);
        }
        fn put_hold(&mut self, id: OpId, hold: Hold) {
            self.0.put_hold(id, hold);
        }
        fn put_claim(&mut self, key: &str, claim: Option<Claim>) {
            self.0.put_claim(key, claim);
        }
        fn put_dedup(&mut self, op: OpId, dedup: Dedup) {
            self.0.put_dedup(op, dedup);
        }
        fn put_saga(&mut self, id: OpId, saga: Saga) {
            self.0.put_saga(id, saga);
        }
        fn put_expiry(&mut self, key: ExpiryKey, present: bool) {
            self.0.put_expiry(key, present);
        }
        fn set_clock(&mut self, clock: Clock) {
            self.0.set_clock(clock);
        }
    }

    #[test]
    fn a_failed_read_stops_the_apply_with_the_error_and_no_decision() {
        // Proves a read that fails is not taken as "not found": opening an account whose read fails returns Fault::Read with the state's error, pushes no effect and records no decision, while a message that reads no account is applied as usual.
        let partitions = Partitions::new(1).expect("a count");
        let machine = Machine::new(
            partitions.id(0).expect("an id"),
            partitions,
            Config::default(),
        );
        let now = 1_700_000_000_000;
        let open = Input::Request(Request {
            op_id: OpId::v7_from_parts(now, 1),
            command: Command::OpenAccount {
                account: AccountId::new("a").expect("an account id"),
                floor: 0,
                ceiling: None,
            },
            apology_topic: None,
        });
        let mut state = AccountsUnreadable(MemState::new());
        let mut out = Vec::new();
        let got = machine.apply(&mut state, 1, now, &open, &mut out);
        assert!(matches!(got, Err(Fault::Read(Gone))), "{got:?}");
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(state.0.dedups().count(), 0, "nothing was decided");

        let tick = Input::Request(Request {
            op_id: OpId::v7_from_parts(now, 2),
            command: Command::Tick {},
            apology_topic: None,
        });
        let got = machine.apply(&mut state, 2, now, &tick, &mut out);
        assert!(matches!(got, Ok(Answer::Ticked)), "{got:?}");
    }
}
