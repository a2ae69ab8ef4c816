//! `DefinitionsManager`: what a batch adds to the definitions, found against caches, and
//! written in the background.
//!
//! Per event: the event's name (its `last_seen_at` rewritten at most once an hour), each
//! event property (type 1) with its event, each `$set` / `$set_once` key as a person property
//! (type 2), and for `$groupidentify` each `$group_set` key as a property of that group type
//! (type 3). `$set`, `$set_once`, `$unset`, `$groups` and `$group_N` are not event properties.
//! A property keeps the type of its first typed value.
//!
//! Most events repeat a shape the server has seen: the event's name and keys are hashed, and a
//! known hash costs no further lookup. Writes leave the ingestion path: they are spawned, and a
//! failed write is logged and forgotten by the caches, so that a later event retries it.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lru::LruCache;
use serde_json::{Map, Value};

use super::types::{PropertyType, detect_property_type};
use crate::event::{PluginEvent, Team};

/// Events the server makes itself, whose properties are not the team's.
const EVENTS_WITHOUT_DEFINITIONS: [&str; 1] = ["$$plugin_metrics"];

/// Keys that steer ingestion rather than describe the event.
const NOT_EVENT_PROPERTIES: [&str; 9] = [
    "$set",
    "$set_once",
    "$unset",
    "$group_0",
    "$group_1",
    "$group_2",
    "$group_3",
    "$group_4",
    "$groups",
];

/// Names longer than the tables' `varchar(400)` columns are not recorded.
const MAX_NAME_CHARS: usize = 400;

/// `posthog_propertydefinition.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyKind {
    Event,
    Person,
    /// With the group type's index.
    Group(u8),
}

impl PropertyKind {
    pub fn type_column(self) -> i16 {
        match self {
            Self::Event => 1,
            Self::Person => 2,
            Self::Group(_) => 3,
        }
    }

    pub fn group_type_index(self) -> Option<i16> {
        match self {
            Self::Group(index) => Some(i16::from(index)),
            Self::Event | Self::Person => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PropertyDefinition {
    pub team_id: i64,
    pub name: String,
    pub kind: PropertyKind,
    pub property_type: Option<PropertyType>,
}

/// What a batch adds: each item once.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NewDefinitions {
    /// `(team, event)`: inserted, or its `last_seen_at` moved to now.
    pub events: Vec<(i64, String)>,
    pub properties: Vec<PropertyDefinition>,
    /// `(team, event, property)`.
    pub event_properties: Vec<(i64, String, String)>,
    /// Teams whose first event this is (`posthog_team.ingested_event`).
    pub ingested_teams: Vec<i64>,
}

impl NewDefinitions {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.properties.is_empty()
            && self.event_properties.is_empty()
            && self.ingested_teams.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DefinitionStoreError {
    #[error("writing definitions failed (check DATABASE_URL): {0}")]
    Unavailable(String),
}

/// Where definitions are written.
#[async_trait]
pub trait DefinitionStore: Send + Sync + 'static {
    /// Inserts what is new, moves `last_seen_at` of the events, gives an untyped property the
    /// type it now has, and marks the teams as having ingested an event. Idempotent.
    async fn write(&self, new: &NewDefinitions) -> Result<(), DefinitionStoreError>;
}

#[derive(Debug, Clone)]
pub struct DefinitionConfig {
    /// Entries per cache (event shapes, events, properties, event properties).
    pub cache_size: usize,
    /// How often an event's `last_seen_at` is rewritten.
    pub last_seen_every: Duration,
}

impl Default for DefinitionConfig {
    fn default() -> Self {
        Self {
            cache_size: 100_000,
            last_seen_every: Duration::from_secs(3600),
        }
    }
}

/// The properties of a known shape that had no type (null, arrays, objects) when its
/// definitions were recorded; usually none, or a few such as `$plugins_succeeded`.
type Untyped = Box<[(PropertyKind, Box<str>)]>;

struct Caches {
    /// Hashes of (team, event, keys) whose definitions are all recorded, with the properties
    /// that had no type then: an event of a known shape is skipped once those are still
    /// untyped, and only their values are read.
    shapes: LruCache<u64, Untyped>,
    /// When each event's `last_seen_at` was last written, by hash of (team, name): a
    /// lookup per event without copying the name.
    events: LruCache<u64, Instant>,
    /// Recorded properties with their type (`None`: no typed value seen yet).
    properties: LruCache<(i64, String, PropertyKind), Option<PropertyType>>,
    event_properties: LruCache<(i64, String, String), ()>,
    ingested_teams: HashSet<i64>,
}

pub struct DefinitionsManager {
    store: Arc<dyn DefinitionStore>,
    /// For the shape and event hashes: every key of every event goes through it, and
    /// foldhash is several times cheaper than the standard SipHash there (callgrind, in
    /// bench/results/ingestion.md), while still seeded per process.
    hasher: foldhash::quality::RandomState,
    last_seen_every: Duration,
    caches: Mutex<Caches>,
}

impl DefinitionsManager {
    pub fn new(store: Arc<dyn DefinitionStore>, config: DefinitionConfig) -> Self {
        let size = NonZeroUsize::new(config.cache_size).unwrap_or(NonZeroUsize::MIN);
        Self {
            store,
            hasher: foldhash::quality::RandomState::default(),
            last_seen_every: config.last_seen_every,
            caches: Mutex::new(Caches {
                shapes: LruCache::new(size),
                events: LruCache::new(size),
                properties: LruCache::new(size),
                event_properties: LruCache::new(size),
                ingested_teams: HashSet::new(),
            }),
        }
    }

    /// What `events` add to the definitions, marked as recorded in the caches: pass it to
    /// [`Self::record`], which forgets it again if the write fails. With each event, the index
    /// of the group type a `$groupidentify` names, if the group step found one.
    pub fn collect<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a Team, &'a PluginEvent, Option<u8>)>,
    ) -> NewDefinitions {
        let mut new = NewDefinitions::default();
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        for (team, event, group_type_index) in events {
            if EVENTS_WITHOUT_DEFINITIONS.contains(&event.event.as_str())
                || event.event.chars().count() > MAX_NAME_CHARS
            {
                continue;
            }
            if !team.ingested_event && caches.ingested_teams.insert(team.id) {
                new.ingested_teams.push(team.id);
            }
            let event_key = self.hasher.hash_one((team.id, event.event.as_str()));
            let last_seen_due = caches
                .events
                .get(&event_key)
                .is_none_or(|written| now.duration_since(*written) >= self.last_seen_every);
            if last_seen_due {
                caches.events.put(event_key, now);
                new.events.push((team.id, event.event.clone()));
            }
            let shape = self.shape_of(team.id, event, group_type_index);
            if caches
                .shapes
                .get(&shape)
                .is_some_and(|untyped| still_untyped(event, group_type_index, untyped))
            {
                continue;
            }
            let mut untyped = Vec::new();
            for (kind, name, value) in properties_of(event, group_type_index) {
                if name.chars().count() > MAX_NAME_CHARS {
                    continue;
                }
                let property_type = detect_property_type(name, value);
                if property_type.is_none() {
                    untyped.push((kind, Box::from(name)));
                }
                let key = (team.id, name.to_owned(), kind);
                let known = caches.properties.get(&key).copied();
                // Known with a type, or known untyped and still untyped: nothing to write.
                let recorded =
                    known.is_some_and(|known| known.is_some() || property_type.is_none());
                if !recorded {
                    caches.properties.put(key, property_type);
                    new.properties.push(PropertyDefinition {
                        team_id: team.id,
                        name: name.to_owned(),
                        kind,
                        property_type,
                    });
                }
                if kind == PropertyKind::Event {
                    let key = (team.id, event.event.clone(), name.to_owned());
                    if caches.event_properties.get(&key).is_none() {
                        caches.event_properties.put(key.clone(), ());
                        new.event_properties.push(key);
                    }
                }
            }
            caches.shapes.put(shape, untyped.into_boxed_slice());
        }
        new
    }

    /// Writes `new` in the background; on failure logs why and forgets it, so that the next
    /// event with the same definitions writes them again.
    pub fn record(self: &Arc<Self>, new: NewDefinitions) {
        if new.is_empty() {
            return;
        }
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = manager.store.write(&new).await {
                tracing::warn!(%error, "event and property definitions not written; retried with later events");
                manager.forget(&new);
            }
        });
    }

    /// A hash of what decides an event's definitions: team, name and every key it defines.
    fn shape_of(&self, team_id: i64, event: &PluginEvent, group_type_index: Option<u8>) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        team_id.hash(&mut hasher);
        event.event.hash(&mut hasher);
        for (kind, name) in property_names_of(event, group_type_index) {
            kind.hash(&mut hasher);
            name.hash(&mut hasher);
        }
        hasher.finish()
    }

    fn forget(&self, new: &NewDefinitions) {
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        // Shapes are cleared whole: which shape held which definition is not kept.
        caches.shapes.clear();
        for (team_id, name) in &new.events {
            caches
                .events
                .pop(&self.hasher.hash_one((*team_id, name.as_str())));
        }
        for property in &new.properties {
            caches
                .properties
                .pop(&(property.team_id, property.name.clone(), property.kind));
        }
        for event_property in &new.event_properties {
            caches.event_properties.pop(event_property);
        }
        for team in &new.ingested_teams {
            caches.ingested_teams.remove(team);
        }
    }
}

/// The properties an event defines: its own (but the steering keys), its `$set` and
/// `$set_once` keys as person properties, and for `$groupidentify` its `$group_set` keys as
/// properties of its group type.
fn properties_of(
    event: &PluginEvent,
    group_type_index: Option<u8>,
) -> impl Iterator<Item = (PropertyKind, &str, &Value)> {
    let own = event
        .properties
        .iter()
        .filter(|(key, _)| !NOT_EVENT_PROPERTIES.contains(key))
        .map(|(key, value)| (PropertyKind::Event, key, value));
    let person = ["$set", "$set_once"]
        .into_iter()
        .filter_map(|key| event.properties.get(key).and_then(Value::as_object))
        .flat_map(|set| set.iter())
        .map(|(key, value)| (PropertyKind::Person, key.as_str(), value));
    let group = group_set(event, group_type_index)
        .into_iter()
        .flat_map(|(index, set)| {
            set.iter()
                .map(move |(key, value)| (PropertyKind::Group(index), key.as_str(), value))
        });
    own.chain(person).chain(group)
}

/// Whether each property a known shape had untyped is still untyped in `event` (a property
/// that got a type since is then recorded with it): only their values are read.
fn still_untyped(event: &PluginEvent, group_type_index: Option<u8>, untyped: &Untyped) -> bool {
    untyped.iter().all(|(kind, name)| {
        let value = match kind {
            PropertyKind::Event => event.properties.get(name),
            // Both may hold it; each is recorded.
            PropertyKind::Person => {
                return ["$set", "$set_once"]
                    .into_iter()
                    .filter_map(|key| event.properties.get(key).and_then(Value::as_object))
                    .filter_map(|set| set.get(&**name))
                    .all(|value| detect_property_type(name, value).is_none());
            }
            PropertyKind::Group(_) => {
                group_set(event, group_type_index).and_then(|(_, set)| set.get(&**name))
            }
        };
        value.is_none_or(|value| detect_property_type(name, value).is_none())
    })
}

/// The names of [`properties_of`], without reading the event's own values: a known shape
/// costs no parsing of them (see [`crate::event::Properties`]).
fn property_names_of(
    event: &PluginEvent,
    group_type_index: Option<u8>,
) -> impl Iterator<Item = (PropertyKind, &str)> {
    let own = event
        .properties
        .keys()
        .filter(|key| !NOT_EVENT_PROPERTIES.contains(key))
        .map(|key| (PropertyKind::Event, key));
    let others = ["$set", "$set_once"]
        .into_iter()
        .filter_map(|key| event.properties.get(key).and_then(Value::as_object))
        .flat_map(|set| set.keys())
        .map(|key| (PropertyKind::Person, key.as_str()))
        .chain(
            group_set(event, group_type_index)
                .into_iter()
                .flat_map(|(index, set)| {
                    set.keys()
                        .map(move |key| (PropertyKind::Group(index), key.as_str()))
                }),
        );
    own.chain(others)
}

/// `$groupidentify`'s `$group_set`, when the group step found its group type's index.
fn group_set(
    event: &PluginEvent,
    group_type_index: Option<u8>,
) -> Option<(u8, &Map<String, Value>)> {
    if event.event != "$groupidentify" {
        return None;
    }
    let set = event.properties.get("$group_set")?.as_object()?;
    Some((group_type_index?, set))
}

#[cfg(test)]
mod tests;
