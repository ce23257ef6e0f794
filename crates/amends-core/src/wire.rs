//! The wire format: JSON bodies of the messages on the request log and of
//! the messages amends publishes, with the protocol's size limits.
//!
//! The serde types are the ones in [`crate::command`], [`crate::decision`]
//! and [`crate::partition`]; this module decides what a raw log message
//! becomes ([`decode_request`]) and how outbound messages are encoded.
//! `specs/schemas/` holds the JSON Schemas generated from these types.

use serde::Deserialize;

use crate::command::{Request, raw_fingerprint};
use crate::id::OpId;
use crate::partition::Input;

/// Largest request body amends accepts, in bytes. Larger messages are
/// refused as `malformed` (or dead-lettered when no op id can be read); the
/// limit keeps one message from stalling a partition and stays well under
/// NATS's default 1 MiB payload limit.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

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

/// Deserializes `T` from a JSON object only.
///
/// Derived struct and enum deserializers also accept a JSON array of the
/// fields in order; the protocol allows objects only, so every body and the
/// `command` inside it go through this.
pub(crate) fn object_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectVisitor<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }

    deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
}

/// Deserializes an optional `T` that, when present and not null, must be a
/// JSON object (see [`object_only`]).
pub(crate) fn object_only_opt<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct OptVisitor<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OptVisitor<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Option<T>, D2::Error> {
            object_only(d).map(Some)
        }
    }

    deserializer.deserialize_option(OptVisitor(std::marker::PhantomData))
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
