//! A sled batch that counts what it writes, for [`crate::Committed`].

use sled::IVec;

/// A sled batch and its size.
#[derive(Default)]
pub(crate) struct Staged {
    pub(crate) batch: sled::Batch,
    /// Keys written or removed.
    pub(crate) writes: u64,
    /// Bytes of the keys and values written.
    pub(crate) bytes: u64,
}

fn len(v: &IVec) -> u64 {
    u64::try_from(v.len()).unwrap_or(u64::MAX)
}

impl Staged {
    pub(crate) fn insert(&mut self, key: impl Into<IVec>, value: impl Into<IVec>) {
        let (key, value) = (key.into(), value.into());
        self.writes += 1;
        self.bytes = self
            .bytes
            .saturating_add(len(&key))
            .saturating_add(len(&value));
        self.batch.insert(key, value);
    }

    pub(crate) fn remove(&mut self, key: impl Into<IVec>) {
        let key = key.into();
        self.writes += 1;
        self.bytes = self.bytes.saturating_add(len(&key));
        self.batch.remove(key);
    }
}
