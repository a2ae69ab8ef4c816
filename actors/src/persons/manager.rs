//! `PersonManager`: the pipeline's person step for a whole batch.
//!
//! Events of one distinct id apply one after another in batch order, as PostHog's sub-batches
//! guarantee. Per batch: one snapshot read of every distinct id's person (confirming cached
//! copies by version; a cached copy that the id's first event changes is confirmed by its
//! write's version check instead); the events that change nothing are answered from it; the plain events
//! of each remaining id are applied in memory (`plan`) and every created or changed person is
//! written once, in one optimistic batch write; merges, and the writes that lost a race, take a
//! transaction per event, different distinct ids up to `concurrency` at once (below the
//! Postgres pool's size, so team and plugin lookups still get connections).
//!
//! An LRU of DISTINCT_ID_LRU_SIZE entries keeps the person of each recently seen distinct id
//! for PERSON_INFO_CACHE_TTL. An event that can change nothing (no `$set`, `$set_once`,
//! `$unset`, no identify or alias) and whose id is cached costs no database round trip. Events
//! that can change the person always go to the store, so a stale entry never overwrites
//! another instance's change; a stale entry only lags in the event's `person_properties` by at
//! most the TTL, as with PostHog's Redis person cache.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lru::LruCache;
use prometheus::{IntCounter, IntCounterVec, Opts};
use uuid::Uuid;

use super::rows::{PersonDistinctIdRow, PersonRow};
use super::state::{PersonError, PersonEvent, Resolution, resolve};
use super::store::{
    Person, PersonStoreError, PersonVersion, PersonWrite, SharedPersonStore, SnapshotEntry,
    SnapshotKey, WriteOutcome,
};
use crate::event::PersonMode;
use crate::system::metrics::{Metrics, MetricsError};
use plan::{Plan, personless};

mod plan;

#[derive(Debug, Clone)]
pub struct PersonConfig {
    /// DISTINCT_ID_LRU_SIZE; 0 turns the cache off.
    pub cache_size: usize,
    /// PERSON_INFO_CACHE_TTL.
    pub cache_ttl: Duration,
    /// Person transactions in flight at once.
    pub concurrency: usize,
    /// Tries per event when transactions lose races (PostHog retries merges 3 times).
    pub max_attempts: u32,
}

impl Default for PersonConfig {
    fn default() -> Self {
        Self {
            cache_size: 10_000,
            cache_ttl: Duration::from_secs(300),
            concurrency: 8,
            max_attempts: 5,
        }
    }
}

/// The person columns of an event row.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPerson {
    pub uuid: Uuid,
    /// The person's properties as JSON, serialized once per person version.
    pub properties: Arc<str>,
    pub created_at: DateTime<Utc>,
}

impl EventPerson {
    fn of(person: &Person) -> Self {
        Self {
            uuid: person.uuid,
            properties: super::rows::properties_json(&person.properties).into(),
            created_at: person.created_at,
        }
    }
}

/// What the person step gives back for one event.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonOutcome {
    pub person: EventPerson,
    pub mode: PersonMode,
    /// Store changes to mirror in ClickHouse, and warnings; `None` for a cache hit.
    pub changes: Option<Resolution>,
}

#[derive(Clone)]
pub struct PersonMetrics {
    cache_hit: IntCounter,
    cache_miss: IntCounter,
    snapshot: IntCounter,
    personless: IntCounter,
    conflicts: IntCounter,
    lost_writes: IntCounter,
    created: IntCounter,
    merged: IntCounter,
}

impl PersonMetrics {
    pub fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let cache = IntCounterVec::new(
            Opts::new(
                "person_lookups_total",
                "Events the person step answered without a transaction, by source (cache, snapshot, personless), and cache misses (cache_miss).",
            ),
            &["result"],
        )?;
        let conflicts = IntCounter::new(
            "person_transaction_conflicts_total",
            "Person transactions that lost a race with another and were retried.",
        )?;
        let lost_writes = IntCounter::new(
            "person_writes_lost_total",
            "Batched person writes that another writer beat (or the store refused); their events were applied again one transaction each.",
        )?;
        let created = IntCounter::new("persons_created_total", "Persons created by ingestion.")?;
        let merged = IntCounter::new(
            "persons_merged_total",
            "Persons merged into another and deleted.",
        )?;
        let registry = metrics.registry();
        registry.register(Box::new(cache.clone()))?;
        registry.register(Box::new(conflicts.clone()))?;
        registry.register(Box::new(lost_writes.clone()))?;
        registry.register(Box::new(created.clone()))?;
        registry.register(Box::new(merged.clone()))?;
        Ok(Self {
            cache_hit: cache.with_label_values(&["cache"]),
            cache_miss: cache.with_label_values(&["cache_miss"]),
            snapshot: cache.with_label_values(&["snapshot"]),
            personless: cache.with_label_values(&["personless"]),
            conflicts,
            lost_writes,
            created,
            merged,
        })
    }
}

type CacheKey = (i64, String);

/// Distinct ids come from clients, and the cache outlives a batch: a seeded hasher of good
/// quality, still several times cheaper than SipHash.
type CacheHasher = foldhash::quality::RandomState;

/// For maps that live one batch.
type BatchHasher = foldhash::fast::RandomState;

type PersonCache = LruCache<CacheKey, Cached, CacheHasher>;

/// The latest known state of one distinct id's person: within a batch, and in the cache
/// between batches.
#[derive(Clone)]
struct Known {
    /// Shared by the cache, the batch and every distinct id of the person: a person is copied
    /// only when the person step changes it.
    person: Arc<Person>,
    /// Its event columns, serialized once per person version.
    event_person: EventPerson,
}

impl Known {
    fn new(person: Person) -> Self {
        Self::of(Arc::new(person))
    }

    fn of(person: Arc<Person>) -> Self {
        Self {
            event_person: EventPerson::of(&person),
            person,
        }
    }
}

struct Cached {
    known: Known,
    stored_at: Instant,
}

/// A batch's events of one distinct id, in batch order, and what is known of its person.
struct IdEvents<'a> {
    key: (i64, &'a str),
    indices: Vec<usize>,
    /// The cache's copy, whatever its age: the snapshot confirms it by version.
    held: Option<Known>,
    /// The cache's copy while younger than PERSON_INFO_CACHE_TTL: it answers read-only events
    /// without a read.
    fresh: Option<Known>,
    /// The person as of the events answered so far (from the snapshot, then the step).
    known: Option<Known>,
    /// Its first event is known to change `known`: none of its events is answered from memory.
    changes_first: bool,
    /// Every event only creates or updates its own person (or is personless): no merge. Read
    /// while grouping, in batch order, so that the passes by id need not visit the events.
    plain: bool,
    /// Some event merges nothing.
    any_simple: bool,
    /// Some event merges nothing and may change its person.
    any_simple_update: bool,
}

/// Answers counted per batch rather than per event.
#[derive(Default)]
struct Lookups {
    cache: u64,
    cache_miss: u64,
    snapshot: u64,
    personless: u64,
}

pub struct PersonManager {
    store: SharedPersonStore,
    config: PersonConfig,
    cache: Option<Mutex<PersonCache>>,
    metrics: Option<PersonMetrics>,
}

impl PersonManager {
    pub fn new(store: SharedPersonStore, config: PersonConfig) -> Self {
        let cache = NonZeroUsize::new(config.cache_size)
            .map(|size| Mutex::new(LruCache::with_hasher(size, CacheHasher::default())));
        Self {
            store,
            config,
            cache,
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: PersonMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// Runs the person step for every event, answering in the same order. An event whose step
    /// failed gets its error; the others are unaffected.
    ///
    /// The persons of the batch's distinct ids are first read in one query, without locks,
    /// confirming by version the copies the cache holds instead of reading them again. An
    /// event that is no merge and whose updates would change nothing on that snapshot is
    /// answered from it, which is correct whatever another instance does meanwhile: the event
    /// then simply takes effect at the moment of the read. Only events that change something
    /// take a transaction (PostHog reads each person with its own query instead).
    pub async fn resolve_batch(
        &self,
        events: &[PersonEvent<'_>],
    ) -> Vec<Result<PersonOutcome, PersonError>> {
        let mut ids = self.group_by_distinct_id(events);
        // Some event that merges nothing must be read against the person: one that may change
        // it, or a read-only one without a fresh cached copy.
        let needs_snapshot =
            |id: &IdEvents<'_>| id.any_simple_update || (id.any_simple && id.fresh.is_none());
        // An id whose first event changes the cached copy, and whose events merge nothing,
        // is written with that copy's version checked: a stale copy loses the write and its
        // events are applied again on what is stored, so the snapshot would only confirm
        // what the write checks anyway.
        let checked_by_write = |id: &IdEvents<'_>| {
            let Some(held) = &id.held else {
                return false;
            };
            id.plain
                && id.indices.first().is_some_and(|&index| {
                    let event = &events[index];
                    event.process_person && event.updates.would_change(&held.person.properties)
                })
        };
        let mut wanted: Vec<usize> = Vec::new();
        for (n, id) in ids.iter_mut().enumerate() {
            if !needs_snapshot(id) {
                continue;
            }
            if checked_by_write(id) {
                id.known = id.held.clone();
                id.changes_first = true;
            } else {
                wanted.push(n);
            }
        }
        let keys: Vec<SnapshotKey<'_>> = wanted
            .iter()
            .map(|&n| SnapshotKey {
                team_id: ids[n].key.0,
                distinct_id: ids[n].key.1,
                held: ids[n]
                    .held
                    .as_ref()
                    .map(|held| PersonVersion::from(&*held.person)),
            })
            .collect();
        let snapshot = if keys.is_empty() {
            Vec::new()
        } else {
            match self.store.snapshot(&keys).await {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    let message = error.to_string();
                    return events
                        .iter()
                        .map(|_| {
                            Err(PersonError::Store(PersonStoreError::Unavailable(
                                message.clone(),
                            )))
                        })
                        .collect();
                }
            }
        };
        for (n, entry) in wanted.into_iter().zip(snapshot) {
            let id = &mut ids[n];
            id.known = match entry {
                Some(SnapshotEntry::Held) => id.held.clone(),
                Some(SnapshotEntry::Read(person)) => Some(Known::new(person)),
                None => None,
            };
        }

        let mut results: Vec<Option<Result<PersonOutcome, PersonError>>> =
            (0..events.len()).map(|_| None).collect();
        // Most events need no transaction: they are answered here, in one pass, and only the
        // rest of an id's events (from its first change on) go to the store, in order.
        let mut lookups = Lookups::default();
        let mut learned: Vec<(i64, &str, Known)> = Vec::new();
        // Ids whose remaining events only create or update their own person are written in one
        // go; the rest (merges, and writes that lost a race) take a transaction per event. An
        // event that merges is never answered from memory, so what remains of a plain id is
        // plain and what remains of another still holds its merge.
        let mut batched: Vec<(Vec<usize>, Option<Known>)> = Vec::new();
        let mut rest: Vec<(Vec<usize>, Option<Known>)> = Vec::new();
        for mut id in ids {
            let confirmed_before = lookups.snapshot;
            let mut answered = 0;
            for &index in &id.indices {
                if id.changes_first {
                    break;
                }
                let event = &events[index];
                let Some(outcome) =
                    self.answer_from_memory(event, &mut id.fresh, id.known.as_ref(), &mut lookups)
                else {
                    break;
                };
                results[index] = Some(Ok(outcome));
                answered += 1;
            }
            // Only a copy the snapshot just confirmed starts a new TTL; a cache hit does not.
            if lookups.snapshot > confirmed_before
                && let Some(known) = id.fresh.take()
            {
                learned.push((id.key.0, id.key.1, known));
            }
            if answered < id.indices.len() {
                id.indices.drain(..answered);
                if id.plain {
                    batched.push((id.indices, id.known));
                } else {
                    rest.push((id.indices, id.known));
                }
            }
        }
        self.count_lookups(&lookups);
        self.remember_all(&learned);

        match self.write_in_one_go(events, batched, &mut results).await {
            Ok(lost) => rest.extend(lost),
            Err(error) => {
                let message = error.to_string();
                for result in &mut results {
                    *result = Some(Err(PersonError::Store(PersonStoreError::Unavailable(
                        message.clone(),
                    ))));
                }
                return results.into_iter().flatten().collect();
            }
        }

        let concurrency = self.config.concurrency.max(1);
        let mut runs = futures::stream::iter(rest)
            .map(|(indices, mut known)| async move {
                let mut answers = Vec::with_capacity(indices.len());
                for index in indices {
                    answers.push((index, self.resolve_one(&events[index], &mut known).await));
                }
                answers
            })
            .buffer_unordered(concurrency);
        while let Some(answers) = runs.next().await {
            for (index, answer) in answers {
                results[index] = Some(answer);
            }
        }
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(PersonError::Contention {
                        attempts: 0,
                        last: "the event was not processed".to_owned(),
                    })
                })
            })
            .collect()
    }

    /// Applies each id's events in memory, in order, and writes every created or changed
    /// person once, all in one [`PersonStore::write_batch`]. Answers the events of the ids
    /// written; returns the ids whose write lost a race (nothing of theirs was written), to be
    /// applied again one event at a time on what is stored now. A store that refuses the
    /// batch as a whole (a conflict between its statements, a refused row) sends every id
    /// that way, so one bad event cannot fail the others.
    async fn write_in_one_go(
        &self,
        events: &[PersonEvent<'_>],
        ids: Vec<(Vec<usize>, Option<Known>)>,
        results: &mut [Option<Result<PersonOutcome, PersonError>>],
    ) -> Result<Vec<(Vec<usize>, Option<Known>)>, PersonStoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = together_by_person(ids);
        let mut plans: Vec<Plan> = ids
            .iter()
            .map(|(indices, known)| Plan::new(events, indices, known.as_ref()))
            .collect();
        // Moved out rather than copied: only whether a plan writes is needed afterwards.
        let writes_person: Vec<bool> = plans.iter().map(|plan| plan.write.is_some()).collect();
        let writes: Vec<PersonWrite> = plans
            .iter_mut()
            .filter_map(|plan| plan.write.take())
            .collect();
        let outcomes = match self.store.write_batch(&writes).await {
            Ok(outcomes) => outcomes,
            Err(PersonStoreError::Unavailable(message)) => {
                return Err(PersonStoreError::Unavailable(message));
            }
            Err(error) => {
                tracing::debug!(%error, "batched person writes refused; writing one by one");
                return Ok(ids
                    .into_iter()
                    .map(|(indices, _)| (indices, None))
                    .collect());
            }
        };
        let mut outcomes = outcomes.into_iter();
        let mut writes = writes.into_iter();
        let mut lost = Vec::new();
        let mut learned = Vec::new();
        for (((indices, _), plan), wrote) in ids.into_iter().zip(plans).zip(writes_person) {
            let stored = if wrote {
                match (outcomes.next(), writes.next()) {
                    (Some(WriteOutcome::Stored(version)), Some(write)) => {
                        Some(Arc::new(stored_person(write, version)))
                    }
                    _ => {
                        if let Some(metrics) = &self.metrics {
                            metrics.lost_writes.inc();
                        }
                        lost.push((indices, None));
                        continue;
                    }
                }
            } else {
                None
            };
            let Plan {
                mut answers,
                last_change,
                created,
                ..
            } = plan;
            if let (Some(person), Some(position)) = (stored, last_change) {
                let event = &events[indices[position]];
                if created && let Some(metrics) = &self.metrics {
                    metrics.created.inc();
                }
                let distinct_id_rows = if created {
                    vec![PersonDistinctIdRow {
                        team_id: person.team_id,
                        distinct_id: event.distinct_id.to_string(),
                        person_id: person.uuid,
                        is_deleted: false,
                        version: 0,
                    }]
                } else {
                    Vec::new()
                };
                let known = Known {
                    event_person: answers[position].person.clone(),
                    person: Arc::clone(&person),
                };
                // Every distinct id of the plan (two, after a merge) now has this person.
                let mut plan_ids: Vec<&PersonEvent> = Vec::with_capacity(1);
                for &index in &indices {
                    let id = &events[index];
                    if !plan_ids
                        .iter()
                        .any(|seen| seen.distinct_id == id.distinct_id)
                    {
                        plan_ids.push(id);
                    }
                }
                for id in plan_ids {
                    learned.push((id.team_id, &*id.distinct_id, known.clone()));
                }
                answers[position].changes = Some(Resolution {
                    // The event's person JSON is this version's: serialized once.
                    person_rows: vec![PersonRow::with_properties(
                        &person,
                        Arc::clone(&answers[position].person.properties),
                    )],
                    person,
                    distinct_ids: vec![event.distinct_id.to_string()],
                    merged_person: None,
                    distinct_id_rows,
                    warnings: Vec::new(),
                    created,
                    conflicts: 0,
                });
            }
            for (index, answer) in indices.into_iter().zip(answers) {
                results[index] = Some(Ok(answer));
            }
        }
        self.remember_all(&learned);
        Ok(lost)
    }

    /// The batch's events by distinct id, each with what the cache holds for it (one lock).
    fn group_by_distinct_id<'a>(&self, events: &'a [PersonEvent]) -> Vec<IdEvents<'a>> {
        let mut positions: HashMap<(i64, &str), usize, BatchHasher> =
            HashMap::with_capacity_and_hasher(events.len(), BatchHasher::default());
        let mut ids: Vec<IdEvents<'a>> = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let key = (event.team_id, &*event.distinct_id);
            let position = *positions.entry(key).or_insert_with(|| {
                ids.push(IdEvents {
                    key,
                    indices: Vec::new(),
                    held: None,
                    fresh: None,
                    known: None,
                    changes_first: false,
                    plain: true,
                    any_simple: false,
                    any_simple_update: false,
                });
                ids.len() - 1
            });
            let id = &mut ids[position];
            id.indices.push(index);
            let simple = event.is_simple();
            id.plain &= simple || !event.process_person;
            id.any_simple |= simple;
            id.any_simple_update |= simple && !event.is_read_only();
        }
        if let Some(cache) = &self.cache {
            let now = Instant::now();
            let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
            let mut key = (0, String::new());
            for id in &mut ids {
                key.0 = id.key.0;
                key.1.clear();
                key.1.push_str(id.key.1);
                if let Some(cached) = cache.get(&key) {
                    if now.duration_since(cached.stored_at) < self.config.cache_ttl {
                        id.fresh = Some(cached.known.clone());
                    }
                    id.held = Some(cached.known.clone());
                }
            }
        }
        ids
    }

    /// The answer for an event that needs no transaction, from what is known of its person;
    /// `None` when it needs the store. What it answers from is kept as the id's fresh copy.
    fn answer_from_memory(
        &self,
        event: &PersonEvent<'_>,
        fresh: &mut Option<Known>,
        known: Option<&Known>,
        lookups: &mut Lookups,
    ) -> Option<PersonOutcome> {
        if !event.process_person {
            lookups.personless += 1;
            let existing = fresh.as_ref().or(known);
            return Some(personless(event, existing.map(|known| &known.event_person)));
        }
        if event.is_read_only() {
            if let Some(fresh) = fresh {
                lookups.cache += 1;
                return Some(PersonOutcome {
                    person: fresh.event_person.clone(),
                    mode: PersonMode::Full,
                    changes: None,
                });
            }
            lookups.cache_miss += 1;
        }
        let known = known?;
        if !event.is_simple() || event.updates.would_change(&known.person.properties) {
            return None;
        }
        lookups.snapshot += 1;
        *fresh = Some(known.clone());
        Some(PersonOutcome {
            person: known.event_person.clone(),
            mode: PersonMode::Full,
            changes: None,
        })
    }

    async fn resolve_one(
        &self,
        event: &PersonEvent<'_>,
        known: &mut Option<Known>,
    ) -> Result<PersonOutcome, PersonError> {
        // The same answers without a transaction as the batch's first pass, with the cache
        // looked up for this event (an earlier event of the id may have just filled it).
        let mut fresh = self.cached(&(event.team_id, event.distinct_id.to_string()));
        let mut lookups = Lookups::default();
        let answer = self.answer_from_memory(event, &mut fresh, known.as_ref(), &mut lookups);
        self.count_lookups(&lookups);
        if let Some(answer) = answer {
            if lookups.snapshot > 0
                && let Some(known) = known.as_ref()
            {
                self.remember(event.team_id, &[&*event.distinct_id], known);
            }
            return Ok(answer);
        }
        let resolution = resolve(self.store.as_ref(), event, self.config.max_attempts).await?;
        if let Some(metrics) = &self.metrics {
            metrics.conflicts.inc_by(u64::from(resolution.conflicts));
            if resolution.created {
                metrics.created.inc();
            }
            if resolution.merged_person.is_some() {
                metrics.merged.inc();
            }
        }
        let learned = Known::of(Arc::clone(&resolution.person));
        let person = learned.event_person.clone();
        self.remember(event.team_id, &resolution.distinct_ids, &learned);
        *known = Some(learned);
        Ok(PersonOutcome {
            person,
            mode: PersonMode::Full,
            changes: Some(resolution),
        })
    }

    /// The cache's copy of a distinct id's person while younger than the TTL.
    fn cached(&self, key: &CacheKey) -> Option<Known> {
        let cache = self.cache.as_ref()?;
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = cache.get(key)?;
        (cached.stored_at.elapsed() < self.config.cache_ttl).then(|| cached.known.clone())
    }

    fn remember(&self, team_id: i64, distinct_ids: &[impl AsRef<str>], known: &Known) {
        let Some(cache) = &self.cache else {
            return;
        };
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let stored_at = Instant::now();
        let mut key = (team_id, String::new());
        for distinct_id in distinct_ids {
            cache_put(&mut cache, &mut key, distinct_id.as_ref(), known, stored_at);
        }
    }

    /// [`Self::remember`] for the answers of one batch, under one lock.
    fn remember_all(&self, learned: &[(i64, &str, Known)]) {
        let Some(cache) = &self.cache else {
            return;
        };
        if learned.is_empty() {
            return;
        }
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let stored_at = Instant::now();
        let mut key = (0, String::new());
        for (team_id, distinct_id, known) in learned {
            key.0 = *team_id;
            cache_put(&mut cache, &mut key, distinct_id, known, stored_at);
        }
    }

    fn count_lookups(&self, lookups: &Lookups) {
        if let Some(metrics) = &self.metrics {
            metrics.cache_hit.inc_by(lookups.cache);
            metrics.cache_miss.inc_by(lookups.cache_miss);
            metrics.snapshot.inc_by(lookups.snapshot);
            metrics.personless.inc_by(lookups.personless);
        }
    }
}

/// Caches `known` for `(key.0, distinct_id)`, most recently used. An id already cached (the
/// steady state) is updated in place, without allocating a key; `key` is the caller's buffer.
fn cache_put(
    cache: &mut PersonCache,
    key: &mut CacheKey,
    distinct_id: &str,
    known: &Known,
    stored_at: Instant,
) {
    key.1.clear();
    key.1.push_str(distinct_id);
    let fresh = Cached {
        known: known.clone(),
        stored_at,
    };
    match cache.get_mut(&*key) {
        Some(cached) => *cached = fresh,
        None => {
            cache.put(key.clone(), fresh);
        }
    }
}

/// The person a batched write stored: what was written, under the row id and version the
/// store answered.
fn stored_person(write: PersonWrite, stored: PersonVersion) -> Person {
    match write {
        PersonWrite::Update { person, .. } => Person {
            version: stored.version,
            ..person
        },
        PersonWrite::Create { person, .. } => Person {
            version: stored.version,
            ..person.stored(stored.id)
        },
    }
}

/// Joins the events of distinct ids that share a known person (two ids after a merge), in
/// batch order, so that the person is planned and written once: two writes of one person in
/// one batch would race each other, and the second would always be lost.
fn together_by_person(ids: Vec<(Vec<usize>, Option<Known>)>) -> Vec<(Vec<usize>, Option<Known>)> {
    let mut by_person: HashMap<i64, usize, BatchHasher> =
        HashMap::with_capacity_and_hasher(ids.len(), BatchHasher::default());
    let mut joined: Vec<(Vec<usize>, Option<Known>)> = Vec::with_capacity(ids.len());
    for (indices, known) in ids {
        if let Some(person_id) = known.as_ref().map(|known| known.person.id) {
            if let Some(&at) = by_person.get(&person_id) {
                joined[at].0.extend(indices);
                joined[at].0.sort_unstable();
                continue;
            }
            by_person.insert(person_id, joined.len());
        }
        joined.push((indices, known));
    }
    joined
}

#[cfg(test)]
mod tests;
