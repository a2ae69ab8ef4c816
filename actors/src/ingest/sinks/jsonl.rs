//! The embedded profile's sink: one JSON object per line, in PostHog's Kafka message format,
//! under `BASE_DIR/data/`. Each write is fsynced before it returns, so an acknowledged event
//! survives a crash of the process or the machine.
//!
//! Files are named `<kind>-<UTC date>-<sequence>.jsonl` and rotate at midnight UTC and when
//! they reach `max_file_bytes`, so old days can be archived or deleted with plain file tools.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use chrono::{NaiveDate, Utc};

use super::posthog_json::{
    DeadLetterJson, EventJson, GroupJson, PersonDistinctIdJson, PersonJson, WarningJson,
};
use super::{EventSink, RecordingMessage, RowKind, Rows, SinkError};

#[derive(Debug, Clone)]
pub struct JsonLinesConfig {
    /// `BASE_DIR/data`.
    pub directory: PathBuf,
    /// A file that reaches this size is closed and the next write opens a new one.
    pub max_file_bytes: u64,
}

impl JsonLinesConfig {
    pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

    pub fn under(base_dir: &Path) -> Self {
        Self {
            directory: base_dir.join("data"),
            max_file_bytes: Self::DEFAULT_MAX_FILE_BYTES,
        }
    }
}

pub struct JsonLinesSink {
    config: JsonLinesConfig,
    /// Each kind's current file, each behind its own lock so that concurrent flushes write
    /// and fsync different kinds in parallel.
    files: Mutex<HashMap<RowKind, Arc<Mutex<RotatingFile>>>>,
}

impl JsonLinesSink {
    /// Creates the directory if needed; files are opened on first write.
    pub fn open(config: &JsonLinesConfig) -> Result<Self, SinkError> {
        fs::create_dir_all(&config.directory).map_err(|source| SinkError::File {
            path: config.directory.display().to_string(),
            source,
        })?;
        Ok(Self {
            config: config.clone(),
            files: Mutex::new(HashMap::new()),
        })
    }

    fn file(&self, kind: RowKind) -> Arc<Mutex<RotatingFile>> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let file = files.entry(kind).or_insert_with(|| {
            Arc::new(Mutex::new(RotatingFile::new(
                &self.config,
                file_prefix(kind),
            )))
        });
        Arc::clone(file)
    }
}

/// The start of each kind's file names. Renaming one would split a day's rows across two
/// names and break whatever archives or loads the files.
fn file_prefix(kind: RowKind) -> &'static str {
    match kind {
        RowKind::Events => "events",
        RowKind::DeadLetters => "dead_letters",
        RowKind::Warnings => "ingestion_warnings",
        RowKind::Persons => "person",
        RowKind::PersonDistinctIds => "person_distinct_id",
        RowKind::Groups => "groups",
        RowKind::Recordings => "session_recording_events",
    }
}

/// Encodes on the calling thread (cheap, and it keeps rows borrowed), then hands the bytes to
/// a blocking thread for the write and the fsync.
async fn append<T>(
    file: Arc<Mutex<RotatingFile>>,
    rows: &[T],
    encode: impl Fn(&mut Vec<u8>, &T) -> serde_json::Result<()>,
) -> Result<(), SinkError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut bytes = Vec::with_capacity(rows.len() * 512);
    for row in rows {
        // Plain structs of strings and numbers always encode; this only guards the line.
        if let Err(error) = encode(&mut bytes, row) {
            tracing::error!(%error, "a row could not be encoded as JSON; skipped");
            continue;
        }
        bytes.push(b'\n');
    }
    tokio::task::spawn_blocking(move || {
        file.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&bytes)
    })
    .await
    .map_err(|error| SinkError::Join(error.to_string()))?
}

/// A recording message as it came, on one line: kept for a recordings consumer to replay.
fn encode_recording(out: &mut Vec<u8>, message: &RecordingMessage) -> serde_json::Result<()> {
    // A pretty-printed message would span lines: written compact instead.
    if message.payload.contains(&b'\n') {
        let value: serde_json::Value = serde_json::from_slice(&message.payload)?;
        return serde_json::to_writer(out, &value);
    }
    out.extend_from_slice(&message.payload);
    Ok(())
}

#[async_trait]
impl EventSink for JsonLinesSink {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    async fn write(&self, rows: Rows<'_>) -> Result<(), SinkError> {
        let file = self.file(rows.kind());
        match rows {
            Rows::Events(rows) => {
                append(file, rows, |out, row| {
                    serde_json::to_writer(out, &EventJson::from(row))
                })
                .await
            }
            Rows::DeadLetters(rows) => {
                append(file, rows, |out, row| {
                    serde_json::to_writer(out, &DeadLetterJson::from(row))
                })
                .await
            }
            Rows::Warnings(rows) => {
                append(file, rows, |out, row| {
                    serde_json::to_writer(out, &WarningJson::from(row))
                })
                .await
            }
            Rows::Persons(rows) => {
                append(file, rows, |out, row| {
                    serde_json::to_writer(out, &PersonJson::from(row))
                })
                .await
            }
            Rows::PersonDistinctIds(rows) => {
                append(file, rows, |out, row| {
                    serde_json::to_writer(out, &PersonDistinctIdJson::from(row))
                })
                .await
            }
            Rows::Groups(rows) => {
                append(file, rows, |out, row| {
                    serde_json::to_writer(out, &GroupJson::from(row))
                })
                .await
            }
            Rows::Recordings(messages) => append(file, messages, encode_recording).await,
        }
    }
}

/// The current file of one kind, reopened when the day changes or it grows too big.
struct RotatingFile {
    directory: PathBuf,
    kind: &'static str,
    max_bytes: u64,
    current: Option<OpenFile>,
}

struct OpenFile {
    date: NaiveDate,
    path: PathBuf,
    writer: BufWriter<File>,
    bytes: u64,
}

impl RotatingFile {
    fn new(config: &JsonLinesConfig, kind: &'static str) -> Self {
        Self {
            directory: config.directory.clone(),
            kind,
            max_bytes: config.max_file_bytes,
            current: None,
        }
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        let today = Utc::now().date_naive();
        let rotate = match &self.current {
            Some(open) => open.date != today || open.bytes >= self.max_bytes,
            None => true,
        };
        if rotate {
            self.current = Some(self.open_next(today)?);
        }
        let Some(open) = self.current.as_mut() else {
            return Ok(());
        };
        let io = |source| SinkError::File {
            path: open.path.display().to_string(),
            source,
        };
        let written = open
            .writer
            .write_all(bytes)
            .and_then(|()| open.writer.flush())
            .and_then(|()| open.writer.get_ref().sync_data());
        if let Err(source) = written {
            let error = io(source);
            // A half-written line must not be glued to the next write: start a new file.
            self.current = None;
            return Err(error);
        }
        open.bytes += bytes.len() as u64;
        Ok(())
    }

    /// The first sequence number of the day whose file is absent or still below the limit,
    /// so that a restart appends to today's last file instead of starting a new one.
    fn open_next(&self, date: NaiveDate) -> Result<OpenFile, SinkError> {
        let mut sequence = 0u32;
        loop {
            let path = self.directory.join(format!(
                "{}-{}-{sequence:04}.jsonl",
                self.kind,
                date.format("%Y-%m-%d")
            ));
            let existing = fs::metadata(&path).map(|meta| meta.len()).ok();
            if existing.is_some_and(|len| len >= self.max_bytes) {
                sequence += 1;
                continue;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| SinkError::File {
                    path: path.display().to_string(),
                    source,
                })?;
            return Ok(OpenFile {
                date,
                path,
                writer: BufWriter::with_capacity(1 << 16, file),
                bytes: existing.unwrap_or(0),
            });
        }
    }
}
