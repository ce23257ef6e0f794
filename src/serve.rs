//! `amends serve`: runs every partition of a deployment in this process.

use std::path::PathBuf;
use std::time::Duration;

use amends_core::partition::Config;
use amends_core::route::Partitions;
use amends_nats::service::{self, Service};
use amends_nats::topology::{self, PARTITIONS_KEY, Prefix, Topology};
use amends_nats::worker;
use amends_store::{Durability, Store};
use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Args, ValueEnum};

use crate::nats::NatsArgs;

/// The flags of `amends serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The directory of this process's store (created if missing). One
    /// process per directory.
    #[arg(long, env = "AMENDS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The partition count. Required on the first start of a deployment
    /// (it is then recorded in NATS and fixed); later it may be left out,
    /// and if given must match.
    #[arg(long, short = 'n', env = "AMENDS_PARTITIONS")]
    pub partitions: Option<u32>,
    /// The subject prefix of the deployment.
    #[arg(long, env = "AMENDS_PREFIX", default_value = topology::PREFIX_DEFAULT)]
    pub prefix: String,
    /// The most messages per fetch, hence per store commit.
    #[arg(long, env = "AMENDS_BATCH_MAX", default_value_t = worker::BATCH_LEN_MAX_DEFAULT)]
    pub batch_max: usize,
    /// When a store commit is durable: `fsync` before anything is
    /// published or acknowledged, or `deferred` (flushed every
    /// --flush-every-ms; only with a synced log, see amends_store::Durability).
    #[arg(long, env = "AMENDS_DURABILITY", value_enum, default_value_t = DurabilityArg::Fsync)]
    pub durability: DurabilityArg,
    /// The background flush interval of `--durability deferred`.
    #[arg(long, env = "AMENDS_FLUSH_EVERY_MS", default_value_t = 100)]
    pub flush_every_ms: u64,
    /// The streams' duplicate window, in milliseconds; must match existing
    /// streams.
    #[arg(long, env = "AMENDS_DUPLICATE_WINDOW_MS", default_value_t = 120_000)]
    pub duplicate_window_ms: u64,
    /// The streams' replica count; must match existing streams.
    #[arg(long, env = "AMENDS_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
}

/// `--durability`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurabilityArg {
    /// fsync every commit (the default).
    Fsync,
    /// Flush in the background.
    Deferred,
}

/// Runs the service until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    tokio::select! {
        result = serve(&args) => result,
        signal = shutdown_signal() => {
            let signal = signal?;
            tracing::info!(signal, "stopping");
            Ok(())
        }
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let prefix = Prefix::new(args.prefix.clone())
        .with_context(|| format!("invalid --prefix {:?}", args.prefix))?;
    anyhow::ensure!(args.batch_max > 0, "--batch-max must be at least 1");
    let client = args.nats.connect("amends serve").await?;
    tracing::info!(servers = ?args.nats.urls, "connected to NATS");
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client);

    let recorded = recorded_partitions(&js, &prefix).await?;
    let count = match (args.partitions, recorded) {
        (Some(given), Some(recorded)) if given != recorded => anyhow::bail!(
            "--partitions {given} differs from the deployment's recorded count {recorded} (bucket {}); the count is fixed at creation",
            prefix.meta_bucket()
        ),
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => anyhow::bail!(
            "--partitions (or AMENDS_PARTITIONS) is required on the first start of a deployment: no count is recorded in bucket {}",
            prefix.meta_bucket()
        ),
    };
    let partitions =
        Partitions::new(count).with_context(|| format!("invalid partition count {count}"))?;

    let mut topo = Topology::new(partitions);
    topo.prefix = prefix;
    topo.duplicate_window = Duration::from_millis(args.duplicate_window_ms);
    topo.replicas = args.replicas;
    let report = topology::ensure(&js, &topo)
        .await
        .context("creating or checking the JetStream streams")?;
    for s in &report.streams {
        tracing::info!(stream = %s.name, action = ?s.action, "stream");
    }

    let durability = match args.durability {
        DurabilityArg::Fsync => Durability::Fsync,
        DurabilityArg::Deferred => Durability::Deferred {
            flush_every_ms: args.flush_every_ms,
        },
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let mut store_options = amends_store::Options::new(partitions);
    store_options.durability = durability;
    let store = Store::open(&args.data_dir, store_options)
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;

    let options = service::Options {
        worker: worker::Options {
            batch_len_max: args.batch_max,
            ..worker::Options::default()
        },
        ..service::Options::default()
    };
    let service = Service::new(&js, &topo, &store, Config::default(), options)
        .context("starting the service")?;
    tracing::info!(
        partitions = count,
        prefix = topo.prefix.as_str(),
        data_dir = %args.data_dir.display(),
        durability = ?args.durability,
        "serving"
    );
    let result = service.run().await;
    // Flush what a deferred store holds before reporting.
    let _ = store.flush();
    match result {
        Ok(never) => match never {},
        Err(e) => Err(e).context("the service stopped"),
    }
}

/// The partition count recorded in the deployment's meta bucket, if any.
async fn recorded_partitions(
    js: &jetstream::Context,
    prefix: &Prefix,
) -> anyhow::Result<Option<u32>> {
    let bucket = prefix.meta_bucket();
    let kv = match js.get_key_value(&bucket).await {
        Ok(kv) => kv,
        Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            // Absent (or unreachable: ensure reports that clearly).
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("opening bucket {bucket}")),
    };
    let value = kv
        .get(PARTITIONS_KEY)
        .await
        .with_context(|| format!("reading {PARTITIONS_KEY} in bucket {bucket}"))?;
    value
        .map(|bytes| {
            std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.parse::<u32>().ok())
                .with_context(|| format!("bucket {bucket}: {PARTITIONS_KEY} is not a number"))
        })
        .transpose()
}

/// Waits for Ctrl-C or SIGTERM; returns its name.
pub(crate) async fn shutdown_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("waiting for Ctrl-C"),
            _ = term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}
