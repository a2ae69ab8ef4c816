//! Where ingested events end up: ClickHouse in the cluster profile, JSON-lines files in the
//! embedded one. The `EventWriter` actor batches and retries; a sink only writes.
//!
//! A sink writes three kinds of rows, each to its own table or file, so that the writer can
//! retry the one that failed without rewriting the others.

pub mod clickhouse;
pub mod jsonl;
pub mod kafka;
mod posthog_json;

use async_trait::async_trait;

use crate::event::{DeadLetter, EventRow, IngestionWarning};
use crate::groups::GroupRow;
use crate::persons::{PersonDistinctIdRow, PersonRow};

pub use self::clickhouse::ClickHouseSink;
pub use self::jsonl::{JsonLinesConfig, JsonLinesSink};
pub use self::kafka::{KafkaSink, KafkaSinkConfig};

/// Rows to store together. The writer acknowledges the requests behind a batch only after
/// every non-empty part of it is stored.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteBatch {
    pub events: Vec<EventRow>,
    pub dead_letters: Vec<DeadLetter>,
    pub warnings: Vec<IngestionWarning>,
    /// Person versions the person step committed to its store, for ClickHouse's copy.
    pub persons: Vec<PersonRow>,
    pub person_distinct_ids: Vec<PersonDistinctIdRow>,
    /// Group versions the group step committed to its store.
    pub groups: Vec<GroupRow>,
    /// `$snapshot` and `$performance_event` messages, for the session recordings topic.
    pub recordings: Vec<RecordingMessage>,
}

/// A `$snapshot` or `$performance_event` message: PostHog's ingestion consumer does not store
/// it as an event but forwards it unchanged to `session_recording_events`, whose consumer
/// writes the recording tables; so does this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingMessage {
    /// `$session_id`, so that a session's messages keep their order on one partition.
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.dead_letters.is_empty()
            && self.warnings.is_empty()
            && self.persons.is_empty()
            && self.person_distinct_ids.is_empty()
            && self.groups.is_empty()
            && self.recordings.is_empty()
    }

    /// Rough bytes, to cut batches at KAFKA_MAX_MESSAGE_BATCH_SIZE.
    pub fn approximate_size(&self) -> usize {
        self.events
            .iter()
            .map(EventRow::approximate_size)
            .sum::<usize>()
            + self
                .dead_letters
                .iter()
                .map(|letter| 256 + letter.raw_payload.len() + letter.properties.len())
                .sum::<usize>()
            + self.warnings.len() * 256
            + self
                .persons
                .iter()
                .map(|person| 64 + person.properties.len())
                .sum::<usize>()
            + self
                .person_distinct_ids
                .iter()
                .map(|row| 48 + row.distinct_id.len())
                .sum::<usize>()
            + self
                .groups
                .iter()
                .map(|row| 48 + row.group_key.len() + row.properties.len())
                .sum::<usize>()
            + self
                .recordings
                .iter()
                .map(|message| 32 + message.payload.len())
                .sum::<usize>()
    }

    pub fn append(&mut self, other: WriteBatch) {
        self.events.extend(other.events);
        self.dead_letters.extend(other.dead_letters);
        self.warnings.extend(other.warnings);
        self.persons.extend(other.persons);
        self.person_distinct_ids.extend(other.person_distinct_ids);
        self.groups.extend(other.groups);
        self.recordings.extend(other.recordings);
    }
}

/// Why a write failed. Every failure is retried by the writer; the variants say where to look.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("ClickHouse insert into {table} failed (check CLICKHOUSE_HOST): {source}")]
    ClickHouse {
        table: &'static str,
        #[source]
        source: ::clickhouse::error::Error,
    },
    #[error("writing {path} failed (check BASE_DIR): {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("producing to {topic} failed (check KAFKA_HOSTS): {source}")]
    Kafka {
        topic: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("the file writer thread failed: {0}")]
    Join(String),
}

/// A store for ingested rows. Each call writes all of its rows or returns an error; a retry
/// after an error may store some rows twice, which the tables (ReplacingMergeTree on the event
/// uuid, dead letters on their id) collapse.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// For logs and metrics: `clickhouse` or `jsonl`.
    fn name(&self) -> &'static str;

    async fn write_events(&self, rows: &[EventRow]) -> Result<(), SinkError>;

    async fn write_dead_letters(&self, rows: &[DeadLetter]) -> Result<(), SinkError>;

    async fn write_warnings(&self, rows: &[IngestionWarning]) -> Result<(), SinkError>;

    /// Person versions; the tables keep the highest version of each person.
    async fn write_persons(&self, rows: &[PersonRow]) -> Result<(), SinkError>;

    /// Distinct-id versions; the tables keep the highest version of each distinct id.
    async fn write_person_distinct_ids(
        &self,
        rows: &[PersonDistinctIdRow],
    ) -> Result<(), SinkError>;

    /// Group versions; the tables keep the highest version of each group.
    async fn write_groups(&self, rows: &[GroupRow]) -> Result<(), SinkError>;

    /// Session recording messages, forwarded unchanged.
    async fn write_recordings(&self, messages: &[RecordingMessage]) -> Result<(), SinkError>;
}

/// Writes every part to each sink in turn, e.g. ClickHouse then the Kafka dead-letter topic.
/// A part counts as stored only when every sink stored it; a retry rewrites it to all of them,
/// which the stores tolerate (see `EventSink`).
pub struct FanOutSink {
    sinks: Vec<std::sync::Arc<dyn EventSink>>,
}

impl FanOutSink {
    pub fn new(sinks: Vec<std::sync::Arc<dyn EventSink>>) -> Self {
        Self { sinks }
    }
}

#[async_trait]
impl EventSink for FanOutSink {
    fn name(&self) -> &'static str {
        "fan-out"
    }

    async fn write_events(&self, rows: &[EventRow]) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write_events(rows).await?;
        }
        Ok(())
    }

    async fn write_dead_letters(&self, rows: &[DeadLetter]) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write_dead_letters(rows).await?;
        }
        Ok(())
    }

    async fn write_warnings(&self, rows: &[IngestionWarning]) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write_warnings(rows).await?;
        }
        Ok(())
    }

    async fn write_persons(&self, rows: &[PersonRow]) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write_persons(rows).await?;
        }
        Ok(())
    }

    async fn write_person_distinct_ids(
        &self,
        rows: &[PersonDistinctIdRow],
    ) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write_person_distinct_ids(rows).await?;
        }
        Ok(())
    }

    async fn write_groups(&self, rows: &[GroupRow]) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write_groups(rows).await?;
        }
        Ok(())
    }

    async fn write_recordings(&self, messages: &[RecordingMessage]) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write_recordings(messages).await?;
        }
        Ok(())
    }
}
