//! The client: connect, submit, wait, resubmit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use amends_core::protocol::query::{
    self, BalanceAnswer, ClaimAnswer, ClaimQuery, StatsAnswer, StatusAnswer,
};
use amends_core::protocol::{self, PARTITIONS_KEY, Prefix, header};
use amends_core::route::{PartitionId, Partitions, partition_of};
use amends_core::wire::{REQUEST_BYTES_MAX, encode};
use amends_core::{Decision, OpId, Request};
use async_nats::jetstream;
use async_nats::{HeaderMap, ServerAddr};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::options::{Auth, Options};
use crate::{Error, Result};

/// What [`Client::submit`] learned from JetStream: the request is durably in
/// the log of its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// The operation.
    pub op_id: OpId,
    /// The partition whose log holds it.
    pub partition: PartitionId,
    /// Its position in the requests stream (the original message's, for a
    /// duplicate).
    pub sequence: u64,
    /// JetStream dropped this publish as a duplicate of one inside the
    /// stream's duplicate window. Not an error: the reply goes to the reply
    /// subject of the copy that was appended, which this client chose the
    /// same.
    pub duplicate: bool,
}

/// What a partition's status endpoint knows of an operation
/// ([`Client::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpStatus {
    /// The operation was decided; this is its decision (the original one,
    /// whoever submitted it).
    Decided(Decision),
    /// The partition has no record of it: not yet in the log, not yet
    /// applied, refused to its sender only (a conflict or a refused op id
    /// is not recorded), or forgotten past the dedup horizon.
    Unknown,
}

/// The state of one operation this client submitted.
enum Slot {
    /// Submitted; no decision yet. Each sender is one pending
    /// [`Client::wait`] (a timed-out wait leaves a closed sender behind).
    Waiting(Vec<oneshot::Sender<Decision>>),
    /// The decision arrived while nobody waited; the next wait takes it.
    Decided(Decision),
}

/// The operations in flight, by op id.
type Pending = DashMap<OpId, Slot>;

/// A connection to an amends deployment. Cheap to clone; clones share the
/// connection, the inbox and the operations in flight.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    prefix: Prefix,
    partitions: Partitions,
    /// `_INBOX.<nuid>`: this client's inbox; it subscribes to `<inbox>.*`.
    inbox: String,
    pending: Arc<Pending>,
    /// Set when the inbox subscription ends: no decision can arrive.
    closed: Arc<AtomicBool>,
    demux: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.demux.abort();
    }
}

impl Client {
    /// Connects to NATS, learns the partition count (from `options`, or
    /// from the deployment's meta bucket) and subscribes to the client's
    /// inbox.
    pub async fn connect(options: Options) -> Result<Client> {
        if options.servers.is_empty() {
            return Err(Error::NoServers);
        }
        let addrs = options
            .servers
            .iter()
            .map(|url| {
                url.parse::<ServerAddr>().map_err(|e| Error::InvalidUrl {
                    url: url.clone(),
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut connect = async_nats::ConnectOptions::new();
        if let Some(name) = &options.name {
            connect = connect.name(name);
        }
        connect = match options.auth {
            Auth::None => connect,
            Auth::UserPassword { user, password } => connect.user_and_password(user, password),
            Auth::Token(token) => connect.token(token),
            Auth::NkeySeed(seed) => connect.nkey(seed),
            Auth::CredsFile(path) => connect
                .credentials_file(&path)
                .await
                .map_err(|source| Error::Credentials { path, source })?,
        };
        if options.tls.required {
            connect = connect.require_tls(true);
        }
        if let Some(ca) = options.tls.ca_file {
            connect = connect.add_root_certificates(ca);
        }
        if let Some(cert) = options.tls.client_cert {
            connect = connect.add_client_certificate(cert.cert_file, cert.key_file);
        }
        let nats = connect
            .connect(addrs)
            .await
            .map_err(|e| Error::Connect(Box::new(e)))?;
        let js = jetstream::new(nats.clone());
        let prefix = options.prefix;
        let partitions = match options.partitions {
            Some(partitions) => partitions,
            None => read_partitions(&js, &prefix).await?,
        };

        let inbox = nats.new_inbox();
        let sub = nats
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| Error::Subscribe(Box::new(e)))?;
        // The server has the subscription before any request names it.
        nats.flush()
            .await
            .map_err(|e| Error::Subscribe(Box::new(e)))?;
        let pending = Arc::new(Pending::new());
        let closed = Arc::new(AtomicBool::new(false));
        let demux = tokio::spawn(demux(sub, Arc::clone(&pending), Arc::clone(&closed)));
        Ok(Client {
            inner: Arc::new(Inner {
                js,
                prefix,
                partitions,
                inbox,
                pending,
                closed,
                demux,
            }),
        })
    }

    /// A new op id: a UUID v7 from this machine's clock.
    ///
    /// Make one per operation, when the operation is created, and keep it
    /// for every resubmission (protocol: "Operation ids"). The clock must be
    /// within 15 minutes (by default) of the deployment's, or amends refuses
    /// the op id as `op_id_outside_window`.
    pub fn new_op_id() -> OpId {
        OpId::from_uuid(uuid::Uuid::now_v7())
    }

    /// A new op id for a saga (a `transfer` or `saga`) that places the saga
    /// on the partition of `routing_key`: usually its first step's (for a
    /// transfer, the `from` account).
    ///
    /// A saga lives on the partition of its op id and decides steps on that
    /// same partition within the message that reaches them, without a log
    /// append. A transfer whose saga lives with its `from` account costs 4
    /// appends to the request logs instead of 7 (protocol: "Sagas"). Any v7
    /// id is valid; this one is drawn until it routes there (on average as
    /// many draws as there are partitions).
    pub fn new_saga_op_id(&self, routing_key: &str) -> OpId {
        let target = partition_of(routing_key, self.inner.partitions);
        loop {
            let id = Client::new_op_id();
            let key = amends_core::route::saga_routing_key(&id.0);
            if partition_of(&key, self.inner.partitions) == target {
                return id;
            }
        }
    }

    /// The deployment's partition count.
    pub fn partitions(&self) -> Partitions {
        self.inner.partitions
    }

    /// The deployment's subject prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.inner.prefix
    }

    /// The JetStream context (for the other modules of the client).
    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The partition that owns `request` (a saga's is its op id's), or
    /// [`Error::Tick`] for a tick.
    pub fn partition_of(&self, request: &Request) -> Result<PartitionId> {
        let key = request.routing_key().ok_or(Error::Tick {
            op_id: request.op_id,
        })?;
        Ok(partition_of(&key, self.inner.partitions))
    }

    /// The reply subject of an operation: fixed for the life of this
    /// client, so every resubmission names the same one.
    fn reply_subject(&self, op_id: OpId) -> String {
        format!("{}.{op_id}", self.inner.inbox)
    }

    /// Publishes `request` to its partition's request log and returns once
    /// JetStream acknowledged it (it is then durably in the log).
    ///
    /// The decision is sent to this client's inbox; collect it with
    /// [`Client::wait`]. Submitting the same request again (same op id and
    /// body) is safe: see [`Client::submit_and_wait`].
    pub async fn submit(&self, request: &Request) -> Result<Submitted> {
        let partition = self.partition_of(request)?;
        let body = encode_checked(request)?;
        // Registered before the publish, so that a decision arriving before
        // the caller waits is kept for it.
        self.inner
            .pending
            .entry(request.op_id)
            .or_insert_with(|| Slot::Waiting(Vec::new()));
        let reply_to = self.reply_subject(request.op_id);
        self.publish(request.op_id, partition, body, Some(&reply_to))
            .await
    }

    /// Publishes a request's `body` to `partition`'s log with the op id as
    /// `Nats-Msg-Id` and, if given, `reply_to` as `Amends-Reply-To`; returns
    /// once JetStream acknowledged it.
    pub(crate) async fn publish(
        &self,
        op_id: OpId,
        partition: PartitionId,
        body: Vec<u8>,
        reply_to: Option<&str>,
    ) -> Result<Submitted> {
        let subject = self.inner.prefix.req(partition);
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, op_id.to_string().as_str());
        if let Some(reply_to) = reply_to {
            headers.insert(header::REPLY_TO, reply_to);
        }
        let publish_err = |source: crate::Source| Error::Publish {
            op_id,
            subject: subject.clone(),
            source,
        };
        let ack = self
            .inner
            .js
            .publish_with_headers(subject.clone(), headers, body.into())
            .await
            .map_err(|e| publish_err(Box::new(e)))?
            .await
            .map_err(|e| publish_err(Box::new(e)))?;
        Ok(Submitted {
            op_id,
            partition,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Asks the status endpoint of `partition` what it knows of `op_id`
    /// (use [`Client::partition_of`] for a request's partition). It answers
    /// for any operation, not only this client's, and takes no part in
    /// [`Client::wait`]: a decision learned here is not also handed to a
    /// wait.
    ///
    /// [`Error::Status`] if nobody answers within `timeout` (no service
    /// runs, or it is slow) or the endpoint refuses the request.
    pub async fn status(
        &self,
        op_id: OpId,
        partition: PartitionId,
        timeout: Duration,
    ) -> Result<OpStatus> {
        let subject = self.inner.prefix.status(partition);
        let fail = |detail: String, source: Option<crate::Source>| Error::Status {
            op_id,
            subject: subject.clone(),
            detail,
            source,
        };
        let nats = self.inner.js.client();
        let request = nats.request(subject.clone(), op_id.to_string().into());
        let reply = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(fail("no reply".to_owned(), Some(Box::new(e)))),
            Err(_) => return Err(fail(format!("no reply within {timeout:?}"), None)),
        };
        // The reply (protocol: "Subjects"): a `StatusAnswer`.
        match serde_json::from_slice::<StatusAnswer>(&reply.payload) {
            Ok(StatusAnswer::Decided { decision }) => Ok(OpStatus::Decided(decision)),
            Ok(StatusAnswer::Unknown) => Ok(OpStatus::Unknown),
            Ok(StatusAnswer::Error(error)) => Err(fail(error.detail, None)),
            Err(e) => Err(fail(
                format!(
                    "unreadable reply {}",
                    String::from_utf8_lossy(&reply.payload)
                ),
                Some(Box::new(e)),
            )),
        }
    }

    /// Waits up to `timeout` for the decision of an operation this client
    /// submitted.
    ///
    /// A decision is handed out once: to every wait pending when it arrives,
    /// or else to the next wait. [`Error::Timeout`] leaves the operation
    /// registered, so a later wait (or resubmission) can still collect it.
    pub async fn wait(&self, op_id: OpId, timeout: Duration) -> Result<Decision> {
        let rx = match self.inner.pending.entry(op_id) {
            Entry::Vacant(_) => return Err(Error::NotSubmitted { op_id }),
            Entry::Occupied(mut slot) => match slot.get_mut() {
                Slot::Waiting(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.retain(|w| !w.is_closed());
                    waiters.push(tx);
                    rx
                }
                Slot::Decided(decision) => {
                    let decision = decision.clone();
                    slot.remove();
                    return Ok(decision);
                }
            },
        };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(decision)) => Ok(decision),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout {
                op_id,
                tries: 1,
                per_try: timeout,
            }),
        }
    }

    /// Submits `request` and waits up to `timeout_per_try` for its decision,
    /// submitting it again on each timeout or unacknowledged publish, at most
    /// `tries` times in all (at least once).
    ///
    /// Resubmitting is safe by construction (protocol: "Timeouts and
    /// resubmission"): every try sends the same op id as `Nats-Msg-Id`, the
    /// same body and the same reply subject. Inside the requests stream's
    /// duplicate window JetStream drops the copy, and the decision of the
    /// copy in the log comes to the same reply subject; after it, amends
    /// finds the op id in its dedup records and answers with the original
    /// decision. Either way an operation takes effect at most once, and if
    /// no earlier copy reached the log, this one is decided for the first
    /// time. A rejected decision is returned in `Ok`: it is an answer, not a
    /// failure, and is never retried.
    ///
    /// After a wait times out it first asks the status endpoint
    /// ([`Client::status`], bounded by `timeout_per_try`): if the operation
    /// was decided, that decision is returned. This covers a reply that was
    /// lost (the service died between its commit and its reply) while a
    /// resubmission would be dropped as a JetStream duplicate and answered
    /// by nobody. A status query that fails or says unknown just leads to
    /// the resubmission.
    pub async fn submit_and_wait(
        &self,
        request: &Request,
        timeout_per_try: Duration,
        tries: u32,
    ) -> Result<Decision> {
        let tries = tries.max(1);
        let mut last_publish_err = None;
        for attempt in 1..=tries {
            match self.submit(request).await {
                Ok(_) => last_publish_err = None,
                Err(e @ Error::Publish { .. }) => {
                    tracing::debug!(op_id = %request.op_id, attempt, error = %e, "publish not acknowledged; will resubmit");
                    last_publish_err = Some(e);
                }
                Err(e) => return Err(e),
            }
            // A failed publish may still have reached the log, so wait
            // either way: this is also the backoff between attempts.
            match self.wait(request.op_id, timeout_per_try).await {
                Ok(decision) => return Ok(decision),
                Err(Error::Timeout { .. }) => {
                    let partition = self.partition_of(request)?;
                    match self.status(request.op_id, partition, timeout_per_try).await {
                        Ok(OpStatus::Decided(decision)) if decision.outcome.is_final() => {
                            self.forget(request.op_id);
                            return Ok(decision);
                        }
                        // A saga in flight: resubmitting names this
                        // client's reply subject for its final decision.
                        Ok(OpStatus::Decided(_) | OpStatus::Unknown) => {}
                        Err(e) => {
                            tracing::debug!(op_id = %request.op_id, error = %e, "status query failed");
                        }
                    }
                    tracing::debug!(op_id = %request.op_id, attempt, "no decision in time; resubmitting");
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_publish_err.unwrap_or(Error::Timeout {
            op_id: request.op_id,
            tries,
            per_try: timeout_per_try,
        }))
    }
}

impl Client {
    /// Drops an operation's slot once its decision was learned elsewhere (a
    /// reply arriving later is then dropped), unless a wait still pends.
    fn forget(&self, op_id: OpId) {
        self.inner.pending.remove_if(&op_id, |_, slot| match slot {
            Slot::Waiting(waiters) => waiters.iter().all(|w| w.is_closed()),
            Slot::Decided(_) => true,
        });
    }
}

/// A request's wire body, refused if over the protocol's size limit.
pub(crate) fn encode_checked(request: &Request) -> Result<Vec<u8>> {
    let body = encode(request);
    if body.len() > REQUEST_BYTES_MAX {
        return Err(Error::TooLarge {
            op_id: request.op_id,
            len: body.len(),
            max: REQUEST_BYTES_MAX,
        });
    }
    Ok(body)
}

/// Reads the partition count from the deployment's meta bucket.
pub async fn read_partitions(js: &jetstream::Context, prefix: &Prefix) -> Result<Partitions> {
    let bucket = prefix.meta_bucket();
    let meta = |detail: String, source: Option<crate::Source>| Error::Meta {
        bucket: bucket.clone(),
        detail,
        source,
    };
    let store = js
        .get_key_value(bucket.clone())
        .await
        .map_err(|e| meta("open failed".to_owned(), Some(Box::new(e))))?;
    let value = store
        .get(PARTITIONS_KEY)
        .await
        .map_err(|e| meta("read failed".to_owned(), Some(Box::new(e))))?
        .ok_or_else(|| meta(format!("no key {PARTITIONS_KEY:?}"), None))?;
    protocol::parse_partitions(&value).map_err(|e| meta(e.to_string(), None))
}

/// Hands each decision that arrives on the inbox to its operation's waiters.
async fn demux(mut sub: async_nats::Subscriber, pending: Arc<Pending>, closed: Arc<AtomicBool>) {
    while let Some(msg) = sub.next().await {
        match serde_json::from_slice::<Decision>(&msg.payload) {
            Ok(decision) => deliver(&pending, decision),
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "inbox message is not a decision; dropped");
            }
        }
    }
    closed.store(true, Ordering::Release);
    // Dropping the senders ends every pending wait with `Closed`.
    pending.retain(|_, slot| matches!(slot, Slot::Decided(_)));
}

/// Delivers one decision: to the waits pending, or kept for the next one.
fn deliver(pending: &Pending, decision: Decision) {
    if !decision.outcome.is_final() {
        // A resubmitted saga still in flight: its final decision follows.
        tracing::debug!(op_id = %decision.op_id, "saga in flight; still waiting");
        return;
    }
    match pending.entry(decision.op_id) {
        Entry::Vacant(_) => {
            // Handed out already (a later copy of the same answer), or never
            // submitted through this client.
            tracing::debug!(op_id = %decision.op_id, "decision for no pending operation; dropped");
        }
        Entry::Occupied(mut slot) => match slot.get_mut() {
            Slot::Decided(_) => {}
            Slot::Waiting(waiters) => {
                let mut delivered = false;
                for waiter in waiters.drain(..) {
                    delivered |= waiter.send(decision.clone()).is_ok();
                }
                if delivered {
                    slot.remove();
                } else {
                    *slot.get_mut() = Slot::Decided(decision);
                }
            }
        },
    }
}

/// The query endpoints (protocol: "Queries"): an account's balance, a
/// claim's owner and a partition's stats, each routed like a submit.
impl Client {
    /// Asks `account`'s partition for its balance, holds and limits;
    /// `None` if the partition has no such account (as of the position it
    /// has applied). [`Error::Query`] if nobody answers within `timeout`
    /// or the endpoint refuses the request.
    pub async fn balance(
        &self,
        account: &amends_core::command::AccountId,
        timeout: Duration,
    ) -> Result<Option<crate::Balance>> {
        let partition = partition_of(account.as_str(), self.inner.partitions);
        let subject = self.inner.prefix.query_balance(partition);
        match self
            .query(&subject, account.as_str().as_bytes().to_vec(), timeout)
            .await?
        {
            BalanceAnswer::Found(balance) => Ok(Some(balance)),
            BalanceAnswer::Unknown(_) => Ok(None),
            BalanceAnswer::Error(error) => Err(query_error(&subject, error.detail, None)),
        }
    }

    /// Asks the partition of the claim `(namespace, key)` who holds it.
    pub async fn claim_owner(
        &self,
        namespace: &amends_core::command::Namespace,
        key: &amends_core::command::ClaimKey,
        timeout: Duration,
    ) -> Result<crate::ClaimOwner> {
        let routing_key = amends_core::route::claim_routing_key(namespace.as_str(), key.as_str());
        let partition = partition_of(&routing_key, self.inner.partitions);
        let subject = self.inner.prefix.query_claim(partition);
        let body = query::encode(&ClaimQuery {
            namespace: namespace.clone(),
            key: key.clone(),
        });
        match self.query(&subject, body, timeout).await? {
            ClaimAnswer::Claimed(claimed) => Ok(claimed.into()),
            ClaimAnswer::Free(free) => Ok(free.into()),
            ClaimAnswer::Error(error) => Err(query_error(&subject, error.detail, None)),
        }
    }

    /// Asks `partition` for its stats: supervisor state, applied position,
    /// the log's last sequence and the lag between them.
    pub async fn stats(
        &self,
        partition: PartitionId,
        timeout: Duration,
    ) -> Result<crate::PartitionStats> {
        let subject = self.inner.prefix.stats(partition);
        match self.query(&subject, Vec::new(), timeout).await? {
            StatsAnswer::Ok(stats) => Ok(stats),
            StatsAnswer::Error(error) => Err(query_error(&subject, error.detail, None)),
        }
    }

    /// One request to a query endpoint, and its answer (an error answer is
    /// the caller's to turn into [`Error::Query`]).
    async fn query<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<T> {
        let nats = self.inner.js.client();
        let request = nats.request(subject.to_owned(), body.into());
        let reply = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(query_error(subject, "no reply", Some(Box::new(e)))),
            Err(_) => {
                return Err(query_error(
                    subject,
                    format!("no reply within {timeout:?}"),
                    None,
                ));
            }
        };
        serde_json::from_slice(&reply.payload).map_err(|e| {
            query_error(
                subject,
                format!(
                    "unreadable answer {}",
                    String::from_utf8_lossy(&reply.payload)
                ),
                Some(Box::new(e)),
            )
        })
    }
}

fn query_error(subject: &str, detail: impl Into<String>, source: Option<crate::Source>) -> Error {
    Error::Query {
        subject: subject.to_owned(),
        detail: detail.into(),
        source,
    }
}
