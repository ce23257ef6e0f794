//! The partition state machine.
//!
//! [`Machine::apply`] takes one log message (its position, its log time and
//! its decoded [`Input`]) and the partition's state, and returns the
//! [`Answer`] for the sender while pushing the durable [`Effect`]s (the
//! outbox) into a vector. It is a pure function of the state and the
//! arguments: replaying the same log from the same state gives the same
//! answers, effects and state.
//!
//! Order of work for every message: check the position advances, advance
//! log time (it never goes back), expire every pending hold whose expiry is
//! at or before the new log time, then decide the message.

use serde::{Deserialize, Serialize};

use schemars::JsonSchema;

use std::collections::VecDeque;

use crate::command::{
    AccountId, Amount, CLAIM_KEY_BYTES_MAX, ClaimKey, Command, Fingerprint, NAMESPACE_BYTES_MAX,
    Namespace, Owner, Phase, Request, SAGA_STEPS_MAX, SagaStep, Topic,
};
use crate::decision::{Decision, Outcome, Reason};
use crate::id::OpId;
use crate::route::{self, PartitionId, Partitions};
use crate::saga;
use crate::state::{
    Account, Claim, Clock, Dedup, ExpiryKey, Hold, HoldStatus, Read, Saga, SagaState, Write,
};
use crate::wire;

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

pub use crate::wire::Input;

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
}

/// A broken log, found while applying. The driver must stop the partition
/// loudly: deciding on would contradict decisions already published.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Fault {
    /// A message's position is not after the last applied position: the
    /// log went backwards or a message was delivered twice past the store.
    #[error("log position {got} is not after the applied position {applied}")]
    PositionNotAdvancing {
        /// The last applied position.
        applied: u64,
        /// The position of the message.
        got: u64,
    },
}

/// The state machine of one partition.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Machine {
    partition: PartitionId,
    partitions: Partitions,
    config: Config,
}

type Decided = Result<Outcome, Reason>;

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

    /// Applies one log message.
    ///
    /// `position` must be greater than the state's applied position;
    /// `log_time_ms` is the message's log time (a smaller value than the
    /// state's is taken as the state's: log time never goes back). On
    /// `Err`, nothing was written.
    pub fn apply<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        log_time_ms: u64,
        input: &Input,
        out: &mut Vec<Effect>,
    ) -> Result<Answer, Fault> {
        self.apply_with_reply(state, position, log_time_ms, input, None, out)
    }

    /// Moves the applied position past a message that cannot be read (a
    /// dead letter, see [`crate::wire::decode_request`]) and its log time
    /// to the message's, as for any message, and changes nothing else: such
    /// a message is not applied, but the partition must not read it again.
    /// (Log time moving here changes no decision: the next message moves it
    /// at least as far. It keeps the clock equal to the last message's
    /// time, which the driver compares with the log to notice a rollback.)
    pub fn skip<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        log_time_ms: u64,
    ) -> Result<(), Fault> {
        let clock = state.clock();
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
    ) -> Result<Answer, Fault> {
        let clock = state.clock();
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
        // Saga messages for this same partition are decided right here, in
        // this message, rather than through the log: fewer appends, same
        // decisions (they are deterministic in the state either way).
        let mut local = VecDeque::new();
        self.expire(state, position, now, out, &mut local);
        let answer = self.decide(state, position, now, input, reply_to, out, &mut local);
        // This ends: every message to self has an op id derived from its
        // saga's and is decided once (a repeat is a duplicate and sends
        // nothing), and a saga sends a bounded number of them (a try, an
        // outcome and a confirm or cancel per step), however many sagas
        // one message ends (expiries).
        while let Some(request) = local.pop_front() {
            let input = Input::Request(request);
            self.decide(state, position, now, &input, None, out, &mut local);
        }
        Ok(answer)
    }

    /// Decides one message (after the clock and expiries): the body of
    /// [`Machine::apply_with_reply`].
    #[allow(clippy::too_many_arguments)]
    fn decide<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        now: u64,
        input: &Input,
        reply_to: Option<&str>,
        out: &mut Vec<Effect>,
        local: &mut VecDeque<Request>,
    ) -> Answer {
        let (op_id, fingerprint) = match input {
            Input::Request(Request {
                command: Command::Tick {},
                ..
            }) => return Answer::Ticked,
            Input::Request(req) => (req.op_id, req.fingerprint()),
            Input::Malformed {
                op_id, fingerprint, ..
            } => (*op_id, *fingerprint),
        };
        let decision = |outcome| Decision {
            op_id,
            partition: self.partition.get(),
            position,
            log_time_ms: now,
            outcome,
        };
        // Records past the compaction horizon count as gone whether or not a
        // compactor has removed them yet, so when compaction runs never
        // changes a decision: replay and audit decide exactly the same.
        let horizon_ms = self.config.compaction_horizon_ms(now);
        let seen = state.dedup(op_id).filter(|d| !d.is_compactable(horizon_ms));
        if let Some(seen) = seen {
            if seen.fingerprint != fingerprint {
                return Answer::Conflict(decision(Outcome::Rejected {
                    reason: Reason::OpIdConflict,
                }));
            }
            // A resubmitted saga still in flight: its final decision goes to
            // the latest reply subject (the first requester may be gone).
            // An invalid subject is not kept (nothing could be sent to it).
            let valid_reply_to = reply_to.filter(|r| wire::reply_subject_is_valid(r));
            if let (false, Some(to)) = (seen.decision.outcome.is_final(), valid_reply_to)
                && let Some(mut s) = state.saga(op_id)
                && s.reply_to.as_deref() != Some(to)
            {
                s.reply_to = Some(to.to_owned());
                state.put_saga(op_id, s);
            }
            return Answer::Duplicate(seen.decision);
        }

        // The op id is checked before anything is recorded. A record of an
        // op id that is not v7 or outside the window would be useless (no
        // timestamp bounds it; a too-old id can never be valid again) or
        // would have to outlive any retention (a too-new id), so these
        // refusals go to the sender only and memory stays bounded.
        let checked = match input {
            Input::Request(req) if req.command.is_internal() => self.check_internal(req, now),
            _ => self.check_op_id(op_id, now),
        };
        if let Err(reason) = checked {
            return Answer::Refused(decision(Outcome::Rejected { reason }));
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
                let outcome = match self.step(
                    state, *step_id, *saga, *index, *phase, step, now, horizon_ms,
                ) {
                    Ok(outcome) => outcome,
                    Err(reason) => Outcome::Rejected { reason },
                };
                if *phase == Phase::Try {
                    self.send_outcome(*saga, *index, outcome.clone(), local, out);
                }
                return internal(state, op_id, fingerprint, decision(outcome));
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
                self.on_outcome(
                    state, *saga, *index, outcome, position, now, horizon_ms, local, out,
                );
                return internal(state, op_id, fingerprint, decision(Outcome::confirmed()));
            }
            Input::Request(req) => match self.check_envelope(req, reply_to) {
                Err(reason) => Outcome::Rejected { reason },
                Ok(())
                    if matches!(req.command, Command::Transfer { .. } | Command::Saga { .. }) =>
                {
                    let d = self.start_saga(
                        state,
                        req,
                        fingerprint,
                        position,
                        now,
                        reply_to,
                        local,
                        out,
                    );
                    return Answer::Accepted(d);
                }
                Ok(()) => match self.execute(state, req, now, horizon_ms) {
                    Ok(outcome) => outcome,
                    Err(reason) => Outcome::Rejected { reason },
                },
            },
        };
        let decision = decision(outcome);
        state.put_dedup(
            op_id,
            Dedup {
                fingerprint,
                decision: decision.clone(),
            },
        );
        if let (Input::Request(req), Outcome::Rejected { .. }) = (input, &decision.outcome)
            && let Some(topic) = &req.apology_topic
        {
            out.push(Effect::Apology(Apology {
                topic: topic.clone(),
                command: req.command.clone(),
                decision: decision.clone(),
            }));
        }
        out.push(Effect::Decided(decision.clone()));
        Answer::Decided(decision)
    }

    /// Checks a step or step outcome: its op id must be the one derived
    /// from its saga's, and the saga's op id must be inside the window (it
    /// bounds the step's dedup record like a client's v7 id does).
    fn check_internal(&self, req: &Request, now: u64) -> Result<(), Reason> {
        let (saga, index, expected) = match &req.command {
            Command::Step {
                saga, index, phase, ..
            } => (*saga, *index, saga::step_id(*saga, *index, *phase)),
            Command::StepOutcome { saga, index, .. } => {
                (*saga, *index, saga::outcome_id(*saga, *index))
            }
            _ => return self.check_op_id(req.op_id, now),
        };
        let malformed = |detail: &str| Reason::Malformed {
            detail: detail.to_owned(),
        };
        if usize::try_from(index).map_or(true, |i| i >= SAGA_STEPS_MAX) {
            return Err(malformed(
                "a step index must be below the saga step limit (16)",
            ));
        }
        if req.op_id != expected {
            return Err(malformed(
                "a step message's op id must be derived from its saga's (see specs/protocol.md)",
            ));
        }
        if req.apology_topic.is_some() {
            return Err(malformed("a step message takes no apology_topic"));
        }
        self.check_op_id(saga, now)?;
        // amends sends each step message to the partition of its routing
        // key, so one elsewhere was forged: refused like the checks above.
        self.check_route(req)
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

    fn check_op_id(&self, op_id: OpId, now: u64) -> Result<(), Reason> {
        let Some(op_time_ms) = op_id.v7_unix_ms() else {
            return Err(Reason::Malformed {
                detail: "op_id must be a UUID version 7 (see specs/protocol.md)".to_owned(),
            });
        };
        let (earliest_ms, latest_ms) = self.config.window(now);
        if op_time_ms < earliest_ms || op_time_ms > latest_ms {
            return Err(Reason::OpIdOutsideWindow {
                op_time_ms,
                earliest_ms,
                latest_ms,
            });
        }
        Ok(())
    }

    /// Expires every pending hold and cancels every saga in flight whose
    /// time (expiry, deadline) is at or before `now`.
    fn expire<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        now: u64,
        out: &mut Vec<Effect>,
        local: &mut VecDeque<Request>,
    ) {
        // The cursor makes a mass expiry linear: entries before it were
        // just removed, and an overlay would otherwise step past each again.
        let mut cursor = None;
        while let Some(key) = state.expiry_after(cursor) {
            cursor = Some(key);
            if key.at_ms > now {
                break;
            }
            let hold = state.hold(key.hold);
            if hold.is_none()
                && let Some(s) = state.saga(key.hold)
            {
                let SagaState::Trying { step } = s.state else {
                    panic!("expiry index names {:?}, a saga that ended", key.hold);
                };
                let reason = Reason::DeadlineExceeded {
                    deadline_ms: s.deadline_ms,
                };
                // The step in flight is cancelled too: its try may have
                // happened, or may still arrive (and is then refused).
                self.cancel_steps(key.hold, &s, step, true, local, out);
                self.finish_saga(
                    state,
                    key.hold,
                    s,
                    Outcome::Rejected { reason },
                    position,
                    now,
                    out,
                );
                continue;
            }
            // The expiry index only names pending holds on open accounts
            // (and sagas in flight).
            let Some(mut hold) = hold.filter(|h| h.status == HoldStatus::Pending) else {
                panic!(
                    "expiry index names {:?}, which is not a pending hold",
                    key.hold
                );
            };
            let Some(mut account) = state.account(hold.account.as_str()) else {
                panic!("hold {:?} is on a missing account", key.hold);
            };
            account.held = account
                .held
                .checked_sub(hold.amount)
                .filter(|h| *h >= 0)
                .unwrap_or_else(|| panic!("held of {:?} would go negative", hold.account));
            state.put_account(&hold.account, account);
            state.put_expiry(key, false);
            hold.status = HoldStatus::Expired { at_ms: now };
            out.push(Effect::HoldExpired(HoldExpired {
                event_id: key.hold.derive(EXPIRY_LABEL),
                hold: key.hold,
                account: hold.account.clone(),
                amount: hold.amount,
                partition: self.partition.get(),
                position,
                log_time_ms: now,
            }));
            state.put_hold(key.hold, hold);
        }
    }

    /// Decides `req` at log time `now`; records resolved before `horizon_ms`
    /// count as gone (see the dedup lookup in `apply`).
    fn execute<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        req: &Request,
        now: u64,
        horizon_ms: u64,
    ) -> Decided {
        match &req.command {
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            } => {
                if state.account(account.as_str()).is_some() {
                    return Err(Reason::AccountExists);
                }
                if *floor > 0 || ceiling.is_some_and(|c| c < 0) {
                    return Err(Reason::InvalidLimits {
                        floor: *floor,
                        ceiling: *ceiling,
                    });
                }
                let opened = Account::open(*floor, *ceiling);
                state.put_account(account, opened);
                Ok(balances(&opened))
            }
            Command::Credit {
                account: id,
                amount,
            } => {
                let mut account = open_account(state, id)?;
                let amt = to_i64(*amount)?;
                account.balance = room_for(&account, amt, amount.get())?;
                state.put_account(id, account);
                Ok(balances(&account))
            }
            Command::Debit {
                account: id,
                amount,
            } => {
                let mut account = open_account(state, id)?;
                let amt = to_i64(*amount)?;
                spendable(&account, amt, amount.get())?;
                account.balance = account.balance.checked_sub(amt).ok_or(Reason::Overflow)?;
                state.put_account(id, account);
                Ok(balances(&account))
            }
            Command::Hold {
                account: id,
                amount,
                timeout_ms,
            } => new_hold(state, req.op_id, id, *amount, *timeout_ms, now, horizon_ms),
            Command::Post {
                account: id,
                hold: hold_id,
                amount,
            } => post(state, id, *hold_id, *amount, now, horizon_ms, false),
            Command::Void {
                account: id,
                hold: hold_id,
            } => void(state, id, *hold_id, now, horizon_ms, false),
            Command::Claim {
                namespace,
                key,
                owner,
            } => with_claim_key(namespace, key, |rk| match state.claim(rk) {
                Some(c) if c.owner == *owner && c.tentative.is_some() => Err(Reason::ClaimPending),
                Some(c) if c.owner == *owner => Ok(Outcome::confirmed()),
                Some(c) => Err(Reason::AlreadyClaimed { owner: c.owner }),
                None => {
                    state.put_claim(rk, Some(Claim::owned_by(owner.clone())));
                    Ok(Outcome::confirmed())
                }
            }),
            Command::Release {
                namespace,
                key,
                owner,
            } => with_claim_key(namespace, key, |rk| match state.claim(rk) {
                None => Err(Reason::NotClaimed),
                Some(c) if c.owner != *owner => Err(Reason::NotOwner { owner: c.owner }),
                Some(c) if c.tentative.is_some() => Err(Reason::ClaimPending),
                Some(_) => {
                    state.put_claim(rk, None);
                    Ok(Outcome::confirmed())
                }
            }),
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

/// The saga side of the machine: starting sagas, deciding their steps on
/// the steps' partitions, and moving them on as outcomes arrive. See
/// [`crate::saga`] for the protocol.
impl Machine {
    /// The partition of a saga step (its command's routing key).
    fn target_of(&self, step: &SagaStep) -> PartitionId {
        // Steps are plain operations (checked by parsing), which all have
        // a routing key.
        let key = step.command.routing_key().unwrap_or_default();
        route::partition_of(&key, self.partitions)
    }

    /// The partition that keeps saga `saga`.
    fn saga_partition(&self, saga: OpId) -> PartitionId {
        route::partition_of(&route::saga_routing_key(&saga.0), self.partitions)
    }

    /// Sends `request` to `partition`: through the outbox, or, for this
    /// partition, to be decided right after the current message.
    fn send(
        &self,
        partition: PartitionId,
        request: Request,
        local: &mut VecDeque<Request>,
        out: &mut Vec<Effect>,
    ) {
        if partition == self.partition {
            local.push_back(request);
        } else {
            out.push(Effect::Send { partition, request });
        }
    }

    fn send_step(
        &self,
        saga: OpId,
        index: u32,
        phase: Phase,
        step: &SagaStep,
        local: &mut VecDeque<Request>,
        out: &mut Vec<Effect>,
    ) {
        let request = saga::step_request(saga, index, phase, step.clone());
        self.send(self.target_of(step), request, local, out);
    }

    fn send_outcome(
        &self,
        saga: OpId,
        index: u32,
        outcome: Outcome,
        local: &mut VecDeque<Request>,
        out: &mut Vec<Effect>,
    ) {
        let request = saga::outcome_request(saga, index, outcome);
        self.send(self.saga_partition(saga), request, local, out);
    }

    /// Starts the saga of `req` (a `transfer` or `saga`): records it, sets
    /// its deadline and tries its first step. Returns its in-flight
    /// decision.
    #[allow(clippy::too_many_arguments)]
    fn start_saga<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        req: &Request,
        fingerprint: Fingerprint,
        position: u64,
        now: u64,
        reply_to: Option<&str>,
        local: &mut VecDeque<Request>,
        out: &mut Vec<Effect>,
    ) -> Decision {
        let steps = saga::steps(&req.command);
        // A saga ends within the dedup retention, so its op id and its steps'
        // are deduplicated for as long as they can arrive.
        let lasts_ms = saga::deadline_ms(&req.command).min(self.config.dedup_retention_ms);
        let deadline_ms = now.saturating_add(lasts_ms);
        state.put_saga(
            req.op_id,
            Saga {
                command: req.command.clone(),
                apology_topic: req.apology_topic.clone(),
                reply_to: reply_to.map(str::to_owned),
                deadline_ms,
                state: SagaState::Trying { step: 0 },
            },
        );
        state.put_expiry(
            ExpiryKey {
                at_ms: deadline_ms,
                hold: req.op_id,
            },
            true,
        );
        let decision = Decision {
            op_id: req.op_id,
            partition: self.partition.get(),
            position,
            log_time_ms: now,
            outcome: Outcome::InFlight { step: 0 },
        };
        state.put_dedup(
            req.op_id,
            Dedup {
                fingerprint,
                decision: decision.clone(),
            },
        );
        // Parsing guarantees at least one step.
        if let Some(first) = steps.first() {
            self.send_step(req.op_id, 0, Phase::Try, first, local, out);
        }
        decision
    }

    /// Decides phase `phase` of step `index` of saga `saga` on this (the
    /// step's) partition. `op_id` is the message's derived id.
    #[allow(clippy::too_many_arguments)]
    fn step<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        op_id: OpId,
        saga: OpId,
        index: u32,
        phase: Phase,
        step: &SagaStep,
        now: u64,
        horizon_ms: u64,
    ) -> Decided {
        let try_id = saga::step_id(saga, index, Phase::Try);
        let decided =
            |state: &S, id: OpId| state.dedup(id).filter(|d| !d.is_compactable(horizon_ms));
        let tried =
            |state: &S| decided(state, try_id).is_some_and(|d| d.decision.outcome.is_confirmed());
        let cancelled = decided(state, saga::step_id(saga, index, Phase::Cancel)).is_some();
        if phase != Phase::Cancel && cancelled {
            // The saga cancelled this step before its try (or a confirm,
            // which only a forged message could send) arrived.
            return Err(Reason::SagaCancelled);
        }
        if phase == Phase::Cancel
            && decided(state, saga::step_id(saga, index, Phase::Confirm)).is_some()
        {
            // Confirmed already: a saga sends one or the other, never both,
            // so only a forged message gets here. It changes nothing.
            return Ok(Outcome::confirmed());
        }
        match (phase, &*step.command) {
            (Phase::Try, Command::Debit { account, amount }) => {
                new_hold(state, op_id, account, *amount, None, now, horizon_ms)
            }
            (
                Phase::Try,
                Command::Credit {
                    account: id,
                    amount,
                },
            ) => {
                let mut account = open_account(state, id)?;
                let amt = to_i64(*amount)?;
                room_for(&account, amt, amount.get())?;
                account.incoming = account.incoming.checked_add(amt).ok_or(Reason::Overflow)?;
                state.put_account(id, account);
                Ok(balances(&account))
            }
            (
                Phase::Try,
                Command::Claim {
                    namespace,
                    key,
                    owner,
                },
            ) => with_claim_key(namespace, key, |rk| match state.claim(rk) {
                // Already the owner's for good: confirm and cancel leave it.
                Some(c) if c.owner == *owner && c.tentative.is_none() => Ok(Outcome::confirmed()),
                Some(c) if c.owner == *owner => Err(Reason::ClaimPending),
                Some(c) => Err(Reason::AlreadyClaimed { owner: c.owner }),
                None => {
                    state.put_claim(rk, Some(tentative_claim(owner, op_id)));
                    Ok(Outcome::confirmed())
                }
            }),
            (Phase::Try, command) => {
                let req = Request {
                    op_id,
                    command: command.clone(),
                    apology_topic: None,
                };
                self.execute(state, &req, now, horizon_ms)
            }
            (Phase::Confirm, Command::Debit { account, .. }) => {
                post(state, account, try_id, None, now, horizon_ms, true)
            }
            (
                Phase::Confirm,
                Command::Credit {
                    account: id,
                    amount,
                },
            ) => {
                if !tried(state) {
                    return Ok(Outcome::confirmed());
                }
                let mut account = open_account(state, id)?;
                let amt = to_i64(*amount)?;
                account.incoming = unreserve(account.incoming, amt)?;
                // The reservation checked this sum against the ceiling and
                // against overflow.
                account.balance = account.balance.checked_add(amt).ok_or(Reason::Overflow)?;
                state.put_account(id, account);
                Ok(balances(&account))
            }
            (Phase::Confirm, Command::Claim { namespace, key, .. }) => {
                with_claim_key(namespace, key, |rk| {
                    if let Some(mut c) = state.claim(rk).filter(|c| c.tentative == Some(try_id)) {
                        c.tentative = None;
                        state.put_claim(rk, Some(c));
                    }
                    Ok(Outcome::confirmed())
                })
            }
            // A step done at once has nothing to confirm (and the saga
            // sends it no confirm).
            (Phase::Confirm, _) => Ok(Outcome::confirmed()),
            (Phase::Cancel, Command::Debit { account, .. }) => {
                match state.hold(try_id).map(|h| h.status) {
                    Some(HoldStatus::Pending) => {
                        void(state, account, try_id, now, horizon_ms, true)
                    }
                    _ => Ok(Outcome::confirmed()),
                }
            }
            (
                Phase::Cancel,
                Command::Credit {
                    account: id,
                    amount,
                },
            ) => {
                if tried(state) {
                    let mut account = open_account(state, id)?;
                    account.incoming = unreserve(account.incoming, to_i64(*amount)?)?;
                    state.put_account(id, account);
                }
                Ok(Outcome::confirmed())
            }
            (Phase::Cancel, Command::Claim { namespace, key, .. }) => {
                with_claim_key(namespace, key, |rk| {
                    if state.claim(rk).is_some_and(|c| c.tentative == Some(try_id)) {
                        state.put_claim(rk, None);
                    }
                    Ok(Outcome::confirmed())
                })
            }
            (Phase::Cancel, _) => match (&step.compensation, tried(state)) {
                (Some(compensation), true) => {
                    let req = Request {
                        op_id,
                        command: (**compensation).clone(),
                        apology_topic: None,
                    };
                    self.execute(state, &req, now, horizon_ms)
                }
                _ => Ok(Outcome::confirmed()),
            },
        }
    }

    /// Moves saga `saga_id` on with the outcome of step `index`'s try: the
    /// next try, the confirms, or the cancels. An outcome the saga does not
    /// wait for (late, after the deadline, or repeated) changes nothing:
    /// the step was cancelled already.
    #[allow(clippy::too_many_arguments)]
    fn on_outcome<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        saga_id: OpId,
        index: u32,
        outcome: &Outcome,
        position: u64,
        now: u64,
        horizon_ms: u64,
        local: &mut VecDeque<Request>,
        out: &mut Vec<Effect>,
    ) {
        let Some(mut s) = state
            .saga(saga_id)
            .filter(|s| !s.is_compactable(horizon_ms))
        else {
            return;
        };
        if s.state != (SagaState::Trying { step: index }) {
            return;
        }
        let steps = saga::steps(&s.command);
        match outcome {
            Outcome::Confirmed { .. } => {
                let next = index.saturating_add(1);
                let next_step = usize::try_from(next).ok().and_then(|i| steps.get(i));
                if let Some(step) = next_step {
                    self.send_step(saga_id, next, Phase::Try, step, local, out);
                    s.state = SagaState::Trying { step: next };
                    state.put_saga(saga_id, s);
                    if let Some(mut d) = state.dedup(saga_id) {
                        d.decision.outcome = Outcome::InFlight { step: next };
                        state.put_dedup(saga_id, d);
                    }
                } else {
                    for (i, step) in (0_u32..).zip(steps.iter()) {
                        if step.is_tentative() {
                            self.send_step(saga_id, i, Phase::Confirm, step, local, out);
                        }
                    }
                    self.finish_saga(state, saga_id, s, Outcome::confirmed(), position, now, out);
                }
            }
            Outcome::Rejected { reason } => {
                self.cancel_steps(saga_id, &s, index, false, local, out);
                let reason = Reason::StepRefused {
                    step: index,
                    reason: Box::new(reason.clone()),
                };
                self.finish_saga(
                    state,
                    saga_id,
                    s,
                    Outcome::Rejected { reason },
                    position,
                    now,
                    out,
                );
            }
            // Not the outcome of a try; only a forged message carries it.
            Outcome::InFlight { .. } => {}
        }
    }

    /// Cancels the steps of `s` before step `in_flight`, last first, and
    /// step `in_flight` itself when `with_in_flight`. Only steps that left
    /// something to undo get a cancel (a reservation, or a compensation),
    /// and the step in flight always does (its try may arrive later).
    fn cancel_steps(
        &self,
        saga_id: OpId,
        s: &Saga,
        in_flight: u32,
        with_in_flight: bool,
        local: &mut VecDeque<Request>,
        out: &mut Vec<Effect>,
    ) {
        let steps = saga::steps(&s.command);
        let indexed: Vec<(u32, &SagaStep)> = (0_u32..).zip(steps.iter()).collect();
        for &(i, step) in indexed.iter().rev() {
            let undo = step.is_tentative() || step.compensation.is_some();
            let wanted = match i.cmp(&in_flight) {
                std::cmp::Ordering::Less => undo,
                std::cmp::Ordering::Equal => with_in_flight,
                std::cmp::Ordering::Greater => false,
            };
            if wanted {
                self.send_step(saga_id, i, Phase::Cancel, step, local, out);
            }
        }
    }

    /// Ends saga `saga_id` with `outcome`: its final decision replaces the
    /// in-flight one, is published, sent to the requester and, for a
    /// refused optimistic saga, published as an apology.
    #[allow(clippy::too_many_arguments)]
    fn finish_saga<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        saga_id: OpId,
        mut s: Saga,
        outcome: Outcome,
        position: u64,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        s.state = if outcome.is_confirmed() {
            SagaState::Confirmed { at_ms: now }
        } else {
            SagaState::Cancelled { at_ms: now }
        };
        state.put_expiry(
            ExpiryKey {
                at_ms: s.deadline_ms,
                hold: saga_id,
            },
            false,
        );
        let decision = Decision {
            op_id: saga_id,
            partition: self.partition.get(),
            position,
            log_time_ms: now,
            outcome,
        };
        // The fingerprint of the saga's request, made again from the saga
        // (its in-flight dedup record may have been compacted already).
        let request = Request {
            op_id: saga_id,
            command: s.command.clone(),
            apology_topic: s.apology_topic.clone(),
        };
        state.put_dedup(
            saga_id,
            Dedup {
                fingerprint: request.fingerprint(),
                decision: decision.clone(),
            },
        );
        if let (Some(topic), false) = (&s.apology_topic, decision.outcome.is_confirmed()) {
            out.push(Effect::Apology(Apology {
                topic: topic.clone(),
                command: s.command.clone(),
                decision: decision.clone(),
            }));
        }
        out.push(Effect::Decided(decision.clone()));
        if let Some(to) = &s.reply_to {
            out.push(Effect::Reply {
                to: to.clone(),
                decision,
            });
        }
        state.put_saga(saga_id, s);
    }
}

/// Records the decision of a saga's internal message (step or step
/// outcome) and answers it as internal: it is not published.
fn internal<S: Write + ?Sized>(
    state: &mut S,
    op_id: OpId,
    fingerprint: Fingerprint,
    decision: Decision,
) -> Answer {
    state.put_dedup(
        op_id,
        Dedup {
            fingerprint,
            decision: decision.clone(),
        },
    );
    Answer::Internal(decision)
}

/// `incoming` less a reservation of `amt`. Only a forged step message could
/// release more than was reserved: a refusal, never a negative sum.
fn unreserve(incoming: i64, amt: i64) -> Result<i64, Reason> {
    incoming
        .checked_sub(amt)
        .filter(|r| *r >= 0)
        .ok_or(Reason::Overflow)
}

/// A claim held by a saga step (`try_id`) until the saga ends.
fn tentative_claim(owner: &Owner, try_id: OpId) -> Claim {
    Claim {
        owner: owner.clone(),
        tentative: Some(try_id),
    }
}

/// Opens hold `hold_id` of `amount` on account `id`.
fn new_hold<S: Read + Write + ?Sized>(
    state: &mut S,
    hold_id: OpId,
    id: &AccountId,
    amount: Amount,
    timeout_ms: Option<u64>,
    now: u64,
    horizon_ms: u64,
) -> Decided {
    let mut account = open_account(state, id)?;
    let amt = to_i64(amount)?;
    let held = account.held.checked_add(amt).ok_or(Reason::Overflow)?;
    let expires_at_ms = match timeout_ms {
        None => None,
        Some(t) => Some(now.checked_add(t).ok_or(Reason::Overflow)?),
    };
    spendable(&account, amt, amount.get())?;
    if state
        .hold(hold_id)
        .is_some_and(|h| !h.is_compactable(horizon_ms))
    {
        // Only possible if a hold outlived its op id's dedup
        // record, which the window check rules out.
        return Err(Reason::OpIdConflict);
    }
    account.held = held;
    state.put_account(id, account);
    state.put_hold(
        hold_id,
        Hold {
            account: id.clone(),
            amount: amt,
            expires_at_ms,
            status: HoldStatus::Pending,
        },
    );
    if let Some(at_ms) = expires_at_ms {
        state.put_expiry(
            ExpiryKey {
                at_ms,
                hold: hold_id,
            },
            true,
        );
    }
    Ok(balances(&account))
}

/// Posts hold `hold_id` on account `id`: takes `amount` (default: all of it).
fn post<S: Read + Write + ?Sized>(
    state: &mut S,
    id: &AccountId,
    hold_id: OpId,
    amount: Option<Amount>,
    now: u64,
    horizon_ms: u64,
    by_saga: bool,
) -> Decided {
    let (mut hold, mut account) = pending_hold(state, id, hold_id, horizon_ms, by_saga)?;
    let take = match amount {
        None => hold.amount,
        Some(a) => {
            let requested = to_i64(a).ok();
            match requested.filter(|r| *r <= hold.amount) {
                Some(r) => r,
                None => {
                    return Err(Reason::PostExceedsHold {
                        held: hold.amount,
                        requested: a.get(),
                    });
                }
            }
        }
    };
    account.balance = account.balance.checked_sub(take).ok_or(Reason::Overflow)?;
    account.held = release(account.held, hold.amount);
    hold.status = HoldStatus::Posted {
        amount: take,
        at_ms: now,
    };
    finish_hold(state, id, hold_id, hold, &account);
    Ok(balances(&account))
}

/// Voids hold `hold_id` on account `id`.
fn void<S: Read + Write + ?Sized>(
    state: &mut S,
    id: &AccountId,
    hold_id: OpId,
    now: u64,
    horizon_ms: u64,
    by_saga: bool,
) -> Decided {
    let (mut hold, mut account) = pending_hold(state, id, hold_id, horizon_ms, by_saga)?;
    account.held = release(account.held, hold.amount);
    hold.status = HoldStatus::Voided { at_ms: now };
    finish_hold(state, id, hold_id, hold, &account);
    Ok(balances(&account))
}

/// The balance after crediting `amt` to `account`: the ceiling counts the
/// credits reserved by sagas in flight, and so does the overflow check, so
/// confirming those reservations later cannot fail.
fn room_for(account: &Account, amt: i64, requested: u64) -> Result<i64, Reason> {
    let balance = account.balance.checked_add(amt).ok_or(Reason::Overflow)?;
    let reach = balance
        .checked_add(account.incoming)
        .ok_or(Reason::Overflow)?;
    if let Some(ceiling) = account.ceiling.filter(|c| reach > *c) {
        return Err(Reason::CeilingExceeded {
            balance: account.balance,
            ceiling,
            requested,
        });
    }
    Ok(balance)
}

/// The longest claim routing key of a valid claim or release: namespace,
/// separator, key.
const CLAIM_ROUTING_KEY_BYTES_MAX: usize =
    NAMESPACE_BYTES_MAX + route::CLAIM_SEPARATOR.len_utf8() + CLAIM_KEY_BYTES_MAX;

/// Builds the claim routing key of `namespace` and `key` (the same text as
/// [`route::claim_routing_key`]) in `buf`, so claims and releases do not
/// allocate for it; `None` if it does not fit.
/// Runs `f` on the claim routing key of `namespace` and `key`, built on the
/// stack when it fits.
fn with_claim_key<R>(namespace: &Namespace, key: &ClaimKey, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0; CLAIM_ROUTING_KEY_BYTES_MAX];
    match claim_routing_key_in(&mut buf, namespace.as_str(), key.as_str()) {
        Some(rk) => f(rk),
        None => f(&route::claim_routing_key(namespace.as_str(), key.as_str())),
    }
}

fn claim_routing_key_in<'b>(buf: &'b mut [u8], namespace: &str, key: &str) -> Option<&'b str> {
    let mut sep = [0; 4];
    let sep = route::CLAIM_SEPARATOR.encode_utf8(&mut sep).as_bytes();
    let key_start = namespace.len().checked_add(sep.len())?;
    let end = key_start.checked_add(key.len())?;
    let out = buf.get_mut(..end)?;
    let (ns_out, rest) = out.split_at_mut(namespace.len());
    let (sep_out, key_out) = rest.split_at_mut(sep.len());
    ns_out.copy_from_slice(namespace.as_bytes());
    sep_out.copy_from_slice(sep);
    key_out.copy_from_slice(key.as_bytes());
    std::str::from_utf8(out).ok()
}

fn balances(account: &Account) -> Outcome {
    Outcome::Confirmed {
        balance: Some(account.balance),
        available: account.available(),
    }
}

fn open_account<S: Read + ?Sized>(state: &S, id: &AccountId) -> Result<Account, Reason> {
    state.account(id.as_str()).ok_or(Reason::UnknownAccount)
}

fn to_i64(amount: Amount) -> Result<i64, Reason> {
    i64::try_from(amount.get()).map_err(|_| Reason::Overflow)
}

/// Checks that taking `amt` keeps balance minus holds at or above the floor.
fn spendable(account: &Account, amt: i64, requested: u64) -> Result<(), Reason> {
    let available = account.available().ok_or(Reason::Overflow)?;
    let after = available.checked_sub(amt).ok_or(Reason::Overflow)?;
    if after < account.floor {
        return Err(Reason::InsufficientFunds {
            available,
            floor: account.floor,
            requested,
        });
    }
    Ok(())
}

fn release(held: i64, amount: i64) -> i64 {
    held.checked_sub(amount)
        .filter(|h| *h >= 0)
        .unwrap_or_else(|| panic!("held {held} is less than a pending hold of {amount}"))
}

/// The pending hold `hold_id` on account `id`. A hold resolved before
/// `horizon_ms` counts as gone (see the dedup lookup in `apply`).
fn pending_hold<S: Read + ?Sized>(
    state: &S,
    id: &AccountId,
    hold_id: OpId,
    horizon_ms: u64,
    by_saga: bool,
) -> Result<(Hold, Account), Reason> {
    // unknown_account precedes hold_not_found (found by the model tests,
    // `tests/model`): look the account up first.
    let account = open_account(state, id)?;
    // A client may post or void only holds it opened (their ids are UUID
    // v7); a saga's holds have derived ids and are the saga's to end.
    let owned = by_saga || hold_id.v7_unix_ms().is_some();
    let hold = state
        .hold(hold_id)
        .filter(|h| owned && h.account == *id && !h.is_compactable(horizon_ms))
        .ok_or(Reason::HoldNotFound)?;
    match hold.status {
        HoldStatus::Pending => {}
        HoldStatus::Posted { .. } => return Err(Reason::HoldAlreadyPosted),
        HoldStatus::Voided { .. } => return Err(Reason::HoldAlreadyVoided),
        HoldStatus::Expired { .. } => return Err(Reason::HoldExpired),
    }
    Ok((hold, account))
}

fn finish_hold<S: Write + ?Sized>(
    state: &mut S,
    id: &AccountId,
    hold_id: OpId,
    hold: Hold,
    account: &Account,
) {
    if let Some(at_ms) = hold.expires_at_ms {
        state.put_expiry(
            ExpiryKey {
                at_ms,
                hold: hold_id,
            },
            false,
        );
    }
    state.put_account(id, *account);
    state.put_hold(hold_id, hold);
}
