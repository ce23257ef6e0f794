//! amends-store: durable partition state on sled (group commit, exactly-once
//! resume, bounded memory).
//!
//! Not built yet: this crate is a placeholder until its issue ("Durable
//! partition state on sled") lands. It exports nothing.
