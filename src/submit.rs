//! `amends submit`: one operation, its decision on stdout.

use std::io::Read as _;
use std::time::Duration;

use amends_client::{Client, Request};
use amends_core::wire;
use anyhow::Context as _;
use clap::Args;

use crate::nats::DeploymentArgs;

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

/// What `submit` ended with, as an exit code: 0 confirmed, 1 rejected.
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

    let options = args.deployment.client_options("amends submit")?;
    let client = Client::connect(options)
        .await
        .context("connecting to the deployment")?;
    let decision = client
        .submit_and_wait(&request, Duration::from_millis(args.timeout_ms), args.tries)
        .await
        .with_context(|| format!("submitting operation {}", request.op_id))?;
    println!("{}", String::from_utf8_lossy(&wire::encode(&decision)));
    Ok(if decision.outcome.is_confirmed() {
        0
    } else {
        1
    })
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
    serde_json::from_value(value).context("the request is not valid (see specs/protocol.md)")
}

#[cfg(test)]
mod tests {
    use super::*;

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
