//! The answers of the query endpoints, read from a partition's store.

use amends_core::id::OpId;
use amends_core::partition::Config;
use amends_store::PartitionStore;
use async_nats::jetstream;

use super::Status;
use super::endpoints::Endpoint;
use super::gauges::last_sequence;
use super::status::state_name;
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

/// `{"status":"error","detail":...}`: the answer to a bad request.
fn error_answer(detail: impl Into<String>) -> serde_json::Value {
    serde_json::json!({"status": "error", "detail": detail.into()})
}

impl<P: PartitionStore> Answers<P> {
    /// The reply to one request on `endpoint` of the served partition at
    /// `index` in the [`Status`], whose store is `store`.
    pub(super) async fn answer(
        &self,
        endpoint: Endpoint,
        index: usize,
        store: P,
        msg: &async_nats::Message,
    ) -> serde_json::Value {
        let text = match std::str::from_utf8(&msg.payload) {
            Ok(text) => text,
            Err(_) => return error_answer("the body is not UTF-8"),
        };
        let answer = match endpoint {
            Endpoint::Status => self.op_status(store, text).await,
            Endpoint::Balance => self.balance(store, text).await,
            Endpoint::Claim => self.claim(store, text).await,
            Endpoint::Stats => Ok(self.stats(index, store).await),
        };
        answer.unwrap_or_else(|answer| answer)
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
    ) -> Option<serde_json::Value> {
        let Some(p) = msg
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u32>().ok())
            .and_then(|p| self.topology.partitions.id(p))
        else {
            return Some(error_answer(format!("{} names no partition", msg.subject)));
        };
        if msg.subject.as_str() == endpoint.subject(&self.topology, p) {
            return None;
        }
        let (index, store) = self.served.iter().find(|(_, s)| s.id() == p)?;
        Some(self.answer(endpoint, *index, store.clone(), msg).await)
    }

    /// Refuses a routing key that another partition owns: the client asked
    /// the wrong partition (for example with a wrong partition count).
    fn check_owner(
        &self,
        store: &P,
        routing_key: &str,
        what: &str,
    ) -> Result<(), serde_json::Value> {
        let owner = amends_core::route::partition_of(routing_key, self.topology.partitions);
        if owner == store.id() {
            Ok(())
        } else {
            Err(error_answer(format!(
                "{what} belongs to partition {owner}, not {}",
                store.id()
            )))
        }
    }

    /// The status endpoint: `{"status":"decided","decision":...}` or
    /// `{"status":"unknown"}`. A record past the compaction horizon is
    /// unknown, as it is to the core.
    async fn op_status(
        &self,
        store: P,
        text: &str,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use serde_json::json;
        let op_id = match text.parse::<OpId>() {
            Ok(op_id) if op_id.to_string() == text => op_id,
            _ => {
                return Err(error_answer(format!(
                    "{text:?} is not an op id in canonical text"
                )));
            }
        };
        let config = self.config;
        let read = tokio::task::spawn_blocking(move || {
            let horizon_ms = config.compaction_horizon_ms(store.clock()?.log_time_ms);
            let found = store.dedup(op_id)?;
            Ok(found.filter(|d| !d.is_compactable(horizon_ms)))
        })
        .await;
        Ok(match lookup(read)? {
            Some(dedup) => json!({"status": "decided", "decision": dedup.decision}),
            None => json!({"status": "unknown"}),
        })
    }

    /// The balance query (body: an account id): `{"status":"found",
    /// "account", "balance", "held", "incoming" (credits reserved by sagas
    /// in flight), "available", "floor", "ceiling",
    /// "position", "log_time_ms"}` or `{"status":"unknown", "position",
    /// "log_time_ms"}`. The position is read first, so the account is as
    /// of that position or later. Pending holds are not listed: the store
    /// keeps holds by op id with no index by account, and listing them
    /// would scan every hold of the partition.
    async fn balance(&self, store: P, text: &str) -> Result<serde_json::Value, serde_json::Value> {
        use serde_json::json;
        let account = amends_core::command::AccountId::new(text)
            .map_err(|e| error_answer(format!("{text:?} is not an account id: {e}")))?;
        self.check_owner(&store, account.as_str(), &format!("account {text:?}"))?;
        let read = tokio::task::spawn_blocking(move || {
            let clock = store.clock()?;
            Ok((clock, store.account(account.as_str())?, account))
        })
        .await;
        let (clock, found, account) = lookup(read)?;
        Ok(match found {
            Some(a) => json!({
                "status": "found",
                "account": account.as_str(),
                "balance": a.balance,
                "held": a.held,
                "incoming": a.incoming,
                "available": a.available(),
                "floor": a.floor,
                "ceiling": a.ceiling,
                "position": clock.position,
                "log_time_ms": clock.log_time_ms,
            }),
            None => json!({
                "status": "unknown",
                "position": clock.position,
                "log_time_ms": clock.log_time_ms,
            }),
        })
    }

    /// The claim query (body: `{"namespace":...,"key":...}`):
    /// `{"status":"claimed","owner",...}` or `{"status":"free",...}`, with
    /// the position and log time they were read at.
    async fn claim(&self, store: P, text: &str) -> Result<serde_json::Value, serde_json::Value> {
        use amends_core::command::{ClaimKey, Namespace};
        use serde_json::json;
        let shape = || error_answer("the body must be {\"namespace\": <text>, \"key\": <text>}");
        let body = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .map_err(|_| shape())?;
        let field = |name: &str| body.get(name).and_then(serde_json::Value::as_str);
        let (Some(namespace), Some(key), 2) = (field("namespace"), field("key"), body.len()) else {
            return Err(shape());
        };
        let namespace = Namespace::new(namespace).map_err(|e| error_answer(e.to_string()))?;
        let key = ClaimKey::new(key).map_err(|e| error_answer(e.to_string()))?;
        let routing_key = amends_core::route::claim_routing_key(namespace.as_str(), key.as_str());
        self.check_owner(&store, &routing_key, "the claim")?;
        let read = tokio::task::spawn_blocking(move || {
            let clock = store.clock()?;
            Ok((clock, store.claim(&routing_key)?))
        })
        .await;
        let (clock, found) = lookup(read)?;
        let mut answer = match found {
            Some(claim) => json!({
                "status": "claimed",
                "owner": claim.owner.as_str(),
                // Held by a saga in flight: final or gone when it ends.
                "tentative": claim.tentative.is_some(),
            }),
            None => json!({"status": "free"}),
        };
        answer["namespace"] = json!(namespace.as_str());
        answer["key"] = json!(key.as_str());
        answer["position"] = json!(clock.position);
        answer["log_time_ms"] = json!(clock.log_time_ms);
        Ok(answer)
    }

    /// The stats endpoint (body ignored): the partition's supervisor state,
    /// restarts, applied position and log time, the requests stream's last
    /// sequence on its subject, and the lag between them. If the stream
    /// cannot be read, `last_sequence` and `lag` are null and
    /// `stream_error` says why.
    async fn stats(&self, index: usize, store: P) -> serde_json::Value {
        use serde_json::json;
        let p = store.id();
        let snapshot = self.status.snapshot();
        let (state, detail, restarts) = match snapshot.partitions.get(index) {
            Some(s) => {
                let (name, detail) = state_name(&s.state);
                (name, detail, s.restarts)
            }
            None => ("running", None, 0),
        };
        // A failed read shows as nothing applied, as a failed task does.
        let clock = tokio::task::spawn_blocking(move || store.clock())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let last = last_sequence(&self.js, &self.topology, p).await;
        let mut answer = json!({
            "status": "ok",
            "partition": p.get(),
            "state": state,
            "detail": detail,
            "restarts": restarts,
            "applied_position": clock.position,
            "log_time_ms": clock.log_time_ms,
            "last_sequence": null,
            "lag": null,
        });
        match last {
            Ok(last) => {
                answer["last_sequence"] = json!(last);
                answer["lag"] = json!(last.saturating_sub(clock.position));
            }
            Err(e) => answer["stream_error"] = json!(e),
        }
        answer
    }
}

/// What a query read from a store on the blocking pool, or the error answer
/// when the task or the read failed.
fn lookup<T>(
    read: Result<Result<T, amends_store::Error>, tokio::task::JoinError>,
) -> Result<T, serde_json::Value> {
    read.map_err(|e| e.to_string())
        .and_then(|read| read.map_err(|e| e.to_string()))
        .map_err(|e| error_answer(format!("the lookup failed: {e}")))
}
