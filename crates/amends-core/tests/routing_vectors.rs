//! Proves the Rust partitioner reproduces every vector of specs/vectors/routing.json, written by an independent Python implementation.

use amends_core::route::{Partitions, claim_routing_key, fnv1a_64, partition_of, saga_routing_key};
use serde_json::Value;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../specs/vectors/routing.json"
);

fn load() -> Vec<Value> {
    let text =
        std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("cannot read {VECTORS}: {e}"));
    let doc: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{VECTORS} is not JSON: {e}"));
    doc.get("vectors")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{VECTORS} has no \"vectors\" array"))
        .clone()
}

fn str_field<'a>(vector: &'a Value, field: &str) -> &'a str {
    vector
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("vector {vector} has no string field {field:?}"))
}

#[test]
fn file_is_substantial() {
    let vectors = load();
    assert!(
        vectors.len() >= 50,
        "only {} vectors in {VECTORS}",
        vectors.len()
    );
    assert!(
        vectors.iter().any(|v| !str_field(v, "key").is_ascii()),
        "no non-ASCII key in {VECTORS}"
    );
}

#[test]
fn rust_matches_every_vector() {
    let vectors = load();
    let mut checked = 0usize;
    for vector in &vectors {
        let key = str_field(vector, "key");

        let hex = str_field(vector, "fnv1a_64");
        let digits = hex
            .strip_prefix("0x")
            .unwrap_or_else(|| panic!("key {key:?}: fnv1a_64 {hex:?} lacks 0x"));
        let expected_hash = u64::from_str_radix(digits, 16)
            .unwrap_or_else(|e| panic!("key {key:?}: bad fnv1a_64 {hex:?}: {e}"));
        assert_eq!(
            fnv1a_64(key.as_bytes()),
            expected_hash,
            "fnv1a_64 of key {key:?}"
        );

        let partitions = vector
            .get("partitions")
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("key {key:?}: no \"partitions\" object"));
        assert!(!partitions.is_empty(), "key {key:?}: empty \"partitions\"");
        for (n_text, expected) in partitions {
            let n: u32 = n_text
                .parse()
                .unwrap_or_else(|e| panic!("key {key:?}: bad N {n_text:?}: {e}"));
            let n = Partitions::new(n).unwrap_or_else(|e| panic!("key {key:?}: N={n_text}: {e}"));
            let expected = expected
                .as_u64()
                .unwrap_or_else(|| panic!("key {key:?}, N={n_text}: {expected} is not a number"));
            assert_eq!(
                u64::from(partition_of(key, n).get()),
                expected,
                "partition_of(key {key:?}, N={n_text})"
            );
            checked += 1;
        }

        match vector.get("kind").and_then(Value::as_str) {
            Some("claim") => {
                let namespace = str_field(vector, "namespace");
                let claim_key = str_field(vector, "claim_key");
                assert_eq!(
                    claim_routing_key(namespace, claim_key),
                    key,
                    "claim_routing_key for key {key:?}"
                );
            }
            Some("saga") => {
                let op_id = uuid::Uuid::parse_str(key)
                    .unwrap_or_else(|e| panic!("saga key {key:?} is not a UUID: {e}"));
                assert_eq!(
                    saga_routing_key(&op_id),
                    key,
                    "saga_routing_key for key {key:?}"
                );
            }
            _ => {}
        }
    }
    assert!(
        checked >= vectors.len(),
        "checked only {checked} (key, N) pairs"
    );
}
