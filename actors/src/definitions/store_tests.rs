//! The writes every definition store's test makes, so that each store is held to the same
//! sequence: the same definitions twice (idempotent), then the properties again with types
//! (a property keeps its first type; an untyped one takes the first type that comes). Each
//! store's test then reads back what it stored in its own tables.

use super::{DefinitionStore, NewDefinitions, PropertyDefinition, PropertyKind, PropertyType};

fn property(name: &str, property_type: Option<PropertyType>) -> PropertyDefinition {
    PropertyDefinition {
        team_id: 2,
        name: name.to_owned(),
        kind: PropertyKind::Event,
        property_type,
    }
}

/// Team 2: event `signup` with property `event_property`, and properties `typed` (numeric,
/// then string) and `later` (untyped, then a date).
pub(crate) async fn write_types_twice(store: &dyn DefinitionStore, event_property: &str) {
    let mut new = NewDefinitions {
        events: vec![(2, "signup".to_owned())],
        properties: vec![
            property("typed", Some(PropertyType::Numeric)),
            property("later", None),
        ],
        event_properties: vec![(2, "signup".to_owned(), event_property.to_owned())],
        ingested_teams: vec![2],
    };
    store.write(&new).await.expect("first write");
    store.write(&new).await.expect("the same again");
    new.properties = vec![
        property("typed", Some(PropertyType::String)),
        property("later", Some(PropertyType::DateTime)),
    ];
    store.write(&new).await.expect("with types");
}
