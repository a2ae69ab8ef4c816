//! An event's `properties`: a JSON object whose values stay as they arrived until a step
//! reads or changes them.
//!
//! Ingestion reads a handful of keys of each event (`$set`, `$set_once`, `$ip`, the campaign
//! and `$initial_*` sources, `$groups`, ...) and writes the object back to ClickHouse. Parsing
//! every value into a `serde_json::Value` tree, keyed by a SipHash map, only to serialize it
//! again cost more than anything else the server did per event (issue 20: two thirds of the
//! parse step). Here each value is kept as its JSON text ([`RawValue`]), parsed on first read
//! and written back byte for byte unless a step changed it; the keys are in an insertion-
//! ordered map with a fast hasher, in the order the client sent them, as PostHog keeps them.

use std::cell::Cell;
use std::fmt;
use std::ops::Index;
use std::sync::OnceLock;

use compact_str::CompactString;
use indexmap::IndexMap;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::envelope::from_str_repairing;

/// The map's hasher: keys come from clients, but a per-process seed is all an in-memory,
/// per-event map needs against collisions.
type Hasher = foldhash::fast::RandomState;

/// A JSON object of properties, in the order the client sent them.
#[derive(Clone, Default)]
pub struct Properties {
    /// Keys of up to 24 bytes (nearly all) are held in the entry itself: no allocation each,
    /// and a lookup compares a key without following a pointer.
    entries: IndexMap<CompactString, Slot, Hasher>,
    /// One bit ([`key_bit`]) for each key ever inserted; removing a key leaves its bit. A key
    /// whose bit is clear is not here. The steps look for keys most events lack (`$groups`,
    /// `$group_0`..`$group_4`, `$process_person_profile`, `$elements_chain`, ...), each after
    /// the batch's other events have pushed this event's map out of the cache: the filter,
    /// beside the event's other fields, answers those without reading the map.
    keys_seen: u128,
}

/// A key's bit in [`Properties::keys_seen`], from its length and last two bytes: the keys the
/// steps look for differ there (`$group_0` from `$group_1`, `$set` from `$unset`), and it
/// costs a few instructions where a full hash would cost more than the lookup it saves.
fn key_bit(key: &str) -> u128 {
    let bytes = key.as_bytes();
    let tail = match bytes {
        [] => 0,
        [only] => u64::from(*only),
        [.., before, last] => u64::from(u16::from_le_bytes([*before, *last])),
    };
    let mixed = (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ tail.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    1 << (mixed >> 57)
}

/// One value: as it arrived, or as a step set it.
#[derive(Clone)]
enum Slot {
    /// The JSON text as it arrived, and its parse once a step has read it.
    Raw {
        text: Box<RawValue>,
        parsed: OnceLock<Box<Value>>,
    },
    /// Set or changed by a step.
    Value(Box<Value>),
}

impl Slot {
    fn raw(text: Box<RawValue>) -> Self {
        Self::Raw {
            text,
            parsed: OnceLock::new(),
        }
    }

    fn get(&self) -> &Value {
        match self {
            Self::Raw { text, parsed } => parsed.get_or_init(|| Box::new(parse(text))),
            Self::Value(value) => value,
        }
    }

    fn get_mut(&mut self) -> &mut Value {
        if let Self::Raw { text, parsed } = self {
            let value = parsed.take().unwrap_or_else(|| Box::new(parse(text)));
            *self = Self::Value(value);
        }
        match self {
            Self::Value(value) => value,
            Self::Raw { .. } => unreachable!("a raw slot was just replaced by its value"),
        }
    }

    fn into_value(self) -> Value {
        match self {
            Self::Raw { text, parsed } => parsed
                .into_inner()
                .map_or_else(|| parse(&text), |value| *value),
            Self::Value(value) => *value,
        }
    }
}

/// The value of JSON text that was checked when it arrived. Browsers' lone UTF-16 surrogate
/// escapes (`"\ud800"`), which the text may keep, become U+FFFD as in the rest of the event.
/// Text that cannot be parsed cannot come from a parsed message; it reads as `null` rather
/// than failing a step.
fn parse(text: &RawValue) -> Value {
    from_str_repairing(text.get()).unwrap_or(Value::Null)
}

impl Properties {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// False when `key` is surely not here; true when it may be.
    fn may_hold(&self, key: &str) -> bool {
        self.keys_seen & key_bit(key) != 0
    }

    /// Every insertion goes through here, which keeps [`Self::keys_seen`] whole. Returns the
    /// key's position.
    fn put(&mut self, key: CompactString, slot: Slot) -> usize {
        self.keys_seen |= key_bit(&key);
        self.entries.insert_full(key, slot).0
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        if !self.may_hold(key) {
            return None;
        }
        self.entries.get(key).map(Slot::get)
    }

    /// The value under `key`, to change: it is written back from its new value.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        if !self.may_hold(key) {
            return None;
        }
        self.entries.get_mut(key).map(Slot::get_mut)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.may_hold(key) && self.entries.contains_key(key)
    }

    /// Sets `key`, keeping its place when it is already there (as JavaScript does).
    pub fn insert(&mut self, key: String, value: Value) {
        self.put(CompactString::from(key), Slot::Value(Box::new(value)));
    }

    /// Removes `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        if !self.may_hold(key) {
            return None;
        }
        self.entries.shift_remove(key).map(Slot::into_value)
    }

    /// The value under `key`, inserted from `default` when missing.
    pub fn get_or_insert_with(&mut self, key: &str, default: impl FnOnce() -> Value) -> &mut Value {
        // One lookup when the key is there, and none but the insertion when its bit is clear.
        let found = if self.may_hold(key) {
            self.entries.get_index_of(key)
        } else {
            None
        };
        let index = found.unwrap_or_else(|| self.put(key.into(), Slot::Value(Box::new(default()))));
        match self.entries.get_index_mut(index) {
            Some((_, slot)) => slot.get_mut(),
            None => unreachable!("{key} is at {index}"),
        }
    }

    /// Every key and value in order. Values not read before are parsed here.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries
            .iter()
            .map(|(key, slot)| (key.as_str(), slot.get()))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(CompactString::as_str)
    }

    /// The object as a `serde_json` map (for plugins' and tests' JSON).
    pub fn into_map(self) -> Map<String, Value> {
        self.entries
            .into_iter()
            .map(|(key, slot)| (key.into_string(), slot.into_value()))
            .collect()
    }

    /// These properties in a new order, some kept and the others from `set` (a plugin's
    /// answer): `order` names, for each property of the result, its position here, or `None`
    /// for the next one of `set`. Keys not named are gone. Nothing changes unless the whole
    /// order fits: a position that is not there or named twice, or a count of `None`s other
    /// than `set`'s length, is an error, and `self` comes back with it.
    pub fn rebuild(self, order: &[Option<u32>], set: Properties) -> Result<Self, (Self, String)> {
        let mut named = vec![false; self.entries.len()];
        let mut from_set = 0;
        for position in order {
            match position.map(|position| (position, named.get_mut(position as usize))) {
                None => from_set += 1,
                Some((_, Some(seen @ false))) => *seen = true,
                Some((position, Some(true))) => {
                    return Err((self, format!("position {position} kept twice")));
                }
                Some((position, None)) => {
                    return Err((self, format!("no property at position {position}")));
                }
            }
        }
        if from_set != set.len() {
            return Err((
                self,
                format!("{from_set} properties set, {} given", set.len()),
            ));
        }
        let mut old: Vec<Option<(CompactString, Slot)>> =
            self.entries.into_iter().map(Some).collect();
        let mut set = set.entries.into_iter();
        let mut rebuilt = Self {
            entries: IndexMap::with_capacity_and_hasher(
                order.len() + ADDED_KEYS,
                Hasher::default(),
            ),
            keys_seen: 0,
        };
        for position in order {
            // Each position was checked to be there once, and `set` to hold the rest.
            let entry = match position {
                Some(position) => old.get_mut(*position as usize).and_then(Option::take),
                None => set.next(),
            };
            if let Some((key, slot)) = entry {
                rebuilt.put(key, slot);
            }
        }
        Ok(rebuilt)
    }

    /// The object as JSON text: unchanged values are copied as they arrived.
    pub fn to_json(&self) -> String {
        // Serializing strings and raw text into a String cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

impl Extend<(String, Value)> for Properties {
    fn extend<I: IntoIterator<Item = (String, Value)>>(&mut self, iter: I) {
        for (key, value) in iter {
            self.insert(key, value);
        }
    }
}

impl FromIterator<(String, Value)> for Properties {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        let mut properties = Self::new();
        properties.extend(iter);
        properties
    }
}

impl From<Map<String, Value>> for Properties {
    fn from(map: Map<String, Value>) -> Self {
        map.into_iter().collect()
    }
}

impl From<Properties> for Value {
    fn from(properties: Properties) -> Self {
        Value::Object(properties.into_map())
    }
}

static NULL: Value = Value::Null;

/// `properties["key"]`: `null` when missing, as `serde_json::Map` indexing gives.
impl Index<&str> for Properties {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        self.get(key).unwrap_or(&NULL)
    }
}

/// Equal when they hold the same keys with equal values, in any order (as maps compare).
impl PartialEq for Properties {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .all(|(key, value)| other.get(key) == Some(value))
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Properties {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (key, slot) in &self.entries {
            match slot {
                Slot::Raw { text, .. } => map.serialize_entry(key.as_str(), text)?,
                Slot::Value(value) => map.serialize_entry(key.as_str(), value)?,
            }
        }
        map.end()
    }
}

/// Reads an object keeping each value's text: from JSON text this copies the value's bytes
/// without building a tree. A later duplicate key wins, keeping the first one's place.
impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor)
    }
}

thread_local! {
    /// How many properties the thread's last object had: the events of a stream are alike.
    static LAST_LEN: Cell<usize> = const { Cell::new(0) };
}

/// Keys the pipeline may add to an event's properties (`$ip`, `$set_once`, `$set`, the
/// plugins' lists).
const ADDED_KEYS: usize = 4;

/// One huge object does not make every later map start huge.
const MAX_REMEMBERED_LEN: usize = 256;

/// Builds [`Properties`] from a JSON object; shared with the envelope, which also takes
/// what is not an object (to report it).
pub(crate) struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Properties;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Properties, A::Error> {
        // JSON text does not say how many keys an object has. A map that starts empty grows
        // and rehashes several times per event (2.4 % of `pipeline_cpu`'s instructions):
        // start as big as the thread's last one, with room for the keys the pipeline adds.
        let capacity = access
            .size_hint()
            .unwrap_or_else(|| LAST_LEN.get() + ADDED_KEYS);
        let mut properties = Properties {
            entries: IndexMap::with_capacity_and_hasher(capacity, Hasher::default()),
            keys_seen: 0,
        };
        while let Some(key) = access.next_key::<CompactString>()? {
            let text: Box<RawValue> = access.next_value()?;
            properties.put(key, Slot::raw(text));
        }
        LAST_LEN.set(properties.len().min(MAX_REMEMBERED_LEN));
        Ok(properties)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parsed(text: &str) -> Properties {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn unchanged_values_are_written_back_as_they_arrived() {
        let text = r#"{"b":1.50,"a":{"x":[1, 2]},"c":"\u00e9"}"#;
        let properties = parsed(text);
        assert_eq!(properties.get("a"), Some(&json!({"x": [1, 2]})));
        assert_eq!(
            properties.to_json(),
            r#"{"b":1.50,"a":{"x":[1, 2]},"c":"\u00e9"}"#
        );
    }

    #[test]
    fn changed_values_are_written_from_their_value_in_place() {
        let mut properties = parsed(r#"{"b":1,"$set":{"x":1},"c":2}"#);
        properties
            .get_mut("$set")
            .and_then(Value::as_object_mut)
            .unwrap()
            .insert("y".to_owned(), json!(2));
        properties.insert("b".to_owned(), json!("two"));
        properties.insert("d".to_owned(), json!(null));
        assert_eq!(
            properties.to_json(),
            r#"{"b":"two","$set":{"x":1,"y":2},"c":2,"d":null}"#
        );
        assert_eq!(properties.remove("b"), Some(json!("two")));
        assert_eq!(properties.remove("c"), Some(json!(2)));
        assert_eq!(properties.to_json(), r#"{"$set":{"x":1,"y":2},"d":null}"#);
    }

    #[test]
    fn a_missing_key_reads_as_null_and_can_be_created() {
        let mut properties = Properties::new();
        assert_eq!(properties["nope"], Value::Null);
        properties
            .get_or_insert_with("$set_once", || json!({}))
            .as_object_mut()
            .unwrap()
            .insert("a".to_owned(), json!(1));
        assert_eq!(properties["$set_once"], json!({"a": 1}));
    }

    #[test]
    fn lone_surrogates_read_as_replacement_characters_and_are_kept_in_the_text() {
        let properties = parsed(r#"{"u":"a\ud800b"}"#);
        assert_eq!(properties["u"], json!("a\u{fffd}b"));
        assert_eq!(properties.to_json(), r#"{"u":"a\ud800b"}"#);
    }

    #[test]
    fn anything_but_an_object_is_refused() {
        for text in ["[]", "\"a\"", "1", "null"] {
            assert!(serde_json::from_str::<Properties>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn values_round_trip_through_serde_json_values() {
        let properties = parsed(r#"{"a":[1,{"b":null}],"c":true}"#);
        let value = serde_json::to_value(&properties).unwrap();
        assert_eq!(value, json!({"a": [1, {"b": null}], "c": true}));
        let back: Properties = serde_json::from_value(value).unwrap();
        assert_eq!(back, properties);
        assert_eq!(Value::from(back), json!({"a": [1, {"b": null}], "c": true}));
    }

    #[test]
    fn a_rebuild_keeps_moves_and_sets_or_changes_nothing() {
        let properties = parsed(r#"{"a":1.0,"b":"x","c":[1]}"#);
        let rebuilt = properties
            .clone()
            .rebuild(&[Some(2), None, Some(0)], parsed(r#"{"d":{"e":2}}"#))
            .map_err(|(_, error)| error)
            .unwrap();
        assert_eq!(rebuilt.to_json(), r#"{"c":[1],"d":{"e":2},"a":1.0}"#);
        for (order, set, reason) in [
            (vec![Some(3)], "{}", "no property at position 3"),
            (vec![Some(1), Some(1)], "{}", "position 1 kept twice"),
            (vec![None], "{}", "1 properties set, 0 given"),
            (vec![Some(0)], r#"{"d":1}"#, "0 properties set, 1 given"),
        ] {
            let (back, error) = properties.clone().rebuild(&order, parsed(set)).unwrap_err();
            assert!(error.contains(reason), "{error}");
            assert_eq!(back.to_json(), r#"{"a":1.0,"b":"x","c":[1]}"#);
        }
    }

    /// The keys the pipeline's steps look for in most events, which most events lack.
    const LOOKED_FOR: [&str; 12] = [
        "$groups",
        "$group_0",
        "$group_1",
        "$group_2",
        "$group_3",
        "$group_4",
        "$process_person_profile",
        "$set",
        "$unset",
        "$elements_chain",
        "$elements",
        "$ip",
    ];

    #[test]
    fn every_way_in_leaves_a_key_findable() {
        let keys: Vec<String> = LOOKED_FOR
            .iter()
            .map(|key| (*key).to_owned())
            .chain((0..300).map(|n| format!("k{n}")))
            .chain(["".to_owned(), "x".to_owned(), "é".to_owned()])
            .collect();
        let text = serde_json::to_string(
            &keys
                .iter()
                .map(|key| (key.clone(), json!(1)))
                .collect::<Map<_, _>>(),
        )
        .unwrap();
        let from_text = parsed(&text);
        let inserted: Properties = keys.iter().map(|key| (key.clone(), json!(1))).collect();
        let mut defaulted = Properties::new();
        for key in &keys {
            defaulted.get_or_insert_with(key, || json!(1));
        }
        let rebuilt = Properties::new()
            .rebuild(&vec![None; keys.len()], inserted.clone())
            .map_err(|(_, error)| error)
            .unwrap();
        for properties in [from_text, inserted, defaulted, rebuilt] {
            let mut properties = properties;
            for key in &keys {
                assert!(properties.contains_key(key), "{key}");
                assert_eq!(properties.get(key), Some(&json!(1)), "{key}");
                assert!(properties.get_mut(key).is_some(), "{key}");
            }
            for key in &keys {
                assert_eq!(properties.remove(key), Some(json!(1)), "{key}");
                assert_eq!(properties.get(key), None, "{key}");
            }
            assert!(properties.is_empty());
            properties.insert("$set".to_owned(), json!(2));
            assert_eq!(properties["$set"], json!(2));
        }
    }

    #[test]
    fn the_keys_most_events_lack_are_told_apart_without_reading_the_map() {
        // Each has its own bit, so an event holding some of them still skips the others.
        let bits: std::collections::HashSet<u128> =
            LOOKED_FOR.iter().map(|key| key_bit(key)).collect();
        assert_eq!(bits.len(), LOOKED_FOR.len());
        // And the event of the end-to-end benchmark skips every one.
        let event = parsed(r#"{"i":1,"$current_url":"https://example.com/p?q=1","blob":"x"}"#);
        for key in LOOKED_FOR {
            assert!(!event.may_hold(key), "{key}");
        }
    }

    #[test]
    fn maps_compare_by_content_not_order_or_form() {
        let raw = parsed(r#"{"a":1,"b":[2]}"#);
        let built: Properties =
            Properties::from(json!({"b": [2], "a": 1}).as_object().cloned().unwrap());
        assert_eq!(raw, built);
        assert_ne!(raw, parsed(r#"{"a":1}"#));
    }
}
