//! Teams: how an event finds its team, and the team settings ingestion needs.
//!
//! `TeamManager` caches lookups in process, as PostHog's does: a team is trusted for
//! `refresh_after` (2 minutes), so a changed `anonymize_ips` takes effect within that; an
//! unknown token is remembered for `negative_ttl` (5 minutes), so a flood of events with a bad
//! token costs one query, not one per event.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lru::LruCache;
use uuid::Uuid;

use crate::event::Team;

#[derive(Debug, thiserror::Error)]
pub enum TeamStoreError {
    /// The store could not answer; the batch is retried rather than its events dropped.
    #[error("cannot read teams (check DATABASE_URL): {0}")]
    Unavailable(String),
}

/// Where teams live: `posthog_team` in Postgres, or the embedded registry.
#[async_trait]
pub trait TeamStore: Send + Sync + 'static {
    async fn by_token(&self, token: &str) -> Result<Option<Team>, TeamStoreError>;
    async fn by_id(&self, id: i64) -> Result<Option<Team>, TeamStoreError>;
}

// ---------------------------------------------------------------------------------------------
// Postgres

pub struct PostgresTeamStore {
    pool: deadpool_postgres::Pool,
}

const TEAM_COLUMNS: &str = "id, uuid, organization_id, api_token, name, anonymize_ips, \
     session_recording_opt_in, ingested_event, slack_incoming_webhook, timezone";

impl PostgresTeamStore {
    pub fn new(pool: deadpool_postgres::Pool) -> Self {
        Self { pool }
    }

    async fn fetch(
        &self,
        condition: &str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Option<Team>, TeamStoreError> {
        let unavailable =
            |error: &dyn std::fmt::Display| TeamStoreError::Unavailable(error.to_string());
        let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {TEAM_COLUMNS} FROM posthog_team WHERE {condition} LIMIT 1"
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        let row = client
            .query_opt(&statement, &[value])
            .await
            .map_err(|e| unavailable(&e))?;
        row.map(|row| team_from_row(&row))
            .transpose()
            .map_err(|e| unavailable(&e))
    }
}

fn team_from_row(row: &tokio_postgres::Row) -> Result<Team, tokio_postgres::Error> {
    Ok(Team {
        id: i64::from(row.try_get::<_, i32>("id")?),
        uuid: row.try_get("uuid")?,
        organization_id: row.try_get("organization_id")?,
        api_token: row.try_get("api_token")?,
        name: row.try_get("name")?,
        anonymize_ips: row.try_get("anonymize_ips")?,
        session_recording_opt_in: row.try_get("session_recording_opt_in")?,
        ingested_event: row.try_get("ingested_event")?,
        slack_incoming_webhook: row.try_get("slack_incoming_webhook")?,
        timezone: row.try_get("timezone")?,
    })
}

#[async_trait]
impl TeamStore for PostgresTeamStore {
    async fn by_token(&self, token: &str) -> Result<Option<Team>, TeamStoreError> {
        self.fetch("api_token = $1", &token).await
    }

    async fn by_id(&self, id: i64) -> Result<Option<Team>, TeamStoreError> {
        // posthog_team.id is a serial (int4); an id beyond it cannot exist.
        let Ok(id) = i32::try_from(id) else {
            return Ok(None);
        };
        self.fetch("id = $1", &id).await
    }
}

// ---------------------------------------------------------------------------------------------
// Embedded

/// Teams in process memory, for tests: every token is a team, created the first time it is
/// seen and numbered from 1 in order of appearance. The embedded profile keeps its teams in
/// [`sqlite::SqliteTeamStore`], where ids never move.
#[derive(Default)]
pub struct EmbeddedTeamStore {
    teams: Mutex<EmbeddedTeams>,
}

#[derive(Default)]
struct EmbeddedTeams {
    by_token: HashMap<String, Arc<Team>>,
    by_id: Vec<Arc<Team>>,
}

impl EmbeddedTeamStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl TeamStore for EmbeddedTeamStore {
    async fn by_token(&self, token: &str) -> Result<Option<Team>, TeamStoreError> {
        let mut teams = self.teams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(team) = teams.by_token.get(token) {
            return Ok(Some(Team::clone(team)));
        }
        let team = Arc::new(Team {
            id: teams.by_id.len() as i64 + 1,
            uuid: Uuid::now_v7(),
            organization_id: Uuid::nil(),
            api_token: token.to_owned(),
            name: format!("Team {}", teams.by_id.len() + 1),
            anonymize_ips: false,
            session_recording_opt_in: false,
            ingested_event: true,
            slack_incoming_webhook: None,
            timezone: "UTC".to_owned(),
        });
        teams.by_token.insert(token.to_owned(), Arc::clone(&team));
        teams.by_id.push(Arc::clone(&team));
        Ok(Some(Team::clone(&team)))
    }

    async fn by_id(&self, id: i64) -> Result<Option<Team>, TeamStoreError> {
        let teams = self.teams.lock().unwrap_or_else(PoisonError::into_inner);
        let index = usize::try_from(id).ok().and_then(|id| id.checked_sub(1));
        Ok(index
            .and_then(|index| teams.by_id.get(index))
            .map(|team| Team::clone(team)))
    }
}

// ---------------------------------------------------------------------------------------------
// Cache

#[derive(Debug, Clone)]
pub struct TeamCacheConfig {
    pub capacity: usize,
    pub refresh_after: Duration,
    pub negative_ttl: Duration,
}

impl Default for TeamCacheConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            refresh_after: Duration::from_secs(120),
            negative_ttl: Duration::from_secs(300),
        }
    }
}

#[derive(Clone)]
struct Cached {
    team: Option<Arc<Team>>,
    fetched: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TeamKey {
    Token(String),
    Id(i64),
}

/// A `TeamStore` behind an LRU cache. Cheap to share: clone the `Arc`.
pub struct TeamManager {
    store: Arc<dyn TeamStore>,
    config: TeamCacheConfig,
    cache: Mutex<LruCache<TeamKey, Cached>>,
}

impl TeamManager {
    pub fn new(store: Arc<dyn TeamStore>, config: TeamCacheConfig) -> Self {
        let capacity = NonZeroUsize::new(config.capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            store,
            config,
            cache: Mutex::new(LruCache::new(capacity)),
        }
    }

    pub async fn by_token(&self, token: &str) -> Result<Option<Arc<Team>>, TeamStoreError> {
        let key = TeamKey::Token(token.to_owned());
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let team = self.store.by_token(token).await?.map(Arc::new);
        self.remember(key, team.clone());
        Ok(team)
    }

    pub async fn by_id(&self, id: i64) -> Result<Option<Arc<Team>>, TeamStoreError> {
        let key = TeamKey::Id(id);
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let team = self.store.by_id(id).await?.map(Arc::new);
        self.remember(key, team.clone());
        Ok(team)
    }

    /// `Some(answer)` while the cached answer is fresh.
    fn cached(&self, key: &TeamKey) -> Option<Option<Arc<Team>>> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = cache.get(key)?;
        let ttl = if entry.team.is_some() {
            self.config.refresh_after
        } else {
            self.config.negative_ttl
        };
        (entry.fetched.elapsed() < ttl).then(|| entry.team.clone())
    }

    fn remember(&self, key: TeamKey, team: Option<Arc<Team>>) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.put(
            key,
            Cached {
                team,
                fetched: Instant::now(),
            },
        );
    }
}

pub mod sqlite;
#[cfg(test)]
mod tests;
