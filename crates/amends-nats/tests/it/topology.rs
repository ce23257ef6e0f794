//! `topology::ensure` against a real server: creation, idempotence, and the
//! refusals that protect an existing deployment.

use std::time::Duration;

use amends_nats::Error;
use amends_nats::topology::{self, Action, Stream};
use async_nats::jetstream::stream;

use crate::support::{server_and_js, stream_info, subject_in, topology, within};

#[tokio::test]
async fn ensure_creates_the_four_streams_and_records_the_partition_count() {
    // Proves ensure creates the documented streams and meta record: run it for
    // two topologies, read every config back.
    within(async {
        let (_server, _client, js) = server_and_js().await;
        let default = topology("amends", 16);
        let mut custom = topology("acme.ledger", 3);
        custom.duplicate_window = Duration::from_secs(30);

        for topology in [&default, &custom] {
            let report = topology::ensure(&js, topology).await.expect("ensure");
            assert_eq!(report.partitions, Action::Created);
            assert_eq!(report.streams.len(), 4);
            for (report, stream) in report.streams.iter().zip(Stream::ALL) {
                assert_eq!(report.stream, stream);
                assert_eq!(report.action, Action::Created, "{}", report.name);
                let info = stream_info(&js, &report.name).await.expect("created");
                let config = info.config;
                assert_eq!(config.subjects, topology.prefix.stream_subjects(stream));
                assert_eq!(config.storage, stream::StorageType::File);
                assert_eq!(config.retention, stream::RetentionPolicy::Limits);
                assert_eq!(config.duplicate_window, topology.duplicate_window);
                assert_eq!(config.num_replicas, 1);
                assert_eq!(config.max_age, Duration::ZERO, "nothing expires");
                assert_eq!(config.max_messages, -1, "no count limit");
                assert_eq!(config.max_bytes, -1, "no size limit");
                let description = config.description.expect("a description");
                assert!(
                    description.starts_with(&format!("{}: ", topology.prefix)),
                    "{description}"
                );
                assert!(!description.contains("amends amends"), "{description}");
            }
            let meta = js
                .get_key_value(topology.prefix.meta_bucket())
                .await
                .expect("meta bucket");
            let stored = meta
                .get(topology::PARTITIONS_KEY)
                .await
                .expect("read")
                .expect("recorded");
            assert_eq!(
                &stored[..],
                topology.partitions.get().to_string().as_bytes()
            );
        }

        let names: Vec<String> = Stream::ALL
            .iter()
            .map(|s| default.prefix.stream_name(*s))
            .collect();
        assert_eq!(
            names,
            ["AMENDS_REQ", "AMENDS_DEC", "AMENDS_APOLOGY", "AMENDS_DLQ"]
        );
        assert!(stream_info(&js, "ACME_LEDGER_REQ").await.is_some());
    })
    .await;
}

#[tokio::test]
async fn ensure_twice_keeps_everything() {
    // Proves ensure is idempotent: a second run reports all kept; creation
    // time, config and messages are unchanged.
    within(async {
        let (_server, _client, js) = server_and_js().await;
        let topology = topology("amends", 4);
        topology::ensure(&js, &topology)
            .await
            .expect("first ensure");
        let req = topology.prefix.stream_name(Stream::Requests);
        js.publish(subject_in(&topology.prefix, Stream::Requests), "x".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
        let before = stream_info(&js, &req).await.expect("exists");

        let report = topology::ensure(&js, &topology)
            .await
            .expect("second ensure");
        assert_eq!(report.partitions, Action::Kept);
        assert!(
            report.streams.iter().all(|s| s.action == Action::Kept),
            "{report:?}"
        );
        let after = stream_info(&js, &req).await.expect("exists");
        assert_eq!(after.created, before.created);
        assert_eq!(after.config, before.config);
        assert_eq!(after.state.messages, 1);
    })
    .await;
}

#[tokio::test]
async fn incompatible_stream_is_refused_and_left_unchanged() {
    // Proves an incompatible stream is refused, named and untouched: hand-make
    // one per field, ensure, compare before/after.
    within(async {
        let (_server, _client, js) = server_and_js().await;
        struct Case {
            prefix: &'static str,
            stream: Stream,
            field: &'static str,
            expected: &'static str,
            found: &'static str,
            edit: fn(&mut stream::Config),
        }
        let cases = [
            Case {
                prefix: "subjects",
                stream: Stream::Requests,
                field: "subjects",
                expected: r#"["subjects.req.*"]"#,
                found: r#"["subjects.req.>"]"#,
                edit: |c| c.subjects = vec!["subjects.req.>".to_owned()],
            },
            Case {
                prefix: "window",
                stream: Stream::Requests,
                field: "duplicate_window",
                expected: "120s",
                found: "30s",
                edit: |c| c.duplicate_window = Duration::from_secs(30),
            },
            Case {
                prefix: "storage",
                stream: Stream::Decisions,
                field: "storage",
                expected: "file",
                found: "memory",
                edit: |c| c.storage = stream::StorageType::Memory,
            },
            Case {
                prefix: "retention",
                stream: Stream::Apologies,
                field: "retention",
                expected: "limits",
                found: "workqueue",
                edit: |c| c.retention = stream::RetentionPolicy::WorkQueue,
            },
            Case {
                prefix: "persist",
                stream: Stream::DeadLetters,
                field: "persist_mode",
                expected: "default",
                found: "async",
                edit: |c| c.persist_mode = Some(stream::PersistenceMode::Async),
            },
        ];
        for case in cases {
            let topology = topology(case.prefix, 4);
            let name = topology.prefix.stream_name(case.stream);
            let mut config = stream::Config {
                name: name.clone(),
                subjects: topology.prefix.stream_subjects(case.stream),
                storage: stream::StorageType::File,
                duplicate_window: topology.duplicate_window,
                ..stream::Config::default()
            };
            (case.edit)(&mut config);
            js.create_stream(config).await.expect("create by hand");
            js.publish(subject_in(&topology.prefix, case.stream), "kept".into())
                .await
                .expect("publish")
                .await
                .expect("ack");
            let before = stream_info(&js, &name).await.expect("exists");

            let err = topology::ensure(&js, &topology)
                .await
                .expect_err("an incompatible stream is refused");
            match &err {
                Error::IncompatibleStream {
                    stream,
                    field,
                    expected,
                    found,
                } => {
                    assert_eq!(stream, &name);
                    assert_eq!(*field, case.field, "{err}");
                    assert_eq!(expected, case.expected, "{err}");
                    assert_eq!(found, case.found, "{err}");
                }
                other => panic!(
                    "{}: expected IncompatibleStream, got {other:?}",
                    case.prefix
                ),
            }
            assert!(
                err.to_string()
                    .contains("leaves existing streams unchanged"),
                "{err}"
            );

            let after = stream_info(&js, &name).await.expect("still there");
            assert_eq!(after.config, before.config, "{}", case.prefix);
            assert_eq!(after.created, before.created, "{}", case.prefix);
            assert_eq!(after.state.messages, 1, "{}", case.prefix);
            for other in Stream::ALL.into_iter().filter(|s| *s != case.stream) {
                let other = topology.prefix.stream_name(other);
                assert!(
                    stream_info(&js, &other).await.is_none(),
                    "{other} was created"
                );
            }
            let bucket_stream = format!("KV_{}", topology.prefix.meta_bucket());
            assert!(
                stream_info(&js, &bucket_stream).await.is_none(),
                "meta was recorded"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn another_partition_count_is_refused() {
    // Proves a deployment cannot be reopened with another N: ensure with 4,
    // then 8 (refused), then 4 (kept).
    within(async {
        let (_server, _client, js) = server_and_js().await;
        topology::ensure(&js, &topology("amends", 4))
            .await
            .expect("create with 4");

        let err = topology::ensure(&js, &topology("amends", 8))
            .await
            .expect_err("8 is refused");
        assert!(
            matches!(
                err,
                Error::PartitionCountMismatch {
                    stored: 4,
                    configured: 8
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("cannot change"), "{err}");

        let report = topology::ensure(&js, &topology("amends", 4))
            .await
            .expect("4 again");
        assert_eq!(report.partitions, Action::Kept);
    })
    .await;
}

#[tokio::test]
async fn invalid_topology_is_refused_before_any_request() {
    // Proves out-of-range settings are refused before any request: 0 replicas,
    // a 0 window; no stream exists after.
    within(async {
        let (_server, _client, js) = server_and_js().await;
        let mut zero_replicas = topology("amends", 1);
        zero_replicas.replicas = 0;
        let mut zero_window = topology("amends", 1);
        zero_window.duplicate_window = Duration::ZERO;
        for (topology, field) in [
            (zero_replicas, "replicas"),
            (zero_window, "duplicate_window"),
        ] {
            match topology::ensure(&js, &topology).await {
                Err(Error::InvalidTopology { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: expected InvalidTopology, got {other:?}"),
            }
        }
        let account = js.query_account().await.expect("account info");
        assert_eq!(account.streams, 0, "a refused topology created streams");
    })
    .await;
}

#[tokio::test]
async fn ensure_adds_the_ownership_subjects_to_a_decisions_stream_from_before_the_fence() {
    // Proves an existing deployment upgrades in place: a decisions stream made as earlier builds made it (only `amends.dec.*`) with a decision on it is reported Upgraded, gains `amends.owner.*`, and keeps its messages and creation time; a second ensure keeps it.
    within(async {
        let (_server, _client, js) = server_and_js().await;
        let topology = topology("amends", 2);
        let name = topology.prefix.stream_name(Stream::Decisions);
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![topology.prefix.dec_wildcard()],
            storage: stream::StorageType::File,
            duplicate_window: topology.duplicate_window,
            ..stream::Config::default()
        })
        .await
        .expect("create as before");
        js.publish(
            subject_in(&topology.prefix, Stream::Decisions),
            "old".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
        let before = stream_info(&js, &name).await.expect("exists");
        let report = topology::ensure(&js, &topology).await.expect("ensure");
        let decisions = &report.streams[1];
        assert_eq!(
            (decisions.stream, decisions.action),
            (Stream::Decisions, Action::Upgraded)
        );
        let after = stream_info(&js, &name).await.expect("exists");
        assert_eq!(after.config.subjects, ["amends.dec.*", "amends.owner.*"]);
        assert_eq!(after.created, before.created);
        assert_eq!(after.state.messages, 1);
        let again = topology::ensure(&js, &topology)
            .await
            .expect("ensure again");
        assert_eq!(again.streams[1].action, Action::Kept);
    })
    .await;
}
