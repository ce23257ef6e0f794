//! `amends audit` against a real `amends serve`: a clean log passes with
//! the right counts, and a forged decision on the decisions stream fails.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use amends_client::{Client, Request};
use amends_core::command::{AccountId, Amount, ClaimKey, Command as Cmd, Namespace, Owner};
use amends_core::decision::Outcome;
use amends_core::route::{self, Partitions};
use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::Value;

use crate::support::{AMENDS, Nats, Serve, Server, client};
use crate::{TRIES, TRY_TIMEOUT, request};

const PARTITIONS: u32 = 4;

pub(crate) fn audit(server: &impl Nats) -> Output {
    Command::new(AMENDS)
        .args(["audit", "--nats-url", &server.nats_url()])
        .output()
        .unwrap()
}

/// Two account names that route to different partitions.
fn accounts_on_two_partitions() -> (AccountId, AccountId) {
    let n = Partitions::new(PARTITIONS).unwrap();
    let first = route::partition_of("audit-a", n);
    let other = (0..100)
        .map(|i| format!("audit-b{i}"))
        .find(|name| route::partition_of(name, n) != first)
        .unwrap();
    (
        AccountId::new("audit-a").unwrap(),
        AccountId::new(other).unwrap(),
    )
}

/// Publishes `decision` on partition `partition`'s decision subject with
/// its own `Nats-Msg-Id`, as a writer other than amends would (a forgery,
/// or a second copy).
async fn publish_decision(
    js: &jetstream::Context,
    partition: &Value,
    msg_id: &str,
    decision: &Value,
) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(
        format!("amends.dec.{partition}"),
        headers,
        serde_json::to_vec(decision).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn decide(client: &Client, r: &Request) -> Value {
    let d = client.submit_and_wait(r, TRY_TIMEOUT, TRIES).await.unwrap();
    serde_json::to_value(&d).unwrap()
}

/// The summed columns of the audit table: (messages, decisions, matched,
/// sagas, expiries), and the number of partition rows.
fn totals(stdout: &str) -> ([u64; 5], usize) {
    let mut sums = [0u64; 5];
    let mut rows = 0;
    for line in stdout.lines() {
        let cols: Vec<u64> = line
            .split_whitespace()
            .map_while(|c| c.parse().ok())
            .collect();
        if cols.len() == 11 {
            rows += 1;
            for (sum, col) in sums.iter_mut().zip([1, 3, 4, 5, 10]) {
                *sum += cols[col];
            }
        }
    }
    (sums, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_a_clean_log_and_names_a_forged_decision() {
    // Proves `amends audit` re-derives what `serve` decided: after credits,
    // debits, a hold that expires, claims, a confirmed and a refused
    // cross-partition transfer, a refused debit, a duplicate and a dead
    // letter, audit (run beside the live service) exits 0 with one matched
    // decision per op and the expiry; after a forged decision with a known
    // op id is published on the decisions stream, it exits 1 naming it.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let (a, b) = accounts_on_two_partitions();
    let amount = |n| Amount::new(n).unwrap();
    let ns = || Namespace::new("username").unwrap();
    let key = || ClaimKey::new("alice").unwrap();

    let credit = request(Cmd::Credit {
        account: a.clone(),
        amount: amount(100),
    });
    let mut ops = vec![
        request(Cmd::OpenAccount {
            account: a.clone(),
            floor: 0,
            ceiling: None,
        }),
        request(Cmd::OpenAccount {
            account: b.clone(),
            floor: 0,
            ceiling: Some(1_000),
        }),
        credit.clone(),
        request(Cmd::Debit {
            account: a.clone(),
            amount: amount(10),
        }),
        request(Cmd::Hold {
            account: a.clone(),
            amount: amount(20),
            timeout_ms: Some(300),
        }),
        request(Cmd::Claim {
            namespace: ns(),
            key: key(),
            owner: Owner::new("u1").unwrap(),
        }),
        request(Cmd::Transfer {
            from: a.clone(),
            to: b.clone(),
            amount: amount(30),
            deadline_ms: None,
        }),
    ];
    // Refusals: a claim taken by another owner, an overdraft, a transfer
    // more than `a` has.
    let refused = vec![
        request(Cmd::Claim {
            namespace: ns(),
            key: key(),
            owner: Owner::new("u2").unwrap(),
        }),
        request(Cmd::Debit {
            account: a.clone(),
            amount: amount(1_000),
        }),
        request(Cmd::Transfer {
            from: a.clone(),
            to: b.clone(),
            amount: amount(500),
            deadline_ms: None,
        }),
    ];
    let mut credited = Value::Null;
    for r in &ops {
        let d = decide(&client, r).await;
        assert_eq!(d["outcome"], "confirmed", "{d}\n{}", serve.log());
        if r.op_id == credit.op_id {
            credited = d;
        }
    }
    for r in &refused {
        let d = decide(&client, r).await;
        assert_eq!(d["outcome"], "rejected", "{d}");
    }
    ops.extend(refused);
    // A duplicate, past JetStream's 1 s duplicate window so that it reaches
    // the log and amends itself answers it.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let again = client
        .submit_and_wait(&credit, TRY_TIMEOUT, TRIES)
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&again).unwrap(), credited);
    assert!(matches!(again.outcome, Outcome::Confirmed { .. }));
    // A dead letter: no readable op id.
    let js = jetstream::new(amends_nats::test_support::connect(&server).await);
    js.publish("amends.req.0", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Every decision and the hold's expiry (the service ticks the
    // partition when it is due) are on the decisions stream.
    let want = ops.len() as u64 + 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = amends_nats::test_support::decision_count(&js, &Default::default()).await;
        if got >= want {
            assert_eq!(got, want);
            break;
        }
        assert!(Instant::now() < deadline, "{got} of {want} decisions");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = audit(&server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{out:?}");
    eprintln!("{stdout}");
    assert!(stdout.contains("audit passed (0 warnings)"), "{stdout}");
    let ([messages, decisions, matched, sagas, expiries], rows) = totals(&stdout);
    assert_eq!(rows, PARTITIONS as usize, "{stdout}");
    assert_eq!(decisions, ops.len() as u64, "{stdout}");
    assert_eq!(matched, decisions, "{stdout}");
    assert_eq!(sagas, 2, "{stdout}");
    assert_eq!(expiries, 1, "{stdout}");
    // Each op, the duplicate, the dead letter, the tick, and the saga
    // messages between partitions: more messages than ops.
    assert!(messages > ops.len() as u64 + 2, "{stdout}");

    // Tamper: the credit's decision again, with another balance and its own
    // Nats-Msg-Id, on the credit's partition.
    let mut forged = serde_json::to_value(&again).unwrap();
    forged["balance"] = Value::from(1_000_000);
    publish_decision(&js, &Value::from(again.partition), "forged-1", &forged).await;
    let out = audit(&server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{out:?}");
    let op_id = credit.op_id.to_string();
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAILED")).collect();
    eprintln!("{stdout}");
    assert_eq!(failed.len(), 1, "{stdout}");
    assert!(failed[0].contains(&op_id), "{stdout}");
    assert!(failed[0].contains("1000000"), "{stdout}");

    // No deployment at all: exit 2.
    drop(serve);
    let out = Command::new(AMENDS)
        .args([
            "audit",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--connect-timeout-ms",
            "500",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_passes_after_sigkills_under_concurrent_transfers() {
    // Proves audit has no false alarms on a log written through crashes:
    // 400 concurrent transfers among 6 hot accounts (many refused, sagas
    // interleaved across partitions) while `serve` is SIGKILLed twice, so
    // effects are republished and step messages are duplicated in the log;
    // audit then exits 0 with every re-derived decision matched.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let hot = |i: u64| AccountId::new(format!("hot-{i}")).unwrap();
    let mut setup = Vec::new();
    for i in 0..6 {
        setup.push(request(Cmd::OpenAccount {
            account: hot(i),
            floor: 0,
            ceiling: None,
        }));
        setup.push(request(Cmd::Credit {
            account: hot(i),
            amount: Amount::new(200).unwrap(),
        }));
    }
    for r in &setup {
        decide(&client, r).await;
    }
    let mut rng = crate::Lcg(7);
    let transfers: Vec<Request> = (0..400)
        .map(|_| {
            let from = rng.next(6);
            let to = (from + 1 + rng.next(5)) % 6;
            request(Cmd::Transfer {
                from: hot(from),
                to: hot(to),
                amount: Amount::new(1 + rng.next(120)).unwrap(),
                deadline_ms: None,
            })
        })
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let (client, transfers, done) = (client.clone(), transfers.clone(), done.clone());
        tokio::spawn(async move { crate::submit_all(&client, &transfers, &done).await })
    };
    for threshold in [100, 250] {
        serve
            .wait_for(&done, threshold, Duration::from_secs(30))
            .await;
        serve.restart();
    }
    let answers = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .unwrap_or_else(|_| panic!("stuck: {}", serve.log()))
        .unwrap();
    assert_eq!(answers.len(), transfers.len());
    // Three runs of the process each got to serve.
    assert_eq!(
        serve.log().matches(" serving").count(),
        3,
        "{}",
        serve.log()
    );
    assert!(answers.iter().any(|(_, d)| d.outcome.is_confirmed()));
    assert!(answers.iter().any(|(_, d)| !d.outcome.is_confirmed()));

    let want = setup.len() + transfers.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stdout = loop {
        let out = audit(&server);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{out:?}");
        let ([_, decisions, matched, sagas, _], _) = totals(&stdout);
        if matched as usize == want {
            assert_eq!(decisions, matched, "{stdout}");
            assert_eq!(sagas as usize, transfers.len(), "{stdout}");
            break stdout;
        }
        assert!(Instant::now() < deadline, "{stdout}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(stdout.contains("audit passed"), "{stdout}");
    eprintln!("{stdout}");
    serve.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_fails_a_decision_that_is_on_the_decisions_stream_twice() {
    // Proves the audit counts copies: after serve decides one operation, an identical second copy of its decision is published on the decisions stream (another Nats-Msg-Id, as a republish past the duplicate window would store it); the audit passed that before and now exits 1 naming the op and both sequences.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let _serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let open = request(Cmd::OpenAccount {
        account: AccountId::new("twice").unwrap(),
        floor: 0,
        ceiling: None,
    });
    let decided = decide(&client, &open).await;
    let clean = audit(&server);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");

    let js = jetstream::new(amends_nats::test_support::connect(&server).await);
    publish_decision(&js, &decided["partition"], "a-second-copy", &decided).await;
    let out = audit(&server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{stdout}");
    assert!(failed[0].contains(&open.op_id.to_string()), "{stdout}");
    assert!(
        failed[0].contains("on the decisions stream 2 times"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_warns_of_an_op_id_a_client_used_on_two_partitions_and_fails_a_forged_copy() {
    // Proves the audit compares decisions partition by partition: one op id that a client published on two partitions (an account of each; past the 1 s duplicate window so both reach the log) is decided on each, which the audit reports as a warning naming the op id and both partitions, passing, where it failed before; a copy of one of them forged onto the other partition's subject still fails it.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let _serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let (a, b) = accounts_on_two_partitions();
    let op_id = Client::new_op_id();
    let open = |account: &AccountId| Request {
        op_id,
        command: Cmd::OpenAccount {
            account: account.clone(),
            floor: 0,
            ceiling: None,
        },
        apology_topic: None,
    };
    let first = decide(&client, &open(&a)).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = decide(&client, &open(&b)).await;
    assert_ne!(first["partition"], second["partition"]);
    assert_eq!(first["outcome"], "confirmed", "{first}");
    assert_eq!(second["outcome"], "confirmed", "{second}");

    let out = audit(&server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{out:?}");
    let warned: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(&op_id.to_string()))
        .collect();
    assert_eq!(warned.len(), 1, "{stdout}");
    assert!(
        warned[0].contains("decided on partitions")
            && warned[0].contains("more than one partition"),
        "{stdout}"
    );

    // The first partition's decision, forged onto the second's subject.
    let js = jetstream::new(amends_nats::test_support::connect(&server).await);
    let mut forged = first.clone();
    forged["partition"] = second["partition"].clone();
    publish_decision(
        &js,
        &second["partition"],
        "forged-on-the-other-partition",
        &forged,
    )
    .await;
    let out = audit(&server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAILED") && l.contains(&op_id.to_string())),
        "{stdout}"
    );
}
