//! JavaScript semantics PostHog's server applies to JSON values (truthiness, `String(value)`),
//! in one place so that every step that mimics them agrees.

use serde_json::{Number, Value};

/// JS truthiness: containers are always truthy, even when empty.
pub fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(flag) => *flag,
        Value::Number(number) => number.as_f64().is_some_and(|n| n != 0.0 && !n.is_nan()),
        Value::String(text) => !text.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// JS `String(value)`: `1.0` is `"1"`, arrays are comma-joined (null elements as nothing),
/// objects are `[object Object]`.
pub fn to_js_string(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number_to_js_string(number),
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Null => String::new(),
                other => to_js_string(other),
            })
            .collect::<Vec<_>>()
            .join(","),
        Value::Object(_) => "[object Object]".to_owned(),
    }
}

/// JS number-to-string. Integers that fit i64/u64 print exactly; JS would round those above
/// 2^53, but keeping every digit is the more faithful id and such ids are vanishingly rare.
pub fn number_to_js_string(number: &Number) -> String {
    if number.is_i64() || number.is_u64() {
        return number.to_string();
    }
    let Some(float) = number.as_f64() else {
        return number.to_string();
    };
    if float == 0.0 {
        // Covers -0, which JS prints as "0".
        return "0".to_owned();
    }
    if float.is_nan() {
        return "NaN".to_owned();
    }
    if float.is_infinite() {
        return if float > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let magnitude = float.abs();
    if (1e-6..1e21).contains(&magnitude) {
        // Rust's Display is the shortest round-trip form, like JS, and prints 1.0 as "1".
        return float.to_string();
    }
    // Outside that range JS switches to exponent form with an explicit sign: "1e+21".
    let exponent_form = format!("{float:e}");
    match exponent_form.split_once('e') {
        Some((mantissa, exponent)) if !exponent.starts_with('-') => {
            format!("{mantissa}e+{exponent}")
        }
        _ => exponent_form,
    }
}

/// The JSON type with its article, for error messages ("a plugin returned a string").
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strings_and_numbers_print_as_javascript_prints_them() {
        let cases = [
            (json!(1.0), "1"),
            (json!(-0.0), "0"),
            (json!(0.000001), "0.000001"),
            (json!(1.5e-7), "1.5e-7"),
            (json!(1e21), "1e+21"),
            (json!(1e20), "100000000000000000000"),
            (json!([1, null, "a", [2, 3]]), "1,,a,2,3"),
            (json!({"a": 1}), "[object Object]"),
            (json!(null), "null"),
        ];
        for (value, expected) in cases {
            assert_eq!(to_js_string(&value), expected, "{value}");
        }
    }

    #[test]
    fn truthiness() {
        for value in [json!(1), json!("x"), json!([]), json!({}), json!(true)] {
            assert!(is_truthy(&value), "{value}");
        }
        for value in [json!(0), json!(0.0), json!(""), json!(null), json!(false)] {
            assert!(!is_truthy(&value), "{value}");
        }
    }
}
