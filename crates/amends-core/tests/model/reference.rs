//! A deliberately naive reference model of one partition.
//!
//! It is written from the documented rules (`specs/protocol.md` and the docs
//! of `Command`, `Reason`, `Answer` and `Config`), not from `partition/`.
//! It checks in the documented order (dedup, where a record past the
//! compaction horizon counts as gone; then the op id, which must be a v7
//! inside the window, and whose refusals are neither remembered nor
//! published; then the body and the command),
//! with plain `BTreeMap`s, `i128` arithmetic checked against the `i64`
//! range, a linear scan for expiries, and bodies compared as values (a parsed `Request`, or the raw bytes of a
//! malformed message) instead of fingerprints. It shares only the data types
//! of the core (decisions, reasons, effects) and the partitioner
//! (`route::partition_of`, checked on its own against the vectors of an
//! independent implementation), so a test comparing the two compares two
//! independent readings of the rules.

use std::collections::BTreeMap;

use amends_core::command::{AccountId, Command, Owner, Request};
use amends_core::decision::{Decision, Outcome, Reason};
use amends_core::id::OpId;
use amends_core::partition::{Answer, Apology, Effect, Fault, HoldExpired, Input};
use amends_core::route::{self, Partitions};
use amends_core::state::HoldStatus;

/// The detail of the refusal of a message whose op id is not a UUID v7,
/// whatever its body (quoted from the protocol).
pub const NOT_V7_DETAIL: &str = "op_id must be a UUID version 7 (see specs/protocol.md)";

/// The label of the id of a hold expiry event (quoted from the protocol).
const EXPIRY_LABEL: &str = "expiry";

/// One account of the model.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Account {
    /// Credits minus debits minus posts.
    pub balance: i64,
    /// Sum of the pending holds.
    pub held: i64,
    /// Lowest balance minus held.
    pub floor: i64,
    /// Highest balance.
    pub ceiling: Option<i64>,
}

/// One hold of the model.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Hold {
    /// The account id.
    pub account: String,
    /// The amount reserved.
    pub amount: i64,
    /// When it lapses.
    pub expires_at_ms: Option<u64>,
    /// Where it is in its life.
    pub status: HoldStatus,
}

/// The body an op id was first decided with.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Body {
    /// A parsed request.
    Parsed(Request),
    /// The raw bytes of a malformed message.
    Raw(Vec<u8>),
}

/// What the model remembers of a decided op id.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Seen {
    /// The body that was decided.
    pub body: Body,
    /// Its decision.
    pub decision: Decision,
}

/// The whole model state.
#[derive(Clone, Debug)]
pub struct Reference {
    partition: u32,
    /// The deployment's partition count.
    partitions: Partitions,
    retention_ms: u64,
    skew_ms: u64,
    /// Last applied position.
    pub position: u64,
    /// Log time: the largest log time seen so far.
    pub now_ms: u64,
    /// Accounts by id.
    pub accounts: BTreeMap<String, Account>,
    /// Holds by the op id of their request.
    pub holds: BTreeMap<OpId, Hold>,
    /// Claims: (namespace, key) to owner.
    pub claims: BTreeMap<(String, String), String>,
    /// Every decided op id (never one whose op id was refused), kept even
    /// past the horizon: the model never compacts.
    pub seen: BTreeMap<OpId, Seen>,
}

fn to_i64(v: i128) -> Option<i64> {
    i64::try_from(v).ok()
}

impl Reference {
    /// An empty partition with these settings.
    pub fn new(partition: u32, partitions: u32, retention_ms: u64, skew_ms: u64) -> Reference {
        Reference {
            partition,
            partitions: Partitions::new(partitions).expect("a valid partition count"),
            retention_ms,
            skew_ms,
            position: 0,
            now_ms: 0,
            accounts: BTreeMap::new(),
            holds: BTreeMap::new(),
            claims: BTreeMap::new(),
            seen: BTreeMap::new(),
        }
    }

    /// Applies one message. `raw` is the message's bytes (used to compare
    /// malformed bodies). Returns the answer and the effects.
    pub fn apply(
        &mut self,
        position: u64,
        log_time_ms: u64,
        input: &Input,
        raw: &[u8],
    ) -> (Result<Answer, Fault>, Vec<Effect>) {
        let mut effects = Vec::new();
        if position <= self.position {
            let fault = Fault::PositionNotAdvancing {
                applied: self.position,
                got: position,
            };
            return (Err(fault), effects);
        }
        self.position = position;
        if log_time_ms > self.now_ms {
            self.now_ms = log_time_ms;
        }
        let now = self.now_ms;

        // Expire every pending hold that is due, earliest first, ties by id.
        let mut due: Vec<(u64, OpId)> = Vec::new();
        for (id, hold) in &self.holds {
            if let (HoldStatus::Pending, Some(at)) = (hold.status, hold.expires_at_ms)
                && at <= now
            {
                due.push((at, *id));
            }
        }
        due.sort();
        for (_, id) in due {
            let hold = self.holds.get_mut(&id).expect("due hold exists");
            hold.status = HoldStatus::Expired { at_ms: now };
            let account = self
                .accounts
                .get_mut(&hold.account)
                .expect("hold's account exists");
            account.held -= hold.amount;
            effects.push(Effect::HoldExpired(HoldExpired {
                event_id: id.derive(EXPIRY_LABEL),
                hold: id,
                account: AccountId::new(hold.account.clone()).expect("valid account id"),
                amount: hold.amount,
                partition: self.partition,
                position,
                log_time_ms: now,
            }));
        }

        let (op_id, body) = match input {
            Input::Request(req) if matches!(req.command, Command::Tick {}) => {
                return (Ok(Answer::Ticked), effects);
            }
            Input::Request(req) => (req.op_id, Body::Parsed(req.clone())),
            Input::Malformed { op_id, .. } => (*op_id, Body::Raw(raw.to_vec())),
        };
        let partition = self.partition;
        let decision = |outcome| Decision::new(op_id, partition, position, now, outcome);

        // A record is forgotten, logically, once its decision and its op
        // id's own timestamp (when it has one) are both older than
        // retention + skew; physical compaction may lag, so the model never
        // deletes, it just stops looking.
        let forget_before = self.forget_before(now);
        let remembered = self.seen.get(&op_id).filter(|seen| {
            // Only v7 ids are ever remembered.
            let ts_old = v7_unix_ms(op_id).is_some_and(|t| t < forget_before);
            !(seen.decision.log_time_ms < forget_before && ts_old)
        });
        if let Some(seen) = remembered {
            let answer = if seen.body == body {
                Answer::Duplicate(seen.decision.clone())
            } else {
                Answer::Conflict(decision(Outcome::Rejected {
                    reason: Reason::OpIdConflict,
                }))
            };
            return (Ok(answer), effects);
        }

        // Then the op id itself, whatever the body: it must be v7 and inside
        // the window. A refusal here goes to the sender alone: it is neither
        // remembered nor published (no decision, no apology).
        let Some(op_time_ms) = v7_unix_ms(op_id) else {
            let refusal = decision(Outcome::Rejected {
                reason: Reason::Malformed {
                    detail: NOT_V7_DETAIL.to_owned(),
                },
            });
            return (Ok(Answer::Refused(refusal)), effects);
        };
        {
            let earliest_ms = now.saturating_sub(self.retention_ms);
            let latest_ms = now.saturating_add(self.skew_ms);
            if op_time_ms < earliest_ms || latest_ms < op_time_ms {
                let refusal = decision(Outcome::Rejected {
                    reason: Reason::OpIdOutsideWindow {
                        op_time_ms,
                        earliest_ms,
                        latest_ms,
                    },
                });
                return (Ok(Answer::Refused(refusal)), effects);
            }
        }

        // Everything from here on is remembered and published.
        let outcome = match input {
            Input::Malformed { detail, .. } => Outcome::Rejected {
                reason: Reason::Malformed {
                    detail: detail.clone(),
                },
            },
            Input::Request(req) => match self.decide(req) {
                Ok(outcome) => outcome,
                Err(reason) => Outcome::Rejected { reason },
            },
        };
        let decision = decision(outcome);
        self.seen.insert(
            op_id,
            Seen {
                body,
                decision: decision.clone(),
            },
        );
        if let Input::Request(req) = input
            && let Some(topic) = &req.apology_topic
            && !decision.outcome.is_confirmed()
        {
            effects.push(Effect::Apology(Apology {
                topic: topic.clone(),
                command: req.command.clone(),
                decision: decision.clone(),
            }));
        }
        effects.push(Effect::Decided(decision.clone()));
        (Ok(Answer::Decided(decision)), effects)
    }

    /// Decides a new, well-formed request whose op id is a v7 id inside
    /// the window: the command's own checks in precedence order.
    fn decide(&mut self, req: &Request) -> Result<Outcome, Reason> {
        let now = self.now_ms;

        // The partition must own the routing key: the account id, or the
        // namespace and key joined by U+001F.
        let routing_key = match &req.command {
            Command::OpenAccount { account, .. }
            | Command::Credit { account, .. }
            | Command::Debit { account, .. }
            | Command::Hold { account, .. }
            | Command::Post { account, .. }
            | Command::Void { account, .. } => account.to_string(),
            Command::Claim { namespace, key, .. } | Command::Release { namespace, key, .. } => {
                format!("{namespace}\u{1f}{key}")
            }
            _ => panic!("the model generates no sagas"),
        };
        let owner = route::partition_of(&routing_key, self.partitions).get();
        if owner != self.partition {
            return Err(Reason::WrongPartition { partition: owner });
        }

        match &req.command {
            Command::Transfer { .. }
            | Command::Saga { .. }
            | Command::Step { .. }
            | Command::StepOutcome { .. } => panic!("the model generates no sagas"),
            Command::OpenAccount {
                account,
                floor,
                ceiling,
            } => {
                if self.accounts.contains_key(account.as_str()) {
                    return Err(Reason::AccountExists);
                }
                let bad_ceiling = matches!(ceiling, Some(c) if *c < 0);
                if *floor > 0 || bad_ceiling {
                    return Err(Reason::InvalidLimits {
                        floor: *floor,
                        ceiling: *ceiling,
                    });
                }
                let opened = Account {
                    balance: 0,
                    held: 0,
                    floor: *floor,
                    ceiling: *ceiling,
                };
                self.accounts.insert(account.to_string(), opened);
                Ok(money(&opened))
            }
            Command::Credit { account, amount } => {
                let mut a = self.account(account)?;
                let requested = amount.get();
                let balance_after = i128::from(a.balance) + i128::from(requested);
                let balance = match to_i64(balance_after) {
                    Some(b) if !big_amount(requested) => b,
                    _ => return Err(Reason::Overflow),
                };
                if let Some(ceiling) = a.ceiling
                    && balance > ceiling
                {
                    return Err(Reason::CeilingExceeded {
                        balance: a.balance,
                        ceiling,
                        requested,
                    });
                }
                a.balance = balance;
                self.accounts.insert(account.to_string(), a);
                Ok(money(&a))
            }
            Command::Debit { account, amount } => {
                let mut a = self.account(account)?;
                let requested = amount.get();
                let available = i128::from(a.balance) - i128::from(a.held);
                let balance_after = i128::from(a.balance) - i128::from(requested);
                let available_after = available - i128::from(requested);
                if big_amount(requested)
                    || to_i64(balance_after).is_none()
                    || to_i64(available_after).is_none()
                {
                    return Err(Reason::Overflow);
                }
                if available_after < i128::from(a.floor) {
                    return Err(Reason::InsufficientFunds {
                        available: to_i64(available).expect("available fits"),
                        floor: a.floor,
                        requested,
                    });
                }
                a.balance = to_i64(balance_after).expect("checked");
                self.accounts.insert(account.to_string(), a);
                Ok(money(&a))
            }
            Command::Hold {
                account,
                amount,
                timeout_ms,
            } => {
                let mut a = self.account(account)?;
                let requested = amount.get();
                let available = i128::from(a.balance) - i128::from(a.held);
                let held_after = i128::from(a.held) + i128::from(requested);
                let available_after = available - i128::from(requested);
                let expires_at_ms = timeout_ms.map(|t| now.checked_add(t));
                if big_amount(requested)
                    || to_i64(held_after).is_none()
                    || to_i64(available_after).is_none()
                    || expires_at_ms == Some(None)
                {
                    return Err(Reason::Overflow);
                }
                if available_after < i128::from(a.floor) {
                    return Err(Reason::InsufficientFunds {
                        available: to_i64(available).expect("available fits"),
                        floor: a.floor,
                        requested,
                    });
                }
                a.held = to_i64(held_after).expect("checked");
                self.accounts.insert(account.to_string(), a);
                self.holds.insert(
                    req.op_id,
                    Hold {
                        account: account.to_string(),
                        amount: to_i64(i128::from(requested)).expect("checked"),
                        expires_at_ms: expires_at_ms.flatten(),
                        status: HoldStatus::Pending,
                    },
                );
                Ok(money(&a))
            }
            Command::Post {
                account,
                hold,
                amount,
            } => {
                let mut a = self.account(account)?;
                let h = self.pending_hold(account, *hold)?;
                let take = match amount {
                    None => h.amount,
                    Some(requested) => {
                        let requested = requested.get();
                        if i128::from(requested) > i128::from(h.amount) {
                            return Err(Reason::PostExceedsHold {
                                held: h.amount,
                                requested,
                            });
                        }
                        to_i64(i128::from(requested)).expect("at most the hold")
                    }
                };
                a.balance =
                    to_i64(i128::from(a.balance) - i128::from(take)).ok_or(Reason::Overflow)?;
                a.held -= h.amount;
                self.accounts.insert(account.to_string(), a);
                self.holds.insert(
                    *hold,
                    Hold {
                        status: HoldStatus::Posted {
                            amount: take,
                            at_ms: now,
                        },
                        ..h
                    },
                );
                Ok(money(&a))
            }
            Command::Void { account, hold } => {
                let mut a = self.account(account)?;
                let h = self.pending_hold(account, *hold)?;
                a.held -= h.amount;
                self.accounts.insert(account.to_string(), a);
                self.holds.insert(
                    *hold,
                    Hold {
                        status: HoldStatus::Voided { at_ms: now },
                        ..h
                    },
                );
                Ok(money(&a))
            }
            Command::Claim {
                namespace,
                key,
                owner,
            } => {
                let slot = (namespace.to_string(), key.to_string());
                match self.claims.get(&slot) {
                    Some(o) if o == owner.as_str() => Ok(Outcome::confirmed()),
                    Some(o) => Err(Reason::AlreadyClaimed { owner: owner_of(o) }),
                    None => {
                        self.claims.insert(slot, owner.to_string());
                        Ok(Outcome::confirmed())
                    }
                }
            }
            Command::Release {
                namespace,
                key,
                owner,
            } => {
                let slot = (namespace.to_string(), key.to_string());
                match self.claims.get(&slot) {
                    None => Err(Reason::NotClaimed),
                    Some(o) if o != owner.as_str() => Err(Reason::NotOwner { owner: owner_of(o) }),
                    Some(_) => {
                        self.claims.remove(&slot);
                        Ok(Outcome::confirmed())
                    }
                }
            }
            Command::Tick {} => unreachable!("ticks are answered before deciding"),
        }
    }

    /// Records from before this log time are forgotten at `now`.
    fn forget_before(&self, now: u64) -> u64 {
        now.saturating_sub(self.retention_ms)
            .saturating_sub(self.skew_ms)
    }

    fn account(&self, id: &AccountId) -> Result<Account, Reason> {
        self.accounts
            .get(id.as_str())
            .copied()
            .ok_or(Reason::UnknownAccount)
    }

    /// The pending hold `id` on `account`, or why not.
    fn pending_hold(&self, account: &AccountId, id: OpId) -> Result<Hold, Reason> {
        let forget_before = self.forget_before(self.now_ms);
        let resolved_long_ago = |h: &Hold| match h.status {
            HoldStatus::Pending => false,
            HoldStatus::Posted { at_ms, .. }
            | HoldStatus::Voided { at_ms }
            | HoldStatus::Expired { at_ms } => at_ms < forget_before,
        };
        let hold = match self.holds.get(&id) {
            Some(h) if h.account == account.as_str() && !resolved_long_ago(h) => h.clone(),
            _ => return Err(Reason::HoldNotFound),
        };
        match hold.status {
            HoldStatus::Pending => Ok(hold),
            HoldStatus::Posted { .. } => Err(Reason::HoldAlreadyPosted),
            HoldStatus::Voided { .. } => Err(Reason::HoldAlreadyVoided),
            HoldStatus::Expired { .. } => Err(Reason::HoldExpired),
        }
    }

    /// The claims keyed like the core keys them: namespace, U+001F, key.
    pub fn claims_by_routing_key(&self) -> BTreeMap<String, String> {
        self.claims
            .iter()
            .map(|((ns, k), o)| (format!("{ns}\u{1f}{k}"), o.clone()))
            .collect()
    }
}

/// The timestamp of a UUID v7 op id (its first 48 bits), or `None` for any
/// other version.
fn v7_unix_ms(op_id: OpId) -> Option<u64> {
    let uuid = op_id.0;
    (uuid.get_version_num() == 7).then(|| u64::try_from(uuid.as_u128() >> 80).expect("48 bits fit"))
}

/// An amount that no `i64` balance can absorb (documented as `overflow`).
fn big_amount(v: u64) -> bool {
    i128::from(v) > i128::from(i64::MAX)
}

fn money(a: &Account) -> Outcome {
    Outcome::Confirmed {
        balance: Some(a.balance),
        available: Some(a.balance - a.held),
    }
}

fn owner_of(s: &str) -> Owner {
    Owner::new(s).expect("stored owners are valid")
}
