//! Proves `Machine::take`, the one entry of a raw log message into the
//! machine: a readable message is applied exactly as
//! `Machine::apply_with_reply` applies its decoded input, and an unreadable
//! one becomes an `Effect::DeadLetter` (its position, bytes and detail)
//! while only the clock moves. Each property runs over a state built by a
//! random prefix of readable messages (accounts, credits, holds that may
//! be due, claims), so a dead letter meets pending expiries too.

use amends_core::OpId;
use amends_core::partition::{Config, DeadLetter, Effect, Fault, LogMessage, Machine, Taken};
use amends_core::route::Partitions;
use amends_core::state::{Clock, MemState};
use amends_core::wire;
use proptest::prelude::*;

/// Log time of the first message; op ids are v7 ids near it.
const T0: u64 = 1_800_000_000_000;

fn machine() -> Machine {
    let one = Partitions::new(1).expect("a count");
    Machine::new(one.id(0).expect("partition 0"), one, Config::default())
}

fn op(n: u64) -> OpId {
    OpId::v7_from_parts(T0, u128::from(n))
}

/// A readable request body: what the `i`th message of a prefix says.
fn readable(i: u64, kind: u8, amount: u64) -> Vec<u8> {
    let id = op(i);
    let command = match kind % 5 {
        0 => serde_json::json!({"type": "open_account", "account": "a"}),
        1 => serde_json::json!({"type": "credit", "account": "a", "amount": amount}),
        2 => serde_json::json!({"type": "debit", "account": "a", "amount": amount}),
        3 => {
            serde_json::json!({"type": "hold", "account": "a", "amount": amount, "timeout_ms": amount})
        }
        _ => {
            serde_json::json!({"type": "claim", "namespace": "seat", "key": "1", "owner": format!("o{amount}")})
        }
    };
    serde_json::to_vec(&serde_json::json!({"op_id": id, "command": command})).expect("json")
}

/// The state after applying `prefix` (kind, amount, time step) from
/// position 1 on; returns it with the next position and log time.
fn state_after(prefix: &[(u8, u64, u64)]) -> (MemState, u64, u64) {
    let machine = machine();
    let mut state = MemState::new();
    let mut time = T0;
    let mut position = 0;
    for (i, &(kind, amount, step)) in (1..).zip(prefix) {
        position = i;
        time += step;
        let bytes = readable(i, kind, amount);
        let message = LogMessage {
            bytes: &bytes,
            position,
            log_time_ms: time,
            reply_to: None,
        };
        let mut out = Vec::new();
        let taken = machine
            .take(&mut state, &message, &mut out)
            .expect("a readable prefix applies");
        assert!(matches!(taken, Taken::Applied { .. }), "{taken:?}");
    }
    (state, position + 1, time)
}

fn prefix() -> impl Strategy<Value = Vec<(u8, u64, u64)>> {
    prop::collection::vec((any::<u8>(), 1_u64..50, 0_u64..40), 0..24)
}

/// Bytes with no readable op id: arbitrary bytes, or JSON that is close.
fn unreadable() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        Just(b"not json at all".to_vec()),
        Just(br#"["01900000-0000-7000-8000-000000000001",{"type":"tick"}]"#.to_vec()),
        Just(br#"{"op_id":"nope","command":{"type":"tick"}}"#.to_vec()),
        Just(br#"{"command":{"type":"tick"}}"#.to_vec()),
    ]
    .prop_filter("no readable op id", |b| wire::decode_request(b).is_err())
}

proptest! {
    #[test]
    fn a_dead_letter_is_an_effect_and_only_the_clock_moves(
        prefix in prefix(),
        bytes in unreadable(),
        gap in 0_u64..3,
        later in 0_u64..1_000,
        earlier in 0_u64..1_000,
        back in any::<bool>(),
    ) {
        // A dead letter after any prefix: the one effect is the dead letter, the clock takes its position and (never going back) its log time, no hold expires, nothing else changes.
        let (mut state, next, time) = state_after(&prefix);
        let before = state.clone();
        let position = next + gap;
        let log_time_ms = if back { time.saturating_sub(earlier) } else { time + later };
        let message = LogMessage { bytes: &bytes, position, log_time_ms, reply_to: Some("_INBOX.x") };
        let mut out = Vec::new();
        let taken = machine().take(&mut state, &message, &mut out).expect("a dead letter is taken");
        prop_assert_eq!(taken.decision(), None);
        prop_assert_eq!(taken, Taken::DeadLetter);
        let detail = wire::decode_request(&bytes).expect_err("unreadable").detail;
        prop_assert_eq!(out, vec![Effect::DeadLetter(DeadLetter { position, detail, bytes: bytes.clone() })]);
        let mut expected = before.clone();
        use amends_core::state::Write as _;
        expected.set_clock(Clock { position, log_time_ms: before.clock().log_time_ms.max(log_time_ms) });
        prop_assert_eq!(state, expected);
    }

    #[test]
    fn a_readable_message_is_taken_as_apply_with_reply_applies_it(
        prefix in prefix(),
        kind in any::<u8>(),
        amount in 1_u64..50,
        step in 0_u64..1_000,
        reply in prop::option::of(prop_oneof![Just("_INBOX.a.1"), Just("bad subject")]),
    ) {
        // The same message through `take` (raw bytes) and through `apply_with_reply` (decoded first): the same answer, effects and state.
        let (state, position, time) = state_after(&prefix);
        let bytes = readable(position, kind, amount);
        let log_time_ms = time + step;
        let mut taken_state = state.clone();
        let mut taken_out = Vec::new();
        let taken = machine()
            .take(&mut taken_state, &LogMessage { bytes: &bytes, position, log_time_ms, reply_to: reply }, &mut taken_out)
            .expect("applies");
        let input = wire::decode_request(&bytes).expect("readable");
        let mut applied_state = state;
        let mut applied_out = Vec::new();
        let answer = machine()
            .apply_with_reply(&mut applied_state, position, log_time_ms, &input, reply, &mut applied_out)
            .expect("applies");
        prop_assert_eq!(taken, Taken::Applied { input, answer });
        prop_assert_eq!(taken_out, applied_out);
        prop_assert_eq!(taken_state, applied_state);
    }

    #[test]
    fn a_dead_letter_at_or_below_the_applied_position_is_a_fault_and_changes_nothing(
        prefix in prefix(),
        bytes in unreadable(),
        below in 0_u64..3,
    ) {
        // The log went backwards under a dead letter as under any message: Fault::PositionNotAdvancing, no effect, the state untouched.
        let (mut state, next, time) = state_after(&prefix);
        let applied = next - 1;
        let position = applied.saturating_sub(below);
        let before = state.clone();
        let mut out = Vec::new();
        let got = machine().take(&mut state, &LogMessage { bytes: &bytes, position, log_time_ms: time, reply_to: None }, &mut out);
        prop_assert_eq!(got, Err(Fault::PositionNotAdvancing { applied, got: position }));
        prop_assert!(out.is_empty());
        prop_assert_eq!(state, before);
    }
}
