//! `VmWorker`: one thread of the plugin VM pool (a one-thread actix `SyncArbiter`). It owns the
//! VMs of the teams routed to it, builds each lazily on first use, runs `setupPlugin` before
//! the first call, and rebuilds a VM when its config changes or a call left it poisoned.
//!
//! Receives: `ProcessEvents` and `TeardownAll` from the `PluginVmPool`.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::Utc;
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chain::{ChainEvent, ChainOutcome, ChainStep, EventFailure, config_label, run_chain};
use super::filters::FilterSubject;
use super::pool::JobRunError;
use super::post_ingestion_messages::{
    AsyncMethod, AsyncRetry, AsyncTarget, EXPORT_RETRIES, EXPORT_RETRY_BASE, ExportBuffer,
    ExportSettings, ON_EVENT_ATTEMPTS, ON_EVENT_RETRY_BASE, StoredEvents, webhook_request,
};
use super::runtime::natives::{
    self, FetchRequest, Heartbeat, PluginHost, WorkerInstruments, WorkerLoad, install_instruments,
};
use super::runtime::vm::{CallError, Method, PluginVm, VmError, VmLimits};
use super::runtime::{CallEffects, CapturedByPlugin, VmIdentity};
use super::telemetry::MethodOutcome;
use super::{LoadedConfig, LogLevel, LogSource, PluginLogEntry};

/// PostHog retries a setupPlugin that throws RetryError this many times in all.
const SETUP_ATTEMPTS: u32 = 5;

/// When a worker tears down VMs it holds. A built VM costs about half a megabyte however
/// little its plugin does, so with thousands of configs only the recently used ones can stay
/// built; a torn-down config is built and set up again on its next use, as after a reload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRetention {
    /// Heap the pool's VMs may hold in all, counted as each took it to load; above it a
    /// worker tears down its least recently used ones. `None`: no limit.
    pub budget_bytes: Option<i64>,
    /// A VM unused this long is torn down. `None`: never.
    pub idle: Option<Duration>,
}

/// Once over the budget, VMs are torn down until their heap is this share of it, so that a
/// worker at its budget does not tear one down on every call. Each round of teardowns ends
/// with a collection, which traces every VM the thread still holds: with 31,000 configs
/// cycling through a 1 GiB budget, 90 % made that 110 s and 75 % 85 s, at the same peak RSS
/// (`bench/results/plugins.md`).
const BUDGET_LOW_WATER_PERCENT: i64 = 75;

/// A worker tears down none of its VMs while it holds no more than this share of an equal
/// split of the budget: otherwise it would tear down the VM it just used, on every request,
/// while another worker sits on the budget (the pool's sweep makes that one give back).
const BUDGET_SHARE_FLOOR_PERCENT: i64 = 90;

/// What each worker of a pool holds, so that one budget covers them all: a worker that finds
/// the total over it tears down its own least recently used VMs, but not below an equal share
/// of the budget. A busy worker thus gets the share that idle ones leave, and a worker holding
/// more than its share gives it back when it runs or is swept (every second).
#[derive(Clone)]
pub struct BudgetShare {
    /// This worker's entry in `held`; a replacement worker takes over its predecessor's.
    pub index: usize,
    /// Per worker: the heap its live VMs took to load, as of its last request.
    pub held: Arc<[AtomicI64]>,
}

/// Why a config's VM cannot be called now. The text is each event's failure for the config in
/// a processEvent chain and, once the config is disabled, its recorded error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum NotReady {
    /// The VM could not be built; the config stays disabled until its next version.
    #[error(transparent)]
    LoadFailed(VmError),
    /// setupPlugin threw; the config stays disabled until its next version.
    #[error("setupPlugin failed: {0}")]
    SetupFailed(#[source] CallError),
    /// setupPlugin threw RetryError; it runs again after a backoff.
    #[error("setupPlugin failed: {0}")]
    SetupWillRetry(#[source] CallError),
    #[error("setupPlugin is being retried (attempt {attempts} of {SETUP_ATTEMPTS} failed)")]
    SetupBackingOff { attempts: u32 },
    /// Guards a slot emptied under our feet; `load` fills it just before.
    #[error("the VM is missing")]
    VmMissing,
}

// ---------------------------------------------------------------------------------------------
// Messages

/// Run these events of one team through its processEvent chain (configs in `order`).
#[derive(Message)]
#[rtype(result = "WorkerReply<Vec<ChainOutcome>>")]
pub struct ProcessEvents {
    /// The pool's id for this request; the watchdog uses it to tell the request that stopped a
    /// worker from those merely queued behind it.
    pub request_id: u64,
    pub chain: Arc<[Arc<LoadedConfig>]>,
    /// Shared with the pool, which keeps them to re-send if this worker is replaced.
    pub events: Arc<Vec<ChainEvent>>,
}

/// Run the post-ingestion methods over stored events of one team (spec 1.11): `onEvent` and
/// `composeWebhook` per event, `exportEvents` through each config's buffer. With a `target`,
/// only that config's method, at once: a retry.
#[derive(Message)]
#[rtype(result = "WorkerReply<()>")]
pub struct RunAsync {
    pub request_id: u64,
    pub chain: Arc<[Arc<LoadedConfig>]>,
    pub events: Arc<StoredEvents>,
    pub target: Option<AsyncTarget>,
}

/// Run a scheduled method (`runEveryMinute`, `runEveryHour` or `runEveryDay`) of every config
/// in `chain` that has it.
#[derive(Message)]
#[rtype(result = "WorkerReply<()>")]
pub struct RunScheduled {
    pub request_id: u64,
    pub chain: Arc<[Arc<LoadedConfig>]>,
    pub method: Method,
}

/// Run `jobs[name](payload, meta)` of one config. The reply is the job's error, if it failed.
#[derive(Message)]
#[rtype(result = "WorkerReply<Result<(), JobRunError>>")]
pub struct RunJob {
    pub request_id: u64,
    pub config: Arc<LoadedConfig>,
    pub job_name: String,
    pub payload: Value,
}

/// Build the config's VM, without setting it up, so that its capabilities are reported.
#[derive(Message)]
#[rtype(result = "WorkerReply<Result<(), NotReady>>")]
pub struct Inspect {
    pub request_id: u64,
    pub config: Arc<LoadedConfig>,
}

/// Export the buffers that are due (`exportEventsBufferSeconds`), or all of them.
#[derive(Message)]
#[rtype(result = "WorkerReply<()>")]
pub struct FlushExports {
    pub request_id: u64,
    pub all: bool,
}

/// After a reload: tear down the VMs of configs that are gone or changed (`current` maps each
/// active config to its version). Changed configs are rebuilt on their next use.
#[derive(Message)]
#[rtype(result = "WorkerReply<()>")]
pub struct Retire {
    pub request_id: u64,
    pub current: Arc<HashMap<i64, String>>,
}

/// Run `teardownPlugin` on every VM that ran its setup, and drop them all (shutdown).
#[derive(Message)]
#[rtype(result = "WorkerReply<()>")]
pub struct TeardownAll;

/// Tear down the VMs unused for the idle time (sent periodically by the pool, so that a quiet
/// worker gives its memory back too).
#[derive(Message)]
#[rtype(result = "WorkerReply<()>")]
pub struct Sweep {
    pub request_id: u64,
}

/// A reply and what the calls produced on the side.
#[derive(Debug, Default)]
pub struct WorkerReply<T> {
    pub value: T,
    pub side: SideEffects,
}

/// Log entries, captured events and config failures, for the pool to pass on.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SideEffects {
    pub logs: Vec<PluginLogEntry>,
    pub captures: Vec<(VmIdentity, CapturedByPlugin)>,
    /// Configs that failed to load or set up: the error is recorded on the config.
    pub config_errors: Vec<ConfigError>,
    /// Per call outcomes, for app metrics.
    pub outcomes: Vec<MethodOutcome>,
    /// Calls that threw RetryError and have attempts left.
    pub retries: Vec<AsyncRetry>,
    /// What each freshly built VM exports (PostHog's `posthog_plugin.capabilities`).
    pub capabilities: Vec<(VmIdentity, Value)>,
    /// Requests composed by `composeWebhook`, for the server to send.
    pub webhooks: Vec<(VmIdentity, FetchRequest)>,
    /// Configs whose VM was (re)built: whether it has a post-ingestion method.
    pub async_capable: Vec<(i64, bool)>,
}

/// A config that cannot run, and what becomes of it where configs are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigError {
    pub identity: VmIdentity,
    pub message: String,
    pub failure: ConfigFailure,
}

/// Whether a failed config is disabled where it is kept (`posthog_pluginconfig.enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfigFailure {
    /// setupPlugin failed after its retries: PostHog disables the config, and so does this
    /// server.
    Disabled,
    /// The error is recorded and the config left enabled: the plugin could not be loaded
    /// here (a module outside the allow-list, code that does not compile) or stopped a
    /// worker, and PostHog's own server, which may share the database, may still run it.
    Reported,
}

impl SideEffects {
    fn absorb(&mut self, identity: &VmIdentity, effects: CallEffects) {
        self.logs.extend(effects.logs);
        self.captures
            .extend(effects.captures.into_iter().map(|c| (identity.clone(), c)));
    }

    fn system_log(&mut self, identity: &VmIdentity, level: LogLevel, message: String) {
        self.log(identity, LogSource::System, level, message);
    }

    /// PostHog's PLUGIN/ERROR entry for a failed call.
    pub(crate) fn plugin_error(&mut self, identity: &VmIdentity, message: String) {
        self.log(identity, LogSource::Plugin, LogLevel::Error, message);
    }

    fn log(&mut self, identity: &VmIdentity, source: LogSource, level: LogLevel, message: String) {
        self.logs.push(PluginLogEntry {
            plugin_config_id: identity.plugin_config_id,
            plugin_id: identity.plugin_id,
            team_id: identity.team_id,
            timestamp: Utc::now(),
            source,
            level,
            message,
        });
    }

    /// An app-metric outcome of `count` events for one call.
    pub(crate) fn outcome(
        &mut self,
        identity: &VmIdentity,
        category: &'static str,
        count: u64,
        on_retry: bool,
        error: Option<&CallError>,
    ) {
        self.outcomes.push(MethodOutcome {
            team_id: identity.team_id,
            plugin_config_id: identity.plugin_config_id,
            category,
            count,
            on_retry,
            error_type: error.map(|e| e.error_type().to_owned()),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Actor

enum SetupState {
    NotRun,
    Done,
    /// RetryError: try again at this instant; `attempts` so far.
    RetryAt {
        at: Instant,
        attempts: u32,
    },
    /// Disabled: every later call fails with this, until the config's next version.
    Failed(NotReady),
}

struct Slot {
    config: Arc<LoadedConfig>,
    vm: Option<PluginVm>,
    setup: SetupState,
    export: ExportSettings,
    buffer: ExportBuffer,
    /// Net heap bytes allocated while the current VM loaded.
    vm_bytes: i64,
    /// When a call last made this config ready (or its VM was built).
    last_used: Instant,
}

pub struct VmWorker {
    heartbeat: Arc<Heartbeat>,
    load: Arc<WorkerLoad>,
    /// `plugin_vms_torn_down_total{reason}`.
    evictions: IntCounterVec,
    host: Rc<dyn PluginHost>,
    limits: VmLimits,
    setup_retry_base: Duration,
    retention: VmRetention,
    share: BudgetShare,
    slots: HashMap<i64, Slot>,
    /// Whether this thread raised boa's collection threshold yet: done before its first VM,
    /// so that a worker that never gets one (most async workers of a quiet server) does not
    /// hold the pages it took.
    gc_headroom_reserved: bool,
}

impl VmWorker {
    /// Builds the worker on its own thread, where its VMs will live.
    pub fn new(
        host: Rc<dyn PluginHost>,
        limits: VmLimits,
        setup_retry_base: Duration,
        retention: VmRetention,
        share: BudgetShare,
        instruments: WorkerInstruments,
    ) -> Self {
        let heartbeat = Arc::clone(&instruments.heartbeat);
        let load = Arc::clone(&instruments.load);
        let evictions = instruments.evictions.clone();
        install_instruments(instruments);
        Self {
            heartbeat,
            load,
            evictions,
            host,
            limits,
            setup_retry_base,
            retention,
            share,
            slots: HashMap::new(),
            gc_headroom_reserved: false,
        }
    }

    /// Builds the config's VM if it has none (or an outdated one), without setting it up.
    fn load(&mut self, config: &Arc<LoadedConfig>, side: &mut SideEffects) -> Result<(), NotReady> {
        let identity = &config.identity;
        let stale = self
            .slots
            .get(&identity.plugin_config_id)
            .is_some_and(|slot| slot.config.version != config.version);
        if stale && let Some(mut slot) = self.slots.remove(&identity.plugin_config_id) {
            close(&mut slot, side);
        }
        let slot = self
            .slots
            .entry(identity.plugin_config_id)
            .or_insert_with(|| Slot {
                config: Arc::clone(config),
                vm: None,
                setup: SetupState::NotRun,
                export: ExportSettings::from_config(&config.config),
                buffer: ExportBuffer::default(),
                vm_bytes: 0,
                last_used: Instant::now(),
            });
        if let SetupState::Failed(error) = &slot.setup {
            return Err(error.clone());
        }
        if slot.vm.is_none() {
            if !self.gc_headroom_reserved {
                natives::reserve_gc_headroom(natives::GC_HEADROOM_BYTES);
                self.gc_headroom_reserved = true;
            }
            let tally = plugin_server_alloc::open_tally();
            let loaded = PluginVm::load(
                identity.clone(),
                &config.source,
                &config.config,
                &config.attachments,
                self.limits.clone(),
                self.host.clone(),
            );
            slot.vm_bytes = tally.bytes().max(0);
            drop(tally);
            match loaded {
                Ok((vm, effects)) => {
                    side.absorb(identity, effects);
                    let post_ingestion = [
                        Method::OnEvent,
                        Method::ExportEvents,
                        Method::ComposeWebhook,
                    ];
                    side.async_capable.push((
                        identity.plugin_config_id,
                        post_ingestion.iter().any(|m| vm.has(*m)),
                    ));
                    side.capabilities
                        .push((identity.clone(), capabilities_of(&vm)));
                    slot.vm = Some(vm);
                }
                Err(error) => {
                    // Not disabled where the config is kept: PostHog's own server may run a
                    // plugin this one cannot (a module outside the allow-list), and both may
                    // share the database. This server skips it until its next version.
                    let log = format!(
                        "Plugin failed to load: {error}; this server skips it until the plugin or its config changes"
                    );
                    side.outcome(identity, "setupPlugin", 1, false, None);
                    if let Some(outcome) = side.outcomes.last_mut() {
                        outcome.error_type = Some("PluginLoadError".to_owned());
                    }
                    return Err(fail_for_good(
                        slot,
                        side,
                        identity,
                        log,
                        NotReady::LoadFailed(error),
                        ConfigFailure::Reported,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Makes the config's VM ready to call: built, current, and set up.
    fn ready(
        &mut self,
        config: &Arc<LoadedConfig>,
        side: &mut SideEffects,
    ) -> Result<(), NotReady> {
        self.load(config, side)?;
        let identity = &config.identity;
        let Some(slot) = self.slots.get_mut(&identity.plugin_config_id) else {
            return Err(NotReady::VmMissing);
        };
        slot.last_used = Instant::now();
        let attempts = match slot.setup {
            SetupState::Done => return Ok(()),
            SetupState::RetryAt { at, attempts } if Instant::now() < at => {
                return Err(NotReady::SetupBackingOff { attempts });
            }
            SetupState::RetryAt { attempts, .. } => attempts,
            SetupState::NotRun | SetupState::Failed(_) => 0,
        };
        let Some(vm) = slot.vm.as_mut() else {
            return Err(NotReady::VmMissing);
        };
        let (result, effects) = vm.call(Method::SetupPlugin, &[]);
        side.absorb(identity, effects);
        match result {
            Ok(_) => {
                slot.setup = SetupState::Done;
                Ok(())
            }
            Err(error) if error.is_retry() && attempts + 1 < SETUP_ATTEMPTS => {
                let attempts = attempts + 1;
                let backoff = self.setup_retry_base * 2u32.pow(attempts - 1);
                side.system_log(
                    identity,
                    LogLevel::Warn,
                    format!("setupPlugin failed with {error}; retrying in {backoff:?} (attempt {attempts} of {SETUP_ATTEMPTS})"),
                );
                slot.setup = SetupState::RetryAt {
                    at: Instant::now() + backoff,
                    attempts,
                };
                Err(NotReady::SetupWillRetry(error))
            }
            Err(error) => {
                let error = NotReady::SetupFailed(error);
                let log = format!("{error}; the plugin is disabled");
                // A VM that failed its setup reports no methods (PostHog); drop it.
                slot.vm = None;
                Err(fail_for_good(
                    slot,
                    side,
                    identity,
                    log,
                    error,
                    ConfigFailure::Disabled,
                ))
            }
        }
    }

    /// Tears down the VMs idle past the idle time, then, while the VMs' heap is over the
    /// budget, the least recently used ones. Runs after each request, when every VM is back
    /// in its slot; a config torn down here is built and set up again on its next use.
    fn retain(&mut self, side: &mut SideEffects) {
        let now = Instant::now();
        if let Some(idle) = self.retention.idle {
            let idle_ids: Vec<i64> = self
                .slots
                .iter()
                .filter(|(_, slot)| {
                    slot.vm.is_some() && now.saturating_duration_since(slot.last_used) >= idle
                })
                .map(|(id, _)| *id)
                .collect();
            if !idle_ids.is_empty() {
                for id in idle_ids {
                    self.evict(id, EvictReason::Idle, side);
                }
                // A dropped VM's objects are only freed by the thread's next collection,
                // which boa runs when allocation passes a threshold: collect now, so that the
                // memory is free before the next VMs are built.
                boa_engine::gc::force_collect();
            }
        }
        let Some(budget) = self.retention.budget_bytes else {
            return;
        };
        let held_elsewhere: i64 = self
            .share
            .held
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != self.share.index)
            .map(|(_, held)| held.load(Ordering::Relaxed))
            .sum();
        let mut own: i64 = self
            .slots
            .values()
            .filter(|slot| slot.vm.is_some())
            .map(|slot| slot.vm_bytes)
            .sum();
        let mut held = held_elsewhere + own;
        let workers = i64::try_from(self.share.held.len()).unwrap_or(1).max(1);
        // Not below (nearly) an equal share: see BUDGET_SHARE_FLOOR_PERCENT.
        let floor = budget / workers / 100 * BUDGET_SHARE_FLOOR_PERCENT;
        if held <= budget || own <= floor {
            return;
        }
        let mut by_age: Vec<(Instant, i64, i64)> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.vm.is_some())
            .map(|(id, slot)| (slot.last_used, *id, slot.vm_bytes))
            .collect();
        by_age.sort_unstable();
        let low_water = budget / 100 * BUDGET_LOW_WATER_PERCENT;
        let mut evicted = false;
        for (_, id, bytes) in by_age {
            if held <= low_water || own <= floor {
                break;
            }
            self.evict(id, EvictReason::Budget, side);
            held -= bytes;
            own -= bytes;
            evicted = true;
        }
        if evicted {
            // As above: free them now, and what the budget counts is what the thread holds.
            boa_engine::gc::force_collect();
        }
    }

    /// Tears down one config's VM but keeps its slot: its setup state goes back to "not run",
    /// so its next use builds and sets it up again.
    fn evict(&mut self, id: i64, reason: EvictReason, side: &mut SideEffects) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if slot.vm.is_none() {
            return;
        }
        close(slot, side);
        if matches!(slot.setup, SetupState::Done) {
            slot.setup = SetupState::NotRun;
        }
        self.load.evicted.fetch_add(1, Ordering::Relaxed);
        self.evictions.with_label_values(&[reason.as_str()]).inc();
    }

    fn process(
        &mut self,
        chain: &[Arc<LoadedConfig>],
        events: &[ChainEvent],
    ) -> WorkerReply<Vec<ChainOutcome>> {
        let mut side = SideEffects::default();
        // Configs that could not be made ready fail every event of this batch, so that the
        // event records it in `$plugins_failed` rather than silently missing the plugin.
        let mut unavailable: Vec<(usize, NotReady)> = Vec::new();
        // The chain's VMs leave their slots for the batch, so that each event borrows them in
        // chain order without a lookup; they go back afterwards, unless a call poisoned one.
        let mut vms: Vec<Option<PluginVm>> = Vec::with_capacity(chain.len());
        for (index, config) in chain.iter().enumerate() {
            match self.ready(config, &mut side) {
                Ok(()) => vms.push(
                    self.slots
                        .get_mut(&config.identity.plugin_config_id)
                        .and_then(|slot| slot.vm.take()),
                ),
                Err(error) => {
                    unavailable.push((index, error));
                    vms.push(None);
                }
            }
        }
        let labels: Vec<String> = chain
            .iter()
            .map(|c| config_label(&c.identity.plugin_name, c.identity.plugin_config_id))
            .collect();
        let unavailable_labels: Vec<String> = unavailable
            .iter()
            .map(|(i, _)| labels[*i].clone())
            .collect();

        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            let mut steps: Vec<ChainStep<'_>> = chain
                .iter()
                .zip(&labels)
                .zip(vms.iter_mut())
                .filter_map(|((config, label), vm)| {
                    let vm = vm.as_mut()?;
                    (vm.has(Method::ProcessEvent) || vm.has(Method::ProcessEventBatch)).then_some(
                        ChainStep {
                            label,
                            plugin_config_id: config.identity.plugin_config_id,
                            vm,
                        },
                    )
                })
                .collect();
            let (mut outcome, effects) = run_chain(event, &mut steps, &unavailable_labels);
            drop(steps);
            for (plugin_config_id, effects) in effects {
                if let Some(config) = chain
                    .iter()
                    .find(|c| c.identity.plugin_config_id == plugin_config_id)
                {
                    side.absorb(&config.identity, effects);
                }
            }
            for failure in &outcome.failures {
                if failure.error.poisons_vm()
                    && let Some(position) = chain
                        .iter()
                        .position(|c| c.identity.plugin_config_id == failure.plugin_config_id)
                {
                    // Dropped now; rebuilt (and set up again) before its next call.
                    vms[position] = None;
                    if let Some(slot) = self.slots.get_mut(&failure.plugin_config_id) {
                        slot.setup = SetupState::NotRun;
                    }
                }
            }
            for (index, error) in &unavailable {
                outcome.failures.push(EventFailure {
                    plugin_config_id: chain[*index].identity.plugin_config_id,
                    error: CallError::Thrown {
                        name: "Error".into(),
                        message: error.to_string(),
                    },
                });
            }
            outcomes.push(outcome);
        }
        for (config, vm) in chain.iter().zip(vms) {
            if let (Some(vm), Some(slot)) =
                (vm, self.slots.get_mut(&config.identity.plugin_config_id))
            {
                slot.vm = Some(vm);
            }
        }
        WorkerReply {
            value: outcomes,
            side,
        }
    }
}

impl VmWorker {
    /// Counts the live VMs for `/_actors` (after each message, when every VM is in its slot),
    /// and adds the message's call durations to `/_metrics`.
    fn publish_load(&self) {
        let (vms, bytes) = self
            .slots
            .values()
            .filter(|slot| slot.vm.is_some())
            .fold((0, 0), |(vms, bytes), slot| {
                (vms + 1, bytes + slot.vm_bytes)
            });
        self.load.vms.store(vms, Ordering::Relaxed);
        self.load
            .vm_heap_bytes_at_load
            .store(bytes, Ordering::Relaxed);
        if let Some(held) = self.share.held.get(self.share.index) {
            held.store(bytes, Ordering::Relaxed);
        }
        natives::flush_call_metrics();
    }

    fn run_async(
        &mut self,
        chain: &[Arc<LoadedConfig>],
        stored: &StoredEvents,
        target: Option<AsyncTarget>,
    ) -> SideEffects {
        let events = stored.events.as_slice();
        let mut side = SideEffects::default();
        for config in chain {
            let id = config.identity.plugin_config_id;
            if target.is_some_and(|t| t.plugin_config_id != id) {
                continue;
            }
            // A config that cannot be made ready was disabled and its error recorded.
            if self.ready(config, &mut side).is_err() {
                continue;
            }
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            match target {
                Some(AsyncTarget {
                    method: AsyncMethod::OnEvent,
                    attempt,
                    ..
                }) => on_event(slot, events, attempt, &mut side),
                Some(AsyncTarget {
                    method: AsyncMethod::ExportEvents,
                    attempt,
                    ..
                }) => export(slot, events.to_vec(), attempt, &mut side),
                None => {
                    on_event(slot, events, 0, &mut side);
                    compose_webhooks(slot, stored, &mut side);
                    buffer_exports(slot, events, &mut side);
                }
            }
        }
        side
    }

    fn flush_exports(&mut self, all: bool) -> SideEffects {
        let mut side = SideEffects::default();
        let now = Instant::now();
        let due: Vec<Arc<LoadedConfig>> = self
            .slots
            .values()
            .filter(|slot| {
                !slot.buffer.is_empty() && (all || slot.buffer.is_due(&slot.export, now))
            })
            .map(|slot| Arc::clone(&slot.config))
            .collect();
        for config in due {
            // The VM may have been dropped by a poisoned call since the events were buffered.
            if self.ready(&config, &mut side).is_err() {
                continue;
            }
            if let Some(slot) = self.slots.get_mut(&config.identity.plugin_config_id) {
                let events = slot.buffer.take();
                export(slot, events, 0, &mut side);
            }
        }
        side
    }
}

/// Why a VM was torn down while its config stayed: the `reason` label of
/// `plugin_vms_torn_down_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EvictReason {
    Budget,
    Idle,
}

impl EvictReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Budget => "budget",
            Self::Idle => "idle",
        }
    }
}

/// Ends a slot's VM: its export buffer is flushed and `teardownPlugin` runs (both only once
/// setupPlugin has), as PostHog does before dropping a VM; then the VM is dropped.
fn close(slot: &mut Slot, side: &mut SideEffects) {
    if !slot.buffer.is_empty() && matches!(slot.setup, SetupState::Done) {
        let events = slot.buffer.take();
        export(slot, events, 0, side);
    }
    if matches!(slot.setup, SetupState::Done)
        && let Some(vm) = slot.vm.as_mut()
    {
        let identity = vm.identity().clone();
        let (result, effects) = vm.call(Method::TeardownPlugin, &[]);
        side.absorb(&identity, effects);
        if let Err(error) = result {
            side.system_log(
                &identity,
                LogLevel::Error,
                format!("teardownPlugin failed: {error}"),
            );
        }
    }
    slot.vm = None;
}

/// Drops a VM whose call may have left it half-run; it is rebuilt before its next call.
/// PostHog's `{methods, scheduled_tasks, jobs}` for a VM: the exported plugin methods, the
/// `runEvery*` tasks, and the job names.
fn capabilities_of(vm: &PluginVm) -> Value {
    let (scheduled, methods): (Vec<Method>, Vec<Method>) = vm.methods().partition(|method| {
        matches!(
            method,
            Method::RunEveryMinute | Method::RunEveryHour | Method::RunEveryDay
        )
    });
    serde_json::json!({
        "methods": methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "scheduled_tasks": scheduled.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "jobs": vm.job_names().collect::<Vec<_>>(),
    })
}

fn forget_if_poisoned(slot: &mut Slot, error: &CallError) {
    if error.poisons_vm() {
        slot.vm = None;
        slot.setup = SetupState::NotRun;
    }
}

/// `onEvent` per event. Events that threw RetryError come back together as one retry.
fn on_event(slot: &mut Slot, events: &[Value], attempt: u32, side: &mut SideEffects) {
    let identity = slot.config.identity.clone();
    let mut retry = Vec::new();
    for event in events {
        let Some(vm) = slot.vm.as_mut().filter(|vm| vm.has(Method::OnEvent)) else {
            return;
        };
        let (result, effects) = vm.call(Method::OnEvent, &[event]);
        side.absorb(&identity, effects);
        match result {
            Ok(_) => side.outcome(&identity, "onEvent", 1, attempt > 0, None),
            Err(error) if error.is_retry() && attempt + 1 < ON_EVENT_ATTEMPTS => {
                retry.push(event.clone());
            }
            Err(error) => {
                side.outcome(&identity, "onEvent", 1, false, Some(&error));
                side.plugin_error(&identity, format!("onEvent failed: {error}"));
                forget_if_poisoned(slot, &error);
            }
        }
    }
    if !retry.is_empty() {
        side.retries.push(AsyncRetry {
            team_id: identity.team_id,
            target: AsyncTarget {
                plugin_config_id: identity.plugin_config_id,
                method: AsyncMethod::OnEvent,
                attempt: attempt + 1,
            },
            events: retry,
            delay: ON_EVENT_RETRY_BASE * 2u32.pow(attempt),
        });
    }
}

/// `composeWebhook` per event that passes the config's filters; the requests it returns are
/// sent by the server.
fn compose_webhooks(slot: &mut Slot, stored: &StoredEvents, side: &mut SideEffects) {
    let identity = slot.config.identity.clone();
    for (index, event) in stored.events.iter().enumerate() {
        let Some(vm) = slot.vm.as_mut().filter(|vm| vm.has(Method::ComposeWebhook)) else {
            return;
        };
        if let Some(filters) = &slot.config.webhook_filters {
            let subject = FilterSubject {
                event,
                person_properties: stored
                    .person_properties
                    .get(index)
                    .and_then(Value::as_object),
            };
            match filters.matches(subject) {
                Ok(true) => {}
                Ok(false) => continue,
                // PostHog counts it as a composeWebhook failure and sends nothing.
                Err(error) => {
                    let error = CallError::Thrown {
                        name: "FilterError".into(),
                        message: format!("Error occurred when processing filters: {error}"),
                    };
                    side.outcome(&identity, "composeWebhook", 1, false, Some(&error));
                    continue;
                }
            }
        }
        let (result, effects) = vm.call(Method::ComposeWebhook, &[event]);
        side.absorb(&identity, effects);
        match result {
            Ok(Some(webhook)) if webhook.is_object() => match webhook_request(&webhook) {
                Ok(request) => {
                    side.outcome(&identity, "composeWebhook", 1, false, None);
                    side.webhooks.push((identity.clone(), request));
                }
                Err(error) => {
                    let error = CallError::Thrown {
                        name: "TypeError".into(),
                        message: error.to_string(),
                    };
                    side.outcome(&identity, "composeWebhook", 1, false, Some(&error));
                    side.plugin_error(&identity, format!("composeWebhook failed: {error}"));
                }
            },
            // null: nothing to send for this event, and (as in PostHog) nothing to count.
            Ok(_) => {}
            Err(error) => {
                side.outcome(&identity, "composeWebhook", 1, false, Some(&error));
                side.plugin_error(&identity, format!("composeWebhook failed: {error}"));
                forget_if_poisoned(slot, &error);
            }
        }
    }
}

/// Adds the events to the config's export buffer and exports it whenever it fills up.
fn buffer_exports(slot: &mut Slot, events: &[Value], side: &mut SideEffects) {
    if !slot
        .vm
        .as_ref()
        .is_some_and(|vm| vm.has(Method::ExportEvents))
    {
        return;
    }
    for event in events {
        if slot.buffer.push(event, &slot.export) {
            let batch = slot.buffer.take();
            export(slot, batch, 0, side);
        }
    }
}

/// One `exportEvents` call. RetryError sends the batch back through the queue 6, 12 and 24 s
/// later; after that, or on any other error, the batch is dropped and counted as failed.
fn export(slot: &mut Slot, events: Vec<Value>, attempt: u32, side: &mut SideEffects) {
    let identity = slot.config.identity.clone();
    let Some(vm) = slot.vm.as_mut().filter(|vm| vm.has(Method::ExportEvents)) else {
        return;
    };
    let count = events.len() as u64;
    let batch = Value::Array(events);
    let (result, effects) = vm.call(Method::ExportEvents, &[&batch]);
    side.absorb(&identity, effects);
    let Err(error) = result else {
        side.outcome(&identity, "exportEvents", count, attempt > 0, None);
        return;
    };
    match batch {
        Value::Array(events) if error.is_retry() && attempt < EXPORT_RETRIES => {
            side.retries.push(AsyncRetry {
                team_id: identity.team_id,
                target: AsyncTarget {
                    plugin_config_id: identity.plugin_config_id,
                    method: AsyncMethod::ExportEvents,
                    attempt: attempt + 1,
                },
                events,
                delay: EXPORT_RETRY_BASE * 2u32.pow(attempt),
            });
        }
        _ => {
            side.outcome(&identity, "exportEvents", count, false, Some(&error));
            side.plugin_error(
                &identity,
                format!("exportEvents failed; {count} events are dropped: {error}"),
            );
        }
    }
    forget_if_poisoned(slot, &error);
}

/// Stops a config for good on this server (until its next version): logs why, records the
/// error for `posthog_pluginconfig` (disabling it there only for `ConfigFailure::Disabled`),
/// and fails every later call with `error`, which it returns.
fn fail_for_good(
    slot: &mut Slot,
    side: &mut SideEffects,
    identity: &VmIdentity,
    log: String,
    error: NotReady,
    failure: ConfigFailure,
) -> NotReady {
    side.system_log(identity, LogLevel::Error, log);
    side.config_errors.push(ConfigError {
        identity: identity.clone(),
        message: error.to_string(),
        failure,
    });
    slot.setup = SetupState::Failed(error.clone());
    error
}

impl Actor for VmWorker {
    type Context = SyncContext<Self>;
}

/// How the worker answers a message, whether it came through its actix mailbox (a worker
/// thread) or over the socket of a worker process (`super::isolation`).
pub trait Answer<M: Message> {
    fn answer(&mut self, message: M) -> M::Result;
}

impl<M> Handler<M> for VmWorker
where
    M: Message,
    M::Result: 'static,
    VmWorker: Answer<M>,
{
    type Result = MessageResult<M>;

    fn handle(&mut self, message: M, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.answer(message))
    }
}

impl Answer<ProcessEvents> for VmWorker {
    fn answer(&mut self, message: ProcessEvents) -> <ProcessEvents as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let mut reply = self.process(&message.chain, &message.events);
        self.retain(&mut reply.side);
        self.publish_load();
        reply
    }
}

impl Answer<RunAsync> for VmWorker {
    fn answer(&mut self, message: RunAsync) -> <RunAsync as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let mut side = self.run_async(&message.chain, &message.events, message.target);
        self.retain(&mut side);
        self.publish_load();
        WorkerReply { value: (), side }
    }
}

impl Answer<RunScheduled> for VmWorker {
    fn answer(&mut self, message: RunScheduled) -> <RunScheduled as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let mut side = SideEffects::default();
        for config in message.chain.iter() {
            // PostHog sets up plugins with scheduled tasks eagerly; here the first tick does.
            if self.ready(config, &mut side).is_err() {
                continue;
            }
            let Some(slot) = self.slots.get_mut(&config.identity.plugin_config_id) else {
                continue;
            };
            let Some(vm) = slot.vm.as_mut().filter(|vm| vm.has(message.method)) else {
                continue;
            };
            let identity = config.identity.clone();
            let (result, effects) = vm.call(message.method, &[]);
            side.absorb(&identity, effects);
            match result {
                Ok(_) => side.outcome(&identity, "scheduledTask", 1, false, None),
                Err(error) => {
                    side.outcome(&identity, "scheduledTask", 1, false, Some(&error));
                    side.plugin_error(
                        &identity,
                        format!("{} failed: {error}", message.method.name()),
                    );
                    forget_if_poisoned(slot, &error);
                }
            }
        }
        self.retain(&mut side);
        self.publish_load();
        WorkerReply { value: (), side }
    }
}

impl Answer<RunJob> for VmWorker {
    fn answer(&mut self, message: RunJob) -> <RunJob as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let mut side = SideEffects::default();
        let result = self.run_job(&message, &mut side);
        self.retain(&mut side);
        self.publish_load();
        WorkerReply {
            value: result,
            side,
        }
    }
}

impl VmWorker {
    /// `jobs[name](payload, meta)` of the message's config, set up first if need be.
    fn run_job(&mut self, message: &RunJob, side: &mut SideEffects) -> Result<(), JobRunError> {
        let config = &message.config;
        self.ready(config, side).map_err(JobRunError::NotReady)?;
        let Some(slot) = self.slots.get_mut(&config.identity.plugin_config_id) else {
            return Err(JobRunError::NotLoaded);
        };
        let Some(vm) = slot.vm.as_mut() else {
            return Err(JobRunError::NotLoaded);
        };
        let identity = &config.identity;
        let (result, effects) = vm.call_job(&message.job_name, &message.payload);
        side.absorb(identity, effects);
        match result {
            Ok(_) => {
                side.outcome(identity, "job", 1, false, None);
                Ok(())
            }
            Err(error) => {
                side.outcome(identity, "job", 1, false, Some(&error));
                side.plugin_error(
                    identity,
                    format!("job {} failed: {error}", message.job_name),
                );
                forget_if_poisoned(slot, &error);
                Err(JobRunError::Failed(error))
            }
        }
    }
}

impl Answer<Inspect> for VmWorker {
    fn answer(&mut self, message: Inspect) -> <Inspect as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let mut side = SideEffects::default();
        let config = &message.config;
        // A VM built earlier reported its capabilities then; report them again on request.
        let already = self
            .slots
            .get(&config.identity.plugin_config_id)
            .filter(|slot| slot.config.version == config.version)
            .and_then(|slot| slot.vm.as_ref())
            .map(capabilities_of);
        let result = match already {
            Some(capabilities) => {
                side.capabilities
                    .push((config.identity.clone(), capabilities));
                Ok(())
            }
            None => self.load(config, &mut side),
        };
        self.retain(&mut side);
        self.publish_load();
        WorkerReply {
            value: result,
            side,
        }
    }
}

impl Answer<FlushExports> for VmWorker {
    fn answer(&mut self, message: FlushExports) -> <FlushExports as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let mut side = self.flush_exports(message.all);
        self.retain(&mut side);
        self.publish_load();
        WorkerReply { value: (), side }
    }
}

impl Answer<Sweep> for VmWorker {
    fn answer(&mut self, message: Sweep) -> <Sweep as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let mut side = SideEffects::default();
        self.retain(&mut side);
        self.publish_load();
        WorkerReply { value: (), side }
    }
}

impl Answer<Retire> for VmWorker {
    fn answer(&mut self, message: Retire) -> <Retire as Message>::Result {
        self.heartbeat.set_request(message.request_id);
        let retired: Vec<i64> = self
            .slots
            .iter()
            .filter(|(id, slot)| message.current.get(id) != Some(&slot.config.version))
            .map(|(id, _)| *id)
            .collect();
        let mut side = SideEffects::default();
        for id in retired {
            if let Some(mut slot) = self.slots.remove(&id) {
                close(&mut slot, &mut side);
            }
        }
        self.publish_load();
        WorkerReply { value: (), side }
    }
}

impl Answer<TeardownAll> for VmWorker {
    fn answer(&mut self, _: TeardownAll) -> <TeardownAll as Message>::Result {
        let mut side = SideEffects::default();
        for (_, mut slot) in std::mem::take(&mut self.slots) {
            close(&mut slot, &mut side);
        }
        self.publish_load();
        WorkerReply { value: (), side }
    }
}
