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
//!    is visible yet. Other steps (`open_account`, `post`, `void`,
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
//! outbox: all of this is decided in [`crate::partition::Machine::apply`],
//! by the saga side of the machine in this module (starting a saga,
//! deciding its steps on their partitions, moving it on as outcomes arrive,
//! cancelling at its deadline). This module is also `amends_core::saga`.

use std::borrow::Cow;

use crate::command::{
    Command, Fingerprint, Phase, Request, SAGA_DEADLINE_MS_DEFAULT, SAGA_STEPS_MAX, SagaStep,
};
use crate::decision::{Decision, Outcome, Reason, Transfer};
use crate::id::OpId;
use crate::route::{self, PartitionId};
use crate::state::{ExpiryKey, HoldStatus, Read, Saga, SagaState, Write};

use super::{Apology, Ctx, Effect, Machine, NoOutcome, Verdict};

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

/// What a saga's decisions say it moves: `from`, `to` and `amount` for a
/// `transfer`, nothing for a `saga` or any other command.
pub fn transfer(command: &Command) -> Option<Transfer> {
    match command {
        Command::Transfer {
            from, to, amount, ..
        } => Some(Transfer {
            from: from.clone(),
            to: to.clone(),
            amount: *amount,
        }),
        _ => None,
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

/// The saga side of the machine: starting sagas, deciding their steps on
/// the steps' partitions, and moving them on as outcomes arrive.
impl Machine {
    /// Checks a step or step outcome: its op id must be the one derived
    /// from its saga's, and the saga's op id must be inside the window (it
    /// bounds the step's dedup record like a client's v7 id does).
    pub(super) fn check_internal(&self, req: &Request, now: u64) -> Result<(), Reason> {
        let (saga, index, expected) = match &req.command {
            Command::Step {
                saga, index, phase, ..
            } => (*saga, *index, step_id(*saga, *index, *phase)),
            Command::StepOutcome { saga, index, .. } => (*saga, *index, outcome_id(*saga, *index)),
            _ => return self.check_op_id(req.op_id, now),
        };
        let malformed = |detail: &str| Reason::Malformed {
            detail: detail.to_owned(),
        };
        if usize::try_from(index).map_or(true, |i| i >= SAGA_STEPS_MAX) {
            return Err(malformed(
                "a step index must be below the saga step limit (16)",
            ));
        }
        if req.op_id != expected {
            return Err(malformed(
                "a step message's op id must be derived from its saga's (see specs/protocol.md)",
            ));
        }
        if req.apology_topic.is_some() {
            return Err(malformed("a step message takes no apology_topic"));
        }
        self.check_op_id(saga, now)?;
        // amends sends each step message to the partition of its routing
        // key, so one elsewhere was forged: refused like the checks above.
        self.check_route(req)
    }

    /// The partition of a saga step (its command's routing key).
    fn target_of(&self, step: &SagaStep) -> PartitionId {
        // Steps are plain operations (checked by parsing), which all have
        // a routing key.
        let key = step.command.routing_key().unwrap_or_default();
        route::partition_of(&key, self.partitions)
    }

    /// The partition that keeps saga `saga`.
    fn saga_partition(&self, saga: OpId) -> PartitionId {
        route::partition_of(&route::saga_routing_key(&saga.0), self.partitions)
    }

    /// Sends `request` to `partition`: through the outbox, or, for this
    /// partition, to be decided right after the current message.
    fn send<S: ?Sized>(&self, cx: &mut Ctx<'_, S>, partition: PartitionId, request: Request) {
        if partition == self.partition {
            cx.local.push_back(request);
        } else {
            cx.out.push(Effect::Send { partition, request });
        }
    }

    fn send_step<S: ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        saga: OpId,
        index: u32,
        phase: Phase,
        step: &SagaStep,
    ) {
        let request = step_request(saga, index, phase, step.clone());
        self.send(cx, self.target_of(step), request);
    }

    pub(super) fn send_outcome<S: ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        saga: OpId,
        index: u32,
        outcome: Outcome,
    ) {
        let request = outcome_request(saga, index, outcome);
        self.send(cx, self.saga_partition(saga), request);
    }

    /// Starts the saga of `req` (a `transfer` or `saga`): records it, sets
    /// its deadline and tries its first step. Returns its in-flight
    /// decision.
    pub(super) fn start_saga<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        req: &Request,
        fingerprint: Fingerprint,
        reply_to: Option<&str>,
    ) -> Decision {
        let steps = steps(&req.command);
        // A saga ends within the dedup retention, so its op id and its steps'
        // are deduplicated for as long as they can arrive.
        let lasts_ms = deadline_ms(&req.command).min(self.config.dedup_retention_ms);
        let deadline_ms = cx.now.saturating_add(lasts_ms);
        cx.state.put_saga(
            req.op_id,
            Saga {
                command: req.command.clone(),
                apology_topic: req.apology_topic.clone(),
                reply_to: reply_to.map(str::to_owned),
                deadline_ms,
                state: SagaState::Trying { step: 0 },
            },
        );
        cx.state.put_expiry(
            ExpiryKey {
                at_ms: deadline_ms,
                id: req.op_id,
            },
            true,
        );
        let decision = Decision {
            transfer: transfer(&req.command),
            ..self.decision(cx, req.op_id, Outcome::InFlight { step: 0 })
        };
        cx.record(req.op_id, fingerprint, decision.clone());
        // Parsing guarantees at least one step.
        if let Some(first) = steps.first() {
            self.send_step(cx, req.op_id, 0, Phase::Try, first);
        }
        decision
    }

    /// Decides phase `phase` of step `index` of saga `saga` on this (the
    /// step's) partition. `op_id` is the message's derived id.
    pub(super) fn step<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        op_id: OpId,
        saga: OpId,
        index: u32,
        phase: Phase,
        step: &SagaStep,
    ) -> Verdict<S::Error> {
        let try_id = step_id(saga, index, Phase::Try);
        let live = |cx: &Ctx<'_, S>, op_id| cx.live_dedup(op_id).map_err(NoOutcome::Read);
        let tried = |cx: &Ctx<'_, S>| {
            Ok::<_, NoOutcome<S::Error>>(
                live(cx, try_id)?.is_some_and(|d| d.decision.outcome.is_confirmed()),
            )
        };
        let cancelled = live(cx, step_id(saga, index, Phase::Cancel))?.is_some();
        if phase != Phase::Cancel && cancelled {
            // The saga cancelled this step before its try (or a confirm,
            // which only a forged message could send) arrived.
            return Err(Reason::SagaCancelled.into());
        }
        if phase == Phase::Cancel && live(cx, step_id(saga, index, Phase::Confirm))?.is_some() {
            // Confirmed already: a saga sends one or the other, never both,
            // so only a forged message gets here. It changes nothing.
            return Ok(Outcome::confirmed());
        }
        match (phase, &*step.command) {
            (Phase::Try, Command::Debit { account, amount }) => {
                cx.new_hold(op_id, account, *amount, None)
            }
            (Phase::Try, Command::Credit { account, amount }) => {
                cx.reserve_credit(account, *amount)
            }
            (
                Phase::Try,
                Command::Claim {
                    namespace,
                    key,
                    owner,
                },
            ) => cx.try_claim(namespace, key, owner, op_id),
            (Phase::Try, command) => {
                let req = Request {
                    op_id,
                    command: command.clone(),
                    apology_topic: None,
                };
                cx.execute(&req)
            }
            (Phase::Confirm, Command::Debit { account, .. }) => {
                cx.post(account, try_id, None, true)
            }
            (Phase::Confirm, Command::Credit { account, amount }) => {
                if !tried(cx)? {
                    return Ok(Outcome::confirmed());
                }
                cx.confirm_credit(account, *amount)
            }
            (Phase::Confirm, Command::Claim { namespace, key, .. }) => {
                cx.confirm_claim(namespace, key, try_id)
            }
            // A step done at once has nothing to confirm (and the saga
            // sends it no confirm).
            (Phase::Confirm, _) => Ok(Outcome::confirmed()),
            (Phase::Cancel, Command::Debit { account, .. }) => {
                let hold = cx.state.hold(try_id).map_err(NoOutcome::Read)?;
                match hold.map(|h| h.status) {
                    Some(HoldStatus::Pending) => cx.void(account, try_id, true),
                    _ => Ok(Outcome::confirmed()),
                }
            }
            (Phase::Cancel, Command::Credit { account, amount }) => {
                if tried(cx)? {
                    cx.cancel_credit(account, *amount)?;
                }
                Ok(Outcome::confirmed())
            }
            (Phase::Cancel, Command::Claim { namespace, key, .. }) => {
                cx.cancel_claim(namespace, key, try_id)
            }
            (Phase::Cancel, _) => match (&step.compensation, tried(cx)?) {
                (Some(compensation), true) => {
                    let req = Request {
                        op_id,
                        command: (**compensation).clone(),
                        apology_topic: None,
                    };
                    cx.execute(&req)
                }
                _ => Ok(Outcome::confirmed()),
            },
        }
    }

    /// Moves saga `saga_id` on with the outcome of step `index`'s try: the
    /// next try, the confirms, or the cancels. An outcome the saga does not
    /// wait for (late, after the deadline, or repeated) changes nothing:
    /// the step was cancelled already.
    pub(super) fn on_outcome<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        saga_id: OpId,
        index: u32,
        outcome: &Outcome,
    ) -> Result<(), S::Error> {
        let Some(mut s) = cx
            .state
            .saga(saga_id)?
            .filter(|s| !s.is_compactable(cx.horizon_ms))
        else {
            return Ok(());
        };
        if s.state != (SagaState::Trying { step: index }) {
            return Ok(());
        }
        let steps = steps(&s.command);
        match outcome {
            Outcome::Confirmed { .. } => {
                let next = index.saturating_add(1);
                let next_step = usize::try_from(next).ok().and_then(|i| steps.get(i));
                if let Some(step) = next_step {
                    self.send_step(cx, saga_id, next, Phase::Try, step);
                    s.state = SagaState::Trying { step: next };
                    cx.state.put_saga(saga_id, s);
                    if let Some(mut d) = cx.state.dedup(saga_id)? {
                        d.decision.outcome = Outcome::InFlight { step: next };
                        cx.state.put_dedup(saga_id, d);
                    }
                } else {
                    for (i, step) in (0_u32..).zip(steps.iter()) {
                        if step.is_tentative() {
                            self.send_step(cx, saga_id, i, Phase::Confirm, step);
                        }
                    }
                    self.finish_saga(cx, saga_id, s, Outcome::confirmed());
                }
            }
            Outcome::Rejected { reason } => {
                self.cancel_steps(cx, saga_id, &s, index, false);
                let reason = Reason::StepRefused {
                    step: index,
                    reason: Box::new(reason.clone()),
                };
                self.finish_saga(cx, saga_id, s, Outcome::Rejected { reason });
            }
            // Not the outcome of a try; only a forged message carries it.
            Outcome::InFlight { .. } => {}
        }
        Ok(())
    }

    /// Cancels saga `saga_id` (record `s`, in flight) whose deadline the
    /// log time has reached.
    pub(super) fn expire_saga<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        saga_id: OpId,
        s: Saga,
    ) -> Result<(), S::Error> {
        let SagaState::Trying { step } = s.state else {
            panic!("expiry index names {saga_id:?}, a saga that ended");
        };
        let reason = Reason::DeadlineExceeded {
            deadline_ms: s.deadline_ms,
        };
        // The step in flight is cancelled too: its try may have happened,
        // or may still arrive (and is then refused).
        self.cancel_steps(cx, saga_id, &s, step, true);
        self.finish_saga(cx, saga_id, s, Outcome::Rejected { reason });
        Ok(())
    }

    /// Cancels the steps of `s` before step `in_flight`, last first, and
    /// step `in_flight` itself when `with_in_flight`. Only steps that left
    /// something to undo get a cancel (a reservation, or a compensation),
    /// and the step in flight always does (its try may arrive later).
    fn cancel_steps<S: ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        saga_id: OpId,
        s: &Saga,
        in_flight: u32,
        with_in_flight: bool,
    ) {
        let steps = steps(&s.command);
        let indexed: Vec<(u32, &SagaStep)> = (0_u32..).zip(steps.iter()).collect();
        for &(i, step) in indexed.iter().rev() {
            let undo = step.is_tentative() || step.compensation.is_some();
            let wanted = match i.cmp(&in_flight) {
                std::cmp::Ordering::Less => undo,
                std::cmp::Ordering::Equal => with_in_flight,
                std::cmp::Ordering::Greater => false,
            };
            if wanted {
                self.send_step(cx, saga_id, i, Phase::Cancel, step);
            }
        }
    }

    /// Ends saga `saga_id` with `outcome`: its final decision replaces the
    /// in-flight one, is published, sent to the requester and, for a
    /// refused optimistic saga, published as an apology.
    fn finish_saga<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        saga_id: OpId,
        mut s: Saga,
        outcome: Outcome,
    ) {
        s.state = if outcome.is_confirmed() {
            SagaState::Confirmed { at_ms: cx.now }
        } else {
            SagaState::Cancelled { at_ms: cx.now }
        };
        cx.state.put_expiry(
            ExpiryKey {
                at_ms: s.deadline_ms,
                id: saga_id,
            },
            false,
        );
        let decision = Decision {
            transfer: transfer(&s.command),
            ..self.decision(cx, saga_id, outcome)
        };
        // The fingerprint of the saga's request, made again from the saga
        // (its in-flight dedup record may have been compacted already).
        let request = Request {
            op_id: saga_id,
            command: s.command.clone(),
            apology_topic: s.apology_topic.clone(),
        };
        cx.record(saga_id, request.fingerprint(), decision.clone());
        if let (Some(topic), false) = (&s.apology_topic, decision.outcome.is_confirmed()) {
            cx.out.push(Effect::Apology(Apology {
                topic: topic.clone(),
                command: s.command.clone(),
                decision: decision.clone(),
            }));
        }
        cx.out.push(Effect::Decided(decision.clone()));
        if let Some(to) = &s.reply_to {
            cx.out.push(Effect::Reply {
                to: to.clone(),
                decision,
            });
        }
        cx.state.put_saga(saga_id, s);
    }
}

impl<S: Read + Write + ?Sized> Ctx<'_, S> {
    /// Points the final decision of saga `saga_id`, if it is one, at reply
    /// subject `to` (a resubmission of the saga while it is in flight).
    pub(super) fn redirect_reply(&mut self, saga_id: OpId, to: &str) -> Result<(), S::Error> {
        if let Some(mut s) = self.state.saga(saga_id)?
            && s.reply_to.as_deref() != Some(to)
        {
            s.reply_to = Some(to.to_owned());
            self.state.put_saga(saga_id, s);
        }
        Ok(())
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
