//! The deployment lease: one `amends serve` process serves a deployment's
//! partitions at a time; others wait as standbys.
//!
//! The lease is the key `serve` in the key-value bucket `<PREFIX>_LEASE`,
//! whose `max_age` is the lease's time to live: the holder creates the key
//! (which fails while it exists) and renews it by revision every third of
//! the TTL; a holder that dies, pauses or is cut off stops renewing, the
//! key ages out, and a standby's create succeeds. The value names the
//! holder (host, pid, data directory), so a standby can say who serves.
//!
//! A lease is never the only guard: a paused holder still believes it
//! holds it when it resumes. The decision writes are fenced at the server
//! ([`crate::worker`]), so such a holder's writes are refused. The lease
//! keeps two processes from fencing each other in turns: a worker is
//! (re)started only while [`Guard::is_valid`] (the last renewal is younger
//! than the TTL less a margin, by the monotonic clock, which goes on
//! during a pause), and a holder that cannot renew ends ([`Lease::keep`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};

use crate::Error;
use crate::topology::{Prefix, Topology};

/// The default time to live of the lease: how long a standby waits after
/// the holder stopped renewing. Shorter fails over sooner; longer rides
/// out longer stalls of the holder without a takeover.
pub const TTL_DEFAULT: Duration = Duration::from_secs(10);

/// The shortest lease TTL accepted: renewals every third of it must
/// outpace a busy server's latency.
pub const TTL_MIN: Duration = Duration::from_millis(600);

/// The key of the lease in its bucket.
const KEY: &str = "serve";

/// Says whether this process holds a valid lease now; cheap to clone and
/// to ask.
#[derive(Clone, Debug)]
pub struct Guard {
    origin: Instant,
    /// Milliseconds since `origin` until which the lease is valid.
    valid_until_ms: Arc<AtomicU64>,
}

impl Guard {
    /// A guard that is always valid: for a driver that runs without a
    /// lease (tests, embedded use); the fence still guards every write.
    pub fn always() -> Guard {
        Guard {
            origin: Instant::now(),
            valid_until_ms: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Whether the last renewal is recent enough that no other instance
    /// can hold the lease yet.
    pub fn is_valid(&self) -> bool {
        self.now_ms() < self.valid_until_ms.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records a renewal sent at `sent` (before its answer came).
    fn renewed(&self, sent: Instant, ttl: Duration) {
        // A fifth of the TTL is left for clock rate differences and the
        // bucket's own expiry timer.
        let until = sent
            .saturating_duration_since(self.origin)
            .saturating_add(ttl.saturating_sub(ttl / 5));
        let until = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.valid_until_ms.store(until, Ordering::Release);
    }

    fn expire(&self) {
        self.valid_until_ms.store(0, Ordering::Release);
    }
}

/// A held lease.
pub struct Lease {
    kv: kv::Store,
    bucket: String,
    holder: String,
    revision: u64,
    ttl: Duration,
    guard: Guard,
}

impl Lease {
    /// Takes the deployment lease, waiting as a standby while another
    /// instance holds it; `waiting` is called with the holder's record
    /// each time it changes. `holder` is this instance's record (JSON).
    pub async fn acquire(
        js: &jetstream::Context,
        topology: &Topology,
        ttl: Duration,
        holder: String,
        mut waiting: impl FnMut(&str),
    ) -> Result<Lease, Error> {
        if ttl < TTL_MIN {
            return Err(Error::LeaseTtlTooShort { ttl, min: TTL_MIN });
        }
        let bucket = bucket_name(&topology.prefix);
        let kv = open_bucket(js, topology, &bucket, ttl).await?;
        let guard = Guard {
            origin: Instant::now(),
            valid_until_ms: Arc::new(AtomicU64::new(0)),
        };
        let mut last_seen = String::new();
        loop {
            let sent = Instant::now();
            match kv.create(KEY, holder.clone().into()).await {
                Ok(revision) => {
                    guard.renewed(sent, ttl);
                    return Ok(Lease {
                        kv,
                        bucket,
                        holder,
                        revision,
                        ttl,
                        guard,
                    });
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let now = current_holder(&kv).await;
                    if now != last_seen {
                        waiting(&now);
                        last_seen = now;
                    }
                }
                Err(e) => {
                    tracing::warn!(%bucket, error = %e, "could not take the lease; trying again");
                }
            }
            tokio::time::sleep(ttl / 4).await;
        }
    }

    /// The guard the workers ask before they start.
    pub fn guard(&self) -> Guard {
        self.guard.clone()
    }

    /// The bucket of the lease.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Renews the lease every third of its TTL until a renewal is refused
    /// (another instance took it) or none succeeded for longer than the
    /// guard allows; returns why. The caller must stop serving then.
    pub async fn keep(mut self) -> Error {
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            let sent = Instant::now();
            match self
                .kv
                .update(KEY, self.holder.clone().into(), self.revision)
                .await
            {
                // Renewed on this holder's own revision: nobody held the
                // key in between, however late this is (after a pause), so
                // no other instance can have claimed a partition.
                Ok(revision) => {
                    self.revision = revision;
                    self.guard.renewed(sent, self.ttl);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    self.guard.expire();
                    return Error::LeaseLost {
                        detail: "another instance took it".to_owned(),
                        holder: current_holder(&self.kv).await,
                    };
                }
                Err(e) => {
                    tracing::warn!(bucket = %self.bucket, error = %e, "lease renewal failed; trying again");
                    if !self.guard.is_valid() {
                        return Error::LeaseLost {
                            detail: format!("no renewal succeeded in time: {e}"),
                            holder: current_holder(&self.kv).await,
                        };
                    }
                }
            }
        }
    }
}

/// Opens the lease bucket, creating it if missing. An existing bucket
/// keeps its own TTL (its `max_age`); a different one asked for is logged.
async fn open_bucket(
    js: &jetstream::Context,
    topology: &Topology,
    bucket: &str,
    ttl: Duration,
) -> Result<kv::Store, Error> {
    let fail = |action: &'static str| {
        move |e: crate::Source| Error::LeaseBucket {
            bucket: bucket.to_owned(),
            action,
            source: e,
        }
    };
    if let Ok(kv) = js.get_key_value(bucket).await {
        let found = kv
            .status()
            .await
            .map_err(|e| fail("read status")(Box::new(e)))?
            .info
            .config
            .max_age;
        if found != ttl {
            tracing::warn!(%bucket, ?found, asked = ?ttl, "the lease bucket exists with another TTL; its own is used");
        }
        return Ok(kv);
    }
    js.create_key_value(kv::Config {
        bucket: bucket.to_owned(),
        description: "amends: which serve process holds the deployment".to_owned(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        num_replicas: topology.replicas,
        ..kv::Config::default()
    })
    .await
    .map_err(|e| fail("create")(Box::new(e)))
}

/// The lease bucket of a deployment, e.g. `AMENDS_LEASE`.
pub fn bucket_name(prefix: &Prefix) -> String {
    let meta = prefix.meta_bucket();
    format!("{}_LEASE", meta.strip_suffix("_META").unwrap_or(&meta))
}

/// The recorded holder, as text.
async fn current_holder(kv: &kv::Store) -> String {
    match kv.get(KEY).await {
        Ok(Some(value)) => String::from_utf8_lossy(&value).into_owned(),
        Ok(None) => "nobody".to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}
