//! Op ids from the command line: `amends op-id` makes one, and `submit`
//! and `decode` check one before anything is sent, with the service's
//! default window (`amends_core::partition::Config`), so that an id
//! amends would refuse is caught with a clear message and exit code 4.

use std::time::{SystemTime, UNIX_EPOCH};

use amends_core::OpId;
use amends_core::partition::Config;

/// Exit code: the op id was (or would be) refused as an op id: not a UUID
/// v7, outside the window, or reused with another body. Distinct from a
/// business refusal (1).
pub const EXIT_OP_ID_REFUSED: u8 = 4;

/// The reason codes that refuse an op id rather than the operation.
pub const OP_ID_REASONS: [&str; 2] = ["op_id_outside_window", "op_id_conflict"];

/// This machine's clock, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What is wrong with `op_id` at `now_ms` (this machine's clock standing in
/// for the log's), if anything, for a human.
pub fn problem(op_id: OpId, now_ms: u64) -> Option<String> {
    let Some(made_ms) = op_id.v7_unix_ms() else {
        return Some(format!(
            "op id {op_id} is not a UUID v7 (version {}): amends refuses it as malformed; \
             make one with `amends op-id`, or leave op_id out and submit fills one in",
            op_id.0.get_version_num()
        ));
    };
    let config = Config::default();
    let (earliest, latest) = config.window(now_ms);
    if made_ms >= earliest && made_ms <= latest {
        return None;
    }
    let when = if made_ms < now_ms {
        format!("{} ago", span(now_ms - made_ms))
    } else {
        format!("{} ahead of this clock", span(made_ms - now_ms))
    };
    Some(format!(
        "op id {op_id} was made {when}, outside the window amends accepts \
         (made at most {} ago and at most {} ahead): it would be refused with \
         op_id_outside_window; make a fresh one with `amends op-id`, or leave op_id out",
        span(config.dedup_retention_ms),
        span(config.op_id_future_skew_ms),
    ))
}

/// A duration in ms, roughly, in the largest unit that fits.
fn span(ms: u64) -> String {
    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    match ms {
        ms if ms >= 2 * DAY => format!("{} days", ms / DAY),
        ms if ms >= 2 * HOUR => format!("{} h", ms / HOUR),
        ms if ms >= 2 * MINUTE => format!("{} min", ms / MINUTE),
        ms => format!("{} s", ms / 1_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn v7_at(ms: u64) -> OpId {
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1_000, 0);
        OpId(uuid::Uuid::new_v7(ts))
    }

    #[test]
    fn an_op_id_is_checked_against_the_default_window() {
        // Proves the pre-check matches the service's default window: a fresh v7 id passes, one from 2 days before or 1 h after the clock is refused saying by how much and what to do, and a v4 id is refused as not v7.
        assert_eq!(problem(v7_at(NOW), NOW), None);
        assert_eq!(problem(v7_at(NOW - 23 * 3_600_000), NOW), None);
        let old = problem(v7_at(NOW - 2 * 86_400_000), NOW).expect("refused");
        assert!(
            old.contains("made 2 days ago") && old.contains("amends op-id"),
            "{old}"
        );
        let ahead = problem(v7_at(NOW + 3_600_000), NOW).expect("refused");
        assert!(ahead.contains("60 min ahead"), "{ahead}");
        let v4 = problem(
            OpId(uuid::Uuid::from_u128(
                0x4000_0000_0000_4000_8000_0000_0000_0001,
            )),
            NOW,
        )
        .expect("refused");
        assert!(v4.contains("not a UUID v7 (version 4)"), "{v4}");
    }
}
