//! The table of a run and its JSON.

use std::fmt::Write as _;

use super::workload::{Stats, u64_f64};

/// One row: a system's name and what it measured, or why it did not run.
pub struct Row {
    /// `ceiling`, `PostgreSQL` or `amends`.
    pub system: &'static str,
    /// The measurement, or why there is none.
    pub result: Result<Stats, String>,
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
        "| system     |     ops/s | p50 ms | p99 ms | p99.9 ms | max ms | confirmed | refused | errors |"
    );
    let _ = writeln!(
        out,
        "| ---------- | --------: | -----: | -----: | -------: | -----: | --------: | ------: | -----: |"
    );
    for row in rows {
        match &row.result {
            Ok(s) => {
                let h = &s.latency_us;
                let _ = writeln!(
                    out,
                    "| {:<10} | {:>9.0} | {:>6.2} | {:>6.2} | {:>8.2} | {:>6.1} | {:>9} | {:>7} | {:>6} |",
                    row.system,
                    s.ops_per_s(),
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.value_at_quantile(0.999)),
                    ms(h.max()),
                    s.confirmed,
                    s.refused,
                    s.errors
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
