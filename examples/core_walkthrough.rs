//! A walk through the deterministic core, with no server: route a few
//! operations, decide them on an in-memory partition, and print every
//! answer and outbox effect as the JSON a client would see.
//!
//! Run it with `cargo run --example core_walkthrough`.

use amends_core::OpId;
use amends_core::partition::{Answer, Config, Effect, Input, LogMessage, Machine, Taken};
use amends_core::route::{self, Partitions};
use amends_core::state::MemState;

fn main() -> anyhow::Result<()> {
    let partitions = Partitions::new(16)?;
    // Every message of this walk lands on the partition of account "alice".
    let partition = route::partition_of("alice", partitions);
    let machine = Machine::new(partition, partitions, Config::default());
    let mut state = MemState::new();

    // Log time as JetStream would stamp it; op ids are UUID v7 made by the
    // client at about that time (here with fixed "random" bits).
    let t0_ms: u64 = 1_760_000_000_000;
    let id = |n: u128| OpId::v7_from_parts(t0_ms, n);
    let bodies = [
        format!(
            r#"{{"op_id":"{}","command":{{"type":"open_account","account":"alice"}}}}"#,
            id(1)
        ),
        format!(
            r#"{{"op_id":"{}","command":{{"type":"credit","account":"alice","amount":100}}}}"#,
            id(2)
        ),
        format!(
            r#"{{"op_id":"{}","command":{{"type":"hold","account":"alice","amount":60,"timeout_ms":30000}}}}"#,
            id(3)
        ),
        // Too much: 100 - 60 held leaves 40 available.
        format!(
            r#"{{"op_id":"{}","command":{{"type":"debit","account":"alice","amount":50}},"apology_topic":"orders"}}"#,
            id(4)
        ),
        // The same debit again (a client retry): the same decision comes back.
        format!(
            r#"{{"op_id":"{}","command":{{"type":"debit","account":"alice","amount":50}},"apology_topic":"orders"}}"#,
            id(4)
        ),
        // A tick 31 s later: the hold expires and says so.
        format!(r#"{{"op_id":"{}","command":{{"type":"tick"}}}}"#, id(5)),
        // Now the debit fits (the same body under a new op id).
        format!(
            r#"{{"op_id":"{}","command":{{"type":"debit","account":"alice","amount":50}}}}"#,
            id(6)
        ),
    ];

    println!(
        "account \"alice\" routes to partition {partition} of {}",
        partitions.get()
    );
    let mut effects = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let position = u64::try_from(i)? + 1;
        let log_time_ms = if position >= 6 {
            t0_ms + 31_000
        } else {
            t0_ms + position
        };
        effects.clear();
        // The raw message as the log holds it: the machine decodes it.
        let message = LogMessage {
            bytes: body.as_bytes(),
            position,
            log_time_ms,
            reply_to: None,
        };
        let taken = machine.take(&mut state, &message, &mut effects)?;
        let (kind, label) = match &taken {
            Taken::DeadLetter => ("unreadable", "dead letter"),
            Taken::Applied { input, answer } => {
                let kind = match input {
                    Input::Request(r) => r.command.kind(),
                    Input::Malformed { .. } => "malformed",
                };
                let label = match answer {
                    Answer::Decided(_) => "decided",
                    Answer::Duplicate(_) => "duplicate, original decision",
                    Answer::Conflict(_) => "conflict",
                    Answer::Refused(_) => "refused to the sender",
                    Answer::Ticked => "ticked",
                    Answer::Accepted(_) => "saga accepted, decision to follow",
                    Answer::Internal(_) => "saga step decided",
                };
                (kind, label)
            }
        };
        println!("\n#{position} {kind}: {label}");
        if let Some(decision) = taken.decision() {
            println!("  answer: {}", serde_json::to_string(decision)?);
        }
        for effect in &effects {
            let (what, json) = match effect {
                Effect::Decided(d) => ("decision", serde_json::to_string(d)?),
                Effect::Apology(a) => ("apology", serde_json::to_string(a)?),
                Effect::HoldExpired(e) => ("hold expired", serde_json::to_string(e)?),
                Effect::Send { partition, request } => (
                    "message for another partition",
                    format!("{partition}: {}", serde_json::to_string(request)?),
                ),
                Effect::Reply { to, decision } => (
                    "reply",
                    format!("{to}: {}", serde_json::to_string(decision)?),
                ),
                Effect::DeadLetter(d) => ("dead letter", d.detail.clone()),
            };
            println!("  outbox, {what}: {json}");
        }
    }
    Ok(())
}
