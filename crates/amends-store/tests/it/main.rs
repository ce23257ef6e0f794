//! Integration tests of amends-store, as one binary: the SIGKILL crash test,
//! the model-based property test, rebuild by replay, misuse and corruption,
//! sagas.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod crash;
mod misuse;
mod props;
mod rebuild;
mod sagas;
mod support;
