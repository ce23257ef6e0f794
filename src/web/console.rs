//! The operator console's pushed snapshot: once a second, per partition
//! its owner (the ownership record on the decisions stream) and its state,
//! applied position, last sequence and lag (the stats endpoint), with the
//! hub's rates, refusals, apologies, dead letters, holds and sagas.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amends_core::route::PartitionId;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::hub::now_ms;
use super::{Body, Web};

/// How often the console gets a snapshot.
const EVERY: Duration = Duration::from_secs(1);

/// How often the ownership records are read again (they change only when
/// a worker takes a partition).
const OWNERS_EVERY: Duration = Duration::from_secs(5);

/// How long a stats request may take before the partition shows "no
/// answer".
const STATS_TIMEOUT: Duration = Duration::from_millis(800);

/// `GET /api/console/events`: a snapshot every [`EVERY`] for as long as
/// the page stays.
pub fn events(web: &Arc<Web>) -> hyper::Response<Body> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(push(Arc::clone(web), tx));
    super::sse(rx)
}

async fn push(web: Arc<Web>, tx: mpsc::Sender<String>) {
    let mut owners: HashMap<u32, Value> = HashMap::new();
    let mut owners_read = None::<Instant>;
    let mut every = tokio::time::interval(EVERY);
    loop {
        every.tick().await;
        if owners_read.is_none_or(|t| t.elapsed() >= OWNERS_EVERY) {
            owners = read_owners(&web).await;
            owners_read = Some(Instant::now());
        }
        let snapshot = snapshot(&web, &owners).await;
        if tx.send(snapshot.to_string()).await.is_err() {
            return;
        }
    }
}

async fn snapshot(web: &Web, owners: &HashMap<u32, Value>) -> Value {
    let ids: Vec<PartitionId> = web.client.partitions().ids().collect();
    let stats =
        futures_util::future::join_all(ids.iter().map(|&p| web.client.stats(p, STATS_TIMEOUT)))
            .await;
    let partitions: Vec<Value> = ids
        .iter()
        .zip(stats)
        .map(|(p, stats)| {
            let owner = owners.get(&p.get()).cloned().unwrap_or(Value::Null);
            match stats {
                Ok(s) => json!({
                    "partition": p.get(), "owner": owner, "state": s.state,
                    "detail": s.detail, "restarts": s.restarts,
                    "applied_position": s.applied_position, "log_time_ms": s.log_time_ms,
                    "last_sequence": s.last_sequence, "lag": s.lag,
                }),
                Err(e) => json!({
                    "partition": p.get(), "owner": owner, "state": "no answer",
                    "detail": format!("{e}"),
                }),
            }
        })
        .collect();
    let mut snapshot = web.hub.snapshot(now_ms());
    snapshot["now_ms"] = json!(now_ms());
    snapshot["partition_stats"] = json!(partitions);
    snapshot
}

/// Each partition's latest ownership record: who writes its decisions, and
/// the epoch (its stream sequence). Read from the decisions stream, not
/// from the stats endpoint, so that the console names the owner even when
/// no instance answers.
async fn read_owners(web: &Web) -> HashMap<u32, Value> {
    let mut owners = HashMap::new();
    for p in web.client.partitions().ids() {
        if let Ok(Some(owner)) = amends_nats::worker::current_owner(&web.js, &web.prefix, p).await {
            owners.insert(p.get(), json!(owner));
        }
    }
    owners
}
