//! Bad input through the real `amends serve` binary: raw bytes published to
//! `amends.req.0` behind the client's back, each checked against the answer
//! specs/protocol.md documents for it ("The order of checks", "Dead
//! letters", "Size limits", "Numbers", "The decision"), and the partition
//! still serving afterwards.

use std::time::Duration;

use amends_client::OpStatus;
use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::{Serve, Server, client};

/// One partition: every message lands on the same log, so the last check
/// proves that this partition, not another, kept working.
const SUBJECT: &str = "amends.req.0";
/// How long an answer may take.
const ANSWER: Duration = Duration::from_secs(10);
/// How long to wait to be sure no answer comes.
const QUIET: Duration = Duration::from_millis(1500);
/// The protocol's `REQUEST_BYTES_MAX`.
const REQUEST_BYTES_MAX: usize = 65_536;

struct Raw {
    nats: async_nats::Client,
    js: jetstream::Context,
    inbox: String,
    replies: async_nats::Subscriber,
}

impl Raw {
    async fn connect(server: &Server) -> Raw {
        let nats = amends_nats::test_support::connect(server).await;
        let inbox = nats.new_inbox();
        let replies = nats.subscribe(inbox.clone()).await.unwrap();
        nats.flush().await.unwrap();
        Raw {
            js: jetstream::new(nats.clone()),
            nats,
            inbox,
            replies,
        }
    }

    /// Publishes raw `body` with `Nats-Msg-Id` = `msg_id` and our inbox as
    /// `Amends-Reply-To`; returns its stream sequence.
    async fn publish(&self, msg_id: &str, body: Vec<u8>) -> u64 {
        self.publish_to(SUBJECT, msg_id, body, &self.inbox.clone())
            .await
    }

    /// Publishes raw `body` on `subject` with `Nats-Msg-Id` = `msg_id` and
    /// `Amends-Reply-To` = `reply_to`; returns its stream sequence.
    async fn publish_to(&self, subject: &str, msg_id: &str, body: Vec<u8>, reply_to: &str) -> u64 {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        headers.insert("Amends-Reply-To", reply_to);
        let ack = self
            .js
            .publish_with_headers(subject.to_owned(), headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(!ack.duplicate, "{msg_id} reached the log");
        ack.sequence
    }

    /// Publishes `body` on partition `p`'s subject with our inbox as
    /// `Amends-Reply-To` and returns its answer, checking it is for `op_id`.
    async fn ask_on(&mut self, p: u32, op_id: &str, body: Vec<u8>) -> Value {
        let inbox = self.inbox.clone();
        self.publish_to(&format!("amends.req.{p}"), op_id, body, &inbox)
            .await;
        let d = self.answer().await;
        assert_eq!(d["op_id"], op_id, "{d}");
        d
    }

    /// The next answer on our inbox.
    async fn answer(&mut self) -> Value {
        let msg = tokio::time::timeout(ANSWER, self.replies.next())
            .await
            .expect("an answer in time")
            .unwrap();
        serde_json::from_slice(&msg.payload).unwrap()
    }

    /// Publishes `body` and returns its answer, checking it is for `op_id`
    /// at the message's own position.
    async fn ask(&mut self, op_id: &str, body: Vec<u8>) -> Value {
        let position = self.publish(op_id, body).await;
        let d = self.answer().await;
        assert_eq!(d["op_id"], op_id, "{d}");
        assert_eq!(d["position"], position, "{d}");
        d
    }

    async fn no_answer(&mut self) {
        if let Ok(m) = tokio::time::timeout(QUIET, self.replies.next()).await {
            panic!("expected no answer, got {m:?}");
        }
    }

    /// Every message of stream `name`: (headers, body).
    async fn stream(&self, name: &str) -> Vec<(HeaderMap, Vec<u8>)> {
        let stream = self.js.get_stream(name).await.unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push((m.headers, m.payload.to_vec()));
            }
        }
        out
    }

    /// The decisions stream's messages for `op_id`, once there is one.
    async fn decided(&self, op_id: &str) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            let found = self.decisions_of(op_id).await;
            if !found.is_empty() {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no decision for {op_id}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The decisions stream's messages for `op_id`.
    async fn decisions_of(&self, op_id: &str) -> Vec<Value> {
        self.stream("AMENDS_DEC")
            .await
            .into_iter()
            .map(|(_, body)| serde_json::from_slice::<Value>(&body).unwrap())
            .filter(|d| d["op_id"] == op_id)
            .collect()
    }

    /// Waits for the dead letter of `position` and returns it.
    async fn dead_letter(&self, position: u64) -> (HeaderMap, Vec<u8>) {
        let msg_id = format!("dlq-0-{position}");
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            let found =
                self.stream("AMENDS_DLQ").await.into_iter().find(|(h, _)| {
                    h.get("Nats-Msg-Id").map(|v| v.as_str()) == Some(msg_id.as_str())
                });
            if let Some(found) = found {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no dead letter {msg_id}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn v7() -> String {
    amends_client::Client::new_op_id().to_string()
}

fn body(value: Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

fn code(d: &Value) -> &str {
    if d["outcome"] == "confirmed" {
        "confirmed"
    } else {
        d["reason"]["code"].as_str().unwrap()
    }
}

/// Asserts a `malformed` refusal whose detail mentions `needle`.
fn assert_malformed(d: &Value, needle: &str) {
    assert_eq!(code(d), "malformed", "{d}");
    let detail = d["reason"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(needle),
        "detail {detail:?} lacks {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_message_gets_its_documented_answer_and_the_partition_keeps_working() {
    // Proves protocol.md's answers to bad input end to end through the built binary: dead letters (raw bytes + Amends-Error), malformed/overflow refusals recorded once, conflicts and non-v7 ids answered to the sender only, and a normal op confirmed afterwards with the exact balance.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, &dir.path().join("data"), 1);
    let client = client(&server, 1).await;
    let mut raw = Raw::connect(&server).await;

    // Setup: an account holding i64::MAX, so overflow is one unit away.
    let open = v7();
    let d = raw
        .ask(
            &open,
            body(json!({"op_id": open, "command": {"type": "open_account", "account": "a"}})),
        )
        .await;
    assert_eq!(code(&d), "confirmed", "{d}\n{}", serve.log());
    let fill = v7();
    let filled = raw
        .ask(
            &fill,
            body(json!({"op_id": fill, "command": {"type": "credit", "account": "a", "amount": i64::MAX}})),
        )
        .await;
    assert_eq!(filled["balance"], i64::MAX, "{filled}");

    // 1. Not JSON, no readable op id: a dead letter with the raw bytes and
    //    the error, no answer to the sender.
    let garbage = b"{ \"op_id\": \"oops\", this is not json".to_vec();
    let position = raw.publish("garbage-1", garbage.clone()).await;
    let (headers, bytes) = raw.dead_letter(position).await;
    assert_eq!(bytes, garbage, "the raw bytes, unchanged");
    let error = headers.get("Amends-Error").unwrap().as_str().to_owned();
    assert!(!error.is_empty(), "the error is in Amends-Error");
    // Valid JSON but no op id, and a v7 op id followed by trailing bytes:
    // both unreadable.
    for (i, bad) in [
        body(json!({"command": {"type": "credit", "account": "a", "amount": 1}})),
        format!(
            r#"{{"op_id":"{}","command":{{"type":"tick"}}}} trailing"#,
            v7()
        )
        .into_bytes(),
    ]
    .into_iter()
    .enumerate()
    {
        let position = raw
            .publish(&format!("garbage-{}", i + 2), bad.clone())
            .await;
        assert_eq!(raw.dead_letter(position).await.1, bad);
    }
    raw.no_answer().await;

    // 2. A readable op id, a body that does not validate: `malformed`,
    //    recorded and published once.
    let missing = v7();
    let d = raw
        .ask(
            &missing,
            body(json!({"op_id": missing, "command": {"type": "credit", "account": "a"}})),
        )
        .await;
    assert_malformed(&d, "amount");
    assert_eq!(raw.decisions_of(&missing).await, std::slice::from_ref(&d));
    let wrong_type = v7();
    let d = raw
        .ask(
            &wrong_type,
            body(json!({"op_id": wrong_type, "command": {"type": "credit", "account": "a", "amount": "5"}})),
        )
        .await;
    assert_eq!(code(&d), "malformed", "{d}");
    let fraction = v7();
    let d = raw
        .ask(
            &fraction,
            format!(r#"{{"op_id":"{fraction}","command":{{"type":"credit","account":"a","amount":5.0}}}}"#)
                .into_bytes(),
        )
        .await;
    assert_eq!(code(&d), "malformed", "5.0 is not an integer: {d}");

    // 3. Unknown fields, at the top level and inside the command.
    let top = v7();
    let d = raw
        .ask(
            &top,
            body(json!({"op_id": top, "command": {"type": "credit", "account": "a", "amount": 1}, "priority": "high"})),
        )
        .await;
    assert_malformed(&d, "priority");
    let nested = v7();
    let d = raw
        .ask(
            &nested,
            body(json!({"op_id": nested, "command": {"type": "credit", "account": "a", "amount": 1, "memo": "x"}})),
        )
        .await;
    assert_malformed(&d, "memo");

    // 4. An unknown command type.
    let unknown = v7();
    let d = raw
        .ask(
            &unknown,
            body(json!({"op_id": unknown, "command": {"type": "teleport", "account": "a"}})),
        )
        .await;
    assert_malformed(&d, "teleport");

    // 5. Over 64 KiB. The streams set no maximum message size (NATS's
    //    1 MiB max_payload applies), so the log takes it and the worker
    //    answers: `malformed` when the op id is readable, else a dead letter.
    let big = v7();
    let oversize = body(json!({
        "op_id": big,
        "command": {"type": "credit", "account": "a", "amount": 1},
        "apology_topic": "x".repeat(REQUEST_BYTES_MAX),
    }));
    assert!(oversize.len() > REQUEST_BYTES_MAX);
    let d = raw.ask(&big, oversize.clone()).await;
    assert_malformed(&d, "more than the limit of 65536");
    let oversize = format!(
        r#"{{"command":{{"type":"tick"}},"pad":"{}"}}"#,
        "x".repeat(REQUEST_BYTES_MAX)
    )
    .into_bytes();
    let position = raw.publish("oversize-no-id", oversize.clone()).await;
    let (headers, bytes) = raw.dead_letter(position).await;
    assert_eq!(bytes, oversize);
    let error = headers.get("Amends-Error").unwrap().as_str().to_owned();
    assert!(error.contains("65536"), "{error}");
    raw.no_answer().await;

    // 6. Numbers out of range: an amount beyond u64 does not parse
    //    (`malformed`); one beyond i64 parses and is `overflow`; so is a
    //    credit that would carry the balance past i64::MAX.
    let beyond_u64 = v7();
    let d = raw
        .ask(
            &beyond_u64,
            format!(r#"{{"op_id":"{beyond_u64}","command":{{"type":"credit","account":"a","amount":18446744073709551616}}}}"#)
                .into_bytes(),
        )
        .await;
    assert_eq!(code(&d), "malformed", "{d}");
    for amount in [u64::MAX, 1_u64 << 63] {
        for kind in ["credit", "debit"] {
            let op = v7();
            let d = raw
                .ask(
                    &op,
                    body(json!({"op_id": op, "command": {"type": kind, "account": "a", "amount": amount}})),
                )
                .await;
            assert_eq!(code(&d), "overflow", "{kind} {amount}: {d}");
        }
    }
    let past_max = v7();
    let d = raw
        .ask(
            &past_max,
            body(json!({"op_id": past_max, "command": {"type": "credit", "account": "a", "amount": 1}})),
        )
        .await;
    assert_eq!(code(&d), "overflow", "i64::MAX + 1: {d}");
    let floor = v7();
    let d = raw
        .ask(
            &floor,
            format!(r#"{{"op_id":"{floor}","command":{{"type":"open_account","account":"b","floor":-9223372036854775809}}}}"#)
                .into_bytes(),
        )
        .await;
    assert_eq!(code(&d), "malformed", "a floor below i64::MIN: {d}");

    // 7. A reused op id with another body: `op_id_conflict`, to the sender
    //    only; the original decision stands (decisions stream, status).
    //    Published under another Nats-Msg-Id, or JetStream would drop it as
    //    a duplicate inside its window before amends ever saw it.
    let original = raw.decisions_of(&fill).await;
    assert_eq!(original, std::slice::from_ref(&filled));
    let position = raw
        .publish(
            &format!("{fill}-again"),
            body(
                json!({"op_id": fill, "command": {"type": "credit", "account": "a", "amount": 2}}),
            ),
        )
        .await;
    let d = raw.answer().await;
    assert_eq!(code(&d), "op_id_conflict", "{d}");
    assert_eq!(d["op_id"], fill.as_str());
    assert_eq!(
        d["position"], position,
        "the conflict carries the current position"
    );
    assert_eq!(
        raw.decisions_of(&fill).await,
        original,
        "nothing published again"
    );
    let partition = amends_core::route::Partitions::new(1)
        .unwrap()
        .id(0)
        .unwrap();
    match client
        .status(fill.parse().unwrap(), partition, ANSWER)
        .await
        .unwrap()
    {
        OpStatus::Decided(decision) => {
            assert_eq!(serde_json::to_value(&decision).unwrap(), filled)
        }
        OpStatus::Unknown => panic!("the original decision is remembered"),
    }

    // 8. An op id that is a UUID but not version 7: `malformed` with the
    //    protocol's detail, to the sender only, nothing recorded.
    let v4 = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
    let d = raw
        .ask(
            v4,
            body(json!({"op_id": v4, "command": {"type": "credit", "account": "a", "amount": 1}})),
        )
        .await;
    assert_malformed(&d, "op_id must be a UUID version 7 (see specs/protocol.md)");
    assert!(raw.decisions_of(v4).await.is_empty(), "not published");
    match client
        .status(v4.parse().unwrap(), partition, ANSWER)
        .await
        .unwrap()
    {
        OpStatus::Unknown => {}
        OpStatus::Decided(d) => panic!("a non-v7 op id is not recorded: {d:?}"),
    }

    // After all of it, the partition still decides, with the exact balance.
    let last = v7();
    let d = raw
        .ask(
            &last,
            body(json!({"op_id": last, "command": {"type": "debit", "account": "a", "amount": 1}})),
        )
        .await;
    assert_eq!(code(&d), "confirmed", "{d}");
    assert_eq!(
        d["balance"],
        i64::MAX - 1,
        "no refused op changed the balance: {d}"
    );
    let mut serve = serve;
    serve.assert_running();
    drop(raw.nats);
}

/// The partition count of the routing tests: enough for keys to differ.
const PARTITIONS: u32 = 4;

/// The partition (of [`PARTITIONS`]) that owns `routing_key`.
fn partition_of(routing_key: &str) -> u32 {
    let n = amends_core::route::Partitions::new(PARTITIONS).unwrap();
    amends_core::route::partition_of(routing_key, n).get()
}

/// A partition other than `p`.
fn another(p: u32) -> u32 {
    (p + 1) % PARTITIONS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_the_wrong_partition_is_refused_and_a_key_keeps_one_owner() {
    // Proves routing is checked by the service: open_account and claim published raw on a partition that does not own their key are refused wrong_partition naming the owner (recorded: on the decisions stream and in the status of that partition), nothing is opened or claimed there, the same key is then claimed on its own partition by another owner, which the first owner cannot take over, and audit re-derives it all.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let mut raw = Raw::connect(&server).await;
    let key = "misrouted@example.com";
    let key_home = partition_of(&amends_core::route::claim_routing_key("email", key));
    let account = "misrouted-account";
    let account_home = partition_of(account);

    // A claim by o1 on the wrong partition: refused, naming the right one.
    let wrong = another(key_home);
    let first = v7();
    let claim = |op: &str, owner: &str| {
        body(
            json!({"op_id": op, "command": {"type": "claim", "namespace": "email", "key": key, "owner": owner}}),
        )
    };
    let d = raw.ask_on(wrong, &first, claim(&first, "o1")).await;
    assert_eq!(d["partition"], wrong, "decided where it was published: {d}");
    assert_eq!(
        d["reason"],
        json!({"code": "wrong_partition", "partition": key_home}),
        "{d}\n{}",
        serve.log()
    );
    assert_eq!(raw.decisions_of(&first).await, std::slice::from_ref(&d));
    let wrong_id = amends_core::route::Partitions::new(PARTITIONS)
        .unwrap()
        .id(wrong)
        .unwrap();
    match client
        .status(first.parse().unwrap(), wrong_id, ANSWER)
        .await
        .unwrap()
    {
        OpStatus::Decided(decision) => assert_eq!(serde_json::to_value(&decision).unwrap(), d),
        OpStatus::Unknown => panic!("the refusal is recorded"),
    }

    // An open_account on the wrong partition: refused too.
    let open = v7();
    let wrong_account = another(account_home);
    let d = raw
        .ask_on(
            wrong_account,
            &open,
            body(json!({"op_id": open, "command": {"type": "open_account", "account": account}})),
        )
        .await;
    assert_eq!(
        d["reason"],
        json!({"code": "wrong_partition", "partition": account_home}),
        "{d}"
    );

    // On its own partition the key is claimed by o2, once; o1 is then
    // refused there: one owner, whatever o1's client did.
    let second = v7();
    let d = raw.ask_on(key_home, &second, claim(&second, "o2")).await;
    assert_eq!(code(&d), "confirmed", "{d}");
    let third = v7();
    let d = raw.ask_on(key_home, &third, claim(&third, "o1")).await;
    assert_eq!(
        d["reason"],
        json!({"code": "already_claimed", "owner": "o2"}),
        "{d}"
    );
    let owner = client
        .claim_owner(
            &amends_core::command::Namespace::new("email").unwrap(),
            &amends_core::command::ClaimKey::new(key).unwrap(),
            ANSWER,
        )
        .await
        .unwrap();
    let owner = serde_json::to_value(&owner).unwrap();
    assert_eq!(owner["owner"], "o2", "{owner}");
    // The account was not opened anywhere: a credit on its own partition
    // finds no account.
    let credit = v7();
    let d = raw.ask_on(account_home, &credit, body(json!({"op_id": credit, "command": {"type": "credit", "account": account, "amount": 1}}))).await;
    assert_eq!(code(&d), "unknown_account", "{d}");

    let out = crate::audit::audit(&server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("audit passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut serve = serve;
    serve.assert_running();
    drop(raw.nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reply_subject_is_refused_and_other_clients_are_answered() {
    // Proves a request whose Amends-Reply-To cannot be published to (5,000 bytes, a wildcard token, an empty token) is refused reply_subject_invalid on the decisions stream and in its status, with no effect, while the service keeps its connection: a client waiting on its own replies meanwhile gets every answer.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, &dir.path().join("data"), 1);
    let client = client(&server, 1).await;
    let mut raw = Raw::connect(&server).await;
    let open = v7();
    let d = raw
        .ask(
            &open,
            body(json!({"op_id": open, "command": {"type": "open_account", "account": "a"}})),
        )
        .await;
    assert_eq!(code(&d), "confirmed", "{d}\n{}", serve.log());
    let partition = amends_core::route::Partitions::new(1)
        .unwrap()
        .id(0)
        .unwrap();
    let long = format!("_INBOX.{}", "x".repeat(5_000));
    for reply_to in [long.as_str(), "_INBOX.bad.*", "_INBOX.bad.>", "_INBOX..bad"] {
        let op = v7();
        raw.publish_to(
            SUBJECT,
            &op,
            body(json!({"op_id": op, "command": {"type": "credit", "account": "a", "amount": 7}})),
            reply_to,
        )
        .await;
        // A client that waits properly is answered meanwhile.
        let ok = amends_core::command::Request {
            op_id: amends_client::Client::new_op_id(),
            command: amends_core::command::Command::Credit {
                account: amends_core::command::AccountId::new("a").unwrap(),
                amount: amends_core::command::Amount::new(1).unwrap(),
            },
            apology_topic: None,
        };
        let answered = client
            .submit_and_wait(&ok, ANSWER, 1)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "another client unanswered after {reply_to:.40}: {e}\n{}",
                    serve.log()
                )
            });
        assert!(answered.outcome.is_confirmed(), "{answered:?}");
        let found = raw.decided(&op).await;
        assert_eq!(found.len(), 1, "{found:?}");
        let d = &found[0];
        assert_eq!(
            d["reason"],
            json!({"code": "reply_subject_invalid", "bytes_max": 256}),
            "reply subject {reply_to:.40}: {d}"
        );
        match client
            .status(op.parse().unwrap(), partition, ANSWER)
            .await
            .unwrap()
        {
            OpStatus::Decided(decision) => assert_eq!(&serde_json::to_value(&decision).unwrap(), d),
            OpStatus::Unknown => panic!("the refusal is recorded"),
        }
    }
    // None of the credits of 7 was applied: one more credit shows the
    // balance.
    let last = v7();
    let d = raw
        .ask(
            &last,
            body(
                json!({"op_id": last, "command": {"type": "credit", "account": "a", "amount": 1}}),
            ),
        )
        .await;
    assert_eq!(d["balance"], 5, "five credits of 1, none of 7: {d}");
    let mut serve = serve;
    serve.assert_running();
    drop(raw.nats);
}
