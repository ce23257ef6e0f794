//! The request-reply endpoints: the NATS micro service `amends`, with one
//! endpoint per query kind and served partition (`status-<p>` on
//! `<prefix>.status.<p>`, ...), so that a process answers for the
//! partitions it serves and no others; what they answer is
//! [`super::answers`]'s.

use std::collections::HashMap;
use std::sync::Arc;

use amends_core::partition::Config;
use amends_core::protocol::query::{
    self, BalanceAnswer, ClaimAnswer, ErrorAnswer, StatsAnswer, StatusAnswer,
};
use amends_core::route::PartitionId;
use amends_store::PartitionStore;
use async_nats::jetstream;
use async_nats::service::ServiceExt as _;
use futures_util::StreamExt as _;
use futures_util::future::ready;
use futures_util::stream::{self, BoxStream};
use tokio::task::JoinSet;

use super::answers::Answers;
use super::{RESTART_BACKOFF_MAX, Status};
use crate::Source;
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

/// The most requests of one kind (status, balance, claim, stats; over
/// every served partition) answered at once. Each answer is a few
/// store reads on a blocking thread (a stream lookup for stats), so a
/// burst of queries is served in parallel but cannot pile up unbounded
/// work.
pub const ENDPOINT_CONCURRENCY_MAX: usize = 64;

/// The queue group of the subscriptions that answer requests naming no
/// partition (one per query kind, on its wildcard subject). Not an
/// endpoint's group: the server makes one group of same-named queue
/// subscriptions that match a message, and would hand a partition's
/// request to this subscription instead of the partition's endpoint.
pub const UNROUTED_QUEUE_GROUP: &str = "amends-unrouted";

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

    /// The subject of this endpoint for partition `p`.
    pub(super) fn subject(self, topology: &Topology, p: PartitionId) -> String {
        match self {
            Endpoint::Status => topology.prefix.status(p),
            Endpoint::Balance => topology.prefix.query_balance(p),
            Endpoint::Claim => topology.prefix.query_claim(p),
            Endpoint::Stats => topology.prefix.stats(p),
        }
    }

    /// The subject of this endpoint for every partition, `<...>.*`.
    fn wildcard(self, topology: &Topology) -> String {
        match self {
            Endpoint::Status => topology.prefix.status_wildcard(),
            Endpoint::Balance => topology.prefix.query_balance_wildcard(),
            Endpoint::Claim => topology.prefix.query_claim_wildcard(),
            Endpoint::Stats => topology.prefix.stats_wildcard(),
        }
    }

    /// The JSON of this endpoint's error answer saying `error`
    /// (`{"status":"error","detail":...}` on every endpoint).
    pub(super) fn error(self, error: ErrorAnswer) -> Vec<u8> {
        match self {
            Endpoint::Status => query::encode(&StatusAnswer::from(error)),
            Endpoint::Balance => query::encode(&BalanceAnswer::from(error)),
            Endpoint::Claim => query::encode(&ClaimAnswer::from(error)),
            Endpoint::Stats => query::encode(&StatsAnswer::from(error)),
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

/// The request-reply endpoints of the partitions in `served`, as the NATS
/// micro service [`SERVICE_NAME`]: for each served partition `p` (of
/// those `status` holds a store for), the endpoints `status-<p>`,
/// `balance-<p>`, `claim-<p>` and `stats-<p>` on its protocol subjects
/// (`<prefix>.status.<p>`, `<prefix>.query.balance.<p>`,
/// `<prefix>.query.claim.<p>`, `<prefix>.stats.<p>`) and queue groups
/// ([`STATUS_QUEUE_GROUP`], [`QUERY_QUEUE_GROUP`]), each with the metadata
/// `partition`. A partition not served here gets no answer from this
/// process. Every reply is JSON; a bad request gets
/// `{"status":"error","detail":...}`, and so does a request on a subject
/// that names no partition of the deployment: a plain subscription per
/// kind, on its wildcard and in the queue group [`UNROUTED_QUEUE_GROUP`],
/// answers those (and leaves every partition's own subject to its
/// endpoint). If the service
/// cannot start or a subscription ends, it is started again after a
/// backoff. [`super::Service::run`] serves every partition; this runs
/// until dropped.
pub async fn serve_endpoints<P: PartitionStore>(
    js: jetstream::Context,
    topology: Topology,
    config: Config,
    status: Status<P>,
    served: Vec<PartitionId>,
) {
    let served: Vec<(usize, P)> = status
        .stores
        .iter()
        .enumerate()
        .filter(|(_, store)| served.contains(&store.id()))
        .map(|(index, store)| (index, store.clone()))
        .collect();
    let answers = Arc::new(Answers {
        js: js.clone(),
        topology,
        config,
        status,
        served,
    });
    loop {
        let metadata = HashMap::from([
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
                let added = add_endpoints(&service, &answers, &mut tasks).await;
                let _stop = StopOnDrop(Some(service));
                match added {
                    Err(e) => {
                        tracing::warn!(error = %e, "an endpoint could not subscribe; retrying")
                    }
                    Ok(()) => {
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

/// A request to one served partition's endpoint, with the partition's
/// index in the [`Status`] and its store; `None` once that endpoint's
/// subscription ended.
type Routed<P> = Option<(usize, P, async_nats::service::Request)>;

/// Adds every endpoint of every served partition to `service`, and spawns
/// onto `tasks`, per kind, one task answering its partitions' requests (at
/// most [`ENDPOINT_CONCURRENCY_MAX`] at once) and one answering its
/// wildcard's requests that name no partition. A task ends when any of
/// its subscriptions ends.
async fn add_endpoints<P: PartitionStore>(
    service: &async_nats::service::Service,
    answers: &Arc<Answers<P>>,
    tasks: &mut JoinSet<()>,
) -> Result<(), Source> {
    for endpoint in Endpoint::ALL {
        let mut routed: Vec<BoxStream<'static, Routed<P>>> = Vec::new();
        for (index, store) in &answers.served {
            let p = store.id();
            let requests = service
                .endpoint_builder()
                .name(format!("{}-{p}", endpoint.name()))
                .metadata(HashMap::from([("partition".to_owned(), p.to_string())]))
                .queue_group(endpoint.queue_group())
                .add(endpoint.subject(&answers.topology, p))
                .await?;
            let (index, store) = (*index, store.clone());
            routed.push(
                requests
                    .map(move |request| Some((index, store.clone(), request)))
                    .chain(stream::once(ready(None)))
                    .boxed(),
            );
        }
        if !routed.is_empty() {
            let requests = stream::select_all(routed)
                .take_while(|request| ready(request.is_some()))
                .filter_map(ready);
            let answers = Arc::clone(answers);
            tasks.spawn(requests.for_each_concurrent(
                ENDPOINT_CONCURRENCY_MAX,
                move |(index, store, request)| {
                    let answers = Arc::clone(&answers);
                    async move {
                        let body = answers
                            .answer(endpoint, index, store, &request.message)
                            .await;
                        if let Err(e) = request.respond(Ok(body.into())).await {
                            tracing::debug!(endpoint = endpoint.name(), error = %e, "reply not sent");
                        }
                    }
                },
            ));
        }
        let client = answers.js.client();
        let unrouted = client
            .queue_subscribe(
                endpoint.wildcard(&answers.topology),
                UNROUTED_QUEUE_GROUP.to_owned(),
            )
            .await?;
        let answers = Arc::clone(answers);
        tasks.spawn(
            unrouted.for_each_concurrent(ENDPOINT_CONCURRENCY_MAX, move |message| {
                let answers = Arc::clone(&answers);
                let client = client.clone();
                async move {
                    let Some(reply) = message.reply.clone() else {
                        return;
                    };
                    if let Some(body) = answers.unrouted(endpoint, &message).await
                        && let Err(e) = client.publish(reply, body.into()).await
                    {
                        tracing::debug!(endpoint = endpoint.name(), error = %e, "reply not sent");
                    }
                }
            }),
        );
    }
    Ok(())
}
