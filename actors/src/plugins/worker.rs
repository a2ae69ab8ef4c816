//! `VmWorker`: one thread of the plugin VM pool (a one-thread actix `SyncArbiter`). It owns the
//! VMs of the teams routed to it, builds each lazily on first use, runs `setupPlugin` before
//! the first call, and rebuilds a VM when its config changes or a call left it poisoned.
//!
//! Receives: `ProcessEvents` and `TeardownAll` from the `PluginVmPool`.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::Utc;
use serde_json::Value;

use super::chain::{ChainOutcome, ChainStep, EventFailure, config_label, mark_failed, run_chain};
use super::host::{Heartbeat, PluginHost, WorkerInstruments, install_instruments};
use super::vm::{CallEffects, CallError, CapturedByPlugin, Method, PluginVm, VmIdentity, VmLimits};
use super::{LoadedConfig, LogLevel, LogSource, PluginLogEntry};

/// PostHog retries a setupPlugin that throws RetryError this many times in all.
const SETUP_ATTEMPTS: u32 = 5;

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
    pub events: Arc<Vec<Value>>,
}

/// Run `teardownPlugin` on every VM that ran its setup, and drop them all (shutdown).
#[derive(Message)]
#[rtype(result = "WorkerReply<()>")]
pub struct TeardownAll;

/// A reply and what the calls produced on the side.
#[derive(Debug, Default)]
pub struct WorkerReply<T> {
    pub value: T,
    pub side: SideEffects,
}

/// Log entries, captured events and config failures, for the pool to pass on.
#[derive(Debug, Default)]
pub struct SideEffects {
    pub logs: Vec<PluginLogEntry>,
    pub captures: Vec<(VmIdentity, CapturedByPlugin)>,
    /// Configs that failed to load or set up: PostHog records the error and disables them.
    pub config_errors: Vec<(VmIdentity, String)>,
    /// Per call outcomes, for app metrics (filled by the pool, which knows the categories).
    pub outcomes: Vec<crate::plugins::telemetry::MethodOutcome>,
}

impl SideEffects {
    fn absorb(&mut self, identity: &VmIdentity, effects: CallEffects) {
        self.logs.extend(effects.logs);
        self.captures
            .extend(effects.captures.into_iter().map(|c| (identity.clone(), c)));
    }

    fn system_log(&mut self, identity: &VmIdentity, level: LogLevel, message: String) {
        self.logs.push(PluginLogEntry {
            plugin_config_id: identity.plugin_config_id,
            plugin_id: identity.plugin_id,
            team_id: identity.team_id,
            timestamp: Utc::now(),
            source: LogSource::System,
            level,
            message,
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
    Failed(String),
}

struct Slot {
    version: String,
    vm: Option<PluginVm>,
    setup: SetupState,
}

pub struct VmWorker {
    heartbeat: Arc<Heartbeat>,
    host: Rc<dyn PluginHost>,
    limits: VmLimits,
    setup_retry_base: Duration,
    slots: HashMap<i64, Slot>,
}

impl VmWorker {
    /// Builds the worker on its own thread, where its VMs will live.
    pub fn new(
        host: Rc<dyn PluginHost>,
        limits: VmLimits,
        setup_retry_base: Duration,
        instruments: WorkerInstruments,
    ) -> Self {
        let heartbeat = Arc::clone(&instruments.heartbeat);
        install_instruments(instruments);
        Self {
            heartbeat,
            host,
            limits,
            setup_retry_base,
            slots: HashMap::new(),
        }
    }

    /// Makes the config's VM ready to call: built, current, and set up.
    fn ready(&mut self, config: &LoadedConfig, side: &mut SideEffects) -> Result<(), String> {
        let identity = &config.identity;
        let stale = self
            .slots
            .get(&identity.plugin_config_id)
            .is_some_and(|slot| slot.version != config.version);
        if stale && let Some(slot) = self.slots.remove(&identity.plugin_config_id) {
            self.teardown(slot, side);
        }
        let slot = self
            .slots
            .entry(identity.plugin_config_id)
            .or_insert_with(|| Slot {
                version: config.version.clone(),
                vm: None,
                setup: SetupState::NotRun,
            });
        if let SetupState::Failed(error) = &slot.setup {
            return Err(error.clone());
        }
        if slot.vm.is_none() {
            match PluginVm::load(
                identity.clone(),
                &config.source,
                &config.config,
                &config.attachments,
                self.limits.clone(),
                self.host.clone(),
            ) {
                Ok((vm, effects)) => {
                    side.absorb(identity, effects);
                    slot.vm = Some(vm);
                }
                Err(error) => {
                    let message = error.to_string();
                    let log = format!("Plugin failed to load: {message}");
                    return Err(disable(slot, side, identity, log, message));
                }
            }
        }
        let attempts = match slot.setup {
            SetupState::Done => return Ok(()),
            SetupState::RetryAt { at, attempts } if Instant::now() < at => {
                return Err(format!(
                    "setupPlugin is being retried (attempt {attempts} of {SETUP_ATTEMPTS} failed)"
                ));
            }
            SetupState::RetryAt { attempts, .. } => attempts,
            SetupState::NotRun | SetupState::Failed(_) => 0,
        };
        let Some(vm) = slot.vm.as_mut() else {
            return Err("the VM is missing".into());
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
                Err(format!("setupPlugin failed: {error}"))
            }
            Err(error) => {
                let message = format!("setupPlugin failed: {error}");
                let log = format!("{message}; the plugin is disabled");
                // A VM that failed its setup reports no methods (PostHog); drop it.
                slot.vm = None;
                Err(disable(slot, side, identity, log, message))
            }
        }
    }

    fn teardown(&mut self, slot: Slot, side: &mut SideEffects) {
        if let (Some(mut vm), SetupState::Done) = (slot.vm, slot.setup) {
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
    }

    fn process(
        &mut self,
        chain: &[Arc<LoadedConfig>],
        events: &[Value],
    ) -> WorkerReply<Vec<ChainOutcome>> {
        let mut side = SideEffects::default();
        // Configs that could not be made ready fail every event of this batch, so that the
        // event records it in `$plugins_failed` rather than silently missing the plugin.
        let mut unavailable: Vec<(usize, String)> = Vec::new();
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
        let unavailable_labels: Vec<&String> =
            unavailable.iter().map(|(i, _)| &labels[*i]).collect();

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
            let (mut outcome, effects) = run_chain(event, &mut steps);
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
            if !unavailable_labels.is_empty()
                && let Some(event) = outcome.event.as_mut()
            {
                mark_failed(
                    event,
                    unavailable_labels.iter().map(|l| (*l).clone()).collect(),
                );
            }
            for (index, error) in &unavailable {
                outcome.failures.push(EventFailure {
                    plugin_config_id: chain[*index].identity.plugin_config_id,
                    error: CallError::Thrown {
                        name: "Error".into(),
                        message: error.clone(),
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

/// Disables a config for good (until its next version): logs why, records the error for
/// `posthog_pluginconfig`, and fails every later call with `message`, which it returns.
fn disable(
    slot: &mut Slot,
    side: &mut SideEffects,
    identity: &VmIdentity,
    log: String,
    message: String,
) -> String {
    side.system_log(identity, LogLevel::Error, log);
    side.config_errors.push((identity.clone(), message.clone()));
    slot.setup = SetupState::Failed(message.clone());
    message
}

impl Actor for VmWorker {
    type Context = SyncContext<Self>;
}

impl Handler<ProcessEvents> for VmWorker {
    type Result = MessageResult<ProcessEvents>;

    fn handle(&mut self, message: ProcessEvents, _: &mut Self::Context) -> Self::Result {
        self.heartbeat.set_request(message.request_id);
        MessageResult(self.process(&message.chain, &message.events))
    }
}

impl Handler<TeardownAll> for VmWorker {
    type Result = MessageResult<TeardownAll>;

    fn handle(&mut self, _: TeardownAll, _: &mut Self::Context) -> Self::Result {
        let mut side = SideEffects::default();
        for (_, slot) in std::mem::take(&mut self.slots) {
            self.teardown(slot, &mut side);
        }
        MessageResult(WorkerReply { value: (), side })
    }
}
