//! Person changes as ClickHouse stores them (spec 1.9): one row per person version in `person`
//! and one per distinct-id version in `person_distinct_id`, both ReplacingMergeTree by version.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::store::Person;

/// A row of ClickHouse's `person` table.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonRow {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub team_id: i64,
    /// The properties object, serialized as JSON; shared with the events that carry it as
    /// `person_properties`, so a person's JSON is written once per version.
    pub properties: Arc<str>,
    pub is_identified: bool,
    pub is_deleted: bool,
    pub version: i64,
}

/// PostHog writes a deleted person with its version plus this, so that the delete outranks
/// any update of the same person still on its way to ClickHouse.
const DELETE_VERSION_BUMP: i64 = 100;

/// A person's properties as JSON, serialized in place (no copy of the map).
pub fn properties_json(properties: &serde_json::Map<String, serde_json::Value>) -> String {
    // Serializing a map of JSON values into a string cannot fail; "{}" only satisfies the type.
    serde_json::to_string(properties).unwrap_or_else(|_| "{}".to_owned())
}

impl PersonRow {
    /// The row of a person as it now is.
    pub fn of(person: &Person) -> Self {
        Self::with_properties(person, properties_json(&person.properties).into())
    }

    /// The row of `person`, whose properties are already serialized as `properties`.
    pub fn with_properties(person: &Person, properties: Arc<str>) -> Self {
        Self {
            id: person.uuid,
            created_at: person.created_at,
            team_id: person.team_id,
            properties,
            is_identified: person.is_identified,
            is_deleted: false,
            version: person.version,
        }
    }

    /// The row that marks `person` deleted.
    pub fn deleted(person: &Person) -> Self {
        Self {
            is_deleted: true,
            version: person.version + DELETE_VERSION_BUMP,
            ..Self::of(person)
        }
    }
}

/// A row of ClickHouse's `person_distinct_id` table.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonDistinctIdRow {
    pub team_id: i64,
    pub distinct_id: String,
    pub person_id: Uuid,
    pub is_deleted: bool,
    pub version: i64,
}
