//! PostHog's `PersonState` for one event (spec 1.5): merge the two ids an identify or alias
//! names, create the event's person on first sight, then apply `$set`, `$set_once` and
//! `$unset`, all in one transaction of a [`PersonStore`].
//!
//! A transaction that loses a race (a concurrent insert of the same distinct id, a deadlock
//! between two merges, a person deleted by a merge meanwhile) is rolled back and the whole step
//! runs again on the now-current rows, up to `max_attempts` times. Since every read locks the
//! rows it returns, a retry sees the winner's changes and builds on them, so two instances
//! identifying the same user at once end with one person holding both events' properties.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::identity::{
    CANNOT_MERGE_ALREADY_IDENTIFIED, IllegalMerge, MergeDecision, MergeIntent, MergeKind,
    PersonRef, decide,
};
use super::properties::{PersonUpdates, initial_properties, merged_properties};
use super::rows::{PersonDistinctIdRow, PersonRow};
use super::store::{NewPerson, Person, PersonStore, PersonStoreError, PersonTransaction};
use crate::event::IngestionWarning;

/// What the person step needs of one event, read from it before any database work. It
/// borrows from the event where it can: the batch holds the events through the step.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonEvent<'a> {
    pub team_id: i64,
    pub distinct_id: Cow<'a, str>,
    pub event_uuid: Cow<'a, str>,
    /// The event's parsed timestamp: a new person's `created_at`.
    pub timestamp: DateTime<Utc>,
    /// The merge the event asks for; a refused one becomes a warning.
    pub intent: Result<MergeIntent, IllegalMerge>,
    pub updates: PersonUpdates<'a>,
    /// False for `$process_person_profile: false`: the event creates and changes no person.
    pub process_person: bool,
}

impl PersonEvent<'_> {
    /// Whether the event asks for no merge (a refused one raises a warning, so it is not
    /// simple either): only its own person's properties can change.
    pub fn is_simple(&self) -> bool {
        matches!(self.intent, Ok(MergeIntent::None))
    }

    /// Whether the event neither changes its person nor raises a warning, so that a cached
    /// person can answer for it.
    pub fn is_read_only(&self) -> bool {
        self.updates.is_empty() && matches!(self.intent, Ok(MergeIntent::None))
    }
}

/// PostHog's namespace for person uuids made from `team_id:distinct_id` (UUID v5): a new
/// person's id comes from its first distinct id, so that the personless events of that id
/// (which carry the same id) belong to it, and racing creators of one person agree.
pub(crate) const PERSON_UUIDV5_NAMESPACE: Uuid =
    Uuid::from_u128(0x932979b4_65c3_4424_8467_0b66ec27bc22);

/// PostHog's `uuidFromDistinctId`.
pub fn uuid_from_distinct_id(team_id: i64, distinct_id: &str) -> Uuid {
    Uuid::new_v5(
        &PERSON_UUIDV5_NAMESPACE,
        format!("{team_id}:{distinct_id}").as_bytes(),
    )
}

/// The outcome of the person step for one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// The person the event belongs to, as stored after the event; shared with the person
    /// step's cache.
    pub person: Arc<Person>,
    /// Distinct ids now known to belong to `person` (the event's own first).
    pub distinct_ids: Vec<String>,
    /// The person a merge folded into `person` and deleted.
    pub merged_person: Option<Uuid>,
    pub person_rows: Vec<PersonRow>,
    pub distinct_id_rows: Vec<PersonDistinctIdRow>,
    pub warnings: Vec<IngestionWarning>,
    /// Whether this event created `person`.
    pub created: bool,
    /// Attempts that lost a race before this one won.
    pub conflicts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PersonError {
    #[error(transparent)]
    Store(PersonStoreError),
    #[error("gave up after {attempts} attempts lost races on the same person: {last}")]
    Contention { attempts: u32, last: String },
}

/// Runs the person step for `event`, retrying lost races.
pub async fn resolve(
    store: &dyn PersonStore,
    event: &PersonEvent<'_>,
    max_attempts: u32,
) -> Result<Resolution, PersonError> {
    let mut warnings = Vec::new();
    let intent = match &event.intent {
        Ok(intent) => intent.clone(),
        Err(refused) => {
            warnings.push(IngestionWarning {
                team_id: event.team_id,
                kind: refused.warning(),
                details: json!({
                    "eventUuid": event.event_uuid,
                    "isMergeEvent": refused.kind.event_name(),
                    "illegalDistinctId": refused.illegal_distinct_id,
                    "otherDistinctId": refused.other_distinct_id,
                }),
                timestamp: Utc::now(),
            });
            MergeIntent::None
        }
    };
    let mut conflicts = 0;
    loop {
        let mut attempt = Attempt {
            event,
            rows: Collected {
                distinct_ids: vec![event.distinct_id.to_string()],
                merged_person: None,
                person_rows: Vec::new(),
                distinct_id_rows: Vec::new(),
                warnings: warnings.clone(),
                created: false,
            },
        };
        let outcome = match store.begin().await {
            Ok(transaction) => attempt.run(transaction, &intent).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(person) => {
                let Collected {
                    distinct_ids,
                    merged_person,
                    person_rows,
                    distinct_id_rows,
                    warnings,
                    created,
                } = attempt.rows;
                return Ok(Resolution {
                    person: Arc::new(person),
                    distinct_ids,
                    merged_person,
                    person_rows,
                    distinct_id_rows,
                    warnings,
                    created,
                    conflicts,
                });
            }
            Err(PersonStoreError::Conflict(message)) => {
                conflicts += 1;
                if conflicts >= max_attempts {
                    return Err(PersonError::Contention {
                        attempts: conflicts,
                        last: message,
                    });
                }
                tracing::debug!(
                    team_id = event.team_id,
                    distinct_id = %event.distinct_id,
                    %message,
                    "person step lost a race; retrying"
                );
            }
            Err(error) => return Err(PersonError::Store(error)),
        }
    }
}

/// What an attempt gathers before it knows the person: the [`Resolution`] but its person.
struct Collected {
    distinct_ids: Vec<String>,
    merged_person: Option<Uuid>,
    person_rows: Vec<PersonRow>,
    distinct_id_rows: Vec<PersonDistinctIdRow>,
    warnings: Vec<IngestionWarning>,
    created: bool,
}

/// One try at the step; collects what to write to ClickHouse once it commits.
struct Attempt<'e> {
    event: &'e PersonEvent<'e>,
    rows: Collected,
}

impl Attempt<'_> {
    async fn run(
        &mut self,
        mut transaction: Box<dyn PersonTransaction + '_>,
        intent: &MergeIntent,
    ) -> Result<Person, PersonStoreError> {
        let event = self.event;
        let mut person = None;
        let mut identify = false;
        if let MergeIntent::Merge {
            previous_distinct_id,
            distinct_id,
            kind,
        } = intent
        {
            identify = true;
            person = self
                .merge(
                    transaction.as_mut(),
                    previous_distinct_id,
                    distinct_id,
                    *kind,
                )
                .await?;
        }
        let person = match person {
            Some(person) => person,
            None => match transaction
                .person_by_distinct_id(event.team_id, &event.distinct_id)
                .await?
            {
                Some(person) => self.update(transaction.as_mut(), person, identify).await?,
                None => {
                    let ids = [&*event.distinct_id];
                    self.create(transaction.as_mut(), identify, &ids).await?
                }
            },
        };
        transaction.commit().await?;
        Ok(person)
    }

    /// Spec 1.5 step 1. Returns the event's person once the merge has been applied to it, or
    /// `None` when the event's distinct id has no person yet and none was created.
    async fn merge(
        &mut self,
        transaction: &mut dyn PersonTransaction,
        previous_distinct_id: &str,
        distinct_id: &str,
        kind: MergeKind,
    ) -> Result<Option<Person>, PersonStoreError> {
        let team_id = self.event.team_id;
        // Lock the two people in the same order in every transaction, so two merges of the
        // same pair in opposite directions wait for each other instead of deadlocking.
        let (old, new) = if previous_distinct_id <= distinct_id {
            let old = transaction
                .person_by_distinct_id(team_id, previous_distinct_id)
                .await?;
            let new = transaction
                .person_by_distinct_id(team_id, distinct_id)
                .await?;
            (old, new)
        } else {
            let new = transaction
                .person_by_distinct_id(team_id, distinct_id)
                .await?;
            let old = transaction
                .person_by_distinct_id(team_id, previous_distinct_id)
                .await?;
            (old, new)
        };
        let reference = |person: &Option<Person>| {
            person.as_ref().map(|person| PersonRef {
                id: person.id,
                is_identified: person.is_identified,
            })
        };
        let decision = decide(kind, reference(&old), reference(&new));
        let person = match (decision, old, new) {
            (MergeDecision::AddDistinctIdToOldPerson { .. }, Some(old), _) => {
                transaction.add_distinct_id(&old, distinct_id).await?;
                self.distinct_id_row(distinct_id, &old, 0);
                self.update(transaction, old, true).await?
            }
            (MergeDecision::AddPreviousDistinctIdToNewPerson { .. }, _, Some(new)) => {
                transaction
                    .add_distinct_id(&new, previous_distinct_id)
                    .await?;
                self.distinct_id_row(previous_distinct_id, &new, 0);
                self.rows.distinct_ids.push(previous_distinct_id.to_owned());
                self.update(transaction, new, true).await?
            }
            (MergeDecision::CreateIdentifiedPerson, _, _) => {
                let ids = [distinct_id, previous_distinct_id];
                self.rows.distinct_ids.push(previous_distinct_id.to_owned());
                self.create(transaction, true, &ids).await?
            }
            (MergeDecision::MergePeople { .. }, Some(source), Some(target)) => {
                self.merge_people(transaction, source, target).await?
            }
            (MergeDecision::RefuseAlreadyIdentified { .. }, _, Some(new)) => {
                self.rows.warnings.push(IngestionWarning {
                    team_id,
                    kind: CANNOT_MERGE_ALREADY_IDENTIFIED,
                    details: json!({
                        "eventUuid": self.event.event_uuid,
                        "isMergeEvent": kind.event_name(),
                        "sourcePersonDistinctId": previous_distinct_id,
                        "targetPersonDistinctId": distinct_id,
                    }),
                    timestamp: Utc::now(),
                });
                self.update(transaction, new, true).await?
            }
            (MergeDecision::MarkIdentified { .. }, _, Some(new)) => {
                self.rows.distinct_ids.push(previous_distinct_id.to_owned());
                self.update(transaction, new, true).await?
            }
            // `decide` names only people that exist, so these cannot happen; a retry re-reads.
            (decision, _, _) => {
                return Err(PersonStoreError::Conflict(format!(
                    "merge decision {decision:?} names a person that was not read"
                )));
            }
        };
        Ok(Some(person))
    }

    /// mergePeople: the target keeps its row and gains the source's ids and properties; the
    /// source is deleted.
    async fn merge_people(
        &mut self,
        transaction: &mut dyn PersonTransaction,
        source: Person,
        target: Person,
    ) -> Result<Person, PersonStoreError> {
        let mut merged = target.clone();
        merged.created_at = target.created_at.min(source.created_at);
        merged.properties = merged_properties(&target.properties, &source.properties);
        self.event.updates.apply_to(&mut merged.properties);
        merged.is_identified = true;
        let moved = transaction.move_distinct_ids(&source, &target).await?;
        let stored = transaction.update_person(&merged).await?;
        transaction.delete_person(&source).await?;
        for id in moved {
            self.distinct_id_row(&id.distinct_id, &stored, id.version);
            self.rows.distinct_ids.push(id.distinct_id);
        }
        self.rows.person_rows.push(PersonRow::of(&stored));
        self.rows.person_rows.push(PersonRow::deleted(&source));
        self.rows.merged_person = Some(source.uuid);
        Ok(stored)
    }

    /// Spec 1.5 step 2: a new person owning `distinct_ids`.
    async fn create(
        &mut self,
        transaction: &mut dyn PersonTransaction,
        is_identified: bool,
        distinct_ids: &[&str],
    ) -> Result<Person, PersonStoreError> {
        let first_id = distinct_ids
            .first()
            .copied()
            .unwrap_or(&self.event.distinct_id);
        let person = transaction
            .create_person(
                new_person(self.event, first_id, is_identified),
                distinct_ids,
            )
            .await?;
        for id in distinct_ids {
            self.distinct_id_row(id, &person, 0);
        }
        self.rows.person_rows.push(PersonRow::of(&person));
        self.rows.created = true;
        Ok(person)
    }

    /// Spec 1.5 step 3: the event's `$set_once`, `$set` and `$unset`, and `is_identified`
    /// for a merging event. Writes only when something changed.
    async fn update(
        &mut self,
        transaction: &mut dyn PersonTransaction,
        person: Person,
        identify: bool,
    ) -> Result<Person, PersonStoreError> {
        let mut next = person.clone();
        let mut changed = self.event.updates.apply_to(&mut next.properties);
        if identify && !next.is_identified {
            next.is_identified = true;
            changed = true;
        }
        if !changed {
            return Ok(person);
        }
        let stored = transaction.update_person(&next).await?;
        self.rows.person_rows.push(PersonRow::of(&stored));
        Ok(stored)
    }

    fn distinct_id_row(&mut self, distinct_id: &str, person: &Person, version: i64) {
        self.rows.distinct_id_rows.push(PersonDistinctIdRow {
            team_id: person.team_id,
            distinct_id: distinct_id.to_owned(),
            person_id: person.uuid,
            is_deleted: false,
            version,
        });
    }
}

/// The person `event` creates for `distinct_id`: PostHog's v5 id of it, the event's
/// `$set_once` then `$set` (and its uuid as the creator's), each key's last operation.
pub(crate) fn new_person(
    event: &PersonEvent<'_>,
    distinct_id: &str,
    is_identified: bool,
) -> NewPerson {
    let updates = &event.updates;
    let mut last_operation: Map<String, Value> = updates
        .set_once
        .keys()
        .map(|key| (key.clone(), Value::from("set_once")))
        .collect();
    last_operation.extend(
        updates
            .set
            .keys()
            .map(|key| (key.clone(), Value::from("set"))),
    );
    NewPerson {
        uuid: uuid_from_distinct_id(event.team_id, distinct_id),
        team_id: event.team_id,
        created_at: event.timestamp,
        properties: initial_properties(&updates.set, &updates.set_once, &event.event_uuid),
        properties_last_operation: last_operation,
        is_identified,
    }
}

#[cfg(test)]
mod tests;
