//! End-to-end tests of the `amends` binary: `amends serve` as a child
//! process against a real nats-server, SIGKILLed and restarted under load,
//! and `amends submit` against it.
#![allow(clippy::unwrap_used, clippy::as_conversions)]

mod audit;
mod bad_input;
mod browser;
mod config;
mod dev;
mod faults;
mod opid;
mod python;
mod query;
mod sagas;
mod support;
mod tail;
mod tls;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amends_client::{Client, Decision, Request};
use amends_core::command::{AccountId, Amount, ClaimKey, Command as Cmd, Namespace, Owner};
use amends_core::decision::Outcome;
use async_nats::jetstream;
use serde_json::Value;

use support::{AMENDS, Nats, Serve, Server, client};

const PARTITIONS: u32 = 4;
const ACCOUNTS: usize = 40;
const OPS: usize = 2_000;
const WORKERS: usize = 32;
/// Each try waits this long; a try lost to a kill is resubmitted after it.
const TRY_TIMEOUT: Duration = Duration::from_secs(2);
const TRIES: u32 = 20;

/// A small deterministic generator (64-bit LCG), so that a failure replays.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn account(i: u64) -> AccountId {
    AccountId::new(format!("acct-{i}")).unwrap()
}

fn request(command: Cmd) -> Request {
    Request {
        op_id: Client::new_op_id(),
        command,
        apology_topic: None,
    }
}

/// One `open_account` request for each of the `ACCOUNTS` accounts.
fn open_accounts() -> Vec<Request> {
    (0..ACCOUNTS as u64)
        .map(|i| {
            request(Cmd::OpenAccount {
                account: account(i),
                floor: 0,
                ceiling: None,
            })
        })
        .collect()
}

/// The workload after the accounts are open: credits, debits (some
/// overdrawing) and claims on a small key space (many refused as taken).
fn workload(len: usize) -> Vec<Request> {
    let mut rng = Lcg(42);
    (0..len)
        .map(|i| {
            let acct = account(rng.next(ACCOUNTS as u64));
            let amount = Amount::new(1 + rng.next(50)).unwrap();
            request(match rng.next(10) {
                0..=3 => Cmd::Credit {
                    account: acct,
                    amount,
                },
                4..=7 => Cmd::Debit {
                    account: acct,
                    amount,
                },
                _ => Cmd::Claim {
                    namespace: Namespace::new("username").unwrap(),
                    key: ClaimKey::new(format!("user-{}", rng.next(60))).unwrap(),
                    owner: Owner::new(format!("owner-{i}")).unwrap(),
                },
            })
        })
        .collect()
}

/// Submits every request from `WORKERS` tasks; returns each one's decision.
async fn submit_all(
    client: &Client,
    requests: &[Request],
    done: &Arc<AtomicUsize>,
) -> Vec<(Request, Decision)> {
    let requests = Arc::new(requests.to_vec());
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (client, requests, done) = (client.clone(), Arc::clone(&requests), Arc::clone(done));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for r in requests.iter().skip(w).step_by(WORKERS) {
                let d = client
                    .submit_and_wait(r, TRY_TIMEOUT, TRIES)
                    .await
                    .unwrap_or_else(|e| panic!("op {} got no decision: {e}", r.op_id));
                done.fetch_add(1, Ordering::Relaxed);
                out.push((r.clone(), d));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Every message of the decisions stream, as JSON, in stream order.
async fn decisions_stream(server: &impl Nats) -> Vec<Value> {
    let js = jetstream::new(server.connect().await);
    amends_nats::test_support::decisions::decisions(&js, &Default::default()).await
}

/// Replays the decisions of one partition's accounts and claims in log
/// order against a naive model and checks each one; returns the balances.
fn check_against_model(answers: &[(Request, Decision)]) -> HashMap<String, i64> {
    let mut by_position: Vec<&(Request, Decision)> = answers.iter().collect();
    by_position.sort_by_key(|(_, d)| (d.partition, d.position));
    let mut balances: HashMap<String, i64> = HashMap::new();
    let mut owners: HashMap<String, String> = HashMap::new();
    for (r, d) in by_position {
        let confirmed = d.outcome.is_confirmed();
        match &r.command {
            Cmd::OpenAccount { account, .. } => {
                assert!(confirmed, "open {account:?}: {d:?}");
                balances.insert(account.as_str().to_owned(), 0);
            }
            Cmd::Credit { account, amount } => {
                let b = balances.get_mut(account.as_str()).unwrap();
                assert!(confirmed, "credit: {d:?}");
                *b += amount.get() as i64;
                assert_balance(d, *b);
            }
            Cmd::Debit { account, amount } => {
                let b = balances.get_mut(account.as_str()).unwrap();
                let want = *b >= amount.get() as i64;
                assert_eq!(confirmed, want, "debit {} from {b}: {d:?}", amount.get());
                if want {
                    *b -= amount.get() as i64;
                    assert_balance(d, *b);
                }
            }
            Cmd::Claim { key, owner, .. } => {
                let free = !owners.contains_key(key.as_str());
                assert_eq!(confirmed, free, "claim {key:?}: {d:?}");
                if free {
                    owners.insert(key.as_str().to_owned(), owner.as_str().to_owned());
                }
            }
            other => panic!("unexpected command {other:?}"),
        }
    }
    balances
}

fn assert_balance(d: &Decision, want: i64) {
    match &d.outcome {
        Outcome::Confirmed { balance, .. } => assert_eq!(*balance, Some(want), "{d:?}"),
        Outcome::Rejected { .. } | Outcome::InFlight { .. } => panic!("not confirmed: {d:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_serve_under_load_answers_every_op_once_with_exact_balances() {
    // Proves crash safety of the real binary: 2,000 ops from 32 concurrent
    // clients while `amends serve` is SIGKILLed and restarted 3 times; every
    // submit_and_wait returns, the decisions stream holds exactly one
    // message per op id (the same decision the client got), and replaying
    // the decisions in log order through a naive model matches every
    // outcome and balance, also after a final credit.
    let started = Instant::now();
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;

    let opens = open_accounts();
    let done = Arc::new(AtomicUsize::new(0));
    let mut answers = submit_all(&client, &opens, &done).await;

    let work = workload(OPS - ACCOUNTS);
    let load = {
        let (client, work, done) = (client.clone(), work.clone(), Arc::clone(&done));
        tokio::spawn(async move { submit_all(&client, &work, &done).await })
    };
    let mut kills = 0;
    for threshold in [OPS / 4, OPS / 2, 3 * OPS / 4] {
        serve
            .wait_for(&done, threshold, Duration::from_secs(30))
            .await;
        serve.assert_running();
        serve.restart();
        kills += 1;
        assert!(done.load(Ordering::Relaxed) < OPS, "killed in the middle");
    }
    let worked = tokio::time::timeout(Duration::from_secs(45), load)
        .await
        .unwrap_or_else(|_| panic!("workload stuck; serve log:\n{}", serve.log()))
        .unwrap();
    answers.extend(worked);
    assert_eq!(kills, 3);
    // Four runs of the process each got to serve.
    assert_eq!(
        serve.log().matches(" serving").count(),
        4,
        "{}",
        serve.log()
    );
    assert_eq!(answers.len(), OPS);

    let balances = check_against_model(&answers);

    // A final credit of 1 to every account shows the balance the service
    // holds equals the model's.
    for (name, balance) in &balances {
        let acct = AccountId::new(name.clone()).unwrap();
        let r = request(Cmd::Credit {
            account: acct,
            amount: Amount::new(1).unwrap(),
        });
        let d = client
            .submit_and_wait(&r, TRY_TIMEOUT, TRIES)
            .await
            .unwrap();
        assert_balance(&d, balance + 1);
        answers.push((r, d));
    }

    // Exactly one decision message per op id, equal to the client's.
    let stream = decisions_stream(&server).await;
    let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for m in stream {
        let id = m["op_id"].as_str().unwrap().to_owned();
        seen.entry(id).or_default().push(m);
    }
    assert_eq!(seen.len(), answers.len(), "op ids on the decisions stream");
    for (r, d) in &answers {
        let msgs = &seen[&r.op_id.to_string()];
        assert_eq!(msgs.len(), 1, "op {} decided {} times", r.op_id, msgs.len());
        assert_eq!(msgs[0], serde_json::to_value(d).unwrap());
    }
    serve.assert_running();
    eprintln!("{OPS} ops, 3 SIGKILLs: {:?}", started.elapsed());
}

fn submit(server: &Server, json: &str) -> Output {
    submit_with(server, &["--timeout-ms", "3000"], json)
}

/// `amends submit` of `json` with `flags` (TLS, tries, say).
fn submit_with(server: &Server, flags: &[&str], json: &str) -> Output {
    Command::new(AMENDS)
        .args(["submit", "--nats-url", &server.url()])
        .args(flags)
        .arg(json)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_prints_the_decision_and_exits_0_confirmed_1_rejected_2_error() {
    // Proves the `amends submit` contract by running it against a running
    // `amends serve`: a confirmation exits 0 with the decision JSON on
    // stdout (a missing op_id is filled in with a v7 id), a refusal exits 1
    // with its reason, and an invalid request exits 2 without a decision.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let _client = client(&server, PARTITIONS).await;

    let out = submit(
        &server,
        r#"{"command":{"type":"open_account","account":"alice"}}"#,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", serve.log());
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["outcome"], "confirmed", "{d}");
    let op_id = d["op_id"].as_str().unwrap();
    assert_eq!(op_id.as_bytes()[14], b'7', "a v7 op id: {op_id}");

    let out = submit(
        &server,
        r#"{"command":{"type":"debit","account":"alice","amount":5}}"#,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["outcome"], "rejected", "{d}");
    assert_eq!(d["reason"]["code"], "insufficient_funds", "{d}");

    let out = submit(&server, r#"{"command":{"type":"nope"}}"#);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid"), "{err}");
}
