//! Proves that `amends dev --no-wait` runs its whole demo against its own nats-server (a confirmation, `insufficient_funds`, `already_claimed`, a duplicate answered with the same decision, an apology read from the apology stream), exits 0 and leaves no nats-server running.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::support::AMENDS;

#[test]
fn dev_no_wait_runs_the_demo_and_stops_its_nats_server() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let mut command = Command::new(AMENDS);
    command
        .args(["dev", "--no-wait", "--data-dir"])
        .arg(&data_dir);
    // scripts/test sets it; without it `dev` finds .tools/bin/nats-server
    // above the current directory, as a user's run would.
    if let Some(server) = std::env::var_os("AMENDS_NATS_SERVER") {
        command.env("AMENDS_NATS_SERVER", server);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        output.status.success(),
        "exit {:?}\n{context}",
        output.status
    );

    for expected in [
        "open_account -> confirmed",
        "credit 100 -> confirmed",
        "debit 250 -> rejected: insufficient_funds",
        "claim by mallory -> rejected: already_claimed",
        "duplicate: same decision as the first time",
        "apology on amends.apology.dev.",
        r#""reason":{"code":"insufficient_funds""#,
        "transfer 60 -> confirmed",
        "transfer 500 -> rejected: step_refused",
        "killed and reaped",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}\n{context}");
    }
    let apology = stdout
        .lines()
        .skip_while(|l| !l.contains("apology on "))
        .nth(1)
        .unwrap_or_default();
    let apology: serde_json::Value = serde_json::from_str(apology.trim())
        .unwrap_or_else(|e| panic!("the apology is not JSON ({e})\n{context}"));
    assert_eq!(apology["decision"]["outcome"], "rejected", "{context}");
    assert_eq!(apology["command"]["amount"], 1000, "{context}");

    // The server it started is gone: its port no longer accepts connections.
    let port: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("NATS URL: nats://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no NATS URL printed\n{context}"))
        .trim()
        .parse()
        .unwrap();
    assert_ne!(port, 4222, "{context}");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "port {port} still accepts connections after `amends dev` exited\n{context}"
    );
}

#[test]
fn ctrl_c_on_dev_stops_it_with_exit_130_and_clients_here_find_its_url_while_it_runs() {
    // Proves a Ctrl-C (SIGINT) on a serving `amends dev` stops it the way a shell expects: exit code 130, not 0, after stopping its nats-server (the port no longer accepts connections); and that while it runs, `amends submit` in the same directory without --nats-url reaches it through the URL dev left in .amends-dev/nats-url, which is gone once dev stops; and a second dev on the same data dir refuses at once, naming the first's pid, without starting a nats-server.
    use std::io::{BufRead as _, BufReader};
    // In a directory of its own, with the default data dir (./.amends-dev).
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(AMENDS);
    command
        .arg("dev")
        .current_dir(dir.path())
        .env_remove("AMENDS_NATS_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if let Some(server) = std::env::var_os("AMENDS_NATS_SERVER") {
        command.env("AMENDS_NATS_SERVER", server);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut port = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix("NATS URL: nats://127.0.0.1:") {
            port = url.trim().parse::<u16>().ok();
        }
        if line.contains("Press Ctrl-C to stop.") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no prompt in time");
    }
    let port = port.expect("the NATS URL was printed");
    // Client commands run here find dev's URL without --nats-url.
    let url_file = dir.path().join(".amends-dev/nats-url");
    assert_eq!(
        std::fs::read_to_string(&url_file).unwrap().trim(),
        format!("nats://127.0.0.1:{port}")
    );
    let out = Command::new(AMENDS)
        .args([
            "submit",
            r#"{"command":{"type":"open_account","account":"carol"}}"#,
        ])
        .current_dir(dir.path())
        .env_remove("AMENDS_NATS_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A second dev on the same data dir refuses at once, naming the first,
    // and starts no nats-server of its own.
    let mut second = Command::new(AMENDS);
    second.args(["dev", "--no-wait"]).current_dir(dir.path());
    if let Some(server) = std::env::var_os("AMENDS_NATS_SERVER") {
        second.env("AMENDS_NATS_SERVER", server);
    }
    let out = second.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("another amends dev (pid {}) runs", child.id())),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("nats-server"),
        "{out:?}"
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("SIGINT: stopping")),
        "{rest:?}"
    );
    assert!(!url_file.exists(), "the URL file outlived dev");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "port {port} still accepts connections after `amends dev` exited"
    );
}
