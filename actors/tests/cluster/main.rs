//! The cluster primitives' contract suites, in one test binary: each suite runs against the
//! in-process adapter and (with the `integration-tests` feature) against the real Redis or
//! Postgres. One binary rather than one per suite, because every test binary links the whole
//! actor crate and CI has limited disk and two cores.

mod cache;
mod common;
mod event_queue;
mod lock;
mod pubsub;
mod sync;
