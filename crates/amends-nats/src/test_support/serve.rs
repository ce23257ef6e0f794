//! An `amends serve` child process, for the end-to-end tests and the
//! fault campaign (`crates/amends-campaign`), which both start the built
//! binary, SIGKILL, pause and restart it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// An `amends serve` process. Dropping it kills it (SIGKILL, by its own
/// `Child` handle, hence its PID) and reaps it, so a failing test leaves
/// no process behind.
#[derive(Debug)]
pub struct Serve {
    binary: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Serve {
    /// Starts `binary serve` on the NATS at `nats_url` (URLs, comma-separated) with its store in `data_dir`,
    /// `partitions` partitions, batches of at most 64 and a 1 s duplicate
    /// window (so that a resubmission after a crash that lost a reply
    /// reaches the log and is answered from the dedup records), then the
    /// flags `more`. Its log (stderr, `RUST_LOG=info`) goes to
    /// `<data_dir>.log`, appended over restarts.
    pub fn start(
        binary: &Path,
        nats_url: &str,
        data_dir: &Path,
        partitions: u32,
        more: &[&str],
    ) -> Serve {
        let mut args = vec![
            "serve".to_owned(),
            "--nats-url".to_owned(),
            nats_url.to_owned(),
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
            binary: binary.to_owned(),
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
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} serve: {e}", self.binary.display()));
        self.child = Some(child);
    }

    /// The process id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
    /// code (-1 for a signal), or `None` if it still runs.
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

    /// Whether the process still runs (it was started and has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
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
