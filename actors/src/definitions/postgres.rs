//! Definitions in PostHog's tables: one statement per table per batch, each a no-op for what
//! is there already, so a write retried or raced by another instance changes nothing twice.

use async_trait::async_trait;
use deadpool_postgres::Pool;
use uuid::Uuid;

use super::manager::{DefinitionStore, DefinitionStoreError, NewDefinitions};

pub struct PostgresDefinitionStore {
    pool: Pool,
}

impl PostgresDefinitionStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

const UPSERT_EVENTS: &str = "INSERT INTO posthog_eventdefinition \
     (id, name, team_id, created_at, last_seen_at, volume_30_day, query_usage_30_day) \
     SELECT id, name, team_id, now(), now(), NULL, NULL \
     FROM unnest($1::uuid[], $2::text[], $3::int4[]) AS new(id, name, team_id) \
     ON CONFLICT (team_id, name) DO UPDATE SET last_seen_at = now()";

/// A property defined untyped (its first value was an object) takes the type of a later value;
/// a typed one keeps its type.
const UPSERT_PROPERTIES: &str = "INSERT INTO posthog_propertydefinition AS d \
     (id, name, type, group_type_index, is_numerical, property_type, team_id, \
      volume_30_day, query_usage_30_day) \
     SELECT id, name, type, group_type_index, coalesce(property_type = 'Numeric', false), \
       property_type, team_id, NULL, NULL \
     FROM unnest($1::uuid[], $2::text[], $3::int2[], $4::int2[], $5::text[], $6::int4[]) \
       AS new(id, name, type, group_type_index, property_type, team_id) \
     ON CONFLICT (team_id, name, type, coalesce(group_type_index, -1)) DO UPDATE \
     SET property_type = EXCLUDED.property_type, is_numerical = EXCLUDED.is_numerical \
     WHERE d.property_type IS NULL AND EXCLUDED.property_type IS NOT NULL";

const INSERT_EVENT_PROPERTIES: &str = "INSERT INTO posthog_eventproperty (event, property, team_id) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int4[]) \
     ON CONFLICT DO NOTHING";

const MARK_INGESTED: &str =
    "UPDATE posthog_team SET ingested_event = true WHERE id = ANY($1) AND NOT ingested_event";

#[async_trait]
impl DefinitionStore for PostgresDefinitionStore {
    async fn write(&self, new: &NewDefinitions) -> Result<(), DefinitionStoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|error| DefinitionStoreError::Unavailable(error.to_string()))?;
        if !new.events.is_empty() {
            let ids: Vec<Uuid> = new.events.iter().map(|_| Uuid::now_v7()).collect();
            let names: Vec<String> = new.events.iter().map(|(_, name)| clean(name)).collect();
            let teams = new
                .events
                .iter()
                .map(|(team, _)| team_column(*team))
                .collect::<Result<Vec<_>, _>>()?;
            client
                .execute(UPSERT_EVENTS, &[&ids, &names, &teams])
                .await
                .map_err(failed)?;
        }
        if !new.properties.is_empty() {
            let properties = &new.properties;
            let ids: Vec<Uuid> = properties.iter().map(|_| Uuid::now_v7()).collect();
            let names: Vec<String> = properties.iter().map(|p| clean(&p.name)).collect();
            let types: Vec<i16> = properties.iter().map(|p| p.kind.type_column()).collect();
            let groups: Vec<Option<i16>> = properties
                .iter()
                .map(|p| p.kind.group_type_index())
                .collect();
            let property_types: Vec<Option<&str>> = properties
                .iter()
                .map(|p| p.property_type.map(|t| t.as_str()))
                .collect();
            let teams = properties
                .iter()
                .map(|p| team_column(p.team_id))
                .collect::<Result<Vec<_>, _>>()?;
            client
                .execute(
                    UPSERT_PROPERTIES,
                    &[&ids, &names, &types, &groups, &property_types, &teams],
                )
                .await
                .map_err(failed)?;
        }
        if !new.event_properties.is_empty() {
            let events: Vec<String> = new
                .event_properties
                .iter()
                .map(|(_, e, _)| clean(e))
                .collect();
            let properties: Vec<String> = new
                .event_properties
                .iter()
                .map(|(_, _, p)| clean(p))
                .collect();
            let teams = new
                .event_properties
                .iter()
                .map(|(team, _, _)| team_column(*team))
                .collect::<Result<Vec<_>, _>>()?;
            client
                .execute(INSERT_EVENT_PROPERTIES, &[&events, &properties, &teams])
                .await
                .map_err(failed)?;
        }
        if !new.ingested_teams.is_empty() {
            let teams = new
                .ingested_teams
                .iter()
                .map(|team| team_column(*team))
                .collect::<Result<Vec<_>, _>>()?;
            client
                .execute(MARK_INGESTED, &[&teams])
                .await
                .map_err(failed)?;
        }
        Ok(())
    }
}

fn failed(error: tokio_postgres::Error) -> DefinitionStoreError {
    DefinitionStoreError::Unavailable(crate::postgres::classify(&error).1)
}

/// Postgres text cannot hold `\u0000`; PostHog writes the replacement character instead.
fn clean(name: &str) -> String {
    name.replace('\u{0}', "\u{FFFD}")
}

fn team_column(team_id: i64) -> Result<i32, DefinitionStoreError> {
    crate::postgres::team_column(team_id)
        .map_err(|error| DefinitionStoreError::Unavailable(error.to_string()))
}

#[cfg(all(test, feature = "integration-tests"))]
mod tests {
    use super::*;

    /// Writes are idempotent, a property keeps its first type, and an untyped one takes the
    /// first type that comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_are_idempotent_and_types_stick_once_set() {
        let (pool, _) = crate::test_support::fresh_postgres("ps_definitions").await;
        crate::test_support::insert_teams(&pool, &[2]).await;
        let client = pool.get().await.expect("connection");
        let store = PostgresDefinitionStore::new(pool.clone());
        crate::definitions::store_tests::write_types_twice(&store, "typed\u{0}").await;

        let types: Vec<(String, Option<String>, bool)> = client
            .query(
                "SELECT name, property_type, is_numerical FROM posthog_propertydefinition ORDER BY name",
                &[],
            )
            .await
            .expect("definitions")
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(
            types,
            [
                ("later".to_owned(), Some("DateTime".to_owned()), false),
                ("typed".to_owned(), Some("Numeric".to_owned()), true),
            ]
        );
        let counts: (i64, i64, bool) = client
            .query_one(
                "SELECT (SELECT count(*) FROM posthog_eventdefinition), \
                        (SELECT count(*) FROM posthog_eventproperty WHERE property = 'typed\u{FFFD}'), \
                        (SELECT ingested_event FROM posthog_team WHERE id = 2)",
                &[],
            )
            .await
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .expect("counts");
        assert_eq!(counts, (1, 1, true));
    }
}
