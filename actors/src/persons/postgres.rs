//! Persons in PostHog's Postgres tables, `posthog_person` and `posthog_persondistinctid`.
//!
//! Each transaction runs at READ COMMITTED on one pooled connection. Reads take row locks
//! (`FOR UPDATE`), so two instances working on the same person queue behind each other; a race
//! the locks cannot order (two inserts of the same new distinct id, a deadlock between two
//! merges) surfaces as a unique violation or deadlock error, which becomes
//! [`PersonStoreError::Conflict`] and a retry of the event's whole person step.
//!
//! `BEGIN` is not awaited on its own: it is sent in the same round trip as the first query,
//! which makes the common case (read a known person, commit) two round trips, not three.
//!
//! Outside transactions: the batch's snapshot read (one query for every distinct id) and its
//! batched writes (`UPDATE … FROM unnest(…)` checked against the version read, and one
//! transaction inserting new persons where their ids are still free); see
//! [`PersonStore::write_batch`].

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use serde_json::{Map, Value};
use tokio_postgres::types::{Json, ToSql};

use crate::postgres::Failure;

use super::store::{
    MovedDistinctId, NewPerson, Person, PersonStore, PersonStoreError, PersonTransaction,
    PersonVersion, PersonWrite, SnapshotEntry, SnapshotKey, WriteOutcome,
};

pub struct PostgresPersonStore {
    pool: Pool,
}

impl PostgresPersonStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl PersonStore for PostgresPersonStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn begin(&self) -> Result<Box<dyn PersonTransaction + '_>, PersonStoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|error| PersonStoreError::Unavailable(error.to_string()))?;
        Ok(Box::new(PostgresTransaction {
            client: Some(client),
            begun: false,
        }))
    }

    async fn write_batch(
        &self,
        writes: &[PersonWrite],
    ) -> Result<Vec<WriteOutcome>, PersonStoreError> {
        let mut outcomes = vec![WriteOutcome::Lost; writes.len()];
        if writes.is_empty() {
            return Ok(outcomes);
        }
        // Updates and creates touch different rows: both go at once. Each part is one
        // statement or transaction: when the store refuses it, none of its writes happened, so
        // they are lost and the caller applies them one by one.
        let (updated, created) =
            futures::join!(self.write_updates(writes), self.write_creates(writes));
        for part in [updated, created] {
            match part {
                Ok(stored) => {
                    for (n, version) in stored {
                        outcomes[n] = WriteOutcome::Stored(version);
                    }
                }
                Err(error @ PersonStoreError::Unavailable(_)) => return Err(error),
                Err(error) => {
                    tracing::debug!(%error, "batched person writes refused; the caller retries them one by one");
                }
            }
        }
        Ok(outcomes)
    }

    async fn snapshot(
        &self,
        keys: &[SnapshotKey<'_>],
    ) -> Result<Vec<Option<SnapshotEntry>>, PersonStoreError> {
        let mut answers = vec![None; keys.len()];
        if keys.is_empty() {
            return Ok(answers);
        }
        let read = |error: tokio_postgres::Error| PersonStoreError::Unavailable(error.to_string());
        for row in self.snapshot_rows(keys).await? {
            let position: i64 = row.try_get("n").map_err(read)?;
            let entry = if row.try_get("held").map_err(read)? {
                SnapshotEntry::Held
            } else {
                SnapshotEntry::Read(person_from_row(&row)?)
            };
            // Ordinality counts from 1.
            if let Some(answer) = usize::try_from(position - 1)
                .ok()
                .and_then(|index| answers.get_mut(index))
            {
                *answer = Some(entry);
            }
        }
        Ok(answers)
    }
}

impl PostgresPersonStore {
    /// The batch's updates, in person id order (so that two instances updating the same
    /// persons lock them in the same order). A person named twice is updated for its first
    /// write only; the other is lost and applied again by the caller.
    ///
    /// A large batch is cut into ranges of ids written at once on separate connections, so
    /// that Postgres spreads one batch's updates over its cores; each range is one statement,
    /// and a range the store refuses loses only its own writes.
    async fn write_updates(
        &self,
        writes: &[PersonWrite],
    ) -> Result<Vec<(usize, PersonVersion)>, PersonStoreError> {
        let mut updates: Vec<(usize, &Person)> = writes
            .iter()
            .enumerate()
            .filter_map(|(n, write)| match write {
                PersonWrite::Update { person, .. } => Some((n, person)),
                PersonWrite::Create { .. } => None,
            })
            .collect();
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        updates.sort_by_key(|(n, person)| (person.id, *n));
        updates.dedup_by_key(|(_, person)| person.id);
        let ranges = updates.chunks(UPDATE_RANGE);
        let written = futures::future::join_all(ranges.map(|range| self.update_range(range))).await;
        let mut stored = Vec::with_capacity(updates.len());
        for (range, written) in updates.chunks(UPDATE_RANGE).zip(written) {
            let versions = match written {
                Ok(versions) => versions,
                Err(error @ PersonStoreError::Unavailable(_)) => return Err(error),
                Err(error) => {
                    tracing::debug!(%error, "a range of person updates was refused; the caller retries them one by one");
                    continue;
                }
            };
            for (n, person) in range {
                if let Some(&version) = versions.get(&person.id) {
                    stored.push((
                        *n,
                        PersonVersion {
                            id: person.id,
                            version,
                        },
                    ));
                }
            }
        }
        Ok(stored)
    }

    /// One statement updating `range`: the new version of each person it wrote.
    async fn update_range(
        &self,
        range: &[(usize, &Person)],
    ) -> Result<HashMap<i64, i64>, PersonStoreError> {
        let ids: Vec<i64> = range.iter().map(|(_, person)| person.id).collect();
        let properties: Vec<Json<&Map<String, Value>>> = range
            .iter()
            .map(|(_, person)| Json(&person.properties))
            .collect();
        let identified: Vec<bool> = range.iter().map(|(_, p)| p.is_identified).collect();
        let created_at: Vec<DateTime<Utc>> = range.iter().map(|(_, p)| p.created_at).collect();
        let expected: Vec<i64> = range.iter().map(|(_, person)| person.version).collect();
        let rows = self
            .query_pooled(
                UPDATE_PERSONS,
                &[&ids, &properties, &identified, &created_at, &expected],
            )
            .await?;
        let read = |error: tokio_postgres::Error| PersonStoreError::Unavailable(error.to_string());
        let mut versions = HashMap::with_capacity(rows.len());
        for row in rows {
            versions.insert(
                row.try_get::<_, i64>("id").map_err(read)?,
                row.try_get::<_, i64>("version").map_err(read)?,
            );
        }
        Ok(versions)
    }

    /// The batch's new persons in one transaction: insert them all, point their distinct ids
    /// at them where the id is still free, and delete the persons whose id someone else took
    /// meanwhile (those writes are lost). Distinct ids are inserted in key order, so that two
    /// instances creating the same ids wait for each other instead of deadlocking.
    async fn write_creates(
        &self,
        writes: &[PersonWrite],
    ) -> Result<Vec<(usize, PersonVersion)>, PersonStoreError> {
        let mut creates: Vec<(usize, &str, &NewPerson)> = writes
            .iter()
            .enumerate()
            .filter_map(|(n, write)| match write {
                PersonWrite::Create {
                    distinct_id,
                    person,
                } => Some((n, distinct_id.as_str(), person)),
                PersonWrite::Update { .. } => None,
            })
            .collect();
        if creates.is_empty() {
            return Ok(Vec::new());
        }
        creates.sort_by(|a, b| (a.2.team_id, a.1, a.0).cmp(&(b.2.team_id, b.1, b.0)));
        creates.dedup_by(|a, b| (a.2.team_id, a.1) == (b.2.team_id, b.1));
        let mut teams = Vec::with_capacity(creates.len());
        for (_, _, person) in &creates {
            teams.push(team_column(person.team_id)?);
        }
        let uuids: Vec<uuid::Uuid> = creates.iter().map(|(_, _, p)| p.uuid).collect();
        let created_at: Vec<DateTime<Utc>> = creates.iter().map(|(_, _, p)| p.created_at).collect();
        let properties: Vec<Json<&Map<String, Value>>> = creates
            .iter()
            .map(|(_, _, p)| Json(&p.properties))
            .collect();
        let updated_at: Vec<Json<Map<String, Value>>> = creates
            .iter()
            .map(|(_, _, person)| Json(last_updated_at(person)))
            .collect();
        let last_operation: Vec<Json<&Map<String, Value>>> = creates
            .iter()
            .map(|(_, _, p)| Json(&p.properties_last_operation))
            .collect();
        let identified: Vec<bool> = creates.iter().map(|(_, _, p)| p.is_identified).collect();
        let distinct_ids: Vec<&str> = creates.iter().map(|(_, id, _)| *id).collect();

        let mut client = self
            .pool
            .get()
            .await
            .map_err(|error| PersonStoreError::Unavailable(error.to_string()))?;
        let transaction = client.transaction().await.map_err(classify)?;
        let insert = transaction
            .prepare_cached(INSERT_PERSONS)
            .await
            .map_err(classify)?;
        let read = |error: tokio_postgres::Error| PersonStoreError::Unavailable(error.to_string());
        let mut ids_by_uuid = HashMap::with_capacity(creates.len());
        for row in transaction
            .query(
                &insert,
                &[
                    &uuids,
                    &created_at,
                    &teams,
                    &properties,
                    &updated_at,
                    &last_operation,
                    &identified,
                ],
            )
            .await
            .map_err(classify)?
        {
            let id: i64 = row.try_get("id").map_err(read)?;
            let uuid: uuid::Uuid = row.try_get("uuid").map_err(read)?;
            ids_by_uuid.insert(uuid, id);
        }
        let mut person_ids = Vec::with_capacity(creates.len());
        for uuid in &uuids {
            person_ids.push(*ids_by_uuid.get(uuid).ok_or_else(|| {
                PersonStoreError::Unavailable("a new person got no id".to_owned())
            })?);
        }
        let link = transaction
            .prepare_cached(INSERT_DISTINCT_IDS)
            .await
            .map_err(classify)?;
        let mut linked = std::collections::HashSet::with_capacity(creates.len());
        for row in transaction
            .query(&link, &[&distinct_ids, &person_ids, &teams])
            .await
            .map_err(classify)?
        {
            linked.insert(row.try_get::<_, i64>("person_id").map_err(read)?);
        }
        let orphans: Vec<i64> = person_ids
            .iter()
            .copied()
            .filter(|id| !linked.contains(id))
            .collect();
        if !orphans.is_empty() {
            transaction
                .execute("DELETE FROM posthog_person WHERE id = ANY($1)", &[&orphans])
                .await
                .map_err(classify)?;
        }
        transaction.commit().await.map_err(classify)?;
        Ok(creates
            .into_iter()
            .zip(person_ids)
            .filter(|(_, id)| linked.contains(id))
            .map(|((n, _, _), id)| (n, PersonVersion { id, version: 0 }))
            .collect())
    }

    async fn snapshot_rows(
        &self,
        keys: &[SnapshotKey<'_>],
    ) -> Result<Vec<tokio_postgres::Row>, PersonStoreError> {
        let mut teams = Vec::with_capacity(keys.len());
        let mut ids = Vec::with_capacity(keys.len());
        let mut held_ids = Vec::with_capacity(keys.len());
        let mut held_versions = Vec::with_capacity(keys.len());
        for key in keys {
            teams.push(team_column(key.team_id)?);
            ids.push(key.distinct_id);
            held_ids.push(key.held.map(|held| held.id));
            held_versions.push(key.held.map(|held| held.version));
        }
        self.query_pooled(SELECT_SNAPSHOT, &[&teams, &ids, &held_ids, &held_versions])
            .await
    }

    /// One statement outside any transaction, on a pooled connection.
    async fn query_pooled(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PersonStoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|error| PersonStoreError::Unavailable(error.to_string()))?;
        let statement = client.prepare_cached(sql).await.map_err(classify)?;
        client.query(&statement, params).await.map_err(classify)
    }
}

/// [`PersonStore::snapshot`]'s read, one round trip for a whole batch: the keys are unnested
/// into rows (with their position) and joined on the (team_id, distinct_id) unique key; the
/// properties are left out (`held`) where the reader's copy is at the stored row and version.
const SELECT_SNAPSHOT: &str = "SELECT wanted.n, h.held, \
     p.id, p.uuid, p.team_id, p.created_at, \
     CASE WHEN h.held THEN NULL ELSE p.properties END AS properties, \
     p.is_identified, COALESCE(p.version, 0) AS version \
     FROM unnest($1::int4[], $2::text[], $3::int8[], $4::int8[]) WITH ORDINALITY \
       AS wanted(team_id, distinct_id, held_id, held_version, n) \
     JOIN posthog_persondistinctid d \
       ON d.team_id = wanted.team_id AND d.distinct_id = wanted.distinct_id \
     JOIN posthog_person p ON p.id = d.person_id \
     CROSS JOIN LATERAL (SELECT (p.id = wanted.held_id \
       AND COALESCE(p.version, 0) = wanted.held_version) IS TRUE AS held) h";

const SELECT_PERSON: &str = "SELECT p.id, p.uuid, p.team_id, p.created_at, p.properties, \
     p.is_identified, COALESCE(p.version, 0) AS version \
     FROM posthog_persondistinctid d JOIN posthog_person p ON p.id = d.person_id \
     WHERE d.team_id = $1 AND d.distinct_id = $2 \
     FOR UPDATE";

const INSERT_PERSON: &str = "INSERT INTO posthog_person \
     (uuid, created_at, team_id, properties, properties_last_updated_at, \
      properties_last_operation, is_identified, version) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, 0) RETURNING id";

/// [`INSERT_PERSON`] for many persons.
const INSERT_PERSONS: &str = "INSERT INTO posthog_person \
     (uuid, created_at, team_id, properties, properties_last_updated_at, \
      properties_last_operation, is_identified, version) \
     SELECT u.uuid, u.created_at, u.team_id, u.properties, u.updated_at, u.last_operation, \
       u.is_identified, 0 \
     FROM unnest($1::uuid[], $2::timestamptz[], $3::int4[], $4::jsonb[], $5::jsonb[], \
       $6::jsonb[], $7::bool[]) \
       AS u(uuid, created_at, team_id, properties, updated_at, last_operation, is_identified) \
     RETURNING id, uuid";

/// Each id only where it has no person yet: the rows returned are the ids now linked.
const INSERT_DISTINCT_IDS: &str = "INSERT INTO posthog_persondistinctid \
     (distinct_id, person_id, team_id, version) \
     SELECT u.distinct_id, u.person_id, u.team_id, 0 \
     FROM unnest($1::text[], $2::int8[], $3::int4[]) AS u(distinct_id, person_id, team_id) \
     ON CONFLICT DO NOTHING RETURNING person_id";

/// Person updates per statement: a batch of 10,000 changed persons is four statements, run at
/// once on four connections.
const UPDATE_RANGE: usize = 2_500;

/// [`UPDATE_PERSON`] for many persons, each only at the version its write was computed from.
const UPDATE_PERSONS: &str = "UPDATE posthog_person p \
     SET properties = u.properties, is_identified = u.is_identified, created_at = u.created_at, \
         version = COALESCE(p.version, 0) + 1 \
     FROM unnest($1::int8[], $2::jsonb[], $3::bool[], $4::timestamptz[], $5::int8[]) \
       AS u(id, properties, is_identified, created_at, expected) \
     WHERE p.id = u.id AND COALESCE(p.version, 0) = u.expected \
     RETURNING p.id, p.version";

const INSERT_DISTINCT_ID: &str = "INSERT INTO posthog_persondistinctid \
     (distinct_id, person_id, team_id, version) VALUES ($1, $2, $3, 0)";

const UPDATE_PERSON: &str = "UPDATE posthog_person \
     SET properties = $2, is_identified = $3, created_at = $4, \
         version = COALESCE(version, 0) + 1 \
     WHERE id = $1 RETURNING version";

const MOVE_DISTINCT_IDS: &str = "UPDATE posthog_persondistinctid \
     SET person_id = $1, version = COALESCE(version, 0) + 1 \
     WHERE person_id = $2 RETURNING distinct_id, version";

const MOVE_COHORTS: &str = "UPDATE posthog_cohortpeople SET person_id = $1 WHERE person_id = $2";

/// The target keeps its own override where both people have one for the same flag, as in
/// PostHog; the source's rows go, since they would block deleting the source.
const COPY_FLAG_OVERRIDES: &str = "INSERT INTO posthog_featureflaghashkeyoverride \
     (team_id, person_id, feature_flag_key, hash_key) \
     SELECT team_id, $1, feature_flag_key, hash_key \
     FROM posthog_featureflaghashkeyoverride WHERE person_id = $2 \
     ON CONFLICT DO NOTHING";

const DELETE_FLAG_OVERRIDES: &str =
    "DELETE FROM posthog_featureflaghashkeyoverride WHERE person_id = $1";

const DELETE_PERSON: &str = "DELETE FROM posthog_person WHERE id = $1";

struct PostgresTransaction {
    /// Taken by `commit`; still here on drop means roll back.
    client: Option<Object>,
    begun: bool,
}

impl PostgresTransaction {
    fn client(&self) -> Result<&Object, PersonStoreError> {
        self.client
            .as_ref()
            .ok_or_else(|| PersonStoreError::Unavailable("the transaction has ended".to_owned()))
    }

    /// Runs a statement, sending `BEGIN` ahead of it in the same round trip if the transaction
    /// has not started yet.
    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PersonStoreError> {
        let begin = !self.begun;
        self.begun = true;
        let client = self.client()?;
        let statement = client.prepare_cached(sql).await.map_err(classify)?;
        if begin {
            let (began, rows) = futures::join!(
                client.batch_execute("BEGIN"),
                client.query(&statement, params)
            );
            began.map_err(classify)?;
            rows.map_err(classify)
        } else {
            client.query(&statement, params).await.map_err(classify)
        }
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.begun {
            return;
        }
        // The connection goes back to the pool only once it is out of the transaction.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        drop(Object::take(client));
                    }
                });
            }
            Err(_) => drop(Object::take(client)),
        }
    }
}

/// Sorts a Postgres error into the three outcomes the person step handles differently.
fn classify(error: tokio_postgres::Error) -> PersonStoreError {
    match crate::postgres::classify(&error) {
        (Failure::Conflict, message) => PersonStoreError::Conflict(message),
        (Failure::Rejected, message) => PersonStoreError::Rejected(message),
        (Failure::Unavailable, message) => PersonStoreError::Unavailable(message),
    }
}

fn team_column(team_id: i64) -> Result<i32, PersonStoreError> {
    crate::postgres::team_column(team_id)
        .map_err(|error| PersonStoreError::Rejected(error.to_string()))
}

/// PostHog's `properties_last_updated_at` of a new person: every key at its creation time.
fn last_updated_at(person: &NewPerson) -> Map<String, Value> {
    let at = Value::String(person.created_at.to_rfc3339());
    person
        .properties
        .keys()
        .map(|key| (key.clone(), at.clone()))
        .collect()
}

fn person_from_row(row: &tokio_postgres::Row) -> Result<Person, PersonStoreError> {
    let read = |error: tokio_postgres::Error| PersonStoreError::Unavailable(error.to_string());
    let Json(properties): Json<Value> = row.try_get("properties").map_err(read)?;
    Ok(Person {
        id: row.try_get("id").map_err(read)?,
        uuid: row.try_get("uuid").map_err(read)?,
        team_id: i64::from(row.try_get::<_, i32>("team_id").map_err(read)?),
        created_at: row.try_get("created_at").map_err(read)?,
        // PostHog's column is jsonb NOT NULL; anything but an object is treated as empty.
        properties: match properties {
            Value::Object(map) => map,
            _ => Map::new(),
        },
        is_identified: row.try_get("is_identified").map_err(read)?,
        version: row.try_get("version").map_err(read)?,
    })
}

#[async_trait]
impl PersonTransaction for PostgresTransaction {
    async fn person_by_distinct_id(
        &mut self,
        team_id: i64,
        distinct_id: &str,
    ) -> Result<Option<Person>, PersonStoreError> {
        let team = team_column(team_id)?;
        let rows = self.query(SELECT_PERSON, &[&team, &distinct_id]).await?;
        rows.first().map(person_from_row).transpose()
    }

    async fn create_person(
        &mut self,
        person: NewPerson,
        distinct_ids: &[&str],
    ) -> Result<Person, PersonStoreError> {
        let team = team_column(person.team_id)?;
        let updated_at = last_updated_at(&person);
        let rows = self
            .query(
                INSERT_PERSON,
                &[
                    &person.uuid,
                    &person.created_at,
                    &team,
                    &Json(&person.properties),
                    &Json(&updated_at),
                    &Json(&person.properties_last_operation),
                    &person.is_identified,
                ],
            )
            .await?;
        let id: i64 = rows
            .first()
            .ok_or_else(|| PersonStoreError::Unavailable("INSERT returned no id".to_owned()))?
            .try_get("id")
            .map_err(|error| PersonStoreError::Unavailable(error.to_string()))?;
        for distinct_id in distinct_ids {
            self.query(INSERT_DISTINCT_ID, &[distinct_id, &id, &team])
                .await?;
        }
        Ok(person.stored(id))
    }

    async fn add_distinct_id(
        &mut self,
        person: &Person,
        distinct_id: &str,
    ) -> Result<(), PersonStoreError> {
        let team = team_column(person.team_id)?;
        self.query(INSERT_DISTINCT_ID, &[&distinct_id, &person.id, &team])
            .await?;
        Ok(())
    }

    async fn update_person(&mut self, person: &Person) -> Result<Person, PersonStoreError> {
        let rows = self
            .query(
                UPDATE_PERSON,
                &[
                    &person.id,
                    &Json(&person.properties),
                    &person.is_identified,
                    &person.created_at,
                ],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(PersonStoreError::Conflict(format!(
                "person {} was deleted meanwhile",
                person.id
            )));
        };
        let version: i64 = row
            .try_get("version")
            .map_err(|error| PersonStoreError::Unavailable(error.to_string()))?;
        Ok(Person {
            version,
            ..person.clone()
        })
    }

    async fn move_distinct_ids(
        &mut self,
        source: &Person,
        target: &Person,
    ) -> Result<Vec<MovedDistinctId>, PersonStoreError> {
        let rows = self
            .query(MOVE_DISTINCT_IDS, &[&target.id, &source.id])
            .await?;
        self.query(MOVE_COHORTS, &[&target.id, &source.id]).await?;
        self.query(COPY_FLAG_OVERRIDES, &[&target.id, &source.id])
            .await?;
        self.query(DELETE_FLAG_OVERRIDES, &[&source.id]).await?;
        rows.iter()
            .map(|row| {
                Ok(MovedDistinctId {
                    distinct_id: row
                        .try_get("distinct_id")
                        .map_err(|error| PersonStoreError::Unavailable(error.to_string()))?,
                    version: row
                        .try_get("version")
                        .map_err(|error| PersonStoreError::Unavailable(error.to_string()))?,
                })
            })
            .collect()
    }

    async fn delete_person(&mut self, person: &Person) -> Result<(), PersonStoreError> {
        self.query(DELETE_PERSON, &[&person.id]).await?;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), PersonStoreError> {
        let Some(client) = self.client.take() else {
            return Ok(());
        };
        if self.begun {
            client.batch_execute("COMMIT").await.map_err(classify)?;
        }
        Ok(())
    }
}
