//! The `amends` offline commands: `route` agrees with the routing vectors and
//! `decode` tells a valid request from a refused or dead-lettered one, by
//! running the built binary.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn amends(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_amends"))
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn route_matches_vectors() {
    // Every vector of specs/vectors/routing.json, through the binary, for two N.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/specs/vectors/routing.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 50);
    // Process arguments cannot carry NUL, so keys with one are left to the
    // library test.
    for v in vectors
        .iter()
        .filter(|v| !v["key"].as_str().unwrap().contains('\0'))
    {
        let key = v["key"].as_str().unwrap();
        for n in ["16", "100"] {
            let expected = v["partitions"][n].as_u64().unwrap().to_string();
            let (ok, out) = amends(&["route", "-n", n, "--", key]);
            assert!(ok, "route failed for {key:?}");
            assert_eq!(out.trim(), expected, "key {key:?}, N={n}");
        }
    }
}

#[test]
fn decode_sorts_valid_malformed_and_unreadable() {
    // A fresh op id: one from another day is refused now (see tests/e2e/opid.rs).
    let (ok, op_id) = amends(&["op-id"]);
    assert!(ok);
    let valid = format!(
        r#"{{"op_id":"{}","command":{{"type":"debit","account":"alice","amount":5}}}}"#,
        op_id.trim()
    );
    let (ok, out) = amends(&["decode", "-n", "16", &valid]);
    assert!(ok);
    assert!(
        out.contains("valid request") && out.contains("partition"),
        "{out}"
    );

    let malformed = r#"{"op_id":"01900000-0000-7000-8000-000000000001","command":{"type":"debit","account":"alice","amount":0}}"#;
    let (ok, out) = amends(&["decode", malformed]);
    assert!(!ok);
    assert!(
        out.contains("malformed") && out.contains("amount must be at least 1"),
        "{out}"
    );

    let (ok, out) = amends(&["decode", "{not json"]);
    assert!(!ok);
    assert!(out.contains("dead letter"), "{out}");
}

#[test]
fn log_format_json_writes_one_object_a_line_without_colour() {
    // Proves --log-format json: serve, pointed at a port where nothing listens, logs its retries as JSON objects (level, fields, message), one a line, with no colour codes; the default text format into a file has no colour codes either.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    for json in [true, false] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_amends"));
        if json {
            command.args(["--log-format", "json"]);
        }
        let log = dir.path().join(format!("serve-{json}.log"));
        let mut child = command
            .args(["serve", "--nats-url", &format!("nats://127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--partitions", "1"])
            .env_remove("AMENDS_LOG_FORMAT")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("cannot connect to NATS yet")
        {
            assert!(std::time::Instant::now() < deadline, "no retry logged");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text}");
        if json {
            for line in text.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert_eq!(v["level"], "WARN", "{line}");
                assert!(v["fields"]["message"].is_string(), "{line}");
            }
        }
    }
}

#[test]
fn a_user_mistake_gets_one_clear_line_without_a_backtrace() {
    // Proves the errors a new user meets are clear: a malformed URL is named as one (not a DNS error), a refused connection names the URL and what to check with each cause once, neither prints a backtrace even with RUST_BACKTRACE=1, and --help carries no notes to developers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_amends"))
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env_remove("AMENDS_NATS_URL")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };
    let body = r#"{"command":{"type":"open_account","account":"a"}}"#;
    let (code, err) = run(&["submit", "--nats-url", "nats//127.0.0.1", body]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("invalid NATS URL \"nats//127.0.0.1\""),
        "{err}"
    );
    assert!(!err.contains("DNS"), "{err}");
    let url = format!("nats://127.0.0.1:{port}");
    let (code, err) = run(&["submit", "--nats-url", &url, body]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot connect to NATS at {url}")),
        "{err}"
    );
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let (code, err) = run(&[
        "serve",
        "--nats-url",
        "nats://127.0.0.1:abc",
        "--data-dir",
        data.to_str().unwrap(),
        "-n",
        "1",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("port \"abc\" is not a number"), "{err}");
    assert!(
        !err.contains("backtrace") && !err.contains("Caused by"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let help = Command::new(env!("CARGO_BIN_EXE_amends"))
        .args(["submit", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("--nats-url"), "{help}");
    assert!(!help.contains("No clap default"), "{help}");
}
