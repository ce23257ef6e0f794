//! Reading back what a deployment wrote: every message of a stream, the
//! decisions stream as JSON, and its decisions grouped by op id (to count
//! the ops decided more than once).

use std::collections::BTreeMap;

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use serde_json::Value;

use super::is_decision_subject;
use crate::topology::{Prefix, Stream};

/// Every message stream `name` still holds, in sequence order (deleted
/// sequences are left out).
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> Vec<StreamMessage> {
    let stream = js
        .get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("the stream {name}: {e}"));
    let info = stream
        .get_info()
        .await
        .unwrap_or_else(|e| panic!("the info of {name}: {e}"));
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    for sequence in first.max(1)..=last {
        if let Ok(m) = stream.get_raw_message(sequence).await {
            out.push(m);
        }
    }
    out
}

/// Every decision and hold-expired event on the decisions stream of
/// `prefix`, as JSON, in stream order (ownership records left out).
pub async fn decisions(js: &jetstream::Context, prefix: &Prefix) -> Vec<Value> {
    let name = prefix.stream_name(Stream::Decisions);
    stream_messages(js, &name)
        .await
        .into_iter()
        .filter(|m| is_decision_subject(prefix, &m.subject))
        .map(|m| {
            serde_json::from_slice(&m.payload)
                .unwrap_or_else(|e| panic!("decision {} is not JSON: {e}", m.sequence))
        })
        .collect()
}

/// The decisions stream's messages grouped by op id (a hold-expired event
/// by its `event_id`): an id with more than one message was published twice.
pub async fn decisions_by_op(
    js: &jetstream::Context,
    prefix: &Prefix,
) -> BTreeMap<String, Vec<Value>> {
    let mut by_op: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for d in decisions(js, prefix).await {
        let id = d["op_id"]
            .as_str()
            .or_else(|| d["event_id"].as_str())
            .unwrap_or_default()
            .to_owned();
        by_op.entry(id).or_default().push(d);
    }
    by_op
}
