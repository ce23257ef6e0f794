//! A 3-node JetStream cluster of real `nats-server` processes for tests.
//!
//! [`Cluster::start`] runs three pinned `nats-server`s (the binary of
//! [`super::binary`]) on `127.0.0.1`, each with a free client port, a free
//! cluster (route) port, a server name, a store directory of its own and
//! routes to the two others, in one cluster named [`CLUSTER_NAME`]; it
//! returns once every node serves and JetStream has a meta leader that
//! knows all three peers, so that streams with 3 replicas can be created.
//! [`Cluster::kill9`] and [`Cluster::restart`] crash and restart one node
//! on its ports and store; [`Cluster::stream_leader`] names the node that
//! leads a stream, so that a test can kill exactly that one. Dropping the
//! cluster kills every node by its PID and removes the directories.
//!
//! As with [`super::Server`], every function panics on failure with the
//! nodes' logs in the message.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Exit, PORT_ATTEMPTS_MAX, READY_TIMEOUT};

/// The number of nodes: the smallest cluster that keeps a quorum of an R3
/// stream with one node down.
pub const NODES: usize = 3;

/// The cluster's name (`cluster { name }`).
pub const CLUSTER_NAME: &str = "amends-test";

/// How long the nodes may take to elect a JetStream meta leader that
/// knows every peer, once they all serve. A few seconds on a healthy
/// machine; a slow CI machine gets a wide margin.
pub const META_LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one probe of the meta leader waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// How often readiness and leadership are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// One node of a [`Cluster`].
#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    /// Store, configuration, ports file, log; removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("server.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The node's configuration: its ports, its store, routes to `peers`
    /// (the other nodes' cluster ports).
    fn conf(&self, peers: &[u16]) -> String {
        let routes: Vec<String> = peers
            .iter()
            .map(|p| format!("    nats-route://127.0.0.1:{p}"))
            .collect();
        format!(
            "# Written by amends_nats::test_support::cluster.\n\
             server_name: {name}\n\
             listen: 127.0.0.1:{port}\n\
             jetstream {{\n  store_dir: \"{store}\"\n}}\n\
             cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{cluster_port}\n  routes: [\n{routes}\n  ]\n}}\n",
            name = self.name,
            port = self.port,
            store = self.dir.path().join("store").display(),
            cluster_port = self.cluster_port,
            routes = routes.join("\n"),
        )
    }

    /// Spawns the node from its configuration file; does not wait.
    fn spawn(&mut self, binary: &std::path::Path) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the node's log");
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.conf_path())
            .arg("--ports_file_dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log's handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        self.child = Some(child);
    }

    /// Whether the node serves: its own ports file is written (the port is
    /// its own, not another process's) and it accepts a connection. An
    /// exit is an error.
    fn poll_ready(&mut self) -> Result<bool, Exit> {
        let Some(child) = self.child.as_mut() else {
            return Err(Exit::Exited("not running".to_owned()));
        };
        if let Some(status) = child.try_wait().expect("poll the node") {
            self.child = None;
            return Err(if self.log().contains("address already in use") {
                Exit::PortTaken
            } else {
                Exit::Exited(status.to_string())
            });
        }
        let suffix = format!("_{}.ports", child.id());
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        Ok(super::has_file_ending(self.dir.path(), &suffix)
            && TcpStream::connect_timeout(&addr, POLL_INTERVAL).is_ok())
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL on Unix; it fails only on a reaped child, which
            // `take` rules out.
            child.kill().expect("SIGKILL the node");
            child.wait().expect("reap the node");
        }
    }
}

/// Three clustered `nats-server`s with JetStream, on loopback.
#[derive(Debug)]
pub struct Cluster {
    binary: PathBuf,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Starts the cluster and waits until JetStream has a meta leader that
    /// knows all [`NODES`] peers. Picks other free ports and starts again
    /// (at most [`PORT_ATTEMPTS_MAX`] times) when one was taken.
    pub async fn start() -> Cluster {
        let binary = super::binary();
        let mut cluster = Cluster {
            binary,
            nodes: Vec::new(),
        };
        for attempt in 1..=PORT_ATTEMPTS_MAX {
            cluster.kill_all();
            cluster.nodes = (1..=NODES).map(new_node).collect();
            let cluster_ports: Vec<u16> = cluster.nodes.iter().map(|n| n.cluster_port).collect();
            for node in &mut cluster.nodes {
                let peers: Vec<u16> = cluster_ports
                    .iter()
                    .copied()
                    .filter(|p| *p != node.cluster_port)
                    .collect();
                fs::write(node.conf_path(), node.conf(&peers))
                    .expect("write the node's configuration");
            }
            for index in 0..NODES {
                let binary = cluster.binary.clone();
                cluster.nodes[index].spawn(&binary);
            }
            match cluster.wait_serving(None) {
                Ok(()) => break,
                Err(Exit::PortTaken) if attempt < PORT_ATTEMPTS_MAX => continue,
                Err(exit) => panic!("{}", cluster.failure(&exit)),
            }
        }
        cluster.wait_meta_leader().await;
        cluster
    }

    /// Every node's client URL, `nats://127.0.0.1:<port>`, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Node `node`'s client URL.
    pub fn url(&self, node: usize) -> String {
        self.nodes[node].url()
    }

    /// Node `node`'s server name (what stream infos name as leader).
    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// Node `node`'s process id, if it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].child.as_ref().map(Child::id)
    }

    /// Every node's log so far, each under its name.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills node `node` with SIGKILL, as a crash would, and reaps it. Its
    /// store stays. Does nothing if it is not running.
    pub fn kill9(&mut self, node: usize) {
        self.nodes[node].kill9();
    }

    /// Starts node `node` again on its ports and store (killing it first
    /// if it still runs) and waits until it serves. It rejoins the cluster
    /// in the background; JetStream catches its replicas up.
    pub fn restart(&mut self, node: usize) {
        self.nodes[node].kill9();
        let binary = self.binary.clone();
        self.nodes[node].spawn(&binary);
        if let Err(exit) = self.wait_serving(Some(node)) {
            panic!("{}", self.failure(&exit));
        }
    }

    /// The index of the node that leads stream `name`, as the stream's info
    /// says (`cluster.leader`), waiting up to [`META_LEADER_TIMEOUT`] for a
    /// leader to be elected.
    pub async fn stream_leader(&self, js: &async_nats::jetstream::Context, name: &str) -> usize {
        let deadline = Instant::now() + META_LEADER_TIMEOUT;
        loop {
            if let Ok(mut stream) = js.get_stream(name).await
                && let Ok(info) = stream.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.as_deref())
                && let Some(index) = self.nodes.iter().position(|n| n.name == leader)
            {
                return index;
            }
            assert!(
                Instant::now() < deadline,
                "stream {name} has no leader after {META_LEADER_TIMEOUT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the stream `name` has a leader and every replica is
    /// current (none offline or lagging), as after a restarted node caught
    /// up.
    pub async fn wait_stream_current(&self, js: &async_nats::jetstream::Context, name: &str) {
        let deadline = Instant::now() + META_LEADER_TIMEOUT;
        loop {
            if let Ok(mut stream) = js.get_stream(name).await
                && let Ok(info) = stream.info().await
                && let Some(cluster) = info.cluster.as_ref()
                && cluster.leader.is_some()
                && cluster.replicas.len() == NODES - 1
                && cluster.replicas.iter().all(|r| r.current && !r.offline)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stream {name} not current on every node after {META_LEADER_TIMEOUT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Creates `topology`'s streams and buckets on the cluster and waits
    /// until each stream has a leader and every replica is current, so
    /// that a worker started next does not meet a stream still electing
    /// its leader (its JetStream calls would time out and it would stop).
    /// Creating replicated streams on a cluster that just formed can
    /// outlast a client's timeout on a loaded machine: `ensure` (which is
    /// idempotent) is tried again for up to [`META_LEADER_TIMEOUT`].
    pub async fn ensure_ready(
        &self,
        js: &async_nats::jetstream::Context,
        topology: &crate::topology::Topology,
    ) {
        let deadline = Instant::now() + META_LEADER_TIMEOUT;
        while let Err(e) = crate::topology::ensure(js, topology).await {
            assert!(Instant::now() < deadline, "ensure: {e}\n{}", self.logs());
            eprintln!("ensure on the new cluster failed, trying again: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for stream in crate::topology::Stream::ALL {
            self.wait_stream_current(js, &topology.prefix.stream_name(stream))
                .await;
            for subject in topology.prefix.stream_subjects(stream) {
                self.wait_stream_interest(js, &subject).await;
            }
        }
    }

    /// Waits until a publish on `subject_pattern` (a stream's subject, its
    /// wildcards filled in) reaches the stream from `js`'s node. Only a
    /// stream's leader subscribes to its subjects, and that interest
    /// reaches the other nodes over the routes a moment after the
    /// election: until then a publish from another node has no responders
    /// (`StreamNotFound` in async-nats), as a worker's first decision write
    /// or a test's first request would. Each probe names another stream
    /// (`Nats-Expected-Stream`), so the leader refuses it and stores
    /// nothing.
    pub async fn wait_stream_interest(
        &self,
        js: &async_nats::jetstream::Context,
        subject_pattern: &str,
    ) {
        use async_nats::jetstream::context::PublishErrorKind;
        let subject = subject_pattern
            .replace('*', "0")
            .replace('>', "interest-probe");
        let deadline = Instant::now() + META_LEADER_TIMEOUT;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_STREAM,
                "amends-test-interest-probe",
            );
            let answer = match js
                .publish_with_headers(subject.clone(), headers, "".into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            match answer {
                Ok(()) => panic!(
                    "a probe on {subject} naming another stream was stored\n{}",
                    self.logs()
                ),
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {}
                Err(e) if e.kind() == PublishErrorKind::TimedOut => {}
                // The leader answered (with its refusal): interest is here.
                Err(_) => return,
            }
            assert!(
                Instant::now() < deadline,
                "no stream answers on {subject} after {META_LEADER_TIMEOUT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until every node (or only `only`) serves.
    fn wait_serving(&mut self, only: Option<usize>) -> Result<(), Exit> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let indices: Vec<usize> = match only {
            Some(node) => vec![node],
            None => (0..NODES).collect(),
        };
        let mut waiting = indices;
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for index in waiting {
                if !self.nodes[index].poll_ready()? {
                    still.push(index);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Exit::Timeout);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// Waits until a JetStream meta leader is elected and knows every peer:
    /// until a stream of [`NODES`] replicas can be placed (a probe stream,
    /// created, then deleted). Before that, stream creation fails (no meta
    /// leader yet, or too few peers known).
    async fn wait_meta_leader(&self) {
        let client = connect(self).await;
        // A short timeout: a request sent before there is a meta leader is
        // never answered, and waiting out the default 5 s delays every
        // cluster test. (A probe created by a request that timed out is
        // created again: the same configuration is accepted.)
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(PROBE_TIMEOUT)
            .build(client);
        let deadline = Instant::now() + META_LEADER_TIMEOUT;
        let probe = async_nats::jetstream::stream::Config {
            name: "amends-test-cluster-probe".to_owned(),
            subjects: vec!["amends-test-cluster-probe".to_owned()],
            num_replicas: NODES,
            ..Default::default()
        };
        loop {
            let last_error = match js.create_stream(probe.clone()).await {
                Ok(_) => break,
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "no JetStream meta leader with {NODES} peers after {META_LEADER_TIMEOUT:?} \
                 (last: {last_error})\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        js.delete_stream(&probe.name)
            .await
            .unwrap_or_else(|e| panic!("delete the probe stream: {e}\n{}", self.logs()));
    }

    fn failure(&self, exit: &Exit) -> String {
        let what = match exit {
            Exit::PortTaken => format!(
                "every one of {PORT_ATTEMPTS_MAX} sets of free ports had one taken before nats-server bound it"
            ),
            Exit::Exited(status) => format!("a node exited at start ({status})"),
            Exit::Timeout => format!("a node did not accept connections within {READY_TIMEOUT:?}"),
        };
        format!(
            "{what}\nbinary: {}\nlogs:\n{}",
            self.binary.display(),
            self.logs()
        )
    }

    fn kill_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill by PID (each `Child` handle), never by name; then each
        // node's TempDir removes its directory.
        self.kill_all();
    }
}

/// Node `n` (1-based) with two free ports and a directory.
fn new_node(n: usize) -> Node {
    let dir = tempfile::Builder::new()
        .prefix(&format!("amends-nats-cluster-n{n}-"))
        .tempdir()
        .expect("create the node's temporary directory");
    let port = super::free_port();
    let cluster_port = loop {
        let p = super::free_port();
        if p != port {
            break p;
        }
    };
    Node {
        name: format!("n{n}"),
        port,
        cluster_port,
        dir,
        child: None,
    }
}

/// Connects a client to every node of `cluster` (it fails over between
/// them), reconnecting as quickly as [`super::connect`] does.
pub async fn connect(cluster: &Cluster) -> async_nats::Client {
    let urls = cluster.urls();
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            let attempts = u64::try_from(attempts).unwrap_or(u64::MAX);
            Duration::from_millis(attempts.saturating_mul(50).min(500))
        })
        .connect(urls.as_slice())
        .await
        .unwrap_or_else(|e| panic!("connect to the test cluster at {urls:?}: {e}"))
}
