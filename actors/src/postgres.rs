//! The Postgres connection pool shared by every actor that reads or writes PostHog's tables.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("invalid DATABASE_URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot create the Postgres pool: {0}")]
    Build(String),
    #[error("cannot reach Postgres (check DATABASE_URL): {0}")]
    Connect(#[source] deadpool_postgres::PoolError),
    #[error("a Postgres query failed: {0}")]
    Query(#[source] tokio_postgres::Error),
}

/// A pool of at most `max_size` connections (PostHog uses 10), checked with one connection
/// at start so that a wrong DATABASE_URL fails startup with a clear error.
pub async fn connect(database_url: &str, max_size: usize) -> Result<Pool, PostgresError> {
    let config: tokio_postgres::Config = database_url.parse().map_err(PostgresError::Url)?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            // A connection that died with its server must not be handed out again.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|error| PostgresError::Build(error.to_string()))?;
    drop(pool.get().await.map_err(PostgresError::Connect)?);
    Ok(pool)
}
