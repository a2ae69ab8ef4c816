//! The Redis connection pool shared by the Redis adapters (`REDIS_URL`, sized by
//! `REDIS_POOL_MIN_SIZE` and `REDIS_POOL_MAX_SIZE`).
//!
//! Short commands borrow a pooled connection. Blocking reads (`XREADGROUP BLOCK`) and pub/sub
//! subscriptions take a dedicated connection (`dedicated_connection`) so they never hold up
//! other users of the pool.

use std::time::Duration;

use deadpool_redis::{Config, Connection, Pool, PoolConfig, Runtime, Timeouts};

use super::ClusterError;

/// How long a caller waits for a pooled connection before the store counts as unavailable.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RedisPoolConfig {
    pub url: String,
    pub min_size: usize,
    pub max_size: usize,
}

/// A cloneable handle on the pool and the URL (for dedicated connections).
#[derive(Clone)]
pub struct RedisPool {
    pool: Pool,
    client: redis::Client,
}

impl RedisPool {
    /// Builds the pool and checks that Redis answers, warming `min_size` connections.
    pub async fn connect(config: &RedisPoolConfig) -> Result<Self, ClusterError> {
        let client = redis::Client::open(config.url.as_str())?;
        let mut pool_config = Config::from_url(config.url.clone());
        pool_config.pool = Some(PoolConfig {
            max_size: config.max_size.max(1),
            timeouts: Timeouts {
                wait: Some(CHECKOUT_TIMEOUT),
                create: Some(CONNECT_TIMEOUT),
                recycle: Some(CONNECT_TIMEOUT),
            },
            ..PoolConfig::default()
        });
        let pool = pool_config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|error| ClusterError::Unavailable(error.to_string()))?;
        let this = Self { pool, client };
        // Open min_size connections now: fails fast on a wrong REDIS_URL and keeps them warm.
        let mut warm = Vec::new();
        for _ in 0..config.min_size.max(1) {
            let mut connection = this.get().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await?;
            warm.push(connection);
        }
        Ok(this)
    }

    /// A pooled connection for short commands.
    pub async fn get(&self) -> Result<Connection, ClusterError> {
        Ok(self.pool.get().await?)
    }

    /// A connection of its own, for blocking commands.
    pub async fn dedicated_connection(
        &self,
    ) -> Result<redis::aio::MultiplexedConnection, ClusterError> {
        let connecting = self.client.get_multiplexed_async_connection();
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClusterError::Timeout(CONNECT_TIMEOUT))?
            .map_err(ClusterError::from)
    }

    /// The client, for pub/sub connections.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }
}
