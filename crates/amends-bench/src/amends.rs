//! amends under the workload: `amends serve` as a child process (the
//! `amends` binary, [`locate_binary`]) with durable commits, driven through
//! amends-client.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amends_client::{Client, Options, Request};
use amends_core::decision::Outcome;
use amends_core::route::{self, Partitions};
use amends_nats::topology::{PREFIX_DEFAULT, Prefix, Stream};
use anyhow::Context as _;
use futures_util::StreamExt as _;

use super::workload::{Answer, Op, Target};

/// The namespace of the workload's claims.
pub const NAMESPACE: &str = "bench";

/// How long the service may take to come up (streams created, partition
/// count recorded).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the service may take to stop on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the setup waits for each decision, per try.
const SETUP_TRY_TIMEOUT: Duration = Duration::from_secs(10);

/// Setup operations in flight.
const SETUP_IN_FLIGHT: usize = 64;

/// How often the service's memory is read during a run.
pub const MEMORY_EVERY: Duration = Duration::from_millis(200);

/// The name of account `n`.
pub fn account(n: u64) -> String {
    format!("acct-{n}")
}

/// The request of `op` as amends's wire JSON (a fresh UUID v7 op id), with
/// its op id and its routing key (a saga's op id for a transfer).
pub fn request_json(op: Op) -> (String, String, String) {
    let op_id = Client::new_op_id().to_string();
    let (command, key) = match op {
        Op::Credit { account: a, amount } => (
            serde_json::json!({"type": "credit", "account": account(a), "amount": amount}),
            account(a),
        ),
        Op::Debit { account: a, amount } => (
            serde_json::json!({"type": "debit", "account": account(a), "amount": amount}),
            account(a),
        ),
        Op::Claim { key, owner } => {
            let key = format!("k{key}");
            (
                serde_json::json!({"type": "claim", "namespace": NAMESPACE, "key": key, "owner": format!("owner-{owner}")}),
                route::claim_routing_key(NAMESPACE, &key),
            )
        }
        // The cross-partition transfer (a saga routed by its op id).
        Op::Transfer { from, to, amount } => (
            serde_json::json!({"type": "transfer", "from": account(from), "to": account(to), "amount": amount}),
            op_id.clone(),
        ),
    };
    let body = serde_json::json!({"op_id": op_id, "command": command}).to_string();
    (op_id, body, key)
}

/// The request of `op` for amends-client. Built from JSON, so that commands
/// this build's core may not know (a transfer) are refused here, clearly.
pub fn request(op: Op) -> anyhow::Result<Request> {
    let (_, body, _) = request_json(op);
    serde_json::from_str(&body).with_context(|| format!("this amends cannot express {body}"))
}

/// The `amends` binary to run: `given` (`--amends`), else `amends` beside
/// this executable (both built into `target/<profile>/`).
pub fn locate_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => {
            let exe = std::env::current_exe().context("locating this executable")?;
            exe.with_file_name(format!("amends{}", std::env::consts::EXE_SUFFIX))
        }
    };
    anyhow::ensure!(
        path.is_file(),
        "no amends binary at {}: build it beside this one (`cargo build --release -p amends`, or `-p amends` for a debug bench) or give --amends PATH",
        path.display()
    );
    Ok(path)
}

/// `amends serve`, a child process of the bench.
pub struct Service {
    child: Option<Child>,
    pid: u32,
}

impl Service {
    /// Starts `amends serve` (the binary `exe`) against `url` with its
    /// store in `dir/store` and its log in `dir/serve.log`, with durable
    /// (fsync) commits.
    pub fn start(
        exe: &Path,
        url: &str,
        dir: &Path,
        partitions: Partitions,
    ) -> anyhow::Result<Service> {
        let log_path = dir.join("serve.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .args(["--nats-url", url])
            .arg("--data-dir")
            .arg(dir.join("store"))
            .args(["--partitions", &partitions.get().to_string()])
            .args(["--durability", "fsync"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the log's handle")?)
            .stderr(log)
            .spawn()
            .context("starting amends serve")?;
        let pid = child.id();
        Ok(Service {
            child: Some(child),
            pid,
        })
    }

    /// The service's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails if the service exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait().context("polling amends serve")?
        {
            anyhow::bail!("amends serve exited ({status})");
        }
        Ok(())
    }

    /// Stops the service: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`];
    /// reaps it. Does nothing the second time.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        super::reap_within(&mut child, STOP_TIMEOUT);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process's resident memory, from `/proc/<pid>/status`, in KiB:
/// `(VmRSS, VmHWM)`.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Samples a process's VmRSS every [`MEMORY_EVERY`] and keeps the largest.
pub struct MemorySampler {
    peak_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl MemorySampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> MemorySampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let peak = Arc::clone(&peak_kib);
        let task = tokio::spawn(async move {
            loop {
                if let Some((rss, _)) = memory_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(MEMORY_EVERY).await;
            }
        });
        MemorySampler { peak_kib, task }
    }

    /// Stops sampling; the largest VmRSS seen, KiB.
    pub fn finish(self) -> u64 {
        self.task.abort();
        self.peak_kib.load(Ordering::Relaxed)
    }
}

/// How many messages amends's requests and decisions streams hold (log
/// appends so far, ticks included), on the server at `url`.
pub async fn log_lengths(url: &str) -> anyhow::Result<(u64, u64)> {
    let nats = async_nats::connect(url)
        .await
        .context("connecting to read the streams")?;
    let js = async_nats::jetstream::new(nats);
    let prefix = Prefix::new(PREFIX_DEFAULT.to_owned()).context("the default prefix")?;
    let mut lengths = [0_u64; 2];
    for (slot, stream) in lengths
        .iter_mut()
        .zip([Stream::Requests, Stream::Decisions])
    {
        let name = prefix.stream_name(stream);
        let mut s = js
            .get_stream(&name)
            .await
            .with_context(|| format!("opening {name}"))?;
        *slot = s
            .info()
            .await
            .with_context(|| format!("reading {name}"))?
            .state
            .messages;
    }
    Ok((lengths[0], lengths[1]))
}

/// amends as a workload target: `clients` connections.
pub struct Amends {
    clients: Vec<Client>,
}

impl Amends {
    /// Connects `clients` clients to the service at `url`, waiting until
    /// it has recorded its partition count.
    pub async fn connect(
        url: &str,
        clients: usize,
        service: &mut Service,
    ) -> anyhow::Result<Amends> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let first = loop {
            service.check()?;
            let mut options = Options::new(url);
            options.name = Some("amends bench".to_owned());
            match Client::connect(options).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "service not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("amends serve did not come up"),
            }
        };
        let mut all = vec![first];
        for _ in 1..clients.max(1) {
            let mut options = Options::new(url);
            options.name = Some("amends bench".to_owned());
            all.push(
                Client::connect(options)
                    .await
                    .context("connecting an amends client")?,
            );
        }
        Ok(Amends { clients: all })
    }

    /// Opens accounts `0..accounts` (floor 0) and credits each with
    /// `balance`, waiting for every decision.
    pub async fn open_accounts(&self, accounts: u64, balance: u64) -> anyhow::Result<()> {
        let client = self.clients.first().context("no amends client")?;
        let submit = |command: serde_json::Value| {
            let client = client.clone();
            async move {
                let body = serde_json::json!({"op_id": Client::new_op_id(), "command": command});
                let request: Request =
                    serde_json::from_value(body).context("building a setup request")?;
                let decision = client
                    .submit_and_wait(&request, SETUP_TRY_TIMEOUT, 3)
                    .await
                    .context("setup operation")?;
                anyhow::ensure!(
                    decision.outcome.is_confirmed(),
                    "setup operation refused: {:?}",
                    decision.outcome
                );
                anyhow::Ok(())
            }
        };
        let opens = futures_util::stream::iter(0..accounts)
            .map(|n| submit(serde_json::json!({"type": "open_account", "account": account(n)})))
            .buffer_unordered(SETUP_IN_FLIGHT);
        opens
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<()>>>()?;
        if balance > 0 {
            let credits = futures_util::stream::iter(0..accounts)
                .map(|n| {
                    submit(serde_json::json!({"type": "credit", "account": account(n), "amount": balance}))
                })
                .buffer_unordered(SETUP_IN_FLIGHT);
            credits
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<Vec<()>>>()?;
        }
        Ok(())
    }
}

impl Target for Amends {
    async fn execute(&self, client: usize, op: Op) -> anyhow::Result<Answer> {
        let c = self
            .clients
            .get(client % self.clients.len().max(1))
            .context("no amends client")?;
        let mut request = request(op)?;
        if let Op::Transfer { from, .. } = op {
            // The saga lives with its debit, as a client should place it
            // (Client::new_saga_op_id): 4 appends instead of 7.
            request.op_id = c.new_saga_op_id(&account(from));
        }
        c.submit(&request).await.context("submit")?;
        let decision = c
            .wait(request.op_id, Duration::from_secs(60))
            .await
            .context("wait")?;
        if decision.outcome.is_confirmed() {
            Ok(Answer::Confirmed)
        } else if matches!(decision.outcome, Outcome::Rejected { .. }) {
            Ok(Answer::Refused)
        } else {
            anyhow::bail!("not a final decision: {:?}", decision.outcome)
        }
    }
}
