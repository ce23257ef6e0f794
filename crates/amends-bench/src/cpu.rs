//! CPU time of the processes each system runs on, from `/proc` (Linux).
//!
//! On a machine where the bench, nats-server and the system under test
//! share two cores, throughput moves with whatever else the host is doing;
//! the CPU each system spends per answered operation moves much less. A
//! [`Meter`] reads the user + system time of the system's server processes
//! and of the bench process itself before and after a run; the difference
//! per 1,000 answered operations is what the table reports.
//!
//! A server process is counted with its descendants, live (their own
//! times) or already reaped (the `cutime`/`cstime` of their parent), so a
//! PostgreSQL postmaster counts every backend it forked. The bench process
//! is counted alone: its children are the servers.
//!
//! The kernel reports each process's time in clock ticks (10 ms), so a
//! reading is up to a tick short per process: over a run of seconds this
//! is a few per cent for PostgreSQL's backends (one process per
//! connection) and nothing to speak of for nats-server or `amends serve`;
//! over a run of a few hundred operations it can be most of the figure.

use anyhow::Context as _;
use procfs::process::{Process, all_processes};

/// Milliseconds of CPU time of one measured stretch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cpu {
    /// The system's server processes: nats-server for the ceiling;
    /// nats-server and `amends serve` for amends; the PostgreSQL server
    /// and its backends for PostgreSQL.
    pub server_ms: f64,
    /// The bench process: the clients (and, for the ceiling, its pull
    /// consumers and deciders, which run inside the bench).
    pub bench_ms: f64,
}

impl Cpu {
    /// Milliseconds of server CPU per 1,000 of `answered` operations.
    pub fn server_per_1k(&self, answered: u64) -> f64 {
        per_1k(self.server_ms, answered)
    }

    /// Milliseconds of bench CPU per 1,000 of `answered` operations.
    pub fn bench_per_1k(&self, answered: u64) -> f64 {
        per_1k(self.bench_ms, answered)
    }
}

fn per_1k(ms: f64, answered: u64) -> f64 {
    if answered == 0 {
        0.0
    } else {
        ms * 1000.0 / super::workload::u64_f64(answered)
    }
}

/// A measurement in progress: the readings at its start.
pub struct Meter {
    servers: Vec<u32>,
    server_start: f64,
    bench_start: f64,
}

impl Meter {
    /// Starts measuring the processes `servers` (each with its
    /// descendants) and the bench process.
    pub fn start(servers: &[u32]) -> anyhow::Result<Meter> {
        Ok(Meter {
            servers: servers.to_vec(),
            server_start: trees_ms(servers)?,
            bench_start: own_ms(std::process::id())?,
        })
    }

    /// The CPU time spent since [`Meter::start`].
    pub fn finish(self) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            server_ms: (trees_ms(&self.servers)? - self.server_start).max(0.0),
            bench_ms: (own_ms(std::process::id())? - self.bench_start).max(0.0),
        })
    }
}

fn ticks_to_ms(ticks: u64) -> f64 {
    // Clock ticks per second: 100 on every Linux this runs on, read
    // rather than assumed.
    let hz = procfs::ticks_per_second().max(1);
    super::workload::u64_f64(ticks) * 1000.0 / super::workload::u64_f64(hz)
}

/// User + system time of process `pid` alone.
pub fn own_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = process(pid)?
        .stat()
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(ticks_to_ms(stat.utime.saturating_add(stat.stime)))
}

/// User + system time of the processes `roots` and of all their
/// descendants, live or reaped.
pub fn trees_ms(roots: &[u32]) -> anyhow::Result<f64> {
    // (pid, parent, ticks with reaped children) of every process now.
    let mut table = Vec::new();
    for p in all_processes().context("listing /proc")? {
        // A process may exit between the listing and the read.
        let Ok(stat) = p.and_then(|p| p.stat()) else {
            continue;
        };
        let reaped = u64::try_from(stat.cutime.saturating_add(stat.cstime)).unwrap_or(0);
        let ticks = stat.utime.saturating_add(stat.stime).saturating_add(reaped);
        table.push((stat.pid, stat.ppid, ticks));
    }
    let mut counted: Vec<i32> = Vec::new();
    let mut frontier: Vec<i32> = Vec::new();
    for &root in roots {
        let root = i32::try_from(root).context("a pid beyond i32")?;
        // The roots must exist: a system whose server is gone measured
        // nothing.
        process(root.unsigned_abs())?;
        frontier.push(root);
    }
    while let Some(pid) = frontier.pop() {
        if counted.contains(&pid) {
            continue;
        }
        counted.push(pid);
        frontier.extend(
            table
                .iter()
                .filter(|(_, parent, _)| *parent == pid)
                .map(|(child, _, _)| *child),
        );
    }
    let ticks = table
        .iter()
        .filter(|(pid, _, _)| counted.contains(pid))
        .map(|(_, _, ticks)| ticks)
        .sum();
    Ok(ticks_to_ms(ticks))
}

fn process(pid: u32) -> anyhow::Result<Process> {
    let id = i32::try_from(pid).context("a pid beyond i32")?;
    Process::new(id).with_context(|| format!("process {pid} (is it still running?)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_child_is_counted_in_its_parents_tree_and_not_in_its_own_time() {
        // Proves the tree of this process includes a child that burns CPU,
        // while own_ms of this process does not.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 2000000 ]; do i=$((i+1)); done; sleep 30",
            ])
            .spawn()
            .expect("sh");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut child_ms = own_ms(child.id()).expect("child");
        while child_ms < 50.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            child_ms = own_ms(child.id()).expect("child");
        }
        let me = std::process::id();
        let own = own_ms(me).expect("me");
        let tree = trees_ms(&[me]).expect("tree");
        let _ = child.kill();
        let _ = child.wait();
        assert!(child_ms >= 50.0, "the child burnt only {child_ms} ms");
        assert!(
            tree >= own + child_ms - 10.0,
            "tree {tree} ms, own {own} ms, child {child_ms} ms"
        );
    }

    #[test]
    fn per_thousand_divides_by_the_answers() {
        let cpu = Cpu {
            server_ms: 500.0,
            bench_ms: 100.0,
        };
        assert!((cpu.server_per_1k(10_000) - 50.0).abs() < 1e-9);
        assert!((cpu.bench_per_1k(10_000) - 10.0).abs() < 1e-9);
        assert!(cpu.server_per_1k(0).abs() < 1e-9);
    }
}
