//! The embedded profile's group store: group types and groups in the embedded SQLite database
//! (see [`crate::sqlite`]), with the answers Postgres gives (lowest free index, `$set` merge,
//! earliest `created_at`, a version per change). A batch's upserts are one transaction.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};

use super::store::{
    BatchUpserted, Group, GroupKey, GroupStore, GroupStoreError, GroupUpsert, MAX_GROUP_TYPES,
    Upserted, apply_upsert,
};
use crate::sqlite::Sqlite;

pub struct SqliteGroupStore {
    database: Sqlite,
}

impl SqliteGroupStore {
    pub fn new(database: Sqlite) -> Self {
        Self { database }
    }
}

fn unavailable(error: rusqlite::Error) -> GroupStoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::TooBig) => GroupStoreError::Rejected(error.to_string()),
        _ => GroupStoreError::Unavailable(format!("the embedded database: {error}")),
    }
}

fn read_group(connection: &Connection, key: &GroupKey) -> Result<Option<Group>, GroupStoreError> {
    let row: Option<(String, String, i64)> = connection
        .prepare_cached(
            "SELECT properties, created_at, version FROM groups \
             WHERE team_id = ?1 AND group_type_index = ?2 AND group_key = ?3",
        )
        .and_then(|mut select| {
            select
                .query_row(
                    params![key.team_id, key.group_type_index, key.group_key],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()
        })
        .map_err(unavailable)?;
    let Some((properties, created_at, version)) = row else {
        return Ok(None);
    };
    let corrupt = |what: String| GroupStoreError::Unavailable(format!("a stored group: {what}"));
    Ok(Some(Group {
        key: key.clone(),
        properties: serde_json::from_str(&properties).map_err(|e| corrupt(e.to_string()))?,
        created_at: DateTime::parse_from_rfc3339(&created_at)
            .map_err(|e| corrupt(e.to_string()))?
            .with_timezone(&Utc),
        version,
    }))
}

/// Reads the group, applies the upsert, and writes the result if it changed anything.
fn upsert_in(
    connection: &Connection,
    key: &GroupKey,
    set: &Map<String, Value>,
    timestamp: DateTime<Utc>,
) -> Result<Upserted, GroupStoreError> {
    let upserted = apply_upsert(read_group(connection, key)?, key, set, timestamp);
    if upserted.written {
        let group = &upserted.group;
        connection
            .prepare_cached(
                "INSERT INTO groups (team_id, group_type_index, group_key, properties, \
                 created_at, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (team_id, group_type_index, group_key) DO UPDATE SET \
                 properties = excluded.properties, created_at = excluded.created_at, \
                 version = excluded.version",
            )
            .and_then(|mut upsert| {
                upsert.execute(params![
                    key.team_id,
                    key.group_type_index,
                    key.group_key,
                    crate::persons::rows::properties_json(&group.properties),
                    group.created_at.to_rfc3339(),
                    group.version,
                ])
            })
            .map_err(unavailable)?;
    }
    Ok(upserted)
}

fn group_types_in(
    connection: &Connection,
    team_id: i64,
) -> Result<HashMap<String, u8>, GroupStoreError> {
    let mut select = connection
        .prepare_cached("SELECT group_type, group_type_index FROM group_types WHERE team_id = ?1")
        .map_err(unavailable)?;
    let rows = select
        .query_map([team_id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, u8>(1)?))
        })
        .map_err(unavailable)?;
    rows.collect::<Result<_, _>>().map_err(unavailable)
}

#[async_trait]
impl GroupStore for SqliteGroupStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn group_types(&self, team_id: i64) -> Result<HashMap<String, u8>, GroupStoreError> {
        group_types_in(&*self.database.lock().await, team_id)
    }

    async fn add_group_type(
        &self,
        team_id: i64,
        group_type: &str,
    ) -> Result<Option<u8>, GroupStoreError> {
        // The read and the insert under one hold of the connection, so that two callers adding
        // the same type get the same index rather than the second one failing on the key.
        let connection = self.database.lock().await;
        let types = group_types_in(&connection, team_id)?;
        if let Some(index) = types.get(group_type) {
            return Ok(Some(*index));
        }
        let Some(free) = (0..MAX_GROUP_TYPES).find(|index| !types.values().any(|t| t == index))
        else {
            return Ok(None);
        };
        connection
            .execute(
                "INSERT INTO group_types (team_id, group_type, group_type_index) VALUES (?1, ?2, ?3)",
                params![team_id, group_type, free],
            )
            .map_err(unavailable)?;
        Ok(Some(free))
    }

    async fn groups(&self, keys: &[GroupKey]) -> Result<HashMap<GroupKey, Group>, GroupStoreError> {
        let connection = self.database.lock().await;
        let mut found = HashMap::with_capacity(keys.len());
        for key in keys {
            if let Some(group) = read_group(&connection, key)? {
                found.insert(key.clone(), group);
            }
        }
        Ok(found)
    }

    async fn upsert(
        &self,
        key: &GroupKey,
        set: &Map<String, Value>,
        timestamp: DateTime<Utc>,
    ) -> Result<Upserted, GroupStoreError> {
        upsert_in(&*self.database.lock().await, key, set, timestamp)
    }

    /// One transaction for the batch (one fsync); a group the store refuses is answered
    /// alone and the others are still written.
    async fn upsert_batch(
        &self,
        upserts: &[GroupUpsert],
    ) -> Result<Vec<BatchUpserted>, GroupStoreError> {
        let mut connection = self.database.lock().await;
        let transaction = connection.transaction().map_err(unavailable)?;
        let mut answers = Vec::with_capacity(upserts.len());
        for upsert in upserts {
            answers.push(
                match upsert_in(&transaction, &upsert.key, &upsert.set, upsert.timestamp) {
                    Ok(upserted) => Ok(upserted.written.then_some(upserted.group)),
                    Err(error @ GroupStoreError::Rejected(_)) => Err(error),
                    Err(error) => return Err(error),
                },
            );
        }
        transaction.commit().map_err(unavailable)?;
        Ok(answers)
    }
}
