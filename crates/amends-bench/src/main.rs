//! `amends-bench`: amends side by side with the transport ceiling and
//! PostgreSQL, in one run, on one machine and one NATS server.
//!
//! A binary of its own, so that the production binary (`amends`) links no
//! PostgreSQL client and its tests need no PostgreSQL. The bench starts its
//! own nats-server (the pinned one, as `amends dev` does, through
//! `amends-local-nats`) and drives, one after the other, with the same
//! seeded workload and the same concurrency:
//!
//! 1. the transport ceiling ([`ceiling`]): the wire work of amends with no
//!    checking and no store;
//! 2. PostgreSQL ([`postgres`]): the same constraints in transactions,
//!    through a pool, against `--postgres-url` or a private server;
//! 3. amends ([`amends`]): `amends serve` as a child process with fsync
//!    commits (the `amends` binary beside this one, or `--amends PATH`),
//!    through amends-client, its resident memory sampled.
//!
//! Then it prints one table ([`report`]) and, with `--json`, writes it.
//! Each system's CPU time per answered operation ([`cpu`]: its server
//! processes, and the bench process) is in the table beside its
//! throughput. With `--repeat N` the whole comparison runs N times, each
//! on a fresh nats-server, and a summary gives every figure's median and
//! range.
//!
//! # Layout
//!
//! - [`workload`]: the operations (mix, key distribution, seeded) and the
//!   driver (slots in flight, count and duration bounds, progress bar,
//!   latency histogram).
//! - [`ceiling`], [`postgres`], [`amends`]: the three systems.
//! - [`report`]: the table, the summary of several runs, and the JSON.
//! - [`cpu`]: CPU time of processes, from `/proc`.

pub mod amends;
pub mod ceiling;
pub mod cpu;
pub mod postgres;
pub mod report;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use amends_core::route::Partitions;
use amends_local_nats::{NatsServer, locate_server};
use anyhow::Context as _;
use clap::Parser;

use self::report::Row;
use self::workload::{Keys, Kind, Load, Mix, Spec};

/// Drives the transport ceiling (JetStream alone), PostgreSQL and amends
/// with one seeded workload on this machine, and prints their throughput,
/// latency and ratios side by side.
#[derive(Parser, Debug)]
#[command(name = "amends-bench", version)]
pub struct BenchArgs {
    /// The longest each system is driven (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = workload::parse_duration)]
    pub duration: Duration,
    /// The most operations submitted to each system.
    #[arg(long, default_value_t = 1_000_000)]
    pub count: u64,
    /// The mix of operations, as weights: `claim`, `debit`, `credit`,
    /// `debit-credit` (both) and `transfer`, e.g. `claim:1,debit-credit:2`.
    #[arg(long, default_value = "debit-credit:1")]
    pub mix: String,
    /// How accounts and claim keys are picked: `uniform`, `zipf:S`, or
    /// `hot:N[:PERCENT]` (PERCENT % of picks among the first N, default
    /// 100).
    #[arg(long, default_value = "uniform")]
    pub keys: String,
    /// How many accounts (opened and credited before the run).
    #[arg(long, default_value_t = 1000)]
    pub accounts: u64,
    /// How many distinct claim keys.
    #[arg(long, default_value_t = 1_000_000)]
    pub claim_keys: u64,
    /// Every account's balance before the run.
    #[arg(long, default_value_t = 1_000_000)]
    pub initial_balance: u64,
    /// Amounts are drawn in 1..=AMOUNT_MAX.
    #[arg(long, default_value_t = 100)]
    pub amount_max: u64,
    /// Connections to each system (NATS connections; PostgreSQL's pool is
    /// clients × in-flight).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Operations in flight per connection.
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Pace the run at this many operations per second in all (each slot
    /// on a fixed schedule), e.g. half the peak to read latency under
    /// moderate load; 0: as fast as answers come.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Partitions of amends and of the ceiling.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub partitions: u32,
    /// The seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Which systems to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "ceiling,postgres,amends")]
    pub systems: Vec<System>,
    /// A PostgreSQL to use (its tables `bench_*` are replaced); without
    /// it, a private one is started with initdb in a temporary directory.
    #[arg(long, env = "AMENDS_BENCH_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// Run the whole comparison this many times (each on a fresh
    /// nats-server and fresh stores) and print the median and range of
    /// every figure after the runs' own tables.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub repeat: u32,
    /// Also write the results as JSON to this file (with --repeat above 1:
    /// every run's, and the summary).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the run's data (NATS store, amends store, logs) in this
    /// directory instead of a temporary one.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The `amends` binary whose `serve` is measured; default: the one
    /// beside this executable (`target/release/amends` after `cargo build
    /// --release`).
    #[arg(long, value_name = "PATH")]
    pub amends: Option<PathBuf>,
}

/// One system of the comparison.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// The transport ceiling.
    Ceiling,
    /// PostgreSQL.
    Postgres,
    /// amends.
    Amends,
}

fn main() -> anyhow::Result<()> {
    let args = BenchArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the bench and prints its table.
async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let spec = Spec {
        mix: Mix::parse(&args.mix)?,
        keys: Keys::parse(&args.keys)?,
        accounts: args.accounts,
        claim_keys: args.claim_keys,
        amount_max: args.amount_max,
        seed: args.seed,
    };
    let load = Load {
        clients: args.clients.max(1),
        in_flight: args.in_flight.max(1),
        count: args.count,
        duration: args.duration,
        rate: (args.rate > 0.0).then_some(args.rate),
    };
    let concurrency = load.clients * load.in_flight;
    let partitions = Partitions::new(args.partitions)
        .with_context(|| format!("invalid --partitions {}", args.partitions))?;
    // Fail before anything starts when PostgreSQL or amends is needed and
    // missing.
    if args.systems.contains(&System::Postgres) && args.postgres_url.is_none() {
        postgres::locate_bin()?;
    }
    let amends_bin = if args.systems.contains(&System::Amends) {
        Some(amends::locate_binary(args.amends.as_deref())?)
    } else {
        None
    };

    let temp = tempfile::Builder::new()
        .prefix("amends-bench-")
        .tempdir()
        .context("making a temporary directory")?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let settings = serde_json::json!({
        "mix": args.mix,
        "keys": args.keys,
        "accounts": args.accounts,
        "claim_keys": args.claim_keys,
        "initial_balance": args.initial_balance,
        "amount_max": args.amount_max,
        "clients": load.clients,
        "in_flight": load.in_flight,
        "partitions": args.partitions,
        "count": load.count,
        "duration_s": load.duration.as_secs_f64(),
        "seed": args.seed,
        "rate": args.rate,
        "repeat": args.repeat,
        "postgres": if args.postgres_url.is_some() { "given" } else { "private" },
    });
    let repeat = args.repeat.max(1);
    let mut runs = Vec::new();
    let mut documents = Vec::new();
    for n in 1..=repeat {
        let run_dir = if repeat > 1 {
            dir.join(format!("run-{n}"))
        } else {
            dir.clone()
        };
        if repeat > 1 {
            println!("run {n} of {repeat}:");
        }
        let one = Setup {
            args: &args,
            spec: &spec,
            load,
            concurrency,
            partitions,
            amends_bin: amends_bin.as_deref(),
        };
        let measured = one.run(&run_dir).await?;
        println!(
            "{}",
            report::table(&measured.rows, measured.memory, &measured.notes)
        );
        documents.push(report::json(
            settings.clone(),
            &measured.rows,
            measured.memory,
            &measured.notes,
        ));
        runs.push(measured.rows);
    }
    if repeat > 1 {
        println!("{}", report::summary(&runs));
    }
    if let Some(path) = &args.json {
        let doc = if repeat > 1 {
            serde_json::json!({
                "settings": settings,
                "runs": documents,
                "summary": report::summary_json(&runs),
            })
        } else {
            documents.pop().unwrap_or_default()
        };
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// What one run of the comparison needs.
struct Setup<'a> {
    args: &'a BenchArgs,
    spec: &'a Spec,
    load: Load,
    concurrency: usize,
    partitions: Partitions,
    amends_bin: Option<&'a std::path::Path>,
}

/// What one run measured.
struct Measured {
    rows: Vec<Row>,
    /// amends serve's peak VmRSS during the run, VmRSS after, VmHWM (KiB).
    memory: Option<(u64, u64, u64)>,
    notes: Vec<String>,
}

impl Setup<'_> {
    /// One run of every system, on a nats-server of its own in `dir`.
    async fn run(&self, dir: &std::path::Path) -> anyhow::Result<Measured> {
        let (args, spec, load) = (self.args, self.spec, self.load);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let nats_dir = dir.join("nats-server");
        std::fs::create_dir_all(&nats_dir)?;
        let mut server = NatsServer::start(locate_server()?, &nats_dir)?;
        let url = server.url();
        eprintln!(
            "bench: nats-server pid {} at {url}; mix {}, keys {}, {} accounts, {} clients x {} in flight, {} partition(s), at most {} ops or {:?} per system, seed {}",
            server.pid(),
            args.mix,
            args.keys,
            args.accounts,
            load.clients,
            load.in_flight,
            args.partitions,
            load.count,
            load.duration,
            args.seed
        );
        if let Some(bin) = self.amends_bin {
            eprintln!("bench: amends serve from {}", bin.display());
        }

        let mut rows = Vec::new();
        let mut memory = None;
        let mut notes = Vec::new();
        for system in &args.systems {
            match system {
                System::Ceiling => {
                    let ceiling = Arc::new(
                        ceiling::Ceiling::start(&url, self.partitions, load.clients).await?,
                    );
                    let meter = cpu::Meter::start(&[server.pid()])?;
                    let stats =
                        workload::drive("ceiling", Arc::clone(&ceiling), spec, load).await?;
                    let cpu = meter.finish()?;
                    ceiling.check()?;
                    rows.push(Row {
                        system: "ceiling",
                        result: Ok(stats),
                        cpu: Some(cpu),
                    });
                }
                System::Postgres => {
                    let (stats, cpu, _private) =
                        run_postgres(args, spec, load, self.concurrency).await?;
                    rows.push(Row {
                        system: "PostgreSQL",
                        result: Ok(stats),
                        cpu,
                    });
                }
                System::Amends => {
                    if spec.mix.has(Kind::Transfer)
                        && let Err(e) = amends::request(workload::Op::Transfer {
                            from: 0,
                            to: 1,
                            amount: 1,
                        })
                    {
                        eprintln!("bench: amends skipped: {e:#}");
                        rows.push(Row {
                            system: "amends",
                            result: Err("this build of amends has no transfer command".to_owned()),
                            cpu: None,
                        });
                        continue;
                    }
                    let bin = self.amends_bin.context("no amends binary located")?;
                    let amends_dir = dir.join("amends");
                    std::fs::create_dir_all(&amends_dir)?;
                    let mut service =
                        amends::Service::start(bin, &url, &amends_dir, self.partitions)?;
                    let target =
                        Arc::new(amends::Amends::connect(&url, load.clients, &mut service).await?);
                    target
                        .open_accounts(args.accounts, args.initial_balance)
                        .await
                        .context("opening the accounts in amends")?;
                    let before = amends::log_lengths(&url).await?;
                    let sampler = amends::MemorySampler::start(service.pid());
                    let meter = cpu::Meter::start(&[server.pid(), service.pid()])?;
                    let serve_meter = cpu::Meter::start(&[service.pid()])?;
                    let stats = workload::drive("amends", Arc::clone(&target), spec, load).await?;
                    let cpu = meter.finish()?;
                    let serve_cpu = serve_meter.finish()?;
                    let after_run = amends::log_lengths(&url).await?;
                    let answered = workload::u64_f64(stats.confirmed + stats.refused).max(1.0);
                    notes.push(format!(
                        "amends log appends per answered operation: {:.2} on the requests stream, {:.2} on the decisions stream",
                        workload::u64_f64(after_run.0.saturating_sub(before.0)) / answered,
                        workload::u64_f64(after_run.1.saturating_sub(before.1)) / answered
                    ));
                    notes.push(format!(
                        "amends server CPU per 1,000 answered operations: {:.0} ms in amends serve, {:.0} ms in nats-server",
                        serve_cpu.server_per_1k(stats.confirmed + stats.refused),
                        (cpu.server_ms - serve_cpu.server_ms).max(0.0) * 1000.0 / answered
                    ));
                    let peak = sampler.finish();
                    let after = amends::memory_kib(service.pid());
                    service.check().with_context(|| {
                        format!("see {}", amends_dir.join("serve.log").display())
                    })?;
                    if let Some((rss, hwm)) = after {
                        memory = Some((peak.max(rss), rss, hwm));
                    }
                    drop(target);
                    service.stop();
                    rows.push(Row {
                        system: "amends",
                        result: Ok(stats),
                        cpu: Some(cpu),
                    });
                }
            }
        }
        server.stop();
        Ok(Measured {
            rows,
            memory,
            notes,
        })
    }
}

/// PostgreSQL's run; the private server (if one was started) is returned
/// so that it stops after the measurement, not during it.
async fn run_postgres(
    args: &BenchArgs,
    spec: &Spec,
    load: Load,
    concurrency: usize,
) -> anyhow::Result<(
    workload::Stats,
    Option<cpu::Cpu>,
    Option<(postgres::Private, tempfile::TempDir)>,
)> {
    let (url, private) = match &args.postgres_url {
        Some(url) => (url.clone(), None),
        None => {
            // Its own temporary directory: it may be handed to another
            // user (PostgreSQL does not run as root).
            let pg_dir = tempfile::Builder::new()
                .prefix("amends-bench-pg-")
                .tempdir()
                .context("making PostgreSQL's temporary directory")?;
            let server = postgres::Private::start(pg_dir.path(), concurrency)?;
            eprintln!("bench: private PostgreSQL at {}", server.url());
            (server.url(), Some((server, pg_dir)))
        }
    };
    let pg = Arc::new(postgres::Postgres::connect(&url, concurrency)?);
    pg.prepare(args.accounts, args.initial_balance).await?;
    pg.warm(concurrency).await?;
    // The private server's processes are ours to read; a given one's are
    // not (it may be on another machine).
    let meter = match private.as_ref().and_then(|(p, _)| p.pid()) {
        Some(pid) => Some(cpu::Meter::start(&[pid])?),
        None => None,
    };
    let stats = workload::drive("PostgreSQL", pg, spec, load).await?;
    let cpu = meter.map(cpu::Meter::finish).transpose()?;
    Ok((stats, cpu, private))
}

/// Waits up to `within` for `child` to exit after it was asked to stop,
/// then kills it; reaps it either way.
fn reap_within(child: &mut std::process::Child, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
