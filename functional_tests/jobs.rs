//! Plugin jobs across instances: three servers on one Postgres queue jobs from `processEvent`
//! with `meta.jobs` and run them from `plugin_server_jobs`. Every job runs exactly once
//! whichever instance queued it, a `runIn(2, 'seconds')` job runs on time although the
//! instance that queued it was killed meanwhile, and failed jobs are retried per their policy
//! and then dead-lettered.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{FreshPostgres, HttpRecorder, ServerProcess, migrate};

/// Queues `report` jobs for `from..to` on a `queue` event; `report` tells the test which job
/// ran, when it was due and when it started. `flaky` fails until its third attempt.
const JOBS_PLUGIN: &str = r#"
exports.processEvent = async (event, { jobs }) => {
    const p = event.properties
    if (event.event === 'queue') {
        for (let i = p.from; i < p.to; i++) {
            const due = Date.now() + p.delay_seconds * 1000
            await jobs.report({ i, due }).runIn(p.delay_seconds, 'seconds')
        }
    }
    if (event.event === 'flaky') {
        await jobs.flaky({ id: p.id }, { maxAttempts: 3, retryDelayMs: 100 }).runNow()
    }
    if (event.event === 'doomed') {
        await jobs.flaky({ id: p.id, never: true }, { maxAttempts: 2, retryDelayMs: 100 }).runNow()
    }
    return event
}
exports.jobs = {
    report: async ({ i, due }, { config }) => {
        await fetch(config.url + '/report', {
            method: 'POST', body: JSON.stringify({ i, due, ran: Date.now() }),
        })
    },
    flaky: async ({ id, never }, { config, storage }) => {
        const attempt = (await storage.get('attempts-' + id, 0)) + 1
        await storage.set('attempts-' + id, attempt)
        if (never || attempt < 3) throw new Error('attempt ' + attempt + ' failed')
        await fetch(config.url + '/flaky', { method: 'POST', body: JSON.stringify({ id, attempt }) })
    },
}
"#;

const TOKEN: &str = "phc_jobs";

struct Deployment {
    database: FreshPostgres,
    dirs: Vec<tempfile::TempDir>,
}

impl Deployment {
    async fn create(destination: &str) -> Self {
        let database = FreshPostgres::create().await;
        migrate(&[("DATABASE_URL", &database.url)]);
        let client = database.client().await;
        client
            .batch_execute(&format!(
                "INSERT INTO posthog_organization (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'org');
                 INSERT INTO posthog_team (id, organization_id, api_token) VALUES (2, '00000000-0000-0000-0000-000000000001', '{TOKEN}');
                 INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, updated_at)
                     VALUES (1, '00000000-0000-0000-0000-000000000001', 'source', 'jobs', now());
                 INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config)
                     VALUES (10, 2, 1, true, 1, '{{\"url\": \"{destination}\"}}');"
            ))
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO posthog_pluginsourcefile (plugin_id, filename, source) VALUES (1, 'index.js', $1)",
                &[&JOBS_PLUGIN],
            )
            .await
            .unwrap();
        Self {
            database,
            dirs: Vec::new(),
        }
    }

    fn start_server(&mut self) -> ServerProcess {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(&[
            ("BASE_DIR", dir.path().to_str().unwrap().to_owned()),
            ("DATABASE_URL", self.database.url.clone()),
        ]);
        self.dirs.push(dir);
        server
    }
}

async fn capture(addr: &str, event: &str, properties: Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/batch"))
        .json(&json!({
            "api_key": TOKEN,
            "batch": [{ "event": event, "distinct_id": "jobs-test", "properties": properties }],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Reports arriving within `window` (or until `expected` of them arrived), by job number.
async fn reports(
    destination: &mut HttpRecorder,
    expected: usize,
    window: Duration,
) -> BTreeMap<i64, Vec<Value>> {
    let until = Instant::now() + window;
    let mut seen: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    while seen.values().map(Vec::len).sum::<usize>() < expected {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        let Some((_, path, body)) = destination.next(left).await else {
            break;
        };
        assert_eq!(path, "/report", "{body}");
        let report: Value = serde_json::from_str(&body).unwrap();
        seen.entry(report["i"].as_i64().unwrap())
            .or_default()
            .push(report);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_exactly_once_across_instances_and_on_time_after_the_queuer_dies() {
    plugin_server::telemetry::install_tls_provider();
    let mut destination = HttpRecorder::start().await;
    let mut deployment = Deployment::create(&destination.url).await;
    let mut servers: Vec<Option<ServerProcess>> =
        (0..3).map(|_| Some(deployment.start_server())).collect();
    let addrs: Vec<String> = servers
        .iter()
        .map(|server| server.as_ref().unwrap().addr())
        .collect();

    // 1,000 jobs, queued a third by each instance, all due at once.
    const JOBS: i64 = 1000;
    let ranges = [(0, 334), (334, 667), (667, JOBS)];
    for (addr, (from, to)) in addrs.iter().zip(ranges) {
        capture(
            addr,
            "queue",
            json!({ "from": from, "to": to, "delay_seconds": 0 }),
        )
        .await;
    }
    let seen = reports(&mut destination, JOBS as usize, Duration::from_secs(90)).await;
    // Anything run twice would arrive shortly after; give it the time to.
    let late = reports(&mut destination, 1, Duration::from_secs(2)).await;
    assert!(late.is_empty(), "a job ran twice: {late:?}");
    assert_eq!(seen.len() as i64, JOBS, "every job ran");
    let twice: Vec<_> = seen.iter().filter(|(_, runs)| runs.len() > 1).collect();
    assert!(twice.is_empty(), "jobs ran more than once: {twice:?}");
    let mut per_instance = Vec::new();
    for addr in &addrs {
        let actors = crate::common::actors(addr).await;
        per_instance.push(actors["plugin_job_queue"]["succeeded"].as_u64().unwrap());
    }
    assert_eq!(
        per_instance.iter().sum::<u64>(),
        JOBS as u64,
        "{per_instance:?}"
    );
    eprintln!("jobs run per instance: {per_instance:?}");

    // runIn(2, 'seconds') queued by instance 0, which is killed at once: another instance runs
    // it within a second of its due time, not before.
    capture(
        &addrs[0],
        "queue",
        json!({ "from": 5000, "to": 5001, "delay_seconds": 2 }),
    )
    .await;
    drop(servers[0].take());
    let seen = reports(&mut destination, 1, Duration::from_secs(15)).await;
    let runs = seen.get(&5000).expect("the delayed job ran");
    assert_eq!(runs.len(), 1, "{runs:?}");
    let lateness = runs[0]["ran"].as_i64().unwrap() - runs[0]["due"].as_i64().unwrap();
    assert!(
        (0..1000).contains(&lateness),
        "ran {lateness} ms after its due time"
    );
    eprintln!("runIn(2 seconds) ran {lateness} ms after its due time");

    // A failing job is retried per its policy; one that keeps failing is dead-lettered.
    capture(&addrs[1], "flaky", json!({ "id": "a" })).await;
    capture(&addrs[2], "doomed", json!({ "id": "b" })).await;
    let (_, path, body) = destination
        .next(Duration::from_secs(15))
        .await
        .expect("the flaky job succeeded");
    assert_eq!(path, "/flaky");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({ "id": "a", "attempt": 3 })
    );
    let client = deployment.database.client().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let dead = loop {
        let rows = client
            .query(
                "SELECT job_name, attempts, error, payload FROM plugin_server_jobs_dead_letter",
                &[],
            )
            .await
            .unwrap();
        if !rows.is_empty() {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the doomed job was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].get::<_, String>(0), "flaky");
    assert_eq!(dead[0].get::<_, i32>(1), 2);
    assert!(
        dead[0].get::<_, String>(2).contains("attempt 2 failed"),
        "{}",
        dead[0].get::<_, String>(2)
    );
    // The flaky job's request reaches the recorder while its run is still in progress: its
    // row goes once the run has returned, so the queue empties a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM plugin_server_jobs", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} jobs left in the queue, none expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    drop(servers);
    drop(deployment.dirs);
    deployment.database.drop_database().await;
}
