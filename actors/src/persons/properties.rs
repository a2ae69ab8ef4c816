//! Person properties (spec 1.5 steps 1–3): the initial properties of a new person, how an
//! event's `$set`, `$set_once` and `$unset` change them, and how a merge combines two people.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::event::Properties;

/// The property naming the event that created the person.
pub const CREATOR_EVENT_UUID: &str = "$creator_event_uuid";

/// The person-property operations carried by one event, borrowed from its properties.
///
/// The person step reads them once or twice per event, while the event itself is held by the
/// batch; copying the maps cost an allocation per key and per value, then freeing them all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersonUpdates<'a> {
    /// `$set`: overwrite these keys.
    pub set: Cow<'a, Map<String, Value>>,
    /// `$set_once`: write these keys only where the person has none.
    pub set_once: Cow<'a, Map<String, Value>>,
    /// `$unset`: delete these keys.
    pub unset: Vec<String>,
}

impl PersonUpdates<'_> {
    /// Whether the event touches no person property at all.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.set_once.is_empty() && self.unset.is_empty()
    }

    /// These updates, owning what they borrowed.
    pub fn into_owned(self) -> PersonUpdates<'static> {
        PersonUpdates {
            set: Cow::Owned(self.set.into_owned()),
            set_once: Cow::Owned(self.set_once.into_owned()),
            unset: self.unset,
        }
    }

    /// Whether applying these updates to `properties` would leave them different, computed
    /// without copying them: per touched key, `$unset` wins, then `$set`, then `$set_once`
    /// where the key is missing ([`apply_updates`]'s order).
    pub fn would_change(&self, properties: &Map<String, Value>) -> bool {
        self.set_once
            .keys()
            .chain(self.set.keys())
            .chain(self.unset.iter())
            .any(|key| {
                // Looked up once: the person's map is the large one, hashed with SipHash.
                let current = properties.get(key);
                let after = if self.unset.iter().any(|unset| unset == key) {
                    None
                } else if let Some(value) = self.set.get(key) {
                    Some(value)
                } else {
                    current.or_else(|| self.set_once.get(key))
                };
                after != current
            })
    }

    /// Applies these updates; see [`apply_updates`].
    pub fn apply_to(&self, properties: &mut Map<String, Value>) -> bool {
        apply_updates(properties, &self.set, &self.set_once, &self.unset)
    }
}

/// Reads `$set`, `$set_once` and `$unset` from an event's properties.
///
/// A `$set` or `$set_once` that is not an object is ignored. `$unset` is normally an array of
/// keys, but some SDKs send an object whose keys are to be unset, which PostHog accepts too;
/// non-string array elements are ignored since no SDK sends them.
pub fn person_updates(properties: &Properties) -> PersonUpdates<'_> {
    let object = |key: &str| match properties.get(key) {
        Some(Value::Object(map)) => Cow::Borrowed(map),
        _ => Cow::Owned(Map::new()),
    };
    let unset = match properties.get("$unset") {
        Some(Value::Array(keys)) => keys
            .iter()
            .filter_map(|key| key.as_str().map(str::to_owned))
            .collect(),
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    PersonUpdates {
        set: object("$set"),
        set_once: object("$set_once"),
        unset,
    }
}

/// The properties of a person created by an event: `{...$set_once, ...$set,
/// $creator_event_uuid}`, so `$set` beats `$set_once` and the creator uuid beats both.
/// `$unset` plays no part: there is nothing to delete yet.
pub fn initial_properties(
    set: &Map<String, Value>,
    set_once: &Map<String, Value>,
    creator_event_uuid: &str,
) -> Map<String, Value> {
    let mut properties = set_once.clone();
    properties.extend(set.iter().map(|(key, value)| (key.clone(), value.clone())));
    properties.insert(
        CREATOR_EVENT_UUID.to_owned(),
        Value::String(creator_event_uuid.to_owned()),
    );
    properties
}

/// Applies an event's updates to an existing person's properties and returns whether anything
/// changed, which decides if the row is written and its version bumped.
///
/// The order is PostHog's: `$set_once` first, then `$set`, then `$unset`. So a key in both
/// `$set_once` and `$set` ends with the `$set` value, and a key that is set and unset in the
/// same event ends deleted.
///
/// A key holding JSON null counts as present for `$set_once` (PostHog checks for `undefined`,
/// which JSON cannot hold). `$set` compares values deeply, so re-sending an equal object is not
/// a change.
pub fn apply_updates(
    properties: &mut Map<String, Value>,
    set: &Map<String, Value>,
    set_once: &Map<String, Value>,
    unset: &[String],
) -> bool {
    let mut changed = false;
    for (key, value) in set_once {
        if !properties.contains_key(key) {
            properties.insert(key.clone(), value.clone());
            changed = true;
        }
    }
    // A key the person has is overwritten in place: one hash lookup and no copy of the key.
    // The map hashes with SipHash, and this runs for every property of every `$set`.
    for (key, value) in set {
        match properties.get_mut(key) {
            Some(existing) if existing == value => {}
            Some(existing) => {
                existing.clone_from(value);
                changed = true;
            }
            None => {
                properties.insert(key.clone(), value.clone());
                changed = true;
            }
        }
    }
    for key in unset {
        changed |= properties.remove(key).is_some();
    }
    changed
}

/// The properties of the person kept by a merge, before the event's own updates are applied:
/// `{...source, ...target}`, so the target's values win on conflicts.
pub fn merged_properties(
    target: &Map<String, Value>,
    source: &Map<String, Value>,
) -> Map<String, Value> {
    let mut properties = source.clone();
    properties.extend(
        target
            .iter()
            .map(|(key, value)| (key.clone(), value.clone())),
    );
    properties
}

#[cfg(test)]
mod tests;
