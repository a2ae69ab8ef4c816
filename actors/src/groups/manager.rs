//! `GroupManager`: the pipeline's group step for a whole batch (PostHog's `addGroupProperties`,
//! `upsertGroup` and `getGroupsColumns`).
//!
//! A batch goes through in four passes, so that it costs at most one read and one write however
//! many events name or identify groups:
//! 1. every event's `$groups` becomes `$group_<index>` properties (group types are cached per
//!    team; a type seen for the first time is registered once);
//! 2. the groups that events name and the cache does not hold, and every group the batch
//!    identifies, are read in one query;
//! 3. each identified group's `$groupidentify`s are combined (their `$group_set`s merged in
//!    order) and all groups upserted in one write, which merges into what is stored then, so
//!    that instances updating one group keep each other's keys (PostHog: one upsert per
//!    event). A group changed by the batch gets one new version and one ClickHouse row;
//! 4. events go in batch order, each event's group columns showing the groups as the batch's
//!    earlier events left them.
//!
//! Groups are cached for the TTL (PostHog keeps them in Redis); an upsert by this instance
//! updates the cache at once, one by another instance shows here within the TTL.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lru::LruCache;
use serde_json::{Map, Value};

use super::store::{
    Group, GroupKey, GroupRow, GroupStoreError, GroupUpsert, MAX_GROUP_TYPES, SharedGroupStore,
    apply_upsert,
};
use crate::event::{Properties, StampedEvent};

/// The properties an event names its groups by, one per column of the `events` table.
const GROUP_PROPERTIES: [&str; MAX_GROUP_TYPES as usize] =
    ["$group_0", "$group_1", "$group_2", "$group_3", "$group_4"];

const GROUP_IDENTIFY: &str = "$groupidentify";

#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Groups kept in memory; 0 turns the cache off.
    pub cache_size: usize,
    /// How long a cached group or a team's group types are trusted.
    pub cache_ttl: Duration,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            cache_size: 10_000,
            cache_ttl: Duration::from_secs(300),
        }
    }
}

/// A group as the columns of an event row show it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupColumn {
    /// The group's properties as JSON, serialized once per group version.
    pub properties: Arc<str>,
    pub created_at: DateTime<Utc>,
}

impl GroupColumn {
    fn of(group: &Group) -> Self {
        Self {
            properties: crate::persons::rows::properties_json(&group.properties).into(),
            created_at: group.created_at,
        }
    }
}

/// One event's groups, per column of the `events` table (`None`: no group named, or an
/// unknown one).
pub type GroupColumns = [Option<Arc<GroupColumn>>; MAX_GROUP_TYPES as usize];

/// One event's groups; or why the store refused the event's `$groupidentify` (always
/// `GroupStoreError::Rejected`), which dead-letters the event.
pub type EventGroups = Result<GroupColumns, GroupStoreError>;

/// What the group step made of a batch.
#[derive(Debug, Default)]
pub struct GroupOutcome {
    /// One per event, in batch order.
    pub events: Vec<EventGroups>,
    /// The group versions written, for ClickHouse's `groups` table.
    pub rows: Vec<GroupRow>,
    /// One per event: the index of the group type a `$groupidentify` names.
    pub identified: Vec<Option<u8>>,
}

/// The groups a batch's events name, as far as known: `None` for one that does not exist.
type KnownGroups = HashMap<GroupKey, Option<Arc<GroupColumn>>>;

/// One event's group after its `$groupidentify`, or why the store refused that identify.
type EventGroup = Result<Arc<GroupColumn>, GroupStoreError>;

struct TeamTypes {
    read_at: Instant,
    types: HashMap<String, u8>,
}

struct CachedGroup {
    read_at: Instant,
    /// `None`: the group did not exist when read.
    group: Option<Arc<GroupColumn>>,
}

/// A `$groupidentify` to apply: the group and its `$group_set`.
struct Identify {
    key: GroupKey,
    set: Map<String, Value>,
}

pub struct GroupManager {
    store: SharedGroupStore,
    ttl: Duration,
    types: Mutex<HashMap<i64, TeamTypes>>,
    groups: Option<Mutex<LruCache<GroupKey, CachedGroup>>>,
}

impl GroupManager {
    pub fn new(store: SharedGroupStore, config: GroupConfig) -> Self {
        Self {
            store,
            ttl: config.cache_ttl,
            types: Mutex::new(HashMap::new()),
            groups: NonZeroUsize::new(config.cache_size)
                .map(|size| Mutex::new(LruCache::new(size))),
        }
    }

    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// The group step for `events` (stamped, after the person step), which get their
    /// `$group_N` properties here. Fails only when the store cannot answer, so that the batch
    /// is retried instead of being stored with wrong group columns.
    pub async fn resolve_batch(
        &self,
        events: &mut [&mut StampedEvent],
    ) -> Result<GroupOutcome, GroupStoreError> {
        let mut identifies = Vec::with_capacity(events.len());
        let mut identified = Vec::with_capacity(events.len());
        let mut any_group = false;
        for stamped in events.iter_mut() {
            let event = &mut stamped.event;
            if let Some(Value::Object(groups)) = event.properties.get("$groups") {
                let named: Vec<(String, Value)> =
                    groups.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                for (group_type, key) in named {
                    if let Some(index) = self.type_index(event.team_id, &group_type).await? {
                        event
                            .properties
                            .insert(GROUP_PROPERTIES[usize::from(index)].to_owned(), key);
                    }
                }
            }
            let identify = if event.event == GROUP_IDENTIFY {
                self.identify_of(event.team_id, &event.properties).await?
            } else {
                None
            };
            identified.push(
                identify
                    .as_ref()
                    .map(|identify| identify.key.group_type_index),
            );
            any_group |= identify.is_some()
                || GROUP_PROPERTIES
                    .iter()
                    .any(|name| event.properties.contains_key(name));
            identifies.push(identify);
        }
        if !any_group {
            return Ok(GroupOutcome {
                events: events.iter().map(|_| Ok(Default::default())).collect(),
                rows: Vec::new(),
                identified,
            });
        }

        let identified_keys: HashSet<&GroupKey> = identifies
            .iter()
            .flatten()
            .map(|identify| &identify.key)
            .collect();
        let (mut known, bases) = self.read_groups(events, &identified_keys).await?;
        let mut outcome = GroupOutcome {
            events: Vec::with_capacity(events.len()),
            rows: Vec::new(),
            identified,
        };
        let mut after_identify = self
            .apply_identifies(events, &identifies, bases, &mut outcome.rows)
            .await?;
        for ((stamped, identify), after) in events
            .iter()
            .zip(&identifies)
            .zip(after_identify.iter_mut())
        {
            if let (Some(identify), Some(after)) = (identify, after.take()) {
                match after {
                    Ok(column) => {
                        known.insert(identify.key.clone(), Some(column));
                    }
                    Err(error) => {
                        outcome.events.push(Err(error));
                        continue;
                    }
                }
            }
            let mut columns = GroupColumns::default();
            for (index, column) in columns.iter_mut().enumerate() {
                if let Some(key) = named_group(&stamped.event, index) {
                    *column = known.get(&key).cloned().flatten();
                }
            }
            outcome.events.push(Ok(columns));
        }
        Ok(outcome)
    }

    /// Writes the batch's `$groupidentify`s: each group's combined in one
    /// [`GroupStore::upsert_batch`], so the batch costs one round trip however many there
    /// are. Returns, per event, the group as that event's identify left it: the write's
    /// answer for a group's last identify, and for earlier ones the stored group (`bases`,
    /// read just before) with the identifies so far applied, as one upsert each would have
    /// left it. A group the store refuses is upserted once per event, so that only the
    /// events it refuses fail. Written versions go to `rows`, one per group.
    async fn apply_identifies(
        &self,
        events: &[&mut StampedEvent],
        identifies: &[Option<Identify>],
        mut bases: HashMap<GroupKey, Group>,
        rows: &mut Vec<GroupRow>,
    ) -> Result<Vec<Option<EventGroup>>, GroupStoreError> {
        let mut after: Vec<Option<EventGroup>> = identifies.iter().map(|_| None).collect();
        let mut plans: Vec<(Vec<usize>, GroupUpsert)> = Vec::new();
        let mut plan_of: HashMap<&GroupKey, usize> = HashMap::new();
        for (position, identify) in identifies.iter().enumerate() {
            let Some(identify) = identify else { continue };
            let timestamp = events[position].timestamp;
            match plan_of.get(&identify.key) {
                Some(&plan) => {
                    let (positions, upsert) = &mut plans[plan];
                    positions.push(position);
                    upsert.set.extend(
                        identify
                            .set
                            .iter()
                            .map(|(key, value)| (key.clone(), value.clone())),
                    );
                    upsert.timestamp = upsert.timestamp.min(timestamp);
                }
                None => {
                    plan_of.insert(&identify.key, plans.len());
                    plans.push((
                        vec![position],
                        GroupUpsert {
                            key: identify.key.clone(),
                            set: identify.set.clone(),
                            timestamp,
                        },
                    ));
                }
            }
        }
        if plans.is_empty() {
            return Ok(after);
        }
        let upserts: Vec<GroupUpsert> = plans.iter().map(|(_, upsert)| upsert.clone()).collect();
        let answers = self.store.upsert_batch(&upserts).await?;

        for ((positions, upsert), answer) in plans.into_iter().zip(answers) {
            let mut last = None;
            match answer {
                Ok(written) => {
                    let mut group = bases.remove(&upsert.key);
                    for &position in &positions {
                        let Some(identify) = &identifies[position] else {
                            continue;
                        };
                        let applied = apply_upsert(
                            group.take(),
                            &upsert.key,
                            &identify.set,
                            events[position].timestamp,
                        )
                        .group;
                        let column = Arc::new(GroupColumn::of(&applied));
                        after[position] = Some(Ok(Arc::clone(&column)));
                        last = Some(column);
                        group = Some(applied);
                    }
                    if let (Some(written), Some(&position)) = (written, positions.last()) {
                        rows.push(GroupRow::of(&written));
                        let column = Arc::new(GroupColumn::of(&written));
                        after[position] = Some(Ok(Arc::clone(&column)));
                        last = Some(column);
                    }
                }
                Err(GroupStoreError::Rejected(_)) => {
                    for &position in &positions {
                        let Some(identify) = &identifies[position] else {
                            continue;
                        };
                        let timestamp = events[position].timestamp;
                        match self
                            .store
                            .upsert(&upsert.key, &identify.set, timestamp)
                            .await
                        {
                            Ok(upserted) => {
                                if upserted.written {
                                    rows.push(GroupRow::of(&upserted.group));
                                }
                                let column = Arc::new(GroupColumn::of(&upserted.group));
                                after[position] = Some(Ok(Arc::clone(&column)));
                                last = Some(column);
                            }
                            Err(error @ GroupStoreError::Rejected(_)) => {
                                after[position] = Some(Err(error));
                            }
                            Err(error) => return Err(error),
                        }
                    }
                }
                Err(error) => return Err(error),
            }
            if let Some(column) = last {
                self.remember(&upsert.key, Some(column));
            }
        }
        Ok(after)
    }

    /// The groups the events' `$group_N` properties name, from the cache, and the groups
    /// the batch identifies, as stored (`bases`): all that the cache cannot answer in one
    /// store query.
    async fn read_groups(
        &self,
        events: &[&mut StampedEvent],
        identified: &HashSet<&GroupKey>,
    ) -> Result<(KnownGroups, HashMap<GroupKey, Group>), GroupStoreError> {
        let mut wanted = HashSet::new();
        for stamped in events {
            for index in 0..GROUP_PROPERTIES.len() {
                if let Some(key) = named_group(&stamped.event, index) {
                    wanted.insert(key);
                }
            }
        }
        wanted.extend(identified.iter().map(|key| (*key).clone()));
        let mut known = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        for key in wanted {
            match self.cached(&key).filter(|_| !identified.contains(&key)) {
                Some(group) => {
                    known.insert(key, group);
                }
                None => missing.push(key),
            }
        }
        if missing.is_empty() {
            return Ok((known, HashMap::new()));
        }
        let mut found = self.store.groups(&missing).await?;
        let mut bases = HashMap::with_capacity(identified.len());
        for key in missing {
            let group = found.remove(&key);
            let column = group.as_ref().map(|group| Arc::new(GroupColumn::of(group)));
            self.remember(&key, column.clone());
            if let Some(group) = group
                && identified.contains(&key)
            {
                bases.insert(key.clone(), group);
            }
            known.insert(key, column);
        }
        Ok((known, bases))
    }

    /// The group a `$groupidentify` names, if it names one: `$group_type` (a type the team
    /// has or can still add) and `$group_key`; `$group_set` when it is an object.
    async fn identify_of(
        &self,
        team_id: i64,
        properties: &Properties,
    ) -> Result<Option<Identify>, GroupStoreError> {
        let (Some(Value::String(group_type)), Some(group_key)) = (
            properties.get("$group_type"),
            properties.get("$group_key").and_then(group_key_text),
        ) else {
            return Ok(None);
        };
        let Some(group_type_index) = self.type_index(team_id, group_type).await? else {
            return Ok(None);
        };
        let set = match properties.get("$group_set") {
            Some(Value::Object(set)) => set.clone(),
            _ => Map::new(),
        };
        Ok(Some(Identify {
            key: GroupKey {
                team_id,
                group_type_index,
                group_key,
            },
            set,
        }))
    }

    /// The index of a team's group type, registering it on first sight; `None` once the team
    /// has five other types.
    async fn type_index(
        &self,
        team_id: i64,
        group_type: &str,
    ) -> Result<Option<u8>, GroupStoreError> {
        match self.cached_type(team_id, group_type) {
            TypeLookup::Known(index) => return Ok(Some(index)),
            TypeLookup::Full => return Ok(None),
            TypeLookup::Absent => {}
            TypeLookup::Stale => {
                let types = self.store.group_types(team_id).await?;
                self.lock_types().insert(
                    team_id,
                    TeamTypes {
                        read_at: Instant::now(),
                        types,
                    },
                );
                match self.cached_type(team_id, group_type) {
                    TypeLookup::Known(index) => return Ok(Some(index)),
                    TypeLookup::Full => return Ok(None),
                    TypeLookup::Absent | TypeLookup::Stale => {}
                }
            }
        }
        let added = self.store.add_group_type(team_id, group_type).await?;
        if let Some(index) = added
            && let Some(team) = self.lock_types().get_mut(&team_id)
        {
            team.types.insert(group_type.to_owned(), index);
        }
        Ok(added)
    }

    fn cached_type(&self, team_id: i64, group_type: &str) -> TypeLookup {
        let types = self.lock_types();
        let Some(team) = types
            .get(&team_id)
            .filter(|team| team.read_at.elapsed() < self.ttl)
        else {
            return TypeLookup::Stale;
        };
        match team.types.get(group_type) {
            Some(index) => TypeLookup::Known(*index),
            None if team.types.len() >= usize::from(MAX_GROUP_TYPES) => TypeLookup::Full,
            None => TypeLookup::Absent,
        }
    }

    fn lock_types(&self) -> std::sync::MutexGuard<'_, HashMap<i64, TeamTypes>> {
        self.types.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh cache entry: `Some(None)` is a group known not to exist.
    fn cached(&self, key: &GroupKey) -> Option<Option<Arc<GroupColumn>>> {
        let cache = self.groups.as_ref()?;
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = cache.get(key)?;
        (entry.read_at.elapsed() < self.ttl).then(|| entry.group.clone())
    }

    fn remember(&self, key: &GroupKey, group: Option<Arc<GroupColumn>>) {
        if let Some(cache) = &self.groups {
            cache.lock().unwrap_or_else(PoisonError::into_inner).put(
                key.clone(),
                CachedGroup {
                    read_at: Instant::now(),
                    group,
                },
            );
        }
    }
}

/// What the type cache knows of one team's group type.
enum TypeLookup {
    Known(u8),
    /// The team has five other types: this one gets no column.
    Full,
    /// The team's types are fresh and this one is not among them yet.
    Absent,
    /// The team's types are not cached, or too old.
    Stale,
}

/// The group an event's `$group_<index>` names.
fn named_group(event: &crate::event::PluginEvent, index: usize) -> Option<GroupKey> {
    let group_key = group_key_text(event.properties.get(GROUP_PROPERTIES[index])?)?;
    Some(GroupKey {
        team_id: event.team_id,
        group_type_index: u8::try_from(index).ok()?,
        group_key,
    })
}

/// A group key as PostHog stores it (`String(key)`): strings as they are, numbers written
/// out; anything else names no group.
fn group_key_text(value: &Value) -> Option<String> {
    match value {
        Value::String(key) => Some(key.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
