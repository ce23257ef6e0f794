//! `amends serve`: runs every partition of a deployment in this process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use amends_core::partition::Config;
use amends_core::route::Partitions;
use amends_nats::lease::Lease;
use amends_nats::service::{self, Service};
use amends_nats::topology::{self, PARTITIONS_KEY, Prefix, Topology};
use amends_nats::worker;
use amends_store::{Durability, Store};
use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::nats::NatsArgs;

/// The flags of `amends serve`.
///
/// Every setting but `--config` may also come from the configuration file:
/// a flag beats its environment variable, which beats the file, which beats
/// the default (see [`ServeArgs::resolve`] and `examples/amends.toml`).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A TOML configuration file (see examples/amends.toml). Unknown keys
    /// are an error; relative paths in it are relative to its directory.
    #[arg(long, env = "AMENDS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The directory of this process's store (created if missing). One
    /// process per directory. Required (here or in the file).
    #[arg(long, env = "AMENDS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The partition count. Required on the first start of a deployment
    /// (it is then recorded in NATS and fixed); later it may be left out,
    /// and if given must match.
    #[arg(long, short = 'n', env = "AMENDS_PARTITIONS")]
    pub partitions: Option<u32>,
    /// The subject prefix of the deployment [default: amends].
    #[arg(long, env = "AMENDS_PREFIX")]
    pub prefix: Option<String>,
    /// The most messages per fetch, hence per store commit [default: 256].
    #[arg(long, env = "AMENDS_BATCH_MAX")]
    pub batch_max: Option<usize>,
    /// When a store commit is durable: `fsync` before anything is
    /// published or acknowledged, or `deferred` (flushed every
    /// --flush-every-ms; only with a synced log, see
    /// amends_store::Durability) [default: fsync].
    #[arg(long, env = "AMENDS_DURABILITY", value_enum)]
    pub durability: Option<DurabilityArg>,
    /// The background flush interval of `--durability deferred`
    /// [default: 100].
    #[arg(long, env = "AMENDS_FLUSH_EVERY_MS")]
    pub flush_every_ms: Option<u64>,
    /// The streams' duplicate window, in milliseconds; must match existing
    /// streams [default: 120000].
    #[arg(long, env = "AMENDS_DUPLICATE_WINDOW_MS")]
    pub duplicate_window_ms: Option<u64>,
    /// The streams' replica count; must match existing streams
    /// [default: 1].
    #[arg(long, env = "AMENDS_REPLICAS")]
    pub replicas: Option<usize>,
    /// Serve Prometheus metrics over HTTP on this address (e.g.
    /// 127.0.0.1:9464, path /metrics); off when unset.
    #[arg(long, env = "AMENDS_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Serve the device page (/) and the operator console (/console) over
    /// HTTP on this address (e.g. 127.0.0.1:7480); off when unset. Neither
    /// authenticates anyone: see docs/web.md.
    #[arg(long, env = "AMENDS_HTTP")]
    pub http: Option<std::net::SocketAddr>,
    /// The deployment lease's time to live, in milliseconds: one serve
    /// process holds the lease and serves every partition; another one
    /// started beside it waits as a standby and takes over this long after
    /// the holder stopped renewing (it died, paused or lost NATS). Set on
    /// the first start (the bucket keeps it) [default: 10000].
    #[arg(long, env = "AMENDS_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
}

/// The default of `--flush-every-ms`.
pub const FLUSH_EVERY_MS_DEFAULT: u64 = 100;
/// The default of `--duplicate-window-ms`: two minutes, JetStream's own.
pub const DUPLICATE_WINDOW_MS_DEFAULT: u64 = 120_000;
/// The default of `--lease-ttl-ms`.
pub const LEASE_TTL_MS_DEFAULT: u64 = 10_000;
/// The default of `--replicas`.
pub const REPLICAS_DEFAULT: usize = 1;

/// The configuration file: every setting of [`ServeArgs`] but `config`,
/// by the same names in snake_case, NATS ones in a `[nats]` table.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// As `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// As `--partitions`.
    pub partitions: Option<u32>,
    /// As `--prefix`.
    pub prefix: Option<String>,
    /// As `--batch-max`.
    pub batch_max: Option<usize>,
    /// As `--durability`: `"fsync"` or `"deferred"`.
    pub durability: Option<DurabilityArg>,
    /// As `--flush-every-ms`.
    pub flush_every_ms: Option<u64>,
    /// As `--duplicate-window-ms`.
    pub duplicate_window_ms: Option<u64>,
    /// As `--replicas`.
    pub replicas: Option<usize>,
    /// As `--metrics-addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// As `--http`.
    pub http: Option<std::net::SocketAddr>,
    /// As `--lease-ttl-ms`.
    pub lease_ttl_ms: Option<u64>,
    /// The `[nats]` table.
    #[serde(default)]
    pub nats: FileNats,
}

/// The `[nats]` table of the configuration file.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileNats {
    /// As `--nats-url` (a list).
    pub urls: Option<Vec<String>>,
    /// As `--nats-user`.
    pub user: Option<String>,
    /// As `--nats-password`.
    pub password: Option<String>,
    /// As `--nats-token`.
    pub token: Option<String>,
    /// As `--nats-creds`.
    pub creds: Option<PathBuf>,
    /// The `[nats.tls]` table.
    #[serde(default)]
    pub tls: FileTls,
}

/// The `[nats.tls]` table of the configuration file.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// As `--nats-tls-ca`.
    pub ca_file: Option<PathBuf>,
    /// As `--nats-tls-cert` (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// As `--nats-tls-key` (with `cert_file`).
    pub key_file: Option<PathBuf>,
    /// As `--nats-tls-required`.
    #[serde(default)]
    pub required: bool,
}

impl FileConfig {
    /// Reads and parses `path`; relative paths in it become relative to
    /// its directory. An unknown key is an error that names it.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        let mut config: FileConfig = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let tls = &mut config.nats.tls;
        for relative in [
            &mut config.data_dir,
            &mut config.nats.creds,
            &mut tls.ca_file,
            &mut tls.cert_file,
            &mut tls.key_file,
        ]
        .into_iter()
        .flatten()
        {
            if relative.is_relative() {
                *relative = base.join(&*relative);
            }
        }
        Ok(config)
    }
}

/// `amends serve`'s settings once flags, environment, file and defaults
/// are merged.
#[derive(Debug)]
pub struct Settings {
    /// How to reach NATS.
    pub nats: NatsArgs,
    /// See [`ServeArgs::data_dir`].
    pub data_dir: PathBuf,
    /// See [`ServeArgs::partitions`].
    pub partitions: Option<u32>,
    /// See [`ServeArgs::prefix`].
    pub prefix: String,
    /// See [`ServeArgs::batch_max`].
    pub batch_max: usize,
    /// See [`ServeArgs::durability`].
    pub durability: DurabilityArg,
    /// See [`ServeArgs::flush_every_ms`].
    pub flush_every_ms: u64,
    /// See [`ServeArgs::duplicate_window_ms`].
    pub duplicate_window_ms: u64,
    /// See [`ServeArgs::replicas`].
    pub replicas: usize,
    /// See [`ServeArgs::metrics_addr`].
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// See [`ServeArgs::http`].
    pub http: Option<std::net::SocketAddr>,
    /// See [`ServeArgs::lease_ttl_ms`].
    pub lease_ttl_ms: u64,
}

impl ServeArgs {
    /// Merges the flags (clap already put each flag before its
    /// environment variable) over the file named by `config`, over the
    /// defaults. NATS authentication is taken whole from one place: the
    /// flags if any of them is set, else the file.
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut nats = self.nats;
        if nats.urls.is_empty() {
            nats.urls = file.nats.urls.unwrap_or_default();
        }
        let auth_given = nats.nats_user.is_some()
            || nats.nats_password.is_some()
            || nats.nats_token.is_some()
            || nats.nats_creds.is_some();
        if !auth_given {
            nats.nats_user = file.nats.user;
            nats.nats_password = file.nats.password;
            nats.nats_token = file.nats.token;
            nats.nats_creds = file.nats.creds;
        }
        // TLS too is taken whole from the flags if any is set.
        if !nats.tls.is_set() {
            let tls = file.nats.tls;
            anyhow::ensure!(
                tls.cert_file.is_some() == tls.key_file.is_some(),
                "[nats.tls] in the config file needs both cert_file and key_file, or neither"
            );
            nats.tls = crate::nats::TlsArgs {
                ca_file: tls.ca_file,
                cert_file: tls.cert_file,
                key_file: tls.key_file,
                required: tls.required,
            };
        }
        let data_dir = self.data_dir.or(file.data_dir).context(
            "--data-dir (or AMENDS_DATA_DIR, or data_dir in the config file) is required",
        )?;
        Ok(Settings {
            nats,
            data_dir,
            partitions: self.partitions.or(file.partitions),
            prefix: self
                .prefix
                .or(file.prefix)
                .unwrap_or_else(|| topology::PREFIX_DEFAULT.to_owned()),
            batch_max: self
                .batch_max
                .or(file.batch_max)
                .unwrap_or(worker::BATCH_LEN_MAX_DEFAULT),
            durability: self
                .durability
                .or(file.durability)
                .unwrap_or(DurabilityArg::Fsync),
            flush_every_ms: self
                .flush_every_ms
                .or(file.flush_every_ms)
                .unwrap_or(FLUSH_EVERY_MS_DEFAULT),
            duplicate_window_ms: self
                .duplicate_window_ms
                .or(file.duplicate_window_ms)
                .unwrap_or(DUPLICATE_WINDOW_MS_DEFAULT),
            replicas: self.replicas.or(file.replicas).unwrap_or(REPLICAS_DEFAULT),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            http: self.http.or(file.http),
            lease_ttl_ms: self
                .lease_ttl_ms
                .or(file.lease_ttl_ms)
                .unwrap_or(LEASE_TTL_MS_DEFAULT),
        })
    }
}

/// `--durability`.
#[derive(ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityArg {
    /// fsync every commit (the default).
    Fsync,
    /// Flush in the background.
    Deferred,
}

/// Runs the service until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let args = args.resolve()?;
    tokio::select! {
        result = serve(&args) => result,
        signal = shutdown_signal() => {
            let signal = signal?;
            tracing::info!(signal, "stopping");
            Ok(())
        }
    }
}

/// Runs the service until it fails, without listening for signals: for a
/// caller that handles them itself (`amends dev`).
pub async fn run_in_process(args: ServeArgs) -> anyhow::Result<()> {
    serve(&args.resolve()?).await
}

async fn serve(args: &Settings) -> anyhow::Result<()> {
    let prefix = Prefix::new(args.prefix.clone())
        .with_context(|| format!("invalid --prefix {:?}", args.prefix))?;
    anyhow::ensure!(args.batch_max > 0, "--batch-max must be at least 1");
    let mut health = None;
    if let Some(addr) = args.metrics_addr {
        health = Some(crate::metrics::install(addr).await?);
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    }
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
    if let Some(addr) = args.http {
        // Served from here on, a standby too: the pages only publish to
        // the log and read streams and endpoints, whoever serves them.
        let bound = serve_pages(addr, args, &topo, &js).await?;
        tracing::info!(device = %format!("http://{bound}/"), console = %format!("http://{bound}/console"), "serving the pages");
    }

    let phase = |why| {
        if let Some(h) = &health {
            h.starting(why);
        }
    };
    phase("waiting for the deployment lease (standby while another instance serves)");
    // One process serves the deployment; this one waits while another does.
    let holder = serde_json::json!({
        "host": worker::hostname(),
        "pid": std::process::id(),
        "data_dir": args.data_dir.display().to_string(),
    })
    .to_string();
    let lease = Lease::acquire(
        &js,
        &topo,
        Duration::from_millis(args.lease_ttl_ms),
        holder,
        |holder| tracing::warn!(%holder, "standby: another instance serves this deployment; waiting for its lease to lapse"),
    )
    .await
    .context("taking the deployment lease")?;
    tracing::info!(bucket = lease.bucket(), "holding the deployment lease");

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
        .context("starting the service")?
        .with_guard(lease.guard());
    if let Some(h) = &health {
        h.serving(service.status());
    }
    tracing::info!(
        partitions = count,
        prefix = topo.prefix.as_str(),
        data_dir = %args.data_dir.display(),
        durability = ?args.durability,
        "serving"
    );
    let result = tokio::select! {
        result = service.run() => result.map_err(anyhow::Error::from).context("the service stopped"),
        lost = lease.keep() => {
            tracing::error!(error = %lost, "lost the deployment lease; exiting so that this process can start again as a standby");
            Err(anyhow::Error::from(lost))
        }
    };
    // Flush what a deferred store holds before reporting.
    let _ = store.flush();
    match result {
        Ok(never) => match never {},
        Err(e) => Err(e),
    }
}

/// Starts the device page and the console on `addr` (`--http`); the
/// address bound.
pub(crate) async fn serve_pages(
    addr: std::net::SocketAddr,
    args: &Settings,
    topo: &Topology,
    js: &jetstream::Context,
) -> anyhow::Result<std::net::SocketAddr> {
    let deployment = crate::nats::DeploymentArgs {
        nats: args.nats.clone(),
        partitions: Some(topo.partitions.get()),
        prefix: topo.prefix.as_str().to_owned(),
    };
    let client = deployment.connect("amends serve (pages)").await?;
    crate::web::start(addr, client, js.clone(), topo.prefix.clone()).await
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
            amends_core::protocol::parse_partitions(&bytes)
                .map(Partitions::get)
                .with_context(|| format!("bucket {bucket}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(config: Option<PathBuf>) -> ServeArgs {
        ServeArgs {
            config,
            nats: NatsArgs::default(),
            data_dir: None,
            partitions: None,
            prefix: None,
            batch_max: None,
            durability: None,
            flush_every_ms: None,
            duplicate_window_ms: None,
            replicas: None,
            metrics_addr: None,
            http: None,
            lease_ttl_ms: None,
        }
    }

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/amends.toml")
    }

    #[test]
    fn the_example_file_loads_and_sets_every_setting() {
        // Proves examples/amends.toml is valid (no unknown key) and that each of its settings reaches the resolved settings, relative paths joined to the file's directory.
        let settings = args(Some(example())).resolve().expect("the example loads");
        let dir = example().parent().expect("a directory").to_path_buf();
        assert_eq!(settings.data_dir, dir.join("amends-data"));
        assert_eq!(settings.partitions, Some(16));
        assert_eq!(settings.prefix, "amends");
        assert_eq!(settings.batch_max, 256);
        assert_eq!(settings.durability, DurabilityArg::Fsync);
        assert_eq!(settings.flush_every_ms, 100);
        assert_eq!(settings.duplicate_window_ms, 120_000);
        assert_eq!(settings.replicas, 1);
        assert_eq!(
            settings.metrics_addr,
            Some("127.0.0.1:9464".parse().expect("an address"))
        );
        assert_eq!(settings.nats.urls, ["nats://127.0.0.1:4222"]);
    }

    #[test]
    fn flags_beat_the_file_which_beats_the_defaults() {
        // Proves the precedence below the environment (clap merges flag over env): a flag overrides the file, the file a default, and an unset one falls back to the default.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "data_dir = \"/srv/a\"\nprefix = \"file\"\nbatch_max = 7\n[nats]\nurls = [\"nats://file:1\"]\ntoken = \"t\"\n",
        )
        .expect("write");
        let mut flags = args(Some(path));
        flags.prefix = Some("flag".to_owned());
        flags.nats.nats_user = Some("u".to_owned());
        flags.nats.nats_password = Some("p".to_owned());
        let settings = flags.resolve().expect("resolves");
        assert_eq!(settings.prefix, "flag");
        assert_eq!(settings.batch_max, 7);
        assert_eq!(settings.data_dir, PathBuf::from("/srv/a"));
        assert_eq!(settings.replicas, REPLICAS_DEFAULT);
        assert_eq!(settings.nats.urls, ["nats://file:1"]);
        assert_eq!(
            settings.nats.nats_token, None,
            "auth comes whole from the flags"
        );
        assert_eq!(settings.nats.nats_user.as_deref(), Some("u"));
    }

    #[test]
    fn unknown_keys_and_a_missing_data_dir_are_clear_errors() {
        // Proves an unknown key, top level or in [nats], fails naming the key and the file, and that no data dir anywhere is an error naming every way to give one.
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, key) in [
            ("data_dir = \"d\"\nbogus_key = 1\n", "bogus_key"),
            ("data_dir = \"d\"\n[nats]\nurl = \"nats://x\"\n", "url"),
        ] {
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, text).expect("write");
            let e = format!(
                "{:#}",
                args(Some(path.clone())).resolve().expect_err("refused")
            );
            assert!(e.contains(&format!("unknown field `{key}`")), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        let e = format!("{:#}", args(None).resolve().expect_err("refused"));
        assert!(e.contains("--data-dir") && e.contains("config file"), "{e}");
    }

    #[test]
    fn tls_comes_whole_from_the_flags_or_the_file_with_paths_relative_to_it() {
        // Proves the [nats.tls] table: its paths are joined to the file's directory, a cert without a key is refused naming both keys, an unknown key in it is refused, and any TLS flag replaces the file's TLS settings whole.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        let write = |tls: &str| {
            std::fs::write(&path, format!("data_dir = \"d\"\n[nats.tls]\n{tls}")).expect("write");
        };
        write(
            "ca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"/abs/k.pem\"\nrequired = true\n",
        );
        let tls = args(Some(path.clone()))
            .resolve()
            .expect("resolves")
            .nats
            .tls;
        assert_eq!(tls.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(tls.cert_file, Some(dir.path().join("c.pem")));
        assert_eq!(tls.key_file, Some(PathBuf::from("/abs/k.pem")));
        assert!(tls.required);

        let mut flags = args(Some(path.clone()));
        flags.nats.tls.ca_file = Some(PathBuf::from("/flag/ca.pem"));
        let tls = flags.resolve().expect("resolves").nats.tls;
        assert_eq!(tls.ca_file, Some(PathBuf::from("/flag/ca.pem")));
        assert_eq!(
            (tls.cert_file, tls.key_file, tls.required),
            (None, None, false)
        );

        write("cert_file = \"c.pem\"\n");
        let e = format!(
            "{:#}",
            args(Some(path.clone())).resolve().expect_err("refused")
        );
        assert!(e.contains("cert_file and key_file"), "{e}");
        write("ca = \"ca.pem\"\n");
        let e = format!(
            "{:#}",
            args(Some(path.clone())).resolve().expect_err("refused")
        );
        assert!(e.contains("unknown field `ca`"), "{e}");
    }
}
