//! Optimistic submit and the apology consumer against real workers: a
//! refusal reaches the workflow as an apology, a confirmation does not, and
//! the durable consumer delivers at least once across re-creation.

use std::time::Duration;

use amends_client::{Apologies, ApologiesOptions, Client, Delivery, OpStatus};
use amends_core::command::Topic;
use amends_core::decision::Reason;
use amends_core::{Command, Request};
use futures_util::StreamExt;

use crate::support::{Deployment, TRY_TIMEOUT, account, amount, open, request, within};

/// How long a test waits to be sure that nothing more is delivered.
const QUIET: Duration = Duration::from_millis(1500);

fn topic() -> Topic {
    Topic::new("orders.payments").expect("a valid topic")
}

fn debit(name: &str, n: u64) -> Request {
    request(Command::Debit {
        account: account(name),
        amount: amount(n),
    })
}

/// Opens `name` with `balance` through waiting submits.
async fn funded(client: &Client, name: &str, balance: u64) {
    for req in [
        request(open(name)),
        request(Command::Credit {
            account: account(name),
            amount: amount(balance),
        }),
    ] {
        let d = client
            .submit_and_wait(&req, TRY_TIMEOUT, 1)
            .await
            .expect("setup");
        assert!(d.outcome.is_confirmed(), "{d:?}");
    }
}

async fn next(apologies: &mut Apologies) -> Delivery {
    tokio::time::timeout(TRY_TIMEOUT, apologies.next())
        .await
        .expect("an apology in time")
        .expect("the stream does not end")
        .expect("a readable apology")
}

async fn nothing_more(apologies: &mut Apologies) {
    if let Ok(item) = tokio::time::timeout(QUIET, apologies.next()).await {
        panic!("expected no more apologies, got {item:?}");
    }
}

#[tokio::test]
async fn a_refused_optimistic_op_is_apologised_to_the_workflow() {
    // Proves the optimistic path: submit_optimistic returns on the PubAck, and the refusal reaches a durable apology consumer with the refused command, the op id and the right reason.
    within(async {
        let mut dep = Deployment::start("amends", 4).await;
        dep.spawn_workers();
        let client = dep.client().await;
        funded(&client, "shop", 50).await;

        let refused = debit("shop", 80);
        let submitted = client
            .submit_optimistic(&refused, &topic())
            .await
            .expect("published");
        assert_eq!(submitted.op_id, refused.op_id);
        assert!(!submitted.duplicate);

        let mut apologies = client
            .apologies(&topic(), "payments")
            .await
            .expect("consumer");
        let delivery = next(&mut apologies).await;
        assert_eq!(
            delivery.op_id(),
            refused.op_id,
            "the dedup key is the op id"
        );
        let apology = delivery.apology();
        assert_eq!(apology.topic, topic());
        assert_eq!(apology.command, refused.command);
        match apology.decision.outcome.reason() {
            Some(Reason::InsufficientFunds {
                available: 50,
                requested: 80,
                ..
            }) => {}
            other => panic!("expected insufficient_funds 50 < 80, got {other:?}"),
        }
        assert_eq!(delivery.delivered(), Some(1));
        delivery.ack().await.expect("ack");
        nothing_more(&mut apologies).await;

        // A request that names another topic is refused before anything is sent.
        let mut other = debit("shop", 1);
        other.apology_topic = Some(Topic::new("elsewhere").expect("a valid topic"));
        assert!(matches!(
            client.submit_optimistic(&other, &topic()).await,
            Err(amends_client::Error::TopicMismatch { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn a_confirmed_optimistic_op_gets_no_apology() {
    // Proves a confirmation publishes no apology: the status endpoint confirms the optimistic debit, and the only apology on the topic is that of a later refused op on the same partition (apologies follow partition order).
    within(async {
        let mut dep = Deployment::start("amends", 2).await;
        dep.spawn_service();
        let client = dep.client().await;
        funded(&client, "shop", 50).await;

        let confirmed = debit("shop", 30);
        client
            .submit_optimistic(&confirmed, &topic())
            .await
            .expect("published");
        let refused = debit("shop", 30);
        client
            .submit_optimistic(&refused, &topic())
            .await
            .expect("published");

        let mut apologies = client
            .apologies(&topic(), "payments")
            .await
            .expect("consumer");
        let delivery = next(&mut apologies).await;
        assert_eq!(
            delivery.op_id(),
            refused.op_id,
            "the first apology is the refusal's"
        );
        delivery.ack().await.expect("ack");
        nothing_more(&mut apologies).await;

        let partition = client.partition_of(&confirmed).expect("routable");
        match client
            .status(confirmed.op_id, partition, TRY_TIMEOUT)
            .await
            .expect("status")
        {
            OpStatus::Decided(d) => assert!(d.outcome.is_confirmed(), "{d:?}"),
            OpStatus::Unknown => panic!("the optimistic debit was decided"),
        }
    })
    .await;
}

#[tokio::test]
async fn an_unacked_apology_comes_again_to_a_recreated_consumer_an_acked_one_does_not() {
    // Proves at-least-once across re-creation: of two apologies, the acked one never returns, the unacked one is delivered again (delivered = 2) to the consumer created again with the same durable name, and once acked nothing returns.
    within(async {
        let mut dep = Deployment::start("amends", 1).await;
        dep.spawn_workers();
        let client = dep.client().await;
        funded(&client, "shop", 10).await;
        let first = debit("shop", 100);
        let second = debit("shop", 200);
        for req in [&first, &second] {
            client
                .submit_optimistic(req, &topic())
                .await
                .expect("published");
        }
        let mut options = ApologiesOptions::default();
        options.ack_wait = Duration::from_secs(1);

        let mut apologies = client
            .apologies_with(&topic(), "workflow", options.clone())
            .await
            .expect("consumer");
        let a = next(&mut apologies).await;
        assert_eq!(a.op_id(), first.op_id);
        a.ack().await.expect("ack");
        let b = next(&mut apologies).await;
        assert_eq!(b.op_id(), second.op_id);
        // The workflow dies before making amends for the second.
        drop(b);
        drop(apologies);

        let mut apologies = client
            .apologies_with(&topic(), "workflow", options.clone())
            .await
            .expect("consumer again");
        let again = next(&mut apologies).await;
        assert_eq!(
            again.op_id(),
            second.op_id,
            "only the unacked one comes again"
        );
        assert_eq!(again.delivered(), Some(2));
        again.ack().await.expect("ack");
        nothing_more(&mut apologies).await;
        drop(apologies);

        let mut apologies = client
            .apologies_with(&topic(), "workflow", options)
            .await
            .expect("consumer a third time");
        nothing_more(&mut apologies).await;

        // Another durable name is another workflow: it gets both.
        let mut other = client.apologies(&topic(), "audit").await.expect("consumer");
        assert_eq!(next(&mut other).await.op_id(), first.op_id);
        assert_eq!(next(&mut other).await.op_id(), second.op_id);
    })
    .await;
}
