//! The client against real workers: confirm, refuse, duplicate, many in
//! flight, resubmission after a timeout, a nats-server restart.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use amends_client::{Error, OpStatus, Options};
use amends_core::decision::{Outcome, Reason};
use amends_core::route::Partitions;
use amends_core::{Command, Decision};

use crate::support::{Deployment, TRY_TIMEOUT, account, amount, open, request, text, within};

fn balance(decision: &Decision) -> Option<i64> {
    match decision.outcome {
        Outcome::Confirmed { balance, .. } => balance,
        Outcome::Rejected { .. } | Outcome::InFlight { .. } => None,
    }
}

#[tokio::test]
async fn confirms_and_refuses_with_a_reason() {
    // Proves the round trip: submit_and_wait gets a confirmation with its balance, and a refusal as an Ok decision carrying its reason.
    within(async {
        let mut dep = Deployment::start("amends", 4).await;
        dep.spawn_workers();
        let client = dep.client().await;
        assert_eq!(client.partitions(), Partitions::new(4).expect("count"));

        let d = client
            .submit_and_wait(&request(open("alice")), TRY_TIMEOUT, 1)
            .await
            .expect("open");
        assert!(d.outcome.is_confirmed(), "{d:?}");
        let credit = request(Command::Credit {
            account: account("alice"),
            amount: amount(100),
        });
        let d = client
            .submit_and_wait(&credit, TRY_TIMEOUT, 1)
            .await
            .expect("credit");
        assert_eq!(balance(&d), Some(100), "{d:?}");
        assert_eq!(d.op_id, credit.op_id);
        assert_eq!(
            d.partition,
            client.partition_of(&credit).expect("routable").get()
        );

        let debit = request(Command::Debit {
            account: account("alice"),
            amount: amount(150),
        });
        let d = client
            .submit_and_wait(&debit, TRY_TIMEOUT, 1)
            .await
            .expect("debit");
        match d.outcome.reason() {
            Some(Reason::InsufficientFunds { .. }) => {}
            other => panic!("expected insufficient_funds, got {other:?}"),
        }

        // A tick is refused before anything is sent.
        let tick = request(Command::Tick {});
        assert!(matches!(
            client.submit(&tick).await,
            Err(Error::Tick { op_id }) if op_id == tick.op_id
        ));
        // Waiting for an op this client never submitted cannot succeed.
        let stranger = request(open("nobody"));
        assert!(matches!(
            client.wait(stranger.op_id, TRY_TIMEOUT).await,
            Err(Error::NotSubmitted { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn a_duplicate_gets_the_same_decision() {
    // Proves both kinds of duplicate: inside the duplicate window JetStream drops the copy (PubAck duplicate, same sequence) and the one decision still arrives; after it, amends answers the resubmission with the original decision.
    within(async {
        let mut dep = Deployment::start("dup", 2).await;
        dep.spawn_workers();
        let client = dep.client().await;
        client
            .submit_and_wait(&request(open("bob")), TRY_TIMEOUT, 1)
            .await
            .expect("open");

        let credit = request(Command::Credit {
            account: account("bob"),
            amount: amount(7),
        });
        let first = client.submit(&credit).await.expect("submit");
        let second = client.submit(&credit).await.expect("resubmit");
        assert!(!first.duplicate);
        assert!(second.duplicate, "inside the window JetStream drops it");
        assert_eq!(first.sequence, second.sequence);
        let original = client
            .wait(credit.op_id, TRY_TIMEOUT)
            .await
            .expect("decision");
        assert_eq!(balance(&original), Some(7), "{original:?}");

        // After the 1 s duplicate window the copy reaches the log, and the
        // worker answers from its dedup records: the same decision, its
        // original position included, and no second credit.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = client
            .submit_and_wait(&credit, TRY_TIMEOUT, 1)
            .await
            .expect("resubmit after the window");
        assert_eq!(again, original, "{}", text(credit.op_id));
        let next = client
            .submit_and_wait(
                &request(Command::Credit {
                    account: account("bob"),
                    amount: amount(1),
                }),
                TRY_TIMEOUT,
                1,
            )
            .await
            .expect("credit");
        assert_eq!(balance(&next), Some(8), "credited once: {next:?}");
    })
    .await;
}

#[tokio::test]
async fn many_operations_in_flight_are_each_answered() {
    // Proves the inbox demultiplexing: 500 concurrent submit_and_wait from one client over 4 partitions each get their own decision, and the balances show every credit applied exactly once.
    within(async {
        const ACCOUNTS: usize = 8;
        const OPS: usize = 500;
        let mut dep = Deployment::start("many", 4).await;
        dep.spawn_workers();
        let client = dep.client().await;
        let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{i}")).collect();
        for name in &names {
            client
                .submit_and_wait(&request(open(name)), TRY_TIMEOUT, 1)
                .await
                .expect("open");
        }
        let partitions: HashSet<u32> = names
            .iter()
            .map(|n| {
                client
                    .partition_of(&request(open(n)))
                    .expect("routable")
                    .get()
            })
            .collect();
        assert!(partitions.len() > 1, "the accounts span several partitions");

        let mut tasks = Vec::new();
        let mut expected: BTreeMap<String, i64> = BTreeMap::new();
        for i in 0..OPS {
            let name = &names[i % ACCOUNTS];
            let n = u64::try_from(i % 10 + 1).expect("small");
            *expected.entry(name.clone()).or_default() += i64::try_from(n).expect("small");
            let req = request(Command::Credit {
                account: account(name),
                amount: amount(n),
            });
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let d = client
                    .submit_and_wait(&req, TRY_TIMEOUT, 2)
                    .await
                    .expect("decision");
                (req.op_id, d)
            }));
        }
        let mut seen = HashSet::new();
        for task in tasks {
            let (op_id, d) = task.await.expect("task");
            assert_eq!(d.op_id, op_id, "each gets its own decision");
            assert!(d.outcome.is_confirmed(), "{d:?}");
            assert!(seen.insert(op_id), "answered once");
        }
        assert_eq!(seen.len(), OPS);

        for (name, sum) in expected {
            let d = client
                .submit_and_wait(
                    &request(Command::Credit {
                        account: account(&name),
                        amount: amount(1),
                    }),
                    TRY_TIMEOUT,
                    1,
                )
                .await
                .expect("credit");
            assert_eq!(balance(&d), Some(sum + 1), "{name}: {d:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn resubmits_until_the_worker_answers() {
    // Proves the resubmission path: with no worker running the first waits time out, the same op is resubmitted, and once the workers start its one decision arrives.
    within(async {
        const PER_TRY: Duration = Duration::from_millis(300);
        let mut dep = Deployment::start("late", 2).await;
        let client = dep.client().await;
        let req = request(open("carol"));
        let started = Instant::now();
        let waiting = {
            let client = client.clone();
            let req = req.clone();
            tokio::spawn(async move { client.submit_and_wait(&req, PER_TRY, 40).await })
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!waiting.is_finished(), "no worker, no decision");
        dep.spawn_workers();
        let d = waiting.await.expect("task").expect("decision");
        assert!(d.outcome.is_confirmed(), "{d:?}");
        assert!(started.elapsed() > Duration::from_millis(1000));
        // Exactly one open: opening again is refused.
        let d = client
            .submit_and_wait(&request(open("carol")), TRY_TIMEOUT, 1)
            .await
            .expect("second open");
        assert!(!d.outcome.is_confirmed(), "{d:?}");

        // With no answer at all, the error says how long it tried.
        let none = Deployment::start("none", 1).await;
        let lonely = none.client().await;
        let req = request(open("dave"));
        match lonely
            .submit_and_wait(&req, Duration::from_millis(100), 3)
            .await
        {
            Err(Error::Timeout {
                op_id, tries: 3, ..
            }) => assert_eq!(op_id, req.op_id),
            other => panic!("expected a timeout, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn connect_reads_or_takes_the_partition_count() {
    // Proves the partition count comes from the meta bucket when not configured, and that a deployment that was never started is a clear Meta error.
    within(async {
        let dep = Deployment::start("meta", 3).await;
        assert_eq!(
            dep.client().await.partitions(),
            Partitions::new(3).expect("count")
        );
        let mut options = Options::new(dep.server.url());
        options.prefix = amends_client::Prefix::new("nowhere").expect("prefix");
        match amends_client::Client::connect(options.clone()).await {
            Err(Error::Meta { bucket, .. }) => assert_eq!(bucket, "NOWHERE_META"),
            Err(other) => panic!("expected a meta error, got {other}"),
            Ok(_) => panic!("expected a meta error, got a client"),
        }
        options.partitions = Some(Partitions::new(5).expect("count"));
        let client = amends_client::Client::connect(options)
            .await
            .expect("connect");
        assert_eq!(client.partitions().get(), 5);
        let mut empty = Options::new("x");
        empty.servers.clear();
        assert!(matches!(
            amends_client::Client::connect(empty).await,
            Err(Error::NoServers)
        ));
    })
    .await;
}

#[tokio::test]
async fn a_lost_reply_is_recovered_through_the_status_endpoint() {
    // Proves submit_and_wait survives a lost reply: the op is published without Amends-Reply-To (as if the service died between its commit and its reply) and decided; a resubmission inside the duplicate window is dropped by JetStream and answered by nobody, yet submit_and_wait returns the decision, learned from the status endpoint after its wait times out.
    within(async {
        let mut dep = Deployment::start_with_window("amends", 2, Duration::from_secs(120)).await;
        dep.spawn_service();
        let client = dep.client().await;
        let req = request(open("alice"));
        let p = client.partition_of(&req).expect("routable");

        let unknown = client.status(req.op_id, p, TRY_TIMEOUT).await;
        // The service may not have subscribed yet; once it answers, it is unknown.
        let deadline = Instant::now() + TRY_TIMEOUT;
        let mut unknown = unknown;
        while unknown.is_err() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            unknown = client.status(req.op_id, p, TRY_TIMEOUT).await;
        }
        assert_eq!(unknown.expect("status"), OpStatus::Unknown);

        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", text(req.op_id).as_str());
        dep.js()
            .publish_with_headers(
                dep.topology().prefix.req(p),
                headers,
                amends_core::wire::encode(&req).into(),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
        let decided = loop {
            match client.status(req.op_id, p, TRY_TIMEOUT).await {
                Ok(OpStatus::Decided(d)) => break d,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        assert!(decided.outcome.is_confirmed(), "{decided:?}");

        let started = Instant::now();
        let d = client
            .submit_and_wait(&req, Duration::from_millis(300), 3)
            .await
            .expect("decided through status");
        assert_eq!(d, decided);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // The resubmission was a JetStream duplicate: nobody replied to it.
        let again = client.submit(&req).await.expect("submit");
        assert!(again.duplicate, "{again:?}");
        // A body that is not an op id is refused by the endpoint.
        let nats = dep.js().client();
        let reply = nats
            .request(format!("amends.status.{p}"), "garbage".into())
            .await
            .expect("reply");
        let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
        assert_eq!(reply["status"], "error", "{reply}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_the_service_ride_out_a_nats_server_restart() {
    // Proves clients and service recover from a SIGKILLed and restarted nats-server on their own: 300 credits from 12 tasks through submit_and_wait while the server dies and comes back; every credit is confirmed and the balances show each applied exactly once.
    tokio::time::timeout(Duration::from_secs(90), async {
        const ACCOUNTS: usize = 6;
        const OPS: usize = 300;
        const TASKS: usize = 12;
        let mut dep = Deployment::start("restart", 3).await;
        dep.spawn_service();
        let client = dep.client().await;
        let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{i}")).collect();
        for name in &names {
            client
                .submit_and_wait(&request(open(name)), TRY_TIMEOUT, 3)
                .await
                .expect("open");
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut expected: BTreeMap<String, i64> = BTreeMap::new();
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let mut reqs = Vec::new();
            for i in (t..OPS).step_by(TASKS) {
                let name = names[i % ACCOUNTS].clone();
                let n = u64::try_from(i % 7 + 1).expect("small");
                *expected.entry(name.clone()).or_default() += i64::try_from(n).expect("small");
                reqs.push(request(Command::Credit {
                    account: account(&name),
                    amount: amount(n),
                }));
            }
            let (client, done) = (client.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                for r in reqs {
                    let d = client
                        .submit_and_wait(&r, Duration::from_secs(2), 30)
                        .await
                        .unwrap_or_else(|e| panic!("op {} got no decision: {e}", r.op_id));
                    assert!(d.outcome.is_confirmed(), "{d:?}");
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        while done.load(std::sync::atomic::Ordering::Relaxed) < OPS / 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        dep.server.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        dep.server.restart();
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), OPS);
        for name in &names {
            let d = client
                .submit_and_wait(
                    &request(Command::Credit {
                        account: account(name),
                        amount: amount(1),
                    }),
                    TRY_TIMEOUT,
                    5,
                )
                .await
                .expect("final credit");
            assert_eq!(balance(&d), Some(expected[name] + 1), "{name}: {d:?}");
        }
    })
    .await
    .expect("the test took longer than 90 s");
}
