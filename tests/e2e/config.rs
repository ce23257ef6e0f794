//! `amends serve --config`: the built binary reads its settings from a TOML
//! file, below flags and environment variables, and refuses unknown keys.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amends_client::{Client, Options, Prefix};
use amends_core::command::AccountId;
use amends_core::{Command as Cmd, Request};

use crate::support::{AMENDS, Server};

/// Every variable `amends serve` reads, removed from the child's
/// environment so that the test's own cannot leak in.
const ENV: [&str; 18] = [
    "AMENDS_CONFIG",
    "AMENDS_NATS_URL",
    "AMENDS_NATS_USER",
    "AMENDS_NATS_PASSWORD",
    "AMENDS_NATS_TOKEN",
    "AMENDS_NATS_CREDS",
    "AMENDS_NATS_TLS_CA",
    "AMENDS_NATS_TLS_CERT",
    "AMENDS_NATS_TLS_KEY",
    "AMENDS_NATS_TLS_REQUIRED",
    "AMENDS_DATA_DIR",
    "AMENDS_PARTITIONS",
    "AMENDS_PREFIX",
    "AMENDS_BATCH_MAX",
    "AMENDS_DURABILITY",
    "AMENDS_FLUSH_EVERY_MS",
    "AMENDS_DUPLICATE_WINDOW_MS",
    "AMENDS_REPLICAS",
];

/// A child `amends serve`, killed (by its own handle) and reaped on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str], env: &[(&str, &str)], log: &Path) -> Running {
    let mut command = Command::new(AMENDS);
    command.arg("serve").args(args);
    for name in ENV {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    Running(command.spawn().unwrap())
}

/// Connects with `prefix` once serve has recorded the deployment, and
/// checks the partition count it recorded and that it decides.
async fn assert_serving(server: &Server, prefix: &str, partitions: u32, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let client = loop {
        let mut options = Options::new(server.url());
        options.prefix = Prefix::new(prefix).unwrap();
        match Client::connect(options).await {
            Ok(client) => break client,
            Err(e) => {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                assert!(
                    Instant::now() < deadline,
                    "no deployment {prefix}: {e}\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(client.partitions().get(), partitions, "prefix {prefix}");
    let open = Request {
        op_id: Client::new_op_id(),
        command: Cmd::OpenAccount {
            account: AccountId::new("config").unwrap(),
            floor: 0,
            ceiling: None,
        },
        apology_topic: None,
    };
    let d = client
        .submit_and_wait(&open, Duration::from_secs(5), 3)
        .await
        .unwrap();
    assert!(d.outcome.is_confirmed(), "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_its_settings_from_the_file_below_flags_and_environment() {
    // Proves the precedence with the real binary: a file alone sets the NATS URL, prefix, partitions and (relative) data dir; an environment variable beats the file; a flag beats both.
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("amends.toml");
    std::fs::write(
        &file,
        format!(
            "prefix = \"fromfile\"\npartitions = 3\ndata_dir = \"store-a\"\n\n[nats]\nurls = [\"{}\"]\n",
            server.url()
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let log = dir.path().join("serve.log");

    // The file alone (through AMENDS_CONFIG, as a deployment would).
    let run = serve(&[], &[("AMENDS_CONFIG", config)], &log);
    assert_serving(&server, "fromfile", 3, &log).await;
    assert!(
        dir.path().join("store-a").is_dir(),
        "data_dir is relative to the file"
    );
    drop(run);

    // The environment beats the file.
    let run = serve(
        &[
            "--config",
            config,
            "--data-dir",
            dir.path().join("store-b").to_str().unwrap(),
        ],
        &[("AMENDS_PREFIX", "fromenv"), ("AMENDS_PARTITIONS", "2")],
        &log,
    );
    assert_serving(&server, "fromenv", 2, &log).await;
    drop(run);

    // A flag beats the environment and the file.
    let run = serve(
        &[
            "--config",
            config,
            "--prefix",
            "fromflag",
            "--partitions",
            "5",
            "--data-dir",
            dir.path().join("store-c").to_str().unwrap(),
        ],
        &[("AMENDS_PREFIX", "fromenv")],
        &log,
    );
    assert_serving(&server, "fromflag", 5, &log).await;
    drop(run);
}

#[test]
fn an_unknown_key_stops_serve_with_a_message_naming_it() {
    // Proves a typo in the file is an error at start, naming the key and the file, before anything connects (no NATS server runs here).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("amends.toml");
    std::fs::write(&file, "data_dir = \"d\"\npartitons = 4\n").unwrap();
    let mut command = Command::new(AMENDS);
    for name in ENV {
        command.env_remove(name);
    }
    let out = command
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `partitons`"), "{err}");
    assert!(err.contains(file.to_str().unwrap()), "{err}");
}
