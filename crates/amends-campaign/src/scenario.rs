//! The scenarios: each starts its own deployment, runs the mixed load,
//! injects its fault for real, then counts what the streams hold and runs
//! `amends audit`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::deploy::{self, Audit, Deployment, Setup};
use crate::hostile;
use crate::load::{self, Load, Op};
use crate::tally::Tally;

/// What every scenario is given.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Binaries and deployment size.
    pub setup: Setup,
    /// Concurrent load clients.
    pub clients: usize,
    /// Load operations per second, all clients together.
    pub rate: u32,
    /// Seed of the load and of the fault timings.
    pub seed: u64,
}

/// The figures of one scenario.
pub struct Report {
    /// Its name.
    pub name: &'static str,
    /// What was injected, counted.
    pub injected: String,
    /// The per-op figures.
    pub tally: Tally,
    /// The audit's verdict.
    pub audit: Audit,
    /// Fault to the next new op's decision, in microseconds.
    pub recovery: Histogram<u64>,
    /// Submit-to-decision latency of the load's ops, in microseconds.
    pub latency: Histogram<u64>,
    /// Checks particular to the scenario: what, and whether it held.
    pub checks: Vec<(String, bool)>,
    /// Further figures.
    pub notes: Vec<String>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether nothing was lost, doubled or contradicted, the audit passed
    /// and every check held.
    pub fn passed(&self) -> bool {
        self.tally.clean()
            && self.tally.unanswered == 0
            && self.audit.passed
            && self.checks.iter().all(|(_, ok)| *ok)
    }
}

/// Gathers a scenario's figures while it runs.
struct Run {
    started: Instant,
    ops: Vec<Op>,
    recovery: Histogram<u64>,
    latency: Histogram<u64>,
    checks: Vec<(String, bool)>,
    notes: Vec<String>,
    rng: StdRng,
    /// Whether serve must still run at the end (not after a rollback).
    serve_stays: bool,
}

impl Run {
    fn new(ctx: &Ctx, salt: u64) -> Run {
        Run {
            started: Instant::now(),
            ops: Vec::new(),
            recovery: load::histogram(),
            latency: load::histogram(),
            checks: Vec::new(),
            notes: Vec::new(),
            rng: StdRng::seed_from_u64(ctx.seed ^ salt),
            serve_stays: true,
        }
    }

    /// A run with its deployment (serve with `flags`), the accounts
    /// opened and funded, and the mixed load started for `budget`.
    async fn begin(
        ctx: &Ctx,
        salt: u64,
        flags: &[&str],
        budget: Duration,
    ) -> anyhow::Result<(Run, Deployment, Load)> {
        let mut run = Run::new(ctx, salt);
        let d = Deployment::start(&ctx.setup, flags).await?;
        run.ops = load::open_accounts(&d.client).await;
        let max = max_ops(ctx, budget);
        let load = Load::start(&d.client, ctx.clients, ctx.rate, max, ctx.seed);
        Ok((run, d, load))
    }

    fn check(&mut self, what: impl Into<String>, ok: bool) {
        let what = what.into();
        if !ok {
            tracing::error!(check = %what, "check failed");
        }
        self.checks.push((what, ok));
    }

    /// Keeps a probe op and its recovery time.
    fn recovered(&mut self, (op, took): (Op, Duration)) {
        load::record(&mut self.recovery, took);
        self.ops.push(op);
    }

    fn take(&mut self, done: load::Done) {
        self.ops.extend(done.ops);
        self.latency
            .add(&done.latency)
            .expect("histograms of one range");
    }

    /// A pause of 1 to 4 s, so that faults land at different points.
    async fn settle(&mut self) {
        let ms = self.rng.random_range(1_000..4_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn finish(
        mut self,
        name: &'static str,
        injected: String,
        d: &mut Deployment,
    ) -> anyhow::Result<Report> {
        let tally = d.tally(&self.ops).await;
        let audit = d.audit().await?;
        if self.serve_stays {
            let serve_up = d.serve.is_running();
            self.check("serve still runs at the end", serve_up);
        }
        Ok(Report {
            name,
            injected,
            tally,
            audit,
            recovery: self.recovery,
            latency: self.latency,
            checks: self.checks,
            notes: self.notes,
            elapsed: self.started.elapsed(),
        })
    }
}

fn max_ops(ctx: &Ctx, budget: Duration) -> usize {
    let secs = usize::try_from(budget.as_secs()).unwrap_or(usize::MAX);
    usize::try_from(ctx.rate)
        .unwrap_or(usize::MAX)
        .saturating_mul(secs.saturating_add(30))
}

/// How many rounds of `each` fit in `budget`, at least 1 (or `min`).
fn rounds(budget: Duration, each: Duration, min: u32, max: u32) -> u32 {
    let n = budget.as_millis() / each.as_millis().max(1);
    u32::try_from(n).unwrap_or(max).clamp(min, max)
}

/// Scenario 1: `amends serve` SIGKILLed and restarted under the mixed load.
pub async fn serve_kills(ctx: &Ctx, budget: Duration) -> anyhow::Result<Report> {
    let (mut run, mut d, load) = Run::begin(ctx, 1, &["--lease-ttl-ms", "2000"], budget).await?;
    let kills = rounds(budget, Duration::from_secs(6), 2, 100);
    let mut ran = 0;
    for _ in 0..kills {
        run.settle().await;
        ran += u32::from(d.serve.is_running());
        let killed = Instant::now();
        d.serve.restart();
        run.recovered(d.probe(killed).await);
    }
    run.check(
        format!("serve ran until each kill: {ran} of {kills}"),
        ran == kills,
    );
    run.take(load.stop().await);
    run.finish(
        "serve SIGKILL",
        format!("{kills} SIGKILLs of serve"),
        &mut d,
    )
    .await
}

/// Scenario 2: nats-server SIGKILLed and restarted on the same store under load.
pub async fn nats_kills(ctx: &Ctx, budget: Duration) -> anyhow::Result<Report> {
    let (mut run, mut d, load) = Run::begin(ctx, 2, &[], budget).await?;
    let kills = rounds(budget, Duration::from_secs(8), 2, 100);
    for _ in 0..kills {
        run.settle().await;
        let killed = Instant::now();
        d.server.kill9();
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.server.restart();
        run.recovered(d.probe(killed).await);
    }
    run.take(load.stop().await);
    run.finish(
        "nats-server SIGKILL",
        format!("{kills} SIGKILLs of nats-server, each down 1 s"),
        &mut d,
    )
    .await
}

/// The pause: past a fetch's expiry (500 ms plus the 5 s async-nats adds),
/// below the lease's TTL.
const PAUSE: Duration = Duration::from_secs(8);

/// Scenario 3: `amends serve` SIGSTOPped past the fetch expiry, then SIGCONTed.
pub async fn pauses(ctx: &Ctx, budget: Duration) -> anyhow::Result<Report> {
    let (mut run, mut d, load) = Run::begin(ctx, 3, &["--lease-ttl-ms", "60000"], budget).await?;
    let pauses = rounds(budget, PAUSE + Duration::from_secs(3), 1, 20);
    for _ in 0..pauses {
        run.settle().await;
        d.serve.signal("STOP");
        tokio::time::sleep(PAUSE).await;
        d.serve.signal("CONT");
        let resumed = Instant::now();
        run.recovered(d.probe(resumed).await);
    }
    run.take(load.stop().await);
    let hit = d.serve.log().matches("deliveries missing").count();
    run.notes.push(format!(
        "fetches that lost deliveries to a pause, recovered: {hit}"
    ));
    run.finish(
        "serve SIGSTOP 8 s",
        format!("{pauses} pauses of {PAUSE:?} (lease TTL 60 s)"),
        &mut d,
    )
    .await
}

/// Polls `serve`'s log until it contains `what`, up to `within`.
async fn logged(
    serve: &amends_nats::test_support::serve::Serve,
    what: &str,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    while !serve.log().contains(what) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Scenario 4: a second `serve` (own data dir) beside the first: it stands by, the
/// first is SIGSTOPped past the lease TTL, the second takes over, and the
/// first, SIGCONTed, must exit non-zero.
pub async fn second_instance(ctx: &Ctx, budget: Duration) -> anyhow::Result<Report> {
    let lease = ["--lease-ttl-ms", "2000"];
    let (mut run, mut d, load) = Run::begin(ctx, 4, &lease, budget).await?;
    let takeovers = rounds(budget, Duration::from_secs(7), 1, 20);
    let mut took = load::histogram();
    for round in 0..takeovers {
        let mut standby = d.another_serve(&format!("standby-{round}"), &lease);
        let stands_by = logged(&standby, "standby", Duration::from_secs(10)).await;
        run.check(format!("instance {} stands by", round + 2), stands_by);
        run.settle().await;
        run.check(
            format!("instance {} serves nothing while the first runs", round + 2),
            !standby.log().contains(" serving"),
        );
        d.serve.signal("STOP");
        let stopped = Instant::now();
        let took_over = logged(&standby, " serving", Duration::from_secs(30)).await;
        load::record(&mut took, stopped.elapsed());
        run.check(format!("instance {} took over", round + 2), took_over);
        run.recovered(d.probe(stopped).await);
        d.serve.signal("CONT");
        let code = tokio::task::block_in_place(|| d.serve.wait_exit(Duration::from_secs(15)));
        let fenced =
            d.serve.log().contains("lost the deployment lease") || d.serve.log().contains("fenced");
        run.check(
            format!("the paused instance exits non-zero, fenced (exit {code:?})"),
            matches!(code, Some(c) if c != 0) && fenced,
        );
        standby.assert_running();
        let old = std::mem::replace(&mut d.serve, standby);
        drop(old);
    }
    run.take(load.stop().await);
    run.notes.push(format!(
        "pause to the standby serving: p50 {:.1} s, max {:.1} s",
        secs(took.value_at_quantile(0.5)),
        secs(took.max())
    ));
    run.finish(
        "second instance",
        format!("{takeovers} standbys, each taking over a SIGSTOPped serve (lease TTL 2 s)"),
        &mut d,
    )
    .await
}

/// Microseconds as seconds.
pub fn secs(micros: u64) -> f64 {
    Duration::from_micros(micros).as_secs_f64()
}

/// Scenario 5: a log rollback: the nats-server store is copied while stopped, more
/// load runs, then the old copy is restored and new requests published
/// before serve starts; serve must stop loudly rather than skip them.
pub async fn rollback(ctx: &Ctx, budget: Duration) -> anyhow::Result<Report> {
    let mut run = Run::new(ctx, 5);
    let mut d = Deployment::start(&ctx.setup, &["--lease-ttl-ms", "2000"]).await?;
    let phase = (budget / 3).max(Duration::from_secs(3));
    run.ops = load::open_accounts(&d.client).await;
    let load = Load::start(
        &d.client,
        ctx.clients,
        ctx.rate,
        max_ops(ctx, phase),
        ctx.seed,
    );
    tokio::time::sleep(phase).await;
    run.take(load.stop().await);

    // The copy, taken while both are stopped.
    d.serve.kill9();
    d.server.kill9();
    let copy = d.path("nats-store-copy");
    deploy::copy_dir(&d.server.store_dir(), &copy)?;
    d.server.restart();
    d.serve.restart();
    let later = Load::start(
        &d.client,
        ctx.clients,
        ctx.rate,
        max_ops(ctx, phase),
        ctx.seed ^ 5,
    );
    tokio::time::sleep(phase).await;
    let rolled_back = later.stop().await.ops.len();

    // The restore, then new traffic before serve starts.
    d.serve.kill9();
    d.server.kill9();
    std::fs::remove_dir_all(d.server.store_dir())?;
    deploy::copy_dir(&copy, &d.server.store_dir())?;
    d.server.restart();
    let mut fresh = Vec::new();
    let target = usize::try_from(ctx.rate).unwrap_or(100).max(100);
    for i in 0..target {
        let r = load::request(amends_core::command::Command::Credit {
            account: load::account(u64::try_from(i).unwrap_or(0) % load::ACCOUNTS),
            amount: amends_core::command::Amount::new(1).expect("1 is an amount"),
        });
        if let Ok(submitted) = d.client.submit(&r).await {
            fresh.push((r, submitted.partition.get()));
        }
    }
    d.serve.restart();
    let code = tokio::task::block_in_place(|| d.serve.wait_exit(Duration::from_secs(30)));
    let log = d.serve.log();
    let loud: HashSet<u32> = (0..ctx.setup.partitions)
        .filter(|p| {
            log.contains(&format!("partition {p}: the log changed"))
                || log.contains(&format!("partition {p}: the log went backwards"))
        })
        .collect();
    if code.is_none() {
        // Still running: give the partitions it serves time to decide.
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let by_op = amends_nats::test_support::decisions::decisions_by_op(
        &d.js,
        &amends_nats::topology::Prefix::default(),
    )
    .await;
    let decided = fresh
        .iter()
        .filter(|(r, _)| by_op.contains_key(&r.op_id.to_string()))
        .count();
    let dropped = fresh
        .iter()
        .filter(|(r, p)| !by_op.contains_key(&r.op_id.to_string()) && !loud.contains(p))
        .count();
    let detected = matches!(code, Some(c) if c != 0) && !loud.is_empty();
    run.check(
        format!(
            "serve refuses the rolled-back log loudly (exit {code:?}, {} partitions stopped)",
            loud.len()
        ),
        detected,
    );
    run.check(
        format!("new requests silently dropped: {dropped} (must be 0)"),
        dropped == 0,
    );
    run.notes.push(format!(
        "{rolled_back} ops rolled back by the restore; {} new requests after it: {decided} decided, {} held back by the loud stop, {dropped} silently dropped",
        fresh.len(),
        fresh.len() - decided - dropped,
    ));
    // serve stopping is what this scenario wants.
    run.serve_stays = false;
    run.finish(
        "log rollback",
        "1 restore of an older nats-server store, then new requests".to_owned(),
        &mut d,
    )
    .await
}

/// Scenario 6: hostile input published behind the client's back, interleaved with
/// the good load.
pub async fn hostile_input(ctx: &Ctx, budget: Duration) -> anyhow::Result<Report> {
    let (mut run, mut d, load) = Run::begin(ctx, 6, &[], budget).await?;
    let sent = hostile::send(&d, ctx.setup.partitions, budget, ctx.seed).await?;
    run.take(load.stop().await);
    let accounted = hostile::account_for(&d, &sent, Duration::from_secs(20)).await;
    let unaccounted = accounted.unaccounted();
    run.check(
        format!("hostile messages neither answered nor dead-lettered: {unaccounted} (must be 0)"),
        unaccounted == 0,
    );
    let worst = secs(run.latency.max());
    run.check(
        format!("no stall: the slowest good op took {worst:.2} s (under 5 s)"),
        worst < 5.0,
    );
    run.notes.extend(accounted.lines());
    run.finish(
        "hostile input",
        format!("{} hostile messages", sent.len()),
        &mut d,
    )
    .await
}
