//! The mixed load: clients that each submit paced operations and resubmit
//! the same op id until it is decided (`Client::submit_and_wait`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amends_client::{Client, Request};
use amends_core::command::{AccountId, Amount, ClaimKey, Command, DeadlineMs, Namespace, Owner};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::Value;
use tokio::task::JoinSet;

/// Each try waits this long for the decision before resubmitting.
pub const TRY_TIMEOUT: Duration = Duration::from_secs(2);
/// Tries per op: with [`TRY_TIMEOUT`], a client gives up after about a
/// minute without a decision (longer than any outage a scenario injects).
pub const TRIES: u32 = 30;
/// The accounts the load uses (opened and funded first).
pub const ACCOUNTS: u64 = 40;
/// The claim keys the load contends for.
const CLAIM_KEYS: u64 = 60;

/// One op of the campaign and what its client got.
#[derive(Debug, Clone)]
pub struct Op {
    /// The op.
    pub request: Request,
    /// The decision its client got (as published JSON), `None` if it gave
    /// up.
    pub answer: Option<Value>,
}

/// An account of the load.
pub fn account(i: u64) -> AccountId {
    AccountId::new(format!("acct-{i}")).expect("a valid account id")
}

/// A request with a fresh op id.
pub fn request(command: Command) -> Request {
    Request {
        op_id: Client::new_op_id(),
        command,
        apology_topic: None,
    }
}

fn amount(n: u64) -> Amount {
    Amount::new(n).expect("a positive amount")
}

/// Submits `request` until it is decided (or every try ran out); the op
/// and how long it took.
pub async fn decide(client: &Client, request: Request) -> (Op, Duration) {
    let started = Instant::now();
    let answer = match client.submit_and_wait(&request, TRY_TIMEOUT, TRIES).await {
        Ok(d) => Some(serde_json::to_value(&d).expect("a decision is JSON")),
        Err(e) => {
            tracing::warn!(op_id = %request.op_id, error = %e, "no decision");
            None
        }
    };
    (Op { request, answer }, started.elapsed())
}

/// Opens the load's accounts and credits each with 100; the ops.
pub async fn open_accounts(client: &Client) -> Vec<Op> {
    let mut set = JoinSet::new();
    for i in 0..ACCOUNTS {
        let client = client.clone();
        set.spawn(async move {
            let open = request(Command::OpenAccount {
                account: account(i),
                floor: 0,
                ceiling: None,
            });
            let (opened, _) = decide(&client, open).await;
            let credit = request(Command::Credit {
                account: account(i),
                amount: amount(100),
            });
            let (credited, _) = decide(&client, credit).await;
            [opened, credited]
        });
    }
    set.join_all().await.into_iter().flatten().collect()
}

/// The mix: credits, debits (some overdrawing), contended claims, holds
/// that expire, and a few cross-partition transfers (sagas).
fn next_request(rng: &mut StdRng, worker: usize, n: u64) -> Request {
    let acct = account(rng.random_range(0..ACCOUNTS));
    let value = amount(rng.random_range(1..=60));
    request(match rng.random_range(0..100) {
        0..30 => Command::Credit {
            account: acct,
            amount: value,
        },
        30..62 => Command::Debit {
            account: acct,
            amount: value,
        },
        62..82 => Command::Claim {
            namespace: Namespace::new("username").expect("a namespace"),
            key: ClaimKey::new(format!("user-{}", rng.random_range(0..CLAIM_KEYS)))
                .expect("a claim key"),
            owner: Owner::new(format!("owner-{worker}-{n}")).expect("an owner"),
        },
        82..95 => Command::Hold {
            account: acct,
            amount: amount(rng.random_range(1..=20)),
            timeout_ms: Some(rng.random_range(300..3_000)),
        },
        _ => Command::Transfer {
            from: acct,
            to: account(rng.random_range(0..ACCOUNTS)),
            amount: amount(rng.random_range(1..=30)),
            deadline_ms: Some(DeadlineMs::new(30_000).expect("a deadline")),
        },
    })
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<(Vec<Op>, Histogram<u64>)>,
}

/// What a load did.
pub struct Done {
    /// Every op, with its client's answer.
    pub ops: Vec<Op>,
    /// Submit-to-decision latency of the answered ops, in microseconds.
    pub latency: Histogram<u64>,
}

/// A latency histogram in microseconds, 1 µs to 10 min.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` (in microseconds, clamped to the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(micros.max(1));
}

impl Load {
    /// Starts `clients` clients sharing `rate` operations per second, at
    /// most `max_ops` in all, until [`Load::stop`].
    pub fn start(client: &Client, clients: usize, rate: u32, max_ops: usize, seed: u64) -> Load {
        let clients = clients.max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let per_client = max_ops.div_ceil(clients);
        let clients_u32 = u32::try_from(clients).unwrap_or(u32::MAX);
        let pace = Duration::from_secs(1) * clients_u32 / rate.max(1);
        let mut tasks = JoinSet::new();
        for worker in 0..clients {
            let (client, stop) = (client.clone(), Arc::clone(&stop));
            let worker_seed = seed
                .wrapping_mul(1_000)
                .wrapping_add(u64::try_from(worker).unwrap_or(0));
            tasks.spawn(async move {
                let mut rng = StdRng::seed_from_u64(worker_seed);
                let mut ticker = tokio::time::interval(pace);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let (mut ops, mut latency) = (Vec::new(), histogram());
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && ops.len() < per_client {
                    ticker.tick().await;
                    let (op, took) = decide(&client, next_request(&mut rng, worker, n)).await;
                    if op.answer.is_some() {
                        record(&mut latency, took);
                    }
                    ops.push(op);
                    n += 1;
                }
                (ops, latency)
            });
        }
        Load { stop, tasks }
    }

    /// Stops the clients (each finishes the op it is on) and collects what
    /// they did.
    pub async fn stop(self) -> Done {
        self.stop.store(true, Ordering::Relaxed);
        let mut done = Done {
            ops: Vec::new(),
            latency: histogram(),
        };
        for (ops, latency) in self.tasks.join_all().await {
            done.ops.extend(ops);
            done.latency.add(&latency).expect("histograms of one range");
        }
        done
    }
}
