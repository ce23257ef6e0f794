//! The partitioner: which of N partitions owns a routing key.
//!
//! The mapping is part of the protocol. Every client that publishes to
//! `amends.req.<p>` must compute the same `p`, in whatever language, so it is
//! specified here exactly and checked against `specs/vectors/routing.json`
//! (written by an independent Python implementation,
//! `specs/vectors/gen_routing.py`).
//!
//! # Routing keys
//!
//! - an account operation: the account id, as is;
//! - a claim or release: `namespace + U+001F + key` ([`claim_routing_key`]);
//! - a saga: its op id as canonical lowercase hyphenated UUID text, e.g.
//!   `0192f0c1-7a3b-7cde-8f01-23456789abcd` ([`saga_routing_key`]).
//!
//! Keys are hashed as their UTF-8 bytes with no normalisation (`"é"` and
//! `"e\u{301}"` are different keys).
//!
//! # Algorithm
//!
//! `partition_of(routing_key, N) = jump_hash(fnv1a_64(utf8_bytes(routing_key)), N)`,
//! for `1 <= N <= 1024`; the result is in `0..N`.
//!
//! FNV-1a, 64-bit, all arithmetic modulo 2^64:
//!
//! ```text
//! h = 0xcbf29ce484222325                 // offset basis
//! for each byte c of the key:
//!     h = h XOR c
//!     h = h * 0x100000001b3 mod 2^64     // FNV prime
//! return h
//! ```
//!
//! Jump consistent hash (Lamping & Veach 2014, "A Fast, Minimal Memory,
//! Consistent Hash Algorithm", the published C++ code), with `key` an
//! unsigned 64-bit integer and `b`, `j` signed 64-bit integers:
//!
//! ```text
//! b = -1; j = 0
//! while j < N:
//!     b = j
//!     key = key * 2862933555777941757 + 1 mod 2^64
//!     j = trunc( f64(b + 1) * ( f64(2^31) / f64((key >> 33) + 1) ) )
//! return b
//! ```
//!
//! `f64` is IEEE 754 binary64 with round-to-nearest-even (C `double`, Java
//! `double`, JavaScript `number`, Python `float`); `>>` is a logical shift;
//! `trunc` rounds toward zero. Both operands of the division are integers of
//! at most 2^31, exact in binary64, so the division and the multiplication
//! are each one correctly rounded operation and every conforming language
//! gets the same bits. Do not rewrite it in exact integer or higher-precision
//! arithmetic: that changes some results.
//!
//! Example: `"acct-1"` is the bytes `61 63 63 74 2d 31`, whose FNV-1a 64 is
//! `0xeadd80bdb5b16dfc`, which jump hash puts in partition 5 of 16.
//!
//! When N grows by one, a key either stays in its partition or moves to the
//! new partition N (the property that makes jump hash consistent). N is
//! nevertheless fixed when a deployment is created.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The largest partition count a deployment may have.
///
/// Each partition is one JetStream pull consumer and one store tree in every
/// worker that owns it, so the count is capped to keep those resources
/// bounded; 1024 is far more partitions than one stream needs.
pub const PARTITIONS_MAX: u32 = 1024;

/// The FNV-1a 64 offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// The FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// The multiplier of jump hash's 64-bit linear congruential generator.
const JUMP_LCG_MULTIPLIER: u64 = 2_862_933_555_777_941_757;
/// 2^31 as an `f64` (exact).
const TWO_POW_31: f64 = 2_147_483_648.0;

/// The separator between a claim's namespace and key in its routing key:
/// U+001F, the ASCII unit separator.
pub const CLAIM_SEPARATOR: char = '\u{1f}';

/// A validated partition count: `1..=PARTITIONS_MAX`.
///
/// Serialized as a plain number; deserializing refuses counts out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "u32", into = "u32")]
pub struct Partitions(u32);

impl Partitions {
    /// Validates a partition count: accepts `1..=PARTITIONS_MAX`.
    pub fn new(n: u32) -> Result<Partitions, PartitionsError> {
        match n {
            0 => Err(PartitionsError::Zero),
            n if n > PARTITIONS_MAX => Err(PartitionsError::TooMany { requested: n }),
            n => Ok(Partitions(n)),
        }
    }

    /// The count.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The partition with number `index`, if `index < self.get()` (for
    /// example when parsing the `<p>` of a subject).
    pub fn id(self, index: u32) -> Option<PartitionId> {
        (index < self.0).then_some(PartitionId(index))
    }

    /// Every partition, in order: `0..self.get()`.
    pub fn ids(self) -> impl Iterator<Item = PartitionId> {
        (0..self.0).map(PartitionId)
    }
}

impl TryFrom<u32> for Partitions {
    type Error = PartitionsError;

    fn try_from(n: u32) -> Result<Partitions, PartitionsError> {
        Partitions::new(n)
    }
}

impl From<Partitions> for u32 {
    fn from(p: Partitions) -> u32 {
        p.0
    }
}

/// Why a partition count was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PartitionsError {
    /// The count was zero; a deployment needs at least one partition.
    #[error("partition count must be in 1..={PARTITIONS_MAX}, got 0")]
    Zero,
    /// The count was above [`PARTITIONS_MAX`].
    #[error("partition count must be in 1..={PARTITIONS_MAX}, got {requested}")]
    TooMany {
        /// The refused count.
        requested: u32,
    },
}

/// One partition: a number in `0..N` for the deployment's partition count N.
///
/// Displayed and serialized as the bare number, as in `amends.req.<p>`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct PartitionId(u32);

impl PartitionId {
    /// The partition's number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// FNV-1a, 64-bit, of `bytes`.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(FNV_PRIME)
    })
}

/// Jump consistent hash of `key` into `buckets` buckets (Lamping & Veach
/// 2014), with the published algorithm's f64 arithmetic; see the module docs.
pub fn jump_hash(key: u64, buckets: Partitions) -> PartitionId {
    let n = buckets.get();
    let n_f = f64::from(n);
    let mut key = key;
    // The published loop starts with b = -1, j = 0 and its first pass sets
    // b = 0; `next` is the `j` that the next pass assigns to `b`.
    let mut next: u32 = 0;
    loop {
        let b = next;
        key = key.wrapping_mul(JUMP_LCG_MULTIPLIER).wrapping_add(1);
        // `key >> 33` has at most 31 significant bits: it fits a u32, and
        // adding one in f64 is exact (the same value as f64((key >> 33) + 1)).
        let high = u32::try_from(key >> 33).unwrap_or(u32::MAX);
        // `b + 1 <= n <= PARTITIONS_MAX`, so it cannot overflow.
        let j = f64::from(b.saturating_add(1)) * (TWO_POW_31 / (f64::from(high) + 1.0));
        // trunc(j) < n  <=>  j < n, since n is an integer and j >= 0.
        if j < n_f {
            next = trunc_below(j, n);
        } else {
            return PartitionId(b);
        }
    }
}

/// `trunc(x)` for `0 <= x < limit`: the largest `i < limit` with
/// `f64::from(i) <= x`. A binary search over exact u32 → f64 conversions,
/// so no float-to-integer cast is needed.
fn trunc_below(x: f64, limit: u32) -> u32 {
    // Invariant: f64(lo) <= x < f64(hi).
    let (mut lo, mut hi) = (0u32, limit);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if f64::from(mid) <= x {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The partition that owns `routing_key`:
/// `jump_hash(fnv1a_64(routing_key.as_bytes()), partitions)`.
pub fn partition_of(routing_key: &str, partitions: Partitions) -> PartitionId {
    jump_hash(fnv1a_64(routing_key.as_bytes()), partitions)
}

/// The routing key of a claim (or release) of `key` in `namespace`:
/// `namespace + U+001F + key`.
pub fn claim_routing_key(namespace: &str, key: &str) -> String {
    let mut out = String::with_capacity(namespace.len() + key.len() + 1);
    out.push_str(namespace);
    out.push(CLAIM_SEPARATOR);
    out.push_str(key);
    out
}

/// The routing key of a saga: its op id as canonical lowercase hyphenated
/// UUID text (36 characters).
pub fn saga_routing_key(op_id: &uuid::Uuid) -> String {
    op_id.hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(n: u32) -> Partitions {
        Partitions::new(n).expect("valid partition count")
    }

    /// Checks that `key` routes to partition `expected` of `n`.
    fn check(key: &str, n: u32, expected: u32) {
        let got = partition_of(key, parts(n));
        assert_eq!(got.get(), expected, "partition_of({key:?}, {n})");
    }

    #[test]
    fn fnv1a_64_known_values() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_64(b"acct-1"), 0xeadd_80bd_b5b1_6dfc);
    }

    #[test]
    fn jump_hash_published_values() {
        // Results of the reference implementation, as published with other
        // ports of it.
        let cases: [(u64, u32, u32); 9] = [
            (1, 1, 0),
            (42, 57, 43),
            (256, 1024, 520),
            (0xDEAD_10CC, 1, 0),
            (0xDEAD_10CC, 666, 361),
            (16_045_690_984_833_335_023, 255, 237),
            (0, 60, 0),
            (1, 60, 55),
            (2, 60, 46),
        ];
        for (key, n, expected) in cases {
            assert_eq!(
                jump_hash(key, parts(n)).get(),
                expected,
                "jump_hash({key}, {n})"
            );
        }
    }

    #[test]
    fn partition_of_known_values() {
        check("", 1, 0);
        check("", 16, 13);
        check("", 1024, 266);
        check("acct-1", 8, 5);
        check("acct-1", 16, 5);
        check("acct-1", 1, 0);
    }

    fn sample_keys() -> impl Iterator<Item = String> {
        (0..1000).map(|i| format!("key-{i}"))
    }

    #[test]
    fn one_partition_is_always_zero() {
        for key in sample_keys() {
            check(&key, 1, 0);
        }
        for key in [u64::MIN, 1, u64::MAX, 0x8000_0000_0000_0000] {
            assert_eq!(jump_hash(key, parts(1)).get(), 0);
        }
    }

    #[test]
    fn result_is_below_n() {
        for key in sample_keys() {
            for n in [2, 3, 7, 16, 100, 1000, PARTITIONS_MAX] {
                assert!(partition_of(&key, parts(n)).get() < n, "{key:?} {n}");
            }
        }
        for key in [u64::MIN, u64::MAX] {
            for n in 1..=PARTITIONS_MAX {
                assert!(jump_hash(key, parts(n)).get() < n, "{key} {n}");
            }
        }
    }

    #[test]
    fn growing_by_one_stays_or_moves_to_the_new_partition() {
        let ns = (1..=256).chain(PARTITIONS_MAX - 32..=PARTITIONS_MAX);
        for n in ns.clone().filter(|&n| n < PARTITIONS_MAX) {
            for key in sample_keys() {
                let hash = fnv1a_64(key.as_bytes());
                let before = jump_hash(hash, parts(n)).get();
                let after = jump_hash(hash, parts(n + 1)).get();
                assert!(
                    after == before || after == n,
                    "{key:?}: {before} of {n} became {after} of {}",
                    n + 1
                );
            }
        }
    }

    #[test]
    fn spreads_keys_evenly() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            let p = partition_of(&format!("acct-{i}"), parts(16)).get();
            let slot = counts
                .get_mut(usize::try_from(p).expect("small"))
                .expect("< 16");
            *slot += 1;
        }
        for (p, &c) in counts.iter().enumerate() {
            assert!((850..=1150).contains(&c), "partition {p} got {c} of 16000");
        }
    }

    #[test]
    fn trunc_below_matches_truncation() {
        for (x, limit, expected) in [
            (0.0, 1, 0),
            (0.999, 1, 0),
            (1.0, 2, 1),
            (5.574, 16, 5),
            (1023.9999, 1024, 1023),
            (1023.0, 1024, 1023),
        ] {
            assert_eq!(trunc_below(x, limit), expected, "trunc_below({x}, {limit})");
        }
    }

    #[test]
    fn partitions_range() {
        assert_eq!(Partitions::new(0), Err(PartitionsError::Zero));
        assert_eq!(
            Partitions::new(PARTITIONS_MAX + 1),
            Err(PartitionsError::TooMany {
                requested: PARTITIONS_MAX + 1
            })
        );
        assert_eq!(Partitions::new(1).map(Partitions::get), Ok(1));
        assert_eq!(
            Partitions::new(PARTITIONS_MAX).map(Partitions::get),
            Ok(PARTITIONS_MAX)
        );
        let message = PartitionsError::TooMany { requested: 5000 }.to_string();
        assert!(
            message.contains("1..=1024") && message.contains("5000"),
            "{message}"
        );
        assert!(PartitionsError::Zero.to_string().contains("1..=1024"));
    }

    #[test]
    fn partitions_ids() {
        let p = parts(3);
        let ids: Vec<u32> = p.ids().map(PartitionId::get).collect();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(p.id(2).map(PartitionId::get), Some(2));
        assert_eq!(p.id(3), None);
    }

    #[test]
    fn serde_round_trips_and_refuses_bad_counts() {
        assert_eq!(serde_json::to_string(&parts(16)).expect("ser"), "16");
        assert_eq!(
            serde_json::from_str::<Partitions>("16").expect("de"),
            parts(16)
        );
        assert!(serde_json::from_str::<Partitions>("0").is_err());
        assert!(serde_json::from_str::<Partitions>("1025").is_err());
        assert!(serde_json::from_str::<Partitions>("-1").is_err());
        let id = partition_of("acct-1", parts(16));
        assert_eq!(serde_json::to_string(&id).expect("ser"), "5");
        assert_eq!(serde_json::from_str::<PartitionId>("5").expect("de"), id);
        assert_eq!(id.to_string(), "5");
        assert_eq!(format!("amends.req.{id}"), "amends.req.5");
    }

    #[test]
    fn routing_keys() {
        assert_eq!(
            claim_routing_key("username", "alice"),
            "username\u{1f}alice"
        );
        assert_eq!(claim_routing_key("", ""), "\u{1f}");
        let op = uuid::Uuid::from_u128(0x0192_f0c1_7a3b_7cde_8f01_2345_6789_abcd);
        assert_eq!(
            saga_routing_key(&op),
            "0192f0c1-7a3b-7cde-8f01-23456789abcd"
        );
        assert_eq!(
            saga_routing_key(&uuid::Uuid::max()),
            "ffffffff-ffff-ffff-ffff-ffffffffffff"
        );
    }
}
