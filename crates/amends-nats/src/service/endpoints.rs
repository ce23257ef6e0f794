//! The request-reply endpoints: the NATS micro service `amends`, one
//! endpoint per query kind and served partition; what they answer is
//! [`super::answers`]'s.

use std::sync::Arc;

use amends_core::partition::Config;
use async_nats::jetstream;
use tokio::task::JoinSet;

use super::answers::Answers;
use super::{RESTART_BACKOFF_MAX, Status};
use crate::topology::Topology;
use crate::worker;

/// The name of the NATS micro service the endpoints form (`$SRV.PING.amends`,
/// `$SRV.INFO.amends`, `$SRV.STATS.amends` answer for it); its version is
/// this crate's.
pub const SERVICE_NAME: &str = "amends";

/// The queue group of the status endpoint: several processes serving the
/// same deployment share its requests.
pub const STATUS_QUEUE_GROUP: &str = "amends-status";

/// The queue group of the balance and claim queries and the stats
/// endpoint.
pub const QUERY_QUEUE_GROUP: &str = "amends-query";

/// The most requests one endpoint answers at once. Each answer is a few
/// store reads on a blocking thread (a stream lookup for stats), so a
/// burst of queries is served in parallel but cannot pile up unbounded
/// work.
pub const ENDPOINT_CONCURRENCY_MAX: usize = 64;

/// One request-reply endpoint of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `<prefix>.status.<p>`: what a partition knows of an op id.
    Status,
    /// `<prefix>.query.balance.<p>`: an account's balance.
    Balance,
    /// `<prefix>.query.claim.<p>`: the owner of a claim.
    Claim,
    /// `<prefix>.stats.<p>`: a partition's position, lag and state.
    Stats,
}

impl Endpoint {
    const ALL: [Endpoint; 4] = [
        Endpoint::Status,
        Endpoint::Balance,
        Endpoint::Claim,
        Endpoint::Stats,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Endpoint::Status => "status",
            Endpoint::Balance => "balance",
            Endpoint::Claim => "claim",
            Endpoint::Stats => "stats",
        }
    }

    fn subject(self, topology: &Topology) -> String {
        match self {
            Endpoint::Status => topology.prefix.status_wildcard(),
            Endpoint::Balance => topology.prefix.query_balance_wildcard(),
            Endpoint::Claim => topology.prefix.query_claim_wildcard(),
            Endpoint::Stats => topology.prefix.stats_wildcard(),
        }
    }

    fn queue_group(self) -> &'static str {
        match self {
            Endpoint::Status => STATUS_QUEUE_GROUP,
            Endpoint::Balance | Endpoint::Claim | Endpoint::Stats => QUERY_QUEUE_GROUP,
        }
    }
}

/// Stops the micro service (its `$SRV` verb handler) when dropped: the
/// endpoints' own subscriptions end with their tasks.
struct StopOnDrop(Option<async_nats::service::Service>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(service) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = service.stop().await;
            });
        }
    }
}

/// The request-reply endpoints, as the NATS micro service [`SERVICE_NAME`]:
/// each endpoint keeps its protocol subject (`<prefix>.status.*`,
/// `<prefix>.query.balance.*`, `<prefix>.query.claim.*`,
/// `<prefix>.stats.*`) and its queue group ([`STATUS_QUEUE_GROUP`],
/// [`QUERY_QUEUE_GROUP`]). Every reply is JSON; a bad request gets
/// `{"status":"error","detail":...}`. If the service cannot start or an
/// endpoint ends, it is started again after a backoff.
pub(super) async fn serve_endpoints(
    js: jetstream::Context,
    topology: Topology,
    config: Config,
    status: Status,
) {
    use async_nats::service::ServiceExt as _;
    use futures_util::StreamExt as _;
    let answers = Arc::new(Answers {
        js: js.clone(),
        topology,
        config,
        status,
    });
    loop {
        let metadata = std::collections::HashMap::from([
            ("prefix".to_owned(), answers.topology.prefix.to_string()),
            (
                "partitions".to_owned(),
                answers.topology.partitions.get().to_string(),
            ),
            (
                "instance".to_owned(),
                format!("{}:{}", worker::hostname(), std::process::id()),
            ),
        ]);
        let started = js
            .client()
            .service_builder()
            .description("amends: status of an op id, balance and claim queries, partition stats")
            .metadata(metadata)
            .queue_group(QUERY_QUEUE_GROUP)
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await;
        match started {
            Ok(service) => {
                let mut tasks = JoinSet::new();
                let mut failed = None;
                for endpoint in Endpoint::ALL {
                    let added = service
                        .endpoint_builder()
                        .name(endpoint.name())
                        .queue_group(endpoint.queue_group())
                        .add(endpoint.subject(&answers.topology))
                        .await;
                    let requests = match added {
                        Ok(requests) => requests,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    };
                    let answers = Arc::clone(&answers);
                    tasks.spawn(requests.for_each_concurrent(
                        ENDPOINT_CONCURRENCY_MAX,
                        move |request| {
                            let answers = Arc::clone(&answers);
                            async move {
                                let answer = answers.answer(endpoint, &request.message).await;
                                let body = serde_json::to_vec(&answer).unwrap_or_default();
                                if let Err(e) = request.respond(Ok(body.into())).await {
                                    tracing::debug!(endpoint = endpoint.name(), error = %e, "reply not sent");
                                }
                            }
                        },
                    ));
                }
                let _stop = StopOnDrop(Some(service));
                match failed {
                    Some(e) => {
                        tracing::warn!(error = %e, "an endpoint could not subscribe; retrying")
                    }
                    None => {
                        tasks.join_next().await;
                        tracing::warn!(
                            "an endpoint subscription ended; starting the endpoints again"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "the endpoints could not start; retrying"),
        }
        tokio::time::sleep(RESTART_BACKOFF_MAX).await;
    }
}
