//! Chaos: the server killed with SIGKILL mid-stream, and each store it depends on (ClickHouse,
//! Postgres, Redis) unreachable for a while during ingestion. Every event is stored once (after
//! ClickHouse's dedup of replays), no offset of an unstored event is committed, `/_health` shows
//! the outage and recovers. Outages go through a TCP proxy that refuses connections and cuts the
//! open ones, so the shared services of the other tests keep running.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{self, clickhouse_http_url, clickhouse_query};
use crate::ingestion::{Deployment, good_events, produce, tagged_events, wait_for, wait_for_up_to};

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

/// A TCP proxy in front of a store that can be switched off: while off it refuses connections
/// and cuts the open ones, as a stopped store would.
struct SwitchableProxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl SwitchableProxy {
    async fn start(target: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, open) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                open.lock().expect("connections").push(task.abort_handle());
            }
        });
        Self {
            port,
            up,
            connections,
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for connection in self.connections.lock().expect("connections").drain(..) {
                connection.abort();
            }
        }
    }
}

async fn health(addr: &str) -> Value {
    reqwest::get(format!("http://{addr}/_health"))
        .await
        .expect("health answered")
        .json()
        .await
        .expect("health json")
}

// Multi-threaded: the proxy must keep serving while the test blocks waiting for the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_for_30_seconds_loses_nothing_and_health_shows_the_writer_degraded() {
    let deployment = Deployment::create().await;
    let proxy = SwitchableProxy::start(proxy_target(&clickhouse_http_url())).await;
    let (_server, addr) =
        deployment.start_server_with(&[("CLICKHOUSE_HOST", format!("127.0.0.1:{}", proxy.port))]);

    let (outage, report) = store_then_cut(
        &deployment,
        &proxy,
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
    recover(&deployment, &proxy, &addr, 500, 1_000).await;
    deployment.teardown().await;
}

/// The end of a store outage: while it was down nothing past the `stored` events was stored or
/// committed; once it is back every one of `total` is stored and committed, and health is ok.
async fn recover(
    deployment: &Deployment,
    proxy: &SwitchableProxy,
    addr: &str,
    stored: u64,
    total: u64,
) {
    assert_eq!(
        deployment.counts().await.1,
        stored,
        "nothing stored while down"
    );
    assert!(
        deployment.committed() <= stored as i64,
        "offsets of unstored events must not be committed"
    );
    proxy.set_up(true);
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

/// Stores `before`, then cuts the store off and produces `during`; returns the moment of the
/// cut and the health report once it shows the outage.
async fn store_then_cut(
    deployment: &Deployment,
    proxy: &SwitchableProxy,
    addr: &str,
    before: &[Vec<u8>],
    during: &[Vec<u8>],
) -> (Instant, Value) {
    produce(&deployment.topic(), before).await;
    wait_for("the first events stored", async || {
        (deployment.counts().await.1 == before.len() as u64).then_some(())
    })
    .await;
    proxy.set_up(false);
    let outage = Instant::now();
    produce(&deployment.topic(), during).await;
    let report = wait_for("health reported degraded", async || {
        let report = health(addr).await;
        (report["status"] == "degraded").then_some(report)
    })
    .await;
    (outage, report)
}

/// `host:port` of a service URL (scheme, credentials and path dropped).
fn proxy_target(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// Postgres (persons, teams) unreachable for 10 s: batches fail and are retried, nothing is
/// committed past what is stored, health is degraded, and everything lands once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_loses_nothing_and_health_shows_the_consumer_degraded() {
    let deployment = Deployment::create().await;
    let proxy = SwitchableProxy::start(proxy_target(&deployment.postgres.url)).await;
    let proxied = deployment.postgres.url.replacen(
        &proxy_target(&deployment.postgres.url),
        &format!("127.0.0.1:{}", proxy.port),
        1,
    );
    let (_server, addr) = deployment.start_server_with(&[("DATABASE_URL", proxied)]);

    // Each phase has distinct ids of its own, so the outage's events need new persons (the
    // person cache cannot answer them).
    let (outage, report) = store_then_cut(
        &deployment,
        &proxy,
        &addr,
        &tagged_events(&deployment.token, 300, "before", "before", 40),
        &tagged_events(&deployment.token, 300, "during", "during", 40),
    )
    .await;
    assert!(report.to_string().contains("degraded: "), "{report}");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    recover(&deployment, &proxy, &addr, 300, 600).await;
    let client = deployment.postgres.client().await;
    let persons: i64 = client
        .query_one("SELECT count(*) FROM posthog_person", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(persons, 80, "one person per distinct id of both phases");
    clickhouse_query(&format!(
        "OPTIMIZE TABLE {}.events FINAL",
        deployment.clickhouse_database
    ))
    .await;
    assert_eq!(deployment.counts().await, (600, 600));
    deployment.teardown().await;
}

/// Redis (the post-ingestion queue) unreachable for 10 s while a team's onEvent plugin runs:
/// batches wait for the queue instead of dropping their follow-up, so every stored event
/// reaches onEvent (at least once), and health shows the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_loses_no_on_event_delivery_and_health_recovers() {
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
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL: run functional_tests/run.sh");
    let proxy = SwitchableProxy::start(proxy_target(&redis)).await;
    let (_server, addr) = deployment.start_server_with(&[
        ("REDIS_URL", format!("redis://127.0.0.1:{}", proxy.port)),
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

    proxy.set_up(false);
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

    proxy.set_up(true);
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
