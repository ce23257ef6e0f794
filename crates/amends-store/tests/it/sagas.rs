//! Sagas in the store: the saga record, its dedup record rewritten as it
//! moves on (in-flight, then final), the saga reasons and the `send` and
//! `reply` outbox entries survive commit and reopen, and ended sagas are
//! compacted.

use amends_core::command::{AccountId, Amount, Command, DeadlineMs, Request};
use amends_core::decision::{Outcome, Reason};
use amends_core::id::OpId;
use amends_core::partition::Effect;
use amends_core::route;
use amends_core::saga;
use amends_core::state::{Read, SagaState};
use amends_core::wire;
use amends_store::{OutboxSeq, Partition, PartitionStore};

use crate::support::{self, Msg, Runner};

/// An account that the test's partitions place away from the tested one,
/// so that its saga steps go through the outbox.
fn remote_account(skip: usize) -> AccountId {
    (0..)
        .map(|n| AccountId::new(format!("remote-{n}")).expect("valid id"))
        .filter(|a| {
            route::partition_of(a.as_str(), support::partitions()) != support::partition_id()
        })
        .nth(skip)
        .expect("some account is remote")
}

fn msg(position: u64, request: &Request, reply_to: Option<&str>) -> Msg {
    Msg {
        position,
        log_time_ms: support::T0_MS + position * 10,
        bytes: wire::encode(request),
        reply_to: reply_to.map(str::to_owned),
    }
}

fn outcome_msg(position: u64, saga_id: OpId, index: u32, outcome: Outcome) -> Msg {
    msg(
        position,
        &saga::outcome_request(saga_id, index, outcome),
        None,
    )
}

/// Every outbox entry of `p` still unconfirmed.
fn outbox(p: &Partition) -> Vec<Effect> {
    p.outbox_read(OutboxSeq(0), 1_000)
        .expect("outbox")
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

#[test]
fn a_saga_moves_on_across_batches_and_survives_reopen() {
    // Proves that a transfer's saga record and its in-flight dedup record,
    // rewritten in later batches as outcomes arrive (step 0 confirmed, step
    // 1 refused), read back after each reopen as the machine wrote them:
    // the final decision carries a nested `step_refused` reason, the
    // outbox holds the `send` of each step and the final `reply`, and the
    // whole stored state equals an in-memory run; then compaction past the
    // horizon drops the ended saga.
    let dir = tempfile::tempdir().expect("tempdir");
    let saga_id = support::saga_id_here(support::T0_MS, 42);
    let transfer = Request {
        op_id: saga_id,
        command: Command::Transfer {
            from: remote_account(0),
            to: remote_account(1),
            amount: Amount::new(5).expect("amount"),
            deadline_ms: Some(DeadlineMs::new(5_000).expect("deadline")),
        },
        apology_topic: None,
    };
    let refusal = Reason::CeilingExceeded {
        balance: 1,
        ceiling: 2,
        requested: 5,
    };
    let batches = [
        vec![msg(1, &transfer, Some("_INBOX.client.1"))],
        vec![outcome_msg(2, saga_id, 0, Outcome::confirmed())],
        vec![outcome_msg(
            3,
            saga_id,
            1,
            Outcome::Rejected {
                reason: refusal.clone(),
            },
        )],
    ];
    let mut runner = Runner::new();
    let mut all = Vec::new();
    for (i, batch) in batches.iter().enumerate() {
        {
            let (_store, p) = support::open(dir.path());
            runner.batch(&p, batch);
        }
        all.extend(batch.iter().cloned());
        // Reopened: what the next batch reads is what was committed.
        let (_store, p) = support::open(dir.path());
        let s = p.saga(saga_id).expect("read").expect("the saga is stored");
        let d = p
            .dedup(saga_id)
            .expect("read")
            .expect("the saga's dedup record is stored");
        assert_eq!(s.reply_to.as_deref(), Some("_INBOX.client.1"));
        let effects = outbox(&p);
        let send = |index: u32| {
            effects.iter().any(|e| {
                matches!(e, Effect::Send { request, .. }
                    if request.op_id == saga::step_id(saga_id, index, amends_core::command::Phase::Try))
            })
        };
        match i {
            0 => {
                assert_eq!(s.state, SagaState::Trying { step: 0 });
                assert_eq!(d.decision.outcome, Outcome::InFlight { step: 0 });
                assert!(send(0), "step 0's try is in the outbox: {effects:?}");
            }
            1 => {
                assert_eq!(s.state, SagaState::Trying { step: 1 });
                assert_eq!(d.decision.outcome, Outcome::InFlight { step: 1 });
                assert!(send(1), "step 1's try is in the outbox: {effects:?}");
            }
            _ => {
                assert!(matches!(s.state, SagaState::Cancelled { .. }), "{s:?}");
                let want = Reason::StepRefused {
                    step: 1,
                    reason: Box::new(refusal.clone()),
                };
                assert_eq!(d.decision.outcome, Outcome::Rejected { reason: want });
                assert!(
                    effects
                        .iter()
                        .any(|e| matches!(e, Effect::Reply { to, decision }
                        if to == "_INBOX.client.1" && *decision == d.decision)),
                    "the final decision is in the outbox as a reply: {effects:?}"
                );
            }
        }
        // Every record decodes and the state is the in-memory run's.
        let (mem, mem_effects) = support::reference(&all);
        assert_eq!(effects, mem_effects, "outbox after batch {i}");
        let stored = p.to_mem_state().expect("decode");
        support::check_invariants(&stored);
        support::assert_same_state(&stored, &mem, &format!("after batch {i}"));
    }

    let (_store, p) = support::open(dir.path());
    let ended_ms = support::T0_MS + 30;
    let kept = p.compact(ended_ms).expect("compact");
    assert_eq!(
        kept.sagas, 0,
        "an ended saga is kept until the horizon passes it"
    );
    assert!(p.saga(saga_id).expect("read").is_some());
    let done = p.compact(ended_ms + 1).expect("compact");
    assert_eq!(done.sagas, 1, "{done:?}");
    assert!(
        p.saga(saga_id).expect("read").is_none(),
        "the ended saga was compacted"
    );
    let (mut mem, _) = support::reference(&all);
    mem.compact(ended_ms + 1);
    support::assert_same_state(&p.to_mem_state().expect("decode"), &mem, "compacted");
}

#[test]
fn a_saga_in_flight_is_never_compacted() {
    // Proves that compaction, at any horizon, keeps a saga still in flight
    // (and its expiry entry), while its deadline is what ends it.
    let dir = tempfile::tempdir().expect("tempdir");
    let saga_id = support::saga_id_here(support::T0_MS, 7);
    let transfer = Request {
        op_id: saga_id,
        command: Command::Transfer {
            from: remote_account(0),
            to: remote_account(1),
            amount: Amount::new(5).expect("amount"),
            deadline_ms: Some(DeadlineMs::new(1_000).expect("deadline")),
        },
        apology_topic: None,
    };
    let (_store, p) = support::open(dir.path());
    let mut runner = Runner::new();
    runner.batch(&p, &[msg(1, &transfer, None)]);
    let done = p.compact(u64::MAX).expect("compact");
    assert_eq!(done.sagas, 0, "{done:?}");
    let s = p.saga(saga_id).expect("read").expect("kept");
    assert_eq!(s.state, SagaState::Trying { step: 0 });
    assert!(
        p.expiry_after(None)
            .expect("read")
            .is_some_and(|k| k.id == saga_id)
    );
}

/// Applies `m` to `p` as one committed batch; returns its answer.
fn apply_one(p: &Partition, m: &Msg) -> amends_core::partition::Answer {
    let machine = support::machine();
    let mut changes = amends_core::state::ChangeSet::default();
    let mut effects = Vec::new();
    let input = wire::decode_request(&m.bytes).expect("a readable request");
    let answer = machine
        .apply_with_reply(
            &mut amends_core::state::Overlay::new(p, &mut changes),
            m.position,
            m.log_time_ms,
            &input,
            m.reply_to.as_deref(),
            &mut effects,
        )
        .expect("the log advances over a readable store");
    p.commit(&changes, &effects).expect("commit");
    answer
}

#[test]
fn a_resubmitted_saga_is_the_same_op_in_flight_and_after_it_ends() {
    // Proves a saga's fingerprint survives the store: a saga with a
    // compensated step, committed in flight and reopened, resubmitted as
    // other JSON (keys in another order, default fields spelled out) is a
    // duplicate of its in-flight decision (not an op_id_conflict) and moves
    // its reply to the new subject; once it ends, the fingerprint the
    // machine made again from the saga record decoded from the store is the
    // request's, so a resubmission then is a duplicate of the final
    // decision.
    use amends_core::partition::Answer;
    let dir = tempfile::tempdir().expect("tempdir");
    let saga_id = support::saga_id_here(support::T0_MS, 11);
    let (from, to) = (remote_account(0), remote_account(1));
    let body = format!(
        r#"{{"op_id":"{saga_id}","command":{{"type":"saga","steps":[
            {{"command":{{"type":"open_account","account":"{to}"}}}},
            {{"command":{{"type":"post","account":"{from}","hold":"{saga_id}","amount":2}},
              "compensation":{{"type":"credit","account":"{from}","amount":2}}}}]}}}}"#
    );
    let relaid = format!(
        r#"{{ "command" : {{ "deadline_ms" : null, "steps" : [
            {{ "compensation" : null, "command" : {{ "ceiling" : null, "floor" : 0, "account" : "{to}", "type" : "open_account" }} }},
            {{ "compensation" : {{ "amount" : 2, "account" : "{from}", "type" : "credit" }},
               "command" : {{ "amount" : 2, "hold" : "{saga_id}", "account" : "{from}", "type" : "post" }} }} ],
            "type" : "saga" }}, "apology_topic" : null, "op_id" : "{saga_id}" }}"#
    );
    let request: Request = serde_json::from_str(&body).expect("a valid saga");
    let again: Request = serde_json::from_str(&relaid).expect("the same saga");
    assert_eq!(request, again);
    let at = |position: u64, bytes: &str, reply_to: &str| Msg {
        position,
        log_time_ms: support::T0_MS + position * 10,
        bytes: bytes.as_bytes().to_vec(),
        reply_to: Some(reply_to.to_owned()),
    };
    {
        let (_store, p) = support::open(dir.path());
        let answer = apply_one(&p, &at(1, &body, "_INBOX.first"));
        assert!(matches!(answer, Answer::Accepted(_)), "{answer:?}");
    }
    let (_store, p) = support::open(dir.path());
    let stored = p.dedup(saga_id).expect("read").expect("a dedup record");
    assert_eq!(stored.fingerprint, request.fingerprint());
    let in_flight = apply_one(&p, &at(2, &relaid, "_INBOX.second"));
    assert!(
        matches!(&in_flight, Answer::Duplicate(d) if d.outcome == Outcome::InFlight { step: 0 }),
        "{in_flight:?}"
    );
    let s = p.saga(saga_id).expect("read").expect("the saga");
    assert_eq!(s.reply_to.as_deref(), Some("_INBOX.second"));

    // Step 0 confirmed, step 1 refused: the saga is cancelled, its step 0
    // needs no cancel, and the final decision goes to the second subject.
    apply_one(&p, &outcome_msg(3, saga_id, 0, Outcome::confirmed()));
    let refused = Outcome::Rejected {
        reason: Reason::HoldNotFound,
    };
    drop((_store, p));
    let (_store, p) = support::open(dir.path());
    apply_one(&p, &outcome_msg(4, saga_id, 1, refused));
    let last = outbox(&p);
    let final_decision = p.dedup(saga_id).expect("read").expect("a dedup record");
    assert!(final_decision.decision.outcome.is_final());
    assert_eq!(final_decision.fingerprint, request.fingerprint());
    assert!(
        last.iter()
            .any(|e| matches!(e, Effect::Reply { to, decision }
            if to == "_INBOX.second" && *decision == final_decision.decision)),
        "{last:?}"
    );
    let after = apply_one(&p, &at(5, &relaid, "_INBOX.third"));
    assert_eq!(after, Answer::Duplicate(final_decision.decision));
}
