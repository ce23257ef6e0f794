//! The query endpoints, `amends status/balance/claim-owner/stats` and the
//! Prometheus endpoint of `amends serve --metrics-addr`, against the real
//! binary and a real nats-server.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use amends_client::{Client, Decision, PartitionState, Request};
use amends_core::command::{AccountId, ClaimKey, Namespace};
use amends_core::route::partition_of;
use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::{Value, json};

use crate::support::{AMENDS, Server, client};

const PARTITIONS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(5);

/// `amends serve` with `--metrics-addr`, killed (by its own handle) on drop.
struct ServeWithMetrics {
    child: Child,
    log: std::path::PathBuf,
}

impl ServeWithMetrics {
    fn start(server: &Server, dir: &Path, metrics: &str) -> ServeWithMetrics {
        let log = dir.join("serve.log");
        let child = Command::new(AMENDS)
            .args(["serve", "--nats-url", &server.url(), "--partitions"])
            .arg(PARTITIONS.to_string())
            .args(["--data-dir"])
            .arg(dir.join("data"))
            .args(["--duplicate-window-ms", "1000"])
            .env("AMENDS_METRICS_ADDR", metrics)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ServeWithMetrics { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServeWithMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics`: the body, if it answered 200.
fn scrape(addr: &str) -> Option<String> {
    get(addr, "/metrics").and_then(|(status, body)| (status == 200).then_some(body))
}

/// `GET path` over a plain TCP connection (HTTP/1.0: no chunking): the
/// status code and the body.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The sum of every sample of `name` whose labels include all of `labels`.
fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

fn request(value: Value) -> Request {
    let mut value = value;
    value["op_id"] = json!(Client::new_op_id().to_string());
    serde_json::from_value(value).unwrap()
}

fn amends(server: &Server, args: &[&str]) -> Output {
    Command::new(AMENDS)
        .args(args)
        .args(["--nats-url", &server.url()])
        .output()
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

async fn decide(client: &Client, r: &Request) -> Decision {
    client.submit_and_wait(r, TIMEOUT, 3).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_cli_exit_codes_and_metrics_after_a_workload() {
    // Proves the query endpoints and the metrics against the real binary: after credits, a hold, claims, a refused optimistic debit, an amends-level duplicate and a dead letter, the balance, claim owner and stats endpoints (client and CLI) answer exactly, `amends status` exits 0/1/3/2, bad bodies get error answers, and /metrics shows the exact counts.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let serve = ServeWithMetrics::start(&server, dir.path(), &metrics_addr);
    let client = client(&server, PARTITIONS).await;

    // Before any traffic: every partition's counters are there at zero,
    // with the build info, so a rate over them misses no first event.
    let deadline = Instant::now() + Duration::from_secs(10);
    let zero = |text: &str, name: &str, p: u32| {
        text.lines()
            .any(|l| l.starts_with(&format!("{name}{{partition=\"{p}\"")) && l.ends_with(" 0"))
    };
    let before = loop {
        match scrape(&metrics_addr) {
            Some(text) if zero(&text, "amends_duplicates_total", PARTITIONS - 1) => break text,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("no zero counters: {other:?}\n{}", serve.log()),
        }
    };
    for p in 0..PARTITIONS {
        for name in [
            "amends_duplicates_total",
            "amends_conflicts_total",
            "amends_dead_letters_total",
            "amends_apologies_total",
            "amends_optimistic_total",
            "amends_partition_restarts_total",
            "amends_fence_busy_total",
        ] {
            assert!(
                zero(&before, name, p),
                "{name} of partition {p} at 0:\n{before}"
            );
        }
    }
    assert_eq!(
        sample_sum(
            &before,
            "amends_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0,
        "{before}"
    );
    // Health beside the metrics: alive, ready once every partition runs,
    // and nothing else on other paths.
    assert_eq!(
        get(&metrics_addr, "/healthz"),
        Some((200, "ok\n".to_owned()))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&metrics_addr, "/readyz").unwrap();
        if status == 200 {
            assert!(body.starts_with("ready\n"), "{body}");
            assert_eq!(
                body.matches(": running").count(),
                PARTITIONS as usize,
                "{body}"
            );
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "not ready in time: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&metrics_addr, "/nope").map(|(s, _)| s), Some(404));
    // A second serve stands by: alive, and not ready, saying why.
    let standby_dir = tempfile::tempdir().unwrap();
    let standby_addr = format!("127.0.0.1:{}", free_port());
    let standby = ServeWithMetrics::start(&server, standby_dir.path(), &standby_addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        match get(&standby_addr, "/readyz") {
            Some((503, body)) if body.contains("deployment lease") => break body,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("standby /readyz: {other:?}\n{}", standby.log()),
        }
    };
    assert!(
        waiting.starts_with("not ready: waiting for the deployment lease"),
        "{waiting}"
    );
    assert_eq!(get(&standby_addr, "/healthz").map(|(s, _)| s), Some(200));
    drop(standby);

    // The micro service's metadata names the deployment and the instance.
    let nats = amends_nats::test_support::connect(&server).await;
    let info = nats.request("$SRV.INFO.amends", "".into()).await.unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["metadata"]["prefix"], "amends", "{info}");
    assert_eq!(
        info["metadata"]["partitions"],
        PARTITIONS.to_string(),
        "{info}"
    );
    assert!(
        info["metadata"]["instance"]
            .as_str()
            .is_some_and(|i| i.ends_with(&format!(":{}", serve.child.id()))),
        "{info}"
    );

    let alice_partition = partition_of("alice", client.partitions());
    // An unreadable message: a dead letter, first in alice's partition (the
    // applied position moves past it like past any message).
    let js = jetstream::new(amends_nats::test_support::connect(&server).await);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "garbage-1");
    js.publish_with_headers(
        format!("amends.req.{alice_partition}"),
        headers,
        "not json".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let open = request(json!({"command": {"type": "open_account", "account": "alice"}}));
    let credit = request(json!({"command": {"type": "credit", "account": "alice", "amount": 100}}));
    let hold = request(json!({"command": {"type": "hold", "account": "alice", "amount": 30}}));
    let debit = request(
        json!({"command": {"type": "debit", "account": "alice", "amount": 1000}, "apology_topic": "orders"}),
    );
    let claim = request(
        json!({"command": {"type": "claim", "namespace": "username", "key": "alice", "owner": "owner-1"}}),
    );
    let taken = request(
        json!({"command": {"type": "claim", "namespace": "username", "key": "alice", "owner": "owner-2"}}),
    );
    let mut decided = Vec::new();
    for r in [&open, &credit, &hold, &debit, &claim, &taken] {
        decided.push(decide(&client, r).await);
    }
    let confirmed: Vec<bool> = decided.iter().map(|d| d.outcome.is_confirmed()).collect();
    assert_eq!(
        confirmed,
        [true, true, true, false, true, false],
        "{decided:?}"
    );
    // Past the 1 s duplicate window, the resubmitted credit reaches the log
    // and amends answers it as a duplicate, with the same decision.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(decide(&client, &credit).await, decided[1]);
    // The client's queries.
    let alice = AccountId::new("alice").unwrap();
    let balance = client.balance(&alice, TIMEOUT).await.unwrap().unwrap();
    assert_eq!(
        (
            balance.balance,
            balance.held,
            balance.available,
            balance.floor,
            balance.ceiling
        ),
        (100, 30, 70, 0, None)
    );
    let nobody = AccountId::new("nobody").unwrap();
    assert_eq!(client.balance(&nobody, TIMEOUT).await.unwrap(), None);
    let ns = Namespace::new("username").unwrap();
    let owner = client
        .claim_owner(&ns, &ClaimKey::new("alice").unwrap(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(owner.owner.unwrap().as_str(), "owner-1");
    let free = client
        .claim_owner(&ns, &ClaimKey::new("bob").unwrap(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(free.owner, None);

    // Stats: once the dead letter is past, every partition has applied
    // its whole log, and the highest applied position is the number of
    // messages in the requests stream (its sequences are global).
    let deadline = Instant::now() + TIMEOUT;
    let stats = loop {
        let mut all = Vec::new();
        for p in client.partitions().ids() {
            all.push(client.stats(p, TIMEOUT).await.unwrap());
        }
        if all.iter().all(|s| s.lag == Some(0)) || Instant::now() > deadline {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let messages = js
        .get_stream("AMENDS_REQ")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(messages, 8, "7 operations and one dead letter");
    // Each partition's owner is this serve, at the epoch of its ownership
    // record on the decisions stream.
    let decisions = js.get_stream("AMENDS_DEC").await.unwrap();
    for s in &stats {
        assert_eq!(s.state, PartitionState::Running, "{s:?}");
        assert_eq!(s.lag, Some(0), "{s:?}");
        assert_eq!(s.last_sequence, Some(s.applied_position), "{s:?}");
        let owner = s
            .owner
            .as_ref()
            .unwrap_or_else(|| panic!("no owner: {s:?}"));
        assert_eq!(owner.pid, serve.child.id(), "{s:?}");
        let record = decisions
            .get_last_raw_message_by_subject(&format!("amends.owner.{}", s.partition))
            .await
            .unwrap();
        assert_eq!(owner.epoch, record.sequence, "{s:?}");
        assert_eq!(s.owner_error, None, "{s:?}");
    }
    let alice_p = client.stats(alice_partition, TIMEOUT).await.unwrap();
    assert!(alice_p.applied_position >= 5, "{alice_p:?}");

    // Bad bodies get a clear error answer, never silence.
    let nats = js.client();
    for (subject, body) in [
        ("amends.query.balance.0", vec![0xff, 0xfe]),
        ("amends.query.balance.0", Vec::new()),
        ("amends.query.claim.0", b"{}".to_vec()),
        ("amends.query.claim.0", b"not json".to_vec()),
        (
            "amends.query.claim.0",
            br#"{"namespace":"a","key":"b","x":1}"#.to_vec(),
        ),
        ("amends.query.balance.99", b"alice".to_vec()),
    ] {
        let reply = nats.request(subject, body.clone().into()).await.unwrap();
        let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(answer["status"], "error", "{subject} {body:?}: {answer}");
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{answer}"
        );
    }

    // The CLI: `status` exit codes 0 confirmed, 1 rejected, 3 unknown, 2 error.
    let out = amends(&server, &["status", &credit.op_id.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let answer = stdout_json(&out);
    assert_eq!(answer["status"], "decided");
    assert_eq!(
        answer["decision"],
        serde_json::to_value(&decided[1]).unwrap()
    );
    let out = amends(&server, &["status", &debit.op_id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout_json(&out)["decision"]["reason"]["code"],
        "insufficient_funds"
    );
    let out = amends(&server, &["status", &Client::new_op_id().to_string()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(stdout_json(&out), json!({"status": "unknown"}));
    let out = amends(&server, &["status", "not-an-op-id"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");

    let out = amends(&server, &["balance", "alice"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let answer = stdout_json(&out);
    assert_eq!(
        (
            answer["balance"].clone(),
            answer["held"].clone(),
            answer["available"].clone()
        ),
        (json!(100), json!(30), json!(70)),
        "{answer}"
    );
    let out = amends(&server, &["balance", "nobody"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = amends(&server, &["claim-owner", "username", "alice"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout_json(&out)["owner"], "owner-1");
    let out = amends(&server, &["stats"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().count(), 1 + PARTITIONS as usize, "{table}");
    assert_eq!(
        table.matches("running").count(),
        PARTITIONS as usize,
        "{table}"
    );
    let pid = serve.child.id().to_string();
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l.split_whitespace().last() == Some(pid.as_str())),
        "every partition's owner is serve (pid {pid}):\n{table}"
    );

    // The micro service answers the NATS service discovery with its
    // endpoints on the protocol's subjects and queue groups.
    let info = nats.request("$SRV.INFO.amends", "".into()).await.unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"), "{info}");
    let mut endpoints: Vec<(String, String)> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["subject"].as_str().unwrap().to_owned(),
                e["queue_group"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    endpoints.sort();
    // One endpoint per query kind and served partition (this process
    // serves them all).
    let mut expected: Vec<(String, String)> = (0..PARTITIONS)
        .flat_map(|p| {
            [
                (format!("amends.query.balance.{p}"), "amends-query"),
                (format!("amends.query.claim.{p}"), "amends-query"),
                (format!("amends.stats.{p}"), "amends-query"),
                (format!("amends.status.{p}"), "amends-status"),
            ]
        })
        .map(|(s, q)| (s, q.to_owned()))
        .collect();
    expected.sort();
    assert_eq!(endpoints, expected);

    // A log file gets no colour codes.
    assert!(!serve.log().contains('\u{1b}'), "{}", serve.log());

    // /metrics: the exact counts of the workload.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        match scrape(&metrics_addr) {
            Some(text) if sample_sum(&text, "amends_dead_letters_total", &[]) >= 1.0 => break text,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("no dead letter in the metrics: {other:?}\n{}", serve.log()),
        }
    };
    let alice_label = alice_partition.to_string();
    let sum = |name: &str, labels: &[(&str, &str)]| sample_sum(&text, name, labels);
    assert_eq!(
        sum("amends_decisions_total", &[("outcome", "confirmed")]),
        4.0,
        "{text}"
    );
    assert_eq!(
        sum("amends_decisions_total", &[("outcome", "rejected")]),
        2.0,
        "{text}"
    );
    assert_eq!(
        sum(
            "amends_decisions_total",
            &[("reason", "insufficient_funds")]
        ),
        1.0
    );
    assert_eq!(
        sum("amends_decisions_total", &[("reason", "already_claimed")]),
        1.0
    );
    assert_eq!(sum("amends_duplicates_total", &[]), 1.0, "{text}");
    assert_eq!(sum("amends_conflicts_total", &[]), 0.0);
    assert_eq!(sum("amends_optimistic_total", &[]), 1.0);
    assert_eq!(sum("amends_apologies_total", &[]), 1.0);
    assert_eq!(
        sum("amends_dead_letters_total", &[("partition", &alice_label)]),
        1.0
    );
    // Every applied message is in one batch.
    assert_eq!(sum("amends_batch_len_sum", &[]), 7.0, "{text}");
    assert!(sum("amends_commit_seconds_count", &[]) >= 1.0, "{text}");
    assert!(sum("amends_publish_seconds_count", &[]) >= 1.0, "{text}");
    assert_eq!(
        sum("amends_partition_state", &[("state", "running")]),
        f64::from(PARTITIONS)
    );
    assert_eq!(sum("amends_partition_state", &[("state", "stopped")]), 0.0);
    assert!(
        sum("amends_applied_position", &[("partition", &alice_label)]) >= 5.0,
        "{text}"
    );
    assert!(text.contains("amends_lag{"), "{text}");
}
