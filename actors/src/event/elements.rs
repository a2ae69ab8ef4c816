//! The `elements_chain` column: autocapture's clicked element and its ancestors, flattened
//! into one string that ClickHouse can match with regular expressions (spec 1.8, PostHog's
//! `extractElements` and `elementsToString`).
//!
//! Actions match on this exact text, so the format, the attribute order and the escaping
//! follow PostHog's to the character.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use super::js::{is_truthy, to_js_string};

/// Longer element texts are cut: they are page content, not selectors.
const MAX_TEXT_CHARS: usize = 400;
/// Longer links are cut in the `href` pair (the raw `attr__href` pair is kept whole).
const MAX_HREF_CHARS: usize = 2048;

/// Builds the chain from the entries of `properties.$elements`: one part per element, joined
/// by `;`, each `tag.classA.classB:` followed by its `key="value"` pairs sorted by key.
///
/// Where PostHog's JavaScript would throw (a `null` attribute value, a non-string text) the
/// chain skips the attribute or stringifies the value instead of losing the event.
pub fn elements_chain(elements: &[Value]) -> String {
    let mut chain = String::new();
    for (index, element) in elements.iter().enumerate() {
        if index > 0 {
            chain.push(';');
        }
        append_element(&mut chain, element);
    }
    chain
}

fn append_element(chain: &mut String, element: &Value) {
    // A non-object entry has no fields; PostHog renders it like an empty element.
    let field = |name: &str| element.get(name).filter(|value| !value.is_null());
    let truthy_field = |name: &str| field(name).filter(|value| is_truthy(value));

    if let Some(tag_name) = truthy_field("tag_name") {
        chain.push_str(&to_js_string(tag_name));
    }

    if let Some(attr_class) = truthy_field("attr__class") {
        let mut classes: Vec<String> = match attr_class {
            Value::Array(items) => items.iter().map(to_js_string).collect(),
            // A single space, as in PostHog: doubled spaces give empty class names.
            other => to_js_string(other).split(' ').map(str::to_owned).collect(),
        };
        classes.sort();
        for class in &classes {
            chain.push('.');
            chain.extend(class.chars().filter(|character| *character != '"'));
        }
    }

    let mut attributes: Vec<(Cow<'_, str>, String)> = Vec::new();
    if let Some(text) = truthy_field("$el_text") {
        let text = truncate_chars(to_js_string(text), MAX_TEXT_CHARS);
        if !text.is_empty() {
            attributes.push((Cow::Borrowed("text"), text));
        }
    }
    let position = |name: &str| field(name).map_or_else(|| "0".to_owned(), to_js_string);
    attributes.push((Cow::Borrowed("nth-child"), position("nth_child")));
    attributes.push((Cow::Borrowed("nth-of-type"), position("nth_of_type")));
    if let Some(href) = truthy_field("attr__href") {
        let href = truncate_chars(to_js_string(href), MAX_HREF_CHARS);
        if !href.is_empty() {
            attributes.push((Cow::Borrowed("href"), href));
        }
    }
    if let Some(id) = truthy_field("attr__id") {
        attributes.push((Cow::Borrowed("attr_id"), to_js_string(id)));
    }
    if let Some(fields) = element.as_object() {
        for (key, value) in fields {
            if key.starts_with("attr__") && !value.is_null() {
                attributes.push((Cow::Borrowed(key.as_str()), to_js_string(value)));
            }
        }
    }
    attributes.sort_by(|(left, _), (right, _)| locale_compare(left, right));

    chain.push(':');
    for (key, value) in &attributes {
        push_escaped(chain, key);
        chain.push_str("=\"");
        push_escaped(chain, value);
        chain.push('"');
    }
}

/// PostHog's `escapeQuotes`: only `"` is escaped, backslashes are left as they are.
fn push_escaped(chain: &mut String, text: &str) {
    for character in text.chars() {
        if character == '"' {
            chain.push('\\');
        }
        chain.push(character);
    }
}

/// The first `max_chars` characters. PostHog cuts UTF-16 units, which can split a surrogate
/// pair; cutting characters keeps the text valid.
fn truncate_chars(mut text: String, max_chars: usize) -> String {
    if let Some((byte_index, _)) = text.char_indices().nth(max_chars) {
        text.truncate(byte_index);
    }
    text
}

/// JavaScript's `a.localeCompare(b)` as V8 computes it with ICU's root collation, for the
/// characters attribute names contain: whitespace, then punctuation in ICU's order, then
/// digits, then letters ignoring case; case only breaks ties, lowercase first. Characters
/// outside ASCII sort after, by code point.
fn locale_compare(left: &str, right: &str) -> Ordering {
    let primary = left
        .chars()
        .map(primary_weight)
        .cmp(right.chars().map(primary_weight));
    primary
        .then_with(|| {
            left.chars()
                .map(|character| character.is_ascii_uppercase())
                .cmp(
                    right
                        .chars()
                        .map(|character| character.is_ascii_uppercase()),
                )
        })
        .then_with(|| left.cmp(right))
}

/// ICU root collation order of ASCII whitespace and punctuation (non-ignorable).
const COLLATION_SYMBOLS: &str = "\t\n\u{b}\u{c}\r _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$";

fn primary_weight(character: char) -> u32 {
    const DIGITS: u32 = 100;
    const LETTERS: u32 = 200;
    const OTHERS: u32 = 1000;
    if let Some(index) = COLLATION_SYMBOLS.find(character) {
        // The symbols are ASCII, so the byte index is the rank.
        return 1 + index as u32;
    }
    if let Some(digit) = character.to_digit(10) {
        return DIGITS + digit;
    }
    if character.is_ascii_alphabetic() {
        return LETTERS + u32::from(character.to_ascii_lowercase()) - u32::from('a');
    }
    if character.is_ascii() {
        // Control characters are ignorable in ICU; first is the closest simple rule.
        return 0;
    }
    OTHERS + u32::from(character)
}

/// PostHog's `chainToElements`, then `convertDatabaseElementsToRawElements`: the elements a
/// plugin's `onEvent`/`exportEvents` sees, rebuilt from the stored chain. Each element is
/// `{attributes, order, tag_name, attr_class?, <chain pairs>}`; the pairs `href`, `text` and
/// `attr_id` become fields, `nth-child`/`nth-of-type` become numbers, any other pair goes into
/// `attributes`; `attr_class` comes from `attributes.attr__class` when present and `$el_text`
/// repeats a non-empty `text`. Values stay escaped as stored, as in PostHog.
pub fn chain_to_elements(chain: &str) -> Vec<Value> {
    let chain: String = chain.chars().filter(|c| *c != '\n').collect();
    split_chain(&chain)
        .into_iter()
        .enumerate()
        .map(|(order, part)| parse_element(part, order))
        .collect()
}

/// The elements of a chain: runs of characters other than whitespace, `;` and `"`, and quoted
/// strings (with backslash escapes) wherever they appear.
fn split_chain(chain: &str) -> Vec<&str> {
    let bytes = chain.as_bytes();
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte == b'"' {
            if let Some(end) = closing_quote(bytes, index + 1) {
                start.get_or_insert(index);
                index = end + 1;
                continue;
            }
        } else if !(byte.is_ascii_whitespace() || byte == b';') {
            start.get_or_insert(index);
            index += 1;
            continue;
        }
        // A separator, or a quote that is never closed.
        if let Some(begin) = start.take() {
            parts.push(&chain[begin..index]);
        }
        index += 1;
    }
    if let Some(begin) = start {
        parts.push(&chain[begin..]);
    }
    parts
}

fn closing_quote(bytes: &[u8], mut index: usize) -> Option<usize> {
    while index < bytes.len() {
        match bytes[index] {
            b'\\' if index + 1 < bytes.len() => index += 2,
            b'"' => return Some(index),
            _ => index += 1,
        }
    }
    None
}

fn parse_element(part: &str, order: usize) -> Value {
    let mut element = serde_json::Map::new();
    element.insert("attributes".into(), Value::Object(serde_json::Map::new()));
    element.insert("order".into(), Value::from(order));
    // Tag and classes end at the first `:` that starts `name=…`; classes may contain `:`.
    let (selector, pairs) = match attributes_start(part) {
        Some(colon) => (&part[..colon], &part[colon + 1..]),
        None => (part, ""),
    };
    if !selector.is_empty() {
        let mut names = selector.split('.');
        if let Some(tag) = names.next() {
            element.insert("tag_name".into(), Value::String(tag.to_owned()));
        }
        let classes: Vec<Value> = names
            .filter(|name| !name.is_empty())
            .map(|name| Value::String(name.to_owned()))
            .collect();
        if selector.contains('.') {
            element.insert("attr_class".into(), Value::Array(classes));
        }
    }
    let mut attributes = serde_json::Map::new();
    for (key, value) in attribute_pairs(pairs) {
        let field = match key {
            "href" => "href",
            "text" => "text",
            "attr_id" => "attr_id",
            "nth-child" => "nth_child",
            "nth-of-type" => "nth_of_type",
            "" => continue,
            other => {
                attributes.insert(other.to_owned(), Value::String(value.to_owned()));
                continue;
            }
        };
        let value = if field.starts_with("nth_") {
            js_parse_int(value).map_or(Value::Null, Value::from)
        } else {
            Value::String(value.to_owned())
        };
        element.insert(field.into(), value);
    }
    if let Some(class) = attributes.get("attr__class") {
        element.insert("attr_class".into(), class.clone());
    }
    if let Some(text) = element.get("text").filter(|text| is_truthy(text)).cloned() {
        element.insert("$el_text".into(), text);
    }
    element.insert("attributes".into(), Value::Object(attributes));
    Value::Object(element)
}

/// Where `:name=` starts the attribute pairs (`name` of letters, digits, `_` and `-`).
fn attributes_start(part: &str) -> Option<usize> {
    part.match_indices(':').map(|(i, _)| i).find(|&colon| {
        let rest = &part[colon + 1..];
        rest.find('=').is_some_and(|eq| {
            rest[..eq]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
    })
}

/// PostHog's `/((.*?)="(.*?[^\\])")/g`: the shortest key before `="`, then the shortest value
/// of at least one character whose closing `"` is not escaped.
fn attribute_pairs(pairs: &str) -> Vec<(&str, &str)> {
    let mut found = Vec::new();
    let mut rest = pairs;
    while let Some(eq) = rest.find("=\"") {
        let key = &rest[..eq];
        let value_start = eq + 2;
        let bytes = rest.as_bytes();
        let close =
            (value_start + 1..bytes.len()).find(|&i| bytes[i] == b'"' && bytes[i - 1] != b'\\');
        let Some(close) = close else { break };
        found.push((key, &rest[value_start..close]));
        rest = &rest[close + 1..];
    }
    found
}

/// JavaScript's `parseInt(text)` for decimal text; `None` stands for NaN.
fn js_parse_int(text: &str) -> Option<i64> {
    let trimmed = text.trim_start();
    let (sign, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (-1, &trimmed[1..]),
        Some(b'+') => (1, &trimmed[1..]),
        _ => (1, trimmed),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse::<i64>().ok().map(|n| sign * n)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chain_of(elements: Value) -> String {
        match elements {
            Value::Array(elements) => elements_chain(&elements),
            other => panic!("not an array: {other}"),
        }
    }

    #[test]
    fn posthog_process_event_example() {
        // The `$elements` of PostHog's process-event tests, and the chain they expect.
        let chain = chain_of(json!([
            { "tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm" },
            { "tag_name": "div", "nth_child": 1, "nth_of_type": 2, "$el_text": "💻" },
        ]));
        assert_eq!(
            chain,
            "a.btn.btn-sm:attr__class=\"btn btn-sm\"nth-child=\"1\"nth-of-type=\"2\";\
             div:nth-child=\"1\"nth-of-type=\"2\"text=\"💻\""
        );
    }

    #[test]
    fn posthog_elements_to_string_example() {
        // PostHog's elements-chain test, as raw `$elements` entries.
        let chain = chain_of(json!([
            {
                "tag_name": "a",
                "attr__href": "/a-url",
                "attr__class": ["small"],
                "$el_text": "bla bla",
                "attr__prop": "value",
                "attr__number": 33,
                "attr__data-attr": "something \" that; could mess up",
                "attr__style": "min-height: 100vh;",
                "nth_child": 1,
                "nth_of_type": 0,
            },
            { "tag_name": "button", "attr__class": ["btn", "btn-primary"], "nth_child": 0, "nth_of_type": 0 },
            { "tag_name": "div", "nth_child": 0, "nth_of_type": 0 },
            { "tag_name": "div", "nth_child": 0, "nth_of_type": 0, "attr__id": "nested" },
        ]));
        let expected = [
            "a.small:attr__class=\"small\"attr__data-attr=\"something \\\" that; could mess up\"\
             attr__href=\"/a-url\"attr__number=\"33\"attr__prop=\"value\"\
             attr__style=\"min-height: 100vh;\"href=\"/a-url\"nth-child=\"1\"nth-of-type=\"0\"\
             text=\"bla bla\"",
            "button.btn.btn-primary:attr__class=\"btn,btn-primary\"nth-child=\"0\"nth-of-type=\"0\"",
            "div:nth-child=\"0\"nth-of-type=\"0\"",
            "div:attr__id=\"nested\"attr_id=\"nested\"nth-child=\"0\"nth-of-type=\"0\"",
        ]
        .join(";");
        assert_eq!(chain, expected);
    }

    #[test]
    fn empty_input_gives_empty_chain() {
        assert_eq!(elements_chain(&[]), "");
    }

    #[test]
    fn missing_positions_default_to_zero() {
        assert_eq!(
            chain_of(json!([{ "tag_name": "span" }])),
            "span:nth-child=\"0\"nth-of-type=\"0\""
        );
        assert_eq!(
            chain_of(json!([{ "tag_name": "span", "nth_child": null, "nth_of_type": "3" }])),
            "span:nth-child=\"0\"nth-of-type=\"3\""
        );
    }

    #[test]
    fn non_object_entries_render_as_empty_elements() {
        assert_eq!(
            chain_of(json!(["button", null])),
            ":nth-child=\"0\"nth-of-type=\"0\";:nth-child=\"0\"nth-of-type=\"0\""
        );
    }

    #[test]
    fn classes_are_sorted_and_lose_quotes() {
        assert_eq!(
            chain_of(json!([{ "tag_name": "a", "attr__class": ["zeta", "al\"pha", "Beta"] }])),
            "a.Beta.alpha.zeta:attr__class=\"zeta,al\\\"pha,Beta\"nth-child=\"0\"nth-of-type=\"0\""
        );
    }

    #[test]
    fn class_string_is_split_on_single_spaces() {
        assert_eq!(
            chain_of(json!([{ "tag_name": "a", "attr__class": "b  a" }])),
            "a..a.b:attr__class=\"b  a\"nth-child=\"0\"nth-of-type=\"0\""
        );
    }

    #[test]
    fn empty_class_and_tag_are_skipped() {
        assert_eq!(
            chain_of(json!([{ "tag_name": "", "attr__class": "" }])),
            ":attr__class=\"\"nth-child=\"0\"nth-of-type=\"0\""
        );
    }

    #[test]
    fn text_is_cut_to_400_characters() {
        let long_text = "é".repeat(450);
        let chain = chain_of(json!([{ "tag_name": "p", "$el_text": long_text }]));
        let expected_text = "é".repeat(400);
        assert_eq!(
            chain,
            format!("p:nth-child=\"0\"nth-of-type=\"0\"text=\"{expected_text}\"")
        );
    }

    #[test]
    fn href_is_cut_to_2048_characters_but_raw_attribute_is_kept() {
        let long_href = format!("/{}", "x".repeat(3000));
        let chain = chain_of(json!([{ "tag_name": "a", "attr__href": long_href }]));
        let cut_href: String = long_href.chars().take(2048).collect();
        assert_eq!(
            chain,
            format!(
                "a:attr__href=\"{long_href}\"href=\"{cut_href}\"nth-child=\"0\"nth-of-type=\"0\""
            )
        );
    }

    #[test]
    fn quotes_are_escaped_in_keys_and_values_but_backslashes_are_not() {
        assert_eq!(
            chain_of(
                json!([{ "tag_name": "a", "attr__x\"y": "a\\b\"c", "$el_text": "say \"hi\"" }])
            ),
            "a:attr__x\\\"y=\"a\\b\\\"c\"nth-child=\"0\"nth-of-type=\"0\"text=\"say \\\"hi\\\"\""
        );
    }

    #[test]
    fn non_string_values_are_stringified_like_javascript() {
        assert_eq!(
            chain_of(json!([{
                "tag_name": "input",
                "attr__checked": true,
                "attr__value": 2.0,
                "attr__list": [1, null, "x"],
                "attr__data": { "a": 1 },
                "attr__missing": null,
                "$el_text": 42,
            }])),
            "input:attr__checked=\"true\"attr__data=\"[object Object]\"attr__list=\"1,,x\"\
             attr__value=\"2\"nth-child=\"0\"nth-of-type=\"0\"text=\"42\""
        );
    }

    #[test]
    fn attributes_sort_like_locale_compare() {
        // ICU puts `_` before `-` and ignores case at first; byte order would not.
        assert_eq!(
            chain_of(
                json!([{ "attr__a-b": "1", "attr__a_b": "2", "attr__Ab": "3", "attr__ab": "4" }])
            ),
            ":attr__a_b=\"2\"attr__a-b=\"1\"attr__ab=\"4\"attr__Ab=\"3\"nth-child=\"0\"nth-of-type=\"0\""
        );
    }

    #[test]
    fn locale_compare_orders_symbols_digits_letters() {
        let mut keys = vec!["b", "B", "a", "1", "_", "-", ":", "$", "é", "a1", "a_"];
        keys.sort_by(|left, right| locale_compare(left, right));
        assert_eq!(
            keys,
            ["_", "-", ":", "$", "1", "a", "a_", "a1", "b", "B", "é"]
        );
    }

    #[test]
    fn to_js_string_matches_javascript() {
        let cases = [
            (json!(null), "null"),
            (json!(false), "false"),
            (json!(12), "12"),
            (json!(-3), "-3"),
            (json!(1.5), "1.5"),
            (json!(3.0), "3"),
            (json!(-0.0), "0"),
            (json!(1e21), "1e+21"),
            (json!(1.5e-7), "1.5e-7"),
            (json!("text"), "text"),
            (json!([1, [2, 3], null]), "1,2,3,"),
            (json!({}), "[object Object]"),
        ];
        for (value, expected) in cases {
            assert_eq!(to_js_string(&value), expected, "{value}");
        }
    }

    #[test]
    fn chain_to_elements_reads_back_what_the_chain_wrote() {
        let elements = vec![
            json!({"tag_name": "div", "$el_text": "💻", "nth_child": 1, "nth_of_type": 2}),
            json!({"tag_name": "a", "attr__class": "btn big", "attr__href": "/x?a=\"b\"",
                   "attr__id": "main", "nth_child": 3, "nth_of_type": 1, "attr__data-x": "1"}),
        ];
        let chain = elements_chain(&elements);
        let parsed = chain_to_elements(&chain);
        assert_eq!(
            parsed[0],
            json!({"attributes": {}, "order": 0, "tag_name": "div", "text": "💻",
                   "nth_child": 1, "nth_of_type": 2, "$el_text": "💻"})
        );
        assert_eq!(parsed[1]["tag_name"], "a");
        assert_eq!(parsed[1]["order"], 1);
        assert_eq!(parsed[1]["attr_id"], "main");
        assert_eq!(parsed[1]["nth_child"], 3);
        // `attr_class` is the raw attribute when there is one, as PostHog's conversion does.
        assert_eq!(parsed[1]["attr_class"], "btn big");
        assert_eq!(parsed[1]["attributes"]["attr__data-x"], "1");
        assert_eq!(parsed[1]["attributes"]["attr__id"], "main");
        // Escaped quotes stay escaped, as PostHog leaves them.
        assert_eq!(parsed[1]["href"], "/x?a=\\\"b\\\"");
    }

    #[test]
    fn chain_to_elements_handles_classes_with_colons_and_odd_input() {
        let parsed = chain_to_elements("button.hover:bg-red.x:nth-child=\"2\"text=\"a;b c\"");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0]["tag_name"], "button");
        assert_eq!(parsed[0]["attr_class"], json!(["hover:bg-red", "x"]));
        assert_eq!(parsed[0]["nth_child"], 2);
        assert_eq!(parsed[0]["text"], "a;b c");
        assert_eq!(chain_to_elements(""), Vec::<Value>::new());
        // Without a `name=` after it, a colon belongs to the selector, as PostHog parses it.
        assert_eq!(chain_to_elements("a:;b:")[1]["tag_name"], "b:");
        assert_eq!(
            chain_to_elements("p:nth-child=\"x\"")[0]["nth_child"],
            Value::Null
        );
    }
}
