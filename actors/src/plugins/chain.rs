//! The `processEvent` chain of one team, as PostHog runs it (spec 1.4), on one worker thread.

use serde_json::{Map, Value};

use super::runtime::plain::Plain;
use super::runtime::vm::{CallArg, CallError, Method, PluginVm};

/// `"<plugin name> (<config id>)"`, PostHog's identifier in `$plugins_succeeded`/`$plugins_failed`.
pub fn config_label(plugin_name: &str, plugin_config_id: i64) -> String {
    format!("{plugin_name} ({plugin_config_id})")
}

/// One config's failure on one event, for `posthog_pluginconfig.error`, logs and app metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct EventFailure {
    pub plugin_config_id: i64,
    pub error: CallError,
}

/// What the chain made of one event.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainOutcome {
    /// `None`: a plugin dropped the event.
    pub event: Option<Value>,
    pub succeeded: Vec<i64>,
    pub failures: Vec<EventFailure>,
}

/// A step of the chain: the VM and its label. `None` when the config could not be loaded or
/// set up; the chain then goes on without it, as PostHog does once it disabled the config.
pub struct ChainStep<'a> {
    pub label: &'a str,
    pub plugin_config_id: i64,
    pub vm: &'a mut PluginVm,
}

/// Runs `event` through `steps` in order. A throw keeps the last good event and goes on; a
/// missing result drops the event at once; a config already listed in the event's
/// `$plugins_succeeded`/`$plugins_failed` (an event re-ingested by `posthog.capture` or a
/// retry) is skipped. Between steps the event stays a [`Plain`] value, which each VM builds
/// its own objects from; it becomes JSON once, at the end (the input is copied only when no
/// plugin returned a new event). Each call's effects come back with the id of the config that
/// made them.
pub fn run_chain(
    input: &Value,
    steps: &mut [ChainStep<'_>],
) -> (ChainOutcome, Vec<(i64, super::runtime::CallEffects)>) {
    let mut succeeded_labels = Vec::new();
    let mut failed_labels = Vec::new();
    let mut outcome = ChainOutcome {
        event: None,
        succeeded: Vec::new(),
        failures: Vec::new(),
    };
    let mut effects = Vec::new();
    let original_team = input.get("team_id");
    // `None` while no plugin has returned an event: the input is still the event.
    let mut event: Option<Plain> = None;

    for step in steps.iter_mut() {
        let ran = match &event {
            Some(plain) => already_ran_plain(plain, step.label),
            None => already_ran(input, step.label),
        };
        if ran {
            continue;
        }
        let argument = match &event {
            Some(plain) => CallArg::Plain(plain),
            None => CallArg::Json(input),
        };
        let (result, call_effects) = call_process_event(step.vm, argument);
        effects.push((step.plugin_config_id, call_effects));
        match result {
            Ok(Some(next)) if next.is_object() => {
                if next.get("team_id").map(Plain::to_json).as_ref() != original_team {
                    // Changing team_id is undone and counts as a throw (spec 1.4).
                    failed_labels.push(step.label.to_owned());
                    outcome.failures.push(EventFailure {
                        plugin_config_id: step.plugin_config_id,
                        error: CallError::Thrown {
                            name: "Error".into(),
                            message: "processEvent may not change team_id".into(),
                        },
                    });
                    continue;
                }
                event = Some(next);
                succeeded_labels.push(step.label.to_owned());
                outcome.succeeded.push(step.plugin_config_id);
            }
            Ok(None) => return (outcome, effects),
            Ok(Some(other)) => {
                failed_labels.push(step.label.to_owned());
                outcome.failures.push(EventFailure {
                    plugin_config_id: step.plugin_config_id,
                    error: CallError::Thrown {
                        name: "TypeError".into(),
                        message: format!(
                            "processEvent returned {} instead of an event",
                            other.type_name()
                        ),
                    },
                });
            }
            Err(error) => {
                failed_labels.push(step.label.to_owned());
                outcome.failures.push(EventFailure {
                    plugin_config_id: step.plugin_config_id,
                    error,
                });
            }
        }
    }
    let mut event = event.map_or_else(|| input.clone(), |plain| plain.to_json());
    if !succeeded_labels.is_empty() || !failed_labels.is_empty() {
        append_labels(&mut event, "$plugins_succeeded", succeeded_labels);
        append_labels(&mut event, "$plugins_failed", failed_labels);
    }
    outcome.event = Some(event);
    (outcome, effects)
}

/// processEvent, or processEventBatch given a single event (plugin-compat point 1).
fn call_process_event(
    vm: &mut PluginVm,
    event: CallArg<'_>,
) -> (
    Result<Option<Plain>, CallError>,
    super::runtime::CallEffects,
) {
    if vm.has(Method::ProcessEvent) {
        return vm.call_plain(Method::ProcessEvent, &[event]);
    }
    let batch = match event {
        CallArg::Json(value) => Plain::Array(vec![Plain::from_json(value)]),
        CallArg::Plain(plain) => Plain::Array(vec![plain.clone()]),
    };
    let (result, effects) = vm.call_plain(Method::ProcessEventBatch, &[CallArg::Plain(&batch)]);
    let result = result.map(|out| match out {
        Some(Plain::Array(mut events)) if !events.is_empty() => {
            Some(events.swap_remove(0)).filter(|e| *e != Plain::Null)
        }
        _ => None,
    });
    (result, effects)
}

fn already_ran(event: &Value, label: &str) -> bool {
    let Some(properties) = event.get("properties") else {
        return false;
    };
    ["$plugins_succeeded", "$plugins_failed"].iter().any(|key| {
        properties
            .get(*key)
            .and_then(Value::as_array)
            .is_some_and(|list| list.iter().any(|l| l.as_str() == Some(label)))
    })
}

fn already_ran_plain(event: &Plain, label: &str) -> bool {
    let Some(properties) = event.get("properties") else {
        return false;
    };
    ["$plugins_succeeded", "$plugins_failed"].iter().any(|key| {
        matches!(properties.get(key), Some(Plain::Array(list))
            if list.iter().any(|l| matches!(l, Plain::String(s) if *s == label)))
    })
}

/// Lists `labels` in the event's `$plugins_failed` (every config failed without running).
pub fn mark_failed(event: &mut Value, labels: Vec<String>) {
    append_labels(event, "$plugins_succeeded", Vec::new());
    append_labels(event, "$plugins_failed", labels);
}

fn append_labels(event: &mut Value, key: &str, labels: Vec<String>) {
    let Some(object) = event.as_object_mut() else {
        return;
    };
    let properties = object
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()));
    if !properties.is_object() {
        *properties = Value::Object(Map::new());
    }
    let Some(properties) = properties.as_object_mut() else {
        return;
    };
    let list = properties
        .entry(key)
        .or_insert_with(|| Value::Array(Vec::new()));
    if !list.is_array() {
        *list = Value::Array(Vec::new());
    }
    if let Some(list) = list.as_array_mut() {
        list.extend(labels.into_iter().map(Value::String));
    }
}
