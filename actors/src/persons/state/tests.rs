//! The person step's scenarios, each run against the in-process store and (with the
//! `integration-tests` feature) against a fresh Postgres database migrated like production.

use std::sync::Arc;

use chrono::TimeZone;
use serde_json::{Value, json};

use super::*;
use crate::persons::{MemoryPersonStore, merge_intent, person_updates};

const TEAM: i64 = 2;

fn at(second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 5, 0, second)
        .single()
        .expect("valid time")
}

fn event(distinct_id: &str, name: &str, properties: Value, second: u32) -> PersonEvent<'static> {
    let Value::Object(properties) = properties else {
        panic!("properties must be an object");
    };
    PersonEvent {
        team_id: TEAM,
        distinct_id: distinct_id.to_owned().into(),
        event_uuid: Uuid::now_v7().to_string().into(),
        timestamp: at(second),
        intent: merge_intent(name, distinct_id, &properties.clone().into()),
        updates: person_updates(&properties.into()).into_owned(),
        process_person: true,
    }
}

async fn run(store: &dyn PersonStore, event: &PersonEvent<'_>) -> Resolution {
    resolve(store, event, 5).await.expect("person step")
}

async fn person_of(store: &dyn PersonStore, distinct_id: &str) -> Option<Person> {
    let mut transaction = store.begin().await.expect("begin");
    let person = transaction
        .person_by_distinct_id(TEAM, distinct_id)
        .await
        .expect("read");
    transaction.commit().await.expect("commit");
    person
}

fn props(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn without_creator(person: &Person) -> Map<String, Value> {
    let mut properties = person.properties.clone();
    properties.remove("$creator_event_uuid");
    properties
}

// --- scenarios -------------------------------------------------------------------------

async fn first_sight_creates_the_person_with_set_and_set_once(store: &dyn PersonStore) {
    let first = event(
        "anon-1",
        "$pageview",
        json!({ "$set": { "a": 1 }, "$set_once": { "a": 0, "b": 2 }, "$unset": ["b"] }),
        7,
    );
    let resolution = run(store, &first).await;
    assert!(resolution.created);
    let person = &resolution.person;
    assert_eq!(person.version, 0);
    assert!(!person.is_identified);
    assert_eq!(person.created_at, at(7));
    // $set beats $set_once; $unset does nothing to a new person.
    assert_eq!(without_creator(person), props(json!({ "a": 1, "b": 2 })));
    assert_eq!(
        person.properties["$creator_event_uuid"],
        Value::String(first.event_uuid.to_string())
    );
    assert_eq!(resolution.person_rows, vec![PersonRow::of(person)]);
    assert_eq!(resolution.distinct_id_rows.len(), 1);
    assert_eq!(resolution.distinct_id_rows[0].person_id, person.uuid);
    assert_eq!(resolution.distinct_id_rows[0].version, 0);

    let stored = person_of(store, "anon-1").await.expect("stored");
    assert_eq!(&stored, &**person);
}

async fn updates_write_only_when_something_changes(store: &dyn PersonStore) {
    let created = run(
        store,
        &event("u", "$pageview", json!({ "$set": { "a": 1, "c": 3 } }), 1),
    )
    .await;
    let updated = run(
        store,
        &event(
            "u",
            "$pageview",
            json!({ "$set": { "a": 2 }, "$set_once": { "a": 9, "d": 4 }, "$unset": ["c"] }),
            2,
        ),
    )
    .await;
    assert!(!updated.created);
    assert_eq!(updated.person.id, created.person.id);
    assert_eq!(updated.person.version, 1);
    assert_eq!(
        without_creator(&updated.person),
        props(json!({ "a": 2, "d": 4 }))
    );
    assert_eq!(updated.person_rows, vec![PersonRow::of(&updated.person)]);

    // The same values again: nothing to write, the version stays.
    let unchanged = run(
        store,
        &event("u", "$pageview", json!({ "$set": { "a": 2 } }), 3),
    )
    .await;
    assert_eq!(unchanged.person.version, 1);
    assert!(unchanged.person_rows.is_empty());
    // Creation time is the first event's, whatever comes later.
    assert_eq!(unchanged.person.created_at, at(1));
}

async fn identify_adds_the_user_id_to_the_anonymous_person(store: &dyn PersonStore) {
    let anonymous = run(
        store,
        &event("anon", "$pageview", json!({ "$set": { "seen": true } }), 1),
    )
    .await;
    let identified = run(
        store,
        &event(
            "user@example.com",
            "$identify",
            json!({ "$anon_distinct_id": "anon", "$set": { "email": "user@example.com" } }),
            2,
        ),
    )
    .await;
    assert_eq!(identified.person.id, anonymous.person.id);
    assert!(identified.person.is_identified);
    assert_eq!(
        without_creator(&identified.person),
        props(json!({ "seen": true, "email": "user@example.com" }))
    );
    let by_user = person_of(store, "user@example.com").await.expect("user id");
    assert_eq!(by_user.id, anonymous.person.id);
    assert_eq!(identified.distinct_id_rows.len(), 1);
    assert_eq!(
        identified.distinct_id_rows[0].distinct_id,
        "user@example.com"
    );
}

async fn identify_merges_two_people_into_the_identified_one(store: &dyn PersonStore) {
    let user = run(
        store,
        &event(
            "user",
            "$pageview",
            json!({ "$set": { "plan": "pro", "x": 1 } }),
            5,
        ),
    )
    .await;
    let anonymous = run(
        store,
        &event(
            "anon",
            "$pageview",
            json!({ "$set": { "x": 2, "ref": "ad" } }),
            3,
        ),
    )
    .await;
    let merged = run(
        store,
        &event(
            "user",
            "$identify",
            json!({ "$anon_distinct_id": "anon", "$set": { "last": "merge" } }),
            9,
        ),
    )
    .await;
    // The event's person keeps its row; the anonymous one is deleted.
    assert_eq!(merged.person.id, user.person.id);
    assert_eq!(merged.merged_person, Some(anonymous.person.uuid));
    assert!(merged.person.is_identified);
    // Target wins on conflicts, then the event's own $set.
    let mut expected = props(json!({ "plan": "pro", "x": 1, "ref": "ad", "last": "merge" }));
    expected.insert(
        "$creator_event_uuid".to_owned(),
        user.person.properties["$creator_event_uuid"].clone(),
    );
    assert_eq!(merged.person.properties, expected);
    // The older creation time survives.
    assert_eq!(merged.person.created_at, at(3));
    assert_eq!(merged.person.version, user.person.version + 1);

    let anon_now = person_of(store, "anon").await.expect("anon id moved");
    assert_eq!(anon_now.id, user.person.id);
    assert_eq!(merged.distinct_id_rows.len(), 1);
    assert_eq!(merged.distinct_id_rows[0].distinct_id, "anon");
    assert_eq!(merged.distinct_id_rows[0].person_id, user.person.uuid);
    assert_eq!(merged.distinct_id_rows[0].version, 1);
    let deleted = merged
        .person_rows
        .iter()
        .find(|row| row.is_deleted)
        .expect("a delete row");
    assert_eq!(deleted.id, anonymous.person.uuid);
    assert_eq!(deleted.version, anonymous.person.version + 100);
}

async fn two_identified_people_merge_only_when_dangerous(store: &dyn PersonStore) {
    for (id, second) in [("alice", 1), ("bob", 2)] {
        run(
            store,
            &event(
                id,
                "$identify",
                json!({ "$anon_distinct_id": format!("{id}-anon") }),
                second,
            ),
        )
        .await;
    }
    let refused = run(
        store,
        &event("alice", "$create_alias", json!({ "alias": "bob" }), 3),
    )
    .await;
    assert_eq!(refused.warnings.len(), 1);
    assert_eq!(refused.warnings[0].kind, CANNOT_MERGE_ALREADY_IDENTIFIED);
    assert_ne!(
        person_of(store, "alice").await.map(|p| p.id),
        person_of(store, "bob").await.map(|p| p.id)
    );

    let merged = run(
        store,
        &event("alice", "$merge_dangerously", json!({ "alias": "bob" }), 4),
    )
    .await;
    assert!(merged.warnings.is_empty());
    assert!(merged.merged_person.is_some());
    for id in ["alice", "alice-anon", "bob", "bob-anon"] {
        assert_eq!(
            person_of(store, id).await.map(|p| p.id),
            Some(merged.person.id),
            "{id}"
        );
    }
}

async fn alias_of_two_unknown_ids_creates_one_identified_person(store: &dyn PersonStore) {
    let created = run(
        store,
        &event(
            "new-user",
            "$create_alias",
            json!({ "alias": "old-id", "$set": { "k": "v" } }),
            1,
        ),
    )
    .await;
    assert!(created.created);
    assert!(created.person.is_identified);
    assert_eq!(created.distinct_id_rows.len(), 2);
    for id in ["new-user", "old-id"] {
        assert_eq!(
            person_of(store, id).await.map(|p| p.id),
            Some(created.person.id)
        );
    }
    assert_eq!(without_creator(&created.person), props(json!({ "k": "v" })));
}

async fn an_illegal_id_is_refused_with_a_warning(store: &dyn PersonStore) {
    let resolution = run(
        store,
        &event(
            "real-user",
            "$identify",
            json!({ "$anon_distinct_id": "null" }),
            1,
        ),
    )
    .await;
    assert_eq!(resolution.warnings.len(), 1);
    assert_eq!(
        resolution.warnings[0].kind,
        crate::persons::CANNOT_MERGE_WITH_ILLEGAL_DISTINCT_ID
    );
    assert_eq!(resolution.warnings[0].details["illegalDistinctId"], "null");
    assert!(!resolution.person.is_identified);
    assert!(person_of(store, "null").await.is_none());
}

/// Two identifies of the same user, from two anonymous ids, at the same time: one person with
/// all four ids' properties, whichever transaction wins.
/// The snapshot's contract: one answer per key in key order; a held copy at the stored version
/// is confirmed, one at an older version or of another person (after a merge) is replaced by
/// the stored person, and an id without a person has no answer.
async fn a_snapshot_confirms_current_copies_and_sends_changed_ones(store: &dyn PersonStore) {
    use crate::persons::store::{PersonVersion, SnapshotEntry, SnapshotKey};

    let kept = run(
        store,
        &event("kept", "$pageview", json!({ "$set": { "v": 1 } }), 1),
    )
    .await;
    let changed = run(
        store,
        &event("changed", "$pageview", json!({ "$set": { "v": 1 } }), 2),
    )
    .await;
    let changed_again = run(
        store,
        &event("changed", "$pageview", json!({ "$set": { "v": 2 } }), 3),
    )
    .await;
    run(store, &event("anon", "$pageview", json!({}), 4)).await;
    let anon_before = person_of(store, "anon").await.expect("anon");
    let merged = run(
        store,
        &event(
            "kept",
            "$identify",
            json!({ "$anon_distinct_id": "anon" }),
            5,
        ),
    )
    .await;
    let kept_now = person_of(store, "kept").await.expect("kept");
    assert_eq!(merged.person.id, kept_now.id);

    let keys = [
        SnapshotKey {
            team_id: TEAM,
            distinct_id: "changed",
            held: Some(PersonVersion::from(&*changed.person)),
        },
        SnapshotKey {
            team_id: TEAM,
            distinct_id: "kept",
            held: Some(PersonVersion::from(&kept_now)),
        },
        SnapshotKey {
            team_id: TEAM,
            distinct_id: "nobody",
            held: None,
        },
        SnapshotKey {
            team_id: TEAM,
            distinct_id: "anon",
            held: Some(PersonVersion::from(&anon_before)),
        },
        SnapshotKey {
            team_id: TEAM,
            distinct_id: "kept",
            held: None,
        },
    ];
    let answers = store.snapshot(&keys).await.expect("snapshot");
    assert_eq!(answers.len(), keys.len());
    assert_eq!(
        answers[0],
        Some(SnapshotEntry::Read((*changed_again.person).clone())),
        "an older version is replaced"
    );
    assert_eq!(answers[1], Some(SnapshotEntry::Held), "the current copy");
    assert_eq!(answers[2], None, "no person");
    assert_eq!(
        answers[3],
        Some(SnapshotEntry::Read(kept_now.clone())),
        "a merged id points at the surviving person"
    );
    assert_eq!(
        answers[4],
        Some(SnapshotEntry::Read(kept_now)),
        "nothing held"
    );
    assert_ne!(kept.person.version, merged.person.version);
}

/// `write_batch`'s contract: an update at the version it was computed from is stored (version
/// plus one); one from an older version, or a second write of the same person in the batch,
/// is lost and changes nothing; a new person is created where its distinct id is free, and
/// lost (leaving no person behind) where the id is taken.
async fn batch_writes_apply_only_to_what_was_read(store: &dyn PersonStore) {
    use crate::persons::store::{PersonVersion, PersonWrite, WriteOutcome};

    let current = run(
        store,
        &event("current", "$pageview", json!({ "$set": { "v": 1 } }), 1),
    )
    .await
    .person;
    let stale = run(
        store,
        &event("stale", "$pageview", json!({ "$set": { "v": 1 } }), 2),
    )
    .await
    .person;
    run(
        store,
        &event("stale", "$pageview", json!({ "$set": { "v": 2 } }), 3),
    )
    .await;
    run(store, &event("taken", "$pageview", json!({}), 4)).await;
    let with = |person: &Person, v: i64| {
        let mut changed = person.clone();
        changed.properties.insert("v".to_owned(), json!(v));
        changed
    };
    let new_person = |distinct_id: &str| NewPerson {
        uuid: uuid_from_distinct_id(TEAM, distinct_id),
        team_id: TEAM,
        created_at: at(5),
        properties: props(json!({ "fresh": true })),
        properties_last_operation: props(json!({ "fresh": "set" })),
        is_identified: false,
    };
    let writes = [
        PersonWrite::Update {
            distinct_id: "current".to_owned(),
            person: with(&current, 10),
        },
        PersonWrite::Update {
            distinct_id: "stale".to_owned(),
            person: with(&stale, 10),
        },
        PersonWrite::Create {
            distinct_id: "free".to_owned(),
            person: new_person("free"),
        },
        PersonWrite::Create {
            distinct_id: "taken".to_owned(),
            person: new_person("taken"),
        },
        PersonWrite::Update {
            distinct_id: "current".to_owned(),
            person: with(&current, 20),
        },
    ];
    let outcomes = store.write_batch(&writes).await.expect("write");
    assert_eq!(outcomes.len(), 5);
    assert_eq!(
        outcomes[0],
        WriteOutcome::Stored(PersonVersion {
            id: current.id,
            version: current.version + 1,
        })
    );
    assert_eq!(
        outcomes[1],
        WriteOutcome::Lost,
        "written from an older version"
    );
    let WriteOutcome::Stored(free) = &outcomes[2] else {
        panic!("the free id's person was not created: {:?}", outcomes[2]);
    };
    assert_eq!(free.version, 0);
    assert_eq!(outcomes[3], WriteOutcome::Lost, "the id has a person");
    assert_eq!(outcomes[4], WriteOutcome::Lost, "the same person twice");

    let stored = |id: &'static str| async move { person_of(store, id).await };
    assert_eq!(
        stored("current").await.expect("current").properties["v"],
        json!(10)
    );
    assert_eq!(
        stored("stale").await.expect("stale").properties["v"],
        json!(2)
    );
    let created = stored("free").await.expect("free");
    assert_eq!(
        (created.id, created.version, created.uuid),
        (free.id, 0, uuid_from_distinct_id(TEAM, "free"))
    );
    let taken = stored("taken").await.expect("taken");
    assert_ne!(taken.uuid, Uuid::nil());
    assert!(
        taken.properties.get("fresh").is_none(),
        "the first person keeps the id"
    );
}

async fn concurrent_identifies_of_one_user_end_with_one_person(store: Arc<dyn PersonStore>) {
    for (anon, key) in [("anon-a", "from_a"), ("anon-b", "from_b")] {
        run(
            store.as_ref(),
            &event(anon, "$pageview", json!({ "$set": { key: true } }), 1),
        )
        .await;
    }
    let identify = |anon: &str, key: &str| {
        event(
            "same-user",
            "$identify",
            json!({ "$anon_distinct_id": anon, "$set": { key: anon } }),
            2,
        )
    };
    let (first, second) = (identify("anon-a", "via_a"), identify("anon-b", "via_b"));
    let (a, b) = tokio::join!(
        {
            let store = Arc::clone(&store);
            async move { resolve(store.as_ref(), &first, 10).await }
        },
        {
            let store = Arc::clone(&store);
            async move { resolve(store.as_ref(), &second, 10).await }
        }
    );
    a.expect("first identify");
    b.expect("second identify");

    let person = person_of(store.as_ref(), "same-user").await.expect("user");
    for id in ["anon-a", "anon-b"] {
        assert_eq!(
            person_of(store.as_ref(), id).await.map(|p| p.id),
            Some(person.id),
            "{id}"
        );
    }
    assert_eq!(
        without_creator(&person),
        props(json!({ "from_a": true, "from_b": true, "via_a": "anon-a", "via_b": "anon-b" }))
    );
    assert!(person.is_identified);
}

macro_rules! scenarios {
    ($store:expr) => {
        first_sight_creates_the_person_with_set_and_set_once(&*$store(1).await).await;
        updates_write_only_when_something_changes(&*$store(2).await).await;
        identify_adds_the_user_id_to_the_anonymous_person(&*$store(3).await).await;
        identify_merges_two_people_into_the_identified_one(&*$store(4).await).await;
        two_identified_people_merge_only_when_dangerous(&*$store(5).await).await;
        alias_of_two_unknown_ids_creates_one_identified_person(&*$store(6).await).await;
        an_illegal_id_is_refused_with_a_warning(&*$store(7).await).await;
        concurrent_identifies_of_one_user_end_with_one_person($store(8).await).await;
        a_snapshot_confirms_current_copies_and_sends_changed_ones(&*$store(9).await).await;
        batch_writes_apply_only_to_what_was_read(&*$store(10).await).await;
    };
}

async fn memory_store(_: u32) -> Arc<dyn PersonStore> {
    Arc::new(MemoryPersonStore::new())
}

#[tokio::test]
async fn the_person_step_on_the_memory_store() {
    scenarios!(memory_store);
}

async fn sqlite_store(_: u32) -> Arc<dyn PersonStore> {
    Arc::new(crate::persons::SqlitePersonStore::new(
        crate::sqlite::Sqlite::in_memory().expect("sqlite"),
    ))
}

#[tokio::test]
async fn the_person_step_on_the_sqlite_store() {
    scenarios!(sqlite_store);
}

async fn a_dropped_transaction_changes_nothing(store: &dyn PersonStore) {
    run(
        store,
        &event("kept", "$pageview", json!({ "$set": { "v": 1 } }), 1),
    )
    .await;
    {
        let mut transaction = store.begin().await.expect("begin");
        let person = transaction
            .person_by_distinct_id(TEAM, "kept")
            .await
            .expect("read")
            .expect("exists");
        let mut changed = person.clone();
        changed.properties.insert("v".to_owned(), json!(2));
        transaction.update_person(&changed).await.expect("update");
        transaction
            .add_distinct_id(&person, "added")
            .await
            .expect("add");
        transaction.delete_person(&person).await.expect("delete");
    }
    let person = person_of(store, "kept").await.expect("still there");
    assert_eq!(person.properties["v"], json!(1));
    assert_eq!(person.version, 0);
    assert!(person_of(store, "added").await.is_none());
}

#[test]
fn a_dropped_memory_transaction_changes_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(a_dropped_transaction_changes_nothing(
        &MemoryPersonStore::new(),
    ));
}

#[tokio::test]
async fn a_dropped_sqlite_transaction_changes_nothing() {
    a_dropped_transaction_changes_nothing(&*sqlite_store(0).await).await;
}

#[cfg(feature = "integration-tests")]
mod postgres {
    use super::*;
    use crate::persons::PostgresPersonStore;

    /// A fresh database per scenario, migrated, with team 2, on the Postgres of the test run.
    async fn postgres_store(scenario: u32) -> Arc<dyn PersonStore> {
        postgres_store_and_pool(scenario).await.0
    }

    async fn postgres_store_and_pool(
        scenario: u32,
    ) -> (Arc<dyn PersonStore>, deadpool_postgres::Pool) {
        let (pool, _) =
            crate::test_support::fresh_postgres(&format!("ps_persons_{scenario}")).await;
        crate::test_support::insert_teams(&pool, &[2]).await;
        (Arc::new(PostgresPersonStore::new(pool.clone())), pool)
    }

    /// A merge hands the source's feature-flag hash-key overrides to the target, keeping the
    /// target's own where both have one, and leaves none pointing at the deleted person.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_on_postgres_moves_feature_flag_overrides() {
        let (store, pool) = postgres_store_and_pool(50).await;
        let target = run(store.as_ref(), &event("user", "$pageview", json!({}), 1)).await;
        let source = run(store.as_ref(), &event("anon", "$pageview", json!({}), 2)).await;
        let client = pool.get().await.expect("connection");
        for (person, flag, hash) in [
            (&target.person, "shared", "target-hash"),
            (&source.person, "shared", "source-hash"),
            (&source.person, "only-source", "source-only-hash"),
        ] {
            client
                .execute(
                    "INSERT INTO posthog_featureflaghashkeyoverride \
                     (team_id, person_id, feature_flag_key, hash_key) VALUES (2, $1, $2, $3)",
                    &[&person.id, &flag, &hash],
                )
                .await
                .expect("override");
        }
        run(
            store.as_ref(),
            &event(
                "user",
                "$identify",
                json!({ "$anon_distinct_id": "anon" }),
                3,
            ),
        )
        .await;
        let rows = client
            .query(
                "SELECT person_id, feature_flag_key, hash_key \
                 FROM posthog_featureflaghashkeyoverride ORDER BY feature_flag_key",
                &[],
            )
            .await
            .expect("overrides");
        let overrides: Vec<(i64, String, String)> = rows
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(
            overrides,
            vec![
                (
                    target.person.id,
                    "only-source".to_owned(),
                    "source-only-hash".to_owned()
                ),
                (
                    target.person.id,
                    "shared".to_owned(),
                    "target-hash".to_owned()
                ),
            ]
        );
    }

    /// A value Postgres refuses (a distinct id longer than its column) loses the writes it
    /// shares a statement with, and only those: the updates beside them are stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_create_on_postgres_loses_only_the_creates() {
        use crate::persons::store::{PersonVersion, PersonWrite, WriteOutcome};

        let store = postgres_store(51).await;
        let person = run(store.as_ref(), &event("u", "$pageview", json!({}), 1))
            .await
            .person;
        let mut changed = (*person).clone();
        changed.properties.insert("v".to_owned(), json!(1));
        let too_long = "x".repeat(500);
        let outcomes = store
            .write_batch(&[
                PersonWrite::Create {
                    distinct_id: too_long.clone(),
                    person: NewPerson {
                        uuid: uuid_from_distinct_id(TEAM, &too_long),
                        team_id: TEAM,
                        created_at: at(2),
                        properties: Map::new(),
                        properties_last_operation: Map::new(),
                        is_identified: false,
                    },
                },
                PersonWrite::Update {
                    distinct_id: "u".to_owned(),
                    person: changed.clone(),
                },
            ])
            .await
            .expect("the store answered");
        assert_eq!(outcomes[0], WriteOutcome::Lost);
        assert_eq!(
            outcomes[1],
            WriteOutcome::Stored(PersonVersion {
                id: changed.id,
                version: person.version + 1,
            })
        );
        assert!(person_of(store.as_ref(), &too_long).await.is_none());
    }

    /// More updates than one statement takes: the ranges written at once on separate
    /// connections store every person, once, at the next version.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_many_updates_on_postgres_stores_each_person_once() {
        use crate::persons::store::{PersonWrite, WriteOutcome};

        const PERSONS: usize = 6_000;
        let store = postgres_store(52).await;
        let ids: Vec<String> = (0..PERSONS).map(|n| format!("many-{n}")).collect();
        let creates: Vec<PersonWrite> = ids
            .iter()
            .map(|id| PersonWrite::Create {
                distinct_id: id.clone(),
                person: NewPerson {
                    uuid: uuid_from_distinct_id(TEAM, id),
                    team_id: TEAM,
                    created_at: at(1),
                    properties: props(json!({ "n": 0 })),
                    properties_last_operation: Map::new(),
                    is_identified: false,
                },
            })
            .collect();
        let created: Vec<Person> = store
            .write_batch(&creates)
            .await
            .expect("create")
            .into_iter()
            .zip(&creates)
            .map(|(outcome, write)| match (outcome, write) {
                (WriteOutcome::Stored(stored), PersonWrite::Create { person, .. }) => {
                    person.clone().stored(stored.id)
                }
                _ => panic!("a free id's person was not created"),
            })
            .collect();
        let updates: Vec<PersonWrite> = ids
            .iter()
            .zip(&created)
            .map(|(id, person)| {
                let mut changed = person.clone();
                changed.properties.insert("n".to_owned(), json!(1));
                PersonWrite::Update {
                    distinct_id: id.clone(),
                    person: changed,
                }
            })
            .collect();
        let outcomes = store.write_batch(&updates).await.expect("update");
        for (outcome, before) in outcomes.iter().zip(&created) {
            let WriteOutcome::Stored(after) = outcome else {
                panic!("person {} was not updated", before.id);
            };
            assert_eq!((after.id, after.version), (before.id, before.version + 1));
        }
        for id in [&ids[0], &ids[PERSONS / 2], &ids[PERSONS - 1]] {
            let stored = person_of(store.as_ref(), id).await.expect("person");
            assert_eq!(
                (stored.properties["n"].clone(), stored.version),
                (json!(1), 1)
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_person_step_on_postgres() {
        scenarios!(postgres_store);
    }

    /// The race many times over: each round, two identifies of one new user from two
    /// anonymous ids run at once on separate connections.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_identifies_on_postgres_never_split_or_lose_properties() {
        let store = postgres_store(99).await;
        for round in 0..20 {
            let user = format!("user-{round}");
            let anons = [format!("a-{round}"), format!("b-{round}")];
            for anon in &anons {
                run(
                    store.as_ref(),
                    &event(anon, "$pageview", json!({ "$set": { anon.clone(): 1 } }), 1),
                )
                .await;
            }
            let events: Vec<PersonEvent> = anons
                .iter()
                .map(|anon| {
                    event(
                        &user,
                        "$identify",
                        json!({ "$anon_distinct_id": anon, "$set": { format!("via_{anon}"): true } }),
                        2,
                    )
                })
                .collect();
            let tasks: Vec<_> = events
                .into_iter()
                .map(|event| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move { resolve(store.as_ref(), &event, 10).await })
                })
                .collect();
            for task in tasks {
                task.await.expect("task").expect("identify");
            }
            let person = person_of(store.as_ref(), &user).await.expect("user");
            for anon in &anons {
                assert_eq!(
                    person_of(store.as_ref(), anon).await.map(|p| p.id),
                    Some(person.id),
                    "round {round}: {anon} split off"
                );
                assert_eq!(person.properties[anon.as_str()], json!(1), "round {round}");
                assert_eq!(
                    person.properties[format!("via_{anon}").as_str()],
                    json!(true),
                    "round {round}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_rolled_back_move_leaves_the_memory_store_able_to_merge_later() {
    let store = MemoryPersonStore::new();
    let user = run(&store, &event("user", "$pageview", json!({}), 1)).await;
    let anon = run(&store, &event("anon", "$pageview", json!({}), 2)).await;
    {
        let mut transaction = store.begin().await.expect("begin");
        let moved = transaction
            .move_distinct_ids(&anon.person, &user.person)
            .await
            .expect("move");
        assert_eq!(moved.len(), 1);
    }
    assert_eq!(
        person_of(&store, "anon").await.map(|p| p.id),
        Some(anon.person.id),
        "the move was rolled back"
    );
    let merged = run(
        &store,
        &event(
            "user",
            "$identify",
            json!({ "$anon_distinct_id": "anon" }),
            3,
        ),
    )
    .await;
    assert_eq!(
        merged.distinct_id_rows.len(),
        1,
        "anon's id moved this time"
    );
    assert_eq!(
        person_of(&store, "anon").await.map(|p| p.id),
        Some(user.person.id)
    );
}
