//! JetStream behaviour the protocol relies on, checked on the pinned server.

use std::time::{Duration, Instant};

use amends_nats::topology::{self, Stream, header};
use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishAckFuture};

use crate::support::{Options, Server, connect, server_and_js, subject_in, topology, within};

/// How long the client may take to notice a killed server, and to connect
/// again to a restarted one (it retries every 50 to 500 ms).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers of a request with op id `op_id`.
fn msg_id(op_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, op_id);
    headers
}

async fn acked(
    ack: Result<PublishAckFuture, jetstream::context::PublishError>,
) -> jetstream::publish::PublishAck {
    ack.expect("publish").await.expect("ack")
}

#[tokio::test]
async fn same_msg_id_within_the_window_is_stored_once() {
    // Proves the protocol's Nats-Msg-Id reliance: publish one id twice,
    // another once, the first again after a 1 s window; 3 stored.
    within(async {
        let (_server, _client, js) = server_and_js().await;
        let mut topology = topology("amends", 1);
        topology.duplicate_window = Duration::from_secs(1);
        topology::ensure(&js, &topology).await.expect("ensure");
        let subject = subject_in(&topology.prefix, Stream::Requests);
        let op_id = uuid::Uuid::now_v7().to_string();

        let first = acked(
            js.publish_with_headers(subject.clone(), msg_id(&op_id), "a".into())
                .await,
        )
        .await;
        let again = acked(
            js.publish_with_headers(subject.clone(), msg_id(&op_id), "a".into())
                .await,
        )
        .await;
        assert!(!first.duplicate);
        assert!(again.duplicate, "{again:?}");
        assert_eq!(again.sequence, first.sequence);

        let other = uuid::Uuid::now_v7().to_string();
        let second = acked(
            js.publish_with_headers(subject.clone(), msg_id(&other), "b".into())
                .await,
        )
        .await;
        assert!(!second.duplicate);
        assert_eq!(second.sequence, first.sequence + 1);

        let name = topology.prefix.stream_name(Stream::Requests);
        let mut stream = js.get_stream(&name).await.expect("stream");
        assert_eq!(stream.info().await.expect("info").state.messages, 2);

        tokio::time::sleep(topology.duplicate_window + Duration::from_millis(200)).await;
        let late = acked(
            js.publish_with_headers(subject, msg_id(&op_id), "a".into())
                .await,
        )
        .await;
        assert!(!late.duplicate, "the window is over: {late:?}");
        assert_eq!(stream.info().await.expect("info").state.messages, 3);
    })
    .await;
}

#[tokio::test]
async fn acknowledged_message_survives_kill9_and_restart_with_sync_always() {
    // Proves an acked request survives SIGKILL + restart (sync_interval:
    // always) and the client reconnects; no power loss is simulated.
    within(async {
        let mut server = Server::start_with(Options {
            sync_always: true,
            ..Options::default()
        });
        let client = connect(&server).await;
        let js = jetstream::new(client.clone());
        let topology = topology("amends", 1);
        topology::ensure(&js, &topology).await.expect("ensure");
        let subject = subject_in(&topology.prefix, Stream::Requests);
        let op_id = uuid::Uuid::now_v7().to_string();
        let ack = acked(
            js.publish_with_headers(subject.clone(), msg_id(&op_id), "body".into())
                .await,
        )
        .await;
        assert!(
            server.log().contains("Using configuration file"),
            "{}",
            server.log()
        );

        let pid = server.pid();
        server.kill9();
        assert_eq!(server.pid(), None);
        // The harness blocks this task's thread, so let the client notice
        // the lost connection before the server is back; a request written
        // to the dead socket would be lost (core NATS is at most once).
        wait_for_state(&client, |s| s != State::Connected, "disconnected").await;
        server.restart();
        assert_ne!(server.pid(), pid);
        wait_for_state(&client, |s| s == State::Connected, "reconnected").await;

        let name = topology.prefix.stream_name(Stream::Requests);
        let stream = js.get_stream(&name).await.expect("stream after restart");
        let message = stream
            .get_raw_message(ack.sequence)
            .await
            .expect("the acknowledged message");
        assert_eq!(&message.payload[..], b"body");
        assert_eq!(
            message.headers.get(header::MSG_ID).map(|v| v.as_str()),
            Some(op_id.as_str())
        );

        let next = acked(
            js.publish_with_headers(
                subject,
                msg_id(&uuid::Uuid::now_v7().to_string()),
                "next".into(),
            )
            .await,
        )
        .await;
        assert_eq!(next.sequence, ack.sequence + 1);
        let report = topology::ensure(&js, &topology)
            .await
            .expect("ensure after restart");
        assert!(
            report
                .streams
                .iter()
                .all(|s| s.action == topology::Action::Kept)
        );
    })
    .await;
}

/// Waits until the client's connection state satisfies `want`.
async fn wait_for_state(client: &async_nats::Client, want: impl Fn(State) -> bool, what: &str) {
    let deadline = Instant::now() + RECONNECT_TIMEOUT;
    while !want(client.connection_state()) {
        assert!(
            Instant::now() < deadline,
            "not {what} within {RECONNECT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
