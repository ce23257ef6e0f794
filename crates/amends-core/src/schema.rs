//! JSON Schemas of every message on the wire (the query endpoints'
//! requests and answers included), generated from the serde types.
//!
//! `specs/schemas/` holds the output of [`all`], one file per message; the
//! test `tests/schemas.rs` regenerates them and fails when a checked-in file
//! differs, so the files cannot drift from the types. The schemas follow
//! JSON Schema draft 2020-12 and take their titles and descriptions from the
//! types' doc comments.
//!
//! A schema is a necessary check, not a sufficient one: `maxLength` counts
//! Unicode code points while amends limits UTF-8 bytes, and the op id
//! window and every state-dependent rule are decided by the partition.
//! `specs/protocol.md` is the full contract.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::Value;

use crate::command::Request;
use crate::decision::Decision;
use crate::partition::{Apology, HoldExpired};
use crate::protocol::query::{BalanceAnswer, ClaimAnswer, ClaimQuery, StatsAnswer, StatusAnswer};

/// Every message schema as (file name in `specs/schemas/`, schema).
///
/// - `request.json`: a [`Request`], what a client publishes on
///   `<prefix>.req.<p>` (the schema of what amends accepts).
/// - `decision.json`: a [`Decision`], published on `<prefix>.dec.<p>` and
///   sent to a waiting client.
/// - `apology.json`: an [`Apology`], published on
///   `<prefix>.apology.<topic>`.
/// - `hold_expired.json`: a [`HoldExpired`] event, published on
///   `<prefix>.dec.<p>`.
/// - `status_answer.json`: a [`StatusAnswer`], the reply of
///   `<prefix>.status.<p>`.
/// - `balance_answer.json`: a [`BalanceAnswer`], the reply of
///   `<prefix>.query.balance.<p>`.
/// - `claim_query.json`: a [`ClaimQuery`], the request body of
///   `<prefix>.query.claim.<p>` (the schema of what amends accepts).
/// - `claim_answer.json`: a [`ClaimAnswer`], its reply.
/// - `stats_answer.json`: a [`StatsAnswer`], the reply of
///   `<prefix>.stats.<p>`.
pub fn all() -> Vec<(&'static str, Value)> {
    vec![
        ("request.json", accepted::<Request>()),
        ("decision.json", emitted::<Decision>()),
        ("apology.json", emitted::<Apology>()),
        ("hold_expired.json", emitted::<HoldExpired>()),
        ("status_answer.json", emitted::<StatusAnswer>()),
        ("balance_answer.json", emitted::<BalanceAnswer>()),
        ("claim_query.json", accepted::<ClaimQuery>()),
        ("claim_answer.json", emitted::<ClaimAnswer>()),
        ("stats_answer.json", emitted::<StatsAnswer>()),
    ]
}

/// The schema of what amends accepts as `T` (serde's deserialize side).
fn accepted<T: JsonSchema>() -> Value {
    SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// The schema of what amends publishes as `T` (serde's serialize side).
fn emitted<T: JsonSchema>() -> Value {
    SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}
