//! Integration tests of amends-client against a real `nats-server` and real
//! partition workers.
//!
//! One test binary (see STYLE.md): `support` holds the deployment fixture;
//! the servers come from `amends_nats::test_support`. Without the pinned
//! nats-server every test fails with the install hint; none is skipped.

mod apology;
mod client;
mod support;
