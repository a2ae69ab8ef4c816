//! The type of a property, decided by the first value a team sends for it (PostHog's
//! `detectPropertyDefinitionTypes`, as its `definitions.test.ts` checks it).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

/// `posthog_propertydefinition.property_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyType {
    String,
    Numeric,
    DateTime,
    Boolean,
}

impl PropertyType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "String",
            Self::Numeric => "Numeric",
            Self::DateTime => "DateTime",
            Self::Boolean => "Boolean",
        }
    }
}

/// A number written as a string: `2`, `-2.1234`, `1e3`.
static NUMERIC: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$").ok());

/// The date formats PostHog recognizes: `2020-01-01`, `2020/01/01`, `01-01-2020`,
/// `01/01/2020`, each optionally followed by a time (` ` or `T`, fractions, a zone).
static DATE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"^(\d{4}[-/]\d{2}[-/]\d{2}|\d{2}[-/]\d{2}[-/]\d{4})([ T]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?)?$",
    )
    .ok()
});

/// Seconds (10 digits, with optional fractions) or milliseconds (13 digits) since the epoch:
/// 2001 to 2286.
static UNIX_TIMESTAMP: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"^(\d{10}(\.\d*)?|\d{13})$").ok());

fn matches(pattern: &LazyLock<Option<Regex>>, text: &str) -> bool {
    pattern.as_ref().is_some_and(|regex| regex.is_match(text))
}

/// `None` for values that give no type (objects, arrays, null).
pub fn detect_property_type(key: &str, value: &Value) -> Option<PropertyType> {
    // Campaign parameters are strings even when the first one looks like a number.
    if key
        .get(..4)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("utm_"))
    {
        return Some(PropertyType::String);
    }
    let timestamp_key = || key.to_ascii_lowercase().contains("time");
    match value {
        Value::Bool(_) => Some(PropertyType::Boolean),
        Value::Number(number) => {
            if timestamp_key() && matches(&UNIX_TIMESTAMP, &number.to_string()) {
                Some(PropertyType::DateTime)
            } else {
                Some(PropertyType::Numeric)
            }
        }
        Value::String(text) => {
            let text = text.trim();
            if matches!(text, "true" | "false" | "TRUE" | "FALSE") {
                Some(PropertyType::Boolean)
            } else if timestamp_key() && matches(&UNIX_TIMESTAMP, text) {
                Some(PropertyType::DateTime)
            } else if matches(&NUMERIC, text) {
                Some(PropertyType::Numeric)
            } else if matches(&DATE, text) || chrono::DateTime::parse_from_rfc2822(text).is_ok() {
                Some(PropertyType::DateTime)
            } else {
                Some(PropertyType::String)
            }
        }
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn detect(key: &str, value: Value) -> Option<&'static str> {
        detect_property_type(key, &value).map(PropertyType::as_str)
    }

    /// The cases of PostHog's `definitions.test.ts`.
    #[test]
    fn posthogs_functional_cases() {
        assert_eq!(detect("property", json!("hehe")), Some("String"));
        for value in [json!(2), json!(2.1234), json!("2"), json!("2.1234")] {
            assert_eq!(
                detect("property", value.clone()),
                Some("Numeric"),
                "{value}"
            );
        }
        for value in [
            "01/01/2020 00:00:00",
            "01-01-2020 00:00:00",
            "2020/01/01 00:00:00",
            "2020-01-01T00:00:00Z",
            "2020-01-01 00:00:00",
            "2020-01-01",
        ] {
            assert_eq!(
                detect("property", json!(value)),
                Some("DateTime"),
                "{value}"
            );
        }
        assert_eq!(detect("property", json!(true)), Some("Boolean"));
        assert_eq!(detect("property", json!("true")), Some("Boolean"));
        assert_eq!(detect("utm_abc", json!(1234)), Some("String"));
        assert_eq!(detect("UTM_123", json!("1234")), Some("String"));
    }

    #[test]
    fn epoch_numbers_are_datetimes_only_under_time_keys() {
        assert_eq!(detect("timestamp", json!(1_700_000_000)), Some("DateTime"));
        assert_eq!(detect("sentTime", json!("1700000000000")), Some("DateTime"));
        assert_eq!(
            detect("signup_time", json!(1_700_000_000.5)),
            Some("DateTime")
        );
        assert_eq!(detect("count", json!(1_700_000_000)), Some("Numeric"));
        assert_eq!(detect("timestamp", json!(17)), Some("Numeric"));
    }

    #[test]
    fn other_values() {
        assert_eq!(
            detect("p", json!("Tue, 1 Jul 2003 10:52:37 +0200")),
            Some("DateTime")
        );
        assert_eq!(detect("p", json!("2020-13")), Some("String"));
        assert_eq!(detect("p", json!(" FALSE ")), Some("Boolean"));
        assert_eq!(detect("p", json!("")), Some("String"));
        assert_eq!(detect("p", json!({"a": 1})), None);
        assert_eq!(detect("p", json!([1])), None);
        assert_eq!(detect("p", Value::Null), None);
        assert_eq!(detect("ü", json!("x")), Some("String"));
        assert_eq!(
            detect("üab", json!("x")),
            Some("String"),
            "no panic on a char boundary"
        );
    }
}
