use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::plugins::host::{CacheOp, FetchReply, FetchRequest, StorageOp};
use crate::plugins::vm::{VmIdentity, VmSource};

struct NoNetwork;

impl PluginHost for NoNetwork {
    fn fetch(&self, request: FetchRequest) -> Result<FetchReply, String> {
        Err(format!("no network in this test ({})", request.url))
    }

    fn cache(&self, _: &VmIdentity, op: CacheOp) -> Result<Value, String> {
        Err(format!("no cache in this test ({op:?})"))
    }

    fn storage(&self, _: &VmIdentity, op: StorageOp) -> Result<Value, String> {
        Err(format!("no storage in this test ({op:?})"))
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
    }
}

fn start(workers: usize, outputs: Arc<Collected>) -> PluginVmPool {
    let config = PluginVmPoolConfig {
        workers,
        tasks_per_worker: 10,
        limits: VmLimits {
            task_timeout: Duration::from_millis(300),
            memory_limit_bytes: 64 * 1024 * 1024,
            ..VmLimits::default()
        },
        setup_retry_base: Duration::from_millis(50),
    };
    let metrics = Metrics::new().expect("metrics");
    let factory: HostFactory = Arc::new(|| Rc::new(NoNetwork) as Rc<dyn PluginHost>);
    PluginVmPool::start(config, factory, outputs, &metrics).expect("pool starts")
}

fn event(team_id: i64, name: &str) -> Value {
    json!({"event": name, "team_id": team_id, "distinct_id": "d", "properties": {}})
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
        .process_events(2, vec![event(2, "keep"), event(2, "drop")])
        .await;
    let kept = outcomes[0].event.as_ref().expect("kept");
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

    // A team without plugins passes through untouched.
    let outcomes = pool.process_events(3, vec![event(3, "other")]).await;
    assert_eq!(outcomes[0].event, Some(event(3, "other")));
}

#[actix::test]
async fn a_failed_setup_disables_the_config_and_is_reported() {
    let outputs = Arc::new(Collected::default());
    let pool = start(1, outputs.clone());
    pool.set_plugins(PluginSet::new([
        config(20, 2, 1, "bad setup", "exports.setupPlugin = () => { throw new Error('no key') }; exports.processEvent = (e) => e"),
        config(21, 2, 2, "bad require", "const fs = require('fs'); exports.processEvent = (e) => e"),
        config(22, 2, 3, "fine", "exports.processEvent = (e) => { e.properties.fine = true; return e }"),
    ]));
    let outcomes = pool.process_events(2, vec![event(2, "e")]).await;
    let out = outcomes[0].event.as_ref().expect("event");
    assert_eq!(out["properties"]["fine"], true);
    assert_eq!(
        out["properties"]["$plugins_failed"],
        json!(["bad setup (20)", "bad require (21)"])
    );
    let errors: Vec<(i64, String)> = outputs
        .0
        .lock()
        .expect("lock")
        .iter()
        .flat_map(|s| {
            s.config_errors
                .iter()
                .map(|(id, m)| (id.plugin_config_id, m.clone()))
        })
        .collect();
    assert!(
        errors
            .iter()
            .any(|(id, m)| *id == 20 && m.contains("no key")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|(id, m)| *id == 21 && m.contains("'fs'")),
        "{errors:?}"
    );
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
        pool.set_plugins(PluginSet::new([
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
        ]));
        let started = Instant::now();
        let bombed = pool.process_events(2, vec![event(2, "boom")]);
        let healthy = async {
            // Sent while the bomb runs; answered by the replacement worker.
            tokio::time::sleep(Duration::from_millis(50)).await;
            pool.process_events(3, vec![event(3, "fine")]).await
        };
        let (bombed, healthy) = tokio::join!(bombed, healthy);
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(1500),
            "{bomb}: took {elapsed:?}"
        );
        let out = bombed[0].event.as_ref().expect("kept");
        assert_eq!(
            out["properties"]["$plugins_failed"],
            json!(["bomb (30)"]),
            "{bomb}"
        );
        assert_eq!(
            healthy[0].event.as_ref().expect("event")["properties"]["ok"],
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
                .any(|(id, _)| id.plugin_config_id == 30)
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
        .process_events(2, vec![event(2, "a"), event(2, "b")])
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
