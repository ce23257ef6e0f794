//! The answers of the query endpoints, read from a partition's store and
//! built from the protocol's types ([`amends_core::protocol::query`]).

use amends_core::partition::Config;
use amends_core::protocol::query::{
    self, AsOf, Balance, BalanceAnswer, ClaimAnswer, ClaimQuery, Claimed, ErrorAnswer, Free,
    PartitionStats, StatsAnswer, StatusAnswer,
};
use amends_core::state::Clock;
use amends_store::PartitionStore;
use async_nats::jetstream;

use super::Status;
use super::endpoints::Endpoint;
use super::gauges::last_sequence;
use super::status::wire_state;
use crate::topology::Topology;

/// What the endpoints answer from.
pub(super) struct Answers<P> {
    pub(super) js: jetstream::Context,
    pub(super) topology: Topology,
    pub(super) config: Config,
    pub(super) status: Status<P>,
    /// The partitions answered for, with their index in `status`.
    pub(super) served: Vec<(usize, P)>,
}

impl<P: PartitionStore> Answers<P> {
    /// The reply to one request on `endpoint` of the served partition at
    /// `index` in the [`Status`], whose store is `store`: the JSON of the
    /// endpoint's answer ([`query`]).
    pub(super) async fn answer(
        &self,
        endpoint: Endpoint,
        index: usize,
        store: P,
        msg: &async_nats::Message,
    ) -> Vec<u8> {
        let text = match query::body_text(&msg.payload) {
            Ok(text) => text,
            Err(error) => return endpoint.error(error),
        };
        match endpoint {
            Endpoint::Status => {
                query::encode(&self.op_status(store, text).await.unwrap_or_else(From::from))
            }
            Endpoint::Balance => {
                query::encode(&self.balance(store, text).await.unwrap_or_else(From::from))
            }
            Endpoint::Claim => {
                query::encode(&self.claim(store, text).await.unwrap_or_else(From::from))
            }
            Endpoint::Stats => query::encode(&self.stats(index, store).await),
        }
    }

    /// The reply to a request on `endpoint`'s wildcard subject, read from
    /// its last token: an error when it names no partition of the
    /// deployment; none when it is a partition's own subject (that
    /// partition's endpoint answers it, here or in the process serving
    /// it). A partition's number written otherwise (`03`, `+3`) is
    /// answered as that partition if it is served here, as it was before
    /// the endpoints subscribed per partition.
    pub(super) async fn unrouted(
        &self,
        endpoint: Endpoint,
        msg: &async_nats::Message,
    ) -> Option<Vec<u8>> {
        let Some(p) = msg
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u32>().ok())
            .and_then(|p| self.topology.partitions.id(p))
        else {
            return Some(endpoint.error(ErrorAnswer::new(format!(
                "{} names no partition",
                msg.subject
            ))));
        };
        if msg.subject.as_str() == endpoint.subject(&self.topology, p) {
            return None;
        }
        let (index, store) = self.served.iter().find(|(_, s)| s.id() == p)?;
        Some(self.answer(endpoint, *index, store.clone(), msg).await)
    }

    /// Refuses a routing key that another partition owns: the client asked
    /// the wrong partition (for example with a wrong partition count).
    fn check_owner(&self, store: &P, routing_key: &str, what: &str) -> Result<(), ErrorAnswer> {
        let owner = amends_core::route::partition_of(routing_key, self.topology.partitions);
        if owner == store.id() {
            Ok(())
        } else {
            Err(ErrorAnswer::new(format!(
                "{what} belongs to partition {owner}, not {}",
                store.id()
            )))
        }
    }

    /// The status endpoint: decided (with the decision) or unknown. A
    /// record past the compaction horizon is unknown, as it is to the core.
    async fn op_status(&self, store: P, text: &str) -> Result<StatusAnswer, ErrorAnswer> {
        let op_id = query::parse_op_id(text)?;
        let config = self.config;
        let read = tokio::task::spawn_blocking(move || {
            let horizon_ms = config.compaction_horizon_ms(store.clock()?.log_time_ms);
            let found = store.dedup(op_id)?;
            Ok(found.filter(|d| !d.is_compactable(horizon_ms)))
        })
        .await;
        Ok(match lookup(read)? {
            Some(dedup) => StatusAnswer::Decided {
                decision: dedup.decision,
            },
            None => StatusAnswer::Unknown,
        })
    }

    /// The balance query (body: an account id): the account's balance,
    /// holds (their sum), saga reservations, limits, with the position and
    /// log time it was read at, or unknown at a position. The position is
    /// read first, so the account is as of that position or later. Pending
    /// holds are not listed: the store keeps holds by op id with no index
    /// by account, and listing them would scan every hold of the partition.
    async fn balance(&self, store: P, text: &str) -> Result<BalanceAnswer, ErrorAnswer> {
        let account = query::parse_account(text)?;
        self.check_owner(&store, account.as_str(), &format!("account {text:?}"))?;
        let read = tokio::task::spawn_blocking(move || {
            let clock = store.clock()?;
            Ok((clock, store.account(account.as_str())?, account))
        })
        .await;
        let (clock, found, account) = lookup(read)?;
        let Some(a) = found else {
            return Ok(BalanceAnswer::Unknown(as_of(clock)));
        };
        // The core keeps `balance - held` at or above the floor; a record
        // where it overflows was not written by it.
        let available = a.available().ok_or_else(|| {
            ErrorAnswer::new(format!(
                "the lookup failed: account {text:?} holds a balance of {} with {} held",
                a.balance, a.held
            ))
        })?;
        Ok(BalanceAnswer::Found(Balance {
            account,
            balance: a.balance,
            held: a.held,
            incoming: a.incoming,
            available,
            floor: a.floor,
            ceiling: a.ceiling,
            position: clock.position,
            log_time_ms: clock.log_time_ms,
        }))
    }

    /// The claim query (body: a [`ClaimQuery`]): claimed (by whom, whether
    /// tentatively) or free, with the position and log time they were read
    /// at.
    async fn claim(&self, store: P, text: &str) -> Result<ClaimAnswer, ErrorAnswer> {
        let ClaimQuery { namespace, key } = ClaimQuery::parse(text)?;
        let routing_key = amends_core::route::claim_routing_key(namespace.as_str(), key.as_str());
        self.check_owner(&store, &routing_key, "the claim")?;
        let read = tokio::task::spawn_blocking(move || {
            let clock = store.clock()?;
            Ok((clock, store.claim(&routing_key)?))
        })
        .await;
        let (clock, found) = lookup(read)?;
        Ok(match found {
            Some(claim) => ClaimAnswer::Claimed(Claimed {
                owner: claim.owner,
                // Held by a saga in flight: final or gone when it ends.
                tentative: claim.tentative.is_some(),
                namespace,
                key,
                position: clock.position,
                log_time_ms: clock.log_time_ms,
            }),
            None => ClaimAnswer::Free(Free {
                namespace,
                key,
                position: clock.position,
                log_time_ms: clock.log_time_ms,
            }),
        })
    }

    /// The stats endpoint (body ignored): the partition's supervisor state,
    /// restarts, applied position and log time, the requests stream's last
    /// sequence on its subject, and the lag between them. If the stream
    /// cannot be read, `last_sequence` and `lag` are null and
    /// `stream_error` says why. `owner` is the latest ownership record on
    /// the decisions stream (`owner_error` if it cannot be read).
    async fn stats(&self, index: usize, store: P) -> StatsAnswer {
        let p = store.id();
        let snapshot = self.status.snapshot();
        let (state, detail, restarts) = match snapshot.partitions.get(index) {
            Some(s) => {
                let (state, detail) = wire_state(&s.state);
                (state, detail, s.restarts)
            }
            None => (query::PartitionState::Running, None, 0),
        };
        // A failed read shows as nothing applied, as a failed task does.
        let clock = tokio::task::spawn_blocking(move || store.clock())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let last = last_sequence(&self.js, &self.topology, p).await;
        let (last_sequence, lag, stream_error) = match last {
            Ok(last) => (Some(last), Some(last.saturating_sub(clock.position)), None),
            Err(e) => (None, None, Some(e)),
        };
        let (owner, owner_error) =
            match crate::worker::current_owner(&self.js, &self.topology.prefix, p).await {
                Ok(owner) => (owner, None),
                Err(e) => (None, Some(e.to_string())),
            };
        StatsAnswer::Ok(PartitionStats {
            partition: p.get(),
            state,
            detail,
            restarts,
            applied_position: clock.position,
            log_time_ms: clock.log_time_ms,
            last_sequence,
            lag,
            stream_error,
            owner,
            owner_error,
        })
    }
}

/// Where a query's answer was read.
fn as_of(clock: Clock) -> AsOf {
    AsOf {
        position: clock.position,
        log_time_ms: clock.log_time_ms,
    }
}

/// What a query read from a store on the blocking pool, or the error answer
/// when the task or the read failed.
fn lookup<T>(
    read: Result<Result<T, amends_store::Error>, tokio::task::JoinError>,
) -> Result<T, ErrorAnswer> {
    read.map_err(|e| e.to_string())
        .and_then(|read| read.map_err(|e| e.to_string()))
        .map_err(|e| ErrorAnswer::new(format!("the lookup failed: {e}")))
}
