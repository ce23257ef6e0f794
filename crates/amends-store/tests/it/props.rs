//! Model-based property test: random interleavings of batch commits,
//! abandoned batches, outbox confirmations, compactions and restarts,
//! checked against an in-memory reference after every step. Written
//! against [`PartitionStore`] (see [`TestEngine`]), run on sled.

use amends_core::partition::Effect;
use amends_store::{Durability, OutboxSeq, PartitionStore};
use proptest::prelude::*;

use crate::support::{self, Part, Runner, Sled, TestEngine};

/// Messages in each case's log.
const LOG_LEN: usize = 600;

#[derive(Clone, Debug)]
enum Op {
    /// Apply the next `len` messages and commit them as one batch.
    Commit { len: usize },
    /// Apply the next `len` messages, then crash before the commit.
    Abandon { len: usize },
    /// The publisher confirms `percent` of the unconfirmed entries.
    Confirm { percent: u64 },
    /// Drop the store and open it again.
    Restart,
    /// Compact store and reference at the current horizon.
    Compact,
    /// Read a page of the outbox from an offset past the watermark.
    ReadPage { skip: u64, len_max: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..90usize).prop_map(|len| Op::Commit { len }),
        1 => (1..40usize).prop_map(|len| Op::Abandon { len }),
        3 => (0..=100u64).prop_map(|percent| Op::Confirm { percent }),
        2 => Just(Op::Restart),
        1 => Just(Op::Compact),
        1 => (0..200u64, 0..150usize).prop_map(|(skip, len_max)| Op::ReadPage { skip, len_max }),
    ]
}

struct Model {
    /// Messages committed.
    applied: usize,
    mem: amends_core::state::MemState,
    effects: Vec<Effect>,
    confirmed: u64,
}

fn check<E: TestEngine>(p: &Part<E>, model: &Model, step: usize) {
    let stored = p.to_mem_state().expect("decode store");
    support::assert_same_state(&stored, &model.mem, &format!("after step {step}"));
    support::check_invariants(&stored);
    let end = u64::try_from(model.effects.len()).expect("fits");
    assert_eq!(p.outbox_end().expect("end"), OutboxSeq(end));
    assert_eq!(
        p.outbox_confirmed().expect("confirmed"),
        OutboxSeq(model.confirmed)
    );
    let pending = p.outbox_read(OutboxSeq(0), usize::MAX).expect("outbox");
    let want: Vec<(OutboxSeq, Effect)> = (model.confirmed..)
        .zip(&model.effects[usize::try_from(model.confirmed).expect("fits")..])
        .map(|(s, e)| (OutboxSeq(s), e.clone()))
        .collect();
    assert_eq!(pending, want, "unconfirmed outbox after step {step}");
    E::check_layout(p, model.confirmed, end, &format!("after step {step}"));
}

/// One case on engine `E`.
fn run<E: TestEngine>(seed: u64, ops: &[Op], deferred: bool) {
    let log = support::generate(seed, LOG_LEN);
    let dir = tempfile::tempdir().expect("tempdir");
    let durability = if deferred {
        Durability::Deferred { flush_every_ms: 50 }
    } else {
        Durability::Fsync
    };
    let (mut store, mut p) = support::open_on::<E>(dir.path(), durability);
    let mut runner = Runner::new();
    let mut model = Model {
        applied: 0,
        mem: amends_core::state::MemState::new(),
        effects: Vec::new(),
        confirmed: 0,
    };
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Commit { len } | Op::Abandon { len } => {
                let end = (model.applied + len).min(log.len());
                let batch = &log[model.applied..end];
                if matches!(op, Op::Abandon { .. }) {
                    runner.apply(&p, batch);
                    runner.abandon();
                    drop((store, p));
                    (store, p) = support::open_on::<E>(dir.path(), durability);
                } else {
                    let (range, effects) = runner.batch(&p, batch);
                    let (mem, effs) = (&mut model.mem, &mut model.effects);
                    let before = effs.len();
                    for m in batch {
                        support::apply_msg(&runner.machine, mem, m, effs).expect("advancing log");
                    }
                    assert_eq!(effects, effs[before..], "effects of the batch");
                    assert_eq!(range.start.0, u64::try_from(before).expect("fits"));
                    assert_eq!(range.len(), u64::try_from(effects.len()).expect("fits"));
                    model.applied = end;
                }
            }
            Op::Confirm { percent } => {
                let end = u64::try_from(model.effects.len()).expect("fits");
                let upto = model.confirmed + (end - model.confirmed) * percent / 100;
                p.outbox_confirm(OutboxSeq(upto)).expect("confirm");
                model.confirmed = model.confirmed.max(upto);
            }
            Op::Restart => {
                drop((store, p));
                (store, p) = support::open_on::<E>(dir.path(), durability);
            }
            Op::Compact => {
                let h = support::horizon(&model.mem);
                p.compact(h).expect("compact");
                model.mem.compact(h);
            }
            Op::ReadPage { skip, len_max } => {
                let from = model.confirmed + skip;
                let page = p.outbox_read(OutboxSeq(from), *len_max).expect("page");
                let want: Vec<_> = (from..)
                    .zip(
                        model
                            .effects
                            .iter()
                            .skip(usize::try_from(from).expect("fits")),
                    )
                    .take(*len_max)
                    .map(|(s, e)| (OutboxSeq(s), e.clone()))
                    .collect();
                assert_eq!(page, want, "page from {from}, at most {len_max}");
            }
        }
        check::<E>(&p, &model, step);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_keep_invariants_and_match_memory(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..30),
        deferred in any::<bool>(),
    ) {
        // Proves that commits, crashes before a commit, confirmations,
        // compactions and restarts in any order keep the core invariants
        // and leave the store equal, record for record and outbox entry for
        // entry, to a MemState fed the same messages.
        run::<Sled>(seed, &ops, deferred);
    }
}
