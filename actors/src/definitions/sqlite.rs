//! The embedded profile's definitions, in the embedded SQLite database (see
//! [`crate::sqlite`]): the same rules as Postgres' (events' `last_seen_at` moved, a property
//! keeps its first type, an untyped one takes the first type that comes), one transaction per
//! batch.

use async_trait::async_trait;
use chrono::Utc;
use rusqlite::params;

use super::manager::{DefinitionStore, DefinitionStoreError, NewDefinitions};
use crate::sqlite::Sqlite;

pub struct SqliteDefinitionStore {
    database: Sqlite,
}

impl SqliteDefinitionStore {
    pub fn new(database: Sqlite) -> Self {
        Self { database }
    }
}

fn failed(error: rusqlite::Error) -> DefinitionStoreError {
    DefinitionStoreError::Unavailable(format!("the embedded database: {error}"))
}

#[async_trait]
impl DefinitionStore for SqliteDefinitionStore {
    async fn write(&self, new: &NewDefinitions) -> Result<(), DefinitionStoreError> {
        let now = Utc::now().to_rfc3339();
        let mut connection = self.database.lock().await;
        let transaction = connection.transaction().map_err(failed)?;
        for (team, name) in &new.events {
            transaction
                .prepare_cached(
                    "INSERT INTO event_definitions (team_id, name, created_at, last_seen_at) \
                     VALUES (?1, ?2, ?3, ?3) \
                     ON CONFLICT (team_id, name) DO UPDATE SET last_seen_at = excluded.last_seen_at",
                )
                .and_then(|mut upsert| upsert.execute(params![team, name, now]))
                .map_err(failed)?;
        }
        for property in &new.properties {
            let property_type = property.property_type.map(|t| t.as_str());
            transaction
                .prepare_cached(
                    "INSERT INTO property_definitions (team_id, name, type, group_type_index, \
                     property_type, is_numerical) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (team_id, name, type, group_type_index) DO UPDATE SET \
                     property_type = excluded.property_type, is_numerical = excluded.is_numerical \
                     WHERE property_type IS NULL AND excluded.property_type IS NOT NULL",
                )
                .and_then(|mut upsert| {
                    upsert.execute(params![
                        property.team_id,
                        property.name,
                        property.kind.type_column(),
                        property.kind.group_type_index().unwrap_or(-1),
                        property_type,
                        property_type == Some("Numeric"),
                    ])
                })
                .map_err(failed)?;
        }
        for (team, event, property) in &new.event_properties {
            transaction
                .prepare_cached(
                    "INSERT INTO event_properties (team_id, event, property) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                )
                .and_then(|mut insert| insert.execute(params![team, event, property]))
                .map_err(failed)?;
        }
        for team in &new.ingested_teams {
            transaction
                .execute(
                    "INSERT INTO ingested_teams (team_id) VALUES (?1) ON CONFLICT DO NOTHING",
                    [team],
                )
                .map_err(failed)?;
        }
        transaction.commit().map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Postgres' test: idempotent, a property keeps its first type, an untyped one takes
    /// the first type that comes.
    #[tokio::test]
    async fn writes_are_idempotent_and_types_stick_once_set() {
        let database = Sqlite::in_memory().expect("sqlite");
        let store = SqliteDefinitionStore::new(database.clone());
        crate::definitions::store_tests::write_types_twice(&store, "typed").await;

        let connection = database.lock().await;
        let mut select = connection
            .prepare(
                "SELECT name, property_type, is_numerical FROM property_definitions ORDER BY name",
            )
            .expect("select");
        let types: Vec<(String, Option<String>, bool)> = select
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            types,
            [
                ("later".to_owned(), Some("DateTime".to_owned()), false),
                ("typed".to_owned(), Some("Numeric".to_owned()), true),
            ]
        );
        let counts: (i64, i64, i64) = connection
            .query_row(
                "SELECT (SELECT count(*) FROM event_definitions), \
                        (SELECT count(*) FROM event_properties), \
                        (SELECT count(*) FROM ingested_teams WHERE team_id = 2)",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .expect("counts");
        assert_eq!(counts, (1, 1, 1));
    }
}
