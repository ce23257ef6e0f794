//! The pinned `nats-server` as a child process, for the tools that run a
//! deployment of their own: `amends dev` and `amends-bench`.
//!
//! [`locate_server`] finds the binary (`$AMENDS_NATS_SERVER`, else the one
//! `scripts/setup` installs in `.tools/bin`); [`NatsServer::start`] runs it
//! with JetStream on a free loopback port (never 4222) and waits until it
//! serves; dropping the [`NatsServer`] kills it by its PID and reaps it.
//! Failures are errors, not panics (the test harness with the same job is
//! `amends_nats::test_support`, which panics).

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// The environment variable naming the `nats-server` binary.
const SERVER_ENV: &str = "AMENDS_NATS_SERVER";

/// Where `scripts/setup` installs the pinned server, under the repository.
const SERVER_IN_REPO: &str = ".tools/bin/nats-server";

/// The error when no `nats-server` binary is found.
const NOT_FOUND: &str = "nats-server not found: run scripts/setup (installs the pinned nats-server 2.15.1 into .tools/bin)";

/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many free ports to try when another process takes the one picked.
const PORT_ATTEMPTS_MAX: u32 = 5;

/// The default NATS port, never used: a system server often has it.
const PORT_DEFAULT_NATS: u16 = 4222;

/// The `nats-server` binary: `$AMENDS_NATS_SERVER` if it names a file, else
/// `.tools/bin/nats-server` in the current directory or one above it, else
/// in a directory above this executable (`target/debug/amends` or
/// `target/release/amends-bench` of the repo).
pub fn locate_server() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os(SERVER_ENV).filter(|v: &OsString| !v.is_empty()) {
        candidates.push(PathBuf::from(path));
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        roots.push(dir.to_owned());
    }
    roots.dedup();
    for root in &roots {
        candidates.extend(root.ancestors().map(|dir| dir.join(SERVER_IN_REPO)));
    }
    match candidates.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => {
            let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            anyhow::bail!(
                "{NOT_FOUND} (looked at ${SERVER_ENV}, then {SERVER_IN_REPO} in and above: {})",
                roots.join(", ")
            )
        }
    }
}

/// The child `nats-server`. Dropping it kills it (SIGKILL, by its PID
/// through the `Child` handle) and reaps it.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    pid: u32,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts the server with JetStream on a free loopback port, its store in
    /// `dir/nats` and its log in `dir/nats-server.log`, and waits until it
    /// accepts connections.
    pub fn start(binary: PathBuf, dir: &Path) -> anyhow::Result<NatsServer> {
        let log_path = dir.join("nats-server.log");
        for attempt in 1..=PORT_ATTEMPTS_MAX {
            let port = free_port()?;
            let log = File::options()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
            let child = Command::new(&binary)
                .arg("-js")
                .arg("-sd")
                .arg(dir.join("nats"))
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .arg("--ports_file_dir")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().context("cloning the log's handle")?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let pid = child.id();
            let mut server = NatsServer {
                binary: binary.clone(),
                port,
                pid,
                child: Some(child),
            };
            match server.wait_ready(dir) {
                Ok(()) => return Ok(server),
                Err(exited) => {
                    server.stop();
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    let this_run = log
                        .get(usize::try_from(log_len).unwrap_or(0)..)
                        .unwrap_or(&log);
                    if this_run.contains("address already in use") && attempt < PORT_ATTEMPTS_MAX {
                        continue;
                    }
                    anyhow::bail!(
                        "{exited}\nbinary: {}\nlog ({}):\n{this_run}",
                        binary.display(),
                        log_path.display()
                    );
                }
            }
        }
        anyhow::bail!(
            "every one of {PORT_ATTEMPTS_MAX} free ports was taken before nats-server bound it"
        )
    }

    /// The server's client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The binary it runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Its loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits until this process has written its ports file (so the port is
    /// its own) and accepts a connection.
    fn wait_ready(&mut self, dir: &Path) -> Result<(), String> {
        let ports_file_suffix = format!("_{}.ports", self.pid);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err("nats-server is not running".to_owned());
            };
            match child.try_wait() {
                Ok(Some(status)) => return Err(format!("nats-server exited at start ({status})")),
                Ok(None) => {}
                Err(e) => return Err(format!("polling nats-server: {e}")),
            }
            if has_file_ending(dir, &ports_file_suffix)
                && TcpStream::connect_timeout(&addr, Duration::from_millis(10)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server did not accept connections on {addr} within {READY_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server by its PID and reaps it. Does nothing the second
    /// time.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if the process was reaped already, which `take`
            // rules out; an exited but unreaped process is still reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago, never 4222.
fn free_port() -> anyhow::Result<u16> {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding a loopback port to find a free one")?;
        let port = listener
            .local_addr()
            .context("reading the bound port")?
            .port();
        if port != PORT_DEFAULT_NATS {
            return Ok(port);
        }
    }
}

fn has_file_ending(dir: &Path, suffix: &str) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|entry| entry.file_name().to_string_lossy().ends_with(suffix))
    })
}
