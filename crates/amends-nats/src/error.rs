//! The one error type of amends-nats.

/// A boxed foreign error (async-nats), kept opaque so that its types are not
/// part of this crate's API.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in amends-nats.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A subject prefix that is not one or more dot-separated tokens of
    /// `A-Z a-z 0-9 _ -` of at most [`crate::topology::PREFIX_BYTES_MAX`]
    /// bytes.
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
    /// The meta bucket holds a value amends cannot read: it was written by
    /// something else.
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
}
