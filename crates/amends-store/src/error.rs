//! The one error type of the store.

use std::fmt;

/// A boxed foreign error (sled or another engine, the record codec), kept
/// opaque so that their types are not part of this crate's API.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the store.
///
/// One type whatever the engine (see [`crate::Engine`]): an engine maps its
/// own failures onto these variants. After any `Err` from
/// [`crate::PartitionStore::commit`], nothing derived from that batch may
/// be published or acknowledged; the driver drops the store and reopens
/// it, which resumes from the last durable batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database could not be opened, read, written or flushed (an I/O
    /// error, the directory is locked by another process, or sled found its
    /// own files damaged).
    #[error("store: {action} failed: {source}")]
    Storage {
        /// What the store was doing, e.g. `"commit"`.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: Source,
    },
    /// The store's directory stayed locked for
    /// [`crate::OPEN_LOCK_WAIT_MS`]: another process has it open.
    #[error("store: {} is in use by another process (its lock stayed held)", path.display())]
    Locked {
        /// The store's directory.
        path: std::path::PathBuf,
    },
    /// A record could not be decoded: the files were damaged, or written by
    /// another program. Nothing is reinterpreted silently.
    #[error("store: corrupt record at key {key}: {detail}")]
    Corrupt {
        /// The record's key, printable (see [`crate::Partition::dump`]).
        key: KeyText,
        /// What was wrong.
        detail: String,
    },
    /// The store was written by an incompatible format version of this
    /// crate. Rebuild it from the log (start `amends serve` on an empty data
    /// directory: its workers re-derive every partition from the requests
    /// stream, which must still hold the whole log) or use the matching
    /// version of amends.
    #[error(
        "store: format version {found} on disk, but this build reads and writes version {expected}; \
         rebuild the store from the log (start amends serve on an empty data directory; the \
         requests stream must still hold the whole log) or run the matching amends version"
    )]
    FormatVersion {
        /// The version recorded in the store.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },
    /// The store was created for another partition count. The count is
    /// fixed when a deployment is created: routing every key again would
    /// move accounts and claims between partitions.
    #[error(
        "store: created with {stored} partitions, opened with {requested}; \
         the partition count of a deployment cannot change"
    )]
    PartitionCount {
        /// The count recorded in the store.
        stored: u32,
        /// The count asked for.
        requested: u32,
    },
    /// The directory holds a sled database that has data but no amends
    /// meta record: it was not written by this crate.
    #[error(
        "store: the database has data but no amends meta record; it was not written by amends-store"
    )]
    MissingMeta,
    /// A partition number at or above the store's partition count.
    #[error("store: partition {partition} does not exist; the store has {partitions} partitions")]
    NoSuchPartition {
        /// The partition asked for.
        partition: u32,
        /// The store's partition count.
        partitions: u32,
    },
    /// A change set whose applied position is not after the store's: it was
    /// computed from stale state (two writers on one partition, or a batch
    /// committed twice). Nothing was written.
    #[error("store: commit at log position {got} is not after the applied position {applied}")]
    PositionNotAdvancing {
        /// The store's applied position.
        applied: u64,
        /// The change set's position.
        got: u64,
    },
    /// An outbox confirmation beyond the last entry ever written: the
    /// publisher confirmed something the store never handed out.
    #[error("store: outbox confirmation up to {end} is beyond the outbox end {outbox_end}")]
    OutboxConfirmBeyond {
        /// The confirmation's end (exclusive).
        end: u64,
        /// The end of the outbox (exclusive).
        outbox_end: u64,
    },
}

impl Error {
    /// [`Error::Storage`]: the engine failed at `action` (sled's errors,
    /// or any other engine's).
    pub fn storage(action: &'static str, source: impl Into<Source>) -> Error {
        Error::Storage {
            action,
            source: source.into(),
        }
    }

    /// [`Error::Corrupt`]: the record at `key` could not be decoded.
    pub fn corrupt(key: &[u8], detail: impl Into<String>) -> Error {
        Error::Corrupt {
            key: KeyText(key.to_vec()),
            detail: detail.into(),
        }
    }
}

/// A store key shown as text: printable ASCII as is, other bytes as `\xNN`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyText(pub Vec<u8>);

impl fmt::Display for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            if b.is_ascii_graphic() && *b != b'\\' {
                write!(f, "{}", char::from(*b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// The result type of the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;
