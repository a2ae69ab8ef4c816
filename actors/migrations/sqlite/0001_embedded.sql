-- The embedded profile's store: what Postgres holds in the cluster profile, in one SQLite file.
-- Same meaning as PostHog's tables, fewer columns (only what the server reads or writes).
-- Times are RFC 3339 text in UTC; JSON is text.

-- Teams by API token. An id, once given, never moves (tokens named in the plugin config file
-- keep theirs; others are numbered after the highest id so far).
CREATE TABLE IF NOT EXISTS teams (
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL,
    api_token TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS persons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL,
    team_id INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    properties TEXT NOT NULL,
    properties_last_operation TEXT NOT NULL DEFAULT '{}',
    is_identified INTEGER NOT NULL,
    version INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS person_distinct_ids (
    team_id INTEGER NOT NULL,
    distinct_id TEXT NOT NULL,
    person_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (team_id, distinct_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS person_distinct_ids_by_person ON person_distinct_ids (person_id);

-- meta.storage, per plugin config.
CREATE TABLE IF NOT EXISTS plugin_storage (
    plugin_config_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (plugin_config_id, key)
) WITHOUT ROWID;
