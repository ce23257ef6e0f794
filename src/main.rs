//! The `amends` command line.
//!
//! Today it carries the offline tools a client developer needs to follow
//! `specs/protocol.md`: where a routing key goes (`route`) and how amends
//! reads a request body (`decode`). The service commands (`dev`, `serve`,
//! `submit`, `status`, `audit`, `rebuild`, `bench`) arrive with the service.

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
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
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
    /// partition does and prints what it becomes.
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
    match cli.command {
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
                    println!("valid request {} ({})", req.op_id, req.command.kind());
                    if req.op_id.v7_unix_ms().is_none() {
                        println!(
                            "warning: op_id is not a UUID v7; it will be refused as malformed"
                        );
                    }
                    match (req.command.routing_key(), n) {
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
                }
                Ok(Input::Malformed { op_id, detail, .. }) => {
                    println!("refused as malformed (op id {op_id}): {detail}");
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
