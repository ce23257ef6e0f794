//! Rebuild by replay: a cleared partition fed its log again is
//! bit-identical to the original.

use amends_core::partition::Effect;
use amends_store::{OutboxSeq, PartitionStore};

use crate::support::{self, Rng, Runner};

type Dump = Vec<(Vec<u8>, Vec<u8>)>;

fn dump(p: &amends_store::Partition) -> Dump {
    p.dump().collect::<Result<_, _>>().expect("dump")
}

#[test]
fn cleared_and_replayed_partition_is_bit_identical() {
    // Proves the store is a pure function of the log (plus the confirmation
    // watermark and the last compaction horizon): build it with one batching,
    // compacting along the way and confirming part of the outbox; note the
    // watermark, clear, replay with another batching, confirm the watermark,
    // compact once at the last horizon; every key and value is equal.
    let log = support::generate(7, 6_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, p) = support::open(dir.path());

    let mut runner = Runner::new();
    let mut rng = Rng::new(11);
    let mut next = 0;
    let mut last_horizon = 0;
    while next < log.len() {
        let len = usize::try_from(rng.range(1, 300)).expect("small");
        let end = (next + len).min(log.len());
        let (range, _) = runner.batch(&p, &log[next..end]);
        next = end;
        if rng.percent(40) {
            // Confirm part of the batch, as a lagging publisher would.
            p.outbox_confirm(OutboxSeq(range.start.0 + range.len() / 2))
                .expect("confirm");
        }
        if rng.percent(20) {
            last_horizon = support::horizon(&p);
            p.compact(last_horizon).expect("compact");
        }
    }
    let before = dump(&p);
    let confirmed = p.outbox_confirmed().expect("confirmed");
    assert!(
        confirmed.0 > 0 && last_horizon > support::T0_MS,
        "the test exercises both"
    );

    p.clear().expect("clear");
    assert!(dump(&p).is_empty(), "clear leaves nothing");

    let mut runner = Runner::new();
    for batch in log.chunks(97) {
        runner.batch(&p, batch);
    }
    p.outbox_confirm(confirmed)
        .expect("confirm the noted watermark");
    p.compact(last_horizon).expect("compact");
    let after = dump(&p);

    assert_eq!(before.len(), after.len(), "record count");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a, "first differing record");
    }

    // And it is the state of an in-memory run, which has sagas in it.
    let (mut mem, effects) = support::reference(&log);
    mem.compact(last_horizon);
    assert!(mem.sagas().count() > 0, "the log leaves sagas to compare");
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Send { .. }))
            && effects.iter().any(|e| matches!(e, Effect::Reply { .. })),
        "the log makes send and reply outbox entries"
    );
    support::assert_same_state(
        &p.to_mem_state().expect("decode"),
        &mem,
        "rebuilt vs memory",
    );
}
