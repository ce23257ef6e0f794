//! Pins the JSON of every query answer (`amends_core::protocol::query`)
//! byte for byte: each typed answer, [`query::encode`]d, is exactly what the
//! service wrote before the answers were typed, when it built them with
//! `serde_json::json!` (the `json!` values below are those builders, with
//! the values filled in), and a literal string for each kind pins the bytes
//! whatever serde_json's map order. The answers read back into the same
//! values, as the client reads them.

use amends_core::command::{AccountId, ClaimKey, Namespace, Owner};
use amends_core::protocol::query::{
    self, AsOf, Balance, BalanceAnswer, ClaimAnswer, ClaimQuery, Claimed, ErrorAnswer, Free,
    PartitionOwner, PartitionState, PartitionStats, StatsAnswer, StatusAnswer,
};
use amends_core::{Decision, OpId, Outcome, Reason};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

const OP: &str = "018bcfe5-6800-7000-8000-000000000001";

fn op_id() -> OpId {
    OP.parse().expect("an op id")
}

/// `answer` encodes exactly as `before` (what the service's `json!` built)
/// did, and reads back as itself.
#[track_caller]
fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    answer: &T,
    before: &serde_json::Value,
) -> String {
    let bytes = query::encode(answer);
    let want = serde_json::to_vec(before).expect("json");
    let text = String::from_utf8(bytes.clone()).expect("UTF-8");
    assert_eq!(
        text,
        String::from_utf8(want).expect("UTF-8"),
        "{answer:?} encodes otherwise than before"
    );
    let back: T = serde_json::from_slice(&bytes).expect("reads back");
    assert_eq!(&back, answer, "{text}");
    text
}

fn decision(outcome: Outcome) -> Decision {
    Decision::new(op_id(), 3, 42, 1_700_000_000_000, outcome)
}

#[test]
fn status_answers_are_as_before() {
    // Proves the status endpoint's three answers encode exactly as the json! builders of the service did, a nested decision (with a nested reason) included.
    let confirmed = decision(Outcome::Confirmed {
        balance: Some(70),
        available: Some(40),
    });
    let text = check(
        &StatusAnswer::Decided {
            decision: confirmed.clone(),
        },
        &json!({"status": "decided", "decision": confirmed}),
    );
    assert_eq!(
        text,
        r#"{"decision":{"available":40,"balance":70,"log_time_ms":1700000000000,"op_id":"018bcfe5-6800-7000-8000-000000000001","outcome":"confirmed","partition":3,"position":42},"status":"decided"}"#
    );
    let rejected = decision(Outcome::Rejected {
        reason: Reason::StepRefused {
            step: 1,
            reason: Box::new(Reason::InsufficientFunds {
                available: 5,
                floor: 0,
                requested: 80,
            }),
        },
    });
    let text = check(
        &StatusAnswer::Decided {
            decision: rejected.clone(),
        },
        &json!({"status": "decided", "decision": rejected}),
    );
    assert_eq!(
        text,
        r#"{"decision":{"log_time_ms":1700000000000,"op_id":"018bcfe5-6800-7000-8000-000000000001","outcome":"rejected","partition":3,"position":42,"reason":{"code":"step_refused","reason":{"available":5,"code":"insufficient_funds","floor":0,"requested":80},"step":1}},"status":"decided"}"#
    );
    let in_flight = decision(Outcome::InFlight { step: 2 });
    check(
        &StatusAnswer::Decided {
            decision: in_flight.clone(),
        },
        &json!({"status": "decided", "decision": in_flight}),
    );
    let text = check(&StatusAnswer::Unknown, &json!({"status": "unknown"}));
    assert_eq!(text, r#"{"status":"unknown"}"#);
    let text = check(
        &StatusAnswer::Error(ErrorAnswer::new("\"x\" is not an op id in canonical text")),
        &json!({"status": "error", "detail": "\"x\" is not an op id in canonical text"}),
    );
    assert_eq!(
        text,
        r#"{"detail":"\"x\" is not an op id in canonical text","status":"error"}"#
    );
}

#[test]
fn balance_answers_are_as_before() {
    // Proves the balance query's answers (found with and without a ceiling, unknown, error) encode exactly as before: every field present, a missing ceiling as null.
    let at = AsOf {
        position: 17,
        log_time_ms: 1_700_000_000_123,
    };
    for ceiling in [None, Some(1_000)] {
        let balance = Balance {
            account: AccountId::new("wallet:alice").expect("an account id"),
            balance: 100,
            held: 30,
            incoming: 5,
            available: 70,
            floor: -10,
            ceiling,
            position: at.position,
            log_time_ms: at.log_time_ms,
        };
        let text = check(
            &BalanceAnswer::Found(balance),
            &json!({
                "status": "found",
                "account": "wallet:alice",
                "balance": 100,
                "held": 30,
                "incoming": 5,
                "available": 70,
                "floor": -10,
                "ceiling": ceiling,
                "position": 17,
                "log_time_ms": 1_700_000_000_123_u64,
            }),
        );
        if ceiling.is_none() {
            assert_eq!(
                text,
                r#"{"account":"wallet:alice","available":70,"balance":100,"ceiling":null,"floor":-10,"held":30,"incoming":5,"log_time_ms":1700000000123,"position":17,"status":"found"}"#
            );
        }
    }
    let text = check(
        &BalanceAnswer::Unknown(at),
        &json!({"status": "unknown", "position": 17, "log_time_ms": 1_700_000_000_123_u64}),
    );
    assert_eq!(
        text,
        r#"{"log_time_ms":1700000000123,"position":17,"status":"unknown"}"#
    );
    check(
        &BalanceAnswer::from(ErrorAnswer::new("the lookup failed: io")),
        &json!({"status": "error", "detail": "the lookup failed: io"}),
    );
}

#[test]
fn claim_answers_are_as_before() {
    // Proves the claim query's answers (claimed, final or tentative; free; error) encode exactly as before, with the namespace, key, position and log time the service added to each.
    let namespace = Namespace::new("seat").expect("a namespace");
    let key = ClaimKey::new("12A").expect("a key");
    for tentative in [false, true] {
        let text = check(
            &ClaimAnswer::Claimed(Claimed {
                owner: Owner::new("carol").expect("an owner"),
                tentative,
                namespace: namespace.clone(),
                key: key.clone(),
                position: 9,
                log_time_ms: 1_000,
            }),
            &json!({
                "status": "claimed",
                "owner": "carol",
                "tentative": tentative,
                "namespace": "seat",
                "key": "12A",
                "position": 9,
                "log_time_ms": 1_000,
            }),
        );
        if !tentative {
            assert_eq!(
                text,
                r#"{"key":"12A","log_time_ms":1000,"namespace":"seat","owner":"carol","position":9,"status":"claimed","tentative":false}"#
            );
        }
    }
    let text = check(
        &ClaimAnswer::Free(Free {
            namespace,
            key,
            position: 9,
            log_time_ms: 1_000,
        }),
        &json!({"status": "free", "namespace": "seat", "key": "12A", "position": 9, "log_time_ms": 1_000}),
    );
    assert_eq!(
        text,
        r#"{"key":"12A","log_time_ms":1000,"namespace":"seat","position":9,"status":"free"}"#
    );
    check(
        &ClaimAnswer::from(ErrorAnswer::new("the claim belongs to partition 1, not 0")),
        &json!({"status": "error", "detail": "the claim belongs to partition 1, not 0"}),
    );
}

#[test]
fn stats_answers_are_as_before() {
    // Proves the stats endpoint's answers encode exactly as before: detail, last_sequence and lag always present (null when absent), stream_error only when the stream could not be read; owner (epoch, host, pid) only when the partition has an ownership record, owner_error only when it could not be read.
    let running = PartitionStats {
        partition: 1,
        state: PartitionState::Running,
        detail: None,
        restarts: 0,
        applied_position: 40,
        log_time_ms: 1_000,
        last_sequence: Some(42),
        lag: Some(2),
        stream_error: None,
        owner: Some(PartitionOwner {
            epoch: 7,
            host: "box-1".to_owned(),
            pid: 4242,
        }),
        owner_error: None,
    };
    let text = check(
        &StatsAnswer::Ok(running),
        &json!({
            "status": "ok",
            "partition": 1,
            "state": "running",
            "detail": null,
            "restarts": 0,
            "applied_position": 40,
            "log_time_ms": 1_000,
            "last_sequence": 42,
            "lag": 2,
            "owner": {"epoch": 7, "host": "box-1", "pid": 4242},
        }),
    );
    assert_eq!(
        text,
        r#"{"applied_position":40,"detail":null,"lag":2,"last_sequence":42,"log_time_ms":1000,"owner":{"epoch":7,"host":"box-1","pid":4242},"partition":1,"restarts":0,"state":"running","status":"ok"}"#
    );
    let stopped = PartitionStats {
        partition: 0,
        state: PartitionState::Stopped,
        detail: Some("the log went backwards".to_owned()),
        restarts: 3,
        applied_position: 1_000_000,
        log_time_ms: 1,
        last_sequence: None,
        lag: None,
        stream_error: Some("timed out".to_owned()),
        owner: None,
        owner_error: Some("timed out".to_owned()),
    };
    let text = check(
        &StatsAnswer::Ok(stopped),
        &json!({
            "status": "ok",
            "partition": 0,
            "state": "stopped",
            "detail": "the log went backwards",
            "restarts": 3,
            "applied_position": 1_000_000,
            "log_time_ms": 1,
            "last_sequence": null,
            "lag": null,
            "stream_error": "timed out",
            "owner_error": "timed out",
        }),
    );
    assert_eq!(
        text,
        r#"{"applied_position":1000000,"detail":"the log went backwards","lag":null,"last_sequence":null,"log_time_ms":1,"owner_error":"timed out","partition":0,"restarts":3,"state":"stopped","status":"ok","stream_error":"timed out"}"#
    );
    for state in PartitionState::ALL {
        assert_eq!(
            serde_json::to_value(state).expect("json"),
            json!(state.name())
        );
    }
    assert_eq!(
        PartitionState::ALL.map(PartitionState::name),
        ["running", "restarting", "stopped"]
    );
    check(
        &StatsAnswer::from(ErrorAnswer::new("amends.stats.9 names no partition")),
        &json!({"status": "error", "detail": "amends.stats.9 names no partition"}),
    );
}

#[test]
fn older_answers_still_read() {
    // Proves a client reads the answers of a service from before `incoming` and `tentative` existed (both default), and ignores fields it does not know.
    let old: BalanceAnswer = serde_json::from_str(
        r#"{"status":"found","account":"a","balance":1,"held":0,"available":1,"floor":0,"ceiling":null,"position":1,"log_time_ms":2,"new_field":true}"#,
    )
    .expect("an older balance answer");
    let BalanceAnswer::Found(balance) = old else {
        panic!("not found: {old:?}")
    };
    assert_eq!(balance.incoming, 0);
    let old: ClaimAnswer = serde_json::from_str(
        r#"{"status":"claimed","owner":"o","namespace":"n","key":"k","position":1,"log_time_ms":2}"#,
    )
    .expect("an older claim answer");
    assert!(matches!(
        old,
        ClaimAnswer::Claimed(Claimed {
            tentative: false,
            ..
        })
    ));
    let unknown: StatusAnswer =
        serde_json::from_str(r#"{"status":"unknown","position":5}"#).expect("unknown");
    assert_eq!(unknown, StatusAnswer::Unknown);
    assert!(serde_json::from_str::<StatusAnswer>(r#"{"status":"maybe"}"#).is_err());
}

#[test]
fn query_requests_are_read_as_before() {
    // Proves the request bodies are read with the service's error texts: an op id only in canonical text, an account id, a claim query of exactly two valid text fields; and the client's claim query body is what the service reads.
    assert_eq!(query::parse_op_id(OP), Ok(op_id()));
    for bad in [
        "",
        "x",
        &OP.to_uppercase(),
        &format!(" {OP}"),
        &OP.replace('-', ""),
    ] {
        assert_eq!(
            query::parse_op_id(bad),
            Err(ErrorAnswer::new(format!(
                "{bad:?} is not an op id in canonical text"
            ))),
        );
    }
    assert_eq!(
        query::parse_account("alice").map(|a| a.as_str().to_owned()),
        Ok("alice".to_owned())
    );
    assert_eq!(
        query::parse_account(""),
        Err(ErrorAnswer::new(
            "\"\" is not an account id: account must not be empty"
        ))
    );
    assert_eq!(
        query::body_text(b"\xff"),
        Err(ErrorAnswer::new("the body is not UTF-8"))
    );
    assert_eq!(query::body_text(b"ok"), Ok("ok"));

    let claim = ClaimQuery {
        namespace: Namespace::new("seat").expect("a namespace"),
        key: ClaimKey::new("12A").expect("a key"),
    };
    let body = query::encode(&claim);
    assert_eq!(body, br#"{"key":"12A","namespace":"seat"}"#);
    assert_eq!(
        ClaimQuery::parse(std::str::from_utf8(&body).expect("UTF-8")),
        Ok(claim)
    );
    let shape = ErrorAnswer::new("the body must be {\"namespace\": <text>, \"key\": <text>}");
    for bad in [
        "",
        "[]",
        r#"{"namespace":"seat"}"#,
        r#"{"namespace":"seat","key":1}"#,
        r#"{"namespace":"seat","key":"k","x":1}"#,
        r#"["seat","k"]"#,
    ] {
        assert_eq!(ClaimQuery::parse(bad), Err(shape.clone()), "{bad}");
    }
    assert_eq!(
        ClaimQuery::parse(r#"{"namespace":"","key":"k"}"#),
        Err(ErrorAnswer::new("namespace must not be empty"))
    );
    assert_eq!(
        ClaimQuery::parse(r#"{"namespace":"n","key":"k\n"}"#),
        Err(ErrorAnswer::new("key must not contain control characters"))
    );
}
