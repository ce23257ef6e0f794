//! Microbenchmark of the partition apply loop ([`Machine::apply`]) on a mixed
//! workload over a realistic state.
//!
//! Setup (not measured) opens [`ACCOUNTS`] accounts, credits each with
//! [`OPENING_BALANCE`] and makes [`CLAIMS`] claims, all through `apply`, so
//! the state also holds the dedup records of those operations. It then
//! generates a log of [`LOG_LEN`] decoded [`Input`]s with a seeded
//! generator: about 47% credits and debits, 16% holds and their posts or
//! voids (a third with a timeout, so holds expire), 27% claims and releases,
//! 5% duplicates of earlier operations, 5% refusals (insufficient funds,
//! already claimed), and a tick every [`TICK_EVERY`] messages. Log time
//! advances 1 ms per [`OPS_PER_MS`] messages; op ids are UUID v7 of the log
//! time, so the dedup window check passes with the default `Config`.
//!
//! Benchmarks (each iteration applies the whole log; throughput is reported
//! in log messages per second):
//!
//! - `apply/mem`: straight into a [`MemState`], the in-memory state view.
//! - `apply/overlay`: through an [`Overlay`] into a [`ChangeSet`], in
//!   batches of [`BATCH_LEN`], with [`MemState::absorb`] after each batch:
//!   what the store does, without its I/O.
//! - `baseline/hashmap_only`: as many get + write-back pairs on an
//!   `FxHashMap<AccountId, Account>` of the same accounts, with the same
//!   key shape: the data-structure floor.
//!
//! Each measured iteration starts from a fresh clone of the setup state and
//! applies the log a batch of [`BATCH_LEN`] messages at a time. Only the
//! application of each batch is timed (`iter_custom`): not the clone of the
//! state, not the drop of the final state, and not the untimed copy of each
//! batch out of the log that stands for decoding (it leaves the inputs hot
//! in the cache, as they are in the driver). Effects are cleared after
//! every batch, as a driver would after its commit, so dropping them and the
//! answers is measured.
//!
//! Run it with:
//!
//! ```text
//! cargo bench -p amends-core --bench apply
//! ```
//!
//! At the end it prints a summary (median and best ns per message and
//! messages per second over criterion's samples) and a census of the
//! workload's answers, to show the mix really is what it claims. Pin it to
//! one core on a busy machine, e.g.
//! `taskset -c 1 cargo bench -p amends-core --bench apply`.
//!
//! The state is over 100 MB of hash tables read and written at random
//! places, so the result depends on memory latency more than on the CPU:
//! with 4 KiB pages most lookups also miss the TLB. Where transparent huge
//! pages are in `madvise` mode, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` lets
//! the allocator ask for them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use amends_core::command::{AccountId, Amount, ClaimKey, Command, Namespace, Owner, Request};
use amends_core::partition::{Answer, Config, Effect, Input, Machine};
use amends_core::route::Partitions;
use amends_core::state::{Account, ChangeSet, MemState, Overlay};
use amends_core::{OpId, Outcome};
use criterion::{Criterion, SamplingMode, Throughput};
use rustc_hash::FxHashMap;

/// Accounts opened in setup.
const ACCOUNTS: u64 = 100_000;
/// Claims made in setup.
const CLAIMS: u64 = 100_000;
/// Distinct claim owners (so some owners hold several keys).
const OWNERS: u64 = 50_000;
/// Messages in the measured log.
const LOG_LEN: usize = 100_000;
/// Messages per millisecond of log time.
const OPS_PER_MS: u64 = 100;
/// Messages per store batch (the overlay benchmark's change-set size, and
/// how often effects are cleared).
const BATCH_LEN: usize = 256;
/// A tick every this many messages.
const TICK_EVERY: usize = 1_000;
/// The log time of the first setup message.
const START_MS: u64 = 1_700_000_000_000;
/// Every account's balance after setup: far above what the log debits, so
/// ordinary debits never run short.
const OPENING_BALANCE: u64 = 1_000_000_000;
/// A debit of this much is always refused with `insufficient_funds`.
const HUGE_AMOUNT: u64 = 1_000_000_000_000_000;
/// Duplicates repeat one of this many most recent messages.
const DUPLICATE_LOOKBACK: usize = 10_000;
/// The generator's seed.
const SEED: u64 = 0x5EED_A11E_D5C0_FFEE;
/// The claims namespace of the workload.
const NAMESPACE: &str = "username";

/// SplitMix64: a tiny, deterministic generator (no `rand` needed).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An index into a slice of `len` elements.
    fn index(&mut self, len: usize) -> usize {
        let len = u64::try_from(len).expect("usize fits u64");
        usize::try_from(self.below(len)).expect("index fits usize")
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

fn account_id(i: u64) -> AccountId {
    AccountId::new(format!("acct-{i:08}")).expect("valid account id")
}

fn claim_key(i: u64) -> ClaimKey {
    ClaimKey::new(format!("user-{i:08}")).expect("valid claim key")
}

fn owner(i: u64) -> Owner {
    Owner::new(format!("owner-{i:06}")).expect("valid owner")
}

fn amount(v: u64) -> Amount {
    Amount::new(v).expect("positive amount")
}

/// One message of the log, already decoded.
#[derive(Clone)]
struct Entry {
    position: u64,
    log_time_ms: u64,
    input: Input,
}

/// Hands out positions, log times and op ids in log order.
struct Log {
    entries: Vec<Entry>,
    /// Messages so far, setup included: sets position and log time.
    count: u64,
}

impl Log {
    fn log_time_ms(&self) -> u64 {
        START_MS + self.count / OPS_PER_MS
    }

    /// Appends `command` as a new operation and returns its op id.
    fn push(&mut self, command: Command) -> OpId {
        let op_id = OpId::v7_from_parts(self.log_time_ms(), u128::from(self.count));
        self.push_input(Input::Request(Request {
            op_id,
            command,
            apology_topic: None,
        }));
        op_id
    }

    fn push_input(&mut self, input: Input) {
        self.count += 1;
        let log_time_ms = START_MS + (self.count - 1) / OPS_PER_MS;
        self.entries.push(Entry {
            position: self.count,
            log_time_ms,
            input,
        });
    }
}

/// The prepared state and log.
struct Workload {
    machine: Machine,
    state: MemState,
    log: Vec<Entry>,
    /// For the baseline: the account each log message touches (a random
    /// one for messages that touch none), as owned ids like the commands'.
    baseline_keys: Vec<AccountId>,
    baseline_map: FxHashMap<AccountId, Account>,
}

impl Workload {
    fn new() -> Workload {
        let partitions = Partitions::new(1).expect("one partition");
        let partition = partitions.id(0).expect("partition 0");
        let machine = Machine::new(partition, partitions, Config::default());
        let mut rng = SplitMix(SEED);
        let mut log = Log {
            entries: Vec::new(),
            count: 0,
        };

        // Setup: accounts, their opening balances, claims.
        for i in 0..ACCOUNTS {
            log.push(Command::OpenAccount {
                account: account_id(i),
                floor: 0,
                ceiling: None,
            });
        }
        for i in 0..ACCOUNTS {
            log.push(Command::Credit {
                account: account_id(i),
                amount: amount(OPENING_BALANCE),
            });
        }
        // Live claims as (key, owner), for picking releases and refusals.
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        for k in 0..CLAIMS {
            let o = rng.below(OWNERS);
            log.push(Command::Claim {
                namespace: Namespace::new(NAMESPACE).expect("valid namespace"),
                key: claim_key(k),
                owner: owner(o),
            });
            claimed.push((k, o));
        }
        let mut state = MemState::new();
        let mut out = Vec::new();
        for e in &log.entries {
            machine
                .apply(&mut state, e.position, e.log_time_ms, &e.input, &mut out)
                .expect("setup positions advance");
            out.clear();
        }
        log.entries.clear();

        // The measured log.
        let namespace = Namespace::new(NAMESPACE).expect("valid namespace");
        let mut next_key = CLAIMS;
        // Pending holds as (hold id, account, expiry), for posts and voids.
        let mut pending: Vec<(OpId, u64, Option<u64>)> = Vec::new();
        let mut baseline_keys = Vec::with_capacity(LOG_LEN);
        for i in 0..LOG_LEN {
            let acct = rng.below(ACCOUNTS);
            baseline_keys.push(account_id(acct));
            if i % TICK_EVERY == TICK_EVERY - 1 {
                log.push(Command::Tick {});
                continue;
            }
            let now = log.log_time_ms();
            let roll = rng.below(1000);
            match roll {
                // Credits and debits: 47%.
                0..235 => {
                    log.push(Command::Credit {
                        account: account_id(acct),
                        amount: amount(rng.range(1, 1_000)),
                    });
                }
                235..470 => {
                    log.push(Command::Debit {
                        account: account_id(acct),
                        amount: amount(rng.range(1, 1_000)),
                    });
                }
                // Holds, then posts and voids: 16%.
                470..630 => {
                    // From 560: a post or void of a hold that has not expired
                    // yet (a new hold when there is none).
                    let mut target = None;
                    while roll >= 560 && !pending.is_empty() {
                        let (hold, a, expiry) = pending.swap_remove(rng.index(pending.len()));
                        if expiry.is_none_or(|x| x > now) {
                            target = Some((hold, a));
                            break;
                        }
                    }
                    if let Some((hold, a)) = target {
                        let account = account_id(a);
                        if rng.below(3) == 0 {
                            log.push(Command::Void { account, hold });
                        } else {
                            let amount = (rng.below(2) == 0).then(|| amount(1));
                            log.push(Command::Post {
                                account,
                                hold,
                                amount,
                            });
                        }
                    } else {
                        let timeout_ms = (rng.below(3) == 0).then(|| rng.range(20, 300));
                        let hold = log.push(Command::Hold {
                            account: account_id(acct),
                            amount: amount(rng.range(1, 1_000)),
                            timeout_ms,
                        });
                        pending.push((hold, acct, timeout_ms.map(|t| now + t)));
                    }
                }
                // Claims and releases: 27%.
                630..755 => {
                    let o = rng.below(OWNERS);
                    log.push(Command::Claim {
                        namespace: namespace.clone(),
                        key: claim_key(next_key),
                        owner: owner(o),
                    });
                    claimed.push((next_key, o));
                    next_key += 1;
                }
                755..860 => {
                    let (k, o) = claimed.swap_remove(rng.index(claimed.len()));
                    log.push(Command::Release {
                        namespace: namespace.clone(),
                        key: claim_key(k),
                        owner: owner(o),
                    });
                }
                860..900 => {
                    // The owner claims its key again: confirmed, no write.
                    let (k, o) = claimed[rng.index(claimed.len())];
                    log.push(Command::Claim {
                        namespace: namespace.clone(),
                        key: claim_key(k),
                        owner: owner(o),
                    });
                }
                // Duplicates of recent operations: 5%.
                900..950 => {
                    let recent = log.entries.len().min(DUPLICATE_LOOKBACK);
                    let earlier = (0..8).find_map(|_| {
                        let back = rng.index(recent.max(1)) + 1;
                        let e = log.entries.len().checked_sub(back)?;
                        match &log.entries[e].input {
                            Input::Request(Request {
                                command: Command::Tick {},
                                ..
                            }) => None,
                            input => Some(input.clone()),
                        }
                    });
                    match earlier {
                        Some(input) => log.push_input(input),
                        None => {
                            log.push(Command::Credit {
                                account: account_id(acct),
                                amount: amount(1),
                            });
                        }
                    }
                }
                // Refusals: 5%.
                950..975 => {
                    log.push(Command::Debit {
                        account: account_id(acct),
                        amount: amount(HUGE_AMOUNT),
                    });
                }
                _ => {
                    let (k, o) = claimed[rng.index(claimed.len())];
                    log.push(Command::Claim {
                        namespace: namespace.clone(),
                        key: claim_key(k),
                        owner: owner((o + 1) % OWNERS),
                    });
                }
            }
        }

        let baseline_map = state.accounts().map(|(id, a)| (id.clone(), *a)).collect();
        Workload {
            machine,
            state,
            log: log.entries,
            baseline_keys,
            baseline_map,
        }
    }

    /// Applies the whole log straight to `state`, a batch at a time, and
    /// returns the state and the time spent in [`Workload::apply_mem`].
    ///
    /// Each batch is copied out of the log first, untimed: that stands for
    /// decoding, which leaves the inputs fresh in the cache as they are in
    /// the driver. The copies are dropped untimed too.
    fn run_mem(&self, mut state: MemState, out: &mut Vec<Effect>) -> (MemState, Duration) {
        let mut spent = Duration::ZERO;
        let mut batch = Vec::with_capacity(BATCH_LEN);
        for chunk in self.log.chunks(BATCH_LEN) {
            batch.extend_from_slice(chunk);
            let start = Instant::now();
            self.apply_mem(&mut state, &batch, out);
            spent += start.elapsed();
            batch.clear();
        }
        (state, spent)
    }

    /// The measured work of `apply/mem` for one batch (not inlined, so a
    /// profiler can single it out).
    #[inline(never)]
    fn apply_mem(&self, state: &mut MemState, batch: &[Entry], out: &mut Vec<Effect>) {
        for e in batch {
            let answer = self
                .machine
                .apply(state, e.position, e.log_time_ms, &e.input, out)
                .expect("log positions advance");
            black_box(answer);
        }
        out.clear();
    }

    /// Applies the whole log through an overlay, absorbing every batch; as
    /// [`Workload::run_mem`] otherwise.
    fn run_overlay(
        &self,
        mut state: MemState,
        changes: &mut ChangeSet,
        out: &mut Vec<Effect>,
    ) -> (MemState, Duration) {
        let mut spent = Duration::ZERO;
        let mut batch = Vec::with_capacity(BATCH_LEN);
        for chunk in self.log.chunks(BATCH_LEN) {
            batch.extend_from_slice(chunk);
            let start = Instant::now();
            self.apply_overlay(&mut state, changes, &batch, out);
            spent += start.elapsed();
            batch.clear();
        }
        (state, spent)
    }

    /// The measured work of `apply/overlay` for one batch: apply into a
    /// change set, then commit it to the state.
    #[inline(never)]
    fn apply_overlay(
        &self,
        state: &mut MemState,
        changes: &mut ChangeSet,
        batch: &[Entry],
        out: &mut Vec<Effect>,
    ) {
        let mut view = Overlay::new(&*state, changes);
        for e in batch {
            let answer = self
                .machine
                .apply(&mut view, e.position, e.log_time_ms, &e.input, out)
                .expect("log positions advance");
            black_box(answer);
        }
        state.absorb(changes);
        out.clear();
    }

    /// As many account-map lookups and write-backs as the log has messages.
    fn run_baseline(&self, map: &mut FxHashMap<AccountId, Account>) {
        for id in &self.baseline_keys {
            if let Some(mut a) = map.get(id.as_str()).copied() {
                a.balance = a.balance.wrapping_add(1);
                if let Some(slot) = map.get_mut(id.as_str()) {
                    *slot = a;
                }
            }
        }
    }

    /// Applies the log once and counts what happened, to show the mix.
    fn census(&self) -> BTreeMap<String, usize> {
        let mut state = self.state.clone();
        let mut out = Vec::new();
        let mut counts = BTreeMap::new();
        for e in &self.log {
            let answer = self
                .machine
                .apply(&mut state, e.position, e.log_time_ms, &e.input, &mut out)
                .expect("log positions advance");
            let command = match &e.input {
                Input::Request(r) => r.command.kind(),
                Input::Malformed { .. } => "malformed",
            };
            let label = match &answer {
                Answer::Decided(d) => match &d.outcome {
                    Outcome::Confirmed { .. } => format!("{command}: confirmed"),
                    Outcome::Rejected { reason } => format!("{command}: {}", reason.code()),
                    Outcome::InFlight { .. } => format!("{command}: in flight"),
                },
                Answer::Duplicate(_) => "(duplicate)".to_owned(),
                Answer::Ticked => "(tick)".to_owned(),
                // Refusals answered to the sender only (not recorded).
                other => match other.decision().and_then(|d| d.outcome.reason()) {
                    Some(reason) => format!("{command}: {} (not recorded)", reason.code()),
                    None => "(other)".to_owned(),
                },
            };
            *counts.entry(label).or_insert(0) += 1;
            for effect in out.drain(..) {
                if let Effect::HoldExpired(_) = effect {
                    *counts.entry("(hold expired event)".to_owned()).or_insert(0) += 1;
                }
            }
        }
        counts
    }
}

/// Per-iteration times of every `iter_custom` call, by benchmark name. The
/// last `SAMPLE_SIZE` calls of a benchmark are criterion's samples.
type Samples = RefCell<BTreeMap<&'static str, Vec<f64>>>;

/// Criterion samples per benchmark.
const SAMPLE_SIZE: usize = 20;

fn record(samples: &Samples, name: &'static str, iters: u64, total: Duration) {
    let per_iter_ns =
        total.as_secs_f64() * 1e9 / f64::from(u32::try_from(iters).unwrap_or(u32::MAX));
    samples
        .borrow_mut()
        .entry(name)
        .or_default()
        .push(per_iter_ns);
}

fn benches(c: &mut Criterion, w: &Workload, samples: &Samples) {
    let n = u64::try_from(w.log.len()).expect("log length fits u64");

    let mut group = c.benchmark_group("apply");
    group
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(n));
    group.bench_function("mem", |b| {
        b.iter_custom(|iters| {
            let mut out = Vec::with_capacity(4 * BATCH_LEN);
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (state, spent) = w.run_mem(w.state.clone(), &mut out);
                total += spent;
                drop(black_box(state));
            }
            record(samples, "apply/mem", iters, total);
            total
        });
    });
    group.bench_function("overlay", |b| {
        b.iter_custom(|iters| {
            let mut out = Vec::with_capacity(4 * BATCH_LEN);
            let mut changes = ChangeSet::default();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (state, spent) = w.run_overlay(w.state.clone(), &mut changes, &mut out);
                total += spent;
                drop(black_box(state));
            }
            record(samples, "apply/overlay", iters, total);
            total
        });
    });
    group.finish();

    let mut group = c.benchmark_group("baseline");
    group
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(n));
    group.bench_function("hashmap_only", |b| {
        let mut map = w.baseline_map.clone();
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                w.run_baseline(&mut map);
            }
            let total = start.elapsed();
            record(samples, "baseline/hashmap_only", iters, total);
            total
        });
        black_box(&map);
    });
    group.finish();
}

fn summary(w: &Workload, samples: &Samples) {
    let n = f64::from(u32::try_from(w.log.len()).expect("log length fits u32"));
    println!();
    println!(
        "Summary: {} messages per iteration; median and best of the last {SAMPLE_SIZE} samples",
        w.log.len()
    );
    println!(
        "{:<24} {:>12} {:>14} {:>12} {:>14}",
        "benchmark", "median ns/op", "median ops/s", "best ns/op", "best ops/s"
    );
    for (name, per_iter) in samples.borrow().iter() {
        let mut last: Vec<f64> = per_iter[per_iter.len().saturating_sub(SAMPLE_SIZE)..].to_vec();
        last.sort_by(f64::total_cmp);
        let median = last[last.len() / 2] / n;
        let best = last[0] / n;
        println!(
            "{name:<24} {median:>12.1} {:>14.0} {best:>12.1} {:>14.0}",
            1e9 / median,
            1e9 / best
        );
    }
    println!();
    println!("Workload census (one pass of the log):");
    for (label, count) in w.census() {
        println!("  {label:<40} {count:>7}");
    }
}

fn main() {
    let setup = Instant::now();
    let w = Workload::new();
    let accounts = w.state.accounts().count();
    let claims = w.state.claims().count();
    let dedups = w.state.dedups().count();
    println!(
        "setup: {accounts} accounts, {claims} claims, {dedups} dedup records, {} log messages ({:.1?})",
        w.log.len(),
        setup.elapsed()
    );

    // The overlay path must end in the same state as the direct one.
    let mut out = Vec::new();
    let (direct, _) = w.run_mem(w.state.clone(), &mut out);
    let (overlaid, _) = w.run_overlay(w.state.clone(), &mut ChangeSet::default(), &mut out);
    assert!(
        direct == overlaid,
        "overlay and direct application diverged"
    );
    drop((direct, overlaid));

    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &w, &samples);
    c.final_summary();

    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--profile-time") {
        summary(&w, &samples);
    }
}
