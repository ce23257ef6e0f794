//! The `amends serve` child process and helpers shared by the tests.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::{Duration, Instant};

use amends_client::{Client, Options};
use amends_core::route::Partitions;

pub use amends_nats::test_support::Server;
use amends_nats::test_support::serve;

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
    pub fn start(server: &Server, data_dir: &Path, partitions: u32) -> Serve {
        Serve::start_with(server, data_dir, partitions, &[])
    }

    /// [`Serve::start`] with more flags.
    pub fn start_with(server: &Server, data_dir: &Path, partitions: u32, more: &[&str]) -> Serve {
        Serve(serve::Serve::start(
            Path::new(AMENDS),
            server,
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
pub async fn client(server: &Server, partitions: u32) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut options = Options::new(server.url());
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
