//! The names of `specs/protocol.md`, once for every driver and client:
//! the subject [`Prefix`] and every subject, stream and bucket name built
//! from it, the [`header`] names, the meta bucket's partition count
//! ([`PARTITIONS_KEY`], [`parse_partitions`]) and, in [`query`], the
//! requests and answers of the query endpoints.
//!
//! amends-nats's `topology` and amends-client use these and restate none
//! of them. With the default prefix `amends`:
//!
//! | stream ([`Stream`]) | name | subjects | what |
//! | --- | --- | --- | --- |
//! | requests | `AMENDS_REQ` | `amends.req.*` | operations and ticks, one subject per partition: the system of record |
//! | decisions | `AMENDS_DEC` | `amends.dec.*`, `amends.owner.*` | one decision per operation, hold-expired events, and the partitions' ownership records |
//! | apologies | `AMENDS_APOLOGY` | `amends.apology.>` | refused optimistic operations, by apology topic |
//! | dead letters | `AMENDS_DLQ` | `amends.dlq.*` | input without a readable op id |
//!
//! The request-reply endpoints have no stream (core NATS): the status of
//! an op id `amends.status.<p>` ([`Prefix::status`]), the balance and claim
//! queries `amends.query.balance.<p>` and `amends.query.claim.<p>`
//! ([`Prefix::query_balance`], [`Prefix::query_claim`]) and the partition
//! stats `amends.stats.<p>` ([`Prefix::stats`]); what they answer is
//! [`query`]'s.
//!
//! Stream and bucket names are the prefix in upper case with every
//! character that is not a letter or a digit replaced by `_`, then `_REQ`,
//! `_DEC`, `_APOLOGY`, `_DLQ` or `_META`. Two prefixes that differ only
//! there (`a-b` and `a.b`) map to the same names, so they cannot share a
//! NATS account (amends-nats refuses the second deployment).

use std::fmt;
use std::str::FromStr;

use crate::field::{Topic, is_subject_token_byte};
use crate::route::{PartitionId, Partitions};

pub mod query;

/// The header names of `specs/protocol.md` ("Headers", "Dead letters"),
/// and JetStream's fence headers that amends sets on every decision.
pub mod header {
    /// The op id of a request, in canonical text. JetStream drops a second
    /// publish with the same id inside the stream's duplicate window; amends
    /// also sets it, deterministically, on everything it publishes, so that
    /// republishing after a crash stores nothing twice.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The NATS subject a waiting client wants its decision sent to, in
    /// addition to the decisions stream.
    pub const REPLY_TO: &str = "Amends-Reply-To";
    /// JetStream's fence: the publish is stored only if the last message
    /// on [`EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT`] has this stream
    /// sequence (else error 10071, "wrong last sequence"). Every decision
    /// names its owner's ownership record this way.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    /// The subject [`EXPECTED_LAST_SUBJECT_SEQUENCE`] is checked on: the
    /// partition's ownership subject.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
        "Nats-Expected-Last-Subject-Sequence-Subject";
    /// On a dead letter: why the raw bytes of the body could not be read.
    pub const ERROR: &str = "Amends-Error";
}

/// The default subject prefix.
pub const PREFIX_DEFAULT: &str = "amends";

/// The longest subject prefix, in bytes. Stream names are derived from the
/// prefix and JetStream stores each stream in a directory of that name, so
/// the prefix is kept well under file-name limits.
pub const PREFIX_BYTES_MAX: usize = 64;
// The refusal text of `Prefix::new` names the limit.
const _: () = assert!(PREFIX_BYTES_MAX == 64);

/// The key of the meta bucket (`<PREFIX>_META`, [`Prefix::meta_bucket`])
/// that records the partition count.
pub const PARTITIONS_KEY: &str = "partitions";

/// A subject prefix that [`Prefix::new`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject prefix {prefix:?}: {reason}")]
pub struct PrefixError {
    /// The refused prefix.
    pub prefix: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A validated subject prefix: one or more dot-separated, non-empty tokens
/// of `A-Z a-z 0-9 _ -`, at most [`PREFIX_BYTES_MAX`] bytes; the default is
/// [`PREFIX_DEFAULT`].
///
/// The character set is narrower than what NATS allows in a subject token,
/// so that every derived stream and bucket name is valid too, and so that
/// the prefix can never contain a wildcard.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// The default prefix of a deployment ([`PREFIX_DEFAULT`]).
    pub const DEFAULT: &str = PREFIX_DEFAULT;

    /// Validates a prefix.
    pub fn new(prefix: impl Into<String>) -> Result<Prefix, PrefixError> {
        let prefix = prefix.into();
        // The first token that is wrong names the reason.
        let token_reason = |token: &str| {
            if token.is_empty() {
                Some("it has an empty token")
            } else if !token.bytes().all(is_subject_token_byte) {
                Some("a token has a character other than A-Z a-z 0-9 _ -")
            } else {
                None
            }
        };
        let reason = if prefix.is_empty() {
            Some("it is empty")
        } else if prefix.len() > PREFIX_BYTES_MAX {
            Some("it is longer than 64 bytes")
        } else {
            prefix.split('.').find_map(token_reason)
        };
        match reason {
            Some(reason) => Err(PrefixError { prefix, reason }),
            None => Ok(Prefix(prefix)),
        }
    }

    /// The prefix as text, e.g. `amends`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The request subject of a partition: `<prefix>.req.<p>`.
    pub fn req(&self, partition: PartitionId) -> String {
        format!("{}.req.{partition}", self.0)
    }

    /// Every request subject: `<prefix>.req.*`.
    pub fn req_wildcard(&self) -> String {
        format!("{}.req.*", self.0)
    }

    /// The decision subject of a partition: `<prefix>.dec.<p>`.
    pub fn dec(&self, partition: PartitionId) -> String {
        format!("{}.dec.{partition}", self.0)
    }

    /// Every decision subject: `<prefix>.dec.*`.
    pub fn dec_wildcard(&self) -> String {
        format!("{}.dec.*", self.0)
    }

    /// The ownership subject of a partition: `<prefix>.owner.<p>`, on the
    /// decisions stream. The worker that owns the partition publishes an
    /// ownership record there when it starts; the record's stream sequence
    /// is its epoch, and every decision it writes is fenced on it (see
    /// [`header::EXPECTED_LAST_SUBJECT_SEQUENCE`]), so once a newer owner
    /// published its record, an older owner's writes are refused.
    pub fn owner(&self, partition: PartitionId) -> String {
        format!("{}.owner.{partition}", self.0)
    }

    /// Every ownership subject: `<prefix>.owner.*`.
    pub fn owner_wildcard(&self) -> String {
        format!("{}.owner.*", self.0)
    }

    /// The apology subject of a topic: `<prefix>.apology.<topic>`. A
    /// [`Topic`] is validated to be one or more subject tokens.
    pub fn apology(&self, topic: &Topic) -> String {
        format!("{}.apology.{}", self.0, topic.as_str())
    }

    /// Every apology subject: `<prefix>.apology.>`.
    pub fn apology_wildcard(&self) -> String {
        format!("{}.apology.>", self.0)
    }

    /// The dead-letter subject of a partition: `<prefix>.dlq.<p>`.
    pub fn dlq(&self, partition: PartitionId) -> String {
        format!("{}.dlq.{partition}", self.0)
    }

    /// Every dead-letter subject: `<prefix>.dlq.*`.
    pub fn dlq_wildcard(&self) -> String {
        format!("{}.dlq.*", self.0)
    }

    /// The status endpoint of a partition: `<prefix>.status.<p>`, a core
    /// NATS request-reply subject (no stream): the body is an op id, the
    /// reply a [`query::StatusAnswer`].
    pub fn status(&self, partition: PartitionId) -> String {
        format!("{}.status.{partition}", self.0)
    }

    /// Every status endpoint: `<prefix>.status.*`.
    pub fn status_wildcard(&self) -> String {
        format!("{}.status.*", self.0)
    }

    /// The balance query of a partition: `<prefix>.query.balance.<p>`, core
    /// NATS request-reply: the body is an account id, the reply a
    /// [`query::BalanceAnswer`].
    pub fn query_balance(&self, partition: PartitionId) -> String {
        format!("{}.query.balance.{partition}", self.0)
    }

    /// Every balance query: `<prefix>.query.balance.*`.
    pub fn query_balance_wildcard(&self) -> String {
        format!("{}.query.balance.*", self.0)
    }

    /// The claim query of a partition: `<prefix>.query.claim.<p>`, core NATS
    /// request-reply: the body is a [`query::ClaimQuery`], the reply a
    /// [`query::ClaimAnswer`].
    pub fn query_claim(&self, partition: PartitionId) -> String {
        format!("{}.query.claim.{partition}", self.0)
    }

    /// Every claim query: `<prefix>.query.claim.*`.
    pub fn query_claim_wildcard(&self) -> String {
        format!("{}.query.claim.*", self.0)
    }

    /// The stats endpoint of a partition: `<prefix>.stats.<p>`, core NATS
    /// request-reply: the body is ignored, the reply a
    /// [`query::StatsAnswer`].
    pub fn stats(&self, partition: PartitionId) -> String {
        format!("{}.stats.{partition}", self.0)
    }

    /// Every stats endpoint: `<prefix>.stats.*`.
    pub fn stats_wildcard(&self) -> String {
        format!("{}.stats.*", self.0)
    }

    /// The subjects a stream takes, sorted: one wildcard subject, and for
    /// the decisions stream the ownership records' as well.
    pub fn stream_subjects(&self, stream: Stream) -> Vec<String> {
        match stream {
            Stream::Requests => vec![self.req_wildcard()],
            Stream::Decisions => vec![self.dec_wildcard(), self.owner_wildcard()],
            Stream::Apologies => vec![self.apology_wildcard()],
            Stream::DeadLetters => vec![self.dlq_wildcard()],
        }
    }

    /// A stream's name, e.g. `AMENDS_REQ`.
    pub fn stream_name(&self, stream: Stream) -> String {
        format!("{}_{}", self.upper(), stream.suffix())
    }

    /// The name of the key-value bucket that records the partition count
    /// (under [`PARTITIONS_KEY`]), e.g. `AMENDS_META`.
    pub fn meta_bucket(&self) -> String {
        format!("{}_META", self.upper())
    }

    /// The prefix in upper case, every other character than a letter or a
    /// digit replaced by `_`.
    fn upper(&self) -> String {
        self.0
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    }
}

impl Default for Prefix {
    fn default() -> Prefix {
        Prefix(PREFIX_DEFAULT.to_owned())
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        Prefix::new(s)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// One of the four streams of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// `<prefix>.req.*`: operations and ticks; the system of record.
    Requests,
    /// `<prefix>.dec.*` (and `<prefix>.owner.*`): decisions and
    /// hold-expired events (and the ownership records).
    Decisions,
    /// `<prefix>.apology.>`: apologies, by topic.
    Apologies,
    /// `<prefix>.dlq.*`: dead letters.
    DeadLetters,
}

impl Stream {
    /// Every stream, in this order.
    pub const ALL: [Stream; 4] = [
        Stream::Requests,
        Stream::Decisions,
        Stream::Apologies,
        Stream::DeadLetters,
    ];

    /// The end of the stream's name.
    fn suffix(self) -> &'static str {
        match self {
            Stream::Requests => "REQ",
            Stream::Decisions => "DEC",
            Stream::Apologies => "APOLOGY",
            Stream::DeadLetters => "DLQ",
        }
    }
}

/// A value under [`PARTITIONS_KEY`] that is not a partition count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key {PARTITIONS_KEY} holds {value:?}, which is not a partition count \
     (1 to {max} in decimal digits)",
    max = crate::route::PARTITIONS_MAX
)]
pub struct PartitionsValueError {
    /// The value, lossily decoded as UTF-8.
    pub value: String,
}

/// The partition count recorded under [`PARTITIONS_KEY`] in the meta
/// bucket: exactly the text [`partitions_value`] writes, the count in
/// decimal ASCII digits, in `1..=PARTITIONS_MAX`.
///
/// Nothing else is read as a count: no surrounding whitespace (a trailing
/// newline from a hand-written `nats kv put` included), no sign, no leading
/// zero. A deployment's count decides where every key lives, so a value
/// that is not the one amends wrote is a corrupt record to report, not one
/// to guess at; and the service, the client and the audit read it alike.
pub fn parse_partitions(value: &[u8]) -> Result<Partitions, PartitionsValueError> {
    std::str::from_utf8(value)
        .ok()
        .filter(|text| text.bytes().all(|b| b.is_ascii_digit()) && !text.starts_with('0'))
        .and_then(|text| text.parse::<u32>().ok())
        .and_then(|n| Partitions::new(n).ok())
        .ok_or_else(|| PartitionsValueError {
            value: String::from_utf8_lossy(value).into_owned(),
        })
}

/// The value recorded under [`PARTITIONS_KEY`] for `partitions`: the count
/// in decimal, e.g. `8`. [`parse_partitions`] reads it back.
pub fn partitions_value(partitions: Partitions) -> String {
    partitions.get().to_string()
}

/// The body of an ownership record, published on `<prefix>.owner.<p>`
/// (the decisions stream) by a worker when it takes partition `p`: which
/// process serves it. The record's stream sequence is the owner's epoch,
/// which every decision write of that owner names as the expected last
/// sequence of the subject (the fence).
#[derive(
    Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct OwnershipRecord {
    /// The partition taken.
    pub partition: u32,
    /// The serving process's id on its host.
    pub pid: u32,
    /// The serving process's host name.
    pub host: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_prefix(input: &str, expected: Result<(&str, &str), &str>) {
        match (Prefix::new(input), expected) {
            (Ok(prefix), Ok((req, stream))) => {
                assert_eq!(prefix.req_wildcard(), req, "{input:?}");
                assert_eq!(prefix.stream_name(Stream::Requests), stream, "{input:?}");
            }
            (Err(PrefixError { reason, .. }), Err(want)) => {
                assert_eq!(reason, want, "{input:?}");
            }
            (got, want) => panic!("{input:?}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn prefixes() {
        check_prefix("amends", Ok(("amends.req.*", "AMENDS_REQ")));
        check_prefix("acme.amends", Ok(("acme.amends.req.*", "ACME_AMENDS_REQ")));
        check_prefix("a-b_C9", Ok(("a-b_C9.req.*", "A_B_C9_REQ")));
        check_prefix(
            &"x".repeat(PREFIX_BYTES_MAX),
            Ok((
                &format!("{}.req.*", "x".repeat(64)),
                &format!("{}_REQ", "X".repeat(64)),
            )),
        );
        check_prefix("", Err("it is empty"));
        check_prefix(
            &"x".repeat(PREFIX_BYTES_MAX + 1),
            Err("it is longer than 64 bytes"),
        );
        check_prefix("a..b", Err("it has an empty token"));
        check_prefix(".a", Err("it has an empty token"));
        check_prefix("a.", Err("it has an empty token"));
        check_prefix(".", Err("it has an empty token"));
        // The first wrong token decides.
        check_prefix(
            "a*..b",
            Err("a token has a character other than A-Z a-z 0-9 _ -"),
        );
        check_prefix("a..b*", Err("it has an empty token"));
        for bad in ["a*", "a.>", "a.*", "a b", "a/b", "é", "a\u{0}"] {
            check_prefix(
                bad,
                Err("a token has a character other than A-Z a-z 0-9 _ -"),
            );
        }
        assert_eq!(Prefix::default().as_str(), PREFIX_DEFAULT);
        assert_eq!(Prefix::DEFAULT, "amends");
        assert_eq!(
            "a.b".parse::<Prefix>().map(|p| p.to_string()),
            Ok("a.b".to_owned())
        );
        assert_eq!(
            Prefix::new("a b").map_err(|e| e.to_string()),
            Err(
                "invalid subject prefix \"a b\": a token has a character other than A-Z a-z 0-9 _ -"
                    .to_owned()
            )
        );
    }

    #[test]
    fn subjects_and_names() {
        // Proves every name of specs/protocol.md's "Subjects" table for the default prefix and one with dots and dashes.
        let prefix = Prefix::default();
        let p = Partitions::new(16).expect("16 is a valid count");
        let p7 = p.id(7).expect("7 < 16");
        let topic = Topic::new("orders.payments").expect("a valid topic");
        assert_eq!(prefix.req(p7), "amends.req.7");
        assert_eq!(prefix.dec(p7), "amends.dec.7");
        assert_eq!(prefix.dlq(p7), "amends.dlq.7");
        assert_eq!(prefix.owner(p7), "amends.owner.7");
        assert_eq!(prefix.status(p7), "amends.status.7");
        assert_eq!(prefix.query_balance(p7), "amends.query.balance.7");
        assert_eq!(prefix.query_claim(p7), "amends.query.claim.7");
        assert_eq!(prefix.stats(p7), "amends.stats.7");
        assert_eq!(prefix.status_wildcard(), "amends.status.*");
        assert_eq!(prefix.query_balance_wildcard(), "amends.query.balance.*");
        assert_eq!(prefix.query_claim_wildcard(), "amends.query.claim.*");
        assert_eq!(prefix.stats_wildcard(), "amends.stats.*");
        assert_eq!(prefix.apology(&topic), "amends.apology.orders.payments");
        let names: Vec<_> = Stream::ALL.iter().map(|s| prefix.stream_name(*s)).collect();
        assert_eq!(
            names,
            ["AMENDS_REQ", "AMENDS_DEC", "AMENDS_APOLOGY", "AMENDS_DLQ"]
        );
        let subjects: Vec<_> = Stream::ALL
            .iter()
            .map(|s| prefix.stream_subjects(*s))
            .collect();
        assert_eq!(
            subjects,
            [
                vec!["amends.req.*"],
                vec!["amends.dec.*", "amends.owner.*"],
                vec!["amends.apology.>"],
                vec!["amends.dlq.*"]
            ]
        );
        assert_eq!(prefix.meta_bucket(), "AMENDS_META");

        let tenant = Prefix::new("Tenant-1.amends").expect("a valid prefix");
        let p0 = p.id(0).expect("0 < 16");
        assert_eq!(tenant.req(p0), "Tenant-1.amends.req.0");
        assert_eq!(tenant.stats(p0), "Tenant-1.amends.stats.0");
        assert_eq!(
            tenant.stream_name(Stream::Apologies),
            "TENANT_1_AMENDS_APOLOGY"
        );
        assert_eq!(tenant.meta_bucket(), "TENANT_1_AMENDS_META");
    }

    #[test]
    fn partition_count_values() {
        // Proves the meta bucket's count is read exactly as written: the decimal digits of 1 to 1024 and nothing else (no whitespace, sign, leading zero, or count out of range).
        for n in [1, 2, 9, 10, 16, 1023, 1024] {
            let partitions = Partitions::new(n).expect("in range");
            let value = partitions_value(partitions);
            assert_eq!(value, n.to_string());
            assert_eq!(parse_partitions(value.as_bytes()), Ok(partitions), "{n}");
        }
        for bad in [
            "",
            "0",
            "1025",
            "4294967296",
            "-1",
            "+8",
            "08",
            " 8",
            "8 ",
            "8\n",
            "\t8",
            "8.0",
            "0x8",
            "eight",
            "８",
        ] {
            assert_eq!(
                parse_partitions(bad.as_bytes()),
                Err(PartitionsValueError {
                    value: bad.to_owned()
                }),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_partitions(b"\xff8").map_err(|e| e.to_string()),
            Err(
                "key partitions holds \"\u{fffd}8\", which is not a partition count \
                 (1 to 1024 in decimal digits)"
                    .to_owned()
            )
        );
    }
}
