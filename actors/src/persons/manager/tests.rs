use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::{Value, json};

use super::*;
use crate::persons::state::uuid_from_distinct_id;
use crate::persons::store::{
    PersonStore, PersonStoreError, PersonTransaction, PersonWrite, SnapshotEntry, SnapshotKey,
    WriteOutcome,
};
use crate::persons::{MemoryPersonStore, merge_intent, person_updates};

/// The memory store, counting transactions and snapshot reads.
#[derive(Default)]
struct CountingStore {
    inner: MemoryPersonStore,
    transactions: AtomicUsize,
    snapshots: AtomicUsize,
    /// Persons a snapshot sent in full (the others it confirmed as held).
    persons_read: AtomicUsize,
    /// Calls of `write_batch`, and the person writes they carried.
    batch_writes: AtomicUsize,
    written: AtomicUsize,
}

impl CountingStore {
    /// Persons written, in transactions of their own or in batches.
    fn writes(&self) -> usize {
        self.transactions.load(Ordering::SeqCst) + self.written.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl PersonStore for CountingStore {
    fn name(&self) -> &'static str {
        "counting"
    }

    async fn begin(&self) -> Result<Box<dyn PersonTransaction + '_>, PersonStoreError> {
        self.transactions.fetch_add(1, Ordering::SeqCst);
        self.inner.begin().await
    }

    async fn snapshot(
        &self,
        keys: &[SnapshotKey<'_>],
    ) -> Result<Vec<Option<SnapshotEntry>>, PersonStoreError> {
        self.snapshots.fetch_add(1, Ordering::SeqCst);
        let answers = self.inner.snapshot(keys).await?;
        let read = answers
            .iter()
            .filter(|answer| matches!(answer, Some(SnapshotEntry::Read(_))))
            .count();
        self.persons_read.fetch_add(read, Ordering::SeqCst);
        Ok(answers)
    }

    async fn write_batch(
        &self,
        writes: &[PersonWrite],
    ) -> Result<Vec<WriteOutcome>, PersonStoreError> {
        self.batch_writes.fetch_add(1, Ordering::SeqCst);
        self.written.fetch_add(writes.len(), Ordering::SeqCst);
        self.inner.write_batch(writes).await
    }
}

fn event(distinct_id: &str, name: &str, properties: Value) -> PersonEvent<'static> {
    let Value::Object(properties) = properties else {
        panic!("object");
    };
    PersonEvent {
        team_id: 2,
        distinct_id: distinct_id.to_owned().into(),
        event_uuid: Uuid::now_v7().to_string().into(),
        timestamp: Utc::now(),
        intent: merge_intent(name, distinct_id, &properties.clone().into()),
        updates: person_updates(&properties.into()).into_owned(),
        process_person: true,
    }
}

fn manager(config: PersonConfig) -> (PersonManager, Arc<CountingStore>) {
    let store = Arc::new(CountingStore::default());
    let shared: SharedPersonStore = store.clone();
    (PersonManager::new(shared, config), store)
}

/// Team 2's person of `distinct_id` as stored, read in a transaction of its own.
async fn stored(store: &dyn PersonStore, distinct_id: &str) -> Person {
    let mut transaction = store.begin().await.expect("begin");
    transaction
        .person_by_distinct_id(2, distinct_id)
        .await
        .expect("read")
        .expect("person")
}

/// Another writer changes team 2's person of `distinct_id` (a transaction of its own).
async fn change_stored(
    store: &dyn PersonStore,
    distinct_id: &str,
    change: impl FnOnce(&mut Person),
) {
    let mut transaction = store.begin().await.expect("begin");
    let mut person = transaction
        .person_by_distinct_id(2, distinct_id)
        .await
        .expect("read")
        .expect("person");
    change(&mut person);
    transaction.update_person(&person).await.expect("update");
    transaction.commit().await.expect("commit");
}

fn person(outcome: &Result<PersonOutcome, PersonError>) -> &EventPerson {
    &outcome.as_ref().expect("resolved").person
}

#[tokio::test]
async fn a_known_id_without_changes_is_answered_from_the_cache() {
    let (manager, store) = manager(PersonConfig::default());
    let first = manager
        .resolve_batch(&[event("u", "$pageview", json!({}))])
        .await;
    assert_eq!(store.writes(), 1);
    let events: Vec<PersonEvent> = (0..5).map(|_| event("u", "$pageview", json!({}))).collect();
    let again = manager.resolve_batch(&events).await;
    assert_eq!(store.writes(), 1, "no new transaction");
    for outcome in &again {
        assert_eq!(person(outcome), person(&first[0]));
        assert!(outcome.as_ref().expect("ok").changes.is_none());
    }

    // An event that may change the person always goes to the store, and refreshes the cache.
    let set = manager
        .resolve_batch(&[event("u", "$pageview", json!({ "$set": { "k": 1 } }))])
        .await;
    assert_eq!(store.writes(), 2);
    let cached = manager
        .resolve_batch(&[event("u", "$pageview", json!({}))])
        .await;
    assert_eq!(store.writes(), 2);
    assert_eq!(person(&cached[0]).properties, person(&set[0]).properties);
    assert!(person(&cached[0]).properties.contains("\"k\":1"));
}

#[tokio::test]
async fn an_expired_or_disabled_cache_reads_the_store_but_takes_no_transaction() {
    for config in [
        PersonConfig {
            cache_ttl: Duration::ZERO,
            ..PersonConfig::default()
        },
        PersonConfig {
            cache_size: 0,
            ..PersonConfig::default()
        },
    ] {
        let (manager, store) = manager(config);
        for _ in 0..3 {
            manager
                .resolve_batch(&[event("u", "$pageview", json!({}))])
                .await;
        }
        assert_eq!(store.snapshots.load(Ordering::SeqCst), 3);
        assert_eq!(store.writes(), 1, "only the creation");
    }
}

#[tokio::test]
async fn updates_that_change_nothing_take_no_transaction() {
    let (manager, store) = manager(PersonConfig::default());
    let first = manager
        .resolve_batch(&[event(
            "u",
            "$pageview",
            json!({ "$set": { "plan": "pro" }, "$set_once": { "first": "a" } }),
        )])
        .await;
    assert_eq!(store.writes(), 1);
    // A whole batch of the same updates, and $set_once of keys already there: no writes.
    let events: Vec<PersonEvent> = (0..5)
        .map(|_| {
            event(
                "u",
                "$pageview",
                json!({ "$set": { "plan": "pro" }, "$set_once": { "first": "b" } }),
            )
        })
        .collect();
    let same = manager.resolve_batch(&events).await;
    assert_eq!(store.writes(), 1);
    for outcome in &same {
        assert_eq!(person(outcome), person(&first[0]));
    }
    // A change in the middle of a batch: one transaction, and the events after it see it.
    let events = vec![
        event("u", "$pageview", json!({ "$set": { "plan": "pro" } })),
        event("u", "$pageview", json!({ "$set": { "plan": "team" } })),
        event("u", "$pageview", json!({ "$set": { "plan": "team" } })),
    ];
    let changed = manager.resolve_batch(&events).await;
    assert_eq!(store.writes(), 2);
    assert!(person(&changed[0]).properties.contains("\"plan\":\"pro\""));
    assert!(person(&changed[1]).properties.contains("\"plan\":\"team\""));
    assert_eq!(person(&changed[2]), person(&changed[1]));
}

/// A steady stream of updates that change nothing (posthog-js's `$set_once` of `$initial_*`
/// on every event) costs one snapshot per batch, which confirms the cached copies by version
/// instead of sending the persons again.
#[tokio::test]
async fn a_snapshot_confirms_cached_persons_instead_of_reading_them_again() {
    let (manager, store) = manager(PersonConfig::default());
    let ids: Vec<String> = (0..50).map(|n| format!("user-{n}")).collect();
    let batch = |value: &str| -> Vec<PersonEvent> {
        ids.iter()
            .map(|id| {
                event(
                    id,
                    "$pageview",
                    json!({ "$set_once": { "$initial_current_url": value } }),
                )
            })
            .collect()
    };
    let first = manager.resolve_batch(&batch("https://a")).await;
    assert_eq!(store.writes(), 50);
    let read_at_first = store.persons_read.load(Ordering::SeqCst);
    for _ in 0..3 {
        let again = manager.resolve_batch(&batch("https://b")).await;
        for (before, after) in first.iter().zip(&again) {
            assert_eq!(person(before), person(after));
        }
    }
    assert_eq!(store.writes(), 50, "no writes");
    assert_eq!(store.snapshots.load(Ordering::SeqCst), 4, "one per batch");
    assert_eq!(
        store.persons_read.load(Ordering::SeqCst),
        read_at_first,
        "every later person was confirmed, not sent"
    );
}

/// Another writer (another instance, a merge) changed a cached person: the snapshot sees the
/// new version and sends the person, so the event applies to what is stored, not to the
/// stale copy. Here the other writer removed the key a `$set_once` would skip on the copy.
#[tokio::test]
async fn a_person_changed_elsewhere_is_read_again_and_updated() {
    let (manager, store) = manager(PersonConfig::default());
    manager
        .resolve_batch(&[event("u", "$pageview", json!({ "$set_once": { "a": 1 } }))])
        .await;
    change_stored(store.as_ref(), "u", |person| {
        person.properties.remove("a");
    })
    .await;
    let transactions = store.writes();
    let outcome = manager
        .resolve_batch(&[event("u", "$pageview", json!({ "$set_once": { "a": 2 } }))])
        .await;
    assert!(person(&outcome[0]).properties.contains("\"a\":2"));
    assert_eq!(store.writes(), transactions + 1, "the event was applied");
}

/// A cached person that the batch's first event of its id changes is not read first: the
/// write checks the cached version, loses to the change made elsewhere, and the events are
/// applied again on the stored person, keeping that change.
#[tokio::test]
async fn a_changing_event_on_a_stale_cached_person_loses_its_write_and_is_applied_again() {
    let (manager, store) = manager(PersonConfig::default());
    manager
        .resolve_batch(&[event("u", "$pageview", json!({ "$set": { "n": 0 } }))])
        .await;
    change_stored(store.as_ref(), "u", |person| {
        person
            .properties
            .insert("elsewhere".to_owned(), json!(true));
    })
    .await;
    let snapshots = store.snapshots.load(Ordering::SeqCst);
    let transactions = store.transactions.load(Ordering::SeqCst);
    let outcomes = manager
        .resolve_batch(&[
            event("u", "$pageview", json!({ "$set": { "n": 1 } })),
            event("u", "$pageview", json!({ "$set": { "n": 2 } })),
        ])
        .await;
    assert_eq!(
        store.snapshots.load(Ordering::SeqCst),
        snapshots,
        "the write checks the cached copy instead of a read"
    );
    assert!(
        store.transactions.load(Ordering::SeqCst) > transactions + 1,
        "the lost write's events take a transaction each"
    );
    let first: Value = serde_json::from_str(&person(&outcomes[0]).properties).expect("json");
    assert_eq!(
        first,
        json!({"n": 1, "elsewhere": true, "$creator_event_uuid": first["$creator_event_uuid"]})
    );
    let stored = stored(store.as_ref(), "u").await;
    assert_eq!(stored.properties["n"], json!(2));
    assert_eq!(stored.properties["elsewhere"], json!(true));
}

/// A batch of first sights and plain updates writes each person once, in one batch write,
/// whatever the number of its events; each event still carries its person as it left it, and
/// the ClickHouse rows carry each person's final version once.
#[tokio::test]
async fn new_and_changed_persons_are_written_once_per_batch() {
    let (manager, store) = manager(PersonConfig::default());
    manager
        .resolve_batch(&[event("old", "$pageview", json!({ "$set": { "n": 0 } }))])
        .await;
    let (writes_before, batch_writes_before) =
        (store.writes(), store.batch_writes.load(Ordering::SeqCst));
    let mut events = Vec::new();
    for n in 1..=3 {
        events.push(event("old", "$pageview", json!({ "$set": { "n": n } })));
        events.push(event(
            "new",
            "$pageview",
            json!({ "$set": { "n": n * 10 } }),
        ));
    }
    let outcomes = manager.resolve_batch(&events).await;
    assert_eq!(store.writes() - writes_before, 2, "one write per person");
    assert_eq!(
        store.batch_writes.load(Ordering::SeqCst) - batch_writes_before,
        1
    );
    let seen: Vec<Value> = outcomes
        .iter()
        .map(|outcome| {
            serde_json::from_str::<Value>(&person(outcome).properties).expect("json")["n"].clone()
        })
        .collect();
    assert_eq!(
        seen,
        [
            json!(1),
            json!(10),
            json!(2),
            json!(20),
            json!(3),
            json!(30)
        ]
    );
    let rows: Vec<&Resolution> = outcomes
        .iter()
        .filter_map(|outcome| outcome.as_ref().expect("ok").changes.as_ref())
        .collect();
    assert_eq!(rows.len(), 2, "one set of rows per person");
    for resolution in rows {
        assert_eq!(resolution.person_rows.len(), 1);
        assert!(resolution.person_rows[0].properties.contains("\"n\":3"));
    }
    let created = outcomes[1].as_ref().expect("ok");
    assert_eq!(created.person.uuid, uuid_from_distinct_id(2, "new"));

    // What was written is what a later batch finds.
    let later = manager
        .resolve_batch(&[
            event("old", "$pageview", json!({})),
            event("new", "$pageview", json!({})),
        ])
        .await;
    assert!(person(&later[0]).properties.contains("\"n\":3"));
    assert!(person(&later[1]).properties.contains("\"n\":30"));
}

/// After a merge, two distinct ids of one person in one batch: planned together in batch order
/// and written once, not twice (the second write of the same person would always be lost).
#[tokio::test]
async fn two_ids_of_one_person_in_a_batch_write_it_once() {
    let (manager, store) = manager(PersonConfig::default());
    manager
        .resolve_batch(&[
            event("anon", "$pageview", json!({ "$set": { "a": 0 } })),
            event("user", "$pageview", json!({ "$set": { "b": 0 } })),
        ])
        .await;
    manager
        .resolve_batch(&[event(
            "user",
            "$identify",
            json!({ "$anon_distinct_id": "anon" }),
        )])
        .await;
    let (writes, transactions) = (store.writes(), store.transactions.load(Ordering::SeqCst));
    let outcomes = manager
        .resolve_batch(&[
            event("anon", "$pageview", json!({ "$set": { "a": 1 } })),
            event("user", "$pageview", json!({ "$set": { "b": 1 } })),
            event("anon", "$pageview", json!({ "$set": { "a": 2 } })),
        ])
        .await;
    assert_eq!(store.writes() - writes, 1, "one write of the person");
    assert_eq!(
        store.transactions.load(Ordering::SeqCst),
        transactions,
        "no transaction"
    );
    let seen: Vec<Value> = outcomes
        .iter()
        .map(|outcome| serde_json::from_str(&person(outcome).properties).expect("json"))
        .collect();
    assert_eq!((&seen[0]["a"], &seen[0]["b"]), (&json!(1), &json!(0)));
    assert_eq!((&seen[1]["a"], &seen[1]["b"]), (&json!(1), &json!(1)));
    assert_eq!((&seen[2]["a"], &seen[2]["b"]), (&json!(2), &json!(1)));
}

/// The memory store, with another writer that changes person `u` (`b: 2`) once, between the
/// batch's snapshot and its write.
#[derive(Default)]
struct Interfering {
    inner: MemoryPersonStore,
    done: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl PersonStore for Interfering {
    fn name(&self) -> &'static str {
        "interfering"
    }

    async fn begin(&self) -> Result<Box<dyn PersonTransaction + '_>, PersonStoreError> {
        self.inner.begin().await
    }

    async fn snapshot(
        &self,
        keys: &[SnapshotKey<'_>],
    ) -> Result<Vec<Option<SnapshotEntry>>, PersonStoreError> {
        self.inner.snapshot(keys).await
    }

    async fn write_batch(
        &self,
        writes: &[PersonWrite],
    ) -> Result<Vec<WriteOutcome>, PersonStoreError> {
        if !self.done.swap(true, Ordering::SeqCst) {
            let mut transaction = self.inner.begin().await?;
            if let Some(mut stored) = transaction.person_by_distinct_id(2, "u").await? {
                stored.properties.insert("b".to_owned(), json!(2));
                transaction.update_person(&stored).await?;
            }
            transaction.commit().await?;
        }
        self.inner.write_batch(writes).await
    }
}

/// A write computed from a person someone else changed after the snapshot is lost, not
/// applied over the other change: the event is applied again on the stored person.
#[tokio::test]
async fn a_write_that_lost_a_race_is_applied_again_on_the_stored_person() {
    let store = Arc::new(Interfering::default());
    let shared: SharedPersonStore = store.clone();
    let manager = PersonManager::new(shared, PersonConfig::default());
    store.done.store(true, Ordering::SeqCst);
    manager
        .resolve_batch(&[event("u", "$pageview", json!({ "$set": { "a": 1 } }))])
        .await;
    store.done.store(false, Ordering::SeqCst);
    let outcome = manager
        .resolve_batch(&[event("u", "$pageview", json!({ "$set": { "a": 5 } }))])
        .await;
    let answered = &person(&outcome[0]).properties;
    assert!(
        answered.contains("\"a\":5") && answered.contains("\"b\":2"),
        "{answered}"
    );
    let stored = stored(store.as_ref(), "u").await;
    assert_eq!(stored.properties["a"], json!(5));
    assert_eq!(stored.properties["b"], json!(2));
    assert_eq!(
        stored.version, 2,
        "created, changed by the other writer, then by the event"
    );
}

#[tokio::test]
async fn events_of_one_id_apply_in_batch_order_and_answers_keep_it() {
    let (manager, _) = manager(PersonConfig::default());
    let mut events = Vec::new();
    for step in 0..20 {
        events.push(event(
            "ordered",
            "$pageview",
            json!({ "$set": { "step": step } }),
        ));
        events.push(event(&format!("other-{step}"), "$pageview", json!({})));
    }
    let outcomes = manager.resolve_batch(&events).await;
    assert_eq!(outcomes.len(), events.len());
    for (index, outcome) in outcomes.iter().enumerate() {
        let person = person(outcome);
        let properties: Value = serde_json::from_str(&person.properties).expect("json");
        if index % 2 == 0 {
            // Each event sees the person as it left it: its own step, not a later one.
            assert_eq!(properties["step"], json!(index / 2), "event {index}");
        } else {
            assert!(properties.get("step").is_none(), "event {index}");
        }
    }
}

#[tokio::test]
async fn a_merge_points_every_cached_id_at_the_surviving_person() {
    let (manager, _) = manager(PersonConfig::default());
    manager
        .resolve_batch(&[
            event("anon", "$pageview", json!({})),
            event("user", "$pageview", json!({})),
        ])
        .await;
    let merged = manager
        .resolve_batch(&[event(
            "user",
            "$identify",
            json!({ "$anon_distinct_id": "anon" }),
        )])
        .await;
    let survivor = person(&merged[0]).uuid;
    let after = manager
        .resolve_batch(&[event("anon", "$pageview", json!({}))])
        .await;
    assert_eq!(person(&after[0]).uuid, survivor);
}

#[tokio::test]
async fn a_refused_merge_of_a_cached_id_still_raises_its_warning() {
    let (manager, _) = manager(PersonConfig::default());
    manager
        .resolve_batch(&[event("user", "$pageview", json!({}))])
        .await;
    let refused = manager
        .resolve_batch(&[event(
            "user",
            "$identify",
            json!({ "$anon_distinct_id": "undefined" }),
        )])
        .await;
    let changes = refused[0]
        .as_ref()
        .expect("resolved")
        .changes
        .as_ref()
        .expect("went to the store");
    assert_eq!(
        changes.warnings[0].kind,
        crate::persons::CANNOT_MERGE_WITH_ILLEGAL_DISTINCT_ID
    );
}

/// `$process_person_profile: false`: no transaction, no person; an unknown distinct id gets
/// PostHog's v5 id, a known one lends its id (and takes the event once over a minute old).
#[tokio::test]
async fn personless_events_create_and_change_nothing() {
    // No cache, so that the snapshot is what finds the known person.
    let (manager, store) = manager(PersonConfig {
        cache_size: 0,
        ..PersonConfig::default()
    });
    let mut ghost = event("ghost", "$pageview", json!({}));
    ghost.process_person = false;
    let outcome = manager.resolve_batch(&[ghost.clone()]).await;
    let outcome = outcome[0].as_ref().expect("answered");
    assert_eq!(outcome.mode, PersonMode::Propertyless);
    assert_eq!(outcome.person.uuid, uuid_from_distinct_id(2, "ghost"));
    assert_eq!(&*outcome.person.properties, "{}");
    assert_eq!(outcome.person.created_at.timestamp(), 5);
    assert!(outcome.changes.is_none());
    assert_eq!(store.writes(), 0);
    assert!(
        store
            .persons_by_distinct_ids(&[(2, "ghost".to_owned())])
            .await
            .expect("read")
            .is_empty(),
        "no person was created"
    );

    // The person the id gets later has the id its personless events carried.
    let later_person = manager
        .resolve_batch(&[event("ghost", "$pageview", json!({}))])
        .await;
    assert_eq!(
        person(&later_person[0]).uuid,
        uuid_from_distinct_id(2, "ghost")
    );

    let created = manager
        .resolve_batch(&[event("known", "$pageview", json!({"$set": {"k": 1}}))])
        .await;
    let known = person(&created[0]).clone();
    let mut soon = event("known", "$pageview", json!({}));
    soon.process_person = false;
    soon.timestamp = known.created_at + chrono::Duration::seconds(30);
    let mut later = soon.clone();
    later.timestamp = known.created_at + chrono::Duration::minutes(2);
    let outcomes = manager.resolve_batch(&[soon]).await;
    let outcome = outcomes[0].as_ref().expect("answered");
    assert_eq!(
        (
            outcome.mode,
            outcome.person.uuid,
            &*outcome.person.properties
        ),
        (PersonMode::Propertyless, known.uuid, "{}")
    );
    let outcomes = manager.resolve_batch(&[later]).await;
    assert_eq!(
        outcomes[0].as_ref().expect("answered").mode,
        PersonMode::ForceUpgrade
    );
    assert_eq!(store.writes(), 2, "only the two creations");
}

/// PostHog's ids for `team:distinct_id`: UUID v5 in its person namespace.
#[test]
fn person_ids_from_distinct_ids_are_uuid_v5_in_posthogs_namespace() {
    let id = uuid_from_distinct_id(2, "ghost");
    // Python's uuid.uuid5 (RFC 4122, as npm's uuid v5) of "2:ghost" in that namespace.
    assert_eq!(id.to_string(), "dfce7815-dd77-5683-98c7-b6181bfcb67d");
    assert_eq!(id.get_version_num(), 5);
    assert_eq!(id, uuid_from_distinct_id(2, "ghost"));
    assert_ne!(id, uuid_from_distinct_id(3, "ghost"));
    assert_eq!(
        crate::persons::state::PERSON_UUIDV5_NAMESPACE.to_string(),
        "932979b4-65c3-4424-8467-0b66ec27bc22"
    );
}
