//! Integration tests of amends-nats against real `nats-server` processes.
//!
//! One test binary (see STYLE.md): `support` holds the shared helpers; the
//! servers come from `amends_nats::test_support`. Without the pinned
//! nats-server every test fails with the install hint; none is skipped.

mod cluster;
mod jetstream;
mod queries;
mod service;
mod stall;
mod support;
mod topology;
mod worker;
