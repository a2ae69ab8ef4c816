//! The native functions behind the prelude's `host` object, and the services they reach.
//!
//! Natives are plain `fn`s (boa's closures would need GC tracing for captured state). What a
//! call needs lives in the thread-local `ACTIVE` slot, set by `begin_call` for exactly the
//! duration of one VM call on this worker thread.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use boa_engine::gc::Gc;
use boa_engine::object::ObjectInitializer;
use boa_engine::object::builtins::JsUint8Array;
use boa_engine::property::{Attribute, PropertyKey};
use boa_engine::{
    Context, JsError, JsNativeError, JsObject, JsResult, JsString, JsValue, NativeFunction,
    js_string,
};
use chrono::Utc;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use md5::Md5;
use prometheus::local::LocalHistogram;
use prometheus::{HistogramVec, IntCounterVec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

use super::{CallEffects, CapturedByPlugin, LogSource, PluginLogEntry, VmIdentity, parse_level};
use crate::plugins::host_services::HostServiceError;

/// An HTTP request made with `fetch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub url: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    /// The plugin's own `timeout` option; the host caps it at EXTERNAL_REQUEST_TIMEOUT_MS.
    pub timeout: Option<Duration>,
}

/// The answer to a `fetch`, read fully: plugins call `.json()`/`.text()` on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchReply {
    pub status: u16,
    pub status_text: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// A `meta.cache` operation (spec 2.3), on the config's own key space
/// (`@plugin/<pluginId>/<teamId>/`). Values are strings: the prelude does the JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CacheOp {
    Set {
        key: String,
        value: String,
        ttl_seconds: Option<u64>,
    },
    Get {
        key: String,
    },
    Incr {
        key: String,
    },
    Expire {
        key: String,
        ttl_seconds: u64,
    },
    Lpush {
        key: String,
        values: Vec<String>,
    },
    Lrange {
        key: String,
        start: i64,
        stop: i64,
    },
    Llen {
        key: String,
    },
    Lrem {
        key: String,
        count: i64,
        value: String,
    },
    Lpop {
        key: String,
        count: u64,
    },
}

/// A `meta.storage` or `meta.utils.cursor` operation on `posthog_pluginstorage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StorageOp {
    Get {
        key: String,
    },
    /// Upsert; the value is JSON text.
    Set {
        key: String,
        value: String,
    },
    Del {
        key: String,
    },
    /// Creates the cursor at `initial` unless it exists.
    CursorInit {
        key: String,
        initial: i64,
    },
    /// Atomically adds `by` and returns the new value.
    CursorIncrement {
        key: String,
        by: i64,
    },
}

/// What the VMs of one worker thread reach outside themselves. Calls block the worker thread:
/// a plugin's writes are then visible to its next event even when it does not await them,
/// which plugins rely on (plugin-compat point 11).
pub trait PluginHost {
    fn fetch(&self, request: FetchRequest) -> Result<FetchReply, HostServiceError>;
    /// The reply is JSON: null, a string, a number or an array of strings.
    fn cache(&self, identity: &VmIdentity, op: CacheOp) -> Result<Value, HostServiceError>;
    /// The reply is the stored JSON text (Get), the cursor value, or null.
    fn storage(&self, identity: &VmIdentity, op: StorageOp) -> Result<Value, HostServiceError>;
    /// `meta.geoip.locate(ip)`: geoip2-node's City, or null without a database or a match.
    fn geoip(&self, ip: &str) -> Value;
    /// `meta.jobs.<name>(payload).runNow()|runIn()|runAt()`: queues the job for this config.
    fn enqueue_job(
        &self,
        identity: &VmIdentity,
        job: JobRequest,
    ) -> Result<Value, HostServiceError>;
    /// `posthog.api`: `{siteUrl, teamId}`, and with `with_keys` the team's
    /// `projectApiKey` and its organization's plugin `personalApiKey`.
    fn api(&self, _identity: &VmIdentity, _with_keys: bool) -> Result<Value, HostServiceError> {
        Err(HostServiceError::NotAvailable("posthog.api"))
    }
}

/// A job a plugin queued through `meta.jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub name: String,
    pub payload: Value,
    pub run_at_unix_ms: i64,
    /// 1 = no retry (PostHog's behaviour).
    pub max_attempts: u32,
    pub retry_delay_ms: u64,
}

struct Timer {
    id: u32,
    due: Instant,
    callback: JsObject,
}

/// Unix milliseconds at which the VM call in progress on a worker thread started, 0 when idle.
/// The pool's watchdog reads it to find a thread stuck in code the deadline could not
/// interrupt (a loop inside a native callback such as `Array.prototype.map`).
#[derive(Debug, Default)]
pub struct Heartbeat {
    started_unix_ms: AtomicU64,
    plugin_config_id: AtomicI64,
    /// The pool's id of the request the worker is handling.
    request_id: AtomicU64,
}

impl Heartbeat {
    pub fn set_request(&self, request_id: u64) {
        self.request_id.store(request_id, Ordering::Relaxed);
    }

    pub fn request(&self) -> u64 {
        self.request_id.load(Ordering::Relaxed)
    }

    /// How long the call in progress has run, and whose config it is.
    pub fn busy(&self) -> Option<(Duration, i64)> {
        let started = self.started_unix_ms.load(Ordering::Relaxed);
        (started != 0).then(|| {
            (
                Duration::from_millis(unix_ms().saturating_sub(started)),
                self.plugin_config_id.load(Ordering::Relaxed),
            )
        })
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a worker thread holds, for `/_actors`: its live VMs and the heap they took while
/// loading (the net bytes allocated on the thread during `PluginVm::load`: boa's realm, the
/// prelude and the plugin's top level).
#[derive(Debug, Default)]
pub struct WorkerLoad {
    pub vms: AtomicI64,
    pub vm_heap_bytes_at_load: AtomicI64,
    /// VMs torn down to stay within the budget or because they sat idle.
    pub evicted: AtomicU64,
}

/// What a worker thread reports about its calls.
pub struct WorkerInstruments {
    pub heartbeat: Arc<Heartbeat>,
    pub load: Arc<WorkerLoad>,
    /// `plugin_method_duration_seconds{method}`.
    pub durations: HistogramVec,
    /// `plugin_vms_torn_down_total{reason}`.
    pub evictions: IntCounterVec,
}

struct ActiveCall {
    /// Caps the memory this call may take; closed when the call ends.
    _budget: plugin_server_alloc::BudgetGuard,
    started: Instant,
    method: &'static str,
    host: Rc<dyn PluginHost>,
    identity: VmIdentity,
    effects: CallEffects,
    timers: Vec<Timer>,
    next_timer_id: u32,
    deadline: Instant,
}

thread_local! {
    static ACTIVE: RefCell<Option<ActiveCall>> = const { RefCell::new(None) };
    static INSTRUMENTS: RefCell<Option<WorkerInstruments>> = const { RefCell::new(None) };
    /// `plugin_method_duration_seconds` per method, recorded on this thread and added to the
    /// shared histograms once per request ([`flush_call_metrics`]): looking the method's
    /// histogram up and observing it atomically on every call was about 2 % of the server's
    /// CPU with ten plugins in a chain.
    static DURATIONS: RefCell<Vec<(&'static str, LocalHistogram)>> = const { RefCell::new(Vec::new()) };
    /// In a plugin worker process: the durations themselves, per method, until the reply
    /// takes them to the server, whose histograms they go to (see [`keep_call_durations`]).
    static KEPT_DURATIONS: RefCell<Option<Vec<MethodDurations>>> = const { RefCell::new(None) };
}

/// A method's call durations, in seconds.
pub type MethodDurations = (&'static str, Vec<f64>);

/// Keeps this thread's call durations for [`take_call_durations`] instead of recording them
/// in the worker's histograms: a worker process's histograms are not the server's.
pub fn keep_call_durations() {
    KEPT_DURATIONS.with(|kept| *kept.borrow_mut() = Some(Vec::new()));
}

/// The durations kept since the last take, per method.
pub fn take_call_durations() -> Vec<MethodDurations> {
    KEPT_DURATIONS.with(|kept| {
        kept.borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    })
}

/// Adds the durations this thread recorded since the last flush to the shared histograms.
pub fn flush_call_metrics() {
    DURATIONS.with(|durations| {
        for (_, histogram) in durations.borrow().iter() {
            histogram.flush();
        }
    });
}

fn record_duration(instruments: &WorkerInstruments, method: &'static str, seconds: f64) {
    let kept = KEPT_DURATIONS.with(|kept| {
        let mut kept = kept.borrow_mut();
        let Some(kept) = kept.as_mut() else {
            return false;
        };
        match kept.iter_mut().find(|(name, _)| *name == method) {
            Some((_, samples)) => samples.push(seconds),
            None => kept.push((method, vec![seconds])),
        }
        true
    });
    if kept {
        return;
    }
    DURATIONS.with(|durations| {
        let mut durations = durations.borrow_mut();
        if let Some((_, histogram)) = durations.iter().find(|(name, _)| *name == method) {
            histogram.observe(seconds);
            return;
        }
        let histogram = instruments.durations.with_label_values(&[method]).local();
        histogram.observe(seconds);
        durations.push((method, histogram));
    });
}

/// Installs this thread's instruments; a worker does it once when its thread starts.
pub fn install_instruments(instruments: WorkerInstruments) {
    // Durations recorded for earlier instruments go to those, not to the new ones.
    DURATIONS.with(|durations| durations.borrow_mut().clear());
    INSTRUMENTS.with(|slot| *slot.borrow_mut() = Some(instruments));
}

/// How much a plugin thread's boa heap may grow before a collection (see
/// [`reserve_gc_headroom`]).
pub const GC_HEADROOM_BYTES: usize = 4 << 20;

/// Raises this thread's boa collection threshold to between 70 % and all of `bytes`, once,
/// when a plugin worker thread starts.
///
/// boa_gc 0.22 collects when its heap passes a threshold that starts at 1 MiB; after a
/// collection that leaves more than 70 % of it live, the threshold becomes what is live over
/// 0.7, and it never shrinks (boa has no setting for it yet). Every collection traces every
/// object of every VM on the thread. With a few VMs, such as one team's chain of plugins, the
/// heap stays near 1 MiB, so a collection ran every few hundred calls and took 13 % of the
/// server's CPU with ten plugins (`bench/results/plugins.md`). Keeping 70 % of `bytes` of
/// placeholders alive while their own allocation triggers collections raises the threshold;
/// they are then dropped and collected at once, so the memory goes back now, and what the
/// thread keeps is the right to gather up to `bytes` of garbage between collections.
pub fn reserve_gc_headroom(bytes: usize) {
    // Large elements, so that tracing a placeholder (an element at a time) stays cheap.
    type Block = [u128; 4096];
    let placeholders: Vec<Gc<Block>> = (0..bytes / 10 * 7 / size_of::<Block>())
        .map(|_| Gc::new([0; 4096]))
        .collect();
    drop(placeholders);
    boa_engine::gc::force_collect();
}

pub(super) fn begin_call(
    host: Rc<dyn PluginHost>,
    identity: VmIdentity,
    deadline: Instant,
    method: &'static str,
    memory_limit_bytes: u64,
) {
    INSTRUMENTS.with(|slot| {
        if let Some(instruments) = slot.borrow().as_ref() {
            let heartbeat = &instruments.heartbeat;
            heartbeat
                .plugin_config_id
                .store(identity.plugin_config_id, Ordering::Relaxed);
            heartbeat
                .started_unix_ms
                .store(unix_ms().max(1), Ordering::Relaxed);
        }
    });
    ACTIVE.with(|slot| {
        *slot.borrow_mut() = Some(ActiveCall {
            _budget: plugin_server_alloc::open_budget(memory_limit_bytes),
            started: Instant::now(),
            method,
            host,
            identity,
            effects: CallEffects::default(),
            timers: Vec::new(),
            next_timer_id: 1,
            deadline,
        });
    });
}

/// Ends the call: its effects go to the caller and its pending timers are dropped (a timer
/// that outlives its call would run in some later, unrelated call).
pub(super) fn end_call() -> CallEffects {
    let call = ACTIVE.with(|slot| slot.borrow_mut().take());
    INSTRUMENTS.with(|slot| {
        if let Some(instruments) = slot.borrow().as_ref() {
            instruments
                .heartbeat
                .started_unix_ms
                .store(0, Ordering::Relaxed);
            if let Some(call) = &call {
                record_duration(
                    instruments,
                    call.method,
                    call.started.elapsed().as_secs_f64(),
                );
            }
        }
    });
    call.map(|call| call.effects).unwrap_or_default()
}

/// Removes and returns the earliest timer of the call in progress.
pub(super) fn next_timer() -> Option<(Instant, JsObject)> {
    ACTIVE.with(|slot| {
        let mut slot = slot.borrow_mut();
        let call = slot.as_mut()?;
        let index = call
            .timers
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| (t.due, t.id))
            .map(|(i, _)| i)?;
        let timer = call.timers.swap_remove(index);
        Some((timer.due, timer.callback))
    })
}

fn with_call<T>(f: impl FnOnce(&mut ActiveCall) -> JsResult<T>) -> JsResult<T> {
    ACTIVE.with(|slot| match slot.borrow_mut().as_mut() {
        Some(call) => f(call),
        None => Err(JsNativeError::error()
            .with_message("host functions are only available while the plugin is being called")
            .into()),
    })
}

type NativeFn = fn(&JsValue, &[JsValue], &mut Context) -> JsResult<JsValue>;

/// Builds the `host` object the prelude closes over.
pub(super) fn natives(context: &mut Context) -> JsResult<JsObject> {
    let functions: [(&str, usize, NativeFn); 12] = [
        ("cache", 4, cache),
        ("geoip", 1, geoip),
        ("jobs", 5, jobs),
        ("jobDelay", 2, job_delay),
        ("storage", 3, storage),
        ("log", 2, log),
        ("hash", 3, hash),
        ("decode", 2, decode),
        ("encode", 2, encode),
        ("randomUUID", 0, random_uuid),
        ("fetch", 5, fetch),
        ("api", 1, api),
    ];
    let mut object = ObjectInitializer::new(context);
    for (name, length, function) in functions {
        object.function(
            NativeFunction::from_fn_ptr(function),
            js_string!(name),
            length,
        );
    }
    Ok(object.build())
}

fn string_arg(args: &[JsValue], index: usize, context: &mut Context) -> JsResult<String> {
    Ok(args
        .get(index)
        .cloned()
        .unwrap_or_default()
        .to_string(context)?
        .to_std_string_escaped())
}

/// The elements of an array-like argument, refused before anything is read when it claims
/// more than `max_len` of them. `operation` names the caller in errors.
fn list_arg(
    args: &[JsValue],
    index: usize,
    operation: &str,
    max_len: u64,
    context: &mut Context,
) -> JsResult<Vec<JsValue>> {
    let list = args
        .get(index)
        .and_then(JsValue::as_object)
        .ok_or_else(|| {
            JsNativeError::typ().with_message(format!("{operation}: expected a list"))
        })?;
    let length = list
        .get(js_string!("length"), context)?
        .to_length(context)?;
    if length > max_len {
        return Err(JsNativeError::range()
            .with_message(format!("{operation}: at most {max_len} elements at once"))
            .into());
    }
    (0..length).map(|i| list.get(i, context)).collect()
}

fn log(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let level = string_arg(args, 0, context)?;
    let message = string_arg(args, 1, context)?;
    with_call(|call| {
        call.effects.logs.push(PluginLogEntry {
            plugin_config_id: call.identity.plugin_config_id,
            plugin_id: call.identity.plugin_id,
            team_id: call.identity.team_id,
            timestamp: Utc::now(),
            source: LogSource::Console,
            level: parse_level(&level),
            message,
        });
        Ok(JsValue::undefined())
    })
}

/// Bytes of a string (UTF-8) or of a typed array.
fn bytes_of(value: &JsValue, context: &mut Context) -> JsResult<Vec<u8>> {
    if let Some(object) = value.as_object()
        && let Ok(array) = JsUint8Array::from_object(object.clone())
    {
        return array.to_vec(context);
    }
    Ok(value
        .to_string(context)?
        .to_std_string_escaped()
        .into_bytes())
}

fn hash(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let algorithm = string_arg(args, 0, context)?.to_ascii_lowercase();
    let mut data = Vec::new();
    for part in list_arg(args, 1, "hash", u64::from(u32::MAX), context)? {
        data.extend(bytes_of(&part, context)?);
    }
    let key = match args.get(2) {
        Some(key) if !key.is_null_or_undefined() => Some(bytes_of(key, context)?),
        _ => None,
    };
    let digest = match (algorithm.as_str(), key) {
        ("md5", None) => Md5::digest(&data).to_vec(),
        ("sha1", None) => Sha1::digest(&data).to_vec(),
        ("sha256", None) => Sha256::digest(&data).to_vec(),
        ("sha512", None) => Sha512::digest(&data).to_vec(),
        ("md5", Some(key)) => hmac::<Hmac<Md5>>(&key, &data)?,
        ("sha1", Some(key)) => hmac::<Hmac<Sha1>>(&key, &data)?,
        ("sha256", Some(key)) => hmac::<Hmac<Sha256>>(&key, &data)?,
        ("sha512", Some(key)) => hmac::<Hmac<Sha512>>(&key, &data)?,
        (other, _) => {
            return Err(JsNativeError::error()
                .with_message(format!("Digest method not supported: {other}"))
                .into());
        }
    };
    Ok(JsUint8Array::from_iter(digest, context)?.into())
}

fn hmac<M: Mac + KeyInit>(key: &[u8], data: &[u8]) -> JsResult<Vec<u8>> {
    let mut mac = <M as KeyInit>::new_from_slice(key)
        .map_err(|e| JsNativeError::typ().with_message(format!("createHmac: {e}")))?;
    mac.update(data);
    Ok(mac.finalize().into_bytes().to_vec())
}

fn decode(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let bytes = bytes_of(&args.first().cloned().unwrap_or_default(), context)?;
    let encoding = string_arg(args, 1, context)?.to_ascii_lowercase();
    let text = match encoding.as_str() {
        "hex" => hex::encode(&bytes),
        "base64" => base64::engine::general_purpose::STANDARD.encode(&bytes),
        "latin1" | "binary" | "ascii" => bytes.iter().map(|&b| char::from(b)).collect(),
        _ => String::from_utf8_lossy(&bytes).into_owned(),
    };
    Ok(JsString::from(text.as_str()).into())
}

fn encode(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let text = string_arg(args, 0, context)?;
    let encoding = string_arg(args, 1, context)?.to_ascii_lowercase();
    let bytes = match encoding.as_str() {
        "hex" => {
            hex::decode(&text).map_err(|e| JsNativeError::typ().with_message(e.to_string()))?
        }
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(text.trim_end_matches('\n'))
            .map_err(|e| JsNativeError::typ().with_message(e.to_string()))?,
        "latin1" | "binary" | "ascii" => text.chars().map(|c| c as u32 as u8).collect(),
        _ => text.into_bytes(),
    };
    Ok(JsUint8Array::from_iter(bytes, context)?.into())
}

fn random_uuid(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Ok(JsString::from(uuid::Uuid::new_v4().to_string().as_str()).into())
}

fn fetch(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let url = string_arg(args, 0, context)?;
    let method = string_arg(args, 1, context)?.to_ascii_uppercase();
    let mut headers = BTreeMap::new();
    if let Some(object) = args.get(2).and_then(JsValue::as_object) {
        for key in object.own_property_keys(context)? {
            if let PropertyKey::String(name) = &key {
                let value = object.get(key.clone(), context)?.to_string(context)?;
                headers.insert(name.to_std_string_escaped(), value.to_std_string_escaped());
            }
        }
    }
    let body = match args.get(3) {
        Some(body) if !body.is_null_or_undefined() => {
            Some(body.to_string(context)?.to_std_string_escaped())
        }
        _ => None,
    };
    let timeout = match args.get(4) {
        Some(ms) if ms.is_number() => {
            let ms = ms.to_number(context)?;
            (ms.is_finite() && ms > 0.0).then(|| Duration::from_millis(ms as u64))
        }
        _ => None,
    };
    let host = with_call(|call| Ok(call.host.clone()))?;
    let reply = host
        .fetch(FetchRequest {
            url,
            method,
            headers,
            body,
            timeout,
        })
        .map_err(|error| JsNativeError::error().with_message(format!("fetch failed: {error}")))?;
    let mut header_object = ObjectInitializer::new(context);
    for (name, value) in &reply.headers {
        header_object.property(
            JsString::from(name.as_str()),
            JsString::from(value.as_str()),
            Attribute::all(),
        );
    }
    let header_object = header_object.build();
    let reply_object = ObjectInitializer::new(context)
        .property(
            js_string!("status"),
            i32::from(reply.status),
            Attribute::all(),
        )
        .property(
            js_string!("statusText"),
            JsString::from(reply.status_text.as_str()),
            Attribute::all(),
        )
        .property(js_string!("headers"), header_object, Attribute::all())
        .property(
            js_string!("body"),
            JsString::from(reply.body.as_str()),
            Attribute::all(),
        )
        .build();
    Ok(reply_object.into())
}

pub(super) fn capture(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let event = string_arg(args, 0, context)?;
    let properties = match args.get(1) {
        Some(value) if !value.is_null_or_undefined() => {
            super::plain::Plain::export(value, context)?.map_or(Value::Null, |p| p.to_json())
        }
        _ => Value::Object(serde_json::Map::new()),
    };
    with_call(|call| {
        call.effects
            .captures
            .push(CapturedByPlugin { event, properties });
        Ok(JsValue::undefined())
    })
}

/// `posthog.api`'s host side (see `PluginHost::api`); the request itself is the prelude's
/// `fetch`.
fn api(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let with_keys = args.first().is_some_and(JsValue::to_boolean);
    let (host, identity) = with_call(|call| Ok((call.host.clone(), call.identity.clone())))?;
    let reply = host
        .api(&identity, with_keys)
        .map_err(|error| JsNativeError::error().with_message(format!("posthog.api: {error}")))?;
    JsValue::from_json(&reply, context)
}

pub(super) fn set_timeout(
    _: &JsValue,
    args: &[JsValue],
    context: &mut Context,
) -> JsResult<JsValue> {
    let callback = args.first().and_then(JsValue::as_callable).ok_or_else(|| {
        JsNativeError::typ().with_message("setTimeout: the callback is not a function")
    })?;
    let ms = args
        .get(1)
        .cloned()
        .unwrap_or_default()
        .to_number(context)?;
    let delay = if ms.is_finite() && ms > 0.0 {
        Duration::from_millis(ms as u64)
    } else {
        Duration::ZERO
    };
    with_call(|call| {
        let id = call.next_timer_id;
        call.next_timer_id += 1;
        // A timer past the deadline can never run; keeping it lets `settle` report the timeout.
        let due = Instant::now()
            .checked_add(delay)
            .unwrap_or(call.deadline + Duration::from_secs(1));
        call.timers.push(Timer { id, due, callback });
        Ok(JsValue::from(id))
    })
}

pub(super) fn clear_timeout(
    _: &JsValue,
    args: &[JsValue],
    context: &mut Context,
) -> JsResult<JsValue> {
    let id = args.first().cloned().unwrap_or_default().to_u32(context)?;
    with_call(|call| {
        call.timers.retain(|t| t.id != id);
        Ok(JsValue::undefined())
    })
}

fn integer_arg(args: &[JsValue], index: usize, what: &str, context: &mut Context) -> JsResult<i64> {
    let value = args.get(index).cloned().unwrap_or_default();
    // PostHog throws on non-number indexes and counts rather than coercing them.
    if !value.is_number() {
        return Err(JsNativeError::typ()
            .with_message(format!("{what} must be a number"))
            .into());
    }
    Ok(value.to_number(context)? as i64)
}

fn geoip(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let ip = string_arg(args, 0, context)?;
    ask_host("geoip", context, |host, _| Ok(host.geoip(&ip)))
}

/// `host.jobs(name, payloadJson, runAtMs, maxAttempts, retryDelayMs)`.
fn jobs(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let name = string_arg(args, 0, context)?;
    let payload_json = string_arg(args, 1, context)?;
    let payload: Value = serde_json::from_str(&payload_json).map_err(|error| {
        JsNativeError::typ().with_message(format!("the job payload is not JSON: {error}"))
    })?;
    let run_at_unix_ms = integer_arg(args, 2, "runAt", context)?;
    let max_attempts = integer_arg(args, 3, "maxAttempts", context)?;
    let retry_delay_ms = integer_arg(args, 4, "retryDelayMs", context)?;
    let job = JobRequest {
        name,
        payload,
        run_at_unix_ms,
        max_attempts: u32::try_from(max_attempts.max(1)).unwrap_or(u32::MAX),
        retry_delay_ms: u64::try_from(retry_delay_ms.max(0)).unwrap_or(0),
    };
    ask_host("jobs", context, |host, identity| {
        host.enqueue_job(identity, job)
    })
}

/// `host.jobDelay(amount, unit)`: `runIn`'s duration in milliseconds.
fn job_delay(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let amount = args
        .first()
        .map_or(Ok(f64::NAN), |value| value.to_number(context))?;
    let unit = string_arg(args, 1, context)?;
    let duration = crate::plugins::jobs::duration_of(amount, &unit)
        .map_err(|error| JsNativeError::range().with_message(error.to_string()))?;
    Ok(JsValue::from(duration.as_millis() as f64))
}

fn unknown_operation(kind: &str, operation: &str) -> JsError {
    JsNativeError::typ()
        .with_message(format!("unknown {kind} operation {operation}"))
        .into()
}

/// Hands an operation to the call's host, outside the call's borrow (the host may block), and
/// turns its JSON reply into a JS value or its error into an Error naming `kind`.
fn ask_host(
    kind: &str,
    context: &mut Context,
    operation: impl FnOnce(&dyn PluginHost, &VmIdentity) -> Result<Value, HostServiceError>,
) -> JsResult<JsValue> {
    let (host, identity) = with_call(|call| Ok((call.host.clone(), call.identity.clone())))?;
    let reply = operation(host.as_ref(), &identity)
        .map_err(|error| JsNativeError::error().with_message(format!("{kind}: {error}")))?;
    JsValue::from_json(&reply, context)
}

fn cache(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let op = string_arg(args, 0, context)?;
    let key = string_arg(args, 1, context)?;
    let op = match op.as_str() {
        "set" => {
            let value = string_arg(args, 2, context)?;
            let ttl = match args.get(3) {
                Some(ttl) if !ttl.is_null_or_undefined() => {
                    Some(integer_arg(args, 3, "ttlSeconds", context)?.max(1) as u64)
                }
                _ => None,
            };
            CacheOp::Set {
                key,
                value,
                ttl_seconds: ttl,
            }
        }
        "get" => CacheOp::Get { key },
        "incr" => CacheOp::Incr { key },
        "expire" => CacheOp::Expire {
            key,
            ttl_seconds: integer_arg(args, 2, "ttlSeconds", context)?.max(1) as u64,
        },
        "lpush" => {
            let list = list_arg(args, 2, "lpush", 1000, context)?;
            let mut values = Vec::with_capacity(list.len());
            for value in list {
                values.push(value.to_string(context)?.to_std_string_escaped());
            }
            CacheOp::Lpush { key, values }
        }
        "lrange" => CacheOp::Lrange {
            key,
            start: integer_arg(args, 2, "startIndex", context)?,
            stop: integer_arg(args, 3, "endIndex", context)?,
        },
        "llen" => CacheOp::Llen { key },
        "lrem" => CacheOp::Lrem {
            key,
            count: integer_arg(args, 2, "count", context)?,
            value: string_arg(args, 3, context)?,
        },
        "lpop" => CacheOp::Lpop {
            key,
            count: integer_arg(args, 2, "count", context)?.max(0) as u64,
        },
        other => return Err(unknown_operation("cache", other)),
    };
    ask_host("cache", context, |host, identity| host.cache(identity, op))
}

fn storage(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let op = string_arg(args, 0, context)?;
    let key = string_arg(args, 1, context)?;
    let op = match op.as_str() {
        "get" => StorageOp::Get { key },
        "set" => StorageOp::Set {
            key,
            value: string_arg(args, 2, context)?,
        },
        "del" => StorageOp::Del { key },
        "cursorInit" => StorageOp::CursorInit {
            key,
            initial: integer_arg(args, 2, "initialValue", context)?,
        },
        "cursorIncrement" => StorageOp::CursorIncrement {
            key,
            by: integer_arg(args, 2, "incrementBy", context)?,
        },
        other => return Err(unknown_operation("storage", other)),
    };
    ask_host("storage", context, |host, identity| {
        host.storage(identity, op)
    })
}
