//! amends-nats: the JetStream topology, partition workers, outbox relay and
//! service endpoints.
//!
//! Not built yet: this crate is a placeholder until its issue ("The service
//! over NATS JetStream") lands. It exports nothing.
