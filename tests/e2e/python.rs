//! Proves the Python example client (examples/python), written from specs/protocol.md alone, routes every vector right and gets the expected decisions from a real `amends serve`.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Serve, Server, client};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PYTHON_DEADLINE: Duration = Duration::from_secs(15);

/// What a finished `python3` run left: its exit code, stdout and stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `python3 <args>` in the repo root with the inherited environment
/// (PYTHONPATH included), killing it if it outlives [`PYTHON_DEADLINE`].
fn python(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new("python3")
        .args(args)
        .current_dir(ROOT)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 (Python 3.11+ is required): {e}"));
    let deadline = Instant::now() + PYTHON_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    assert!(
        status.is_some(),
        "python3 {args:?} ran over {PYTHON_DEADLINE:?}; killed\n{run}"
    );
    run
}

#[test]
fn python_client_reproduces_every_routing_vector() {
    // Proves the Python FNV-1a 64 + jump hash matches every vector of
    // specs/vectors/routing.json (its fnv1a_64 and all partition counts).
    let run = python(&[
        "examples/python/amends_client.py",
        "--check-vectors",
        "specs/vectors/routing.json",
    ]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("65 vectors"), "{run}");
    assert!(run.stdout.contains(" 0 failures"), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_demo_gets_the_expected_decisions_from_amends_serve() {
    // Proves the Python client works end to end against `amends serve`: it
    // reads the partition count from AMENDS_META, routes, publishes with
    // Nats-Msg-Id and Amends-Reply-To, and gets each decision: open and
    // credit confirmed, an overdraft rejected insufficient_funds, a first
    // claim confirmed and a second one rejected already_claimed, a transfer
    // (a saga, routed by its op id) confirmed and one refused naming its
    // step.
    let nats = python(&["-c", "import nats"]);
    assert_eq!(
        nats.code,
        Some(0),
        "nats-py is not importable: run scripts/setup and put .tools/pypi/nats-py on \
         PYTHONPATH (scripts/test does both)\n{nats}"
    );

    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, &dir.path().join("data"), 4);
    let _client = client(&server, 4).await;

    let url = server.url();
    let run = tokio::task::spawn_blocking(move || {
        python(&["examples/python/demo.py", "--nats-url", &url])
    })
    .await
    .unwrap();
    assert_eq!(run.code, Some(0), "{run}\n--- serve log\n{}", serve.log());
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines.contains(&"partitions: 4"), "{run}");
    let expected = [
        ("open account: ok ", "\"outcome\": \"confirmed\""),
        ("credit 100: ok ", "\"balance\": 100"),
        ("debit 150: ok ", "\"code\": \"insufficient_funds\""),
        ("claim as ann: ok ", "\"outcome\": \"confirmed\""),
        ("claim as bob: ok ", "\"owner\": \"ann\""),
        ("transfer 30: ok ", "\"outcome\": \"confirmed\""),
        ("transfer 500: ok ", "\"code\": \"insufficient_funds\""),
    ];
    for (label, field) in expected {
        let line = lines
            .iter()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no line {label:?}\n{run}"));
        assert!(line.contains(field), "{label}: want {field}\n{run}");
    }
    assert!(run.stdout.contains("all outcomes as expected"), "{run}");
}
