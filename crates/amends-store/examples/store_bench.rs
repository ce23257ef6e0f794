//! Benchmarks of amends-store (a command, not a test).
//!
//! `commit`: batched group commits with fsync for several batch sizes:
//! operations per second and commit latency percentiles, next to a baseline
//! of raw sled `apply_batch` + `flush` of the same number of 100-byte writes
//! per batch.
//!
//! `memory`: opens many accounts then applies credits with distinct op ids
//! (every one keeps a dedup record), printing the resident memory as the
//! data grows.
//!
//! ```text
//! cargo run --release -p amends-store --example store_bench -- commit
//! cargo run --release -p amends-store --example store_bench -- memory
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amends_core::command::{AccountId, Amount, Command, Request};
use amends_core::id::OpId;
use amends_core::partition::{Config, Effect, Input, Machine};
use amends_core::route::Partitions;
use amends_core::state::{ChangeSet, Overlay};
use amends_store::{CACHE_BYTES_DEFAULT, Options, Partition, PartitionStore, Store};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

/// Log time of the first message.
const T0_MS: u64 = 1_700_000_000_000;
/// How often the memory run's background compaction starts a pass.
const COMPACT_EVERY_S: u64 = 10;

#[derive(Parser)]
#[command(about = "Benchmarks of amends-store: group commit throughput and memory")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ops/s and commit latency with fsync per batch, against raw sled.
    Commit {
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,64,1024")]
        batch: Vec<usize>,
        /// Operations per batch size (at most; see --seconds).
        #[arg(long, default_value_t = 300_000)]
        ops: usize,
        /// Stop a batch size after this long.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Accounts the credits and debits are spread over.
        #[arg(long, default_value_t = 10_000)]
        accounts: u64,
        /// Where to put the databases (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// sled's page cache, in bytes.
        #[arg(long, default_value_t = CACHE_BYTES_DEFAULT)]
        cache_bytes: u64,
    },
    /// Resident memory while op ids and accounts accumulate.
    Memory {
        /// Distinct op ids in total (the account openings included).
        #[arg(long, default_value_t = 10_000_000)]
        op_ids: u64,
        /// Accounts opened first.
        #[arg(long, default_value_t = 1_000_000)]
        accounts: u64,
        /// Operations per commit.
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        /// Print a sample every this many operations.
        #[arg(long, default_value_t = 500_000)]
        sample_every: u64,
        /// Where to put the database (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// sled's page cache, in bytes.
        #[arg(long, default_value_t = CACHE_BYTES_DEFAULT)]
        cache_bytes: u64,
        /// Dedup retention (log time advances 1 ms per operation); when set,
        /// a background thread compacts every few seconds, as a service would.
        /// Default: a day, so nothing is compacted.
        #[arg(long)]
        dedup_retention_ms: Option<u64>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Commit {
            batch,
            ops,
            seconds,
            accounts,
            dir,
            cache_bytes,
        } => {
            let root = workdir(dir)?;
            println!(
                "{:>5} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>8} {:>7} | {:>13} {:>7} | {:>13} {:>7}",
                "batch",
                "ops",
                "ops/s",
                "wr/batch",
                "writes/s",
                "p50 us",
                "p99 us",
                "p99.9 us",
                "max us",
                "seq writes/s",
                "p50 us",
                "rand writes/s",
                "p50 us"
            );
            for b in batch {
                let limit = Duration::from_secs(seconds);
                let store = commit_run(
                    &root.path().join(format!("store-{b}")),
                    b,
                    ops,
                    limit,
                    accounts,
                    cache_bytes,
                )?;
                let seq = raw_run(
                    &root.path().join(format!("raw-seq-{b}")),
                    store.batches,
                    store.writes_per_batch,
                    true,
                    cache_bytes,
                )?;
                let random = raw_run(
                    &root.path().join(format!("raw-random-{b}")),
                    store.batches,
                    store.writes_per_batch,
                    false,
                    cache_bytes,
                )?;
                let batch_len = count_f64(u64::try_from(b)?);
                println!(
                    "{:>5} {:>8} {:>7.0} {:>8.1} {:>8.0} {:>7} {:>7} {:>8} {:>7} | {:>13.0} {:>7} | {:>13.0} {:>7}",
                    b,
                    store.ops,
                    store.ops_per_s,
                    store.writes_per_batch,
                    store.ops_per_s / batch_len * store.writes_per_batch,
                    store.latency.value_at_quantile(0.5),
                    store.latency.value_at_quantile(0.99),
                    store.latency.value_at_quantile(0.999),
                    store.latency.max(),
                    seq.writes_per_s,
                    seq.latency.value_at_quantile(0.5),
                    random.writes_per_s,
                    random.latency.value_at_quantile(0.5),
                );
            }
            Ok(())
        }
        Cmd::Memory {
            op_ids,
            accounts,
            batch,
            sample_every,
            dir,
            cache_bytes,
            dedup_retention_ms,
        } => {
            let root = workdir(dir)?;
            let run = MemoryRun {
                op_ids,
                accounts,
                batch,
                sample_every,
                cache_bytes,
                dedup_retention_ms,
            };
            run.run(&root.path().join("store"))
        }
    }
}

/// A temporary directory, under `dir` if given.
fn workdir(dir: Option<PathBuf>) -> Result<tempfile::TempDir> {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            Ok(tempfile::tempdir_in(d)?)
        }
        None => Ok(tempfile::tempdir()?),
    }
}

fn open(path: &std::path::Path, cache_bytes: u64) -> Result<(Store, Partition)> {
    let partitions = Partitions::new(1)?;
    let options = Options {
        cache_bytes,
        ..Options::new(partitions)
    };
    let store = Store::open(path, options)?;
    let p = store.partition(partitions.id(0).context("partition 0")?)?;
    Ok((store, p))
}

fn account(n: u64) -> AccountId {
    AccountId::new(format!("acct-{n:07}")).unwrap_or_else(|e| panic!("account id: {e}"))
}

fn amount(v: u64) -> Amount {
    Amount::new(v).unwrap_or_else(|e| panic!("amount: {e}"))
}

/// Feeds operations through the machine and commits them in batches.
struct Driver {
    machine: Machine,
    p: Partition,
    changes: ChangeSet,
    effects: Vec<Effect>,
    position: u64,
    /// Writes of the batches committed so far (for the raw baseline).
    writes: u64,
    batches: u64,
    latency: Histogram<u64>,
}

impl Driver {
    fn new(p: Partition, config: Config) -> Result<Driver> {
        // The bench's store has one partition (see `open`).
        let machine = Machine::new(p.id(), Partitions::new(1)?, config);
        Ok(Driver {
            machine,
            p,
            changes: ChangeSet::default(),
            effects: Vec::new(),
            position: 0,
            writes: 0,
            batches: 0,
            latency: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        })
    }

    fn log_time_ms(&self) -> u64 {
        T0_MS + self.position
    }

    fn apply(&mut self, command: Command) -> Result<()> {
        self.position += 1;
        let now = self.log_time_ms();
        let req = Request {
            op_id: OpId::v7_from_parts(now, u128::from(self.position)),
            command,
            apology_topic: None,
        };
        let mut view = Overlay::new(&self.p, &mut self.changes);
        self.machine.apply(
            &mut view,
            self.position,
            now,
            &Input::Request(req),
            &mut self.effects,
        )?;
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        let started = Instant::now();
        let committed = self.p.commit(&self.changes, &self.effects)?;
        self.changes.clear();
        self.latency.record(micros(started.elapsed()))?;
        // A driver publishes the effects now, then confirms them.
        self.p.outbox_confirm(committed.outbox.end)?;
        self.writes += committed.writes;
        self.batches += 1;
        self.effects.clear();
        Ok(())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

struct CommitResult {
    ops: u64,
    ops_per_s: f64,
    batches: u64,
    writes_per_batch: f64,
    latency: Histogram<u64>,
}

fn commit_run(
    path: &std::path::Path,
    batch: usize,
    ops: usize,
    limit: Duration,
    accounts: u64,
    cache_bytes: u64,
) -> Result<CommitResult> {
    if batch == 0 {
        bail!("batch size must be at least 1");
    }
    let (_store, p) = open(path, cache_bytes)?;
    let mut d = Driver::new(p, Config::default())?;
    // Open the accounts first (not measured), in large batches.
    for n in 0..accounts {
        d.apply(Command::OpenAccount {
            account: account(n),
            floor: -1_000_000_000,
            ceiling: None,
        })?;
        if d.changes.dedup.len() >= 4096 {
            d.commit()?;
        }
    }
    d.commit()?;
    d.latency.reset();
    (d.writes, d.batches) = (0, 0);

    // Credits and debits on pseudo-random accounts, every one a new op id.
    let started = Instant::now();
    let mut done = 0u64;
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    'outer: for _ in 0..ops.div_ceil(batch) {
        for _ in 0..batch {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let acct = account(x % accounts);
            let command = if x.is_multiple_of(3) {
                Command::Debit {
                    account: acct,
                    amount: amount(1 + x % 50),
                }
            } else {
                Command::Credit {
                    account: acct,
                    amount: amount(1 + x % 100),
                }
            };
            d.apply(command)?;
            done += 1;
        }
        d.commit()?;
        if started.elapsed() > limit {
            break 'outer;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(CommitResult {
        ops: done,
        ops_per_s: ratio(done, secs),
        batches: d.batches,
        writes_per_batch: ratio(d.writes, count_f64(d.batches)),
        latency: d.latency,
    })
}

fn count_f64(n: u64) -> f64 {
    // Counts here stay far below 2^53, where f64 is exact.
    f64::from(u32::try_from(n).unwrap_or(u32::MAX))
}

fn ratio(n: u64, d: f64) -> f64 {
    if d > 0.0 { count_f64(n) / d } else { 0.0 }
}

struct RawResult {
    writes_per_s: f64,
    latency: Histogram<u64>,
}

/// Raw sled: the same number of batches, each with the same number of
/// 100-byte writes under 17-byte keys, each followed by a flush. With
/// `sequential` keys every write appends at the right edge of the tree
/// (sled's best case); otherwise keys are spread uniformly.
fn raw_run(
    path: &std::path::Path,
    batches: u64,
    writes_per_batch: f64,
    sequential: bool,
    cache_bytes: u64,
) -> Result<RawResult> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree("raw")?;
    let per_batch = writes_per_batch.round().max(1.0);
    let per_batch = (1u64..).find(|n| count_f64(*n) >= per_batch).unwrap_or(1);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let value = [7u8; 100];
    let mut key = 0u64;
    let started = Instant::now();
    for _ in 0..batches {
        let mut b = sled::Batch::default();
        for _ in 0..per_batch {
            key = if sequential {
                key + 1
            } else {
                key.wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407)
            };
            let mut k = [b'd'; 17];
            k[1..9].copy_from_slice(&key.to_be_bytes());
            b.insert(&k[..], &value[..]);
        }
        let t = Instant::now();
        tree.apply_batch(b)?;
        tree.flush()?;
        latency.record(micros(t.elapsed()))?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(RawResult {
        writes_per_s: ratio(batches * per_batch, secs),
        latency,
    })
}

/// The process's resident and peak resident memory, in MiB.
fn rss_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The settings of the memory run.
struct MemoryRun {
    op_ids: u64,
    accounts: u64,
    batch: usize,
    sample_every: u64,
    cache_bytes: u64,
    dedup_retention_ms: Option<u64>,
}

impl MemoryRun {
    fn run(&self, path: &std::path::Path) -> Result<()> {
        let MemoryRun {
            op_ids,
            accounts,
            batch,
            sample_every,
            cache_bytes,
            dedup_retention_ms,
        } = *self;
        let (store, p) = open(path, cache_bytes)?;
        let mut config = Config::default();
        if let Some(r) = dedup_retention_ms {
            config.dedup_retention_ms = r;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let compactor = dedup_retention_ms.map(|_| {
            let (p, stop) = (p.clone(), Arc::clone(&stop));
            std::thread::spawn(move || -> Result<(u64, u64, Duration)> {
                let (mut removed, mut passes, mut busy) = (0, 0, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let now = p.head()?.clock.log_time_ms;
                    let done = p.compact(config.compaction_horizon_ms(now))?;
                    busy += started.elapsed();
                    removed += done.dedup;
                    passes += 1;
                    for _ in 0..COMPACT_EVERY_S {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                Ok((removed, passes, busy))
            })
        });
        let mut d = Driver::new(p.clone(), config)?;
        println!(
            "{:>11} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "op ids", "accounts", "RSS MiB", "peak MiB", "disk MiB", "ops/s"
        );
        let started = Instant::now();
        let mut interval = Instant::now();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for n in 0..op_ids {
            let command = if n < accounts {
                Command::OpenAccount {
                    account: account(n),
                    floor: 0,
                    ceiling: None,
                }
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                Command::Credit {
                    account: account(x % accounts.max(1)),
                    amount: amount(1 + x % 100),
                }
            };
            d.apply(command)?;
            if d.changes.dedup.len() >= batch {
                d.commit()?;
            }
            let done = n + 1;
            if done.is_multiple_of(sample_every) || done == op_ids {
                d.commit()?;
                let (rss, peak) = rss_mib();
                let disk = store.size_on_disk()? / (1024 * 1024);
                let rate = ratio(sample_every, interval.elapsed().as_secs_f64());
                println!(
                    "{:>11} {:>9} {:>9} {:>9} {:>10} {:>10.0}",
                    done,
                    done.min(accounts),
                    rss,
                    peak,
                    disk,
                    rate
                );
                interval = Instant::now();
            }
        }
        println!(
            "done in {:.0} s; commit latency p50 {} us, p99 {} us, max {} us",
            started.elapsed().as_secs_f64(),
            d.latency.value_at_quantile(0.5),
            d.latency.value_at_quantile(0.99),
            d.latency.max()
        );
        stop.store(true, Ordering::Relaxed);
        if let Some(c) = compactor {
            let (removed, passes, busy) = c
                .join()
                .map_err(|_| anyhow::anyhow!("compaction thread panicked"))??;
            println!(
                "compaction: {passes} passes took {busy:.1?} in all and removed {removed} dedup records"
            );
        }
        let (mut keys, mut bytes) = (0u64, 0u64);
        for kv in p.dump() {
            let (k, v) = kv?;
            keys += 1;
            bytes += u64::try_from(k.len() + v.len())?;
        }
        println!(
            "live data: {keys} sled keys, {} MiB of keys and values",
            bytes >> 20
        );
        Ok(())
    }
}
