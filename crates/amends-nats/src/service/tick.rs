//! Ticks: the log messages that let holds expire on an idle partition.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amends_core::id::OpId;
use amends_core::route::PartitionId;
use amends_store::PartitionStore;
use async_nats::HeaderMap;
use async_nats::jetstream;

use super::{Options, Status};
use crate::topology::{Topology, header};

/// Ticks: every interval, a tick to each partition that is not stopped and
/// has a hold due by the wall clock (its first expiry at or before now).
/// Partitions without a due hold get nothing, so ticks do not grow an idle
/// log. The wall clock here and the server's (log time) may differ: a tick
/// sent early changes nothing and the next one follows an interval later.
pub(super) async fn tick<P: PartitionStore>(
    js: jetstream::Context,
    topology: Topology,
    options: Options,
    status: Status<P>,
) {
    let mut interval = tokio::time::interval(options.tick_interval.max(Duration::from_millis(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let stores = Arc::clone(&status.stores);
        let now = unix_ms();
        let due = tokio::task::spawn_blocking(move || {
            stores
                .iter()
                .map(|s| matches!(s.expiry_after(None), Ok(Some(e)) if e.at_ms <= now))
                .collect::<Vec<bool>>()
        })
        .await
        .unwrap_or_default();
        let mut acks = Vec::new();
        for (index, id) in topology.partitions.ids().enumerate() {
            if !due.get(index).copied().unwrap_or(false) || status.is_stopped(index) {
                continue;
            }
            match publish_tick(&js, &topology, id).await {
                Ok(ack) => acks.push((id, ack)),
                Err(e) => tracing::debug!(partition = id.get(), error = %e, "tick not published"),
            }
        }
        for (id, ack) in acks {
            if let Err(e) = ack.await {
                tracing::debug!(partition = id.get(), error = %e, "tick not acknowledged");
            }
        }
    }
}

/// The `Nats-Msg-Id` of a tick: `tick-<p>-<v7 id>`, unique per tick.
pub fn tick_msg_id(partition: PartitionId, op_id: OpId) -> String {
    format!("tick-{partition}-{}", op_id)
}

async fn publish_tick(
    js: &jetstream::Context,
    topology: &Topology,
    id: PartitionId,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = unix_ms();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let rand = (u128::from(std::process::id()) << 96) | (u128::from(nanos) << 64) | u128::from(n);
    let op_id = OpId::v7_from_parts(now, rand);
    let body = format!(r#"{{"op_id":"{}","command":{{"type":"tick"}}}}"#, op_id);
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, tick_msg_id(id, op_id).as_str());
    js.publish_with_headers(topology.prefix.req(id), headers, body.into())
        .await
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
