-- Per-job retry policy for plugin jobs: the delay before the second attempt, doubled for each
-- later one (meta.jobs.<name>(payload, { maxAttempts, retryDelayMs })). IF NOT EXISTS so the
-- file can run at every start.

ALTER TABLE plugin_server_jobs
    ADD COLUMN IF NOT EXISTS retry_delay_ms integer NOT NULL DEFAULT 1000;

ALTER TABLE plugin_server_jobs_dead_letter
    ADD COLUMN IF NOT EXISTS retry_delay_ms integer NOT NULL DEFAULT 1000;
