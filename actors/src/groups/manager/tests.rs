use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::TimeZone;
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::event::PluginEvent;
use crate::groups::store::upsert_one_by_one;
use crate::groups::{BatchUpserted, GroupStore, MemoryGroupStore, Upserted};

/// The memory store, counting group reads and refusing keys longer than Postgres' column.
#[derive(Default)]
struct CountingStore {
    inner: MemoryGroupStore,
    reads: AtomicUsize,
    type_reads: AtomicUsize,
    batch_writes: AtomicUsize,
    upserts: AtomicUsize,
}

const KEY_COLUMN_CHARS: usize = 400;

#[async_trait]
impl GroupStore for CountingStore {
    fn name(&self) -> &'static str {
        "counting"
    }

    async fn group_types(&self, team_id: i64) -> Result<HashMap<String, u8>, GroupStoreError> {
        self.type_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.group_types(team_id).await
    }

    async fn add_group_type(
        &self,
        team_id: i64,
        group_type: &str,
    ) -> Result<Option<u8>, GroupStoreError> {
        self.inner.add_group_type(team_id, group_type).await
    }

    async fn groups(&self, keys: &[GroupKey]) -> Result<HashMap<GroupKey, Group>, GroupStoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.groups(keys).await
    }

    async fn upsert(
        &self,
        key: &GroupKey,
        set: &Map<String, Value>,
        timestamp: DateTime<Utc>,
    ) -> Result<Upserted, GroupStoreError> {
        if key.group_key.chars().count() > KEY_COLUMN_CHARS {
            return Err(GroupStoreError::Rejected(
                "value too long for type character varying(400)".to_owned(),
            ));
        }
        self.upserts.fetch_add(1, Ordering::SeqCst);
        self.inner.upsert(key, set, timestamp).await
    }

    async fn upsert_batch(
        &self,
        upserts: &[GroupUpsert],
    ) -> Result<Vec<BatchUpserted>, GroupStoreError> {
        self.batch_writes.fetch_add(1, Ordering::SeqCst);
        upsert_one_by_one(self, upserts).await
    }
}

fn manager() -> (GroupManager, Arc<CountingStore>) {
    let store = Arc::new(CountingStore::default());
    let manager = GroupManager::new(store.clone(), GroupConfig::default());
    (manager, store)
}

fn event(name: &str, properties: Value) -> StampedEvent {
    StampedEvent {
        event: Box::new(PluginEvent::for_test(name, properties)),
        uuid: Uuid::new_v4(),
        timestamp: Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap(),
    }
}

fn identify(group_type: &str, key: &str, set: Value) -> StampedEvent {
    event(
        "$groupidentify",
        json!({"$group_type": group_type, "$group_key": key, "$group_set": set}),
    )
}

async fn run(manager: &GroupManager, events: &mut [StampedEvent]) -> GroupOutcome {
    let mut refs: Vec<&mut StampedEvent> = events.iter_mut().collect();
    manager.resolve_batch(&mut refs).await.unwrap()
}

fn properties_of(groups: &EventGroups, index: usize) -> Option<Value> {
    let column = groups.as_ref().unwrap()[index].as_ref()?;
    Some(serde_json::from_str(&column.properties).unwrap())
}

#[tokio::test]
async fn an_identified_group_shows_on_later_events_of_the_batch_and_the_next() {
    let (manager, _) = manager();
    let mut batch = vec![
        identify("organization", "posthog", json!({"prop": "value"})),
        event("$pageview", json!({"$group_0": "posthog"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert_eq!(
        properties_of(&outcome.events[1], 0),
        Some(json!({"prop": "value"}))
    );
    assert_eq!(outcome.rows.len(), 1);
    assert_eq!(outcome.rows[0].group_key, "posthog");
    assert_eq!(outcome.rows[0].version, 1);

    let mut batch = vec![
        identify("organization", "posthog", json!({"prop": "updated value"})),
        event("$pageview", json!({"$group_0": "posthog"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert_eq!(
        properties_of(&outcome.events[1], 0),
        Some(json!({"prop": "updated value"}))
    );
    assert_eq!(outcome.rows[0].version, 2);
}

#[tokio::test]
async fn an_event_before_the_identify_keeps_the_groups_earlier_state() {
    let (manager, _) = manager();
    let mut batch = vec![
        event("$pageview", json!({"$group_0": "posthog"})),
        identify("organization", "posthog", json!({"prop": "value"})),
        event("$pageview", json!({"$group_0": "posthog"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert_eq!(properties_of(&outcome.events[0], 0), None);
    assert_eq!(
        properties_of(&outcome.events[2], 0),
        Some(json!({"prop": "value"}))
    );
}

#[tokio::test]
async fn identify_without_group_set_makes_an_empty_group_and_repeats_write_nothing() {
    let (manager, _) = manager();
    let mut batch = vec![
        event(
            "$groupidentify",
            json!({"$group_type": "organization", "$group_key": "posthog"}),
        ),
        event("$pageview", json!({"$group_0": "posthog"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert_eq!(properties_of(&outcome.events[1], 0), Some(json!({})));
    assert_eq!(outcome.rows.len(), 1);

    let mut batch = vec![identify("organization", "posthog", json!({}))];
    let outcome = run(&manager, &mut batch).await;
    assert!(
        outcome.rows.is_empty(),
        "an unchanged group writes no version"
    );
}

#[tokio::test]
async fn groups_become_indexed_properties_one_index_per_type() {
    let (manager, store) = manager();
    let mut batch = vec![
        event(
            "$pageview",
            json!({"$groups": {"organization": "posthog", "project": 42}}),
        ),
        event("$pageview", json!({"$groups": {"project": "p2"}})),
    ];
    run(&manager, &mut batch).await;
    let types = store.inner.group_types(2).await.unwrap();
    let organization = usize::from(types["organization"]);
    let project = usize::from(types["project"]);
    assert_ne!(organization, project);
    let first = &batch[0].event.properties;
    assert_eq!(first[GROUP_PROPERTIES[organization]], json!("posthog"));
    assert_eq!(first[GROUP_PROPERTIES[project]], json!(42));
    assert_eq!(
        batch[1].event.properties[GROUP_PROPERTIES[project]],
        json!("p2")
    );
    assert_eq!(
        store.type_reads.load(Ordering::SeqCst),
        1,
        "types are cached per team"
    );
}

#[tokio::test]
async fn a_sixth_group_type_gets_no_column() {
    let (manager, _) = manager();
    let groups: Map<String, Value> = (0..6).map(|n| (format!("type{n}"), json!("k"))).collect();
    let mut batch = vec![event("$pageview", json!({ "$groups": groups }))];
    run(&manager, &mut batch).await;
    let named = GROUP_PROPERTIES
        .iter()
        .filter(|name| batch[0].event.properties.contains_key(name))
        .count();
    assert_eq!(named, 5);
}

#[tokio::test]
async fn named_groups_are_read_once_per_batch_and_then_cached_even_when_unknown() {
    let (manager, store) = manager();
    let mut batch: Vec<StampedEvent> = (0..10)
        .map(|n| event("$pageview", json!({"$group_0": format!("org{}", n % 3)})))
        .collect();
    let outcome = run(&manager, &mut batch).await;
    assert!(
        outcome
            .events
            .iter()
            .all(|groups| groups.as_ref().unwrap()[0].is_none())
    );
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    run(&manager, &mut batch).await;
    assert_eq!(
        store.reads.load(Ordering::SeqCst),
        1,
        "unknown groups are cached too"
    );
}

#[tokio::test]
async fn events_without_groups_never_reach_the_store() {
    let (manager, store) = manager();
    let mut batch = vec![event("$pageview", json!({"a": 1}))];
    let outcome = run(&manager, &mut batch).await;
    assert_eq!(outcome.events.len(), 1);
    assert_eq!(store.reads.load(Ordering::SeqCst), 0);
    assert_eq!(store.type_reads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_refused_identify_fails_only_its_own_event() {
    let (manager, _) = manager();
    let mut batch = vec![
        identify(
            "organization",
            &"k".repeat(KEY_COLUMN_CHARS + 1),
            json!({"a": 1}),
        ),
        identify("organization", "posthog", json!({"a": 1})),
        event("$pageview", json!({"$group_0": "posthog"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert!(outcome.events[0].is_err());
    assert!(outcome.events[1].is_ok());
    assert_eq!(properties_of(&outcome.events[2], 0), Some(json!({"a": 1})));
    assert_eq!(outcome.rows.len(), 1);
}

#[tokio::test]
async fn a_batchs_identifies_are_one_read_and_one_write_and_each_event_sees_its_moment() {
    let (manager, store) = manager();
    let mut batch = vec![
        identify(
            "organization",
            "posthog",
            json!({"plan": "free", "seats": 1}),
        ),
        event(
            "$pageview",
            json!({"$group_0": "posthog", "$group_1": "p1"}),
        ),
        identify("project", "p1", json!({"name": "one"})),
        identify("organization", "posthog", json!({"plan": "pro"})),
        event(
            "$pageview",
            json!({"$group_0": "posthog", "$group_1": "p1"}),
        ),
        identify("organization", "posthog", json!({"seats": 5})),
        event("$pageview", json!({"$group_0": "posthog"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    assert_eq!(store.batch_writes.load(Ordering::SeqCst), 1);
    assert_eq!(
        store.upserts.load(Ordering::SeqCst),
        2,
        "one upsert per group, not per identify"
    );
    assert_eq!(
        properties_of(&outcome.events[1], 0),
        Some(json!({"plan": "free", "seats": 1}))
    );
    assert_eq!(
        properties_of(&outcome.events[1], 1),
        None,
        "not yet identified"
    );
    assert_eq!(
        properties_of(&outcome.events[4], 0),
        Some(json!({"plan": "pro", "seats": 1}))
    );
    assert_eq!(
        properties_of(&outcome.events[4], 1),
        Some(json!({"name": "one"}))
    );
    assert_eq!(
        properties_of(&outcome.events[6], 0),
        Some(json!({"plan": "pro", "seats": 5}))
    );
    let mut rows: Vec<(String, i64)> = outcome
        .rows
        .iter()
        .map(|row| (row.group_key.clone(), row.version))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [("p1".to_owned(), 1), ("posthog".to_owned(), 1)],
        "one version per group and batch"
    );

    // The next batch merges into what is stored, and an unchanged group writes no row.
    let mut batch = vec![
        event("$pageview", json!({"$group_0": "posthog"})),
        identify("organization", "posthog", json!({"seats": 6})),
        identify("project", "p1", json!({"name": "one"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert_eq!(
        properties_of(&outcome.events[0], 0),
        Some(json!({"plan": "pro", "seats": 5}))
    );
    assert_eq!(outcome.rows.len(), 1);
    assert_eq!(outcome.rows[0].group_key, "posthog");
    assert_eq!(outcome.rows[0].version, 2);
    let stored = store
        .inner
        .groups(&[GroupKey {
            team_id: 2,
            group_type_index: 0,
            group_key: "posthog".to_owned(),
        }])
        .await
        .unwrap();
    let stored = stored.values().next().unwrap();
    assert_eq!(
        Value::Object(stored.properties.clone()),
        json!({"plan": "pro", "seats": 6})
    );
}

#[tokio::test]
async fn a_refused_group_is_retried_per_event_and_the_other_groups_are_written_once() {
    let (manager, store) = manager();
    let long = "k".repeat(KEY_COLUMN_CHARS + 1);
    let mut batch = vec![
        identify("organization", &long, json!({"a": 1})),
        identify("organization", "posthog", json!({"a": 1})),
        identify("organization", &long, json!({"a": 2})),
        identify("organization", "posthog", json!({"b": 2})),
        event("$pageview", json!({"$group_0": "posthog"})),
    ];
    let outcome = run(&manager, &mut batch).await;
    assert!(outcome.events[0].is_err());
    assert!(outcome.events[2].is_err());
    assert!(outcome.events[1].is_ok());
    assert_eq!(
        properties_of(&outcome.events[4], 0),
        Some(json!({"a": 1, "b": 2}))
    );
    assert_eq!(outcome.rows.len(), 1);
    assert_eq!(store.batch_writes.load(Ordering::SeqCst), 1);
}
