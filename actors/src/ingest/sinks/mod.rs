//! Where ingested events end up: ClickHouse in the cluster profile, JSON-lines files in the
//! embedded one. The `EventWriter` actor batches and retries; a sink only writes.
//!
//! A sink writes rows of one kind per call, each kind to its own table, topic or file, so that
//! the writer can retry the kind that failed without rewriting the others. A new kind of row
//! is a `RowKind`, a `Rows` variant, a `WriteBatch` field and an arm in each sink's `write`.

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
    /// The non-empty parts, in the order the writer stores them: persons, distinct ids and
    /// groups before events, as PostHog produces them, so that a reader never sees an event
    /// whose person is not there yet.
    pub fn parts(&self) -> impl Iterator<Item = Rows<'_>> {
        // Destructured so that a new field cannot be left out of the parts.
        let Self {
            events,
            dead_letters,
            warnings,
            persons,
            person_distinct_ids,
            groups,
            recordings,
        } = self;
        [
            Rows::DeadLetters(dead_letters),
            Rows::Warnings(warnings),
            Rows::Persons(persons),
            Rows::PersonDistinctIds(person_distinct_ids),
            Rows::Groups(groups),
            Rows::Recordings(recordings),
            Rows::Events(events),
        ]
        .into_iter()
        .filter(|rows| !rows.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.parts().next().is_none()
    }

    /// Rough bytes, to cut batches at KAFKA_MAX_MESSAGE_BATCH_SIZE.
    pub fn approximate_size(&self) -> usize {
        self.parts().map(|rows| rows.approximate_size()).sum()
    }

    pub fn append(&mut self, other: WriteBatch) {
        let WriteBatch {
            events,
            dead_letters,
            warnings,
            persons,
            person_distinct_ids,
            groups,
            recordings,
        } = other;
        append_rows(&mut self.events, events);
        append_rows(&mut self.dead_letters, dead_letters);
        append_rows(&mut self.warnings, warnings);
        append_rows(&mut self.persons, persons);
        append_rows(&mut self.person_distinct_ids, person_distinct_ids);
        append_rows(&mut self.groups, groups);
        append_rows(&mut self.recordings, recordings);
    }
}

/// `rows` after `into`'s: the writer's buffer is usually empty when a batch arrives, and then
/// the batch's vector is taken as it is rather than its rows moved one by one.
fn append_rows<T>(into: &mut Vec<T>, mut rows: Vec<T>) {
    if into.is_empty() {
        std::mem::swap(into, &mut rows);
    } else {
        into.append(&mut rows);
    }
}

/// What a row stores; each kind has its own table, topic or file in every sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowKind {
    Events,
    DeadLetters,
    Warnings,
    Persons,
    PersonDistinctIds,
    Groups,
    Recordings,
}

impl RowKind {
    /// The `kind` label of the writer's metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Events => "events",
            RowKind::DeadLetters => "dead_letters",
            RowKind::Warnings => "warnings",
            RowKind::Persons => "persons",
            RowKind::PersonDistinctIds => "person_distinct_ids",
            RowKind::Groups => "groups",
            RowKind::Recordings => "recordings",
        }
    }
}

/// Rows of one kind, borrowed from a `WriteBatch`: what a sink writes in one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rows<'a> {
    Events(&'a [EventRow]),
    DeadLetters(&'a [DeadLetter]),
    Warnings(&'a [IngestionWarning]),
    /// Person versions; the tables keep the highest version of each person.
    Persons(&'a [PersonRow]),
    /// Distinct-id versions; the tables keep the highest version of each distinct id.
    PersonDistinctIds(&'a [PersonDistinctIdRow]),
    /// Group versions; the tables keep the highest version of each group.
    Groups(&'a [GroupRow]),
    /// Session recording messages, forwarded unchanged.
    Recordings(&'a [RecordingMessage]),
}

impl Rows<'_> {
    pub fn kind(&self) -> RowKind {
        match self {
            Rows::Events(_) => RowKind::Events,
            Rows::DeadLetters(_) => RowKind::DeadLetters,
            Rows::Warnings(_) => RowKind::Warnings,
            Rows::Persons(_) => RowKind::Persons,
            Rows::PersonDistinctIds(_) => RowKind::PersonDistinctIds,
            Rows::Groups(_) => RowKind::Groups,
            Rows::Recordings(_) => RowKind::Recordings,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Events(rows) => rows.len(),
            Rows::DeadLetters(rows) => rows.len(),
            Rows::Warnings(rows) => rows.len(),
            Rows::Persons(rows) => rows.len(),
            Rows::PersonDistinctIds(rows) => rows.len(),
            Rows::Groups(rows) => rows.len(),
            Rows::Recordings(messages) => messages.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rough bytes: the variable-length columns plus a guess for the fixed ones.
    pub fn approximate_size(&self) -> usize {
        match self {
            Rows::Events(rows) => rows.iter().map(EventRow::approximate_size).sum(),
            Rows::DeadLetters(rows) => rows
                .iter()
                .map(|letter| 256 + letter.raw_payload.len() + letter.properties.len())
                .sum(),
            Rows::Warnings(rows) => rows.len() * 256,
            Rows::Persons(rows) => rows.iter().map(|person| 64 + person.properties.len()).sum(),
            Rows::PersonDistinctIds(rows) => {
                rows.iter().map(|row| 48 + row.distinct_id.len()).sum()
            }
            Rows::Groups(rows) => rows
                .iter()
                .map(|row| 48 + row.group_key.len() + row.properties.len())
                .sum(),
            Rows::Recordings(messages) => messages
                .iter()
                .map(|message| 32 + message.payload.len())
                .sum(),
        }
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
/// uuid, dead letters on their id, the highest version of persons and groups) collapse.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// For logs: `clickhouse`, `jsonl`, `kafka` or `fan-out`.
    fn name(&self) -> &'static str;

    /// Stores `rows` in the table, topic or file of their kind. A kind the sink does not keep
    /// (e.g. recordings in ClickHouse) counts as stored.
    async fn write(&self, rows: Rows<'_>) -> Result<(), SinkError>;
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

    async fn write(&self, rows: Rows<'_>) -> Result<(), SinkError> {
        for sink in &self.sinks {
            sink.write(rows).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
