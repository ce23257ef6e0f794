//! `amends tail` against a real nats-server and `amends serve`: every
//! decision, apology and dead letter once, never an ownership record, the
//! filters, the text format, and `--since new`.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use amends_client::{Client, Decision, Request};
use amends_core::route::{PartitionId, partition_of};
use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::{Value, json};

use crate::support::{AMENDS, Serve, Server, client};

const PARTITIONS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(5);

fn request(value: Value) -> Request {
    let mut value = value;
    value["op_id"] = json!(Client::new_op_id().to_string());
    serde_json::from_value(value).unwrap()
}

async fn decide(client: &Client, r: &Request) -> Decision {
    client.submit_and_wait(r, TIMEOUT, 3).await.unwrap()
}

/// `amends tail` with `args`; bounded by its own `--idle-exit-ms`.
fn tail(server: &Server, args: &[&str]) -> Output {
    let out = Command::new(AMENDS)
        .arg("tail")
        .args(args)
        .args(["--nats-url", &server.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    out
}

/// `amends tail --json` with `args`: one object a line.
fn tail_json(server: &Server, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    String::from_utf8(tail(server, &all).stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The op id a line is about: a decision's, or an apology's decision's;
/// `dead_letter` for a dead letter.
fn op_of(line: &Value) -> String {
    match line["kind"].as_str() {
        Some("decision") => line["op_id"].as_str().unwrap().to_owned(),
        Some("apology") => line["decision"]["op_id"].as_str().unwrap().to_owned(),
        Some("dead_letter") => "dead_letter".to_owned(),
        other => panic!("unexpected kind {other:?}: {line}"),
    }
}

/// `(kind, op)` of every line, sorted.
fn kinds_and_ops(lines: &[Value]) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = lines
        .iter()
        .map(|l| (l["kind"].as_str().unwrap().to_owned(), op_of(l)))
        .collect();
    all.sort();
    all
}

/// An account name routed to another partition than `not`.
fn account_not_on(not: PartitionId, partitions: amends_core::route::Partitions) -> String {
    (0..)
        .map(|i| format!("bob-{i}"))
        .find(|name| partition_of(name, partitions) != not)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_shows_each_decision_apology_and_dead_letter_once_and_filters_them() {
    // Proves `amends tail --since all` prints every decision, apology and dead letter of a workload exactly once with its kind and fields (and no ownership record, though each partition has one), that --outcome, --partition, --topic and --op-id keep exactly the matching ones, and that the text format names every op id.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, dir.path(), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let alice_p = partition_of("alice", client.partitions());
    let bob = account_not_on(alice_p, client.partitions());
    let bob_p = partition_of(&bob, client.partitions());

    let open = request(json!({"command": {"type": "open_account", "account": "alice"}}));
    let credit = request(json!({"command": {"type": "credit", "account": "alice", "amount": 100}}));
    let overdraw = request(
        json!({"command": {"type": "debit", "account": "alice", "amount": 1000}, "apology_topic": "orders"}),
    );
    let unknown = request(
        json!({"command": {"type": "credit", "account": bob, "amount": 5}, "apology_topic": "billing.eu"}),
    );
    let mut decided = Vec::new();
    for r in [&open, &credit, &overdraw, &unknown] {
        decided.push(decide(&client, r).await);
    }
    let codes: Vec<Option<&str>> = decided
        .iter()
        .map(|d| d.outcome.reason().map(|r| r.code()))
        .collect();
    assert_eq!(
        codes,
        [
            None,
            None,
            Some("insufficient_funds"),
            Some("unknown_account")
        ]
    );
    // An unreadable message on alice's partition: a dead letter.
    let js = jetstream::new(amends_nats::test_support::connect(&server).await);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "garbage-1");
    let ack = js
        .publish_with_headers(format!("amends.req.{alice_p}"), headers, "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let [open, credit, overdraw, unknown] =
        [&open, &credit, &overdraw, &unknown].map(|r| r.op_id.to_string());
    let expected_all = {
        let mut e: Vec<(String, String)> = [
            ("decision", &open),
            ("decision", &credit),
            ("decision", &overdraw),
            ("decision", &unknown),
            ("apology", &overdraw),
            ("apology", &unknown),
        ]
        .into_iter()
        .map(|(k, o)| (k.to_owned(), o.clone()))
        .collect();
        e.push(("dead_letter".to_owned(), "dead_letter".to_owned()));
        e.sort();
        e
    };

    // Everything, once the dead letter is there: exactly the 7 messages.
    // --count first, so that a slow dead letter is waited for; then with
    // only the idle bound, so that an extra message (an ownership record,
    // a second copy) would show.
    let counted = tail_json(
        &server,
        &["--since", "all", "--count", "7", "--idle-exit-ms", "10000"],
    );
    assert_eq!(kinds_and_ops(&counted), expected_all, "{counted:#?}");
    let lines = tail_json(&server, &["--since", "all", "--idle-exit-ms", "1500"]);
    assert_eq!(
        kinds_and_ops(&lines),
        expected_all,
        "{lines:#?}\n{}",
        serve.log()
    );
    let mut seqs = std::collections::HashSet::new();
    for line in &lines {
        let subject = line["subject"].as_str().unwrap();
        assert!(!subject.contains(".owner."), "{line}");
        assert!(line["stream_time_ms"].as_u64().unwrap() > 0, "{line}");
        let seq = line["stream_seq"].as_u64().unwrap();
        assert!(
            seqs.insert((subject.split('.').nth(1).unwrap(), seq)),
            "{line}"
        );
        match line["kind"].as_str().unwrap() {
            "decision" => {
                let d = decided
                    .iter()
                    .find(|d| d.op_id.to_string() == op_of(line))
                    .unwrap();
                assert_eq!(subject, format!("amends.dec.{}", d.partition), "{line}");
                // The decision as published, plus where it was.
                let mut published = line.clone();
                for k in ["kind", "stream_seq", "stream_time_ms", "subject"] {
                    published.as_object_mut().unwrap().remove(k);
                }
                assert_eq!(published, serde_json::to_value(d).unwrap(), "{line}");
            }
            "apology" => {
                let op = op_of(line);
                let (topic, account) = if op == overdraw {
                    ("orders", "alice")
                } else {
                    ("billing.eu", bob.as_str())
                };
                assert_eq!(line["topic"], topic, "{line}");
                assert_eq!(subject, format!("amends.apology.{topic}"), "{line}");
                assert_eq!(line["command"]["account"], account, "{line}");
                assert_eq!(line["decision"]["outcome"], "rejected", "{line}");
            }
            "dead_letter" => {
                assert_eq!(subject, format!("amends.dlq.{alice_p}"), "{line}");
                assert_eq!(line["partition"], alice_p.get(), "{line}");
                assert_eq!(line["position"], ack.sequence, "{line}");
                assert_eq!(line["body"], "not json", "{line}");
                assert!(!line["error"].as_str().unwrap().is_empty(), "{line}");
            }
            other => panic!("{other}"),
        }
    }

    let pick = |keep: &dyn Fn(&(String, String)) -> bool| -> Vec<(String, String)> {
        expected_all.iter().filter(|e| keep(e)).cloned().collect()
    };
    let filtered = |args: &[&str]| {
        let mut all = vec!["--since", "all", "--idle-exit-ms", "1500"];
        all.extend_from_slice(args);
        kinds_and_ops(&tail_json(&server, &all))
    };
    // Refusals: the two rejected decisions and their apologies.
    assert_eq!(
        filtered(&["--outcome", "rejected"]),
        pick(&|(_, o)| *o == overdraw || *o == unknown)
    );
    assert_eq!(
        filtered(&["--outcome", "confirmed"]),
        pick(&|(k, o)| k == "decision" && (*o == open || *o == credit))
    );
    assert_eq!(
        filtered(&["--reason", "unknown_account"]),
        pick(&|(_, o)| *o == unknown)
    );
    // A partition: alice's operations and the dead letter, nothing of bob.
    let alice_arg = alice_p.get().to_string();
    assert_eq!(
        filtered(&["--partition", &alice_arg]),
        pick(&|(_, o)| *o != unknown)
    );
    let bob_arg = bob_p.get().to_string();
    assert_eq!(
        filtered(&["--partition", &bob_arg, "--partition", &alice_arg]),
        expected_all
    );
    assert_eq!(
        filtered(&["--partition", &bob_arg, "--dead-letters"]),
        Vec::new()
    );
    // A topic: only its apology.
    assert_eq!(
        filtered(&["--topic", "billing.eu"]),
        vec![("apology".to_owned(), unknown.clone())]
    );
    assert_eq!(
        filtered(&["--op-id", &overdraw]),
        pick(&|(_, o)| *o == overdraw)
    );
    assert_eq!(
        filtered(&["--decisions", "--op-id", &overdraw]),
        vec![("decision".to_owned(), overdraw.clone())]
    );

    // The text format: one line a message, naming its op id, the outcome
    // and the reason.
    let text =
        String::from_utf8(tail(&server, &["--since", "all", "--idle-exit-ms", "1500"]).stdout)
            .unwrap();
    assert_eq!(text.lines().count(), 7, "{text}");
    assert!(!text.contains('\x1b'), "no colour off a terminal: {text}");
    for op in [&open, &credit, &overdraw, &unknown] {
        assert!(
            text.lines()
                .any(|l| l.contains(op.as_str()) && l.contains("decision")),
            "{op}: {text}"
        );
    }
    assert!(
        text.lines().any(|l| l.contains(overdraw.as_str())
            && l.contains("rejected insufficient_funds")
            && l.contains("requested=1000")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("apology")
            && l.contains("topic=orders")
            && l.contains("refused debit")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("dead_letter")
            && l.contains(&format!("p{alice_p} "))
            && l.contains(&format!("@{}", ack.sequence))
            && l.contains("\"not json\"")),
        "{text}"
    );
}

/// Waits until a spawned `amends tail` says on stderr that it watches.
fn wait_watching(child: &mut std::process::Child) {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    tokio::task::block_in_place(|| stderr.read_line(&mut said)).unwrap();
    assert!(said.contains("watching"), "{said:?}");
}

/// The exit code of `child` once it exits, within `within`.
async fn exit_code(child: &mut std::process::Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "tail did not exit in {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_since_new_shows_only_what_comes_after_it_starts() {
    // Proves `amends tail --since new --count 2` prints the two decisions submitted after it said it was watching, and none of the ones before, then exits 0; that SIGINT stops it with exit 0; and that an error (a partition the deployment lacks) exits 2.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let _serve = Serve::start(&server, dir.path(), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let before = request(json!({"command": {"type": "open_account", "account": "early"}}));
    decide(&client, &before).await;

    let mut child = Command::new(AMENDS)
        .args(["tail", "--json", "--since", "new", "--count", "2"])
        .args(["--idle-exit-ms", "20000", "--nats-url", &server.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_watching(&mut child);

    let after = [
        request(json!({"command": {"type": "open_account", "account": "late"}})),
        request(json!({"command": {"type": "credit", "account": "late", "amount": 7}})),
    ];
    for r in &after {
        decide(&client, r).await;
    }
    assert_eq!(
        exit_code(&mut child, Duration::from_secs(20)).await,
        Some(0)
    );
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let ops: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|l| op_of(&l))
        .collect();
    let expected: Vec<String> = after.iter().map(|r| r.op_id.to_string()).collect();
    assert_eq!(ops, expected, "{out}");

    // Ctrl-C: a clean stop, exit 0.
    let mut child = Command::new(AMENDS)
        .args(["tail", "--nats-url", &server.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_watching(&mut child);
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(
        exit_code(&mut child, Duration::from_secs(10)).await,
        Some(0)
    );

    let bad = Command::new(AMENDS)
        .args(["tail", "--partition", "9", "--nats-url", &server.url()])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--partition 9"),
        "{bad:?}"
    );
}
