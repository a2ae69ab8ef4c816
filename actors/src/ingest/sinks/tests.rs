use std::collections::BTreeSet;

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::event::DropReason;

fn event() -> EventRow {
    EventRow::for_test("{}")
}

fn person() -> PersonRow {
    PersonRow {
        id: Uuid::new_v4(),
        created_at: Utc::now(),
        team_id: 2,
        properties: "{}".into(),
        is_identified: false,
        is_deleted: false,
        version: 0,
    }
}

/// One row of every kind.
fn full_batch() -> WriteBatch {
    WriteBatch {
        events: vec![event()],
        dead_letters: vec![DeadLetter::unparsed(b"{", DropReason::InvalidJson, "eof")],
        warnings: vec![IngestionWarning {
            team_id: 2,
            kind: "ignored_invalid_timestamp",
            details: json!({"field": "timestamp"}),
            timestamp: Utc::now(),
        }],
        persons: vec![person()],
        person_distinct_ids: vec![PersonDistinctIdRow {
            team_id: 2,
            distinct_id: "user-1".to_owned(),
            person_id: Uuid::new_v4(),
            is_deleted: false,
            version: 0,
        }],
        groups: vec![GroupRow {
            team_id: 2,
            group_type_index: 0,
            group_key: "acme".to_owned(),
            properties: "{}".to_owned(),
            created_at: Utc::now(),
            version: 0,
        }],
        recordings: vec![RecordingMessage {
            key: Some("session-1".to_owned()),
            payload: b"{\n  \"event\": \"$snapshot\"\n}".to_vec(),
        }],
    }
}

#[test]
fn parts_are_the_non_empty_kinds_with_persons_before_events() {
    let batch = WriteBatch {
        events: vec![event(), event()],
        persons: vec![person()],
        ..WriteBatch::default()
    };
    let parts: Vec<(RowKind, usize)> = batch
        .parts()
        .map(|rows| (rows.kind(), rows.len()))
        .collect();
    assert_eq!(parts, [(RowKind::Persons, 1), (RowKind::Events, 2)]);
    assert!(!batch.is_empty());

    assert_eq!(WriteBatch::default().parts().count(), 0);
    assert!(WriteBatch::default().is_empty());

    let kinds: Vec<RowKind> = full_batch().parts().map(|rows| rows.kind()).collect();
    assert_eq!(
        kinds,
        [
            RowKind::DeadLetters,
            RowKind::Warnings,
            RowKind::Persons,
            RowKind::PersonDistinctIds,
            RowKind::Groups,
            RowKind::Recordings,
            RowKind::Events,
        ]
    );
}

#[tokio::test]
async fn json_lines_write_each_kind_to_its_own_file() {
    let base = tempfile::tempdir().expect("tempdir");
    let config = JsonLinesConfig::under(base.path());
    let sink = JsonLinesSink::open(&config).expect("sink");
    let batch = full_batch();
    for rows in batch.parts() {
        sink.write(rows).await.expect("written");
    }

    let date = Utc::now().date_naive().format("%Y-%m-%d").to_string();
    let mut prefixes = BTreeSet::new();
    for entry in std::fs::read_dir(&config.directory).expect("data dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .expect("file name")
            .to_owned();
        let prefix = name
            .strip_suffix(&format!("-{date}-0000.jsonl"))
            .expect("<kind>-<date>-<sequence>.jsonl");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1, "{name}: one row, one line");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json line");
        assert!(line.is_object(), "{name}: {line}");
        prefixes.insert(prefix.to_owned());
    }
    let expected: BTreeSet<String> = [
        "events",
        "dead_letters",
        "ingestion_warnings",
        "person",
        "person_distinct_id",
        "groups",
        "session_recording_events",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(prefixes, expected);
}

#[test]
fn appended_rows_follow_the_rows_already_there() {
    let mut into: Vec<u32> = Vec::new();
    append_rows(&mut into, vec![1, 2]);
    append_rows(&mut into, vec![3]);
    append_rows(&mut into, Vec::new());
    assert_eq!(into, [1, 2, 3]);
}
