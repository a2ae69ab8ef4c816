//! The embedded profile's person store: persons and their distinct ids in the embedded SQLite
//! database (see [`crate::sqlite`]), with the same transactions and answers as Postgres.
//!
//! A transaction holds the database's one connection from `begin` to commit or drop
//! (`BEGIN IMMEDIATE`, so its reads are as good as locked: no other writer can come between),
//! and a batch of writes is one transaction, so one fsync per batch.

use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Map, Value};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use super::rows::properties_json;
use super::store::{
    MovedDistinctId, NewPerson, Person, PersonStore, PersonStoreError, PersonTransaction,
    PersonVersion, PersonWrite, SnapshotEntry, SnapshotKey, WriteOutcome,
};
use crate::sqlite::Sqlite;

pub struct SqlitePersonStore {
    database: Sqlite,
}

impl SqlitePersonStore {
    pub fn new(database: Sqlite) -> Self {
        Self { database }
    }

    async fn transaction(&self) -> Result<SqliteTransaction, PersonStoreError> {
        let connection = self.database.lock_owned().await;
        connection
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(classify)?;
        Ok(SqliteTransaction {
            connection,
            finished: false,
        })
    }
}

const PERSON_BY_DISTINCT_ID: &str = "SELECT p.id, p.uuid, p.team_id, p.created_at, \
     p.properties, p.is_identified, p.version FROM person_distinct_ids d \
     JOIN persons p ON p.id = d.person_id WHERE d.team_id = ?1 AND d.distinct_id = ?2";

/// A constraint (a distinct id taken) is a race another writer won; anything else means the
/// store cannot answer now.
fn classify(error: rusqlite::Error) -> PersonStoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => {
            PersonStoreError::Conflict(error.to_string())
        }
        Some(rusqlite::ErrorCode::TooBig) => PersonStoreError::Rejected(error.to_string()),
        _ => PersonStoreError::Unavailable(error.to_string()),
    }
}

fn read_person(row: &Row<'_>) -> rusqlite::Result<Person> {
    let bad = |index, error: String| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, error.into())
    };
    let uuid: String = row.get(1)?;
    let created_at: String = row.get(3)?;
    let properties: String = row.get(4)?;
    Ok(Person {
        id: row.get(0)?,
        uuid: Uuid::from_str(&uuid).map_err(|error| bad(1, error.to_string()))?,
        team_id: row.get(2)?,
        created_at: DateTime::parse_from_rfc3339(&created_at)
            .map_err(|error| bad(3, error.to_string()))?
            .with_timezone(&Utc),
        properties: serde_json::from_str::<Map<String, Value>>(&properties)
            .map_err(|error| bad(4, error.to_string()))?,
        is_identified: row.get(5)?,
        version: row.get(6)?,
    })
}

fn person_by_distinct_id(
    connection: &Connection,
    team_id: i64,
    distinct_id: &str,
) -> rusqlite::Result<Option<Person>> {
    connection
        .prepare_cached(PERSON_BY_DISTINCT_ID)?
        .query_row(params![team_id, distinct_id], read_person)
        .optional()
}

/// The snapshot's answer for one key, in one query: a held copy that is still current is
/// confirmed without decoding the person, as the trait promises for a steady stream of the
/// same users.
fn snapshot_entry(
    connection: &Connection,
    key: &SnapshotKey<'_>,
) -> rusqlite::Result<Option<SnapshotEntry>> {
    connection
        .prepare_cached(PERSON_BY_DISTINCT_ID)?
        .query_row(params![key.team_id, key.distinct_id], |row| {
            let stored = PersonVersion {
                id: row.get(0)?,
                version: row.get(6)?,
            };
            if key.held == Some(stored) {
                return Ok(SnapshotEntry::Held);
            }
            read_person(row).map(SnapshotEntry::Read)
        })
        .optional()
}

/// Which person row (and version) `distinct_id` points at, without reading the person: what a
/// version check needs, minus decoding the properties.
fn version_of(
    connection: &Connection,
    team_id: i64,
    distinct_id: &str,
) -> rusqlite::Result<Option<PersonVersion>> {
    connection
        .prepare_cached(
            "SELECT p.id, p.version FROM person_distinct_ids d \
             JOIN persons p ON p.id = d.person_id WHERE d.team_id = ?1 AND d.distinct_id = ?2",
        )?
        .query_row(params![team_id, distinct_id], |row| {
            Ok(PersonVersion {
                id: row.get(0)?,
                version: row.get(1)?,
            })
        })
        .optional()
}

fn distinct_id_taken(
    connection: &Connection,
    team_id: i64,
    distinct_id: &str,
) -> rusqlite::Result<bool> {
    connection
        .prepare_cached(
            "SELECT 1 FROM person_distinct_ids WHERE team_id = ?1 AND distinct_id = ?2",
        )?
        .exists(params![team_id, distinct_id])
}

fn insert_person(
    connection: &Connection,
    person: NewPerson,
    distinct_ids: &[&str],
) -> Result<Person, PersonStoreError> {
    for distinct_id in distinct_ids {
        if distinct_id_taken(connection, person.team_id, distinct_id).map_err(classify)? {
            return Err(PersonStoreError::Conflict(format!(
                "distinct id `{distinct_id}` already has a person"
            )));
        }
    }
    let properties = properties_json(&person.properties);
    let last_operation = properties_json(&person.properties_last_operation);
    connection
        .prepare_cached(
            "INSERT INTO persons (uuid, team_id, created_at, properties, \
             properties_last_operation, is_identified, version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
        )
        .and_then(|mut insert| {
            insert.execute(params![
                person.uuid.to_string(),
                person.team_id,
                person.created_at.to_rfc3339(),
                properties,
                last_operation,
                person.is_identified,
            ])
        })
        .map_err(classify)?;
    let created = person.stored(connection.last_insert_rowid());
    for distinct_id in distinct_ids {
        insert_distinct_id(connection, &created, distinct_id)?;
    }
    Ok(created)
}

fn insert_distinct_id(
    connection: &Connection,
    person: &Person,
    distinct_id: &str,
) -> Result<(), PersonStoreError> {
    connection
        .prepare_cached(
            "INSERT INTO person_distinct_ids (team_id, distinct_id, person_id, version) \
             VALUES (?1, ?2, ?3, 0)",
        )
        .and_then(|mut insert| insert.execute(params![person.team_id, distinct_id, person.id]))
        .map(drop)
        .map_err(classify)
}

/// Writes the person's properties, `is_identified` and `created_at`, provided its row is at
/// `expected` (any version when `None`); `None` when it is not (or is gone).
fn update_person(
    connection: &Connection,
    person: &Person,
    expected: Option<i64>,
) -> Result<Option<Person>, PersonStoreError> {
    let version: Option<i64> = connection
        .prepare_cached(
            "UPDATE persons SET properties = ?1, is_identified = ?2, created_at = ?3, \
             version = version + 1 WHERE id = ?4 AND (?5 IS NULL OR version = ?5) \
             RETURNING version",
        )
        .and_then(|mut update| {
            update
                .query_row(
                    params![
                        properties_json(&person.properties),
                        person.is_identified,
                        person.created_at.to_rfc3339(),
                        person.id,
                        expected,
                    ],
                    |row| row.get(0),
                )
                .optional()
        })
        .map_err(classify)?;
    Ok(version.map(|version| Person {
        version,
        ..person.clone()
    }))
}

#[async_trait]
impl PersonStore for SqlitePersonStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn begin(&self) -> Result<Box<dyn PersonTransaction + '_>, PersonStoreError> {
        Ok(Box::new(self.transaction().await?))
    }

    async fn snapshot(
        &self,
        keys: &[SnapshotKey<'_>],
    ) -> Result<Vec<Option<SnapshotEntry>>, PersonStoreError> {
        let connection = self.database.lock().await;
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            answers.push(snapshot_entry(&connection, key).map_err(classify)?);
        }
        Ok(answers)
    }

    /// One transaction for the whole batch (one fsync): each write is checked against what is
    /// stored now and applied, or lost.
    async fn write_batch(
        &self,
        writes: &[PersonWrite],
    ) -> Result<Vec<WriteOutcome>, PersonStoreError> {
        let mut transaction = self.transaction().await?;
        let mut outcomes = Vec::with_capacity(writes.len());
        for write in writes {
            let outcome = match write {
                PersonWrite::Update {
                    distinct_id,
                    person,
                } => transaction.conditional_update(distinct_id, person)?,
                PersonWrite::Create {
                    distinct_id,
                    person,
                } => match transaction
                    .create_person(person.clone(), &[distinct_id.as_str()])
                    .await
                {
                    Ok(stored) => WriteOutcome::Stored(PersonVersion::from(&stored)),
                    Err(PersonStoreError::Conflict(_) | PersonStoreError::Rejected(_)) => {
                        WriteOutcome::Lost
                    }
                    Err(error) => return Err(error),
                },
            };
            outcomes.push(outcome);
        }
        Box::new(transaction).commit().await?;
        Ok(outcomes)
    }
}

struct SqliteTransaction {
    connection: OwnedMutexGuard<Connection>,
    finished: bool,
}

impl SqliteTransaction {
    /// An update computed from `person` at its version, applied only if the distinct id still
    /// points at that person at that version.
    fn conditional_update(
        &mut self,
        distinct_id: &str,
        person: &Person,
    ) -> Result<WriteOutcome, PersonStoreError> {
        let stored = version_of(&self.connection, person.team_id, distinct_id).map_err(classify)?;
        if stored != Some(PersonVersion::from(person)) {
            return Ok(WriteOutcome::Lost);
        }
        Ok(
            match update_person(&self.connection, person, Some(person.version)) {
                Ok(Some(stored)) => WriteOutcome::Stored(PersonVersion::from(&stored)),
                Ok(None) | Err(PersonStoreError::Conflict(_) | PersonStoreError::Rejected(_)) => {
                    WriteOutcome::Lost
                }
                Err(error) => return Err(error),
            },
        )
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        if !self.finished
            && let Err(error) = self.connection.execute_batch("ROLLBACK")
        {
            tracing::warn!(%error, "embedded person transaction not rolled back");
        }
    }
}

#[async_trait]
impl PersonTransaction for SqliteTransaction {
    async fn person_by_distinct_id(
        &mut self,
        team_id: i64,
        distinct_id: &str,
    ) -> Result<Option<Person>, PersonStoreError> {
        person_by_distinct_id(&self.connection, team_id, distinct_id).map_err(classify)
    }

    async fn create_person(
        &mut self,
        person: NewPerson,
        distinct_ids: &[&str],
    ) -> Result<Person, PersonStoreError> {
        insert_person(&self.connection, person, distinct_ids)
    }

    async fn add_distinct_id(
        &mut self,
        person: &Person,
        distinct_id: &str,
    ) -> Result<(), PersonStoreError> {
        if distinct_id_taken(&self.connection, person.team_id, distinct_id).map_err(classify)? {
            return Err(PersonStoreError::Conflict(format!(
                "distinct id `{distinct_id}` already has a person"
            )));
        }
        insert_distinct_id(&self.connection, person, distinct_id)
    }

    async fn update_person(&mut self, person: &Person) -> Result<Person, PersonStoreError> {
        update_person(&self.connection, person, None)?.ok_or_else(|| {
            PersonStoreError::Conflict(format!("person {} no longer exists", person.id))
        })
    }

    async fn move_distinct_ids(
        &mut self,
        source: &Person,
        target: &Person,
    ) -> Result<Vec<MovedDistinctId>, PersonStoreError> {
        let mut moved = Vec::new();
        let mut statement = self
            .connection
            .prepare_cached(
                "UPDATE person_distinct_ids SET person_id = ?1, version = version + 1 \
                 WHERE person_id = ?2 RETURNING distinct_id, version",
            )
            .map_err(classify)?;
        let mut rows = statement
            .query(params![target.id, source.id])
            .map_err(classify)?;
        while let Some(row) = rows.next().map_err(classify)? {
            moved.push(MovedDistinctId {
                distinct_id: row.get(0).map_err(classify)?,
                version: row.get(1).map_err(classify)?,
            });
        }
        Ok(moved)
    }

    async fn delete_person(&mut self, person: &Person) -> Result<(), PersonStoreError> {
        self.connection
            .execute("DELETE FROM persons WHERE id = ?1", params![person.id])
            .map(drop)
            .map_err(classify)
    }

    async fn commit(mut self: Box<Self>) -> Result<(), PersonStoreError> {
        self.connection.execute_batch("COMMIT").map_err(classify)?;
        self.finished = true;
        Ok(())
    }
}
