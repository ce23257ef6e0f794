//! The one error type of amends-nats: the topology's, the partition
//! worker's, the service's and the lease's errors are variants of
//! [`Error`]. Which of them stop a partition for good, and which stop the
//! whole service, is [`crate::service::is_fatal`]'s and
//! [`crate::service::needs_reopen`]'s to say.

/// A boxed foreign error (async-nats), kept opaque so that its types are not
/// part of this crate's API.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in amends-nats.
///
/// The variants come in four groups, by where they arise: the topology
/// ([`crate::topology`]), a partition worker ([`crate::worker`]: why it
/// stopped), the service ([`crate::service`]: why it could not start or
/// returned) and the deployment lease ([`crate::lease`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // The topology.
    /// A subject prefix that is not one or more dot-separated tokens of
    /// `A-Z a-z 0-9 _ -` of at most [`crate::topology::PREFIX_BYTES_MAX`]
    /// bytes (from [`amends_core::protocol::PrefixError`]).
    #[error("invalid subject prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The refused prefix.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A [`crate::topology::Topology`] setting out of its range (for
    /// example zero replicas, or a zero duplicate window).
    #[error("invalid topology: {field} {reason}")]
    InvalidTopology {
        /// The setting, e.g. `"replicas"`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A JetStream request about a stream failed: the server could not be
    /// reached, timed out, or refused the request (for example because
    /// another stream already takes the same subjects).
    #[error("stream {stream}: {action} failed: {source}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// What amends was doing, e.g. `"create"`.
        action: &'static str,
        /// The underlying async-nats error.
        #[source]
        source: Source,
    },
    /// A stream exists with a setting amends cannot rely on. amends never
    /// edits or deletes an existing stream: the operator changes it (`nats
    /// stream edit`), moves it aside, or configures amends to match.
    #[error(
        "stream {stream} exists with {field} {found}, but this deployment needs {expected}; \
         amends leaves existing streams unchanged: fix the stream or the configuration"
    )]
    IncompatibleStream {
        /// The stream's name.
        stream: String,
        /// The first setting that differs, e.g. `"subjects"` or
        /// `"duplicate_window"`, in the order the check runs (see
        /// [`crate::topology::ensure`]).
        field: &'static str,
        /// The value the configuration asks for.
        expected: String,
        /// The value the stream has.
        found: String,
    },
    /// A request to the deployment's meta key-value bucket (where the
    /// partition count is recorded) failed.
    #[error("meta bucket {bucket}: {action} failed: {source}")]
    Meta {
        /// The bucket's name.
        bucket: String,
        /// What amends was doing, e.g. `"read partitions"`.
        action: &'static str,
        /// The underlying async-nats error.
        #[source]
        source: Source,
    },
    /// The meta bucket holds a value amends cannot read (not the count in
    /// decimal digits that [`amends_core::protocol::parse_partitions`]
    /// reads): it was written by something else.
    #[error("meta bucket {bucket}: key {key} holds {value:?}, which is not a partition count")]
    CorruptMeta {
        /// The bucket's name.
        bucket: String,
        /// The key.
        key: &'static str,
        /// The value, lossily decoded as UTF-8.
        value: String,
    },
    /// The deployment was created with another partition count. The count
    /// is fixed at creation: routing every key again would move accounts
    /// and claims between partitions, and their state with them.
    #[error(
        "this deployment was created with {stored} partitions, but is configured with {configured}; \
         the partition count of a deployment cannot change"
    )]
    PartitionCountMismatch {
        /// The count recorded when the deployment was created.
        stored: u32,
        /// The count of the configuration.
        configured: u32,
    },

    // A partition worker: why it stopped. It runs until one of these
    // happens.
    /// The machine, the store partition and the topology disagree about
    /// which partition this is, or the partition is not in the topology.
    #[error("worker misconfigured: {0}")]
    Misconfigured(String),
    /// The log went backwards: a message at or below the applied position
    /// was delivered for the first time, or the stream ends below the
    /// applied position. The requests stream lost acknowledged messages (or
    /// was replaced); deciding on would contradict published decisions, so
    /// the partition stops until an operator looks.
    #[error("partition {partition}: the log went backwards: {fault}")]
    LogBehind {
        /// The partition.
        partition: u32,
        /// What was seen.
        fault: amends_core::partition::Fault,
    },
    /// The requests stream no longer holds, at the applied position, the
    /// message the store applied there (see `worker::check_tail`): the log was
    /// trimmed or rolled back, possibly refilled by new requests. Deciding
    /// on would skip requests or contradict published decisions, so the
    /// partition stops until an operator looks (README, "When a partition
    /// stops").
    #[error(
        "partition {partition}: the log changed under the applied position {position}: {found} is there now"
    )]
    LogChanged {
        /// The partition.
        partition: u32,
        /// The store's applied position.
        position: u64,
        /// What the stream holds there now.
        found: String,
    },
    /// Messages are missing from the requests stream (deleted, or purged
    /// from its head) at sequences above what this partition had applied
    /// when it last looked (see `worker::check_holes`): a request of this
    /// partition may be among them, and deciding on would skip it
    /// silently. The partition stops until an operator looks (README,
    /// "When a partition stops").
    #[error(
        "partition {partition}: the log has a hole: {missing} above position {from} (a request of this partition may be among them)"
    )]
    LogHole {
        /// The partition.
        partition: u32,
        /// The position up to which the log was checked before.
        from: u64,
        /// Which sequences are missing, for a human.
        missing: String,
    },
    /// A decision write was refused by the fence: a newer owner published
    /// its ownership record for this partition (error 10071 on the fenced
    /// publish). This worker is not the partition's writer any more; it
    /// stops at once and publishes nothing more.
    #[error(
        "partition {partition}: fenced: a newer owner took the partition (this worker's epoch {epoch}, now {owner})"
    )]
    Fenced {
        /// The partition.
        partition: u32,
        /// This worker's epoch (the stream sequence of its ownership record).
        epoch: u64,
        /// The newer ownership record, as read after the refusal.
        owner: String,
    },
    /// The store failed (commit, outbox); the driver reopens it and starts
    /// again from its durable state.
    #[error("partition {partition}: store: {source}")]
    Store {
        /// The partition.
        partition: u32,
        /// The store's error.
        #[source]
        source: amends_store::Error,
    },
    /// A JetStream or NATS request failed (consumer, fetch, publish,
    /// ack); starting again resumes from the store.
    #[error("partition {partition}: {action} failed: {source}")]
    Nats {
        /// The partition.
        partition: u32,
        /// What the worker was doing.
        action: &'static str,
        /// The async-nats error.
        #[source]
        source: Source,
    },
    /// The blocking apply-and-commit task panicked: a broken internal
    /// invariant of the core or the store. The store handle went with it;
    /// reopen the store and start again (replay from the durable state).
    #[error("partition {partition}: the apply-and-commit task panicked: {detail}")]
    Panicked {
        /// The partition.
        partition: u32,
        /// The panic, as text.
        detail: String,
    },
    /// The durable consumer went backwards: it delivered a consumer
    /// sequence at or below one it delivered before. A restarted
    /// nats-server may restore an older consumer state than it acknowledged
    /// (consumer state is written asynchronously), and then delivers again,
    /// as first deliveries, messages this worker applied. That is not the
    /// log going backwards; starting again recreates the consumer from the
    /// store's applied position.
    #[error(
        "partition {partition}: the consumer went backwards (consumer sequence {got} after {last}); it must be recreated"
    )]
    ConsumerReset {
        /// The partition.
        partition: u32,
        /// The consumer sequence delivered last before.
        last: u64,
        /// The consumer sequence delivered now.
        got: u64,
    },
    /// Deliveries went missing between the consumer and the worker: the
    /// consumer delivered a consumer sequence past the one after the last
    /// the worker received. async-nats 0.51 drops the messages a fetch had
    /// already buffered when its own expiry timer fires before they are
    /// read, which a pause of the process (GC, VM, SIGSTOP, CPU
    /// starvation) longer than the fetch wait plus 5 s causes. Nothing
    /// past the gap is applied or acknowledged; starting again recreates
    /// the consumer at the store's applied position + 1, which delivers
    /// the missing messages again.
    #[error(
        "partition {partition}: deliveries missing (consumer sequence {got} after {last}); the consumer must be recreated"
    )]
    ConsumerGap {
        /// The partition.
        partition: u32,
        /// The consumer sequence received last.
        last: u64,
        /// The consumer sequence received now.
        got: u64,
    },
    /// The consumer stalled: fetches came back empty while the requests
    /// stream held a message of this partition past the last one
    /// delivered (see [`crate::worker::STALL_CHECK_IDLE_FETCHES`]). Starting again
    /// recreates the consumer from the store's applied position.
    #[error(
        "partition {partition}: the consumer stalled (delivered through {delivered}, stream holds {waiting}); it must be recreated"
    )]
    ConsumerStalled {
        /// The partition.
        partition: u32,
        /// The last stream sequence delivered (or applied on start).
        delivered: u64,
        /// The last stream sequence of the partition's subject.
        waiting: u64,
    },

    // The service: why it could not start, or why it returned.
    /// The topology is invalid, or the store has another partition count.
    #[error("service misconfigured: {0}")]
    ServiceMisconfigured(String),
    /// The store could not hand out a partition.
    #[error("store: {0}")]
    StoreHandle(#[source] amends_store::Error),
    /// The store failed in a way that only reopening it can mend (an I/O
    /// error such as a full disk: sled's handle keeps failing after one):
    /// the service stops, so that the process exits and a process
    /// supervisor starts it again, reopening the store.
    #[error("partition {partition}: {detail}; the store must be reopened: stopping the service")]
    StoreFailed {
        /// The partition whose commit or read failed.
        partition: u32,
        /// The error.
        detail: String,
    },
    /// Every partition stopped on an integrity error; see
    /// [`crate::service::Status`].
    #[error("every partition stopped: {0}")]
    AllStopped(String),

    // The deployment lease: why it could not be taken or kept.
    /// A JetStream request about the lease bucket failed.
    #[error("lease bucket {bucket}: {action} failed: {source}")]
    LeaseBucket {
        /// The bucket.
        bucket: String,
        /// What was being done.
        action: &'static str,
        /// The async-nats error.
        #[source]
        source: Source,
    },
    /// The lease could not be renewed in time, or another instance holds
    /// it now: this process must stop serving.
    #[error("lost the deployment lease ({detail}); now held by {holder}")]
    LeaseLost {
        /// What happened.
        detail: String,
        /// The holder now, as recorded in the bucket (or "nobody").
        holder: String,
    },
    /// The lease TTL asked for is below the minimum the lease accepts.
    #[error("lease TTL {ttl:?} is below the minimum {min:?}")]
    LeaseTtlTooShort {
        /// The TTL asked for.
        ttl: std::time::Duration,
        /// The shortest TTL accepted.
        min: std::time::Duration,
    },
}

impl From<amends_core::protocol::PrefixError> for Error {
    fn from(e: amends_core::protocol::PrefixError) -> Error {
        Error::InvalidPrefix {
            prefix: e.prefix,
            reason: e.reason,
        }
    }
}
