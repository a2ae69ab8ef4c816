//! Database migrations for `--migrate`: the Postgres and ClickHouse tables this server reads and
//! writes.
//!
//! Each migration is applied once and recorded in a `plugin_server_migrations` table on its
//! side. Every statement is also idempotent on its own (`IF NOT EXISTS`), because a real PostHog
//! database already holds the `posthog_*` tables, and because ClickHouse has no transactions: a
//! migration cut short is simply run again. Concurrent `--migrate` runs against Postgres are
//! serialized by an advisory lock.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::clickhouse_client::ClickHouseTarget;

/// A migration: its version (the file's number), its name, and its SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const POSTGRES_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "posthog_tables",
        sql: include_str!("../migrations/postgres/0001_posthog_tables.sql"),
    },
    Migration {
        version: 2,
        name: "plugin_server_jobs",
        sql: include_str!("../migrations/postgres/0002_plugin_server_jobs.sql"),
    },
    Migration {
        version: 3,
        name: "feature_flag_hash_key_overrides",
        sql: include_str!("../migrations/postgres/0003_feature_flag_hash_key_overrides.sql"),
    },
    Migration {
        version: 4,
        name: "plugin_server_job_retries",
        sql: include_str!("../migrations/postgres/0004_plugin_server_job_retries.sql"),
    },
    Migration {
        version: 5,
        name: "groups",
        sql: include_str!("../migrations/postgres/0005_groups.sql"),
    },
    Migration {
        version: 6,
        name: "definitions",
        sql: include_str!("../migrations/postgres/0006_definitions.sql"),
    },
    Migration {
        version: 7,
        name: "actions",
        sql: include_str!("../migrations/postgres/0007_actions.sql"),
    },
    Migration {
        version: 8,
        name: "plugin_api_keys",
        sql: include_str!("../migrations/postgres/0008_plugin_api_keys.sql"),
    },
];

pub const CLICKHOUSE_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("../migrations/clickhouse/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "persons",
        sql: include_str!("../migrations/clickhouse/0002_persons.sql"),
    },
    Migration {
        version: 3,
        name: "plugin_logs_and_metrics",
        sql: include_str!("../migrations/clickhouse/0003_plugin_logs_and_metrics.sql"),
    },
    Migration {
        version: 4,
        name: "person_mode",
        sql: include_str!("../migrations/clickhouse/0004_person_mode.sql"),
    },
    Migration {
        version: 5,
        name: "groups",
        sql: include_str!("../migrations/clickhouse/0005_groups.sql"),
    },
];

/// Any number; it only has to be the same for every instance of this server.
const POSTGRES_MIGRATION_LOCK_ID: i64 = 0x706c_7567_696e_7376; // "pluginsv"

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot connect to Postgres (check DATABASE_URL): {0}")]
    PostgresConnect(#[source] tokio_postgres::Error),
    #[error("timed out connecting to Postgres after {0:?} (check DATABASE_URL)")]
    PostgresConnectTimeout(Duration),
    #[error("postgres migration {version} ({name}) failed: {source}")]
    Postgres {
        version: u32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot prepare the Postgres migration table: {0}")]
    PostgresBookkeeping(#[source] tokio_postgres::Error),
    #[error("clickhouse migration {version} ({name}) failed: {source}")]
    ClickHouse {
        version: u32,
        name: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("cannot reach ClickHouse (check CLICKHOUSE_HOST): {0}")]
    ClickHouseBookkeeping(#[source] clickhouse::error::Error),
}

/// What a run did, for the log line `--migrate` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<u32>,
    pub already_applied: Vec<u32>,
}

/// Applies the Postgres migrations not yet recorded in `plugin_server_migrations`.
pub async fn migrate_postgres(database_url: &str) -> Result<MigrationReport, MigrationError> {
    let connecting = tokio_postgres::connect(database_url, NoTls);
    let (mut client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| MigrationError::PostgresConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(MigrationError::PostgresConnect)?;
    let connection_task = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(%error, "postgres connection failed during migrations");
        }
    });

    let result = apply_postgres(&mut client).await;
    drop(client);
    // The connection ends once the client is dropped; its error, if any, was logged.
    let _ = connection_task.await;
    result
}

async fn apply_postgres(
    client: &mut tokio_postgres::Client,
) -> Result<MigrationReport, MigrationError> {
    // Session-level lock: released when the connection closes, even if we fail midway.
    client
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&POSTGRES_MIGRATION_LOCK_ID],
        )
        .await
        .map_err(MigrationError::PostgresBookkeeping)?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS plugin_server_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(MigrationError::PostgresBookkeeping)?;
    let rows = client
        .query("SELECT version FROM plugin_server_migrations", &[])
        .await
        .map_err(MigrationError::PostgresBookkeeping)?;
    let done: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();

    let mut report = MigrationReport::default();
    for migration in POSTGRES_MIGRATIONS {
        let version = migration.version as i32;
        if done.contains(&version) {
            report.already_applied.push(migration.version);
            continue;
        }
        let failed = |source| MigrationError::Postgres {
            version: migration.version,
            name: migration.name,
            source,
        };
        // One transaction per migration: it is recorded if and only if it fully applied.
        let transaction = client.transaction().await.map_err(failed)?;
        transaction
            .batch_execute(migration.sql)
            .await
            .map_err(failed)?;
        transaction
            .execute(
                "INSERT INTO plugin_server_migrations (version, name) VALUES ($1, $2)",
                &[&version, &migration.name],
            )
            .await
            .map_err(failed)?;
        transaction.commit().await.map_err(failed)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied postgres migration"
        );
        report.applied.push(migration.version);
    }
    client
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&POSTGRES_MIGRATION_LOCK_ID],
        )
        .await
        .map_err(MigrationError::PostgresBookkeeping)?;
    Ok(report)
}

/// Creates the database if needed, then applies the ClickHouse migrations not yet recorded.
pub async fn migrate_clickhouse(
    target: &ClickHouseTarget,
) -> Result<MigrationReport, MigrationError> {
    // The database name was validated as an identifier by the settings.
    target
        .server_client()
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            target.database
        ))
        .execute()
        .await
        .map_err(MigrationError::ClickHouseBookkeeping)?;
    let client = target.database_client();
    client
        .query(
            "CREATE TABLE IF NOT EXISTS plugin_server_migrations (
                version UInt32, name String, applied_at DateTime
            ) ENGINE = ReplacingMergeTree(applied_at) ORDER BY version",
        )
        .execute()
        .await
        .map_err(MigrationError::ClickHouseBookkeeping)?;
    let done: Vec<u32> = client
        .query("SELECT DISTINCT version FROM plugin_server_migrations")
        .fetch_all()
        .await
        .map_err(MigrationError::ClickHouseBookkeeping)?;

    let mut report = MigrationReport::default();
    for migration in CLICKHOUSE_MIGRATIONS {
        if done.contains(&migration.version) {
            report.already_applied.push(migration.version);
            continue;
        }
        let failed = |source| MigrationError::ClickHouse {
            version: migration.version,
            name: migration.name,
            source,
        };
        for statement in clickhouse_statements(migration.sql) {
            match client.query(&statement).execute().await {
                Ok(()) => {}
                // ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS: a column that is already
                // there (a run that stopped before its bookkeeping) counts as added.
                Err(error)
                    if is_add_column(&statement)
                        && error.to_string().contains("already exists") => {}
                Err(error) => return Err(failed(error)),
            }
        }
        client
            .query(
                "INSERT INTO plugin_server_migrations (version, name, applied_at) \
                 VALUES (?, ?, now())",
            )
            .bind(migration.version)
            .bind(migration.name)
            .execute()
            .await
            .map_err(failed)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied clickhouse migration"
        );
        report.applied.push(migration.version);
    }
    Ok(report)
}

/// ClickHouse's HTTP interface takes one statement per request: split a file on the `;` that
/// ends a line, dropping `--` comment lines. No statement of ours has `;` inside a string.
fn is_add_column(statement: &str) -> bool {
    statement.starts_with("ALTER TABLE") && statement.contains(" ADD COLUMN ")
}

pub fn clickhouse_statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        let (body, ends) = match trimmed.strip_suffix(';') {
            Some(body) => (body, true),
            None => (line, false),
        };
        current.push_str(body);
        current.push('\n');
        if ends {
            statements.push(current.trim().to_owned());
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        statements.push(current.trim().to_owned());
    }
    statements
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_files_split_into_statements() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8)\nENGINE = Memory;\n\n\
                   CREATE TABLE b (y String) ENGINE = Memory;\n";
        assert_eq!(
            clickhouse_statements(sql),
            vec![
                "CREATE TABLE a (x UInt8)\nENGINE = Memory".to_owned(),
                "CREATE TABLE b (y String) ENGINE = Memory".to_owned(),
            ]
        );
    }

    #[test]
    fn every_shipped_migration_has_statements_and_a_unique_version() {
        for migrations in [POSTGRES_MIGRATIONS, CLICKHOUSE_MIGRATIONS] {
            let mut versions: Vec<u32> = migrations.iter().map(|m| m.version).collect();
            versions.dedup();
            assert_eq!(versions.len(), migrations.len());
            assert!(
                versions.windows(2).all(|pair| pair[0] < pair[1]),
                "ascending"
            );
        }
        for migration in CLICKHOUSE_MIGRATIONS {
            let statements = clickhouse_statements(migration.sql);
            assert!(!statements.is_empty(), "{}", migration.name);
            for statement in statements {
                assert!(
                    statement.contains("IF NOT EXISTS") || is_add_column(&statement),
                    "idempotent: {statement}"
                );
            }
        }
    }
}
