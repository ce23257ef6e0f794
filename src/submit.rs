//! `amends submit`: one operation, its decision on stdout.

use std::io::Read as _;
use std::time::Duration;

use amends_client::{Client, Request};
use amends_core::wire;
use anyhow::Context as _;
use clap::Args;

use crate::nats::DeploymentArgs;
use crate::opid;

/// The flags of `amends submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// How long each try waits for the decision, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// How many times the request is submitted (the same op id each time,
    /// so resubmitting is safe).
    #[arg(long, default_value_t = 3)]
    pub tries: u32,
    /// The request JSON (`{"op_id": ..., "command": {...}}`), or `-` (or
    /// nothing) to read it from stdin. Without an `op_id`, a fresh UUID v7
    /// is filled in; give one to make the command safe to rerun.
    pub request: Option<String>,
}

/// Exit code: the request is in the log but no decision came in time.
pub const EXIT_NO_DECISION_YET: u8 = 5;

/// What `submit` ended with, as an exit code: 0 confirmed, 1 rejected,
/// 4 op id refused, 5 no decision yet.
pub async fn run(args: SubmitArgs) -> anyhow::Result<u8> {
    let body = match args.request.as_deref() {
        Some("-") | None => {
            let mut buf = String::new();
            std::io::stdin()
                .read_to_string(&mut buf)
                .context("reading the request from stdin")?;
            buf
        }
        Some(text) => text.to_owned(),
    };
    let request = parse_request(&body)?;
    if let Some(problem) = opid::problem(request.op_id, opid::now_ms()) {
        eprintln!("error: {problem} (nothing was sent)");
        return Ok(opid::EXIT_OP_ID_REFUSED);
    }

    let client = args.deployment.connect("amends submit").await?;
    let per_try = Duration::from_millis(args.timeout_ms);
    // The first try is published here, so that its place in the log is
    // known if no decision comes; the others resubmit (the same op id: one
    // message in the log, or a duplicate answered from the dedup records).
    let submitted = client
        .submit(&request)
        .await
        .with_context(|| format!("submitting operation {}", request.op_id))?;
    let decision = match client.wait(request.op_id, per_try).await {
        Ok(decision) => Ok(decision),
        Err(amends_client::Error::Timeout { .. }) if args.tries > 1 => {
            client
                .submit_and_wait(&request, per_try, args.tries - 1)
                .await
        }
        Err(e) => Err(e),
    };
    let decision = match decision {
        Ok(decision) => decision,
        Err(amends_client::Error::Timeout { .. }) => {
            eprintln!(
                "op {op} is in the log (partition {p}, sequence {seq}) but has no decision after \
                 {tries} tries of {per_try:?}: no amends instance answered. It is decided when one \
                 serves the deployment (see `amends stats`); ask later with `amends status {op}` \
                 or `amends wait {op}`.",
                op = request.op_id,
                p = submitted.partition.get(),
                seq = submitted.sequence,
                tries = args.tries.max(1),
            );
            return Ok(EXIT_NO_DECISION_YET);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("submitting operation {}", request.op_id));
        }
    };
    println!("{}", String::from_utf8_lossy(&wire::encode(&decision)));
    Ok(exit_code(&decision))
}

/// 0 confirmed, [`opid::EXIT_OP_ID_REFUSED`] for a refused op id, 1 for any
/// other refusal (and for a saga still in flight).
pub fn exit_code(decision: &amends_client::Decision) -> u8 {
    match decision.outcome.reason() {
        _ if decision.outcome.is_confirmed() => 0,
        Some(reason) if opid::OP_ID_REASONS.contains(&reason.code()) => opid::EXIT_OP_ID_REFUSED,
        _ => 1,
    }
}

/// Reads a request, filling in a fresh v7 op id when it has none.
fn parse_request(body: &str) -> anyhow::Result<Request> {
    let mut value: serde_json::Value =
        serde_json::from_str(body.trim()).context("the request is not JSON")?;
    let object = value
        .as_object_mut()
        .context("the request must be a JSON object")?;
    if !object.contains_key("op_id") {
        object.insert(
            "op_id".to_owned(),
            serde_json::Value::String(Client::new_op_id().to_string()),
        );
    }
    serde_json::from_value(value)
        .map_err(|e| anyhow::anyhow!("{}", for_a_client(&e.to_string())))
        .context("the request is not valid (see specs/protocol.md)")
}

/// The command types amends writes itself: a client cannot send them, so
/// a list of what a client may send leaves them out.
const INTERNAL_TYPES: [&str; 3] = ["tick", "step", "step_outcome"];

/// A parse error as a client should read it: serde's "unknown variant
/// `x`, expected one of ..." lists every command type, the internal ones
/// too; this names the unknown type and lists only the client's. (The
/// `malformed` detail the service records keeps serde's words: a decision
/// re-derived from the log must not change with the binary.)
pub fn for_a_client(detail: &str) -> String {
    let Some(rest) = detail.strip_prefix("unknown variant `") else {
        return detail.to_owned();
    };
    let Some((given, rest)) = rest.split_once("`, expected one of ") else {
        return detail.to_owned();
    };
    let types: Vec<&str> = rest
        .split(", ")
        .map(|t| t.trim_matches('`'))
        .filter(|t| !INTERNAL_TYPES.contains(t))
        .collect();
    format!(
        "unknown command type `{given}`; a client sends one of: {}",
        types.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_command_type_lists_only_what_a_client_may_send() {
        // Proves the submit/decode message for an unknown type names it and lists the client commands without tick, step and step_outcome, and leaves other errors as they are.
        let e = parse_request(r#"{"command":{"type":"nope"}}"#).expect_err("refused");
        let text = format!("{e:#}");
        assert!(text.contains("unknown command type `nope`"), "{text}");
        assert!(
            text.contains("open_account") && text.contains("saga"),
            "{text}"
        );
        for internal in INTERNAL_TYPES {
            assert!(
                !text.contains(&format!(" {internal},")) && !text.ends_with(internal),
                "{text}"
            );
        }
        assert_eq!(
            for_a_client("missing field `amount`"),
            "missing field `amount`"
        );
    }

    #[test]
    fn a_missing_op_id_is_filled_with_a_v7_id_and_a_given_one_is_kept() {
        let r = parse_request(r#"{"command":{"type":"credit","account":"a","amount":1}}"#)
            .expect("valid");
        assert!(r.op_id.v7_unix_ms().is_some());
        let r = parse_request(
            r#"{"op_id":"01900000-0000-7000-8000-000000000001","command":{"type":"credit","account":"a","amount":1}}"#,
        )
        .expect("valid");
        assert_eq!(r.op_id.to_string(), "01900000-0000-7000-8000-000000000001");
        assert!(parse_request("[1]").is_err());
        assert!(parse_request(r#"{"command":{"type":"nope"}}"#).is_err());
    }
}
