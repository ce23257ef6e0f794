//! The `amends serve` child process and helpers shared by the tests.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::{Duration, Instant};

use amends_client::{Client, Options};
use amends_core::route::Partitions;

pub use amends_nats::test_support::Server;
use amends_nats::test_support::cluster::{self, Cluster};
use amends_nats::test_support::serve;

/// Where a test's deployment lives: one nats-server, or a 3-node cluster.
pub trait Nats {
    /// The URLs to give `--nats-url` (comma-separated for a cluster).
    fn nats_url(&self) -> String;
    /// A raw NATS client that reconnects quickly.
    fn connect(&self) -> impl std::future::Future<Output = async_nats::Client>;
}

impl Nats for Server {
    fn nats_url(&self) -> String {
        self.url()
    }
    async fn connect(&self) -> async_nats::Client {
        amends_nats::test_support::connect(self).await
    }
}

impl Nats for Cluster {
    fn nats_url(&self) -> String {
        self.urls().join(",")
    }
    async fn connect(&self) -> async_nats::Client {
        cluster::connect(self).await
    }
}

/// The built binary.
pub const AMENDS: &str = env!("CARGO_BIN_EXE_amends");

/// An `amends serve` process of the built binary
/// ([`amends_nats::test_support::serve::Serve`], whose methods it has).
pub struct Serve(serve::Serve);

impl Serve {
    /// Starts `amends serve` on `server` with its store in `data_dir`,
    /// `partitions` partitions and a 1 s duplicate window (so that a
    /// resubmission after a crash that lost a reply reaches the log and is
    /// answered from the dedup records).
    pub fn start(server: &impl Nats, data_dir: &Path, partitions: u32) -> Serve {
        Serve::start_with(server, data_dir, partitions, &[])
    }

    /// [`Serve::start`] with more flags.
    pub fn start_with(
        server: &impl Nats,
        data_dir: &Path,
        partitions: u32,
        more: &[&str],
    ) -> Serve {
        Serve(serve::Serve::start(
            Path::new(AMENDS),
            &server.nats_url(),
            data_dir,
            partitions,
            more,
        ))
    }
}

impl Deref for Serve {
    type Target = serve::Serve;
    fn deref(&self) -> &serve::Serve {
        &self.0
    }
}

impl DerefMut for Serve {
    fn deref_mut(&mut self) -> &mut serve::Serve {
        &mut self.0
    }
}

/// A client of the deployment, once `amends serve` has created it (the
/// client reads the partition count from the meta bucket).
pub async fn client(server: &impl Nats, partitions: u32) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut options = Options::new(String::new());
        options.servers = server.nats_url().split(',').map(str::to_owned).collect();
        options.name = Some("e2e".to_owned());
        match Client::connect(options).await {
            Ok(client) => {
                assert_eq!(
                    client.partitions(),
                    Partitions::new(partitions).expect("count")
                );
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no deployment after 10 s: {e}"),
        }
    }
}

/// Waits up to `within` for `serve` to exit on its own; fails unless it
/// exits non-zero having logged `says`.
pub fn assert_exits_saying(serve: &mut Serve, within: Duration, says: &str) {
    let code = tokio::task::block_in_place(|| serve.wait_exit(within));
    assert!(
        matches!(code, Some(c) if c != 0),
        "serve exits non-zero, got {code:?}:\n{}",
        serve.log()
    );
    assert!(
        serve.log().contains(says),
        "{says:?} not logged:\n{}",
        serve.log()
    );
}
