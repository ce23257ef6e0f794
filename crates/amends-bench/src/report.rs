//! The table of a run and its JSON.

use std::fmt::Write as _;

use super::cpu::Cpu;
use super::workload::{Stats, u64_f64};

/// One row: a system's name and what it measured, or why it did not run.
pub struct Row {
    /// `ceiling`, `PostgreSQL` or `amends`.
    pub system: &'static str,
    /// The measurement, or why there is none.
    pub result: Result<Stats, String>,
    /// The CPU time its processes and the bench spent during the run
    /// (none for a PostgreSQL given by URL: its processes are not ours to
    /// read).
    pub cpu: Option<Cpu>,
}

impl Row {
    /// Answered operations (confirmed + refused).
    fn answered(&self) -> Option<u64> {
        self.result.as_ref().ok().map(|s| s.confirmed + s.refused)
    }

    /// Server and bench CPU milliseconds per 1,000 answered operations.
    fn cpu_per_1k(&self) -> Option<(f64, f64)> {
        let (cpu, n) = (self.cpu?, self.answered()?);
        Some((cpu.server_per_1k(n), cpu.bench_per_1k(n)))
    }
}

/// The two CPU cells of a row.
fn cpu_cells(row: &Row) -> (String, String) {
    match row.cpu_per_1k() {
        Some((server, bench)) => (format!("{server:.0}"), format!("{bench:.0}")),
        None => ("n/a".to_owned(), "n/a".to_owned()),
    }
}

fn ms(us: u64) -> f64 {
    u64_f64(us) / 1000.0
}

fn ops(row: &Row) -> Option<f64> {
    row.result.as_ref().ok().map(Stats::ops_per_s)
}

/// The ratio of two throughputs, as text.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".to_owned(),
    }
}

fn find<'a>(rows: &'a [Row], system: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.system == system)
}

/// The table: one line per system, then the ratios, the service's memory
/// and `notes`.
pub fn table(rows: &[Row], memory: Option<(u64, u64, u64)>, notes: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| system     |     ops/s | p50 ms | p99 ms | p99.9 ms | max ms | confirmed | refused | errors | server CPU ms/1k ops | bench CPU ms/1k ops |"
    );
    let _ = writeln!(
        out,
        "| ---------- | --------: | -----: | -----: | -------: | -----: | --------: | ------: | -----: | -------------------: | ------------------: |"
    );
    for row in rows {
        match &row.result {
            Ok(s) => {
                let h = &s.latency_us;
                let (server_cpu, bench_cpu) = cpu_cells(row);
                let _ = writeln!(
                    out,
                    "| {:<10} | {:>9.0} | {:>6.2} | {:>6.2} | {:>8.2} | {:>6.1} | {:>9} | {:>7} | {:>6} | {:>20} | {:>19} |",
                    row.system,
                    s.ops_per_s(),
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.value_at_quantile(0.999)),
                    ms(h.max()),
                    s.confirmed,
                    s.refused,
                    s.errors,
                    server_cpu,
                    bench_cpu
                );
            }
            Err(why) => {
                let _ = writeln!(out, "| {:<10} | n/a: {why}", row.system);
            }
        }
    }
    let amends = find(rows, "amends").and_then(ops);
    let _ = writeln!(
        out,
        "\namends/ceiling: {}   amends/PostgreSQL: {}",
        ratio(amends, find(rows, "ceiling").and_then(ops)),
        ratio(amends, find(rows, "PostgreSQL").and_then(ops))
    );
    if let Some((during, after, hwm)) = memory {
        let _ = writeln!(
            out,
            "amends serve resident memory: {:.1} MiB peak VmRSS during the run, {:.1} MiB after, VmHWM {:.1} MiB",
            u64_f64(during) / 1024.0,
            u64_f64(after) / 1024.0,
            u64_f64(hwm) / 1024.0
        );
    }
    for note in notes {
        let _ = writeln!(out, "{note}");
    }
    for row in rows {
        if let Ok(s) = &row.result
            && !s.error_samples.is_empty()
        {
            let _ = writeln!(out, "{} errors, first ones:", row.system);
            for e in &s.error_samples {
                let _ = writeln!(out, "  {e}");
            }
        }
    }
    out
}

/// The JSON of a run: its settings and each system's numbers.
pub fn json(
    settings: serde_json::Value,
    rows: &[Row],
    memory: Option<(u64, u64, u64)>,
    notes: &[String],
) -> serde_json::Value {
    let systems: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| match &row.result {
            Ok(s) => {
                let h = &s.latency_us;
                serde_json::json!({
                    "system": row.system,
                    "ops_per_s": s.ops_per_s(),
                    "confirmed": s.confirmed,
                    "refused": s.refused,
                    "errors": s.errors,
                    "elapsed_s": s.elapsed.as_secs_f64(),
                    "latency_us": {
                        "p50": h.value_at_quantile(0.5),
                        "p99": h.value_at_quantile(0.99),
                        "p999": h.value_at_quantile(0.999),
                        "max": h.max(),
                        "mean": h.mean(),
                    },
                    "cpu_ms": row.cpu.map(|c| serde_json::json!({
                        "server": c.server_ms,
                        "bench": c.bench_ms,
                    })),
                    "cpu_ms_per_1k_ops": row.cpu_per_1k().map(|(server, bench)| serde_json::json!({
                        "server": server,
                        "bench": bench,
                    })),
                })
            }
            Err(why) => serde_json::json!({"system": row.system, "skipped": why}),
        })
        .collect();
    let amends = find(rows, "amends").and_then(ops);
    serde_json::json!({
        "settings": settings,
        "systems": systems,
        "ratios": {
            "amends_over_ceiling": ratio(amends, find(rows, "ceiling").and_then(ops)),
            "amends_over_postgres": ratio(amends, find(rows, "PostgreSQL").and_then(ops)),
        },
        "notes": notes,
        "amends_memory_kib": memory.map(|(during, after, hwm)| serde_json::json!({
            "vm_rss_peak_during": during,
            "vm_rss_after": after,
            "vm_hwm": hwm,
        })),
    })
}

/// The median of `values` and their range, or none for no values.
fn spread(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    };
    Some((median, values[0], values[n - 1]))
}

/// The summed-up figures of one system over several runs: each figure's
/// `(median, min, max)`, none where no run had it.
struct SystemSummary {
    system: &'static str,
    ops_per_s: Option<(f64, f64, f64)>,
    p99_ms: Option<(f64, f64, f64)>,
    server_cpu: Option<(f64, f64, f64)>,
    bench_cpu: Option<(f64, f64, f64)>,
}

/// Per system, in the order of the first run, the spread of each figure.
fn systems(runs: &[Vec<Row>]) -> Vec<SystemSummary> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|row| {
            let system = row.system;
            let each = |f: &dyn Fn(&Row) -> Option<f64>| {
                spread(
                    runs.iter()
                        .filter_map(|rows| find(rows, system).and_then(f))
                        .collect(),
                )
            };
            SystemSummary {
                system,
                ops_per_s: each(&ops),
                p99_ms: each(&p99_ms),
                server_cpu: each(&|r| r.cpu_per_1k().map(|c| c.0)),
                bench_cpu: each(&|r| r.cpu_per_1k().map(|c| c.1)),
            }
        })
        .collect()
}

fn p99_ms(row: &Row) -> Option<f64> {
    row.result
        .as_ref()
        .ok()
        .map(|s| ms(s.latency_us.value_at_quantile(0.99)))
}

/// The spread of each run's same-run ratio of amends to `system`.
fn ratios(runs: &[Vec<Row>], system: &str) -> Option<(f64, f64, f64)> {
    spread(
        runs.iter()
            .filter_map(|rows| {
                let amends = find(rows, "amends").and_then(ops)?;
                let other = find(rows, system).and_then(ops)?;
                (other > 0.0).then(|| amends / other)
            })
            .collect(),
    )
}

/// `median (min-max)` with `decimals` decimals, or `n/a`.
fn spread_cell(spread: Option<(f64, f64, f64)>, decimals: usize) -> String {
    match spread {
        Some((m, lo, hi)) => format!("{m:.decimals$} ({lo:.decimals$}-{hi:.decimals$})"),
        None => "n/a".to_owned(),
    }
}

/// A spread as JSON: `{"median","min","max"}`, or null.
fn spread_json(spread: Option<(f64, f64, f64)>) -> serde_json::Value {
    spread.map_or(
        serde_json::Value::Null,
        |(median, min, max)| serde_json::json!({"median": median, "min": min, "max": max}),
    )
}

/// The summary of several runs of the same bench: per system the median
/// and range of throughput, p99 and CPU per operation, then the median and
/// range of the same-run ratios.
pub fn summary(runs: &[Vec<Row>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "median of {} runs (min-max):", runs.len());
    let _ = writeln!(
        out,
        "| system     | ops/s | p99 ms | server CPU ms/1k ops | bench CPU ms/1k ops |"
    );
    let _ = writeln!(out, "| ---------- | ----: | -----: | ---: | ---: |");
    for s in systems(runs) {
        let _ = writeln!(
            out,
            "| {:<10} | {} | {} | {} | {} |",
            s.system,
            spread_cell(s.ops_per_s, 0),
            spread_cell(s.p99_ms, 2),
            spread_cell(s.server_cpu, 0),
            spread_cell(s.bench_cpu, 0),
        );
    }
    let _ = writeln!(
        out,
        "\namends/ceiling: {}   amends/PostgreSQL: {}",
        spread_cell(ratios(runs, "ceiling"), 2),
        spread_cell(ratios(runs, "PostgreSQL"), 2)
    );
    out
}

/// The JSON of [`summary`].
pub fn summary_json(runs: &[Vec<Row>]) -> serde_json::Value {
    let systems: Vec<serde_json::Value> = systems(runs)
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "system": s.system,
                "ops_per_s": spread_json(s.ops_per_s),
                "p99_ms": spread_json(s.p99_ms),
                "server_cpu_ms_per_1k_ops": spread_json(s.server_cpu),
                "bench_cpu_ms_per_1k_ops": spread_json(s.bench_cpu),
            })
        })
        .collect();
    serde_json::json!({
        "runs": runs.len(),
        "systems": systems,
        "amends_over_ceiling": spread_json(ratios(runs, "ceiling")),
        "amends_over_postgres": spread_json(ratios(runs, "PostgreSQL")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spread_is_the_median_and_the_range() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(vec![]), None);
        assert_eq!(
            spread_cell(spread(vec![0.871, 0.64, 1.11]), 2),
            "0.87 (0.64-1.11)"
        );
    }
}
