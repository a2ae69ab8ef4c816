//! What plugins see and produce after an event is stored (spec 1.11): the event as `onEvent`,
//! `exportEvents` and `composeWebhook` receive it, the export buffer's settings, the webhook a
//! plugin composed, and the retries that `RetryError` asks for.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::EventRow;
use crate::event::elements::chain_to_elements;
use crate::event::js::to_js_string;
use crate::plugins::runtime::natives::FetchRequest;

/// onEvent: PostHog's 5 attempts in all, 5 s × 2ⁿ⁻¹ apart.
pub const ON_EVENT_ATTEMPTS: u32 = 5;
pub const ON_EVENT_RETRY_BASE: Duration = Duration::from_secs(5);
/// exportEvents: 3 retries after the first attempt, 6, 12 and 24 s later.
pub const EXPORT_RETRIES: u32 = 3;
pub const EXPORT_RETRY_BASE: Duration = Duration::from_secs(6);

/// PostHog's `ProcessedPluginEvent`, built from a stored row:
/// `{distinct_id, ip, team_id, event, properties, timestamp, $set, $set_once, uuid, elements}`.
pub fn processed_event(row: &EventRow) -> Value {
    let properties: Value = serde_json::from_str(&row.properties)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Map::new()));
    let mut event = Map::new();
    event.insert("distinct_id".into(), Value::String(row.distinct_id.clone()));
    event.insert(
        "ip".into(),
        properties.get("$ip").cloned().unwrap_or(Value::Null),
    );
    event.insert("team_id".into(), Value::from(row.team_id));
    event.insert("event".into(), Value::String(row.event.clone()));
    let set = properties.get("$set").cloned();
    let set_once = properties.get("$set_once").cloned();
    event.insert("properties".into(), properties);
    event.insert(
        "timestamp".into(),
        Value::String(row.timestamp.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    if let Some(set) = set {
        event.insert("$set".into(), set);
    }
    if let Some(set_once) = set_once {
        event.insert("$set_once".into(), set_once);
    }
    event.insert("uuid".into(), Value::String(row.uuid.to_string()));
    event.insert(
        "elements".into(),
        Value::Array(chain_to_elements(&row.elements_chain)),
    );
    Value::Object(event)
}

/// Stored events on their way to `onEvent`, `composeWebhook` and `exportEvents`, with each
/// event's person properties (by position) when a config's webhook filters may test them.
/// Retries carry none: they are for onEvent and exportEvents only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredEvents {
    pub events: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub person_properties: Vec<Value>,
}

impl From<Vec<Value>> for StoredEvents {
    fn from(events: Vec<Value>) -> Self {
        Self {
            events,
            person_properties: Vec::new(),
        }
    }
}

impl StoredEvents {
    /// Adds a stored row; its person properties only `with_persons`.
    pub fn push(&mut self, row: &EventRow, with_persons: bool) {
        self.events.push(processed_event(row));
        if with_persons {
            let properties = serde_json::from_str::<Value>(&row.person_properties)
                .ok()
                .filter(Value::is_object)
                .unwrap_or(Value::Null);
            self.person_properties.push(properties);
        }
    }
}

/// The post-ingestion methods that `RetryError` can send back through the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AsyncMethod {
    OnEvent,
    ExportEvents,
}

impl AsyncMethod {
    pub fn category(self) -> &'static str {
        match self {
            Self::OnEvent => "onEvent",
            Self::ExportEvents => "exportEvents",
        }
    }
}

/// Run only this config's method on the events: a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncTarget {
    pub plugin_config_id: i64,
    pub method: AsyncMethod,
    /// Attempts already made.
    pub attempt: u32,
}

/// A call that threw `RetryError` and has attempts left: to be delivered again after `delay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AsyncRetry {
    pub team_id: i64,
    pub target: AsyncTarget,
    pub events: Vec<Value>,
    pub delay: Duration,
}

/// A plugin config's `exportEventsBufferBytes`, `exportEventsBufferSeconds` and
/// `exportEventsToIgnore` (strings in PostHog's config forms), within PostHog's bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    pub max_bytes: usize,
    pub max_age: Duration,
    pub ignore: HashSet<String>,
}

impl ExportSettings {
    pub fn from_config(config: &Value) -> Self {
        let number = |key: &str| {
            config
                .get(key)
                .map(to_js_string)
                .and_then(|text| text.trim().parse::<f64>().ok())
                .filter(|n| n.is_finite())
        };
        let max_bytes = number("exportEventsBufferBytes").map_or(1024 * 1024, |n| {
            n.clamp(1.0, 100.0 * 1024.0 * 1024.0) as usize
        });
        let max_age = number("exportEventsBufferSeconds").map_or(Duration::from_secs(10), |n| {
            Duration::from_secs_f64(n.clamp(1.0, 600.0))
        });
        let ignore = config
            .get("exportEventsToIgnore")
            .map(to_js_string)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect();
        Self {
            max_bytes,
            max_age,
            ignore,
        }
    }
}

/// Events waiting for one config's `exportEvents`.
#[derive(Debug, Default)]
pub struct ExportBuffer {
    events: Vec<Value>,
    bytes: usize,
    oldest: Option<Instant>,
}

impl ExportBuffer {
    /// Adds the event unless its name is ignored; returns whether the buffer is now full.
    pub fn push(&mut self, event: &Value, settings: &ExportSettings) -> bool {
        let name = event.get("event").and_then(Value::as_str).unwrap_or("");
        if settings.ignore.contains(name) {
            return false;
        }
        self.bytes += serde_json::to_string(event).map_or(0, |text| text.len());
        self.events.push(event.clone());
        self.oldest.get_or_insert_with(Instant::now);
        self.bytes >= settings.max_bytes
    }

    pub fn is_due(&self, settings: &ExportSettings, now: Instant) -> bool {
        self.oldest
            .is_some_and(|oldest| now.duration_since(oldest) >= settings.max_age)
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn take(&mut self) -> Vec<Value> {
        self.bytes = 0;
        self.oldest = None;
        std::mem::take(&mut self.events)
    }
}

/// Why a `composeWebhook` result describes no request; the plugin's call counts as failed
/// with a TypeError.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("composeWebhook returned no url")]
    NoUrl,
}

/// The request a `composeWebhook` result describes: `{url, method?, body?, headers?}`. A body
/// that is not a string is sent as JSON (node-fetch would have sent `[object Object]`).
pub fn webhook_request(webhook: &Value) -> Result<FetchRequest, WebhookError> {
    let url = webhook
        .get("url")
        .and_then(Value::as_str)
        .filter(|url| !url.is_empty())
        .ok_or(WebhookError::NoUrl)?;
    let method = webhook
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("POST")
        .to_ascii_uppercase();
    let body = match webhook.get("body") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => Some(other.to_string()),
    };
    let headers: BTreeMap<String, String> = match webhook.get("headers") {
        Some(Value::Object(headers)) => headers
            .iter()
            .map(|(name, value)| (name.clone(), to_js_string(value)))
            .collect(),
        _ => BTreeMap::from([("Content-Type".to_owned(), "application/json".to_owned())]),
    };
    Ok(FetchRequest {
        url: url.to_owned(),
        method,
        headers,
        body,
        timeout: None,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn row() -> EventRow {
        let at = Utc
            .with_ymd_and_hms(2020, 2, 23, 2, 15, 0)
            .single()
            .expect("time");
        EventRow {
            uuid: Uuid::nil(),
            event: "$autocapture".into(),
            timestamp: at,
            distinct_id: "d1".into(),
            elements_chain: "div:nth-child=\"1\"nth-of-type=\"2\"text=\"💻\"".into(),
            created_at: at,
            person_created_at: at,
            group_created_at: [at; 5],
            ..EventRow::for_test(&json!({"$ip": "1.2.3.4", "$set": {"a": 1}, "x": "y"}).to_string())
        }
    }

    #[test]
    fn processed_event_has_posthogs_shape() {
        let event = processed_event(&row());
        assert_eq!(
            event,
            json!({
                "distinct_id": "d1", "ip": "1.2.3.4", "team_id": 2, "event": "$autocapture",
                "properties": {"$ip": "1.2.3.4", "$set": {"a": 1}, "x": "y"},
                "timestamp": "2020-02-23T02:15:00.000Z", "$set": {"a": 1},
                "uuid": "00000000-0000-0000-0000-000000000000",
                "elements": [{"attributes": {}, "order": 0, "tag_name": "div", "nth_child": 1,
                              "nth_of_type": 2, "text": "💻", "$el_text": "💻"}],
            })
        );
        let keys: Vec<&String> = event.as_object().expect("object").keys().collect();
        assert_eq!(
            keys,
            [
                "distinct_id",
                "ip",
                "team_id",
                "event",
                "properties",
                "timestamp",
                "$set",
                "uuid",
                "elements"
            ]
        );
    }

    #[test]
    fn export_settings_follow_posthogs_bounds() {
        let defaults = ExportSettings::from_config(&json!({}));
        assert_eq!(defaults.max_bytes, 1024 * 1024);
        assert_eq!(defaults.max_age, Duration::from_secs(10));
        assert!(defaults.ignore.is_empty());
        let set = ExportSettings::from_config(&json!({
            "exportEventsBufferBytes": "0", "exportEventsBufferSeconds": "9999",
            "exportEventsToIgnore": "$feature_flag_called, $pageleave,,"
        }));
        assert_eq!(set.max_bytes, 1);
        assert_eq!(set.max_age, Duration::from_secs(600));
        assert_eq!(
            set.ignore,
            HashSet::from(["$feature_flag_called".to_owned(), "$pageleave".to_owned()])
        );
    }

    #[test]
    fn the_buffer_fills_by_bytes_and_skips_ignored_names() {
        let settings = ExportSettings {
            max_bytes: 60,
            max_age: Duration::from_secs(10),
            ignore: HashSet::from(["skip".to_owned()]),
        };
        let mut buffer = ExportBuffer::default();
        assert!(!buffer.push(&json!({"event": "skip"}), &settings));
        assert!(buffer.is_empty());
        assert!(!buffer.push(&json!({"event": "a", "p": "0123456789"}), &settings));
        assert!(!buffer.is_due(&settings, Instant::now()));
        assert!(buffer.is_due(&settings, Instant::now() + Duration::from_secs(11)));
        assert!(buffer.push(&json!({"event": "b", "p": "0123456789"}), &settings));
        assert_eq!(buffer.take().len(), 2);
        assert!(
            buffer.is_empty()
                && !buffer.is_due(&settings, Instant::now() + Duration::from_secs(11))
        );
    }

    #[test]
    fn webhooks_default_to_a_json_post() {
        let request =
            webhook_request(&json!({"url": "http://x/hook", "body": {"a": 1}})).expect("request");
        assert_eq!(request.method, "POST");
        assert_eq!(request.body.as_deref(), Some("{\"a\":1}"));
        assert_eq!(request.headers["Content-Type"], "application/json");
        let request = webhook_request(
            &json!({"url": "http://x", "method": "put", "body": "raw", "headers": {"X-A": 1}}),
        )
        .expect("request");
        assert_eq!(request.method, "PUT");
        assert_eq!(request.body.as_deref(), Some("raw"));
        assert_eq!(request.headers.get("X-A").map(String::as_str), Some("1"));
        assert!(webhook_request(&json!({"body": "x"})).is_err());
    }
}
