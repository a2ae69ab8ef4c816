//! PostHog's JSON encoding of the rows (the values of its `clickhouse_events_json`,
//! `clickhouse_ingestion_warnings`, `clickhouse_person` and `clickhouse_person_distinct_id`
//! topics and its dead-letter rows), used by the JSON-lines sink
//! so that files written by the embedded profile load into PostHog's tables unchanged.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::event::{DeadLetter, EventRow, IngestionWarning};
use crate::groups::GroupRow;
use crate::persons::{PersonDistinctIdRow, PersonRow};

/// `yyyy-MM-dd HH:mm:ss.SSS` in UTC, PostHog's `castTimestampOrNow` format.
fn millis(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// `yyyy-MM-dd HH:mm:ss` in UTC, for person and group creation times.
fn seconds(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[derive(Serialize)]
pub(super) struct EventJson<'a> {
    uuid: Uuid,
    event: &'a str,
    properties: &'a str,
    timestamp: String,
    team_id: i64,
    distinct_id: &'a str,
    elements_chain: &'a str,
    created_at: String,
    person_id: Uuid,
    person_properties: &'a str,
    person_created_at: String,
    person_mode: &'static str,
    group0_properties: &'a str,
    group1_properties: &'a str,
    group2_properties: &'a str,
    group3_properties: &'a str,
    group4_properties: &'a str,
    group0_created_at: String,
    group1_created_at: String,
    group2_created_at: String,
    group3_created_at: String,
    group4_created_at: String,
}

impl<'a> From<&'a EventRow> for EventJson<'a> {
    fn from(row: &'a EventRow) -> Self {
        let [g0, g1, g2, g3, g4] = &row.group_properties;
        let [c0, c1, c2, c3, c4] = &row.group_created_at;
        Self {
            uuid: row.uuid,
            event: &row.event,
            properties: &row.properties,
            timestamp: millis(&row.timestamp),
            team_id: row.team_id,
            distinct_id: &row.distinct_id,
            elements_chain: &row.elements_chain,
            created_at: millis(&row.created_at),
            person_id: row.person_id,
            person_properties: &row.person_properties,
            person_created_at: seconds(&row.person_created_at),
            person_mode: row.person_mode.as_str(),
            group0_properties: g0,
            group1_properties: g1,
            group2_properties: g2,
            group3_properties: g3,
            group4_properties: g4,
            group0_created_at: seconds(c0),
            group1_created_at: seconds(c1),
            group2_created_at: seconds(c2),
            group3_created_at: seconds(c3),
            group4_created_at: seconds(c4),
        }
    }
}

#[derive(Serialize)]
pub(super) struct DeadLetterJson<'a> {
    id: Uuid,
    event_uuid: Uuid,
    event: &'a str,
    properties: &'a str,
    distinct_id: &'a str,
    team_id: i64,
    ip: &'a str,
    site_url: &'a str,
    now: String,
    raw_payload: &'a str,
    error_timestamp: String,
    error_location: &'static str,
    error: String,
    /// Machine-readable reason, which PostHog folds into `error`; kept apart for filtering.
    reason: &'static str,
    tags: [&'static str; 2],
}

impl<'a> From<&'a DeadLetter> for DeadLetterJson<'a> {
    fn from(letter: &'a DeadLetter) -> Self {
        Self {
            id: letter.id,
            event_uuid: letter.event_uuid,
            event: &letter.event,
            properties: &letter.properties,
            distinct_id: &letter.distinct_id,
            team_id: letter.team_id,
            ip: &letter.ip,
            site_url: &letter.site_url,
            now: millis(&letter.now),
            raw_payload: &letter.raw_payload,
            error_timestamp: millis(&letter.error_timestamp),
            error_location: DeadLetter::ERROR_LOCATION,
            error: letter.error_message(),
            reason: letter.reason.as_str(),
            tags: DeadLetter::TAGS,
        }
    }
}

#[derive(Serialize)]
pub(super) struct WarningJson {
    team_id: i64,
    source: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    details: String,
    timestamp: String,
}

impl From<&IngestionWarning> for WarningJson {
    fn from(warning: &IngestionWarning) -> Self {
        Self {
            team_id: warning.team_id,
            source: "plugin-server",
            kind: warning.kind,
            details: warning.details.to_string(),
            timestamp: millis(&warning.timestamp),
        }
    }
}

/// A `clickhouse_person` message (spec 1.9).
#[derive(Serialize)]
pub(super) struct PersonJson<'a> {
    id: Uuid,
    created_at: String,
    properties: &'a str,
    team_id: i64,
    is_identified: u8,
    is_deleted: u8,
    version: i64,
}

impl<'a> From<&'a PersonRow> for PersonJson<'a> {
    fn from(row: &'a PersonRow) -> Self {
        Self {
            id: row.id,
            created_at: seconds(&row.created_at),
            properties: &row.properties,
            team_id: row.team_id,
            is_identified: u8::from(row.is_identified),
            is_deleted: u8::from(row.is_deleted),
            version: row.version,
        }
    }
}

/// A `clickhouse_person_distinct_id` message (spec 1.9).
#[derive(Serialize)]
pub(super) struct PersonDistinctIdJson<'a> {
    distinct_id: &'a str,
    person_id: Uuid,
    team_id: i64,
    version: i64,
    is_deleted: u8,
}

impl<'a> From<&'a PersonDistinctIdRow> for PersonDistinctIdJson<'a> {
    fn from(row: &'a PersonDistinctIdRow) -> Self {
        Self {
            distinct_id: &row.distinct_id,
            person_id: row.person_id,
            team_id: row.team_id,
            version: row.version,
            is_deleted: u8::from(row.is_deleted),
        }
    }
}

/// A `clickhouse_groups` message (spec 1.9).
#[derive(Serialize)]
pub(super) struct GroupJson<'a> {
    group_type_index: u8,
    group_key: &'a str,
    team_id: i64,
    group_properties: &'a str,
    created_at: String,
    version: i64,
}

impl<'a> From<&'a GroupRow> for GroupJson<'a> {
    fn from(row: &'a GroupRow) -> Self {
        Self {
            group_type_index: row.group_type_index,
            group_key: &row.group_key,
            team_id: row.team_id,
            group_properties: &row.properties,
            created_at: seconds(&row.created_at),
            version: row.version,
        }
    }
}
