//! Hostile input: raw messages on the request subjects, published behind
//! the client's back, each of which must be answered (on its reply
//! subject or the decisions stream) or dead-lettered.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amends_nats::test_support::{self, decisions};
use amends_nats::topology::{Prefix, Stream, header};
use async_nats::HeaderMap;
use futures_util::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

use crate::deploy::Deployment;

/// Hostile messages per second.
const RATE: u64 = 40;
/// Above the protocol's `REQUEST_BYTES_MAX` (64 KiB).
const OVERSIZE_BODY: usize = 70_000;
/// A header far larger than any the protocol names.
const OVERSIZE_HEADER: usize = 16_000;
/// Far above the protocol's 256-byte `Amends-Reply-To` limit.
const LONG_REPLY: usize = 5_000;
/// Longer than the requests stream's duplicate window (1 s in the
/// campaign), so that a reused op id reaches the log.
const REUSE_AFTER: Duration = Duration::from_secs(2);

/// The kinds of hostile message.
const KINDS: [&str; 9] = [
    "not JSON",
    "unknown field",
    "overflowing amount",
    "oversize body",
    "oversize header",
    "over-long reply subject",
    "reused op id, other body",
    "binary, no Nats-Msg-Id",
    "op id not UUID v7",
];

/// One hostile message that reached the log.
#[derive(Debug, Clone)]
pub struct Sent {
    kind: usize,
    /// Its index: its reply subject is `<inbox>.<index>`.
    index: usize,
    partition: u32,
    sequence: u64,
    /// Whether it named a reply subject we listen on.
    replies: bool,
}

/// The hostile messages published, and the answers that came.
pub struct SentAll {
    sent: Vec<Sent>,
    /// Publishes refused by nats-server or dropped as JetStream
    /// duplicates, by kind.
    refused: BTreeMap<usize, usize>,
    answered: Arc<Mutex<HashSet<usize>>>,
    _listener: tokio::task::JoinHandle<()>,
}

impl SentAll {
    /// How many reached the log.
    pub fn len(&self) -> usize {
        self.sent.len()
    }
}

/// A valid credit of 1 to an account nobody opened, as JSON.
fn credit(op_id: &str, extra: Option<(&str, Value)>) -> Value {
    let mut v =
        json!({"op_id": op_id, "command": {"type": "credit", "account": "hostile", "amount": 1}});
    if let Some((k, x)) = extra {
        v[k] = x;
    }
    v
}

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON")
}

/// Publishes hostile messages at [`RATE`] for `budget`, cycling through
/// the kinds, to random partitions.
pub async fn send(
    d: &Deployment,
    partitions: u32,
    budget: Duration,
    seed: u64,
) -> anyhow::Result<SentAll> {
    let nats = test_support::connect(&d.server).await;
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(format!("{inbox}.>")).await?;
    nats.flush().await?;
    let answered = Arc::new(Mutex::new(HashSet::new()));
    let listener = {
        let (answered, prefix) = (Arc::clone(&answered), format!("{inbox}."));
        tokio::spawn(async move {
            while let Some(m) = replies.next().await {
                if let Some(i) = m
                    .subject
                    .strip_prefix(prefix.as_str())
                    .and_then(|i| i.parse().ok())
                {
                    answered.lock().expect("not poisoned").insert(i);
                }
            }
        })
    };
    let js = async_nats::jetstream::new(nats);
    let prefix = Prefix::default();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6057);
    let mut reusable: VecDeque<(Instant, String, u32)> = VecDeque::new();
    let mut out = SentAll {
        sent: Vec::new(),
        refused: BTreeMap::new(),
        answered,
        _listener: listener,
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(1_000 / RATE));
    let deadline = Instant::now() + budget;
    let mut index = 0;
    while Instant::now() < deadline {
        ticker.tick().await;
        let kind = index % KINDS.len();
        let mut partition = rng.random_range(0..partitions);
        let op_id = amends_client::Client::new_op_id().to_string();
        let mut headers = HeaderMap::new();
        let reply = format!("{inbox}.{index}");
        let mut msg_id = Some(op_id.clone());
        let mut replies = true;
        let payload = match kind {
            0 => format!(r#"{{"op_id":"{op_id}","command":{{"type":"cre"#).into_bytes(),
            1 => body(&credit(&op_id, Some(("colour", json!("red"))))),
            2 => format!(
                r#"{{"op_id":"{op_id}","command":{{"type":"credit","account":"hostile","amount":18446744073709551616}}}}"#
            )
            .into_bytes(),
            3 => body(&credit(&op_id, Some(("pad", json!("x".repeat(OVERSIZE_BODY)))))),
            4 => {
                headers.insert("Hostile-Pad", "y".repeat(OVERSIZE_HEADER).as_str());
                body(&credit(&op_id, None))
            }
            5 => {
                replies = false;
                body(&credit(&op_id, None))
            }
            6 => match reusable.front() {
                Some((at, _, _)) if at.elapsed() > REUSE_AFTER => {
                    // On the partition that has the op id: dedup is per
                    // partition (see RELIABILITY.md for another partition).
                    let (_, reused, on) = reusable.pop_front().expect("a front");
                    partition = on;
                    msg_id = Some(reused.clone());
                    body(&json!({"op_id": reused, "command": {"type": "debit", "account": "hostile", "amount": 7}}))
                }
                // Nothing old enough yet: an empty body instead.
                _ => Vec::new(),
            },
            7 => {
                msg_id = None;
                (0..200).map(|_| rng.random::<u8>()).collect()
            }
            _ => {
                let v4 = uuid::Uuid::from_u128(rng.random::<u128>() & !(0xf << 76) | (0x4 << 76));
                msg_id = Some(v4.to_string());
                body(&credit(&v4.to_string(), None))
            }
        };
        if let Some(id) = &msg_id {
            headers.insert(header::MSG_ID, id.as_str());
        }
        if replies {
            headers.insert(header::REPLY_TO, reply.as_str());
        } else {
            let long = "r.".repeat(LONG_REPLY / 2);
            headers.insert(header::REPLY_TO, long.as_str());
        }
        if matches!(kind, 1 | 4) {
            reusable.push_back((Instant::now(), op_id.clone(), partition));
        }
        let id = d
            .client
            .partitions()
            .id(partition)
            .expect("a partition of the deployment");
        let subject = prefix.req(id);
        let acked = match js
            .publish_with_headers(subject, headers, payload.into())
            .await
        {
            Ok(ack) => ack.await.ok(),
            Err(_) => None,
        };
        match acked {
            Some(ack) if !ack.duplicate => out.sent.push(Sent {
                kind,
                index,
                partition,
                sequence: ack.sequence,
                replies,
            }),
            _ => *out.refused.entry(kind).or_default() += 1,
        }
        index += 1;
    }
    Ok(out)
}

/// Which hostile messages were answered or dead-lettered.
pub struct Accounted {
    /// Per kind: (on the log, accounted for).
    by_kind: BTreeMap<usize, (usize, usize)>,
    refused: BTreeMap<usize, usize>,
}

impl Accounted {
    /// Hostile messages on the log that got neither an answer nor a dead
    /// letter.
    pub fn unaccounted(&self) -> usize {
        self.by_kind.values().map(|(on_log, ok)| on_log - ok).sum()
    }

    /// A line per kind.
    pub fn lines(&self) -> Vec<String> {
        KINDS
            .iter()
            .enumerate()
            .map(|(kind, name)| {
                let (on_log, ok) = self.by_kind.get(&kind).copied().unwrap_or_default();
                let refused = self.refused.get(&kind).copied().unwrap_or_default();
                format!(
                    "hostile {name}: {on_log} on the log, {ok} answered or dead-lettered, {refused} not stored by nats-server (refused or duplicate)"
                )
            })
            .collect()
    }
}

/// Waits up to `within` until every message of `sent` was answered on its
/// reply subject, decided on the decisions stream at its position, or
/// dead-lettered (`dlq-<p>-<position>`).
pub async fn account_for(d: &Deployment, sent: &SentAll, within: Duration) -> Accounted {
    let deadline = Instant::now() + within;
    loop {
        let decided: HashSet<(u64, u64)> = decisions::decisions(&d.js, &Prefix::default())
            .await
            .into_iter()
            .filter(|v| v.get("outcome").is_some())
            .filter_map(|v| Some((v["partition"].as_u64()?, v["position"].as_u64()?)))
            .collect();
        let dlq: HashSet<String> =
            decisions::stream_messages(&d.js, &Prefix::default().stream_name(Stream::DeadLetters))
                .await
                .into_iter()
                .filter_map(|m| m.headers.get(header::MSG_ID).map(|v| v.as_str().to_owned()))
                .collect();
        let answered = sent.answered.lock().expect("not poisoned").clone();
        let mut by_kind: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for s in &sent.sent {
            let ok = (s.replies && answered.contains(&s.index))
                || decided.contains(&(u64::from(s.partition), s.sequence))
                || dlq.contains(&format!("dlq-{}-{}", s.partition, s.sequence));
            let entry = by_kind.entry(s.kind).or_default();
            entry.0 += 1;
            entry.1 += usize::from(ok);
        }
        let accounted = Accounted {
            by_kind,
            refused: sent.refused.clone(),
        };
        if accounted.unaccounted() == 0 || Instant::now() > deadline {
            return accounted;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
