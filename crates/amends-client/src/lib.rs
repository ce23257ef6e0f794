//! amends-client: the Rust client (submit, wait, resubmit, status, apologies).
//!
//! Not built yet: this crate is a placeholder until its issue ("The service
//! over NATS JetStream") lands. It exports nothing.
