//! Groups in PostHog's Postgres tables, `posthog_grouptypemapping` and `posthog_group`.
//!
//! Every change is one statement, so concurrent instances need no transaction or lock:
//! - a new group type is inserted at the lowest free index with `ON CONFLICT DO NOTHING`;
//!   whoever loses the race reads the winner's index, or tries the next free one;
//! - an upsert merges `$group_set` into the stored properties inside Postgres (`jsonb ||`),
//!   so two instances updating one group each keep the other's keys. PostHog reads the row,
//!   merges in JavaScript and writes the whole object back in a transaction, retrying on
//!   a race; the single statement does the same in one round trip.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use serde_json::{Map, Value};
use tokio_postgres::types::Json;

use crate::postgres::Failure;

use super::store::{
    BatchUpserted, Group, GroupKey, GroupStore, GroupStoreError, GroupUpsert, MAX_GROUP_TYPES,
    Upserted, upsert_one_by_one,
};

pub struct PostgresGroupStore {
    pool: Pool,
}

impl PostgresGroupStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn client(&self) -> Result<Object, GroupStoreError> {
        self.pool
            .get()
            .await
            .map_err(|error| GroupStoreError::Unavailable(error.to_string()))
    }
}

const SELECT_GROUP_TYPES: &str =
    "SELECT group_type, group_type_index FROM posthog_grouptypemapping WHERE team_id = $1";

/// Inserts nothing when the type exists, when all indexes are taken, or when another
/// instance took the chosen index a moment earlier; the caller then looks again.
const INSERT_GROUP_TYPE: &str = "INSERT INTO posthog_grouptypemapping \
     (team_id, group_type, group_type_index) \
     SELECT $1, $2, min(candidate) FROM generate_series(0, $3 - 1) AS candidate \
     WHERE candidate NOT IN \
       (SELECT group_type_index FROM posthog_grouptypemapping WHERE team_id = $1) \
     HAVING min(candidate) IS NOT NULL \
     ON CONFLICT DO NOTHING \
     RETURNING group_type_index";

const SELECT_GROUP_TYPE: &str = "SELECT group_type_index FROM posthog_grouptypemapping \
     WHERE team_id = $1 AND group_type = $2";

/// One round trip for a whole batch: the keys are unnested into rows and joined on the
/// (team_id, group_key, group_type_index) unique key.
const SELECT_GROUPS: &str = "SELECT g.team_id, g.group_type_index, g.group_key, \
     g.group_properties, g.created_at, g.version \
     FROM unnest($1::int4[], $2::int4[], $3::text[]) AS wanted(team_id, group_type_index, group_key) \
     JOIN posthog_group g ON g.team_id = wanted.team_id \
       AND g.group_type_index = wanted.group_type_index AND g.group_key = wanted.group_key";

/// Upserts groups, one row each, unnested in the order given (sorted, so that instances writing
/// overlapping batches lock rows in one order and cannot deadlock). Returns a row only when it
/// was written: inserted, or changed by the merge or by an earlier creation time. An update
/// that would change nothing is skipped by the WHERE, so it bumps no version and sends
/// ClickHouse nothing.
const UPSERT_GROUPS: &str = "INSERT INTO posthog_group AS g \
     (team_id, group_key, group_type_index, group_properties, created_at, \
      properties_last_updated_at, properties_last_operation, version) \
     SELECT u.team_id, u.group_key, u.group_type_index, u.group_properties, u.created_at, \
       '{}', '{}', 1 \
     FROM unnest($1::int4[], $2::text[], $3::int4[], $4::jsonb[], $5::timestamptz[]) \
       AS u(team_id, group_key, group_type_index, group_properties, created_at) \
     ON CONFLICT (team_id, group_key, group_type_index) DO UPDATE \
     SET group_properties = g.group_properties || EXCLUDED.group_properties, \
         created_at = LEAST(g.created_at, EXCLUDED.created_at), \
         version = g.version + 1 \
     WHERE g.group_properties || EXCLUDED.group_properties <> g.group_properties \
        OR EXCLUDED.created_at < g.created_at \
     RETURNING g.team_id, g.group_type_index, g.group_key, g.group_properties, \
       g.created_at, g.version";

const SELECT_GROUP: &str = "SELECT team_id, group_type_index, group_key, group_properties, \
     created_at, version FROM posthog_group \
     WHERE team_id = $1 AND group_type_index = $2 AND group_key = $3";

/// Races for a new type's index that one caller can lose in a row before giving up; each
/// loss means another type took an index, and there are only five.
const ADD_TYPE_ATTEMPTS: usize = MAX_GROUP_TYPES as usize + 1;

#[async_trait]
impl GroupStore for PostgresGroupStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn group_types(&self, team_id: i64) -> Result<HashMap<String, u8>, GroupStoreError> {
        let team = team_column(team_id)?;
        let client = self.client().await?;
        let statement = client
            .prepare_cached(SELECT_GROUP_TYPES)
            .await
            .map_err(classify)?;
        let rows = client.query(&statement, &[&team]).await.map_err(classify)?;
        let mut types = HashMap::with_capacity(rows.len());
        for row in &rows {
            let group_type: String = row.try_get("group_type").map_err(read)?;
            let index: i32 = row.try_get("group_type_index").map_err(read)?;
            // An index outside 0..5 (edited by hand) has no column: ignored.
            if let Ok(index) = u8::try_from(index)
                && index < MAX_GROUP_TYPES
            {
                types.insert(group_type, index);
            }
        }
        Ok(types)
    }

    async fn add_group_type(
        &self,
        team_id: i64,
        group_type: &str,
    ) -> Result<Option<u8>, GroupStoreError> {
        let team = team_column(team_id)?;
        let slots = i32::from(MAX_GROUP_TYPES);
        let client = self.client().await?;
        let insert = client
            .prepare_cached(INSERT_GROUP_TYPE)
            .await
            .map_err(classify)?;
        let select = client
            .prepare_cached(SELECT_GROUP_TYPE)
            .await
            .map_err(classify)?;
        for _ in 0..ADD_TYPE_ATTEMPTS {
            let inserted = client
                .query_opt(&insert, &[&team, &group_type, &slots])
                .await
                .map_err(classify)?;
            let existing = match inserted {
                Some(row) => Some(row),
                None => client
                    .query_opt(&select, &[&team, &group_type])
                    .await
                    .map_err(classify)?,
            };
            if let Some(row) = existing {
                let index: i32 = row.try_get("group_type_index").map_err(read)?;
                return Ok(u8::try_from(index)
                    .ok()
                    .filter(|index| *index < MAX_GROUP_TYPES));
            }
            let taken = self.group_types(team_id).await?;
            if taken.len() >= usize::from(MAX_GROUP_TYPES) {
                return Ok(None);
            }
        }
        Err(GroupStoreError::Unavailable(format!(
            "group type {group_type:?} of team {team_id} lost {ADD_TYPE_ATTEMPTS} races for an index"
        )))
    }

    async fn groups(&self, keys: &[GroupKey]) -> Result<HashMap<GroupKey, Group>, GroupStoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut teams = Vec::with_capacity(keys.len());
        let mut indexes = Vec::with_capacity(keys.len());
        let mut group_keys = Vec::with_capacity(keys.len());
        for key in keys {
            teams.push(team_column(key.team_id)?);
            indexes.push(i32::from(key.group_type_index));
            group_keys.push(key.group_key.as_str());
        }
        let client = self.client().await?;
        let statement = client
            .prepare_cached(SELECT_GROUPS)
            .await
            .map_err(classify)?;
        let rows = client
            .query(&statement, &[&teams, &indexes, &group_keys])
            .await
            .map_err(classify)?;
        rows.iter()
            .map(|row| {
                let group = group_from_row(row)?;
                Ok((group.key.clone(), group))
            })
            .collect()
    }

    async fn upsert(
        &self,
        key: &GroupKey,
        set: &Map<String, Value>,
        timestamp: DateTime<Utc>,
    ) -> Result<Upserted, GroupStoreError> {
        // The batch statement with one row; a group it left unchanged is read back.
        let one = [GroupUpsert {
            key: key.clone(),
            set: set.clone(),
            timestamp,
        }];
        if let Some(Ok(Some(group))) = self.upsert_in_one_statement(&one).await?.pop() {
            return Ok(Upserted {
                group,
                written: true,
            });
        }
        let team = team_column(key.team_id)?;
        let index = i32::from(key.group_type_index);
        let client = self.client().await?;
        let select = client
            .prepare_cached(SELECT_GROUP)
            .await
            .map_err(classify)?;
        let row = client
            .query_one(&select, &[&team, &index, &key.group_key])
            .await
            .map_err(classify)?;
        Ok(Upserted {
            group: group_from_row(&row)?,
            written: false,
        })
    }

    /// One statement for the whole batch. A statement fails as a whole, so when the store
    /// refuses some group's data the groups are upserted one by one to find which.
    async fn upsert_batch(
        &self,
        upserts: &[GroupUpsert],
    ) -> Result<Vec<BatchUpserted>, GroupStoreError> {
        if upserts.is_empty() {
            return Ok(Vec::new());
        }
        match self.upsert_in_one_statement(upserts).await {
            Err(GroupStoreError::Rejected(_)) => upsert_one_by_one(self, upserts).await,
            answered => answered,
        }
    }
}

impl PostgresGroupStore {
    /// All of `upserts` in one statement: every group written, or (on any error) none.
    async fn upsert_in_one_statement(
        &self,
        upserts: &[GroupUpsert],
    ) -> Result<Vec<BatchUpserted>, GroupStoreError> {
        let mut order: Vec<usize> = (0..upserts.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&upserts[a].key, &upserts[b].key);
            (a.team_id, a.group_type_index, &a.group_key).cmp(&(
                b.team_id,
                b.group_type_index,
                &b.group_key,
            ))
        });
        let mut teams = Vec::with_capacity(upserts.len());
        let mut group_keys = Vec::with_capacity(upserts.len());
        let mut indexes = Vec::with_capacity(upserts.len());
        let mut sets = Vec::with_capacity(upserts.len());
        let mut timestamps = Vec::with_capacity(upserts.len());
        for &position in &order {
            let upsert = &upserts[position];
            teams.push(team_column(upsert.key.team_id)?);
            group_keys.push(upsert.key.group_key.as_str());
            indexes.push(i32::from(upsert.key.group_type_index));
            sets.push(Json(&upsert.set));
            timestamps.push(upsert.timestamp);
        }
        let client = self.client().await?;
        let statement = client
            .prepare_cached(UPSERT_GROUPS)
            .await
            .map_err(classify)?;
        let rows = client
            .query(
                &statement,
                &[&teams, &group_keys, &indexes, &sets, &timestamps],
            )
            .await
            .map_err(classify)?;
        let mut written: HashMap<GroupKey, Group> = rows
            .iter()
            .map(|row| {
                let group = group_from_row(row)?;
                Ok((group.key.clone(), group))
            })
            .collect::<Result<_, GroupStoreError>>()?;
        Ok(upserts
            .iter()
            .map(|upsert| Ok(written.remove(&upsert.key)))
            .collect())
    }
}

fn read(error: tokio_postgres::Error) -> GroupStoreError {
    GroupStoreError::Unavailable(error.to_string())
}

fn group_from_row(row: &tokio_postgres::Row) -> Result<Group, GroupStoreError> {
    let Json(properties): Json<Value> = row.try_get("group_properties").map_err(read)?;
    let index: i32 = row.try_get("group_type_index").map_err(read)?;
    Ok(Group {
        key: GroupKey {
            team_id: i64::from(row.try_get::<_, i32>("team_id").map_err(read)?),
            group_type_index: u8::try_from(index).map_err(|_| {
                GroupStoreError::Unavailable(format!("group type index {index} out of range"))
            })?,
            group_key: row.try_get("group_key").map_err(read)?,
        },
        // PostHog's column is jsonb NOT NULL; anything but an object is treated as empty.
        properties: match properties {
            Value::Object(map) => map,
            _ => Map::new(),
        },
        created_at: row.try_get("created_at").map_err(read)?,
        version: row.try_get("version").map_err(read)?,
    })
}

/// Sorts a Postgres error into "retry the batch later" and "this event's data is refused".
/// Upserts take no locks a race could lose, so a conflict is only a store that cannot answer.
fn classify(error: tokio_postgres::Error) -> GroupStoreError {
    match crate::postgres::classify(&error) {
        (Failure::Rejected, message) => GroupStoreError::Rejected(message),
        (Failure::Conflict | Failure::Unavailable, message) => {
            GroupStoreError::Unavailable(message)
        }
    }
}

fn team_column(team_id: i64) -> Result<i32, GroupStoreError> {
    crate::postgres::team_column(team_id)
        .map_err(|error| GroupStoreError::Rejected(error.to_string()))
}
