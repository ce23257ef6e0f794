//! Decisions and refusal reasons.
//!
//! A refusal is a value, not an error: [`Outcome::Rejected`] with a
//! [`Reason`]. Reasons have stable snake_case codes (the `code` field on the
//! wire) and are checked in a fixed precedence order, documented per command
//! in `specs/protocol.md`; only the first applicable reason is returned.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::field::{AccountId, Amount, Owner};
use crate::id::OpId;

/// The one answer to one operation.
///
/// A duplicate of an operation gets this same value back, byte for byte:
/// the original position and log time included.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Decision {
    /// The operation's id.
    pub op_id: OpId,
    /// The partition that decided.
    pub partition: u32,
    /// The log position (stream sequence) of the request that was decided.
    pub position: u64,
    /// The log time (milliseconds since the Unix epoch) at which it was
    /// decided.
    pub log_time_ms: u64,
    /// Confirmed or rejected, with details.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// For a `transfer` that was accepted (its in-flight answers and its
    /// final decision): what it moves, so a reader of the decisions stream
    /// knows which transfer was confirmed or refused without looking up
    /// its request. Absent on every other decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
}

impl Decision {
    /// A decision with no transfer details.
    pub const fn new(
        op_id: OpId,
        partition: u32,
        position: u64,
        log_time_ms: u64,
        outcome: Outcome,
    ) -> Decision {
        Decision {
            op_id,
            partition,
            position,
            log_time_ms,
            outcome,
            transfer: None,
        }
    }
}

/// What a transfer moves: its request's `from`, `to` and `amount`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Transfer {
    /// The account debited.
    pub from: AccountId,
    /// The account credited.
    pub to: AccountId,
    /// How much.
    pub amount: Amount,
}

/// Confirmed or rejected; for a saga still running (only in status
/// answers, never published), in flight.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The operation took effect.
    Confirmed {
        /// For balance commands: the account's balance after the operation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        balance: Option<i64>,
        /// For balance commands: balance minus pending holds, after the
        /// operation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        available: Option<i64>,
    },
    /// The operation was refused and had no effect.
    Rejected {
        /// Why.
        reason: Reason,
    },
    /// A saga that is still running: the step whose try it waits for. This
    /// is what the status of a saga in flight, or a resubmission of it,
    /// answers; it is never published as a decision. Every saga ends
    /// confirmed or rejected.
    InFlight {
        /// The index of the step being tried.
        step: u32,
    },
}

impl Outcome {
    /// A confirmation without balance details.
    pub const fn confirmed() -> Outcome {
        Outcome::Confirmed {
            balance: None,
            available: None,
        }
    }

    /// Whether the operation was confirmed.
    pub const fn is_confirmed(&self) -> bool {
        matches!(self, Outcome::Confirmed { .. })
    }

    /// The refusal reason, if rejected.
    pub const fn reason(&self) -> Option<&Reason> {
        match self {
            Outcome::Confirmed { .. } | Outcome::InFlight { .. } => None,
            Outcome::Rejected { reason } => Some(reason),
        }
    }

    /// Whether this is a final outcome (not a saga in flight).
    pub const fn is_final(&self) -> bool {
        !matches!(self, Outcome::InFlight { .. })
    }
}

/// Why an operation was refused. The variants are listed in precedence
/// order: when several apply, the first one is returned. The op id comes
/// first (a reused id with another body is a conflict whatever the body; an
/// id that is not UUID v7, or is outside the window, is refused before its
/// body is looked at), then the body, then the envelope (the reply subject
/// the request was published with, then its partition: the body must parse
/// for its routing key to be known), then the command's own checks.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "code", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// The op id was used before with a different body. The first body's
    /// decision stands; this one had no effect.
    OpIdConflict,
    /// The op id's UUID v7 timestamp is outside the dedup window, so
    /// amends can no longer prove it was not applied before (too old), or
    /// the client's clock is too far ahead (too new).
    OpIdOutsideWindow {
        /// The op id's timestamp (ms since the Unix epoch).
        op_time_ms: u64,
        /// The earliest accepted timestamp at this log time.
        earliest_ms: u64,
        /// The latest accepted timestamp at this log time.
        latest_ms: u64,
    },
    /// The message had a readable op id but could not be parsed or
    /// validated: bad JSON, unknown fields or command, a field out of its
    /// limits, too large, or an op id that is not UUID v7.
    Malformed {
        /// What was wrong, for a human.
        detail: String,
    },
    /// The request named a reply subject (`Amends-Reply-To`) that cannot
    /// be published to: empty, longer than `bytes_max` bytes, with an empty
    /// token, a wildcard token (`*`, `>`), or a space or control byte
    /// (`wire::reply_subject_is_valid`). It had no effect, and nothing is
    /// sent to that subject: the decision is on the decisions stream.
    ReplySubjectInvalid {
        /// The longest reply subject accepted, in bytes (256).
        bytes_max: u32,
    },
    /// The request was published on a partition that does not own its
    /// routing key. It had no effect here; publish it on `partition`.
    /// Checking this on every partition keeps a client's routing bug from
    /// giving one key two owners on two partitions.
    WrongPartition {
        /// The partition the request belongs to.
        partition: u32,
    },
    /// No account with that id is open on this partition.
    UnknownAccount,
    /// `open_account` for an id that is already open.
    AccountExists,
    /// `open_account` with a floor above 0 or a ceiling below 0.
    InvalidLimits {
        /// The floor asked for.
        floor: i64,
        /// The ceiling asked for.
        ceiling: Option<i64>,
    },
    /// No hold with that id on that account.
    HoldNotFound,
    /// The hold was already posted.
    HoldAlreadyPosted,
    /// The hold was already voided.
    HoldAlreadyVoided,
    /// The hold expired before it was posted or voided.
    HoldExpired,
    /// A post asked for more than the hold reserved.
    PostExceedsHold {
        /// The amount held.
        held: i64,
        /// The amount asked for.
        requested: u64,
    },
    /// The arithmetic would leave the range of a signed 64-bit balance
    /// (or of log time, for a hold timeout).
    Overflow,
    /// A debit or hold would take the available balance below the floor.
    InsufficientFunds {
        /// Balance minus pending holds, before the operation.
        available: i64,
        /// The account's floor.
        floor: i64,
        /// The amount asked for.
        requested: u64,
    },
    /// A credit would take the balance above the ceiling.
    CeilingExceeded {
        /// The balance before the operation.
        balance: i64,
        /// The account's ceiling.
        ceiling: i64,
        /// The amount asked for.
        requested: u64,
    },
    /// Another owner holds the claim.
    AlreadyClaimed {
        /// Who holds it.
        owner: Owner,
    },
    /// `release` of a key nobody holds.
    NotClaimed,
    /// `release` by someone other than the owner.
    NotOwner {
        /// Who holds it.
        owner: Owner,
    },
    /// `claim` or `release` by the owner of a claim that a saga holds
    /// tentatively: it becomes final or goes away when the saga ends.
    ClaimPending,
    /// A saga was cancelled because its step `step` was refused, for
    /// `reason`; the steps before it were cancelled or compensated.
    StepRefused {
        /// The index of the refused step.
        step: u32,
        /// Why the step was refused.
        reason: Box<Reason>,
    },
    /// A saga was still unfinished at its deadline (log time) and was
    /// cancelled; every step tried or in flight is cancelled.
    DeadlineExceeded {
        /// The log time of the deadline.
        deadline_ms: u64,
    },
    /// A saga step's try arrived after the saga had cancelled it (messages
    /// of different partitions can arrive in any order): it has no effect.
    SagaCancelled,
}

impl Reason {
    /// The stable snake_case code, as in the `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Malformed { .. } => "malformed",
            Reason::OpIdConflict => "op_id_conflict",
            Reason::OpIdOutsideWindow { .. } => "op_id_outside_window",
            Reason::ReplySubjectInvalid { .. } => "reply_subject_invalid",
            Reason::WrongPartition { .. } => "wrong_partition",
            Reason::UnknownAccount => "unknown_account",
            Reason::AccountExists => "account_exists",
            Reason::InvalidLimits { .. } => "invalid_limits",
            Reason::HoldNotFound => "hold_not_found",
            Reason::HoldAlreadyPosted => "hold_already_posted",
            Reason::HoldAlreadyVoided => "hold_already_voided",
            Reason::HoldExpired => "hold_expired",
            Reason::PostExceedsHold { .. } => "post_exceeds_hold",
            Reason::Overflow => "overflow",
            Reason::InsufficientFunds { .. } => "insufficient_funds",
            Reason::CeilingExceeded { .. } => "ceiling_exceeded",
            Reason::AlreadyClaimed { .. } => "already_claimed",
            Reason::NotClaimed => "not_claimed",
            Reason::NotOwner { .. } => "not_owner",
            Reason::ClaimPending => "claim_pending",
            Reason::StepRefused { .. } => "step_refused",
            Reason::DeadlineExceeded { .. } => "deadline_exceeded",
            Reason::SagaCancelled => "saga_cancelled",
        }
    }

    /// Every code in precedence order (the order of `specs/protocol.md`).
    pub const CODES: &'static [&'static str] = &[
        "op_id_conflict",
        "op_id_outside_window",
        "malformed",
        "reply_subject_invalid",
        "wrong_partition",
        "unknown_account",
        "account_exists",
        "invalid_limits",
        "hold_not_found",
        "hold_already_posted",
        "hold_already_voided",
        "hold_expired",
        "post_exceeds_hold",
        "overflow",
        "insufficient_funds",
        "ceiling_exceeded",
        "already_claimed",
        "not_claimed",
        "not_owner",
        "claim_pending",
        "step_refused",
        "deadline_exceeded",
        "saga_cancelled",
    ];
}
