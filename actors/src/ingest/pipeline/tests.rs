use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::*;
use crate::ingest::sinks::{EventSink, JsonLinesConfig, JsonLinesSink};
use crate::ingest::teams::{EmbeddedTeamStore, TeamCacheConfig, TeamStore};
use crate::ingest::writer::{EventWriterConfig, WriterMetrics};
use crate::system::health::{Health, HealthConfig, ProgressReporter};
use crate::system::stats::ActorRegistry;
use crate::system::supervisor::{SpawnOptions, spawn_supervised};

/// Knows exactly one token, `phc_known`, as team 1; and team 2 (by id) with anonymize_ips.
struct TwoTeams(EmbeddedTeamStore);

#[async_trait]
impl TeamStore for TwoTeams {
    async fn by_token(&self, token: &str) -> Result<Option<Team>, TeamStoreError> {
        if token != "phc_known" {
            return Ok(None);
        }
        self.0.by_token(token).await
    }

    async fn by_id(&self, id: i64) -> Result<Option<Team>, TeamStoreError> {
        let team = self.0.by_id(id).await?;
        Ok(team.map(|mut team| {
            team.anonymize_ips = team.id == 2;
            team
        }))
    }
}

struct Harness {
    pipeline: ObservedAddr<IngestionPipeline>,
    data: tempfile::TempDir,
}

impl Harness {
    async fn ingest(&self, messages: Vec<Vec<u8>>) -> Result<BatchOutcome, PipelineError> {
        self.pipeline
            .send(IngestBatch {
                messages: Arc::new(messages.into_iter().collect()),
                overflow: false,
                turn: None,
            })
            .await
            .expect("delivered")
    }
}

async fn start() -> Harness {
    start_with_persons(None).await
}

async fn start_with_persons(persons: Option<Arc<PersonManager>>) -> Harness {
    start_with(persons, true).await
}

async fn start_with(persons: Option<Arc<PersonManager>>, forward_recordings: bool) -> Harness {
    let data = tempfile::tempdir().expect("tempdir");
    let metrics = Metrics::new().expect("metrics");
    let registry = ActorRegistry::new(metrics.clone());
    let health = spawn_supervised(&registry, SpawnOptions::new("health"), |stats| {
        Health::new(
            HealthConfig {
                max_stale: Duration::from_secs(7200),
            },
            stats,
        )
    });
    let sink: Arc<dyn EventSink> =
        Arc::new(JsonLinesSink::open(&JsonLinesConfig::under(data.path())).expect("sink"));
    let writer_metrics = WriterMetrics::register(&metrics).expect("metrics");
    let health_addr = health.addr().clone();
    let writer = spawn_supervised(&registry, SpawnOptions::new("event_writer"), move |stats| {
        let progress = ProgressReporter::new("event_writer", &health_addr, Arc::clone(&stats));
        EventWriter::new(
            EventWriterConfig {
                flush_interval: Duration::from_millis(10),
                ..EventWriterConfig::default()
            },
            Arc::clone(&sink),
            stats,
            writer_metrics.clone(),
            progress,
        )
    });
    let store = TwoTeams(EmbeddedTeamStore::new());
    // Create teams 1 (phc_known) and 2 (phc_anonymous) in that order.
    store.0.by_token("phc_known").await.expect("team");
    store.0.by_token("phc_anonymous").await.expect("team");
    let teams = Arc::new(TeamManager::new(
        Arc::new(store),
        TeamCacheConfig::default(),
    ));
    let pipeline_metrics = PipelineMetrics::register(&metrics).expect("metrics");
    let pipeline = spawn_supervised(&registry, SpawnOptions::new("pipeline"), move |stats| {
        let pipeline = IngestionPipeline::new(
            PipelineConfig {
                limits: EnvelopeLimits {
                    max_message_bytes: 10_000,
                },
                forward_recordings,
            },
            Arc::clone(&teams),
            writer.clone(),
            stats,
            &metrics,
            pipeline_metrics.clone(),
        );
        match &persons {
            Some(persons) => pipeline.with_persons(Arc::clone(persons)),
            None => pipeline,
        }
    });
    Harness { pipeline, data }
}

fn envelope(event: Value, outer: Value) -> Vec<u8> {
    let mut message = json!({
        "distinct_id": "user-1",
        "ip": "1.2.3.4",
        "site_url": "https://example.com",
        "now": "2026-11-23T05:00:00.000Z",
        "sent_at": "2026-11-23T05:10:00.000Z",
        "uuid": uuid::Uuid::now_v7().to_string(),
        "token": "phc_known",
        "data": event.to_string(),
    });
    if let (Some(message), Value::Object(outer)) = (message.as_object_mut(), outer) {
        message.extend(outer);
    }
    serde_json::to_vec(&message).expect("json")
}

fn read_lines(dir: &std::path::Path, kind: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir.join("data")).expect("data dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&format!("{kind}-")) {
            let text = std::fs::read_to_string(&path).expect("read");
            lines.extend(
                text.lines()
                    .map(|line| serde_json::from_str::<Value>(line).expect("json line")),
            );
        }
    }
    lines
}

#[actix::test]
async fn good_events_are_written_and_each_bad_kind_is_dead_lettered() {
    let harness = start().await;
    let good = envelope(
        json!({"event": "$pageview", "properties": {"$current_url": "https://example.com/a"}, "timestamp": "2026-11-23T05:08:00.000Z"}),
        json!({}),
    );
    let anonymous_team = envelope(
        json!({"event": "signup", "properties": {}}),
        json!({"team_id": 2, "token": null}),
    );
    let messages = vec![
        good,
        b"{not json".to_vec(),
        vec![b'{', 0xff, 0xfe, b'}'],
        envelope(json!({"event": "x"}), json!({"token": null})),
        envelope(json!({"event": "x"}), json!({"token": "phc_unknown"})),
        envelope(
            json!({"event": "x", "properties": {"blob": "y".repeat(20_000)}}),
            json!({}),
        ),
        envelope(json!({"event": ""}), json!({})),
        envelope(json!({"event": "x"}), json!({"uuid": "not-a-uuid"})),
        anonymous_team,
    ];
    let outcome = harness.ingest(messages).await.expect("ingested");
    assert_eq!(outcome.written, 2);
    assert_eq!(outcome.dead_lettered, 7);

    let events = read_lines(harness.data.path(), "events");
    assert_eq!(events.len(), 2);
    let pageview = events
        .iter()
        .find(|e| e["event"] == "$pageview")
        .expect("pageview");
    assert_eq!(pageview["team_id"], 1);
    assert_eq!(pageview["distinct_id"], "user-1");
    // Clock skew corrected: now 05:00 + (05:08 - 05:10) = 04:58.
    assert_eq!(pageview["timestamp"], "2026-11-23 04:58:00.000");
    let properties: Value =
        serde_json::from_str(pageview["properties"].as_str().expect("string")).expect("json");
    assert_eq!(properties["$ip"], "1.2.3.4");
    assert_eq!(properties["$current_url"], "https://example.com/a");

    let signup = events
        .iter()
        .find(|e| e["event"] == "signup")
        .expect("signup");
    assert_eq!(signup["team_id"], 2);
    let properties: Value =
        serde_json::from_str(signup["properties"].as_str().expect("string")).expect("json");
    assert!(
        properties.get("$ip").is_none(),
        "anonymize_ips keeps the ip out"
    );

    let letters = read_lines(harness.data.path(), "dead_letters");
    let mut reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"].as_str().expect("reason"))
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            "event_too_large",
            "illegal_event_name",
            "invalid_json",
            "invalid_token",
            "invalid_utf8",
            "invalid_uuid",
            "no_token",
        ]
    );
    for letter in &letters {
        assert!(
            !letter["raw_payload"].as_str().expect("raw").is_empty(),
            "{letter}"
        );
        assert!(
            letter["error"]
                .as_str()
                .expect("error")
                .starts_with("ingestEvent failed. Error: "),
            "{letter}"
        );
    }
}

/// Where recordings cannot be forwarded (ClickHouse without Kafka), they are dead-lettered
/// with their message as it came instead of vanishing; where they can, they go on unchanged.
#[actix::test]
async fn session_recordings_without_a_destination_are_dead_lettered() {
    let recording = || {
        envelope(
            json!({"event": "$snapshot", "properties": {"$session_id": "s1", "$snapshot_data": {"x": 1}}}),
            json!({}),
        )
    };
    let pageview = || envelope(json!({"event": "$pageview", "properties": {}}), json!({}));

    let harness = start_with(None, false).await;
    let outcome = harness
        .ingest(vec![recording(), pageview()])
        .await
        .expect("ingested");
    assert_eq!((outcome.written, outcome.dead_lettered), (1, 1));
    let letters = read_lines(harness.data.path(), "dead_letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["reason"], "recording_not_forwarded");
    assert!(
        letters[0]["raw_payload"]
            .as_str()
            .is_some_and(|raw| raw.contains("$snapshot_data")),
        "{letters:?}"
    );

    let harness = start().await;
    let outcome = harness
        .ingest(vec![recording(), pageview()])
        .await
        .expect("ingested");
    assert_eq!(outcome.dead_lettered, 0);
    assert_eq!(
        read_lines(harness.data.path(), "session_recording_events").len(),
        1
    );
}

#[actix::test]
async fn an_empty_batch_is_fine() {
    let harness = start().await;
    let outcome = harness
        .pipeline
        .send(IngestBatch {
            messages: Arc::new(Payloads::new()),
            overflow: false,
            turn: None,
        })
        .await
        .expect("delivered")
        .expect("ingested");
    assert_eq!(outcome, BatchOutcome::default());
}

/// The in-process person store, except that the distinct id `rejected` is refused and
/// `unreachable` finds the store down.
#[derive(Default)]
struct TroubledPersons(crate::persons::MemoryPersonStore);

struct TroubledTransaction<'a>(Box<dyn crate::persons::store::PersonTransaction + 'a>);

#[async_trait]
impl crate::persons::PersonStore for TroubledPersons {
    fn name(&self) -> &'static str {
        "troubled"
    }

    async fn begin(
        &self,
    ) -> Result<Box<dyn crate::persons::store::PersonTransaction + '_>, PersonStoreError> {
        Ok(Box::new(TroubledTransaction(self.0.begin().await?)))
    }

    async fn snapshot(
        &self,
        keys: &[crate::persons::SnapshotKey<'_>],
    ) -> Result<Vec<Option<crate::persons::SnapshotEntry>>, PersonStoreError> {
        if keys.iter().any(|key| key.distinct_id == "unreachable") {
            return Err(PersonStoreError::Unavailable(
                "connection refused".to_owned(),
            ));
        }
        self.0.snapshot(keys).await
    }
}

#[async_trait]
impl crate::persons::store::PersonTransaction for TroubledTransaction<'_> {
    async fn person_by_distinct_id(
        &mut self,
        team_id: i64,
        distinct_id: &str,
    ) -> Result<Option<crate::persons::Person>, PersonStoreError> {
        match distinct_id {
            "rejected" => Err(PersonStoreError::Rejected("value too long".to_owned())),
            "unreachable" => Err(PersonStoreError::Unavailable(
                "connection refused".to_owned(),
            )),
            _ => self.0.person_by_distinct_id(team_id, distinct_id).await,
        }
    }

    async fn create_person(
        &mut self,
        person: crate::persons::store::NewPerson,
        distinct_ids: &[&str],
    ) -> Result<crate::persons::Person, PersonStoreError> {
        // Where Postgres refuses a value: on insert.
        if distinct_ids.contains(&"rejected") {
            return Err(PersonStoreError::Rejected("value too long".to_owned()));
        }
        self.0.create_person(person, distinct_ids).await
    }

    async fn add_distinct_id(
        &mut self,
        person: &crate::persons::Person,
        distinct_id: &str,
    ) -> Result<(), PersonStoreError> {
        self.0.add_distinct_id(person, distinct_id).await
    }

    async fn update_person(
        &mut self,
        person: &crate::persons::Person,
    ) -> Result<crate::persons::Person, PersonStoreError> {
        self.0.update_person(person).await
    }

    async fn move_distinct_ids(
        &mut self,
        source: &crate::persons::Person,
        target: &crate::persons::Person,
    ) -> Result<Vec<crate::persons::store::MovedDistinctId>, PersonStoreError> {
        self.0.move_distinct_ids(source, target).await
    }

    async fn delete_person(
        &mut self,
        person: &crate::persons::Person,
    ) -> Result<(), PersonStoreError> {
        self.0.delete_person(person).await
    }

    async fn commit(self: Box<Self>) -> Result<(), PersonStoreError> {
        self.0.commit().await
    }
}

fn troubled_persons() -> Arc<PersonManager> {
    Arc::new(PersonManager::new(
        Arc::new(TroubledPersons::default()),
        crate::persons::PersonConfig::default(),
    ))
}

#[actix::test]
async fn rows_carry_their_person_and_a_refused_person_dead_letters_only_its_event() {
    let harness = start_with_persons(Some(troubled_persons())).await;
    let messages = vec![
        envelope(
            json!({"event": "$pageview", "properties": {"$set": {"plan": "pro"}}}),
            json!({}),
        ),
        envelope(
            json!({"event": "$pageview"}),
            json!({"distinct_id": "rejected"}),
        ),
        envelope(json!({"event": "second"}), json!({})),
    ];
    let outcome = harness.ingest(messages).await.expect("ingested");
    assert_eq!((outcome.written, outcome.dead_lettered), (2, 1));

    let events = read_lines(harness.data.path(), "events");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["person_id"], events[1]["person_id"]);
    assert_ne!(events[0]["person_id"], uuid::Uuid::nil().to_string());
    for event in &events {
        let person: Value =
            serde_json::from_str(event["person_properties"].as_str().expect("string"))
                .expect("json");
        assert_eq!(person["plan"], "pro", "{event}");
    }
    let persons = read_lines(harness.data.path(), "person");
    assert_eq!(
        persons.len(),
        1,
        "one version: the second event changed nothing"
    );
    assert_eq!(persons[0]["id"], events[0]["person_id"]);
    assert_eq!(
        read_lines(harness.data.path(), "person_distinct_id").len(),
        1
    );
    let letters = read_lines(harness.data.path(), "dead_letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "person_rejected");
    assert_eq!(letters[0]["distinct_id"], "rejected");
}

#[actix::test]
async fn a_person_store_that_cannot_answer_fails_the_batch_for_a_retry() {
    let harness = start_with_persons(Some(troubled_persons())).await;
    let messages = vec![
        envelope(json!({"event": "$pageview"}), json!({})),
        envelope(
            json!({"event": "$pageview"}),
            json!({"distinct_id": "unreachable"}),
        ),
    ];
    let outcome = harness.ingest(messages).await;
    assert!(
        matches!(outcome, Err(PipelineError::Persons(_))),
        "{outcome:?}"
    );
    // Nothing of the batch was written, so a retry stores it exactly once.
    let written = std::fs::read_dir(harness.data.path().join("data"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(written, 0);
}

/// The in-process person store, except that the first transaction stops at `begin` until the
/// test lets it go: a batch's person step caught mid-flight.
struct FirstBeginHeld {
    inner: crate::persons::MemoryPersonStore,
    hold: std::sync::Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::sync::oneshot::Receiver<()>,
        )>,
    >,
}

impl FirstBeginHeld {
    /// The store, a receiver told when the first `begin` is reached, and its release.
    fn new() -> (
        Arc<Self>,
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (entered, on_entered) = tokio::sync::oneshot::channel();
        let (release, on_release) = tokio::sync::oneshot::channel();
        let store = Arc::new(Self {
            inner: crate::persons::MemoryPersonStore::new(),
            hold: std::sync::Mutex::new(Some((entered, on_release))),
        });
        (store, on_entered, release)
    }

    async fn person(&self, distinct_id: &str) -> crate::persons::Person {
        use crate::persons::PersonStore as _;
        let key = (1, distinct_id.to_owned());
        self.inner
            .persons_by_distinct_ids(std::slice::from_ref(&key))
            .await
            .expect("read")
            .remove(&key)
            .expect("person")
    }
}

#[async_trait]
impl crate::persons::PersonStore for FirstBeginHeld {
    fn name(&self) -> &'static str {
        "first-begin-held"
    }

    async fn begin(
        &self,
    ) -> Result<Box<dyn crate::persons::store::PersonTransaction + '_>, PersonStoreError> {
        let hold = self
            .hold
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((entered, release)) = hold {
            let _ = entered.send(());
            let _ = release.await;
        }
        self.inner.begin().await
    }

    async fn snapshot(
        &self,
        keys: &[crate::persons::SnapshotKey<'_>],
    ) -> Result<Vec<Option<crate::persons::SnapshotEntry>>, PersonStoreError> {
        self.inner.snapshot(keys).await
    }
}

async fn ingest_in_turn(
    pipeline: ObservedAddr<IngestionPipeline>,
    messages: Vec<Vec<u8>>,
    turn: Option<Arc<BatchTurn>>,
) -> BatchOutcome {
    pipeline
        .send(IngestBatch {
            messages: Arc::new(messages.into_iter().collect()),
            overflow: false,
            turn,
        })
        .await
        .expect("delivered")
        .expect("ingested")
}

/// Two batches in flight, each with one `$set` of the same user; the first batch's person
/// transaction is held at `begin` while the second batch arrives. Returns the person's final
/// `seen` and version.
async fn two_batches_race(with_turns: bool) -> (Value, i64) {
    use crate::ingest::order::KeyOrder;

    let (store, entered, release) = FirstBeginHeld::new();
    let manager = Arc::new(PersonManager::new(
        Arc::clone(&store) as Arc<dyn crate::persons::PersonStore>,
        crate::persons::PersonConfig {
            cache_size: 0,
            ..crate::persons::PersonConfig::default()
        },
    ));
    let harness = start_with_persons(Some(manager)).await;
    let order = KeyOrder::new();
    let (first_turn, second_turn) = if with_turns {
        (
            Some(Arc::new(order.next_turn())),
            Some(Arc::new(order.next_turn())),
        )
    } else {
        (None, None)
    };
    let set = |seen: u32| {
        vec![envelope(
            json!({"event": "$pageview", "properties": {"$set": {"seen": seen}}}),
            json!({}),
        )]
    };
    let first = actix::spawn(ingest_in_turn(
        harness.pipeline.clone(),
        set(1),
        first_turn.clone(),
    ));
    entered
        .await
        .expect("the first batch reached its transaction");
    let second = actix::spawn(ingest_in_turn(
        harness.pipeline.clone(),
        set(2),
        second_turn,
    ));
    let second = if with_turns {
        // The second batch must wait for the first; give it every chance not to.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the second batch overtook the first");
        Some(second)
    } else {
        // Nothing orders them: the second batch creates the person first.
        second.await.expect("second batch");
        None
    };
    let _ = release.send(());
    first.await.expect("first batch");
    // The consumer drops a batch's turn once it is stored.
    drop(first_turn);
    if let Some(second) = second {
        second.await.expect("second batch");
    }
    let person = store.person("user-1").await;
    (person.properties["seen"].clone(), person.version)
}

/// Issue 23: with two batches in flight, a later batch's `$set` landed first and the earlier
/// batch's, computed on the now-current row, overwrote it: `seen` ended at 1, version 1, while
/// the later event's row said 2. This pins that interleaving.
#[actix::test]
async fn unordered_batches_of_one_user_lose_the_later_update() {
    assert_eq!(two_batches_race(false).await, (json!(1), 1));
}

#[actix::test]
async fn batch_turns_apply_one_users_updates_in_read_order() {
    assert_eq!(two_batches_race(true).await, (json!(2), 1));
}

/// A batch releases its distinct ids once its person changes are applied, so the next batch of
/// the same user goes on while it is still being written; and when the batch is tried again
/// (its write failed), it reuses its person answers instead of applying its `$set` again over
/// the later batch's.
#[actix::test]
async fn a_retried_batch_reuses_its_person_step_and_does_not_undo_a_later_batch() {
    use crate::ingest::order::KeyOrder;
    use crate::persons::PersonStore as _;

    let store = Arc::new(crate::persons::MemoryPersonStore::new());
    let manager = Arc::new(PersonManager::new(
        Arc::clone(&store) as Arc<dyn crate::persons::PersonStore>,
        crate::persons::PersonConfig::default(),
    ));
    let harness = start_with_persons(Some(manager)).await;
    let order = KeyOrder::new();
    let first_turn = Arc::new(order.next_turn());
    let second_turn = Arc::new(order.next_turn());
    let set = |seen: u32| {
        vec![envelope(
            json!({"event": "$pageview", "properties": {"$set": {"seen": seen}}}),
            json!({}),
        )]
    };
    let first = set(1);
    ingest_in_turn(
        harness.pipeline.clone(),
        first.clone(),
        Some(Arc::clone(&first_turn)),
    )
    .await;
    // The first batch's turn lives on (its offsets are not committed yet): the second batch
    // must not wait for it.
    tokio::time::timeout(
        Duration::from_secs(5),
        ingest_in_turn(harness.pipeline.clone(), set(2), Some(second_turn)),
    )
    .await
    .expect("the second batch waited for the first one's end");
    // The first batch again, as after a failed write.
    ingest_in_turn(harness.pipeline.clone(), first, Some(first_turn)).await;

    let key = (1, "user-1".to_owned());
    let person = store
        .persons_by_distinct_ids(std::slice::from_ref(&key))
        .await
        .expect("read")
        .remove(&key)
        .expect("person");
    assert_eq!(
        (person.properties["seen"].clone(), person.version),
        (json!(2), 1),
        "the retry changed the person again"
    );
    let events = read_lines(harness.data.path(), "events");
    assert_eq!(events.len(), 3);
    let seen_in_rows: Vec<Value> = events
        .iter()
        .map(|event| {
            let person: Value =
                serde_json::from_str(event["person_properties"].as_str().expect("string"))
                    .expect("json");
            person["seen"].clone()
        })
        .collect();
    assert_eq!(seen_in_rows, [json!(1), json!(2), json!(1)]);
}

/// A retry reuses its first attempt's person answers only for the same events.
#[test]
fn a_batch_fingerprint_changes_with_any_events_team_id_uuid_or_name() {
    let team = |id: i64| {
        Arc::new(Team {
            id,
            uuid: uuid::Uuid::nil(),
            organization_id: uuid::Uuid::nil(),
            api_token: format!("token-{id}"),
            name: "team".to_owned(),
            anonymize_ips: false,
            session_recording_opt_in: false,
            ingested_event: true,
            slack_incoming_webhook: None,
            timezone: "UTC".to_owned(),
        })
    };
    let stamped = |changes: &dyn Fn(&mut StampedEvent) -> Option<i64>| {
        let events = (0..3u128)
            .map(|n| {
                let mut event = StampedEvent {
                    event: Box::new(PluginEvent::for_test("e", json!({}))),
                    uuid: uuid::Uuid::from_u128(n + 1),
                    timestamp: Utc::now(),
                };
                event.event.distinct_id = format!("user-{n}");
                let team_id = if n == 1 { changes(&mut event) } else { None };
                (event, team(team_id.unwrap_or(2)))
            })
            .collect();
        Stamped {
            events,
            process_person: vec![true; 3],
            dead_letters: Vec::new(),
            warnings: Vec::new(),
            dropped_personless: 0,
        }
        .fingerprint()
    };
    let same = stamped(&|_| None);
    assert_eq!(same, stamped(&|_| None));
    assert_ne!(same, stamped(&|_| Some(3)));
    assert_ne!(
        same,
        stamped(&|event| {
            event.uuid = uuid::Uuid::from_u128(99);
            None
        })
    );
    assert_ne!(
        same,
        stamped(&|event| {
            event.event.distinct_id = "other".to_owned();
            None
        })
    );
    assert_ne!(
        same,
        stamped(&|event| {
            event.event.event = "renamed".to_owned();
            None
        })
    );
}
