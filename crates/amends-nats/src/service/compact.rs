//! Compaction: each partition's records past the horizon dropped, on a
//! blocking thread.

use std::time::Duration;

use amends_core::partition::Config;
use amends_store::PartitionStore;

use super::{Options, Status};

/// Compaction: every interval, each partition that is not stopped is
/// compacted at the horizon of its applied log time, on a blocking thread.
pub(super) async fn compact<P: PartitionStore>(
    config: Config,
    options: Options,
    status: Status<P>,
) {
    let period = options.compact_interval.max(Duration::from_millis(1));
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        for index in 0..status.stores.len() {
            if status.is_stopped(index) {
                continue;
            }
            let store = status.stores[index].clone();
            let p = store.id().get();
            let done = tokio::task::spawn_blocking(move || {
                let clock = store.head()?.clock;
                store.compact(config.compaction_horizon_ms(clock.log_time_ms))
            })
            .await;
            match done {
                Ok(Ok(c)) => tracing::debug!(partition = p, ?c, "compacted"),
                Ok(Err(e)) => tracing::warn!(partition = p, error = %e, "compaction failed"),
                Err(e) => tracing::warn!(partition = p, error = %e, "compaction panicked"),
            }
        }
    }
}
