//! From the event the plugins returned to the row of the `events` table (spec 1.3 steps 4-6,
//! PostHog's `processPersonsStep`, `prepareEventStep` and `createEventStep`). The person step
//! and the group step (`crate::groups`) run between [`stamp_event`] and [`build_row`].

use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::timestamp::parse_event_timestamp;
use crate::event::elements::elements_chain;
use crate::event::envelope::normalize_event;
use crate::event::iso8601::parse_iso8601;
use crate::event::js::{is_truthy, to_js_string};
use crate::event::{
    DeadLetter, DropReason, EventRow, IngestionWarning, PersonMode, PluginEvent, Properties,
    StampedEvent, Team,
};
use crate::groups::GroupColumns;

/// PostHog's warning for an event dropped because its `uuid` is not a UUID.
pub const WARNING_SKIPPING_EVENT_INVALID_UUID: &str = "skipping_event_invalid_uuid";

/// ClickHouse's `event` column is meant for names, not payloads.
const MAX_EVENT_NAME_CHARS: usize = 200;

/// What the group columns hold for a column that names no known group: PostHog's values for an
/// unknown group (spec 1.8), with the epoch as `created_at`. One string for every such column.
static UNKNOWN_GROUP_PROPERTIES: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("{}"));

/// The person columns' properties without a person: ClickHouse's default, the empty string.
static NO_PERSON_PROPERTIES: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

/// Builds the event row for `team`, or dead-letters an event whose `uuid` is unusable.
///
/// The event is normalized again because plugins may have changed `$set` or the campaign
/// properties. Its `team_id` is set to the team's, so that warnings name the right team.
/// Warnings about ignored client timestamps are pushed to `warnings` in both outcomes.
///
/// The person columns are ClickHouse's defaults for "no person" (see [`build_row`]); the group
/// columns are PostHog's unknown-group values (`{}`, the epoch).
pub fn prepare_event(
    mut event: PluginEvent,
    team: &Team,
    created_at: DateTime<Utc>,
    warnings: &mut Vec<IngestionWarning>,
) -> Result<EventRow, Box<DeadLetter>> {
    normalize_event(&mut event);
    prepare_normalized_event(event, team, created_at, warnings)
}

/// `prepare_event` for an event that is normalized already and was not changed since: no
/// plugin ran on it. Normalization is idempotent, so this only saves its cost.
pub fn prepare_normalized_event(
    event: PluginEvent,
    team: &Team,
    created_at: DateTime<Utc>,
    warnings: &mut Vec<IngestionWarning>,
) -> Result<EventRow, Box<DeadLetter>> {
    let stamped = stamp_event(Box::new(event), team, warnings)?;
    build_row(stamped, team, created_at, None, &GroupColumns::default())
}

/// PostHog's `getElementsChain`: current posthog-js sends the chain ready-made as
/// `$elements_chain` (with `elementsChainAsString`), older clients send `$elements` to be
/// rendered. The string wins when it is truthy; both leave the properties either way.
fn take_elements_chain(properties: &mut Properties) -> String {
    let ready = properties.remove("$elements_chain");
    let elements = properties.remove("$elements");
    match (ready, elements) {
        (Some(ready), _) if is_truthy(&ready) => to_js_string(&ready),
        (_, Some(Value::Array(elements))) => elements_chain(&elements),
        _ => String::new(),
    }
}

/// The person columns of a row: the person the event belongs to after the person step.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPerson {
    pub uuid: Uuid,
    /// The person's properties as JSON, shared by its events.
    pub properties: Arc<str>,
    pub created_at: DateTime<Utc>,
    pub mode: PersonMode,
}

/// Sets the team, parses the timestamp (spec 1.6) and checks the uuid of a normalized event.
/// An event whose `uuid` is unusable is dead-lettered here, before the person step, so that
/// an event that is never stored changes no person.
pub fn stamp_event(
    mut event: Box<PluginEvent>,
    team: &Team,
    warnings: &mut Vec<IngestionWarning>,
) -> Result<StampedEvent, Box<DeadLetter>> {
    event.team_id = team.id;
    let timestamp = parse_event_timestamp(&event, warnings);

    let Some(uuid) = parse_hyphenated_uuid(&event.uuid) else {
        warnings.push(IngestionWarning {
            team_id: team.id,
            kind: WARNING_SKIPPING_EVENT_INVALID_UUID,
            // PostHog stores the JSON of the value so that odd whitespace stays visible.
            details: json!({ "eventUuid": Value::String(event.uuid.clone()).to_string() }),
            timestamp: Utc::now(),
        });
        let error = format!("not a valid UUID: \"{}\"", event.uuid);
        return Err(Box::new(dead_letter_for_event(
            &event,
            DropReason::InvalidUuid,
            error,
        )));
    };
    Ok(StampedEvent {
        event,
        uuid,
        timestamp,
    })
}

/// Builds the row of a stamped event (spec 1.3 steps 5-6). Without a person, the person columns
/// keep ClickHouse's defaults for "no person" (nil uuid, empty properties, the epoch), which
/// PostHog writes when it has no person either. The group columns show `groups`, the group
/// step's answer for the event.
pub fn build_row(
    stamped: StampedEvent,
    team: &Team,
    created_at: DateTime<Utc>,
    person: Option<RowPerson>,
    groups: &GroupColumns,
) -> Result<EventRow, Box<DeadLetter>> {
    let StampedEvent {
        mut event,
        uuid,
        timestamp,
    } = stamped;
    let event_name = truncate_chars(std::mem::take(&mut event.event), MAX_EVENT_NAME_CHARS);

    let chain = take_elements_chain(&mut event.properties);

    // A `$ip` sent by the client (even null) wins over the connection's address.
    if let Some(ip) = event.ip.as_deref().filter(|ip| !ip.is_empty())
        && !team.anonymize_ips
        && !event.properties.contains_key("$ip")
    {
        event
            .properties
            .insert("$ip".to_owned(), Value::String(ip.to_owned()));
    }

    let properties = match serde_json::to_string(&event.properties) {
        Ok(properties) => properties,
        Err(error) => {
            return Err(Box::new(dead_letter_for_event(
                &event,
                DropReason::InvalidJson,
                format!("properties cannot be serialized: {error}"),
            )));
        }
    };

    let (person_id, person_properties, person_created_at, person_mode) = match person {
        Some(person) => (
            person.uuid,
            person.properties,
            person.created_at,
            person.mode,
        ),
        None => (
            Uuid::nil(),
            Arc::clone(&NO_PERSON_PROPERTIES),
            DateTime::<Utc>::UNIX_EPOCH,
            PersonMode::Full,
        ),
    };
    Ok(EventRow {
        uuid,
        event: event_name,
        properties,
        timestamp,
        team_id: team.id,
        distinct_id: event.distinct_id,
        elements_chain: chain,
        created_at,
        person_id,
        person_properties,
        person_created_at,
        person_mode,
        group_properties: std::array::from_fn(|index| {
            groups[index].as_ref().map_or_else(
                || Arc::clone(&UNKNOWN_GROUP_PROPERTIES),
                |group| Arc::clone(&group.properties),
            )
        }),
        group_created_at: std::array::from_fn(|index| {
            groups[index]
                .as_ref()
                .map_or(DateTime::<Utc>::UNIX_EPOCH, |group| group.created_at)
        }),
    })
}

/// The dead letter of an event that was parsed but cannot be stored, with PostHog's raw
/// payload for such failures: the event as JSON.
pub fn dead_letter_for_event(event: &PluginEvent, reason: DropReason, error: String) -> DeadLetter {
    let raw_payload = serde_json::to_string(event)
        .unwrap_or_else(|serialize_error| format!("unserializable event: {serialize_error}"));
    let mut letter = DeadLetter::unparsed(raw_payload.as_bytes(), reason, error);
    letter.event_uuid = parse_hyphenated_uuid(&event.uuid).unwrap_or_else(Uuid::nil);
    letter.event = event.event.clone();
    letter.properties = serde_json::to_string(&event.properties).unwrap_or_default();
    letter.distinct_id = event.distinct_id.clone();
    letter.team_id = event.team_id;
    letter.ip = event.ip.clone().unwrap_or_default();
    letter.site_url = event.site_url.clone().unwrap_or_default();
    if let Some(now) = parse_iso8601(&event.now) {
        letter.now = now;
    }
    letter
}

/// A UUID in the only form PostHog accepts, `8-4-4-4-12` hex digits; the `uuid` crate would
/// also take the simple, braced and URN forms, which all have other lengths.
fn parse_hyphenated_uuid(text: &str) -> Option<Uuid> {
    const HYPHENATED_LEN: usize = 36;
    if text.len() != HYPHENATED_LEN {
        return None;
    }
    Uuid::try_parse(text).ok()
}

/// The first `max_chars` characters. PostHog's `substr` counts UTF-16 units and can split a
/// surrogate pair; counting characters keeps the name valid.
fn truncate_chars(mut text: String, max_chars: usize) -> String {
    if let Some((byte_index, _)) = text.char_indices().nth(max_chars) {
        text.truncate(byte_index);
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;

    const UUID: &str = "017ef865-19da-0000-3b60-1506093bf40f";

    fn team() -> Team {
        Team {
            id: 2,
            uuid: Uuid::nil(),
            organization_id: Uuid::nil(),
            api_token: "THIS IS NOT A TOKEN FOR TEAM 2".to_owned(),
            name: "TEST PROJECT".to_owned(),
            anonymize_ips: false,
            session_recording_opt_in: true,
            ingested_event: true,
            slack_incoming_webhook: None,
            timezone: "UTC".to_owned(),
        }
    }

    fn event(properties: Value) -> PluginEvent {
        let Value::Object(properties) = properties else {
            panic!("properties must be an object");
        };
        PluginEvent {
            distinct_id: "my_id".to_owned(),
            ip: Some("127.0.0.1".to_owned()),
            site_url: Some("http://localhost".to_owned()),
            team_id: 0,
            now: "2020-02-23T02:15:00.000Z".to_owned(),
            event: "$autocapture".to_owned(),
            sent_at: None,
            properties: properties.into(),
            timestamp: Some(json!("2020-02-23T02:14:00.000Z")),
            offset: None,
            uuid: UUID.to_owned(),
            set: None,
            set_once: None,
        }
    }

    fn created_at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2020-02-23T02:15:01.000Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn properties_of(row: &EventRow) -> Map<String, Value> {
        match serde_json::from_str(&row.properties).unwrap() {
            Value::Object(properties) => properties,
            other => panic!("properties are not an object: {other}"),
        }
    }

    #[test]
    fn builds_the_row_like_posthog_process_event() {
        let input = event(json!({
            "distinct_id": "my_id",
            "token": "THIS IS NOT A TOKEN FOR TEAM 2",
            "$browser": "Chrome",
            "$elements": [
                { "tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm" },
                { "tag_name": "div", "nth_child": 1, "nth_of_type": 2, "$el_text": "💻" },
            ],
        }));
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();

        assert!(warnings.is_empty());
        assert_eq!(row.uuid, Uuid::parse_str(UUID).unwrap());
        assert_eq!(row.event, "$autocapture");
        assert_eq!(row.team_id, 2);
        assert_eq!(row.distinct_id, "my_id");
        assert_eq!(row.timestamp.to_rfc3339(), "2020-02-23T02:14:00+00:00");
        assert_eq!(row.created_at, created_at());
        assert_eq!(
            row.elements_chain,
            "a.btn.btn-sm:attr__class=\"btn btn-sm\"nth-child=\"1\"nth-of-type=\"2\";\
             div:nth-child=\"1\"nth-of-type=\"2\"text=\"💻\""
        );
        assert_eq!(
            properties_of(&row),
            json!({
                "distinct_id": "my_id",
                "token": "THIS IS NOT A TOKEN FOR TEAM 2",
                "$browser": "Chrome",
                "$ip": "127.0.0.1",
                "$set_once": { "$initial_browser": "Chrome" },
            })
            .as_object()
            .unwrap()
            .clone()
        );
    }

    #[test]
    fn person_and_group_columns_hold_empty_values() {
        let mut warnings = Vec::new();
        let row = prepare_event(event(json!({})), &team(), created_at(), &mut warnings).unwrap();
        assert_eq!(row.person_id, Uuid::nil());
        assert_eq!(&*row.person_properties, "");
        assert_eq!(row.person_created_at.timestamp(), 0);
        assert!(row.group_properties.iter().all(|json| &**json == "{}"));
        assert!(row.group_created_at.iter().all(|at| at.timestamp() == 0));
        assert_eq!(row.elements_chain, "");
    }

    #[test]
    fn invalid_uuid_is_dead_lettered_with_a_warning() {
        for bad_uuid in [
            "",
            "null",
            "not a uuid",
            "017ef86519da00003b601506093bf40f",
            "{017ef865-19da-0000-3b60-1506093bf40f}",
            "017ef865-19da-0000-3b60-1506093bf40g",
        ] {
            let mut input = event(json!({ "a": 1 }));
            input.uuid = bad_uuid.to_owned();
            let mut warnings = Vec::new();
            let letter = prepare_event(input, &team(), created_at(), &mut warnings).unwrap_err();

            assert_eq!(letter.reason, DropReason::InvalidUuid, "{bad_uuid}");
            assert_eq!(letter.error, format!("not a valid UUID: \"{bad_uuid}\""));
            assert_eq!(letter.event, "$autocapture");
            assert_eq!(letter.distinct_id, "my_id");
            assert_eq!(letter.team_id, 2);
            assert_eq!(letter.ip, "127.0.0.1");
            assert_eq!(letter.site_url, "http://localhost");
            assert_eq!(letter.event_uuid, Uuid::nil());
            assert_eq!(letter.now.to_rfc3339(), "2020-02-23T02:15:00+00:00");
            assert!(letter.properties.contains("\"a\":1"));
            let payload: Value = serde_json::from_str(&letter.raw_payload).unwrap();
            assert_eq!(payload["uuid"], bad_uuid);

            assert_eq!(warnings.len(), 1);
            assert_eq!(warnings[0].kind, "skipping_event_invalid_uuid");
            assert_eq!(warnings[0].team_id, 2);
            assert_eq!(
                warnings[0].details,
                json!({ "eventUuid": format!("\"{bad_uuid}\"") })
            );
        }
    }

    #[test]
    fn uppercase_uuid_is_accepted() {
        let mut input = event(json!({}));
        input.uuid = UUID.to_uppercase();
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        assert_eq!(row.uuid, Uuid::parse_str(UUID).unwrap());
    }

    #[test]
    fn event_name_is_cut_to_200_characters() {
        let mut input = event(json!({}));
        input.event = "ü".repeat(250);
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        assert_eq!(row.event, "ü".repeat(200));
    }

    #[test]
    fn empty_or_non_array_elements_give_no_chain_and_leave_the_properties() {
        for elements in [json!([]), json!("a:nth-child=\"1\""), json!(null)] {
            let input = event(json!({ "$elements": elements.clone() }));
            let mut warnings = Vec::new();
            let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
            assert_eq!(row.elements_chain, "");
            assert!(properties_of(&row).get("$elements").is_none(), "{elements}");
        }
    }

    #[test]
    fn a_ready_elements_chain_wins_and_neither_stays_in_properties() {
        let chain = "a.btn:href=\"/go\"nth-child=\"1\"nth-of-type=\"1\";body:nth-child=\"2\"";
        let input = event(json!({
            "$elements_chain": chain,
            "$elements": [{"tag_name": "div"}],
        }));
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        assert_eq!(row.elements_chain, chain);
        let properties = properties_of(&row);
        assert!(properties.get("$elements_chain").is_none());
        assert!(properties.get("$elements").is_none());

        // An empty string is falsy in PostHog's check: `$elements` is rendered instead.
        let input = event(json!({"$elements_chain": "", "$elements": [{"tag_name": "div"}]}));
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        assert_eq!(row.elements_chain, "div:nth-child=\"0\"nth-of-type=\"0\"");
        assert!(properties_of(&row).get("$elements_chain").is_none());
    }

    /// JavaScript's `delete` keeps the other keys in place, and so does the stored JSON here
    /// (serde_json's `remove` would move the last key into the gap).
    #[test]
    fn removing_the_elements_keeps_the_other_properties_in_order() {
        let input = event(json!({
            "first": 1,
            "$elements_chain": "div:nth-child=\"1\"",
            "second": 2,
            "$elements": [],
            "third": 3,
            "last": 4,
        }));
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        let keys: Vec<String> = properties_of(&row).keys().cloned().collect();
        assert_eq!(keys, ["first", "second", "third", "last", "$ip"]);
    }

    #[test]
    fn ip_is_not_added_when_anonymized_absent_or_already_set() {
        let mut anonymizing_team = team();
        anonymizing_team.anonymize_ips = true;
        let mut warnings = Vec::new();
        let row = prepare_event(
            event(json!({})),
            &anonymizing_team,
            created_at(),
            &mut warnings,
        )
        .unwrap();
        assert!(!properties_of(&row).contains_key("$ip"));

        for ip in [None, Some(String::new())] {
            let mut input = event(json!({}));
            input.ip = ip;
            let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
            assert!(!properties_of(&row).contains_key("$ip"));
        }

        for existing in [json!("1.2.3.4"), Value::Null] {
            let input = event(json!({ "$ip": existing.clone() }));
            let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
            assert_eq!(properties_of(&row)["$ip"], existing);
        }
    }

    #[test]
    fn normalizes_again_after_plugins() {
        // A plugin added a campaign parameter and a top-level `$set` after the first pass.
        let mut input = event(json!({ "utm_source": "newsletter", "$set": { "a": 1 } }));
        input.set = Some(json!({ "a": 2, "b": 3 }).as_object().unwrap().clone());
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        let properties = properties_of(&row);
        assert_eq!(
            properties["$set"],
            json!({ "a": 2, "b": 3, "utm_source": "newsletter" })
        );
        assert_eq!(
            properties["$set_once"],
            json!({ "$initial_utm_source": "newsletter" })
        );
    }

    #[test]
    fn timestamp_warnings_name_the_team() {
        let mut input = event(json!({}));
        input.sent_at = Some("not a date".to_owned());
        input.timestamp = Some(json!("2020-02-23T02:14:00.000Z"));
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        assert_eq!(row.timestamp.to_rfc3339(), "2020-02-23T02:14:00+00:00");
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].kind, "ignored_invalid_timestamp");
        assert_eq!(warnings[0].team_id, 2);
    }

    #[test]
    fn skew_corrected_timestamp_is_used() {
        let mut input = event(json!({}));
        input.now = "2021-10-29T05:00:00Z".to_owned();
        input.sent_at = Some("2021-10-29T05:10:00Z".to_owned());
        input.timestamp = Some(json!("2021-10-29T05:08:00Z"));
        let mut warnings = Vec::new();
        let row = prepare_event(input, &team(), created_at(), &mut warnings).unwrap();
        assert_eq!(row.timestamp.to_rfc3339(), "2021-10-29T04:58:00+00:00");
    }
}
