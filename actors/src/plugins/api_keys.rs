//! The keys `posthog.api` sends for a plugin that names none, as PostHog's server provides
//! them: the team's project token, and a personal API key of a bot user of the team's
//! organization ("Plugins API User [Bot]", an admin member, email `…@posthogbot.user`,
//! key label `autogen`).
//!
//! Unlike one of PostHog's versions, which stored only the key's hash and then sent the hash
//! (which PostHog's API hashes again and never finds), the raw key is what is sent, and only
//! its hash is stored, in the form PostHog looks presented keys up by
//! (`secure_value = 'sha256$' || hex(sha256(key))`). The raw key stays in the cluster cache
//! (Redis in the cluster profile) under PostHog's `plugins-api-key-manager/<organization>` for
//! 14 days, so every instance and VM uses the same key; after that a new key is made for the
//! same bot (PostHog does the same).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::cluster::ClusterError;
use crate::cluster::cache::CacheStore;

/// How long the raw key is kept in the cache (PostHog's 14 days).
const KEY_CACHED_FOR: Duration = Duration::from_secs(14 * 24 * 3600);

/// What a request of `posthog.api` is authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCredentials {
    /// The team's `api_token`, sent as the `token` query parameter.
    pub project_api_key: String,
    /// Sent as `Authorization: Bearer …`.
    pub personal_api_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Cache(#[from] ClusterError),
    #[error("unable to determine project: team {0} does not exist")]
    NoTeam(i64),
}

pub struct PluginApiKeys {
    pool: Pool,
    cache: Arc<dyn CacheStore>,
}

impl PluginApiKeys {
    pub fn new(pool: Pool, cache: Arc<dyn CacheStore>) -> Self {
        Self { pool, cache }
    }

    pub async fn credentials(&self, team_id: i64) -> Result<ApiCredentials, ApiKeyError> {
        let team = i32::try_from(team_id).map_err(|_| ApiKeyError::NoTeam(team_id))?;
        let mut client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT api_token, organization_id FROM posthog_team WHERE id = $1",
                &[&team],
            )
            .await?
            .ok_or(ApiKeyError::NoTeam(team_id))?;
        let project_api_key: String = row.get(0);
        let organization: Uuid = row.get(1);
        let cache_key = format!("plugins-api-key-manager/{organization}");
        let personal_api_key = match self.cached_key(&cache_key).await? {
            Some(key) => key,
            None => {
                self.create_key(&mut client, organization, &cache_key)
                    .await?
            }
        };
        Ok(ApiCredentials {
            project_api_key,
            personal_api_key,
        })
    }

    /// The organization's key as cached: JSON-encoded, as PostHog's server caches it.
    async fn cached_key(&self, cache_key: &str) -> Result<Option<String>, ApiKeyError> {
        Ok(self
            .cache
            .get(cache_key)
            .await?
            .and_then(|text| serde_json::from_str::<String>(&text).ok()))
    }

    /// A new key for the organization's bot user, made first if it has none, cached before the
    /// organization's advisory lock is released. Callers that missed the cache at once (worker
    /// threads of one instance, or instances sharing the cache) wait on the lock and then find
    /// the first one's key instead of making their own; instances with caches of their own
    /// share the bot and get a key each.
    async fn create_key(
        &self,
        client: &mut deadpool_postgres::Client,
        organization: Uuid,
        cache_key: &str,
    ) -> Result<String, ApiKeyError> {
        let transaction = client.transaction().await?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext('plugin-server bot user ' || $1::text))",
                &[&organization.to_string()],
            )
            .await?;
        if let Some(key) = self.cached_key(cache_key).await? {
            return Ok(key);
        }
        let key = insert_key(&transaction, organization).await?;
        let encoded = serde_json::Value::String(key.clone()).to_string();
        self.cache
            .set(cache_key, &encoded, Some(KEY_CACHED_FOR))
            .await?;
        transaction.commit().await?;
        Ok(key)
    }
}

/// A new key for the organization's bot user, made first if it has none, in `transaction`
/// (which holds the organization's advisory lock, so concurrent callers make one bot).
async fn insert_key(
    transaction: &tokio_postgres::Transaction<'_>,
    organization: Uuid,
) -> Result<String, tokio_postgres::Error> {
    let existing = transaction
        .query_opt(
            "SELECT id FROM posthog_user \
             WHERE current_organization_id = $1 AND email LIKE '%@posthogbot.user' \
             ORDER BY id LIMIT 1",
            &[&organization],
        )
        .await?;
    let user: i32 = match existing {
        Some(row) => row.get(0),
        None => {
            let user: i32 = transaction
                .query_one(
                    "INSERT INTO posthog_user (password, first_name, last_name, email, is_staff, \
                     is_active, date_joined, uuid, distinct_id, current_organization_id, \
                     events_column_config) \
                     VALUES ($1, 'Plugins API User [Bot]', '', $2, false, true, now(), $3, $4, \
                     $5, '{\"active\": \"DEFAULT\"}') RETURNING id",
                    &[
                        // Django's mark of an unusable password: nobody can log in as the bot.
                        &format!("!{}", random_token(40)),
                        &format!("plugins-{}@posthogbot.user", organization.simple()),
                        &Uuid::now_v7(),
                        &random_token(40),
                        &organization,
                    ],
                )
                .await?
                .get(0);
            transaction
                .execute(
                    "INSERT INTO posthog_organizationmembership \
                     (id, organization_id, user_id, level, joined_at, updated_at) \
                     VALUES ($1, $2, $3, 8, now(), now())",
                    &[&Uuid::now_v7(), &organization, &user],
                )
                .await?;
            user
        }
    };
    let key = format!("phx_{}", random_token(43));
    transaction
        .execute(
            "INSERT INTO posthog_personalapikey \
             (id, user_id, label, secure_value, mask_value, created_at) \
             VALUES ($1, $2, 'autogen', $3, $4, now())",
            &[
                &random_token(40),
                &user,
                &secure_value(&key),
                &mask_value(&key),
            ],
        )
        .await?;
    Ok(key)
}

/// How PostHog finds a presented key (`hash_key_value` in its `sha256` mode).
pub fn secure_value(key: &str) -> String {
    format!("sha256${}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// What PostHog's UI shows of a key: its first and last four characters.
fn mask_value(key: &str) -> String {
    let start: String = key.chars().take(4).collect();
    let end: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{start}...{end}")
}

fn random_token(length: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(length)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_hash_is_posthogs_sha256_form() {
        assert_eq!(
            secure_value("phx_abc"),
            format!("sha256${}", hex::encode(Sha256::digest(b"phx_abc")))
        );
        assert_eq!(mask_value("phx_0123456789abcdef"), "phx_...cdef");
        assert_eq!(mask_value("phx_0123456789abcdef").len(), 11);
    }

    #[cfg(feature = "integration-tests")]
    fn in_process_cache() -> Arc<dyn CacheStore> {
        Arc::new(crate::cluster::cache::InProcessCache::new(
            crate::cluster::cache::InProcessCacheBackend::new(),
            "test",
        ))
    }

    /// Two instances with caches of their own (so both miss) at once: one bot user between
    /// them, a key each; each instance then keeps its key.
    #[cfg(feature = "integration-tests")]
    #[tokio::test]
    async fn instances_missing_the_cache_at_once_share_one_bot_user() {
        let (pool, _) = crate::test_support::fresh_postgres("ps_api_keys").await;
        crate::test_support::insert_teams(&pool, &[1, 2]).await;
        let first = PluginApiKeys::new(pool.clone(), in_process_cache());
        let second = PluginApiKeys::new(pool.clone(), in_process_cache());
        let (a, b) = tokio::join!(first.credentials(1), second.credentials(2));
        let (a, b) = (a.expect("first"), b.expect("second"));
        assert_eq!(a.project_api_key, "token1");
        assert_eq!(b.project_api_key, "token2");
        assert_ne!(a.personal_api_key, b.personal_api_key);
        assert_eq!(
            first.credentials(2).await.expect("again").personal_api_key,
            a.personal_api_key,
            "the organization's cached key, whichever team asks"
        );
        let client = pool.get().await.expect("connection");
        let counts = client
            .query_one(
                "SELECT (SELECT count(*) FROM posthog_user),                  (SELECT count(*) FROM posthog_organizationmembership),                  (SELECT count(*) FROM posthog_personalapikey)",
                &[],
            )
            .await
            .expect("counts");
        assert_eq!(
            (
                counts.get::<_, i64>(0),
                counts.get::<_, i64>(1),
                counts.get::<_, i64>(2)
            ),
            (1, 1, 2)
        );
        assert!(matches!(
            first.credentials(3).await,
            Err(ApiKeyError::NoTeam(3))
        ));
    }
}
