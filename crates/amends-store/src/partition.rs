//! One partition's durable state: reads for the state machine, the group
//! commit, the outbox, compaction, clearing for a rebuild, and a canonical
//! dump.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use amends_core::command::AccountId;
use amends_core::id::OpId;
use amends_core::partition::Effect;
use amends_core::route::PartitionId;
use amends_core::state::{
    Account, ChangeSet, Claim, Clock, Dedup, ExpiryKey, Hold, MemState, Read, Saga, Write,
};

use crate::codec::{self, Head, OUTBOX_CHUNK_LEN};
use crate::durability::Durability;
use crate::error::{Error, Result};
use crate::packed::{self, Editor};
use crate::staged::Staged;

/// How many records one chunk of [`Partition::compact`] removes at most
/// while holding the partition's write lock: enough to amortize the batch,
/// few enough that a waiting commit is held up for about a millisecond.
pub const COMPACT_CHUNK_LEN: usize = 256;

/// The packed maps compaction visits, in order.
const COMPACTED_PREFIXES: [u8; 3] = [codec::PREFIX_DEDUP, codec::PREFIX_HOLD, codec::PREFIX_SAGA];

/// Whether the record `body` of packed map `prefix` may be forgotten. For
/// a dedup record, the core's rule (`Dedup::is_compactable`: decided
/// before the horizon) on its quickly read log time; a unit test keeps the
/// two in step. For a hold or a saga, the core's rule on the decoded record
/// (a saga in flight is never compactable).
fn compactable(prefix: u8, key: &[u8], body: &[u8], horizon_ms: u64) -> Result<bool> {
    Ok(match prefix {
        codec::PREFIX_DEDUP => codec::dedup_log_time_ms(key, body)? < horizon_ms,
        codec::PREFIX_SAGA => codec::decode_saga(key, body)?.is_compactable(horizon_ms),
        _ => codec::decode_hold(key, body)?.is_compactable(horizon_ms),
    })
}

/// The records of a change set's map as packed entries, in id order.
fn sorted_entries<'a, T: 'a>(
    records: impl Iterator<Item = (&'a OpId, &'a T)>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Vec<packed::Entry> {
    let mut out: Vec<packed::Entry> = records
        .map(|(op, rec)| packed::Entry {
            id: codec::id_bytes(*op),
            body: encode(rec),
        })
        .collect();
    out.sort_unstable_by_key(|e| e.id);
    out
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
    /// One past the last entry: pass it to [`Partition::outbox_confirm`]
    /// once every entry is published.
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
    /// sled keys written or removed by the batch.
    pub writes: u64,
    /// Bytes of keys and values written by the batch.
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

/// One record of a partition, decoded; see [`Partition::records`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Record {
    /// The applied clock and the outbox end.
    Head(Head),
    /// Every outbox entry before this one was confirmed.
    OutboxConfirmed(OutboxSeq),
    /// The decisions-stream sequence published through at the last
    /// confirmation.
    DecisionsPublished(u64),
    /// See [`Partition::log_accepted`].
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

/// One partition of a [`crate::Store`]: a sled tree.
///
/// A cheap handle (clone it freely); clones see the same data. One writer
/// per partition calls [`Partition::commit`] (the state machine reads it
/// through [`Read`]); a publisher may call the outbox methods and a
/// background thread [`Partition::compact`] at the same time.
///
/// A read through [`Read`] that fails (an I/O error, a corrupt record)
/// returns the [`Error`]; the state machine stops the batch on it
/// (`Fault::Read`), so a decision made on missing state never reaches
/// [`Partition::commit`].
#[derive(Clone)]
pub struct Partition {
    id: PartitionId,
    tree: sled::Tree,
    durability: Durability,
    /// Held by [`Partition::commit`] and by each chunk of
    /// [`Partition::compact`]: both rewrite packed buckets from what they
    /// read, so they must not interleave.
    write_lock: Arc<Mutex<()>>,
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partition")
            .field("id", &self.id)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl Partition {
    pub(crate) fn new(
        id: PartitionId,
        tree: sled::Tree,
        durability: Durability,
        write_lock: Arc<Mutex<()>>,
    ) -> Partition {
        Partition {
            id,
            tree,
            durability,
            write_lock,
        }
    }

    /// The partition's id.
    pub const fn id(&self) -> PartitionId {
        self.id
    }

    /// The applied clock and the outbox end.
    pub fn head(&self) -> Result<Head> {
        match self
            .tree
            .get(codec::KEY_HEAD)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(Head::default()),
            Some(v) => codec::decode_head(codec::KEY_HEAD, &v),
        }
    }

    /// Commits one batch atomically: every write of `changes`, one outbox
    /// entry per effect (in order) and the new head, as one sled batch,
    /// then (with [`Durability::Fsync`]) a flush. Only after `Ok` may the
    /// driver publish the effects or acknowledge the batch's messages.
    ///
    /// `changes` is only read: the driver may keep reading it (the next
    /// batch is applied over it while this one commits) and clears it for
    /// reuse. On `Ok`, the effects' outbox entries are returned, with the
    /// batch's size. On
    /// `Err`, nothing derived from the batch may be published: the driver
    /// drops the store and reopens it, which resumes from the last durable
    /// batch. An empty batch (no changes, no effects) writes nothing.
    pub fn commit(&self, changes: &ChangeSet, effects: &[Effect]) -> Result<Committed> {
        let head = self.head()?;
        let start = OutboxSeq(head.outbox_end);
        if changes.is_empty() && effects.is_empty() {
            let outbox = OutboxRange { start, end: start };
            return Ok(Committed {
                outbox,
                ..Committed::default()
            });
        }
        let clock = match changes.clock {
            Some(c) if c.position <= head.clock.position => {
                return Err(Error::PositionNotAdvancing {
                    applied: head.clock.position,
                    got: c.position,
                });
            }
            Some(c) => c,
            None => head.clock,
        };

        let writing = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut batch = Staged::default();
        for (id, a) in &changes.accounts {
            batch.insert(codec::key_account(id.as_str()), codec::encode_account(a));
        }
        let mut holds = Editor::new(&self.tree, codec::PREFIX_HOLD);
        holds.upsert_sorted(sorted_entries(changes.holds.iter(), codec::encode_hold))?;
        holds.write_into(&mut batch);
        for (key, c) in &changes.claims {
            match c {
                Some(c) => batch.insert(codec::key_claim(key), codec::encode_claim(c)),
                None => batch.remove(codec::key_claim(key)),
            }
        }
        // A saga's dedup record is rewritten (same op id) as the saga moves
        // on, possibly in a later batch: an upsert replaces it in its
        // bucket. `dedup_order` is not needed here: buckets are in id order
        // and the outbox follows `effects`.
        let mut dedup = Editor::new(&self.tree, codec::PREFIX_DEDUP);
        dedup.upsert_sorted(sorted_entries(changes.dedup.iter(), codec::encode_dedup))?;
        dedup.write_into(&mut batch);
        let mut sagas = Editor::new(&self.tree, codec::PREFIX_SAGA);
        sagas.upsert_sorted(sorted_entries(changes.sagas.iter(), codec::encode_saga))?;
        sagas.write_into(&mut batch);
        for (k, present) in &changes.expiries {
            if *present {
                batch.insert(&codec::key_expiry(*k), codec::encode_marker());
            } else {
                batch.remove(&codec::key_expiry(*k));
            }
        }
        let end = self.append_outbox(&mut batch, head.outbox_end, effects)?;
        batch.insert(
            codec::KEY_HEAD,
            codec::encode_head(&Head {
                clock,
                outbox_end: end,
            }),
        );

        let (writes, bytes) = (batch.writes, batch.bytes);
        self.tree
            .apply_batch(batch.batch)
            .map_err(|e| Error::storage("commit", e))?;
        // The buckets are written: compaction may go on while we fsync.
        drop(writing);
        if self.durability == Durability::Fsync {
            self.tree.flush().map_err(|e| Error::storage("flush", e))?;
        }
        Ok(Committed {
            outbox: OutboxRange {
                start,
                end: OutboxSeq(end),
            },
            writes,
            bytes,
        })
    }

    /// Appends `effects` to the outbox chunks from `start` on; returns the
    /// new outbox end.
    fn append_outbox(&self, batch: &mut Staged, start: u64, effects: &[Effect]) -> Result<u64> {
        let Some(len) = u64::try_from(effects.len())
            .ok()
            .and_then(|n| start.checked_add(n))
        else {
            return Err(Error::corrupt(codec::KEY_HEAD, "outbox sequence overflow"));
        };
        if effects.is_empty() {
            return Ok(start);
        }
        let mut chunk = start / OUTBOX_CHUNK_LEN;
        let mut buf = if start.is_multiple_of(OUTBOX_CHUNK_LEN) {
            codec::outbox_chunk_start()
        } else {
            // The last chunk is partly filled: extend it. Confirmation never
            // removes a chunk that is not full, so it must be there.
            let key = codec::key_outbox(chunk);
            match self.tree.get(key).map_err(|e| Error::storage("read", e))? {
                Some(v) => v.to_vec(),
                None => {
                    return Err(Error::corrupt(
                        &key,
                        format!("outbox chunk missing though the outbox end is {start}"),
                    ));
                }
            }
        };
        for (seq, e) in (start..).zip(effects) {
            if seq / OUTBOX_CHUNK_LEN != chunk {
                batch.insert(&codec::key_outbox(chunk), std::mem::take(&mut buf));
                chunk = seq / OUTBOX_CHUNK_LEN;
                buf = codec::outbox_chunk_start();
            }
            codec::encode_effect_into(e, &mut buf);
        }
        batch.insert(&codec::key_outbox(chunk), buf);
        Ok(len)
    }

    /// One past the last outbox entry ever written.
    pub fn outbox_end(&self) -> Result<OutboxSeq> {
        Ok(OutboxSeq(self.head()?.outbox_end))
    }

    /// Every outbox entry before this one is confirmed.
    pub fn outbox_confirmed(&self) -> Result<OutboxSeq> {
        match self
            .tree
            .get(codec::KEY_CONFIRMED)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(OutboxSeq(0)),
            Some(v) => Ok(OutboxSeq(codec::decode_u64(codec::KEY_CONFIRMED, &v)?)),
        }
    }

    /// Up to `len_max` unconfirmed outbox entries from `from` on (entries
    /// before the confirmation watermark are skipped), in order.
    ///
    /// On open, a driver re-publishes `outbox_read(OutboxSeq(0), n)` page by
    /// page before it applies anything new: those entries were committed but
    /// maybe never published. Publishing is at least once; every effect
    /// carries a deterministic id for consumers to drop repeats.
    pub fn outbox_read(&self, from: OutboxSeq, len_max: usize) -> Result<Vec<(OutboxSeq, Effect)>> {
        let from = from.max(self.outbox_confirmed()?).0;
        let mut out = Vec::new();
        let start_key = codec::key_outbox(from / OUTBOX_CHUNK_LEN).to_vec();
        let end_key = vec![codec::PREFIX_OUTBOX + 1];
        for item in self.tree.range(start_key..end_key) {
            if out.len() >= len_max {
                break;
            }
            let (k, v) = item.map_err(|e| Error::storage("read", e))?;
            let chunk = codec::decode_outbox_key(&k)?;
            let first = chunk
                .checked_mul(OUTBOX_CHUNK_LEN)
                .ok_or_else(|| Error::corrupt(&k, "outbox chunk number out of range"))?;
            for (seq, e) in (first..).zip(codec::decode_outbox_chunk(&k, &v)?) {
                if seq >= from && out.len() < len_max {
                    out.push((OutboxSeq(seq), e));
                }
            }
        }
        Ok(out)
    }

    /// Records that every outbox entry before `end` was published, and
    /// removes the chunks that hold only confirmed entries. Confirming less
    /// than before does nothing; confirming beyond [`Self::outbox_end`] is
    /// [`Error::OutboxConfirmBeyond`].
    ///
    /// It is not flushed on its own: the next commit's flush (or
    /// [`crate::Store::flush`]) makes it durable. A confirmation lost in a
    /// crash only makes the driver publish those entries again.
    pub fn outbox_confirm(&self, end: OutboxSeq) -> Result<()> {
        self.outbox_confirm_published(end, None)
    }

    /// The decisions-stream sequence recorded by the last
    /// [`Self::outbox_confirm_published`] (0 if none): every decision of
    /// this partition published before the unconfirmed outbox entries is
    /// at or below it. A driver that republishes the unconfirmed outbox
    /// reads the decisions after it to find which entries are already on
    /// the stream, so that exactly once there does not depend on the
    /// stream's duplicate window.
    pub fn decisions_published(&self) -> Result<u64> {
        match self
            .tree
            .get(codec::KEY_PUBLISHED)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(0),
            Some(v) => codec::decode_u64(codec::KEY_PUBLISHED, &v),
        }
    }

    /// The requests-stream sequence up to which messages missing from the
    /// stream (deleted or purged) were accepted, 0 if none: a store that
    /// started empty accepts the log as it found it (its operator chose to
    /// replay that log), so a driver that looks for holes in the log only
    /// counts those above both this and the applied position.
    pub fn log_accepted(&self) -> Result<u64> {
        match self
            .tree
            .get(codec::KEY_LOG_ACCEPTED)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(0),
            Some(v) => codec::decode_u64(codec::KEY_LOG_ACCEPTED, &v),
        }
    }

    /// Records [`Self::log_accepted`] (kept if `sequence` is lower). Made
    /// durable by the next commit's flush; lost in a crash before one, the
    /// store is still empty and the driver records it again.
    pub fn accept_log_up_to(&self, sequence: u64) -> Result<()> {
        if sequence <= self.log_accepted()? {
            return Ok(());
        }
        self.tree
            .insert(codec::KEY_LOG_ACCEPTED, codec::encode_u64(sequence))
            .map_err(|e| Error::storage("accept the log", e))?;
        Ok(())
    }

    /// [`Self::outbox_confirm`], recording in the same write the highest
    /// decisions-stream sequence the confirmed entries were stored at
    /// (kept if lower than the one recorded).
    pub fn outbox_confirm_published(&self, end: OutboxSeq, published: Option<u64>) -> Result<()> {
        let outbox_end = self.head()?.outbox_end;
        if end.0 > outbox_end {
            return Err(Error::OutboxConfirmBeyond {
                end: end.0,
                outbox_end,
            });
        }
        let old = self.outbox_confirmed()?.0;
        if end.0 <= old {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for chunk in old / OUTBOX_CHUNK_LEN..end.0 / OUTBOX_CHUNK_LEN {
            batch.remove(&codec::key_outbox(chunk));
        }
        batch.insert(codec::KEY_CONFIRMED, codec::encode_u64(end.0));
        if let Some(published) = published
            && published > self.decisions_published()?
        {
            batch.insert(codec::KEY_PUBLISHED, codec::encode_u64(published));
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| Error::storage("outbox confirm", e))
    }

    /// Removes the dedup records, resolved holds and ended sagas older than
    /// `horizon_ms` (log time; see
    /// [`amends_core::partition::Config::compaction_horizon_ms`]).
    ///
    /// Meant for a background thread, concurrently with the writer's
    /// commits. It reads every dedup, hold and saga bucket without any lock (no
    /// snapshot needed) to find compactable records, then removes them in
    /// chunks of at most [`COMPACT_CHUNK_LEN`]: each chunk takes the
    /// partition's write lock, reads the records again, removes those still
    /// present and compactable, and writes one small batch. A commit waits
    /// for at most one chunk (about a millisecond), never for a whole pass.
    /// A pass costs a read of every dedup, hold and saga record. Removals are not
    /// flushed; the next commit's flush covers them, and one lost in a crash
    /// is redone by the next pass.
    pub fn compact(&self, horizon_ms: u64) -> Result<Compacted> {
        let mut done = Compacted::default();
        for prefix in COMPACTED_PREFIXES {
            let mut candidates = Vec::new();
            for item in self.tree.scan_prefix([prefix]) {
                let (k, v) = item.map_err(|e| Error::storage("compact", e))?;
                for (id, body) in packed::entries(&k, &v)? {
                    if compactable(prefix, &k, body, horizon_ms)? {
                        candidates.push(id);
                    }
                }
                if candidates.len() >= COMPACT_CHUNK_LEN {
                    self.compact_chunk(prefix, &candidates, horizon_ms, &mut done)?;
                    candidates.clear();
                }
            }
            self.compact_chunk(prefix, &candidates, horizon_ms, &mut done)?;
        }
        Ok(done)
    }

    fn compact_chunk(
        &self,
        prefix: u8,
        ids: &[packed::Id],
        horizon_ms: u64,
        done: &mut Compacted,
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let _writing = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut ed = Editor::new(&self.tree, prefix);
        // Judged again under the lock: the writer may have changed them.
        let key = [prefix];
        let (removed, kept) =
            ed.remove_sorted(ids, |body| compactable(prefix, &key, body, horizon_ms))?;
        match prefix {
            codec::PREFIX_DEDUP => done.dedup += removed,
            codec::PREFIX_SAGA => done.sagas += removed,
            _ => done.holds += removed,
        }
        done.skipped += kept;
        if ed.is_empty() {
            return Ok(());
        }
        let mut batch = Staged::default();
        ed.write_into(&mut batch);
        self.tree
            .apply_batch(batch.batch)
            .map_err(|e| Error::storage("compact", e))
    }

    /// Removes every record of the partition (state, dedup records, outbox,
    /// head), for a rebuild by replay, and flushes.
    ///
    /// To rebuild bit-identically: note [`Self::outbox_confirmed`], clear,
    /// replay the whole log through `Machine::apply` and
    /// [`Self::commit`] (any batching), confirm the noted watermark, and
    /// compact at the horizons the original was compacted at (compaction is
    /// idempotent: compacting once at the last horizon gives the same
    /// records).
    pub fn clear(&self) -> Result<()> {
        let _writing = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.tree.clear().map_err(|e| Error::storage("clear", e))?;
        self.tree.flush().map_err(|e| Error::storage("flush", e))?;
        Ok(())
    }

    /// Every key and value of the partition in key order, as stored: the
    /// canonical form for comparing two stores bit for bit.
    pub fn dump(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + use<> {
        self.tree.iter().map(|item| {
            item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| Error::storage("read", e))
        })
    }

    /// Every record of the partition decoded, in key order (outbox chunks
    /// expanded into their entries). For audits, and for checking that a
    /// store decodes completely.
    pub fn records(&self) -> Records {
        Records {
            iter: self.tree.iter(),
            pending: VecDeque::new(),
        }
    }

    /// The partition's state (accounts, holds, claims, dedup records, sagas,
    /// the expiry index and the clock) in memory, for audits and tests of a
    /// partition that fits in memory.
    pub fn to_mem_state(&self) -> Result<MemState> {
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

    fn read<T>(
        &self,
        key: &[u8],
        decode: impl FnOnce(&[u8], &[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        match self.tree.get(key).map_err(|e| Error::storage("read", e))? {
            Some(found) => decode(key, &found).map(Some),
            None => Ok(None),
        }
    }

    /// Reads the record `id` of a packed map: the first bucket at or after
    /// its id, scanned without decoding the other records.
    fn read_packed<T>(
        &self,
        prefix: u8,
        id: OpId,
        decode: impl FnOnce(&[u8], &[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        let id = codec::id_bytes(id);
        let from = packed::bucket_key(prefix, &id);
        let found = self.tree.range(from..=packed::tail_key(prefix)).next();
        let Some((k, v)) = found.transpose().map_err(|e| Error::storage("read", e))? else {
            return Ok(None);
        };
        match packed::find(&k, &v, &id)? {
            Some(body) => decode(&k, body).map(Some),
            None => Ok(None),
        }
    }
}

impl Read for Partition {
    type Error = Error;

    fn account(&self, id: &str) -> Result<Option<Account>> {
        self.read(&codec::key_account(id), codec::decode_account)
    }

    fn hold(&self, id: OpId) -> Result<Option<Hold>> {
        self.read_packed(codec::PREFIX_HOLD, id, codec::decode_hold)
    }

    fn claim(&self, key: &str) -> Result<Option<Claim>> {
        self.read(&codec::key_claim(key), codec::decode_claim)
    }

    fn dedup(&self, op: OpId) -> Result<Option<Dedup>> {
        self.read_packed(codec::PREFIX_DEDUP, op, |k, b| {
            codec::decode_dedup(k, op, b)
        })
    }

    fn saga(&self, id: OpId) -> Result<Option<Saga>> {
        self.read_packed(codec::PREFIX_SAGA, id, codec::decode_saga)
    }

    fn expiry_after(&self, after: Option<ExpiryKey>) -> Result<Option<ExpiryKey>> {
        use std::ops::Bound;
        let start = match after {
            None => Bound::Included(vec![codec::PREFIX_EXPIRY]),
            Some(a) => Bound::Excluded(codec::key_expiry(a).to_vec()),
        };
        let end = Bound::Excluded(vec![codec::PREFIX_EXPIRY + 1]);
        let found = self.tree.range::<Vec<u8>, _>((start, end)).next();
        let Some((k, v)) = found.transpose().map_err(|e| Error::storage("read", e))? else {
            return Ok(None);
        };
        codec::decode_marker(&k, &v)?;
        codec::decode_expiry_key(&k).map(Some)
    }

    fn clock(&self) -> Result<Clock> {
        self.head().map(|h| h.clock)
    }
}

/// The iterator of [`Partition::records`].
pub struct Records {
    iter: sled::Iter,
    pending: VecDeque<Record>,
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

impl Iterator for Records {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if let Some(r) = self.pending.pop_front() {
            return Some(Ok(r));
        }
        let item = self.iter.next()?;
        Some(
            item.map_err(|e| Error::storage("read", e))
                .and_then(|(k, v)| self.decode(&k, &v)),
        )
    }
}

impl Records {
    fn decode(&mut self, k: &[u8], v: &[u8]) -> Result<Record> {
        if k == codec::KEY_HEAD {
            return Ok(Record::Head(codec::decode_head(k, v)?));
        }
        if k == codec::KEY_CONFIRMED {
            return Ok(Record::OutboxConfirmed(OutboxSeq(codec::decode_u64(k, v)?)));
        }
        if k == codec::KEY_PUBLISHED {
            return Ok(Record::DecisionsPublished(codec::decode_u64(k, v)?));
        }
        if k == codec::KEY_LOG_ACCEPTED {
            return Ok(Record::LogAccepted(codec::decode_u64(k, v)?));
        }
        match k.first().copied() {
            Some(codec::PREFIX_ACCOUNT) => {
                let id = codec::decode_text_key(k)?;
                let id = AccountId::new(id)
                    .map_err(|e| Error::corrupt(k, format!("invalid account id: {e}")))?;
                Ok(Record::Account(id, codec::decode_account(k, v)?))
            }
            Some(codec::PREFIX_CLAIM) => {
                let key = codec::decode_text_key(k)?.to_owned();
                Ok(Record::Claim(key, codec::decode_claim(k, v)?))
            }
            Some(prefix @ (codec::PREFIX_DEDUP | codec::PREFIX_HOLD | codec::PREFIX_SAGA)) => {
                let mut records = packed::decode(k, v)?.into_iter().map(|e| {
                    let op = codec::id_of(e.id);
                    Ok(match prefix {
                        codec::PREFIX_DEDUP => {
                            Record::Dedup(op, codec::decode_dedup(k, op, &e.body)?)
                        }
                        codec::PREFIX_SAGA => Record::Saga(op, codec::decode_saga(k, &e.body)?),
                        _ => Record::Hold(op, codec::decode_hold(k, &e.body)?),
                    })
                });
                let first = records
                    .next()
                    .ok_or_else(|| Error::corrupt(k, "an empty bucket"))??;
                for r in records {
                    self.pending.push_back(r?);
                }
                Ok(first)
            }
            Some(codec::PREFIX_EXPIRY) => {
                codec::decode_marker(k, v)?;
                Ok(Record::Expiry(codec::decode_expiry_key(k)?))
            }
            Some(codec::PREFIX_OUTBOX) => {
                let chunk = codec::decode_outbox_key(k)?;
                let first = chunk
                    .checked_mul(OUTBOX_CHUNK_LEN)
                    .ok_or_else(|| Error::corrupt(k, "outbox chunk number out of range"))?;
                let entries = codec::decode_outbox_chunk(k, v)?;
                let mut entries = (first..)
                    .zip(entries)
                    .map(|(seq, e)| Record::Outbox(OutboxSeq(seq), e));
                let first = entries
                    .next()
                    .ok_or_else(|| Error::corrupt(k, "an outbox chunk with no entry"))?;
                self.pending.extend(entries);
                Ok(first)
            }
            _ => Err(Error::corrupt(k, "unknown key")),
        }
    }
}
