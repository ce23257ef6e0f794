//! Op ids from the command line: `amends op-id`, the check `submit` and
//! `decode` make before anything is sent, and what `submit` and `wait` say
//! when the operation is in the log but no instance answers.

use std::process::Command;

use serde_json::Value;

use crate::support::{AMENDS, Serve, Server, client};
use crate::{submit, submit_with};

const PARTITIONS: u32 = 2;

fn amends(args: &[&str]) -> std::process::Output {
    Command::new(AMENDS).args(args).output().unwrap()
}

/// The requests stream's message count.
async fn requests_in_log(server: &Server) -> u64 {
    let js = async_nats::jetstream::new(amends_nats::test_support::connect(server).await);
    let mut stream = js.get_stream("AMENDS_REQ").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_id_amends_would_refuse_is_caught_before_sending_with_exit_4() {
    // Proves the op id check: `amends op-id` prints fresh v7 ids that `submit` gets confirmed; an id from 2024 (outside the window) or a v4 id is refused by `submit` with exit 4 and a message saying why and what to do, and nothing reaches the log; `decode` exits 4 for the same id and 0 for a fresh one; resubmitting an id with another body exits 4 (op_id_conflict), not 1.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&server, &dir.path().join("data"), PARTITIONS);
    let _client = client(&server, PARTITIONS).await;

    let out = amends(&["op-id", "-n", "2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    let open = |id: &str| {
        format!(r#"{{"op_id":"{id}","command":{{"type":"open_account","account":"alice"}}}}"#)
    };
    let out = submit(&server, &open(&ids[0]));
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", serve.log());
    let before = requests_in_log(&server).await;

    for (id, says) in [
        (
            "01900000-0000-7000-8000-000000000001",
            "days ago, outside the window",
        ),
        (
            "5d5d6531-f52e-4ede-b643-116ab64883fe",
            "not a UUID v7 (version 4)",
        ),
    ] {
        let out = submit(&server, &open(id));
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says) && err.contains("amends op-id"), "{err}");
        assert!(err.contains("nothing was sent"), "{err}");
        let out = amends(&["decode", &open(id)]);
        if id.as_bytes()[14] == b'7' {
            assert_eq!(out.status.code(), Some(4), "{out:?}");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("refused now"),
                "{out:?}"
            );
        }
    }
    assert_eq!(requests_in_log(&server).await, before, "nothing was sent");
    let out = amends(&["decode", &open(&ids[1])]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("valid request"),
        "{out:?}"
    );

    // The first id again with another body: its op id is refused.
    let other = format!(
        r#"{{"op_id":"{}","command":{{"type":"open_account","account":"bob"}}}}"#,
        ids[0]
    );
    let out = submit(&server, &other);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["reason"]["code"], "op_id_conflict", "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_serve_down_submit_says_the_op_is_in_the_log_and_wait_gets_it_later() {
    // Proves a lost answer is not reported as a failure: with NATS up and `serve` stopped, `submit` exits 5 saying the op is in the log at its partition and sequence and naming `amends wait`; `amends wait` exits 5 after --wait-ms while nobody serves; once `serve` runs again, `amends wait` prints the confirmation and exits 0, and `status` agrees.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A short lease, so that the second serve need not wait out the
    // killed one's for long.
    let lease = ["--lease-ttl-ms", "1000"];
    let mut serve = Serve::start_with(&server, &data, PARTITIONS, &lease);
    let _client = client(&server, PARTITIONS).await;
    serve.kill9();

    let id = String::from_utf8(amends(&["op-id"]).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let body =
        format!(r#"{{"op_id":"{id}","command":{{"type":"open_account","account":"carol"}}}}"#);
    let out = submit_with(&server, &["--tries", "2", "--timeout-ms", "500"], &body);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("op {id} is in the log (partition ")),
        "{err}"
    );
    assert!(
        err.contains(", sequence ") && err.contains(&format!("amends wait {id}")),
        "{err}"
    );

    let url = server.url();
    let wait = |ms: &str| {
        amends(&[
            "wait",
            "--nats-url",
            &url,
            "--timeout-ms",
            "500",
            "--wait-ms",
            ms,
            &id,
        ])
    };
    let out = wait("1000");
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    let serve = Serve::start_with(&server, &data, PARTITIONS, &lease);
    let out = tokio::task::block_in_place(|| wait("30000"));
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", serve.log());
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"], "decided", "{answer}");
    assert_eq!(answer["decision"]["outcome"], "confirmed", "{answer}");
    let out = amends(&["status", "--nats-url", &url, &id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
