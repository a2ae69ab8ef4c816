//! The embedded profile's database: one SQLite file (`BASE_DIR/data/plugin-server.db`)
//! holding what Postgres holds in the cluster profile (teams, persons and their distinct ids,
//! groups, plugin storage, the plugin job queue), so a single node keeps its state across
//! restarts and crashes.
//!
//! One connection, behind an async mutex: SQLite has one writer at a time anyway, and the
//! embedded profile's traffic is one node's. Statements run on the calling thread, holding the
//! lock; they answer from SQLite's page cache in microseconds, and a commit returns once its
//! write-ahead-log record is fsynced (`synchronous = FULL`), so what a capture acknowledged
//! survives kill -9 and power loss alike.
//!
//! The schema is versioned with SQLite's `user_version`: each file of `migrations/sqlite/` is
//! applied once, in order, in its own transaction.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};

/// The schema's steps, in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_embedded.sql"),
    include_str!("../migrations/sqlite/0002_groups_jobs.sql"),
    include_str!("../migrations/sqlite/0003_plugin_ids.sql"),
    include_str!("../migrations/sqlite/0004_definitions.sql"),
];

#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("cannot open the embedded database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the embedded database's folder {}: {source}", path.display())]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the embedded database {} has schema version {found}, newer than this server's \
         {known}: it was written by a newer plugin-server", path.display()
    )]
    Newer {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("the embedded database: {0}")]
    Query(#[from] rusqlite::Error),
}

/// The database; cheap to clone, every clone the same connection.
#[derive(Clone)]
pub struct Sqlite {
    connection: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, SqliteError> {
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(|source| SqliteError::Folder {
                path: folder.to_owned(),
                source,
            })?;
        }
        let open = |source| SqliteError::Open {
            path: path.to_owned(),
            source,
        };
        let mut connection = Connection::open(path).map_err(open)?;
        // Another process on the same file (a second server by mistake, an operator's
        // sqlite3 shell) makes writers wait a little rather than fail at once.
        connection
            .busy_timeout(Duration::from_secs(5))
            .map_err(open)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .map_err(open)?;
        migrate(&mut connection, path)?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// A database in memory with the same schema, for tests of the stores' SQL (durability is
    /// the file's, tested through the server).
    #[cfg(any(test, feature = "test-util"))]
    pub fn in_memory() -> Result<Self, SqliteError> {
        let mut connection = Connection::open_in_memory()?;
        migrate(&mut connection, Path::new(":memory:"))?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// The connection, for statements that need no transaction.
    pub async fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().await
    }

    /// The connection held across awaits, for a transaction that spans several calls.
    pub async fn lock_owned(&self) -> OwnedMutexGuard<Connection> {
        Arc::clone(&self.connection).lock_owned().await
    }
}

fn migrate(connection: &mut Connection, path: &Path) -> Result<(), SqliteError> {
    let applied: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(SqliteError::Newer {
            path: path.to_owned(),
            found: applied,
            known: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1)?;
        transaction.commit()?;
        tracing::info!(version = index + 1, "embedded database schema updated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opening_twice_applies_the_schema_once_and_keeps_the_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data/plugin-server.db");
        {
            let database = Sqlite::open(&path).expect("open");
            database
                .lock()
                .await
                .execute(
                    "INSERT INTO teams (id, uuid, api_token, name, created_at) \
                     VALUES (7, 'u', 'phc_x', 'x', 'now')",
                    [],
                )
                .expect("insert");
        }
        let database = Sqlite::open(&path).expect("reopen");
        let connection = database.lock().await;
        let version: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        let token: String = connection
            .query_row("SELECT api_token FROM teams WHERE id = 7", [], |row| {
                row.get(0)
            })
            .expect("row");
        assert_eq!(token, "phc_x");
        let mode: String = connection
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plugin-server.db");
        let connection = Connection::open(&path).expect("open");
        connection
            .pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .expect("version");
        drop(connection);
        let error = Sqlite::open(&path).err().expect("refused");
        assert!(matches!(error, SqliteError::Newer { .. }), "{error}");
    }
}
