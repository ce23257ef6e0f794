//! Corruption and misuse: clear errors, never a silent reinterpretation.

use amends_core::command::{AccountId, Amount, Command, Request};
use amends_core::id::OpId;
use amends_core::partition::Fault;
use amends_core::route::Partitions;
use amends_core::state::{ChangeSet, Clock, Read};
use amends_core::wire;
use amends_store::{Error, Options, OutboxSeq, PartitionStore, Store};

use crate::support::{self, Msg, Runner};

fn opts(n: u32) -> Options {
    Options::new(Partitions::new(n).expect("valid count"))
}

#[test]
fn reopening_with_another_partition_count_is_refused() {
    // Proves the partition count is fixed at creation: reopening with
    // another count fails naming both counts, and the right count still
    // opens.
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path(), opts(4)).expect("create"));
    let err = Store::open(dir.path(), opts(8)).expect_err("8 partitions refused");
    assert!(
        matches!(
            err,
            Error::PartitionCount {
                stored: 4,
                requested: 8
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("created with 4 partitions, opened with 8"),
        "{msg}"
    );
    Store::open(dir.path(), opts(4)).expect("the original count opens");
}

/// Opens a store whose meta names format `found`, and checks it is refused
/// with both versions in the error and its message.
fn assert_refused_with_format_version(found: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path(), opts(4)).expect("create"));
    {
        let db = support::raw_sled(dir.path());
        let meta = db.open_tree("amends/meta").expect("meta tree");
        meta.insert("format_version", &found.to_be_bytes())
            .expect("overwrite");
        db.flush().expect("flush");
    }
    let err = Store::open(dir.path(), opts(4)).expect_err("another version is refused");
    assert!(
        matches!(
            err,
            Error::FormatVersion { found: f, expected } if f == found && expected == u32::from(amends_store::FORMAT_VERSION)
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("format version {found} on disk")),
        "{err}"
    );
}

#[test]
fn another_format_version_is_refused() {
    // Proves a store whose meta names another format version is refused
    // with both versions in the message.
    assert_refused_with_format_version(99);
}

#[test]
fn a_format_2_store_is_refused() {
    // Proves the store written before dead letters joined the outbox (format 2) is refused on open, naming both versions, rather than read by a build whose outbox entries it does not know; the log rebuilds it.
    assert_eq!(amends_store::FORMAT_VERSION, 5);
    assert_refused_with_format_version(2);
}

#[test]
fn a_format_3_store_is_refused_with_the_way_out() {
    // Proves a store written by format 3 (the same layout, but the saga
    // commands' fingerprints made from their JSON) is refused on open as
    // every other version is, naming both versions and how to recover,
    // rather than read: its stored saga fingerprints would turn every
    // resubmitted saga into an op_id_conflict.
    assert_older_store_refused_with_the_way_out(3);
}

#[test]
fn a_format_4_store_is_refused_with_the_way_out() {
    // Proves a store written by format 4 (its transfer decisions without
    // what the transfer moves) is refused on open, naming both versions
    // and how to recover, rather than read: a duplicate of a transfer
    // decided before the upgrade would get another answer than a
    // duplicate of one decided after it.
    assert_older_store_refused_with_the_way_out(4);
}

/// Makes an older store out of this build's (`old`, the older version, in
/// its meta and in every record) and checks that opening it is refused
/// with both versions and the way out.
fn assert_older_store_refused_with_the_way_out(old: u8) {
    let current = amends_store::FORMAT_VERSION;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (_store, p) = support::open(dir.path());
        Runner::new().batch(&p, &support::generate(5, 200));
    }
    {
        let db = support::raw_sled(dir.path());
        let meta = db.open_tree("amends/meta").expect("meta tree");
        meta.insert("format_version", &u32::from(old).to_be_bytes())
            .expect("overwrite");
        let mut rewritten = 0;
        for name in db.tree_names() {
            if !name.starts_with(b"amends/partition/") {
                continue;
            }
            let tree = db.open_tree(&name).expect("tree");
            for kv in tree.iter() {
                let (k, v) = kv.expect("record");
                assert_eq!(v.first(), Some(&current), "a record of this build's format");
                let mut rec = v.to_vec();
                rec[0] = old;
                tree.insert(k, rec).expect("rewrite");
                rewritten += 1;
            }
        }
        assert!(rewritten > 10, "the store held records: {rewritten}");
        db.flush().expect("flush");
    }
    let err = Store::open(dir.path(), opts(4)).expect_err("older format refused");
    assert!(
        matches!(
            err,
            Error::FormatVersion { found, expected } if found == u32::from(old) && expected == u32::from(current)
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("format version {old} on disk")),
        "{msg}"
    );
    assert!(msg.contains("rebuild the store from the log"), "{msg}");
}

#[test]
fn a_foreign_sled_database_is_refused() {
    // Proves a sled database with data but no amends meta is not adopted.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = support::raw_sled(dir.path());
        db.open_tree("something-else")
            .expect("tree")
            .insert("k", "v")
            .expect("insert");
        db.flush().expect("flush");
    }
    let err = Store::open(dir.path(), opts(4)).expect_err("foreign db refused");
    assert!(matches!(err, Error::MissingMeta), "{err:?}");
}

#[test]
fn partition_out_of_range_is_refused() {
    // Proves a partition number at or above the count is an error, not a
    // new tree.
    let dir = tempfile::tempdir().expect("tempdir");
    let small = Store::open(dir.path(), opts(2)).expect("create");
    let id = Partitions::new(8).expect("count").id(5).expect("id");
    let err = small.partition(id).expect_err("out of range");
    assert!(
        matches!(
            err,
            Error::NoSuchPartition {
                partition: 5,
                partitions: 2
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_corrupt_record_fails_the_batch_and_names_its_key() {
    // Proves a record that does not decode is reported as corruption naming
    // its key: the decoding iterator fails, a read of it through the state
    // machine's trait returns the error, and a batch that reads it stops
    // with that error by type (`Fault::Read`) instead of being decided on a
    // missing account, so nothing of it is committed.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = support::generate(3, 400);
    let applied = {
        let (_store, p) = support::open(dir.path());
        Runner::new().batch(&p, &log[..200]);
        p.clock().expect("read the clock").position
    };
    let key = {
        let db = support::raw_sled(dir.path());
        let tree = db
            .open_tree(format!("amends/partition/{:04}", support::PARTITION))
            .expect("tree");
        let key = tree
            .scan_prefix("a")
            .keys()
            .next()
            .expect("an account exists")
            .expect("read key");
        tree.insert(&key, &[1u8, 0xff, 0xff][..]).expect("damage");
        db.flush().expect("flush");
        key
    };
    let (_store, p) = support::open(dir.path());
    let err = p.records().find_map(Result::err).expect("a corrupt record");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Corrupt { .. }) && msg.contains("at key aacct-"),
        "{msg}"
    );

    // Reading the damaged account through the state machine's trait fails.
    let damaged = std::str::from_utf8(&key[1..]).expect("an account id is text");
    let err = p.account(damaged).expect_err("a corrupt account");
    assert!(
        matches!(err, Error::Corrupt { .. }) && err.to_string().contains("at key aacct-"),
        "{err}"
    );

    // A batch that credits it stops at that read, with the store's error.
    let now_ms = log[199].log_time_ms;
    let credit = Request {
        op_id: OpId::v7_from_parts(now_ms, 1),
        command: Command::Credit {
            account: AccountId::new(damaged).expect("a valid account id"),
            amount: Amount::new(1).expect("positive"),
        },
        apology_topic: None,
    };
    let batch = [Msg {
        position: applied + 1,
        log_time_ms: now_ms,
        bytes: wire::encode(&credit),
        reply_to: None,
    }];
    let mut runner = Runner::new();
    let stopped = runner.try_apply(&p, &batch).expect_err("batch stopped");
    let Fault::Read(err) = stopped else {
        panic!("not a read fault: {stopped:?}");
    };
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string().contains("corrupt record at key aacct-"),
        "{err}"
    );
    assert_eq!(
        p.clock().expect("read the clock").position,
        applied,
        "nothing was committed"
    );
}

#[test]
fn a_stale_change_set_is_refused() {
    // Proves a change set that does not advance the applied position (two
    // writers, or a batch committed twice) is refused and writes nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, p) = support::open(dir.path());
    let log = support::generate(5, 50);
    Runner::new().batch(&p, &log);
    let before: Vec<_> = p.dump().collect::<Result<_, _>>().expect("dump");
    let changes = ChangeSet {
        clock: Some(Clock {
            position: p.clock().expect("read the clock").position,
            log_time_ms: support::T0_MS,
        }),
        ..ChangeSet::default()
    };
    let err = p.commit(&changes, &[]).expect_err("stale");
    assert!(matches!(err, Error::PositionNotAdvancing { .. }), "{err:?}");
    let after: Vec<_> = p.dump().collect::<Result<_, _>>().expect("dump");
    assert_eq!(before, after);
}

#[test]
fn confirming_beyond_the_outbox_is_refused() {
    // Proves the publisher cannot confirm entries the store never wrote,
    // and that confirming less than before is a no-op.
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, p) = support::open(dir.path());
    let log = support::generate(6, 100);
    let (range, _) = Runner::new().batch(&p, &log);
    let err = p
        .outbox_confirm(OutboxSeq(range.end.0 + 1))
        .expect_err("beyond");
    assert!(matches!(err, Error::OutboxConfirmBeyond { .. }), "{err:?}");
    p.outbox_confirm(range.end).expect("confirm all");
    p.outbox_confirm(OutboxSeq(1))
        .expect("going back is a no-op");
    assert_eq!(p.outbox_confirmed().expect("watermark"), range.end);
    assert!(
        p.outbox_read(OutboxSeq(0), usize::MAX)
            .expect("read")
            .is_empty()
    );
}
