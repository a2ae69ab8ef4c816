//! `PersonManager`: the pipeline's person step for a whole batch.
//!
//! Events of one distinct id run one after another in batch order, as PostHog's sub-batches
//! guarantee; different distinct ids run concurrently, up to `concurrency` transactions at once
//! (below the Postgres pool's size, so team and plugin lookups still get connections).
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

use super::state::{PersonError, PersonEvent, Resolution, resolve, uuid_from_distinct_id};
use super::store::{Person, PersonStoreError, SharedPersonStore};
use crate::event::PersonMode;
use crate::system::metrics::{Metrics, MetricsError};

/// A personless event's `person_created_at` when the distinct id has no person: 5 s after the
/// epoch, as PostHog writes it (distinct from a real zero, to help debugging).
fn personless_created_at() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(5)
}

/// An existing person gets a personless event as its own (`force_upgrade`) once it is older
/// than this at the event's time.
const FORCE_UPGRADE_AFTER: chrono::Duration = chrono::Duration::minutes(1);

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
    cache: IntCounterVec,
    conflicts: IntCounter,
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
        let created = IntCounter::new("persons_created_total", "Persons created by ingestion.")?;
        let merged = IntCounter::new(
            "persons_merged_total",
            "Persons merged into another and deleted.",
        )?;
        let registry = metrics.registry();
        registry.register(Box::new(cache.clone()))?;
        registry.register(Box::new(conflicts.clone()))?;
        registry.register(Box::new(created.clone()))?;
        registry.register(Box::new(merged.clone()))?;
        Ok(Self {
            cache,
            conflicts,
            created,
            merged,
        })
    }
}

type CacheKey = (i64, String);

/// The latest known state of one distinct id's person within a batch.
struct Known {
    person: Person,
    /// Its event columns, serialized once for all the id's events.
    event_person: EventPerson,
}

impl Known {
    fn new(person: Person) -> Self {
        Self {
            event_person: EventPerson::of(&person),
            person,
        }
    }
}

struct Cached {
    person: EventPerson,
    stored_at: Instant,
}

pub struct PersonManager {
    store: SharedPersonStore,
    config: PersonConfig,
    cache: Option<Mutex<LruCache<CacheKey, Cached>>>,
    metrics: Option<PersonMetrics>,
}

impl PersonManager {
    pub fn new(store: SharedPersonStore, config: PersonConfig) -> Self {
        let cache =
            NonZeroUsize::new(config.cache_size).map(|size| Mutex::new(LruCache::new(size)));
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
    /// The persons of the batch's distinct ids are first read in one query, without locks. An
    /// event that is no merge and whose updates would change nothing on that snapshot is
    /// answered from it, which is correct whatever another instance does meanwhile: the event
    /// then simply takes effect at the moment of the read. Only events that change something
    /// take a transaction (PostHog reads each person with its own query instead).
    pub async fn resolve_batch(
        &self,
        events: &[PersonEvent],
    ) -> Vec<Result<PersonOutcome, PersonError>> {
        let mut groups: HashMap<(i64, &str), Vec<usize>> = HashMap::new();
        for (index, event) in events.iter().enumerate() {
            groups
                .entry((event.team_id, event.distinct_id.as_str()))
                .or_default()
                .push(index);
        }
        let wanted: Vec<CacheKey> = groups
            .iter()
            .filter(|(_, indices)| {
                indices.iter().any(|&index| {
                    let event = &events[index];
                    event.is_simple() && !(event.is_read_only() && self.is_cached(event))
                })
            })
            .map(|((team_id, distinct_id), _)| (*team_id, (*distinct_id).to_owned()))
            .collect();
        let mut snapshot = match self.store.persons_by_distinct_ids(&wanted).await {
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
        };
        let concurrency = self.config.concurrency.max(1);
        let mut results: Vec<Option<Result<PersonOutcome, PersonError>>> =
            (0..events.len()).map(|_| None).collect();
        let runs = groups.into_iter().map(|((team_id, distinct_id), indices)| {
            let known = snapshot
                .remove(&(team_id, distinct_id.to_owned()))
                .map(Known::new);
            (indices, known)
        });
        let mut runs = futures::stream::iter(runs)
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

    async fn resolve_one(
        &self,
        event: &PersonEvent,
        known: &mut Option<Known>,
    ) -> Result<PersonOutcome, PersonError> {
        if !event.process_person {
            return Ok(self.personless(event, known.as_ref()));
        }
        if event.is_read_only() {
            let hit = self.cached(&(event.team_id, event.distinct_id.clone()));
            self.count_lookup(if hit.is_some() { "cache" } else { "cache_miss" });
            if let Some(person) = hit {
                return Ok(PersonOutcome {
                    person,
                    mode: PersonMode::Full,
                    changes: None,
                });
            }
        }
        if event.is_simple()
            && let Some(known) = known.as_ref()
            && !event.updates.would_change(&known.person.properties)
        {
            self.count_lookup("snapshot");
            let person = known.event_person.clone();
            self.remember(
                event.team_id,
                std::slice::from_ref(&event.distinct_id),
                &person,
            );
            return Ok(PersonOutcome {
                person,
                mode: PersonMode::Full,
                changes: None,
            });
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
        let person = EventPerson::of(&resolution.person);
        *known = Some(Known {
            person: resolution.person.clone(),
            event_person: person.clone(),
        });
        self.remember(event.team_id, &resolution.distinct_ids, &person);
        Ok(PersonOutcome {
            person,
            mode: PersonMode::Full,
            changes: Some(resolution),
        })
    }

    /// `$process_person_profile: false` (PostHog's personless events): nothing is created or
    /// changed. An existing person (cached or in the batch's snapshot) lends its id with empty
    /// properties, and takes the event as its own once it is older than a minute; otherwise the
    /// id is the one PostHog derives from the distinct id.
    fn personless(&self, event: &PersonEvent, known: Option<&Known>) -> PersonOutcome {
        let existing = self
            .cached(&(event.team_id, event.distinct_id.clone()))
            .or_else(|| known.map(|known| known.event_person.clone()));
        self.count_lookup("personless");
        let empty: Arc<str> = Arc::from("{}");
        match existing {
            Some(person) => PersonOutcome {
                mode: if event.timestamp > person.created_at + FORCE_UPGRADE_AFTER {
                    PersonMode::ForceUpgrade
                } else {
                    PersonMode::Propertyless
                },
                person: EventPerson {
                    uuid: person.uuid,
                    properties: empty,
                    created_at: person.created_at,
                },
                changes: None,
            },
            None => PersonOutcome {
                person: EventPerson {
                    uuid: uuid_from_distinct_id(event.team_id, &event.distinct_id),
                    properties: empty,
                    created_at: personless_created_at(),
                },
                mode: PersonMode::Propertyless,
                changes: None,
            },
        }
    }

    fn is_cached(&self, event: &PersonEvent) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        let cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .peek(&(event.team_id, event.distinct_id.clone()))
            .is_some_and(|cached| cached.stored_at.elapsed() < self.config.cache_ttl)
    }

    fn cached(&self, key: &CacheKey) -> Option<EventPerson> {
        let cache = self.cache.as_ref()?;
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = cache
            .get(key)
            .filter(|cached| cached.stored_at.elapsed() < self.config.cache_ttl)
            .map(|cached| cached.person.clone());
        if fresh.is_none() {
            cache.pop(key);
        }
        fresh
    }

    fn remember(&self, team_id: i64, distinct_ids: &[String], person: &EventPerson) {
        let Some(cache) = &self.cache else {
            return;
        };
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let stored_at = Instant::now();
        for distinct_id in distinct_ids {
            cache.put(
                (team_id, distinct_id.clone()),
                Cached {
                    person: person.clone(),
                    stored_at,
                },
            );
        }
    }

    /// Counts an answer that needed no transaction (`cache`, `snapshot`) or a `cache_miss`.
    fn count_lookup(&self, result: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.cache.with_label_values(&[result]).inc();
        }
    }
}

#[cfg(test)]
mod tests;
