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

use crate::command::{
    AccountId, Amount, CLAIM_KEY_BYTES_MAX, ClaimKey, Command, Fingerprint, NAMESPACE_BYTES_MAX,
    Namespace, Request, Topic,
};
use crate::decision::{Decision, Outcome, Reason};
use crate::id::OpId;
use crate::route::{self, PartitionId};
use crate::state::{Account, Claim, Clock, Dedup, ExpiryKey, Hold, HoldStatus, Read, Write};

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

/// One decoded message of a partition's request log.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Input {
    /// A well-formed request.
    Request(Request),
    /// A message whose op id could be read but whose body could not be
    /// parsed or validated. It is refused with `malformed`.
    Malformed {
        /// The op id read from the message.
        op_id: OpId,
        /// The fingerprint of the raw bytes.
        fingerprint: Fingerprint,
        /// What was wrong.
        detail: String,
    },
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
    /// client's clock is right.
    Refused(Decision),
    /// A tick: log time advanced, nothing to answer.
    Ticked,
}

impl Answer {
    /// The decision to send to the requester, if any.
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Answer::Decided(d)
            | Answer::Duplicate(d)
            | Answer::Conflict(d)
            | Answer::Refused(d) => Some(d),
            Answer::Ticked => None,
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
    config: Config,
}

type Decided = Result<Outcome, Reason>;

impl Machine {
    /// The machine of `partition` with `config`.
    pub const fn new(partition: PartitionId, config: Config) -> Machine {
        Machine { partition, config }
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
        self.expire_holds(state, position, now, out);

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
            return Ok(if seen.fingerprint == fingerprint {
                Answer::Duplicate(seen.decision)
            } else {
                Answer::Conflict(decision(Outcome::Rejected {
                    reason: Reason::OpIdConflict,
                }))
            });
        }

        // The op id is checked before anything is recorded. A record of an
        // op id that is not v7 or outside the window would be useless (no
        // timestamp bounds it; a too-old id can never be valid again) or
        // would have to outlive any retention (a too-new id), so these
        // refusals go to the sender only and memory stays bounded.
        if let Err(reason) = self.check_op_id(op_id, now) {
            return Ok(Answer::Refused(decision(Outcome::Rejected { reason })));
        }
        let outcome = match input {
            Input::Malformed { detail, .. } => Outcome::Rejected {
                reason: Reason::Malformed {
                    detail: detail.clone(),
                },
            },
            Input::Request(req) => match self.execute(state, req, now, horizon_ms) {
                Ok(outcome) => outcome,
                Err(reason) => Outcome::Rejected { reason },
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
        Ok(Answer::Decided(decision))
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

    fn expire_holds<S: Read + Write + ?Sized>(
        &self,
        state: &mut S,
        position: u64,
        now: u64,
        out: &mut Vec<Effect>,
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
            // The expiry index only names pending holds on open accounts.
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
                let balance = account.balance.checked_add(amt).ok_or(Reason::Overflow)?;
                if let Some(ceiling) = account.ceiling.filter(|c| balance > *c) {
                    return Err(Reason::CeilingExceeded {
                        balance: account.balance,
                        ceiling,
                        requested: amount.get(),
                    });
                }
                account.balance = balance;
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
            } => {
                let mut account = open_account(state, id)?;
                let amt = to_i64(*amount)?;
                let held = account.held.checked_add(amt).ok_or(Reason::Overflow)?;
                let expires_at_ms = match timeout_ms {
                    None => None,
                    Some(t) => Some(now.checked_add(*t).ok_or(Reason::Overflow)?),
                };
                spendable(&account, amt, amount.get())?;
                if state
                    .hold(req.op_id)
                    .is_some_and(|h| !h.is_compactable(horizon_ms))
                {
                    // Only possible if a hold outlived its op id's dedup
                    // record, which the window check rules out.
                    return Err(Reason::OpIdConflict);
                }
                account.held = held;
                state.put_account(id, account);
                state.put_hold(
                    req.op_id,
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
                            hold: req.op_id,
                        },
                        true,
                    );
                }
                Ok(balances(&account))
            }
            Command::Post {
                account: id,
                hold: hold_id,
                amount,
            } => {
                let (mut hold, mut account) = pending_hold(state, id, *hold_id, horizon_ms)?;
                let take = match amount {
                    None => hold.amount,
                    Some(a) => {
                        let requested = to_i64(*a).ok();
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
                finish_hold(state, id, *hold_id, hold, &account);
                Ok(balances(&account))
            }
            Command::Void {
                account: id,
                hold: hold_id,
            } => {
                let (mut hold, mut account) = pending_hold(state, id, *hold_id, horizon_ms)?;
                account.held = release(account.held, hold.amount);
                hold.status = HoldStatus::Voided { at_ms: now };
                finish_hold(state, id, *hold_id, hold, &account);
                Ok(balances(&account))
            }
            Command::Claim {
                namespace,
                key,
                owner,
            } => with_claim_key(namespace, key, |rk| match state.claim(rk) {
                Some(c) if c.owner == *owner => Ok(Outcome::confirmed()),
                Some(c) => Err(Reason::AlreadyClaimed { owner: c.owner }),
                None => {
                    state.put_claim(
                        rk,
                        Some(Claim {
                            owner: owner.clone(),
                        }),
                    );
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
                Some(_) => {
                    state.put_claim(rk, None);
                    Ok(Outcome::confirmed())
                }
            }),
            // Ticks return before dedup in `apply`.
            Command::Tick {} => Ok(Outcome::confirmed()),
        }
    }
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
) -> Result<(Hold, Account), Reason> {
    // unknown_account precedes hold_not_found (found by the model tests,
    // `tests/model`): look the account up first.
    let account = open_account(state, id)?;
    let hold = state
        .hold(hold_id)
        .filter(|h| h.account == *id && !h.is_compactable(horizon_ms))
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
