//! The message an action's match posts (PostHog's `getFormattedMessage`): the action's
//! `slack_message_format`, or `[action.name] was triggered by [person]`, with each `[token]`
//! replaced, once as plain text and once as the webhook's markdown (links to the PostHog app at
//! SITE_URL). Slack gets `{text, blocks: [mrkdwn]}`, any other webhook `{text: markdown}`.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value, json};

use super::matcher::Action;
use crate::event::js::to_js_string;

const DEFAULT_FORMAT: &str = "[action.name] was triggered by [person]";

static TOKEN: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\[([^\[\]]*)\]").ok());

/// Where a webhook URL points, which decides the link syntax and the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookKind {
    Slack,
    Discord,
    Teams,
    Other,
}

impl WebhookKind {
    pub fn of(url: &str) -> Self {
        if url.contains("slack.com") {
            Self::Slack
        } else if url.contains("discord.com") {
            Self::Discord
        } else if url.contains("office.com") || url.contains("office365.com") {
            Self::Teams
        } else {
            Self::Other
        }
    }

    fn link(self, text: &str, url: &str) -> String {
        match self {
            Self::Slack => format!("<{url}|{text}>"),
            Self::Discord | Self::Teams | Self::Other => format!("[{text}]({url})"),
        }
    }
}

/// What the message can name: the matched event and its person.
pub struct MessageEvent<'a> {
    pub name: &'a str,
    pub uuid: &'a str,
    pub distinct_id: &'a str,
    pub properties: &'a Map<String, Value>,
    pub person_properties: Option<&'a Map<String, Value>>,
}

/// `(text, markdown)` of the action's message for `event`.
pub fn message(
    action: &Action,
    event: &MessageEvent<'_>,
    site_url: &str,
    kind: WebhookKind,
) -> (String, String) {
    let format = if action.message_format.is_empty() {
        DEFAULT_FORMAT
    } else {
        action.message_format.as_str()
    };
    let Some(token) = TOKEN.as_ref() else {
        return (format.to_owned(), format.to_owned());
    };
    let mut text = String::new();
    let mut markdown = String::new();
    let mut last = 0;
    for found in token.captures_iter(format) {
        let (Some(whole), Some(name)) = (found.get(0), found.get(1)) else {
            continue;
        };
        let Some((plain, marked)) = value_of(name.as_str(), action, event, site_url, kind) else {
            let error = format!(
                "⚠ Error: There are one or more formatting errors in the message template for action \"{}\".",
                action.name
            );
            return (error.clone(), format!("*{error}*"));
        };
        text.push_str(&format[last..whole.start()]);
        markdown.push_str(&format[last..whole.start()]);
        text.push_str(&plain);
        markdown.push_str(&marked);
        last = whole.end();
    }
    text.push_str(&format[last..]);
    markdown.push_str(&format[last..]);
    (text, markdown)
}

/// The JSON body posted to the webhook.
pub fn payload(kind: WebhookKind, text: &str, markdown: &str) -> Value {
    match kind {
        WebhookKind::Slack => json!({
            "text": text,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": markdown}}],
        }),
        WebhookKind::Discord | WebhookKind::Teams | WebhookKind::Other => {
            json!({ "text": markdown })
        }
    }
}

/// A token's `(text, markdown)`; `None` for a token PostHog does not know either.
fn value_of(
    token: &str,
    action: &Action,
    event: &MessageEvent<'_>,
    site_url: &str,
    kind: WebhookKind,
) -> Option<(String, String)> {
    let site = site_url.trim_end_matches('/');
    let parts: Vec<&str> = token.split('.').collect();
    let plain = |value: String| Some((value.clone(), value));
    let property = |properties: Option<&Map<String, Value>>, path: &[&str]| {
        let mut value = Value::Object(properties?.clone());
        for key in path {
            value = value.get(*key)?.clone();
        }
        Some(to_js_string(&value))
    };
    match parts.as_slice() {
        ["action", "name"] => {
            let link = format!("{site}/action/{}", action.id);
            Some((action.name.clone(), kind.link(&action.name, &link)))
        }
        ["action", "link"] => plain(format!("{site}/action/{}", action.id)),
        ["person" | "user"] => {
            let shown = event
                .person_properties
                .and_then(|person| person.get("email"))
                .map(to_js_string)
                .unwrap_or_else(|| event.distinct_id.to_owned());
            let link = person_link(site, event.distinct_id);
            Some((shown.clone(), kind.link(&shown, &link)))
        }
        ["person" | "user", "link"] => plain(person_link(site, event.distinct_id)),
        ["person" | "user", "properties", path @ ..] if !path.is_empty() => {
            plain(property(event.person_properties, path).unwrap_or_default())
        }
        ["event"] | ["event", "name"] => {
            let link = format!("{site}/events/{}", event.uuid);
            Some((event.name.to_owned(), kind.link(event.name, &link)))
        }
        ["event", "link"] => plain(format!("{site}/events/{}", event.uuid)),
        ["event", "uuid"] => plain(event.uuid.to_owned()),
        ["event", "distinct_id"] => plain(event.distinct_id.to_owned()),
        ["event", "properties", path @ ..] if !path.is_empty() => {
            plain(property(Some(event.properties), path).unwrap_or_default())
        }
        _ => None,
    }
}

fn person_link(site: &str, distinct_id: &str) -> String {
    let encoded: String = url::form_urlencoded::byte_serialize(distinct_id.as_bytes()).collect();
    format!("{site}/person/{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(format: &str) -> Action {
        Action {
            id: 7,
            team_id: 2,
            name: "Signed up".to_owned(),
            message_format: format.to_owned(),
            steps: Vec::new(),
        }
    }

    fn render(format: &str, kind: WebhookKind) -> (String, String) {
        let properties = json!({"plan": "pro", "nested": {"a": 1}});
        let person = json!({"email": "ada@example.com"});
        let event = MessageEvent {
            name: "signup",
            uuid: "0190-uuid",
            distinct_id: "user 1",
            properties: properties.as_object().unwrap(),
            person_properties: person.as_object(),
        };
        message(&action(format), &event, "https://app.example.com/", kind)
    }

    #[test]
    fn posthogs_functional_case_a_format_without_tokens() {
        let (text, markdown) = render("default", WebhookKind::Other);
        assert_eq!(
            payload(WebhookKind::Other, &text, &markdown),
            json!({"text": "default"})
        );
    }

    #[test]
    fn the_default_format_links_the_action_and_the_person() {
        let (text, markdown) = render("", WebhookKind::Slack);
        assert_eq!(text, "Signed up was triggered by ada@example.com");
        assert_eq!(
            markdown,
            "<https://app.example.com/action/7|Signed up> was triggered by \
             <https://app.example.com/person/user+1|ada@example.com>"
        );
        let body = payload(WebhookKind::Slack, &text, &markdown);
        assert_eq!(body["blocks"][0]["text"]["type"], "mrkdwn");
        let (_, discord) = render("[event]", WebhookKind::Discord);
        assert_eq!(
            discord,
            "[signup](https://app.example.com/events/0190-uuid)"
        );
    }

    #[test]
    fn properties_and_plain_tokens() {
        let (text, _) = render(
            "[event.properties.plan] [event.properties.nested] [event.properties.missing] \
             [person.properties.email] [event.distinct_id] [event.uuid] [action.link]",
            WebhookKind::Other,
        );
        assert_eq!(
            text,
            "pro [object Object]  ada@example.com user 1 0190-uuid https://app.example.com/action/7"
        );
    }

    #[test]
    fn an_unknown_token_gives_posthogs_error_message() {
        let (text, markdown) = render("[nope.x]", WebhookKind::Slack);
        assert!(text.starts_with("⚠ Error: There are one or more formatting errors"));
        assert!(markdown.starts_with("*⚠ Error"));
    }
}
