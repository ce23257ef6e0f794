//! Exactly once: the dedup records that carry every decision, the lookup
//! of an op id decided before, and the window an op id must fall in to be
//! recorded at all.

use crate::command::Fingerprint;
use crate::decision::{Decision, Outcome, Reason};
use crate::id::OpId;
use crate::state::{Dedup, Read, Write};
use crate::wire;

use super::{Answer, Ctx, Machine};

impl Machine {
    /// The answer to `op_id` if it was decided before and its record still
    /// counts: the original decision for the same body, a conflict for
    /// another. `None` if it is new.
    pub(super) fn seen<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        op_id: OpId,
        fingerprint: Fingerprint,
        reply_to: Option<&str>,
    ) -> Result<Option<Answer>, S::Error> {
        let Some(seen) = cx.live_dedup(op_id)? else {
            return Ok(None);
        };
        if seen.fingerprint != fingerprint {
            return Ok(Some(Answer::Conflict(self.decision(
                cx,
                op_id,
                Outcome::Rejected {
                    reason: Reason::OpIdConflict,
                },
            ))));
        }
        // A resubmitted saga still in flight: its final decision goes to
        // the latest reply subject (the first requester may be gone). An
        // invalid subject is not kept (nothing could be sent to it).
        let valid_reply_to = reply_to.filter(|r| wire::reply_subject_is_valid(r));
        if let (false, Some(to)) = (seen.decision.outcome.is_final(), valid_reply_to) {
            cx.redirect_reply(op_id, to)?;
        }
        Ok(Some(Answer::Duplicate(seen.decision)))
    }

    /// Checks that `op_id` can be deduplicated at log time `now`: a UUID v7
    /// whose timestamp is inside the window.
    pub(super) fn check_op_id(&self, op_id: OpId, now: u64) -> Result<(), Reason> {
        let Some(op_time_ms) = op_id.v7_unix_ms() else {
            return Err(Reason::Malformed {
                detail: "op_id must be a UUID version 7 (see specs/protocol.md)".to_owned(),
            });
        };
        let (earliest_ms, latest_ms) = self.config.window(now);
        if op_time_ms < earliest_ms || op_time_ms > latest_ms {
            return Err(Reason::OpIdOutsideWindow {
                op_time_ms,
                earliest_ms,
                latest_ms,
            });
        }
        Ok(())
    }

    /// Records the decision of a saga's internal message (step or step
    /// outcome) and answers it as internal: it is not published.
    pub(super) fn internal<S: Read + Write + ?Sized>(
        &self,
        cx: &mut Ctx<'_, S>,
        op_id: OpId,
        fingerprint: Fingerprint,
        outcome: Outcome,
    ) -> Answer {
        let decision = self.decision(cx, op_id, outcome);
        cx.record(op_id, fingerprint, decision.clone());
        Answer::Internal(decision)
    }
}

impl<S: Read + Write + ?Sized> Ctx<'_, S> {
    /// The dedup record of `op_id`, unless it is past the compaction
    /// horizon (then it counts as gone, compacted or not).
    pub(super) fn live_dedup(&self, op_id: OpId) -> Result<Option<Dedup>, S::Error> {
        let found = self.state.dedup(op_id)?;
        Ok(found.filter(|d| !d.is_compactable(self.horizon_ms)))
    }

    /// Records `decision` as the one answer to `op_id` with `fingerprint`.
    pub(super) fn record(&mut self, op_id: OpId, fingerprint: Fingerprint, decision: Decision) {
        self.state.put_dedup(
            op_id,
            Dedup {
                fingerprint,
                decision,
            },
        );
    }
}
