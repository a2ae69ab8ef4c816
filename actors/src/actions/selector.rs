//! The CSS selectors of action steps (`div.btn > a#next[data-attr="x"]`), matched against an
//! event's element chain, clicked element first then its ancestors, with the usual meaning:
//! the last part is the clicked element; a part before `>` is its parent, a part before a
//! space any ancestor. A part may have a tag, `.classes`, an `#id`, `[attribute="value"]`s and
//! `:nth-child(n)` / `:nth-of-type(n)`; `*` matches any element.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Default)]
struct Part {
    tag: Option<String>,
    classes: Vec<String>,
    id: Option<String>,
    attributes: Vec<(String, String)>,
    nth_child: Option<i64>,
    nth_of_type: Option<i64>,
    /// This part is the parent of the next one (`>`), not any ancestor.
    parent_of_next: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    parts: Vec<Part>,
}

impl Selector {
    /// `None` for a selector with no parts or one this parser does not understand.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts: Vec<Part> = Vec::new();
        let spaced = text.replace('>', " > ");
        for token in spaced.split_whitespace() {
            if token == ">" {
                parts.last_mut()?.parent_of_next = true;
                continue;
            }
            parts.push(parse_part(token)?);
        }
        (!parts.is_empty()).then_some(Self { parts })
    }

    /// Whether the chain (clicked element first) matches.
    pub fn matches(&self, elements: &[Value]) -> bool {
        let Some((last, ancestors)) = self.parts.split_last() else {
            return false;
        };
        match elements.first() {
            Some(clicked) if last.matches(clicked) => matches_upwards(ancestors, &elements[1..]),
            _ => false,
        }
    }
}

/// `parts` (outermost first) against the ancestors (nearest first) of an element that matched
/// the part after them.
fn matches_upwards(parts: &[Part], ancestors: &[Value]) -> bool {
    let Some((part, outer)) = parts.split_last() else {
        return true;
    };
    if part.parent_of_next {
        return ancestors
            .first()
            .is_some_and(|parent| part.matches(parent) && matches_upwards(outer, &ancestors[1..]));
    }
    (0..ancestors.len()).any(|index| {
        part.matches(&ancestors[index]) && matches_upwards(outer, &ancestors[index + 1..])
    })
}

impl Part {
    fn matches(&self, element: &Value) -> bool {
        let text = |key: &str| element.get(key).and_then(Value::as_str);
        if self
            .tag
            .as_deref()
            .is_some_and(|tag| text("tag_name") != Some(tag))
        {
            return false;
        }
        if self
            .id
            .as_deref()
            .is_some_and(|id| text("attr_id") != Some(id))
        {
            return false;
        }
        let classes: Vec<&str> = match element.get("attr_class") {
            Some(Value::Array(classes)) => classes.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(classes)) => classes.split_whitespace().collect(),
            _ => Vec::new(),
        };
        if !self
            .classes
            .iter()
            .all(|class| classes.contains(&class.as_str()))
        {
            return false;
        }
        let number = |key: &str| element.get(key).and_then(Value::as_i64);
        if self
            .nth_child
            .is_some_and(|n| number("nth_child") != Some(n))
            || self
                .nth_of_type
                .is_some_and(|n| number("nth_of_type") != Some(n))
        {
            return false;
        }
        self.attributes.iter().all(|(name, value)| {
            let attribute = element
                .get("attributes")
                .and_then(|attributes| attributes.get(format!("attr__{name}")))
                .and_then(Value::as_str);
            let direct = match name.as_str() {
                "href" => text("href"),
                "id" => text("attr_id"),
                _ => None,
            };
            attribute.or(direct) == Some(value.as_str())
        })
    }
}

fn parse_part(token: &str) -> Option<Part> {
    let mut part = Part::default();
    let mut rest = token;
    let tag_end = rest.find(['.', '#', '[', ':']).unwrap_or(rest.len());
    let tag = &rest[..tag_end];
    if !tag.is_empty() && tag != "*" {
        part.tag = Some(tag.to_owned());
    }
    rest = &rest[tag_end..];
    while let Some(marker) = rest.chars().next() {
        rest = &rest[marker.len_utf8()..];
        match marker {
            '.' | '#' => {
                let end = rest.find(['.', '#', '[', ':']).unwrap_or(rest.len());
                let name = rest[..end].to_owned();
                if name.is_empty() {
                    return None;
                }
                if marker == '.' {
                    part.classes.push(name);
                } else {
                    part.id = Some(name);
                }
                rest = &rest[end..];
            }
            '[' => {
                let end = rest.find(']')?;
                let (name, value) = rest[..end].split_once('=')?;
                let value = value.trim_matches(|c| c == '"' || c == '\'');
                part.attributes
                    .push((name.trim().to_owned(), value.to_owned()));
                rest = &rest[end + 1..];
            }
            ':' => {
                let end = rest.find(')')?;
                let (pseudo, argument) = rest[..end].split_once('(')?;
                let n = argument.trim().parse().ok()?;
                match pseudo {
                    "nth-child" => part.nth_child = Some(n),
                    "nth-of-type" => part.nth_of_type = Some(n),
                    _ => return None,
                }
                rest = &rest[end + 1..];
            }
            _ => return None,
        }
    }
    Some(part)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chain() -> Vec<Value> {
        vec![
            json!({"tag_name": "a", "attr_id": "next", "attr_class": ["btn", "big"], "nth_child": 2,
                   "attributes": {"attr__data-attr": "go", "attr__href": "/next"}, "href": "/next"}),
            json!({"tag_name": "div", "attr_class": ["nav"]}),
            json!({"tag_name": "section"}),
            json!({"tag_name": "body"}),
        ]
    }

    fn matches(selector: &str) -> bool {
        Selector::parse(selector).expect("parses").matches(&chain())
    }

    #[test]
    fn the_last_part_is_the_clicked_element() {
        assert!(matches("a"));
        assert!(matches("a#next.btn.big"));
        assert!(matches("a[data-attr=\"go\"]"));
        assert!(matches("a[href='/next']:nth-child(2)"));
        assert!(matches("*"));
        assert!(!matches("div"));
        assert!(!matches("a.small"));
        assert!(!matches("a:nth-child(3)"));
    }

    #[test]
    fn ancestors_and_parents() {
        assert!(matches("div.nav > a"));
        assert!(matches("section a"));
        assert!(matches("body section > div a.btn"));
        assert!(!matches("section > a"), "section is not a's parent");
        assert!(!matches("span a"));
    }

    #[test]
    fn what_does_not_parse() {
        assert!(Selector::parse("").is_none());
        assert!(Selector::parse("a:hover").is_none());
        assert!(Selector::parse("a[href").is_none());
        assert!(Selector::parse("> a").is_none());
    }
}
