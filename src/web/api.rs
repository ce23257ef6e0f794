//! The device's endpoints: send an operation, watch operations, trace one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use amends_client::OpStatus;
use amends_core::command::{Command, Phase};
use amends_core::partition::Input;
use amends_core::route::{PartitionId, partition_of};
use amends_core::{Decision, OpId, Outcome, Request, wire};
use amends_nats::topology::{Stream, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::hub::Event;
use super::{Body, Web, json as respond};

/// How long the service waits, after publishing an operation, for its
/// decision to come back on the reply subject (the decisions stream
/// brings it to the pages too; this also brings the answers sent to the
/// sender only: a conflict, a refused op id).
const REPLY_WAIT: Duration = Duration::from_secs(600);

/// How long one status or query request may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The most op ids one event stream watches (the page keeps fewer
/// pending).
const WATCHED_MAX: usize = 256;

/// Events queued for one page before it is dropped as too slow (it
/// reconnects and recovers by status).
const PAGE_QUEUE: usize = 1024;

/// `POST /api/ops`: one request body, exactly as `specs/protocol.md`
/// describes it (the page made its op id). Published to its partition's
/// log with the op id as `Nats-Msg-Id`; answered once JetStream holds it.
/// Sending the same body again is always safe.
pub async fn submit(
    web: &Arc<Web>,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let bytes = match Limited::new(request.into_body(), wire::REQUEST_BYTES_MAX)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return refused(StatusCode::PAYLOAD_TOO_LARGE, &format!("{e}")),
    };
    let request = match wire::decode_request(&bytes) {
        Ok(Input::Request(request)) => request,
        Ok(Input::Malformed { detail, .. }) => {
            return refused(StatusCode::UNPROCESSABLE_ENTITY, &detail);
        }
        Err(e) => return refused(StatusCode::BAD_REQUEST, &e.detail),
    };
    if let Err(why) = device_may_send(&request) {
        return refused(StatusCode::FORBIDDEN, why);
    }
    match web.client.submit(&request).await {
        Ok(submitted) => {
            let (client, hub, op_id) = (web.client.clone(), Arc::clone(&web.hub), request.op_id);
            tokio::spawn(async move {
                if let Ok(decision) = client.wait(op_id, REPLY_WAIT).await {
                    hub.publish(Event::Decision(decision));
                }
            });
            respond(
                StatusCode::ACCEPTED,
                &json!({
                    "status": "logged",
                    "op_id": submitted.op_id,
                    "partition": submitted.partition.get(),
                    "sequence": submitted.sequence,
                    "duplicate": submitted.duplicate,
                }),
            )
        }
        Err(e) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unavailable", "detail": format!("{e}")}),
        ),
    }
}

/// What a device may not send: the messages only amends writes (saga
/// steps and their outcomes, which anyone could forge with a correctly
/// derived op id; ticks), and op ids that are not UUID v7.
fn device_may_send(request: &Request) -> Result<(), &'static str> {
    if request.command.is_internal() || matches!(request.command, Command::Tick {}) {
        return Err(
            "a device sends operations only: step, step_outcome and tick messages are amends's own",
        );
    }
    if request.op_id.v7_unix_ms().is_none() {
        return Err("op_id must be a UUID version 7, made by the device (see specs/protocol.md)");
    }
    Ok(())
}

fn refused(status: StatusCode, detail: &str) -> hyper::Response<Body> {
    respond(status, &json!({"status": "refused", "detail": detail}))
}

/// `GET /api/events?op=<op id>[.<partition>]&...`: the page's pushed
/// stream. Each watched op is first recovered by its partition's status
/// endpoint (every partition's when the page does not know it yet), so a
/// reloaded page gets every answer it missed; after that, each decision,
/// apology and saga step of a watched op is pushed as it happens.
pub fn events(web: &Arc<Web>, query: &str) -> hyper::Response<Body> {
    let mut watched: Vec<(OpId, Option<PartitionId>)> = Vec::new();
    for pair in query.split('&') {
        let Some(value) = pair.strip_prefix("op=") else {
            continue;
        };
        let (id, partition) = match value.split_once('.') {
            Some((id, p)) => (
                id,
                p.parse::<u32>()
                    .ok()
                    .and_then(|p| web.client.partitions().id(p)),
            ),
            None => (value, None),
        };
        if let Ok(op_id) = id.parse::<OpId>()
            && watched.len() < WATCHED_MAX
        {
            watched.push((op_id, partition));
        }
    }
    let (tx, rx) = mpsc::channel(PAGE_QUEUE);
    // Subscribed before the status is asked, so nothing decided in
    // between is missed.
    let feed = web.hub.subscribe();
    tokio::spawn(watch(Arc::clone(web), watched, feed, tx));
    super::sse(rx)
}

async fn watch(
    web: Arc<Web>,
    watched: Vec<(OpId, Option<PartitionId>)>,
    mut feed: broadcast::Receiver<Arc<Event>>,
    tx: mpsc::Sender<String>,
) {
    let ids: HashSet<OpId> = watched.iter().map(|(id, _)| *id).collect();
    if tx
        .send(json!({"kind": "hello", "watching": ids.len()}).to_string())
        .await
        .is_err()
    {
        return;
    }
    if !recover(&web, &watched, &tx).await {
        return;
    }
    loop {
        match feed.recv().await {
            Ok(event) => {
                if ids.contains(&event.op_id())
                    && tx.send(event.to_json().to_string()).await.is_err()
                {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if !recover(&web, &watched, &tx).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends what the status endpoints know of each watched op; false once
/// the page has gone.
async fn recover(
    web: &Web,
    watched: &[(OpId, Option<PartitionId>)],
    tx: &mpsc::Sender<String>,
) -> bool {
    let answers = futures_util::future::join_all(
        watched
            .iter()
            .map(|&(op_id, partition)| status(web, op_id, partition)),
    )
    .await;
    for (&(op_id, _), answer) in watched.iter().zip(answers) {
        let mut messages = Vec::new();
        match answer {
            Some(decision) => {
                // A refused optimistic op's apology was published just
                // before its decision: told again from the request in the
                // log, for a page that was away then.
                if let Outcome::Rejected { .. } = decision.outcome
                    && let (Some(request), _) = read_request(web, &decision).await
                    && let Some(topic) = request.apology_topic
                {
                    let apology = amends_core::partition::Apology {
                        topic,
                        command: request.command,
                        decision: decision.clone(),
                    };
                    messages
                        .push(json!({"kind": "apology", "apology": apology, "recovered": true}));
                }
                messages.insert(
                    0,
                    json!({"kind": "decision", "decision": decision, "recovered": true}),
                );
            }
            None => messages.push(json!({"kind": "status", "op_id": op_id, "status": "unknown"})),
        }
        for message in messages {
            if tx.send(message.to_string()).await.is_err() {
                return false;
            }
        }
    }
    true
}

/// The decision the status endpoint of `partition` (or of any partition,
/// when `None`) holds for `op_id`; `None` if none does or none answered.
async fn status(web: &Web, op_id: OpId, partition: Option<PartitionId>) -> Option<Decision> {
    let partitions: Vec<PartitionId> = match partition {
        Some(p) => vec![p],
        None => web.client.partitions().ids().collect(),
    };
    let answers = futures_util::future::join_all(
        partitions
            .into_iter()
            .map(|p| web.client.status(op_id, p, ASK_TIMEOUT)),
    )
    .await;
    answers.into_iter().find_map(|a| match a {
        Ok(OpStatus::Decided(d)) => Some(d),
        _ => None,
    })
}

/// `GET /api/trace/<op id>`: an operation's life as the streams and
/// endpoints tell it: its decision (from the status endpoints), its
/// request (read back from the requests stream at the decision's
/// position), its apology topic, and for a saga each step's try, confirm
/// and cancel (their derived op ids' status on the steps' partitions).
pub async fn trace(web: &Arc<Web>, id: &str) -> hyper::Response<Body> {
    let Ok(op_id) = id.parse::<OpId>() else {
        return refused(
            StatusCode::BAD_REQUEST,
            "not an op id (a UUID in canonical text)",
        );
    };
    let Some(decision) = status(web, op_id, None).await else {
        return respond(
            StatusCode::OK,
            &json!({
                "op_id": op_id, "status": "unknown",
                "detail": "no partition has a record of it: not in the log yet, not applied yet, refused to its sender only, or past the dedup horizon",
            }),
        );
    };
    let (request, request_time) = read_request(web, &decision).await;
    let mut steps = Vec::new();
    if let Some(request) = &request {
        for (index, step) in (0u32..).zip(amends_core::saga::steps(&request.command).iter()) {
            steps.push(trace_step(web, op_id, index, step).await);
        }
    }
    let apology = match (&request, &decision.outcome) {
        (Some(r), Outcome::Rejected { .. }) => r
            .apology_topic
            .as_ref()
            .map(|topic| json!({"topic": topic, "subject": web.prefix.apology(topic)})),
        _ => None,
    };
    let state = match decision.outcome {
        Outcome::InFlight { .. } => "in_flight",
        _ => "decided",
    };
    respond(
        StatusCode::OK,
        &json!({
            "op_id": op_id,
            "status": state,
            "partition": decision.partition,
            "request": request,
            "request_time": request_time,
            "decision": decision,
            "apology": apology,
            "steps": steps,
        }),
    )
}

/// The request `decision` answered, read back from the requests stream,
/// with the time the stream stored it: at the decision's position, or for
/// a saga (whose decision names the message that ended it) where the hub
/// saw its request.
async fn read_request(web: &Web, decision: &Decision) -> (Option<Request>, Option<String>) {
    let op_id = decision.op_id;
    let position = web.hub.saga_position(op_id).unwrap_or(decision.position);
    let Ok(stream) = web
        .js
        .get_stream(web.prefix.stream_name(Stream::Requests))
        .await
    else {
        return (None, None);
    };
    let Ok(message) = stream.get_raw_message(position).await else {
        return (None, None);
    };
    let own = message
        .headers
        .get(header::MSG_ID)
        .is_some_and(|v| v.as_str() == op_id.to_string());
    match wire::decode_request(&message.payload) {
        Ok(Input::Request(request)) if own && request.op_id == op_id => {
            let time = message
                .time
                .format(&time::format_description::well_known::Rfc3339)
                .ok();
            (Some(request), time)
        }
        _ => (None, None),
    }
}

/// One step of a saga: its command, its partition, and the recorded
/// decision of each phase that ran.
async fn trace_step(
    web: &Web,
    saga: OpId,
    index: u32,
    step: &amends_core::command::SagaStep,
) -> Value {
    let partition = step
        .command
        .routing_key()
        .map(|key| partition_of(&key, web.client.partitions()));
    let mut phases = serde_json::Map::new();
    for phase in [Phase::Try, Phase::Confirm, Phase::Cancel] {
        let id = amends_core::saga::step_id(saga, index, phase);
        let decision = match partition {
            Some(p) => status(web, id, Some(p)).await,
            None => None,
        };
        phases.insert(phase.label().to_owned(), json!(decision));
    }
    json!({
        "index": index,
        "command": step.command,
        "compensation": step.compensation,
        "partition": partition.map(PartitionId::get),
        "phases": phases,
    })
}
