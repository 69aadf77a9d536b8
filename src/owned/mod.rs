//! Owned state (`state.mode = "owned"`, design in `docs/state.md`): the in-memory state of the
//! members a worker owns, and how members are routed to their owner. The loop that drives it is
//! `worker/owned.rs`.

pub mod cache;
pub mod member;
pub mod route;
