//! Persons end to end: events captured over HTTP by the built binary (no Kafka: capture goes
//! straight into the pipeline, which answers once the rows are stored) change `posthog_person`
//! and `posthog_persondistinctid` in a fresh Postgres database, mirror every change into
//! ClickHouse's `person` and `person_distinct_id`, and stamp each event row with its person.
//! Then two instances identify the same users at once.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::common::{
    FreshPostgres, ServerProcess, clickhouse_http_url, clickhouse_query, migrate, unique_name,
};

struct Deployment {
    postgres: FreshPostgres,
    clickhouse_database: String,
    token: String,
    team_id: i32,
}

impl Deployment {
    async fn create() -> Self {
        let postgres = FreshPostgres::create().await;
        let mut deployment = Self {
            postgres,
            clickhouse_database: unique_name("ps_persons"),
            token: unique_name("phc"),
            team_id: 0,
        };
        let env = deployment.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        migrate(&env);
        let client = deployment.postgres.client().await;
        let organization: uuid::Uuid = client
            .query_one(
                "INSERT INTO posthog_organization (id, name) VALUES (gen_random_uuid(), 'Org') RETURNING id",
                &[],
            )
            .await
            .expect("organization")
            .get(0);
        deployment.team_id = client
            .query_one(
                "INSERT INTO posthog_team (organization_id, api_token, name) VALUES ($1, $2, 'Team') RETURNING id",
                &[&organization, &deployment.token],
            )
            .await
            .expect("team")
            .get(0);
        deployment
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.postgres.url.clone()),
            ("CLICKHOUSE_HOST", clickhouse_http_url()),
            ("CLICKHOUSE_DATABASE", self.clickhouse_database.clone()),
            ("KAFKA_FLUSH_FREQUENCY_MS", "20".to_owned()),
        ]
    }

    fn start_server(&self) -> ServerProcess {
        ServerProcess::start(&self.env())
    }

    /// PostHog's `/batch` endpoint; returns once the server stored the events.
    async fn capture(&self, addr: &str, events: Vec<Value>) {
        let response = reqwest::Client::new()
            .post(format!("http://{addr}/batch"))
            .json(&json!({ "api_key": self.token, "batch": events }))
            .send()
            .await
            .expect("capture answered");
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }

    /// distinct id → (person uuid, properties, is_identified, version), from Postgres.
    async fn postgres_persons(&self) -> BTreeMap<String, (uuid::Uuid, Value, bool, i64)> {
        let client = self.postgres.client().await;
        let rows = client
            .query(
                "SELECT d.distinct_id, p.uuid, p.properties, p.is_identified, p.version \
                 FROM posthog_persondistinctid d JOIN posthog_person p ON p.id = d.person_id \
                 WHERE d.team_id = $1",
                &[&self.team_id],
            )
            .await
            .expect("persons");
        rows.iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3), row.get(4))))
            .collect()
    }

    async fn person_count(&self) -> i64 {
        let client = self.postgres.client().await;
        client
            .query_one(
                "SELECT count(*) FROM posthog_person WHERE team_id = $1",
                &[&self.team_id],
            )
            .await
            .expect("count")
            .get(0)
    }

    async fn clickhouse_rows(&self, sql: &str) -> Vec<Value> {
        let text = clickhouse_query(&format!("{sql} FORMAT JSONEachRow")).await;
        text.lines()
            .map(|line| serde_json::from_str(line).expect("row"))
            .collect()
    }

    async fn drop(self) {
        clickhouse_query(&format!(
            "DROP DATABASE IF EXISTS {}",
            self.clickhouse_database
        ))
        .await;
        self.postgres.drop_database().await;
    }
}

fn event(name: &str, distinct_id: &str, properties: Value) -> Value {
    json!({
        "event": name,
        "distinct_id": distinct_id,
        "uuid": uuid::Uuid::now_v7().to_string(),
        "properties": properties,
    })
}

#[tokio::test]
async fn person_operations_reach_postgres_clickhouse_and_the_event_rows() {
    plugin_server::telemetry::install_tls_provider();
    let deployment = Deployment::create().await;
    let server = deployment.start_server();
    let addr = server.addr();
    let capture = async |events: Vec<Value>| deployment.capture(&addr, events).await;

    // 1. First sight, $set and $set_once; 2. $set_once does not overwrite, $unset deletes.
    capture(vec![event(
        "$pageview",
        "anon-1",
        json!({ "$set": { "plan": "free", "temp": 1 }, "$set_once": { "first_seen": "a" } }),
    )])
    .await;
    capture(vec![event(
        "$pageview",
        "anon-1",
        json!({ "$set_once": { "first_seen": "b" }, "$unset": ["temp"] }),
    )])
    .await;
    // 3. Identify: the user id joins the anonymous person, which becomes identified.
    capture(vec![event(
        "$identify",
        "user-1",
        json!({ "$anon_distinct_id": "anon-1", "$set": { "email": "u1@example.com" } }),
    )])
    .await;
    // 4. A second anonymous person, then an alias that merges it into the user.
    capture(vec![event(
        "$pageview",
        "anon-2",
        json!({ "$set": { "plan": "trial", "source": "ad" } }),
    )])
    .await;
    capture(vec![event(
        "$create_alias",
        "user-1",
        json!({ "alias": "anon-2" }),
    )])
    .await;
    // 5. An illegal id is refused with a warning and merges nothing.
    capture(vec![event(
        "$identify",
        "user-1",
        json!({ "$anon_distinct_id": "undefined" }),
    )])
    .await;
    // 6. Two identified users merge only when asked dangerously.
    capture(vec![event(
        "$identify",
        "user-2",
        json!({ "$anon_distinct_id": "anon-3", "$set": { "team": "blue" } }),
    )])
    .await;
    capture(vec![event(
        "$create_alias",
        "user-1",
        json!({ "alias": "user-2" }),
    )])
    .await;
    let before_dangerous = deployment.postgres_persons().await;
    assert_ne!(before_dangerous["user-1"].0, before_dangerous["user-2"].0);
    capture(vec![event(
        "$merge_dangerously",
        "user-1",
        json!({ "alias": "user-2" }),
    )])
    .await;

    // Postgres: one person owns every id, with every property the rules leave.
    let persons = deployment.postgres_persons().await;
    let ids: Vec<&str> = persons.keys().map(String::as_str).collect();
    assert_eq!(ids, ["anon-1", "anon-2", "anon-3", "user-1", "user-2"]);
    let (uuid, properties, identified, version) = persons["user-1"].clone();
    for (id, person) in &persons {
        assert_eq!(person.0, uuid, "{id} belongs to the surviving person");
    }
    assert!(identified);
    assert_eq!(
        properties["plan"], "free",
        "the target's value wins a merge"
    );
    assert_eq!(properties["first_seen"], "a");
    assert_eq!(properties["email"], "u1@example.com");
    assert_eq!(properties["source"], "ad");
    assert_eq!(properties["team"], "blue");
    assert!(properties.get("temp").is_none());
    assert_eq!(deployment.person_count().await, 1);

    // ClickHouse: the latest version of each person and distinct id matches Postgres; the
    // merged-away people are marked deleted.
    let database = &deployment.clickhouse_database;
    let people = deployment
        .clickhouse_rows(&format!(
            "SELECT toString(id) AS id, properties, is_identified, is_deleted, version \
             FROM {database}.person FINAL WHERE team_id = {}",
            deployment.team_id
        ))
        .await;
    let live: Vec<&Value> = people.iter().filter(|row| row["is_deleted"] == 0).collect();
    assert_eq!(live.len(), 1, "{people:?}");
    assert_eq!(live[0]["id"], uuid.to_string());
    assert_eq!(
        live[0]["version"].as_str().map(str::to_owned),
        Some(version.to_string())
    );
    let stored: Value =
        serde_json::from_str(live[0]["properties"].as_str().expect("string")).expect("json");
    assert_eq!(stored, properties);
    assert_eq!(
        people.len(),
        3,
        "anon-2's and user-2's people were deleted: {people:?}"
    );

    let distinct_ids = deployment
        .clickhouse_rows(&format!(
            "SELECT distinct_id, toString(person_id) AS person_id \
             FROM {database}.person_distinct_id FINAL WHERE team_id = {}",
            deployment.team_id
        ))
        .await;
    let mapping: HashMap<String, String> = distinct_ids
        .iter()
        .map(|row| {
            (
                row["distinct_id"].as_str().expect("id").to_owned(),
                row["person_id"].as_str().expect("person").to_owned(),
            )
        })
        .collect();
    assert_eq!(mapping.len(), 5, "{mapping:?}");
    assert!(mapping.values().all(|person| *person == uuid.to_string()));

    // Events: each carries the person it had when it was ingested.
    let events = deployment
        .clickhouse_rows(&format!(
            "SELECT event, distinct_id, toString(person_id) AS person_id, person_properties, \
             toString(person_created_at) AS person_created_at \
             FROM {database}.events WHERE team_id = {} ORDER BY timestamp, _timestamp",
            deployment.team_id
        ))
        .await;
    assert_eq!(events.len(), 9);
    let first = events
        .iter()
        .find(|row| row["distinct_id"] == "anon-1")
        .expect("anon-1's events");
    assert_eq!(
        first["person_id"],
        uuid.to_string(),
        "anon-1's person survived"
    );
    assert_ne!(first["person_created_at"], "1970-01-01 00:00:00");
    let first_properties: Value =
        serde_json::from_str(first["person_properties"].as_str().expect("string")).expect("json");
    assert_eq!(first_properties["plan"], "free");
    let anon_two = events
        .iter()
        .find(|row| row["distinct_id"] == "anon-2")
        .expect("anon-2's pageview");
    assert_ne!(
        anon_two["person_id"],
        uuid.to_string(),
        "before the alias, anon-2 had its own person"
    );

    let warnings = deployment
        .clickhouse_rows(&format!(
            "SELECT type, details FROM {database}.ingestion_warnings WHERE team_id = {}",
            deployment.team_id
        ))
        .await;
    let kinds: Vec<&str> = warnings
        .iter()
        .filter_map(|row| row["type"].as_str())
        .collect();
    assert!(
        kinds.contains(&"cannot_merge_with_illegal_distinct_id"),
        "{warnings:?}"
    );
    assert!(
        kinds.contains(&"cannot_merge_already_identified"),
        "{warnings:?}"
    );

    drop(server);
    deployment.drop().await;
}

/// Two instances on one Postgres and ClickHouse, each identifying the same users from its own
/// anonymous id at the same moment: every user ends as one person with both sides'
/// properties, and ClickHouse agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_identifying_the_same_users_at_once_make_one_person_each() {
    plugin_server::telemetry::install_tls_provider();
    let deployment = Deployment::create().await;
    let servers = [deployment.start_server(), deployment.start_server()];
    let addrs: Vec<String> = servers.iter().map(ServerProcess::addr).collect();
    const USERS: usize = 200;

    for (side, addr) in ["a", "b"].iter().zip(&addrs) {
        let events = (0..USERS)
            .map(|user| {
                event(
                    "$pageview",
                    &format!("anon-{side}-{user}"),
                    json!({ "$set": { format!("seen_{side}"): true } }),
                )
            })
            .collect();
        deployment.capture(addr, events).await;
    }
    // Each instance gets one batch identifying every user from its side, both at once; each
    // instance works on several users concurrently, so the two meet on many of them.
    let deployment_ref = &deployment;
    let identifies = ["a", "b"].into_iter().zip(&addrs).map(|(side, addr)| {
        let events = (0..USERS)
            .map(|user| {
                event(
                    "$identify",
                    &format!("user-{user}"),
                    json!({
                        "$anon_distinct_id": format!("anon-{side}-{user}"),
                        "$set": { format!("via_{side}"): side },
                    }),
                )
            })
            .collect();
        async move { deployment_ref.capture(addr, events).await }
    });
    futures::future::join_all(identifies).await;

    let persons = deployment.postgres_persons().await;
    assert_eq!(deployment.person_count().await, USERS as i64);
    for user in 0..USERS {
        let (uuid, properties, identified, _) = &persons[&format!("user-{user}")];
        assert!(identified);
        for side in ["a", "b"] {
            assert_eq!(
                &persons[&format!("anon-{side}-{user}")].0,
                uuid,
                "user {user}: anon-{side} split off"
            );
            assert_eq!(
                properties[format!("seen_{side}")],
                true,
                "user {user}: {properties}"
            );
            assert_eq!(
                properties[format!("via_{side}")],
                side,
                "user {user}: {properties}"
            );
        }
    }
    let live = deployment
        .clickhouse_rows(&format!(
            "SELECT count() AS live FROM {}.person FINAL WHERE team_id = {} AND is_deleted = 0",
            deployment.clickhouse_database, deployment.team_id
        ))
        .await;
    assert_eq!(
        live[0]["live"],
        USERS.to_string(),
        "ClickHouse agrees with Postgres"
    );
    // How often the two instances really collided (timing decides, so it is reported, not
    // asserted): each collision is a transaction rolled back and retried.
    let mut conflicts = 0.0;
    for addr in &addrs {
        let metrics = crate::common::scrape_metrics(addr).await;
        conflicts +=
            crate::common::metric_value(&metrics, "person_transaction_conflicts_total", &[])
                .unwrap_or(0.0);
    }
    eprintln!("person transactions retried after losing a race: {conflicts}");

    drop(servers);
    deployment.drop().await;
}

/// Issue 23, as an operator found it: a backlog of `$set`s for 10,000 users on a 2-partition
/// topic, ten events per user spread over ten batches (of twenty, by CONSUMER_BATCH_SIZE),
/// consumed with batches in flight. Every person must end with its last event's properties
/// (PostHog applies one distinct id's events in order), and ClickHouse's newest person version
/// must say the same as Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_updates_apply_in_order_across_batches_in_flight() {
    use crate::ingestion::{
        Deployment as KafkaDeployment, envelope, produce_keyed, terminate, wait_for_up_to,
    };

    const USERS: usize = 10_000;
    const EVENTS: usize = 100_000;
    const BATCH: usize = 5_000;
    let deployment = KafkaDeployment::create().await;
    let messages: Vec<(String, Vec<u8>)> = (0..EVENTS)
        .map(|index| {
            let distinct_id = format!("user-{}", index % USERS);
            let payload = envelope(
                &deployment.token,
                &distinct_id,
                json!({
                    "event": "$pageview",
                    "properties": {"$set": {"plan": format!("p{}", index % 3), "seen": index}},
                }),
                json!({}),
            );
            (format!("{}:{distinct_id}", deployment.token), payload)
        })
        .collect();
    produce_keyed(&deployment.topic(), &messages).await;
    drop(messages);

    // Small batches, so that each user's ten events fall in ten of them.
    let (server, addr) =
        deployment.start_server_with(&[("CONSUMER_BATCH_SIZE", BATCH.to_string())]);
    wait_for_up_to(
        std::time::Duration::from_secs(900),
        "every event stored",
        async || (deployment.counts().await.1 == EVENTS as u64).then_some(()),
    )
    .await;
    let metrics = crate::common::scrape_metrics(&addr).await;
    let batches =
        crate::common::metric_value(&metrics, "kafka_consumer_batches_total", &[]).unwrap_or(0.0);
    assert!(
        batches >= (EVENTS / BATCH) as f64,
        "CONSUMER_BATCH_SIZE={BATCH} cuts {EVENTS} messages into at least {} batches, not {batches}",
        EVENTS / BATCH
    );
    terminate(server);
    // Every offset committed at the graceful stop. (Not `teardown`'s lag check: tansu reports
    // high watermarks short of the last offset for topics produced in multi-record batches.)
    assert_eq!(deployment.committed(), EVENTS as i64, "committed offsets");

    let persons = deployment.persons_by_distinct_id().await;
    assert_eq!(persons.len(), USERS, "one person per distinct id");
    let mut wrong = Vec::new();
    // person id → (properties, version), from Postgres.
    let mut postgres: HashMap<String, (Value, i64)> = HashMap::new();
    for (distinct_id, person) in &persons {
        let user: usize = distinct_id["user-".len()..].parse().expect("user number");
        let last = EVENTS - USERS + user;
        let properties = &person.properties;
        let version = person.version;
        if properties["seen"] != json!(last)
            || properties["plan"] != json!(format!("p{}", last % 3))
        {
            wrong.push(format!(
                "{distinct_id}: {properties} at version {version}, last event {last}"
            ));
        }
        postgres.insert(person.uuid.to_string(), (properties.clone(), version));
    }
    assert!(
        wrong.is_empty(),
        "{} of {USERS} persons are not at their last event, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    // ClickHouse's `person` rows: the highest version of each person is Postgres's row.
    let clickhouse = deployment.clickhouse_persons().await;
    let mut disagree = Vec::new();
    for (id, person) in &clickhouse {
        let (properties, version) = (&person.properties, person.version);
        match postgres.get(id) {
            Some((expected, expected_version))
                if expected == properties && *expected_version == version => {}
            other => disagree.push(format!(
                "{id}: ClickHouse {properties} v{version}, Postgres {other:?}"
            )),
        }
    }
    assert_eq!(clickhouse.len(), USERS, "one ClickHouse person per user");
    assert!(
        disagree.is_empty(),
        "{} persons differ between ClickHouse and Postgres, e.g. {:?}",
        disagree.len(),
        &disagree[..disagree.len().min(5)]
    );
    let versions: i64 = postgres.values().map(|(_, version)| version).sum();
    eprintln!(
        "persons in order: {USERS} users, {EVENTS} events, {versions} person versions (one per \
         user and batch that changed it)"
    );
    deployment.drop_databases().await;
}

/// Issue 21: three instances consume one topic while each user's two distinct ids (an
/// anonymous one and the user's own, on different Kafka keys and so often on partitions that
/// different instances read) count up with `$set`, and halfway through `$identify` merges the
/// two persons. Afterwards both counters update the merged person, from two instances where
/// the ids' partitions are read by different ones (the test checks that two instances did the
/// counting; how often their writes collided is timing, and reported). Every user must end as
/// one person holding each id's last value, in Postgres and in ClickHouse's newest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_counting_up_and_merging_the_same_persons_lose_no_update() {
    use crate::ingestion::{
        Deployment as KafkaDeployment, envelope, produce_keyed, wait_for, wait_for_up_to,
    };

    const USERS: usize = 300;
    const ROUNDS: usize = 16;
    plugin_server::telemetry::install_tls_provider();
    let deployment = KafkaDeployment::create().await;
    let servers: Vec<_> = (0..3).map(|_| deployment.start_server().0).collect();
    let keyed = |distinct_id: &str, event: Value| {
        (
            format!("{}:{distinct_id}", deployment.token),
            envelope(&deployment.token, distinct_id, event, json!({})),
        )
    };
    // Warm up until two instances are consuming (the topic has two partitions; the third
    // instance stands by), so that the counting below runs on two instances at once.
    let stored_by_each = async || {
        let mut stored = Vec::with_capacity(servers.len());
        for server in &servers {
            let metrics = crate::common::scrape_metrics(&server.addr()).await;
            stored.push(
                crate::common::metric_value(&metrics, "kafka_consumer_messages_total", &[])
                    .unwrap_or(0.0),
            );
        }
        stored
    };
    let mut produced = 0;
    let mut warm = 0;
    let mut before = stored_by_each().await;
    wait_for("two instances consuming", async || {
        let messages: Vec<_> = (warm..warm + 50)
            .map(|n| keyed(&format!("warm-{n}"), json!({"event": "warm-up"})))
            .collect();
        warm += messages.len();
        produced += messages.len();
        produce_keyed(&deployment.topic(), &messages).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = stored_by_each().await;
        let consuming = now
            .iter()
            .zip(&before)
            .filter(|(now, then)| now > then)
            .count();
        before = now;
        (consuming >= 2).then_some(())
    })
    .await;
    let at_start = stored_by_each().await;
    for round in 0..ROUNDS {
        let mut messages = Vec::with_capacity(USERS * 3);
        for user in 0..USERS {
            let (anon, id) = (format!("anon-{user}"), format!("user-{user}"));
            if round == ROUNDS / 2 {
                messages.push(keyed(
                    &id,
                    json!({"event": "$identify", "properties": {"$anon_distinct_id": anon}}),
                ));
            }
            messages.push(keyed(
                &anon,
                json!({"event": "$pageview", "properties": {"$set": {"anon_count": round}}}),
            ));
            messages.push(keyed(
                &id,
                json!({"event": "$pageview", "properties": {"$set": {"user_count": round}}}),
            ));
        }
        produced += messages.len();
        produce_keyed(&deployment.topic(), &messages).await;
        // Spread over time, so that the instances work on the same persons at once.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    wait_for_up_to(
        std::time::Duration::from_secs(600),
        "every event stored",
        async || (deployment.counts().await.1 == produced as u64).then_some(()),
    )
    .await;

    let counted: Vec<f64> = stored_by_each()
        .await
        .iter()
        .zip(&at_start)
        .map(|(end, start)| end - start)
        .collect();
    eprintln!("messages each instance stored while counting: {counted:?}");
    assert!(
        counted.iter().filter(|&&count| count > 0.0).count() >= 2,
        "the counting ran on one instance only: {counted:?}"
    );

    let persons = deployment.persons_by_distinct_id().await;
    let team = i32::try_from(deployment.team_id).expect("team id");
    let live: i64 = deployment
        .postgres
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM posthog_person WHERE team_id = $1",
            &[&team],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        live,
        (USERS + warm) as i64,
        "one person per user (and warm-up id): none lost, none left over"
    );
    let last = json!(ROUNDS - 1);
    let mut wrong = Vec::new();
    for user in 0..USERS {
        let (anon, id) = (
            &persons[&format!("anon-{user}")],
            &persons[&format!("user-{user}")],
        );
        if anon.uuid != id.uuid
            || id.properties["anon_count"] != last
            || id.properties["user_count"] != last
        {
            wrong.push(format!("user {user}: anon {anon:?}, user {id:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {USERS} users are split or stale, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );

    // ClickHouse's newest version of each surviving person is Postgres's row.
    let surviving: HashMap<String, &Value> = persons
        .values()
        .map(|person| (person.uuid.to_string(), &person.properties))
        .collect();
    let mut live_in_clickhouse = 0;
    for (id, person) in deployment.clickhouse_persons().await {
        if person.deleted {
            continue;
        }
        live_in_clickhouse += 1;
        assert_eq!(
            surviving.get(&id),
            Some(&&person.properties),
            "person {id} in ClickHouse"
        );
    }
    assert_eq!(
        live_in_clickhouse,
        USERS + warm,
        "ClickHouse's live persons"
    );
    // How often the instances really collided (timing decides, so it is reported).
    let (mut conflicts, mut lost) = (0.0, 0.0);
    for server in &servers {
        let metrics = crate::common::scrape_metrics(&server.addr()).await;
        let value = |name| crate::common::metric_value(&metrics, name, &[]).unwrap_or(0.0);
        conflicts += value("person_transaction_conflicts_total");
        lost += value("person_writes_lost_total");
    }
    eprintln!(
        "three instances: {produced} events, {lost} batched person writes lost a race, \
         {conflicts} person transactions retried"
    );
    drop(servers);
    deployment.drop_databases().await;
}
