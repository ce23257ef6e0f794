//! `amends serve --metrics-addr`: the Prometheus endpoint for the metrics
//! that amends-nats records (`amends_nats::metrics`).

use std::net::SocketAddr;

use amends_nats::metrics;
use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// 1, labelled `version`: which binary exports these metrics.
pub const BUILD_INFO: &str = "amends_build_info";

/// Histogram buckets of the durations, in seconds: from 100 µs (a deferred
/// commit) to 10 s (a publish stuck behind a reconnect).
const SECONDS_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Histogram buckets of the batch length: powers of two up to the largest
/// sensible `--batch-max`.
const BATCH_LEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Installs the process's metrics recorder with an HTTP listener on
/// `addr` (any path answers; Prometheus scrapes `/metrics`). Must be called
/// inside the tokio runtime, once.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .context("histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full(metrics::BATCH_LEN.to_owned()),
            BATCH_LEN_BUCKETS,
        )
        .context("histogram buckets")?
        .install()
        .with_context(|| format!("serving metrics on {addr}"))?;
    metrics::describe();
    ::metrics::describe_gauge!(
        BUILD_INFO,
        "1, labelled with the version of this amends binary."
    );
    ::metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}
