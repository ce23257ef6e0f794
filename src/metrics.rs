//! `amends serve --metrics-addr`: one HTTP listener for the Prometheus
//! metrics that amends-nats records (`amends_nats::metrics`) at `/metrics`,
//! and the process's health: `/healthz` (200 while the process serves
//! HTTP) and `/readyz` (200 once this process holds the deployment lease
//! and every partition runs; 503 with the reason before and after).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use amends_nats::metrics;
use amends_nats::service::{Status, Supervision};
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// How often the recorder drains its histograms (what the exporter's own
/// listener would do).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What `/readyz` answers from: where `serve` is in its start, then the
/// service's status. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Health(Arc<Mutex<Phase>>);

#[derive(Debug)]
enum Phase {
    /// Not serving yet, and why (connecting, standing by, ...).
    Starting(&'static str),
    /// Serving: ready while every partition runs.
    Serving(Status),
}

impl Health {
    fn new() -> Health {
        Health(Arc::new(Mutex::new(Phase::Starting("starting"))))
    }

    /// Not serving yet: `why` is what `/readyz` says.
    pub fn starting(&self, why: &'static str) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Phase::Starting(why);
    }

    /// Serving: `/readyz` follows `status`.
    pub fn serving(&self, status: Status) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Phase::Serving(status);
    }

    /// Whether the process is ready, and a line per partition (or the
    /// start phase) saying why.
    fn readiness(&self) -> (bool, String) {
        let phase = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &*phase {
            Phase::Starting(why) => (false, format!("not ready: {why}\n")),
            Phase::Serving(status) => {
                let snapshot = status.snapshot();
                let mut ready = true;
                let mut text = String::new();
                for p in &snapshot.partitions {
                    let state = match &p.state {
                        Supervision::Running => "running".to_owned(),
                        Supervision::Restarting { attempt, error } => {
                            ready = false;
                            format!("restarting (attempt {attempt}): {error}")
                        }
                        Supervision::Stopped { reason } => {
                            ready = false;
                            format!("stopped: {reason}")
                        }
                    };
                    text.push_str(&format!("partition {}: {state}\n", p.partition));
                }
                let head = if ready { "ready" } else { "not ready" };
                (ready, format!("{head}\n{text}"))
            }
        }
    }
}

/// Installs the process's metrics recorder and serves `/metrics`,
/// `/healthz` and `/readyz` on `addr`. Must be called inside the tokio
/// runtime, once; the returned [`Health`] is what `/readyz` answers from.
pub async fn install(addr: SocketAddr) -> anyhow::Result<Health> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .context("histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full(metrics::BATCH_LEN.to_owned()),
            BATCH_LEN_BUCKETS,
        )
        .context("histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    ::metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    metrics::describe();
    ::metrics::describe_gauge!(
        BUILD_INFO,
        "1, labelled with the version of this amends binary."
    );
    ::metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let health = Health::new();
    tokio::spawn(accept(listener, handle, health.clone()));
    Ok(health)
}

/// Serves each connection of `listener` (HTTP/1) on its own task.
async fn accept(listener: tokio::net::TcpListener, metrics: PrometheusHandle, health: Health) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = respond(&request, &metrics, &health);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

/// The answer to one request.
fn respond<B>(
    request: &Request<B>,
    metrics: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".to_owned(),
            "text/plain",
        );
    }
    match request.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics.render(),
            "text/plain; version=0.0.4",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" => {
            let (ready, body) = health.readiness();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body, "text/plain")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".to_owned(),
            "text/plain",
        ),
    }
}
