//! Ingestion end to end against the real services: events produced to the Kafka topic (and
//! sent through HTTP capture) appear in ClickHouse with PostHog's columns, bad input lands in
//! the dead-letter table with its reason while the good events of the same batch are written,
//! and every offset is committed.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    FreshPostgres, ServerProcess, clickhouse_http_url, clickhouse_query_at, postgres_server_url,
    unique_name,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{Value, json};

pub(crate) fn kafka_hosts() -> String {
    std::env::var("KAFKA_HOSTS").expect("KAFKA_HOSTS: run functional_tests/run.sh")
}

/// Everything one test run owns: a Postgres database, a ClickHouse database, a topic prefix.
pub(crate) struct Deployment {
    pub(crate) postgres: FreshPostgres,
    /// The ClickHouse server (HTTP URL) holding `clickhouse_database`.
    pub(crate) clickhouse_url: String,
    pub(crate) clickhouse_database: String,
    pub(crate) kafka_prefix: String,
    /// The broker: the test run's, or a test's own.
    pub(crate) kafka_hosts: String,
    pub(crate) token: String,
    pub(crate) team_id: i64,
}

impl Deployment {
    /// On the test run's Postgres and ClickHouse.
    pub(crate) async fn create() -> Self {
        Self::create_on(&postgres_server_url(), &clickhouse_http_url()).await
    }

    /// On the Postgres server at `postgres_server` (a URL without a database) and the
    /// ClickHouse at `clickhouse_url`, e.g. a test's own instances that it restarts.
    pub(crate) async fn create_on(postgres_server: &str, clickhouse_url: &str) -> Self {
        Self::create_with_broker(postgres_server, clickhouse_url, &kafka_hosts()).await
    }

    /// As `create_on`, with the broker at `kafka_hosts`.
    pub(crate) async fn create_with_broker(
        postgres_server: &str,
        clickhouse_url: &str,
        kafka_hosts: &str,
    ) -> Self {
        let postgres = FreshPostgres::create_on(postgres_server).await;
        let clickhouse_database = unique_name("ps_ingest");
        let kafka_prefix = format!("{}_", unique_name("t"));
        let deployment = Self {
            postgres,
            clickhouse_url: clickhouse_url.to_owned(),
            clickhouse_database,
            kafka_prefix,
            kafka_hosts: kafka_hosts.to_owned(),
            token: unique_name("phc"),
            team_id: 0,
        };
        let env = deployment.env_pairs();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        common::migrate(&env);
        create_topic_at(&deployment.kafka_hosts, &deployment.topic(), 2).await;
        let mut deployment = deployment;
        deployment.team_id = deployment.insert_team().await;
        deployment
    }

    pub(crate) fn topic(&self) -> String {
        format!("{}events_plugin_ingestion", self.kafka_prefix)
    }

    pub(crate) fn env_pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.postgres.url.clone()),
            ("CLICKHOUSE_HOST", self.clickhouse_url.clone()),
            ("CLICKHOUSE_DATABASE", self.clickhouse_database.clone()),
            ("KAFKA_HOSTS", self.kafka_hosts.clone()),
            ("KAFKA_PREFIX", self.kafka_prefix.clone()),
            ("KAFKA_SESSION_TIMEOUT_MS", "1000".to_owned()),
            ("KAFKA_FLUSH_FREQUENCY_MS", "20".to_owned()),
            ("HTTP_SERVER_HOST", "127.0.0.1".to_owned()),
            ("HTTP_SERVER_PORT", "0".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
        ]
    }

    async fn insert_team(&self) -> i64 {
        let client = self.postgres.client().await;
        let organization: uuid::Uuid = client
            .query_one(
                "INSERT INTO posthog_organization (id, name) VALUES (gen_random_uuid(), 'Org') RETURNING id",
                &[],
            )
            .await
            .expect("organization")
            .get(0);
        let team: i32 = client
            .query_one(
                "INSERT INTO posthog_team (organization_id, api_token, name) VALUES ($1, $2, 'Team') RETURNING id",
                &[&organization, &self.token],
            )
            .await
            .expect("team")
            .get(0);
        i64::from(team)
    }

    /// Starts the server binary; returns it and its HTTP address once it logged its start.
    pub(crate) fn start_server(&self) -> (Server, String) {
        self.start_server_with(&[])
    }

    pub(crate) fn start_server_with(
        &self,
        overrides: &[(&'static str, String)],
    ) -> (Server, String) {
        let mut env = self.env_pairs();
        env.extend(overrides.iter().cloned());
        let server = ServerProcess::start(&env);
        let addr = server.addr();
        (server, addr)
    }

    pub(crate) async fn events(&self) -> Vec<Value> {
        let rows = self
            .clickhouse(&format!(
                "SELECT uuid, event, properties, toString(timestamp) AS timestamp, team_id, \
             distinct_id, elements_chain FROM {}.events WHERE team_id = {} FORMAT JSONEachRow",
                self.clickhouse_database, self.team_id
            ))
            .await;
        rows.lines()
            .map(|line| serde_json::from_str(line).expect("row"))
            .collect()
    }

    async fn dead_letters(&self) -> Vec<Value> {
        let rows = self.clickhouse(&format!(
            "SELECT error, raw_payload, error_location FROM {}.events_dead_letter_queue FORMAT JSONEachRow",
            self.clickhouse_database
        ))
        .await;
        rows.lines()
            .map(|line| serde_json::from_str(line).expect("row"))
            .collect()
    }

    /// A query on the deployment's ClickHouse.
    pub(crate) async fn clickhouse(&self, sql: &str) -> String {
        clickhouse_query_at(&self.clickhouse_url, sql).await
    }

    /// Rows and distinct event uuids stored for the team.
    pub(crate) async fn counts(&self) -> (u64, u64) {
        let text = self
            .clickhouse(&format!(
                "SELECT count(), uniqExact(uuid) FROM {}.events WHERE team_id = {} FORMAT TSV",
                self.clickhouse_database, self.team_id
            ))
            .await;
        let mut fields = text
            .split_whitespace()
            .map(|n| n.parse::<u64>().expect("number"));
        (fields.next().expect("count"), fields.next().expect("uniq"))
    }

    /// Source plugin 1 named `name`, whose one file is `file_name`, enabled for the team as
    /// config 10 with `config`.
    pub(crate) async fn insert_source_plugin(
        &self,
        name: &str,
        file_name: &str,
        source: &str,
        config: Value,
    ) {
        let client = self.postgres.client().await;
        let team = i32::try_from(self.team_id).expect("team id");
        client
            .execute(
                "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, updated_at)
                 SELECT 1, organization_id, 'source', $2, now() FROM posthog_team WHERE id = $1",
                &[&team, &name],
            )
            .await
            .expect("plugin");
        client
            .execute(
                "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config)
                 VALUES (10, $1, 1, true, 1, $2)",
                &[&team, &config],
            )
            .await
            .expect("plugin config");
        client
            .execute(
                "INSERT INTO posthog_pluginsourcefile (plugin_id, filename, source) VALUES (1, $1, $2)",
                &[&file_name, &source],
            )
            .await
            .expect("source file");
    }

    /// Per partition of `topic`: its (low, high) watermarks and the offset `{prefix}{group}`
    /// committed, if any.
    fn offsets(&self, group: &str, topic: &str) -> Vec<((i64, i64), Option<i64>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka_hosts)
            .set("group.id", format!("{}{group}", self.kafka_prefix))
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut partitions = TopicPartitionList::new();
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            partitions.add_partition(topic, partition.id());
        }
        let committed = consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .map(|element| {
                let watermarks = consumer
                    .fetch_watermarks(topic, element.partition(), Duration::from_secs(10))
                    .expect("watermarks");
                let committed = match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                };
                (watermarks, committed)
            })
            .collect()
    }

    /// The main topic's end offsets summed over partitions, found by reading every message
    /// (tansu's high watermarks can fall short, see `lag`'s callers): what a consumer that
    /// stored everything has committed. Differs from the number of events produced when a
    /// producer's retry after a cut connection appended a message twice.
    pub(crate) fn end_offsets_read(&self) -> i64 {
        use rdkafka::message::Message;

        let topic = self.topic();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka_hosts)
            .set("group.id", format!("{}end-offsets", self.kafka_prefix))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut partitions = TopicPartitionList::new();
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            partitions
                .add_partition_offset(&topic, partition.id(), Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&partitions).expect("assign");
        let mut ends = std::collections::HashMap::new();
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < Duration::from_secs(3) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let end = ends.entry(message.partition()).or_insert(0);
                    *end = (*end).max(message.offset() + 1);
                    idle_since = Instant::now();
                }
                Some(Err(error)) => panic!("reading {topic}: {error}"),
                None => {}
            }
        }
        ends.values().sum()
    }

    /// Messages of `topic` not yet committed by `{prefix}{group}`, summed over partitions (a
    /// partition the group never committed counts whole).
    pub(crate) fn lag(&self, group: &str, topic: &str) -> i64 {
        self.offsets(group, topic)
            .into_iter()
            .map(|((low, high), committed)| high - committed.unwrap_or(low))
            .sum()
    }

    /// PostHog's functional-test teardown: the ingestion group has no lag left on the main
    /// topic. Then the databases go.
    pub(crate) async fn teardown(self) {
        wait_for("zero consumer lag on the ingestion topic", async || {
            (self.lag("clickhouse-ingestion", &self.topic()) == 0).then_some(())
        })
        .await;
        self.drop_databases().await;
    }

    pub(crate) async fn drop_databases(self) {
        self.clickhouse(&format!("DROP DATABASE {}", self.clickhouse_database))
            .await;
        self.postgres.drop_database().await;
    }

    /// Committed offsets of PostHog's group on the main topic, summed over partitions.
    pub(crate) fn committed(&self) -> i64 {
        self.offsets("clickhouse-ingestion", &self.topic())
            .into_iter()
            .filter_map(|(_, committed)| committed)
            .sum()
    }

    /// The team's persons in Postgres, by distinct id.
    pub(crate) async fn persons_by_distinct_id(
        &self,
    ) -> std::collections::HashMap<String, StoredPerson> {
        let client = self.postgres.client().await;
        let team = i32::try_from(self.team_id).expect("team id");
        client
            .query(
                "SELECT d.distinct_id, p.uuid, p.properties, p.version \
                 FROM posthog_persondistinctid d JOIN posthog_person p ON p.id = d.person_id \
                 WHERE d.team_id = $1",
                &[&team],
            )
            .await
            .expect("persons")
            .iter()
            .map(|row| {
                let version: Option<i64> = row.get(3);
                let person = StoredPerson {
                    uuid: row.get(1),
                    properties: row.get(2),
                    version: version.unwrap_or(0),
                };
                (row.get(0), person)
            })
            .collect()
    }

    /// The newest version of each of the team's persons in ClickHouse's `person` table, by
    /// person id.
    pub(crate) async fn clickhouse_persons(
        &self,
    ) -> std::collections::HashMap<String, ClickHousePerson> {
        let text = self
            .clickhouse(&format!(
                // Aliases unlike the columns: ClickHouse would read them inside the other
                // aggregates.
                "SELECT toString(id) AS person, argMax(properties, version) AS latest_properties, \
                 max(version) AS latest_version, argMax(is_deleted, version) AS deleted \
                 FROM {}.person WHERE team_id = {} GROUP BY person FORMAT JSONEachRow",
                self.clickhouse_database, self.team_id
            ))
            .await;
        let number = |value: &Value| {
            value
                .as_i64()
                .or_else(|| value.as_str().and_then(|text| text.parse().ok()))
                .expect("a number")
        };
        text.lines()
            .map(|line| {
                let row: Value = serde_json::from_str(line).expect("row");
                let properties =
                    serde_json::from_str(row["latest_properties"].as_str().expect("properties"))
                        .expect("json");
                let person = ClickHousePerson {
                    properties,
                    version: number(&row["latest_version"]),
                    deleted: number(&row["deleted"]) != 0,
                };
                (row["person"].as_str().expect("id").to_owned(), person)
            })
            .collect()
    }
}

/// A `posthog_person` row as the tests read it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredPerson {
    pub(crate) uuid: uuid::Uuid,
    pub(crate) properties: Value,
    pub(crate) version: i64,
}

/// The newest row of one person in ClickHouse's `person` table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClickHousePerson {
    pub(crate) properties: Value,
    pub(crate) version: i64,
    pub(crate) deleted: bool,
}

pub(crate) type Server = ServerProcess;

pub(crate) fn envelope(token: &str, distinct_id: &str, event: Value, outer: Value) -> Vec<u8> {
    let mut message = json!({
        "distinct_id": distinct_id,
        "ip": "10.1.2.3",
        "site_url": "https://example.com",
        "now": "2026-11-23T05:00:00.000Z",
        "sent_at": "2026-11-23T05:10:00.000Z",
        "uuid": uuid::Uuid::now_v7().to_string(),
        "token": token,
        "data": event.to_string(),
    });
    if let (Some(message), Value::Object(outer)) = (message.as_object_mut(), outer) {
        message.extend(outer);
    }
    serde_json::to_vec(&message).expect("json")
}

/// Creates `topic` on the test broker with `partitions`.
pub(crate) async fn create_topic(topic: &str, partitions: i32) {
    create_topic_at(&kafka_hosts(), topic, partitions).await;
}

/// Creates `topic` with `partitions` on the broker at `hosts`.
pub(crate) async fn create_topic_at(hosts: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", hosts)
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topics");
    for result in created {
        result.expect("topic created");
    }
}

pub(crate) async fn produce(topic: &str, messages: &[Vec<u8>]) {
    produce_at(&kafka_hosts(), topic, messages).await;
}

/// `produce` to the broker at `hosts`.
pub(crate) async fn produce_at(hosts: &str, topic: &str, messages: &[Vec<u8>]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", hosts)
        .set("linger.ms", "5")
        // The oversized-event case needs a message over the server's 1 MiB event limit.
        .set("message.max.bytes", "4000000")
        .create()
        .expect("producer");
    for (index, payload) in messages.iter().enumerate() {
        let key = format!("key-{index}");
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(error, _)| panic!("message {index} not produced: {error}"));
    }
}

/// Produces `(key, payload)` messages as fast as the broker takes them: a window of sends in
/// flight at once instead of one round trip each, for tests that need a deep backlog.
pub(crate) async fn produce_keyed(topic: &str, messages: &[(String, Vec<u8>)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    for window in messages.chunks(5_000) {
        let sends = window.iter().map(|(key, payload)| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(30),
            )
        });
        for (index, sent) in futures::future::join_all(sends)
            .await
            .into_iter()
            .enumerate()
        {
            if let Err((error, _)) = sent {
                panic!("message {index} of a window not produced: {error}");
            }
        }
    }
}

pub(crate) async fn wait_for<T>(what: &str, check: impl AsyncFnMut() -> Option<T>) -> T {
    wait_for_up_to(Duration::from_secs(60), what, check).await
}

pub(crate) async fn wait_for_up_to<T>(
    limit: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn kafka_and_http_capture_write_posthog_rows_and_dead_letter_bad_input() {
    let deployment = Deployment::create().await;
    let (server, addr) = deployment.start_server();
    let token = deployment.token.clone();
    let marker = unique_name("bad");

    // One batch of good events and every kind of bad input, interleaved.
    let good_skewed = envelope(
        &token,
        "user-1",
        json!({"event": "$pageview", "properties": {"$current_url": "https://example.com/a", "$elements": [{"tag_name": "a", "attr__href": "/next", "$el_text": "Next", "nth_child": 1, "nth_of_type": 2}]}, "timestamp": "2026-11-23T05:08:00.000Z"}),
        json!({}),
    );
    let good_offset = envelope(
        &token,
        "user-2",
        json!({"event": "tap", "properties": {}, "offset": 60000}),
        json!({"sent_at": null}),
    );
    let good_no_sent_at = envelope(
        &token,
        "user-3",
        json!({"event": "raw", "properties": {}, "timestamp": "2026-11-20T10:00:00Z"}),
        json!({"sent_at": null}),
    );
    let messages = vec![
        good_skewed,
        format!("{{not json {marker}").into_bytes(),
        good_offset,
        [
            format!("{{\"x\":\"{marker}").as_bytes(),
            &[0xff, 0xfe],
            b"\"}",
        ]
        .concat(),
        envelope(
            "",
            &format!("{marker}-no-token"),
            json!({"event": "x"}),
            json!({"token": null}),
        ),
        envelope(
            "phc_nobody",
            &format!("{marker}-bad-token"),
            json!({"event": "x"}),
            json!({}),
        ),
        envelope(
            &token,
            &format!("{marker}-big"),
            json!({"event": "x", "properties": {"blob": "y".repeat(1_100_000)}}),
            json!({}),
        ),
        envelope(
            &token,
            &format!("{marker}-name"),
            json!({"event": ""}),
            json!({}),
        ),
        envelope(
            &token,
            &format!("{marker}-uuid"),
            json!({"event": "x"}),
            json!({"uuid": "nope"}),
        ),
        good_no_sent_at,
    ];
    produce(&deployment.topic(), &messages).await;

    let events = wait_for("3 events in ClickHouse", async || {
        let events = deployment.events().await;
        (events.len() >= 3).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 3, "{events:#?}");
    let by_name = |name: &str| {
        events
            .iter()
            .find(|event| event["event"] == name)
            .unwrap_or_else(|| panic!("{name} in {events:#?}"))
            .clone()
    };
    let pageview = by_name("$pageview");
    assert_eq!(pageview["distinct_id"], "user-1");
    // now 05:00 + (timestamp 05:08 - sent_at 05:10)
    assert_eq!(pageview["timestamp"], "2026-11-23 04:58:00");
    assert_eq!(
        pageview["elements_chain"],
        r#"a:attr__href="/next"href="/next"nth-child="1"nth-of-type="2"text="Next""#
    );
    let properties: Value =
        serde_json::from_str(pageview["properties"].as_str().expect("string")).expect("json");
    assert_eq!(properties["$ip"], "10.1.2.3");
    assert!(properties.get("$elements").is_none());
    // offset 60 s before now, no sent_at
    assert_eq!(by_name("tap")["timestamp"], "2026-11-23 04:59:00");
    // timestamp without sent_at is kept as is
    assert_eq!(by_name("raw")["timestamp"], "2026-11-20 10:00:00");

    let letters = wait_for("7 dead letters", async || {
        let letters: Vec<Value> = deployment
            .dead_letters()
            .await
            .into_iter()
            .filter(|letter| {
                letter["raw_payload"]
                    .as_str()
                    .is_some_and(|raw| raw.contains(&marker))
            })
            .collect();
        (letters.len() >= 7).then_some(letters)
    })
    .await;
    let mut reasons: Vec<String> = letters
        .iter()
        .map(|letter| {
            let error = letter["error"].as_str().expect("error");
            let rest = error
                .strip_prefix("ingestEvent failed. Error: ")
                .unwrap_or_else(|| panic!("PostHog's prefix in {error}"));
            rest.split(':').next().expect("reason").to_owned()
        })
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
    assert!(
        letters
            .iter()
            .all(|l| l["error_location"] == "plugin_server_ingest_event")
    );

    // The same dead letters on the DLQ topic: the raw message, the reason in a header.
    let dlq = read_topic(
        &format!("{}events_plugin_ingestion_dlq", deployment.kafka_prefix),
        7,
    );
    let mut dlq_reasons: Vec<String> = dlq.iter().map(|(reason, _)| reason.clone()).collect();
    dlq_reasons.sort_unstable();
    assert_eq!(dlq_reasons, reasons);
    assert!(dlq.iter().all(|(_, payload)| {
        payload
            .windows(marker.len())
            .any(|window| window == marker.as_bytes())
    }));

    // The same kind of event through HTTP capture (cluster profile: capture → Kafka → here).
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/capture/"))
        .json(&json!({
            "api_key": token,
            "event": "captured",
            "distinct_id": "user-http",
            "properties": {"$current_url": "https://example.com/b"},
            "timestamp": "2026-11-23T05:08:00.000Z",
            "sent_at": "2026-11-23T05:10:00.000Z",
        }))
        .send()
        .await
        .expect("capture answered");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let captured = wait_for("the captured event", async || {
        deployment
            .events()
            .await
            .into_iter()
            .find(|event| event["event"] == "captured")
    })
    .await;
    assert_eq!(captured["distinct_id"], "user-http");
    let properties: Value =
        serde_json::from_str(captured["properties"].as_str().expect("string")).expect("json");
    assert_eq!(properties["$current_url"], "https://example.com/b");
    assert_eq!(properties["$ip"], "127.0.0.1");

    // Every offset committed: 10 messages produced here plus 1 from capture.
    wait_for("all offsets committed", async || {
        (deployment.committed() == 11).then_some(())
    })
    .await;

    // PostHog's gauge: the Kafka timestamp of the last stored message, in ms, recent.
    let metrics = common::scrape_metrics(&addr).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as f64;
    let gauges: Vec<f64> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("latest_processed_timestamp_ms{")
                && line.contains(r#"groupId="ingestion""#)
                && line.contains(&format!(r#"topic="{}""#, deployment.topic()))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!gauges.is_empty(), "{metrics}");
    assert!(
        gauges
            .iter()
            .all(|&ms| now_ms - ms < 60_000.0 && ms <= now_ms),
        "{gauges:?} vs {now_ms}"
    );

    drop(server);
    deployment.teardown().await;
}

/// Reads `expected` messages from the start of a topic: (the `reason` header, the payload).
fn read_topic(topic: &str, expected: usize) -> Vec<(String, Vec<u8>)> {
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "1000")
        .set("heartbeat.interval.ms", "100")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut messages = Vec::new();
    while messages.len() < expected {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {expected} messages on {topic}",
            messages.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("message");
        let reason = message
            .headers()
            .and_then(|headers| {
                headers
                    .iter()
                    .find(|header| header.key == "reason")
                    .and_then(|header| header.value)
                    .map(|value| String::from_utf8_lossy(value).into_owned())
            })
            .unwrap_or_default();
        messages.push((reason, message.payload().unwrap_or_default().to_vec()));
    }
    messages
}

/// Simple good events for the failure tests, each with its own uuid.
pub(crate) fn good_events(token: &str, count: usize, tag: &str) -> Vec<Vec<u8>> {
    tagged_events(token, count, tag, "user", 50)
}

/// `count` events named `tag`, spread over `users` distinct ids `{id_prefix}-N`.
pub(crate) fn tagged_events(
    token: &str,
    count: usize,
    tag: &str,
    id_prefix: &str,
    users: usize,
) -> Vec<Vec<u8>> {
    (0..count)
        .map(|index| {
            envelope(
                token,
                &format!("{id_prefix}-{}", index % users),
                json!({"event": tag, "properties": {"index": index}}),
                json!({}),
            )
        })
        .collect()
}

/// Sends SIGTERM and waits for a clean exit.
pub(crate) fn terminate(mut server: Server) {
    let pid = server.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let status = server.child.wait().expect("exits");
    assert!(status.success(), "graceful exit: {status}");
}

#[tokio::test]
async fn two_instances_share_the_topic_and_a_rebalance_loses_nothing() {
    let deployment = Deployment::create().await;
    let (first, _) = deployment.start_server();
    let total = 10_000;
    let events = good_events(&deployment.token, total, "rebalance");
    let topic = deployment.topic();
    let producing = tokio::spawn(async move {
        for slice in events.chunks(250) {
            produce(&topic, slice).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    wait_for("some events stored by the first instance", async || {
        (deployment.counts().await.0 >= 1_000).then_some(())
    })
    .await;
    // The second instance joins: the group rebalances while events flow.
    let (_second, _) = deployment.start_server();
    wait_for("more events stored after the join", async || {
        (deployment.counts().await.0 >= 4_000).then_some(())
    })
    .await;
    // The first leaves gracefully: it drains and commits, the second takes every partition.
    terminate(first);
    producing.await.expect("producer task");

    wait_for_up_to(Duration::from_secs(120), "every event stored", async || {
        (deployment.counts().await.1 == total as u64).then_some(())
    })
    .await;
    wait_for("all offsets committed", async || {
        (deployment.committed() == total as i64).then_some(())
    })
    .await;
    let (rows, distinct) = deployment.counts().await;
    eprintln!("rebalance: {rows} rows for {distinct} events before merging");
    deployment.teardown().await;
}

/// `$snapshot` and `$performance_event` are not events (spec 1.2, PostHog's
/// `web-performance-events.test.ts`: no `events` row): they go unchanged to
/// `session_recording_events`, keyed by session, for a recordings consumer; the other events of
/// the batch are stored as usual and every offset is committed.
#[tokio::test]
async fn recording_messages_are_forwarded_to_the_recordings_topic_not_stored_as_events() {
    let deployment = Deployment::create().await;
    let (_server, _) = deployment.start_server();
    let messages = vec![
        envelope(
            &deployment.token,
            "viewer",
            json!({"event": "$snapshot", "properties": {"$session_id": "s1", "$window_id": "w1", "$snapshot_data": {"type": 2}}}),
            json!({}),
        ),
        envelope(
            &deployment.token,
            "viewer",
            json!({"event": "$performance_event", "properties": {"$session_id": "s1", "0": "resource", "2": "https://x/app.js", "39": 12.5}}),
            json!({}),
        ),
        envelope(
            &deployment.token,
            "viewer",
            json!({"event": "$pageview", "properties": {}}),
            json!({}),
        ),
    ];
    produce(&deployment.topic(), &messages).await;
    wait_for("every offset committed", async || {
        (deployment.committed() == 3).then_some(())
    })
    .await;
    let events = deployment.events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "$pageview");
    let forwarded = read_topic(
        &format!("{}session_recording_events", deployment.kafka_prefix),
        2,
    );
    let payloads: Vec<&Vec<u8>> = forwarded.iter().map(|(_, payload)| payload).collect();
    assert_eq!(
        payloads,
        [&messages[0], &messages[1]],
        "forwarded unchanged, in order"
    );
    deployment.teardown().await;
}

/// Events to Kafka without ClickHouse (PostHog's layout, ClickHouse reading the topics): plugin
/// log entries and app metrics go to PostHog's `plugin_log_entries` and
/// `clickhouse_app_metrics` topics, in its JSON, instead of nowhere.
#[tokio::test]
async fn without_clickhouse_plugin_logs_and_app_metrics_go_to_posthogs_topics() {
    let base = tempfile::tempdir().expect("tempdir");
    let configs = crate::plugins::plugin_for_team_one(
        base.path(),
        "chatty",
        "exports.processEvent = (event) => { console.error('seen', event.event); return event }",
    );
    let prefix = format!("{}_", unique_name("t"));
    let topic = format!("{prefix}events_plugin_ingestion");
    create_topic(&topic, 1).await;
    let _server = ServerProcess::start(&[
        ("KAFKA_HOSTS", kafka_hosts()),
        ("KAFKA_PREFIX", prefix.clone()),
        ("KAFKA_SESSION_TIMEOUT_MS", "1000".to_owned()),
        ("KAFKA_FLUSH_FREQUENCY_MS", "20".to_owned()),
        ("APP_METRICS_FLUSH_FREQUENCY_MS", "100".to_owned()),
        // PostHog's test setting: every message sent at once (the others run with its 20).
        ("KAFKA_PRODUCER_MAX_QUEUE_SIZE", "0".to_owned()),
        ("BASE_DIR", base.path().to_str().expect("utf-8").to_owned()),
        (
            "PLUGINS_CONFIG_FILE",
            configs.to_str().expect("utf-8").to_owned(),
        ),
        ("HTTP_SERVER_HOST", "127.0.0.1".to_owned()),
        ("HTTP_SERVER_PORT", "0".to_owned()),
    ]);
    let token = unique_name("phc");
    produce(
        &topic,
        &[envelope(
            &token,
            "reader",
            json!({"event": "$pageview", "properties": {}}),
            json!({}),
        )],
    )
    .await;

    let logs = read_topic(&format!("{prefix}plugin_log_entries"), 1);
    let log: Value = serde_json::from_slice(&logs[0].1).expect("json");
    assert_eq!(log["plugin_config_id"], 1, "{log}");
    assert_eq!(log["team_id"], 1, "{log}");
    assert_eq!(log["source"], "CONSOLE", "{log}");
    assert_eq!(log["type"], "ERROR", "{log}");
    assert!(
        log["message"].as_str().is_some_and(|m| m.contains("seen")),
        "{log}"
    );
    assert!(
        log["timestamp"].as_str().is_some_and(|t| t.len() == 23),
        "ClickHouse's format, YYYY-MM-DD HH:MM:SS.sss: {log}"
    );
    let metrics = read_topic(&format!("{prefix}clickhouse_app_metrics"), 1);
    let metric: Value = serde_json::from_slice(&metrics[0].1).expect("json");
    assert_eq!(metric["category"], "processEvent", "{metric}");
    assert_eq!(metric["successes"], 1, "{metric}");
    assert_eq!(metric["plugin_config_id"], 1, "{metric}");
}

/// A new deployment: the consumption topic does not exist when the server starts, and the first
/// event produced creates it (the broker's auto-create). The consumer notices the topic and its
/// partitions within seconds (librdkafka's default metadata refresh would leave the events
/// waiting up to five minutes; found by docker/check_image.sh).
#[tokio::test]
async fn a_consumption_topic_created_by_the_first_event_is_read_within_seconds() {
    let deployment = Deployment::create().await;
    let topic = format!("{}late_events", deployment.kafka_prefix);
    let (_server, _) =
        deployment.start_server_with(&[("KAFKA_CONSUMPTION_TOPIC", "late_events".to_owned())]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    produce(
        &topic,
        &[envelope(
            &deployment.token,
            "early",
            json!({"event": "first", "properties": {}}),
            json!({}),
        )],
    )
    .await;
    wait_for_up_to(
        Duration::from_secs(60),
        "the first event stored",
        async || (!deployment.events().await.is_empty()).then_some(()),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "took {:?}",
        started.elapsed()
    );
    deployment.teardown().await;
}

/// `CLICKHOUSE_COMPRESSION=lz4` compresses inserts and answers even to the test run's
/// ClickHouse on this host, where `auto` (every other test) sends them plain.
#[tokio::test]
async fn events_are_stored_with_lz4_bodies_when_asked() {
    let deployment = Deployment::create().await;
    let (_server, _) =
        deployment.start_server_with(&[("CLICKHOUSE_COMPRESSION", "lz4".to_owned())]);
    let messages: Vec<Vec<u8>> = (0..20)
        .map(|n| {
            envelope(
                &deployment.token,
                &format!("user-{n}"),
                json!({"event": "compressed", "properties": {"n": n, "text": "é".repeat(n)}}),
                json!({}),
            )
        })
        .collect();
    produce(&deployment.topic(), &messages).await;
    let events = wait_for("the compressed events stored", async || {
        let events = deployment.events().await;
        (events.len() == 20).then_some(events)
    })
    .await;
    for event in &events {
        let properties: Value =
            serde_json::from_str(event["properties"].as_str().expect("text")).expect("json");
        let n = properties["n"].as_u64().expect("n") as usize;
        assert_eq!(properties["text"], json!("é".repeat(n)));
    }
    deployment.teardown().await;
}

/// `/_ready` answers 200 once the Kafka consumers have joined their groups (until then 503
/// `joining`; `system::health`'s tests cover the waiting, which a live broker makes too short
/// to catch from outside).
#[tokio::test]
async fn readiness_turns_ok_once_the_consumers_have_joined() {
    plugin_server::telemetry::install_tls_provider();
    let deployment = Deployment::create().await;
    let (_server, addr) = deployment.start_server();
    wait_for_up_to(Duration::from_secs(30), "ready", async || {
        let response = reqwest::get(format!("http://{addr}/_ready")).await.ok()?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.ok()?;
        (status == 200 && body["status"] == "ok").then_some(())
    })
    .await;
    deployment.teardown().await;
}

/// A broker that cannot be reached does not hold up the start (librdkafka's admin requests
/// would wait a minute each): the server listens within 30 s, is not ready (`joining`), and
/// `/_health` names each consumer degraded with the Kafka error, alive.
#[tokio::test]
async fn an_unreachable_broker_delays_neither_the_start_nor_the_health_report() {
    plugin_server::telemetry::install_tls_provider();
    let deployment = Deployment::create().await;
    let started = Instant::now();
    // A port nothing listens on.
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let (_server, addr) = deployment.start_server_with(&[("KAFKA_HOSTS", unreachable.to_string())]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "started after {:?}",
        started.elapsed()
    );
    let ready = reqwest::get(format!("http://{addr}/_ready"))
        .await
        .expect("ready answered");
    assert_eq!(ready.status().as_u16(), 503);
    assert_eq!(
        ready.json::<Value>().await.expect("json")["status"],
        "joining"
    );
    let report = wait_for_up_to(
        Duration::from_secs(30),
        "the consumer degraded",
        async || {
            let response = reqwest::get(format!("http://{addr}/_health")).await.ok()?;
            let status = response.status().as_u16();
            let report: Value = response.json().await.ok()?;
            report["checks"]["analytics-ingestion"]
                .as_str()?
                .starts_with("degraded: Kafka unreachable for")
                .then_some((status, report))
        },
    )
    .await;
    assert_eq!(report.0, 200, "degraded is alive: {}", report.1);
    deployment.drop_databases().await;
}

/// PostHog settings that cannot apply here are named once at start, in the start line, with
/// why; none are named when none is set.
#[tokio::test]
async fn settings_that_cannot_apply_are_named_at_start() {
    let base = tempfile::tempdir().expect("tempdir");
    let base_dir = base.path().to_str().expect("utf-8").to_owned();
    let plain = ServerProcess::start(&[("BASE_DIR", base_dir.clone())]);
    assert_eq!(
        plain.started["settings_not_applied"], "",
        "{}",
        plain.started
    );
    drop(plain);
    let server = ServerProcess::start(&[
        ("BASE_DIR", base_dir),
        ("INTERNAL_MMDB_SERVER_PORT", "4321".to_owned()),
        ("PISCINA_ATOMICS_TIMEOUT", "5000".to_owned()),
    ]);
    let named = server.started["settings_not_applied"]
        .as_str()
        .expect("logged")
        .to_owned();
    assert!(
        named.contains("INTERNAL_MMDB_SERVER_PORT: GeoIP lookups run in process"),
        "{named}"
    );
    assert!(
        named.contains("PISCINA_USE_ATOMICS / PISCINA_ATOMICS_TIMEOUT"),
        "{named}"
    );
    assert!(
        !named.contains("CLICKHOUSE_OFFLINE_CLUSTER_HOST"),
        "{named}"
    );
}

/// INGESTION_OVERFLOW_ENABLED (PostHog's `ingestion-overflow.test.ts`): a distinct id over its
/// token bucket is sent to the overflow topic unchanged while the others are ingested; the
/// main topic's offsets are all committed; an `ingestion-overflow` instance then stores the
/// rerouted events, with one `ingestion_capacity_overflow` warning for the id.
#[tokio::test]
async fn a_hot_distinct_id_overflows_and_the_overflow_instance_stores_it_with_a_warning() {
    let deployment = Deployment::create().await;
    let overflow = format!(
        "{}events_plugin_ingestion_overflow",
        deployment.kafka_prefix
    );
    let (server, _) = deployment.start_server_with(&[
        ("PLUGIN_SERVER_MODE", "ingestion".to_owned()),
        ("INGESTION_OVERFLOW_ENABLED", "true".to_owned()),
        ("EVENT_OVERFLOW_BUCKET_CAPACITY", "20".to_owned()),
        // No refill during the test: exactly the capacity gets through.
        ("EVENT_OVERFLOW_BUCKET_REPLENISH_RATE", "0".to_owned()),
    ]);
    produce(
        &deployment.topic(),
        &tagged_events(&deployment.token, 100, "hot", "hot", 1),
    )
    .await;
    produce(
        &deployment.topic(),
        &tagged_events(&deployment.token, 30, "cold", "cold", 10),
    )
    .await;
    wait_for("the main topic committed", async || {
        (deployment.committed() == 130).then_some(())
    })
    .await;
    assert_eq!(
        deployment.counts().await.1,
        50,
        "20 hot events and the 30 cold ones"
    );
    let rerouted = read_topic(&overflow, 80);
    assert!(rerouted.iter().all(|(_, payload)| {
        serde_json::from_slice::<Value>(payload).expect("json")["distinct_id"] == "hot-0"
    }));
    drop(server);

    let (_overflow_server, _) =
        deployment.start_server_with(&[("PLUGIN_SERVER_MODE", "ingestion-overflow".to_owned())]);
    wait_for("the rerouted events stored", async || {
        (deployment.counts().await.1 == 130).then_some(())
    })
    .await;
    let warnings = deployment
        .clickhouse(&format!(
            "SELECT details FROM {}.ingestion_warnings WHERE team_id = {} \
             AND type = 'ingestion_capacity_overflow' FORMAT JSONEachRow",
            deployment.clickhouse_database, deployment.team_id
        ))
        .await;
    let warnings: Vec<Value> = warnings
        .lines()
        .map(|line| serde_json::from_str(line).expect("row"))
        .collect();
    assert_eq!(warnings.len(), 1, "once per id: {warnings:?}");
    let details: Value =
        serde_json::from_str(warnings[0]["details"].as_str().expect("details")).expect("json");
    assert_eq!(details["overflowDistinctId"], "hot-0");
    // Committed offsets, not lag: the router produces the 80 messages in one compressed
    // batch, and tansu reports a high watermark of 1 for it (it counts the batch), while the
    // consumer's offsets count records, as Kafka's do.
    wait_for("the overflow group committed", async || {
        let committed: i64 = deployment
            .offsets("clickhouse-ingestion-overflow", &overflow)
            .into_iter()
            .filter_map(|(_, committed)| committed)
            .sum();
        (committed == 80).then_some(())
    })
    .await;
    deployment.teardown().await;
}

/// PLUGIN_SERVER_MODE=ingestion-overflow consumes only the overflow topic, in its own group,
/// into the same tables; the main topic is left to the ingestion instances.
#[tokio::test]
async fn the_ingestion_overflow_mode_consumes_only_the_overflow_topic() {
    let deployment = Deployment::create().await;
    let overflow = format!(
        "{}events_plugin_ingestion_overflow",
        deployment.kafka_prefix
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .create()
        .expect("admin client");
    for result in admin
        .create_topics(
            &[NewTopic::new(&overflow, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic")
    {
        result.expect("overflow topic created");
    }
    produce(&overflow, &good_events(&deployment.token, 50, "overflowed")).await;
    produce(
        &deployment.topic(),
        &good_events(&deployment.token, 30, "main"),
    )
    .await;
    let (server, addr) =
        deployment.start_server_with(&[("PLUGIN_SERVER_MODE", "ingestion-overflow".to_owned())]);
    wait_for("the overflow events stored", async || {
        (deployment.counts().await.1 == 50).then_some(())
    })
    .await;
    // Time for the main topic's events to show up, if this instance wrongly read them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = deployment.events().await;
    assert_eq!(events.len(), 50, "only the overflow topic was consumed");
    let actors: Value = reqwest::get(format!("http://{addr}/_actors"))
        .await
        .expect("actors")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = actors["actors"]
        .as_array()
        .expect("actors list")
        .iter()
        .filter_map(|actor| actor["name"].as_str())
        .collect();
    assert!(names.contains(&"kafka_overflow_consumer"), "{names:?}");
    assert!(!names.contains(&"kafka_consumer"), "{names:?}");
    assert!(actors["plugin_scheduler"].is_null());
    drop(server);
    assert_eq!(
        deployment.lag("clickhouse-ingestion-overflow", &overflow),
        0,
        "the overflow group committed everything it stored"
    );
    deployment.drop_databases().await;
}

#[tokio::test]
async fn the_embedded_profile_captures_over_http_into_json_lines() {
    plugin_server::telemetry::install_tls_provider();
    let base_dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&[(
        "BASE_DIR",
        base_dir.path().to_str().expect("utf-8 path").to_owned(),
    )]);
    let addr = server.addr();

    let response = reqwest::Client::new()
        .post(format!("http://{addr}/batch"))
        .json(&json!({
            "api_key": "phc_embedded",
            "batch": [
                {"event": "$pageview", "distinct_id": "u1", "properties": {"$current_url": "https://example.com"}},
                {"event": "signup", "distinct_id": "u2", "properties": {"utm_source": "news"}},
                // Current posthog-js sends the chain ready-made.
                {"event": "$autocapture", "distinct_id": "u1", "properties": {"$elements_chain": "button.cta:nth-child=\"1\"nth-of-type=\"1\"text=\"Go\""}},
            ],
        }))
        .send()
        .await
        .expect("capture answered");
    assert_eq!(response.status(), 200);

    // Acknowledged means stored: the lines are on disk already.
    let rows = common::read_event_rows(base_dir.path());
    assert_eq!(rows.len(), 3, "{rows:?}");
    let autocapture = rows
        .iter()
        .find(|row| row["event"] == "$autocapture")
        .expect("autocapture");
    assert_eq!(
        autocapture["elements_chain"],
        "button.cta:nth-child=\"1\"nth-of-type=\"1\"text=\"Go\""
    );
    assert!(autocapture["properties"].get("$elements_chain").is_none());
    let signup = rows
        .iter()
        .find(|row| row["event"] == "signup")
        .expect("signup");
    assert_eq!(signup["distinct_id"], "u2");
    assert_eq!(signup["team_id"], 1, "the first token seen is team 1");
    let properties = &signup["properties"];
    assert_eq!(properties["$set"]["utm_source"], "news");
    assert_eq!(properties["$set_once"]["$initial_utm_source"], "news");
    assert_eq!(properties["$ip"], "127.0.0.1");
    // The in-process person store gave each distinct id its person, with the $set applied.
    let pageview = rows
        .iter()
        .find(|row| row["event"] == "$pageview")
        .expect("pageview");
    assert_ne!(signup["person_id"], uuid::Uuid::nil().to_string());
    assert_ne!(signup["person_id"], pageview["person_id"]);
    let person: Value =
        serde_json::from_str(signup["person_properties"].as_str().expect("string")).expect("json");
    assert_eq!(person["utm_source"], "news");

    // Groups in the in-process store: the identify's group shows on the next event, named by
    // type through `$groups`, and its version is written out.
    for event in [
        json!({"event": "$groupidentify", "distinct_id": "u1", "properties": {"$group_type": "company", "$group_key": "acme", "$group_set": {"plan": "pro"}}}),
        json!({"event": "upgrade", "distinct_id": "u1", "properties": {"$groups": {"company": "acme"}}}),
    ] {
        let mut event = event;
        event["api_key"] = json!("phc_embedded");
        let response = reqwest::Client::new()
            .post(format!("http://{addr}/capture"))
            .json(&event)
            .send()
            .await
            .expect("capture answered");
        assert_eq!(response.status(), 200);
    }
    let rows = common::read_event_rows(base_dir.path());
    let upgrade = rows
        .iter()
        .find(|row| row["event"] == "upgrade")
        .expect("upgrade");
    assert_eq!(upgrade["properties"]["$group_0"], "acme");
    assert_eq!(upgrade["group0_properties"], r#"{"plan":"pro"}"#);
    let groups = common::read_rows(base_dir.path(), "groups");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["group_key"], "acme");
    assert_eq!(groups[0]["version"], 1);

    // A recording message is kept for a recordings consumer, not stored as an event.
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/capture"))
        .json(
            &json!({"api_key": "phc_embedded", "event": "$snapshot", "distinct_id": "u1",
                      "properties": {"$session_id": "s1", "$snapshot_data": {"type": 2}}}),
        )
        .send()
        .await
        .expect("capture answered");
    assert_eq!(response.status(), 200);
    let recordings = common::read_rows(base_dir.path(), "session_recording_events");
    assert_eq!(recordings.len(), 1, "{recordings:?}");
    assert!(
        recordings[0]["data"]
            .as_str()
            .is_some_and(|data| data.contains("$snapshot"))
    );
    assert!(
        common::read_event_rows(base_dir.path())
            .iter()
            .all(|row| row["event"] != "$snapshot")
    );
    drop(server);
}

/// Older posthog-js (`compression=lz64`): LZString base64 in a url-encoded `data` field, stored
/// like any other capture.
#[tokio::test]
async fn lz64_capture_bodies_from_older_posthog_js_are_stored() {
    plugin_server::telemetry::install_tls_provider();
    let base_dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&[(
        "BASE_DIR",
        base_dir.path().to_str().expect("utf-8 path").to_owned(),
    )]);
    let batch = json!([
        {"event": "$pageview", "distinct_id": "legacy", "properties": {"token": "phc_legacy", "$current_url": "https://example.com/x"}},
        {"event": "clicked", "distinct_id": "legacy", "properties": {"token": "phc_legacy"}},
    ]);
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair(
            "data",
            &lz_str::compress_to_base64(batch.to_string().as_str()),
        )
        .finish();
    let response = reqwest::Client::new()
        .post(format!("http://{}/e/?compression=lz64", server.addr()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("capture answered");
    assert_eq!(response.status(), 200);
    let rows = common::read_event_rows(base_dir.path());
    let mut names: Vec<&str> = rows
        .iter()
        .filter_map(|row| row["event"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["$pageview", "clicked"]);
    assert!(rows.iter().all(|row| row["distinct_id"] == "legacy"));
    drop(server);
}
