//! An order as a saga: reserve stock, charge a wallet, claim a seat.
//!
//! Run it with `cargo run --example order_saga` after `scripts/setup` (it
//! starts the pinned nats-server from `.tools/bin`, or `$AMENDS_NATS_SERVER`,
//! on a free loopback port, and the amends service in this process, with its
//! store in a temporary directory).
//!
//! Three steps on three partitions: a debit of the stock account, a debit of
//! the buyer's wallet and a claim of the seat. Ann's order is confirmed.
//! Bob then orders the same seat optimistically (he does not wait): the seat
//! step is refused, amends cancels the two debits it had reserved (their
//! holds are voided, so Bob is never charged), and the order workflow, which
//! follows the apology topic through a durable consumer, receives the
//! apology and can tell Bob.

use std::time::Duration;

use amends_client::{Client, Options as ClientOptions};
use amends_core::Request;
use amends_core::command::{AccountId, ClaimKey, Namespace, Topic};
use amends_core::partition::Config;
use amends_core::route::{self, Partitions};
use amends_nats::service::{self, Service};
use amends_nats::test_support::{Server, connect};
use amends_nats::topology::{self, Topology};
use amends_store::Store;
use anyhow::Context as _;
use futures_util::StreamExt as _;
use serde_json::json;

const TRY: Duration = Duration::from_secs(5);

fn request(command: serde_json::Value) -> anyhow::Result<Request> {
    Ok(serde_json::from_value(json!({
        "op_id": Client::new_op_id(),
        "command": command,
    }))?)
}

/// The order saga: one unit of stock, `price` from the buyer, the seat.
fn order(buyer: &str, seat: &str, price: u64) -> anyhow::Result<Request> {
    request(json!({
        "type": "saga",
        "deadline_ms": 30_000,
        "steps": [
            {"command": {"type": "debit", "account": "stock:widget", "amount": 1}},
            {"command": {"type": "debit", "account": format!("wallet:{buyer}"), "amount": price}},
            {"command": {"type": "claim", "namespace": "seat", "key": seat, "owner": buyer}},
        ],
    }))
}

async fn show_balances(client: &Client) -> anyhow::Result<()> {
    for name in ["stock:widget", "wallet:ann", "wallet:bob"] {
        let account = AccountId::new(name)?;
        let b = client
            .balance(&account, TRY)
            .await?
            .context("account missing")?;
        println!(
            "  {name:<13} balance {:>4}  held {:>3}  available {:>4}",
            b.balance, b.held, b.available
        );
    }
    Ok(())
}

/// Waits until no hold is left on the accounts: every confirm or cancel the
/// last saga appended has been applied.
async fn settle(client: &Client) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut held = 0;
        for name in ["stock:widget", "wallet:ann", "wallet:bob"] {
            let b = client.balance(&AccountId::new(name)?, TRY).await?;
            held += b.context("account missing")?.held;
        }
        if held == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "holds left after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let partitions = Partitions::new(4)?;
    let server = Server::start();
    let js = async_nats::jetstream::new(connect(&server).await);
    let topology = Topology::new(partitions);
    topology::ensure(&js, &topology).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), amends_store::Options::new(partitions))?;
    let service = Service::new(
        &js,
        &topology,
        &store,
        Config::default(),
        service::Options::default(),
    )?;
    let running = tokio::spawn(service.run());
    let client = Client::connect(ClientOptions::new(server.url())).await?;

    println!("where things live (partition of each routing key):");
    for key in ["stock:widget", "wallet:ann", "wallet:bob"] {
        println!("  {key:<13} -> {}", route::partition_of(key, partitions));
    }
    println!(
        "  seat 12A      -> {}",
        route::partition_of(&route::claim_routing_key("seat", "12A"), partitions)
    );

    for (account, funds) in [
        ("stock:widget", 10),
        ("wallet:ann", 100),
        ("wallet:bob", 100),
    ] {
        let open = request(json!({"type": "open_account", "account": account}))?;
        client.submit_and_wait(&open, TRY, 3).await?;
        let credit = request(json!({"type": "credit", "account": account, "amount": funds}))?;
        client.submit_and_wait(&credit, TRY, 3).await?;
    }

    // The order workflow follows its apology topic before anything fails.
    let topic = Topic::new("orders.apologies")?;
    let mut workflow = client.apologies(&topic, "order-workflow").await?;

    println!("\nann orders seat 12A for 30 and waits:");
    let ann = order("ann", "12A", 30)?;
    let decision = client.submit_and_wait(&ann, TRY, 3).await?;
    println!("  decision: {}", serde_json::to_string(&decision)?);
    // The confirms (post the holds, make the claim final) were appended to
    // the steps' partitions before the decision was published; they are
    // applied a moment later.
    settle(&client).await?;
    show_balances(&client).await?;

    println!("\nbob orders seat 12A for 30 without waiting (apology topic {topic:?}):");
    let bob = order("bob", "12A", 30)?;
    client.submit_optimistic(&bob, &topic).await?;
    println!("  accepted into the log; bob's app goes ahead");

    let delivery = tokio::time::timeout(Duration::from_secs(20), workflow.next())
        .await
        .context("no apology within 20 s")?
        .context("the apology stream ended")??;
    println!("\nthe order workflow receives an apology:");
    println!("  {}", serde_json::to_string(delivery.apology())?);
    delivery.ack().await?;
    anyhow::ensure!(
        delivery.op_id() == bob.op_id,
        "an apology for another order"
    );

    settle(&client).await?;
    println!("\nafter the compensation (bob's holds voided, nothing charged):");
    show_balances(&client).await?;
    let owner = client
        .claim_owner(&Namespace::new("seat")?, &ClaimKey::new("12A")?, TRY)
        .await?;
    println!(
        "  seat 12A owner: {}",
        owner.owner.map_or("(free)".to_owned(), |o| o.to_string())
    );

    // Exactly what the saga promised: ann paid, bob did not.
    let bob_wallet = client
        .balance(&AccountId::new("wallet:bob")?, TRY)
        .await?
        .context("wallet:bob missing")?;
    anyhow::ensure!(bob_wallet.balance == 100, "bob was charged");
    running.abort();
    Ok(())
}
