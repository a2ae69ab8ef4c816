-- Groups and plugin jobs, as posthog_grouptypemapping / posthog_group and plugin_server_jobs
-- hold them in the cluster profile.

CREATE TABLE IF NOT EXISTS group_types (
    team_id INTEGER NOT NULL,
    group_type TEXT NOT NULL,
    group_type_index INTEGER NOT NULL CHECK (group_type_index BETWEEN 0 AND 4),
    PRIMARY KEY (team_id, group_type),
    UNIQUE (team_id, group_type_index)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS groups (
    team_id INTEGER NOT NULL,
    group_type_index INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    properties TEXT NOT NULL,
    created_at TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (team_id, group_type_index, group_key)
) WITHOUT ROWID;

-- Times are Unix milliseconds here: the queue orders and compares them.
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin_config_id INTEGER NOT NULL,
    team_id INTEGER NOT NULL,
    job_name TEXT NOT NULL,
    payload TEXT NOT NULL,
    run_at_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    retry_delay_ms INTEGER NOT NULL,
    claimed_at_ms INTEGER
);

CREATE INDEX IF NOT EXISTS jobs_due ON jobs (run_at_ms) WHERE claimed_at_ms IS NULL;

CREATE TABLE IF NOT EXISTS jobs_dead_letter (
    id INTEGER PRIMARY KEY,
    plugin_config_id INTEGER NOT NULL,
    team_id INTEGER NOT NULL,
    job_name TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    failed_at_ms INTEGER NOT NULL
);
