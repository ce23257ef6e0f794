//! sled's key layout: where each record of a partition lives in its tree.
//!
//! A partition is one sled tree; the first byte of a key names the record
//! kind (see the table in the crate docs). This module builds and reads
//! those keys; the values are [`crate::records`]' encodings, which any
//! engine may reuse, while the keys (and the packed buckets of
//! [`crate::packed`], the outbox chunks of [`OUTBOX_CHUNK_LEN`]) are
//! sled's: they exist because of how sled keeps pages in memory and
//! orders keys. Both are covered by [`crate::FORMAT_VERSION`]: a change to
//! either is a new format.

use amends_core::id::OpId;
use amends_core::state::ExpiryKey;

use crate::error::{Error, Result};
use crate::records;

/// How many outbox entries one outbox chunk record holds.
///
/// Effects are appended to fixed, aligned chunks (entry `s` lives in chunk
/// `s / OUTBOX_CHUNK_LEN`), so a batch writes about one outbox record per
/// 64 effects instead of one per effect, and the chunks depend only on the
/// sequence of effects, not on batch boundaries (a rebuilt store is
/// bit-identical). 64 entries of about 80 bytes stay far below sled's blob
/// threshold (a quarter of its 512 KiB segments).
pub const OUTBOX_CHUNK_LEN: u64 = 64;

/// Key of the head record: applied clock and outbox end.
pub(crate) const KEY_HEAD: &[u8] = b"!head";
/// Key of the outbox confirmation watermark.
pub(crate) const KEY_CONFIRMED: &[u8] = b"!outbox-confirmed";
/// Key of the decisions-stream sequence published through when the outbox
/// was last confirmed (see `PartitionStore::decisions_published`).
pub(crate) const KEY_PUBLISHED: &[u8] = b"!decisions-published";
/// Key of the requests-stream sequence up to which missing messages were
/// accepted (see `PartitionStore::log_accepted`).
pub(crate) const KEY_LOG_ACCEPTED: &[u8] = b"!log-accepted";

/// Key prefix of accounts: `a` + account id (UTF-8).
pub(crate) const PREFIX_ACCOUNT: u8 = b'a';
/// Key prefix of claims: `c` + claim routing key (UTF-8).
pub(crate) const PREFIX_CLAIM: u8 = b'c';
/// Key prefix of dedup record buckets (see `packed`).
pub(crate) const PREFIX_DEDUP: u8 = b'd';
/// Key prefix of the expiry index: `e` + at_ms (8 bytes, big-endian) + hold
/// id (16 bytes), so a range scan visits entries in expiry order.
pub(crate) const PREFIX_EXPIRY: u8 = b'e';
/// Key prefix of hold buckets (see `packed`).
pub(crate) const PREFIX_HOLD: u8 = b'h';
/// Key prefix of outbox chunks: `o` + chunk number (8 bytes, big-endian).
pub(crate) const PREFIX_OUTBOX: u8 = b'o';
/// Key prefix of saga buckets (see `packed`): sagas are keyed by op id and
/// retained as long as dedup records, so they are packed like them.
pub(crate) const PREFIX_SAGA: u8 = b's';

pub(crate) fn key_account(id: &str) -> Vec<u8> {
    prefixed(PREFIX_ACCOUNT, id.as_bytes())
}

pub(crate) fn key_claim(key: &str) -> Vec<u8> {
    prefixed(PREFIX_CLAIM, key.as_bytes())
}

/// An op id as the 16-byte id of a packed bucket entry (in id order).
pub(crate) fn id_bytes(op: OpId) -> [u8; 16] {
    records::op_id_to_bytes(op)
}

/// The op id of a packed bucket entry.
pub(crate) fn id_of(b: [u8; 16]) -> OpId {
    records::op_id_from_bytes(b)
}

pub(crate) fn key_expiry(k: ExpiryKey) -> [u8; 25] {
    let mut out = [0; 25];
    out[0] = PREFIX_EXPIRY;
    out[1..9].copy_from_slice(&k.at_ms.to_be_bytes());
    out[9..].copy_from_slice(&records::op_id_to_bytes(k.id));
    out
}

pub(crate) fn key_outbox(chunk: u64) -> [u8; 9] {
    let mut out = [0; 9];
    out[0] = PREFIX_OUTBOX;
    out[1..].copy_from_slice(&chunk.to_be_bytes());
    out
}

fn prefixed(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

pub(crate) fn decode_expiry_key(key: &[u8]) -> Result<ExpiryKey> {
    let bad = || Error::corrupt(key, "an expiry key must be 25 bytes");
    let at: [u8; 8] = key
        .get(1..9)
        .and_then(|r| r.try_into().ok())
        .ok_or_else(bad)?;
    let hold: [u8; 16] = key
        .get(9..)
        .and_then(|r| r.try_into().ok())
        .ok_or_else(bad)?;
    Ok(ExpiryKey {
        at_ms: u64::from_be_bytes(at),
        id: records::op_id_from_bytes(hold),
    })
}

pub(crate) fn decode_outbox_key(key: &[u8]) -> Result<u64> {
    let b: [u8; 8] = key
        .get(1..)
        .and_then(|r| r.try_into().ok())
        .ok_or_else(|| Error::corrupt(key, "an outbox key must be 9 bytes"))?;
    Ok(u64::from_be_bytes(b))
}

pub(crate) fn decode_text_key(key: &[u8]) -> Result<&str> {
    let rest = key.get(1..).unwrap_or_default();
    std::str::from_utf8(rest).map_err(|e| Error::corrupt(key, format!("key is not UTF-8: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id(n: u128) -> OpId {
        OpId::v7_from_parts(1_700_000_000_000, n)
    }

    #[test]
    fn key_order_follows_expiry_time() {
        // Expiry keys sort by time first, so a range scan finds the earliest.
        let early = key_expiry(ExpiryKey {
            at_ms: 5,
            id: id(u128::MAX),
        });
        let late = key_expiry(ExpiryKey {
            at_ms: 256,
            id: id(0),
        });
        assert!(early < late);
        assert_eq!(
            decode_expiry_key(&late).unwrap(),
            ExpiryKey {
                at_ms: 256,
                id: id(0)
            }
        );
        assert_eq!(id_of(id_bytes(id(5))), id(5));
        assert_eq!(decode_outbox_key(&key_outbox(258)).unwrap(), 258);
    }
}
