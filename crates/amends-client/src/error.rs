//! The one error type of amends-client.

use std::path::PathBuf;
use std::time::Duration;

use amends_core::OpId;
use amends_core::route::PartitionsError;

/// A boxed foreign error (async-nats, I/O), kept opaque so that its types
/// are not part of this crate's API.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the client.
///
/// A refusal is not an error: it is a [`amends_core::Decision`] whose outcome
/// is rejected, returned in `Ok`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A subject prefix that is not one or more dot-separated tokens of
    /// `A-Z a-z 0-9 _ -` of at most [`crate::PREFIX_BYTES_MAX`] bytes (from
    /// [`amends_core::protocol::PrefixError`]).
    #[error("invalid subject prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The refused prefix.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A partition count out of range, configured or read from the meta
    /// bucket.
    #[error("invalid partition count: {0}")]
    InvalidPartitions(#[from] PartitionsError),
    /// No NATS server URL was configured.
    #[error("no NATS server URL configured")]
    NoServers,
    /// A NATS server URL that does not parse.
    #[error("invalid NATS server URL {url:?}: {source}")]
    InvalidUrl {
        /// The refused URL.
        url: String,
        /// Why it does not parse.
        #[source]
        source: Source,
    },
    /// The credentials file could not be read.
    #[error("credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// The I/O or parse error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to NATS failed (unreachable, authentication, TLS).
    #[error("connect to NATS: {0}")]
    Connect(#[source] Source),
    /// The partition count could not be read from the meta bucket: the
    /// bucket or key is missing (the deployment was never started), the
    /// value is not a number, or the request failed.
    #[error("meta bucket {bucket}: {detail}")]
    Meta {
        /// The bucket, e.g. `AMENDS_META`.
        bucket: String,
        /// What went wrong.
        detail: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Source>,
    },
    /// Subscribing to the client's inbox failed.
    #[error("subscribe to the inbox: {0}")]
    Subscribe(#[source] Source),
    /// A tick was submitted. Ticks are appended by amends itself to the
    /// partition they are for; they have no routing key and no decision.
    #[error("op {op_id}: a tick cannot be submitted by a client")]
    Tick {
        /// The request's op id.
        op_id: OpId,
    },
    /// The encoded request is larger than the protocol allows
    /// ([`amends_core::wire::REQUEST_BYTES_MAX`]); amends would refuse it.
    #[error("op {op_id}: request is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// The request's op id.
        op_id: OpId,
        /// Its encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The publish was not acknowledged by JetStream (no stream, timeout,
    /// connection lost). The request may or may not be in the log:
    /// resubmitting it is safe.
    #[error("op {op_id}: publish to {subject} not acknowledged: {source}")]
    Publish {
        /// The request's op id.
        op_id: OpId,
        /// The subject it was published to.
        subject: String,
        /// The underlying async-nats error.
        #[source]
        source: Source,
    },
    /// [`crate::Client::submit_optimistic`] with a request that names
    /// another apology topic than the one given.
    #[error("op {op_id}: the request names apology topic {named:?}, not {topic:?}")]
    TopicMismatch {
        /// The request's op id.
        op_id: OpId,
        /// The topic the request names.
        named: String,
        /// The topic given to `submit_optimistic`.
        topic: String,
    },
    /// A durable consumer name that is not one subject token of
    /// `A-Z a-z 0-9 _ -` of at most [`crate::DURABLE_NAME_BYTES_MAX`] bytes.
    #[error("invalid durable consumer name {name:?}: {reason}")]
    InvalidDurableName {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The apology consumer failed: the apology stream is missing (the
    /// deployment was never started), the consumer could not be created or
    /// pulled from, an ack was not confirmed, or a message on the topic is
    /// not an apology.
    #[error("apologies: {detail}")]
    Apologies {
        /// What went wrong.
        detail: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Source>,
    },
    /// [`crate::Client::wait`] for an op id that this client has not
    /// submitted, or whose decision was already handed out: its reply can
    /// never reach this client's inbox.
    #[error("op {op_id}: not submitted by this client, or already answered")]
    NotSubmitted {
        /// The op id.
        op_id: OpId,
    },
    /// No decision arrived in time. The operation may still be decided:
    /// resubmit it (same op id, same body) to learn its decision.
    #[error("op {op_id}: no decision after {tries} tries of {per_try:?}")]
    Timeout {
        /// The op id.
        op_id: OpId,
        /// How many times it was submitted (waits, for [`crate::Client::wait`]).
        tries: u32,
        /// How long each wait lasted.
        per_try: Duration,
    },
    /// The status endpoint did not answer, or answered something other than
    /// a status (an error reply for a bad request, or an unreadable one).
    #[error("op {op_id}: status query on {subject}: {detail}")]
    Status {
        /// The op id.
        op_id: OpId,
        /// The status subject asked.
        subject: String,
        /// What went wrong.
        detail: String,
        /// The underlying async-nats error, if there is one.
        #[source]
        source: Option<Source>,
    },
    /// A query endpoint (balance, claim, stats) did not answer, answered
    /// an error (a bad request), or answered something unreadable.
    #[error("query on {subject}: {detail}")]
    Query {
        /// The subject asked.
        subject: String,
        /// What went wrong.
        detail: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Source>,
    },
    /// The client's inbox subscription ended (the connection was closed for
    /// good); no more decisions can arrive.
    #[error("the client's inbox subscription is closed")]
    Closed,
}

impl From<amends_core::protocol::PrefixError> for Error {
    fn from(e: amends_core::protocol::PrefixError) -> Error {
        Error::InvalidPrefix {
            prefix: e.prefix,
            reason: e.reason,
        }
    }
}
