//! Chaos: the server killed with SIGKILL mid-stream, each store it depends on (ClickHouse,
//! Postgres, Redis) killed with SIGKILL during ingestion and restarted on its data a while
//! later, and the Kafka broker made unreachable for 30 s and then reachable again. Every event is stored once (after ClickHouse's dedup of replays), no offset of an
//! unstored event is committed, `/_health` shows the outage and recovers. The killed stores are
//! the tests' own instances (`private_stores`), so the shared services of the other tests keep
//! running.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{self, clickhouse_http_url, clickhouse_query, clickhouse_query_at};
use crate::ingestion::{
    Deployment, good_events, produce, produce_at, tagged_events, wait_for, wait_for_up_to,
};
use crate::private_stores::{PrivateStore, ProxiedBroker, StoreKind};

#[tokio::test]
async fn a_server_killed_mid_stream_stores_every_event_once_after_restart() {
    let deployment = Deployment::create().await;
    let (server, _) = deployment.start_server();
    let total = 20_000;
    let events = good_events(&deployment.token, total, "kill9");
    let topic = deployment.topic();
    // Produced in slices with pauses, so the kill lands while events are still arriving.
    let producing = tokio::spawn(async move {
        for slice in events.chunks(500) {
            produce(&topic, slice).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    wait_for("some events stored before the kill", async || {
        let (rows, _) = deployment.counts().await;
        (rows >= 2_000).then_some(())
    })
    .await;
    drop(server); // SIGKILL: no drain, no final commit.
    producing.await.expect("producer task");
    let (rows_at_kill, _) = deployment.counts().await;
    assert!(
        rows_at_kill < total as u64,
        "the kill came too late to test anything"
    );

    let (_server, _) = deployment.start_server();
    wait_for_up_to(Duration::from_secs(120), "every event stored", async || {
        let (_, distinct) = deployment.counts().await;
        (distinct == total as u64).then_some(())
    })
    .await;
    wait_for("all offsets committed", async || {
        (deployment.committed() == total as i64).then_some(())
    })
    .await;
    // Replays collapse: after a merge, one row per event.
    clickhouse_query(&format!(
        "OPTIMIZE TABLE {}.events FINAL",
        deployment.clickhouse_database
    ))
    .await;
    assert_eq!(deployment.counts().await, (total as u64, total as u64));
    deployment.teardown().await;
}

/// Issue 21: the server killed with SIGKILL while every event `$set`s its user's counter. The
/// batches after the last committed offset are replayed on restart, their person changes
/// included, in order: every person ends at its last event's value, one person per user, and
/// ClickHouse's newest version of each says the same as Postgres.
#[tokio::test]
async fn a_server_killed_mid_stream_of_person_updates_leaves_every_person_at_its_last_event() {
    use crate::ingestion::{envelope, produce_keyed};

    const USERS: usize = 2_000;
    const EVENTS: usize = 20_000;
    let deployment = Deployment::create().await;
    let (server, _) = deployment.start_server();
    let messages: Vec<(String, Vec<u8>)> = (0..EVENTS)
        .map(|index| {
            let distinct_id = format!("user-{}", index % USERS);
            let payload = envelope(
                &deployment.token,
                &distinct_id,
                json!({"event": "$pageview", "properties": {"$set": {"seen": index}}}),
                json!({}),
            );
            (format!("{}:{distinct_id}", deployment.token), payload)
        })
        .collect();
    let topic = deployment.topic();
    let producing = tokio::spawn(async move {
        for slice in messages.chunks(1_000) {
            produce_keyed(&topic, slice).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    wait_for("some events stored before the kill", async || {
        (deployment.counts().await.0 >= 4_000).then_some(())
    })
    .await;
    drop(server); // SIGKILL: no drain, no final commit.
    producing.await.expect("producer task");
    assert!(
        deployment.counts().await.1 < EVENTS as u64,
        "the kill came too late to test anything"
    );

    let (_server, _) = deployment.start_server();
    wait_for_up_to(Duration::from_secs(180), "every event stored", async || {
        (deployment.counts().await.1 == EVENTS as u64).then_some(())
    })
    .await;
    wait_for("all offsets committed", async || {
        (deployment.committed() == EVENTS as i64).then_some(())
    })
    .await;
    let (rows, distinct) = deployment.counts().await;
    eprintln!("person updates killed mid-stream: {rows} rows for {distinct} events (replays)");

    let persons = deployment.persons_by_distinct_id().await;
    assert_eq!(persons.len(), USERS, "one person per distinct id");
    let mut wrong = Vec::new();
    let mut postgres = std::collections::HashMap::new();
    for (distinct_id, person) in &persons {
        let user: usize = distinct_id["user-".len()..].parse().expect("user number");
        if person.properties["seen"] != json!(EVENTS - USERS + user) {
            wrong.push(format!("{distinct_id}: {}", person.properties));
        }
        postgres.insert(person.uuid.to_string(), &person.properties);
    }
    assert!(
        wrong.is_empty(),
        "{} of {USERS} persons are not at their last event, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    let clickhouse = deployment.clickhouse_persons().await;
    for (id, person) in &clickhouse {
        assert_eq!(
            postgres.get(id),
            Some(&&person.properties),
            "person {id} in ClickHouse"
        );
    }
    assert_eq!(clickhouse.len(), USERS, "ClickHouse's persons");
    // Not `teardown`'s lag check: tansu reports high watermarks short of the last offset for
    // topics produced in multi-record batches (the committed offsets were checked above).
    deployment.drop_databases().await;
}

/// Issue 25: the broker unreachable for 30 s mid-ingest (its proxy cut: connections closed,
/// new ones closed on arrival). The consumer reads nothing meanwhile and `/_health` names it
/// degraded within 30 s while the process stays alive; once the broker is reachable again the
/// consumer rejoins and resumes from its committed offsets: every event stored once after
/// dedup, every offset committed, health ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_unreachable_for_30s_loses_nothing_and_health_shows_the_consumer_degraded() {
    let broker = ProxiedBroker::start().await;
    let deployment = Deployment::create_with_broker(
        &common::postgres_server_url(),
        &clickhouse_http_url(),
        &broker.hosts(),
    )
    .await;
    let (_server, addr) = deployment.start_server();
    let total = 4_000;
    let events = good_events(&deployment.token, total, "outage");
    // In slices with pauses, so the cut lands while events still arrive; slices sent during
    // the outage wait in the producer until the broker is back.
    let producing = tokio::spawn({
        let (hosts, topic) = (broker.hosts(), deployment.topic());
        async move {
            for slice in events.chunks(200) {
                produce_at(&hosts, &topic, slice).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    wait_for("some events stored before the outage", async || {
        (deployment.counts().await.1 >= 400).then_some(())
    })
    .await;
    broker.cut();
    let outage = Instant::now();
    let stored_at_cut = deployment.counts().await.1;
    assert!(
        stored_at_cut < total as u64,
        "the outage came too late to test anything"
    );
    let report = wait_for("health reported the consumer degraded", async || {
        let report = health(&addr).await;
        report["checks"]["analytics-ingestion"]
            .as_str()
            .is_some_and(|check| check.starts_with("degraded: Kafka unreachable"))
            .then_some(report)
    })
    .await;
    assert!(
        outage.elapsed() < Duration::from_secs(30),
        "degraded only after {:?}: {report}",
        outage.elapsed()
    );
    assert_eq!(
        report["status"], "degraded",
        "alive while degraded: {report}"
    );
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    broker.restore();

    producing.await.expect("producer task");
    wait_for_up_to(Duration::from_secs(120), "every event stored", async || {
        (deployment.counts().await.1 == total as u64).then_some(())
    })
    .await;
    // The test's producer retries what the cut interrupted, so a message may be in the log
    // twice: every offset is committed, which can be more than `total`.
    let end = deployment.end_offsets_read();
    assert!(end >= total as i64, "{end} offsets for {total} events");
    wait_for("all offsets committed", async || {
        let committed = deployment.committed();
        assert!(committed <= end, "committed {committed} past the end {end}");
        (committed == end).then_some(())
    })
    .await;
    wait_for("health back to ok", async || {
        (health(&addr).await["status"] == "ok").then_some(())
    })
    .await;
    deployment
        .clickhouse(&format!(
            "OPTIMIZE TABLE {}.events FINAL",
            deployment.clickhouse_database
        ))
        .await;
    assert_eq!(deployment.counts().await, (total as u64, total as u64));
    // Not `teardown`'s lag check (see above); the broker goes with the test.
    deployment.drop_databases().await;
}

async fn health(addr: &str) -> Value {
    reqwest::get(format!("http://{addr}/_health"))
        .await
        .expect("health answered")
        .json()
        .await
        .expect("health json")
}

/// ClickHouse killed with SIGKILL and down for 30 s during ingestion: the writer retries, no
/// offset of an unstored event is committed, health shows the writer degraded, and once
/// ClickHouse is back on the same data every event is stored once.
// Multi-threaded: the store's start and the server's output are waited on side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_killed_and_restarted_loses_nothing_and_health_shows_the_writer_degraded() {
    let mut clickhouse = PrivateStore::start(StoreKind::ClickHouse).await;
    let deployment = Deployment::create_on(&common::postgres_server_url(), &clickhouse.url()).await;
    let (_server, addr) = deployment.start_server();

    let (outage, report) = store_then_kill(
        &deployment,
        &mut clickhouse,
        &addr,
        &good_events(&deployment.token, 500, "before"),
        &good_events(&deployment.token, 500, "during"),
    )
    .await;
    assert!(
        report["checks"]["event_writer"]
            .as_str()
            .is_some_and(|check| check.starts_with("degraded: ")),
        "{report}"
    );
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    restart_and_recover(&deployment, &mut clickhouse, &addr, 500, 1_000).await;
    clickhouse_query_at(
        &clickhouse.url(),
        &format!(
            "OPTIMIZE TABLE {}.events FINAL",
            deployment.clickhouse_database
        ),
    )
    .await;
    assert_eq!(deployment.counts().await, (1_000, 1_000));
    deployment.teardown().await;
}

/// The end of a store outage: nothing past the `stored` events was committed while it was
/// down; once it runs again every one of `total` is stored and committed, and health is ok.
async fn restart_and_recover(
    deployment: &Deployment,
    store: &mut PrivateStore,
    addr: &str,
    stored: u64,
    total: u64,
) {
    assert!(
        deployment.committed() <= stored as i64,
        "offsets of unstored events must not be committed"
    );
    store.restart().await;
    wait_for("every event stored after the outage", async || {
        (deployment.counts().await.1 == total).then_some(())
    })
    .await;
    committed_and_healthy(deployment, addr, total).await;
}

async fn committed_and_healthy(deployment: &Deployment, addr: &str, total: u64) {
    wait_for("all offsets committed", async || {
        (deployment.committed() == total as i64).then_some(())
    })
    .await;
    wait_for("health back to ok", async || {
        (health(addr).await["status"] == "ok").then_some(())
    })
    .await;
}

/// Stores `before`, then kills the store and produces `during`; returns the moment of the kill
/// and the health report once it shows the outage.
async fn store_then_kill(
    deployment: &Deployment,
    store: &mut PrivateStore,
    addr: &str,
    before: &[Vec<u8>],
    during: &[Vec<u8>],
) -> (Instant, Value) {
    produce(&deployment.topic(), before).await;
    wait_for("the first events stored", async || {
        (deployment.counts().await.1 == before.len() as u64).then_some(())
    })
    .await;
    store.kill();
    let outage = Instant::now();
    produce(&deployment.topic(), during).await;
    let report = wait_for("health reported degraded", async || {
        let report = health(addr).await;
        (report["status"] == "degraded").then_some(report)
    })
    .await;
    (outage, report)
}

/// Postgres (persons, teams) killed with SIGKILL and down for 10 s: batches fail and are
/// retried, nothing is committed past what is stored, health is degraded, and once Postgres
/// has recovered from its crash everything lands, each distinct id with one person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_and_restarted_loses_nothing_and_health_shows_the_consumer_degraded() {
    let mut postgres = PrivateStore::start(StoreKind::Postgres).await;
    let deployment = Deployment::create_on(&postgres.url(), &clickhouse_http_url()).await;
    let (_server, addr) = deployment.start_server();

    // Each phase has distinct ids of its own, so the outage's events need new persons (the
    // person cache cannot answer them).
    let (outage, report) = store_then_kill(
        &deployment,
        &mut postgres,
        &addr,
        &tagged_events(&deployment.token, 300, "before", "before", 40),
        &tagged_events(&deployment.token, 300, "during", "during", 40),
    )
    .await;
    assert!(report.to_string().contains("degraded: "), "{report}");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    assert_eq!(
        deployment.counts().await.1,
        300,
        "nothing stored while down"
    );
    restart_and_recover(&deployment, &mut postgres, &addr, 300, 600).await;
    let client = deployment.postgres.client().await;
    let persons: i64 = client
        .query_one("SELECT count(*) FROM posthog_person", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(persons, 80, "one person per distinct id of both phases");
    deployment
        .clickhouse(&format!(
            "OPTIMIZE TABLE {}.events FINAL",
            deployment.clickhouse_database
        ))
        .await;
    assert_eq!(deployment.counts().await, (600, 600));
    deployment.teardown().await;
}

/// Redis (the post-ingestion queue) killed with SIGKILL for 10 s while a team's onEvent plugin
/// runs: batches wait for the queue instead of dropping their follow-up, the messages queued
/// before the kill survive in Redis' append-only file, so every stored event reaches onEvent
/// (at least once), and health shows the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_no_on_event_delivery_and_health_recovers() {
    plugin_server::telemetry::install_tls_provider();
    let mut destination = common::HttpRecorder::start().await;
    let deployment = Deployment::create().await;
    deployment
        .insert_source_plugin(
            "listener",
            "index.js",
            "exports.onEvent = async (event, { config }) => { await fetch(config.url + '/on-event', \
             { method: 'POST', body: JSON.stringify({ uuid: event.uuid }) }) }",
            json!({"url": destination.url}),
        )
        .await;
    let mut redis = PrivateStore::start(StoreKind::Redis).await;
    let (_server, addr) = deployment.start_server_with(&[
        ("REDIS_URL", redis.url()),
        ("CLUSTER_PREFIX", format!("{}:", deployment.kafka_prefix)),
    ]);

    let mut delivered: Vec<String> = Vec::new();
    let mut collect = async |delivered: &mut Vec<String>, want: usize, within: Duration| {
        let deadline = Instant::now() + within;
        while delivered.iter().collect::<HashSet<_>>().len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((_, path, body)) = destination.next(left).await else {
                panic!("{} of {want} onEvent deliveries", delivered.len());
            };
            assert_eq!(path, "/on-event");
            let body: Value = serde_json::from_str(&body).unwrap();
            delivered.push(body["uuid"].as_str().unwrap().to_owned());
        }
    };
    produce(
        &deployment.topic(),
        &good_events(&deployment.token, 200, "before"),
    )
    .await;
    collect(&mut delivered, 200, Duration::from_secs(60)).await;

    redis.kill();
    let outage = Instant::now();
    produce(
        &deployment.topic(),
        &good_events(&deployment.token, 200, "during"),
    )
    .await;
    wait_for(
        "health degraded while the queue is unreachable",
        async || (health(&addr).await["status"] == "degraded").then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    assert!(
        deployment.committed() <= 200,
        "offsets of events whose follow-up was not queued must not be committed"
    );

    redis.restart().await;
    collect(&mut delivered, 400, Duration::from_secs(90)).await;
    committed_and_healthy(&deployment, &addr, 400).await;
    let stored: HashSet<String> = deployment
        .events()
        .await
        .into_iter()
        .map(|row| row["uuid"].as_str().unwrap().to_owned())
        .collect();
    let seen: HashSet<String> = delivered.iter().cloned().collect();
    assert_eq!(stored.len(), 400);
    assert_eq!(seen, stored, "every stored event reached onEvent");
    deployment.teardown().await;
}
