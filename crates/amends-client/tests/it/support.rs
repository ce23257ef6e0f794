//! A deployment for the client to talk to: a nats-server, the topology, and
//! one worker per partition over a store in a temporary directory.

use std::future::Future;
use std::time::Duration;

use amends_client::{Client, Options};
use amends_core::command::{AccountId, Amount};
use amends_core::partition::{Config, Machine};
use amends_core::route::Partitions;
use amends_core::{Command, OpId, Request};
use amends_nats::service::{self, Service};
use amends_nats::test_support::{Server, connect};
use amends_nats::topology::{self, Prefix, Topology};
use amends_nats::worker;
use amends_store::Store;
use async_nats::jetstream;
use tokio::task::JoinHandle;

/// The bound on every test body: a test that takes this long is stuck, and
/// fails instead of hanging.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(25);

/// How long one try of `submit_and_wait` waits in tests where the workers
/// run: they answer in milliseconds.
pub const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a test body, failing it if it takes longer than [`TEST_TIMEOUT`].
pub async fn within<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .unwrap_or_else(|_| panic!("test body did not finish within {TEST_TIMEOUT:?}"))
}

/// One deployment. The workers stop when it is dropped.
pub struct Deployment {
    pub server: Server,
    js: jetstream::Context,
    topology: Topology,
    dir: tempfile::TempDir,
    workers: Vec<JoinHandle<()>>,
    _store: Option<Store>,
}

impl Deployment {
    /// A server with the topology ensured (`partitions` partitions, prefix
    /// `prefix`, a 1 s duplicate window so tests can outlast it), no
    /// workers yet.
    pub async fn start(prefix: &str, partitions: u32) -> Deployment {
        Deployment::start_with_window(prefix, partitions, Duration::from_secs(1)).await
    }

    /// As [`Deployment::start`], with another duplicate window.
    pub async fn start_with_window(
        prefix: &str,
        partitions: u32,
        duplicate_window: Duration,
    ) -> Deployment {
        let server = Server::start();
        let nats = connect(&server).await;
        let js = jetstream::new(nats);
        let mut topology = Topology::new(Partitions::new(partitions).expect("a valid count"));
        topology.prefix = Prefix::new(prefix).expect("a valid prefix");
        topology.duplicate_window = duplicate_window;
        topology::ensure(&js, &topology).await.expect("ensure");
        Deployment {
            server,
            js,
            topology,
            dir: tempfile::tempdir().expect("tempdir"),
            workers: Vec::new(),
            _store: None,
        }
    }

    /// Opens the store and runs one worker per partition in the background.
    pub fn spawn_workers(&mut self) {
        let partitions = self.topology.partitions;
        let store = Store::open(self.dir.path(), amends_store::Options::new(partitions))
            .expect("open store");
        for id in partitions.ids() {
            let partition = store.partition(id).expect("partition");
            let machine = Machine::new(id, partitions, Config::default());
            let options = worker::Options {
                fetch_wait: Duration::from_millis(100),
                ..worker::Options::default()
            };
            let js = self.js.clone();
            let topology = self.topology.clone();
            self.workers.push(tokio::spawn(async move {
                match worker::run_partition(&js, &topology, machine, partition, options).await {
                    Err(e) => panic!("worker of partition {id} stopped: {e}"),
                    Ok(never) => match never {},
                }
            }));
        }
        self._store = Some(store);
    }

    /// Opens the store and runs the service (every partition, the ticker,
    /// the status endpoint) in the background, instead of bare workers.
    pub fn spawn_service(&mut self) {
        let partitions = self.topology.partitions;
        let store = Store::open(self.dir.path(), amends_store::Options::new(partitions))
            .expect("open store");
        let options = service::Options {
            worker: worker::Options {
                fetch_wait: Duration::from_millis(100),
                ..worker::Options::default()
            },
            ..service::Options::default()
        };
        let service = Service::new(&self.js, &self.topology, &store, Config::default(), options)
            .expect("service");
        self.workers.push(tokio::spawn(async move {
            match service.run().await {
                Err(e) => panic!("service returned: {e}"),
                Ok(never) => match never {},
            }
        }));
        self._store = Some(store);
    }

    /// The deployment's JetStream context, to publish behind the client's
    /// back.
    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// The deployment's topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A client with the given prefix, reading the partition count from
    /// the deployment.
    pub async fn client(&self) -> Client {
        let mut options = Options::new(self.server.url());
        options.prefix =
            amends_client::Prefix::new(self.topology.prefix.as_str()).expect("a valid prefix");
        Client::connect(options).await.expect("connect")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.abort();
        }
    }
}

/// A request with a fresh op id.
pub fn request(command: Command) -> Request {
    Request {
        op_id: Client::new_op_id(),
        command,
        apology_topic: None,
    }
}

/// An account id.
pub fn account(name: &str) -> AccountId {
    AccountId::new(name).expect("a valid account id")
}

/// An amount.
pub fn amount(n: u64) -> Amount {
    Amount::new(n).expect("a valid amount")
}

/// `open_account` without floor or ceiling.
pub fn open(name: &str) -> Command {
    Command::OpenAccount {
        account: account(name),
        floor: 0,
        ceiling: None,
    }
}

/// The op id's text, for messages.
pub fn text(op_id: OpId) -> String {
    op_id.to_string()
}
