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
    #[error(
        "the database at DATABASE_URL has no table {first}{others}: run `plugin-server --migrate` \
         once with the same settings to create what is missing (PostHog's own tables are never \
         altered)"
    )]
    MissingTables { first: String, others: String },
}

/// Every table the server reads or writes: PostHog's (present in a PostHog database) and the
/// job queue's own. `--migrate` creates whichever is missing. Not `posthog_actionstep`: PostHog
/// dropped it in 2024 for `posthog_action.steps_json`, and actions are read from either.
pub const REQUIRED_TABLES: [&str; 22] = [
    "posthog_organization",
    "posthog_team",
    "posthog_person",
    "posthog_persondistinctid",
    "posthog_cohortpeople",
    "posthog_featureflaghashkeyoverride",
    "posthog_group",
    "posthog_grouptypemapping",
    "posthog_eventdefinition",
    "posthog_propertydefinition",
    "posthog_eventproperty",
    "posthog_action",
    "posthog_plugin",
    "posthog_pluginconfig",
    "posthog_pluginsourcefile",
    "posthog_pluginattachment",
    "posthog_pluginstorage",
    "posthog_user",
    "posthog_organizationmembership",
    "posthog_personalapikey",
    "plugin_server_jobs",
    "plugin_server_jobs_dead_letter",
];

/// Fails with one line naming what is missing and the command that creates it, instead of
/// SQL errors from the first step that touches a missing table.
pub async fn check_tables(pool: &Pool) -> Result<(), PostgresError> {
    let client = pool.get().await.map_err(PostgresError::Connect)?;
    let tables: Vec<&str> = REQUIRED_TABLES.to_vec();
    let rows = client
        .query(
            "SELECT name FROM unnest($1::text[]) WITH ORDINALITY AS wanted(name, position) \
             WHERE to_regclass(name) IS NULL ORDER BY position",
            &[&tables],
        )
        .await
        .map_err(PostgresError::Query)?;
    let missing: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    match missing.split_first() {
        None => Ok(()),
        Some((first, rest)) => Err(PostgresError::MissingTables {
            first: first.clone(),
            others: match rest.len() {
                0 => String::new(),
                1 => " (and 1 other)".to_owned(),
                n => format!(" (and {n} others)"),
            },
        }),
    }
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

/// What a failed statement means for whoever sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Another transaction changed the same rows first (a unique key taken, a deadlock, a
    /// serialization failure): retry the work.
    Conflict,
    /// The data does not fit (class 22, "data exception": an over-long value, a `\u0000` in
    /// text) or names a row that does not exist (23503, e.g. an unknown team): only this
    /// data is refused.
    Rejected,
    /// Anything else, the connection included: the store cannot answer now.
    Unavailable,
}

/// Sorts a Postgres error, with the server's own message where there is one ("db error"
/// alone says nothing).
pub fn classify(error: &tokio_postgres::Error) -> (Failure, String) {
    use tokio_postgres::error::SqlState;
    let Some(code) = error.code() else {
        return (Failure::Unavailable, error.to_string());
    };
    let message = error
        .as_db_error()
        .map_or_else(|| error.to_string(), |db| db.message().to_owned());
    let failure = if [
        SqlState::UNIQUE_VIOLATION,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::T_R_SERIALIZATION_FAILURE,
    ]
    .contains(code)
    {
        Failure::Conflict
    } else if code.code().starts_with("22") || *code == SqlState::FOREIGN_KEY_VIOLATION {
        Failure::Rejected
    } else {
        Failure::Unavailable
    };
    (failure, message)
}

/// A team id that PostHog's `integer` columns cannot hold: it can name no team.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("team id {0} is out of range")]
pub struct TeamIdOutOfRange(pub i64);

/// PostHog's `team_id` columns are `integer`; a larger id can name no team.
pub fn team_column(team_id: i64) -> Result<i32, TeamIdOutOfRange> {
    i32::try_from(team_id).map_err(|_| TeamIdOutOfRange(team_id))
}
