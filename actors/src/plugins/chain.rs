//! The `processEvent` chain of one team, as PostHog runs it (spec 1.4), on one worker thread.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

use boa_engine::JsString;

use crate::event::envelope::parse_like_javascript;
use crate::event::{PluginEvent, Properties};

use super::runtime::plain::{Originals, Plain, text_of};
use super::runtime::vm::{CallArg, CallError, Method, PluginVm};

/// `"<plugin name> (<config id>)"`, PostHog's identifier in `$plugins_succeeded`/`$plugins_failed`.
pub fn config_label(plugin_name: &str, plugin_config_id: i64) -> String {
    format!("{plugin_name} ({plugin_config_id})")
}

/// One config's failure on one event, for `posthog_pluginconfig.error`, logs and app metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFailure {
    pub plugin_config_id: i64,
    pub error: CallError,
}

/// An event on its way into a team's processEvent chain: its JSON text, which the first VM
/// builds its objects from without a `serde_json::Value` between, and what the pool and the
/// chain read of it before any plugin runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainEvent {
    pub json: String,
    /// Which worker the event goes to (see `PluginVmPool::process_events`).
    pub distinct_id: String,
    /// The event's `team_id`, which no plugin may change.
    pub team_id: Option<Value>,
    /// The labels already in its `$plugins_succeeded` and `$plugins_failed`: those configs
    /// are skipped (an event re-ingested by `posthog.capture` or retried).
    pub ran: Vec<String>,
    /// The caller still holds the event it sent: answer with what changed
    /// ([`ChainOutput::Changes`]) where possible, rather than with the whole event's text.
    #[serde(default)]
    pub answer_with_changes: bool,
}

impl ChainEvent {
    /// The chain's view of a JSON event.
    pub fn from_value(event: &Value) -> Self {
        let properties = event.get("properties");
        let ran = Self::labels_in(LABEL_KEYS.map(|key| properties.and_then(|p| p.get(key))));
        let distinct_id = match event.get("distinct_id") {
            Some(Value::String(id)) => id.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        Self {
            json: event.to_string(),
            distinct_id,
            team_id: event.get("team_id").cloned(),
            ran,
            answer_with_changes: false,
        }
    }

    /// The labels in an event's `$plugins_succeeded` and `$plugins_failed` values (see
    /// [`LABEL_KEYS`]), for [`ChainEvent::ran`].
    pub fn labels_in(lists: [Option<&Value>; 2]) -> Vec<String> {
        lists
            .into_iter()
            .flatten()
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|label| label.as_str().map(str::to_owned))
            .collect()
    }
}

/// Where an event lists the configs that ran on it.
pub const LABEL_KEYS: [&str; 2] = ["$plugins_succeeded", "$plugins_failed"];

/// What the chain made of one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainOutcome {
    /// The event that goes on; `None`: a plugin dropped the event.
    pub event: Option<ChainOutput>,
    pub succeeded: Vec<i64>,
    pub failures: Vec<EventFailure>,
}

impl ChainOutcome {
    /// The event's text, when the chain answered with the whole event.
    pub fn text(&self) -> Option<&str> {
        match &self.event {
            Some(ChainOutput::Text(text)) => Some(text),
            _ => None,
        }
    }

    /// The event parsed, for callers that want JSON (tests, benchmarks) and asked for the
    /// whole event.
    pub fn event_value(&self) -> Option<Value> {
        self.text().and_then(|text| serde_json::from_str(text).ok())
    }
}

/// An event that goes on after the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChainOutput {
    /// The whole event as JSON text.
    Text(String),
    /// What changed, against the event the caller sent ([`ChainEvent::answer_with_changes`]).
    Changes(EventChanges),
}

/// A plugin's result as changes to the event that went in. Most plugins change a few
/// properties of an event and return it: writing every other value as JSON text, and the
/// caller parsing it all again, cost nearly as much as a small plugin's own call (issue 24).
/// Properties whose value is the primitive that went in keep the caller's text, as events
/// without plugins do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventChanges {
    /// The event's fields other than `properties`, as a JSON object's text.
    pub head: String,
    /// The properties not kept, in their order, as a JSON object's text.
    pub set: String,
    /// Each property of the result in its order: the position of a kept one among the
    /// properties that went in, or `None` for the next one of `set`.
    pub order: Vec<Option<u32>>,
}

impl EventChanges {
    /// The changes from the event whose properties went in as `originals` to `result` (an
    /// object). `None` when the result has no `properties` object, which only its whole text
    /// says.
    fn between(result: &Plain, originals: &Originals) -> Option<Self> {
        let Plain::Object(fields) = result else {
            return None;
        };
        let Some(Plain::Object(properties)) = result.get("properties") else {
            return None;
        };
        let head =
            serde_json::to_string(&Entries(fields, |_, key: &JsString| *key != "properties"))
                .ok()?;
        // Positions usually follow the input's order: look where the last match ended first.
        // A key found elsewhere is looked up by name, in an index built on the first such key,
        // so that a plugin rebuilding a wide object in another order costs one pass, not one
        // scan per key.
        let mut next = 0;
        let mut by_key: Option<HashMap<&JsString, usize>> = None;
        let mut order = Vec::with_capacity(properties.len());
        for (key, value) in properties {
            let position = if originals.get(next).is_some_and(|(k, _)| k == key) {
                Some(next)
            } else {
                by_key
                    .get_or_insert_with(|| {
                        let mut index = HashMap::with_capacity(originals.len());
                        // The first of a duplicated key, as a scan would find.
                        for (position, (k, _)) in originals.iter().enumerate().rev() {
                            index.insert(k, position);
                        }
                        index
                    })
                    .get(key)
                    .copied()
            };
            let kept = position
                .filter(|&position| originals[position].1.as_ref() == Some(value))
                .and_then(|position| u32::try_from(position).ok());
            if let Some(position) = kept {
                next = position as usize + 1;
            }
            order.push(kept);
        }
        let set = serde_json::to_string(&Entries(properties, |n: usize, _: &JsString| {
            order[n].is_none()
        }))
        .ok()?;
        Some(Self { head, set, order })
    }

    /// Makes `event`, whose properties went into the chain, what the chain answered. On error
    /// (a head that is not an event, or changes that do not fit) `event` stays as it was.
    pub fn apply(self, event: &mut PluginEvent) -> Result<(), String> {
        let head: Head<'_> = serde_json::from_str(&self.head).map_err(|error| error.to_string())?;
        let set: Properties = serde_json::from_str(&self.set).map_err(|error| error.to_string())?;
        let properties = std::mem::take(&mut event.properties);
        match properties.rebuild(&self.order, set) {
            Ok(properties) => {
                head.assign(event);
                event.properties = properties;
                Ok(())
            }
            Err((properties, error)) => {
                event.properties = properties;
                Err(error)
            }
        }
    }
}

/// An answer's head: [`PluginEvent`]'s fields but `properties`, read as `PluginEvent` reads
/// them, borrowing its text. Most plugins leave these fields alone, and a field equal to the
/// event's keeps the event's string instead of a new copy of the same text.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    distinct_id: Cow<'a, str>,
    #[serde(borrow)]
    ip: Option<Cow<'a, str>>,
    #[serde(borrow)]
    site_url: Option<Cow<'a, str>>,
    #[serde(default)]
    team_id: i64,
    #[serde(borrow)]
    now: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    sent_at: Option<Cow<'a, str>>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    offset: Option<Value>,
    #[serde(borrow)]
    uuid: Cow<'a, str>,
    #[serde(rename = "$set", default)]
    set: Option<Map<String, Value>>,
    #[serde(rename = "$set_once", default)]
    set_once: Option<Map<String, Value>>,
}

impl Head<'_> {
    /// Makes `event`'s fields but `properties` these.
    fn assign(self, event: &mut PluginEvent) {
        fn text(value: Cow<'_, str>, into: &mut String) {
            if *into != *value {
                *into = value.into_owned();
            }
        }
        fn optional_text(value: Option<Cow<'_, str>>, into: &mut Option<String>) {
            if into.as_deref() != value.as_deref() {
                *into = value.map(Cow::into_owned);
            }
        }
        text(self.distinct_id, &mut event.distinct_id);
        optional_text(self.ip, &mut event.ip);
        optional_text(self.site_url, &mut event.site_url);
        event.team_id = self.team_id;
        text(self.now, &mut event.now);
        text(self.event, &mut event.event);
        optional_text(self.sent_at, &mut event.sent_at);
        event.timestamp = self.timestamp;
        event.offset = self.offset;
        text(self.uuid, &mut event.uuid);
        event.set = self.set;
        event.set_once = self.set_once;
    }
}

/// The entries of an object that `wanted` picks (by position and key), serialized as an
/// object.
struct Entries<'a, F>(&'a [(JsString, Plain)], F);

impl<F: Fn(usize, &JsString) -> bool> Serialize for Entries<'_, F> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (n, (key, value)) in self.0.iter().enumerate() {
            if (self.1)(n, key) {
                map.serialize_entry(&*text_of(key), value)?;
            }
        }
        map.end()
    }
}

/// A step of the chain: the VM and its label. `None` when the config could not be loaded or
/// set up; the chain then goes on without it, as PostHog does once it disabled the config.
pub struct ChainStep<'a> {
    pub label: &'a str,
    pub plugin_config_id: i64,
    pub vm: &'a mut PluginVm,
}

/// Runs `input` through `steps` in order. A throw keeps the last good event and goes on; a
/// missing result drops the event at once; a config already listed in the event's
/// `$plugins_succeeded`/`$plugins_failed` is skipped. `unavailable` are the labels of configs
/// that could not be made ready: they are listed as failed. The first VM builds the event
/// from its text; between steps it stays a [`Plain`] value, which each VM builds its own
/// objects from; it becomes text again once, at the end: the changes against the input when
/// the caller asked for them ([`EventChanges`]), or else the whole event (the input's text is
/// kept when no plugin returned an event and there is nothing to list). Each call's effects
/// come back with the id of the config that made them.
pub fn run_chain(
    input: &ChainEvent,
    steps: &mut [ChainStep<'_>],
    unavailable: &[String],
) -> (ChainOutcome, Vec<(i64, super::runtime::CallEffects)>) {
    let mut succeeded_labels = Vec::new();
    let mut failed_labels = Vec::new();
    let mut outcome = ChainOutcome {
        event: None,
        succeeded: Vec::new(),
        failures: Vec::new(),
    };
    let mut effects = Vec::new();
    // `None` while no plugin has returned an event: the input is still the event.
    let mut event: Option<Plain> = None;
    // The input's properties as the first VM built them, to answer with changes.
    let originals: RefCell<Option<Originals>> = RefCell::new(None);

    for step in steps.iter_mut() {
        let ran = match &event {
            Some(plain) => already_ran(plain, step.label),
            None => input.ran.iter().any(|label| label == step.label),
        };
        if ran {
            continue;
        }
        let argument = match &event {
            Some(plain) => CallArg::Plain(plain),
            None if input.answer_with_changes => CallArg::Event(&input.json, &originals),
            None => CallArg::Text(&input.json),
        };
        let (result, call_effects) = call_process_event(step.vm, argument);
        effects.push((step.plugin_config_id, call_effects));
        match result {
            Ok(Some(next)) if next.is_object() => {
                if next.get("team_id").map(Plain::to_json) != input.team_id {
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
    failed_labels.extend(unavailable.iter().cloned());
    let labelled = !succeeded_labels.is_empty() || !failed_labels.is_empty();
    outcome.event = Some(match event {
        None if !labelled => ChainOutput::Text(input.json.clone()),
        None => ChainOutput::Text(with_labels(&input.json, &succeeded_labels, &failed_labels)),
        Some(mut event) => {
            if labelled {
                event.append_labels(LABEL_KEYS[0], &succeeded_labels);
                event.append_labels(LABEL_KEYS[1], &failed_labels);
            }
            let changes = originals
                .into_inner()
                .and_then(|originals| EventChanges::between(&event, &originals));
            match changes {
                Some(changes) => ChainOutput::Changes(changes),
                // Writing JSON data cannot fail; were it to, the last event that was text
                // goes on.
                None => ChainOutput::Text(
                    serde_json::to_string(&event).unwrap_or_else(|_| input.json.clone()),
                ),
            }
        }
    });
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
        CallArg::Text(text) | CallArg::Event(text, _) => match parse_repairing(text) {
            Ok(value) => Plain::Array(vec![Plain::from_json(&value)]),
            Err(error) => return (Err(CallError::unreadable(&error)), Default::default()),
        },
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

fn already_ran(event: &Plain, label: &str) -> bool {
    let Some(properties) = event.get("properties") else {
        return false;
    };
    LABEL_KEYS.iter().any(|key| {
        matches!(properties.get(key), Some(Plain::Array(list))
            if list.iter().any(|l| matches!(l, Plain::String(s) if *s == label)))
    })
}

/// The event's text with `labels` listed in its `$plugins_failed` (every config failed
/// without running).
pub fn mark_failed(json: &str, labels: &[String]) -> String {
    with_labels(json, &[], labels)
}

/// The event's text with the labels added and its other values exactly as they were (numbers
/// included: no plugin touched them). Text that is not JSON goes on as it is; its plugins'
/// failures are recorded on their own.
fn with_labels(json: &str, succeeded: &[String], failed: &[String]) -> String {
    let Ok(mut event) = parse_repairing(json) else {
        return json.to_owned();
    };
    append_labels(&mut event, LABEL_KEYS[0], succeeded);
    append_labels(&mut event, LABEL_KEYS[1], failed);
    serde_json::to_string(&event).unwrap_or_else(|_| json.to_owned())
}

/// Event text as JSON, read as JavaScript would (raw property text keeps what the client sent,
/// which JSON.parse may take and serde not).
fn parse_repairing(json: &str) -> Result<Value, serde_json::Error> {
    parse_like_javascript(json, |text| serde_json::from_str::<Value>(text))
}

/// As [`Plain::append_labels`], on JSON.
fn append_labels(event: &mut Value, key: &str, labels: &[String]) {
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
        list.extend(labels.iter().cloned().map(Value::String));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Every field but `properties` set, so that a field `Head` misses shows.
    fn full_event() -> PluginEvent {
        PluginEvent {
            distinct_id: "d\u{e9}".to_owned(),
            ip: Some("10.0.0.1".to_owned()),
            site_url: Some("https://example.com".to_owned()),
            team_id: 7,
            now: "2024-01-01T00:00:00Z".to_owned(),
            event: "changed \"name\"".to_owned(),
            sent_at: Some("2024-01-01T00:00:01Z".to_owned()),
            properties: Properties::from(json!({"a": 1}).as_object().cloned().unwrap()),
            timestamp: Some(json!("2024-01-01T00:00:02Z")),
            offset: Some(json!(5)),
            uuid: "017ef865-19da-0000-3b60-1506093bf40f".to_owned(),
            set: Some(json!({"s": 1}).as_object().cloned().unwrap()),
            set_once: Some(json!({"o": 2}).as_object().cloned().unwrap()),
        }
    }

    fn head_of(event: &PluginEvent) -> String {
        let mut value = serde_json::to_value(event).unwrap();
        value.as_object_mut().unwrap().remove("properties");
        value.to_string()
    }

    #[test]
    fn a_head_sets_every_field_but_the_properties() {
        let answer = full_event();
        let mut event = PluginEvent::for_test("before", json!({"a": 1}));
        EventChanges {
            head: head_of(&answer),
            set: "{}".to_owned(),
            order: vec![Some(0)],
        }
        .apply(&mut event)
        .unwrap();
        assert_eq!(event, answer);

        // Fields the answer lacks are gone, as when the whole text is parsed.
        let mut bare = full_event();
        let head = json!({"distinct_id": "x", "now": "n", "event": "e", "uuid": "u"});
        EventChanges {
            head: head.to_string(),
            set: "{}".to_owned(),
            order: vec![Some(0)],
        }
        .apply(&mut bare)
        .unwrap();
        let mut whole = head;
        whole["properties"] = json!({"a": 1});
        assert_eq!(bare, serde_json::from_value::<PluginEvent>(whole).unwrap());
    }

    #[test]
    fn a_head_that_is_no_event_changes_nothing() {
        let mut event = full_event();
        for head in [
            r#"{"now":"n","event":"e","uuid":"u"}"#,
            r#"{"distinct_id":1}"#,
            "[]",
        ] {
            let error = EventChanges {
                head: head.to_owned(),
                set: "{}".to_owned(),
                order: vec![Some(0)],
            }
            .apply(&mut event)
            .unwrap_err();
            assert!(!error.is_empty());
            assert_eq!(event, full_event(), "{head}");
        }
    }
}
