use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use uuid::Uuid;

use super::*;

/// Records what it is asked to write; fails while `failing` is set.
#[derive(Default)]
struct RecordingStore {
    written: Mutex<Vec<NewDefinitions>>,
    failing: AtomicBool,
}

#[async_trait]
impl DefinitionStore for RecordingStore {
    async fn write(&self, new: &NewDefinitions) -> Result<(), DefinitionStoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(DefinitionStoreError::Unavailable("down".to_owned()));
        }
        self.written.lock().unwrap().push(new.clone());
        Ok(())
    }
}

fn team(ingested_event: bool) -> Team {
    Team {
        id: 2,
        uuid: Uuid::nil(),
        organization_id: Uuid::nil(),
        api_token: "token".to_owned(),
        name: "Team".to_owned(),
        anonymize_ips: false,
        session_recording_opt_in: false,
        ingested_event,
        slack_incoming_webhook: None,
        timezone: "UTC".to_owned(),
    }
}

fn event(name: &str, properties: Value) -> PluginEvent {
    PluginEvent::for_test(name, properties)
}

fn manager() -> (Arc<DefinitionsManager>, Arc<RecordingStore>) {
    let store = Arc::new(RecordingStore::default());
    let manager = Arc::new(DefinitionsManager::new(
        store.clone(),
        DefinitionConfig::default(),
    ));
    (manager, store)
}

fn property<'a>(new: &'a NewDefinitions, name: &str) -> Option<&'a PropertyDefinition> {
    new.properties.iter().find(|p| p.name == name)
}

#[test]
fn an_event_defines_its_name_properties_person_properties_and_event_properties() {
    let (manager, _) = manager();
    let team = team(false);
    let pageview = event(
        "$pageview",
        json!({"plan": "pro", "count": 2, "$set": {"email": "a@b.c"}, "$set_once": {"first": true},
               "$group_0": "acme", "$groups": {"company": "acme"}, "nested": {"a": 1}}),
    );
    let new = manager.collect([(&team, &pageview, None)]);
    assert_eq!(new.events, [(2, "$pageview".to_owned())]);
    assert_eq!(new.ingested_teams, [2]);
    let plan = property(&new, "plan").unwrap();
    assert_eq!(
        (plan.kind, plan.property_type),
        (PropertyKind::Event, Some(PropertyType::String))
    );
    assert_eq!(
        property(&new, "count").unwrap().property_type,
        Some(PropertyType::Numeric)
    );
    assert_eq!(property(&new, "email").unwrap().kind, PropertyKind::Person);
    assert_eq!(
        property(&new, "first").unwrap().property_type,
        Some(PropertyType::Boolean)
    );
    assert_eq!(property(&new, "nested").unwrap().property_type, None);
    for steering in ["$set", "$set_once", "$group_0", "$groups"] {
        assert!(property(&new, steering).is_none(), "{steering}");
    }
    let mut on_event: Vec<&str> = new
        .event_properties
        .iter()
        .map(|(_, _, p)| p.as_str())
        .collect();
    on_event.sort_unstable();
    assert_eq!(
        on_event,
        ["count", "nested", "plan"],
        "person properties are not event properties"
    );
}

#[test]
fn a_group_identify_defines_its_group_set_under_the_group_type() {
    let (manager, _) = manager();
    let team = team(true);
    let identify = event(
        "$groupidentify",
        json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"seats": 10}}),
    );
    let new = manager.collect([(&team, &identify, Some(1))]);
    let seats = property(&new, "seats").unwrap();
    assert_eq!(seats.kind, PropertyKind::Group(1));
    assert_eq!(seats.property_type, Some(PropertyType::Numeric));
    assert!(
        new.ingested_teams.is_empty(),
        "the team has ingested events already"
    );
}

#[test]
fn what_is_recorded_is_not_written_again_and_last_seen_waits_an_hour() {
    let (manager, _) = manager();
    let team = team(false);
    let first = event("signup", json!({"plan": "pro"}));
    assert!(!manager.collect([(&team, &first, None)]).is_empty());
    let same_shape = event("signup", json!({"plan": "free"}));
    assert_eq!(
        manager.collect([(&team, &same_shape, None)]),
        NewDefinitions::default()
    );
    let one_more = event("signup", json!({"plan": "free", "seats": 3}));
    let new = manager.collect([(&team, &one_more, None)]);
    assert!(
        new.events.is_empty(),
        "last_seen_at is rewritten at most once an hour"
    );
    assert_eq!(new.properties.len(), 1);
    assert_eq!(new.properties[0].name, "seats");
}

#[test]
fn an_untyped_property_is_written_again_once_a_value_gives_it_a_type() {
    let (manager, _) = manager();
    let team = team(true);
    let new = manager.collect([(&team, &event("e", json!({"p": null})), None)]);
    assert_eq!(property(&new, "p").unwrap().property_type, None);
    let new = manager.collect([(&team, &event("e", json!({"p": null})), None)]);
    assert!(new.properties.is_empty());
    let new = manager.collect([(&team, &event("e", json!({"p": "x"})), None)]);
    assert_eq!(
        property(&new, "p").unwrap().property_type,
        Some(PropertyType::String)
    );

    // A person property in both `$set` and `$set_once`: a typed value in either one counts.
    let untyped = json!({"$set": {"q": null}, "$set_once": {"q": null}});
    let new = manager.collect([(&team, &event("e", untyped.clone()), None)]);
    assert_eq!(property(&new, "q").unwrap().property_type, None);
    let new = manager.collect([(&team, &event("e", untyped), None)]);
    assert!(new.properties.is_empty(), "{new:?}");
    let typed_once = json!({"$set": {"q": null}, "$set_once": {"q": 3}});
    let new = manager.collect([(&team, &event("e", typed_once), None)]);
    assert_eq!(
        property(&new, "q").unwrap().property_type,
        Some(PropertyType::Numeric)
    );
}

#[test]
fn plugin_metrics_and_overlong_names_define_nothing() {
    let (manager, _) = manager();
    let team = team(true);
    let metrics = event("$$plugin_metrics", json!({"a": 1}));
    assert!(manager.collect([(&team, &metrics, None)]).is_empty());
    let long_key = event("e", json!({ "k".repeat(401): 1, "ok": 1 }));
    let new = manager.collect([(&team, &long_key, None)]);
    assert_eq!(new.properties.len(), 1);
}

#[tokio::test]
async fn a_failed_write_is_forgotten_and_retried_with_a_later_event() {
    let (manager, store) = manager();
    let team = team(false);
    store.failing.store(true, Ordering::SeqCst);
    manager.record(manager.collect([(&team, &event("signup", json!({"plan": "pro"})), None)]));
    // The spawned write fails and forgets; wait for it.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if manager.caches.lock().unwrap().events.is_empty() {
            break;
        }
    }
    store.failing.store(false, Ordering::SeqCst);
    let new = manager.collect([(&team, &event("signup", json!({"plan": "pro"})), None)]);
    assert_eq!(new.events.len(), 1);
    assert_eq!(new.properties.len(), 1);
    assert_eq!(new.ingested_teams, [2]);
    manager.record(new);
    for _ in 0..100 {
        if !store.written.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.written.lock().unwrap().len(), 1);
}
