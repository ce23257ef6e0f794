//! Gauges: each partition's applied position and lag, refreshed on an
//! interval ([`crate::metrics`]).

use std::time::Duration;

use amends_core::route::PartitionId;
use amends_store::PartitionStore;
use async_nats::jetstream;

use super::{Options, Status};
use crate::topology::{Stream, Topology, last_on_subject};

/// The requests stream's last sequence on partition `p`'s subject (0 if it
/// holds none).
pub(super) async fn last_sequence(
    js: &jetstream::Context,
    topology: &Topology,
    p: PartitionId,
) -> Result<u64, String> {
    let last = last_on_subject(
        js,
        &topology.prefix.stream_name(Stream::Requests),
        &topology.prefix.req(p),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(last.map_or(0, |m| m.sequence))
}

/// Gauges: every interval, each partition's applied position and lag
/// ([`crate::metrics`]), from its store and the requests stream.
pub(super) async fn gauges<P: PartitionStore>(
    js: jetstream::Context,
    topology: Topology,
    options: Options,
    status: Status<P>,
) {
    let period = options.gauge_interval.max(Duration::from_millis(1));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        for store in status.stores.iter() {
            let p = store.id();
            let applied = store.head().map(|h| h.clock.position).unwrap_or(0);
            match last_sequence(&js, &topology, p).await {
                Ok(last) => crate::metrics::position(p, applied, last.saturating_sub(applied)),
                Err(e) => tracing::debug!(partition = p.get(), error = %e, "lag not measured"),
            }
        }
    }
}
