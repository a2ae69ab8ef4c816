//! Groups (spec 1.3 prepareEventStep, 1.8, 1.9): PostHog's group analytics on a [`GroupStore`].
//!
//! - an event's `$groups` (`{type: key}`) becomes `$group_<index>` properties, each group type
//!   taking one of a team's five indexes on first sight (`posthog_grouptypemapping`);
//! - `$groupidentify` with `$group_type` and `$group_key` merges `$group_set` into the group
//!   (`posthog_group`, and a `groups` row for ClickHouse when it changed);
//! - every event's `groupN_properties` / `groupN_created_at` columns show the groups its
//!   `$group_N` properties name, as they are after the batch's earlier events.
//!
//! [`manager`] does this for a batch with caches in front; [`postgres`] and [`sqlite`] are
//! the stores of the cluster and embedded profiles, [`memory`] one for unit tests.

pub mod manager;
pub mod memory;
pub mod postgres;
pub mod sqlite;
pub mod store;

pub use manager::{
    EventGroups, GroupColumn, GroupColumns, GroupConfig, GroupManager, GroupOutcome,
};
pub use memory::MemoryGroupStore;
pub use postgres::PostgresGroupStore;
pub use sqlite::SqliteGroupStore;
pub use store::{
    BatchUpserted, Group, GroupKey, GroupRow, GroupStore, GroupStoreError, GroupUpsert,
    MAX_GROUP_TYPES, SharedGroupStore, Upserted, merge_group_set,
};

#[cfg(test)]
mod tests;
