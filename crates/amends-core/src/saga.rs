//! Sagas: work across partitions without distributed transactions.
//!
//! A saga (a `saga` request, or the built-in `transfer`) lives in the
//! partition of its op id. That partition keeps a [`crate::state::Saga`]
//! record and drives the steps one at a time by appending messages to the
//! steps' partitions through the outbox ([`crate::partition::Effect::Send`]):
//!
//! 1. **try** step 0, wait for its outcome (a `step_outcome` message back),
//!    then try step 1, and so on. Debits are tried as holds, credits as
//!    reservations against the ceiling, claims as tentative claims: nothing
//!    is visible yet. Other steps (`open_account`, `hold`, `post`, `void`,
//!    `release`) take effect at once.
//! 2. When every try succeeded: **confirm** every debit, credit and claim
//!    (post the hold, apply the credit, make the claim final). A confirm
//!    cannot fail, so the saga is confirmed as soon as they are sent.
//! 3. When a try is refused, or the deadline passes first: **cancel** the
//!    steps already tried (and the one in flight), in reverse order: void
//!    the hold, drop the reservation or the tentative claim, or run the
//!    step's explicit `compensation`. Undoing a reservation cannot fail; an
//!    explicit compensation is an ordinary operation and can be refused
//!    (say, a key re-claimed by someone else meanwhile): its decision is
//!    recorded under the cancel's op id, for `status` and audit.
//!
//! Every step message has an op id derived from the saga's
//! ([`step_id`], [`outcome_id`]), so duplicates and re-publication after a
//! crash are harmless: each is decided once, like any operation. Messages of
//! different partitions arrive in any order; a cancel that arrives before
//! its try is recorded, and the late try is then refused
//! (`saga_cancelled`), so a cancelled step never takes effect.
//!
//! The partition driver needs no saga knowledge beyond publishing the
//! outbox: all of this is decided in [`crate::partition::Machine::apply`].

use std::borrow::Cow;

use crate::command::{Command, Phase, Request, SAGA_DEADLINE_MS_DEFAULT, SagaStep};
use crate::decision::Outcome;
use crate::id::OpId;

/// The op id of phase `phase` of step `index` of saga `saga`: derived from
/// the saga's id with the label `step/<index>/<phase>`.
pub fn step_id(saga: OpId, index: u32, phase: Phase) -> OpId {
    saga.derive(&format!("step/{index}/{}", phase.label()))
}

/// The op id of the outcome of step `index`'s try: derived from the saga's
/// id with the label `step/<index>/outcome`.
pub fn outcome_id(saga: OpId, index: u32) -> OpId {
    saga.derive(&format!("step/{index}/outcome"))
}

/// The message carrying phase `phase` of step `index` of saga `saga`, with
/// its derived op id: what the saga's partition appends to the step's.
pub fn step_request(saga: OpId, index: u32, phase: Phase, step: SagaStep) -> Request {
    Request {
        op_id: step_id(saga, index, phase),
        command: Command::Step {
            saga,
            index,
            phase,
            step,
        },
        apology_topic: None,
    }
}

/// The message carrying the outcome of step `index`'s try, with its derived
/// op id: what the step's partition appends to the saga's.
pub fn outcome_request(saga: OpId, index: u32, outcome: Outcome) -> Request {
    Request {
        op_id: outcome_id(saga, index),
        command: Command::StepOutcome {
            saga,
            index,
            outcome,
        },
        apology_topic: None,
    }
}

/// The steps of a `transfer` or `saga` command, in order (borrowed from a
/// `saga`; a transfer's two are built); empty for any other command. A
/// transfer is a debit of `from` then a credit of `to`.
pub fn steps(command: &Command) -> Cow<'_, [SagaStep]> {
    match command {
        Command::Transfer {
            from, to, amount, ..
        } => Cow::Owned(vec![
            SagaStep {
                command: Box::new(Command::Debit {
                    account: from.clone(),
                    amount: *amount,
                }),
                compensation: None,
            },
            SagaStep {
                command: Box::new(Command::Credit {
                    account: to.clone(),
                    amount: *amount,
                }),
                compensation: None,
            },
        ]),
        Command::Saga { steps, .. } => Cow::Borrowed(steps.as_slice()),
        _ => Cow::Borrowed(&[]),
    }
}

/// How long (log time, ms) a `transfer` or `saga` may run before it is
/// cancelled.
pub fn deadline_ms(command: &Command) -> u64 {
    match command {
        Command::Transfer { deadline_ms, .. } | Command::Saga { deadline_ms, .. } => {
            deadline_ms.map_or(SAGA_DEADLINE_MS_DEFAULT, |d| d.get())
        }
        _ => SAGA_DEADLINE_MS_DEFAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{AccountId, Amount, ClaimKey, FieldError, Namespace, Owner};

    fn release() -> Command {
        Command::Release {
            namespace: Namespace::new("seat").expect("valid"),
            key: ClaimKey::new("12A").expect("valid"),
            owner: Owner::new("ann").expect("valid"),
        }
    }

    fn hold() -> Command {
        Command::Hold {
            account: AccountId::new("a").expect("valid"),
            amount: Amount::new(1).expect("valid"),
            timeout_ms: None,
        }
    }

    #[test]
    fn steps_and_compensations_that_could_never_end_are_refused() {
        // Proves a hold is neither a step nor a compensation (its derived id would leave a hold no client can end), while a release with a same-key claim as compensation is accepted.
        assert!(matches!(
            SagaStep::new(hold(), None),
            Err(FieldError::StepKind { kind: "hold" })
        ));
        assert!(matches!(
            SagaStep::new(release(), Some(hold())),
            Err(FieldError::Compensation { .. })
        ));
        let claim = Command::Claim {
            namespace: Namespace::new("seat").expect("valid"),
            key: ClaimKey::new("12A").expect("valid"),
            owner: Owner::new("ann").expect("valid"),
        };
        assert!(SagaStep::new(release(), Some(claim)).is_ok());
    }

    #[test]
    fn step_ids_are_distinct_per_step_and_phase() {
        // Proves the derived ids of a saga's messages never collide: every (step, phase) and every outcome has its own.
        let saga = OpId::v7_from_parts(1_700_000_000_000, 7);
        let mut ids = std::collections::BTreeSet::new();
        for i in 0..16 {
            for phase in [Phase::Try, Phase::Confirm, Phase::Cancel] {
                assert!(ids.insert(step_id(saga, i, phase)));
            }
            assert!(ids.insert(outcome_id(saga, i)));
        }
        assert!(!ids.contains(&saga));
    }
}
