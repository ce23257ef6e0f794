//! The `amends serve` child process and helpers shared by the tests.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amends_client::{Client, Options};
use amends_core::route::Partitions;

pub use amends_nats::test_support::Server;
use amends_nats::test_support::cluster::{self, Cluster};

/// Where a test's deployment lives: one nats-server, or a 3-node cluster.
pub trait Nats {
    /// The URLs to give `--nats-url` (comma-separated for a cluster).
    fn nats_url(&self) -> String;
    /// A raw NATS client that reconnects quickly.
    fn connect(&self) -> impl std::future::Future<Output = async_nats::Client>;
}

impl Nats for Server {
    fn nats_url(&self) -> String {
        self.url()
    }
    async fn connect(&self) -> async_nats::Client {
        amends_nats::test_support::connect(self).await
    }
}

impl Nats for Cluster {
    fn nats_url(&self) -> String {
        self.urls().join(",")
    }
    async fn connect(&self) -> async_nats::Client {
        cluster::connect(self).await
    }
}

/// The built binary.
pub const AMENDS: &str = env!("CARGO_BIN_EXE_amends");

/// An `amends serve` process. Dropping it kills it (SIGKILL, by its own
/// `Child` handle, hence its PID) and reaps it, so a failing test leaves
/// no process behind.
pub struct Serve {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Serve {
    /// Starts `amends serve` on `server` with its store in `data_dir`,
    /// `partitions` partitions and a 1 s duplicate window (so that a
    /// resubmission after a crash that lost a reply reaches the log and is
    /// answered from the dedup records).
    pub fn start(server: &impl Nats, data_dir: &Path, partitions: u32) -> Serve {
        Serve::start_with(server, data_dir, partitions, &[])
    }

    /// [`Serve::start`] with more flags.
    pub fn start_with(
        server: &impl Nats,
        data_dir: &Path,
        partitions: u32,
        more: &[&str],
    ) -> Serve {
        let mut args = vec![
            "serve".to_owned(),
            "--nats-url".to_owned(),
            server.nats_url(),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
            "--partitions".to_owned(),
            partitions.to_string(),
            "--batch-max".to_owned(),
            "64".to_owned(),
            "--duplicate-window-ms".to_owned(),
            "1000".to_owned(),
        ];
        args.extend(more.iter().map(|a| (*a).to_owned()));
        let mut serve = Serve {
            args,
            log: data_dir.with_extension("log"),
            child: None,
        };
        serve.spawn();
        serve
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the serve log");
        let child = Command::new(AMENDS)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn amends serve");
        self.child = Some(child);
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL amends serve");
            child.wait().expect("reap amends serve");
        }
    }

    /// Kills (SIGKILL) and starts it again with the same flags and store.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Sends `signal` (`STOP` or `CONT`) to the process, by its PID.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("amends serve runs");
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}: {status}", child.id());
    }

    /// Waits up to `within` for the process to exit on its own; its exit
    /// code, or `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("poll amends serve") {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process still runs (it must never exit on its own).
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let status = child.try_wait().expect("poll amends serve");
            assert!(
                status.is_none(),
                "amends serve exited: {status:?}\n{}",
                self.log()
            );
        }
    }

    /// Waits until `done` reaches `threshold` (operations answered by a
    /// workload running beside), failing with the log if that takes longer
    /// than `within`: the moment to kill the service mid-workload.
    pub async fn wait_for(&self, done: &AtomicUsize, threshold: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while done.load(Ordering::Relaxed) < threshold {
            assert!(
                Instant::now() < deadline,
                "stuck before {threshold}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What it logged so far, every run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client of the deployment, once `amends serve` has created it (the
/// client reads the partition count from the meta bucket).
pub async fn client(server: &impl Nats, partitions: u32) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut options = Options::new(String::new());
        options.servers = server.nats_url().split(',').map(str::to_owned).collect();
        options.name = Some("e2e".to_owned());
        match Client::connect(options).await {
            Ok(client) => {
                assert_eq!(
                    client.partitions(),
                    Partitions::new(partitions).expect("count")
                );
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no deployment after 10 s: {e}"),
        }
    }
}

/// Waits up to `within` for `serve` to exit on its own; fails unless it
/// exits non-zero having logged `says`.
pub fn assert_exits_saying(serve: &mut Serve, within: Duration, says: &str) {
    let code = tokio::task::block_in_place(|| serve.wait_exit(within));
    assert!(
        matches!(code, Some(c) if c != 0),
        "serve exits non-zero, got {code:?}:\n{}",
        serve.log()
    );
    assert!(
        serve.log().contains(says),
        "{says:?} not logged:\n{}",
        serve.log()
    );
}
