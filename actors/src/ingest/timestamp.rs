//! When an event happened (spec 1.6, PostHog's `timestamps.ts`).
//!
//! Clients lie about time: their clocks drift and mobile SDKs send events long after they
//! happened. Only `now`, set by the capture endpoint, is trusted; the client's `timestamp`,
//! `sent_at` and `offset` are used relative to it.

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{Value, json};

use crate::event::iso8601::parse_iso8601;
use crate::event::js::is_truthy;
use crate::event::{IngestionWarning, PluginEvent};

/// PostHog's `ignored_invalid_timestamp` warning: a client time could not be used.
pub const WARNING_IGNORED_INVALID_TIMESTAMP: &str = "ignored_invalid_timestamp";
/// PostHog's `event_timestamp_in_future` warning: the computed time was too far ahead.
pub const WARNING_EVENT_TIMESTAMP_IN_FUTURE: &str = "event_timestamp_in_future";

/// Events computed to be further ahead of `now` than this are instrumentation bugs; they are
/// stored at `now` instead (PostHog's `FutureEventHoursCutoffMillis`).
const FUTURE_EVENT_CUTOFF: TimeDelta = TimeDelta::hours(23);

/// The time of the event, as PostHog's `parseEventTimestamp` computes it. Each client time
/// that had to be ignored adds a warning for the event's team.
pub fn parse_event_timestamp(
    event: &PluginEvent,
    warnings: &mut Vec<IngestionWarning>,
) -> DateTime<Utc> {
    // `now` comes from the capture endpoint; should it be broken anyway, the ingestion time
    // is the closest trustworthy substitute.
    let now = parse_iso8601(&event.now).unwrap_or_else(Utc::now);

    let sent_at = match event.sent_at.as_deref() {
        Some(text) if !text.is_empty() => {
            let parsed = parse_iso8601(text);
            if parsed.is_none() {
                warnings.push(invalid_timestamp_warning(
                    event,
                    "sent_at",
                    Value::String(text.to_owned()),
                    unparseable_reason(text),
                ));
            }
            parsed
        }
        _ => None,
    };

    let timestamp_value = event.timestamp.as_ref().filter(|value| is_truthy(value));
    let computed = match timestamp_value {
        Some(value) => {
            let timestamp = value.as_str().and_then(parse_iso8601);
            match (timestamp, sent_at) {
                // sent_at − timestamp is how long the client held the event; the same span
                // before the trusted `now` is when it really happened.
                (Some(timestamp), Some(sent_at)) => {
                    now.checked_add_signed(timestamp.signed_duration_since(sent_at))
                }
                // PostHog returns the client's timestamp untouched here, skipping both the
                // offset and the future clamp; only an unusable value is replaced.
                (Some(timestamp), None) => return timestamp,
                (None, _) => {
                    warnings.push(invalid_timestamp_warning(
                        event,
                        "timestamp",
                        value.clone(),
                        unparseable_reason(&js_display(value)),
                    ));
                    return Utc::now();
                }
            }
        }
        None => Some(now),
    };
    // `None` is a time out of chrono's range: luxon's invalid DateTime.
    let computed = match offset_milliseconds(event) {
        Some(offset_ms) => subtract_milliseconds(now, offset_ms),
        None => computed,
    };

    let Some(computed) = computed else {
        warnings.push(invalid_timestamp_warning(
            event,
            "timestamp",
            event.timestamp.clone().unwrap_or_else(empty_string),
            "the computed time is out of range".to_owned(),
        ));
        return Utc::now();
    };

    if computed.signed_duration_since(now) > FUTURE_EVENT_CUTOFF {
        warnings.push(IngestionWarning {
            team_id: event.team_id,
            kind: WARNING_EVENT_TIMESTAMP_IN_FUTURE,
            details: json!({
                "timestamp": event.timestamp.clone().unwrap_or_else(empty_string),
                "sentAt": event.sent_at.clone().unwrap_or_default(),
                "offset": event.offset.clone().unwrap_or_else(empty_string),
                "now": event.now,
                "result": computed.to_rfc3339_opts(SecondsFormat::Millis, true),
            }),
            timestamp: Utc::now(),
        });
        return now;
    }
    computed
}

/// The event's `offset` in milliseconds, if usable and non-zero.
///
/// Like luxon's `Duration.fromMillis`, a numeric string counts as a number. Zero is ignored
/// because PostHog tests the offset for truthiness.
fn offset_milliseconds(event: &PluginEvent) -> Option<f64> {
    let offset_ms = match event.offset.as_ref()? {
        Value::Number(number) => number.as_f64()?,
        Value::String(text) => text.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (offset_ms != 0.0 && offset_ms.is_finite()).then_some(offset_ms)
}

/// `time − milliseconds`, or `None` when that is out of range.
fn subtract_milliseconds(time: DateTime<Utc>, milliseconds: f64) -> Option<DateTime<Utc>> {
    // Microseconds keep fractional milliseconds; `as` saturates absurd values, which then
    // fail the checked subtraction instead of panicking.
    let delta = TimeDelta::microseconds((milliseconds * 1000.0).round() as i64);
    time.checked_sub_signed(delta)
}

fn invalid_timestamp_warning(
    event: &PluginEvent,
    field: &str,
    value: Value,
    reason: String,
) -> IngestionWarning {
    IngestionWarning {
        team_id: event.team_id,
        kind: WARNING_IGNORED_INVALID_TIMESTAMP,
        details: json!({
            "eventUuid": event.uuid,
            "field": field,
            "value": value,
            "reason": reason,
        }),
        timestamp: Utc::now(),
    }
}

/// luxon's `invalidExplanation` for text that is not ISO 8601.
fn unparseable_reason(text: &str) -> String {
    format!("the input \"{text}\" can't be parsed as ISO 8601")
}

/// PostHog's `?? ''` for absent fields in warning details.
fn empty_string() -> Value {
    Value::String(String::new())
}

fn js_display(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
