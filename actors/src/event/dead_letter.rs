//! Why an event was not ingested, and the dead-letter record that keeps its raw payload.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Why an event was dropped or dead-lettered. The label is the `drop_cause` of the
/// `ingestion_event_dropped_total` metric, as in PostHog where the cause exists there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The payload is not valid UTF-8.
    InvalidUtf8,
    /// The payload, or its `data` field, is not the JSON object of spec 1.1.
    InvalidJson,
    /// Neither `team_id` nor `token` is set.
    NoToken,
    /// The token belongs to no team.
    InvalidToken,
    /// The message is larger than the largest event this server accepts.
    EventTooLarge,
    /// The event name is missing, empty or not a string after normalization.
    IllegalEventName,
    /// The `distinct_id` is missing or empty.
    IllegalDistinctId,
    /// The `uuid` is missing or not a UUID (PostHog's `skipping_event_invalid_uuid`).
    InvalidUuid,
    /// A plugin's `processEvent` returned null or undefined. Counted, never dead-lettered.
    DroppedByPlugin,
    /// The person store refused the event's person data (a distinct id longer than its
    /// column, a `\u0000` in a `$set` value).
    PersonRejected,
    /// The group store refused the event's group data (a group key longer than its column, a
    /// `\u0000` in a `$group_set` value).
    GroupRejected,
    /// `$identify`, `$create_alias`, `$merge_dangerously` or `$groupidentify` sent with
    /// `$process_person_profile: false`: PostHog drops it with an ingestion warning.
    InvalidWhenPersonless,
    /// A `$snapshot` or `$performance_event` where there is no `session_recording_events`
    /// topic to forward it to (ClickHouse without Kafka): kept here instead of vanishing.
    RecordingNotForwarded,
}

impl DropReason {
    pub const ALL: [Self; 13] = [
        Self::InvalidUtf8,
        Self::InvalidJson,
        Self::NoToken,
        Self::InvalidToken,
        Self::EventTooLarge,
        Self::IllegalEventName,
        Self::IllegalDistinctId,
        Self::InvalidUuid,
        Self::DroppedByPlugin,
        Self::PersonRejected,
        Self::GroupRejected,
        Self::InvalidWhenPersonless,
        Self::RecordingNotForwarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidJson => "invalid_json",
            Self::NoToken => "no_token",
            Self::InvalidToken => "invalid_token",
            Self::EventTooLarge => "event_too_large",
            Self::IllegalEventName => "illegal_event_name",
            Self::IllegalDistinctId => "illegal_distinct_id",
            Self::InvalidUuid => "invalid_uuid",
            Self::DroppedByPlugin => "dropped_by_plugin",
            Self::PersonRejected => "person_rejected",
            Self::GroupRejected => "group_rejected",
            Self::InvalidWhenPersonless => "invalid_event_when_process_person_profile_is_false",
            Self::RecordingNotForwarded => "recording_not_forwarded",
        }
    }

    /// Whether the event is kept in the dead-letter store (everything but a plugin's choice).
    pub fn is_dead_lettered(self) -> bool {
        !matches!(self, Self::DroppedByPlugin | Self::InvalidWhenPersonless)
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `events_dead_letter_queue` (spec 1.9). Fields the payload did not yield are
/// empty; `raw_payload` always holds the message as received (lossily decoded if it was
/// not UTF-8).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// A new id per failure.
    pub id: Uuid,
    pub event_uuid: Uuid,
    pub event: String,
    pub properties: String,
    pub distinct_id: String,
    pub team_id: i64,
    pub ip: String,
    pub site_url: String,
    pub now: DateTime<Utc>,
    pub raw_payload: String,
    pub error_timestamp: DateTime<Utc>,
    pub reason: DropReason,
    /// Human-readable detail, e.g. the JSON parser's message.
    pub error: String,
}

impl DeadLetter {
    /// PostHog's `error_location` for ingestion failures.
    pub const ERROR_LOCATION: &'static str = "plugin_server_ingest_event";
    /// PostHog's tags for ingestion failures.
    pub const TAGS: [&'static str; 2] = ["plugin_server", "ingest_event"];

    /// A dead letter for a payload that could not be parsed far enough to know the event.
    pub fn unparsed(raw: &[u8], reason: DropReason, error: impl Into<String>) -> Self {
        let now = Utc::now();
        Self {
            id: Uuid::now_v7(),
            event_uuid: Uuid::nil(),
            event: String::new(),
            properties: String::new(),
            distinct_id: String::new(),
            team_id: 0,
            ip: String::new(),
            site_url: String::new(),
            now,
            raw_payload: String::from_utf8_lossy(raw).into_owned(),
            error_timestamp: now,
            reason,
            error: error.into(),
        }
    }

    /// The `error` column: PostHog's prefix, the reason, then the detail.
    pub fn error_message(&self) -> String {
        format!("ingestEvent failed. Error: {}: {}", self.reason, self.error)
    }
}
