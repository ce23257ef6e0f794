//! The store: one sled database per process, with a meta tree checked on
//! open and one tree per partition.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amends_core::route::{PartitionId, Partitions};

use crate::durability::Durability;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::partition::Partition;
use crate::records::FORMAT_VERSION;

/// Default size of sled's page cache. sled's own default (1 GiB) would let
/// one process hold a gigabyte of cached pages; 64 MiB keeps the hot part
/// of a partition (accounts, recent dedup records) in memory while the
/// process stays far below the 512 MB budget.
pub const CACHE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// How long [`Store::open`] waits for the database's file lock. sled
/// releases the lock from a background thread shortly after the last handle
/// is dropped, so a store closed and reopened in one process (a restarted
/// partition worker, the tests) may briefly find it held; a lock still held
/// after this long belongs to another live process.
pub const OPEN_LOCK_WAIT_MS: u64 = 5_000;
/// How often [`Store::open`] retries while the lock is held.
const OPEN_LOCK_RETRY_MS: u64 = 10;

/// Name of the meta tree (format version, partition count).
const META_TREE: &[u8] = b"amends/meta";
/// Meta key of the format version (u32, big-endian).
const META_FORMAT_VERSION: &[u8] = b"format_version";
/// Meta key of the partition count (u32, big-endian).
const META_PARTITIONS: &[u8] = b"partitions";
/// Name of sled's default tree, which every database has.
const SLED_DEFAULT_TREE: &[u8] = b"__sled__default";

/// How to open a [`Store`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Options {
    /// The deployment's partition count; must match the count the store
    /// was created with.
    pub partitions: Partitions,
    /// When commits are durable.
    pub durability: Durability,
    /// The size of sled's page cache, in bytes: the main knob of the
    /// process's memory.
    pub cache_bytes: u64,
}

impl Options {
    /// Options for `partitions` with the defaults: [`Durability::Fsync`]
    /// and a cache of [`CACHE_BYTES_DEFAULT`].
    pub const fn new(partitions: Partitions) -> Options {
        Options {
            partitions,
            durability: Durability::Fsync,
            cache_bytes: CACHE_BYTES_DEFAULT,
        }
    }
}

/// The durable home of every partition's state in one process: one sled
/// database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    options: Options,
    /// One write lock per partition, shared by every handle of it, so
    /// that commits and compaction chunks never interleave.
    write_locks: Arc<[Arc<Mutex<()>>]>,
}

impl Store {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// A new store records [`FORMAT_VERSION`] and the partition count; an
    /// existing one must match both ([`Error::FormatVersion`],
    /// [`Error::PartitionCount`]). A sled database not written by this
    /// crate is refused ([`Error::MissingMeta`]). While another handle holds
    /// the directory's lock, it waits up to [`OPEN_LOCK_WAIT_MS`]
    /// ([`Error::Locked`]).
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<Store> {
        let flush_every_ms = match options.durability {
            Durability::Fsync => None,
            Durability::Deferred { flush_every_ms } => Some(flush_every_ms.max(1)),
        };
        let config = sled::Config::new()
            .path(path.as_ref())
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(flush_every_ms);
        let db = open_waiting_for_lock(&config, path.as_ref())?;
        check_meta(&db, options.partitions)?;
        let write_locks = options.partitions.ids().map(|_| Arc::default()).collect();
        Ok(Store {
            db,
            options,
            write_locks,
        })
    }

    /// The options the store was opened with.
    pub const fn options(&self) -> &Options {
        &self.options
    }

    /// The partition count.
    pub const fn partitions(&self) -> Partitions {
        self.options.partitions
    }

    /// The handle of partition `id` (its tree is created on first use).
    /// The same as [`Engine::partition`], without importing the trait.
    pub fn partition(&self, id: PartitionId) -> Result<Partition> {
        let partitions = self.options.partitions.get();
        if id.get() >= partitions {
            return Err(Error::NoSuchPartition {
                partition: id.get(),
                partitions,
            });
        }
        let tree = self
            .db
            .open_tree(tree_name(id))
            .map_err(|e| Error::storage("open partition", e))?;
        let lock = self
            .write_locks
            .get(usize::try_from(id.get()).unwrap_or(usize::MAX))
            .map(Arc::clone)
            .ok_or(Error::NoSuchPartition {
                partition: id.get(),
                partitions,
            })?;
        Ok(Partition::new(id, tree, self.options.durability, lock))
    }

    /// Flushes every pending write to disk (fsync).
    pub fn flush(&self) -> Result<()> {
        self.db
            .flush()
            .map(drop)
            .map_err(|e| Error::storage("flush", e))
    }

    /// The size of the database files, in bytes.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.db
            .size_on_disk()
            .map_err(|e| Error::storage("size on disk", e))
    }
}

impl Engine for Store {
    type Partition = Partition;

    fn partitions(&self) -> Partitions {
        Store::partitions(self)
    }

    fn partition(&self, id: PartitionId) -> Result<Partition> {
        Store::partition(self, id)
    }
}

/// Opens the database; while its file lock is held, retries for up to
/// [`OPEN_LOCK_WAIT_MS`].
fn open_waiting_for_lock(config: &sled::Config, path: &Path) -> Result<sled::Db> {
    let started = Instant::now();
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            // sled reports a held lock only as an `Other` I/O error with
            // this text.
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::Other
                    && e.to_string().starts_with("could not acquire lock") =>
            {
                if started.elapsed() >= Duration::from_millis(OPEN_LOCK_WAIT_MS) {
                    return Err(Error::Locked {
                        path: path.to_owned(),
                    });
                }
                std::thread::sleep(Duration::from_millis(OPEN_LOCK_RETRY_MS));
            }
            Err(e) => return Err(Error::storage("open", e)),
        }
    }
}

fn tree_name(id: PartitionId) -> String {
    format!("amends/partition/{:04}", id.get())
}

fn check_meta(db: &sled::Db, partitions: Partitions) -> Result<()> {
    let names = db.tree_names();
    if !names.iter().any(|n| n == META_TREE) {
        let foreign = names.iter().any(|n| n != SLED_DEFAULT_TREE) || !db.is_empty();
        if foreign {
            return Err(Error::MissingMeta);
        }
        let meta = db
            .open_tree(META_TREE)
            .map_err(|e| Error::storage("open meta", e))?;
        let mut batch = sled::Batch::default();
        batch.insert(
            META_FORMAT_VERSION,
            &u32::from(FORMAT_VERSION).to_be_bytes(),
        );
        batch.insert(META_PARTITIONS, &partitions.get().to_be_bytes());
        meta.apply_batch(batch)
            .map_err(|e| Error::storage("write meta", e))?;
        db.flush().map_err(|e| Error::storage("flush", e))?;
        return Ok(());
    }
    let meta = db
        .open_tree(META_TREE)
        .map_err(|e| Error::storage("open meta", e))?;
    let found = meta_u32(&meta, META_FORMAT_VERSION)?;
    let expected = u32::from(FORMAT_VERSION);
    if found != expected {
        return Err(Error::FormatVersion { found, expected });
    }
    let stored = meta_u32(&meta, META_PARTITIONS)?;
    if stored != partitions.get() {
        return Err(Error::PartitionCount {
            stored,
            requested: partitions.get(),
        });
    }
    Ok(())
}

fn meta_u32(meta: &sled::Tree, key: &[u8]) -> Result<u32> {
    let v = meta.get(key).map_err(|e| Error::storage("read meta", e))?;
    let v = v.ok_or_else(|| Error::corrupt(key, "meta record missing"))?;
    let b: [u8; 4] = v
        .as_ref()
        .try_into()
        .map_err(|_| Error::corrupt(key, format!("meta record is {} bytes, not 4", v.len())))?;
    Ok(u32::from_be_bytes(b))
}
