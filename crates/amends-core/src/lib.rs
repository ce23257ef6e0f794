//! amends-core: the deterministic, sans-IO heart of amends.
//!
//! Everything amends decides is decided here: the ids, the commands a client
//! may send, the decisions and refusal reasons it gets back, the partition
//! state machine (dedup, uniqueness, balances, holds), the partitioner and the
//! wire format. Given the same log prefix, [`partition::Machine::take`] (the
//! one entry of a raw log message) makes the same decisions and the same
//! state changes, bit for bit.
//!
//! # Layout
//!
//! - [`id`]: operation ids ([`OpId`]) and the ids derived from them.
//! - `json` (private): the serde helpers that keep the wire JSON to objects.
//! - [`command`]: validated commands and requests; only parsing builds them.
//!   Their validated fields (ids, names, amounts, with their limits) are
//!   defined in the private `field` module, below `command` and
//!   [`decision`], and re-exported by `command`.
//! - [`decision`]: decisions, outcomes and the closed set of refusal reasons.
//! - [`state`]: the records a partition keeps, the narrow [`state::Read`] /
//!   [`state::Write`] traits a store implements, a change set with a read
//!   overlay, and an in-memory state.
//! - [`invariants`]: the invariants of DESIGN.md over partition states
//!   (money, one owner per claim, one answer per op, sagas that end,
//!   nothing left reserved), written once for the model tests, the saga
//!   simulation and `amends audit`.
//! - [`partition`]: the partition state machine and the effects it emits,
//!   one file per concern (dedup, balances and holds, claims, sagas).
//! - [`protocol`]: the names of the protocol (the subject [`protocol::Prefix`]
//!   and the subjects, streams, headers and meta bucket built from it, the
//!   recorded partition count) and, in [`protocol::query`], the requests
//!   and answers of the query endpoints.
//! - [`route`]: the partitioner (FNV-1a 64 then jump consistent hash).
//! - [`saga`]: sagas across partitions (try, confirm, cancel), the ids of
//!   their step messages and the machine's saga side (`partition::saga`,
//!   re-exported here).
//! - [`schema`]: the JSON Schemas of the wire messages (`specs/schemas/`).
//! - [`wire`]: decoding log messages and encoding outbound ones (JSON), with
//!   the size limits of the protocol.
//!
//! # What it deliberately does not do
//!
//! It reads no clock, draws no random numbers, does no I/O and spawns no
//! tasks. Time and position come in as arguments; side effects go out as
//! [`partition::Effect`] values that a driver runs after its durable commit.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod command;
pub mod decision;
mod field;
pub mod id;
pub mod invariants;
mod json;
pub mod partition;
pub mod protocol;
pub mod route;
pub mod schema;
pub mod state;
pub mod wire;

pub use command::{Command, Request};
pub use decision::{Decision, Outcome, Reason, Transfer};
pub use id::OpId;
pub use partition::saga;
