//! Kafka outputs next to ClickHouse in the cluster profile:
//!
//! - dead letters to `<KAFKA_PREFIX>events_plugin_ingestion_dlq` (PostHog's later name): the raw
//!   message as received, with headers `error`, `reason`, `event-id` and `error-location`, so a
//!   fixed event can be re-produced to the ingestion topic unchanged;
//! - optionally, event rows to `<KAFKA_PREFIX>clickhouse_events_json`, warnings to
//!   `<KAFKA_PREFIX>clickhouse_ingestion_warnings`, person changes to
//!   `<KAFKA_PREFIX>clickhouse_person` and `<KAFKA_PREFIX>clickhouse_person_distinct_id` and
//!   group changes to `<KAFKA_PREFIX>clickhouse_groups`, in
//!   PostHog's format, for deployments whose ClickHouse reads those topics with its Kafka
//!   engine.
//!
//! Each write waits for every delivery report, so the writer acknowledges events only once Kafka
//! has them too.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::posthog_json::{EventJson, GroupJson, PersonDistinctIdJson, PersonJson, WarningJson};
use super::{EventSink, RecordingMessage, Rows, SinkError};
use crate::event::DeadLetter;
use crate::kafka::{KafkaConnection, KafkaSetupError};

#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    pub dead_letter_topic: String,
    /// `None` leaves events to the ClickHouse sink only.
    pub events_json_topic: Option<String>,
    pub warnings_topic: Option<String>,
    /// `None` leaves person changes to the ClickHouse sink only.
    pub persons_topic: Option<String>,
    pub person_distinct_ids_topic: Option<String>,
    /// `None` leaves group changes to the ClickHouse sink only.
    pub groups_topic: Option<String>,
    /// `<KAFKA_PREFIX>session_recording_events`: where `$snapshot` and `$performance_event`
    /// messages go, unchanged.
    pub recordings_topic: String,
}

pub struct KafkaSink {
    producer: FutureProducer,
    config: KafkaSinkConfig,
}

impl KafkaSink {
    pub fn new(
        connection: &KafkaConnection,
        config: KafkaSinkConfig,
    ) -> Result<Self, KafkaSetupError> {
        Ok(Self {
            producer: connection.acknowledged_producer()?,
            config,
        })
    }

    async fn deliver(
        &self,
        topic: &'static str,
        records: Vec<FutureRecord<'_, [u8], [u8]>>,
    ) -> Result<(), SinkError> {
        let deliveries = records
            .into_iter()
            .map(|record| self.producer.send(record, Duration::from_secs(30)));
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(source, _)| SinkError::Kafka { topic, source })?;
        }
        Ok(())
    }

    /// Produces each row as JSON, under its key if it has one: PostHog's format for the
    /// ClickHouse topics. `label` names the topic in errors (without the deployment's prefix);
    /// without a topic the rows are left to the ClickHouse sink.
    async fn deliver_json<T: Sync>(
        &self,
        label: &'static str,
        topic: Option<&str>,
        rows: &[T],
        key: impl Fn(&T) -> Option<String>,
        encode: impl Fn(&T) -> serde_json::Result<Vec<u8>>,
    ) -> Result<(), SinkError> {
        let Some(topic) = topic else {
            return Ok(());
        };
        let encoded: Vec<(Option<String>, Vec<u8>)> = rows
            .iter()
            .filter_map(|row| Some((key(row), encode(row).ok()?)))
            .collect();
        let records = encoded
            .iter()
            .map(|(key, value)| {
                let record = FutureRecord::to(topic).payload(value.as_slice());
                match key {
                    Some(key) => record.key(key.as_bytes()),
                    None => record,
                }
            })
            .collect();
        self.deliver(label, records).await
    }

    /// The raw message as received, with headers saying why it was dropped, so that a fixed
    /// event can be re-produced to the ingestion topic unchanged.
    async fn deliver_dead_letters(&self, rows: &[DeadLetter]) -> Result<(), SinkError> {
        let described: Vec<(String, String)> = rows
            .iter()
            .map(|letter| (letter.error_message(), letter.event_uuid.to_string()))
            .collect();
        let records = rows
            .iter()
            .zip(&described)
            .map(|(letter, (error, event_id))| {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "error",
                        value: Some(error.as_str()),
                    })
                    .insert(Header {
                        key: "reason",
                        value: Some(letter.reason.as_str()),
                    })
                    .insert(Header {
                        key: "event-id",
                        value: Some(event_id.as_str()),
                    })
                    .insert(Header {
                        key: "error-location",
                        value: Some(DeadLetter::ERROR_LOCATION),
                    });
                FutureRecord::to(&self.config.dead_letter_topic)
                    .key(letter.distinct_id.as_bytes())
                    .payload(letter.raw_payload.as_bytes())
                    .headers(headers)
            })
            .collect();
        self.deliver("events_plugin_ingestion_dlq", records).await
    }

    /// The messages unchanged, keyed by session so that a session stays on one partition.
    async fn deliver_recordings(&self, messages: &[RecordingMessage]) -> Result<(), SinkError> {
        let records = messages
            .iter()
            .map(|message| {
                let record = FutureRecord::to(&self.config.recordings_topic)
                    .payload(message.payload.as_slice());
                match &message.key {
                    Some(key) => record.key(key.as_bytes()),
                    None => record,
                }
            })
            .collect();
        self.deliver("session_recording_events", records).await
    }
}

#[async_trait]
impl EventSink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn write(&self, rows: Rows<'_>) -> Result<(), SinkError> {
        let topics = &self.config;
        match rows {
            Rows::Events(rows) => {
                self.deliver_json(
                    "clickhouse_events_json",
                    topics.events_json_topic.as_deref(),
                    rows,
                    |row| Some(row.uuid.to_string()),
                    |row| serde_json::to_vec(&EventJson::from(row)),
                )
                .await
            }
            Rows::DeadLetters(rows) => self.deliver_dead_letters(rows).await,
            Rows::Warnings(rows) => {
                self.deliver_json(
                    "clickhouse_ingestion_warnings",
                    topics.warnings_topic.as_deref(),
                    rows,
                    |_| None,
                    |row| serde_json::to_vec(&WarningJson::from(row)),
                )
                .await
            }
            Rows::Persons(rows) => {
                self.deliver_json(
                    "clickhouse_person",
                    topics.persons_topic.as_deref(),
                    rows,
                    |row| Some(row.id.to_string()),
                    |row| serde_json::to_vec(&PersonJson::from(row)),
                )
                .await
            }
            Rows::PersonDistinctIds(rows) => {
                self.deliver_json(
                    "clickhouse_person_distinct_id",
                    topics.person_distinct_ids_topic.as_deref(),
                    rows,
                    |row| Some(row.person_id.to_string()),
                    |row| serde_json::to_vec(&PersonDistinctIdJson::from(row)),
                )
                .await
            }
            Rows::Groups(rows) => {
                self.deliver_json(
                    "clickhouse_groups",
                    topics.groups_topic.as_deref(),
                    rows,
                    |row| {
                        Some(format!(
                            "{}:{}:{}",
                            row.team_id, row.group_type_index, row.group_key
                        ))
                    },
                    |row| serde_json::to_vec(&GroupJson::from(row)),
                )
                .await
            }
            Rows::Recordings(messages) => self.deliver_recordings(messages).await,
        }
    }
}
