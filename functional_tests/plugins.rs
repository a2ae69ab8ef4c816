//! Plugins in the running server: the embedded profile's plugin directory, and PostHog's
//! Postgres tables (source plugins, zip archives, config errors written back).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{FreshPostgres, ServerProcess, read_event_rows};
use serde_json::{Value, json};

/// ESM TypeScript: an enum, interface, a type-only scaffold import, `url`, config, capture.
const TS_PLUGIN: &str = r#"
import { PluginEvent, PluginMeta } from '@posthog/plugin-scaffold'
import { URL } from 'url'

enum Tag { Seen = 'seen_by_ts' }
interface Config { suffix: string }

export async function setupPlugin({ global, config }: PluginMeta<{ config: Config }>) {
    global.suffix = config.suffix as string
}

export function processEvent(event: PluginEvent, { global }: any): PluginEvent {
    const props = event.properties!
    if (props.$current_url) {
        props.host = new URL(props.$current_url as string).hostname
    }
    props.renamed = props.i
    delete props.i
    props[Tag.Seen] = true
    event.event = `${event.event}${global.suffix}`
    if (props.capture_derived) {
        posthog.capture('derived', { from: event.event })
    }
    return event
}
"#;

/// CommonJS, bundled to `dist/` and named by plugin.json's `main`, as repository plugins ship.
const CJS_PLUGIN: &str = r#"
const crypto = require('crypto')
module.exports = {
    processEvent(event) {
        event.properties.hash = crypto.createHash('sha256').update(event.distinct_id).digest('hex').slice(0, 8)
        return event
    },
}
"#;

const DROPPER: &str =
    "exports.processEvent = (event) => (event.event.startsWith('drop') ? null : event)";

/// Fails at load: the module is outside the allow-list.
const BROKEN: &str = "const fs = require('fs'); exports.processEvent = (e) => e";

fn write_plugin(root: &Path, name: &str, files: &[(&str, &str)]) {
    for (file, text) in files {
        let path = root.join("plugins").join(name).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// The embedded server over `root` with one plugin (`index.js` = `source`) enabled for team 1.
fn embedded_server_with_plugin(root: &Path, name: &str, source: &str) -> ServerProcess {
    let configs = plugin_for_team_one(root, name, source);
    ServerProcess::start(&[
        ("BASE_DIR", root.to_str().unwrap().to_owned()),
        ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
    ])
}

/// One plugin, `index.js` = `source`, enabled for team 1 (the embedded profile's first token):
/// written under `root`, with the configs file naming it, whose path is returned.
pub(crate) fn plugin_for_team_one(root: &Path, name: &str, source: &str) -> std::path::PathBuf {
    write_plugin(root, name, &[("index.js", source)]);
    let configs = root.join("plugins.toml");
    std::fs::write(
        &configs,
        format!("[[plugin_config]]\nplugin = \"{name}\"\nteam_id = 1\n"),
    )
    .unwrap();
    configs
}

async fn post_batch(addr: &str, token: &str, batch: Value) -> u16 {
    common::post_batch(addr, token, batch)
        .await
        .status()
        .as_u16()
}

/// `enabled` and the error message of `posthog_pluginconfig` row `id`, once it has an error
/// and `state` accepts its `enabled` (within 10 s).
async fn config_error_once(
    client: &tokio_postgres::Client,
    id: i32,
    state: impl Fn(bool) -> bool,
    what: &str,
) -> (bool, String) {
    crate::ingestion::wait_for_up_to(
        Duration::from_secs(10),
        &format!("config {id} {what}"),
        async || {
            let row = client
                .query_one(
                    "SELECT enabled, error FROM posthog_pluginconfig WHERE id = $1",
                    &[&id],
                )
                .await
                .ok()?;
            let error: Value = row.get::<_, Option<Value>>(1)?;
            let enabled: bool = row.get(0);
            state(enabled).then(|| {
                (
                    enabled,
                    error["message"].as_str().unwrap_or_default().to_owned(),
                )
            })
        },
    )
    .await
}

/// Issue 24 item 5, in the running server with its default PLUGIN_WORKER_ISOLATION=process: a
/// plugin that allocates until its memory limit stops it, and one whose regular expression
/// backtracks for ever (native code, which no deadline check reaches), each cost the server
/// nothing once contained: the process they stopped is ended, so the server's processes hold
/// about the memory they held before and the CPU goes idle; their events are stored marked
/// failed, and events after them keep flowing.
#[tokio::test]
async fn a_plugin_stopped_by_its_memory_limit_or_stuck_in_native_code_gives_back_memory_and_cpu() {
    plugin_server::telemetry::install_tls_provider();
    let base = tempfile::tempdir().unwrap();
    let root = base.path();
    write_plugin(
        root,
        "bomb",
        &[(
            "index.js",
            "exports.processEvent = (e) => { if (e.event === 'bomb') { let s = 'x'.repeat(1 << 16); const all = []; while (true) { all.push(s + all.length) } } return e }",
        )],
    );
    write_plugin(
        root,
        "spin",
        &[(
            "index.js",
            "exports.processEvent = (e) => { if (e.event === 'spin') { e.properties.matched = /(a+)+$/.test('a'.repeat(40) + 'b') } e.properties.seen = true; return e }",
        )],
    );
    let configs = root.join("plugins.toml");
    std::fs::write(
        &configs,
        "[[plugin_config]]\nplugin = \"bomb\"\nteam_id = 1\norder = 1\n\n[[plugin_config]]\nplugin = \"spin\"\nteam_id = 1\norder = 2\n",
    )
    .unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", root.to_str().unwrap().to_owned()),
        ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
        // A spinning call is given up after twice this.
        ("TASK_TIMEOUT", "1".to_owned()),
        ("WORKER_CONCURRENCY", "1".to_owned()),
    ]);
    let addr = server.addr();
    let pid = server.child.id();
    let send = |name: &'static str| {
        let addr = addr.clone();
        async move {
            let batch = json!([{"event": name, "distinct_id": "u1", "properties": {}}]);
            assert_eq!(post_batch(&addr, "phc_plugins", batch).await, 200);
        }
    };
    let stored = |name: &'static str| {
        let root = root.to_path_buf();
        async move {
            let rows = wait_for_rows(&root, |rows| rows.iter().any(|r| r["event"] == name)).await;
            rows.into_iter().find(|r| r["event"] == name).unwrap()
        }
    };

    // Both VMs built and called once: the level to come back to.
    send("warm").await;
    assert_eq!(stored("warm").await["properties"]["seen"], true);
    let workers_before = common::process_tree(pid).len();
    assert!(
        workers_before > 1,
        "the plugin workers are processes of the server"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = common::tree_rss_kib(pid);

    send("bomb").await;
    let bombed = stored("bomb").await;
    // The chain's call never ended: the event goes on marked failed by the whole chain.
    assert_eq!(
        bombed["properties"]["$plugins_failed"],
        json!(["bomb (1)", "spin (2)"]),
        "{bombed}"
    );
    send("spin").await;
    let spun = stored("spin").await;
    // The bomb's config is disabled by now: only the spin's ran.
    assert_eq!(
        spun["properties"]["$plugins_failed"],
        json!(["spin (2)"]),
        "{spun}"
    );
    send("after").await;
    stored("after").await;

    // The stopped processes are gone and replaced: as many as before.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(common::process_tree(pid).len(), workers_before);
    let rss_after = common::tree_rss_kib(pid);
    assert!(
        rss_after * 10 <= rss_before * 11,
        "resident memory of the server and its workers: {rss_before} KiB before, {rss_after} KiB after"
    );
    let cpu_before = common::tree_cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = common::tree_cpu_ticks(pid) - cpu_before;
    eprintln!(
        "server and workers: {rss_before} KiB before, {rss_after} KiB after, {busy} CPU ticks in 2 s after"
    );
    // Clock ticks are hundredths of a second here: a spinning core would be about 200.
    assert!(
        busy <= 20,
        "{busy} ticks of CPU in 2 s after the plugins were contained"
    );
    let actors = common::actors(&addr).await;
    assert_eq!(actors["plugin_vm_pool"]["workers_replaced"], 2, "{actors}");
}

/// A graceful stop (SIGTERM as an orchestrator sends it, SIGINT as a terminal's Ctrl-C does)
/// runs `teardownPlugin` in the plugin's worker process, whose `fetch` the server still serves,
/// before the server exits 0 and its worker processes with it.
#[tokio::test]
async fn a_graceful_stop_runs_teardown_plugin_in_the_worker_process() {
    plugin_server::telemetry::install_tls_provider();
    for signal in ["-TERM", "-INT"] {
        let mut recorder = common::HttpRecorder::start().await;
        let base = tempfile::tempdir().unwrap();
        let source = format!(
            "exports.processEvent = (e) => e; exports.teardownPlugin = async () => {{ await fetch('{}/bye', {{ method: 'POST', body: 'torn down' }}) }}",
            recorder.url
        );
        let configs = plugin_for_team_one(base.path(), "goodbye", &source);
        let mut server = ServerProcess::start(&[
            ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
            ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
        ]);
        let addr = server.addr();
        let batch = json!([{"event": "hello", "distinct_id": "u1", "properties": {}}]);
        assert_eq!(post_batch(&addr, "phc_plugins", batch).await, 200);
        wait_for_rows(base.path(), |rows| {
            rows.iter().any(|r| r["event"] == "hello")
        })
        .await;
        let pid = server.child.id();
        let workers = common::process_tree(pid);
        assert!(workers.len() > 1, "{signal}: worker processes");

        let sent = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let request = recorder
            .next_request(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("{signal}: teardownPlugin's fetch never came"));
        assert_eq!(
            (request.path.as_str(), request.body.as_str()),
            ("/bye", "torn down")
        );
        let status = server.child.wait().unwrap();
        assert!(status.success(), "{signal}: graceful exit, not {status}");
        for worker in &workers[1..] {
            let gone = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{worker}")).exists() {
                assert!(
                    Instant::now() < gone,
                    "{signal}: worker {worker} outlived the server"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn wait_for_rows(base_dir: &Path, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = read_event_rows(base_dir);
        if check(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "rows never matched: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether an event is personless is read before plugins run, as PostHog does: a plugin
/// adding `$process_person_profile: false` does not make it personless, one removing it does
/// not make it a person event, and a personless `$identify` is dropped before any plugin.
#[tokio::test]
async fn personless_is_decided_before_plugins() {
    plugin_server::telemetry::install_tls_provider();
    let base = tempfile::tempdir().unwrap();
    let server = embedded_server_with_plugin(
        base.path(),
        "flipper",
        "exports.processEvent = (event) => {
                if (event.event === '$identify') event.properties.reached_a_plugin = true
                if (event.event === 'flip') event.properties.$process_person_profile = false
                if (event.event === 'unflip') delete event.properties.$process_person_profile
                return event
            }",
    );
    let status = post_batch(
        &server.addr(),
        "phc_flip",
        json!([
            {"event": "flip", "distinct_id": "a", "properties": {"$set": {"k": 1}}},
            {"event": "unflip", "distinct_id": "b", "properties": {"$process_person_profile": false, "$set": {"k": 1}}},
            {"event": "$identify", "distinct_id": "c", "properties": {"$process_person_profile": false}},
            {"event": "after", "distinct_id": "d", "properties": {}},
        ]),
    )
    .await;
    assert_eq!(status, 200);
    wait_for_rows(base.path(), |rows| rows.len() >= 3).await;
    // Time for anything that should not be there to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = read_event_rows(base.path());
    let by_event = |name: &str| rows.iter().find(|row| row["event"] == name).cloned();
    let flip = by_event("flip").expect("flip stored");
    assert_eq!(flip["person_mode"], "full", "{flip}");
    assert!(flip["properties"].get("$process_person_profile").is_none());
    let person: Value =
        serde_json::from_str(flip["person_properties"].as_str().unwrap_or("null")).unwrap();
    assert_eq!(person["k"], 1, "{flip}");
    let unflip = by_event("unflip").expect("unflip stored");
    assert_eq!(unflip["person_mode"], "propertyless", "{unflip}");
    assert_eq!(unflip["properties"]["$process_person_profile"], false);
    assert!(unflip["properties"].get("$set").is_none());
    assert!(by_event("$identify").is_none(), "dropped: {rows:#?}");
    assert_eq!(rows.len(), 3, "{rows:#?}");
    drop(server);
}

/// Plugins see the event as it was sent (PostHog runs processEvent before normalizing): no
/// derived `$set_once` of `$initial_*`, `$set` of campaign keys or `$ip` among its properties;
/// the stored row still has all of them.
#[tokio::test]
async fn plugins_see_the_properties_that_were_sent_and_rows_get_the_derived_ones() {
    plugin_server::telemetry::install_tls_provider();
    let base = tempfile::tempdir().unwrap();
    let server = embedded_server_with_plugin(
        base.path(),
        "lister",
        "exports.processEvent = (event) => {
                event.properties.seen_keys = Object.keys(event.properties).join(',')
                event.properties.seen_set = event.$set === undefined ? null : Object.keys(event.$set).join(',')
                return event
            }",
    );
    let status = post_batch(
        &server.addr(),
        "phc_lister",
        json!([{
            "event": "$pageview",
            "distinct_id": "sent-as-is",
            "$set": {"top": 1},
            "properties": {
                "$current_url": "https://example.com/landing",
                "utm_source": "newsletter",
                "plan": "free",
            },
        }]),
    )
    .await;
    assert_eq!(status, 200);
    let rows = wait_for_rows(base.path(), |rows| !rows.is_empty()).await;
    let properties = &rows[0]["properties"];
    assert_eq!(
        properties["seen_keys"], "$current_url,utm_source,plan",
        "the plugin saw only what was sent: {properties}"
    );
    assert_eq!(properties["seen_set"], "top", "{properties}");
    assert_eq!(
        properties["$set_once"],
        json!({
            "$initial_current_url": "https://example.com/landing",
            "$initial_utm_source": "newsletter",
        }),
        "{properties}"
    );
    assert_eq!(
        properties["$set"],
        json!({"top": 1, "utm_source": "newsletter"}),
        "{properties}"
    );
    assert!(properties.get("$ip").is_some(), "{properties}");
    let person: Value =
        serde_json::from_str(rows[0]["person_properties"].as_str().unwrap_or("null")).unwrap();
    assert_eq!(person["$initial_utm_source"], "newsletter", "{person}");
    assert_eq!(person["top"], 1, "{person}");
    drop(server);
}

/// What a plugin returns is stored as `JSON.stringify` would write it (as PostHog's Node
/// server does): a `Date` as its ISO string, a getter's value, no function or non-enumerable
/// key, integers as integers; and a property the client sent with an escaped lone surrogate
/// (kept raw until a step reads it) still reaches the plugin.
#[tokio::test]
async fn a_plugins_result_is_stored_as_json_stringify_writes_it() {
    plugin_server::telemetry::install_tls_provider();
    let base = tempfile::tempdir().unwrap();
    let server = embedded_server_with_plugin(
        base.path(),
        "shaper",
        "exports.processEvent = (event) => {
                event.properties.at = new Date(0)
                event.properties.whole = 7.5 * 2
                event.properties.hidden_fn = () => 1
                Object.defineProperty(event.properties, 'computed', { get() { return 'got ' + this.plan }, enumerable: true })
                Object.defineProperty(event.properties, 'secret', { value: 'x', enumerable: false })
                event.properties.odd_seen = event.properties.odd.length
                return event
            }",
    );
    // `\ud800` is an escape in the request's JSON text: a lone surrogate, as browsers send.
    let body = r#"[{"event": "shaped", "distinct_id": "d1",
                    "properties": {"plan": "free", "odd": "a\ud800b"}}]"#;
    let status = reqwest::Client::new()
        .post(format!("http://{}/batch", server.addr()))
        .header("Content-Type", "application/json")
        .body(format!(r#"{{"api_key": "phc_shaper", "batch": {body}}}"#))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 200);
    let rows = wait_for_rows(base.path(), |rows| !rows.is_empty()).await;
    let properties = &rows[0]["properties"];
    assert_eq!(properties["at"], "1970-01-01T00:00:00.000Z", "{properties}");
    assert_eq!(properties["whole"], json!(15), "{properties}");
    assert!(properties.get("hidden_fn").is_none(), "{properties}");
    assert_eq!(properties["computed"], "got free", "{properties}");
    assert!(properties.get("secret").is_none(), "{properties}");
    assert_eq!(properties["odd_seen"], 3, "{properties}");
    assert_eq!(
        properties["$plugins_succeeded"],
        json!(["shaper (1)"]),
        "{properties}"
    );
    drop(server);
}

/// The repository's sample (config/plugins.toml enabling plugins/hello-world for team 1)
/// changes the first event a new user sends, as the README and the config file promise.
#[tokio::test]
async fn the_first_run_sample_plugin_greets_the_first_event() {
    plugin_server::telemetry::install_tls_provider();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = tempfile::tempdir().unwrap();
    let sample = root.join("plugins/hello-world");
    let copy = base.path().join("plugins/hello-world");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["plugin.json", "index.ts"] {
        std::fs::copy(sample.join(file), copy.join(file)).unwrap();
    }
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        (
            "PLUGINS_CONFIG_FILE",
            root.join("config/plugins.toml")
                .to_str()
                .unwrap()
                .to_owned(),
        ),
    ]);
    let response = reqwest::Client::new()
        .post(format!("http://{}/capture", server.addr()))
        .header("Content-Type", "application/json")
        .body(
            json!({"api_key": "phc_first", "event": "$pageview", "distinct_id": "me",
                   "properties": {"$current_url": "https://example.com/a"}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rows = wait_for_rows(base.path(), |rows| !rows.is_empty()).await;
    assert_eq!(rows[0]["team_id"], 1);
    assert_eq!(
        rows[0]["properties"]["greeting"],
        "hello from plugin-server"
    );
    assert_eq!(rows[0]["properties"]["$host"], "example.com");
    assert_eq!(
        rows[0]["properties"]["$plugins_succeeded"],
        json!(["hello-world (1)"])
    );
    drop(server);
}

/// The compose deployment's sample: docker/seed.sql on a migrated database enables the image's
/// hello-world plugin (a `local` plugin at BASE_DIR/plugins) for the `phc_compose` token.
#[tokio::test]
async fn the_compose_seed_enables_the_sample_plugin_from_postgres() {
    plugin_server::telemetry::install_tls_provider();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let database = FreshPostgres::create().await;
    common::migrate(&[("DATABASE_URL", &database.url)]);
    let client = database.client().await;
    let seed = std::fs::read_to_string(root.join("docker/seed.sql")).unwrap();
    client.batch_execute(&seed).await.unwrap();
    // Idempotent: compose runs it on every start.
    client.batch_execute(&seed).await.unwrap();
    // The image's layout: the sample in BASE_DIR/plugins, BASE_DIR=/app/data.
    let app = tempfile::tempdir().unwrap();
    let copy = app.path().join("data/plugins/hello-world");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["plugin.json", "index.ts"] {
        std::fs::copy(root.join("plugins/hello-world").join(file), copy.join(file)).unwrap();
    }
    let base = app.path().join("data");
    std::fs::create_dir_all(&base).unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.to_str().unwrap().to_owned()),
        ("DATABASE_URL", database.url.clone()),
    ]);
    let status = post_batch(
        &server.addr(),
        "phc_compose",
        json!([{"event": "$pageview", "distinct_id": "me",
                "properties": {"$current_url": "https://example.com/a"}}]),
    )
    .await;
    assert_eq!(status, 200);
    let rows = wait_for_rows(&base, |rows| !rows.is_empty()).await;
    assert_eq!(rows[0]["team_id"], 1);
    assert_eq!(
        rows[0]["properties"]["greeting"],
        "hello from plugin-server"
    );
    assert_eq!(
        rows[0]["properties"]["$plugins_succeeded"],
        json!(["Hello World (1)"])
    );
    drop(server);
}

#[tokio::test]
async fn the_embedded_profile_runs_a_plugin_chain_from_the_plugins_directory() {
    plugin_server::telemetry::install_tls_provider();
    let base = tempfile::tempdir().unwrap();
    write_plugin(base.path(), "ts-suffix", &[("index.ts", TS_PLUGIN)]);
    write_plugin(
        base.path(),
        "bundled-hash",
        &[
            (
                "plugin.json",
                r#"{"name": "bundled", "main": "dist/index.js"}"#,
            ),
            ("dist/index.js", CJS_PLUGIN),
        ],
    );
    write_plugin(base.path(), "dropper", &[("index.js", DROPPER)]);
    write_plugin(base.path(), "broken", &[("index.js", BROKEN)]);
    let configs = base.path().join("plugins.toml");
    std::fs::write(
        &configs,
        r#"
        [[plugin_config]]
        plugin = "bundled-hash"
        team_id = 1
        order = 2

        [[plugin_config]]
        plugin = "ts-suffix"
        team_id = 1
        order = 1
        config = { suffix = "_ts" }

        [[plugin_config]]
        plugin = "dropper"
        team_id = 1
        order = 3

        [[plugin_config]]
        plugin = "broken"
        team_id = 1
        order = 4
        "#,
    )
    .unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
    ]);
    let addr = server.addr();

    let status = post_batch(
        &addr,
        "phc_plugins",
        json!([
            {"event": "$pageview", "distinct_id": "u1", "properties": {"$current_url": "https://example.com/a", "i": 7}},
            {"event": "drop_me", "distinct_id": "u2", "properties": {}},
            {"event": "signup", "distinct_id": "u3", "properties": {"capture_derived": true}},
        ]),
    )
    .await;
    assert_eq!(status, 200);

    // `posthog.capture` re-ingests asynchronously, through the whole pipeline including this
    // team's plugins (as in PostHog), so the derived event gets the suffix too.
    let rows = wait_for_rows(base.path(), |rows| {
        rows.iter().any(|r| r["event"] == "derived_ts")
    })
    .await;
    let pageview = rows
        .iter()
        .find(|r| r["distinct_id"] == "u1")
        .expect("pageview row");
    assert_eq!(pageview["event"], "$pageview_ts");
    let props = &pageview["properties"];
    assert_eq!(props["host"], "example.com");
    assert_eq!(props["renamed"], 7);
    assert!(props.get("i").is_none());
    assert_eq!(props["seen_by_ts"], true);
    assert_eq!(props["hash"].as_str().map(str::len), Some(8));
    // Chain order is `order`; the config ids follow the file order (1-based).
    assert_eq!(
        props["$plugins_succeeded"],
        json!(["ts-suffix (2)", "bundled-hash (1)", "dropper (3)"])
    );
    assert_eq!(props["$plugins_failed"], json!(["broken (4)"]));

    assert!(
        !rows.iter().any(|r| r["distinct_id"] == "u2"),
        "dropped by the plugin"
    );
    let derived = rows
        .iter()
        .find(|r| r["event"] == "derived_ts")
        .expect("captured event");
    assert_eq!(derived["properties"]["from"], "signup_ts");
    assert_eq!(derived["properties"]["$lib"], "posthog-plugin-server");
    assert_eq!(derived["distinct_id"], "ts-suffix");

    // `/_actors` shows the pool: three live VMs (the broken plugin never loaded) on each
    // worker thread that the team's distinct ids went to, and the heap they took to load.
    let actors = common::actors(&addr).await;
    let pool = &actors["plugin_vm_pool"];
    assert_eq!(pool["configs"], 4, "{pool}");
    let per_worker: Vec<i64> = pool["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|worker| worker["vms"].as_i64().expect("vms"))
        .collect();
    assert!(per_worker.iter().all(|&vms| vms == 0 || vms == 3), "{pool}");
    assert!(pool["vms"].as_i64().unwrap_or(0) >= 3, "{pool}");
    let heap = pool["vm_heap_bytes_at_load"].as_i64().unwrap_or(0);
    assert!((100_000..50_000_000).contains(&heap), "{pool}");
    drop(server);
}

/// Uses the cursor, storage and the cache; the cursor value shows in the event.
const STATEFUL: &str = r#"
exports.processEvent = async (event, { cache, storage, utils }) => {
    await utils.cursor.init('n', 100)
    event.properties.cursor = await utils.cursor.increment('n')
    await cache.set('last', event.distinct_id)
    await storage.set('last', { id: event.distinct_id })
    return event
}
"#;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn zip_archive(files: &[(&str, &str)]) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        for (name, text) in files {
            zip.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(text.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
    }
    buffer.into_inner()
}

#[tokio::test]
async fn plugins_load_from_posthog_tables_failed_setups_disable_and_load_failures_are_reported() {
    plugin_server::telemetry::install_tls_provider();
    let database = FreshPostgres::create().await;
    common::migrate(&[("DATABASE_URL", &database.url)]);
    let client = database.client().await;
    let archive = zip_archive(&[
        (
            "plugin-repo-main/plugin.json",
            r#"{"name": "from zip", "main": "dist/plugin.js"}"#,
        ),
        ("plugin-repo-main/dist/plugin.js", CJS_PLUGIN),
    ]);
    client
        .batch_execute(
            "INSERT INTO posthog_organization (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'org');
             INSERT INTO posthog_team (id, organization_id, api_token) VALUES (2, '00000000-0000-0000-0000-000000000001', 'phc_pg');
             INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, updated_at)
                 VALUES (1, '00000000-0000-0000-0000-000000000001', 'source', 'ts source', now()),
                        (3, '00000000-0000-0000-0000-000000000001', 'source', 'failing setup', now()),
                        (4, '00000000-0000-0000-0000-000000000001', 'source', 'disabled one', now()),
                        (5, '00000000-0000-0000-0000-000000000001', 'source', 'stateful', now()),
                        (6, '00000000-0000-0000-0000-000000000001', 'source', 'snowflake export', now());",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, archive, updated_at)
             VALUES (2, '00000000-0000-0000-0000-000000000001', 'repository', 'zip plugin', $1, now())",
            &[&archive],
        )
        .await
        .unwrap();
    for (plugin_id, file, source) in [
        (1, "index.ts", TS_PLUGIN),
        (
            3,
            "index.js",
            "exports.setupPlugin = () => { throw new Error('missing API key') }; exports.processEvent = (e) => e",
        ),
        (
            4,
            "index.js",
            "exports.processEvent = (e) => { e.event = 'never'; return e }",
        ),
        (5, "index.js", STATEFUL),
        (
            6,
            "index.js",
            "const snowflake = require('snowflake-sdk'); exports.processEvent = (e) => e",
        ),
    ] {
        client
            .execute(
                "INSERT INTO posthog_pluginsourcefile (plugin_id, filename, source) VALUES ($1, $2, $3)",
                &[&plugin_id, &file, &source],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            r#"INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, "order", config) VALUES
                 (10, 2, 1, true, 1, '{"suffix": "_pg"}'),
                 (11, 2, 2, true, 2, '{}'),
                 (12, 2, 3, true, 3, '{}'),
                 (13, 2, 4, false, 4, '{}'),
                 (14, 2, 5, true, 5, '{}'),
                 (15, 2, 6, true, 6, '{}');"#,
        )
        .await
        .unwrap();

    let base = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("DATABASE_URL", database.url.clone()),
        ("REDIS_URL", redis_url()),
    ]);
    let status = post_batch(
        &server.addr(),
        "phc_pg",
        json!([{"event": "e", "distinct_id": "d1", "properties": {"i": 1}}]),
    )
    .await;
    assert_eq!(status, 200);
    let rows = read_event_rows(base.path());
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let props = &rows[0]["properties"];
    assert_eq!(rows[0]["event"], "e_pg");
    assert_eq!(rows[0]["team_id"], 2);
    assert_eq!(props["renamed"], 1);
    assert_eq!(props["hash"].as_str().map(str::len), Some(8));
    assert_eq!(
        props["$plugins_succeeded"],
        json!(["ts source (10)", "zip plugin (11)", "stateful (14)"])
    );
    assert_eq!(
        props["$plugins_failed"],
        json!(["failing setup (12)", "snowflake export (15)"])
    );
    assert_eq!(props["cursor"], 101);

    // meta.storage and meta.utils.cursor live in posthog_pluginstorage, meta.cache in Redis
    // under PostHog's `@plugin/<pluginId>/<teamId>/` keys.
    let stored: Vec<(String, String)> = client
        .query(
            "SELECT key, value FROM posthog_pluginstorage WHERE plugin_config_id = 14 ORDER BY key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        stored,
        [
            ("last".to_owned(), r#"{"id":"d1"}"#.to_owned()),
            ("n".to_owned(), "101".to_owned())
        ]
    );
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cached: Option<String> = redis::cmd("GET")
        .arg("@plugin/5/2/last")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(cached.as_deref(), Some(r#""d1""#));

    // PostHog records the error on the config and disables it.
    let (_, message) = config_error_once(&client, 12, |enabled| !enabled, "disabled").await;
    assert!(message.contains("missing API key"), "{message}");
    // A plugin that cannot load here (a module outside the allow-list) gets its error
    // recorded but stays enabled: PostHog's own server, sharing the database, may run it.
    let (enabled, message) = config_error_once(&client, 15, |_| true, "given its load error").await;
    assert!(message.contains("snowflake-sdk"), "{message}");
    assert!(enabled, "a plugin that cannot load is not disabled");
    drop(server);
    drop(client);
    database.drop_database().await;
}

/// Logs with one INFO and one ERROR line, and fails on events named `fail`.
const CHATTY: &str = r#"
exports.processEvent = (event) => {
    console.info('info line', event.event)
    console.error('error line', event.event)
    if (event.event === 'fail') throw new TypeError('cannot handle fail')
    return event
}
"#;

#[tokio::test]
async fn plugin_logs_app_metrics_and_unforwardable_recordings_reach_clickhouse() {
    plugin_server::telemetry::install_tls_provider();
    let database = common::unique_name("ps_plugins");
    let env = [
        ("CLICKHOUSE_HOST", common::clickhouse_http_url()),
        ("CLICKHOUSE_DATABASE", database.clone()),
    ];
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::migrate(&env_refs);

    let base = tempfile::tempdir().unwrap();
    write_plugin(base.path(), "chatty", &[("index.js", CHATTY)]);
    let configs = base.path().join("plugins.toml");
    // log_level 2 drops LOG and INFO: only the ERROR console line and the failure are kept.
    std::fs::write(
        &configs,
        "[[plugin_config]]\nplugin = \"chatty\"\nteam_id = 1\nlog_level = 2\n",
    )
    .unwrap();
    let mut server_env: Vec<(&str, String)> = env.to_vec();
    server_env.extend([
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
        ("APP_METRICS_FLUSH_FREQUENCY_MS", "100".to_owned()),
    ]);
    let server = ServerProcess::start(&server_env);
    let status = post_batch(
        &server.addr(),
        "phc_chatty",
        json!([
            {"event": "ok", "distinct_id": "a"},
            {"event": "ok", "distinct_id": "b"},
            {"event": "fail", "distinct_id": "c"},
            // ClickHouse without Kafka has nowhere to forward a recording: dead-lettered.
            {"event": "$snapshot", "distinct_id": "d", "properties": {"$session_id": "s1", "$snapshot_data": {"x": 1}}},
        ]),
    )
    .await;
    assert_eq!(status, 200);
    let letters = common::clickhouse_query(&format!(
        "SELECT event, error, raw_payload FROM {database}.events_dead_letter_queue FORMAT JSONEachRow"
    ))
    .await;
    let letters: Vec<Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["event"], "$snapshot");
    assert!(
        letters[0]["error"]
            .as_str()
            .is_some_and(|error| error.contains("KAFKA_HOSTS")),
        "{letters:#?}"
    );
    assert!(
        letters[0]["raw_payload"]
            .as_str()
            .is_some_and(|raw| raw.contains("$snapshot_data")),
        "{letters:#?}"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let (logs, metrics) = loop {
        let logs = common::clickhouse_query(&format!(
            "SELECT source, type, message FROM {database}.plugin_log_entries WHERE plugin_config_id = 1 \
             ORDER BY source, message FORMAT JSONEachRow"
        ))
        .await;
        let metrics = common::clickhouse_query(&format!(
            "SELECT category, error_type, sum(successes) AS s, sum(failures) AS f FROM {database}.app_metrics \
             WHERE plugin_config_id = 1 GROUP BY category, error_type ORDER BY error_type FORMAT JSONEachRow"
        ))
        .await;
        let logs: Vec<Value> = logs
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let metrics: Vec<Value> = metrics
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if logs.len() >= 4 && metrics.len() >= 2 {
            break (logs, metrics);
        }
        assert!(
            Instant::now() < deadline,
            "logs {logs:#?} metrics {metrics:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let console: Vec<&Value> = logs.iter().filter(|l| l["source"] == "CONSOLE").collect();
    assert_eq!(console.len(), 3, "{logs:#?}");
    assert!(
        console.iter().all(|l| l["type"] == "ERROR"),
        "INFO is below log_level 2: {logs:#?}"
    );
    let plugin: Vec<&Value> = logs.iter().filter(|l| l["source"] == "PLUGIN").collect();
    assert_eq!(plugin.len(), 1, "{logs:#?}");
    assert!(
        plugin[0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot handle fail")
    );
    assert_eq!(metrics[0]["category"], "processEvent");
    assert_eq!(
        (metrics[0]["error_type"].as_str(), metrics[0]["s"].as_str()),
        (Some(""), Some("2")),
        "{metrics:#?}"
    );
    assert_eq!(
        (metrics[1]["error_type"].as_str(), metrics[1]["f"].as_str()),
        (Some("TypeError"), Some("1")),
        "{metrics:#?}"
    );
    drop(server);
    common::clickhouse_query(&format!("DROP DATABASE IF EXISTS {database}")).await;
}

/// onEvent with a RetryError on its first try, composeWebhook and exportEvents, all against a
/// real HTTP destination.
const POST_INGESTION: &str = r#"
exports.onEvent = async (event, { config, global }) => {
    if (event.event === 'flaky' && !global.retried) {
        global.retried = true
        throw new RetryError('try again later')
    }
    await fetch(config.url + '/on-event', {
        method: 'POST',
        body: JSON.stringify({ event: event.event, uuid: event.uuid, elements: event.elements, team_id: event.team_id, properties: event.properties }),
    })
}
exports.composeWebhook = (event, { config }) =>
    event.event === 'flaky' ? null : { url: config.url + '/webhook', body: JSON.stringify({ hooked: event.event }) }
exports.exportEvents = async (events, { config }) => {
    await fetch(config.url + '/export', { method: 'POST', body: JSON.stringify(events.map((e) => e.event)) })
}
"#;

/// The cluster profile's queue (Redis) carries stored events to onEvent, composeWebhook and
/// exportEvents; a RetryError comes back 5 s later through the queue's delayed delivery.
#[tokio::test]
async fn stored_events_reach_on_event_webhooks_and_exports_through_the_redis_queue() {
    plugin_server::telemetry::install_tls_provider();
    let mut destination = common::HttpRecorder::start().await;
    let base = tempfile::tempdir().unwrap();
    write_plugin(base.path(), "after", &[("index.js", POST_INGESTION)]);
    let configs = base.path().join("plugins.toml");
    std::fs::write(
        &configs,
        format!(
            r#"
            [[plugin_config]]
            plugin = "after"
            team_id = 1
            config = {{ url = "{}", exportEventsBufferSeconds = "1" }}
            "#,
            destination.url
        ),
    )
    .unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
        ("REDIS_URL", redis_url()),
        // Each run gets its own queue keys.
        ("CLUSTER_PREFIX", format!("ft-post-{}:", std::process::id())),
    ]);
    let status = post_batch(
        &server.addr(),
        "phc_post",
        json!([
            {"event": "$autocapture", "distinct_id": "u1", "properties": {"$elements": [
                {"tag_name": "div", "nth_child": 1, "nth_of_type": 2, "$el_text": "💻"}
            ]}},
            {"event": "flaky", "distinct_id": "u2", "properties": {"a": 1}},
        ]),
    )
    .await;
    assert_eq!(status, 200);

    let mut seen: Vec<(String, String, Value)> = Vec::new();
    let started = Instant::now();
    // on-event ×2 (one after its retry), one webhook, one export of both events.
    while seen.len() < 4 {
        let Some((method, path, body)) = destination.next(Duration::from_secs(30)).await else {
            panic!("only {} requests arrived: {seen:#?}", seen.len());
        };
        seen.push((
            method,
            path,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        ));
    }
    let elapsed = started.elapsed();
    let on_event: Vec<&Value> = seen
        .iter()
        .filter(|(_, path, _)| path == "/on-event")
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(on_event.len(), 2, "{seen:#?}");
    let autocapture = on_event
        .iter()
        .find(|b| b["event"] == "$autocapture")
        .expect("autocapture onEvent");
    assert_eq!(autocapture["team_id"], 1);
    assert_eq!(
        autocapture["elements"],
        json!([{"attributes": {}, "order": 0, "tag_name": "div", "nth_child": 1,
                "nth_of_type": 2, "text": "💻", "$el_text": "💻"}])
    );
    assert!(autocapture["uuid"].as_str().is_some_and(|u| u.len() == 36));
    let flaky = on_event
        .iter()
        .find(|b| b["event"] == "flaky")
        .expect("flaky onEvent after its retry");
    assert_eq!(flaky["properties"]["a"], 1);
    assert!(
        elapsed >= Duration::from_secs(4),
        "the retry waited PostHog's 5 s: {elapsed:?}"
    );
    let webhooks: Vec<&(String, String, Value)> = seen
        .iter()
        .filter(|(_, path, _)| path == "/webhook")
        .collect();
    assert_eq!(webhooks.len(), 1, "{seen:#?}");
    assert_eq!(webhooks[0].0, "POST");
    assert_eq!(webhooks[0].2, json!({"hooked": "$autocapture"}));
    let exports: Vec<&Value> = seen
        .iter()
        .filter(|(_, path, _)| path == "/export")
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(
        exports,
        vec![&json!(["$autocapture", "flaky"])],
        "{seen:#?}"
    );
    // Nothing more: the retry ran onEvent alone.
    assert!(destination.next(Duration::from_secs(2)).await.is_none());
    drop(server);
}

/// A webhook plugin whose config filters (`posthog_pluginconfig.filters`) pick the events:
/// purchases over 100 by "pro" persons, and checkout page views.
#[tokio::test]
async fn compose_webhook_sees_only_events_that_pass_the_configs_filters() {
    plugin_server::telemetry::install_tls_provider();
    let mut destination = common::HttpRecorder::start().await;
    let database = FreshPostgres::create().await;
    common::migrate(&[("DATABASE_URL", &database.url)]);
    let client = database.client().await;
    common::SourcePlugin {
        team_id: 2,
        token: "phc_filters",
        name: "hooks",
        file_name: "index.js",
        source: "exports.composeWebhook = (event, { config }) => ({ url: config.url + '/hook', \
                 body: JSON.stringify({ event: event.event, distinct_id: event.distinct_id, \
                 amount: event.properties.amount, url: event.properties.$current_url }) })",
        config: json!({"url": destination.url}),
        filters: Some(json!({"events": [
            {"id": "buy", "name": "buy", "type": "events", "order": 0, "properties": [
                {"key": "amount", "operator": "gt", "value": 100, "type": "event"},
                {"key": "plan", "operator": "exact", "value": ["pro"], "type": "person"}
            ]},
            {"id": "$pageview", "name": "$pageview", "type": "events", "order": 1, "properties": [
                {"key": "$current_url", "operator": "icontains", "value": "CHECKOUT", "type": "event"}
            ]}
        ]})),
    }
    .insert(&client)
    .await;
    let base = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("DATABASE_URL", database.url.clone()),
    ]);
    let status = post_batch(
        &server.addr(),
        "phc_filters",
        json!([
            {"event": "$identify", "distinct_id": "pro-user", "properties": {"$set": {"plan": "pro"}}},
            {"event": "buy", "distinct_id": "pro-user", "properties": {"amount": 150}},
            {"event": "buy", "distinct_id": "free-user", "properties": {"amount": 150, "$set": {"plan": "free"}}},
            {"event": "buy", "distinct_id": "pro-user", "properties": {"amount": "50"}},
            {"event": "$pageview", "distinct_id": "pro-user", "properties": {"$current_url": "https://shop.example/Checkout/1"}},
            {"event": "$pageview", "distinct_id": "pro-user", "properties": {"$current_url": "https://shop.example/home"}},
        ]),
    )
    .await;
    assert_eq!(status, 200);
    let mut hooks = Vec::new();
    while hooks.len() < 2 {
        let Some((method, path, body)) = destination.next(Duration::from_secs(30)).await else {
            panic!("only {} webhooks arrived: {hooks:#?}", hooks.len());
        };
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/hook"));
        hooks.push(serde_json::from_str::<Value>(&body).unwrap());
    }
    hooks.sort_by_key(|hook| hook["event"].as_str().map(str::to_owned));
    assert_eq!(
        hooks,
        vec![
            json!({"event": "$pageview", "distinct_id": "pro-user", "url": "https://shop.example/Checkout/1"}),
            json!({"event": "buy", "distinct_id": "pro-user", "amount": 150}),
        ]
    );
    // The four events the filters turn away compose nothing.
    assert!(destination.next(Duration::from_secs(2)).await.is_none());
    drop(server);
}

/// The GeoIP plugin of this project's tests (TypeScript, ESM), doing what PostHog's does.
const GEOIP_PLUGIN: &str = include_str!("fixtures/geoip/index.ts");

/// MMDB_FILE_LOCATION (the real GeoLite2 City) feeds `meta.geoip.locate` in the running server.
#[tokio::test]
async fn meta_geoip_locates_with_the_database_at_mmdb_file_location() {
    plugin_server::telemetry::install_tls_provider();
    let mmdb =
        std::env::var("GEOIP_TEST_MMDB").expect("GEOIP_TEST_MMDB: run functional_tests/run.sh");
    let base = tempfile::tempdir().unwrap();
    write_plugin(base.path(), "geoip", &[("index.ts", GEOIP_PLUGIN)]);
    let configs = base.path().join("plugins.toml");
    std::fs::write(
        &configs,
        "[[plugin_config]]\nplugin = \"geoip\"\nteam_id = 1\n",
    )
    .unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
        ("MMDB_FILE_LOCATION", mmdb),
    ]);
    let addr = server.addr();
    // The database loads in the background after start; probe until it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probe = 0;
    let located = loop {
        probe += 1;
        let distinct_id = format!("probe-{probe}");
        let status = post_batch(
            &addr,
            "phc_geo",
            json!([{"event": "$pageview", "distinct_id": distinct_id, "properties": {"$ip": "81.2.69.142"}}]),
        )
        .await;
        assert_eq!(status, 200);
        let rows = wait_for_rows(base.path(), |rows| {
            rows.iter().any(|r| r["distinct_id"] == distinct_id)
        })
        .await;
        let row = rows
            .into_iter()
            .find(|r| r["distinct_id"] == distinct_id)
            .unwrap();
        if row["properties"].get("$geoip_city_name").is_some() {
            break row;
        }
        assert!(Instant::now() < deadline, "never located: {row}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let props = &located["properties"];
    assert_eq!(props["$geoip_city_name"], "East Finchley");
    assert_eq!(props["$geoip_country_code"], "GB");
    assert_eq!(props["$geoip_country_name"], "United Kingdom");
    assert_eq!(props["$geoip_time_zone"], "Europe/London");
    assert_eq!(props["$geoip_continent_code"], "EU");
    assert_eq!(props["$geoip_subdivision_1_code"], "ENG");
    assert_eq!(props["$set"]["$geoip_city_name"], "East Finchley");
    assert_eq!(props["$set_once"]["$initial_geoip_country_code"], "GB");
    // A private address is not located.
    let row = post_and_read(&addr, base.path(), "private", "10.1.2.3").await;
    assert!(row["properties"].get("$geoip_city_name").is_none(), "{row}");
    drop(server);

    // DISABLE_MMDB: the same database is never read.
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
        (
            "MMDB_FILE_LOCATION",
            std::env::var("GEOIP_TEST_MMDB").unwrap(),
        ),
        ("DISABLE_MMDB", "true".to_owned()),
    ]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let row = post_and_read(&server.addr(), base.path(), "disabled", "81.2.69.142").await;
    assert!(row["properties"].get("$geoip_city_name").is_none(), "{row}");
    drop(server);
}

/// Posts one event from `ip` and returns its stored row.
async fn post_and_read(addr: &str, base_dir: &Path, distinct_id: &str, ip: &str) -> Value {
    let status = post_batch(
        addr,
        "phc_geo",
        json!([{"event": "$pageview", "distinct_id": distinct_id, "properties": {"$ip": ip}}]),
    )
    .await;
    assert_eq!(status, 200);
    wait_for_rows(base_dir, |rows| {
        rows.iter().any(|r| r["distinct_id"] == distinct_id)
    })
    .await
    .into_iter()
    .find(|r| r["distinct_id"] == distinct_id)
    .unwrap()
}

/// Without MMDB_FILE_LOCATION, the database comes from PostHog's `@posthog/mmdb` attachment
/// (Brotli-compressed, global) in Postgres.
#[tokio::test]
async fn meta_geoip_loads_posthogs_mmdb_attachment_from_postgres() {
    plugin_server::telemetry::install_tls_provider();
    let mmdb = std::fs::read(
        std::env::var("GEOIP_TEST_MMDB").expect("GEOIP_TEST_MMDB: run functional_tests/run.sh"),
    )
    .unwrap();
    let mut compressed = Vec::new();
    {
        let mut writer = brotli::CompressorWriter::new(&mut compressed, 1 << 16, 1, 22);
        writer.write_all(&mmdb).unwrap();
    }
    let database = FreshPostgres::create().await;
    common::migrate(&[("DATABASE_URL", &database.url)]);
    let client = database.client().await;
    client
        .batch_execute(
            "INSERT INTO posthog_organization (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'org');
             INSERT INTO posthog_team (id, organization_id, api_token) VALUES (2, '00000000-0000-0000-0000-000000000001', 'phc_geo');
             INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, updated_at)
                 VALUES (1, '00000000-0000-0000-0000-000000000001', 'source', 'geoip', now());
             INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config) VALUES (10, 2, 1, true, 1, '{}');",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO posthog_pluginsourcefile (plugin_id, filename, source) VALUES (1, 'index.ts', $1)",
            &[&GEOIP_PLUGIN],
        )
        .await
        .unwrap();
    let size = compressed.len() as i32;
    client
        .execute(
            "INSERT INTO posthog_pluginattachment (key, content_type, file_name, file_size, contents)
             VALUES ('@posthog/mmdb', 'application/vnd.maxmind.maxmind-db', 'GeoLite2-City.mmdb.br', $1, $2)",
            &[&size, &compressed],
        )
        .await
        .unwrap();
    let base = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("DATABASE_URL", database.url.clone()),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probe = 0;
    loop {
        probe += 1;
        let row = post_and_read(
            &server.addr(),
            base.path(),
            &format!("probe-{probe}"),
            "81.2.69.142",
        )
        .await;
        if row["properties"].get("$geoip_city_name").is_some() {
            assert_eq!(row["properties"]["$geoip_city_name"], "East Finchley");
            break;
        }
        assert!(Instant::now() < deadline, "never located: {row}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(server);
}

fn versioned_plugin(version: u32) -> String {
    format!(
        "exports.processEvent = (e) => {{ e.properties.version = {version}; return e }}
         exports.teardownPlugin = async ({{ storage }}) => {{ await storage.set('torn down', {version}) }}"
    )
}

/// A plugin's source changes in Postgres and `reload-plugins` is published (as PostHog's app
/// does, with a bare string): the old VM is torn down, later events get the new version, and
/// every event is stored once.
#[tokio::test]
async fn reload_plugins_swaps_a_changed_plugin_without_losing_events() {
    plugin_server::telemetry::install_tls_provider();
    let database = FreshPostgres::create().await;
    common::migrate(&[("DATABASE_URL", &database.url)]);
    let client = database.client().await;
    client
        .batch_execute(
            "INSERT INTO posthog_organization (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'org');
             INSERT INTO posthog_team (id, organization_id, api_token) VALUES (2, '00000000-0000-0000-0000-000000000001', 'phc_reload');
             INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, updated_at)
                 VALUES (1, '00000000-0000-0000-0000-000000000001', 'source', 'versioned', now() - interval '1 hour');
             INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config) VALUES (10, 2, 1, true, 1, '{}');",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO posthog_pluginsourcefile (plugin_id, filename, source) VALUES (1, 'index.js', $1)",
            &[&versioned_plugin(1)],
        )
        .await
        .unwrap();
    let channel = format!("reload-plugins-test-{}", std::process::id());
    let base = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&[
        ("BASE_DIR", base.path().to_str().unwrap().to_owned()),
        ("DATABASE_URL", database.url.clone()),
        ("REDIS_URL", redis_url()),
        ("PLUGINS_RELOAD_PUBSUB_CHANNEL", channel.clone()),
        ("RELOAD_PLUGIN_JITTER_MAX_MS", "0".to_owned()),
    ]);
    let addr = server.addr();
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();

    // PostHog's app asks for a plugin's capabilities when it is installed: a VM is built (no
    // event has run yet) and what it exports is written to posthog_plugin.capabilities.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("populate-plugin-capabilities")
        .arg(r#"{"plugin_id": 1}"#)
        .query_async(&mut connection)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let capabilities = loop {
        let capabilities: Value = client
            .query_one("SELECT capabilities FROM posthog_plugin WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        if capabilities != json!({}) {
            break capabilities;
        }
        assert!(Instant::now() < deadline, "capabilities never written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        capabilities,
        json!({"methods": ["teardownPlugin", "processEvent"], "scheduled_tasks": [], "jobs": []})
    );

    let mut sent = 0;
    let send = async |sent: &mut i32| {
        *sent += 1;
        let status = post_batch(
            &addr,
            "phc_reload",
            json!([{"event": "e", "distinct_id": format!("d{sent}"), "properties": {}}]),
        )
        .await;
        assert_eq!(status, 200);
    };
    send(&mut sent).await;
    assert_eq!(read_event_rows(base.path())[0]["properties"]["version"], 1);

    client
        .execute(
            "UPDATE posthog_pluginsourcefile SET source = $1 WHERE plugin_id = 1",
            &[&versioned_plugin(2)],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE posthog_plugin SET updated_at = now() WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(receivers, 1, "the server listens on {channel}");

    // Four senders keep events flowing while the reload happens, each sending its next event
    // once the previous one is stored, so batches are in flight when the versions swap; the
    // health endpoint is polled all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|sender| {
            let stop = std::sync::Arc::clone(&stop);
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = format!("s{sender}-{}", ids.len());
                    let status = post_batch(
                        &addr,
                        "phc_reload",
                        json!([{"event": "e", "distinct_id": id, "properties": {}}]),
                    )
                    .await;
                    assert_eq!(status, 200);
                    ids.push(id);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ids
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut switched_at = None;
    loop {
        let health = reqwest::get(format!("http://{addr}/_health"))
            .await
            .unwrap();
        assert_eq!(health.status(), 200, "{:?}", health.text().await);
        let rows = read_event_rows(base.path());
        if switched_at.is_none() && rows.iter().any(|r| r["properties"]["version"] == 2) {
            switched_at = Some(Instant::now());
        }
        if switched_at.is_some_and(|at| at.elapsed() > Duration::from_secs(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent_ids = Vec::new();
    for sender in senders {
        sent_ids.push(sender.await.unwrap());
    }

    let rows = read_event_rows(base.path());
    let total: usize = sent_ids.iter().map(Vec::len).sum::<usize>() + sent as usize;
    assert_eq!(rows.len(), total, "every event stored once");
    let version_of: std::collections::HashMap<&str, i64> = rows
        .iter()
        .map(|r| {
            (
                r["distinct_id"].as_str().unwrap(),
                r["properties"]["version"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(version_of.len(), total, "no event stored twice");
    // Each sender saw the old version, then only the new one: never back.
    for ids in &sent_ids {
        let versions: Vec<i64> = ids.iter().map(|id| version_of[id.as_str()]).collect();
        let switch = versions
            .iter()
            .position(|v| *v == 2)
            .unwrap_or(versions.len());
        assert!(versions[..switch].iter().all(|v| *v == 1), "{versions:?}");
        assert!(versions[switch..].iter().all(|v| *v == 2), "{versions:?}");
        assert_eq!(versions.last(), Some(&2), "{versions:?}");
    }
    // The old VM ran its teardownPlugin.
    let torn: Option<String> = client
        .query_opt(
            "SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = 10 AND key = 'torn down'",
            &[],
        )
        .await
        .unwrap()
        .map(|row| row.get(0));
    assert_eq!(torn.as_deref(), Some("1"));
    drop(server);
}

/// Reports each run of its scheduled task to the test's HTTP destination, with the run's time.
const SCHEDULED: &str = r#"
exports.runEveryMinute = async ({ config }) => {
    await fetch(config.url + '/tick', { method: 'POST', body: String(Date.now()) })
}
"#;

/// Which of `servers` holds the schedule lock, from `/_actors`.
async fn schedule_holders(servers: &[Option<ServerProcess>]) -> Vec<usize> {
    let mut holders = Vec::new();
    for (index, server) in servers.iter().enumerate() {
        let Some(server) = server else { continue };
        let actors: Value = reqwest::get(format!("http://{}/_actors", server.addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if actors["plugin_scheduler"]["holds_lock"] == true {
            holders.push(index);
        }
    }
    holders
}

/// Tick times (ms) that arrive within `window`.
async fn ticks_during(destination: &mut common::HttpRecorder, window: Duration) -> Vec<u64> {
    let until = Instant::now() + window;
    let mut ticks = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Some((_, path, body)) = destination.next(left).await {
            assert_eq!(path, "/tick");
            ticks.push(body.parse().unwrap());
        }
    }
    ticks
}

/// Three instances on one Redis with a 1.5 s "minute": each boundary runs the task exactly
/// once; when the lock holder is killed, another instance takes over within the lock's TTL.
#[tokio::test]
async fn scheduled_tasks_run_once_per_tick_across_instances_and_survive_the_holder_dying() {
    plugin_server::telemetry::install_tls_provider();
    const PERIOD_MS: u64 = 1500;
    let mut destination = common::HttpRecorder::start().await;
    let prefix = format!("ft-schedule-{}:", std::process::id());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers: Vec<Option<ServerProcess>> = Vec::new();
    for dir in &dirs {
        write_plugin(dir.path(), "ticker", &[("index.js", SCHEDULED)]);
        let configs = dir.path().join("plugins.toml");
        std::fs::write(
            &configs,
            format!(
                "[[plugin_config]]\nplugin = \"ticker\"\nteam_id = 1\nconfig = {{ url = \"{}\" }}\n",
                destination.url
            ),
        )
        .unwrap();
        servers.push(Some(ServerProcess::start(&[
            ("BASE_DIR", dir.path().to_str().unwrap().to_owned()),
            ("PLUGINS_CONFIG_FILE", configs.to_str().unwrap().to_owned()),
            ("REDIS_URL", redis_url()),
            ("CLUSTER_PREFIX", prefix.clone()),
            ("SCHEDULE_LOCK_TTL", "2".to_owned()),
            ("SCHEDULE_MINUTE_MS", PERIOD_MS.to_string()),
        ])));
    }
    // Two instances running the same boundary would report within milliseconds of each other;
    // a run delayed by a busy machine still leaves most of a period before the next one.
    let once_per_tick = |ticks: &[u64]| {
        let mut sorted = ticks.to_vec();
        sorted.sort_unstable();
        for pair in sorted.windows(2) {
            assert!(
                pair[1] - pair[0] >= PERIOD_MS / 4,
                "two runs {} ms apart: {sorted:?}",
                pair[1] - pair[0]
            );
        }
        sorted.len()
    };

    let ticks = ticks_during(&mut destination, Duration::from_millis(PERIOD_MS * 5)).await;
    assert!(once_per_tick(&ticks) >= 3, "{ticks:?}");
    let holders = schedule_holders(&servers).await;
    assert_eq!(
        holders.len(),
        1,
        "exactly one instance schedules: {holders:?}"
    );

    // SIGKILL the holder: its lease lapses after the 2 s TTL and another instance goes on.
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    drop(servers[holders[0]].take());
    let ticks = ticks_during(&mut destination, Duration::from_millis(PERIOD_MS * 6)).await;
    assert!(once_per_tick(&ticks) >= 3, "{ticks:?}");
    let first = ticks.iter().min().copied().unwrap_or(u64::MAX);
    assert!(
        first < killed_at + 2_000 + PERIOD_MS + 1_500,
        "taken over within TTL + one period: killed at {killed_at}, first tick {first}"
    );
    let holders = schedule_holders(&servers).await;
    assert_eq!(holders.len(), 1, "{holders:?}");
}

/// Issue 25: `posthog.api` calls SITE_URL as PostHog's server does, with the team's token
/// and a personal API key of the organization's bot user, which the server creates in
/// PostHog's tables once and then reuses; the key stored is only its hash in the form
/// PostHog's API looks presented keys up by (PostHog's own key manager once sent the hash).
#[tokio::test]
async fn posthog_api_calls_site_url_with_the_teams_token_and_a_bot_key_posthog_accepts() {
    use crate::ingestion::{Deployment, good_events, produce, wait_for};

    let deployment = Deployment::create().await;
    let mut site = common::HttpRecorder::start().await;
    deployment
        .insert_source_plugin(
            "api caller",
            "index.js",
            r#"exports.processEvent = async (event) => {
                const reply = await posthog.api.get('/api/projects/@current/feature_flags', { data: { active: 'yes please' } })
                event.properties.api_status = reply.status
                return event
            }"#,
            json!({}),
        )
        .await;
    let (_server, _) = deployment.start_server_with(&[("SITE_URL", site.url.clone())]);
    produce(
        &deployment.topic(),
        &good_events(&deployment.token, 3, "api"),
    )
    .await;

    let mut keys = Vec::new();
    for _ in 0..3 {
        let request = site
            .next_request(Duration::from_secs(60))
            .await
            .expect("a posthog.api request");
        assert_eq!(request.method, "GET");
        assert_eq!(
            request.path,
            format!(
                "/api/projects/{}/feature_flags?active=yes+please&token={}",
                deployment.team_id, deployment.token
            )
        );
        let key = request.headers["authorization"]
            .strip_prefix("Bearer phx_")
            .map(|rest| format!("phx_{rest}"))
            .expect("a personal API key");
        keys.push(key);
    }
    keys.dedup();
    assert_eq!(keys.len(), 1, "one key for every call: {keys:?}");
    wait_for("the events stored with the API's answer", async || {
        let events = deployment.events().await;
        (events.len() == 3
            && events.iter().all(|event| {
                serde_json::from_str::<Value>(event["properties"].as_str().unwrap_or("{}"))
                    .is_ok_and(|properties| properties["api_status"] == 200)
            }))
        .then_some(())
    })
    .await;

    let client = deployment.postgres.client().await;
    let rows = client
        .query(
            "SELECT k.secure_value, k.value, k.label, u.email, u.first_name, u.is_active, m.level, \
             u.current_organization_id = t.organization_id \
             FROM posthog_personalapikey k JOIN posthog_user u ON u.id = k.user_id \
             JOIN posthog_organizationmembership m ON m.user_id = u.id \
             JOIN posthog_team t ON t.organization_id = m.organization_id WHERE t.id = $1",
            &[&i32::try_from(deployment.team_id).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one bot user with one key");
    let row = &rows[0];
    // PostHog's hash_key_value in its sha256 mode, computed by Postgres.
    let expected_hash: String = client
        .query_one(
            "SELECT 'sha256$' || encode(sha256(convert_to($1, 'UTF8')), 'hex')",
            &[&keys[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(row.get::<_, Option<String>>(0), Some(expected_hash));
    assert_eq!(
        row.get::<_, Option<String>>(1),
        None,
        "the raw key is not stored"
    );
    assert_eq!(row.get::<_, String>(2), "autogen");
    assert!(row.get::<_, String>(3).ends_with("@posthogbot.user"));
    assert_eq!(row.get::<_, String>(4), "Plugins API User [Bot]");
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, i16>(6), 8, "an admin of the organization");
    assert!(row.get::<_, bool>(7));
    deployment.teardown().await;
}
