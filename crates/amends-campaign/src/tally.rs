//! The campaign's per-op figures, from what the streams hold at the end:
//! which of its ops reached the log, which were decided, which were
//! decided more than once or differently.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

/// The figures of one scenario's ops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Ops the campaign made.
    pub ops: usize,
    /// Of those, ops acknowledged by JetStream: their op id is a
    /// `Nats-Msg-Id` on the requests stream.
    pub submitted: usize,
    /// Submitted ops with a decision on the decisions stream.
    pub decided: usize,
    /// Submitted ops with no decision on the decisions stream.
    pub lost: usize,
    /// Ids (of any op or hold-expired event on the decisions stream,
    /// derived saga steps included) with more than one message there.
    pub doubled: usize,
    /// Of the doubled, those whose messages are not all equal.
    pub contradictory: usize,
    /// Ops whose client gave up (no decision after every try).
    pub unanswered: usize,
    /// Ops whose client got a final decision other than the one on the
    /// decisions stream.
    pub mismatched: usize,
}

impl Tally {
    /// Whether nothing was lost, doubled, contradicted or mismatched.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.doubled == 0 && self.contradictory == 0 && self.mismatched == 0
    }

    /// Adds `other`'s figures to these.
    pub fn add(&mut self, other: &Tally) {
        self.ops += other.ops;
        self.submitted += other.submitted;
        self.decided += other.decided;
        self.lost += other.lost;
        self.doubled += other.doubled;
        self.contradictory += other.contradictory;
        self.unanswered += other.unanswered;
        self.mismatched += other.mismatched;
    }
}

/// Classifies the campaign's `ops` (op id → the decision its client got,
/// `None` if it gave up) against the `Nats-Msg-Id`s of the requests stream
/// and the decisions stream grouped by id.
pub fn classify(
    ops: &HashMap<String, Option<Value>>,
    in_log: &HashSet<String>,
    by_op: &BTreeMap<String, Vec<Value>>,
) -> Tally {
    let mut tally = Tally {
        ops: ops.len(),
        ..Tally::default()
    };
    for (op_id, answer) in ops {
        let published = by_op.get(op_id).map(Vec::as_slice).unwrap_or_default();
        if answer.is_none() {
            tally.unanswered += 1;
        }
        if let (Some(answer), Some(first)) = (answer, published.first())
            && answer["outcome"] != "in_flight"
            && answer != first
        {
            tally.mismatched += 1;
        }
        if !in_log.contains(op_id) {
            continue;
        }
        tally.submitted += 1;
        if published.is_empty() {
            tally.lost += 1;
        } else {
            tally.decided += 1;
        }
    }
    for messages in by_op.values() {
        if messages.len() > 1 {
            tally.doubled += 1;
            if messages.iter().any(|m| m != &messages[0]) {
                tally.contradictory += 1;
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decision(op: &str, outcome: &str, position: u64) -> Value {
        json!({"op_id": op, "partition": 0, "position": position, "outcome": outcome})
    }

    #[test]
    fn lost_doubled_contradictory_and_mismatched_are_told_apart() {
        let once = decision("once", "confirmed", 1);
        let twice = decision("twice", "confirmed", 2);
        let a = decision("contra", "confirmed", 3);
        let b = decision("contra", "rejected", 3);
        let ops: HashMap<String, Option<Value>> = [
            ("once".to_owned(), Some(once.clone())),
            ("twice".to_owned(), Some(twice.clone())),
            ("contra".to_owned(), Some(b.clone())),
            // In the log, never decided, its client gave up: lost.
            ("lost".to_owned(), None),
            // Never acknowledged (not in the log): neither submitted nor lost.
            ("unacked".to_owned(), None),
            // Answered in flight (a saga), not compared.
            ("saga".to_owned(), Some(json!({"outcome": "in_flight"}))),
        ]
        .into_iter()
        .collect();
        let in_log: HashSet<String> = ["once", "twice", "contra", "lost", "saga"]
            .map(str::to_owned)
            .into();
        let by_op: BTreeMap<String, Vec<Value>> = [
            ("once".to_owned(), vec![once]),
            ("twice".to_owned(), vec![twice.clone(), twice]),
            ("contra".to_owned(), vec![a, b]),
            ("saga".to_owned(), vec![decision("saga", "confirmed", 9)]),
            // A derived step id decided twice counts as doubled too.
            (
                "step".to_owned(),
                vec![
                    decision("step", "confirmed", 5),
                    decision("step", "confirmed", 6),
                ],
            ),
        ]
        .into_iter()
        .collect();

        let tally = classify(&ops, &in_log, &by_op);
        assert_eq!(
            tally,
            Tally {
                ops: 6,
                submitted: 5,
                decided: 4,
                lost: 1,
                doubled: 3,
                contradictory: 2,
                unanswered: 2,
                // "contra": its client got the rejection, the stream's first is
                // the confirmation.
                mismatched: 1,
            }
        );
        assert!(!tally.clean());
    }

    #[test]
    fn one_decision_per_submitted_op_is_clean() {
        let d = decision("x", "rejected", 4);
        let ops = [("x".to_owned(), Some(d.clone()))].into_iter().collect();
        let in_log = ["x".to_owned()].into();
        let by_op = [("x".to_owned(), vec![d])].into_iter().collect();
        let tally = classify(&ops, &in_log, &by_op);
        assert!(tally.clean(), "{tally:?}");
        assert_eq!((tally.submitted, tally.decided), (1, 1));
    }
}
