//! The service's query endpoints (balance, claim, stats) against a real
//! nats-server, under a non-default prefix, with a stopped partition.

use std::time::{Duration, Instant};

use amends_core::partition::{Config, Effect, Machine};
use amends_core::route::{PartitionId, Partitions, partition_of};
use amends_core::state::{ChangeSet, Overlay};
use amends_core::wire;
use amends_nats::service::{self, Service};
use amends_nats::topology::{self, header};
use amends_store::{PartitionStore, Store};
use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::{Value, json};

use crate::support::{Server, connect, topology, within};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn op_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Publishes one request with its op id as `Nats-Msg-Id`; returns its
/// stream sequence.
async fn publish(js: &jetstream::Context, subject: String, command: Value) -> u64 {
    let id = op_id();
    let body = serde_json::to_vec(&json!({"op_id": id, "command": command})).expect("json");
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, id.as_str());
    js.publish_with_headers(subject, headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("ack")
        .sequence
}

/// Asks `subject`, retrying while nobody answers yet; the answer as JSON.
async fn ask(nats: &async_nats::Client, subject: String, body: &str) -> Value {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        match nats.request(subject.clone(), body.to_owned().into()).await {
            Ok(reply) => return serde_json::from_slice(&reply.payload).expect("json"),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no answer on {subject}: {e}"),
        }
    }
}

/// A service over every partition of `store`, with the defaults.
fn new_service(js: &jetstream::Context, topology: &topology::Topology, store: &Store) -> Service {
    Service::new(
        js,
        topology,
        store,
        Config::default(),
        service::Options::default(),
    )
    .expect("service")
}

/// An account that partition `p` owns.
fn account_of(p: PartitionId, partitions: Partitions) -> String {
    (0..)
        .map(|i| format!("acct-{i}"))
        .find(|a| partition_of(a, partitions) == p)
        .expect("an account of the partition")
}

/// A claim key in namespace `ns` that partition `p` owns.
fn claim_key_of(p: PartitionId, partitions: Partitions) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| partition_of(&amends_core::route::claim_routing_key("ns", k), partitions) == p)
        .expect("a claim of the partition")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_from_the_store_and_stats_tell_a_stopped_partition() {
    // Proves the query endpoints under prefix `acme.amends`: a balance after a credit and a hold (held, available), a claim owner, a query sent to the wrong partition is an error, and stats show the running partition caught up (applied = last sequence, lag 0) and the partition whose log went backwards (store forged to position 1,000,000) as stopped with its reason.
    within(async {
        let server = Server::start();
        let js = jetstream::new(connect(&server).await);
        let topology = topology("acme.amends", 2);
        topology::ensure(&js, &topology).await.expect("ensure");
        let dir = tempfile::tempdir().expect("tempdir");
        let partitions = Partitions::new(2).expect("count");
        let store = Store::open(dir.path(), amends_store::Options::new(partitions)).expect("store");
        let p0 = partitions.id(0).expect("p0");
        let p1 = partitions.id(1).expect("p1");

        // Partition 0's store is ahead of its log: it will stop.
        let forged = store.partition(p0).expect("partition");
        let tick = format!(r#"{{"op_id":"{}","command":{{"type":"tick"}}}}"#, op_id());
        let input = wire::decode_request(tick.as_bytes()).expect("a tick");
        let mut changes = ChangeSet::default();
        let mut effects: Vec<Effect> = Vec::new();
        {
            let mut state = Overlay::new(&forged, &mut changes);
            Machine::new(p0, partitions, Config::default())
                .apply(&mut state, 1_000_000, 1, &input, &mut effects)
                .expect("apply");
        }
        forged.commit(&changes, &effects).expect("commit");

        let service = new_service(&js, &topology, &store);
        let task = tokio::spawn(service.run());

        let account = account_of(p1, partitions);
        let key = claim_key_of(p1, partitions);
        let req = |p: PartitionId| topology.prefix.req(p);
        publish(
            &js,
            req(p1),
            json!({"type": "open_account", "account": account, "floor": -10}),
        )
        .await;
        publish(
            &js,
            req(p1),
            json!({"type": "credit", "account": account, "amount": 40}),
        )
        .await;
        publish(
            &js,
            req(p1),
            json!({"type": "hold", "account": account, "amount": 15}),
        )
        .await;
        let last_p1 = publish(
            &js,
            req(p1),
            json!({"type": "claim", "namespace": "ns", "key": key, "owner": "carol"}),
        )
        .await;
        let last_p0 = publish(
            &js,
            req(p0),
            json!({"type": "open_account", "account": "x"}),
        )
        .await;

        let nats = js.client();
        let stats = |p: PartitionId| ask(&nats, topology.prefix.stats(p), "");
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let (s0, s1) = loop {
            let (s0, s1) = (stats(p0).await, stats(p1).await);
            if (s0["state"] == "stopped" && s1["lag"] == 0) || Instant::now() > deadline {
                break (s0, s1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(s1["status"], "ok", "{s1}");
        assert_eq!(s1["state"], "running", "{s1}");
        assert_eq!(s1["applied_position"], last_p1, "{s1}");
        assert_eq!(s1["last_sequence"], last_p1, "{s1}");
        assert_eq!(s1["lag"], 0, "{s1}");
        assert_eq!(s0["state"], "stopped", "{s0}");
        assert!(
            s0["detail"]
                .as_str()
                .is_some_and(|d| d.contains("went backwards")),
            "{s0}"
        );
        assert_eq!(s0["applied_position"], 1_000_000, "{s0}");
        assert_eq!(s0["last_sequence"], last_p0, "{s0}");

        let balance = ask(&nats, topology.prefix.query_balance(p1), &account).await;
        assert_eq!(balance["status"], "found", "{balance}");
        assert_eq!(
            [
                &balance["balance"],
                &balance["held"],
                &balance["available"],
                &balance["floor"],
                &balance["ceiling"]
            ],
            [
                &json!(40),
                &json!(15),
                &json!(25),
                &json!(-10),
                &Value::Null
            ],
            "{balance}"
        );
        assert_eq!(balance["position"], last_p1, "{balance}");
        let claim = json!({"namespace": "ns", "key": key}).to_string();
        let owner = ask(&nats, topology.prefix.query_claim(p1), &claim).await;
        assert_eq!(owner["status"], "claimed", "{owner}");
        assert_eq!(owner["owner"], "carol", "{owner}");

        // The wrong partition refuses rather than answering "unknown".
        let wrong = ask(&nats, topology.prefix.query_balance(p0), &account).await;
        assert_eq!(wrong["status"], "error", "{wrong}");
        assert!(
            wrong["detail"]
                .as_str()
                .is_some_and(|d| d.contains("partition 1")),
            "{wrong}"
        );
        let ghost = (0..)
            .map(|i| format!("ghost-{i}"))
            .find(|a| partition_of(a, partitions) == p1)
            .expect("an account of partition 1");
        let unknown = ask(&nats, topology.prefix.query_balance(p1), &ghost).await;
        assert_eq!(unknown["status"], "unknown", "{unknown}");
        assert_eq!(unknown["position"], last_p1, "{unknown}");
        assert!(!task.is_finished(), "the service goes on");
        task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_of_a_subset_answer_for_those_partitions_only() {
    // Proves the endpoints subscribe per served partition: serving partition 1 of 3 alone, every query kind answers on partition 1's subjects, partitions 0 and 2 get no answer from this process, a partition the deployment does not have (7) and a subject that names none still get the error answer, and the micro service lists exactly partition 1's four endpoints, each with its partition in its metadata.
    within(async {
        let server = Server::start();
        let nats = connect(&server).await;
        let js = jetstream::new(nats.clone());
        let topology = topology("amends", 3);
        topology::ensure(&js, &topology).await.expect("ensure");
        let dir = tempfile::tempdir().expect("tempdir");
        let partitions = Partitions::new(3).expect("count");
        let store = Store::open(dir.path(), amends_store::Options::new(partitions)).expect("store");
        let service = new_service(&js, &topology, &store);
        let p1 = partitions.id(1).expect("p1");
        let endpoints = tokio::spawn(service::serve_endpoints(
            js.clone(),
            topology.clone(),
            Config::default(),
            service.status(),
            vec![p1],
        ));
        let prefix = &topology.prefix;

        let stats = ask(&nats, prefix.stats(p1), "").await;
        assert_eq!(stats["status"], "ok", "{stats}");
        assert_eq!(stats["partition"], 1, "{stats}");
        let status = ask(&nats, prefix.status(p1), &op_id()).await;
        assert_eq!(status, json!({"status": "unknown"}));
        // Every request is answered at once, none handed to the wildcard
        // subscription that answers partitions the deployment lacks.
        for _ in 0..20 {
            let asked = tokio::time::timeout(
                Duration::from_secs(2),
                nats.request(prefix.status(p1), op_id().into()),
            )
            .await;
            assert!(matches!(asked, Ok(Ok(_))), "{asked:?}");
        }
        let account = account_of(p1, partitions);
        let balance = ask(&nats, prefix.query_balance(p1), &account).await;
        assert_eq!(balance["status"], "unknown", "{balance}");
        let key = claim_key_of(p1, partitions);
        let body = json!({"namespace": "ns", "key": key}).to_string();
        let claim = ask(&nats, prefix.query_claim(p1), &body).await;
        assert_eq!(claim["status"], "free", "{claim}");

        for p in [0, 2] {
            let p = partitions.id(p).expect("a partition");
            for subject in [
                prefix.stats(p),
                prefix.status(p),
                prefix.query_balance(p),
                prefix.query_claim(p),
            ] {
                let asked = tokio::time::timeout(
                    Duration::from_millis(500),
                    nats.request(subject.clone(), "".into()),
                )
                .await;
                assert!(
                    !matches!(asked, Ok(Ok(_))),
                    "{subject} answered by a process that does not serve it: {asked:?}"
                );
            }
        }

        for subject in ["amends.stats.7", "amends.status.x"] {
            let answer = ask(&nats, subject.to_owned(), "").await;
            assert_eq!(
                answer,
                json!({"status": "error", "detail": format!("{subject} names no partition")})
            );
        }

        let info = nats
            .request("$SRV.INFO.amends", "".into())
            .await
            .expect("info");
        let info: Value = serde_json::from_slice(&info.payload).expect("json");
        let mut listed: Vec<(String, String, String, String)> = info["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| {
                let text = |v: &Value| v.as_str().expect("text").to_owned();
                (
                    text(&e["name"]),
                    text(&e["subject"]),
                    text(&e["queue_group"]),
                    text(&e["metadata"]["partition"]),
                )
            })
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                ("balance-1", "amends.query.balance.1", "amends-query"),
                ("claim-1", "amends.query.claim.1", "amends-query"),
                ("stats-1", "amends.stats.1", "amends-query"),
                ("status-1", "amends.status.1", "amends-status"),
            ]
            .map(|(n, s, q)| (
                n.to_owned(),
                s.to_owned(),
                q.to_owned(),
                "1".to_owned()
            ))
        );
        endpoints.abort();
    })
    .await;
}
