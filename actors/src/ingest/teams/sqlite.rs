//! The embedded profile's teams, in the embedded SQLite database: an id, once given to a
//! token, never moves, across restarts and whatever order tokens arrive in.
//!
//! Tokens named in the plugin config file (`[[team]]` tables) get the ids written there.
//! A token nobody named follows `EMBEDDED_UNKNOWN_TOKENS`: `create` (the first-run default)
//! makes it a team numbered after the highest id so far, logged once; `refuse` leaves it
//! without a team, so capture answers PostHog's 401.

use std::path::Path;

use async_trait::async_trait;
use chrono::Utc;
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use uuid::Uuid;

use super::{TeamStore, TeamStoreError};
use crate::event::Team;
use crate::sqlite::Sqlite;

/// What happens to a token no team has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownTokens {
    Create,
    Refuse,
}

/// A `[[team]]` table of the plugin config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedTeam {
    pub id: i64,
    pub token: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NamedTeamsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "{path} names token {token:?} team {named}, but it has been team {stored} since it was \
         first seen (ids never move: name it {stored}, or reset the embedded database)"
    )]
    TokenMoved {
        path: String,
        token: String,
        named: i64,
        stored: i64,
    },
    #[error(
        "{path} names token {token:?} team {id}, but team {id} is token {holder:?} (ids never \
         move: give {token:?} another id)"
    )]
    IdTaken {
        path: String,
        token: String,
        id: i64,
        holder: String,
    },
    #[error("the embedded database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// The `[[team]]` tables of the plugin config file at `path` (none when it does not exist).
pub fn named_teams(path: &Path) -> Result<Vec<NamedTeam>, NamedTeamsError> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        team: Vec<NamedTeam>,
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NamedTeamsError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    toml::from_str::<File>(&text)
        .map(|file| file.team)
        .map_err(|source| NamedTeamsError::Parse {
            path: path.display().to_string(),
            source,
        })
}

pub struct SqliteTeamStore {
    database: Sqlite,
    unknown: UnknownTokens,
}

impl SqliteTeamStore {
    /// Records the named teams (`path` is the file they came from, for errors), refusing any
    /// that would move an id.
    pub async fn new(
        database: Sqlite,
        named: &[NamedTeam],
        path: &Path,
        unknown: UnknownTokens,
    ) -> Result<Self, NamedTeamsError> {
        {
            let connection = database.lock().await;
            for team in named {
                let by_token: Option<i64> = connection
                    .query_row(
                        "SELECT id FROM teams WHERE api_token = ?1",
                        [&team.token],
                        |row| row.get(0),
                    )
                    .optional()?;
                let by_id: Option<String> = connection
                    .query_row(
                        "SELECT api_token FROM teams WHERE id = ?1",
                        [team.id],
                        |row| row.get(0),
                    )
                    .optional()?;
                match (by_token, by_id) {
                    (Some(stored), _) if stored != team.id => {
                        return Err(NamedTeamsError::TokenMoved {
                            path: path.display().to_string(),
                            token: team.token.clone(),
                            named: team.id,
                            stored,
                        });
                    }
                    (None, Some(holder)) => {
                        return Err(NamedTeamsError::IdTaken {
                            path: path.display().to_string(),
                            token: team.token.clone(),
                            id: team.id,
                            holder,
                        });
                    }
                    (Some(_), _) => {}
                    (None, None) => {
                        insert(
                            &connection,
                            Some(team.id),
                            &team.token,
                            team.name.as_deref(),
                        )?;
                    }
                }
            }
        }
        Ok(Self { database, unknown })
    }
}

/// Inserts the team, numbered after the highest id when `id` is `None` and named "Team <id>"
/// when `name` is; one statement, answering the row.
fn insert(
    connection: &rusqlite::Connection,
    id: Option<i64>,
    token: &str,
    name: Option<&str>,
) -> rusqlite::Result<Team> {
    connection.query_row(
        "INSERT INTO teams (id, uuid, api_token, name, created_at) \
         SELECT new.id, ?2, ?3, coalesce(?4, 'Team ' || new.id), ?5 \
         FROM (SELECT coalesce(?1, (SELECT coalesce(max(id), 0) + 1 FROM teams)) AS id) AS new \
         RETURNING id, uuid, api_token, name",
        params![
            id,
            Uuid::now_v7().to_string(),
            token,
            name,
            Utc::now().to_rfc3339()
        ],
        team,
    )
}

fn team(row: &rusqlite::Row<'_>) -> rusqlite::Result<Team> {
    let uuid: String = row.get(1)?;
    Ok(Team {
        id: row.get(0)?,
        uuid: Uuid::parse_str(&uuid).unwrap_or_else(|_| Uuid::nil()),
        organization_id: Uuid::nil(),
        api_token: row.get(2)?,
        name: row.get(3)?,
        anonymize_ips: false,
        session_recording_opt_in: false,
        ingested_event: true,
        slack_incoming_webhook: None,
        timezone: "UTC".to_owned(),
    })
}

fn unavailable(error: rusqlite::Error) -> TeamStoreError {
    TeamStoreError::Unavailable(format!("the embedded database: {error}"))
}

#[async_trait]
impl TeamStore for SqliteTeamStore {
    async fn by_token(&self, token: &str) -> Result<Option<Team>, TeamStoreError> {
        let connection = self.database.lock().await;
        let select = "SELECT id, uuid, api_token, name FROM teams WHERE api_token = ?1";
        let found = connection
            .query_row(select, [token], team)
            .optional()
            .map_err(unavailable)?;
        if found.is_some() || self.unknown == UnknownTokens::Refuse {
            return Ok(found);
        }
        let created = insert(&connection, None, token, None).map_err(unavailable)?;
        tracing::info!(
            token,
            team_id = created.id,
            "a new token is now a team (EMBEDDED_UNKNOWN_TOKENS=create; `refuse` turns this off)"
        );
        Ok(Some(created))
    }

    async fn by_id(&self, id: i64) -> Result<Option<Team>, TeamStoreError> {
        let connection = self.database.lock().await;
        connection
            .query_row(
                "SELECT id, uuid, api_token, name FROM teams WHERE id = ?1",
                [id],
                team,
            )
            .optional()
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(named: &[NamedTeam], unknown: UnknownTokens) -> (SqliteTeamStore, Sqlite) {
        let database = Sqlite::in_memory().expect("sqlite");
        let store =
            SqliteTeamStore::new(database.clone(), named, Path::new("plugins.toml"), unknown)
                .await
                .expect("store");
        (store, database)
    }

    fn named(id: i64, token: &str) -> NamedTeam {
        NamedTeam {
            id,
            token: token.to_owned(),
            name: None,
        }
    }

    #[tokio::test]
    async fn named_tokens_keep_their_ids_and_new_ones_follow_the_highest() {
        let (store, _) = store(&[named(5, "phc_five")], UnknownTokens::Create).await;
        let new = store
            .by_token("phc_new")
            .await
            .expect("read")
            .expect("created");
        assert_eq!(new.id, 6);
        assert_eq!(
            store
                .by_token("phc_five")
                .await
                .expect("read")
                .expect("named")
                .id,
            5
        );
        assert_eq!(
            store
                .by_token("phc_new")
                .await
                .expect("read")
                .expect("kept")
                .id,
            6
        );
        assert_eq!(
            store
                .by_id(6)
                .await
                .expect("read")
                .expect("by id")
                .api_token,
            "phc_new"
        );
    }

    #[tokio::test]
    async fn refused_tokens_get_no_team() {
        let (store, _) = store(&[named(1, "phc_one")], UnknownTokens::Refuse).await;
        assert!(store.by_token("phc_other").await.expect("read").is_none());
        assert_eq!(
            store
                .by_token("phc_one")
                .await
                .expect("read")
                .expect("named")
                .id,
            1
        );
    }

    #[tokio::test]
    async fn a_config_that_would_move_an_id_is_refused() {
        let (store, database) = store(&[], UnknownTokens::Create).await;
        store.by_token("phc_first").await.expect("read");
        drop(store);
        let moved = SqliteTeamStore::new(
            database.clone(),
            &[named(3, "phc_first")],
            Path::new("plugins.toml"),
            UnknownTokens::Create,
        )
        .await
        .err()
        .expect("refused");
        assert!(
            matches!(moved, NamedTeamsError::TokenMoved { stored: 1, .. }),
            "{moved}"
        );
        let taken = SqliteTeamStore::new(
            database,
            &[named(1, "phc_second")],
            Path::new("plugins.toml"),
            UnknownTokens::Create,
        )
        .await
        .err()
        .expect("refused");
        assert!(
            matches!(taken, NamedTeamsError::IdTaken { id: 1, .. }),
            "{taken}"
        );
    }

    #[test]
    fn named_teams_are_read_beside_the_plugin_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plugins.toml");
        std::fs::write(
            &path,
            "[[team]]\nid = 2\ntoken = \"phc_two\"\nname = \"Shop\"\n\n\
             [[plugin_config]]\nplugin = \"x\"\nteam_id = 2\n",
        )
        .expect("write");
        assert_eq!(
            named_teams(&path).expect("read"),
            vec![NamedTeam {
                id: 2,
                token: "phc_two".to_owned(),
                name: Some("Shop".to_owned())
            }]
        );
        assert_eq!(
            named_teams(&dir.path().join("none.toml")).expect("none"),
            vec![]
        );
    }
}
