//! The crash test: a child process applies a generated log to a store in
//! batches and is killed with SIGKILL at random moments; every restart
//! resumes from the store's applied position. The log holds dead letters
//! too, which reach the outbox like every other effect. Written against
//! [`PartitionStore`] (see [`TestEngine`]): a second engine runs it with a
//! test of its own name that calls [`sigkill_run`] for itself.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amends_core::state::Read;
use amends_store::{Durability, OutboxSeq, PartitionStore};

use crate::support::{self, Msg, Rng, Runner, Sled, TestEngine};

/// Set in the child's environment: the directory to work in.
const CHILD_DIR_ENV: &str = "AMENDS_STORE_CRASH_CHILD_DIR";
/// Overrides the seed (printed by every run).
const SEED_ENV: &str = "AMENDS_STORE_CRASH_SEED";
const SEED_DEFAULT: u64 = 0x5eed_c4a5_4000_0001;
/// The log's length: tens of thousands of messages.
const LOG_LEN: usize = 24_000;
/// How many times the child is killed, at least.
const KILLS_MIN: usize = 40;
/// The longest wait before a kill, from the child's `ready` line: short
/// enough that the log outlasts `KILLS_MIN` kills in a debug build, long
/// enough that runs get work done (shrunk on faster machines).
const KILL_AFTER_MS_MAX: u64 = 200;
/// How often the kill comes at a random moment from the start instead,
/// to hit recovery and re-publishing too.
const KILL_DURING_RECOVERY_PERCENT: u64 = 20;
/// The largest batch the child commits at once.
const BATCH_LEN_MAX: u64 = 200;
/// How many outbox entries the child re-publishes at a time on start.
const REPUBLISH_PAGE: usize = 256;

fn seed() -> u64 {
    std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED_DEFAULT)
}

#[test]
fn sigkill_at_random_moments_changes_nothing() {
    // Proves that a partition on sled killed at any instruction
    // (mid-batch, mid-commit, mid-publish, mid-compaction, mid-recovery)
    // and restarted from its store ends in the same state, with the same
    // decisions and the same outbox, as an uninterrupted run: nothing
    // lost, nothing doubled. The child re-executes this test binary.
    sigkill_run::<Sled>("crash::sigkill_at_random_moments_changes_nothing");
}

/// The crash test on engine `E`, run by the test `test_name` (the child
/// re-executes the binary with it).
fn sigkill_run<E: TestEngine>(test_name: &str) {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        child::<E>(Path::new(&dir), seed());
        return;
    }
    let seed = seed();
    eprintln!("crash test: seed {seed} (set {SEED_ENV} to replay)");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(seed ^ 0x00c0_ffee);
    let started = Instant::now();

    let mut kills = 0;
    let mut runs = 0;
    let mut last = Ready::default();
    let mut published_end = 0;
    // Shrunk when runs progress faster than the log can afford (a fast
    // machine, an optimized build), so that `KILLS_MIN` kills always fit.
    let mut kill_after_ms_max = KILL_AFTER_MS_MAX;
    let progress_per_run_max = u64::try_from(LOG_LEN / 2 / KILLS_MIN).expect("fits");
    loop {
        runs += 1;
        let mut child = spawn(dir.path(), runs, test_name);
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let during_recovery = rng.percent(KILL_DURING_RECOVERY_PERCENT);
        if !during_recovery {
            let ready = read_ready(&mut stdout).unwrap_or_else(|| {
                let status = child.wait().expect("wait for child");
                panic!(
                    "child run {runs} died before ready: {status}\n{}",
                    stderr_of(dir.path(), runs)
                )
            });
            check_resume(&last, &ready, published_end, runs);
            let progress = ready.position - last.position;
            if progress > progress_per_run_max {
                kill_after_ms_max = (kill_after_ms_max * progress_per_run_max / progress).max(2);
            }
            last = ready;
        }
        if kills >= KILLS_MIN && !during_recovery {
            let status = child.wait().expect("wait for child");
            assert!(
                status.success(),
                "child failed: {status}; {}",
                stderr_of(dir.path(), runs)
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, kill_after_ms_max)));
        if let Some(status) = child.try_wait().expect("poll child") {
            assert!(
                status.success(),
                "child failed: {status}; {}",
                stderr_of(dir.path(), runs)
            );
            // It finished before the kill: the log was too short for this
            // machine, which the assertion below reports.
            break;
        }
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("reap child");
        check_killed(dir.path(), runs, &status);
        kills += 1;
        if during_recovery && let Some(ready) = read_ready(&mut stdout) {
            check_resume(&last, &ready, published_end, runs);
            last = ready;
        }
        published_end = published_end.max(published_len(dir.path()));
    }
    eprintln!(
        "crash test: {kills} kills in {runs} runs, last resume at position {}, {:?}",
        last.position,
        started.elapsed()
    );
    assert!(
        kills >= KILLS_MIN,
        "the child finished after only {kills} kills; lengthen LOG_LEN (seed {seed})"
    );
    assert!(
        last.position > u64::try_from(LOG_LEN / 20).expect("fits"),
        "the kills left too little for the last run to prove anything"
    );
    verify::<E>(dir.path(), seed);
}

/// What a child reports once its store is open: where it resumes.
#[derive(Clone, Copy, Debug, Default)]
struct Ready {
    position: u64,
    outbox_end: u64,
}

/// Reads lines of the child's stdout (libtest prints its own) up to the
/// `ready` line; `None` if the child died first.
fn read_ready(stdout: &mut impl BufRead) -> Option<Ready> {
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).expect("read child stdout") == 0 {
            return None;
        }
        // libtest may have printed the test's name on the same line.
        if let Some((_, rest)) = line.trim_end().split_once("ready ") {
            let (p, o) = rest.split_once(' ').expect("ready POSITION OUTBOX_END");
            return Some(Ready {
                position: p.parse().expect("position"),
                outbox_end: o.parse().expect("outbox end"),
            });
        }
    }
}

/// A restart never resumes before a durable commit: the applied position
/// never goes back, and every effect already published is in the store's
/// outbox (published only after its commit was durable).
fn check_resume(last: &Ready, now: &Ready, published_end: u64, run: usize) {
    assert!(
        now.position >= last.position,
        "run {run} resumed at position {} after an earlier run had reached {}",
        now.position,
        last.position
    );
    assert!(
        now.outbox_end >= published_end,
        "run {run}: outbox entries up to {published_end} were published, but the store only has {}",
        now.outbox_end
    );
}

/// One past the highest outbox entry in the published file.
fn published_len(dir: &Path) -> u64 {
    let Ok(file) = File::open(published_path(dir)) else {
        return 0;
    };
    BufReader::new(file)
        .split(b'\n')
        .filter_map(|line| {
            let line = line.expect("read published");
            let seq = line.split(|b| *b == b'\t').next()?;
            std::str::from_utf8(seq).ok()?.parse::<u64>().ok()
        })
        .map(|seq| seq + 1)
        .max()
        .unwrap_or(0)
}

fn spawn(dir: &Path, run: usize, test_name: &str) -> std::process::Child {
    let stderr = File::create(dir.join(format!("child-{run}.stderr"))).expect("stderr file");
    Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(SEED_ENV, seed().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn child")
}

fn stderr_of(dir: &Path, run: usize) -> String {
    std::fs::read_to_string(dir.join(format!("child-{run}.stderr"))).unwrap_or_default()
}

/// A killed child is fine; one that exited on its own with a failure (a
/// panic, a failed commit) is not.
fn check_killed(dir: &Path, run: usize, status: &std::process::ExitStatus) {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "child run {run} failed on its own: {status}\n{}",
            stderr_of(dir, run)
        );
    }
    #[cfg(not(unix))]
    let _ = (dir, run, status);
}

fn published_path(dir: &Path) -> PathBuf {
    dir.join("published.tsv")
}

/// The child: resume from the store, re-publish what was committed but not
/// confirmed, then apply the rest of the log in batches, publishing after
/// each durable commit; compaction runs on another thread throughout.
fn child<E: TestEngine>(dir: &Path, seed: u64) {
    let log = support::generate(seed, LOG_LEN);
    let (_store, p) = support::open_on::<E>(&dir.join("db"), Durability::Fsync);
    let mut out = Publisher::open(&published_path(dir));
    let head = p.head().expect("head");
    println!("ready {} {}", head.clock.position, head.outbox_end);

    // Re-publish committed, unconfirmed entries first (at least once).
    loop {
        let page = p
            .outbox_read(OutboxSeq(0), REPUBLISH_PAGE)
            .expect("outbox read");
        let Some((last, _)) = page.last() else { break };
        let last = *last;
        for (seq, e) in &page {
            out.line(*seq, e);
        }
        out.sync();
        p.outbox_confirm(OutboxSeq(last.0 + 1)).expect("confirm");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let compactor = {
        let (p, stop) = (p.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let head = p.head().expect("head");
                let h = support::config().compaction_horizon_ms(head.clock.log_time_ms);
                p.compact(h).expect("compact");
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let mut runner = Runner::new();
    let applied = p.clock().expect("read the clock").position;
    let mut rng = Rng::new(seed ^ applied);
    let mut next = usize::try_from(applied).expect("position fits usize");
    while next < log.len() {
        let len = usize::try_from(rng.range(1, BATCH_LEN_MAX)).expect("small");
        let batch: &[Msg] = &log[next..(next + len).min(log.len())];
        let (range, effects) = runner.batch(&p, batch);
        for (seq, e) in (range.start.0..).zip(&effects) {
            out.line(OutboxSeq(seq), e);
        }
        out.sync();
        p.outbox_confirm(range.end).expect("confirm");
        next += batch.len();
    }
    stop.store(true, Ordering::Relaxed);
    compactor.join().expect("compactor thread");
}

/// Appends published effects to a file, one line each, and syncs it: the
/// stand-in for an idempotent publish to the decisions stream.
struct Publisher {
    file: File,
}

impl Publisher {
    fn open(path: &Path) -> Publisher {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .expect("open");
        // A kill mid-write leaves a torn last line: cut it off.
        let text = std::fs::read(path).expect("read published");
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        file.set_len(u64::try_from(whole).expect("fits"))
            .expect("truncate torn line");
        Publisher { file }
    }

    fn line(&mut self, seq: OutboxSeq, e: &amends_core::partition::Effect) {
        let (kind, id, json) = support::published(e);
        writeln!(self.file, "{seq}\t{kind}\t{id}\t{json}").expect("publish");
    }

    fn sync(&mut self) {
        self.file.sync_data().expect("fsync published");
    }
}

/// Compares the killed-and-restarted run with an uninterrupted one in
/// memory.
fn verify<E: TestEngine>(dir: &Path, seed: u64) {
    let log = support::generate(seed, LOG_LEN);
    let (mut mem, effects) = support::reference(&log);
    // Dead letters are outbox entries like any other: a kill between their
    // commit and their publication must not lose them either.
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, amends_core::partition::Effect::DeadLetter(_))),
        "the log makes dead-letter outbox entries"
    );
    let (_store, p) = support::open_on::<E>(&dir.join("db"), Durability::Fsync);

    // Every effect published, in order, exactly once after dropping
    // repeats; a repeat is byte-identical to the first publication.
    let file = File::open(published_path(dir)).expect("published file");
    let mut firsts: Vec<(u64, String)> = Vec::new();
    let mut repeats = 0;
    for line in BufReader::new(file).lines() {
        let line = line.expect("read line");
        let (seq, rest) = line.split_once('\t').expect("seq column");
        let seq: u64 = seq.parse().expect("seq is a number");
        let expected_next = u64::try_from(firsts.len()).expect("fits");
        if seq < expected_next {
            let first = &firsts[usize::try_from(seq).expect("fits")].1;
            assert_eq!(first, rest, "entry {seq} was re-published differently");
            repeats += 1;
        } else {
            assert_eq!(
                seq, expected_next,
                "outbox entry {expected_next} was never published"
            );
            firsts.push((seq, rest.to_owned()));
        }
    }
    eprintln!(
        "crash test: {} effects published, {repeats} re-published",
        firsts.len()
    );
    assert_eq!(firsts.len(), effects.len(), "published effects count");
    for ((seq, got), e) in firsts.iter().zip(&effects) {
        let (kind, id, json) = support::published(e);
        assert_eq!(got, &format!("{kind}\t{id}\t{json}"), "outbox entry {seq}");
    }
    assert_eq!(
        p.outbox_end().expect("end").0,
        u64::try_from(effects.len()).expect("fits")
    );
    assert_eq!(
        p.outbox_confirmed().expect("confirmed"),
        p.outbox_end().expect("end")
    );

    // The same state, every decision included, once both are compacted to
    // the final horizon.
    let h = support::horizon(&mem);
    p.compact(h).expect("compact");
    mem.compact(h);
    let stored = p.to_mem_state().expect("decode store");
    support::check_invariants(&stored);
    support::assert_same_state(&stored, &mem, "after kills vs uninterrupted");
}
