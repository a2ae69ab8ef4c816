-- The plugin server's own tables (prefix plugin_server_), replacing graphile-worker's
-- schema for plugin jobs (meta.jobs.<name>(payload).runAt/runIn/runNow).
--
-- IF NOT EXISTS everywhere so the file can run at every start without harm.
--
-- No foreign keys to posthog_pluginconfig or posthog_team, on purpose: a foreign key
-- would put referential triggers on PostHog's tables and make Django's deletes of a
-- plugin config or team fail (or cascade into this table). The runner skips jobs whose
-- config is gone or disabled instead.
--
-- Convention: every statement ends with a semicolon at the end of a line, and no other
-- line (comments included) ends with one, so a runner may split on such lines.

-- Claiming due jobs, from any number of instances at once:
--   SELECT id, ... FROM plugin_server_jobs
--    WHERE locked_at IS NULL AND run_at <= now()
--    ORDER BY run_at, id LIMIT n FOR UPDATE SKIP LOCKED
-- then UPDATE ... SET locked_by = <instance>, locked_at = now(), attempts = attempts + 1.
-- A finished job is deleted. A failed one is released (locked_by and locked_at back to
-- NULL, run_at moved on, last_error set) while attempts < max_attempts, else moved to
-- plugin_server_jobs_dead_letter. max_attempts defaults to 1 because plugin jobs are
-- not retried by the queue (plugins re-queue themselves).
CREATE TABLE IF NOT EXISTS plugin_server_jobs (
    id bigserial PRIMARY KEY,
    plugin_config_id integer NOT NULL,
    team_id integer NOT NULL,
    job_name text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    run_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts integer NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    last_error text,
    locked_by text,
    locked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The poll query. Partial, so it holds only unclaimed jobs and stays small while many
-- jobs are running. The query must say "locked_at IS NULL" for the planner to use it.
CREATE INDEX IF NOT EXISTS plugin_server_jobs_due_idx
    ON plugin_server_jobs (run_at, id)
    WHERE locked_at IS NULL;

-- Finding jobs whose instance died holding the lock (locked_at older than a timeout).
CREATE INDEX IF NOT EXISTS plugin_server_jobs_locked_at_idx
    ON plugin_server_jobs (locked_at)
    WHERE locked_at IS NOT NULL;

-- Dropping or skipping the jobs of one config (deleted or disabled).
CREATE INDEX IF NOT EXISTS plugin_server_jobs_plugin_config_id_idx
    ON plugin_server_jobs (plugin_config_id);

-- Jobs that used up their attempts. The columns are those of plugin_server_jobs, in the
-- same order, followed by failed_at and error, so a job can be moved in one statement:
--   WITH j AS (DELETE FROM plugin_server_jobs WHERE id = $1 RETURNING *)
--   INSERT INTO plugin_server_jobs_dead_letter SELECT j.*, now(), $2 FROM j
-- id keeps the job's original id (no sequence here), for tracing it in logs.
CREATE TABLE IF NOT EXISTS plugin_server_jobs_dead_letter (
    id bigint PRIMARY KEY,
    plugin_config_id integer NOT NULL,
    team_id integer NOT NULL,
    job_name text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    run_at timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 1,
    last_error text,
    locked_by text,
    locked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    failed_at timestamptz NOT NULL DEFAULT now(),
    error text
);

CREATE INDEX IF NOT EXISTS plugin_server_jobs_dead_letter_failed_at_idx
    ON plugin_server_jobs_dead_letter (failed_at);

CREATE INDEX IF NOT EXISTS plugin_server_jobs_dead_letter_plugin_config_id_idx
    ON plugin_server_jobs_dead_letter (plugin_config_id);
