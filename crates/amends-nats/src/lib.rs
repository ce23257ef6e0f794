//! amends-nats: the NATS JetStream side of amends.
//!
//! It holds the **topology** and the **partition worker**. The topology:
//! the subject names and headers of `specs/protocol.md`, the names and settings of the four JetStream streams,
//! and [`topology::ensure`], which creates those streams on first start and
//! checks them on every later start, refusing (never overwriting) a stream
//! whose settings amends cannot rely on, and refusing a partition count other
//! than the one the deployment was created with.
//!
//! # Layout
//!
//! - [`topology`]: [`topology::Prefix`] (the validated subject prefix) and
//!   its subject builders, the header names in [`topology::header`] (the
//!   protocol's, re-exported from [`amends_core::protocol`]),
//!   [`topology::Topology`] (the deployment's configuration),
//!   [`topology::ensure`] and its [`topology::Report`], and the integrity
//!   notes on JetStream's fsync behaviour.
//! - [`worker`]: [`worker::run_partition`], the driver of one partition:
//!   fetch a batch from its durable pull consumer, take each message
//!   through amends-core (decode, then apply or dead-letter), one store
//!   commit, publish the outbox (dead letters included) with deterministic
//!   `Nats-Msg-Id`s, reply to `Amends-Reply-To`, acknowledge; on start it
//!   republishes the unconfirmed outbox and recreates the consumer right
//!   after the store's applied position.
//! - [`service`]: [`service::Service`], the supervisor of every partition
//!   in one process: restarts workers after transient failures with a
//!   capped exponential backoff, stops a partition for good (loudly, in its
//!   [`service::Status`]) when its log went backwards, publishes ticks so
//!   holds expire on idle partitions, and compacts each partition on a
//!   blocking thread; its request-reply endpoints (a NATS micro service
//!   `amends`: the status of an op id, balance and claim queries,
//!   partition stats) answer from the store.
//! - [`metrics`]: the counters, gauges and histograms the workers and the
//!   service record (exported by `amends serve --metrics-addr`).
//! - [`Error`]: the one error type; async-nats errors are wrapped in it,
//!   never re-exported.
//! - `test_support` (cargo feature `test-support`): real `nats-server`
//!   processes on free loopback ports for integration tests, here and in the
//!   root package.
//!
//! **Architecture Invariant:** subject, stream and header names are the
//! protocol's, defined once in [`amends_core::protocol`] (and used by the
//! client too): this crate asks [`topology::Prefix`] or uses the constants
//! of [`topology::header`], its re-exports of them, and restates none. The
//! query endpoints answer with [`amends_core::protocol::query`]'s types.
//!
//! # What it deliberately does not do (yet)
//!
//! It installs no metrics exporter (the binary does). A worker that stops
//! returns its [`Error`]; [`service`] restarts it or stops its partition.
//! It does not connect to NATS either: the caller owns the connection (URLs,
//! credentials, TLS) and hands [`topology::ensure`] a JetStream context. It
//! never deletes or edits an existing stream: an incompatible stream is an
//! operator's decision. (A worker does delete and recreate its own consumer,
//! `worker-<p>`: the store, not the consumer, knows where to resume.)
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod lease;
pub mod metrics;
pub mod service;
pub mod topology;
pub mod worker;

#[cfg(feature = "test-support")]
pub mod test_support;

pub use error::{Error, Source};
