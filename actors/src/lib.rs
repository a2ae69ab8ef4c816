//! The actors of plugin-server, and the pieces they share: supervision, per-actor stats,
//! Prometheus metrics, health, and the database migrations.
//!
//! Nothing here reads env vars or files: `src/settings.rs` builds each actor's config struct
//! and `src/topology.rs` wires the actors together.

pub mod actions;
pub mod clickhouse_client;
pub mod cluster;
pub mod definitions;
pub mod event;
pub mod geoip;
pub mod groups;
pub mod ingest;
pub mod kafka;
pub mod migrations;
pub mod persons;
pub mod plugins;
pub mod postgres;
pub mod sqlite;
pub mod system;
#[cfg(all(test, feature = "integration-tests"))]
mod test_support;

/// Unit tests of this crate run plugins, so they need the allocator that caps a plugin call's
/// memory (the server binary installs it in `main.rs`).
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: plugin_server_alloc::BudgetedAllocator<std::alloc::System> =
    plugin_server_alloc::BudgetedAllocator(std::alloc::System);

/// Asks an actor to finish its in-flight work (flush, commit, tear down) before the process
/// exits. Sent in reverse dependency order by the topology; the reply means "drained".
#[derive(Debug, Clone, Copy, actix::Message)]
#[rtype(result = "()")]
pub struct Shutdown;
