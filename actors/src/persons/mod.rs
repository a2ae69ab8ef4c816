//! The database-free rules of PostHog's `PersonState` (spec 1.5): which events merge two
//! distinct ids, which ids may never be merged, what a merge does depending on which people
//! already exist, and how an event's `$set`/`$set_once`/`$unset` change a person's properties.
//!
//! Everything here is a pure function of its inputs so the Postgres-backed person store can be
//! wired in later without re-deciding any of these rules inside a transaction.

pub mod identity;
pub mod properties;

pub use identity::{
    CANNOT_MERGE_ALREADY_IDENTIFIED, CANNOT_MERGE_WITH_ILLEGAL_DISTINCT_ID, IllegalIdReason,
    IllegalIdSide, IllegalMerge, MergeDecision, MergeIntent, MergeKind, PersonRef, decide,
    illegal_distinct_id_reason, is_illegal_distinct_id, merge_intent,
};
pub use properties::{
    CREATOR_EVENT_UUID, PersonUpdates, apply_updates, initial_properties, merged_properties,
    person_updates,
};
