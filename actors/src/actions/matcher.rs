//! Which actions an event matches (PostHog's `ActionMatcher`): an action matches when one of
//! its steps does, and a step when every condition it sets holds: the event's name; its
//! `$current_url` (`contains` with SQL `LIKE`'s `%` and `_`, `regex` (RE2), or `exact`); the
//! element chain (`tag_name`, `text`, `href` on any element, `selector` as CSS); and its
//! property filters (event, person and element properties, as composeWebhook's filters).

use regex::Regex;
use serde_json::{Map, Value, json};

use super::selector::Selector;
use crate::plugins::filters::{FilterSubject, WebhookFilters};

/// An action whose matches post to the team's webhook.
#[derive(Debug, Clone)]
pub struct Action {
    pub id: i64,
    pub team_id: i64,
    pub name: String,
    /// `slack_message_format`; empty for the default message.
    pub message_format: String,
    pub steps: Vec<ActionStep>,
}

/// A step, prepared once when the actions are loaded.
#[derive(Debug, Clone)]
pub struct ActionStep {
    event: Option<String>,
    url: Option<UrlRule>,
    tag_name: Option<String>,
    text: Option<String>,
    href: Option<String>,
    /// `Err` for a selector this server cannot read: the step never matches.
    selector: Option<Result<Selector, UnreadableSelector>>,
    properties: Option<WebhookFilters>,
}

#[derive(Debug, Clone)]
enum UrlRule {
    Exact(String),
    /// `contains` and `regex`, as a compiled pattern (or why it does not compile).
    Pattern(Result<Regex, regex::Error>),
}

/// A step's CSS selector that `Selector::parse` does not understand.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unreadable selector {0:?}")]
struct UnreadableSelector(String);

/// A step as `posthog_actionstep` stores it.
#[derive(Debug, Clone, Default)]
pub struct StepRow {
    pub event: Option<String>,
    pub url: Option<String>,
    pub url_matching: Option<String>,
    pub tag_name: Option<String>,
    pub text: Option<String>,
    pub href: Option<String>,
    pub selector: Option<String>,
    pub properties: Option<Value>,
}

impl StepRow {
    /// A step of `posthog_action.steps_json`, whose keys are the columns' names.
    pub fn from_json(step: &Value) -> Self {
        let text = |key: &str| step.get(key).and_then(Value::as_str).map(str::to_owned);
        Self {
            event: text("event"),
            url: text("url"),
            url_matching: text("url_matching"),
            tag_name: text("tag_name"),
            text: text("text"),
            href: text("href"),
            selector: text("selector"),
            properties: step.get("properties").filter(|p| !p.is_null()).cloned(),
        }
    }
}

/// Empty strings in PostHog's columns mean "no condition".
fn set(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.is_empty())
}

impl ActionStep {
    pub fn prepare(row: StepRow) -> Self {
        let url = set(row.url).map(|url| match row.url_matching.as_deref() {
            Some("exact") => UrlRule::Exact(url),
            Some("regex") => UrlRule::Pattern(Regex::new(&url)),
            // `contains`, the default, is SQL LIKE '%url%': `%` any run, `_` any character.
            _ => {
                let pattern: String = url
                    .chars()
                    .map(|c| match c {
                        '%' => ".*".to_owned(),
                        '_' => ".".to_owned(),
                        other => regex::escape(&other.to_string()),
                    })
                    .collect();
                UrlRule::Pattern(Regex::new(&format!("(?s){pattern}")))
            }
        });
        let properties = row
            .properties
            .filter(|properties| properties.as_array().is_some_and(|list| !list.is_empty()))
            .and_then(|properties| {
                WebhookFilters::from_json(&json!({ "events": [{ "properties": properties }] }))
            });
        Self {
            event: set(row.event),
            url,
            tag_name: set(row.tag_name),
            text: set(row.text),
            href: set(row.href),
            selector: set(row.selector)
                .map(|text| Selector::parse(&text).ok_or(UnreadableSelector(text))),
            properties,
        }
    }

    /// `event` is `{event, properties, elements}` as onEvent sees it.
    fn matches(&self, event: &Value, person_properties: Option<&Map<String, Value>>) -> bool {
        let name = event.get("event").and_then(Value::as_str);
        if self
            .event
            .as_deref()
            .is_some_and(|wanted| Some(wanted) != name)
        {
            return false;
        }
        if let Some(rule) = &self.url {
            let url = event
                .pointer("/properties/$current_url")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let matched = match rule {
                UrlRule::Exact(wanted) => url == wanted,
                UrlRule::Pattern(Ok(pattern)) => pattern.is_match(url),
                UrlRule::Pattern(Err(_)) => false,
            };
            if !matched {
                return false;
            }
        }
        let elements = event
            .get("elements")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let any = |wanted: &Option<String>, read: &dyn Fn(&Value) -> Option<String>| {
            wanted.as_ref().is_none_or(|wanted| {
                elements
                    .iter()
                    .any(|element| read(element).as_deref() == Some(wanted.as_str()))
            })
        };
        let field = |key: &'static str| {
            move |element: &Value| element.get(key).and_then(Value::as_str).map(str::to_owned)
        };
        let href = |element: &Value| {
            element
                .get("href")
                .or_else(|| element.pointer("/attributes/attr__href"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        if !any(&self.tag_name, &field("tag_name"))
            || !any(&self.text, &field("text"))
            || !any(&self.href, &href)
        {
            return false;
        }
        match &self.selector {
            Some(Ok(selector)) if !selector.matches(elements) => return false,
            Some(Err(_)) => return false,
            _ => {}
        }
        self.properties.as_ref().is_none_or(|filters| {
            filters
                .matches(FilterSubject {
                    event,
                    person_properties,
                })
                .unwrap_or(false)
        })
    }
}

impl Action {
    pub fn matches(&self, event: &Value, person_properties: Option<&Map<String, Value>>) -> bool {
        self.steps
            .iter()
            .any(|step| step.matches(event, person_properties))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(steps: Vec<StepRow>) -> Action {
        Action {
            id: 1,
            team_id: 2,
            name: "Clicked next".to_owned(),
            message_format: String::new(),
            steps: steps.into_iter().map(ActionStep::prepare).collect(),
        }
    }

    fn autocapture(url: &str) -> Value {
        json!({
            "event": "$autocapture",
            "properties": {"$current_url": url, "plan": "pro"},
            "elements": [
                {"tag_name": "a", "text": "Next", "href": "/next", "attr_class": ["btn"]},
                {"tag_name": "div", "attr_class": ["nav"]},
            ],
        })
    }

    fn step(event: &str) -> StepRow {
        StepRow {
            event: Some(event.to_owned()),
            ..StepRow::default()
        }
    }

    #[test]
    fn posthogs_webhook_scenario_an_autocapture_step() {
        let matching = action(vec![StepRow {
            tag_name: Some("a".to_owned()),
            text: Some("Next".to_owned()),
            url: Some("example.com/docs".to_owned()),
            ..step("$autocapture")
        }]);
        assert!(matching.matches(&autocapture("https://example.com/docs/x"), None));
        assert!(!matching.matches(&autocapture("https://example.com/blog"), None));
    }

    #[test]
    fn any_step_is_enough_and_every_condition_of_it_must_hold() {
        let two_steps = action(vec![
            step("$pageview"),
            StepRow {
                text: Some("Previous".to_owned()),
                ..step("$autocapture")
            },
        ]);
        assert!(!two_steps.matches(&autocapture("https://x"), None));
        let with_pageview = action(vec![step("$pageview"), step("$autocapture")]);
        assert!(with_pageview.matches(&autocapture("https://x"), None));
    }

    #[test]
    fn url_matching_contains_like_regex_and_exact() {
        let url = |url: &str, matching: Option<&str>| {
            action(vec![StepRow {
                url: Some(url.to_owned()),
                url_matching: matching.map(str::to_owned),
                ..StepRow::default()
            }])
        };
        let event = autocapture("https://example.com/docs/install");
        assert!(url("docs", None).matches(&event, None));
        assert!(url("example.com/%/install", Some("contains")).matches(&event, None));
        assert!(
            url("example_com", Some("contains")).matches(&event, None),
            "_ is any character"
        );
        assert!(!url("Docs", Some("contains")).matches(&event, None));
        assert!(url(r"^https://[a-z.]+/docs/", Some("regex")).matches(&event, None));
        assert!(
            !url("(", Some("regex")).matches(&event, None),
            "an invalid regex never matches"
        );
        assert!(url("https://example.com/docs/install", Some("exact")).matches(&event, None));
        assert!(!url("https://example.com/docs", Some("exact")).matches(&event, None));
    }

    #[test]
    fn selectors_hrefs_and_property_filters() {
        let selector = |text: &str| {
            action(vec![StepRow {
                selector: Some(text.to_owned()),
                ..StepRow::default()
            }])
        };
        let event = autocapture("https://x");
        assert!(selector("div.nav > a.btn").matches(&event, None));
        assert!(!selector("div.other a").matches(&event, None));
        assert!(
            !selector("a:hover").matches(&event, None),
            "unreadable selectors never match"
        );
        let href = action(vec![StepRow {
            href: Some("/next".to_owned()),
            ..StepRow::default()
        }]);
        assert!(href.matches(&event, None));
        let filtered = |properties: Value| {
            action(vec![StepRow {
                properties: Some(properties),
                ..step("$autocapture")
            }])
        };
        assert!(
            filtered(json!([{"key": "plan", "value": "pro", "type": "event"}]))
                .matches(&event, None)
        );
        assert!(
            !filtered(json!([{"key": "plan", "value": "free", "type": "event"}]))
                .matches(&event, None)
        );
        let person = json!({"email": "a@b.c"});
        let by_person = filtered(json!([{"key": "email", "value": "a@b.c", "type": "person"}]));
        assert!(by_person.matches(&event, person.as_object()));
        assert!(!by_person.matches(&event, None));
    }
}
