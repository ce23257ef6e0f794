//! Operation ids.
//!
//! A client makes an [`OpId`] (a UUID version 7) once per operation and
//! sends it with every resubmission; it travels through every message derived
//! from the operation. Ids that amends makes itself (hold expiry events, saga
//! steps) are *derived*: a UUID version 5 of the parent id and a label, so
//! every replay of the log derives the same id.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The UUID namespace of every id amends derives (a fixed, random UUID).
///
/// Changing it changes every derived id, so it is part of the log format.
pub const DERIVED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3b0e_8c2d_4e5f_9a7b_1c3d_5e7f_9b2d);

/// An end-to-end operation id.
///
/// On the wire it is the canonical lowercase hyphenated UUID text. Client
/// operations must use version 7 (its millisecond timestamp bounds the dedup
/// window, see `specs/protocol.md`); derived ids are version 5.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct OpId(pub Uuid);

impl OpId {
    /// Wraps a UUID.
    pub const fn from_uuid(uuid: Uuid) -> OpId {
        OpId(uuid)
    }

    /// The id as a `u128` (big-endian interpretation of its bytes).
    pub const fn as_u128(self) -> u128 {
        self.0.as_u128()
    }

    /// The deterministic id derived from this one and `label` (UUID v5).
    ///
    /// Labels are short, fixed words such as `"expiry"`; the same parent and
    /// label always give the same id.
    pub fn derive(self, label: &str) -> OpId {
        let mut name = Vec::with_capacity(16 + label.len());
        name.extend_from_slice(self.0.as_bytes());
        name.extend_from_slice(label.as_bytes());
        OpId(Uuid::new_v5(&DERIVED_ID_NAMESPACE, &name))
    }

    /// The Unix time in milliseconds of a version 7 id, or `None` for any
    /// other version.
    pub fn v7_unix_ms(self) -> Option<u64> {
        if self.0.get_version_num() != 7 {
            return None;
        }
        // The first 48 bits of a v7 UUID are the Unix time in milliseconds.
        Some(u64::try_from(self.0.as_u128() >> 80).unwrap_or(u64::MAX))
    }

    /// Makes a version 7 id from a Unix time in milliseconds and 74 bits of
    /// caller-supplied randomness (`rand` is truncated to what fits).
    ///
    /// The core never calls this with real randomness; tests and tools use it
    /// to build reproducible ids.
    pub fn v7_from_parts(unix_ms: u64, rand: u128) -> OpId {
        let ms = u128::from(unix_ms & 0xFFFF_FFFF_FFFF);
        let rand_a = (rand >> 62) & 0xFFF;
        let rand_b = rand & 0x3FFF_FFFF_FFFF_FFFF;
        let bits = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b;
        OpId(Uuid::from_u128(bits))
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpId({})", self.0.hyphenated())
    }
}

impl FromStr for OpId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<OpId, uuid::Error> {
        Uuid::parse_str(s).map(OpId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_round_trip() {
        // A v7 id built from parts reports the same millisecond and version.
        for ms in [0, 1, 1_700_000_000_000, 0xFFFF_FFFF_FFFF] {
            let id = OpId::v7_from_parts(ms, 0xDEAD_BEEF_u128 << 40);
            assert_eq!(id.0.get_version_num(), 7);
            assert_eq!(id.v7_unix_ms(), Some(ms));
        }
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let parent = OpId::v7_from_parts(1_700_000_000_000, 42);
        assert_eq!(parent.derive("expiry"), parent.derive("expiry"));
        assert_ne!(parent.derive("expiry"), parent.derive("step-0"));
        assert_eq!(parent.derive("expiry").0.get_version_num(), 5);
        assert_eq!(parent.derive("expiry").v7_unix_ms(), None);
    }
}
