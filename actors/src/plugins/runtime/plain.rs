//! Values that leave a VM: what a plugin returned, reduced to JSON data as `JSON.stringify`
//! would see it, but still holding boa's strings.
//!
//! A team's processEvent chain hands one event through up to tens of VMs. Converting each
//! result to a `serde_json::Value` and back re-encodes every string twice (UTF-16 or Latin-1
//! to UTF-8 and back), and boa's own `to_json` writes strings a character at a time: together
//! about 40 % of a plugin call. A [`Plain`] value keeps the `JsString`s, which are immutable
//! and reference counted, so the next VM of the thread builds its objects from them without
//! copying text; only the chain's end converts to JSON once.
//!
//! The reduction follows `JSON.stringify` (ECMA-262 SerializeJSONProperty), which is what
//! PostHog's Node server does to an event before it leaves: `toJSON` is called (a `Date` becomes
//! its ISO string), getters run, only enumerable string keys count, functions, symbols and
//! `undefined` disappear from objects and become `null` in arrays, non-finite numbers become
//! `null`, a `BigInt` or a cycle is a `TypeError`. Every VM builds its own objects from a
//! `Plain` value, so no plugin ever holds an object of another plugin's realm.

use boa_engine::builtins::object::OrdinaryObject;
use boa_engine::object::ObjectInitializer;
use boa_engine::object::builtins::JsArray;
use boa_engine::property::{Attribute, PropertyKey};
use boa_engine::string::JsStrVariant;
use boa_engine::{
    Context, JsNativeError, JsObject, JsResult, JsString, JsValue, JsVariant, js_string,
};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Number, Value};

/// Objects nested deeper than this are refused (`JSON.stringify` would exhaust its stack); the
/// limit keeps a hostile plugin from overflowing the worker thread's stack instead.
const MAX_DEPTH: usize = 512;

/// JSON data with boa strings: what a plugin returned, after `JSON.stringify`'s rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Plain {
    Null,
    Bool(bool),
    /// Always finite (`JSON.stringify` writes the others as `null`).
    Number(f64),
    String(JsString),
    Array(Vec<Plain>),
    Object(Vec<(JsString, Plain)>),
}

impl Plain {
    /// Reduces `value` as `JSON.stringify(value)` would; `None` where it would return
    /// `undefined` (for `undefined`, a function or a symbol).
    pub fn export(value: &JsValue, context: &mut Context) -> JsResult<Option<Self>> {
        Exporter {
            stack: Vec::new(),
            prototypes: PlainPrototypes::of(context),
        }
        .property(value.clone(), Key::Name(&js_string!()), context)
    }

    /// Builds the value as objects of `context`'s realm, as `JSON.parse` of its text would.
    pub fn to_js(&self, context: &mut Context) -> JsValue {
        match self {
            Self::Null => JsValue::null(),
            Self::Bool(b) => JsValue::new(*b),
            Self::Number(n) => number_to_js(*n),
            Self::String(s) => JsValue::from(s.clone()),
            Self::Array(items) => {
                let values: Vec<JsValue> = items.iter().map(|item| item.to_js(context)).collect();
                JsArray::from_iter(values, context).into()
            }
            Self::Object(entries) => {
                let values: Vec<JsValue> = entries.iter().map(|(_, v)| v.to_js(context)).collect();
                object(entries.iter().map(|(k, _)| k.clone()).zip(values), context)
            }
        }
    }

    /// The value as JSON; numbers that are integers come out as integers, as in
    /// `JSON.stringify`.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Null => Value::Null,
            Self::Bool(b) => Value::Bool(*b),
            Self::Number(n) => number_to_json(*n),
            Self::String(s) => Value::String(rust_string(s)),
            Self::Array(items) => Value::Array(items.iter().map(Self::to_json).collect()),
            Self::Object(entries) => {
                let mut map = Map::with_capacity(entries.len());
                for (key, value) in entries {
                    map.insert(rust_string(key), value.to_json());
                }
                Value::Object(map)
            }
        }
    }

    /// The value at `key` of an object (`None` for a missing key or a non-object).
    pub fn get(&self, key: &str) -> Option<&Self> {
        match self {
            Self::Object(entries) => entries.iter().find(|(k, _)| *k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Adds `labels` to the list at `properties[key]` of an event, making the properties
    /// object and the list if they are missing or not of that type.
    pub fn append_labels(&mut self, key: &str, labels: &[String]) {
        let Self::Object(entries) = self else {
            return;
        };
        let properties = entry(entries, "properties", || Self::Object(Vec::new()));
        let Self::Object(properties) = properties else {
            return;
        };
        let list = entry(properties, key, || Self::Array(Vec::new()));
        if let Self::Array(list) = list {
            list.extend(
                labels
                    .iter()
                    .map(|l| Self::String(JsString::from(l.as_str()))),
            );
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Self::Object(_))
    }

    /// As `crate::event::js::type_name` names JSON values.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number(_) => "a number",
            Self::String(_) => "a string",
            Self::Array(_) => "an array",
            Self::Object(_) => "an object",
        }
    }
}

/// Builds JSON text (an event from the server) as objects of `context`'s realm, in one pass:
/// the objects [`json_to_js`] makes of its parse, without the `serde_json::Value` between.
pub fn text_to_js(text: &str, context: &mut Context) -> Result<JsValue, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = JsSeed(context).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// The `properties` of an event as [`event_text_to_js`] built them, in the text's order: each
/// key with its value when that is a primitive (`None` for an object or an array, which a
/// plugin may change in place). What the chain compares a plugin's result with, to send back
/// only what changed.
pub type Originals = Vec<(JsString, Option<Plain>)>;

/// [`text_to_js`] for an event (a JSON object), also giving its `properties` as they went in
/// (`None` when the event has no `properties` object).
pub fn event_text_to_js(
    text: &str,
    context: &mut Context,
) -> Result<(JsValue, Option<Originals>), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let mut originals = None;
    let value = deserializer.deserialize_any(KeepingSeed {
        context,
        originals: &mut originals,
        level: Level::Event,
    })?;
    deserializer.end()?;
    Ok((value, originals))
}

/// Builds as [`JsSeed`] does, keeping an event's properties in [`Originals`] on the way.
struct KeepingSeed<'a> {
    context: &'a mut Context,
    originals: &'a mut Option<Originals>,
    level: Level,
}

/// Where a [`KeepingSeed`] is in an event.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    /// The event itself: its `properties` are kept.
    Event,
    /// The event's `properties`: each entry is kept, if it is an object.
    Properties,
}

impl<'de> DeserializeSeed<'de> for KeepingSeed<'_> {
    type Value = JsValue;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<JsValue, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeepingSeed<'_> {
    type Value = JsValue;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    // Anything but an object keeps nothing, and is built as any value is.

    fn visit_unit<E: serde::de::Error>(self) -> Result<JsValue, E> {
        JsSeed(self.context).visit_unit()
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<JsValue, E> {
        JsSeed(self.context).visit_bool(b)
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<JsValue, E> {
        JsSeed(self.context).visit_i64(n)
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<JsValue, E> {
        JsSeed(self.context).visit_u64(n)
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<JsValue, E> {
        JsSeed(self.context).visit_f64(n)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<JsValue, E> {
        JsSeed(self.context).visit_str(text)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<JsValue, A::Error> {
        JsSeed(self.context).visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsValue, A::Error> {
        let capacity = map.size_hint().unwrap_or(0);
        let mut entries = Vec::with_capacity(capacity);
        let mut kept: Originals = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let value = match self.level {
                Level::Event if key == "properties" => {
                    // A later duplicate `properties` wins in the object, so it wins here too.
                    *self.originals = None;
                    map.next_value_seed(KeepingSeed {
                        context: &mut *self.context,
                        originals: &mut *self.originals,
                        level: Level::Properties,
                    })?
                }
                _ => map.next_value_seed(JsSeed(&mut *self.context))?,
            };
            let key = key_string(&key);
            if self.level == Level::Properties {
                kept.push((key.clone(), primitive(&value)));
            }
            entries.push((key, value));
        }
        if self.level == Level::Properties {
            *self.originals = Some(kept);
        }
        Ok(object(entries.into_iter(), self.context))
    }
}

/// A primitive value built from JSON as [`Plain`] (what [`Plain::export`] makes of it), or
/// `None` for an object.
fn primitive(value: &JsValue) -> Option<Plain> {
    match value.variant() {
        JsVariant::Null => Some(Plain::Null),
        JsVariant::Boolean(b) => Some(Plain::Bool(b)),
        JsVariant::String(s) => Some(Plain::String(s)),
        JsVariant::Integer32(i) => Some(Plain::Number(f64::from(i))),
        JsVariant::Float64(n) if n.is_finite() => Some(Plain::Number(n)),
        // Only what JSON text builds gets here; anything else compares as changed.
        _ => None,
    }
}

/// Deserializes one JSON value straight into boa values.
struct JsSeed<'a>(&'a mut Context);

impl<'de> DeserializeSeed<'de> for JsSeed<'_> {
    type Value = JsValue;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<JsValue, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsSeed<'_> {
    type Value = JsValue;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<JsValue, E> {
        Ok(JsValue::null())
    }

    fn visit_bool<E>(self, b: bool) -> Result<JsValue, E> {
        Ok(JsValue::new(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<JsValue, E> {
        Ok(number_to_js(n as f64))
    }

    fn visit_u64<E>(self, n: u64) -> Result<JsValue, E> {
        Ok(number_to_js(n as f64))
    }

    fn visit_f64<E>(self, n: f64) -> Result<JsValue, E> {
        Ok(number_to_js(n))
    }

    fn visit_str<E>(self, text: &str) -> Result<JsValue, E> {
        Ok(JsString::from(text).into())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsValue, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(value) = seq.next_element_seed(JsSeed(&mut *self.0))? {
            values.push(value);
        }
        Ok(JsArray::from_iter(values, self.0).into())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsValue, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let value = map.next_value_seed(JsSeed(&mut *self.0))?;
            entries.push((key_string(&key), value));
        }
        Ok(object(entries.into_iter(), self.0))
    }
}

impl Serialize for Plain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Null => serializer.serialize_unit(),
            Self::Bool(b) => serializer.serialize_bool(*b),
            Self::Number(n) => number_to_json(*n).serialize(serializer),
            Self::String(s) => serialize_js_string(s, serializer),
            Self::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Self::Object(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(&JsText(key), value)?;
                }
                map.end()
            }
        }
    }
}

/// A key of a [`Plain`] object, serialized as its text.
struct JsText<'a>(&'a JsString);

impl Serialize for JsText<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_js_string(self.0, serializer)
    }
}

fn serialize_js_string<S: Serializer>(s: &JsString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&text_of(s))
}

/// Builds a JSON value (an event from the server) as objects of `context`'s realm, with the
/// same deserializer as [`text_to_js`] (a `Value` is a serde data source too).
pub fn json_to_js(value: &Value, context: &mut Context) -> Result<JsValue, serde_json::Error> {
    JsSeed(context).deserialize(value)
}

/// Most keys fit the cache; past it, it starts over rather than grow with hostile input.
const KEY_CACHE_LIMIT: usize = 4096;

thread_local! {
    /// The thread's object keys as boa strings: events of a kind repeat their keys, and a
    /// cached key is a reference count instead of an allocation, a copy and boa's lookup of
    /// the text among its static strings.
    static KEYS: RefCell<HashMap<Box<str>, JsString, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

/// Longer keys are built each time: the cache is bounded by count, so its entries are kept
/// small.
const KEY_CACHE_MAX_LEN: usize = 64;

/// `key` as a boa string, from the thread's cache when it has been seen.
fn key_string(key: &str) -> JsString {
    if key.len() > KEY_CACHE_MAX_LEN {
        return JsString::from(key);
    }
    KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        if let Some(cached) = keys.get(key) {
            return cached.clone();
        }
        let string = JsString::from(key);
        if keys.len() >= KEY_CACHE_LIMIT {
            keys.clear();
        }
        keys.insert(Box::from(key), string.clone());
        string
    })
}

/// An ordinary object with a shared shape, as an object literal gets: events of one kind share
/// its transitions, and the plugin's property reads hit boa's inline caches (an object with a
/// shape of its own costs a hash lookup per read).
fn object(entries: impl Iterator<Item = (JsString, JsValue)>, context: &mut Context) -> JsValue {
    let mut object = ObjectInitializer::with_native_data(OrdinaryObject, context);
    for (key, value) in entries {
        object.property(key, value, Attribute::all());
    }
    object.build().into()
}

/// The value at `key`, replaced by `empty()` unless it is of the same kind.
fn entry<'a>(
    entries: &'a mut Vec<(JsString, Plain)>,
    key: &str,
    empty: impl Fn() -> Plain,
) -> &'a mut Plain {
    let position = match entries.iter().position(|(k, _)| *k == key) {
        Some(position) => position,
        None => {
            entries.push((JsString::from(key), empty()));
            entries.len() - 1
        }
    };
    let slot = &mut entries[position].1;
    if std::mem::discriminant(slot) != std::mem::discriminant(&empty()) {
        *slot = empty();
    }
    slot
}

/// `JSON.parse` turns integers into boa's small-integer form; a value built from `Plain` does
/// the same, so a plugin sees the same representation either way.
fn number_to_js(n: f64) -> JsValue {
    if n.fract() == 0.0 && n >= f64::from(i32::MIN) && n <= f64::from(i32::MAX) {
        // `n` is integral and in range, so the cast is exact (and turns -0 into 0, as
        // `JSON.stringify(-0)` does).
        JsValue::new(n as i32)
    } else {
        JsValue::new(n)
    }
}

fn number_to_json(n: f64) -> Value {
    /// Integers up to 2^53 are exact in an f64; past it `JSON.stringify` still writes digits
    /// without a fraction, which an f64 `Number` would print with `e` notation.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= EXACT {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// A boa string as UTF-8. Text that is not valid UTF-16 (a lone surrogate) keeps its escape
/// spelled out, as boa's own conversion does.
fn rust_string(s: &JsString) -> String {
    text_of(s).into_owned()
}

/// A boa string's text, borrowed when it is ASCII (already UTF-8, so no copy and no decoding
/// a character at a time, which is most event text).
pub(crate) fn text_of(s: &JsString) -> Cow<'_, str> {
    if let JsStrVariant::Latin1(bytes) = s.variant()
        && bytes.is_ascii()
        && let Ok(text) = std::str::from_utf8(bytes)
    {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        s.to_std_string()
            .unwrap_or_else(|_| s.to_std_string_escaped()),
    )
}

/// The key `toJSON` is called with; an array index becomes a string only if that happens.
#[derive(Clone, Copy)]
enum Key<'a> {
    Name(&'a JsString),
    Index(u64),
}

impl Key<'_> {
    fn to_js(self) -> JsValue {
        match self {
            Self::Name(name) => name.clone().into(),
            Self::Index(index) => JsString::from(index.to_string()).into(),
        }
    }
}

struct Exporter {
    /// The objects being serialized, outermost first: a cycle is an object met again here.
    stack: Vec<JsObject>,
    /// `None` when the realm's prototypes may give an object a `toJSON`.
    prototypes: Option<PlainPrototypes>,
}

/// The realm's `Object.prototype` and `Array.prototype` while neither has a `toJSON` key (and
/// `Array.prototype` still inherits from `Object.prototype`, whose own prototype is always
/// null). An ordinary object or array that inherits from one of them directly and has no own
/// `toJSON` has none to call, so its lookup through the prototype chain can be skipped: that
/// lookup was a miss on every object of every event.
struct PlainPrototypes {
    object: JsObject,
    array: JsObject,
}

impl PlainPrototypes {
    fn of(context: &Context) -> Option<Self> {
        let constructors = context.intrinsics().constructors();
        let object = constructors.object().prototype();
        let array = constructors.array().prototype();
        let plain = !has_to_json(&object)
            && !has_to_json(&array)
            && array.prototype().as_ref() == Some(&object);
        plain.then_some(Self { object, array })
    }

    /// Whether `object` has no `toJSON`, own or inherited (`false`: it may have one).
    fn lacks_to_json(&self, object: &JsObject) -> bool {
        if !object.is_ordinary() && !object.is_array() {
            return false;
        }
        let inherits_plainly = match object.prototype() {
            Some(prototype) => prototype == self.object || prototype == self.array,
            None => true,
        };
        inherits_plainly && !has_to_json(object)
    }
}

/// Whether `object` has an own `toJSON` property (a value or an accessor).
fn has_to_json(object: &JsObject) -> bool {
    object
        .borrow()
        .properties()
        .contains_key(&PropertyKey::from(js_string!("toJSON")))
}

impl Exporter {
    /// SerializeJSONProperty: `value` is `holder[key]`.
    fn property(
        &mut self,
        value: JsValue,
        key: Key<'_>,
        context: &mut Context,
    ) -> JsResult<Option<Plain>> {
        let value = match value.as_object() {
            Some(object)
                if self
                    .prototypes
                    .as_ref()
                    .is_some_and(|prototypes| prototypes.lacks_to_json(&object)) =>
            {
                value
            }
            Some(object) => {
                let to_json = object.get(js_string!("toJSON"), context)?;
                match to_json.as_callable() {
                    Some(function) => function.call(&value, &[key.to_js()], context)?,
                    None => value,
                }
            }
            None => value,
        };
        Ok(Some(match value.variant() {
            JsVariant::Null => Plain::Null,
            JsVariant::Undefined | JsVariant::Symbol(_) => return Ok(None),
            JsVariant::Boolean(b) => Plain::Bool(b),
            JsVariant::String(s) => Plain::String(s),
            JsVariant::Integer32(i) => Plain::Number(f64::from(i)),
            JsVariant::Float64(n) if n.is_finite() => Plain::Number(n),
            JsVariant::Float64(_) => Plain::Null,
            JsVariant::BigInt(_) => {
                return Err(JsNativeError::typ()
                    .with_message("a BigInt value can't be serialized in JSON")
                    .into());
            }
            JsVariant::Object(object) if object.is_callable() => return Ok(None),
            JsVariant::Object(object) if object.is_array() => {
                self.enter(&object)?;
                let array = self.array(&object, context);
                self.stack.pop();
                array?
            }
            JsVariant::Object(object) if object.is_ordinary() => {
                self.enter(&object)?;
                let fields = self.object(&object, context);
                self.stack.pop();
                fields?
            }
            // Boxed primitives, proxies, typed arrays, maps and the like: rare in events, and
            // `JSON.stringify` itself knows each of them.
            JsVariant::Object(object) => return self.exotic(&object, context),
        }))
    }

    fn enter(&mut self, object: &JsObject) -> JsResult<()> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(JsNativeError::range()
                .with_message(format!(
                    "the value is nested deeper than {MAX_DEPTH} levels"
                ))
                .into());
        }
        if self.stack.iter().any(|seen| seen == object) {
            return Err(JsNativeError::typ()
                .with_message("cyclic object value")
                .into());
        }
        self.stack.push(object.clone());
        Ok(())
    }

    fn array(&mut self, array: &JsObject, context: &mut Context) -> JsResult<Plain> {
        let length = array
            .get(js_string!("length"), context)?
            .to_length(context)?;
        let mut items = Vec::with_capacity(usize::try_from(length).unwrap_or(0).min(1 << 16));
        for index in 0..length {
            let value = match u32::try_from(index) {
                Ok(index) => array.get(index, context)?,
                Err(_) => array.get(JsString::from(index.to_string()), context)?,
            };
            items.push(
                self.property(value, Key::Index(index), context)?
                    .unwrap_or(Plain::Null),
            );
        }
        Ok(Plain::Array(items))
    }

    /// An ordinary object's enumerable own string keys, in property order. Data properties are
    /// read in place; an accessor runs its getter, as `JSON.stringify` does.
    fn object(&mut self, object: &JsObject, context: &mut Context) -> JsResult<Plain> {
        let keys = object.own_property_keys(context)?;
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let name = match &key {
                PropertyKey::String(name) => name.clone(),
                PropertyKey::Index(index) => JsString::from(index.get().to_string()),
                PropertyKey::Symbol(_) => continue,
            };
            // The borrow ends before any getter or toJSON runs (they may change the object).
            let descriptor = object.borrow().properties().get(&key);
            let Some(descriptor) = descriptor else {
                continue;
            };
            if descriptor.enumerable() != Some(true) {
                continue;
            }
            let value = match descriptor.value() {
                Some(value) => value.clone(),
                None => object.get(key, context)?,
            };
            if let Some(value) = self.property(value, Key::Name(&name), context)? {
                entries.push((name, value));
            }
        }
        Ok(Plain::Object(entries))
    }

    /// Asks the realm's own `JSON.stringify`, then reads its text back.
    fn exotic(&mut self, object: &JsObject, context: &mut Context) -> JsResult<Option<Plain>> {
        let json = context.intrinsics().objects().json();
        let stringify = json.get(js_string!("stringify"), context)?;
        let Some(stringify) = stringify.as_callable() else {
            return Err(JsNativeError::typ()
                .with_message("JSON.stringify is not a function")
                .into());
        };
        let text = stringify.call(&json.clone().into(), &[object.clone().into()], context)?;
        let Some(text) = text.as_string() else {
            return Ok(None);
        };
        let parsed: Value = serde_json::from_str(&rust_string(&text)).map_err(|error| {
            JsNativeError::typ().with_message(format!("JSON.stringify wrote invalid JSON: {error}"))
        })?;
        Ok(Some(Plain::from_json(&parsed)))
    }
}

impl Plain {
    /// The JSON value with boa strings (the rare paths: `exotic`, processEventBatch's
    /// one-event batch).
    pub fn from_json(value: &Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            Value::Number(n) => n.as_f64().map_or(Self::Null, Self::Number),
            Value::String(s) => Self::String(JsString::from(s.as_str())),
            Value::Array(items) => Self::Array(items.iter().map(Self::from_json).collect()),
            Value::Object(map) => Self::Object(
                map.iter()
                    .map(|(k, v)| (key_string(k), Self::from_json(v)))
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use boa_engine::Source;
    use serde_json::json;

    use super::*;

    fn export(code: &str) -> JsResult<Option<Value>> {
        let mut context = Context::default();
        let value = context
            .eval(Source::from_bytes(code.as_bytes()))
            .expect("the test code runs");
        Plain::export(&value, &mut context).map(|plain| plain.map(|p| p.to_json()))
    }

    /// What boa's own `JSON.stringify` makes of the same code, read back as JSON.
    fn stringified(code: &str) -> Option<Value> {
        let mut context = Context::default();
        let text = context
            .eval(Source::from_bytes(
                format!("JSON.stringify((() => {{ return {code} }})())").as_bytes(),
            ))
            .expect("JSON.stringify runs");
        text.as_string()
            .map(|t| serde_json::from_str(&rust_string(&t)).expect("JSON"))
    }

    #[test]
    fn plain_data_comes_out_as_json_stringify_writes_it() {
        let cases = [
            "({a: 1, b: 'x', c: [1, 'two', null, true], d: {e: {f: -2.5}}})",
            "({n: 3.0, big: 2 ** 40, frac: 0.1, neg: -0, inf: Infinity, nan: NaN})",
            "({u: undefined, f() {}, s: Symbol('x'), arr: [undefined, () => 1]})",
            "({2: 'two', 1: 'one', z: 'z', a: 'a'})",
            "({d: new Date(0), nested: {toJSON(key) { return 'key ' + key }}})",
            "(() => { const o = {shown: 1}; Object.defineProperty(o, 'hidden', {value: 2, enumerable: false}); Object.defineProperty(o, 'computed', {get() { return this.shown + 1 }, enumerable: true}); return o })()",
            "({boxed: [new Number(4), new String('s'), new Boolean(false)], map: new Map([[1, 2]])})",
            "({text: 'é ü ✓ 😀', key_é: 1})",
            "[1, {a: [2]}]",
            "'just a string'",
        ];
        for code in cases {
            assert_eq!(export(code).expect("exports"), stringified(code), "{code}");
        }
    }

    /// Where a `toJSON` can come from besides the object itself: each one is called, as
    /// `JSON.stringify` calls it, though plain objects skip looking for one.
    #[test]
    fn a_to_json_from_any_prototype_is_called() {
        let cases = [
            "(() => { Object.prototype.toJSON = function () { return 'from Object.prototype' }; return {a: {b: 1}, c: [2]} })()",
            "(() => { Object.defineProperty(Object.prototype, 'toJSON', {get() { return () => 'from a getter' }}); return {a: 1} })()",
            "(() => { Array.prototype.toJSON = function () { return 'from Array.prototype' }; return {a: [1], b: {c: 2}} })()",
            "(() => { Object.setPrototypeOf(Array.prototype, {toJSON() { return 'from a swapped prototype' }}); return {a: [1]} })()",
            "(() => { class Point { constructor() { this.x = 1 } toJSON() { return 'from a class' } }; return {p: new Point(), q: {x: 2}} })()",
            "(() => { const proto = {toJSON() { return 'from Object.create' }}; return {o: Object.create(proto), plain: {y: 3}} })()",
            "(() => { const bare = Object.create(null); bare.z = 4; return {bare} })()",
            "(() => { const bare = Object.create(null); bare.toJSON = () => 'own, on a bare object'; return {bare} })()",
        ];
        for code in cases {
            let exported = export(code).expect("exports");
            assert_eq!(exported, stringified(code), "{code}");
            assert!(exported.is_some(), "{code}");
        }
    }

    #[test]
    fn integers_stay_integers_and_non_finite_numbers_are_null() {
        assert_eq!(
            export("({a: 3.0, b: 1e15, c: Math.floor(7.5), d: 0.5, e: -Infinity})")
                .expect("exports"),
            Some(json!({"a": 3, "b": 1_000_000_000_000_000_i64, "c": 7, "d": 0.5, "e": null}))
        );
    }

    #[test]
    fn undefined_functions_and_symbols_export_as_nothing() {
        for code in ["undefined", "(() => 1)", "Symbol('s')"] {
            assert_eq!(export(code).expect("exports"), None, "{code}");
        }
    }

    #[test]
    fn cycles_bigints_and_deep_nesting_are_errors() {
        let cycle = export("(() => { const o = {}; o.self = o; return o })()")
            .expect_err("a cycle is refused");
        assert!(cycle.to_string().contains("cyclic"), "{cycle}");
        let bigint = export("({n: 10n})").expect_err("a BigInt is refused");
        assert!(bigint.to_string().contains("BigInt"), "{bigint}");
        let deep =
            export("(() => { let o = {}; for (let i = 0; i < 10000; i++) o = {o}; return o })()")
                .expect_err("deep nesting is refused");
        assert!(deep.to_string().contains("nested deeper"), "{deep}");
        // The same object twice, side by side, is not a cycle.
        assert_eq!(
            export("(() => { const o = {x: 1}; return {a: o, b: o} })()").expect("exports"),
            Some(json!({"a": {"x": 1}, "b": {"x": 1}}))
        );
    }

    #[test]
    fn json_enters_a_realm_as_from_json_would_build_it() {
        let mut context = Context::default();
        let value = json!({"a": [1, 2.5, "x", null, {"b": false}], "n": 1e300, "big": 1_i64 << 40, "s": "é✓"});
        let ours = json_to_js(&value, &mut context).expect("builds");
        let boas = JsValue::from_json(&value, &mut context).expect("from_json");
        for built in [ours, boas] {
            let exported = Plain::export(&built, &mut context)
                .expect("exports")
                .expect("a value");
            assert_eq!(exported.to_json(), value);
        }
    }

    #[test]
    fn text_enters_a_realm_as_its_parse_would_and_plain_writes_the_same_text() {
        let mut context = Context::default();
        let texts = [
            r#"{"event":"e","properties":{"a":[1,2.5,-3,null,true],"é":"✓ \"q\" \n","big":18446744073709551615,"n":{}},"t":1e300}"#,
            r#"[1,{"x":[]},"s"]"#,
            r#""just text""#,
        ];
        for text in texts {
            let parsed: Value = serde_json::from_str(text).expect("JSON");
            let built = text_to_js(text, &mut context).expect("parses");
            let plain = Plain::export(&built, &mut context)
                .expect("exports")
                .expect("a value");
            let built = json_to_js(&parsed, &mut context).expect("builds");
            let expected = Plain::export(&built, &mut context)
                .expect("exports")
                .expect("a value");
            assert_eq!(plain, expected, "{text}");
            assert_eq!(
                serde_json::to_string(&plain).expect("serializes"),
                serde_json::to_string(&plain.to_json()).expect("serializes"),
                "{text}"
            );
        }
        assert!(text_to_js("{\"a\": ", &mut context).is_err());
        assert!(text_to_js("{} trailing", &mut context).is_err());
    }

    #[test]
    fn the_key_cache_gives_back_the_same_text_and_stays_bounded() {
        let first = key_string("$current_url");
        let second = key_string("$current_url");
        assert_eq!(second, "$current_url");
        // One string, held by the cache and both callers.
        assert!(
            second.refcount().is_some_and(|count| count >= 3),
            "{:?}",
            second.refcount()
        );
        drop(first);
        let long = "k".repeat(KEY_CACHE_MAX_LEN + 1);
        assert_eq!(key_string(&long), long.as_str());
        assert!(KEYS.with(|keys| !keys.borrow().contains_key(long.as_str())));
        assert_eq!(key_string("é ✓"), "é ✓");
        for i in 0..KEY_CACHE_LIMIT + 10 {
            assert_eq!(key_string(&format!("k{i}")), format!("k{i}").as_str());
        }
        assert!(KEYS.with(|keys| keys.borrow().len()) <= KEY_CACHE_LIMIT);
    }

    #[test]
    fn labels_are_appended_making_what_is_missing() {
        let mut event = Plain::from_json(
            &json!({"event": "e", "properties": {"$plugins_failed": "not a list"}}),
        );
        event.append_labels("$plugins_succeeded", &["a (1)".to_owned()]);
        event.append_labels("$plugins_failed", &["b (2)".to_owned()]);
        event.append_labels("$plugins_succeeded", &["c (3)".to_owned()]);
        assert_eq!(
            event.to_json(),
            json!({"event": "e", "properties": {"$plugins_failed": ["b (2)"], "$plugins_succeeded": ["a (1)", "c (3)"]}})
        );
        let mut bare = Plain::from_json(&json!({"event": "e", "properties": 5}));
        bare.append_labels("$plugins_failed", &["x (9)".to_owned()]);
        assert_eq!(
            bare.to_json(),
            json!({"event": "e", "properties": {"$plugins_failed": ["x (9)"]}})
        );
    }

    #[test]
    fn a_value_moves_to_another_realm_as_its_own_objects() {
        let mut from = Context::default();
        let mut to = Context::default();
        let value = from
            .eval(Source::from_bytes(
                "({event: 'e', properties: {list: [1, 'x'], d: new Date(0)}})",
            ))
            .expect("runs");
        let plain = Plain::export(&value, &mut from)
            .expect("exports")
            .expect("a value");
        let moved = plain.to_js(&mut to);
        to.global_object()
            .set(js_string!("moved"), moved, false, &mut to)
            .expect("set");
        let checks = to
            .eval(Source::from_bytes(
                "[moved instanceof Object, Array.isArray(moved.properties.list), \
                 moved.properties.list instanceof Array, typeof moved.properties.d, \
                 Object.getPrototypeOf(moved) === Object.prototype]",
            ))
            .expect("runs");
        assert_eq!(
            checks.to_json(&mut to).expect("json"),
            Some(json!([true, true, true, "string", true]))
        );
        assert_eq!(
            plain.to_json(),
            json!({"event": "e", "properties": {"list": [1, "x"], "d": "1970-01-01T00:00:00.000Z"}})
        );
        assert_eq!(
            Plain::from_json(&plain.to_json()).to_json(),
            plain.to_json()
        );
    }
}
