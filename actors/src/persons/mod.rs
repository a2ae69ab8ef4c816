//! Persons (spec 1.5): PostHog's `PersonState` on a [`PersonStore`].
//!
//! - [`identity`] and [`properties`]: the database-free rules: which events merge two distinct
//!   ids, which ids may never be merged, what a merge does depending on which people already
//!   exist, and how `$set`/`$set_once`/`$unset` change a person's properties;
//! - [`state`]: those rules applied to one event in one store transaction, retried on races;
//! - [`manager`]: a batch's events through [`state`], concurrently per distinct id, with the
//!   DISTINCT_ID_LRU_SIZE cache in front;
//! - [`postgres`] and [`sqlite`]: the stores of the cluster and embedded profiles, and
//!   [`memory`] for unit tests;
//! - [`rows`]: the changes as ClickHouse's `person` and `person_distinct_id` rows.

pub mod identity;
pub mod manager;
pub mod memory;
pub mod postgres;
pub mod properties;
pub mod rows;
pub mod sqlite;
pub mod state;
pub mod store;

pub use identity::{
    CANNOT_MERGE_ALREADY_IDENTIFIED, CANNOT_MERGE_WITH_ILLEGAL_DISTINCT_ID, IllegalIdReason,
    IllegalIdSide, IllegalMerge, MergeDecision, MergeIntent, MergeKind, PersonRef, decide,
    illegal_distinct_id_reason, is_illegal_distinct_id, merge_intent,
};
pub use manager::{EventPerson, PersonConfig, PersonManager, PersonMetrics, PersonOutcome};
pub use memory::MemoryPersonStore;
pub use postgres::PostgresPersonStore;
pub use properties::{
    CREATOR_EVENT_UUID, PersonUpdates, apply_updates, initial_properties, merged_properties,
    person_updates,
};
pub use rows::{PersonDistinctIdRow, PersonRow};
pub use sqlite::SqlitePersonStore;
pub use state::{PersonError, PersonEvent, Resolution};
pub use store::{
    Person, PersonStore, PersonStoreError, PersonVersion, PersonWrite, SharedPersonStore,
    SnapshotEntry, SnapshotKey, WriteOutcome,
};
