//! One deployment of a scenario: its own nats-server, an `amends serve` of
//! the release binary, a client, and what the streams hold at the end.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use amends_client::{Client, Options};
use amends_nats::test_support::serve::Serve;
use amends_nats::test_support::{self, Server, decisions};
use amends_nats::topology::{Prefix, Stream, header};
use anyhow::Context as _;
use async_nats::jetstream;

use crate::load::{self, Op};
use crate::tally::{self, Tally};

/// What every scenario shares: the binaries and the size of a deployment.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The release `amends` binary.
    pub amends: PathBuf,
    /// Partitions per deployment.
    pub partitions: u32,
}

/// A scenario's deployment.
pub struct Deployment {
    /// Its nats-server (killed and removed on drop).
    pub server: Server,
    /// The `amends serve` deciding.
    pub serve: Serve,
    /// A client (reconnects on its own).
    pub client: Client,
    /// A JetStream context on its own connection, for reading the streams.
    pub js: jetstream::Context,
    /// Where serve stores (its data dirs and logs).
    pub dir: tempfile::TempDir,
    setup: Setup,
}

/// `amends audit`'s verdict.
#[derive(Debug, Clone)]
pub struct Audit {
    /// Exit code 0.
    pub passed: bool,
    /// Its last line (the verdict), or the first failure.
    pub summary: String,
    /// Its first warning, if any.
    pub warning: Option<String>,
}

impl Deployment {
    /// Starts nats-server and `amends serve` (data dir `a`, with `flags`),
    /// and connects a client once serve has created the deployment.
    pub async fn start(setup: &Setup, flags: &[&str]) -> anyhow::Result<Deployment> {
        let server = Server::start();
        let dir = tempfile::Builder::new()
            .prefix("amends-campaign-")
            .tempdir()
            .context("a scratch directory")?;
        let serve = Serve::start(
            &setup.amends,
            &server.url(),
            &dir.path().join("a"),
            setup.partitions,
            flags,
        );
        let client = connect(&server, &serve).await?;
        let js = jetstream::new(test_support::connect(&server).await);
        Ok(Deployment {
            server,
            serve,
            client,
            js,
            dir,
            setup: setup.clone(),
        })
    }

    /// Starts another `amends serve` on this deployment, with its own data
    /// dir `name`.
    pub fn another_serve(&self, name: &str, flags: &[&str]) -> Serve {
        Serve::start(
            &self.setup.amends,
            &self.server.url(),
            &self.dir.path().join(name),
            self.setup.partitions,
            flags,
        )
    }

    /// A path in the scenario's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `amends audit` against the deployment.
    pub async fn audit(&self) -> anyhow::Result<Audit> {
        let (amends, url) = (self.setup.amends.clone(), self.server.url());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(amends)
                .args(["audit", "--nats-url", &url])
                .output()
        })
        .await?
        .context("running amends audit")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout
            .lines()
            .find(|l| l.starts_with("FAILED"))
            .or_else(|| stdout.lines().rev().find(|l| !l.trim().is_empty()))
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_owned());
        let warning = stdout
            .lines()
            .find(|l| l.starts_with("warning:"))
            .map(str::to_owned);
        Ok(Audit {
            passed: out.status.success(),
            summary,
            warning,
        })
    }

    /// The `Nats-Msg-Id`s on the requests stream: the ops JetStream
    /// acknowledged (and still holds).
    pub async fn logged_op_ids(&self) -> HashSet<String> {
        let name = Prefix::default().stream_name(Stream::Requests);
        decisions::stream_messages(&self.js, &name)
            .await
            .into_iter()
            .filter_map(|m| m.headers.get(header::MSG_ID).map(|v| v.as_str().to_owned()))
            .collect()
    }

    /// Classifies `ops` against the streams.
    pub async fn tally(&self, ops: &[Op]) -> Tally {
        let answers: HashMap<String, Option<serde_json::Value>> = ops
            .iter()
            .map(|op| (op.request.op_id.to_string(), op.answer.clone()))
            .collect();
        let in_log = self.logged_op_ids().await;
        let by_op = decisions::decisions_by_op(&self.js, &Prefix::default()).await;
        tally::classify(&answers, &in_log, &by_op)
    }

    /// A credit of 1 to the first account, submitted now, until decided:
    /// the op and how long that took from `since`.
    pub async fn probe(&self, since: Instant) -> (Op, Duration) {
        let credit = load::request(amends_core::command::Command::Credit {
            account: load::account(0),
            amount: amends_core::command::Amount::new(1).expect("1 is an amount"),
        });
        let (op, _) = load::decide(&self.client, credit).await;
        (op, since.elapsed())
    }
}

/// A client of the deployment, once serve has created it (the client reads
/// the partition count from the meta bucket); fails with serve's log after
/// 30 s.
async fn connect(server: &Server, serve: &Serve) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut options = Options::new(server.url());
        options.name = Some("amends-campaign".to_owned());
        match Client::connect(options).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("no deployment after 30 s: {e}\nserve log:\n{}", serve.log())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Copies directory `from` to `to` (created), recursively.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
