//! The `amends` command line.
//!
//! The service (`serve`: every partition of a deployment in one process),
//! a one-shot client (`submit`), and the offline tools a client developer
//! needs to follow `specs/protocol.md`: where a routing key goes (`route`)
//! and how amends reads a request body (`decode`). Configuration is flags
//! with environment fallbacks (and `serve --config`, a TOML file). `dev`
//! runs a whole deployment (its own nats-server) with a demo. `status`,
//! `balance`, `claim-owner` and `stats` ask the service's endpoints
//! (`query.rs`). `tail` prints decisions, apologies and dead letters as
//! they are published (`tail.rs`). `serve --http` and `dev` serve the
//! device page and the operator console (`web/`). `audit` replays the log and checks the
//! invariants (`audit.rs`). `rebuild` is not built yet. The benchmark
//! against the transport ceiling and PostgreSQL is a binary of its own,
//! `amends-bench` (`crates/amends-bench`), so that this one links no
//! PostgreSQL client.

mod audit;
mod dev;
mod metrics;
mod nats;
mod opid;
mod query;
mod serve;
mod submit;
mod tail;
mod web;

use std::io::Read as _;

use amends_core::partition::Input;
use amends_core::route::{self, Partitions};
use amends_core::wire;
use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Keeps invariants true across services over NATS JetStream.
#[derive(Parser, Debug)]
#[command(name = "amends", version, about)]
struct Cli {
    /// How log lines are written to stderr: `text` (colour only on a
    /// terminal) or `json` (one object a line, for log collectors).
    #[arg(long, global = true, env = "AMENDS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Starts its own nats-server (the pinned one from scripts/setup) on a
    /// free loopback port, runs the service on every partition in this
    /// process with the device page and the operator console (--http),
    /// shows a demo, then serves until Ctrl-C (or exits with --no-wait),
    /// stopping the server with it.
    Dev(dev::DevArgs),
    /// Runs every partition of a deployment until Ctrl-C or SIGTERM:
    /// creates or checks the JetStream streams, opens the store in
    /// --data-dir and serves. Configured by flags and environment variables
    /// (or a TOML file, --config); logs go to stderr, filtered by RUST_LOG
    /// (default `info`).
    Serve(serve::ServeArgs),
    /// Submits one operation and prints its decision as JSON. Exit code 0:
    /// confirmed; 1: rejected; 4: its op id refused (not a UUID v7, outside
    /// the window, reused with another body; checked before sending where
    /// it can be); 5: in the log but no decision yet; 2: error.
    Submit(submit::SubmitArgs),
    /// Waits for the decision of an op id submitted earlier (asking the
    /// service's status endpoints until it is decided) and prints it as
    /// JSON. Exit code 0: confirmed; 1: rejected; 4: its op id refused; 5:
    /// no decision within --wait-ms; 2: error.
    Wait(query::WaitArgs),
    /// Prints fresh op ids (UUID v7, from this machine's clock), one a
    /// line: what every request needs, unique to the operation and reused
    /// only to resubmit it.
    OpId {
        /// How many to print.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
    },
    /// Prints what the deployment knows of an op id as JSON (asking every
    /// partition, or --partition). Exit code 0: decided confirmed; 1:
    /// decided rejected; 4: its op id refused; 3: unknown; 2: error.
    Status(query::StatusArgs),
    /// Prints an account's balance, held amount and limits as JSON. Exit
    /// code 0: found; 3: unknown account; 2: error.
    Balance(query::BalanceArgs),
    /// Prints who holds the claim (NAMESPACE, KEY) as JSON. Exit code 0:
    /// answered (claimed or free); 2: error.
    ClaimOwner(query::ClaimOwnerArgs),
    /// Prints every partition's state, applied position, last sequence and
    /// lag as a table. Exit code 0: every partition answered; 2: error.
    Stats(query::StatsArgs),
    /// Prints decisions, hold expiries, apologies and dead letters as they
    /// are published, one line each (or one JSON object a line with
    /// --json), filtered by partition, outcome, reason, topic or op id.
    /// Reads with ephemeral consumers: nothing is left on the server. Exit
    /// code 0: Ctrl-C, --count reached or --idle-exit-ms passed; 2: error.
    Tail(tail::TailArgs),
    /// Replays the log of every partition, re-derives every decision and the
    /// state, compares them with the decisions stream and checks the
    /// invariants (money, claims, sagas, holds); prints a table per
    /// partition. Reads the streams only, so it runs beside `serve`. Exit
    /// code 0: every check passed; 1: a check failed; 2: error.
    Audit(audit::AuditArgs),
    /// Prints the partition of a routing key (FNV-1a 64, then jump hash).
    Route {
        /// The number of partitions of the deployment.
        #[arg(long, short = 'n', env = "AMENDS_PARTITIONS")]
        partitions: u32,
        /// Treat KEY as a claim key in this namespace (routing key
        /// `namespace U+001F key`).
        #[arg(long)]
        namespace: Option<String>,
        /// The routing key: an account id, a claim key (with --namespace)
        /// or a saga's op id.
        key: String,
    },
    /// Reads a request body (JSON, from the argument or stdin) the way a
    /// partition does and prints what it becomes. Exit code 0: valid; 4:
    /// well-formed but its op id would be refused now; 1: malformed or a
    /// dead letter.
    Decode {
        /// The number of partitions, to print where the request goes.
        #[arg(long, short = 'n', env = "AMENDS_PARTITIONS")]
        partitions: Option<u32>,
        /// The request JSON; read from stdin when absent.
        body: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let init_logging = |default: &str| init_logging(default, cli.log_format);
    match cli.command {
        Cmd::Dev(args) => {
            init_logging("warn");
            match runtime()?.block_on(dev::run(args)) {
                Ok(None) => {}
                // As a shell reports a process ended by the signal.
                Ok(Some("SIGINT" | "Ctrl-C")) => std::process::exit(130),
                Ok(Some(_)) => std::process::exit(143),
                Err(e) => {
                    eprintln!("error: {}", report(&e));
                    std::process::exit(1);
                }
            }
        }
        Cmd::Serve(args) => {
            init_logging("info");
            if let Err(e) = runtime()?.block_on(serve::run(args)) {
                eprintln!("error: {}", report(&e));
                std::process::exit(1);
            }
        }
        Cmd::Submit(args) => {
            init_logging("warn");
            match runtime()?.block_on(submit::run(args)) {
                Ok(code) => std::process::exit(i32::from(code)),
                Err(e) => {
                    eprintln!("error: {}", report(&e));
                    std::process::exit(2);
                }
            }
        }
        Cmd::Wait(args) => {
            init_logging("warn");
            query::exit(runtime()?.block_on(query::wait(args)));
        }
        Cmd::OpId { count } => {
            for _ in 0..count {
                println!("{}", amends_client::Client::new_op_id());
            }
        }
        Cmd::Status(args) => {
            init_logging("warn");
            query::exit(runtime()?.block_on(query::status(args)));
        }
        Cmd::Balance(args) => {
            init_logging("warn");
            query::exit(runtime()?.block_on(query::balance(args)));
        }
        Cmd::ClaimOwner(args) => {
            init_logging("warn");
            query::exit(runtime()?.block_on(query::claim_owner(args)));
        }
        Cmd::Stats(args) => {
            init_logging("warn");
            query::exit(runtime()?.block_on(query::stats(args)));
        }
        Cmd::Audit(args) => {
            init_logging("warn");
            match runtime()?.block_on(audit::run(args)) {
                Ok(code) => std::process::exit(i32::from(code)),
                Err(e) => {
                    eprintln!("error: {}", report(&e));
                    std::process::exit(2);
                }
            }
        }
        Cmd::Tail(args) => {
            init_logging("warn");
            if let Err(e) = runtime()?.block_on(tail::run(args)) {
                eprintln!("error: {}", report(&e));
                std::process::exit(2);
            }
        }
        Cmd::Route {
            partitions,
            namespace,
            key,
        } => {
            let n = Partitions::new(partitions)?;
            let routing_key = match &namespace {
                Some(ns) => route::claim_routing_key(ns, &key),
                None => key,
            };
            println!("{}", route::partition_of(&routing_key, n));
        }
        Cmd::Decode { partitions, body } => {
            let bytes = match body {
                Some(b) => b.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading stdin")?;
                    buf
                }
            };
            let n = partitions.map(Partitions::new).transpose()?;
            match wire::decode_request(&bytes) {
                Ok(Input::Request(req)) => {
                    let problem = opid::problem(req.op_id, opid::now_ms());
                    match &problem {
                        None => println!("valid request {} ({})", req.op_id, req.command.kind()),
                        Some(p) => println!(
                            "well-formed request ({}), but refused now: {p}",
                            req.command.kind()
                        ),
                    }
                    match (req.routing_key(), n) {
                        (Some(k), Some(n)) => {
                            println!(
                                "routing key {k:?} -> partition {}",
                                route::partition_of(&k, n)
                            );
                        }
                        (Some(k), None) => println!("routing key {k:?}"),
                        (None, _) => println!("no routing key (ticks go to a chosen partition)"),
                    }
                    println!("{}", serde_json::to_string_pretty(&req)?);
                    if problem.is_some() {
                        std::process::exit(i32::from(opid::EXIT_OP_ID_REFUSED));
                    }
                }
                Ok(Input::Malformed { op_id, detail, .. }) => {
                    println!(
                        "refused as malformed (op id {op_id}): {}",
                        submit::for_a_client(&detail)
                    );
                    std::process::exit(1);
                }
                Err(e) => {
                    println!("dead letter (no readable op id): {}", e.detail);
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}

/// An error for a user: each cause once (a cause whose text an earlier one
/// already carries, as many library errors repeat their source's, is left
/// out), joined by ": ", and no backtrace, whatever `RUST_BACKTRACE` says:
/// the message is the report.
pub fn report(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default`), as `format`
/// says; colour codes only when stderr is a terminal (not in log files).
fn init_logging(default: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
