//! The embedded default as a durable single node (issue 26): teams, persons and plugin storage
//! live in `BASE_DIR/data/plugin-server.db`, so a token keeps its team and a user their person
//! across clean restarts and kill -9 after a 200, in whatever order tokens arrive.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{ServerProcess, post_batch as post, read_event_rows};
use crate::plugins::plugin_for_team_one;

async fn capture(addr: &str, token: &str, event: &str, distinct_id: &str, properties: Value) {
    let response = post(
        addr,
        token,
        json!([{"event": event, "distinct_id": distinct_id, "properties": properties}]),
    )
    .await;
    assert_eq!(response.status(), 200, "{event}");
}

fn start(base: &Path, extra: &[(&str, String)]) -> ServerProcess {
    plugin_server::telemetry::install_tls_provider();
    let mut env = vec![("BASE_DIR", base.to_str().expect("utf-8").to_owned())];
    env.extend(extra.iter().cloned());
    ServerProcess::start(&env)
}

/// The stored row of the event named `event`.
fn row(base: &Path, event: &str) -> Value {
    read_event_rows(base)
        .into_iter()
        .find(|row| row["event"] == event)
        .unwrap_or_else(|| panic!("no row for {event}"))
}

fn person_properties(row: &Value) -> Value {
    serde_json::from_str(
        row["person_properties"]
            .as_str()
            .expect("person_properties"),
    )
    .expect("json")
}

#[tokio::test]
async fn teams_and_persons_survive_kill_9_and_clean_restarts_in_any_arrival_order() {
    let base = tempfile::tempdir().expect("tempdir");
    let base = base.path();

    let first = start(base, &[]);
    let addr = first.addr();
    capture(
        &addr,
        "phc_alpha",
        "alpha 1",
        "user",
        json!({"$set": {"plan": "free"}}),
    )
    .await;
    capture(&addr, "phc_beta", "beta 1", "user", json!({})).await;
    // kill -9 right after the 200s.
    drop(first);

    let second = start(base, &[]);
    let addr = second.addr();
    capture(&addr, "phc_beta", "beta 2", "user", json!({})).await;
    capture(
        &addr,
        "phc_alpha",
        "alpha 2",
        "user",
        json!({"$set": {"seen": 2}}),
    )
    .await;
    crate::ingestion::terminate(second);

    let third = start(base, &[]);
    capture(&third.addr(), "phc_alpha", "alpha 3", "user", json!({})).await;

    for (event, team) in [
        ("alpha 1", 1),
        ("alpha 2", 1),
        ("alpha 3", 1),
        ("beta 1", 2),
        ("beta 2", 2),
    ] {
        assert_eq!(row(base, event)["team_id"], team, "{event}");
    }
    // One person for alpha's user throughout, holding what every run set.
    let person = row(base, "alpha 1")["person_id"].clone();
    assert_eq!(row(base, "alpha 2")["person_id"], person);
    assert_eq!(row(base, "alpha 3")["person_id"], person);
    let properties = person_properties(&row(base, "alpha 3"));
    assert_eq!(properties["plan"], "free", "{properties}");
    assert_eq!(properties["seen"], 2, "{properties}");
    // beta's user is another person: persons are per team.
    assert_ne!(row(base, "beta 1")["person_id"], person);
    assert_eq!(
        row(base, "beta 2")["person_id"],
        row(base, "beta 1")["person_id"]
    );
}

#[tokio::test]
async fn named_tokens_keep_their_ids_and_unknown_ones_can_be_refused() {
    let base = tempfile::tempdir().expect("tempdir");
    let configs = base.path().join("plugins.toml");
    std::fs::write(&configs, "[[team]]\nid = 7\ntoken = \"phc_known\"\n").expect("configs");
    let server = start(
        base.path(),
        &[
            (
                "PLUGINS_CONFIG_FILE",
                configs.to_str().expect("utf-8").to_owned(),
            ),
            ("EMBEDDED_UNKNOWN_TOKENS", "refuse".to_owned()),
        ],
    );
    let refused = post(
        &server.addr(),
        "phc_stranger",
        json!([{"event": "e", "distinct_id": "u"}]),
    )
    .await;
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.json::<Value>().await.expect("json"),
        json!({
            "type": "authentication_error",
            "code": "invalid_api_key",
            "detail": "Project API key invalid. You can find your project API key in PostHog project settings.",
        })
    );
    capture(&server.addr(), "phc_known", "known", "u", json!({})).await;
    assert_eq!(row(base.path(), "known")["team_id"], 7);
    assert_eq!(
        read_event_rows(base.path()).len(),
        1,
        "nothing of the stranger's"
    );
}

/// `meta.storage` is in the embedded database: a counter a plugin keeps goes on after kill -9.
#[tokio::test]
async fn plugin_storage_survives_kill_9() {
    let base = tempfile::tempdir().expect("tempdir");
    let configs = plugin_for_team_one(
        base.path(),
        "counter",
        "exports.processEvent = async (event, { storage }) => {
            const seen = (await storage.get('seen', 0)) + 1
            await storage.set('seen', seen)
            event.properties.seen = seen
            return event
        }",
    );
    let env = [(
        "PLUGINS_CONFIG_FILE",
        configs.to_str().expect("utf-8").to_owned(),
    )];
    let first = start(base.path(), &env);
    capture(&first.addr(), "phc_counter", "first", "u", json!({})).await;
    drop(first);
    let second = start(base.path(), &env);
    capture(&second.addr(), "phc_counter", "second", "u", json!({})).await;
    assert_eq!(row(base.path(), "first")["properties"]["seen"], 1);
    assert_eq!(row(base.path(), "second")["properties"]["seen"], 2);
}

/// A job queued with `runIn` is in the embedded database: the server killed right after the
/// 200 that queued it runs it once, on the next start, when it is due.
#[tokio::test]
async fn a_job_queued_before_kill_9_runs_once_after_the_restart() {
    use std::time::Duration;

    let mut destination = crate::common::HttpRecorder::start().await;
    let base = tempfile::tempdir().expect("tempdir");
    let configs = plugin_for_team_one(
        base.path(),
        "later",
        "exports.processEvent = async (event, { jobs }) => {
            await jobs.ping({ n: event.properties.n }).runIn(3, 'seconds')
            return event
        }
        exports.jobs = {
            ping: async ({ n }, { config }) => {
                await fetch(config.url + '/ping', { method: 'POST', body: JSON.stringify({ n }) })
            },
        }",
    );
    let text = std::fs::read_to_string(&configs).expect("configs");
    std::fs::write(
        &configs,
        format!("{text}config = {{ url = \"{}\" }}\n", destination.url),
    )
    .expect("configs");
    let env = [(
        "PLUGINS_CONFIG_FILE",
        configs.to_str().expect("utf-8").to_owned(),
    )];
    let first = start(base.path(), &env);
    capture(&first.addr(), "phc_jobs", "queue", "u", json!({"n": 7})).await;
    drop(first);
    assert!(
        destination.next(Duration::from_secs(4)).await.is_none(),
        "nothing runs while the server is down"
    );

    let _second = start(base.path(), &env);
    let (method, path, body) = destination
        .next(Duration::from_secs(30))
        .await
        .expect("the job ran after the restart");
    assert_eq!((method.as_str(), path.as_str()), ("POST", "/ping"));
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!({"n": 7})
    );
    assert!(
        destination.next(Duration::from_secs(5)).await.is_none(),
        "the job ran once"
    );
}
