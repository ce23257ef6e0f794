//! The query endpoints' requests and answers (protocol: "Queries"): the
//! status of an op id ([`StatusAnswer`]), an account's balance
//! ([`BalanceAnswer`]), the owner of a claim ([`ClaimQuery`],
//! [`ClaimAnswer`]) and a partition's stats ([`StatsAnswer`]).
//!
//! These are the wire contract of the endpoints: amends-nats's service
//! builds its replies from them and amends-client reads them, and
//! `specs/schemas/` holds their JSON Schemas. Every reply is one JSON
//! object whose `status` says which answer it is; a bad request gets
//! `{"status":"error","detail":...}` ([`ErrorAnswer`]) on every endpoint.
//! [`encode`] writes a reply.
//!
//! Each answer read from a partition's store is as of some applied
//! position (`position`, with its `log_time_ms`): it may trail operations
//! that are in the log but not yet applied (see [`PartitionStats::lag`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::decision::Decision;
use crate::field::{AccountId, ClaimKey, Namespace, Owner};
use crate::id::OpId;

/// The JSON text of a request or an answer of this module, with the keys of
/// every object (nested ones included) in sorted order, as the endpoints
/// have always written them.
///
/// The order carries no meaning (clients must not depend on it); writing
/// one keeps the replies byte for byte stable whatever the field order of
/// the types (tests pin them).
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // serde_json's `Value` keeps an object's keys sorted (the workspace does
    // not enable `preserve_order`; a test would notice if it did). The
    // types here serialize infallibly: no maps with non-string keys, no
    // serializers that fail.
    serde_json::to_value(message)
        .and_then(|value| serde_json::to_vec(&value))
        .unwrap_or_else(|e| panic!("a query message failed to serialize: {e}"))
}

/// The answer to a request that could not be answered: a body that cannot
/// be read, a partition that does not exist, a routing key that another
/// partition owns, or a failed lookup. On the wire,
/// `{"status":"error","detail":...}`, the same on every endpoint.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ErrorAnswer {
    /// What was wrong, for a human.
    pub detail: String,
}

impl ErrorAnswer {
    /// An error answer saying `detail`.
    pub fn new(detail: impl Into<String>) -> ErrorAnswer {
        ErrorAnswer {
            detail: detail.into(),
        }
    }
}

/// Every answer's error variant, from an [`ErrorAnswer`].
macro_rules! from_error_answer {
    ($($answer:ident),*) => {$(
        impl From<ErrorAnswer> for $answer {
            fn from(error: ErrorAnswer) -> $answer {
                $answer::Error(error)
            }
        }
    )*};
}

from_error_answer!(StatusAnswer, BalanceAnswer, ClaimAnswer, StatsAnswer);

/// Where an answer was read: the partition's applied position, and its
/// log time.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct AsOf {
    /// The partition's applied position the answer was read at (or after).
    pub position: u64,
    /// The log time of that position (milliseconds since the Unix epoch).
    pub log_time_ms: u64,
}

/// The body of a request, as text: every endpoint's body must be UTF-8.
pub fn body_text(body: &[u8]) -> Result<&str, ErrorAnswer> {
    std::str::from_utf8(body).map_err(|_| ErrorAnswer::new("the body is not UTF-8"))
}

/// What the status endpoint (`<prefix>.status.<p>`) answers: what the
/// partition knows of one op id. The request body is the op id in
/// canonical text.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StatusAnswer {
    /// The operation was decided: its original decision, whoever submitted
    /// it (for a saga still running, its in-flight outcome).
    Decided {
        /// The decision.
        decision: Decision,
    },
    /// The partition has no record of the op id: not yet in the log, not
    /// yet applied, refused to its sender only (a conflict or a refused op
    /// id is not recorded), or past the dedup horizon.
    Unknown,
    /// The request could not be answered.
    Error(ErrorAnswer),
}

/// The op id of a status request: its canonical text (lower-case hex with
/// hyphens) and nothing else.
pub fn parse_op_id(text: &str) -> Result<OpId, ErrorAnswer> {
    match text.parse::<OpId>() {
        Ok(op_id) if op_id.to_string() == text => Ok(op_id),
        _ => Err(ErrorAnswer::new(format!(
            "{text:?} is not an op id in canonical text"
        ))),
    }
}

/// What the balance query (`<prefix>.query.balance.<p>`) answers. The
/// request body is the account id as UTF-8 text, no JSON quoting.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BalanceAnswer {
    /// The account, as of its partition's applied position.
    Found(Balance),
    /// The partition has no such account (as of the position it has
    /// applied).
    Unknown(AsOf),
    /// The request could not be answered.
    Error(ErrorAnswer),
}

/// An account's balance and limits, as its partition answered.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
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
    /// The highest the balance may reach, if any (null: none).
    pub ceiling: Option<i64>,
    /// The partition's applied position the answer was read at (or after).
    pub position: u64,
    /// The log time of that position.
    pub log_time_ms: u64,
}

/// The account id of a balance request.
pub fn parse_account(text: &str) -> Result<AccountId, ErrorAnswer> {
    AccountId::new(text)
        .map_err(|e| ErrorAnswer::new(format!("{text:?} is not an account id: {e}")))
}

/// The request body of the claim query (`<prefix>.query.claim.<p>`):
/// `{"namespace": <text>, "key": <text>}`, no other field.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimQuery {
    /// The claim's namespace.
    pub namespace: Namespace,
    /// The claim's key in its namespace.
    pub key: ClaimKey,
}

impl ClaimQuery {
    /// Reads a claim query's body: an object of exactly the two text fields,
    /// each valid.
    pub fn parse(text: &str) -> Result<ClaimQuery, ErrorAnswer> {
        let shape =
            || ErrorAnswer::new("the body must be {\"namespace\": <text>, \"key\": <text>}");
        let body = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .map_err(|_| shape())?;
        let field = |name: &str| body.get(name).and_then(serde_json::Value::as_str);
        let (Some(namespace), Some(key), 2) = (field("namespace"), field("key"), body.len()) else {
            return Err(shape());
        };
        Ok(ClaimQuery {
            namespace: Namespace::new(namespace).map_err(|e| ErrorAnswer::new(e.to_string()))?,
            key: ClaimKey::new(key).map_err(|e| ErrorAnswer::new(e.to_string()))?,
        })
    }
}

/// What the claim query answers: who holds a claim, if anyone.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ClaimAnswer {
    /// Someone holds the claim.
    Claimed(Claimed),
    /// Nobody holds the claim.
    Free(Free),
    /// The request could not be answered.
    Error(ErrorAnswer),
}

/// A claim that someone holds, as its partition answered.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Claimed {
    /// Who holds it.
    pub owner: Owner,
    /// Whether a saga in flight holds it tentatively (it becomes final, or
    /// free, when the saga ends).
    #[serde(default)]
    pub tentative: bool,
    /// The claim's namespace.
    pub namespace: Namespace,
    /// The claim's key.
    pub key: ClaimKey,
    /// The partition's applied position the answer was read at (or after).
    pub position: u64,
    /// The log time of that position.
    pub log_time_ms: u64,
}

/// A claim that nobody holds, as its partition answered.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Free {
    /// The claim's namespace.
    pub namespace: Namespace,
    /// The claim's key.
    pub key: ClaimKey,
    /// The partition's applied position the answer was read at (or after).
    pub position: u64,
    /// The log time of that position.
    pub log_time_ms: u64,
}

/// What the stats endpoint (`<prefix>.stats.<p>`) answers. The request
/// body is ignored (send it empty), but must be UTF-8.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StatsAnswer {
    /// The partition's stats.
    Ok(PartitionStats),
    /// The request could not be answered.
    Error(ErrorAnswer),
}

/// What a partition's supervisor is doing.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartitionState {
    /// The worker runs (or is starting).
    Running,
    /// The worker failed transiently and is restarted after a backoff.
    Restarting,
    /// The worker stopped on an integrity error and waits for an operator.
    Stopped,
}

impl PartitionState {
    /// Every state, in this order.
    pub const ALL: [PartitionState; 3] = [
        PartitionState::Running,
        PartitionState::Restarting,
        PartitionState::Stopped,
    ];

    /// The state's name on the wire: `running`, `restarting` or `stopped`.
    pub const fn name(self) -> &'static str {
        match self {
            PartitionState::Running => "running",
            PartitionState::Restarting => "restarting",
            PartitionState::Stopped => "stopped",
        }
    }
}

/// A partition's stats.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct PartitionStats {
    /// The partition.
    pub partition: u32,
    /// What its supervisor is doing.
    pub state: PartitionState,
    /// The error of a restarting or stopped partition (null when running).
    pub detail: Option<String>,
    /// Worker restarts since the serving process started.
    pub restarts: u64,
    /// The store's applied position: the last log message applied.
    pub applied_position: u64,
    /// The log time of the applied position.
    pub log_time_ms: u64,
    /// The requests stream's last sequence on this partition's subject
    /// (null if the service could not read the stream; see
    /// `stream_error`).
    pub last_sequence: Option<u64>,
    /// `last_sequence - applied_position`: how far the partition trails
    /// its log (null with `last_sequence`).
    pub lag: Option<u64>,
    /// Why the stream could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_error: Option<String>,
    /// The partition's owner as the server knows it: its latest ownership
    /// record on the decisions stream, the one decision writes must name
    /// (absent if the partition has none yet, or the record could not be
    /// read; then `owner_error` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<PartitionOwner>,
    /// Why the ownership record could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_error: Option<String>,
}

/// Who owns a partition: its latest ownership record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, JsonSchema)]
pub struct PartitionOwner {
    /// The record's stream sequence on the decisions stream: the owner's
    /// epoch. Decision writes of any older owner are refused.
    pub epoch: u64,
    /// The owning process's host name.
    pub host: String,
    /// The owning process's id on its host.
    pub pid: u32,
}
