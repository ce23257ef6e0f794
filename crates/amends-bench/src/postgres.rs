//! PostgreSQL doing the work of amends with its own transactions and
//! constraints, the way a competent engineer would write it:
//!
//! - a pool of connections as large as the bench's concurrency, every
//!   statement prepared once per connection;
//! - a debit is one statement: `UPDATE ... SET balance = balance - $x WHERE
//!   id = $a AND balance - $x >= floor`, with the operation's idempotency
//!   record inserted by the same statement (amends keeps one per op id);
//! - a claim is one statement: `INSERT ... ON CONFLICT DO NOTHING` on the
//!   primary key `(namespace, key)`, then the holder compared with the
//!   claimant, and the idempotency record;
//! - a transfer is one transaction that locks both accounts in id order
//!   (`SELECT ... ORDER BY id FOR UPDATE`), checks the floor, moves the
//!   amount and records the operation;
//! - `synchronous_commit = on`; serialization failures and deadlocks are
//!   retried.
//!
//! With no URL given, [`Private`] starts a PostgreSQL of its own (initdb in
//! a temporary directory, a free loopback port, fsync on) and stops it at
//! the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::amends::NAMESPACE;
use super::workload::{Answer, Op, Target};

/// The install hint when no PostgreSQL server binaries are found.
pub const NOT_FOUND: &str = "PostgreSQL not found: initdb and postgres must be on PATH or in /usr/lib/postgresql/<version>/bin (Debian: apt-get install postgresql; scripts/setup does it), or give --postgres-url";

/// How often an operation is retried after a serialization failure or a
/// deadlock.
const RETRIES_MAX: u32 = 20;

/// How long the private server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections beyond the pool that the private server allows (for the
/// setup connection and a psql by hand).
const CONNECTIONS_SPARE: usize = 10;

/// The schema, made anew by every run.
const SCHEMA: &str = "
DROP TABLE IF EXISTS bench_accounts, bench_claims, bench_ops;
CREATE TABLE bench_accounts (
    id bigint PRIMARY KEY,
    balance bigint NOT NULL,
    floor bigint NOT NULL DEFAULT 0,
    CHECK (balance >= floor)
);
CREATE TABLE bench_claims (
    namespace text NOT NULL,
    key text NOT NULL,
    owner text NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE bench_ops (
    op_id uuid PRIMARY KEY,
    confirmed boolean NOT NULL
);
";

/// A credit: the update and the idempotency record, one statement.
const CREDIT: &str = "
WITH u AS (UPDATE bench_accounts SET balance = balance + $2 WHERE id = $1 RETURNING 1)
INSERT INTO bench_ops (op_id, confirmed) SELECT $3, EXISTS (SELECT 1 FROM u)
RETURNING confirmed";

/// A debit: the floor checked by the update's WHERE, and the record.
const DEBIT: &str = "
WITH u AS (UPDATE bench_accounts SET balance = balance - $2 WHERE id = $1 AND balance - $2 >= floor RETURNING 1)
INSERT INTO bench_ops (op_id, confirmed) SELECT $3, EXISTS (SELECT 1 FROM u)
RETURNING confirmed";

/// A claim: insert unless held; the holder (new or old) compared with the
/// claimant; the record. Returns no row when a concurrent claim of the
/// same key committed after this statement's snapshot (the holder is then
/// invisible to it): the caller runs it again.
const CLAIM: &str = "
WITH ins AS (
    INSERT INTO bench_claims (namespace, key, owner) VALUES ($1, $2, $3)
    ON CONFLICT DO NOTHING RETURNING owner
), holder AS (
    SELECT owner FROM ins
    UNION ALL
    SELECT owner FROM bench_claims WHERE namespace = $1 AND key = $2
    LIMIT 1
)
INSERT INTO bench_ops (op_id, confirmed) SELECT $4, owner = $3 FROM holder
RETURNING confirmed";

/// A transfer, step 1: lock both accounts in id order.
const LOCK_TWO: &str =
    "SELECT id, balance, floor FROM bench_accounts WHERE id = $1 OR id = $2 ORDER BY id FOR UPDATE";

/// A transfer, step 2 (when allowed): move the amount and record it.
const MOVE: &str = "
WITH u AS (
    UPDATE bench_accounts SET balance = balance + CASE WHEN id = $1 THEN -$3::bigint ELSE $3::bigint END
    WHERE id = $1 OR id = $2
)
INSERT INTO bench_ops (op_id, confirmed) VALUES ($4, true)";

/// A transfer, step 2 (when refused): record the refusal.
const REFUSE: &str = "INSERT INTO bench_ops (op_id, confirmed) VALUES ($1, false)";

/// PostgreSQL as a workload target.
pub struct Postgres {
    pool: Pool,
}

impl Postgres {
    /// A pool of `size` connections to `url`.
    pub fn connect(url: &str, size: usize) -> anyhow::Result<Postgres> {
        let mut config = deadpool_postgres::Config::new();
        config.url = Some(url.to_owned());
        config.manager = Some(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        });
        config.pool = Some(PoolConfig::new(size.max(1)));
        let pool = config
            .create_pool(Some(Runtime::Tokio1), NoTls)
            .context("making the PostgreSQL pool")?;
        Ok(Postgres { pool })
    }

    /// Makes the schema and `accounts` accounts with `balance` each; checks
    /// that commits are synchronous.
    pub async fn prepare(&self, accounts: u64, balance: u64) -> anyhow::Result<()> {
        let client = self.pool.get().await.context("connecting to PostgreSQL")?;
        let sync = client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .context("reading synchronous_commit")?;
        let sync: String = sync.get(0);
        anyhow::ensure!(
            sync == "on",
            "PostgreSQL has synchronous_commit = {sync}; the comparison needs on"
        );
        client
            .batch_execute(SCHEMA)
            .await
            .context("creating the schema")?;
        let count = i64::try_from(accounts).context("too many accounts")?;
        let balance = i64::try_from(balance).context("balance too large")?;
        client
            .execute(
                "INSERT INTO bench_accounts (id, balance) SELECT g, $2::bigint FROM generate_series(0::bigint, $1::bigint - 1) g",
                &[&count, &balance],
            )
            .await
            .context("creating the accounts")?;
        client
            .batch_execute("ANALYZE bench_accounts")
            .await
            .context("analyzing")?;
        Ok(())
    }

    /// Warms every connection of the pool (connect, prepare), so that the
    /// measured run pays for neither.
    pub async fn warm(&self, size: usize) -> anyhow::Result<()> {
        let mut held = Vec::new();
        for _ in 0..size.max(1) {
            let client = self.pool.get().await.context("connecting to PostgreSQL")?;
            for sql in [CREDIT, DEBIT, CLAIM, LOCK_TWO, MOVE, REFUSE] {
                client.prepare_cached(sql).await.context("preparing")?;
            }
            held.push(client);
        }
        Ok(())
    }

    async fn once(&self, op: Op) -> Result<Answer, Failure> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| Failure::Other(e.into()))?;
        let op_id = uuid::Uuid::now_v7();
        let int = |v: u64| i64::try_from(v).map_err(|e| Failure::Other(e.into()));
        match op {
            Op::Credit { account, amount } | Op::Debit { account, amount } => {
                let sql = if matches!(op, Op::Credit { .. }) {
                    CREDIT
                } else {
                    DEBIT
                };
                let stmt = client.prepare_cached(sql).await?;
                let row = client
                    .query_one(&stmt, &[&int(account)?, &int(amount)?, &op_id])
                    .await?;
                Ok(answer(row.get(0)))
            }
            Op::Claim { key, owner } => {
                let stmt = client.prepare_cached(CLAIM).await?;
                let key = format!("k{key}");
                let owner = format!("owner-{owner}");
                // At most one re-run per concurrent first claim of the key.
                for _ in 0..RETRIES_MAX {
                    let row = client
                        .query_opt(&stmt, &[&NAMESPACE, &key, &owner, &op_id])
                        .await?;
                    if let Some(row) = row {
                        return Ok(answer(row.get(0)));
                    }
                }
                Err(Failure::Other(anyhow::anyhow!(
                    "claim of {key}: holder never visible"
                )))
            }
            Op::Transfer { from, to, amount } => {
                let lock = client.prepare_cached(LOCK_TWO).await?;
                let mv = client.prepare_cached(MOVE).await?;
                let refuse = client.prepare_cached(REFUSE).await?;
                let (from, to, amount) = (int(from)?, int(to)?, int(amount)?);
                let tx = client.transaction().await?;
                let rows = tx.query(&lock, &[&from, &to]).await?;
                let allowed = rows.len() == 2
                    && rows.iter().any(|r| {
                        let id: i64 = r.get(0);
                        let balance: i64 = r.get(1);
                        let floor: i64 = r.get(2);
                        id == from && balance.checked_sub(amount).is_some_and(|b| b >= floor)
                    });
                if allowed {
                    tx.execute(&mv, &[&from, &to, &amount, &op_id]).await?;
                } else {
                    tx.execute(&refuse, &[&op_id]).await?;
                }
                tx.commit().await?;
                Ok(answer(allowed))
            }
        }
    }
}

fn answer(confirmed: bool) -> Answer {
    if confirmed {
        Answer::Confirmed
    } else {
        Answer::Refused
    }
}

/// Why one try failed.
enum Failure {
    /// A serialization failure or a deadlock: try again.
    Retry(tokio_postgres::Error),
    /// Anything else.
    Other(anyhow::Error),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        match e.code() {
            Some(c)
                if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                Failure::Retry(e)
            }
            _ => Failure::Other(e.into()),
        }
    }
}

impl Target for Postgres {
    async fn execute(&self, _client: usize, op: Op) -> anyhow::Result<Answer> {
        let mut last = None;
        for _ in 0..RETRIES_MAX {
            match self.once(op).await {
                Ok(a) => return Ok(a),
                Err(Failure::Retry(e)) => last = Some(e),
                Err(Failure::Other(e)) => return Err(e),
            }
        }
        Err(anyhow::anyhow!(
            "still failing after {RETRIES_MAX} tries: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }
}

/// A PostgreSQL server of the bench's own, in a temporary directory.
/// Dropping it stops it (`pg_ctl stop -m fast`, then SIGKILL).
pub struct Private {
    child: Option<Child>,
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
}

impl Private {
    /// initdb in `dir/pgdata`, then starts `postgres` on a free loopback
    /// port with fsync and synchronous commit on, allowing `connections`
    /// connections (plus a few). As root (PostgreSQL refuses to run as
    /// root), both run as the `postgres` user, or else `nobody`, through
    /// `setpriv`.
    pub fn start(dir: &Path, connections: usize) -> anyhow::Result<Private> {
        let bin = locate_bin()?;
        let run_as = if running_as_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
        }
        let data = dir.join("pgdata");
        let log_path = dir.join("postgres.log");
        let initdb = command(run_as, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "bench", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        anyhow::ensure!(
            initdb.status.success(),
            "initdb failed ({}): {}{}",
            initdb.status,
            String::from_utf8_lossy(&initdb.stdout),
            String::from_utf8_lossy(&initdb.stderr)
        );
        let port = free_port()?;
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&log_path, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to uid {uid}", log_path.display()))?;
        }
        let max_connections = connections.saturating_add(CONNECTIONS_SPARE);
        let child = command(run_as, &bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(["-c", &format!("max_connections={max_connections}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the log's handle")?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        let mut server = Private {
            child: Some(child),
            bin,
            data,
            port,
            run_as,
        };
        server.wait_ready(&log_path)?;
        Ok(server)
    }

    /// The pid of the server (the postmaster; its backends are its
    /// children).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The URL of the private server.
    pub fn url(&self) -> String {
        format!("postgres://bench@127.0.0.1:{}/postgres", self.port)
    }

    fn wait_ready(&mut self, log_path: &Path) -> anyhow::Result<()> {
        let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("polling postgres")?
            {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                anyhow::bail!("postgres exited at start ({status}):\n{log}");
            }
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            if log.contains("ready to accept connections")
                && std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "postgres did not accept connections within {READY_TIMEOUT:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (fast shutdown), reaps it. Does nothing the second
    /// time.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = command(self.run_as, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "fast", "-w", "-t", "20"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        super::reap_within(&mut child, Duration::from_secs(5));
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program`, run as `(uid, gid)` through setpriv when given (setpriv
/// execs, so the child's pid is the program's).
fn command(run_as: Option<(u32, u32)>, program: &Path) -> Command {
    match run_as {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The directory holding `initdb`, `postgres` and `pg_ctl`: the one of
/// `initdb` on PATH, else the newest `/usr/lib/postgresql/<v>/bin`.
pub fn locate_bin() -> anyhow::Result<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "postgres", "pg_ctl"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() {
                // PATH may hold symlinks into the real directory (Debian's
                // /usr/local/bin): resolve to the real one.
                let real = std::fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .unwrap_or(dir.clone());
                if has_all(&real) {
                    return Ok(real);
                }
                if has_all(&dir) {
                    return Ok(dir);
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|(_, dir)| dir)
        .find(|dir| has_all(dir))
        .context(NOT_FOUND)
}

/// Whether this process runs as root: /proc/self belongs to the effective
/// user.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of `postgres`, else `nobody`.
fn unprivileged_user() -> anyhow::Result<(u32, u32)> {
    for user in ["postgres", "nobody"] {
        let id = |flag: &str| {
            Command::new("id")
                .args([flag, user])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<u32>()
                        .ok()
                })
        };
        if let (Some(uid), Some(gid)) = (id("-u"), id("-g")) {
            return Ok((uid, gid));
        }
    }
    anyhow::bail!("running as root and no postgres or nobody user to run PostgreSQL as")
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .context("binding a loopback port to find a free one")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}
