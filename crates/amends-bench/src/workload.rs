//! The workload: what operations a run submits (mix, key distribution,
//! seeded), and the driver that keeps a fixed number of them in flight
//! against one system, bounded in count and time, timing each from submit
//! to answer.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::distr::Distribution as _;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rand_distr::Zipf;

/// The highest latency the histograms hold, in microseconds (a minute);
/// longer ones are recorded as this.
const LATENCY_US_MAX: u64 = 60_000_000;

/// The significant decimal digits of the latency histograms.
const LATENCY_SIGFIG: u8 = 3;

/// How many errors a run keeps the text of (the first ones).
const ERRORS_KEPT_MAX: usize = 5;

/// One operation of the workload. Accounts and claim keys are numbers;
/// each system names them its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add `amount` to `account`.
    Credit {
        /// The account's number.
        account: u64,
        /// How much.
        amount: u64,
    },
    /// Take `amount` from `account` if its balance stays at or above its
    /// floor.
    Debit {
        /// The account's number.
        account: u64,
        /// How much.
        amount: u64,
    },
    /// Claim key `key` (namespace `bench`) for owner `owner`.
    Claim {
        /// The claim key's number.
        key: u64,
        /// The owner's number.
        owner: u32,
    },
    /// Move `amount` from `from` to `to` (two different accounts) if
    /// `from` stays at or above its floor.
    Transfer {
        /// The debited account.
        from: u64,
        /// The credited account.
        to: u64,
        /// How much.
        amount: u64,
    },
}

/// The kinds of operation, in the order of `--mix` weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`Op::Credit`].
    Credit,
    /// [`Op::Debit`].
    Debit,
    /// [`Op::Claim`].
    Claim,
    /// [`Op::Transfer`].
    Transfer,
}

/// How many claimants compete for each claim key: a claim by another
/// owner than the holder is refused.
pub const OWNERS: u32 = 4;

/// The relative weights of the kinds of operation (`--mix`).
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    /// `(kind, weight)`, weights > 0.
    pub weights: Vec<(Kind, u32)>,
}

impl Mix {
    /// Parses `claim:1,debit:2,credit:2,transfer:1` (names: `claim`,
    /// `debit`, `credit`, `transfer`, and `debit-credit` for both debits and
    /// credits).
    pub fn parse(text: &str) -> anyhow::Result<Mix> {
        let mut weights = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.split_once(':') {
                Some((n, w)) => (
                    n.trim(),
                    w.trim()
                        .parse::<u32>()
                        .with_context(|| format!("--mix {part:?}: weight is not a number"))?,
                ),
                None => (part, 1),
            };
            if weight == 0 {
                continue;
            }
            let kinds: &[Kind] = match name {
                "claim" | "claims" => &[Kind::Claim],
                "debit" | "debits" => &[Kind::Debit],
                "credit" | "credits" => &[Kind::Credit],
                "transfer" | "transfers" => &[Kind::Transfer],
                "debit-credit" | "debits-credits" => &[Kind::Debit, Kind::Credit],
                other => anyhow::bail!(
                    "--mix: unknown kind {other:?} (claim, debit, credit, debit-credit, transfer)"
                ),
            };
            weights.extend(kinds.iter().map(|&k| (k, weight)));
        }
        anyhow::ensure!(!weights.is_empty(), "--mix names no operation");
        Ok(Mix { weights })
    }

    /// Whether the mix has this kind.
    pub fn has(&self, kind: Kind) -> bool {
        self.weights.iter().any(|&(k, _)| k == kind)
    }
}

/// How keys (accounts and claim keys) are picked (`--keys`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keys {
    /// Every key equally likely.
    Uniform,
    /// Zipfian with this exponent: key 0 the most likely.
    Zipf(f64),
    /// `percent` % of picks among the first `hot` keys, the rest uniform.
    Hot {
        /// How many hot keys.
        hot: u64,
        /// The share of picks that go to them.
        percent: u32,
    },
}

impl Keys {
    /// Parses `uniform`, `zipf:S` or `hot:N[:PERCENT]` (percent default
    /// 100: every pick among the N).
    pub fn parse(text: &str) -> anyhow::Result<Keys> {
        let mut parts = text.split(':').map(str::trim);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("uniform"), None, None, None) => Ok(Keys::Uniform),
            (Some("zipf"), s, None, None) => {
                let s = s.unwrap_or("1.0").parse::<f64>().context("--keys zipf:S")?;
                anyhow::ensure!(s > 0.0, "--keys zipf:S needs S > 0");
                Ok(Keys::Zipf(s))
            }
            (Some("hot"), Some(n), p, None) => {
                let hot = n.parse::<u64>().context("--keys hot:N")?;
                let percent = p
                    .map_or(Ok(100), str::parse::<u32>)
                    .context("--keys hot:N:PCT")?;
                anyhow::ensure!(hot >= 2, "--keys hot:N needs N >= 2");
                anyhow::ensure!(percent <= 100, "--keys hot:N:PCT needs PCT <= 100");
                Ok(Keys::Hot { hot, percent })
            }
            _ => anyhow::bail!("--keys: expected uniform, zipf:S or hot:N[:PERCENT], got {text:?}"),
        }
    }
}

/// Everything that decides which operations a run submits.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The mix of operations.
    pub mix: Mix,
    /// The key distribution.
    pub keys: Keys,
    /// How many accounts (numbered from 0).
    pub accounts: u64,
    /// How many claim keys (numbered from 0).
    pub claim_keys: u64,
    /// Amounts are drawn uniformly in `1..=amount_max`.
    pub amount_max: u64,
    /// The seed of every generator of the run.
    pub seed: u64,
}

/// A seeded stream of operations; each in-flight slot has its own, so
/// that a run's operations do not depend on scheduling.
pub struct Generator {
    rng: StdRng,
    kinds: Vec<Kind>,
    kind_index: WeightedIndex<u32>,
    accounts: Picker,
    claim_keys: Picker,
    amount_max: u64,
}

/// Picks a key in `0..n` by the distribution.
enum Picker {
    Uniform(u64),
    Zipf(Zipf<f64>, u64),
    Hot { n: u64, hot: u64, percent: u32 },
}

impl Picker {
    fn new(keys: Keys, n: u64) -> anyhow::Result<Picker> {
        anyhow::ensure!(n >= 2, "at least 2 accounts and claim keys are needed");
        Ok(match keys {
            Keys::Uniform => Picker::Uniform(n),
            Keys::Zipf(s) => Picker::Zipf(
                Zipf::new(u64_f64(n), s).map_err(|e| anyhow::anyhow!("--keys zipf: {e}"))?,
                n,
            ),
            Keys::Hot { hot, percent } => Picker::Hot {
                n,
                hot: hot.min(n),
                percent,
            },
        })
    }

    fn pick(&self, rng: &mut StdRng) -> u64 {
        match self {
            Picker::Uniform(n) => rng.random_range(0..*n),
            Picker::Zipf(z, n) => {
                // Zipf gives 1..=n as a float; an integer-valued f64 below
                // 2^53 converts exactly through its decimal text.
                let x = z.sample(rng);
                format!("{:.0}", x - 1.0)
                    .parse::<u64>()
                    .map_or(0, |k| k.min(n - 1))
            }
            Picker::Hot { n, hot, percent } => {
                if *hot >= *n || rng.random_range(0..100) < *percent {
                    rng.random_range(0..*hot)
                } else {
                    rng.random_range(*hot..*n)
                }
            }
        }
    }
}

impl Generator {
    /// The generator of in-flight slot `slot`.
    pub fn new(spec: &Spec, slot: u64) -> anyhow::Result<Generator> {
        let kinds: Vec<Kind> = spec.mix.weights.iter().map(|&(k, _)| k).collect();
        let kind_index = WeightedIndex::new(spec.mix.weights.iter().map(|&(_, w)| w))
            .context("--mix weights")?;
        Ok(Generator {
            // Distinct, well-mixed seeds per slot (SplitMix64's increment).
            rng: StdRng::seed_from_u64(
                spec.seed
                    .wrapping_add(slot.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ),
            kinds,
            kind_index,
            accounts: Picker::new(spec.keys, spec.accounts)?,
            claim_keys: Picker::new(spec.keys, spec.claim_keys)?,
            amount_max: spec.amount_max.max(1),
        })
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let kind = self
            .kinds
            .get(self.kind_index.sample(&mut self.rng))
            .copied()
            .unwrap_or(Kind::Credit);
        let amount = self.rng.random_range(1..=self.amount_max);
        match kind {
            Kind::Credit => Op::Credit {
                account: self.accounts.pick(&mut self.rng),
                amount,
            },
            Kind::Debit => Op::Debit {
                account: self.accounts.pick(&mut self.rng),
                amount,
            },
            Kind::Claim => Op::Claim {
                key: self.claim_keys.pick(&mut self.rng),
                owner: self.rng.random_range(0..OWNERS),
            },
            Kind::Transfer => {
                let from = self.accounts.pick(&mut self.rng);
                let mut to = self.accounts.pick(&mut self.rng);
                // A transfer names two accounts; redraw a few times, then
                // take the neighbour.
                for _ in 0..8 {
                    if to != from {
                        break;
                    }
                    to = self.accounts.pick(&mut self.rng);
                }
                if to == from {
                    to = (from + 1) % self.accounts.len();
                }
                Op::Transfer { from, to, amount }
            }
        }
    }
}

impl Picker {
    fn len(&self) -> u64 {
        match self {
            Picker::Uniform(n) | Picker::Zipf(_, n) | Picker::Hot { n, .. } => *n,
        }
    }
}

/// The answer to one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The operation took effect.
    Confirmed,
    /// The operation was refused (insufficient funds, a key held by
    /// another owner).
    Refused,
}

/// One system under test: executes an operation and returns its answer,
/// on connection `client` (in `0..clients`).
pub trait Target: Send + Sync + 'static {
    /// Submits `op` and waits for its answer.
    fn execute(&self, client: usize, op: Op)
    -> impl Future<Output = anyhow::Result<Answer>> + Send;
}

/// How hard and how long to drive a system.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Connections to the system.
    pub clients: usize,
    /// Operations in flight per connection.
    pub in_flight: usize,
    /// The most operations submitted.
    pub count: u64,
    /// The longest the run lasts (no operation is submitted after it).
    pub duration: Duration,
    /// The target rate in operations per second over all slots, each slot
    /// submitting on a fixed schedule (at most one in flight per slot);
    /// `None`: as fast as answers come.
    pub rate: Option<f64>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Answers: confirmed.
    pub confirmed: u64,
    /// Answers: refused.
    pub refused: u64,
    /// Operations that got no answer (an error or a timeout).
    pub errors: u64,
    /// The first few errors, as text.
    pub error_samples: Vec<String>,
    /// From the first submit to the last answer.
    pub elapsed: Duration,
    /// Submit-to-answer latency of answered operations, microseconds.
    pub latency_us: Histogram<u64>,
}

impl Stats {
    /// Answers (confirmed + refused) per second.
    pub fn ops_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            u64_f64(self.confirmed + self.refused) / secs
        } else {
            0.0
        }
    }
}

/// `u64` to `f64` for reporting (exact below 2^53, which counts are).
pub fn u64_f64(v: u64) -> f64 {
    u32::try_from(v).map_or_else(
        |_| f64::from(u32::try_from(v >> 32).unwrap_or(u32::MAX)) * 4_294_967_296.0,
        f64::from,
    )
}

/// Per-slot tallies, merged at the end.
struct Tally {
    confirmed: u64,
    refused: u64,
    errors: u64,
    error_samples: Vec<String>,
    latency_us: Histogram<u64>,
}

/// The progress bar's length: it counts thousandths of the run.
const BAR_LEN: u64 = 1_000;

/// How far a run is, in thousandths: the larger of the operations done of
/// `count` and the time passed of `duration`, since either ends it.
fn bar_position(done: u64, count: u64, elapsed: Duration, duration: Duration) -> u64 {
    let by_count = done.saturating_mul(BAR_LEN) / count.max(1);
    let by_time = u64::try_from(
        elapsed.as_millis().saturating_mul(u128::from(BAR_LEN)) / duration.as_millis().max(1),
    )
    .unwrap_or(u64::MAX);
    by_count.max(by_time).min(BAR_LEN)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIG).context("making a histogram")
}

/// Drives `target` with `spec`'s operations under `load`, showing a
/// progress bar named `name`: `clients × in_flight` slots, each submitting
/// its next operation as soon as the previous one is answered, until
/// `count` operations were submitted or `duration` passed.
pub async fn drive<T: Target>(
    name: &str,
    target: Arc<T>,
    spec: &Spec,
    load: Load,
) -> anyhow::Result<Stats> {
    // The run ends at `count` operations or at `duration`, whichever comes
    // first, so the bar shows the larger of the two fractions (in
    // thousandths) and the operations answered so far as its message.
    let bar = ProgressBar::new(BAR_LEN);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {msg}")
            .context("progress bar template")?,
    );
    bar.set_prefix(name.to_owned());
    let issued = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + load.duration;
    let ticker = {
        let (bar, answered, count, duration) = (
            bar.clone(),
            Arc::clone(&answered),
            load.count,
            load.duration,
        );
        tokio::spawn(async move {
            loop {
                let done = answered.load(Ordering::Relaxed);
                bar.set_position(bar_position(done, count, start.elapsed(), duration));
                let secs = start.elapsed().as_secs_f64().max(1e-3);
                bar.set_message(format!("{done} ops ({:.0}/s)", u64_f64(done) / secs));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for client in 0..load.clients.max(1) {
        for lane in 0..load.in_flight.max(1) {
            let slot = u64::try_from(client * load.in_flight.max(1) + lane).unwrap_or(u64::MAX);
            let mut generator = Generator::new(spec, slot)?;
            let target = Arc::clone(&target);
            let issued = Arc::clone(&issued);
            let answered = Arc::clone(&answered);
            let count = load.count;
            let mut tally = Tally {
                confirmed: 0,
                refused: 0,
                errors: 0,
                error_samples: Vec::new(),
                latency_us: histogram()?,
            };
            // Paced slots submit every `slots / rate` seconds, staggered.
            let slots =
                u32::try_from(load.clients.max(1) * load.in_flight.max(1)).unwrap_or(u32::MAX);
            let interval = load
                .rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(f64::from(slots) / r));
            let mut next = start
                + interval.map_or(Duration::ZERO, |i| {
                    i.mul_f64(u64_f64(slot) / f64::from(slots))
                });
            tasks.push(tokio::spawn(async move {
                let mut last_answer = start;
                while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < count {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until(next.into()).await;
                        next += interval;
                    }
                    let op = generator.next_op();
                    let submitted = Instant::now();
                    // The deadline bounds the wait too: a lost answer cannot
                    // hold the run past it by more than a grace period.
                    let limit =
                        deadline.saturating_duration_since(submitted) + Duration::from_secs(10);
                    let answer = tokio::time::timeout(limit, target.execute(client, op)).await;
                    let now = Instant::now();
                    let us = u64::try_from(now.duration_since(submitted).as_micros())
                        .unwrap_or(u64::MAX)
                        .clamp(1, LATENCY_US_MAX);
                    match answer {
                        Ok(Ok(a)) => {
                            match a {
                                Answer::Confirmed => tally.confirmed += 1,
                                Answer::Refused => tally.refused += 1,
                            }
                            tally.latency_us.saturating_record(us);
                            last_answer = now;
                        }
                        Ok(Err(e)) => {
                            tally.errors += 1;
                            if tally.error_samples.len() < ERRORS_KEPT_MAX {
                                tally.error_samples.push(format!("{e:#}"));
                            }
                        }
                        Err(_) => {
                            tally.errors += 1;
                            if tally.error_samples.len() < ERRORS_KEPT_MAX {
                                tally
                                    .error_samples
                                    .push(format!("no answer within {limit:?}"));
                            }
                        }
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                (tally, last_answer)
            }));
        }
    }
    let mut total = Tally {
        confirmed: 0,
        refused: 0,
        errors: 0,
        error_samples: Vec::new(),
        latency_us: histogram()?,
    };
    let mut end = start;
    for task in tasks {
        let (tally, last) = task.await.context("a workload task failed")?;
        total.confirmed += tally.confirmed;
        total.refused += tally.refused;
        total.errors += tally.errors;
        for e in tally.error_samples {
            if total.error_samples.len() < ERRORS_KEPT_MAX {
                total.error_samples.push(e);
            }
        }
        total
            .latency_us
            .add(&tally.latency_us)
            .context("merging histograms")?;
        end = end.max(last);
    }
    ticker.abort();
    bar.finish_and_clear();
    Ok(Stats {
        confirmed: total.confirmed,
        refused: total.refused,
        errors: total.errors,
        error_samples: total.error_samples,
        elapsed: end.duration_since(start),
        latency_us: total.latency_us,
    })
}

/// Parses `2s`, `500ms`, `1m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 30s, 500ms or 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" | "min" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m)")),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_progress_bar_follows_whichever_bound_ends_the_run() {
        // Proves the bar of a run bounded by time moves with the time, not with a count it will never reach (33,151 of 1,000,000 at the end of a 20 s run, before), and the bar of a run bounded by count with the count.
        let s = Duration::from_secs;
        assert_eq!(bar_position(33_151, 1_000_000, s(10), s(20)), 500);
        assert_eq!(bar_position(33_151, 1_000_000, s(20), s(20)), 1_000);
        assert_eq!(bar_position(750, 1_000, s(1), s(3_600)), 750);
        assert_eq!(
            bar_position(5_000, 1_000, s(1), s(20)),
            1_000,
            "never past the end"
        );
        assert_eq!(bar_position(0, 0, Duration::ZERO, Duration::ZERO), 0);
    }

    use super::*;

    fn spec(mix: &str, keys: &str) -> Spec {
        Spec {
            mix: Mix::parse(mix).expect("mix"),
            keys: Keys::parse(keys).expect("keys"),
            accounts: 100,
            claim_keys: 1000,
            amount_max: 10,
            seed: 7,
        }
    }

    #[test]
    fn same_seed_same_operations_and_keys_stay_in_range() {
        // Proves the generator is a function of the seed and slot, and that
        // every distribution stays in range and transfers name two accounts.
        for keys in ["uniform", "zipf:1.1", "hot:10", "hot:10:90"] {
            let s = spec("claim:1,debit-credit:2,transfer:1", keys);
            let mut a = Generator::new(&s, 3).expect("generator");
            let mut b = Generator::new(&s, 3).expect("generator");
            for _ in 0..2000 {
                let op = a.next_op();
                assert_eq!(op, b.next_op());
                match op {
                    Op::Credit { account, amount } | Op::Debit { account, amount } => {
                        assert!(account < 100 && (1..=10).contains(&amount));
                    }
                    Op::Claim { key, owner } => assert!(key < 1000 && owner < OWNERS),
                    Op::Transfer { from, to, .. } => assert!(from != to && from < 100 && to < 100),
                }
            }
        }
    }

    #[test]
    fn hot_keys_get_every_pick() {
        // Proves hot:10 sends every account pick to the first 10 accounts.
        let mut g = Generator::new(&spec("debit", "hot:10"), 0).expect("generator");
        for _ in 0..1000 {
            match g.next_op() {
                Op::Debit { account, .. } => assert!(account < 10),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn parsers_refuse_nonsense() {
        // Proves the knobs reject what they cannot mean.
        assert!(Mix::parse("nothing:1").is_err());
        assert!(Mix::parse("claim:0").is_err());
        assert!(Keys::parse("hot:1").is_err());
        assert!(Keys::parse("zipf:-1").is_err());
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("2h").is_err());
    }
}
