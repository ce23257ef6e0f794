//! `amends-bench` end to end: the built binary starts its own nats-server,
//! a private PostgreSQL (initdb in a temporary directory) and `amends
//! serve` (the `amends` binary beside it, see [`ensure_amends`]),
//! drives all three with a short bounded workload, and reports a nonzero
//! throughput for each, in its table and its JSON.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What to install when the run fails for want of a server.
const HINT: &str = "needs nats-server (scripts/setup) and PostgreSQL's initdb/postgres/pg_ctl on PATH or in /usr/lib/postgresql/<v>/bin (scripts/setup installs it: apt-get install postgresql)";

/// Makes sure the `amends` binary is where the bench looks for it, beside
/// the `amends-bench` under test. A workspace run (`scripts/test`) has
/// built it already, and then it is left alone: rebuilding it here with
/// this package's features would replace the file while other tests run
/// it. A run of this package alone (`cargo nextest run -p amends-bench`)
/// builds no other package's binary, so a missing one is built here (same
/// target directory and profile); one left by an earlier build is used as
/// it is.
fn ensure_amends(bench: &Path) {
    let profile_dir = bench.parent().unwrap();
    if profile_dir
        .join(format!("amends{}", std::env::consts::EXE_SUFFIX))
        .is_file()
    {
        return;
    }
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        other => other,
    };
    let out = Command::new(env!("CARGO"))
        .args([
            "build", "--locked", "--quiet", "-p", "amends", "--bin", "amends",
        ])
        .args(["--profile", profile])
        .arg("--target-dir")
        .arg(profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo build -p amends failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the bench built for this test with `args` and `--json` into a
/// temporary file; asserts that it succeeded and returns its stdout and
/// its JSON.
fn run_bench(args: &[&str]) -> (String, serde_json::Value) {
    let bench = Path::new(env!("CARGO_BIN_EXE_amends-bench"));
    ensure_amends(bench);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(bench)
        .args(args)
        .arg("--json")
        .arg(&json)
        .env_remove("AMENDS_BENCH_POSTGRES_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "amends-bench failed ({HINT}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let doc = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stdout, doc)
}

#[test]
fn bench_runs_ceiling_postgres_and_amends() {
    // Proves one short run measures all three systems: each row of the table
    // and of the JSON has answers, a nonzero throughput and CPU figures,
    // and the run is quick (bounded by --duration and --count).
    let started = Instant::now();
    let (stdout, doc) = run_bench(&[
        "--duration",
        "2s",
        "--count",
        "500",
        "--mix",
        "claim:1,debit-credit:2",
        "--accounts",
        "50",
        "--clients",
        "2",
        "--in-flight",
        "8",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    for system in ["ceiling", "PostgreSQL", "amends"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {system} ")))
            .unwrap_or_else(|| panic!("no {system} row in:\n{stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let ops: f64 = cells[2].parse().unwrap_or_else(|_| panic!("row {row}"));
        assert!(ops > 0.0, "{system}: zero throughput in {row}");
        let errors: u64 = cells[9].parse().unwrap();
        assert_eq!(errors, 0, "{system} had errors:\n{stdout}");
        // Every system's CPU is measured. The bench's, and the servers of
        // the ceiling and amends (few processes, busy), must have counted
        // some; PostgreSQL spreads 500 small operations over 16 backends,
        // each counted in whole clock ticks (10 ms), so its sum may round
        // down to nothing on a run this short.
        for (cell, what) in [(10, "server"), (11, "bench")] {
            let ms: f64 = cells[cell]
                .parse()
                .unwrap_or_else(|_| panic!("{system}: no {what} CPU in {row}"));
            if system != "PostgreSQL" || what == "bench" {
                assert!(ms > 0.0, "{system}: no {what} CPU counted in {row}");
            }
        }
    }
    assert!(stdout.contains("amends/ceiling: "), "{stdout}");
    assert!(
        stdout.contains("amends server CPU per 1,000 answered operations: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("amends serve resident memory: "),
        "{stdout}"
    );

    let systems = doc["systems"].as_array().unwrap();
    assert_eq!(systems.len(), 3, "{doc}");
    for s in systems {
        assert!(s["ops_per_s"].as_f64().unwrap() > 0.0, "{s}");
        let answers = s["confirmed"].as_u64().unwrap() + s["refused"].as_u64().unwrap();
        assert_eq!(answers, 500, "every submitted operation answered: {s}");
        assert!(s["latency_us"]["p99"].as_u64().unwrap() > 0, "{s}");
        // The servers' CPU may round down to nothing for PostgreSQL on a
        // run this short (see above); it must be there all the same.
        assert!(s["cpu_ms"]["server"].is_number(), "{s}");
        assert!(
            s["cpu_ms_per_1k_ops"]["bench"].as_f64().unwrap() > 0.0,
            "{s}"
        );
    }
    assert!(
        doc["amends_memory_kib"]["vm_hwm"].as_u64().unwrap() > 0,
        "{doc}"
    );
}

#[test]
fn repeated_runs_end_with_the_median_and_range_of_each_figure() {
    // Proves --repeat 2 runs the comparison twice, each run with its own
    // table, then a summary with each system's median and range and the
    // ratios' median and range, and that the JSON holds both runs and the
    // summary.
    let (stdout, doc) = run_bench(&[
        "--duration",
        "1s",
        "--count",
        "200",
        "--accounts",
        "20",
        "--clients",
        "2",
        "--in-flight",
        "4",
        "--systems",
        "ceiling,amends",
        "--repeat",
        "2",
    ]);
    assert!(stdout.contains("run 1 of 2:"), "{stdout}");
    assert!(stdout.contains("run 2 of 2:"), "{stdout}");
    let summary = stdout
        .split("median of 2 runs (min-max):")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary in:\n{stdout}"));
    for system in ["ceiling", "amends"] {
        let row = summary
            .lines()
            .find(|l| l.starts_with(&format!("| {system} ")))
            .unwrap_or_else(|| panic!("no {system} row in the summary:\n{summary}"));
        // `median (min-max)` in each of the four figures.
        assert_eq!(row.matches('(').count(), 4, "{row}");
    }
    assert!(summary.contains("amends/ceiling: "), "{summary}");

    assert_eq!(doc["runs"].as_array().unwrap().len(), 2, "{doc}");
    let summary = &doc["summary"];
    assert_eq!(summary["runs"], 2, "{summary}");
    for s in summary["systems"].as_array().unwrap() {
        let ops = &s["ops_per_s"];
        let (min, median, max) = (
            ops["min"].as_f64().unwrap(),
            ops["median"].as_f64().unwrap(),
            ops["max"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= median && median <= max, "{s}");
    }
    assert!(
        summary["amends_over_ceiling"]["median"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
}
