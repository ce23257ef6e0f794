//! Packed maps: many records keyed by op id under one sled key.
//!
//! sled 0.34 keeps memory for every tree page for as long as the page
//! exists (its page table entry and the log locations of its fragments),
//! and a leaf page holds at most 16 keys. With one key per dedup record,
//! resident memory grew by about 35 bytes per record retained (532 MiB
//! after ten million, see BENCHMARKS.md), without bound. So records keyed by
//! op id (dedup records, holds) are packed into buckets of about
//! [`BUCKET_LEN_TARGET`] records, and memory grows with the number of
//! buckets, not of records.
//!
//! # Bucket layout
//!
//! The records of one kind, sorted by op id, are cut after every *boundary*
//! id: an id whose [`boundary_hash`] is a multiple of
//! [`BUCKET_LEN_TARGET`]. A bucket is therefore a run of consecutive ids
//! ending with a boundary id, and its key is the kind's prefix byte plus
//! that boundary id (17 bytes). The run after the last boundary is the tail
//! bucket, keyed by the prefix plus sixteen `0xff` bytes and one `0x00`
//! byte (18 bytes, after every id). The record with id `x` is thus in the
//! first bucket whose key is at or after `prefix + x`.
//!
//! The layout is a function of the set of records alone, whatever order
//! they were written and removed in: a store rebuilt by replay is
//! bit-identical, and compaction timing leaves no trace. Inserting a record
//! rewrites one bucket (two when the id is a boundary: a split); removing
//! one rewrites one (or merges two when it removes a boundary). Since op
//! ids start with their time (UUID v7), the ids of one batch land in one or
//! two buckets at the tail, so a batch writes about one bucket per
//! [`BUCKET_LEN_TARGET`] records.
//!
//! A bucket's value is the format version byte, then for each record in id
//! order: the id (16 bytes), the body's length (postcard varint) and the
//! body.
//!
//! Op ids are chosen by clients: a client that ground ids to avoid
//! boundaries could make one bucket large. That costs speed (larger
//! rewrites), never correctness.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::records::FORMAT_VERSION;
use crate::staged::Staged;

/// The mean number of records per bucket; part of the store format.
///
/// 32 records of about 50 bytes make buckets of about 1.6 KiB: small enough
/// to rewrite on every commit, large enough to divide sled's per-page
/// memory by 32.
pub const BUCKET_LEN_TARGET: u64 = 32;

/// An op id as 16 bytes.
pub(crate) type Id = [u8; 16];

/// One record of a bucket.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct Entry {
    pub id: Id,
    pub body: Vec<u8>,
}

/// The hash that decides boundaries: SplitMix64's finalizer over the id's
/// two halves. Part of the store format.
pub fn boundary_hash(id: &Id) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let (hi, lo) = id.split_at(8);
    let hi = u64::from_be_bytes(hi.try_into().unwrap_or_default());
    let lo = u64::from_be_bytes(lo.try_into().unwrap_or_default());
    mix(hi ^ mix(lo))
}

fn is_boundary(id: &Id) -> bool {
    boundary_hash(id).is_multiple_of(BUCKET_LEN_TARGET)
}

/// The key of the bucket that ends with boundary id `id`.
pub(crate) fn bucket_key(prefix: u8, id: &Id) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(prefix);
    k.extend_from_slice(id);
    k
}

/// The key of the tail bucket.
pub(crate) fn tail_key(prefix: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.push(prefix);
    k.extend_from_slice(&[0xff; 16]);
    k.push(0);
    k
}

/// Scans a bucket value for `id` without decoding the other records.
pub(crate) fn find<'v>(key: &[u8], value: &'v [u8], id: &Id) -> Result<Option<&'v [u8]>> {
    let mut rest = body_of(key, value)?;
    while !rest.is_empty() {
        let (entry_id, body, tail) = split_entry(key, rest)?;
        match entry_id.cmp(id) {
            std::cmp::Ordering::Less => rest = tail,
            std::cmp::Ordering::Equal => return Ok(Some(body)),
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
    Ok(None)
}

/// Every record of a bucket value, borrowed: ids and bodies.
pub(crate) fn entries<'v>(key: &[u8], value: &'v [u8]) -> Result<Vec<(Id, &'v [u8])>> {
    let mut rest = body_of(key, value)?;
    let mut out = Vec::with_capacity(64);
    while !rest.is_empty() {
        let (id, body, tail) = split_entry(key, rest)?;
        out.push((id, body));
        rest = tail;
    }
    Ok(out)
}

/// Decodes every record of a bucket value.
pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<Vec<Entry>> {
    let mut rest = body_of(key, value)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (id, body, tail) = split_entry(key, rest)?;
        if out.last().is_some_and(|e: &Entry| e.id >= id) {
            return Err(Error::corrupt(key, "bucket records out of order"));
        }
        out.push(Entry {
            id,
            body: body.to_vec(),
        });
        rest = tail;
    }
    Ok(out)
}

/// Merges two id-sorted runs; on equal ids, `new` wins.
fn merge(old: Vec<Entry>, new: Vec<Entry>) -> Vec<Entry> {
    use std::cmp::Ordering;
    let mut out = Vec::with_capacity(old.len() + new.len());
    let (mut old, mut new) = (old.into_iter().peekable(), new.into_iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return out,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(o), Some(n)) => o.id.cmp(&n.id),
        };
        match order {
            Ordering::Less => out.extend(old.next()),
            Ordering::Equal => {
                old.next();
                out.extend(new.next());
            }
            Ordering::Greater => out.extend(new.next()),
        }
    }
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let len: usize = entries.iter().map(|e| 16 + 5 + e.body.len()).sum();
    let mut out = Vec::with_capacity(1 + len);
    out.push(FORMAT_VERSION);
    for e in entries {
        out.extend_from_slice(&e.id);
        let n = u32::try_from(e.body.len()).unwrap_or_else(|_| panic!("record body over 4 GiB"));
        let mut buf = [0u8; 5];
        let varint = postcard::to_slice(&n, &mut buf)
            .unwrap_or_else(|e| panic!("a u32 varint fits 5 bytes: {e}"));
        out.extend_from_slice(varint);
        out.extend_from_slice(&e.body);
    }
    out
}

fn body_of<'v>(key: &[u8], value: &'v [u8]) -> Result<&'v [u8]> {
    match value.split_first() {
        Some((&FORMAT_VERSION, rest)) => Ok(rest),
        Some((v, _)) => Err(Error::corrupt(
            key,
            format!("record format version {v}, this build reads {FORMAT_VERSION}"),
        )),
        None => Err(Error::corrupt(key, "empty value")),
    }
}

fn split_entry<'v>(key: &[u8], bytes: &'v [u8]) -> Result<(Id, &'v [u8], &'v [u8])> {
    let truncated = || Error::corrupt(key, "truncated bucket record");
    let id: Id = bytes
        .get(..16)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(truncated)?;
    let (len, rest) = postcard::take_from_bytes::<u32>(&bytes[16..]).map_err(|_| truncated())?;
    let len = usize::try_from(len).map_err(|_| truncated())?;
    let body = rest.get(..len).ok_or_else(truncated)?;
    Ok((id, body, &rest[len..]))
}

/// Edits of one packed map, staged in memory and written as part of one
/// sled batch. The caller holds the partition's write lock from the first
/// read to the batch's application, so the buckets it read are still the
/// stored ones.
pub(crate) struct Editor<'t> {
    tree: &'t sled::Tree,
    prefix: u8,
    /// New contents of the touched buckets (`None`: removed).
    edits: BTreeMap<Vec<u8>, Option<Vec<Entry>>>,
}

impl<'t> Editor<'t> {
    pub(crate) fn new(tree: &'t sled::Tree, prefix: u8) -> Editor<'t> {
        Editor {
            tree,
            prefix,
            edits: BTreeMap::new(),
        }
    }

    /// The first bucket whose key is at or after `from` (and within this
    /// map), with its records: edits first, then the tree.
    fn bucket_from(&self, from: &[u8]) -> Result<Option<(Vec<u8>, Vec<Entry>)>> {
        let tail = tail_key(self.prefix);
        let mut stored = None;
        for item in self.tree.range(from.to_vec()..=tail.clone()) {
            let (k, v) = item.map_err(|e| Error::storage("read", e))?;
            match self.edits.get(k.as_ref()) {
                Some(None) => continue,
                _ => {
                    stored = Some((k, v));
                    break;
                }
            }
        }
        let edited = self
            .edits
            .range::<[u8], _>((
                std::ops::Bound::Included(from),
                std::ops::Bound::Included(&tail[..]),
            ))
            .find_map(|(k, v)| v.as_ref().map(|v| (k, v)));
        Ok(match (stored, edited) {
            (None, None) => None,
            (Some((k, _)), Some((ek, entries))) if ek.as_slice() <= k.as_ref() => {
                Some((ek.clone(), entries.clone()))
            }
            (None, Some((ek, entries))) => Some((ek.clone(), entries.clone())),
            (Some((k, v)), _) => {
                let entries = match self.edits.get(k.as_ref()) {
                    Some(Some(entries)) => entries.clone(),
                    _ => decode(&k, &v)?,
                };
                Some((k.to_vec(), entries))
            }
        })
    }

    fn set(&mut self, key: Vec<u8>, entries: Vec<Entry>) {
        let value = if entries.is_empty() {
            None
        } else {
            Some(entries)
        };
        self.edits.insert(key, value);
    }

    /// The body of record `id`, if present (the store reads through
    /// [`find`]; this is the editor's view, edits included).
    #[cfg(test)]
    pub(crate) fn get(&self, id: &Id) -> Result<Option<Vec<u8>>> {
        let Some((_, entries)) = self.bucket_from(&bucket_key(self.prefix, id))? else {
            return Ok(None);
        };
        Ok(entries
            .binary_search_by(|e| e.id.cmp(id))
            .ok()
            .map(|i| entries[i].body.clone()))
    }

    /// Inserts or replaces record `id`.
    #[cfg(test)]
    pub(crate) fn upsert(&mut self, id: Id, body: Vec<u8>) -> Result<()> {
        self.upsert_sorted(vec![Entry { id, body }])
    }

    /// Inserts or replaces records, given in ascending id order (ids
    /// unique). Each bucket they touch is read once: the records bound for
    /// it are merged in, then it is cut after every boundary id among them.
    pub(crate) fn upsert_sorted(&mut self, records: Vec<Entry>) -> Result<()> {
        let mut records = records.into_iter().peekable();
        while let Some(first) = records.next() {
            let from = bucket_key(self.prefix, &first.id);
            let (key, old) = self
                .bucket_from(&from)?
                .unwrap_or_else(|| (tail_key(self.prefix), Vec::new()));
            // Every following record at or before `key` belongs here too.
            let mut new = vec![first];
            while let Some(r) = records.next_if(|r| bucket_key(self.prefix, &r.id) <= key) {
                new.push(r);
            }
            let entries = merge(old, new);
            let mut run = Vec::new();
            for e in entries {
                let cut = is_boundary(&e.id) && bucket_key(self.prefix, &e.id) != key;
                let id = e.id;
                run.push(e);
                if cut {
                    self.set(bucket_key(self.prefix, &id), std::mem::take(&mut run));
                }
            }
            self.set(key, run);
        }
        Ok(())
    }

    /// Removes the records among `ids` (ascending, unique) for which
    /// `removable` says yes when shown their current body; returns how many
    /// were removed and how many were missing or refused. Each bucket is
    /// read once; a bucket that loses its boundary id merges into the next.
    pub(crate) fn remove_sorted(
        &mut self,
        ids: &[Id],
        mut removable: impl FnMut(&[u8]) -> Result<bool>,
    ) -> Result<(u64, u64)> {
        let (mut removed, mut kept) = (0, 0);
        let mut rest = ids;
        while let Some(first) = rest.first() {
            let Some((key, entries)) = self.bucket_from(&bucket_key(self.prefix, first))? else {
                kept += u64::try_from(rest.len()).unwrap_or(u64::MAX);
                break;
            };
            let in_bucket = rest
                .iter()
                .take_while(|id| bucket_key(self.prefix, id) <= key)
                .count();
            let (group, after) = rest.split_at(in_bucket);
            rest = after;
            let mut left = Vec::with_capacity(entries.len());
            let mut removed_here = 0;
            for e in entries {
                if group.binary_search(&e.id).is_ok() && removable(&e.body)? {
                    removed_here += 1;
                } else {
                    left.push(e);
                }
            }
            removed += removed_here;
            kept += u64::try_from(group.len()).unwrap_or(u64::MAX) - removed_here;
            let lost_boundary = key != tail_key(self.prefix)
                && left
                    .last()
                    .is_none_or(|e| bucket_key(self.prefix, &e.id) != key);
            if lost_boundary {
                // The rest joins the next bucket (or becomes the tail).
                let mut next_from = key.clone();
                next_from.push(0);
                let (next_key, next) = self
                    .bucket_from(&next_from)?
                    .unwrap_or_else(|| (tail_key(self.prefix), Vec::new()));
                self.edits.insert(key, None);
                left.extend(next);
                self.set(next_key, left);
            } else {
                self.set(key, left);
            }
        }
        Ok((removed, kept))
    }

    /// Whether nothing was edited.
    pub(crate) fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Stages every edit into `batch`.
    pub(crate) fn write_into(self, batch: &mut Staged) {
        for (k, v) in self.edits {
            match v {
                Some(entries) => batch.insert(k, encode(&entries)),
                None => batch.remove(k),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("t").unwrap()
    }

    fn id(n: u64) -> Id {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.to_be_bytes());
        id[8..].copy_from_slice(&(n.wrapping_mul(7)).to_be_bytes());
        id
    }

    fn dump(t: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        t.iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect()
    }

    /// Inserts one record as its own batch.
    fn step(t: &sled::Tree, n: u64, body: Vec<u8>) {
        let mut ed = Editor::new(t, b'd');
        ed.upsert(id(n), body).unwrap();
        let mut batch = Staged::default();
        ed.write_into(&mut batch);
        t.apply_batch(batch.batch).unwrap();
    }

    #[test]
    fn buckets_average_the_target_length() {
        // Proves buckets hold about BUCKET_LEN_TARGET records each, and that
        // the layout of records written in one batch matches the layout of
        // the same records written one by one.
        let one_by_one = tree();
        for n in 0..3_200 {
            step(&one_by_one, n, vec![1; 40]);
        }
        let batched = tree();
        let mut ed = Editor::new(&batched, b'd');
        for n in (0..3_200).rev() {
            ed.upsert(id(n), vec![1; 40]).unwrap();
        }
        let mut batch = Staged::default();
        ed.write_into(&mut batch);
        batched.apply_batch(batch.batch).unwrap();
        let buckets = dump(&one_by_one);
        assert!(
            (50..200).contains(&buckets.len()),
            "{} buckets",
            buckets.len()
        );
        assert_eq!(buckets, dump(&batched));
    }

    /// Applies one batch of upserts (`Some` bodies, through
    /// `upsert_sorted` as a commit does) or of removals (as compaction
    /// does), as one sled batch; returns what `get` saw before each.
    fn batch(t: &sled::Tree, upserts: bool, steps: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
        let mut ed = Editor::new(t, b'd');
        let mut seen = Vec::new();
        if upserts {
            let mut by_id = BTreeMap::new();
            for (n, len) in steps {
                seen.push(ed.get(&id(*n)).unwrap());
                by_id.insert(id(*n), vec![u8::try_from(n % 251).unwrap(); *len]);
            }
            let records = by_id
                .into_iter()
                .map(|(id, body)| Entry { id, body })
                .collect();
            ed.upsert_sorted(records).unwrap();
        } else {
            let ids: std::collections::BTreeSet<Id> = steps.iter().map(|(n, _)| id(*n)).collect();
            let ids: Vec<Id> = ids.into_iter().collect();
            // Refuse bodies of length 3, as compaction refuses records that
            // are no longer compactable.
            let (removed, kept) = ed.remove_sorted(&ids, |body| Ok(body.len() != 3)).unwrap();
            seen.push(Some(vec![
                u8::try_from(removed).unwrap(),
                u8::try_from(kept).unwrap(),
            ]));
        }
        let mut staged = Staged::default();
        ed.write_into(&mut staged);
        t.apply_batch(staged.batch).unwrap();
        seen
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn layout_is_a_function_of_the_set(
            batches in prop::collection::vec(
                (any::<bool>(), prop::collection::vec((0..300u64, 0..40usize), 1..40)),
                1..40,
            ),
        ) {
            // Proves any sequence of batched upserts and removals reads like
            // a BTreeMap and leaves the same bytes as writing the final set
            // afresh one record at a time.
            let t = tree();
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for (upserts, steps) in &batches {
                let seen = batch(&t, *upserts, steps);
                if *upserts {
                    // Reads within a batch see the stored state, before it.
                    for ((n, _), got) in steps.iter().zip(seen) {
                        prop_assert_eq!(got, model.get(n).cloned());
                    }
                    for (n, len) in steps {
                        model.insert(*n, vec![u8::try_from(n % 251).unwrap(); *len]);
                    }
                } else {
                    let ids: std::collections::BTreeSet<u64> = steps.iter().map(|(n, _)| *n).collect();
                    let (mut removed, mut kept) = (0u8, 0u8);
                    for n in &ids {
                        match model.get(n) {
                            Some(b) if b.len() != 3 => {
                                model.remove(n);
                                removed += 1;
                            }
                            _ => kept += 1,
                        }
                    }
                    prop_assert_eq!(seen, vec![Some(vec![removed, kept])]);
                }
            }
            let fresh = tree();
            for (n, b) in &model {
                step(&fresh, *n, b.clone());
            }
            prop_assert_eq!(dump(&t), dump(&fresh));
            let ed = Editor::new(&t, b'd');
            for n in 0..300 {
                prop_assert_eq!(ed.get(&id(n)).unwrap(), model.get(&n).cloned());
                let raw = t.range(bucket_key(b'd', &id(n))..).next().transpose().unwrap();
                let found = raw.and_then(|(k, v)| find(&k, &v, &id(n)).unwrap().map(<[u8]>::to_vec));
                prop_assert_eq!(found, model.get(&n).cloned());
            }
        }
    }
}
