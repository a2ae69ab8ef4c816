//! The embedded profile's person store: the same tables as Postgres, in process memory.
//!
//! A transaction holds the store's lock from `begin` to commit or drop, so transactions run
//! one at a time and never conflict; an undo log restores what a dropped transaction changed.
//! Persons live as long as the process, like the embedded profile's teams.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::store::{
    MovedDistinctId, NewPerson, Person, PersonStore, PersonStoreError, PersonTransaction,
    PersonVersion, SnapshotEntry, SnapshotKey,
};

#[derive(Default)]
pub struct MemoryPersonStore {
    tables: Arc<Mutex<Tables>>,
}

impl MemoryPersonStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[derive(Default)]
struct Tables {
    next_id: i64,
    persons: HashMap<i64, Person>,
    /// (team id, distinct id) → (person id, version).
    distinct_ids: HashMap<(i64, String), (i64, i64)>,
    /// person id → its distinct ids, so that a merge touches only the merged person's ids.
    owned: HashMap<i64, HashSet<(i64, String)>>,
}

impl Tables {
    /// Points `key` at `value` (or removes it), keeping `owned` in step; returns what it was.
    fn set_distinct_id(
        &mut self,
        key: (i64, String),
        value: Option<(i64, i64)>,
    ) -> Option<(i64, i64)> {
        let previous = match value {
            Some(value) => self.distinct_ids.insert(key.clone(), value),
            None => self.distinct_ids.remove(&key),
        };
        if let Some((person_id, _)) = previous
            && let Some(ids) = self.owned.get_mut(&person_id)
        {
            ids.remove(&key);
            if ids.is_empty() {
                self.owned.remove(&person_id);
            }
        }
        if let Some((person_id, _)) = value {
            self.owned.entry(person_id).or_default().insert(key);
        }
        previous
    }
}

/// How to take back one change.
enum Undo {
    Person(i64, Option<Person>),
    DistinctId((i64, String), Option<(i64, i64)>),
}

#[async_trait]
impl PersonStore for MemoryPersonStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn begin(&self) -> Result<Box<dyn PersonTransaction + '_>, PersonStoreError> {
        Ok(Box::new(MemoryTransaction {
            tables: Arc::clone(&self.tables).lock_owned().await,
            undo: Vec::new(),
        }))
    }

    async fn snapshot(
        &self,
        keys: &[SnapshotKey<'_>],
    ) -> Result<Vec<Option<SnapshotEntry>>, PersonStoreError> {
        let tables = self.tables.lock().await;
        Ok(keys
            .iter()
            .map(|key| {
                let (person_id, _) = tables
                    .distinct_ids
                    .get(&(key.team_id, key.distinct_id.to_owned()))?;
                let person = tables.persons.get(person_id)?;
                Some(if key.held == Some(PersonVersion::from(person)) {
                    SnapshotEntry::Held
                } else {
                    SnapshotEntry::Read(person.clone())
                })
            })
            .collect())
    }
}

struct MemoryTransaction {
    tables: OwnedMutexGuard<Tables>,
    undo: Vec<Undo>,
}

impl MemoryTransaction {
    fn put_person(&mut self, person: Person) {
        let previous = self.tables.persons.insert(person.id, person.clone());
        self.undo.push(Undo::Person(person.id, previous));
    }

    fn put_distinct_id(&mut self, key: (i64, String), value: (i64, i64)) {
        let previous = self.tables.set_distinct_id(key.clone(), Some(value));
        self.undo.push(Undo::DistinctId(key, previous));
    }
}

impl Drop for MemoryTransaction {
    fn drop(&mut self) {
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Person(id, Some(person)) => {
                    self.tables.persons.insert(id, person);
                }
                Undo::Person(id, None) => {
                    self.tables.persons.remove(&id);
                }
                Undo::DistinctId(key, value) => {
                    self.tables.set_distinct_id(key, value);
                }
            }
        }
    }
}

#[async_trait]
impl PersonTransaction for MemoryTransaction {
    async fn person_by_distinct_id(
        &mut self,
        team_id: i64,
        distinct_id: &str,
    ) -> Result<Option<Person>, PersonStoreError> {
        let key = (team_id, distinct_id.to_owned());
        Ok(self
            .tables
            .distinct_ids
            .get(&key)
            .and_then(|(person_id, _)| self.tables.persons.get(person_id))
            .cloned())
    }

    async fn create_person(
        &mut self,
        person: NewPerson,
        distinct_ids: &[&str],
    ) -> Result<Person, PersonStoreError> {
        for distinct_id in distinct_ids {
            if self
                .tables
                .distinct_ids
                .contains_key(&(person.team_id, (*distinct_id).to_owned()))
            {
                return Err(PersonStoreError::Conflict(format!(
                    "distinct id `{distinct_id}` already has a person"
                )));
            }
        }
        self.tables.next_id += 1;
        let created = person.stored(self.tables.next_id);
        self.put_person(created.clone());
        for distinct_id in distinct_ids {
            self.put_distinct_id(
                (created.team_id, (*distinct_id).to_owned()),
                (created.id, 0),
            );
        }
        Ok(created)
    }

    async fn add_distinct_id(
        &mut self,
        person: &Person,
        distinct_id: &str,
    ) -> Result<(), PersonStoreError> {
        let key = (person.team_id, distinct_id.to_owned());
        if self.tables.distinct_ids.contains_key(&key) {
            return Err(PersonStoreError::Conflict(format!(
                "distinct id `{distinct_id}` already has a person"
            )));
        }
        self.put_distinct_id(key, (person.id, 0));
        Ok(())
    }

    async fn update_person(&mut self, person: &Person) -> Result<Person, PersonStoreError> {
        let Some(stored) = self.tables.persons.get(&person.id) else {
            return Err(PersonStoreError::Conflict(format!(
                "person {} no longer exists",
                person.id
            )));
        };
        let updated = Person {
            version: stored.version + 1,
            ..person.clone()
        };
        self.put_person(updated.clone());
        Ok(updated)
    }

    async fn move_distinct_ids(
        &mut self,
        source: &Person,
        target: &Person,
    ) -> Result<Vec<MovedDistinctId>, PersonStoreError> {
        let owned: Vec<((i64, String), i64)> = self
            .tables
            .owned
            .get(&source.id)
            .into_iter()
            .flatten()
            .filter_map(|key| {
                let (_, version) = self.tables.distinct_ids.get(key)?;
                Some((key.clone(), *version))
            })
            .collect();
        let mut moved = Vec::with_capacity(owned.len());
        for (key, version) in owned {
            moved.push(MovedDistinctId {
                distinct_id: key.1.clone(),
                version: version + 1,
            });
            self.put_distinct_id(key, (target.id, version + 1));
        }
        Ok(moved)
    }

    async fn delete_person(&mut self, person: &Person) -> Result<(), PersonStoreError> {
        let previous = self.tables.persons.remove(&person.id);
        self.undo.push(Undo::Person(person.id, previous));
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), PersonStoreError> {
        self.undo.clear();
        Ok(())
    }
}
