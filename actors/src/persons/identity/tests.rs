use serde_json::{Value, json};

use super::*;

fn props(value: Value) -> Properties {
    match value {
        Value::Object(map) => map.into(),
        other => panic!("test properties must be an object, got {other}"),
    }
}

fn merge(previous: &str, distinct_id: &str, kind: MergeKind) -> MergeIntent {
    MergeIntent::Merge {
        previous_distinct_id: previous.to_owned(),
        distinct_id: distinct_id.to_owned(),
        kind,
    }
}

const IDENTIFIED: bool = true;
const ANONYMOUS: bool = false;

fn person(id: i64, is_identified: bool) -> Option<PersonRef> {
    Some(PersonRef { id, is_identified })
}

// --- illegal ids ---

#[test]
fn blank_ids_are_illegal() {
    for id in ["", " ", "   ", "\t\n"] {
        assert_eq!(
            illegal_distinct_id_reason(id),
            Some(IllegalIdReason::Blank),
            "{id:?}"
        );
    }
}

#[test]
fn reserved_words_are_illegal_in_any_case() {
    for id in [
        "anonymous",
        "ANONYMOUS",
        "Guest",
        "distinctId",
        "DISTINCT_ID",
        "id",
        "ID",
        "not_authenticated",
        "Email",
        "undefined",
        "UNDEFINED",
        "true",
        "True",
        "false",
        "FALSE",
    ] {
        assert_eq!(
            illegal_distinct_id_reason(id),
            Some(IllegalIdReason::ReservedWord),
            "{id}"
        );
    }
}

#[test]
fn reserved_literals_are_illegal_only_exactly() {
    for id in ["[object Object]", "NaN", "None", "none", "null", "0"] {
        assert_eq!(
            illegal_distinct_id_reason(id),
            Some(IllegalIdReason::ReservedLiteral),
            "{id}"
        );
    }
    for id in [
        "nan",
        "NAN",
        "NULL",
        "Null",
        "NONE",
        "[object object]",
        "00",
    ] {
        assert!(!is_illegal_distinct_id(id), "{id} should be legal");
    }
}

#[test]
fn ordinary_and_padded_ids_are_legal() {
    for id in [
        "user@example.com",
        "0192d1b8-7d1a-7000-8000-000000000000",
        "1",
        "anonymous_user",
        " null",
        "guest ",
        "ídentified",
    ] {
        assert!(!is_illegal_distinct_id(id), "{id:?} should be legal");
    }
}

// --- merge intent ---

#[test]
fn ordinary_events_ask_for_no_merge() {
    let properties = props(json!({"alias": "a", "$anon_distinct_id": "b"}));
    for event in [
        "$pageview",
        "$autocapture",
        "$set",
        "identify",
        "$groupidentify",
    ] {
        assert_eq!(
            merge_intent(event, "user", &properties),
            Ok(MergeIntent::None),
            "{event}"
        );
    }
}

#[test]
fn create_alias_merges_alias_into_distinct_id() {
    let properties = props(json!({"alias": "anon-1"}));
    assert_eq!(
        merge_intent("$create_alias", "user-1", &properties),
        Ok(merge("anon-1", "user-1", MergeKind::Alias))
    );
}

#[test]
fn merge_dangerously_merges_alias_into_distinct_id() {
    let properties = props(json!({"alias": "other-user"}));
    assert_eq!(
        merge_intent("$merge_dangerously", "user-1", &properties),
        Ok(merge("other-user", "user-1", MergeKind::MergeDangerously))
    );
}

#[test]
fn identify_merges_anon_distinct_id_into_distinct_id() {
    let properties = props(json!({"$anon_distinct_id": "anon-1", "alias": "ignored"}));
    assert_eq!(
        merge_intent("$identify", "user-1", &properties),
        Ok(merge("anon-1", "user-1", MergeKind::Identify))
    );
}

#[test]
fn alias_events_without_a_truthy_alias_ask_for_no_merge() {
    for properties in [
        json!({}),
        json!({"alias": null}),
        json!({"alias": ""}),
        json!({"alias": 0}),
        json!({"alias": false}),
        json!({"$anon_distinct_id": "anon-1"}),
    ] {
        let properties = props(properties);
        for event in ["$create_alias", "$merge_dangerously"] {
            assert_eq!(
                merge_intent(event, "user-1", &properties),
                Ok(MergeIntent::None)
            );
        }
    }
}

#[test]
fn identify_without_anon_distinct_id_asks_for_no_merge() {
    let properties = props(json!({"$set": {"email": "a@b.c"}}));
    assert_eq!(
        merge_intent("$identify", "user-1", &properties),
        Ok(MergeIntent::None)
    );
}

#[test]
fn equal_ids_ask_for_no_merge_even_when_illegal() {
    let properties = props(json!({"$anon_distinct_id": "user-1"}));
    assert_eq!(
        merge_intent("$identify", "user-1", &properties),
        Ok(MergeIntent::None)
    );
    let properties = props(json!({"alias": "null"}));
    assert_eq!(
        merge_intent("$create_alias", "null", &properties),
        Ok(MergeIntent::None)
    );
}

#[test]
fn illegal_previous_id_is_refused() {
    let properties = props(json!({"$anon_distinct_id": "Anonymous"}));
    let refusal = merge_intent("$identify", "user-1", &properties).unwrap_err();
    assert_eq!(
        refusal,
        IllegalMerge {
            illegal_distinct_id: "Anonymous".to_owned(),
            other_distinct_id: "user-1".to_owned(),
            side: IllegalIdSide::PreviousDistinctId,
            reason: IllegalIdReason::ReservedWord,
            kind: MergeKind::Identify,
        }
    );
    assert_eq!(refusal.warning(), "cannot_merge_with_illegal_distinct_id");
}

#[test]
fn illegal_distinct_id_is_refused() {
    let properties = props(json!({"alias": "anon-1"}));
    let refusal = merge_intent("$create_alias", " ", &properties).unwrap_err();
    assert_eq!(refusal.side, IllegalIdSide::DistinctId);
    assert_eq!(refusal.reason, IllegalIdReason::Blank);
    assert_eq!(refusal.illegal_distinct_id, " ");
    assert_eq!(refusal.other_distinct_id, "anon-1");
    assert_eq!(refusal.kind, MergeKind::Alias);
}

#[test]
fn distinct_id_is_reported_first_when_both_are_illegal() {
    let properties = props(json!({"alias": "guest"}));
    let refusal = merge_intent("$merge_dangerously", "null", &properties).unwrap_err();
    assert_eq!(refusal.side, IllegalIdSide::DistinctId);
    assert_eq!(refusal.illegal_distinct_id, "null");
    assert_eq!(refusal.reason, IllegalIdReason::ReservedLiteral);
}

#[test]
fn refusal_message_names_the_id_and_the_reason() {
    let properties = props(json!({"$anon_distinct_id": "[object Object]"}));
    let refusal = merge_intent("$identify", "user-1", &properties).unwrap_err();
    let message = refusal.to_string();
    assert!(message.contains("`[object Object]`"), "{message}");
    assert!(message.contains("previous distinct id"), "{message}");
}

#[test]
fn non_string_ids_are_stringified_like_js() {
    let cases = [
        (json!(42), "42"),
        (json!(-7), "-7"),
        (json!(18446744073709551615_u64), "18446744073709551615"),
        (json!(1.5), "1.5"),
        (json!(3.0), "3"),
        (json!(1e21), "1e+21"),
        (json!(1.5e-7), "1.5e-7"),
        (json!(0.000001), "0.000001"),
        (json!(true), "true"),
        (json!(["a", 1, null]), "a,1,"),
    ];
    for (anon, expected) in cases {
        let properties = props(json!({ "$anon_distinct_id": anon }));
        let intent = merge_intent("$identify", "user-1", &properties);
        match expected {
            // "true" is itself a reserved word.
            "true" => assert_eq!(
                intent.map_err(|e| e.reason),
                Err(IllegalIdReason::ReservedWord)
            ),
            _ => assert_eq!(intent, Ok(merge(expected, "user-1", MergeKind::Identify))),
        }
    }
}

#[test]
fn mistyped_ids_stringify_to_illegal_literals() {
    for (anon, illegal) in [
        (json!(null), "null"),
        (json!(0), "0"),
        (json!(-0.0), "0"),
        (json!({"id": 1}), "[object Object]"),
        (json!([]), ""),
    ] {
        let properties = props(json!({ "$anon_distinct_id": anon }));
        let refusal = merge_intent("$identify", "user-1", &properties).unwrap_err();
        assert_eq!(refusal.illegal_distinct_id, illegal);
        assert_eq!(refusal.side, IllegalIdSide::PreviousDistinctId);
    }
}

#[test]
fn object_alias_is_truthy_and_refused() {
    let properties = props(json!({"alias": {}}));
    let refusal = merge_intent("$create_alias", "user-1", &properties).unwrap_err();
    assert_eq!(refusal.illegal_distinct_id, "[object Object]");
}

#[test]
fn merge_kinds_name_their_events() {
    assert_eq!(MergeKind::Identify.event_name(), "$identify");
    assert_eq!(MergeKind::Alias.event_name(), "$create_alias");
    assert_eq!(
        MergeKind::MergeDangerously.event_name(),
        "$merge_dangerously"
    );
}

// --- decide ---

#[test]
fn only_old_person_gets_the_new_id() {
    let decision = decide(MergeKind::Identify, person(1, ANONYMOUS), None);
    assert_eq!(
        decision,
        MergeDecision::AddDistinctIdToOldPerson { person_id: 1 }
    );
    assert_eq!(decision.person_to_mark_identified(), Some(1));
    assert_eq!(decision.warning(), None);
}

#[test]
fn only_new_person_gets_the_old_id() {
    let decision = decide(MergeKind::Alias, None, person(2, IDENTIFIED));
    assert_eq!(
        decision,
        MergeDecision::AddPreviousDistinctIdToNewPerson { person_id: 2 }
    );
    assert_eq!(decision.person_to_mark_identified(), Some(2));
    assert_eq!(decision.warning(), None);
}

#[test]
fn no_person_creates_one_identified_person() {
    for kind in [
        MergeKind::Identify,
        MergeKind::Alias,
        MergeKind::MergeDangerously,
    ] {
        let decision = decide(kind, None, None);
        assert_eq!(decision, MergeDecision::CreateIdentifiedPerson);
        assert_eq!(decision.person_to_mark_identified(), None);
    }
}

#[test]
fn same_person_is_only_marked_identified() {
    for old_identified in [IDENTIFIED, ANONYMOUS] {
        let decision = decide(
            MergeKind::Identify,
            person(3, old_identified),
            person(3, ANONYMOUS),
        );
        assert_eq!(decision, MergeDecision::MarkIdentified { person_id: 3 });
        assert_eq!(decision.person_to_mark_identified(), Some(3));
        assert_eq!(decision.warning(), None);
    }
}

#[test]
fn anonymous_source_is_merged_into_target() {
    for kind in [
        MergeKind::Identify,
        MergeKind::Alias,
        MergeKind::MergeDangerously,
    ] {
        for target_identified in [IDENTIFIED, ANONYMOUS] {
            let decision = decide(kind, person(1, ANONYMOUS), person(2, target_identified));
            assert_eq!(
                decision,
                MergeDecision::MergePeople {
                    target_person_id: 2,
                    source_person_id: 1
                }
            );
            assert_eq!(decision.person_to_mark_identified(), Some(2));
        }
    }
}

#[test]
fn identified_source_is_refused_for_identify_and_alias() {
    for kind in [MergeKind::Identify, MergeKind::Alias] {
        for target_identified in [IDENTIFIED, ANONYMOUS] {
            let decision = decide(kind, person(1, IDENTIFIED), person(2, target_identified));
            assert_eq!(
                decision,
                MergeDecision::RefuseAlreadyIdentified {
                    target_person_id: 2,
                    source_person_id: 1
                }
            );
            assert_eq!(decision.warning(), Some("cannot_merge_already_identified"));
            assert_eq!(decision.person_to_mark_identified(), Some(2));
        }
    }
}

#[test]
fn merge_dangerously_merges_identified_people() {
    let decision = decide(
        MergeKind::MergeDangerously,
        person(1, IDENTIFIED),
        person(2, IDENTIFIED),
    );
    assert_eq!(
        decision,
        MergeDecision::MergePeople {
            target_person_id: 2,
            source_person_id: 1
        }
    );
    assert_eq!(decision.warning(), None);
}
