//! Where persons live: `posthog_person` and `posthog_persondistinctid` in Postgres, or the
//! embedded profile's in-process store. Both are used through transactions, so that the rules
//! of [`super::state`] are written once and hold for both.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A `posthog_person` row as ingestion reads and writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    /// `posthog_person.id`, the key distinct ids point at.
    pub id: i64,
    /// The id events and ClickHouse know the person by.
    pub uuid: Uuid,
    pub team_id: i64,
    pub created_at: DateTime<Utc>,
    pub properties: Map<String, Value>,
    pub is_identified: bool,
    pub version: i64,
}

/// A person to insert: everything but the row id, which the store assigns.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPerson {
    pub uuid: Uuid,
    pub team_id: i64,
    pub created_at: DateTime<Utc>,
    pub properties: Map<String, Value>,
    /// Per key, `set` or `set_once`: PostHog's `properties_last_operation`.
    pub properties_last_operation: Map<String, Value>,
    pub is_identified: bool,
}

impl NewPerson {
    /// The person as stored under row id `id`, at version 0.
    pub fn stored(self, id: i64) -> Person {
        Person {
            id,
            uuid: self.uuid,
            team_id: self.team_id,
            created_at: self.created_at,
            properties: self.properties,
            is_identified: self.is_identified,
            version: 0,
        }
    }
}

/// What the reader of a snapshot already holds for one distinct id: the person row it points
/// at and that row's version. Every write of a person increments its version and a merge
/// re-points the id, so a match means the held copy is the stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersonVersion {
    pub id: i64,
    pub version: i64,
}

impl From<&Person> for PersonVersion {
    fn from(person: &Person) -> Self {
        Self {
            id: person.id,
            version: person.version,
        }
    }
}

/// One distinct id of a snapshot read, with what the reader holds of its person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotKey<'a> {
    pub team_id: i64,
    pub distinct_id: &'a str,
    pub held: Option<PersonVersion>,
}

/// A snapshot's answer for one distinct id that has a person.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotEntry {
    /// The held copy is current: the person was not sent again.
    Held,
    /// The person as stored (the reader held none, or an older one).
    Read(Person),
}

/// One person write of a batch (see [`PersonStore::write_batch`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PersonWrite {
    /// Store `person`'s properties, `is_identified` and `created_at`, provided its row is
    /// still at `person.version` (the version they were computed from).
    Update { distinct_id: String, person: Person },
    /// Create `person` owning `distinct_id`, provided the id still has no person.
    Create {
        distinct_id: String,
        person: NewPerson,
    },
}

/// What became of one [`PersonWrite`].
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    /// Written: the person's row id (assigned by the store for a new person) and its new
    /// version (0 for a new person). The caller holds the rest of what it wrote, so nothing
    /// is copied back.
    Stored(PersonVersion),
    /// Someone changed the person (or took the distinct id) first: nothing was written, and
    /// the caller applies its events again on what is stored now.
    Lost,
}

/// A distinct id moved to another person by a merge, with its new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedDistinctId {
    pub distinct_id: String,
    pub version: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PersonStoreError {
    /// Another transaction changed the same rows first (a unique key taken, a deadlock, a
    /// serialization failure). The whole person step for the event is retried.
    #[error("a concurrent change to the same person: {0}")]
    Conflict(String),
    /// The store cannot answer; the batch is retried later rather than its events stored
    /// without persons.
    #[error("cannot reach the person store (check DATABASE_URL): {0}")]
    Unavailable(String),
    /// The store refused this event's data (e.g. a distinct id longer than its column). Only
    /// this event is affected: it is dead-lettered.
    #[error("the person store refused the event: {0}")]
    Rejected(String),
}

/// Starts person transactions.
#[async_trait]
pub trait PersonStore: Send + Sync + 'static {
    /// For logs: `postgres` or `memory`.
    fn name(&self) -> &'static str;

    async fn begin(&self) -> Result<Box<dyn PersonTransaction + '_>, PersonStoreError>;

    /// The persons of a batch's distinct ids, read in one go without locks: a snapshot that
    /// tells which events would change nothing. One answer per key, in order (`None`: no
    /// person); a copy the reader holds that is still current is confirmed
    /// ([`SnapshotEntry::Held`]) rather than sent again, so a steady stream of the same users
    /// costs no property decoding.
    async fn snapshot(
        &self,
        keys: &[SnapshotKey<'_>],
    ) -> Result<Vec<Option<SnapshotEntry>>, PersonStoreError>;

    /// [`Self::snapshot`] for a reader holding nothing: the persons owning these pairs, all
    /// read in full. Ids without a person are absent from the answer.
    async fn persons_by_distinct_ids(
        &self,
        keys: &[(i64, String)],
    ) -> Result<HashMap<(i64, String), Person>, PersonStoreError> {
        let snapshot_keys: Vec<SnapshotKey<'_>> = keys
            .iter()
            .map(|(team_id, distinct_id)| SnapshotKey {
                team_id: *team_id,
                distinct_id,
                held: None,
            })
            .collect();
        let answers = self.snapshot(&snapshot_keys).await?;
        Ok(keys
            .iter()
            .zip(answers)
            .filter_map(|(key, answer)| match answer {
                Some(SnapshotEntry::Read(person)) => Some((key.clone(), person)),
                Some(SnapshotEntry::Held) | None => None,
            })
            .collect())
    }

    /// Writes many persons without holding locks across round trips: each write happens only
    /// if nobody changed its person since it was read (an optimistic check of the row's
    /// version, or of the distinct id still being free), so a write computed from a stale
    /// snapshot is [`WriteOutcome::Lost`], never applied. One answer per write, in order.
    ///
    /// A write the store refuses (a value too long for its column) is lost as well, with any
    /// others the store can only refuse together with it; what was stored is still reported
    /// as stored. An error means the store could not be reached.
    ///
    /// The default runs each write in its own transaction.
    async fn write_batch(
        &self,
        writes: &[PersonWrite],
    ) -> Result<Vec<WriteOutcome>, PersonStoreError> {
        let mut outcomes = Vec::with_capacity(writes.len());
        for write in writes {
            let mut transaction = self.begin().await?;
            let written = match write {
                PersonWrite::Update {
                    distinct_id,
                    person,
                } => match transaction
                    .person_by_distinct_id(person.team_id, distinct_id)
                    .await?
                {
                    Some(stored) if PersonVersion::from(&stored) == PersonVersion::from(person) => {
                        transaction.update_person(person).await
                    }
                    _ => Err(PersonStoreError::Conflict("changed since read".to_owned())),
                },
                PersonWrite::Create {
                    distinct_id,
                    person,
                } => {
                    transaction
                        .create_person(person.clone(), &[distinct_id.as_str()])
                        .await
                }
            };
            let outcome = match written {
                Ok(stored) => match transaction.commit().await {
                    Ok(()) => WriteOutcome::Stored(PersonVersion::from(&stored)),
                    Err(PersonStoreError::Conflict(_)) => WriteOutcome::Lost,
                    Err(error) => return Err(error),
                },
                // Dropping the transaction rolls it back. A refused write is lost too: the
                // caller's transaction path then finds the refusal and dead-letters its event.
                Err(PersonStoreError::Conflict(_) | PersonStoreError::Rejected(_)) => {
                    WriteOutcome::Lost
                }
                Err(error) => return Err(error),
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

/// One transaction. Reads lock what they return until commit, so a person read here is not
/// changed by anyone else before this transaction ends. Dropping it without `commit` rolls
/// back.
#[async_trait]
pub trait PersonTransaction: Send {
    /// The person owning `distinct_id` in `team_id`, locked.
    async fn person_by_distinct_id(
        &mut self,
        team_id: i64,
        distinct_id: &str,
    ) -> Result<Option<Person>, PersonStoreError>;

    /// Inserts a person and its distinct ids (version 0 each). A distinct id that already has
    /// a person is a [`PersonStoreError::Conflict`].
    async fn create_person(
        &mut self,
        person: NewPerson,
        distinct_ids: &[&str],
    ) -> Result<Person, PersonStoreError>;

    /// Points `distinct_id` at `person` (version 0). A taken id is a conflict.
    async fn add_distinct_id(
        &mut self,
        person: &Person,
        distinct_id: &str,
    ) -> Result<(), PersonStoreError>;

    /// Writes `properties`, `is_identified` and `created_at` of `person` and increments its
    /// version; returns the person as stored.
    async fn update_person(&mut self, person: &Person) -> Result<Person, PersonStoreError>;

    /// Moves every distinct id of `source` to `target`, incrementing each one's version, and
    /// hands `source`'s cohort memberships and feature-flag hash-key overrides to `target`.
    async fn move_distinct_ids(
        &mut self,
        source: &Person,
        target: &Person,
    ) -> Result<Vec<MovedDistinctId>, PersonStoreError>;

    /// Deletes a person that no longer owns any distinct id.
    async fn delete_person(&mut self, person: &Person) -> Result<(), PersonStoreError>;

    async fn commit(self: Box<Self>) -> Result<(), PersonStoreError>;
}

/// A store shared by the pipeline's tasks.
pub type SharedPersonStore = Arc<dyn PersonStore>;
