use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::event::PluginEvent;
use crate::plugins::host_services::HostServiceError;
use crate::plugins::runtime::natives::{CacheOp, FetchReply, FetchRequest, JobRequest, StorageOp};
use crate::plugins::runtime::{VmIdentity, VmSource};

/// Host services that all fail; `fetch` first hangs for `fetch_hangs_for`, as a remote that
/// does not answer (the worker thread waits, as it does for a real fetch).
#[derive(Default)]
struct NoNetwork {
    fetch_hangs_for: Duration,
}

impl PluginHost for NoNetwork {
    fn fetch(&self, _: FetchRequest) -> Result<FetchReply, HostServiceError> {
        std::thread::sleep(self.fetch_hangs_for);
        Err(HostServiceError::NotAvailable("fetch"))
    }

    fn cache(&self, _: &VmIdentity, _: CacheOp) -> Result<Value, HostServiceError> {
        Err(HostServiceError::NotAvailable("meta.cache"))
    }

    fn storage(&self, _: &VmIdentity, _: StorageOp) -> Result<Value, HostServiceError> {
        Err(HostServiceError::NotAvailable("meta.storage"))
    }

    fn geoip(&self, _: &str) -> Value {
        Value::Null
    }

    fn enqueue_job(&self, _: &VmIdentity, _: JobRequest) -> Result<Value, HostServiceError> {
        Err(HostServiceError::NotAvailable("meta.jobs"))
    }
}

#[derive(Default)]
struct Collected(Mutex<Vec<SideEffects>>);

impl PluginOutputs for Collected {
    fn side_effects(&self, side: SideEffects) {
        if let Ok(mut all) = self.0.lock() {
            all.push(side);
        }
    }
}

fn config(id: i64, team_id: i64, order: i32, name: &str, code: &str) -> LoadedConfig {
    LoadedConfig {
        identity: VmIdentity {
            plugin_config_id: id,
            plugin_id: id,
            team_id,
            plugin_name: name.into(),
        },
        source: VmSource {
            file_name: "index.js".into(),
            code: Arc::from(code),
        },
        config: json!({}),
        attachments: Vec::new(),
        order,
        version: "1".into(),
        log_level: 0,
        webhook_filters: None,
    }
}

fn start(workers: usize, outputs: Arc<Collected>) -> PluginVmPool {
    start_retaining(workers, outputs, VmRetention::default())
}

fn start_retaining(
    workers: usize,
    outputs: Arc<Collected>,
    retention: VmRetention,
) -> PluginVmPool {
    start_with(workers, outputs, retention, Duration::ZERO)
}

fn start_with(
    workers: usize,
    outputs: Arc<Collected>,
    retention: VmRetention,
    fetch_hangs_for: Duration,
) -> PluginVmPool {
    let metrics = Metrics::new().expect("metrics");
    start_measured(workers, outputs, retention, fetch_hangs_for, &metrics)
}

fn start_measured(
    workers: usize,
    outputs: Arc<Collected>,
    retention: VmRetention,
    fetch_hangs_for: Duration,
    metrics: &Metrics,
) -> PluginVmPool {
    let config = PluginVmPoolConfig {
        workers,
        async_workers: 1,
        tasks_per_worker: 10,
        limits: VmLimits {
            task_timeout: Duration::from_millis(300),
            memory_limit_bytes: 64 * 1024 * 1024,
            ..VmLimits::default()
        },
        setup_retry_base: Duration::from_millis(50),
        retention,
        isolation: test_isolation(),
    };
    let factory: HostFactory =
        Arc::new(move || Rc::new(NoNetwork { fetch_hangs_for }) as Rc<dyn PluginHost>);
    PluginVmPool::start(config, factory, outputs, metrics).expect("pool starts")
}

thread_local! {
    /// Set by the tests of `in_processes`: the pool's workers are processes.
    static IN_PROCESSES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn test_isolation() -> WorkerIsolation {
    if IN_PROCESSES.get() {
        WorkerIsolation::Process(crate::plugins::isolation::tests::worker_command())
    } else {
        WorkerIsolation::Thread
    }
}

/// A one-worker pool running `configs`, and what it reports besides events.
fn running(configs: impl IntoIterator<Item = LoadedConfig>) -> (PluginVmPool, Arc<Collected>) {
    let outputs = Arc::new(Collected::default());
    let pool = start(1, outputs.clone());
    pool.set_plugins(PluginSet::new(configs));
    (pool, outputs)
}

fn chain_events(events: Vec<Value>) -> Vec<ChainEvent> {
    events.iter().map(ChainEvent::from_value).collect()
}

fn event(team_id: i64, name: &str) -> Value {
    json!({"event": name, "team_id": team_id, "distinct_id": "d", "properties": {}})
}

/// Call durations are recorded on the worker's thread and reach `/_metrics` by the time the
/// request is answered: one observation per call.
#[actix::test]
async fn every_call_is_timed_in_the_method_histogram() {
    let metrics = Metrics::new().expect("metrics");
    let outputs = Arc::new(Collected::default());
    let pool = start_measured(1, outputs, VmRetention::default(), Duration::ZERO, &metrics);
    let code = "exports.processEvent = (e) => e";
    pool.set_plugins(PluginSet::new([
        config(50, 2, 1, "first", code),
        config(51, 2, 2, "second", code),
    ]));
    let calls = |method: &str| -> u64 {
        metrics
            .registry()
            .gather()
            .iter()
            .filter(|family| family.name() == "plugin_method_duration_seconds")
            .flat_map(|family| family.get_metric())
            .filter(|metric| {
                metric
                    .get_label()
                    .iter()
                    .any(|label| label.name() == "method" && label.value() == method)
            })
            .map(|metric| metric.get_histogram().get_sample_count())
            .sum()
    };
    let events = (0..3).map(|i| event(2, &format!("e{i}"))).collect();
    pool.process_events(2, chain_events(events)).await;
    assert_eq!(calls("processEvent"), 6, "three events through two configs");
    pool.process_events(2, chain_events(vec![event(2, "more")]))
        .await;
    assert_eq!(calls("processEvent"), 8);
}

/// The pipeline keeps the events it sends and asks for what changed: kept properties come
/// back as positions, with the text they went in with, and the rest as JSON.
#[actix::test]
async fn an_answer_with_changes_rebuilds_the_event_the_chain_made() {
    let (pool, _) = running([
        config(
            70,
            2,
            1,
            "renamer",
            "exports.processEvent = (e) => { e.properties.n += 1; delete e.properties.gone; e.event += '!'; return e }",
        ),
        config(
            71,
            2,
            2,
            "tagger",
            "exports.processEvent = (e) => { e.properties.tag = { by: 'tagger' }; return e }",
        ),
    ]);
    let text = r#"{"event":"e","team_id":2,"distinct_id":"d","now":"2024-01-01T00:00:00Z","uuid":"u1","properties":{"kept":1.50,"n":1,"gone":true,"s":"\u00e9"}}"#;
    let mut event: PluginEvent = serde_json::from_str(text).expect("an event");
    let mut sent = ChainEvent::from_value(&serde_json::from_str(text).expect("JSON"));
    sent.json = text.to_owned();
    sent.answer_with_changes = true;
    let outcomes = pool.process_events(2, vec![sent]).await;
    let Some(ChainOutput::Changes(changes)) = outcomes[0].event.clone() else {
        panic!("an answer with changes: {:?}", outcomes[0].event);
    };
    changes.apply(&mut event).expect("applies");
    assert_eq!(event.event, "e!");
    assert_eq!(event.uuid, "u1");
    assert_eq!(
        event.properties.to_json(),
        r#"{"kept":1.50,"n":2,"s":"\u00e9","tag":{"by":"tagger"},"$plugins_succeeded":["renamer (70)","tagger (71)"],"$plugins_failed":[]}"#
    );
}

#[actix::test]
async fn chains_run_in_order_and_record_success_and_failure() {
    let outputs = Arc::new(Collected::default());
    let pool = start(2, outputs.clone());
    pool.set_plugins(PluginSet::new([
        config(11, 2, 2, "second", "exports.processEvent = (e) => { e.properties.order += ',second'; return e }"),
        config(10, 2, 1, "first", "exports.processEvent = (e) => { e.properties.order = 'first'; return e }"),
        config(12, 2, 3, "thrower", "exports.processEvent = (e) => { e.properties.order = 'lost'; throw new Error('nope') }"),
        config(13, 2, 4, "dropper", "exports.processEvent = (e) => e.event === 'drop' ? null : e"),
    ]));
    let outcomes = pool
        .process_events(2, chain_events(vec![event(2, "keep"), event(2, "drop")]))
        .await;
    let kept = outcomes[0].event_value().expect("kept");
    assert_eq!(kept["properties"]["order"], "first,second");
    assert_eq!(
        kept["properties"]["$plugins_succeeded"],
        json!(["first (10)", "second (11)", "dropper (13)"])
    );
    assert_eq!(
        kept["properties"]["$plugins_failed"],
        json!(["thrower (12)"])
    );
    assert_eq!(outcomes[0].failures.len(), 1);
    assert!(outcomes[1].event.is_none(), "dropped");
    let stats = pool.stats();
    assert_eq!(stats["vms"], 4, "{stats}");
    assert_eq!(stats["configs"], 4, "{stats}");
    // A boa realm and the prelude alone take well over 100 kB.
    let heap = stats["vm_heap_bytes_at_load"].as_i64().expect("bytes");
    assert!(heap > 4 * 100_000, "{stats}");

    // A team without plugins passes through untouched.
    let outcomes = pool
        .process_events(3, chain_events(vec![event(3, "other")]))
        .await;
    assert_eq!(outcomes[0].event_value(), Some(event(3, "other")));
}

/// Between configs the event is data, as after `JSON.stringify`: each VM gets objects of its
/// own realm, so one plugin can neither change what another kept nor reach its prototypes.
#[actix::test]
async fn each_config_of_a_chain_gets_its_own_copy_of_the_event() {
    let (pool, _outputs) = running([
        config(
            50,
            2,
            1,
            "keeper",
            "let kept = null; exports.processEvent = (e) => {                e.properties.kept_before = kept === null ? 'none' : kept.properties.mark;                e.properties.polluted_before = ({}).polluted === undefined ? 'no' : 'yes';                kept = e; e.properties.mark = 'keeper'; e.properties.when = new Date(0);                e.properties.hidden = () => 1; return e }",
        ),
        config(
            51,
            2,
            2,
            "changer",
            "exports.processEvent = (e) => {                e.properties.same_realm = e instanceof Object && Array.isArray(e.properties.list)                  && e.properties.list instanceof Array;                e.properties.when_type = typeof e.properties.when;                e.properties.mark = 'changer';                Object.getPrototypeOf(e).polluted = true; return e }",
        ),
    ]);
    let mut first = event(2, "one");
    first["properties"]["list"] = json!([1, 2]);
    let outcomes = pool
        .process_events(2, chain_events(vec![first, event(2, "two")]))
        .await;
    let one = outcomes[0].event_value().expect("kept");
    let one = &one["properties"];
    assert_eq!(one["same_realm"], true, "{one}");
    assert_eq!(one["when"], "1970-01-01T00:00:00.000Z", "{one}");
    assert_eq!(one["when_type"], "string", "{one}");
    assert!(one.get("hidden").is_none(), "{one}");
    assert_eq!(one["mark"], "changer");
    let two = outcomes[1].event_value().expect("kept");
    let two = &two["properties"];
    assert_eq!(
        two["kept_before"], "keeper",
        "the keeper's own object: {two}"
    );
    assert_eq!(two["polluted_before"], "no", "{two}");
}

/// What the chain checks and keeps: a changed team_id and a result JSON cannot hold are
/// failures that keep the last good event; a config the event lists as already run is
/// skipped; an event no plugin returned keeps its text exactly (numbers past 2^53 included)
/// when it is labelled; text with an escaped lone surrogate (kept raw from the client) still
/// reaches the plugins.
#[actix::test]
async fn the_chain_keeps_the_event_through_what_plugins_get_wrong() {
    let (pool, _outputs) = running([
        config(
            60,
            2,
            1,
            "retarget",
            "exports.processEvent = (e) => { e.team_id = 99; e.properties.lost = 1; return e }",
        ),
        config(
            61,
            2,
            2,
            "symbol",
            "exports.processEvent = (e) => Symbol('e')",
        ),
        config(
            62,
            2,
            3,
            "thrower",
            "exports.processEvent = (e) => { throw new Error('no') }",
        ),
        config(
            63,
            2,
            4,
            "counter",
            "exports.processEvent = (e) => { e.properties.seen = (e.properties.seen || 0) + 1; return e }",
        ),
    ]);
    let mut skipped = event(2, "again");
    skipped["properties"]["$plugins_succeeded"] = json!(["counter (63)"]);
    let exact = r#"{"event":"exact","team_id":2,"distinct_id":"d","properties":{"big":12345678901234567890,"f":1.0}}"#;
    let exact_event = ChainEvent {
        json: exact.to_owned(),
        distinct_id: "d".into(),
        team_id: Some(json!(2)),
        ran: vec!["counter (63)".into()],
        answer_with_changes: false,
    };
    let surrogate =
        r#"{"event":"odd","team_id":2,"distinct_id":"d","properties":{"s":"a\ud800b"}}"#;
    let surrogate_event = ChainEvent {
        json: surrogate.to_owned(),
        distinct_id: "d".into(),
        team_id: Some(json!(2)),
        ran: Vec::new(),
        answer_with_changes: false,
    };
    // A number JSON.parse reads as Infinity: serde cannot, and the plugins still run.
    let huge = r#"{"event":"huge","team_id":2,"distinct_id":"d","properties":{"n":1e400}}"#;
    let huge_event = ChainEvent {
        json: huge.to_owned(),
        distinct_id: "d".into(),
        team_id: Some(json!(2)),
        ran: Vec::new(),
        answer_with_changes: false,
    };
    // Every config fails or is skipped: the labels go onto the client's own text.
    let odd_unchanged = ChainEvent {
        json: surrogate.replace("odd", "odd_unchanged"),
        distinct_id: "d".into(),
        team_id: Some(json!(2)),
        ran: vec!["counter (63)".into()],
        answer_with_changes: false,
    };
    let mut events = chain_events(vec![event(2, "plain"), skipped]);
    events.push(exact_event);
    events.push(surrogate_event);
    events.push(huge_event);
    events.push(odd_unchanged);
    let outcomes = pool.process_events(2, events).await;

    let plain = outcomes[0].event_value().expect("kept");
    assert_eq!(plain["team_id"], 2, "{plain}");
    assert!(plain["properties"].get("lost").is_none(), "{plain}");
    assert_eq!(plain["properties"]["seen"], 1, "{plain}");
    assert_eq!(
        plain["properties"]["$plugins_failed"],
        json!(["retarget (60)", "symbol (61)", "thrower (62)"])
    );
    let messages: Vec<String> = outcomes[0]
        .failures
        .iter()
        .map(|f| f.error.to_string())
        .collect();
    assert!(messages[0].contains("team_id"), "{messages:?}");
    assert!(messages[1].contains("JSON cannot hold"), "{messages:?}");

    let again = outcomes[1].event_value().expect("kept");
    assert!(
        again["properties"].get("seen").is_none(),
        "skipped: {again}"
    );

    let exact_out = outcomes[2].text().expect("kept");
    assert!(
        exact_out.contains(r#""big":12345678901234567890"#),
        "{exact_out}"
    );
    assert!(exact_out.contains(r#""f":1.0"#), "{exact_out}");
    assert!(exact_out.contains("thrower (62)"), "{exact_out}");

    let odd = outcomes[3].event_value().expect("kept");
    assert_eq!(odd["properties"]["seen"], 1, "{odd}");
    assert_eq!(odd["properties"]["s"], "a\u{fffd}b", "{odd}");

    let huge = outcomes[4].event_value().expect("kept");
    assert_eq!(huge["properties"]["seen"], 1, "{huge}");
    assert_eq!(huge["properties"]["n"], Value::Null, "{huge}");

    let unchanged = outcomes[5].event_value().expect("kept");
    assert_eq!(unchanged["event"], "odd_unchanged", "{unchanged}");
    assert_eq!(
        unchanged["properties"]["$plugins_failed"],
        json!(["retarget (60)", "symbol (61)", "thrower (62)"]),
        "{unchanged}"
    );
}

/// Results nobody reads are not converted: a setupPlugin that returns a function or a cycle
/// (PostHog drops the value) leaves the config working.
#[actix::test]
async fn results_nobody_reads_are_not_checked() {
    let (pool, _outputs) = running([
        config(
            70,
            2,
            1,
            "returns a function",
            "exports.setupPlugin = () => () => 1; exports.processEvent = (e) => { e.properties.f = 1; return e }",
        ),
        config(
            71,
            2,
            2,
            "returns a cycle",
            "exports.setupPlugin = () => { const o = {}; o.o = o; return o }; exports.processEvent = (e) => { e.properties.c = 1; return e }",
        ),
    ]);
    let outcomes = pool
        .process_events(2, chain_events(vec![event(2, "e")]))
        .await;
    let out = outcomes[0].event_value().expect("kept");
    assert_eq!(out["properties"]["f"], 1, "{out}");
    assert_eq!(out["properties"]["c"], 1, "{out}");
    assert!(
        outcomes[0].failures.is_empty(),
        "{:?}",
        outcomes[0].failures
    );
    assert!(pool.has_plugins(2));
}

#[actix::test]
async fn a_failed_setup_disables_the_config_and_is_reported() {
    let (pool, outputs) = running([
        config(
            20,
            2,
            1,
            "bad setup",
            "exports.setupPlugin = () => { throw new Error('no key') }; exports.processEvent = (e) => e",
        ),
        config(
            21,
            2,
            2,
            "bad require",
            "const fs = require('fs'); exports.processEvent = (e) => e",
        ),
        config(
            22,
            2,
            3,
            "fine",
            "exports.processEvent = (e) => { e.properties.fine = true; return e }",
        ),
    ]);
    let outcomes = pool
        .process_events(2, chain_events(vec![event(2, "e")]))
        .await;
    let out = outcomes[0].event_value().expect("event");
    assert_eq!(out["properties"]["fine"], true);
    assert_eq!(
        out["properties"]["$plugins_failed"],
        json!(["bad setup (20)", "bad require (21)"])
    );
    let errors: Vec<(i64, String, ConfigFailure)> = outputs
        .0
        .lock()
        .expect("lock")
        .iter()
        .flat_map(|s| {
            s.config_errors
                .iter()
                .map(|e| (e.identity.plugin_config_id, e.message.clone(), e.failure))
        })
        .collect();
    assert!(
        errors.iter().any(|(id, m, failure)| *id == 20
            && m.contains("no key")
            && *failure == ConfigFailure::Disabled),
        "a failed setup disables its config: {errors:?}"
    );
    assert!(
        errors.iter().any(|(id, m, failure)| *id == 21
            && m.contains("'fs'")
            && *failure == ConfigFailure::Reported),
        "a plugin that cannot load is reported, not disabled: {errors:?}"
    );
    let effects = outputs.0.lock().expect("lock");
    assert!(
        effects.iter().flat_map(|s| &s.outcomes).any(|outcome| {
            outcome.plugin_config_id == 21
                && outcome.category == "setupPlugin"
                && outcome.error_type.as_deref() == Some("PluginLoadError")
        }),
        "the load failure counts in app metrics"
    );
    assert!(
        effects.iter().flat_map(|s| &s.logs).any(|entry| {
            entry.plugin_config_id == 21 && entry.message.contains("Plugin failed to load")
        }),
        "the load failure is in the plugin's log"
    );
    drop(effects);
}

/// Team 2's config 30 runs `bomb` in processEvent; team 3's config 31 marks its events ok.
fn bomb_and_healthy(bomb: &str) -> PluginSet {
    PluginSet::new([
        config(
            30,
            2,
            1,
            "bomb",
            &format!("exports.processEvent = (e) => {{ {bomb}; return e }}"),
        ),
        config(
            31,
            3,
            1,
            "healthy",
            "exports.processEvent = (e) => { e.properties.ok = true; return e }",
        ),
    ])
}

/// Runaway code that the in-VM deadline cannot stop: a memory bomb (the budget stops the
/// thread) and a loop inside a native callback. Each event is marked failed within about
/// 2×TASK_TIMEOUT, the config is disabled, and another team on the same worker goes on.
#[actix::test]
async fn the_watchdog_contains_what_the_deadline_cannot() {
    let bombs = [
        "let s = 'xxxxxxxxxxxxxxxx'; while (true) { s = s + s }",
        "new Array(1e9).fill(1)",
        "new Array(1e6).fill(0).forEach(() => { for (let i = 0; i < 5e6; i++) {} })",
    ];
    for bomb in bombs {
        let outputs = Arc::new(Collected::default());
        // One worker: the healthy team shares the thread the bomb stops.
        let pool = start(1, outputs.clone());
        pool.set_plugins(bomb_and_healthy(bomb));
        let started = Instant::now();
        let bombed = pool.process_events(2, chain_events(vec![event(2, "boom")]));
        let healthy = async {
            // Sent while the bomb runs; answered by the replacement worker.
            tokio::time::sleep(Duration::from_millis(50)).await;
            pool.process_events(3, chain_events(vec![event(3, "fine")]))
                .await
        };
        let (bombed, healthy) = tokio::join!(bombed, healthy);
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(1500),
            "{bomb}: took {elapsed:?}"
        );
        let out = bombed[0].event_value().expect("kept");
        assert_eq!(
            out["properties"]["$plugins_failed"],
            json!(["bomb (30)"]),
            "{bomb}"
        );
        assert_eq!(
            healthy[0].event_value().expect("event")["properties"]["ok"],
            true,
            "{bomb}"
        );
        assert!(
            !pool.has_plugins(2),
            "{bomb}: the bomb's config is disabled"
        );
        let reported = outputs.0.lock().expect("lock").iter().any(|s| {
            s.config_errors
                .iter()
                .any(|e| e.identity.plugin_config_id == 30 && e.failure == ConfigFailure::Reported)
        });
        assert!(reported, "{bomb}");
    }
}

/// A call's captured events belong to the config that made them, even when configs before it
/// in the chain did not run (they once went to the chain's first config instead).
#[actix::test]
async fn captures_are_attributed_to_the_config_that_made_them() {
    let outputs = Arc::new(Collected::default());
    let pool = start(1, outputs.clone());
    pool.set_plugins(PluginSet::new([
        config(40, 2, 1, "broken", "exports.processEvent = (e) => { ("),
        config(
            41,
            2,
            2,
            "no processEvent",
            "exports.setupPlugin = () => {}",
        ),
        config(
            42,
            2,
            3,
            "capturer",
            "exports.processEvent = (e) => { posthog.capture('seen', { of: e.event }); return e }",
        ),
    ]));
    let outcomes = pool
        .process_events(2, chain_events(vec![event(2, "a"), event(2, "b")]))
        .await;
    assert_eq!(outcomes.len(), 2);
    let captures: Vec<(i64, String)> = outputs
        .0
        .lock()
        .expect("lock")
        .iter()
        .flat_map(|s| {
            s.captures
                .iter()
                .map(|(id, c)| (id.plugin_config_id, c.properties["of"].to_string()))
        })
        .collect();
    assert_eq!(
        captures,
        vec![(42, "\"a\"".to_string()), (42, "\"b\"".to_string())]
    );
}

fn collected<T>(outputs: &Collected, pick: impl Fn(&SideEffects) -> Vec<T>) -> Vec<T> {
    outputs
        .0
        .lock()
        .expect("lock")
        .iter()
        .flat_map(pick)
        .collect()
}

/// onEvent sees each stored event, composeWebhook's requests come back for the server to
/// send, exportEvents gets its buffer when it fills up or is flushed, and RetryError becomes a
/// retry of that config alone with PostHog's delays.
#[actix::test]
async fn post_ingestion_methods_run_and_retry() {
    let outputs = Arc::new(Collected::default());
    let pool = start(1, outputs.clone());
    let mut exporter = config(
        52,
        2,
        3,
        "exporter",
        "exports.exportEvents = (events) => { console.log('exported ' + events.map(e => e.event).join(',')) }",
    );
    exporter.config = json!({"exportEventsBufferBytes": "100000", "exportEventsToIgnore": "skip"});
    pool.set_plugins(PluginSet::new([
        config(
            50,
            2,
            1,
            "listener",
            "exports.onEvent = (e) => { if (e.event === 'flaky') throw new RetryError('later'); console.log('saw ' + e.event) }",
        ),
        config(
            51,
            2,
            2,
            "hooker",
            "exports.composeWebhook = (e) => e.event === 'a' ? { url: 'http://hooks.example/x', body: JSON.stringify({ e: e.event }) } : null",
        ),
        exporter,
        config(53, 2, 4, "plain", "exports.processEvent = (e) => e"),
    ]));
    assert!(!pool.wants_async(2), "unknown until a VM was built");
    pool.process_events(2, chain_events(vec![event(2, "warm")]))
        .await;
    assert!(pool.wants_async(2));

    pool.run_async(
        2,
        vec![event(2, "a"), event(2, "flaky"), event(2, "skip")].into(),
        None,
    )
    .await
    .expect("ran");
    let logs = collected(&outputs, |s| {
        s.logs
            .iter()
            .map(|l| (l.plugin_config_id, l.message.clone()))
            .collect()
    });
    assert!(logs.contains(&(50, "saw a".to_string())), "{logs:?}");
    assert!(logs.contains(&(50, "saw skip".to_string())), "{logs:?}");
    let hooks = collected(&outputs, |s| {
        s.webhooks
            .iter()
            .map(|(id, r)| (id.plugin_config_id, r.url.clone(), r.body.clone()))
            .collect()
    });
    assert_eq!(
        hooks,
        vec![(
            51,
            "http://hooks.example/x".to_string(),
            Some("{\"e\":\"a\"}".to_string())
        )]
    );
    let retries = collected(&outputs, |s| s.retries.clone());
    assert_eq!(retries.len(), 1, "{retries:?}");
    assert_eq!(retries[0].target.plugin_config_id, 50);
    assert_eq!(retries[0].target.attempt, 1);
    assert_eq!(retries[0].delay, Duration::from_secs(5));
    assert_eq!(retries[0].events.len(), 1);

    // Nothing exported yet: the buffer is far from full and not due.
    assert!(!logs.iter().any(|(id, _)| *id == 52), "{logs:?}");
    pool.flush_exports(true).await;
    let logs = collected(&outputs, |s| {
        s.logs
            .iter()
            .map(|l| (l.plugin_config_id, l.message.clone()))
            .collect()
    });
    assert!(
        logs.contains(&(52, "exported a,flaky".to_string())),
        "{logs:?}"
    );

    // A retry runs only its target: no second webhook, no export.
    let target = retries[0].target;
    pool.run_async(2, retries[0].events.clone().into(), Some(target))
        .await
        .expect("ran");
    let retries = collected(&outputs, |s| s.retries.clone());
    assert_eq!(retries.len(), 2);
    assert_eq!(retries[1].target.attempt, 2);
    assert_eq!(retries[1].delay, Duration::from_secs(10));
    assert_eq!(collected(&outputs, |s| s.webhooks.clone()).len(), 1);
    let outcomes = collected(&outputs, |s| s.outcomes.clone());
    assert!(
        outcomes.iter().any(|o| o.plugin_config_id == 52
            && o.category == "exportEvents"
            && o.count == 2
            && o.error_type.is_none()),
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.plugin_config_id == 51 && o.category == "composeWebhook"),
        "{outcomes:?}"
    );
}

/// An export that keeps throwing RetryError is retried 3 times (6, 12, 24 s), then dropped and
/// counted as failed; a full buffer exports at once.
#[actix::test]
async fn exports_retry_three_times_then_fail() {
    let outputs = Arc::new(Collected::default());
    let pool = start(1, outputs.clone());
    let mut exporter = config(
        60,
        2,
        1,
        "down",
        "exports.exportEvents = () => { throw new RetryError('destination down') }",
    );
    exporter.config = json!({"exportEventsBufferBytes": "1"});
    pool.set_plugins(PluginSet::new([exporter]));
    pool.run_async(2, vec![event(2, "a")].into(), None)
        .await
        .expect("ran");
    for attempt in 1..=3u32 {
        let retries = collected(&outputs, |s| s.retries.clone());
        let retry = retries.last().expect("a retry").clone();
        assert_eq!(retry.target.attempt, attempt);
        assert_eq!(retry.delay, Duration::from_secs(6 * 2u64.pow(attempt - 1)));
        pool.run_async(2, retry.events.into(), Some(retry.target))
            .await
            .expect("ran");
    }
    assert_eq!(collected(&outputs, |s| s.retries.clone()).len(), 3);
    let failures: Vec<_> = collected(&outputs, |s| s.outcomes.clone())
        .into_iter()
        .filter(|o| o.category == "exportEvents" && o.error_type.as_deref() == Some("RetryError"))
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
}

/// A plugin that logs its setup and teardown and counts its calls in `meta.global`, which
/// lives as long as its VM.
const COUNTING_PLUGIN: &str = "exports.setupPlugin = ({ global }) => { global.calls = 0; console.log('setup') }; \
     exports.teardownPlugin = () => { console.log('teardown') }; \
     exports.processEvent = (e, { global }) => { global.calls += 1; e.properties.calls = global.calls; return e }";

/// The `setup` and `teardown` lines each config logged, in order.
fn lifecycle(outputs: &Collected) -> Vec<(i64, String)> {
    collected(outputs, |side| {
        side.logs
            .iter()
            .filter(|entry| entry.message == "setup" || entry.message == "teardown")
            .map(|entry| (entry.plugin_config_id, entry.message.clone()))
            .collect()
    })
}

/// The heap one VM of `COUNTING_PLUGIN` takes to load, measured on a pool without a budget.
async fn one_vm_bytes() -> i64 {
    let probe = start(1, Arc::new(Collected::default()));
    probe.set_plugins(PluginSet::new([config(1, 1, 1, "probe", COUNTING_PLUGIN)]));
    calls_seen(&probe, 1).await;
    probe.stats()["vm_heap_bytes_at_load"]
        .as_i64()
        .expect("bytes")
}

async fn calls_seen(pool: &PluginVmPool, team_id: i64) -> Value {
    let outcomes = pool
        .process_events(team_id, chain_events(vec![event(team_id, "e")]))
        .await;
    assert!(
        outcomes[0].failures.is_empty(),
        "{:?}",
        outcomes[0].failures
    );
    outcomes[0].event_value().expect("event")["properties"]["calls"].clone()
}

/// Over the budget, the least recently used VM is torn down (teardownPlugin runs); its
/// config's next event builds and sets it up again, with a fresh `meta.global`, and is
/// processed correctly. The VM in use stays.
#[actix::test]
async fn over_the_budget_the_least_recently_used_vm_is_torn_down_and_set_up_again_on_use() {
    let one_vm = one_vm_bytes().await;
    assert!(one_vm > 100_000, "{one_vm}");

    let outputs = Arc::new(Collected::default());
    let pool = start_retaining(
        1,
        outputs.clone(),
        VmRetention {
            budget_bytes: Some(one_vm * 3 / 2),
            idle: None,
        },
    );
    pool.set_plugins(PluginSet::new([
        config(10, 1, 1, "first", COUNTING_PLUGIN),
        config(20, 2, 1, "second", COUNTING_PLUGIN),
    ]));
    assert_eq!(calls_seen(&pool, 1).await, 1);
    assert_eq!(
        calls_seen(&pool, 1).await,
        2,
        "the VM stays under the budget"
    );
    // Two VMs are over the budget: the first, used least recently, goes.
    assert_eq!(calls_seen(&pool, 2).await, 1);
    assert_eq!(calls_seen(&pool, 2).await, 2, "the VM in use stays");
    assert_eq!(
        calls_seen(&pool, 1).await,
        1,
        "set up again on a fresh VM, its meta.global new"
    );
    assert_eq!(
        lifecycle(&outputs),
        vec![
            (10, "setup".to_owned()),
            (20, "setup".to_owned()),
            (10, "teardown".to_owned()),
            (10, "setup".to_owned()),
            (20, "teardown".to_owned()),
        ]
    );
    let stats = pool.stats();
    assert_eq!(stats["vms"], 1, "{stats}");
    assert_eq!(stats["vms_torn_down"], 2, "{stats}");
}

/// A VM unused for the idle time is torn down by the pool's sweep, without any request to
/// its worker, and set up again when its config gets an event.
#[actix::test]
async fn an_idle_vm_is_torn_down_by_the_sweep_and_set_up_again_on_use() {
    let outputs = Arc::new(Collected::default());
    let pool = start_retaining(
        1,
        outputs.clone(),
        VmRetention {
            budget_bytes: None,
            idle: Some(Duration::from_millis(200)),
        },
    );
    pool.set_plugins(PluginSet::new([config(10, 1, 1, "idle", COUNTING_PLUGIN)]));
    assert_eq!(calls_seen(&pool, 1).await, 1);
    assert_eq!(calls_seen(&pool, 1).await, 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.stats()["vms"] != 0 {
        assert!(Instant::now() < deadline, "the idle VM was never torn down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pool.stats()["vms_torn_down"], 1);
    assert_eq!(calls_seen(&pool, 1).await, 1, "a fresh VM, set up again");
    assert_eq!(
        lifecycle(&outputs),
        vec![
            (10, "setup".to_owned()),
            (10, "teardown".to_owned()),
            (10, "setup".to_owned()),
        ]
    );
}

/// One team's events are spread over every worker by distinct id: each id's events run in
/// order on one VM, batch after batch, the answers come back in the events' order, and each
/// worker holds its own VM of the config (with its own `meta.global`).
#[actix::test]
async fn one_teams_events_spread_over_the_workers_by_distinct_id_in_order() {
    const IDS: usize = 40;
    let pool = start(2, Arc::new(Collected::default()));
    pool.set_plugins(PluginSet::new([config(
        10,
        2,
        1,
        "tagger",
        "exports.setupPlugin = ({ global }) => { global.vm = String(Math.random()); global.seen = {} }; \
         exports.processEvent = (e, { global }) => { \
             const n = (global.seen[e.distinct_id] || 0) + 1; global.seen[e.distinct_id] = n; \
             e.properties.vm = global.vm; e.properties.nth = n; return e }",
    )]));
    let batch = |from: usize, count: usize| -> Vec<Value> {
        (from..from + count)
            .map(|i| {
                json!({"event": "e", "team_id": 2, "distinct_id": format!("user-{}", i % IDS), "properties": {"i": i}})
            })
            .collect()
    };
    let mut vm_of: HashMap<String, String> = HashMap::new();
    for (from, count) in [(0, 5 * IDS), (5 * IDS, IDS)] {
        let outcomes = pool
            .process_events(2, chain_events(batch(from, count)))
            .await;
        assert_eq!(outcomes.len(), count);
        for (offset, outcome) in outcomes.iter().enumerate() {
            let i = from + offset;
            let event = outcome.event_value().expect("kept");
            assert_eq!(event["properties"]["i"], i, "answers in the events' order");
            assert_eq!(
                event["properties"]["nth"],
                i / IDS + 1,
                "each id's events run in order on one VM"
            );
            let distinct_id = event["distinct_id"].as_str().expect("id").to_owned();
            let vm = event["properties"]["vm"].as_str().expect("vm").to_owned();
            assert_eq!(vm_of.entry(distinct_id).or_insert_with(|| vm.clone()), &vm);
        }
    }
    let vms: std::collections::HashSet<&String> = vm_of.values().collect();
    assert_eq!(vms.len(), 2, "both workers ran the team's chain");
    assert_eq!(pool.stats()["vms"], 2);
}

/// onEvent runs on the async workers: one stuck in a fetch that hangs does not hold up
/// another team's processEvent, even with a single processEvent worker.
#[actix::test]
async fn an_on_event_stuck_in_fetch_does_not_hold_up_another_teams_process_event() {
    // Under the watchdog's 2 × TASK_TIMEOUT (600 ms here), which would replace the worker.
    let hang = Duration::from_millis(400);
    let outputs = Arc::new(Collected::default());
    let pool = start_with(1, outputs.clone(), VmRetention::default(), hang);
    pool.set_plugins(PluginSet::new([
        config(
            10,
            1,
            1,
            "exporter",
            "exports.onEvent = async (e) => { try { await fetch('https://hooks.example/x') } catch (error) { console.log('fetch failed') } }",
        ),
        config(
            20,
            2,
            1,
            "tagger",
            "exports.processEvent = (e) => { e.properties.tagged = true; return e }",
        ),
    ]));
    // Both VMs built, so that only the calls are timed.
    pool.process_events(2, chain_events(vec![event(2, "warm")]))
        .await;
    pool.process_events(1, chain_events(vec![event(1, "warm")]))
        .await;

    let background = pool.clone();
    let on_event = actix::spawn(async move {
        background
            .run_async(1, vec![event(1, "stored")].into(), None)
            .await
    });
    // Until the onEvent call is inside its fetch.
    let deadline = Instant::now() + Duration::from_secs(5);
    let busy = |stats: Value| {
        stats["workers"]
            .as_array()
            .is_some_and(|workers| workers.iter().any(|w| !w["busy_ms"].is_null()))
    };
    while !busy(pool.stats()) {
        assert!(Instant::now() < deadline, "onEvent never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let started = Instant::now();
    let outcomes = pool
        .process_events(2, chain_events(vec![event(2, "e")]))
        .await;
    let took = started.elapsed();
    assert_eq!(
        outcomes[0].event_value().expect("kept")["properties"]["tagged"],
        true
    );
    assert!(
        took < Duration::from_millis(100),
        "processEvent waited {took:?} behind another team's onEvent"
    );
    on_event.await.expect("joined").expect("ran");
    let logs = collected(&outputs, |side| {
        side.logs
            .iter()
            .map(|entry| entry.message.clone())
            .collect()
    });
    assert!(logs.contains(&"fetch failed".to_owned()), "{logs:?}");
}

/// One budget for all workers, without thrashing: a worker under an equal share keeps the VM
/// it uses even while the total is over the budget, and the worker holding more than its share
/// gives the excess back when the pool sweeps it.
#[actix::test]
async fn a_worker_over_its_share_gives_back_and_a_worker_under_it_keeps_its_vms() {
    let one_vm = one_vm_bytes().await;

    // One processEvent worker and one async worker; room for four and a half VMs.
    let pool = start_retaining(
        1,
        Arc::new(Collected::default()),
        VmRetention {
            budget_bytes: Some(one_vm * 9 / 2),
            idle: None,
        },
    );
    let scheduled = format!("{COUNTING_PLUGIN}; exports.runEveryMinute = () => {{}}");
    pool.set_plugins(PluginSet::new([
        config(31, 1, 1, "a", &scheduled),
        config(32, 1, 2, "b", &scheduled),
        config(33, 1, 3, "c", &scheduled),
        config(34, 1, 4, "d", &scheduled),
        config(40, 2, 1, "busy", COUNTING_PLUGIN),
    ]));
    // The async worker builds four VMs: within the budget.
    pool.run_scheduled(1, Method::RunEveryMinute)
        .await
        .expect("ran");
    assert_eq!(pool.stats()["vms"], 4);
    // The processEvent worker's VM puts the total over the budget, but that worker holds less
    // than an equal share: it keeps its VM.
    assert_eq!(calls_seen(&pool, 2).await, 1);
    assert_eq!(
        calls_seen(&pool, 2).await,
        2,
        "not torn down after its call"
    );
    // The sweep (every second with a budget) has the async worker give back its excess, down
    // to 75 % of the budget (3.4 VMs): two of its four go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.stats()["vms"] != 3 {
        assert!(Instant::now() < deadline, "{}", pool.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(calls_seen(&pool, 2).await, 3, "the busy worker's VM stayed");
    let stats = pool.stats();
    assert_eq!(stats["workers"][0]["vms"], 1, "{stats}");
    assert_eq!(stats["workers"][1]["vms"], 2, "{stats}");
}

/// What `pick` finds in the pool's stats, once it finds something (within 10 s).
async fn once_in_stats<T>(
    pool: &PluginVmPool,
    what: &str,
    pick: impl Fn(&Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = pick(&pool.stats()) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never came: {}",
            pool.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The worker process's pid as `/_actors` shows it, once it has started.
/// Team 2's event, through [`bomb_and_healthy`]'s bomb, goes on with the bomb listed as
/// failed.
async fn assert_bomb_failed(pool: &PluginVmPool, bomb: &str) {
    let bombed = pool
        .process_events(2, chain_events(vec![event(2, "boom")]))
        .await;
    assert_eq!(
        bombed[0].event_value().expect("kept")["properties"]["$plugins_failed"],
        json!(["bomb (30)"]),
        "{bomb}"
    );
}

/// Team 3's event goes through [`bomb_and_healthy`]'s healthy plugin.
async fn assert_healthy_flows(pool: &PluginVmPool) {
    let healthy = pool
        .process_events(3, chain_events(vec![event(3, "fine")]))
        .await;
    assert_eq!(
        healthy[0].event_value().expect("event")["properties"]["ok"],
        true
    );
}

async fn worker_pid(pool: &PluginVmPool, index: usize) -> u32 {
    once_in_stats(pool, "the worker's pid", |stats| {
        stats["workers"][index]["pid"]
            .as_u64()
            .map(|pid| pid as u32)
    })
    .await
}

/// In a process of its own, a worker stopped for good (by a memory bomb, or by a regular
/// expression that backtracks for ever, which no deadline check can interrupt) is ended: its
/// process is gone, and with it its memory and its CPU; another process serves, the config is
/// disabled, and `/_actors` counts the replacement.
#[test]
fn a_stopped_worker_process_is_ended_and_replaced() {
    IN_PROCESSES.set(true);
    actix::System::new().block_on(async {
        let bombs = [
            "let s = 'xxxxxxxxxxxxxxxx'; while (true) { s = s + s }",
            "/(a+)+$/.test('a'.repeat(40) + 'b')",
        ];
        for bomb in bombs {
            let pool = start(1, Arc::new(Collected::default()));
            pool.set_plugins(bomb_and_healthy(bomb));
            let before = worker_pid(&pool, 0).await;
            assert_bomb_failed(&pool, bomb).await;
            assert_healthy_flows(&pool).await;
            let after = worker_pid(&pool, 0).await;
            assert_ne!(before, after, "{bomb}: a new process serves");
            assert!(
                !Path::new(&format!("/proc/{before}")).exists(),
                "{bomb}: the stopped process is gone (killed and reaped)"
            );
            assert_eq!(pool.stats()["workers_replaced"], 1, "{bomb}");
            assert!(!pool.has_plugins(2), "{bomb}: the config is disabled");
        }
    });
}

/// A worker process that dies without a word (a crash, the kernel's OOM killer) is replaced.
/// The request it was answering is blamed: its events go on marked failed (sent again, it
/// could end the next process too); a request queued behind it goes to the new process and
/// succeeds; and no config is disabled, since which one did it is not known.
#[test]
fn a_worker_process_killed_from_outside_is_replaced_and_the_requests_behind_sent_again() {
    IN_PROCESSES.set(true);
    actix::System::new().block_on(async {
        let (pool, outputs) = running([config(
            40,
            2,
            1,
            "slow",
            "exports.processEvent = (e) => { const until = Date.now() + 150; while (Date.now() < until) {} e.properties.done = true; return e }",
        )]);
        let pid = worker_pid(&pool, 0).await;
        let running_request = pool.process_events(2, chain_events(vec![event(2, "a")]));
        let queued_and_kill = async {
            once_in_stats(&pool, "the request's start", |stats| {
                stats["workers"][0]["busy_ms"].as_u64()
            })
            .await;
            let queued = pool.process_events(2, chain_events(vec![event(2, "b")]));
            let kill = async {
                // The second request is in the process's queue by now.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let killed = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .expect("kill runs");
                assert!(killed.success());
            };
            tokio::join!(queued, kill).0
        };
        let (blamed, queued) = tokio::join!(running_request, queued_and_kill);
        assert_eq!(blamed[0].failures.len(), 1, "{:?}", blamed[0]);
        assert!(blamed[0].event.is_some(), "the event goes on");
        assert!(queued[0].failures.is_empty(), "{:?}", queued[0].failures);
        assert_eq!(
            queued[0].event_value().expect("kept")["properties"]["done"],
            true
        );
        assert_ne!(worker_pid(&pool, 0).await, pid);
        assert_eq!(pool.stats()["workers_replaced"], 1);
        assert!(pool.has_plugins(2), "no config is disabled");
        let errors = collected(&outputs, |side| side.config_errors.clone());
        assert!(errors.is_empty(), "{errors:?}");
    });
}

/// boa's `JSON.stringify` recurses natively with no limit, so a deeply nested value overflows
/// the stack, which aborts the whole process: with worker threads, the server (and it would
/// again on the batch's redelivery). A worker process dies alone; the request it was in is
/// blamed on its first death rather than sent again to end more processes, its events go on
/// marked failed, and other teams keep flowing.
#[test]
fn a_native_stack_overflow_ends_only_its_worker_process_once() {
    IN_PROCESSES.set(true);
    actix::System::new().block_on(async {
        let pool = start(1, Arc::new(Collected::default()));
        pool.set_plugins(bomb_and_healthy(
            "let a = []; for (let i = 0; i < 1e5; i++) { a = [a] }; JSON.stringify(a)",
        ));
        assert_bomb_failed(&pool, "the stack overflow").await;
        assert_eq!(pool.stats()["workers_replaced"], 1, "one death, not three");
        assert_healthy_flows(&pool).await;
    });
}

/// Every test above again, with each of the pool's workers in a process of its own (this
/// test binary, see `isolation::tests`): what plugins see and what the pool reports is the
/// same.
mod in_processes {
    fn in_processes(test: fn()) {
        super::IN_PROCESSES.set(true);
        test();
    }

    #[test]
    fn every_call_is_timed_in_the_method_histogram() {
        in_processes(super::every_call_is_timed_in_the_method_histogram);
    }

    #[test]
    fn an_answer_with_changes_rebuilds_the_event_the_chain_made() {
        in_processes(super::an_answer_with_changes_rebuilds_the_event_the_chain_made);
    }

    #[test]
    fn chains_run_in_order_and_record_success_and_failure() {
        in_processes(super::chains_run_in_order_and_record_success_and_failure);
    }

    #[test]
    fn each_config_of_a_chain_gets_its_own_copy_of_the_event() {
        in_processes(super::each_config_of_a_chain_gets_its_own_copy_of_the_event);
    }

    #[test]
    fn the_chain_keeps_the_event_through_what_plugins_get_wrong() {
        in_processes(super::the_chain_keeps_the_event_through_what_plugins_get_wrong);
    }

    #[test]
    fn results_nobody_reads_are_not_checked() {
        in_processes(super::results_nobody_reads_are_not_checked);
    }

    #[test]
    fn a_failed_setup_disables_the_config_and_is_reported() {
        in_processes(super::a_failed_setup_disables_the_config_and_is_reported);
    }

    #[test]
    fn the_watchdog_contains_what_the_deadline_cannot() {
        in_processes(super::the_watchdog_contains_what_the_deadline_cannot);
    }

    #[test]
    fn captures_are_attributed_to_the_config_that_made_them() {
        in_processes(super::captures_are_attributed_to_the_config_that_made_them);
    }

    #[test]
    fn post_ingestion_methods_run_and_retry() {
        in_processes(super::post_ingestion_methods_run_and_retry);
    }

    #[test]
    fn exports_retry_three_times_then_fail() {
        in_processes(super::exports_retry_three_times_then_fail);
    }

    #[test]
    fn over_the_budget_the_least_recently_used_vm_is_torn_down_and_set_up_again_on_use() {
        in_processes(
            super::over_the_budget_the_least_recently_used_vm_is_torn_down_and_set_up_again_on_use,
        );
    }

    #[test]
    fn an_idle_vm_is_torn_down_by_the_sweep_and_set_up_again_on_use() {
        in_processes(super::an_idle_vm_is_torn_down_by_the_sweep_and_set_up_again_on_use);
    }

    #[test]
    fn one_teams_events_spread_over_the_workers_by_distinct_id_in_order() {
        in_processes(super::one_teams_events_spread_over_the_workers_by_distinct_id_in_order);
    }

    #[test]
    fn an_on_event_stuck_in_fetch_does_not_hold_up_another_teams_process_event() {
        in_processes(
            super::an_on_event_stuck_in_fetch_does_not_hold_up_another_teams_process_event,
        );
    }

    #[test]
    fn a_worker_over_its_share_gives_back_and_a_worker_under_it_keeps_its_vms() {
        in_processes(super::a_worker_over_its_share_gives_back_and_a_worker_under_it_keeps_its_vms);
    }
}
