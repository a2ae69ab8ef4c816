//! The same expectations of every store: the memory store, the embedded profile's SQLite, and Postgres
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

async fn batch_upserts_answer_per_group_as_upserting_each_would(store: &dyn GroupStore) {
    let posthog = key(1, "posthog");
    let other = key(1, "other");
    store
        .upsert(&posthog, &set(json!({"a": 1, "b": 1})), day(2))
        .await
        .unwrap();
    let batch = [
        GroupUpsert {
            key: posthog.clone(),
            set: set(json!({"b": 2, "c": 3})),
            timestamp: day(3),
        },
        GroupUpsert {
            key: other.clone(),
            set: set(json!({"x": true})),
            timestamp: day(5),
        },
    ];
    let answers = store.upsert_batch(&batch).await.unwrap();
    assert_eq!(answers.len(), 2);
    let changed = answers[0].as_ref().unwrap().as_ref().expect("written");
    assert_eq!(changed.key, posthog);
    assert_eq!(
        Value::Object(changed.properties.clone()),
        json!({"a": 1, "b": 2, "c": 3})
    );
    assert_eq!(changed.version, 2);
    assert_eq!(changed.created_at, day(2), "the earlier creation stays");
    let created = answers[1].as_ref().unwrap().as_ref().expect("created");
    assert_eq!(created.key, other);
    assert_eq!(created.version, 1);
    assert_eq!(created.created_at, day(5));

    let again = store.upsert_batch(&batch).await.unwrap();
    assert!(
        again.iter().all(|answer| matches!(answer, Ok(None))),
        "nothing changed, nothing written: {again:?}"
    );
    let earlier = store
        .upsert_batch(&[GroupUpsert {
            key: other.clone(),
            set: Map::new(),
            timestamp: day(4),
        }])
        .await
        .unwrap();
    let moved = earlier[0].as_ref().unwrap().as_ref().expect("written");
    assert_eq!((moved.created_at, moved.version), (day(4), 2));
}

#[tokio::test]
async fn memory_batch_upserts_answer_per_group_as_upserting_each_would() {
    batch_upserts_answer_per_group_as_upserting_each_would(&MemoryGroupStore::new()).await;
}

#[cfg(feature = "integration-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_upserts_answer_per_group_as_upserting_each_would() {
    let store = postgres_store("batch").await;
    batch_upserts_answer_per_group_as_upserting_each_would(store.as_ref()).await;
}

/// A refused group fails the batch's statement; the store then answers group by group, so
/// only that group is refused.
#[cfg(feature = "integration-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_refuses_only_the_refused_group() {
    let store = postgres_store("batch_refused").await;
    let batch = [
        GroupUpsert {
            key: key(1, "posthog"),
            set: set(json!({"a": 1})),
            timestamp: day(1),
        },
        GroupUpsert {
            key: key(1, "nul"),
            set: set(json!({"a": "\u{0}"})),
            timestamp: day(1),
        },
        GroupUpsert {
            key: key(1, &"k".repeat(401)),
            set: Map::new(),
            timestamp: day(1),
        },
    ];
    let answers = store.upsert_batch(&batch).await.unwrap();
    assert!(matches!(&answers[0], Ok(Some(group)) if group.version == 1));
    assert!(matches!(&answers[1], Err(GroupStoreError::Rejected(_))));
    assert!(matches!(&answers[2], Err(GroupStoreError::Rejected(_))));
    let found = store
        .groups(&[key(1, "posthog"), key(1, "nul")])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
}

/// Two instances writing overlapping batches at once (in different orders): neither loses
/// the other's keys and neither deadlocks.
#[cfg(feature = "integration-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_batch_upserts_lose_nothing() {
    let store = postgres_store("batch_concurrent").await;
    let keys: Vec<GroupKey> = (0..50).map(|n| key(1, &format!("g{n}"))).collect();
    let writers = (0..8).map(|writer| {
        let store = Arc::clone(&store);
        let mut keys = keys.clone();
        if writer % 2 == 1 {
            keys.reverse();
        }
        async move {
            let batch: Vec<GroupUpsert> = keys
                .into_iter()
                .map(|key| GroupUpsert {
                    key,
                    set: set(json!({ format!("w{writer}"): writer })),
                    timestamp: day(1),
                })
                .collect();
            store.upsert_batch(&batch).await.unwrap()
        }
    });
    futures::future::join_all(writers).await;
    let found = store.groups(&keys).await.unwrap();
    assert_eq!(found.len(), 50);
    for group in found.values() {
        assert_eq!(group.properties.len(), 8, "{:?}", group.key);
        assert_eq!(group.version, 8);
    }
}

fn sqlite_store() -> crate::groups::SqliteGroupStore {
    crate::groups::SqliteGroupStore::new(crate::sqlite::Sqlite::in_memory().expect("sqlite"))
}

#[tokio::test]
async fn sqlite_keeps_the_group_store_contract() {
    types_take_the_lowest_free_index_and_at_most_five(&sqlite_store()).await;
    upserts_merge_keep_the_earliest_creation_and_bump_versions(&sqlite_store()).await;
    batch_upserts_answer_per_group_as_upserting_each_would(&sqlite_store()).await;
}

/// Two callers adding the same new type at once both get its one index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_callers_adding_one_type_at_once_get_the_same_index() {
    for _ in 0..50 {
        let store = std::sync::Arc::new(sqlite_store());
        let adds: Vec<_> = (0..4)
            .map(|_| {
                let store = std::sync::Arc::clone(&store);
                tokio::spawn(async move { store.add_group_type(1, "company").await })
            })
            .collect();
        for add in adds {
            assert_eq!(add.await.expect("joined").expect("added"), Some(0));
        }
    }
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
