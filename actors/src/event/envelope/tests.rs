use serde_json::json;

use super::*;
use crate::event::JsonObject;

const UUID: &str = "017ef865-19da-0000-3b60-1506093bf40f";

/// A message as PostHog's capture endpoint produces it: `data` is the client's JSON, as a
/// string.
fn capture_message(data: Value, envelope_overrides: Value) -> Vec<u8> {
    let mut envelope = json!({
        "distinct_id": "my_id",
        "ip": "127.0.0.1",
        "site_url": "http://localhost",
        "team_id": null,
        "token": "phc_token",
        "now": "2020-02-23T02:15:00.000Z",
        "sent_at": "2020-02-23T02:15:01.000Z",
        "uuid": UUID,
        "data": data.to_string(),
    });
    if let (Value::Object(envelope), Value::Object(overrides)) = (&mut envelope, envelope_overrides)
    {
        envelope.extend(overrides);
    }
    envelope.to_string().into_bytes()
}

fn parse(raw: &[u8]) -> Result<PipelineEvent, Box<DeadLetter>> {
    parse_envelope(raw, &EnvelopeLimits::default())
}

fn object(value: Value) -> JsonObject {
    match value {
        Value::Object(object) => object,
        other => panic!("not an object: {other}"),
    }
}

fn plugin_event(event: &str, properties: Value) -> PluginEvent {
    PluginEvent {
        distinct_id: "my_id".to_owned(),
        ip: None,
        site_url: None,
        team_id: 2,
        now: "2020-02-23T02:15:00.000Z".to_owned(),
        event: event.to_owned(),
        sent_at: None,
        properties: object(properties).into(),
        timestamp: None,
        offset: None,
        uuid: UUID.to_owned(),
        set: None,
        set_once: None,
    }
}

#[test]
fn default_limit_is_one_mebibyte() {
    assert_eq!(EnvelopeLimits::default().max_message_bytes, 1_048_576);
}

#[test]
fn parses_a_capture_message() {
    let raw = capture_message(
        json!({
            "event": "$pageview",
            "properties": { "$current_url": "https://example.com/", "distinct_id": "my_id" },
            "timestamp": "2020-02-23T02:14:59.000Z",
            "offset": 150,
            "distinct_id": "ignored because the envelope wins",
        }),
        json!({}),
    );
    let parsed = parse(&raw).unwrap();

    assert_eq!(parsed.team_id, None);
    assert_eq!(parsed.token.as_deref(), Some("phc_token"));
    let event = parsed.event;
    assert_eq!(event.distinct_id, "my_id");
    assert_eq!(event.ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(event.site_url.as_deref(), Some("http://localhost"));
    assert_eq!(event.team_id, 0);
    assert_eq!(event.now, "2020-02-23T02:15:00.000Z");
    assert_eq!(event.sent_at.as_deref(), Some("2020-02-23T02:15:01.000Z"));
    assert_eq!(event.event, "$pageview");
    assert_eq!(event.uuid, UUID);
    assert_eq!(event.timestamp, Some(json!("2020-02-23T02:14:59.000Z")));
    assert_eq!(event.offset, Some(json!(150)));
    assert_eq!(event.set, None);
    assert_eq!(event.set_once, None);
    assert_eq!(
        Value::from(event.properties.clone()),
        json!({ "$current_url": "https://example.com/", "distinct_id": "my_id" }),
        "plugins see the properties that were sent: normalization comes after them"
    );
    let mut event = event;
    normalize_event(&mut event);
    assert_eq!(
        Value::from(event.properties),
        json!({
            "$current_url": "https://example.com/",
            "distinct_id": "my_id",
            "$set_once": { "$initial_current_url": "https://example.com/" },
        })
    );
}

#[test]
fn accepts_data_as_an_object() {
    let raw = json!({
        "distinct_id": "my_id",
        "team_id": 2,
        "now": "2020-02-23T02:15:00.000Z",
        "uuid": UUID,
        "data": { "event": "$pageview", "properties": { "a": 1 } },
    })
    .to_string();
    let parsed = parse(raw.as_bytes()).unwrap();
    assert_eq!(parsed.team_id, Some(2));
    assert_eq!(parsed.token, None);
    assert_eq!(parsed.event.event, "$pageview");
    assert_eq!(Value::from(parsed.event.properties), json!({ "a": 1 }));
}

#[test]
fn accepts_a_message_without_data() {
    let raw = json!({
        "distinct_id": "my_id",
        "team_id": 2,
        "event": "custom",
        "uuid": UUID,
    })
    .to_string();
    let parsed = parse(raw.as_bytes()).unwrap();
    assert_eq!(parsed.event.event, "custom");
    assert_eq!(parsed.event.now, "");
    assert!(parsed.event.properties.is_empty());
}

#[test]
fn envelope_fields_win_unless_null() {
    let raw = capture_message(
        json!({
            "event": "$pageview",
            "uuid": "11111111-1111-1111-1111-111111111111",
            "ip": "10.0.0.1",
            "sent_at": "2020-01-01T00:00:00Z",
            "team_id": 7,
        }),
        json!({ "ip": null, "sent_at": "2020-02-23T02:15:01.000Z" }),
    );
    let parsed = parse(&raw).unwrap();
    assert_eq!(parsed.event.uuid, UUID);
    assert_eq!(parsed.event.ip.as_deref(), Some("10.0.0.1"));
    assert_eq!(parsed.team_id, Some(7));
    assert_eq!(
        parsed.event.sent_at.as_deref(),
        Some("2020-02-23T02:15:01.000Z")
    );
}

#[test]
fn empty_ip_site_url_and_sent_at_become_none() {
    let raw = capture_message(
        json!({ "event": "$pageview" }),
        json!({ "ip": "", "site_url": "", "sent_at": "" }),
    );
    let event = parse(&raw).unwrap().event;
    assert_eq!(event.ip, None);
    assert_eq!(event.site_url, None);
    assert_eq!(event.sent_at, None);
}

#[test]
fn distinct_id_becomes_a_string() {
    let cases = [
        (json!("abc"), "abc"),
        (json!(123), "123"),
        (json!(2.0), "2"),
        (json!(1.5), "1.5"),
        (json!(true), "true"),
        (json!({ "id": 1 }), "[object Object]"),
    ];
    for (distinct_id, expected) in cases {
        let raw = capture_message(
            json!({ "event": "$pageview" }),
            json!({ "distinct_id": distinct_id }),
        );
        assert_eq!(parse(&raw).unwrap().event.distinct_id, expected);
    }
}

#[test]
fn non_string_event_names_are_json_stringified() {
    let cases = [
        (json!(123), "123"),
        (json!(false), "false"),
        (json!({ "a": [1] }), "{\"a\":[1]}"),
    ];
    for (name, expected) in cases {
        let raw = capture_message(json!({ "event": name }), json!({}));
        assert_eq!(parse(&raw).unwrap().event.event, expected);
    }
}

#[test]
fn team_id_forms() {
    let cases = [
        (json!(2), Some(2)),
        (json!("3"), Some(3)),
        (json!(4.0), Some(4)),
        (json!(0), None),
        (json!(""), None),
        (Value::Null, None),
    ];
    for (team_id, expected) in cases {
        let raw = capture_message(
            json!({ "event": "$pageview" }),
            json!({ "team_id": team_id.clone() }),
        );
        assert_eq!(parse(&raw).unwrap().team_id, expected, "{team_id}");
    }
}

#[test]
fn non_integer_team_id_is_invalid() {
    for team_id in [json!(1.5), json!("two"), json!([2]), json!(true)] {
        let raw = capture_message(
            json!({ "event": "$pageview" }),
            json!({ "team_id": team_id.clone() }),
        );
        let letter = parse(&raw).unwrap_err();
        assert_eq!(letter.reason, DropReason::InvalidJson, "{team_id}");
        assert!(letter.error.starts_with("team_id is not an integer"));
        assert_eq!(letter.team_id, 0);
        assert_eq!(letter.event, "$pageview");
    }
}

#[test]
fn too_large_is_refused_before_parsing() {
    let raw = b"{ this is not even json but it is long";
    let letter = parse_envelope(
        raw,
        &EnvelopeLimits {
            max_message_bytes: 10,
        },
    )
    .unwrap_err();
    assert_eq!(letter.reason, DropReason::EventTooLarge);
    assert!(letter.error.contains("38 bytes"), "{}", letter.error);
    assert_eq!(letter.raw_payload, String::from_utf8_lossy(raw));

    let at_limit = capture_message(json!({ "event": "$pageview" }), json!({}));
    let exact = EnvelopeLimits {
        max_message_bytes: at_limit.len(),
    };
    assert!(parse_envelope(&at_limit, &exact).is_ok());
}

#[test]
fn invalid_utf8_is_its_own_reason() {
    let mut raw = br#"{"distinct_id":"my_id","team_id":2,"data":"{\"event\":\"a"#.to_vec();
    raw.extend_from_slice(&[0xff, 0xfe]);
    raw.extend_from_slice(br#"\"}"}"#);
    let letter = parse(&raw).unwrap_err();
    assert_eq!(letter.reason, DropReason::InvalidUtf8);
    assert!(letter.error.starts_with("message is not UTF-8"));
    assert!(letter.raw_payload.contains('\u{fffd}'));
}

#[test]
fn not_json_or_not_an_object_is_invalid_json() {
    for raw in ["", "not json", "[1,2]", "\"a string\"", "{\"distinct_id\":"] {
        let letter = parse(raw.as_bytes()).unwrap_err();
        assert_eq!(letter.reason, DropReason::InvalidJson, "{raw}");
        assert!(letter.error.starts_with("message is not a JSON object"));
        assert_eq!(letter.raw_payload, raw);
        assert_eq!(letter.distinct_id, "");
    }
}

#[test]
fn unparseable_data_keeps_the_envelope_fields() {
    let mut raw = json!({
        "distinct_id": "my_id",
        "ip": "127.0.0.1",
        "site_url": "http://localhost",
        "team_id": 2,
        "now": "2020-02-23T02:15:00.000Z",
        "uuid": UUID,
        "data": "{\"event\": \"$pageview\", \"properties\": ",
    })
    .to_string()
    .into_bytes();
    let letter = parse(&raw).unwrap_err();
    assert_eq!(letter.reason, DropReason::InvalidJson);
    assert!(letter.error.starts_with("data is not a JSON object"));
    assert_eq!(letter.distinct_id, "my_id");
    assert_eq!(letter.ip, "127.0.0.1");
    assert_eq!(letter.site_url, "http://localhost");
    assert_eq!(letter.team_id, 2);
    assert_eq!(letter.event_uuid, Uuid::parse_str(UUID).unwrap());
    assert_eq!(letter.now.to_rfc3339(), "2020-02-23T02:15:00+00:00");
    assert_eq!(letter.raw_payload, String::from_utf8(raw.clone()).unwrap());

    raw = json!({ "distinct_id": "my_id", "team_id": 2, "data": "[1]" })
        .to_string()
        .into_bytes();
    assert_eq!(parse(&raw).unwrap_err().reason, DropReason::InvalidJson);

    raw = json!({ "distinct_id": "my_id", "team_id": 2, "data": 5 })
        .to_string()
        .into_bytes();
    let letter = parse(&raw).unwrap_err();
    assert_eq!(letter.reason, DropReason::InvalidJson);
    assert!(letter.error.starts_with("data is neither"));
}

#[test]
fn non_object_properties_are_invalid_json() {
    let raw = capture_message(
        json!({ "event": "$pageview", "properties": [1] }),
        json!({}),
    );
    let letter = parse(&raw).unwrap_err();
    assert_eq!(letter.reason, DropReason::InvalidJson);
    assert_eq!(letter.properties, "[1]");
    assert_eq!(letter.event, "$pageview");
}

#[test]
fn missing_or_empty_event_name_is_illegal() {
    for data in [
        json!({ "properties": { "a": 1 } }),
        json!({ "event": null, "properties": { "a": 1 } }),
        json!({ "event": "", "properties": { "a": 1 } }),
    ] {
        let raw = capture_message(data.clone(), json!({ "team_id": 2 }));
        let letter = parse(&raw).unwrap_err();
        assert_eq!(letter.reason, DropReason::IllegalEventName, "{data}");
        assert_eq!(letter.distinct_id, "my_id");
        assert_eq!(letter.team_id, 2);
        assert_eq!(letter.event_uuid, Uuid::parse_str(UUID).unwrap());
        assert_eq!(letter.properties, "{\"a\":1}");
        assert_eq!(
            letter.error_message(),
            format!(
                "ingestEvent failed. Error: illegal_event_name: {}",
                letter.error
            )
        );
    }
}

#[test]
fn missing_or_empty_distinct_id_is_illegal() {
    for distinct_id in [Value::Null, json!("")] {
        let raw = capture_message(
            json!({ "event": "$pageview" }),
            json!({ "distinct_id": distinct_id }),
        );
        let letter = parse(&raw).unwrap_err();
        assert_eq!(letter.reason, DropReason::IllegalDistinctId);
        assert_eq!(letter.event, "$pageview");
        assert_eq!(letter.ip, "127.0.0.1");
    }
}

#[test]
fn neither_team_id_nor_token_is_no_token() {
    for token in [Value::Null, json!(""), json!(42)] {
        let raw = capture_message(
            json!({ "event": "$pageview" }),
            json!({ "token": token, "team_id": null }),
        );
        let letter = parse(&raw).unwrap_err();
        assert_eq!(letter.reason, DropReason::NoToken);
        assert_eq!(letter.distinct_id, "my_id");
    }
}

#[test]
fn lone_surrogates_inside_data_become_replacement_characters() {
    // What capture sends for a browser string with a lone surrogate: `data` holds the
    // six characters `\ud800`, so the envelope itself parses and `data` does not.
    let data = r#"{"event":"$pageview","properties":{"title":"a\ud800b","pair":"\ud83d\ude00","low":"\udc00"}}"#;
    let raw = json!({
        "distinct_id": "my_id",
        "team_id": 2,
        "now": "2020-02-23T02:15:00.000Z",
        "uuid": UUID,
        "data": data,
    })
    .to_string();
    let event = parse(raw.as_bytes()).unwrap().event;
    assert_eq!(event.properties["title"], "a\u{fffd}b");
    assert_eq!(event.properties["pair"], "😀");
    assert_eq!(event.properties["low"], "\u{fffd}");
}

#[test]
fn lone_surrogates_in_the_envelope_become_replacement_characters() {
    let raw = format!(
        r#"{{"distinct_id":"a\ud800","team_id":2,"uuid":"{UUID}","data":{{"event":"x\udbff\u0041","properties":{{"t":"\ud800\n"}}}}}}"#
    );
    let event = parse(raw.as_bytes()).unwrap().event;
    assert_eq!(event.distinct_id, "a\u{fffd}");
    assert_eq!(event.event, "x\u{fffd}A");
    assert_eq!(event.properties["t"], "\u{fffd}\n");
}

#[test]
fn other_escape_errors_are_still_invalid_json() {
    let raw = r#"{"distinct_id":"a\u12","team_id":2,"data":{"event":"x"}}"#;
    let letter = parse(raw.as_bytes()).unwrap_err();
    assert_eq!(letter.reason, DropReason::InvalidJson);
}

#[test]
fn surrogate_repair_rewrites_only_unpaired_escapes() {
    let cases = [
        (r#""\ud800""#, Some(r#""\ufffd""#)),
        (r#""\uDC00x""#, Some(r#""\ufffdx""#)),
        (r#""\ud800\ud800\udc00""#, Some(r#""\ufffd\ud800\udc00""#)),
        (r#""é\ud800é""#, Some(r#""é\ufffdé""#)),
        (r#""\ud800""#, Some(r#""\ufffd""#)),
        (r#""\ud83d\ude00""#, None),
        (r#""\\ud800""#, None),
        (r#""\u0041\n\"""#, None),
        (r#""\u12""#, None),
        ("\"tail\\", None),
    ];
    for (input, expected) in cases {
        assert_eq!(
            replace_lone_surrogate_escapes(input).as_deref(),
            expected,
            "{input}"
        );
    }
}

#[test]
fn top_level_set_is_merged_with_top_level_winning() {
    // PostHog's normalizeEvent test: the top-level objects are spread last.
    let mut event = plugin_event(
        "some_event",
        json!({
            "distinct_id": "distinct_id1",
            "$set": { "key2": "value3", "key3": "value4" },
            "$set_once": { "key2_once": "value3", "key3_once": "value4" },
        }),
    );
    event.set = Some(object(json!({ "key1": "value1", "key2": "value2" })));
    event.set_once = Some(object(
        json!({ "key1_once": "value1", "key2_once": "value2" }),
    ));
    normalize_event(&mut event);

    assert_eq!(
        event.properties["$set"],
        json!({ "key1": "value1", "key2": "value2", "key3": "value4" })
    );
    assert_eq!(
        event.properties["$set_once"],
        json!({ "key1_once": "value1", "key2_once": "value2", "key3_once": "value4" })
    );
    // Plugins may still read the top-level objects.
    assert!(event.set.is_some());
}

#[test]
fn top_level_set_replaces_a_non_object_and_creates_an_empty_one() {
    let mut event = plugin_event("some_event", json!({ "$set": "not an object" }));
    event.set = Some(object(json!({ "a": 1 })));
    event.set_once = Some(JsonObject::new());
    normalize_event(&mut event);
    assert_eq!(event.properties["$set"], json!({ "a": 1 }));
    assert_eq!(event.properties["$set_once"], json!({}));
}

#[test]
fn adds_campaign_and_initial_properties() {
    // PostHog's personInitialAndUTMProperties test.
    let elements = json!([
        { "tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm" },
        { "tag_name": "div", "nth_child": 1, "nth_of_type": 2, "$el_text": "💻" },
    ]);
    let mut event = plugin_event(
        "$autocapture",
        json!({
            "distinct_id": 2,
            "$browser": "Chrome",
            "$current_url": "https://test.com",
            "$os": "Mac OS X",
            "$browser_version": "95",
            "$referring_domain": "https://google.com",
            "$referrer": "https://google.com/?q=posthog",
            "utm_medium": "twitter",
            "gclid": "GOOGLE ADS ID",
            "msclkid": "BING ADS ID",
            "$elements": elements.clone(),
        }),
    );
    normalize_event(&mut event);
    assert_eq!(
        Value::from(event.properties),
        json!({
            "distinct_id": 2,
            "$browser": "Chrome",
            "$current_url": "https://test.com",
            "$os": "Mac OS X",
            "$browser_version": "95",
            "$referring_domain": "https://google.com",
            "$referrer": "https://google.com/?q=posthog",
            "utm_medium": "twitter",
            "gclid": "GOOGLE ADS ID",
            "msclkid": "BING ADS ID",
            "$elements": elements,
            "$set": { "utm_medium": "twitter", "gclid": "GOOGLE ADS ID", "msclkid": "BING ADS ID" },
            "$set_once": {
                "$initial_browser": "Chrome",
                "$initial_current_url": "https://test.com",
                "$initial_os": "Mac OS X",
                "$initial_browser_version": "95",
                "$initial_referring_domain": "https://google.com",
                "$initial_referrer": "https://google.com/?q=posthog",
                "$initial_utm_medium": "twitter",
                "$initial_gclid": "GOOGLE ADS ID",
                "$initial_msclkid": "BING ADS ID",
            },
        })
    );
}

#[test]
fn initial_current_url_regression() {
    let mut event = plugin_event("$pageview", json!({ "$current_url": "https://test.com" }));
    normalize_event(&mut event);
    assert_eq!(
        Value::from(event.properties),
        json!({
            "$current_url": "https://test.com",
            "$set_once": { "$initial_current_url": "https://test.com" },
        })
    );
}

#[test]
fn every_campaign_and_initial_key_is_copied() {
    let mut properties = Properties::new();
    for (name, _) in CAMPAIGN_PROPERTIES.iter().chain(INITIAL_PROPERTIES.iter()) {
        properties.insert((*name).to_owned(), json!(name));
    }
    let mut event = plugin_event("$pageview", Value::from(properties));
    normalize_event(&mut event);
    assert_eq!(
        event.properties["$set"].as_object().unwrap().len(),
        CAMPAIGN_PROPERTIES.len()
    );
    assert_eq!(event.properties["$set"]["fbclid"], "fbclid");
    let set_once = event.properties["$set_once"].as_object().unwrap();
    assert_eq!(
        set_once.len(),
        CAMPAIGN_PROPERTIES.len() + INITIAL_PROPERTIES.len()
    );
    assert_eq!(set_once["$initial_utm_term"], "utm_term");
    assert_eq!(set_once["$initial_device_type"], "$device_type");
    assert_eq!(set_once["$initial_pathname"], "$pathname");
}

#[test]
fn campaign_values_of_the_event_win_over_existing_set() {
    let mut event = plugin_event(
        "$pageview",
        json!({
            "utm_source": "new",
            "$set": { "utm_source": "old", "keep": true },
            "$set_once": { "$initial_utm_source": "old" },
        }),
    );
    normalize_event(&mut event);
    assert_eq!(
        event.properties["$set"],
        json!({ "utm_source": "new", "keep": true })
    );
    assert_eq!(
        event.properties["$set_once"],
        json!({ "$initial_utm_source": "new" })
    );
}

#[test]
fn recordings_get_no_person_properties() {
    for name in ["$snapshot", "$performance_event"] {
        let mut event = plugin_event(name, json!({ "$current_url": "https://test.com" }));
        event.set = Some(object(json!({ "a": 1 })));
        normalize_event(&mut event);
        // The top-level `$set` is still merged; only derived properties are skipped.
        assert_eq!(
            Value::from(event.properties),
            json!({ "$current_url": "https://test.com", "$set": { "a": 1 } })
        );
    }
}

#[test]
fn normalization_is_idempotent() {
    let mut event = plugin_event(
        "$pageview",
        json!({ "$browser": "Firefox", "utm_source": "x", "$set": { "b": 1 } }),
    );
    event.set = Some(object(json!({ "a": 1 })));
    normalize_event(&mut event);
    let once = event.clone();
    normalize_event(&mut event);
    assert_eq!(event, once);
}

#[test]
fn non_object_top_level_set_is_ignored() {
    let raw = capture_message(
        json!({ "event": "$identify", "$set": "x", "$set_once": { "a": 1 } }),
        json!({}),
    );
    let mut event = parse(&raw).unwrap().event;
    assert_eq!(event.set, None);
    assert_eq!(event.set_once, Some(object(json!({ "a": 1 }))));
    assert!(!event.properties.contains_key("$set_once"));
    normalize_event(&mut event);
    assert_eq!(event.properties["$set_once"], json!({ "a": 1 }));
}

#[test]
fn numbers_past_a_double_become_null_as_json_parse_then_stringify_make_them() {
    let text = r#"{"a":1e400,"b":-1e999,"c":1.5e3,"d":"1e400 in a string \" 1e400","e":[2e308,0]}"#;
    let repaired = repair_for_javascript(text).expect("something to repair");
    assert_eq!(
        repaired,
        r#"{"a":null,"b":null,"c":1.5e3,"d":"1e400 in a string \" 1e400","e":[null,0]}"#
    );
    let parsed: serde_json::Value = serde_json::from_str(&repaired).expect("parses now");
    assert_eq!(parsed["c"], json!(1500.0));
    assert_eq!(repair_for_javascript(r#"{"fine":[1,2.5e10]}"#), None);
    // Both repairs at once.
    assert_eq!(
        repair_for_javascript(r#"{"s":"a\ud800b","n":1e400}"#).as_deref(),
        Some(r#"{"s":"a\ufffdb","n":null}"#)
    );
}
