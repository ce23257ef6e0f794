//! `amends status`, `wait`, `balance`, `claim-owner` and `stats`: the service's
//! request-reply endpoints from the command line.
//!
//! Exit codes: `status` 0 decided confirmed, 1 decided rejected (4 when
//! the op id itself was refused), 3 unknown, 2 error; `wait` the same, but
//! 5 when no decision came in time; `balance` 0 found, 3 unknown account, 2 error; `claim-owner`
//! and `stats` 0 answered, 2 error.

use std::time::Duration;

use amends_client::{Client, Decision, OpStatus};
use amends_core::OpId;
use amends_core::command::{AccountId, ClaimKey, Namespace};
use amends_core::protocol::query::{self, StatusAnswer};
use amends_core::route::PartitionId;
use anyhow::Context as _;
use clap::Args;

use crate::nats::DeploymentArgs;

/// Exit code: an answer that is not "confirmed" / "found" but not an error
/// either: the op id or account is unknown.
pub const EXIT_UNKNOWN: u8 = 3;

/// The flags every query shares.
#[derive(Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// How long to wait for each answer, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
}

impl QueryArgs {
    async fn connect(&self, name: &str) -> anyhow::Result<Client> {
        self.deployment.connect(name).await
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// The flags of `amends status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// Ask only this partition (the one that owns the operation's routing
    /// key); by default every partition is asked.
    #[arg(long)]
    pub partition: Option<u32>,
    /// The op id, in canonical text.
    pub op_id: String,
}

/// The flags of `amends balance`.
#[derive(Args, Debug)]
pub struct BalanceArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// The account id.
    pub account: String,
}

/// The flags of `amends claim-owner`.
#[derive(Args, Debug)]
pub struct ClaimOwnerArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// The claim's namespace.
    pub namespace: String,
    /// The claimed key.
    pub key: String,
}

/// The flags of `amends stats`.
#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// Print JSON (one object per partition, one per line) instead of a
    /// table.
    #[arg(long)]
    pub json: bool,
}

/// Prints an error and exits 2, or exits with the code.
pub fn exit(result: anyhow::Result<u8>) -> ! {
    match result {
        Ok(code) => std::process::exit(i32::from(code)),
        Err(e) => {
            eprintln!("error: {}", crate::report(&e));
            std::process::exit(2);
        }
    }
}

/// `amends status`: asks the partitions what they know of an op id (all
/// of them at once, unless `--partition`), prints the answer as JSON.
pub async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let op_id = parse_op_id(&args.op_id)?;
    let client = args.query.connect("amends status").await?;
    let partitions = partitions(&client, args.partition)?;
    let (decision, failed) = ask(&client, op_id, &partitions, args.query.timeout()).await;
    if let Some(decision) = decision {
        return print_decided(&decision);
    }
    anyhow::ensure!(
        failed.is_empty(),
        "not every partition answered: {}",
        failed.join("; ")
    );
    print_answer(&StatusAnswer::Unknown);
    Ok(EXIT_UNKNOWN)
}

/// The flags of `amends wait`.
#[derive(Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// Ask only this partition (the one that owns the operation's routing
    /// key); by default every partition is asked.
    #[arg(long)]
    pub partition: Option<u32>,
    /// How long to wait for the decision in all, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub wait_ms: u64,
    /// The op id, in canonical text.
    pub op_id: String,
}

/// How often `amends wait` asks again.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// `amends wait`: asks until the op id has a final decision (printed as
/// `status` prints it) or `--wait-ms` passed (exit 5). Partitions that do
/// not answer (no instance serves them yet) are asked again.
pub async fn wait(args: WaitArgs) -> anyhow::Result<u8> {
    let op_id = parse_op_id(&args.op_id)?;
    let client = args.query.connect("amends wait").await?;
    let partitions = partitions(&client, args.partition)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(args.wait_ms);
    let mut last_failed = Vec::new();
    loop {
        let (decision, failed) = ask(&client, op_id, &partitions, args.query.timeout()).await;
        if let Some(decision) = decision.filter(|d| d.outcome.is_final()) {
            return print_decided(&decision);
        }
        if !failed.is_empty() {
            last_failed = failed;
        }
        if tokio::time::Instant::now() + WAIT_POLL > deadline {
            break;
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
    let unanswered = if last_failed.is_empty() {
        String::new()
    } else {
        format!(" (not answering: {})", last_failed.join("; "))
    };
    eprintln!(
        "op {op_id}: no decision within {} ms{unanswered}; it may not be in the log, or no amends \
         instance serves its partition yet",
        args.wait_ms
    );
    print_answer(&StatusAnswer::Unknown);
    Ok(crate::submit::EXIT_NO_DECISION_YET)
}

fn parse_op_id(text: &str) -> anyhow::Result<OpId> {
    text.parse()
        .ok()
        .filter(|id: &OpId| id.to_string() == text)
        .with_context(|| format!("{text:?} is not an op id in canonical text"))
}

/// `only`, checked, or every partition of the deployment.
fn partitions(client: &Client, only: Option<u32>) -> anyhow::Result<Vec<PartitionId>> {
    Ok(match only {
        Some(p) => vec![
            client
                .partitions()
                .id(p)
                .with_context(|| format!("--partition {p} is not a partition of the deployment"))?,
        ],
        None => client.partitions().ids().collect(),
    })
}

/// Asks `partitions` at once what they know of `op_id`: a decision if one
/// has it, and the partitions that did not answer.
async fn ask(
    client: &Client,
    op_id: OpId,
    partitions: &[PartitionId],
    timeout: Duration,
) -> (Option<Decision>, Vec<String>) {
    let asks = partitions.iter().map(|&p| {
        let client = client.clone();
        async move { (p, client.status(op_id, p, timeout).await) }
    });
    let mut failed = Vec::new();
    for (p, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Ok(OpStatus::Decided(decision)) => return (Some(decision), failed),
            Ok(OpStatus::Unknown) => {}
            Err(e) => failed.push(format!("partition {}: {e}", p.get())),
        }
    }
    (None, failed)
}

/// Prints `{"status": "decided", "decision": ...}`; the exit code of its
/// outcome (a saga still in flight has no final outcome yet: not decided,
/// so "unknown", like an op not yet applied).
fn print_decided(decision: &Decision) -> anyhow::Result<u8> {
    print_answer(&StatusAnswer::Decided {
        decision: decision.clone(),
    });
    Ok(if decision.outcome.is_final() {
        crate::submit::exit_code(decision)
    } else {
        EXIT_UNKNOWN
    })
}

/// Prints a status answer as the status endpoint writes it.
fn print_answer(answer: &StatusAnswer) {
    println!("{}", String::from_utf8_lossy(&query::encode(answer)));
}

/// `amends balance`: the account's balance, holds and limits as JSON.
pub async fn balance(args: BalanceArgs) -> anyhow::Result<u8> {
    let account = AccountId::new(args.account.clone())
        .with_context(|| format!("{:?} is not an account id", args.account))?;
    let client = args.query.connect("amends balance").await?;
    match client.balance(&account, args.query.timeout()).await? {
        Some(balance) => {
            let mut value = serde_json::to_value(&balance)?;
            value["status"] = "found".into();
            println!("{value}");
            Ok(0)
        }
        None => {
            println!(
                "{}",
                serde_json::json!({"status": "unknown", "account": account.as_str()})
            );
            Ok(EXIT_UNKNOWN)
        }
    }
}

/// `amends claim-owner`: who holds `(namespace, key)`, as JSON.
pub async fn claim_owner(args: ClaimOwnerArgs) -> anyhow::Result<u8> {
    let namespace = Namespace::new(args.namespace.clone())
        .with_context(|| format!("{:?} is not a namespace", args.namespace))?;
    let key =
        ClaimKey::new(args.key.clone()).with_context(|| format!("{:?} is not a key", args.key))?;
    let client = args.query.connect("amends claim-owner").await?;
    let claim = client
        .claim_owner(&namespace, &key, args.query.timeout())
        .await?;
    let mut value = serde_json::to_value(&claim)?;
    value["status"] = if claim.owner.is_some() {
        "claimed"
    } else {
        "free"
    }
    .into();
    value["namespace"] = namespace.as_str().into();
    value["key"] = key.as_str().into();
    println!("{value}");
    Ok(0)
}

/// `amends stats`: every partition's state, applied position, last
/// sequence and lag, as a table (or JSON lines).
pub async fn stats(args: StatsArgs) -> anyhow::Result<u8> {
    let client = args.query.connect("amends stats").await?;
    let timeout = args.query.timeout();
    let asks = client.partitions().ids().map(|p| {
        let client = client.clone();
        async move { (p, client.stats(p, timeout).await) }
    });
    let answers = futures_util::future::join_all(asks).await;
    if !args.json {
        println!(
            "{:>9}  {:<10}  {:>12}  {:>12}  {:>8}  {:>8}  {:>15}  owner (epoch host pid)",
            "partition", "state", "applied", "last_seq", "lag", "restarts", "log_time_ms"
        );
    }
    let mut failed = 0_usize;
    for (p, answer) in answers {
        let stats = match answer {
            Ok(stats) => stats,
            Err(e) => {
                eprintln!("partition {p}: {e}");
                failed = failed.saturating_add(1);
                continue;
            }
        };
        if args.json {
            println!("{}", serde_json::to_string(&stats)?);
            continue;
        }
        let or_dash = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let state = serde_json::to_value(stats.state)?;
        let owner = stats.owner.as_ref().map_or_else(
            || "-".to_owned(),
            |o| format!("{} {} {}", o.epoch, o.host, o.pid),
        );
        println!(
            "{:>9}  {:<10}  {:>12}  {:>12}  {:>8}  {:>8}  {:>15}  {owner}",
            stats.partition,
            state.as_str().unwrap_or("?"),
            stats.applied_position,
            or_dash(stats.last_sequence),
            or_dash(stats.lag),
            stats.restarts,
            stats.log_time_ms
        );
        for detail in [&stats.detail, &stats.stream_error, &stats.owner_error]
            .into_iter()
            .flatten()
        {
            println!("{:>9}  {detail}", "");
        }
    }
    anyhow::ensure!(failed == 0, "{failed} partition(s) did not answer");
    Ok(0)
}
