//! The JetStream topology of a deployment: subjects, headers, streams, and
//! the partition count.
//!
//! Subjects, stream names and header names are built here and nowhere else
//! (the rest of the code base asks a [`Prefix`]). With the default prefix
//! `amends`:
//!
//! | stream | name | subjects | what |
//! | --- | --- | --- | --- |
//! | requests | `AMENDS_REQ` | `amends.req.*` | operations and ticks, one subject per partition: the system of record |
//! | decisions | `AMENDS_DEC` | `amends.dec.*` | one decision per operation, and hold-expired events |
//! | apologies | `AMENDS_APOLOGY` | `amends.apology.>` | refused optimistic operations, by apology topic |
//! | dead letters | `AMENDS_DLQ` | `amends.dlq.*` | input without a readable op id |
//!
//! The service's request-reply endpoints have no stream (core NATS,
//! served by [`crate::service`]): the status of an op id
//! `amends.status.<p>` ([`Prefix::status`]), the balance and claim queries
//! `amends.query.balance.<p>` and `amends.query.claim.<p>`
//! ([`Prefix::query_balance`], [`Prefix::query_claim`]) and the partition
//! stats `amends.stats.<p>` ([`Prefix::stats`]).
//!
//! Stream names are the prefix in upper case with every character that is
//! not a letter or a digit replaced by `_`, then `_REQ`, `_DEC`, `_APOLOGY`
//! or `_DLQ`. Two prefixes that differ only there (`a-b` and `a.b`) map to
//! the same stream names, so they cannot share a NATS account: the second
//! deployment is refused by [`ensure`] (the subjects differ), not mixed in.
//!
//! Every stream uses file storage and limits retention with no limits set
//! (nothing is deleted by age or size: the requests stream is the log that
//! state is rebuilt from), the configured number of replicas, and the
//! configured duplicate window. The window matters on every stream: clients
//! resubmit requests with the same `Nats-Msg-Id`, and amends republishes its
//! outbox with deterministic ids after a crash.
//!
//! The partition count is recorded in the key-value bucket `<PREFIX>_META`
//! (key `partitions`) when the deployment is first ensured, and every later
//! [`ensure`] refuses another count.
//!
//! # Integrity: what the log can lose
//!
//! A JetStream publish acknowledgement does not mean the message is on disk.
//! With file storage, the server writes the message to its block file (the
//! operating system's page cache) and acknowledges; it fsyncs every
//! `sync_interval`, two minutes by default. A killed `nats-server` process
//! loses nothing that way, but a power failure or an operating-system crash
//! can lose acknowledged messages. Jepsen's analysis of NATS 2.12.1 (Kyle
//! Kingsbury, December 2025) showed such losses in clusters too: after
//! coordinated power failures, or an OS crash on a single node combined with
//! network delays or process pauses, replicas lost acknowledged writes and
//! could disagree about the stream's contents; it also found writes lost when
//! data files were truncated or corrupted on a minority of nodes. It
//! recommends `sync_interval: always`.
//!
//! For the integrity a deployment needs:
//!
//! - Set `jetstream { sync_interval: always }` in the server configuration:
//!   the server fsyncs before it acknowledges. It is a server setting, not a
//!   stream setting, and a client cannot see it, so [`ensure`] cannot check
//!   it.
//! - In a cluster, use 3 replicas ([`Topology::replicas`]): an acknowledged
//!   message is then on a majority of servers.
//! - Keep the streams' persistence mode at the server's default
//!   ([`PersistMode::Default`]); [`PersistMode::Async`] acknowledges before
//!   the write even reaches the operating system.
//!
//! What amends does about it, whatever the settings (the design of the
//! partition workers, which are not built yet): it confirms an operation
//! only after its own store has fsynced the decision, and a worker that
//! finds a partition's log behind its applied position (a stream sequence
//! below the one it applied, or a gap) stops that partition loudly instead
//! of deciding again on a log that lost messages. It cannot bring back a
//! lost request; it refuses to pretend the request never happened.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use amends_core::command::Topic;
use amends_core::command::is_subject_token_byte;
use amends_core::route::{PartitionId, Partitions};
use async_nats::jetstream::{self, kv, stream};

use crate::error::{Error, Source};

/// The header names of `specs/protocol.md` ("Headers", "Dead letters").
pub mod header {
    /// The op id of a request, in canonical text. JetStream drops a second
    /// publish with the same id inside the stream's duplicate window; amends
    /// also sets it, deterministically, on everything it publishes, so that
    /// republishing after a crash stores nothing twice.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The NATS subject a waiting client wants its decision sent to, in
    /// addition to the decisions stream.
    pub const REPLY_TO: &str = "Amends-Reply-To";
    /// JetStream's fence: the publish is stored only if the last message
    /// on [`EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT`] has this stream
    /// sequence (else error 10071, "wrong last sequence"). Every decision
    /// names its owner's ownership record this way.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    /// The subject [`EXPECTED_LAST_SUBJECT_SEQUENCE`] is checked on: the
    /// partition's ownership subject.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
        "Nats-Expected-Last-Subject-Sequence-Subject";
    /// On a dead letter: why the raw bytes of the body could not be read.
    pub const ERROR: &str = "Amends-Error";
}

/// The default subject prefix.
pub const PREFIX_DEFAULT: &str = "amends";

/// The longest subject prefix, in bytes. Stream names are derived from the
/// prefix and JetStream stores each stream in a directory of that name, so
/// the prefix is kept well under file-name limits.
pub const PREFIX_BYTES_MAX: usize = 64;
// The refusal text of `Prefix::new` names the limit.
const _: () = assert!(PREFIX_BYTES_MAX == 64);

/// The default duplicate window of every stream: JetStream's own default.
pub const DUPLICATE_WINDOW_DEFAULT: Duration = Duration::from_secs(120);

/// The most replicas a JetStream stream may have.
pub const REPLICAS_MAX: usize = 5;

/// The key of the meta bucket that records the partition count.
pub const PARTITIONS_KEY: &str = "partitions";

/// A validated subject prefix: one or more dot-separated, non-empty tokens
/// of `A-Z a-z 0-9 _ -`, at most [`PREFIX_BYTES_MAX`] bytes.
///
/// The character set is narrower than what NATS allows in a subject token,
/// so that every derived stream and bucket name is valid too, and so that
/// the prefix can never contain a wildcard.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// Validates a prefix.
    pub fn new(prefix: impl Into<String>) -> Result<Prefix, Error> {
        let prefix = prefix.into();
        let refuse = |reason| Error::InvalidPrefix {
            prefix: prefix.clone(),
            reason,
        };
        if prefix.is_empty() {
            return Err(refuse("it is empty"));
        }
        if prefix.len() > PREFIX_BYTES_MAX {
            return Err(refuse("it is longer than 64 bytes"));
        }
        for token in prefix.split('.') {
            if token.is_empty() {
                return Err(refuse("it has an empty token"));
            }
            if !token.bytes().all(is_subject_token_byte) {
                return Err(refuse("a token has a character other than A-Z a-z 0-9 _ -"));
            }
        }
        Ok(Prefix(prefix))
    }

    /// The prefix as text, e.g. `amends`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The request subject of a partition: `<prefix>.req.<p>`.
    pub fn req(&self, partition: PartitionId) -> String {
        format!("{}.req.{partition}", self.0)
    }

    /// Every request subject: `<prefix>.req.*`.
    pub fn req_wildcard(&self) -> String {
        format!("{}.req.*", self.0)
    }

    /// The decision subject of a partition: `<prefix>.dec.<p>`.
    pub fn dec(&self, partition: PartitionId) -> String {
        format!("{}.dec.{partition}", self.0)
    }

    /// Every decision subject: `<prefix>.dec.*`.
    pub fn dec_wildcard(&self) -> String {
        format!("{}.dec.*", self.0)
    }

    /// The ownership subject of a partition: `<prefix>.owner.<p>`, on the
    /// decisions stream. The worker that owns the partition publishes an
    /// ownership record there when it starts; the record's stream sequence
    /// is its epoch, and every decision it writes is fenced on it (see
    /// [`header::EXPECTED_LAST_SUBJECT_SEQUENCE`]), so once a newer owner
    /// published its record, an older owner's writes are refused.
    pub fn owner(&self, partition: PartitionId) -> String {
        format!("{}.owner.{partition}", self.0)
    }

    /// Every ownership subject: `<prefix>.owner.*`.
    pub fn owner_wildcard(&self) -> String {
        format!("{}.owner.*", self.0)
    }

    /// The apology subject of a topic: `<prefix>.apology.<topic>`. A
    /// [`Topic`] is validated to be one or more subject tokens.
    pub fn apology(&self, topic: &Topic) -> String {
        format!("{}.apology.{}", self.0, topic.as_str())
    }

    /// Every apology subject: `<prefix>.apology.>`.
    pub fn apology_wildcard(&self) -> String {
        format!("{}.apology.>", self.0)
    }

    /// The dead-letter subject of a partition: `<prefix>.dlq.<p>`.
    pub fn dlq(&self, partition: PartitionId) -> String {
        format!("{}.dlq.{partition}", self.0)
    }

    /// Every dead-letter subject: `<prefix>.dlq.*`.
    pub fn dlq_wildcard(&self) -> String {
        format!("{}.dlq.*", self.0)
    }

    /// The status endpoint of a partition: `<prefix>.status.<p>`, a core
    /// NATS request-reply subject (no stream): the body is an op id, the
    /// reply what the partition knows of it (see [`crate::service`]).
    pub fn status(&self, partition: PartitionId) -> String {
        format!("{}.status.{partition}", self.0)
    }

    /// Every status endpoint: `<prefix>.status.*`.
    pub fn status_wildcard(&self) -> String {
        format!("{}.status.*", self.0)
    }

    /// The balance query of a partition: `<prefix>.query.balance.<p>`, core
    /// NATS request-reply: the body is an account id, the reply its
    /// balance, holds and limits (see [`crate::service`]).
    pub fn query_balance(&self, partition: PartitionId) -> String {
        format!("{}.query.balance.{partition}", self.0)
    }

    /// Every balance query: `<prefix>.query.balance.*`.
    pub fn query_balance_wildcard(&self) -> String {
        format!("{}.query.balance.*", self.0)
    }

    /// The claim query of a partition: `<prefix>.query.claim.<p>`, core NATS
    /// request-reply: the body is `{"namespace":..,"key":..}`, the reply
    /// the owner of that claim, if any.
    pub fn query_claim(&self, partition: PartitionId) -> String {
        format!("{}.query.claim.{partition}", self.0)
    }

    /// Every claim query: `<prefix>.query.claim.*`.
    pub fn query_claim_wildcard(&self) -> String {
        format!("{}.query.claim.*", self.0)
    }

    /// The stats endpoint of a partition: `<prefix>.stats.<p>`, core NATS
    /// request-reply: the reply is the partition's applied position, lag
    /// and state.
    pub fn stats(&self, partition: PartitionId) -> String {
        format!("{}.stats.{partition}", self.0)
    }

    /// Every stats endpoint: `<prefix>.stats.*`.
    pub fn stats_wildcard(&self) -> String {
        format!("{}.stats.*", self.0)
    }

    /// The subjects a stream takes, sorted: one wildcard subject, and for
    /// the decisions stream the ownership records' as well.
    pub fn stream_subjects(&self, stream: Stream) -> Vec<String> {
        match stream {
            Stream::Requests => vec![self.req_wildcard()],
            Stream::Decisions => vec![self.dec_wildcard(), self.owner_wildcard()],
            Stream::Apologies => vec![self.apology_wildcard()],
            Stream::DeadLetters => vec![self.dlq_wildcard()],
        }
    }

    /// A stream's name, e.g. `AMENDS_REQ`.
    pub fn stream_name(&self, stream: Stream) -> String {
        format!("{}_{}", self.upper(), stream.suffix())
    }

    /// The name of the key-value bucket that records the partition count,
    /// e.g. `AMENDS_META`.
    pub fn meta_bucket(&self) -> String {
        format!("{}_META", self.upper())
    }

    /// The prefix in upper case, every other character than a letter or a
    /// digit replaced by `_`.
    fn upper(&self) -> String {
        self.0
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    }
}

impl Default for Prefix {
    fn default() -> Prefix {
        Prefix(PREFIX_DEFAULT.to_owned())
    }
}

impl FromStr for Prefix {
    type Err = Error;

    fn from_str(s: &str) -> Result<Prefix, Error> {
        Prefix::new(s)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// One of the four streams of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// `<prefix>.req.*`: operations and ticks; the system of record.
    Requests,
    /// `<prefix>.dec.*`: decisions and hold-expired events.
    Decisions,
    /// `<prefix>.apology.>`: apologies, by topic.
    Apologies,
    /// `<prefix>.dlq.*`: dead letters.
    DeadLetters,
}

impl Stream {
    /// Every stream, in the order [`ensure`] handles them.
    pub const ALL: [Stream; 4] = [
        Stream::Requests,
        Stream::Decisions,
        Stream::Apologies,
        Stream::DeadLetters,
    ];

    /// The end of the stream's name.
    fn suffix(self) -> &'static str {
        match self {
            Stream::Requests => "REQ",
            Stream::Decisions => "DEC",
            Stream::Apologies => "APOLOGY",
            Stream::DeadLetters => "DLQ",
        }
    }

    /// What the stream holds, for its description.
    fn what(self) -> &'static str {
        match self {
            Stream::Requests => "requests (the log of record)",
            Stream::Decisions => "decisions and hold-expired events",
            Stream::Apologies => "apologies",
            Stream::DeadLetters => "dead letters",
        }
    }
}

/// How the server persists a stream's writes before acknowledging them: the
/// stream's `persist_mode` (NATS 2.12 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PersistMode {
    /// The server writes each message before acknowledging it, and fsyncs as
    /// its `sync_interval` says (before every acknowledgement with
    /// `sync_interval: always`).
    #[default]
    Default,
    /// The server may acknowledge before the write is done: faster, and
    /// acknowledged messages can be lost even when only the server process
    /// dies. Only for throwaway deployments.
    Async,
}

impl PersistMode {
    fn to_nats(self) -> Option<stream::PersistenceMode> {
        match self {
            // Left unset, so servers older than 2.12 accept the stream too.
            PersistMode::Default => None,
            PersistMode::Async => Some(stream::PersistenceMode::Async),
        }
    }
}

/// The configuration of a deployment's topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The subject prefix; streams and the meta bucket are named after it.
    pub prefix: Prefix,
    /// The partition count, fixed when the deployment is created.
    pub partitions: Partitions,
    /// The duplicate window of every stream: JetStream drops a publish whose
    /// `Nats-Msg-Id` it stored within this time. amends' own dedup covers
    /// much longer (`dedup_retention_ms`); this window saves work and keeps
    /// republished outbox entries from being stored twice.
    pub duplicate_window: Duration,
    /// The number of replicas of every stream and of the meta bucket, in
    /// `1..=REPLICAS_MAX`. Use 3 in a cluster (see the module docs).
    pub replicas: usize,
    /// How the server persists the streams' writes (see the module docs).
    pub persist_mode: PersistMode,
}

impl Topology {
    /// The default topology for `partitions`: prefix `amends`, a duplicate
    /// window of two minutes, one replica, default persistence.
    pub fn new(partitions: Partitions) -> Topology {
        Topology {
            prefix: Prefix::default(),
            partitions,
            duplicate_window: DUPLICATE_WINDOW_DEFAULT,
            replicas: 1,
            persist_mode: PersistMode::Default,
        }
    }

    /// Checks the settings that the types do not.
    pub fn validate(&self) -> Result<(), Error> {
        if self.replicas == 0 || self.replicas > REPLICAS_MAX {
            return Err(Error::InvalidTopology {
                field: "replicas",
                reason: format!("must be in 1..={REPLICAS_MAX}, got {}", self.replicas),
            });
        }
        if self.duplicate_window.is_zero() {
            return Err(Error::InvalidTopology {
                field: "duplicate_window",
                reason: "must not be zero (JetStream would use its own default)".to_owned(),
            });
        }
        // JetStream carries durations as signed 64-bit nanoseconds.
        if i64::try_from(self.duplicate_window.as_nanos()).is_err() {
            return Err(Error::InvalidTopology {
                field: "duplicate_window",
                reason: format!("{:?} is too long", self.duplicate_window),
            });
        }
        Ok(())
    }

    /// The JetStream configuration amends creates a stream with.
    fn stream_config(&self, stream: Stream) -> stream::Config {
        stream::Config {
            name: self.prefix.stream_name(stream),
            description: Some(format!("{}: {}", self.prefix, stream.what())),
            subjects: self.prefix.stream_subjects(stream),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            persist_mode: self.persist_mode.to_nats(),
            ..stream::Config::default()
        }
    }
}

/// What [`ensure`] did with one thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// It did not exist and was created.
    Created,
    /// It existed with compatible settings and was kept as it was.
    Kept,
    /// It existed from before the decisions were fenced (the decisions
    /// stream without the ownership subjects); the ownership subjects were
    /// added, nothing else changed.
    Upgraded,
}

/// What [`ensure`] did with one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// Which stream.
    pub stream: Stream,
    /// Its name.
    pub name: String,
    /// Created or kept.
    pub action: Action,
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The four streams, in the order of [`Stream::ALL`].
    pub streams: Vec<StreamReport>,
    /// Whether the partition count was recorded now (`Created`) or found
    /// recorded with the same value (`Kept`).
    pub partitions: Action,
}

/// Creates the deployment's streams and records its partition count, or
/// checks them if they exist.
///
/// Checks come first and change nothing: every existing stream is compared
/// with the configuration, and the recorded partition count with the
/// configured one. Only when all of them pass are the missing streams
/// created and the count recorded, so a refused `ensure` leaves the server
/// as it found it.
///
/// A stream is compatible when its subjects, storage, retention, duplicate
/// window, replicas and persistence mode are those of the configuration (in
/// that order; the first difference is reported as
/// [`Error::IncompatibleStream`]). Other settings (limits, description,
/// compression, placement) are the operator's and are not checked; note
/// that an age or size limit on the requests stream deletes the log that
/// state is rebuilt from.
///
/// Safe to run concurrently with itself: creating a stream or the partition
/// record that another process created meanwhile is checked like an
/// existing one.
pub async fn ensure(js: &jetstream::Context, topology: &Topology) -> Result<Report, Error> {
    topology.validate()?;

    let mut missing = Vec::new();
    let mut upgrades = Vec::new();
    let mut streams = Vec::with_capacity(Stream::ALL.len());
    for stream in Stream::ALL {
        let want = topology.stream_config(stream);
        match stream_info(js, &want.name).await? {
            Some(found) => {
                let action = match check_stream(&want, &found.config)? {
                    Fit::Same => Action::Kept,
                    Fit::Upgrade => {
                        upgrades.push((streams.len(), found.config));
                        Action::Upgraded
                    }
                };
                streams.push(StreamReport {
                    stream,
                    name: want.name,
                    action,
                });
            }
            None => {
                missing.push(streams.len());
                streams.push(StreamReport {
                    stream,
                    name: want.name,
                    action: Action::Created,
                });
            }
        }
    }

    let configured = topology.partitions.get();
    let bucket = topology.prefix.meta_bucket();
    let stored = read_partitions(js, &bucket).await?;
    if let Some(stored) = stored
        && stored != configured
    {
        return Err(Error::PartitionCountMismatch { stored, configured });
    }

    for (index, mut config) in upgrades {
        config.subjects = topology.stream_config(streams[index].stream).subjects;
        let name = config.name.clone();
        js.update_stream(config.clone())
            .await
            .map_err(|e| Error::Stream {
                stream: name.clone(),
                action: "add the ownership subjects",
                source: Box::new(e),
            })?;
        tracing::info!(stream = %name, subjects = ?config.subjects, "upgraded stream: decisions are fenced by ownership records");
    }

    for index in missing {
        let report = &mut streams[index];
        report.action = create_stream(js, topology.stream_config(report.stream)).await?;
    }

    let partitions = match stored {
        Some(_) => Action::Kept,
        None => record_partitions(js, topology, &bucket).await?,
    };
    Ok(Report {
        streams,
        partitions,
    })
}

/// The stream's info, or `None` if there is no stream of that name.
async fn stream_info(js: &jetstream::Context, name: &str) -> Result<Option<stream::Info>, Error> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().clone())),
        Err(err) if is_stream_not_found(&err) => Ok(None),
        Err(err) => Err(Error::Stream {
            stream: name.to_owned(),
            action: "read info",
            source: Box::new(err),
        }),
    }
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Creates a stream; if that fails because another process created it
/// meanwhile, checks the stream that is there.
async fn create_stream(js: &jetstream::Context, want: stream::Config) -> Result<Action, Error> {
    let name = want.name.clone();
    match js.create_stream(want.clone()).await {
        Ok(_) => {
            tracing::info!(stream = %name, subjects = ?want.subjects, "created stream");
            Ok(Action::Created)
        }
        Err(err) => match stream_info(js, &name).await? {
            Some(found) => match check_stream(&want, &found.config)? {
                Fit::Same => Ok(Action::Kept),
                // Created by an older build meanwhile: refused, as it
                // cannot be upgraded under its feet.
                Fit::Upgrade => Err(Error::IncompatibleStream {
                    stream: name,
                    field: "subjects",
                    expected: format!("{:?}", want.subjects),
                    found: format!("{:?}", found.config.subjects),
                }),
            },
            None => Err(Error::Stream {
                stream: name,
                action: "create",
                source: Box::new(err),
            }),
        },
    }
}

/// How an existing stream fits the configuration.
enum Fit {
    /// As configured.
    Same,
    /// As configured but for the ownership subjects, which may be added.
    Upgrade,
}

/// Compares an existing stream with the configuration, field by field, in
/// the order documented on [`ensure`].
fn check_stream(want: &stream::Config, found: &stream::Config) -> Result<Fit, Error> {
    let differ = |field, expected: String, found: String| {
        Err(Error::IncompatibleStream {
            stream: want.name.clone(),
            field,
            expected,
            found,
        })
    };
    let mut found_subjects = found.subjects.clone();
    found_subjects.sort();
    // A decisions stream from before the fence lacks the ownership
    // subjects (the last of `want`'s): adding them is the only change.
    let fit = if found_subjects != want.subjects
        && want.subjects.len() == 2
        && found_subjects.as_slice() == &want.subjects[..1]
    {
        Fit::Upgrade
    } else {
        Fit::Same
    };
    if matches!(fit, Fit::Same) && found_subjects != want.subjects {
        return differ(
            "subjects",
            format!("{:?}", want.subjects),
            format!("{found_subjects:?}"),
        );
    }
    if found.storage != want.storage {
        return differ(
            "storage",
            storage_text(want.storage).to_owned(),
            storage_text(found.storage).to_owned(),
        );
    }
    if found.retention != want.retention {
        return differ(
            "retention",
            retention_text(want.retention).to_owned(),
            retention_text(found.retention).to_owned(),
        );
    }
    if found.duplicate_window != want.duplicate_window {
        return differ(
            "duplicate_window",
            format!("{:?}", want.duplicate_window),
            format!("{:?}", found.duplicate_window),
        );
    }
    if found.num_replicas != want.num_replicas {
        return differ(
            "replicas",
            want.num_replicas.to_string(),
            found.num_replicas.to_string(),
        );
    }
    let found_persist = found.persist_mode.unwrap_or_default();
    let want_persist = want.persist_mode.unwrap_or_default();
    if found_persist != want_persist {
        return differ(
            "persist_mode",
            persist_text(want_persist).to_owned(),
            persist_text(found_persist).to_owned(),
        );
    }
    Ok(fit)
}

fn storage_text(storage: stream::StorageType) -> &'static str {
    match storage {
        stream::StorageType::File => "file",
        stream::StorageType::Memory => "memory",
    }
}

fn retention_text(retention: stream::RetentionPolicy) -> &'static str {
    match retention {
        stream::RetentionPolicy::Limits => "limits",
        stream::RetentionPolicy::Interest => "interest",
        stream::RetentionPolicy::WorkQueue => "workqueue",
    }
}

fn persist_text(mode: stream::PersistenceMode) -> &'static str {
    match mode {
        stream::PersistenceMode::Default => "default",
        stream::PersistenceMode::Async => "async",
    }
}

/// The recorded partition count, or `None` if none was recorded yet.
async fn read_partitions(js: &jetstream::Context, bucket: &str) -> Result<Option<u32>, Error> {
    let meta_err = |action, source: Source| Error::Meta {
        bucket: bucket.to_owned(),
        action,
        source,
    };
    // A bucket is the stream `KV_<bucket>`; asking for the stream tells
    // "absent" apart from "unreachable", which `get_key_value` does not.
    if stream_info(js, &format!("KV_{bucket}")).await?.is_none() {
        return Ok(None);
    }
    let store = js
        .get_key_value(bucket)
        .await
        .map_err(|e| meta_err("open", Box::new(e)))?;
    let value = store
        .get(PARTITIONS_KEY)
        .await
        .map_err(|e| meta_err("read partitions", Box::new(e)))?;
    value
        .map(|bytes| parse_partitions(bucket, &bytes))
        .transpose()
}

fn parse_partitions(bucket: &str, bytes: &[u8]) -> Result<u32, Error> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse::<u32>().ok())
        .ok_or_else(|| Error::CorruptMeta {
            bucket: bucket.to_owned(),
            key: PARTITIONS_KEY,
            value: String::from_utf8_lossy(bytes).into_owned(),
        })
}

/// Records the partition count, creating the bucket if needed. If another
/// process recorded a count meanwhile, compares with it instead.
async fn record_partitions(
    js: &jetstream::Context,
    topology: &Topology,
    bucket: &str,
) -> Result<Action, Error> {
    let meta_err = |action, source: Source| Error::Meta {
        bucket: bucket.to_owned(),
        action,
        source,
    };
    let store = if stream_info(js, &format!("KV_{bucket}")).await?.is_some() {
        js.get_key_value(bucket)
            .await
            .map_err(|e| meta_err("open", Box::new(e)))?
    } else {
        js.create_key_value(kv::Config {
            bucket: bucket.to_owned(),
            description: format!("{}: deployment settings", topology.prefix),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: topology.replicas,
            ..kv::Config::default()
        })
        .await
        .map_err(|e| meta_err("create", Box::new(e)))?
    };
    let configured = topology.partitions.get();
    match store
        .create(PARTITIONS_KEY, configured.to_string().into())
        .await
    {
        Ok(_) => {
            tracing::info!(
                bucket,
                partitions = configured,
                "recorded the partition count"
            );
            Ok(Action::Created)
        }
        Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
            let stored = store
                .get(PARTITIONS_KEY)
                .await
                .map_err(|e| meta_err("read partitions", Box::new(e)))?
                .map(|bytes| parse_partitions(bucket, &bytes))
                .transpose()?;
            match stored {
                Some(stored) if stored == configured => Ok(Action::Kept),
                Some(stored) => Err(Error::PartitionCountMismatch { stored, configured }),
                // Deleted between our create and our read: nothing to
                // compare with; the next start records it again.
                None => Err(meta_err("record partitions", Box::new(err))),
            }
        }
        Err(err) => Err(meta_err("record partitions", Box::new(err))),
    }
}

/// The durable consumer name of a partition's worker on the requests
/// stream, e.g. `worker-3`. Consumer names are scoped to their stream,
/// which is the deployment's, so the partition number is enough.
pub fn worker_consumer(partition: PartitionId) -> String {
    format!("worker-{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_prefix(input: &str, expected: Result<(&str, &str), &str>) {
        match (Prefix::new(input), expected) {
            (Ok(prefix), Ok((req, stream))) => {
                assert_eq!(prefix.req_wildcard(), req, "{input:?}");
                assert_eq!(prefix.stream_name(Stream::Requests), stream, "{input:?}");
            }
            (Err(Error::InvalidPrefix { reason, .. }), Err(want)) => {
                assert_eq!(reason, want, "{input:?}");
            }
            (got, want) => panic!("{input:?}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn prefixes() {
        check_prefix("amends", Ok(("amends.req.*", "AMENDS_REQ")));
        check_prefix("acme.amends", Ok(("acme.amends.req.*", "ACME_AMENDS_REQ")));
        check_prefix("a-b_C9", Ok(("a-b_C9.req.*", "A_B_C9_REQ")));
        check_prefix(
            &"x".repeat(PREFIX_BYTES_MAX),
            Ok((
                &format!("{}.req.*", "x".repeat(64)),
                &format!("{}_REQ", "X".repeat(64)),
            )),
        );
        check_prefix("", Err("it is empty"));
        check_prefix(
            &"x".repeat(PREFIX_BYTES_MAX + 1),
            Err("it is longer than 64 bytes"),
        );
        check_prefix("a..b", Err("it has an empty token"));
        check_prefix(".a", Err("it has an empty token"));
        check_prefix("a.", Err("it has an empty token"));
        for bad in ["a*", "a.>", "a b", "a/b", "é", "a\u{0}"] {
            check_prefix(
                bad,
                Err("a token has a character other than A-Z a-z 0-9 _ -"),
            );
        }
    }

    #[test]
    fn subjects_and_names() {
        let prefix = Prefix::default();
        let p = Partitions::new(16).expect("16 is a valid count");
        let p7 = p.id(7).expect("7 < 16");
        let topic = Topic::new("orders.payments").expect("a valid topic");
        assert_eq!(prefix.req(p7), "amends.req.7");
        assert_eq!(prefix.dec(p7), "amends.dec.7");
        assert_eq!(prefix.dlq(p7), "amends.dlq.7");
        assert_eq!(prefix.apology(&topic), "amends.apology.orders.payments");
        let names: Vec<_> = Stream::ALL.iter().map(|s| prefix.stream_name(*s)).collect();
        assert_eq!(
            names,
            ["AMENDS_REQ", "AMENDS_DEC", "AMENDS_APOLOGY", "AMENDS_DLQ"]
        );
        assert_eq!(prefix.owner(p7), "amends.owner.7");
        let subjects: Vec<_> = Stream::ALL
            .iter()
            .map(|s| prefix.stream_subjects(*s))
            .collect();
        assert_eq!(
            subjects,
            [
                vec!["amends.req.*"],
                vec!["amends.dec.*", "amends.owner.*"],
                vec!["amends.apology.>"],
                vec!["amends.dlq.*"]
            ]
        );
        assert_eq!(prefix.meta_bucket(), "AMENDS_META");
    }

    #[test]
    fn topology_validation() {
        let mut topology = Topology::new(Partitions::new(1).expect("valid"));
        assert!(topology.validate().is_ok());
        for (replicas, ok) in [(0, false), (1, true), (3, true), (5, true), (6, false)] {
            topology.replicas = replicas;
            assert_eq!(topology.validate().is_ok(), ok, "replicas {replicas}");
        }
        topology.replicas = 1;
        topology.duplicate_window = Duration::ZERO;
        assert!(topology.validate().is_err());
        topology.duplicate_window = Duration::MAX;
        assert!(topology.validate().is_err());
    }
}
