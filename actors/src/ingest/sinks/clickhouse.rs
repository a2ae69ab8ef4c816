//! The cluster profile's sink: RowBinary inserts into PostHog's ClickHouse tables.
//!
//! Rows borrow from the batch, so an insert encodes straight from the writer's buffer without
//! copying strings. Column types follow `actors/migrations/clickhouse`: second-precision
//! `DateTime` (the oldest supported server has no `DateTime64`), so sub-second parts are cut.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::Serialize;
use uuid::Uuid;

use super::{EventSink, Rows, SinkError};
use crate::clickhouse_client::ClickHouseTarget;
use crate::event::{DeadLetter, EventRow, IngestionWarning};
use crate::groups::GroupRow;
use crate::persons::{PersonDistinctIdRow, PersonRow};

pub struct ClickHouseSink {
    client: clickhouse::Client,
}

impl ClickHouseSink {
    pub fn new(target: &ClickHouseTarget) -> Self {
        Self {
            client: target.database_client(),
        }
    }

    async fn insert<R, T>(&self, table: &'static str, rows: &[T]) -> Result<(), SinkError>
    where
        R: clickhouse::RowWrite,
        for<'a> R::Value<'a>: From<&'a T>,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let error = |source| SinkError::ClickHouse { table, source };
        let mut insert = self.client.insert::<R>(table).await.map_err(error)?;
        for row in rows {
            insert.write(&R::Value::from(row)).await.map_err(error)?;
        }
        insert.end().await.map_err(error)
    }
}

#[async_trait]
impl EventSink for ClickHouseSink {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    async fn write(&self, rows: Rows<'_>) -> Result<(), SinkError> {
        match rows {
            Rows::Events(rows) => self.insert::<EventRecord<'_>, _>("events", rows).await,
            Rows::DeadLetters(rows) => {
                self.insert::<DeadLetterRecord<'_>, _>("events_dead_letter_queue", rows)
                    .await
            }
            Rows::Warnings(rows) => {
                self.insert::<WarningRecord<'_>, _>("ingestion_warnings", rows)
                    .await
            }
            Rows::Persons(rows) => self.insert::<PersonRecord<'_>, _>("person", rows).await,
            Rows::PersonDistinctIds(rows) => {
                self.insert::<PersonDistinctIdRecord<'_>, _>("person_distinct_id", rows)
                    .await
            }
            Rows::Groups(rows) => self.insert::<GroupRecord<'_>, _>("groups", rows).await,
            // The recording tables are written by the session recordings consumer from Kafka
            // (the Kafka sink forwards the messages there), not from here.
            Rows::Recordings(_) => Ok(()),
        }
    }
}

/// A column of type `DateTime`: whole seconds since the epoch. Times before the epoch (a
/// client clock set to 1960) are stored as the epoch rather than failing the batch.
fn seconds(time: &DateTime<Utc>) -> u32 {
    u32::try_from(time.timestamp()).unwrap_or(if time.timestamp() < 0 { 0 } else { u32::MAX })
}

#[derive(Row, Serialize)]
struct EventRecord<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    uuid: Uuid,
    event: &'a str,
    properties: &'a str,
    timestamp: u32,
    team_id: i64,
    distinct_id: &'a str,
    elements_chain: &'a str,
    created_at: u32,
    #[serde(with = "clickhouse::serde::uuid")]
    person_id: Uuid,
    person_properties: &'a str,
    person_created_at: u32,
    /// Enum8: see `PersonMode::enum8`.
    person_mode: i8,
    group0_properties: &'a str,
    group1_properties: &'a str,
    group2_properties: &'a str,
    group3_properties: &'a str,
    group4_properties: &'a str,
    group0_created_at: u32,
    group1_created_at: u32,
    group2_created_at: u32,
    group3_created_at: u32,
    group4_created_at: u32,
    _offset: u64,
}

impl<'a> From<&'a EventRow> for EventRecord<'a> {
    fn from(row: &'a EventRow) -> Self {
        let [g0, g1, g2, g3, g4] = &row.group_properties;
        let [c0, c1, c2, c3, c4] = &row.group_created_at;
        Self {
            uuid: row.uuid,
            event: &row.event,
            properties: &row.properties,
            timestamp: seconds(&row.timestamp),
            team_id: row.team_id,
            distinct_id: &row.distinct_id,
            elements_chain: &row.elements_chain,
            created_at: seconds(&row.created_at),
            person_id: row.person_id,
            person_properties: &row.person_properties,
            person_created_at: seconds(&row.person_created_at),
            person_mode: row.person_mode.enum8(),
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
            _offset: 0,
        }
    }
}

#[derive(Row, Serialize)]
struct DeadLetterRecord<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    event_uuid: Uuid,
    event: &'a str,
    properties: &'a str,
    distinct_id: &'a str,
    team_id: i64,
    elements_chain: &'a str,
    created_at: u32,
    ip: &'a str,
    site_url: &'a str,
    now: u32,
    raw_payload: &'a str,
    error_timestamp: u32,
    error_location: &'static str,
    error: String,
    /// A slice, not an array: `Array(String)` is length-prefixed in RowBinary.
    tags: &'static [&'static str],
    _offset: u64,
}

impl<'a> From<&'a DeadLetter> for DeadLetterRecord<'a> {
    fn from(letter: &'a DeadLetter) -> Self {
        Self {
            id: letter.id,
            event_uuid: letter.event_uuid,
            event: &letter.event,
            properties: &letter.properties,
            distinct_id: &letter.distinct_id,
            team_id: letter.team_id,
            elements_chain: "",
            created_at: seconds(&letter.error_timestamp),
            ip: &letter.ip,
            site_url: &letter.site_url,
            now: seconds(&letter.now),
            raw_payload: &letter.raw_payload,
            error_timestamp: seconds(&letter.error_timestamp),
            error_location: DeadLetter::ERROR_LOCATION,
            error: letter.error_message(),
            tags: &DeadLetter::TAGS,
            _offset: 0,
        }
    }
}

#[derive(Row, Serialize)]
struct WarningRecord<'a> {
    team_id: i64,
    source: &'static str,
    #[serde(rename = "type")]
    kind: &'a str,
    details: String,
    timestamp: u32,
    _offset: u64,
}

impl<'a> From<&'a IngestionWarning> for WarningRecord<'a> {
    fn from(warning: &'a IngestionWarning) -> Self {
        Self {
            team_id: warning.team_id,
            source: "plugin-server",
            kind: warning.kind,
            details: warning.details.to_string(),
            timestamp: seconds(&warning.timestamp),
            _offset: 0,
        }
    }
}

#[derive(Row, Serialize)]
struct PersonRecord<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    id: Uuid,
    created_at: u32,
    team_id: i64,
    properties: &'a str,
    is_identified: i8,
    is_deleted: i8,
    /// UInt64 in the table; Postgres versions start at 0 and only grow.
    version: u64,
    _offset: u64,
}

impl<'a> From<&'a PersonRow> for PersonRecord<'a> {
    fn from(row: &'a PersonRow) -> Self {
        Self {
            id: row.id,
            created_at: seconds(&row.created_at),
            team_id: row.team_id,
            properties: &row.properties,
            is_identified: i8::from(row.is_identified),
            is_deleted: i8::from(row.is_deleted),
            version: u64::try_from(row.version).unwrap_or(0),
            _offset: 0,
        }
    }
}

#[derive(Row, Serialize)]
struct PersonDistinctIdRecord<'a> {
    team_id: i64,
    distinct_id: &'a str,
    #[serde(with = "clickhouse::serde::uuid")]
    person_id: Uuid,
    is_deleted: i8,
    version: i64,
    _offset: u64,
}

impl<'a> From<&'a PersonDistinctIdRow> for PersonDistinctIdRecord<'a> {
    fn from(row: &'a PersonDistinctIdRow) -> Self {
        Self {
            team_id: row.team_id,
            distinct_id: &row.distinct_id,
            person_id: row.person_id,
            is_deleted: i8::from(row.is_deleted),
            version: row.version,
            _offset: 0,
        }
    }
}

#[derive(Row, Serialize)]
struct GroupRecord<'a> {
    group_type_index: u8,
    group_key: &'a str,
    created_at: u32,
    team_id: i64,
    group_properties: &'a str,
    version: i64,
    _offset: u64,
}

impl<'a> From<&'a GroupRow> for GroupRecord<'a> {
    fn from(row: &'a GroupRow) -> Self {
        Self {
            group_type_index: row.group_type_index,
            group_key: &row.group_key,
            created_at: seconds(&row.created_at),
            team_id: row.team_id,
            group_properties: &row.properties,
            version: row.version,
            _offset: 0,
        }
    }
}
