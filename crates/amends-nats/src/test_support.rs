//! Real `nats-server` processes for tests (cargo feature `test-support`).
//!
//! [`Server::start`] runs the pinned `nats-server` (never a system one, never
//! port 4222) with JetStream on a free loopback port and a store directory
//! of its own, and waits until it serves. [`Server::kill9`] and
//! [`Server::restart`] simulate a crash and a restart on the same port and
//! store; dropping the [`Server`] kills the process (by its PID) and removes
//! its directory. [`connect`] opens a client that reconnects quickly.
//!
//! The binary is `$AMENDS_NATS_SERVER` (set by `scripts/test`), else
//! `<repo>/.tools/bin/nats-server` (installed by `scripts/setup`). If neither
//! exists, starting a server panics with [`NOT_FOUND`]: tests fail, they
//! never skip.
//!
//! Every function here panics on failure, with the server's log in the
//! message: it is meant for tests, where a panic is the failure report.
//! A server is a child of the test process and in its process group, so a
//! test runner that kills a timed-out test's group kills the server too.

pub mod decisions;
pub mod serve;

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;
mod tls;
pub use tls::{Tls, TlsFiles};

/// The environment variable naming the `nats-server` binary.
pub const SERVER_ENV: &str = "AMENDS_NATS_SERVER";

/// The panic message when no `nats-server` binary is found.
pub const NOT_FOUND: &str = "nats-server not found: run scripts/setup (installs the pinned nats-server 2.15.1 into .tools/bin)";

/// How long a starting server may take to accept connections. A healthy
/// one takes milliseconds; a slow CI machine gets a wide margin.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many free ports to try when the one picked is taken before the
/// server binds it (another process won the race).
pub const PORT_ATTEMPTS_MAX: u32 = 5;

/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The port no test server may use: the default NATS port, often taken by
/// a system server.
const PORT_DEFAULT_NATS: u16 = 4222;

/// Options of a test server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Run with `jetstream { sync_interval: always }` (written to a server
    /// configuration file in the server's directory): the server fsyncs
    /// before every acknowledgement.
    pub sync_always: bool,
    /// Require this token of every client (`--auth`).
    pub token: Option<&'static str>,
    /// Speak TLS only, with certificates from a private CA made for this
    /// server ([`Server::tls_files`]); with [`Tls::Mutual`], clients must
    /// show a certificate from it too.
    pub tls: Option<Tls>,
}

/// A running `nats-server` with JetStream, on `127.0.0.1` and a free port.
#[derive(Debug)]
pub struct Server {
    binary: PathBuf,
    options: Options,
    port: u16,
    /// The server's directory: store, configuration, ports files, log.
    /// Removed when the server is dropped, after the process is killed.
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: Option<TlsFiles>,
}

impl Server {
    /// Starts a server with default options.
    pub fn start() -> Server {
        Server::start_with(Options::default())
    }

    /// Starts a server.
    pub fn start_with(options: Options) -> Server {
        let binary = binary();
        let dir = tempfile::Builder::new()
            .prefix("amends-nats-server-")
            .tempdir()
            .expect("create the test server's temporary directory");
        let mut server = Server {
            binary,
            options,
            port: 0,
            dir,
            child: None,
            tls: None,
        };
        let mut conf = String::new();
        if options.sync_always {
            conf.push_str("jetstream {\n  sync_interval: always\n}\n");
        }
        if let Some(mode) = options.tls {
            let files = TlsFiles::generate(&server.dir.path().join("tls"));
            conf.push_str(&files.server_block(mode));
            server.tls = Some(files);
        }
        if !conf.is_empty() {
            conf.insert_str(0, "# Written by amends_nats::test_support.\n");
            fs::write(server.conf_path(), conf).expect("write the test server's configuration");
        }
        for attempt in 1..=PORT_ATTEMPTS_MAX {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(Exit::PortTaken) if attempt < PORT_ATTEMPTS_MAX => continue,
                Err(exit) => panic!("{}", server.failure(&exit)),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client URL, `nats://127.0.0.1:<port>` (`tls://` with
    /// [`Options::tls`]).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The certificates of a server started with [`Options::tls`].
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The JetStream store directory (`-sd`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server process's id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far (stdout and stderr, every run).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it. The
    /// store directory stays. Does nothing if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` sends SIGKILL on Unix. It fails only if the
            // process was already reaped, which `take` rules out.
            child.kill().expect("SIGKILL the test server");
            child.wait().expect("reap the test server");
        }
    }

    /// Starts the server again on the same port and store directory,
    /// killing it first (SIGKILL) if it still runs.
    pub fn restart(&mut self) {
        self.kill9();
        if let Err(exit) = self.spawn() {
            panic!("{}", self.failure(&exit));
        }
    }

    /// Spawns the server and waits until it serves.
    fn spawn(&mut self) -> Result<(), Exit> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the test server's log");
        let mut command = Command::new(&self.binary);
        if self.conf_path().is_file() {
            command.arg("-c").arg(self.conf_path());
        }
        if let Some(token) = self.options.token {
            command.args(["--auth", token]);
        }
        command
            .arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--ports_file_dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log's handle"))
            .stderr(log);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()));
        let pid = child.id();
        self.child = Some(child);
        self.wait_ready(pid)
    }

    /// Waits until the server with `pid` has written its ports file (so the
    /// port is its own, not another process's) and accepts a connection.
    fn wait_ready(&mut self, pid: u32) -> Result<(), Exit> {
        let ports_file_suffix = format!("_{pid}.ports");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned just before");
            if let Some(status) = child.try_wait().expect("poll the test server") {
                self.child = None;
                let log = self.log();
                return Err(if log.contains("address already in use") {
                    Exit::PortTaken
                } else {
                    Exit::Exited(status.to_string())
                });
            }
            if has_file_ending(self.dir.path(), &ports_file_suffix)
                && TcpStream::connect_timeout(&addr, POLL_INTERVAL).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(Exit::Timeout);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn failure(&self, exit: &Exit) -> String {
        let what = match exit {
            Exit::PortTaken => format!(
                "every one of {PORT_ATTEMPTS_MAX} free ports was taken before nats-server bound it"
            ),
            Exit::Exited(status) => format!("nats-server exited at start ({status})"),
            Exit::Timeout => format!(
                "nats-server did not accept connections on 127.0.0.1:{} within {READY_TIMEOUT:?}",
                self.port
            ),
        };
        format!(
            "{what}\nbinary: {}\nlog:\n{}",
            self.binary.display(),
            self.log()
        )
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("server.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Kill by PID (the `Child` handle), never by name; then the TempDir
        // field removes the directory.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Why a server did not come up.
enum Exit {
    /// It exited because its port was taken.
    PortTaken,
    /// It exited for another reason (bad flags, bad configuration).
    Exited(String),
    /// It did not serve within [`READY_TIMEOUT`].
    Timeout,
}

/// The `nats-server` binary: `$AMENDS_NATS_SERVER` if it names a file, else
/// `<repo>/.tools/bin/nats-server`. Panics with [`NOT_FOUND`] if neither
/// exists.
pub fn binary() -> PathBuf {
    try_binary().unwrap_or_else(|tried| {
        panic!("{NOT_FOUND} (looked at: {tried})");
    })
}

/// [`binary`] without the panic: the binary, or the places looked at.
pub fn try_binary() -> Result<PathBuf, String> {
    let fallback = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server");
    locate(std::env::var_os(SERVER_ENV), fallback)
}

/// The first of `env` and `fallback` that is a file, or the list of the
/// places looked at.
fn locate(env: Option<OsString>, fallback: PathBuf) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = env
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain([fallback])
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        })
}

/// A loopback port that was free a moment ago, never 4222. The listener is
/// dropped before the server binds, so another process may take it first;
/// [`Server::start_with`] then tries another.
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("read the bound address")
            .port();
        if port != PORT_DEFAULT_NATS {
            return port;
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

/// Connects a client to `server`. It reconnects forever, retrying every
/// 50 ms at first and at most every 500 ms, so that tests that restart the
/// server do not wait for the default backoff. With TLS it trusts the
/// server's CA and shows the client certificate.
pub async fn connect(server: &Server) -> async_nats::Client {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(files) = server.tls_files() {
        options = options
            .add_root_certificates(files.ca.clone())
            .add_client_certificate(files.client_cert.clone(), files.client_key.clone());
    }
    options
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            let attempts = u64::try_from(attempts).unwrap_or(u64::MAX);
            Duration::from_millis(attempts.saturating_mul(50).min(500))
        })
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("connect to the test server at {}: {e}", server.url()))
}

/// The number of decisions (and hold-expired events) on the decisions
/// stream of `prefix`: its messages on the decision subjects, without the
/// ownership records that share the stream.
pub async fn decision_count(
    js: &async_nats::jetstream::Context,
    prefix: &crate::topology::Prefix,
) -> u64 {
    use futures_util::StreamExt as _;
    let name = prefix.stream_name(crate::topology::Stream::Decisions);
    let stream = js.get_stream(&name).await.expect("the decisions stream");
    let mut subjects = stream
        .info_with_subjects(prefix.dec_wildcard())
        .await
        .expect("decisions stream info");
    let mut count = 0_u64;
    while let Some(item) = subjects.next().await {
        let (_, n) = item.expect("subject counts");
        count = count.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
    count
}

/// Whether a message of the decisions stream is a decision or a
/// hold-expired event (not an ownership record).
pub fn is_decision_subject(prefix: &crate::topology::Prefix, subject: &str) -> bool {
    subject
        .strip_prefix(prefix.as_str())
        .is_some_and(|rest| rest.starts_with(".dec."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn locate_prefers_the_environment_then_the_fallback_then_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env_bin = dir.path().join("env-nats-server");
        let tools_bin = dir.path().join("tools-nats-server");
        let missing = dir.path().join("missing");
        File::create(&env_bin)
            .and_then(|mut f| f.write_all(b"#!"))
            .expect("write");
        File::create(&tools_bin).expect("write");

        let located = locate(Some(env_bin.clone().into()), tools_bin.clone());
        assert_eq!(located, Ok(env_bin));
        let located = locate(Some(missing.clone().into()), tools_bin.clone());
        assert_eq!(located, Ok(tools_bin.clone()));
        let located = locate(None, tools_bin.clone());
        assert_eq!(located, Ok(tools_bin));
        let located = locate(Some(missing.clone().into()), missing.clone());
        assert!(located.is_err());
        let tried = located.expect_err("neither exists");
        assert!(tried.contains("missing"), "{tried}");
    }
}
