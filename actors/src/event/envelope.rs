//! The Kafka message on `events_plugin_ingestion` (spec 1.1), both ways: [`Envelope`] is how
//! HTTP capture and plugins' `posthog.capture` write it, and [`parse_envelope`] turns one into a
//! [`PipelineEvent`] (PostHog's `formPipelineEvent` and `normalizeEvent`).
//!
//! The capture endpoint wraps the client's event: trusted fields (`now`, `ip`, `team_id`,
//! `token`, ...) sit at the top level and the client's own JSON is a string in `data`. A
//! message that cannot become an event is returned as a [`DeadLetter`] carrying whatever
//! could be read from it, so that the dead-letter row can be investigated.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::dead_letter::{DeadLetter, DropReason};
use super::iso8601::parse_iso8601;
use super::js::to_js_string;
use super::properties::ObjectVisitor;
use super::{JsonObject, PipelineEvent, PluginEvent, Properties};

/// A message for `events_plugin_ingestion`, as capture writes it: trusted fields at the top,
/// the client's event as a JSON string in `data`. Exactly one of `token` (from a client) and
/// `team_id` (from the server itself, e.g. a plugin's `posthog.capture`) names the team.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a> {
    pub uuid: String,
    pub distinct_id: &'a str,
    pub ip: Option<&'a str>,
    pub site_url: &'a str,
    /// The client's event, untouched, as a JSON string.
    pub data: String,
    pub now: &'a str,
    pub sent_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team_id: Option<i64>,
}

impl Envelope<'_> {
    /// PostHog's partition key, `token:distinct_id` (or `team_id:distinct_id`), which keeps one
    /// user's events in one partition and so in order.
    pub fn kafka_key(&self) -> String {
        match (self.token, self.team_id) {
            (Some(token), _) => format!("{token}:{}", self.distinct_id),
            (None, Some(team_id)) => format!("{team_id}:{}", self.distinct_id),
            (None, None) => self.distinct_id.to_owned(),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// Limits applied before a message is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeLimits {
    /// Larger messages are dead-lettered unparsed: parsing them costs more than they are worth
    /// and ClickHouse would reject the row anyway.
    pub max_message_bytes: usize,
}

impl EnvelopeLimits {
    /// PostHog's later threshold for `events_plugin_ingestion_dlq` (spec 1.10): 1 MiB.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_576;
}

impl Default for EnvelopeLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Events whose properties are recordings rather than user context: PostHog does not derive
/// person properties from them.
const EVENTS_WITHOUT_PERSON_PROPERTIES: [&str; 2] = ["$snapshot", "$performance_event"];

/// Campaign parameters: copied into `$set`, so the person keeps the latest campaign.
const CAMPAIGN_PROPERTIES: [(&str, &str); 9] = [
    ("utm_source", "$initial_utm_source"),
    ("utm_medium", "$initial_utm_medium"),
    ("utm_campaign", "$initial_utm_campaign"),
    ("utm_content", "$initial_utm_content"),
    ("utm_name", "$initial_utm_name"),
    ("utm_term", "$initial_utm_term"),
    ("gclid", "$initial_gclid"),
    ("fbclid", "$initial_fbclid"),
    ("msclkid", "$initial_msclkid"),
];

/// Context of the first visit: with the campaign parameters, copied into `$set_once` under
/// PostHog's `$initial_<name without $>`, so the person keeps the first value.
const INITIAL_PROPERTIES: [(&str, &str); 8] = [
    ("$browser", "$initial_browser"),
    ("$browser_version", "$initial_browser_version"),
    ("$device_type", "$initial_device_type"),
    ("$current_url", "$initial_current_url"),
    ("$pathname", "$initial_pathname"),
    ("$os", "$initial_os"),
    ("$referring_domain", "$initial_referring_domain"),
    ("$referrer", "$initial_referrer"),
];

/// Parses one Kafka message into a normalized event, or says why it cannot be ingested.
///
/// `data` may be a JSON string (what capture sends) or an object. Where both the envelope
/// and `data` carry a field, a non-null envelope value wins, as in PostHog's
/// `{...data, ...envelope}`.
pub fn parse_envelope(
    raw: &[u8],
    limits: &EnvelopeLimits,
) -> Result<PipelineEvent, Box<DeadLetter>> {
    // Checked first so that an oversized message costs nothing to reject.
    if raw.len() > limits.max_message_bytes {
        return Err(Box::new(DeadLetter::unparsed(
            raw,
            DropReason::EventTooLarge,
            format!(
                "message of {} bytes is larger than the limit of {} bytes",
                raw.len(),
                limits.max_message_bytes
            ),
        )));
    }

    let mut envelope: RawFields = from_slice_repairing(raw).map_err(|failure| {
        let (reason, error) = match failure {
            JsonFailure::InvalidUtf8(error) => (
                DropReason::InvalidUtf8,
                format!("message is not UTF-8: {error}"),
            ),
            JsonFailure::Invalid(error) => (
                DropReason::InvalidJson,
                format!("message is not a JSON object: {error}"),
            ),
        };
        Box::new(DeadLetter::unparsed(raw, reason, error))
    })?;

    let data = match envelope.data.take() {
        None => RawFields::default(),
        Some(Value::String(text)) => from_str_repairing(&text).map_err(|error| {
            dead_letter(
                raw,
                &envelope,
                DropReason::InvalidJson,
                format!("data is not a JSON object: {error}"),
            )
        })?,
        Some(object @ Value::Object(_)) => serde_json::from_value(object).map_err(|error| {
            dead_letter(
                raw,
                &envelope,
                DropReason::InvalidJson,
                format!("data is not a usable JSON object: {error}"),
            )
        })?,
        Some(other) => {
            return Err(dead_letter(
                raw,
                &envelope,
                DropReason::InvalidJson,
                format!("data is neither a JSON string nor an object: {other}"),
            ));
        }
    };
    let fields = envelope.overriding(data);

    let team_id =
        validate(&fields).map_err(|(reason, error)| dead_letter(raw, &fields, reason, error))?;
    Ok(into_pipeline_event(fields, team_id))
}

/// PostHog's `normalizeEvent`: merges the top-level `$set`/`$set_once` into the properties and
/// derives the person's campaign and `$initial_*` properties.
///
/// The pipeline runs it after the plugins (PostHog's order: a plugin sees the properties that
/// were sent, not the derived ones), on whatever they returned. It is idempotent.
///
/// A top-level `$set` wins over a key of `properties.$set` (PostHog spreads the top-level
/// object last), and campaign values of this event win over both. The top-level objects
/// stay on the event because plugins may read them.
pub fn normalize_event(event: &mut PluginEvent) {
    if let Some(set) = &event.set
        && let Some(target) = nested_object(&mut event.properties, "$set")
    {
        target.extend(set.iter().map(|(key, value)| (key.clone(), value.clone())));
    }
    if let Some(set_once) = &event.set_once
        && let Some(target) = nested_object(&mut event.properties, "$set_once")
    {
        target.extend(
            set_once
                .iter()
                .map(|(key, value)| (key.clone(), value.clone())),
        );
    }
    if !EVENTS_WITHOUT_PERSON_PROPERTIES.contains(&event.event.as_str()) {
        add_campaign_and_initial_properties(&mut event.properties);
    }
}

/// PostHog's `personInitialAndUTMProperties`, in place.
///
/// One pass over the event's keys, matching each against the fixed names, instead of one map
/// lookup per name: this runs twice per event on the hot path, and events carry few of them.
fn add_campaign_and_initial_properties(properties: &mut Properties) {
    let mut campaign: Vec<(String, Value)> = Vec::new();
    let mut initial: Vec<(String, Value)> = Vec::new();
    // By key first: only the values of these few keys are read (and so parsed).
    for key in properties.keys() {
        let Some((is_campaign, initial_name)) = person_property(key) else {
            continue;
        };
        let Some(value) = properties.get(key) else {
            continue;
        };
        if is_campaign {
            campaign.push((key.to_owned(), value.clone()));
        }
        initial.push((initial_name.to_owned(), value.clone()));
    }

    if !campaign.is_empty()
        && let Some(target) = nested_object(properties, "$set")
    {
        target.extend(campaign);
    }
    if !initial.is_empty()
        && let Some(target) = nested_object(properties, "$set_once")
    {
        target.extend(initial);
    }
}

/// Whether `key` is a campaign parameter, and its `$initial_` name, for the names in
/// `CAMPAIGN_PROPERTIES` and `INITIAL_PROPERTIES`. Cheap to reject: most keys differ from
/// every name in their first bytes or their length.
fn person_property(key: &str) -> Option<(bool, &'static str)> {
    let first = *key.as_bytes().first()?;
    if first != b'$' && first != b'u' && first != b'g' && first != b'f' && first != b'm' {
        return None;
    }
    if let Some((_, initial)) = CAMPAIGN_PROPERTIES.iter().find(|(name, _)| *name == key) {
        return Some((true, initial));
    }
    INITIAL_PROPERTIES
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, initial)| (false, *initial))
}

/// The object under `key`, created (or replacing a non-object, which JavaScript's spread
/// would also discard) when needed. Always `Some`; an `Option` avoids a panic path.
fn nested_object<'a>(properties: &'a mut Properties, key: &str) -> Option<&'a mut JsonObject> {
    let slot = properties.get_or_insert_with(key, || Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut()
}

/// The fields of spec 1.1 as found in one layer of the message (the envelope or `data`).
///
/// Everything is a `Value` because clients send surprising types, and each field's rule for
/// them is applied after merging. Unknown fields are skipped without being materialized.
#[derive(Debug, Default, Deserialize)]
struct RawFields {
    distinct_id: Option<Value>,
    ip: Option<Value>,
    site_url: Option<Value>,
    team_id: Option<Value>,
    token: Option<Value>,
    now: Option<Value>,
    sent_at: Option<Value>,
    uuid: Option<Value>,
    event: Option<Value>,
    properties: Option<PropertiesField>,
    timestamp: Option<Value>,
    offset: Option<Value>,
    #[serde(rename = "$set")]
    set: Option<Value>,
    #[serde(rename = "$set_once")]
    set_once: Option<Value>,
    data: Option<Value>,
}

impl RawFields {
    /// These fields, falling back to `data`'s where absent or null.
    fn overriding(self, data: RawFields) -> RawFields {
        RawFields {
            distinct_id: self.distinct_id.or(data.distinct_id),
            ip: self.ip.or(data.ip),
            site_url: self.site_url.or(data.site_url),
            team_id: self.team_id.or(data.team_id),
            token: self.token.or(data.token),
            now: self.now.or(data.now),
            sent_at: self.sent_at.or(data.sent_at),
            uuid: self.uuid.or(data.uuid),
            event: self.event.or(data.event),
            properties: self.properties.or(data.properties),
            timestamp: self.timestamp.or(data.timestamp),
            offset: self.offset.or(data.offset),
            set: self.set.or(data.set),
            set_once: self.set_once.or(data.set_once),
            data: None,
        }
    }
}

/// `properties` as sent: an object, kept as its values' JSON text (see [`Properties`]), or
/// anything else, which refuses the event and is kept to show in its dead letter.
#[derive(Debug)]
enum PropertiesField {
    Object(Properties),
    NotObject(Value),
}

impl<'de> Deserialize<'de> for PropertiesField {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PropertiesFieldVisitor)
    }
}

struct PropertiesFieldVisitor;

impl<'de> serde::de::Visitor<'de> for PropertiesFieldVisitor {
    type Value = PropertiesField;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        ObjectVisitor.visit_map(map).map(PropertiesField::Object)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(PropertiesField::NotObject(Value::Array(items)))
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(PropertiesField::NotObject(Value::Bool(value)))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(PropertiesField::NotObject(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(PropertiesField::NotObject(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        Ok(PropertiesField::NotObject(value.into()))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(PropertiesField::NotObject(Value::String(value.to_owned())))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(PropertiesField::NotObject(Value::Null))
    }
}

/// Every reason to refuse the merged fields, checked by reference so that a refusal can
/// still report all of them. Returns the parsed `team_id`.
fn validate(fields: &RawFields) -> Result<Option<i64>, (DropReason, String)> {
    if let Some(PropertiesField::NotObject(properties)) = &fields.properties {
        return Err((
            DropReason::InvalidJson,
            format!("properties is not a JSON object: {properties}"),
        ));
    }
    let team_id =
        parse_team_id(fields.team_id.as_ref()).map_err(|error| (DropReason::InvalidJson, error))?;

    match &fields.event {
        None => {
            return Err((
                DropReason::IllegalEventName,
                "event name is missing".to_owned(),
            ));
        }
        Some(Value::String(name)) if name.is_empty() => {
            return Err((
                DropReason::IllegalEventName,
                "event name is empty".to_owned(),
            ));
        }
        Some(_) => {}
    }

    match &fields.distinct_id {
        None => {
            return Err((
                DropReason::IllegalDistinctId,
                "distinct_id is missing".to_owned(),
            ));
        }
        Some(Value::String(distinct_id)) if distinct_id.is_empty() => {
            return Err((
                DropReason::IllegalDistinctId,
                "distinct_id is empty".to_owned(),
            ));
        }
        Some(_) => {}
    }

    if team_id.is_none() && non_empty_string(fields.token.as_ref()).is_none() {
        return Err((
            DropReason::NoToken,
            "message has neither team_id nor token".to_owned(),
        ));
    }
    Ok(team_id)
}

/// `team_id` as PostHog's truthiness check sees it: null, 0 and `""` mean "use the token".
/// Integral numbers and digit strings are accepted; anything else is an error.
fn parse_team_id(value: Option<&Value>) -> Result<Option<i64>, String> {
    let team_id = match value {
        None => return Ok(None),
        Some(Value::Number(number)) => number.as_i64().or_else(|| {
            number
                .as_f64()
                .filter(|float| float.fract() == 0.0 && float.abs() < 9.0e15)
                .map(|float| float as i64)
        }),
        Some(Value::String(text)) if text.is_empty() => return Ok(None),
        Some(Value::String(text)) => text.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match (team_id, value) {
        (Some(0), _) => Ok(None),
        (Some(team_id), _) => Ok(Some(team_id)),
        (None, Some(value)) => Err(format!("team_id is not an integer: {value}")),
        (None, None) => Ok(None),
    }
}

/// Moves the validated fields into the event, as it arrived: plugins see it before
/// [`normalize_event`] (PostHog's order), which the pipeline runs after them.
fn into_pipeline_event(fields: RawFields, team_id: Option<i64>) -> PipelineEvent {
    let properties = match fields.properties {
        Some(PropertiesField::Object(properties)) => properties,
        // Refused by `validate`.
        Some(PropertiesField::NotObject(_)) | None => Properties::new(),
    };
    let event = Box::new(PluginEvent {
        distinct_id: fields.distinct_id.map(into_text).unwrap_or_default(),
        // PostHog's `ip || null`: any falsy value is no ip.
        ip: fields.ip.and_then(into_truthy_text),
        site_url: fields.site_url.and_then(into_truthy_text),
        // Set by the team step, which decides between `team_id` and `token`.
        team_id: 0,
        now: fields.now.map(into_text).unwrap_or_default(),
        event: fields.event.map(into_event_name).unwrap_or_default(),
        sent_at: fields.sent_at.and_then(into_truthy_text),
        properties,
        timestamp: fields.timestamp,
        offset: fields.offset,
        uuid: fields.uuid.map(into_text).unwrap_or_default(),
        set: fields.set.and_then(into_object),
        set_once: fields.set_once.and_then(into_object),
    });
    PipelineEvent {
        team_id,
        token: fields.token.and_then(|token| match token {
            Value::String(token) if !token.is_empty() => Some(token),
            _ => None,
        }),
        event,
    }
}

/// JavaScript's `toString()`, which PostHog applies to `distinct_id`: numbers lose their
/// JSON formatting quirks, so `123` becomes `"123"`.
fn into_text(value: Value) -> String {
    match value {
        Value::String(text) => text,
        other => to_js_string(&other),
    }
}

/// PostHog's `sanitizeEventName`: a non-string name is JSON-stringified, not refused.
fn into_event_name(value: Value) -> String {
    match value {
        Value::String(name) => name,
        other => other.to_string(),
    }
}

fn into_truthy_text(value: Value) -> Option<String> {
    match value {
        Value::Null | Value::Bool(false) => None,
        Value::String(text) if text.is_empty() => None,
        Value::Number(number) if number.as_f64() == Some(0.0) => None,
        other => Some(into_text(other)),
    }
}

fn into_object(value: Value) -> Option<JsonObject> {
    match value {
        Value::Object(object) => Some(object),
        _ => None,
    }
}

fn non_empty_string(value: Option<&Value>) -> Option<&str> {
    value?.as_str().filter(|text| !text.is_empty())
}

/// A dead letter for a message whose fields (or some of them) could be read.
fn dead_letter(
    raw: &[u8],
    fields: &RawFields,
    reason: DropReason,
    error: String,
) -> Box<DeadLetter> {
    let mut letter = DeadLetter::unparsed(raw, reason, error);
    let text_of = |value: Option<&Value>| value.map(to_js_string).unwrap_or_default();
    letter.distinct_id = text_of(fields.distinct_id.as_ref());
    letter.event = fields
        .event
        .clone()
        .map(into_event_name)
        .unwrap_or_default();
    letter.event_uuid = fields
        .uuid
        .as_ref()
        .and_then(Value::as_str)
        .and_then(|uuid| Uuid::try_parse(uuid).ok())
        .unwrap_or_else(Uuid::nil);
    letter.team_id = parse_team_id(fields.team_id.as_ref())
        .ok()
        .flatten()
        .unwrap_or(0);
    letter.ip = text_of(fields.ip.as_ref());
    letter.site_url = text_of(fields.site_url.as_ref());
    letter.properties = match &fields.properties {
        Some(PropertiesField::Object(properties)) => properties.to_json(),
        Some(PropertiesField::NotObject(other)) => other.to_string(),
        None => "{}".to_owned(),
    };
    if let Some(now) = fields
        .now
        .as_ref()
        .and_then(Value::as_str)
        .and_then(parse_iso8601)
    {
        letter.now = now;
    }
    Box::new(letter)
}

/// Why the message bytes are not JSON.
enum JsonFailure {
    InvalidUtf8(std::str::Utf8Error),
    Invalid(serde_json::Error),
}

/// Validates UTF-8 over the whole message first: invalid bytes anywhere, even in a field this
/// server skips, mean the message is not what an SDK sent, and PostHog (which decodes the
/// whole message) rejects it too. Parsing a validated `str` then skips serde_json's own checks.
fn from_slice_repairing<T: DeserializeOwned>(raw: &[u8]) -> Result<T, JsonFailure> {
    let text = std::str::from_utf8(raw).map_err(JsonFailure::InvalidUtf8)?;
    from_str_repairing(text).map_err(JsonFailure::Invalid)
}

/// Parses JSON, accepting the lone UTF-16 surrogate escapes that browsers send (see
/// `retry_without_lone_surrogates`). Shared with HTTP capture, which meets the same bodies.
pub fn from_str_repairing<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    match serde_json::from_str(text) {
        Ok(parsed) => Ok(parsed),
        Err(error) => retry_without_lone_surrogates(text, error),
    }
}

/// Browsers send strings with lone UTF-16 surrogates (`"\ud800"`), which JavaScript accepts
/// and serde_json refuses. Such an event is worth keeping: the surrogates become U+FFFD and
/// the text is parsed again. Any other error is returned as it was.
fn retry_without_lone_surrogates<T: DeserializeOwned>(
    text: &str,
    error: serde_json::Error,
) -> Result<T, serde_json::Error> {
    let message = error.to_string();
    let is_surrogate_error = message.starts_with("lone leading surrogate in hex escape")
        || message.starts_with("unexpected end of hex escape");
    if !is_surrogate_error {
        return Err(error);
    }
    match replace_lone_surrogate_escapes(text) {
        Some(repaired) => serde_json::from_str(&repaired),
        None => Err(error),
    }
}

/// `text` with every `\uXXXX` escape of an unpaired surrogate rewritten to `\ufffd`, or `None`
/// when there is none. Escaped backslashes are skipped, so `\\ud800` (a JSON string holding
/// the six characters `\ud800`, as in a nested `data`) is left alone.
fn replace_lone_surrogate_escapes(text: &str) -> Option<String> {
    const ESCAPE_LEN: usize = 6;
    let bytes = text.as_bytes();
    let mut repaired: Option<String> = None;
    let mut copied_up_to = 0;
    let mut position = 0;
    while let Some(&byte) = bytes.get(position) {
        if byte != b'\\' {
            position += 1;
            continue;
        }
        if bytes.get(position + 1) != Some(&b'u') {
            // Any other escape is two bytes; skipping both keeps `\\` from starting a `\u`.
            position += 2;
            continue;
        }
        let Some(unit) = hex_escape_unit(bytes, position) else {
            position += 2;
            continue;
        };
        let paired = (0xD800..=0xDBFF).contains(&unit)
            && hex_escape_unit(bytes, position + ESCAPE_LEN)
                .is_some_and(|next| (0xDC00..=0xDFFF).contains(&next));
        if paired {
            position += 2 * ESCAPE_LEN;
            continue;
        }
        if (0xD800..=0xDFFF).contains(&unit) {
            // `position` is at an ASCII backslash, so slicing there is on a char boundary.
            let output = repaired.get_or_insert_with(|| String::with_capacity(text.len()));
            output.push_str(text.get(copied_up_to..position)?);
            output.push_str("\\ufffd");
            copied_up_to = position + ESCAPE_LEN;
        }
        position += ESCAPE_LEN;
    }
    let mut output = repaired?;
    output.push_str(text.get(copied_up_to..)?);
    Some(output)
}

/// `parse(text)`, and when serde refuses text that JavaScript's `JSON.parse` takes, `parse` of
/// the text as JavaScript would read it (see [`repair_for_javascript`]).
pub(crate) fn parse_like_javascript<T>(
    text: &str,
    mut parse: impl FnMut(&str) -> Result<T, serde_json::Error>,
) -> Result<T, serde_json::Error> {
    parse(text).or_else(|error| {
        let repaired = repair_for_javascript(text).ok_or(error)?;
        parse(&repaired)
    })
}

/// What serde cannot parse in JSON text that a client sent and JavaScript's `JSON.parse`
/// takes, repaired as JavaScript would read it: lone surrogate escapes become U+FFFD, and
/// numbers too large for a double (`1e400`, which `JSON.parse` reads as `Infinity`) become
/// `null`, which is what `JSON.stringify` writes for them. `None` when there is nothing to
/// repair. Raw property text keeps both until a step reads it.
fn repair_for_javascript(text: &str) -> Option<String> {
    match replace_lone_surrogate_escapes(text) {
        Some(repaired) => Some(replace_out_of_range_numbers(&repaired).unwrap_or(repaired)),
        None => replace_out_of_range_numbers(text),
    }
}

/// `text` with every number outside a string that overflows a double rewritten to `null`, or
/// `None` when there is none.
fn replace_out_of_range_numbers(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut repaired: Option<String> = None;
    let mut copied_up_to = 0;
    let mut position = 0;
    let mut in_string = false;
    while let Some(&byte) = bytes.get(position) {
        if in_string {
            match byte {
                b'\\' => position += 2,
                b'"' => {
                    in_string = false;
                    position += 1;
                }
                _ => position += 1,
            }
            continue;
        }
        if byte == b'"' {
            in_string = true;
            position += 1;
            continue;
        }
        if byte != b'-' && !byte.is_ascii_digit() {
            position += 1;
            continue;
        }
        let start = position;
        while bytes
            .get(position)
            .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            position += 1;
        }
        // Number tokens are ASCII, so both ends are on char boundaries.
        let token = text.get(start..position)?;
        if token.parse::<f64>().is_ok_and(|n| n.is_infinite()) {
            let output = repaired.get_or_insert_with(|| String::with_capacity(text.len()));
            output.push_str(text.get(copied_up_to..start)?);
            output.push_str("null");
            copied_up_to = position;
        }
    }
    let mut output = repaired?;
    output.push_str(text.get(copied_up_to..)?);
    Some(output)
}

/// The UTF-16 unit of the `\uXXXX` escape starting at `start`, if there is one.
fn hex_escape_unit(bytes: &[u8], start: usize) -> Option<u16> {
    if bytes.get(start) != Some(&b'\\') || bytes.get(start + 1) != Some(&b'u') {
        return None;
    }
    bytes
        .get(start + 2..start + 6)?
        .iter()
        .try_fold(0u16, |unit, digit| {
            let value = char::from(*digit).to_digit(16)?;
            Some(unit << 4 | value as u16)
        })
}

#[cfg(test)]
mod tests;
