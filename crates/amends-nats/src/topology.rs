//! The JetStream topology of a deployment: its streams, and the partition
//! count.
//!
//! The names (the subject [`Prefix`], every subject, stream and bucket name
//! built from it, the [`header`] names, [`PARTITIONS_KEY`]) are the
//! protocol's, defined once in [`amends_core::protocol`] (which tabulates
//! the streams and subjects) and re-exported here; the client uses the same
//! ones. This module creates and checks what they name.
//!
//! Two prefixes that differ only in the characters replaced by `_` in
//! stream names (`a-b` and `a.b`) map to the same stream names, so they
//! cannot share a NATS account: the second deployment is refused by
//! [`ensure`] (the subjects differ), not mixed in.
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

use std::time::Duration;

use amends_core::protocol;
use amends_core::route::{PartitionId, Partitions};
use async_nats::jetstream::{self, kv, stream};

use crate::error::{Error, Source};

pub use amends_core::protocol::{
    PARTITIONS_KEY, PREFIX_BYTES_MAX, PREFIX_DEFAULT, Prefix, Stream, header,
};

/// The default duplicate window of every stream: JetStream's own default.
pub const DUPLICATE_WINDOW_DEFAULT: Duration = Duration::from_secs(120);

/// The most replicas a JetStream stream may have.
pub const REPLICAS_MAX: usize = 5;

/// What a stream holds, for its description.
fn stream_what(stream: Stream) -> &'static str {
    match stream {
        Stream::Requests => "requests (the log of record)",
        Stream::Decisions => "decisions and hold-expired events",
        Stream::Apologies => "apologies",
        Stream::DeadLetters => "dead letters",
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
            description: Some(format!("{}: {}", self.prefix, stream_what(stream))),
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

/// The count recorded in `bucket`, read by the protocol's one rule
/// ([`protocol::parse_partitions`]).
fn parse_partitions(bucket: &str, bytes: &[u8]) -> Result<u32, Error> {
    protocol::parse_partitions(bytes)
        .map(Partitions::get)
        .map_err(|e| Error::CorruptMeta {
            bucket: bucket.to_owned(),
            key: PARTITIONS_KEY,
            value: e.value,
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
        .create(
            PARTITIONS_KEY,
            protocol::partitions_value(topology.partitions).into(),
        )
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

/// The last message of stream `stream` on `subject`: none if the stream
/// holds none there.
pub async fn last_on_subject(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Option<jetstream::message::StreamMessage>, Source> {
    let stream = js.get_stream_no_info(stream).await?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(Some(message)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(Box::new(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
