//! The wire format: JSON bodies of the messages on the request log and of
//! the messages amends publishes, with the protocol's size limits.
//!
//! The serde types are the ones in [`crate::command`], [`crate::decision`]
//! and [`crate::partition`]; this module decides what a raw log message
//! becomes ([`decode_request`]: an [`Input`], which the partition machine
//! takes and re-exports as `partition::Input`, or a dead letter) and how
//! outbound messages are encoded.
//! `specs/schemas/` holds the JSON Schemas generated from these types.

use serde::Deserialize;

use crate::command::{Fingerprint, Request, raw_fingerprint};
use crate::id::OpId;
use crate::json::object_only;

/// Largest request body amends accepts, in bytes. Larger messages are
/// refused as `malformed` (or dead-lettered when no op id can be read); the
/// limit keeps one message from stalling a partition and stays well under
/// NATS's default 1 MiB payload limit.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

/// The longest reply subject (`Amends-Reply-To`) a request may name, in
/// bytes. A reply is published on core NATS, whose server drops the
/// connection of a client whose protocol line is too long (4 KiB by
/// default, the subject and the service's own header included): far below
/// that, one client's header can never cost the service its connection and
/// other clients their answers. 256 bytes hold any inbox subject a NATS
/// client library makes.
pub const REPLY_SUBJECT_BYTES_MAX: u32 = 256;

/// Whether `subject` is a reply subject amends may send a decision to:
/// 1 to [`REPLY_SUBJECT_BYTES_MAX`] bytes of dot-separated tokens, no token
/// empty or a wildcard (`*` or `>`: a publish cannot name one), and no byte
/// from 0x00 to 0x20 (controls and the space) or 0x7f. A request that names
/// another one is refused with `reply_subject_invalid`, and the driver sends
/// nothing to it. The rule is on bytes, so every language checks it alike.
pub fn reply_subject_is_valid(subject: &str) -> bool {
    let bytes = subject.as_bytes();
    u32::try_from(bytes.len()).is_ok_and(|n| (1..=REPLY_SUBJECT_BYTES_MAX).contains(&n))
        && !bytes.iter().any(|&b| b <= 0x20 || b == 0x7f)
        && subject
            .split('.')
            .all(|token| !token.is_empty() && token != "*" && token != ">")
}

/// One decoded message of a partition's request log.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Input {
    /// A well-formed request.
    Request(Request),
    /// A message whose op id could be read but whose body could not be
    /// parsed or validated. It is refused with `malformed`.
    Malformed {
        /// The op id read from the message.
        op_id: OpId,
        /// The fingerprint of the raw bytes.
        fingerprint: Fingerprint,
        /// What was wrong.
        detail: String,
    },
}

/// A message that has no readable op id: it cannot be answered, so the
/// driver puts it on the dead-letter subject with this detail.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("unreadable request: {detail}")]
pub struct Unreadable {
    /// What was wrong, for a human.
    pub detail: String,
}

#[derive(Deserialize)]
struct IdOnly {
    op_id: OpId,
}

fn from_object<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = object_only(&mut de)?;
    de.end()?;
    Ok(value)
}

/// A parse error as a `malformed` detail. For data errors (a wrong field,
/// type or value) serde_json reports the position where it noticed, which
/// is often the end of an enclosing object: misleading, and dependent on
/// serde_json's internals, so it is dropped. Syntax errors keep it.
fn detail_of(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if e.classify() == serde_json::error::Category::Data
        && let Some(at) = text.rfind(" at line ")
    {
        return text[..at].to_owned();
    }
    text
}

/// Decodes one request-log message body.
///
/// - A valid request becomes [`Input::Request`].
/// - A body that fails to parse or validate, or is larger than
///   [`REQUEST_BYTES_MAX`], but whose top-level `op_id` can still be read,
///   becomes [`Input::Malformed`] and is refused with `malformed`.
/// - Anything else is [`Unreadable`] (dead letter).
pub fn decode_request(bytes: &[u8]) -> Result<Input, Unreadable> {
    let detail = if bytes.len() > REQUEST_BYTES_MAX {
        format!(
            "message is {} bytes, more than the limit of {REQUEST_BYTES_MAX}",
            bytes.len()
        )
    } else {
        match from_object::<Request>(bytes) {
            Ok(req) => return Ok(Input::Request(req)),
            Err(e) => detail_of(&e),
        }
    };
    match from_object::<IdOnly>(bytes) {
        Ok(IdOnly { op_id }) => Ok(Input::Malformed {
            op_id,
            fingerprint: raw_fingerprint(bytes),
            detail,
        }),
        Err(_) => Err(Unreadable { detail }),
    }
}

/// Encodes a request, a decision, an apology or an event as JSON bytes.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // The wire types serialize infallibly: no maps with non-string keys, no
    // custom serializers that fail.
    serde_json::to_vec(value).unwrap_or_else(|e| panic!("wire type failed to serialize: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, expected: &str) {
        let got = match decode_request(body.as_bytes()) {
            Ok(Input::Request(r)) => format!("request {}", r.command.kind()),
            Ok(Input::Malformed { detail, .. }) => format!("malformed: {detail}"),
            Err(e) => format!("dead letter: {}", e.detail),
        };
        assert_eq!(got, expected, "body: {body}");
    }

    const ID: &str = "01900000-0000-7000-8000-000000000001";

    #[test]
    fn objects_only() {
        check(
            &format!(r#"{{"op_id":"{ID}","command":{{"type":"tick"}}}}"#),
            "request tick",
        );
        check(
            &format!(r#"{{"op_id":"{ID}","command":["credit","a",5]}}"#),
            "malformed: invalid type: sequence, expected a JSON object",
        );
        check(
            &format!(r#"["{ID}",{{"type":"tick"}}]"#),
            "dead letter: invalid type: sequence, expected a JSON object",
        );
        // Trailing bytes make the whole body unreadable, op id included.
        check(
            &format!(r#"{{"op_id":"{ID}","command":{{"type":"tick"}}}} x"#),
            "dead letter: trailing characters at line 1 column 76",
        );
    }

    #[test]
    fn reply_subjects() {
        // Proves the reply-subject rule case by case: subjects of 1 to 256 bytes of non-empty, non-wildcard tokens pass; longer ones, spaces, control bytes, empty and wildcard tokens do not.
        let check = |subject: &str, ok: bool| {
            assert_eq!(reply_subject_is_valid(subject), ok, "{subject:?}")
        };
        let max = usize::try_from(REPLY_SUBJECT_BYTES_MAX).expect("the limit fits a usize");
        check("_INBOX.abc.01900000-0000-7000-8000-000000000001", true);
        check("a", true);
        check(&"a".repeat(max), true);
        check(&format!("{}.{}", "a".repeat(max - 2), "é"), false);
        check(&format!("{}.{}", "a".repeat(max - 3), "é"), true);
        check(&"a".repeat(max + 1), false);
        check(&"a".repeat(5_000), false);
        check("", false);
        check("a b", false);
        check("a\tb", false);
        check("a\r\nb", false);
        check("a\0b", false);
        check("a\u{7f}b", false);
        check("a..b", false);
        check(".a", false);
        check("a.", false);
        check("*", false);
        check(">", false);
        check("a.*", false);
        check("a.>", false);
        check("a.*.b", false);
        check("a*.b>", true);
        check("über.ß", true);
    }

    #[test]
    fn data_errors_lose_their_position() {
        check(
            &format!(r#"{{"op_id":"{ID}","command":{{"type":"debit","account":"a","amount":0}}}}"#),
            "malformed: amount must be at least 1",
        );
        check(
            &format!(r#"{{"op_id":"{ID}","#),
            "dead letter: EOF while parsing a value at line 1 column 48",
        );
    }
}
