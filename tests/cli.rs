//! The `amends` offline commands: `route` agrees with the routing vectors and
//! `decode` tells a valid request from a refused or dead-lettered one, by
//! running the built binary.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn amends(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_amends"))
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn route_matches_vectors() {
    // Every vector of specs/vectors/routing.json, through the binary, for two N.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/specs/vectors/routing.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 50);
    // Process arguments cannot carry NUL, so keys with one are left to the
    // library test.
    for v in vectors
        .iter()
        .filter(|v| !v["key"].as_str().unwrap().contains('\0'))
    {
        let key = v["key"].as_str().unwrap();
        for n in ["16", "100"] {
            let expected = v["partitions"][n].as_u64().unwrap().to_string();
            let (ok, out) = amends(&["route", "-n", n, "--", key]);
            assert!(ok, "route failed for {key:?}");
            assert_eq!(out.trim(), expected, "key {key:?}, N={n}");
        }
    }
}

#[test]
fn decode_sorts_valid_malformed_and_unreadable() {
    // A fresh op id: one from another day is refused now (see tests/e2e/opid.rs).
    let (ok, op_id) = amends(&["op-id"]);
    assert!(ok);
    let valid = format!(
        r#"{{"op_id":"{}","command":{{"type":"debit","account":"alice","amount":5}}}}"#,
        op_id.trim()
    );
    let (ok, out) = amends(&["decode", "-n", "16", &valid]);
    assert!(ok);
    assert!(
        out.contains("valid request") && out.contains("partition"),
        "{out}"
    );

    let malformed = r#"{"op_id":"01900000-0000-7000-8000-000000000001","command":{"type":"debit","account":"alice","amount":0}}"#;
    let (ok, out) = amends(&["decode", malformed]);
    assert!(!ok);
    assert!(
        out.contains("malformed") && out.contains("amount must be at least 1"),
        "{out}"
    );

    let (ok, out) = amends(&["decode", "{not json"]);
    assert!(!ok);
    assert!(out.contains("dead letter"), "{out}");
}
