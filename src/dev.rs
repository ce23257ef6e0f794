//! `amends dev`: a whole deployment on this machine, with a demo.
//!
//! Starts the pinned `nats-server` (JetStream, loopback, a free port, its
//! store in the data directory), runs the service on every partition in
//! this process through the same code as `amends serve`, serves the device
//! page and the operator console (`--http`, see `web`), walks through a
//! short demo with amends-client (a confirmation, two refusals, a duplicate,
//! an apology and a transfer saga), then serves until Ctrl-C or SIGTERM. On
//! the way out the child server is killed by its PID and reaped, whatever
//! happened before.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use amends_client::{Client, Decision, Options, Request};
use amends_core::command::{AccountId, Amount, ClaimKey, Command as Cmd, Namespace, Owner, Topic};
use amends_core::wire;
use amends_local_nats::{NatsServer, locate_server};
use amends_nats::topology::{self, Prefix, Stream};
use amends_nats::worker;
use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use clap::Args;
use futures_util::StreamExt as _;

use crate::nats::NatsArgs;
use crate::serve::{self, DurabilityArg, ServeArgs};

/// The requests stream's duplicate window of the dev deployment. Short, so
/// that the demo's resubmission (made after it) reaches the log and is
/// answered from amends's own dedup records.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(1);

/// How long each demo step waits for a decision per try.
const TRY_TIMEOUT: Duration = Duration::from_secs(2);

/// How many tries each demo step makes.
const TRIES: u32 = 5;

/// The flags of `amends dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// The directory of the dev deployment: the nats-server's JetStream
    /// store, the service's store and the server's log. Kept between runs.
    /// While it runs, its NATS URL is in `<data-dir>/nats-url`; with the
    /// default data dir, the client commands run in this directory use it
    /// when no --nats-url is given.
    #[arg(long, default_value = crate::nats::DEV_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The partition count (recorded on the first run; must match later).
    #[arg(long, short = 'n', default_value_t = 4)]
    pub partitions: u32,
    /// Exit after the demo instead of serving until Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
    /// Where to serve the device page (/) and the operator console
    /// (/console); port 0 picks a free one, and so does the default when
    /// its port is taken. While it runs, the pages' URL is in
    /// `<data-dir>/http-url`.
    #[arg(long, default_value = HTTP_DEFAULT)]
    pub http: std::net::SocketAddr,
}

/// The default of `amends dev --http`.
const HTTP_DEFAULT: &str = "127.0.0.1:7480";

/// Where `amends dev` writes the pages' URL while it runs, in its data dir.
const HTTP_URL_FILE: &str = "http-url";

/// Runs the dev deployment and its demo; the signal that stopped it, if
/// one did (the caller exits as a shell expects after it: 130, 143).
pub async fn run(args: DevArgs) -> anyhow::Result<Option<&'static str>> {
    let binary = locate_server()?;
    fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    // One dev per data dir, checked before anything starts (a second one
    // used to start a nats-server on the same store first). Held until
    // this process exits.
    let _lock = lock_data_dir(&args.data_dir)?;
    // Killed and reaped when dropped: on every return below, and on a panic.
    let mut server = NatsServer::start(binary, &args.data_dir)?;
    println!(
        "nats-server {} (pid {}) on 127.0.0.1:{}, store and log in {}",
        server.binary().display(),
        server.pid(),
        server.port(),
        args.data_dir.display()
    );
    println!("NATS URL: {}", server.url());
    let url = server.url();
    // Where the client commands run in this directory find it (while dev
    // runs) without --nats-url.
    let url_file = args.data_dir.join(crate::nats::DEV_URL_FILE);
    fs::write(&url_file, format!("{url}\n"))
        .with_context(|| format!("writing {}", url_file.display()))?;
    let result = tokio::select! {
        r = run_with(&args, &url) => r.map(|()| None),
        signal = crate::serve::shutdown_signal() => signal.map(|name| {
            println!("{name}: stopping");
            Some(name)
        }),
    };
    let _ = fs::remove_file(&url_file);
    server.stop();
    println!(
        "stopped: nats-server (pid {}) killed and reaped",
        server.pid()
    );
    result
}

/// Takes the exclusive lock of `<data_dir>/dev.lock`, which holds the
/// holder's pid; an error naming that pid if another process has it.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = data_dir.join("dev.lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "another amends dev (pid {}) runs with --data-dir {}; stop it, or give this one another --data-dir",
                holder.trim(),
                data_dir.display()
            );
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// The service, the demo, and then serving until Ctrl-C (or not).
async fn run_with(args: &DevArgs, url: &str) -> anyhow::Result<()> {
    let duplicate_window_ms = u64::try_from(DUPLICATE_WINDOW.as_millis()).unwrap_or(u64::MAX);
    let serve_args = ServeArgs {
        config: None,
        nats: NatsArgs {
            urls: vec![url.to_owned()],
            ..NatsArgs::default()
        },
        data_dir: Some(args.data_dir.join("store")),
        partitions: Some(args.partitions),
        prefix: Some(topology::PREFIX_DEFAULT.to_owned()),
        batch_max: Some(worker::BATCH_LEN_MAX_DEFAULT),
        durability: Some(DurabilityArg::Fsync),
        flush_every_ms: Some(100),
        duplicate_window_ms: Some(duplicate_window_ms),
        replicas: Some(1),
        metrics_addr: None,
        http: None,
        lease_ttl_ms: None,
    };
    // `amends serve` itself, in this process; Ctrl-C is `run`'s to handle.
    let mut service = tokio::spawn(serve::run_in_process(serve_args));
    let pages = start_pages(args, url).await?;
    let http_url_file = args.data_dir.join(HTTP_URL_FILE);
    fs::write(&http_url_file, format!("http://{pages}/\n"))
        .with_context(|| format!("writing {}", http_url_file.display()))?;
    println!("device page: http://{pages}/");
    println!("operator console: http://{pages}/console");
    let result = tokio::select! {
        joined = &mut service => match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e).context("the service task failed"),
        },
        demo = demo_then_wait(args, url) => demo,
    };
    service.abort();
    let _ = fs::remove_file(&http_url_file);
    result
}

/// The device page and the console, served by this process as `serve
/// --http` would (the deployment need not exist yet: the pages follow the
/// streams once the service has made them).
async fn start_pages(args: &DevArgs, url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let mut options = Options::new(url.to_owned());
    options.name = Some("amends dev (pages)".to_owned());
    options.partitions = Some(
        amends_core::route::Partitions::new(args.partitions)
            .with_context(|| format!("invalid --partitions {}", args.partitions))?,
    );
    let client = Client::connect(options)
        .await
        .with_context(|| format!("connecting the pages to {url}"))?;
    let nats = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let prefix = Prefix::new(topology::PREFIX_DEFAULT)?;
    let js = jetstream::new(nats);
    match crate::web::start(args.http, client.clone(), js.clone(), prefix.clone()).await {
        // The default port taken (another dev, another program): any free
        // one rather than no pages; the URL printed says which.
        Err(e)
            if args.http.to_string() == HTTP_DEFAULT
                && e.root_cause()
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse) =>
        {
            println!("{HTTP_DEFAULT} is taken: serving the pages on another port");
            let any = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
            crate::web::start(any, client, js, prefix).await
        }
        result => result,
    }
}

async fn demo_then_wait(args: &DevArgs, url: &str) -> anyhow::Result<()> {
    println!(
        "service: {} partitions in this process (as `amends serve`), store in {}",
        args.partitions,
        args.data_dir.join("store").display()
    );
    let client = connect(url).await?;
    demo(&client, url).await?;
    if args.no_wait {
        println!("\n--no-wait: stopping after the demo");
        return Ok(());
    }
    println!("\namends dev is running. NATS URL: {url}");
    println!(
        "Try, in another terminal:\n  cargo run -- submit --nats-url {url} '{{\"command\":{{\"type\":\"open_account\",\"account\":\"bob\"}}}}'"
    );
    println!("Press Ctrl-C to stop.");
    std::future::pending::<anyhow::Result<()>>().await
}

/// A client, once the service has created the deployment.
async fn connect(url: &str) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut options = Options::new(url.to_owned());
        options.name = Some("amends dev".to_owned());
        match Client::connect(options).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "deployment not ready yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("the service did not come up within 20 s"),
        }
    }
}

/// The demo, step by step, each decision printed as JSON.
async fn demo(client: &Client, url: &str) -> anyhow::Result<()> {
    // Names of this run, so that a rerun on the same data dir starts fresh.
    let run = Client::new_op_id().to_string();
    let run = run.get(run.len().saturating_sub(6)..).unwrap_or("run");
    let account = AccountId::new(format!("alice-{run}"))?;
    let username = ClaimKey::new(format!("alice-{run}"))?;
    let namespace = Namespace::new("username")?;

    println!("\n1. A confirmation: open account {account}, then credit it 100.");
    let open = request(Cmd::OpenAccount {
        account: account.clone(),
        floor: 0,
        ceiling: None,
    });
    show("open_account", &decide(client, &open).await?);
    let credit = request(Cmd::Credit {
        account: account.clone(),
        amount: Amount::new(100)?,
    });
    let credited = decide(client, &credit).await?;
    show("credit 100", &credited);

    println!("\n2. A refusal: debit 250 from {account}, which holds 100.");
    let debit = request(Cmd::Debit {
        account: account.clone(),
        amount: Amount::new(250)?,
    });
    show("debit 250", &decide(client, &debit).await?);

    println!("\n3. A taken username: alice claims {namespace}/{username}, then mallory tries.");
    let claim = |owner: &str| -> anyhow::Result<Request> {
        Ok(request(Cmd::Claim {
            namespace: namespace.clone(),
            key: username.clone(),
            owner: Owner::new(owner)?,
        }))
    };
    show("claim by alice", &decide(client, &claim("alice")?).await?);
    show(
        "claim by mallory",
        &decide(client, &claim("mallory")?).await?,
    );

    println!(
        "\n4. A duplicate: the credit of step 1 submitted again, same op id {}.",
        credit.op_id
    );
    // Past the requests stream's duplicate window, so the copy reaches the
    // log and amends itself answers it (inside the window JetStream drops it
    // and the client resubmits after its timeout).
    tokio::time::sleep(DUPLICATE_WINDOW + Duration::from_millis(200)).await;
    let again = decide(client, &credit).await?;
    show("credit 100 again", &again);
    anyhow::ensure!(
        again == credited,
        "the resubmitted credit got a different decision:\nfirst: {}\nagain: {}",
        json(&credited),
        json(&again)
    );
    println!(
        "   duplicate: same decision as the first time (applied once; the balance is still 100)"
    );

    let topic = Topic::new(format!("dev.{run}"))?;
    let prefix = Prefix::new(topology::PREFIX_DEFAULT)?;
    println!(
        "\n5. An apology: an optimistic debit of 1000 from {account}, naming apology topic {}; the client does not wait.",
        topic.as_str()
    );
    let optimistic = Request {
        op_id: Client::new_op_id(),
        command: Cmd::Debit {
            account: account.clone(),
            amount: Amount::new(1000)?,
        },
        apology_topic: Some(topic.clone()),
    };
    let submitted = client
        .submit(&optimistic)
        .await
        .with_context(|| format!("submitting operation {}", optimistic.op_id))?;
    println!(
        "   debit 1000 (optimistic): in the log of partition {} at sequence {}",
        submitted.partition.get(),
        submitted.sequence
    );
    let subject = prefix.apology(&topic);
    let apology = read_apology(url, &prefix.stream_name(Stream::Apologies), &subject).await?;
    println!(
        "   apology on {subject} (read with a JetStream consumer on stream {}):",
        prefix.stream_name(Stream::Apologies)
    );
    println!("   {}", String::from_utf8_lossy(&apology));

    let bob = AccountId::new(format!("bob-{run}"))?;
    println!(
        "\n6. A saga: open {bob}, then transfer 60 from {account} to {bob} (a debit and a credit, possibly on two partitions), then 500, which {account} does not have."
    );
    let open_bob = request(Cmd::OpenAccount {
        account: bob.clone(),
        floor: 0,
        ceiling: None,
    });
    show("open_account", &decide(client, &open_bob).await?);
    let transfer = |amount: u64| -> anyhow::Result<Request> {
        let mut r = request(Cmd::Transfer {
            from: account.clone(),
            to: bob.clone(),
            amount: Amount::new(amount)?,
            deadline_ms: None,
        });
        // The saga lives with the debit: fewer log appends.
        r.op_id = client.new_saga_op_id(account.as_str());
        Ok(r)
    };
    show("transfer 60", &decide(client, &transfer(60)?).await?);
    show("transfer 500", &decide(client, &transfer(500)?).await?);
    println!("   the refused transfer names its step (0, the debit) and why; its hold was voided");
    println!(
        "\ndemo done: confirmed, insufficient_funds, already_claimed, a duplicate, an apology, a saga"
    );
    Ok(())
}

fn request(command: Cmd) -> Request {
    Request {
        op_id: Client::new_op_id(),
        command,
        apology_topic: None,
    }
}

async fn decide(client: &Client, request: &Request) -> anyhow::Result<Decision> {
    client
        .submit_and_wait(request, TRY_TIMEOUT, TRIES)
        .await
        .with_context(|| format!("submitting operation {}", request.op_id))
}

fn json(decision: &Decision) -> String {
    String::from_utf8_lossy(&wire::encode(decision)).into_owned()
}

/// Prints a decision in plain words, then as JSON.
fn show(what: &str, decision: &Decision) {
    let words = match decision.outcome.reason() {
        None => "confirmed".to_owned(),
        Some(reason) => format!("rejected: {}", reason.code()),
    };
    println!("   {what} -> {words}");
    println!("   {}", json(decision));
}

/// The first message on `subject` in `stream`, through a plain JetStream
/// pull consumer (ephemeral, acknowledged).
async fn read_apology(url: &str, stream: &str, subject: &str) -> anyhow::Result<Vec<u8>> {
    let nats = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let js = jetstream::new(nats);
    let consumer = js
        .get_stream(stream)
        .await
        .with_context(|| format!("opening stream {stream}"))?
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            inactive_threshold: Duration::from_secs(30),
            ..pull::Config::default()
        })
        .await
        .with_context(|| format!("creating a consumer on {stream}"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .with_context(|| format!("fetching from {stream}"))?;
        if let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!("fetching from {stream}: {e}"))?;
            msg.ack()
                .await
                .map_err(|e| anyhow::anyhow!("acknowledging the apology: {e}"))?;
            return Ok(msg.payload.to_vec());
        }
    }
    anyhow::bail!("no apology on {subject} within 15 s")
}
