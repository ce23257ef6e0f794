//! What the service's query endpoints answer (protocol: "Queries"): an
//! account's balance ([`crate::Client::balance`]), the owner of a claim
//! ([`crate::Client::claim_owner`]) and a partition's stats
//! ([`crate::Client::stats`]).
//!
//! The answers are the protocol's types ([`amends_core::protocol::query`]),
//! which the service builds its replies from; [`Balance`],
//! [`PartitionStats`] and [`PartitionState`] are re-exported from there.
//! [`ClaimOwner`] is the client's view of a claim answer, claimed or free.
//!
//! Each answer is read from the partition's store as of some applied
//! position (`position`): it may trail operations that are in the log but
//! not yet applied (see [`PartitionStats::lag`]).

use amends_core::command::Owner;
pub use amends_core::protocol::query::{Balance, PartitionState, PartitionStats};
use amends_core::protocol::query::{Claimed, Free};
use serde::{Deserialize, Serialize};

/// A claim's owner, as its partition answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimOwner {
    /// Who holds the claim; `None` when it is free.
    pub owner: Option<Owner>,
    /// Whether a saga in flight holds it tentatively (it becomes final, or
    /// free, when the saga ends).
    #[serde(default)]
    pub tentative: bool,
    /// The partition's applied position the answer was read at (or after).
    pub position: u64,
    /// The log time of that position.
    pub log_time_ms: u64,
}

impl From<Claimed> for ClaimOwner {
    fn from(claimed: Claimed) -> ClaimOwner {
        ClaimOwner {
            owner: Some(claimed.owner),
            tentative: claimed.tentative,
            position: claimed.position,
            log_time_ms: claimed.log_time_ms,
        }
    }
}

impl From<Free> for ClaimOwner {
    fn from(free: Free) -> ClaimOwner {
        ClaimOwner {
            owner: None,
            tentative: false,
            position: free.position,
            log_time_ms: free.log_time_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use amends_core::command::{ClaimKey, Namespace};
    use amends_core::protocol::query::ClaimAnswer;

    use super::*;

    #[test]
    fn the_client_speaks_the_services_types() {
        // Proves there is no client copy of the protocol left to drift: the client's prefix and answers are amends-nats's own types (this compiles only if they are the same), and a claim answer, claimed or free, reads as a ClaimOwner.
        let prefix: crate::Prefix = amends_nats::topology::Prefix::default();
        assert_eq!(prefix.as_str(), amends_nats::topology::PREFIX_DEFAULT);
        let _: fn(Balance) -> amends_core::protocol::query::Balance = |b| b;
        let namespace = Namespace::new("seat").expect("a namespace");
        let key = ClaimKey::new("12A").expect("a key");
        let claimed: ClaimAnswer = serde_json::from_str(
            r#"{"key":"12A","log_time_ms":1000,"namespace":"seat","owner":"carol","position":9,"status":"claimed","tentative":true}"#,
        )
        .expect("a claim answer");
        let ClaimAnswer::Claimed(claimed) = claimed else {
            panic!("not claimed: {claimed:?}")
        };
        assert_eq!((&claimed.namespace, &claimed.key), (&namespace, &key));
        assert_eq!(
            ClaimOwner::from(claimed),
            ClaimOwner {
                owner: Some(Owner::new("carol").expect("an owner")),
                tentative: true,
                position: 9,
                log_time_ms: 1_000,
            }
        );
        assert_eq!(
            ClaimOwner::from(Free {
                namespace,
                key,
                position: 3,
                log_time_ms: 4,
            }),
            ClaimOwner {
                owner: None,
                tentative: false,
                position: 3,
                log_time_ms: 4,
            }
        );
    }
}
