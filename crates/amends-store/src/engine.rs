//! The storage boundary: what a driver needs of a store, as two traits
//! that any engine implements ([`Engine`] for the store of a process,
//! [`PartitionStore`] for one partition's), and the values they exchange.
//!
//! The partition worker and the service of amends-nats are generic over
//! these traits; sled's [`crate::Store`] and [`crate::Partition`] are the
//! one implementation. The contract is the trait's documentation: every
//! engine keeps it, and the store's crash and property tests are written
//! against the traits so that a second engine runs them unchanged.
//!
//! Errors are the store's one [`Error`] type whatever the engine: the
//! service tells a failed engine ([`Error::Storage`], which only a new
//! process mends) from a refused request by its variant, so an engine maps
//! its own failures onto those variants ([`Error::storage`],
//! [`Error::corrupt`]).

use std::fmt;

use amends_core::command::AccountId;
use amends_core::id::OpId;
use amends_core::partition::Effect;
use amends_core::route::{PartitionId, Partitions};
use amends_core::state::{
    Account, ChangeSet, Claim, Dedup, ExpiryKey, Hold, MemState, Read, Saga, Write,
};

use crate::error::{Error, Result};
use crate::records::Head;

/// The store of one process: every partition's [`PartitionStore`].
///
/// Opening one is the engine's own business (its options differ); what
/// the service needs of it once open is here.
pub trait Engine: Clone + fmt::Debug + Send + Sync + 'static {
    /// The store of one partition.
    type Partition: PartitionStore;

    /// The partition count the store was created with; a store opened with
    /// another is refused ([`Error::PartitionCount`]).
    fn partitions(&self) -> Partitions;

    /// The handle of partition `id` ([`Error::NoSuchPartition`] at or above
    /// [`Engine::partitions`]). Handles of one partition share its data
    /// and its write serialization.
    fn partition(&self, id: PartitionId) -> Result<Self::Partition>;
}

/// One partition's durable state, as a driver uses it: reads for the state
/// machine (through [`Read`], whose failures stop a batch), one atomic
/// commit per batch, the outbox, compaction, and its head.
///
/// A cheap handle (clone it freely); clones see the same data. One writer
/// per partition calls [`PartitionStore::commit`]; a publisher may call
/// the outbox methods and a background thread
/// [`PartitionStore::compact`] at the same time, and an engine must keep
/// those three safe together.
///
/// After any `Err` from [`PartitionStore::commit`], nothing derived from
/// that batch may be published or acknowledged: the driver drops the
/// handle and opens it again, which resumes from the last durable batch.
pub trait PartitionStore: Read<Error = Error> + Clone + fmt::Debug + Send + Sync + 'static {
    /// The iterator of [`PartitionStore::records`].
    type Records: Iterator<Item = Result<Record>>;

    /// The partition's id.
    fn id(&self) -> PartitionId;

    /// The applied clock and the outbox end.
    fn head(&self) -> Result<Head>;

    /// Commits one batch atomically: every write of `changes`, one outbox
    /// entry per effect (in order) and the new head, all or nothing, and
    /// durable on return as the engine's durability setting says. Only
    /// after `Ok` may the driver publish the effects or acknowledge the
    /// batch's messages.
    ///
    /// `changes` is only read: the driver may keep reading it (the next
    /// batch is applied over it while this one commits) and clears it for
    /// reuse. On `Ok`, the effects' outbox entries are returned, with the
    /// batch's size. A change set whose applied position is not after the
    /// store's is [`Error::PositionNotAdvancing`] and writes nothing; so
    /// does an empty batch (no changes, no effects), which is `Ok`.
    fn commit(&self, changes: &ChangeSet, effects: &[Effect]) -> Result<Committed>;

    /// One past the last outbox entry ever written.
    fn outbox_end(&self) -> Result<OutboxSeq> {
        Ok(OutboxSeq(self.head()?.outbox_end))
    }

    /// Every outbox entry before this one is confirmed.
    fn outbox_confirmed(&self) -> Result<OutboxSeq>;

    /// Up to `len_max` unconfirmed outbox entries from `from` on (entries
    /// before the confirmation watermark are skipped), in order.
    ///
    /// On open, a driver re-publishes `outbox_read(OutboxSeq(0), n)` page by
    /// page before it applies anything new: those entries were committed but
    /// maybe never published. Publishing is at least once; every effect
    /// carries a deterministic id for consumers to drop repeats.
    fn outbox_read(&self, from: OutboxSeq, len_max: usize) -> Result<Vec<(OutboxSeq, Effect)>>;

    /// Records that every outbox entry before `end` was published (the
    /// engine may then forget them). Confirming less than before does
    /// nothing; confirming beyond [`PartitionStore::outbox_end`] is
    /// [`Error::OutboxConfirmBeyond`].
    ///
    /// It need not be durable on its own: the next commit makes it so. A
    /// confirmation lost in a crash only makes the driver publish those
    /// entries again.
    fn outbox_confirm(&self, end: OutboxSeq) -> Result<()> {
        self.outbox_confirm_published(end, None)
    }

    /// [`PartitionStore::outbox_confirm`], recording in the same write the
    /// highest decisions-stream sequence the confirmed entries were stored
    /// at (kept if lower than the one recorded).
    fn outbox_confirm_published(&self, end: OutboxSeq, published: Option<u64>) -> Result<()>;

    /// The decisions-stream sequence recorded by the last
    /// [`PartitionStore::outbox_confirm_published`] (0 if none): every
    /// decision of this partition published before the unconfirmed outbox
    /// entries is at or below it. A driver that republishes the unconfirmed
    /// outbox reads the decisions after it to find which entries are
    /// already on the stream, so that exactly once there does not depend on
    /// the stream's duplicate window.
    fn decisions_published(&self) -> Result<u64>;

    /// The requests-stream sequence up to which messages missing from the
    /// stream (deleted or purged) were accepted, 0 if none: a store that
    /// started empty accepts the log as it found it (its operator chose to
    /// replay that log), so a driver that looks for holes in the log only
    /// counts those above both this and the applied position.
    fn log_accepted(&self) -> Result<u64>;

    /// Records [`PartitionStore::log_accepted`] (kept if `sequence` is
    /// lower). It need not be durable before the next commit: lost in a
    /// crash before one, the store is still empty and the driver records
    /// it again.
    fn accept_log_up_to(&self, sequence: u64) -> Result<()>;

    /// Removes the dedup records, resolved holds and ended sagas older than
    /// `horizon_ms` (log time; see
    /// [`amends_core::partition::Config::compaction_horizon_ms`]), by the
    /// core's rules (`is_compactable`). Meant for a background thread,
    /// concurrently with the writer's commits: it must never remove a
    /// record a commit rewrote meanwhile, and should not hold a commit up
    /// for a whole pass. Compacting at one horizon twice changes nothing
    /// the second time.
    fn compact(&self, horizon_ms: u64) -> Result<Compacted>;

    /// Removes every record of the partition (state, dedup records, outbox,
    /// head), durably, for a rebuild by replay.
    ///
    /// To rebuild: note [`PartitionStore::outbox_confirmed`], clear, replay
    /// the whole log through `Machine::take` and
    /// [`PartitionStore::commit`] (any batching), confirm the noted
    /// watermark, and compact at the horizons the original was compacted at
    /// (compacting once at the last horizon gives the same records).
    fn clear(&self) -> Result<()>;

    /// Every record of the partition decoded, outbox entries one by one,
    /// in an order of the engine's choosing. For audits, and for checking
    /// that a store decodes completely.
    fn records(&self) -> Self::Records;

    /// The partition's state (accounts, holds, claims, dedup records, sagas,
    /// the expiry index and the clock) in memory, for audits and tests of a
    /// partition that fits in memory.
    fn to_mem_state(&self) -> Result<MemState> {
        let mut mem = MemState::new();
        for r in self.records() {
            match r? {
                Record::Head(h) => mem.set_clock(h.clock),
                Record::Account(id, a) => mem.put_account(&id, a),
                Record::Claim(k, c) => mem.put_claim(&k, Some(c)),
                Record::Dedup(op, d) => mem.put_dedup(op, d),
                Record::Expiry(k) => mem.put_expiry(k, true),
                Record::Hold(op, h) => mem.put_hold(op, h),
                Record::Saga(op, s) => mem.put_saga(op, s),
                Record::OutboxConfirmed(_)
                | Record::DecisionsPublished(_)
                | Record::LogAccepted(_)
                | Record::Outbox(..) => {}
            }
        }
        Ok(mem)
    }
}

/// The position of an entry in a partition's outbox: 0 for the first
/// effect the partition ever emitted, then one more per effect. The same
/// log gives every effect the same sequence number, however it is batched.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct OutboxSeq(pub u64);

impl OutboxSeq {
    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for OutboxSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The outbox entries a commit wrote: `start..end` (end exclusive), one per
/// effect, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct OutboxRange {
    /// The first entry's sequence number.
    pub start: OutboxSeq,
    /// One past the last entry: pass it to
    /// [`PartitionStore::outbox_confirm`] once every entry is published.
    pub end: OutboxSeq,
}

impl OutboxRange {
    /// How many entries.
    pub fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether the commit wrote no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a commit wrote: its outbox entries, and its size for metrics.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Committed {
    /// The outbox entries of the batch's effects.
    pub outbox: OutboxRange,
    /// Keys the engine wrote or removed for the batch.
    pub writes: u64,
    /// Bytes of keys and values written for the batch.
    pub bytes: u64,
}

/// What one compaction pass removed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Compacted {
    /// Dedup records removed.
    pub dedup: u64,
    /// Resolved holds removed.
    pub holds: u64,
    /// Ended sagas removed.
    pub sagas: u64,
    /// Records that were compactable when read but had changed by the time
    /// of the removal, and were kept.
    pub skipped: u64,
}

/// One record of a partition, decoded; see [`PartitionStore::records`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Record {
    /// The applied clock and the outbox end.
    Head(Head),
    /// Every outbox entry before this one was confirmed.
    OutboxConfirmed(OutboxSeq),
    /// The decisions-stream sequence published through at the last
    /// confirmation.
    DecisionsPublished(u64),
    /// See [`PartitionStore::log_accepted`].
    LogAccepted(u64),
    /// An account.
    Account(AccountId, Account),
    /// A claim, by claim routing key (`namespace` U+001F `key`).
    Claim(String, Claim),
    /// A dedup record.
    Dedup(OpId, Dedup),
    /// An entry of the expiry index.
    Expiry(ExpiryKey),
    /// A hold.
    Hold(OpId, Hold),
    /// A saga (in flight, or ended and not yet compacted).
    Saga(OpId, Saga),
    /// An unconfirmed (or not yet removed) outbox entry.
    Outbox(OutboxSeq, Effect),
}
