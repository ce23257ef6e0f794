//! Faults injected into running `amends serve` processes: a long pause
//! (SIGSTOP), a second instance beside the first, wrong credentials, a full
//! disk. After each, nothing may be skipped, answered twice or out of
//! place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amends_client::{Client, Decision, Request};
use serde_json::Value;

use crate::support::{Nats, Serve, Server, assert_exits_saying, client};
use crate::{TRIES, TRY_TIMEOUT, decisions_stream, submit_all};

const PARTITIONS: u32 = 4;
/// The paced load: this many operations, one every `PACE`.
const PACED_OPS: usize = 2_400;
const PACE: Duration = Duration::from_millis(5);
/// The most pauses the pause test tries before it gives up on one that
/// hits a fetch in flight (on a loaded machine a pause can fall between
/// two fetches of every partition).
const PAUSES_MAX: usize = 3;
/// Longer than a fetch's wait (500 ms) plus the 5 s async-nats adds to it
/// before it drops a fetch's buffered messages.
const PAUSE: Duration = Duration::from_secs(8);

/// Publishes `requests` one every `PACE` without waiting for decisions;
/// returns each one's stream position (the first copy's).
async fn publish_paced(client: &Client, requests: &[Request]) -> Vec<u64> {
    publish_paced_until(client, requests, &AtomicBool::new(false)).await
}

/// As [`publish_paced`], but stops early once `stop` is set; returns the
/// positions of the requests it published (a prefix of `requests`).
async fn publish_paced_until(client: &Client, requests: &[Request], stop: &AtomicBool) -> Vec<u64> {
    let mut ticker = tokio::time::interval(PACE);
    let mut positions = Vec::with_capacity(requests.len());
    for r in requests {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        ticker.tick().await;
        let submitted = client.submit(r).await.unwrap();
        assert!(!submitted.duplicate, "a fresh op id: {}", r.op_id);
        positions.push(submitted.sequence);
    }
    positions
}

/// Every message of the decisions stream, grouped by op id.
async fn decisions_by_op(server: &impl Nats) -> BTreeMap<String, Vec<Value>> {
    let js = async_nats::jetstream::new(server.connect().await);
    amends_nats::test_support::decisions::decisions_by_op(&js, &Default::default()).await
}

/// Checks that the decisions stream holds exactly one decision per answered
/// op, equal to the one its client got, and that `amends audit` exits 0;
/// returns the stream's decisions by op id.
async fn assert_decided_once_and_audited(
    server: &impl Nats,
    answers: &[(Request, Decision)],
) -> BTreeMap<String, Vec<Value>> {
    let seen = decisions_by_op(server).await;
    for (r, d) in answers {
        let msgs = &seen[&r.op_id.to_string()];
        assert_eq!(msgs.len(), 1, "op {} decided {} times", r.op_id, msgs.len());
        assert_eq!(msgs[0], serde_json::to_value(d).unwrap());
    }
    let audit = crate::audit::audit(server);
    assert_eq!(
        audit.status.code(),
        Some(0),
        "audit:\n{}\n{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_serve_skips_nothing_and_decides_each_op_at_its_own_position() {
    // Proves a pause longer than a fetch's client-side expiry loses
    // nothing: operations are published at 200/s while `amends serve` is
    // SIGSTOPped for 8 s and then SIGCONTed (again, up to 3 times, until a
    // pause has hit a fetch in flight, which the log says); every one is
    // decided exactly once, at the stream position its first publish got
    // (a skipped request would be decided only at a resubmission's later
    // position, or never), and `amends audit` re-derives every decision.
    let started = Instant::now();
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    // The lease's TTL is well above the pause: a lone serve paused past its
    // TTL loses the lease and exits (for its process supervisor to start it
    // again), which is the takeover test's subject, not this one's.
    let serve = Serve::start_with(
        &server,
        &dir.path().join("data"),
        PARTITIONS,
        &["--lease-ttl-ms", "60000"],
    );
    let client = client(&server, PARTITIONS).await;
    let opens = crate::open_accounts();
    submit_all(&client, &opens, &Arc::new(AtomicUsize::new(0))).await;

    // Enough load for every pause the test may need; it stops after the
    // last one.
    let work = crate::workload(PACED_OPS * PAUSES_MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, work, stop) = (client.clone(), work.clone(), Arc::clone(&stop));
        tokio::spawn(async move { publish_paced_until(&client, &work, &stop).await })
    };
    let mut pauses = 0;
    while pauses < PAUSES_MAX && !serve.log().contains("deliveries missing") {
        tokio::time::sleep(Duration::from_secs(2)).await;
        serve.signal("STOP");
        tokio::time::sleep(PAUSE).await;
        serve.signal("CONT");
        pauses += 1;
        // The worker notices the missing deliveries at its next fetch.
        let noticed = Instant::now() + Duration::from_secs(3);
        while Instant::now() < noticed && !serve.log().contains("deliveries missing") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let positions = load.await.unwrap();
    let work = &work[..positions.len()];
    let mut answers: Vec<(Request, Decision)> = Vec::new();
    for r in work {
        let d = client
            .submit_and_wait(r, TRY_TIMEOUT, TRIES)
            .await
            .unwrap_or_else(|e| panic!("op {} got no decision: {e}\n{}", r.op_id, serve.log()));
        answers.push((r.clone(), d));
    }
    let misplaced: Vec<String> = answers
        .iter()
        .zip(&positions)
        .filter(|((_, d), position)| d.position != **position)
        .map(|((r, d), position)| {
            format!("{} at {} (published at {position})", r.op_id, d.position)
        })
        .collect();
    assert!(
        misplaced.is_empty(),
        "{} of {} ops not decided at their own position, e.g. {:?}\n{}",
        misplaced.len(),
        work.len(),
        &misplaced[..misplaced.len().min(5)],
        serve.log()
    );

    assert_decided_once_and_audited(&server, &answers).await;
    assert!(
        serve.log().contains("deliveries missing"),
        "none of {pauses} pauses hit a fetch in flight; the test proved nothing:\n{}",
        serve.log()
    );
    eprintln!(
        "{} ops through {pauses} pause(s) of {PAUSE:?}: {:?}",
        work.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_serve_stands_by_then_takes_over_a_paused_one_which_is_fenced_and_exits() {
    // Proves one writer per deployment under a second instance and a pause: serve B, started beside serve A under a paced load, waits as a standby naming A; A is SIGSTOPped past the 2 s lease TTL, B takes the lease and every partition (from an empty store) and decides on; A, SIGCONTed, exits non-zero on the lost lease (any write it still had in flight is refused by the fence, proven in the worker tests). Every op is decided exactly once, at its own position, and `amends audit` passes.
    let started = Instant::now();
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let lease = ["--lease-ttl-ms", "2000"];
    let mut a = Serve::start_with(&server, &dir.path().join("a"), PARTITIONS, &lease);
    let client = client(&server, PARTITIONS).await;
    let opens = crate::open_accounts();
    submit_all(&client, &opens, &Arc::new(AtomicUsize::new(0))).await;
    let mut b = Serve::start_with(&server, &dir.path().join("b"), PARTITIONS, &lease);

    let work = crate::workload(PACED_OPS);
    let load = {
        let (client, work) = (client.clone(), work.clone());
        tokio::spawn(async move { publish_paced(&client, &work).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(b.log().contains("standby"), "B is a standby:\n{}", b.log());
    assert!(
        !b.log().contains(" serving"),
        "B serves nothing yet:\n{}",
        b.log()
    );
    a.signal("STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(b.log().contains(" serving"), "B took over:\n{}", b.log());
    a.signal("CONT");
    assert_exits_saying(&mut a, Duration::from_secs(10), "lost the deployment lease");
    let positions = load.await.unwrap();

    let mut answers: Vec<(Request, Decision)> = Vec::new();
    for r in &work {
        let d = client
            .submit_and_wait(r, TRY_TIMEOUT, TRIES)
            .await
            .unwrap_or_else(|e| panic!("op {} got no decision: {e}\n{}", r.op_id, b.log()));
        answers.push((r.clone(), d));
    }
    for ((r, d), position) in answers.iter().zip(&positions) {
        assert_eq!(
            d.position, *position,
            "op {} not decided at its own position",
            r.op_id
        );
    }
    let seen = assert_decided_once_and_audited(&server, &answers).await;
    for r in &opens {
        assert_eq!(seen[&r.op_id.to_string()].len(), 1, "open {} once", r.op_id);
    }
    b.assert_running();
    eprintln!(
        "takeover under {PACED_OPS} paced ops: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_wrong_or_missing_credentials_exits_with_the_error() {
    // Proves a refused credential is not retried forever: against a nats-server that requires a token, `amends serve` with a wrong token and with none exits non-zero within seconds, saying the credentials were refused; with the right token it serves.
    let server = Server::start_with(amends_nats::test_support::Options {
        token: Some("s3cret"),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    for (name, more) in [("wrong", vec!["--nats-token", "wrong"]), ("none", vec![])] {
        let mut serve = Serve::start_with(&server, &dir.path().join(name), PARTITIONS, &more);
        eprintln!("serve with credentials: {name}");
        assert_exits_saying(
            &mut serve,
            Duration::from_secs(15),
            "refused the credentials",
        );
    }
    let mut serve = Serve::start_with(
        &server,
        &dir.path().join("right"),
        PARTITIONS,
        &["--nats-token", "s3cret"],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !serve.log().contains(" serving") {
        assert!(Instant::now() < deadline, "{}", serve.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serve.assert_running();
}

/// A tmpfs of `size` mounted at `dir` for the test's life (root only, as
/// CI runs), unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir.to_owned())
    }

    /// Writes a file until the filesystem is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5_u8; 1 << 16];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_stops_serve_with_the_error_and_a_restart_recovers_losing_nothing() {
    // Proves a full disk is neither papered over nor fatal to the data: `serve` with its store on a 48 MB tmpfs answers, the filesystem is then filled, and the next commits fail; serve exits non-zero within seconds saying the store must be reopened (it used to restart its workers on the failed handle forever), nothing unconfirmed is answered; once space is freed a restarted serve answers every operation exactly once and the audit passes.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "48m");
    let mut serve = Serve::start(&server, &disk.0, PARTITIONS);
    let client = client(&server, PARTITIONS).await;
    let opens = crate::open_accounts();
    submit_all(&client, &opens, &Arc::new(AtomicUsize::new(0))).await;

    let filler = disk.fill();
    let work = crate::workload(400);
    for r in &work {
        client.submit(r).await.unwrap();
    }
    assert_exits_saying(
        &mut serve,
        Duration::from_secs(30),
        "the store must be reopened",
    );

    std::fs::remove_file(filler).unwrap();
    serve.restart();
    let mut answers = Vec::new();
    for r in &work {
        let d = client
            .submit_and_wait(r, TRY_TIMEOUT, TRIES)
            .await
            .unwrap_or_else(|e| panic!("op {} got no decision: {e}\n{}", r.op_id, serve.log()));
        answers.push((r.clone(), d));
    }
    assert_decided_once_and_audited(&server, &answers).await;
    serve.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_serve_survives_a_killed_stream_leader_losing_and_doubling_nothing() {
    // Proves the whole service on a 3-node JetStream cluster with 3 replicas: `amends serve --replicas 3` decides a mixed load from 32 resubmitting clients while the node leading the decisions stream is SIGKILLed and, once the load has gone on without it, restarted; every op is decided exactly once (the decision its client got), the decisions stream stays in position order per partition, and `amends audit` re-derives every decision.
    let started = Instant::now();
    let mut cluster = amends_nats::test_support::cluster::Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(
        &cluster,
        &dir.path().join("data"),
        PARTITIONS,
        &["--replicas", "3"],
    );
    let client = client(&cluster, PARTITIONS).await;
    let done = Arc::new(AtomicUsize::new(0));
    let mut answers = submit_all(&client, &crate::open_accounts(), &done).await;

    const OPS: usize = 1_200;
    let work = crate::workload(OPS);
    let load = {
        let (client, work, done) = (client.clone(), work.clone(), Arc::clone(&done));
        tokio::spawn(async move { submit_all(&client, &work, &done).await })
    };
    let base = done.load(std::sync::atomic::Ordering::Relaxed);
    serve
        .wait_for(&done, base + OPS / 4, Duration::from_secs(60))
        .await;
    let js = async_nats::jetstream::new(cluster.connect().await);
    let leader = cluster.stream_leader(&js, "AMENDS_DEC").await;
    eprintln!("killing node {leader}, the decisions stream's leader");
    cluster.kill9(leader);
    serve
        .wait_for(&done, base + OPS / 2, Duration::from_secs(60))
        .await;
    cluster.restart(leader);
    let worked = tokio::time::timeout(Duration::from_secs(90), load)
        .await
        .unwrap_or_else(|_| panic!("workload stuck; serve log:\n{}", serve.log()))
        .unwrap();
    answers.extend(worked);
    assert_eq!(answers.len(), crate::ACCOUNTS + OPS);
    cluster.wait_stream_current(&js, "AMENDS_DEC").await;

    // Per partition, the decisions are on the stream in position order.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for d in decisions_stream(&cluster).await {
        let (p, pos) = (
            d["partition"].as_u64().unwrap(),
            d["position"].as_u64().unwrap(),
        );
        let before = last.insert(p, pos).unwrap_or(0);
        assert!(pos > before, "partition {p}: position {pos} after {before}");
    }
    assert_decided_once_and_audited(&cluster, &answers).await;
    let mut serve = serve;
    serve.assert_running();
    eprintln!(
        "{} ops on R3, leader killed: {:?}",
        answers.len(),
        started.elapsed()
    );
}
