//! `amends-campaign`: a fault campaign against a release build of `amends
//! serve`, bounded in time, that prints its figures (RELIABILITY.md).
//!
//! Each scenario starts its own nats-server (the pinned one from
//! `scripts/setup`) on a loopback port and its own `amends serve`, runs a
//! mixed load of resubmitting clients, injects its fault for real, then
//! reads back the requests and decisions streams (ops submitted, decided,
//! lost, doubled, contradictory) and runs `amends audit`. It exits 1 if
//! anything was lost, doubled or contradicted, a check failed or an audit
//! failed; 2 if it could not run.

mod deploy;
mod hostile;
mod load;
mod scenario;
mod tally;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use amends_nats::test_support::SERVER_ENV;
use clap::{Parser, ValueEnum};

use scenario::{Ctx, Report, secs};

/// Runs the fault campaign and prints its figures.
#[derive(Parser, Debug)]
#[command(name = "amends-campaign", about)]
struct Args {
    /// The campaign's length in minutes (about; each scenario gets a share).
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// A short campaign (about a minute) for trying it; overrides --minutes.
    #[arg(long)]
    quick: bool,
    /// The `amends` binary (a release build).
    #[arg(long, default_value = "target/release/amends")]
    amends: PathBuf,
    /// Partitions per deployment.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Concurrent load clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Load operations per second (all clients together).
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seed of the load and of the fault timings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run only these scenarios (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Which>,
}

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// `amends serve` SIGKILLed under load.
    ServeKill,
    /// nats-server SIGKILLed and restarted under load.
    NatsKill,
    /// `amends serve` SIGSTOPped 8 s.
    Pause,
    /// A second `amends serve` taking over a paused one.
    SecondInstance,
    /// An older nats-server store restored, then new requests.
    Rollback,
    /// Hostile messages among the load.
    Hostile,
}

/// Each scenario's share of the campaign's time, in percent.
const SHARES: [(Which, u32); 6] = [
    (Which::ServeKill, 30),
    (Which::NatsKill, 18),
    (Which::Pause, 16),
    (Which::SecondInstance, 14),
    (Which::Rollback, 10),
    (Which::Hostile, 12),
];

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let ctx = match prepare(&args) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = runtime.block_on(run(&args, &ctx));
    std::process::exit(code);
}

/// Finds the binaries, or says how to get them.
fn prepare(args: &Args) -> anyhow::Result<Ctx> {
    if !args.amends.is_file() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release -p amends` (or name another with --amends PATH)",
            args.amends.display()
        );
    }
    let nats = amends_nats::test_support::try_binary().map_err(|tried| {
        anyhow::anyhow!(
            "nats-server not found (looked at: {tried}; ${SERVER_ENV} names another): run scripts/setup, which installs the pinned nats-server into .tools/bin"
        )
    })?;
    tracing::info!(nats_server = %nats.display(), "nats-server");
    Ok(Ctx {
        setup: deploy::Setup {
            amends: std::fs::canonicalize(&args.amends)?,
            partitions: args.partitions,
        },
        clients: args.clients,
        rate: args.rate,
        seed: args.seed,
    })
}

async fn run(args: &Args, ctx: &Ctx) -> i32 {
    let minutes = if args.quick {
        1.0
    } else {
        args.minutes.max(0.5)
    };
    let total = Duration::from_secs_f64(minutes * 60.0);
    let started = Instant::now();
    println!(
        "amends-campaign: {minutes} min, {} partitions, {} clients at {} ops/s, seed {}",
        ctx.setup.partitions, ctx.clients, ctx.rate, ctx.seed
    );
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for (which, share) in SHARES {
        if !args.only.is_empty() && !args.only.contains(&which) {
            continue;
        }
        let budget = total * share / 100;
        println!("\n== {which:?} ({:.0} s of load)", budget.as_secs_f64());
        let result = match which {
            Which::ServeKill => scenario::serve_kills(ctx, budget).await,
            Which::NatsKill => scenario::nats_kills(ctx, budget).await,
            Which::Pause => scenario::pauses(ctx, budget).await,
            Which::SecondInstance => scenario::second_instance(ctx, budget).await,
            Which::Rollback => scenario::rollback(ctx, budget).await,
            Which::Hostile => scenario::hostile_input(ctx, budget).await,
        };
        match result {
            Ok(report) => {
                print_report(&report);
                reports.push(report);
            }
            Err(e) => {
                println!("could not run: {e:#}");
                errors.push(format!("{which:?}: {e:#}"));
            }
        }
    }
    print_table(&reports, started.elapsed());
    if !errors.is_empty() {
        println!("\nscenarios that could not run: {}", errors.join("; "));
        return 2;
    }
    if reports.iter().all(Report::passed) {
        println!("\ncampaign passed");
        0
    } else {
        println!("\ncampaign FAILED");
        1
    }
}

fn quantiles(h: &hdrhistogram::Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".to_owned();
    }
    format!(
        "p50 {:.2} s, p99 {:.2} s, max {:.2} s ({} samples)",
        secs(h.value_at_quantile(0.5)),
        secs(h.value_at_quantile(0.99)),
        secs(h.max()),
        h.len()
    )
}

fn print_report(r: &Report) {
    let t = &r.tally;
    println!("injected: {}", r.injected);
    println!(
        "ops {}: submitted {}, decided {}, lost {}, doubled {}, contradictory {}, unanswered {}, mismatched {}",
        t.ops,
        t.submitted,
        t.decided,
        t.lost,
        t.doubled,
        t.contradictory,
        t.unanswered,
        t.mismatched
    );
    println!(
        "recovery (fault to the next new op decided): {}",
        quantiles(&r.recovery)
    );
    println!("op latency: {}", quantiles(&r.latency));
    for (what, ok) in &r.checks {
        println!("check {}: {what}", if *ok { "ok  " } else { "FAIL" });
    }
    for note in &r.notes {
        println!("note: {note}");
    }
    println!(
        "audit: {} ({})",
        if r.audit.passed { "passed" } else { "FAILED" },
        r.audit.summary
    );
    if let Some(w) = &r.audit.warning {
        println!("audit's first {w}");
    }
    println!(
        "took {:.0} s: {}",
        r.elapsed.as_secs_f64(),
        if r.passed() { "passed" } else { "FAILED" }
    );
}

fn print_table(reports: &[Report], took: Duration) {
    println!(
        "\n{:<20} {:>7} {:>9} {:>7} {:>4} {:>7} {:>6} {:>6} {:>6} {:>14} {:>7}",
        "scenario",
        "ops",
        "submitted",
        "decided",
        "lost",
        "doubled",
        "contra",
        "unans",
        "audit",
        "recovery max",
        "result"
    );
    let mut total = tally::Tally::default();
    for r in reports {
        let t = &r.tally;
        total.add(t);
        let recovery = if r.recovery.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.2} s", secs(r.recovery.max()))
        };
        println!(
            "{:<20} {:>7} {:>9} {:>7} {:>4} {:>7} {:>6} {:>6} {:>6} {:>14} {:>7}",
            r.name,
            t.ops,
            t.submitted,
            t.decided,
            t.lost,
            t.doubled,
            t.contradictory,
            t.unanswered,
            if r.audit.passed { "pass" } else { "FAIL" },
            recovery,
            if r.passed() { "pass" } else { "FAIL" }
        );
    }
    println!(
        "{:<20} {:>7} {:>9} {:>7} {:>4} {:>7} {:>6} {:>6}",
        "total",
        total.ops,
        total.submitted,
        total.decided,
        total.lost,
        total.doubled,
        total.contradictory,
        total.unanswered
    );
    println!("campaign took {:.0} s", took.as_secs_f64());
}
