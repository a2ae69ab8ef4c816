use serde_json::{Value, json};

use super::*;
use crate::persons::{merge_intent, person_updates};

fn event(distinct_id: &str, properties: Value) -> PersonEvent<'static> {
    let Value::Object(properties) = properties else {
        panic!("object");
    };
    PersonEvent {
        team_id: 2,
        distinct_id: distinct_id.to_owned().into(),
        event_uuid: uuid::Uuid::now_v7().to_string().into(),
        timestamp: Utc::now(),
        intent: merge_intent("$pageview", distinct_id, &properties.clone().into()),
        updates: person_updates(&properties.into()).into_owned(),
        process_person: true,
    }
}

fn seen(outcome: &PersonOutcome) -> Value {
    serde_json::from_str::<Value>(&outcome.person.properties).expect("json")["n"].clone()
}

/// A new id's events: one create, of the person as the last event left it; each answer shows
/// the person as its own event left it.
#[test]
fn a_new_id_is_created_once_as_its_last_event_leaves_it() {
    let events = [
        event("u", json!({ "$set": { "n": 1 } })),
        event("u", json!({})),
        event("u", json!({ "$set": { "n": 2 } })),
        event("u", json!({ "$set_once": { "n": 3 } })),
    ];
    let plan = Plan::new(&events, &[0, 1, 2, 3], None);
    let answers: Vec<Value> = plan.answers.iter().map(seen).collect();
    assert_eq!(answers, [json!(1), json!(1), json!(2), json!(2)]);
    assert!(plan.created);
    assert_eq!(plan.last_change, Some(2), "the $set_once changed nothing");
    let Some(PersonWrite::Create {
        distinct_id,
        person,
    }) = &plan.write
    else {
        panic!("no create: {:?}", plan.write);
    };
    assert_eq!(distinct_id, "u");
    assert_eq!(person.properties["n"], json!(2));
    assert_eq!(person.uuid, uuid_from_distinct_id(2, "u"));
    assert_eq!(
        plan.answers[0].person.uuid, person.uuid,
        "the answers name the person being created"
    );
}

/// A known person: an update at the version it was read at, or no write when nothing changed.
#[test]
fn a_known_person_is_updated_once_or_not_at_all() {
    let person = Person {
        id: 7,
        uuid: uuid_from_distinct_id(2, "u"),
        team_id: 2,
        created_at: Utc::now(),
        properties: json!({ "n": 1 }).as_object().cloned().expect("object"),
        is_identified: false,
        version: 4,
    };
    let known = Known {
        event_person: EventPerson::of(&person),
        person: Arc::new(person),
    };
    let unchanged = [event("u", json!({ "$set": { "n": 1 } }))];
    let plan = Plan::new(&unchanged, &[0], Some(&known));
    assert_eq!(plan.write, None);
    assert_eq!(plan.last_change, None);

    let changed = [
        event("u", json!({ "$set": { "n": 5 } })),
        event("u", json!({ "$unset": ["n"] })),
    ];
    let plan = Plan::new(&changed, &[0, 1], Some(&known));
    let Some(PersonWrite::Update { person, .. }) = &plan.write else {
        panic!("no update: {:?}", plan.write);
    };
    assert_eq!(
        (person.id, person.version),
        (7, 4),
        "the version it was read at"
    );
    assert!(person.properties.get("n").is_none());
    assert_eq!(seen(&plan.answers[0]), json!(5));
    assert_eq!(seen(&plan.answers[1]), Value::Null);
}
