//! Helpers shared by the integration tests.

use std::future::Future;
use std::time::Duration;

use amends_core::command::Topic;
use amends_core::route::Partitions;
use amends_nats::topology::{Prefix, Stream, Topology};
use async_nats::jetstream::{self, stream};

pub use amends_nats::test_support::{Options, Server, connect};

/// The bound on every test body. The whole binary runs in a few seconds;
/// a test that needs this long is stuck, and fails instead of hanging.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a test body, failing it if it takes longer than [`TEST_TIMEOUT`].
pub async fn within<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .unwrap_or_else(|_| panic!("test body did not finish within {TEST_TIMEOUT:?}"))
}

/// The bound on a test body that starts a 3-node cluster: electing its
/// leaders takes a few seconds, a killed leader's replacement a few more.
pub const CLUSTER_TEST_TIMEOUT: Duration = Duration::from_secs(50);

/// [`within`] for a test on a cluster: fails it after
/// [`CLUSTER_TEST_TIMEOUT`].
pub async fn within_cluster<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(CLUSTER_TEST_TIMEOUT, body)
        .await
        .unwrap_or_else(|_| panic!("test body did not finish within {CLUSTER_TEST_TIMEOUT:?}"))
}

/// A topology with the defaults, `prefix` and `partitions` partitions.
pub fn topology(prefix: &str, partitions: u32) -> Topology {
    let mut topology = Topology::new(Partitions::new(partitions).expect("a valid count"));
    topology.prefix = Prefix::new(prefix).expect("a valid prefix");
    topology
}

/// A started server, a client connected to it, and its JetStream context.
pub async fn server_and_js() -> (Server, async_nats::Client, jetstream::Context) {
    let server = Server::start();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    (server, client, js)
}

/// The info of stream `name`, or `None` if it does not exist.
pub async fn stream_info(js: &jetstream::Context, name: &str) -> Option<stream::Info> {
    match js.get_stream(name).await {
        Ok(stream) => Some(stream.cached_info().clone()),
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            None
        }
        Err(err) => panic!("stream info of {name}: {err}"),
    }
}

/// A subject that `stream` takes: partition 0's, or the apology topic `t`.
pub fn subject_in(prefix: &Prefix, stream: Stream) -> String {
    let p0 = Partitions::new(1)
        .expect("a valid count")
        .id(0)
        .expect("0 < 1");
    match stream {
        Stream::Requests => prefix.req(p0),
        Stream::Decisions => prefix.dec(p0),
        Stream::Apologies => prefix.apology(&Topic::new("t").expect("a valid topic")),
        Stream::DeadLetters => prefix.dlq(p0),
    }
}
