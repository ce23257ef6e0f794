//! Sagas end to end: transfers across partitions through the real `amends
//! serve`, with the service SIGKILLed in the middle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amends_client::{Client, Decision, Request};
use amends_core::command::{AccountId, Amount, Command as Cmd};
use amends_core::decision::{Outcome, Reason};
use amends_core::route;
use serde_json::Value;

use crate::support::{Serve, Server, client};
use crate::{Lcg, TRIES, TRY_TIMEOUT, decisions_stream, request, submit_all};

const PARTITIONS: u32 = 4;
/// A few hot accounts: every transfer contends with many others.
const HOT: u64 = 6;
const OPENING: i64 = 1_000;
const TRANSFERS: usize = 3_000;

fn hot(i: u64) -> AccountId {
    AccountId::new(format!("hot-{i}")).unwrap()
}

fn transfer(from: u64, to: u64, amount: u64) -> Request {
    request(Cmd::Transfer {
        from: hot(from),
        to: hot(to),
        amount: Amount::new(amount).unwrap(),
        deadline_ms: None,
    })
}

/// Opens and funds the hot accounts; returns nothing but fails loudly.
async fn open_hot_accounts(client: &Client) {
    for i in 0..HOT {
        for command in [
            Cmd::OpenAccount {
                account: hot(i),
                floor: 0,
                ceiling: None,
            },
            Cmd::Credit {
                account: hot(i),
                amount: Amount::new(OPENING as u64).unwrap(),
            },
        ] {
            let d = client
                .submit_and_wait(&request(command), TRY_TIMEOUT, TRIES)
                .await
                .unwrap();
            assert!(d.outcome.is_confirmed(), "{d:?}");
        }
    }
}

/// The balance and available amount of `account`, read by crediting 1.
async fn balance_after_credit(client: &Client, account: AccountId) -> (i64, i64) {
    let r = request(Cmd::Credit {
        account,
        amount: Amount::new(1).unwrap(),
    });
    let d = client
        .submit_and_wait(&r, TRY_TIMEOUT, TRIES)
        .await
        .unwrap();
    match d.outcome {
        Outcome::Confirmed {
            balance: Some(b),
            available: Some(a),
        } => (b, a),
        other => panic!("credit not confirmed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfers_among_hot_accounts_survive_sigkill_exactly() {
    // Proves sagas across partitions are exact under crashes: 3,000 concurrent transfers (half with the saga placed on the debit's partition) among 6 hot accounts on 4 partitions while `amends serve` is SIGKILLed twice; every transfer gets one final decision (one message on the decisions stream, equal to the client's), each balance is what the confirmed transfers say, the sum is unchanged, and no hold is left.
    let started = Instant::now();
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let partitions = client.partitions();
    let spread: std::collections::BTreeSet<_> = (0..HOT)
        .map(|i| route::partition_of(hot(i).as_str(), partitions))
        .collect();
    assert!(spread.len() >= 3, "hot accounts on {spread:?} only");
    open_hot_accounts(&client).await;

    let mut rng = Lcg(7);
    let work: Vec<Request> = (0..TRANSFERS)
        .map(|i| {
            let from = rng.next(HOT);
            let to = (from + 1 + rng.next(HOT - 1)) % HOT;
            // Large enough that some are refused for insufficient funds.
            let mut r = transfer(from, to, 1 + rng.next(400));
            // Half the sagas live with their debit (its steps there are
            // decided without a log append), half wherever their id falls.
            if i % 2 == 0 {
                r.op_id = client.new_saga_op_id(hot(from).as_str());
            }
            r
        })
        .collect();
    let done = Arc::new(AtomicUsize::new(0));
    let load = {
        let (client, work, done) = (client.clone(), work.clone(), Arc::clone(&done));
        tokio::spawn(async move { submit_all(&client, &work, &done).await })
    };
    for threshold in [TRANSFERS / 3, 2 * TRANSFERS / 3] {
        serve
            .wait_for(&done, threshold, Duration::from_secs(60))
            .await;
        serve.assert_running();
        serve.restart();
        assert!(
            done.load(Ordering::Relaxed) < TRANSFERS,
            "killed in the middle"
        );
    }
    let answers: Vec<(Request, Decision)> = tokio::time::timeout(Duration::from_secs(120), load)
        .await
        .unwrap_or_else(|_| panic!("workload stuck; serve log:\n{}", serve.log()))
        .unwrap();
    assert_eq!(answers.len(), TRANSFERS);

    // The balances the confirmed transfers imply.
    let mut expected: BTreeMap<String, i64> = (0..HOT)
        .map(|i| (hot(i).as_str().to_owned(), OPENING))
        .collect();
    let (mut confirmed, mut refused) = (0, 0);
    for (r, d) in &answers {
        let Cmd::Transfer {
            from, to, amount, ..
        } = &r.command
        else {
            unreachable!()
        };
        match &d.outcome {
            Outcome::Confirmed { .. } => {
                confirmed += 1;
                let amount = amount.get() as i64;
                *expected.get_mut(from.as_str()).unwrap() -= amount;
                *expected.get_mut(to.as_str()).unwrap() += amount;
            }
            Outcome::Rejected {
                reason: Reason::StepRefused { step: 0, reason },
            } if matches!(**reason, Reason::InsufficientFunds { .. }) => refused += 1,
            other => panic!("transfer {}: unexpected {other:?}", r.op_id),
        }
    }
    assert!(
        confirmed > 100 && refused > 10,
        "{confirmed} confirmed, {refused} refused"
    );
    for (name, want) in &expected {
        assert!(*want >= 0, "{name} below its floor: {want}");
        let (balance, available) =
            balance_after_credit(&client, AccountId::new(name.clone()).unwrap()).await;
        assert_eq!(balance, want + 1, "{name}");
        assert_eq!(available, balance, "{name}: a hold is left");
    }
    let total: i64 = expected.values().sum();
    assert_eq!(total, OPENING * HOT as i64, "money not conserved");

    // Exactly one decision message per transfer, equal to the client's.
    let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for m in decisions_stream(&server).await {
        if let Some(id) = m["op_id"].as_str() {
            seen.entry(id.to_owned()).or_default().push(m);
        }
    }
    for (r, d) in &answers {
        let msgs = seen
            .get(&r.op_id.to_string())
            .map_or(&[][..], Vec::as_slice);
        assert_eq!(
            msgs.len(),
            1,
            "transfer {} decided {} times",
            r.op_id,
            msgs.len()
        );
        assert_eq!(msgs[0], serde_json::to_value(d).unwrap());
    }
    serve.assert_running();
    eprintln!(
        "{TRANSFERS} transfers ({confirmed} confirmed), 2 SIGKILLs: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_step_leaves_nothing_and_the_optimistic_client_gets_an_apology() {
    // Proves compensation end to end: a transfer to a missing account is refused naming step 1 and its reason, the debit's hold on the source is voided (available equals balance again), and the optimistic form publishes an apology on its topic.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let _serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    open_hot_accounts(&client).await;

    let mut r = request(Cmd::Transfer {
        from: hot(0),
        to: AccountId::new("nobody").unwrap(),
        amount: Amount::new(10).unwrap(),
        deadline_ms: None,
    });
    r.apology_topic = Some(amends_core::command::Topic::new("payments.failed").unwrap());
    let d = client
        .submit_and_wait(&r, TRY_TIMEOUT, TRIES)
        .await
        .unwrap();
    match &d.outcome {
        Outcome::Rejected {
            reason: Reason::StepRefused { step: 1, reason },
        } => assert_eq!(**reason, Reason::UnknownAccount),
        other => panic!("{other:?}"),
    }
    // The decision says which transfer it was.
    let moved = d
        .transfer
        .as_ref()
        .expect("a transfer's decision says what it moves");
    assert_eq!(
        (moved.from.as_str(), moved.to.as_str(), moved.amount.get()),
        (hot(0).as_str(), "nobody", 10)
    );
    let (balance, available) = balance_after_credit(&client, hot(0)).await;
    assert_eq!((balance, available), (OPENING + 1, OPENING + 1));

    // The apology is on the apologies stream, with the refusal.
    let nats = amends_nats::test_support::connect(&server).await;
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream("AMENDS_APOLOGY").await.unwrap();
    let msg = stream
        .get_last_raw_message_by_subject("amends.apology.payments.failed")
        .await
        .unwrap();
    let apology: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(apology["decision"]["op_id"], r.op_id.to_string());
    assert_eq!(apology["decision"]["reason"]["code"], "step_refused");
    assert_eq!(apology["decision"]["transfer"]["to"], "nobody");
    assert_eq!(apology["command"]["type"], "transfer");
}
