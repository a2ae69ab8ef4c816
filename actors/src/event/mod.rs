//! What every stage shares about an event: its three shapes (as parsed from the envelope, as
//! plugins see it, and as the row written to ClickHouse; spec 1.1, 1.4, 1.8), the Kafka envelope
//! format ([`envelope`], the one place it is read and written), dead letters, elements, the team
//! it belongs to, and the intake HTTP capture hands events to.
//!
//! The bottom layer with `crate::system`: it imports from no other module of this crate.

pub mod dead_letter;
pub mod elements;
pub mod envelope;
pub mod intake;
pub mod iso8601;
pub mod js;
pub mod properties;
pub mod team;

pub use dead_letter::{DeadLetter, DropReason};
pub use properties::Properties;
pub use team::Team;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A JSON object as `serde_json` builds it: the event's top-level `$set` and `$set_once`.
pub type JsonObject = Map<String, Value>;

/// An event after envelope parsing and normalization (spec 1.1), before its team is known.
///
/// `team_id` is trusted when present (events produced by PostHog itself); otherwise the
/// `token` finds the team.
///
/// Built by `envelope::parse_envelope`, never by serde: the JSON envelope is parsed field by
/// field there, and the inner `PluginEvent` carries PostHog's shape for plugins.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineEvent {
    pub team_id: Option<i64>,
    pub token: Option<String>,
    /// Boxed: the pipeline's steps move each event from one batch vector to the next, and
    /// the event is over 500 bytes.
    pub event: Box<PluginEvent>,
}

/// The event as plugins receive and return it from `processEvent` (PostHog's `PluginEvent`).
///
/// Field names and JSON shape are PostHog's, because plugins read and write them directly.
/// `team_id` is 0 until the team step has run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginEvent {
    pub distinct_id: String,
    pub ip: Option<String>,
    pub site_url: Option<String>,
    #[serde(default)]
    pub team_id: i64,
    /// Server time when the event was captured, ISO 8601. Trusted.
    pub now: String,
    pub event: String,
    /// Client time when the event was sent, ISO 8601. Not trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    #[serde(default)]
    pub properties: Properties,
    /// As sent by the client: usually an ISO string, occasionally something else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Value>,
    /// Milliseconds before `now` at which the event happened (mobile SDKs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<Value>,
    pub uuid: String,
    #[serde(rename = "$set", default, skip_serializing_if = "Option::is_none")]
    pub set: Option<JsonObject>,
    #[serde(rename = "$set_once", default, skip_serializing_if = "Option::is_none")]
    pub set_once: Option<JsonObject>,
}

#[cfg(test)]
impl PluginEvent {
    /// An event of team 2 named `name` with `properties` (a JSON object), for tests.
    pub fn for_test(name: &str, properties: Value) -> Self {
        Self {
            distinct_id: "user".to_owned(),
            ip: None,
            site_url: None,
            team_id: 2,
            now: "2024-01-01T00:00:00Z".to_owned(),
            event: name.to_owned(),
            sent_at: None,
            properties: properties
                .as_object()
                .cloned()
                .map(Properties::from)
                .unwrap_or_default(),
            timestamp: None,
            offset: None,
            uuid: uuid::Uuid::new_v4().to_string(),
            set: None,
            set_once: None,
        }
    }
}

/// One row of the `events` table (spec 1.8), independent of how a sink encodes it.
///
/// Person and group columns keep their empty values (nil uuid, `{}`, the epoch) until the
/// person and group steps fill them.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub uuid: Uuid,
    pub event: String,
    /// The properties object, serialized as JSON.
    pub properties: String,
    pub timestamp: DateTime<Utc>,
    pub team_id: i64,
    pub distinct_id: String,
    pub elements_chain: String,
    /// When this server ingested the event.
    pub created_at: DateTime<Utc>,
    pub person_id: Uuid,
    /// Shared with the person's other events of the batch (and the person cache).
    pub person_properties: Arc<str>,
    pub person_created_at: DateTime<Utc>,
    pub person_mode: PersonMode,
    /// Shared with the group's other events (`{}` with every row naming no group).
    pub group_properties: [Arc<str>; 5],
    pub group_created_at: [DateTime<Utc>; 5],
}

/// PostHog's `person_mode` column: how the event's person columns came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PersonMode {
    /// The person was resolved, created or updated as usual.
    #[default]
    Full,
    /// `$process_person_profile: false`: no person was created or changed; the columns hold
    /// an existing person's id (properties `{}`) or a deterministic id for the distinct id.
    Propertyless,
    /// Personless, but the distinct id already has a person created over a minute before the
    /// event: the event belongs to that person (PostHog upgrades such events).
    ForceUpgrade,
}

impl PersonMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Propertyless => "propertyless",
            Self::ForceUpgrade => "force_upgrade",
        }
    }

    /// The value of ClickHouse's `Enum8('full' = 0, 'propertyless' = 1, 'force_upgrade' = 2)`.
    pub fn enum8(self) -> i8 {
        match self {
            Self::Full => 0,
            Self::Propertyless => 1,
            Self::ForceUpgrade => 2,
        }
    }
}

#[cfg(test)]
impl EventRow {
    /// A `$pageview` row of team 2 and `user-1` with these properties (JSON), stored now,
    /// without person or groups, for tests.
    pub fn for_test(properties: &str) -> Self {
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        Self {
            uuid: Uuid::new_v4(),
            event: "$pageview".to_owned(),
            properties: properties.to_owned(),
            timestamp: Utc::now(),
            team_id: 2,
            distinct_id: "user-1".to_owned(),
            elements_chain: String::new(),
            created_at: Utc::now(),
            person_id: Uuid::nil(),
            person_properties: "".into(),
            person_created_at: epoch,
            person_mode: PersonMode::Full,
            group_properties: Default::default(),
            group_created_at: [epoch; 5],
        }
    }
}

impl EventRow {
    /// A rough size in bytes, for batching by KAFKA_MAX_MESSAGE_BATCH_SIZE.
    pub fn approximate_size(&self) -> usize {
        const FIXED: usize = 16 * 2 + 8 * 9;
        FIXED
            + self.event.len()
            + self.properties.len()
            + self.distinct_id.len()
            + self.elements_chain.len()
            + self.person_properties.len()
            + self
                .group_properties
                .iter()
                .map(|json| json.len())
                .sum::<usize>()
    }
}

/// A problem with an event that does not stop its ingestion, written to the
/// `ingestion_warnings` table (spec 1.9) so that the team can see it.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestionWarning {
    pub team_id: i64,
    /// PostHog's warning type, e.g. `ignored_invalid_timestamp`, `event_timestamp_in_future`.
    pub kind: &'static str,
    /// A JSON object with the specifics (event uuid, offending field and value, ...).
    pub details: Value,
    pub timestamp: DateTime<Utc>,
}

/// A normalized event with its team, parsed timestamp and checked uuid: what the person step
/// needs, and what `crate::ingest::prepare::build_row` turns into the stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct StampedEvent {
    /// Boxed, as in [`PipelineEvent`].
    pub event: Box<PluginEvent>,
    pub uuid: Uuid,
    pub timestamp: DateTime<Utc>,
}
