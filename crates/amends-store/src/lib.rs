//! amends-store: the durable home of every partition's derived state, on
//! sled.
//!
//! The storage boundary is two traits: an [`Engine`] is the store of one
//! process and gives each partition's [`PartitionStore`]; the partition
//! worker and the service of amends-nats are generic over them. sled is
//! the one engine: a [`Store`] is one sled
//! database per process and [`Store::partition`] gives a [`Partition`],
//! one sled tree. The state machine of amends-core reads a partition
//! through [`amends_core::state::Read`] (so a partition's state can be far
//! larger than memory: sled's page cache, sized by
//! [`Options::cache_bytes`], is the only cache) and writes into a
//! [`amends_core::state::ChangeSet`] through an `Overlay`. The driver then
//! makes the whole batch durable with one [`PartitionStore::commit`]:
//!
//! ```text
//! for each batch of log messages:
//!     machine.take(&mut Overlay::new(&partition, &mut changes), ...)?   // every message; a failed read stops the batch
//!     let done = partition.commit(&changes, &effects)?                  // one atomic write + fsync
//!     publish effects; partition.outbox_confirm(done.outbox.end)?       // only now
//! ```
//!
//! A commit is one sled batch holding the state changes, the dedup records
//! (which carry the decisions), the new outbox entries and the new applied
//! position, followed by a flush ([`Durability::Fsync`], the default). A
//! crash anywhere leaves the partition at the end of some committed batch:
//! the driver resumes from [`amends_core::state::Read::clock`], re-publishes
//! [`PartitionStore::outbox_read`], and no decision is lost, doubled or
//! changed.
//!
//! # Modules
//!
//! - `engine`: the boundary, [`Engine`] and [`PartitionStore`], and the
//!   values they exchange ([`Committed`], [`OutboxSeq`], [`Record`], ...).
//!   `error` ([`Error`]) is the boundary's one error type.
//! - `records`: the storage records and their encoding (postcard behind
//!   the [`FORMAT_VERSION`] byte), engine-neutral: bytes in, records out.
//! - sled's engine: `store` ([`Store`], the meta checks), `partition`
//!   ([`Partition`]), `layout` (the keys below), `packed` (records keyed by
//!   op id packed into buckets), `staged` (a sled batch that counts its
//!   writes), `durability` ([`Durability`], when a commit flushes).
//!
//! # Layout on sled
//!
//! - Tree `amends/meta`: `format_version` and `partitions`, each a u32
//!   big-endian, written when the store is created and checked on every
//!   open.
//! - Tree `amends/partition/NNNN` (partition number, 4 digits) per
//!   partition; its keys start with one byte naming the record kind:
//!
//! | key | value |
//! | --- | --- |
//! | `!head` | applied position, log time, outbox end |
//! | `!outbox-confirmed` | the confirmation watermark (entries before it are published) |
//! | `a` + account id | balance, held, floor, ceiling, incoming (credits reserved by sagas) |
//! | `c` + namespace U+001F key | the claim's owner, and the saga step's try holding it if tentative |
//! | `d` + boundary op id (16 bytes), or the tail key | a bucket of about [`BUCKET_LEN_TARGET`] dedup records: op id, fingerprint, decision (position, log time, outcome) |
//! | `e` + expiry ms (8 bytes BE) + hold or saga id | empty: the expiry index (hold expiries, saga deadlines), in time order |
//! | `h` + boundary op id (16 bytes), or the tail key | a bucket of holds: op id, account, amount, expiry, status |
//! | `o` + chunk number (8 bytes BE) | up to [`OUTBOX_CHUNK_LEN`] outbox entries, in order |
//! | `s` + boundary op id (16 bytes), or the tail key | a bucket of sagas: op id, command, apology topic, reply subject, deadline, state |
//!
//! Every value starts with the [`FORMAT_VERSION`] byte, followed by
//! postcard-encoded records of this crate's own record types (the store
//! format does not follow the wire format); the values are `records`', the
//! keys `layout`'s. Records keyed by op id (dedup records, holds, sagas)
//! are packed into buckets whose boundaries depend only on the ids (see
//! [`boundary_hash`]): sled keeps a few hundred bytes of memory per tree
//! page, and a page holds at most 16 keys, so one key per dedup record
//! would make memory grow with every operation ever retained.
//!
//! Writes per operation: its state records (one account, or an account and
//! a hold bucket, or a claim), a share of a dedup bucket (the ids of a batch
//! are close in time, so they share buckets: about one bucket write per
//! [`BUCKET_LEN_TARGET`] operations), and per batch one head plus one
//! outbox chunk per [`OUTBOX_CHUNK_LEN`] effects. A credit costs about
//! 1.05 writes in a batch of 1024, and 4 as a batch of its own.
//!
//! # What it deliberately does not do
//!
//! - It decides nothing: it never interprets a command, and the only
//!   judgement it makes about a record is whether compaction may drop it
//!   (the core's `is_compactable`).
//! - It does not order writers: one writer per partition is the driver's
//!   job. A commit computed from stale state is refused
//!   ([`Error::PositionNotAdvancing`]), not merged.
//! - It does not publish: the outbox keeps entries until the publisher
//!   confirms them; publishing is at least once and consumers drop repeats
//!   by the effects' deterministic ids.
//! - It does not schedule compaction: a driver calls
//!   [`PartitionStore::compact`] (on any thread) with the horizon of its
//!   configuration.
//! - It does not migrate: a store of another format version is refused;
//!   rebuild it from the log.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod durability;
mod engine;
mod error;
mod layout;
mod packed;
mod partition;
mod records;
mod staged;
mod store;

pub use durability::Durability;
pub use engine::{Committed, Compacted, Engine, OutboxRange, OutboxSeq, PartitionStore, Record};
pub use error::{Error, KeyText, Result, Source};
pub use layout::OUTBOX_CHUNK_LEN;
pub use packed::{BUCKET_LEN_TARGET, boundary_hash};
pub use partition::{COMPACT_CHUNK_LEN, Partition, Records};
pub use records::{FORMAT_VERSION, Head};
pub use store::{CACHE_BYTES_DEFAULT, OPEN_LOCK_WAIT_MS, Options, Store};
