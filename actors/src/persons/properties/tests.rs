use serde_json::{Map, Value, json};

use super::*;

fn props(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("test properties must be an object, got {other}"),
    }
}

fn event_props(value: Value) -> Properties {
    props(value).into()
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

// --- person_updates ---

#[test]
fn updates_are_read_from_event_properties() {
    let updates = person_updates(&event_props(json!({
        "$set": {"email": "a@b.c"},
        "$set_once": {"first_seen": "today"},
        "$unset": ["old", "older"],
        "$browser": "Firefox",
    })))
    .into_owned();
    assert_eq!(*updates.set, props(json!({"email": "a@b.c"})));
    assert_eq!(*updates.set_once, props(json!({"first_seen": "today"})));
    assert_eq!(updates.unset, keys(&["old", "older"]));
    assert!(!updates.is_empty());
}

#[test]
fn unset_as_object_unsets_its_keys() {
    let updates = person_updates(&event_props(
        json!({"$unset": {"a": null, "b": "ignored value"}}),
    ))
    .into_owned();
    let mut unset = updates.unset;
    unset.sort();
    assert_eq!(unset, keys(&["a", "b"]));
}

#[test]
fn unset_array_ignores_non_strings() {
    let updates = person_updates(&event_props(
        json!({"$unset": ["a", 1, null, {"b": 1}, "c"]}),
    ))
    .into_owned();
    assert_eq!(updates.unset, keys(&["a", "c"]));
}

#[test]
fn missing_or_mistyped_updates_are_empty() {
    assert!(person_updates(&Properties::new()).is_empty());
    let updates = person_updates(&event_props(json!({
        "$set": "not an object",
        "$set_once": ["a"],
        "$unset": "a",
    })))
    .into_owned();
    assert_eq!(updates, PersonUpdates::default());
}

// --- initial_properties ---

#[test]
fn initial_properties_let_set_beat_set_once() {
    let set = props(json!({"name": "set", "only_set": 1}));
    let set_once = props(json!({"name": "set_once", "only_set_once": 2}));
    assert_eq!(
        initial_properties(&set, &set_once, "event-uuid"),
        props(json!({
            "name": "set",
            "only_set": 1,
            "only_set_once": 2,
            "$creator_event_uuid": "event-uuid",
        }))
    );
}

#[test]
fn creator_event_uuid_beats_the_event_properties() {
    let set = props(json!({"$creator_event_uuid": "forged"}));
    let set_once = props(json!({"$creator_event_uuid": "forged too"}));
    let properties = initial_properties(&set, &set_once, "real");
    assert_eq!(properties, props(json!({"$creator_event_uuid": "real"})));
}

#[test]
fn initial_properties_without_updates_hold_only_the_creator() {
    let properties = initial_properties(&Map::new(), &Map::new(), "uuid");
    assert_eq!(properties, props(json!({"$creator_event_uuid": "uuid"})));
}

// --- apply_updates ---

#[test]
fn set_overwrites_and_adds() {
    let mut properties = props(json!({"a": 1, "b": 2}));
    let changed = apply_updates(
        &mut properties,
        &props(json!({"a": 10, "c": 3})),
        &Map::new(),
        &[],
    );
    assert!(changed);
    assert_eq!(properties, props(json!({"a": 10, "b": 2, "c": 3})));
}

#[test]
fn set_once_fills_only_missing_keys() {
    let mut properties = props(json!({"a": 1, "nothing": null}));
    let set_once = props(json!({"a": 10, "nothing": 20, "b": 2}));
    assert!(apply_updates(&mut properties, &Map::new(), &set_once, &[]));
    assert_eq!(properties, props(json!({"a": 1, "nothing": null, "b": 2})));
}

#[test]
fn unset_deletes_present_keys() {
    let mut properties = props(json!({"a": 1, "b": 2}));
    assert!(apply_updates(
        &mut properties,
        &Map::new(),
        &Map::new(),
        &keys(&["a", "missing"])
    ));
    assert_eq!(properties, props(json!({"b": 2})));
}

#[test]
fn set_beats_set_once_for_a_new_key() {
    let mut properties = Map::new();
    let set = props(json!({"plan": "paid"}));
    let set_once = props(json!({"plan": "free"}));
    assert!(apply_updates(&mut properties, &set, &set_once, &[]));
    assert_eq!(properties, props(json!({"plan": "paid"})));
}

#[test]
fn unset_beats_set_and_set_once() {
    let mut properties = props(json!({"kept": true}));
    let set = props(json!({"gone": 1}));
    let set_once = props(json!({"gone_too": 2}));
    assert!(apply_updates(
        &mut properties,
        &set,
        &set_once,
        &keys(&["gone", "gone_too"])
    ));
    assert_eq!(properties, props(json!({"kept": true})));
}

#[test]
fn no_op_updates_report_unchanged() {
    let original = props(json!({"a": 1, "nested": {"x": [1, 2]}, "n": null}));
    let mut properties = original.clone();
    let set = props(json!({"a": 1, "nested": {"x": [1, 2]}, "n": null}));
    let set_once = props(json!({"a": 99, "n": "fill"}));
    let unset = keys(&["not_there"]);
    assert!(!apply_updates(&mut properties, &set, &set_once, &unset));
    assert_eq!(properties, original);
}

#[test]
fn empty_updates_report_unchanged() {
    let mut properties = props(json!({"a": 1}));
    assert!(!apply_updates(
        &mut properties,
        &Map::new(),
        &Map::new(),
        &[]
    ));
    assert!(!PersonUpdates::default().apply_to(&mut properties));
}

#[test]
fn set_to_null_or_other_type_is_a_change() {
    let mut properties = props(json!({"a": 1, "b": "1"}));
    assert!(apply_updates(
        &mut properties,
        &props(json!({"a": null})),
        &Map::new(),
        &[]
    ));
    assert!(apply_updates(
        &mut properties,
        &props(json!({"b": 1})),
        &Map::new(),
        &[]
    ));
    assert_eq!(properties, props(json!({"a": null, "b": 1})));
}

#[test]
fn updates_apply_from_event_properties() {
    let updates = person_updates(&event_props(json!({
        "$set": {"email": "new@b.c"},
        "$set_once": {"first": "x", "email": "ignored@b.c"},
        "$unset": {"legacy": true},
    })))
    .into_owned();
    let mut properties = props(json!({"email": "old@b.c", "legacy": 1}));
    assert!(updates.apply_to(&mut properties));
    assert_eq!(properties, props(json!({"email": "new@b.c", "first": "x"})));
    assert!(
        !updates.apply_to(&mut properties),
        "re-applying the same event changes nothing"
    );
}

// --- merged_properties ---

#[test]
fn merge_keeps_target_values_and_source_extras() {
    let target = props(json!({"email": "target@b.c", "plan": "paid"}));
    let source = props(json!({"email": "source@b.c", "utm": "ad"}));
    assert_eq!(
        merged_properties(&target, &source),
        props(json!({"email": "target@b.c", "plan": "paid", "utm": "ad"}))
    );
}

#[test]
fn merge_with_empty_sides() {
    let only = props(json!({"a": 1}));
    assert_eq!(merged_properties(&only, &Map::new()), only);
    assert_eq!(merged_properties(&Map::new(), &only), only);
}

#[test]
fn merge_then_event_updates_as_in_merge_people() {
    let target = props(json!({"name": "target"}));
    let source = props(json!({"name": "source", "anon_prop": 1, "stale": true}));
    let mut properties = merged_properties(&target, &source);
    let updates = person_updates(&event_props(json!({
        "$set": {"name": "from event"},
        "$set_once": {"anon_prop": 2},
        "$unset": ["stale"],
    })))
    .into_owned();
    assert!(updates.apply_to(&mut properties));
    assert_eq!(
        properties,
        props(json!({"name": "from event", "anon_prop": 1}))
    );
}

#[test]
fn would_change_agrees_with_applying_the_updates() {
    let initial = props(json!({ "a": 1, "b": "x", "n": null }));
    let cases = [
        json!({}),
        json!({ "$set": { "a": 1 } }),
        json!({ "$set": { "a": 2 } }),
        json!({ "$set_once": { "a": 5, "n": 3 } }),
        json!({ "$set_once": { "c": 1 } }),
        json!({ "$unset": ["zzz"] }),
        json!({ "$unset": ["b"] }),
        json!({ "$set": { "a": 2 }, "$unset": ["a"] }),
        json!({ "$set_once": { "c": 1 }, "$unset": ["c"] }),
        json!({ "$set": { "a": 1 }, "$set_once": { "a": 9 } }),
        json!({ "$set": { "c": { "deep": [1, 2] } } }),
    ];
    for case in cases {
        let updates = person_updates(&event_props(case.clone())).into_owned();
        let mut applied = initial.clone();
        updates.apply_to(&mut applied);
        assert_eq!(updates.would_change(&initial), applied != initial, "{case}");
    }
}
