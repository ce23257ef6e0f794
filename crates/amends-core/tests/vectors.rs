//! Proves the partition machine makes exactly the decisions of
//! specs/vectors/decisions.json: every step is decoded with
//! `wire::decode_request`, applied with `Machine::apply_with_reply` to a
//! `MemState` (of a machine with the scenario's partition count), and
//! its answer, decision and effects are compared with the file's.

use std::collections::{BTreeMap, BTreeSet};

use amends_core::partition::{Answer, Config, Effect, Input, Machine};
use amends_core::route::{PartitionId, Partitions};
use amends_core::state::MemState;
use amends_core::wire::{self, REQUEST_BYTES_MAX};
use amends_core::{Command, Reason};
use serde::Deserialize;
use serde_json::{Value, json};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../specs/vectors/decisions.json"
);

/// The least number of steps the file must hold, so an emptied or truncated
/// file fails instead of passing vacuously.
const STEPS_MIN: usize = 30;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[allow(dead_code, reason = "read by people, not by the test")]
    description: String,
    scenarios: Vec<Scenario>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    name: String,
    #[serde(default)]
    #[allow(dead_code, reason = "read by people, not by the test")]
    description: Option<String>,
    config: Config,
    partition: PartitionId,
    /// The deployment's partition count (places saga steps); default 8.
    #[serde(default = "default_partitions")]
    partitions: u32,
    steps: Vec<Step>,
}

fn default_partitions() -> u32 {
    8
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    #[serde(default)]
    #[allow(dead_code, reason = "read by people, not by the test")]
    note: Option<String>,
    position: u64,
    log_time_ms: u64,
    message: Value,
    /// The reply subject the message was published with, which a saga
    /// remembers to send its final decision to.
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    pad_to_bytes: Option<usize>,
    /// Read by tests/schemas.rs.
    #[serde(default)]
    #[allow(dead_code, reason = "read by tests/schemas.rs")]
    schema_accepts: bool,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    answer: String,
    decision: Value,
    effects: Vec<Value>,
}

fn load() -> File {
    let text =
        std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("cannot read {VECTORS}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{VECTORS} does not parse: {e}"))
}

/// The body bytes of a step: a string is sent as its UTF-8 bytes, any other
/// JSON value as its compact encoding; then the padding.
fn body(step: &Step) -> Vec<u8> {
    let mut bytes = match &step.message {
        Value::String(s) => s.as_bytes().to_vec(),
        other => serde_json::to_vec(other).unwrap_or_else(|e| panic!("cannot encode: {e}")),
    };
    if let Some(len) = step.pad_to_bytes {
        assert!(
            bytes.len() <= len,
            "pad_to_bytes {len} is below the body's {} bytes",
            bytes.len()
        );
        bytes.resize(len, b' ');
    }
    bytes
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| panic!("cannot serialize: {e}"))
}

/// The tagged JSON form of an effect used by the vectors.
fn effect_json(effect: &Effect) -> Value {
    match effect {
        Effect::Decided(d) => json!({ "decided": to_json(d) }),
        Effect::Apology(a) => json!({ "apology": to_json(a) }),
        Effect::HoldExpired(e) => json!({ "hold_expired": to_json(e) }),
        Effect::Send { partition, request } => {
            json!({ "send": { "partition": partition, "request": to_json(request) } })
        }
        Effect::Reply { to, decision } => {
            json!({ "reply": { "to": to, "decision": to_json(decision) } })
        }
        // Not in the vectors: a dead letter never reaches `apply_with_reply`.
        Effect::DeadLetter(d) => json!({ "dead_letter": { "position": d.position } }),
    }
}

/// What one step produced: the answer's name, its decision and the effects.
fn run_step(machine: &Machine, state: &mut MemState, step: &Step) -> (String, Value, Vec<Value>) {
    let input = match wire::decode_request(&body(step)) {
        Ok(input) => input,
        Err(_) => return ("dead_letter".to_owned(), Value::Null, Vec::new()),
    };
    let mut out = Vec::new();
    let answer = machine
        .apply_with_reply(
            state,
            step.position,
            step.log_time_ms,
            &input,
            step.reply_to.as_deref(),
            &mut out,
        )
        .unwrap_or_else(|fault| panic!("fault: {fault}"));
    let name = match &answer {
        Answer::Decided(_) => "decided",
        Answer::Duplicate(_) => "duplicate",
        Answer::Conflict(_) => "conflict",
        Answer::Refused(_) => "refused",
        Answer::Ticked => "ticked",
        Answer::Accepted(_) => "accepted",
        Answer::Internal(_) => "internal",
    };
    let decision = match &answer {
        Answer::Accepted(d) | Answer::Internal(d) => to_json(d),
        other => other.decision().map_or(Value::Null, to_json),
    };
    (
        name.to_owned(),
        decision,
        out.iter().map(effect_json).collect(),
    )
}

/// Whether the op id of a decision's JSON is a UUID v7 (read from its text,
/// not with the core's parser).
fn is_v7(decision: &Value) -> bool {
    let text = decision["op_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no op_id in {decision}"));
    text.as_bytes().get(14) == Some(&b'7')
}

/// Whether `again` repeats `earlier`: the same decision, or for a saga in
/// flight the same one at a later step.
fn same_decision(earlier: &Value, again: &Value) -> bool {
    let in_flight = json!("in_flight");
    if earlier == again {
        return true;
    }
    if earlier["outcome"] != in_flight || again["outcome"] != in_flight {
        return false;
    }
    let mut moved = earlier.clone();
    moved["step"] = again["step"].clone();
    moved == *again
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| panic!("cannot print: {e}"))
}

#[test]
fn machine_matches_every_vector() {
    let file = load();
    let mut failures = Vec::new();
    for scenario in &file.scenarios {
        let partitions = Partitions::new(scenario.partitions)
            .unwrap_or_else(|e| panic!("{}: bad partition count: {e}", scenario.name));
        let machine = Machine::new(scenario.partition, partitions, scenario.config);
        let mut state = MemState::new();
        for (i, step) in scenario.steps.iter().enumerate() {
            let (answer, decision, effects) = run_step(&machine, &mut state, step);
            let expected_effects = Value::Array(step.expect.effects.clone());
            let got_effects = Value::Array(effects);
            if answer != step.expect.answer
                || decision != step.expect.decision
                || got_effects != expected_effects
            {
                failures.push(format!(
                    "scenario {:?}, step {} (position {}):\n  expected {} {}\n       got {} {}\n  expected effects {}\n       got effects {}",
                    scenario.name,
                    i + 1,
                    step.position,
                    step.expect.answer,
                    compact(&step.expect.decision),
                    answer,
                    compact(&decision),
                    compact(&expected_effects),
                    compact(&got_effects),
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} steps differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn file_is_substantial() {
    // Counts steps, checks every reason code, every command and every answer
    // is exercised, and checks the file's own consistency (a duplicate
    // repeats an earlier decision; only a new decision publishes one; a
    // conflict or a refused op id carries its own code and publishes
    // nothing but due hold expiries; no op id is decided twice, and only v7
    // ones are decided at all; an accepted saga is in flight and publishes
    // no decision of its own yet; an internal step message publishes no
    // decision of its own op id; a reply repeats a decision published in the
    // same step), so an emptied or careless edit fails.
    let file = load();
    let steps: usize = file.scenarios.iter().map(|s| s.steps.len()).sum();
    assert!(
        steps >= STEPS_MIN,
        "only {steps} steps in {VECTORS}, want at least {STEPS_MIN}"
    );

    let mut codes = BTreeSet::new();
    let mut confirmed = BTreeSet::new();
    let mut answers = BTreeSet::new();
    for scenario in &file.scenarios {
        let mut decided: Vec<&Value> = Vec::new();
        // The kind of each request by op id, to credit a saga's final
        // decision (published by a later message) to its command.
        let mut kinds: BTreeMap<String, &'static str> = BTreeMap::new();
        let mut last_position = 0;
        for step in &scenario.steps {
            if let Ok(Input::Request(req)) = wire::decode_request(&body(step)) {
                kinds.insert(req.op_id.to_string(), req.command.kind());
            }
            let published: Vec<&Value> = step
                .expect
                .effects
                .iter()
                .filter_map(|e| e.get("decided"))
                .collect();
            for d in &published {
                if let Some(code) = d.pointer("/reason/code").and_then(Value::as_str) {
                    codes.insert(code.to_owned());
                }
                // A step_refused wraps the step's own reason.
                if let Some(code) = d.pointer("/reason/reason/code").and_then(Value::as_str) {
                    codes.insert(code.to_owned());
                }
                if d.get("outcome") == Some(&json!("confirmed"))
                    && let Some(kind) = d["op_id"].as_str().and_then(|id| kinds.get(id))
                {
                    confirmed.insert(*kind);
                }
            }
            for e in &step.expect.effects {
                if let Some(reply) = e.get("reply") {
                    assert!(
                        published.contains(&&reply["decision"]),
                        "scenario {:?}, position {}: a reply repeats a decision published \
                         in the same step",
                        scenario.name,
                        step.position
                    );
                }
            }
            assert!(
                step.position > last_position,
                "scenario {:?}: position {} does not advance",
                scenario.name,
                step.position
            );
            last_position = step.position;
            answers.insert(step.expect.answer.as_str());
            let decision = &step.expect.decision;
            if let Some(code) = decision.pointer("/reason/code").and_then(Value::as_str) {
                codes.insert(code.to_owned());
            }
            let publishes_decision = step
                .expect
                .effects
                .iter()
                .any(|e| e.get("decided").is_some() || e.get("apology").is_some());
            match step.expect.answer.as_str() {
                "decided" => {
                    assert_eq!(
                        step.expect.effects.last(),
                        Some(&json!({ "decided": decision })),
                        "scenario {:?}, position {}: a new decision is published last",
                        scenario.name,
                        step.position
                    );
                    assert!(
                        is_v7(decision),
                        "scenario {:?}, position {}: only a v7 op id is decided",
                        scenario.name,
                        step.position
                    );
                    assert!(
                        !decided.iter().any(|d| d["op_id"] == decision["op_id"]),
                        "scenario {:?}, position {}: op id decided twice",
                        scenario.name,
                        step.position
                    );
                    decided.push(decision);
                    if decision.get("outcome") == Some(&json!("confirmed"))
                        && let Ok(Input::Request(req)) = wire::decode_request(&body(step))
                    {
                        confirmed.insert(req.command.kind());
                    }
                }
                "duplicate" => assert!(
                    decided.iter().any(|d| same_decision(d, decision)) && !publishes_decision,
                    "scenario {:?}, position {}: a duplicate must repeat an earlier decision \
                     (a saga in flight: with its current step) and publish nothing",
                    scenario.name,
                    step.position
                ),
                "ticked" => {
                    if let Ok(Input::Request(req)) = wire::decode_request(&body(step)) {
                        assert!(
                            matches!(req.command, Command::Tick {}),
                            "ticked needs a tick"
                        );
                        confirmed.insert(req.command.kind());
                    }
                }
                "conflict" => {
                    assert_eq!(
                        decision.pointer("/reason/code"),
                        Some(&json!("op_id_conflict")),
                        "scenario {:?}, position {}: conflict needs op_id_conflict",
                        scenario.name,
                        step.position
                    );
                    assert!(
                        !publishes_decision && !decided.contains(&decision),
                        "scenario {:?}, position {}: conflict is for the sender only",
                        scenario.name,
                        step.position
                    );
                }
                "refused" => {
                    // The op id itself is refused: outside the window, or
                    // not a UUID v7 (malformed whatever the body).
                    let code = decision.pointer("/reason/code").and_then(Value::as_str);
                    let not_v7 = !is_v7(decision);
                    // A step message whose op id is not the derived one is
                    // refused like an op id that is not v7.
                    let internal = matches!(
                        wire::decode_request(&body(step)),
                        Ok(Input::Request(req)) if req.command.is_internal()
                    );
                    assert!(
                        (code == Some("op_id_outside_window") && !not_v7)
                            || (code == Some("malformed") && (not_v7 || internal)),
                        "scenario {:?}, position {}: refused needs op_id_outside_window, or \
                         malformed for an op id that is not v7 or a forged step message",
                        scenario.name,
                        step.position
                    );
                    assert!(
                        !publishes_decision && !decided.contains(&decision),
                        "scenario {:?}, position {}: refused is for the sender only",
                        scenario.name,
                        step.position
                    );
                }
                "accepted" => {
                    assert_eq!(
                        decision.pointer("/outcome"),
                        Some(&json!("in_flight")),
                        "scenario {:?}, position {}: an accepted saga is in flight",
                        scenario.name,
                        step.position
                    );
                    assert!(
                        is_v7(decision)
                            && !published.iter().any(|d| d["op_id"] == decision["op_id"]
                                && d["position"] != decision["position"])
                            && !decided.iter().any(|d| d["op_id"] == decision["op_id"]),
                        "scenario {:?}, position {}: an accepted saga is new, and decided \
                         only by its own step's messages",
                        scenario.name,
                        step.position
                    );
                    // Its final decision, when this same message decides
                    // it, is published with the message's position.
                    decided.push(decision);
                }
                "internal" => {
                    let kind = wire::decode_request(&body(step))
                        .ok()
                        .and_then(|i| match i {
                            Input::Request(req) => Some(req.command.kind()),
                            Input::Malformed { .. } => None,
                        });
                    assert!(
                        matches!(kind, Some("step" | "step_outcome")) && !is_v7(decision),
                        "scenario {:?}, position {}: internal needs a step message with a \
                         derived op id",
                        scenario.name,
                        step.position
                    );
                    assert!(
                        !published.iter().any(|d| d["op_id"] == decision["op_id"]),
                        "scenario {:?}, position {}: an internal decision is not published",
                        scenario.name,
                        step.position
                    );
                    if decision.get("outcome") == Some(&json!("confirmed"))
                        && let Some(kind) = kind
                    {
                        confirmed.insert(kind);
                    }
                    decided.push(decision);
                }
                "dead_letter" => {}
                other => panic!("scenario {:?}: unknown answer {other:?}", scenario.name),
            }
            // A saga's final decision, published by this step, is what a
            // later resubmission repeats.
            decided.extend(published);
        }
    }
    let missing: Vec<_> = Reason::CODES
        .iter()
        .filter(|c| !codes.contains(**c))
        .collect();
    assert!(missing.is_empty(), "no vector refuses with {missing:?}");
    let unknown: Vec<_> = codes
        .iter()
        .filter(|c| !Reason::CODES.contains(&c.as_str()))
        .collect();
    assert!(unknown.is_empty(), "vectors use unknown codes {unknown:?}");
    let kinds = [
        "open_account",
        "credit",
        "debit",
        "hold",
        "post",
        "void",
        "claim",
        "release",
        "tick",
        "transfer",
        "saga",
        "step",
        "step_outcome",
    ];
    let unconfirmed: Vec<_> = kinds.iter().filter(|k| !confirmed.contains(**k)).collect();
    assert!(unconfirmed.is_empty(), "no vector confirms {unconfirmed:?}");
    for answer in [
        "decided",
        "duplicate",
        "conflict",
        "refused",
        "ticked",
        "dead_letter",
        "accepted",
        "internal",
    ] {
        assert!(
            answers.contains(answer),
            "no vector expects the answer {answer:?}"
        );
    }
}

#[test]
fn size_limit_vectors_straddle_the_limit() {
    // The padded vectors must sit exactly at and one byte over
    // REQUEST_BYTES_MAX, so a change of the limit shows up here.
    let file = load();
    let pads: BTreeSet<usize> = file
        .scenarios
        .iter()
        .flat_map(|s| s.steps.iter())
        .filter_map(|s| s.pad_to_bytes)
        .collect();
    assert!(
        pads.contains(&REQUEST_BYTES_MAX),
        "no vector of exactly REQUEST_BYTES_MAX bytes"
    );
    let over = REQUEST_BYTES_MAX + 1;
    assert!(
        pads.contains(&over),
        "no vector one byte over REQUEST_BYTES_MAX"
    );
}
