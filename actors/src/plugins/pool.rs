//! `PluginVmPool`: WORKER_CONCURRENCY `VmWorker`s (one-thread `SyncArbiter`s, or processes),
//! each owning the VMs of the teams routed to it, plus a watchdog that replaces a stuck one.
//!
//! A team's events are spread over the processEvent workers by distinct id (each id's in
//! order on one worker), and each worker builds its own VM of a config it gets events for, as
//! PostHog's worker threads each hold one: `meta.global` is per VM. The post-ingestion methods,
//! scheduled tasks and jobs run on async workers of their own, a team's on one of them.
//!
//! The deadline check inside the VM stops runaway plugin code within TASK_TIMEOUT. Code it
//! cannot interrupt (a loop inside a native callback such as `Array.prototype.map`) keeps the
//! thread busy; after 2×TASK_TIMEOUT the watchdog abandons that thread, answers its pending
//! requests with a timeout failure, and starts a fresh worker in its place, so every other
//! team keeps flowing. The abandoned thread exits when (if) its call returns.
//!
//! With `WorkerIsolation::Process` (PLUGIN_WORKER_ISOLATION=process, the server's default)
//! each worker is a process instead (`super::isolation`): it watches its own calls and reports
//! a stuck one, and is then killed, so that what the call held and the core it spun go back;
//! the watchdog replaces it as it would a thread.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::prelude::*;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::plugins::LoadedConfig;
use crate::plugins::chain::{
    ChainEvent, ChainOutcome, ChainOutput, EventFailure, config_label, mark_failed,
};
use crate::plugins::isolation::protocol::WorkerSettings;
use crate::plugins::isolation::{
    ProcessInstruments, ProcessWorker, ToProcess, WorkerCommand, WorkerIsolation,
};
use crate::plugins::outputs::PluginOutputs;
use crate::plugins::post_ingestion_messages::{AsyncTarget, StoredEvents};
use crate::plugins::runtime::natives::{Heartbeat, PluginHost, WorkerInstruments, WorkerLoad};
use crate::plugins::runtime::vm::{CallError, Method, VmLimits};
use crate::plugins::worker::{
    BudgetShare, ConfigError, ConfigFailure, FlushExports, Inspect, NotReady, ProcessEvents,
    Retire, RunAsync, RunJob, RunScheduled, SideEffects, Sweep, TeardownAll, VmRetention, VmWorker,
};
use crate::system::metrics::{Metrics, MetricsError};

/// Why a job did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum JobRunError {
    /// Its config is disabled, deleted, or belongs to no loaded plugin.
    #[error("its plugin config is not active")]
    ConfigInactive,
    #[error("the plugin could not be set up: {0}")]
    NotReady(#[source] NotReady),
    #[error("the plugin is not loaded")]
    NotLoaded,
    /// The job threw, timed out or hit a runtime limit.
    #[error(transparent)]
    Failed(CallError),
    #[error("the plugin worker was replaced before it answered (the job ran too long)")]
    WorkerReplaced,
    #[error("the plugin worker is unavailable")]
    WorkerUnavailable,
}

/// Why the pool got no answer from a config's VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The watchdog abandoned the worker while the request waited or ran; the caller's queue
    /// delivers the work again.
    #[error("the plugin worker was replaced before it answered")]
    WorkerReplaced,
    #[error("the plugin worker is unavailable")]
    WorkerUnavailable,
    /// The config's VM could not be built (`inspect_plugin`).
    #[error(transparent)]
    NotReady(#[from] NotReady),
}

/// Settings of the pool (PostHog names in `src/settings.rs`).
#[derive(Debug, Clone)]
pub struct PluginVmPoolConfig {
    /// WORKER_CONCURRENCY: the threads that run processEvent.
    pub workers: usize,
    /// ASYNC_WORKER_CONCURRENCY: the threads that run everything else (onEvent,
    /// composeWebhook, exportEvents, scheduled tasks, jobs), so that none of it, however slow
    /// its I/O, holds up processEvent. At least one.
    pub async_workers: usize,
    /// TASKS_PER_WORKER: requests in flight per worker thread.
    pub tasks_per_worker: usize,
    pub limits: VmLimits,
    /// The first backoff of a setupPlugin that threw RetryError (PostHog: 5 s, doubling).
    pub setup_retry_base: Duration,
    /// When VMs are torn down; the budget is the pool's, for all its workers.
    pub retention: VmRetention,
    /// PLUGIN_WORKER_ISOLATION: threads of this process, or a process per worker.
    pub isolation: WorkerIsolation,
}

/// Builds the host services of a worker thread, on that thread.
pub type HostFactory = Arc<dyn Fn() -> Rc<dyn PluginHost> + Send + Sync>;

/// The plugin configs of every team, in chain order.
#[derive(Debug, Default, Clone)]
pub struct PluginSet {
    teams: HashMap<i64, Arc<[Arc<LoadedConfig>]>>,
}

impl PluginSet {
    pub fn new(configs: impl IntoIterator<Item = LoadedConfig>) -> Self {
        let mut by_team: HashMap<i64, Vec<Arc<LoadedConfig>>> = HashMap::new();
        for config in configs {
            by_team
                .entry(config.identity.team_id)
                .or_default()
                .push(Arc::new(config));
        }
        let teams = by_team
            .into_iter()
            .map(|(team, mut configs)| {
                configs.sort_by_key(|c| (c.order, c.identity.plugin_config_id));
                (team, configs.into())
            })
            .collect();
        Self { teams }
    }

    pub fn chain(&self, team_id: i64) -> Option<Arc<[Arc<LoadedConfig>]>> {
        self.teams.get(&team_id).cloned()
    }

    pub fn teams(&self) -> Vec<i64> {
        self.teams.keys().copied().collect()
    }

    pub fn config_count(&self) -> usize {
        self.teams.values().map(|c| c.len()).sum()
    }

    pub fn configs(&self) -> impl Iterator<Item = &Arc<LoadedConfig>> {
        self.teams.values().flat_map(|c| c.iter())
    }
}

/// Where a worker runs.
#[derive(Clone)]
enum WorkerAddr {
    Thread(Addr<VmWorker>),
    Process(ProcessWorker),
}

struct WorkerSlot {
    addr: WorkerAddr,
    heartbeat: Arc<Heartbeat>,
    load: Arc<WorkerLoad>,
    /// Cancelled when the watchdog abandons this worker.
    abandoned: CancellationToken,
    /// Set before `abandoned` is cancelled: the request that was running when the worker
    /// stopped. Only it fails; requests queued behind it are sent to the new worker.
    stuck_request: Arc<AtomicU64>,
    permits: Arc<Semaphore>,
}

#[derive(Clone)]
struct PoolMetrics {
    method_duration: HistogramVec,
    vms_torn_down: IntCounterVec,
    workers_replaced: IntCounter,
    events_failed: IntCounter,
    events_dropped: IntCounter,
    configs_loaded: IntGauge,
}

impl PoolMetrics {
    fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let method_duration = HistogramVec::new(
            HistogramOpts::new(
                "plugin_method_duration_seconds",
                "Time spent in one plugin method call.",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
            ]),
            &["method"],
        )?;
        let vms_torn_down = IntCounterVec::new(
            Opts::new(
                "plugin_vms_torn_down_total",
                "Plugin VMs torn down while their config stayed, by reason: over PLUGIN_VM_MEMORY_BUDGET_MB (budget) or unused for PLUGIN_VM_IDLE_TEARDOWN_SECONDS (idle).",
            ),
            &["reason"],
        )?;
        let workers_replaced = IntCounter::with_opts(Opts::new(
            "plugin_vm_workers_replaced_total",
            "Plugin workers replaced: a thread abandoned, or a process ended, because a call ran past 2x TASK_TIMEOUT or its memory limit, or (processes) because it crashed.",
        ))?;
        let events_failed = IntCounter::with_opts(Opts::new(
            "plugin_processevent_failures_total",
            "processEvent calls that threw, timed out or could not run.",
        ))?;
        let events_dropped = IntCounter::with_opts(Opts::new(
            "plugin_events_dropped_total",
            "Events a plugin dropped by returning null or undefined.",
        ))?;
        let configs_loaded = IntGauge::with_opts(Opts::new(
            "plugin_configs_loaded",
            "Plugin configs in the current plugin set.",
        ))?;
        metrics
            .registry()
            .register(Box::new(method_duration.clone()))?;
        metrics
            .registry()
            .register(Box::new(vms_torn_down.clone()))?;
        metrics
            .registry()
            .register(Box::new(workers_replaced.clone()))?;
        metrics
            .registry()
            .register(Box::new(events_failed.clone()))?;
        metrics
            .registry()
            .register(Box::new(events_dropped.clone()))?;
        metrics
            .registry()
            .register(Box::new(configs_loaded.clone()))?;
        Ok(Self {
            method_duration,
            vms_torn_down,
            workers_replaced,
            events_failed,
            events_dropped,
            configs_loaded,
        })
    }
}

struct Inner {
    config: PluginVmPoolConfig,
    host_factory: HostFactory,
    outputs: Arc<dyn PluginOutputs>,
    workers: Vec<Mutex<WorkerSlot>>,
    /// What each worker's VMs hold, for the one budget of all of them.
    held: Arc<[AtomicI64]>,
    plugins: RwLock<Arc<PluginSet>>,
    metrics: PoolMetrics,
    next_request_id: AtomicU64,
    /// Configs with onEvent, exportEvents or composeWebhook, as their VMs showed when built.
    async_capable: RwLock<HashSet<i64>>,
}

/// How a request to a worker ended.
enum Sent<R> {
    Reply(R),
    Abandoned { stuck: bool },
    Unavailable,
}

impl<R> Sent<R> {
    /// The reply, or why there is none.
    fn reply(self) -> Result<R, PoolError> {
        match self {
            Self::Reply(reply) => Ok(reply),
            Self::Abandoned { .. } => Err(PoolError::WorkerReplaced),
            Self::Unavailable => Err(PoolError::WorkerUnavailable),
        }
    }
}

/// A cheap handle to the pool; clone it freely.
#[derive(Clone)]
pub struct PluginVmPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PluginVmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginVmPool")
            .field("workers", &self.inner.workers.len())
            .finish_non_exhaustive()
    }
}

impl PluginVmPool {
    /// Starts the worker threads and the watchdog. Must run inside an actix system.
    pub fn start(
        config: PluginVmPoolConfig,
        host_factory: HostFactory,
        outputs: Arc<dyn PluginOutputs>,
        metrics: &Metrics,
    ) -> Result<Self, MetricsError> {
        let metrics = PoolMetrics::register(metrics)?;
        // processEvent's workers first, then the async ones (see `async_index`).
        let count = config.workers.max(1) + config.async_workers.max(1);
        let held: Arc<[AtomicI64]> = (0..count).map(|_| AtomicI64::new(0)).collect();
        let workers = (0..count)
            .map(|index| {
                let share = BudgetShare {
                    index,
                    held: Arc::clone(&held),
                };
                Mutex::new(spawn_worker(&config, &host_factory, &metrics, share))
            })
            .collect();
        let pool = Self {
            inner: Arc::new(Inner {
                config,
                host_factory,
                outputs,
                workers,
                held,
                plugins: RwLock::new(Arc::new(PluginSet::default())),
                metrics,
                next_request_id: AtomicU64::new(1),
                async_capable: RwLock::default(),
            }),
        };
        pool.spawn_watchdog();
        pool.spawn_sweeper();
        Ok(pool)
    }

    /// Replaces the plugin set; workers rebuild a VM whose config version changed on its next use.
    pub fn set_plugins(&self, plugins: PluginSet) {
        self.inner
            .metrics
            .configs_loaded
            .set(plugins.config_count() as i64);
        if let Ok(mut current) = self.inner.plugins.write() {
            *current = Arc::new(plugins);
        }
    }

    /// A reload: swaps in `plugins`, then has every worker tear down the VMs of configs that
    /// are gone or changed. Batches already sent finish on the chain they were sent with.
    pub async fn replace_plugins(&self, plugins: PluginSet) {
        let current: Arc<HashMap<i64, String>> = Arc::new(
            plugins
                .configs()
                .map(|c| (c.identity.plugin_config_id, c.version.clone()))
                .collect(),
        );
        let configs: Vec<Arc<LoadedConfig>> = self.plugins().configs().cloned().collect();
        self.set_plugins(plugins);
        for index in 0..self.inner.workers.len() {
            if let Sent::Reply(reply) = self
                .send_to(index, |request_id| Retire {
                    request_id,
                    current: Arc::clone(&current),
                })
                .await
            {
                // Log entries of retired configs are filtered by their old settings.
                self.deliver(reply.side, &configs);
            }
        }
    }

    pub fn plugins(&self) -> Arc<PluginSet> {
        self.inner
            .plugins
            .read()
            .map(|p| Arc::clone(&p))
            .unwrap_or_default()
    }

    /// Whether events of this team need to go through the pool at all.
    pub fn has_plugins(&self, team_id: i64) -> bool {
        self.plugins().chain(team_id).is_some()
    }

    /// Whether stored events of this team have anything to run after ingestion: a config
    /// whose VM, once built, showed onEvent, exportEvents or composeWebhook.
    pub fn wants_async(&self, team_id: i64) -> bool {
        self.follow_up_needs(team_id).is_some()
    }

    /// What the team's stored events need after ingestion, from one look at its chain: `None`
    /// when no config has onEvent, composeWebhook or exportEvents; otherwise whether a config
    /// filters its webhooks (the filters may test persons, so the events carry them).
    pub fn follow_up_needs(&self, team_id: i64) -> Option<bool> {
        let chain = self.plugins().chain(team_id)?;
        let capable = self.inner.async_capable.read().ok()?;
        chain
            .iter()
            .any(|config| capable.contains(&config.identity.plugin_config_id))
            .then(|| chain.iter().any(|config| config.webhook_filters.is_some()))
    }

    /// processEvent's workers: the first `workers` of the pool.
    fn ingestion_workers(&self) -> usize {
        self.inner.config.workers.max(1)
    }

    /// The processEvent worker that builds a team's VMs for `inspect_plugin`.
    fn worker_index(&self, team_id: i64) -> usize {
        (team_id.unsigned_abs() % self.ingestion_workers() as u64) as usize
    }

    /// The async worker of a team: its post-ingestion methods, export buffers, scheduled
    /// tasks and jobs all run there, in order.
    fn async_index(&self, team_id: i64) -> usize {
        let async_workers = self.inner.workers.len() - self.ingestion_workers();
        self.ingestion_workers() + (team_id.unsigned_abs() % async_workers.max(1) as u64) as usize
    }

    /// Sends a request to a worker once a permit is free. A worker that the watchdog abandons
    /// meanwhile answers `Abandoned`; `stuck` tells whether this very request stopped it.
    async fn send_to<M>(&self, index: usize, message: impl FnOnce(u64) -> M) -> Sent<M::Result>
    where
        M: Message + ToProcess + Send + 'static,
        M::Result: Send,
        VmWorker: Handler<M>,
    {
        let (addr, abandoned, stuck_request, permits) = {
            let Ok(slot) = self.inner.workers[index].lock() else {
                return Sent::Unavailable;
            };
            (
                slot.addr.clone(),
                slot.abandoned.clone(),
                Arc::clone(&slot.stuck_request),
                Arc::clone(&slot.permits),
            )
        };
        let Ok(_permit) = permits.acquire_owned().await else {
            return Sent::Unavailable;
        };
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let reply = match addr {
            WorkerAddr::Thread(addr) => {
                let request = addr.send(message(request_id));
                tokio::select! {
                    reply = request => reply.ok(),
                    () = abandoned.cancelled() => None,
                }
            }
            WorkerAddr::Process(worker) => {
                let message = message(request_id);
                let replied = worker
                    .request(request_id, |builder| message.to_request(builder))
                    .await
                    .and_then(|replied| M::from_reply(replied.value, replied.side));
                if replied.is_none() {
                    // The process is gone; the watchdog replaces it within a tick and
                    // records which request stopped it.
                    abandoned.cancelled().await;
                }
                replied
            }
        };
        match reply {
            Some(reply) => Sent::Reply(reply),
            None => Sent::Abandoned {
                stuck: stuck_request.load(Ordering::Relaxed) == request_id,
            },
        }
    }

    /// Runs the team's processEvent chain over `events`, answering in their order. Events of a
    /// team without plugins come back unchanged. Never fails: a stuck worker turns into
    /// failures marked on the events.
    ///
    /// A team is spread over every worker by distinct id, as PostHog groups a batch by
    /// `token:distinct_id`: each id's events always go to the same worker, in order, and each
    /// worker builds its own VM of a config once it gets events for it (so `meta.global` is
    /// per VM, as it is per worker thread in PostHog). One team's chain then uses every core.
    pub async fn process_events(&self, team_id: i64, events: Vec<ChainEvent>) -> Vec<ChainOutcome> {
        let workers = self.ingestion_workers();
        if workers <= 1 || !self.has_plugins(team_id) {
            return self.process_on(0, team_id, events).await;
        }
        let mut shares: Vec<Share> = (0..workers).map(|_| Share::default()).collect();
        for (position, event) in events.into_iter().enumerate() {
            let share = &mut shares[worker_of_distinct_id(team_id, &event.distinct_id, workers)];
            share.positions.push(position);
            share.events.push(event);
        }
        let mut busy: Vec<(usize, Share)> = shares
            .into_iter()
            .enumerate()
            .filter(|(_, share)| !share.events.is_empty())
            .collect();
        if busy.len() == 1
            && let Some((index, share)) = busy.pop()
        {
            // One worker gets them all (one distinct id): nothing to put back in order.
            return self.process_on(index, team_id, share.events).await;
        }
        let replies =
            futures::future::join_all(busy.into_iter().map(|(index, share)| async move {
                (
                    share.positions,
                    self.process_on(index, team_id, share.events).await,
                )
            }))
            .await;
        let total = replies.iter().map(|(positions, _)| positions.len()).sum();
        let mut ordered: Vec<Option<ChainOutcome>> = (0..total).map(|_| None).collect();
        for (positions, outcomes) in replies {
            for (position, outcome) in positions.into_iter().zip(outcomes) {
                ordered[position] = Some(outcome);
            }
        }
        ordered.into_iter().flatten().collect()
    }

    /// [`Self::process_events`] on one worker.
    async fn process_on(
        &self,
        index: usize,
        team_id: i64,
        events: Vec<ChainEvent>,
    ) -> Vec<ChainOutcome> {
        // Shared with the worker and kept here, so that events can be re-sent or go on marked
        // failed if their worker is abandoned.
        let pending = Arc::new(events);
        // A request queued behind a stuck one is re-sent to the replacement worker; one that
        // keeps meeting stuck workers gives up after a few tries.
        for _ in 0..3 {
            let Some(chain) = self.plugins().chain(team_id) else {
                return take_events(pending).into_iter().map(passthrough).collect();
            };
            let sent = self
                .send_to(index, |request_id| ProcessEvents {
                    request_id,
                    chain: Arc::clone(&chain),
                    events: Arc::clone(&pending),
                })
                .await;
            let reply = match sent {
                Sent::Reply(reply) => reply,
                Sent::Abandoned { stuck: true } => {
                    let limit = self.inner.config.limits.task_timeout * 2;
                    let message = format!(
                        "the plugin call ran past {limit:?} (twice TASK_TIMEOUT), past its memory limit, or crashed its worker process; its worker was replaced"
                    );
                    return fail_all(take_events(pending), &chain, &message);
                }
                Sent::Abandoned { stuck: false } => continue,
                Sent::Unavailable => break,
            };
            let failed: usize = reply.value.iter().map(|o| o.failures.len()).sum();
            let dropped = reply.value.iter().filter(|o| o.event.is_none()).count();
            self.inner.metrics.events_failed.inc_by(failed as u64);
            self.inner.metrics.events_dropped.inc_by(dropped as u64);
            let mut side = reply.side;
            account(&mut side, &reply.value, &chain);
            self.deliver(side, &chain);
            return reply.value;
        }
        let chain = self
            .plugins()
            .chain(team_id)
            .unwrap_or_else(|| Arc::from(Vec::new()));
        fail_all(
            take_events(pending),
            &chain,
            "the plugin worker is unavailable",
        )
    }

    /// Runs onEvent, composeWebhook and exportEvents of the team's configs over its stored
    /// events (or, with a `target`, retries one config's method). An error means the worker
    /// went away before answering: the caller's queue delivers the message again.
    pub async fn run_async(
        &self,
        team_id: i64,
        events: StoredEvents,
        target: Option<AsyncTarget>,
    ) -> Result<(), PoolError> {
        let Some(chain) = self.plugins().chain(team_id) else {
            return Ok(());
        };
        let events = Arc::new(events);
        let reply = self
            .send_to(self.async_index(team_id), |request_id| RunAsync {
                request_id,
                chain: Arc::clone(&chain),
                events: Arc::clone(&events),
                target,
            })
            .await
            .reply()?;
        self.deliver(reply.side, &chain);
        Ok(())
    }

    /// Runs a scheduled method of the team's configs that have it. An error means the worker
    /// went away before answering.
    pub async fn run_scheduled(&self, team_id: i64, method: Method) -> Result<(), PoolError> {
        let Some(chain) = self.plugins().chain(team_id) else {
            return Ok(());
        };
        let reply = self
            .send_to(self.async_index(team_id), |request_id| RunScheduled {
                request_id,
                chain: Arc::clone(&chain),
                method,
            })
            .await
            .reply()?;
        self.deliver(reply.side, &chain);
        Ok(())
    }

    /// Runs `jobs[name](payload)` of a config that is loaded now. The error says why the job
    /// did not succeed: the config is not active, the job threw, or the worker went away.
    pub async fn run_job(
        &self,
        plugin_config_id: i64,
        job_name: &str,
        payload: Value,
    ) -> Result<(), JobRunError> {
        let plugins = self.plugins();
        let Some(config) = plugins
            .configs()
            .find(|config| config.identity.plugin_config_id == plugin_config_id)
            .cloned()
        else {
            return Err(JobRunError::ConfigInactive);
        };
        let team_id = config.identity.team_id;
        let chain = plugins
            .chain(team_id)
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let sent = self
            .send_to(self.async_index(team_id), |request_id| RunJob {
                request_id,
                config,
                job_name: job_name.to_owned(),
                payload,
            })
            .await;
        match sent {
            Sent::Reply(reply) => {
                self.deliver(reply.side, &chain);
                reply.value
            }
            Sent::Abandoned { .. } => Err(JobRunError::WorkerReplaced),
            Sent::Unavailable => Err(JobRunError::WorkerUnavailable),
        }
    }

    /// Builds a VM of one of the plugin's active configs (without setting it up), so that the
    /// plugin's capabilities are reported; PostHog's `populate-plugin-capabilities`. Returns
    /// false when the plugin has no active config here to build.
    pub async fn inspect_plugin(&self, plugin_id: i64) -> Result<bool, PoolError> {
        let plugins = self.plugins();
        let Some(config) = plugins
            .configs()
            .find(|config| config.identity.plugin_id == plugin_id)
            .cloned()
        else {
            return Ok(false);
        };
        let team_id = config.identity.team_id;
        let chain = plugins
            .chain(team_id)
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let reply = self
            .send_to(self.worker_index(team_id), |request_id| Inspect {
                request_id,
                config,
            })
            .await
            .reply()?;
        self.deliver(reply.side, &chain);
        reply.value.map(|()| true).map_err(PoolError::from)
    }

    /// Teams that have plugins, for the scheduler.
    pub fn teams(&self) -> Vec<i64> {
        self.plugins().teams()
    }

    /// Exports the buffers that are due, or all of them (shutdown).
    pub async fn flush_exports(&self, all: bool) {
        let plugins = self.plugins();
        // Export buffers live on the async workers only.
        for index in self.ingestion_workers()..self.inner.workers.len() {
            if let Sent::Reply(reply) = self
                .send_to(index, |request_id| FlushExports { request_id, all })
                .await
            {
                let configs: Vec<Arc<LoadedConfig>> = plugins.configs().cloned().collect();
                self.deliver(reply.side, &configs);
            }
        }
    }

    /// Passes a worker's side effects on: log entries below each config's log_level are
    /// dropped, and which configs have post-ingestion methods is noted.
    fn deliver(&self, mut side: SideEffects, configs: &[Arc<LoadedConfig>]) {
        let config = |id: i64| configs.iter().find(|c| c.identity.plugin_config_id == id);
        side.logs
            .retain(|entry| config(entry.plugin_config_id).is_none_or(|c| c.keeps(entry)));
        if !side.async_capable.is_empty()
            && let Ok(mut capable) = self.inner.async_capable.write()
        {
            for (id, has) in side.async_capable.drain(..) {
                if has {
                    capable.insert(id);
                } else {
                    capable.remove(&id);
                }
            }
        }
        self.inner.outputs.side_effects(side);
    }

    /// What `/_actors` shows of the pool: configs, live VMs and the heap they took to load,
    /// per worker thread, and how many threads the watchdog replaced.
    pub fn stats(&self) -> Value {
        let workers: Vec<Value> = self
            .inner
            .workers
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                let slot = slot.lock().ok()?;
                let (busy, pid) = match &slot.addr {
                    WorkerAddr::Thread(_) => (slot.heartbeat.busy(), None),
                    // The process watches its own calls; the pool sees its requests.
                    WorkerAddr::Process(worker) => (
                        worker.busy().map(|busy| (busy, 0)),
                        Some(worker.pid()).filter(|&pid| pid != 0),
                    ),
                };
                Some(serde_json::json!({
                    "worker": index,
                    "runs": if index < self.ingestion_workers() { "processEvent" } else { "async" },
                    "vms": slot.load.vms.load(Ordering::Relaxed),
                    "vms_torn_down": slot.load.evicted.load(Ordering::Relaxed),
                    "vm_heap_bytes_at_load": slot.load.vm_heap_bytes_at_load.load(Ordering::Relaxed),
                    "busy_ms": busy.map(|(for_, _)| for_.as_millis() as u64),
                    "busy_plugin_config_id": busy.map(|(_, id)| id).filter(|&id| id != 0),
                    "pid": pid,
                }))
            })
            .collect();
        let total = |key: &str| workers.iter().filter_map(|w| w[key].as_i64()).sum::<i64>();
        serde_json::json!({
            "configs": self.plugins().config_count(),
            "vms": total("vms"),
            "vm_heap_bytes_at_load": total("vm_heap_bytes_at_load"),
            "vms_torn_down": total("vms_torn_down"),
            "workers_replaced": self.inner.metrics.workers_replaced.get(),
            "workers": workers,
        })
    }

    /// Runs teardownPlugin everywhere (shutdown).
    pub async fn teardown(&self) {
        for index in 0..self.inner.workers.len() {
            if let Sent::Reply(reply) = self.send_to(index, |_| TeardownAll).await {
                self.inner.outputs.side_effects(reply.side);
            }
        }
    }

    /// Has every worker tear down its idle VMs a few times per idle time, and, with a budget,
    /// give back what it holds over its share every second: a worker that gets no requests
    /// gives its memory back as well.
    fn spawn_sweeper(&self) {
        let retention = self.inner.config.retention;
        let every = match (retention.idle, retention.budget_bytes) {
            (Some(idle), budget) => {
                let every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
                if budget.is_some() {
                    every.min(Duration::from_secs(1))
                } else {
                    every
                }
            }
            (None, Some(_)) => Duration::from_secs(1),
            (None, None) => return,
        };
        let pool = Arc::downgrade(&self.inner);
        actix::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(inner) = pool.upgrade() else { return };
                let pool = PluginVmPool { inner };
                for index in 0..pool.inner.workers.len() {
                    if let Sent::Reply(reply) =
                        pool.send_to(index, |request_id| Sweep { request_id }).await
                    {
                        // The configs only filter log entries, and most sweeps tear nothing
                        // down: no copy of every config each second for nothing.
                        let configs: Vec<Arc<LoadedConfig>> = if reply.side.logs.is_empty() {
                            Vec::new()
                        } else {
                            pool.plugins().configs().cloned().collect()
                        };
                        pool.deliver(reply.side, &configs);
                    }
                }
            }
        });
    }

    fn spawn_watchdog(&self) {
        let pool = Arc::downgrade(&self.inner);
        actix::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(250));
            loop {
                ticker.tick().await;
                let Some(inner) = pool.upgrade() else { return };
                let limit = inner.config.limits.task_timeout * 2;
                let mut stuck_configs = Vec::new();
                for (index, slot) in inner.workers.iter().enumerate() {
                    let Ok(mut slot) = slot.lock() else { continue };
                    let Some(stopped) = stopped(&slot, index, limit) else {
                        continue;
                    };
                    slot.stuck_request
                        .store(stopped.request.unwrap_or(0), Ordering::Relaxed);
                    slot.abandoned.cancel();
                    let share = BudgetShare {
                        index,
                        held: Arc::clone(&inner.held),
                    };
                    *slot = spawn_worker(&inner.config, &inner.host_factory, &inner.metrics, share);
                    inner.metrics.workers_replaced.inc();
                    stuck_configs.extend(stopped.plugin_config_id);
                }
                if !stuck_configs.is_empty() {
                    disable_configs(&inner, &stuck_configs, limit);
                }
            }
        });
    }
}

/// A worker the watchdog replaces: the request it stopped in, and the config to disable when
/// it is known.
struct Stopped {
    request: Option<u64>,
    plugin_config_id: Option<i64>,
}

/// Whether the worker in `slot` is stopped for good, logged with why: a thread whose call ran
/// past `limit`, or a process that is gone (it reported a stuck call, or died without a word,
/// in which case the request it had begun is blamed: sent again, it would only end the next
/// process too).
fn stopped(slot: &WorkerSlot, index: usize, limit: Duration) -> Option<Stopped> {
    let WorkerAddr::Process(worker) = &slot.addr else {
        let (busy, plugin_config_id) = slot.heartbeat.busy().filter(|(busy, _)| *busy >= limit)?;
        tracing::error!(
            worker = index,
            plugin_config_id,
            busy_ms = busy.as_millis() as u64,
            "A plugin call ran past twice TASK_TIMEOUT or past its memory limit; abandoning its worker thread, starting a new one and disabling the config."
        );
        return Some(Stopped {
            request: Some(slot.heartbeat.request()),
            plugin_config_id: Some(plugin_config_id),
        });
    };
    if !worker.exited() {
        return None;
    }
    let Some(report) = worker.stuck_report() else {
        let request = worker.running_request();
        tracing::error!(
            worker = index,
            pid = worker.pid(),
            request,
            "A plugin worker process ended on its own (a crash, such as a native stack overflow, or killed); starting a new one."
        );
        return Some(Stopped {
            request,
            plugin_config_id: None,
        });
    };
    tracing::error!(
        worker = index,
        plugin_config_id = report.plugin_config_id,
        busy_ms = report.busy.as_millis() as u64,
        out_of_memory = report.out_of_memory,
        "A plugin call ran past twice TASK_TIMEOUT or past its memory limit; its worker process was ended, starting a new one and disabling the config."
    );
    Some(Stopped {
        request: Some(report.request_id),
        plugin_config_id: Some(report.plugin_config_id).filter(|&id| id != 0),
    })
}

/// Takes configs that stopped a worker out of the plugin set (a rerun would stop the next
/// worker too) and reports them, so that their error is recorded (they are not disabled for
/// PostHog's server, which may share the database; here they come back with the next reload).
fn disable_configs(inner: &Inner, plugin_config_ids: &[i64], limit: Duration) {
    let Ok(mut plugins) = inner.plugins.write() else {
        return;
    };
    let mut side = SideEffects::default();
    let kept: Vec<LoadedConfig> = plugins
        .configs()
        .filter(|config| {
            let stuck = plugin_config_ids.contains(&config.identity.plugin_config_id);
            if stuck {
                side.config_errors.push(ConfigError {
                    identity: config.identity.clone(),
                    message: format!("a call ran past {limit:?} (twice TASK_TIMEOUT) or past its memory limit; this server stops the plugin until the next reload"),
                    failure: ConfigFailure::Reported,
                });
            }
            !stuck
        })
        .map(|config| LoadedConfig::clone(config))
        .collect();
    *plugins = Arc::new(PluginSet::new(kept));
    inner
        .metrics
        .configs_loaded
        .set(plugins.config_count() as i64);
    drop(plugins);
    inner.outputs.side_effects(side);
}

fn spawn_worker(
    config: &PluginVmPoolConfig,
    host_factory: &HostFactory,
    metrics: &PoolMetrics,
    share: BudgetShare,
) -> WorkerSlot {
    let heartbeat = Arc::new(Heartbeat::default());
    let load = Arc::new(WorkerLoad::default());
    if let WorkerIsolation::Process(command) = &config.isolation {
        return spawn_process_worker(
            config,
            command,
            host_factory,
            metrics,
            share,
            heartbeat,
            load,
        );
    }
    let factory = {
        let heartbeat = Arc::clone(&heartbeat);
        let load = Arc::clone(&load);
        let host_factory = Arc::clone(host_factory);
        let limits = config.limits.clone();
        let retry = config.setup_retry_base;
        let durations = metrics.method_duration.clone();
        let evictions = metrics.vms_torn_down.clone();
        let retention = config.retention;
        move || {
            let instruments = WorkerInstruments {
                heartbeat: Arc::clone(&heartbeat),
                load: Arc::clone(&load),
                durations: durations.clone(),
                evictions: evictions.clone(),
            };
            VmWorker::new(
                host_factory(),
                limits.clone(),
                retry,
                retention,
                share.clone(),
                instruments,
            )
        }
    };
    WorkerSlot {
        addr: WorkerAddr::Thread(SyncArbiter::start(1, factory)),
        heartbeat,
        load,
        abandoned: CancellationToken::new(),
        stuck_request: Arc::new(AtomicU64::new(0)),
        permits: Arc::new(Semaphore::new(config.tasks_per_worker.max(1))),
    }
}

/// A worker in a process of its own (see `super::isolation`). Its heartbeat stays idle: the
/// process watches its own calls and reports a stuck one before it is ended.
fn spawn_process_worker(
    config: &PluginVmPoolConfig,
    command: &WorkerCommand,
    host_factory: &HostFactory,
    metrics: &PoolMetrics,
    share: BudgetShare,
    heartbeat: Arc<Heartbeat>,
    load: Arc<WorkerLoad>,
) -> WorkerSlot {
    let settings = WorkerSettings {
        limits: config.limits.clone(),
        setup_retry_base: config.setup_retry_base,
        retention: config.retention,
        index: share.index,
        workers: share.held.len(),
    };
    let instruments = ProcessInstruments {
        load: Arc::clone(&load),
        held: Arc::clone(&share.held),
        durations: metrics.method_duration.clone(),
        torn_down: metrics.vms_torn_down.clone(),
    };
    let worker = ProcessWorker::spawn(command, settings, Arc::clone(host_factory), instruments);
    WorkerSlot {
        addr: WorkerAddr::Process(worker),
        heartbeat,
        load,
        abandoned: CancellationToken::new(),
        stuck_request: Arc::new(AtomicU64::new(0)),
        permits: Arc::new(Semaphore::new(config.tasks_per_worker.max(1))),
    }
}

/// Adds what only the pool knows to a processEvent reply: PostHog's PLUGIN/ERROR entry for
/// each failed event, and the app-metric outcomes.
fn account(side: &mut SideEffects, outcomes: &[ChainOutcome], chain: &[Arc<LoadedConfig>]) {
    let config = |id: i64| chain.iter().find(|c| c.identity.plugin_config_id == id);
    for outcome in outcomes {
        for &id in &outcome.succeeded {
            if let Some(config) = config(id) {
                side.outcome(&config.identity, "processEvent", 1, false, None);
            }
        }
        for failure in &outcome.failures {
            let Some(config) = config(failure.plugin_config_id) else {
                continue;
            };
            side.outcome(
                &config.identity,
                "processEvent",
                1,
                false,
                Some(&failure.error),
            );
            side.plugin_error(
                &config.identity,
                format!("processEvent failed: {}", failure.error),
            );
        }
    }
}

/// A worker's part of a team's batch: its events, and where each was in the batch.
#[derive(Default)]
struct Share {
    positions: Vec<usize>,
    events: Vec<ChainEvent>,
}

/// The worker a team's event goes to: by its distinct id, with a hash that does not change
/// while the process runs, so that each id's events keep their order on one worker.
fn worker_of_distinct_id(team_id: i64, distinct_id: &str, workers: usize) -> usize {
    use std::hash::{Hash, Hasher};

    let mut hasher = std::hash::DefaultHasher::new();
    team_id.hash(&mut hasher);
    distinct_id.hash(&mut hasher);
    (hasher.finish() % workers.max(1) as u64) as usize
}

/// The events back from their `Arc`: free once no worker holds them, a copy if an abandoned
/// worker still does.
fn take_events(events: Arc<Vec<ChainEvent>>) -> Vec<ChainEvent> {
    Arc::try_unwrap(events).unwrap_or_else(|shared| shared.as_ref().clone())
}

fn passthrough(event: ChainEvent) -> ChainOutcome {
    ChainOutcome {
        event: Some(ChainOutput::Text(event.json)),
        succeeded: Vec::new(),
        failures: Vec::new(),
    }
}

fn fail_all(
    events: Vec<ChainEvent>,
    chain: &[Arc<LoadedConfig>],
    message: &str,
) -> Vec<ChainOutcome> {
    let labels: Vec<String> = chain
        .iter()
        .map(|c| config_label(&c.identity.plugin_name, c.identity.plugin_config_id))
        .collect();
    events
        .into_iter()
        .map(|event| ChainOutcome {
            event: Some(ChainOutput::Text(mark_failed(&event.json, &labels))),
            succeeded: Vec::new(),
            failures: chain
                .iter()
                .map(|config| EventFailure {
                    plugin_config_id: config.identity.plugin_config_id,
                    error: CallError::Thrown {
                        name: "TimeoutError".into(),
                        message: message.to_string(),
                    },
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
