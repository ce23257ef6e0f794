//! The subject and header names the client needs, copied from
//! `specs/protocol.md` ("Subjects", "Headers").
//!
//! The client depends on amends-core only (see ARCHITECTURE.md), so it cannot
//! ask `amends_nats::topology`; it restates the few names it uses here, from
//! the protocol, as any client in another language would. A unit test checks
//! every one against `amends_nats::topology` so that the two cannot drift.

use std::fmt;

use amends_core::command::is_subject_token_byte;
use amends_core::route::PartitionId;

use crate::Error;

/// `Nats-Msg-Id`: the op id; JetStream drops a second publish with the same
/// id inside the requests stream's duplicate window.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";

/// `Amends-Reply-To`: where the worker sends the decision of a waiting
/// client, in addition to the decisions stream.
pub(crate) const REPLY_TO: &str = "Amends-Reply-To";

/// The key of the meta bucket that records the partition count.
pub(crate) const PARTITIONS_KEY: &str = "partitions";

/// The longest subject prefix, in bytes (protocol: "at most 64 bytes").
pub const PREFIX_BYTES_MAX: usize = 64;

/// A validated subject prefix: one or more dot-separated, non-empty tokens
/// of `A-Z a-z 0-9 _ -`, at most [`PREFIX_BYTES_MAX`] bytes; the default is
/// `amends`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// The default prefix of a deployment.
    pub const DEFAULT: &str = "amends";

    /// Validates a prefix.
    pub fn new(prefix: impl Into<String>) -> Result<Prefix, Error> {
        let prefix = prefix.into();
        let reason = if prefix.is_empty() {
            Some("it is empty")
        } else if prefix.len() > PREFIX_BYTES_MAX {
            Some("it is longer than 64 bytes")
        } else if prefix.split('.').any(str::is_empty) {
            Some("it has an empty token")
        } else if !prefix
            .bytes()
            .all(|b| is_subject_token_byte(b) || b == b'.')
        {
            Some("a token has a character other than A-Z a-z 0-9 _ -")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidPrefix { prefix, reason }),
            None => Ok(Prefix(prefix)),
        }
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The request subject of a partition: `<prefix>.req.<p>`.
    pub(crate) fn req(&self, partition: PartitionId) -> String {
        format!("{}.req.{partition}", self.0)
    }

    /// The status endpoint of a partition: `<prefix>.status.<p>` (core
    /// NATS request-reply).
    pub(crate) fn status(&self, partition: PartitionId) -> String {
        format!("{}.status.{partition}", self.0)
    }

    /// The balance query of a partition: `<prefix>.query.balance.<p>`
    /// (core NATS request-reply).
    pub(crate) fn query_balance(&self, partition: PartitionId) -> String {
        format!("{}.query.balance.{partition}", self.0)
    }

    /// The claim query of a partition: `<prefix>.query.claim.<p>` (core
    /// NATS request-reply).
    pub(crate) fn query_claim(&self, partition: PartitionId) -> String {
        format!("{}.query.claim.{partition}", self.0)
    }

    /// The stats endpoint of a partition: `<prefix>.stats.<p>` (core NATS
    /// request-reply).
    pub(crate) fn stats(&self, partition: PartitionId) -> String {
        format!("{}.stats.{partition}", self.0)
    }

    /// The apology subject of a topic: `<prefix>.apology.<topic>`.
    pub(crate) fn apology(&self, topic: &amends_core::command::Topic) -> String {
        format!("{}.apology.{}", self.0, topic.as_str())
    }

    /// The apology stream, `<PREFIX>_APOLOGY` (upper-cased as the meta
    /// bucket's name is).
    pub(crate) fn apology_stream(&self) -> String {
        let meta = self.meta_bucket();
        let upper = meta.strip_suffix("_META").unwrap_or(&meta);
        format!("{upper}_APOLOGY")
    }

    /// The meta bucket, `<PREFIX>_META`: the prefix upper-cased, every
    /// character other than a letter or digit replaced by `_`.
    pub(crate) fn meta_bucket(&self) -> String {
        let upper: String = self
            .0
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{upper}_META")
    }
}

impl Default for Prefix {
    fn default() -> Prefix {
        Prefix(Prefix::DEFAULT.to_owned())
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

#[cfg(test)]
mod tests {
    use amends_core::route::Partitions;
    use amends_nats::topology::{self, header};

    use super::*;

    fn check(prefix: &str) {
        let ours = Prefix::new(prefix);
        let theirs = topology::Prefix::new(prefix);
        assert_eq!(ours.is_ok(), theirs.is_ok(), "prefix {prefix:?}");
        let (Ok(ours), Ok(theirs)) = (ours, theirs) else {
            return;
        };
        let partitions = Partitions::new(1024).expect("a valid count");
        for p in [0, 1, 9, 10, 1023] {
            let p = partitions.id(p).expect("in range");
            assert_eq!(ours.req(p), theirs.req(p));
            assert_eq!(ours.status(p), theirs.status(p));
            assert_eq!(ours.query_balance(p), theirs.query_balance(p));
            assert_eq!(ours.query_claim(p), theirs.query_claim(p));
            assert_eq!(ours.stats(p), theirs.stats(p));
        }
        assert_eq!(ours.meta_bucket(), theirs.meta_bucket());
        assert_eq!(
            ours.apology_stream(),
            theirs.stream_name(topology::Stream::Apologies)
        );
        for topic in ["t", "orders.payments", "A-b_9.x"] {
            let topic = amends_core::command::Topic::new(topic).expect("a valid topic");
            assert_eq!(ours.apology(&topic), theirs.apology(&topic));
        }
    }

    #[test]
    fn names_match_the_topology() {
        // Proves the client's copy of the protocol's names equals amends-nats's, for valid and invalid prefixes alike.
        assert_eq!(MSG_ID, header::MSG_ID);
        assert_eq!(REPLY_TO, header::REPLY_TO);
        assert_eq!(PARTITIONS_KEY, topology::PARTITIONS_KEY);
        assert_eq!(Prefix::DEFAULT, topology::PREFIX_DEFAULT);
        assert_eq!(PREFIX_BYTES_MAX, topology::PREFIX_BYTES_MAX);
        assert_eq!(
            Prefix::default().as_str(),
            topology::Prefix::default().as_str()
        );
        for prefix in [
            "amends",
            "a.b-c.d_e",
            "Tenant-1.amends",
            "",
            ".",
            "a..b",
            "a.",
            "a.*",
            "a.>",
            "a b",
            "é",
            &"x".repeat(64),
            &"x".repeat(65),
        ] {
            check(prefix);
        }
    }
}
