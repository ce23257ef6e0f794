//! amends-client: the Rust client of amends.
//!
//! A [`Client`] connects to NATS, routes each [`Request`] to the partition
//! that owns its routing key, publishes it to that partition's request log
//! and waits for its one [`Decision`], exactly as `specs/protocol.md` says a
//! client in any language must.
//!
//! ```no_run
//! # async fn demo() -> Result<(), amends_client::Error> {
//! use std::time::Duration;
//! use amends_client::{Client, Options};
//! use amends_core::{Command, Request};
//! use amends_core::command::AccountId;
//!
//! let client = Client::connect(Options::new("nats://127.0.0.1:4222")).await?;
//! let request = Request {
//!     op_id: Client::new_op_id(),
//!     command: Command::OpenAccount {
//!         account: AccountId::new("alice").expect("a valid id"),
//!         floor: 0,
//!         ceiling: None,
//!     },
//!     apology_topic: None,
//! };
//! let decision = client
//!     .submit_and_wait(&request, Duration::from_secs(2), 5)
//!     .await?;
//! println!("{:?}", decision.outcome);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`Client`]: connect, [`Client::submit`], [`Client::wait`],
//!   [`Client::submit_and_wait`]. One inbox subscription per client,
//!   `_INBOX.<nuid>.*`; each operation's reply subject is
//!   `_INBOX.<nuid>.<op id>`, and a map of waiters keyed by op id hands each
//!   decision to whoever waits for it. Many operations may be in flight at
//!   once; `Client` is a cheap handle to clone into tasks.
//! - [`Client::submit_optimistic`] (publish with an apology topic, go
//!   ahead) and [`Client::apologies`]: a [`Stream`](futures_util::Stream)
//!   of [`Delivery`]s (an apology and its ack handle) from a durable
//!   JetStream pull consumer, at least once.
//! - [`Options`], [`Auth`], [`Tls`]: how to reach the deployment.
//! - [`Prefix`]: the validated subject prefix, and with it every subject
//!   and header name and the answers of the query endpoints: the protocol's
//!   own types in [`amends_core::protocol`], the same ones the service
//!   uses, so that the two cannot drift.
//! - [`Error`]: the one error type; async-nats errors are boxed inside it,
//!   never re-exported.
//!
//! # What it deliberately does not do (yet)
//!
//! It depends on amends-core only, never on amends-nats or a store. It does
//! not send ticks (amends appends its own). It does not deduplicate
//! apologies for a workflow: delivery is at least once, and the workflow
//! keys its amends by op id (see [`Client::apologies`]). It keeps no record of decisions it has handed
//! out; a resubmission that JetStream drops as a duplicate (no reply comes)
//! is answered through the status endpoint, which `submit_and_wait` asks
//! after a timeout.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod apology;
mod client;
mod error;
mod options;
mod query;

pub use amends_core::protocol::{PREFIX_BYTES_MAX, Prefix};
pub use amends_core::{Decision, OpId, Request};
pub use apology::{
    APOLOGY_ACK_WAIT_DEFAULT, Apologies, ApologiesOptions, DURABLE_NAME_BYTES_MAX, Delivery,
};
pub use client::{Client, OpStatus, Submitted, read_partitions};
pub use error::{Error, Source};
pub use options::{Auth, ClientCert, Options, Tls};
pub use query::{Balance, ClaimOwner, PartitionState, PartitionStats};

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
