//! `pluginConfig.filters`: which stored events a config's `composeWebhook` sees.
//!
//! PostHog keeps them in `posthog_pluginconfig.filters` as `{events: [...], actions: [...]}` and
//! matches each event with `ActionMatcher.checkFilters`: the event passes when one `events`
//! entry matches (its `name`, if set, is the event's name, and every one of its property filters
//! holds). Property filters compare the way ClickHouse would (PostHog's `castingCompare`: values
//! are cast to numbers when their types differ) and regexes are RE2, as here with `regex`.
//!
//! Differences, on purpose:
//! - Filters with no `events` and no `actions` let every event through; PostHog drops every event,
//!   which only ever surprised whoever saved an empty filter.
//! - `actions` entries are not supported (the server loads only the actions that post to
//!   webhooks, see `crate::actions`); reaching one is an error (a `composeWebhook` failure for
//!   that event), never a silent pass or drop. So is an element `selector` filter.

use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::event::js::to_js_string;

/// Why an event could not be matched; PostHog records it as a `composeWebhook` failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FilterError {
    /// Shared: every event the config sees meets the same parse error.
    #[error("the filters are not valid: {0}")]
    Invalid(#[source] Arc<serde_json::Error>),
    #[error("action filters of composeWebhook are not supported (action {0})")]
    Action(String),
    #[error("element selector filters are not supported ({0:?})")]
    Selector(String),
    #[error("invalid regex {pattern:?}: {source}")]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    /// `prepare` compiles a regex per candidate value; this guards a filter it did not.
    #[error("invalid regex {pattern:?}: not compiled")]
    RegexNotCompiled { pattern: String },
    #[error("can't match against invalid cohort ID value {0:?}")]
    Cohort(String),
}

/// Errors compare by kind and text: serde_json's errors have no equality of their own.
impl PartialEq for FilterError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Eq for FilterError {}

/// A config's filters, parsed once when the config is loaded. They cross to a plugin worker
/// process as the JSON they were read from, and are parsed there again.
#[derive(Debug, Clone)]
pub struct WebhookFilters {
    rules: Result<Rules, Arc<serde_json::Error>>,
    source: Value,
}

impl serde::Serialize for WebhookFilters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.source.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for WebhookFilters {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = Value::deserialize(deserializer)?;
        Self::from_json(&source)
            .ok_or_else(|| serde::de::Error::custom("webhook filters cannot be null"))
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Rules {
    #[serde(default)]
    events: Vec<EventRule>,
    #[serde(default)]
    actions: Vec<ActionRule>,
}

impl Rules {
    /// Works out each property filter's operator, and compiles its regexes, once at load.
    fn prepare(mut self) -> Self {
        for filter in self.events.iter_mut().flat_map(|rule| &mut rule.properties) {
            filter.op = Operator::of(filter.operator.as_deref());
            if matches!(filter.op, Operator::Regex | Operator::NotRegex) {
                filter.regexes = filter
                    .candidates()
                    .unwrap_or_default()
                    .iter()
                    .map(|candidate| Regex::new(&stringify(candidate)))
                    .collect();
            }
        }
        self
    }
}

#[derive(Debug, Clone, Deserialize)]
struct EventRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    properties: Vec<PropertyFilter>,
}

#[derive(Debug, Clone, Deserialize)]
struct ActionRule {
    #[serde(default)]
    id: Value,
}

#[derive(Debug, Clone, Deserialize)]
struct PropertyFilter {
    key: String,
    /// Absent is not the same as `null` (PostHog's `undefined`).
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    #[serde(default)]
    operator: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// `operator`, worked out at load.
    #[serde(skip)]
    op: Operator,
    /// For the regex operators: each candidate value compiled (or why it does not compile).
    #[serde(skip)]
    regexes: Vec<Result<Regex, regex::Error>>,
}

fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// What the filters look at: the event as `composeWebhook` receives it (name, properties,
/// elements) and the person's properties when the event had a person.
#[derive(Debug, Clone, Copy)]
pub struct FilterSubject<'a> {
    pub event: &'a Value,
    pub person_properties: Option<&'a Map<String, Value>>,
}

impl WebhookFilters {
    /// `None` for SQL NULL / JSON null: the config has no filters.
    pub fn from_json(value: &Value) -> Option<Self> {
        if value.is_null() {
            return None;
        }
        Some(Self {
            rules: Rules::deserialize(value)
                .map(Rules::prepare)
                .map_err(Arc::new),
            source: value.clone(),
        })
    }

    pub fn matches(&self, subject: FilterSubject<'_>) -> Result<bool, FilterError> {
        let rules = self
            .rules
            .as_ref()
            .map_err(|error| FilterError::Invalid(Arc::clone(error)))?;
        if rules.events.is_empty() && rules.actions.is_empty() {
            return Ok(true);
        }
        let name = subject.event.get("event").and_then(Value::as_str);
        for rule in &rules.events {
            if rule
                .name
                .as_deref()
                .is_some_and(|wanted| Some(wanted) != name)
            {
                continue;
            }
            if rule.properties.iter().try_fold(true, |all, filter| {
                Ok::<_, FilterError>(all && filter.matches(subject)?)
            })? {
                return Ok(true);
            }
        }
        match rules.actions.first() {
            Some(action) => Err(FilterError::Action(to_js_string(&action.id))),
            None => Ok(false),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Operator {
    #[default]
    Exact,
    IsNot,
    IContains,
    NotIContains,
    Regex,
    NotRegex,
    GreaterThan,
    LessThan,
    IsSet,
    IsNotSet,
}

impl Operator {
    /// Unknown operators compare exactly, as PostHog's `default:` does.
    fn of(name: Option<&str>) -> Self {
        match name {
            Some("is_not") => Self::IsNot,
            Some("icontains") => Self::IContains,
            Some("not_icontains") => Self::NotIContains,
            Some("regex") => Self::Regex,
            Some("not_regex") => Self::NotRegex,
            Some("gt") => Self::GreaterThan,
            Some("lt") => Self::LessThan,
            Some("is_set") => Self::IsSet,
            Some("is_not_set") => Self::IsNotSet,
            _ => Self::Exact,
        }
    }

    /// These match when the property is missing (or of a type the operator cannot test).
    fn matches_absent(self) -> bool {
        matches!(
            self,
            Self::IsNotSet | Self::IsNot | Self::NotIContains | Self::NotRegex
        )
    }

    /// Whether the operator can test a value of this type at all.
    fn accepts(self, found: &Value) -> bool {
        match self {
            Self::IContains | Self::NotIContains | Self::Regex | Self::NotRegex => {
                found.is_string()
            }
            Self::GreaterThan | Self::LessThan => found.is_number() || found.is_boolean(),
            _ => true,
        }
    }
}

impl PropertyFilter {
    /// The values to compare with: `value`, or each element of it when it is an array; `None`
    /// when there is no `value` at all.
    fn candidates(&self) -> Option<&[Value]> {
        match &self.value {
            Some(Value::Array(values)) => Some(values),
            Some(value) => Some(std::slice::from_ref(value)),
            None => None,
        }
    }

    fn matches(&self, subject: FilterSubject<'_>) -> Result<bool, FilterError> {
        match self.kind.as_deref() {
            Some("event") => self.check(subject.event.get("properties")),
            Some("person") => match subject.person_properties {
                Some(properties) => self.check_map(properties),
                None => Ok(self.op.matches_absent()),
            },
            Some("element") => self.check_elements(subject.event),
            Some("cohort") => self.check_cohort(),
            _ => Ok(false),
        }
    }

    fn check(&self, properties: Option<&Value>) -> Result<bool, FilterError> {
        match properties.and_then(Value::as_object) {
            Some(properties) => self.check_map(properties),
            None => Ok(self.op.matches_absent()),
        }
    }

    fn check_elements(&self, event: &Value) -> Result<bool, FilterError> {
        if self.key == "selector" {
            return Err(FilterError::Selector(
                self.value.as_ref().map(to_js_string).unwrap_or_default(),
            ));
        }
        let elements = event.get("elements").and_then(Value::as_array);
        for element in elements.into_iter().flatten() {
            if self.check(Some(element))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// PostHog matches only the "all users" cohort here; a real cohort id never matches.
    fn check_cohort(&self) -> Result<bool, FilterError> {
        match &self.value {
            Some(Value::String(all)) if all == "all" => Ok(true),
            Some(Value::Number(_)) => Ok(false),
            Some(Value::String(id)) if leading_integer(id) => Ok(false),
            other => Err(FilterError::Cohort(
                other.as_ref().map(to_js_string).unwrap_or_default(),
            )),
        }
    }

    fn check_map(&self, properties: &Map<String, Value>) -> Result<bool, FilterError> {
        let operator = self.op;
        let Some(found) = properties.get(&self.key) else {
            return Ok(operator.matches_absent());
        };
        if !operator.accepts(found) {
            return Ok(operator.matches_absent());
        }
        match operator {
            Operator::IsSet => return Ok(true),
            Operator::IsNotSet => return Ok(false),
            _ => {}
        }
        // PostHog tests `[undefined]` without a value: only "is not" holds against nothing.
        let Some(candidates) = self.candidates() else {
            return Ok(operator == Operator::IsNot);
        };
        let text = found.as_str().unwrap_or_default();
        let lowercase = matches!(operator, Operator::IContains | Operator::NotIContains)
            .then(|| text.to_lowercase());
        for (index, candidate) in candidates.iter().enumerate() {
            let hit = match operator {
                Operator::Exact => casting_compare(found, candidate, Comparison::Equal),
                Operator::IsNot => casting_compare(found, candidate, Comparison::NotEqual),
                Operator::GreaterThan => casting_compare(found, candidate, Comparison::Greater),
                Operator::LessThan => casting_compare(found, candidate, Comparison::Less),
                Operator::IContains | Operator::NotIContains => {
                    let haystack = lowercase.as_deref().unwrap_or_default();
                    let contains = haystack.contains(&stringify(candidate).to_lowercase());
                    contains == (operator == Operator::IContains)
                }
                Operator::Regex | Operator::NotRegex => match self.regexes.get(index) {
                    Some(Ok(regex)) => regex.is_match(text) == (operator == Operator::Regex),
                    Some(Err(error)) => {
                        return Err(FilterError::Regex {
                            pattern: stringify(candidate),
                            source: error.clone(),
                        });
                    }
                    None => {
                        return Err(FilterError::RegexNotCompiled {
                            pattern: stringify(candidate),
                        });
                    }
                },
                Operator::IsSet => true,
                Operator::IsNotSet => false,
            };
            if hit {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// `parseInt` finds a number at the start.
fn leading_integer(text: &str) -> bool {
    let text = text.trim_start();
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    digits.starts_with(|c: char| c.is_ascii_digit())
}

/// PostHog's `stringify`: strings as they are, anything else as JSON.
fn stringify(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// PostHog's `castingCompare`: JS comparison first, then, when the types differ, both sides
/// cast to numbers (booleans' words first: "true", "yes", "on", "1", ...), as ClickHouse casts
/// to the column's type. JSON null is the string "null" here, as in ClickHouse.
fn casting_compare(a: &Value, b: &Value, comparison: Comparison) -> bool {
    let null = Value::String("null".into());
    let a = if a.is_null() { &null } else { a };
    let b = if b.is_null() { &null } else { b };
    let direct = match comparison {
        Comparison::Equal => loose_equal(a, b),
        Comparison::NotEqual => !loose_equal(a, b),
        Comparison::Greater => !a.is_string() && !b.is_string() && js_less(b, a),
        Comparison::Less => !a.is_string() && !b.is_string() && js_less(a, b),
    };
    if direct {
        return true;
    }
    if type_of(a) == type_of(b) {
        return false;
    }
    let (x, y) = (cast_number(a), cast_number(b));
    match comparison {
        Comparison::Equal => x == y,
        Comparison::NotEqual => x != y,
        Comparison::Greater => x > y,
        Comparison::Less => x < y,
    }
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Null | Value::Array(_) | Value::Object(_) => "object",
    }
}

/// `Number(stringToBoolean(v, true) ?? v)`.
fn cast_number(value: &Value) -> f64 {
    match to_js_string(value).to_lowercase().as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => 1.0,
        "n" | "no" | "f" | "false" | "off" | "0" => 0.0,
        _ => to_number(value),
    }
}

/// JS `Number(value)` for JSON values.
fn to_number(value: &Value) -> f64 {
    match value {
        Value::Null => 0.0,
        Value::Bool(flag) => f64::from(u8::from(*flag)),
        Value::Number(number) => number.as_f64().unwrap_or(f64::NAN),
        Value::String(text) => string_to_number(text),
        Value::Array(_) => string_to_number(&to_js_string(value)),
        Value::Object(_) => f64::NAN,
    }
}

/// JS `Number("...")`: trimmed, empty is 0, `Infinity`, hex/octal/binary prefixes.
fn string_to_number(text: &str) -> f64 {
    let text = text.trim();
    if text.is_empty() {
        return 0.0;
    }
    let radix = |prefix: [&str; 2], radix: u32| {
        prefix
            .iter()
            .find_map(|p| text.strip_prefix(p))
            .map(|digits| u64::from_str_radix(digits, radix).map_or(f64::NAN, |n| n as f64))
    };
    if let Some(n) = radix(["0x", "0X"], 16)
        .or_else(|| radix(["0o", "0O"], 8))
        .or_else(|| radix(["0b", "0B"], 2))
    {
        return n;
    }
    match text {
        "Infinity" | "+Infinity" => f64::INFINITY,
        "-Infinity" => f64::NEG_INFINITY,
        // Rust accepts "inf"/"nan" spellings that JS does not.
        _ if text
            .chars()
            .any(|c| c.is_ascii_alphabetic() && !matches!(c, 'e' | 'E')) =>
        {
            f64::NAN
        }
        _ => text.parse().unwrap_or(f64::NAN),
    }
}

/// JS `==` between two JSON values (no null on either side: see `casting_compare`). Distinct
/// objects are never equal; an object against a primitive compares its string form.
fn loose_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Array(_) | Value::Object(_), Value::Array(_) | Value::Object(_)) => false,
        (Value::Bool(_), _) => loose_equal(&number_value(to_number(a)), b),
        (_, Value::Bool(_)) => loose_equal(a, &number_value(to_number(b))),
        (Value::Number(x), Value::String(text)) | (Value::String(text), Value::Number(x)) => {
            x.as_f64() == Some(string_to_number(text))
        }
        (Value::Array(_) | Value::Object(_), _) => loose_equal(&Value::String(to_js_string(a)), b),
        (_, Value::Array(_) | Value::Object(_)) => loose_equal(a, &Value::String(to_js_string(b))),
        _ => false,
    }
}

fn number_value(n: f64) -> Value {
    serde_json::Number::from_f64(n).map_or_else(|| Value::String("NaN".into()), Value::Number)
}

/// JS `a < b` for non-string operands: objects become their strings first; two strings compare
/// as text, anything else as numbers (NaN compares false).
fn js_less(a: &Value, b: &Value) -> bool {
    let primitive = |v: &Value| match v {
        Value::Array(_) | Value::Object(_) => Value::String(to_js_string(v)),
        other => other.clone(),
    };
    match (primitive(a), primitive(b)) {
        (Value::String(x), Value::String(y)) => x < y,
        (x, y) => to_number(&x) < to_number(&y),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn filters(value: Value) -> WebhookFilters {
        WebhookFilters::from_json(&value).expect("filters")
    }

    fn check(filters: &WebhookFilters, event: &Value) -> Result<bool, FilterError> {
        let person = event.get("person_properties").and_then(Value::as_object);
        filters.matches(FilterSubject {
            event,
            person_properties: person,
        })
    }

    fn property(key: &str, operator: &str, value: Value, kind: &str) -> WebhookFilters {
        filters(
            json!({"events": [{"name": null, "type": "events", "properties": [
                {"key": key, "operator": operator, "value": value, "type": kind}
            ]}]}),
        )
    }

    #[test]
    fn null_means_no_filters_and_empty_lets_everything_through() {
        assert!(WebhookFilters::from_json(&Value::Null).is_none());
        let empty = filters(json!({}));
        assert_eq!(check(&empty, &json!({"event": "x"})), Ok(true));
    }

    #[test]
    fn the_event_name_must_match_when_given() {
        let f = filters(
            json!({"events": [{"id": "$pageview", "name": "$pageview", "type": "events", "order": 0}]}),
        );
        assert_eq!(check(&f, &json!({"event": "$pageview"})), Ok(true));
        assert_eq!(check(&f, &json!({"event": "$autocapture"})), Ok(false));
        let any = filters(json!({"events": [{"name": "a"}, {"name": "b"}]}));
        assert_eq!(check(&any, &json!({"event": "b"})), Ok(true));
    }

    #[test]
    fn exact_casts_like_clickhouse() {
        let f = property("n", "exact", json!("5"), "event");
        assert_eq!(check(&f, &json!({"properties": {"n": 5}})), Ok(true));
        assert_eq!(check(&f, &json!({"properties": {"n": "5"}})), Ok(true));
        assert_eq!(check(&f, &json!({"properties": {"n": 6}})), Ok(false));
        assert_eq!(check(&f, &json!({"properties": {}})), Ok(false));
        let truthy = property("b", "exact", json!("true"), "event");
        assert_eq!(
            check(&truthy, &json!({"properties": {"b": true}})),
            Ok(true)
        );
        let null = property("x", "exact", json!("null"), "event");
        assert_eq!(check(&null, &json!({"properties": {"x": null}})), Ok(true));
        let any_of = property("c", "exact", json!(["de", "fr"]), "event");
        assert_eq!(
            check(&any_of, &json!({"properties": {"c": "fr"}})),
            Ok(true)
        );
        assert_eq!(
            check(&any_of, &json!({"properties": {"c": "FR"}})),
            Ok(false)
        );
    }

    #[test]
    fn is_not_and_absent_properties() {
        let f = property("c", "is_not", json!("de"), "event");
        assert_eq!(check(&f, &json!({"properties": {"c": "fr"}})), Ok(true));
        assert_eq!(check(&f, &json!({"properties": {"c": "de"}})), Ok(false));
        assert_eq!(check(&f, &json!({"properties": {}})), Ok(true));
        let set = property("c", "is_set", Value::Null, "event");
        assert_eq!(check(&set, &json!({"properties": {"c": 1}})), Ok(true));
        assert_eq!(check(&set, &json!({"properties": {}})), Ok(false));
        let unset = property("c", "is_not_set", Value::Null, "event");
        assert_eq!(check(&unset, &json!({"properties": {}})), Ok(true));
        assert_eq!(check(&unset, &json!({"properties": {"c": 1}})), Ok(false));
    }

    #[test]
    fn contains_and_regex_need_strings() {
        let f = property("url", "icontains", json!("PostHog"), "event");
        assert_eq!(
            check(&f, &json!({"properties": {"url": "https://posthog.com"}})),
            Ok(true)
        );
        assert_eq!(check(&f, &json!({"properties": {"url": 5}})), Ok(false));
        let not = property("url", "not_icontains", json!("posthog"), "event");
        assert_eq!(check(&not, &json!({"properties": {"url": 5}})), Ok(true));
        assert_eq!(
            check(&not, &json!({"properties": {"url": "x.posthog.y"}})),
            Ok(false)
        );
        let regex = property("url", "regex", json!("^https://[a-z]+\\.com$"), "event");
        assert_eq!(
            check(
                &regex,
                &json!({"properties": {"url": "https://posthog.com"}})
            ),
            Ok(true)
        );
        assert_eq!(
            check(
                &regex,
                &json!({"properties": {"url": "http://posthog.com"}})
            ),
            Ok(false)
        );
        let bad = property("url", "regex", json!("(unclosed"), "event");
        assert!(matches!(
            check(&bad, &json!({"properties": {"url": "x"}})),
            Err(FilterError::Regex { .. })
        ));
    }

    #[test]
    fn greater_and_less_compare_numbers_only() {
        let gt = property("n", "gt", json!("10"), "event");
        assert_eq!(check(&gt, &json!({"properties": {"n": 11}})), Ok(true));
        assert_eq!(check(&gt, &json!({"properties": {"n": 9.5}})), Ok(false));
        // A string property is never "greater" (PostHog requires a number or a boolean).
        assert_eq!(check(&gt, &json!({"properties": {"n": "11"}})), Ok(false));
        let lt = property("n", "lt", json!(1), "event");
        assert_eq!(check(&lt, &json!({"properties": {"n": false}})), Ok(true));
    }

    #[test]
    fn person_element_and_cohort_filters() {
        let person = property("plan", "exact", json!("pro"), "person");
        let event = json!({"event": "e", "person_properties": {"plan": "pro"}});
        assert_eq!(check(&person, &event), Ok(true));
        assert_eq!(check(&person, &json!({"event": "e"})), Ok(false));
        let element = property("tag_name", "exact", json!("button"), "element");
        let clicked = json!({"elements": [{"tag_name": "span"}, {"tag_name": "button"}]});
        assert_eq!(check(&element, &clicked), Ok(true));
        let selector = property("selector", "exact", json!("div > a"), "element");
        assert!(matches!(
            check(&selector, &clicked),
            Err(FilterError::Selector(_))
        ));
        assert_eq!(
            check(&property("id", "exact", json!("all"), "cohort"), &event),
            Ok(true)
        );
        assert_eq!(
            check(&property("id", "exact", json!(7), "cohort"), &event),
            Ok(false)
        );
        assert!(check(&property("id", "exact", json!("x"), "cohort"), &event).is_err());
        assert_eq!(
            check(&property("k", "exact", json!(1), "group"), &event),
            Ok(false)
        );
    }

    #[test]
    fn every_property_of_an_entry_must_hold() {
        let f = filters(json!({"events": [{"name": "buy", "properties": [
            {"key": "plan", "value": "pro", "type": "event"},
            {"key": "amount", "operator": "gt", "value": 100, "type": "event"}
        ]}]}));
        let event =
            |amount: i64| json!({"event": "buy", "properties": {"plan": "pro", "amount": amount}});
        assert_eq!(check(&f, &event(150)), Ok(true));
        assert_eq!(check(&f, &event(50)), Ok(false));
    }

    #[test]
    fn actions_are_an_error_once_no_event_entry_matched() {
        let f = filters(
            json!({"events": [{"name": "a"}], "actions": [{"id": "12", "type": "actions"}]}),
        );
        assert_eq!(check(&f, &json!({"event": "a"})), Ok(true));
        assert_eq!(
            check(&f, &json!({"event": "b"})),
            Err(FilterError::Action("12".into()))
        );
        let invalid = filters(json!({"events": "nope"}));
        assert!(matches!(
            check(&invalid, &json!({})),
            Err(FilterError::Invalid(_))
        ));
    }
}
