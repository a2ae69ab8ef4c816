use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::host_services::HostServiceError;
use super::runtime::natives::{
    CacheOp, FetchReply, FetchRequest, JobRequest, PluginHost, StorageOp,
};
use super::runtime::vm::{CallError, Method, PluginVm, VmError, VmLimits};
use super::runtime::{Attachment, VmIdentity, VmSource};
use super::{LogLevel, LogSource};
use crate::cluster::ClusterError;
use crate::event::PluginEvent;

#[derive(Default)]
struct MockHost {
    requests: RefCell<Vec<FetchRequest>>,
    cache: RefCell<std::collections::HashMap<String, String>>,
    storage: RefCell<std::collections::HashMap<String, String>>,
    jobs: RefCell<Vec<(i64, JobRequest)>>,
}

impl PluginHost for MockHost {
    fn fetch(&self, request: FetchRequest) -> Result<FetchReply, HostServiceError> {
        let reply = FetchReply {
            status: 200,
            status_text: "OK".into(),
            headers: [("content-type".to_string(), "application/json".to_string())].into(),
            body: json!({
                "echo": request.url,
                "method": request.method,
                "headers": request.headers,
                "body": request.body,
            })
            .to_string(),
        };
        self.requests.borrow_mut().push(request);
        Ok(reply)
    }

    /// Enough of a cache to show the prelude's JSON handling and the key scoping.
    fn cache(&self, identity: &VmIdentity, op: CacheOp) -> Result<Value, HostServiceError> {
        let scope =
            |key: &str| format!("@plugin/{}/{}/{key}", identity.plugin_id, identity.team_id);
        let mut cache = self.cache.borrow_mut();
        Ok(match op {
            CacheOp::Set { key, value, .. } => {
                cache.insert(scope(&key), value);
                Value::Null
            }
            CacheOp::Get { key } => cache
                .get(&scope(&key))
                .cloned()
                .map_or(Value::Null, Value::String),
            CacheOp::Incr { key } => {
                let entry = cache.entry(scope(&key)).or_insert_with(|| "0".into());
                let next = entry.parse::<i64>().map_err(|_| ClusterError::WrongType {
                    key,
                    expected: "an integer",
                })? + 1;
                *entry = next.to_string();
                json!(next)
            }
            _ => return Err(HostServiceError::NotAvailable("this cache operation")),
        })
    }

    fn enqueue_job(
        &self,
        identity: &VmIdentity,
        job: JobRequest,
    ) -> Result<Value, HostServiceError> {
        self.jobs
            .borrow_mut()
            .push((identity.plugin_config_id, job));
        Ok(Value::Null)
    }

    /// A PostHog at a made-up address; the server's own keys when asked for.
    fn api(&self, identity: &VmIdentity, with_keys: bool) -> Result<Value, HostServiceError> {
        let mut reply = json!({"siteUrl": "https://posthog.example/", "teamId": identity.team_id});
        if with_keys {
            reply["projectApiKey"] = json!("phc_team");
            reply["personalApiKey"] = json!("phx_bot");
        }
        Ok(reply)
    }

    /// One known address, in geoip2-node's shape.
    fn geoip(&self, ip: &str) -> Value {
        if ip == "81.2.69.142" {
            json!({"city": {"names": {"en": "East Finchley"}}, "country": {"isoCode": "GB"}})
        } else {
            Value::Null
        }
    }

    fn storage(&self, identity: &VmIdentity, op: StorageOp) -> Result<Value, HostServiceError> {
        let scope = |key: &str| format!("{}/{key}", identity.plugin_config_id);
        let mut storage = self.storage.borrow_mut();
        Ok(match op {
            StorageOp::Get { key } => storage
                .get(&scope(&key))
                .cloned()
                .map_or(Value::Null, Value::String),
            StorageOp::Set { key, value } => {
                storage.insert(scope(&key), value);
                Value::Null
            }
            StorageOp::Del { key } => {
                storage.remove(&scope(&key));
                Value::Null
            }
            _ => return Err(HostServiceError::NotAvailable("this storage operation")),
        })
    }
}

fn identity() -> VmIdentity {
    VmIdentity {
        plugin_config_id: 7,
        plugin_id: 3,
        team_id: 2,
        plugin_name: "test plugin".into(),
    }
}

fn limits() -> VmLimits {
    VmLimits {
        task_timeout: Duration::from_millis(300),
        ..VmLimits::default()
    }
}

fn load_with(code: &str, config: Value, attachments: &[Attachment]) -> Result<PluginVm, VmError> {
    let source = VmSource {
        file_name: "index.js".into(),
        code: std::sync::Arc::from(code),
    };
    PluginVm::load(
        identity(),
        &source,
        &config,
        attachments,
        limits(),
        Rc::new(MockHost::default()),
    )
    .map(|(vm, _)| vm)
}

fn load(code: &str) -> PluginVm {
    load_with(code, json!({"suffix": "_x"}), &[]).expect("the plugin loads")
}

/// processEvent on [`event`], which must succeed and return an event.
fn processed(vm: &mut PluginVm) -> Value {
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    result.expect("no error").expect("an event")
}

fn event() -> Value {
    json!({"event": "page", "distinct_id": "u1", "properties": {"i": 1, "$current_url": "https://example.com/x?y=1"}})
}

const SMALL_PLUGIN: &str = r#"
function processEvent(event, meta) {
    const props = event.properties || {}
    const url = new URL(props.$current_url)
    props.host_seen = url.hostname
    props.renamed = props.i; delete props.i
    event.event = event.event + meta.config.suffix
    event.properties = props
    return event
}
module.exports = { processEvent }
"#;

#[test]
fn runs_a_small_process_event_plugin() {
    let mut vm = load(SMALL_PLUGIN);
    assert!(vm.has(Method::ProcessEvent));
    assert!(!vm.has(Method::OnEvent));
    let out = processed(&mut vm);
    assert_eq!(out["event"], "page_x");
    assert_eq!(out["properties"]["host_seen"], "example.com");
    assert_eq!(out["properties"]["renamed"], 1);
    assert!(out["properties"].get("i").is_none());
}

#[test]
fn finds_exports_in_every_module_shape() {
    let shapes = [
        "exports.processEvent = (e) => ({ ...e, event: 'shape' })",
        "module.exports = { processEvent: (e) => ({ ...e, event: 'shape' }) }",
        "exports.default = { processEvent: (e) => ({ ...e, event: 'shape' }) }",
        "function processEvent(e) { return { ...e, event: 'shape' } }",
        "Object.defineProperty(exports, 'processEvent', { enumerable: true, get: () => (e) => ({ ...e, event: 'shape' }) })",
        "const plugin = { processEvent: async (e) => ({ ...e, event: 'shape' }) }; module.exports = plugin",
        // Declared under a name the source does not spell out.
        r"function process\u0045vent(e) { return { ...e, event: 'shape' } }",
        "eval('function process' + 'Event(e) { return { ...e, event: \\'shape\\' } }')",
        "globalThis['process' + 'Ev' + 'ent'] = (e) => ({ ...e, event: 'shape' })",
    ];
    for shape in shapes {
        let mut vm = load(shape);
        let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
        assert_eq!(
            result.expect(shape).expect(shape)["event"],
            "shape",
            "{shape}"
        );
    }
}

#[test]
fn undefined_and_null_drop_the_event() {
    for body in ["return", "return null", "return undefined"] {
        let mut vm = load(&format!("exports.processEvent = function (e) {{ {body} }}"));
        let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
        assert_eq!(result, Ok(None), "{body}");
    }
}

#[test]
fn async_methods_and_timers_are_driven_to_completion() {
    let mut vm = load(
        r#"
        exports.processEvent = async function (e) {
            await new Promise((resolve) => setTimeout(resolve, 20))
            const later = await Promise.resolve('later')
            e.properties.waited = later
            return e
        }"#,
    );
    let started = Instant::now();
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    assert_eq!(
        result.expect("no error").expect("event")["properties"]["waited"],
        "later"
    );
    assert!(started.elapsed() >= Duration::from_millis(20));
}

#[test]
fn thrown_values_keep_name_and_message() {
    let cases = [
        ("throw new TypeError('bad type')", "TypeError", "bad type"),
        ("throw 'a plain string'", "Error", "a plain string"),
        ("null.x", "TypeError", ""),
        (
            "const { RetryError } = require('@posthog/plugin-scaffold'); throw new RetryError('again')",
            "RetryError",
            "again",
        ),
    ];
    for (body, name, message) in cases {
        let mut vm = load(&format!(
            "exports.processEvent = async function (e) {{ {body} }}"
        ));
        let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
        match result {
            Err(CallError::Thrown {
                name: n,
                message: m,
            }) => {
                assert_eq!(n, name, "{body}");
                assert!(m.contains(message), "{body}: {m}");
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    let mut vm = load("exports.processEvent = () => { throw new RetryError('global') }");
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    assert!(result.expect_err("throws").is_retry());
}

/// The prelude's core is built natively; what plugins can see of it is what the JavaScript
/// it replaced gave them (a class extending Error, Node-style timers, `require`'s list).
#[test]
fn the_core_globals_behave_as_javascript_would_define_them() {
    let mut vm = load(
        r#"
        const { RetryError: Scaffold } = require('@posthog/plugin-scaffold')
        class Later extends RetryError {
            constructor(message) { super(message); this.extra = 1 }
        }
        exports.processEvent = async (e) => {
            const later = new Later('soon')
            const plain = new RetryError()
            let uncalled = ''
            try { RetryError('x') } catch (error) { uncalled = error.name }
            let missing = ''
            try { require('fs') } catch (error) { missing = error.message }
            const order = []
            await new Promise((resolve) => {
                setTimeout((a, b) => order.push(a + b), 5, 'x', 'y')
                const cancelled = setTimeout(() => order.push('never'), 1)
                clearTimeout(cancelled)
                setTimeout(resolve, 'not a number')
            })
            await new Promise((resolve) => setTimeout(resolve, 10))
            e.properties.checks = {
                sameClass: Scaffold === RetryError,
                subclass: later instanceof Later && later instanceof RetryError && later instanceof Error,
                names: [later.name, later.message, later.extra, plain.name, Object.hasOwn(plain, 'message'), 'message' in plain, String(later)],
                shape: [RetryError.name, RetryError.length, Object.getPrototypeOf(RetryError) === Error,
                        RetryError.prototype.constructor === RetryError, typeof RetryError.prototype],
                uncalled,
                missing,
                order,
                hidden: Object.keys(globalThis).filter((k) => ['posthog', 'RetryError', 'setTimeout', 'console', 'fetch', 'Buffer'].includes(k)),
                functions: [typeof setTimeout, setTimeout.name, clearTimeout.name, typeof posthog.capture, require.name, require.length],
                posthogKeys: Object.keys(posthog),
                modules: [typeof require('url').URL, typeof require('crypto').createHash, typeof require('node-fetch')],
            }
            console = { log() {} }
            e.properties.replaced = typeof console.log === 'function' && typeof console.error === 'undefined'
            return e
        }"#,
    );
    let out = processed(&mut vm);
    assert_eq!(
        out["properties"]["checks"],
        json!({
            "sameClass": true,
            "subclass": true,
            "names": ["RetryError", "soon", 1, "RetryError", false, true, "RetryError: soon"],
            "shape": ["RetryError", 1, true, true, "object"],
            "uncalled": "TypeError",
            "missing": "Cannot find module 'fs': plugins may import only url, @posthog/plugin-scaffold, crypto, node-fetch",
            "order": ["xy"],
            "hidden": [],
            "functions": ["function", "setTimeout", "clearTimeout", "function", "require", 1],
            "posthogKeys": ["capture", "api"],
            "modules": ["function", "function", "function"],
        })
    );
    assert_eq!(out["properties"]["replaced"], true);
}

/// Node, where PostHog's plugins run, has ECMAScript's Annex B: `substr`, `escape`, `getYear`,
/// `__proto__` and the rest, which older plugin code uses freely.
#[test]
fn nodes_annex_b_built_ins_are_there() {
    let mut vm = load(
        r#"
        exports.processEvent = (e) => {
            const o = { a: 1 }
            e.properties.annexB = [
                'https://example.com/x'.substr(8, 7),
                escape('a b/ü'),
                unescape('%u00FC%20'),
                new Date(Date.UTC(2020, 0, 1)).getYear(),
                o.__proto__ === Object.prototype,
                'x'.bold(),
                typeof RegExp.prototype.compile,
                'ab'.trimLeft !== undefined,
            ]
            return e
        }"#,
    );
    let out = processed(&mut vm);
    assert_eq!(
        out["properties"]["annexB"],
        json!([
            "example",
            "a%20b/%FC",
            "\u{fc} ",
            120,
            true,
            "<b>x</b>",
            "function",
            true
        ])
    );
}

#[test]
fn modules_outside_the_allow_list_fail_the_load_naming_the_module() {
    let error = load_with("const fs = require('fs')", json!({}), &[]).expect_err("fs is refused");
    let text = error.to_string();
    assert!(text.contains("'fs'"), "{text}");
    assert!(matches!(error, VmError::Load { .. }));
}

#[test]
fn no_process_env_files_or_host_globals() {
    let mut vm = load(
        r#"exports.processEvent = (e) => {
            e.properties.kinds = [typeof process, typeof require, typeof __ps_host, typeof host].join(',')
            return e
        }"#,
    );
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    // `require` is the module-scoped allow-list resolver, as in Node; nothing else leaks.
    assert_eq!(
        result.expect("ok").expect("event")["properties"]["kinds"],
        "undefined,function,undefined,undefined"
    );
    let mut vm =
        load("exports.processEvent = (e) => { e.properties.env = process.env.HOME; return e }");
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    assert!(
        matches!(result, Err(CallError::Thrown { ref name, .. }) if name == "ReferenceError"),
        "{result:?}"
    );
}

#[test]
fn runaway_code_is_stopped_and_reported() {
    let cases = [
        "while (true) {}",
        "function f() { return f() + 1 }; f()",
        "function spin() { for (let i = 0; i < 5e6; i++) {} } for (;;) { spin() }",
    ];
    for body in cases {
        let mut vm = load(&format!("exports.processEvent = function (e) {{ {body} }}"));
        let started = Instant::now();
        let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
        assert!(result.is_err(), "{body}: {result:?}");
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "{body}: took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn promises_that_never_settle_or_wait_too_long_fail() {
    let mut vm = load("exports.processEvent = () => new Promise(() => {})");
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    assert_eq!(result, Err(CallError::NeverSettled));

    let mut vm = load(
        "exports.processEvent = async (e) => { await new Promise((r) => setTimeout(r, 60000)); return e }",
    );
    let started = Instant::now();
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    assert!(matches!(result, Err(CallError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[test]
fn crypto_hashes_and_uuids() {
    let mut vm = load(
        r#"
        const crypto = require('crypto')
        exports.processEvent = (e) => {
            e.properties.sha256 = crypto.createHash('sha256').update('abc').digest('hex')
            e.properties.md5 = crypto.createHash('md5').update('a').update('bc').digest('hex')
            const digest = crypto.createHash('sha1').update('abc').digest()
            digest[0] = 0
            e.properties.sha1_first = [digest[0], digest[1], digest.length]
            e.properties.hmac = crypto.createHmac('sha256', 'key').update('abc').digest('base64')
            e.properties.uuid = crypto.randomUUID()
            return e
        }"#,
    );
    let props = processed(&mut vm)["properties"].clone();
    assert_eq!(
        props["sha256"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(props["md5"], "900150983cd24fb0d6963f7d28e17f72");
    assert_eq!(props["sha1_first"], json!([0, 0x99, 20]));
    assert_eq!(
        props["hmac"],
        "nBluMtwBdfhvSxy4konWYZ3mvuaZ5MN45oMJ7Zehpqs="
    );
    assert_eq!(props["uuid"].as_str().map(str::len), Some(36));
}

#[test]
fn attachments_behave_like_buffers() {
    let attachments = [Attachment {
        key: "mapping".into(),
        content_type: "application/json".into(),
        file_name: "mapping.json".into(),
        contents: br#"{"from": "to", "emoji": "\u00e9\u2603"}"#.to_vec(),
    }];
    let mut vm = load_with(
        r#"exports.processEvent = (e, { attachments }) => {
            const a = attachments.mapping
            e.properties.parsed = JSON.parse(a.contents)
            e.properties.text = a.contents.toString().length
            e.properties.meta = [a.content_type, a.file_name]
            return e
        }"#,
        json!({}),
        &attachments,
    )
    .expect("loads");
    let props = processed(&mut vm)["properties"].clone();
    assert_eq!(props["parsed"]["from"], "to");
    assert_eq!(props["meta"], json!(["application/json", "mapping.json"]));
}

#[test]
fn console_output_becomes_log_entries() {
    let mut vm = load(
        r#"exports.processEvent = (e) => {
            console.log('seen', e.event, { n: 1 })
            console.error(new Error('boom'))
            return e
        }"#,
    );
    let (_, effects) = vm.call(Method::ProcessEvent, &[&event()]);
    assert_eq!(effects.logs.len(), 2);
    assert_eq!(effects.logs[0].message, r#"seen page {"n":1}"#);
    assert_eq!(effects.logs[0].level, LogLevel::Log);
    assert_eq!(effects.logs[0].source, LogSource::Console);
    assert_eq!(effects.logs[0].plugin_config_id, 7);
    assert_eq!(effects.logs[1].level, LogLevel::Error);
    assert!(
        effects.logs[1].message.contains("boom"),
        "{}",
        effects.logs[1].message
    );
}

#[test]
fn posthog_capture_and_fetch_reach_the_host() {
    let mut vm = load(
        r#"exports.processEvent = async (e) => {
            posthog.capture('derived', { from: e.event })
            const fetch = require('node-fetch')
            const reply = await fetch('https://example.com/hook', { method: 'post', body: JSON.stringify(e) })
            e.properties.fetched = [reply.status, reply.ok, reply.headers.get('Content-Type'), (await reply.json()).method]
            return e
        }"#,
    );
    let (result, effects) = vm.call(Method::ProcessEvent, &[&event()]);
    let props = result.expect("ok").expect("event")["properties"].clone();
    assert_eq!(
        props["fetched"],
        json!([200, true, "application/json", "POST"])
    );
    assert_eq!(effects.captures.len(), 1);
    assert_eq!(effects.captures[0].event, "derived");
    assert_eq!(effects.captures[0].properties, json!({"from": "page"}));
}

/// PostHog's `posthog.api`: SITE_URL (or `host`), `@current` as the team, `token` in the
/// query (with a GET's data), the personal key as a Bearer token, JSON bodies; the server's
/// own keys unless the plugin gives both of its own.
#[test]
fn posthog_api_sends_requests_as_posthogs_server_does() {
    let mut vm = load(
        r#"exports.processEvent = async (e) => {
            const sent = async (reply) => (await reply).json()
            const got = await sent(posthog.api.get('/api/projects/@current/feature_flags', { data: { limit: 5 } }))
            const posted = await sent(posthog.api.post('api/projects/@current/annotations/', { data: { content: 'x' } }))
            const own = await sent(posthog.api.delete('/api/x?y=1', {
                host: 'https://eu.posthog.example/', projectApiKey: 'phc_other', personalApiKey: 'phx_mine', data: { ignored: true },
            }))
            let refused
            try { await posthog.api.get('/x', { projectApiKey: 'phc_other' }) } catch (error) { refused = error.message }
            e.properties.api = [got, posted, own, refused]
            return e
        }"#,
    );
    let api = processed(&mut vm)["properties"]["api"].clone();
    assert_eq!(
        api,
        json!([
            {
                "echo": "https://posthog.example/api/projects/2/feature_flags?limit=5&token=phc_team",
                "method": "GET",
                "headers": {"Authorization": "Bearer phx_bot"},
                "body": null,
            },
            {
                "echo": "https://posthog.example/api/projects/2/annotations/?token=phc_team",
                "method": "POST",
                "headers": {"Authorization": "Bearer phx_bot", "Content-Type": "application/json"},
                "body": "{\"content\":\"x\"}",
            },
            {
                "echo": "https://eu.posthog.example/api/x?y=1&token=phc_other",
                "method": "DELETE",
                "headers": {"Authorization": "Bearer phx_mine"},
                "body": null,
            },
            "You must specify a personalApiKey if you specify a projectApiKey and vice-versa!",
        ])
    );
}

#[test]
fn meta_global_is_kept_across_calls_and_setup_sees_config() {
    let mut vm = load(
        r#"
        export_count = 0
        exports.setupPlugin = ({ global, config }) => { global.count = 0; global.suffix = config.suffix }
        exports.processEvent = (e, { global }) => { global.count += 1; e.properties.n = global.count + global.suffix; return e }
        "#,
    );
    let (setup, _) = vm.call(Method::SetupPlugin, &[]);
    assert_eq!(setup, Ok(None));
    for expected in ["1_x", "2_x"] {
        let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
        assert_eq!(
            result.expect("ok").expect("event")["properties"]["n"],
            expected
        );
    }
}

#[test]
fn property_key_order_survives_the_round_trip() {
    let mut vm = load(
        "exports.processEvent = (e) => { e.properties.hash = JSON.stringify(e.properties); return e }",
    );
    let input = json!({"event": "e", "properties": {"z": 1, "a": 2, "m": {"y": 1, "b": 2}}});
    let (result, _) = vm.call(Method::ProcessEvent, &[&input]);
    let out = result.expect("ok").expect("event");
    assert_eq!(
        out["properties"]["hash"],
        r#"{"z":1,"a":2,"m":{"y":1,"b":2}}"#
    );
    let keys: Vec<&String> = out["properties"]
        .as_object()
        .expect("object")
        .keys()
        .collect();
    assert_eq!(keys, ["z", "a", "m", "hash"]);
}

#[test]
fn jobs_are_found_and_called_with_their_payload() {
    let mut vm = load(
        "exports.jobs = { resend: async (payload, meta) => { console.log(`got ${payload.id}${meta.config.suffix}`); return () => 'not read' } }",
    );
    assert_eq!(vm.job_names().collect::<Vec<_>>(), ["resend"]);
    let (result, effects) = vm.call_job("resend", &json!({"id": 5}));
    // What a job returns is not read (PostHog drops it), so a function there is no failure.
    assert_eq!(result, Ok(()));
    assert_eq!(effects.logs[0].message, "got 5_x");
    let (result, _) = vm.call_job("missing", &json!({}));
    assert!(result.is_err());
}

#[test]
fn a_vm_stays_usable_after_a_thrown_error() {
    let mut vm = load(
        "exports.processEvent = (e) => { if (e.event === 'bad') throw new Error('x'); return e }",
    );
    let (bad, _) = vm.call(Method::ProcessEvent, &[&json!({"event": "bad"})]);
    assert!(bad.is_err());
    let (good, _) = vm.call(Method::ProcessEvent, &[&event()]);
    assert_eq!(good.expect("ok").expect("event")["event"], "page");
}

#[test]
fn time_is_utc_and_intl_formats_like_node() {
    let mut vm = load(
        r#"exports.processEvent = (e) => {
            const d = new Date(Date.UTC(2024, 0, 2, 3, 4, 5))
            e.properties.hours = d.getHours()
            e.properties.gb = d.toLocaleDateString('en-GB', { year: 'numeric', month: 'long', day: 'numeric' })
            return e
        }"#,
    );
    let props = processed(&mut vm)["properties"].clone();
    assert_eq!(props["hours"], 3);
    assert_eq!(props["gb"], "2 January 2024");
}

#[test]
fn meta_cache_and_storage_round_trip_json_and_raw_values() {
    let mut vm = load(
        r#"exports.processEvent = async (e, { cache, storage }) => {
            await cache.set('obj', { a: [1, 2] })
            await cache.set('raw', 'text', 60, { jsonSerialize: false })
            const n1 = await cache.incr('n')
            const n2 = await cache.incr('n')
            storage.set('seen', { at: 5 })
            const seen = await storage.get('seen')
            await storage.set('gone', 1)
            await storage.set('gone', undefined)
            e.properties.out = [
                await cache.get('obj'), await cache.get('raw', null, { jsonSerialize: false }),
                await cache.get('missing', 'fallback'), n1, n2, seen, await storage.get('gone', 'deleted'),
            ]
            return e
        }"#,
    );
    let out = processed(&mut vm)["properties"]["out"].clone();
    assert_eq!(
        out,
        json!([{"a": [1, 2]}, "text", "fallback", 1, 2, {"at": 5}, "deleted"])
    );
    let mut vm = load(
        "exports.processEvent = async (e, { cache }) => { await cache.lrange('k', 'a', 2); return e }",
    );
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    assert!(
        matches!(result, Err(CallError::Thrown { ref name, .. }) if name == "TypeError"),
        "{result:?}"
    );
}

/// `meta.geoip.locate` resolves to the host's answer (the GeoIP plugin's usage), null when
/// there is none.
#[test]
fn geoip_locate_answers_through_the_host() {
    let mut vm = load(
        r#"
        exports.processEvent = async (event, { geoip }) => {
            const known = await geoip.locate('81.2.69.142')
            event.properties.city = known.city.names.en
            event.properties.country = known.country.isoCode
            event.properties.unknown = await geoip.locate('10.0.0.1')
            return event
        }
        "#,
    );
    let out = processed(&mut vm);
    assert_eq!(out["properties"]["city"], "East Finchley");
    assert_eq!(out["properties"]["country"], "GB");
    assert_eq!(out["properties"]["unknown"], Value::Null);
}

#[test]
fn meta_jobs_queue_jobs_with_posthogs_api() {
    let host = Rc::new(MockHost::default());
    let source = VmSource {
        file_name: "index.js".into(),
        code: std::sync::Arc::from(
            r#"exports.processEvent = async (event, meta) => {
                await meta.jobs.resend({ id: 1 }).runNow()
                await meta.jobs.resend({ id: 2 }).runIn(2, 'seconds')
                await meta.jobs.later({ id: 3 }, { maxAttempts: 4, retryDelayMs: 250 })
                    .runAt(new Date('2030-01-01T00:00:00Z'))
                let unit = null
                try { await meta.jobs.resend({}).runIn(1, 'fortnights') } catch (e) { unit = e.message }
                let date = null
                try { await meta.jobs.resend({}).runAt('not a date') } catch (e) { date = e.message }
                return { ...event, properties: { unit, date } }
            }"#,
        ),
    };
    let (mut vm, _) = PluginVm::load(identity(), &source, &json!({}), &[], limits(), host.clone())
        .expect("the plugin loads");
    let before = chrono::Utc::now().timestamp_millis();
    let (result, _) = vm.call(Method::ProcessEvent, &[&event()]);
    let after = chrono::Utc::now().timestamp_millis();
    let out = result.expect("no error").expect("an event");
    assert!(
        out["properties"]["unit"]
            .as_str()
            .is_some_and(|m| m.contains("unknown unit")),
        "{out}"
    );
    assert!(
        out["properties"]["date"]
            .as_str()
            .is_some_and(|m| m.contains("runAt needs a date")),
        "{out}"
    );

    let jobs = host.jobs.borrow();
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    for (config_id, _) in jobs.iter() {
        assert_eq!(*config_id, identity().plugin_config_id);
    }
    let (_, now) = &jobs[0];
    assert_eq!(
        (now.name.as_str(), &now.payload),
        ("resend", &json!({"id": 1}))
    );
    assert!((before..=after).contains(&now.run_at_unix_ms));
    assert_eq!(
        (now.max_attempts, now.retry_delay_ms),
        (1, 1000),
        "PostHog: no retry"
    );
    let (_, later) = &jobs[1];
    assert!((before + 2000..=after + 2000).contains(&later.run_at_unix_ms));
    let (_, dated) = &jobs[2];
    assert_eq!(dated.name, "later");
    assert_eq!(dated.run_at_unix_ms, 1_893_456_000_000);
    assert_eq!((dated.max_attempts, dated.retry_delay_ms), (4, 250));
}

#[test]
fn lazy_globals_keep_working_after_their_first_use() {
    let mut vm = load(
        "exports.processEvent = (e) => { console.log('saw ' + e.event); e.properties.n = (e.properties.n || 0) + 1; return e }",
    );
    for round in 0..3 {
        let (result, effects) = vm.call(Method::ProcessEvent, &[&event()]);
        assert!(result.is_ok(), "round {round}: {result:?}");
        assert_eq!(effects.logs.len(), 1, "round {round}");
    }
}

/// Whether half the headroom in garbage (more than boa's own 1 MiB) made boa collect on a
/// fresh thread, after `headroom`.
fn collects_within_half_the_headroom(headroom: Option<usize>) -> bool {
    std::thread::spawn(move || {
        if let Some(bytes) = headroom {
            crate::plugins::runtime::natives::reserve_gc_headroom(bytes);
        }
        let garbage = boa_engine::gc::Gc::new([0u8; 64]);
        let watch = boa_engine::gc::WeakGc::new(&garbage);
        drop(garbage);
        for _ in 0..crate::plugins::runtime::natives::GC_HEADROOM_BYTES / 2 / 4096 {
            drop(boa_engine::gc::Gc::new([0u8; 4096]));
        }
        watch.upgrade().is_none()
    })
    .join()
    .expect("the thread ends")
}

#[test]
fn a_plugin_thread_gathers_its_headroom_of_garbage_before_collecting() {
    assert!(
        collects_within_half_the_headroom(None),
        "boa collects at 1 MiB by itself"
    );
    assert!(!collects_within_half_the_headroom(Some(
        crate::plugins::runtime::natives::GC_HEADROOM_BYTES
    )));
}

/// Runs `codes` as one chain (a VM each, loaded afresh) on the event `input`, answering with
/// changes or not.
fn chain_outcome(
    codes: &[&str],
    input: &str,
    answer_with_changes: bool,
) -> super::chain::ChainOutcome {
    use super::chain::{ChainEvent, ChainStep, run_chain};
    let mut vms: Vec<PluginVm> = codes.iter().map(|code| load(code)).collect();
    let labels: Vec<String> = (0..codes.len()).map(|n| format!("p ({n})")).collect();
    let mut steps: Vec<ChainStep<'_>> = vms
        .iter_mut()
        .zip(&labels)
        .enumerate()
        .map(|(n, (vm, label))| ChainStep {
            label,
            plugin_config_id: n as i64,
            vm,
        })
        .collect();
    let event = ChainEvent {
        json: input.to_owned(),
        distinct_id: "u1".into(),
        team_id: Some(json!(2)),
        ran: Vec::new(),
        answer_with_changes,
    };
    run_chain(&event, &mut steps, &[]).0
}

/// What the pipeline makes of the chain's answer with changes, and of its whole text: the same
/// event, with the same properties in the same order.
fn both_answers(codes: &[&str], input: &str) -> (PluginEvent, PluginEvent) {
    let mut applied: PluginEvent = serde_json::from_str(input).expect("an event");
    let changes = match chain_outcome(codes, input, true).event {
        Some(super::chain::ChainOutput::Changes(changes)) => changes,
        other => panic!("an answer with changes, not {other:?}"),
    };
    changes.apply(&mut applied).expect("applies");
    let text = chain_outcome(codes, input, false);
    let whole: PluginEvent = serde_json::from_str(text.text().expect("text")).expect("an event");
    assert_eq!(applied, whole, "{codes:?} on {input}");
    let keys = |event: &PluginEvent| {
        event
            .properties
            .keys()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&applied), keys(&whole), "{codes:?} on {input}");
    (applied, whole)
}

const EVENT_HEAD: &str = r#""event":"page","distinct_id":"u1","team_id":2,"now":"2024-01-01T00:00:00Z","uuid":"0190a1b2-0000-7000-8000-000000000001","ip":"10.1.2.3""#;

fn event_text(properties: &str) -> String {
    format!(r#"{{{EVENT_HEAD},"properties":{properties}}}"#)
}

#[test]
fn an_answer_with_changes_makes_the_same_event_as_the_whole_text() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[SMALL_PLUGIN],
            r#"{"i":1,"$current_url":"https://example.com/x?y=1","blob":"xxx"}"#,
        ),
        // Nested values changed in place, and replaced.
        (
            &[
                "exports.processEvent = (e) => { e.properties.obj.x = 2; e.properties.list.push(3); return e }",
            ],
            r#"{"obj":{"x":1},"list":[1,2],"s":"same"}"#,
        ),
        // A new object spread from the old one.
        (
            &["exports.processEvent = (e) => ({ ...e, properties: { ...e.properties, n: 1 } })"],
            r#"{"a":"x","b":2.5,"c":null,"d":true}"#,
        ),
        // The same value under a key moved to the end.
        (
            &[
                "exports.processEvent = (e) => { const v = e.properties.a; delete e.properties.a; e.properties.a = v; return e }",
            ],
            r#"{"a":1,"b":2}"#,
        ),
        // Every property rebuilt in reverse order, one of them changed: each is found by name.
        (
            &[
                "exports.processEvent = (e) => { const p = {}; for (const k of Object.keys(e.properties).reverse()) p[k] = e.properties[k]; p.c = 'new'; e.properties = p; return e }",
            ],
            r#"{"a":1,"b":"x","c":"y","d":[1],"e":null,"f":"\u00e9"}"#,
        ),
        // Integer-like keys come first in JavaScript, either way.
        (
            &["exports.processEvent = (e) => { e.properties.z = 0; return e }"],
            r#"{"b":1,"7":2,"a":3}"#,
        ),
        // Changed by one plugin, changed back by the next; a throw in between gets its label.
        (
            &[
                "exports.processEvent = (e) => { e.properties.x = 2; e.event = 'renamed'; return e }",
                "exports.processEvent = (e) => { throw new Error('no') }",
                "exports.processEvent = (e) => { e.properties.x = 1; return e }",
            ],
            r#"{"x":1,"y":"\u00e9"}"#,
        ),
        // Text beyond ASCII, kept and changed; a string turned number.
        (
            &[
                "exports.processEvent = (e) => { e.properties.t = 'ö'; e.properties.n = Number(e.properties.n); return e }",
            ],
            r#"{"s":"é😀","t":"ü","n":"5"}"#,
        ),
        // Properties that are no object any more, or gone: the labels make a new one.
        (
            &["exports.processEvent = (e) => { e.properties = 'gone'; return e }"],
            r#"{"a":1}"#,
        ),
        (
            &["exports.processEvent = (e) => { delete e.properties; return e }"],
            r#"{"a":1}"#,
        ),
        // Top-level fields changed, added and removed.
        (
            &[
                "exports.processEvent = (e) => { delete e.ip; e.$set = { a: 1 }; e.distinct_id = 'u2'; return e }",
            ],
            r#"{"k":1}"#,
        ),
    ];
    for (codes, properties) in cases {
        both_answers(codes, &event_text(properties));
    }
}

#[test]
fn properties_a_plugin_left_alone_keep_the_text_they_arrived_with() {
    let input = event_text(r#"{"f":1.0,"big":12345678901234567890,"u":"\u00e9","n":{"a":1}}"#);
    let mut event: PluginEvent = serde_json::from_str(&input).expect("an event");
    let outcome = chain_outcome(
        &["exports.processEvent = (e) => { e.properties.y = 1; return e }"],
        &input,
        true,
    );
    let Some(super::chain::ChainOutput::Changes(changes)) = outcome.event else {
        panic!("an answer with changes");
    };
    // The primitives are kept by position; the object and the new key are sent as text.
    assert_eq!(
        changes.order,
        [Some(0), Some(1), Some(2), None, None, None, None]
    );
    assert_eq!(
        changes.set,
        r#"{"n":{"a":1},"y":1,"$plugins_succeeded":["p (0)"],"$plugins_failed":[]}"#
    );
    changes.apply(&mut event).expect("applies");
    assert_eq!(
        event.properties.to_json(),
        r#"{"f":1.0,"big":12345678901234567890,"u":"\u00e9","n":{"a":1},"y":1,"$plugins_succeeded":["p (0)"],"$plugins_failed":[]}"#
    );
}

#[test]
fn text_that_needed_repairing_is_answered_whole() {
    let outcome = chain_outcome(
        &["exports.processEvent = (e) => e"],
        &event_text(r#"{"s":"a\ud800b","n":1e400}"#),
        true,
    );
    assert!(outcome.text().is_some(), "{:?}", outcome.event);
}
