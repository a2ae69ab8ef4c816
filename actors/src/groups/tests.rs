//! The same expectations of both stores: the embedded profile's memory store, and Postgres
//! (the test run's server; a fresh database per test).

#[cfg(feature = "integration-tests")]
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value, json};

use super::*;

#[cfg(feature = "integration-tests")]
async fn postgres_store(name: &str) -> Arc<dyn GroupStore> {
    let (pool, _) = crate::test_support::fresh_postgres(&format!("ps_groups_{name}")).await;
    crate::test_support::insert_teams(&pool, &[1, 2]).await;
    Arc::new(PostgresGroupStore::new(pool))
}

fn key(team_id: i64, group_key: &str) -> GroupKey {
    GroupKey {
        team_id,
        group_type_index: 0,
        group_key: group_key.to_owned(),
    }
}

fn set(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn day(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, day, 0, 0, 0).unwrap()
}

async fn types_take_the_lowest_free_index_and_at_most_five(store: &dyn GroupStore) {
    for (n, name) in ["organization", "company", "project", "workspace", "account"]
        .iter()
        .enumerate()
    {
        assert_eq!(store.add_group_type(1, name).await.unwrap(), Some(n as u8));
    }
    assert_eq!(store.add_group_type(1, "company").await.unwrap(), Some(1));
    assert_eq!(store.add_group_type(1, "sixth").await.unwrap(), None);
    assert_eq!(store.add_group_type(2, "sixth").await.unwrap(), Some(0));
    let types = store.group_types(1).await.unwrap();
    assert_eq!(types.len(), 5);
    assert_eq!(types["project"], 2);
}

async fn upserts_merge_keep_the_earliest_creation_and_bump_versions(store: &dyn GroupStore) {
    let posthog = key(1, "posthog");
    let created = store
        .upsert(&posthog, &set(json!({"a": 1})), day(2))
        .await
        .unwrap();
    assert!(created.written);
    assert_eq!(created.group.version, 1);
    assert_eq!(created.group.created_at, day(2));

    let same = store
        .upsert(&posthog, &set(json!({"a": 1})), day(3))
        .await
        .unwrap();
    assert!(!same.written, "nothing changed");
    assert_eq!(same.group.version, 1);
    assert_eq!(
        same.group.created_at,
        day(2),
        "a later event keeps created_at"
    );

    let changed = store
        .upsert(&posthog, &set(json!({"b": {"x": [1]}})), day(1))
        .await
        .unwrap();
    assert!(changed.written);
    assert_eq!(changed.group.version, 2);
    assert_eq!(changed.group.created_at, day(1));
    assert_eq!(
        Value::Object(changed.group.properties),
        json!({"a": 1, "b": {"x": [1]}})
    );

    let found = store
        .groups(&[posthog.clone(), key(2, "posthog")])
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "team 2 has no such group");
    assert_eq!(found[&posthog].version, 2);
    assert_eq!(found[&posthog].created_at, day(1));
}

#[tokio::test]
async fn memory_types_take_the_lowest_free_index_and_at_most_five() {
    types_take_the_lowest_free_index_and_at_most_five(&MemoryGroupStore::new()).await;
}

#[tokio::test]
async fn memory_upserts_merge_keep_the_earliest_creation_and_bump_versions() {
    upserts_merge_keep_the_earliest_creation_and_bump_versions(&MemoryGroupStore::new()).await;
}

#[cfg(feature = "integration-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_types_take_the_lowest_free_index_and_at_most_five() {
    let store = postgres_store("types").await;
    types_take_the_lowest_free_index_and_at_most_five(store.as_ref()).await;
}

#[cfg(feature = "integration-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upserts_merge_keep_the_earliest_creation_and_bump_versions() {
    let store = postgres_store("upserts").await;
    upserts_merge_keep_the_earliest_creation_and_bump_versions(store.as_ref()).await;
}

/// Instances registering types and updating one group at the same moment: every type gets
/// its own index and no update loses another's keys.
#[cfg(feature = "integration-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_types_and_upserts_lose_nothing() {
    let store = postgres_store("concurrent").await;
    let types = futures::future::join_all((0..5).map(|n| {
        let store = Arc::clone(&store);
        async move { store.add_group_type(1, &format!("type{n}")).await.unwrap() }
    }))
    .await;
    let mut indexes: Vec<u8> = types
        .into_iter()
        .map(|index| index.expect("an index"))
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1, 2, 3, 4]);

    let posthog = key(1, "posthog");
    futures::future::join_all((0..20).map(|n| {
        let store = Arc::clone(&store);
        let posthog = posthog.clone();
        async move {
            store
                .upsert(&posthog, &set(json!({ format!("k{n}"): n })), day(1))
                .await
                .unwrap()
        }
    }))
    .await;
    let found = store.groups(std::slice::from_ref(&posthog)).await.unwrap();
    assert_eq!(found[&posthog].properties.len(), 20);
    assert_eq!(found[&posthog].version, 20);
}

#[cfg(feature = "integration-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_an_overlong_key_and_an_unknown_team_as_the_events_fault() {
    let store = postgres_store("refused").await;
    let long = key(1, &"k".repeat(401));
    assert!(matches!(
        store.upsert(&long, &Map::new(), day(1)).await,
        Err(GroupStoreError::Rejected(_))
    ));
    assert!(matches!(
        store.upsert(&key(99, "posthog"), &Map::new(), day(1)).await,
        Err(GroupStoreError::Rejected(_))
    ));
    assert!(matches!(
        store
            .upsert(&key(1, "nul"), &set(json!({"a": "\u{0}"})), day(1))
            .await,
        Err(GroupStoreError::Rejected(_))
    ));
}
