//! Event and property definitions (spec 1.9; PostHog's `PropertyDefinitionsManager`): which
//! events each team sends, which properties they carry, and each property's type, kept in
//! `posthog_eventdefinition`, `posthog_eventproperty` and `posthog_propertydefinition` for
//! PostHog's UI; and the team's `ingested_event` flag, set by its first event.
//!
//! - [`types`]: the type a property's first value gives it;
//! - [`manager`]: what a batch adds, against caches, so that known events cost a hash lookup;
//!   writes go in the background, off the ingestion path, as PostHog only logs their errors;
//! - [`postgres`]: the writes, one statement per table per batch; [`sqlite`]: the embedded
//!   profile's, one transaction per batch.

pub mod manager;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod store_tests;
pub mod types;

pub use manager::{DefinitionConfig, DefinitionStore, DefinitionStoreError, DefinitionsManager};
pub use manager::{NewDefinitions, PropertyDefinition, PropertyKind};
pub use postgres::PostgresDefinitionStore;
pub use sqlite::SqliteDefinitionStore;
pub use types::{PropertyType, detect_property_type};
