//! What the service's query endpoints answer (protocol: "Queries"): an
//! account's balance ([`crate::Client::balance`]), the owner of a claim
//! ([`crate::Client::claim_owner`]) and a partition's stats
//! ([`crate::Client::stats`]).
//!
//! Each answer is read from the partition's store as of some applied
//! position (`position`): it may trail operations that are in the log but
//! not yet applied (see [`PartitionStats::lag`]).

use amends_core::command::{AccountId, Owner};
use serde::{Deserialize, Serialize};

/// An account's balance and limits, as its partition answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// The account.
    pub account: AccountId,
    /// Credits minus debits minus posted holds.
    pub balance: i64,
    /// The sum of pending holds. The holds themselves are not listed: the
    /// store keeps them by op id, with no index by account.
    pub held: i64,
    /// Credits reserved by sagas in flight: they count against the ceiling
    /// and join the balance when their saga confirms.
    #[serde(default)]
    pub incoming: i64,
    /// `balance - held`.
    pub available: i64,
    /// The lowest `available` may reach (at most 0).
    pub floor: i64,
    /// The highest the balance may reach, if any.
    pub ceiling: Option<i64>,
    /// The partition's applied position the answer was read at (or after).
    pub position: u64,
    /// The log time of that position.
    pub log_time_ms: u64,
}

/// A claim's owner, as its partition answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimOwner {
    /// Who holds the claim; `None` when it is free.
    pub owner: Option<Owner>,
    /// Whether a saga in flight holds it tentatively (it becomes final, or
    /// free, when the saga ends).
    #[serde(default)]
    pub tentative: bool,
    /// The partition's applied position the answer was read at (or after).
    pub position: u64,
    /// The log time of that position.
    pub log_time_ms: u64,
}

/// What a partition's supervisor is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionState {
    /// The worker runs (or is starting).
    Running,
    /// The worker failed transiently and is restarted after a backoff.
    Restarting,
    /// The worker stopped on an integrity error and waits for an operator.
    Stopped,
}

/// A partition's stats ([`crate::Client::stats`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStats {
    /// The partition.
    pub partition: u32,
    /// What its supervisor is doing.
    pub state: PartitionState,
    /// The error of a restarting or stopped partition.
    pub detail: Option<String>,
    /// Worker restarts since the serving process started.
    pub restarts: u64,
    /// The store's applied position: the last log message applied.
    pub applied_position: u64,
    /// The log time of the applied position.
    pub log_time_ms: u64,
    /// The requests stream's last sequence on this partition's subject
    /// (`None` if the service could not read the stream; see
    /// `stream_error`).
    pub last_sequence: Option<u64>,
    /// `last_sequence - applied_position`: how far the partition trails
    /// its log.
    pub lag: Option<u64>,
    /// Why the stream could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_error: Option<String>,
}
