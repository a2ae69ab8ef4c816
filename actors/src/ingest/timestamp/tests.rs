use chrono::TimeZone;

use super::*;

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn event(
    now: &str,
    sent_at: Option<&str>,
    timestamp: Option<Value>,
    offset: Option<Value>,
) -> PluginEvent {
    PluginEvent {
        distinct_id: "my_id".to_owned(),
        ip: None,
        site_url: None,
        team_id: 2,
        now: now.to_owned(),
        event: "$pageview".to_owned(),
        sent_at: sent_at.map(str::to_owned),
        properties: Default::default(),
        timestamp,
        offset,
        uuid: "017ef865-19da-0000-3b60-1506093bf40f".to_owned(),
        set: None,
        set_once: None,
    }
}

fn ts(text: &str) -> Option<Value> {
    Some(Value::String(text.to_owned()))
}

fn within_a_minute_of_now(result: DateTime<Utc>) -> bool {
    (Utc::now() - result).num_seconds().abs() < 60
}

#[test]
fn skew_correction_matches_posthog_example() {
    let event = event(
        "2021-10-29T05:00:00Z",
        Some("2021-10-29T05:10:00Z"),
        ts("2021-10-29T05:08:00Z"),
        None,
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T04:58:00Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn skew_correction_works_across_zones_and_keeps_milliseconds() {
    let event = event(
        "2021-10-29T01:44:00.000Z",
        Some("2021-10-29T03:46:00.500+02:00"),
        ts("2021-10-29T01:45:00.250Z"),
        None,
    );
    let mut warnings = Vec::new();
    // sent_at is 01:46:00.500 UTC, so the event is 60.25 s before now.
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T01:42:59.750Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn timestamp_without_sent_at_is_returned_as_is() {
    let event = event(
        "2021-10-29T01:44:00Z",
        None,
        ts("2021-10-30T03:02:00.000Z"),
        None,
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-30T03:02:00Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn early_return_skips_offset_and_future_clamp() {
    // Three days ahead of now and with an offset: PostHog still returns it untouched.
    let event = event(
        "2021-10-29T01:44:00Z",
        None,
        ts("2021-11-01T01:44:00Z"),
        Some(json!(150)),
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-11-01T01:44:00Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn invalid_sent_at_is_ignored_with_a_warning() {
    let event = event(
        "2021-10-29T01:44:00Z",
        Some("invalid"),
        ts("2021-10-30T03:02:00.000Z"),
        None,
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-30T03:02:00Z")
    );
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].kind, "ignored_invalid_timestamp");
    assert_eq!(warnings[0].team_id, 2);
    assert_eq!(
        warnings[0].details,
        json!({
            "eventUuid": "017ef865-19da-0000-3b60-1506093bf40f",
            "field": "sent_at",
            "value": "invalid",
            "reason": "the input \"invalid\" can't be parsed as ISO 8601",
        })
    );
}

#[test]
fn empty_sent_at_is_absent_without_a_warning() {
    let event = event(
        "2021-10-29T01:44:00Z",
        Some(""),
        ts("2021-10-30T03:02:00Z"),
        None,
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-30T03:02:00Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn no_timestamp_means_now() {
    let event = event(
        "2021-10-29T01:44:00Z",
        Some("2021-10-29T01:50:00Z"),
        None,
        None,
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T01:44:00Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn empty_or_null_timestamp_means_now() {
    for timestamp in [Some(json!("")), Some(Value::Null)] {
        let event = event("2021-10-29T01:44:00Z", None, timestamp, None);
        let mut warnings = Vec::new();
        assert_eq!(
            parse_event_timestamp(&event, &mut warnings),
            utc("2021-10-29T01:44:00Z")
        );
        assert!(warnings.is_empty());
    }
}

#[test]
fn offset_without_timestamp_counts_back_from_now() {
    let event = event("2021-10-29T01:44:00Z", None, None, Some(json!(6000)));
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T01:43:54Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn offset_overrides_skew_correction() {
    let event = event(
        "2021-10-29T01:44:00Z",
        Some("2021-10-29T01:50:00Z"),
        ts("2021-10-29T01:49:00Z"),
        Some(json!(6000)),
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T01:43:54Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn zero_fractional_and_string_offsets() {
    let cases = [
        (json!(0), "2021-10-29T01:44:00Z"),
        (json!(1.5), "2021-10-29T01:43:59.9985Z"),
        (json!("2000"), "2021-10-29T01:43:58Z"),
        (json!("soon"), "2021-10-29T01:44:00Z"),
        (json!(true), "2021-10-29T01:44:00Z"),
    ];
    for (offset, expected) in cases {
        let event = event("2021-10-29T01:44:00Z", None, None, Some(offset.clone()));
        let mut warnings = Vec::new();
        assert_eq!(
            parse_event_timestamp(&event, &mut warnings),
            utc(expected),
            "offset {offset}"
        );
        assert!(warnings.is_empty());
    }
}

#[test]
fn zero_offset_keeps_skew_correction() {
    let event = event(
        "2021-10-29T05:00:00Z",
        Some("2021-10-29T05:10:00Z"),
        ts("2021-10-29T05:08:00Z"),
        Some(json!(0)),
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T04:58:00Z")
    );
}

#[test]
fn future_result_becomes_now_with_a_warning() {
    let event = event(
        "2021-10-29T01:00:00Z",
        Some("2021-10-28T01:00:00Z"),
        ts("2021-10-29T01:00:00Z"),
        None,
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T01:00:00Z")
    );
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].kind, "event_timestamp_in_future");
    assert_eq!(
        warnings[0].details,
        json!({
            "timestamp": "2021-10-29T01:00:00Z",
            "sentAt": "2021-10-28T01:00:00Z",
            "offset": "",
            "now": "2021-10-29T01:00:00Z",
            "result": "2021-10-30T01:00:00.000Z",
        })
    );
}

#[test]
fn negative_offset_in_the_future_is_clamped() {
    let event = event("2021-10-29T01:00:00Z", None, None, Some(json!(-90_000_000)));
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-29T01:00:00Z")
    );
    assert_eq!(warnings[0].kind, "event_timestamp_in_future");
    assert_eq!(warnings[0].details["offset"], json!(-90_000_000));
}

#[test]
fn exactly_23_hours_ahead_is_kept() {
    let event = event(
        "2021-10-29T01:00:00Z",
        Some("2021-10-28T02:00:00Z"),
        ts("2021-10-29T01:00:00Z"),
        None,
    );
    let mut warnings = Vec::new();
    assert_eq!(
        parse_event_timestamp(&event, &mut warnings),
        utc("2021-10-30T00:00:00Z")
    );
    assert!(warnings.is_empty());
}

#[test]
fn unparseable_timestamp_becomes_current_time_with_a_warning() {
    for sent_at in [None, Some("2021-10-29T01:00:00Z")] {
        let event = event("2021-10-29T01:00:00Z", sent_at, ts("notISO"), None);
        let mut warnings = Vec::new();
        let result = parse_event_timestamp(&event, &mut warnings);
        assert!(within_a_minute_of_now(result));
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].kind, "ignored_invalid_timestamp");
        assert_eq!(warnings[0].details["field"], "timestamp");
        assert_eq!(warnings[0].details["value"], "notISO");
    }
}

#[test]
fn non_string_timestamp_is_invalid() {
    let event = event(
        "2021-10-29T01:00:00Z",
        None,
        Some(json!(1635469200000_i64)),
        None,
    );
    let mut warnings = Vec::new();
    assert!(within_a_minute_of_now(parse_event_timestamp(
        &event,
        &mut warnings
    )));
    assert_eq!(warnings[0].details["value"], json!(1635469200000_i64));
}

#[test]
fn out_of_range_result_becomes_current_time_with_a_warning() {
    let event = event(
        "2021-10-29T01:00:00Z",
        Some("2021-10-29T01:00:00Z"),
        ts("2021-10-29T01:00:00Z"),
        Some(json!(1e300)),
    );
    let mut warnings = Vec::new();
    assert!(within_a_minute_of_now(parse_event_timestamp(
        &event,
        &mut warnings
    )));
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].kind, "ignored_invalid_timestamp");
    assert_eq!(warnings[0].details["field"], "timestamp");
    assert_eq!(
        warnings[0].details["reason"],
        "the computed time is out of range"
    );
}

#[test]
fn invalid_now_falls_back_to_current_time() {
    let event = event("garbage", None, None, None);
    let mut warnings = Vec::new();
    assert!(within_a_minute_of_now(parse_event_timestamp(
        &event,
        &mut warnings
    )));
    assert!(warnings.is_empty());
}

#[test]
fn iso8601_accepts_luxon_shapes() {
    let cases = [
        ("2021-10-29T01:44:00Z", "2021-10-29T01:44:00Z"),
        ("2021-10-29T01:44:00.123Z", "2021-10-29T01:44:00.123Z"),
        ("2021-10-29T01:44:00.123456Z", "2021-10-29T01:44:00.123456Z"),
        ("2021-10-29T01:44:00,5Z", "2021-10-29T01:44:00.5Z"),
        (
            "2021-10-29T01:44:00.1234567891234Z",
            "2021-10-29T01:44:00.123456789Z",
        ),
        ("2021-10-29t01:44:00z", "2021-10-29T01:44:00Z"),
        ("2021-10-29T01:44:00", "2021-10-29T01:44:00Z"),
        ("2021-10-29 01:44:00.250", "2021-10-29T01:44:00.25Z"),
        ("2021-10-29T03:44:00+02:00", "2021-10-29T01:44:00Z"),
        ("2021-10-29T03:44:00+0200", "2021-10-29T01:44:00Z"),
        ("2021-10-29T03:44:00+02", "2021-10-29T01:44:00Z"),
        ("2021-10-28T23:14:00-02:30", "2021-10-29T01:44:00Z"),
        ("2021-10-29T01:44", "2021-10-29T01:44:00Z"),
        ("2021-10-29T01", "2021-10-29T01:00:00Z"),
        ("2021-10-29T014400Z", "2021-10-29T01:44:00Z"),
        ("20211029T014400.5", "2021-10-29T01:44:00.5Z"),
        ("2021-10-29", "2021-10-29T00:00:00Z"),
        ("20211029", "2021-10-29T00:00:00Z"),
        ("2021-10", "2021-10-01T00:00:00Z"),
        ("2021", "2021-01-01T00:00:00Z"),
        ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
    ];
    for (input, expected) in cases {
        assert_eq!(parse_iso8601(input), Some(utc(expected)), "{input}");
    }
}

#[test]
fn iso8601_rejects_malformed_text() {
    let cases = [
        "",
        "invalid",
        "21-10-29",
        "2021-13-01",
        "2021-02-30",
        "2023-02-29T00:00:00Z",
        "2021-10-29T25:00:00Z",
        "2021-10-29T01:60:00Z",
        "2021-10-29T01:44:60Z",
        "2021-10-29T01:44:00.Z",
        "2021-10-29T01:44:00+24:00",
        "2021-10-29T01:44:00 Z",
        "2021-10-29T01:44:00Zjunk",
        "2021-10-29Z",
        "2021-10-29X01:44:00",
        "2021-10-29T1:44:00",
        "1635471840000",
        "Fri, 29 Oct 2021 01:44:00 GMT",
    ];
    for input in cases {
        assert_eq!(parse_iso8601(input), None, "{input}");
    }
}

#[test]
fn iso8601_handles_extreme_years() {
    assert_eq!(
        parse_iso8601("0000-01-01T00:00:00Z"),
        Some(Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap())
    );
    assert_eq!(
        parse_iso8601("9999-12-31T23:59:59.999Z"),
        Some(utc("9999-12-31T23:59:59.999Z"))
    );
}
