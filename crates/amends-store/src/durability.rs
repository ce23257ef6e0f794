//! When a commit is durable: the one setting that both the store (how sled
//! flushes) and a partition (whether its commit flushes) read.

/// When a commit is durable.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Durability {
    /// Every commit is flushed (fsync) before
    /// [`crate::PartitionStore::commit`] returns: what the driver publishes or acknowledges after it survives
    /// a crash of the process or the machine. The default.
    #[default]
    Fsync,
    /// Commits are flushed in the background every `flush_every_ms`.
    /// Faster (no fsync per batch), but a crash loses the commits of the
    /// last interval, whose effects may already be published. Batches stay
    /// atomic and decisions are a deterministic function of the log, so
    /// replaying the lost tail decides the same again, *provided the log
    /// still holds it*: use it only with a log that is itself synced
    /// (JetStream `sync_interval: always`, or replicas). Call
    /// [`crate::Store::flush`] before a clean shutdown.
    Deferred {
        /// The background flush interval.
        flush_every_ms: u64,
    },
}
