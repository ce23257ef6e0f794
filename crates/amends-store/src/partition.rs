//! One partition's durable state on sled: the [`PartitionStore`] of a
//! [`crate::Store`] (reads for the state machine, the group commit, the
//! outbox, compaction, clearing for a rebuild) and a canonical dump.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use amends_core::command::AccountId;
use amends_core::id::OpId;
use amends_core::partition::Effect;
use amends_core::route::PartitionId;
use amends_core::state::{Account, ChangeSet, Claim, Clock, Dedup, ExpiryKey, Hold, Read, Saga};

use crate::durability::Durability;
use crate::engine::{Committed, Compacted, OutboxRange, OutboxSeq, PartitionStore, Record};
use crate::error::{Error, Result};
use crate::layout::{self, OUTBOX_CHUNK_LEN};
use crate::packed::{self, Editor};
use crate::records::{self, Head};
use crate::staged::Staged;

/// How many records one chunk of [`PartitionStore::compact`] removes at most
/// while holding the partition's write lock: enough to amortize the batch,
/// few enough that a waiting commit is held up for about a millisecond.
pub const COMPACT_CHUNK_LEN: usize = 256;

/// The packed maps compaction visits, in order.
const COMPACTED_PREFIXES: [u8; 3] = [
    layout::PREFIX_DEDUP,
    layout::PREFIX_HOLD,
    layout::PREFIX_SAGA,
];

/// Whether the record `body` of packed map `prefix` may be forgotten. For
/// a dedup record, the core's rule (`Dedup::is_compactable`: decided
/// before the horizon) on its quickly read log time; a unit test keeps the
/// two in step. For a hold or a saga, the core's rule on the decoded record
/// (a saga in flight is never compactable).
fn compactable(prefix: u8, key: &[u8], body: &[u8], horizon_ms: u64) -> Result<bool> {
    Ok(match prefix {
        layout::PREFIX_DEDUP => records::dedup_log_time_ms(key, body)? < horizon_ms,
        layout::PREFIX_SAGA => records::decode_saga(key, body)?.is_compactable(horizon_ms),
        _ => records::decode_hold(key, body)?.is_compactable(horizon_ms),
    })
}

/// The records of a change set's map as packed entries, in id order.
fn sorted_entries<'a, T: 'a>(
    records: impl Iterator<Item = (&'a OpId, &'a T)>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Vec<packed::Entry> {
    let mut out: Vec<packed::Entry> = records
        .map(|(op, rec)| packed::Entry {
            id: layout::id_bytes(*op),
            body: encode(rec),
        })
        .collect();
    out.sort_unstable_by_key(|e| e.id);
    out
}

/// One partition of a [`crate::Store`]: a sled tree, and sled's
/// [`PartitionStore`] (whose documentation is the contract).
///
/// A cheap handle (clone it freely); clones see the same data. One writer
/// per partition calls [`PartitionStore::commit`] (the state machine reads
/// it through [`Read`]); a publisher may call the outbox methods and a
/// background thread [`PartitionStore::compact`] at the same time.
///
/// A read through [`Read`] that fails (an I/O error, a corrupt record)
/// returns the [`Error`]; the state machine stops the batch on it
/// (`Fault::Read`), so a decision made on missing state never reaches
/// [`PartitionStore::commit`].
#[derive(Clone)]
pub struct Partition {
    id: PartitionId,
    tree: sled::Tree,
    durability: Durability,
    /// Held by [`PartitionStore::commit`] and by each chunk of
    /// [`PartitionStore::compact`]: both rewrite packed buckets from what they
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

    /// Appends `effects` to the outbox chunks from `start` on; returns the
    /// new outbox end.
    fn append_outbox(&self, batch: &mut Staged, start: u64, effects: &[Effect]) -> Result<u64> {
        let Some(len) = u64::try_from(effects.len())
            .ok()
            .and_then(|n| start.checked_add(n))
        else {
            return Err(Error::corrupt(layout::KEY_HEAD, "outbox sequence overflow"));
        };
        if effects.is_empty() {
            return Ok(start);
        }
        let mut chunk = start / OUTBOX_CHUNK_LEN;
        let mut buf = if start.is_multiple_of(OUTBOX_CHUNK_LEN) {
            records::outbox_chunk_start()
        } else {
            // The last chunk is partly filled: extend it. Confirmation never
            // removes a chunk that is not full, so it must be there.
            let key = layout::key_outbox(chunk);
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
                batch.insert(&layout::key_outbox(chunk), std::mem::take(&mut buf));
                chunk = seq / OUTBOX_CHUNK_LEN;
                buf = records::outbox_chunk_start();
            }
            records::encode_effect_into(e, &mut buf);
        }
        batch.insert(&layout::key_outbox(chunk), buf);
        Ok(len)
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
            layout::PREFIX_DEDUP => done.dedup += removed,
            layout::PREFIX_SAGA => done.sagas += removed,
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

    /// Every key and value of the partition in key order, as stored: the
    /// canonical form for comparing two stores bit for bit.
    pub fn dump(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + use<> {
        self.tree.iter().map(|item| {
            item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| Error::storage("read", e))
        })
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
        let id = layout::id_bytes(id);
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

impl PartitionStore for Partition {
    type Records = Records;

    fn id(&self) -> PartitionId {
        self.id
    }

    fn head(&self) -> Result<Head> {
        match self
            .tree
            .get(layout::KEY_HEAD)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(Head::default()),
            Some(v) => records::decode_head(layout::KEY_HEAD, &v),
        }
    }

    /// One sled batch (the changes, the packed buckets they touch, the outbox
    /// chunks, the head), then with [`Durability::Fsync`] a flush.
    fn commit(&self, changes: &ChangeSet, effects: &[Effect]) -> Result<Committed> {
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
            batch.insert(layout::key_account(id.as_str()), records::encode_account(a));
        }
        let mut holds = Editor::new(&self.tree, layout::PREFIX_HOLD);
        holds.upsert_sorted(sorted_entries(changes.holds.iter(), records::encode_hold))?;
        holds.write_into(&mut batch);
        for (key, c) in &changes.claims {
            match c {
                Some(c) => batch.insert(layout::key_claim(key), records::encode_claim(c)),
                None => batch.remove(layout::key_claim(key)),
            }
        }
        // A saga's dedup record is rewritten (same op id) as the saga moves
        // on, possibly in a later batch: an upsert replaces it in its
        // bucket. `dedup_order` is not needed here: buckets are in id order
        // and the outbox follows `effects`.
        let mut dedup = Editor::new(&self.tree, layout::PREFIX_DEDUP);
        dedup.upsert_sorted(sorted_entries(changes.dedup.iter(), records::encode_dedup))?;
        dedup.write_into(&mut batch);
        let mut sagas = Editor::new(&self.tree, layout::PREFIX_SAGA);
        sagas.upsert_sorted(sorted_entries(changes.sagas.iter(), records::encode_saga))?;
        sagas.write_into(&mut batch);
        for (k, present) in &changes.expiries {
            if *present {
                batch.insert(&layout::key_expiry(*k), records::encode_marker());
            } else {
                batch.remove(&layout::key_expiry(*k));
            }
        }
        let end = self.append_outbox(&mut batch, head.outbox_end, effects)?;
        batch.insert(
            layout::KEY_HEAD,
            records::encode_head(&Head {
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

    fn outbox_confirmed(&self) -> Result<OutboxSeq> {
        match self
            .tree
            .get(layout::KEY_CONFIRMED)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(OutboxSeq(0)),
            Some(v) => Ok(OutboxSeq(records::decode_u64(layout::KEY_CONFIRMED, &v)?)),
        }
    }

    fn outbox_read(&self, from: OutboxSeq, len_max: usize) -> Result<Vec<(OutboxSeq, Effect)>> {
        let from = from.max(self.outbox_confirmed()?).0;
        let mut out = Vec::new();
        let start_key = layout::key_outbox(from / OUTBOX_CHUNK_LEN).to_vec();
        let end_key = vec![layout::PREFIX_OUTBOX + 1];
        for item in self.tree.range(start_key..end_key) {
            if out.len() >= len_max {
                break;
            }
            let (k, v) = item.map_err(|e| Error::storage("read", e))?;
            let chunk = layout::decode_outbox_key(&k)?;
            let first = chunk
                .checked_mul(OUTBOX_CHUNK_LEN)
                .ok_or_else(|| Error::corrupt(&k, "outbox chunk number out of range"))?;
            for (seq, e) in (first..).zip(records::decode_outbox_chunk(&k, &v)?) {
                if seq >= from && out.len() < len_max {
                    out.push((OutboxSeq(seq), e));
                }
            }
        }
        Ok(out)
    }

    /// One sled batch: the watermark, the decisions-stream sequence and the
    /// removal of the chunks that hold only confirmed entries; not flushed
    /// (the next commit's flush, or [`crate::Store::flush`], covers it).
    fn outbox_confirm_published(&self, end: OutboxSeq, published: Option<u64>) -> Result<()> {
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
            batch.remove(&layout::key_outbox(chunk));
        }
        batch.insert(layout::KEY_CONFIRMED, records::encode_u64(end.0));
        if let Some(published) = published
            && published > self.decisions_published()?
        {
            batch.insert(layout::KEY_PUBLISHED, records::encode_u64(published));
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| Error::storage("outbox confirm", e))
    }

    fn decisions_published(&self) -> Result<u64> {
        match self
            .tree
            .get(layout::KEY_PUBLISHED)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(0),
            Some(v) => records::decode_u64(layout::KEY_PUBLISHED, &v),
        }
    }

    fn log_accepted(&self) -> Result<u64> {
        match self
            .tree
            .get(layout::KEY_LOG_ACCEPTED)
            .map_err(|e| Error::storage("read", e))?
        {
            None => Ok(0),
            Some(v) => records::decode_u64(layout::KEY_LOG_ACCEPTED, &v),
        }
    }

    /// Not flushed: the next commit's flush covers it.
    fn accept_log_up_to(&self, sequence: u64) -> Result<()> {
        if sequence <= self.log_accepted()? {
            return Ok(());
        }
        self.tree
            .insert(layout::KEY_LOG_ACCEPTED, records::encode_u64(sequence))
            .map_err(|e| Error::storage("accept the log", e))?;
        Ok(())
    }

    /// It reads every dedup, hold and saga bucket without any lock (no
    /// snapshot needed) to find compactable records, then removes them in
    /// chunks of at most [`COMPACT_CHUNK_LEN`]: each chunk takes the
    /// partition's write lock, reads the records again, removes those still
    /// present and compactable, and writes one small batch. A commit waits
    /// for at most one chunk (about a millisecond), never for a whole pass.
    /// A pass costs a read of every dedup, hold and saga record. Removals are
    /// not flushed; the next commit's flush covers them, and one lost in a
    /// crash is redone by the next pass.
    fn compact(&self, horizon_ms: u64) -> Result<Compacted> {
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

    /// Clears the tree under the write lock, and flushes. Buckets are cut at
    /// hash-chosen boundaries, so a rebuild by replay is bit-identical to the
    /// original (compare with [`Partition::dump`]).
    fn clear(&self) -> Result<()> {
        let _writing = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.tree.clear().map_err(|e| Error::storage("clear", e))?;
        self.tree.flush().map_err(|e| Error::storage("flush", e))?;
        Ok(())
    }

    /// In key order, outbox chunks expanded into their entries.
    fn records(&self) -> Records {
        Records {
            iter: self.tree.iter(),
            pending: VecDeque::new(),
        }
    }
}

impl Read for Partition {
    type Error = Error;

    fn account(&self, id: &str) -> Result<Option<Account>> {
        self.read(&layout::key_account(id), records::decode_account)
    }

    fn hold(&self, id: OpId) -> Result<Option<Hold>> {
        self.read_packed(layout::PREFIX_HOLD, id, records::decode_hold)
    }

    fn claim(&self, key: &str) -> Result<Option<Claim>> {
        self.read(&layout::key_claim(key), records::decode_claim)
    }

    fn dedup(&self, op: OpId) -> Result<Option<Dedup>> {
        self.read_packed(layout::PREFIX_DEDUP, op, |k, b| {
            records::decode_dedup(k, op, b)
        })
    }

    fn saga(&self, id: OpId) -> Result<Option<Saga>> {
        self.read_packed(layout::PREFIX_SAGA, id, records::decode_saga)
    }

    fn expiry_after(&self, after: Option<ExpiryKey>) -> Result<Option<ExpiryKey>> {
        use std::ops::Bound;
        let start = match after {
            None => Bound::Included(vec![layout::PREFIX_EXPIRY]),
            Some(a) => Bound::Excluded(layout::key_expiry(a).to_vec()),
        };
        let end = Bound::Excluded(vec![layout::PREFIX_EXPIRY + 1]);
        let found = self.tree.range::<Vec<u8>, _>((start, end)).next();
        let Some((k, v)) = found.transpose().map_err(|e| Error::storage("read", e))? else {
            return Ok(None);
        };
        records::decode_marker(&k, &v)?;
        layout::decode_expiry_key(&k).map(Some)
    }

    fn clock(&self) -> Result<Clock> {
        self.head().map(|h| h.clock)
    }
}

/// The iterator of [`PartitionStore::records`] on sled.
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
        if k == layout::KEY_HEAD {
            return Ok(Record::Head(records::decode_head(k, v)?));
        }
        if k == layout::KEY_CONFIRMED {
            return Ok(Record::OutboxConfirmed(OutboxSeq(records::decode_u64(
                k, v,
            )?)));
        }
        if k == layout::KEY_PUBLISHED {
            return Ok(Record::DecisionsPublished(records::decode_u64(k, v)?));
        }
        if k == layout::KEY_LOG_ACCEPTED {
            return Ok(Record::LogAccepted(records::decode_u64(k, v)?));
        }
        match k.first().copied() {
            Some(layout::PREFIX_ACCOUNT) => {
                let id = layout::decode_text_key(k)?;
                let id = AccountId::new(id)
                    .map_err(|e| Error::corrupt(k, format!("invalid account id: {e}")))?;
                Ok(Record::Account(id, records::decode_account(k, v)?))
            }
            Some(layout::PREFIX_CLAIM) => {
                let key = layout::decode_text_key(k)?.to_owned();
                Ok(Record::Claim(key, records::decode_claim(k, v)?))
            }
            Some(prefix @ (layout::PREFIX_DEDUP | layout::PREFIX_HOLD | layout::PREFIX_SAGA)) => {
                let mut records = packed::decode(k, v)?.into_iter().map(|e| {
                    let op = layout::id_of(e.id);
                    Ok(match prefix {
                        layout::PREFIX_DEDUP => {
                            Record::Dedup(op, records::decode_dedup(k, op, &e.body)?)
                        }
                        layout::PREFIX_SAGA => Record::Saga(op, records::decode_saga(k, &e.body)?),
                        _ => Record::Hold(op, records::decode_hold(k, &e.body)?),
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
            Some(layout::PREFIX_EXPIRY) => {
                records::decode_marker(k, v)?;
                Ok(Record::Expiry(layout::decode_expiry_key(k)?))
            }
            Some(layout::PREFIX_OUTBOX) => {
                let chunk = layout::decode_outbox_key(k)?;
                let first = chunk
                    .checked_mul(OUTBOX_CHUNK_LEN)
                    .ok_or_else(|| Error::corrupt(k, "outbox chunk number out of range"))?;
                let entries = records::decode_outbox_chunk(k, v)?;
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
